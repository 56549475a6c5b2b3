"""Decoupled RoPE with YaRN (SPEC §3.2–3.4), as pure functions.

Layout: the official interleaved-pair convention. The `qk_rope_head_dim` dims are read as pairs
(x[2j], x[2j+1]), each rotated by angle pos·θ'_j, in fp32. HF's `rope_interleave=True` path and
vLLM's `is_neox_style=False` compute the same thing, so official weights work unpermuted.
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig, yarn_get_mscale


def inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """θ'_j for j = 0..rope_dim/2-1, fp32, with the YaRN ramp when rope_scaling.type == 'yarn'."""
    dim = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (dim/2,)
    y = cfg.yarn
    if y is None:
        return freqs
    s = float(y["factor"])
    L0 = float(y["original_max_position_embeddings"])
    beta_fast = float(y.get("beta_fast") or 32)
    beta_slow = float(y.get("beta_slow") or 1)

    def corr_dim(rot: float) -> float:  # the pair index whose wavelength fits `rot` times in L0
        return dim * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0, as HF and the official code do
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    # ramp 0: keep the frequency (high-frequency pairs); ramp 1: interpolate it by 1/s.
    return freqs * (1 - ramp) + (freqs / s) * ramp


def cos_sin_factor(cfg: ModelConfig) -> float:
    """Factor on cos/sin (HF `attention_factor`, vLLM `mscale`): mscale(s, mscale)/mscale(s, mscale_all_dim).
    It is 1.0 for DeepSeek-V3 (mscale == mscale_all_dim == 1). An absent (or null) key takes vLLM's and SGLang's
    default (DeepseekScalingRotaryEmbedding: mscale 1, mscale_all_dim 0); transformers instead uses mscale(s)
    unless both are set and non-zero. Official checkpoints set both. A 0 is a value, not "absent": mscale 0 gives
    mscale(s, 0) = 1, as in vLLM."""
    y = cfg.yarn
    if y is None:
        return 1.0
    s = float(y["factor"])
    m, mad = y.get("mscale"), y.get("mscale_all_dim")
    return yarn_get_mscale(s, 1.0 if m is None else float(m)) / yarn_get_mscale(s, 0.0 if mad is None else float(mad))


def cos_sin(positions: torch.Tensor, freqs: torch.Tensor, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., T) integer -> cos, sin (..., T, dim/2) in fp32."""
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (..., T, dim/2)
    cos, sin = angles.cos(), angles.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x (B, T, H, dim); cos/sin (B or 1, T, dim/2). Computed in fp32."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (B, T, H, dim/2) each
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (B, T, 1, dim/2)
    y = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)  # (B, T, H, dim/2, 2)
    return y.flatten(-2).to(x.dtype)
