"""Triton GEMMs on official-format FP8 weights for decoding: y = x · dequant(W)ᵀ without ever writing
the dequantised weight, so a decode step reads 1 byte per weight instead of 2 (bf16) or 5 (dequantise
to bf16, then read it again: what `FP8Linear` does on the CPU reference path).

    fp8_linear_small_m(x, w, s)         x (M, K) bf16/fp16, w (N, K) e4m3, s (ceil(N/128), ceil(K/128))
                                        fp32 -> y (M, N) in x's dtype; for small M (decode), 16-row tiles
    fp8_expert_rows(x, w, s, expert)    x (M, K), w (E, N, K) e4m3, s (E, ceil(N/128), ceil(K/128)),
                                        expert (M,) int: row m through expert[m] -> y (M, N); one program
                                        per row and 64-column tile (a GEMV per routed token)

Math (the specification is `dsv3.kernels.reference.weight_dequant` followed by a matmul): for each
128-wide K block kb and 128-tall N block nb, acc += (x[:, kb] · w[nb, kb]ᵀ) · s[nb, kb], accumulated in
fp32; e4m3 -> bf16 is exact, so the only difference to the reference is the fp32 summation order.
Tests: tests/test_gpu.py against F.linear(x, weight_dequant(w, s)) on random shapes, partial edge blocks
included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _small_m_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, KB, sxm, swn, ssn, sym,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    nb = (pn * BN) // BK  # BN divides 128: the tile sits in one scale row
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BK + rk
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + k[None, :],
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * swn + k[None, :],
                    mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0)
        s = tl.load(s_ptr + nb * ssn + kb)
        acc += tl.dot(x, tl.trans(w.to(x.dtype))) * s
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _rows_kernel(x_ptr, w_ptr, s_ptr, e_ptr, y_ptr, N, K, KB, sxm, swe, swn, sse, ssn, sym,
                 BN: tl.constexpr, BK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    pn = tl.program_id(1)
    e = tl.load(e_ptr + m).to(tl.int64)
    # expert < 0: a row this launch does not own (an expert-parallel rank's foreign pairs, Experts.
    # forward_partial): no weight is read, the row's output is 0
    kb_end = tl.where(e >= 0, KB, 0)
    e = tl.maximum(e, 0)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    nb = (pn * BN) // BK
    acc = tl.zeros((BN,), dtype=tl.float32)
    for kb in range(0, kb_end):
        k = kb * BK + rk
        x = tl.load(x_ptr + m * sxm + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e * swe + rn[:, None].to(tl.int64) * swn + k[None, :],
                    mask=(rn[:, None] < N) & (k[None, :] < K), other=0.0).to(tl.float32)
        s = tl.load(s_ptr + e * sse + nb * ssn + kb)
        acc += tl.sum(w * x[None, :], axis=1) * s
    tl.store(y_ptr + m * sym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


def _check(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"FP8 weight GEMM takes bf16/fp16 activations, got {x.dtype}")
    if w.dtype != torch.float8_e4m3fn or s.dtype != torch.float32:
        raise TypeError(f"expected e4m3 weights and fp32 scales, got {w.dtype}, {s.dtype}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has K = {x.shape[-1]}, the weight {w.shape[-1]}")


# Both launches are torch.library custom ops with shape-only fake implementations (as dsv3::mla_decode):
# torch.compile then treats each as one opaque op, so a compiled FP8 decode step traces through them
# instead of breaking its graph at every FP8 projection; a CUDA graph captures the launches as before.
@torch.library.custom_op("dsv3::fp8_linear_small_m", mutates_args=())
def fp8_linear_small_m(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    _check(x, w, s)
    M, K = x.shape
    N = w.shape[0]
    x, w = x.contiguous(), w.contiguous()
    s = s.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM, BN = 16, 64
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _small_m_kernel[grid](x, w, s, y, M, N, K, triton.cdiv(K, BLOCK), x.stride(0), w.stride(0), s.stride(0),
                          y.stride(0), BM=BM, BN=BN, BK=BLOCK, num_warps=4)
    return y


@fp8_linear_small_m.register_fake
def _(x, w, s):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("dsv3::fp8_expert_rows", mutates_args=())
def fp8_expert_rows(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    _check(x, w, s)
    M, K = x.shape
    N = w.shape[1]
    x, w, s = x.contiguous(), w.contiguous(), s.contiguous()
    expert = expert.to(torch.int32).contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    BN = 64
    grid = (M, triton.cdiv(N, BN))
    _rows_kernel[grid](x, w, s, expert, y, N, K, triton.cdiv(K, BLOCK), x.stride(0), w.stride(0), w.stride(1),
                       s.stride(0), s.stride(1), y.stride(0), BN=BN, BK=BLOCK, num_warps=4)
    return y


@fp8_expert_rows.register_fake
def _(x, w, s, expert):
    return x.new_empty(x.shape[0], w.shape[1])
