"""The Triton absorbed-MLA decode kernel (dsv3/kernels/mla_decode_triton.py) on the GPU: against its
specification `mla_decode_ref` at the 16b and 671B shapes, inside a CUDA graph and torch.compile, and
in the graphed decode step against the reference (einsum) attention. Run on the device machine:

    python -m pytest tests/test_gpu_mla_decode.py -m gpu -q

Skipped where no CUDA device is present (CI)."""

import pytest
import torch

import dsv3
from dsv3 import kernels
from dsv3.kernels import mla_decode_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _kernel():
    if not kernels.backend_available("mla_decode"):
        pytest.skip("needs triton")
    from dsv3.kernels.mla_decode_triton import mla_decode

    return mla_decode


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(B, H, C, R, ctx, dtype, seed, block_size=16):
    """One layer's paged cache with random latents, random distinct block tables over the engine's
    bucket (nblk = next power of two of the blocks ctx needs: entries past a sequence are unused),
    lengths: ctx for the first sequence, 1 for the last, random in between; random queries."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    nblk = 1 << max(0, (-(-ctx // block_size) - 1).bit_length())
    num_blocks = B * nblk + 8
    kv = torch.randn(num_blocks * block_size, C, device="cuda", generator=g).to(dtype)
    pe = torch.randn(num_blocks * block_size, R, device="cuda", generator=g).to(dtype)
    tables = torch.randperm(num_blocks, device="cuda", generator=g)[: B * nblk].view(B, nblk)
    lens = torch.randint(1, ctx + 1, (B,), device="cuda", generator=g)
    lens[0] = ctx
    if B > 1:
        lens[-1] = 1
    q_lat = torch.randn(B, H, C, device="cuda", generator=g).to(dtype)
    q_pe = torch.randn(B, H, R, device="cuda", generator=g).to(dtype)
    return q_lat, q_pe, kv, pe, tables, lens, block_size


SCALE = 192 ** -0.5  # 1 / sqrt(qk_nope + qk_rope)


@pytest.mark.parametrize("ctx", [1, 100, 2000])
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("H", [16, 128])  # 16b, 671B (both C = 512, R = 64)
def test_mla_decode_kernel_bf16_vs_reference(H, B, ctx):
    mla_decode = _kernel()
    args = _inputs(B, H, 512, 64, ctx, torch.bfloat16, seed=H * 10_000 + B * 100 + ctx)
    got = mla_decode(*args, SCALE)
    ref = mla_decode_ref(*args, SCALE)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape and torch.isfinite(got).all()
    assert _rel(got, ref) < 1e-2, _rel(got, ref)
    per_row = ((got.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1)).max().item()
    assert per_row < 3e-2, per_row  # every (sequence, head), short and long ones alike


@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_mla_decode_kernel_fp32_vs_reference(num_splits):
    """fp32 inputs (tl.dot in IEEE fp32, no TF32): the reference up to summation order; any split count."""
    mla_decode = _kernel()
    args = _inputs(3, 20, 512, 64, 300, torch.float32, seed=5, block_size=8)
    got = mla_decode(*args, SCALE, num_splits)
    torch.testing.assert_close(got, mla_decode_ref(*args, SCALE), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mla_decode_kernel_in_cuda_graph_and_compile():
    """Captured once, replayed after the tables, lengths and queries changed in place: the new
    answer (the grid depends on shapes only, the lengths are read on the device). torch.compile
    (fullgraph) traces through the triton_op to the same result."""
    mla_decode = _kernel()
    q_lat, q_pe, kv, pe, tables, lens, bs = _inputs(4, 16, 512, 64, 128, torch.bfloat16, seed=11)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mla_decode(q_lat, q_pe, kv, pe, tables, lens, bs, SCALE)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(q_lat, q_pe, kv, pe, tables, lens, bs, SCALE)
    q_lat.copy_(torch.randn_like(q_lat))
    tables.copy_(tables.flip(0))
    lens.copy_(torch.tensor([3, 128, 1, 64], device="cuda"))
    graph.replay()
    ref = mla_decode_ref(q_lat, q_pe, kv, pe, tables, lens, bs, SCALE)
    assert _rel(out, ref) < 1e-2, _rel(out, ref)

    @torch.compile(fullgraph=True)
    def step(q_lat, q_pe, kv, pe, tables, lens):
        return mla_decode(q_lat * 2, q_pe, kv, pe, tables, lens, bs, SCALE)

    eager = mla_decode(q_lat * 2, q_pe, kv, pe, tables, lens, bs, SCALE)
    torch.testing.assert_close(step(q_lat, q_pe, kv, pe, tables, lens), eager)


def _cfg():
    return dsv3.ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                            num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
                            n_group=4, topk_group=2, max_position_embeddings=256, rope_scaling=None,
                            num_nextn_predict_layers=0, initializer_range=0.2)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_graph_decode_step_triton_attention_vs_reference(compile_decode):
    """One graphed decode step (compiled or not) with the Triton attention against the eager step with
    the reference einsum attention on the same meta (teacher-forced): logits within 2%, top-1 equal
    on at least 2 of the 3 rows (bf16 near-ties); the padding row of the 4-row bucket is finite."""
    from dsv3.inference.engine import Engine, SamplingParams
    from dsv3.inference.graphs import StaticBatch

    _kernel()
    m = dsv3.build_model(_cfg(), device="cuda", dtype=torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 40)]
    eng = Engine(m, None, max_batch_size=4, cuda_graphs=True, compile_decode=compile_decode)
    for p in prompts:
        eng.add_request(p, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    eng.step()  # prefill
    reqs = eng.running
    got = eng._graphs.main([[r.tokens[-1]] for r in reqs], [r.main_len for r in reqs],
                           [r.blocks for r in reqs])[0][:, 0].float().clone()
    e = next(iter(eng._graphs._entries.values()))
    sb = e.sb
    assert sb.attention is not None and e.graph is not None  # the kernel served the captured step
    assert torch.isfinite(e.outputs[0]).all()  # the padding row included
    ref_sb = StaticBatch(eng.cache, sb.B, 1, sb.nblk, sb.pad_block)  # attention=None: the einsums
    ref_sb.meta.copy_(sb.meta)
    with torch.no_grad():
        ref = eng._graphs._forward_main(ref_sb)[0][: len(reqs), 0].float()  # rewrites the same latents
    assert _rel(got, ref) < 2e-2, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3


def test_graph_decode_greedy_triton_attention_vs_reference():
    """Free-running greedy decoding through the graphs, Triton attention against the reference path
    (kernels.use_backend(mla_decode="reference") while the buckets are built): tokens equal except where
    a bf16 near-tie flips."""
    from dsv3.inference.engine import Engine, SamplingParams

    _kernel()
    m = dsv3.build_model(_cfg(), device="cuda", dtype=torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 40, 1, 70)]
    sp = [SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True) for _ in prompts]
    ref_eng = Engine(m, None, max_batch_size=8, block_size=16, cuda_graphs=True)
    with kernels.use_backend(mla_decode="reference"):  # read when each bucket is built, i.e. on first use
        a = ref_eng.generate(prompts, sp)
    eng = Engine(m, None, max_batch_size=8, block_size=16, cuda_graphs=True)
    b = eng.generate(prompts, sp)
    assert all(e.sb.attention is None for e in ref_eng._graphs._entries.values())
    assert all(e.sb.attention is not None for e in eng._graphs._entries.values())
    agree = sum(sum(u == v for u, v in zip(x.token_ids, y.token_ids)) for x, y in zip(a, b))
    # a near-tie flip costs the rest of that sequence (up to 40 of 200 tokens); measured 178/200 with the
    # two-term P (87/200 with a single bf16 P, which this bound rejects)
    assert agree >= 0.75 * sum(len(x.token_ids) for x in a), agree
    assert sum(x.token_ids[:5] == y.token_ids[:5] for x, y in zip(a, b)) >= len(prompts) - 1


@pytest.mark.parametrize("ctx", [1, 100, 2000])
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("H", [16, 128])
def test_mla_decode_uv_kernel_vs_reference(H, B, ctx):
    """The merge with W_UV in one launch (mla_decode_uv): W_UV a strided view of kv_b_proj's weight, as the model
    passes it; against mla_decode_ref then the per-head product."""
    _kernel()
    from dsv3.kernels.mla_decode_triton import mla_decode_uv

    args = _inputs(B, H, 512, 64, ctx, torch.bfloat16, seed=H * 10_000 + B * 100 + ctx + 7)
    g = torch.Generator(device="cuda").manual_seed(ctx)
    w_uv = (torch.randn(H * 256, 512, device="cuda", generator=g) * 0.05).bfloat16().view(H, 256, 512)[:, 128:]
    got = mla_decode_uv(*args, SCALE, w_uv)
    ref = torch.einsum("bhc,hvc->bhv", mla_decode_ref(*args, SCALE).float(), w_uv.float())
    assert got.dtype == torch.bfloat16 and got.shape == (B, H, 128) and torch.isfinite(got).all()
    assert _rel(got, ref) < 1e-2, _rel(got, ref)


@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_mla_uv_on_matches_off(compile):
    """A bf16 model's CUDA-graph decode step (compiled or not) with the merge + W_UV launch switched on against
    the same step switched off, teacher-forced on the same prompt (one row: the launch's rule, MLA_UV_ROWS): logits
    within 2%, the same top-1, and the fused launch ran for every layer."""
    from dsv3.kernels import mla_decode_triton as k
    from test_gpu_expert_gemv import decode_model_and_prompts, graphed_step_logits

    m, prompts = decode_model_and_prompts()
    prompts = prompts[1:2]

    def step_logits(on: bool):
        old = kernels.set_mla_uv(on)
        try:
            return graphed_step_logits(m, prompts, compile_decode=compile, max_batch_size=1)
        finally:
            kernels.set_mla_uv(old)

    ref = step_logits(False)
    calls, kernel = [], k._combine_uv_kernel
    k._combine_uv_kernel = type("Spy", (), {"__getitem__": lambda self, grid: calls.append(grid) or kernel[grid]})()
    try:
        got = step_logits(True)
    finally:
        k._combine_uv_kernel = kernel
    assert calls and len(calls) % m.config.num_hidden_layers == 0, len(calls)
    assert _rel(got, ref) < 2e-2, _rel(got, ref)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
