"""Training loop tests: the loss falls, exact resume (after Ctrl-C and from a periodic checkpoint),
Ctrl-C saves, a kill or a crash during a save never damages the previous checkpoint, keep-last-K,
gradient accumulation, the bias update, and clear errors for bad inputs. CPU, fp32, a ~0.3M
parameter model on a small synthetic corpus; the whole file takes about half a minute.

Run: python -m pytest tests/test_training.py -q
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import textwrap
import time
from dataclasses import asdict

import pytest
import torch

import dsv3.checkpoints.hf
from dsv3.config import ModelConfig
from dsv3.training import strategy as strategy_mod
from dsv3.checkpoints.rundir import latest_checkpoint, list_checkpoints, load_checkpoint
from dsv3.training.data import CorpusError, build_token_cache
from dsv3.training.config import TrainConfig
from dsv3.training.pretrain import train
from dsv3.tokenizer import DSTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(**overrides) -> ModelConfig:
    """1 dense + 2 MoE layers and one MTP module (3 routers), 8 experts top-2 in 2 groups (top-1 group)."""
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=1, torch_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base).validate()


def write_corpus(root, n_files: int = 40, seed: int = 0) -> str:
    """A deterministic directory of small Python-like files (~12K train tokens with a 512 BPE)."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "items", "index", "result"]
    os.makedirs(root, exist_ok=True)
    for i in range(n_files):
        lines = []
        for j in range(30):
            a, b = rng.choice(names), rng.choice(names)
            lines.append(f"def {a}_{j}({b}):\n    return {b} + {rng.randint(0, 99)}\n")
        ext = ".py" if i % 4 else ".txt"
        with open(os.path.join(root, f"f{i:02d}{ext}"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return str(root)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Corpus, a 512-token BPE trained on it once, and a shared cache directory."""
    base = tmp_path_factory.mktemp("training")
    data = write_corpus(base / "corpus")
    tok = DSTokenizer.train((p.read_text(encoding="utf-8") for p in sorted((base / "corpus").iterdir())), 512)
    tok_dir = str(tok.save(base / "tokenizer"))
    return {"data": data, "tokenizer": tok_dir, "cache": str(base / "cache")}


def tcfg(env, out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), data=env["data"], tokenizer=env["tokenizer"], cache_dir=env["cache"],
                steps=8, seq_len=32, batch_size=4, lr=3e-3, val_permille=200, eval_every=0, save_every=0,
                log_every=1, progress=False, plots=False)  # plots: ~2 s a run; one test asks for them
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args) -> None:
    pass


def read_steps(run_dir) -> dict[int, dict]:
    """Per-step training records of metrics.jsonl (the last one of each step)."""
    recs = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "main" in r:
                recs[r["step"]] = r
    return recs


def trainer_state(ckpt_dir) -> dict:
    with open(os.path.join(ckpt_dir, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def read_summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def interrupt_after(monkeypatch, n_steps: int) -> None:
    """Send SIGINT (Ctrl-C) to this process from inside optimizer step `n_steps`: the loop's handler
    must finish that step, save with reason "interrupted" and return."""
    real = strategy_mod.update_expert_bias
    calls = {"n": 0}

    def wrapped(routers, counts, gamma, *applied):
        real(routers, counts, gamma, *applied)
        calls["n"] += 1
        if calls["n"] == n_steps:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(strategy_mod, "update_expert_bias", wrapped)


def assert_same_weights(ckpt_a, ckpt_b) -> None:
    ma, sa, oa, _ = load_checkpoint(ckpt_a, "cpu", torch.float32)
    mb, sb, ob, _ = load_checkpoint(ckpt_b, "cpu", torch.float32)
    da, db = ma.state_dict(), mb.state_dict()
    assert da.keys() == db.keys()
    assert any(k.endswith("e_score_correction_bias") for k in da)
    for k in da:
        assert torch.equal(da[k], db[k]), k
    assert oa.keys() == ob.keys()
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k
    assert sa["step"] == sb["step"] and sa["tokens"] == sb["tokens"] and sa["sampler"] == sb["sampler"]


# ------------------------------------------------------------------------------------------------
# learning

def test_loss_falls_and_run_artifacts(env, tmp_path):
    out = tmp_path / "run"
    mc = micro_config()
    summary = train(mc, tcfg(env, out, steps=40, eval_every=20, eval_batches=2, plots=True), log=quiet)
    recs = read_steps(out)
    assert sorted(recs) == list(range(1, 41))
    first = sum(recs[s]["main"] for s in (1, 2, 3)) / 3
    last = sum(recs[s]["main"] for s in (38, 39, 40)) / 3
    assert first > math.log(512) - 0.5  # starts near uniform
    assert last < first - 2.0, (first, last)  # this corpus is very repetitive: 6.2 -> ~1.8 nats
    assert summary["train_loss"] == recs[40]["main"] and summary["step"] == 40
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < first - 2.0
    assert summary["val_bpb"] > 0 and summary["val_tokens"] > 0

    n_routers = 3  # 2 main MoE layers + the MTP module's MoE
    for r in recs.values():
        for k in ("loss", "main", "mtp", "balance", "lr", "grad_norm", "tok_per_s"):
            assert math.isfinite(r[k]), (k, r)
        assert r["tok_per_s"] > 0 and r["grad_norm"] > 0 and r["mtp"] > 0
        assert len(r["maxvio"]) == n_routers and all(v >= 0 for v in r["maxvio"])
        assert len(r["load"]) == n_routers and all(abs(sum(row) - 1) < 1e-3 for row in r["load"])
    assert recs[40]["mtp"] < recs[1]["mtp"]  # the MTP module learns too
    # total = main + λ/D·Σ mtp + α·L_Bal; "mtp" is the mean over depths, "balance" is logged with α
    # applied (λ = 0.3 before 67.6% of the run, 0.1 after)
    for s in (1, 40):
        r = recs[s]
        assert 0 < r["balance"] < 1e-4 * 3 * 8  # α · Σ_layers L_Bal, L_Bal <= E per layer
        assert r["loss"] == pytest.approx(r["main"] + r["mtp_lambda"] * r["mtp"] + r["balance"], rel=1e-6)
    assert recs[1]["mtp_lambda"] == 0.3 and recs[40]["mtp_lambda"] == 0.1

    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    vals = [v for v in vals if "val_loss" in v]
    assert [v["step"] for v in vals] == [20, 40] and vals[-1].get("final") is True
    for name in ("loss.png", "expert_load.png", "summary.json", "train_config.json"):
        assert (out / name).stat().st_size > 0, name
    assert [os.path.basename(p) for p in list_checkpoints(out / "checkpoints")] == ["step_00000040"]
    ck = latest_checkpoint(out / "checkpoints")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors",
                 "rng.safetensors", "trainer_state.json"):
        assert os.path.exists(os.path.join(ck, name)), name
    assert trainer_state(ck)["reason"] == "final"


def test_gradient_accumulation_matches_full_batch(env, tmp_path):
    """batch 4 as one micro-batch of 4 or two of 2: the same windows, the same mean loss (the
    balance term is a mean over sequences, so it splits evenly too), the same update."""
    mc = micro_config()
    train(mc, tcfg(env, tmp_path / "full", steps=3), log=quiet)
    train(mc, tcfg(env, tmp_path / "accum", steps=3, micro_batch_size=2), log=quiet)
    a, b = read_steps(tmp_path / "full"), read_steps(tmp_path / "accum")
    for s in (1, 2, 3):
        for k in ("loss", "main", "mtp", "balance", "grad_norm"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-5, abs=1e-7), (s, k)
        assert a[s]["load"] == b[s]["load"]  # expert counts summed over the micro-batches
    ma, _, oa, _ = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"), "cpu", torch.float32)
    mb, _, ob, _ = load_checkpoint(latest_checkpoint(tmp_path / "accum" / "checkpoints"), "cpu", torch.float32)
    # The accumulated gradients agree to float rounding: compare AdamW's moments, scaled per tensor.
    for k in oa:
        if k.endswith(("exp_avg", "exp_avg_sq")):
            scale = oa[k].abs().max().clamp_min(1e-30)
            assert ((oa[k] - ob[k]).abs().max() / scale) < 1e-4, k
    # The weights agree less tightly: AdamW's first update is g/(|g| + eps), so a gradient entry of
    # ~4e-9 (comparable to eps = 1e-8) turns a 1e-16 rounding difference into ~1e-5 of the step.
    n_off = n_all = 0
    for (k, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-4, msg=k)
        n_off += int((x - y).abs().gt(1e-6).sum())
        n_all += x.numel()
    assert n_off < 1e-3 * n_all, (n_off, n_all)  # and only in a handful of entries (14 of 330K here)


def test_bias_update_follows_the_step_load(env, tmp_path):
    """One step with γ > 0: every router's bias is exactly γ·sign(mean load − load) of that step's
    counts (main MoE layers and the MTP layer); with γ = 0 it stays exactly 0."""
    mc = micro_config()
    gamma = 0.01
    train(mc, tcfg(env, tmp_path / "g", steps=1, bias_gamma=gamma, micro_batch_size=2), log=quiet)
    load = read_steps(tmp_path / "g")[1]["load"]
    model, *_ = load_checkpoint(latest_checkpoint(tmp_path / "g" / "checkpoints"), "cpu", torch.float32)
    routers = model.routers()
    assert len(routers) == len(load) == 3
    for r, share in zip(routers, load):
        share = torch.tensor(share)
        expected = gamma * torch.sign(1.0 / len(share) - share)
        assert torch.equal(r.e_score_correction_bias, expected.float())
    assert any(r.e_score_correction_bias.abs().sum() > 0 for r in routers)

    train(mc, tcfg(env, tmp_path / "g0", steps=3, bias_gamma=0.0), log=quiet)
    model, *_ = load_checkpoint(latest_checkpoint(tmp_path / "g0" / "checkpoints"), "cpu", torch.float32)
    assert all(torch.equal(r.e_score_correction_bias, torch.zeros(8)) for r in model.routers())


# ------------------------------------------------------------------------------------------------
# exact resume

N = 8


def test_exact_resume_after_interrupt(env, tmp_path, monkeypatch):
    """N steps in one go == N/2 steps, Ctrl-C, --resume, N/2 steps: bitwise-equal losses and weights."""
    mc = micro_config()
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    train(mc, tcfg(env, a_out, steps=N, save_every=N // 2), log=quiet)
    assert (a_out / "summary.json").exists() and not (a_out / "loss.png").exists()  # plots=False: none

    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        interrupt_after(m, N // 2)
        s1 = train(mc, tcfg(env, b_out, steps=N, save_every=N // 2), log=quiet)
    assert s1["interrupted"] and s1["step"] == N // 2
    assert signal.getsignal(signal.SIGINT) is handler  # the loop put the previous handler back
    ck = latest_checkpoint(b_out / "checkpoints")
    assert trainer_state(ck)["step"] == N // 2
    logs = []
    s2 = train(mc, tcfg(env, b_out, steps=N, save_every=N // 2, resume=True), log=logs.append)
    assert not s2["interrupted"] and s2["step"] == N
    assert any("resumed from" in line and f"at step {N // 2}" in line for line in logs)

    a, b = read_steps(a_out), read_steps(b_out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for s in range(1, N + 1):
        for k in ("loss", "main", "mtp", "balance", "grad_norm", "lr", "tokens", "maxvio", "load"):
            assert b[s][k] == a[s][k], (s, k, a[s][k], b[s][k])  # ==, not approx
    assert_same_weights(latest_checkpoint(a_out / "checkpoints"), latest_checkpoint(b_out / "checkpoints"))
    assert s2["val_loss"] == read_summary(a_out)["val_loss"]


def test_exact_resume_from_periodic_checkpoint(env, tmp_path):
    """A copy of run A's periodic checkpoint at N/2, resumed in a fresh run directory, reproduces
    run A's second half exactly (the checkpoint alone carries everything: no in-memory state)."""
    mc = micro_config()
    a_out, c_out = tmp_path / "a", tmp_path / "c"
    train(mc, tcfg(env, a_out, steps=N, save_every=N // 2, keep=0), log=quiet)
    mid = os.path.join(a_out, "checkpoints", f"step_{N // 2:08d}")
    assert trainer_state(mid)["reason"] == "periodic"
    shutil.copytree(mid, c_out / "checkpoints" / os.path.basename(mid))
    train(mc, tcfg(env, c_out, steps=N, save_every=N // 2, resume=True), log=quiet)
    a, c = read_steps(a_out), read_steps(c_out)
    assert sorted(c) == list(range(N // 2 + 1, N + 1))
    for s in c:
        assert (c[s]["loss"], c[s]["main"], c[s]["grad_norm"]) == (a[s]["loss"], a[s]["main"], a[s]["grad_norm"])
    assert_same_weights(latest_checkpoint(a_out / "checkpoints"), latest_checkpoint(c_out / "checkpoints"))


# ------------------------------------------------------------------------------------------------
# interruption, crashes and kills

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from dsv3.config import ModelConfig
    from dsv3.training.config import TrainConfig
    from dsv3.training.pretrain import train

    args = json.loads(sys.argv[1])
    kill_on = args.get("kill_on_model_save", 0)
    if kill_on:
        import dsv3.checkpoints.hf as C
        calls = []

        def torn_save_then_sigkill(tensors, path):
            calls.append(path)
            if len(calls) == kill_on:  # a torn model file inside the half-written checkpoint, then die
                with open(path, "wb") as f:
                    f.write(b"\\0" * 1000)
                    f.flush()
                    os.fsync(f.fileno())
                print("KILLING", path, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            real(tensors, path)

        real = C._save_tensors
        C._save_tensors = torn_save_then_sigkill
    train(ModelConfig.from_dict(args["model"]), TrainConfig(**args["train"]), log=lambda *a: print(*a, flush=True))
""")


def start_child(tc: TrainConfig, mc: ModelConfig, **extra):
    """`python -c CHILD ARGS` as a process forked from the distributed tests' fork server (torch and dsv3 imported
    once, not ~3 s per child): a Popen-like handle (tests/distributed/harness.py ForkedProcess) whose stdout and
    stderr are one text."""
    from tests.distributed.harness import code_process

    arg = json.dumps({"model": mc.to_dict(), "train": asdict(tc), **extra})
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return code_process(CHILD, [arg], REPO, env)


def test_kill_during_save_keeps_previous_checkpoint(env, tmp_path):
    """SIGKILL while the second checkpoint's model file is half written: the first checkpoint is
    still the latest, loads, and --resume finishes the run with exactly the uninterrupted result."""
    mc = micro_config()
    out = tmp_path / "run"
    tc = tcfg(env, out, steps=6, save_every=2)
    proc = start_child(tc, mc, kill_on_model_save=2)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, stdout
    assert "KILLING" in stdout

    root = out / "checkpoints"
    names = sorted(os.listdir(root))
    assert "step_00000002" in names and "step_00000004" not in names, names
    partial = [n for n in names if n.startswith(".tmp-step_00000004")]
    assert len(partial) == 1, names  # the interrupted save really was in progress
    assert os.path.getsize(root / partial[0] / "model.safetensors") == 1000  # torn
    assert list_checkpoints(root) == [str(root / "step_00000002")]
    assert latest_checkpoint(root) == str(root / "step_00000002")
    model, state, opt_t, rng_t = load_checkpoint(latest_checkpoint(root), "cpu", torch.float32)
    assert state["step"] == 2 and state["reason"] == "periodic" and opt_t and rng_t

    summary = train(mc, tcfg(env, out, steps=6, save_every=2, resume=True), log=quiet)
    assert summary["step"] == 6 and not summary["interrupted"]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]  # cleaned by the next save
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["step_00000002", "step_00000004",
                                                                    "step_00000006"]
    ref = tmp_path / "ref"
    train(mc, tcfg(env, ref, steps=6, save_every=2), log=quiet)
    assert_same_weights(latest_checkpoint(ref / "checkpoints"), latest_checkpoint(root))


def test_crash_during_save_leaves_no_partial_checkpoint(env, tmp_path, monkeypatch):
    """An unexpected exception inside a save (a crashing writer; a full disk is tests/test_faults.py's)
    propagates as it is, removes its temporary directory and leaves the earlier checkpoints intact."""
    mc = micro_config()
    out = tmp_path / "run"
    real = dsv3.checkpoints.hf._save_tensors
    calls = []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("the writer crashed")
        real(tensors, path)

    monkeypatch.setattr(dsv3.checkpoints.hf, "_save_tensors", failing)
    with pytest.raises(RuntimeError, match="the writer crashed"):
        train(mc, tcfg(env, out, steps=6, save_every=2), log=quiet)
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_00000002"]
    load_checkpoint(latest_checkpoint(root), "cpu", torch.float32)


def test_ctrl_c_saves_and_resume_continues(env, tmp_path):
    """SIGINT to a training process: it finishes the step, saves a checkpoint marked "interrupted",
    exits 0; --resume continues from that step."""
    mc = micro_config()
    out = tmp_path / "run"
    tc = tcfg(env, out, steps=100_000)
    proc = start_child(tc, mc)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while not (metrics.exists() and metrics.read_text(encoding="utf-8").count("\n") >= 1):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, "child never logged a step"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    assert "interrupt: saving a checkpoint" in stdout
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None, stdout
    st = trainer_state(ck)
    assert st["reason"] == "interrupted"
    s = st["step"]
    assert 1 <= s < 100_000
    assert read_summary(out)["interrupted"] is True and read_summary(out)["step"] == s
    assert max(read_steps(out)) == s  # the interrupted step was completed and logged before saving

    logs = []
    summary = train(mc, tcfg(env, out, steps=s + 2, resume=True), log=logs.append)
    assert any(f"at step {s}" in line for line in logs)
    assert summary["step"] == s + 2 and not summary["interrupted"]
    recs = read_steps(out)
    assert {s + 1, s + 2} <= set(recs) and recs[s + 1]["tokens"] == (s + 1) * 4 * 32


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="maps fds to paths through /proc")
def test_save_fsyncs_every_file_then_renames(env, tmp_path, monkeypatch):
    """Atomic save: every file of the checkpoint is fsynced inside the temporary directory, then
    that directory, then (after the rename) the checkpoints directory."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "run"
    train(micro_config(), tcfg(env, out, steps=1), log=quiet)
    monkeypatch.undo()
    root = os.path.realpath(out / "checkpoints")
    final = os.path.join(root, "step_00000001")
    tmp_dirs = {os.path.dirname(p) for p in synced if os.path.basename(os.path.dirname(p)).startswith(".tmp-step_")}
    assert len(tmp_dirs) == 1, synced
    tmp = tmp_dirs.pop()
    for name in os.listdir(final):
        assert os.path.join(tmp, name) in synced or os.path.join(tmp, name + ".tmp") in synced, name
    assert synced.index(tmp) > max(i for i, p in enumerate(synced) if os.path.dirname(p) == tmp)
    assert synced[-1] == root or synced.index(root) > synced.index(tmp)


def test_second_ctrl_c_aborts_without_saving(env, tmp_path, monkeypatch):
    real = strategy_mod.update_expert_bias

    def twice(routers, counts, gamma, *applied):
        real(routers, counts, gamma, *applied)
        os.kill(os.getpid(), signal.SIGINT)  # the first sets the stop flag ...
        os.kill(os.getpid(), signal.SIGINT)  # ... the second gives up at once

    monkeypatch.setattr(strategy_mod, "update_expert_bias", twice)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(micro_config(), tcfg(env, out, steps=4), log=quiet)
    assert signal.getsignal(signal.SIGINT) is handler
    assert list_checkpoints(out / "checkpoints") == []


def test_keep_last_k(env, tmp_path):
    out = tmp_path / "run"
    train(micro_config(), tcfg(env, out, steps=5, save_every=1, keep=2), log=quiet)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000004", "step_00000005"]
    assert trainer_state(out / "checkpoints" / "step_00000005")["reason"] == "final"


def test_tokens_budget_sets_the_step_count(env, tmp_path):
    summary = train(micro_config(), tcfg(env, tmp_path / "run", steps=0, tokens=3 * 4 * 32 + 1), log=quiet)
    assert summary["total_steps"] == summary["step"] == 4 and summary["tokens"] == 4 * 4 * 32


def test_batch_ramp(env, tmp_path):
    """batch_start 2 -> batch 4 over 2 steps, micro-batches of 2: step 1 uses 2 sequences, the last the
    full 4; every step is a whole number of micro-batches."""
    out = tmp_path / "run"
    train(micro_config(), tcfg(env, out, steps=4, micro_batch_size=2, batch_start=2, batch_ramp_steps=2), log=quiet)
    recs = read_steps(out)
    tokens = [recs[s]["tokens"] for s in range(1, 5)]
    per_step = [b - a for a, b in zip([0] + tokens, tokens)]
    assert per_step[0] == 2 * 32 and per_step[-1] == 4 * 32
    assert all(n % (2 * 32) == 0 for n in per_step) and per_step == sorted(per_step)


# ------------------------------------------------------------------------------------------------
# bad inputs

def test_empty_data_directory(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"\x00\x01")  # not a text extension: ignored
    for tok in (None, env["tokenizer"]):
        with pytest.raises(CorpusError, match="no documents") as e:
            train(micro_config(), tcfg(env, tmp_path / "run", data=str(empty), tokenizer=tok), log=quiet)
        assert str(empty) in str(e.value)


def test_missing_data_path(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        train(micro_config(), tcfg(env, tmp_path / "run", data=str(tmp_path / "does-not-exist")), log=quiet)


def test_corpus_smaller_than_one_sequence(env, tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.py").write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"fewer than one sequence of seq_len\+1 = 33") as e:
        train(micro_config(), tcfg(env, tmp_path / "run", data=str(tiny), val_permille=0), log=quiet)
    assert "tokens" in str(e.value) and "smaller seq_len" in str(e.value)
    # enough tokens for two windows of 33 but not for a batch of 4 windows
    tok = DSTokenizer.load(env["tokenizer"])
    text = ""
    while len(tok.encode(text)) + 1 < 2 * 32 + 1:  # +1: the EOS after the document
        text += "def value_1(beta):\n    return beta + 7\n"
    assert len(tok.encode(text)) + 1 < 4 * 32 + 1
    (tiny / "a.py").write_text(text, encoding="utf-8")
    with pytest.raises(CorpusError, match="= 2 windows of seq_len 32, fewer than one global batch of 4"):
        train(micro_config(), tcfg(env, tmp_path / "run", data=str(tiny), val_permille=0, fim_rate=0.0), log=quiet)


def test_non_utf8_file_is_skipped_and_counted(env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    (data / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    logs = []
    summary = train(micro_config(), tcfg(env, tmp_path / "run", data=str(data), tokenizer=None, steps=2),
                    log=logs.append)  # tokenizer=None: the BPE is trained on the corpus (skipping it too)
    assert summary["step"] == 2
    assert any("skipped 1 non-UTF-8 files" in line for line in logs), logs
    tok = DSTokenizer.load(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    cache = build_token_cache(str(data), tok, os.path.join(env["cache"], "tokens"), val_permille=200,
                              fim_rate=0.1, fim_seed=0, progress=False)
    assert cache.reused and cache.meta["n_skipped"] == 1 and cache.meta["skipped_files"] == ["latin1.txt"]


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=4, micro_batch_size=3), "multiple of micro_batch_size"),
    (dict(steps=0), "steps must be > 0"),
    (dict(seq_len=0), "seq_len must be > 0"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(lr=float("inf")), "lr must be a finite number > 0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
    (dict(grad_clip=-1.0), "grad_clip must be a finite number >= 0"),
    (dict(grad_clip=float("nan")), "grad_clip must be"),
    (dict(mtp_lambda=float("nan")), "mtp_lambda must be"),
    (dict(bias_gamma=float("inf")), "bias_gamma must be"),
    (dict(balance_alpha=-1.0), "balance_alpha must be"),
    (dict(warmup_steps=-7), "warmup_steps must be >= 0"),
    (dict(tokens=-5), "tokens must be >= 0"),
    (dict(eval_batches=0), "eval_batches must be >= 1"),
    (dict(save_every=-1), "save_every must be >= 0"),
    (dict(keep=-1), "keep must be >= 0"),
    (dict(eval_every=-5), "eval_every must be >= 0"),
    (dict(precision="fp16"), "precision must be"),
    (dict(log_every=0), "log_every must be >= 1"),
    (dict(recompute="partial"), "recompute must be"),  # (bf16 autocast runs on the CPU too: test_compose.py)
    (dict(batch_size=8, micro_batch_size=4, batch_start=2, batch_ramp_steps=2), "batch_start"),
    (dict(micro_batch_size=-2), "micro_batch_size must be >= 0"),  # (was: "the global batch_size=-2 ...", after the data)
    (dict(micro_batch_size=-3), "micro_batch_size must be >= 0"),
    (dict(batch_size=4, batch_start=16, batch_ramp_steps=2), "batch_start .* <= batch_size"),  # (was: 16 rows at step 0)
])
def test_bad_train_config(env, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train(micro_config(), tcfg(env, tmp_path / "run", **kw), log=quiet)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(fim_rate=1.5), r"fim_rate must be in \[0, 1\]"),
    (dict(fim_rate=-0.1), r"fim_rate must be in \[0, 1\]"),
    (dict(fim_rate=float("nan")), r"fim_rate must be in \[0, 1\]"),
    (dict(val_permille=2000), r"val_permille must be in \[0, 1000\]"),
    (dict(val_permille=-5), r"val_permille must be in \[0, 1000\]"),
])
def test_data_settings_checked_with_the_config(kw, match):
    """--fim-rate / --val-permille out of range are refused by TrainConfig.validate, before any data work (they were
    caught only by build_token_cache, after a BPE had been trained on the corpus; --val-permille 2000 said 'no
    training text ... in the held-out split')."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(out_dir="unused", **kw).validate()
    TrainConfig(out_dir="unused", fim_rate=1.0, val_permille=1000).validate()  # the bounds themselves are fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_requested_without_cuda(env, tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(micro_config(), tcfg(env, tmp_path / "run", device="cuda"), log=quiet)


def test_existing_checkpoints_need_resume(env, tmp_path):
    out = tmp_path / "run"
    train(micro_config(), tcfg(env, out, steps=1), log=quiet)
    with pytest.raises(ValueError, match="--resume"):
        train(micro_config(), tcfg(env, out, steps=2), log=quiet)
    # resuming with a different window length cannot reproduce the sampler: a clear error
    with pytest.raises(ValueError, match="seq_len"):
        train(micro_config(), tcfg(env, out, steps=2, seq_len=16, resume=True), log=quiet)


def test_resume_without_checkpoint_starts_fresh(env, tmp_path):
    logs = []
    summary = train(micro_config(), tcfg(env, tmp_path / "run", steps=1, resume=True), log=logs.append)
    assert summary["step"] == 1 and any("no checkpoint" in line for line in logs)


def test_resume_refuses_a_run_that_left_metrics_but_no_checkpoint(env, tmp_path):
    """--resume on the directory of a --no-checkpoints run: nothing to continue, and a fresh start would append to
    its metrics and replace its summary; refused, the earlier run's files untouched."""
    out = tmp_path / "run"
    train(micro_config(), tcfg(env, out, steps=2, checkpoints=False), log=quiet)
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "summary.json")}
    with pytest.raises(ValueError, match="no checkpoint to continue"):
        train(micro_config(), tcfg(env, out, steps=1, resume=True), log=quiet)
    assert {f: (out / f).read_bytes() for f in before} == before


def test_tokenizer_larger_than_model_vocab(env, tmp_path):
    n = DSTokenizer.load(env["tokenizer"]).vocab_size  # 432: the corpus is too small for all 512 merges
    assert 300 < n <= 512
    with pytest.raises(ValueError, match=f"tokenizer has {n} tokens but the model's vocab_size is 300"):
        train(micro_config(vocab_size=300), tcfg(env, tmp_path / "run"), log=quiet)


def test_config_json_names_the_tokenizers_bos_and_eos_ids(env, tmp_path):
    """config.json's bos/eos_token_id (the ids transformers' generate starts and stops at) said 0 / 1 whatever the
    tokenizer: one whose DeepSeek specials sit at other ids (DeepSeek-V2's at 100000..) left them naming other
    tokens. The ids are not architecture: --init-from with a preset still matches such a checkpoint."""
    from dsv3.training.extend import check_same_architecture, checkpoint_config

    spec = json.loads(DSTokenizer.load(env["tokenizer"]).tokenizer.to_str())
    added = {t["content"] for t in spec["added_tokens"]}
    vocab = {t: i for i, t in enumerate(sorted(set(spec["model"]["vocab"]) - added, key=spec["model"]["vocab"].get))}
    for t in spec["added_tokens"]:  # the specials after the ordinary tokens
        t["id"] = vocab[t["content"]] = len(vocab)
    spec["model"]["vocab"] = vocab
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    train(micro_config(), tcfg(env, tmp_path / "run", tokenizer=str(tmp_path / "tok"), steps=1), log=quiet)
    ck = latest_checkpoint(tmp_path / "run" / "checkpoints")
    tok = DSTokenizer.load(ck)
    config = json.loads(open(os.path.join(ck, "config.json"), encoding="utf-8").read())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id) != (0, 1)
    # and tokenizer_config.json's model_max_length is the model's context (transformers truncates to it)
    tok_config = json.loads(open(os.path.join(ck, "tokenizer_config.json"), encoding="utf-8").read())
    assert tok_config["model_max_length"] == config["max_position_embeddings"] != 131072
    check_same_architecture(micro_config(), checkpoint_config(ck), "--preset", ck)


def test_compile_flag_compiles_every_block_in_place(env, tmp_path, monkeypatch):
    """--compile compiles each main block and MTP module in place (so checkpoint names stay the same);
    the compilation itself is measured on the GPU (bench/train_speed.py), not run here."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    out = tmp_path / "run"
    train(micro_config(), tcfg(env, out, steps=1, compile=True), log=quiet)
    mc = micro_config()
    assert compiled == ["Block"] * mc.num_hidden_layers + ["MTPModule"] * mc.num_nextn_predict_layers
    assert latest_checkpoint(str(out / "checkpoints")) is not None


def test_no_checkpoints_runs_to_the_end_and_writes_none(env, tmp_path, monkeypatch):
    """--no-checkpoints: no periodic or final checkpoint, the metrics and the final validation still written."""
    mc = micro_config()
    out = tmp_path / "nock"
    s = train(mc, tcfg(env, out, steps=4, save_every=2, checkpoints=False), log=quiet)
    assert s["checkpoint"] is None and s["step"] == 4 and "val_loss" in s
    assert not os.path.exists(out / "checkpoints")
    assert sorted(read_steps(out)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="holds metrics.jsonl of an earlier run"):  # would append to its metrics
        train(mc, tcfg(env, out, steps=4, checkpoints=False), log=quiet)
    logs = []
    with monkeypatch.context() as m:  # Ctrl-C: the run stops after the step and says that nothing is saved
        interrupt_after(m, 2)
        s = train(mc, tcfg(env, tmp_path / "nock2", steps=4, checkpoints=False), log=logs.append)
    assert s["interrupted"] and s["step"] == 2 and s["checkpoint"] is None
    assert any("without a checkpoint (--no-checkpoints)" in line for line in logs), logs
    assert not os.path.exists(tmp_path / "nock2" / "checkpoints")


def test_deterministic_run_repeats_and_restores_the_global_settings(env, tmp_path, monkeypatch):
    """--deterministic: PyTorch's deterministic algorithms are on during the run (every op of the training step
    has one: none raises), off again after it, also after an error; two runs give the same losses bit for bit."""
    mc = micro_config()
    seen = []
    real = strategy_mod.Strategy.forward_backward

    def spy(self, *a, **kw):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic))
        return real(self, *a, **kw)

    monkeypatch.setattr(strategy_mod.Strategy, "forward_backward", spy)
    before = torch.are_deterministic_algorithms_enabled()
    for i in range(2):
        train(mc, tcfg(env, tmp_path / f"d{i}", steps=3, deterministic=True, checkpoints=False), log=quiet)
    runs = [read_steps(tmp_path / f"d{i}") for i in range(2)]
    assert seen and all(s == (True, True) for s in seen)
    assert torch.are_deterministic_algorithms_enabled() == before and os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    assert [r["loss"] for r in runs[0].values()] == [r["loss"] for r in runs[1].values()]
    with pytest.raises(ValueError):
        train(mc, tcfg(env, tmp_path / "bad", steps=3, deterministic=True, lr=-1.0), log=quiet)
    from dsv3.training.config import deterministic_mode

    with pytest.raises(RuntimeError), deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("inside the run")
    assert torch.are_deterministic_algorithms_enabled() == before and not torch.backends.cudnn.deterministic
