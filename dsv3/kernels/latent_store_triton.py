"""The decode step's latent store (Triton): from the raw kv_a projection of the new tokens, the normalised latent
and the rotated shared key, written straight into the paged latent cache, in one launch.

    kv_a (M, C + P)  ->  kv[slot, rows[m]] = RMSNorm(kv_a[m, :C]; w, eps)       (C = kv_lora_rank)
                         pe[slot, rows[m]] = rope(kv_a[m, C:], cos[m], sin[m])  (P = qk_rope_head_dim, interleaved
                                                                                 pairs, dsv3/model/rope.py)
The specification is `dsv3.kernels.reference.store_latents_ref`: the model's own RMSNorm (normalised in fp32,
rounded to kv_a's dtype, times the weight) and apply_rope (fp32, rounded to kv_a's dtype), then the cache's dtype.

Why: in the graphed decode step MLA.latent + the cache's store took four kernels per layer on the H200 (16b,
batch 1, bench/profile_gpu.py --decode 1, 2026-12-04): inductor's RMSNorm and RoPE kernels (0.078 ms per token
over 27 layers) and two `index_copy` launches (0.101 ms), for 576 values per token. One program per new token
does all of it (C = 512 values and P / 2 = 32 pairs); the latents never go through memory in between.

Taken by MLA.forward_absorbed where the cache view offers it (the static decode steps' views: graphs.py
`store_kv_a`) and the kernel seam picks it: switched (kernels.set_latent_store; on by default, measured faster
with bench/decode_gpu.py's +latentstore modes), x on CUDA in bf16/fp16, no autograd.
Tests: tests/test_latent_store.py (reference and the Triton interpreter), tests/test_gpu_latent_store.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend
from dsv3.kernels.reference import check_store_latents_args


@triton.jit
def _store_latents_kernel(kva_ptr, w_ptr, cos_ptr, sin_ptr, rows_ptr, kv_ptr, pe_ptr, C, P2, eps, s_kva, s_cs, s_sn,
                          s_kv, s_pe, BC: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    m = tl.program_id(0).to(tl.int64)
    r = tl.load(rows_ptr + m).to(tl.int64)  # the cache row of token m
    src = kva_ptr + m * s_kva
    # the latent: normalised in fp32, rounded to kv_a's dtype, times the weight (one rounding of the 16-bit product)
    c = tl.arange(0, BC)
    cm = c < C
    x = tl.load(src + c, mask=cm, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    n = (x * rstd).to(kva_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    y = (n * w).to(w_ptr.dtype.element_ty)  # RMSNorm's output dtype: the weight's, which is kv_a's (the contract)
    tl.store(kv_ptr + r * s_kv + c, y.to(kv_ptr.dtype.element_ty), mask=cm)
    # the shared key: pairs (p[2j], p[2j+1]) rotated by (cos[m, j], sin[m, j]) in fp32, rounded to kv_a's dtype
    j = tl.arange(0, BP)
    jm = j < P2
    p1 = tl.load(src + C + 2 * j, mask=jm, other=0.0).to(tl.float32)
    p2 = tl.load(src + C + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
    co = tl.load(cos_ptr + m * s_cs + j, mask=jm, other=0.0)
    si = tl.load(sin_ptr + m * s_sn + j, mask=jm, other=0.0)
    y1 = (p1 * co - p2 * si).to(kva_ptr.dtype.element_ty)
    y2 = (p1 * si + p2 * co).to(kva_ptr.dtype.element_ty)
    tl.store(pe_ptr + r * s_pe + 2 * j, y1.to(pe_ptr.dtype.element_ty), mask=jm)
    tl.store(pe_ptr + r * s_pe + 2 * j + 1, y2.to(pe_ptr.dtype.element_ty), mask=jm)


def launch(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor, w: torch.Tensor,
           eps: float, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: kv[slot][rows] = RMSNorm(kv_a[:, :C]), pe[slot][rows] = rope(kv_a[:, C:]) (module docstring)."""
    check_store_latents_args(kv, pe, slot, rows, kv_a, w, cos, sin, kernel=True)
    M = kv_a.shape[0]
    if M == 0:
        return
    C, P = kv.shape[-1], pe.shape[-1]
    rows = rows.contiguous()  # the kernel reads rows[m] at m (its values are not checked: in range by contract)
    kv_s, pe_s = kv[slot], pe[slot]  # (R, C), (R, P): views at the slot's offset
    pdl = backend.pdl(kv_a.device)
    _store_latents_kernel[(M,)](kv_a, w, cos, sin, rows, kv_s, pe_s, C, P // 2, float(eps), kv_a.stride(0),
                                cos.stride(0), sin.stride(0), kv_s.stride(0), pe_s.stride(0),
                                BC=triton.next_power_of_2(C), BP=triton.next_power_of_2(max(P // 2, 1)),
                                PDL=pdl, num_warps=4 if C >= 512 else 1, launch_pdl=pdl)


# A custom op that declares what it mutates (as graphs.write_latents): torch.compile keeps it in place, one
# launch in the graph, instead of functionalising the cache writes into copies of the whole cache.
@torch.library.custom_op("dsv3::store_latents", mutates_args=("kv", "pe"))
def store_latents_op(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                     w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> None:
    launch(kv, pe, slot, rows, kv_a, w, eps, cos, sin)


@store_latents_op.register_fake
def _(kv, pe, slot, rows, kv_a, w, eps, cos, sin) -> None:
    return None
