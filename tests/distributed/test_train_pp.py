"""`dsv3 train --pp 2` under torchrun (2 processes, gloo, CPU): pipeline-parallel pre-training.

Run: python -m pytest tests/distributed/test_train_pp.py -q

One tiny corpus, tokenizer and micro model (4 layers, so that DualPipeV's 2·pp = 4 stages each get
one). Checked:
  * 1F1B, 4 steps: the first step's main loss equals a single-process `dsv3 train` run on the same
    data within 1e-4; the loss falls; metrics.jsonl (steps 1..4, val loss), plots, summary.json exist;
    the final checkpoint (DCP + HF export) loads with load_pretrained and `to_hf` converts it;
  * DualPipeV resumes the 1F1B run (checkpoint names are the model's, so another pipeline layout reads
    them) for 2 more steps; then an FSDP2 (no pipeline) run resumes it and goes on;
  * refusals: --pp with a batch ramp, --pp with --node-groups, --pp not matching the world size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random

import pytest
import torch.distributed as dist

from tests.distributed.test_dcp import MICRO, _torchrun

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dsv3.config import ModelConfig
    from dsv3.training.data import split_of
    from dsv3.tokenizer import DSTokenizer

    tmp = tmp_path_factory.mktemp("train_pp")
    rng = random.Random(0)
    corpus = tmp / "corpus"
    corpus.mkdir()
    names = ["alpha", "beta", "gamma", "delta", "value", "count"]
    for i in range(24):
        with open(corpus / f"f{i:02d}.py", "w") as f:
            f.write("\n".join(f"def {rng.choice(names)}_{j}(x):\n    return x + {rng.randint(0, 9)}\n"
                              for j in range(30)))
    val = [n for n in (f"v{i}.py" for i in range(2000)) if split_of(n, 10) == "val"][:3]
    for n in val:
        with open(corpus / n, "w") as f:
            f.write("\n".join(f"def {rng.choice(names)}_{j}(x):\n    return x * {j}\n" for j in range(40)))
    tok = DSTokenizer.train((p.read_text() for p in sorted(corpus.iterdir())), 512)
    tok_dir = str(tok.save(tmp / "tok"))
    cfg = tmp / "micro.json"
    ModelConfig(**{**MICRO, "num_hidden_layers": 4}).validate().to_json(cfg)

    def common(out):
        a = ["train", "--config", cfg, "--data", corpus, "--tokenizer", tok_dir, "--out", out, "--seq-len", 32,
             "--batch-size", 4, "--lr", 1e-2, "--eval-every", 2, "--save-every", 2, "--cache-dir", tmp / "cache",
             "--no-progress", "--samples", 0, "--device", "cpu", "--precision", "fp32"]
        return [str(x) for x in a]

    return tmp, common


def _steps(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_train_pp_1f1b_then_dualpipev_resume(setup):
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.checkpoints.dcp import to_hf

    tmp, common = setup
    # (that a pipeline's losses and parameters equal one process's: tests/distributed/test_compose.py)
    out = tmp / "pp"
    r = _torchrun(2, common(out) + ["--pp", "2", "--steps", "4"], str(tmp))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ranks (pp 2 x ep 1, 1f1b, 2 micro-batches" in r.stdout
    recs = _steps(out)
    steps = [x for x in recs if "main" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert steps[-1]["main"] < steps[0]["main"]
    assert any("val_loss" in x for x in recs) and any(x.get("final") for x in recs)
    assert os.path.exists(out / "summary.json") and os.path.exists(out / "loss.png")
    final = out / "checkpoints" / "step_00000004"
    m = load_pretrained(str(final))
    assert m.config.num_hidden_layers == 4 and m.config.n_routed_experts == 4
    assert load_pretrained(to_hf(str(out), str(tmp / "hf"))).config.hidden_size == m.config.hidden_size

    # resume under another pipeline layout: DualPipeV (4 stages, 4 micro-batches), 2 more steps
    r2 = _torchrun(2, common(out) + ["--pp", "2", "--pp-schedule", "dualpipev", "--steps", "6", "--resume",
                                     "--no-plots"], str(tmp))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "resumed from" in r2.stdout and "at step 4" in r2.stdout and "dualpipev, 4 micro-batches" in r2.stdout
    steps2 = [x for x in _steps(out) if "main" in x]
    assert [x["step"] for x in steps2][-2:] == [5, 6]
    assert steps2[-1]["main"] < steps[0]["main"]
    assert os.path.exists(out / "checkpoints" / "step_00000006" / "model.safetensors")

    # a pipeline checkpoint resumes without a pipeline (FSDP2 over the same 2 ranks): names are the model's
    r3 = _torchrun(2, common(out) + ["--steps", "8", "--resume", "--no-plots"], str(tmp))
    assert r3.returncode == 0, r3.stdout + r3.stderr
    assert "at step 6" in r3.stdout and "dp_shard 2 x ep 1" in r3.stdout
    steps3 = [x for x in _steps(out) if "main" in x]
    assert [x["step"] for x in steps3][-2:] == [7, 8]


@pytest.mark.parametrize("settings,pcfg,msg", [
    (dict(batch_ramp_steps=2, batch_start=4), dict(pp=2), "no --batch-ramp-steps"),
    ({}, dict(pp=2, node_groups=2), "node-limited routing"),
])
def test_train_pp_refusals(settings, pcfg, msg):
    """The pipeline strategy refuses these settings with the reason. Pre-training and SFT ask it
    (`strategy.check_settings`) before touching the model or the data; in-process here (a rank of a 2-rank
    world, no process group: the check is collective-free), as a torchrun launch costs ~5 s of the suite."""
    import torch

    from dsv3.distributed.mesh import DistEnv, ParallelConfig
    from dsv3.distributed.strategy import PipelineStrategy
    from dsv3.training.config import TrainConfig

    env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    strategy = PipelineStrategy(env, ParallelConfig(**{"dp_shard": 1, "ep": 1, **pcfg}))
    with pytest.raises(ValueError, match=msg):
        strategy.check_settings(TrainConfig(out_dir="unused", batch_size=8, **settings), "fp32")


def test_dualpipev_with_compile_refused_where_torch_cannot_and_described_where_it_can(monkeypatch):
    """DualPipeV x --compile: on torch < 2.13 a compiled block's backward (a Python autograd Function) cannot sit
    before stage_backward_weight, so the strategy refuses it with the reason (as DualPipeV x FP8); where torch can,
    the layout line says that the compiled blocks' backward runs twice. 1F1B and uncompiled DualPipeV are unchanged."""
    import torch

    import dsv3.distributed.strategy as strategy_mod
    from dsv3.distributed.mesh import DistEnv, ParallelConfig
    from dsv3.distributed.strategy import PipelineStrategy, dualpipev_refusal
    from dsv3.training.config import TrainConfig

    env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")

    def strategy(schedule, compile, precision="fp32"):
        s = PipelineStrategy(env, ParallelConfig(dp_shard=1, ep=1, pp=2, pp_schedule=schedule))
        s.check_settings(TrainConfig(out_dir="unused", batch_size=8, compile=compile), precision)
        return s

    monkeypatch.setattr(strategy_mod, "split_backward_takes_functions", lambda: False)  # (torch 2.11's answer)
    with pytest.raises(ValueError, match=r"^--pp-schedule dualpipev with --compile needs torch >= 2\.13 .*a compiled "
                                         r"block's backward is one; use --pp-schedule 1f1b, or leave out --compile$"):
        strategy("dualpipev", True)
    with pytest.raises(ValueError, match="with --precision fp8 needs torch >= 2.13"):
        strategy("dualpipev", True, "fp8")
    assert "twice" not in strategy("dualpipev", False).describe()
    assert dualpipev_refusal("bf16", "1f1b", compile=True) is None
    monkeypatch.setattr(strategy_mod, "split_backward_takes_functions", lambda: True)
    assert "the compiled blocks' backward runs twice" in strategy("dualpipev", True).describe()
    assert "twice" not in strategy("1f1b", True).describe() and "twice" not in strategy("dualpipev", False).describe()


def test_dualpipev_step_turns_buffer_donation_off():
    """AOTAutograd donates a compiled backward's saved buffers and then refuses a backward that keeps its graph;
    DualPipeV's input pass keeps it (retain_graph=True), so `dsv3 train --pp-schedule dualpipev --compile` failed at
    its first backward ("compiled with non-empty donated buffers"). The schedule's step runs with donation off
    (bench/RESULTS.md, thirty-second session: the fixed run's losses against the uncompiled run's)."""
    import torch._functorch.config as fc

    from dsv3.distributed.pipeline import split_backward_compile

    before = fc.donated_buffer
    with split_backward_compile("dualpipev"):
        assert fc.donated_buffer is False
    assert fc.donated_buffer == before
    with split_backward_compile("1f1b"):
        assert fc.donated_buffer == before


def test_train_pp_without_torchrun_says_how(setup):
    from dsv3.cli import main

    tmp, common = setup
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(common(tmp / "bad2") + ["--steps", "1", "--pp", "2"]) == 2
    assert "needs several processes: start it with torchrun" in err.getvalue()


# a world size that does not match pp x dp x ep: tests/distributed/test_pipeline_dp.py (config errors)
