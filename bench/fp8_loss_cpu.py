"""FP8 vs fp32 training loss on the CPU (emulate backend), with ablations that locate where FP8 hurts.

The same kind of run as bench/fp8_loss.py (Markov-chain data, warm-up + cosine lr, grad clip 1.0,
MTP loss 0.3) on a small model (hidden 256, 2 layers: 1 dense + 1 MoE, fp32 master weights, no
autocast), small enough for ~1-2 min a run on 2 cores:

    PYTHONPATH=. python bench/fp8_loss_cpu.py                         # all modes below
    PYTHONPATH=. python bench/fp8_loss_cpu.py --modes fp32 fp8 fp8_floor
    PYTHONPATH=. python bench/fp8_loss_cpu.py --threads 1 --hidden 512 --batch 4 --bf16 --modes fp32 fp8

--bf16: bf16 autocast on the CPU as the GPU bench (x and dY reach the FP8 GEMMs in bf16; "fp32" is then
the bf16 baseline). --small-preset: the attention / MLP shapes of the `small` preset at --hidden/--layers.
Measured (hidden 512, 2 layers, 4x128 tokens, 300 steps, 1 thread): fp32 1.5702 vs fp8 1.5693 (-0.05%);
bf16 autocast 1.5715 vs fp8 1.5692 (-0.15%): no emulation gap at K = 512 with bf16 inputs.

Modes (each FP8 mode quantises exactly the Linears `convert_to_fp8_training` swaps):
    fp32          plain fp32
    fp32_seed1    fp32 with init seed 1: the run-to-run noise the FP8 gap is judged against
    fp8           dsv3/training/fp8.py as it is (emulate backend)
    fp8_floor     all three GEMMs in FP8 with the *old* gradient quantisation: 1x128 scales
                  max(amax, 1e-4)/448 applied to dY as to activations (the bug: dY tiles are ~1e-9..1e-4)
    fprop         only fprop in FP8 (dgrad, wgrad exact fp32)
    dgrad         only dgrad in FP8 (paper recipe, no floor on dY's scales)
    wgrad         only wgrad in FP8 (paper recipe: dYᵀ and Xᵀ 1x128 along tokens, Xᵀ requantised
                  from the FP8 X of the forward)
    wgrad_noreq   only wgrad, Xᵀ quantised from the original fp32 X (no double quantisation)
    dgrad_floor, wgrad_floor   as dgrad / wgrad with the old 1e-4 floor on dY
    fp8_floor:EPS as fp8_floor with the floor EPS instead of 1e-4: this model's dY tiles are ~8-30x
                  larger than those of the GPU bench (1/512 vs 1/4096 per token, 2 vs 12 layers), so
                  e.g. fp8_floor:1e-3 is the old floor at the GPU's gradient magnitudes
The "paper" modes quantise dY with no scale floor (eps 1e-30): byte-equal to the fixed fp8.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv3  # noqa: E402
from dsv3.kernels import act_dequant, act_quant, reference, weight_dequant, weight_quant  # noqa: E402
from dsv3.training import fp8 as F8  # noqa: E402
from dsv3.training.loss import compute_loss  # noqa: E402
from dsv3.training.optim import make_optimizer  # noqa: E402
from fp8_loss import batches  # noqa: E402  (the Markov-chain generator of the GPU bench)

NO_FLOOR = 1e-30

# name: (fprop, dgrad, wgrad, requant X for wgrad, eps of dY's scales)
RECIPES = {
    "fp8_floor": (True, True, True, True, 1e-4),
    "fprop": (True, False, False, True, NO_FLOOR),
    "dgrad": (False, True, False, True, NO_FLOOR),
    "wgrad": (False, False, True, True, NO_FLOOR),
    "wgrad_noreq": (False, False, True, False, NO_FLOOR),
    "dgrad_floor": (False, True, False, True, 1e-4),
    "wgrad_floor": (False, False, True, True, 1e-4),
    "fp8_paper": (True, True, True, True, NO_FLOOR),
}
ALL = ["fp32", "fp32_seed1", "fp8", "fp8_floor", "fprop", "dgrad", "wgrad", "wgrad_noreq"]


def _qa(t, eps=1e-4):
    return act_dequant(*act_quant(t, eps=eps))


def patch(recipe):
    """Replace the emulate backend's GEMMs (the kernels' reference) by the ablation `recipe`; returns an
    undo function."""
    fq, dq, wq, requant, eps = recipe
    f0, b0 = reference.fp8_gemm_fwd_ref, reference.fp8_gemm_bwd_ref

    def fwd(x2, w, out_dtype, recompute_w=False):  # (recompute_w: the weight is kept as it is here anyway)
        xf, wf = x2.float(), w.float()
        xd = _qa(xf) if (fq or (wq and requant)) else xf
        wd = weight_dequant(*weight_quant(wf), torch.float32)
        y = (xd if fq else xf) @ (wd if fq else wf).T
        return y.to(out_dtype), (xf, xd, wf, wd)

    def bwd(g2, saved, x_dtype, w_dtype, need_dx, need_dw):
        xf, xd, wf, wd = saved
        g = g2.float()
        dx = dw = None
        if need_dx:
            dx = ((_qa(g, eps) @ wd) if dq else (g @ wf)).to(x_dtype)
        if need_dw:
            if wq:
                xsrc = xd if requant else xf
                dw = _qa(g.t().contiguous(), eps) @ _qa(xsrc.t().contiguous()).T
            else:
                dw = g.t() @ xf
            dw = dw.to(w_dtype)
        return dx, dw

    reference.fp8_gemm_fwd_ref, reference.fp8_gemm_bwd_ref = fwd, bwd

    def undo():
        reference.fp8_gemm_fwd_ref, reference.fp8_gemm_bwd_ref = f0, b0
    return undo


def small_cfg(hidden=256, layers=2, vocab=1024, heads=None, small_preset=False):
    """small_preset: the attention / MLP shapes of the GPU bench's `small` preset (q_lora 384, kv_lora 256,
    head dims 64/32/64, 16 heads, intermediate 4x hidden) at `hidden` and `layers`."""
    cfg = dsv3.preset("small" if small_preset else "tiny")
    cfg.vocab_size = vocab
    cfg.hidden_size = hidden
    cfg.num_hidden_layers = layers
    cfg.intermediate_size = (4 if small_preset else 2) * hidden
    cfg.moe_intermediate_size = 384 if small_preset else 128
    cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group = 8, 2, 4, 2
    cfg.max_position_embeddings = 512
    if heads:
        cfg.num_attention_heads = cfg.num_key_value_heads = heads
    return cfg


def run(cfg, mode, data, lr, seed=0, bf16=False):
    torch.manual_seed(seed)
    model = dsv3.build_model(cfg, device="cpu", dtype=torch.float32, seed=seed)
    undo = None
    if mode not in ("fp32", "fp32_seed1"):
        F8.convert_to_fp8_training(model, "emulate")
        if mode in RECIPES:
            undo = patch(RECIPES[mode])
        elif mode.startswith("fp8_floor:"):
            undo = patch((True, True, True, True, float(mode.split(":")[1])))
    opt = make_optimizer(model, lr)
    losses = []
    n = len(data)
    t0 = time.perf_counter()
    try:
        for i, x in enumerate(data):
            f = min(1.0, (i + 1) / 20)
            if i >= 20:
                f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 20) / max(1, n - 20)))
            for group in opt.param_groups:
                group["lr"] = lr * f
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x[:, :-1])
            loss = compute_loss(out, x[:, 1:], 0.3)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.main.item())
    finally:
        if undo:
            undo()
    return losses, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=ALL, help=f"of {['fp32', 'fp32_seed1', 'fp8', *RECIPES]}")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU, as the GPU bench (x, dY in bf16)")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--small-preset", action="store_true", help="attention/MLP shapes of the `small` preset")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = small_cfg(args.hidden, args.layers, args.vocab, args.heads, args.small_preset)
    data = list(batches(args.steps, args.batch, args.seq, args.vocab))
    every = max(10, args.steps // 15)
    res = {}
    for mode in args.modes:
        res[mode], dt = run(cfg, mode, data, args.lr, seed=1 if mode == "fp32_seed1" else 0,
                                bf16=args.bf16)
        end = sum(res[mode][-20:]) / 20
        rel = f" ({(end - sum(res['fp32'][-20:]) / 20) / (sum(res['fp32'][-20:]) / 20):+.2%} vs fp32)" if "fp32" in res else ""
        print(f"{mode:12s} {dt:5.0f}s  last-20 mean {end:.4f}{rel}  every {every}: "
              + " ".join(f"{v:.2f}" for v in res[mode][every - 1::every]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), **res}, f)


if __name__ == "__main__":
    main()
