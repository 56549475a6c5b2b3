"""Router selection on one GPU: the Triton kernel (dsv3/kernels/router_triton.py) against the torch
reference (`kernels.reference.router_topk_ref`, ~10 ops), eager and torch.compile'd, and each replayed
from a CUDA graph (what the graphed decode step sees: launch costs gone, GPU time only).

    PYTHONPATH=. python bench/router_speed.py
    PYTHONPATH=. python bench/router_speed.py --shapes 671b --tokens 1 65536 --sweep

Input: the router logits (N, E) fp32 and the correction bias; the GEMM x Wᵀ before it is the same for
both and not timed. Output: w (N, K), idx (N, K), s (N, E). Shapes: 16b (E = 64, one group, top-6)
and 671b (E = 256, 8 groups, top-4 groups, top-8). Forward only (no autograd: decode, and the
selection part of training; with autograd the op also runs sigmoid / gather / normalise in torch).

Columns: microseconds per call, median over --iters timings of --reps back-to-back calls (CUDA events;
eager rows include the host's launch cost where it exceeds the GPU time, as at batch-1 decode),
and for the kernel the effective bandwidth of its compulsory traffic (logits read, s written: 8·N·E
bytes). --sweep also times the kernel's launch configurations (tokens per program, warps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3.config import preset  # noqa: E402
from dsv3.kernels.reference import router_topk_ref  # noqa: E402


def timed(fn, iters: int, reps: int) -> float:
    """Median microseconds per fn() call: `iters` CUDA-event timings of `reps` consecutive calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


def graphed(fn, reps: int):
    """A CUDA graph of `reps` calls of fn, and a callable replaying it (per-call time = replay / reps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["16b", "671b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 4096, 65536])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's launch configurations")
    args = ap.parse_args()
    from dsv3.kernels.router_triton import router_topk as kernel

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.shapes:
        c = preset(name)
        E = c.n_routed_experts
        kw = (c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        print(f"\n{name}: E={E}, n_group={kw[1]}, topk_group={kw[2]}, K={kw[0]}")
        print(f"  {'N':>6}  {'ref eager':>10} {'ref compiled':>12} {'kernel':>9}   graphs: {'ref':>9} "
              f"{'ref compiled':>12} {'kernel':>9}   kernel GB/s  speedup (graphs, vs best ref)")
        for N in args.tokens:
            g = torch.Generator(device="cuda").manual_seed(N)
            logits = 2 * torch.randn(N, E, device="cuda", generator=g)
            bias = 0.05 * torch.randn(E, device="cuda", generator=g)
            torch._dynamo.reset()
            compiled = torch.compile(router_topk_ref, fullgraph=True, dynamic=False)
            fns = {"ref": lambda: router_topk_ref(logits, bias, *kw),
                   "ref_c": lambda: compiled(logits, bias, *kw),
                   "kernel": lambda: kernel(logits, bias, *kw)}
            got, want = kernel(logits, bias, *kw), router_topk_ref(logits, bias, *kw)
            agree = (got[1] == want[1]).all(-1).float().mean().item()
            reps = 50 if N <= 4096 else 5
            eager = {k: timed(f, args.iters, reps) for k, f in fns.items()}
            graphs = {k: graphed(f, reps) for k, f in fns.items()}
            replay = {k: timed(gr.replay, args.iters, 1) / reps for k, gr in graphs.items()}
            gbs = 8 * N * E / (replay["kernel"] * 1e-6) / 1e9
            best = min(replay["ref"], replay["ref_c"])
            print(f"  {N:>6}  {eager['ref']:>10.1f} {eager['ref_c']:>12.1f} {eager['kernel']:>9.1f}   "
                  f"        {replay['ref']:>9.1f} {replay['ref_c']:>12.1f} {replay['kernel']:>9.1f}   "
                  f"{gbs:>11.0f}  x{best / replay['kernel']:.2f}   (idx agree {agree:.4f})")
            if args.sweep:
                for bm in (1, 2, 4, 8, 16):
                    for nw in (1, 2, 4):
                        gr = graphed(lambda: kernel(logits, bias, *kw, True, bm, nw), reps)
                        us = timed(gr.replay, args.iters, 1) / reps
                        print(f"           block_m={bm:<2} num_warps={nw}: {us:8.1f} us")


if __name__ == "__main__":
    main()
