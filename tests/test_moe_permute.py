"""The training MoE's row permutation (kernels.moe_gather / moe_combine / moe_combine_bwd; Triton in
dsv3/kernels/moe_permute_triton.py): the references against the autograd graph Experts.forward_grouped builds on the
reference path, the kernel seam's rule, and under the Triton interpreter the kernels against the references and the
whole grouped experts' forward and backward with the kernels against without:

    python -m pytest -q tests/test_moe_permute.py
    TRITON_INTERPRET=1 python -m pytest -q tests/test_moe_permute.py   (+ the kernels, interpreted)

The same on the GPU at the presets' shapes and under torch.compile: tests/test_gpu_moe_permute.py."""

from __future__ import annotations

import pytest
import torch

from dsv3 import kernels
from dsv3.config import ModelConfig
from dsv3.kernels import moe_combine_bwd_ref, moe_combine_ref, moe_gather_ref
from dsv3.model.moe import Experts, _Dispatch, _Unsort
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)


def routing(N: int, E: int, K: int, seed: int = 0):
    """Random top-K routing of N tokens over E experts -> idx (N, K), order (M,), inv (M,) as forward_grouped sorts."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(N, E, generator=g).topk(K, dim=-1).indices
    order = idx.reshape(-1).argsort(stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return idx, order, inv


def _data(N, D, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    _, order, inv = routing(N, 3 * K, K, seed)
    y = torch.randn(N * K, D, generator=g).to(dtype)
    w = torch.rand(N, K, generator=g) * 2.5
    gout = torch.randn(N, D, generator=g).to(dtype)
    return order, inv, y, w, gout


# --- the references are forward_grouped's autograd graph --------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_are_the_autograd_graph(dtype):
    N, D, K = 37, 24, 3
    order, inv, y, w, gout = _data(N, D, K, dtype)
    x = torch.randn(N, D).to(dtype)
    assert torch.equal(moe_gather_ref(x, order, K), x[order // K])
    # the combine: _Unsort then the fp32 weighted sum, as Experts.forward_grouped computes it
    y1, w1 = y.clone().requires_grad_(), w.clone().requires_grad_()
    out = (_Unsort.apply(y1, inv, order).view(N, K, -1).float() * w1.unsqueeze(-1)).sum(1).to(dtype)
    assert torch.equal(moe_combine_ref(y, inv.view(N, K), w, dtype), out)
    out.backward(gout)
    gy, gw = moe_combine_bwd_ref(gout, y, inv.view(N, K), w)
    assert gy.dtype == dtype and gw.dtype == torch.float32
    assert torch.equal(gy, y1.grad)  # one product, one rounding: the same bits
    torch.testing.assert_close(gw, w1.grad, rtol=1e-5, atol=1e-5)  # sums over D in another order
    # the dispatch's backward: the unweighted combine in the rows' dtype
    x1 = x.clone().requires_grad_()
    g_MD = torch.randn(N * K, D).to(dtype)
    _Dispatch.apply(x1, order, inv, K).backward(g_MD)
    assert torch.equal(moe_combine_ref(g_MD, inv.view(N, K)), x1.grad)


def test_the_seam_picks_the_reference_on_the_cpu_and_while_pending():
    y = torch.randn(6, 4)
    inv = torch.arange(6).view(3, 2)
    assert kernels.select_backend("moe_permute", y, inv) == "reference"
    assert "moe_permute" in kernels.backend.PENDING or kernels.backend.FAST["moe_permute"] == "triton"
    with kernels.use_backend(moe_permute="reference"):
        assert torch.equal(kernels.moe_combine(y, inv), moe_combine_ref(y, inv))
    with pytest.raises(ValueError, match="moe_permute"):
        kernels.moe_combine(y, inv, backend="cuda")


def test_forward_grouped_reference_path_unchanged_by_the_seam():
    """On the CPU the seam answers "reference": forward_grouped is the plain expression (values and gradients as
    the per-expert loop's)."""
    cfg = ModelConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=6, num_experts_per_tok=2)
    torch.manual_seed(0)
    ex = Experts(cfg)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(11, 16, requires_grad=True)
    idx, _, _ = routing(11, 6, 2)
    w = torch.rand(11, 2, requires_grad=True)
    y = ex.forward_grouped(x, idx, w)
    y_ref = ex.forward_loop(x, idx, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


# --- Triton interpreter: the kernels against the references ----------------------------------------------

SHAPES = [(37, 24, 3), (5, 1100, 6), (64, 128, 8), (1, 8, 1), (0, 16, 2)]  # N, D, K: ragged D, D > 1024, N = 0


def _kernels():
    from dsv3.kernels import moe_permute_triton as mp

    return mp


@interp
@pytest.mark.parametrize("N,D,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_kernels_vs_references(N, D, K, dtype):
    mp = _kernels()
    order, inv, y, w, gout = _data(N, D, K, dtype, seed=N + D)
    inv_NK = inv.view(N, K)
    x = torch.randn(N, D).to(dtype)
    assert torch.equal(mp.moe_gather(x, order, K), moe_gather_ref(x, order, K))
    assert torch.equal(mp.moe_gather(y, order), moe_gather_ref(y, order))
    for out_dtype in (dtype, torch.float32):
        got, ref = mp.moe_combine(y, inv_NK, w, out_dtype), moe_combine_ref(y, inv_NK, w, out_dtype)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got, ref, rtol=1e-6 if out_dtype == torch.float32 else 1e-3, atol=1e-5)
    # unweighted (the dispatch's backward): the sum rounded once to the rows' dtype
    torch.testing.assert_close(mp.moe_combine(y, inv_NK), moe_combine_ref(y, inv_NK),
                               rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-5)
    gy, gw = mp.moe_combine_bwd(gout, y, inv_NK, w)
    gy_ref, gw_ref = moe_combine_bwd_ref(gout, y, inv_NK, w)
    assert torch.equal(gy, gy_ref)  # each row written once, one product
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-4)


@interp
def test_interp_kernels_read_strided_rows():
    """Rows with a stride past D (a view of a wider tensor) are read where they lie."""
    mp = _kernels()
    N, D, K = 9, 20, 2
    order, inv, y, w, gout = _data(N, D, K, torch.float32)
    wide = torch.randn(N * K, D + 12)
    wide[:, :D] = y
    yv = wide[:, :D]
    torch.testing.assert_close(mp.moe_combine(yv, inv.view(N, K), w), moe_combine_ref(y, inv.view(N, K), w))
    gy, gw = mp.moe_combine_bwd(gout, yv, inv.view(N, K), w)
    assert torch.equal(gy, moe_combine_bwd_ref(gout, y, inv.view(N, K), w)[0])


@interp
def test_interp_kernels_refuse_bad_indices():
    mp = _kernels()
    y, inv = torch.randn(6, 4), torch.arange(6).view(3, 2)
    with pytest.raises(AssertionError, match="int64"):
        mp.moe_combine(y, inv.int())
    with pytest.raises(AssertionError, match="fp32"):
        mp.moe_combine_bwd(torch.randn(3, 4), y, inv, torch.rand(3, 2).half())


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_forward_grouped_with_the_kernels(dtype):
    """Experts.forward_grouped with the seam forced to the kernels against the plain path: the output and the
    gradients of x, the gates and the expert weights."""
    cfg = ModelConfig(hidden_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3)
    torch.manual_seed(0)
    ex = Experts(cfg)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ex = ex.to(dtype)
    idx, _, _ = routing(21, 8, 3, seed=5)
    x0, w0 = torch.randn(21, 40).to(dtype), torch.rand(21, 3)
    gout = torch.randn(21, 40).to(dtype)

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        y = ex.forward_grouped(x, idx, w)
        y.backward(gout)
        return y, x.grad, w.grad, [p.grad.clone() for p in ex.parameters()]

    with kernels.use_backend(moe_permute="reference"):
        ref = run()
    with kernels.use_backend(moe_permute="triton"):
        got = run()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    assert got[0].dtype == dtype
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(got[3], ref[3]):
        torch.testing.assert_close(a, b, **tol)
