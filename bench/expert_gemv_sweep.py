"""The routed experts of one decode step on one GPU: the grouped-GEMM path against the decode GEMV
(dsv3/kernels/expert_gemv_triton.py) and a sweep of the GEMV's launch parameters, at the 16b model's shapes.

    PYTHONPATH=. python bench/expert_gemv_sweep.py [--rows 6,48] [--fp8 | --fp8-only] [--quick]

Each timing replays a CUDA graph holding 50 calls (so launches cost what they cost in the graphed decode
step), median of 7 replays. GB/s counts the weight bytes the call must read: the distinct experts the rows
select (each expert once: what the grouped GEMM reads, the floor for any kernel) over the measured time, beside
the card's copy bandwidth measured in the same run (bench/bandwidth.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import dsv3  # noqa: E402
from dsv3 import kernels  # noqa: E402
from dsv3.kernels import expert_gemv_triton as k  # noqa: E402
from dsv3.model.fp8 import FP8Experts  # noqa: E402
from dsv3.model.moe import Experts  # noqa: E402
from bandwidth import copy_bandwidth, graph_us  # noqa: E402


def graph_time(fn, calls: int = 50, reps: int = 7) -> float:
    """Seconds per call of fn() replayed from a CUDA graph of `calls` calls (bench/bandwidth.py graph_us)."""
    return graph_us(lambda i: fn(), calls, reps) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--rows", default="6,48", help="(token, expert) pairs per call: batch x top-k")
    ap.add_argument("--fp8", action="store_true", help="also the e4m3 experts")
    ap.add_argument("--fp8-only", action="store_true", help="the e4m3 experts only (not the bf16 ones)")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("expert_gemv_sweep.py: CUDA is not available; this benchmark runs on a GPU")
    bw = copy_bandwidth("cuda", 2**31)["bytes_per_s"]
    cfg = dsv3.preset(args.preset)
    E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    print(f"card {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.3f} TB/s; {args.preset} experts E={E} "
          f"D={D} I={I} top-{K}")
    dense = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    for p in dense.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.02
    fp8 = FP8Experts.from_experts(dense).cuda() if args.fp8 or args.fp8_only else None  # (before .bfloat16(): in place)
    stores = ([] if args.fp8_only else [("bf16", dense.bfloat16().cuda())])
    stores += [("fp8", fp8)] if fp8 is not None else []
    sweep = (dict(BN=[8, 16, 32, 64], KU=[1, 2, 4], num_warps=[2, 4, 8], PREFETCH=[True, False]) if not args.quick else
             dict(BN=[8, 16, 32], KU=[1, 2], num_warps=[4], PREFETCH=[True, False]))
    if args.fp8_only and not args.quick:  # e4m3: narrower tiles, longer K per load (bytes in flight per register);
        # 8 warps, not 2 (registers, compiled for sm_90 ahead of time: BN 8 KU 4 with PREFETCH takes 254 at 4 warps)
        sweep = dict(BN=[4, 8, 16, 32], KU=[1, 2, 4, 8], num_warps=[4, 8], PREFETCH=[True, False])
    for (name, m), M in itertools.product(stores, [int(r) for r in args.rows.split(",")]):
        N = max(M // K, 1)
        x = torch.randn(N, D, device="cuda").bfloat16()
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).cuda()
        w = torch.rand(N, K, device="cuda")
        flat = idx.reshape(-1)
        distinct = flat.unique().numel()
        per_byte = 1 if name == "fp8" else 2
        need = distinct * 3 * D * I * per_byte  # each selected expert read once
        gw = m.gemv_weights()
        print(f"\n### {name} experts, {N} tokens x top-{K} = {N * K} rows, {distinct} distinct experts, "
              f"{need / 1e6:.1f} MB of weights to read (roofline {need / bw * 1e6:.1f} us)")
        print("| path | config | us | GB/s | of copy BW |\n|---|---|---|---|---|")

        def row(path, cfg_s, t):
            print(f"| {path} | {cfg_s} | {t * 1e6:.1f} | {need / t / 1e9:,.0f} | {need / t / bw:.1%} |", flush=True)

        with torch.no_grad(), kernels.use_backend(expert_gemv="reference"):
            row("grouped (forward_grouped)" if name == "bf16" else "per-row FP8 kernel (sorted_mlp)", "-",
                graph_time(lambda: m.forward_grouped(x, idx, w)))
        with torch.no_grad():
            row("GEMV (forward_gemv)", "defaults " + str(k.default_config(name == "fp8", N * K, I)) + " / "
                + str(k.default_config(name == "fp8", N * K, D)),
                graph_time(lambda: m.forward_gemv(x, idx, w)))
            h = kernels.expert_gemv(x, gw[0], gw[1], flat, K, up=gw[2], up_s=gw[3])
            best = {}
            for vals in itertools.product(*sweep.values()):
                c = dict(zip(sweep, vals))
                t1 = graph_time(lambda: k.launch(x, gw[0], gw[1], flat, K, gw[2], gw[3], **c))
                t2 = graph_time(lambda: k.launch(h, gw[4], gw[5], flat, 1, **c))
                for part, t in (("gate+up", t1), ("down", t2)):
                    if part not in best or t < best[part][1]:
                        best[part] = (c, t)
                print(f"| kernels: gate+up / down | {c} | {t1 * 1e6:.1f} / {t2 * 1e6:.1f} | "
                      f"{need * 2 / 3 / t1 / 1e9:,.0f} / {need / 3 / t2 / 1e9:,.0f} | "
                      f"{need * 2 / 3 / t1 / bw:.1%} / {need / 3 / t2 / bw:.1%} |", flush=True)
            for part, (c, t) in best.items():
                print(f"best {part}: {c} {t * 1e6:.1f} us")


if __name__ == "__main__":
    main()
