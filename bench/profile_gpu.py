"""Where the time goes: phase timings and the top CUDA kernels of a training step and of a decode step.

    PYTHONPATH=. python bench/profile_gpu.py --train 671b-slice:bf16+compile,small:bf16+compile --decode 1,32

Training: the step of bench/train_speed.py split by CUDA events into forward, backward, grad clip and
optimizer step (medians over --steps), then one step under torch.profiler; kernels are grouped into
families (GEMM, grouped GEMM, attention, FP8 quantize, optimizer, elementwise/reduction (triton), copy, other).
Decode: the engine's graphs+compile path at each batch; wall time per step against the GPU time of the
kernels the profiler sees in that step (their difference is host time the GPU waits for).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.training.loss import compute_loss  # noqa: E402
from dsv3.training.optim import clip_and_step  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_speed import parse_variant, setup_dsv3, shapes  # noqa: E402


def family(name: str) -> str:
    n = name.lower()
    if "grouped" in n or "group_gemm" in n:
        return "grouped GEMM"
    if "fmha" in n or "flash" in n or "attention" in n or "cudnn" in n or "sdpa" in n:
        return "attention"
    if "quant" in n or "fp8" in n:
        return "fp8 quantize"
    if "adam" in n or "foreach" in n or "multi_tensor" in n:
        return "optimizer (foreach/fused)"
    if "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n or "gemv" in n or "matmul" in n:
        return "GEMM"
    if n.startswith("triton"):
        return "triton (fused elementwise/reduction)"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copy/memset"
    if "scatter" in n or "gather" in n or "index" in n or "sort" in n or "radix" in n or "cumsum" in n or "scan" in n:
        return "index/sort/scatter"
    if "elementwise" in n or "reduce" in n or "vectorized" in n:
        return "aten elementwise/reduce"
    return "other"


def summarize(prof, n_steps: int, top: int = 25) -> None:
    fam = defaultdict(float)
    per = defaultdict(lambda: [0.0, 0])
    n_kernels = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time
        fam[family(e.name)] += us
        per[e.name][0] += us
        per[e.name][1] += 1
        n_kernels += 1
    tot = sum(fam.values())
    print(f"  GPU kernel time per step {tot / n_steps / 1e3:.2f} ms, {n_kernels / n_steps:.0f} kernels per step")
    for k, v in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"    {k:40s} {v / n_steps / 1e3:8.2f} ms  {v / tot:6.1%}")
    print("  top kernels:")
    for name, (us, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {us / n_steps / 1e3:8.3f} ms  x{c // n_steps:<5d} {name[:140]}")


def train(shape: str, variant: str, steps: int) -> None:
    cfg, B, T = shapes(4)[shape]
    kw = parse_variant(variant)  # the same model and optimizer as bench/train_speed.py's row of this variant
    model, opt = setup_dsv3(cfg, **kw)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    phases = defaultdict(list)

    def step(record: bool):
        ev[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1])
        loss = compute_loss(out, x[:, 1:], 0.3, compiled=kw["compile_blocks"]).total
        ev[1].record()
        loss.backward()
        ev[2].record()
        clip_and_step(opt, 1.0)  # clip folded into the fused AdamW kernel (dsv3/training/optim.py)
        opt.zero_grad(set_to_none=True)
        ev[3].record()
        torch.cuda.synchronize()
        if record:
            for i, k in enumerate(["forward", "backward", "clip+optimizer"]):
                phases[k].append(ev[i].elapsed_time(ev[i + 1]))

    for i in range(3 + steps):
        step(i >= 3)
    print(f"\n## train {shape} {variant} ({B}x{T})")
    tot = 0.0
    for k, v in phases.items():
        m = statistics.median(v)
        tot += m
        print(f"  {k:10s} {m:8.2f} ms")
    print(f"  {'total':10s} {tot:8.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(False)
    summarize(prof, 1)
    del model, opt
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def decode(batches: list[int], preset: str, fp8: bool = False, dense_gemv: bool = False,
           head_gemv: bool = False, latent_store: bool = False, moe_gemm: bool = False) -> None:
    from dsv3 import kernels
    from dsv3.inference.engine import Engine, SamplingParams

    kernels.set_dense_gemv(dense_gemv)  # the dense linears through the decode GEMV (dense_gemv_triton.py) or cuBLAS
    kernels.set_head_gemv(head_gemv)  # absorbed MLA's per-head products through head_gemv_triton.py or the einsums
    kernels.set_latent_store(latent_store)  # the latents' norm + RoPE + cache write in one kernel or four
    kernels.set_moe_gemm(moe_gemm)  # the routed experts of larger batches: the grouped decode GEMM or _grouped_mm
    cfg = dsv3.preset(preset).replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = dsv3.build_model(cfg, device="cuda", dtype=torch.bfloat16)  # experts "auto": as the engine serves
    if fp8:
        from dsv3.checkpoints.hf import quantize_model_fp8
        quantize_model_fp8(model)
    g = torch.Generator().manual_seed(0)
    for B in batches:
        prompts = [torch.randint(0, cfg.vocab_size, (128,), generator=g).tolist() for _ in range(B)]
        eng = Engine(model, None, max_batch_size=B, cache_tokens=B * 256, cuda_graphs=True, compile_decode=True)
        sp = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
        eng.generate(prompts, sp)
        for r in prompts:
            eng.add_request(r, sp)
        eng.step()
        for _ in range(8):
            eng.step()
        torch.cuda.synchronize()
        n = 20
        t = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                eng.step()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n
        print(f"\n## decode {preset}{' fp8' if fp8 else ''}{' dense-gemv' if dense_gemv else ''}"
              f"{' head-gemv' if head_gemv else ''}{' latent-store' if latent_store else ''}"
              f"{' moe-gemm' if moe_gemm else ''} batch {B} "
              f"(graphs+compile): wall {wall * 1e3:.2f} ms/step (under the profiler)")
        summarize(prof, n, top=30)
        while eng.has_unfinished():
            eng.step()
        del eng
    del model
    kernels.set_dense_gemv(False)
    kernels.set_head_gemv(False)
    kernels.set_latent_store(False)
    kernels.set_moe_gemm(False)
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default="", help="comma list of shape:variant (variant tags as bench/train_speed.py)")
    ap.add_argument("--decode", default="", help="comma list of batch sizes")
    ap.add_argument("--decode-fp8", action="store_true")
    ap.add_argument("--dense-gemv", action="store_true", help="decode with kernels.set_dense_gemv(True): the dense "
                    "bf16 linears through the Triton decode GEMV instead of cuBLAS")
    ap.add_argument("--head-gemv", action="store_true", help="decode with kernels.set_head_gemv(True): absorbed MLA's "
                    "W_UK / W_UV products through the Triton per-head GEMV instead of the einsums")
    ap.add_argument("--latent-store", action="store_true", help="decode with kernels.set_latent_store(True): the "
                    "latents' RMSNorm + RoPE + cache write as one Triton kernel")
    ap.add_argument("--moe-gemm", action="store_true", help="decode with kernels.set_moe_gemm(True): the routed "
                    "experts of batches above one pair per expert through the grouped decode GEMM")
    ap.add_argument("--all-decode-kernels", action="store_true", help="--dense-gemv --head-gemv --latent-store "
                    "--moe-gemm")
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for item in filter(None, args.train.split(",")):
        shape, variant = item.split(":")
        train(shape, variant, args.steps)
    if args.decode:
        every = args.all_decode_kernels
        decode([int(b) for b in args.decode.split(",")], args.preset, args.decode_fp8, args.dense_gemv or every,
               args.head_gemv or every, args.latent_store or every, args.moe_gemm or every)


if __name__ == "__main__":
    main()
