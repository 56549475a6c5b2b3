"""The parallel layout as configuration: degrees, their checks, process-group start-up, the mesh.

Layout (world = dp_shard × ep ranks, every rank reads different rows of the global batch):

    mesh ("dp", "ep"), rank = dp_index · ep + ep_index        ep ranks are consecutive (one node)
    routed experts   split over "ep" (rank holds E/ep of them), replicated over "dp"
    everything else  FSDP2-sharded over all dp_shard × ep ranks (EP borrows its ranks from data
                     parallelism, as in torchtitan), or replicated when `fsdp=False`

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


class ParallelConfigError(ValueError):
    """A parallel layout that does not fit the world size or the model; the message names the conflict."""


@dataclass
class ParallelConfig:
    dp_shard: int = 1  # data-parallel degree of the experts: ranks holding the same experts
    ep: int = 1  # expert-parallel degree: the routed experts are split over this many ranks
    fsdp: bool = True  # shard the non-expert parameters (FSDP2) over all ranks; False: replicate them
    # > 0: node-limited routing is requested with this many rank groups ("nodes"); then the model's
    # n_group must equal it and ep must be a multiple of it, so that expert group g = the experts of
    # EP ranks [g·ep/node_groups, (g+1)·ep/node_groups). 0: no check (the routing is what the model says).
    node_groups: int = 0

    @property
    def world_size(self) -> int:
        return self.dp_shard * self.ep

    def validate(self, world_size: int | None = None, model_cfg=None) -> "ParallelConfig":
        for name in ("dp_shard", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if world_size is not None and self.world_size != world_size:
            raise ParallelConfigError(f"dp_shard ({self.dp_shard}) x ep ({self.ep}) = {self.world_size} ranks, "
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
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev, backend)


def build_mesh(pcfg: ParallelConfig, device_type: str = "cpu"):
    """The 2-D DeviceMesh ("dp", "ep") over the initialised world (checked against pcfg)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    pcfg.validate(dist.get_world_size())
    return init_device_mesh(device_type, (pcfg.dp_shard, pcfg.ep), mesh_dim_names=("dp", "ep"))
