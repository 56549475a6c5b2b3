"""The decode step's latent store (Triton): from the raw kv_a projection of the new tokens, the normalised latent
and the rotated shared key, written straight into the paged latent cache, and (optionally) the rotated rope part
of their query, in one launch.

    kv_a (M, C + P)    ->  kv[slot, rows[m]] = RMSNorm(kv_a[m, :C]; w, eps)       (C = kv_lora_rank)
                           pe[slot, rows[m]] = rope(kv_a[m, C:], cos[m], sin[m])  (P = qk_rope_head_dim,
                                                                                   interleaved pairs,
                                                                                   dsv3/model/rope.py)
    q_pe (M, H, P)     ->  out[m, h] = rope(q_pe[m, h], cos[m], sin[m])          (a new contiguous (M, H, P))

The specification is `dsv3.kernels.reference.store_latents_ref`: the model's own RMSNorm (normalised in fp32,
rounded to kv_a's dtype, times the weight) and apply_rope (fp32, rounded to kv_a's dtype, or q_pe's for the
query), then the cache's dtype. q_pe is read where it lies: the rope columns of each head of the q projection's
output (M, H, nope + P), a strided view (no copy); only its last dimension must be contiguous. The rotations are
compiled without multiply-add contraction (`enable_fp_fusion=False`), so they round as eager apply_rope's
separate fp32 products and sums: the same bits (the RMSNorm's sum of squares is in another order than torch's,
so the latent can differ from the reference by a rounding step; the flag also takes the fma out of that sum, so
the latent's bits may differ by a rounding step from the launch before the flag). Checked on the CPU by compiling
the 16b launch for sm_90: no fma in its PTX (Triton's default fusion makes 13), and bit for bit under the
interpreter in fp16 (its bf16 cast truncates); on an H200 (2026-12-06) tests/test_gpu_latent_store.py passed, 39
of 39, the bit-for-bit rotation included (bench/results/s18_gpu_tests.txt). (Inductor's
own RoPE kernel, the compiled step's path without this one, keeps the default fusion: that path can differ
from eager apply_rope by a rounding step, this one does not.)

Grid (M, 1 + ceil(H / BH)): program (m, 0) normalises token m's latent and rotates its key (C = 512 values and
P / 2 = 32 pairs for 16b), programs (m, g >= 1) rotate BH of its query heads each (a tile of about QUERY_TILE
pairs: 16b's 16 heads x 32 pairs in one program).

Why: in the graphed decode step MLA.latent + the cache's store took four kernels per layer on the H200 (16b,
batch 1, bench/profile_gpu.py --decode 1, 2026-12-04): inductor's RMSNorm and RoPE kernels (0.078 ms per token
over 27 layers) and two `index_copy` launches (0.101 ms), for 576 values per token. One program per new token
does all of it; the latents never go through memory in between. The query's RoPE was then a kernel of its own
in the compiled step (inductor's, ~1.6 us + ~0.45 us of gap per layer at batch 1, 27 layers): its own programs
in this launch remove it, one launch fewer per layer. Measured on an H200 (2026-12-06, bench/RESULTS.md): the 16b
bf16 step at batch 1 did not get faster (442 tok/s before and after): inductor now materialises the cos / sin it
hands this launch in a kernel of its own (~1.3 us) in about every other layer, where before it fused them into its
RoPE kernel. The switch's measurement (bench/decode_gpu.py's +latentstore modes) predates the query's part.

Taken by MLA.forward_absorbed where the cache view offers it (the static decode steps' views: graphs.py
`store_kv_a`, given the query's unrotated rope part) and the kernel seam picks it: switched
(kernels.set_latent_store, which also switches the query's rotation; on by default, measured faster with
bench/decode_gpu.py's +latentstore modes), x on CUDA in bf16/fp16, no autograd.
Where the W_UK product takes the per-head GEMV too and kernels.set_mla_prep is on, this body
(`_store_latents_body`) runs in mla_prep_triton.py's launch beside the GEMV's, with the same bits at C >= 512.
Tests: tests/test_latent_store.py (reference and the Triton interpreter), tests/test_gpu_latent_store.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend
from dsv3.kernels.reference import check_store_latents_args


@triton.jit
def _store_latents_body(kva_ptr, w_ptr, cos_ptr, sin_ptr, rows_ptr, kv_ptr, pe_ptr, q_ptr, qo_ptr, C, P2, H, eps,
                        s_kva, s_cs, s_sn, s_kv, s_pe, s_qm, s_qh, m, g, BC: tl.constexpr, BP: tl.constexpr,
                        BH: tl.constexpr, HAS_Q: tl.constexpr):
    """Program (m, g) of the store: g = 0 normalises token m's latent and rotates its key; g >= 1 (HAS_Q) rotates
    its query heads (g - 1) * BH .. g * BH - 1. m int64. The body of `_store_latents_kernel` and of
    mla_prep_triton's launch (one body, so the same code in both)."""
    j = tl.arange(0, BP)  # the pair index: pairs (x[2j], x[2j + 1]) rotated by (cos[m, j], sin[m, j])
    jm = j < P2
    co = tl.load(cos_ptr + m * s_cs + j, mask=jm, other=0.0)
    si = tl.load(sin_ptr + m * s_sn + j, mask=jm, other=0.0)
    if g == 0:
        r = tl.load(rows_ptr + m).to(tl.int64)  # the cache row of token m
        src = kva_ptr + m * s_kva
        # the latent: normalised in fp32, rounded to kv_a's dtype, times the weight (one rounding of the 16-bit
        # product)
        c = tl.arange(0, BC)
        cm = c < C
        x = tl.load(src + c, mask=cm, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
        n = (x * rstd).to(kva_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        y = (n * w).to(w_ptr.dtype.element_ty)  # RMSNorm's output dtype: the weight's, which is kv_a's (the contract)
        tl.store(kv_ptr + r * s_kv + c, y.to(kv_ptr.dtype.element_ty), mask=cm)
        # the shared key: rotated in fp32, rounded to kv_a's dtype
        p1 = tl.load(src + C + 2 * j, mask=jm, other=0.0).to(tl.float32)
        p2 = tl.load(src + C + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
        y1 = (p1 * co - p2 * si).to(kva_ptr.dtype.element_ty)
        y2 = (p1 * si + p2 * co).to(kva_ptr.dtype.element_ty)
        tl.store(pe_ptr + r * s_pe + 2 * j, y1.to(pe_ptr.dtype.element_ty), mask=jm)
        tl.store(pe_ptr + r * s_pe + 2 * j + 1, y2.to(pe_ptr.dtype.element_ty), mask=jm)
    if HAS_Q:
        if g > 0:
            # the query's rope part, BH heads (rows of the tile) by BP pairs: the same rotation, rounded to q's
            # dtype, into the contiguous (M, H, 2 * P2) output
            h = (g - 1) * BH + tl.arange(0, BH)
            hm = (h[:, None] < H) & jm[None, :]  # (BH, BP)
            src_q = q_ptr + m * s_qm + h[:, None].to(tl.int64) * s_qh + 2 * j[None, :]
            q1 = tl.load(src_q, mask=hm, other=0.0).to(tl.float32)
            q2 = tl.load(src_q + 1, mask=hm, other=0.0).to(tl.float32)
            z1 = (q1 * co[None, :] - q2 * si[None, :]).to(qo_ptr.dtype.element_ty)
            z2 = (q1 * si[None, :] + q2 * co[None, :]).to(qo_ptr.dtype.element_ty)
            dst = qo_ptr + (m * H + h[:, None].to(tl.int64)) * (2 * P2) + 2 * j[None, :]
            tl.store(dst, z1, mask=hm)
            tl.store(dst + 1, z2, mask=hm)


@triton.jit
def _store_latents_kernel(kva_ptr, w_ptr, cos_ptr, sin_ptr, rows_ptr, kv_ptr, pe_ptr, q_ptr, qo_ptr, C, P2, H, eps,
                          s_kva, s_cs, s_sn, s_kv, s_pe, s_qm, s_qh, BC: tl.constexpr, BP: tl.constexpr,
                          BH: tl.constexpr, HAS_Q: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)  # 0: token m's latents; g >= 1 (HAS_Q): its query heads (g - 1) * BH .. g * BH - 1
    _store_latents_body(kva_ptr, w_ptr, cos_ptr, sin_ptr, rows_ptr, kv_ptr, pe_ptr, q_ptr, qo_ptr, C, P2, H, eps,
                        s_kva, s_cs, s_sn, s_kv, s_pe, s_qm, s_qh, m, g, BC, BP, BH, HAS_Q)


# the query tile of one program: BH heads x BP pairs, about QUERY_TILE pairs (16b: R = 64, its 16 heads in one
# program; 671B's 128 heads in 8)
QUERY_TILE = 512


def launch_args(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor | None
                ) -> tuple[tuple[int, int], tuple, dict, torch.Tensor | None]:
    """The store's launch for M >= 1 rows (arguments checked): (its grid (M, 1 + groups), `_store_latents_body`'s
    arguments before (m, g), its constexprs, the query's output or None). `launch` and mla_prep_triton's launch
    both launch from it."""
    M = kv_a.shape[0]
    C, P = kv.shape[-1], pe.shape[-1]
    q_out = None if q_pe is None else torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)  # (M, H, P)
    rows = rows.contiguous()  # the kernel reads rows[m] at m (its values are not checked: in range by contract)
    kv_s, pe_s = kv[slot], pe[slot]  # (R, C), (R, P): views at the slot's offset
    BP = triton.next_power_of_2(max(P // 2, 1))
    if q_pe is None:  # no query programs (kv_a stands in for the unused query pointers)
        H, BH, groups, q_in, q_o, s_qm, s_qh = 0, 1, 0, kv_a, kv_a, 0, 0
    else:
        H = q_pe.shape[1]
        BH = min(triton.next_power_of_2(max(H, 1)), max(1, QUERY_TILE // BP))  # heads per program
        groups, q_in, q_o, s_qm, s_qh = triton.cdiv(H, BH), q_pe, q_out, q_pe.stride(0), q_pe.stride(1)
    args = (kv_a, w, cos, sin, rows, kv_s, pe_s, q_in, q_o, C, P // 2, H, float(eps), kv_a.stride(0), cos.stride(0),
            sin.stride(0), kv_s.stride(0), pe_s.stride(0), s_qm, s_qh)
    return (M, 1 + groups), args, dict(BC=triton.next_power_of_2(C), BP=BP, BH=BH, HAS_Q=q_pe is not None), q_out


def num_warps(C: int) -> int:
    """The store's warps: 4 for a 512-wide latent (16b, 671B), 1 for narrow ones (the RMSNorm's sum is one
    program's)."""
    return 4 if C >= 512 else 1


def launch(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor, w: torch.Tensor,
           eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor | None = None) -> torch.Tensor | None:
    """In place: kv[slot][rows] = RMSNorm(kv_a[:, :C]), pe[slot][rows] = rope(kv_a[:, C:]); with the query's rope
    part q_pe (M, H, P), any strides but the last, returns its rotation, a new contiguous (M, H, P) in q_pe's
    dtype (module docstring)."""
    check_store_latents_args(kv, pe, slot, rows, kv_a, w, cos, sin, q_pe, kernel=True)
    if kv_a.shape[0] == 0:
        return None if q_pe is None else torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)
    grid, args, constexprs, q_out = launch_args(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe)
    pdl = backend.pdl(kv_a.device)
    # enable_fp_fusion=False: no multiply-add contraction, so each rotation rounds as apply_rope's separate fp32
    # products and sum do (eager PyTorch): the same bits, not one rounding apart
    _store_latents_kernel[grid](*args, **constexprs, PDL=pdl, num_warps=num_warps(kv.shape[-1]), launch_pdl=pdl,
                                enable_fp_fusion=False)
    return q_out


# A custom op that declares what it mutates (as graphs.write_latents): torch.compile keeps it in place, one
# launch in the graph, instead of functionalising the cache writes into copies of the whole cache.
@torch.library.custom_op("dsv3::store_latents", mutates_args=("kv", "pe"))
def store_latents_op(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                     w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> None:
    launch(kv, pe, slot, rows, kv_a, w, eps, cos, sin)


@store_latents_op.register_fake
def _(kv, pe, slot, rows, kv_a, w, eps, cos, sin) -> None:
    return None


# The same launch with the query's rope part: the caches mutated as above, the rotated query a new tensor (its
# shape is the input's: allocated from the CUDA graph's pool at capture, no data-dependent size).
@torch.library.custom_op("dsv3::store_latents_q", mutates_args=("kv", "pe"))
def store_latents_q_op(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                       w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor
                       ) -> torch.Tensor:
    return launch(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe)


@store_latents_q_op.register_fake
def _(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe) -> torch.Tensor:
    return q_pe.new_empty(q_pe.shape)  # contiguous, as launch's
