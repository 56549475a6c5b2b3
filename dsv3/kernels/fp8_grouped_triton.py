"""Triton grouped FP8 GEMMs for the routed experts in training (SPEC §9; the recipe and its emulation,
the specification, are in dsv3/training/fp8.py). Rows of A are the (token, expert) pairs sorted by
expert; offs (E,) int32 holds each expert's END row (rows offs[e-1]:offs[e] belong to expert e,
offs[-1] = M). No host synchronisation: the kernels read offs on the device.

    fp8_grouped_mm(a, a_s, bs, offs, out_dtype, cat="n")
        Y[rows_e] = A[rows_e] · B_eᵀ, A (M, K) e4m3 with 1x128 scales, B_e (N, K) e4m3 with 128x128
        block scales -> (M, N) bf16/fp32. fprop: B = the weights; dgrad: B = their transposes. Two
        weights may share one A: concatenated along N (cat="n": gate|up fprop) or along K (cat="k":
        gate|up dgrad), read in place (the fp8 weights are never copied into one tensor)
    fp8_grouped_wgrad(a, a_s, b, b_s, offs, splits)
        dW_e = A[:, rows_e] · B[:, rows_e]ᵀ, A = Q(dYᵀ) (N, M) and B = Q(Xᵀ) (K, M), both e4m3 tiled
        1x128 along the tokens -> fp32 (E, N_i, K), one tensor per split of N

Math: for each 128-wide step of the contraction, acc += dot(a, b) · (a_scale ⊗ b_scale) in fp32 (the
paper's promotion of the tensor-core partial sums every 128 elements), so the result is the emulation's
(dequantise, fp32 matmul per expert) up to fp32 summation order.

Scheduling of fp8_grouped_mm: one program per (BM-row tile of one expert, BN-column tile). The number
of row tiles, Σ_e cdiv(count_e, BM), is data-dependent, so the grid is its upper bound,
(cdiv(M, BM) + E) · N/BN programs; each program finds its expert from offs (a cumulative sum of the
per-expert tile counts, in registers) and programs past the last tile return at once. Row tiles are
ordered GROUP_M at a time across all column tiles, so that one expert's weight tiles and those rows
stay in L2 while they are reused. Rows outside the expert's [start, end) are masked. A column tile
never straddles the two weights of cat="n" (BN divides N1).
fp8_grouped_wgrad: one program per (expert, BN rows of dW, BK columns of dW), looping over the
128-token tiles that intersect the expert's rows; a tile may straddle two experts (each element still
has exactly one scale), and the dYᵀ entries of other experts' tokens are zeroed. Experts without rows
get zeros.

Shapes: N, K multiples of 128 (the callers pad); the tile sizes below are the tuning knobs (BK and the
token tile are fixed at 128, the scale granularity). Inputs are CUDA tensors, or CPU tensors under
the Triton interpreter (TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 128  # scale granularity: 1x128 activation tiles, 128x128 weight blocks
# Tile configurations (H100 first guesses: 128x128x128 e4m3 tiles, 16 KB per operand per stage)
MM_CONFIG = dict(BM=128, BN=128, GROUP_M=8, num_warps=8, num_stages=4)
WGRAD_CONFIG = dict(BN=128, BK=128, num_warps=8, num_stages=3)


@triton.jit
def _expert_of_tile(offs_ptr, pid_m, E, BM: tl.constexpr, E_P2: tl.constexpr):
    """(expert, first row, end row) of row tile pid_m; expert >= E for tiles past the last one."""
    re = tl.arange(0, E_P2)
    ends = tl.load(offs_ptr + re, mask=re < E, other=0)
    starts = tl.load(offs_ptr + re - 1, mask=(re > 0) & (re < E), other=0)
    tiles = tl.where(re < E, tl.cdiv(ends - starts, BM), 0)  # (E_P2,) row tiles per expert
    cum = tl.cumsum(tiles, 0)  # inclusive: tiles of experts 0..e
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)  # experts whose tiles all come before pid_m
    here = re == e
    row0 = tl.sum(tl.where(here, starts + (pid_m - cum + tiles) * BM, 0), 0)
    end = tl.sum(tl.where(here, ends, 0), 0)
    return e, row0, end


@triton.jit
def _scaled_dot(acc, a_ptrs, as_ptrs, b_ptrs, bs_ptrs, row_ok):
    """acc + dot(A tile, B tile) · (a_scale ⊗ b_scale): one 128-wide step of the contraction."""
    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)  # (BM, BK) e4m3
    a_s = tl.load(as_ptrs, mask=row_ok, other=0.0)  # (BM,)
    b = tl.load(b_ptrs)  # (BK, BN) e4m3, contiguous along BK
    b_s = tl.load(bs_ptrs)  # (BN,)
    return acc + tl.dot(a, b) * (a_s[:, None] * b_s[None, :])


@triton.jit
def _grouped_mm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, b2_ptr, bs2_ptr, c_ptr, offs_ptr,
                       N, K, N1, K1, E, TILES_M,
                       stride_am, stride_asm, stride_ask,
                       stride_be, stride_bn, stride_bk, stride_bse, stride_bsn, stride_bsk,
                       stride_cm,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       E_P2: tl.constexpr):
    # B = [B1; B2] along N (columns >= N1 from B2) or [B1, B2] along K (contraction >= K1 from B2);
    # one weight: N1 = N, K1 = K. B1 and B2 share strides.
    pid = tl.program_id(0)
    width = GROUP_M * (N // BN)
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(TILES_M - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    e, row0, row_end = _expert_of_tile(offs_ptr, pid_m, E, BM, E_P2)
    if e >= E:
        return
    rm = row0 + tl.arange(0, BM)
    row_ok = rm < row_end
    rm = rm.to(tl.int64)
    rk = tl.arange(0, BK)
    n0 = pid_n * BN
    b_sel, bs_sel, n_loc = b_ptr, bs_ptr, n0
    if n0 >= N1:  # a column tile of the second weight (BN divides N1)
        b_sel, bs_sel, n_loc = b2_ptr, bs2_ptr, n0 - N1
    rn = n_loc + tl.arange(0, BN)
    e = e.to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]  # (BM, BK) at contraction step 0
    as_ptrs = as_ptr + rm * stride_asm
    b_ptrs = b_sel + e * stride_be + rn[None, :] * stride_bn + rk[:, None] * stride_bk  # (BK, BN)
    bs_ptrs = bs_sel + e * stride_bse + (rn // BK) * stride_bsn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K1, BK):
        acc = _scaled_dot(acc, a_ptrs + k, as_ptrs + (k // BK) * stride_ask, b_ptrs + k * stride_bk,
                          bs_ptrs + (k // BK) * stride_bsk, row_ok)
    # the second weight's part of the contraction (none unless concatenated along K)
    b2_ptrs = b2_ptr + e * stride_be + rn[None, :] * stride_bn + rk[:, None] * stride_bk
    bs2_ptrs = bs2_ptr + e * stride_bse + (rn // BK) * stride_bsn
    for k in range(K1, K, BK):
        acc = _scaled_dot(acc, a_ptrs + k, as_ptrs + (k // BK) * stride_ask, b2_ptrs + (k - K1) * stride_bk,
                          bs2_ptrs + ((k - K1) // BK) * stride_bsk, row_ok)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + (n0 + tl.arange(0, BN))[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _grouped_wgrad_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, c2_ptr, offs_ptr, N, K, N1,
                          stride_an, stride_asn, stride_ast, stride_bk, stride_bsk, stride_bst,
                          stride_ce, stride_c2e, stride_cn,
                          BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    # dW rows >= N1 go to the second output (gate|up); one output: N1 = N
    pid = tl.program_id(0)
    tiles_n, tiles_k = N // BN, K // BK
    e = pid // (tiles_n * tiles_k)
    pid_n = (pid % (tiles_n * tiles_k)) // tiles_k
    pid_k = pid % tiles_k
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    rt = tl.arange(0, BT)
    a_ptrs = a_ptr + rn.to(tl.int64)[:, None] * stride_an + rt[None, :]  # (BN, BT) at token tile 0
    b_ptrs = b_ptr + rk.to(tl.int64)[None, :] * stride_bk + rt[:, None]  # (BT, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for t in range(start // BT, tl.cdiv(end, BT)):  # the 128-token tiles meeting [start, end)
        rm = t * BT + rt
        ok = (rm >= start) & (rm < end)
        # whole tiles are loaded (in bounds: Mp is a multiple of 128) and dYᵀ is zeroed outside the
        # expert's rows in registers: a load masked along the contiguous token axis (expert edges
        # are not 16-byte aligned) would not be pipelined
        a = tl.load(a_ptrs + t * BT)
        a = tl.where(ok[None, :], a, tl.zeros_like(a))
        b = tl.load(b_ptrs + t * BT)  # other experts' tokens meet zeros of a
        sa = tl.load(as_ptr + rn * stride_asn + t * stride_ast)  # (BN,) dYᵀ scales of tile t
        sb = tl.load(bs_ptr + rk * stride_bsk + t * stride_bst)  # (BK,) Xᵀ scales of tile t
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
    e = e.to(tl.int64)
    n0 = pid_n * BN
    c_sel, stride_e, n_loc = c_ptr, stride_ce, n0
    if n0 >= N1:
        c_sel, stride_e, n_loc = c2_ptr, stride_c2e, n0 - N1
    rn = n_loc + tl.arange(0, BN)
    tl.store(c_sel + e * stride_e + rn.to(tl.int64)[:, None] * stride_cn + rk[None, :],
             acc.to(c_sel.dtype.element_ty))  # (one rounding from fp32: fp32 outputs store acc as it is)


def _check_device(*ts: torch.Tensor) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    assert all(t.is_cuda for t in ts), "fp8 grouped kernels: CUDA tensors (CPU only under TRITON_INTERPRET=1)"


def fp8_grouped_mm(a: torch.Tensor, a_s: torch.Tensor, bs: list[tuple[torch.Tensor, torch.Tensor]],
                   offs: torch.Tensor, out_dtype: torch.dtype, cat: str = "n") -> torch.Tensor:
    """a (M, K) e4m3 row-major, a_s (M, K/128) fp32 (any strides); bs: one or two (b (E, N_i, K_i) e4m3
    with unit stride along K_i, b_s (E, N_i/128, K_i/128) fp32), the two sharing strides and
    concatenated along N (cat="n", K_i = K) or along K (cat="k", N_i = N, ΣK_i = K); offs (E,) int32
    end rows with offs[-1] = M (rows past it would be left unwritten) -> (M, N) in out_dtype."""
    assert 1 <= len(bs) <= 2 and cat in ("n", "k")
    (b1, bs1), (b2, bs2) = bs[0], bs[-1]
    _check_device(a, a_s, b1, bs1, b2, bs2, offs)
    M, K = a.shape
    E = b1.shape[0]
    assert a.dtype == b1.dtype == b2.dtype == torch.float8_e4m3fn and a.stride(1) == 1
    assert b1.stride() == b2.stride() and bs1.stride() == bs2.stride() and b1.stride(2) == 1
    assert offs.shape == (E,) and offs.dtype == torch.int32
    if cat == "n":
        N, N1, K1 = sum(b.shape[1] for b, _ in bs), b1.shape[1], K
        assert all(b.shape[2] == K for b, _ in bs)
    else:
        N, N1, K1 = b1.shape[1], b1.shape[1], b1.shape[2]
        assert b2.shape[1] == N and K == (K1 if len(bs) == 1 else K1 + b2.shape[2])
    cfg = MM_CONFIG
    assert K % BLOCK == 0 and K1 % BLOCK == 0 and N % cfg["BN"] == 0 and N1 % cfg["BN"] == 0, \
        f"fp8_grouped_mm: N={N}, K={K} (and the split {N1}/{K1}) must be multiples of {cfg['BN']}/{BLOCK}"
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    tiles_m = triton.cdiv(M, cfg["BM"]) + E  # upper bound of Σ_e cdiv(count_e, BM)
    grid = (tiles_m * (N // cfg["BN"]),)
    _grouped_mm_kernel[grid](
        a, a_s, b1, bs1, b2, bs2, c, offs, N, K, N1, K1, E, tiles_m,
        a.stride(0), a_s.stride(0), a_s.stride(1),
        b1.stride(0), b1.stride(1), b1.stride(2), bs1.stride(0), bs1.stride(1), bs1.stride(2),
        c.stride(0),
        BM=cfg["BM"], BN=cfg["BN"], BK=BLOCK, GROUP_M=cfg["GROUP_M"], E_P2=triton.next_power_of_2(E),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return c


def fp8_grouped_wgrad(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                      offs: torch.Tensor, splits: list[int],
                      out_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """a (N, Mp) e4m3 row-major = Q(dYᵀ), a_s (N, Mp/128); b (K, Mp) e4m3 row-major = Q(Xᵀ), b_s (K, Mp/128)
    (Mp a multiple of 128, tokens past offs[-1] never read); splits: N as one or two parts -> (E, N_i, K) per
    part in out_dtype: dW_e = Σ_{m in rows_e} a[:, m] b[:, m]ᵀ, summed in fp32 and rounded once on the store (the
    bits of the fp32 result cast after; bf16 working weights take bf16 here: an fp32 result and its cast were
    three times the weight gradients' bytes alive at once, 2.8 + 1.4 GB on the 671b-slice's experts)."""
    _check_device(a, a_s, b, b_s, offs)
    N, Mp = a.shape
    K = b.shape[0]
    E = offs.shape[0]
    cfg = WGRAD_CONFIG
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.stride(1) == 1 and b.stride(1) == 1
    assert b.shape[1] == Mp and Mp % BLOCK == 0 and offs.dtype == torch.int32
    assert 1 <= len(splits) <= 2 and sum(splits) == N
    assert N % cfg["BN"] == 0 and splits[0] % cfg["BN"] == 0 and K % cfg["BK"] == 0, \
        f"fp8_grouped_wgrad: N={N} (split {splits}), K={K} must be multiples of {cfg['BN']}/{cfg['BK']}"
    assert out_dtype in (torch.float32, torch.bfloat16, torch.float16), f"fp8_grouped_wgrad: out_dtype {out_dtype}"
    outs = [torch.empty(E, n, K, dtype=out_dtype, device=a.device) for n in splits]
    c1, c2 = outs[0], outs[-1]
    grid = (E * (N // cfg["BN"]) * (K // cfg["BK"]),)
    _grouped_wgrad_kernel[grid](
        a, a_s, b, b_s, c1, c2, offs, N, K, splits[0],
        a.stride(0), a_s.stride(0), a_s.stride(1), b.stride(0), b_s.stride(0), b_s.stride(1),
        c1.stride(0), c2.stride(0), c1.stride(1),
        BN=cfg["BN"], BK=cfg["BK"], BT=BLOCK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return outs
