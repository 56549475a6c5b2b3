"""ZeRO-1 inside pipeline stages: the optimizer state of a stage's replicas sharded over them.

Under PP × DP × EP (dsv3/distributed/pipeline.py) each stage is held by R = dp × ep ranks, and every one of
them needs the stage's whole weights (the schedule runs whole forwards and backwards). What they need not
hold whole is the optimizer's part: with ZeRO-1 (the paper's §3.4 layout, Megatron's distributed optimizer;
`PipelineConfig(zero=True)` with `make_pipeline_optimizer`, `dsv3 train --pp P` by default, `--no-fsdp` turns it
off) each rank keeps the fp32 master and the two AdamW moments of 1/R of every replicated parameter only, and the
routed experts' slices (already split over "ep") likewise over their dp replicas. With fp32 weights (dsv3's
default) a chunk of dim 0 is a piece of the weight itself and serves as its master, so a rank holds
2 × moment bytes / R per parameter instead of 2 × moment bytes; with bf16 weights (--bf16-weights) the masters
are fp32 copies: (4 + 2 × moment bytes) / R instead of 4 + 2 × moment bytes, the saving `dsv3 plan`'s ZeRO-1 row
counts. (The expert chunks along dim 1 are fp32 copies either way.)

One step (`ZeroGroup`, one per process group whose ranks hold equal copies):

    reduce_grads   after the schedule: the gradients laid out rank-major in one flat fp32 buffer (rank r's
                   region: its chunk of every parameter, in order, padded to the longest region; a group holds
                   at most pipeline.ZERO_BUCKET entries, so the buffer is bounded), one
                   reduce_scatter_tensor over the group -> this rank's summed chunk of every gradient,
                   divided by the replica count; the whole gradients are freed (set to None)
    AdamW step     over the masters (ZeroAdamW: dsv3's AdamW over the chunks, clip and skip flag included)
    gather_params  one all_gather_into_tensor of the masters' regions, copied back into the whole parameters

reduce-scatter + all-gather move what the all-reduce of the replicated layout moves (the planner's
communication row for ZeRO-1). With bf16 working weights the parameters are bf16 and the masters fp32:
the gradients are summed in fp32 and the all-gather carries the bf16 copies.

Chunks are DTensor's Shard chunks (torch.chunk sizes: ceil(n / k) rows each, the last ones shorter or empty),
nested in mesh order: a replicated parameter is split along dim 0 by "dp", then each part by "ep"
(placements [Shard(0), Shard(0)] on the stage's ("dp", "ep") mesh); an expert slice (E/ep, a, b) along dim 1
by "dp" ([Shard(1), Shard(0)] on the same mesh: "ep" already split dim 0). So a master and its moments are
DTensors of the parameter's global shape (`dtensor`), which is how checkpoints store them
(dsv3/checkpoints/dcp.py): any layout, and one process, reads them back. Each ZeroGroup checks its chunks
against DTensor's own placement arithmetic when it is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dsv3.training.optim import AdamW


def chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """(offset, length) of chunk i when n rows are split into `parts` DTensor Shard chunks (torch.chunk's
    sizes: ceil(n / parts) each; chunks past the end are empty, at offset n)."""
    size = -(-n // parts)
    start = size * i
    if start >= n:
        return n, 0
    return start, min(n, start + size) - start


def nested_chunk(n: int, sizes: tuple[int, ...], coord: tuple[int, ...]) -> tuple[int, int]:
    """(offset, length) of the rows held at mesh coordinate `coord` when n rows are split by each mesh dim
    in turn (placements Shard(d) on every dim of a mesh of shape `sizes`, DTensor's order)."""
    off, length = 0, n
    for k, c in zip(sizes, coord):
        o, length = chunk(length, k, c)
        off += o
    return off, length


@dataclass
class _Entry:
    param: nn.Parameter  # the whole parameter (this rank's expert slice for experts)
    dim: int  # the dimension split over the group
    bounds: list[tuple[int, int]]  # per group rank: (offset, length) along `dim`
    region_off: list[int]  # per group rank: where its chunk starts in that rank's region
    master: nn.Parameter | None = None  # this rank's chunk, fp32: a view of the parameter (fp32, dim 0) or of .flat

    @property
    def inner(self) -> int:
        return math.prod(self.param.shape) // max(self.param.shape[self.dim], 1)

    def chunk_shape(self, i: int) -> tuple[int, ...]:
        s = list(self.param.shape)
        s[self.dim] = self.bounds[i][1]
        return tuple(s)


@dataclass
class ZeroGroup:
    """Parameters whose copies on the ranks of `group` are equal, their optimizer state split over those
    ranks (module docstring). sizes / coords: the group as a mesh (e.g. (dp, ep)); group rank i has mesh
    coordinate coords[i] (row-major: the process groups are built that way). mesh / placements / global_shape
    describe a master as a DTensor (checkpoints)."""
    params: list
    group: object
    sizes: tuple[int, ...]
    dim: int
    mesh: object = None
    placements: tuple = ()
    global_shape: object = None  # callable: parameter -> its global shape
    copy_masters: bool = False  # fp32 copies as masters even where a chunk could serve (weights about to be bf16)
    entries: list = field(default_factory=list)

    def __post_init__(self):
        R = math.prod(self.sizes)
        self.R = R
        if len({p.dtype for p in self.params}) > 1:
            dtypes = sorted({str(p.dtype) for p in self.params})
            raise ValueError(f"a ZeroGroup gathers its parameters in one dtype, got {dtypes}")
        self.rank = dist.get_rank(self.group) if R > 1 else 0
        if any(p.dim() == 0 for p in self.params):
            raise ValueError("a ZeroGroup splits its parameters along a dimension: no 0-dim parameters")
        # an fp32 parameter split along dim 0: its chunk is a contiguous piece of it, which serves as the master
        # itself (no copy: ZeRO-1 then costs the moments only); else (bf16 weights, dim-1 chunks) an fp32 copy
        self.aliased = self.params[0].dtype == torch.float32 and self.dim == 0 and not self.copy_masters
        coords = [tuple(divmod_all(i, self.sizes)) for i in range(R)]
        region = [0] * R
        for p in self.params:
            bounds = [nested_chunk(p.shape[self.dim], self.sizes, c) for c in coords]
            e = _Entry(p, self.dim, bounds, list(region))
            for i in range(R):
                region[i] += bounds[i][1] * e.inner
            self.entries.append(e)
        self.S = max(max(region) if region else 0, 1)  # the padded region length
        dev = self.params[0].device
        self.flat = None if self.aliased else torch.zeros(self.S, dtype=torch.float32, device=dev)
        with torch.no_grad():
            for e in self.entries:
                off, n = e.bounds[self.rank]
                chunk = e.param.detach().narrow(self.dim, off, n)
                if self.aliased:
                    view = chunk  # dim 0 of a contiguous tensor: contiguous
                else:
                    o = e.region_off[self.rank]
                    view = self.flat[o:o + n * e.inner].view(e.chunk_shape(self.rank))
                    view.copy_(chunk)
                e.master = nn.Parameter(view)  # shares the storage (of the parameter, or of the flat buffer)
        self._check_against_dtensor()

    def _check_against_dtensor(self) -> None:
        """Our chunk of every parameter is DTensor's chunk for the same placements (else a checkpoint would
        store rows at the wrong global offsets)."""
        if self.mesh is None:
            return
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for e in self.entries:
            shape, offset = compute_local_shape_and_global_offset(self.global_shape(e.param), self.mesh,
                                                                  self.placements)
            off, n = e.bounds[self.rank]
            if shape[self.dim] != n or (n and offset[self.dim] != off):
                raise RuntimeError(f"ZeRO chunk of a {tuple(e.param.shape)} parameter: rows [{off}, {off + n}) "
                                   f"along dim {self.dim}, DTensor says {shape} at {offset}")

    # --- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_grads(self, divisor: float) -> None:
        """Every parameter's gradient summed over the group and divided by `divisor`; this rank keeps its
        chunk (the masters' .grad, fp32), the whole gradients are freed. Scratch: one fp32 buffer of the
        group's size (callers keep groups to a bucket's size: dsv3/distributed/pipeline.py)."""
        full = torch.zeros(self.R * self.S, dtype=torch.float32, device=self.params[0].device)
        for e in self.entries:
            g = e.param.grad
            if g is not None:
                for i in range(self.R):
                    off, n = e.bounds[i]
                    o = i * self.S + e.region_off[i]
                    full[o:o + n * e.inner].view(e.chunk_shape(i)).copy_(g.narrow(self.dim, off, n))
            e.param.grad = None  # freed before the collective's output is allocated
        mine = full.new_empty(self.S)
        if self.R > 1:
            _reduce_scatter(mine, full, group=self.group)
        else:
            mine.copy_(full)
        del full
        mine.div_(divisor)
        for e in self.entries:
            o, n = e.region_off[self.rank], e.bounds[self.rank][1] * e.inner
            e.master.grad = mine[o:o + n].view(e.master.shape)

    @torch.no_grad()
    def gather_params(self) -> None:
        """The whole parameters rebuilt from every rank's masters (in the parameters' dtype)."""
        if not self.entries:
            return
        local = torch.empty(self.S, dtype=self.params[0].dtype, device=self.params[0].device)  # bf16 weights: bf16
        for e in self.entries:
            o, n = e.region_off[self.rank], e.bounds[self.rank][1] * e.inner
            local[o:o + n].view(e.master.shape).copy_(e.master)
        full = local.new_empty(self.R * self.S)
        if self.R > 1:
            _all_gather(full, local, group=self.group)
        else:
            full.copy_(local)
        for e in self.entries:
            for i in range(self.R):
                off, n = e.bounds[i]
                if n and not (self.aliased and i == self.rank):  # an aliased master is its own chunk already
                    o = i * self.S + e.region_off[i]
                    e.param.data.narrow(self.dim, off, n).copy_(full[o:o + n * e.inner].view(e.chunk_shape(i)))

    def sq_norm(self, exclude=None) -> torch.Tensor:
        """Σ of the squared master gradients on this rank (every element of the group's gradients is on
        exactly one rank), leaving out `exclude` (a parameter, e.g. the 1F1B embedding copy)."""
        sq = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for e in self.entries:
            if e.param is not exclude and e.master.grad is not None and e.master.numel():
                sq += e.master.grad.float().pow(2).sum()
        return sq

    def dtensor(self, t: torch.Tensor, p) -> torch.Tensor:
        """`t` (a master or one of its moments, this rank's chunk) as a DTensor of `p`'s global shape."""
        from torch.distributed.tensor import DTensor

        shape = torch.Size(self.global_shape(p))
        return DTensor.from_local(t, self.mesh, self.placements, run_check=False, shape=shape,
                                  stride=_contiguous_strides(shape))


# torch 2.13 renames the flat-tensor collectives (the old names warn there); 2.11 has only the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def divmod_all(i: int, sizes: tuple[int, ...]) -> list[int]:
    """Row-major coordinate of flat index i in a mesh of shape `sizes`."""
    out = []
    for k in reversed(sizes):
        i, r = divmod(i, k)
        out.append(r)
    return out[::-1]


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


class ZeroAdamW(AdamW):
    """dsv3's AdamW over the masters of ZeRO groups (and over any other parameters as they are); after each
    step the groups' whole parameters are gathered back from the masters."""

    def __init__(self, params, zero_groups: list[ZeroGroup], **kw):
        super().__init__(params, **kw)
        self.zero_groups = list(zero_groups)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None):
        loss = super().step(closure, grad_scale=grad_scale, skip=skip)
        for z in self.zero_groups:
            z.gather_params()
        return loss


def make_zero_optimizer(module: nn.Module, zero_groups: list[ZeroGroup], lr: float, weight_decay: float = 0.1,
                        betas=(0.9, 0.95), eps: float = 1e-8, state_dtype: torch.dtype = torch.float32,
                        masters=None, fp32_grads: bool = False) -> ZeroAdamW:
    """The optimizer of a ZeRO-1 pipeline rank: `optim.param_groups(module)` (decay by the parameter's
    rank) with every ZeRO parameter replaced by its master. `masters`: other parameters kept as bf16 working
    weights with fp32 masters by AdamW itself (those outside any ZeRO group)."""
    from dsv3.training.optim import param_groups

    swap = {id(e.param): e.master for z in zero_groups for e in z.entries}
    groups = [{"params": [swap.get(id(p), p) for p in g["params"]], "weight_decay": g["weight_decay"]}
              for g in param_groups(module, weight_decay)]
    groups = [g for g in groups if g["params"]]
    return ZeroAdamW(groups, zero_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     state_dtype=state_dtype, masters=masters, fp32_grads=fp32_grads)


__all__ = ["ZeroAdamW", "ZeroGroup", "chunk", "make_zero_optimizer", "nested_chunk"]
