"""The Triton router-selection kernel (dsv3/kernels/router_triton.py) on the GPU: against its
specification `router_topk_ref` at every preset's router shape, inside a CUDA graph and under
torch.compile (decode: no grad; training: gradients), and in model forwards / greedy decoding against
`kernels.use_backend(router_topk="reference")`. Run on the device machine:

    python -m pytest tests/test_gpu_router.py -m gpu -q

Skipped where no CUDA device is present (CI)."""

import warnings

import pytest
import torch

import dsv3
from dsv3 import kernels
from dsv3.config import preset
from dsv3.kernels import router_topk_ref
from dsv3.model.moe import Router

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _kernel_on():
    """router_topk is PENDING in backend.py (automatic choice: reference) until these tests pass on a GPU:
    every test here runs with the kernel chosen, its reference side forcing "reference" inside."""
    with kernels.use_backend(router_topk="triton"):
        yield

PRESETS = ("tiny", "small", "16b", "671b")


def _kernel():
    if not kernels.backend_available("router_topk"):
        pytest.skip("needs triton")
    from dsv3.kernels.router_triton import router_topk

    return router_topk


def _shape(name):
    c = preset(name)
    return dict(top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
                norm_topk_prob=c.norm_topk_prob, scale=c.routed_scaling_factor), c.n_routed_experts


def _inputs(N, E, seed):
    """Logits spread like a trained router's (std 2) and a correction bias of a few γ-steps."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (2 * torch.randn(N, E, device="cuda", generator=g),
            0.05 * torch.randn(E, device="cuda", generator=g))


def _robust_rows(logits, bias, top_k, n_group, topk_group, margin=1e-5, **_):
    """(N,) bool: tokens whose reference selection is decided by more than `margin` (the kept groups'
    scores vs the first dropped one, the K-th chosen sel vs the (K+1)-th): there an ulp of difference
    in s cannot change the chosen set."""
    N, E = logits.shape
    sel = logits.sigmoid() + bias
    ok = torch.ones(N, dtype=torch.bool, device=logits.device)
    if topk_group < n_group:
        gs = sel.view(N, n_group, -1).topk(2, -1).values.sum(-1).sort(-1, descending=True).values
        ok &= gs[:, topk_group - 1] - gs[:, topk_group] > margin
        keep = sel.view(N, n_group, -1).topk(2, -1).values.sum(-1).topk(topk_group, -1).indices
        mask = torch.ones(N, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
        sel = sel.view(N, n_group, -1).masked_fill(mask[..., None], float("-inf")).view(N, E)
    v = sel.sort(-1, descending=True).values  # the (K+1)-th may be -inf (masked): then decided
    return ok & (v[:, top_k - 1] - v[:, top_k] > margin)


def _check(got, want, robust):
    w, idx, s = got
    w_ref, idx_ref, s_ref = want
    assert idx.dtype == torch.int64 and w.dtype == s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-7)
    if not torch.equal(s, s_ref):  # designed to be bitwise (libdevice expf + IEEE division, module docstring)
        warnings.warn("router kernel: s is not bitwise torch's CUDA sigmoid; near-ties may choose differently")
    assert robust.sum() >= 0.95 * robust.numel() - 1
    assert torch.equal(idx[robust], idx_ref[robust])
    same = (idx == idx_ref).all(-1)
    torch.testing.assert_close(w[same], w_ref[same], rtol=1e-5, atol=1e-6)
    return same


@pytest.mark.parametrize("N", [1, 7, 4096])
@pytest.mark.parametrize("name", PRESETS)
def test_router_kernel_vs_reference(name, N):
    """Every preset's router shape: the same experts in the same order on every token whose choice is
    not a near-tie (with bitwise s: every token), w to an ulp, s equal."""
    router_topk = _kernel()
    kw, E = _shape(name)
    logits, bias = _inputs(N, E, seed=N + E)
    got = router_topk(logits, bias, kw["top_k"], kw["n_group"], kw["topk_group"], kw["norm_topk_prob"], kw["scale"])
    want = router_topk_ref(logits, bias, **kw)
    same = _check(got, want, _robust_rows(logits, bias, **kw))
    assert same.sum() >= 0.999 * N - 1, same.sum()


@pytest.mark.parametrize("block_m,num_warps", [(1, 1), (2, 1), (4, 2), (8, 4)])
def test_router_kernel_launch_configs(block_m, num_warps):
    """The benchmark's launch configurations compute the same thing (671B shape, N not a multiple)."""
    router_topk = _kernel()
    kw, E = _shape("671b")
    logits, bias = _inputs(333, E, seed=3)
    got = router_topk(logits, bias, kw["top_k"], kw["n_group"], kw["topk_group"], kw["norm_topk_prob"], kw["scale"],
                      True, block_m, num_warps)
    _check(got, router_topk_ref(logits, bias, **kw), _robust_rows(logits, bias, **kw))


@torch.no_grad()
def test_router_op_in_cuda_graph_and_compile():
    """kernels.router_topk captured once, replayed after the logits changed in place: the new answer.
    torch.compile (fullgraph, decode-like: no grad) traces through the custom op to the eager result."""
    _kernel()
    kw, E = _shape("671b")
    logits, bias = _inputs(4, E, seed=11)
    assert kernels.select_backend("router_topk", logits, bias) == "triton"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernels.router_topk(logits, bias, **kw)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.router_topk(logits, bias, **kw)
    logits.copy_(_inputs(4, E, seed=12)[0])
    graph.replay()
    _check(out, router_topk_ref(logits, bias, **kw), _robust_rows(logits, bias, **kw))

    @torch.compile(fullgraph=True)
    def route(logits):
        return kernels.router_topk(logits * 2, bias, **kw)

    eager = kernels.router_topk(logits * 2, bias, **kw)
    for a, b in zip(route(logits), eager):
        assert torch.equal(a, b)


def _router(name, D=128, seed=0):
    c = preset(name).replace(hidden_size=D)
    r = Router(c).cuda()
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, device="cuda", generator=g) / D ** 0.5 * 2)
        r.e_score_correction_bias.copy_(0.05 * torch.randn(r.weight.shape[0], device="cuda", generator=g))
    return r


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", ["16b", "671b"])
def test_router_gradients_kernel_vs_reference(name, compiled):
    """Training: Router.forward with the kernel (w and s recomputed in torch from its idx) gives the
    reference's outputs and router-weight gradients, eager and under torch.compile (fullgraph)."""
    _kernel()
    r = _router(name)
    x = torch.randn(256, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    up = torch.randn(256, r.top_k, device="cuda")

    def loss_of(r, x):
        w, idx, s = r(x)
        return (w * up).sum() + (s / s.sum(-1, keepdim=True)).square().sum(), idx

    fn = torch.compile(loss_of, fullgraph=True) if compiled else loss_of
    loss, idx = fn(r, x)
    (grad,) = torch.autograd.grad(loss, r.weight)
    with kernels.use_backend(router_topk="reference"):
        ref_loss, ref_idx = loss_of(r, x)
        (ref_grad,) = torch.autograd.grad(ref_loss, r.weight)
    assert torch.equal(idx, ref_idx)  # random inputs: no near-ties at these sizes
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def _cfg():
    return dsv3.ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                            num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=64, num_experts_per_tok=6,
                            n_group=8, topk_group=4, max_position_embeddings=256, rope_scaling=None,
                            num_nextn_predict_layers=1, initializer_range=0.2)


def test_model_forward_kernel_vs_reference_identical_idx():
    """A model's training forward (fp32, balance term, MTP) with the router kernel and with
    use_backend(router_topk="reference"): identical idx in every MoE layer (captured by hooks), hence
    identical expert counts; logits and balance equal up to rounding; gradients close."""
    _kernel()
    m = dsv3.build_model(_cfg(), device="cuda", seed=0)
    ids = torch.randint(0, 512, (4, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    routers = [mod for mod in m.modules() if isinstance(mod, Router)]
    seen = []
    hooks = [r.register_forward_hook(lambda mod, args, out: seen.append(out[1].clone())) for r in routers]

    def run():
        seen.clear()
        m.zero_grad()
        out = m(ids, with_balance=True)
        (out.logits.square().mean() + out.balance).backward()
        return out, list(seen), [r.weight.grad.clone() for r in routers]

    out, idx, grads = run()
    with kernels.use_backend(router_topk="reference"):
        ref, ref_idx, ref_grads = run()
    for h in hooks:
        h.remove()
    assert len(idx) == len(routers) == 3  # 2 MoE layers + MTP
    assert all(torch.equal(a, b) for a, b in zip(idx, ref_idx))
    assert torch.equal(out.expert_counts, ref.expert_counts)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.balance, ref.balance, rtol=1e-5, atol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_graph_decode_greedy_router_kernel_vs_reference(compile_decode):
    """Greedy decoding through the CUDA-graph decode step (compiled or not), router kernel against the
    reference router (use_backend while the buckets are built): the same tokens. bf16, as the graphed
    step needs (an fp32 model's experts take the host-syncing per-expert loop, which the engine refuses
    to capture); an ulp of difference in w (the kernel sums the K gates in another order) could flip a
    greedy token only through an exact bf16 logit tie, which these random prompts do not meet."""
    from dsv3.inference.engine import Engine, SamplingParams

    _kernel()
    m = dsv3.build_model(_cfg().replace(num_nextn_predict_layers=0), device="cuda", seed=0).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 40, 1)]
    sp = [SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True) for _ in prompts]
    with kernels.use_backend(router_topk="reference"):
        a = Engine(m, None, max_batch_size=4, cuda_graphs=True, compile_decode=compile_decode).generate(prompts, sp)
    b = Engine(m, None, max_batch_size=4, cuda_graphs=True, compile_decode=compile_decode).generate(prompts, sp)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
