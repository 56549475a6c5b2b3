"""Post-training tests: the assistant-only loss mask, packing isolation (through the model), GRPO
advantages / loss / k3 against hand computations, rewards on adversarial outputs (no answer, many
answers, code that loops forever, raises or passes), a tiny SFT run whose loss falls, exact SFT
resume, and one GRPO iteration end to end. CPU, fp32, micro model; about half a minute.

Run: python -m pytest tests/test_posttrain.py -q
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time

import pytest
import torch

from dsv3.checkpoints.hf import load_pretrained, save_pretrained
from dsv3.config import ModelConfig
from dsv3.model import build_model
from dsv3.posttrain import grpo, rewards, sft, tasks
from dsv3.checkpoints.rundir import list_checkpoints
from dsv3.training.loss import IGNORE
from dsv3.tokenizer import DSTokenizer


def micro_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=1, torch_dtype="float32",
    ).validate()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A 512-token BPE trained on rendered arithmetic chats, a micro model checkpoint, an SFT JSONL."""
    base = tmp_path_factory.mktemp("posttrain")
    chats = tasks.arithmetic_sft_chats(300, seed=1, max_digits=2)
    tok0 = DSTokenizer.train([c["messages"][1]["content"] + "\n" + c["messages"][2]["content"] + "\n" + tasks.SYSTEM
                              for c in chats], 512)
    ckdir = base / "init"
    model = build_model(micro_config(), seed=0)
    save_pretrained(model, ckdir)
    tok0.save(ckdir)
    data = base / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return {"base": base, "ckpt": str(ckdir), "tok": DSTokenizer.load(ckdir), "data": str(data), "model": model}


# --------------------------------------------------------------------------------------------------
# SFT: masks, reader, packing

def test_assistant_only_mask(env):
    tok = env["tok"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "Answer: 5"}, {"role": "user", "content": "and 4 + 4?"},
            {"role": "assistant", "content": "Answer: 8"}]
    ids, mask = sft.render_conversation(tok, msgs)
    assert ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    # by hand: the masked spans are exactly "Answer: 5<eos>" and "Answer: 8<eos>"
    eos, asst, user = tok.eos_id, tok.token_to_id("<｜Assistant｜>"), tok.token_to_id("<｜User｜>")
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tok.decode(s) for s in spans] == ["Answer: 5<｜end▁of▁sentence｜>", "Answer: 8<｜end▁of▁sentence｜>"]
    assert ids[0] == tok.bos_id and mask[0] == 0
    for i, t in enumerate(ids):
        if t in (asst, user, tok.bos_id):
            assert mask[i] == 0
        if t == asst:
            assert mask[i + 1] == 1  # the reply starts right after the marker
        if t == eos:
            assert mask[i] == 1
    assert sum(mask) == len(tok.encode("Answer: 5")) + len(tok.encode("Answer: 8")) + 2


def test_render_rejects_late_system(env):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match="incrementally"):
        sft.render_conversation(env["tok"], msgs)


@pytest.mark.parametrize("line,err", [
    ("{not json", "malformed JSON"),
    ('{"msgs": []}', "'messages'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}', "empty assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant"),
    # JSON allows a lone surrogate escape; it has no UTF-8 form (was a TypeError from the tokenizer, no line)
    ('{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
     r"message 0 \(user\) holds a lone surrogate escape \(\\ud800\)"),
])
def test_read_chats_errors(tmp_path, line, err):
    p = tmp_path / "bad.jsonl"
    ok = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    p.write_text(ok + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=err) as e:
        sft.read_chats(str(p))
    assert f"{p}:3:" in str(e.value)


def test_packing_isolates_conversations(env):
    tok, model = env["tok"], env["model"]
    c1 = sft.render_conversation(tok, tasks.arithmetic_sft_chats(2, seed=5)[0]["messages"])
    c2 = sft.render_conversation(tok, tasks.arithmetic_sft_chats(2, seed=6)[1]["messages"])
    n1, n2 = len(c1[0]), len(c2[0])
    T = n1 + n2 + 5
    p = sft.pack([c1, c2], T, tok.pad_id)
    assert p["input_ids"].shape == (1, T)
    assert p["doc_ids"][0].tolist() == [0] * n1 + [1] * n2 + [-1] * 5
    assert p["position_ids"][0, n1:n1 + n2].tolist() == list(range(n2))
    mask = sft.block_causal_mask(p["doc_ids"])
    assert not mask[0, 0, n1:n1 + n2, :n1].any()  # conv 2 never sees conv 1
    assert mask[0, 0, n1 + 3, n1] and not mask[0, 0, n1, n1 + 3]  # causal inside a conversation
    # targets: next token where it is an assistant token of the same conversation, IGNORE elsewhere
    tgt = p["targets"][0]
    assert tgt[n1 - 1] == IGNORE and tgt[n1 + n2 - 1] == IGNORE
    exp1 = [c1[0][t + 1] if c1[1][t + 1] else IGNORE for t in range(n1 - 1)]
    assert tgt[: n1 - 1].tolist() == exp1
    with torch.no_grad():
        packed = model(p["input_ids"], p["position_ids"], attn_mask=mask, with_mtp=False).logits
        alone = model(torch.tensor([c2[0]]), with_mtp=False).logits
        naive = model(p["input_ids"], with_mtp=False).logits  # plain causal: conv 2 would see conv 1
    torch.testing.assert_close(packed[0, n1:n1 + n2], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(naive[0, n1:n1 + n2], alone[0], atol=1e-3)
    assert torch.isfinite(packed).all()  # padding rows are not empty softmaxes


def test_pack_truncates_and_rows():
    samples = [([5] * 6, [0, 0, 1, 1, 1, 1]), ([6] * 3, [0, 1, 1]), ([7] * 20, [1] * 20)]
    p = sft.pack(samples, 8, pad_id=2)
    assert p["input_ids"].shape == (3, 8) and int(p["n_truncated"]) == 1
    assert p["doc_ids"][0].tolist() == [0] * 6 + [-1] * 2


def test_cosine_lr():
    assert sft.cosine_lr(0, 10, 5e-6, 1e-6) == pytest.approx(5e-6)
    assert sft.cosine_lr(9, 10, 5e-6, 1e-6) == pytest.approx(1e-6)
    assert sft.cosine_lr(0, 10, 5e-6, 1e-6, warmup=2) == pytest.approx(2.5e-6)


# --------------------------------------------------------------------------------------------------
# GRPO math

def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    a = grpo.group_advantages(r, eps=1e-4)
    # group 0: mean .5, population std .5 -> ±0.5/0.5001; group 1: no signal; group 2: mean .75, std sqrt(27/16)
    e = 0.5 / 0.5001
    torch.testing.assert_close(a[0], torch.tensor([e, -e, -e, e]))
    assert (a[1] == 0).all()
    s = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)
    torch.testing.assert_close(a[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / (s + 1e-4))
    torch.testing.assert_close(a.mean(-1), torch.zeros(3), atol=1e-6, rtol=0)


def test_kl_k3():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert torch.all(grpo.kl_k3(lp, lp) == 0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (grpo.kl_k3(x, y) >= 0).all()
    # unbiased: E_{x~p}[k3] = KL(p || q) on a sampled categorical
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    xs = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = float(grpo.kl_k3(p.log()[xs], q.log()[xs]).mean())
    assert abs(est - exact) < 0.01, (est, exact)


def test_grpo_loss_by_hand():
    eps, beta = 0.2, 0.1
    # seq 0: A=+1, 3 tokens with ratio 1.5 (clipped: 1.2), 1.0, 0.5 (unclipped: min(.5, .8) = .5)
    # seq 1: A=-1, 2 valid tokens with ratio 1.5 (unclipped: min(-1.5,-1.2) = -1.5), 0.5 (clipped: -0.8); 1 pad
    ratios = torch.tensor([[1.5, 1.0, 0.5], [1.5, 0.5, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.2, -0.3, -0.7]])
    new = (old + ratios.log()).requires_grad_(True)
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    A = torch.tensor([1.0, -1.0])
    loss, st = grpo.grpo_loss(new, old, ref, A, mask, eps, beta)

    def k3(lp, rl):
        return math.exp(rl - lp) - (rl - lp) - 1

    nv = new.detach().tolist()
    s0 = ((1.2 - beta * k3(nv[0][0], -1)) + (1.0 - beta * k3(nv[0][1], -1)) + (0.5 - beta * k3(nv[0][2], -1))) / 3
    s1 = ((-1.5 - beta * k3(nv[1][0], -1)) + (-0.8 - beta * k3(nv[1][1], -1))) / 2
    assert float(loss.detach()) == pytest.approx(-(s0 + s1) / 2, rel=1e-6)
    assert float(st["clip_frac"]) == pytest.approx(2 / 5)  # seq0 tok0 and seq1 tok1
    kls = [k3(nv[0][0], -1), k3(nv[0][1], -1), k3(nv[0][2], -1), k3(nv[1][0], -1), k3(nv[1][1], -1)]
    assert float(st["kl"]) == pytest.approx(sum(kls) / 5, rel=1e-6)
    # gradients: clipped tokens get only the KL gradient; the padded token none
    loss.backward()
    assert new.grad[1, 2] == 0
    # clipped token (ratio 1.5, A=+1): d loss/d lp = beta * dk3/dlp / (3 tokens * 2 seqs), dk3/dlp = 1 - e^(ref-lp)
    assert float(new.grad[0, 0]) == pytest.approx(beta * (1 - math.exp(-1 - nv[0][0])) / 6, rel=1e-5)
    # unclipped token 0.5 with A=+1: d/dlp of -(ratio*A)/3/2 = -ratio/6, plus the KL part
    assert float(new.grad[0, 2]) == pytest.approx(-0.5 / 6 + beta * (1 - math.exp(-1 - nv[0][2])) / 6, rel=1e-5)


def test_grpo_loss_kl_sign_and_no_clip():
    lp = torch.log(torch.tensor([[0.3, 0.6]]))
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    m, A = torch.ones(1, 2), torch.tensor([0.0])
    l0, _ = grpo.grpo_loss(lp, lp, ref, A, m, 0.2, 0.0)
    l1, st = grpo.grpo_loss(lp, lp, ref, A, m, 0.2, 0.5)
    assert float(l0) == 0 and float(l1) == pytest.approx(0.5 * float(st["kl"])) and float(st["kl"]) > 0
    # ratio 1 (first step): the loss is -mean(A) and the gradient is the policy gradient A * dlogp
    A = torch.tensor([2.0])
    new = lp.clone().requires_grad_(True)
    loss, st = grpo.grpo_loss(new, lp, lp, A, m, 0.2, 0.04)
    assert float(loss.detach()) == pytest.approx(-2.0) and float(st["clip_frac"]) == 0
    loss.backward()
    torch.testing.assert_close(new.grad, torch.full((1, 2), -1.0))


def test_sequence_logprobs_matches_manual(env):
    model = env["model"]
    ids = torch.tensor([[0, 5, 9, 11, 7], [0, 3, 3, 2, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
    with torch.no_grad():
        lp = grpo.sequence_logprobs(model, ids, mask)
        full = model(ids, with_mtp=False).logits.log_softmax(-1)
    assert lp.shape == (2, 4)
    assert float(lp[0, 2]) == pytest.approx(float(full[0, 2, 11]), rel=1e-5)
    assert float(lp[1, 1]) == pytest.approx(float(full[1, 1, 3]), rel=1e-5)
    assert lp[1, 2] == 0 and lp[0, 0] == 0


# --------------------------------------------------------------------------------------------------
# rewards

@pytest.mark.parametrize("text,answer,expected", [
    ("12 + 30 = 42\nAnswer: 42", "42", 1.0),
    ("no idea", "42", 0.0),  # no answer
    ("", "42", 0.0),
    ("Answer: 41\nAnswer: 42", "42", 0.0),  # hedging: conflicting marked answers
    ("Answer: 41, 42 or 43", "42", 0.0),  # many answers in one marker
    ("It is \\boxed{42} so Answer: 42", "42", 1.0),  # consistent markers
    ("first 40, then 41, finally 42.", "42", 1.0),  # no marker: the last number
    ("The total is 1,234 apples.", "1234", 1.0),  # thousands separator
    ("Answer:   -17 ", "-17", 1.0),  # whitespace, sign
    ("Answer: +3.0", "3", 1.0),
    ("#### 1,000,000", "1000000", 1.0),
    ("#### Step 1: add\n3 + 4 = 7\n#### Step 2: check\n#### 7", "7", 1.0),  # markdown headings are no markers
    ("#### Step 1: 3 + 4\nso 8", "8", 1.0),  # a heading alone: no marker, the last number
    ("#### 7\n#### 8", "7", 0.0),  # two GSM8K markers that disagree: hedging
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 0.0),  # numbers inside a non-numeric answer: not one answer
    ("Answer: 42\n\\boxed{43}", "42", 0.0),
    ("12,34", "1234", 0.0),  # not a thousands separator: last number is 34
])
def test_exact_match_adversarial(text, answer, expected):
    assert rewards.exact_match_reward(text, answer) == expected


def test_exact_match_strict_and_text_answers():
    many = " ".join(str(i) for i in range(100))
    assert rewards.exact_match_reward(many, "99") == 1.0  # documented: the last number without a marker
    assert rewards.exact_match_reward(many, "99", strict=True) == 0.0
    assert rewards.exact_match_reward("Answer: Paris.", "paris") == 1.0


def test_format_reward():
    assert rewards.format_reward("3 + 4 = 7\nAnswer: 7") == 1.0
    assert rewards.format_reward("Answer: 7\nAnswer: 7") == 0.0
    assert rewards.format_reward("Answer: 7 apples") == 0.0
    assert rewards.format_reward("the answer is 7") == 0.0
    assert rewards.format_reward("") == 0.0


def test_reward_and_task_specs_are_checked_before_training():
    """--reward MODULE:FUNCTION and --task as a user meets them: a module that does not import, a callable that
    cannot take (completion, example), a task file that does not exist: one clear ValueError / FileNotFoundError
    each, before any rollout (a ModuleNotFoundError traceback, a TypeError mid-run, "[Errno 2]" before)."""
    assert tasks.load_callable("dsv3.posttrain.tasks:arithmetic_reward") is tasks.arithmetic_reward
    with pytest.raises(ValueError, match="its signature is \\(completion"):  # one argument: not a reward
        tasks.load_callable("dsv3.posttrain.rewards:format_reward")
    with pytest.raises(ValueError, match=r"'nomod_xyz:score': cannot import module 'nomod_xyz'"):
        tasks.load_callable("nomod_xyz:score")
    with pytest.raises(ValueError, match=r"cannot be called as reward\(completion: str, example: dict\)"):
        tasks.load_callable("os:getcwd")
    with pytest.raises(ValueError, match="is not a callable"):
        tasks.load_callable("os:sep")
    with pytest.raises(FileNotFoundError, match=r"task 'nosuch': no such file; give 'arithmetic'"):
        tasks.load_task("nosuch")
    assert tasks.load_task("arithmetic").name == "arithmetic"


def test_code_reward():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert rewards.code_reward(good, tests, timeout_s=10) == 1.0
    assert rewards.code_reward("def add(a, b):\n    return a + b\n", tests, timeout_s=10) == 1.0  # raw code
    assert rewards.code_reward("```python\ndef add(a, b):\n    return a - b\n```", tests, timeout_s=10) == 0.0
    assert rewards.code_reward("```python\nraise RuntimeError('boom')\n```", tests, timeout_s=10) == 0.0
    assert rewards.code_reward("```python\ndef add(a, b)\n```", tests, timeout_s=10) == 0.0  # syntax error
    assert rewards.code_reward("no code at all", tests, timeout_s=10) == 0.0
    t0 = time.monotonic()
    r = rewards.run_code("while True:\n    pass\n", timeout_s=1.0)
    assert r.timed_out and not r.passed and time.monotonic() - t0 < 5
    t0 = time.monotonic()
    assert rewards.code_reward("```python\ndef add(a, b):\n    while True: pass\n```", tests, timeout_s=1.0) == 0.0
    assert time.monotonic() - t0 < 5
    # the runner is dsv3/eval/sandbox.py's: a program may not spawn processes or open sockets
    r = rewards.run_code("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'while True: pass'])\n",
                         timeout_s=5.0)
    assert not r.passed and "PermissionError" in r.stderr
    r = rewards.run_code("import socket\nsocket.socket()\n", timeout_s=5.0)
    assert not r.passed and "PermissionError" in r.stderr
    big = rewards.run_code("x = bytearray(4 * 1024**3)\n", timeout_s=10, memory_mb=512)
    assert not big.passed and "MemoryError" in big.stderr


def test_code_reward_early_exit_is_not_a_pass():
    """A completion that exits with status 0 before the tests run must not earn the reward (reward hacking)."""
    tests = "assert add(2, 3) == 5"
    for stop in ("import sys\nsys.exit(0)", "import os\nos._exit(0)"):
        assert rewards.code_reward(f"```python\ndef add(a, b):\n    return 0\n{stop}\n```", tests,
                                   timeout_s=10) == 0.0, stop


# --------------------------------------------------------------------------------------------------
# tasks

def test_arithmetic_task_split():
    t1, t2 = tasks.arithmetic_task(200, 50, seed=3), tasks.arithmetic_task(200, 50, seed=3)
    assert t1.train == t2.train and t1.heldout == t2.heldout and len(t1.heldout) == 50
    qs = {e["messages"][-1]["content"] for e in t1.train}
    assert not any(e["messages"][-1]["content"] in qs for e in t1.heldout)
    ex = t1.train[0]
    assert t1.reward(f"Answer: {ex['answer']}", ex) == pytest.approx(1.1) and t1.correct(ex["answer"], ex)
    assert tasks.arithmetic_task(200, 50, seed=4).train != t1.train


# --------------------------------------------------------------------------------------------------
# end to end

def _sft_cfg(**kw):
    base = dict(seq_len=128, batch_size=4, steps=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, device="cpu",
                save_every=0, keep=0, seed=0, progress=False, plots=False)
    base.update(kw)
    return sft.SFTConfig(**base)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_loss_falls(env):
    out = str(env["base"] / "sft")
    summary = sft.train_sft(env["ckpt"], env["data"], out, _sft_cfg(), log=lambda *a: None)
    recs = _records(out)
    assert summary["step"] == 16 and len(recs) == 16
    assert {"step", "loss", "lr", "grad_norm", "tok_per_s"} <= set(recs[0])
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < 0.8 * first, (first, last)  # about 6.1 -> 4.4 nats in 16 steps
    assert recs[-1]["lr"] == pytest.approx(3e-4)


def test_sft_resume_exact(env):
    a, b = str(env["base"] / "sft_a"), str(env["base"] / "sft_b")
    cfg = dict(steps=6, seq_len=96)
    sft.train_sft(env["ckpt"], env["data"], a, _sft_cfg(**cfg), log=lambda *a: None)
    sft.train_sft(env["ckpt"], env["data"], b, _sft_cfg(save_every=3, **cfg), log=lambda *a: None)
    shutil.rmtree(list_checkpoints(os.path.join(b, "checkpoints"))[-1])  # as if killed after step 3
    sft.train_sft(env["ckpt"], env["data"], b, _sft_cfg(resume=True, **cfg), log=lambda *a: None)
    ra, rb = _records(a), _records(b)
    assert [r["loss"] for r in ra[3:]] == [r["loss"] for r in rb[-3:]]
    assert [r["grad_norm"] for r in ra[3:]] == [r["grad_norm"] for r in rb[-3:]]


def _length_task():
    task = tasks.arithmetic_task(20, 4, seed=0, max_digits=2)
    # an untrained model never earns the arithmetic reward (all advantages 0, no update): a plain callable
    # rewarding length gives every group a signal
    task.reward = lambda completion, example: float(len(completion))
    return task


def _grpo_cfg(**kw):
    base = dict(iterations=2, prompts_per_iter=2, group_size=4, max_new_tokens=6, ppo_epochs=2, micro_batch_size=3,
                lr=1e-3, eval_every=1, save_every=0, device="cpu", seed=0, progress=False, plots=False)
    base.update(kw)
    return grpo.GRPOConfig(**base)


def test_precisions(env, tmp_path):
    """precision_recipe applies to post-training: bf16 autocast (CPU too) and FP8 GEMMs give first-step SFT
    losses near fp32's but not equal to it; GRPO under bf16 autocast keeps ratio 1 and KL 0 at its first step."""
    first = {}
    for prec in ("fp32", "bf16", "fp8"):
        out = str(tmp_path / f"sft_{prec}")
        sft.train_sft(env["ckpt"], env["data"], out, _sft_cfg(steps=1, seq_len=96, precision=prec), log=lambda *a: None)
        first[prec] = _records(out)[0]["loss"]
    for prec in ("bf16", "fp8"):
        assert first[prec] != first["fp32"] and abs(first[prec] - first["fp32"]) < 0.05, first
    out = str(tmp_path / "grpo_bf16")
    grpo.train_grpo(env["ckpt"], _length_task(), out, _grpo_cfg(iterations=1, eval_every=0, precision="bf16"),
                    log=lambda *a: None)
    steps = [r for r in _records(out) if "lr" in r]
    assert steps[0]["kl"] == 0 and steps[0]["clip_frac"] == 0 and math.isfinite(steps[1]["loss"])


def test_grpo_iteration_end_to_end(env):
    out = str(env["base"] / "grpo")
    summary = grpo.train_grpo(env["ckpt"], _length_task(), out, _grpo_cfg(), log=lambda *a: None)
    recs = _records(out)
    steps = [r for r in recs if "lr" in r]  # one record per optimizer step: 2 iterations x 2 ppo epochs
    evals = [r for r in recs if "heldout_acc" in r]  # held-out evaluation after each iteration
    assert summary["iterations"] == 2 and summary["step"] == 4
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["iteration"] for r in steps] == [1, 1, 2, 2]
    for r in steps:
        for k in ("reward_mean", "reward_std", "kl", "response_len", "clip_frac", "accuracy", "loss"):
            assert k in r and math.isfinite(r[k]), k
    assert [r["step"] for r in evals] == [2, 4] and evals[-1].get("final")
    assert all(0 <= r["heldout_acc"] <= 1 and r["heldout_n"] == 4 for r in evals)
    assert "heldout_acc" in summary
    assert 0 < steps[0]["response_len"] <= 7
    assert steps[0]["kl"] == 0 and steps[0]["clip_frac"] == 0  # the policy is the reference at step 1
    assert steps[1]["reward_mean"] == steps[0]["reward_mean"]  # the same rollouts for both ppo epochs
    assert steps[-1]["kl"] > 0  # the policy moved away from the frozen reference
    assert list_checkpoints(os.path.join(out, "checkpoints"))


def test_grpo_resume_exact_and_checkpoints_only_between_iterations(env):
    """4 iterations of 2 steps in one go == 2 iterations, a checkpoint, then a resumed run of 2 more; a
    Ctrl-C in the middle of an iteration stops only at its end, with a checkpoint that resumes exactly."""
    import signal

    a, b, c = (str(env["base"] / n) for n in ("grpo_a", "grpo_b", "grpo_c"))
    cfg = dict(iterations=4, eval_every=0)
    grpo.train_grpo(env["ckpt"], _length_task(), a, _grpo_cfg(**cfg), log=lambda *a: None)
    grpo.train_grpo(env["ckpt"], _length_task(), b, _grpo_cfg(save_every=2, **cfg), log=lambda *a: None)
    shutil.rmtree(list_checkpoints(os.path.join(b, "checkpoints"))[-1])  # as if killed after iteration 2
    grpo.train_grpo(env["ckpt"], _length_task(), b, _grpo_cfg(resume=True, **cfg), log=lambda *a: None)
    keys = ("loss", "kl", "clip_frac", "grad_norm", "reward_mean", "response_len")
    ra = [r for r in _records(a) if "lr" in r]
    rb = [r for r in _records(b) if "lr" in r]
    assert [r["step"] for r in rb] == list(range(1, 9)) + [5, 6, 7, 8]
    assert [[r[k] for k in keys] for r in ra[4:]] == [[r[k] for k in keys] for r in rb[-4:]]

    # Ctrl-C during the rollout of iteration 2 (step 3 of 8): the loop finishes the iteration's 2 steps
    task = _length_task()
    reward, calls = task.reward, [0]

    def interrupting(completion, example):
        calls[0] += 1
        if calls[0] == 2 * 4 + 1:  # the first completion of iteration 2 (2 prompts x 4 per iteration)
            os.kill(os.getpid(), signal.SIGINT)
        return reward(completion, example)

    task.reward = interrupting
    s = grpo.train_grpo(env["ckpt"], task, c, _grpo_cfg(**cfg), log=lambda *a: None)
    assert s["interrupted"] and s["step"] == 4 and s["iterations"] == 2
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(c, "checkpoints"))] == ["step_00000004"]
    grpo.train_grpo(env["ckpt"], _length_task(), c, _grpo_cfg(resume=True, **cfg), log=lambda *a: None)
    rc = [r for r in _records(c) if "lr" in r]
    assert [r["step"] for r in rc] == list(range(1, 9))
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rc]


def test_grpo_refuses_an_inconsistent_resume(env, tmp_path):
    out = str(tmp_path / "g")
    grpo.train_grpo(env["ckpt"], _length_task(), out, _grpo_cfg(iterations=1, eval_every=0), log=lambda *a: None)
    with pytest.raises(ValueError, match="ppo_epochs"):
        grpo.train_grpo(env["ckpt"], _length_task(), out, _grpo_cfg(iterations=2, ppo_epochs=3, eval_every=0,
                                                                    resume=True), log=lambda *a: None)
    # another task file (other training examples), seed, P or G: other prompts and seeds than the run's (the
    # resume went on with them silently)
    other = tasks.arithmetic_task(20, 4, seed=1, max_digits=2)
    other.reward = _length_task().reward
    with pytest.raises(ValueError, match="has other training examples than the run's"):
        grpo.train_grpo(env["ckpt"], other, out, _grpo_cfg(iterations=2, eval_every=0, resume=True),
                        log=lambda *a: None)
    for kw, flag in ((dict(seed=3), "--seed"), (dict(prompts_per_iter=4), "--prompts"),
                     (dict(group_size=2), "--group-size")):
        with pytest.raises(ValueError, match=f"resume with the run's {flag} "):
            grpo.train_grpo(env["ckpt"], _length_task(), out, _grpo_cfg(iterations=2, eval_every=0, resume=True, **kw),
                            log=lambda *a: None)
    g = grpo.GRPO.__new__(grpo.GRPO)  # a checkpoint's sampler state is untrusted: malformed, it is named
    g.fingerprint, g.sampling, g.task = "f", {"seed": 0}, _length_task()
    for bad, what in (({"iterations": "2"}, "iteration count"), ({"iterations": 1, "sampling": [0]}, "sampling")):
        with pytest.raises(ValueError, match=f"cannot resume: the saved {what}"):
            g.load_state_dict(bad)
    with pytest.raises(ValueError, match="fp8"):
        _grpo_cfg(precision="fp8").validate()


def test_sft_and_grpo_refuse_the_pipeline_layout(env, tmp_path, monkeypatch):
    """The pipeline strategy (pp = 2) refuses both tasks with its reason, before any model is built."""
    from dsv3.distributed.mesh import DistEnv, ParallelConfig
    from dsv3.distributed.strategy import PipelineStrategy

    pipe = PipelineStrategy(DistEnv(0, 2, 0, torch.device("cpu"), "gloo"), ParallelConfig(pp=2))
    monkeypatch.setattr(pipe, "barrier", lambda: None)  # no process group here: nothing to wait for
    for mod in (sft, grpo):
        monkeypatch.setattr(mod, "make_strategy", lambda pcfg, device: pipe)
    with pytest.raises(ValueError, match="--pp runs pre-training only"):
        sft.train_sft(env["ckpt"], env["data"], str(tmp_path / "s"), _sft_cfg(), log=lambda *a: None)
    with pytest.raises(ValueError, match="--pp runs pre-training only"):
        grpo.train_grpo(env["ckpt"], _length_task(), str(tmp_path / "g"), _grpo_cfg(), log=lambda *a: None)
    with pytest.raises(ValueError, match="no rank holds the whole model"):
        pipe.check_generation()


def test_arithmetic_generators_refuse_an_exclude_set_covering_everything():
    from dsv3.posttrain.tasks import _expr, _problem, arithmetic_corpus, arithmetic_sft_chats

    rng = random.Random(0)
    every = {_expr(_problem(rng, 1)[1]) for _ in range(20_000)}  # all 243 one-digit calculations
    with pytest.raises(ValueError, match="exclude"):
        arithmetic_sft_chats(2, max_digits=1, exclude=every)
    with pytest.raises(ValueError, match="exclude"):
        arithmetic_corpus(1, lines_per_doc=2, max_digits=1, exclude=every)


def test_sft_bf16_weights(env, tmp_path):
    """SFT --bf16-weights (pre-training's, dsv3/training/optim.py AdamW(masters=...)): the same first forward as
    fp32 weights under bf16 autocast, the curve within 2% of it but not equal (two micro-batches: the bf16 weight
    gradients are summed in bf16; with one, both runs do the same arithmetic), checkpoints of fp32 masters with
    the frozen MTP module untouched, an exact resume, and fp32 precision refused."""
    logs = []
    ref, b16, res = str(tmp_path / "ref"), str(tmp_path / "b16"), str(tmp_path / "res")
    kw = dict(steps=6, seq_len=96, precision="bf16", micro_batch_size=2)
    sft.train_sft(env["ckpt"], env["data"], ref, _sft_cfg(**kw), log=lambda *a: None)
    sft.train_sft(env["ckpt"], env["data"], b16, _sft_cfg(bf16_weights=True, **kw), log=logs.append)
    assert any("bf16 weights + fp32 masters" in str(line) for line in logs)
    a, b = _records(ref), _records(b16)
    assert a[0]["loss"] == b[0]["loss"]  # the same weights, the same arithmetic
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 0.02 * ra["loss"], (ra["step"], ra["loss"], rb["loss"])
    assert b[-1]["loss"] < b[0]["loss"] and [r["loss"] for r in a] != [r["loss"] for r in b]
    start = env["model"].state_dict()
    out = load_pretrained(list_checkpoints(os.path.join(b16, "checkpoints"))[-1], device="cpu",
                          dtype=torch.float32).state_dict()
    mtp = [k for k in out if k.startswith("mtp.")]
    assert mtp and all(torch.equal(out[k], start[k]) for k in mtp)  # frozen: never cast, never stepped
    w = "layers.0.self_attn.o_proj.weight"
    assert out[w].dtype == torch.float32 and not torch.equal(out[w], out[w].bfloat16().float())  # fp32 masters
    # exact resume: 3 steps, then 3 more from the checkpoint
    sft.train_sft(env["ckpt"], env["data"], res, _sft_cfg(bf16_weights=True, save_every=3, **kw), log=lambda *a: None)
    shutil.rmtree(list_checkpoints(os.path.join(res, "checkpoints"))[-1])  # as if killed after step 3
    sft.train_sft(env["ckpt"], env["data"], res, _sft_cfg(bf16_weights=True, resume=True, **kw), log=lambda *a: None)
    c = _records(res)
    assert [r["loss"] for r in b[3:]] == [r["loss"] for r in c[-3:]]
    assert [r["grad_norm"] for r in b[3:]] == [r["grad_norm"] for r in c[-3:]]
    with pytest.raises(ValueError, match="needs --precision bf16 or fp8"):
        _sft_cfg(bf16_weights=True, precision="fp32").validate()


def test_grpo_with_bf16_weights(env, tmp_path):
    """--bf16-weights in GRPO: the GEMM weights train in bf16 with fp32 masters in the optimizer, the rollouts
    sample from the masters (the engine gets fp32 weights), the first step is still the reference's arithmetic
    (ratio 1, KL 0: autocast rounds the reference's weights as the masters were rounded), the checkpoint holds the
    fp32 masters; fp32 precision refuses it."""
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.inference.engine import Engine

    seen = []
    original = Engine.generate

    def spy(self, prompts, params, *a, **k):
        seen.append({p.dtype for m in self.model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()})
        return original(self, prompts, params, *a, **k)

    out = str(tmp_path / "grpo_bf16w")
    Engine.generate = spy
    try:
        grpo.train_grpo(env["ckpt"], _length_task(), out,
                        _grpo_cfg(iterations=2, eval_every=0, precision="bf16", bf16_weights=True), log=lambda *a: None)
    finally:
        Engine.generate = original
    assert seen and all(s == {torch.float32} for s in seen), seen  # rollouts (and the final evaluation) in fp32
    steps = [r for r in _records(out) if "lr" in r]
    assert len(steps) == 4 and steps[0]["kl"] == 0 and steps[0]["clip_frac"] == 0
    assert steps[-1]["kl"] > 0 and all(math.isfinite(r["loss"]) for r in steps)
    final = list_checkpoints(os.path.join(out, "checkpoints"))[-1]
    assert all(t.dtype == torch.float32 for t in load_pretrained(final, device="cpu", dtype=None).state_dict().values())
    with pytest.raises(ValueError, match="--bf16-weights needs --precision bf16"):
        _grpo_cfg(precision="fp32", bf16_weights=True).validate()
