"""Batch-invariant kernels (Triton): each output row is computed by one fixed sequence of operations whatever the
number of rows around it, so a request's results do not depend on what else shares its batch (the kernels of the
batch-invariant mode, dsv3/kernels/invariant.py).

Why they are needed: cuBLAS, the CUDA reductions and SDPA pick their algorithm (tile shape, split-K, split
reduction, flash-decoding splits) from the whole tensor's shape, so the same row gives other bits in a batch of 1
than of 32; in bf16 a flipped router near-tie then changes the text (bench/RESULTS.md, the server against offline
generation). Here every choice that could change a row's summation order is fixed:

    bmm(a (Bt, M, K), b (Bt, K, N)) -> (Bt, M, N)   one tile configuration (BM x BN x BK) for every M; K in fixed
                                                    chunks (k_chunk: a function of K), each summed from zero in
                                                    BK steps, the chunks' fp32 sums added in order; fp32
                                                    accumulation ("ieee" for fp32 inputs: no TF32); row m of the
                                                    output reads only row m of a. A few rows (a decode step) run
                                                    the chunks in parallel and add them in a second kernel, many
                                                    rows in one program: the same operations, the same bits
    row_mean(x (R, D)) -> (R,)                      one program per row, fixed-width chunks from 0 (widths from D only)
    softmax(x (R, V), log) -> (R, V)                one program per row: max, then the sum of exp in fixed chunks
    weighted_sum(y (N, K, D), w (N, K)) -> (N, D)   the MoE's combine: one program per (row, D block), the k terms
                                                    added in k order in fp32 (the bits of eager torch's loop)
    attention(q, k, v, positions [, mask])          forward-only flash attention: per (sequence, head, query tile)
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
def _bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, KC, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                SPLIT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C = A @ B as a sum of K-chunks: each chunk of KC columns (a multiple of BK) accumulated from zero in BK steps,
    the chunks' fp32 results added in order. SPLIT: one program a chunk (program_id(2) = chunk * Bt + batch), each
    storing its fp32 chunk in c (n_chunks, Bt, M, N), which _chunk_sum_kernel adds; otherwise one program adds them
    itself. Both give every element the same operations, so the choice (by M, for speed) changes no bit."""
    pid_n = tl.program_id(0)  # column tiles fastest: the row tiles of one batch entry share b's tiles in L2
    pid_m = tl.program_id(1)
    bat = tl.program_id(2).to(tl.int64)
    k_lo, k_hi = 0, K
    c_off = bat * scb
    if SPLIT:
        n_bat = tl.num_programs(2) // tl.cdiv(K, KC)
        chunk = bat // n_bat
        bat = bat % n_bat
        k_lo = chunk * KC
        k_hi = tl.minimum(K, k_lo + KC)
        c_off = (chunk * n_bat + bat) * scb  # c: (n_chunks, Bt, M, N) contiguous
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + bat * sab + rm[:, None] * sam + rk[None, :] * sak  # (BM, BK)
    b_ptrs = b_ptr + bat * sbb + rk[:, None] * sbk + rn[None, :] * sbn  # (BK, BN)
    total = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(k_lo, k_hi, KC):  # (SPLIT: this program's one chunk)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(c0, tl.minimum(c0 + KC, K), BK):
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs + k0 * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + k0 * sbk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        total = total + acc
    tl.store(c_ptr + c_off + rm[:, None] * scm + rn[None, :] * scn, total.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["MN", "scb"])
def _chunk_sum_kernel(p_ptr, c_ptr, MN, N, n_chunks, scb, scm, scn, BLOCK: tl.constexpr):
    """c[bat] = the fp32 chunk results p (n_chunks, Bt, M, N) added in order (_bmm_kernel's SPLIT half)."""
    bat = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    n_bat = tl.num_programs(1)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, n_chunks):
        total = total + tl.load(p_ptr + (c * n_bat + bat) * MN + i, mask=ok, other=0.0)
    tl.store(c_ptr + bat * scb + (i // N) * scm + (i % N) * scn, total.to(c_ptr.dtype.element_ty), mask=ok)


def k_chunk(K: int) -> int:
    """The K-chunk of every product with this K (a function of K alone: the weights' shape): 256 columns, or
    more for a long K so that there are at most 16 chunks; a multiple of MM_BK."""
    return max(256, triton.cdiv(triton.cdiv(K, 16), MM_BK) * MM_BK)


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # (the interpreter: an H100's count, so that the CPU tests take the split path too)
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None, split: bool | None = None
        ) -> torch.Tensor:
    """a (Bt, M, K) @ b (Bt, K, N) -> (Bt, M, N) in out_dtype (None: a's), any strides; a and b of one dtype among
    bf16, fp16, fp32. The module docstring's fixed-tile GEMM. Its K-chunks (k_chunk) run in parallel when the tiles
    alone would leave most of the GPU idle (a decode step's few rows: the weights are read by many programs at
    once), else in one program; `split` forces either (tests). The result's bits are the same both ways."""
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
    KC = k_chunk(K)
    n_chunks = triton.cdiv(K, KC)
    tiles = triton.cdiv(N, MM_BN) * triton.cdiv(M, MM_BM) * Bt
    if split is None:
        split = n_chunks > 1 and 2 * tiles < _sm_count(a.device)
    split = split and n_chunks > 1
    out = torch.empty(n_chunks, Bt, M, N, dtype=torch.float32, device=a.device) if split else c
    grid = (triton.cdiv(N, MM_BN), triton.cdiv(M, MM_BM), Bt * (n_chunks if split else 1))
    _bmm_kernel[grid](a, b, out, M, N, K, KC, a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1),
                      b.stride(2), out.stride(1 if split else 0), out.stride(-2), out.stride(-1), SPLIT=split,
                      IEEE=a.dtype == torch.float32, BM=MM_BM, BN=MM_BN, BK=MM_BK, num_warps=MM_WARPS,
                      num_stages=MM_STAGES)
    if split:
        _chunk_sum_kernel[(triton.cdiv(M * N, 1024), Bt)](out, c, M * N, N, n_chunks, c.stride(0), c.stride(1),
                                                          c.stride(2), BLOCK=1024, num_warps=4)
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


@triton.jit(do_not_specialize=["N", "syn", "syk", "swn", "son"])
def _weighted_sum_kernel(y_ptr, w_ptr, o_ptr, N, D, syn, syk, swn, swk, son, K: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < D
    acc = tl.load(y_ptr + n * syn + cols, mask=ok, other=0.0).to(tl.float32) * tl.load(w_ptr + n * swn).to(tl.float32)
    for j in tl.static_range(1, K):  # the k terms in k order, each product rounded, then each sum
        acc = acc + (tl.load(y_ptr + n * syn + j * syk + cols, mask=ok, other=0.0).to(tl.float32)
                     * tl.load(w_ptr + n * swn + j * swk).to(tl.float32))
    tl.store(o_ptr + n * son + cols, acc.to(o_ptr.dtype.element_ty), mask=ok)


def weighted_sum(y: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y (N, K, D) (D contiguous), w (N, K) -> Σ_k w[n, k] · y[n, k] (N, D) in out_dtype: in fp32, the k terms
    added in k order, each product rounded to fp32 before its sum (no multiply-add contraction), then rounded once
    to out_dtype. One launch with the bits of eager torch's `acc = y[:, 0].float() * w[:, :1]; acc = acc +
    y[:, j].float() * w[:, j:j+1]; ...` (dsv3/model/moe.py `_weighted_sum`, the mode's MoE combine: 3K - 1 small
    launches there and the cast, 18 a MoE layer at top-6)."""
    _interp_ok(y, w)
    assert y.dim() == 3 and w.shape == y.shape[:2] and (y.stride(2) == 1 or y.shape[2] <= 1), \
        f"weighted_sum: y (N, K, D) with D contiguous and w (N, K); got {tuple(y.shape)}, {tuple(w.shape)}"
    N, K, D = y.shape
    o = torch.empty(N, D, dtype=out_dtype, device=y.device)
    if o.numel() == 0:
        return o
    if K == 0:
        return o.zero_()
    BLOCK = min(ROW_BLOCK, triton.next_power_of_2(D))
    _weighted_sum_kernel[(triton.cdiv(D, BLOCK), N)](y, w, o, N, D, y.stride(0), y.stride(1), w.stride(0),
                                                     w.stride(1), o.stride(0), K=K, BLOCK=BLOCK, num_warps=4,
                                                     enable_fp_fusion=False)
    return o


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


# Every integer that can change with the batch or the call's form (lengths, strides, head groups) stays out of
# Triton's specialisation, and so do the tensors' alignments: one compiled variant serves every causal call. On
# the GPU a second variant is a second compilation whose layouts (and so its reduction orders) may differ: the
# H200 gave the same prompt other bits through a variant that loaded a bool mask than through the one that
# masked by position, even with every tile the same (2026-12-07).
_ATT_NOSPEC = ["H", "T", "S", "sqb", "sqh", "sqt", "skb", "skh", "sks", "svb", "svh", "svs", "smb", "smh", "smt",
               "sms", "sob", "soh", "sot"]


@triton.jit(do_not_specialize=_ATT_NOSPEC, do_not_specialize_on_alignment=["q_ptr", "k_ptr", "v_ptr", "o_ptr",
                                                                             "m_ptr"])
def _attention_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, qs_ptr, kl_ptr, H, T, S, qk_scale,
                      sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smh, smt, sms, sob, soh, sot,
                      DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, DVP: tl.constexpr,
                      HAS_MASK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q0 = tl.load(qs_ptr + b)  # this sequence's query 0 sits at position q0: query t sees keys s <= q0 + t ...
    kl = tl.load(kl_ptr + b)  # ... with s < kl (its context's length)
    rm = pid_m * BM + tl.arange(0, BM)  # (BM,) query rows
    d = tl.arange(0, DQKP)
    dv = tl.arange(0, DVP)
    t_ok = rm < T
    q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None].to(tl.int64) * sqt + d[None, :],
                mask=t_ok[:, None] & (d[None, :] < DQK), other=0.0)  # (BM, DQKP)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DVP), dtype=tl.float32)
    # key tiles past this query tile's last position hold no visible key: skipped (a key tile that a query of
    # the tile cannot see is an exact no-op for it anyway: its weights are 0 and the running max stays)
    hi = tl.minimum(tl.minimum(S, kl), q0 + (pid_m + 1) * BM)
    for start in range(0, hi, BN):
        rn = start + tl.arange(0, BN)
        n_ok = rn < S
        k = tl.load(k_ptr + b * skb + h * skh + rn[:, None].to(tl.int64) * sks + d[None, :],
                    mask=n_ok[:, None] & (d[None, :] < DQK), other=0.0)  # (BN, DQKP)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BM, BN), base 2
        ok = n_ok[None, :] & t_ok[:, None] & (rn[None, :] <= q0 + rm[:, None]) & (rn[None, :] < kl)
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


def _per_sequence(x, B: int, device: torch.device) -> torch.Tensor:
    """An int or a (B,) tensor -> (B,) int32 on `device` (the kernel reads one value a sequence)."""
    if isinstance(x, torch.Tensor):
        assert x.shape == (B,), f"attention: one value a sequence, (B,) = ({B},), got {tuple(x.shape)}"
        return x.to(device=device, dtype=torch.int32)
    return torch.full((B,), int(x), dtype=torch.int32, device=device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
              causal_offset: int | None = None, q_start: int | torch.Tensor | None = None,
              k_len: int | torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, T, d_qk), k (B, H, S, d_qk), v (B, H, S, d_v), any strides but the last dimension's 1 -> o (B, H, T,
    d_v), contiguous, in q's dtype. Visible keys, by position: key s for query t where s <= q_start + t and
    s < k_len (each an int, or a (B,) tensor: one a sequence; k_len defaults to S). causal_offset c is q_start = c
    (0: SDPA's is_causal, S - T: the lower-right alignment of a chunk after cached positions); with neither every key
    is visible. `mask` (bool, broadcastable to (B, H, T, S)) further limits them: True where allowed.

    Every call by position runs one compiled kernel, so a query's bits are the same whichever form (causal,
    lower-right, per-sequence ranges of a padded batch) reached it. A call with `mask` runs a second variant, whose
    bits may differ from it: the batch-invariant mode passes positions (kernels.attention.CausalRanges), never a
    mask, for the engine's prompts. A query that sees no key gets zeros."""
    _interp_ok(q, k, v)
    B, H, T, DQK = q.shape
    S, DV = k.shape[2], v.shape[3]
    assert k.shape == (B, H, S, DQK) and v.shape[:3] == (B, H, S), \
        f"attention: q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv); got {tuple(q.shape)}, {tuple(k.shape)}, " \
        f"{tuple(v.shape)}"
    assert q.dtype == k.dtype == v.dtype, f"attention: one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    assert causal_offset is None or q_start is None, "attention: causal_offset or q_start, not both"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty(B, H, T, DV, dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    if causal_offset is not None:
        q_start = causal_offset
    qs = _per_sequence(S if q_start is None else q_start, B, q.device)  # S: every key at or before S + t
    kl = _per_sequence(S if k_len is None else k_len, B, q.device)
    if mask is not None:
        assert mask.dtype == torch.bool and mask.dim() == 4, f"attention: a bool (B|1, H|1, T, S) mask, got " \
            f"{mask.dtype} {tuple(mask.shape)}"
        mask = mask.expand(B, H, T, S)  # (stride 0 on broadcast dimensions: no copy)
        ms = mask.stride()
        m_arg = mask
    else:
        ms, m_arg = (0, 0, 0, 0), qs
    grid = (triton.cdiv(T, ATT_BM), B * H)
    _attention_kernel[grid](q, k, v, m_arg, o, qs, kl, H, T, S,
                            scale * 1.4426950408889634,  # log2(e): exp2 below
                            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            v.stride(0), v.stride(1), v.stride(2), *ms, o.stride(0), o.stride(1), o.stride(2),
                            DQK=DQK, DV=DV, DQKP=max(16, triton.next_power_of_2(DQK)),
                            DVP=max(16, triton.next_power_of_2(DV)), HAS_MASK=mask is not None,
                            BM=ATT_BM, BN=ATT_BN, num_warps=4, num_stages=2,
                            # every multiply and add rounded on its own (no FMA contraction): the same
                            # arithmetic whatever the compiler makes of the surrounding code
                            enable_fp_fusion=False)
    return o
