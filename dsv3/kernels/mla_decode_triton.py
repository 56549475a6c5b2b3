"""Absorbed-MLA decode attention over the paged latent cache, in Triton (flash-decoding).

    mla_decode(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale, num_splits=None) -> o_lat

q_lat (B, H, C), q_pe (B, H, R) one query token per sequence; kv (n_rows, C), pe (n_rows, R) one
layer of the PagedLatentCache; block_table (B, nblk) and seq_lens (B,) int tensors on the device;
o_lat (B, H, C) in q_lat's dtype. The specification is `dsv3.kernels.reference.mla_decode_ref`
(= `MLA.forward_absorbed` at T = 1); tests/test_mla_decode.py (Triton interpreter) and
tests/test_gpu_mla_decode.py compare the two.

Why: the reference decode step gathers each sequence's padded context into a (B, S, C) copy per
layer (`kv[read_slots]`), upcasts it to fp32 and runs three einsums and a masked softmax over the
whole padded length S: the latents are copied and re-read several times per layer. All H heads
attend over the *same* latent (c_kv is the key and the value, k_pe the shared rope key: MQA-like),
so here the latents are read straight through the block table, once per group of heads, only up to
each sequence's length, and never copied.

Kernel 1 (`_split_kernel`), grid (ceil(H / HG), n_split, B):
  * a program takes HG heads of one sequence and one chunk of its context (`chunk` positions, a
    multiple of BLOCK_N). Per tile of BLOCK_N positions it maps positions to cache rows through the
    block table (any block_size; each row is C contiguous values, so loads coalesce), loads the
    kv tile (BLOCK_N, C) and pe tile (BLOCK_N, R) once, and computes
        s = (q_lat · kvᵀ + q_pe · peᵀ) · scale      two tl.dot, (HG, BLOCK_N), fp32 accumulate
        acc = acc · α + p · kv                       tl.dot with the same kv tile as the value (p as
                                                     two 16-bit terms, see the kernel)
    with an online softmax in fp32 (base 2: scale · log2 e folded in, exp2);
  * HG = 16 heads, BLOCK_N = 32 positions, 4 warps, 2 stages: tl.dot's smallest M (the 4-head test
    config pads with masked heads) and the configuration SGLang's grouped Triton decode kernel runs
    for MLA (C = 512 + R = 64) on Hopper; the (16, 512) fp32 accumulator is 64 registers a thread.
    671B has 8 head groups: each latent tile is read 8 times instead of 128, and since the head group
    is the fastest grid axis the groups of one chunk run side by side and share its tiles in L2;
  * it writes the chunk's normalised output (HG, C) and log2-sum-exp, fp32. A chunk past the
    sequence's length does no work and writes lse = -inf (weight 0 in the merge).
Kernel 2 (`_combine_kernel`), grid (H, B): o = Σ_i 2^(lse_i - max) · o_i / Σ_i 2^(lse_i - max).

The split (flash-decoding) is what fills the GPU at batch 1: B · ceil(H / HG) programs alone would
be 1 program for the 16b preset (16 heads). n_split is chosen from shapes only (B, H, the bucket's
nblk · block_size and the SM count: about two programs per SM, chunks of at least one tile, MIN_CHUNK); the
lengths stay on the device (seq_lens) and decide only how much of each chunk is read. So the grid
is fixed per shape, nothing syncs with the host, and the launch can be captured in a CUDA graph.
C and R are constexpr, padded to powers of two with masks (C = 512, R = 64 for 16b/671B; the test
configs use e.g. C = 32, R = 16).

`mla_decode_uv(..., w_uv)` (op "mla_uv", switched: kernels.set_mla_uv): the same split kernel, then
`_combine_uv_kernel`, grid (H, ceil(v / UV_BN), B), which merges the splits as `_combine_kernel` does, rounds the
latent to q_lat's dtype (what the two-launch path stores) and multiplies it by its head's W_UV rows: absorbed MLA's
value projection, o (B, H, v) = einsum("bhc,hvc->bhv", o_lat, W_UV), in the merge's launch instead of a launch of
its own. Each program merges its head's splits again (n_split x C fp32 from L2: 8 KiB at batch 1 on the 16b) and
reads a (UV_BN, C) slice of W_UV, before the PDL wait (a weight).

Wrapping: `torch.library.custom_op("dsv3::mla_decode")` with a fake (shape-only) implementation, so
torch.compile treats the call as one opaque op and launches the two kernels as in eager mode. (Letting
inductor trace into the body with `triton_op`/`wrap_triton` failed on the H100: inductor's re-compilation
of the user kernel tripped a tl.dot accumulator-type assertion that the plain launch does not.) Under
TRITON_INTERPRET=1, `triton.jit` returns an InterpretedFunction and the same code runs on CPU tensors
(how the CPU tests run the kernel).
"""

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend

HG = 16  # heads per program
BLOCK_N = 32  # context positions per tile: a (32, 512) bf16 kv tile is 32 KiB
# fewest positions one split program covers: one tile. At batch 1 the split kernel is latency-bound (8.5 us a layer
# at ~190 positions with two tiles a program, H200 2026-12-04), so more programs of one tile each finish sooner: the
# 16b model's batch-1 decode went 369.2 -> 395.4 tok/s with it (H200, graphs + compile + PDL, one run, 2026-12-05;
# 41.4 -> 42.7% of the roofline without PDL the session before). Tiles of 16 positions (BLOCK_N 16, one a program)
# lost: 385.0 against 417.8 (the next run). From batch ~8 up the grid is set by the SM count (_num_splits), so it
# changes nothing there.
MIN_CHUNK = BLOCK_N
# the batch-invariant mode's split length (positions; a multiple of BLOCK_N): every query's context in chunks of this
# many positions from 0, whatever the batch (a 4K context: 16 splits a query)
INVARIANT_CHUNK = 256


@triton.jit
def _split_kernel(q_ptr, qpe_ptr, kv_ptr, pe_ptr, table_ptr, lens_ptr, o_ptr, lse_ptr,
                  H, chunk, qk_scale,
                  sq_b, sq_h, sqp_b, sqp_h, s_kv, s_pe, st_b, st_n, so_b, so_h, so_s, sl_b, sl_h,
                  C: tl.constexpr, R: tl.constexpr, CP: tl.constexpr, RP: tl.constexpr,
                  PAGE: tl.constexpr, HG: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    hg = tl.program_id(0)
    sp = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h = hg * HG + tl.arange(0, HG)  # (HG,) this program's heads
    c = tl.arange(0, CP)
    r = tl.arange(0, RP)
    hm, cm, rm = h < H, c < C, r < R
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + c[None, :], mask=hm[:, None] & cm[None, :], other=0.0)
    qp = tl.load(qpe_ptr + b * sqp_b + h[:, None] * sqp_h + r[None, :], mask=hm[:, None] & rm[None, :], other=0.0)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, tl.load(lens_ptr + b).to(tl.int32))  # this chunk's positions: lo .. hi - 1

    m = tl.full((HG,), float("-inf"), tl.float32)  # running max (base-2 scores)
    l = tl.zeros((HG,), tl.float32)  # running sum of 2^(s - m)
    acc = tl.zeros((HG, CP), tl.float32)  # running Σ p · kv
    for start in range(lo, hi, BN):
        pos = start + tl.arange(0, BN)
        ok = pos < hi
        blk = tl.load(table_ptr + b * st_b + (pos // PAGE) * st_n, mask=ok, other=0)
        row = blk.to(tl.int64) * PAGE + pos % PAGE  # (BN,) cache rows
        k = tl.load(kv_ptr + row[:, None] * s_kv + c[None, :], mask=ok[:, None] & cm[None, :], other=0.0)  # (BN, CP)
        kp = tl.load(pe_ptr + row[:, None] * s_pe + r[None, :], mask=ok[:, None] & rm[None, :], other=0.0)  # (BN, RP)
        # "ieee": fp32 inputs stay fp32 (no TF32), as in the reference; bf16/fp16 inputs are unaffected
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.dot(qp, tl.trans(kp), s, input_precision="ieee")  # (HG, BN)
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds at least one valid position
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        # P·V with P split into two bf16/fp16 terms, p ≈ p_hi + p_lo (~16 mantissa bits): the reference
        # keeps P in fp32, and a single 8-bit P (what flash kernels do) moved random-model greedy tokens
        # off the reference's in ~half the steps (tests/test_gpu_mla_decode.py). Decode is bound by the
        # latent reads, so the second MMA is nearly free. fp32 inputs: one exact dot.
        if kv_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(p, k, acc * alpha[:, None], input_precision="ieee")  # (HG, CP)
        else:
            p_hi = p.to(k.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(k.dtype)
            acc = tl.dot(p_hi, k, acc * alpha[:, None])
            acc = tl.dot(p_lo, k, acc)  # (HG, CP)
        m = m_new

    l_safe = tl.where(l > 0, l, 1.0)  # an empty chunk (starts at or past seq_len): o = 0, lse = -inf
    o = acc / l_safe[:, None]
    lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))
    tl.store(o_ptr + b * so_b + h[:, None] * so_h + sp * so_s + c[None, :], o, mask=hm[:, None] & cm[None, :])
    tl.store(lse_ptr + b * sl_b + h * sl_h + sp, lse, mask=hm)


@triton.jit
def _combine_kernel(o_ptr, lse_ptr, out_ptr, n_split, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h,
                    C: tl.constexpr, CP: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, SP)
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + i, mask=i < n_split, other=float("-inf"))  # (SP,)
    mx = tl.max(lse, 0)  # finite: the first chunk always holds position 0
    c = tl.arange(0, CP)
    acc = tl.zeros((CP,), tl.float32)
    # den summed in split order, as acc (not a tree over SP lanes): the same sum for any n_split past the sequence's
    # last chunk, whose weights are exact zeros (the batch-invariant mode: kernels/invariant.py)
    den = tl.zeros_like(mx)
    for j in range(0, n_split):
        w = tl.exp2(tl.load(lse_ptr + b * sl_b + h * sl_h + j) - mx)
        den += w
        acc += w * tl.load(o_ptr + b * so_b + h * so_h + j * so_s + c, mask=c < C, other=0.0)
    tl.store(out_ptr + b * sout_b + h * sout_h + c, (acc / den).to(out_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _combine_uv_kernel(o_ptr, lse_ptr, w_ptr, out_ptr, n_split, V, so_b, so_h, so_s, sl_b, sl_h, sw_h, sw_n,
                       sout_b, sout_h, C: tl.constexpr, CP: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr,
                       PDL: tl.constexpr = False):
    """out[b, h, rn] = W_UV[h, rn, :] · round(merge of head h's splits), fp32 sums, one rounding (module docstring).
    PDL: the W_UV slice is read before the wait (a weight), everything else after."""
    h = tl.program_id(0)
    pn = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rn = pn * BN + tl.arange(0, BN)
    c = tl.arange(0, CP)
    w = tl.load(w_ptr + h.to(tl.int64) * sw_h + rn[:, None].to(tl.int64) * sw_n + c[None, :],
                mask=(rn[:, None] < V) & (c[None, :] < C), other=0.0)  # (BN, CP)
    if PDL:
        tl.extra.cuda.gdc_wait()
    i = tl.arange(0, SP)
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + i, mask=i < n_split, other=float("-inf"))  # (SP,)
    mx = tl.max(lse, 0)
    acc = tl.zeros((CP,), tl.float32)
    den = tl.zeros_like(mx)  # in split order, as _combine_kernel's
    for j in range(0, n_split):
        wj = tl.exp2(tl.load(lse_ptr + b * sl_b + h * sl_h + j) - mx)
        den += wj
        acc += wj * tl.load(o_ptr + b * so_b + h * so_h + j * so_s + c, mask=c < C, other=0.0)
    lat = (acc / den).to(out_ptr.dtype.element_ty).to(tl.float32)  # the latent as the two-launch path stores it
    y = tl.sum(w.to(tl.float32) * lat[None, :], axis=1)  # (BN,)
    tl.store(out_ptr + b * sout_b + h * sout_h + rn, y.to(out_ptr.dtype.element_ty), mask=rn < V)


def _num_splits(B: int, head_groups: int, S: int, device: torch.device) -> int:
    """About two programs per SM over the whole grid, each split covering at least MIN_CHUNK positions."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(-(-2 * sms // (B * head_groups)), -(-S // MIN_CHUNK)))


UV_BN = 8  # W_UV rows per combine program: 16 programs a head at v = 128, an 8 KiB bf16 slice each


def _split(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale, num_splits):
    """Checks, then the split kernel's launch -> (o_part (B, H, n_split, C) fp32, lse (B, H, n_split), n_split)."""
    assert q_lat.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", \
        "mla_decode needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    B, H, C = q_lat.shape
    R = q_pe.shape[-1]
    assert q_pe.shape == (B, H, R) and kv.shape[-1] == C and pe.shape[-1] == R and kv.shape[0] == pe.shape[0], \
        f"shapes q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, kv {tuple(kv.shape)}, pe {tuple(pe.shape)}"
    assert q_lat.dtype == q_pe.dtype == kv.dtype == pe.dtype, \
        f"one dtype expected, got {q_lat.dtype}, {q_pe.dtype}, {kv.dtype}, {pe.dtype}"
    assert kv.dtype in (torch.bfloat16, torch.float16, torch.float32), f"unsupported dtype {kv.dtype}"
    assert kv.stride(-1) == 1 and pe.stride(-1) == 1, "cache rows must be contiguous"
    assert block_table.dim() == 2 and block_table.shape[0] == B and seq_lens.shape == (B,)
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    groups = triton.cdiv(H, HG)
    S = block_table.shape[1] * block_size  # the longest context these shapes can hold
    if backend.BATCH_INVARIANT and not num_splits:
        # the batch-invariant mode (kernels/invariant.py): chunks of a fixed length from position 0, so a query's
        # splits, and the order they merge in, do not follow the batch size or the bucket's context
        chunk = INVARIANT_CHUNK
    else:
        n_split = num_splits or _num_splits(B, groups, S, q_lat.device)
        chunk = triton.cdiv(triton.cdiv(S, n_split), BLOCK_N) * BLOCK_N
    n_split = triton.cdiv(S, chunk)
    o_part = torch.empty(B, H, n_split, C, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(B, H, n_split, dtype=torch.float32, device=q_lat.device)
    pdl = backend.pdl(q_lat.device)
    _split_kernel[(groups, n_split, B)](
        q_lat, q_pe, kv, pe, block_table, seq_lens, o_part, lse,
        H, chunk, scale * math.log2(math.e),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0), pe.stride(0),
        block_table.stride(0), block_table.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        C=C, R=R, CP=_cp(C), RP=max(16, triton.next_power_of_2(R)), PAGE=block_size, HG=HG, BN=BLOCK_N, PDL=pdl,
        num_warps=4, num_stages=2, launch_pdl=pdl)
    return o_part, lse, n_split


def _cp(C: int) -> int:
    return max(16, triton.next_power_of_2(C))  # tl.dot needs dims >= 16


@torch.library.custom_op("dsv3::mla_decode", mutates_args=())
def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
               num_splits: Optional[int] = None) -> torch.Tensor:
    """See the module docstring; num_splits overrides the split count (tests)."""
    o_part, lse, n_split = _split(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale, num_splits)
    B, H, C = q_lat.shape
    out = torch.empty(B, H, C, dtype=q_lat.dtype, device=q_lat.device)
    pdl = backend.pdl(q_lat.device)
    _combine_kernel[(H, B)](
        o_part, lse, out, n_split, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        C=C, CP=_cp(C), SP=triton.next_power_of_2(n_split), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


@torch.library.custom_op("dsv3::mla_decode_uv", mutates_args=())
def mla_decode_uv(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                  w_uv: torch.Tensor, num_splits: Optional[int] = None) -> torch.Tensor:
    """mla_decode, then W_UV (H, v, C) in the merge's launch -> o (B, H, v) (module docstring)."""
    B, H, C = q_lat.shape
    assert w_uv.dim() == 3 and w_uv.shape[0] == H and w_uv.shape[2] == C and w_uv.stride(2) == 1, \
        f"w_uv (H, v, C) with C contiguous expected, got {tuple(w_uv.shape)} strides {w_uv.stride()}"
    assert w_uv.dtype == q_lat.dtype, f"w_uv in q_lat's dtype expected, got {w_uv.dtype} and {q_lat.dtype}"
    o_part, lse, n_split = _split(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale, num_splits)
    V = w_uv.shape[1]
    out = torch.empty(B, H, V, dtype=q_lat.dtype, device=q_lat.device)
    pdl = backend.pdl(q_lat.device)
    _combine_uv_kernel[(H, triton.cdiv(V, UV_BN), B)](
        o_part, lse, w_uv, out, n_split, V, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), w_uv.stride(0), w_uv.stride(1), out.stride(0), out.stride(1),
        C=C, CP=_cp(C), SP=triton.next_power_of_2(n_split), BN=UV_BN, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


@mla_decode_uv.register_fake
def _(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale, w_uv, num_splits=None):
    return q_lat.new_empty(q_lat.shape[0], q_lat.shape[1], w_uv.shape[1])


@mla_decode.register_fake
def _(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale, num_splits=None):
    return torch.empty_like(q_lat, memory_format=torch.contiguous_format)
