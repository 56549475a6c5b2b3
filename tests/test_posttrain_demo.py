"""The post-training demonstration (bench/posttrain_demo.py) end to end at its `test` size: pre-training
with the project's loop, base / SFT / GRPO held-out accuracy, summary.json, GRPO metrics and plots.
It need not show an improvement at this size (the `cpu` and `gpu` profiles do). CPU, ~10 s.

Run: python -m pytest tests/test_posttrain_demo.py -q
"""

from __future__ import annotations

import json
import math
import os

import pytest

from conftest import bench_module
from dsv3.posttrain import tasks


def _demo():
    return bench_module("posttrain_demo")


def test_demo_test_profile_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    summary = _demo().main(["--profile", "test", "--out", out, "--device", "cpu"])
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk["accuracy"] == summary["accuracy"]
    acc = on_disk["accuracy"]
    assert set(acc) == {"base", "sft", "grpo"}
    assert all(0.0 <= acc[k] <= 1.0 for k in acc), acc
    assert on_disk["grpo_minus_sft"] == pytest.approx(acc["grpo"] - acc["sft"])
    n = on_disk["heldout_n"]
    assert n == on_disk["config"]["task"]["n_heldout"] and n > 0
    assert on_disk["seed"] == 0 and on_disk["timings_s"]["total_s"] > 0
    # every held-out accuracy is a multiple of 1/n (measured on the whole held-out set)
    assert all(math.isclose(acc[k] * n, round(acc[k] * n), abs_tol=1e-6) for k in acc)

    # the stages' artefacts
    for p in ("log.txt", "data/sft_chats.jsonl", "data/arithmetic_corpus.jsonl", "data/heldout.jsonl",
              "base/metrics.jsonl", "sft/metrics.jsonl", "grpo/metrics.jsonl", "grpo/summary.json"):
        assert os.path.exists(os.path.join(out, p)), p
    with open(os.path.join(out, "grpo", "metrics.jsonl"), encoding="utf-8") as f:
        allrecs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in allrecs if "lr" in r]  # the optimizer steps (ppo_epochs = 1: one per iteration)
    iters = on_disk["config"]["grpo"]["iterations"]
    assert on_disk["config"]["grpo"]["ppo_epochs"] == 1
    assert [r["step"] for r in recs] == [r["iteration"] for r in recs] == list(range(1, iters + 1))
    for r in recs:
        for k in ("reward_mean", "reward_std", "kl", "accuracy", "response_len", "loss"):
            assert math.isfinite(r[k]), (k, r)
        assert r["kl"] >= 0 and 0 <= r["accuracy"] <= 1
    # the evaluation records: every eval_every iterations, and the final one (the last record)
    every = on_disk["config"]["grpo"]["eval_every"]
    assert [r["step"] for r in allrecs if "heldout_acc" in r] == list(range(every, iters, every)) + [iters]
    assert "heldout_acc" in allrecs[-1] and allrecs[-1]["final"]
    assert on_disk["grpo"]["heldout_acc"] == allrecs[-1]["heldout_acc"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert on_disk["plots"] == []
    else:
        for name in ("grpo_reward.png", "grpo_kl.png"):
            p = os.path.join(out, name)
            assert p in on_disk["plots"] and os.path.getsize(p) > 1000

    # the markdown row for bench/RESULTS.md
    printed = capsys.readouterr().out
    assert "| base | after SFT | after GRPO |" in printed and "| test (micro" in printed

    # the held-out problems were never trained on: not in the SFT chats, nor in the pre-training corpus
    # (the calculation itself with disjoint="expr"; the question text with "text", the small-digit setting)
    mode = on_disk["config"]["task"]["disjoint"]
    with open(os.path.join(out, "data", "heldout.jsonl"), encoding="utf-8") as f:
        held = [json.loads(line) for line in f]
    held_keys = {e["expr"] if mode == "expr" else e["messages"][-1]["content"] for e in held}
    with open(os.path.join(out, "data", "sft_chats.jsonl"), encoding="utf-8") as f:
        chats = [json.loads(line)["messages"] for line in f]
    sft_keys = {m[-1]["content"].split(" = ")[0] if mode == "expr" else m[1]["content"] for m in chats}
    assert held_keys and not held_keys & sft_keys
    with open(os.path.join(out, "data", "arithmetic_corpus.jsonl"), encoding="utf-8") as f:
        corpus = "".join(json.loads(line)["text"] for line in f)
    assert not any((f"{k} = " if mode == "expr" else k) in corpus for k in held_keys)


def test_arithmetic_heldout_disjoint_in_the_calculation():
    t = tasks.arithmetic_task(3000, 200, seed=1, max_digits=2)
    train_exprs = {e["expr"] for e in t.train}
    held = [e["expr"] for e in t.heldout]
    assert len(held) == 200 == len(set(held)) and not set(held) & train_exprs
    chats = tasks.arithmetic_sft_chats(500, seed=1, max_digits=2, exclude=set(held))
    assert not {c["messages"][-1]["content"].split(" = ")[0] for c in chats} & set(held)
    with pytest.raises(ValueError, match="distinct held-out"):
        tasks.arithmetic_task(10, 10_000, seed=0, max_digits=1)
    # single digits: every calculation recurs, so only the question texts are kept apart
    t = tasks.arithmetic_task(2000, 300, seed=0, max_digits=1, disjoint="text")
    qs = {e["messages"][-1]["content"] for e in t.train}
    assert len(t.heldout) == 300 and not any(e["messages"][-1]["content"] in qs for e in t.heldout)
