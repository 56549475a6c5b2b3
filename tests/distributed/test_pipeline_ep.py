"""Pipeline × expert parallelism on the CPU with gloo: pp = 2 stages (ranks) × ep = 2 ranks per stage
(4 processes) equals one process.

Run: python -m pytest tests/distributed/test_pipeline_ep.py -q   (spawns 4 processes on 127.0.0.1)

Layout (dsv3/distributed/pipeline.py, mesh ("pp", "ep"), global rank = pp_index · 2 + ep_index): each
stage is held by 2 ranks that split its 8 routed experts (4 each, all-to-all dispatch); the other
parameters are replicated over the 2 and their gradients averaged; each of the 2 reads half of every
micro-batch's rows; P2P goes between ranks with the same ep index. Scenarios: 1F1B, DualPipeV, and
DualPipeV with the threaded OVERLAP_F_B callback, whose forward and backward threads pass the baton
at every all-to-all (checked: the baton was passed).

Each rank builds the same tiny model twice (seed 0, 4 layers: 1 dense + 3 MoE, one MTP module): a
reference that runs the whole global batch (8 sequences of 12 + 1 tokens) in one forward, and a copy
that build_pipeline cuts into the rank's stages (4 micro-batches of 2 rows, 1 row per ep rank).
Checked, as max |distributed - reference| over ranks and tensors (fp32), with an ep rank's expert
slice against the same slice of the reference:
  * after one forward/backward: the loss (CE + MTP + balance) and every gradient the rank holds;
  * then STEPS AdamW steps with clipping, balance loss, MTP and bias updates from loads all-reduced
    over all 4 ranks: losses, gradient norms, all parameters and the correction biases.
Tolerances (absolute, fp32; the differences come only from the order of fp32 sums: per-rank and
per-micro-batch means vs one mean, the all-to-all's row order, the ep all-reduce):
  TOL = 1e-5 for losses, gradients, gradient norms and biases (measured, all three scenarios:
  gradients 1.0e-7, losses 5.5e-7, gradient norms 1.9e-6, biases exactly equal);
  parameters after the AdamW steps (lr 1e-2): max |diff| <= PARAM_TOL = 1e-3 and at most 0.5% of the
  entries differ by more than 1e-5 (measured: 5.1e-4 and 0.17-0.26%: single scattered entries of
  all kinds of tensors, 1-8 per tensor, where Adam's m/(sqrt(v)+eps) turns a rounding difference of
  a gradient entry of size ~eps = 1e-8 into an update difference of ~1e-4; EP adds more summation
  orders than PP alone, hence the looser bounds than tests/distributed/test_pipeline.py's 5e-4, 0.1%).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from dsv3.distributed.mesh import ParallelConfigError
from dsv3.distributed.pipeline import PipelineConfig

from tests.distributed.harness import spawn_scenarios
from tests.distributed.test_pipeline import GRAD_NORM_TOL, HP, LR, PARAM_NEAR, STEPS, TOL, _ref_step, tiny_cfg

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
HAS_DUALPIPEV = hasattr(__import__("torch.distributed.pipelining", fromlist=["x"]), "ScheduleDualPipeV")

PARAM_TOL = 1e-3  # max over all entries after the AdamW steps (10% of one step's lr)
PARAM_FAR_FRAC = 5e-3  # and at most 0.5% of the entries differ by more than PARAM_NEAR = 1e-5
B, T = 8, 12
N_MICRO, EP = 4, 2
SCENARIOS = {  # name -> (PipelineConfig kwargs, overlap callback)
    "1f1b_pp2xep2": (dict(pp=2, ep=EP, schedule="1f1b"), False),
    "dualpipev_pp2xep2": (dict(pp=2, ep=EP, schedule="dualpipev"), False),
    "dualpipev_pp2xep2_overlap": (dict(pp=2, ep=EP, schedule="dualpipev"), True),
}
if not HAS_DUALPIPEV:
    SCENARIOS = {k: v for k, v in SCENARIOS.items() if "dualpipev" not in k}
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def _scenario(rank: int, pcfg: PipelineConfig, overlap: bool) -> dict:
    from dsv3.distributed.pipeline import build_pipeline, forward_backward, gathered_loss, train_step
    from dsv3.model import build_model
    from dsv3.training.loss import compute_loss
    from dsv3.training.optim import make_optimizer as make_ref_optimizer

    cfg = tiny_cfg()
    ref = build_model(cfg, seed=0)
    model = build_model(cfg, seed=0)
    ps = build_pipeline(model, pcfg, B // (N_MICRO * EP), T, overlap=overlap)
    E = cfg.n_routed_experts
    L = E // EP
    lo = ps.ep_rank * L
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(STEPS + 1)]
    diff = {"bias": 0.0}

    def put(key, a, r):
        a, r = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(r, dtype=torch.float64)
        diff[key] = max(diff.get(key, 0.0), float((a - r).abs().max()) if a.numel() else 0.0)

    def ref_of(name, t):  # the reference tensor of a (possibly sliced) parameter
        if name.split(".")[-1] in EXPERT_NAMES and t.shape[0] == E:
            return t[lo:lo + L]
        return t

    out_r = ref(batches[0][:, :-1], with_balance=True)
    loss_r = compute_loss(out_r, batches[0][:, 1:], HP["mtp_lambda"], HP["balance_alpha"]).total
    loss_r.backward()
    forward_backward(ps, batches[0], mtp_lambda=HP["mtp_lambda"], balance_alpha=HP["balance_alpha"])
    put("loss", gathered_loss(ps)["loss"], float(loss_r.detach()))
    ref_params = dict(ref.named_parameters())
    n_checked = 0
    for name, p in ps.model_part.named_parameters():
        name = name.split(".", 1)[1]
        put("grad", p.grad, ref_of(name, ref_params[name].grad))
        n_checked += 1
    n_checked_t = torch.tensor([n_checked])
    ref.zero_grad(set_to_none=True)
    ps.model_part.zero_grad(set_to_none=True)

    opt_r = make_ref_optimizer(ref, LR)
    opt = make_ref_optimizer(ps.model_part, LR)  # the same optimizer over this rank's parts
    losses, losses_r = [], []
    for s in range(1, STEPS + 1):
        l_r, gn_r = _ref_step(ref, opt_r, batches[s])
        r = train_step(ps, opt, batches[s], **HP)
        losses.append(r["loss"])
        losses_r.append(l_r)
        put("grad_norm", r["grad_norm"], gn_r)
    put("loss", losses, losses_r)
    n_far, n_all = 0, 0
    for name, p in ps.model_part.named_parameters():
        name = name.split(".", 1)[1]
        d = (p.detach() - ref_of(name, ref_params[name].detach())).abs()
        put("param", d, torch.zeros_like(d))
        n_far, n_all = n_far + int((d > PARAM_NEAR).sum()), n_all + d.numel()
    diff["param_far_frac"] = n_far / n_all
    routers = dict(ps.routers)
    for row, r_r in enumerate(ref.routers()):
        if row in routers:
            put("bias", routers[row].e_score_correction_bias, r_r.e_score_correction_bias)
    diff["bias_moved"] = float(ref.routers()[0].e_score_correction_bias.abs().max())
    diff["loss_first"], diff["loss_last"] = losses_r[0], losses_r[-1]
    diff["handoffs"] = float(ps.coordinator.handoffs) if ps.coordinator is not None else 0.0
    dist.all_reduce(n_checked_t)  # each parameter once per ep rank (the tied embedding twice under 1F1B)
    diff["params_checked"] = float(n_checked_t)
    diff["params_total"] = float(EP * (len(ref_params) + (1 if pcfg.schedule == "1f1b" else 0)))
    return diff


def _run_one(rank: int, world: int, name: str) -> dict:
    kw, overlap = SCENARIOS[name]
    return _scenario(rank, PipelineConfig(n_microbatches=N_MICRO, **kw), overlap)


@pytest.fixture(scope="module")
def results():
    return spawn_scenarios(2 * EP, _run_one, list(SCENARIOS))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_pipeline_ep_equals_single_process(results, name):
    r = results[name]
    print(name, {k: f"{v:.2e}" for k, v in r.items()})
    for key in ("loss", "grad", "grad_norm", "bias", "param"):
        tol = {"param": PARAM_TOL, "grad_norm": GRAD_NORM_TOL}.get(key, TOL)  # as test_pipeline.py
        assert r[key] <= tol, f"{name}: max |diff| of {key} = {r[key]:.3g} > {tol}"
    assert r["param_far_frac"] <= PARAM_FAR_FRAC, \
        f"{name}: {r['param_far_frac']:.2%} of the parameters differ by > {PARAM_NEAR}"
    assert r["params_checked"] == r["params_total"]
    assert r["bias_moved"] > 0
    assert r["loss_last"] < r["loss_first"]
    if SCENARIOS[name][1]:
        assert r["handoffs"] > 0, "the overlap callback never passed the baton at an all-to-all"


@pytest.mark.parametrize("kw, world, model_kw, batch, match", [
    (dict(pp=2, ep=2), 2, {}, None, r"pp \(2\) x ep \(2\) = 4 ranks, but the world size is 2"),
    (dict(pp=2, ep=0), 4, {}, None, r"ep must be an integer >= 1"),
    (dict(pp=2, ep=3), 6, {}, None, r"ep \(3\) does not divide n_routed_experts \(8\)"),
    (dict(pp=2, ep=2), 4, dict(n_routed_experts=0, first_k_dense_replace=4, num_hidden_layers=4), None,
     r"ep = 2 but the model has no routed experts"),
    (dict(pp=2, ep=2, n_microbatches=4), 4, {}, 12,
     r"global batch \(12 sequences\) is not a multiple of n_microbatches x ep \(4 x 2\)"),
])
def test_pp_ep_config_errors_name_the_conflict(kw, world, model_kw, batch, match):
    model_cfg = tiny_cfg(**model_kw)
    with pytest.raises(ParallelConfigError, match=match):
        PipelineConfig(**kw).validate(world, model_cfg, batch)
