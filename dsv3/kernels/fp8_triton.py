"""Triton kernels for the FP8 training quantisation (SPEC §9); the specification is
`dsv3/kernels/reference.py` (`act_quant`, `weight_quant`) and tests/test_gpu.py checks these kernels
against it byte for byte.

    act_quant_cm(x, p=None)    x (M, K) -> fp8 (M, K), scales (M, K/128) in a column-major buffer
                               (strides (1, M), what `F.scaled_mm`'s BlockWise1x128 wants)
    act_quant_t(x, s=None, p=None)
                               x (M, K) -> fp8 (K, M) = quantised xᵀ in 1x128 tiles along M (128x1
                               tiles of x), scales (K, M/128) column-major; with `s`, x is an fp8
                               tensor with 1x128 scales that is dequantised first (the paper's
                               "dequant, transpose, requant" of a cached activation)
    weight_quant_pad(w, transposed=False)
                               w (N, K) -> fp8 (N, K), scales (N/128, round4(K/128)) with the padded
                               row stride cuBLAS wants for BlockWise128x128; `[:, :K/128]` is the
                               reference's scale_inv; transposed=True also returns the fp8 (K, N)
                               transpose (the dgrad operand) from the same pass
    weight_quant_pad_t(w)      -> (qt, s): that transpose and the scales alone (no (N, K) copy): the
                               dgrad operand recomputed in backward (dsv3/training/fp8.py, recompute_weights)
p (both activation quantisers): a 1-element fp32 power of two multiplying x before quantisation, the
scales stored divided by it: the gradient pre-scale of dsv3/training/fp8.py without a pass of its own.

Scales: s = max(amax, 1e-4) / 448 (activations), max(amax / 448, 1e-12) (weights), fp32. To equal the
reference's bytes on CUDA, "/ 448" is `* fp32(1/448)` (PyTorch's CUDA division by a Python scalar
multiplies by the reciprocal; with `tl.math.div_rn` 0.05-0.1% of the bytes came out one e4m3 step
apart, measured on the H100) and the tensor/tensor division x / s is IEEE (`tl.math.div_rn`).
Shapes: M and K multiples of 128 for `act_quant_t`, K a multiple of 128 for `act_quant_cm`; the
caller (dsv3/training/fp8.py) pads with zeros, which changes no amax.
NaN: the amax and the clamps propagate it, as the reference's torch ops do (Triton's max / maximum / minimum
default to maxnum / minnum on the GPU, which return the other operand: a NaN element came out as a finite
-448 x a finite scale, hiding it from the loss and the step's finiteness check); an inf makes its tile's scale
inf, so the tile dequantises to NaN, as in the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors under the interpreter (tests)

FP8_MAX = 448.0
INV_MAX = tl.constexpr(1.0 / 448.0)  # fp32(1/448), the reciprocal torch's CUDA scalar division uses
BLOCK = 128
NAN = tl.constexpr(tl.PropagateNan.ALL)  # max / min keep a NaN operand (module docstring)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=NAN)


@triton.jit
def _clamp_fp8(q):
    return tl.minimum(tl.maximum(q, -448.0, propagate_nan=NAN), 448.0, propagate_nan=NAN)


@triton.jit
def _act_quant_kernel(x_ptr, p_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                      HAS_P: tl.constexpr, BM: tl.constexpr, BLK: tl.constexpr):
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rk = pk * BLK + tl.arange(0, BLK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_P:  # exact power-of-two pre-scale of a gradient (dsv3/training/fp8.py), undone on the scales
        p = tl.load(p_ptr)
        x = x * p
    amax = tl.reduce(tl.abs(x), 1, _max_nan)
    s = tl.maximum(amax, 1e-4, propagate_nan=NAN) * INV_MAX  # torch on CUDA divides by a scalar as x * (1/b)
    q = tl.math.div_rn(x, s[:, None])
    q = _clamp_fp8(q)
    tl.store(q_ptr + rm[:, None] * stride_qm + rk[None, :], q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
    if HAS_P:
        s = tl.math.div_rn(s, p)
    tl.store(s_ptr + rm * stride_sm + pk * stride_sk, s, mask=rm < M)


@triton.jit
def _act_quant_t_kernel(x_ptr, sin_ptr, p_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_sinm, stride_sink,
                        stride_qk, stride_sk, stride_sm, HAS_SCALE: tl.constexpr, HAS_P: tl.constexpr,
                        BK: tl.constexpr, BLK: tl.constexpr):
    # one program: 128 tokens (rows of x) x BK channels; tiles of 128 along the tokens
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    rm = pm * BLK + tl.arange(0, BLK)
    rk = pk * BK + tl.arange(0, BK)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :]).to(tl.float32)  # (BLK, BK)
    if HAS_SCALE:  # dequantise the 1x128-tiled fp8 input: one scale per (token, 128 channels)
        sin = tl.load(sin_ptr + rm[:, None] * stride_sinm + (rk[None, :] // BLK) * stride_sink)
        x = x * sin
    if HAS_P:
        p = tl.load(p_ptr)
        x = x * p
    amax = tl.reduce(tl.abs(x), 0, _max_nan)  # (BK,)
    s = tl.maximum(amax, 1e-4, propagate_nan=NAN) * INV_MAX  # torch on CUDA divides by a scalar as x * (1/b)
    q = tl.math.div_rn(x, s[None, :])
    q = _clamp_fp8(q).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    qt = tl.trans(q)  # (BK, BLK)
    tl.store(q_ptr + rk[:, None] * stride_qk + rm[None, :], qt)
    if HAS_P:
        s = tl.math.div_rn(s, p)
    tl.store(s_ptr + rk * stride_sk + pm * stride_sm, s)


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, N, K, stride_wn, stride_qn, stride_qtk, stride_sn,
                         HAS_Q: tl.constexpr, HAS_T: tl.constexpr, BLK: tl.constexpr):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    rn = pn * BLK + tl.arange(0, BLK)
    rk = pk * BLK + tl.arange(0, BLK)
    if HAS_Q:
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.reduce(tl.reduce(tl.abs(w), 1, _max_nan), 0, _max_nan)
        s = tl.maximum(amax * INV_MAX, 1e-12, propagate_nan=NAN)
        qf = _clamp_fp8(tl.math.div_rn(w, s))
        tl.store(q_ptr + rn[:, None] * stride_qn + rk[None, :], qf.to(tl.float8e4nv, fp_downcast_rounding="rtne"),
                 mask=mask)
    if HAS_T:  # the same bytes transposed, (K, N): the dgrad operand. The block has one scale, so quantising
        # the block re-read transposed (from L2) gives exactly the transposed bytes; a register tl.trans of
        # the 128x128 tile came out scrambled on Triton 3.6 / SM90 (tests/test_gpu.py caught it).
        mask_t = (rk[:, None] < K) & (rn[None, :] < N)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=mask_t, other=0.0).to(tl.float32)
        if not HAS_Q:  # the transpose alone (weight_quant_pad_t): the same block's amax, from this read
            amax = tl.reduce(tl.reduce(tl.abs(wt), 1, _max_nan), 0, _max_nan)
            s = tl.maximum(amax * INV_MAX, 1e-12, propagate_nan=NAN)
        qt = _clamp_fp8(tl.math.div_rn(wt, s))
        tl.store(qt_ptr + rk[:, None] * stride_qtk + rn[None, :], qt.to(tl.float8e4nv, fp_downcast_rounding="rtne"),
                 mask=mask_t)
    tl.store(s_ptr + pn * stride_sn + pk, s)


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def act_quant_cm(x: torch.Tensor, p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    assert p is None or (p.numel() == 1 and p.dtype == torch.float32), "act_quant_cm: p is a 1-element fp32 tensor"
    assert x.is_cuda and x.dim() == 2 and x.stride(1) == 1, "act_quant_cm: a 2-D row-major CUDA tensor"
    M, K = x.shape
    assert K % BLOCK == 0, f"act_quant_cm: K={K} must be a multiple of {BLOCK}"
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(K // BLOCK, M, dtype=torch.float32, device=x.device).t()  # (M, K/128), strides (1, M)
    BM = 32
    _act_quant_kernel[(triton.cdiv(M, BM), K // BLOCK)](x, p if p is not None else s, q, s, M, K, x.stride(0),
                                                          q.stride(0), s.stride(0), s.stride(1), HAS_P=p is not None,
                                                          BM=BM, BLK=BLOCK, num_warps=4)
    return q, s


def act_quant_t(x: torch.Tensor, s_in: torch.Tensor | None = None,
                p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    assert p is None or (p.numel() == 1 and p.dtype == torch.float32), "act_quant_t: p is a 1-element fp32 tensor"
    assert x.is_cuda and x.dim() == 2 and x.stride(1) == 1, "act_quant_t: a 2-D row-major CUDA tensor"
    M, K = x.shape
    assert M % BLOCK == 0 and K % BLOCK == 0, f"act_quant_t: M={M}, K={K} must be multiples of {BLOCK}"
    if s_in is not None:
        assert x.dtype == torch.float8_e4m3fn and s_in.shape == (M, K // BLOCK) and s_in.dtype == torch.float32
    q = torch.empty(K, M, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M // BLOCK, K, dtype=torch.float32, device=x.device).t()  # (K, M/128), strides (1, K)
    sin = s_in if s_in is not None else s
    BK = 64
    _act_quant_t_kernel[(M // BLOCK, K // BK)](
        x, sin, p if p is not None else s, q, s, M, K, x.stride(0), sin.stride(0), sin.stride(1), q.stride(0),
        s.stride(0), s.stride(1), HAS_SCALE=s_in is not None, HAS_P=p is not None, BK=BK, BLK=BLOCK, num_warps=4)
    return q, s


def _weight_quant(w: torch.Tensor, plain: bool, transposed: bool):
    assert (w.is_cuda or _INTERPRET) and w.dim() == 2 and w.stride(1) == 1, \
        "weight_quant_pad: a 2-D row-major CUDA tensor"
    N, K = w.shape
    nb, kb = triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK)
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=w.device) if plain else None
    s = torch.ones(nb, _round4(kb), dtype=torch.float32, device=w.device)
    qt = torch.empty(K, N, dtype=torch.float8_e4m3fn, device=w.device) if transposed else None
    q_arg, qt_arg = (q if plain else qt), (qt if transposed else q)  # placeholders where not written
    _weight_quant_kernel[(nb, kb)](w, q_arg, qt_arg, s, N, K, w.stride(0), q_arg.stride(0), qt_arg.stride(0),
                                   s.stride(0), HAS_Q=plain, HAS_T=transposed, BLK=BLOCK, num_warps=8)
    return q, s, qt


def weight_quant_pad(w: torch.Tensor, transposed: bool = False):
    """-> (q, s), or (q, s, qt) with transposed=True: qt = q.t().contiguous() written by the same kernel."""
    q, s, qt = _weight_quant(w, True, transposed)
    return (q, s, qt) if transposed else (q, s)


def weight_quant_pad_t(w: torch.Tensor):
    """-> (qt, s): weight_quant_pad(w, transposed=True)'s qt and s without writing q (the dgrad operand
    recomputed in backward: the block read transposed only)."""
    _, s, qt = _weight_quant(w, False, True)
    return qt, s
