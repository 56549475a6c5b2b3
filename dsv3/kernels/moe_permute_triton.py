"""The training MoE's row permutation (Triton): the (token, expert) pairs' rows sorted by expert for the grouped
GEMMs, and back to tokens as the gate-weighted sum, forward and backward.

    moe_gather(x, src, div)          out[m] = x[src[m] // div]                     (the dispatch; src = order, div = K)
    moe_combine(y, inv, w)           out[n] = Σ_k w[n, k] · y[inv[n, k]]           (the combine; w None: weight 1,
                                                                                    the dispatch's backward)
    moe_combine_bwd(g, y, inv, w)    gy[inv[n, k]] = w[n, k] · g[n],               (the combine's backward)
                                     gw[n, k] = Σ_d g[n, d] · y[inv[n, k], d]

The specification is `moe_gather_ref`, `moe_combine_ref` and `moe_combine_bwd_ref` (dsv3/kernels/reference.py),
which are what Experts.forward_grouped's autograd graph computes on the reference path: the same products in fp32
and one rounding at the end, so the gathers and gy are the same bits, the sums differ only by their order.

Why: compiled, those gathers were inductor kernels that index a flattened (rows x D) range, so each element loads
its row index and the compiler cannot tell that a row's D values are contiguous: element-wise (2-byte) loads and
stores. On the `small` preset's training step (bench/profile_gpu.py --train small:..., an H100, 2026-12-06) the five
kernels that move the M = 98,304 sorted rows (each ~200 MB) took 9.5 ms of the 98 ms step, 0.11-0.28 ms each where
their bytes take ~0.07 ms. Here a program owns a tile of whole rows (BN rows x BD columns): the row index is loaded
once per row and the columns are a contiguous, vectorised range.

Grids: gather (ceil(M / BM), ceil(D / BD)); combine (ceil(N / BN), ceil(D / BD)), the K rows of each token added
in a static loop; combine backward ceil(N / BN) programs that walk D in BD chunks (gw sums over all of D), each
chunk of g loaded once for the K rows. inv is a permutation of the M rows, so gy's stores never collide: no atomics.

Wrapped as `torch.library.custom_op`s with fake implementations: torch.compile keeps them as opaque calls (it cannot
fuse the residual add and the next RMSNorm into the combine as it did; that costs one (N, D) round trip, ~2% of
what the gather saves). Taken where the kernel seam picks "moe_permute" (CUDA tensors, 16/32-bit; backend.py).
Tests: tests/test_moe_permute.py (reference and the Triton interpreter), tests/test_gpu_moe_permute.py.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(x_ptr, src_ptr, out_ptr, M, D, s_x, s_o, DIV: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    ok_m = m < M
    src = tl.load(src_ptr + m, mask=ok_m, other=0) // DIV  # (BM,) int64: one index per row
    mask = ok_m[:, None] & (d < D)[None, :]
    v = tl.load(x_ptr + src[:, None] * s_x + d[None, :], mask=mask)
    tl.store(out_ptr + m[:, None].to(tl.int64) * s_o + d[None, :], v, mask=mask)


@triton.jit
def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, N, D, s_y, s_o, K: tl.constexpr, HAS_W: tl.constexpr,
                    ACC_F32: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    ok_n = n < N
    mask = ok_n[:, None] & (d < D)[None, :]
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(inv_ptr + n * K + k, mask=ok_n, other=0)  # (BN,) int64
        v = tl.load(y_ptr + r[:, None] * s_y + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + n * K + k, mask=ok_n, other=0.0)[:, None]
        acc += v
    if not ACC_F32:  # y's dtype's sum (torch accumulates a 16-bit sum in fp32 and rounds once): the same
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + n[:, None].to(tl.int64) * s_o + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(g_ptr, y_ptr, inv_ptr, w_ptr, gy_ptr, gw_ptr, N, D, s_g, s_y, s_gy, K: tl.constexpr,
                        KP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    ok_n = n < N
    kk = tl.arange(0, KP)
    gw = tl.zeros((BN, KP), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        mask = ok_n[:, None] & (d < D)[None, :]
        g = tl.load(g_ptr + n[:, None].to(tl.int64) * s_g + d[None, :], mask=mask, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            r = tl.load(inv_ptr + n * K + k, mask=ok_n, other=0)
            wk = tl.load(w_ptr + n * K + k, mask=ok_n, other=0.0)
            y = tl.load(y_ptr + r[:, None] * s_y + d[None, :], mask=mask, other=0.0).to(tl.float32)
            gw += tl.where(kk[None, :] == k, tl.sum(g * y, axis=1)[:, None], 0.0)
            tl.store(gy_ptr + r[:, None] * s_gy + d[None, :], (g * wk[:, None]).to(gy_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_ptr + n[:, None] * K + kk[None, :], gw, mask=ok_n[:, None] & (kk < K)[None, :])


def _check_device(*ts: torch.Tensor) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert all(t.is_cuda for t in ts) or interpret, \
        "moe_permute kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"


def _tile(D: int, elems: int = 4096) -> tuple[int, int]:
    """(rows, columns) of a program's tile: whole 16-byte vectors of up to 1024 columns, ~`elems` values."""
    bd = min(triton.next_power_of_2(max(D, 1)), 1024)
    return max(elems // bd, 1), bd


@torch.library.custom_op("dsv3::moe_gather", mutates_args=())
def moe_gather(x: torch.Tensor, src: torch.Tensor, div: int = 1) -> torch.Tensor:
    """See the module docstring: x (N, D) with contiguous rows, src (M,) int64 -> (M, D) in x's dtype."""
    _check_device(x, src)
    assert x.dim() == 2 and src.dim() == 1 and src.dtype == torch.int64, \
        f"moe_gather: x (N, D), src (M,) int64; got {tuple(x.shape)}, {tuple(src.shape)} {src.dtype}"
    x = x if x.stride(1) == 1 else x.contiguous()
    src = src.contiguous()
    M, D = src.shape[0], x.shape[1]
    out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M == 0 or D == 0:
        return out
    bm, bd = _tile(D)
    _gather_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bd))](x, src, out, M, D, x.stride(0), out.stride(0),
                                                              DIV=int(div), BM=bm, BD=bd, num_warps=4)
    return out


@moe_gather.register_fake
def _(x, src, div=1):
    return x.new_empty(src.shape[0], x.shape[1])


@torch.library.custom_op("dsv3::moe_combine", mutates_args=())
def moe_combine(y: torch.Tensor, inv: torch.Tensor, w: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """See the module docstring: y (M, D) with contiguous rows, inv (N, K) int64, w (N, K) fp32 or None -> (N, D) in
    out_dtype (None: y's)."""
    _check_device(y, inv)
    N, K = inv.shape
    assert y.dim() == 2 and inv.dtype == torch.int64 and (w is None or (w.shape == inv.shape and w.dtype == torch.float32)), \
        f"moe_combine: y (M, D), inv (N, K) int64, w (N, K) fp32; got {tuple(y.shape)}, {tuple(inv.shape)} " \
        f"{inv.dtype}, {None if w is None else (tuple(w.shape), w.dtype)}"
    y = y if y.stride(1) == 1 else y.contiguous()
    inv = inv.contiguous()
    D = y.shape[1]
    out = torch.empty(N, D, dtype=out_dtype or y.dtype, device=y.device)
    if N == 0 or D == 0:
        return out
    bn, bd = _tile(D)
    _combine_kernel[(triton.cdiv(N, bn), triton.cdiv(D, bd))](
        y, inv, w.contiguous() if w is not None else inv, out, N, D, y.stride(0), out.stride(0), K=K,
        HAS_W=w is not None, ACC_F32=w is not None or y.dtype == torch.float32, BN=bn, BD=bd, num_warps=4)
    return out


@moe_combine.register_fake
def _(y, inv, w=None, out_dtype=None):
    return y.new_empty(inv.shape[0], y.shape[1], dtype=out_dtype or y.dtype)


@torch.library.custom_op("dsv3::moe_combine_bwd", mutates_args=())
def moe_combine_bwd(g: torch.Tensor, y: torch.Tensor, inv: torch.Tensor,
                    w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring: g (N, D), y (M, D), inv (N, K) int64 (a permutation of the M rows), w (N, K) fp32 ->
    gy (M, D) in y's dtype, gw (N, K) fp32."""
    _check_device(g, y, inv, w)
    N, K = inv.shape
    assert g.shape == (N, y.shape[1]) and inv.dtype == torch.int64 and w.shape == (N, K) \
        and w.dtype == torch.float32 and y.shape[0] == N * K, \
        f"moe_combine_bwd: g (N, D), y (N*K, D), inv (N, K) int64, w (N, K) fp32; got {tuple(g.shape)}, " \
        f"{tuple(y.shape)}, {tuple(inv.shape)} {inv.dtype}, {tuple(w.shape)} {w.dtype}"
    g = g if g.stride(1) == 1 else g.contiguous()
    y = y if y.stride(1) == 1 else y.contiguous()
    inv, w = inv.contiguous(), w.contiguous()
    D = y.shape[1]
    gy = torch.empty_like(y, memory_format=torch.contiguous_format)
    gw = torch.empty(N, K, dtype=torch.float32, device=y.device)
    if N == 0:
        return gy, gw
    bd = min(triton.next_power_of_2(max(D, 1)), 256)
    bn = max(2048 // bd, 1)
    _combine_bwd_kernel[(triton.cdiv(N, bn),)](g, y, inv, w, gy, gw, N, D, g.stride(0), y.stride(0), gy.stride(0),
                                               K=K, KP=triton.next_power_of_2(K), BN=bn, BD=bd, num_warps=4)
    return gy, gw


@moe_combine_bwd.register_fake
def _(g, y, inv, w):
    return torch.empty_like(y, memory_format=torch.contiguous_format), w.new_empty(inv.shape)
