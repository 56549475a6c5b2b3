"""FP8 routed experts on the GPU: the Triton grouped kernels (dsv3/kernels/fp8_grouped_triton.py, the
"triton" backend of dsv3/training/fp8.py) against the emulation (the contract) on fresh random inputs
at realistic shapes, and a tiny model training with FP8 experts. Run on the device machine:

    python -m pytest tests/test_gpu_fp8_experts.py -m gpu -q

Skipped where no CUDA device is present (CI). Speed against bf16 `torch._grouped_mm`:
bench/fp8_experts_speed.py."""

import pytest
import torch

import dsv3
from dsv3 import kernels
from dsv3.model.moe import Experts
from dsv3.training.fp8 import FP8TrainExperts, convert_to_fp8_training, fp8_grouped_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _triton():
    if not kernels.backend_available("fp8_grouped_gemm"):
        pytest.skip("needs SM 8.9+ and triton")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _counts(M, E, g):
    """Uneven per-expert row counts summing to M: skewed random loads, experts 1 and E-1 empty."""
    p = torch.rand(E, generator=g, device="cuda") ** 3 + 0.05
    p[1] = p[-1] = 0
    c = torch.multinomial(p, M, replacement=True, generator=g)
    return torch.zeros(E, dtype=torch.long, device="cuda").scatter_add_(0, c, torch.ones_like(c))


def _run(x, ws, offs, g, backend):
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in ws]
    y = fp8_grouped_linear(x, tuple(ws), offs, backend, torch.bfloat16)
    y.backward(g)
    return y.detach(), x.grad, [w.grad for w in ws]


@pytest.mark.parametrize("E,D,I,M", [(16, 7168, 2048, 16384), (64, 1024, 384, 24576), (8, 256, 128, 1000)])
def test_triton_grouped_linear_matches_emulation(E, D, I, M):
    """671b slice (16 local experts), the small preset, and a ragged M. Same quantised operands in both
    backends (the quantisers are byte-equal to the references): the differences are fp32 summation
    order, the tensor cores' limited accumulation precision within each 128-step (~1e-4 for the dense
    path's wgrad, tests/test_gpu.py) and the bf16 rounding of y and dx."""
    g = torch.Generator(device="cuda").manual_seed(E + M)
    counts = _counts(M, E, g)
    offs = counts.cumsum(0).to(torch.int32)
    gate, up = (torch.randn(E, I, D, device="cuda", generator=g) * 0.02 for _ in range(2))
    down = torch.randn(E, D, I, device="cuda", generator=g) * 0.02
    for ws, K in (((gate, up), D), ((down,), I)):
        N = sum(w.shape[1] for w in ws)
        x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
        gy = (torch.randn(M, N, device="cuda", generator=g) * 1e-6).to(torch.bfloat16)  # loss-mean sized
        ref = _run(x, ws, offs, gy, "emulate")
        got = _run(x, ws, offs, gy, "triton")
        assert got[0].dtype == got[1].dtype == torch.bfloat16 and all(d.dtype == torch.float32 for d in got[2])
        assert _rel(got[0], ref[0]) < 1e-2 and _rel(got[1], ref[1]) < 1e-2, (_rel(got[0], ref[0]), _rel(got[1], ref[1]))
        for a, b in zip(got[2], ref[2]):
            assert _rel(a, b) < 1e-3, _rel(a, b)
            assert not a[1].any() and not a[-1].any()  # the empty experts


@pytest.mark.parametrize("E,D,I,M", [(16, 7168, 2048, 4096), (8, 256, 128, 1000)])
def test_triton_recomputed_weights_give_the_same_gradients(E, D, I, M):
    """recompute_weight=True (the FP8 Wᵀ quantised again in backward by weight_quant_pad_t, none kept from the
    forward): y, dx and every dW bit for bit the default's, bf16 working weights."""
    g = torch.Generator(device="cuda").manual_seed(E)
    offs = _counts(M, E, g).cumsum(0).to(torch.int32)
    ws = [(torch.randn(E, I, D, device="cuda", generator=g) * 0.02).bfloat16() for _ in range(2)]
    x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16)
    gy = (torch.randn(M, 2 * I, device="cuda", generator=g) * 1e-6).to(torch.bfloat16)
    res = []
    for rw in (False, True):
        xr, wr = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
        y = fp8_grouped_linear(xr, tuple(wr), offs, "triton", torch.bfloat16, recompute_weight=rw)
        y.backward(gy)
        res.append([y.detach(), xr.grad] + [w.grad for w in wr])
    for a, b in zip(*res):
        assert torch.equal(a, b)


def _experts(E, D, I, seed):
    cfg = dsv3.ModelConfig(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=6,
                           n_group=1, topk_group=1)
    ex = Experts(cfg).cuda()
    g = torch.Generator(device="cuda").manual_seed(seed)
    for p in ex.parameters():
        p.data = torch.randn(p.shape, device="cuda", generator=g) * 0.02
    return ex


@pytest.mark.parametrize("E,D,I,N", [(64, 1024, 384, 4096), (8, 192, 64, 300)])
def test_fp8_experts_module_triton_matches_emulation(E, D, I, N):
    """FP8TrainExperts under bf16 autocast, the small preset's experts and an unaligned one (D and I
    zero-padded for the kernels): forward and all gradients. Between the two GEMMs the SwiGLU input is
    rounded to bf16 and requantised, so a few e4m3 roundings differ: looser bounds than above."""
    g = torch.Generator(device="cuda").manual_seed(N)
    x = torch.randn(N, D, device="cuda", generator=g)
    idx = torch.rand(N, E, device="cuda", generator=g).topk(6 if E > 6 else 2, dim=-1).indices
    w = torch.rand(idx.shape, device="cuda", generator=g)
    gy = torch.randn(N, D, device="cuda", generator=g) * 1e-5
    res = []
    for backend in ("emulate", "triton"):
        ex = FP8TrainExperts.from_experts(_experts(E, D, I, 0), backend)
        xr = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = ex(xr, idx, w)
        y.backward(gy)
        res.append((y.detach(), xr.grad, ex.gate_proj.grad, ex.up_proj.grad, ex.down_proj.grad))
    for a, b in zip(res[1], res[0]):
        assert _rel(a, b) < 2e-2, _rel(a, b)


def test_tiny_model_trains_with_fp8_experts(monkeypatch):
    """A tiny MoE model, FP8 everywhere (Linears scaled_mm where available, experts Triton): the loss
    falls, and the grouped kernels really ran."""
    from test_gpu import _cfg, _train_losses

    from dsv3.kernels import fp8_grouped_triton as gk

    calls = []
    for name in ("fp8_grouped_mm", "fp8_grouped_wgrad"):
        fn = getattr(gk, name)
        monkeypatch.setattr(gk, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    m = dsv3.build_model(_cfg().replace(moe_intermediate_size=128), device="cuda", seed=0)
    convert_to_fp8_training(m, experts=True)
    assert sum(isinstance(x, FP8TrainExperts) for x in m.modules()) == 3  # layers 1, 2 and the MTP block
    losses = _train_losses(m)
    assert all(v == v for v in losses) and losses[-1] < 0.7 * losses[0], losses
    assert {"fp8_grouped_mm", "fp8_grouped_wgrad"} <= set(calls)


def test_fp8_experts_ops_fakes_match_the_kernels_and_compile_whole():
    """kernels.fp8_grouped_linear's custom ops on the triton backend: opcheck (autograd registration; the fakes
    against the real outputs, weights kept and recomputed); then FP8TrainExperts (the small preset's experts) under
    bf16 autocast compiled by inductor with fullgraph=True (no graph break) gives eager's output and gradients up to
    the bf16 rounding of what inductor fuses around them (the SwiGLU input, requantised: 1.3% measured on an H100,
    the bound of the triton-against-emulation test above)."""
    g = torch.Generator(device="cuda").manual_seed(5)
    E, D, I, M = 8, 256, 128, 1000
    offs = _counts(M, E, g).cumsum(0).to(torch.int32)
    x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    ws = [(torch.randn(E, I, D, device="cuda", generator=g) * 0.02).requires_grad_() for _ in range(2)]
    for rw in (False, True):
        torch.library.opcheck(torch.ops.dsv3.fp8_train_grouped_fwd.default, (x, ws, offs, torch.bfloat16, "triton", rw),
                              test_utils=("test_autograd_registration", "test_faketensor"))
    ex = FP8TrainExperts.from_experts(_experts(64, 1024, 384, 0), "triton")
    N = 4096
    xin = torch.randn(N, 1024, device="cuda", generator=g)
    idx = torch.rand(N, 64, device="cuda", generator=g).topk(6, dim=-1).indices
    w = torch.rand(idx.shape, device="cuda", generator=g)
    gy = torch.randn(N, 1024, device="cuda", generator=g) * 1e-5
    res = []
    for fn in (ex, torch.compile(ex, fullgraph=True)):
        ex.zero_grad(set_to_none=True)
        xr = xin.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xr, idx, w)
        y.backward(gy)
        res.append((y.detach(), xr.grad, ex.gate_proj.grad, ex.up_proj.grad, ex.down_proj.grad))
    torch._dynamo.reset()
    for a, b in zip(res[1], res[0]):
        assert _rel(a, b) < 2e-2, _rel(a, b)  # the bf16 SwiGLU input rounded (and requantised) as fused
