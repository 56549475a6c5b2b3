"""Training loss and optimizer schedule tests against hand computations: CE with ignored targets,
MTP depth k on targets[:, k:] divided by the number of valid *main* targets (eq. 25), λ/D, the
α-weighted balance term; the LR / λ / γ / batch schedules (SPEC §8) and the weight-decay groups.
CPU, well under a second.

Run: python -m pytest tests/test_loss.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.model import ModelOutput, build_model
from dsv3.training.loss import IGNORE, compute_loss
from dsv3.training.optim import COSINE_END, CONSTANT_END, Schedule, make_optimizer, param_groups
from conftest import tiny_cfg


def two_way(p1: float) -> list[float]:
    """Logits over V=2 whose softmax gives token 1 probability p1 (and token 0 probability 1-p1)."""
    return [0.0, math.log(p1 / (1 - p1))]


def output(logits, mtp=(), balance=None) -> ModelOutput:
    return ModelOutput(logits=torch.tensor(logits), mtp_logits=[torch.tensor(m) for m in mtp],
                       hidden=torch.zeros(1), expert_counts=None, balance=balance)


# B = 1 sequence, T = 4 positions, V = 2 tokens. Position i's logits give token 1 probability P[i].
P = [0.5, 0.8, 0.25, 0.9]
TARGETS = torch.tensor([[1, 0, IGNORE, 1]])


def nll(p1: float, target: int) -> float:
    return -math.log(p1 if target == 1 else 1 - p1)


def test_main_ce_mean_over_valid_targets():
    out = output([[two_way(p) for p in P]])
    parts = compute_loss(out, TARGETS, mtp_lambda=0.3, balance_alpha=0.0)
    # valid targets: positions 0 (token 1), 1 (token 0), 3 (token 1); position 2 is ignored
    expected = (-math.log(0.5) - math.log(0.2) - math.log(0.9)) / 3
    assert parts.main.item() == pytest.approx(expected, rel=1e-6)
    assert parts.total.item() == pytest.approx(expected, rel=1e-6)
    assert parts.mtp is None and parts.mtp_per_depth == [] and parts.balance is None


def test_all_targets_ignored_gives_zero_not_nan():
    out = output([[two_way(p) for p in P]])
    parts = compute_loss(out, torch.full((1, 4), IGNORE))
    assert parts.main.item() == 0.0


def test_mtp_depths_use_shifted_targets_and_divide_by_main_count():
    """D = 2 modules. Depth k's logits (B, T-k, V) at position i are scored against targets[:, i+k];
    each depth's summed CE is divided by the 5 valid main targets (T per sequence), not by T-k."""
    targets = torch.tensor([[1, 0, 1, IGNORE, 0, 1]])  # T = 6, 5 valid main targets
    main_p = [0.5] * 6
    d1_p = [0.6, 0.3, 0.7, 0.2, 0.4]  # T-1 = 5 positions -> targets[:, 1:] = [0, 1, IGNORE, 0, 1]
    d2_p = [0.1, 0.75, 0.35, 0.55]  # T-2 = 4 positions -> targets[:, 2:] = [1, IGNORE, 0, 1]
    out = output([[two_way(p) for p in main_p]], mtp=[[[two_way(p) for p in d1_p]], [[two_way(p) for p in d2_p]]])
    lam = 0.3
    parts = compute_loss(out, targets, mtp_lambda=lam, balance_alpha=0.0)

    n_main = 5
    main = 5 * math.log(2) / n_main
    l1 = (nll(0.6, 0) + nll(0.3, 1) + nll(0.2, 0) + nll(0.4, 1)) / n_main  # the IGNORE target is skipped
    l2 = (nll(0.1, 1) + nll(0.35, 0) + nll(0.55, 1)) / n_main
    assert parts.main.item() == pytest.approx(main, rel=1e-6)
    assert [x.item() for x in parts.mtp_per_depth] == pytest.approx([l1, l2], rel=1e-6)  # without λ/D
    assert parts.mtp.item() == pytest.approx(lam / 2 * (l1 + l2), rel=1e-6)  # λ/D with D = 2
    assert parts.total.item() == pytest.approx(main + lam / 2 * (l1 + l2), rel=1e-6)
    # dividing by T-k instead would give a different number: the test can tell them apart
    assert (nll(0.6, 0) + nll(0.3, 1) + nll(0.2, 0) + nll(0.4, 1)) / 4 != pytest.approx(l1, rel=1e-3)

    # λ = 0: the depths are still computed (for logging) but add nothing
    p0 = compute_loss(out, targets, mtp_lambda=0.0)
    assert p0.mtp is None and len(p0.mtp_per_depth) == 2
    assert p0.total.item() == pytest.approx(main, rel=1e-6)


def test_mtp_divides_by_T_per_sequence_with_batch():
    """B = 2, no ignored targets, uniform logits: depth 1 averages (T-1)·log V over B·T, i.e. (T-1)/T·log V."""
    B, T, V = 2, 5, 4
    out = ModelOutput(logits=torch.zeros(B, T, V), mtp_logits=[torch.zeros(B, T - 1, V)], hidden=torch.zeros(1),
                      expert_counts=None, balance=None)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    parts = compute_loss(out, targets, mtp_lambda=1.0)
    assert parts.main.item() == pytest.approx(math.log(V), rel=1e-6)
    assert parts.mtp_per_depth[0].item() == pytest.approx((T - 1) / T * math.log(V), rel=1e-6)
    assert parts.total.item() == pytest.approx(math.log(V) * (1 + (T - 1) / T), rel=1e-6)


def test_balance_term_only_with_positive_alpha():
    out = output([[two_way(p) for p in P]], balance=torch.tensor(2.5))
    main = (-math.log(0.5) - math.log(0.2) - math.log(0.9)) / 3
    with_b = compute_loss(out, TARGETS, balance_alpha=1e-2)
    assert with_b.balance.item() == pytest.approx(0.025)
    assert with_b.total.item() == pytest.approx(main + 0.025, rel=1e-6)
    without = compute_loss(out, TARGETS, balance_alpha=0.0)
    assert without.balance is None and without.total.item() == pytest.approx(main, rel=1e-6)
    # α > 0 but the model computed no balance term (with_balance=False): nothing added
    nob = compute_loss(output([[two_way(p) for p in P]]), TARGETS, balance_alpha=1e-2)
    assert nob.balance is None


def test_loss_on_a_real_model_output_backpropagates():
    cfg = tiny_cfg()
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    out = model(x, with_balance=True)
    parts = compute_loss(out, y, mtp_lambda=0.3, balance_alpha=1e-4)
    assert len(parts.mtp_per_depth) == cfg.num_nextn_predict_layers
    expected = parts.main + 0.3 * parts.mtp_per_depth[0] + 1e-4 * out.balance
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-6)
    parts.total.backward()
    assert model.mtp[0].eh_proj.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert all(r.weight.grad is not None for r in model.routers())  # the balance term reaches the routers


# ------------------------------------------------------------------------------------------------
# schedules

def test_schedule_phase_boundaries():
    assert CONSTANT_END == pytest.approx(10 / 14.8) and COSINE_END == pytest.approx(14.3 / 14.8)
    s = Schedule(total_steps=1000, peak_lr=1.0, warmup_steps=100)
    # warmup: linear, reaching the peak at the last warmup step
    assert s.lr(0) == pytest.approx(0.01) and s.lr(49) == pytest.approx(0.5) and s.lr(99) == pytest.approx(1.0)
    # constant until 67.6% of the run (675/1000 < 0.6757 <= 676/1000)
    assert s.lr(100) == s.lr(500) == s.lr(675) == 1.0
    assert 0.999 < s.lr(676) < 1.0
    # cosine from the peak to 10% over [67.6%, 96.6%): half way it is 0.1 + 0.9 * 0.5
    mid = Schedule(total_steps=10_000_000, peak_lr=1.0, warmup_steps=0)
    half = (CONSTANT_END + COSINE_END) / 2
    assert mid.lr(int(half * 10_000_000)) == pytest.approx(0.55, abs=1e-5)
    assert 0.1 < s.lr(966) < 0.1001
    # tails: 10% of the peak until 98.9%, then 3.3% (7.3e-6 / 2.2e-4)
    assert s.lr(967) == s.lr(988) == pytest.approx(0.1)
    assert s.lr(989) == s.lr(999) == pytest.approx(7.3e-6 / 2.2e-4) == pytest.approx(0.0332, abs=1e-4)
    lrs = [s.lr(i) for i in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never increases after the warmup


def test_schedule_lambda_gamma_switches():
    s = Schedule(total_steps=1000, mtp_lambda=0.3, mtp_lambda_late=0.1, bias_gamma=0.001)
    assert s.mtp_weight(0) == s.mtp_weight(675) == 0.3
    assert s.mtp_weight(676) == s.mtp_weight(999) == 0.1
    assert s.gamma(0) == s.gamma(966) == 0.001
    assert s.gamma(967) == s.gamma(999) == 0.0


def test_schedule_batch_ramp():
    s = Schedule(total_steps=100, batch_ramp_steps=10, batch_start=4)
    assert [s.batch_size(i, 16) for i in (0, 5, 9, 10, 50)] == [4, 10, round(4 + 12 * 0.9), 16, 16]
    assert Schedule(total_steps=100).batch_size(0, 16) == 16  # no ramp
    assert Schedule(total_steps=100, batch_ramp_steps=10, batch_start=0).batch_size(0, 16) == 16


def test_warmup_longer_than_run_is_clamped():
    s = Schedule(total_steps=4, peak_lr=1.0, warmup_steps=100)
    assert [s.lr(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_param_groups_weight_decay():
    model = build_model(tiny_cfg(), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]}
    assert len(ids) == len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    for n in ("embed_tokens.weight", "lm_head.weight", "layers.1.mlp.experts.gate_proj", "layers.1.mlp.gate.weight",
              "mtp.0.eh_proj.weight"):
        assert n in decayed, n
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert exempt and all(n.endswith(("norm.weight", "layernorm.weight")) for n in exempt), exempt
    # the correction bias is a buffer: no optimizer touches it
    assert not any("e_score_correction_bias" in n for n in names.values())
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
