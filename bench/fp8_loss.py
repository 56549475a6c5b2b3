"""FP8 vs bf16 training loss on one GPU: the same model, data and seed, trained with bf16 autocast and
with the FP8 linears of dsv3/training/fp8.py; prints both curves (every 20 steps) and the relative
difference of the mean loss over the last 20 steps.

    PYTHONPATH=. python bench/fp8_loss.py --preset small --steps 200 --batch 8 --seq 512

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


def run(cfg, precision, data, lr):
    torch.manual_seed(0)
    model = dsv3.build_model(cfg, device="cuda", dtype=torch.float32, seed=0)
    model.set_experts_impl("grouped")
    if precision == "fp8":
        from dsv3.training.fp8 import convert_to_fp8_training
        convert_to_fp8_training(model)
    opt = make_optimizer(model, lr)
    losses = []
    t0 = time.perf_counter()
    for i, x in enumerate(data):
        x = x.cuda(non_blocking=True)
        for group in opt.param_groups:  # short warm-up
            group["lr"] = lr * min(1.0, (i + 1) / 20)
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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = dsv3.preset(args.preset)
    data = list(batches(args.steps, args.batch, args.seq, args.vocab))
    res = {}
    for prec in ("bf16", "fp8"):
        res[prec], dt = run(cfg, prec, data, args.lr)
        print(f"{prec}: {args.steps} steps in {dt:.1f} s; loss every 20 steps: "
              + " ".join(f"{v:.4f}" for v in res[prec][19::20]), flush=True)
    a = sum(res["bf16"][-20:]) / 20
    b = sum(res["fp8"][-20:]) / 20
    print(f"{args.preset} {args.batch}x{args.seq}, {args.steps} steps: mean main loss of the last 20 steps "
          f"bf16 {a:.4f}, fp8 {b:.4f}, relative difference {(b - a) / a:+.3%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **res}, f)


if __name__ == "__main__":
    main()
