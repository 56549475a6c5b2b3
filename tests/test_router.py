"""The router selection operation `kernels.router_topk`: its specification `router_topk_ref`
(dsv3/kernels/reference.py) is the routing math `Router.forward` had before it called the op, and the
Triton kernel (dsv3/kernels/router_triton.py) run by the Triton interpreter on the CPU equals it.

Run: python -m pytest tests/test_router.py -q
The kernel tests need triton and the interpreter (skipped otherwise, e.g. in CI):

    TRITON_INTERPRET=1 python -m pytest tests/test_router.py -q

The GPU runs (every preset's shape, CUDA graphs, torch.compile, a model forward) are in
tests/test_gpu_router.py.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from conftest import needs_interpreter, tiny_cfg
from dsv3 import kernels
from dsv3.kernels import router_topk_ref
from dsv3.model import build_model
from dsv3.model.moe import Router

# (E, n_group, topk_group, K): the presets' routers, then edge shapes
PRESET_SHAPES = {"tiny": (16, 4, 2, 4), "small": (64, 8, 4, 6), "16b": (64, 1, 1, 6), "671b": (256, 8, 4, 8)}
SHAPES = list(PRESET_SHAPES.values()) + [
    (8, 4, 2, 2),  # tests/conftest.py's tiny_cfg
    (24, 3, 2, 5),  # neither E, n_group, E / n_group nor K a power of two
    (16, 4, 4, 6),  # every group kept: no group limit
    (8, 2, 1, 4),  # one group kept, K = its size
]


def _old_router_forward(r: Router, x_ND: torch.Tensor):
    """Router.forward as it was before the kernels op (commit dc7a3ac), verbatim."""
    N = x_ND.shape[0]
    s_NE = F.linear(x_ND.float(), r.weight.float()).sigmoid()
    sel_NE = s_NE + r.e_score_correction_bias
    if r.topk_group < r.n_group:
        g = sel_NE.view(N, r.n_group, -1)  # (N, G, E/G)
        group_score = g.topk(2, dim=-1).values.sum(-1)  # (N, G)
        keep = group_score.topk(r.topk_group, dim=-1).indices  # (N, topk_group)
        mask = torch.ones(N, r.n_group, dtype=torch.bool, device=x_ND.device).scatter_(1, keep, False)
        sel_NE = g.masked_fill(mask.unsqueeze(-1), float("-inf")).view(N, -1)
    idx_NK = sel_NE.topk(r.top_k, dim=-1).indices
    w_NK = s_NE.gather(1, idx_NK)
    if r.norm_topk_prob:
        w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
    return w_NK * r.scale, idx_NK, s_NE


def _router(E, G, tg, K, norm=True, scale=2.5, D=16, seed=0) -> Router:
    cfg = tiny_cfg(hidden_size=D, n_routed_experts=E, n_group=G, topk_group=tg, num_experts_per_tok=K,
                   routed_scaling_factor=scale, norm_topk_prob=norm)
    r = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g) * 0.5)
        r.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return r


def _inputs(N, E, seed):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(N, E, generator=g), 0.3 * torch.randn(E, generator=g)


# ------------------------------------------------------------------------------------------------
# the specification

@pytest.mark.parametrize("E,G,tg,K", SHAPES)
@pytest.mark.parametrize("norm", [True, False])
def test_router_forward_is_the_old_math_bitwise_with_gradients(E, G, tg, K, norm):
    """Router.forward through kernels.router_topk (the reference on the CPU) gives the outputs and the
    router-weight gradients of the pre-op code, bit for bit (a refactor that changes nothing)."""
    r = _router(E, G, tg, K, norm=norm, seed=E + G + K)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    got = r(x)
    want = _old_router_forward(r, x)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    up = torch.randn(40, K, generator=torch.Generator().manual_seed(2))
    # a loss through w (the expert mix) and s (the balance term), as in training
    (grad_got,) = torch.autograd.grad((got[0] * up).sum() + got[2].square().sum(), r.weight)
    (grad_want,) = torch.autograd.grad((want[0] * up).sum() + want[2].square().sum(), r.weight)
    assert torch.equal(grad_got, grad_want)


def test_router_topk_op_on_the_cpu_is_the_reference():
    logits, bias = _inputs(9, 64, seed=0)
    assert kernels.select_backend("router_topk", logits, bias) == "reference"
    got = kernels.router_topk(logits, bias, 6, 8, 4, True, 2.5)
    want = router_topk_ref(logits, bias, 6, 8, 4, True, 2.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(AssertionError, match="router_topk"):
        kernels.router_topk(logits, bias[:-1], 6, 8, 4, True, 2.5)
    with pytest.raises(AssertionError, match="router_topk"):
        kernels.router_topk(logits, bias, 9, 8, 1, True, 2.5)  # 9 experts from one group of 8
    with pytest.raises(AssertionError, match="router_topk"):
        kernels.router_topk(logits, bias, 6, 7, 4, True, 2.5)  # 64 experts not divisible into 7 groups


# ------------------------------------------------------------------------------------------------
# the Triton kernel, interpreted on the CPU



@pytest.fixture
def router_interpreted():
    # The kernel has no loop with run-time bounds, so the NumPy >= 2.4 workaround of
    # tests/test_mla_decode.py (triton-lang/triton#9171) is not needed here.
    from dsv3.kernels.router_triton import router_topk

    return router_topk


@needs_interpreter
@pytest.mark.parametrize("E,G,tg,K", SHAPES)
def test_triton_router_matches_reference(router_interpreted, E, G, tg, K):
    """Random logits and biases (no ties): the same experts in the same (descending) order, w and s to
    an ulp; N = 5 tokens as one program and as programs of 2 (the last one half empty)."""
    logits, bias = _inputs(5, E, seed=E * 10 + K)
    for norm, scale in ((True, 2.5), (False, 1.5)):
        w_ref, idx_ref, s_ref = router_topk_ref(logits, bias, K, G, tg, norm, scale)
        for block_m in (8, 2):
            w, idx, s = router_interpreted(logits, bias, K, G, tg, norm, scale, True, block_m)
            assert idx.dtype == torch.int64 and w.dtype == s.dtype == torch.float32
            assert torch.equal(idx, idx_ref), (norm, block_m)
            torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-7)


@needs_interpreter
def test_triton_router_ties_take_the_lowest_index_and_empty_input(router_interpreted):
    """The documented tie rule: all logits equal -> every group score ties, the lowest topk_group groups
    are kept and the lowest K experts of them chosen. N = 0 launches nothing."""
    logits, bias = torch.zeros(2, 16), torch.zeros(16)
    w, idx, _ = router_interpreted(logits, bias, 4, 4, 2, True, 2.0)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2 and torch.equal(w, torch.full((2, 4), 0.5))
    bias[[5, 6]] = 0.1  # group 1 now wins; its two boosted experts first, then its lowest ones
    _, idx, _ = router_interpreted(logits, bias, 4, 4, 2, True, 2.0)
    assert idx.tolist() == [[5, 6, 0, 1]] * 2
    _, idx2, s = router_interpreted(logits, bias, 4, 4, 2, True, 2.0, False)  # without s
    assert torch.equal(idx2, idx) and s.shape == (0, 16)
    w, idx, s = router_interpreted(torch.zeros(0, 16), bias, 4, 4, 2, True, 2.0)
    assert w.shape == idx.shape == (0, 4) and s.shape == (0, 16)


@needs_interpreter
def test_model_with_interpreted_kernel_equals_reference_forward_and_gradients():
    """A tiny model's training forward (balance term included) and backward with the router op forced
    to the kernel (interpreted) against the reference: the same experts everywhere (so identical
    expert counts), the same loss and router gradients up to an ulp (the kernel path recomputes w and s
    in torch from its idx when autograd records)."""
    model = build_model(tiny_cfg(), seed=0)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        out = model(ids, with_balance=True)
        loss = out.logits.float().square().mean() + out.balance
        loss.backward()
        grads = [r.weight.grad.clone() for r in model.modules() if isinstance(r, Router)]
        return out, grads

    ref_out, ref_grads = run()
    with kernels.use_backend(router_topk="triton"):
        out, grads = run()
    assert torch.equal(out.expert_counts, ref_out.expert_counts)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.balance, ref_out.balance, rtol=1e-6, atol=0)
    assert len(grads) == 3  # 2 MoE layers + the MTP module's
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-7)
    with torch.no_grad(), kernels.use_backend(router_topk="triton"):  # no autograd: the kernel's own w and s
        nograd = model(ids)
    torch.testing.assert_close(nograd.logits, ref_out.logits, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_router_op_traces_under_torch_compile(router_interpreted):
    """The custom op's fake implementation lets torch.compile (fullgraph; aot_eager, no code generation
    on the CPU) trace kernels.router_topk with autograd (training: w and s recomputed in torch, the
    reference's gradients) and without (decode: the kernel's own outputs)."""
    logits, bias = _inputs(5, 64, seed=0)
    logits.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def route(lg):
        w, idx, s = kernels.router_topk(lg * 2, bias, 6, 8, 4, True, 2.5, backend="triton")
        return (w * w).sum() + s.square().sum(), idx

    loss, idx = route(logits)
    (grad,) = torch.autograd.grad(loss, logits)
    w, idx_ref, s = router_topk_ref(logits * 2, bias, 6, 8, 4, True, 2.5)
    (grad_ref,) = torch.autograd.grad((w * w).sum() + s.square().sum(), logits)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        loss, idx = route(logits)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(loss, (w * w).sum() + s.square().sum(), rtol=1e-6, atol=0)
