"""Pipeline parallelism through `torch.distributed.pipelining`: the layer stack cut into stages,
run by Schedule1F1B or ScheduleDualPipeV (DeepSeek-V3 paper §3.2.1; DualPipeV is the "cut in half"
V-shaped DualPipe of github.com/deepseek-ai/DualPipe, in torch >= 2.9).

Layout (PP alone: world = pp ranks, all of them read the same global batch; PP × EP below):

    1F1B       S = pp stages, stage s on rank s
    DualPipeV  S = 2·pp stages in a V: rank r holds stages r and 2·pp-1-r, so rank 0 holds both the
               embedding stage and the head + MTP stage (the paper's reason for the V: the MTP
               modules share the embedding and the output head with the main model)
    stage s    embedding (s = 0), a contiguous run of main layers, final norm + lm_head + MTP modules
               (s = S-1). Layers: `layers_per_stage`, or an even split with the remainder going to
               the earliest stages (the last stage also carries the head and the MTP block).

What crosses a stage boundary is the hidden state h (B, T, D) only. The token ids reach the stages
that need them from `step`: the first stage as its positional input, the last stage (MTP needs the
embeddings of the tokens ahead) as the keyword `ids`, which torch passes to every stage of the rank.

Exactness against the single-process model on the same global batch (tests/distributed/test_pipeline.py):
* loss: the last stage's loss function is the project's `compute_loss` (CE + λ/D·MTP) divided by the
  number of micro-batches; `scale_grads=False` (torch would otherwise divide a parameter shared by
  two stages of one rank, the embedding under DualPipeV, twice). Equal micro-batches make the mean of
  the per-micro-batch means the global mean.
* sequence-wise balance loss α·Σ_l L_Bal: each MoE layer's term is born inside its stage, far from
  the loss. `AuxLossScaler` (Megatron's MoEAuxLossAutoScaler) returns h unchanged in the forward
  and, in the backward, hands the term the gradient it has in the total loss, α / n_microbatches;
  its value is summed per stage and all-reduced for the reported loss.
* expert loads for the aux-loss-free bias update: counted per stage over all micro-batches into
  the rows of the model's (L_moe, E) table, all-reduced (SUM) over the pipeline group, and each rank
  updates its own routers: the same update as one process.
* embedding shared with MTP: under DualPipeV both uses sit on rank 0 and are one Parameter. Under
  1F1B the last rank keeps a copy (same initial values) and the two ranks all-reduce the embedding
  gradient after the backward (Megatron's tied-embedding approach): both copies receive the full
  gradient and AdamW keeps them equal. The gradient norm counts the embedding once.

PP × EP (`PipelineConfig(ep=...)`, world = pp × ep, mesh ("pp", "ep") from `pipeline_mesh`, global
rank = pp_index · ep + ep_index): each stage is held by the ep ranks of its pp index. They split its
routed experts (shard_experts + AllToAllDispatcher on the stage's ep group) and replicate everything
else; each reads its own slice of every micro-batch's rows (`local_rows`: data parallel over ep, as EP
borrows data-parallel ranks), and the pipeline's P2P goes between ranks of equal ep index. After the
schedule, the replicated gradients are all-reduced over the ep group and divided by ep (each rank's
loss is the mean over its rows); the expert slices already hold the sum over the group's losses (the
backward all-to-all) and are divided by ep. Expert counts, loss and the gradient norm are reduced over
all pp × ep ranks (replicated tensors counted once). The 1F1B tied embedding has one group per ep index.

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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dsv3.distributed.expert_parallel import AllToAllDispatcher, OverlapCoordinator, shard_experts
from dsv3.distributed.mesh import ParallelConfigError
from dsv3.model import rope
from dsv3.model.moe import MoE, update_expert_bias
from dsv3.model.transformer import ModelOutput
from dsv3.training.loss import compute_loss
from dsv3.training.optim import param_groups

SCHEDULES = ("1f1b", "dualpipev")


# --------------------------------------------------------------------------------------------------
# layout

@dataclass
class PipelineConfig:
    pp: int = 2  # pipeline ranks
    schedule: str = "1f1b"  # "1f1b" | "dualpipev"
    n_microbatches: int = 4
    layers_per_stage: tuple[int, ...] | None = None  # main layers of each stage; None: even split
    ep: int = 1  # expert-parallel ranks per stage (world = pp × ep, mesh ("pp", "ep"))

    @property
    def world_size(self) -> int:
        return self.pp * self.ep

    @property
    def n_stages(self) -> int:
        return self.pp if self.schedule == "1f1b" else 2 * self.pp

    def stage_ranks(self) -> list[int]:
        """rank of each stage: s for 1F1B; the V (s, then 2·pp-1-s) for DualPipeV."""
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

    def validate(self, world_size: int | None = None, model_cfg=None, batch_size: int | None = None
                 ) -> "PipelineConfig":
        if self.schedule not in SCHEDULES:
            raise ParallelConfigError(f"pipeline schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.pp, int) or self.pp < 2:
            raise ParallelConfigError(f"pp must be an integer >= 2 for a pipeline, got {self.pp!r}")
        if not isinstance(self.ep, int) or self.ep < 1:
            raise ParallelConfigError(f"ep must be an integer >= 1, got {self.ep!r}")
        if world_size is not None and world_size != self.world_size:
            if self.ep == 1:
                raise ParallelConfigError(f"pipeline parallelism alone: pp ({self.pp}) must equal the world size "
                                          f"({world_size})")
            raise ParallelConfigError(f"pp ({self.pp}) x ep ({self.ep}) = {self.world_size} ranks, but the world "
                                      f"size is {world_size}")
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
        if batch_size is not None and batch_size % (self.n_microbatches * self.ep):
            if self.ep == 1:
                raise ParallelConfigError(f"the global batch ({batch_size} sequences) is not a multiple of "
                                          f"n_microbatches ({self.n_microbatches})")
            raise ParallelConfigError(f"the global batch ({batch_size} sequences) is not a multiple of "
                                      f"n_microbatches x ep ({self.n_microbatches} x {self.ep}): every ep rank "
                                      f"reads an equal slice of every micro-batch")
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
# stage modules

class StageModule(nn.Module):
    """One pipeline stage of a built Transformer. Submodules keep their names in the model
    (`layers.<global index>`, `embed_tokens`, `norm`, `lm_head`, `mtp.<k>`), so a stage's
    `named_parameters()` are a subset of the model's."""

    def __init__(self, model, stage_index: int, n_stages: int, layers: range, router_rows: dict[int, int]):
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.stage_index, self.n_stages = stage_index, n_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        has_mtp = self.is_last and len(model.mtp) > 0
        self.embed_tokens = model.embed_tokens if (self.is_first or has_mtp) else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if self.is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self.register_buffer("rope_inv_freq", model.rope_inv_freq.detach().clone(), persistent=False)
        self.rope_factor = model.rope_factor
        # MoE bookkeeping: row of each of this stage's MoE blocks in the model's (L_moe, E) table
        self.router_rows = router_rows  # id(block) -> row
        self.with_balance = False
        self.aux_alpha = 0.0  # α
        self.aux_grad = 0.0  # d total / d (one layer's balance term) = α / n_microbatches
        self.counts: torch.Tensor | None = None  # (L_moe, E) this step, this stage's rows only
        self.aux_sum = torch.zeros(())  # Σ over micro-batches and layers of α·L_Bal (detached)

    def reset_stats(self, n_moe: int, n_experts: int, device) -> None:
        self.counts = torch.zeros(n_moe, n_experts, dtype=torch.long, device=device)
        self.aux_sum = torch.zeros((), dtype=torch.float32, device=device)

    def _block(self, blk, h, cos, sin):
        h, stats = blk(h, cos, sin, None, self.with_balance)
        if stats is not None:
            if self.counts is not None:
                self.counts[self.router_rows[id(blk)]] += stats.counts
            if stats.balance is not None:
                self.aux_sum = self.aux_sum + stats.balance.detach().float() * self.aux_alpha
                h = AuxLossScaler.apply(h, stats.balance, self.aux_grad)
        return h

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None):
        """x: token ids (b, T) on the first stage, the hidden state (b, T, D) elsewhere; ids (b, T):
        the token ids, needed by the last stage's MTP modules. -> h (b, T, D), or on the last stage
        (logits (b, T, V), MTP logits (b, T-k, V) for k = 1..D)."""
        if self.is_first:
            ids = x
            h = self.embed_tokens(x)
        else:
            h = x
        T = h.shape[1]
        cos, sin = rope.cos_sin(torch.arange(T, device=h.device).unsqueeze(0), self.rope_inv_freq, self.rope_factor)
        for blk in self.layers.values():
            h = self._block(blk, h, cos, sin)
        if not self.is_last:
            # torch detaches a stage's outputs in place, which a view (AuxLossScaler's) refuses
            return h.clone() if h._is_view() else h
        h = self.norm(h)
        logits = self.lm_head(h)
        outs = [logits]
        if len(self.mtp):
            if ids is None:
                raise ValueError("the last pipeline stage needs the token ids (keyword `ids`) for MTP")
            emb = self.embed_tokens(ids)
            h_prev = h
            for k, mod in enumerate(self.mtp, start=1):
                Tk = T - k
                if Tk <= 0:
                    break
                x_k = mod.combine(emb[:, k:], h_prev[:, :Tk])
                h_prev = self._block(mod, x_k, cos[:, :Tk], sin[:, :Tk])
                outs.append(self.lm_head(mod.shared_head.norm(h_prev)))
        return tuple(outs)


def split_model(model, pcfg: PipelineConfig, rank: int) -> list[StageModule]:
    """The stage modules of `rank` (1 for 1F1B, 2 for DualPipeV, ascending stage index). The model
    must be the same (same seed) on every rank; the parts of it a rank does not hold are dropped by
    the caller letting go of `model`."""
    pcfg.validate(model_cfg=model.config)
    ranges = pcfg.split(model.config.num_hidden_layers)
    blocks = list(model.layers) + list(model.mtp)
    moe_blocks = [b for b in blocks if isinstance(b.mlp, MoE)]
    rows = {id(b): i for i, b in enumerate(moe_blocks)}
    ranks = pcfg.stage_ranks()
    return [StageModule(model, s, pcfg.n_stages, ranges[s], rows) for s in range(pcfg.n_stages) if ranks[s] == rank]


# --------------------------------------------------------------------------------------------------
# schedule, state, training step

@dataclass
class PipelineState:
    pcfg: PipelineConfig
    rank: int  # pipeline rank (index along "pp")
    group: object  # the pipeline process group (the ranks with my ep index)
    stages: list[StageModule]
    schedule: object
    model_part: nn.ModuleList  # this rank's stages as one module (shared parameters counted once)
    n_moe: int
    n_experts: int
    routers: list  # (row, Router) of this rank
    tied_group: object | None  # 1F1B: {rank 0, rank pp-1} (same ep index) for the embedding gradient
    tied_copy: nn.Parameter | None  # the last rank's copy of the embedding (not counted in the norm)
    loss_parts: list = field(default_factory=list)  # (total/n, main/n) per micro-batch, last stage
    hp: dict = field(default_factory=dict)
    # PP × EP (ep = 1: ep_group None, all_group = group)
    ep_group: object | None = None  # the ranks of my stage(s), which split the routed experts
    ep_rank: int = 0
    all_group: object = None  # every rank of the layout (loss, counts, gradient norm)
    expert_params: list = field(default_factory=list)  # local expert slices (summed by the all-to-all)
    replicated_params: list = field(default_factory=list)  # the rest, averaged over ep_group
    coordinator: OverlapCoordinator | None = None  # overlap=True
    dispatchers: list = field(default_factory=list)  # this rank's AllToAllDispatchers (timers go here)
    ep_mesh: object | None = None  # PP × EP: the 1-D "ep" sub-mesh of my stage(s) (checkpoints)


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
    """The 2-D DeviceMesh ("pp", "ep") over the initialised world: global rank = pp_index · ep +
    ep_index (the ep ranks of a stage are consecutive, i.e. on one node)."""
    from torch.distributed.device_mesh import init_device_mesh

    pcfg.validate(dist.get_world_size())
    return init_device_mesh(device_type, (pcfg.pp, pcfg.ep), mesh_dim_names=("pp", "ep"))


def build_pipeline(model, pcfg: PipelineConfig, micro_batch_size: int, seq_len: int, *, group=None,
                   device=None, mtp_lambda: float = 0.3, overlap: bool = False) -> PipelineState:
    """Split `model` (identical on every rank), wrap this rank's stages as PipelineStage and build the
    schedule. micro_batch_size × seq_len is the shape of every micro-batch on one rank (static shapes:
    no run-time shape inference, which would run the MoE on dummy data); under PP × EP a micro-batch
    of the global batch has ep × micro_batch_size rows. `group`: the pipeline group for PP alone
    (default: the world); with pcfg.ep > 1 the groups come from `pipeline_mesh` over the world."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    device = device or next(model.parameters()).device
    cfg = model.config
    ep_group, ep_rank, ep_mesh = None, 0, None
    if pcfg.ep > 1:
        if group is not None:
            raise ParallelConfigError("PP x EP builds its groups from the world (pipeline_mesh); pass group=None")
        mesh = pipeline_mesh(pcfg, device.type)
        ep_mesh = mesh["ep"]
        group, ep_group = mesh.get_group("pp"), mesh.get_group("ep")
        ep_rank = mesh.get_local_rank("ep")
        all_group = dist.group.WORLD
    else:
        group = group or dist.group.WORLD
        all_group = group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pcfg.validate(world * pcfg.ep, cfg, micro_batch_size * pcfg.n_microbatches * pcfg.ep)
    stages = split_model(model, pcfg, rank)
    S = pcfg.n_stages
    dt = next(model.parameters()).dtype
    b, T, D, V = micro_batch_size, seq_len, cfg.hidden_size, cfg.vocab_size

    # EP inside the stages: keep my slice of each MoE's experts, send tokens to the others
    coord = OverlapCoordinator() if overlap else None
    expert_params, dispatchers = [], []
    if ep_group is not None:
        for st in stages:
            for m in st.modules():
                if isinstance(m, MoE) and m.dispatcher is None:
                    shard_experts(m.experts, ep_rank, pcfg.ep)
                    m.dispatcher = AllToAllDispatcher(ep_group, cfg.n_routed_experts)
                    expert_params += [m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj]
                    dispatchers.append(m.dispatcher)
    for d in dispatchers:
        d.coordinator = coord

    pstages = []
    for st in stages:
        st.to(device)
        inp = _meta((b, T), torch.long) if st.is_first else _meta((b, T, D), dt)
        if st.is_last:
            n_mtp = sum(1 for k in range(1, len(st.mtp) + 1) if T - k > 0)
            out = (_meta((b, T, V), dt),) + tuple(_meta((b, T - k, V), dt) for k in range(1, n_mtp + 1))
        else:
            out = _meta((b, T, D), dt)
        ps = PipelineStage(st, st.stage_index, S, device, input_args=inp, output_args=out, group=group)
        _no_self_p2p(ps)
        pstages.append(ps)

    part = nn.ModuleList(stages)
    ids = {id(p) for p in expert_params}
    state = PipelineState(pcfg, rank, group, stages, None, part, 0, cfg.n_routed_experts, [], None, None,
                          ep_group=ep_group, ep_rank=ep_rank, all_group=all_group, expert_params=expert_params,
                          replicated_params=[p for p in part.parameters() if id(p) not in ids],
                          coordinator=coord, dispatchers=dispatchers, ep_mesh=ep_mesh)
    n = pcfg.n_microbatches

    def loss_fn(output, target):
        logits, *mtp = output if isinstance(output, (tuple, list)) else (output,)
        out = ModelOutput(logits, list(mtp), None, None, None)
        parts = compute_loss(out, target, state.hp.get("mtp_lambda", mtp_lambda), 0.0)
        state.loss_parts.append(torch.stack([parts.total.detach(), parts.main.detach()]).float())
        return parts.total / n

    if pcfg.schedule == "1f1b":
        schedule = Schedule1F1B(pstages[0], n, loss_fn=loss_fn, scale_grads=False)
    else:
        from torch.distributed.pipelining import ScheduleDualPipeV

        schedule = ScheduleDualPipeV(pstages, n, loss_fn=loss_fn, scale_grads=False)
        if overlap:
            from torch.distributed.pipelining.schedules import _ComputationType

            schedule.register_custom_function(_ComputationType.OVERLAP_F_B,
                                              lambda action, ctx: overlap_f_b(action, ctx, coord))
    state.schedule = schedule

    moe_blocks = [blk for blk in list(model.layers) + list(model.mtp) if isinstance(blk.mlp, MoE)]
    state.n_moe = len(moe_blocks)
    for st in stages:
        for blk in list(st.layers.values()) + (list(st.mtp) if st.is_last else []):
            if id(blk) in st.router_rows:
                state.routers.append((st.router_rows[id(blk)], blk.mlp.gate))
    if pcfg.schedule == "1f1b" and len(model.mtp) > 0:
        # one group {pp rank 0, pp rank pp-1} per ep index; every rank creates all of them, in order
        for e in range(pcfg.ep):
            if pcfg.ep == 1:
                ends = [dist.get_global_rank(group, 0), dist.get_global_rank(group, world - 1)]
            else:
                ends = [e, (pcfg.pp - 1) * pcfg.ep + e]
            g = dist.new_group(ends)
            if e == ep_rank:
                state.tied_group = g
        if rank == world - 1:
            state.tied_copy = stages[0].embed_tokens.weight
    return state


def make_optimizer(state: PipelineState, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW over this rank's parameters, with the groups of dsv3/training/optim.py."""
    fused = next(state.model_part.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(state.model_part, weight_decay), lr=lr, betas=betas, eps=eps,
                             **({"fused": True} if fused else {"foreach": True}))


@torch.no_grad()
def _clip_grad_norm_(state: PipelineState, max_norm: float) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (each parameter once over the pipeline), then
    torch.nn.utils.clip_grad_norm_'s scaling."""
    params = [p for p in state.model_part.parameters() if p.grad is not None]
    dev = params[0].device
    experts = {id(p) for p in state.expert_params}
    rep, exp = (torch.zeros((), dtype=torch.float32, device=dev) for _ in range(2))
    for p in params:
        if id(p) in experts:
            exp += p.grad.float().pow(2).sum()
        elif p is not state.tied_copy:
            rep += p.grad.float().pow(2).sum()
    # replicated tensors are equal on the ep ranks of a stage (count them once), expert slices differ
    sq = rep / state.pcfg.ep + exp
    dist.all_reduce(sq, group=state.all_group)
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


def local_rows(state: PipelineState, batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch (B, T+1): micro-batch i is rows [i·B/n, (i+1)·B/n), and ep
    rank e reads the e-th of its ep equal slices. -> (n · B/(n·ep), T+1), micro-batches in order."""
    n, ep = state.pcfg.n_microbatches, state.pcfg.ep
    if ep == 1:
        return batch
    B = batch.shape[0]
    return batch.view(n, ep, B // (n * ep), -1)[:, state.ep_rank].reshape(B // ep, -1)


@torch.no_grad()
def _sync_ep_grads(state: PipelineState) -> None:
    """PP × EP: each ep rank's loss is the mean over its own rows, so the gradient of the global mean
    is the average over the ep ranks: all-reduce the replicated parameters' gradients over the ep
    group (one flat buffer) and divide by ep; the expert slices already hold the sum over the group's
    losses (the backward all-to-all), divide them by ep."""
    ep = state.pcfg.ep
    for p in state.expert_params + state.replicated_params:
        if p.grad is None:  # no token reached an expert / a stage part without gradient
            p.grad = torch.zeros_like(p)
    for p in state.expert_params:
        p.grad.div_(ep)
    grads = [p.grad for p in state.replicated_params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=state.ep_group)
    flat.div_(ep)
    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def forward_backward(state: PipelineState, batch: torch.Tensor, *, mtp_lambda: float = 0.3,
                     balance_alpha: float = 0.0) -> None:
    """Run the schedule on the global batch (B, T+1) (the same tensor on every rank; under PP × EP
    each rank reads its `local_rows`): gradients of the mean loss accumulate in this rank's
    parameters (averaged over the ep group); counts and loss parts in the state."""
    n = state.pcfg.n_microbatches
    state.hp["mtp_lambda"] = mtp_lambda
    state.loss_parts.clear()
    batch = local_rows(state, batch)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # torch 2.11 checks input strides
    for st in state.stages:
        st.with_balance = balance_alpha > 0
        st.aux_alpha = balance_alpha
        st.aux_grad = balance_alpha / n
        st.reset_stats(state.n_moe, state.n_experts, batch.device)
    args = (x,) if state.stages[0].is_first else ()
    kwargs = {"ids": x} if state.stages[-1].is_last and len(state.stages[-1].mtp) else {}
    target = y if state.stages[-1].is_last else None
    state.schedule.step(*args, target=target, return_outputs=False, **kwargs)
    if state.tied_group is not None and state.rank in (0, state.pcfg.pp - 1):
        emb = (state.stages[0] if state.rank == 0 else state.stages[-1]).embed_tokens.weight
        if emb.grad is None:
            emb.grad = torch.zeros_like(emb)
        dist.all_reduce(emb.grad, group=state.tied_group)
    if state.ep_group is not None:
        _sync_ep_grads(state)


def train_step(state: PipelineState, opt, batch: torch.Tensor, *, mtp_lambda: float = 0.3,
               balance_alpha: float = 0.0, gamma: float = 0.0, grad_clip: float = 1.0) -> dict:
    """One optimizer step on the global batch (B, T+1), the same tensor on every rank. Returns the
    loss, main CE and gradient norm (same on every rank) and the global expert loads."""
    forward_backward(state, batch, mtp_lambda=mtp_lambda, balance_alpha=balance_alpha)
    gnorm = _clip_grad_norm_(state, grad_clip) if grad_clip > 0 else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    counts = None
    if state.n_moe:
        counts = sum(st.counts for st in state.stages)
        dist.all_reduce(counts, group=state.all_group)
        rows = [r for r, _ in state.routers]
        if rows:
            update_expert_bias([g for _, g in state.routers], counts[rows], gamma)
    return {**gathered_loss(state), "grad_norm": None if gnorm is None else float(gnorm), "counts": counts}


@torch.no_grad()
def forward_only(state: PipelineState, x: torch.Tensor) -> torch.Tensor | None:
    """Forward-only pass of token ids x (b, T) (this rank's rows under PP × EP) through the stages in
    stage order, the hidden state sent rank to rank (blocking P2P, fp32) outside the schedule, so it
    works with any torch that has the schedules (no `schedule.eval`). No balance terms, no expert
    counts. Returns the main logits (b, T, V) on the rank(s) holding the last stage, else None."""
    pcfg = state.pcfg
    ranks = pcfg.stage_ranks()
    mine = {st.stage_index: st for st in state.stages}
    b, T = x.shape
    D = state.stages[0].config.hidden_size

    def peer(r):
        return dist.get_global_rank(state.group, r)

    h, logits = None, None
    saved = [(st.with_balance, st.counts) for st in state.stages]
    try:
        for st in state.stages:
            st.with_balance, st.counts = False, None
        for s in range(pcfg.n_stages):
            if ranks[s] != state.rank:
                continue
            st = mine[s]
            if s == 0:
                inp = x
            elif ranks[s - 1] == state.rank:
                inp = h
            else:
                inp = torch.empty(b, T, D, dtype=torch.float32, device=x.device)
                dist.recv(inp, src=peer(ranks[s - 1]))
            if st.is_last:
                logits = st(inp, ids=x)[0]
            else:
                h = st(inp).float()
                if ranks[s + 1] != state.rank:
                    dist.send(h.contiguous(), dst=peer(ranks[s + 1]))
    finally:
        for st, (wb, c) in zip(state.stages, saved):
            st.with_balance, st.counts = wb, c
    return logits


def gathered_loss(state: PipelineState) -> dict:
    """Total and main loss of the last forward_backward, the same on every rank (under PP × EP the
    mean over the ep ranks' rows: each of them computed the mean over its own rows)."""
    n = state.pcfg.n_microbatches * state.pcfg.ep
    dev = state.stages[0].rope_inv_freq.device
    v = torch.zeros(3, dtype=torch.float32, device=dev)
    if state.loss_parts:
        v[:2] = torch.stack(state.loss_parts).sum(0)
    v[2] = sum(st.aux_sum.to(dev) for st in state.stages)
    dist.all_reduce(v, group=state.all_group)
    v = (v / n).tolist()
    return {"loss": v[0] + v[2], "main": v[1], "balance": v[2]}


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
