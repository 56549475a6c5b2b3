"""Expert-parallel inference under torchrun: the routed experts split over the ranks, one Engine per rank
in lockstep; rank 0 serves (HTTP, or the CLI's generate), the others follow.

    torchrun --nproc-per-node R -m dsv3.cli serve CHECKPOINT --ep R

It composes three floors, hence a module of its own above them (as posttrain is): the checkpoint loader
(dsv3/checkpoints/hf.py, which reads one shard), the expert-parallel dispatcher (dsv3/distributed/
expert_parallel.py) and the lockstep engine (dsv3/inference/lockstep.py).

What each rank holds. The routed experts `local_experts(E, rank, R)` of every MoE block (main and MTP),
contiguous as in training, read from the safetensors and nothing of the other experts
(`load_pretrained(experts=...)`); FP8 experts stay FP8 (keep_fp8). Everything else is replicated:
embedding, attention, dense FFNs, shared experts, routers, head, the MTP modules' other weights, and the
paged latent KV cache, which holds the same sequences on every rank. The MoE blocks route through
`ReplicatedTokensDispatcher` (the model's one seam, `MoE.dispatcher`): the tokens are the same on every
rank, so rank r sends only its 1/R slice of them to the experts' owners through the all-to-all and the
slices' outputs are all-gathered; each (token, expert) row is computed once over all ranks, so the expert
work per rank is 1/R of one process's (as the memory is). Scheduling and the tokens are
rank 0's (lockstep.py explains why rank 0 decides rather than every rank sampling with equal seeds).

Refused: CUDA graphs and `compile_decode` (which compiles the graphed decode steps). The dispatcher
reads its split sizes on the host (`.tolist()`) and exchanges data-dependent row counts, which a CUDA
graph cannot capture; the EP engine runs its decode steps eagerly.

Cost: attention, the dense layers and the shared experts run on every rank for the whole batch
(replicated); the routed experts are split by tokens and by experts as above. Attention data parallelism
(the paper's DP attention, each rank its own sequences) is not done.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from dsv3.distributed.expert_parallel import ReplicatedTokensDispatcher, local_experts
from dsv3.inference.engine import Engine
from dsv3.inference.lockstep import Leader, agree_with_rank0, control_group, run_follower
from dsv3.model.moe import MoE


def check_ep(ep: int, n_routed_experts: int | None = None) -> int:
    """The world size for `--ep ep`, or a ValueError saying why it cannot run: torchrun must have started
    exactly ep processes, and ep must divide the routed experts."""
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"--ep must be an integer >= 1, got {ep!r}")
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise ValueError(f"--ep {ep} runs one process per expert-parallel rank: start it with torchrun "
                         f"(torchrun --nproc-per-node {ep} -m dsv3.cli ... --ep {ep}); WORLD_SIZE is not set")
    if int(world) != ep:
        raise ValueError(f"--ep {ep} but torchrun started {world} processes: expert-parallel serving uses one rank "
                         "per expert shard (--ep = --nproc-per-node x nodes)")
    if n_routed_experts is not None:
        if n_routed_experts == 0:
            raise ValueError(f"--ep {ep}: the model has no routed experts to split")
        if n_routed_experts % ep:
            raise ValueError(f"--ep {ep} does not divide n_routed_experts ({n_routed_experts}): each rank must hold "
                             f"the same number of experts")
    return int(world)


def load_ep_engine(checkpoint: str, *, ep: int, device: str = "auto", keep_fp8: bool = True,
                   cuda_graphs: bool | None = None, compile_decode: bool = False, group=None, **engine_kwargs):
    """(Engine, DSTokenizer) of this rank: its shard of a checkpoint (or run) directory, the EP dispatcher
    installed in every MoE block, decisions agreed with rank 0. Needs the default process group started
    (torchrun + `dsv3.distributed.init_distributed`) over `ep` ranks (or `group` of ep ranks).
    engine_kwargs go to `Engine`, as for `load_engine`; every rank must pass the same. Rank 0 then wraps
    it in `lockstep.Leader`, the others `lockstep.follow` it."""
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.checkpoints.rundir import resolve_checkpoint
    from dsv3.config import ModelConfig
    from dsv3.tokenizer import DSTokenizer

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"ep={ep} needs torch.distributed started over {ep} ranks (run under torchrun)")
    group = group or dist.group.WORLD
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    if R != ep:
        raise ValueError(f"ep={ep} but the process group has {R} ranks")
    if cuda_graphs or compile_decode:
        raise ValueError("CUDA graphs (and compile_decode, which compiles the graphed steps) cannot run with expert "
                         "parallelism: the all-to-all dispatcher reads its split sizes on the host and exchanges "
                         "data-dependent row counts, which a graph cannot capture; the EP engine decodes eagerly")
    checkpoint = resolve_checkpoint(checkpoint)
    E = ModelConfig.from_json(checkpoint).n_routed_experts
    if E == 0 or E % ep:
        raise ValueError(f"ep={ep} does not divide n_routed_experts ({E})" if E else
                         f"ep={ep}: the model has no routed experts to split")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per local rank (init_distributed made it the current device)
        device = f"cuda:{torch.cuda.current_device()}"
    tok = DSTokenizer.load(checkpoint)
    model = load_pretrained(checkpoint, device=device, dtype=torch.float32 if device == "cpu" else None,
                            keep_fp8=keep_fp8, experts=local_experts(E, rank, ep)).eval()
    for m in model.modules():
        if isinstance(m, MoE):
            m.dispatcher = ReplicatedTokensDispatcher(group, E)
    return agree_with_rank0(Engine(model, tok, cuda_graphs=False, **engine_kwargs), group), tok


def run_ep(ep: int, checkpoint: str, engine_kwargs: dict, run: Callable[[Leader, object], int]) -> int:
    """One rank of an expert-parallel command under torchrun: check the layout before anything starts,
    start the process groups, load this rank's engine (`load_ep_engine(checkpoint, ep=ep, **engine_kwargs)`);
    rank 0 runs `run(leader, tokenizer)` and then tells the others to stop, which follow it until then.
    Returns the process's exit status."""
    from dsv3.checkpoints.rundir import resolve_checkpoint
    from dsv3.config import ModelConfig
    from dsv3.distributed.mesh import init_distributed

    checkpoint = resolve_checkpoint(checkpoint)
    check_ep(ep, ModelConfig.from_json(checkpoint).n_routed_experts)
    env = init_distributed(engine_kwargs.get("device", "auto"))
    rc = 1
    try:
        ctrl = control_group()
        engine, tok = load_ep_engine(checkpoint, ep=ep, **engine_kwargs)
        if env.rank != 0:
            rc = run_follower(engine, ctrl)
            return rc
        leader = Leader(engine, ctrl)
        try:
            rc = run(leader, tok)
        finally:
            leader.shutdown()
        return rc
    finally:
        if rc == 0:  # (else a peer may be gone, or a thread stuck in a collective: just exit)
            dist.destroy_process_group()


__all__ = ["check_ep", "load_ep_engine", "run_ep"]
