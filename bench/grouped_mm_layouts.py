"""The routed experts' grouped GEMMs (torch._grouped_mm, bf16) on one GPU, each of the nine a MoE layer runs in a
training step (fprop, dgrad, wgrad of gate, up and down) in each layout its operands could be stored in, beside one
dense torch.mm of the same total size (the ceiling the grouping could reach).

    PYTHONPATH=. python bench/grouped_mm_layouts.py [--only small]

Shapes: small 64 experts, top-6 of 8 x 2048 tokens (M = 98,304 rows), D = 1024, I = 384; 16b 64 experts, top-6 of
4 x 2048 (M = 49,152), D = 2048, I = 1408. Routing uniform at random. A layout letter per operand: "r" row-major
(the last dimension contiguous), "c" column-major (a transposed view of a row-major tensor), as cuBLAS / CUTLASS
see them; Experts.sorted_mlp's autograd runs fprop r x c (the (E, I, D) weights transposed), dgrad r x r, wgrad c x r.
The "gate+up" rows are the same two projections as one GEMM of twice the width (fprop, wgrad) or depth (dgrad), as if
the gate and up weights were stored as one (E, 2I, D) tensor.
CUDA-event timing, median of --iters after --warmup; TFLOP/s = 2·M·N·K / time.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bandwidth import _seconds, matmul_ceiling  # noqa: E402

SHAPES = {"small": (64, 6, 16384, 1024, 384), "16b": (64, 6, 8192, 2048, 1408)}  # E, top-k, tokens, D, I


def lay(t: torch.Tensor, major: str) -> torch.Tensor:
    """The same values with the last two dimensions row-major ("r") or column-major ("c": a transposed view)."""
    return t.contiguous() if major == "r" else t.transpose(-2, -1).contiguous().transpose(-2, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SHAPES), default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    mm = matmul_ceiling()
    print(mm["caption"])
    ms = lambda fn: _seconds(fn, True, args.warmup, args.iters)[0] * 1e3  # noqa: E731
    for name, (E, k, T, D, I) in SHAPES.items():
        if args.only not in (None, name):
            continue
        M = T * k
        g = torch.Generator(device="cuda").manual_seed(0)
        idx = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=-1).indices.reshape(-1)
        offs = torch.zeros(E, dtype=torch.long, device="cuda").scatter_add_(0, idx, torch.ones_like(idx))
        offs = offs.cumsum(0).to(torch.int32)
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x, h, gy, gh = (torch.randn(M, n, **bf) for n in (D, I, D, I))
        w_in, w_out = torch.randn(E, D, I, **bf), torch.randn(E, I, D, **bf)  # (in, out) per expert
        print(f"\n{name}: E={E}, M={M}, D={D}, I={I}")
        print("| GEMM | (M, N, K) | layout | ms | TFLOP/s |")
        print("|---|---|---|---|---|")
        cases = (  # (label, A, B, A's layouts): out = grouped A · B
            ("fprop gate or up: x · W", x, w_in, "r"),
            ("fprop down: h · W2", h, w_out, "r"),
            ("dgrad gate or up: dh · Wᵀ", gh, w_out, "r"),
            # wgrad: A column-major, B row-major only: otherwise the grouped (dynamic) dimension M would have to be a
            # multiple of 8 rows in every group, a device-side assert that ends the process (torch 2.11)
            ("wgrad gate or up: xᵀ · dh", x.t(), gh, "c"),
            ("wgrad down: hᵀ · dy", h.t(), gy, "c"),
        )
        # gate and up as one GEMM of width 2I: fprop x · [W1 | W3], dgrad d[h1 | h3] · [W1 | W3]ᵀ, wgrad xᵀ · d[h1 | h3]
        w13, g13 = torch.randn(E, D, 2 * I, **bf), torch.randn(M, 2 * I, **bf)
        w13o = torch.randn(E, 2 * I, D, **bf)
        for label, A, B in (("fprop gate+up, 2I wide", x, w13), ("dgrad gate+up, 2I deep", g13, w13o),
                            ("wgrad gate+up, 2I wide", x.t(), g13)):
            la = "c" if "wgrad" in label else "r"
            a_t, b_t = lay(A, la), lay(B, "r")
            t = ms(lambda: torch._grouped_mm(a_t, b_t, offs=offs))
            print(f"| {label} | | {la}r | {t:.3f} | {4 * M * I * D / t / 1e9:.0f} |")
        for label, A, B, a_layouts in cases:
            for la in a_layouts:
                for lb in "r" if "wgrad" in label else "rc":
                    a_t, b_t = lay(A, la), lay(B, lb)  # laid out once, outside the timing: the GEMM alone
                    t = ms(lambda: torch._grouped_mm(a_t, b_t, offs=offs))
                    print(f"| {label} | ({M}, {D if 'down' in label else I}, {I if 'down' in label else D}) | "
                          f"{la}{lb} | {t:.3f} | {2 * M * I * D / t / 1e9:.0f} |")
        a, b = torch.randn(M, D, **bf), torch.randn(D, I, **bf)
        t = ms(lambda: a @ b)
        print(f"| dense torch.mm, same size | ({M}, {I}, {D}) | rr | {t:.3f} | {2 * M * I * D / t / 1e9:.0f} |")
        a, b = torch.randn(M, I, **bf), torch.randn(I, D, **bf)
        t = ms(lambda: a @ b)
        print(f"| dense torch.mm, same size | ({M}, {D}, {I}) | rr | {t:.3f} | {2 * M * I * D / t / 1e9:.0f} |")


if __name__ == "__main__":
    main()
