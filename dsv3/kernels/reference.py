"""Plain-PyTorch reference implementations of every kernel operation of dsv3.kernels: the
specification. The GPU kernels are tested against them, and wherever `backend.select` answers
"reference" (the CPU, GPUs or libraries a kernel does not support, `use_backend("reference")`) they
are what runs.

    FP8 block scaling (SPEC §6.3, §9)
        weight_quant / weight_dequant        128x128 weight blocks
        act_quant / act_dequant              1x128 activation tiles
        grad_prescale / grad_quant           1x128 tiles of a gradient, without the activation floor
        act_quant_cm_ref, act_quant_t_ref, weight_quant_pad_ref, weight_quant_pad_t_ref
                                             the training quantisers in the layouts of fp8_triton.py
    FP8 training GEMMs (the recipe: dsv3/training/fp8.py)
        fp8_gemm_fwd_ref / fp8_gemm_bwd_ref                  a Linear's fprop, dgrad, wgrad
        fp8_grouped_gemm_fwd_ref / fp8_grouped_gemm_bwd_ref  the same per expert over sorted rows
    FP8-weight GEMMs (inference on the official FP8 checkpoint)
        fp8_weight_linear_ref, fp8_expert_rows_ref           dequantise, then matmul
    dense_gemv_ref                           a bias-free linear in fp32 (the dense decode GEMV)
    mla_decode_ref                           absorbed-MLA decode attention over the paged latent cache
    router_topk_ref, router_weights          DeepSeek-V3 routing: sigmoid, bias, group-limited top-k, gates
    adamw_step_ref_                          AdamW (torch.optim.AdamW's op order) in foreach buckets

Weights: 128x128 blocks; `scale_inv` has shape [ceil(out/128), ceil(in/128)] (fp32) and is the
*multiplier* for dequantisation, W = fp8 · scale_inv[r // 128, c // 128]; edge blocks are partial.
Activations: 1x128 tiles along the last dim; s = max(amax, 1e-4) / 448.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    of two first (`grad_quant` below; dsv3/training/fp8.py)."""
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


GRAD_AMAX_EXP = 64  # a gradient is pre-scaled so that its amax lies in [2^63, 2^64)


def grad_prescale(g: torch.Tensor) -> torch.Tensor:
    """The power of two p (fp32, 0-dim, on g's device) with amax(|g| * p) in [2^63, 2^64); built from
    the exponent bits so it is exact on every device. p = 2^64 for an all-zero g."""
    amax = torch.linalg.vector_norm(g.detach(), float("inf")).float()  # max |g| in one reduction, no |g| copy
    _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    k = (GRAD_AMAX_EXP - e.to(torch.int32)).clamp(-126, 127)
    return ((k + 127) << 23).view(torch.float32)


def grad_quant(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q1x128 of a gradient without the activation floor: (fp8, fp32 scales amax/448). g is multiplied
    by grad_prescale(g) (exact), quantised by act_quant (whose 1e-4 floor then no longer binds) and
    the scales divided by the same p (exact): the e4m3 bytes of s = amax / 448 for every tile above
    ~1e-23 x the tensor's amax (dsv3/training/fp8.py explains why gradients need this)."""
    p = grad_prescale(g)
    q, s = act_quant(g.float() * p)  # in fp32: exact, where fp16's range would overflow (amax -> 2^64)
    return q, s / p


# --- the training quantisers in the layouts of the Triton kernels (fp8_triton.py) ----------------
# p: a 1-element fp32 power of two multiplying x before quantisation, the scales stored divided by
# it (grad_quant's pre-scale, folded into the quantiser on the GPU).

def _col_major(s: torch.Tensor) -> torch.Tensor:
    """The same values with strides (1, rows): the scale layout F.scaled_mm's BlockWise1x128 wants."""
    return s.t().contiguous().t()


def act_quant_cm_ref(x: torch.Tensor, p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> fp8 (M, K), scales (M, K/128) column-major."""
    q, s = act_quant(x if p is None else x.float() * p)  # (fp32: grad_quant's note)
    return q, _col_major(s if p is None else s / p)


def act_quant_t_ref(x: torch.Tensor, s_in: torch.Tensor | None = None,
                    p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> fp8 (K, M) = Q1x128(xᵀ), i.e. 128x1 tiles of x along M, scales (K, M/128) column-major.
    With s_in, x is fp8 with 1x128 scales and is dequantised first ("dequant, transpose, requant")."""
    x = x if s_in is None else act_dequant(x, s_in)
    q, s = act_quant((x if p is None else x.float() * p).t().contiguous())  # (fp32: grad_quant's note)
    return q, _col_major(s if p is None else s / p)


def weight_quant_pad_ref(w: torch.Tensor, transposed: bool = False):
    """w (N, K) -> (fp8 (N, K), scales (N/128, round4(K/128)), padding columns 1.0), and with
    transposed=True also the fp8 transpose (K, N): fp8_triton.weight_quant_pad's outputs."""
    q, s = weight_quant(w)
    sp = torch.ones(s.shape[0], -(-s.shape[1] // 4) * 4, dtype=torch.float32, device=w.device)
    sp[:, : s.shape[1]] = s
    return (q, sp, q.t().contiguous()) if transposed else (q, sp)


def weight_quant_pad_t_ref(w: torch.Tensor):
    """w (N, K) -> (the fp8 transpose (K, N), scales (N/128, round4(K/128))): weight_quant_pad_ref(w, True)'s
    third and second outputs (fp8_triton.weight_quant_pad_t's, which does not write the (N, K) copy)."""
    _, sp, qt = weight_quant_pad_ref(w, transposed=True)
    return qt, sp


# --- FP8 training GEMMs: the emulation of the recipe (dsv3/training/fp8.py) -----------------------
# Quantise with the functions above, dequantise to fp32, matmul in fp32, cast (Y to out_dtype, dX to
# X's dtype, dW to W's dtype).

def fp8_gemm_fwd_ref(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, recompute_w: bool = False):
    """fprop Y = Q1x128(X) · Q128x128(W)ᵀ, X (M, K), W (N, K) -> (Y (M, N), what backward keeps: the
    FP8 X and W with their scales, or with recompute_w W itself, quantised again by backward)."""
    xq, xs = act_quant(x2)
    wq, ws = weight_quant(w)
    y = act_dequant(xq, xs) @ weight_dequant(wq, ws, torch.float32).T
    return y.to(out_dtype), (xq, xs, *((None, None, w) if recompute_w else (wq, ws, None)))


def fp8_gemm_bwd_ref(g2: torch.Tensor, saved, x_dtype: torch.dtype, w_dtype: torch.dtype, need_dx: bool,
                     need_dw: bool):
    """dgrad dX = Q1x128(dY) · Q128x128(W); wgrad dW = Q1x128(dYᵀ) · Q1x128(Xᵀ)ᵀ with Xᵀ re-tiled from
    the FP8 X -> (dX or None, dW or None)."""
    xq, xs, wq, ws, w = saved
    dx = dw = None
    if need_dx:
        if wq is None:  # recompute_w
            wq, ws = weight_quant(w)
        gq, gs = grad_quant(g2)
        dx = (act_dequant(gq, gs) @ weight_dequant(wq, ws, torch.float32)).to(x_dtype)
    if need_dw:
        gtq, gts = grad_quant(g2.t().contiguous())  # dYᵀ (N, M): 1x128 tiles along the tokens
        xtq, xts = act_quant(act_dequant(xq, xs).t().contiguous())  # re-tile X: dequant, transpose, requant
        dw = (act_dequant(gtq, gts) @ act_dequant(xtq, xts).T).to(w_dtype)
    return dx, dw


def _expert_rows(offs: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each expert's sorted rows, on the host: the emulation's one sync."""
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def _expert_weights(wqs) -> torch.Tensor:
    """Per weight a list over experts of (fp8, 128x128 scales) -> the dequantised weights concatenated
    along N, (E, ΣN_i, K) fp32."""
    return torch.cat([torch.stack([weight_dequant(q, s, torch.float32) for q, s in w]) for w in wqs], dim=1)


def fp8_grouped_gemm_fwd_ref(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_dtype: torch.dtype,
                             recompute_w: bool = False):
    """Rows of x (M, K) sorted by expert (offs (E,) end rows) through the expert weights (E, N_i, K)
    concatenated along N: Y[rows_e] = Q1x128(X)[rows_e] · Q128x128([W1_e; W2_e])ᵀ -> (Y (M, ΣN_i),
    what backward keeps: with recompute_w the weights themselves, quantised again by backward). A loop over
    the experts on the host copy of offs."""
    rows = _expert_rows(offs)
    xq, xs = act_quant(x)  # 1x128 tiles of each row: rows are independent, so the grouping does not matter
    wqs = [[weight_quant(w_e) for w_e in w] for w in ws]  # each expert its own 128x128 grid
    xd, wd = act_dequant(xq, xs), _expert_weights(wqs)  # (M, K), (E, N, K)
    y = xd.new_zeros(x.shape[0], wd.shape[1])
    for e, (a, b) in enumerate(rows):
        y[a:b] = xd[a:b] @ wd[e].T
    return y.to(out_dtype), (xq, xs, list(ws) if recompute_w else wqs, [w.shape[1] for w in ws], rows)


def fp8_grouped_gemm_bwd_ref(g: torch.Tensor, saved, x_dtype: torch.dtype, w_dtypes: list[torch.dtype],
                             need_dx: bool, need_dw: bool):
    """dgrad dX[rows_e] = Q1x128(dY)[rows_e] · Q128x128(W_e) (each weight's dY in its own 1x128 tiles);
    wgrad dW_e = Q1x128(dYᵀ)[:, rows_e] · Q1x128(Xᵀ)[:, rows_e]ᵀ -> (dX or None, [dW_i (E, N_i, K)] or None)."""
    xq, xs, wqs, ns, rows = saved
    dx = dws = None
    if need_dx:
        if isinstance(wqs[0], torch.Tensor):  # recompute_w: the weights, quantised again
            wqs = [[weight_quant(w_e) for w_e in w] for w in wqs]
        wd = _expert_weights(wqs)  # (E, N, K)
        # (M, N): each weight's dY in its own 1x128 tiles (gate and up are two linears; the tiles of
        # [dY_gate | dY_up] are the same when I % 128 == 0)
        gd = torch.cat([act_dequant(*grad_quant(gi)) for gi in g.split(ns, dim=1)], dim=1)
        dx = gd.new_zeros(g.shape[0], wd.shape[2])
        for e, (a, b) in enumerate(rows):
            dx[a:b] = gd[a:b] @ wd[e]
        dx = dx.to(x_dtype)
    if need_dw:
        # dYᵀ (N, M) and Xᵀ (K, M), tiled 1x128 along the tokens of the whole sorted M (a tile may
        # straddle two experts); Xᵀ re-tiled from the FP8 X. An expert without rows gets zeros.
        gtd = act_dequant(*grad_quant(g.t().contiguous()))
        xtd = act_dequant(*act_quant(act_dequant(xq, xs).t().contiguous()))
        dws = [torch.stack([gt[:, a:b] @ xtd[:, a:b].T for a, b in rows]).to(dt)  # (E, N_i, K)
               for gt, dt in zip(gtd.split(ns), w_dtypes)]
    return dx, dws


# --- FP8-weight GEMMs for inference ------------------------------------------------------------

def fp8_weight_linear_ref(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y (..., N) = x (..., K) · W (N, K)ᵀ with W = weight_dequant(w, s) in x's dtype (computed in fp32,
    then cast): the official runtime's default `gemm_impl="bf16"`. Autograd flows to x."""
    return F.linear(x, weight_dequant(w, s, x.dtype))


def fp8_expert_rows_ref(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """x (M, K), w (E, N, K) e4m3 with s (E, ceil(N/128), ceil(K/128)), expert (M,) -> y (M, N): row m
    through expert[m]'s weight dequantised to x's dtype (0 where expert[m] < 0: a row the caller does not
    own, Experts.forward_partial). Dequantises every expert: a specification,
    not the prefill path (FP8Experts dequantises the stack once and runs grouped GEMMs)."""
    wd = torch.stack([weight_dequant(w[e], s[e], x.dtype) for e in range(w.shape[0])])  # (E, N, K)
    y = torch.bmm(wd[expert.clamp(min=0)], x.unsqueeze(-1)).squeeze(-1)
    return torch.where((expert >= 0).unsqueeze(-1), y, 0)  # expert < 0: a row not computed here, 0


# --- the grouped decode GEMM of the routed experts (pairs sorted by expert) ----------------------------------

def check_moe_gemm_args(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, offs: torch.Tensor, M: int,
                        x_rows: torch.Tensor | None = None, y_rows: torch.Tensor | None = None,
                        up: torch.Tensor | None = None, up_s: torch.Tensor | None = None, kernel: bool = False) -> None:
    """The grouped decode GEMM's argument contract (both backends): x (T, K); w (E, N, K) and `up` as the expert
    GEMV takes them (check_expert_gemv_args); offs (E,) integer end rows, M sorted rows; x_rows (M,) integer
    (else M <= T), y_rows (M,) integer or None."""
    check_expert_gemv_args(x, w, s, up, up_s, kernel=kernel)
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"moe_gemm: x (T, K) and w (E, N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if offs.dim() != 1 or offs.shape[0] != w.shape[0] or offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_gemm: offs ({w.shape[0]},) integer end rows, got {tuple(offs.shape)} {offs.dtype}")
    for name, r in (("x_rows", x_rows), ("y_rows", y_rows)):
        if r is not None and (r.dim() != 1 or r.shape[0] != M or r.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"moe_gemm: {name} ({M},) integer, got {tuple(r.shape)} {r.dtype}")
    if x_rows is None and x.shape[0] < M:
        raise ValueError(f"moe_gemm: {M} sorted rows but x has {x.shape[0]}")


def moe_gemm_ref(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, offs: torch.Tensor, M: int,
                 x_rows: torch.Tensor | None = None, y_rows: torch.Tensor | None = None, up: torch.Tensor | None = None,
                 up_s: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' grouped decode GEMM (dsv3/kernels/moe_gemm_triton.py): sorted row m (m < M) belongs to
    the expert e with offs[e-1] <= m < offs[e], reads x[x_rows[m]] (x[m] without x_rows) and is stored at
    y[y_rows[m]] (y[m]); y = x·w[e]ᵀ, or with `up` silu(x·w[e]ᵀ) * (x·up[e]ᵀ); fp32 sums, one rounding to x's
    dtype (the expert GEMV's math, expert_gemv_ref). Rows past offs[-1] belong to no expert: not written (0
    here; the kernel leaves them as allocated)."""
    m = torch.arange(M, device=x.device)
    expert = torch.searchsorted(offs.to(torch.long), m, right=True)  # (M,) E for rows past offs[-1]
    expert = torch.where(expert < w.shape[0], expert, -1)
    xm = x[x_rows] if x_rows is not None else x[:M]
    y_sorted = expert_gemv_ref(xm, w, s, expert, 1, up, up_s)  # (M, N), 0 for rows of no expert
    out = torch.zeros(M, w.shape[1], dtype=x.dtype, device=x.device)
    if y_rows is None:
        out[:M] = y_sorted
    else:
        owned = expert >= 0
        out[y_rows[owned]] = y_sorted[owned]
    return out


# --- the dense decode GEMV ------------------------------------------------------------------------

DENSE_GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_dense_gemv_args(x: torch.Tensor, w: torch.Tensor, kernel: bool = False,
                          out_dtype: torch.dtype | None = None) -> None:
    """The dense GEMV's argument contract (both backends): w (N, K) in x's dtype, one of DENSE_GEMV_DTYPES, K
    agrees; the output in x's dtype or fp32 (`out_dtype`); for the Triton kernel (`kernel`) x (M, K) with its K
    contiguous."""
    if out_dtype not in (None, x.dtype, torch.float32):
        raise TypeError(f"dense GEMV: the output in x's dtype ({x.dtype}) or float32, got {out_dtype}")
    if w.dim() != 2 or x.dim() < 1:
        raise ValueError(f"dense GEMV: x (..., K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in DENSE_GEMV_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"dense GEMV: x and w of one dtype among {DENSE_GEMV_DTYPES}, got {x.dtype} and {w.dtype}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"dense GEMV: x has K = {x.shape[-1]}, the weight {w.shape[1]}")
    if kernel and x.dim() != 2:
        raise ValueError(f"dense GEMV kernel: x (M, K), got {tuple(x.shape)}")


def dense_gemv_ref(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) · w (N, K)ᵀ (dsv3/kernels/dense_gemv_triton.py): fp32 products and sums, one
    rounding to `out_dtype` (None: x's dtype; float32: no rounding, the router's logits). (The model's dense
    linears run F.linear where the kernel does not, bit for bit nn.Linear; on the GPU cuBLAS's bf16 GEMM also
    sums in fp32, in its own order.)"""
    return F.linear(x.float(), w.float()).to(out_dtype or x.dtype)


# --- the decode step's latent store (norm + RoPE + paged cache write) ----------------------------------------

def check_store_latents_args(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                             w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor | None = None,
                             kernel: bool = False) -> None:
    """The latent store's argument contract (both backends): caches kv (n_slots, R, C) and pe (n_slots, R, P) with
    P even, slot in range, rows (M,) integer, kv_a (M, C + P), the norm weight (C,), cos / sin (M, P / 2) fp32, and
    the optional query's rope part q_pe (M, H, P) floating (any strides); for the Triton kernel (`kernel`) 16-bit
    or fp32 kv_a and q_pe, and every last dimension contiguous."""
    if kv.dim() != 3 or pe.dim() != 3 or kv.shape[:2] != pe.shape[:2] or pe.shape[2] % 2:
        raise ValueError(f"store_latents: caches kv (n_slots, R, C) and pe (n_slots, R, P even), got "
                         f"{tuple(kv.shape)} and {tuple(pe.shape)}")
    C, P = kv.shape[2], pe.shape[2]
    if not 0 <= slot < kv.shape[0]:
        raise ValueError(f"store_latents: slot {slot} outside the cache's {kv.shape[0]} layer slots")
    M = rows.shape[0] if rows.dim() == 1 else -1
    if M < 0 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"store_latents: rows (M,) integer, got {tuple(rows.shape)} {rows.dtype}")
    if tuple(kv_a.shape) != (M, C + P) or tuple(w.shape) != (C,):
        raise ValueError(f"store_latents: kv_a (M, C + P) = ({M}, {C + P}) and weight ({C},), got "
                         f"{tuple(kv_a.shape)} and {tuple(w.shape)}")
    if tuple(cos.shape) != (M, P // 2) or tuple(sin.shape) != (M, P // 2) or cos.dtype != torch.float32 \
            or sin.dtype != torch.float32:
        raise ValueError(f"store_latents: cos / sin (M, P / 2) = ({M}, {P // 2}) fp32, got {tuple(cos.shape)} "
                         f"{cos.dtype} and {tuple(sin.shape)} {sin.dtype}")
    if q_pe is not None and (q_pe.dim() != 3 or q_pe.shape[0] != M or q_pe.shape[2] != P
                             or not q_pe.is_floating_point()):
        raise ValueError(f"store_latents: q_pe (M, H, P) = ({M}, H, {P}) floating, got {tuple(q_pe.shape)} "
                         f"{q_pe.dtype}")
    if kernel:
        if kv_a.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w.dtype != kv_a.dtype:
            # (RMSNorm's output is promote(w, kv_a); the kernel rounds once, to the weight's dtype)
            raise TypeError(f"store_latents kernel: kv_a bf16 / fp16 / fp32 and the norm weight alike, got "
                            f"{kv_a.dtype} and {w.dtype}")
        if q_pe is not None and q_pe.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"store_latents kernel: q_pe bf16 / fp16 / fp32, got {q_pe.dtype}")
        qs = () if q_pe is None else (q_pe,)
        if any(t.stride(-1) != 1 for t in (kv, pe, kv_a, w, cos, sin, *qs) if t.shape[-1] > 1):
            raise ValueError("store_latents kernel: every tensor's last dimension contiguous")


def store_latents_ref(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                      w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      q_pe: torch.Tensor | None = None) -> torch.Tensor | None:
    """In place (dsv3/kernels/latent_store_triton.py): kv[slot][rows] = RMSNorm(kv_a[:, :C]; w, eps) and
    pe[slot][rows] = the interleaved-pair rotation of kv_a[:, C:] by (cos, sin), each cast to its cache's dtype.
    The model's own math: dsv3/model/layers.py RMSNorm (normalised in fp32, rounded to kv_a's dtype, times the
    weight) and dsv3/model/rope.py apply_rope (fp32, rounded to kv_a's dtype). With the query's rope part q_pe
    (M, H, P): returns its rotation by the same (cos[m], sin[m]) for every head, a new contiguous (M, H, P) in
    q_pe's dtype (apply_rope: fp32, one rounding); else None."""
    C = kv.shape[2]
    c, p = kv_a[:, :C], kv_a[:, C:]
    cf = c.float()
    normed = w * (cf * torch.rsqrt(cf.pow(2).mean(-1, keepdim=True) + eps)).to(c.dtype)  # (M, C)
    pf = p.float()
    p1, p2 = pf[:, 0::2], pf[:, 1::2]
    rot = torch.stack((p1 * cos - p2 * sin, p1 * sin + p2 * cos), dim=-1).flatten(-2).to(p.dtype)  # (M, P)
    kv[slot].index_copy_(0, rows, normed.to(kv.dtype))
    pe[slot].index_copy_(0, rows, rot.to(pe.dtype))
    if q_pe is None:
        return None
    qf = q_pe.float()
    q1, q2 = qf[..., 0::2], qf[..., 1::2]  # (M, H, P / 2) each
    cq, sq = cos[:, None], sin[:, None]  # (M, 1, P / 2): one angle per token, every head
    return torch.stack((q1 * cq - q2 * sq, q1 * sq + q2 * cq), dim=-1).flatten(-2).to(q_pe.dtype)  # (M, H, P)


# --- the per-head decode GEMV (absorbed MLA's W_UK / W_UV products) -------------------------------------------

def check_head_gemv_args(x: torch.Tensor, w: torch.Tensor, kernel: bool = False) -> None:
    """The per-head GEMV's argument contract (both backends): x (..., H, K), w (H, N, K) in x's dtype, one of
    DENSE_GEMV_DTYPES, H and K agree; for the Triton kernel (`kernel`) x (M, H, K) with its K contiguous and w
    with its K or its N contiguous."""
    if w.dim() != 3 or x.dim() < 2:
        raise ValueError(f"head GEMV: x (..., H, K) and w (H, N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in DENSE_GEMV_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"head GEMV: x and w of one dtype among {DENSE_GEMV_DTYPES}, got {x.dtype} and {w.dtype}")
    if x.shape[-2] != w.shape[0] or x.shape[-1] != w.shape[2]:
        raise ValueError(f"head GEMV: x has H, K = {tuple(x.shape[-2:])}, w (H, N, K) = {tuple(w.shape)}")
    if kernel:
        if x.dim() != 3 or (x.stride(2) != 1 and x.shape[2] > 1):
            raise ValueError(f"head GEMV kernel: x (M, H, K) with K contiguous, got {tuple(x.shape)} strides "
                             f"{x.stride()}")
        if w.stride(2) != 1 and w.stride(1) != 1 and w.shape[1] > 1 and w.shape[2] > 1:
            raise ValueError(f"head GEMV kernel: w (H, N, K) with K or N contiguous, got strides {w.stride()}")


def head_gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y (..., H, N) = einsum("...hk,hnk->...hn", x, w) (dsv3/kernels/head_gemv_triton.py): head h's rows times
    its own matrix w[h]ᵀ; fp32 products and sums, one rounding to x's dtype."""
    return torch.einsum("...hk,hnk->...hn", x.float(), w.float()).to(x.dtype)


# --- the latent store and the W_UK product in one launch (mla_prep_triton.py) ------------------------------------

def check_mla_prep_args(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                        w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor,
                        q_nope: torch.Tensor, w_uk_t: torch.Tensor, kernel: bool = False) -> None:
    """The merged launch's contract: the latent store's with the query (q_pe given) and the head GEMV's (q_nope,
    w_uk_t), of one query: q_nope (M, H, nope) with q_pe's M rows and H heads; for the kernel (`kernel`) also w_uk_t
    (H, C, nope) read along C (its C stride 1: the GEMV's N-contiguous form, nope > 1 and its stride not 1)."""
    if q_pe is None or q_nope.dim() != 3 or tuple(q_nope.shape[:2]) != tuple(q_pe.shape[:2]):
        raise ValueError(f"mla_prep: q_nope (M, H, nope) of q_pe's (M, H) = "
                         f"{None if q_pe is None else tuple(q_pe.shape[:2])}, got {tuple(q_nope.shape)}")
    check_store_latents_args(kv, pe, slot, rows, kv_a, w, cos, sin, q_pe, kernel=kernel)
    check_head_gemv_args(q_nope, w_uk_t, kernel=kernel)
    if kernel and (w_uk_t.stride(2) == 1 or w_uk_t.shape[2] == 1):
        raise ValueError(f"mla_prep kernel: w_uk_t (H, C, nope) read along C (nope > 1, its stride not 1), got "
                         f"{tuple(w_uk_t.shape)} strides {w_uk_t.stride()}")


def check_expert_gemv_args(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None,
                           up: torch.Tensor | None = None, up_s: torch.Tensor | None = None,
                           kernel: bool = False) -> None:
    """The expert GEMV's argument contract (both backends): w in x's dtype without scales, or e4m3 with fp32
    scales; K agrees; gate and up stored alike; for the Triton kernel (`kernel`) x in bf16/fp16."""
    if kernel and x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"expert GEMV takes bf16/fp16 activations, got {x.dtype}")
    for m, ms in ((w, s), (up, up_s)) if up is not None else ((w, s),):
        if m.dtype == torch.float8_e4m3fn:
            if ms is None or ms.dtype != torch.float32:
                raise TypeError("e4m3 expert weights need fp32 128x128 block scales")
        elif m.dtype != x.dtype or ms is not None:
            raise TypeError(f"expert weights in x's dtype ({x.dtype}) without scales, or e4m3 with scales; got "
                            f"{m.dtype} {'with' if ms is not None else 'without'} scales")
        if x.shape[-1] != m.shape[-1]:
            raise ValueError(f"x has K = {x.shape[-1]}, the weight {m.shape[-1]}")
        if ms is not None and tuple(ms.shape) != (*m.shape[:-2], -(-m.shape[-2] // BLOCK), -(-m.shape[-1] // BLOCK)):
            raise ValueError(f"block scales of a {tuple(m.shape)} e4m3 weight must be "
                             f"{(*m.shape[:-2], -(-m.shape[-2] // BLOCK), -(-m.shape[-1] // BLOCK))}, got "
                             f"{tuple(ms.shape)}")
    if up is not None and (up.shape != w.shape or up.dtype != w.dtype or (up_s is None) != (s is None)):
        raise ValueError(f"gate and up must be stored alike: gate {tuple(w.shape)} {w.dtype} "
                         f"{'with' if s is not None else 'without'} scales, up {tuple(up.shape)} {up.dtype} "
                         f"{'with' if up_s is not None else 'without'} scales")


def check_second_stack(w: torch.Tensor, s: torch.Tensor | None, up: torch.Tensor | None, extra) -> None:
    """A second stack of experts (w2, s2, up2, up_s2) for one launch: stored as the first (dtype, scales, up or not),
    the same (N, K) and scale grid per expert, K contiguous (any other strides: views of the shared experts'
    matrices), on the same device."""
    w2, s2, u2, us2 = extra
    if w2.dim() != 3 or w2.shape[1:] != w.shape[1:] or w2.dtype != w.dtype or w2.device != w.device:
        raise ValueError(f"second expert stack: (E2, {w.shape[1]}, {w.shape[2]}) {w.dtype} expected, got "
                         f"{tuple(w2.shape)} {w2.dtype}")
    if (s2 is None) != (s is None) or (u2 is None) != (up is None) or (us2 is None) != (up is None or s is None):
        raise ValueError("second expert stack: scales and up must be given exactly as for the first")
    for t, ref in ((s2, s), (u2, up), (us2, s)):
        if t is not None and (t.shape[1:] != ref.shape[1:] or t.shape[0] != w2.shape[0] or t.dtype != ref.dtype):
            raise ValueError(f"second expert stack: a tensor of shape {tuple(t.shape)} {t.dtype} does not match "
                             f"the first stack's {tuple(ref.shape[1:])} {ref.dtype} per expert")
    for t in (w2, s2, u2, us2):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("second expert stack: the last dimension must be contiguous")
    if u2 is not None and u2.stride() != w2.stride() or us2 is not None and us2.stride() != s2.stride():
        raise ValueError("second expert stack: up must have gate's strides (and its scales gate's scales' strides)")


def routed_rows(expert: torch.Tensor, routed: int, extra) -> int:
    """Output rows of an expert GEMV call: expert.shape[0], or with routed > 0 (expert: `routed` ids a token, and
    every token also takes each expert of the second stack `extra`) T · (routed + E2) for T = expert.shape[0] /
    routed tokens: the rows of `expert_ids`."""
    if routed == 0:
        return expert.shape[0]
    if extra is None or routed < 0 or expert.dim() != 1 or expert.shape[0] % routed:
        raise ValueError(f"expert_gemv: routed={routed} needs a second stack and {routed} ids a token, got "
                         f"{tuple(expert.shape)}{'' if extra is not None else ' and no second stack'}")
    return expert.shape[0] // routed * (routed + extra[0].shape[0])


def expert_ids(expert: torch.Tensor, routed: int, E: int, E2: int) -> torch.Tensor:
    """(T·routed,) routed ids -> (T·(routed + E2),): each token's routed ids, then E .. E + E2 - 1 (the second
    stack's experts, once each): the rows `expert_gemv(..., routed=routed)` computes, as a concatenation (the
    specification; the kernel derives them from the row number)."""
    ids = torch.arange(E, E + E2, device=expert.device, dtype=expert.dtype).expand(expert.shape[0] // routed, E2)
    return torch.cat([expert.view(-1, routed), ids], 1).reshape(-1)


def expert_gemv_ref(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, expert: torch.Tensor, x_div: int = 1,
                    up: torch.Tensor | None = None, up_s: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' decode GEMV (dsv3/kernels/expert_gemv_triton.py): x (T, K); w (E, N, K) in x's
    dtype (s None) or e4m3 with s (E, ceil(N/128), ceil(K/128)); expert (M,) -> y (M, N) in x's dtype, row m =
    x[m // x_div] · w[expert[m]]ᵀ, or with `up` silu(x·wᵀ) * (x·upᵀ); fp32 products and sums, one rounding;
    0 where expert[m] < 0. Dequantises every expert: a specification, not a fast path."""
    xm = x[torch.arange(expert.shape[0], device=x.device) // x_div].float()  # (M, K)
    e = expert.clamp(min=0)

    def lin(w, s):
        wd = torch.stack([weight_dequant(w[i], s[i], torch.float32) for i in range(w.shape[0])]) \
            if s is not None else w.float()
        return torch.bmm(wd[e], xm.unsqueeze(-1)).squeeze(-1)  # (M, N) fp32

    y = lin(w, s)
    if up is not None:
        y = F.silu(y) * lin(up, up_s)
    return torch.where((expert >= 0).unsqueeze(-1), y, 0).to(x.dtype)


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


# --- MoE router ----------------------------------------------------------------------------------

def router_weights(s: torch.Tensor, idx: torch.Tensor, norm_topk_prob: bool, scale: float) -> torch.Tensor:
    """The gates of the chosen experts: w = s[idx] (/ their sum if norm_topk_prob) · scale, (N, K) fp32.
    Differentiable in s (the router's gradient path)."""
    w = s.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale


def router_topk_ref(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                    norm_topk_prob: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing from the router logits x Wᵀ (N, E) fp32 and e_score_correction_bias (E,):
        s = sigmoid(logits);  sel = s + bias  (chooses experts only)
        if topk_group < n_group: group score = sum of the top-2 of sel in each of n_group groups of
            E / n_group experts; the topk_group best groups are kept, the others' sel -> -inf
        idx = top_k of sel (descending);  w = router_weights(s, idx, norm_topk_prob, scale)
    -> w (N, K) fp32, idx (N, K) int64, s (N, E) fp32. Differentiable in the logits through s (w and s);
    the selection is not. Ties: torch.topk's (unspecified) order."""
    N = logits.shape[0]
    s = logits.sigmoid()
    sel = s + bias
    if topk_group < n_group:
        g = sel.view(N, n_group, -1)  # (N, G, E/G)
        group_score = g.topk(2, dim=-1).values.sum(-1)  # (N, G)
        keep = group_score.topk(topk_group, dim=-1).indices  # (N, topk_group)
        mask = torch.ones(N, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
        sel = g.masked_fill(mask.unsqueeze(-1), float("-inf")).view(N, -1)
    idx = sel.topk(top_k, dim=-1).indices
    return router_weights(s, idx, norm_topk_prob, scale), idx, s


# --- AdamW ---------------------------------------------------------------------------------------

BUCKET_NUMEL = 1 << 24  # elements per foreach bucket: at most ~200 MB of fp32 working copies at a time


def buckets(sizes: list[int], numel: int = BUCKET_NUMEL) -> list[range]:
    """Consecutive index ranges of about `numel` elements in total each (a larger tensor alone)."""
    out, start, n = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and n + size > numel:
            out.append(range(start, i))
            start, n = i, 0
        n += size
    return out + ([range(start, len(sizes))] if start < len(sizes) else [])


def adamw_step_ref_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, step: float, grad_scale: torch.Tensor | None = None,
                    skip: torch.Tensor | None = None, bucket_numel: int = BUCKET_NUMEL,
                    copies: list[torch.Tensor] | None = None) -> None:
    """One AdamW step over lists sharing one step count t (1-based), in place, with torch._foreach ops
    in buckets of about `bucket_numel` elements. torch.optim.AdamW's rule and op order
    (`_multi_tensor_adamw`, so fp32 moments give its bits exactly), in fp32 whatever the storage:
        g = g * grad_scale                          (optional 0-dim tensor: clip_grad_norm_'s multiply)
        p = p * (1 - lr·wd)
        m = lerp(m, g, 1 - β1)                      v = v·β2 + (1 - β2)·g·g
        p = p + (-lr / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)
    bf16 (or other non-fp32) moments are read into fp32 working copies, updated, used unrounded for
    the update, then rounded to nearest into storage. The gradient tensors are not modified.
    skip (optional 0-dim bool tensor): where True, parameters and moments keep their bits. Decided on the
    device: each bucket's p, m, v are copied first and selected back with torch.where (no host sync; a
    False flag selects the updated values, so the bits are those of the update without `skip`). A flag on
    the CPU is read instead (no sync to avoid there): a skipped step does nothing, the others copy nothing.
    copies (optional, one per parameter): after each bucket's update (and a skip's restore), copy_ of the
    parameters into them, i.e. the updated fp32 masters rounded to nearest into their bf16 working copies
    (a skipped step rewrites the same bits: each copy is its master rounded)."""
    if skip is not None and skip.device.type == "cpu":
        if bool(skip):
            return
        skip = None
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = (lr / bias_correction1) * -1  # python floats, as torch computes them
    bias_correction2_sqrt = bias_correction2 ** 0.5
    for idx in buckets([p.numel() for p in params], bucket_numel):
        ps = [params[i] for i in idx]
        g = [grads[i].float() for i in idx]  # fp32 grads: the tensors themselves, only read
        if grad_scale is not None:
            g = torch._foreach_mul(g, grad_scale)
        m_store, v_store = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        kept = [[t.clone() for t in ts] for ts in (ps, m_store, v_store)] if skip is not None else None
        m = [x.float() for x in m_store]  # fp32 moments: the stored tensors, updated in place
        v = [x.float() for x in v_store]
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        del g
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [bias_correction2_sqrt] * len(ps))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, m, denom, [step_size] * len(ps))
        for store, work in ((m_store, m), (v_store, v)):
            pairs = [(a, b) for a, b in zip(store, work) if a is not b]
            if pairs:  # round the fp32 working copies to the storage dtype
                torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])
        if kept is not None:  # a skipped step: every tensor back to its bits before the step
            for ts, olds in zip((ps, m_store, v_store), kept):
                for t, old in zip(ts, olds):
                    t.copy_(torch.where(skip, old, t))
        if copies is not None:
            torch._foreach_copy_([copies[i] for i in idx], ps)
