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
    spans = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        spans.append((e.time_range.start, e.time_range.end))
        us = e.device_time
        fam[family(e.name)] += us
        per[e.name][0] += us
        per[e.name][1] += 1
        n_kernels += 1
    tot = sum(fam.values())
    # the device's busy time: the union of the kernels' intervals (kernels launched with PDL overlap the one before,
    # so the sum of their times counts the overlap twice); first start to last end less this is the device's idle time
    busy, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0
    print(f"  GPU kernel time per step {tot / n_steps / 1e3:.2f} ms, {n_kernels / n_steps:.0f} kernels per step, "
          f"device busy {busy / n_steps / 1e3:.3f} ms a step (idle {(span - busy) / n_steps / 1e3:.3f})")
    for k, v in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"    {k:40s} {v / n_steps / 1e3:8.2f} ms  {v / tot:6.1%}")
    print("  top kernels:")
    for name, (us, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {us / n_steps / 1e3:8.3f} ms  x{c // n_steps:<5d} {name[:140]}")


def train(shape: str, variant: str, steps: int, top: int = 25) -> None:
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
    summarize(prof, 1, top=top)
    del model, opt
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def sequence(prof, n_steps: int, count: int) -> None:
    """The first `count` kernels of one profiled step (the middle one) in launch order, with each one's GPU time and
    the gap since the one before ended: what one layer's launches cost one by one (the totals above mix the layers
    and the kernels that share a name)."""
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    per_step = len(evs) // max(n_steps, 1)
    step = evs[(n_steps // 2) * per_step:(n_steps // 2 + 1) * per_step]
    print(f"  one step's first {min(count, len(step))} of {len(step)} kernels in order (us: GPU time, gap before):")
    end = None
    for e in step[:count]:
        gap = "" if end is None else f"{e.time_range.start - end:7.2f}"
        print(f"    {e.device_time:8.2f} {gap:>7}  {e.name[:110]}")
        end = e.time_range.end


def decode(batches: list[int], preset: str, fp8: bool = False, switches: dict[str, bool] | None = None,
           show_sequence: int = 0, spec: int = 0, rows: int = 0) -> None:
    """switches: the switched decode kernels and launch options (backend.py SWITCHED: dense_gemv, head_gemv,
    latent_store, moe_gemm, pdl) to set for the run, restored after; None: the shipped defaults. spec: the engine's
    speculative_k (the model keeps one MTP module; random weights reject most drafts, but a round's kernels are the
    same whatever it accepts: a step is one round). rows: if > 0, the row limits of the one-row decode kernels
    (backend.py DENSE_GEMV_ROWS, MLA_UV_ROWS) for the run, restored after: e.g. k + 1 lets a verification step of one
    sequence take them."""
    from dsv3.inference.engine import Engine, SamplingParams
    from dsv3.kernels import backend as kb

    shipped = dict(kb.SWITCHED)
    for op, on in (switches or {}).items():
        kb.switch(op, on)
    limits = {name: getattr(kb, name) for name in ("DENSE_GEMV_ROWS", "MLA_UV_ROWS")}
    for name in limits if rows else ():
        setattr(kb, name, rows)
    cfg = dsv3.preset(preset).replace(num_nextn_predict_layers=1 if spec else 0)
    torch.manual_seed(0)
    model = dsv3.build_model(cfg, device="cuda", dtype=torch.bfloat16)  # experts "auto": as the engine serves
    if fp8:
        from dsv3.checkpoints.hf import quantize_model_fp8
        quantize_model_fp8(model)
    g = torch.Generator().manual_seed(0)
    for B in batches:
        prompts = [torch.randint(0, cfg.vocab_size, (128,), generator=g).tolist() for _ in range(B)]
        eng = Engine(model, None, max_batch_size=B, cache_tokens=B * 256, cuda_graphs=True, compile_decode=True,
                     speculative_k=spec)
        sp = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
        eng.generate(prompts, sp)
        n = 20

        def start(eng) -> None:
            """The requests again, through their prefill and 8 decode steps (9 + n steps of the 64-token requests:
            they still run after the n timed ones)."""
            for r in prompts:
                eng.add_request(r, sp)
            for _ in range(9):
                eng.step()
            torch.cuda.synchronize()

        waited = [0.0]

        def timed(eng) -> float:  # seconds a step over n steps; waited[0]: of them, seconds a step in Event.synchronize
            sync = torch.cuda.Event.synchronize

            def timed_sync(ev) -> None:
                t0 = time.perf_counter()
                sync(ev)
                waited[0] += time.perf_counter() - t0

            torch.cuda.Event.synchronize, waited[0] = timed_sync, 0.0
            try:
                t = time.perf_counter()
                for _ in range(n):
                    eng.step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t) / n
            finally:
                torch.cuda.Event.synchronize = sync
            waited[0] /= n
            return wall

        start(eng)
        plain = timed(eng)  # alone first
        # the host's own time a step (the wall less its waits for the device): near the wall, the step is host-bound
        host = plain - waited[0]
        while eng.has_unfinished():
            eng.step()
        start(eng)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            wall = timed(eng)
        on = ",".join(op for op, v in kb.SWITCHED.items() if v) or "none"
        print(f"\n## decode {preset}{' fp8' if fp8 else ''} batch {B}{f' speculative_k {spec}' if spec else ''}, "
              f"switched kernels on: {on}{f', row limits {rows}' if rows else ''}, "
              f"wall {plain * 1e3:.3f} ms/step without the profiler (host {host * 1e3:.3f}, waiting on the device "
              f"{(plain - host) * 1e3:.3f}) "
              f"(graphs+compile): wall {wall * 1e3:.2f} ms/step (under the profiler)")
        summarize(prof, n, top=30)
        if show_sequence:
            sequence(prof, n, show_sequence)
        while eng.has_unfinished():
            eng.step()
        del eng
    del model
    for op, on in shipped.items():
        kb.switch(op, on)
    for name, v in limits.items():
        setattr(kb, name, v)
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def decode_switches(spec: str) -> dict[str, bool] | None:
    """--decode-kernels -> the switches to set (None: the shipped defaults)."""
    from dsv3.kernels import backend as kb

    if not spec:
        return None
    names = set(kb.SWITCHED) if spec == "all" else set() if spec == "none" else set(spec.split(","))
    if names - set(kb.SWITCHED):
        raise SystemExit(f"--decode-kernels: unknown {sorted(names - set(kb.SWITCHED))}; one of {sorted(kb.SWITCHED)}, "
                         "'all' or 'none'")
    return {op: op in names for op in kb.SWITCHED}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default="", help="comma list of shape:variant (variant tags as bench/train_speed.py)")
    ap.add_argument("--decode", default="", help="comma list of batch sizes")
    ap.add_argument("--decode-fp8", action="store_true")
    ap.add_argument("--decode-kernels", default="", help="the switched decode kernels for --decode (backend.py "
                    "SWITCHED): empty for the shipped defaults, 'none' for all off, 'all' for all on, or a comma list "
                    "of the ones to run (dense_gemv, head_gemv, latent_store, moe_gemm, pdl; the others "
                    "off)")
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--sequence", type=int, default=0, help="--decode: also list the first N kernels of one step "
                    "in launch order, each with its GPU time")
    ap.add_argument("--spec", type=int, default=0, help="--decode: the engine's speculative_k (a step is a round)")
    ap.add_argument("--rows", type=int, default=0, help="--decode: the one-row decode kernels' row limits "
                    "(DENSE_GEMV_ROWS, MLA_UV_ROWS; 0: as shipped)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="--train: how many kernels to list")
    args = ap.parse_args()
    if args.spec < 0 or args.rows < 0:
        ap.error(f"--spec and --rows must be >= 0, got {args.spec} and {args.rows}")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for item in filter(None, args.train.split(",")):
        shape, variant = item.split(":")
        train(shape, variant, args.steps, args.top)
    if args.decode:
        decode([int(b) for b in args.decode.split(",")], args.preset, args.decode_fp8,
               decode_switches(args.decode_kernels), args.sequence, args.spec, args.rows)


if __name__ == "__main__":
    main()
