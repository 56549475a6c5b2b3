"""The shared experts on a second CUDA stream (dsv3/kernels/side_stream.py, MoE.forward, layers.mlp_side). On the
CPU there is one stream and the side chain runs inline, so these check the plumbing against the plain path: the
tensor form of the MLP is its forward bit for bit, a MoE layer with the side path forced gives the same bits eagerly
and compiled in one graph (the custom ops trace without a break), the rule, and where the path steps aside.
tests/test_gpu_side_stream.py runs it on real streams and in CUDA graphs.

Run: python -m pytest tests/test_side_stream.py -q
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.model import moe as moe_mod
from dsv3.model.fp8 import FP8Linear
from dsv3.model.layers import MLP, Linear, swiglu_mlp
from dsv3.model.moe import MoE
from conftest import tiny_cfg


def _mlp(fp8: bool, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    m = MLP(256, 384)
    for lin in (m.gate_proj, m.up_proj, m.down_proj):
        torch.nn.init.normal_(lin.weight, std=0.05)
    if fp8:
        m.gate_proj, m.up_proj, m.down_proj = (FP8Linear.from_linear(lin) for lin in
                                               (m.gate_proj, m.up_proj, m.down_proj))
    return m.eval()


@pytest.mark.parametrize("fp8", [False, True])
def test_swiglu_mlp_is_the_mlp_forward(fp8):
    """The tensor form (what the side stream runs) against the module's forward: the same bits, 16-bit and FP8."""
    m = _mlp(fp8)
    x = torch.randn(3, 2, 256)
    ws = m.weight_tensors()
    assert ws is not None and (ws[1] is not None) == fp8 and (ws[5] is not None) == fp8
    with torch.no_grad():
        assert torch.equal(swiglu_mlp(x, *ws), m(x))


def test_weight_tensors_steps_aside_for_hooks_bias_and_wrappers():
    """None (the modules' own forwards run) where the tensor form would skip a hook, drop a bias or bypass a wrapper."""
    m = _mlp(False)
    assert m.weight_tensors() is not None
    h = m.down_proj.register_forward_hook(lambda *a: None)
    assert m.weight_tensors() is None
    h.remove()
    h = m.register_forward_pre_hook(lambda *a: None)
    assert m.weight_tensors() is None
    h.remove()
    m.up_proj = Linear(256, 384, bias=True)
    assert m.weight_tensors() is None
    m.up_proj = torch.nn.Linear(256, 384, bias=False)  # not dsv3's Linear: its forward is not `layers.linear`
    assert m.weight_tensors() is None


def _moe(fp8: bool) -> MoE:
    cfg = tiny_cfg(hidden_size=256, moe_intermediate_size=128, n_shared_experts=2)
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if fp8:
        sh = layer.shared_experts
        sh.gate_proj, sh.up_proj, sh.down_proj = (FP8Linear.from_linear(lin) for lin in
                                                  (sh.gate_proj, sh.up_proj, sh.down_proj))
    return layer.eval()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_moe_with_the_side_path_forced_gives_the_same_bits(fp8, compiled, monkeypatch):
    """MoE.forward with the shared experts through mlp_side + side_stream.join (forced: on the CPU they run inline)
    against the plain path, eagerly and under torch.compile with fullgraph=True (aot_eager: the custom ops' fake
    forms and functionalisation, without a C++ compile); the side path ran."""
    layer = _moe(fp8)
    if compiled:  # the CPU's routed experts (the loop: data-dependent shapes) do not trace in one graph; a stand-in
        layer.experts.forward = lambda x_ND, idx_NK, w_NK, impl: x_ND * w_NK.sum(-1, keepdim=True)
    x = torch.randn(2, 3, 256)
    calls = []
    real = moe_mod.mlp_side
    monkeypatch.setattr(moe_mod, "mlp_side", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ref, _ = layer(x)
        assert not calls  # the rule: not on the CPU
        fn = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
        with kernels.use_backend(side_stream="stream"):
            got, _ = fn(x)
    assert calls
    assert torch.equal(got, ref)


def test_no_side_path_with_an_expert_parallel_dispatcher(monkeypatch):
    """An expert-parallel dispatcher keeps the plain order (its collectives are not on the side stream)."""
    layer = _moe(False)
    layer.dispatcher = lambda experts, x_ND, idx, w, impl: experts(x_ND, idx, w, impl)
    monkeypatch.setattr(moe_mod, "mlp_side", lambda *a: pytest.fail("side path taken under a dispatcher"))
    with torch.no_grad(), kernels.use_backend(side_stream="stream"):
        layer(torch.randn(1, 2, 256))


def test_the_rule_on_a_pretend_gpu(monkeypatch):
    """select_backend("side_stream", x): off unless switched on; then 16-bit decode-sized x without autograd."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kb, "_probes", {"triton": True, "scaled_mm": True, ("capability", 0): (9, 0)})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    x = torch.randn(4, 1, 64, dtype=torch.bfloat16)
    assert kernels.select_backend("side_stream", x) == "reference"  # off by default
    old = kernels.set_side_stream(True)
    try:
        assert old is False
        assert kernels.select_backend("side_stream", x) == "stream"
        assert kernels.select_backend("side_stream", x.float()) == "reference"
        big = torch.randn(kb.SIDE_STREAM_ROWS + 1, 64, dtype=torch.bfloat16)
        assert kernels.select_backend("side_stream", big) == "reference"  # a prefill
        assert kernels.select_backend("side_stream", x.clone().requires_grad_()) == "reference"  # training
    finally:
        kernels.set_side_stream(old)
