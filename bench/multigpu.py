"""Multi-GPU training throughput (dp FSDP vs expert parallelism) and the all-to-all bandwidth of the
MoE dispatch, measured inside real training steps and beside a micro-benchmark of the same messages.

    torchrun --nproc-per-node N bench/multigpu.py --preset small --out bench/results/multigpu_N.json
    torchrun --nproc-per-node N bench/multigpu.py --preset 16b --layers 4 --out ...   # a 16b-shaped cut
    torchrun --nproc-per-node 2 bench/multigpu.py --device cpu --preset tiny --seq-len 64 --steps 2  # gloo smoke

Layouts (N ranks): "fsdp" = ParallelConfig(dp_shard=N, ep=1) (experts FSDP-sharded along the expert
dimension, no all-to-all), "ep" = ParallelConfig(dp_shard=1, ep=N) (each rank holds E/N experts, tokens
travel by all_to_all_single; non-expert parameters FSDP-sharded over all ranks). With N = 1 only
"single" runs (the same train_step, no communication).

Per layout: every rank builds the model (seed 0), `parallelize`, AdamW; random tokens, --batch-per-gpu
sequences of --seq-len per rank and step; bf16 autocast on CUDA, fp32 master weights (the `dsv3 train`
step: train_step with clip 1.0, bias update, MTP, balance loss). --warmup steps, then --steps timed
steps; tokens/s = N x batch x seq_len x steps / wall time (cuda synchronised), with peak memory per rank.

All-to-all in the step: `dist.all_to_all_single` is wrapped while timing steps; every row exchange of the
dispatcher (forward dispatch and combine, and their backward) records its bytes sent by this rank
(all rows, its own chunk included) and its time between CUDA events around the call on the current
stream (so it includes waiting for the slowest rank, as in training). Achieved bandwidth = bytes /
time per rank, "bus bandwidth" x (N-1)/N as nccl-tests define it for alltoall. The micro-benchmark
replays exactly the recorded calls (same split sizes, same dtype and row width) back to back, and a
uniform all_to_all_single of the mean message size, --a2a-iters times each.
Writes JSON to --out and prints a markdown table (rank 0).
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
from dsv3.distributed import ParallelConfig, build_mesh, init_distributed, parallelize  # noqa: E402
from dsv3.training.optim import make_optimizer  # noqa: E402
from dsv3.distributed import expert_parallel, train_step  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class A2ARecorder:
    """Wraps dist.all_to_all_single; records (bytes sent, splits, row shape, dtype, start/end) of row
    exchanges (calls with split sizes, i.e. not the per-expert counts exchange)."""

    def __init__(self, dev):
        self.dev, self.calls, self.on = dev, [], False
        self.real = dist.all_to_all_single

    def __enter__(self):
        rec = self

        def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            if not rec.on or output_split_sizes is None:
                return rec.real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            if rec.dev.type == "cuda":
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                r = rec.real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
                t1.record()
            else:
                t0 = time.perf_counter()
                r = rec.real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
                t1 = time.perf_counter()
            rec.calls.append({"bytes": input.numel() * input.element_size(), "in": list(input_split_sizes),
                              "out": list(output_split_sizes), "row": list(input.shape[1:]), "dtype": input.dtype,
                              "t": (t0, t1), "group": group})
            return r

        dist.all_to_all_single = wrapped  # the dispatcher calls it through torch.distributed
        assert expert_parallel.dist.all_to_all_single is wrapped
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.real

    def seconds(self, call) -> float:
        t0, t1 = call["t"]
        return t0.elapsed_time(t1) / 1e3 if self.dev.type == "cuda" else t1 - t0


def micro_a2a(calls, dev, iters: int) -> dict:
    """Replay the recorded calls (same splits) back to back, then a uniform exchange of the mean size."""
    def run(fn):
        fn()
        sync(dev)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(dev)
        return (time.perf_counter() - t) / iters

    big = {}  # one send and one receive buffer per (row shape, dtype), as large as the largest call
    for c in calls:
        k = (tuple(c["row"]), c["dtype"])
        big[k] = max(big.get(k, 0), sum(c["in"]), sum(c["out"]))
    big = {k: (torch.empty(n, *k[0], dtype=k[1], device=dev), torch.empty(n, *k[0], dtype=k[1], device=dev))
           for k, n in big.items()}

    def replay():
        for c in calls:
            x, y = big[(tuple(c["row"]), c["dtype"])]
            dist.all_to_all_single(y[:sum(c["out"])], x[:sum(c["in"])], c["out"], c["in"], group=c["group"])

    total = sum(c["bytes"] for c in calls)
    t_replay = run(replay)
    n = len(calls)
    g = calls[0]["group"]
    R = dist.get_world_size(g)
    mean = torch.tensor([float(total)], dtype=torch.float64, device=dev)
    dist.all_reduce(mean, group=g)  # the same uniform message on every rank: the mean over ranks
    per = max(int(mean.item() / R) // n // R // 2, 1)  # bf16 elements per destination rank
    x = torch.empty(per * R, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    t_uni = run(lambda: [dist.all_to_all_single(y, x, group=g) for _ in range(n)])
    return {"replay_s": t_replay, "replay_GBps": total / t_replay / 1e9,
            "uniform_s": t_uni, "uniform_GBps": n * x.numel() * 2 / t_uni / 1e9}


def bench_layout(name, pcfg, cfg, env, args) -> dict:
    dev = env.device
    model = dsv3.build_model(cfg, device=dev, dtype=torch.float32, seed=0)
    ps = parallelize(model, pcfg, build_mesh(pcfg, dev.type))
    opt = make_optimizer(model, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1000 + env.rank)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch_per_gpu, args.seq_len + 1), generator=g).to(dev)
               for _ in range(4)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else None
    hp = dict(mtp_lambda=0.3, balance_alpha=1e-4, gamma=1e-3, grad_clip=1.0, autocast=autocast)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(args.warmup):
        train_step(model, opt, [batches[i % 4]], ps, **hp)
    sync(dev)
    dist.barrier()
    t = time.perf_counter()
    losses = []
    for i in range(args.steps):
        losses.append(train_step(model, opt, [batches[i % 4]], ps, **hp)["loss"])
    sync(dev)
    wall = time.perf_counter() - t
    tok_s = env.world_size * args.batch_per_gpu * args.seq_len * args.steps / wall
    res = {"layout": name, "dp_shard": pcfg.dp_shard, "ep": pcfg.ep, "tokens_per_s": tok_s,
           "step_s": wall / args.steps, "loss_last": losses[-1],
           "peak_mem_GiB": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
    if pcfg.ep > 1:  # one more step, recorded
        with A2ARecorder(dev) as rec:
            rec.on = True
            sync(dev)
            t = time.perf_counter()
            train_step(model, opt, [batches[0]], ps, **hp)
            sync(dev)
            step_s = time.perf_counter() - t
            rec.on = False
        calls = rec.calls
        sec = [rec.seconds(c) for c in calls]
        total_b, total_s = sum(c["bytes"] for c in calls), sum(sec)
        R = pcfg.ep
        res["a2a"] = {"calls_per_step": len(calls), "bytes_per_step": total_b, "seconds_per_step": total_s,
                      "fraction_of_step": total_s / step_s, "in_step_GBps": total_b / total_s / 1e9,
                      "in_step_busGBps": total_b / total_s / 1e9 * (R - 1) / R,
                      "median_call_bytes": statistics.median(c["bytes"] for c in calls)}
        res["a2a"].update(micro_a2a(calls, dev, args.a2a_iters))
        # the slowest rank's view: reduce the times and bandwidths
        v = torch.tensor([res["a2a"]["seconds_per_step"], -res["a2a"]["in_step_GBps"]], dtype=torch.float64,
                         device=dev)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        res["a2a"]["max_rank_seconds_per_step"], res["a2a"]["min_rank_in_step_GBps"] = v[0].item(), -v[1].item()
    del model, opt, ps
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def table(results, world, cfg_name) -> str:
    lines = [f"| model | GPUs | layout | tokens/s | step s | peak GiB/rank | a2a GB/s in step (bus) | "
             f"a2a share of step | replay GB/s | uniform GB/s | MiB/call (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a = r.get("a2a")
        mem = f"{r['peak_mem_GiB']:.1f}" if r["peak_mem_GiB"] is not None else "-"
        if a:
            extra = (f"{a['in_step_GBps']:.1f} ({a['in_step_busGBps']:.1f}) | {100 * a['fraction_of_step']:.0f}% | "
                     f"{a['replay_GBps']:.1f} | {a['uniform_GBps']:.1f} | {a['median_call_bytes'] / 2**20:.2f}")
        else:
            extra = "- | - | - | - | -"
        lines.append(f"| {cfg_name} | {world} | {r['layout']} (dp {r['dp_shard']} x ep {r['ep']}) | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {mem} | {extra} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=0, help="cut the preset to this many layers (1 dense + MoE)")
    p.add_argument("--no-mtp", action="store_true")
    p.add_argument("--layouts", default="fsdp,ep", help="comma list of fsdp, ep (one GPU: single)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-per-gpu", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--a2a-iters", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    env = init_distributed(args.device)
    if env.backend is None:  # one process: a world of one, so the same code runs
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    world = dist.get_world_size()
    cfg = dsv3.preset(args.preset)
    name = args.preset
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
        name += f"-cut{args.layers}"
    if args.no_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    layouts = {"fsdp": ParallelConfig(dp_shard=world, ep=1), "ep": ParallelConfig(dp_shard=1, ep=world)}
    todo = ["single"] if world == 1 else [s for s in args.layouts.split(",") if s]
    results = []
    for lay in todo:
        pcfg = ParallelConfig(1, 1) if lay == "single" else layouts[lay]
        try:
            results.append(bench_layout(lay, pcfg, cfg, env, args))
        except torch.OutOfMemoryError as e:
            results.append({"layout": lay, "dp_shard": pcfg.dp_shard, "ep": pcfg.ep, "error": f"OOM: {e}"[:200],
                            "tokens_per_s": float("nan"), "step_s": float("nan"), "peak_mem_GiB": None})
            torch.cuda.empty_cache()
        if env.rank == 0:
            print(json.dumps({k: v for k, v in results[-1].items()}, default=str), flush=True)
    if env.rank == 0:
        dev_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        out = {"model": name, "world_size": world, "device": dev_name, "torch": torch.__version__,
               "backend": env.backend or dist.get_backend(), "seq_len": args.seq_len,
               "batch_per_gpu": args.batch_per_gpu, "steps": args.steps, "warmup": args.warmup, "results": results}
        print()
        print(f"{name}, {world} x {dev_name}, seq {args.seq_len}, {args.batch_per_gpu} sequences per rank per step, "
              f"torch {torch.__version__}")
        print(table([r for r in results if "error" not in r], world, name))
        for r in results:
            if "error" in r:
                print(f"{r['layout']}: {r['error']}")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
