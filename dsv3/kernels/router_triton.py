"""DeepSeek-V3 router selection in one Triton kernel: sigmoid, correction bias, group-limited top-k,
gather, normalisation and scaling, all in registers.

    router_topk(logits, bias, top_k, n_group, topk_group, norm_topk_prob, scale, with_s=True) -> (w, idx, s)

logits (N, E) fp32 (the GEMM x Wᵀ stays a cuBLAS matmul), bias (E,) fp32 (e_score_correction_bias)
-> w (N, K) fp32, idx (N, K) int64, s (N, E) fp32 = sigmoid(logits). The specification is
`dsv3.kernels.reference.router_topk_ref` (the math of `Router.forward`); tests/test_router.py
(Triton interpreter) and tests/test_gpu_router.py compare the two.

Why: the reference is ~10 small torch ops per MoE layer (sigmoid, add, view/topk/sum, topk, scatter,
masked_fill, topk, gather, sum, div, mul). At batch-1 decode each is a kernel launch on a few hundred
floats; in training each reads and writes (N, E) fp32 tensors. Here one launch reads the logits once
and writes w, idx and s.

Grid (ceil(N / BLOCK_M),): a program takes BLOCK_M tokens; their logits are one (BLOCK_M, GP, EGP)
register tile, the experts laid out as (group, expert in group), padded to powers of two (padding is
-inf in the selection scores and never chosen). For each token:
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
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dsv3.kernels import backend


@triton.jit
def _router_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, s_ptr, N, scale, s_ln, s_wn, s_in, s_sn,
                   G: tl.constexpr, EG: tl.constexpr, GP: tl.constexpr, EGP: tl.constexpr,
                   K: tl.constexpr, KP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
                   BM: tl.constexpr, EXACT: tl.constexpr, WRITE_S: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch (backend.pdl): let the next launch start, wait for the one before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # (BM,) tokens
    g = tl.arange(0, GP)
    j = tl.arange(0, EGP)
    e = g[:, None] * EG + j[None, :]  # (GP, EGP) expert ids
    ok_e = (g[:, None] < G) & (j[None, :] < EG)
    n3 = n[:, None, None]
    e3 = e[None, :, :]  # (1, GP, EGP)
    ok3 = ok_e[None, :, :]
    x = tl.load(logits_ptr + n3 * s_ln + e3, mask=(n3 < N) & ok3, other=0.0)  # (BM, GP, EGP)
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


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


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
    assert bias.shape == (E,) and bias.dtype == torch.float32, f"bias ({E},) fp32, got {tuple(bias.shape)} {bias.dtype}"
    assert E % n_group == 0 and 1 <= topk_group <= n_group and 1 <= top_k <= topk_group * (E // n_group), \
        f"E={E}, n_group={n_group}, topk_group={topk_group}, top_k={top_k}"
    logits = logits.contiguous()
    bias = bias.contiguous()
    w = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    s = torch.empty(N if with_s else 0, E, dtype=torch.float32, device=logits.device)
    if N == 0:
        return w, idx, s
    # one warp per program: every reduction is warp shuffles only (no shared memory), and a program
    # is a few hundred registers' worth of experts; many tokens give many programs
    # (the batch-invariant mode: one token a program for every N, kernels/invariant.py)
    bm = block_m or (1 if N < 1024 or backend.BATCH_INVARIANT else 2)
    pdl = backend.pdl(logits.device)
    _router_kernel[(triton.cdiv(N, bm),)](
        logits, bias, w, idx, s, N, float(scale), logits.stride(0), w.stride(0), idx.stride(0), E,
        G=n_group, EG=E // n_group, GP=_pow2(n_group), EGP=_pow2(E // n_group), K=top_k, KP=_pow2(top_k),
        TOPK_GROUP=topk_group, NORM=bool(norm_topk_prob), BM=bm, EXACT=not interpret, WRITE_S=bool(with_s),
        PDL=pdl, num_warps=num_warps or 1, launch_pdl=pdl)
    return w, idx, s


@router_topk.register_fake
def _(logits, bias, top_k, n_group, topk_group, norm_topk_prob, scale, with_s=True, block_m=None, num_warps=None):
    N, E = logits.shape
    return (logits.new_empty(N, top_k), logits.new_empty(N, top_k, dtype=torch.int64),
            logits.new_empty(N if with_s else 0, E))
