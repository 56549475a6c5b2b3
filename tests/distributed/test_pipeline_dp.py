"""Pipeline × data parallelism on the CPU with gloo: pp = 2 stages × dp = 2 replicas (4 processes), and
pp 2 × dp 2 × ep 2 (8 processes), equal one process; pipeline checkpoints move between layouts.

Run: python -m pytest tests/distributed/test_pipeline_dp.py -q   (spawns 4 and 8 processes, ~15 s)

Layout (dsv3/distributed/pipeline.py, mesh ("pp", "dp", "ep"), global rank = (pp_index · dp + dp_index)
· ep + ep_index): each stage is held by dp × ep ranks; each reads its own quarter (dp 2 × ep 2, with 2
micro-batches of 4 rows: one row) of every micro-batch; P2P goes between ranks of equal (dp, ep) index; the replicated gradients
are averaged over the stage's dp × ep ranks, the expert slices (ep 2) over the dp replicas; the 1F1B
tied embedding has one group per (dp, ep) index.

Equality scenarios (DualPipeV at pp 2 × dp 2; 1F1B at pp 2 × dp 2 × ep 2): as in
tests/distributed/test_pipeline_ep.py, each rank builds the same tiny model twice (seed 0, 4 layers:
1 dense + 3 MoE, one MTP module), one runs the global batch (8 sequences of 12 + 1 tokens) in one
forward, the other is cut by build_pipeline (4 micro-batches); checked, worst over ranks: the loss and
every gradient after one forward/backward, then STEPS training steps (clipping, AdamW, balance loss,
MTP, bias updates from all-reduced loads): losses, gradient norms, parameters, correction biases.
Tolerances are test_pipeline.py's (fp32: only summation orders differ; the measured values print with
-s): TOL = 1e-5 for losses, gradients, biases [gradients 2.4e-7, losses 3.5e-6, biases equal], grad
norms 5e-5 [1.7e-5], parameters after the steps 1e-3 [6.3e-4] with at most 0.5% of the entries beyond
1e-5 [0.29%] (Adam turns a rounding difference of a gradient entry of size ~eps into a ~lr/10 step).

Checkpoint scenario (4 processes): A = pp 2 × dp 2 1F1B trains STEPS steps and saves (save_dcp); a
fresh B = pp 2 × ep 2 DualPipeV loads it (load_dcp): its parameters and AdamW moments equal A's
saved ones exactly (expert slices as the slice of the global tensor, `load_full_model` reads the
same values back in one process); A and B then take the same next step: equal losses within TOL
(another layout only reorders fp32 sums). B saves after that step, and a fresh C = pp 2 × dp 2 1F1B
loads it exactly (the expert slices, DTensors on B's ("dp", "ep") sub-mesh, come back whole). The
pp 2 × dp 2 × ep 2 scenario also saves and reads its checkpoint back in one process, exactly.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist

from dsv3.distributed.mesh import ParallelConfigError
from dsv3.distributed.pipeline import PipelineConfig
from tests.distributed.harness import results_by_world
from tests.distributed.test_pipeline import (GRAD_NORM_TOL, HP, LR, PARAM_FAR_FRAC, PARAM_NEAR, PARAM_TOL, STEPS,
                                             TOL, _ref_step, tiny_cfg)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
HAS_DUALPIPEV = hasattr(__import__("torch.distributed.pipelining", fromlist=["x"]), "ScheduleDualPipeV")

B, T = 8, 12
N_MICRO = 4
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
SCENARIOS = {  # name -> (world size, PipelineConfig kwargs)
    # 1F1B at pp 2 x dp 2: in the composition matrix (cells pp2xdp2-*, through the entry point) and the
    # checkpoint scenario's layout A below
    "dualpipev_pp2xdp2": (4, dict(pp=2, dp=2, schedule="dualpipev")),
    "checkpoint_pp2xdp2_to_pp2xep2": (4, None),
    # 2 micro-batches of 4 rows: one row per (dp, ep) rank
    # with ZeRO-1: the replicated parameters' masters split by dp then ep, the expert slices' by dp
    "1f1b_pp2xdp2xep2_zero": (8, dict(pp=2, dp=2, ep=2, schedule="1f1b", n_microbatches=2, zero=True)),
}
if not HAS_DUALPIPEV:
    SCENARIOS = {k: v for k, v in SCENARIOS.items() if "dualpipev" not in k}


def _batches(cfg, n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(n)]


def _build(cfg, pcfg):
    from dsv3.distributed.pipeline import build_pipeline, make_pipeline_optimizer
    from dsv3.model import build_model

    ps = build_pipeline(build_model(cfg, seed=0), pcfg, B // (pcfg.n_microbatches * pcfg.replicas), T)
    return ps, make_pipeline_optimizer(ps, LR)


def _global(ps, fn) -> dict[str, torch.Tensor]:
    """name -> the global tensor of `fn(tensor AdamW updates for the parameter)` (its gradient, a moment) for
    this rank's parameters: ZeRO chunks and expert slices gathered over the stage's ranks (collective)."""
    zero = {id(e.param): (z, e) for z in ps.zero for e in z.entries}
    experts = {id(p) for p in ps.expert_params}
    out = {}
    for n, p in sorted(_named(ps), key=lambda x: x[0]):  # the same order on every rank of a stage
        if id(p) in zero:
            z, e = zero[id(p)]
            out[n] = z.dtensor(fn(e.master), p).full_tensor()
            continue
        t = fn(p)
        if id(p) in experts:
            parts = [torch.empty_like(t) for _ in range(ps.pcfg.ep)]
            dist.all_gather(parts, t.contiguous(), group=ps.ep_group)
            t = torch.cat(parts)
        out[n] = t
    return out


def _named(ps):
    """(model name, parameter) of this rank's parts."""
    return [(n.split(".", 1)[1], p) for n, p in ps.model_part.named_parameters()]


def _sliced(ps, name, t):
    """The part of the global tensor `t` (named `name`) that this rank holds."""
    E, ep = t.shape[0], ps.pcfg.ep
    if name.split(".")[-1] in EXPERT_NAMES and ep > 1:
        L = E // ep
        return t[ps.ep_rank * L:(ps.ep_rank + 1) * L]
    return t


def _equality(rank: int, pcfg: PipelineConfig, save: bool) -> dict:
    from dsv3.distributed.pipeline import forward_backward, gathered_loss, train_step
    from dsv3.model import build_model
    from dsv3.training.loss import compute_loss
    from dsv3.training.optim import make_optimizer

    cfg = tiny_cfg()
    ref = build_model(cfg, seed=0)
    ps, opt = _build(cfg, pcfg)
    batches = _batches(cfg, STEPS + 1)
    diff = {"bias": 0.0}

    def put(key, a, r):
        a, r = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(r, dtype=torch.float64)
        diff[key] = max(diff.get(key, 0.0), float((a - r).abs().max()) if a.numel() else 0.0)

    out_r = ref(batches[0][:, :-1], with_balance=True)
    loss_r = compute_loss(out_r, batches[0][:, 1:], HP["mtp_lambda"], HP["balance_alpha"]).total
    loss_r.backward()
    forward_backward(ps, batches[0], mtp_lambda=HP["mtp_lambda"], balance_alpha=HP["balance_alpha"])
    put("loss", gathered_loss(ps)["loss"], float(loss_r.detach()))
    ref_params = dict(ref.named_parameters())
    named = _named(ps)
    for name, g in _global(ps, lambda t: t.grad).items():
        put("grad", g, ref_params[name].grad)
    n_checked = torch.tensor([len(named)])
    ref.zero_grad(set_to_none=True)
    ps.model_part.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)

    opt_r = make_optimizer(ref, LR)
    losses, losses_r = [], []
    for s in range(1, STEPS + 1):
        l_r, gn_r = _ref_step(ref, opt_r, batches[s])
        r = train_step(ps, opt, batches[s], **HP)
        losses.append(r["loss"])
        losses_r.append(l_r)
        put("grad_norm", r["grad_norm"], gn_r)
    put("loss", losses, losses_r)
    n_far, n_all = 0, 0
    for name, p in named:
        d = (p.detach() - _sliced(ps, name, ref_params[name].detach())).abs()
        put("param", d, torch.zeros_like(d))
        n_far, n_all = n_far + int((d > PARAM_NEAR).sum()), n_all + d.numel()
    diff["param_far_frac"] = n_far / n_all
    # AdamW moments held here per parameter entry held here: 1 without ZeRO; with it 1/(dp·ep) of the
    # replicated entries and 1/dp of the expert slices' (plus the chunks' rounding)
    diff["state_frac"] = sum(st["exp_avg"].numel() for st in opt.state.values()) / sum(p.numel() for _, p in named)
    routers = dict(ps.routers)
    for row, r_r in enumerate(ref.routers()):
        if row in routers:
            put("bias", routers[row].e_score_correction_bias, r_r.e_score_correction_bias)
    diff["bias_moved"] = float(ref.routers()[0].e_score_correction_bias.abs().max())
    diff["loss_first"], diff["loss_last"] = losses_r[0], losses_r[-1]
    dist.all_reduce(n_checked)  # each parameter once per dp x ep rank (the tied embedding twice under 1F1B)
    diff["params_checked"] = float(n_checked)
    diff["params_total"] = float(pcfg.replicas * (len(ref_params) + (1 if pcfg.schedule == "1f1b" else 0)))
    if save:
        diff["ckpt_exact"] = float(_save_and_compare(ps, opt, STEPS))
    return diff


def _tmpdir() -> str:
    obj = [tempfile.mkdtemp(prefix="dsv3_ppdp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _save_and_compare(ps, opt, step: int, root: str | None = None) -> bool:
    """save_dcp, then the one-process `load_full_model` of the checkpoint equals this rank's parameters
    exactly (collective: True on every rank iff on all)."""
    from dsv3.checkpoints.dcp import load_full_model, save_dcp

    own = root is None
    root = root or _tmpdir()
    path = save_dcp(os.path.join(root, "ckpt"), step, ps.stages[0], opt, ps, {"tokens": 0})
    full = dict(load_full_model(path).named_parameters())
    ok = torch.tensor([float(all(torch.equal(p.detach(), _sliced(ps, n, full[n].detach())) for n, p in _named(ps)))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if own:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    return bool(ok.item())


def _moments(ps, opt) -> dict[str, torch.Tensor]:
    """name -> (exp_avg, exp_avg_sq) of every parameter, gathered from every rank (global tensors: expert
    slices and ZeRO chunks assembled)."""
    m = _global(ps, lambda t: opt.state[t]["exp_avg"])
    v = _global(ps, lambda t: opt.state[t]["exp_avg_sq"])
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, {n: (m[n], v[n]) for n in m})
    return {n: mv for d in pieces for n, mv in d.items()}


def _checkpoint(rank: int) -> dict:
    from dsv3.checkpoints.dcp import load_dcp, load_full_model
    from dsv3.distributed.pipeline import train_step

    cfg = tiny_cfg()
    batches = _batches(cfg, STEPS + 2)
    root = _tmpdir()
    diff = {}
    a_cfg = PipelineConfig(pp=2, dp=2, schedule="1f1b", n_microbatches=N_MICRO, zero=True)  # ZeRO-1 <-> whole state
    b_cfg = PipelineConfig(pp=2, ep=2, schedule="dualpipev" if HAS_DUALPIPEV else "1f1b", n_microbatches=N_MICRO)
    a, opt_a = _build(cfg, a_cfg)
    for s in range(STEPS):
        train_step(a, opt_a, batches[s], **HP)
    diff["a_saved_exact"] = float(_save_and_compare(a, opt_a, STEPS, root))
    saved = _moments(a, opt_a)
    a_params = {n: p.detach().clone() for n, p in _named(a)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, a_params)
    a_params = {k: v for d in gathered for k, v in d.items()}  # dp x ep = 2 x 1: every tensor whole

    b, opt_b = _build(cfg, b_cfg)
    load_dcp(os.path.join(root, "ckpt", f"step_{STEPS:08d}"), b.stages[0], opt_b, b)
    exact = all(torch.equal(p.detach(), _sliced(b, n, a_params[n])) for n, p in _named(b))
    exact &= all(torch.equal(m, saved[n][0]) and torch.equal(v, saved[n][1])
                 for n, (m, v) in _moments(b, opt_b).items())
    diff["b_loaded_exact"] = float(exact)
    ra = train_step(a, opt_a, batches[STEPS], **HP)
    rb = train_step(b, opt_b, batches[STEPS], **HP)
    diff["loss_a_b"] = abs(ra["loss"] - rb["loss"])
    diff["grad_norm_a_b"] = abs(ra["grad_norm"] - rb["grad_norm"])

    diff["b_saved_exact"] = float(_save_and_compare(b, opt_b, STEPS + 1, root))
    c, opt_c = _build(cfg, a_cfg)
    load_dcp(os.path.join(root, "ckpt", f"step_{STEPS + 1:08d}"), c.stages[0], opt_c, c)
    b_moments = _moments(b, opt_b)
    exact = all(torch.equal(m, b_moments[n][0]) and torch.equal(v, b_moments[n][1])
                for n, (m, v) in _moments(c, opt_c).items())
    full = dict(load_full_model(os.path.join(root, "ckpt", f"step_{STEPS + 1:08d}")).named_parameters())
    exact &= all(torch.equal(p.detach(), _sliced(c, n, full[n].detach())) for n, p in _named(c))
    diff["c_loaded_exact"] = float(exact)
    ra = train_step(a, opt_a, batches[STEPS + 1], **HP)
    rc = train_step(c, opt_c, batches[STEPS + 1], **HP)
    diff["loss_a_c"] = abs(ra["loss"] - rc["loss"])

    # a pipeline built from the meta device (each rank allocates and initialises its stages only, as `dsv3 train
    # --pp` does) holds exactly the tensors of one built from the whole model, expert slices included (b_cfg: ep 2)
    from dsv3.distributed.pipeline import build_pipeline, make_pipeline_optimizer
    from dsv3.model import build_model

    for lay in (a_cfg, b_cfg):
        whole, _ = _build(cfg, lay)
        meta = build_pipeline(build_model(cfg, device="meta"), lay, B // (N_MICRO * lay.replicas), T, device="cpu",
                              init_seed=0)
        mine = dict(_named(meta))
        diff[f"meta_built_exact_{lay.schedule}"] = float(
            all(torch.equal(p, mine[n]) for n, p in _named(whole)) and len(mine) == len(_named(whole))
            and not any(p.is_meta for p in meta.model_part.parameters()))

    # bf16 working weights under ZeRO-1: the GEMM weights bf16, their fp32 masters the chunks, and after a
    # step every weight is its gathered master rounded to bf16
    d_cfg = PipelineConfig(pp=2, dp=2, schedule="1f1b", n_microbatches=N_MICRO, zero=True)
    d = build_pipeline(build_model(cfg, seed=0), d_cfg, B // (N_MICRO * 2), T)
    opt_d = make_pipeline_optimizer(d, LR, bf16_weights=True)
    auto = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    rd = train_step(d, opt_d, batches[0], **HP, autocast=auto)
    bf16 = [e for z in d.zero for e in z.entries if e.param.dtype == torch.bfloat16]
    diff["bf16_weights_zero"] = float(len(bf16) > 0 and not opt_d.masters and all(
        e.master.dtype == torch.float32 for z in d.zero for e in z.entries) and rd["loss"] == rd["loss"])
    full = _global(d, lambda t: t)  # the masters gathered (fp32), the other parameters as they are
    diff["bf16_weights_rounded"] = float(all(torch.equal(e.param, full[n].to(torch.bfloat16))
                                             for n, p in _named(d) for e in bf16 if e.param is p))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    return diff


def _run_one(rank: int, world: int, name: str) -> dict:
    _, kw = SCENARIOS[name]
    if kw is None:
        return _checkpoint(rank)
    return _equality(rank, PipelineConfig(**{"n_microbatches": N_MICRO, **kw}), save=kw.get("ep", 1) > 1)


@pytest.fixture(scope="module")
def results():
    return results_by_world(SCENARIOS, _run_one)


@pytest.mark.parametrize("name", [n for n, v in SCENARIOS.items() if v[1] is not None])
def test_pipeline_dp_equals_single_process(results, name):
    r = results(name)
    print(name, {k: f"{v:.2e}" for k, v in r.items()})
    for key in ("loss", "grad", "grad_norm", "bias", "param"):
        tol = {"param": PARAM_TOL, "grad_norm": GRAD_NORM_TOL}.get(key, TOL)
        assert r[key] <= tol, f"{name}: max |diff| of {key} = {r[key]:.3g} > {tol}"
    assert r["param_far_frac"] <= PARAM_FAR_FRAC, \
        f"{name}: {r['param_far_frac']:.2%} of the parameters differ by > {PARAM_NEAR}"
    assert r["params_checked"] == r["params_total"]
    assert r["bias_moved"] > 0
    assert r["loss_last"] < r["loss_first"]
    if SCENARIOS[name][1].get("zero"):
        assert r["state_frac"] <= 0.55, f"ZeRO-1 keeps {r['state_frac']:.0%} of the moments on a rank"
    else:
        assert r["state_frac"] == 1.0
    if "ckpt_exact" in r:
        assert r["ckpt_exact"] == 1.0, "the pp x dp x ep checkpoint does not read back exactly"


def test_pipeline_checkpoint_moves_between_layouts(results):
    r = results("checkpoint_pp2xdp2_to_pp2xep2")
    print({k: f"{v:.2e}" for k, v in r.items()})
    for key in ("a_saved_exact", "b_loaded_exact", "b_saved_exact", "c_loaded_exact", "bf16_weights_zero",
                "bf16_weights_rounded", "meta_built_exact_1f1b",
                f"meta_built_exact_{'dualpipev' if HAS_DUALPIPEV else '1f1b'}"):
        assert r[key] == 1.0, key
    for key in ("loss_a_b", "loss_a_c"):
        assert r[key] <= TOL, f"{key} = {r[key]:.3g}"
    assert r["grad_norm_a_b"] <= GRAD_NORM_TOL


@pytest.mark.parametrize("kw, world, batch, match", [
    (dict(pp=2, dp=2), 2, None, r"pp \(2\) x dp \(2\) = 4 ranks, but the world size is 2"),
    (dict(pp=2, dp=2, ep=2), 4, None, r"pp \(2\) x dp \(2\) x ep \(2\) = 8 ranks, but the world size is 4"),
    (dict(pp=2, dp=0), 4, None, r"dp must be an integer >= 1"),
    (dict(pp=2, dp=2, n_microbatches=4), 4, 12,
     r"global batch \(12 sequences\) is not a multiple of n_microbatches x dp \(4 x 2\)"),
    (dict(pp=2, dp=2, ep=2, n_microbatches=4), 8, 24,
     r"not a multiple of n_microbatches x dp x ep \(4 x 2 x 2\)"),
])
def test_pp_dp_config_errors_name_the_conflict(kw, world, batch, match):
    with pytest.raises(ParallelConfigError, match=match):
        PipelineConfig(**kw).validate(world, tiny_cfg(), batch)


def test_local_rows_partition_every_micro_batch():
    """The dp x ep ranks of a stage read disjoint slices of every micro-batch, which together are
    the micro-batch, in order (no processes: local_rows only reads the state's indices)."""
    from types import SimpleNamespace

    from dsv3.distributed.pipeline import local_rows

    pcfg = PipelineConfig(pp=2, dp=2, ep=2, n_microbatches=2)
    batch = torch.arange(16).unsqueeze(1).expand(16, 3)  # row i holds i
    n, R = pcfg.n_microbatches, pcfg.replicas
    rows = {(d, e): local_rows(SimpleNamespace(pcfg=pcfg, dp_rank=d, ep_rank=e), batch)[:, 0].view(n, -1)
            for d in range(2) for e in range(2)}
    for i in range(n):  # micro-batch i = rows [8i, 8i + 8): slice d·ep + e = rows 8i + 2(d·2 + e) + {0, 1}
        got = torch.cat([rows[(d, e)][i] for d in range(2) for e in range(2)])
        assert got.tolist() == list(range(8 * i, 8 * i + 8))
    assert rows[(1, 0)][0].tolist() == [4, 5]
