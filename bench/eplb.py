"""Redundant-expert placement (EPLB, dsv3/inference/eplb.py): rank imbalance before and after, on synthetic
Zipf loads at the 671B shape (58 MoE layers, 256 experts in 8 groups) and, with --loads, on recorded ones.

    PYTHONPATH=. python bench/eplb.py
    PYTHONPATH=. python bench/eplb.py --loads counts.pt --ranks 8 32 --redundant 32
    PYTHONPATH=. python bench/eplb.py --online --ranks 8 --redundant 32 --zipf 0.8     # the online re-placement
    PYTHONPATH=. python bench/eplb.py --plan-from std.pt --serve pip.pt --ranks 2 4 --redundant 4  # across corpora

Synthetic loads: per layer, expert popularity ~ 1 / rank^s over a random permutation of the experts,
scaled to 65,536 tokens x top-8 and rounded (s = 0: uniform). Imbalance = max rank load / mean - 1
(MaxVio over ranks); `before` = contiguous experts, no redundancy. Redundant slots must be a multiple of
the ranks, so 64 ranks use 64 (one extra slot per rank) where 8 and 32 ranks use 32. Rows with nodes use
the hierarchical placement (groups packed onto 8-GPU nodes first, copies stay inside their group's node).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3.checkpoints.loads import load_counts  # noqa: E402
from dsv3.inference.eplb import (baseline_rank_load, imbalance, keep_in_place, placement_from_slots,  # noqa: E402
                                 plan_placement, replan, replan_redundant)


def zipf_loads(L: int, E: int, s: float, seed: int, tokens: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([(w[torch.randperm(E, generator=g)] / w.sum() * tokens).round() for _ in range(L)])


def row(name: str, loads: torch.Tensor, ranks: int, redundant: int, groups, nodes) -> None:
    t = time.perf_counter()
    pl = plan_placement(loads, ranks, redundant, groups if nodes else None, nodes)
    ms = (time.perf_counter() - t) * 1e3
    b, a = imbalance(baseline_rank_load(loads, ranks)), imbalance(pl.rank_load)
    gain = (pl.rank_load.max(-1).values / baseline_rank_load(loads, ranks).max(-1).values).mean()
    print(f"| {name} | {ranks} | {nodes or '-'} | {redundant} | {b.mean():.3f} / {b.max():.3f} | "
          f"{a.mean():.3f} / {a.max():.3f} | {gain:.3f} | {ms:.0f} |")


def online(E: int, ranks: int, redundant: int, s: float, tokens: int, windows: int, shift: int, seed: int) -> None:
    """The online re-placement (`--eplb-interval`, eplb.replan) on simulated traffic: per window, `tokens` routings
    drawn from a Zipf(s) popularity over a random permutation of the experts (a new permutation from window
    `shift` on); each strategy re-plans from the window and is scored on the next one (what it then serves).
    Slots rewritten = expert weights read from the checkpoint."""
    g = torch.Generator().manual_seed(seed)
    w = (1 / torch.arange(1, E + 1, dtype=torch.float64) ** s)[torch.randperm(E, generator=g)]

    def window(w, k):
        draw = torch.multinomial(w, tokens, replacement=True, generator=torch.Generator().manual_seed(seed + k))
        return draw.bincount(minlength=E).double()[None]

    def scratch(loads, slots):
        return keep_in_place(slots[0], plan_placement(loads, ranks, redundant).slots[0])[None]

    start = plan_placement(torch.ones(1, E, dtype=torch.float64), ranks, redundant).slots
    print(f"E = {E}, {ranks} ranks, {redundant} redundant ({E + redundant} slots), Zipf s = {s}, {tokens:,} tokens "
          f"per window, new traffic from window {shift}")
    print("| strategy | slots rewritten per re-plan | next window's rank imbalance |\n|---|---|---|")
    for name, plan in (("replan (--eplb-interval)", replan), ("redundant copies only", replan_redundant),
                       ("from scratch every time", scratch)):
        slots, moved, imb, wt = start, [], [], w
        for k in range(windows):
            if k == shift:
                wt = w[torch.randperm(E, generator=torch.Generator().manual_seed(seed + 999))]
            new = plan(window(wt, k), slots)
            moved.append(int((new != slots).sum()))
            nxt = placement_from_slots(new, window(wt, 1000 + k))
            imb.append(float(imbalance(nxt.rank_load)[0]))
            slots = new
        print(f"| {name} | {', '.join(map(str, moved))} | {', '.join(f'{x:.3f}' for x in imb)} |")


def cross(plan_from: str, serve: str, ranks: list[int], redundant: int) -> None:
    """A placement planned from one recorded load, scored on another (each a `--record-expert-loads` file)."""
    a, b = load_counts(plan_from).double(), load_counts(serve).double()
    print(f"rank imbalance of {os.path.basename(serve)} (mean / max over blocks)")
    print(f"| ranks | redundant | contiguous | placed from {os.path.basename(plan_from)} | placed from "
          f"{os.path.basename(serve)} |\n|---|---|---|---|---|")
    for r in ranks:
        red = -(-redundant // r) * r
        c = imbalance(baseline_rank_load(b, r))
        x = imbalance(placement_from_slots(plan_placement(a, r, red).slots, b).rank_load)
        own = imbalance(plan_placement(b, r, red).rank_load)
        print(f"| {r} | {red} | {c.mean():.3f} / {c.max():.3f} | {x.mean():.3f} / {x.max():.3f} | "
              f"{own.mean():.3f} / {own.max():.3f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loads", default=None, help="recorded (L, E) expert counts (.pt or .npy)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--redundant", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--zipf", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--online", action="store_true", help="simulate the online re-placement (eplb.replan)")
    p.add_argument("--experts", type=int, default=256, help="--online: experts")
    p.add_argument("--tokens", type=int, default=100_000, help="--online: routings per window")
    p.add_argument("--windows", type=int, default=8, help="--online: re-plans")
    p.add_argument("--shift", type=int, default=5, help="--online: the window from which the traffic changes")
    p.add_argument("--plan-from", default=None, help="with --serve: plan from these recorded loads")
    p.add_argument("--serve", default=None, help="with --plan-from: score the placement on these recorded loads")
    a = p.parse_args()
    if a.online:
        online(a.experts, a.ranks[0], a.redundant, a.zipf[-1], a.tokens, a.windows, a.shift, 0)
        return
    if a.plan_from or a.serve:
        if not (a.plan_from and a.serve):
            raise SystemExit("--plan-from and --serve go together")
        cross(a.plan_from, a.serve, a.ranks, a.redundant)
        return
    print("| loads | ranks | nodes | redundant | imbalance before (mean / max over layers) | after | "
          "max rank load after / before | plan ms |")
    print("|---|---|---|---|---|---|---|---|")
    cases = []
    for r in a.ranks:
        red = -(-a.redundant // r) * r  # the smallest multiple of the ranks >= --redundant
        cases.append((r, red, None))
        if r >= 16 and r % 8 == 0 and a.groups % (r // 8) == 0:
            cases.append((r, red, r // 8))  # 8 GPUs per node
    if a.loads:
        loads = load_counts(a.loads)
        for r, red, nodes in cases:
            row(os.path.basename(a.loads), loads, r, red, a.groups, nodes)
        return
    for s in a.zipf:
        loads = zipf_loads(58, 256, s, 0, 65536 * 8)
        for r, red, nodes in cases:
            row(f"Zipf s={s}", loads, r, red, a.groups, nodes)


if __name__ == "__main__":
    main()
