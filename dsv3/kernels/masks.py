"""Attention masks given by position, for kernels.attention (dsv3/kernels/attention.py): its own module, imported by
the attention dispatch, the batch-invariant kernels (kernels/invariant.py) and the inference cache alike."""

from __future__ import annotations

import torch


class CausalRanges:
    """Causal attention of a padded batch of sequences, each over its own context (the engine's prompt chunks after
    cached positions, inference/cache.py): query t of sequence b may see keys s <= q_start[b] + t with s < k_len[b].
    q_start, k_len: (B,) integer tensors on the attention's device. The batch-invariant attention reads these
    positions (one compiled kernel for every causal form, kernels/invariant_triton.py); every other path the
    (B, 1, T, S) bool `mask`, built when first asked by `mask_fn` (its padding queries may see other keys: their
    outputs are not read)."""

    def __init__(self, q_start: torch.Tensor, k_len: torch.Tensor, mask_fn):
        self.q_start, self.k_len, self._mask_fn, self._mask = q_start, k_len, mask_fn, None

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = self._mask_fn()
        return self._mask
