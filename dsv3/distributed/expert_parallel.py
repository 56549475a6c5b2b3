"""Expert parallelism: the routed experts split over the "ep" ranks, tokens sent to them and back.

`AllToAllDispatcher` is installed as `MoE.dispatcher` (the one seam in the model) and computes the
same sum as the local `Experts.forward`, y_n = Σ_k w_nk · expert_{idx_nk}(x_n):

    pairs (token, expert) sorted by expert  -> since rank r holds experts [r·E/R, (r+1)·E/R), also by rank
    all_to_all_single of the (E,) counts     -> recv_RL[s, j]: rows rank s sends for my local expert j
    .tolist() of the split sizes             -> the one host synchronisation per layer
    all_to_all_single of the rows            (autograd: the backward is the reverse all-to-all)
    local experts (grouped GEMM or loop) on the received rows, each with weight 1 (exact)
    all_to_all_single back, weight by w in fp32, index_add_ into the tokens (as the grouped path)

The call is four phases (`plan`, `dispatch`, `experts`, `combine`); every all-to-all is issued async
and, under the DualPipeV overlap (dsv3/distributed/pipeline.py), the other micro-batch's thread runs
between its issue and its wait (`OverlapCoordinator`); `CommTimer` measures the waits.

Gradients: a rank's expert gradient is the sum over the losses of every rank of its EP group (the
backward all-to-all brings them home); the caller all-reduces it over the "dp" replicas and divides
by the world size, so that it equals the gradient of the mean loss (dsv3/distributed/parallelize.py).

Shape suffixes: N tokens here, K experts per token, M = N·K pairs, E experts, R = ep ranks,
L = E/R local experts, D hidden.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from dsv3.model.moe import Experts


def _count(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


# --------------------------------------------------------------------------------------------------
# overlap hooks: who may run while an all-to-all is in flight, and how long the compute waited for it

class OverlapCoordinator:
    """A baton passed between two sides, "F" (the forward of one micro-batch) and "B" (the backward
    of another), run by two threads during one DualPipeV OVERLAP_F_B action (dsv3/distributed/
    pipeline.py). Only the side holding the baton runs Python; at every all-to-all the holder issues
    the collective asynchronously, passes the baton (`handoff`), and waits on the collective only
    when it has the baton back, i.e. after the other side has launched its compute up to its own
    next all-to-all. So each all-to-all of one side is in flight while the other side computes (the
    paper's Figure 4, DualPipe's F/B chunk pairing; torchtitan's HookCoordinator does the same with
    a barrier). The strict alternation also fixes the order in which the two threads issue their
    collectives on the one expert-parallel group, identically on every rank of the group (all run
    the same layers), which NCCL and gloo require. When a side finishes (`finish`), the other runs
    on alone; when inactive, `handoff` does nothing (sequential schedule actions)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.active = False
        self.turn = "F"
        self.done: set[str] = set()
        self.handoffs = 0  # baton passes so far (a test checks that the overlap path ran)

    def start(self) -> None:
        with self.cond:
            self.active, self.turn, self.done = True, "F", set()

    def stop(self) -> None:
        with self.cond:
            self.active = False
            self.cond.notify_all()

    def _other(self, side: str) -> str:
        return "B" if side == "F" else "F"

    def wait_turn(self, side: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: not self.active or self.turn == side or self._other(side) in self.done)

    def handoff(self, side: str) -> None:
        """`side` has an all-to-all in flight: let the other side run until it passes the baton back."""
        with self.cond:
            if not self.active or self._other(side) in self.done:
                return
            self.turn = self._other(side)
            self.handoffs += 1
            self.cond.notify_all()
        self.wait_turn(side)

    def finish(self, side: str) -> None:
        with self.cond:
            self.done.add(side)
            self.turn = self._other(side)
            self.cond.notify_all()


def _side() -> str:
    """"B" inside an autograd backward (also a recomputed forward), else "F"."""
    return "B" if torch._C._current_graph_task_id() != -1 else "F"


class CommTimer:
    """Exposed communication: for every wait on an all-to-all, how long the compute stood still.
    CUDA: CUDA events on the compute stream just before and after `work.wait()` (which makes the
    stream wait for the NCCL kernel): their distance is the stream's stall, 0 when the collective
    finished while other work ran. CPU (gloo): host seconds in `work.wait()`. `host` is the host
    time of the split sizes' `.tolist()` (which also waits for the compute queued before it)."""

    def __init__(self):
        self.records: list = []  # (kind, seconds or (event, event))

    def wait(self, work, kind: str, device: torch.device) -> None:
        if device.type == "cuda":
            s = torch.cuda.current_stream(device)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(s)
            work.wait()
            e1.record(s)
            self.records.append((kind, (e0, e1)))
        else:
            t0 = time.perf_counter()
            work.wait()
            self.records.append((kind, time.perf_counter() - t0))

    def add(self, kind: str, seconds: float) -> None:
        self.records.append((kind, seconds))

    def collect(self) -> dict[str, float]:
        """Seconds per kind since the last collect (synchronises the device)."""
        if any(isinstance(v, tuple) for _, v in self.records):
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for kind, v in self.records:
            t = v[0].elapsed_time(v[1]) / 1e3 if isinstance(v, tuple) else v
            out[kind] = out.get(kind, 0.0) + t
        self.records = []
        return out


def _wait(work, kind: str, device, timer: CommTimer | None) -> None:
    if timer is None:
        work.wait()
    else:
        timer.wait(work, f"{_side()}_{kind}", device)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, coord, timer,
              kind: str) -> torch.Tensor:
    """all_to_all_single, issued async; the other side of an overlap action runs before the wait."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    if coord is not None:
        coord.handoff(_side())
    _wait(work, kind, x.device, timer)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows of x split by `in_splits` go to the ranks of `group`; rows come back split by `out_splits`.
    The backward sends the gradients the reverse way. Both directions are overlap points."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, coord, timer, kind: str):
        ctx.splits, ctx.group, ctx.coord, ctx.timer, ctx.kind = (out_splits, in_splits), group, coord, timer, kind
        return _exchange(x, out_splits, in_splits, group, coord, timer, kind)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gx = _exchange(g, in_splits, out_splits, ctx.group, ctx.coord, ctx.timer, ctx.kind)
        return gx, None, None, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, coord=None, timer=None,
               kind: str = "a2a") -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group, coord, timer, kind)


class DispatchPlan(NamedTuple):
    order: torch.Tensor  # (M,) pairs sorted by expert
    token: torch.Tensor  # (M,) token of each sorted pair
    recv_RL: torch.Tensor  # (R, L) rows from rank s for local expert j
    send_R: list[int]  # rows to each rank
    recv_R: list[int]  # rows from each rank


class AllToAllDispatcher:
    """MoE.dispatcher for expert parallelism over `group` (R ranks); the rank's `Experts` must hold
    only its slice of L = n_experts / R experts (`shard_experts`). One call runs four phases:

        plan      counts all-to-all (async, an overlap point) + `.tolist()` of the split sizes
        dispatch  rows all-to-all (async, an overlap point; its backward is one too)
        experts   the local experts on the received rows
        combine   rows all-to-all back (async, an overlap point; its backward is one too) + weighting

    `coordinator` (an OverlapCoordinator, set by the pipeline with overlap on) is handed the baton
    at each overlap point; `timer` (a CommTimer) records how long each wait stood still."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.R = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.R:
            raise ValueError(f"{n_experts} experts cannot be split over {self.R} expert-parallel ranks")
        self.E, self.L = n_experts, n_experts // self.R
        self.first_expert = self.rank * self.L  # global index of local expert 0
        self.coordinator: OverlapCoordinator | None = None
        self.timer: CommTimer | None = None

    def plan(self, idx_NK: torch.Tensor) -> DispatchPlan:
        K = idx_NK.shape[1]
        flat = idx_NK.reshape(-1)  # (M,)
        order = flat.argsort(stable=True)  # pairs sorted by expert, hence by destination rank
        counts_E = _count(flat, self.E)
        recv_E = torch.empty_like(counts_E)
        work = dist.all_to_all_single(recv_E, counts_E, group=self.group, async_op=True)  # L counts to each rank
        if self.coordinator is not None:
            self.coordinator.handoff(_side())
        _wait(work, "counts", idx_NK.device, self.timer)
        recv_RL = recv_E.view(self.R, self.L)  # [s, j]: rows from rank s for local expert j
        t0 = time.perf_counter()
        send_R, recv_R = torch.stack([counts_E.view(self.R, self.L).sum(1), recv_RL.sum(1)]).tolist()  # host sync
        if self.timer is not None:
            self.timer.add(f"{_side()}_host", time.perf_counter() - t0)
        return DispatchPlan(order, order // K, recv_RL, send_R, recv_R)

    def dispatch(self, x_ND: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
        """-> (sum recv_R, D): the rows for my experts, by source rank then expert. Under CUDA autocast
        the rows travel in the autocast dtype: the grouped experts cast their input to it anyway
        (Experts.forward_grouped), so this halves the bytes of an fp32 residual stream and changes
        no value; the expert outputs then come back in that dtype too (they are bf16 GEMM outputs)."""
        x = x_ND[p.token]
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            x = x.to(torch.get_autocast_dtype("cuda"))
        return all_to_all(x, p.recv_R, p.send_R, self.group, self.coordinator, self.timer, "dispatch")

    def experts(self, experts: Experts, x_recv: torch.Tensor, p: DispatchPlan, impl: str) -> torch.Tensor:
        n_recv = x_recv.shape[0]
        if not n_recv:  # still part of the graph, so that the backward all-to-all runs on every rank
            return x_recv * 0
        local_idx = torch.repeat_interleave(torch.arange(self.L, device=x_recv.device).repeat(self.R),
                                            p.recv_RL.reshape(-1), output_size=n_recv).unsqueeze(1)  # (n_recv, 1)
        ones = torch.ones(n_recv, 1, dtype=torch.float32, device=x_recv.device)
        return experts(x_recv, local_idx, ones, impl)  # each row through its expert, weight 1 (exact)

    def combine(self, y_recv: torch.Tensor, w_NK: torch.Tensor, p: DispatchPlan, N: int) -> torch.Tensor:
        y_MD = all_to_all(y_recv, p.send_R, p.recv_R, self.group, self.coordinator, self.timer, "combine")
        y_MD = y_MD.float() * w_NK.reshape(-1)[p.order].unsqueeze(-1)  # back in `order`
        out = torch.zeros(N, y_recv.shape[1], dtype=torch.float32, device=y_recv.device)
        return out.index_add_(0, p.token, y_MD)

    def __call__(self, experts: Experts, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                 impl: str = "auto") -> torch.Tensor:
        p = self.plan(idx_NK)
        y_recv = self.experts(experts, self.dispatch(x_ND, p), p, impl)
        return self.combine(y_recv, w_NK, p, x_ND.shape[0]).to(x_ND.dtype)


class ReplicatedTokensDispatcher(AllToAllDispatcher):
    """MoE.dispatcher for expert-parallel inference where every rank holds the same tokens (the lockstep
    engine replicates attention and the batch, dsv3/ep_serve.py). Two paths, chosen by N alone (the same
    on every rank, so the ranks always agree):

    * N <= static_max_tokens (decode steps; `load_ep_engine` sets it to the largest decode step,
      max_batch_size x (speculative_k + 1)): every rank runs its own experts over the pairs routed to them
      (`Experts.forward_partial`: shapes fixed by N, no host sync) and one all-reduce in fp32 sums the
      partials. No split sizes to exchange or read back, so the step is graph-capturable (a CUDA graph
      records the NCCL all-reduce as it records any kernel). Each (token, expert) row is still computed
      once over all ranks. The per-token sum over k runs in k order on each rank and the all-reduce
      then adds the ranks' partials: the same terms as one process, summed in another order (fp32).
    * larger N (prefill): rank r dispatches only its slice of the N tokens, rows [r·S, (r+1)·S) with
      S = ceil(N / R), through the all-to-all (one host sync per layer for the split sizes), and the R
      slices' outputs are all-gathered, so each row is computed once and the bytes moved are the routed
      rows' rather than (N, D) per rank. The slices are fixed by N alone; padded to S rows for the
      all-gather (gloo and NCCL need equal sizes). Each token's output is its own weighted sum in fp32,
      as in one process: only where it is computed moves.

    `replica_group` (default: `group`): the ranks that hold the same tokens, when that is a subgroup (the
    tensor-parallel group of attention-TP x data-parallel serving: each TP group its own sequences). The
    slices are then cut over the replica group, the all-to-all still spans `group` (the experts' owners)
    and the all-gather runs in the replica group; the static path needs every rank to hold every token, so
    it is only for replica_group = group.

    Forward only (no autograd through the all-gather or the all-reduce)."""

    def __init__(self, group, n_experts: int, static_max_tokens: int = 0, replica_group=None):
        super().__init__(group, n_experts)
        self.static_max_tokens = static_max_tokens
        self.replica_group = replica_group if replica_group is not None else group
        self.n_rep, self.rep_rank = dist.get_world_size(self.replica_group), dist.get_rank(self.replica_group)
        if static_max_tokens and self.n_rep != self.R:
            raise ValueError("the static decode path needs every rank to hold every token (replica_group = group)")

    def __call__(self, experts: Experts, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                 impl: str = "auto") -> torch.Tensor:
        N, D = x_ND.shape
        if N <= self.static_max_tokens:
            return self.static(experts, x_ND, idx_NK, w_NK, impl)
        S = -(-N // self.n_rep)  # rows per replica (ceil); a rank past the end sends none
        lo, hi = min(self.rep_rank * S, N), min((self.rep_rank + 1) * S, N)
        y = super().__call__(experts, x_ND[lo:hi], idx_NK[lo:hi], w_NK[lo:hi], impl)  # (hi - lo, D)
        buf = x_ND.new_zeros(S, D)
        buf[: hi - lo] = y
        parts = [torch.empty_like(buf) for _ in range(self.n_rep)]
        dist.all_gather(parts, buf, group=self.replica_group)
        return torch.cat(parts)[:N]  # (N, D): slice r's rows are replica r's

    def static(self, experts: Experts, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
        """The decode path: (N, D) partial sums of my experts (global ids [first, first + L) -> local
        0..L-1; the others fall outside and add 0), all-reduced over the group."""
        y_ND = experts.forward_partial(x_ND, idx_NK - self.first_expert, w_NK, impl)  # (N, D) fp32
        dist.all_reduce(y_ND, group=self.group)
        return y_ND.to(x_ND.dtype)


def local_experts(n_experts: int, ep_rank: int, ep: int) -> range:
    """The global indices of the experts rank `ep_rank` of `ep` holds: the contiguous block
    [ep_rank·E/ep, (ep_rank+1)·E/ep), the layout `AllToAllDispatcher` routes by (training's
    `shard_experts` and the inference loader's `load_pretrained(experts=...)` both use it)."""
    if ep < 1 or n_experts % ep:
        raise ValueError(f"{n_experts} experts cannot be split over {ep} expert-parallel ranks")
    L = n_experts // ep
    return range(ep_rank * L, (ep_rank + 1) * L)


@torch.no_grad()
def shard_experts(experts: Experts, ep_rank: int, ep: int) -> None:
    """Keep only experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of the stacked (E, ·, ·) parameters."""
    r = local_experts(experts.gate_proj.shape[0], ep_rank, ep)
    experts.keep_experts(r.start, len(r))


def global_expert_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Per-expert loads summed over the ranks of `group` (all ranks that read different tokens), for
    the aux-loss-free bias update, which must see the whole global batch (SPEC §4.3)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return counts
    c = counts.clone()
    dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
    return c
