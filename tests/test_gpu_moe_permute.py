"""The training MoE's row-permutation kernels (dsv3/kernels/moe_permute_triton.py) on the GPU: against their
references at the presets' training shapes, through Experts.forward_grouped compiled, and in a model's training
step against `kernels.use_backend(moe_permute="reference")`. Run on the device machine:

    python -m pytest tests/test_gpu_moe_permute.py -m gpu -q

Skipped where no CUDA device is present (CI)."""

import pytest
import torch

from dsv3 import kernels
from dsv3.config import ModelConfig
from dsv3.kernels import moe_combine_bwd_ref, moe_combine_ref, moe_gather_ref
from dsv3.model import build_model
from dsv3.model.moe import Experts
from tests.conftest import tiny_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _mp():
    if not kernels.backend_available("moe_permute"):
        pytest.skip("needs triton")
    from dsv3.kernels import moe_permute_triton as mp

    return mp


def _routing(N, E, K, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.rand(N, E, device="cuda", generator=g).topk(K, dim=-1).indices
    order = idx.reshape(-1).argsort(stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device="cuda"))
    return idx, order, inv, g


@pytest.mark.parametrize("N,D,K,E", [(16384, 1024, 6, 64), (8192, 2048, 6, 64), (4096, 7168, 4, 16),
                                     (1000, 7168, 8, 256), (3, 40, 2, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_vs_references(N, D, K, E, dtype):
    mp = _mp()
    _, order, inv, g = _routing(N, E, K, N + D)
    inv_NK = inv.view(N, K)
    x = torch.randn(N, D, device="cuda", generator=g).to(dtype)
    y = torch.randn(N * K, D, device="cuda", generator=g).to(dtype)
    w = torch.rand(N, K, device="cuda", generator=g) * 2.5
    gout = torch.randn(N, D, device="cuda", generator=g).to(dtype)
    assert torch.equal(mp.moe_gather(x, order, K), moe_gather_ref(x, order, K))
    tight = dict(rtol=1e-6, atol=1e-5)
    # fp32 out: the same products and an fp32 sum in another order; 16-bit out: at most a rounding step apart
    torch.testing.assert_close(mp.moe_combine(y, inv_NK, w, torch.float32), moe_combine_ref(y, inv_NK, w, torch.float32),
                               **tight)
    torch.testing.assert_close(mp.moe_combine(y, inv_NK, w), moe_combine_ref(y, inv_NK, w),
                               **(tight if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)))
    torch.testing.assert_close(mp.moe_combine(y, inv_NK), moe_combine_ref(y, inv_NK),
                               **(tight if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)))
    gy, gw = mp.moe_combine_bwd(gout, y, inv_NK, w)
    gy_ref, gw_ref = moe_combine_bwd_ref(gout, y, inv_NK, w)
    assert torch.equal(gy, gy_ref)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("compiled", [False, True])
def test_forward_grouped_with_the_kernels(compiled):
    """The grouped experts' forward and backward (bf16, the training path) with the kernels against without, eager
    and compiled (the custom ops inside a compiled autograd.Function)."""
    _mp()
    cfg = ModelConfig(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    ex = Experts(cfg).cuda()
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ex = ex.to(torch.bfloat16)
    idx, _, _, g = _routing(2048, 16, 4, 1)
    x0 = torch.randn(2048, 256, device="cuda", generator=g).to(torch.bfloat16)
    w0 = torch.rand(2048, 4, device="cuda", generator=g)
    gout = torch.randn(2048, 256, device="cuda", generator=g).to(torch.bfloat16)
    fwd = torch.compile(ex.forward_grouped) if compiled else ex.forward_grouped

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        y = fwd(x, idx, w)
        y.backward(gout)
        return [y, x.grad, w.grad] + [p.grad for p in ex.parameters()]

    with kernels.use_backend(moe_permute="reference"):
        ref = run()
    torch._dynamo.reset()
    with kernels.use_backend(moe_permute="triton"):
        got = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 5e-3


def test_model_training_step_with_the_kernels():
    """A micro model's bf16-autocast training step: loss and every gradient with the kernels against without."""
    _mp()
    cfg = tiny_cfg(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
                   n_group=4, topk_group=2, initializer_range=0.02)
    tokens = torch.randint(0, cfg.vocab_size, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step():
        torch.manual_seed(0)
        model = build_model(cfg, device="cuda", dtype=torch.float32)
        model.set_experts_impl("grouped")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with kernels.use_backend(moe_permute="reference"):
        l_ref, g_ref = step()
    with kernels.use_backend(moe_permute="triton"):
        l_k, g_k = step()
    torch.testing.assert_close(l_k, l_ref, rtol=1e-3, atol=1e-3)
    assert g_k.keys() == g_ref.keys()
    for n in g_ref:
        rel = ((g_k[n].float() - g_ref[n].float()).norm() / g_ref[n].float().norm().clamp_min(1e-12)).item()
        assert rel < 2e-2, (n, rel)
