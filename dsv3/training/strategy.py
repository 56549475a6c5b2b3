"""A layout of a training run: how the model is prepared, how one optimizer step's gradients are made,
how evaluation is summed and how checkpoints are written and read. The loop (dsv3/training/loop.py) is
the same for every layout; one process is the world-size-1 case of it.

    Strategy (this file)          one process: the whole model, run-directory checkpoints (Hugging Face
                                  format + optimizer / sampler / RNG state), also resumes sharded ones
    ShardedStrategy               torchrun, FSDP2 and/or expert parallelism (dsv3/distributed/strategy.py)
    PipelineStrategy              torchrun, pipeline stages (1F1B / DualPipeV), alone or x EP x DP

What a strategy does for the loop (a task, e.g. pre-training or SFT, supplies data and loss):

    prepare(model, settings)      the one preparation sequence: recomputation, FP8 module swap,
                                  per-block compile, then the layout's own parallelisation
    forward_backward(task, mbs, hp) -> (stats, counts)   gradients of the global mean loss in every
                                  local parameter; stats (k,) the task's step statistics averaged over
                                  the ranks; counts the global expert loads (or None)
    make_optimizer(lr, wd, ...)   the optimizer over module() (the pipeline's ZeRO-1: over its masters)
    grad_norm(opt)                the global L2 norm of the gradients, each parameter once, on the device
    routers()                     this rank's routers with their rows in the global (L_moe, E) counts
    eval_logits(x)                logits of this rank's rows, or None where the rank has no output head
    whole_model()                 a module with the whole current weights on this rank, for generation
                                  (GRPO's rollouts); check_generation() raises where a layout has none
    all_reduce_sum(t) / any(flag) sums over the ranks (evaluation, the Ctrl-C stop flag)
    save(...) / load(...)         checkpoints under the model's own parameter names

Precision (`precision_recipe`, the only place it is decided): fp32; bf16 = fp32 master weights under
`torch.autocast(bfloat16)` (CPU autocast included: slow there, but the same arithmetic as on GPUs, so the
layouts can be checked against each other on the CPU); fp8 = bf16 autocast on CUDA (fp32 on the CPU) with
the paper's block-scaled FP8 GEMMs (dsv3/training/fp8.py; an exact emulation on the CPU).

bf16 working weights (`--bf16-weights`, one process): with bf16 (or fp8) the optimizer stores the GEMM weights
(dsv3.training.optim.bf16_weight_params) in bf16 and keeps their fp32 masters itself (AdamW's `masters`);
autocast stays on (the embedding's fp32 output is the residual stream, as without the flag) and its casts
of those weights become no-ops. `save` / `load` run inside `opt.masters_as_params()`, so checkpoints hold
the fp32 masters, as in fp32-weight training. With fp8 the same (the FP8 modules quantise the bf16 weights and
write bf16 weight gradients; autocast on the CPU too); `check_weights` refuses fp32. Every torchrun layout
takes it: under FSDP2 the sharded weights take fully_shard's own form (the fp32 shards are the masters, a plain
AdamW on them; each block is all-gathered in bf16 and its gradients reduce-scattered in fp32:
MixedPrecisionPolicy), and the weights outside FSDP (expert slices under EP, every weight with --no-fsdp) keep
their masters in the optimizer, their gradients summed in fp32 (dsv3/distributed/parallelize.py); the pipeline's
ZeRO-1 chunks are the masters of the weights they shard (dsv3/distributed/zero.py). Checkpoints hold the masters.

The optimizer is the same for every layout (dsv3.training.optim.AdamW over `module()`): the loop computes
the clip coefficient from `grad_norm(opt)` and passes it to the AdamW step, which applies it inside the update.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from dsv3.model import update_expert_bias
from dsv3.training.optim import global_norm, make_optimizer

PRECISIONS = ("auto", "fp32", "bf16", "fp8")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def precision_recipe(precision: str, device: torch.device, bf16_weights: bool = False):
    """-> a factory of the autocast context for `precision` (resolved) on `device`. fp8 runs under bf16 autocast on
    CUDA, and on the CPU too with bf16 working weights (their non-FP8 GEMMs, e.g. the output head, need bf16
    activations); plain CPU fp8 stays fp32 around the FP8 GEMMs (the emulation's exact arithmetic, faster)."""
    if precision == "bf16" or (precision == "fp8" and (device.type == "cuda" or bf16_weights)):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def prepare_model(model, strategy, *, precision: str, recompute: str = "none", fp8_experts: bool = False,
                  fp8_recompute_weights: str = "auto", compile: bool = False, log=print) -> None:
    """The one preparation sequence, in place, for every layout: activation recomputation, the FP8
    training module swap (before compile and sharding: FSDP2 then shards the FP8 modules' fp32 masters),
    per-block torch.compile (state-dict names unchanged), then the layout's own parallelisation."""
    model.set_recompute(recompute)
    if precision == "fp8":
        from dsv3.training.fp8 import convert_to_fp8_training

        # auto: on for a pipeline, whose stages keep one copy per micro-batch in flight (TrainConfig's note)
        pipelined = getattr(strategy, "pipelined", False)
        rw = fp8_recompute_weights == "on" or (fp8_recompute_weights == "auto" and pipelined)
        n = len(convert_to_fp8_training(model, experts=fp8_experts, recompute_weights=rw))
        log(f"fp8: {n} modules in FP8 (attention, dense/shared MLPs{', routed experts' if fp8_experts else ''}"
            f"{'; weights re-quantised in backward' if rw else ''})")
    if compile:
        for blk in list(model.layers) + list(model.mtp):
            blk.compile()
    strategy.parallelize(model)


def check_weights(settings, precision: str) -> None:
    """Raise unless `settings.bf16_weights` (when set) fits the resolved `precision` (bf16, or fp8: the FP8
    modules quantise the bf16 weights as they would the fp32 ones, and write bf16 weight gradients)."""
    if not getattr(settings, "bf16_weights", False) or precision in ("bf16", "fp8"):
        return
    raise ValueError(f"--bf16-weights needs --precision bf16 or fp8 (this run's precision is {precision}"
                     f"{'; auto means fp32 on the CPU' if getattr(settings, 'precision', '') == 'auto' else ''}): "
                     "the bf16 copies are what bf16 autocast would compute with")


def _masters(opt):
    """`opt.masters_as_params()` (bf16 working weights: the fp32 masters in the parameters), else nothing."""
    return opt.masters_as_params() if getattr(opt, "masters", None) else contextlib.nullcontext()


class Strategy:
    """One process, the whole model (the world-size-1 layout)."""

    name = "one process"
    reads_global_batch = False  # True: every rank reads the whole global batch (the pipeline)
    pipelined = False  # True: several micro-batches in flight between their forward and backward (the pipeline)
    builds_on_meta = False  # True: the model is built on the meta device, parallelize() allocates this rank's part

    def __init__(self, device: torch.device):
        self.device = device
        self.rank, self.world_size = 0, 1
        self.data_rank, self.data_world = 0, 1  # this rank reads rows [r·b, (r+1)·b) of every micro-batch
        self.model = None

    @classmethod
    def of(cls, model) -> "Strategy":
        """The one-process strategy around an already built model (e.g. to evaluate a loaded checkpoint)."""
        s = cls(next(model.parameters()).device)
        s.parallelize(model)
        return s

    @property
    def is0(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return self.name

    def layout(self) -> dict:
        return {"world_size": 1}

    # --- model ----------------------------------------------------------------------------------
    def parallelize(self, model) -> None:
        self.model = model

    def module(self) -> torch.nn.Module:
        """The module whose parameters this rank optimises (and checkpoints)."""
        return self.model

    def make_optimizer(self, lr: float, weight_decay: float, *, state_dtype: torch.dtype = torch.float32,
                       bf16_weights: bool = False):
        """The run's optimizer over `module()` (dsv3.training.optim.make_optimizer: dsv3's AdamW); with
        `bf16_weights` it keeps the fp32 masters of the bf16 weights (not of FSDP2's DTensors: their fp32 shards
        are the masters). The pipeline layout under ZeRO-1 builds it over its masters instead."""
        return make_optimizer(self.module(), lr, weight_decay, state_dtype=state_dtype, bf16_weights=bf16_weights)

    def check_settings(self, settings, precision: str) -> None:
        """Raise if this layout cannot run with these settings (the reason in the message)."""
        check_weights(settings, precision)

    def check_model(self, model_cfg, settings) -> None:
        """Raise if this layout does not fit the model (e.g. ep does not divide the experts)."""

    def check_task(self, task) -> None:
        """Raise if this layout cannot run `task` (the reason in the message)."""

    def eval_rows(self) -> tuple[int, int]:
        """(rank, world) of this rank's share of the validation rows."""
        return self.data_rank, self.data_world

    def train(self, mode: bool = True) -> None:
        self.module().train(mode)

    # --- the step -------------------------------------------------------------------------------
    def forward_backward(self, task, micro_batches: list, hp: dict, autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of every micro-batch (gradients accumulate); returns the mean of the
        task's statistics over the micro-batches and the summed expert counts."""
        stats, counts = None, None
        n = len(micro_batches)
        for mb in micro_batches:
            with autocast():
                out = self.model(**task.model_inputs(mb, hp))
            loss, s = task.loss(out, mb, hp)
            (loss / n).backward()
            stats = s / n if stats is None else stats + s / n
            c = out.expert_counts
            if c is not None:
                counts = c if counts is None else counts + c
        return self.finish_backward(stats, counts)

    def finish_backward(self, stats, counts):
        return stats, counts

    def grad_norm(self, opt=None) -> torch.Tensor:
        """The global gradient norm. With `opt`, over its parameters in its groups' order: the order of the
        per-tensor norms' sum is torch.nn.utils.clip_grad_norm_'s on the same list, so the clip coefficient
        (and so a whole one-process run) is bitwise what a torch clip + AdamW step gives."""
        params = self.module().parameters() if opt is None else [p for g in opt.param_groups for p in g["params"]]
        return global_norm(params)

    def update_bias(self, counts: torch.Tensor, gamma: float, applied: torch.Tensor | None = None) -> None:
        """The aux-loss-free bias update of this rank's routers from the global loads (L_moe, E); where the
        0-dim bool device tensor `applied` is False (a skipped step) the biases stay as they are."""
        routers = self.model.routers()
        if routers and counts is not None:
            update_expert_bias(routers, counts, gamma, applied)

    # --- evaluation and agreement ---------------------------------------------------------------
    def eval_logits(self, x: torch.Tensor, autocast) -> torch.Tensor | None:
        with autocast():
            return self.model(x, with_mtp=False).logits

    def check_generation(self) -> None:
        """Raise if this layout cannot give the inference engine the whole weights (the reason in the message)."""

    @contextlib.contextmanager
    def whole_model(self):
        """A context giving a module that holds the whole current weights on this rank, for the inference
        engine (a collective where the weights are sharded). One process: the model itself."""
        self.check_generation()
        yield self.model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def log(self, log):
        """`log` on rank 0, a no-op elsewhere."""
        return log if self.is0 else (lambda *a, **k: None)

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, ckpt_root: str, step: int, opt, state: dict, *, tokenizer=None, keep: int = 3,
             final: bool = False) -> str:
        """A run-directory checkpoint: a Hugging Face-format model directory plus optimizer (by
        parameter name), sampler and RNG state (dsv3/checkpoints/rundir.py)."""
        from dsv3.checkpoints import rundir

        with _masters(opt):  # bf16 working weights: the fp32 masters are written
            return rundir.save_checkpoint(ckpt_root, step, self.model, opt, state, tokenizer=tokenizer, keep=keep)

    def load(self, path: str, opt) -> dict:
        """Fill the model and the optimizer from checkpoint `path` (either kind), restore the RNG; returns
        the trainer state (step, tokens, sampler, ...)."""
        from dsv3.checkpoints import dcp, rundir

        with _masters(opt):  # bf16 working weights: the masters are filled, the bf16 copies re-derived on exit
            if dcp.is_dcp_checkpoint(path):
                return dcp.load_dcp_local(path, self.model, opt)
            return rundir.load_into(path, self.model, opt)


def checkpoint_config(path: str):
    """The model config a checkpoint (either kind) was written with."""
    from dsv3.checkpoints import dcp
    from dsv3.config import ModelConfig

    if dcp.is_dcp_checkpoint(path):
        return ModelConfig.from_dict(dcp.read_state(path)["model_config"])
    from dsv3.checkpoints.files import CheckpointError

    f = os.path.join(path, "config.json")
    cfg = ModelConfig.from_json(f)  # (its errors: missing, not JSON, not a valid config)
    with open(f, encoding="utf-8") as fh:
        raw = json.load(fh)
    # dsv3 writes every size; one left out would build the 671B default's (a resume then failed as "the model
    # needs 39.1 GB", a sample as a shape mismatch with a size the file never said)
    gone = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if k not in raw]
    if gone:
        raise CheckpointError(f"{f} has no {', '.join(gone)}: a checkpoint's config names the model's sizes")
    return cfg


__all__ = ["PRECISIONS", "Strategy", "check_weights", "checkpoint_config", "global_norm", "precision_recipe", "prepare_model",
           "resolve_precision"]
