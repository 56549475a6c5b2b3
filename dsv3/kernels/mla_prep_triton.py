"""Absorbed MLA's decode preparation in one launch (Triton): the latent store (latent_store_triton.py: the new tokens'
latent RMSNorm, k_pe's RoPE and the paged cache write, and the query's RoPE) and the W_UK product (head_gemv_triton.py:
each head's q_nope times its W_UK, W_UKᵀ read along C), their programs side by side in one grid.

    kv_a (M, C + P), q_pe (M, H, P)            -> kv[slot, rows], pe[slot, rows] written, q_rot (M, H, P):
                                                  kernels.store_latents(..., q_pe=q_pe)
    q_nope (M, H, nope), w_uk_t (H, C, nope)   -> q_lat (M, H, C) = kernels.head_gemv(q_nope, w_uk_t)

The specification is the two operations' own: `reference.store_latents_ref` and `reference.head_gemv_ref`; this
launch computes what the two launches compute, bit for bit (below).

Why: in the graphed decode step MLA.forward_absorbed runs these two between the q / kv_a projections' launch and the
attention's split launch; they are independent of each other and read only the projections' output. At batch 1 a
launch costs ~2 us however little it does, so one launch for both is one launch a layer fewer (27 for 16b). Measured
on an H200 (2026-12-06, bench/RESULTS.md): this launch took 2.9-3.0 us where the store and the GEMV took 2.0-2.3 and
2.6-2.9 us plus a ~0.45 us gap (bench/profile_gpu.py --decode 1 --sequence); the 16b step at batch 1 FP8 554.8
against 541.9 tok/s, bf16 442.6 against 442.2 (one call each).

Grid: 1-D. Programs 0 .. M·(1 + groups) - 1 are the store's (program s is the store's (s mod M, s div M): token
s mod M, the latent's program for s div M = 0, else a group of BH query heads), the rest the GEMV's (program g is its
(h, pn, pm) = (g mod H, (g div H) mod NT, g div (H·NT)), NT = C / BN column tiles: head fastest, as in its own
grid). 16b at one row: 2 + 16 x 32 programs. Each program runs one body, `latent_store_triton._store_latents_body`
or `head_gemv_triton._head_gemv_body`: the @triton.jit functions that the two kernels themselves call, so each body
is written once. The host sides are the kernels' own too (`launch_args` of each module; the GEMV's config its
`default_config`).

Numerics: the same bodies with the same launch parameters, so the same bits as the two launches:
  * num_warps: one for the launch, the GEMV's (default_config: 4). The store's own launch takes 4 where C >= 512
    (16b and 671B: C = 512), 1 below (latent_store_triton.num_warps). So at the presets' shapes each part runs as
    in its own launch. Below C = 512 (the tests' tiny configs) the latent's sum of squares is spread over 4 warps
    instead of 1: another summation order on a GPU, so the latent can differ from the store's own launch by a
    rounding step (the store's contract already allows that against the reference); the rotations are
    elementwise, unchanged.
  * enable_fp_fusion=False, as the store's launch (its rotations must round as apply_rope's separate fp32 products
    and sums). This flag did change the GEMV: Triton's default fusion contracted its `acc += w * x` into fma.rn.f32,
    and without it they became a mul and an add, other bits (compiled for sm_90: 16-32 fma at the 16b and 671b
    configs, 1-4 rows, with the default; none without). So the body now says tl.fma itself. With the default fusion its
    PTX was then the earlier one instruction for instruction save the order of each fma's two factors (the product
    is exact inside an fma: the same bits; compared when the body changed, 16 and 128 heads, 1, 2, 4 rows, bf16), and
    with the flag off it is the same again. tests/test_mla_prep.py compiles for sm_90 and checks that the GEMV's
    PTX does not depend on the flag and that this launch has exactly its fma, the rotations none (with the default
    fusion this launch would have 13 more).
  * num_stages=1, the GEMV's (the store has no loop to pipeline).
  * PDL (backend.pdl) as both: every program first lets the next launch start, then waits for the launch before it.
Checked on the CPU: the PTX for sm_90 as said; under the Triton interpreter the outputs and the caches are the two
launches' bit for bit (the interpreter has no warps or contraction: this checks the wiring, program ids, arguments
and the grid's coverage, not a GPU's rounding). The GPU check (tests/test_gpu_mla_prep.py: bit for bit at C = 512,
and a graphed decode step) passed on an H100 (2026-12-06, bench/RESULTS.md).

Taken by MLA.forward_absorbed exactly where both the fused latent store (the static decode steps' views, graphs.py:
`store_kv_a_uk` next to `store_kv_a`) and the W_UK head GEMV are taken (batch 1: the head GEMV's rule,
DENSE_GEMV_ROWS), while switched on: kernels.set_mla_prep, on by default (bench/decode_gpu.py's +mlaprep / +nomlaprep modes
measure it).
Tests: tests/test_mla_prep.py (CPU, the interpreter, the sm_90 compile), tests/test_gpu_mla_prep.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend, head_gemv_triton, latent_store_triton
from dsv3.kernels.head_gemv_triton import _head_gemv_body
from dsv3.kernels.latent_store_triton import _store_latents_body
from dsv3.kernels.reference import check_mla_prep_args


@triton.jit
def _mla_prep_kernel(kva_ptr, w_ptr, cos_ptr, sin_ptr, rows_ptr, kv_ptr, pe_ptr, q_ptr, qo_ptr, C, P2, H, eps,
                     s_kva, s_cs, s_sn, s_kv, s_pe, s_qm, s_qh,  # the store's (latent_store_triton)
                     x_ptr, wk_ptr, y_ptr, M, N, K, KB, sxm, sxh, swh, swn, swk, sym, syh,  # the GEMV's
                     n_store, n_tiles,  # the store's programs (M·(1 + groups)); the GEMV's column tiles
                     BC: tl.constexpr, BP: tl.constexpr, BH: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr,
                     K_CONTIG: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    if pid < n_store:  # the store's program (m, g) of its (M, 1 + groups) grid
        _store_latents_body(kva_ptr, w_ptr, cos_ptr, sin_ptr, rows_ptr, kv_ptr, pe_ptr, q_ptr, qo_ptr, C, P2, H,
                            eps, s_kva, s_cs, s_sn, s_kv, s_pe, s_qm, s_qh, (pid % M).to(tl.int64), pid // M,
                            BC, BP, BH, True)
    else:  # the GEMV's program (h, pn, pm) of its (H, n_tiles, M / BM) grid
        p = pid - n_store
        _head_gemv_body(x_ptr, wk_ptr, y_ptr, M, N, K, KB, sxm, sxh, swh, swn, swk, sym, syh, (p % H).to(tl.int64),
                        (p // H) % n_tiles, p // (H * n_tiles), BM, BN, BK, KU, K_CONTIG, PREFETCH)


def launch(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor, w: torch.Tensor,
           eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor, q_nope: torch.Tensor,
           w_uk_t: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: the latent store of kv_a (latent_store_triton.launch); returns (q_lat (M, H, C) = the per-head
    GEMV of q_nope (M, H, nope) by w_uk_t (H, C, nope), the rotated q_pe, a new contiguous (M, H, P)), both in their
    inputs' dtypes (module docstring). `config` replaces the GEMV's `default_config` (tests)."""
    check_mla_prep_args(kv, pe, slot, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t, kernel=True)
    M, H, K = q_nope.shape
    N = w_uk_t.shape[1]
    cfg = config or head_gemv_triton.default_config(M, H, N, K, False)
    assert cfg["BM"] in (1, 2, 4) and all(v >= 1 and v & (v - 1) == 0 for v in (cfg["BN"], cfg["BK"])), cfg
    q_lat = torch.empty(M, H, N, dtype=q_nope.dtype, device=q_nope.device)
    if M == 0:
        return q_lat, torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)
    (sm, sg), s_args, s_const, q_rot = latent_store_triton.launch_args(kv, pe, slot, rows, kv_a, w, eps, cos, sin,
                                                                       q_pe)
    # (N or H of 0: no GEMV programs; K of 0: its programs store the empty sums, zeros, as its own launch returns)
    gemv, g_args, g_const = head_gemv_triton.launch_args(q_nope, w_uk_t, q_lat, cfg)
    pdl = backend.pdl(kv_a.device)
    _mla_prep_kernel[(sm * sg + gemv[0] * gemv[1] * gemv[2],)](
        *s_args, *g_args, sm * sg, gemv[1], BC=s_const["BC"], BP=s_const["BP"], BH=s_const["BH"], **g_const, PDL=pdl,
        num_warps=cfg["num_warps"], num_stages=1, launch_pdl=pdl, enable_fp_fusion=False)
    return q_lat, q_rot


# A custom op that declares the caches it mutates (as dsv3::store_latents_q) and returns the two new tensors (their
# shapes the inputs': allocated from the CUDA graph's pool at capture): one opaque op for torch.compile, one launch.
@torch.library.custom_op("dsv3::mla_prep", mutates_args=("kv", "pe"))
def mla_prep_op(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor,
                q_nope: torch.Tensor, w_uk_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return launch(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe, q_nope, w_uk_t)


@mla_prep_op.register_fake
def _(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe, q_nope, w_uk_t) -> tuple[torch.Tensor, torch.Tensor]:
    # contiguous, as launch's
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uk_t.shape[1]), q_pe.new_empty(q_pe.shape)
