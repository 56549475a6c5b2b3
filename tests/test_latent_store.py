"""The decode step's fused latent store (dsv3/kernels/latent_store_triton.py, `kernels.store_latents`): RMSNorm +
RoPE + the paged cache write from the raw kv_a projection, and MLA / the static decode views taking it.

    python -m pytest -q tests/test_latent_store.py                      (CPU, CI: no triton needed)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_latent_store.py   (+ the kernel, interpreted)

CPU: the reference is the model's own RMSNorm and apply_rope followed by the cache write (bit for bit); the
argument contract; the switch is on by default; MLA asks for the fused store only where the cache view offers it
(the static decode steps) and the seam picks it, and the decode step's logits are the same either way. Triton
interpreter: the kernel against the reference (fp16 and fp32, ragged C and P, rows in any order, another layer
slot left untouched); the custom op under torch.compile; the engine's static decode step through it. GPU:
tests/test_gpu_latent_store.py.
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import store_latents_ref
from dsv3.model.layers import RMSNorm
from dsv3.model.rope import apply_rope
from tests.conftest import decode_step, make_model, tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)


def _case(M=3, C=40, P=8, slots=2, R=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.zeros(slots, R, C, dtype=dtype)
    pe = torch.zeros(slots, R, P, dtype=dtype)
    kv_a = torch.randn(M, C + P, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype)
    ang = torch.rand(M, P // 2, generator=g) * 6
    rows = torch.randperm(R, generator=g)[:M]
    return kv, pe, rows, kv_a, w, ang.cos(), ang.sin()


def test_reference_is_the_models_norm_and_rope_then_the_write():
    for dtype in (torch.float32, torch.bfloat16):
        kv, pe, rows, kv_a, w, cos, sin = _case(dtype=dtype)
        norm = RMSNorm(40, 1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
        store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin)
        c_want = norm(kv_a[:, :40])
        p_want = apply_rope(kv_a[None, :, None, 40:], cos[None], sin[None])[0, :, 0]
        assert torch.equal(kv[1][rows], c_want) and torch.equal(pe[1][rows], p_want)
        others = torch.ones(12, dtype=torch.bool)
        others[rows] = False
        assert not kv[0].any() and not pe[0].any() and not kv[1][others].any()  # nothing else written


def test_contract():
    kv, pe, rows, kv_a, w, cos, sin = _case()
    with pytest.raises(ValueError, match="slot 2 outside"):
        kernels.store_latents(kv, pe, 2, rows, kv_a, w, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="kv_a"):
        kernels.store_latents(kv, pe, 0, rows, kv_a[:, :-1], w, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="cos / sin"):
        kernels.store_latents(kv, pe, 0, rows, kv_a, w, 1e-6, cos.double(), sin)
    with pytest.raises(ValueError, match="rows"):
        kernels.store_latents(kv, pe, 0, rows.float(), kv_a, w, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="P even"):
        kernels.store_latents(kv, pe[..., :7], 0, rows, kv_a[:, :47], w, 1e-6, cos, sin)


def test_switch_on_by_default_and_the_rule(monkeypatch):
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    assert kb.SWITCHED["latent_store"] is True  # 1.05x at batch 1 on the H200 (backend.py SWITCHED)
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: True)
    assert kernels.select_backend("latent_store", x) == "triton"
    old = kernels.set_latent_store(False)
    try:
        assert kernels.select_backend("latent_store", x) == "reference"
    finally:
        kernels.set_latent_store(old)
    monkeypatch.undo()
    monkeypatch.setattr(kb, "available", lambda op, device="cuda": True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    w = torch.ones(48, dtype=torch.bfloat16)
    assert kb._fast_fits("latent_store", (x, w)) and kb._fast_fits("latent_store", (x.half(), w.half()))
    assert not kb._fast_fits("latent_store", (x.float(), w.float()))
    assert not kb._fast_fits("latent_store", (x.half(), w))  # RMSNorm's output would be promote(w, kv_a)
    assert not kb._fast_fits("latent_store", (x.clone().requires_grad_(), w))
    assert not kb._fast_fits("latent_store", (x, torch.nn.Parameter(w)))  # a trainable norm weight
    with torch.no_grad():
        assert kb._fast_fits("latent_store", (x, torch.nn.Parameter(w)))
    assert not kb._fast_fits("latent_store", (torch.randn(2, 96, dtype=torch.bfloat16)[:, ::2], w))


def _engine_step_logits(model):
    """The engine's static decode step (bucketed, eager on the CPU: what a CUDA graph records), teacher-forced ->
    (its logits, the cache)."""
    logits, eng = decode_step(model)
    return logits, eng.cache


def test_mla_takes_the_fused_store_only_where_the_view_offers_it(monkeypatch):
    """The static decode views attend with the paged-cache kernel on a GPU (`fused_decode`); here its reference
    stands in (the seam told it runs). With the seam also picking the fused store (its reference backend): the
    decode step stores through `store_kv_a` (one call a layer with the raw kv_a), the prefill does not; the decode
    step's logits and the cache it wrote are the same bit for bit as with the store switched off."""
    from dsv3.inference.graphs import _StaticLayerView
    from dsv3.kernels.reference import mla_decode_ref

    real, fused_store = kb.select, []

    def select(op, *t, backend=None):
        if backend is None and op == "mla_decode" or (op == "latent_store" and backend is None and fused_store):
            return "triton"
        return real(op, *t, backend=backend)

    monkeypatch.setattr(kb, "select", select)
    monkeypatch.setattr(kernels, "select_backend", select)
    monkeypatch.setattr(kernels, "mla_decode", lambda *a, backend=None: mla_decode_ref(*a))
    ref_store = kernels.store_latents
    monkeypatch.setattr(kernels, "store_latents", lambda *a, **k: ref_store(*a, backend="reference"))
    model = make_model(tiny_cfg(num_nextn_predict_layers=0))
    want, cache_want = _engine_step_logits(model)
    calls, orig = [], _StaticLayerView.store_kv_a
    monkeypatch.setattr(_StaticLayerView, "store_kv_a", lambda self, kv_a, *a: calls.append(tuple(kv_a.shape))
                        or orig(self, kv_a, *a))
    fused_store.append(True)
    got, cache_got = _engine_step_logits(model)
    C = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    assert calls == [(2, 1, C)] * model.config.num_hidden_layers  # the decode step only, once a layer
    assert torch.equal(got, want)
    assert torch.equal(cache_got.kv, cache_want.kv) and torch.equal(cache_got.pe, cache_want.pe)


@interp
def test_interp_kernel_vs_reference():
    from dsv3.kernels import latent_store_triton as k

    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-6)):
        for C, P, M in ((40, 8, 3), (512, 64, 2), (100, 6, 1)):
            kv, pe, rows, kv_a, w, cos, sin = _case(M=M, C=C, P=P, dtype=dtype, seed=C)
            kv2, pe2 = kv.clone(), pe.clone()
            kv[0].fill_(7), kv2[0].fill_(7)  # another layer slot: untouched
            store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin)
            k.launch(kv2, pe2, 1, rows, kv_a, w, 1e-6, cos, sin)
            assert (kv2[0] == 7).all()
            assert torch.allclose(kv2.float(), kv.float(), atol=tol, rtol=tol), (dtype, C, P)
            assert torch.allclose(pe2.float(), pe.float(), atol=tol, rtol=tol), (dtype, C, P)
    kv, pe, rows, kv_a, w, cos, sin = _case(M=0)
    k.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin)  # nothing to write
    assert not kv.any()
    # rows strided (a view): the rows it names, not its storage's
    kv, pe, _, kv_a, w, cos, sin = _case(M=3, dtype=torch.float16)
    rows = torch.tensor([0, 5, 1, 6, 2, 7])[::2]
    kv2, pe2 = kv.clone(), pe.clone()
    store_latents_ref(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin)
    k.launch(kv2, pe2, 0, rows, kv_a, w, 1e-6, cos, sin)
    assert torch.allclose(kv2.float(), kv.float(), atol=2e-3) and torch.allclose(pe2.float(), pe.float(), atol=2e-3)
    with pytest.raises(TypeError, match="norm weight alike"):  # RMSNorm's output dtype would be promote(w, kv_a)
        k.launch(kv2, pe2, 0, rows, kv_a, w.float(), 1e-6, cos, sin)


@interp
def test_interp_op_compiles_in_place():
    kv, pe, rows, kv_a, w, cos, sin = _case(dtype=torch.float16)
    kv_want, pe_want = kv.clone(), pe.clone()
    store_latents_ref(kv_want, pe_want, 1, rows, kv_a, w, 1e-6, cos, sin)

    def f(kv, pe, kv_a):
        kernels.store_latents(kv, pe, 1, rows, kv_a * 1, w, 1e-6, cos, sin, backend="triton")
        return kv.sum()

    torch.compile(f, backend="aot_eager", fullgraph=True)(kv, pe, kv_a)
    assert torch.allclose(kv.float(), kv_want.float(), atol=2e-3) and torch.allclose(pe.float(), pe_want.float(),
                                                                                      atol=2e-3)


@interp
def test_interp_engine_decode_step_through_the_kernel(monkeypatch):
    """The static decode step with every layer's latents stored by the interpreted kernel (forced) gives the same
    next-token logits, and the kernel ran once a layer for the step's 2 rows."""
    from dsv3.kernels import latent_store_triton as k

    model = make_model(tiny_cfg(num_nextn_predict_layers=0))
    with kernels.use_backend(mla_decode="triton"):  # the views that store this way: the paged-cache attention's
        want, cache_want = _engine_step_logits(model)
    seen, launch = [], k.launch
    monkeypatch.setattr(k, "launch", lambda kv, pe, slot, rows, kv_a, *a: seen.append(kv_a.shape[0])
                        or launch(kv, pe, slot, rows, kv_a, *a))
    with kernels.use_backend(mla_decode="triton", latent_store="triton"):
        got, cache_got = _engine_step_logits(model)
    assert seen == [2] * model.config.num_hidden_layers
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(cache_got.kv, cache_want.kv, atol=1e-6) and torch.allclose(cache_got.pe, cache_want.pe,
                                                                                      atol=1e-6)
