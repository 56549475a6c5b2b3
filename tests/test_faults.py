"""Failures of one training process: a full disk (checked before a save, or met while writing), a
non-finite loss (the step is skipped; too many in a row stop the run), a half-written checkpoint
directory, and the benchmark that trains keeping one checkpoint. CPU, the micro model of
tests/test_training.py; ~30 s on 2 cores. The torchrun cases are in tests/distributed/test_faults_dist.py.

Run: python -m pytest tests/test_faults.py -q
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil

import pytest
import torch

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

def test_fp8_loss_text_bench_keeps_at_most_one_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    """bench/fp8_loss_text.py trains `small` three times through `dsv3 train` (~12 GB a checkpoint): each
    run writes only its final checkpoint, which is removed once its metrics are read."""
    spec = importlib.util.spec_from_file_location("fp8_loss_text", os.path.join(REPO, "bench", "fp8_loss_text.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []

    def fake_run(cmd, check):  # what `dsv3 train` leaves: metrics with a final validation, checkpoints
        seen.append(cmd)
        d = cmd[cmd.index("--out") + 1]
        n = int(cmd[cmd.index("--steps") + 1])
        save_every = int(cmd[cmd.index("--save-every") + 1]) if "--save-every" in cmd else 100
        for s in [s for s in range(save_every, n, save_every)] + [n] if save_every else [n]:
            os.makedirs(os.path.join(d, "checkpoints", f"step_{s:08d}"))
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": n, "loss": 3.0}) + "\n")
            f.write(json.dumps({"step": n, "val_loss": 3.1, "val_bpb": 1.2, "final": True}) + "\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench.main(["--steps", "300", "--out", str(tmp_path / "b")])
    assert len(seen) == 3
    for cmd in seen:
        assert cmd[cmd.index("--save-every") + 1] == "0" and cmd[cmd.index("--keep") + 1] == "1"
        assert not os.path.exists(os.path.join(cmd[cmd.index("--out") + 1], "checkpoints"))
