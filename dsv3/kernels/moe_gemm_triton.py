"""The routed experts of a decode batch as one grouped GEMM over the (token, expert) pairs sorted by expert
(Triton): each expert's weight tile is read once for all of its rows.

    moe_gemm(x, w, s, offs, x_rows=None, y_rows=None, up=None, up_s=None) -> y (M, N)
        x (T, K) bf16/fp16; w (E, N, K) in x's dtype, or e4m3 with s (E, ceil(N/128), ceil(K/128)) fp32 (the
        official 128x128 blocks); offs (E,) int32 end rows of the sorted pairs (expert e owns sorted rows
        offs[e-1]:offs[e]); sorted row m reads x[x_rows[m]] (x_rows None: x[m]) and is stored at y[y_rows[m]]
        (y_rows None: y[m]). With `up` (same layout as w): y = silu(x·wᵀ) * (x·upᵀ), the SwiGLU's first half.
        Rows past offs[-1] (an expert-parallel rank's foreign pairs) are neither read nor written.

Why (issue 14): between the one-row-per-expert GEMV (expert_gemv_triton.py, batch 1-10 of the 16b model) and
prefill, a decode batch of 32-128 sequences routes 3-12 rows to each of the 64 experts. torch._grouped_mm
(CUTLASS, 64-128-row tiles) read the 16b model's experts at 62% of the copy bandwidth at batch 32 (10.9 of a
19 ms profiled step, bench/results/s3_profile_before.txt), and FP8 experts took one GEMV per row (re-reading an
expert per row that chose it: 0.39x bf16 at batch 128, bench/RESULTS.md). Here one program takes BM rows of
one expert and BN columns, streams its (BN, K) weight slab once through tl.dot (16-row tiles: decode's rows
fill a tile or two), e4m3 weights converted to bf16 in registers (exact) and scaled per 128x128 block. The
sorted rows are read through `x_rows` (no gathered copy of x) and the down projection stores each row at its
pair's place (`y_rows`: no un-sort gather), so the MoE's decode step is: sort, two launches, the weighted sum.

Scheduling as the training FP8 grouped GEMM (fp8_grouped_triton.py `_expert_of_tile`): the number of row tiles,
Σ_e cdiv(rows_e, BM), is data-dependent, so the grid is its bound (cdiv(M, BM) + E) x N/BN, each program finds
its expert from offs on the device, and programs past the last tile return at once: no host sync, capturable
in a CUDA graph. Column tiles are the fastest grid axis: one expert's row tiles run side by side and share its
weight tiles in L2.

Math: acc += x[:, kb] · w[nb, kb]ᵀ (· s[nb, kb] for e4m3) in fp32 per 128-wide K block; silu and the product in
fp32; one rounding to x's dtype. The specification is `dsv3.kernels.reference.moe_gemm_ref`. Switched (kernels.set_moe_gemm; on
by default: backend.py SWITCHED has the measurements, bf16 and e4m3). Tests: tests/test_moe_gemm.py (Triton
interpreter), tests/test_gpu_moe_gemm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend
from dsv3.kernels.fp8_grouped_triton import _expert_of_tile
from dsv3.kernels.reference import check_moe_gemm_args

BLOCK = 128  # K step: one FP8 scale block


@triton.jit
def _moe_gemm_kernel(x_ptr, xr_ptr, w_ptr, ws_ptr, u_ptr, us_ptr, y_ptr, yr_ptr, offs_ptr, N, K, E,
                     sxm, swe, swn, sse, ssn, ssk, sym,
                     HAS_SCALE: tl.constexpr, FUSED_UP: tl.constexpr, X_ROWS: tl.constexpr, Y_ROWS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_P2: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, row0, row_end = _expert_of_tile(offs_ptr, pid_m, E, BM, E_P2)
    if e >= E:
        return
    rm = row0 + tl.arange(0, BM)
    row_ok = rm < row_end
    if X_ROWS:  # sorted row -> its token's row of x (no gathered copy)
        src = tl.load(xr_ptr + rm, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rm.to(tl.int64)
    e = e.to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rk = tl.arange(0, BK)
    x_ptrs = x_ptr + src[:, None] * sxm + rk[None, :]  # (BM, BK)
    w_ptrs = w_ptr + e * swe + rn[None, :].to(tl.int64) * swn + rk[:, None]  # (BK, BN), K contiguous
    u_ptrs = u_ptr + e * swe + rn[None, :].to(tl.int64) * swn + rk[:, None]
    s_row = ws_ptr + e * sse + (pid_n * BN // BK) * ssn  # BN divides 128: the tile lies in one scale row
    t_row = us_ptr + e * sse + (pid_n * BN // BK) * ssn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        a = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SCALE:  # e4m3 -> x's dtype is exact; the block's scale multiplies the partial product
            acc += tl.dot(a, b.to(a.dtype)) * tl.load(s_row + (k0 // BK) * ssk)
        else:
            acc = tl.dot(a, b, acc)
        if FUSED_UP:
            c = tl.load(u_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if HAS_SCALE:
                acc_u += tl.dot(a, c.to(a.dtype)) * tl.load(t_row + (k0 // BK) * ssk)
            else:
                acc_u = tl.dot(a, c, acc_u)
    if FUSED_UP:
        acc = acc * tl.sigmoid(acc) * acc_u  # silu(gate) * up, in fp32
    if Y_ROWS:  # sorted row -> its pair's place in the output (no un-sort gather)
        dst = tl.load(yr_ptr + rm, mask=row_ok, other=0).to(tl.int64)
    else:
        dst = rm.to(tl.int64)
    tl.store(y_ptr + dst[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def default_config(M: int, E: int, N: int, fp8: bool, fused: bool = False) -> dict:
    """BM: the average rows per expert rounded up to a power of two, 16..64 (tl.dot's smallest M is 16; decode
    batches up to ~170 sequences at top-6 of 64 fill one 16-row tile per expert); BN 64 (128-byte weight rows
    per load for bf16; a divisor of the 128-wide scale block); 4 warps, 3 stages (the weight tiles stream through
    shared memory). First guesses from vLLM's fused_moe configs for small M on Hopper; not yet swept. Compiled
    ahead of time for sm_90 (Triton 3.6, no GPU, 2026-12-04, with the launch's divisibility specialisation): 64-155
    registers (bf16; e4m3 fused at BM 32: 254), none spills; 40-147 KB of shared memory."""
    per_expert = -(-max(M, 1) // max(E, 1))
    # fused gate+up at 64-row tiles would take 147 KB of shared memory (3 stages): more than SM 8.6 / 8.9 have
    BM = min(max(triton.next_power_of_2(per_expert), 16), 32 if fused else 64)
    if backend.BATCH_INVARIANT:  # the batch-invariant mode (kernels/invariant.py): one tile shape for every M
        BM = 32
    return dict(BM=BM, BN=64 if N >= 64 else max(16, triton.next_power_of_2(N)), num_warps=4, num_stages=3)


def launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, offs: torch.Tensor, M: int,
           x_rows: torch.Tensor | None = None, y_rows: torch.Tensor | None = None, up: torch.Tensor | None = None,
           up_s: torch.Tensor | None = None, out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """The launch (module docstring): M sorted rows (x_rows' length, else x's rows); the output has M rows (y_rows
    a permutation of the sorted rows), or is `out` (tests: rows that no owned row maps to keep what they held).
    `config` (BM, BN, num_warps, num_stages) overrides `default_config`. Under expert parallelism BM follows M /
    E over the local experts, taller than the local rows need (a performance matter: the local count would need
    a host sync)."""
    check_moe_gemm_args(x, w, s, offs, M, x_rows, y_rows, up, up_s, kernel=True)
    E, N, K = w.shape
    fp8 = s is not None
    cfg = {**default_config(M, E, N, fp8, up is not None), **config}
    BM, BN = cfg["BM"], cfg["BN"]
    assert BLOCK % BN == 0 and BM >= 16 and BN >= 16, f"moe_gemm: BM >= 16, BN >= 16 dividing 128; got {cfg}"
    x, w = (x if x.stride(-1) == 1 else x.contiguous()), w.contiguous()
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    assert y.dtype == x.dtype and y.shape[1] == N and y.stride(1) == 1, "moe_gemm: out (rows, N) in x's dtype"
    if M == 0 or E == 0 or N == 0:
        return y
    s = s.contiguous() if fp8 else w  # a placeholder pointer, never read (HAS_SCALE is False)
    fused = up is not None
    u = up.contiguous() if fused else w
    us = up_s.contiguous() if up_s is not None else s
    offs = offs.to(torch.int32) if offs.dtype != torch.int32 else offs.contiguous()
    xr = x_rows.contiguous() if x_rows is not None else offs  # placeholders: never read without X_ROWS / Y_ROWS
    yr = y_rows.contiguous() if y_rows is not None else offs
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM) + E)
    pdl = backend.pdl(x.device)
    _moe_gemm_kernel[grid](x, xr, w, s, u, us, y, yr, offs, N, K, E, x.stride(0), w.stride(0), w.stride(1),
                           s.stride(0) if fp8 else 0, s.stride(1) if fp8 else 0, s.stride(2) if fp8 else 0,
                           y.stride(0), HAS_SCALE=fp8, FUSED_UP=fused, X_ROWS=x_rows is not None,
                           Y_ROWS=y_rows is not None, BM=BM, BN=BN, BK=BLOCK, E_P2=triton.next_power_of_2(E),
                           PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl)
    return y


# torch.library custom ops with shape-only fakes (as dsv3::expert_gemv): one opaque op per launch for
# torch.compile, capturable in a CUDA graph. Two ops: the SwiGLU's first half (gathering x by x_rows) and the
# down projection (scattering to y_rows).
@torch.library.custom_op("dsv3::moe_gemm_swiglu", mutates_args=())
def moe_gemm_swiglu_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, up: torch.Tensor,
                       up_s: torch.Tensor | None, offs: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    return launch(x, w, s, offs, x_rows.shape[0], x_rows=x_rows, up=up, up_s=up_s)


@moe_gemm_swiglu_op.register_fake
def _(x, w, s, up, up_s, offs, x_rows):
    return x.new_empty(x_rows.shape[0], w.shape[1])


@torch.library.custom_op("dsv3::moe_gemm_down", mutates_args=())
def moe_gemm_down_op(h: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, offs: torch.Tensor,
                     y_rows: torch.Tensor) -> torch.Tensor:
    return launch(h, w, s, offs, h.shape[0], y_rows=y_rows)


@moe_gemm_down_op.register_fake
def _(h, w, s, offs, y_rows):
    return h.new_empty(h.shape[0], w.shape[1])
