"""`dsv3 plan`: the memory / communication planner (SPEC §8-§10). CPU, a few seconds (the 671B
model is only built on the meta device, once).

Run: python -m pytest tests/test_plan.py -q
"""

from __future__ import annotations

import pytest

from dsv3.cli import main
from dsv3.config import preset
from dsv3.info import model_info
from dsv3.plan import GiB, PlanConfig, PlanError, plan, suggest

PAPER = dict(gpus=2048, gpu_mem_gib=80, pp=16, ep=64, zero=1, schedule="dualpipe", precision="fp8",
             recompute="paper", seq_len=4096, micro_batch=1, global_batch=15360)


@pytest.fixture(scope="module")
def v3():
    return preset("671b")


def test_paper_layout_fits(v3):
    r = plan(v3, PlanConfig(**PAPER), "671b")
    assert r.cfg.dp == 128 and r.n_micro == 120 and r.in_flight == 17
    assert r.fits and 40 * GiB < r.total < 80 * GiB
    assert r.stages == (0, 15)  # DualPipe: embedding and head on the same rank
    assert all(v > 0 for v in r.comm.values())
    # the same layout without the paper's tricks (bf16, no recomputation, 1F1B) does not fit
    bare = plan(v3, PlanConfig(**{**PAPER, "schedule": "1f1b", "precision": "bf16", "recompute": "none"}))
    assert not bare.fits
    # FP8 dispatch: all-to-all bytes (1 + 2 + 1 + 2) / (2 + 2 + 2 + 2)
    bf = plan(v3, PlanConfig(**{**PAPER, "precision": "bf16"}))
    assert r.comm["EP all-to-all"] / bf.comm["EP all-to-all"] == pytest.approx(6 / 8)


def test_single_gpu_bytes_match_model_info():
    cfg = preset("small")
    i = model_info(cfg)
    r = plan(cfg, PlanConfig(gpus=1, zero=0, seq_len=16))
    # bf16 weights 2 + fp32 grads 4 + fp32 master 4 + bf16 AdamW m, v 2 + 2 = 14 B/param
    n = i.total + i.mtp_unique
    assert r.n_params == n
    states = sum(v for k, v in r.mem.items() if k.split()[0] in ("weights", "gradients", "master", "AdamW"))
    assert states == 14 * n
    assert r.comm == {"EP all-to-all": 0, "DP gradients + weight gather": 0, "PP p2p": 0}


def test_zero1_divides_optimizer_by_dp_and_ep_halves_experts(v3):
    base = dict(gpus=256, pp=16, ep=1, seq_len=128)
    z0 = plan(v3, PlanConfig(**base, zero=0)).mem
    z1 = plan(v3, PlanConfig(**base, zero=1)).mem
    for k in ("master weights (fp32)", "AdamW m+v (bf16)"):
        assert z1[k] == pytest.approx(z0[k] / 16)  # dp = 256 / 16 and ep = 1: every param over 16 ranks
    assert z1["gradients (fp32)"] == z0["gradients (fp32)"]
    # doubling ep halves the routed-expert parameters (and their bytes) on the same rank
    cfg = preset("16b")
    e = {ep: plan(cfg, PlanConfig(gpus=64, pp=8, ep=ep, zero=0, seq_len=128)) for ep in (4, 8)}
    assert e[4].rank == e[8].rank and e[8].n_routed > 0
    assert e[8].n_routed * 2 == e[4].n_routed
    assert e[4].n_params - e[4].n_routed == e[8].n_params - e[8].n_routed


def test_tiny_on_one_gpu():
    r = plan(preset("tiny"), PlanConfig(gpus=1, gpu_mem_gib=24, seq_len=512))
    assert r.fits and r.total < 1 * GiB


@pytest.mark.parametrize("kw,msg", [
    (dict(gpus=2048, pp=24), "not divisible by pp"),
    (dict(gpus=2048, pp=16, ep=48), "does not divide n_routed_experts"),
    (dict(gpus=128, pp=128), "layers to place"),
    (dict(gpus=32, pp=2, dp=8), "!= gpus"),
    (dict(gpus=64, pp=16, ep=8), "does not divide the data-parallel degree"),
    (dict(gpus=64, pp=2, schedule="dualpipe", global_batch=96), "even number of micro-batches"),
    (dict(gpus=8, global_batch=0), r"global_batch must be an integer >= 1, got 0"),  # was 0 micro-batches
    (dict(gpus=8, global_batch=-8), r"global_batch must be an integer >= 1, got -8"),  # negative activations
])
def test_invalid_layouts(v3, kw, msg):
    with pytest.raises(PlanError, match=msg):
        plan(v3, PlanConfig(**kw))


def test_suggest(v3):
    res = suggest(v3, 2048, 80, precision="fp8", recompute="paper", schedule="dualpipe", global_batch=15360)
    fitting = [(p.cfg.pp, p.cfg.ep) for p in res if p.fits]
    assert (16, 64) in fitting and (16, 1) not in fitting
    assert [p.total for p in res if p.fits] == sorted(p.total for p in res if p.fits)


def test_cli(capsys):
    args = ["plan", "--preset", "671b", "--gpus", "2048", "--gpu-mem", "80", "--pp", "16", "--ep", "64", "--zero",
            "1", "--micro-batch", "1", "--seq-len", "4096", "--global-batch", "15360", "--recompute", "paper",
            "--schedule", "dualpipe", "--precision", "fp8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "EP all-to-all" in out and "activations" in out
    assert main(["plan", "--preset", "671b", "--gpus", "2048", "--pp", "16", "--ep", "48"]) == 2
    assert "n_routed_experts" in capsys.readouterr().err
    assert main(["plan", "--preset", "tiny", "--gpus", "8", "--suggest"]) == 0
    assert "fits" in capsys.readouterr().out


def test_dualpipev_holds_one_copy_in_a_v():
    """DualPipeV (what `dsv3 train --pp-schedule dualpipev` runs): 2·pp stages, rank r holds stages r and
    2·pp-1-r, one copy of the weights (DualPipe holds two); fp32 working weights count 4 bytes."""
    cfg = preset("small")
    n = model_info(cfg).total + model_info(cfg).mtp_unique
    base = dict(gpus=2, pp=2, zero=0, seq_len=64, global_batch=8)
    v = plan(cfg, PlanConfig(**base, schedule="dualpipev"))
    d = plan(cfg, PlanConfig(**base, schedule="dualpipe"))
    assert set(v.stages) in ({0, 3}, {1, 2})
    assert 0.4 * n < v.n_params < 0.8 * n < d.n_params  # about half of the one copy; DualPipe's about all of it
    assert v.comm["PP p2p"] == 2 * plan(cfg, PlanConfig(**base, schedule="1f1b")).comm["PP p2p"]
    f32 = plan(cfg, PlanConfig(gpus=1, zero=0, seq_len=16, weight_dtype="fp32"))  # the weights are the masters
    assert f32.mem["weights (fp32)"] == 4 * n and f32.mem["master weights (the fp32 weights)"] == 0
    with pytest.raises(PlanError, match=r"dualpipev needs pp >= 2"):
        plan(cfg, PlanConfig(gpus=1, pp=1, seq_len=16, global_batch=4, schedule="dualpipev"))
    with pytest.raises(PlanError, match=r"dualpipev needs at least its 2 x pp \(4\) stages' micro-batches"):
        plan(cfg, PlanConfig(**{**base, "global_batch": 2}, schedule="dualpipev"))


@pytest.mark.parametrize("pp,schedule", [(4, "1f1b"), (2, "dualpipev")])
def test_stages_are_those_dsv3_train_builds(pp, schedule):
    """1F1B and DualPipeV: the planner's worst rank holds the parameters of the stages dsv3 train builds
    (PipelineConfig.split: main layers evenly, the remainder to the earliest stages, MTP with the head on the
    last stage; Transformer.part), counted on a meta model. It used to split main + MTP blocks evenly with the
    outer stages shorter: tiny, 1F1B pp 4 planned [1, 1, 2, MTP alone] where dsv3 builds [1, 1, 1, 1 + MTP]."""
    from dsv3.distributed.pipeline import PipelineConfig
    from dsv3.model import build_model

    cfg = preset("tiny")
    model = build_model(cfg, device="meta")
    pc = PipelineConfig(pp=pp, schedule=schedule, n_microbatches=2 * pp)
    ranges, S, owner = pc.split(cfg.num_hidden_layers), pc.n_stages, pc.stage_ranks()
    held = {}
    for r in range(pp):
        params = {}
        for s in (s for s in range(S) if owner[s] == r):
            part = model.part(ranges[s], embed=s in (0, S - 1), head=s == S - 1, mtp=s == S - 1)
            params.update({id(p): p.numel() for p in part.parameters()})
        held[r] = sum(params.values()) + sum(b.numel() for n, b in model.named_buffers() if "correction_bias" in n
                                             and _stage_of(n, ranges, cfg) in [s for s in range(S) if owner[s] == r])
    res = plan(cfg, PlanConfig(gpus=pp, pp=pp, schedule=schedule, zero=0, seq_len=8, global_batch=2 * pp))
    assert res.n_params == held[res.rank] == max(held.values())


def _stage_of(buffer_name: str, ranges, cfg) -> int:
    kind, i = buffer_name.split(".")[:2]
    return len(ranges) - 1 if kind == "mtp" else next(s for s, rg in enumerate(ranges) if int(i) in rg)


def test_fp8_weight_copies_per_micro_batch_in_flight():
    """--fp8-weight-copies (dsv3 train keeping each FP8 weight transpose from a micro-batch's forward to its backward):
    none adds nothing (the recipe: re-quantised in backward); dense is 1 byte per non-expert block parameter of the
    rank per micro-batch in flight, all adds the rank's routed experts alike; only with fp8."""
    import dataclasses

    cfg = dataclasses.replace(preset("16b"), num_nextn_predict_layers=0)  # rank 0 (2 micro-batches in flight) worst
    base = dict(gpus=8, pp=2, ep=2, seq_len=4096, precision="fp8", schedule="1f1b", global_batch=16)
    none, dense, full = (plan(cfg, PlanConfig(**base, fp8_weight_copies=v)) for v in ("none", "dense", "all"))
    assert none.rank == dense.rank == full.rank == 0
    assert "FP8 weight copies" not in none.mem and none.in_flight == dense.in_flight == full.in_flight == 2
    assert dense.mem["FP8 weight copies"] > 0 and dense.total == none.total + dense.mem["FP8 weight copies"]
    assert full.mem["FP8 weight copies"] - dense.mem["FP8 weight copies"] == full.in_flight * full.n_routed
    # dense: the rank's parameters but the routed experts and the embedding (bf16 in the recipe), per micro-batch
    embed = cfg.vocab_size * cfg.hidden_size
    assert dense.mem["FP8 weight copies"] == dense.in_flight * (dense.n_params - dense.n_routed - embed)
    with pytest.raises(PlanError, match="needs precision fp8"):
        plan(cfg, PlanConfig(**{**base, "precision": "bf16"}, fp8_weight_copies="dense"))
    # auto (the default): dsv3 train's own default, re-quantised with a pipeline, kept (dense) without one
    assert plan(cfg, PlanConfig(**base)).cfg.fp8_weight_copies == "none"
    one = dict(base, gpus=4, pp=1)
    assert plan(cfg, PlanConfig(**one)).total == plan(cfg, PlanConfig(**one, fp8_weight_copies="dense")).total
    assert "FP8 weight copies: dense" in plan(cfg, PlanConfig(**one)).format()
    assert plan(cfg, PlanConfig(**{**one, "precision": "bf16"})).cfg.fp8_weight_copies == "none"
