"""Pipeline parallelism on the CPU with gloo: the pipelined run equals one process.

Run: python -m pytest tests/distributed/test_pipeline.py -q   (spawns 2 and 4 processes on 127.0.0.1)

Each spawned rank builds the same tiny model twice (seed 0, 4 layers: 1 dense + 3 MoE, one MTP
module): a reference that runs the whole global batch in one forward, and a copy that
`build_pipeline` cuts into the rank's stages. Both see the same global batch of 8 sequences; the
pipeline runs it as N_MICRO micro-batches of 2. Checked, as max |pipeline - reference| over ranks and
tensors (fp32):
  * after one forward/backward: the loss (total, incl. MTP and the sequence-wise balance term) and the
    gradient of every parameter each rank holds (the embedding on both ends under 1F1B, after the
    tied-gradient all-reduce);
  * then STEPS AdamW steps with clipping, balance loss, MTP and bias updates from all-reduced
    loads: the losses, the gradient norms, all parameters and the correction biases.
Tolerances (absolute, fp32; the differences come only from the order of fp32 sums: per-micro-batch
means vs one mean, the gradient of a sum accumulated over micro-batches):
  TOL = 1e-5 for losses, gradients, gradient norms and biases (measured: see the report printed
  with -s; gradients <= ~1e-7, losses <= ~1e-6, biases exactly equal);
  parameters after the AdamW steps (lr 1e-2): max |diff| <= PARAM_TOL = 5e-4 and at most 0.1% of the
  entries differ by more than 1e-5. Adam's update m/(sqrt(v)+eps) turns a 1e-10 rounding difference of
  a gradient entry of size ~1e-10 (below eps = 1e-8) into an update difference of ~1e-4: measured, a
  handful of single entries (each with |grad| ~1e-10 at step 1) differ by up to ~2e-4; all others by
  < 1e-5 (the gradients themselves agree to ~1e-7).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from dsv3.config import ModelConfig
from dsv3.distributed.mesh import ParallelConfigError
from dsv3.distributed.pipeline import PipelineConfig
from tests.distributed import harness
from tests.distributed.harness import results_by_world

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
HAS_DUALPIPEV = hasattr(__import__("torch.distributed.pipelining", fromlist=["x"]), "ScheduleDualPipeV")

TOL = 1e-5
PARAM_TOL = 5e-4  # max over all entries, after the AdamW steps (5% of one step's lr)
PARAM_NEAR, PARAM_FAR_FRAC = 1e-5, 1e-3  # and at most 0.1% of the entries differ by more than 1e-5
STEPS = 2
B, T = 8, 12  # global batch: 8 sequences of 12 (+1) tokens
N_MICRO = 4
HP = dict(mtp_lambda=0.3, balance_alpha=1e-2, gamma=1e-2, grad_clip=1.0)
LR = 1e-2

# name -> (world size, PipelineConfig kwargs, overlap callback)
SCENARIOS = {
    "1f1b_pp2": (2, dict(pp=2, schedule="1f1b"), False),
    "dualpipev_pp2": (2, dict(pp=2, schedule="dualpipev"), False),
    "dualpipev_pp2_overlap": (2, dict(pp=2, schedule="dualpipev"), True),
    "1f1b_pp4": (4, dict(pp=4, schedule="1f1b"), False),
}
if not HAS_DUALPIPEV:
    SCENARIOS = {k: v for k, v in SCENARIOS.items() if "dualpipev" not in k}


def tiny_cfg(**kw) -> ModelConfig:
    return harness.tiny_cfg(**{"num_hidden_layers": 4, **kw})  # 4 layers: 2 and 4 stages split evenly


# --------------------------------------------------------------------------------------------------
# worker (runs in each spawned process)

def _ref_step(model, opt, batch):
    from dsv3.model import update_expert_bias
    from dsv3.training.loss import compute_loss

    out = model(batch[:, :-1], with_balance=True)
    parts = compute_loss(out, batch[:, 1:], HP["mtp_lambda"], HP["balance_alpha"])
    parts.total.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), HP["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_expert_bias(model.routers(), out.expert_counts, HP["gamma"])
    return float(parts.total.detach()), float(gnorm)


def _scenario(rank: int, world: int, pcfg: PipelineConfig, overlap: bool) -> dict:
    from dsv3.distributed.pipeline import build_pipeline, forward_backward, gathered_loss, make_optimizer, train_step
    from dsv3.model import build_model
    from dsv3.training.loss import compute_loss
    from dsv3.training.optim import make_optimizer as make_ref_optimizer

    cfg = tiny_cfg()
    ref = build_model(cfg, seed=0)
    model = build_model(cfg, seed=0)
    ps = build_pipeline(model, pcfg, B // N_MICRO, T, overlap=overlap)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(STEPS + 1)]
    diff = {"bias": 0.0}  # every rank reports the same keys (a rank may hold no router)

    def put(key, a, r):
        a, r = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(r, dtype=torch.float64)
        diff[key] = max(diff.get(key, 0.0), float((a - r).abs().max()) if a.numel() else 0.0)

    # one forward + backward on batch 0
    out_r = ref(batches[0][:, :-1], with_balance=True)
    loss_r = compute_loss(out_r, batches[0][:, 1:], HP["mtp_lambda"], HP["balance_alpha"]).total
    loss_r.backward()
    forward_backward(ps, batches[0], mtp_lambda=HP["mtp_lambda"], balance_alpha=HP["balance_alpha"])
    put("loss", gathered_loss(ps)["loss"], float(loss_r.detach()))
    ref_params = dict(ref.named_parameters())
    n_checked = 0
    for name, p in ps.model_part.named_parameters():
        name = name.split(".", 1)[1]  # drop the ModuleList index
        put("grad", p.grad, ref_params[name].grad)
        n_checked += 1
    n_checked_t = torch.tensor([n_checked])
    ref.zero_grad(set_to_none=True)
    ps.model_part.zero_grad(set_to_none=True)

    # STEPS optimizer steps
    opt_r = make_ref_optimizer(ref, LR)
    opt = make_optimizer(ps, LR)
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
        d = (p.detach() - ref_params[name.split(".", 1)[1]].detach()).abs()
        put("param", d, torch.zeros_like(d))
        n_far, n_all = n_far + int((d > PARAM_NEAR).sum()), n_all + d.numel()
    diff["param_far_frac"] = n_far / n_all
    routers = dict(ps.routers)
    for row, r_r in enumerate(ref.routers()):
        if row in routers:
            put("bias", routers[row].e_score_correction_bias, r_r.e_score_correction_bias)
    diff["bias_moved"] = float(ref.routers()[0].e_score_correction_bias.abs().max())
    diff["loss_first"], diff["loss_last"] = losses_r[0], losses_r[-1]
    # every parameter of the model is held by some rank (the tied embedding by two under 1F1B)
    dist.all_reduce(n_checked_t)
    diff["params_checked"] = float(n_checked_t)
    diff["params_total"] = float(len(ref_params) + (1 if pcfg.schedule == "1f1b" else 0))
    return diff


def _run_one(rank: int, world: int, name: str) -> dict:
    _, kw, overlap = SCENARIOS[name]
    return _scenario(rank, world, PipelineConfig(n_microbatches=N_MICRO, **kw), overlap)


@pytest.fixture(scope="module")
def results():
    return results_by_world(SCENARIOS, _run_one)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_pipeline_equals_single_process(results, name):
    r = results(name)
    print(name, {k: f"{v:.2e}" for k, v in r.items()})
    for key in ("loss", "grad", "grad_norm", "bias", "param"):
        tol = PARAM_TOL if key == "param" else TOL
        assert r[key] <= tol, f"{name}: max |diff| of {key} = {r[key]:.3g} > {tol}"
    assert r["param_far_frac"] <= PARAM_FAR_FRAC, \
        f"{name}: {r['param_far_frac']:.2%} of the parameters differ by > {PARAM_NEAR}"
    assert r["params_checked"] == r["params_total"]
    assert r["bias_moved"] > 0
    assert r["loss_last"] < r["loss_first"]


# --------------------------------------------------------------------------------------------------
# configuration errors (no processes)

@pytest.mark.parametrize("kw, world, model_kw, batch, match", [
    (dict(pp=2, schedule="gpipe"), 2, {}, None, r"schedule must be one of"),
    (dict(pp=1), 1, {}, None, r"pp must be an integer >= 2"),
    (dict(pp=2), 4, {}, None, r"pp \(2\) must equal the world size \(4\)"),
    (dict(pp=4, n_microbatches=2), 4, {}, None, r"1f1b needs n_microbatches >= its 4 stages"),
    (dict(pp=2, schedule="dualpipev", n_microbatches=2), 2, {}, None, r"dualpipev needs n_microbatches >= its 4"),
    (dict(pp=2, schedule="dualpipev", n_microbatches=4), 2, dict(num_hidden_layers=3), None,
     r"num_hidden_layers \(3\) < 4 pipeline stages"),
    (dict(pp=2, layers_per_stage=(1, 2)), 2, {}, None, r"layers_per_stage sums to 3, but the model has num_hidden_layers = 4"),
    (dict(pp=2, layers_per_stage=(4,)), 2, {}, None, r"layers_per_stage has 1 entries for 2 stages"),
    (dict(pp=2, layers_per_stage=(4, 0)), 2, {}, None, r"every stage needs >= 1 layer"),
    (dict(pp=2, n_microbatches=4), 2, {}, 6, r"global batch \(6 sequences\) is not a multiple of n_microbatches \(4\)"),
])
def test_config_errors_name_the_conflict(kw, world, model_kw, batch, match):
    if "dualpipev" in str(kw) and not HAS_DUALPIPEV:
        pytest.skip("no ScheduleDualPipeV in this torch")
    with pytest.raises(ParallelConfigError, match=match):
        PipelineConfig(**kw).validate(world, tiny_cfg(**model_kw), batch)


def test_split_rule():
    assert [list(r) for r in PipelineConfig(pp=2, schedule="dualpipev").split(6)] == [[0, 1], [2, 3], [4], [5]]
    assert PipelineConfig(pp=2, schedule="dualpipev").stage_ranks() == [0, 1, 1, 0]
    assert [len(r) for r in PipelineConfig(pp=4, schedule="1f1b", layers_per_stage=(1, 2, 2, 1)).split(6)] == [1, 2, 2, 1]
