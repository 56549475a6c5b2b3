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
`ReplicatedTokensDispatcher` (the model's one seam, `MoE.dispatcher`), in two ways chosen by the step's
token count N, the same on every rank. Decode steps (N <= max_batch_size x (speculative_k + 1)): each rank
runs its experts over the pairs routed to them and one all-reduce sums the partial outputs; shapes fixed by
N and no host sync, so the decode steps can be bucketed and captured as CUDA graphs like one GPU's. Larger
forwards (prefill): rank r sends only its 1/R slice of the tokens to the experts' owners through the
all-to-all and the slices' outputs are all-gathered. Either way each (token, expert) row is computed once
over all ranks, so the expert work per rank is 1/R of one process's (as the memory is). Scheduling and the tokens are
rank 0's (lockstep.py explains why rank 0 decides rather than every rank sampling with equal seeds).

Redundant experts (`expert_loads`, `redundant_experts`; paper §3.4): the placement of dsv3/inference/eplb.py,
planned from recorded loads on every rank alike (deterministic), replaces the contiguous split: each rank
loads the experts of its slots (`load_pretrained(experts=[ids per block])`, a hot expert on several ranks)
and `PlacedDispatcher` sends the j-th token of an expert to its copy j mod replicas. Online (`eplb_interval`
S > 0, the paper's periodic re-choice of the redundant experts): every S engine steps `Rebalancer` re-chooses
the redundant copies from the loads the engine routed since the last plan (rank 0's, or the sum over ranks with
dp_attention), every rank alike; every expert's first copy stays where it is, so at most R of the E + R slots
take another expert (unless a plan from scratch makes a layer's busiest rank 10% lighter: that layer is then
re-packed), read from the checkpoint (in place: graphs captured over the stacks stay valid), and the
dispatchers' tables are updated in place (fixed shapes). Without --expert-loads the first placement is planned
from uniform loads.

CUDA graphs: off unless asked for (`cuda_graphs=True`; on the CPU that runs the bucketed steps eagerly,
how the tests check them against one process). Graph capture of the all-reduce on GPUs has not been run
on multi-GPU hardware yet, so it is not the default. Refused: `compile_decode` (torch.compile through
the all-reduce is not verified).

Cost: attention, the dense layers and the shared experts run on every rank for the whole batch
(replicated); the routed experts are split by tokens and by experts as above. `attn_tp` = ep splits those
layers over the ranks instead (dsv3/distributed/attention_tp.py: heads and FFN widths, an all-reduce
after each row-parallel projection); every rank still runs every sequence.

Attention data parallelism (`dp_attention`, the paper's decode layout with one attention replica per
rank): each rank holds, prefills and decodes its own requests (lockstep.py's DPLeader gives each new
request to the least-loaded rank), so the latent cache of all ranks together holds R times the sequences
and attention, the dense layers and the shared experts run over each rank's own tokens; the MoE blocks
send each rank's own tokens to the experts' owners with the all-to-all dispatcher (training's, different
token counts per rank). Decoding is eager there: the split sizes are data-dependent (the static
all-reduce path needs every rank to hold every token).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from dsv3.distributed.expert_parallel import AllToAllDispatcher, ReplicatedTokensDispatcher, local_experts
from dsv3.inference.engine import Engine, graphs_setting
from dsv3.inference.lockstep import DPLeader, Leader, agree_with_rank0, control_group, run_follower, sync_phases
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


class PlacedDispatcher:
    """An expert-parallel dispatcher over a redundant-expert placement (dsv3/inference/eplb.py): the router's
    expert ids become physical slot ids (`route_to_replica`: the j-th token of a hot expert goes to its copy
    j mod replicas, tensor ops only) and `inner` routes by slot, rank r holding slots [r·S, (r+1)·S) (S slots
    per rank), exactly as it routes by expert without copies (inner: a dispatcher over R·S "experts")."""

    def __init__(self, inner, placement, offset: int = 0):
        self.inner = inner
        self.placement = placement
        self.offset = offset  # route_to_replica's: the data-parallel group's index (0: every rank the same tokens)

    def __call__(self, experts, x_ND, idx_NK, w_NK, impl: str = "auto"):
        from dsv3.inference.eplb import route_to_replica

        return self.inner(experts, x_ND, route_to_replica(idx_NK, self.placement, self.offset), w_NK, impl)


class Rebalancer:
    """Online EPLB (module docstring), an engine step hook: at every `interval`-th step, on every rank at the
    same step (lockstep), the loads routed since the last plan (`engine.loads`, the engine recording) re-choose
    the redundant copies (`eplb.replan`: every expert's first copy stays and at most R of the E + R slots change,
    unless a plan from scratch makes the busiest rank 10% lighter: then that layer is re-packed), the experts
    that move are read into their slots from `checkpoint` (`hf.load_expert_slots`), and
    each `PlacedDispatcher`'s tables are overwritten in place. The checkpoint's files must be those loaded
    (size and mtime are compared; otherwise re-placement stops, with a warning). `sum_over_ranks`: each rank
    routed its own requests (dp_attention; divided by `replicas`, the ranks of a group that route the same
    tokens); else rank 0's loads (broadcast: ranks that computed the same routing must not plan from counts that
    differ in a near-tie)."""

    def __init__(self, model, checkpoint: str, placement, dispatchers: list, *, rank: int, ep: int, redundant: int,
                 interval: int, group=None, sum_over_ranks: bool = False, replicas: int = 1):
        self.model, self.checkpoint, self.dispatchers = model, checkpoint, dispatchers
        self.slots = placement.slots.clone()  # (L, ep, S) the logical expert in each slot now
        self.rank, self.ep, self.redundant, self.interval = rank, ep, redundant, interval
        self.group, self.sum_over_ranks, self.replicas = group or dist.group.WORLD, sum_over_ranks, replicas
        self.width = dispatchers[0].placement.log2phy.shape[-1]
        self._seen: torch.Tensor | None = None  # the engine's counts at the last plan
        self.plans = 0  # re-placements made
        self.moved = 0  # slots (on this rank) that took another expert
        # moved experts are read from the checkpoint: it must still be the one loaded (a training run's
        # `keep` rotation deletes old step directories; a save over it changes the weights)
        self._files = self._stat()
        self.stale = False

    def _stat(self) -> dict:
        out = {}
        for f in sorted(os.listdir(self.checkpoint)):
            if f.endswith((".safetensors", ".json")):
                st = os.stat(os.path.join(self.checkpoint, f))
                out[f] = (st.st_size, st.st_mtime_ns)
        return out

    def _unchanged(self) -> bool:
        try:
            same = self._stat() == self._files
        except OSError:
            same = False
        if not same and not self.stale:
            self.stale = True
            print(f"dsv3 serve: warning: {self.checkpoint} changed or is gone since it was loaded; the experts stay "
                  "where they are (--eplb-interval reads moved experts from it)", flush=True)
        return same

    def __call__(self, engine) -> None:
        from dsv3.checkpoints.hf import load_expert_slots
        from dsv3.inference.eplb import placement_from_slots, replan

        if engine.stats.steps == 0 or engine.stats.steps % self.interval:
            return
        counts = engine.loads.counts
        window = counts.clone() if self._seen is None else counts - self._seen
        self._seen = counts.clone()
        if self.sum_over_ranks:
            dist.all_reduce(window, group=self.group)
            window //= self.replicas
        else:
            dist.broadcast(window, src=dist.get_global_rank(self.group, 0), group=self.group)
        loads = window.cpu()
        ok = torch.tensor([int(loads.sum() > 0 and self._unchanged())], device=counts.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)  # every rank takes the same branch
        if not ok.item():  # nothing routed since the last plan, or the checkpoint is not what was loaded
            return
        new = replan(loads, self.slots)  # the redundant copies re-chosen, or re-packed where that pays
        pairs = [[(j, e) for j, (o, e) in enumerate(zip(self.slots[i, self.rank].tolist(),
                                                         new[i, self.rank].tolist())) if o != e]
                 for i in range(len(new))]
        self.moved += load_expert_slots(self.model, self.checkpoint, pairs)
        placed = placement_from_slots(new, loads, self.width)
        for i, d in enumerate(self.dispatchers):
            for name in ("replicas", "slots", "rank_load", "log2phy"):
                getattr(d.placement, name).copy_(getattr(placed, name)[i])
        self.slots = new
        self.plans += 1


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def min_over_ranks(value: int, group, device: torch.device | str = "cpu") -> int:
    """The smallest of every rank's `value` (one all-reduce; the tensor on `device`: NCCL needs a GPU's)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def gpu_cache_tokens(model, mem_fraction: float = 0.9, reserve_gib: float = 4.0) -> int:
    """Latent-cache tokens for this rank's GPU when --cache-tokens is not given: `dsv3 plan --serve`'s formula
    (plan_serve.cache_capacity) with the memory the loaded shard actually occupies: total x mem_fraction -
    allocated - reserve, over the cache's bytes per token. A GPU left with no room is an error that says by
    how much (one GPU's default, batch x min(context, 4096), would not fit either)."""
    from dsv3.inference.cache import PagedLatentCache
    from dsv3.plan import GiB
    from dsv3.plan_serve import cache_capacity

    dev = model_device(model)
    total = torch.cuda.get_device_properties(dev).total_memory
    used = torch.cuda.memory_allocated(dev)
    bpt = PagedLatentCache.bytes_per_token(model, next(model.parameters()).dtype)  # the Engine's cache dtype
    _, tokens = cache_capacity(total, used, bpt, mem_fraction, reserve_gib)
    if tokens < 1:
        raise ValueError(f"no GPU memory left for the KV cache: {total / GiB:.1f} GiB x {mem_fraction} - "
                         f"{used / GiB:.1f} GiB of weights - {reserve_gib:g} GiB reserve; use more --ep ranks or "
                         "FP8 weights")
    return tokens


def check_modes(dp_attention: bool, cuda_graphs, compile_decode: bool, attn_tp: int = 1, ep: int = 1,
                cfg=None, batch_invariant: bool = False) -> None:
    """The engine modes expert parallelism refuses, with the reason."""
    if batch_invariant:
        raise ValueError("--batch-invariant cannot run with expert parallelism yet: a token's experts then run on "
                         "other ranks in batches of their making (the dispatch's grouping and its all-reduce), which "
                         "the mode's kernels do not cover (dsv3/kernels/invariant.py); serve in one process")
    if attn_tp != 1:
        if not isinstance(attn_tp, int) or attn_tp < 1 or ep % attn_tp:
            raise ValueError(f"--attn-tp {attn_tp} must divide --ep ({ep}): tensor-parallel groups of consecutive "
                             "ranks")
        if attn_tp < ep and not dp_attention:
            raise ValueError(f"--attn-tp {attn_tp} < --ep {ep} makes {ep // attn_tp} tensor-parallel groups, which "
                             "need --dp-attention (each group its own requests); without it use --attn-tp "
                             f"{ep} or 1")
        if attn_tp == ep and dp_attention:
            raise ValueError(f"--attn-tp {attn_tp} = --ep leaves one data-parallel group: --dp-attention has "
                             "nothing to split (drop it, or use a smaller --attn-tp)")
        if cfg is not None:
            from dsv3.distributed.attention_tp import check_attn_tp

            check_attn_tp(cfg, attn_tp)
    if dp_attention and graphs_setting(cuda_graphs):
        raise ValueError("CUDA graphs cannot run with attention data parallelism: each rank's decode step "
                         "exchanges its own, data-dependent number of tokens by all-to-all (host-read split "
                         "sizes), which a graph cannot capture; --dp-attention decodes eagerly")
    if compile_decode:
        raise ValueError("compile_decode cannot run with expert parallelism yet: torch.compile of a decode step "
                         "holding the dispatcher's all-reduce has not been verified; use cuda_graphs=True (graphs "
                         "without compile) or decode eagerly")


def plan_serving_placement(cfg, ep: int, expert_loads: str | None, redundant_experts: int, eplb_interval: int = 0):
    """The placement (dsv3.inference.eplb.Placement, one layer per MoE block: main layers, then MTP) for
    `--expert-loads FILE [--redundant-experts N]`, or None without them. Loads: (MoE blocks, E) token counts
    (.pt or .npy), e.g. `dsv3 eval/serve --record-expert-loads`. With eplb_interval > 0 (online re-placement)
    the log2phy tables have the fixed width 1 + N, and without a file the first plan is from uniform loads."""
    from dsv3.checkpoints.loads import load_counts
    from dsv3.inference.eplb import placement_from_slots, plan_placement

    if not isinstance(eplb_interval, int) or eplb_interval < 0:
        raise ValueError(f"--eplb-interval must be an integer >= 0 (engine steps; 0: off), got {eplb_interval!r}")
    if eplb_interval and not redundant_experts:
        raise ValueError("--eplb-interval re-plans the redundant experts: it needs --redundant-experts N (a multiple "
                         "of --ep)")
    if redundant_experts < 0 or redundant_experts % ep:
        raise ValueError(f"--redundant-experts ({redundant_experts}) must be a multiple of --ep ({ep}) >= 0: every "
                         "rank holds the same number of expert slots")
    blocks = cfg.num_moe_layers() + (cfg.num_nextn_predict_layers if cfg.n_routed_experts else 0)
    if not expert_loads:
        if redundant_experts and not eplb_interval:
            raise ValueError("--redundant-experts needs --expert-loads FILE (the copies go to the experts with the "
                             "highest recorded load) or --eplb-interval S (re-planned from the served load)")
        if not redundant_experts:
            return None
        uniform = torch.ones(blocks, cfg.n_routed_experts, dtype=torch.float64)
        return placement_from_slots(plan_placement(uniform, ep, redundant_experts).slots, uniform,
                                    1 + redundant_experts)
    try:
        loads = torch.as_tensor(load_counts(expert_loads))
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # missing, not a tensor file, no expert_counts
        raise ValueError(f"--expert-loads {expert_loads}: cannot read per-expert loads from it "
                         f"({type(e).__name__}: {e}); give a .pt tensor (or dict with 'expert_counts') or .npy "
                         "array of shape (MoE blocks, experts)") from e
    if tuple(loads.shape) != (blocks, cfg.n_routed_experts):
        raise ValueError(f"--expert-loads {expert_loads}: shape {tuple(loads.shape)}, but this model has {blocks} MoE "
                         f"blocks (main layers, then MTP) x {cfg.n_routed_experts} experts")
    plan = plan_placement(loads.double(), ep, redundant_experts)
    return placement_from_slots(plan.slots, loads.double(), 1 + redundant_experts) if eplb_interval else plan


def load_ep_engine(checkpoint: str, *, ep: int, device: str = "auto", keep_fp8: bool = True,
                   cuda_graphs: bool | str | None = None, compile_decode: bool = False, group=None,
                   expert_loads: str | None = None, redundant_experts: int = 0, dp_attention: bool = False,
                   attn_tp: int = 1, ctrl=None, eplb_interval: int = 0, **engine_kwargs):
    """(Engine, DSTokenizer) of this rank: its shard of a checkpoint (or run) directory, the EP dispatcher
    installed in every MoE block, decisions agreed with rank 0. Needs the default process group started
    (torchrun + `dsv3.distributed.init_distributed`) over `ep` ranks (or `group` of ep ranks).
    engine_kwargs go to `Engine`, as for `load_engine`; every rank must pass the same. Rank 0 then wraps
    it in `lockstep.Leader`, the others `lockstep.follow` it.

    dp_attention: each rank its own requests (lockstep.py's DPLeader / follow(dp=True)): the MoE blocks
    dispatch each rank's own tokens by all-to-all, the ranks agree on each step's phases over `ctrl`
    (`lockstep.control_group()`, required) and each keeps its own tokens (no agreement with rank 0).
    attn_tp > 1: attention, dense FFNs and shared experts tensor-parallel (dsv3/distributed/attention_tp.py)
    over all the ranks (attn_tp = ep), or, with dp_attention, over groups of attn_tp consecutive ranks that
    hold the same requests (the paper's prefill layout, TP x DP; the group's tokens are its first rank's);
    1: replicated."""
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
    if dp_attention and ctrl is None:
        raise ValueError("dp_attention needs ctrl, the lockstep control group (lockstep.control_group()), over "
                         "which the ranks agree on each step's phases")
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = ModelConfig.from_json(checkpoint)
    E = cfg.n_routed_experts
    if E == 0 or E % ep:
        raise ValueError(f"ep={ep} does not divide n_routed_experts ({E})" if E else
                         f"ep={ep}: the model has no routed experts to split")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per local rank (init_distributed made it the current device)
        device = f"cuda:{torch.cuda.current_device()}"
    placement = plan_serving_placement(cfg, ep, expert_loads, redundant_experts, eplb_interval)
    if eplb_interval:  # the rebalancer plans from what the engine routes
        engine_kwargs["record_expert_loads"] = True
    tok = DSTokenizer.load(checkpoint)
    mine = local_experts(E, rank, ep) if placement is None else \
        [placement.slots[i, rank].tolist() for i in range(placement.n_layers)]  # this rank's slots per block
    check_modes(dp_attention, cuda_graphs, compile_decode, attn_tp, ep, cfg,
                batch_invariant=engine_kwargs.get("batch_invariant", False))
    tp_group = group  # the ranks that hold the same requests (all of them, without dp_attention)
    if dp_attention and attn_tp > 1:  # groups of attn_tp consecutive ranks; every rank makes every group
        ranks = dist.get_process_group_ranks(group)
        for g in range(R // attn_tp):
            sub = dist.new_group(ranks[g * attn_tp:(g + 1) * attn_tp])
            if rank // attn_tp == g:
                tp_group = sub
    split = None
    if attn_tp > 1:  # read only this rank's tensor-parallel slices
        from dsv3.distributed.attention_tp import install_all_reduces, split_modules

        t = dist.get_rank(tp_group)

        def split(meta_model, dtype):
            return split_modules(meta_model, t, attn_tp, dtype)
    model = load_pretrained(checkpoint, device=device, dtype=torch.float32 if device == "cpu" else None,
                            keep_fp8=keep_fp8, experts=mine, split=split).eval()
    if attn_tp > 1:
        install_all_reduces(model, tp_group)
    # decode steps (at most max_batch_size x (k + 1) tokens, bucketed or not) take the static all-reduce
    # path, larger forwards (prefill) the all-to-all; every rank sees the same N, so they agree
    if model_device(model).type == "cuda" and not engine_kwargs.get("cache_tokens"):
        # the smallest rank's: lockstep needs equal caches (admission decides every rank's batch)
        engine_kwargs["cache_tokens"] = min_over_ranks(gpu_cache_tokens(model), group, model_device(model))
    static = engine_kwargs.get("max_batch_size", 32) * (engine_kwargs.get("speculative_k", 0) + 1)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    placed = []
    for i, m in enumerate(moes):
        layer = None if placement is None else placement.layer(i)
        n = E if layer is None else layer.slots.numel()  # experts, or slots (R x slots per rank)
        if dp_attention and attn_tp == 1:  # each rank its own tokens
            inner = AllToAllDispatcher(group, n)
        elif dp_attention:  # the TP group's tokens, sliced over its ranks; all-to-all over every rank
            inner = ReplicatedTokensDispatcher(group, n, replica_group=tp_group)
        else:
            inner = ReplicatedTokensDispatcher(group, n, static)
        # under dp_attention each group routes its own tokens: offset the copies by the group's index
        m.dispatcher = inner if layer is None else \
            PlacedDispatcher(inner, layer.to(model_device(model)), rank // attn_tp if dp_attention else 0)
        placed.append(m.dispatcher)
    engine = Engine(model, tok, cuda_graphs=bool(graphs_setting(cuda_graphs)), **engine_kwargs)  # auto: off
    if eplb_interval:
        engine.step_hooks.append(Rebalancer(model, checkpoint, placement, placed, rank=rank, ep=ep,
                                            redundant=redundant_experts, interval=eplb_interval, group=group,
                                            sum_over_ranks=dp_attention, replicas=attn_tp if dp_attention else 1))
    if dp_attention:
        sync_phases(engine, ctrl)
        if attn_tp == 1:
            return engine, tok  # each rank's tokens are its own
    return agree_with_rank0(engine, tp_group), tok  # the group's tokens are its first rank's


def run_ep(ep: int, checkpoint: str, engine_kwargs: dict, run: Callable[[Leader, object], int],
           expert_loads: str | None = None, redundant_experts: int = 0, dp_attention: bool = False,
           attn_tp: int = 1, eplb_interval: int = 0) -> int:
    """One rank of an expert-parallel command under torchrun: check the layout before anything starts,
    start the process groups, load this rank's engine (`load_ep_engine(checkpoint, ep=ep, **engine_kwargs)`);
    rank 0 runs `run(leader, tokenizer)` and then tells the others to stop, which follow it until then.
    dp_attention: each rank its own requests (`DPLeader`). Returns the process's exit status; after 0 the
    process groups are gone, their threads joined (`close_groups`)."""
    from dsv3.checkpoints.rundir import resolve_checkpoint
    from dsv3.config import ModelConfig
    from dsv3.distributed.mesh import init_distributed

    checkpoint = resolve_checkpoint(checkpoint)
    cfg = ModelConfig.from_json(checkpoint)
    check_ep(ep, cfg.n_routed_experts)
    check_modes(dp_attention, engine_kwargs.get("cuda_graphs"), engine_kwargs.get("compile_decode", False),
                attn_tp, ep, cfg, batch_invariant=engine_kwargs.get("batch_invariant", False))
    plan_serving_placement(cfg, ep, expert_loads, redundant_experts, eplb_interval)  # errors before any group
    env = init_distributed(engine_kwargs.get("device", "auto"))
    rc = 1
    try:
        # (in a call of its own: what holds a process group, the engine and the leader, goes when it returns)
        rc = _run_rank(env.rank, ep, checkpoint, engine_kwargs, run, expert_loads=expert_loads,
                       redundant_experts=redundant_experts, dp_attention=dp_attention, attn_tp=attn_tp,
                       eplb_interval=eplb_interval)
    finally:
        if rc == 0:  # (else a peer may be gone, or a thread stuck in a collective: just exit)
            close_groups()
    return rc


def _run_rank(rank: int, ep: int, checkpoint: str, engine_kwargs: dict, run: Callable[[Leader, object], int],
              **layout) -> int:
    ctrl = control_group()
    engine, tok = load_ep_engine(checkpoint, ep=ep, ctrl=ctrl, **layout, **engine_kwargs)
    if rank != 0:
        return run_follower(engine, ctrl, dp=layout["dp_attention"], group_size=layout["attn_tp"])
    leader = DPLeader(engine, ctrl, group_size=layout["attn_tp"]) if layout["dp_attention"] else Leader(engine, ctrl)
    try:
        return run(leader, tok)
    finally:
        leader.shutdown()


def close_groups() -> None:
    """Destroy the process groups with nothing else holding them, so that their destructors join their threads
    before the interpreter's teardown.

    A gloo worker thread lets go of a finished collective, and of its tensors, only after the caller's wait()
    has returned; a tensor whose Python object went first has left that object to the C++ side, and freeing it
    takes the GIL. A worker that does so once the interpreter finalizes is ended by Python (pthread_exit) inside
    a noexcept destructor: std::terminate, "terminate called without an active exception", exit -6 after a clean
    stop (about 1 `dsv3 serve --ep 2` shutdown in 25 on 2 busy CPU cores, in the stop broadcast's work).
    ProcessGroupGloo's destructor joins its workers (torch drops the GIL around it), but runs only when the last
    reference to the group goes, and destroy_process_group drops only torch's own: this rank's engine must be
    gone by then (run_ep's `_run_rank` has returned, `serve` lets go of it, and init_distributed keeps
    torch.distributed.nn's defaults off the default group)."""
    import gc

    gc.collect()  # (the engine's expert-load recording hooks hold the model in reference cycles: model/loads.py)
    dist.destroy_process_group()


__all__ = ["PlacedDispatcher", "Rebalancer", "check_ep", "check_modes", "close_groups", "load_ep_engine",
           "plan_serving_placement", "run_ep"]
