"""Triton GEMMs on official-format FP8 weights for decoding: y = x · dequant(W)ᵀ without ever writing
the dequantised weight, so a decode step reads 1 byte per weight instead of 2 (bf16) or 5 (dequantise
to bf16, then read it again: what `FP8Linear` does on the CPU reference path).

    fp8_linear_small_m(x, w, s)         x (M, K) bf16/fp16, w (N, K) e4m3, s (ceil(N/128), ceil(K/128))
                                        fp32 -> y (M, N) in x's dtype; for small M (decode)
    fp8_expert_rows(x, w, s, expert)    x (M, K), w (E, N, K) e4m3, s (E, ceil(N/128), ceil(K/128)),
                                        expert (M,) int: row m through expert[m] -> y (M, N); one program
                                        per row and BN-column tile (a GEMV per routed token)

Math (the specification is `dsv3.kernels.reference.weight_dequant` followed by a matmul): for each
128-wide K block kb and 128-tall N block nb, acc += (x[:, kb] · w[nb, kb]ᵀ) · s[nb, kb], accumulated in
fp32; e4m3 -> bf16 is exact, so the only difference to the reference is the fp32 summation order (and
where the GEMV form multiplies the scale in: (x·s)·w instead of (x·w)·s, one fp32 rounding apart).

Decode GEMMs are latency-bound, not FLOP-bound: a 2048x2048 e4m3 matrix is 4 MiB, ~1 us of HBM time on
an H200, about as long as one DRAM round trip, so a K loop that waits for its loads each iteration runs
many times longer than the bytes need. What makes them fast is memory-level parallelism: enough programs
(small BN: an M = 1 launch with the old 16x64 tiles had N/64 = 32 programs for 132 SMs) and enough bytes
in flight per program. Each program computes one (BM, BN) output tile in one of two forms (`_gemv_tile`,
`_dot_tile`, picked by BM):
  * GEMV (BM = 1, 2, 4; the rows kernel always): multiply-and-add into a (BM, BN, 128·KU) fp32 register
    tile, reduced over K once after the loop. One load per operand and iteration brings KU scale blocks;
    with num_stages = 2 the next iteration's loads are issued before this one's multiply-adds (registers
    double-buffered by hand: Triton's software pipelining handles only loads that go through shared
    memory). A 16-row tl.dot at M = 1 would pad x with 15 zero rows; the FLOPs would be free, but the
    GEMV form needs no shared memory and allows BN = 8.
  * DOT (BM = 16, 32): tl.dot per 128-wide block (tl.dot needs 16 rows); Triton pipelines the loads
    through shared memory, num_stages deep, KU blocks per stage.
The launch parameters:

    BM          rows per program: 1/2/4 = GEMV form, 16/32 = tl.dot form
    BN          weight rows (output columns) per program, dividing 128 (a tile sits in one scale row)
    KU          128-wide scale blocks per loop iteration (loaded together: all in flight at once)
    num_warps   as for any Triton kernel
    num_stages  loads in flight: iterations ahead + 1 (GEMV form: 1 or 2, by hand; DOT form: Triton's)

`_config_small_m(M, N, K)` / `_config_rows(M, N, K)` choose them (the reasons are in their docstrings);
`_launch_small_m(x, w, s, **config)` / `_launch_rows(x, w, s, expert, **config)` run any config
(bench/fp8_gemv_sweep.py times a sweep of them against bf16 cuBLAS). No split-K across programs: a
second reduction launch (or atomics on a zeroed output) costs about what it would save at these sizes;
a large KU is split-K inside one program instead.
Tests: tests/test_gpu.py (GPU) and tests/test_fp8_gemv.py (Triton interpreter) against the reference,
every config the heuristics return, partial edge blocks included.
The dense decode GEMV (dense_gemv_triton.py: bf16 / fp16 / fp32 weights, no scales) runs `_small_m_kernel`'s GEMV
form with HAS_SCALE=False: the same tile, without the scale loads and multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend

BLOCK = 128
# Up to these many rows the dense GEMM takes the GEMV form (BM = 1, 2, 4); above, 16-row tl.dot tiles. The
# GEMV form loads w once per row (L1 hits after the first) and its register tile grows with BM, so it
# stops paying somewhere above a few rows; 4 is a guess (the sweep measures M = 1 and M = 32 only).
GEMV_ROWS = 4
# Programs a launch should have to keep every SM busy with a few of them: 2 per SM of an H100/H200
# (132 SMs). A constant rather than a device query, so the choice is a pure function of the shape.
TARGET_PROGRAMS = 2 * 132
# Elements of the GEMV form's (BM, BN, 128·KU) tile, which sets BN's upper bound and KU: 4096 is 32 fp32
# accumulators per thread at 4 warps; double-buffered (num_stages = 2) the kernel takes ~128 registers (sm_90,
# Triton 3.6; 8192 takes 254, at the spill limit) and keeps 2 x 4 KiB of e4m3 weight per program in flight at
# BM = 1: over TARGET_PROGRAMS programs ~2 MiB, about what HBM needs to stay busy across a DRAM round trip
# (4.3 TB/s x ~0.5 us).
GEMV_TILE = 4096
# PSUM in the GEMV form (_gemv_tile): one partial sum per thread-held 16-byte group, scaled once, instead of x
# times the scale for every element. A config's "PSUM" key overrides this default (the sweeps; bench/decode_gpu.py
# +psum flips it for a whole step). Off: in a 16b batch-1 step (H100, 2026-12-06, bench/RESULTS.md) it bought the
# one-row FP8 projections nothing (460.3 against 460.8 tok/s) and cost bf16 3% (363.5 against 374.8; the dense
# GEMV and the expert GEMV together); the sweep's single-launch gains (q_proj 4.69 against 4.93 us) stay inside
# the step's spread.
GEMV_PSUM = False


@triton.jit
def _gemv_loads(x_rows, w_rows, s_ptr, ok, rk, kb0, K, KB, BK: tl.constexpr, KU: tl.constexpr,
                HAS_SCALE: tl.constexpr, WAIT: tl.constexpr = False, SG: tl.constexpr = 1):
    """Iteration kb0's operands: w and x (BM, BN, KU·128), the KU scales spread over their columns with `where`
    as a (1, 1, KU·128 / SG) tile, one per SG columns (SG = 1: each column's; PSUM: one per column group; without
    HAS_SCALE, a dense weight: no scale is loaded and s stays unused). Past K or KB (0 for the rows kernel's
    foreign rows) everything is masked: no memory traffic, zeros. WAIT (programmatic dependent launch,
    backend.pdl): the weight's loads are issued, then the program waits for the launch before it (x is its
    output), then x is read."""
    k = kb0 * BK + rk
    k_ok = ok & (k < K) & (kb0 < KB)
    w = tl.load(w_rows + k, mask=k_ok, other=0.0)  # first: the HBM loads, then x's (L1 / L2 hits)
    if WAIT:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_rows + k, mask=k_ok, other=0.0)
    s = tl.zeros((1, 1, KU * BK // SG), dtype=tl.float32)
    if HAS_SCALE:
        rs = tl.arange(0, KU * BK // SG)[None, None, :]
        for j in tl.static_range(KU):
            s = tl.where(rs // (BK // SG) == j, tl.load(s_ptr + kb0 + j, mask=kb0 + j < KB, other=0.0), s)
    return w, x, s


@triton.jit
def _gemv_tile(x_ptr, w_ptr, s_ptr, rm, rn, M, N, K, KB, sxm, swn,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr, PREFETCH: tl.constexpr,
               HAS_SCALE: tl.constexpr, PDL: tl.constexpr = False, PSUM: tl.constexpr = False,
               G: tl.constexpr = 16):
    """(BM, BN) fp32 = Σ_kb<KB (x[rm, kb] · w[rn, kb]ᵀ) · s[kb] by multiply-and-add; s_ptr: the tile's scale row.
    Every operand is loaded as a (BM, BN, KU·128) tile (x repeated along BN, w along BM: the repeats are L1
    hits) so that all share one register layout: a 1-D x broadcast in registers would be re-laid out through
    shared memory, a barrier per iteration that serialises the loads. One tl.load per operand and iteration
    issues the KU blocks' loads together. PREFETCH: the next iteration's loads are issued before this one's
    multiply-adds (registers double-buffered; the compiler otherwise interleaves the loads with the FMAs
    that wait for the first of them, leaving part of each iteration's bytes for a second round trip).
    Without HAS_SCALE the weight is dense (bf16 / fp16 / fp32: dense_gemv_triton.py) and s_ptr is not read.
    PSUM: the accumulator holds one sum per G columns (G: the elements of one thread's 16-byte load, so the sum
    stays in the thread), each group's sum times its scale once, instead of x · s for every element (the
    expert GEMV's PSUM, expert_gemv_triton._dot_part).
    PDL: the program waits for the launch before it (griddepcontrol.wait) after issuing its first weight loads
    (with PREFETCH) or before any load; KB must not come from that launch's output."""
    SG: tl.constexpr = G if PSUM else 1
    zero = tl.zeros((BM, BN, 1), dtype=tl.int64)
    x_rows = x_ptr + (zero + rm[:, None, None].to(tl.int64) * sxm)
    w_rows = w_ptr + (zero + rn[None, :, None].to(tl.int64) * swn)
    ok = (zero + rm[:, None, None] < M) & (zero + rn[None, :, None] < N)
    rk = tl.arange(0, KU * BK)[None, None, :]
    acc = tl.zeros((BM, BN, KU * BK // SG), dtype=tl.float32)
    if PREFETCH:
        w_next, x_next, s_next = _gemv_loads(x_rows, w_rows, s_ptr, ok, rk, 0, K, KB, BK, KU, HAS_SCALE, PDL, SG)
    elif PDL:
        tl.extra.cuda.gdc_wait()
    for kb0 in range(0, KB, KU):
        if PREFETCH:
            w, x, s = w_next, x_next, s_next
            w_next, x_next, s_next = _gemv_loads(x_rows, w_rows, s_ptr, ok, rk, kb0 + KU, K, KB, BK, KU,
                                                 HAS_SCALE, False, SG)
        else:
            w, x, s = _gemv_loads(x_rows, w_rows, s_ptr, ok, rk, kb0, K, KB, BK, KU, HAS_SCALE, False, SG)
        if PSUM:
            p = tl.sum(tl.reshape(w.to(tl.float32) * x.to(tl.float32), (BM, BN, KU * BK // G, G)), axis=3)
            if HAS_SCALE:
                p = p * s
            acc += p
        elif HAS_SCALE:
            acc += w.to(tl.float32) * (x.to(tl.float32) * s)
        else:
            acc += w.to(tl.float32) * x.to(tl.float32)
    return tl.sum(acc, axis=2)  # one cross-lane reduction, after the loop


@triton.jit
def _dot_tile(x_ptr, w_ptr, s_ptr, rm, rn, M, N, K, KB, sxm, swn,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr):
    """The same sum on the tensor cores: tl.dot per 128-wide block (each has its own scale), KU blocks per
    iteration; w is loaded as the (128, BN) operand tl.dot takes (no transpose in registers). Triton
    pipelines these loads through shared memory (cp.async, num_stages deep)."""
    rk = tl.arange(0, BK)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
    w_cols = w_ptr + rn[None, :].to(tl.int64) * swn
    m_ok = rm[:, None] < M
    n_ok = rn[None, :] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb0 in range(0, KB, KU):
        for j in tl.static_range(KU):
            kb = kb0 + j
            k = kb * BK + rk
            x = tl.load(x_rows + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)
            w = tl.load(w_cols + k[:, None], mask=n_ok & (k[:, None] < K), other=0.0)
            s = tl.load(s_ptr + kb, mask=kb < KB, other=0.0)
            acc += tl.dot(x, w.to(x.dtype)) * s
    return acc


# M, KB (row count, K-loop trip count) and the scales' strides are not specialised on (Triton's divisibility by
# 16 and == 1): that would compile each config again for M = 1 and for K a multiple of 2048 or not, for no
# better code (they bound the loop, mask rows, address scalar loads); N, K and the x / w / y strides, which
# set the load widths, stay specialised.
@triton.jit(do_not_specialize=["M", "KB", "ssn"])
def _small_m_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, KB, sxm, swn, ssn, sym, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, KU: tl.constexpr, DOT: tl.constexpr, PREFETCH: tl.constexpr,
                    HAS_SCALE: tl.constexpr, PDL: tl.constexpr = False, PSUM: tl.constexpr = False,
                    G: tl.constexpr = 16):
    """(M, N) = x · wᵀ, scaled per 128x128 block (HAS_SCALE, e4m3 w) or dense (bf16 / fp16 / fp32 w, the GEMV form
    only: dense_gemv_triton.py launches it so, BN any power of two, s_ptr never read). PDL: launched with
    programmatic dependent launch (backend.pdl; the wait in the GEMV form is _gemv_tile's)."""
    pm = tl.program_id(0)  # the row tiles of one column tile launch together: its weight stays in L2
    pn = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next launch may start once every program has begun
        if DOT:
            tl.extra.cuda.gdc_wait()
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    nb = (pn * BN) // BK  # BN divides 128: the tile sits in one scale row
    if DOT:
        acc = _dot_tile(x_ptr, w_ptr, s_ptr + nb * ssn, rm, rn, M, N, K, KB, sxm, swn, BM, BN, BK, KU)
    else:
        acc = _gemv_tile(x_ptr, w_ptr, s_ptr + nb * ssn, rm, rn, M, N, K, KB, sxm, swn, BM, BN, BK, KU, PREFETCH,
                         HAS_SCALE, PDL, PSUM, G)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["KB", "sse", "ssn"])
def _rows_kernel(x_ptr, w_ptr, s_ptr, e_ptr, y_ptr, N, K, KB, sxm, swe, swn, sse, ssn, sym,
                 BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr, PREFETCH: tl.constexpr,
                 PDL: tl.constexpr = False, PSUM: tl.constexpr = False):
    m = tl.program_id(0).to(tl.int64)  # rows fastest: rows sorted by expert share its tiles in L2
    pn = tl.program_id(1)
    if PDL:  # programmatic dependent launch (backend.pdl): the expert index is the launch before's output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    e = tl.load(e_ptr + m).to(tl.int64)
    # expert < 0: a row this launch does not own (an expert-parallel rank's foreign pairs, Experts.
    # forward_partial): no weight is read, the row's output is 0
    kb_end = tl.where(e >= 0, KB, 0)
    e = tl.maximum(e, 0)
    rn = pn * BN + tl.arange(0, BN)
    nb = (pn * BN) // BK
    acc = _gemv_tile(x_ptr + m * sxm, w_ptr + e * swe, s_ptr + e * sse + nb * ssn, tl.arange(0, 1), rn, 1, N, K,
                     kb_end, 0, swn, 1, BN, BK, KU, PREFETCH, True, False, PSUM)  # (1, BN)
    tl.store(y_ptr + m * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=rn[None, :] < N)


def _check(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"FP8 weight GEMM takes bf16/fp16 activations, got {x.dtype}")
    if w.dtype != torch.float8_e4m3fn or s.dtype != torch.float32:
        raise TypeError(f"expected e4m3 weights and fp32 scales, got {w.dtype}, {s.dtype}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has K = {x.shape[-1]}, the weight {w.shape[-1]}")


# --- launch configurations -------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pick_bn(tiles_m: int, N: int, choices: tuple[int, ...]) -> int:
    """The largest BN of `choices` (descending) that still gives TARGET_PROGRAMS programs, else the
    smallest: larger tiles reload x less and cost fewer programs, smaller ones fill the SMs."""
    for bn in choices:
        if tiles_m * triton.cdiv(N, bn) >= TARGET_PROGRAMS:
            return bn
    return choices[-1]


def _gemv_bns(BM: int) -> tuple[int, ...]:
    """The GEMV form's BN choices, largest first: a (BM, BN, 128) tile of at most GEMV_TILE elements."""
    return tuple(bn for bn in (64, 32, 16, 8) if BM * bn * BLOCK <= GEMV_TILE)


def _gemv_ku(BM: int, BN: int, K: int) -> int:
    """KU for a GEMV_TILE-element tile, at most the K blocks there are (no fully masked iteration), at most 8."""
    return max(1, min(GEMV_TILE // (BM * BN * BLOCK), _pow2(triton.cdiv(K, BLOCK)), 8))


def _config_small_m(M: int, N: int, K: int) -> dict:
    """Launch parameters of `_launch_small_m` for x (M, K) and w (N, K).

    Up to GEMV_ROWS rows, the GEMV form with BM = M rounded up to a power of two (no padded rows to load or
    multiply) and the largest BN (32 / BM down to 8: a tile of at most GEMV_TILE elements) that gives
    TARGET_PROGRAMS programs, else 8: at M = 1 the 2048-wide projections get BN = 8 (256 programs) where the
    old 16x64 dot tiles gave 32. KU: a GEMV_TILE tile (4 at BM = 1, BN = 8: 4 KiB of weight per load);
    num_stages 2: two such loads in flight; num_warps 4.
    Above GEMV_ROWS rows, tl.dot on BM = 16 rows (its minimum: at 17-64 rows the 2-4 row tiles of one
    column tile launch side by side and share its weight through L2, with 2-4x the programs of taller tiles),
    BN 64 or 32 by the same rule, KU = 2 and num_stages = 4: 3 iterations of 2 blocks in flight through
    shared memory, (4 - 1) · 2 · (16 · 128 · 2 + BN · 128) bytes = 36-72 KiB of it. Not 16: the H200 sweep
    (2026-12-04, bench/RESULTS.md) measured BN 32 fastest at M = 32 on 7 of the 8 16b shapes, BN 16 up to 2x
    slower (q_proj 9.6 vs 19.6 us).
    These are reasoned defaults: bench/fp8_gemv_sweep.py times them against a sweep on the 16b decode shapes
    (and prints whether they are within 5% of the best)."""
    if M <= GEMV_ROWS:
        BM = _pow2(M)
        BN = _pick_bn(1, N, _gemv_bns(BM))
        return dict(BM=BM, BN=BN, KU=_gemv_ku(BM, BN, K), num_warps=4, num_stages=2)
    BN = _pick_bn(triton.cdiv(M, 16), N, (64, 32))
    return dict(BM=16, BN=BN, KU=max(1, min(2, triton.cdiv(K, BLOCK))), num_warps=4, num_stages=4)


def _config_rows(M: int, N: int, K: int) -> dict:
    """Launch parameters of `_launch_rows` for M routed rows through (N, K) experts: one program per row
    and BN columns, so M · N / BN programs, by the GEMV rules of `_config_small_m` (BM = 1): at batch 1
    (M = 6 routed rows, N = 1408 or 2048) BN = 32 gives 264-384 programs where the old BN = 64 gave 132-192;
    at batch 32 (M = 192) BN = 32 gives thousands."""
    BN = _pick_bn(M, N, _gemv_bns(1))
    return dict(BN=BN, KU=_gemv_ku(1, BN, K), num_warps=4, num_stages=2)


def _launch_small_m(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *, BM: int, BN: int, KU: int,
                    num_warps: int, num_stages: int, PSUM: bool | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · dequant(w, s)ᵀ with the given launch parameters (module docstring)."""
    assert BM in (1, 2, 4, 16, 32, 64) and BN in (8, 16, 32, 64, 128) and (BM < 16 or BN >= 16), (BM, BN)
    M, K = x.shape
    N = w.shape[0]
    x, w, s = x.contiguous(), w.contiguous(), s.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    dot = BM >= 16
    assert dot or num_stages in (1, 2), "the GEMV form has 1 or 2 stages (prefetch by hand)"
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    pdl = backend.pdl(x.device)
    _small_m_kernel[grid](x, w, s, y, M, N, K, triton.cdiv(K, BLOCK), x.stride(0), w.stride(0), s.stride(0),
                          y.stride(0), BM=BM, BN=BN, BK=BLOCK, KU=KU, DOT=dot, PREFETCH=not dot and num_stages == 2,
                          HAS_SCALE=True, PDL=pdl, PSUM=not dot and (GEMV_PSUM if PSUM is None else PSUM),
                          num_warps=num_warps, num_stages=num_stages if dot else 1, launch_pdl=pdl)
    return y


def _launch_rows(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, expert: torch.Tensor, *, BN: int, KU: int,
                 num_warps: int, num_stages: int, PSUM: bool | None = None) -> torch.Tensor:
    """y (M, N): row m of x (M, K) through expert[m] of w (E, N, K) (0 where expert[m] < 0)."""
    assert BN in (8, 16, 32, 64, 128) and num_stages in (1, 2), (BN, num_stages)
    M, K = x.shape
    N = w.shape[1]
    x, w, s = x.contiguous(), w.contiguous(), s.contiguous()
    # the router's int64 indices as they are (the kernel loads either width): a cast here was a copy kernel per
    # launch, two per MoE layer and decode step (bench/profile_gpu.py --decode 1: 52 `direct_copy` launches)
    expert = (expert if expert.dtype in (torch.int32, torch.int64) else expert.long()).contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    grid = (M, triton.cdiv(N, BN))
    pdl = backend.pdl(x.device)
    _rows_kernel[grid](x, w, s, expert, y, N, K, triton.cdiv(K, BLOCK), x.stride(0), w.stride(0), w.stride(1),
                       s.stride(0), s.stride(1), y.stride(0), BN=BN, BK=BLOCK, KU=KU, PREFETCH=num_stages == 2,
                       PDL=pdl, PSUM=GEMV_PSUM if PSUM is None else PSUM, num_warps=num_warps, num_stages=1,
                       launch_pdl=pdl)
    return y


# Both launches are torch.library custom ops with shape-only fake implementations (as dsv3::mla_decode):
# torch.compile then treats each as one opaque op, so a compiled FP8 decode step traces through them
# instead of breaking its graph at every FP8 projection; a CUDA graph captures the launches as before.
# The config is chosen inside, on the host from the shapes: no device work, nothing for a graph to miss.
@torch.library.custom_op("dsv3::fp8_linear_small_m", mutates_args=())
def fp8_linear_small_m(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    _check(x, w, s)
    return _launch_small_m(x, w, s, **_config_small_m(x.shape[0], w.shape[0], x.shape[1]))


@fp8_linear_small_m.register_fake
def _(x, w, s):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("dsv3::fp8_expert_rows", mutates_args=())
def fp8_expert_rows(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    _check(x, w, s)
    return _launch_rows(x, w, s, expert, **_config_rows(x.shape[0], w.shape[1], x.shape[1]))


@fp8_expert_rows.register_fake
def _(x, w, s, expert):
    return x.new_empty(x.shape[0], w.shape[1])
