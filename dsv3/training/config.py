"""Settings of a pre-training run: one dataclass, whose fields are also the defaults of `dsv3 train`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    data: str | None = None  # directory / file / .jsonl; None: the Python standard library
    # more corpora used for training only (all their documents; validation stays on `data`'s split)
    extra_data: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # tokenizer.json or directory; None: train a BPE of the model's vocab size
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "DSV3_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dsv3")))
    steps: int = 300
    tokens: int = 0  # if > 0, overrides steps: steps = ceil(tokens / (batch_size * seq_len))
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step (global)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = batch_size (no accumulation)
    lr: float = 3e-3
    warmup_steps: int = -1  # -1: 5% of the steps, at most 2000 (the paper's 2K)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    bias_gamma: float = 0.001
    balance_alpha: float = 1e-4
    batch_ramp_steps: int = 0
    batch_start: int = 0
    fim_rate: float = 0.1
    val_permille: int = 10
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 (autocast, CUDA) | fp8 (bf16 autocast + FP8 GEMMs, dsv3/training/fp8.py) | auto
    fp8_experts: bool = False  # with fp8: the routed experts' grouped GEMMs in FP8 as well
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8  # per periodic eval; the final eval covers the whole val split
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    resume: bool = False
    progress: bool = True
    compile: bool = False  # torch.compile each block (1.2-1.6x training speed on an H100, bench/RESULTS.md)
    recompute: str = "none"  # none | selective (RMSNorms + MLA up-projections, paper §3.2.2) | full (per block)
    optim_state_dtype: str = "fp32"  # fp32 | bf16 (AdamW moments stored in bf16, paper §3.3)

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_size"):
            if getattr(self, name) <= 0 and not (name == "steps" and self.tokens > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({mb})")
        if self.batch_start and self.batch_start % mb:
            raise ValueError(f"batch_start ({self.batch_start}) must be a multiple of micro_batch_size ({mb})")
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp8, got {self.precision!r}")
        if self.fp8_experts and self.precision != "fp8":
            raise ValueError(f"fp8_experts (--fp8-experts) needs precision fp8, got {self.precision!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be none, selective or full, got {self.recompute!r}")
        if self.optim_state_dtype not in ("fp32", "bf16"):
            raise ValueError(f"optim_state_dtype must be fp32 or bf16, got {self.optim_state_dtype!r}")
        if self.log_every < 1:  # the loop logs at step % log_every == 0
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return dev
