"""The global gradient norm of a training step (dsv3.training.optim.global_norm, what clip_and_step computes before
the AdamW update) on one GPU: the gradients of a shape of bench/train_speed.py with bf16 working weights (bf16
gradients for the GEMM weights, fp32 for the rest), timed as shipped, as one mixed _foreach_norm call (before
2026-12-06: CUDA's per-tensor fallback), and with other NORM_ALONE thresholds.

    PYTHONPATH=. python bench/grad_norm_speed.py [--only small]

GB/s counts each gradient's bytes read once; the relative error is against the norm in fp64. CUDA-event timing,
median of 20 after 3.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv3  # noqa: E402
import dsv3.training.optim as optim  # noqa: E402
from bandwidth import _seconds, card_name  # noqa: E402
from train_speed import shapes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["small", "671b-slice"], default=None)
    args = ap.parse_args()
    print(card_name())
    ms = lambda fn: _seconds(fn, True, 3, 20)[0] * 1e3  # noqa: E731
    for shape in ("small", "671b-slice"):
        if args.only not in (None, shape):
            continue
        model = dsv3.build_model(shapes(4)[shape][0], device="meta", dtype=torch.float32)
        bf16 = {id(p) for p in optim.bf16_weight_params(model)}
        ps = []
        for p in model.parameters():
            q = torch.nn.Parameter(torch.empty(p.shape, device="cuda",
                                               dtype=torch.bfloat16 if id(p) in bf16 else torch.float32))
            q.grad = torch.randn(p.shape, device="cuda").to(q.dtype)
            ps.append(q)
        grads = [p.grad for p in ps]
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        exact = torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt()

        def mixed():  # the code before: one _foreach_norm call over the mixed list
            n = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            return torch.linalg.vector_norm(torch.stack([x.float() for x in n]), 2.0)

        print(f"\n{shape}: {len(grads)} gradients, {nbytes / 1e9:.2f} GB")
        print("| global_norm | ms | GB/s | rel. error vs fp64 |")
        print("|---|---|---|---|")
        shipped = optim.NORM_ALONE
        # (label, NORM_ALONE for global_norm, or None: the mixed call)
        rows = [("one mixed _foreach_norm (before)", None)]
        rows += [(f"grouped, alone from 2^{k}" + (" (shipped)" if 2**k == shipped else ""), 2**k)
                 for k in (16, 20, 24, 26)]
        rows += [("grouped, none alone", 2**62)]
        for label, alone in rows:
            optim.NORM_ALONE = alone or shipped
            f = mixed if alone is None else (lambda: optim.global_norm(ps))
            n = f()
            t = ms(f)
            print(f"| {label} | {t:.3f} | {nbytes / t / 1e6:.0f} | {float((n - exact) / exact):.1e} |")
        optim.NORM_ALONE = shipped
        ps = grads = []  # (free this shape's gradients before the next)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
