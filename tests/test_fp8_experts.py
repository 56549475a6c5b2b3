"""FP8 routed experts in training (dsv3/training/fp8.py, "Experts"; SPEC §9) on the CPU: the emulation
against the contract written out by hand and against fp32, the module swap, a tiny model training.
Under the Triton interpreter the grouped kernels (dsv3/kernels/fp8_grouped_triton.py) and the "triton"
backend's glue are checked against the emulation too (else skipped):

    TRITON_INTERPRET=1 python -m pytest -q tests/test_fp8_experts.py

The same on the GPU at realistic shapes: tests/test_gpu_fp8_experts.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from test_fp8_training import _train
from dsv3.kernels import act_dequant, act_quant, weight_quant
from dsv3.model import build_model
from dsv3.model.moe import Experts
from dsv3.training.fp8 import FP8TrainExperts, FP8TrainLinear, convert_to_fp8_training, fp8_grouped_linear

E4M3 = torch.float8_e4m3fn


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _offs(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _rows(counts):
    ends = torch.tensor(counts).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


# --- the contract written out by hand (any shape: zero padding changes no amax) ------------------

def _q_tiles(t, floor):
    """1x128 tiles along the last dim: scale max(amax, floor)/448, e4m3, back to fp32. Gradients have
    floor 0 (no tile here is all zero)."""
    M, K = t.shape
    Kp = -(-K // 128) * 128
    v = F.pad(t.float(), (0, Kp - K)).reshape(M, Kp // 128, 128)
    s = v.abs().amax(-1, keepdim=True).clamp_min(floor) / 448.0
    return ((v / s).clamp(-448, 448).to(E4M3).float() * s).reshape(M, Kp)[:, :K]


def _q_blocks(w):
    """128x128 blocks of one expert's matrix: scale max(amax/448, 1e-12), e4m3, back to fp32."""
    N, K = w.shape
    Np, Kp = -(-N // 128) * 128, -(-K // 128) * 128
    v = F.pad(w.float(), (0, Kp - K, 0, Np - N)).reshape(Np // 128, 128, Kp // 128, 128)
    s = (v.abs().amax(dim=(1, 3), keepdim=True) / 448.0).clamp_min(1e-12)
    return ((v / s).clamp(-448, 448).to(E4M3).float() * s).reshape(Np, Kp)[:N, :K]


def _hand_fp8(x, ws, counts, g):
    """(y, dx, [dW_i]) of the recipe per expert: rows_e of the sorted X through Q128x128(W_e), the
    weights' dgrads summed (gate and up, concatenated along N, are two linears sharing X); wgrad
    from dYᵀ and Xᵀ tiled 1x128 along the tokens of the whole sorted M (tiles straddle experts), Xᵀ
    requantised from the FP8 X."""
    rows, ns = _rows(counts), [w.shape[1] for w in ws]
    wd = torch.cat([torch.stack([_q_blocks(w_e) for w_e in w]) for w in ws], 1)  # (E, N, K)
    xd = _q_tiles(x, 1e-4)
    gd = torch.cat([_q_tiles(gi, 0.0) for gi in g.split(ns, 1)], 1)  # each weight's dY in its own tiles
    y = torch.zeros(x.shape[0], wd.shape[1])
    dx = torch.zeros(x.shape)
    for e, (a, b) in enumerate(rows):
        y[a:b] = xd[a:b] @ wd[e].T
        dx[a:b] = gd[a:b] @ wd[e]
    gt, xt = _q_tiles(g.t(), 0.0), _q_tiles(xd.t(), 1e-4)  # (N, M), (K, M)
    dws = [torch.stack([gi[:, a:b] @ xt[:, a:b].T for a, b in rows]) for gi in gt.split(ns)]
    return y, dx, dws


def _run(x, ws, offs, g, backend="emulate"):
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in ws]
    y = fp8_grouped_linear(x, tuple(ws), offs, backend)
    y.backward(g)
    return y.detach(), x.grad, [w.grad for w in ws]


# uneven groups, empty experts (first, middle, last), M = 300 not a multiple of 128, 128-token tiles
# straddling experts
COUNTS = [0, 100, 0, 150, 7, 43, 0]


def _inputs(seed, K, ns, counts=COUNTS, wscale=0.05):
    g = torch.Generator().manual_seed(seed)
    M, E = sum(counts), len(counts)
    x = torch.randn(M, K, generator=g)
    ws = [torch.randn(E, n, K, generator=g) * wscale for n in ns]
    gy = torch.randn(M, sum(ns), generator=g)
    return x, ws, gy


@pytest.mark.parametrize("K,ns", [(256, (128, 128)), (256, (256,)), (200, (72, 40))])
def test_emulation_equals_the_hand_written_contract(K, ns):
    x, ws, g = _inputs(0, K, ns)
    y, dx, dws = _run(x, ws, _offs(COUNTS), g)
    hy, hdx, hdws = _hand_fp8(x, ws, COUNTS, g)
    assert torch.equal(y, hy) and torch.equal(dx, hdx)
    for dw, hdw in zip(dws, hdws):
        assert dw.shape == hdw.shape and torch.equal(dw, hdw)
    for dw in dws:  # empty experts: zero gradient
        assert not dw[[0, 2, 6]].any()


def test_emulation_close_to_fp32():
    """Per-expert errors of the same size as the dense path's (tests/test_fp8_training.py: ~3.6% y and
    dx, ~4.5% dw on Gaussian data); bound 6%."""
    x, ws, g = _inputs(1, 384, (256, 128))
    offs = _offs(COUNTS)
    y, dx, dws = _run(x, ws, offs, g)
    xr = x.clone().requires_grad_()
    wr = [w.clone().requires_grad_() for w in ws]
    wcat = torch.cat(wr, 1)
    yr = torch.zeros(y.shape)
    for e, (a, b) in enumerate(_rows(COUNTS)):
        yr[a:b] = xr[a:b] @ wcat[e].T
    yr.backward(g)
    for a, b in [(y, yr), (dx, xr.grad)] + list(zip(dws, [w.grad for w in wr])):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < 0.06, _rel(a, b)


def test_gradient_scale_invariance():
    """dY pre-scaled by a power of two (module docstring): the FP8 gradients follow the loss scale exactly."""
    x, ws, g = _inputs(2, 256, (128, 128))
    offs = _offs(COUNTS)
    _, dx1, dw1 = _run(x, ws, offs, g)
    _, dx2, dw2 = _run(x, ws, offs, g * 2.0 ** -40)
    assert torch.equal(dx2, dx1 * 2.0 ** -40)
    assert all(torch.equal(b, a * 2.0 ** -40) for a, b in zip(dw1, dw2))


def _experts(E=6, D=192, I=80, seed=0, scale=0.05):
    cfg = tiny_cfg(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, n_group=1, topk_group=1)
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(seed)
    for p in ex.parameters():
        p.data = torch.randn(p.shape, generator=g) * scale
    return ex


def _route(N, E, K, D, seed):
    """Routing of N tokens to K of E experts: a crowded expert 0 (and 1), the last expert empty."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])
    idx[: N // 3] = torch.arange(K)
    return idx, torch.rand(N, K, generator=g), torch.randn(N, D, generator=g)


def _module_grads(ex, x, idx, w, gy):
    for p in ex.parameters():
        p.grad = None
    xr = x.clone().requires_grad_()
    y = ex(xr, idx, w, "grouped")
    y.backward(gy)
    return y.detach(), xr.grad, [p.grad.clone() for p in (ex.gate_proj, ex.up_proj, ex.down_proj)]


def test_fp8_experts_module_close_to_fp32():
    """FP8TrainExperts (emulate) against the fp32 Experts on the same routing: SwiGLU of two FP8 GEMMs,
    then the third: errors compound (measured 6.3-6.7% for y, dx and each dW); bound 8%."""
    ex = _experts()
    idx, w, x = _route(100, 6, 1, 192, 3)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    ref = _module_grads(ex, x, idx, w, gy)
    FP8TrainExperts.from_experts(ex, "emulate")
    got = _module_grads(ex, x, idx, w, gy)
    assert _rel(got[0], ref[0]) < 0.08 and _rel(got[1], ref[1]) < 0.08, (_rel(got[0], ref[0]), _rel(got[1], ref[1]))
    for a, b in zip(got[2], ref[2]):
        assert _rel(a, b) < 0.08, _rel(a, b)
        assert not a[5].any()  # the empty expert
    # the FP8 GEMMs exist only grouped: impl "loop" runs the same
    y_loop = ex(x, idx, w, "loop")
    assert torch.equal(y_loop, got[0])


def test_convert_with_experts_swaps_them_and_keeps_the_state_dict():
    model = build_model(tiny_cfg(), seed=0)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    names = convert_to_fp8_training(model, "emulate", experts=True)
    swapped = {n for n, m in model.named_modules() if isinstance(m, FP8TrainExperts)}
    assert swapped == {"layers.1.mlp.experts", "layers.2.mlp.experts", "mtp.0.mlp.experts"}
    assert swapped <= set(names) and all(m.fp8_backend == "emulate" for m in model.modules()
                                          if isinstance(m, (FP8TrainExperts, FP8TrainLinear)))
    assert not any(type(m) is Experts for m in model.modules())
    sd1 = model.state_dict()
    assert list(sd1) == list(sd0) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    # default: experts untouched; the Linears' "scaled_mm" is the experts' "triton"
    m2 = build_model(tiny_cfg(), seed=0)
    convert_to_fp8_training(m2)
    assert not any(isinstance(m, FP8TrainExperts) for m in m2.modules())
    m3 = build_model(tiny_cfg(), seed=0)
    convert_to_fp8_training(m3, "scaled_mm", experts=True)
    assert {m.fp8_backend for m in m3.modules() if isinstance(m, FP8TrainExperts)} == {"triton"}


def test_bad_arguments():
    ex = _experts()
    with pytest.raises(ValueError):
        FP8TrainExperts.from_experts(ex, "scaled_mm")
    with pytest.raises(ValueError):
        fp8_grouped_linear(torch.randn(3, 128), (torch.randn(1, 128, 128),), _offs([3]), "fast")
    FP8TrainExperts.from_experts(ex, "emulate")
    with pytest.raises(TypeError):
        FP8TrainExperts.from_experts(ex)


def test_tiny_model_with_fp8_experts_trains_close_to_fp32():
    cfg = tiny_cfg(hidden_size=64, intermediate_size=128, initializer_range=0.02)
    l32 = _train(cfg, False, 12)
    l8 = _train(cfg, True, 12, experts=True)
    assert l8[-1] < 0.8 * l8[0]
    assert abs(l8[-1] - l32[-1]) / l32[-1] < 0.03, (l8, l32)


# --- Triton interpreter: the kernels and the "triton" backend against the emulation --------------

def _interpreter() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


def interp(test):
    skip = pytest.mark.skipif(not _interpreter(), reason="needs triton and TRITON_INTERPRET=1")
    return skip(pytest.mark.usefixtures("numpy24_interpreter")(test))


@pytest.fixture
def numpy24_interpreter(monkeypatch):
    """Triton 3.6's interpreter turns a scalar argument (a 1-element array) into a loop bound with
    int(), a TypeError since NumPy 2.4 (triton-lang/triton#9171): apply the upstream fix here."""
    from triton.runtime import interpreter as ti

    patch = ti._patch_lang_tensor

    def fixed(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(ti, "_patch_lang_tensor", fixed)


def _stack_quant(w):
    """(E, N, K) -> fp8 (E, N, K) and per-expert block scales (E, N/128, K/128), by the reference."""
    qs = [weight_quant(w_e) for w_e in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _emu_mm(xd, wd, counts):
    y = torch.zeros(xd.shape[0], wd.shape[1])
    for e, (a, b) in enumerate(_rows(counts)):
        y[a:b] = xd[a:b] @ wd[e].T
    return y


def _dequant_stack(q, s):
    return q.float() * s.repeat_interleave(128, 1).repeat_interleave(128, 2)


@interp
@pytest.mark.parametrize("cat", ["n", "k"])
def test_interp_grouped_mm_vs_emulation(cat):
    """fprop layout (cat "n": [gate; up] rows) and dgrad layout (cat "k": Wᵀ views of the fp8
    transpose (K, E*N) with transposed scales, concatenated along the contraction)."""
    from dsv3.kernels import fp8_grouped_triton as gk

    E, K = 4, 256
    counts = [130, 0, 163, 7]  # M = 300
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, K if cat == "n" else 256, generator=g)
    xq, xs = act_quant(x)
    if cat == "n":
        qs = [_stack_quant(torch.randn(E, 128, K, generator=g) * 0.05) for _ in range(2)]
        bs = qs
    else:  # B_e = W_eᵀ (E, K_out=384, n) from W (E, n, 384), n = 128 + 128 along the contraction
        qs = [_stack_quant(torch.randn(E, 128, 384, generator=g) * 0.05) for _ in range(2)]
        bs = [(q.reshape(E * 128, 384).t().contiguous().view(384, E, 128).permute(1, 0, 2), s.transpose(1, 2))
              for q, s in qs]
    y = gk.fp8_grouped_mm(xq, xs, bs, _offs(counts), torch.float32, cat=cat)
    wd = torch.cat([_dequant_stack(q, s) for q, s in qs], 1)  # (E, N, K) of the fprop orientation
    ref = _emu_mm(act_dequant(xq, xs), wd if cat == "n" else wd.transpose(1, 2), counts)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@interp
def test_interp_grouped_wgrad_vs_emulation():
    from dsv3.kernels import fp8_grouped_triton as gk

    counts = [130, 0, 163, 7]  # M = 300, padded to 384 tokens
    g = torch.Generator().manual_seed(6)
    dy, x = torch.randn(384, 256, generator=g), torch.randn(384, 256, generator=g)
    dy[300:] = 0
    x[300:] = 0
    aq, a_s = act_quant(dy.t().contiguous())  # (N, Mp), (N, Mp/128)
    bq, b_s = act_quant(x.t().contiguous())  # (K, Mp)
    outs = gk.fp8_grouped_wgrad(aq, a_s, bq, b_s, _offs(counts), [128, 128])
    ad, bd = act_dequant(aq, a_s), act_dequant(bq, b_s)
    ref = torch.stack([ad[:, a:b] @ bd[:, a:b].T for a, b in _rows(counts)])  # (E, 256, 256)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-5, atol=1e-5)
    assert not outs[0][1].any() and not outs[1][1].any()


@interp
def test_interp_grouped_wgrad_in_the_weights_dtype_is_the_fp32_result_rounded():
    """fp8_grouped_wgrad(out_dtype=...): each part written in that dtype, bit for bit the fp32 launch's result cast
    (one rounding of the same fp32 sums), the empty expert's gradient 0. fp16 (the interpreter has no bf16; the
    bf16 store: the sm_90 compile below)."""
    from dsv3.kernels import fp8_grouped_triton as gk

    out_dtype = torch.float16
    counts = [130, 0, 163, 7]
    g = torch.Generator().manual_seed(8)
    dy, x = torch.randn(384, 256, generator=g) * 1e-3, torch.randn(384, 256, generator=g)
    dy[300:] = 0
    aq, a_s = act_quant(dy.t().contiguous())
    bq, b_s = act_quant(x.t().contiguous())
    want = gk.fp8_grouped_wgrad(aq, a_s, bq, b_s, _offs(counts), [128, 128])
    got = gk.fp8_grouped_wgrad(aq, a_s, bq, b_s, _offs(counts), [128, 128], out_dtype)
    assert [t.dtype for t in want] == [torch.float32] * 2
    for a, b in zip(got, want):
        assert a.dtype == out_dtype and a.shape == b.shape and torch.equal(a, b.to(out_dtype))
        assert not a[1].any() and a.float().abs().max() > 0
    with pytest.raises(AssertionError, match="out_dtype"):
        gk.fp8_grouped_wgrad(aq, a_s, bq, b_s, _offs(counts), [128, 128], torch.float8_e4m3fn)


@interp
def test_interp_triton_backend_weight_grads_in_the_weights_dtype(monkeypatch):
    """The "triton" glue asks the wgrad launch for the weights' dtype where they share one (16-bit working
    weights: no fp32 copy of the expert gradients), fp32 where they differ; the gradients are the emulation's
    (which rounds its fp32 result to the weight's dtype) up to fp32 summation order."""
    from dsv3.kernels import fp8_grouped_triton as gk

    asked, real = [], gk.fp8_grouped_wgrad
    monkeypatch.setattr(gk, "fp8_grouped_wgrad", lambda *a: asked.append(a[-1]) or real(*a))
    x, ws, g = _inputs(7, 256, (128, 128))
    offs = _offs(COUNTS)
    ws16 = [w.half() for w in ws]
    ref = _run(x.half(), ws16, offs, g.half(), "emulate")
    got = _run(x.half(), ws16, offs, g.half(), "triton")
    assert asked == [torch.float16]
    for a, b in zip(got[2], ref[2]):
        assert a.dtype == b.dtype == torch.float16 and _rel(a, b) < 1e-3, _rel(a, b)
    _run(x.half(), [ws16[0], ws[1]], offs, g.half(), "triton")  # fp16 gate, fp32 up: fp32, then each one's cast
    assert asked[-1] == torch.float32


def test_grouped_wgrad_kernel_compiles_for_sm90_with_a_bf16_store(monkeypatch):
    """The wgrad launch with bf16 outputs compiles for sm_90 (Triton's NVIDIA back end on the CPU): the store
    converts the fp32 accumulator (cvt to bf16 in the PTX), the fp32 launch stores it as it is."""
    triton = pytest.importorskip("triton")
    if _interpreter():
        pytest.skip("compiles the kernel: not under the interpreter")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv3.kernels import fp8_grouped_triton as gk

    tt = {torch.float8_e4m3fn: "fp8e4nv", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}
    seen = {}

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(args=a, kw=kw)

    real = gk._grouped_wgrad_kernel
    monkeypatch.setattr(gk, "_check_device", lambda *t: None)
    monkeypatch.setattr(gk, "_grouped_wgrad_kernel", Rec())
    N, K, Mp, E = 4096, 7168, 4096, 16
    a = torch.empty(N, Mp, dtype=torch.float8_e4m3fn)
    a_s, b_s = torch.empty(Mp // 128, N).t(), torch.empty(Mp // 128, K).t()
    b = torch.empty(K, Mp, dtype=torch.float8_e4m3fn)
    offs = torch.arange(1, E + 1, dtype=torch.int32) * (Mp // E)
    ptx = {}
    for dt in (torch.bfloat16, torch.float32):
        gk.fp8_grouped_wgrad(a, a_s, b, b_s, offs, [N // 2, N // 2], dt)
        kw = dict(seen["kw"])
        opts = {o: kw.pop(o) for o in ("num_warps", "num_stages")}
        bound = {**dict(zip(real.arg_names, seen["args"])), **kw}
        signature, consts = {}, {}
        for i, n in enumerate(real.arg_names):
            v = bound[n]
            if isinstance(v, torch.Tensor):
                signature[n] = "*" + tt[v.dtype]
            elif real.params[i].is_constexpr or v == 1:
                signature[n], consts[(i,)] = "constexpr", v
            else:
                signature[n] = "i32"
        c = triton.compile(ASTSource(real, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=opts)
        ptx[dt] = c.asm["ptx"]
    assert "cvt.rn.bf16" in ptx[torch.bfloat16] and "bf16" not in ptx[torch.float32]
    assert ".local" not in ptx[torch.bfloat16]  # no spills


@interp
@pytest.mark.parametrize("ns", [(128, 128), (256,)])
def test_interp_triton_backend_vs_emulation(ns):
    """The "triton" backend's glue with the grouped kernels interpreted; on CPU tensors the quantisers
    inside it are the reference ones in the Triton layouts (kernels.act_quant_cm & co. choose by device)."""
    x, ws, g = _inputs(7, 384, ns)
    offs = _offs(COUNTS)
    ref = _run(x, ws, offs, g, "emulate")
    got = _run(x, ws, offs, g, "triton")
    for a, b in [(got[0], ref[0]), (got[1], ref[1])] + list(zip(got[2], ref[2])):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) < 1e-6, _rel(a, b)  # the same operands: fp32 summation order only


@interp
def test_interp_triton_experts_module_padded_vs_emulation():
    """D = 192, I = 80 are padded to 256 and 128 for the kernels: the same result as the emulation."""
    idx, w, x = _route(100, 6, 2, 192, 8)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    res = []
    for backend in ("emulate", "triton"):
        ex = FP8TrainExperts.from_experts(_experts(), backend)
        res.append(_module_grads(ex, x, idx, w, gy))
    # fp32 summation order moves h by ~1e-7, which can move one of its e4m3 roundings: compare in norm
    for a, b in [(res[1][0], res[0][0]), (res[1][1], res[0][1])] + list(zip(res[1][2], res[0][2])):
        assert a.shape == b.shape and _rel(a, b) < 1e-3, _rel(a, b)


def _run_rw(x, ws, offs, g, backend, rw):
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in ws]
    kept = []  # what backward will get
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = fp8_grouped_linear(x, tuple(ws), offs, backend, recompute_weight=rw)
    y.backward(g)
    return (y.detach(), x.grad, *[w.grad for w in ws]), kept, ws


def _tensors(kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """The non-empty tensors autograd keeps (empty ones stand for what a mode does not keep)."""
    return [t for t in kept if t.numel()]


def test_recomputed_expert_weights_give_the_same_gradients():
    """fp8_grouped_linear(recompute_weight=True): y, dx and every dW bit for bit the default's (the weights
    quantised again in backward to the same bytes), and what autograd keeps holds no FP8 weight (only the FP8 X),
    but the weights themselves (references, no copies)."""
    _check_recomputed_expert_weights("emulate")


@interp
def test_interp_triton_recomputed_expert_weights_give_the_same_gradients():
    """The same through the "triton" backend's glue (grouped kernels interpreted)."""
    _check_recomputed_expert_weights("triton")


def _check_recomputed_expert_weights(backend):
    x, ws, g = _inputs(11, 256, (128, 128))
    offs = _offs(COUNTS)
    a, kept_a, _ = _run_rw(x, ws, offs, g, backend, False)
    b, kept_b, wb = _run_rw(x, ws, offs, g, backend, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    M, K = x.shape
    fp8_a, fp8_b = ([t for t in _tensors(k) if t.dtype == E4M3 and t.dim() >= 2] for k in (kept_a, kept_b))
    assert len(fp8_a) > 1  # X and the weights (or their transposes)
    assert [tuple(t.shape) for t in fp8_b] in ([(M, K)], [(-(-M // 128) * 128, K)])  # X only (padded: triton)
    assert all(any(t.data_ptr() == w.data_ptr() for t in _tensors(kept_b)) for w in wb)  # references, no copies


def test_train_config_fp8_experts_needs_fp8():
    from dsv3.training.config import TrainConfig

    with pytest.raises(ValueError, match="fp8_experts"):
        TrainConfig(out_dir="unused", precision="bf16", fp8_experts=True).validate()
    TrainConfig(out_dir="unused", precision="fp8", fp8_experts=True).validate()


def _rows_with_foreign(backend: str):
    """Expert-parallel decode (Experts.forward_partial) hands the per-row FP8 GEMV its foreign pairs with
    expert -1: those rows are exactly 0 (the kernel reads no weight for them), the others as without them."""
    from dsv3.kernels.reference import fp8_expert_rows_ref, weight_quant

    g = torch.Generator().manual_seed(9)
    we, se = zip(*(weight_quant(torch.randn(96, 256, generator=g)) for _ in range(3)))
    we, se = torch.stack(we), torch.stack(se)
    x = torch.randn(6, 256, generator=g).half()
    expert = torch.tensor([2, -1, 0, -1, 1, 2])
    if backend == "triton":
        from dsv3.kernels import fp8_gemm_triton as fk

        y = fk.fp8_expert_rows(x, we, se, expert)
    else:
        y = fp8_expert_rows_ref(x, we, se, expert)
    mine = expert >= 0
    assert torch.equal(y[~mine], torch.zeros_like(y[~mine]))
    ref = fp8_expert_rows_ref(x[mine], we, se, expert[mine])
    assert _rel(y[mine].float(), ref.float()) < 2e-3


def test_fp8_expert_rows_reference_skips_expert_minus_one():
    _rows_with_foreign("reference")


@interp
def test_interp_fp8_expert_rows_skips_expert_minus_one():
    _rows_with_foreign("triton")


@interp
def test_interp_fp8_decode_gemms_are_opaque_custom_ops():
    """The FP8-weight decode GEMMs (fp8_gemm_triton: the dense small-M tile GEMM and the per-row expert
    GEMV) are torch.library custom ops: interpreted, they equal dequantise + matmul; torch.compile traces
    a function calling both with fullgraph=True (no graph break: the fake implementations give shapes)."""
    from dsv3.kernels import fp8_gemm_triton as fk
    from dsv3.kernels.reference import fp8_expert_rows_ref, fp8_weight_linear_ref, weight_quant

    g = torch.Generator().manual_seed(8)
    w, s = weight_quant(torch.randn(200, 256, generator=g))  # a partial 128-row block
    we, se = zip(*(weight_quant(torch.randn(96, 256, generator=g)) for _ in range(3)))
    we, se = torch.stack(we), torch.stack(se)
    x = torch.randn(5, 256, generator=g).half()  # (the interpreter has no bf16: numpy lacks it)
    expert = torch.tensor([2, 0, 2, 1, 0])
    assert isinstance(fk.fp8_linear_small_m, torch._library.custom_ops.CustomOpDef)

    def f(x):
        return fk.fp8_linear_small_m(x, w, s), fk.fp8_expert_rows(x, we, se, expert)

    ref = (fp8_weight_linear_ref(x, w, s), fp8_expert_rows_ref(x, we, se, expert))
    for got in (f(x), torch.compile(f, backend="aot_eager", fullgraph=True)(x)):
        for a, b in zip(got, ref):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float16
            assert _rel(a.float(), b.float()) < 2e-3, _rel(a.float(), b.float())  # fp16 output rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_cat_equals_autograds_chain_and_keeps_only_its_input(dtype):
    """swiglu_cat (FP8TrainExperts' SwiGLU on the gate | up GEMM's output): the output and the input gradient of
    F.silu(h[:, :I]) * h[:, I:] through autograd (value for value), and for backward it keeps h alone where the
    chain also kept silu(gate), (M, I) more."""
    from dsv3.training.fp8 import swiglu_cat

    gen = torch.Generator().manual_seed(2)
    h0 = (torch.randn(37, 2 * 80, generator=gen) * 3).to(dtype)
    gy = torch.randn(37, 80, generator=gen).to(dtype)
    res, kept = [], []
    for f in (lambda h: F.silu(h[:, :80]) * h[:, 80:], swiglu_cat):
        h = h0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = f(h)
        y.backward(gy)
        res.append((y.detach(), h.grad))
        # the storages kept, h's marked
        kept.append({"h" if t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr() else
                     tuple(t.shape) for t in saved})
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    assert kept == [{"h", (37, 80)}, {"h"}]  # the chain: h (as the two halves) and silu(gate); swiglu_cat: h
    with pytest.raises(ValueError, match="even"):
        swiglu_cat(torch.randn(3, 5))


@interp
def test_interp_triton_glue_frees_dgrad_transients_before_wgrad(monkeypatch):
    """The "triton" experts' backward with recompute_weight: the recomputed expert Wᵀ (with their scales) and the
    quantised dY of dgrad are freed before the wgrad launch (on the 671b-slice 0.44 GiB of such transposes were alive
    at the FP8-experts step's peak)."""
    import gc
    from conftest import weakrefs_of_outputs
    from dsv3.kernels import fp8 as kf
    from dsv3.kernels import fp8_grouped_triton as gk

    made = []
    x, ws, g = _inputs(3, 256, (128, 128))
    offs = _offs(COUNTS)
    xr, wr = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    y = fp8_grouped_linear(xr, tuple(wr), offs, "triton", recompute_weight=True)
    monkeypatch.setattr(kf, "weight_quant_pad_t", weakrefs_of_outputs(kf.weight_quant_pad_t, made))
    monkeypatch.setattr(kf, "act_quant_cm", weakrefs_of_outputs(kf.act_quant_cm, made))
    alive, real = [], gk.fp8_grouped_wgrad

    def wgrad(*a):
        gc.collect()
        alive.append([r() is not None for r in made])
        return real(*a)
    monkeypatch.setattr(gk, "fp8_grouped_wgrad", wgrad)
    y.backward(g)
    assert len(made) == 6 and alive == [[False] * 6]  # two Wᵀ and their scales, dY's FP8 and scales


@interp
def test_interp_padded_experts_keep_their_fp8_copies_under_recompute(monkeypatch):
    """FP8TrainExperts with recompute_weight on shapes the kernels pad (D 192, I 80): the padded weights are copies
    made in the forward, so backward gets their FP8 transposes (1 byte a parameter) rather than the copies
    themselves to re-quantise; aligned shapes re-quantise."""
    from dsv3 import kernels

    asked, real = [], kernels.fp8_grouped_linear
    monkeypatch.setattr(kernels, "fp8_grouped_linear", lambda *a, **k: asked.append(k["recompute_w"]) or real(*a, **k))
    for D, I, want in ((192, 80, False), (256, 128, True)):
        asked.clear()
        ex = FP8TrainExperts.from_experts(_experts(D=D, I=I), "triton", recompute_weight=True)
        idx, w, x = _route(40, 6, 2, D, 8)
        _module_grads(ex, x, idx, w, torch.randn(x.shape, generator=torch.Generator().manual_seed(9)))
        assert asked == [want, want]


@pytest.mark.parametrize("rw", [False, True])
@pytest.mark.parametrize("K,ns", [(256, (128, 128)), (200, (72, 40))])
def test_fp8_grouped_ops_fakes_and_autograd_match_the_kernels(K, ns, rw):
    """kernels.fp8_grouped_linear's custom ops (dsv3::fp8_train_grouped_fwd / _bwd) on the reference backend:
    torch.library.opcheck (autograd registration; the fakes' shapes, dtypes and strides against the real outputs),
    gate | up as two weights and one, aligned and unaligned shapes, weights kept and recomputed. (The triton
    backend's fakes: the interpreted test below and tests/test_gpu_fp8_experts.py.)"""
    _opcheck_grouped("reference", K, ns, rw)


@interp
@pytest.mark.parametrize("rw", [False, True])
def test_interp_fp8_grouped_ops_fakes_match_the_triton_glue(rw):
    _opcheck_grouped("triton", 256, (128, 128), rw)


def _opcheck_grouped(which, K, ns, rw):
    x, ws, g = _inputs(4, K, ns)
    offs = _offs(COUNTS)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    utils = ("test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.dsv3.fp8_train_grouped_fwd.default, (x, ws, offs, torch.float32, which, rw),
                          test_utils=utils)
    out = torch.ops.dsv3.fp8_train_grouped_fwd(x.detach(), [w.detach() for w in ws], offs, torch.float32, which, rw)
    wks, wsks = out[3::2], out[4::2]
    wa = [w.detach() for w in ws] if rw else [torch.empty(0)] * len(ws)
    for need_dx, need_dw in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.dsv3.fp8_train_grouped_bwd.default,
                              (g, out[1], out[2], wks, wsks, wa, offs, list(ns), K, torch.float32, torch.float32, which,
                               rw, need_dx, need_dw), test_utils=utils)


def test_compiled_fp8_experts_trace_whole_and_equal_eager():
    """torch.compile traces FP8TrainExperts' grouped GEMMs (kernels.fp8_grouped_linear: custom ops with fakes; the
    reference's host loop stays inside the op) with fullgraph=True, and output and gradients equal eager's. (The
    experts' sorted MLP was torch.compiler.disable'd: a graph break in every MoE layer.)"""
    ex = FP8TrainExperts.from_experts(_experts(D=256, I=128), "emulate")
    idx, w, x = _route(40, 6, 2, 256, 8)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    want = _module_grads(ex, x, idx, w, gy)
    compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")
    for p in ex.parameters():
        p.grad = None
    xr = x.clone().requires_grad_()
    y = compiled(xr, idx, w)
    y.backward(gy)
    got = (y.detach(), xr.grad, [p.grad for p in (ex.gate_proj, ex.up_proj, ex.down_proj)])
    torch._dynamo.reset()
    for a, b in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
