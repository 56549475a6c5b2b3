"""Plain-PyTorch reference versions of the FP8 block-scaling kernels (SPEC §6.3, §9) and of the
absorbed-MLA decode attention over the paged latent cache (`mla_decode_ref`).

These are the specification: GPU kernels are tested against them, and on the CPU they are what runs.

Weights: 128x128 blocks; `scale_inv` has shape [ceil(out/128), ceil(in/128)] (fp32) and is the
*multiplier* for dequantisation, W = fp8 · scale_inv[r // 128, c // 128]; edge blocks are partial.
Activations: 1x128 tiles along the last dim; s = max(amax, 1e-4) / 448.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """[ceil(rows/b), ceil(cols/b)] -> [rows, cols] by repeating each block's scale."""
    return scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block: int = BLOCK) -> torch.Tensor:
    """Official-format FP8 weight (out, in) + scale_inv (ceil(out/b), ceil(in/b)) -> dense weight."""
    if w_fp8.dim() != 2:
        raise ValueError(f"weight_dequant expects a 2-D weight, got shape {tuple(w_fp8.shape)}")
    rows, cols = w_fp8.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {rows}x{cols} weight needs {want}")
    return (w_fp8.float() * _expand_blocks(scale_inv.float(), rows, cols, block)).to(dtype)


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weight (out, in) -> (fp8 e4m3 weight, fp32 scale_inv) with per-128x128-block amax/448.
    Partial edge blocks use the amax of their real elements (zero padding does not change amax)."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    R, C = -(-rows // block), -(-cols // block)
    wf = w.float()
    padded = torch.zeros(R * block, C * block, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = wf.abs()
    amax = padded.view(R, block, C, block).amax(dim=(1, 3))  # (R, C)
    scale_inv = (amax / FP8_MAX).clamp_min(1e-12)  # all-zero blocks get a tiny scale, stay zero
    q = (wf / _expand_blocks(scale_inv, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv


def act_quant(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None,
              eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation (..., K) -> (fp8 (..., K), fp32 scales (..., ceil(K/b))), one scale per 1x128 tile,
    s = max(amax, eps) / 448. scale_fmt "ue8m0" rounds each scale up to a power of two (DeepSeek-V3.1).
    The floor eps = 1e-4 (the official inference kernel's) is harmless for activations but not for
    training gradients, whose tiles are mostly far below 1e-4: FP8 training pre-scales them by a power
    of two first (`dsv3/training/fp8.py`, `_grad_quant`)."""
    K = x.shape[-1]
    nb = -(-K // block)
    xf = x.float()
    pad = nb * block - K
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    tiles = xp.view(*x.shape[:-1], nb, block)
    s = tiles.abs().amax(-1).clamp_min(eps) / FP8_MAX  # (..., nb)
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (tiles / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(*x.shape[:-1], nb * block)[..., :K], s


def act_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    K = q.shape[-1]
    return (q.float() * s.repeat_interleave(block, -1)[..., :K]).to(dtype)


def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                   block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Absorbed MLA attention of one new token per sequence over one layer of the paged latent cache
    (dsv3/inference/cache.py): the math of `MLA.forward_absorbed` for T = 1.

    q_lat (B, H, C) (q_nope already through W_UK), q_pe (B, H, R); kv (n_rows, C), pe (n_rows, R);
    block_table (B, nblk) int: position p of sequence b lives at row block_table[b, p // block_size] *
    block_size + p % block_size; seq_lens (B,) int: keys 0 .. seq_lens[b] - 1 are attended (the new
    token included, so >= 1). Scores (q_lat . kv + q_pe . pe) * scale and the softmax in fp32; returns
    o_lat (B, H, C) = softmax @ kv in q_lat's dtype."""
    S = block_table.shape[1] * block_size
    pos = torch.arange(S, device=q_lat.device)
    rows = block_table[:, pos // block_size] * block_size + pos % block_size  # (B, S)
    kv_all, pe_all = kv[rows].float(), pe[rows].float()  # (B, S, C), (B, S, R)
    scores = (torch.einsum("bhc,bsc->bhs", q_lat.float(), kv_all)
              + torch.einsum("bhr,bsr->bhs", q_pe.float(), pe_all)) * scale  # (B, H, S)
    scores = scores.masked_fill(pos[None, None, :] >= seq_lens[:, None, None], float("-inf"))
    p = scores.softmax(-1)
    return torch.einsum("bhs,bsc->bhc", p, kv_all).to(q_lat.dtype)
