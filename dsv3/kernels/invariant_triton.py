"""Batch-invariant kernels (Triton): each output row is computed by one fixed sequence of operations whatever the
number of rows around it, so a request's results do not depend on what else shares its batch (the kernels of the
batch-invariant mode, dsv3/kernels/invariant.py).

Why they are needed: cuBLAS, the CUDA reductions and SDPA pick their algorithm (tile shape, split-K, split
reduction, flash-decoding splits) from the whole tensor's shape, so the same row gives other bits in a batch of 1
than of 32; in bf16 a flipped router near-tie then changes the text (bench/RESULTS.md, the server against offline
generation). Here every choice that could change a row's summation order is fixed:

    bmm(a (Bt, M, K), b (Bt, K, N)) -> (Bt, M, N)   one tile configuration (BM x BN x BK) for every M, the K loop in
                                                    order from 0, no split-K, fp32 accumulation ("ieee" for fp32
                                                    inputs: no TF32); row m of the output reads only row m of a
    row_mean(x (R, D)) -> (R,)                      one program per row, fixed-width chunks from 0 (widths from D only)
    softmax(x (R, V), log) -> (R, V)                one program per row: max, then the sum of exp in fixed chunks
    attention(q, k, v, mask | causal offset)        forward-only flash attention: per (sequence, head, query tile)
                                                    the key tiles from position 0 in order, an online softmax in
                                                    fp32; a key tile a query cannot see changes nothing (its
                                                    weights are exact zeros and the running max stays), so a query's
                                                    result is the same whether its prompt is prefilled at once or in
                                                    chunks, alone or padded beside others

The tile sizes are fixed constants (a function of K, N, D or the head dims at most: those are the weights', the
same for every batch); integer arguments that vary with the batch are kept out of Triton's specialisation
(`do_not_specialize`), so one compiled kernel serves every row count. The specification of each is the plain torch
op (`torch.bmm`, `mean`, `softmax`, `F.scaled_dot_product_attention`); tests/test_invariant.py compares them under
the Triton interpreter and checks that a row's bits do not move with the batch; tests/test_gpu_invariant.py does
both on the GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# one tile configuration for every GEMM of the mode (M-independent by construction). 32 rows: decode batches
# (1-32 rows) waste at most a tile's rows; a prefill has many tiles. BK 64: 128-byte bf16 loads along K.
MM_BM, MM_BN, MM_BK, MM_WARPS, MM_STAGES = 32, 64, 64, 4, 3
ROW_BLOCK = 1024  # row_mean / softmax chunk width (elements a loop step)
ATT_BM, ATT_BN = 32, 32  # attention: query rows a program, keys a loop step


def _interp_ok(*ts: torch.Tensor) -> None:
    assert all(t.is_cuda for t in ts) or os.environ.get("TRITON_INTERPRET") == "1", \
        "the batch-invariant kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"


@triton.jit(do_not_specialize=["M", "sab", "scb"])
def _bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)  # column tiles fastest: the row tiles of one batch entry share b's tiles in L2
    pid_m = tl.program_id(1)
    bat = tl.program_id(2).to(tl.int64)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + bat * sab + rm[:, None] * sam + rk[None, :] * sak  # (BM, BK)
    b_ptrs = b_ptr + bat * sbb + rk[:, None] * sbk + rn[None, :] * sbn  # (BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs + k0 * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + k0 * sbk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptr + bat * scb + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a (Bt, M, K) @ b (Bt, K, N) -> (Bt, M, N) in out_dtype (None: a's), any strides; a and b of one dtype among
    bf16, fp16, fp32. The module docstring's fixed-tile GEMM."""
    _interp_ok(a, b)
    assert a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1], \
        f"bmm: a (Bt, M, K), b (Bt, K, N); got {tuple(a.shape)}, {tuple(b.shape)}"
    assert a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16, torch.float32), \
        f"bmm: one dtype among bf16 / fp16 / fp32, got {a.dtype}, {b.dtype}"
    Bt, M, K = a.shape
    N = b.shape[2]
    c = torch.empty(Bt, M, N, dtype=out_dtype or a.dtype, device=a.device)
    if c.numel() == 0:
        return c
    if K == 0:
        return c.zero_()
    grid = (triton.cdiv(N, MM_BN), triton.cdiv(M, MM_BM), Bt)
    _bmm_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
                      c.stride(0), c.stride(1), c.stride(2), IEEE=a.dtype == torch.float32, BM=MM_BM, BN=MM_BN,
                      BK=MM_BK, num_warps=MM_WARPS, num_stages=MM_STAGES)
    return c


@triton.jit(do_not_specialize=["R"])
def _row_mean_kernel(x_ptr, y_ptr, R, D, sx, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK):
        acc += tl.load(x_ptr + r * sx + d0 + cols, mask=(d0 + cols) < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + r, (tl.sum(acc, 0) / D).to(y_ptr.dtype.element_ty))


def row_mean(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (R, D) with its last dimension contiguous -> the mean of each row (R,) in out_dtype (None: x's), summed in
    fp32 in fixed chunks."""
    _interp_ok(x)
    assert x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1), "row_mean: x (R, D), D contiguous"
    R, D = x.shape
    y = torch.empty(R, dtype=out_dtype or x.dtype, device=x.device)
    if R == 0:
        return y
    if D == 0:
        return y.fill_(float("nan"))  # torch's mean of nothing
    _row_mean_kernel[(R,)](x, y, R, D, x.stride(0), BLOCK=min(ROW_BLOCK, triton.next_power_of_2(D)), num_warps=4)
    return y


@triton.jit(do_not_specialize=["R"])
def _softmax_kernel(x_ptr, y_ptr, R, V, sx, sy, LOG: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mx = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        mx = tl.maximum(mx, tl.load(x_ptr + r * sx + v0 + cols, mask=(v0 + cols) < V,
                                    other=float("-inf")).to(tl.float32))
    m = tl.max(mx, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a row of -inf: torch gives nan (0/0), as this does below
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        z = tl.load(x_ptr + r * sx + v0 + cols, mask=(v0 + cols) < V, other=float("-inf")).to(tl.float32)
        acc += tl.exp(z - m_safe)
    s = tl.sum(acc, 0)
    for v0 in range(0, V, BLOCK):
        ok = (v0 + cols) < V
        z = tl.load(x_ptr + r * sx + v0 + cols, mask=ok, other=float("-inf")).to(tl.float32)
        if LOG:
            y = z - m_safe - tl.log(s)
        else:
            y = tl.exp(z - m_safe) / s
        tl.store(y_ptr + r * sy + v0 + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def softmax(x: torch.Tensor, log: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(log_)softmax over the last dimension of x (R, V) (contiguous last dimension), in fp32, stored in out_dtype
    (None: x's)."""
    _interp_ok(x)
    assert x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1), "softmax: x (R, V), V contiguous"
    R, V = x.shape
    y = torch.empty(R, V, dtype=out_dtype or x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    _softmax_kernel[(R,)](x, y, R, V, x.stride(0), y.stride(0), LOG=log,
                          BLOCK=min(ROW_BLOCK, triton.next_power_of_2(V)), num_warps=4)
    return y


@triton.jit(do_not_specialize=["T", "S", "offset", "sqb", "skb", "svb", "smb", "sob"])
def _attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, H, T, S, offset, qk_scale,
                      sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smh, smt, sms, sob, soh, sot,
                      DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, DVP: tl.constexpr,
                      HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)  # (BM,) query rows
    d = tl.arange(0, DQKP)
    dv = tl.arange(0, DVP)
    t_ok = rm < T
    q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None].to(tl.int64) * sqt + d[None, :],
                mask=t_ok[:, None] & (d[None, :] < DQK), other=0.0)  # (BM, DQKP)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DVP), dtype=tl.float32)
    hi = S
    if CAUSAL:  # key tiles past this query tile's last position hold no visible key (exact no-ops: skipped)
        hi = tl.minimum(S, offset + (pid_m + 1) * BM)
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        n_ok = rn < S
        k = tl.load(k_ptr + b * skb + h * skh + rn[:, None].to(tl.int64) * sks + d[None, :],
                    mask=n_ok[:, None] & (d[None, :] < DQK), other=0.0)  # (BN, DQKP)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BM, BN), base 2
        ok = n_ok[None, :] & t_ok[:, None]
        if CAUSAL:
            ok = ok & (rn[None, :] <= offset + rm[:, None])
        if HAS_MASK:
            mv = tl.load(m_ptr + b * smb + h * smh + rm[:, None].to(tl.int64) * smt + rn[None, :].to(tl.int64) * sms,
                         mask=t_ok[:, None] & n_ok[None, :], other=0)
            ok = ok & (mv != 0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: weights stay 0
        alpha = tl.exp2(m_i - m_safe)  # 1 exactly where the max did not move; 0 from -inf
        p = tl.exp2(s - m_safe[:, None])  # 0 exactly where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + h * svh + rn[:, None].to(tl.int64) * svs + dv[None, :],
                    mask=n_ok[:, None] & (dv[None, :] < DV), other=0.0)  # (BN, DVP)
        if v_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:  # P as two 16-bit terms (~16 mantissa bits), as the decode kernel (mla_decode_triton.py)
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            acc = tl.dot(p_hi, v, acc * alpha[:, None])
            acc = tl.dot(p_lo, v, acc)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * sob + h * soh + rm[:, None].to(tl.int64) * sot + dv[None, :], o.to(o_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (dv[None, :] < DV))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
              causal_offset: int | None = None) -> torch.Tensor:
    """q (B, H, T, d_qk), k (B, H, S, d_qk), v (B, H, S, d_v), any strides but the last dimension's 1 -> o (B, H, T,
    d_v), contiguous, in q's dtype. Visible keys: those where `mask` (bool, broadcastable to (B, H, T, S)) is True,
    and with causal_offset c, key s for query t only where s <= c + t (0: SDPA's is_causal, S - T: the lower-right
    alignment of a chunk after cached positions); neither: every key. A query that sees no key gets zeros."""
    _interp_ok(q, k, v)
    B, H, T, DQK = q.shape
    S, DV = k.shape[2], v.shape[3]
    assert k.shape == (B, H, S, DQK) and v.shape[:3] == (B, H, S), \
        f"attention: q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv); got {tuple(q.shape)}, {tuple(k.shape)}, " \
        f"{tuple(v.shape)}"
    assert q.dtype == k.dtype == v.dtype, f"attention: one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty(B, H, T, DV, dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    if mask is not None:
        assert mask.dtype == torch.bool and mask.dim() == 4, f"attention: a bool (B|1, H|1, T, S) mask, got " \
            f"{mask.dtype} {tuple(mask.shape)}"
        mask = mask.expand(B, H, T, S)  # (stride 0 on broadcast dimensions: no copy)
        ms = mask.stride()
        m_arg = mask
    else:
        ms, m_arg = (0, 0, 0, 0), q
    grid = (triton.cdiv(T, ATT_BM), B * H)
    _attention_kernel[grid](q, k, v, m_arg, o, H, T, S, 0 if causal_offset is None else int(causal_offset),
                            scale * 1.4426950408889634,  # log2(e): exp2 below
                            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            v.stride(0), v.stride(1), v.stride(2), *ms, o.stride(0), o.stride(1), o.stride(2),
                            DQK=DQK, DV=DV, DQKP=max(16, triton.next_power_of_2(DQK)),
                            DVP=max(16, triton.next_power_of_2(DV)), HAS_MASK=mask is not None,
                            CAUSAL=causal_offset is not None, BM=ATT_BM, BN=ATT_BN, num_warps=4, num_stages=2,
                            # every multiply and add rounded on its own: with FMA contraction the compiler may fuse
                            # `score * scale - max` or `l * alpha + sum` in one variant (CAUSAL / HAS_MASK) and
                            # not the other, and a query's bits would follow how its keys were masked (a GPU test
                            # saw a chunk's output differ from the whole prompt's before this, H100, 2026-12-07)
                            enable_fp_fusion=False)
    return o
