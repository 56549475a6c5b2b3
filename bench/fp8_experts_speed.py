"""Routed-expert GEMMs on one GPU, forward + backward: FP8 (dsv3/training/fp8.py FP8TrainExperts, Triton
grouped kernels of dsv3/kernels/fp8_grouped_triton.py, quantisation included) against bf16
`torch._grouped_mm` (Experts.sorted_mlp: fp32 master weights cast to bf16 each step, as in training).

    PYTHONPATH=. python bench/fp8_experts_speed.py
    PYTHONPATH=. python bench/fp8_experts_speed.py --only 16b --bm 128 --bn 128 --group 8 --warps 8 --stages 4

Shapes (the rows are already sorted by expert; the sort, gather and weighted scatter around them are
the same for both and not timed):
  671b-slice  16 routed experts, top-4 of 4096 tokens: M = 16384 rows, D = 7168, I = 2048
  16b         64 routed experts, top-6 of 8192 tokens: M = 49152 rows, D = 2048, I = 1408
  small       64 routed experts, top-6 of 16384 tokens (8 x 2048): M = 98304 rows, D = 1024, I = 384
Routing is uniform at random (counts ~M/E, uneven by sampling).

Rows: `sorted_mlp` fwd and fwd+bwd (the three expert matrices: gate and up, SwiGLU, down); then each
FP8 GEMM alone on pre-quantised operands beside its bf16 `torch._grouped_mm` counterpart (fprop of
[gate; up], dgrad of [gate; up] over the 2I contraction, wgrad of down), to see where the time goes.
Then `sorted_mlp` in bf16 with the weights stored in bf16 (`dsv3 train --bf16-weights`: no per-step cast
of the fp32 masters, bf16 weight gradients) beside the fp32-master rows, and gate and up as one GEMM of width
2I on the bf16 weights (concatenated each step; with autograd's SwiGLU and with swiglu_cat) beside the two GEMMs
(`--bf16w-only`: these rows alone).
TFLOP/s counts 2·M·N·K per GEMM: sorted_mlp fwd = 6·M·I·D, fwd+bwd = 18·M·I·D. CUDA-event timing,
median of --iters after --warmup. The --bm/--bn/--group/--warps/--stages (grouped GEMM) and
--wbn/--wbk/--wwarps/--wstages (wgrad) flags overwrite the kernels' tile configurations.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv3  # noqa: E402
from dsv3 import kernels  # noqa: E402
from dsv3.kernels import fp8_grouped_triton as gk  # noqa: E402
from dsv3.model.moe import Experts  # noqa: E402
from dsv3.training.fp8 import FP8TrainExperts, swiglu_cat  # noqa: E402
from bandwidth import _seconds  # noqa: E402

SHAPES = {"671b-slice": (16, 4, 4096, 7168, 2048), "16b": (64, 6, 8192, 2048, 1408),
          "small": (64, 6, 16384, 1024, 384)}  # E, top-k, tokens, D, I


def timed(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over iters calls, CUDA events (bench/bandwidth.py's timer)."""
    return _seconds(fn, True, warmup, iters)[0] * 1e3


def row(name: str, ms_bf16: float, ms_fp8: float, flop: float) -> None:
    print(f"  {name:<28} bf16 {ms_bf16:8.3f} ms {flop / ms_bf16 / 1e9:6.0f} TFLOP/s   "
          f"fp8 {ms_fp8:8.3f} ms {flop / ms_fp8 / 1e9:6.0f} TFLOP/s   x{ms_bf16 / ms_fp8:.2f}")


def bench_shape(name: str, E: int, k: int, T: int, D: int, I: int, iters: int, warmup: int,
                bf16w_only: bool = False) -> None:
    M = T * k
    g = torch.Generator(device="cuda").manual_seed(0)
    cfg = dsv3.ModelConfig(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k)
    ex = Experts(cfg).cuda()
    for p in ex.parameters():  # fp32 masters
        p.data = torch.randn(p.shape, device="cuda", generator=g) * 0.02
    idx = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=-1).indices
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.zeros(E, dtype=torch.long, device="cuda").scatter_add_(0, flat, torch.ones_like(flat))
    offs = offs.cumsum(0).to(torch.int32)
    x = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(M, D, device="cuda", generator=g).to(torch.bfloat16) * 1e-6
    print(f"{name}: E={E}, top-{k} of {T} tokens -> M={M}, D={D}, I={I}")

    def run(mod, backward: bool):
        def step():
            y = mod.sorted_mlp(x, flat, order, offs, torch.bfloat16)
            if backward:
                y.backward(gy)
                mod.zero_grad(set_to_none=True)  # fresh gradients each step: no accumulation kernels
                x.grad = None
        return step

    # bf16 working weights: the same values rounded, stored in bf16 (what AdamW(masters=...) leaves in the model)
    exb = Experts(cfg).cuda()
    exb.load_state_dict(ex.state_dict())
    for p in exb.parameters():
        p.data = p.data.to(torch.bfloat16)
    for label, bwd, flop in (("sorted_mlp fwd", False, 6 * M * I * D), ("sorted_mlp fwd+bwd", True, 18 * M * I * D)):
        with torch.set_grad_enabled(bwd):
            cast, stored = timed(run(ex, bwd), iters, warmup), timed(run(exb, bwd), iters, warmup)
        print(f"  {label:<28} fp32 masters {cast:8.3f} ms {flop / cast / 1e9:6.0f} TFLOP/s   "
              f"bf16 weights {stored:8.3f} ms {flop / stored / 1e9:6.0f} TFLOP/s   x{cast / stored:.2f}")
    # gate and up as one (E, D, 2I) grouped GEMM (and one dgrad over the 2I contraction, one wgrad) instead of
    # two of width I, the concatenation of the stored weights paid every step
    def fused(mod, backward: bool, one_grad: bool = False):
        def step():
            w1, w3, w2 = mod.weights(dtype=torch.bfloat16)
            h13 = torch._grouped_mm(x, torch.cat([w1, w3], 1).transpose(-2, -1), offs=offs)  # (M, 2I)
            # one_grad: the SwiGLU as swiglu_cat (h13's gradient one concatenation, not two zero-filled slice
            # gradients and their sum)
            h = swiglu_cat(h13) if one_grad else F.silu(h13[:, :I]) * h13[:, I:]
            y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
            if backward:
                y.backward(gy)
                mod.zero_grad(set_to_none=True)
                x.grad = None
        return step

    for label, bwd, flop in (("sorted_mlp fwd", False, 6 * M * I * D), ("sorted_mlp fwd+bwd", True, 18 * M * I * D)):
        with torch.set_grad_enabled(bwd):
            two, one = timed(run(exb, bwd), iters, warmup), timed(fused(exb, bwd), iters, warmup)
            cat = timed(fused(exb, bwd, True), iters, warmup)
        print(f"  {label:<28} bf16 gate, up  {two:8.3f} ms {flop / two / 1e9:6.0f} TFLOP/s   "
              f"gate|up in one {one:8.3f} ms {flop / one / 1e9:6.0f} TFLOP/s   x{two / one:.2f}   "
              f"+ swiglu_cat {cat:8.3f} ms x{two / cat:.2f}")
    if bf16w_only:
        return
    fp8 = FP8TrainExperts.from_experts(Experts(cfg).cuda(), "triton")
    fp8.load_state_dict(ex.state_dict())
    for label, bwd, flop in (("sorted_mlp fwd", False, 6 * M * I * D), ("sorted_mlp fwd+bwd", True, 18 * M * I * D)):
        with torch.set_grad_enabled(bwd):
            row(label, timed(run(ex, bwd), iters, warmup), timed(run(fp8, bwd), iters, warmup), flop)

    # the GEMMs alone: operands quantised once, outside the timing
    q = kernels  # the quantisers (Triton on this GPU: the seam's choice)
    with torch.no_grad():
        xq, xs = q.act_quant_cm(x.detach())
        gq, gs = q.act_quant_cm(torch.randn(M, 2 * I, device="cuda", generator=g).to(torch.bfloat16))
        w13 = [q.weight_quant_pad(w.reshape(E * I, D), transposed=True) for w in (ex.gate_proj, ex.up_proj)]
        fprop_b = [(wq.view(E, I, D), s.view(E, I // 128, -1)[:, :, : D // 128]) for wq, s, _ in w13]
        dgrad_b = [(qt.view(D, E, I).permute(1, 0, 2), s.view(E, I // 128, -1)[:, :, : D // 128].transpose(1, 2))
                   for _, s, qt in w13]
        hq, hs = q.act_quant_cm(torch.randn(M, I, device="cuda", generator=g).to(torch.bfloat16))
        gtq, gts = q.act_quant_t(gy)  # dYᵀ of down (D, M)
        htq, hts = q.act_quant_t(hq, hs)  # hᵀ (I, M)
        w13b = torch.cat([ex.gate_proj, ex.up_proj], 1).to(torch.bfloat16)  # (E, 2I, D)
        h = torch.randn(M, I, device="cuda", generator=g).to(torch.bfloat16)
        g2 = torch.randn(M, 2 * I, device="cuda", generator=g).to(torch.bfloat16)
        gyb = gy.detach()
        xb = x.detach()
        gemms = (
            ("fprop [gate; up]", 4 * M * I * D,
             lambda: torch._grouped_mm(xb, w13b.transpose(-2, -1), offs=offs),
             lambda: gk.fp8_grouped_mm(xq, xs, fprop_b, offs, torch.bfloat16, cat="n")),
            ("dgrad [gate; up]", 4 * M * I * D,
             lambda: torch._grouped_mm(g2, w13b, offs=offs),
             lambda: gk.fp8_grouped_mm(gq, gs, dgrad_b, offs, torch.bfloat16, cat="k")),
            ("wgrad down", 2 * M * I * D,
             lambda: torch._grouped_mm(h.t(), gyb, offs=offs),  # what autograd runs for down's weight
             lambda: gk.fp8_grouped_wgrad(gtq, gts, htq, hts, offs, [D])),
        )
        for label, flop, f_bf16, f_fp8 in gemms:
            row(label, timed(f_bf16, iters, warmup), timed(f_fp8, iters, warmup), flop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(SHAPES), default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16w-only", action="store_true", help="only the fp32-master vs bf16-weight rows")
    for flag, key in (("--bm", "BM"), ("--bn", "BN"), ("--group", "GROUP_M"), ("--warps", "num_warps"),
                      ("--stages", "num_stages")):
        ap.add_argument(flag, type=int, default=gk.MM_CONFIG[key], dest=f"mm_{key}")
    for flag, key in (("--wbn", "BN"), ("--wbk", "BK"), ("--wwarps", "num_warps"), ("--wstages", "num_stages")):
        ap.add_argument(flag, type=int, default=gk.WGRAD_CONFIG[key], dest=f"wg_{key}")
    args = ap.parse_args()
    gk.MM_CONFIG.update({k: getattr(args, f"mm_{k}") for k in gk.MM_CONFIG})
    gk.WGRAD_CONFIG.update({k: getattr(args, f"wg_{k}") for k in gk.WGRAD_CONFIG})
    print(f"{torch.cuda.get_device_name()}; grouped GEMM {gk.MM_CONFIG}; wgrad {gk.WGRAD_CONFIG}")
    for name, shape in SHAPES.items():
        if args.only in (None, name):
            bench_shape(name, *shape, args.iters, args.warmup, bf16w_only=args.bf16w_only)


if __name__ == "__main__":
    main()
