"""The dense SwiGLU decode GEMV (`kernels.swiglu_gemv`: the expert GEMV's fused gate+up launch over one matrix
pair, dsv3/kernels/expert_gemv_triton.py) and the MLP (shared experts, dense FFN) taking it.

    python -m pytest -q tests/test_swiglu_gemv.py                      (CPU, CI: no triton needed)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_swiglu_gemv.py   (+ the kernel, interpreted)

CPU: the reference is silu(x·gateᵀ) * (x·upᵀ) in fp32 rounded once, for 16-bit and FP8 (block-scaled) weights;
the rule and the switch (it follows the dense GEMV's); the MLP asks for it with its weights (and an FP8Linear's
scales) only where the seam picks it. Triton interpreter: the kernel against the reference (fp16 and e4m3
weights, ragged N and K, 1-4 rows); the custom op compiled; an fp16 MLP forward through it. GPU:
tests/test_gpu_dense_gemv.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import weight_dequant, weight_quant
from dsv3.model.fp8 import FP8Linear
from dsv3.model.layers import MLP
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)

BF16 = torch.bfloat16


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _weights(N=200, K=136, seed=0, fp8=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(N, K, generator=g) * 0.1, torch.randn(N, K, generator=g) * 0.1
    if fp8:
        (gate, gs), (up, us) = weight_quant(gate), weight_quant(up)
        return gate, gs, up, us
    return gate.to(dtype), None, up.to(dtype), None


def _want(x, gate, gs, up, us):
    def dense(w, s):
        return weight_dequant(w, s, torch.float32) if s is not None else w.float()

    xf = x.float()
    return (F.silu(xf @ dense(gate, gs).T) * (xf @ dense(up, us).T)).to(x.dtype)


@pytest.mark.parametrize("fp8", [False, True])
def test_reference_is_the_fp32_swiglu_rounded_once(fp8):
    gate, gs, up, us = _weights(fp8=fp8, dtype=BF16)
    x = torch.randn(2, 3, 136, generator=torch.Generator().manual_seed(1)).to(BF16)
    got = kernels.swiglu_gemv(x, gate, gs, up, us)  # the CPU: the reference
    assert got.shape == (2, 3, 200) and got.dtype == BF16
    # the fp32 sums in another order (bmm against mm): the one bf16 rounding may land one step apart
    assert torch.allclose(got.float(), _want(x, gate, gs, up, us).float(), rtol=2 ** -7, atol=1e-6)
    with pytest.raises((TypeError, ValueError)):
        kernels.swiglu_gemv(x, gate, gs, up[:, :100], us)


def test_rule_and_switch(monkeypatch):
    fits = kb._swiglu_gemv_fits
    gate, _, up, _ = _weights(dtype=BF16)
    g8, _, u8, _ = _weights(fp8=True)
    x = torch.randn(1, 1, 136, dtype=BF16)
    assert fits(x, gate, up) and fits(x, g8, u8)
    assert not fits(torch.randn(2, 136, dtype=BF16), gate, up)  # above DENSE_GEMV_ROWS: the two projections
    assert not fits(x, gate, u8) and not fits(x, gate.half(), up.half()) and not fits(x.float(), gate.float(),
                                                                                     up.float())
    assert not fits(x, gate, up[:100])
    assert not fits(x, torch.randn(136, 200, dtype=BF16).T, up)  # not contiguous
    p = torch.nn.Parameter(gate.clone())
    assert not fits(x, p, up) and not fits(x.clone().requires_grad_(), gate, up)
    with torch.no_grad():
        assert fits(x, p, up)
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: True)  # the rule holds (as on a GPU)
    assert kernels.select_backend("swiglu_gemv", x, gate, up) == "triton"  # the dense GEMV's switch: on by default
    assert kernels.select_backend("swiglu_gemv", x, g8, u8) == "triton"  # e4m3 weights too (measured, backend.py)
    old = kernels.set_dense_gemv(False)
    try:
        assert kernels.select_backend("swiglu_gemv", x, gate, up) == "reference"
        assert kernels.select_backend("swiglu_gemv", x, g8, u8) == "reference"
        kernels.set_dense_gemv(kb.WEIGHTS_16BIT)  # 16-bit weights only
        assert kernels.select_backend("swiglu_gemv", x, gate, up) == "triton"
        assert kernels.select_backend("swiglu_gemv", x, g8, u8) == "reference"
    finally:
        kernels.set_dense_gemv(old)


@pytest.mark.parametrize("fp8", [False, True])
def test_mlp_takes_it_only_where_the_seam_picks_it(monkeypatch, fp8):
    calls = []
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op == "swiglu_gemv" and kb._swiglu_gemv_fits(*t))

    def fake(x, gate, gs, up, us, *, backend=None):
        calls.append((gate, gs, up, us))
        return _want(x, gate, gs, up, us) + 1  # a marker

    monkeypatch.setattr(kernels, "swiglu_gemv", fake)
    torch.manual_seed(0)
    mlp = MLP(64, 96)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    mlp.to(BF16)
    if fp8:
        mlp.gate_proj, mlp.up_proj = FP8Linear.from_linear(mlp.gate_proj), FP8Linear.from_linear(mlp.up_proj)
    x = torch.randn(1, 1, 64, dtype=BF16)
    old = kernels.set_dense_gemv(True)
    try:
        with torch.no_grad():
            got = mlp(x)
            assert len(calls) == 1
            gate, gs, up, us = calls[0]
            assert gate is mlp.gate_proj.weight and up is mlp.up_proj.weight
            assert (gs is mlp.gate_proj.weight_scale_inv and us is mlp.up_proj.weight_scale_inv) if fp8 else \
                gs is None and us is None
            mlp(torch.randn(5, 64, dtype=BF16))  # prefill-sized: the two projections
            kernels.set_dense_gemv(False)
            want = mlp(x)
        assert len(calls) == 1
        assert torch.equal(got, mlp.down_proj(_want(x, gate, gs, up, us) + 1))
        assert not torch.equal(got, want)
        kernels.set_dense_gemv(True)
        if not fp8:
            mlp(x)  # trainable weights with grad enabled: the projections
            assert len(calls) == 1
    finally:
        kernels.set_dense_gemv(old)


@interp
@pytest.mark.parametrize("fp8", [False, True])
def test_interp_kernel_vs_reference(fp8):
    for N, K, seed in ((200, 136, 0), (70, 300, 1), (8, 128, 2)):
        gate, gs, up, us = _weights(N, K, seed, fp8=fp8, dtype=torch.float16)
        for M in (1, 2, 3, 4):
            x = torch.randn(M, K).half()
            got = kernels.swiglu_gemv(x, gate, gs, up, us, backend="triton")
            assert got.shape == (M, N) and got.dtype == torch.float16
            assert _rel(got, _want(x, gate, gs, up, us)) < 2e-3, (fp8, N, K, M)


@interp
def test_interp_op_compiles_and_an_mlp_through_it():
    from dsv3.kernels.expert_gemv_triton import swiglu_gemv_op

    gate, gs, up, us = _weights(dtype=torch.float16)
    x = torch.randn(2, 1, 136).half()
    assert isinstance(swiglu_gemv_op, torch._library.custom_ops.CustomOpDef)
    f = lambda t: kernels.swiglu_gemv(t, gate, gs, up, us, backend="triton")  # noqa: E731
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert got.shape == (2, 1, 200) and _rel(got, _want(x, gate, gs, up, us)) < 2e-3
    torch.manual_seed(1)
    mlp = MLP(136, 200)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    mlp.half().requires_grad_(False)
    want = mlp(x)
    with kernels.use_backend(swiglu_gemv="triton"):
        assert _rel(mlp(x), want) < 3e-3
