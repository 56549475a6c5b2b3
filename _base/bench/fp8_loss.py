"""FP8 vs bf16 training loss on one GPU: the same model, data and seed, trained with bf16 autocast and
with the FP8 linears of dsv3/training/fp8.py; prints both curves (every 20 steps) and the relative
difference of the mean loss over the last 20 steps.

    PYTHONPATH=. python bench/fp8_loss.py --preset small --steps 200 --batch 8 --seq 512
    PYTHONPATH=. python bench/fp8_loss.py --preset small --steps 1200 --schedule cosine --noise

--schedule cosine: warm-up then cosine decay to 10% (the runs converge, so the end losses compare
converged models rather than two points on a steep curve). --noise: a third run, bf16 with another
init seed, whose difference to the first bf16 run is the run-to-run noise the FP8 gap is judged against.

Data: random but learnable, a fixed sparse Markov chain over --vocab tokens (each token has 4 possible
successors), so the loss floor is ln 4 = 1.386 for the main head. Fresh batches each step, the same
for both runs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dsv3
from dsv3.training.loss import compute_loss
from dsv3.training.optim import make_optimizer


def batches(steps, B, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, 4), generator=g)
    for _ in range(steps):
        x = torch.empty(B, T + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (B,), generator=g)
        choice = torch.randint(0, 4, (B, T), generator=g)
        for t in range(T):
            x[:, t + 1] = table[x[:, t], choice[:, t]]
        yield x


def run(cfg, precision, data, lr, schedule="constant", seed=0, backend="auto"):
    import math

    torch.manual_seed(seed)
    model = dsv3.build_model(cfg, device="cuda", dtype=torch.float32, seed=seed)
    model.set_experts_impl("grouped")
    if precision == "fp8":
        from dsv3.training.fp8 import convert_to_fp8_training
        convert_to_fp8_training(model, backend)
    opt = make_optimizer(model, lr)
    losses = []
    t0 = time.perf_counter()
    n = len(data)
    for i, x in enumerate(data):
        x = x.cuda(non_blocking=True)
        f = min(1.0, (i + 1) / 20)  # short warm-up
        if schedule == "cosine" and i >= 20:
            f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 20) / max(1, n - 20)))
        for group in opt.param_groups:
            group["lr"] = lr * f
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1])
        loss = compute_loss(out, x[:, 1:], 0.3)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.main.item())
    return losses, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    ap.add_argument("--noise", action="store_true", help="also bf16 with init seed 1 (run-to-run noise)")
    ap.add_argument("--emulate", action="store_true",
                    help="also fp8 through the emulation backend (quantize -> dequantize -> fp32 matmul): "
                         "separates the recipe from the scaled_mm / Triton kernel path")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = dsv3.preset(args.preset)
    data = list(batches(args.steps, args.batch, args.seq, args.vocab))
    res = {}
    runs = [("bf16", "bf16", 0, "auto"), ("fp8", "fp8", 0, "auto")]
    runs += [("fp8_emulate", "fp8", 0, "emulate")] if args.emulate else []
    runs += [("bf16_seed1", "bf16", 1, "auto")] if args.noise else []
    every = max(20, args.steps // 20)
    for name, prec, seed, backend in runs:
        res[name], dt = run(cfg, prec, data, args.lr, args.schedule, seed, backend)
        print(f"{name}: {args.steps} steps in {dt:.1f} s; loss every {every} steps: "
              + " ".join(f"{v:.4f}" for v in res[name][every - 1::every]), flush=True)
    end = {k: sum(v[-20:]) / 20 for k, v in res.items()}
    a, b = end["bf16"], end["fp8"]
    print(f"{args.preset} {args.batch}x{args.seq}, {args.steps} steps ({args.schedule}): mean main loss of the "
          f"last 20 steps bf16 {a:.4f}, fp8 {b:.4f}, relative difference {(b - a) / a:+.3%}")
    if args.emulate:
        c = end["fp8_emulate"]
        print(f"fp8 emulated: {c:.4f}, relative to bf16 {(c - a) / a:+.3%}")
    if args.noise:
        c = end["bf16_seed1"]
        print(f"run-to-run noise: bf16 seed 1 {c:.4f}, relative to bf16 seed 0 {(c - a) / a:+.3%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **res}, f)


if __name__ == "__main__":
    main()
