"""The dense decode GEMV (Triton): y (M, N) = x (M, K) · w (N, K)ᵀ for a handful of rows (decode, batch 1-4),
w bf16 / fp16 / fp32 in x's dtype, fp32 accumulation, one rounding to x's dtype (or none: fp32 output, the
router's logits: dsv3/model/moe.py `Router.logits`). No bias (no DeepSeek-V3
projection has one). The specification is `dsv3.kernels.reference.dense_gemv_ref`.

Why: at batch 1 the 16b model's dense bf16 projections (q_proj 2048->3072, o_proj 2048->2048, the shared
experts' gate/up 2048->2816 and down 2816->2048, kv_a_proj 2048->576) go through F.linear to cuBLAS, whose
64-wide N tiles (`nvjet_sm90_tst_64x8_64x16_4x1`) give N/64 CTAs for 132 SMs (48 for q_proj) and reach ~57% of
the HBM bandwidth (5.8 us a call, 106 calls a token; kv_a_proj a split-K variant plus a reduce kernel:
bench/profile_gpu.py --decode 1, 2026-12-04). The routed experts' GEMV with narrow N tiles and hand-prefetched
loads reached 86% (expert_gemv_triton.py). This is the same recipe for the dense weights: one program per BN
rows of w and every row of x (w is read once), the whole K per program, so N/BN programs (BN = 8: 384 for
q_proj), each keeping two (BM, BN, 128·KU) loads in flight.

The kernel is the FP8 decode GEMM's GEMV form without the block scales (`fp8_gemm_triton._small_m_kernel`
with HAS_SCALE=False: one GEMV tile for both weight formats, and the reasons for its shape are there); this
module holds the dense launch configurations and the custom op. Rows above 4 run in tiles of 4 (correct,
not fast: the model takes this kernel only for decode-sized inputs, backend.py's "dense_gemv" rule).

Launch parameters (as the FP8 GEMV form's):
    BM          rows per program: M rounded up to a power of two, at most GEMV_ROWS (4)
    BN          weight rows per program: 4, 8, 16, 32 or 64
    KU          128-wide K chunks per loop iteration (one load per operand brings them all)
    num_warps   as for any Triton kernel
    num_stages  1, or 2: the next iteration's loads issued before this one's multiply-adds (by hand)
`default_config(M, N, K)` picks them: a measured entry of TUNED where there is one (bench/dense_gemv_sweep.py
prints the entries to paste), else the FP8 GEMV heuristic (`fp8_gemm_triton._config_small_m`: the largest
BN >= 8 that still gives 2 programs per SM, a 4096-element register tile, prefetch). That heuristic was
tuned on e4m3 weights; bf16 weights bring twice the bytes per element with the same registers: the H200 sweep
(TUNED) preferred BN 4 on most 16b shapes at one row. `launch(x, w, config=...)` runs any config (the sweep).
Registers (compiled ahead of time for sm_90 with Triton 3.6 on a machine without a GPU, 2026-12-04): the
heuristic's configs take 96 (BM 1, BN 8, KU 4, prefetch; the FP8 form of the same tile 127), none spills; the
sweep's grid at 4 and 8 warps at most 180.

`launch_dual` / `dsv3::dense_gemv2`: two weights of one input in one launch (w1's column tiles, then w2's), taken
by absorbed MLA for q_proj (or q_a_proj) and kv_a_proj_with_mqa; `dsv3::fp8_linear2` the same for e4m3 weights
with their block scales (an FP8 checkpoint's, kernels.fp8_weight_linear2).

The model takes this kernel at one row (backend.DENSE_GEMV_ROWS; on by default, kernels.set_dense_gemv): measured
on the H200, the 188 dense linears of a 16b step take 1,060 us against cuBLAS's 1,246 at one row, and lose at two
and four (bench/RESULTS.md, 2026-12-05).
Tests: tests/test_dense_gemv.py (Triton interpreter: every config the heuristic and TUNED return, and a few
others, against the reference on ragged shapes), tests/test_gpu_dense_gemv.py (GPU: the 16b shapes, and every
config of the sweep's grid).
"""

from __future__ import annotations

import torch
import triton

import triton.language as tl

from dsv3.kernels import backend
from dsv3.kernels import fp8_gemm_triton
from dsv3.kernels.fp8_gemm_triton import (BLOCK, GEMV_ROWS, _check, _config_small_m, _gemv_tile, _pow2,
                                         _small_m_kernel)
from dsv3.kernels.reference import check_dense_gemv_args

BNS = (4, 8, 16, 32, 64)  # the BN a launch takes (the heuristic stays at 8 and above; the sweep tries 4)

# Measured launch configs by (BM, N, K), from `bench/dense_gemv_sweep.py --quick` on an H200 (2026-12-05, the 16b
# shapes at one row: the entries where its best config beat the heuristic's by more than 5%; q_proj (3072 x 2048)
# and the output head kept the heuristic's). At two and four rows the GEMV lost to cuBLAS even at its best
# (backend.DENSE_GEMV_ROWS = 1), so their entries are not kept.
_ONE_ROW = {"BM": 1, "BN": 4, "KU": 4, "num_warps": 4, "num_stages": 2}
TUNED: dict[tuple[int, int, int], dict] = {(1, N, K): _ONE_ROW for N, K in (
    (64, 2048),  # the router gate (fp32 out)
    (576, 2048),  # kv_a_proj_with_mqa
    (2048, 2048),  # o_proj
    (2048, 2816),  # shared experts' down
    (2048, 4096),  # eh_proj (MTP)
    (2048, 10944),  # the dense FFN's down
    (2816, 2048),  # shared experts' gate / up
)}


def default_config(M: int, N: int, K: int) -> dict:
    """Launch parameters for x (M, K), w (N, K) (module docstring): TUNED, else the FP8 GEMV form's heuristic
    at BM = M rounded up to a power of two (at most GEMV_ROWS)."""
    BM = min(_pow2(max(M, 1)), GEMV_ROWS)
    if (BM, N, K) in TUNED:
        return dict(TUNED[(BM, N, K)])
    cfg = _config_small_m(BM, N, K)
    assert cfg["BM"] == BM, cfg  # (the GEMV form: up to GEMV_ROWS rows)
    return cfg


def launch(x: torch.Tensor, w: torch.Tensor, config: dict | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · w (N, K)ᵀ in `out_dtype` (None: x's dtype; float32: the fp32 sums unrounded, the
    router's logits); `config` (BM, BN, KU, num_warps, num_stages) replaces `default_config` (the sweep, tests)."""
    check_dense_gemv_args(x, w, kernel=True, out_dtype=out_dtype)
    M, K = x.shape
    N = w.shape[0]
    cfg = config or default_config(M, N, K)
    BM, BN, KU, stages = cfg["BM"], cfg["BN"], cfg["KU"], cfg["num_stages"]
    assert BM in (1, 2, 4) and BN in BNS and KU >= 1 and stages in (1, 2), \
        f"dense GEMV config: BM 1/2/4, BN in {BNS}, KU >= 1, num_stages 1/2; got {cfg}"
    x = x if x.stride(-1) == 1 else x.contiguous()  # rows may be strided; K must be contiguous
    w = w.contiguous()
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)  # the kernel's store rounds to y's dtype
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    pdl = backend.pdl(x.device)  # programmatic dependent launch: the weight's first loads before the wait
    # w stands in for the scale pointer (never read: HAS_SCALE is False)
    _small_m_kernel[grid](x, w, w, y, M, N, K, triton.cdiv(K, BLOCK), x.stride(0), w.stride(0), 0, y.stride(0),
                          BM=BM, BN=BN, BK=BLOCK, KU=KU, DOT=False, PREFETCH=stages == 2, HAS_SCALE=False, PDL=pdl,
                          PSUM=cfg.get("PSUM", fp8_gemm_triton.GEMV_PSUM), G=16 // w.element_size(),
                          num_warps=cfg["num_warps"], num_stages=1, launch_pdl=pdl)
    return y


# A torch.library custom op with a shape-only fake implementation (as dsv3::fp8_linear_small_m, dsv3::expert_gemv):
# torch.compile treats it as one opaque op (a compiled decode step traces through it instead of breaking its
# graph at every projection), a CUDA graph captures the launch. The config is chosen inside, on the host from the
# shapes: no device work, nothing for a graph to miss.
@torch.library.custom_op("dsv3::dense_gemv", mutates_args=())
def dense_gemv_op(x: torch.Tensor, w: torch.Tensor, out_fp32: bool = False) -> torch.Tensor:
    return launch(x, w, out_dtype=torch.float32 if out_fp32 else None)


@dense_gemv_op.register_fake
def _(x, w, out_fp32=False):
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32 if out_fp32 else x.dtype)


# --- two weights of one input in one launch (MLA's q_proj / q_a_proj and kv_a_proj_with_mqa) ---------------------

@triton.jit(do_not_specialize=["ss1", "ss2"])
def _dual_kernel(x_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, y1_ptr, y2_ptr, M, N1, N2, K, KB, T1, sxm, sw1, sw2, ss1, ss2,
                 sy1, sy2, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr,
                 PREFETCH: tl.constexpr, HAS_SCALE: tl.constexpr = False, PDL: tl.constexpr = False,
                 PSUM: tl.constexpr = False, G: tl.constexpr = 16):
    """Column tiles 0..T1-1 of w1 then those of w2, each the GEMV tile of `_small_m_kernel`: dense (w stands in for
    the scales, never read) or, HAS_SCALE, e4m3 with its 128x128 block scales (s1, s2: row strides ss1, ss2; BN
    divides 128, so a tile sits in one scale row). PDL: programmatic dependent launch (backend.pdl; the wait is
    _gemv_tile's)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rm = pm * BM + tl.arange(0, BM)
    if pn < T1:
        rn = pn * BN + tl.arange(0, BN)
        acc = _gemv_tile(x_ptr, w1_ptr, s1_ptr + ((pn * BN) // BK) * ss1, rm, rn, M, N1, K, KB, sxm, sw1, BM, BN, BK,
                         KU, PREFETCH, HAS_SCALE, PDL, PSUM, G)
        tl.store(y1_ptr + rm[:, None].to(tl.int64) * sy1 + rn[None, :], acc.to(y1_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N1))
    else:
        rn = (pn - T1) * BN + tl.arange(0, BN)
        acc = _gemv_tile(x_ptr, w2_ptr, s2_ptr + (((pn - T1) * BN) // BK) * ss2, rm, rn, M, N2, K, KB, sxm, sw2, BM,
                         BN, BK, KU, PREFETCH, HAS_SCALE, PDL, PSUM, G)
        tl.store(y2_ptr + rm[:, None].to(tl.int64) * sy2 + rn[None, :], acc.to(y2_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N2))


def launch_dual(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, config: dict | None = None,
                s1: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x · w1ᵀ, x · w2ᵀ) in one launch: w1's column tiles, then w2's, over one grid (the config of the two
    weights' rows together: `default_config(M, N1 + N2, K)`, for e4m3 the FP8 GEMV form's
    `_config_small_m(M, N1 + N2, K)`). For two projections of one input where the second alone would leave most
    SMs idle (MLA's kv_a_proj_with_mqa: 576 rows, 72 programs at BN 8) and would cost a launch of its own.
    s1, s2: e4m3 w1, w2 with their 128x128 block scales (`dsv3::fp8_linear2`, at most GEMV_ROWS rows); None:
    dense weights in x's dtype."""
    fp8 = s1 is not None
    if fp8:
        assert s2 is not None and x.shape[0] <= GEMV_ROWS, "launch_dual: e4m3 takes both scales, <= 4 rows"
        _check(x, w1, s1)
        _check(x, w2, s2)
    else:
        check_dense_gemv_args(x, w1, kernel=True)
        check_dense_gemv_args(x, w2, kernel=True)
    M, K = x.shape
    N1, N2 = w1.shape[0], w2.shape[0]
    cfg = config or (_config_small_m(M, N1 + N2, K) if fp8 else default_config(M, N1 + N2, K))
    BM, BN, KU, stages = cfg["BM"], cfg["BN"], cfg["KU"], cfg["num_stages"]
    assert BM in (1, 2, 4) and BN in BNS and KU >= 1 and stages in (1, 2), f"dense GEMV config: {cfg}"
    x = x if x.stride(-1) == 1 else x.contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    s1, s2 = (s1.contiguous(), s2.contiguous()) if fp8 else (w1, w2)  # dense: placeholders, never read
    y1 = torch.empty(M, N1, dtype=x.dtype, device=x.device)
    y2 = torch.empty(M, N2, dtype=x.dtype, device=x.device)
    if M == 0:
        return y1, y2
    if K == 0:
        return y1.zero_(), y2.zero_()
    T1 = triton.cdiv(N1, BN)
    grid = (triton.cdiv(M, BM), T1 + triton.cdiv(N2, BN))
    pdl = backend.pdl(x.device)
    _dual_kernel[grid](x, w1, w2, s1, s2, y1, y2, M, N1, N2, K, triton.cdiv(K, BLOCK), T1, x.stride(0),
                       w1.stride(0), w2.stride(0), s1.stride(0) if fp8 else 0, s2.stride(0) if fp8 else 0, y1.stride(0),
                       y2.stride(0), BM=BM, BN=BN, BK=BLOCK, KU=KU, PREFETCH=stages == 2, HAS_SCALE=fp8, PDL=pdl,
                       PSUM=cfg.get("PSUM", fp8_gemm_triton.GEMV_PSUM), G=16 // w1.element_size(),
                       num_warps=cfg["num_warps"], num_stages=1, launch_pdl=pdl)
    return y1, y2


@torch.library.custom_op("dsv3::dense_gemv2", mutates_args=())
def dense_gemv2_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_dual(x, w1, w2)


@dense_gemv2_op.register_fake
def _(x, w1, w2):
    return x.new_empty(x.shape[0], w1.shape[0]), x.new_empty(x.shape[0], w2.shape[0])


# the same for two e4m3 weights of one input (MLA's q_proj / q_a_proj and kv_a_proj_with_mqa of an FP8 checkpoint:
# kernels.fp8_weight_linear2)
@torch.library.custom_op("dsv3::fp8_linear2", mutates_args=())
def fp8_linear2_op(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_dual(x, w1, w2, s1=s1, s2=s2)


@fp8_linear2_op.register_fake
def _(x, w1, s1, w2, s2):
    return x.new_empty(x.shape[0], w1.shape[0]), x.new_empty(x.shape[0], w2.shape[0])
