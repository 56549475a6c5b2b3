"""Apply the parallel layout to a built model, and the pieces of a training step that need it.

    parallelize(model, pcfg, mesh):  EP (slice the experts, install the all-to-all dispatcher)
                                     then FSDP2 (`fully_shard` per Block, MTP pieces, the root)
    finish_grad_sync(ps), grad_norm(model, ps): what a step needs after the backward (the training
                                     loop's ShardedStrategy, dsv3/distributed/strategy.py, calls them)
    train_step(model, opt, batch, ps, ...): one whole step (forward/backward on this rank's rows, sync,
                                     the AdamW step with the clip folded in, bias update), for tests/benches

Where the gradients are synchronised (every rank reads different rows; the loss on a rank is the
mean over its own rows, so the mean over ranks is the single-process loss of the global batch):
* non-expert parameters: FSDP2's reduce-scatter, which averages over all dp_shard × ep ranks, during
  the backward; with `fsdp=False` an all-reduce (sum / world) in `finish_grad_sync`.
* expert parameters under EP (not given to FSDP: `ignored_params`): the backward all-to-all already
  sums the losses of the EP group into the owner's gradient; `finish_grad_sync` all-reduces it over
  the "dp" replicas holding the same experts and divides by the world size. With ep = 1 the experts
  are ordinary parameters and FSDP shards them along the expert dimension.
Equal token counts per rank are assumed (packed pre-training windows): with ignored targets the
distributed loss is a mean of per-rank means, as in torchtitan's default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dsv3.distributed.expert_parallel import AllToAllDispatcher, global_expert_counts, shard_experts
from dsv3.distributed.mesh import ParallelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import MoE, Router, update_expert_bias
from dsv3.training.loss import compute_loss
from dsv3.training.optim import clip_and_step


@dataclass
class ParallelState:
    pcfg: ParallelConfig
    world_size: int
    data_group: object  # all ranks (each reads different rows): loss mean, expert loads
    dp_group: object | None  # ranks holding the same experts (None if dp_shard == 1)
    ep_group: object | None  # ranks sharing one copy of the experts (None if ep == 1)
    ep_rank: int
    expert_params: list  # local expert slices (EP only), synchronised by finish_grad_sync
    replicated_params: list  # non-expert parameters when fsdp=False
    mesh: object = None  # the ("dp", "ep") DeviceMesh (distributed checkpoints place expert slices on it)


def parallelize(model, pcfg: ParallelConfig, mesh, bf16_params: bool = False) -> ParallelState:
    """Turn the (identically initialised, on every rank) model into this rank's part, in place.

    bf16_params (--bf16-weights under FSDP2): the fp32 shards stay the masters; every block (and the MTP
    pieces) is all-gathered in bf16 and its gradients reduce-scattered in fp32 (MixedPrecisionPolicy). Kept
    fp32, as in one process (dsv3.training.optim.bf16_weight_params): the routers and RMSNorm gains (own fp32
    units) and the root (embedding, final norm, output head, which autocast casts).
    cast_forward_inputs=False: the residual stream stays fp32, as under autocast. Expert slices under EP are
    outside FSDP: the optimizer keeps their fp32 masters and stores them in bf16 (make_optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    pcfg.validate(world, model.config)
    ep_group = mesh.get_group("ep") if pcfg.ep > 1 else None
    dp_group = mesh.get_group("dp") if pcfg.dp_shard > 1 else None
    ep_rank = mesh.get_local_rank("ep")

    expert_params = []
    if pcfg.ep > 1:
        for m in model.modules():
            if isinstance(m, MoE):
                shard_experts(m.experts, ep_rank, pcfg.ep)
                m.dispatcher = AllToAllDispatcher(ep_group, model.config.n_routed_experts)
                expert_params += [m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj]
    ignored = set(expert_params)

    if bf16_params and not pcfg.fsdp:
        raise ValueError("bf16_params is FSDP2's form of bf16 working weights (fsdp=False: the optimizer keeps "
                         "the masters of the replicated weights, dsv3.training.optim.make_optimizer)")
    replicated = []
    if pcfg.fsdp and world > 1:
        flat = init_device_mesh(mesh.device_type, (world,), mesh_dim_names=("dp_ep",))  # all ranks
        mp = {}
        if bf16_params:
            mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)}
            # fp32 units first (a block's unit then leaves their params alone): the routers and every RMSNorm
            # gain inside the blocks, so that exactly the GEMM weights are gathered in bf16, the set one process
            # stores in bf16 (dsv3.training.optim.bf16_weight_params)
            fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)
            for blk in list(model.layers) + list(model.mtp):
                for m in blk.modules():
                    if isinstance(m, (Router, RMSNorm)):
                        fully_shard(m, mesh=flat, mp_policy=fp32)
        for mod in model.mtp:  # pieces used outside Block.forward (combine, output norm): own units
            for sub in (mod.enorm, mod.hnorm, mod.eh_proj, mod.shared_head.norm):
                if not (bf16_params and isinstance(sub, RMSNorm)):  # (already an fp32 unit above)
                    fully_shard(sub, mesh=flat, **mp)
        for blk in list(model.layers) + list(model.mtp):
            fully_shard(blk, mesh=flat, ignored_params=ignored, **mp)
        fully_shard(model, mesh=flat, ignored_params=ignored)
    elif world > 1:
        replicated = [p for p in model.parameters() if p not in ignored]
    return ParallelState(pcfg, world, dist.group.WORLD, dp_group, ep_group, ep_rank, expert_params, replicated, mesh)


@torch.no_grad()
def finish_grad_sync(ps: ParallelState) -> None:
    """After the backward (all micro-batches): make every gradient that of the global mean loss."""
    for p in ps.expert_params:
        if p.grad is None:  # no token reached this rank's experts
            p.grad = torch.zeros_like(p)
        if ps.dp_group is not None:
            _mean_fp32(p.grad, ps.dp_group, ps.world_size)
        else:
            p.grad.div_(ps.world_size)
    for p in ps.replicated_params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        _mean_fp32(p.grad, ps.data_group, ps.world_size)


def _mean_fp32(g: torch.Tensor, group, divisor: int) -> None:
    """`g` summed over `group` and divided by `divisor`, in fp32 (bf16 working weights' gradients are summed and
    divided wide, then rounded back once)."""
    if g.dtype == torch.float32:
        dist.all_reduce(g, group=group)
        g.div_(divisor)
        return
    wide = g.float()
    dist.all_reduce(wide, group=group)
    g.copy_(wide.div_(divisor))


@torch.no_grad()
def grad_norm(model, ps: ParallelState) -> torch.Tensor:
    """The global L2 norm of the whole (sharded) model's gradient, on the device: the squared norms of FSDP
    shards (summed over all ranks), expert slices (summed over the EP group; they are equal on the dp
    replicas) and replicated tensors (counted once)."""
    expert = {id(p) for p in ps.expert_params}
    dev = next(model.parameters()).device
    sharded, ep_sq, rep = (torch.zeros((), dtype=torch.float32, device=dev) for _ in range(3))
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            sharded += g.to_local().float().pow(2).sum()
        elif id(p) in expert:
            ep_sq += g.float().pow(2).sum()
        else:
            rep += g.float().pow(2).sum()
    if ps.world_size > 1:
        dist.all_reduce(sharded, group=ps.data_group)
    if ps.ep_group is not None:
        dist.all_reduce(ep_sq, group=ps.ep_group)
    return (sharded + ep_sq + rep).sqrt()


def train_step(model, opt, micro_batches, ps: ParallelState, *, mtp_lambda: float = 0.3,
               balance_alpha: float = 0.0, gamma: float = 0.0, grad_clip: float = 1.0,
               autocast=None) -> dict:
    """One optimizer step on this rank's rows: `micro_batches` is a list of (b, T+1) token tensors.
    Returns the global mean loss / main CE / MTP CE / balance term (same value on every rank), grad
    norm and global loads."""
    n = len(micro_batches)
    counts = None
    loss = torch.zeros(4, device=micro_batches[0].device)  # total, main CE, MTP (mean over depths), balance
    for b in micro_batches:
        x, y = b[:, :-1], b[:, 1:]
        if autocast is not None:
            with autocast():
                out = model(x, with_balance=balance_alpha > 0)
        else:
            out = model(x, with_balance=balance_alpha > 0)
        parts = compute_loss(out, y, mtp_lambda, balance_alpha)
        (parts.total / n).backward()
        zero = parts.main.new_zeros(())
        mtp = torch.stack(parts.mtp_per_depth).mean() if parts.mtp_per_depth else zero
        bal = parts.balance if parts.balance is not None else zero
        loss += torch.stack([parts.total, parts.main, mtp, bal]).detach().float() / n
        if out.expert_counts is not None:
            counts = out.expert_counts if counts is None else counts + out.expert_counts
    finish_grad_sync(ps)
    gnorm = clip_and_step(opt, grad_clip, grad_norm(model, ps))
    opt.zero_grad(set_to_none=True)
    if counts is not None:
        counts = global_expert_counts(counts, ps.data_group)
        update_expert_bias(model.routers(), counts, gamma)
    dist.all_reduce(loss, group=ps.data_group)
    loss = (loss / ps.world_size).tolist()
    return {"loss": loss[0], "main": loss[1], "mtp": loss[2], "balance": loss[3],
            "grad_norm": float(gnorm), "counts": counts}
