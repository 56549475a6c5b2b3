"""The routed experts' grouped decode GEMM (dsv3/kernels/moe_gemm_triton.py) on a GPU against its reference at
the 16b and 671b expert shapes (bf16 and FP8 weights, decode batches 8-128), and a bf16 model's graphed decode
step at batch 8 (more pairs than experts) with it switched on against the same step with it off. Run on the
device machine:

    python -m pytest tests/test_gpu_moe_gemm.py -m gpu -q
"""

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels.reference import moe_gemm_ref, weight_quant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("E,D,I,K", [(64, 2048, 1408, 6), (32, 7168, 2048, 8)])
@pytest.mark.parametrize("T", [8, 32, 128])
def test_both_launches_vs_reference(T, E, D, I, K, fp8):
    g = torch.Generator(device="cuda").manual_seed(T + E)
    dev = "cuda"

    def stack(N, Kd):
        w = torch.randn(E, N, Kd, device=dev, generator=g) * 0.03
        if not fp8:
            return w.bfloat16(), None
        qs = [weight_quant(w_e) for w_e in w]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    (gw, gs), (uw, us), (dw, ds) = stack(I, D), stack(I, D), stack(D, I)
    x = torch.randn(T, D, device=dev, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, device=dev, generator=g)[:K] for _ in range(T)])
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    h = kernels.moe_gemm_swiglu(x, gw, gs, uw, us, offs, order // K, backend="triton")
    h_ref = moe_gemm_ref(x, gw, gs, offs, T * K, x_rows=order // K, up=uw, up_s=us)
    assert _rel(h, h_ref) < 1e-2, _rel(h, h_ref)
    y = kernels.moe_gemm_down(h_ref, dw, ds, offs, order, backend="triton")
    y_ref = moe_gemm_ref(h_ref, dw, ds, offs, T * K, y_rows=order)
    assert _rel(y, y_ref) < 1e-2, _rel(y, y_ref)


@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_the_switch_on_matches_off(compile, monkeypatch):
    """Batch 8 of the micro model (16 experts top-4: 32 pairs, above the per-row GEMV's limit) through the grouped
    decode GEMM against torch._grouped_mm, teacher-forced: logits within 2%, top-1 mostly equal, the kernel ran.
    Routing is fixed and varies by row (row t takes experts (5t + 3j) % 16, j < 4: groups of unequal sizes, each
    gathering other tokens), so that rounding cannot flip a choice and the kernel's gather of each expert's tokens
    is exercised (the helper's bias routing would send every token to the same four experts)."""
    from dsv3.kernels import moe_gemm_triton as k
    from dsv3.model.moe import Router
    from conftest import decode_step
    from test_gpu_expert_gemv import decode_model_and_prompts

    forward = Router.forward

    def fixed(self, x_ND):
        w, idx, s = forward(self, x_ND)
        t = torch.arange(idx.shape[0], device=idx.device)[:, None]
        j = torch.arange(idx.shape[1], device=idx.device)[None]
        return w, (5 * t + 3 * j) % s.shape[1], s

    monkeypatch.setattr(Router, "forward", fixed)
    m, prompts = decode_model_and_prompts()
    g = torch.Generator().manual_seed(5)
    prompts = prompts + [torch.randint(0, m.config.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 23, 30, 8)]

    decoding = []  # launches count from here: the prefill's (36+ pairs) would take the kernel too

    def step_logits(on: bool):
        old = kernels.set_moe_gemm(on)
        try:
            return decode_step(m, prompts, after_prefill=lambda: decoding.append(True), max_batch_size=8,
                               compile_decode=compile)[0]
        finally:
            kernels.set_moe_gemm(old)

    ref = step_logits(False)
    launches, launch = [], k.launch
    k.launch = lambda *a, **kw: (launches.append(1) if decoding[1:] else None) or launch(*a, **kw)
    try:
        got = step_logits(True)
    finally:
        k.launch = launch
    assert launches  # in the decode step's capture (after the second engine's prefill)
    assert _rel(got, ref) < 2e-2, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 6 / 8
