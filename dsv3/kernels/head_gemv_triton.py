"""The per-head decode GEMV (Triton): y (M, H, N) = einsum("mhk,hnk->mhn", x (M, H, K), w (H, N, K)) for a
handful of rows (decode, batch 1-4), each head h multiplying its rows by its own matrix w[h]; w in x's dtype
(bf16 / fp16 / fp32), fp32 accumulation, one rounding to x's dtype. The specification is
`dsv3.kernels.reference.head_gemv_ref`.

Why: absorbed MLA (dsv3/model/mla.py `forward_absorbed`) multiplies every head's query by its own W_UK and every
head's attended latent by its own W_UV. At decode these are H small matrices (16b: 16 of 128 x 512, 2 MB in
all per layer and product; 671b: 128 of them, 16 MB), read once per step. As einsums they go to cuBLAS batched
GEMMs that took 5.7 us (W_UK) and 3.2 us (W_UV) per layer on the H200 at batch 1 (`nvjet 8x64` / `64x8 2x1`:
~350 and ~600 GB/s, 0.24 ms of a 3.5 ms 16b step: bench/profile_gpu.py --decode 1, 2026-12-04). Read at the
bandwidth they would take ~0.5 us each. This kernel spreads them over H x N/BN programs, each reading a
(BN, K) slice of its head's matrix once for all rows.

The two products read their matrices in the two orientations of kv_b_proj's weight (H, nope + v, C), C
contiguous:
  * W_UV (H, v, C) as w (H, N = v, K = C): K contiguous. The tile is the dense GEMV's (`fp8_gemm_triton.
    _gemv_tile` without scales: (BM, BN, 128·KU) loads, the sum over K after the loop), per head.
  * W_UK (H, nope, C) as w = W_UK.transpose(1, 2), (H, N = C, K = nope): N contiguous. The tile is (BM, BK, BN):
    each load reads BN consecutive columns of BK rows (coalesced along N), x repeated along N (L1 hits, one
    register layout for all operands, as in `_gemv_tile`), the sum over axis 1 after the loop. Its products are
    explicit fused multiply-adds (tl.fma): what Triton's default fp fusion made of `acc += w * x` (the PTX at the
    16b and 671b configs, compiled for sm_90, was the same instruction for instruction save the order of each fma's
    two factors, when the body changed), and they stay so in a launch compiled without fusion: mla_prep_triton.py
    runs this body (`_head_gemv_body`) beside the latent store's in one launch compiled so, with these bits.
No copy of either matrix is made: both are views of kv_b_proj's weight (or of the dequantised copy that
MLA.cache_absorbed_weights keeps for FP8 weights), so a model trained between engine steps (GRPO) is read as it
is now.

Launch parameters: BM (rows per program: M rounded up to a power of two, at most HEAD_GEMV_ROWS), BN, BK (N-
contiguous: rows of w per iteration) or KU (K-contiguous: 128-wide chunks per iteration), num_warps, PREFETCH
(K-contiguous only). `default_config(M, H, N, K, k_contig)` picks BN for about 2 programs per SM (H x N/BN >=
TARGET_PROGRAMS where it can) and a register tile of at most GEMV_TILE elements, as the dense GEMV's heuristic
does. Registers (compiled ahead of time for sm_90 with Triton 3.6 on a machine without a GPU, 2026-12-04): the
heuristic's configs at the small / 16b / 671b shapes take 32-110 with the launch's divisibility specialisation
(pointers and strides multiples of 16), none spills. Not yet measured on a GPU: the model takes this kernel only
once switched on (kernels.set_head_gemv), and bench/decode_gpu.py's `+headgemv` modes measure it against the
einsums.

Tests: tests/test_head_gemv.py (Triton interpreter: both orientations, ragged shapes, every config the
heuristic returns at the model shapes, the custom op compiled, the model's absorbed decode through it),
tests/test_gpu_head_gemv.py (GPU: the 16b and 671b shapes, a graphed decode step with the switch on);
tests/test_mla_prep.py checks that the N-contiguous form's sm_90 PTX does not depend on enable_fp_fusion.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend
from dsv3.kernels.fp8_gemm_triton import BLOCK, GEMV_TILE, TARGET_PROGRAMS, _gemv_tile, _pow2
from dsv3.kernels.reference import check_head_gemv_args

HEAD_GEMV_ROWS = 4  # rows (tokens) per program at most; more rows run in more row tiles (correct, not fast)


@triton.jit
def _gemv_tile_n(x_ptr, w_ptr, rm, rn, M, N, K, sxm, swk, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(BM, BN) fp32 = Σ_k x[rm, k] · w[k, rn] for a weight whose N is contiguous (w[k, n] at w_ptr + k·swk + n),
    x's K contiguous. Operands load as (BM, BK, BN) tiles (x repeated along N: L1 hits, one register layout);
    the cross-lane sum over K once, after the loop."""
    zero = tl.zeros((BM, BK, BN), dtype=tl.int64)
    rk = tl.arange(0, BK)[None, :, None]
    x_rows = x_ptr + (zero + rm[:, None, None].to(tl.int64) * sxm)
    w_cols = w_ptr + (zero + rn[None, None, :])
    ok = (zero + rm[:, None, None] < M) & (zero + rn[None, None, :] < N)
    acc = tl.zeros((BM, BK, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        k_ok = ok & (k < K)
        w = tl.load(w_cols + k.to(tl.int64) * swk, mask=k_ok, other=0.0)  # first: the HBM loads
        x = tl.load(x_rows + k, mask=k_ok, other=0.0)
        # an explicit multiply-add: what Triton's default fp fusion made of `acc += w * x` (module docstring), kept
        # under enable_fp_fusion=False too (mla_prep_triton's launch, compiled so for its rotations): the same bits
        acc = tl.fma(w.to(tl.float32), x.to(tl.float32), acc)
    return tl.sum(acc, axis=1)


@triton.jit
def _head_gemv_body(x_ptr, w_ptr, y_ptr, M, N, K, KB, sxm, sxh, swh, swn, swk, sym, syh, h, pn, pm,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr,
                    K_CONTIG: tl.constexpr, PREFETCH: tl.constexpr):
    """Program (h, pn, pm): head h's rows pm·BM.. times its columns pn·BN.. (h int64). The body of
    `_head_gemv_kernel` and of mla_prep_triton's launch (one body, so the same code in both)."""
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    x_h = x_ptr + h * sxh
    w_h = w_ptr + h * swh
    if K_CONTIG:  # w[h, n, k] at w_h + n·swn + k: the dense GEMV tile (no scales: w_h stands in for them)
        acc = _gemv_tile(x_h, w_h, w_h, rm, rn, M, N, K, KB, sxm, swn, BM, BN, 128, KU, PREFETCH, False)
    else:  # w[h, n, k] at w_h + n + k·swk
        acc = _gemv_tile_n(x_h, w_h, rm, rn, M, N, K, sxm, swk, BM, BN, BK)
    tl.store(y_ptr + h * syh + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _head_gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, KB, sxm, sxh, swh, swn, swk, sym, syh,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr,
                      K_CONTIG: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    h = tl.program_id(0).to(tl.int64)  # heads outermost: a head's column tiles launch together
    _head_gemv_body(x_ptr, w_ptr, y_ptr, M, N, K, KB, sxm, sxh, swh, swn, swk, sym, syh, h, tl.program_id(1),
                    tl.program_id(2), BM, BN, BK, KU, K_CONTIG, PREFETCH)


def k_contiguous(w: torch.Tensor) -> bool:
    """Whether w (H, N, K) is read along K (its K stride 1) or else along N (its N stride 1)."""
    return w.stride(2) == 1 or w.shape[2] == 1


def default_config(M: int, H: int, N: int, K: int, k_contig: bool) -> dict:
    """Launch parameters (module docstring): the largest BN (K-contiguous: 4..32; N-contiguous: 16..64, wide rows
    for coalesced loads) that still gives TARGET_PROGRAMS programs over the heads, else the smallest; the rest
    of the GEMV_TILE-element register tile along K."""
    BM = min(_pow2(max(M, 1)), HEAD_GEMV_ROWS)
    # (K-contiguous: at least one 128-wide chunk per row in the tile; N-contiguous: at least 16 rows of w)
    bns = [bn for bn in ((32, 16, 8, 4) if k_contig else (64, 32, 16))
           if BM * bn * (BLOCK if k_contig else 16) <= GEMV_TILE]
    BN = next((bn for bn in bns if H * math.ceil(N / bn) >= TARGET_PROGRAMS), bns[-1])
    BN = max(min(BN, _pow2(N)), bns[-1])
    if k_contig:
        KU = max(1, min(GEMV_TILE // (BM * BN * BLOCK), _pow2(math.ceil(K / BLOCK))))  # (a power of two: arange)
        return dict(BM=BM, BN=BN, BK=BLOCK, KU=KU, num_warps=4, PREFETCH=math.ceil(K / BLOCK) > KU)
    BK = max(1, min(GEMV_TILE // (BM * BN), _pow2(K)))
    return dict(BM=BM, BN=BN, BK=BK, KU=1, num_warps=4, PREFETCH=False)


def launch(x: torch.Tensor, w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """y (M, H, N) = einsum("mhk,hnk->mhn", x (M, H, K), w (H, N, K)) in x's dtype; x's K contiguous, w's K or N
    contiguous (any other strides). `config` replaces `default_config` (tests)."""
    check_head_gemv_args(x, w, kernel=True)
    M, H, K = x.shape
    N = w.shape[1]
    kc = k_contiguous(w)
    cfg = config or default_config(M, H, N, K, kc)
    BM, BN, BK, KU = cfg["BM"], cfg["BN"], cfg["BK"], cfg["KU"]
    assert BM in (1, 2, 4) and all(v >= 1 and v & (v - 1) == 0 for v in (BN, BK, KU)), f"head GEMV config: {cfg}"
    assert not kc or BK == BLOCK, f"head GEMV along K: BK is the 128-wide chunk, got {cfg}"
    y = torch.empty(M, H, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0 or H == 0:
        return y
    if K == 0:
        return y.zero_()
    grid, args, constexprs = launch_args(x, w, y, cfg)
    pdl = backend.pdl(x.device)
    _head_gemv_kernel[grid](*args, **constexprs, PDL=pdl, num_warps=cfg["num_warps"], num_stages=1, launch_pdl=pdl)
    return y


def launch_args(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: dict) -> tuple[tuple[int, int, int], tuple,
                                                                                         dict]:
    """The launch of y = x·wᵀ per head under `cfg` (arguments checked): (its grid (H, N / BN, M / BM),
    `_head_gemv_body`'s arguments before (h, pn, pm), its constexprs). `launch` and mla_prep_triton's launch both
    launch from it."""
    M, H, K = x.shape
    N = w.shape[1]
    BM, BN = cfg["BM"], cfg["BN"]
    grid = (H, triton.cdiv(N, BN), triton.cdiv(M, BM))
    args = (x, w, y, M, N, K, triton.cdiv(K, BLOCK), x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
            y.stride(0), y.stride(1))
    return grid, args, dict(BM=BM, BN=BN, BK=cfg["BK"], KU=cfg["KU"], K_CONTIG=k_contiguous(w),
                            PREFETCH=bool(cfg["PREFETCH"]))


# A custom op with a shape-only fake (as dsv3::dense_gemv): one opaque op for torch.compile, one launch for a
# CUDA graph; the config is chosen on the host from the shapes and strides.
@torch.library.custom_op("dsv3::head_gemv", mutates_args=())
def head_gemv_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return launch(x, w)


@head_gemv_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], x.shape[1], w.shape[1])
