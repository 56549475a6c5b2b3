"""The latent store and the W_UK head GEMV in one launch (dsv3/kernels/mla_prep_triton.py) on a GPU against the two
launches it replaces (latent_store_triton.launch with the query, head_gemv_triton.launch): bit for bit at the presets'
shapes (16b, 671B: C = 512, where both parts run with their own launches' warps), the latent within a rounding step
below C = 512 (4 warps sum its squares there, the store's own launch 1); compiled by inductor and replayed in a CUDA
graph; and a bf16 model's graphed (and compiled) decode step with it switched on against the same step with it off
(the store and the head GEMV on in both): the same logits bit for bit with a 512-wide latent. Run on the device
machine:

    python -m pytest tests/test_gpu_mla_prep.py -m gpu -q
"""

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import head_gemv_ref
from dsv3.model.rope import apply_rope
from tests.test_gpu_latent_store import _compiled_graph, _query_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (H, nope, C, P): 16b, 671b, small, and a ragged one
SHAPES = [(16, 128, 512, 64), (128, 128, 512, 64), (16, 64, 256, 32), (3, 40, 200, 6)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _case(M, H, nope, C, P, dtype, seed):
    """Caches, rows, kv_a, the norm weight, cos / sin (angles up to 100 rad), q_pe and q_nope (strided views of the q
    projection's output (M, H, nope + P)) and W_UKᵀ (H, C, nope) (a view of a kv_b_proj-like weight, read along C)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kv, pe, rows, kv_a, w, cos, sin, q = _query_case(M, H, P, nope, dtype, seed, C=C, g=g)
    kv_b = (torch.randn(H, nope + 128, C, device="cuda", generator=g) * 0.05).to(dtype)
    return kv, pe, rows, kv_a, w, cos, sin, q[..., nope:], q[..., :nope], kv_b[:, :nope].transpose(1, 2)


def _two_launches(kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t):
    from dsv3.kernels import head_gemv_triton as hg
    from dsv3.kernels import latent_store_triton as ls

    kv, pe = kv.clone(), pe.clone()
    q_rot = ls.launch(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe)
    return hg.launch(q_nope, w_uk_t), q_rot, kv, pe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,nope,C,P", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_merged_launch_is_the_two_launches(M, H, nope, C, P, dtype):
    """q_lat (the GEMV's FMAs kept under enable_fp_fusion=False: tl.fma), the rotated query and the shared key bit for
    bit the two launches'; the latent too at C = 512 (both parts with their own launches' 4 warps), within a rounding
    step below; and the contracts: the query's rotation apply_rope's bit for bit, q_lat the fp32 einsum's within 1%."""
    args = _case(M, H, nope, C, P, dtype, seed=M * H + C)
    kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = args
    want_lat, want_rot, want_kv, want_pe = _two_launches(*args)
    q_lat, q_rot = kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope, w_uk_t, backend="triton")
    assert q_lat.shape == (M, H, C) and q_rot.shape == (M, H, P) and q_lat.dtype == q_rot.dtype == dtype
    assert torch.equal(q_lat, want_lat) and torch.equal(q_rot, want_rot) and torch.equal(pe, want_pe)
    if C >= 512:
        assert torch.equal(kv, want_kv)
    else:
        assert torch.allclose(kv.float(), want_kv.float(), rtol=1e-2, atol=1e-2)
    assert not kv[0].any() and not kv[2].any()
    assert torch.equal(q_rot, apply_rope(q_pe[None], cos[None], sin[None])[0])
    assert _rel(q_lat, head_gemv_ref(q_nope, w_uk_t)) < 1e-2


def test_op_compiled_and_graph_replayed():
    """kernels.mla_prep under torch.compile (inductor, fullgraph), captured in a CUDA graph and replayed on new inputs
    (the 16b shapes, bf16, one row): the two launches' results on those inputs bit for bit, the caches written in
    place."""
    kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = _case(1, 16, 128, 512, 64, torch.bfloat16, seed=5)
    q = q_pe.new_empty(1, 16, 192)
    q[..., :128], q[..., 128:] = q_nope, q_pe

    def f(q, kv_a, cos, sin):
        q = q * 1
        return kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q[..., 128:], q[..., :128], w_uk_t,
                                backend="triton")

    g, (q_lat, q_rot) = _compiled_graph(f, q, kv_a, cos, sin)
    _, _, _, kv_a2, _, cos2, sin2, q_pe2, q_nope2, _ = _case(1, 16, 128, 512, 64, torch.bfloat16, seed=6)
    q[..., :128], q[..., 128:] = q_nope2, q_pe2
    kv_a.copy_(kv_a2), cos.copy_(cos2), sin.copy_(sin2)
    kv.zero_(), pe.zero_()
    g.replay()
    torch.cuda.synchronize()
    want_lat, want_rot, want_kv, want_pe = _two_launches(torch.zeros_like(kv), torch.zeros_like(pe), rows, kv_a2, w,
                                                         cos2, sin2, q_pe2, q_nope2, w_uk_t)
    assert torch.equal(q_lat, want_lat) and torch.equal(q_rot, want_rot)
    assert torch.equal(kv, want_kv) and torch.equal(pe, want_pe)


def _decode_model(kv_lora_rank: int):
    """test_gpu_expert_gemv's micro model and prompts (kv_lora_rank 64), or the same with another latent width."""
    import dsv3
    from dsv3.model.moe import Router
    from test_gpu_expert_gemv import decode_model_and_prompts

    m, prompts = decode_model_and_prompts()
    if kv_lora_rank == m.config.kv_lora_rank:
        return m, prompts
    cfg = m.config.replace(kv_lora_rank=kv_lora_rank)
    m = dsv3.build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    for r in m.modules():  # (the routing decode_model_and_prompts fixes: experts 12-15 for every token)
        if isinstance(r, Router):
            r.e_score_correction_bias.copy_(torch.arange(cfg.n_routed_experts, dtype=torch.float32))
    return m, prompts


@pytest.mark.parametrize("kv_lora_rank", [512, 64])
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_the_switch_on_matches_off(compile, kv_lora_rank, monkeypatch):
    """A bf16 model's CUDA-graph decode step (compiled or not; the store and the head GEMV on) with the merged launch
    switched on against the same step with it off, teacher-forced on the same prompts: with a 512-wide latent the
    logits bit for bit (the presets' width: each part with its own launch's warps), with a 64-wide one within 1%
    (the latent a rounding step apart at most); the merged launch ran for the bucket's 4 rows once a layer and the
    W_UK GEMV no more on its own (the head GEMV launched for W_UV only)."""
    # the shipped rule takes the head GEMV (and so the merged launch) at one row only (backend.DENSE_GEMV_ROWS); the
    # kernels hold more, and this test checks them at the bucket's 4
    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 4)
    from dsv3.kernels import head_gemv_triton as hg
    from dsv3.kernels import mla_prep_triton as mp
    from test_gpu_expert_gemv import graphed_step_logits

    m, prompts = _decode_model(kv_lora_rank)

    def step_logits(on: bool):
        old = kernels.set_mla_prep(on), kernels.set_latent_store(True), kernels.set_head_gemv(True)
        try:
            return graphed_step_logits(m, prompts, compile_decode=compile)
        finally:
            kernels.set_mla_prep(old[0]), kernels.set_latent_store(old[1]), kernels.set_head_gemv(old[2])

    launches, prep, gemv = [], mp.launch, hg.launch
    mp.launch = lambda *a: launches.append(("prep", a[4].shape[0])) or prep(*a)
    hg.launch = lambda x, w, config=None: launches.append(("gemv", hg.k_contiguous(w))) or gemv(x, w, config)
    try:
        ref = step_logits(False)
        assert ("gemv", False) in launches and not any(k == "prep" for k, _ in launches)
        launches.clear()
        got = step_logits(True)
    finally:
        mp.launch, hg.launch = prep, gemv
    L = m.config.num_hidden_layers
    assert set(launches) == {("prep", 4), ("gemv", True)}, launches
    assert launches.count(("prep", 4)) % L == 0 and launches.count(("prep", 4)) == launches.count(("gemv", True))
    if kv_lora_rank >= 512:
        assert torch.equal(got, ref)
    else:
        assert _rel(got, ref) < 1e-2 and (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3
