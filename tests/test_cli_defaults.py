"""Defaults once (issue 12, item 7): every `dsv3` verb's settings are the fields of a library config
dataclass. For each verb: parsing only the required arguments gives exactly the dataclass defaults
(so a default re-declared in the CLI fails here), every flag is a field or one of the CLI's own few,
every help text is the field's, renamed flags reach the right field, bad values are argparse errors,
and the configs built from the arguments are the ones the library functions receive. No model is
trained; the library calls are replaced by recorders. A few seconds.

Run: python -m pytest tests/test_cli_defaults.py -q
"""

from __future__ import annotations

import argparse
import dataclasses
import types

import pytest
import torch

from dsv3 import cli
from dsv3.checkpoints.hf import ExportConfig, QuantizeConfig
from dsv3.cliargs import from_args, selected_fields
from dsv3.config import preset
from dsv3.distributed.mesh import DERIVED, ParallelConfig
from dsv3.eval.humaneval import HumanEvalConfig
from dsv3.inference.engine import EngineConfig, SamplingParams
from dsv3.inference.server import ServerConfig
from dsv3.plan import PlanConfig
from dsv3.plan_serve import ServePlanConfig
from dsv3.posttrain.grpo import GRPOConfig
from dsv3.posttrain.sft import SFTConfig
from dsv3.training.config import TrainConfig
from dsv3.eval.needle import NeedleConfig
from dsv3.training.evaluate import EvalConfig

GENERATE = [(SamplingParams, dict(exclude=("logprobs",))),
            (EngineConfig, dict(only=("speculative_k", "device", "batch_invariant", "ep", "expert_loads",
                                      "redundant_experts", "dp_attention", "attn_tp", "eplb_interval")))]
CHAT = [(SamplingParams, dict(exclude=("logprobs",))),
        (EngineConfig, dict(only=("speculative_k", "device", "batch_invariant")))]
# verb -> the dataclasses whose fields are its settings (with the selection the verb offers)
SETTINGS = {
    "info": [],
    "plan": [(PlanConfig, {}), (ServePlanConfig, {})],
    "train": [(TrainConfig, {}), (ParallelConfig, {})],
    "eval": [(EvalConfig, {}), (NeedleConfig, {}), (HumanEvalConfig, dict(only=cli.HUMANEVAL_FIELDS))],
    "generate": GENERATE,
    "sample": GENERATE,
    "chat": CHAT,
    "sft": [(SFTConfig, {}), (ParallelConfig, dict(only=cli.POSTTRAIN_LAYOUT))],
    "grpo": [(GRPOConfig, {}), (ParallelConfig, dict(only=cli.POSTTRAIN_LAYOUT))],
    "convert": [(ExportConfig, {})],
    "quantize": [(QuantizeConfig, {})],
    "serve": [(ServerConfig, {}), (EngineConfig, {})],
}
# the required arguments of each verb
REQUIRED = {"info": [], "plan": [], "train": [], "eval": ["ck"], "generate": ["ck", "--prompt", "p"],
            "sample": ["ck", "--prompt", "p"], "chat": ["ck"], "sft": ["ck", "--data", "d.jsonl", "--out", "o"],
            "grpo": ["ck", "--out", "o"], "convert": ["ck", "o"], "quantize": ["ck", "o"], "serve": ["ck"]}
# the CLI's own arguments: what to run on and what to print, no library setting
CLI_ONLY = {"info": {"preset", "config"}, "plan": {"preset", "config", "suggest", "sort", "serve", "json"},
            "train": {"preset", "config", "samples", "report"},
            "eval": {"checkpoint", "task", "out_json", "out_png", "lm_eval", "include_path"},
            "generate": {"checkpoint", "prompt", "chat", "verbose"}, "sample": {"checkpoint", "prompt", "chat", "verbose"},
            "chat": {"checkpoint", "system"}, "sft": {"checkpoint", "data", "out"},
            "grpo": {"checkpoint", "task", "reward", "out"}, "convert": {"checkpoint", "out"},
            "quantize": {"checkpoint", "out"}, "serve": {"checkpoint"}}
# the only places where the command line's value differs from the field's default, each documented:
# the run directory and the two degrees are derived from other arguments; `sample` is seeded
CLI_DIFFERS = {("train", "out_dir"): None, ("train", "dp_shard"): DERIVED, ("train", "ep"): DERIVED,
               ("sft", "dp_shard"): DERIVED, ("sft", "ep"): DERIVED, ("grpo", "dp_shard"): DERIVED,
               ("grpo", "ep"): DERIVED, ("sample", "seed"): 0}


def subparser(verb: str):
    return cli.build_parser(verb)._subparsers._group_actions[0].choices[verb]


def parse(verb: str, *extra):
    return cli.build_parser(verb).parse_args([verb, *REQUIRED[verb], *map(str, extra)])


def fields_of(verb):
    return [(cls, f) for cls, sel in SETTINGS[verb] for f in selected_fields(cls, **sel)]


def test_tables_cover_every_verb():
    assert set(SETTINGS) == set(REQUIRED) == set(CLI_ONLY) == set(cli.VERBS)


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_required_arguments_only_give_the_library_defaults(verb):
    args = parse(verb)
    for cls, f in fields_of(verb):
        want = CLI_DIFFERS.get((verb, f.name), getattr(cls(), f.name))
        assert getattr(args, f.name) == want, f"dsv3 {verb}: {f.name} parses to {getattr(args, f.name)!r}, " \
                                              f"{cls.__name__} says {want!r}"
    for cls, sel in SETTINGS[verb]:  # and built back: the library's defaults (the CLI's derived values aside)
        derived = {k: getattr(cls(), k) for v, k in CLI_DIFFERS if v == verb and k in cls.__dataclass_fields__}
        assert from_args(cls, args, **sel, **derived) == cls()


def test_cli_defaults_are_the_documented_ones():
    """A field whose command line default differs says so in its metadata, and only these do."""
    marked = {(cls.__name__, f.name): f.metadata["cli_default"] for verb in SETTINGS for cls, f in fields_of(verb)
              if "cli_default" in f.metadata}
    assert marked == {("TrainConfig", "out_dir"): None, ("ParallelConfig", "dp_shard"): 0,
                      ("ParallelConfig", "ep"): 0}
    for (cls_name, name) in marked:
        cls = {"TrainConfig": TrainConfig, "ParallelConfig": ParallelConfig}[cls_name]
        assert "default:" in cls.__dataclass_fields__[name].metadata["help"]  # the help says what happens


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_flag_is_a_field_or_the_clis_own(verb):
    dests = {a.dest for a in subparser(verb)._actions} - {"help"}
    assert dests == {f.name for _, f in fields_of(verb)} | CLI_ONLY[verb]


@pytest.mark.parametrize("verb", [v for v in cli.VERBS if SETTINGS[v]])
def test_help_comes_from_the_field_metadata(verb):
    acts = {a.dest: a for a in subparser(verb)._actions}
    for cls, f in fields_of(verb):
        text = f.metadata.get("help", "")
        assert text, f"{cls.__name__}.{f.name} has no help metadata"
        assert acts[f.name].help.startswith(text.replace("%", "%%")), (f.name, acts[f.name].help)


def test_help_output(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"--seq-len SEQ_LEN {SFTConfig.__dataclass_fields__['seq_len'].metadata['help']} (default: 2048)" in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--optim-state {fp32,bf16} storage dtype of the AdamW moments" in out and "(default: fp32)" in out
    assert "--no-fsdp under torchrun: replicate the non-expert parameters" in out


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_flag_has_help_and_shows_its_default(verb):
    """`dsv3 VERB --help` says what the verb does and what each flag means, and shows each default (an
    on/off flag, a repeatable one and an unset value have none to show)."""
    sp = subparser(verb)
    assert sp.description and "issue" not in sp.description  # written for users, not for the tracker
    for a in sp._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        flag = "/".join(a.option_strings) or a.dest
        assert a.help and a.help.strip(), f"dsv3 {verb} {flag} has no help"
        on_off = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
        if isinstance(a, on_off) or a.default in (None, []):
            continue
        assert "default" in a.help, f"dsv3 {verb} {flag}: the help does not show the default {a.default!r}"


def test_version(capsys, monkeypatch):
    import importlib.metadata

    import dsv3

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"dsv3 {importlib.metadata.version('dsv3')}\n"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == dsv3.__version__  # a source tree that was never installed


def test_renamed_flags_reach_their_fields():
    args = parse("train", "--out", "o", "--optim-state", "bf16", "--no-progress", "--no-fsdp", "--pp", 2,
                 "--extra-data", "a", "--extra-data", "b")
    tc, pc = from_args(TrainConfig, args), from_args(ParallelConfig, args)
    assert (tc.out_dir, tc.optim_state_dtype, tc.progress, tc.extra_data) == ("o", "bf16", False, ["a", "b"])
    assert (pc.fsdp, pc.pp) == (False, 2)
    assert from_args(GRPOConfig, parse("grpo", "--prompts", 3)).prompts_per_iter == 3
    assert from_args(PlanConfig, parse("plan", "--gpu-mem", 40)).gpu_mem_gib == 40.0
    flags = {(verb, a.dest): a.option_strings for verb in ("train", "grpo", "plan") for a in subparser(verb)._actions}
    assert flags["train", "out_dir"] == ["--out"] and flags["train", "optim_state_dtype"] == ["--optim-state"]
    assert flags["grpo", "prompts_per_iter"] == ["--prompts"] and flags["plan", "gpu_mem_gib"] == ["--gpu-mem"]
    assert flags["train", "progress"] == ["--no-progress"] and flags["train", "fsdp"] == ["--no-fsdp"]
    assert from_args(ServerConfig, parse("serve", "--served-model-name", "m")).model_name == "m"
    assert from_args(ServerConfig, parse("serve", "--model-name", "m")).model_name == "m"  # the older name
    for renames, cls in ((cli.TRAIN_RENAMES, TrainConfig), (cli.GRPO_RENAMES, GRPOConfig),
                         (cli.PLAN_RENAMES, PlanConfig), (cli.SERVE_RENAMES, ServerConfig)):
        assert set(renames) <= set(cls.__dataclass_fields__)


@pytest.mark.parametrize("argv, msg", [
    (["train", "--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'"),
    (["train", "--recompute", "some"], "argument --recompute: invalid choice: 'some'"),
    (["train", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["train", "--pp-schedule", "gpipe"], "argument --pp-schedule: invalid choice: 'gpipe'"),
    (["plan", "--zero", "5"], "argument --zero: invalid choice: 5"),
    (["sft", "ck", "--data", "d", "--out", "o", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["grpo", "ck", "--out", "o", "--prompts", "1.5"], "argument --prompts: invalid int value: '1.5'"),
    (["generate", "ck", "--prompt", "p", "--top-k", "x"], "argument --top-k: invalid int value: 'x'"),
    (["serve", "ck", "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    (["quantize", "ck", "o", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["eval", "ck", "--split", "test"], "argument --split: invalid choice: 'test'"),
])
def test_bad_values_are_argparse_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_drifted_defaults_resolved():
    # SFT: 2048, the CLI's value, = the context of the tiny preset `dsv3 train` makes by default
    assert parse("sft").seq_len == SFTConfig().seq_len == 2048 <= preset("tiny").max_position_embeddings
    # GRPO: 256, the CLI's value
    assert parse("grpo").max_new_tokens == GRPOConfig().max_new_tokens == 256
    # sampling: the library's (the model's distribution), which GRPO's sampling relies on
    assert (parse("generate").temperature, parse("chat").top_k) == (1.0, 0) == (SamplingParams().temperature,
                                                                               SamplingParams().top_k)


# ------------------------------------------------------------------------------------------------
# the configs the library receives (library calls replaced by recorders)

class Called(Exception):
    pass


def record(calls: list, ret=None):
    def f(*a, **kw):
        calls.append((a, kw))
        if isinstance(ret, Exception):
            raise ret
        return ret
    return f


def test_train_builds_its_configs(monkeypatch, tmp_path):
    import dsv3.training.pretrain as pretrain
    from dsv3.distributed.mesh import DERIVED, ParallelConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    monkeypatch.setattr(pretrain, "train", record(calls, {"interrupted": False, "checkpoint": "x"}))
    assert cli.main(["train", "--samples", "0", "--no-report"]) == 0
    (mc, tc, pcfg), _ = calls[-1]
    assert mc == preset("tiny") and tc == TrainConfig(out_dir="runs/tiny")
    # the layout: degrees left to torchrun's world size, everything else the dataclass default
    assert pcfg == ParallelConfig(dp_shard=DERIVED, ep=DERIVED)
    assert cli.main(["train", "--samples", "0", "--no-report", "--ep", "2", "--pp", "2", "--pp-schedule", "dualpipev",
                     "--no-fsdp"]) == 0
    assert calls[-1][0][2] == ParallelConfig(dp_shard=DERIVED, ep=2, pp=2, pp_schedule="dualpipev", fsdp=False)
    assert cli.main(["train", "--preset", "small", "--samples", "0", "--no-report", "--steps", "5", "--no-progress"]) == 0
    assert calls[-1][0][1] == TrainConfig(out_dir="runs/small", steps=5, progress=False)
    cfg = tmp_path / "c.json"
    preset("tiny").to_json(cfg)
    assert cli.main(["train", "--config", str(cfg), "--samples", "0", "--no-report", "--out", str(tmp_path / "r")]) == 0
    assert calls[-1][0][1].out_dir == str(tmp_path / "r")
    assert cli.main(["train", "--config", str(cfg), "--samples", "0", "--no-report"]) == 0
    assert calls[-1][0][1].out_dir == "runs/custom"


def test_train_layout_needs_torchrun(monkeypatch, tmp_path, capsys):
    """A layout of several ranks without a torchrun world is refused with the way to start it."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for extra in (["--ep", "2"], ["--dp-shard", "2"], ["--pp", "2"]):
        assert cli.main(["train", "--samples", "0", "--out", str(tmp_path / "r"), *extra]) == 2, extra
        assert "needs several processes: start it with torchrun" in capsys.readouterr().err


def test_posttrain_verbs_pass_their_configs(monkeypatch):
    import dsv3.posttrain.grpo as grpo
    import dsv3.posttrain.sft as sft

    monkeypatch.setattr(cli, "_resolve_checkpoint", lambda p: p)
    calls = []
    monkeypatch.setattr(sft, "train_sft", record(calls, {}))
    assert cli.main(["sft", "ck", "--data", "d.jsonl", "--out", "o"]) == 0
    assert calls[-1][0] == ("ck", "d.jsonl", "o", SFTConfig())
    monkeypatch.setattr(grpo, "train_grpo", record(calls, {}))
    assert cli.main(["grpo", "ck", "--out", "o", "--prompts", "4"]) == 0
    assert calls[-1][0][3] == GRPOConfig(prompts_per_iter=4)


def test_generate_and_serve_pass_their_configs(monkeypatch):
    import dsv3.inference.engine as engine
    import dsv3.inference.server as server

    calls = []
    monkeypatch.setattr(engine, "load_engine", record(calls, Called()))
    with pytest.raises(Called):
        cli.main(["generate", "ck", "--prompt", "p"])
    def one_process_kwargs(ec):  # EP ranks' fields go to run_ep; the loads file is the command's, the engine counts
        return {**{k: v for k, v in vars(ec).items() if k not in cli.EP_FIELDS},
                "record_expert_loads": bool(ec.record_expert_loads)}

    one_process = one_process_kwargs(EngineConfig(max_batch_size=1))
    assert calls[-1] == (("ck",), one_process)
    assert cli._sampling(parse("generate")) == SamplingParams()
    assert cli._sampling(parse("sample")) == SamplingParams(seed=0)
    assert cli._sampling(parse("chat", "--stop", "a", "--stop", "b", "--ignore-eos")) == \
        SamplingParams(stop=["a", "b"], ignore_eos=True)

    monkeypatch.setattr(cli, "_resolve_checkpoint", lambda p: p)
    fake = types.SimpleNamespace(cache=types.SimpleNamespace(num_blocks=4, block_size=16), max_model_len=64)
    monkeypatch.setattr(server, "load_for_serving", record(calls, (fake, "tok")))
    monkeypatch.setattr(server, "serve", record(calls))
    sock = types.SimpleNamespace(getsockname=lambda: ("127.0.0.1", 8000), close=lambda: None)
    monkeypatch.setattr(server, "listen", record(calls, sock))  # (no socket bound by this test)
    assert cli.main(["serve", "some/ck"]) == 0
    (listen_a, _), (load_a, load_kw), (serve_a, serve_kw) = calls[-3:]
    assert listen_a == ("127.0.0.1", 8000)  # the socket is bound before the model loads
    assert load_a == ("some/ck",) and load_kw == one_process_kwargs(EngineConfig())
    sc = dataclasses.asdict(ServerConfig())
    del sc["model_name"]
    sc["allowed_origins"] = []  # (the flag's comma-separated text, parsed: server.origins)
    assert serve_a == (fake, "tok", "ck") and serve_kw == {**sc, "sock": sock}


def test_eval_quantize_convert_pass_their_configs(monkeypatch):
    import dsv3.checkpoints.dcp as dcp
    import dsv3.checkpoints.hf as hf
    import dsv3.training.evaluate as ev

    calls = []
    monkeypatch.setattr(ev, "evaluate_checkpoint", record(calls, {"checkpoint": "ck", "split": "val", "source": "s",
                                                                  "val_permille": 30, "val_loss": 1.0, "val_bpb": 2.0,
                                                                  "val_tokens": 3}))
    assert cli.main(["eval", "ck"]) == 0
    assert calls[-1][0] == ("ck", EvalConfig())
    # the split and context of the checkpoint's run (trainer_state.json), else train's defaults
    assert EvalConfig().val_permille is None and EvalConfig().seq_len is None
    monkeypatch.setattr(cli, "_resolve_checkpoint", lambda p: p)
    monkeypatch.setattr(hf, "quantize_checkpoint", record(calls, Called()))
    with pytest.raises(Called):
        cli.main(["quantize", "ck", "o"])
    assert calls[-1][0] == ("ck", "o", QuantizeConfig())
    monkeypatch.setattr(dcp, "to_hf", record(calls, "o"))
    assert cli.main(["convert", "ck", "o"]) == 0
    assert calls[-1][0] == ("ck", "o", None)
    assert cli.main(["convert", "ck", "o", "--dtype", "bfloat16"]) == 0
    assert calls[-1][0] == ("ck", "o", torch.bfloat16)


def test_plan_uses_plan_config(capsys):
    from dsv3.plan import plan

    assert cli.main(["plan", "--preset", "671b", "--gpus", "2048", "--pp", "16", "--ep", "64"]) == 0
    want = plan(preset("671b"), PlanConfig(gpus=2048, pp=16, ep=64), "671b").format()
    assert capsys.readouterr().out == want + "\n"
