"""The shared experts inside the routed experts' decode GEMV launches (kernels.set_shared_gemv; MoE.shared_stacks,
Experts.forward_gemv(shared=...), the expert GEMV's second stack).

CPU (always): the second stack's reference is the stacks as one; the shared experts as views of their matrices give
the shared MLP's output (bf16-free fp32 and FP8 weights); where the views cannot stand in for the modules they are
refused; the argument contract; the rule. Triton interpreter (TRITON_INTERPRET=1): the kernel with a strided second
stack against the reference, and a MoE layer with the path forced against the plain one, eagerly and compiled in one
graph. GPU: tests/test_gpu_expert_gemv.py (a graphed decode step with it on against off).

Run: python -m pytest tests/test_shared_gemv.py -q
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import check_second_stack, expert_gemv_ref, weight_quant
from dsv3.model.fp8 import FP8Experts, FP8Linear
from dsv3.model.layers import Linear
from dsv3.model.moe import MoE
from tests.conftest import tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _moe(fp8: bool, inter: int = 128, n_shared: int = 2, seed: int = 0, *, hidden: int = 256,
         n_experts: int = 8) -> MoE:
    """A MoE layer (tiny_cfg's routing) with n_shared shared experts; fp8: FP8 routed and shared weights."""
    cfg = tiny_cfg(hidden_size=hidden, moe_intermediate_size=inter, n_shared_experts=n_shared,
                   n_routed_experts=n_experts)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if fp8:
        layer.experts = FP8Experts.from_experts(layer.experts)
        sh = layer.shared_experts
        sh.gate_proj, sh.up_proj, sh.down_proj = (FP8Linear.from_linear(m) for m in
                                                  (sh.gate_proj, sh.up_proj, sh.down_proj))
    return layer.eval()


def _route(layer, x):
    w, idx, _ = layer.gate(x)
    return idx, w


@pytest.mark.parametrize("fp8", [False, True])
def test_shared_stacks_give_the_shared_mlp(fp8):
    """Routed + shared through one pair of GEMV calls (the reference backend on the CPU) equals the routed experts'
    loop plus the shared MLP."""
    layer = _moe(fp8)
    x = torch.randn(3, 256)
    idx, w = _route(layer, x)
    stacks = layer.shared_stacks()
    assert stacks is not None and stacks[0].shape == (2, 128, 256) and stacks[4].shape == (2, 256, 128)
    assert stacks[4].data_ptr() == layer.shared_experts.down_proj.weight.data_ptr()  # views: no copy
    with torch.no_grad():
        got = layer.experts.forward_gemv(x, idx, w, shared=stacks)
        want = layer.experts.forward_loop(x, idx, w) + layer.shared_experts(x)
    assert _rel(got, want) < 1e-5, _rel(got, want)


def test_shared_stacks_refused_where_views_cannot_stand_in():
    layer = _moe(False)
    h = layer.shared_experts.down_proj.register_forward_hook(lambda *a: None)
    assert layer.shared_stacks() is None  # the hook would not fire
    h.remove()
    assert layer.shared_stacks() is not None
    layer.shared_experts.up_proj = Linear(256, 256, bias=True)
    assert layer.shared_stacks() is None  # a bias
    layer = _moe(False)
    layer.shared_experts.gate_proj = torch.nn.Linear(256, 256, bias=False)  # not dsv3's Linear
    assert layer.shared_stacks() is None
    assert _moe(True, inter=64).shared_stacks() is None  # FP8 blocks straddling two shared experts
    mixed = _moe(False)
    mixed.experts = FP8Experts.from_experts(mixed.experts)  # FP8 routed, 16-bit shared
    assert mixed.shared_stacks() is None


def test_second_stack_contract():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 64, generator=g)
    x = torch.randn(2, 64, generator=g)
    expert = torch.tensor([0, 3, 4, -1])
    w2 = torch.randn(40, 2 * 64, generator=g).view(40, 2, 64).transpose(0, 1)  # strided as shared down's view
    got = kernels.expert_gemv(x, w, None, expert, 2, extra=(w2, None, None, None))
    assert torch.equal(got, expert_gemv_ref(x, torch.cat([w, w2]), None, expert, 2))
    with pytest.raises(ValueError, match="second expert stack"):
        check_second_stack(w, None, None, (w2[:, :, :32], None, None, None))  # another K
    with pytest.raises(ValueError, match="second expert stack"):
        check_second_stack(w, None, None, (w2.half(), None, None, None))  # another dtype
    with pytest.raises(ValueError, match="scales and up"):
        check_second_stack(w, None, None, (w2, torch.ones(2, 1, 1), None, None))
    with pytest.raises(ValueError, match="contiguous"):
        check_second_stack(w, None, None, (torch.randn(2, 64, 40).transpose(1, 2), None, None, None))


def test_the_rule_on_a_pretend_gpu(monkeypatch):
    """On by default for e4m3 expert weights only (backend.WEIGHTS_E4M3: the caller passes the routed gate weight);
    switched on, every weight dtype; decode-sized 16-bit x without autograd."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kb, "_probes", {"triton": True, "scaled_mm": True, ("capability", 0): (9, 0)})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    w16, w8 = torch.randn(4, 32, 64, dtype=torch.bfloat16), torch.zeros(4, 32, 64, dtype=torch.float8_e4m3fn)
    assert kb.SWITCHED["shared_gemv"] == kb.WEIGHTS_E4M3
    assert kernels.select_backend("shared_gemv", x, w16) == "reference"
    assert kernels.select_backend("shared_gemv", x) == "reference"  # no weight named: not e4m3
    assert kernels.select_backend("shared_gemv", x, w8) == "triton"
    assert kernels.set_shared_gemv(False) == kb.WEIGHTS_E4M3
    assert kernels.select_backend("shared_gemv", x, w8) == "reference"
    old = kernels.set_shared_gemv(True)
    try:
        assert kernels.select_backend("shared_gemv", x, w16) == "triton"
        assert kernels.select_backend("shared_gemv", x.float()) == "reference"
        assert kernels.select_backend("shared_gemv", x.clone().requires_grad_()) == "reference"
    finally:
        kernels.set_shared_gemv(kb.WEIGHTS_E4M3)


def _quant_stack(w):
    qs = [weight_quant(w_e) for w_e in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


@interp
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_interp_kernel_with_a_strided_second_stack(fp8, fused):
    """The launch with a second stack laid out as MoE.shared_stacks lays out down (S, N, K) views of an (N, S*K)
    matrix) against the reference on the stacks as one; rows of both stacks and a foreign row."""
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator().manual_seed(3)
    E, S, N, K = 3, 2, 200, 256
    w, u = torch.randn(E, N, K, generator=g), torch.randn(E, N, K, generator=g)
    big_w, big_u = torch.randn(N, S * K, generator=g), torch.randn(N, S * K, generator=g)
    s = us = s2 = us2 = None
    if fp8:
        (w, s), (u, us) = _quant_stack(w), _quant_stack(u)
        (bw, bs), (bu, bus) = weight_quant(big_w), weight_quant(big_u)
        w2, s2 = bw.view(N, S, K).transpose(0, 1), bs.view(bs.shape[0], S, K // 128).transpose(0, 1)
        u2, us2 = bu.view(N, S, K).transpose(0, 1), bus.view(bus.shape[0], S, K // 128).transpose(0, 1)
    else:
        w, u = w.half(), u.half()  # (the interpreter has no bf16)
        w2, u2 = big_w.half().view(N, S, K).transpose(0, 1), big_u.half().view(N, S, K).transpose(0, 1)
    x = torch.randn(2, K, generator=g).half()
    expert = torch.tensor([2, 3, 4, 0, -1, 4])
    up = (u, us) if fused else (None, None)
    extra = (w2, s2, u2 if fused else None, us2 if fused else None)
    got = k.launch(x, w, s, expert, 3, *up, extra=extra)
    cat = [None if a is None else torch.cat([a, b.contiguous()]) for a, b in zip((w, s, *up), extra)]
    want = expert_gemv_ref(x, cat[0], cat[1], expert, 3, cat[2], cat[3])
    assert torch.equal(got[4], torch.zeros(N, dtype=got.dtype))
    assert _rel(got, want) < 2e-3, _rel(got, want)


def test_expert_ids_and_the_reference_with_routed_rows():
    """kernels.expert_ids lays out each token's routed ids then the second stack's; the reference backend with
    routed=K equals it given those ids; bad arguments are refused."""
    idx = torch.tensor([[5, 1], [0, 7], [3, -1]])
    assert kernels.expert_ids(idx.reshape(-1), 2, 8, 3).tolist() == [5, 1, 8, 9, 10, 0, 7, 8, 9, 10, 3, -1, 8, 9, 10]
    g = torch.Generator().manual_seed(1)
    w, w2 = torch.randn(8, 16, 32, generator=g), torch.randn(3, 16, 32, generator=g)
    x = torch.randn(3, 32, generator=g)
    ids = kernels.expert_ids(idx.reshape(-1), 2, 8, 3)
    want = kernels.expert_gemv(x, w, None, ids, 5, extra=(w2, None, None, None), backend="reference")
    got = kernels.expert_gemv(x, w, None, idx.reshape(-1), 5, extra=(w2, None, None, None), routed=2,
                              backend="reference")
    assert got.shape == (15, 16) and torch.equal(got, want)
    with pytest.raises(ValueError, match="routed=2 needs a second stack"):
        kernels.expert_gemv(x, w, None, idx.reshape(-1), 5, routed=2, backend="reference")
    with pytest.raises(ValueError, match="ids a token"):
        kernels.expert_gemv(x, w, None, idx.reshape(-1)[:5], 5, extra=(w2, None, None, None), routed=2,
                            backend="reference")


@interp
@pytest.mark.parametrize("fp8", [False, True])
def test_interp_routed_rows_equal_the_concatenated_ids(fp8):
    """The launches with routed=K (the second stack's rows derived in the kernel from the row number) equal, bit for
    bit, the same launches given the concatenated ids: gate+up (x_div = K + S) and down (x_div 1), a foreign row,
    through the custom ops the model calls (kernels.expert_gemv)."""
    g = torch.Generator().manual_seed(5)
    E, S, N, K, R = 4, 2, 256, 256, 2
    w, u = torch.randn(E, N, K, generator=g), torch.randn(E, N, K, generator=g)
    w2, u2 = torch.randn(S, N, K, generator=g), torch.randn(S, N, K, generator=g)
    if fp8:
        (w, s), (u, us), (w2, s2), (u2, us2) = (_quant_stack(t) for t in (w, u, w2, u2))
    else:
        w, u, w2, u2 = (t.half() for t in (w, u, w2, u2))
        s = us = s2 = us2 = None
    x = torch.randn(3, K, generator=g).half()
    idx = torch.tensor([[2, 0], [3, -1], [1, 2]])
    ids = kernels.expert_ids(idx.reshape(-1), R, E, S)
    with kernels.use_backend(expert_gemv="triton"):
        h = kernels.expert_gemv(x, w, s, idx.reshape(-1), R + S, u, us, extra=(w2, s2, u2, us2), routed=R)
        h_cat = kernels.expert_gemv(x, w, s, ids, R + S, u, us, extra=(w2, s2, u2, us2))
        assert h.shape == (3 * (R + S), N) and torch.equal(h, h_cat)
        assert torch.equal(h[R + S + 1], torch.zeros(N, dtype=h.dtype))  # token 1's foreign row
        y = kernels.expert_gemv(h, w, s, idx.reshape(-1), 1, extra=(w2, s2, None, None), routed=R)
        y_cat = kernels.expert_gemv(h, w, s, ids, 1, extra=(w2, s2, None, None))
        assert torch.equal(y, y_cat)
    cat = [None if a is None else torch.cat([a, b]) for a, b in zip((w, s, u, us), (w2, s2, u2, us2))]
    want = expert_gemv_ref(x, cat[0], cat[1], ids, R + S, cat[2], cat[3])
    assert _rel(h, want) < 2e-3, _rel(h, want)


@interp
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_interp_moe_with_the_shared_experts_in_the_gemv(fp8, compiled, monkeypatch):
    """A MoE layer (fp16: the interpreter lacks bf16) with the path forced, eagerly and compiled in one graph
    (aot_eager), against the shared MLP run as modules beside the routed GEMV; the two launches took the second
    stack."""
    from dsv3.kernels import expert_gemv_triton as k

    layer = _moe(fp8).half()
    x = torch.randn(1, 1, 256).half()
    calls = []
    real = k.launch
    monkeypatch.setattr(k, "launch", lambda *a, **kw: calls.append(kw.get("extra") is not None) or real(*a, **kw))
    monkeypatch.setattr(layer.experts, "_gemv_fits", lambda x_ND, idx: True)  # (its backend rule wants a GPU)
    monkeypatch.setattr(layer.experts, "_impl", lambda x_ND, impl: "grouped")
    with torch.no_grad(), kernels.use_backend(expert_gemv="triton", swiglu_gemv="reference"):
        ref, _ = layer(x)  # the shared MLP as modules
        assert calls == [False, False]
        fn = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
        with kernels.use_backend(shared_gemv="triton"):
            got, _ = fn(x)
    assert calls[2:] == [True, True]
    assert _rel(got, ref) < 5e-3, _rel(got, ref)
