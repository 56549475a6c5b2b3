"""Pipeline parallelism through `torch.distributed.pipelining`: the layer stack cut into stages,
run by Schedule1F1B or ScheduleDualPipeV (DeepSeek-V3 paper §3.2.1; DualPipeV is the "cut in half"
V-shaped DualPipe of github.com/deepseek-ai/DualPipe, in torch >= 2.9).

Layout (world = pp × dp × ep ranks, mesh ("pp", "dp", "ep") from `pipeline_mesh`, global rank =
(pp_index · dp + dp_index) · ep + ep_index; every rank reads the same global batch):

    1F1B       S = pp stages, stage s on pp index s
    DualPipeV  S = 2·pp stages in a V: pp index r holds stages r and 2·pp-1-r, so index 0 holds both
               the embedding stage and the head + MTP stage (the paper's reason for the V: the MTP
               modules share the embedding and the output head with the main model)
    stage s    embedding (s = 0), a contiguous run of main layers, final norm + lm_head + MTP modules
               (s = S-1). Layers: `layers_per_stage`, or an even split with the remainder going to
               the earliest stages (the last stage also carries the head and the MTP block).

A stage runs the model's own forward. `StageModule` wraps the stage's part of the model
(`Transformer.part`: the same module objects, the modules the stage does not hold set to None, see
dsv3/model/transformer.py), so parameter names are the model's, and FP8 module swaps
(`convert_to_fp8_training`) and per-block `torch.compile` applied to the model before the split are
the stage's too. The wrapper adds only what the pipeline needs around that forward: the stage's
balance term gets its gradient (`AuxLossScaler`), its expert counts go into its rows of the model's
(L_moe, E) table, and the outputs become tensors (h, or the logits and the MTP logits).

What crosses a stage boundary is the hidden state h (B, T, D) only. The token ids reach the stages
that need them from `step`: the first stage as its positional input, the last stage (MTP needs the
embeddings of the tokens ahead) as the keyword `ids`, which torch passes to every stage of the rank.

Precision: `forward_backward(..., autocast=f)` runs the schedule with every stage forward and the
loss function under `f()`, e.g. `lambda: torch.autocast(device.type, dtype=torch.bfloat16)` (on the
CPU as well as CUDA), and the backward outside it, as the single-process loop does (torch's advice;
on the CPU a backward under autocast also re-dispatches the backward kernels of composite ops such as
the attention to bf16: 0.9% other gradients on the test model). Under autocast the residual stream
stays in the parameters' dtype (the embedding is no autocast op, and each block adds its bf16 branch
outputs to it), so h crosses the boundaries in the parameters' dtype either way; only the logits come
out in the autocast dtype. The stages declare static shapes and dtypes (no run-time shape inference, which
would run the MoE on dummy data), so the schedule is built for the logits dtype of the autocast it
runs under, on first use (one per dtype: `PipelineState.schedules`). `build_pipeline` therefore
takes no dtype: the boundary dtype is the model's, the logits dtype is the autocast's.

Exactness against the single-process model on the same global batch (tests/distributed/test_pipeline.py):
* loss: the last stage's loss function is the project's `compute_loss` (CE + λ/D·MTP) divided by the
  number of micro-batches; `scale_grads=False` (torch would otherwise divide a parameter shared by
  two stages of one rank, the embedding under DualPipeV, twice). Equal micro-batches make the mean of
  the per-micro-batch means the global mean.
* sequence-wise balance loss α·Σ_l L_Bal: each MoE layer's term is born inside its stage, far from
  the loss. `AuxLossScaler` (Megatron's MoEAuxLossAutoScaler) returns the stage's output unchanged
  and, in the backward, hands the stage's summed term the gradient each term has in the total loss,
  α / n_microbatches; its value is summed per stage and all-reduced for the reported loss.
* expert loads for the aux-loss-free bias update: counted per stage over all micro-batches into
  the rows of the model's (L_moe, E) table, all-reduced (SUM) over all ranks (`finish_step`), and
  each rank updates its own routers: the same update as one process.
* embedding shared with MTP: under DualPipeV both uses sit on pp index 0 and are one Parameter.
  Under 1F1B the last pp index keeps a copy (same initial values) and the two ends all-reduce the
  embedding gradient after the backward (Megatron's tied-embedding approach): both copies receive
  the full gradient and AdamW keeps them equal. The gradient norm counts the embedding once.

PP × DP × EP (`PipelineConfig(dp=..., ep=...)`): each stage is held by the dp × ep ranks of its pp
index. The ep ranks of one dp index split its routed experts (shard_experts + AllToAllDispatcher on
the stage's ep group), everything else is replicated over all dp × ep. Each of the dp × ep ranks
reads its own slice of every micro-batch's rows (`local_rows`: slice dp_index · ep + ep_index), and
the pipeline's P2P goes between ranks of equal (dp, ep) index. After the schedule (`forward_backward`),
each rank's loss being the mean over its rows: the replicated gradients are all-reduced over the
stage's dp × ep ranks and divided by dp·ep; an expert slice already holds the sum over its ep group's
losses (the backward all-to-all), so it is all-reduced over the dp replicas and divided by dp·ep.
Expert counts, loss and the gradient norm are reduced over all ranks (replicated tensors counted
once, expert slices once per dp replica set). The 1F1B tied embedding has one group {pp 0, pp last}
per (dp, ep) index. ZeRO-1 (`PipelineConfig(zero=True)`, dsv3/distributed/zero.py): those all-reduces
become reduce-scatters into each rank's chunks of the fp32 masters, AdamW updates the chunks and an
all-gather rebuilds the whole weights; the AdamW state per rank is 1/(dp·ep) of the replicated
parameters' and 1/dp of the expert slices'.

Overlap hook (DualPipeV): torch's runtime runs an OVERLAP_F_B action (forward of one micro-batch
on one stage, backward of another on the rank's other stage) through a function registered with
`register_custom_function` (torch 2.11 and 2.13). `overlap_f_b` below is that function (opt-in,
`build_pipeline(..., overlap=True)`): the same work as torch's default, with the backward on a second
thread. Under PP × EP the two threads pass a baton (expert_parallel.OverlapCoordinator) at every
all-to-all of the stages' dispatchers, each of which is issued async: counts and dispatch/combine
rows in the forward, the combine and dispatch gradients in the backward. What overlaps with what, on
one GPU (one compute stream; NCCL runs the all-to-all on its own stream): side X issues its
all-to-all and passes the baton; side Y queues its compute up to its own next all-to-all (e.g. the
forward's attention + router, or the backward's expert or attention gradients), issues it and passes
back; only then does X wait for its all-to-all (the compute stream waits for NCCL's) and go on. So
every all-to-all of one micro-batch runs beside the compute the other micro-batch queued between two
of its all-to-alls (DualPipe's pairing, the paper's Figure 4), and the collectives of both threads are
issued in one fixed order on every rank of the ep group. Not hidden: the split sizes' `.tolist()`
after the counts exchange (a host sync per MoE layer, which also waits for the compute queued before
it). bench/pipeline_overlap.py measures the exposed all-to-all time with and without the overlap.
Without dispatchers (PP alone) nobody passes the baton and the backward runs after the forward.
The autocast is entered by each stage forward itself, so it holds on either thread; the backward
runs without it (recomputation restores the forward's autocast state itself).

API (what a training loop calls, in order, each step):
    state = build_pipeline(model, pcfg, micro_batch_size, seq_len)     once
    forward_backward(state, batch, mtp_lambda=, balance_alpha=, autocast=)  grads of the global mean loss
    grad_norm(state)                  global L2 norm (0-dim fp32 tensor, no host sync), each parameter once
    ... clip + optimizer step (make_pipeline_optimizer: dsv3's AdamW, under ZeRO-1 over the masters) ...
    finish_step(state, gamma)         all-reduced expert counts, aux-loss-free bias update
    gathered_loss(state)              {loss, main, mtp, balance}, the same on every rank
`train_step` is that composition; `forward_only` runs validation forwards.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from itertools import product

import torch
import torch.distributed as dist
from torch import nn

from dsv3.distributed.expert_parallel import AllToAllDispatcher, OverlapCoordinator, shard_experts
from dsv3.distributed.mesh import ParallelConfigError
from dsv3.model.moe import MoE, update_expert_bias
from dsv3.model.transformer import ModelOutput
from dsv3.training.loss import compute_loss
from dsv3.training.optim import AdamW

SCHEDULES = ("1f1b", "dualpipev")


# --------------------------------------------------------------------------------------------------
# layout

@dataclass
class PipelineConfig:
    pp: int = 2  # pipeline ranks
    schedule: str = "1f1b"  # "1f1b" | "dualpipev"
    n_microbatches: int = 4
    layers_per_stage: tuple[int, ...] | None = None  # main layers of each stage; None: even split
    ep: int = 1  # expert-parallel ranks per stage replica
    dp: int = 1  # data-parallel replicas of every stage (world = pp × dp × ep, mesh ("pp", "dp", "ep"))
    # ZeRO-1 over a stage's dp × ep replicas: each keeps the fp32 masters and AdamW moments of 1/(dp·ep) of
    # the replicated parameters (and of 1/dp of its expert slices); it takes effect when the optimizer is built
    # with `make_pipeline_optimizer` (dsv3/distributed/zero.py; another optimizer: the whole state, all-reduced
    # gradients). No effect where dp × ep = 1.
    zero: bool = False

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def replicas(self) -> int:
        """Ranks holding each stage (dp × ep), each reading its own rows of every micro-batch."""
        return self.dp * self.ep

    @property
    def n_stages(self) -> int:
        return self.pp if self.schedule == "1f1b" else 2 * self.pp

    def stage_ranks(self) -> list[int]:
        """pp index of each stage: s for 1F1B; the V (s, then 2·pp-1-s) for DualPipeV."""
        if self.schedule == "1f1b":
            return list(range(self.pp))
        return list(range(self.pp)) + list(reversed(range(self.pp)))

    def split(self, n_layers: int) -> list[range]:
        """The main layers of each stage (contiguous ranges)."""
        S = self.n_stages
        if self.layers_per_stage is not None:
            sizes = list(self.layers_per_stage)
        else:
            q, r = divmod(n_layers, S)
            sizes = [q + (1 if s < r else 0) for s in range(S)]
        out, lo = [], 0
        for n in sizes:
            out.append(range(lo, lo + n))
            lo += n
        return out

    def _product(self, first: str, first_value: int) -> tuple[str, str]:
        """("first x dp x ep", "(v x dp x ep)") with the degrees > 1 only."""
        names, values = [first], [first_value]
        for name in ("dp", "ep"):
            if getattr(self, name) > 1:
                names.append(name)
                values.append(getattr(self, name))
        return " x ".join(names), " x ".join(map(str, values))

    def validate(self, world_size: int | None = None, model_cfg=None, batch_size: int | None = None
                 ) -> "PipelineConfig":
        if self.schedule not in SCHEDULES:
            raise ParallelConfigError(f"pipeline schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.pp, int) or self.pp < 2:
            raise ParallelConfigError(f"pp must be an integer >= 2 for a pipeline, got {self.pp!r}")
        for name in ("dp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.zero, bool):
            raise ParallelConfigError(f"zero must be True or False, got {self.zero!r}")
        if world_size is not None and world_size != self.world_size:
            if self.replicas == 1:
                raise ParallelConfigError(f"pipeline parallelism alone: pp ({self.pp}) must equal the world size "
                                          f"({world_size})")
            names, values = self._product("pp", self.pp)
            degrees = " x ".join(f"{n} ({v})" for n, v in zip(names.split(" x "), values.split(" x ")))
            raise ParallelConfigError(f"{degrees} = {self.world_size} ranks, but the world size is {world_size}")
        S = self.n_stages
        if self.n_microbatches < S:
            what = "pp" if self.schedule == "1f1b" else "2·pp"
            raise ParallelConfigError(f"{self.schedule} needs n_microbatches >= its {S} stages ({what}), got "
                                      f"n_microbatches = {self.n_microbatches}")
        if self.schedule == "dualpipev":
            import torch.distributed.pipelining as pipelining

            if not hasattr(pipelining, "ScheduleDualPipeV"):
                raise ParallelConfigError(f"dualpipev needs torch >= 2.9 (ScheduleDualPipeV); this is "
                                          f"torch {torch.__version__}")
        if batch_size is not None and batch_size % (self.n_microbatches * self.replicas):
            if self.replicas == 1:
                raise ParallelConfigError(f"the global batch ({batch_size} sequences) is not a multiple of "
                                          f"n_microbatches ({self.n_microbatches})")
            names, values = self._product("n_microbatches", self.n_microbatches)
            raise ParallelConfigError(f"the global batch ({batch_size} sequences) is not a multiple of {names} "
                                      f"({values}): every dp x ep rank reads an equal slice of every micro-batch")
        if model_cfg is not None:
            E = model_cfg.n_routed_experts
            if self.ep > 1 and E == 0:
                raise ParallelConfigError(f"ep = {self.ep} but the model has no routed experts")
            if E and E % self.ep:
                raise ParallelConfigError(f"ep ({self.ep}) does not divide n_routed_experts ({E})")
            L = model_cfg.num_hidden_layers
            if self.layers_per_stage is not None:
                if len(self.layers_per_stage) != S:
                    raise ParallelConfigError(f"layers_per_stage has {len(self.layers_per_stage)} entries for "
                                              f"{S} stages ({self.schedule}, pp = {self.pp})")
                if sum(self.layers_per_stage) != L:
                    raise ParallelConfigError(f"layers_per_stage sums to {sum(self.layers_per_stage)}, but the "
                                              f"model has num_hidden_layers = {L}")
                if min(self.layers_per_stage) < 1:
                    raise ParallelConfigError(f"every stage needs >= 1 layer, got layers_per_stage = "
                                              f"{tuple(self.layers_per_stage)}")
            elif L < S:
                raise ParallelConfigError(f"num_hidden_layers ({L}) < {S} pipeline stages ({self.schedule}, "
                                          f"pp = {self.pp}): every stage needs >= 1 layer")
        return self


# --------------------------------------------------------------------------------------------------
# the balance loss's gradient, injected where the term is born

class AuxLossScaler(torch.autograd.Function):
    """h = AuxLossScaler.apply(h, aux, scale): forward returns h; backward gives aux the gradient
    `scale` (= d total loss / d aux), so the term's gradient flows without it reaching the loss."""

    @staticmethod
    def forward(ctx, h, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        (aux,) = ctx.saved_tensors
        return grad_h, torch.full_like(aux, ctx.scale), None


# --------------------------------------------------------------------------------------------------
# stages: a part of the model and the pipeline's bookkeeping around its forward

class StageModule(nn.Module):
    """Pipeline stage `stage_index`: `model` is the stage's part of the Transformer
    (`Transformer.part`), whose own forward runs; around it the stage's balance term gets its
    gradient (AuxLossScaler) and its expert counts go into their rows of the (L_moe, E) table.
    Parameter names are `model.` + the model's names; `PipelineState.model_part` holds the parts
    themselves (the model's names after the list index)."""

    def __init__(self, model, stage_index: int, n_stages: int, rows: list[int]):
        super().__init__()
        self.model = model
        self.config = model.config
        self.stage_index, self.n_stages = stage_index, n_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        self.rows = rows  # row in the (L_moe, E) table of each MoE block of the part, in Transformer.blocks order
        self.with_balance = False
        self.aux_alpha = 0.0  # α
        self.aux_grad = 0.0  # d total / d (one layer's balance term) = α / n_microbatches
        self.counts: torch.Tensor | None = None  # (L_moe, E) this step, this stage's rows only
        self.aux_sum = torch.zeros(())  # Σ over micro-batches and layers of α·L_Bal (detached)
        self.autocast = contextlib.nullcontext  # the forward's precision context (set by forward_backward)

    def reset_stats(self, n_moe: int, n_experts: int, device) -> None:
        self.counts = torch.zeros(n_moe, n_experts, dtype=torch.long, device=device)
        self.aux_sum = torch.zeros((), dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None):
        """x: token ids (b, T) on the first stage, the hidden state (b, T, D) elsewhere; ids (b, T):
        the token ids (the last stage's MTP modules embed them). -> h (b, T, D), or on the last stage
        (logits (b, T, V), MTP logits (b, T-k, V) for k = 1..D)."""
        with self.autocast():  # the forward only: the backward runs outside autocast
            out = self.model(x, tokens=ids, with_balance=self.with_balance)
        if out.expert_counts is not None and self.counts is not None:
            self.counts[self.rows] += out.expert_counts
        y = out.hidden if out.logits is None else out.logits
        if out.balance is not None:
            self.aux_sum = self.aux_sum + out.balance.detach().float() * self.aux_alpha
            y = AuxLossScaler.apply(y, out.balance, self.aux_grad)  # each layer's term gets α / n
        if out.logits is None:
            # torch detaches a stage's outputs in place, which a view (AuxLossScaler's) refuses
            return y.clone() if y._is_view() else y
        return (y, *out.mtp_logits)  # (torch leaves the last stage's views attached)


def split_model(model, pcfg: PipelineConfig, rank: int) -> list[StageModule]:
    """The stage modules of pp index `rank` (1 for 1F1B, 2 for DualPipeV, ascending stage index),
    each around `model.part(...)`. The model must be the same (same seed) on every rank; the parts
    of it a rank does not hold are dropped by the caller letting go of `model`."""
    pcfg.validate(model_cfg=model.config)
    ranges = pcfg.split(model.config.num_hidden_layers)
    rows = {id(b): r for r, b in enumerate(b for b in model.blocks() if isinstance(b.mlp, MoE))}
    S, has_mtp = pcfg.n_stages, len(model.mtp) > 0
    stages = []
    for s, r in enumerate(pcfg.stage_ranks()):
        if r != rank:
            continue
        last = s == S - 1
        part = model.part(ranges[s], embed=s == 0 or (last and has_mtp), head=last, mtp=last and has_mtp)
        stages.append(StageModule(part, s, S, [rows[id(b)] for b in part.blocks() if isinstance(b.mlp, MoE)]))
    return stages


# --------------------------------------------------------------------------------------------------
# schedule, state

@dataclass
class PipelineState:
    pcfg: PipelineConfig
    rank: int  # pipeline index (along "pp")
    group: object  # the pipeline process group: the pp ranks with my (dp, ep) index (P2P)
    stages: list[StageModule]
    model_part: nn.ModuleList  # this rank's parts of the model (the stages' `model`): shared parameters once
    device: torch.device
    boundary_dtype: torch.dtype  # the parameters' dtype: h between the stages, under autocast as well
    micro_batch_size: int  # rows of a micro-batch on one rank
    seq_len: int
    n_moe: int
    n_experts: int
    routers: list = field(default_factory=list)  # (row, Router) of this rank
    schedule: object | None = None  # the schedule of the last forward_backward
    schedules: dict = field(default_factory=dict)  # logits dtype -> schedule, built on first use
    overlap: bool = False  # DualPipeV: the threaded OVERLAP_F_B callback
    tied_group: object | None = None  # 1F1B: {pp 0, pp last} (same dp, ep index) for the embedding gradient
    tied_copy: nn.Parameter | None = None  # the last pp index's copy of the embedding (not counted in the norm)
    loss_parts: list = field(default_factory=list)  # (total, main, mtp) per micro-batch, last stage
    hp: dict = field(default_factory=dict)
    autocast: object = contextlib.nullcontext  # the forwards' (and the loss's) precision context
    # PP × DP × EP (dp = ep = 1: no groups, all_group = group)
    dp_rank: int = 0
    ep_rank: int = 0
    ep_group: object | None = None  # the ranks of my stage(s) and dp index, which split the routed experts
    dp_group: object | None = None  # the ranks of my stage(s) and ep index: the same expert slices
    stage_group: object | None = None  # all dp × ep ranks of my stage(s): the replicated parameters
    all_group: object = None  # every rank of the layout (loss, counts, gradient norm)
    expert_params: list = field(default_factory=list)  # local expert slices (summed by the all-to-all)
    replicated_params: list = field(default_factory=list)  # the rest, averaged over stage_group
    coordinator: OverlapCoordinator | None = None  # overlap=True
    dispatchers: list = field(default_factory=list)  # this rank's AllToAllDispatchers (timers go here)
    expert_mesh: object | None = None  # ep > 1: the ("dp", "ep") sub-mesh of my stage(s) (checkpoints)
    zero: list = field(default_factory=list)  # PipelineConfig.zero: the ZeroGroups (replicated, experts)
    stage_mesh: object | None = None  # dp × ep > 1: the sub-mesh of my stage(s)' replicas (the dims > 1)


def _meta(shape, dtype):
    # requires_grad marks the tensors that carry a gradient back (torch >= 2.12 derives the
    # backward buffers from it; 2.11 ignores it)
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)


def _no_self_p2p(stage) -> None:
    """torch 2.11 warms up the P2P links of a multi-stage schedule by sending a scalar to each
    neighbouring stage, including the one on the same rank in a V (DualPipeV's middle), which gloo
    cannot do (NCCL can; 2.12+ no longer sends it). Drop the sends/receives to oneself: the schedule
    itself passes tensors between local stages by reference."""
    init_ops = stage._get_init_p2p_neighbors_ops
    stage._get_init_p2p_neighbors_ops = lambda: [op for op in init_ops()
                                                 if getattr(op, "group_peer", None) != stage.group_rank]


def pipeline_mesh(pcfg: PipelineConfig, device_type: str = "cpu"):
    """The 3-D DeviceMesh ("pp", "dp", "ep") over the initialised world: global rank = (pp_index · dp
    + dp_index) · ep + ep_index (the ep ranks of a stage replica are consecutive, i.e. on one node)."""
    from torch.distributed.device_mesh import init_device_mesh

    pcfg.validate(dist.get_world_size())
    return init_device_mesh(device_type, (pcfg.pp, pcfg.dp, pcfg.ep), mesh_dim_names=("pp", "dp", "ep"))


def build_pipeline(model, pcfg: PipelineConfig, micro_batch_size: int, seq_len: int, *, group=None,
                   device=None, mtp_lambda: float = 0.3, overlap: bool = False,
                   init_seed: int | None = None) -> PipelineState:
    """Split `model` (identical on every rank; FP8 swaps and per-block compilation already applied,
    if any) into this rank's stages and set up the groups. A model on the meta device
    (`build_model(cfg, device="meta")`) is allocated here for this rank's stages and expert slices only and
    initialised with `init_seed` (Transformer.init_weights(seed=...): the values of the whole model built
    with that seed), so no rank ever holds the whole model. micro_batch_size × seq_len is the shape of
    every micro-batch on one rank (static shapes); with dp × ep > 1 a micro-batch of the global batch
    has dp × ep × micro_batch_size rows. `group`: the pipeline group for PP alone (default: the world);
    with dp × ep > 1 the groups come from `pipeline_mesh` over the world. The schedule itself is built
    by the first `forward_backward`, for the logits dtype of its autocast (module docstring)."""
    meta = next(model.parameters()).device.type == "meta"
    if meta and (device is None or init_seed is None):
        raise ValueError("build_pipeline: a model on the meta device needs device= (where to allocate this rank's "
                         "stages) and init_seed= (their initialisation)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config
    R = pcfg.replicas
    ep_group = dp_group = stage_group = expert_mesh = None
    dp_rank = ep_rank = 0
    if R > 1:
        if group is not None:
            raise ParallelConfigError("PP x DP/EP builds its groups from the world (pipeline_mesh); pass group=None")
        mesh = pipeline_mesh(pcfg, device.type)
        group = mesh.get_group("pp")
        dp_rank, ep_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("ep")
        if pcfg.ep > 1:
            ep_group, expert_mesh = mesh.get_group("ep"), mesh["dp", "ep"]
        if pcfg.dp > 1:
            dp_group = mesh.get_group("dp")
        stage_mesh = mesh["dp", "ep"] if pcfg.dp > 1 and pcfg.ep > 1 else mesh["ep"] if pcfg.dp == 1 else mesh["dp"]
        if pcfg.dp == 1 or pcfg.ep == 1:
            stage_group = ep_group if pcfg.dp == 1 else dp_group
        else:  # the dp × ep ranks of pp index p are the global ranks [p·R, (p+1)·R); every rank creates all
            groups = [dist.new_group(list(range(p * R, (p + 1) * R))) for p in range(pcfg.pp)]
            stage_group = groups[mesh.get_local_rank("pp")]
        all_group = dist.group.WORLD
    else:
        group = group or dist.group.WORLD
        all_group = group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if micro_batch_size < 1:
        raise ParallelConfigError(f"micro_batch_size must be >= 1 (rows of a micro-batch on one rank), got "
                                  f"{micro_batch_size}")
    pcfg.validate(world * R, cfg, micro_batch_size * pcfg.n_microbatches * R)
    stages = split_model(model, pcfg, rank)

    # EP inside the stages: keep my slice of each MoE's experts, send tokens to the others
    coord = OverlapCoordinator() if overlap else None
    sharded, dispatchers = [], []
    if ep_group is not None:
        for st in stages:
            for m in st.model.modules():
                if isinstance(m, MoE) and m.dispatcher is None:
                    shard_experts(m.experts, ep_rank, pcfg.ep)
                    m.dispatcher = AllToAllDispatcher(ep_group, cfg.n_routed_experts)
                    sharded.append(m.experts)
                    dispatchers.append(m.dispatcher)
    for d in dispatchers:
        d.coordinator = coord
    part = nn.ModuleList(st.model for st in stages)
    if meta:  # allocate and initialise my stages (expert slices included) only
        from dsv3.memory import ensure_fits

        n = sum(p.numel() * p.element_size() for p in part.parameters())
        ensure_fits(n, device, f"for this rank's pipeline stages ({n / 2**30:.2f} GiB of weights)")
        part.to_empty(device=device)
        for st in stages:
            st.model.init_weights(seed=init_seed)
    for st in stages:
        st.to(device)
    # (after the allocation, which may have replaced the Parameter objects)
    expert_params = [p for e in sharded for p in (e.gate_proj, e.up_proj, e.down_proj)]
    ids = {id(p) for p in expert_params}
    state = PipelineState(
        pcfg, rank, group, stages, part, device, next(model.parameters()).dtype, micro_batch_size, seq_len,
        n_moe=sum(isinstance(b.mlp, MoE) for b in model.blocks()), n_experts=cfg.n_routed_experts,
        overlap=overlap, hp={"mtp_lambda": mtp_lambda}, dp_rank=dp_rank, ep_rank=ep_rank, ep_group=ep_group,
        dp_group=dp_group, stage_group=stage_group, all_group=all_group, expert_params=expert_params,
        replicated_params=[p for p in part.parameters() if id(p) not in ids], coordinator=coord,
        dispatchers=dispatchers, expert_mesh=expert_mesh)
    for st in stages:
        moe_blocks = [b for b in st.model.blocks() if isinstance(b.mlp, MoE)]
        state.routers += [(row, b.mlp.gate) for row, b in zip(st.rows, moe_blocks)]
    if pcfg.schedule == "1f1b" and len(model.mtp) > 0:
        # one group {pp 0, pp last} per (dp, ep) index; every rank creates all of them, in order
        for d, e in product(range(pcfg.dp), range(pcfg.ep)):
            if R == 1:
                ends = [dist.get_global_rank(group, 0), dist.get_global_rank(group, world - 1)]
            else:
                ends = [d * pcfg.ep + e, (pcfg.pp - 1) * R + d * pcfg.ep + e]
            g = dist.new_group(ends)
            if (d, e) == (dp_rank, ep_rank):
                state.tied_group = g
        if rank == world - 1:
            state.tied_copy = stages[-1].model.embed_tokens.weight
    if R > 1:
        state.stage_mesh = stage_mesh  # (ZeRO-1's groups are made with the optimizer: make_pipeline_optimizer)
    return state


ZERO_BUCKET = 2**27  # parameter entries per ZeroGroup: its fp32 gradient scratch is at most 512 MiB (+ 1/R)


def _zero_groups(state: PipelineState, bf16_ids=frozenset()) -> list:
    """ZeRO-1's groups (dsv3/distributed/zero.py): the replicated parameters over the stage's dp × ep ranks
    (dim 0 split by "dp", then by "ep"), and, with dp > 1 and ep > 1, the expert slices over their dp
    replicas (dim 1 split by "dp"; "ep" already split dim 0 of the global (E, ...) tensor). The parameters
    in `bf16_ids` (bf16 working weights) get groups of their own (one dtype per all-gather, fp32 copies as
    masters); groups hold up to ZERO_BUCKET entries (one parameter may exceed it). Frozen and 0-dim
    parameters stay outside (whole on every rank, all-reduced)."""
    from torch.distributed.tensor import Shard

    from dsv3.distributed.zero import ZeroGroup

    pcfg = state.pcfg
    sizes = tuple(k for k in (pcfg.dp, pcfg.ep) if k > 1)
    ep = pcfg.ep
    kinds = [(state.replicated_params, state.stage_group, sizes, 0, state.stage_mesh, (Shard(0),) * len(sizes),
              lambda p: tuple(p.shape))]
    if pcfg.dp > 1:
        kinds.append((state.expert_params, state.dp_group, (pcfg.dp,), 1, state.expert_mesh, (Shard(1), Shard(0)),
                      lambda p: (p.shape[0] * ep, *p.shape[1:])))
    groups = []
    for params, *spec in kinds:
        for bf16 in (False, True):
            ps = [p for p in params if (id(p) in bf16_ids) == bf16 and p.requires_grad and p.dim() > 0]
            bucket, n = [], 0
            for p in ps + [None]:
                if bucket and (p is None or n + p.numel() > ZERO_BUCKET):
                    groups.append(ZeroGroup(bucket, *spec, copy_masters=bf16))
                    bucket, n = [], 0
                if p is not None:
                    bucket.append(p)
                    n += p.numel()
    return groups


def make_pipeline_optimizer(state: PipelineState, lr: float, weight_decay: float = 0.1, *,
                            state_dtype: torch.dtype = torch.float32, bf16_weights: bool = False, **kw):
    """The optimizer of this rank's stages: dsv3's AdamW over `state.model_part`
    (dsv3.training.optim.make_optimizer), or under ZeRO-1 over the masters of this rank's chunks
    (dsv3.distributed.zero.make_zero_optimizer), which also gathers the whole parameters after each step.
    bf16_weights: the GEMM weights (optim.bf16_weight_params) stored in bf16, their fp32 masters being the
    ZeRO masters where they are sharded and AdamW's own `masters` elsewhere (a pipeline without replicas,
    --no-fsdp, expert slices without dp replicas). Call it once, before training (it converts the weights)."""
    from dsv3.training.optim import bf16_weight_params, make_optimizer

    if not (state.pcfg.zero and state.pcfg.replicas > 1):
        state.zero = []
        return make_optimizer(state.model_part, lr, weight_decay, state_dtype=state_dtype, bf16_weights=bf16_weights,
                              **kw)
    from dsv3.distributed.zero import make_zero_optimizer

    bf16 = bf16_weight_params(state.model_part) if bf16_weights else []
    ids = {id(p) for p in bf16}
    state.zero = _zero_groups(state, ids)  # the masters: the weights' current values (copies for bf16 ones)
    with torch.no_grad():  # then the bf16 working weights are rounded from them
        for z in state.zero:
            if id(z.params[0]) in ids:
                for p in z.params:
                    p.data = p.data.to(torch.bfloat16)
    zeroed = {id(e.param) for z in state.zero for e in z.entries}
    return make_zero_optimizer(state.model_part, state.zero, lr, weight_decay, state_dtype=state_dtype,
                               masters=[p for p in bf16 if id(p) not in zeroed], **kw)


def _make_schedule(state: PipelineState, logits_dtype: torch.dtype):
    """PipelineStages with static metadata (inputs: ids or h in the parameters' dtype; outputs: h, or
    the logits and MTP logits in `logits_dtype`) and the schedule over them."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    pcfg, S, n = state.pcfg, state.pcfg.n_stages, state.pcfg.n_microbatches
    cfg = state.stages[0].config
    b, T, D, V, dt = state.micro_batch_size, state.seq_len, cfg.hidden_size, cfg.vocab_size, state.boundary_dtype
    pstages = []
    for st in state.stages:
        inp = _meta((b, T), torch.long) if st.is_first else _meta((b, T, D), dt)
        if st.is_last:
            n_mtp = sum(1 for k in range(1, len(st.model.mtp) + 1) if T - k > 0)
            out = (_meta((b, T, V), logits_dtype),) + tuple(_meta((b, T - k, V), logits_dtype)
                                                            for k in range(1, n_mtp + 1))
        else:
            out = _meta((b, T, D), dt)
        ps = PipelineStage(st, st.stage_index, S, state.device, input_args=inp, output_args=out, group=state.group)
        _no_self_p2p(ps)
        pstages.append(ps)

    def loss_fn(output, target):
        logits, *mtp = output if isinstance(output, (tuple, list)) else (output,)
        with state.autocast():
            parts = compute_loss(ModelOutput(logits, list(mtp), None, None, None), target, state.hp["mtp_lambda"],
                                 0.0)
        mtp_ce = torch.stack(parts.mtp_per_depth).mean() if parts.mtp_per_depth else parts.main.new_zeros(())
        state.loss_parts.append(torch.stack([parts.total, parts.main, mtp_ce]).detach().float())
        return parts.total / n

    if pcfg.schedule == "1f1b":
        return Schedule1F1B(pstages[0], n, loss_fn=loss_fn, scale_grads=False)
    from torch.distributed.pipelining import ScheduleDualPipeV

    schedule = ScheduleDualPipeV(pstages, n, loss_fn=loss_fn, scale_grads=False)
    if state.overlap:
        from torch.distributed.pipelining.schedules import _ComputationType

        coord = state.coordinator
        schedule.register_custom_function(_ComputationType.OVERLAP_F_B,
                                          lambda action, ctx: overlap_f_b(action, ctx, coord))
    return schedule


def _current_schedule(state: PipelineState):
    """The schedule for `state.autocast` (its dtype decides the logits' dtype), built on first use."""
    dev = state.device.type
    with state.autocast():
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else state.boundary_dtype
    if dtype not in state.schedules:
        state.schedules[dtype] = _make_schedule(state, dtype)
    return state.schedules[dtype]


# --------------------------------------------------------------------------------------------------
# one training step: forward_backward, grad_norm, (optimizer), finish_step, gathered_loss

def local_rows(state: PipelineState, batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch (B, T+1): micro-batch i is rows [i·B/n, (i+1)·B/n), and
    the rank with (dp, ep) index (d, e) reads slice d·ep + e of its dp·ep equal slices.
    -> (n · B/(n·dp·ep), T+1), micro-batches in order."""
    n, R = state.pcfg.n_microbatches, state.pcfg.replicas
    if R == 1:
        return batch
    B = batch.shape[0]
    i = state.dp_rank * state.pcfg.ep + state.ep_rank
    return batch.view(n, R, B // (n * R), -1)[:, i].reshape(B // R, -1)


@torch.no_grad()
def _sync_grads(state: PipelineState) -> None:
    """After the schedule: the 1F1B tied embedding's two halves summed; then, with dp × ep > 1 (each
    rank's loss is the mean over its own rows, so the gradient of the global mean is the average over
    the stage's dp × ep ranks): the replicated gradients all-reduced over the stage group (one flat
    buffer) and divided by dp·ep; the expert slices, which already hold the sum over their ep group's
    losses (the backward all-to-all), all-reduced over the dp replicas and divided by dp·ep. Under ZeRO-1
    (`state.zero`) those sums are reduce-scatters instead: each rank keeps its chunk of every gradient (the
    masters' .grad), the whole gradients are freed. Sums run in fp32 (bf16 gradients are cast up)."""
    if state.tied_group is not None and state.rank in (0, state.pcfg.pp - 1):
        emb = (state.stages[0] if state.rank == 0 else state.stages[-1]).model.embed_tokens.weight
        if emb.grad is None:
            emb.grad = torch.zeros_like(emb)
        dist.all_reduce(emb.grad, group=state.tied_group)
    R = state.pcfg.replicas
    if R == 1:
        return
    for p in state.model_part.parameters():
        if p.grad is None:  # no token reached an expert / a stage part without gradient
            p.grad = torch.zeros_like(p)
    zeroed = {id(e.param) for z in state.zero for e in z.entries}
    for z in state.zero:
        z.reduce_grads(R)
    for params, group in ((state.replicated_params, state.stage_group), (state.expert_params, state.dp_group)):
        grads = [p.grad for p in params if id(p) not in zeroed]
        if group is None:  # no copies to sum (the expert slices without dp replicas): the mean over the rows
            for g in grads:
                g.div_(R)
            continue
        # summed in fp32 (bf16 weights' gradients cast up), ZERO_BUCKET entries at a time (bounded scratch)
        i = 0
        while i < len(grads):
            j, n = i, 0
            while j < len(grads) and (j == i or n + grads[j].numel() <= ZERO_BUCKET):
                n += grads[j].numel()
                j += 1
            flat = torch.empty(n, dtype=torch.float32, device=grads[i].device)
            o = 0
            for g in grads[i:j]:
                flat[o:o + g.numel()].view_as(g).copy_(g)
                o += g.numel()
            dist.all_reduce(flat, group=group)
            flat.div_(R)
            o = 0
            for g in grads[i:j]:
                g.copy_(flat[o:o + g.numel()].view_as(g))
                o += g.numel()
            i = j


def forward_backward(state: PipelineState, batch: torch.Tensor, *, mtp_lambda: float = 0.3,
                     balance_alpha: float = 0.0, autocast=None) -> None:
    """Run the schedule on the global batch (B, T+1), the same tensor on every rank (each rank reads
    its `local_rows`), the stage forwards and the loss under `autocast()` if given (a context-manager
    factory, e.g. `lambda: torch.autocast("cpu", dtype=torch.bfloat16)`), the backward outside it
    (module docstring, "Precision"). Afterwards every local gradient is that
    of the global mean loss, synchronised over the dp / ep ranks and the tied embedding copies
    (call it with zeroed gradients: the micro-batches are the accumulation); expert counts and loss
    parts are in the state (`finish_step`, `gathered_loss`)."""
    n = state.pcfg.n_microbatches
    state.hp["mtp_lambda"] = mtp_lambda
    state.loss_parts.clear()
    rows = local_rows(state, batch)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # torch 2.11 checks input strides
    state.autocast = autocast or contextlib.nullcontext
    for st in state.stages:
        st.autocast = state.autocast
        st.with_balance = balance_alpha > 0
        st.aux_alpha = balance_alpha
        st.aux_grad = balance_alpha / n
        st.reset_stats(state.n_moe, state.n_experts, rows.device)
    args = (x,) if state.stages[0].is_first else ()
    kwargs = {"ids": x} if state.stages[-1].is_last and len(state.stages[-1].model.mtp) else {}
    target = y if state.stages[-1].is_last else None
    state.schedule = _current_schedule(state)
    with split_backward_compile(state.pcfg.schedule):
        state.schedule.step(*args, target=target, return_outputs=False, **kwargs)
    _sync_grads(state)


def split_backward_compile(schedule: str):
    """The context a schedule's step runs in for per-block torch.compile. DualPipeV splits each backward in two
    (stage_backward_input with retain_graph=True, then stage_backward_weight on the same graph), which a compiled
    block's backward refuses when AOTAutograd donated its saved buffers to it ("compiled with non-empty donated
    buffers which requires ... retain_graph=False"): donation is off while DualPipeV's step compiles and runs
    (torchtitan's graph trainer does the same for DualPipeV). The cost: a compiled block's backward is one autograd
    node giving input and weight gradients together, so the weight pass runs it again (README, refused
    combinations). 1F1B: nothing changes."""
    if schedule != "dualpipev":
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)


@torch.no_grad()
def grad_norm(state: PipelineState) -> torch.Tensor:
    """The L2 norm of the whole model's gradient, each parameter once over all ranks: replicated
    tensors are equal on the dp × ep ranks of a stage, expert slices on the dp replicas, the 1F1B
    embedding copy is left out. A 0-dim fp32 tensor on the device, the same on every rank; no
    clipping, no host sync."""
    experts = {id(p) for p in state.expert_params}
    zeroed = {id(e.param) for z in state.zero for e in z.entries}
    rep, exp = [], []
    for p in state.model_part.parameters():
        if p.grad is not None and p is not state.tied_copy and id(p) not in zeroed:
            (exp if id(p) in experts else rep).append(p.grad)
    sq = torch.zeros((), dtype=torch.float32, device=state.device)
    for z in state.zero:  # ZeRO-1: each element of the group's gradients on exactly one of its ranks
        sq += z.sq_norm(exclude=state.tied_copy)
    for grads, copies in ((rep, state.pcfg.replicas), (exp, state.pcfg.dp)):
        if grads:
            sq += torch.stack([g.float().pow(2).sum() for g in grads]).sum() / copies
    dist.all_reduce(sq, group=state.all_group)
    return sq.sqrt()


def finish_step(state: PipelineState, gamma: float) -> torch.Tensor | None:
    """After the optimizer step: the step's expert counts (L_moe, E) summed over all ranks (every
    rank gets the whole table) and the aux-loss-free bias update of this rank's routers. Returns the
    counts (None for a model without MoE)."""
    if not state.n_moe:
        return None
    counts = sum(st.counts for st in state.stages)
    dist.all_reduce(counts, group=state.all_group)
    if state.routers:
        update_expert_bias([g for _, g in state.routers], counts[[r for r, _ in state.routers]], gamma)
    return counts


def gathered_loss(state: PipelineState) -> dict:
    """The last forward_backward's loss (total incl. α·balance), main CE, MTP CE (mean over depths)
    and α·balance: means over the global batch, the same on every rank (each rank computed means
    over its own rows)."""
    n = state.pcfg.n_microbatches * state.pcfg.replicas
    v = torch.zeros(4, dtype=torch.float32, device=state.device)
    if state.loss_parts:
        v[:3] = torch.stack(state.loss_parts).sum(0)
    v[3] = sum(st.aux_sum.to(state.device) for st in state.stages)
    dist.all_reduce(v, group=state.all_group)
    total, main, mtp, balance = (v / n).tolist()
    return {"loss": total + balance, "main": main, "mtp": mtp, "balance": balance}


def train_step(state: PipelineState, opt, batch: torch.Tensor, *, mtp_lambda: float = 0.3,
               balance_alpha: float = 0.0, gamma: float = 0.0, grad_clip: float = 1.0, autocast=None) -> dict:
    """One optimizer step on the global batch (B, T+1), the same tensor on every rank: forward_backward,
    grad_norm, clip (torch's coefficient min(1, max / (norm + 1e-6)); a dsv3 AdamW takes it as
    `grad_scale`, other optimizers get scaled gradients), step, finish_step. `opt` is over
    `state.model_part` (make_pipeline_optimizer). Returns gathered_loss's values, the
    gradient norm before clipping and the global expert loads (same on every rank)."""
    forward_backward(state, batch, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha, autocast=autocast)
    norm = grad_norm(state)
    coef = (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip > 0 else None
    if isinstance(opt, AdamW):
        opt.step(grad_scale=coef)
    else:
        if coef is not None:
            for p in state.model_part.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        opt.step()
    opt.zero_grad(set_to_none=True)
    counts = finish_step(state, gamma)
    return {**gathered_loss(state), "grad_norm": float(norm), "counts": counts}


@torch.no_grad()
def forward_only(state: PipelineState, x: torch.Tensor, autocast=None) -> torch.Tensor | None:
    """Forward-only pass of token ids x (b, T) (this rank's rows under dp × ep > 1) through the
    stages' parts in stage order, the hidden state sent rank to rank (blocking P2P, in the parameters'
    dtype) outside the schedule, so it works with any torch that has the schedules (no
    `schedule.eval`). No MTP, no balance terms, no expert counts. Returns the main logits (b, T, V)
    on the rank(s) holding the last stage, else None."""
    pcfg = state.pcfg
    ranks = pcfg.stage_ranks()
    mine = {st.stage_index: st for st in state.stages}
    b, T = x.shape
    D = state.stages[0].config.hidden_size

    def peer(r):
        return dist.get_global_rank(state.group, r)

    h, logits = None, None
    with (autocast or contextlib.nullcontext)():
        for s in range(pcfg.n_stages):
            if ranks[s] != state.rank:
                continue
            st = mine[s]
            if s == 0:
                inp = x
            elif ranks[s - 1] == state.rank:
                inp = h
            else:
                inp = torch.empty(b, T, D, dtype=state.boundary_dtype, device=x.device)
                dist.recv(inp, src=peer(ranks[s - 1]))
            out = st.model(inp, tokens=x, with_mtp=False)
            if st.is_last:
                logits = out.logits
            else:
                h = out.hidden
                if ranks[s + 1] != state.rank:
                    dist.send(h.contiguous(), dst=peer(ranks[s + 1]))
    return logits


# --------------------------------------------------------------------------------------------------
# DualPipeV overlap: forward of one micro-batch on one thread, backward of another on a second one

def overlap_f_b(action, ctx, coord: OverlapCoordinator | None = None) -> None:
    """Custom function for OVERLAP_F_B actions of a `_PipelineScheduleRuntime` (ScheduleDualPipeV):
    the same work as torch's default (wait for the received inputs, forward sub-action, loss, local
    hand-over to the next stage; backward sub-action, local hand-over of the input gradient), with
    the backward on a second thread. The two threads pass `coord`'s baton at every all-to-all of the
    stages' AllToAllDispatchers (PP × EP), so that one side's all-to-all is in flight while the other
    side computes (see expert_parallel.OverlapCoordinator). The forward side starts. Without
    dispatchers (PP alone) nobody passes the baton: the forward runs, then the backward."""
    from torch.distributed.pipelining.schedules import _wait_batch_p2p

    coord = coord or OverlapCoordinator()
    sched = ctx.schedule_ref
    stages = {s.stage_index: s for s in sched._stages}
    fa, ba = action.sub_actions
    fs, bs = stages[fa.stage_index], stages[ba.stage_index]
    fi, bi = fa.microbatch_index, ba.microbatch_index
    if not fs.is_first and fa.stage_index - 1 not in stages:
        _wait_batch_p2p(sched.fwd_recv_ops.pop((fa.stage_index, fi)))
    if not bs.is_last and ba.stage_index + 1 not in stages:
        _wait_batch_p2p(sched.bwd_recv_ops.pop((ba.stage_index, bi)))
    err: list[BaseException] = []
    # one compute stream for both sides: an all-to-all in flight on NCCL's stream overlaps with the
    # other side's kernels, which the holder of the baton queues before it waits
    stream = torch.cuda.current_stream() if torch.cuda.is_available() and fs.device.type == "cuda" else None

    def backward():
        try:
            if stream is not None:
                torch.cuda.set_stream(stream)
            coord.wait_turn("B")
            loss = sched._maybe_get_loss(bs, bi)
            sched.backward_counter[ba.stage_index] += 1
            last = sched.backward_counter[ba.stage_index] == sched._n_microbatches
            bs.backward_one_chunk(bi, loss=loss, full_backward=True, last_backward=last)
            if ba.stage_index - 1 in stages:
                stages[ba.stage_index - 1].set_local_bwd_input(bs.get_local_bwd_output(bi), bi)
        except BaseException as e:  # re-raised on the schedule's thread
            err.append(e)
        finally:
            coord.finish("B")

    coord.start()
    t = threading.Thread(target=backward, daemon=True)
    t.start()
    try:
        out = fs.forward_one_chunk(fi, ctx.arg_mbs[fi], ctx.kwarg_mbs[fi], save_forward_output=False)
        sched._maybe_compute_loss(fs, out, ctx.target_mbs, fi)
        if fa.stage_index + 1 in stages:
            stages[fa.stage_index + 1].set_local_fwd_input(out, fi)
    finally:
        coord.finish("F")  # the forward is done: the backward runs on without partner
        t.join()
        coord.stop()
    if err:
        raise err[0]
