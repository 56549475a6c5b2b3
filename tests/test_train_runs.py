"""What a user meets around a training run (`dsv3 train`): resuming with the run's own settings, changing
its length without a jump in the learning rate, Ctrl-C (exit 130, the checkpoint's path, a closed stdout
pipe), and refusals before anything is built or written. CPU, the ~0.3M-parameter model of test_cli.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli, write_corpus
from dsv3.config import ModelConfig
from dsv3.training.optim import Schedule
from test_cli import MICRO

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    cfg = base / "micro.json"
    ModelConfig(**MICRO).validate().to_json(cfg)
    return {"base": base, "cfg": cfg, "data": write_corpus(base / "corpus"), "cache": base / "cache"}


def _common(s, out):
    return ["train", "--config", s["cfg"], "--data", s["data"], "--out", out, "--seq-len", 32, "--batch-size", 4,
            "--eval-every", 0, "--cache-dir", s["cache"], "--no-progress", "--no-plots", "--samples", 0]


def _records(out):
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "lr" in r]


def test_schedule_stretch_is_continuous():
    base = Schedule(100, peak_lr=1.0, warmup_steps=5)
    longer = base.stretched(80, 200)
    assert [longer.lr(s) for s in range(80)] == [base.lr(s) for s in range(80)]  # the past is unchanged
    assert longer.lr(80) == base.lr(80) and longer.run_steps == 200 and longer.total_steps == 100
    lrs = [longer.lr(s) for s in range(80, 200)]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))  # still decaying, no restart at the peak
    assert longer.lr(199) == base.lr(99)  # the same end
    # a finished run continues at its final learning rate; a second change composes with the first
    done = base.stretched(100, 150)
    assert {done.lr(s) for s in range(100, 150)} == {base.lr(99)}
    twice = longer.stretched(150, 300)
    assert twice.lr(150) == longer.lr(150) and twice.lr(299) == base.lr(99)
    assert twice.mtp_weight(299) == base.mtp_weight(99) and twice.gamma(299) == base.gamma(99)
    with pytest.raises(ValueError, match="leaves nothing to train"):
        base.stretched(80, 60)


def test_resume_keeps_the_runs_settings_and_extends_smoothly(setup, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 6, "--lr", 0.01, "--deterministic"])
    assert rc == 0, err
    # a plain --resume with no --config: no note about the model config, nothing ignored; a later step directory
    # without trainer_state.json (a save interrupted) is skipped, and said so
    (out / "checkpoints" / "step_00000007").mkdir()
    rc, stdout, err = run_cli(["train", "--out", out, "--resume", "--cache-dir", setup["cache"], "--no-progress",
                               "--no-plots", "--samples", 0])
    assert rc == 0, err
    assert "note: resuming with the checkpoint's model config" not in stdout and "resumed from" in stdout
    assert "note: skipped step_00000007, incomplete (a save that was interrupted)" in stdout, stdout
    (out / "checkpoints" / "step_00000007").rmdir()
    # the run's own length (6 steps, its --lr and --data), not the command line's defaults (300 steps)
    assert max(r["step"] for r in _records(out)) == 6 and "6 steps of 4 x 32 tokens, lr 0.01" in stdout
    # a longer run continues the schedule from where it was: no jump back up
    saved = lambda step: json.loads((out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())  # noqa: E731
    assert saved(6)["train_config"]["deterministic"] is True  # kept by the plain resume
    # ... and a setting the run kept can be turned off again (--no-deterministic, as --no-compile)
    rc, stdout, err = run_cli(["train", "--out", out, "--resume", "--steps", 10, "--cache-dir", setup["cache"],
                               "--no-progress", "--no-plots", "--samples", 0, "--no-deterministic"])
    assert rc == 0, err
    assert "resume: steps 6 -> 10" in stdout and "length changes from 6 to 10 steps at step 6" in stdout
    assert "resume: deterministic True -> False" in stdout and saved(10)["train_config"]["deterministic"] is False
    lr = {r["step"]: r["lr"] for r in _records(out)}
    assert max(lr) == 10 and all(lr[s] <= lr[6] * 1.0000001 for s in range(7, 11)), lr
    # and the stretch travels in the checkpoint: a further resume with the same length changes nothing
    state = saved(10)
    assert state["schedule"] == {"total_steps": 6, "stretches": [[6, 6, 10]]}
    # the finished run resumed at its own length: nothing to train, said, and its files left as they were (it used
    # to run the final evaluation again and rewrite summary.json without the training loss)
    before = {f: (out / f).read_bytes() for f in ("summary.json", "metrics.jsonl", "train_config.json")}
    assert json.loads(before["summary.json"])["train_loss"] is not None
    rc, stdout, err = run_cli(["train", "--out", out, "--resume", "--cache-dir", setup["cache"], "--no-progress",
                               "--no-plots", "--samples", 0])
    assert rc == 0 and "is finished (step 10 of 10): nothing to train" in stdout, err
    assert {f: (out / f).read_bytes() for f in before} == before
    # --tokenizer on a resume: refused (the checkpoint's tokenizer is the one its weights learned; it used to be
    # printed as applied and ignored)
    rc, _, err = run_cli(["train", "--out", out, "--resume", "--steps", 12, "--tokenizer", tmp_path / "other.json",
                          "--cache-dir", setup["cache"], "--no-progress", "--no-plots", "--samples", 0])
    assert rc == 2 and "--tokenizer: a resumed run keeps the tokenizer of its checkpoint" in err, err
    # the settings of its token stream, named (the sampler's refusal said "n_tokens=..., this one ..."); the same
    # ones spelt another way pass (a path written differently, the micro-batch given as the batch it was)
    for flag, value, said in (("--seed", 5, "--seed 5: the run being resumed has 0"),
                              ("--val-permille", 200, "--val-permille 200: the run being resumed has"),
                              ("--micro-batch-size", 2, "--micro-batch-size 2: the run being resumed has")):
        rc, _, err = run_cli(["train", "--out", out, "--resume", "--steps", 12, flag, value, "--cache-dir",
                              setup["cache"], "--no-progress", "--no-plots", "--samples", 0])
        assert rc == 2 and said in err and "drop " + flag in err, (flag, err)
    assert {f: (out / f).read_bytes() for f in before} == before
    rc, stdout, err = run_cli(["train", "--out", out, "--resume", "--data", os.path.join(setup["data"], "."),
                               "--micro-batch-size", 4, "--cache-dir", setup["cache"], "--no-progress", "--no-plots",
                               "--samples", 0])
    assert rc == 0 and "nothing to train" in stdout, err


def test_refusals_before_anything_is_written(setup, tmp_path):
    out = tmp_path / "never"
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 2, "--seq-len", 512])  # MICRO's context is 256
    assert rc == 2 and "--seq-len 512 is longer than the model's context (max_position_embeddings 256)" in err
    assert not out.exists()
    # too short for MICRO's MTP depth, and a seed numpy cannot take: refused before the run directory exists (they
    # failed after step 1, leaving a directory that blocked the corrected command)
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 2, "--seq-len", 1])
    assert rc == 2 and "--seq-len 1 leaves the model's 1 MTP depth(s) no position to predict" in err, err
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 2, "--seed", -1])
    assert rc == 2 and "seed must be in [0, 2^64), got -1" in err, err
    assert not out.exists()
    # extra training data that holds --data's validation documents (it made the validation loss meaningless,
    # silently): refused, naming a file; with no validation split there is nothing to leak
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 2, "--extra-data", setup["data"], "--val-permille", 200])
    assert rc == 2 and f"--extra-data {setup['data']}:" in err and "validation split (e.g. " in err, err
    assert not out.exists()
    # the logits alone of 10^6 windows cannot fit: refused in one line, before the data is read
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 2, "--batch-size", 1_000_000])
    assert rc == 2 and "logits of one micro-batch" in err and err.count("\n") == 1
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run_cli(_common(setup, afile) + ["--steps", 2])
    assert rc == 2 and "a file of that name exists" in err and err.count("\n") == 1
    # a file above --out or --cache-dir: one line naming it, before the data (it was "[Errno 20] Not a
    # directory" after the data and the model, or after the BPE)
    rc, _, err = run_cli(_common(setup, afile / "sub") + ["--steps", 2])
    assert rc == 2 and f"--out {afile / 'sub'}: {afile} is a file, so no directory can be made under it" in err, err
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 2, "--cache-dir", afile])
    assert rc == 2 and f"--cache-dir {afile}: a file of that name exists" in err and err.count("\n") == 1, err
    assert not out.exists()
    # dsv3 eval's outputs: checked before the evaluation runs (the checkpoint is not even looked at)
    rc, _, err = run_cli(["eval", tmp_path / "nowhere", "--out-json", afile / "r.json"])
    assert rc == 2 and f"--out-json {afile / 'r.json'}: {afile} is a file" in err and err.count("\n") == 1, err
    rc, _, err = run_cli(["eval", tmp_path / "nowhere", "--task", "needle", "--out-png", tmp_path])
    assert rc == 2 and f"--out-png {tmp_path}: is a directory (a file name is needed)" in err, err
    # a corpus too small for the vocabulary that is also malformed: the malformed line is named (it was the
    # vocabulary's error, which no vocabulary change would have fixed)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc"\n')
    args = _common(setup, out)
    args[args.index("--data") + 1] = bad
    rc, _, err = run_cli(args + ["--steps", 2])
    assert rc == 2 and f"{bad}:1: malformed JSON" in err and err.count("\n") == 1, err
    assert not out.exists()
    # bf16 working weights need bf16 (auto is fp32 on the CPU): one line, before anything is written
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 2, "--bf16-weights", "--device", "cpu"])
    assert rc == 2 and "--bf16-weights needs --precision bf16" in err and err.count("\n") == 1, err
    assert not out.exists()
    # a corpus without text: one line, no run directory, no tokenizer cached for it
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_bytes(b"\xff\xfe not utf-8 \xff" * 1000)  # large enough for the vocab check
    cache = tmp_path / "cache"
    argv = _common(setup, out) + ["--steps", 2, "--data", empty, "--cache-dir", cache]
    rc, _, err = run_cli(argv)
    assert rc == 2 and err.count("\n") == 1 and "no training text" in err, err
    assert not out.exists() and not (cache / "tokenizers").exists() or not os.listdir(cache / "tokenizers")


@pytest.mark.parametrize("edit, needle", [
    (lambda st: st["train_config"].update(lr=None), "train_config.lr = None is not a number"),
    (lambda st: st["train_config"].update(data=5), "train_config.data = 5 is not a string or null"),
    (lambda st: st["train_config"].update(deterministic="no"), "train_config.deterministic = 'no' is not true or"),
    (lambda st: st["train_config"].update(extra_data="x"), "train_config.extra_data = 'x' is not a list of strings"),
    (lambda st: st.update(schedule={"total_steps": 2, "stretches": [[1]]}), "schedule {"),
    (lambda st: st.update(schedule={"total_steps": "2", "stretches": []}), "schedule {"),
])
def test_resume_names_a_malformed_saved_setting(setup, tmp_path, edit, needle):
    """The settings a resume takes from trainer_state.json (the run's train_config, its schedule) are untrusted
    input: a value of the wrong type is one line naming the file and the setting (a TypeError's or an
    IndexError's traceback before), and nothing is written."""
    out = tmp_path / "run"
    assert run_cli(_common(setup, out) + ["--steps", 2])[0] == 0
    ts = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    st = json.loads(ts.read_text(encoding="utf-8"))
    edit(st)
    ts.write_text(json.dumps(st), encoding="utf-8")
    before = (out / "metrics.jsonl").read_bytes()
    rc, _, err = run_cli(["train", "--out", out, "--resume", "--steps", 3, "--cache-dir", setup["cache"],
                          "--no-progress", "--no-plots", "--samples", 0])
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "trainer_state.json" in err and needle in err, err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_ctrl_c_saves_says_where_and_exits_130_even_with_stdout_closed(setup, tmp_path):
    """`dsv3 train | tee log` then Ctrl-C: tee dies first, the progress bar's next write meets a closed
    pipe; the run must still save, print the checkpoint's path (stderr) and exit 130."""
    out = tmp_path / "run"
    argv = [a for a in _common(setup, out) if a != "--no-progress"] + ["--steps", 100000, "--log-every", 1]
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "-m", "dsv3.cli", *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0):
            assert time.time() < deadline and p.poll() is None, p.stderr.read().decode()
            time.sleep(0.2)
        p.stdout.close()  # the reader goes away (tee killed by the same Ctrl-C)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode()
    assert rc == 130, err
    ckpts = os.listdir(out / "checkpoints")
    assert len(ckpts) == 1 and f"saved {out / 'checkpoints' / ckpts[0]}" in err and "--resume" in err, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_an_empty_validation_split_is_said(setup, tmp_path):
    """--val-permille 0 (or too little data for one validation window): a note says the run reports no validation
    loss (it showed only as "val 0 tokens" and a summary without val_loss)."""
    out = tmp_path / "run"
    rc, stdout, err = run_cli(_common(setup, out) + ["--steps", 1, "--val-permille", 0])
    assert rc == 0, err
    assert "note: the validation split holds 0 tokens, less than one window of 33: this run reports no " \
           "validation loss" in stdout, stdout
    assert "val_loss" not in json.loads((out / "summary.json").read_text())


def test_a_run_stopped_at_its_last_step_finishes_on_resume(setup, tmp_path, monkeypatch):
    """Ctrl-C during the last step saves that step as "interrupted" and says to --resume: the resume finishes it
    (the final save and evaluation, summary.json no longer interrupted), not "nothing to train" (a review caught
    the finished-run shortcut taking this case too)."""
    from dsv3.training import pretrain

    out = tmp_path / "run"
    orig = pretrain.Pretrain.after_step

    def after_step(self, strategy, counts, hp, applied):
        orig(self, strategy, counts, hp, applied)
        self._n = getattr(self, "_n", 0) + 1
        if self._n == 3:  # the last of 3 steps
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(pretrain.Pretrain, "after_step", after_step)
    rc, _, err = run_cli(_common(setup, out) + ["--steps", 3, "--val-permille", 300])
    assert rc == 130 and "--resume" in err, err
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    monkeypatch.setattr(pretrain.Pretrain, "after_step", orig)
    rc, stdout, err = run_cli(["train", "--out", out, "--resume", "--cache-dir", setup["cache"], "--no-progress",
                               "--no-plots", "--samples", 0])
    assert rc == 0 and "nothing to train" not in stdout, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["step"] == 3 and "val_loss" in summary


def test_resume_compares_corpus_paths_as_the_corpus_reads_them():
    """--resume's check of --data / --extra-data: ~ expanded, symlinks and ./ resolved, None and "stdlib" the same
    default corpus (a path saved as typed, ~/corpus, was refused against the same directory spelt out)."""
    from dsv3.cli import _corpus_path

    assert _corpus_path(None) is None and _corpus_path("stdlib") is None
    assert _corpus_path("~/corpus") == os.path.realpath(os.path.join(os.path.expanduser("~"), "corpus"))
    assert _corpus_path("a/./b") == _corpus_path("a/b") != _corpus_path("a/c")
