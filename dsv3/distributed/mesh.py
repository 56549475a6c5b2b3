"""The parallel layout as configuration: degrees, their checks, process-group start-up, the mesh.

Layout without a pipeline (pp = 1; world = dp_shard × ep ranks, every rank reads different rows of
the global batch):

    mesh ("dp", "ep"), rank = dp_index · ep + ep_index        ep ranks are consecutive (one node)
    routed experts   split over "ep" (rank holds E/ep of them), replicated over "dp"
    everything else  FSDP2-sharded over all dp_shard × ep ranks (EP borrows its ranks from data
                     parallelism, as in torchtitan), or replicated when `fsdp=False`

With a pipeline (pp > 1; world = pp × dp_shard × ep): mesh ("pp", "dp", "ep"); each of the
dp_shard × ep ranks of one pipeline index holds the same stages (the routed experts split over "ep"),
reads its own rows of every micro-batch, and the stages' gradients are averaged over them
(dsv3/distributed/pipeline.py).

Node-limited routing (SPEC §4.3, paper §2.1.2): the model's group-limited routing *is* the
node-limited rule when an expert group is the set of experts of one node: set the model's
`n_group` = number of nodes the EP ranks span and `topk_group` = M (the paper: 256 experts on
64 EP ranks over 8 nodes, n_group = 8, topk_group = 4). Say so with `node_groups = n_group`; the
check then asserts that the groups coincide with blocks of whole EP ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dsv3.cliargs import setting


class ParallelConfigError(ValueError):
    """A parallel layout that does not fit the world size or the model; the message names the conflict."""


SCHEDULES = ("1f1b", "dualpipev")


# `dsv3 train` leaves dp_shard and ep at this when --dp-shard / --ep are not given: the degree is then
# derived from torchrun's world size (dsv3.distributed.strategy.resolve_layout), which ParallelConfig
# itself never holds (validate() asks for >= 1).
DERIVED = 0


@dataclass
class ParallelConfig:
    """The layout of a run over torchrun's ranks; the one-process layout is the default (all 1). Each
    field is also a `dsv3 train` flag (dsv3/cliargs.py)."""
    # data-parallel degree of the experts: ranks holding the same experts
    dp_shard: int = setting(1, "under torchrun: ranks holding the same experts (default: world size / --ep)",
                            cli_default=DERIVED)
    # expert-parallel degree: the routed experts are split over this many ranks
    ep: int = setting(1, "under torchrun: expert-parallel degree (default: world size / --dp-shard, else 1)",
                      cli_default=DERIVED)
    # shard the non-expert parameters (FSDP2) over all ranks; False: replicate them (the flag: --no-fsdp)
    # with pp > 1: shard the AdamW state and fp32 masters over a stage's replicas (ZeRO-1); False: whole on each
    fsdp: bool = setting(True, "under torchrun: replicate the non-expert parameters instead of FSDP2-sharding them "
                               "(with --pp: keep the whole optimizer state on every replica of a stage instead of "
                               "ZeRO-1 shards)")
    pp: int = setting(1, "under torchrun: pipeline-parallel ranks (1: no pipeline; world = pp x --dp-shard x --ep)")
    pp_schedule: str = setting("1f1b", "pipeline schedule: 1f1b (pp stages) or dualpipev (2 x pp stages in a V)",
                               choices=SCHEDULES)
    n_microbatches: int = setting(0, "pipeline micro-batches per step (0: the number of stages); divides "
                                     "--batch-size")
    # > 0: node-limited routing is requested with this many rank groups ("nodes"); then the model's
    # n_group must equal it and ep must be a multiple of it, so that expert group g = the experts of
    # EP ranks [g·ep/node_groups, (g+1)·ep/node_groups). 0: no check (the routing is what the model says).
    node_groups: int = setting(0, "node-limited routing check: the model's n_group expert groups must fall on "
                                  "this many blocks of whole EP ranks (the paper: 8 nodes, topk_group = M = 4)")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_shard * self.ep

    def validate(self, world_size: int | None = None, model_cfg=None) -> "ParallelConfig":
        for name in ("dp_shard", "ep", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.pp_schedule not in SCHEDULES:
            raise ParallelConfigError(f"pp_schedule must be one of {SCHEDULES}, got {self.pp_schedule!r}")
        if not isinstance(self.n_microbatches, int) or self.n_microbatches < 0:
            raise ParallelConfigError(f"n_microbatches must be an integer >= 0, got {self.n_microbatches!r}")
        if world_size is not None and self.world_size != world_size:
            what = f"pp ({self.pp}) x " if self.pp > 1 else ""
            raise ParallelConfigError(f"{what}dp_shard ({self.dp_shard}) x ep ({self.ep}) = {self.world_size} ranks, "
                                      f"but the world size is {world_size}")
        if self.node_groups < 0:
            raise ParallelConfigError(f"node_groups must be >= 0, got {self.node_groups}")
        if self.node_groups and self.ep % self.node_groups:
            raise ParallelConfigError(f"node-limited routing: ep ({self.ep}) is not a multiple of "
                                      f"node_groups ({self.node_groups}), so a rank group is not whole ranks")
        if model_cfg is None:
            return self
        E = model_cfg.n_routed_experts
        if self.ep > 1 and E == 0:
            raise ParallelConfigError(f"ep = {self.ep} but the model has no routed experts")
        if E and E % self.ep:
            raise ParallelConfigError(f"ep ({self.ep}) does not divide n_routed_experts ({E})")
        if self.node_groups:
            if model_cfg.n_group != self.node_groups:
                raise ParallelConfigError(
                    f"node-limited routing over {self.node_groups} rank groups needs the model's n_group = "
                    f"{self.node_groups} (expert group = rank group), got n_group = {model_cfg.n_group}")
            if model_cfg.topk_group >= model_cfg.n_group:
                raise ParallelConfigError(
                    f"node-limited routing needs topk_group (M) < n_group, got topk_group = {model_cfg.topk_group}"
                    f", n_group = {model_cfg.n_group}")
        return self


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group


def init_distributed(device: str = "auto") -> DistEnv:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL with one GPU per local rank on CUDA, gloo on the CPU. Without
    WORLD_SIZE (or with 1) nothing is started and a single-process DistEnv comes back."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # torch.distributed.nn.functional's collectives default to `group=group.WORLD`, read when it is imported (by
        # torch._dynamo, which model loading imports): imported after this point, its defaults would hold the
        # default group for good, and destroy_process_group could not free it (ep_serve.close_groups says why a
        # rank needs that); imported first, they hold None, which means the same group
        import torch.distributed.nn.functional as _nn_functional  # noqa: F401

        store = _attempt_store(world)
        dist.init_process_group(backend, rank=rank, world_size=world, **({"store": store} if store else {}))
    return DistEnv(rank, world, local, dev, backend)


def _attempt_store(world: int):
    """Under torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE, the default of its c10d rendezvous) every
    attempt of a restarted worker group (--max-restarts) talks to the same TCPStore, which still holds the
    previous attempt's process-group keys (the ranks' addresses): a restarted rank could read a dead peer's
    address and fail to connect (measured with gloo on torch 2.13, about one restart in two). Each
    attempt's keys get their own prefix. None elsewhere (the default env:// rendezvous)."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"dsv3/attempt_{torchrun_restarts()}", store)


def torchrun_restarts() -> int:
    """How many times torchrun (--max-restarts) has restarted this worker group (TORCHELASTIC_RESTART_COUNT;
    0 outside torchrun). A restarted run resumes from its run directory's latest complete checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def build_mesh(pcfg: ParallelConfig, device_type: str = "cpu"):
    """The 2-D DeviceMesh ("dp", "ep") over the initialised world (checked against pcfg)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    pcfg.validate(dist.get_world_size())
    return init_device_mesh(device_type, (pcfg.dp_shard, pcfg.ep), mesh_dim_names=("dp", "ep"))
