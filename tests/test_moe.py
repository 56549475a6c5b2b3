"""DeepSeekMoE: routing against an independent loop reference (SPEC §4.1), grouped vs loop experts,
the sequence-wise balance loss (paper eqs. 17–20), the bias sign rule, MaxVio and expert counts.

Run: python -m pytest tests/test_moe.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3.model.moe import Experts, MoE, Router, max_violation, sequence_balance, update_expert_bias
from conftest import capture_router_io, make_model, rand_ids, tiny_cfg


# ------------------------------------------------------------------------------------------------
# (a) routing vs a hand-written reference

def ref_route(x, W, b, n_group, topk_group, top_k, scale, norm=True, margin_check=True):
    """SPEC §4.1 with Python loops, in float64. Returns, per token, {expert: weight} and the kept groups."""
    x, W, b = x.detach().double(), W.detach().double(), b.detach().double()
    N, E = x.shape[0], W.shape[0]
    P = E // n_group
    out, kept_groups = [], []
    for n in range(N):
        s = [1.0 / (1.0 + math.exp(-float(x[n] @ W[e]))) for e in range(E)]  # sigmoid affinities
        sel = [s[e] + float(b[e]) for e in range(E)]  # bias only for selection
        gscore = [sum(sorted(sel[g * P:(g + 1) * P], reverse=True)[:2]) for g in range(n_group)]
        order_g = sorted(range(n_group), key=lambda g: -gscore[g])
        kept = order_g[:topk_group]
        cand = sorted((e for e in range(E) if e // P in kept), key=lambda e: -sel[e])
        chosen = cand[:top_k]
        if margin_check:  # the case must be tie-free for the comparison to be well defined
            if topk_group < n_group:
                assert gscore[order_g[topk_group - 1]] - gscore[order_g[topk_group]] > 1e-5
            if len(cand) > top_k:
                assert sel[cand[top_k - 1]] - sel[cand[top_k]] > 1e-5
        w = [s[e] for e in chosen]
        tot = sum(w) if norm else 1.0
        out.append({e: v / tot * scale for e, v in zip(chosen, w)})
        kept_groups.append(set(kept))
    return out, kept_groups


@torch.no_grad()
def route(r, x):
    return r(x)


def make_router(E, G, topk_group, K, D=16, scale=2.5, norm=True, seed=0, w_std=1.0, bias_std=0.5):
    cfg = tiny_cfg(hidden_size=D, n_routed_experts=E, n_group=G, topk_group=topk_group, num_experts_per_tok=K,
                   routed_scaling_factor=scale, norm_topk_prob=norm)
    r = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g) * w_std / math.sqrt(D))
        r.e_score_correction_bias.copy_(torch.randn(E, generator=g) * bias_std)
    return r


@pytest.mark.parametrize("E, G, topk_group, K, bias_std", [
    (8, 4, 2, 2, 0.5),
    (16, 4, 2, 4, 0.5),
    (16, 8, 3, 5, 1.0),
    (12, 3, 1, 3, 0.3),
    (8, 1, 1, 3, 0.5),  # a single group: plain top-k
    (16, 4, 4, 6, 0.5),  # every group kept
    (16, 4, 2, 4, 0.0),  # no bias
])
@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_loop_reference(E, G, topk_group, K, bias_std, norm):
    r = make_router(E, G, topk_group, K, norm=norm, bias_std=bias_std, seed=E * 100 + G * 10 + K)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    w, idx, s = route(r, x)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and s.shape == (64, E)
    assert torch.allclose(s, torch.sigmoid(x @ r.weight.T), atol=1e-6)
    ref, kept = ref_route(x, r.weight.detach(), r.e_score_correction_bias, G, topk_group, K, 2.5, norm)
    for n in range(64):
        got = {int(e): float(v) for e, v in zip(idx[n], w[n])}
        assert set(got) == set(ref[n]), f"token {n}: {sorted(got)} vs {sorted(ref[n])}"
        for e in got:
            assert got[e] == pytest.approx(ref[n][e], abs=1e-5)
        assert all(e // (E // G) in kept[n] for e in got)
    if norm:
        assert torch.allclose(w.sum(-1), torch.full((64,), 2.5), atol=1e-5)


def test_bias_changes_selection_but_not_weights_formula():
    """The same router with and without bias: selections differ for some tokens, and the weights are
    always the unbiased sigmoid scores of whatever was selected."""
    r = make_router(16, 4, 2, 4, bias_std=0.5, seed=3)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    w_b, idx_b, s = route(r, x)
    with torch.no_grad():
        r.e_score_correction_bias.zero_()
    w_0, idx_0, _ = route(r, x)
    differs = [set(a.tolist()) != set(b.tolist()) for a, b in zip(idx_b, idx_0)]
    assert any(differs)
    expect = s.gather(1, idx_b)
    assert torch.allclose(w_b, expect / expect.sum(-1, keepdim=True) * 2.5, atol=1e-6)


def _adversarial_router():
    """2 groups of 4 experts, keep 1 group, top-3. x = e_0 so that logits = W[:, 0].
    Biased scores: group 0 = [0.9, 0.8, -0.5, -0.6] (top-2 sum 1.7), group 1 = all 0.4 (sum 0.8).
    Group 0 is kept, and its 3rd expert has a negative biased score: a 0.0 fill of the masked group
    (old HF) would choose an expert of group 1 instead."""
    cfg = tiny_cfg(hidden_size=4, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3)
    r = Router(cfg)
    logits = torch.tensor([2.0, 1.0, 0.5, -0.5, 0.0, 0.3, -0.3, 0.1])
    s = torch.sigmoid(logits)
    target = torch.tensor([0.9, 0.8, -0.5, -0.6, 0.4, 0.4, 0.4, 0.4])
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = logits
        r.e_score_correction_bias.copy_(target - s)
    x = torch.zeros(1, 4)
    x[0, 0] = 1.0
    return r, x, s, target


def test_router_negative_biased_scores_never_pick_masked_group():
    r, x, s, target = _adversarial_router()
    w, idx, _ = route(r, x)
    assert sorted(idx[0].tolist()) == [0, 1, 2]
    # what a 0.0 fill would do (proves the case is adversarial)
    zero_fill = target.clone()
    zero_fill[4:] = 0.0
    assert set(zero_fill.topk(3).indices.tolist()) & {4, 5, 6, 7}
    expect = s[[0, 1, 2]] / s[[0, 1, 2]].sum() * 2.5
    got = {int(e): float(v) for e, v in zip(idx[0], w[0])}
    for e, v in zip([0, 1, 2], expect.tolist()):
        assert got[e] == pytest.approx(v, abs=1e-6)


def test_router_strongly_negative_biases_stay_in_kept_groups():
    """Random routers whose biased scores are all negative: never an expert outside the kept groups."""
    for seed in range(5):
        r = make_router(16, 4, 2, 6, bias_std=0.3, seed=seed)
        with torch.no_grad():
            r.e_score_correction_bias.sub_(2.0)  # every s + b < 0
        x = torch.randn(48, 16, generator=torch.Generator().manual_seed(seed))
        w, idx, _ = route(r, x)
        ref, kept = ref_route(x, r.weight.detach(), r.e_score_correction_bias, 4, 2, 6, 2.5)
        for n in range(48):
            assert {int(e) // 4 for e in idx[n]} <= kept[n]
            assert set(idx[n].tolist()) == set(ref[n])
            assert len(set(idx[n].tolist())) == 6


def test_router_fp32_in_bf16_model():
    r = make_router(8, 4, 2, 2)
    r = r.to(torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16 and r.e_score_correction_bias.dtype == torch.float32
    w, idx, s = route(r, torch.randn(5, 16).to(torch.bfloat16))
    assert w.dtype == torch.float32 and s.dtype == torch.float32


def test_router_fp32_under_autocast():
    """Training's bf16 / fp8 precision runs under bf16 autocast, which casts F.linear's fp32 operands down: the
    router's logits, affinities and gates stay fp32 there (SPEC §4.1), equal to the same routing without
    autocast, gradients included; before, they came out in bf16."""
    r = make_router(8, 4, 2, 2)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert r.logits(x).dtype == torch.float32
        w, idx, s = r(x)
    assert w.dtype == s.dtype == torch.float32
    x0 = x.detach().clone().requires_grad_(True)
    w0, idx0, s0 = r(x0)
    assert torch.equal(idx, idx0) and torch.equal(w, w0) and torch.equal(s, s0)
    g = torch.randn_like(w)
    gx, gw = torch.autograd.grad((w * g).sum(), (x, r.weight))
    gx0, gw0 = torch.autograd.grad((w0 * g).sum(), (x0, r.weight))
    assert torch.equal(gx, gx0) and torch.equal(gw, gw0)


# ------------------------------------------------------------------------------------------------
# (b) grouped experts == loop experts, forward and backward

def _experts(E=8, D=16, I=12, seed=0):
    cfg = tiny_cfg(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, n_group=1, topk_group=1)
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ex


@pytest.mark.parametrize("idx", [
    # experts 0, 4, 5 and the last one (7) receive no tokens
    [[1, 2], [2, 3], [1, 3], [6, 2], [3, 1], [2, 6], [1, 2], [3, 2], [6, 1], [2, 3]],
    # a single expert gets everything; first and last empty
    [[3, 4], [3, 5], [3, 1], [3, 2], [6, 3]],
    # all experts used, one token
    [[7, 0]],
])
def test_grouped_equals_loop_forward_and_grads(idx):
    ex = _experts()
    idx = torch.tensor(idx)
    N = idx.shape[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, 16, generator=g, requires_grad=True)
    w = torch.rand(N, idx.shape[1], generator=g, requires_grad=True)
    params = [x, w, ex.gate_proj, ex.up_proj, ex.down_proj]
    ya = ex.forward_grouped(x, idx, w)
    yb = ex.forward_loop(x, idx, w)
    assert torch.allclose(ya, yb, atol=1e-5, rtol=1e-5)
    probe = torch.randn(ya.shape, generator=g)
    ga = torch.autograd.grad((ya * probe).sum(), params)
    gb = torch.autograd.grad((yb * probe).sum(), params)
    for name, a, b in zip(["x", "w", "gate", "up", "down"], ga, gb):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    # unused experts get exactly zero gradient, used ones a non-zero gradient
    used = set(idx.flatten().tolist())
    for e in range(8):
        assert (ga[2][e].abs().sum() > 0) == (e in used)
    # and the loop result equals a per-token hand computation
    for n in range(N):
        y = torch.zeros(16)
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            h = F.silu(ex.gate_proj[e] @ x[n]) * (ex.up_proj[e] @ x[n])
            y = y + w[n, k] * (ex.down_proj[e] @ h)
        assert torch.allclose(yb[n], y, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_forward_partial_sums_to_forward_over_any_split(impl, fp8):
    """The expert-parallel decode path: rank r's module holds a slice of the experts and computes the
    pairs routed to them (`forward_partial`, ids shifted so the slice is 0..L-1, foreign ids outside);
    the partials of a split add up to the whole module's forward, and a slice that holds none of the
    selected experts gives exactly 0 (foreign rows' outputs never leak, also through per-row FP8)."""
    from dsv3.model.fp8 import swap_to_fp8

    E = 8
    idx = torch.tensor([[1, 2], [2, 3], [1, 3], [6, 2], [3, 1], [2, 6], [7, 0], [3, 2], [6, 1]])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(idx.shape[0], 16, generator=g)
    w = torch.rand(idx.shape, generator=g)
    full = _experts(E)
    if fp8:
        holder = torch.nn.ModuleDict({"e": full})
        swap_to_fp8(holder, ["e.gate_proj", "e.up_proj", "e.down_proj"], quantize=True)
        full = holder["e"]
        assert type(full).__name__ == "FP8Experts"
    with torch.no_grad():
        ref = full.forward_loop(x, idx, w, out_dtype=torch.float32)
        for bounds in ([0, 4, 8], [0, 2, 4, 6, 8], [0, 3, 8]):  # contiguous slices, unequal too
            total = torch.zeros_like(ref)
            for lo, hi in zip(bounds, bounds[1:]):
                part = _slice(full, lo, hi)
                y = part.forward_partial(x, idx - lo, w, impl)
                assert y.dtype == torch.float32 and y.shape == ref.shape
                total += y
            assert torch.allclose(total, ref, atol=1e-5, rtol=1e-5), (bounds, (total - ref).abs().max())
        empty = _slice(full, 4, 6)  # experts 4, 5: never selected
        assert torch.equal(empty.forward_partial(x, idx - 4, w, impl), torch.zeros_like(ref))


def _slice(ex, lo, hi):
    import copy

    part = copy.deepcopy(ex)
    part.keep_experts(lo, hi - lo)
    return part


def test_moe_grouped_equals_loop_including_router_grads():
    cfg = tiny_cfg(hidden_size=32, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    model = make_model(cfg, bias_std=0.3)
    moe = model.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("grouped", "loop"):
        moe.experts_impl = impl
        xi = x.clone().requires_grad_(True)
        y, stats = moe(xi, with_balance=True)
        loss = (y * torch.linspace(-1, 1, 32)).sum() + stats.balance
        params = [xi, moe.gate.weight, moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj,
                  moe.shared_experts.down_proj.weight]
        results.append((y.detach(), stats.counts, torch.autograd.grad(loss, params)))
    (ya, ca, ga), (yb, cb, gb) = results
    assert torch.allclose(ya, yb, atol=1e-5)
    assert torch.equal(ca, cb)
    assert (ca == 0).any(), "want at least one expert without tokens"
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert ga[1].abs().sum() > 0  # the router learns through the gate weights (and the balance term)


def test_moe_output_matches_per_token_reference():
    cfg = tiny_cfg(hidden_size=32, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    model = make_model(cfg, bias_std=0.3)
    moe = model.layers[1].mlp
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, stats = moe(x)
    r = moe.gate
    ref, _ = ref_route(x[0], r.weight, r.e_score_correction_bias, 4, 2, 3, 2.5, margin_check=False)
    ex, sh = moe.experts, moe.shared_experts
    for t in range(6):
        xt = x[0, t]
        want = sh(xt)
        for e, wt in ref[t].items():
            want = want + wt * (ex.down_proj[e] @ (F.silu(ex.gate_proj[e] @ xt) * (ex.up_proj[e] @ xt)))
        assert torch.allclose(y[0, t], want, atol=1e-5)
    assert int(stats.counts.sum()) == 6 * 3


def test_experts_impl_names_checked(model):
    x = torch.randn(3, 32)
    idx = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="bogus"):
        model.layers[1].mlp.experts(x, idx, torch.ones(3, 2), impl="bogus")
    with pytest.raises(ValueError, match="bogus"):
        model.set_experts_impl("bogus")


def test_experts_impl_runs_the_path_it_names(monkeypatch):
    """impl="loop" runs the loop (the reference the grouped path is checked against), "grouped" the
    grouped GEMMs, in `forward` and in `forward_partial`."""
    ex = _experts()
    x, idx, w = torch.randn(3, 16), torch.tensor([[0, 1], [2, 3], [1, 5]]), torch.ones(3, 2)
    for impl, other in (("loop", "sorted_mlp"), ("grouped", "forward_loop")):
        def boom(*a, **k):
            raise AssertionError(f"impl={impl!r} ran {other}")

        monkeypatch.setattr(ex, other, boom)
        ex(x, idx, w, impl=impl)
        ex.forward_partial(x, idx, w, impl=impl)
        monkeypatch.undo()


# ------------------------------------------------------------------------------------------------
# (c) sequence-wise balance loss

def balance_by_loops(s, idx):
    """Paper eqs. 17–20 without α, averaged over the sequences of the batch."""
    B, T, E = s.shape
    K = idx.shape[-1]
    total = 0.0
    for b in range(B):
        L = 0.0
        for i in range(E):
            f_i = E / (K * T) * sum(1 for t in range(T) if i in idx[b, t].tolist())
            P_i = sum(s[b, t, i] / s[b, t].sum() for t in range(T)) / T
            L = L + f_i * P_i
        total = total + L
    return total / B


def test_sequence_balance_matches_paper_formula():
    g = torch.Generator().manual_seed(0)
    B, T, E, K = 3, 7, 8, 3
    s = torch.sigmoid(torch.randn(B, T, E, generator=g, dtype=torch.float64)).requires_grad_(True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    got = sequence_balance(s, idx)
    want = balance_by_loops(s, idx)
    assert torch.allclose(got, want, atol=1e-12)
    ga, = torch.autograd.grad(got, s)
    gb, = torch.autograd.grad(want, s)
    assert torch.allclose(ga, gb, atol=1e-12)


def test_sequence_balance_perfect_balance_is_one():
    # every expert chosen equally often and uniform affinities: f_i = 1, P_i = 1/E -> L = 1
    E, K, T = 4, 2, 4
    idx = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]]).view(1, T, K)
    s = torch.full((1, T, E), 0.3)
    assert sequence_balance(s, idx).item() == pytest.approx(1.0)
    # all tokens on the same experts with most affinity there: larger than 1
    s2 = torch.tensor([[0.9, 0.9, 0.1, 0.1]]).repeat(T, 1).view(1, T, E)
    idx2 = torch.tensor([[0, 1]] * T).view(1, T, K)
    assert sequence_balance(s2, idx2).item() > 1.5


# ------------------------------------------------------------------------------------------------
# (d) bias update sign rule, fp32 bias, MaxVio

def test_update_expert_bias_sign_rule(model):
    routers = model.routers()
    assert len(routers) == 3  # 2 main MoE layers + 1 MTP layer
    before = [r.e_score_correction_bias.clone() for r in routers]
    counts = torch.tensor([
        [4, 4, 4, 4, 4, 4, 4, 4],  # balanced: nothing moves
        [10, 0, 4, 4, 6, 2, 4, 2],  # mean 4
        [0, 0, 0, 0, 0, 0, 0, 32],  # mean 4
    ])
    gamma = 0.01
    update_expert_bias(routers, counts, gamma)
    expect_delta = [
        torch.zeros(8),
        torch.tensor([-1, 1, 0, 0, -1, 1, 0, 1]) * gamma,
        torch.tensor([1, 1, 1, 1, 1, 1, 1, -1]) * gamma,
    ]
    for r, b0, d in zip(routers, before, expect_delta):
        assert torch.allclose(r.e_score_correction_bias - b0, d, atol=1e-7)
    # γ = 0 is a no-op, even with unbalanced loads
    snap = [r.e_score_correction_bias.clone() for r in routers]
    update_expert_bias(routers, counts, 0.0)
    assert all(torch.equal(r.e_score_correction_bias, s) for r, s in zip(routers, snap))
    with pytest.raises(ValueError, match="rows"):
        update_expert_bias(routers, counts[:2], gamma)


def test_update_expert_bias_is_not_a_gradient_op(model):
    routers = model.routers()
    assert all(not r.e_score_correction_bias.requires_grad for r in routers)
    assert all("e_score_correction_bias" not in n for n, _ in model.named_parameters())
    assert any(n.endswith("e_score_correction_bias") for n in model.state_dict())


def test_bias_stays_fp32_after_bf16_cast(model):
    with torch.no_grad():
        for r in model.routers():
            r.e_score_correction_bias.fill_(0.1234567)
    model = model.to(torch.bfloat16)
    routers = model.routers()
    assert routers[0].weight.dtype == torch.bfloat16
    for r in routers:
        assert r.e_score_correction_bias.dtype == torch.float32
        assert torch.all(r.e_score_correction_bias == torch.tensor(0.1234567, dtype=torch.float32))
    # a γ = 1e-3 step on a bias of 1.0 survives (it would vanish in bf16: 1.001 rounds to 1.0)
    with torch.no_grad():
        for r in routers:
            r.e_score_correction_bias.fill_(1.0)
    counts = torch.zeros(3, 8, dtype=torch.long)
    counts[:, 0] = 16
    update_expert_bias(routers, counts, 1e-3)
    for r in routers:
        assert r.e_score_correction_bias[1].item() == pytest.approx(1.001, abs=1e-6)
        assert r.e_score_correction_bias[0].item() == pytest.approx(0.999, abs=1e-6)
    # other casts keep it too
    model.half()
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in model.routers())
    model.float()
    assert model.routers()[0].weight.dtype == torch.float32
    # and the forward still runs in the cast model
    ids = rand_ids(model.config, 1, 5)
    assert model.bfloat16()(ids).logits.dtype == torch.bfloat16


def test_max_violation():
    counts = torch.tensor([[4, 4, 4, 4], [8, 0, 4, 4], [10, 2, 0, 0], [0, 0, 0, 0]])
    mv = max_violation(counts)
    assert torch.allclose(mv, torch.tensor([0.0, 1.0, 2.333333, 0.0]), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# (e) expert counts and balance in ModelOutput

def _hook_idx(module, store, key):
    return module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o[1]))


@pytest.mark.parametrize("D", [1, 2])
def test_expert_counts_rows_and_sums(D):
    cfg = tiny_cfg(num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=D)
    model = make_model(cfg, bias_std=0.3)
    B, T, K, E = 2, 10, cfg.num_experts_per_tok, cfg.n_routed_experts
    store = {}
    hooks = [_hook_idx(model.layers[1].mlp.gate, store, "main1"), _hook_idx(model.layers[2].mlp.gate, store, "main2")]
    hooks += [_hook_idx(model.mtp[k].mlp.gate, store, f"mtp{k}") for k in range(D)]
    with torch.no_grad():
        out = model(rand_ids(cfg, B, T), with_balance=True)
    for h in hooks:
        h.remove()
    counts = out.expert_counts
    assert counts.shape == (2 + D, E) and counts.dtype == torch.int64
    order = ["main1", "main2"] + [f"mtp{k}" for k in range(D)]
    for row, key in enumerate(order):
        assert torch.equal(counts[row], torch.bincount(store[key].flatten(), minlength=E)), key
    sums = counts.sum(-1).tolist()
    assert sums == [B * T * K] * 2 + [B * (T - k) * K for k in range(1, D + 1)]

    with torch.no_grad():
        main_only = model(rand_ids(cfg, B, T), with_mtp=False)
    assert main_only.expert_counts.shape == (2, E)
    assert main_only.balance is None


def test_model_balance_is_sum_over_moe_layers(model):
    ids = rand_ids(model.config, 2, 9)
    with capture_router_io(model) as calls, torch.no_grad():
        out = model(ids, with_balance=True)
    assert len(calls) == 3
    want = 0.0
    for router, x, (w, idx, s) in calls:
        B, T = ids.shape[0], x.shape[0] // ids.shape[0]
        want = want + sequence_balance(s.view(B, T, -1), idx.view(B, T, -1))
    assert out.balance is not None and torch.allclose(out.balance, want, atol=1e-6)
    assert out.balance.item() > 0
