"""Expert parallelism: the routed experts split over the "ep" ranks, tokens sent to them and back.

`AllToAllDispatcher` is installed as `MoE.dispatcher` (the one seam in the model) and computes the
same sum as the local `Experts.forward`, y_n = Σ_k w_nk · expert_{idx_nk}(x_n):

    pairs (token, expert) sorted by expert  -> since rank r holds experts [r·E/R, (r+1)·E/R), also by rank
    all_to_all_single of the (E,) counts     -> recv_RL[s, j]: rows rank s sends for my local expert j
    .tolist() of the split sizes             -> the one host synchronisation per layer
    all_to_all_single of the rows            (autograd: the backward is the reverse all-to-all)
    local experts (grouped GEMM or loop) on the received rows, each with weight 1 (exact)
    all_to_all_single back, weight by w in fp32, index_add_ into the tokens (as the grouped path)

Gradients: a rank's expert gradient is the sum over the losses of every rank of its EP group (the
backward all-to-all brings them home); the caller all-reduces it over the "dp" replicas and divides
by the world size, so that it equals the gradient of the mean loss (dsv3/distributed/parallelize.py).

Shape suffixes: N tokens here, K experts per token, M = N·K pairs, E experts, R = ep ranks,
L = E/R local experts, D hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.moe import Experts


def _count(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


class _AllToAll(torch.autograd.Function):
    """Rows of x split by `in_splits` go to the ranks of `group`; rows come back split by `out_splits`.
    The backward sends the gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """MoE.dispatcher for expert parallelism over `group` (R ranks); the rank's `Experts` must hold
    only its slice of L = n_experts / R experts (`shard_experts`)."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.R = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.R:
            raise ValueError(f"{n_experts} experts cannot be split over {self.R} expert-parallel ranks")
        self.E, self.L = n_experts, n_experts // self.R
        self.first_expert = self.rank * self.L  # global index of local expert 0

    def __call__(self, experts: Experts, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                 impl: str = "auto") -> torch.Tensor:
        N, K = idx_NK.shape
        R, L = self.R, self.L
        flat = idx_NK.reshape(-1)  # (M,)
        order = flat.argsort(stable=True)  # pairs sorted by expert, hence by destination rank
        token = order // K
        counts_E = _count(flat, self.E)
        recv_E = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_E, counts_E, group=self.group)  # L counts to each rank
        recv_RL = recv_E.view(R, L)  # [s, j]: rows from rank s for local expert j
        send_R, recv_R = torch.stack([counts_E.view(R, L).sum(1), recv_RL.sum(1)]).tolist()  # host sync

        x_recv = all_to_all(x_ND[token], recv_R, send_R, self.group)  # (sum recv_R, D), by source then expert
        n_recv = x_recv.shape[0]
        local_idx = torch.repeat_interleave(torch.arange(L, device=x_ND.device).repeat(R), recv_RL.reshape(-1),
                                            output_size=n_recv).unsqueeze(1)  # (n_recv, 1)
        ones = torch.ones(n_recv, 1, dtype=torch.float32, device=x_ND.device)
        if n_recv:
            y_recv = experts(x_recv, local_idx, ones, impl)  # each row through its expert, weight 1
        else:  # still part of the graph, so that the backward all-to-all runs on every rank
            y_recv = x_recv * 0
        y_MD = all_to_all(y_recv, send_R, recv_R, self.group)  # back in `order`
        y_MD = y_MD.float() * w_NK.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros(N, x_ND.shape[1], dtype=torch.float32, device=x_ND.device)
        return out.index_add_(0, token, y_MD).to(x_ND.dtype)


@torch.no_grad()
def shard_experts(experts: Experts, ep_rank: int, ep: int) -> None:
    """Keep only experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of the stacked (E, ·, ·) parameters."""
    E = experts.gate_proj.shape[0]
    L = E // ep
    for name in ("gate_proj", "up_proj", "down_proj"):
        p = getattr(experts, name)
        setattr(experts, name, nn.Parameter(p[ep_rank * L:(ep_rank + 1) * L].clone(), requires_grad=p.requires_grad))


def global_expert_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Per-expert loads summed over the ranks of `group` (all ranks that read different tokens), for
    the aux-loss-free bias update, which must see the whole global batch (SPEC §4.3)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return counts
    c = counts.clone()
    dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
    return c
