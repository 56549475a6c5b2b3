"""Training losses (SPEC §4.3, §5.3):

    L = CE(main) + (λ/D)·Σ_k L_MTP^k + α·Σ_layers L_Bal

* CE(main): mean next-token cross-entropy over the valid targets (label -100 is ignored).
* L_MTP^k: the depth-k module at position i predicts targets[i+k]; its summed cross-entropy is
  divided by the number of valid *main* targets, i.e. by T per sequence and not by T-k (eq. 25).
* L_Bal: the complementary sequence-wise balance term from the model (`ModelOutput.balance`,
  already summed over MoE layers); α = 1e-4 in the paper, 0 disables it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3.model.transformer import ModelOutput

IGNORE = -100


@dataclass
class LossParts:
    total: torch.Tensor
    main: torch.Tensor  # next-token CE
    mtp: torch.Tensor | None  # (λ/D)·Σ_k L_MTP^k, before being added
    mtp_per_depth: list[torch.Tensor]  # L_MTP^k without λ/D, for logging
    balance: torch.Tensor | None  # α·L_Bal


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


_ce_sum_compiled = None


def _ce_sum_fused(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """_ce_sum through torch.compile: the fp32 upcast, log-softmax and gather fuse into one pass over the
    bf16 logits and the backward writes the bf16 gradient directly (eager: an fp32 copy of the logits,
    a log-softmax output and its gradient, ~4 passes over B·T·V fp32). Same math."""
    global _ce_sum_compiled
    if _ce_sum_compiled is None:
        _ce_sum_compiled = torch.compile(_ce_sum, dynamic=None)
    return _ce_sum_compiled(logits, targets)


def compute_loss(out: ModelOutput, targets: torch.Tensor, mtp_lambda: float = 0.3,
                 balance_alpha: float = 0.0, compiled: bool = False) -> LossParts:
    """targets (B, T): the input shifted left by one (targets[:, i] = token i+1), IGNORE where masked.
    compiled: the cross-entropies through torch.compile (`_ce_sum_fused`; CUDA training with --compile)."""
    n_valid = (targets != IGNORE).sum().clamp_min(1)
    ce = _ce_sum_fused if compiled and out.logits.is_cuda else _ce_sum
    main = ce(out.logits, targets) / n_valid
    total = main
    per_depth = []
    for k, lg in enumerate(out.mtp_logits, start=1):
        per_depth.append(ce(lg, targets[:, k:]) / n_valid)  # divided by T, not T-k
    mtp = None
    if per_depth and mtp_lambda > 0:
        mtp = (mtp_lambda / len(per_depth)) * torch.stack(per_depth).sum()
        total = total + mtp
    balance = None
    if balance_alpha > 0 and out.balance is not None:
        balance = balance_alpha * out.balance
        total = total + balance
    return LossParts(total, main, mtp, per_depth, balance)
