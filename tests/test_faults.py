"""Failures of one training process: a full disk (checked before a save, or met while writing), a
non-finite loss (the step is skipped; too many in a row stop the run), a half-written checkpoint
directory, and the benchmark that trains keeping one checkpoint. CPU, the micro model of
tests/test_training.py; ~30 s on 2 cores. The torchrun cases are in tests/distributed/test_faults_dist.py.

Run: python -m pytest tests/test_faults.py -q
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil

import pytest
import torch

from conftest import bench_module
import dsv3.checkpoints.hf
from dsv3.checkpoints import space
from dsv3.checkpoints.rundir import latest_checkpoint, list_checkpoints, load_checkpoint
from dsv3.training.loop import NonFiniteError
from dsv3.training.pretrain import Pretrain, train
from tests.test_training import (REPO, env, micro_config, quiet, read_steps, read_summary, tcfg,  # noqa: F401
                                 trainer_state)


def same_state(ckpt_a, ckpt_b) -> bool:
    """Model (router biases included), AdamW moments and step counts bitwise equal."""
    ma, _, oa, _ = load_checkpoint(ckpt_a, "cpu", torch.float32)
    mb, _, ob, _ = load_checkpoint(ckpt_b, "cpu", torch.float32)
    da, db = ma.state_dict(), mb.state_dict()
    assert da.keys() == db.keys() and oa.keys() == ob.keys()
    assert any(k.endswith("e_score_correction_bias") for k in da) and any(k.endswith(".step") for k in oa)
    return all(torch.equal(da[k], db[k]) for k in da) and all(torch.equal(oa[k], ob[k]) for k in oa)


def track_steps(monkeypatch) -> dict:
    """{"step": the optimizer step in progress, 1-based}, kept by the task's hyper()."""
    now = {"step": 0}
    real = Pretrain.hyper

    def hyper(self, step):
        now["step"] = step + 1
        return real(self, step)

    monkeypatch.setattr(Pretrain, "hyper", hyper)
    return now


def nan_loss_at(monkeypatch, steps) -> None:
    """The loss (and so every gradient) of the given optimizer steps is NaN."""
    now = track_steps(monkeypatch)
    real = Pretrain.loss

    def loss(self, out, mb, hp):
        value, stats = real(self, out, mb, hp)
        if now["step"] in steps:
            return value * float("nan"), stats * float("nan")
        return value, stats

    monkeypatch.setattr(Pretrain, "loss", loss)


def disk_full_from(monkeypatch, step: int, free: int = 2**20) -> None:
    """shutil.disk_usage reports `free` bytes from optimizer step `step` on."""
    now = track_steps(monkeypatch)
    real = shutil.disk_usage

    def usage(path):
        u = real(path)
        return type(u)(u.total, u.total - free, free) if now["step"] >= step else u

    monkeypatch.setattr(shutil, "disk_usage", usage)


# --------------------------------------------------------------------------------------------------
# a full disk

def test_save_that_does_not_fit_stops_the_run_and_keeps_the_previous_checkpoint(env, tmp_path, monkeypatch):
    """The disk reports 1 MiB free from step 3 on: the save at step 4 is refused before writing anything,
    with how much it needed and had; checkpoint 2 stays the latest and loads."""
    disk_full_from(monkeypatch, 3)
    out = tmp_path / "run"
    with pytest.raises(space.DiskFullError, match=r"checkpoint step 4 .*needs [\d.]+ MiB, 1\.0 MiB free; the previous "
                                                  r"checkpoint .*step_00000002 is intact"):
        train(micro_config(), tcfg(env, out, steps=6, save_every=2), log=quiet)
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_00000002"]  # nothing of step 4, no temporary directory
    model, state, opt_t, _ = load_checkpoint(latest_checkpoint(root), "cpu", torch.float32)
    assert state["step"] == 2 and opt_t


def test_disk_filling_during_a_write_stops_the_run_cleanly(env, tmp_path, monkeypatch):
    """ENOSPC from the model writer of the second checkpoint (a partial file written first): the partial
    checkpoint is removed, checkpoint 2 is intact, and the error says what was needed and free."""
    real = dsv3.checkpoints.hf._save_tensors
    calls = []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(dsv3.checkpoints.hf, "_save_tensors", failing)
    out = tmp_path / "run"
    with pytest.raises(space.DiskFullError, match=r"disk filled while writing checkpoint step 4 .*needs about "
                                                  r"[\d.]+ MiB, [\d.]+ .iB free after removing its partial files"):
        train(micro_config(), tcfg(env, out, steps=6, save_every=2), log=quiet)
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_00000002"]
    load_checkpoint(latest_checkpoint(root), "cpu", torch.float32)


def test_disk_full_is_one_line_and_exit_status_2_from_the_cli(env, tmp_path, monkeypatch, capsys):
    from dsv3.cli import main

    disk_full_from(monkeypatch, 3)
    cfg = tmp_path / "micro.json"
    micro_config().to_json(cfg)
    out = tmp_path / "run"
    argv = ["train", "--config", str(cfg), "--data", env["data"], "--tokenizer", env["tokenizer"], "--cache-dir",
            env["cache"], "--out", str(out), "--steps", "6", "--save-every", "2", "--seq-len", "32", "--batch-size",
            "4", "--eval-every", "0", "--val-permille", "200", "--no-progress", "--no-plots", "--samples", "0",
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3 train: error: not enough disk space for checkpoint step 4"), err
    assert "MiB free" in err[0] and "Traceback" not in err[0]
    assert list_checkpoints(out / "checkpoints") == [str(out / "checkpoints" / "step_00000002")]


@pytest.mark.parametrize("exc, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    # safetensors' writer: a Rust io::Error in the message, not an OSError
    (RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
     True),
    (ValueError("bad value"), False),
])
def test_is_disk_full(exc, full):
    from torch.distributed.checkpoint.api import CheckpointException

    assert space.is_disk_full(exc) is full
    assert space.is_disk_full(CheckpointException("write", {1: (exc, None)})) is full  # another rank's failure
    try:
        try:
            raise exc
        except Exception as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as w:
        assert space.is_disk_full(w) is full


def test_a_step_directory_without_trainer_state_is_neither_latest_nor_kept(env, tmp_path):
    """A half-written `step_` directory (no trainer_state.json) is not a checkpoint: it is never the
    latest, and a save of that step replaces it with a complete one."""
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000002" / "dcp").mkdir(parents=True)
    (root / "step_00000002" / "dcp" / "__0_0.distcp").write_bytes(b"torn")
    (root / "step_00000009").mkdir()
    assert latest_checkpoint(root) is None and list_checkpoints(root) == []
    train(micro_config(), tcfg(env, tmp_path / "run", steps=2, resume=True), log=quiet)
    assert list_checkpoints(root) == [str(root / "step_00000002")]
    model, state, _, _ = load_checkpoint(str(root / "step_00000002"), "cpu", torch.float32)
    assert state["step"] == 2 and state["reason"] == "final"


class Killed(BaseException):
    """The process dying at this point (SIGKILL cannot be caught; the test stops the save here instead)."""


def test_a_kill_while_an_old_checkpoint_is_removed_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Keep-last-K removes an old checkpoint file by file: a kill half-way used to leave a `step_` directory that
    still held trainer_state.json but not its optimizer (or model) file, listed as a complete checkpoint (a real
    SIGKILL of `dsv3 train --save-every 1` left one). The directory leaves the list before its files go."""
    from conftest import make_model, tiny_cfg
    from dsv3.checkpoints import rundir

    model = make_model(tiny_cfg())
    opt = torch.optim.AdamW(model.parameters())
    root = str(tmp_path / "checkpoints")
    state = {"tokens": 0, "sampler": {}}
    rundir.save_checkpoint(root, 1, model, opt, state, keep=1)
    real = shutil.rmtree

    def dies_half_way(path, *args, **kwargs):
        if os.path.isfile(os.path.join(path, "optimizer.safetensors")):  # the old checkpoint's files going
            os.remove(os.path.join(path, "optimizer.safetensors"))
            raise Killed
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    with pytest.raises(Killed):
        rundir.save_checkpoint(root, 2, model, opt, state, keep=1)
    monkeypatch.undo()
    assert list_checkpoints(root) == [os.path.join(root, "step_00000002")]
    rundir.save_checkpoint(root, 3, model, opt, state, keep=1)  # the next save clears what the kill left
    assert sorted(os.listdir(root)) == ["step_00000003"]
    load_checkpoint(os.path.join(root, "step_00000003"), "cpu", torch.float32)


# --------------------------------------------------------------------------------------------------
# non-finite losses

def test_non_finite_step_is_skipped_exactly(env, tmp_path, monkeypatch):
    """A NaN loss at step 3: after it the weights, router biases, AdamW moments and step counts are
    bitwise those after step 2; it is counted; the next steps train on."""
    nan_loss_at(monkeypatch, {3})
    out = tmp_path / "run"
    summary = train(micro_config(), tcfg(env, out, steps=5, save_every=1, keep=0), log=quiet)
    ck = [os.path.join(out, "checkpoints", f"step_{s:08d}") for s in range(6)]
    assert same_state(ck[2], ck[3])
    assert not same_state(ck[3], ck[4]) and not same_state(ck[1], ck[2])
    recs = read_steps(out)
    assert [recs[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert not torch.isfinite(torch.tensor(recs[3]["loss"])) and torch.isfinite(torch.tensor(recs[4]["loss"]))
    assert summary["skipped_steps"] == 1 and summary["step"] == 5 and "stopped" not in summary


def test_consecutive_non_finite_steps_stop_the_run(env, tmp_path, monkeypatch):
    """NaN at steps 3 and 4 with max_skipped_steps 2 and log_every 3: the guard trips at step 4, skips
    every later step (5 and 6 are finite, still skipped), and the run stops at the next logged step (6)
    with a checkpoint holding the state from before step 3 (that of checkpoint 2)."""
    nan_loss_at(monkeypatch, {3, 4})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"stopped at step 6: 4 consecutive steps skipped \(steps 3-6\): the loss "
                                             r"or gradient norm was not finite in max_skipped_steps \(2\) steps in a "
                                             r"row; the weights and optimizer state are those after step 2"):
        train(micro_config(), tcfg(env, out, steps=20, save_every=2, keep=0, log_every=3, max_skipped_steps=2),
              log=quiet)
    root = out / "checkpoints"
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["step_00000002", "step_00000004",
                                                                    "step_00000006"]
    assert trainer_state(root / "step_00000006")["reason"] == "nonfinite"
    assert same_state(root / "step_00000002", root / "step_00000006")
    s = read_summary(out)
    assert s["skipped_steps"] == 4 and s["step"] == 6 and "stopped" in s
    assert read_steps(out)[6]["skipped_steps"] == 4


def test_skipped_step_counts_survive_a_resume(env, tmp_path, monkeypatch):
    """The guard's counters are run state: a resume from a checkpoint taken inside a run of skipped steps goes on
    counting as the uninterrupted run does (they restarted at 0: the skipped_steps records and the summary counted
    only the resumed part, and a run that had to stop went on)."""
    nan_loss_at(monkeypatch, {2, 3, 4})
    a, c = tmp_path / "a", tmp_path / "c"
    kw = dict(steps=8, save_every=3, keep=0)
    train(micro_config(), tcfg(env, a, **kw), log=quiet)
    mid = a / "checkpoints" / "step_00000003"
    shutil.copytree(mid, c / "checkpoints" / mid.name)
    train(micro_config(), tcfg(env, c, resume=True, **kw), log=quiet)
    ra, rc = read_steps(a), read_steps(c)
    assert [ra[s]["skipped_steps"] for s in range(1, 9)] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert [rc[s]["skipped_steps"] for s in range(4, 9)] == [3, 3, 3, 3, 3]
    assert read_summary(c)["skipped_steps"] == read_summary(a)["skipped_steps"] == 3
    # max_skipped_steps 3: the run stops after step 4 (steps 2-4), resumed at step 3 or not
    kw = dict(steps=8, save_every=3, keep=0, max_skipped_steps=3)
    for out in (tmp_path / "a3", tmp_path / "c3"):
        if out.name == "c3":
            shutil.copytree(tmp_path / "a3" / "checkpoints" / mid.name, out / "checkpoints" / mid.name)
        with pytest.raises(NonFiniteError, match=r"stopped at step 4: 3 consecutive steps skipped \(steps 2-4\)"):
            train(micro_config(), tcfg(env, out, resume=out.name == "c3", **kw), log=quiet)
    # a run stopped for them and resumed (e.g. with a lower --lr) is a new attempt: it is not stopped at once
    assert train(micro_config(), tcfg(env, tmp_path / "c3", resume=True, **kw), log=quiet)["step"] == 8


def test_non_finite_stop_is_one_line_from_the_cli(env, tmp_path, monkeypatch, capsys):
    from dsv3.cli import main

    nan_loss_at(monkeypatch, set(range(1, 100)))
    cfg = tmp_path / "micro.json"
    micro_config().to_json(cfg)
    argv = ["train", "--config", str(cfg), "--data", env["data"], "--tokenizer", env["tokenizer"], "--cache-dir",
            env["cache"], "--out", str(tmp_path / "run"), "--steps", "20", "--seq-len", "32", "--batch-size", "4",
            "--eval-every", "0", "--val-permille", "200", "--no-progress", "--no-plots", "--samples", "0",
            "--device", "cpu", "--max-skipped-steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("dsv3 train: error: stopped at step 2: 2 consecutive steps skipped"), err


# --------------------------------------------------------------------------------------------------
# benchmarks that train keep one checkpoint

def _fp8_loss_text_bench():
    return bench_module("fp8_loss_text")


def test_fp8_loss_text_bench_writes_no_checkpoint_and_compares_at_the_last_common_validation(tmp_path, monkeypatch):
    """bench/fp8_loss_text.py runs `dsv3 train` N times at once (a `small` checkpoint is ~12 GB): no run writes a
    checkpoint; the data is prepared once before; a run stopped early (the deadline) still counts, at the last
    validation step that every run reached; a repeated precision:seed is compared bit for bit."""
    bench = _fp8_loss_text_bench()
    launched, prepped = [], []
    val = {("bf16", 0): 3.0, ("bf16", 1): 3.3, ("fp8", 0): 3.03, ("fp8", 1): 3.3}

    class FakeTrain:  # what `dsv3 train --no-checkpoints` leaves: metrics.jsonl, validations every 2 steps
        def __init__(self, cmd, stdout, stderr):
            launched.append(cmd)
            d, n = cmd[cmd.index("--out") + 1], int(cmd[cmd.index("--steps") + 1])
            prec, seed = cmd[cmd.index("--precision") + 1], int(cmd[cmd.index("--seed") + 1])
            done = 4 if d.endswith("fp8_seed1") else n  # this one was stopped at the deadline
            self.returncode = 0
            if "--deterministic" in cmd:  # this one failed before its first validation
                self.returncode = 1
                return
            with open(os.path.join(d, "metrics.jsonl"), "w") as f:
                for s in range(1, done + 1):
                    f.write(json.dumps({"step": s, "loss": 5.0 - s * 0.1 + (1e-7 if d.endswith("_r2") and s > 2
                                                                               else 0), "tok_per_s": 100.0}) + "\n")
                    if s % 2 == 0:
                        v = val[(prec, seed)] + (0.5 if s < 4 else 0.0)
                        f.write(json.dumps({"step": s, "val_loss": v, "val_bpb": v / 2.5}) + "\n")
                f.write('{"step": 9, "lo')  # a line cut off by the kill

        def poll(self):
            return 0

    monkeypatch.setattr(bench.subprocess, "Popen", FakeTrain)
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, check, stdout: prepped.append(cmd))
    bench.main(["--steps", "6", "--out", str(tmp_path / "b"), "--runs", "bf16:0,bf16:1,fp8:0,fp8:1,bf16:0,"
                "bf16:0:det", "--poll-s", "0"])
    assert len(prepped) == 1 and len(launched) == 6
    for cmd in launched + prepped:
        assert "--no-checkpoints" in cmd and "--save-every" not in cmd
        assert not os.path.exists(os.path.join(cmd[cmd.index("--out") + 1], "checkpoints"))
    res = json.load(open(tmp_path / "b" / "summary.json"))
    assert res["step"] == 4  # fp8 seed 1 stopped after step 4
    assert res["failed"] == ["bf16_seed0_det"] and res["ended"]["bf16_seed0_det"] == "exit 1"
    assert "bf16_seed0_det: exit 1 (see its log.txt)" in open(tmp_path / "b" / "report.md").read()
    with pytest.raises(SystemExit, match="not empty"):  # a second bench into the same --out would mix metrics
        bench.main(["--steps", "6", "--out", str(tmp_path / "b"), "--runs", "bf16:0,fp8:0", "--poll-s", "0"])
    assert [r["run"] for r in res["rows"]] == ["bf16_seed0", "bf16_seed1", "fp8_seed0", "fp8_seed1",
                                                "bf16_seed0_r2"]
    assert res["precisions"]["bf16"]["n"] == 2 and abs(res["precisions"]["bf16"]["mean"] - 3.15) < 1e-9
    paired = res["paired"]["fp8"]
    assert paired["seeds"] == [0, 1] and abs(paired["mean"] - 0.005) < 1e-9  # (+1%, 0%) / 2
    unpaired = res["unpaired"]["fp8"]  # bf16 3.0, 3.3, 3.0 (the repeat) against fp8 3.03, 3.3
    assert unpaired["n"] == [3, 2] and abs(unpaired["mean"] - (3.165 / 3.1 - 1)) < 1e-9
    se = math.sqrt(0.03 / 3 + 0.03645 / 2)  # sample variances over n
    df = (0.01 + 0.018225) ** 2 / (0.01 ** 2 / 2 + 0.018225 ** 2 / 1)
    assert abs(unpaired["df"] - df) < 1e-6 and abs(unpaired["ci95"] - 4.303 * se / 3.1) < 1e-9  # floor(df) = 2
    (rep,) = res["repeats"]
    assert rep["runs"] == ["bf16_seed0", "bf16_seed0_r2"] and not rep["identical"] and rep["first_diff_step"] == 3
    assert "paired fp8 / bf16 - 1" in open(tmp_path / "b" / "report.md").read()



def _fp8_loss_summary(tmp_path, name, runs, steps=800, extra=""):
    """A summary.json of bench/fp8_loss_text.py with deterministic runs [(precision, seed, val_curve)]."""
    rows = [{"run": f"{p}_seed{s}", "precision": p, "seed": s, "deterministic": True, "val_loss": c[-1][1],
             "val_bpb": c[-1][1] / 2.0, "steps_done": c[-1][0], "tok_per_s": 1.0, "val_curve": c}
            for p, s, c in runs]
    path = tmp_path / name
    path.write_text(json.dumps({"rows": rows, "command": f"bench/fp8_loss_text.py --steps {steps} --deterministic "
                                f"--runs x --out {name} --deadline-min 7{extra}"}))
    return str(path)


def test_fp8_loss_text_bench_pools_calls_with_the_same_settings(tmp_path):
    """--combine: two calls' summaries (other seeds, other --runs / --deadline-min / --out) pool into one comparison
    at their last common validation step; calls with other settings, or a file that is no summary, are refused
    with the file and the setting named."""
    bench = _fp8_loss_text_bench()

    def summary(name, steps, runs, extra=""):
        return _fp8_loss_summary(tmp_path, name, runs, steps, extra)

    a = summary("a.json", 800, [("bf16", 0, [[100, 6.0], [200, 5.0]]), ("fp8", 0, [[100, 6.1], [200, 5.05]])])
    b = summary("b.json", 800, [("bf16", 1, [[100, 6.2], [200, 5.2]]), ("fp8", 1, [[100, 6.0]])])  # fp8 1: stopped
    res = bench.combine([a, b])
    assert res["step"] == 100 and [r["run"] for r in res["rows"]] == [
        "bf16_seed0@1", "fp8_seed0@1", "bf16_seed1@2", "fp8_seed1@2"]
    assert [r["val_loss"] for r in res["rows"]] == [6.0, 6.1, 6.2, 6.0]
    assert res["rows"][0]["val_bpb"] == 3.0  # the bits per byte at the pooled step, not the run's last
    paired = res["paired"]["fp8 deterministic"]
    assert paired["seeds"] == [0, 1] and abs(paired["mean"] - (0.1 / 6.0 - 0.2 / 6.2) / 2) < 1e-12
    assert res["unpaired"]["fp8 deterministic"]["n"] == [2, 2]
    bench.main(["--combine", a, b, "--out", str(tmp_path / "pooled")])
    assert "4 runs pooled from 2 calls: small, 800 steps" in (tmp_path / "pooled" / "combined.md").read_text()
    with pytest.raises(SystemExit, match=r"c.json and .*a.json ran with other settings \(--steps\)"):
        bench.combine([a, summary("c.json", 900, [("bf16", 2, [[100, 6.0]])])])
    with pytest.raises(SystemExit, match=r"--lr"):
        bench.combine([a, summary("d.json", 800, [("bf16", 2, [[100, 6.0]])], extra=" --lr 1e-3")])
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"e.json is not a summary.json of this bench"):
        bench.combine([a, str(tmp_path / "e.json")])


def test_fp8_loss_text_bench_combine_counts_a_deterministic_rerun_once(tmp_path):
    """--combine: a deterministic run stopped by a deadline in one call and run again whole in a later one counts
    once, as its furthest copy (the pooled step is then the full run's), and the copies' validation curves are
    compared where both have them: equal bit for bit, or the first step where they part."""
    bench = _fp8_loss_text_bench()

    def summary(name, runs):
        return _fp8_loss_summary(tmp_path, name, runs)

    a = summary("a.json", [("bf16", 0, [[100, 6.0], [200, 5.0]]), ("fp8", 0, [[100, 6.1]])])  # fp8 0: stopped
    b = summary("b.json", [("fp8", 0, [[100, 6.1], [200, 5.1]])])  # fp8 0 again, whole
    res = bench.combine([a, b])
    assert res["step"] == 200 and [r["run"] for r in res["rows"]] == ["bf16_seed0@1", "fp8_seed0@2"]
    assert res["paired"]["fp8 deterministic"]["rel_diff"] == [5.1 / 5.0 - 1]
    assert res["repeats"] == [{"runs": ["fp8_seed0@2", "fp8_seed0@1"], "steps_compared": 1, "what": "validation",
                               "identical": True, "first_diff_step": None, "max_rel_diff": 0.0}]
    c = summary("c.json", [("fp8", 0, [[100, 6.2], [200, 5.1]])])  # a copy that is not one: reported, not hidden
    res = bench.combine([a, c])
    assert res["repeats"][0]["identical"] is False and res["repeats"][0]["first_diff_step"] == 100
    text = bench.report(res, "pooled")
    assert "fp8_seed0@1 is a copy of fp8_seed0@2" in text and "differ from step 100" in text


def test_fp8_loss_text_bench_statistics_edge_cases():
    """Welch with no spread at all (deterministic repeats): a zero-width interval, not a crash; t quantiles
    beyond the table's 30 degrees of freedom err wide."""
    bench = _fp8_loss_text_bench()
    w = bench.welch([3.0, 3.0], [3.03, 3.03])
    assert w["ci95"] == 0.0 and abs(w["mean"] - 0.01) < 1e-12
    assert bench.t95(1.7) == 12.706 and bench.t95(11) == 2.201 and bench.t95(500) == bench.t95(float("inf")) == 2.042
    assert bench.t_interval([1.0]) != bench.t_interval([1.0])  # nan for one sample


def test_fp8_loss_text_bench_refuses_a_bad_run_list():
    bench = _fp8_loss_text_bench()
    with pytest.raises(SystemExit, match="PRECISION:SEED"):
        bench.parse_runs("bf16:0,fp8")
    with pytest.raises(SystemExit, match="must be bf16, fp8 or fp32"):
        bench.parse_runs("int8:0")
    with pytest.raises(SystemExit, match="PRECISION:SEED"):
        bench.parse_runs("bf16:0:fast")
    assert [r[3] for r in bench.parse_runs("bf16:1,bf16:1:det,bf16:1,bf16:1:det")] == [
        "bf16_seed1", "bf16_seed1_det", "bf16_seed1_r2", "bf16_seed1_det_r2"]
