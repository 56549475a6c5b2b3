"""Pipeline bubble of 1F1B and DualPipeV, measured, beside the paper's formulas (DeepSeek-V3 Table 2).

    torchrun --nproc-per-node 2 bench/pipeline_bubble.py --out bench/results/pipeline_bubble_pp2.json
    torchrun --nproc-per-node 4 bench/pipeline_bubble.py --out bench/results/pipeline_bubble_pp4.json
    torchrun --nproc-per-node 2 bench/pipeline_bubble.py --device cpu --preset tiny --layers 4 \
        --seq-len 64 --micro-batch-size 2 --out /tmp/pp_smoke.json             # CPU / gloo smoke run

Model: the `small` preset's shapes (hidden 1024, 64 experts top-6 + 2 shared, MTP, 32K vocabulary) with
--layers main layers (default 16, so that 2, 4 and 8 stages split evenly), bf16 weights, no
optimizer step (the pipeline's forward/backward is what is timed). PP alone: world = PP ranks.

Measured, per rank (each rank times its own stages on its own device, median of --reps):
  F    forward of one micro-batch through the stage
  B    full backward of it (input and weight gradients)
  I    backward to the stage input only (torch.autograd.grad w.r.t. the input), W = B - I
  F&B  a forward of one micro-batch on one stage followed by the backward of another on the rank's
       other stage, i.e. one OVERLAP_F_B action of DualPipeV as torch runs it (sequentially, with PP
       alone; with --overlap through dsv3's threaded callback)
  step the schedule's step on n_micro micro-batches (median over --steps after one warm-up step)
  bubble (measured, per rank) = step - n_micro x sum over the rank's stages of (F + B)
Paper's formulas (in the table as ms, from the measured per-stage means):
  1F1B       (PP-1)(F+B)                    F, B of one stage (= one rank)
  DualPipeV  (PP/2-1)(F&B + B - 3W) with PP = number of stages = 2 x ranks, F, B, W per stage
             (DualPipe's chunk), i.e. (ranks-1)(F&B + B - 3W)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.distributed.mesh import init_distributed  # noqa: E402
from dsv3.distributed.pipeline import PipelineConfig, build_pipeline, forward_backward  # noqa: E402
from dsv3.training.loss import compute_loss  # noqa: E402
from dsv3.model.transformer import ModelOutput  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps: int) -> float:
    """median seconds of fn() over reps runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def stage_times(st, b, T, dev, dtype, balance_alpha, mtp_lambda, reps, gen):
    """F, B, I of one stage module on one micro-batch (seconds)."""
    cfg = st.config
    ids = torch.randint(0, cfg.vocab_size, (b, T + 1), device=dev, generator=gen)
    x_ids, y = ids[:, :-1], ids[:, 1:]
    st.with_balance, st.aux_alpha, st.aux_grad = balance_alpha > 0, balance_alpha, balance_alpha
    st.counts = None

    def inp():
        if st.is_first:
            return x_ids
        return (torch.randn(b, T, cfg.hidden_size, device=dev, dtype=dtype) * 0.5).requires_grad_(True)

    def fwd(x):
        out = st(x, ids=x_ids) if st.is_last else st(x)
        if st.is_last:
            logits, *mtp = out
            return compute_loss(ModelOutput(logits, list(mtp), None, None, None), y, mtp_lambda, 0.0).total
        return out

    def run_f():
        with torch.no_grad():
            fwd(inp())

    F = timed(run_f, dev, reps)
    state = {}

    def prep():
        x = inp()
        out = fwd(x)
        g = None if st.is_last else torch.randn_like(out)
        state.update(x=x, out=out, g=g)

    def full():
        out, g = state["out"], state["g"]
        torch.autograd.backward(out, g)

    def input_only():
        x, out, g = state["x"], state["out"], state["g"]
        if st.is_first:  # no input gradient: the first stage's backward is all weight gradient
            return
        torch.autograd.grad(out, x, g)

    def timed_after_prep(fn):
        ts = []
        for _ in range(reps + 1):
            prep()
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:])

    B = timed_after_prep(full)
    I = timed_after_prep(input_only) if not st.is_first else 0.0
    st.zero_grad(set_to_none=True)
    return F, B, I


def overlapped_fb(stages, b, T, dev, dtype, balance_alpha, mtp_lambda, reps, gen):
    """F&B of DualPipeV: forward on the rank's first stage of one micro-batch, then the backward on
    its second stage of another (as the default OVERLAP_F_B action runs them)."""
    lo, hi = stages
    cfg = lo.config
    ids = torch.randint(0, cfg.vocab_size, (b, T + 1), device=dev, generator=gen)

    def x_for(st):
        if st.is_first:
            return ids[:, :-1]
        return (torch.randn(b, T, cfg.hidden_size, device=dev, dtype=dtype) * 0.5).requires_grad_(True)

    def fwd(st, x):
        out = st(x, ids=ids[:, :-1]) if st.is_last else st(x)
        if st.is_last:
            logits, *mtp = out
            return compute_loss(ModelOutput(logits, list(mtp), None, None, None), ids[:, 1:], mtp_lambda, 0.0).total
        return out

    ts = []
    for _ in range(reps + 1):
        out_hi = fwd(hi, x_for(hi))
        g = None if hi.is_last else torch.randn_like(out_hi)
        x_lo = x_for(lo)
        sync(dev)
        t0 = time.perf_counter()
        fwd(lo, x_lo)
        torch.autograd.backward(out_hi, g)
        sync(dev)
        ts.append(time.perf_counter() - t0)
    lo.zero_grad(set_to_none=True)
    hi.zero_grad(set_to_none=True)
    return statistics.median(ts[1:])


def run(schedule: str, args, env, cfg, dtype) -> dict:
    P = env.world_size
    n_micro = args.n_micro or 4 * P
    pcfg = PipelineConfig(pp=P, schedule=schedule, n_microbatches=n_micro)
    model = dsv3.build_model(cfg, device=env.device, dtype=dtype, seed=0)
    ps = build_pipeline(model, pcfg, args.micro_batch_size, args.seq_len, overlap=args.overlap)
    del model
    g = torch.Generator(device=env.device).manual_seed(1 + env.rank)
    gb = torch.Generator(device=env.device).manual_seed(0)  # the same batch on every rank
    batch = torch.randint(0, cfg.vocab_size, (args.micro_batch_size * n_micro, args.seq_len + 1),
                          device=env.device, generator=gb)

    # per-stage F, B, I on this rank
    per_stage = {}
    for st in ps.stages:
        F, B, I = stage_times(st, args.micro_batch_size, args.seq_len, env.device, dtype, args.balance_alpha,
                              0.3, args.reps, g)
        per_stage[st.stage_index] = {"F": F, "B": B, "I": I, "W": B - I if not st.is_first else B}
    fb = None
    if schedule == "dualpipev":
        fb = overlapped_fb(ps.stages, args.micro_batch_size, args.seq_len, env.device, dtype, args.balance_alpha,
                           0.3, args.reps, g)

    # the schedule's step
    steps = []
    for i in range(args.steps + 1):
        sync(env.device)
        dist.barrier()
        t0 = time.perf_counter()
        forward_backward(ps, batch, mtp_lambda=0.3, balance_alpha=args.balance_alpha)
        sync(env.device)
        t = time.perf_counter() - t0
        ps.model_part.zero_grad(set_to_none=True)
        if i:
            steps.append(t)
    step_t = statistics.median(steps)
    compute = n_micro * sum(v["F"] + v["B"] for v in per_stage.values())
    mem = torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None
    local = {"rank": env.rank, "stages": per_stage, "fb": fb, "step": step_t, "compute": compute,
             "bubble": step_t - compute, "max_mem_gib": mem}
    gathered = [None] * P
    dist.all_gather_object(gathered, local)
    del ps
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)

    stages = {}
    for r in gathered:
        stages.update({int(k): v for k, v in r["stages"].items()})
    mean = {k: statistics.mean(s[k] for s in stages.values()) for k in ("F", "B", "I", "W")}
    step_max = max(r["step"] for r in gathered)
    if schedule == "1f1b":
        formula = (P - 1) * (mean["F"] + mean["B"])
        formula_txt = "(PP-1)(F+B)"
    else:
        fb_mean = statistics.mean(r["fb"] for r in gathered)
        formula = (P - 1) * (fb_mean + mean["B"] - 3 * mean["W"])
        formula_txt = "(PP/2-1)(F&B+B-3W), PP = 2 x ranks stages"
    return {"schedule": schedule, "ranks": P, "n_stages": pcfg.n_stages, "n_micro": n_micro,
            "layers_per_stage": [len(r) for r in pcfg.split(cfg.num_hidden_layers)],
            "step_s": step_max, "per_rank": gathered, "stage_mean": mean,
            "fb_mean": None if schedule == "1f1b" else fb_mean,
            "bubble_measured_s": [r["bubble"] for r in gathered], "bubble_formula_s": formula,
            "formula": formula_txt}


def table(results: list[dict]) -> str:
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    rows = ["| schedule | ranks | stages | micro-batches | step (ms) | F / B / W per stage (ms, mean) | F&B (ms) "
            "| compute per rank (ms) | bubble measured (ms, per rank) | bubble paper formula (ms) | bubble / step |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["stage_mean"]
        comp = "/".join(ms(x["compute"]) for x in r["per_rank"])
        bub = "/".join(ms(x) for x in r["bubble_measured_s"])
        frac = max(r["bubble_measured_s"]) / r["step_s"]
        rows.append(f"| {r['schedule']} | {r['ranks']} | {r['n_stages']} | {r['n_micro']} | {ms(r['step_s'])} | "
                    f"{ms(m['F'])} / {ms(m['B'])} / {ms(m['W'])} | {'-' if r['fb_mean'] is None else ms(r['fb_mean'])} "
                    f"| {comp} | {bub} | {ms(r['bubble_formula_s'])} = {r['formula']} | {frac:.1%} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--n-micro", type=int, default=0, help="micro-batches per step (0: 4 x ranks)")
    ap.add_argument("--schedules", default="1f1b,dualpipev")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--balance-alpha", type=float, default=1e-4)
    ap.add_argument("--overlap", action="store_true", help="DualPipeV: dsv3's threaded OVERLAP_F_B callback")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    env = init_distributed(args.device)
    if env.world_size < 2:
        raise SystemExit("run with torchrun --nproc-per-node P (P >= 2)")
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    if env.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // env.world_size))
    cfg = dsv3.preset(args.preset).replace(num_hidden_layers=args.layers)
    results = [run(s, args, env, cfg, dtype) for s in args.schedules.split(",")]
    if env.rank == 0:
        head = (f"{args.preset} shapes, {args.layers} layers, micro-batch {args.micro_batch_size} x {args.seq_len} "
                f"tokens, {str(dtype).replace('torch.', '')}, {env.world_size} x "
                f"{torch.cuda.get_device_name(env.device) if env.device.type == 'cuda' else 'CPU (gloo)'}, "
                f"torch {torch.__version__}")
        print(head)
        print(table(results))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"setup": head, "args": vars(args), "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
