"""The torchrun layouts of the training loop (dsv3/training/loop.py, dsv3/training/strategy.py):

    ShardedStrategy     world = dp_shard x ep: FSDP2 (or replicated) non-expert weights, routed experts
                        split over "ep" with all-to-all dispatch (dsv3/distributed/parallelize.py); every
                        rank reads its own rows of each global micro-batch
    PipelineStrategy    world = pp x dp x ep: the layer stack in stages (1F1B / DualPipeV,
                        dsv3/distributed/pipeline.py); every rank reads the whole global batch and takes
                        its rows of each pipeline micro-batch

Both checkpoint through torch.distributed.checkpoint under the model's own names (dsv3/checkpoints/dcp.py),
so any layout resumes any other's checkpoint, and both resume a one-process (run-directory) checkpoint by
reading its global tensors and keeping their part. `distributed_strategy` starts the process group from
torchrun's environment and picks the strategy; without a torchrun world it returns None (one process).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dsv3.distributed.mesh import DistEnv, ParallelConfig, ParallelConfigError, build_mesh, init_distributed
from dsv3.model import update_expert_bias
from dsv3.training.strategy import Strategy, _masters


def resolve_layout(pcfg: ParallelConfig | None, world: int) -> ParallelConfig:
    """Degrees left at 0 are derived from the world size: without a pipeline, neither dp_shard nor ep ->
    dp_shard = world; one of them -> the other = world / it. With pp > 1: ep defaults to 1 and dp_shard to
    world / (pp x ep)."""
    p = ParallelConfig() if pcfg is None else ParallelConfig(**vars(pcfg))
    if pcfg is None:
        p.dp_shard, p.ep = 0, 0
    if p.pp > 1:
        p.ep = p.ep or 1
        p.dp_shard = p.dp_shard or max(world // (p.pp * p.ep), 1)
    elif not p.dp_shard and not p.ep:
        p.dp_shard, p.ep = world, 1
    elif not p.dp_shard:
        p.dp_shard = max(world // p.ep, 1)
    elif not p.ep:
        p.ep = max(world // p.dp_shard, 1)
    return p.validate(world)


def split_backward_takes_functions() -> bool:
    """Whether torch.distributed.pipelining's split backward (stage_backward_weight, used by DualPipeV)
    runs through Python autograd Functions: torch 2.11 fails there ("Attribute '_input_metadata' is
    invalid", measured on the H200 machine's 2.11); 2.13 runs them (tests/distributed/test_compose.py)."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 13)


def dualpipev_refusal(precision: str, schedule: str, flag: str = "--pp-schedule",
                      compile: bool = False) -> str | None:
    """Why this torch cannot train `precision` (with per-block torch.compile if `compile`) under the pipeline
    `schedule` (the caller's option `flag`), or None. DualPipeV's weight pass (stage_backward_weight) starts from the
    first autograd node downstream of both a weight and the stage's input; on torch 2.11 that node must not be a
    Python autograd Function ("Attribute '_input_metadata' is invalid"). The FP8 GEMMs' custom ops are one
    underneath (rechecked 2026-12-07), and so is a compiled block's backward (CompiledFunctionBackward, checked on
    torch 2.11.0's CPU wheel 2026-12-08)."""
    if schedule != "dualpipev" or split_backward_takes_functions():
        return None
    why = (f"needs torch >= 2.13 (this is {torch.__version__}): DualPipeV's separate weight-gradient pass "
           "(torch.distributed.pipelining's stage_backward_weight) cannot run through custom autograd Functions before "
           "it, and ")
    if precision == "fp8":
        return f"{flag} dualpipev with --precision fp8 {why}the FP8 GEMMs are one; use {flag} 1f1b"
    if compile:
        return (f"{flag} dualpipev with --compile {why}a compiled block's backward is one; use {flag} 1f1b, or "
                "leave out --compile")
    return None


def distributed_strategy(pcfg: ParallelConfig | None, device: str = "auto") -> Strategy | None:
    """Start torchrun's process group and return the layout's strategy; None without a torchrun world
    (one process), unless `pcfg` asks for more than one rank (then a clear error)."""
    env = init_distributed(device)
    if env.backend is None:
        if pcfg is not None and (pcfg.pp > 1 or pcfg.dp_shard > 1 or pcfg.ep > 1):
            raise ParallelConfigError(f"the layout (pp {pcfg.pp}, dp_shard {pcfg.dp_shard}, ep {pcfg.ep}) needs "
                                      "several processes: start it with torchrun --nproc-per-node N -m dsv3.cli ...")
        return None
    p = resolve_layout(pcfg, env.world_size)
    return PipelineStrategy(env, p) if p.pp > 1 else ShardedStrategy(env, p)


class _Collective(Strategy):
    """What every torchrun layout shares: the rank's identity and the all-rank reductions."""

    def __init__(self, env: DistEnv, pcfg: ParallelConfig):
        super().__init__(env.device)
        self.env, self.pcfg = env, pcfg
        self.rank, self.world_size = env.rank, env.world_size
        self._flag = torch.zeros(1, device=env.device)

    def layout(self) -> dict:
        return {"world_size": self.world_size, **vars(self.pcfg)}

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        self._flag.fill_(float(flag))
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return bool(self._flag.item() > 0)

    def barrier(self) -> None:
        dist.barrier()


class ShardedStrategy(_Collective):
    """FSDP2 and/or expert parallelism over world = dp_shard x ep ranks (see dsv3/distributed/parallelize.py)."""

    def __init__(self, env: DistEnv, pcfg: ParallelConfig):
        super().__init__(env, pcfg)
        self.data_rank, self.data_world = self.rank, self.world_size
        self.ps = None

    def describe(self) -> str:
        p = self.pcfg
        return f"{self.world_size} ranks (dp_shard {p.dp_shard} x ep {p.ep}, fsdp {p.fsdp})"

    def check_settings(self, settings, precision: str) -> None:
        super().check_settings(settings, precision)
        # FSDP2's form of --bf16-weights: the fp32 shards are the masters, blocks gathered in bf16; the weights
        # outside FSDP (expert slices under EP, every weight with --no-fsdp) keep their masters in the optimizer
        # (make_optimizer leaves DTensors alone), and their gradients are summed in fp32 (finish_grad_sync)
        self.bf16_params = bool(getattr(settings, "bf16_weights", False)) and self.pcfg.fsdp
        micro = getattr(settings, "micro_batch_size", 0) or settings.batch_size
        if micro % self.world_size:
            raise ValueError(f"the micro-batch ({micro} sequences) must be a multiple of the world size "
                             f"({self.world_size}): each rank reads an equal share of it")

    def check_model(self, model_cfg, settings) -> None:
        self.pcfg.validate(self.world_size, model_cfg)

    def parallelize(self, model) -> None:
        from dsv3.distributed.parallelize import parallelize

        self.model = model
        self.ps = parallelize(model, self.pcfg, build_mesh(self.pcfg, self.device.type),
                              bf16_params=getattr(self, "bf16_params", False))

    def finish_backward(self, stats, counts):
        from dsv3.distributed.expert_parallel import global_expert_counts
        from dsv3.distributed.parallelize import finish_grad_sync

        finish_grad_sync(self.ps)
        if stats is not None:  # each rank's loss is the mean over its rows: the global loss is their mean
            dist.all_reduce(stats)
            stats = stats / self.world_size
        if counts is not None:
            counts = global_expert_counts(counts, self.ps.data_group)
        return stats, counts

    def grad_norm(self, opt=None) -> torch.Tensor:
        from dsv3.distributed.parallelize import grad_norm

        return grad_norm(self.model, self.ps)

    def check_generation(self) -> None:
        if self.pcfg.ep > 1:
            raise ParallelConfigError(
                f"generation (GRPO's rollouts) under expert parallelism (ep = {self.pcfg.ep}) is not available: each "
                "rank holds 1/ep of the routed experts and the inference engine has no expert-parallel path; "
                "run with ep = 1 (FSDP2, or replicated weights with --no-fsdp)")

    @contextlib.contextmanager
    def whole_model(self):
        """Replicated weights (fsdp=False): the model itself. FSDP2: a plain copy gathered from the shards
        (one all-gather per tensor, in the same order on every rank), freed when the context exits. A copy
        rather than FSDPModule.unshard(): the unsharded modules' forward hooks would reshard after every
        forward and all-gather again before the next, a collective per decode step, while the ranks'
        generations take different numbers of steps."""
        from torch.distributed.tensor import DTensor

        from dsv3.model import Transformer

        self.check_generation()
        if not any(isinstance(p, DTensor) for p in self.model.parameters()):
            yield self.model
            return
        with torch.device("meta"):
            copy = Transformer(self.model.config)
        copy = copy.to_empty(device=self.device)
        dst, src = copy.state_dict(), self.model.state_dict()
        if set(dst) != set(src):
            raise RuntimeError(f"the sharded model's tensors do not match a plain model's: "
                               f"{sorted(set(dst) ^ set(src))[:5]} (FP8 training modules cannot be copied)")
        with torch.no_grad():
            for name, t in src.items():
                dst[name].copy_(t.full_tensor() if isinstance(t, DTensor) else t)
        copy.init_buffers()
        try:
            yield copy.eval().requires_grad_(False)
        finally:
            del copy, dst

    def save(self, ckpt_root, step, opt, state, *, tokenizer=None, keep=3, final=False) -> str:
        from dsv3.checkpoints.dcp import save_dcp

        with _masters(opt):  # bf16 weights outside FSDP: their fp32 masters are written
            return save_dcp(ckpt_root, step, self.model, opt, self.ps, state, tokenizer=tokenizer, keep=keep,
                            export_hf=final)

    def load(self, path: str, opt) -> dict:
        from dsv3.checkpoints.dcp import is_dcp_checkpoint, load_dcp, load_full_state

        with _masters(opt):
            if is_dcp_checkpoint(path):
                return load_dcp(path, self.model, opt, self.ps)
            return load_full_state(path, self.model, opt, self.ps)


class PipelineStrategy(_Collective):
    """Pipeline stages over world = pp x dp x ep ranks (see dsv3/distributed/pipeline.py). The model comes
    on the meta device (`builds_on_meta`): each rank allocates and initialises its own stages only."""

    reads_global_batch = True
    builds_on_meta = True
    pipelined = True

    def __init__(self, env: DistEnv, pcfg: ParallelConfig):
        super().__init__(env, pcfg)
        from dsv3.distributed.pipeline import PipelineConfig

        n_stages = pcfg.pp if pcfg.pp_schedule == "1f1b" else 2 * pcfg.pp
        self.ppcfg = PipelineConfig(pp=pcfg.pp, schedule=pcfg.pp_schedule,
                                    n_microbatches=pcfg.n_microbatches or n_stages, ep=pcfg.ep, dp=pcfg.dp_shard,
                                    zero=pcfg.fsdp)  # the stages' replicas shard their optimizer state (ZeRO-1)
        self.ps = None
        self._shape = None
        self._compiled = False

    def describe(self) -> str:
        c = self.ppcfg
        dp = f" x dp {c.dp}" if c.dp > 1 else ""
        zero = f", ZeRO-1 over the {c.replicas} replicas of a stage" if c.zero and c.replicas > 1 else ""
        # (pipeline.split_backward_compile: a compiled block's backward is one node, which the weight pass reruns)
        twice = "; the compiled blocks' backward runs twice (DualPipeV's weight pass)" \
            if self._compiled and c.schedule == "dualpipev" else ""
        return (f"{self.world_size} ranks (pp {c.pp} x ep {c.ep}{dp}, {c.schedule}, {c.n_microbatches} micro-batches, "
                f"{c.n_stages} stages{zero}{twice})")

    def check_settings(self, settings, precision: str) -> None:
        super().check_settings(settings, precision)
        n_mb = self.ppcfg.n_microbatches
        if self.pcfg.node_groups:
            raise ValueError("--pp with --node-groups: the node-limited routing check is for the dp x ep layout "
                             "(the stages' ep groups are not checked against the model's expert groups yet)")
        self._compiled = bool(getattr(settings, "compile", False))
        refusal = dualpipev_refusal(precision, self.ppcfg.schedule, compile=self._compiled)
        if refusal:
            raise ValueError(refusal)
        if getattr(settings, "batch_ramp_steps", 0) > 0:
            raise ValueError("--pp needs a fixed batch (static micro-batch shapes): no --batch-ramp-steps")
        mbs = getattr(settings, "micro_batch_size", 0)
        if mbs and mbs != settings.batch_size // n_mb:
            raise ValueError(f"--pp splits the batch into --n-microbatches ({n_mb}) micro-batches; leave "
                             f"--micro-batch-size unset (or {settings.batch_size // n_mb})")
        self._shape = (settings.batch_size, settings.seq_len, getattr(settings, "mtp_lambda", 0.3))
        self._seed = getattr(settings, "seed", 0)

    def check_model(self, model_cfg, settings) -> None:
        self.ppcfg.validate(self.world_size, model_cfg, settings.batch_size)

    def eval_rows(self) -> tuple[int, int]:
        r = self.ppcfg.replicas  # the dp x ep ranks of a stage split the rows
        return self.rank % r, r

    def parallelize(self, model) -> None:
        from dsv3.distributed.pipeline import build_pipeline

        B, T, lam = self._shape
        c = self.ppcfg
        self.ps = build_pipeline(model, c, B // (c.n_microbatches * c.replicas), T, device=self.device, mtp_lambda=lam,
                                 init_seed=self._seed)
        self.model = None  # this rank keeps its stages only

    def module(self) -> torch.nn.Module:
        return self.ps.model_part

    def make_optimizer(self, lr: float, weight_decay: float, *, state_dtype: torch.dtype = torch.float32,
                       bf16_weights: bool = False):
        from dsv3.distributed.pipeline import make_pipeline_optimizer

        return make_pipeline_optimizer(self.ps, lr, weight_decay, state_dtype=state_dtype, bf16_weights=bf16_weights)

    def check_generation(self) -> None:
        raise ParallelConfigError("generation under the pipeline layout is not available: no rank holds the whole model")

    def check_task(self, task) -> None:
        if not getattr(task, "pipeline_loss", False):
            raise ValueError(f"--pp runs pre-training only: the pipeline's loss is the pre-training loss, and "
                             f"{task.name}'s batches (masks, advantages) do not travel through the stages yet")

    def forward_backward(self, task, micro_batches, hp, autocast):
        from dsv3.distributed.pipeline import forward_backward, gathered_loss

        (batch,) = micro_batches
        forward_backward(self.ps, batch, mtp_lambda=hp["mtp_lambda"], balance_alpha=hp["balance_alpha"],
                         autocast=autocast)
        r = gathered_loss(self.ps)
        stats = torch.tensor([r["loss"], r["main"], r["mtp"], r["balance"]])
        counts = None
        if self.ps.n_moe:
            counts = sum(st.counts for st in self.ps.stages)
            dist.all_reduce(counts, group=self.ps.all_group)
        return stats, counts

    def grad_norm(self, opt=None) -> torch.Tensor:
        from dsv3.distributed.pipeline import grad_norm

        return grad_norm(self.ps)

    def update_bias(self, counts: torch.Tensor, gamma: float, applied: torch.Tensor | None = None) -> None:
        rows = [r for r, _ in self.ps.routers]
        if rows and counts is not None:
            update_expert_bias([g for _, g in self.ps.routers], counts[rows], gamma, applied)

    def eval_logits(self, x: torch.Tensor, autocast) -> torch.Tensor | None:
        from dsv3.distributed.pipeline import forward_only

        return forward_only(self.ps, x, autocast=autocast)

    def save(self, ckpt_root, step, opt, state, *, tokenizer=None, keep=3, final=False) -> str:
        from dsv3.checkpoints.dcp import save_dcp

        with _masters(opt):  # bf16 working weights kept by AdamW: their fp32 masters are written
            return save_dcp(ckpt_root, step, self.ps.stages[0], opt, self.ps, state, tokenizer=tokenizer, keep=keep,
                            export_hf=final)

    def load(self, path: str, opt) -> dict:
        from dsv3.checkpoints.dcp import is_dcp_checkpoint, load_dcp, load_full_state

        with _masters(opt):  # the masters filled, the bf16 copies re-derived on exit
            if is_dcp_checkpoint(path):
                return load_dcp(path, self.ps.stages[0], opt, self.ps)
            return load_full_state(path, self.ps.stages[0], opt, self.ps)


__all__ = ["PipelineStrategy", "ShardedStrategy", "distributed_strategy", "resolve_layout"]
