"""Post-training checks: GRPO advantages of tied groups, rewards that are not finite numbers, the token-mean kl
statistic, GRPO settings and task files that cannot work, SFT input errors that name their file. CPU, micro model;
a few seconds.

Run: python -m pytest tests/test_posttrain_checks.py -q
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dsv3.posttrain import grpo, rewards, sft, tasks
from tests.test_posttrain import _grpo_cfg, _length_task, _records, _sft_cfg, env  # noqa: F401  (the fixture)


# --------------------------------------------------------------------------------------------------
# advantages of a group whose rewards are all equal

@pytest.mark.parametrize("value,G", [(0.1, 8), (0.3, 6), (0.7, 16), (1.1, 8), (1.0, 4)])
def test_tied_group_has_exactly_zero_advantage_whatever_eps(value, G):
    """The docstring's promise: all-equal rewards give advantage 0 'whatever eps'. In float32 the mean of eight 0.1s
    is not 0.1: the advantages were -7.45e-5 at eps 1e-4, -0.427 at eps 1e-8 and -1 (or NaN for 1.0s) at eps 0."""
    r = torch.full((2, G), value)
    r[1] = torch.arange(G) % 2  # a group with signal beside it
    for eps in (1e-4, 1e-8, 0.0):
        a = grpo.group_advantages(r, eps)
        assert (a[0] == 0).all(), (value, G, eps, a[0].tolist())
        assert torch.isfinite(a).all() and a[1].abs().min() > 0.99


def test_group_advantages_still_match_the_formula():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 7, generator=g, dtype=torch.float64)
    a = grpo.group_advantages(r, 1e-4)
    want = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=False) + 1e-4)
    torch.testing.assert_close(a, want.float())


# --------------------------------------------------------------------------------------------------
# rewards that are not finite numbers: one clear error, before any update, no checkpoint

def _raise(c, ex):
    return 1 / 0


@pytest.mark.parametrize("reward,match", [
    (lambda c, ex: float("nan"), r"returned nan for completion 0 of prompt 0 in iteration 1"),
    (lambda c, ex: math.inf, r"returned inf"),
    (lambda c, ex: None, r"returned None .*expected a finite number"),
    (lambda c, ex: [1.0, 2.0], r"returned \[1.0, 2.0\]"),
    (lambda c, ex: "1.0", r"returned '1.0'"),
    (_raise, r"the reward function raised ZeroDivisionError on completion 0 of prompt 0 in iteration 1"),
])
def test_grpo_rejects_a_reward_that_is_not_a_finite_number(env, tmp_path, reward, match):
    """Before: NaN / inf made the loss NaN, the loop skipped the step without a word and `dsv3 grpo` exited 0 with
    the start weights in its final checkpoint; None / a list gave a TypeError traceback mid-run."""
    task = _length_task()
    task.reward = reward
    out = str(tmp_path / "g")
    with pytest.raises(ValueError, match=match):
        grpo.train_grpo(env["ckpt"], task, out, _grpo_cfg(iterations=1, eval_every=0), log=lambda *a: None)
    assert not os.path.exists(os.path.join(out, "checkpoints")) or not os.listdir(os.path.join(out, "checkpoints"))


def test_one_nan_reward_does_not_silently_skip_the_iteration(env, tmp_path):
    task = _length_task()
    calls = [0]

    def some_nan(c, ex):
        calls[0] += 1
        return float("nan") if calls[0] == 3 else float(len(c))

    task.reward = some_nan
    with pytest.raises(ValueError, match="returned nan for completion 2 of prompt 0"):
        grpo.train_grpo(env["ckpt"], task, str(tmp_path / "g"), _grpo_cfg(iterations=1, eval_every=0),
                        log=lambda *a: None)


# --------------------------------------------------------------------------------------------------
# the logged kl is the token mean over the step, whatever the micro-batch size

def _eos_heavy_checkpoint(env, path) -> str:
    """env's checkpoint with the head's EOS row pushed along the mean final hidden state: completions of 0 to 6
    tokens, so that sequences of a micro-batch have different lengths."""
    from dsv3.checkpoints import dcp
    from dsv3.checkpoints.hf import save_pretrained

    tok = env["tok"]
    m = dcp.load_whole(env["ckpt"], torch.device("cpu")).eval()
    ids = torch.tensor([grpo._prompt_ids(tok, _length_task().train[0])])
    with torch.no_grad():
        mu = m(ids, with_mtp=False).hidden[0].mean(0)
        m.lm_head.weight[tok.eos_id] += 5.5 * mu / mu.dot(mu)
    save_pretrained(m, path)
    tok.save(path)
    return str(path)


def test_grpo_kl_statistic_is_a_token_mean_independent_of_micro_batches(env, tmp_path):
    """grpo_loss documents kl as a token mean; across micro-batches the step's value was the mean of micro-batch
    token means weighted by sequences, so it changed with --micro-batch-size (here 0.201 vs 0.144)."""
    ckpt = _eos_heavy_checkpoint(env, tmp_path / "eos")
    kls, lens = {}, {}
    for mbs in (1, 8):
        out = str(tmp_path / f"g{mbs}")
        grpo.train_grpo(ckpt, _length_task(), out, _grpo_cfg(iterations=2, ppo_epochs=1, micro_batch_size=mbs,
                                                            eval_every=0, lr=3e-3, seed=1), log=lambda *a: None)
        recs = [r for r in _records(out) if "lr" in r]
        kls[mbs], lens[mbs] = [r["kl"] for r in recs], [r["response_len"] for r in recs]
    # the same rollouts, of mixed lengths in the second iteration (the precondition: seed 1 gives them with sampling.py's
    # hashed random numbers; seed 0 did with torch's generators, and now samples six tokens everywhere there)
    assert lens[1] == lens[8] and 0 < lens[1][1] < 6
    assert kls[1][0] == 0 and kls[1][1] > 0
    assert kls[1][1] == pytest.approx(kls[8][1], rel=1e-3), kls


# --------------------------------------------------------------------------------------------------
# settings and task files that cannot work: refused up front, with the file and line

@pytest.mark.parametrize("kw", [dict(adv_eps=-1e-4), dict(clip_eps=-0.2), dict(clip_eps=0.0), dict(beta=-0.04),
                                dict(beta=float("nan"))])
def test_grpo_config_refuses_meaningless_coefficients(kw):
    with pytest.raises(ValueError, match="clip_eps > 0, beta >= 0 and adv_eps >= 0"):
        _grpo_cfg(**kw).validate()


@pytest.mark.parametrize("row,match", [
    ({"messages": [], "answer": "1"}, "'messages' is empty"),
    ({"messages": [{"role": "bot", "content": "x"}], "answer": "1"}, "message 0 has role 'bot'"),
    ({"messages": [{"content": "x"}], "answer": "1"}, "message 0 has role None"),
    ({"messages": [{"role": "user", "content": 5}], "answer": "1"}, r"message 0 \(user\) needs a string 'content'"),
    ({"messages": [{"role": "user", "content": "x"}], "answer": None}, "'answer' must be a non-empty string or a number"),
    # answers the exact-match reward can never match (every reward 0, every group without signal, no word)
    ({"messages": [{"role": "user", "content": "x"}], "answer": "1/2"}, "'answer' '1/2' is not one number"),
    ({"messages": [{"role": "user", "content": "x"}], "answer": "3 apples"}, "'answer' '3 apples' is not one number"),
    ({"messages": [{"role": "user", "content": "x\ud800"}], "answer": "1"},
     r"message 0 \(user\) holds a lone surrogate escape"),  # (was a TypeError from the tokenizer, no line)
])
def test_task_file_rows_are_checked_with_their_line(tmp_path, row, match):
    ok = {"messages": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(ok) + "\n" + json.dumps(row) + "\n" + json.dumps(ok) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        tasks.load_task(str(p))
    assert f"{p}:2:" in str(e.value)


def test_a_reward_of_the_users_takes_any_answer(tmp_path):
    """The answer's type is checked for the exact-match reward only: a --reward may take structured answers."""
    rows = [{"messages": [{"role": "user", "content": "sort [2, 1]"}], "answer": {"tests": [[2, 1], [1, 2]]}},
            {"messages": [{"role": "user", "content": "sort [3]"}], "answer": None}]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = tasks.load_task(str(p), reward=lambda completion, example: 0.0)
    assert t.train[0]["answer"] == {"tests": [[2, 1], [1, 2]]}
    with pytest.raises(ValueError, match="'answer' must be a non-empty string or a number"):
        tasks.load_task(str(p))


@pytest.mark.parametrize("text,answer,expected", [
    # the answer line holding the boxed answer (DeepSeekMath / R1's "put your final answer within \\boxed{}")
    ("so 6 * 7 = 42.\nThe final answer is $\\boxed{42}$.", "42", 1.0),
    ("Answer: \\boxed{42}", "42", 1.0),
    ("**Final answer:** $\\boxed{-3.5}$", "-3.5", 1.0),
    ("The final answer is $\\boxed{41}$.", "42", 0.0),
    ("Answer: \\boxed{41}\n\\boxed{42}", "42", 0.0),  # still conflicting markers
    ("The answer is: 42", "42", 1.0),  # a colon after "is"
    ("The final answer is: \\boxed{7}", "7", 1.0),
])
def test_an_answer_line_with_its_boxed_answer_is_one_answer(text, answer, expected):
    assert rewards.exact_match_reward(text, answer) == expected


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kw,match", [
    (dict(lr=INF), "lr must be a finite number > 0, got inf"), (dict(lr=NAN), "lr must be"),
    (dict(lr=-1.0), "lr must be"), (dict(min_lr=1.0), r"min_lr must be a finite number in \(0, lr"),
    (dict(log_every=0), "log_every must be >= 1"), (dict(micro_batch_size=-1), "micro_batch_size must be >= 0"),
    (dict(steps=-3), "steps must be >= 0"), (dict(steps=0, epochs=0.0), "epochs must be a finite number > 0"),
    (dict(steps=0, epochs=NAN), "epochs must be"), (dict(warmup_steps=-5), "warmup_steps must be >= 0"),
    (dict(grad_clip=-1.0), "grad_clip must be a finite number >= 0"), (dict(save_every=-1), "save_every must be"),
    (dict(keep=-1), "keep must be >= 0"), (dict(weight_decay=NAN), "weight_decay must be"),
    (dict(seed=-1), "seed must be in"), (dict(seq_len=1), "seq_len must be > 1"),
    (dict(batch_size=6, micro_batch_size=4), r"batch_size \(6\) must be a multiple of micro_batch_size \(4\)"),
])
def test_sft_config_refuses_what_pretraining_refuses(kw, match):
    """`dsv3 sft` checked a few of its flags: --lr inf trained NaN weights into a checkpoint (exit 0), --log-every 0
    and --micro-batch-size -1 were tracebacks, --epochs 0 ran a step; now each is refused naming the flag, as
    `dsv3 train` refuses them."""
    with pytest.raises(ValueError, match=match):
        _sft_cfg(**kw).validate()


@pytest.mark.parametrize("kw,match", [
    (dict(lr=INF), "lr must be a finite number > 0, got inf"), (dict(lr=-1.0), "lr must be"),
    (dict(temperature=NAN), "temperature must be a finite number > 0"), (dict(top_p=0.0), r"top_p must be in"),
    (dict(grad_clip=INF), "grad_clip must be"), (dict(eval_every=-1), "eval_every must be >= 0"),
    (dict(keep=-2), "keep must be >= 0"), (dict(eval_max_examples=0), "eval_max_examples must be >= 1"),
])
def test_grpo_config_refuses_what_pretraining_refuses(kw, match):
    with pytest.raises(ValueError, match=match):
        _grpo_cfg(**kw).validate()


def test_sft_seq_len_beyond_the_context_is_refused_before_the_run_starts(env, tmp_path):
    """--seq-len past the checkpoint's context trained positions it has no RoPE for, silently (100,000 ran out of
    memory, with no message); refused as `dsv3 train` refuses it, before the run directory exists."""
    from dsv3.training.strategy import checkpoint_config as ck

    ctx = ck(env["ckpt"]).max_position_embeddings
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"--seq-len {ctx + 1} is longer than the model's context "
                                         rf"\(max_position_embeddings {ctx}\)"):
        sft.train_sft(env["ckpt"], str(chats), str(tmp_path / "s"), _sft_cfg(seq_len=ctx + 1), log=lambda *a: None)
    assert not (tmp_path / "s").exists()


def test_sft_input_errors_name_the_file(env, tmp_path):
    late = tmp_path / "late.jsonl"
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "system", "content": "late"}]}
    late.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"{late}: conversation 2: the chat template does not render"):
        sft.train_sft(env["ckpt"], str(late), str(tmp_path / "s1"), _sft_cfg(steps=1), log=lambda *a: None)
    assert not (tmp_path / "s1").exists()  # a run that fails before its first step leaves no run directory
    with pytest.raises(Exception, match="nowhere"):
        grpo.train_grpo(str(tmp_path / "nowhere"), _length_task(), str(tmp_path / "g1"), _grpo_cfg(), log=lambda *a: None)
    assert not (tmp_path / "g1").exists()
    (tmp_path / "file").write_text("x")  # an --out that is a file: refused first, by name
    with pytest.raises(ValueError, match="a file of that name exists"):
        sft.train_sft(env["ckpt"], str(late), str(tmp_path / "file"), _sft_cfg(steps=1), log=lambda *a: None)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(json.dumps(ok).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=rf"{binary}: not UTF-8 text"):
        sft.read_chats(str(binary))


@pytest.mark.parametrize("flag,kw", [("--seq-len", {"seq_len": 96}), ("--batch-size", {"batch_size": 2}),
                                     ("--seed", {"seed": 1})])
def test_sft_resume_refuses_another_packing(env, tmp_path, flag, kw):
    """The checkpoint's data position (epoch, row) indexes the packing of its run's seq_len, batch size and seed: a
    resume with others continued silently at that row of another packing (not the exact resume it claims)."""
    out = str(tmp_path / "s")
    sft.train_sft(env["ckpt"], env["data"], out, _sft_cfg(steps=1), log=lambda *a: None)
    with pytest.raises(ValueError, match=f"{flag}"):
        sft.train_sft(env["ckpt"], env["data"], out, _sft_cfg(steps=2, resume=True, **kw), log=lambda *a: None)
    sft.train_sft(env["ckpt"], env["data"], out, _sft_cfg(steps=2, resume=True), log=lambda *a: None)  # a new length


def test_sft_resume_refuses_other_chats(env, tmp_path):
    """The data position indexes the packing of the run's conversations: a resume with another --data file (as
    many rows or not) continued silently at that row of other data. The state carries a fingerprint of the
    conversations' tokens and masks; a malformed position is named."""
    out = str(tmp_path / "s")
    sft.train_sft(env["ckpt"], env["data"], out, _sft_cfg(steps=1), log=lambda *a: None)
    other = tmp_path / "other.jsonl"
    lines = open(env["data"], encoding="utf-8").read().splitlines()
    other.write_text("\n".join(lines[1:] + lines[:1]) + "\n", encoding="utf-8")  # the same chats, another order
    with pytest.raises(ValueError, match="the chats are not the run's"):
        sft.train_sft(env["ckpt"], str(other), out, _sft_cfg(steps=2, resume=True), log=lambda *a: None)
    chats = sft.PackedChats([([1, 2, 3], [0, 1, 1])], 8, 0)
    with pytest.raises(ValueError, match="data position's row is '1'"):
        chats.load_state_dict({**chats.state_dict(), "row": "1"})
    chats.load_state_dict({"epoch": 0, "row": 1})  # a checkpoint from before the fingerprint: resumes
    sft.train_sft(env["ckpt"], env["data"], out, _sft_cfg(steps=2, resume=True), log=lambda *a: None)
