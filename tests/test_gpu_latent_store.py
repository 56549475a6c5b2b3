"""The fused latent store (dsv3/kernels/latent_store_triton.py) on a GPU against its reference at the presets'
shapes; the query's rotation in the same launch bit for bit apply_rope's (a strided view of q, bf16 and fp16, the
presets' head counts), compiled by inductor and replayed in a CUDA graph; and a bf16 model's graphed (and compiled)
decode step with it switched on (the query rotated by the store: one launch a layer, with the query) against the
same step with it off (and with every decode switch on: dense GEMV, per-head GEMV, fused store). Run on the device
machine:

    python -m pytest tests/test_gpu_latent_store.py -m gpu -q
"""

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import store_latents_ref
from dsv3.model.rope import apply_rope

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("C,P", [(512, 64), (256, 32), (64, 16), (100, 6)])
@pytest.mark.parametrize("M", [1, 4, 12])
def test_kernel_vs_reference(M, C, P):
    g = torch.Generator(device="cuda").manual_seed(M + C)
    kv = torch.zeros(3, 64, C, device="cuda", dtype=torch.bfloat16)
    pe = torch.zeros(3, 64, P, device="cuda", dtype=torch.bfloat16)
    kv_a = torch.randn(M, C + P, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(C, device="cuda", generator=g)).bfloat16()
    ang = torch.rand(M, P // 2, device="cuda", generator=g) * 100
    rows = torch.randperm(64, device="cuda", generator=g)[:M]
    kv2, pe2 = kv.clone(), pe.clone()
    store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, ang.cos(), ang.sin())
    kernels.store_latents(kv2, pe2, 1, rows, kv_a, w, 1e-6, ang.cos(), ang.sin(), backend="triton")
    # bf16 outputs: equal or one rounding step apart (the sum of squares and the rotation in another order)
    assert torch.allclose(kv2.float(), kv.float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(pe2.float(), pe.float(), rtol=1e-2, atol=1e-2)
    assert not kv2[0].any() and not kv2[2].any()


def _query_case(M, H, P, nope, dtype, seed, C=512, g=None):
    """Caches, rows, kv_a, weight, cos / sin (angles up to 100 rad) and the q projection's output (M, H, nope + P),
    whose rope columns are the strided view the store reads; g: the generator to draw from (else one seeded by
    `seed`)."""
    g = g or torch.Generator(device="cuda").manual_seed(seed)
    kv = torch.zeros(3, 64, C, device="cuda", dtype=dtype)
    pe = torch.zeros(3, 64, P, device="cuda", dtype=dtype)
    kv_a = torch.randn(M, C + P, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(C, device="cuda", generator=g)).to(dtype)
    ang = torch.rand(M, P // 2, device="cuda", generator=g) * 100
    rows = torch.randperm(64, device="cuda", generator=g)[:M]
    q = torch.randn(M, H, nope + P, device="cuda", generator=g).to(dtype)
    return kv, pe, rows, kv_a, w, ang.cos(), ang.sin(), q


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,P,nope", [(16, 64, 128), (128, 64, 128), (1, 64, 128), (3, 6, 5)])
@pytest.mark.parametrize("M", [1, 4, 12])
def test_kernel_rotates_the_query_as_apply_rope_bit_for_bit(M, H, P, nope, dtype):
    """The query's rope part (16b: 16 heads, 671B: 128, nope 128 + rope 64; and an odd pair count) read as the view
    of q it is, rotated in the launch's extra programs: apply_rope's result bit for bit (the kernel is compiled
    without multiply-add contraction, so its fp32 products and sums round as eager torch's), the shared key too,
    and the caches as written without the query."""
    kv, pe, rows, kv_a, w, cos, sin, q = _query_case(M, H, P, nope, dtype, seed=M * H + P)
    q_pe = q[..., nope:]
    kv2, pe2, kv3, pe3 = kv.clone(), pe.clone(), kv.clone(), pe.clone()
    store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin)
    got = kernels.store_latents(kv2, pe2, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe=q_pe, backend="triton")
    assert kernels.store_latents(kv3, pe3, 1, rows, kv_a, w, 1e-6, cos, sin, backend="triton") is None
    want = apply_rope(q_pe[None], cos[None], sin[None])[0]  # (M, H, P)
    assert got.shape == (M, H, P) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want)
    assert torch.equal(pe2, pe)  # the shared key: the same rotation, bit for bit
    assert torch.equal(kv2, kv3) and torch.equal(pe2, pe3)
    assert torch.allclose(kv2.float(), kv.float(), rtol=1e-2, atol=1e-2)


def _compiled_graph(f, *args):
    """f compiled (inductor, fullgraph), run once outside the capture, then captured in a CUDA graph on args ->
    (the graph, the captured call's outputs)."""
    cf = torch.compile(f, fullgraph=True)
    cf(*args)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = cf(*args)
    return g, out


def test_query_op_compiled_and_graph_replayed():
    """kernels.store_latents with the query under torch.compile (inductor, fullgraph), captured in a CUDA graph and
    replayed on new inputs (the 16b shapes, bf16): the rotation bit for bit apply_rope's, the caches written in
    place (the cache tensors themselves, not copies)."""
    kv, pe, rows, kv_a, w, cos, sin, q = _query_case(1, 16, 64, 128, torch.bfloat16, seed=5)

    def f(q, kv_a, cos, sin):
        return kernels.store_latents(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe=(q * 1)[..., 128:],
                                     backend="triton")

    g, out = _compiled_graph(f, q, kv_a, cos, sin)
    _, _, _, kv_a2, _, cos2, sin2, q2 = _query_case(1, 16, 64, 128, torch.bfloat16, seed=6)
    q.copy_(q2), kv_a.copy_(kv_a2), cos.copy_(cos2), sin.copy_(sin2)
    kv.zero_(), pe.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, apply_rope(q2[None, ..., 128:], cos2[None], sin2[None])[0])
    kv_want, pe_want = torch.zeros_like(kv), torch.zeros_like(pe)
    store_latents_ref(kv_want, pe_want, 1, rows, kv_a2, w, 1e-6, cos2, sin2)
    assert torch.equal(pe, pe_want) and torch.allclose(kv.float(), kv_want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_the_switch_on_matches_off(compile, monkeypatch):
    # the shipped rule takes the dense / head GEMVs at one row only (backend.DENSE_GEMV_ROWS: faster than cuBLAS
    # there); the kernels hold up to 4 rows, and this test checks them at the bucket's 4
    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 4)
    from dsv3.kernels import latent_store_triton as k
    from test_gpu_expert_gemv import decode_model_and_prompts, graphed_step_logits

    m, prompts = decode_model_and_prompts()

    def step_logits(store: bool, others: bool = False):
        old = kernels.set_latent_store(store), kernels.set_dense_gemv(others), kernels.set_head_gemv(others)
        try:
            return graphed_step_logits(m, prompts, compile_decode=compile)
        finally:
            kernels.set_latent_store(old[0]), kernels.set_dense_gemv(old[1]), kernels.set_head_gemv(old[2])

    ref = step_logits(False)
    launches, launch = [], k.launch
    # (kv, pe, slot, rows, kv_a, w, eps, cos, sin[, q_pe]): the rows and the query's shape of each launch
    k.launch = lambda kv, pe, slot, rows, kv_a, *a: launches.append(
        (kv_a.shape[0], tuple(a[4].shape) if len(a) > 4 else None)) or launch(kv, pe, slot, rows, kv_a, *a)
    try:
        got = step_logits(True)
        every = step_logits(True, others=True)
    finally:
        k.launch = launch
    cfg = m.config
    # every store launch also rotated the step's query (4 rows, every head): no RoPE kernel of its own
    assert launches and set(launches) == {(4, (4, cfg.num_attention_heads, cfg.qk_rope_head_dim))} \
        and len(launches) % cfg.num_hidden_layers == 0, launches
    for y in (got, every):
        assert ((y - ref).norm() / ref.norm()).item() < 2e-2
        assert (y.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3
