"""The shared experts inside the expert GEMV, beyond tests/test_shared_gemv.py: the sm_90 compile of the two-stack
kernel where strides are 1 (Triton turns such ints into constants; the interpreter never does), odd shapes, and the
shared experts' gradients.

    python -m pytest -q tests/test_shared_gemv_compile.py                     (CPU: the compile check, the rule)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_shared_gemv_compile.py  (+ the kernel, interpreted)
"""

from __future__ import annotations

import os

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels.reference import expert_gemv_ref, weight_quant
from dsv3.model.moe import MoE
from tests.test_shared_gemv import _moe as _layer
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _moe(fp8: bool, hidden: int, inter: int, n_shared: int, n_experts: int = 8, seed: int = 0) -> MoE:
    return _layer(fp8, inter, n_shared, seed, hidden=hidden, n_experts=n_experts)


# --- the sm_90 compile of the launches MoE.forward makes (no GPU: Triton's front end and back end on the CPU) ----

_TT = {torch.float8_e4m3fn: "fp8e4nv", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
       torch.int64: "i64", torch.int32: "i32"}


def _compile_launch_for_sm90(monkeypatch, *args, **kw):
    """Run expert_gemv_triton.launch with a recording kernel, then compile what it would launch for sm_90 the way
    Triton's launcher specialises it (an int argument equal to 1 becomes a constexpr; pointers, and ints divisible
    by 16, carry that divisibility: without it no load is vectorised or pipelined), at the launch's warps."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv3.kernels import expert_gemv_triton as k

    seen = {}

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **kw_: seen.update(args=a, kw=kw_)

    real = k._gemv_kernel
    with monkeypatch.context() as mp:
        mp.setattr(k, "_gemv_kernel", Rec())
        k.launch(*args, **kw)
    names = real.arg_names
    launch_opts = ("num_warps", "num_stages", "launch_pdl")
    bound = dict(zip(names, seen["args"]))
    bound.update({n: v for n, v in seen["kw"].items() if n not in launch_opts})
    signature, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(names):
        v = bound[n]
        if isinstance(v, torch.Tensor):
            signature[n] = "*" + _TT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif real.params[i].is_constexpr:
            signature[n] = "constexpr"
            constexprs[(i,)] = v
        elif v == 1:  # Triton's specialisation of 1
            signature[n] = "constexpr"
            constexprs[(i,)] = 1
        else:
            signature[n] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {o: seen["kw"][o] for o in ("num_warps", "num_stages") if o in seen["kw"]}
    try:
        triton.compile(ASTSource(real, signature, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    except RuntimeError as e:  # no ptxas etc.: only the front end's verdict matters here
        if "ptxas" not in str(e).lower():
            raise


@pytest.mark.parametrize("D,I,S", [(256, 128, 1), (128, 256, 2), (2048, 1408, 2)])
def test_two_stack_fp8_launches_compile_for_sm90(monkeypatch, D, I, S):
    """An FP8 MoE layer's two launches with the shared stack (as tests/test_gpu_expert_gemv.py's micro model: D 256,
    I 128, one shared expert; D 128; the 16b) compile for sm_90. A stride of 1 (the down scales' row stride when I is
    128, the gate scales' when D is 128) reaches the kernel as a constexpr."""
    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles the kernel: not under the interpreter")
    layer = _moe(True, D, I, S)
    g, gs, u, us, d, ds = layer.experts.gemv_weights()
    g2, gs2, u2, us2, d2, ds2 = layer.shared_stacks()
    E = g.shape[0]
    x = torch.randn(1, D).bfloat16()
    flat = torch.tensor([0, 1] + list(range(E, E + S)))
    _compile_launch_for_sm90(monkeypatch, x, g, gs, flat, 2 + S, u, us, extra=(g2, gs2, u2, us2))
    h = torch.randn(2 + S, I).bfloat16()
    _compile_launch_for_sm90(monkeypatch, h, d, ds, flat, 1, extra=(d2, ds2, None, None))
    # as MoE.forward_gemv launches them: the routed ids only, the shared rows derived in the kernel (routed=2)
    _compile_launch_for_sm90(monkeypatch, x, g, gs, flat[:2], 2 + S, u, us, extra=(g2, gs2, u2, us2), routed=2)
    _compile_launch_for_sm90(monkeypatch, h, d, ds, flat[:2], 1, extra=(d2, ds2, None, None), routed=2)


# --- the rule: the shared experts' own gradients ----------------------------------------------------------------

@interp
def test_shared_path_refused_where_the_shared_experts_train(monkeypatch):
    """Routed experts frozen, the shared MLP trainable (a fine-tune of the shared experts), grad on, a decode-sized
    call: the custom ops have no backward, so the shared MLP must run as modules and get its gradients."""
    layer = _moe(False, 256, 128, 2).half()
    for p in layer.experts.parameters():
        p.requires_grad_(False)
    monkeypatch.setattr(layer.experts, "_impl", lambda x_ND, impl: "grouped")
    x = torch.randn(1, 1, 256).half()
    with kernels.use_backend(expert_gemv="triton", swiglu_gemv="reference", shared_gemv="triton"):
        y, _ = layer(x)
        y.float().sum().backward()
    assert layer.shared_experts.gate_proj.weight.grad is not None


# --- adversarial shapes under the interpreter -------------------------------------------------------------------

def _forced_pair(layer, x, monkeypatch):
    from dsv3.kernels import expert_gemv_triton as k

    calls = []
    real = k.launch
    monkeypatch.setattr(k, "launch", lambda *a, **kw: calls.append(kw.get("extra") is not None) or real(*a, **kw))
    monkeypatch.setattr(layer.experts, "_gemv_fits", lambda x_ND, idx: True)
    monkeypatch.setattr(layer.experts, "_impl", lambda x_ND, impl: "grouped")
    with torch.no_grad(), kernels.use_backend(expert_gemv="triton", swiglu_gemv="reference"):
        ref, _ = layer(x)
        with kernels.use_backend(shared_gemv="triton"):
            got, _ = layer(x)
    assert calls == [False, False, True, True], calls
    return got, ref


@interp
@pytest.mark.parametrize("hidden,inter,S", [(200, 72, 1), (136, 40, 3)])
def test_interp_fp16_ragged_shapes(monkeypatch, hidden, inter, S):
    """16-bit weights with N and K not multiples of 128 (nor of BN), one and three shared experts, two tokens."""
    layer = _moe(False, hidden, inter, S).half()
    got, ref = _forced_pair(layer, torch.randn(2, 1, hidden).half(), monkeypatch)
    assert _rel(got, ref) < 5e-3, _rel(got, ref)


@interp
@pytest.mark.parametrize("hidden,inter,S", [(320, 256, 3), (256, 128, 1), (128, 128, 2)])
def test_interp_fp8_layers(monkeypatch, hidden, inter, S):
    """FP8 layers: I 256 with three shared experts and D not a multiple of 128 (ragged scale blocks); I 128 with
    one; D 128."""
    layer = _moe(True, hidden, inter, S).half()
    got, ref = _forced_pair(layer, torch.randn(1, 1, hidden).half(), monkeypatch)
    assert _rel(got, ref) < 5e-3, _rel(got, ref)


@interp
@pytest.mark.parametrize("fp8", [False, True])
def test_interp_foreign_rows_and_one_shared_expert(fp8):
    """Rows with expert -1 anywhere (first, between the stacks, last) give 0 and read neither stack; S = 1; the
    second stack's views of (N, S*K) for down and of (S*N, K) for gate; N 136 and K 256 (FP8) / 200 (fp16)."""
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator().manual_seed(7)
    E, S, N = 3, 1, 136
    K = 256 if fp8 else 200
    w = torch.randn(E, N, K, generator=g)
    big = torch.randn(N, S * K, generator=g)
    if fp8:
        qs = [weight_quant(t) for t in w]
        w, s = torch.stack([q for q, _ in qs]), torch.stack([q for _, q in qs])
        bq, bs = weight_quant(big)
        w2, s2 = bq.view(N, S, K).transpose(0, 1), bs.view(bs.shape[0], S, K // 128).transpose(0, 1)
    else:
        w, s, s2 = w.half(), None, None
        w2 = big.half().view(N, S, K).transpose(0, 1)
    x = torch.randn(7, K, generator=g).half()
    expert = torch.tensor([-1, 3, 0, -1, 2, 3, -1])
    got = k.launch(x, w, s, expert, 1, extra=(w2, s2, None, None), BN=8)
    cat_w = torch.cat([w, w2.contiguous()])
    cat_s = None if s is None else torch.cat([s, s2.contiguous()])
    want = expert_gemv_ref(x, cat_w, cat_s, expert, 1)
    for r in (0, 3, 6):
        assert torch.equal(got[r], torch.zeros(N, dtype=got.dtype)), r
    assert _rel(got, want) < 2e-3, _rel(got, want)
