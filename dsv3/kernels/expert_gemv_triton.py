"""Routed experts of a decode step as GEMVs (Triton): each (token, expert) pair is one output row computed
straight from its expert's weights, with no sort, no gather of the activations and no grouped-GEMM set-up.

    expert_gemv(x, w, s, expert, x_div, up, up_s) -> y (M, N)
        x (T, K) bf16/fp16; w (E, N, K) in x's dtype, or e4m3 with s (E, ceil(N/128), ceil(K/128)) fp32
        (the official 128x128 blocks); expert (M,) int: row m reads x[m // x_div] through expert[m]'s
        weight, and is 0 (reading no weight) where expert[m] < 0. With `up` (same layout as w):
        y = silu(x·wᵀ) * (x·upᵀ), the SwiGLU's first half in one pass over both matrices.

Why (issue 14, batch-1 decode): at one token per step a MoE layer's routed experts are 6-8 GEMVs. The grouped
GEMM path sorts the pairs, gathers the rows, builds the grouped problem on the device and runs CUTLASS tiles
of 64-128 rows for one real row each: on an H200 the 16b model's routed experts took 108 us per layer at
batch 1 (the grouped GEMMs and the ~10 small kernels around them; 104 MB of weights, 23% of the copy
bandwidth). Here a layer's routed experts are two launches (gate+up+SwiGLU, down) whose programs each stream
a BN x K slab of one expert: (M x N / BN) programs, enough to fill the GPU at M = 6, each keeping its loads
in flight (the kernel's comments): 19 + 10 us at 86-87% of the bandwidth (bench/RESULTS.md, 2026-12-04).
Each row re-reads its expert's weights, so the caller takes this path only while rows <= experts (about one
row per expert, Experts.forward); above, the grouped GEMM reads each expert once.

Math: for each 128-wide K block, acc += (w[nb, kb] · x[kb]) (· s[nb, kb] for e4m3), fp32 accumulation;
silu and the product in fp32; one rounding to x's dtype. The specification is
`dsv3.kernels.reference.expert_gemv_ref`; tests: tests/test_expert_gemv.py (Triton interpreter) and
tests/test_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.kernels import backend
from dsv3.kernels.reference import check_expert_gemv_args, check_second_stack, routed_rows

BLOCK = 128  # K step: one FP8 scale block


@triton.jit
def _loads(x_row, w_rows, u_rows, ws_row, us_row, ok, rk, kb0, K, KB, HAS_SCALE: tl.constexpr,
           FUSED_UP: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr, WAIT: tl.constexpr = False,
           SG: tl.constexpr = 1):
    """Iteration kb0's operands as (BN, KU·128) tiles: w (and up), x repeated along BN (L1 hits; a 1-D x broadcast
    in registers would be re-laid out through shared memory, a barrier per iteration), and the scales of w and up
    as (1, KU·128 / SG) tiles, one per SG columns (SG = 1: each column's own; PSUM: one per group). Past K or KB
    (0 for a foreign row) everything is masked: no memory traffic, zeros. WAIT (programmatic dependent launch):
    the weights' loads issued, the program waits for the launch before it, then reads x."""
    k = kb0 * BK + rk
    k_ok = ok & (k < K) & (kb0 < KB)
    w = tl.load(w_rows + k, mask=k_ok, other=0.0)  # the HBM loads first, then x's (cache hits)
    u = w
    if FUSED_UP:
        u = tl.load(u_rows + k, mask=k_ok, other=0.0)
    if WAIT:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
    s = tl.zeros((1, KU * BK // SG), dtype=tl.float32)
    t = tl.zeros((1, KU * BK // SG), dtype=tl.float32)
    if HAS_SCALE:  # the weight's 128x128 block scale, spread over the block's columns (or column groups)
        rs = tl.arange(0, KU * BK // SG)[None, :]
        for j in tl.static_range(KU):
            s = tl.where(rs // (BK // SG) == j, tl.load(ws_row + kb0 + j, mask=kb0 + j < KB, other=0.0), s)
            if FUSED_UP:
                t = tl.where(rs // (BK // SG) == j, tl.load(us_row + kb0 + j, mask=kb0 + j < KB, other=0.0), t)
    return w, u, x, s, t


@triton.jit
def _dot_part(acc, w, x, s, HAS_SCALE: tl.constexpr, PSUM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr):
    """acc + one iteration's products. PSUM: acc (BN, KU·128 / G) gets each G-column group's sum w·x times the
    group's scale; G is what one thread loads as one 16-byte vector, so the group's sum stays in the thread and
    the scale costs one multiply a group. Otherwise acc (BN, KU·128) gets w·(x·s) element by element: x times the
    scale again for every element a thread holds (the SASS: about 5 instructions a weight element against 4)."""
    if PSUM:
        p = tl.sum(tl.reshape(w.to(tl.float32) * x, (BN, x.shape[1] // G, G)), axis=2)
        if HAS_SCALE:
            p = p * s
    else:
        if HAS_SCALE:
            x = x * s
        p = w.to(tl.float32) * x
    return acc + p


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, ws_ptr, u_ptr, us_ptr, e_ptr, y_ptr, N, K, KB, x_div, sxm, swe, swn, sse, ssn,
                 sym, w2_ptr, ws2_ptr, u2_ptr, us2_ptr, E1, swe2, swn2, sse2, ssn2, KR, RG,
                 HAS_SCALE: tl.constexpr, FUSED_UP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 KU: tl.constexpr, PREFETCH: tl.constexpr, ONE_EXPERT: tl.constexpr = False, PDL: tl.constexpr = False,
                 EARLY: tl.constexpr = False, TWO: tl.constexpr = False, PSUM: tl.constexpr = False,
                 G: tl.constexpr = 16, ROUTED: tl.constexpr = False):
    # PDL (programmatic dependent launch, backend.pdl): the next launch may start once every program has begun;
    # this one waits for the launch before it before reading its output (x, the expert index) or writing. EARLY
    # (ONE_EXPERT with PDL and PREFETCH: the weights do not depend on that launch): the first weight loads go
    # before the wait (_loads' WAIT); else the wait comes first.
    tl.static_assert(not EARLY or (PREFETCH and ONE_EXPERT and PDL), "EARLY: the prefetch prologue holds the wait")
    m = tl.program_id(0).to(tl.int64)
    pn = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if not EARLY:
            tl.extra.cuda.gdc_wait()
    if ONE_EXPERT:  # a dense SwiGLU (the shared experts, a dense FFN): every row through matrix 0, no index read
        e = tl.zeros((), dtype=tl.int64)
    elif ROUTED:  # row m = token m // RG's slot j: its j-th routed expert (KR a token), then second-stack expert j - KR
        j = m % RG
        e = tl.where(j < KR, tl.load(e_ptr + (m // RG) * KR + j, mask=j < KR, other=0).to(tl.int64), E1 + j - KR)
    else:
        e = tl.load(e_ptr + m).to(tl.int64)
    kb_end = tl.where(e >= 0, KB, 0)  # a row this call does not own: no weight read, output 0
    e = tl.maximum(e, 0)
    rn = pn * BN + tl.arange(0, BN)
    nb = (pn * BN) // BK  # BN divides 128: the tile lies in one scale row
    zero = tl.zeros((BN, 1), dtype=tl.int64)
    if TWO:  # expert ids E1.. name the second stack (its own strides: the shared experts as views of their matrices)
        two = e >= E1
        e1 = tl.where(two, 0, e)
        e2 = tl.maximum(e - E1, 0)
        w_base = tl.where(two, w2_ptr + e2 * swe2, w_ptr + e1 * swe)
        u_base = tl.where(two, u2_ptr + e2 * swe2, u_ptr + e1 * swe)
        ws_base = tl.where(two, ws2_ptr + e2 * sse2, ws_ptr + e1 * sse)
        us_base = tl.where(two, us2_ptr + e2 * sse2, us_ptr + e1 * sse)
        # (where, then the cast: a stride of 1 reaches the kernel as a constexpr, which has no .to)
        row_w = tl.where(two, swn2, swn).to(tl.int64)
        row_s = tl.where(two, ssn2, ssn).to(tl.int64)
    else:
        w_base, u_base = w_ptr + e * swe, u_ptr + e * swe
        ws_base, us_base = ws_ptr + e * sse, us_ptr + e * sse
        row_w, row_s = swn, ssn
    w_rows = w_base + (zero + rn[:, None].to(tl.int64) * row_w)
    u_rows = u_base + (zero + rn[:, None].to(tl.int64) * row_w)
    x_row = x_ptr + (zero + (m // x_div) * sxm)
    ok = (zero + rn[:, None]) < N
    rk = tl.arange(0, KU * BK)[None, :]
    ws_row = ws_base + nb * row_s
    us_row = us_base + nb * row_s
    # multiply-and-add into fp32 register tiles ((BN, KU·128), or PSUM (BN, KU·128 / G)), one cross-lane reduction
    # after the loop (not one per iteration); with PREFETCH the next iteration's loads are issued before this
    # one's FMAs (registers double-buffered by hand: Triton pipelines only loads that go through shared memory)
    AW: tl.constexpr = KU * BK // G if PSUM else KU * BK
    SG: tl.constexpr = G if PSUM else 1
    acc = tl.zeros((BN, AW), dtype=tl.float32)
    acc_u = tl.zeros((BN, AW), dtype=tl.float32)
    if PREFETCH:
        w_n, u_n, x_n, s_n, t_n = _loads(x_row, w_rows, u_rows, ws_row, us_row, ok, rk, 0, K, kb_end, HAS_SCALE,
                                         FUSED_UP, BK, KU, EARLY, SG)
    for kb0 in range(0, kb_end, KU):
        if PREFETCH:
            w, u, x, s, t = w_n, u_n, x_n, s_n, t_n
            w_n, u_n, x_n, s_n, t_n = _loads(x_row, w_rows, u_rows, ws_row, us_row, ok, rk, kb0 + KU, K, kb_end,
                                             HAS_SCALE, FUSED_UP, BK, KU, False, SG)
        else:
            w, u, x, s, t = _loads(x_row, w_rows, u_rows, ws_row, us_row, ok, rk, kb0, K, kb_end, HAS_SCALE,
                                   FUSED_UP, BK, KU, False, SG)
        acc = _dot_part(acc, w, x, s, HAS_SCALE, PSUM, BN, G)
        if FUSED_UP:
            acc_u = _dot_part(acc_u, u, x, t, HAS_SCALE, PSUM, BN, G)
    y = tl.sum(acc, axis=1)
    if FUSED_UP:
        y_u = tl.sum(acc_u, axis=1)
        y = y * tl.sigmoid(y) * y_u  # silu(gate) * up, in fp32
    tl.store(y_ptr + m * sym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


# PSUM (_dot_part): per-group partial sums, scaled once a group, where a config does not say: off for bf16 weights
# (it saves no multiply there: 16b bf16 batch 1 went 374.8 -> 363.5 tok/s with it, H100, 2026-12-06); e4m3's
# default configs say PSUM themselves (default_config). bench/decode_gpu.py +psum sets it.
GEMV_PSUM = False
# e4m3 weights: measured configs by (rows, N), the 16b shapes where the sweep's best beat FP8_RULE by more than 5%
# (bench/expert_gemv_sweep.py --fp8-only --psum, H100, 2026-12-06: the routed gate+up at batch 1 13.2 us against
# 14.3 for the rule). 8 rows: batch 1 with the shared experts inside the routed launches (6 routed + 2 shared, the
# shipped e4m3 step), `--shared-rows` on an H100 (2026-12-06, thirteenth session): gate+up 16.9 us against 17.6 for
# the rule, down 9.6 against 11.1; the decode step 498.3 -> 501.6 tok/s.
FP8_TUNED: dict[tuple[int, int], dict] = {(6, 1408): {"BN": 16, "KU": 4, "num_warps": 4, "PREFETCH": False},
                                          (8, 1408): {"BN": 8, "KU": 2, "num_warps": 4, "PREFETCH": False},
                                          (8, 2048): {"BN": 32, "KU": 4, "num_warps": 8, "PREFETCH": False}}
FP8_RULE = {"BN": 8, "KU": 4, "num_warps": 8}


def default_config(fp8: bool = False, M: int = 6, N: int = 2048) -> dict:
    """Launch parameters for M output rows of N columns.
    - bf16 weights: the fastest of `bench/expert_gemv_sweep.py --quick` on an H200 at the 16b experts (D 2048,
      I 1408; 6 and 48 rows, 2026-12-04; bench/RESULTS.md): BN = 8 weight rows per program, KU = 1 scale block
      per load, PREFETCH (the next iteration's loads in flight during this one's FMAs): gate+up 19.3 us and down
      9.5 us at 6 rows, 86-87% of the copy bandwidth (BN 16: 19.9 / 9.8; without PREFETCH BN 16 falls to 61-68%).
    - e4m3 weights: PSUM (one fp32 sum per thread-held 16-byte group, scaled once: 124 registers for the fused
      gate+up at BN 32 KU 2 where the per-element form took 255, and 4.0 instructions a weight element against
      5.0), which leaves room for 4 scale blocks (512 K columns) per load: FP8_TUNED where it names the shape, else
      FP8_RULE (BN 8, KU 4, 8 warps), the next iteration's loads prefetched only at one row. `bench/expert_gemv_sweep.py
      --fp8-only --rows 6 --shared --psum` on an H100 (2026-12-06, bench/RESULTS.md), weights from HBM: routed down
      8.6 us (the rule; the form before, BN 32 KU 2 without PSUM: 10.1 us in the 2026-12-05 sweep), routed gate+up
      13.2 us (FP8_TUNED; 15.8 before), the shared experts' one-row SwiGLU 6.54 us (the rule with the prefetch;
      10.26 us for the config before, same run). Without PSUM the e4m3 form was BN 32 KU 2 at 4 warps: KU 4 or
      the prefetch spilled (57 us for gate+up at KU 4)."""
    if not fp8:
        return {"BN": 8, "KU": 1, "num_warps": 4, "PREFETCH": True}
    cfg = dict(FP8_TUNED.get((M, N)) or dict(FP8_RULE, PREFETCH=M == 1))
    return {**cfg, "PSUM": True}


def launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, expert: torch.Tensor | None, x_div: int,
           up: torch.Tensor | None = None, up_s: torch.Tensor | None = None,
           extra: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
           routed: int = 0, **config) -> torch.Tensor:
    """The launch (module docstring); `config` (BN, KU, num_warps, PREFETCH) overrides `default_config`
    (benchmarks, tests). expert None: every row of x through matrix 0 (w (1, N, K); `swiglu_gemv`). extra: a second
    stack (w2, s2, up2, up_s2) stored like the first, (E2, N, K) with any strides but K's 1 (views of the shared
    experts' matrices); expert ids E .. E + E2 - 1 name its experts (`check_second_stack`). routed > 0 (with extra):
    `expert` holds `routed` ids a token and every token also takes each second-stack expert after them, M =
    expert.numel() / routed · (routed + E2) rows (`routed_rows`)."""
    check_expert_gemv_args(x, w, s, up, up_s, kernel=True)
    if extra is not None:
        check_second_stack(w, s, up, extra)
    one = expert is None
    assert not one or (w.shape[0] == 1 and x_div == 1), "expert None: one matrix, one row of x per output row"
    assert routed == 0 or (extra is not None and not one), "routed rows: a second stack and an expert index"
    M, (_, N, K) = (x.shape[0] if one else routed_rows(expert, routed, extra)), w.shape
    cfg = {**default_config(w.dtype == torch.float8_e4m3fn, M, N), **config}
    assert BLOCK % cfg["BN"] == 0, f"BN must divide {BLOCK}, got {cfg['BN']}"
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    has_scale = s is not None
    s = s.contiguous() if has_scale else w  # a placeholder pointer, never read (HAS_SCALE is False)
    fused = up is not None
    u = up.contiguous() if fused else w
    us = up_s.contiguous() if up_s is not None else s  # (stored alike: scales for both or for neither)
    # the router's int64 indices as they are (the kernel loads either width): a cast here was a copy kernel per
    # launch, two per MoE layer and decode step (bench/profile_gpu.py --decode 1: 52 `direct_copy` launches)
    if one:
        expert = w  # a placeholder pointer, never read (ONE_EXPERT)
    else:
        expert = (expert if expert.dtype in (torch.int32, torch.int64) else expert.long()).contiguous()
    grid = (M, triton.cdiv(N, cfg["BN"]))
    pdl = backend.pdl(x.device)
    if extra is not None:  # the second stack: its pointers and strides (scales and up as the first's: placeholders)
        w2, s2, u2, us2 = extra
        s2 = s2 if has_scale else w2
        u2 = u2 if fused else w2
        us2 = us2 if (fused and has_scale) else s2
        two = (w2, s2, u2, us2, w.shape[0], w2.stride(0), w2.stride(1), s2.stride(0) if has_scale else 0,
               s2.stride(1) if has_scale else 0)
    else:
        two = (w, s, u, us, w.shape[0], 0, 0, 0, 0)  # placeholders, never read (TWO is False)
    _gemv_kernel[grid](x, w, s, u, us, expert, y, N, K, triton.cdiv(K, BLOCK), x_div, x.stride(0), w.stride(0),
                       w.stride(1), s.stride(0) if has_scale else 0, s.stride(1) if has_scale else 0, y.stride(0),
                       *two, max(routed, 1), routed + (extra[0].shape[0] if routed else 0), HAS_SCALE=has_scale,
                       FUSED_UP=fused, BN=cfg["BN"], BK=BLOCK, KU=cfg["KU"],
                       PREFETCH=cfg["PREFETCH"], ONE_EXPERT=one, PDL=pdl, EARLY=pdl and one and cfg["PREFETCH"],
                       TWO=extra is not None, PSUM=cfg.get("PSUM", GEMV_PSUM), G=16 // w.element_size(),
                       ROUTED=routed > 0,
                       num_warps=cfg["num_warps"], launch_pdl=pdl)
    return y


# torch.library custom ops with shape-only fake implementations (as dsv3::fp8_expert_rows): torch.compile sees
# one opaque op per launch, a CUDA graph captures it. Two ops because custom ops take no None-able tensors
# in every torch this code supports without care: the plain GEMV and the fused gate+up SwiGLU.
@torch.library.custom_op("dsv3::expert_gemv", mutates_args=())
def expert_gemv_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, expert: torch.Tensor,
                   x_div: int) -> torch.Tensor:
    return launch(x, w, s, expert, x_div)


@expert_gemv_op.register_fake
def _(x, w, s, expert, x_div):
    return x.new_empty(expert.shape[0], w.shape[1])


@torch.library.custom_op("dsv3::expert_swiglu_gemv", mutates_args=())
def expert_swiglu_gemv_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, up: torch.Tensor,
                          up_s: torch.Tensor | None, expert: torch.Tensor, x_div: int) -> torch.Tensor:
    return launch(x, w, s, expert, x_div, up, up_s)


@expert_swiglu_gemv_op.register_fake
def _(x, w, s, up, up_s, expert, x_div):
    return x.new_empty(expert.shape[0], w.shape[1])


# the same two launches with a second stack of experts (the shared experts beside the routed ones: kernels.
# expert_gemv's `extra`)
@torch.library.custom_op("dsv3::expert_gemv_two", mutates_args=())
def expert_gemv_two_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, w2: torch.Tensor,
                       s2: torch.Tensor | None, expert: torch.Tensor, x_div: int, routed: int = 0) -> torch.Tensor:
    return launch(x, w, s, expert, x_div, extra=(w2, s2, None, None), routed=routed)


@expert_gemv_two_op.register_fake
def _(x, w, s, w2, s2, expert, x_div, routed=0):
    return x.new_empty(routed_rows(expert, routed, (w2,)), w.shape[1])


@torch.library.custom_op("dsv3::expert_swiglu_gemv_two", mutates_args=())
def expert_swiglu_gemv_two_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, up: torch.Tensor,
                              up_s: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor | None, up2: torch.Tensor,
                              up_s2: torch.Tensor | None, expert: torch.Tensor, x_div: int,
                              routed: int = 0) -> torch.Tensor:
    return launch(x, w, s, expert, x_div, up, up_s, extra=(w2, s2, up2, up_s2), routed=routed)


@expert_swiglu_gemv_two_op.register_fake
def _(x, w, s, up, up_s, w2, s2, up2, up_s2, expert, x_div, routed=0):
    return x.new_empty(routed_rows(expert, routed, (w2,)), w.shape[1])


# the dense SwiGLU's first half (shared experts, dense FFN at decode: kernels.swiglu_gemv): the fused gate+up
# launch over one matrix pair, every row through it
@torch.library.custom_op("dsv3::swiglu_gemv", mutates_args=())
def swiglu_gemv_op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, up: torch.Tensor,
                   up_s: torch.Tensor | None) -> torch.Tensor:
    return launch(x, w[None], None if s is None else s[None], None, 1, up[None], None if up_s is None else up_s[None])


@swiglu_gemv_op.register_fake
def _(x, w, s, up, up_s):
    return x.new_empty(x.shape[0], w.shape[0])
