"""The FP8 training GEMMs of a preset's dense linears, each beside bf16, and what they bound (issue 15 item 3).

For every distinct (N, K) among the Linears that `--precision fp8` swaps (dsv3/training/fp8.py fp8_target_names:
the attention projections and the dense / shared-expert MLPs), at M = tokens of one micro-batch:

    bf16        the three GEMMs of a bf16-weights training Linear (fprop x·Wᵀ, dgrad dy·W, wgrad dyᵀ·x), bf16
                operands and results, torch.matmul (as autograd runs F.linear's backward);
    fp8 GEMMs   the same three as `F.scaled_mm` on operands quantised beforehand (fprop and dgrad 1x128 x 128x128,
                wgrad 1x128 x 1x128): the ceiling of the paper's recipe on this card with cuBLAS, quantisation free;
    quant       the five quantiser passes dsv3's FP8 Linear adds around them (x and the weight with its fp8
                transpose in the forward; dy, dyᵀ and the re-tiled xᵀ in the backward; not the gradient's
                power-of-two pre-scale, an amax over dy, nor the cast of dW: slightly optimistic);
    dsv3 fp8    fp8_linear forward + backward as training runs it (quantisers, GEMMs, padding, autograd),
    dsv3 bf16   F.linear forward + backward on bf16 operands (what --precision bf16 --bf16-weights runs).
Everything runs eagerly, one call at a time: the dsv3 rows include each launch's gaps, which a compiled step partly
hides (the small shapes' dsv3 FP8 rows are mostly such gaps).

Each row is weighted by how many Linears of that shape one step of the model runs (its layers), so the totals are
the dense GEMM time of one micro-batch's step. With the step time of the same model from bench/train_speed.py (given
as --step-ms, bf16), the script prints the Amdahl bound: the step with these dense GEMMs replaced by their FP8
counterparts, the rest unchanged (the bf16 GEMMs by the FP8 GEMMs, with and without the quantisers; F.linear by
dsv3's FP8 Linear). The routed experts' grouped GEMMs are
bench/fp8_experts_speed.py's.

    python bench/fp8_gemm_ceiling.py --preset 671b-slice --tokens 4096 --step-ms 98 [--json F]
    python bench/fp8_gemm_ceiling.py --device cpu --preset tiny --tokens 256 --iters 1   (the code path on a CPU:
                                                          the FP8 rows run the PyTorch reference; no timing meaning)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv3  # noqa: E402
from dsv3 import kernels  # noqa: E402
from dsv3.kernels.fp8 import _ceil, _pad2  # noqa: E402  (the padding of the FP8 Linear's own GEMMs)
from dsv3.kernels.reference import BLOCK  # noqa: E402
from dsv3.training.fp8 import fp8_linear, fp8_target_names  # noqa: E402
from bandwidth import _seconds  # noqa: E402


def timed(fn, dev: torch.device, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock on the CPU): bench/bandwidth.py's timer."""
    return _seconds(fn, dev.type == "cuda", warmup, iters)[0] * 1e3


def shapes_of(preset: str) -> collections.Counter:
    """(N, K) -> how many FP8-swapped Linears of that shape the model has: a shape of bench/train_speed.py
    (671b-slice, 16b-cut, small) or a preset."""
    from train_speed import shapes  # the same shapes as the training bench ("671b-slice", "small", ...)

    named = shapes(27)
    cfg = named[preset][0] if preset in named else dsv3.preset(preset)
    model = dsv3.build_model(cfg, device="meta", init=False)  # shapes only
    mods = dict(model.named_modules())
    return collections.Counter(tuple(mods[n].weight.shape) for n in fp8_target_names(model))


def gemm_rows(N: int, K: int, M: int, dev: torch.device, iters: int, warmup: int) -> dict:
    g = torch.Generator(device=dev).manual_seed(N * 7 + K)
    x = torch.randn(M, K, device=dev, generator=g).bfloat16()
    w = (torch.randn(N, K, device=dev, generator=g) * 0.02).bfloat16()
    gy = torch.randn(M, N, device=dev, generator=g).bfloat16() * 1e-3
    t = lambda fn: timed(fn, dev, iters, warmup)  # noqa: E731
    out = {"N": N, "K": K, "M": M}
    out["bf16_gemms"] = t(lambda: x @ w.t()) + t(lambda: gy @ w) + t(lambda: gy.t() @ x)
    smm = dev.type == "cuda" and kernels.backend_available("fp8_gemm", dev)
    if smm:  # the three GEMMs on operands quantised beforehand (the layouts of dsv3/kernels/fp8.py _smm_*)
        Mp, Np, Kp = _ceil(M), _ceil(N), _ceil(K)
        xp, wp, gp = _pad2(x, Mp, Kp), _pad2(w, Np, Kp), _pad2(gy, Mp, Np)
        xq, xs = kernels.act_quant_cm(xp)
        wq, ws, wqt = kernels.weight_quant_pad(wp, transposed=True)
        gq, gs = kernels.act_quant_cm(gp)
        wst = torch.ones(Kp // BLOCK, -(-(Np // BLOCK) // 4) * 4, dtype=torch.float32, device=dev)
        wst[:, : Np // BLOCK] = ws[:, : Kp // BLOCK].t()
        gtq, gts = kernels.act_quant_t(gp)
        xtq, xts = kernels.act_quant_t(xq, xs)
        B1, B128 = F.ScalingType.BlockWise1x128, F.ScalingType.BlockWise128x128
        out["fp8_gemms"] = (
            t(lambda: F.scaled_mm(xq, wq.t(), xs, B1, ws.t(), B128, output_dtype=torch.bfloat16))
            + t(lambda: F.scaled_mm(gq, wqt.t(), gs, B1, wst.t(), B128, output_dtype=torch.bfloat16))
            + t(lambda: F.scaled_mm(gtq, xtq.t(), gts, B1, xts, B1, output_dtype=torch.float32)))
        out["quant"] = (t(lambda: kernels.act_quant_cm(xp)) + t(lambda: kernels.weight_quant_pad(wp, transposed=True))
                        + t(lambda: kernels.act_quant_cm(gp)) + t(lambda: kernels.act_quant_t(gp))
                        + t(lambda: kernels.act_quant_t(xq, xs)))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd_bwd(fn):
        def run():
            xr.grad = wr.grad = None
            fn(xr, wr).backward(gy)
        return run

    out["dsv3_bf16"] = t(fwd_bwd(F.linear))
    out["dsv3_fp8"] = t(fwd_bwd(lambda a, b: fp8_linear(a, b, out_dtype=torch.bfloat16)))
    return out


def amdahl(step_ms: float, dense_bf16_ms: float, dense_fp8_ms: float) -> float:
    """The speed-up of a step of step_ms whose dense GEMMs (dense_bf16_ms of it) take dense_fp8_ms instead."""
    return step_ms / (step_ms - dense_bf16_ms + dense_fp8_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="671b-slice")
    ap.add_argument("--tokens", type=int, default=4096, help="M: tokens of one micro-batch (2 x 2048 on the slice)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="the model's bf16 training step (bench/train_speed.py, same card and micro-batch): prints "
                         "the Amdahl bound of FP8 dense GEMMs")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fp8_gemm_ceiling.py: CUDA is not available (--device cpu runs the code path)")
    if args.tokens <= 0 or args.iters <= 0 or args.warmup < 0:
        raise SystemExit("--tokens and --iters must be > 0, --warmup >= 0")
    counts = shapes_of(args.preset)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{args.preset}: {sum(counts.values())} FP8-swapped Linears in {len(counts)} shapes, M = {args.tokens}; "
          f"{card}, torch {torch.__version__}")
    cols = ("bf16_gemms", "fp8_gemms", "quant", "dsv3_bf16", "dsv3_fp8")
    print("| N x K | count | bf16 GEMMs (ms) | FP8 GEMMs (ms) | FP8 quantisers (ms) | dsv3 bf16 fwd+bwd (ms) | "
          "dsv3 FP8 fwd+bwd (ms) | FP8 GEMMs / bf16 | dsv3 FP8 / bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows, total = [], dict.fromkeys(cols, 0.0)
    for (N, K), n in sorted(counts.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[1]):
        r = gemm_rows(N, K, args.tokens, dev, args.iters, args.warmup)
        r["count"] = n
        rows.append(r)
        for c in cols:
            total[c] += n * r.get(c, float("nan"))
        f = lambda c: f"{r[c]:.3f}" if c in r else "n/a"  # noqa: E731
        sp = lambda a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else "n/a"  # noqa: E731
        print(f"| {N} x {K} | {n} | {f('bf16_gemms')} | {f('fp8_gemms')} | {f('quant')} | {f('dsv3_bf16')} | "
              f"{f('dsv3_fp8')} | {sp('bf16_gemms', 'fp8_gemms')} | {sp('dsv3_bf16', 'dsv3_fp8')} |", flush=True)
    print("| **all, weighted by count** | | " + " | ".join(f"{total[c]:.2f}" if c in rows[0] else "n/a" for c in cols)
          + " | | |")
    total = {c: v for c, v in total.items() if c in rows[0]}  # (the columns this card measured)
    summary = {"preset": args.preset, "tokens": args.tokens, "card": card, "rows": rows, "total_ms": total}
    if args.step_ms > 0:
        for name, bf16, fp8 in (("FP8 GEMMs, quantisation free", "bf16_gemms", ("fp8_gemms",)),
                                ("FP8 GEMMs + quantisers", "bf16_gemms", ("fp8_gemms", "quant")),
                                ("dsv3's FP8 Linear", "dsv3_bf16", ("dsv3_fp8",))):
            if any(c not in rows[0] for c in fp8):  # (no SM90 scaled_mm: those columns were not measured)
                continue
            f = sum(total[c] for c in fp8)
            x = amdahl(args.step_ms, total[bf16], f)
            print(f"Amdahl, {name}: step {args.step_ms:.1f} - {total[bf16]:.1f} (bf16) + {f:.1f} = "
                  f"{args.step_ms - total[bf16] + f:.1f} ms -> {x:.2f}x bf16")
            summary[f"amdahl {name}"] = x
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
