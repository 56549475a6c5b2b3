"""FP8 vs bf16 on real text, through `dsv3 train` itself: the same preset, data (the Python standard library
by default), tokenizer, seed and schedule, trained with --precision bf16 and with --precision fp8; then a
second bf16 run with another seed as the run-to-run noise the FP8 gap is judged against. Compares the final
validation loss (the loop's held-out split) and the training-loss curves.

    PYTHONPATH=. python bench/fp8_loss_text.py --preset small --steps 600 --batch-size 16 --seq-len 1024 --out /tmp/fp8text

Every run gets --compile (both precisions), the default schedule (warm-up, constant, the paper's decay
tail fractions of the run) and the default loss (main + MTP). Prints a table and writes summary.json.

Disk: a `small` checkpoint (fp32 weights + AdamW moments) is ~12 GB, so each run writes only its final
checkpoint (--save-every 0 --keep 1), and it is deleted once the run's metrics are read (the comparison
needs metrics.jsonl only; --keep-checkpoints keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def final_val(run_dir: str) -> dict:
    rec = None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("final"):
                rec = r
    if rec is None:
        raise SystemExit(f"{run_dir}: no final validation record in metrics.jsonl")
    return rec


def train_losses(run_dir: str) -> list[tuple[int, float]]:
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r and "step" in r:
                out.append((r["step"], r["loss"]))
    return out


def train_command(args, prec: str, seed: int, run_dir: str) -> list[str]:
    """The `dsv3 train` command of one run: only the final checkpoint is written (--save-every 0 --keep 1)."""
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--preset", args.preset, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--precision", prec,
           "--seed", str(seed), "--compile", "--samples", "0", "--no-progress", "--out", run_dir,
           "--cache-dir", os.path.join(args.out, "cache"), "--save-every", "0", "--keep", "1"]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    if args.data is not None:
        cmd += ["--data", args.data]
    return cmd


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="runs/fp8_loss_text")
    ap.add_argument("--runs", default="bf16:0,fp8:0,bf16:1", help="precision:seed list, the first is the baseline")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint (~12 GB "
                                                                     "for small)")
    args = ap.parse_args(argv)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")]
    rows = []
    for prec, seed in runs:
        d = os.path.join(args.out, f"{prec}_seed{seed}")
        t = time.time()
        subprocess.run(train_command(args, prec, seed, d), check=True)
        v = final_val(d)
        tl = train_losses(d)
        last = [x for _, x in tl[-5:]]
        rows.append({"run": f"{prec} seed {seed}", "val_loss": v["val_loss"], "val_bpb": v["val_bpb"],
                     "train_loss_last": sum(last) / max(len(last), 1), "minutes": (time.time() - t) / 60,
                     "curve": tl})
        print(f"RESULT {rows[-1]['run']}: val loss {v['val_loss']:.4f}, {v['val_bpb']:.4f} bits/byte, "
              f"{rows[-1]['minutes']:.1f} min", flush=True)
        if not args.keep_checkpoints:
            shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)
    base = rows[0]["val_loss"]
    print(f"\n{args.preset}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens")
    print("| run | final val loss | val bits/byte | vs first run | mean train loss (last logs) | minutes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {(r['val_loss'] / base - 1):+.2%} | "
              f"{r['train_loss_last']:.4f} | {r['minutes']:.1f} |")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
