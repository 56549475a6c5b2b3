"""The batch-invariant mode (dsv3/kernels/invariant.py, invariant_triton.py) on the CPU.

Its kernels against their specifications (torch's own ops) and a row's bits against the same row in another batch,
run by the Triton interpreter (TRITON_INTERPRET=1 python -m pytest tests/test_invariant.py; skipped without it, e.g.
in CI; the interpreter has no bf16 dot, so fp32 / fp16 here, bf16 in tests/test_gpu_invariant.py); the mode's rules
(what steps aside, what the engine refuses) everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)
from dsv3 import kernels
from dsv3.kernels import backend, invariant


@pytest.fixture
def mode_flag():
    """The mode's flag alone (its aten overrides need CUDA): what the kernels and rules read."""
    old = backend.BATCH_INVARIANT
    backend.BATCH_INVARIANT = True
    yield
    backend.BATCH_INVARIANT = old


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bmm_matches_torch_and_rows_do_not_follow_the_batch(dtype):
    from dsv3.kernels.invariant_triton import MM_BM, bmm

    g = _g(1)
    a = torch.randn(2, 70, 200, generator=g).to(dtype)
    b = torch.randn(2, 200, 90, generator=g).to(dtype)
    c = bmm(a, b)
    ref = torch.bmm(a.float(), b.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(c.float(), ref, atol=tol * 10, rtol=tol)
    # the same rows in other batches: the same bits. (The interpreter's tl.dot is NumPy's matmul, whose sums may
    # follow a row's place inside its tile, unlike the GPU's MMA: here each row keeps its place in a tile; the GPU
    # test moves rows anywhere.)
    T = MM_BM
    for lo, hi in ((0, 1), (0, 7), (T, T + 3), (T, 70), (0, 2 * T)):
        assert torch.equal(bmm(a[:, lo:hi], b), c[:, lo:hi]), (lo, hi)
    other = torch.cat([torch.randn(2, T + 9, 200, generator=g).to(dtype), a[:, 9:10]], 1)
    assert torch.equal(bmm(other, b)[:, T + 9], c[:, 9])
    # strided operands (a transposed weight, as F.linear hands its weight over)
    w = torch.randn(90, 200, generator=g).to(dtype)
    assert torch.equal(bmm(a[:1], w.t().unsqueeze(0)), bmm(a[:1], w.t().contiguous().unsqueeze(0)))
    # a K of several chunks (k_chunk: 256 columns): the chunks run in parallel for a few rows (split, chosen by
    # the row and tile counts) or in one program; the same bits either way, and a row alone (split) as in a batch
    from dsv3.kernels.invariant_triton import k_chunk

    a2, b2 = torch.randn(2, 40, 600, generator=g).to(dtype), torch.randn(2, 600, 70, generator=g).to(dtype)
    assert k_chunk(600) == 256 and k_chunk(64 * 1024) == 4096
    one = bmm(a2, b2, split=False)
    torch.testing.assert_close(one.float(), torch.bmm(a2.float(), b2.float()), atol=tol * 20, rtol=tol)
    assert torch.equal(bmm(a2, b2, split=True), one)
    assert torch.equal(bmm(a2[:, :1], b2), one[:, :1])  # (1 row, 2 tiles: the split path)


@interp
def test_the_overrides_compute_the_aten_ops():
    """The functions the mode registers for aten's CUDA kernels, called on CPU tensors: mm / addmm / bmm, mean over
    the last dimension (and its fallbacks), softmax and log_softmax over any dimension."""
    g = _g(2)
    a, b = torch.randn(37, 64, generator=g), torch.randn(64, 48, generator=g)
    torch.testing.assert_close(invariant._mm(a, b), a @ b, atol=1e-4, rtol=1e-4)
    bias = torch.randn(48, generator=g)
    torch.testing.assert_close(invariant._addmm(bias, a, b, beta=0.5, alpha=2.0), torch.addmm(bias, a, b, beta=0.5,
                                                                                               alpha=2.0),
                               atol=1e-4, rtol=1e-4)
    x, y = torch.randn(3, 5, 64, generator=g), torch.randn(3, 64, 7, generator=g)
    torch.testing.assert_close(invariant._bmm(x, y), torch.bmm(x, y), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(invariant._mm(a.double(), b.double()), a.double() @ b.double())  # the plain fallback
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        invariant._mm(a, a)
    z = torch.randn(4, 6, 300, generator=g)
    torch.testing.assert_close(invariant._mean_dim(z, [-1], True), z.mean(-1, keepdim=True))
    torch.testing.assert_close(invariant._mean_dim(z, [2]), z.mean(2))
    torch.testing.assert_close(invariant._mean_dim(z, [1]), z.mean(1))  # not a row reduction: the fallback
    torch.testing.assert_close(invariant._mean_dim(z, None), z.mean())
    torch.testing.assert_close(invariant._mean_dim(z.half(), [-1], dtype=torch.float32), z.half().float().mean(-1),
                               atol=1e-3, rtol=1e-3)
    for dim in (-1, 0, 1):
        torch.testing.assert_close(invariant._softmax(z, dim, False), z.softmax(dim))
        torch.testing.assert_close(invariant._log_softmax(z, dim, False), z.log_softmax(dim))
    h = invariant._log_softmax(z.half(), -1, True)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, z.half().float().log_softmax(-1), atol=1e-3, rtol=1e-3)


@interp
def test_row_reductions_do_not_follow_the_batch_or_the_padding():
    """A row's mean and softmax are the same bits in any batch; a softmax row padded with -inf (the eager decode's
    scores over a longer padded context) gives its first entries the same bits."""
    from dsv3.kernels.invariant_triton import row_mean, softmax

    g = _g(3)
    x = torch.randn(40, 3000, generator=g)
    m = row_mean(x)
    assert torch.equal(row_mean(x[7:8]), m[7:8]) and torch.equal(row_mean(x[3:29]), m[3:29])
    s = softmax(x[:, :700], log=False)
    padded = torch.cat([x[:5, :700], torch.full((5, 1500), float("-inf"))], 1)
    assert torch.equal(softmax(padded, log=False)[:, :700], s[:5])
    assert torch.equal(softmax(x[11:12, :700], log=True), softmax(x[:, :700], log=True)[11:12])


def _loop_sum(y, w):
    """The MoE combine as eager torch adds it in the mode (moe._weighted_sum on the CPU): the k terms in order."""
    acc = y[:, 0].float() * w[:, :1]
    for j in range(1, y.shape[1]):
        acc = acc + y[:, j].float() * w[:, j:j + 1]
    return acc


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weighted_sum_has_the_loops_bits_in_one_launch(dtype, mode_flag):
    """The mode's MoE combine in one kernel: the bits of the eager loop over k (each product and each sum rounded to
    fp32 in k order), rounded once to the output dtype; a row's bits do not follow the batch; a strided y (a view of
    wider rows) and one expert a token work; through moe._weighted_sum on the device it takes the kernel."""
    from dsv3.kernels.invariant_triton import weighted_sum
    from dsv3.model import moe

    g = _g(8)
    for N, K, D in ((5, 6, 1000), (3, 8, 2500), (4, 1, 64)):  # (D past one block: 2500 = 3 blocks, masked)
        y = torch.randn(N, K, D, generator=g).to(dtype)
        w = torch.rand(N, K, generator=g)
        ref = _loop_sum(y, w)
        out = weighted_sum(y, w)
        assert out.dtype == torch.float32 and torch.equal(out, ref), (N, K, D)
        # (bf16 out: the interpreter of Triton 3.6 casts fp32 to bf16 by truncation where the GPU rounds to nearest
        # even, as torch does: within one bf16 step here, the same bits on the GPU, tests/test_gpu_invariant.py)
        assert (weighted_sum(y, w, torch.bfloat16).float() - ref).abs().le(ref.abs() * 2 ** -7).all()
        assert torch.equal(weighted_sum(y[1:2], w[1:2]), ref[1:2])
        assert torch.equal(weighted_sum(y, w.bfloat16()), _loop_sum(y, w.bfloat16()))  # (bf16 gates, as a router's)
    wide = torch.randn(6, 4, 96, generator=g).to(dtype)
    w = torch.rand(6, 4, generator=g)
    assert torch.equal(weighted_sum(wide[::2, :, :80], w[::2]), _loop_sum(wide[::2, :, :80], w[::2]))
    torch.testing.assert_close(weighted_sum(y, w[:4, :1]), (y.float() * w[:4, :1, None]).sum(1))
    with pytest.raises(AssertionError, match="weighted_sum: y"):
        weighted_sum(y, w[:, :2])
    # the model's combine on the CPU: the loop (its reference), with the output rounded once
    y, w = torch.randn(3, 6, 40, generator=g).to(dtype), torch.rand(3, 6, generator=g)
    assert torch.equal(moe._weighted_sum(y, w, torch.bfloat16), _loop_sum(y, w).to(torch.bfloat16))


def _sdpa(q, k, v, scale, mask=None, causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


@interp
def test_attention_matches_sdpa_and_a_prompt_gives_the_same_bits_however_chunked():
    """The expanded (prefill) attention: SDPA's results (causal, a lower-right chunk, a bool mask); and a query's
    output bits are the same whether its prompt runs at once, as a chunk after cached keys, or padded in a batch."""
    from dsv3.kernels.invariant_triton import ATT_BM, attention

    g = _g(4)
    B, H, S, d, dv = 2, 3, 75, 24, 16  # head dims not powers of two (MLA's 192 / 128 in the real models)
    q, k = torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g)
    v = torch.randn(B, H, S, dv, generator=g)
    sc = d ** -0.5
    full = attention(q, k, v, sc, causal_offset=0)
    torch.testing.assert_close(full, _sdpa(q, k, v, sc, causal=True), atol=1e-5, rtol=1e-4)
    # (starts at whole query tiles: the interpreter's dot may follow a row's place in its tile, test_bmm_...'s note)
    for start in (ATT_BM, 2 * ATT_BM):  # a chunk of the queries from `start` on, after the cached keys
        part = attention(q[:, :, start:], k, v, sc, causal_offset=start)
        assert torch.equal(part, full[:, :, start:]), start
    a, e = ATT_BM, ATT_BM + 20  # a chunk of queries in the middle of the prompt, its keys padded past the end
    kk = torch.cat([k[:, :, :e], torch.randn(B, H, 9, d, generator=g)], 2)
    vv = torch.cat([v[:, :, :e], torch.randn(B, H, 9, dv, generator=g)], 2)
    keys = torch.arange(e + 9)
    mask = (keys[None, :] <= torch.arange(a, e)[:, None])[None, None]  # query a + t sees keys <= a + t
    masked = attention(q[:, :, a:e], kk, vv, sc, mask=mask)
    assert torch.equal(masked, full[:, :, a:e])
    torch.testing.assert_close(masked, _sdpa(q[:, :, a:e], kk, vv, sc, mask=mask), atol=1e-5, rtol=1e-4)
    alone = attention(q[1:, :, a:e], k[1:, :, :e], v[1:, :, :e], sc, causal_offset=a)  # one sequence, unpadded
    assert torch.equal(alone, full[1:, :, a:e])
    from torch.nn.attention.bias import causal_lower_right

    lr = invariant.attention(q[:, :, 2 * ATT_BM:], k, v, sc, causal_lower_right(S - 2 * ATT_BM, S))
    assert torch.equal(lr, full[:, :, 2 * ATT_BM:])
    assert torch.equal(invariant.attention(q, k, v, sc, None), full)
    # the engine's padded batch of chunks (CacheBatch.attn_mask): per-sequence ranges, the one positional variant.
    # Sequence 0 holds queries a..e-1 of the prompt over its first e keys; sequence 1 queries 2*BM..S-1 over all
    # S: padded to a common T and S with garbage past each one's end
    from dsv3.kernels.masks import CausalRanges

    T2 = S - 2 * ATT_BM
    qp = torch.randn(B, H, max(T2, e - a), d, generator=g)
    qp[0, :, :e - a], qp[1, :, :T2] = q[0, :, a:e], q[1, :, 2 * ATT_BM:]
    kp, vp = torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, dv, generator=g)
    kp[0, :, :e], vp[0, :, :e], kp[1], vp[1] = k[0, :, :e], v[0, :, :e], k[1], v[1]
    ranges = CausalRanges(torch.tensor([a, 2 * ATT_BM]), torch.tensor([e, S]), lambda: None)
    both = invariant.attention(qp, kp, vp, sc, ranges)
    assert torch.equal(both[0, :, :e - a], full[0, :, a:e]) and torch.equal(both[1, :, :T2], full[1, :, 2 * ATT_BM:])
    with pytest.raises(ValueError, match="bool mask"):
        invariant.attention(q, k, v, sc, torch.zeros(1, 1, S, S))


@interp
def test_mla_decode_splits_by_position_in_the_mode(mode_flag):
    """The decode kernel in the mode: a query's result does not move with the batch or the block table's width
    (the bucket's context), and still matches the reference."""
    from dsv3.kernels.mla_decode_triton import mla_decode

    g = _g(5)
    H, C, R, bs, n_rows = 4, 32, 16, 16, 240 * 16
    kv = torch.randn(n_rows, C, generator=g)
    pe = torch.randn(n_rows, R, generator=g)
    q_lat, q_pe = torch.randn(6, H, C, generator=g), torch.randn(6, H, R, generator=g)
    lens = torch.tensor([300, 5, 517, 64, 1, 260])
    table = torch.randperm(240, generator=g).view(6, 40)  # up to 640 positions a sequence
    out = mla_decode(q_lat, q_pe, kv, pe, table, lens, bs, 0.2)
    ref = kernels.mla_decode_ref(q_lat, q_pe, kv, pe, table, lens, bs, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for rows, width in (([2], 40), ([0, 2], 33), ([5, 1, 2], 35)):
        sub = mla_decode(q_lat[rows], q_pe[rows], kv, pe, table[rows, :width], lens[rows], bs, 0.2)
        assert torch.equal(sub, out[rows]), (rows, width)


@interp
def test_an_engine_through_the_overrides_generates_its_tokens():
    """The mode's aten kernels (registered here for the CPU, interpreted) under a whole engine: every Linear, norm,
    einsum and log-softmax of prefill and decode goes through them, and the tokens and log-probabilities are the
    engine's own (fp32, to rounding)."""
    from conftest import make_model as mk
    from dsv3.inference.engine import Engine, SamplingParams

    m = mk(tiny_cfg(), seed=0, bias_std=0.3).eval()
    prompts = [[1, 5, 9, 3], [7, 7, 2, 11, 40, 3, 9], [2]]
    sp = SamplingParams(max_new_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    ref = Engine(m, None, max_batch_size=4).generate(prompts, sp)
    lib = invariant.overrides("CPU")
    try:
        out = Engine(m, None, max_batch_size=4).generate(prompts, sp)
    finally:
        lib._destroy()
    for a, b in zip(ref, out):
        assert a.token_ids == b.token_ids
        assert max(abs(p.logprob - q.logprob) for p, q in zip(a.logprobs, b.logprobs)) < 1e-5
    assert torch.equal(torch.ones(2, 3) @ torch.ones(3, 2), torch.full((2, 2), 3.0))  # (torch's own kernel again)


def test_the_mode_sets_row_count_kernels_aside(mode_flag):
    """While on, the kernels chosen by row count answer "reference" whatever the tensors (checked without a GPU:
    the rule returns before looking at the device), the grouped experts take any number of rows, and the MoE's
    weighted sum adds its experts in order (the same value as the default's sum, to rounding)."""
    x, w = torch.zeros(1, 8), torch.zeros(8, 8)
    for op in backend.INVARIANT_ASIDE:
        assert backend.select(op, x, w) == "reference", op
    from dsv3.model.moe import _weighted_sum

    g = _g(6)
    y, gw = torch.randn(5, 4, 16, generator=g), torch.rand(5, 4, generator=g)
    ordered = _weighted_sum(y, gw)
    expect = y[:, 0] * gw[:, :1] + y[:, 1] * gw[:, 1:2] + y[:, 2] * gw[:, 2:3] + y[:, 3] * gw[:, 3:4]
    assert torch.equal(ordered, expect)
    backend.BATCH_INVARIANT = False
    torch.testing.assert_close(_weighted_sum(y, gw), ordered)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusals")
def test_the_mode_and_the_engine_refuse_the_cpu_with_the_reason():
    from dsv3.inference.engine import Engine

    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        kernels.set_batch_invariant(True)
    assert not kernels.batch_invariant()
    model = make_model(tiny_cfg(), seed=0)
    with pytest.raises(ValueError, match="runs on a GPU"):
        Engine(model, None, batch_invariant=True)
    assert not kernels.batch_invariant()


def test_expert_parallel_serving_refuses_the_mode():
    from dsv3.ep_serve import check_modes

    with pytest.raises(ValueError, match="batch-invariant cannot run with expert parallelism"):
        check_modes(False, None, False, batch_invariant=True)
    check_modes(False, None, False)  # (nothing else asked: no error)


def test_the_flag_reaches_serve_and_generate():
    from dsv3.cli import build_parser

    p = build_parser()
    for verb in (["serve", "runs/x"], ["generate", "runs/x", "--prompt", "a"]):
        args = p.parse_args(verb + ["--batch-invariant"])
        assert args.batch_invariant is True, verb
