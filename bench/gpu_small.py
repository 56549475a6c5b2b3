"""Train the `small` preset on one GPU for a fixed wall-clock budget, then measure validation bits
per byte on the held-out stdlib files beside gzip and xz (bench/bpb.py).

    PYTHONPATH=. python bench/gpu_small.py --minutes 8 --out runs/small

1. builds the tokenizer and token caches (stdlib; plus --extra-data for training only),
2. times a short probe run to measure tokens/s,
3. sizes the real run's step count so that its LR schedule completes within --minutes,
4. trains (bf16 autocast, fp32 master weights), prints samples, runs bench/bpb.py.

Steps 1-3 and the training are `train_for_minutes` (also used by bench/spec_gpu.py), their flags
`add_train_args`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3.config import preset  # noqa: E402
from dsv3.training.config import TrainConfig  # noqa: E402
from dsv3.training.pretrain import train  # noqa: E402


def add_train_args(ap: argparse.ArgumentParser, *, minutes: float = 8.0, out: str = "runs/small",
                   micro_batch_size: int = 0) -> None:
    """The flags of a time-budgeted training run (train_for_minutes)."""
    ap.add_argument("--minutes", type=float, default=minutes, help="wall-clock budget of the training run proper")
    ap.add_argument("--out", default=out, help="run directory (replaced)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default=None, help="training corpus (default: the Python standard library)")
    ap.add_argument("--extra-data", action="append", default=[])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=micro_batch_size)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cache-dir", default="/tmp/dsv3cache")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tok-s", type=float, default=0.0, help="training tokens/s of this preset and card, from an "
                                                            "earlier probe: skips the probe run (0: measure it)")


def train_for_minutes(args: argparse.Namespace, log=print) -> dict:
    """Tokenizer + token caches, a 25-step probe for tokens/s (or --tok-s), then a run of --preset whose step
    count fits --minutes into args.out (its final checkpoint under args.out/checkpoints). Returns the summary."""
    mc = preset(args.preset)
    common = dict(data=args.data, extra_data=args.extra_data, seq_len=args.seq_len, batch_size=args.batch_size,
                  micro_batch_size=args.micro_batch_size, lr=args.lr, device=args.device, cache_dir=args.cache_dir,
                  progress=False, save_every=0, eval_every=0, log_every=5)
    if args.tok_s > 0:
        tok_s = args.tok_s
        log(f"throughput {tok_s:,.0f} tokens/s as given (--tok-s): no probe run")
    else:
        probe_dir = args.out + "-probe"
        shutil.rmtree(probe_dir, ignore_errors=True)
        t0 = time.time()
        s = train(mc, TrainConfig(out_dir=probe_dir, steps=25, **common), log=log)
        recs = [json.loads(line) for line in open(os.path.join(probe_dir, "metrics.jsonl"))]
        rates = [r["tok_per_s"] for r in recs if "tok_per_s" in r and r["step"] > 10]
        tok_s = sorted(rates)[len(rates) // 2]
        log(f"probe: {tok_s:,.0f} tokens/s (median of logged intervals after warm-up); "
            f"data prep + probe took {time.time() - t0:.0f}s; probe loss {s['train_loss']:.3f}")
        shutil.rmtree(probe_dir, ignore_errors=True)

    steps = max(int(args.minutes * 60 * tok_s / (args.batch_size * args.seq_len)), 1)
    log(f"training {steps} steps of {args.batch_size} x {args.seq_len} tokens "
        f"(~{steps * args.batch_size * args.seq_len / 1e6:.0f}M tokens) in ~{args.minutes} min")
    shutil.rmtree(args.out, ignore_errors=True)
    common.update(eval_every=max(steps // 6, 1), log_every=10)
    t1 = time.time()
    summary = train(mc, TrainConfig(out_dir=args.out, steps=steps, **common), log=log)
    log(f"trained in {time.time() - t1:.0f}s: {json.dumps(summary)}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    add_train_args(ap)
    args = ap.parse_args()
    train_for_minutes(args, log=lambda *a: print(*a, flush=True))
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "bpb.py"), args.out,
                    "--seq-len", str(args.seq_len), "--device", args.device], check=False,
                   env={**os.environ, "DSV3_CACHE": args.cache_dir})


if __name__ == "__main__":
    main()
