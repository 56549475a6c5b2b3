"""DeepSeek-V3 router selection in one Triton kernel: sigmoid, correction bias, group-limited top-k,
gather, normalisation and scaling, all in registers; and, at decode, the router's logits GEMV and that
selection in one launch (`router_gemv_topk`, below).

    router_topk(logits, bias, top_k, n_group, topk_group, norm_topk_prob, scale, with_s=True) -> (w, idx, s)

logits (N, E) fp32 (the GEMM x Wᵀ stays a cuBLAS matmul), bias (E,) fp32 (e_score_correction_bias)
-> w (N, K) fp32, idx (N, K) int64, s (N, E) fp32 = sigmoid(logits). The specification is
`dsv3.kernels.reference.router_topk_ref` (the math of `Router.forward`); tests/test_router.py
(Triton interpreter) and tests/test_gpu_router.py compare the two.

Why: the reference is ~10 small torch ops per MoE layer (sigmoid, add, view/topk/sum, topk, scatter,
masked_fill, topk, gather, sum, div, mul). At batch-1 decode each is a kernel launch on a few hundred
floats; in training each reads and writes (N, E) fp32 tensors. Here one launch reads the logits once
and writes w, idx and s.

Grid (ceil(N / BLOCK_M),): a program takes BLOCK_M tokens (`_route_rows`, the rule's one home); their
logits are one (BLOCK_M, GP, EGP) register tile, the experts laid out as (group, expert in group),
padded to powers of two (padding is -inf in the selection scores and never chosen). For each token:
  * s = 1 / (1 + exp(-logit)) with libdevice's expf and a round-to-nearest division: the operations
    of torch's CUDA sigmoid (`1 / (1 + std::exp(-x))` in fp32), so s, and hence the selection, is
    meant to be bitwise the eager reference's (checked on the GPU; the interpreter, which has no
    libdevice, uses numpy's exp);
  * sel = s + bias;
  * if topk_group < n_group: group score = m1 + m2, the largest value of the group and the largest of
    the rest after removing one occurrence of it (= torch's top-2 values summed, duplicates
    included); topk_group rounds of argmax-and-mask keep the best groups; the others' sel -> -inf;
  * K rounds of argmax-and-mask over all experts give idx in descending order of sel (torch.topk's
    sorted order), the gathered s values in the same order;
  * w = s_sel / (Σ s_sel + 1e-20) (if norm_topk_prob) · scale, the reference's op order (the K-term
    sum may be added in another order than torch's: w agrees to an ulp or so).

Ties: an argmax round takes the *lowest index* among equal values (groups, then experts). torch.topk
documents no tie order (CPU and CUDA differ, and so can sizes), so on exact ties at the selection
boundary (the K-th and (K+1)-th sel equal, or two groups' scores equal at the topk_group boundary) the
kernel and the reference may choose different, equally valid, sets; with continuous inputs this
happens with probability ~0 (the tests use random inputs). Duplicate values inside the chosen set
change only their order. NaN logits are not supported (they are not chosen consistently).

Wrapping: `torch.library.custom_op("dsv3::router_topk")` with a fake implementation, so torch.compile
treats the call as one opaque op (the compiled decode step and training step trace through it) and
a CUDA graph captures the launch (the grid depends on N only). No autograd formula: the op's caller
(`dsv3.kernels.router_topk`) recomputes s and w in torch from the kernel's idx when gradients are
needed (and asks for no s: with_s=False). Under TRITON_INTERPRET=1 the same code runs on CPU tensors (the CPU tests).

The logits and the selection in one launch (decode rows):

    router_gemv_topk(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scale, with_s=True) -> (w, idx, s)

x (M, D) and the router weight (E, D) in one dtype (bf16 / fp16; fp32 too), M <= MAX_ROWS (8) -> the same
outputs as `router_topk(dense_gemv(x, weight, out_dtype=torch.float32), bias, ...)`. The specification is
`router_topk_ref(dense_gemv_ref(x, weight, torch.float32), ...)` (= F.linear on fp32 copies, then the routing).

Why: at batch-1 decode a MoE layer's router was two launches, the dense decode GEMV for the fp32 logits
(dense_gemv_triton.py) and `router_topk`; the H100 profile (16b) gave them 3.2 us and 2.7 us per layer plus a
~0.45 us gap, most of it launch latency that moves no bytes (the logits are 64 floats, the weight 256 KiB). One
launch saves a launch and the gap per MoE layer (26 in the 16b). Not measured on a GPU yet: off by default
(kernels.set_router_gemv; bench/decode_gpu.py +routergemv).

Grid (ceil(M / BM), ceil(E / BN)), the dense GEMV's: program (pm, pn) computes the fp32 logits of rows
pm·BM.. and experts pn·BN.. with `fp8_gemm_triton._gemv_tile` (no scales), in the launch configuration
`dense_gemv_triton.default_config(M, E, D)` gives the dense GEMV (TUNED: (1, 64, 2048) -> BM 1, BN 4, KU 4,
4 warps, prefetch: 16 programs for the 16b router). The summation order is therefore the dense GEMV's, bit for
bit: output (m, e) has 128·KU fp32 partial sums, partial l adding the products x[m, k]·w[e, k] at k = l,
l + 128·KU, l + 2·128·KU, ... in that order (PSUM off, the default), then one tl.sum over the 128·KU partials
(Triton's reduction tree: within each thread, then across lanes and warps, fixed by the layout, i.e. by BM, BN,
KU and num_warps). A product of two bf16 (fp16) numbers is exact in fp32, so only this order differs from
F.linear on fp32 copies (cuBLAS or the CPU sum in theirs: the tests compare w to a tolerance and idx exactly
where no near-tie decides it).
The program stores its (BM, BN) logits into a scratch (M, E) fp32 tensor and arrives at a per-device int32
counter (an atomic add, acq_rel, gpu scope, after a barrier so that the CTA's every store precedes the one
thread's atomic); the program whose add returns n_programs - 1 arrived last: every other program has stored
its logits and released them, so it reads the whole (M, E) scratch (volatile loads: from L2, never a stale L1 line),
routes all M rows as one (pow2(M), GP, EGP) tile with `_route_rows` (the same code as `_router_kernel`, so the
same bits from the same logits), writes w, idx and s, and stores 0 into the counter. No program waits for
another (no spin): nothing depends on how many programs are resident.

Why the one counter per device is safe:
  * stream order: launches on a stream run one after another, so a launch starts with the counter at 0 (the
    launch before it put it back) and no other launch touches it meanwhile. dsv3 runs a device's decode on one
    stream (the graphs' warm-up side stream is joined before and after). Two launches of this kernel running
    concurrently on one device (two streams, two graphs replayed side by side) would share the counter and
    must not happen; the op would need a counter per stream for that;
  * programmatic dependent launch (backend.pdl): the next launch may start while this one drains, and this
    one while the one before it drains; but every program's first touch of the counter comes after its
    griddepcontrol.wait (in `_gemv_tile`, before x is read), which returns when the whole previous grid has
    completed and its writes are visible; that grid completed after its own wait (every dsv3 PDL kernel waits:
    tests/test_gpu_pdl.py) or, launched without PDL, started after the one before it completed, and so on:
    every earlier launch of this kernel, its reset included, is done;
  * CUDA graphs: a replay runs the captured launches in the captured order, each leaving the counter at 0, so
    every replay starts from 0 as an eager launch does. The counter is made (zeroed) at its first use outside
    any capture: `arrival_counter` refuses to make one during a capture (the zero-fill would be a captured
    launch); dsv3's graphs warm up before they capture;
  * two devices: one counter per device (`_counters`, keyed by device), each in that device's memory; processes
    do not share them;
  * the Triton interpreter runs the programs one after another, in grid order: the last program is the last
    to arrive and every logit is in the scratch by then (the CPU tests exercise the counter's arithmetic and
    its return to 0, not the memory ordering, which only the GPU tests can);
  * a launch that faults leaves the counter wherever it was; the CUDA context is then unusable anyway.
Compiled ahead of time for sm_90 (Triton 3.6 and its bundled ptxas, on a machine without a GPU, bf16): 48
registers for the 16b router at one row, 94-96 at 2, 4 and 8 rows (16b) and 1, 2 and 4 rows (671B), 142 for
the 671B's at 8 rows; no spills. Not measured: time, and the last program's extra time: it runs the selection with the GEMV
config's 4 warps, so its reductions cross warps through shared memory (the 16b one-row code has 60 barriers,
most of them in the selection) where `_router_kernel` uses one warp and shuffles only. `launch_gemv(config=)`
takes another GEMV config (e.g. fewer warps: then the logits' sum order, and bits, differ from the dense GEMV's).
Tests: tests/test_router_gemv.py (interpreter: against the reference for M 1-8, E 64 / 256, bf16 / fp16;
bitwise against the two launches; launches in a row, the counter back at 0; the custom op compiled; a MoE
layer and the engine's decode step with the switch on against off; CPU: the sm_90 code's order of the wait,
the stores, the barrier, the atomic and the volatile loads), tests/test_gpu_router.py (GPU: the same,
launches in a row and a CUDA graph replayed many times against the two-launch path), tests/test_gpu_pdl.py.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dsv3.kernels import backend, dense_gemv_triton, fp8_gemm_triton
from dsv3.kernels.fp8_gemm_triton import BLOCK, _gemv_tile
from dsv3.kernels.reference import check_dense_gemv_args


@triton.jit
def _route_rows(logits_ptr, bias_ptr, w_ptr, idx_ptr, s_ptr, n, N, scale, s_ln, s_wn, s_in, s_sn,
                G: tl.constexpr, EG: tl.constexpr, GP: tl.constexpr, EGP: tl.constexpr,
                K: tl.constexpr, KP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                BM: tl.constexpr, EXACT: tl.constexpr, WRITE_S: tl.constexpr, VOLATILE: tl.constexpr = False):
    """The routing rule (module docstring) for the BM tokens n (BM,) (those >= N masked): reads their logits
    (row stride s_ln), writes w, idx (row strides s_wn, s_in) and, WRITE_S, s (row stride s_sn). The one
    place the rule exists: `_router_kernel` (logits from a GEMM) and `_router_gemv_kernel` (logits from its own
    programs) both call it. VOLATILE: the logits are read with volatile loads (ld.volatile: L2, never a stale
    L1 line), for logits that other programs of the same launch wrote (`_router_gemv_kernel`)."""
    g = tl.arange(0, GP)
    j = tl.arange(0, EGP)
    e = g[:, None] * EG + j[None, :]  # (GP, EGP) expert ids
    ok_e = (g[:, None] < G) & (j[None, :] < EG)
    n3 = n[:, None, None]
    e3 = e[None, :, :]  # (1, GP, EGP)
    ok3 = ok_e[None, :, :]
    x = tl.load(logits_ptr + n3 * s_ln + e3, mask=(n3 < N) & ok3, other=0.0, volatile=VOLATILE)  # (BM, GP, EGP)
    if EXACT:  # torch's CUDA sigmoid: 1 / (1 + expf(-x)), IEEE division
        s = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + libdevice.exp(-x))
    else:  # the interpreter (no libdevice)
        s = 1.0 / (1.0 + tl.exp(-x))
    b = tl.load(bias_ptr + e, mask=ok_e, other=0.0)  # (GP, EGP)
    sel = tl.where(ok3, s + b[None, :, :], float("-inf"))

    if TOPK_GROUP < G:
        j3 = j[None, None, :]
        m1 = tl.max(sel, 2)  # (BM, GP) each group's largest
        first = tl.min(tl.where(sel == m1[:, :, None], j3, EGP), 2)  # one occurrence of it
        m2 = tl.max(tl.where(j3 == first[:, :, None], float("-inf"), sel), 2)  # the second largest
        gs = m1 + m2  # (BM, GP) group scores; padded groups -inf
        g2 = g[None, :]
        keep = tl.zeros((BM, GP), tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            cand = tl.where(keep, float("-inf"), gs)
            best = tl.max(cand, 1)  # (BM,)
            gi = tl.min(tl.where((cand == best[:, None]) & (g2 < G) & ~keep, g2, GP), 1)  # lowest such group
            keep = keep | (g2 == gi[:, None])
        sel = tl.where(keep[:, :, None], sel, float("-inf"))

    kk = tl.arange(0, KP)[None, :]  # (1, KP)
    taken = tl.zeros((BM, GP, EGP), tl.int1)  # experts chosen so far
    w = tl.zeros((BM, KP), tl.float32)
    idx = tl.zeros((BM, KP), tl.int32)
    for k in tl.static_range(K):
        cand = tl.where(taken, float("-inf"), sel)
        best = tl.max(tl.max(cand, 2), 1)  # (BM,)
        hit = (cand == best[:, None, None]) & ok3 & ~taken
        i = tl.min(tl.min(tl.where(hit, e3, GP * EGP), 2), 1)  # (BM,) lowest such expert
        pick = e3 == i[:, None, None]
        taken = taken | pick
        sv = tl.max(tl.max(tl.where(pick, s, float("-inf")), 2), 1)  # (BM,) s of the chosen expert
        w = tl.where(kk == k, sv[:, None], w)
        idx = tl.where(kk == k, i[:, None], idx)
    if NORM:
        den = tl.sum(w, 1)[:, None] + 1e-20  # the KP - K padding entries are 0
        if EXACT:
            w = tl.math.div_rn(w, tl.broadcast_to(den, w.shape))
        else:
            w = w / den
    w = w * scale

    n2 = n[:, None]
    ok_k = (n2 < N) & (kk < K)
    tl.store(w_ptr + n2 * s_wn + kk, w, mask=ok_k)
    tl.store(idx_ptr + n2 * s_in + kk, idx.to(tl.int64), mask=ok_k)
    if WRITE_S:
        tl.store(s_ptr + n3 * s_sn + e3, s, mask=(n3 < N) & ok3)


@triton.jit
def _router_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, s_ptr, N, scale, s_ln, s_wn, s_in, s_sn,
                   G: tl.constexpr, EG: tl.constexpr, GP: tl.constexpr, EGP: tl.constexpr,
                   K: tl.constexpr, KP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                   BM: tl.constexpr, EXACT: tl.constexpr, WRITE_S: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # (BM,) tokens
    _route_rows(logits_ptr, bias_ptr, w_ptr, idx_ptr, s_ptr, n, N, scale, s_ln, s_wn, s_in, s_sn,
                G, EG, GP, EGP, K, KP, TOPK_GROUP, NORM, BM, EXACT, WRITE_S)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _check_rule(E: int, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> None:
    assert bias.shape == (E,) and bias.dtype == torch.float32, f"bias ({E},) fp32, got {tuple(bias.shape)} {bias.dtype}"
    assert E % n_group == 0 and 1 <= topk_group <= n_group and 1 <= top_k <= topk_group * (E // n_group), \
        f"E={E}, n_group={n_group}, topk_group={topk_group}, top_k={top_k}"


def _rule_args(E: int, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool) -> dict:
    """`_route_rows`'s constexprs for E experts in n_group groups, top_k of the topk_group best groups."""
    return dict(G=n_group, EG=E // n_group, GP=_pow2(n_group), EGP=_pow2(E // n_group), K=top_k, KP=_pow2(top_k),
                TOPK_GROUP=topk_group, NORM=bool(norm_topk_prob))


@torch.library.custom_op("dsv3::router_topk", mutates_args=())
def router_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                norm_topk_prob: bool, scale: float, with_s: bool = True, block_m: Optional[int] = None,
                num_warps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module docstring. with_s=False skips writing s (returned as an empty (0, E) tensor: the
    training path recomputes it in torch, and s is half the kernel's memory traffic); block_m (tokens
    per program) and num_warps override the launch configuration (benchmarks)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert logits.is_cuda or interpret, "router_topk needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    assert logits.dim() == 2 and logits.dtype == torch.float32, \
        f"logits (N, E) fp32, got {tuple(logits.shape)} {logits.dtype}"
    N, E = logits.shape
    _check_rule(E, bias, top_k, n_group, topk_group)
    logits = logits.contiguous()
    bias = bias.contiguous()
    w = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    s = torch.empty(N if with_s else 0, E, dtype=torch.float32, device=logits.device)
    if N == 0:
        return w, idx, s
    # one warp per program: every reduction is warp shuffles only (no shared memory), and a program
    # is a few hundred registers' worth of experts; many tokens give many programs
    bm = block_m or (1 if N < 1024 else 2)
    pdl = backend.pdl(logits.device)
    _router_kernel[(triton.cdiv(N, bm),)](
        logits, bias, w, idx, s, N, float(scale), logits.stride(0), w.stride(0), idx.stride(0), E,
        **_rule_args(E, top_k, n_group, topk_group, norm_topk_prob), BM=bm, EXACT=not interpret,
        WRITE_S=bool(with_s), PDL=pdl, num_warps=num_warps or 1, launch_pdl=pdl)
    return w, idx, s


@router_topk.register_fake
def _(logits, bias, top_k, n_group, topk_group, norm_topk_prob, scale, with_s=True, block_m=None, num_warps=None):
    N, E = logits.shape
    return (logits.new_empty(N, top_k), logits.new_empty(N, top_k, dtype=torch.int64),
            logits.new_empty(N if with_s else 0, E))


# --- the router's logits and the selection in one launch (decode rows) --------------------------------------------

@triton.jit(do_not_specialize=["M", "KB"])
def _router_gemv_kernel(x_ptr, wt_ptr, bias_ptr, logits_ptr, count_ptr, w_ptr, idx_ptr, s_ptr, M, E, D, KB, sxm, swe,
                        scale, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr,
                        PREFETCH: tl.constexpr, PSUM: tl.constexpr, GB: tl.constexpr,
                        G: tl.constexpr, EG: tl.constexpr, GP: tl.constexpr, EGP: tl.constexpr, K: tl.constexpr,
                        KP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr, SM: tl.constexpr,
                        EXACT: tl.constexpr, WRITE_S: tl.constexpr, PDL: tl.constexpr = False):
    """Program (pm, pn): the fp32 logits of rows pm·BM.. and experts pn·BN.. (the dense GEMV's tile: x (M, D) and
    the router weight wt (E, D) in one 16-bit dtype, or fp32) into logits (M, E); then it arrives at count; the
    last to arrive routes all M rows (SM >= M: one tile) and puts count back to 0 (module docstring)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    # (wt stands in for the scale pointer, never read; with PDL the wait for the launch before is _gemv_tile's,
    # after the weight's first loads and before x's: every program has waited before it touches count)
    acc = _gemv_tile(x_ptr, wt_ptr, wt_ptr, rm, rn, M, E, D, KB, sxm, swe, BM, BN, BK, KU, PREFETCH, False, PDL,
                     PSUM, GB)  # (BM, BN) fp32
    tl.store(logits_ptr + rm[:, None] * E + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < E))
    # every thread's stores issued before the arrival (the scalar atomic below is one thread's; the barrier orders
    # the others' stores before it, and its release makes them visible at gpu scope with it)
    tl.debug_barrier()
    last = tl.num_programs(0) * tl.num_programs(1) - 1
    if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == last:
        # every other program has stored its logits and released them: read them from L2 (volatile)
        _route_rows(logits_ptr, bias_ptr, w_ptr, idx_ptr, s_ptr, tl.arange(0, SM), M, scale, E, K, K, E,
                    G, EG, GP, EGP, K, KP, TOPK_GROUP, NORM, SM, EXACT, WRITE_S, True)
        tl.store(count_ptr, 0)  # for the next launch (no other program of this one touches count again)


MAX_ROWS = 8  # rows per launch: the selection routes them as one (pow2(M), E) tile in the last program
_counters: dict[tuple[str, int | None], torch.Tensor] = {}  # (device type, index) -> its arrival counter


def arrival_counter(device: torch.device) -> torch.Tensor:
    """The (1,) int32 arrival counter of `device`'s router GEMV launches, made zeroed at its first use and zero
    again after every launch (module docstring). Made outside any CUDA graph capture: inside one its zero-fill
    would be a captured launch and its memory the graph pool's, so a capture that meets no counter raises."""
    key = (device.type, device.index)
    count = _counters.get(key)
    if count is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"router GEMV: no arrival counter on {device} yet; run one launch there before a CUDA "
                               "graph capture (dsv3's graphs warm up first) or call router_triton.arrival_counter")
        count = _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return count


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                norm_topk_prob: bool, scale: float, with_s: bool = True, config: dict | None = None,
                logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, idx, s) of `router_topk(x · weightᵀ in fp32, bias, ...)` in one launch, for x (M, D) with M <= MAX_ROWS
    (module docstring). config: the GEMV part's launch parameters (None: the dense GEMV's for (M, E, D), which
    makes the logits its bits); logits: an (M, E) fp32 buffer for them (None: a new one; tests read it)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert x.is_cuda or interpret, "router GEMV needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    check_dense_gemv_args(x, weight, kernel=True, out_dtype=torch.float32)
    M, D = x.shape
    E = weight.shape[0]
    assert M <= MAX_ROWS, f"router GEMV: at most {MAX_ROWS} rows, got {M}"
    _check_rule(E, bias, top_k, n_group, topk_group)
    cfg = config or dense_gemv_triton.default_config(M, E, D)
    BM, BN, KU, stages = cfg["BM"], cfg["BN"], cfg["KU"], cfg["num_stages"]
    assert BM in (1, 2, 4) and BN in dense_gemv_triton.BNS and KU >= 1 and stages in (1, 2), f"GEMV config: {cfg}"
    x = x if x.stride(-1) == 1 else x.contiguous()  # rows may be strided; D must be contiguous
    weight, bias = weight.contiguous(), bias.contiguous()
    w = torch.empty(M, top_k, dtype=torch.float32, device=x.device)
    idx = torch.empty(M, top_k, dtype=torch.int64, device=x.device)
    s = torch.empty(M if with_s else 0, E, dtype=torch.float32, device=x.device)
    if M == 0:
        return w, idx, s
    if logits is None:
        logits = torch.empty(M, E, dtype=torch.float32, device=x.device)
    assert logits.shape == (M, E) and logits.dtype == torch.float32 and logits.is_contiguous(), "logits (M, E) fp32"
    pdl = backend.pdl(x.device)
    _router_gemv_kernel[(triton.cdiv(M, BM), triton.cdiv(E, BN))](
        x, weight, bias, logits, arrival_counter(x.device), w, idx, s, M, E, D, triton.cdiv(D, BLOCK), x.stride(0),
        weight.stride(0), float(scale), BM=BM, BN=BN, BK=BLOCK, KU=KU, PREFETCH=stages == 2,
        PSUM=cfg.get("PSUM", fp8_gemm_triton.GEMV_PSUM), GB=16 // weight.element_size(),
        **_rule_args(E, top_k, n_group, topk_group, norm_topk_prob), SM=_pow2(M), EXACT=not interpret,
        WRITE_S=bool(with_s), PDL=pdl, num_warps=cfg["num_warps"], num_stages=1, launch_pdl=pdl)
    return w, idx, s


@torch.library.custom_op("dsv3::router_gemv_topk", mutates_args=())
def router_gemv_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
                     topk_group: int, norm_topk_prob: bool, scale: float, with_s: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`launch_gemv` as one opaque op (the arrival counter is the op's own state, not an argument: it is zero
    before and after every call, so the op mutates nothing a caller can see)."""
    return launch_gemv(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scale, with_s)


@router_gemv_topk.register_fake
def _(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scale, with_s=True):
    M, E = x.shape[0], weight.shape[0]
    return (x.new_empty(M, top_k, dtype=torch.float32), x.new_empty(M, top_k, dtype=torch.int64),
            x.new_empty(M if with_s else 0, E, dtype=torch.float32))
