"""`dsv3 eval` tasks: pass-key scoring and prompt building (exact token length, key at the requested
depth), the pass-key training documents (lengths, format, depths, seeds), the needle grid with a scripted engine (100% / 0%) and end to end on a tiny random checkpoint
(JSON + PNG), and `--data` bits per byte against a direct computation. CPU, a few seconds.

Run: python -m pytest tests/test_eval_tasks.py -q
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dsv3.checkpoints.hf import load_pretrained, save_pretrained
from dsv3.config import ModelConfig
from dsv3.eval.compress import compressor_bits_per_byte
from dsv3.eval.needle import (FILLER, INTRO, QUESTION, NeedleConfig, PromptBuilder, make_key, parse_depths,
                              passkey_documents, resolve_lengths, run_needle, score_passkey)
from dsv3.model.transformer import build_model
from dsv3.tokenizer import DSTokenizer
from conftest import run_cli

MICRO = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=0, torch_dtype="float32",
)


@pytest.fixture(scope="module")
def tok():
    texts = [INTRO, QUESTION, "The grass is green. The sky is blue. The sun is yellow. Here we go.",
             "The pass key is 12345. Remember it. 67890 is the pass key."] * 20
    texts += [f"def f_{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(200)]
    return DSTokenizer.train(texts, 400)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A random tiny model (context 256) with that tokenizer, saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    cfg = ModelConfig(**MICRO, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id).validate()
    save_pretrained(build_model(cfg, device="cpu", dtype=torch.float32, seed=0), path)
    tok.save(path)
    return path


def test_score_passkey_rules():
    right = ["71432", " 71432.", "71432 is the key", "no, 71432", "-71432", "\n71432abc", "the key: 71432 7"]
    wrong = ["7143", "714320", "71,432", "7 1432", "", " no number", "1 71432", "0071432", "71432"[::-1]]
    assert all(score_passkey(o, "71432") for o in right)
    assert not any(score_passkey(o, "71432") for o in wrong)


@pytest.mark.parametrize("length", [60, 100, 255])
@pytest.mark.parametrize("depth", [0, 10, 37.5, 50, 100])
def test_prompt_has_exact_length_and_key_at_depth(tok, length, depth):
    b = PromptBuilder(tok)
    key = make_key(0, length, depth, 0)
    ids, pos = b.build(length, depth, key)
    key_ids = b.key_ids(key)
    n = length - len(b.intro) - len(key_ids) - len(b.question)  # filler tokens
    assert len(ids) == length
    assert ids[:len(b.intro)] == b.intro and ids[-len(b.question):] == b.question
    assert ids[pos: pos + len(key_ids)] == key_ids and pos == len(b.intro) + round(depth / 100 * n)
    if depth == 0:
        assert pos == len(b.intro)
    if depth == 100:
        assert pos + len(key_ids) == length - len(b.question)
    assert tok.decode(ids).count(key) == 2  # "The pass key is K. Remember it. K is the pass key."
    # the filler around the key is the start of one filler stream, cut at the key
    assert ids[len(b.intro): pos] + ids[pos + len(key_ids): length - len(b.question)] == b.filler(n)


def test_lengths_depths_and_keys():
    assert resolve_lengths("auto", 256, 8) == [128, 248]
    assert resolve_lengths("auto", 4096, 8) == [128, 256, 512, 1024, 2048, 4088]
    assert resolve_lengths("512,64,64", 1024, 8) == [64, 512]
    with pytest.raises(ValueError, match="length 512 is beyond the model's context: 512 prompt \\+ 8 generated "
                                         "tokens > max_position_embeddings 256"):
        resolve_lengths("128,512", 256, 8)
    with pytest.raises(ValueError, match="--lengths"):
        resolve_lengths("long", 256, 8)
    assert parse_depths("0, 50,100") == [0.0, 50.0, 100.0]
    for bad in ("", "x", "101", "-1"):
        with pytest.raises(ValueError, match="--depths"):
            parse_depths(bad)
    keys = {make_key(0, 128, d, t) for d in range(0, 101, 10) for t in range(4)}
    assert len(keys) > 40 and all(len(k) == 5 for k in keys) and make_key(0, 128, 50, 1) == make_key(0, 128, 50, 1)


KEY_SENTENCE = re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\. ")


@pytest.mark.parametrize("lo,hi", [(30, 200), (120, 120), (400, 600)])
def test_passkey_documents_lengths_and_format(tok, lo, hi):
    docs = passkey_documents(40, tok, lo, hi, seed=3)
    assert len(docs) == 40
    b, depths = PromptBuilder(tok), []
    for d in docs:
        ids = tok.encode(d, parse_special=False)
        assert lo <= len(ids) <= hi
        m = KEY_SENTENCE.search(d)
        key = m.group(1)
        assert m.group(2) == key and len(key) == 5
        assert d.startswith(INTRO) and d.endswith(QUESTION + f" {key}.\n") and d.count(key) == 3
        # in tokens too: the eval prompt's intro, key sentence and question ids, then the answer
        answer = b.question + tok.encode(f" {key}.\n", parse_special=False)
        k = b.key_ids(key)
        assert ids[:len(b.intro)] == b.intro and ids[-len(answer):] == answer
        assert any(ids[i:i + len(k)] == k for i in range(len(ids)))
        assert "The grass is green" not in d and FILLER.split(".")[1] not in d  # not the eval's haystack
        filler = len(d) - len(INTRO) - len(m.group(0)) - len(QUESTION + f" {key}.\n")
        depths.append((m.start() - len(INTRO)) / max(filler, 1))
    assert min(depths) < 0.2 and max(depths) > 0.8  # the key at every depth
    assert len({KEY_SENTENCE.search(d).group(1) for d in docs}) > 35


def test_passkey_documents_seeds_and_arguments(tok):
    assert passkey_documents(8, tok, 40, 300, seed=1) == passkey_documents(8, tok, 40, 300, seed=1)
    other = passkey_documents(8, tok, 40, 300, seed=2)
    assert all(a != b for a, b in zip(passkey_documents(8, tok, 40, 300, seed=1), other))
    assert all(len(KEY_SENTENCE.search(d).group(1)) == 7 for d in passkey_documents(4, tok, 40, 300, key_digits=7))
    with pytest.raises(ValueError, match="^n must be >= 1, got 0"):
        passkey_documents(0, tok, 40, 300)
    with pytest.raises(ValueError, match=r"min_tokens \(300\) must be <= max_tokens \(40\)"):
        passkey_documents(4, tok, 300, 40)
    with pytest.raises(ValueError, match=r"max_tokens \(10\) is shorter than the \d+ tokens of the instructions, "
                                         "a 5-digit key") as e:
        passkey_documents(4, tok, 5, 10)
    shortest = int(re.search(r"the (\d+) tokens", str(e.value)).group(1))  # the template with the longest key
    assert all(len(tok.encode(d, parse_special=False)) <= shortest for d in passkey_documents(50, tok, 0, shortest))
    with pytest.raises(ValueError, match="key_digits"):
        passkey_documents(4, tok, 40, 300, key_digits=0)


class ScriptedEngine:
    """Answers every prompt with the key it finds (right=True) or with a wrong number."""

    def __init__(self, tok, right: bool):
        self.tok, self.right, self.batches = tok, right, []

    def generate(self, prompts, params):
        assert params.temperature == 0.0
        self.batches.append(len(prompts))
        outs = []
        for ids in prompts:
            key = re.search(r"The pass key is (\d+)\.", self.tok.decode(ids)).group(1)
            text = f" {key}. The" if self.right else f" {int(key) + 1}."
            outs.append(type("Out", (), {"text": text})())
        return outs


@pytest.mark.parametrize("right", [True, False])
def test_needle_grid_scores_scripted_answers(tok, right):
    cfg = NeedleConfig(trials=3, max_batch_size=4)
    eng = ScriptedEngine(tok, right)
    calls = []
    r = run_needle(eng, tok, [64, 128], [0.0, 50.0, 100.0], cfg, progress=lambda *a: calls.append(a))
    assert r["accuracy"] == [[float(right)] * 3] * 2 and r["overall"] == float(right)
    assert len(r["results"]) == 18 and eng.batches == [4, 4, 1] * 2  # 9 prompts per length, batches of 4
    assert calls[-1] == (18, 18, 128)
    # long prompts: fewer per batch (max_batch_tokens)
    eng = ScriptedEngine(tok, right)
    run_needle(eng, tok, [64, 128], [0.0, 50.0, 100.0], NeedleConfig(trials=3, max_batch_size=4, max_batch_tokens=200))
    assert eng.batches == [3, 3, 3] + [1] * 9  # 200 // 64 = 3 prompts of 64 tokens, 200 // 128 = 1 of 128


def test_eval_needle_end_to_end(ckpt, tmp_path):
    out = tmp_path / "out" / "grid.json"
    rc, stdout, err = run_cli(["eval", ckpt, "--task", "needle", "--lengths", "64,128", "--depths", "0,50,100",
                               "--trials", 2, "--new-tokens", 4, "--device", "cpu", "--out-json", out])
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["lengths"] == [64, 128] and r["depths"] == [0, 50, 100] and r["context"] == 256
    assert len(r["accuracy"]) == 2 and all(len(row) == 3 for row in r["accuracy"]) and len(r["results"]) == 12
    assert all(0 <= a <= 1 for row in r["accuracy"] for a in row)
    assert (tmp_path / "out" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert "| length | 0% | 50% | 100% | mean |" in stdout and "needle: 12/12 prompts" in err
    # a length beyond the context: one line, exit status 2, before the model loads
    rc, _, err = run_cli(["eval", ckpt, "--task", "needle", "--lengths", "128,300"])
    assert rc == 2 and err.count("\n") == 1 and "length 300 is beyond the model's context" in err
    rc, _, err = run_cli(["eval", tmp_path / "missing", "--task", "needle"])
    assert rc == 2 and "missing" in err and err.count("\n") == 1


def test_eval_data_bits_per_byte_matches_direct_computation(ckpt, tok, tmp_path):
    text = "".join(f"The sky is blue {i}. def f(x): return x * {i}\n" for i in range(40))
    data = tmp_path / "data.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "r.json"
    rc, stdout, err = run_cli(["eval", ckpt, "--data", data, "--split", "all", "--seq-len", 32, "--device", "cpu",
                               "--cache-dir", tmp_path / "cache", "--no-progress", "--out-json", out])
    assert rc == 0, err
    r = json.loads(out.read_text())
    # direct: the file's tokens + EOS, windows of 33 at stride 32, summed cross-entropy over the targets' bytes
    ids = tok.encode(text, parse_special=False) + [tok.eos_id]
    n_win = (len(ids) - 1) // 32
    x = torch.tensor([ids[w * 32: w * 32 + 33] for w in range(n_win)])
    model = load_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(x[:, :-1]).logits
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), x[:, 1:].flatten(), reduction="sum")
    lens = tok.token_byte_lengths()
    targets = x[:, 1:].flatten().tolist()
    n_bytes = int(sum(lens[t] for t in targets))
    assert r["val_tokens"] == n_win * 32 and r["val_bytes"] == n_bytes
    assert r["val_bpb"] == pytest.approx(nats.item() / (math.log(2) * n_bytes), rel=1e-5)
    raw = tok.decode_bytes([t for t in targets if lens[t]])
    assert raw == text.encode()[len(tok.decode_bytes(ids[:1])):][:len(raw)]  # the file's bytes, from token 1
    assert r["compressors"] == compressor_bits_per_byte(raw)
    assert f"| gzip -9 | {r['compressors']['gzip -9']:.4f} |" in stdout
    assert f"| dsv3 checkpoint | {r['val_bpb']:.4f} |" in stdout
    # empty data: one clear line
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    rc, _, err = run_cli(["eval", ckpt, "--data", empty, "--cache-dir", tmp_path / "cache", "--no-progress"])
    assert rc == 2 and err.count("\n") == 1 and "no documents in file" in err
    # a split without text (the one document falls in train at 0 per mille): says so, and how to read it all
    rc, _, err = run_cli(["eval", ckpt, "--data", data, "--val-permille", 0, "--cache-dir", tmp_path / "cache",
                          "--no-progress", "--split", "val"])
    assert rc == 2 and err.count("\n") == 1 and "val split" in err and "holds no text" in err and "--split all" in err


def test_heldout_python_for_the_default_run():
    """The default run's second held-out set: pip's own source (in every environment, never in the stdlib
    corpus), generated tables left out; the closing table puts the model beside gzip and xz."""
    from dsv3.training.evaluate import format_report, heldout_corpus

    c = heldout_corpus()
    assert c is not None and c.description.startswith("pip ") and len(c.files) > 100
    names = {f.relpath for f in c.files}
    assert all(n.endswith(".py") for n in names) and "__init__.py" in names
    assert not any(n.endswith("idna/uts46data.py") for n in names)  # "automatically generated" table
    row = {"name": "pip", "val_bytes": 1234, "val_bpb": 1.5, "compressors": {"gzip -9": 1.75, "xz -9e": 1.25}}
    assert format_report([row]).splitlines()[-1] == "| pip | 1,234 | 1.500 | 1.750 | 1.250 |"
