"""Redundant-expert placement (EPLB, dsv3/inference/eplb.py): rank imbalance before and after, on synthetic
Zipf loads at the 671B shape (58 MoE layers, 256 experts in 8 groups) and, with --loads, on recorded ones.

    PYTHONPATH=. python bench/eplb.py
    PYTHONPATH=. python bench/eplb.py --loads counts.pt --ranks 8 32 --redundant 32

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

from dsv3.inference.eplb import baseline_rank_load, imbalance, load_counts, plan_placement  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loads", default=None, help="recorded (L, E) expert counts (.pt or .npy)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--redundant", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--zipf", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    a = p.parse_args()
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
