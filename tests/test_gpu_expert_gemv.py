"""The routed experts' decode GEMV (dsv3/kernels/expert_gemv_triton.py) on a GPU against its reference, the
Experts module's GEMV path against its grouped path, and a bf16 model's graphed decode through it. Run on the
device machine:

    python -m pytest tests/test_gpu_expert_gemv.py -m gpu -q
"""

import pytest
import torch

import dsv3
from dsv3 import kernels
from dsv3.kernels.reference import expert_gemv_ref, weight_quant
from dsv3.model.moe import Experts
from conftest import decode_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _stack(E, N, K, fp8, g):
    w = torch.randn(E, N, K, device="cuda", generator=g) * 0.05
    if not fp8:
        return w.bfloat16(), None
    qs = [weight_quant(w_e) for w_e in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


# the 16b model's routed experts (E=64, I=1408, D=2048, top-6) at batch 1 and 10; odd shapes with edges
@pytest.mark.parametrize("T,K_route,E,I,D", [(1, 6, 64, 1408, 2048), (10, 6, 64, 1408, 2048), (3, 2, 5, 200, 130)])
@pytest.mark.parametrize("fp8", [False, True])
def test_kernel_vs_reference(T, K_route, E, I, D, fp8):
    g = torch.Generator(device="cuda").manual_seed(T + E)
    (w1, s1), (w3, s3), (w2, s2) = _stack(E, I, D, fp8, g), _stack(E, I, D, fp8, g), _stack(E, D, I, fp8, g)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    expert = torch.randint(0, E, (T * K_route,), device="cuda", generator=g)
    expert[1] = -1  # a row this call does not own: 0
    h = kernels.expert_gemv(x, w1, s1, expert, K_route, up=w3, up_s=s3, backend="triton")
    h_ref = expert_gemv_ref(x, w1, s1, expert, K_route, w3, s3)
    assert h.shape == (T * K_route, I) and h.dtype == torch.bfloat16 and not h[1].any()
    assert _rel(h, h_ref) < 1e-2, _rel(h, h_ref)  # bf16 output rounding + summation order
    y = kernels.expert_gemv(h_ref, w2, s2, expert, 1, backend="triton")
    y_ref = expert_gemv_ref(h_ref, w2, s2, expert, 1)
    assert _rel(y, y_ref) < 1e-2, _rel(y, y_ref)


# PSUM (per-16-byte-group partial sums, each scaled once: expert_gemv_triton._dot_part) at the 16b shapes, in the
# configs bench/expert_gemv_sweep.py --psum tries (wide tiles, prefetch, 8 warps), a foreign row included
@pytest.mark.parametrize("BN,KU,warps,prefetch", [(32, 2, 4, False), (16, 4, 4, True), (32, 4, 8, True),
                                                  (8, 1, 4, True), (8, 16, 8, False), (16, 8, 8, False)])
@pytest.mark.parametrize("fp8", [False, True])
def test_psum_kernel_vs_reference(fp8, BN, KU, warps, prefetch):
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator(device="cuda").manual_seed(BN + KU)
    E, I, D, T, K_route = 64, 1408, 2048, 1, 6
    (w1, s1), (w3, s3), (w2, s2) = _stack(E, I, D, fp8, g), _stack(E, I, D, fp8, g), _stack(E, D, I, fp8, g)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    expert = torch.randint(0, E, (T * K_route,), device="cuda", generator=g)
    expert[1] = -1
    cfg = dict(BN=BN, KU=KU, num_warps=warps, PREFETCH=prefetch, PSUM=True)
    h = k.launch(x, w1, s1, expert, K_route, w3, s3, **cfg)
    h_ref = expert_gemv_ref(x, w1, s1, expert, K_route, w3, s3)
    assert not h[1].any() and _rel(h, h_ref) < 1e-2, _rel(h, h_ref)
    y = k.launch(h_ref, w2, s2, expert, 1, **cfg)
    assert _rel(y, expert_gemv_ref(h_ref, w2, s2, expert, 1)) < 1e-2


@pytest.mark.parametrize("fp8", [False, True])
def test_experts_gemv_path_vs_grouped(fp8, monkeypatch):
    from dsv3.model.fp8 import FP8Experts

    cfg = dsv3.preset("16b")
    m = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.02
    m = (FP8Experts.from_experts(m) if fp8 else m.bfloat16()).cuda()
    x = torch.randn(1, cfg.hidden_size, device="cuda").bfloat16()
    idx = torch.randperm(cfg.n_routed_experts, device="cuda")[:cfg.num_experts_per_tok][None]
    w = torch.rand(1, cfg.num_experts_per_tok, device="cuda")
    taken, orig = [], Experts.forward_gemv
    monkeypatch.setattr(Experts, "forward_gemv", lambda self, *a: taken.append(1) or orig(self, *a))
    with torch.no_grad():
        got = m(x, idx, w)  # "auto": the GEMV path (1 x 6 pairs <= 64 experts, bf16 x, CUDA)
        ref = m.forward_grouped(x, idx, w)
    assert taken == [1]
    assert _rel(got, ref) < 1e-2, _rel(got, ref)


def decode_model_and_prompts():
    """The bf16 micro model (16 experts top-4: a bucket of 4 rows has <= 16 pairs, the GEMV's limit) and the 3
    prompts of the graphed decode-step tests (here and tests/test_gpu_dense_gemv.py)."""
    cfg = dsv3.ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                           num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
                           kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                           n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                           max_position_embeddings=256, num_nextn_predict_layers=0, initializer_range=0.2)
    m = dsv3.build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    # Selection by the bias alone (expert e's bias e > every score in (0, 1)): each token takes experts 12-15, so
    # no bf16 rounding can flip a routing choice. Random routing made these comparisons fail on the H200
    # (2026-12-05): paths that differ only in rounding (cuBLAS against a GEMV, the grouped GEMM against the
    # decode GEMM) flipped one token's experts in a later layer and its logits moved 34-63%, in whichever row
    # the process's state happened to tip (the grouped GEMM itself matched an fp32 loop to 0.2% on every
    # shape tried). The gates still come from the scores; every token takes the same four experts (the grouped
    # decode GEMM's test, which needs varied groups, fixes another routing).
    from dsv3.model.moe import Router

    for r in m.modules():
        if isinstance(r, Router):
            r.e_score_correction_bias.copy_(torch.arange(cfg.n_routed_experts, dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    return m, [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 17, 40)]


def graphed_step_logits(m, prompts, **engine_kw) -> torch.Tensor:
    """Prefill `prompts` eagerly, then one teacher-forced CUDA-graph decode step (bucket 4): its logits (3, V),
    each row first checked against the uncached forward over the request's tokens (within 5%: bf16 paths), so
    that a failing comparison of two such steps says which of them is off. (Added after the GPU run of
    2026-12-05 where the non-compiled step's switched-on and switched-off logits differed by 34%; it showed
    routing near-ties, which decode_model_and_prompts now rules out.)"""
    logits, eng = decode_step(m, prompts, **{"max_batch_size": 4, **engine_kw})
    with torch.no_grad():
        for b, r in enumerate(eng.running):
            want = m(torch.tensor([r.tokens], device=logits.device)).logits[0, -1].float()
            rel = _rel(logits[b], want)
            assert rel < 5e-2, f"row {b} (a {len(r.prompt)}-token prompt): graphed step vs the uncached forward " \
                               f"{rel:.3f} ({engine_kw})"
    return logits


def test_graphed_decode_step_through_gemv_matches_grouped_path():
    """A bf16 model's CUDA-graph decode step with the GEMV experts against the same step with the grouped path
    (use_backend(expert_gemv="reference")), teacher-forced on the same prompts (free-running greedy tokens
    part after the first bf16 near-tie: the GEMV rounds silu(gate) * up once, the grouped path three times):
    logits within 2%, top-1 equal on at least 2 of 3 rows, and the GEMV path really ran in the graph."""
    m, prompts = decode_model_and_prompts()

    def step_logits():
        return graphed_step_logits(m, prompts)

    calls, orig = [], Experts.forward_gemv
    Experts.forward_gemv = lambda self, *a, **kw: calls.append(1) or orig(self, *a, **kw)
    try:
        got = step_logits()
    finally:
        Experts.forward_gemv = orig
    assert calls, "the decode step did not take the GEMV path"
    with kernels.use_backend(expert_gemv="reference"):
        ref = step_logits()
    assert _rel(got, ref) < 2e-2, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_the_shared_experts_in_the_gemv(compile, fp8):
    """kernels.set_shared_gemv: a CUDA-graph decode step (compiled or not, bf16 and FP8 weights) with the shared
    experts as more rows of the routed experts' GEMV launches against the shared MLP run as modules, teacher-forced
    on the same prompts: logits within 2%, top-1 equal on at least 2 of 3 rows, and the two-stack launches ran."""
    from dsv3.kernels import expert_gemv_triton as k

    m, prompts = decode_model_and_prompts()
    if fp8:
        from dsv3.checkpoints.hf import quantize_model_fp8

        quantize_model_fp8(m)
    old = kernels.set_shared_gemv(False)  # (the default holds it on for e4m3 weights)
    calls, real = [], k.launch
    try:
        ref = graphed_step_logits(m, prompts, compile_decode=compile)
        k.launch = lambda *a, **kw: calls.append(kw.get("extra") is not None) or real(*a, **kw)
        kernels.set_shared_gemv(True)
        got = graphed_step_logits(m, prompts, compile_decode=compile)
    finally:
        kernels.set_shared_gemv(old)
        k.launch = real
    assert any(calls), "the shared experts did not run inside the GEMV launches"
    assert _rel(got, ref) < 2e-2, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3


@pytest.mark.parametrize("fp8", [False, True])
def test_kernel_with_the_shared_stack_at_16b_shapes(fp8):
    """The two launches of a 16b MoE layer at batch 1 with its two shared experts as the second stack (views of the
    shared matrices, as MoE.shared_stacks makes them) against the reference on the stacks as one."""
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator(device="cuda").manual_seed(0)
    E, S, I, D = 64, 2, 1408, 2048
    gate, up = (torch.randn(E, I, D, device="cuda", generator=g) * 0.02 for _ in range(2))
    down = torch.randn(E, D, I, device="cuda", generator=g) * 0.02
    sg, su = (torch.randn(S * I, D, device="cuda", generator=g) * 0.02 for _ in range(2))
    sd = torch.randn(D, S * I, device="cuda", generator=g) * 0.02
    if fp8:
        def q(w):
            return weight_quant(w) if w.dim() == 2 else tuple(torch.stack(t) for t in zip(*map(weight_quant, w)))
        (gate, gs), (up, us), (down, ds) = q(gate), q(up), q(down)
        (sg, sgs), (su, sus), (sd, sds) = q(sg), q(su), q(sd)
        st = (sg.view(S, I, D), sgs.view(S, I // 128, D // 128), su.view(S, I, D), sus.view(S, I // 128, D // 128))
        sdn = (sd.view(D, S, I).transpose(0, 1), sds.view(D // 128, S, I // 128).transpose(0, 1), None, None)
    else:
        gate, up, down, sg, su, sd = (t.bfloat16() for t in (gate, up, down, sg, su, sd))
        gs = us = ds = None
        st = (sg.view(S, I, D), None, su.view(S, I, D), None)
        sdn = (sd.view(D, S, I).transpose(0, 1), None, None, None)
    x = torch.randn(1, D, device="cuda", generator=g).bfloat16()
    ids = torch.tensor([3, 17, 40, 41, 63, 0, E, E + 1], device="cuda")
    h = k.launch(x, gate, gs, ids, 8, up, us, extra=st)

    def cat(a, b):
        return None if a is None else torch.cat([a, b.contiguous()])
    want_h = expert_gemv_ref(x, cat(gate, st[0]), cat(gs, st[1]), ids, 8, cat(up, st[2]), cat(us, st[3]))
    assert _rel(h, want_h) < 1e-2, _rel(h, want_h)
    y = k.launch(h, down, ds, ids, 1, extra=sdn)
    want_y = expert_gemv_ref(h, cat(down, sdn[0]), cat(ds, sdn[1]), ids, 1)
    assert _rel(y, want_y) < 1e-2, _rel(y, want_y)
