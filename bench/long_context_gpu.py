"""Context extension on one GPU, as the DeepSeek-V3 paper's §4.3 and Figure 8 (YaRN, two stages, pass-key
retrieval over length and depth), at a small scale:

    PYTHONPATH=. python bench/long_context_gpu.py --minutes 8 --seq-len 512 --out runs/longctx

1. pre-trains --preset at a short context (--seq-len, default 512) for --minutes (bench/gpu_small.py's
   `train_for_minutes`) into OUT/base;
2. runs the pass-key grid (dsv3/eval/needle.py) on it, up to the preset's max_position_embeddings:
   retrieval beyond the trained length is expected to fail;
3. for each factor of --rope-factors (default 4,16), a stage `dsv3 train --init-from PREVIOUS --seq-len
   BASE_SEQ x FACTOR` for --ext-steps steps at the same tokens per step, constant LR --ext-lr, then the
   grid again up to its context. YaRN (`--rope-factor`): with --yarn-schedule paper (default) as §4.3,
   the first stage sets the last factor (16: max_position_embeddings = 16 x BASE_SEQ) and the second
   keeps it, only raising the sequence length; with per-stage each stage sets its own factor (4, 16);
4. measures prefill and decode speed at the longest context through the engine (batch 1 and
   --decode-batch), and reports the latent KV cache's bytes per token beside an expanded (per-head K/V)
   cache's (dsv3.info.model_info, what `dsv3 info` prints).

Pass-key training documents (--passkey-docs, default 4000 for the base run; a stage of F x the base's
sequence length gets 1/F as many, as long on average F times, so the same tokens). The first H200 run trained on the
stdlib corpus alone and scored 0.00 in every cell, 128-token prompts inside the trained context included:
the model never emitted a digit, it continued the English prompt as docstring prose, so the grid said
nothing about YaRN. Each stage now trains on its corpus plus OUT/passkey/<stage>.jsonl (`dsv3 train
--extra-data`; validation stays on the corpus): --passkey-docs documents from
dsv3.eval.needle.passkey_documents, the grid's own intro, key sentence and question around another
filler, with keys of their own, of uniformly drawn lengths up to that stage's sequence length (base:
--seq-len; stage xF: F x --seq-len). They teach the format at lengths the stage trains on; the grid is
unchanged (the eval's filler, its held-out keys), so beyond the trained context it measures length
generalisation, and after each extension stage the stage's own lengths.

Writes OUT/long_context.json (everything), OUT/needle_<stage>.json/.png (the heatmaps) and prints
tables. Step 3 needs `dsv3 train --init-from/--rope-factor`: the script checks `dsv3 train --help`
first and stops with a message when they are missing (--no-extension skips step 3).

CPU smoke run (tiny preset, a small corpus, seconds of training):

    PYTHONPATH=. python bench/long_context_gpu.py --preset tiny --device cpu --data DIR --seq-len 128 \\
        --batch-size 4 --minutes 0.05 --tok-s 2000 --ext-steps 2 --rope-factors 4 --trials 1 \\
        --depths 0,50,100 --decode-tokens 4 --passkey-docs 200 --out /tmp/longctx

(A pass-key document with its key sentence and question takes some 50-70 tokens: at --seq-len 64, --passkey-docs 0.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_small import add_train_args, train_for_minutes  # noqa: E402

from dsv3.checkpoints.rundir import resolve_checkpoint  # noqa: E402
from dsv3.config import ModelConfig, preset  # noqa: E402
from dsv3.eval.needle import (NeedleConfig, format_table, needle_checkpoint, passkey_documents,  # noqa: E402
                              plot_heatmap)
from dsv3.eval.report import write_json  # noqa: E402
from dsv3.info import model_info  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402
from dsv3.training.config import TrainConfig  # noqa: E402
from dsv3.training.pretrain import get_tokenizer  # noqa: E402

EXTENSION_FLAGS = ("--init-from", "--rope-factor")
PASSKEY_DOCS = 4000  # the base run's; a stage of F x its sequence length: 1/F as many (module docstring)


def dsv3_cli() -> list[str]:
    return [sys.executable, "-m", "dsv3.cli"]


def check_extension_flags() -> None:
    """Exit with a clear message when `dsv3 train` lacks the context-extension flags."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)}
    helptext = subprocess.run(dsv3_cli() + ["train", "--help"], capture_output=True, text=True, env=env).stdout
    missing = [f for f in EXTENSION_FLAGS if f not in helptext]
    if missing:
        sys.exit(f"long_context_gpu.py: `dsv3 train` has no {' / '.join(missing)} flag (the YaRN context-extension "
                 "stage of issue 16): update dsv3, or pass --no-extension to run only the base model's grid")


def grid_lengths(context: int, new_tokens: int, smallest: int) -> str:
    """Powers of two from `smallest` below the context, and the longest prompt that fits."""
    longest = context - new_tokens
    lengths = [n for n in (smallest * 2**k for k in range(40)) if n < longest] + [longest]
    return ",".join(str(n) for n in lengths)


def run_grid(stage: str, checkpoint: str, args, log) -> dict:
    context = ModelConfig.from_json(resolve_checkpoint(checkpoint)).max_position_embeddings
    nc = NeedleConfig(lengths=grid_lengths(context, args.new_tokens, args.min_length), depths=args.depths,
                      trials=args.trials, new_tokens=args.new_tokens, key_digits=args.key_digits,
                      max_batch_size=args.needle_batch)
    t0 = time.time()
    r = needle_checkpoint(checkpoint, nc, device=args.device,
                          progress=lambda d, n, L: log(f"  needle {stage}: {d}/{n} prompts (length {L})"))
    r["stage"], r["seconds"] = stage, time.time() - t0
    write_json(r, os.path.join(args.out, f"needle_{stage}.json"))
    plot_heatmap(r, os.path.join(args.out, f"needle_{stage}.png"),
                 title=f"{stage}: pass key accuracy (context {context}), mean {r['overall']:.2f}")
    log(f"needle {stage} (context {context}, {r['seconds']:.0f}s):\n{format_table(r)}")
    return {k: v for k, v in r.items() if k != "results"}


def write_passkey_docs(stage: str, index: int, tok: DSTokenizer, max_tokens: int, args, log,
                       factor: int = 1) -> list[str]:
    """OUT/passkey/STAGE.jsonl: --passkey-docs / factor pass-key training documents of up to `max_tokens`
    tokens (the stage's sequence length, factor x the base's: the same tokens of documents per stage, whose
    training steps also see the same tokens), keys from the stream of seed `index` (a new set per stage).
    Returns the stage's --extra-data list: the user's --extra-data, then this file (no file with
    --passkey-docs 0)."""
    if args.passkey_docs <= 0:
        return list(args.extra_data)
    n_docs = max(args.passkey_docs // factor, 1)
    path = os.path.join(args.out, "passkey", f"{stage}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.time()
    try:
        docs = passkey_documents(n_docs, tok, 0, max_tokens, seed=index, key_digits=args.key_digits)
    except ValueError as e:  # a sequence too short for the template: before any training
        sys.exit(f"long_context_gpu.py: no pass-key documents for stage {stage}: {e}; raise --seq-len or pass "
                 "--passkey-docs 0")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    n_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(docs, parse_special=False))  # + the EOS of each
    log(f"{stage}: {len(docs)} pass-key documents of up to {max_tokens} tokens ({n_tokens:,} tokens with their EOS) "
        f"in {path} ({time.time() - t0:.0f}s)")
    return list(args.extra_data) + [path]


def release_gpu_memory(device: str, log) -> None:
    """Hand this process's cached CUDA blocks back to the driver. The base run trains in this process, and
    torch's caching allocator keeps what it reserved (82.5 GiB after `small` at 64 x 512 on an H200), so the
    `dsv3 train` child of an extension stage ran out of memory on the same card."""
    if not device.startswith("cuda"):
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    log(f"parent process before the stage: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
        f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved")


def extend(stage: str, init_from: str, factor: int, rope_factor: int | None, extra_data: list[str], args,
           log) -> str:
    """One `dsv3 train --init-from` stage at BASE_SEQ x factor (YaRN factor `rope_factor`, None: the
    checkpoint's) on the corpus and `extra_data`; returns its run directory."""
    out = os.path.join(args.out, stage)
    shutil.rmtree(out, ignore_errors=True)
    seq = args.seq_len * factor
    batch = max(args.batch_size * args.seq_len // seq, 1)  # the base run's tokens per step
    lr = args.ext_lr if args.ext_lr > 0 else 0.1 * args.lr
    cmd = dsv3_cli() + ["train", "--init-from", init_from, "--seq-len", str(seq), "--batch-size", str(batch),
                        "--steps", str(args.ext_steps), "--schedule", "constant", "--warmup-steps", "0",
                        "--lr", str(lr),
                        "--device", args.device, "--cache-dir", args.cache_dir, "--out", out, "--save-every", "0",
                        "--eval-every", "0", "--samples", "0", "--no-progress"]
    if rope_factor:
        cmd += ["--rope-factor", str(rope_factor)]
    if args.data:
        cmd += ["--data", args.data]
    for path in extra_data:
        cmd += ["--extra-data", path]
    if args.micro_batch_size:
        cmd += ["--micro-batch-size", str(min(args.micro_batch_size, batch))]
    release_gpu_memory(args.device, log)  # the stage trains in a child process: it needs the card's memory
    log("$ " + " ".join(cmd))
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)}
    subprocess.run(cmd, check=True, env=env)
    log(f"{stage}: {args.ext_steps} steps of {batch} x {seq} tokens in {time.time() - t0:.0f}s")
    return out


def speed(checkpoint: str, args, log) -> dict:
    """Prefill and decode tokens/s at the longest context, latent vs expanded KV bytes per token."""
    import torch

    from dsv3.inference.cache import PagedLatentCache
    from dsv3.inference.engine import SamplingParams, load_engine

    path = resolve_checkpoint(checkpoint)
    cfg = ModelConfig.from_json(path)
    L = cfg.max_position_embeddings - args.decode_tokens - 16
    info = model_info(cfg)
    res = {"checkpoint": path, "prompt_tokens": L, "decode_tokens": args.decode_tokens,
           "kv_latent_bytes_per_token": info.kv_latent_bytes, "kv_expanded_bytes_per_token": info.kv_expanded_bytes,
           "kv_latent_bytes_at_context": info.kv_latent_bytes * cfg.max_position_embeddings,
           "kv_expanded_bytes_at_context": info.kv_expanded_bytes * cfg.max_position_embeddings, "runs": []}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for B in sorted({1, args.decode_batch}):
        # bf16 on a GPU (the training checkpoint is fp32): the engine's CUDA-graph decode runs bf16 models
        dtype = torch.bfloat16 if args.device.startswith("cuda") else None
        engine, tok = load_engine(path, device=args.device, max_batch_size=B, dtype=dtype,
                                  cache_tokens=B * (L + args.decode_tokens + 32))
        res["engine_cache_bytes_per_token"] = PagedLatentCache.bytes_per_token(engine.model, engine.cache.kv.dtype)
        prompts = [[(7 * i + 13 * b) % (cfg.vocab_size - 1) + 1 for i in range(L)] for b in range(B)]

        def timed(engine, n):
            """(seconds until every request has its first token: the prefill, seconds of the n - 1 decode steps)."""
            params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
            for p in prompts:
                engine.add_request(p, params)
            sync()
            t0 = time.perf_counter()
            started, t_first = set(), None
            while engine.has_unfinished():
                started.update(o.request_id for o in engine.step())
                if t_first is None and len(started) == B:
                    sync()
                    t_first = time.perf_counter()
            sync()
            return t_first - t0, time.perf_counter() - t_first

        timed(engine, 4)  # warm-up: kernels, CUDA graphs of the decode buckets
        t_prefill, decode_s = timed(engine, args.decode_tokens + 1)
        run = {"batch": B, "prefill_s": t_prefill, "prefill_tok_s": B * L / t_prefill,
               "decode_tok_s": B * args.decode_tokens / decode_s,
               "decode_ms_per_step": 1e3 * decode_s / args.decode_tokens}
        res["runs"].append(run)
        log(f"speed at {L} tokens, batch {B}: prefill {run['prefill_tok_s']:,.0f} tok/s ({t_prefill:.2f}s), "
            f"decode {run['decode_tok_s']:,.1f} tok/s ({run['decode_ms_per_step']:.1f} ms/step)")
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    log(f"KV cache per token: latent {info.kv_latent_bytes:,} bytes vs expanded {info.kv_expanded_bytes:,} bytes "
        f"({info.kv_expanded_bytes / info.kv_latent_bytes:.1f}x); at {cfg.max_position_embeddings} tokens "
        f"{res['kv_latent_bytes_at_context'] / 2**20:,.1f} MiB vs {res['kv_expanded_bytes_at_context'] / 2**20:,.1f} "
        "MiB per sequence")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_train_args(ap, minutes=8.0, out="runs/longctx")
    ap.set_defaults(seq_len=512, batch_size=64)
    ap.add_argument("--rope-factors", default="4,16", help="extension stages: context x FACTOR each (YaRN)")
    ap.add_argument("--ext-steps", type=int, default=300, help="training steps per extension stage")
    ap.add_argument("--ext-lr", type=float, default=0.0, help="constant learning rate of the extension stages "
                                                             "(0: 0.1 x --lr)")
    ap.add_argument("--yarn-schedule", default="paper", choices=["paper", "per-stage"],
                    help="paper: the last factor from the first stage on (§4.3); per-stage: each stage its own")
    ap.add_argument("--no-extension", action="store_true", help="only the base model's grid and speed")
    ap.add_argument("--depths", default="0,10,20,30,40,50,60,70,80,90,100")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--min-length", type=int, default=128, help="smallest needle prompt length")
    ap.add_argument("--needle-batch", type=int, default=32, help="needle prompts decoded together")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded in the speed measurement")
    ap.add_argument("--decode-batch", type=int, default=8, help="second batch size of the speed measurement")
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/base (already trained)")
    ap.add_argument("--passkey-docs", type=int, default=PASSKEY_DOCS,
                    help="pass-key training documents added to the base run's data (up to its sequence length; "
                         "a stage of F x that length gets 1/F as many, up to its own; 0: none)")
    ap.add_argument("--key-digits", type=int, default=5, help="digits of the pass keys, trained and evaluated")
    args = ap.parse_args()
    factors = [int(f) for f in args.rope_factors.split(",") if f.strip()] if not args.no_extension else []
    if factors:
        check_extension_flags()  # before spending the training budget
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    def log(*a):
        print(f"[{time.time() - t_start:6.0f}s]", *a, flush=True)

    report = {"args": vars(args), "stages": []}
    base = os.path.join(args.out, "base")
    if not args.skip_train:
        # the tokenizer the base run will train (or find in --cache-dir), to measure the documents with
        tok = get_tokenizer(TrainConfig(data=args.data, cache_dir=args.cache_dir), preset(args.preset), log)
        extra = write_passkey_docs("base", 0, tok, args.seq_len, args, log)
        run_args = argparse.Namespace(**{**vars(args), "out": base, "extra_data": extra})
        report["train_summary"] = train_for_minutes(run_args, log=log)
    report["stages"].append({"stage": "base", "seq_len": args.seq_len, "needle": run_grid("base", base, args, log)})
    prev = base
    for i, f in enumerate(factors):
        name = f"x{f}"
        rope = f if args.yarn_schedule == "per-stage" else (max(factors) if i == 0 else None)
        tok = DSTokenizer.load(resolve_checkpoint(prev))
        extra = write_passkey_docs(name, i + 1, tok, args.seq_len * f, args, log, factor=f)
        prev = extend(name, prev, f, rope, extra, args, log)
        report["stages"].append({"stage": name, "seq_len": args.seq_len * f, "rope_factor": rope or max(factors),
                                 "needle": run_grid(name, prev, args, log)})
        write_json(report, os.path.join(args.out, "long_context.json"))
    report["speed"] = speed(prev, args, log)
    write_json(report, os.path.join(args.out, "long_context.json"))
    print("\n| stage | trained seq | context | mean pass-key accuracy by length |\n|---|---|---|---|")
    for s in report["stages"]:
        n = s["needle"]
        by_len = ", ".join(f"{L}: {a:.2f}" for L, a in zip(n["lengths"], n["accuracy_by_length"]))
        print(f"| {s['stage']} | {s['seq_len']} | {n['context']} | {by_len} |")
    log(f"wrote {os.path.join(args.out, 'long_context.json')} and the needle_*.png heatmaps")


if __name__ == "__main__":
    main()
