"""`dsv3` command line: one verb per workflow. Each verb parses its arguments, builds the config
dataclasses and calls library functions; the library itself prints nothing.

Defaults once: a verb's settings are the fields of the library's config dataclasses (TrainConfig,
ParallelConfig, SFTConfig, GRPOConfig, SamplingParams, EngineConfig, ServerConfig, EvalConfig,
PlanConfig, QuantizeConfig, ExportConfig). Their flags, types, choices, defaults and help are derived
from those fields (dsv3/cliargs.py) and the configs are built back from the parsed arguments, so no
default is written here. The flags declared by hand below are the CLI's own (what to run on, what to
print). A verb's flags are added only when that verb runs, so each command imports only its modules.

Failures: an expected one (a missing or malformed file, a bad config or flag value) prints one line
`dsv3 VERB: error: <file>: <problem>` on stderr and exits with status 2, without a traceback;
set DSV3_TRACEBACK=1 to see the traceback. Unexpected exceptions (bugs) keep theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

from dsv3.cliargs import add_fields, from_args

# flags whose names differ from their fields' (kept from before the flags were derived)
TRAIN_RENAMES = {"out_dir": "--out", "optim_state_dtype": "--optim-state"}
GRPO_RENAMES = {"prompts_per_iter": "--prompts"}
PLAN_RENAMES = {"gpu_mem_gib": "--gpu-mem"}
SERVE_RENAMES = {"model_name": ("--served-model-name", "--model-name")}  # vLLM's flag; --model-name still works
# SamplingParams fields the text-printing verbs do not offer (nothing would show the log-probabilities)
SAMPLING_EXCLUDE = ("logprobs",)
# EngineConfig fields of generate/sample/chat (one request at a time: the batch size is 1)
GENERATE_ENGINE_FIELDS = ("speculative_k", "device", "batch_invariant")
# and the expert-parallel degree, for generate/sample only (chat reads stdin: one process)
EP_FIELDS = ("ep", "expert_loads", "redundant_experts", "dp_attention", "attn_tp", "eplb_interval")


def _model_config(args):
    from dsv3.config import ModelConfig, preset

    if getattr(args, "config", None):
        return ModelConfig.from_json(args.config), args.config
    return preset(args.preset), args.preset


def _resolve_checkpoint(path: str) -> str:
    from dsv3.checkpoints.rundir import resolve_checkpoint

    return resolve_checkpoint(path)


def cmd_info(args) -> int:
    from dsv3.info import format_info

    cfg, name = _model_config(args)
    print(format_info(cfg, name))
    return 0


def cmd_plan(args) -> int:
    from dsv3.plan import PlanConfig, format_suggestions, plan, suggest

    cfg, name = _model_config(args)
    pc = from_args(PlanConfig, args)
    import math

    if not (math.isfinite(pc.gpu_mem_gib) and pc.gpu_mem_gib > 0):  # (NaN passes a plain `<= 0` test)
        raise ValueError(f"--gpu-mem must be a finite number of GiB > 0, got {pc.gpu_mem_gib}")
    if pc.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {pc.gpus}")
    if args.serve:  # a serving layout: weights per GPU, cache capacity, largest batch (dsv3.plan_serve)
        from dsv3.plan_serve import ServePlanConfig, format_json, plan_serve

        res = plan_serve(cfg, from_args(ServePlanConfig, args), pc.gpus, pc.gpu_mem_gib, name)
        print(format_json(res) if args.json else res.format())
        return 0
    if args.suggest:  # every (pp, ep) layout; dp follows from pp
        kw = {k: v for k, v in vars(pc).items() if k not in ("gpus", "gpu_mem_gib", "pp", "ep", "dp")}
        res = suggest(cfg, pc.gpus, pc.gpu_mem_gib, sort=args.sort, name=name, **kw)
        print(format_suggestions(res) if res else "no valid layout")
        return 0
    print(plan(cfg, pc, name).format())
    return 0


def cmd_train(args) -> int:
    """One process, or every rank of a torchrun world: the same loop (dsv3/training/pretrain.py)."""
    import os

    import torch.distributed as dist

    from dsv3.distributed.mesh import ParallelConfig
    from dsv3.training.config import TrainConfig
    from dsv3.training.pretrain import train

    if args.init_from:  # the model comes from the checkpoint; a --preset / --config given is checked against it
        if not args.out_dir:
            raise ValueError("--init-from starts a new run: give its directory with --out")
        mc = _model_config(args)[0] if args.preset or args.config else None  # then train() checks it
        tc = from_args(TrainConfig, args)
    else:
        asked = bool(args.preset or args.config)
        args.preset = args.preset or "tiny"  # train's --preset has no parser default: --init-from needs to see it
        mc, name = _model_config(args)
        # --out unset (its cli_default None): runs/PRESET, or runs/custom with --config
        tc = from_args(TrainConfig, args, out_dir=args.out_dir or f"runs/{name if not args.config else 'custom'}")
        if tc.resume:
            mc, tc = _resumed_settings(mc if asked else None, tc, args)
    # dp_shard / ep left at 0 (DERIVED) come from torchrun's world size (distributed/strategy.py resolve_layout)
    pcfg = from_args(ParallelConfig, args)
    if pcfg.pp <= 1 and (pcfg.pp_schedule != "1f1b" or pcfg.n_microbatches):
        raise ValueError("--pp-schedule / --n-microbatches need --pp N (N >= 2)")
    try:
        summary = train(mc, tc, pcfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["interrupted"]:
        return interrupted(summary, f"dsv3 train --out {tc.out_dir} --resume")
    if summary["checkpoint"] is None:  # --no-checkpoints: nothing to sample from or to evaluate
        if int(os.environ.get("RANK", "0")) == 0 and (args.samples > 0 or args.report):
            print("no checkpoint written (--no-checkpoints): no samples and no held-out report; the figures are in "
                  f"{os.path.join(tc.out_dir, 'metrics.jsonl')}")
        return 0
    if int(os.environ.get("RANK", "0")) == 0 and args.samples > 0:
        _print_samples(summary["checkpoint"], args.samples, args.seed)
    if int(os.environ.get("RANK", "0")) == 0 and tc.data is None and not tc.init_from and args.report:
        from dsv3.training.evaluate import default_run_report, format_report

        rows = default_run_report(summary["checkpoint"], tc)
        print(f"\nbits per byte on Python this run did not train on (lower is better):\n{format_report(rows)}")
        for r in rows:
            print(f"  {r['name']}: {r['source']}")
    return 0


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


def interrupted(summary: dict, resume_cmd: str) -> int:
    """A run stopped by Ctrl-C / SIGTERM after saving: say where (on stderr: stdout may be a closed pipe,
    `dsv3 train | tee log` after Ctrl-C) and return 130."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        if summary.get("checkpoint") is None and "checkpoint" in summary:  # dsv3 train --no-checkpoints
            print(f"interrupted at step {summary['step']} of {summary['total_steps']}; this invocation wrote no "
                  "checkpoint (--no-checkpoints)", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        print(f"interrupted at step {summary['step']} of {summary['total_steps']}: saved {summary['checkpoint']}; "
              f"continue with: {resume_cmd}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


# the settings that define a run's token stream and its batches: a resume continues at a position in them
DATA_FIELDS = ("data", "extra_data", "seed", "fim_rate", "val_permille", "seq_len", "batch_size", "micro_batch_size")


def _corpus_path(p: str | None) -> str | None:
    """A corpus setting as find_corpus reads it: None for the default corpus (None or "stdlib"), else the real path
    with ~ expanded."""
    import os

    return None if p in (None, "stdlib") else os.path.realpath(os.path.expanduser(p))


def _resumed_settings(mc, tc, args):
    """--resume: the run's own settings (its checkpoint's train_config) for every run setting the command
    line does not give again, and its model config unless --preset / --config asked for one (mc None);
    prints what the command line changes."""
    import os

    from dsv3.checkpoints.files import read_json
    from dsv3.checkpoints.rundir import latest_checkpoint
    from dsv3.training.config import resumed_config

    ckpt = latest_checkpoint(os.path.join(tc.out_dir, "checkpoints"))
    if ckpt is None:  # train() says it starts from scratch
        return mc if mc is not None else _model_config(args)[0], tc
    saved = read_json(os.path.join(ckpt, "trainer_state.json")).get("train_config")
    if isinstance(saved, dict):
        given = given_dests(args)
        if "tokenizer" in given and tc.tokenizer != saved.get("tokenizer"):
            # (it was printed as applied and ignored: the run reads its checkpoint's tokenizer.json)
            raise ValueError(f"--tokenizer: a resumed run keeps the tokenizer of its checkpoint {ckpt} (its ids are "
                             "the ones the weights learned); drop --tokenizer")

        def same(k):  # the same setting, however written (a path's spelling; micro-batch 0 = the batch)
            a, b = getattr(tc, k), saved[k]
            if k == "data":
                return _corpus_path(a) == _corpus_path(b)
            if k == "extra_data":
                return [_corpus_path(p) for p in a] == [_corpus_path(p) for p in b or []]
            if k == "micro_batch_size":
                return (a or tc.batch_size) == (b or saved.get("batch_size"))
            return a == b

        for k in DATA_FIELDS:  # named here: the sampler's own refusal ("n_tokens=15675, this one 15678") named none
            if k in given and k in saved and not same(k):
                flag = "--" + k.replace("_", "-")
                raise ValueError(f"{flag} {getattr(tc, k)!r}: the run being resumed has {saved[k]!r}; a resume keeps "
                                 "its data, their split, order and windows (the position it saved is in them): drop "
                                 f"{flag}, or start a new run from its checkpoint with --init-from")
        tc, changed = resumed_config(tc, saved, given, os.path.join(ckpt, "trainer_state.json"))
        for k, (old, new) in changed.items():
            print(f"resume: {k} {old!r} -> {new!r} (from the command line)")
    return mc, tc


def given_dests(args) -> set[str]:
    """The dests of the options given on the command line of this verb (parsed again with no defaults)."""
    p = build_parser(args.command)
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    for a in sub._actions:
        a.default = argparse.SUPPRESS
    sub._defaults = {}
    return set(vars(p.parse_args(args.argv))) - {"command"}


def _print_samples(path: str, n: int, seed: int, max_new_tokens: int = 120) -> None:
    from dsv3.inference.engine import SamplingParams, load_engine

    engine, tok = load_engine(path, device="cpu", max_batch_size=n)
    prompts = ["def ", "import os\n\n", "class ", "# ", "    return "][:n]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed + i)
              for i in range(len(prompts))]
    print(f"\nsamples from {path} (temperature 0.8, top-k 50):")
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        print(f"--- prompt {prompt!r}\n{prompt}{out.text}")


def cmd_convert(args) -> int:
    import torch

    from dsv3.checkpoints.dcp import to_hf
    from dsv3.checkpoints.hf import ExportConfig

    ec = from_args(ExportConfig, args)
    print(to_hf(args.checkpoint, args.out, getattr(torch, ec.dtype) if ec.dtype else None))
    return 0


def cmd_quantize(args) -> int:
    """Checkpoint -> official-layout FP8 checkpoint (dsv3.checkpoints.hf.quantize_checkpoint)."""
    from dsv3.checkpoints.hf import QuantizeConfig, quantize_checkpoint

    r = quantize_checkpoint(_resolve_checkpoint(args.checkpoint), args.out, from_args(QuantizeConfig, args))
    print(f"{r['src']} -> {r['out']}: {r['n_fp8_modules']} FP8 modules (e4m3, 128x128 block scales), other "
          f"tensors {r['dtype']}; weights {r['src_weight_bytes'] / 2**20:.1f} MiB -> "
          f"{r['out_weight_bytes'] / 2**20:.1f} MiB" + (f"; copied {', '.join(r['copied'])}" if r["copied"] else ""))
    return 0


def cmd_eval(args) -> int:
    """--task loss (default): loss and bits per byte beside gzip and xz (dsv3.training.evaluate);
    --task needle: the pass-key grid over context length and depth (dsv3.eval.needle); --task humaneval
    and --lm-eval TASKS: the benchmarks (dsv3.eval.humaneval, dsv3.eval.lm_eval_adapter)."""
    from dsv3.checkpoints.files import check_creatable

    for flag, path in (("--out-json", args.out_json), ("--out-png", args.out_png)):
        if path:  # (before the evaluation: a file in the way was an OS error after it had run)
            check_creatable(path, flag, directory=False)
    if args.lm_eval or args.task == "humaneval":
        return _eval_harness(args)
    if args.task == "needle":
        return _eval_needle(args)
    from dsv3.eval.report import write_json
    from dsv3.training.evaluate import EvalConfig, evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, from_args(EvalConfig, args))
    part = "all of" if r["split"] == "all" else f"the {r['split']} split (--val-permille {r['val_permille']}) of"
    print(f"{r['checkpoint']}: loss {r['val_loss']:.4f} nats/token, {r['val_bpb']:.4f} bits/byte "
          f"over {r['val_tokens']:,} tokens of {part} {r['source']}")
    if "compressors" in r:
        print(f"\n| on the same {r['val_bytes']:,} bytes | bits/byte |\n|---|---|")
        for name, bpb in r["compressors"].items():
            print(f"| {name} | {bpb:.4f} |")
        print(f"| dsv3 checkpoint | {r['val_bpb']:.4f} |")
    if "expert_loads" in r:
        el = r["expert_loads"]
        mv = el["max_violation"]
        print(f"wrote the expert loads ({el['blocks']} MoE blocks x {el['experts']} experts) to {el['file']}; "
              f"imbalance over experts (max / mean - 1) mean {sum(mv) / len(mv):.3f}, max {max(mv):.3f}")
    if args.out_json:
        print(f"wrote {write_json({'task': 'loss', **r}, args.out_json)}")
    return 0


def _eval_needle(args) -> int:
    import os
    import time

    from dsv3.eval.needle import NeedleConfig, format_table, needle_checkpoint, plot_heatmap
    from dsv3.eval.report import write_json

    t0 = time.perf_counter()

    def progress(done: int, total: int, length: int) -> None:
        print(f"needle: {done}/{total} prompts (length {length}), {time.perf_counter() - t0:.0f}s",
              file=sys.stderr, flush=True)

    r = needle_checkpoint(args.checkpoint, from_args(NeedleConfig, args), device=args.device, progress=progress)
    print(f"{r['checkpoint']}: pass key accuracy {r['overall']:.3f} over {len(r['results'])} prompts "
          f"(context {r['context']}; {r['trials']} keys per cell; rows: prompt length, columns: key depth)")
    print(format_table(r))
    out_json = args.out_json or "needle.json"
    out_png = args.out_png or os.path.splitext(out_json)[0] + ".png"
    print(f"wrote {write_json(r, out_json)} and {plot_heatmap(r, out_png)}")
    return 0


def _eval_harness(args) -> int:
    """`--lm-eval TASKS` (lm-evaluation-harness) or `--task humaneval` (pass@k in the sandbox)."""
    import json

    if args.lm_eval:
        from lm_eval.utils import make_table

        from dsv3.eval.lm_eval_adapter import run_lm_eval

        r = run_lm_eval(_resolve_checkpoint(args.checkpoint), args.lm_eval, include_path=args.include_path,
                        limit=args.limit or None, batch_size=args.batch_size, device=args.device,
                        dtype=args.dtype)
        print(make_table(r))
        if args.out_json:
            with open(args.out_json, "w", encoding="utf-8") as f:
                json.dump({k: r[k] for k in ("results", "versions", "n-shot", "config") if k in r}, f, indent=1,
                          default=str)
        return 0
    from dsv3.eval.humaneval import HumanEvalConfig, format_table, run_humaneval

    hc = from_args(HumanEvalConfig, args, only=HUMANEVAL_FIELDS, device=args.device, output=args.out_json)
    r = run_humaneval(_resolve_checkpoint(args.checkpoint), hc)
    print(format_table(r))
    print(json.dumps({k: v for k, v in r.items() if k != "problems"}))
    return 0


def _engine_config(args):
    from dsv3.inference.engine import EngineConfig

    only = GENERATE_ENGINE_FIELDS + (EP_FIELDS if hasattr(args, "ep") else ())
    return from_args(EngineConfig, args, only=only, max_batch_size=1)


def _one_process(ec) -> dict:
    """EngineConfig -> load_engine's keyword arguments (ep is how many processes and the expert placement is
    the EP ranks', not engine settings)."""
    if getattr(ec, "ep", 1) == 1 and (getattr(ec, "expert_loads", None) or getattr(ec, "redundant_experts", 0)
                                      or getattr(ec, "eplb_interval", 0)):
        raise ValueError("--expert-loads / --redundant-experts / --eplb-interval place the experts over "
                         "expert-parallel ranks: they need --ep N under torchrun")
    if getattr(ec, "ep", 1) == 1 and getattr(ec, "attn_tp", 1) != 1:
        raise ValueError("--attn-tp splits attention over the expert-parallel ranks: it needs --ep N under torchrun")
    if getattr(ec, "ep", 1) == 1 and getattr(ec, "dp_attention", False):
        raise ValueError("--dp-attention gives each expert-parallel rank its own requests: it needs --ep N under "
                         "torchrun")
    kw = {k: v for k, v in vars(ec).items() if k not in EP_FIELDS}
    if "record_expert_loads" in kw:  # the engine counts; the path is the command's
        kw["record_expert_loads"] = bool(kw["record_expert_loads"])
    return kw


def _placement(ec) -> dict:
    """run_ep's layout arguments: the expert placement and attention data parallelism."""
    return {"expert_loads": ec.expert_loads, "redundant_experts": ec.redundant_experts,
            "dp_attention": ec.dp_attention, "attn_tp": ec.attn_tp, "eplb_interval": ec.eplb_interval}


def _engine(args):
    from dsv3.inference.engine import load_engine

    return load_engine(args.checkpoint, **_one_process(_engine_config(args)))


def _utf8_text(text: str, what: str) -> str:
    """`text` (an argument or a line of stdin, which Python decodes with surrogateescape), or a ValueError naming the
    first byte that is not UTF-8: the tokenizer takes Unicode text only (it failed with a TypeError traceback)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        bad = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate \\u{c:04x}"
        raise ValueError(f"{what} is not UTF-8 text ({bad} at character {e.start})") from None
    return text


def _sampling(args):
    from dsv3.inference.engine import SamplingParams

    return from_args(SamplingParams, args, exclude=SAMPLING_EXCLUDE).validate()  # (before any output)


def cmd_generate(args) -> int:
    """Complete a prompt (or answer one chat message with --chat), streaming to stdout. With --ep N under
    torchrun, rank 0 prints; the other ranks hold their experts and follow."""
    ec = _engine_config(args)
    _sampling(args)  # bad sampling flags: refused before the model loads
    if ec.ep != 1:  # one rank of torchrun: rank 0 prints, the others follow (dsv3/ep_serve.py)
        from dsv3.ep_serve import run_ep

        return run_ep(ec.ep, args.checkpoint, _one_process(ec),
                      lambda engine, tok: _generate(args, engine, tok), **_placement(ec))
    return _generate(args, *_engine(args))


def _generate(args, engine, tok) -> int:
    import dataclasses

    params = _sampling(args)
    _utf8_text(args.prompt, "--prompt")
    if args.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        ids = tok.encode(args.prompt)
    room = engine.max_model_len - len(ids)
    if 0 < room < params.max_new_tokens and "max_new_tokens" not in given_dests(args):
        # the default length (256) on a short-context checkpoint: what fits, not an error (one asked for is checked)
        params = dataclasses.replace(params, max_new_tokens=room)
    if len(ids) + params.max_new_tokens > engine.max_model_len:  # before the prompt is echoed
        raise ValueError(f"the prompt ({len(ids)} tokens) + --max-new-tokens {params.max_new_tokens} exceeds the "
                         f"model's context of {engine.max_model_len} tokens")
    outputs = engine.stream(ids, params)  # admitted now: its errors (a stop token id not in the vocabulary) come
    if not args.chat:                     # before the prompt is echoed
        print(args.prompt, end="", flush=True)
    final = None
    for out in outputs:
        print(out.new_text, end="", flush=True)
        final = out
    print()
    if args.verbose and final is not None:
        s = engine.stats
        spec = (f"; MTP drafts accepted {s.acceptance_rate:.2f}, {s.mean_accepted_length:.2f} tokens per step"
                if args.speculative_k else "")
        print(f"[{len(final.token_ids)} tokens, finish reason {final.finish_reason}{spec}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Interactive multi-turn chat with the DeepSeek-V3 chat template, streaming each reply."""
    engine, tok = _engine(args)
    params = _sampling(args)
    system = [{"role": "system", "content": _utf8_text(args.system, "--system")}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("dsv3 chat: type a message; /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            messages = list(system)
            continue
        if not cmd:
            continue
        try:
            _utf8_text(line, "the message")
        except ValueError as e:  # (the conversation goes on without it)
            print(f"dsv3 chat: error: {e}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(messages))
        print("assistant> " if interactive else "", end="", flush=True)
        reply, rid = "", None
        try:
            for out in engine.stream(ids, params):
                rid = out.request_id
                print(out.new_text, end="", flush=True)
                reply = out.text
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            if rid is not None:
                engine.abort(rid)
                while engine.has_unfinished():
                    engine.step()
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> int:
    """OpenAI-compatible HTTP server (dsv3/inference/server.py) over a checkpoint or run directory."""
    import dataclasses

    from dsv3.checkpoints.rundir import run_name
    from dsv3.inference.engine import EngineConfig
    from dsv3.inference.server import ServerConfig, check_limits, listen, load_for_serving, origins, serve

    path = _resolve_checkpoint(args.checkpoint)
    ec, sc = from_args(EngineConfig, args), from_args(ServerConfig, args)
    if not 0 <= sc.port <= 65535:  # (before the model loads: uvicorn would fail only after it, with a traceback)
        raise ValueError(f"--port must be in 0..65535, got {sc.port}")
    if ec.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {ec.max_batch_size}")
    if ec.max_prefill_tokens < 0:
        raise ValueError(f"--max-prefill-tokens must be >= 0 (0: whole prompts at once), got {ec.max_prefill_tokens}")
    check_limits(dataclasses.asdict(sc), flags=True)  # before the model loads
    origins(sc.allowed_origins)  # (its errors too)
    name = sc.model_name or run_name(path)  # runs/tiny is served as "tiny", not as its latest step_* directory
    if ec.record_expert_loads:  # a path that cannot be written fails now, not when the server stops
        from dsv3.checkpoints.loads import check_writable

        check_writable(ec.record_expert_loads)
    engine_kwargs = _one_process(ec)  # (its flag checks, before the socket binds)
    # the socket, bound before the model loads (a port in use was uvicorn's error after the load); under expert
    # parallelism rank 0 binds it in run, after run_ep's layout checks and its load
    sock = listen(sc.host, sc.port) if ec.ep == 1 else None

    def run(engine, tok) -> int:
        nonlocal sock
        sock = sock or listen(sc.host, sc.port)
        if sc.host not in ("127.0.0.1", "localhost", "::1") and not sc.api_key:
            print(f"dsv3 serve: warning: listening on {sc.host} without --api-key", file=sys.stderr)
        ep = f", expert parallel over {ec.ep} ranks" if ec.ep != 1 else ""
        ep += ", each with its own requests (attention data parallel)" if ec.dp_attention else ""
        ep += f", attention tensor parallel over {ec.attn_tp}" if ec.attn_tp != 1 else ""
        per = " per data-parallel group" if ec.dp_attention else ""  # (else every rank runs the one batch)
        port = sock.getsockname()[1]  # (--port 0: the one the system chose)
        print(f"serving {path} as {name!r} on http://{sc.host}:{port}/v1 (batch {ec.max_batch_size}{per}, "
              f"{engine.cache.num_blocks * engine.cache.block_size} cache tokens{per}, context {engine.max_model_len}, "
              f"speculative k={ec.speculative_k}{ep})", flush=True)
        try:
            serve(engine, tok, name, host=sc.host, port=sc.port, api_key=sc.api_key,
                  max_prompt_tokens=sc.max_prompt_tokens, max_tokens_limit=sc.max_tokens_limit,
                  max_queue=sc.max_queue, max_request_bytes=sc.max_request_bytes, prep_workers=sc.prep_workers,
                  log_level=sc.log_level, sock=sock, allowed_origins=origins(sc.allowed_origins))
        finally:  # (also after a failure: what was recorded so far)
            if ec.record_expert_loads:
                _write_expert_loads(engine.expert_loads(), ec.record_expert_loads, path, engine.model.config)
        return 0

    try:
        if ec.ep != 1:  # one rank of torchrun: rank 0 serves, the others follow (dsv3/ep_serve.py)
            from dsv3.ep_serve import run_ep

            return run_ep(ec.ep, path, engine_kwargs, run, **_placement(ec))
        return run(*load_for_serving(path, **engine_kwargs))
    finally:
        if sock is not None:
            sock.close()


def _write_expert_loads(counts, file: str, checkpoint: str, cfg) -> None:
    from dsv3.checkpoints.loads import save_counts

    tokens = int(counts[0].sum()) // cfg.num_experts_per_tok  # positions through the first MoE block
    if tokens == 0:  # (a server that failed to start, or served nothing: an earlier recording stays)
        print(f"no tokens were routed: {file} not written", file=sys.stderr, flush=True)
        return
    save_counts(counts, file, checkpoint=checkpoint, tokens=tokens)
    print(f"wrote the expert loads ({counts.shape[0]} MoE blocks x {counts.shape[1]} experts, {tokens:,} "
          f"positions) to {file}", file=sys.stderr, flush=True)


def cmd_sft(args) -> int:
    """Supervised fine-tuning on chats (dsv3/posttrain/sft.py); one process or every rank of a torchrun world."""
    import os
    import time

    import torch.distributed as dist

    from dsv3.distributed.mesh import ParallelConfig
    from dsv3.posttrain.sft import SFTConfig, train_sft

    cfg = from_args(SFTConfig, args)
    pcfg = from_args(ParallelConfig, args, only=POSTTRAIN_LAYOUT)  # dp_shard / ep 0: from the world size
    t0 = time.perf_counter()
    try:
        summary = train_sft(args.checkpoint, args.data, args.out, cfg, pcfg=pcfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("interrupted"):
        return interrupted(summary, "the same command with --resume")
    if int(os.environ.get("RANK", "0")) == 0:
        _print_run_summary("sft", args.out, summary, time.perf_counter() - t0)
    return 0


def cmd_grpo(args) -> int:
    """GRPO on a task with a checkable answer (dsv3/posttrain/grpo.py); one process or every rank of a torchrun world."""
    import os
    import time

    import torch.distributed as dist

    from dsv3.distributed.mesh import ParallelConfig
    from dsv3.posttrain.grpo import GRPOConfig, train_grpo
    from dsv3.posttrain.tasks import load_callable, load_task

    cfg = from_args(GRPOConfig, args)
    task = load_task(args.task, seed=cfg.seed, reward=load_callable(args.reward) if args.reward else None)
    pcfg = from_args(ParallelConfig, args, only=POSTTRAIN_LAYOUT)  # dp_shard / ep 0: from the world size
    t0 = time.perf_counter()
    try:
        summary = train_grpo(args.checkpoint, task, args.out, cfg, pcfg=pcfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("interrupted"):
        return interrupted(summary, "the same command with --resume")
    if int(os.environ.get("RANK", "0")) == 0:
        _print_run_summary("grpo", args.out, summary, time.perf_counter() - t0)
    return 0


def _print_run_summary(verb: str, out_dir: str, summary: dict, seconds: float) -> None:
    """The end of `dsv3 sft` / `dsv3 grpo`: the key figures as a short table. Every figure of the summary is
    in OUT/summary.json (written by the training loop), which the last row names."""
    import os

    s = summary
    rows = []
    if "step" in s:
        rows.append(("optimizer steps", f"{s['step']} of {s['total_steps']}"
                     + (f" ({s['iterations']} iteration{'s' * (s['iterations'] != 1)})" if "iterations" in s else "")))
    if s.get("train_loss") is not None:
        rows.append(("final loss", f"{s['train_loss']:.4f}"))
    if "reward_mean" in s:  # GRPO: the last iteration's samples
        rows.append(("final reward", f"{s['reward_mean']:.3f} (sample accuracy {s['accuracy']:.3f})"))
    if "heldout_acc" in s:
        rows.append(("held-out accuracy", f"{s['heldout_acc']:.3f} over {s['heldout_n']} problems (greedy)"))
    if s.get("skipped_steps"):
        rows.append(("skipped steps", f"{s['skipped_steps']} (non-finite loss or gradient norm)"))
    rows.append(("time", f"{seconds:.1f} s"))
    if "checkpoint" in s:
        rows.append(("checkpoint", s["checkpoint"] + (" (interrupted: --resume continues the run)"
                                                      if s.get("interrupted") else "")))
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        rows.append(("all figures", os.path.join(out_dir, "summary.json")))
    w = max(len(k) for k, _ in rows)
    print(f"{verb} finished:\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows))


# ------------------------------------------------------------------------------------------------
# the parser: one function per verb adds its flags (imports only that verb's modules)

def _add_model_source(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="tiny | small | 16b | 671b (default: tiny)")
    src.add_argument("--config", help="path to a config.json (or a checkpoint directory)")


def _add_checkpoint(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory or run directory")


def _info_flags(p) -> None:
    _add_model_source(p)


def _plan_flags(p) -> None:
    from dsv3.plan import PlanConfig
    from dsv3.plan_serve import ServePlanConfig

    _add_model_source(p)
    add_fields(p, PlanConfig, rename=PLAN_RENAMES)
    p.add_argument("--suggest", action="store_true", help="list the power-of-two (pp, ep) layouts and which fit")
    p.add_argument("--sort", default="memory", choices=["memory", "comm"],
                   help="order of --suggest: memory per GPU or communication per step (default: memory)")
    s = p.add_argument_group("serving (--serve; ServePlanConfig; uses --gpus and --gpu-mem, EP = gpus)")
    s.add_argument("--serve", action="store_true", help="plan a serving layout: weights per GPU, KV-cache "
                                                        "capacity, largest batch at --context")
    s.add_argument("--json", action="store_true", help="--serve: print the plan as JSON")
    add_fields(s, ServePlanConfig)


def _train_flags(p) -> None:
    from dsv3.distributed.mesh import ParallelConfig
    from dsv3.training.config import TrainConfig

    _add_model_source(p)
    p.set_defaults(preset=None)  # tiny unless --config or --init-from (cmd_train)
    add_fields(p, TrainConfig, rename=TRAIN_RENAMES)
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="default corpus: skip the closing table of bits per byte on held-out Python (the stdlib's "
                        "val split and a sample of pip's source) beside gzip and xz")
    p.add_argument("--samples", type=int, default=3, help="completions to print at the end (0: none) (default: 3)")
    add_fields(p.add_argument_group("parallel layout (ParallelConfig; torchrun)"), ParallelConfig)


# the HumanEvalConfig fields that `dsv3 eval` offers (device is EvalConfig's)
HUMANEVAL_FIELDS = ("samples", "limit", "temperature", "dtype")  # (its output: --out-json, as every task's)


def _eval_flags(p) -> None:
    from dsv3.eval.needle import NeedleConfig
    from dsv3.training.evaluate import EvalConfig

    _add_checkpoint(p)
    p.add_argument("--task", default="loss", choices=["loss", "needle", "humaneval"],
                   help="loss: loss and bits per byte beside gzip/xz; needle: pass-key retrieval grid; humaneval: "
                        "pass@k of sandboxed completions (default: loss)")
    p.add_argument("--out-json", default=None, help="write the results as JSON (needle default: needle.json)")
    p.add_argument("--out-png", default=None, help="needle heatmap (default: the JSON path with .png)")
    add_fields(p, EvalConfig)
    add_fields(p.add_argument_group("--task needle (NeedleConfig)"), NeedleConfig)
    from dsv3.eval.humaneval import HumanEvalConfig

    h = p.add_argument_group("benchmarks (dsv3/eval: lm-evaluation-harness, --task humaneval)")
    h.add_argument("--lm-eval", metavar="TASKS", default=None, help="comma-separated lm-evaluation-harness tasks")
    h.add_argument("--include-path", metavar="DIR", default=None, help="directory of extra lm-eval task YAMLs")
    add_fields(h, HumanEvalConfig, only=HUMANEVAL_FIELDS)


def _sampling_flags(p, ep: bool = False) -> None:
    from dsv3.inference.engine import EngineConfig, SamplingParams

    add_fields(p, SamplingParams, exclude=SAMPLING_EXCLUDE)
    add_fields(p, EngineConfig, only=GENERATE_ENGINE_FIELDS + (EP_FIELDS if ep else ()))


def _generate_flags(p) -> None:
    _add_checkpoint(p)
    p.add_argument("--prompt", required=True, help="the text to complete (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="treat the prompt as one user message")
    p.add_argument("--verbose", "-v", action="store_true", help="print token count and MTP acceptance to stderr")
    _sampling_flags(p, ep=True)


def _sample_flags(p) -> None:
    _generate_flags(p)
    p.set_defaults(seed=0)  # `sample` is `generate` seeded by default: the same text on every run


def _chat_flags(p) -> None:
    _add_checkpoint(p)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_flags(p)


def _sft_flags(p) -> None:
    from dsv3.posttrain.sft import SFTConfig

    _add_checkpoint(p)
    p.add_argument("--data", required=True, help='JSONL, one {"messages": [...]} conversation per line')
    p.add_argument("--out", required=True, help="run directory")
    add_fields(p, SFTConfig)
    _posttrain_layout_flags(p)


def _grpo_flags(p) -> None:
    from dsv3.posttrain.grpo import GRPOConfig

    _add_checkpoint(p)
    p.add_argument("--task", default="arithmetic",
                   help='"arithmetic" or a JSONL of {"messages", "answer"} rows (default: arithmetic)')
    p.add_argument("--reward", default=None, help='"module:function" scoring (completion, example) -> float')
    p.add_argument("--out", required=True, help="run directory")
    add_fields(p, GRPOConfig, rename=GRPO_RENAMES)
    _posttrain_layout_flags(p)


# the layout flags of sft / grpo (no pipeline: their batches do not travel through pipeline stages)
POSTTRAIN_LAYOUT = ("dp_shard", "ep", "fsdp")


def _posttrain_layout_flags(p) -> None:
    from dsv3.distributed.mesh import ParallelConfig

    add_fields(p.add_argument_group("parallel layout (under torchrun)"), ParallelConfig, only=POSTTRAIN_LAYOUT)


def _convert_flags(p) -> None:
    from dsv3.checkpoints.hf import ExportConfig

    p.add_argument("checkpoint", help="DCP checkpoint directory or run directory (its latest checkpoint)")
    p.add_argument("out", help="new output directory")
    add_fields(p, ExportConfig)


def _quantize_flags(p) -> None:
    from dsv3.checkpoints.hf import QuantizeConfig

    _add_checkpoint(p)
    p.add_argument("out", help="new output directory (must not exist, or be empty)")
    add_fields(p, QuantizeConfig)


def _serve_flags(p) -> None:
    from dsv3.inference.engine import EngineConfig
    from dsv3.inference.server import ServerConfig

    _add_checkpoint(p)
    add_fields(p, ServerConfig, rename=SERVE_RENAMES)
    add_fields(p.add_argument_group("engine (EngineConfig)"), EngineConfig)


# verb -> (its line in `dsv3 --help`, the function adding its flags, the function running it)
VERBS = {
    "info": ("parameter counts and KV-cache size of a preset or config.json", _info_flags, cmd_info),
    "plan": ("memory per GPU and communication per step of a parallel training layout; --serve: weights, "
             "KV-cache capacity and largest batch of a serving layout", _plan_flags, cmd_plan),
    "train": ("pre-train a model (default: tiny preset on the Python stdlib, CPU)", _train_flags, cmd_train),
    "eval": ("bits per byte of a checkpoint beside gzip/xz, or pass-key retrieval (--task needle)", _eval_flags,
             cmd_eval),
    "generate": ("complete a prompt (streams; --chat wraps it in the chat template)", _generate_flags, cmd_generate),
    "sample": ("complete a prompt as generate does, with --seed 0 unless given: the same text on every run",
               _sample_flags, cmd_generate),
    "chat": ("interactive multi-turn chat (streams replies)", _chat_flags, cmd_chat),
    "sft": ("supervised fine-tuning on chats (messages JSONL; loss on assistant tokens)", _sft_flags, cmd_sft),
    "grpo": ("GRPO reinforcement learning on a task with a checkable answer", _grpo_flags, cmd_grpo),
    "convert": ("sharded (torchrun) checkpoint -> Hugging Face-format directory", _convert_flags, cmd_convert),
    "quantize": ("write an official-layout FP8 copy of a checkpoint", _quantize_flags, cmd_quantize),
    "serve": ("OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)", _serve_flags, cmd_serve),
}


def version() -> str:
    """The installed package's version (its metadata), else the source tree's dsv3.__version__."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dsv3")
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        import dsv3

        return dsv3.__version__


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `dsv3` parser; with `verb`, only that verb's flags are added (the others keep their names), with
    "" none (`dsv3 --help` and `--version` list no flags: no verb's modules are imported)."""
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3: model, training, inference.")
    p.add_argument("--version", action="version", version=f"dsv3 {version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_flags, run) in VERBS.items():
        sp = sub.add_parser(name, help=help_, description=help_)  # the line also heads `dsv3 VERB --help`
        if verb is None or verb == name:
            add_flags(sp)
        sp.set_defaults(func=run)
    return p


def one_line(e: BaseException) -> str:
    """The message of an expected failure on one line (multi-line listings joined with "; ")."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    out = ""
    for line in (ln.strip() for ln in msg.splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out or type(e).__name__


class PipeSafe:
    """sys.stdout / sys.stderr that survive their reader going away (`dsv3 train | tee log`: Ctrl-C kills
    tee too, and the next progress-bar update would raise BrokenPipeError in the middle of the run, before
    the checkpoint is saved). From the first broken write on, the stream's file descriptor points at
    /dev/null (so the final flush at exit is quiet too) and output is dropped; the run goes on."""

    def __init__(self, stream):
        self._stream = stream

    def _closed(self) -> None:
        import os

        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def computes_on_the_cpu(args: argparse.Namespace) -> bool:
    """Whether a verb's model runs on the CPU (a --device of cpu, or auto without CUDA): where malloc is set to keep
    freed host memory. Not the verbs without a device (conversions, which stream tensors through host memory
    once), nor GPU runs (whose large host blocks, a checkpoint being loaded, should go back when freed)."""
    from dsv3.config import resolve_device

    dev = getattr(args, "device", None)
    if not isinstance(dev, str):
        return False
    try:
        return resolve_device(dev).type == "cpu"
    except ValueError:  # a bad name, or cuda without CUDA: the verb itself says so
        return False


def main(argv: list[str] | None = None) -> int:
    """Run one verb. An expected failure (a bad file, config, flag value or path: ConfigError,
    CheckpointError, OSError, ValueError, KeyError, a chat-template error; a run stopped by a full disk or
    by non-finite losses: DiskFullError, NonFiniteError) prints one line
    `dsv3 VERB: error: ...` on stderr and returns 2; DSV3_TRACEBACK=1 re-raises it with its traceback.
    Any other exception is a bug and keeps its traceback."""
    import os

    from jinja2 import TemplateError

    from dsv3.checkpoints.files import CheckpointError
    from dsv3.checkpoints.space import DiskFullError
    from dsv3.config import ConfigError
    from dsv3.training.loop import NonFiniteError

    argv = sys.argv[1:] if argv is None else list(argv)
    # OpenMP threads that wait for work sleep instead of spinning: on a busy machine (another CPU-bound
    # process on the same cores) spinning threads steal the cores the working ones need, and a training step
    # ran 2.4x slower where sharing should cost 2x (bench/RESULTS.md, the main job). Read when the OpenMP
    # runtime starts, i.e. when torch is first imported, which no verb does before this line. A value the
    # user set wins.
    if "torch" not in sys.modules:  # (too late otherwise: then leave the environment as it is)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in ("stdout", "stderr"):  # a real stream (not a test's StringIO) may turn into a closed pipe
        stream = getattr(sys, name)
        if not isinstance(stream, PipeSafe) and hasattr(stream, "fileno") and not isinstance(stream, io.StringIO):
            setattr(sys, name, PipeSafe(stream))
    verb = next((a for a in argv if not a.startswith("-")), None)  # the top-level parser has no option with a value
    parser = build_parser(verb if verb in VERBS else "")
    args = parser.parse_args(argv)
    args.argv = argv  # what was given, not defaulted (given_dests)
    if computes_on_the_cpu(args):
        # freed host memory kept for the next allocations (no mmap, page faults and munmap for each large CPU
        # tensor of each step: a CPU training step 1.26-1.37x faster, bench/cpu_malloc.py; DSV3_MALLOC=system
        # turns it off)
        from dsv3.memory import retain_freed_host_memory

        retain_freed_host_memory()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, OSError, ValueError, KeyError, TemplateError, DiskFullError,
            NonFiniteError) as e:  # the last two: a run that stopped cleanly (one line on each rank)
        if os.environ.get("DSV3_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"dsv3 {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and says so): tokenising, loading, ...
        if os.environ.get("DSV3_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"dsv3 {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
