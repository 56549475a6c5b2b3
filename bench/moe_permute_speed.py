"""The training MoE's row permutation on one GPU: the dispatch gather, the gate-weighted combine and the combine's
backward, and the dispatch's backward (an unweighted combine), each as the Triton kernel (dsv3/kernels/
moe_permute_triton.py), as the reference run eagerly, and as the reference compiled alone by torch.compile (inductor;
in the training step inductor also fused the residual add and the next RMSNorm into the combine, not timed here).

    PYTHONPATH=. python bench/moe_permute_speed.py [--only small]

Shapes (tokens of one micro-batch, top-K): small 8 x 2048 tokens, D = 1024, K = 6; 16b 4 x 2048, D = 2048, K = 6;
671b-slice 2 x 2048, D = 7168, K = 4. Bytes are what each must move (gathered rows read or written once, the gates,
the indices), GB/s over them, and the share of the card's copy bandwidth measured in the same run
(bench/bandwidth.py). CUDA-event timing, median of --iters after --warmup.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsv3.kernels import moe_combine_bwd_ref, moe_combine_ref, moe_gather_ref  # noqa: E402
from bandwidth import _seconds, copy_bandwidth  # noqa: E402

SHAPES = {"small": (16384, 1024, 6, 64), "16b": (8192, 2048, 6, 64), "671b-slice": (4096, 7168, 4, 16)}  # N, D, K, E


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SHAPES), default=None)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    from dsv3.kernels import moe_permute_triton as mp

    bw = copy_bandwidth()
    print(bw["caption"])
    ms = lambda fn: _seconds(fn, True, args.warmup, args.iters)[0] * 1e3  # noqa: E731
    compiled = {f: torch.compile(f, dynamic=False) for f in (moe_gather_ref, moe_combine_ref, moe_combine_bwd_ref)}
    print("| shape | op | bytes (MB) | Triton (ms) | GB/s | of copy | eager ref (ms) | compiled ref (ms) | Triton vs compiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (N, D, K, E) in SHAPES.items():
        if args.only not in (None, name):
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        idx = torch.rand(N, E, device="cuda", generator=g).topk(K, dim=-1).indices
        order = idx.reshape(-1).argsort(stable=True)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device="cuda"))
        inv_NK = inv.view(N, K)
        M = N * K
        x = torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16)
        y = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16)
        w = torch.rand(N, K, device="cuda", generator=g)
        gout = torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16)
        rows, toks = M * D * 2, N * D * 2  # bytes of the sorted rows, of the token rows (bf16)
        cases = (
            ("dispatch gather", rows + toks + M * 8, lambda f: f(x, order, K),
             mp.moe_gather, moe_gather_ref, compiled[moe_gather_ref]),
            ("combine (gates)", rows + toks + N * K * 12, lambda f: f(y, inv_NK, w, torch.bfloat16),
             mp.moe_combine, moe_combine_ref, compiled[moe_combine_ref]),
            ("dispatch backward", rows + toks + N * K * 8, lambda f: f(y, inv_NK),
             mp.moe_combine, moe_combine_ref, compiled[moe_combine_ref]),
            ("combine backward", 2 * rows + toks + N * K * 16, lambda f: f(gout, y, inv_NK, w),
             mp.moe_combine_bwd, moe_combine_bwd_ref, compiled[moe_combine_bwd_ref]),
        )
        for op, nbytes, call, kern, ref, comp in cases:
            t_k, t_e, t_c = (ms(lambda f=f: call(f)) for f in (kern, ref, comp))
            print(f"| {name} | {op} | {nbytes / 1e6:.0f} | {t_k:.3f} | {nbytes / t_k / 1e6:.0f} | "
                  f"{nbytes / t_k / 1e-3 / bw['bytes_per_s']:.0%} | {t_e:.3f} | {t_c:.3f} | x{t_c / t_k:.2f} |")


if __name__ == "__main__":
    main()
