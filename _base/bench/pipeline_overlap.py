"""How much expert-parallel communication DualPipeV's F&B overlap hides: PP × EP, overlap on vs off.

    torchrun --nproc-per-node 4 bench/pipeline_overlap.py --out bench/results/pipeline_overlap_pp2xep2.json
    torchrun --nproc-per-node 4 bench/pipeline_overlap.py --device cpu --preset tiny --layers 4 \
        --seq-len 32 --micro-batch-size 1 --steps 2 --out /tmp/overlap_smoke.json     # CPU / gloo smoke

Layout: world = pp × ep (default pp = 2, ep = 2: 4 ranks, mesh ("pp", "ep")), schedule DualPipeV
(2·pp stages in a V), each stage's routed experts split over its ep ranks (all-to-all dispatch),
each ep rank reading its own rows of every micro-batch. Model: the `small` preset's shapes (hidden
1024, 64 experts top-6 + 2 shared, MTP, 32K vocabulary) with --layers main layers, bf16 weights;
the pipeline's forward/backward is what is timed (no optimizer step). Run twice on the same model and
batch: overlap off (torch's OVERLAP_F_B: forward then backward, each all-to-all waited at once) and
on (dsv3's threaded callback: the forward and backward threads pass a baton at every all-to-all,
which is issued async, so it is in flight while the other micro-batch's compute is queued/runs).

Measured per rank (median over --steps after --warmup steps):
  step      the schedule's step (max over ranks in the table)
  exposed   the time the compute stood still waiting for the EP all-to-alls per step, summed over
            the counts, dispatch and combine exchanges of forward (F) and backward (B): CUDA events on
            the compute stream right before and after each `work.wait()` (on the CPU: host seconds in
            the wait). Without overlap it is the all-to-all time itself (nothing runs meanwhile).
  host      host seconds in the split sizes' `.tolist()` (it also waits for the queued compute)
  hidden    exposed(off) - exposed(on): communication that ran under the other micro-batch's compute
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
from dsv3.distributed.expert_parallel import CommTimer  # noqa: E402
from dsv3.distributed.mesh import init_distributed  # noqa: E402
from dsv3.distributed.pipeline import PipelineConfig, build_pipeline, forward_backward  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(overlap: bool, args, env, cfg, dtype) -> dict:
    pcfg = PipelineConfig(pp=args.pp, ep=args.ep, schedule="dualpipev", n_microbatches=args.n_micro or 4 * args.pp)
    model = dsv3.build_model(cfg, device=env.device, dtype=dtype, seed=0)
    ps = build_pipeline(model, pcfg, args.micro_batch_size, args.seq_len, overlap=overlap)
    del model
    timer = CommTimer()
    for d in ps.dispatchers:
        d.timer = timer
    gb = torch.Generator(device=env.device).manual_seed(0)  # the same global batch on every rank
    B = args.micro_batch_size * pcfg.n_microbatches * pcfg.ep
    batch = torch.randint(0, cfg.vocab_size, (B, args.seq_len + 1), device=env.device, generator=gb)
    steps, comm = [], []
    for i in range(args.warmup + args.steps):
        sync(env.device)
        dist.barrier()
        timer.collect()
        t0 = time.perf_counter()
        forward_backward(ps, batch, mtp_lambda=0.3, balance_alpha=args.balance_alpha)
        sync(env.device)
        t = time.perf_counter() - t0
        c = timer.collect()
        ps.model_part.zero_grad(set_to_none=True)
        if i >= args.warmup:
            steps.append(t)
            comm.append(c)
    kinds = sorted({k for c in comm for k in c})
    med = {k: statistics.median(c.get(k, 0.0) for c in comm) for k in kinds}
    wait = statistics.median(sum(v for k, v in c.items() if not k.endswith("host")) for c in comm)
    host = statistics.median(sum(v for k, v in c.items() if k.endswith("host")) for c in comm)
    mem = torch.cuda.max_memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None
    local = {"rank": env.rank, "step": statistics.median(steps), "exposed": wait, "host": host, "by_kind": med,
             "handoffs": (ps.coordinator.handoffs if ps.coordinator else 0) / (args.warmup + args.steps), "max_mem_gib": mem}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, local)
    del ps
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
    return {"overlap": overlap, "n_micro": pcfg.n_microbatches, "n_stages": pcfg.n_stages, "global_batch": B,
            "step_s": max(r["step"] for r in gathered), "per_rank": gathered}


def table(off: dict, on: dict) -> str:
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    rows = ["| overlap | step (ms, slowest rank) | exposed all-to-all wait (ms/step, per rank) | mean | "
            "split-size host sync (ms/step, mean) | baton passes/step (rank 0) |",
            "|---|---|---|---|---|---|"]
    for r in (off, on):
        per = r["per_rank"]
        rows.append(f"| {'on' if r['overlap'] else 'off'} | {ms(r['step_s'])} | "
                    f"{' / '.join(ms(x['exposed']) for x in per)} | {ms(statistics.mean(x['exposed'] for x in per))} | "
                    f"{ms(statistics.mean(x['host'] for x in per))} | {per[0]['handoffs']:.0f} |")
    e_off = statistics.mean(x["exposed"] for x in off["per_rank"])
    e_on = statistics.mean(x["exposed"] for x in on["per_rank"])
    rows.append("")
    rows.append(f"hidden: {ms(e_off - e_on)} ms/step of {ms(e_off)} ms exposed without overlap "
                f"({(e_off - e_on) / e_off if e_off else 0:.0%}); step {ms(off['step_s'])} -> {ms(on['step_s'])} ms "
                f"({on['step_s'] / off['step_s'] - 1:+.1%})")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=2, help="rows per micro-batch on one rank")
    ap.add_argument("--n-micro", type=int, default=0, help="micro-batches per step (0: 4 x pp)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--balance-alpha", type=float, default=1e-4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    env = init_distributed(args.device)
    if env.world_size != args.pp * args.ep:
        raise SystemExit(f"run with torchrun --nproc-per-node {args.pp * args.ep} (pp x ep)")
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    if env.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // env.world_size))
    cfg = dsv3.preset(args.preset).replace(num_hidden_layers=args.layers)
    off = run(False, args, env, cfg, dtype)
    on = run(True, args, env, cfg, dtype)
    if env.rank == 0:
        head = (f"{args.preset} shapes, {args.layers} layers, DualPipeV pp {args.pp} x ep {args.ep}, "
                f"{off['n_micro']} micro-batches of {args.ep} x {args.micro_batch_size} x {args.seq_len} tokens, "
                f"{str(dtype).replace('torch.', '')}, {env.world_size} x "
                f"{torch.cuda.get_device_name(env.device) if env.device.type == 'cuda' else 'CPU (gloo)'}, "
                f"torch {torch.__version__}")
        print(head)
        print(table(off, on))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"setup": head, "args": vars(args), "off": off, "on": on}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
