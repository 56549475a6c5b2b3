"""The fused latent store (dsv3/kernels/latent_store_triton.py) on a GPU against its reference at the presets'
shapes, and a bf16 model's graphed (and compiled) decode step with it switched on against the same step with it
off (and with every decode switch on: dense GEMV, per-head GEMV, fused store). Run on the device machine:

    python -m pytest tests/test_gpu_latent_store.py -m gpu -q
"""

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import store_latents_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("C,P", [(512, 64), (256, 32), (64, 16), (100, 6)])
@pytest.mark.parametrize("M", [1, 4, 12])
def test_kernel_vs_reference(M, C, P):
    g = torch.Generator(device="cuda").manual_seed(M + C)
    kv = torch.zeros(3, 64, C, device="cuda", dtype=torch.bfloat16)
    pe = torch.zeros(3, 64, P, device="cuda", dtype=torch.bfloat16)
    kv_a = torch.randn(M, C + P, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(C, device="cuda", generator=g)).bfloat16()
    ang = torch.rand(M, P // 2, device="cuda", generator=g) * 100
    rows = torch.randperm(64, device="cuda", generator=g)[:M]
    kv2, pe2 = kv.clone(), pe.clone()
    store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, ang.cos(), ang.sin())
    kernels.store_latents(kv2, pe2, 1, rows, kv_a, w, 1e-6, ang.cos(), ang.sin(), backend="triton")
    # bf16 outputs: equal or one rounding step apart (the sum of squares and the rotation in another order)
    assert torch.allclose(kv2.float(), kv.float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(pe2.float(), pe.float(), rtol=1e-2, atol=1e-2)
    assert not kv2[0].any() and not kv2[2].any()


@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_the_switch_on_matches_off(compile, monkeypatch):
    # the shipped rule takes the dense / head GEMVs at one row only (backend.DENSE_GEMV_ROWS: faster than cuBLAS
    # there); the kernels hold up to 4 rows, and this test checks them at the bucket's 4
    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 4)
    from dsv3.kernels import latent_store_triton as k
    from test_gpu_expert_gemv import decode_model_and_prompts, graphed_step_logits

    m, prompts = decode_model_and_prompts()

    def step_logits(store: bool, others: bool = False):
        old = kernels.set_latent_store(store), kernels.set_dense_gemv(others), kernels.set_head_gemv(others)
        try:
            return graphed_step_logits(m, prompts, compile_decode=compile)
        finally:
            kernels.set_latent_store(old[0]), kernels.set_dense_gemv(old[1]), kernels.set_head_gemv(old[2])

    ref = step_logits(False)
    launches, launch = [], k.launch
    k.launch = lambda kv, pe, slot, rows, kv_a, *a: launches.append(kv_a.shape[0]) or launch(kv, pe, slot, rows,
                                                                                              kv_a, *a)
    try:
        got = step_logits(True)
        every = step_logits(True, others=True)
    finally:
        k.launch = launch
    assert launches and set(launches) == {4} and len(launches) % m.config.num_hidden_layers == 0, launches
    for y in (got, every):
        assert ((y - ref).norm() / ref.norm()).item() < 2e-2
        assert (y.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3
