"""Settings of a pre-training run: one dataclass, whose fields are also the defaults of `dsv3 train`."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from dsv3.cliargs import setting
from dsv3.config import resolve_device  # noqa: F401  (here too: training's callers import it from this module)

# consecutive non-finite (skipped) steps after which a run stops (dsv3/training/loop.py NonFiniteGuard)
MAX_SKIPPED_STEPS = 10


def default_cache_dir() -> str:
    """$DSV3_CACHE, else ~/.cache/dsv3: trained tokenizers (tokenizers/) and token caches (tokens/)."""
    return os.environ.get("DSV3_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dsv3"))


@dataclass
class TrainConfig:
    """Each field is also a `dsv3 train` flag (dsv3/cliargs.py): `--seq-len` for seq_len, its help from
    the metadata, its default this one. The one CLI-only default is out_dir's documented cli_default."""
    # the CLI leaves it unset (None) and uses runs/PRESET (runs/custom with --config)
    out_dir: str = setting("runs/tiny", "run directory (default: runs/PRESET; runs/custom with --config)",
                           cli_default=None)
    data: str | None = setting(None, "directory, text file or .jsonl (default: the Python standard library)")
    # all of their documents are used for training; validation stays on `data`'s held-out split
    extra_data: list[str] = setting(factory=list, metavar="PATH",
                                    help="more training-only data (repeatable); validation stays on --data's "
                                         "held-out split")
    tokenizer: str | None = setting(None, "tokenizer.json or a directory holding one (default: train a BPE of "
                                          "the model's vocab size)")
    cache_dir: str = setting(factory=default_cache_dir,
                             help="where trained tokenizers and token caches go ($DSV3_CACHE, else ~/.cache/dsv3)")
    steps: int = setting(850, "optimizer steps")
    tokens: int = setting(0, "if > 0, train for this many tokens instead of --steps "
                             "(steps = ceil(tokens / (batch size x seq len)))")
    seq_len: int = setting(256, "tokens per sequence")
    batch_size: int = setting(8, "sequences per optimizer step (global)")
    micro_batch_size: int = setting(0, "sequences per forward/backward (gradient accumulation); 0: the batch size")
    lr: float = setting(3e-3, "peak learning rate")
    warmup_steps: int = setting(-1, "warm-up steps; -1: 5% of the steps, at most 2000 (the paper's 2K)")
    # dsv3/training/optim.py; the paper's context-extension stages: --schedule constant --lr 7.3e-6 --warmup-steps 0
    schedule: str = setting("paper", "learning-rate schedule: paper = pre-training's warm-up, constant, cosine and "
                                     "tails; constant = warm-up, then --lr (and --mtp-lambda, --bias-gamma) for the "
                                     "whole run", choices=("paper", "constant"))
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    mtp_lambda: float = setting(0.3, "MTP loss weight (the paper's 0.3 for its first 10T of 14.8T tokens)")
    mtp_lambda_late: float = setting(0.1, "MTP loss weight after 10/14.8 of the steps (the paper's 0.1)")
    bias_gamma: float = setting(0.001, "aux-loss-free bias update speed")
    balance_alpha: float = setting(1e-4, "sequence-wise balance loss weight")
    batch_ramp_steps: int = setting(0, "ramp the batch size over these steps")
    batch_start: int = setting(0, "sequences per step at the start of the ramp")
    fim_rate: float = setting(0.1, "fill-in-the-middle rate")
    # 3%: about 20 files of the stdlib, enough for a headline figure that represents Python
    val_permille: int = setting(30, "held-out validation split, per mille of the corpus (by a hash of each file's "
                                    "path)")
    device: str = setting("auto", "auto | cpu | cuda")
    # bf16: autocast (CUDA); fp8: bf16 autocast + FP8 GEMMs (dsv3/training/fp8.py)
    precision: str = setting("auto", "compute precision; fp8: the paper's FP8 GEMMs (emulated, slowly, on the CPU)",
                             choices=("auto", "fp32", "bf16", "fp8"))
    fp8_experts: bool = setting(False, "with --precision fp8: the routed experts' grouped GEMMs in FP8 too "
                                       "(Triton; slower than bf16 on an H100 today, bench/RESULTS.md)")
    # measured (bench/RESULTS.md, fourteenth session): the same gradients bit for bit; on the 671b-slice 1-6% more step
    # time for 0.9-1.9 GiB (FP8) / 3.3 GiB (FP8 experts) less peak memory in one process; a pipeline stage keeps
    # one copy per micro-batch in flight (27.7 GiB on the worst rank of the paper's layout, `dsv3 plan
    # --fp8-weight-copies dense`), hence on there by default
    fp8_recompute_weights: str = setting("auto", "with --precision fp8: backward quantises the weights again for its "
                                                 "input gradients instead of keeping their FP8 copies from the "
                                                 "forward (1 byte a parameter less per micro-batch in flight, one "
                                                 "more read of the weights); auto: on with a pipeline (--pp > 1)",
                                         choices=("auto", "on", "off"))
    # dsv3/training/optim.py AdamW(masters=...): the GEMM weights in bf16, their fp32 masters in the optimizer;
    # checkpoints hold the masters (one process; the torchrun layouts refuse it, README)
    bf16_weights: bool = setting(False, "with --precision bf16 or fp8: store the GEMM weights in bf16 (no per-step "
                                        "casts, bf16 weight gradients) and keep fp32 master weights in the optimizer")
    seed: int = setting(0, "random seed (initialisation, data order)")
    # what it changes on a GPU and what it costs: bench/RESULTS.md (issue 15); on the CPU runs are reproducible anyway
    deterministic: bool = setting(False, "reproducible GPU runs: the same seed gives the same losses bit for bit "
                                         "(deterministic algorithms only, an op without one is an error naming it; "
                                         "slower)")
    eval_every: int = setting(100, "validation every N steps (0: only at the end)")
    eval_batches: int = setting(8, "batches per periodic validation; the final one covers the whole val split")
    save_every: int = setting(100, "checkpoint every N steps (0: only at the end)")
    keep: int = setting(3, "checkpoints kept, the latest ones (0: all)")
    # --no-checkpoints: for benchmarks that need only the metrics (a `small` checkpoint with AdamW state is ~12 GB)
    checkpoints: bool = setting(True, "write no checkpoints, not even the final one: the run keeps metrics.jsonl "
                                      "and summary.json only (it cannot be resumed or sampled)")
    log_every: int = setting(1, "log every N steps")
    # a skipped step changes nothing (weights, AdamW state, router biases); the stop is noticed at the next
    # logged step and saves the state from before the first skipped step (dsv3/training/loop.py)
    max_skipped_steps: int = setting(MAX_SKIPPED_STEPS, "stop after this many consecutive steps with a non-finite "
                                                        "loss or gradient norm (each is skipped); 0: never stop")
    resume: bool = setting(False, "continue from the run directory's latest checkpoint")
    # a new run (in out_dir) from a trained checkpoint's weights: continued training, context extension
    # (paper §4.3; dsv3/training/extend.py)
    init_from: str | None = setting(None, "start a new run from this checkpoint's weights (a checkpoint directory, "
                                          "or a run directory: its latest checkpoint), with its model config and "
                                          "tokenizer; optimizer, step and data position start fresh",
                                    metavar="CHECKPOINT")
    rope_factor: float = setting(0.0, "with --init-from: the YaRN scale factor s of the new stage (paper: 40); "
                                      "max_position_embeddings becomes s x the original length; 0: keep the "
                                      "checkpoint's rope settings")
    rope_original_len: int = setting(0, "with --rope-factor: YaRN's original context L0; 0: the checkpoint's "
                                        "(its rope_scaling's, else the seq len its run trained at)")
    progress: bool = setting(True, "no progress bars")  # the flag is --no-progress
    plots: bool = setting(True, "no PNG plots (loss, expert load) at the end of the run")  # --no-plots
    # 1.2-1.6x training speed on an H100 (bench/RESULTS.md)
    compile: bool = setting(False, "torch.compile each block (faster on GPUs)")
    recompute: str = setting("none", "activation recomputation: selective = RMSNorms + MLA up-projections "
                                     "(paper §3.2.2), full = per block", choices=("none", "selective", "full"))
    optim_state_dtype: str = setting("fp32", "storage dtype of the AdamW moments (the paper keeps them in bf16, "
                                             "§3.3)", choices=("fp32", "bf16"))

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_size"):
            if getattr(self, name) <= 0 and not (name == "steps" and self.tokens > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:  # (torch's and numpy's generators take no other)
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")
        if self.micro_batch_size < 0:  # (a negative one passed the multiple test and failed later, in the sampler,
            #                            as "the global batch_size=-2 ...", after the tokenizer and the token cache)
            raise ValueError(f"micro_batch_size must be >= 0 (0: the batch size), got {self.micro_batch_size}")
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({mb})")
        if self.batch_start > self.batch_size:  # the ramp grows the batch up to batch_size (it shrank it, and the
            #                                     first steps ran more rows than the global batch)
            raise ValueError(f"batch_start ({self.batch_start}) must be <= batch_size ({self.batch_size})")
        if self.batch_start and self.batch_start % mb:
            raise ValueError(f"batch_start ({self.batch_start}) must be a multiple of micro_batch_size ({mb})")
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp8, got {self.precision!r}")
        if self.fp8_experts and self.precision != "fp8":
            raise ValueError(f"fp8_experts (--fp8-experts) needs precision fp8, got {self.precision!r}")
        if self.fp8_recompute_weights not in ("auto", "on", "off"):
            raise ValueError(f"fp8_recompute_weights must be auto, on or off, got {self.fp8_recompute_weights!r}")
        if self.fp8_recompute_weights != "auto" and self.precision != "fp8":
            raise ValueError(f"fp8_recompute_weights (--fp8-recompute-weights {self.fp8_recompute_weights}) needs "
                             f"precision fp8, got {self.precision!r}")
        if self.bf16_weights and self.precision not in ("auto", "bf16", "fp8"):  # auto: checked once resolved
            from dsv3.training.strategy import check_weights

            check_weights(self, self.precision)
        if not (math.isfinite(self.lr) and self.lr > 0):  # (NaN passes a plain `<= 0` test)
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "mtp_lambda", "mtp_lambda_late", "bias_gamma", "balance_alpha"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                what = " (0: no clipping)" if name == "grad_clip" else ""
                raise ValueError(f"{name} must be a finite number >= 0{what}, got {v}")
        # (checked by build_token_cache too, but only after a BPE had been trained on the corpus)
        if not 0.0 <= self.fim_rate <= 1.0:  # (NaN fails it)
            raise ValueError(f"fim_rate must be in [0, 1], got {self.fim_rate}")
        if not 0 <= self.val_permille <= 1000:
            raise ValueError(f"val_permille must be in [0, 1000], got {self.val_permille}")
        for name in ("tokens", "batch_ramp_steps", "batch_start", "eval_every", "save_every", "keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < -1:
            raise ValueError(f"warmup_steps must be >= 0 (or -1: 5% of the steps), got {self.warmup_steps}")
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {self.eval_batches}")
        if not math.isfinite(self.rope_factor):
            raise ValueError(f"rope_factor must be a finite number, got {self.rope_factor}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be none, selective or full, got {self.recompute!r}")
        if self.optim_state_dtype not in ("fp32", "bf16"):
            raise ValueError(f"optim_state_dtype must be fp32 or bf16, got {self.optim_state_dtype!r}")
        if self.log_every < 1:  # the loop logs at step % log_every == 0
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.schedule not in ("paper", "constant"):
            raise ValueError(f"schedule must be paper or constant, got {self.schedule!r}")
        if self.init_from and self.resume:
            raise ValueError("init_from (--init-from) starts a new run from a checkpoint's weights; resume (--resume) "
                             "continues this run: give one of them")
        if self.rope_factor and not self.init_from:
            raise ValueError("rope_factor (--rope-factor) needs init_from (--init-from): a run from scratch takes its "
                             "rope settings from its model config")
        if self.rope_factor and self.rope_factor < 1:
            raise ValueError(f"rope_factor must be >= 1 (or 0: keep the checkpoint's), got {self.rope_factor}")
        if self.rope_original_len and not self.rope_factor:
            raise ValueError("rope_original_len (--rope-original-len) needs rope_factor (--rope-factor)")
        if self.rope_original_len < 0:
            raise ValueError(f"rope_original_len must be >= 0, got {self.rope_original_len}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {self.max_skipped_steps}")


def check_common(cfg) -> None:
    """The settings the post-training commands share with pre-training's (TrainConfig.validate checks its own),
    each where `cfg` has it: a finite positive learning rate (an infinite one trained NaN weights into a saved
    checkpoint, with exit status 0), finite non-negative decay and clip, a seed torch takes, non-negative step
    counts and intervals, log_every >= 1 (the loop logs at step % log_every == 0)."""
    def has(name):
        return hasattr(cfg, name)

    if has("lr") and not (math.isfinite(cfg.lr) and cfg.lr > 0):  # (NaN passes a plain `<= 0` test)
        raise ValueError(f"lr must be a finite number > 0, got {cfg.lr}")
    if has("min_lr") and not (math.isfinite(cfg.min_lr) and 0 < cfg.min_lr <= cfg.lr):
        raise ValueError(f"min_lr must be a finite number in (0, lr = {cfg.lr}], got {cfg.min_lr}")
    for name in ("weight_decay", "grad_clip"):
        if has(name) and not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            what = " (0: no clipping)" if name == "grad_clip" else ""
            raise ValueError(f"{name} must be a finite number >= 0{what}, got {getattr(cfg, name)}")
    if has("seed") and not 0 <= cfg.seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {cfg.seed}")
    for name in ("steps", "warmup_steps", "micro_batch_size", "save_every", "keep", "eval_every"):
        if has(name) and getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if has("log_every") and cfg.log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {cfg.log_every}")


# What a resumed run (--resume) keeps from its checkpoint unless the command line gives it again: the
# settings that define the run (data, length, batch, optimizer, schedule, precision, checkpointing). The
# others (where it runs, caches, progress bars, plots) are the new invocation's.
RUN_FIELDS = ("data", "extra_data", "tokenizer", "steps", "tokens", "seq_len", "batch_size", "micro_batch_size",
              "lr", "warmup_steps", "schedule", "weight_decay", "grad_clip", "mtp_lambda", "mtp_lambda_late",
              "bias_gamma", "balance_alpha", "batch_ramp_steps", "batch_start", "fim_rate", "val_permille",
              "precision", "fp8_experts", "fp8_recompute_weights", "bf16_weights", "seed", "deterministic",
              "eval_every", "eval_batches", "save_every", "keep", "log_every", "max_skipped_steps", "compile",
              "recompute", "optim_state_dtype")


def _not_a(default, v) -> str | None:
    """What a saved setting `v` should be, going by its field's default (None where it is that)."""
    if isinstance(default, bool):
        return None if isinstance(v, bool) else "true or false"
    if isinstance(default, int):
        return None if type(v) is int else "an integer"
    if isinstance(default, float):
        return None if type(v) in (int, float) else "a number"
    if isinstance(default, list):
        return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "a list of strings"
    if isinstance(default, str):
        return None if isinstance(v, str) else "a string"
    return None if v is None or isinstance(v, str) else "a string or null"


def resumed_config(tc: TrainConfig, saved: dict, given: set[str],
                   source: str = "trainer_state.json") -> tuple[TrainConfig, dict]:
    """The config of a resumed run: `tc` (the command line's) with every RUN_FIELDS setting that the
    command line did not give (`given`: field names) taken from the run's saved config `saved` (its
    checkpoint's train_config, read from `source`: a value of the wrong type is a ValueError naming it).
    Returns (config, {field: (saved, new)} for the given ones that differ)."""
    keep = {k: saved[k] for k in RUN_FIELDS if k in saved and k not in given}
    for k, v in keep.items():
        kind = _not_a(getattr(tc, k), v)
        if kind:
            raise ValueError(f"{source}: train_config.{k} = {v!r} is not {kind}")
    changed = {k: (saved[k], getattr(tc, k)) for k in RUN_FIELDS if k in saved and k in given
               and saved[k] != getattr(tc, k)}
    return dataclasses.replace(tc, **keep), changed


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """--deterministic for the duration of a run: PyTorch's deterministic algorithms (an op that has none
    raises, naming itself) and cuDNN's deterministic kernels, both restored after the run; and the fixed
    cuBLAS workspace that deterministic cuBLAS needs, CUBLAS_WORKSPACE_CONFIG, which stays set for the process
    (`dsv3 train` runs nothing on CUDA before this, so it is set before the first GEMM creates the cuBLAS
    handle, on every rank; a value the user exported is kept). dsv3's own kernels use no atomics (the MoE
    dispatch and combine are gathers, dsv3/model/moe.py) and no run-time autotuning. Measured on an H200
    (bench/RESULTS.md): without it two runs of `small` with one seed part within the first steps and end 1.8%
    apart in validation loss after 1,000 steps; with it two compiled bf16 runs of `small` were equal bit for
    bit over 150 steps, ~10% slower. tests/test_gpu_determinism.py checks eager bf16, eager FP8 and compiled
    bf16 on a micro model; compiled FP8, --fp8-experts and several GPU ranks are not checked (two torchrun
    ranks with FSDP on the CPU, gloo, repeat bit for bit)."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


