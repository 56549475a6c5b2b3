"""The batch-invariant mode on the GPU (dsv3/kernels/invariant.py, invariant_triton.py).

    python -m pytest tests/test_gpu_invariant.py -m gpu -q

A row's bits must not depend on its batch: the kernels against torch (bf16, to rounding) and against themselves in
other batches (bitwise); then the engine: a request's greedy tokens and log-probabilities are the same bits alone,
in a batch of others that come and go, with its prompt prefilled whole or in chunks, with CUDA graphs, and with
MTP speculation (whose verification step then computes what plain decoding computes: the same tokens as k = 0).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3 import kernels
from dsv3.inference.engine import Engine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def mode():
    old = kernels.set_batch_invariant(True)
    yield
    kernels.set_batch_invariant(old)


def _g(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def test_linear_rows_do_not_follow_the_batch(mode):
    g = _g(0)
    x = torch.randn(300, 1024, device="cuda", generator=g).bfloat16()
    w = torch.randn(2048, 1024, device="cuda", generator=g).bfloat16() * 0.03
    full = F.linear(x, w)
    kernels.set_batch_invariant(False)
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(full.float(), ref, atol=2e-2, rtol=2e-2)
    kernels.set_batch_invariant(True)
    for rows in ([0], [77], [5, 200, 3], list(range(40, 90))):
        assert torch.equal(F.linear(x[rows], w), full[rows]), rows
    # 3-D input (B, T, D) as the model's linears take it; the router's fp32 product; a bmm (absorbed MLA's einsum)
    assert torch.equal(F.linear(x[:64].view(8, 8, 1024), w).view(64, 2048), full[:64])
    xf, wf = x.float(), w[:64].float()
    r_full = F.linear(xf, wf)
    assert torch.equal(F.linear(xf[17:18], wf), r_full[17:18])
    torch.testing.assert_close(r_full, ref[:, :64], atol=1e-3, rtol=1e-3)
    h = torch.randn(16, 512, 128, device="cuda", generator=g).bfloat16()
    e_full = torch.einsum("hbd,hcd->bhc", h, w[:512].view(4, 128, 1024)[:, :, :128].repeat(4, 1, 1))
    e_one = torch.einsum("hbd,hcd->bhc", h[:, 3:4], w[:512].view(4, 128, 1024)[:, :, :128].repeat(4, 1, 1))
    assert torch.equal(e_one, e_full[3:4])


def test_norms_softmax_and_attention_do_not_follow_the_batch(mode):
    g = _g(1)
    x = torch.randn(100, 7168, device="cuda", generator=g).bfloat16()
    m = x.float().pow(2).mean(-1, keepdim=True)
    assert torch.equal(x[42:43].float().pow(2).mean(-1, keepdim=True), m[42:43])
    logits = torch.randn(32, 129_280, device="cuda", generator=g)
    lp = torch.log_softmax(logits, -1)
    assert torch.equal(torch.log_softmax(logits[9:10], -1), lp[9:10])
    torch.testing.assert_close(lp, logits.double().log_softmax(-1).float(), atol=1e-5, rtol=1e-5)
    B, H, S, d, dv = 3, 8, 700, 192, 128  # MLA's head dims
    q, k = (torch.randn(B, H, S, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    v = torch.randn(B, H, S, dv, device="cuda", generator=g).bfloat16()
    full = kernels.attention(q, k, v, d ** -0.5)
    kernels.set_batch_invariant(False)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=d ** -0.5)
    kernels.set_batch_invariant(True)
    torch.testing.assert_close(full.float(), ref, atol=2e-2, rtol=2e-2)
    keys = torch.arange(S, device="cuda")
    for start, end in ((1, 700), (333, 512), (699, 700)):  # a chunk after cached keys, rows anywhere in its tiles
        mask = (keys[None, :] <= torch.arange(start, end, device="cuda")[:, None])[None, None]
        part = kernels.attention(q[1:2, :, start:end], k[1:2], v[1:2], d ** -0.5, mask)
        assert torch.equal(part, full[1:2, :, start:end]), (start, end)


def _cfg(k_mtp: int):
    from conftest import tiny_cfg

    # wide enough that the GEMMs span several K tiles and bf16 near-ties occur (16 experts, top-4)
    return tiny_cfg(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=512, num_nextn_predict_layers=k_mtp,
                    eos_token_id=None, initializer_range=0.05, hidden_size=256, intermediate_size=512,
                    moe_intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
                    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                    num_experts_per_tok=4, n_group=4, topk_group=2)


def _prompts(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = (5, 40, 1, 77, 13, 130, 9, 64, 2, 50, 31, 100)[:n]
    return [torch.randint(0, 512, (L,), generator=g).tolist() for L in lengths]


def _outputs(engine, prompts, params):
    outs = engine.generate(prompts, params)
    return [(o.token_ids, [(lp.logprob, tuple(lp.top)) for lp in (o.logprobs or [])]) for o in outs]


@pytest.mark.parametrize("k", [0, 1])
def test_a_request_gives_the_same_bits_alone_batched_and_chunked(mode, k):
    from conftest import make_model

    model = make_model(_cfg(1), seed=7, bias_std=0.3).to("cuda", torch.bfloat16).eval()
    prompts = _prompts()
    params = [SamplingParams(max_new_tokens=24 + 3 * i, temperature=0, logprobs=2, ignore_eos=True)
              for i in range(len(prompts))]
    want = {}
    for graphs in (True, False):  # each request alone, without speculation: what every other run must give
        alone = Engine(model, None, max_batch_size=1, speculative_k=0, batch_invariant=True, cuda_graphs=graphs)
        want[graphs] = [_outputs(alone, [p], [sp])[0] for p, sp in zip(prompts, params)]
    # (eager decoding attends by the absorbed einsums, other arithmetic than the graphed kernel's: it is compared
    # with the eager run alone)
    runs = {"batched": dict(max_batch_size=8), "chunked": dict(max_batch_size=32, max_prefill_tokens=48),
            "eager": dict(max_batch_size=5, cuda_graphs=False), "no overlap": dict(max_batch_size=3, overlap=False)}
    for name, kw in runs.items():
        eng = Engine(model, None, speculative_k=k, batch_invariant=True, **kw)
        got = _outputs(eng, prompts, params)
        ref = want[kw.get("cuda_graphs", True)]
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a[0] == b[0], f"{name} k={k}: request {i}'s tokens"
            assert a[1] == b[1], f"{name} k={k}: request {i}'s log-probabilities"


def test_sampled_requests_give_the_same_tokens_alone_and_batched(mode):
    """Seeded sampling (temperature, top-k, top-p, min-p: sorts, softmax, cumulative sums on the device) in the mode:
    a request's tokens alone and in a batch."""
    from conftest import make_model

    model = make_model(_cfg(1), seed=8, bias_std=0.3).to("cuda", torch.bfloat16).eval()
    prompts = _prompts(8, seed=5)
    params = [SamplingParams(max_new_tokens=30, temperature=0.9, seed=i, ignore_eos=True,
                             **({"top_p": 0.9}, {"top_k": 40}, {"min_p": 0.05}, {})[i % 4])
              for i in range(len(prompts))]
    alone = Engine(model, None, max_batch_size=1, batch_invariant=True)
    want = [alone.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    got = [o.token_ids for o in Engine(model, None, max_batch_size=8, batch_invariant=True).generate(prompts, params)]
    assert got == want
