"""Attention dispatch. MLA's training/prefill attention has query/key head dim qk_nope + qk_rope
(192 for DeepSeek-V3) and value head dim v_head_dim (128). PyTorch's flash SDPA kernel refuses
unequal head dims; cuDNN's fused attention accepts them forward and backward (measured ~416 TFLOP/s
causal fwd+bwd on an H100 against ~61 for the memory-efficient kernel, shared/design/ANCHORS.md §1).
So on CUDA we ask SDPA for cuDNN first, then the efficient and math kernels; on the CPU SDPA picks.
The reference is `F.scaled_dot_product_attention` itself (math backend); tests/test_gpu.py compares.
In the batch-invariant mode (kernels/invariant.py) CUDA tensors take its fixed-tile Triton attention instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv3.kernels import backend
from dsv3.kernels.masks import CausalRanges

_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              attn_mask: torch.Tensor | CausalRanges | None = None) -> torch.Tensor:
    """q, k (B, H, T, d_qk), v (B, H, T, d_v) -> (B, H, T, d_v); causal when attn_mask is None; a bool mask (or
    CausalRanges, whose mask SDPA takes) otherwise."""
    if isinstance(attn_mask, CausalRanges) and not (q.is_cuda and backend.BATCH_INVARIANT):
        attn_mask = attn_mask.mask
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=scale)
    if backend.BATCH_INVARIANT:  # the batch-invariant mode: one fixed-tile kernel (kernels/invariant.py)
        from dsv3.kernels.invariant import attention as invariant_attention

        return invariant_attention(q, k, v, scale, attn_mask)
    with sdpa_kernel(_CUDA_ORDER, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=scale)
