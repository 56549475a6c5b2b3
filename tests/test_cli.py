"""`dsv3` command line: train (with --config), --resume, eval, sample, and clear errors with exit
status 2 for bad inputs. In-process through `dsv3.cli.main`; CPU, a ~0.3M-parameter model, about
ten seconds.

Run: python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import io
import json
import math
import dataclasses
import os
import re

import pytest
import torch

from dsv3.cli import main
from dsv3.config import ModelConfig
from conftest import run_cli, write_corpus

MICRO = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=1, torch_dtype="float32",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`dsv3 train --config micro.json` for 6 steps (checkpoints at 3 and 6); `resumed` trains on to 8."""
    base = tmp_path_factory.mktemp("cli")
    cfg = base / "micro.json"
    ModelConfig(**MICRO).validate().to_json(cfg)
    data = write_corpus(base / "corpus")
    cache = base / "cache"
    out = base / "run"
    common = ["train", "--config", cfg, "--data", data, "--out", out, "--seq-len", 32, "--batch-size", 4,
              "--save-every", 3, "--eval-every", 0, "--cache-dir", cache, "--no-progress", "--no-plots"]
    rc, stdout, stderr = run_cli(common + ["--steps", 6, "--samples", 1])
    assert rc == 0, stderr
    return {"base": base, "cfg": cfg, "data": data, "cache": cache, "out": out, "common": common,
            "train_stdout": stdout}


def test_train_writes_run_and_prints_samples(run):
    out = run["out"]
    # (step 8 as well once a test has resumed the run)
    assert sorted(os.listdir(out / "checkpoints"))[:2] == ["step_00000003", "step_00000006"]
    with open(out / "train_config.json", encoding="utf-8") as f:
        tc = json.load(f)
    assert tc["model"]["hidden_size"] == 64 and tc["train"]["steps"] == 6 and tc["train"]["seq_len"] == 32
    stdout = run["train_stdout"]
    assert "samples from" in stdout and "--- prompt 'def '" in stdout
    # --cache-dir holds the trained tokenizer and the token cache
    assert sorted(os.listdir(run["cache"])) == ["tokenizers", "tokens"]


def test_train_and_info_print_the_same_parameter_counts(run):
    """`dsv3 train`'s start line and `dsv3 info` print one line of counts (dsv3/info.py param_line), and
    those counts are the built model's: main + MTP = its parameters and correction biases, as stored = the
    elements in the run checkpoint's model.safetensors; the official layout's figure (in `dsv3 info`) is
    what save_pretrained writes by default, with the MTP layer's embedding and head copies."""
    from safetensors import safe_open

    from dsv3.checkpoints.hf import load_pretrained, save_pretrained
    from dsv3.info import _fmt, model_info, param_counts, param_line

    def stored(directory):
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    cfg = ModelConfig.from_json(run["cfg"])
    line = param_line(cfg)
    assert f"parameters: {line};" in run["train_stdout"]
    rc, info, err = run_cli(["info", "--config", run["cfg"]])
    assert rc == 0, err
    assert re.search(r"^parameters +" + re.escape(line) + "$", info, re.M), info

    ck = run["out"] / "checkpoints" / "step_00000003"
    model = load_pretrained(ck)
    n = param_counts(cfg)
    held = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert n["main model"] + n["MTP modules"] == held
    assert n["MTP modules"] == sum(p.numel() for p in model.mtp.parameters()) + sum(
        b.numel() for name, b in model.mtp.named_buffers() if name.endswith("e_score_correction_bias"))
    assert n["as stored"] == stored(ck)
    save_pretrained(model, run["base"] / "official")
    official = model_info(cfg).total + model_info(cfg).mtp_stored
    assert official == stored(run["base"] / "official") > n["as stored"]
    assert f"{_fmt(official)} in the official layout" in info


def resumed(run) -> tuple:
    """The run trained on from step 6 to 8, once, by the first test that needs step 8 (so that each such test also
    passes alone): run_cli's (rc, stdout, err) of the attempt without --resume, then of the one with it."""
    if "resumed" not in run:
        refused = run_cli(run["common"] + ["--steps", 8, "--samples", 0])
        run["resumed"] = (refused, run_cli(run["common"] + ["--steps", 8, "--samples", 0, "--resume"]))
    return run["resumed"]


def test_train_resume_and_refusal(run):
    (rc, _, err), (rc2, stdout, err2) = resumed(run)
    assert rc == 2 and "--resume" in err and "already holds checkpoints" in err
    assert rc2 == 0, err2
    assert "resumed from" in stdout and "step_00000006" in stdout
    lines = (run["out"] / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert max(steps) == 8


def test_eval_prints_loss_and_bits_per_byte(run):
    resumed(run)  # the run directory's latest checkpoint is step 8, the one compared below
    argv = ["eval", run["out"], "--data", run["data"], "--cache-dir", run["cache"], "--seq-len", 32,
            "--val-permille", 200]
    rc, stdout, err = run_cli(argv)
    assert rc == 0, err
    m = re.search(r"loss ([\d.]+) nats/token, ([\d.]+) bits/byte over ([\d,]+) tokens", stdout)
    assert m, stdout
    loss, bpb, n = float(m.group(1)), float(m.group(2)), int(m.group(3).replace(",", ""))
    assert 0 < loss < math.log(512) and 0 < bpb < 8 and n > 0
    # eval's --cache-dir means what train's does: the token cache lives under <cache-dir>/tokens
    assert sorted(os.listdir(run["cache"])) == ["tokenizers", "tokens"]
    # a checkpoint directory works as well as a run directory, with the same result
    ck = run["out"] / "checkpoints" / "step_00000008"
    rc2, stdout2, _ = run_cli(["eval", ck] + argv[2:])
    assert rc2 == 0 and stdout2.split(": ", 1)[1] == stdout.split(": ", 1)[1]


def test_evaluate_checkpoint_is_what_eval_prints(run):
    """The library function behind `dsv3 eval` (dsv3/training/evaluate.py)."""
    from dsv3.training.evaluate import EvalConfig, evaluate_checkpoint

    cfg = EvalConfig(data=run["data"], cache_dir=str(run["cache"]), seq_len=32, val_permille=200, max_batches=2,
                     progress=False, split="val")
    resumed(run)
    r = evaluate_checkpoint(str(run["out"]), cfg)
    assert os.path.basename(r["checkpoint"]) == "step_00000008" and r["split"] == "val"
    assert r["val_tokens"] == 2 * cfg.batch_size * cfg.seq_len  # two full batches of 8 windows of 32 targets
    rc, stdout, err = run_cli(["eval", run["out"], "--data", run["data"], "--cache-dir", run["cache"], "--seq-len", 32,
                               "--val-permille", 200, "--max-batches", 2, "--no-progress", "--split", "val"])
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0] == (f"{r['checkpoint']}: loss {r['val_loss']:.4f} nats/token, {r['val_bpb']:.4f} bits/byte "
                        f"over {r['val_tokens']:,} tokens of the val split (--val-permille 200) of {r['source']}")
    # then gzip and xz on the same bytes as the model (dsv3/eval/compress.py)
    assert lines[2:] == [f"| on the same {r['val_bytes']:,} bytes | bits/byte |", "|---|---|",
                         *(f"| {k} | {v:.4f} |" for k, v in r["compressors"].items()),
                         f"| dsv3 checkpoint | {r['val_bpb']:.4f} |"]
    assert list(r["compressors"]) == ["gzip -9", "xz -9e"] and all(0 < v < 8 for v in r["compressors"].values())
    # data the user names is evaluated whole by default (train + val split), with a progress bar on stderr
    whole = evaluate_checkpoint(str(run["out"]), dataclasses.replace(cfg, split=None, max_batches=0))
    assert whole["split"] == "all" and whole["val_tokens"] > 4 * r["val_tokens"]
    rc, stdout, err = run_cli(["eval", run["out"], "--data", run["data"], "--cache-dir", run["cache"], "--seq-len", 32,
                               "--val-permille", 200])
    assert rc == 0 and f"over {whole['val_tokens']:,} tokens of all of" in stdout and "eval: 100%" in err, err
    # the stdlib (no --data) is what training reads: its val split only
    assert EvalConfig().split is None and "else the stdlib's val split" in dataclasses.fields(EvalConfig)[1].metadata["help"]


def test_eval_defaults_to_the_split_and_context_of_the_checkpoints_run(run, tmp_path):
    """Without --val-permille / --seq-len, `dsv3 eval` scores the split the checkpoint's run held out (its
    --val-permille, read from trainer_state.json) at the context it trained on (its --seq-len): with train's
    defaults instead, a run trained with another --val-permille was scored partly on documents it had trained on.
    A checkpoint without its run's state (exported, another tool's) gets train's defaults."""
    import shutil

    from dsv3.training.config import TrainConfig
    from dsv3.training.evaluate import EvalConfig, evaluate_checkpoint, run_settings

    ck = tmp_path / "ck"
    shutil.copytree(run["out"] / "checkpoints" / "step_00000006", ck)
    state = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
    state["train_config"].update(val_permille=200, seq_len=16)  # as if the run had trained with these
    (ck / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    cfg = EvalConfig(data=run["data"], cache_dir=str(run["cache"]), max_batches=2, progress=False, split="val",
                     compressors=False)
    r = evaluate_checkpoint(str(ck), cfg)
    assert (r["val_permille"], r["seq_len"]) == (200, 16)
    assert r == evaluate_checkpoint(str(ck), dataclasses.replace(cfg, val_permille=200, seq_len=16))
    assert r["val_tokens"] == 2 * cfg.batch_size * 16
    given = evaluate_checkpoint(str(ck), dataclasses.replace(cfg, val_permille=300, seq_len=32))  # flags win
    assert (given["val_permille"], given["seq_len"]) == (300, 32)
    rc, stdout, err = run_cli(["eval", ck, "--data", run["data"], "--cache-dir", run["cache"], "--max-batches", 2,
                               "--no-progress", "--split", "val", "--no-compressors"])
    assert rc == 0 and f"tokens of the val split (--val-permille 200) of {r['source']}" in stdout, err
    (ck / "trainer_state.json").unlink()
    assert run_settings(str(ck)) == {}
    bare = evaluate_checkpoint(str(ck), dataclasses.replace(cfg, seq_len=32, split="train"))
    assert bare["val_permille"] == TrainConfig.val_permille != 200


def test_eval_records_expert_loads(run, tmp_path):
    """`dsv3 eval --record-expert-loads FILE`: the tokens routed to each expert of each MoE block over the windows
    evaluated (the MTP module runs too: T - 1 positions per window), written as the (blocks, E) counts `dsv3 serve
    --expert-loads` reads; the loss is the main model's, as without it."""
    import numpy as np

    from dsv3.checkpoints.loads import load_counts
    from dsv3.inference.eplb import plan_placement
    from dsv3.training.evaluate import EvalConfig, evaluate_checkpoint

    cfg = EvalConfig(data=run["data"], cache_dir=str(run["cache"]), seq_len=32, val_permille=200, max_batches=2,
                     progress=False, split="val", compressors=False)
    plain = evaluate_checkpoint(str(run["out"]), cfg)
    out = tmp_path / "loads" / "counts.pt"
    r = evaluate_checkpoint(str(run["out"]), dataclasses.replace(cfg, record_expert_loads=str(out)))
    assert r["val_loss"] == plain["val_loss"]
    mc = ModelConfig.from_json(run["cfg"])
    counts = load_counts(str(out))
    blocks = mc.num_hidden_layers - mc.first_k_dense_replace + mc.num_nextn_predict_layers
    assert counts.shape == (blocks, mc.n_routed_experts) and counts.dtype == torch.long
    K, windows = mc.num_experts_per_tok, 2 * cfg.batch_size
    main = blocks - mc.num_nextn_predict_layers
    assert (counts[:main].sum(1) == K * r["val_tokens"]).all()
    assert (counts[main:].sum(1) == K * windows * (cfg.seq_len - 1)).all()
    assert r["expert_loads"]["blocks"] == blocks and len(r["expert_loads"]["max_violation"]) == blocks
    plan_placement(counts.double(), 2, 2)  # what `--ep 2 --redundant-experts 2` would plan from it
    npy = tmp_path / "counts.npy"
    rc, stdout, err = run_cli(["eval", run["out"], "--data", run["data"], "--cache-dir", run["cache"], "--seq-len", 32,
                               "--val-permille", 200, "--max-batches", 2, "--no-progress", "--split", "val",
                               "--no-compressors", "--record-expert-loads", npy])
    assert rc == 0, err
    assert f"wrote the expert loads ({blocks} MoE blocks x {mc.n_routed_experts} experts) to {npy}" in stdout
    assert np.array_equal(np.load(npy), counts.numpy())
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = run_cli(["eval", run["out"], "--data", run["data"], "--record-expert-loads", blocker / "c.pt"])
    assert rc == 2 and str(blocker / "c.pt") in err and "cannot create its directory" in err, err


def test_eval_errors(run, tmp_path):
    rc, _, err = run_cli(["eval", run["out"], "--data", run["data"], "--cache-dir", run["cache"],
                          "--seq-len", 100000, "--split", "train"])
    assert rc == 2 and "--seq-len 100000 is longer than the model's context" in err
    rc, _, err = run_cli(["eval", run["out"], "--data", run["data"], "--cache-dir", run["cache"], "--max-batches", -1])
    assert rc == 2 and "max_batches must be >= 0" in err
    rc, _, err = run_cli(["eval", tmp_path / "nowhere", "--data", run["data"]])
    assert rc == 2 and "nowhere" in err


def test_bad_serving_and_device_flags_are_one_line_errors(run):
    """Refused before the model loads or the socket binds, as the command's one-line error: a port out of range, a
    batch of no requests, an unknown device, a NaN temperature."""
    for argv, want in ((["serve", run["out"], "--port", 99999], "--port must be in 0..65535, got 99999"),
                       (["serve", run["out"], "--max-batch-size", 0], "--max-batch-size must be >= 1, got 0"),
                       (["serve", run["out"], "--max-prefill-tokens", -1], "--max-prefill-tokens must be >= 0"),
                       # a negative limit started a server that refused every request (400 / 503)
                       (["serve", run["out"], "--max-queue", -1], "--max-queue must be >= 0, got -1"),
                       (["serve", run["out"], "--max-tokens-limit", -5], "--max-tokens-limit must be >= 0"),
                       (["serve", run["out"], "--max-prompt-tokens", -2], "--max-prompt-tokens must be >= 0"),
                       (["serve", run["out"], "--prep-workers", 0], "--prep-workers must be >= 1, got 0"),
                       (["serve", run["out"], "--record-expert-loads", run["base"]], "is a directory; give a file"),
                       (["serve", run["out"], "--eplb-interval", 5], "--eplb-interval place the experts over"),
                       (["generate", run["out"], "--prompt", "x", "--device", "tpu"], "device must be auto, cpu, cuda"),
                       (["generate", run["out"], "--prompt", "x", "--stop-token-ids", -1],
                        "stop token ids must be in [0, 512), got -1"),
                       (["generate", run["out"], "--prompt", "x", "--temperature", "nan"],
                        "temperature must be a finite number >= 0")):
        rc, out, err = run_cli(argv)
        assert rc == 2 and want in err and "Traceback" not in err, (argv, err)
        assert out == "", (argv, out)  # (generate: refused before the prompt is echoed)
    # a port in use: refused before the model loads (it was uvicorn's log line and exit 3 after the load)
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc, out, err = run_cli(["serve", run["out"], "--port", port])
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}: " in err and "serving" not in out, (out, err)
    assert len(err.strip().splitlines()) == 1, err


def test_sample_prints_prompt_and_continuation(run):
    argv = ["sample", run["out"], "--prompt", "def", "--max-new-tokens", 5]
    rc, stdout, err = run_cli(argv)
    assert rc == 0, err
    assert stdout.startswith("def") and len(stdout.rstrip("\n")) > len("def")
    assert run_cli(argv)[1] == stdout  # seeded: the same text again
    rc, greedy, _ = run_cli(argv + ["--temperature", 0])
    assert rc == 0 and greedy.startswith("def")
    # MICRO's context is 256: the default --max-new-tokens (256) becomes what fits after the prompt (it was an error
    # on every such checkpoint); a length asked for that cannot fit is refused before the prompt is echoed
    rc, stdout, err = run_cli(["sample", run["out"], "--prompt", "def", "--temperature", 0, "--ignore-eos"])
    assert rc == 0 and stdout.startswith("def"), err
    rc, stdout, err = run_cli(["sample", run["out"], "--prompt", "def", "--max-new-tokens", 256])
    assert rc == 2 and stdout == "" and "exceeds the model's context of 256 tokens" in err, err


# ------------------------------------------------------------------------------------------------
# errors

def test_unknown_preset():
    rc, out, err = run_cli(["info", "--preset", "nope"])
    assert rc == 2 and out == ""
    assert "'nope'" in err and "tiny" in err and "671b" in err


def test_plan_and_info_bad_numbers_and_files(tmp_path):
    for gib in ("-5", "nan", "0"):
        rc, out, err = run_cli(["plan", "--preset", "tiny", "--gpu-mem", gib])
        assert rc == 2 and out == "" and "--gpu-mem must be a finite number of GiB > 0" in err, (gib, err)
    rc, _, err = run_cli(["plan", "--preset", "tiny", "--gpus", 0])
    assert rc == 2 and "--gpus must be >= 1" in err
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"vocab_size": "\xff"}')
    rc, _, err = run_cli(["info", "--config", bad])
    assert rc == 2 and "latin1.json is not UTF-8 text" in err, err


def test_bad_config_paths(tmp_path):
    rc, _, err = run_cli(["info", "--config", tmp_path / "missing.json"])
    assert rc == 2 and "config file not found" in err and "missing.json" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    rc, _, err = run_cli(["info", "--config", bad])
    assert rc == 2 and "not valid JSON" in err
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({**MICRO, "n_group": 3}), encoding="utf-8")  # 8 experts in 3 groups
    rc, _, err = run_cli(["info", "--config", invalid])
    assert rc == 2 and "n_group" in err


def test_sample_missing_checkpoint(tmp_path):
    rc, out, err = run_cli(["sample", tmp_path / "no-such-run", "--prompt", "x"])
    assert rc == 2 and out == ""
    assert "no-such-run" in err and "neither a checkpoint directory" in err


def test_train_no_checkpoints_deterministic(tmp_path, run):
    """`--no-checkpoints --deterministic`: no checkpoint, no samples, a clear line saying where the figures are;
    the flags reach the run's saved config."""
    out = tmp_path / "r"
    rc, stdout, err = run_cli(["train", "--config", run["cfg"], "--data", run["data"], "--out", out, "--seq-len", 32,
                               "--batch-size", 4, "--steps", 2, "--eval-every", 0, "--cache-dir", run["cache"],
                               "--no-progress", "--no-plots", "--no-checkpoints", "--deterministic"])
    assert rc == 0, err
    assert "no checkpoint written (--no-checkpoints)" in stdout and "samples from" not in stdout
    assert not os.path.exists(out / "checkpoints") and os.path.exists(out / "metrics.jsonl")
    with open(out / "train_config.json", encoding="utf-8") as f:
        tc = json.load(f)["train"]
    assert tc["checkpoints"] is False and tc["deterministic"] is True


def test_train_bad_data_path(tmp_path, run):
    rc, _, err = run_cli(["train", "--config", run["cfg"], "--data", tmp_path / "absent", "--out", tmp_path / "r",
                          "--cache-dir", tmp_path / "c", "--steps", 1, "--no-progress", "--samples", 0])
    assert rc == 2 and "absent" in err and "does not exist" in err


def test_train_bad_batch(tmp_path, run):
    rc, _, err = run_cli(["train", "--config", run["cfg"], "--data", run["data"], "--out", tmp_path / "r",
                          "--batch-size", 4, "--micro-batch-size", 3, "--no-progress"])
    assert rc == 2 and "multiple of micro_batch_size" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: dsv3" in capsys.readouterr().out


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "somewhere"])  # --prompt is required
    assert e.value.code == 2
    assert "--prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["info", "--preset", "small", "--config", "x.json"])  # mutually exclusive
    assert e.value.code == 2


def test_generate_greedy_matches_engine_and_speculation(run):
    from dsv3.inference.engine import SamplingParams, load_engine

    resumed(run)
    ck = run["out"] / "checkpoints" / "step_00000008"
    engine, tok = load_engine(str(ck), device="cpu")
    assert engine.model.embed_tokens.weight.dtype == torch.float32  # the CPU default
    assert load_engine(str(ck), device="cpu", dtype=torch.bfloat16)[0].model.embed_tokens.weight.dtype == torch.bfloat16
    want = engine.generate(["def"], SamplingParams(max_new_tokens=12, temperature=0))[0].text
    for k in ("0", "2"):
        rc, stdout, err = run_cli(["generate", ck, "--prompt", "def", "--max-new-tokens", 12, "--temperature", 0,
                                   "--speculative-k", k, "-v", "--device", "cpu"])
        assert rc == 0, err
        assert stdout == "def" + want + "\n"
        assert "tokens, finish reason" in err
    rc, stdout, err = run_cli(["generate", ck, "--prompt", "hi", "--chat", "--max-new-tokens", 4, "--device", "cpu"])
    assert rc == 0, err
    assert not stdout.startswith("hi")  # --chat prints only the reply, not the templated prompt


def test_chat_reads_turns_from_stdin(run, monkeypatch):
    resumed(run)
    ck = run["out"] / "checkpoints" / "step_00000008"
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nsecond turn\n\n/exit\nnever read\n"))
    seen = []
    import dsv3.tokenizer as tkmod

    orig = tkmod.DSTokenizer.apply_chat_template

    def spy(self, messages, add_generation_prompt=True):
        seen.append([m["content"] for m in messages])
        return orig(self, messages, add_generation_prompt)

    monkeypatch.setattr(tkmod.DSTokenizer, "apply_chat_template", spy)
    rc, stdout, err = run_cli(["chat", ck, "--max-new-tokens", 3, "--system", "be brief", "--device", "cpu"])
    assert rc == 0, err
    # the system prompt stays; /reset drops the first exchange; blank lines and text after /exit are ignored
    assert seen == [["be brief", "hello"], ["be brief", "second turn"]]


def test_text_that_is_not_utf8_is_a_one_line_error(run, monkeypatch):
    """A non-UTF-8 byte in --prompt (Python's argv and stdin hold it as a surrogate escape) was a TypeError traceback
    from the tokenizer; generate refuses it naming the byte, chat skips that message and goes on."""
    for extra in ([], ["--chat"]):
        rc, stdout, err = run_cli(["generate", run["out"], "--prompt", "ab\udcffcd", "--max-new-tokens", 2] + extra)
        assert rc == 2 and stdout == "" and "--prompt is not UTF-8 text (byte 0xff at character 2)" in err, err
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\udcffcd\nhello\n"))
    rc, stdout, err = run_cli(["chat", run["out"], "--max-new-tokens", 2, "--device", "cpu"])
    assert rc == 0 and "the message is not UTF-8 text (byte 0xff at character 2)" in err and "Traceback" not in err


def table_rows(stdout: str, title: str) -> dict[str, str]:
    """The rows "  key  value" of the table under `title`, the last lines of stdout."""
    lines = stdout[stdout.index(title):].splitlines()[1:]
    return dict(re.fullmatch(r"  (\S.*?) {2,}(\S.*)", line).groups() for line in lines)


def test_sft_and_grpo_commands_run_end_to_end(run, tmp_path):
    from dsv3.posttrain.tasks import arithmetic_sft_chats

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_sft_chats(40, 0)), encoding="utf-8")
    sft_out = tmp_path / "sft"
    rc, stdout, err = run_cli(["sft", run["out"], "--data", chats, "--out", sft_out, "--steps", 2, "--batch-size", 2,
                               "--seq-len", 256, "--lr", 1e-4, "--device", "cpu"])
    assert rc == 0, err
    assert (sft_out / "checkpoints" / "step_00000002" / "config.json").exists()
    assert "warning" not in stdout and json.loads((sft_out / "metrics.jsonl").read_text().splitlines()[0])["loss_tokens"] > 0
    # the end of the run: a short table of the key figures, the whole summary in OUT/summary.json
    assert "{'" not in stdout and '{"' not in stdout
    summary = json.loads((sft_out / "summary.json").read_text(encoding="utf-8"))
    rows = table_rows(stdout, "sft finished:")
    assert rows["optimizer steps"] == "2 of 2" and rows["final loss"] == f"{summary['train_loss']:.4f}"
    assert re.fullmatch(r"[\d.]+ s", rows["time"]) and rows["checkpoint"] == summary["checkpoint"]
    assert rows["all figures"] == str(sft_out / "summary.json")
    grpo_out = tmp_path / "grpo"
    rc, stdout, err = run_cli(["grpo", sft_out, "--out", grpo_out, "--iterations", 1, "--prompts", 2,
                               "--group-size", 2, "--max-new-tokens", 4, "--eval-every", 1, "--device", "cpu"])
    assert rc == 0, err
    assert "{'" not in stdout and '{"' not in stdout
    summary = json.loads((grpo_out / "summary.json").read_text(encoding="utf-8"))
    rows = table_rows(stdout, "grpo finished:")
    assert rows["optimizer steps"] == "2 of 2 (1 iteration)"  # ppo_epochs 2: two steps per iteration
    assert rows["final reward"] == f"{summary['reward_mean']:.3f} (sample accuracy {summary['accuracy']:.3f})"
    assert rows["held-out accuracy"] == f"{summary['heldout_acc']:.3f} over {summary['heldout_n']} problems (greedy)"
    assert rows["checkpoint"] == summary["checkpoint"] and rows["all figures"] == str(grpo_out / "summary.json")
    rc, _, err = run_cli(["sft", run["out"], "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "x"])
    assert rc == 2 and "missing.jsonl" in err
    # rows too short to reach any answer: refused, not a run of zero losses
    rc, _, err = run_cli(["sft", run["out"], "--data", chats, "--out", tmp_path / "y", "--seq-len", 16])
    assert rc == 2 and "no conversation has an assistant token within its first 16 tokens" in err


def test_ctrl_c_outside_a_training_loop_is_one_line_and_130(monkeypatch, capsys):
    """Ctrl-C while a verb tokenises or loads (no training loop to save and say so): one line, exit 130, no
    KeyboardInterrupt traceback (the CLI audit saw one during tokenisation)."""
    from dsv3 import cli

    def interrupted(args):
        raise KeyboardInterrupt

    help_, flags, _ = cli.VERBS["info"]
    monkeypatch.setitem(cli.VERBS, "info", (help_, flags, interrupted))
    assert cli.main(["info", "--preset", "tiny"]) == 130
    assert capsys.readouterr().err == "dsv3 info: interrupted\n"
