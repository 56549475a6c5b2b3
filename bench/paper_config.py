"""The paper's training configuration on one host (issue 18, run 3): DualPipeV x EP x ZeRO-1 x FP8 x bf16 AdamW
moments x selective recomputation, on a 671B-shaped model cut to --layers layers (every MoE layer keeps all 256
routed experts, split over the EP ranks): tokens/s, MFU, peak memory per rank, beside `dsv3 plan`'s prediction
for the same layout (the planner's error in percent).

    torchrun --nproc-per-node 8 bench/paper_config.py --layers 6 --pp 2 --ep 4 --seq-len 4096 --bf16-weights \\
        --n-microbatches 8 --out bench/results/paper_config_8.json
        (dsv3 plan: 89 GiB on the worst rank of 140; --layers 7: 110 GiB, --layers 8: 145 GiB does not fit)
    torchrun --nproc-per-node 4 bench/paper_config.py --smoke       # CPU, gloo: the same code path on a tiny model

Layout: world = pp x dp x ep (dp = world / (pp x ep)); stage replicas R = dp x ep, each reading micro_batch rows of
every one of the --n-microbatches micro-batches, so the global batch is n_microbatches x R x micro_batch sequences.
Every rank builds the model on the meta device and allocates and initialises only its own stages and expert slices
(dsv3/distributed/pipeline.py build_pipeline(init_seed=...)): no rank ever holds the whole model. The step is
`dsv3 train`'s (dsv3.distributed.pipeline.train_step: clip 1.0, MTP λ 0.3, balance α 1e-4, bias speed γ 1e-3) on
random token ids, under `dsv3 train`'s autocast for the precision (bf16 on CUDA; on the CPU bf16 for --precision
bf16 or with --bf16-weights, else fp32 around FP8's exact emulation).

Measured: step time (median of --steps timed steps after --warmup, each between a device sync and a barrier),
tokens/s = global tokens / step time, MFU = tokens/s x FLOPs per token (bench/train_speed.py's count) / (world x the
card's dense bf16 datasheet peak; a card without a datasheet figure: the bf16 matmul rate this run measures on it,
bench/bandwidth.py), peak memory per rank (torch.cuda.max_memory_allocated over the timed steps, which hold the
optimizer state; on the CPU the process's peak RSS instead, which includes the interpreter and is not compared).
Predicted: `dsv3.plan.plan` for the same layout (its dp = this dp x ep, schedule dualpipev or 1f1b, the working
weights as dsv3 keeps them: fp32 and their own masters without --bf16-weights, else bf16 with fp32 masters and bf16
gradients), the worst rank's total against the largest measured peak. Not in the plan: the fp32 master copies of
expert-slice chunks that fp32-weight ZeRO-1 keeps where dp > 1 and ep > 1 (4/dp bytes per expert entry), and the
transient fp32 gradient buckets of the reduce-scatter / all-reduce (at most 512 MiB each, dsv3/distributed/pipeline.py).
Writes JSON to --out and prints a markdown table (rank 0).

Checkpoints at scale (issue 18, run 4): `--save DIR` writes the sharded checkpoint after the timed steps (the
seconds of `save_dcp`, between barriers), then takes one more step and records that step's batch and loss in DIR;
`--resume DIR` (same model flags, any layout and world size with the same global batch) loads it (the seconds of
`load_dcp`) and takes that step: its loss must equal the recorded one (`resume_loss_diff`; other layouts only
reorder sums, so within ~1e-5 relative in fp32). A 671B-shaped cut's checkpoint is large (fp32 masters + moments:
`dsv3 plan`, or the refusal of `save_dcp` when the disk cannot hold it): use a small --layers for this run.

    torchrun --nproc-per-node 8 bench/paper_config.py --layers 4 --pp 2 --ep 4 --save /data/pc   # then:
    torchrun --nproc-per-node 4 bench/paper_config.py --layers 4 --pp 2 --ep 2 --n-microbatches 16 --resume /data/pc
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import dsv3  # noqa: E402
from dsv3.distributed.mesh import init_distributed  # noqa: E402
from dsv3.distributed.pipeline import PipelineConfig, build_pipeline, make_pipeline_optimizer, train_step  # noqa: E402
from dsv3.distributed.strategy import dualpipev_refusal  # noqa: E402
from dsv3.plan import GiB, PlanConfig, plan  # noqa: E402
from dsv3.training.strategy import precision_recipe  # noqa: E402


def model_config(args) -> dsv3.ModelConfig:
    """The 671B's layer shapes cut to --layers main layers (the first min(3, layers - 1) dense, as the 671B's
    first three), MTP kept; --smoke: the tiny preset (4 layers, 16 experts) for a CPU run of the same path."""
    if args.smoke:
        return dsv3.preset("tiny").replace(num_hidden_layers=args.layers or 4)
    L = args.layers
    return dsv3.preset("671b").replace(num_hidden_layers=L, first_k_dense_replace=min(3, L - 1),
                                       quantization_config=None, max_position_embeddings=max(4096, args.seq_len),
                                       rope_scaling=None)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=0, help="main layers of the 671B-shaped cut (default 6; --smoke 4)")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--ep", type=int, default=0, help="expert-parallel degree (default: world / pp)")
    p.add_argument("--schedule", default="dualpipev", choices=["dualpipev", "1f1b"])
    p.add_argument("--n-microbatches", type=int, default=0, help="default: the number of stages")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences of a micro-batch per rank")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--precision", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--fp8-experts", action="store_true", help="the routed experts' grouped GEMMs in FP8 too")
    p.add_argument("--fp8-recompute-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="FP8 weights re-quantised in backward, none kept per micro-batch in flight (dsv3 train's "
                        "default with a pipeline; --no-fp8-recompute-weights keeps them, counted in the plan too)")
    p.add_argument("--optim-state", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--recompute", default="selective", choices=["selective", "none", "full"])
    p.add_argument("--bf16-weights", action="store_true", help="bf16 working weights, fp32 masters")
    p.add_argument("--no-zero", action="store_true", help="the whole optimizer state on every replica")
    p.add_argument("--overlap", action="store_true", help="DualPipeV's threaded all-to-all overlap")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--smoke", action="store_true", help="the tiny preset, seq 32, 1 + 1 steps (a CPU check)")
    p.add_argument("--out", default=None, help="JSON results (rank 0)")
    p.add_argument("--save", default=None, help="write the checkpoint here after the timed steps (run 4)")
    p.add_argument("--resume", default=None, help="load a --save checkpoint and check the next step's loss")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len = min(args.seq_len, 32)
        args.steps, args.warmup = min(args.steps, 1), min(args.warmup, 1)
    args.layers = args.layers or (4 if args.smoke else 6)
    return args


def layout(args, world: int) -> PipelineConfig:
    if world % args.pp:
        raise SystemExit(f"the world ({world} ranks) is not a multiple of --pp {args.pp}")
    ep = args.ep or world // args.pp
    if world % (args.pp * ep):
        raise SystemExit(f"--pp {args.pp} x --ep {ep} does not divide the world ({world} ranks)")
    refusal = dualpipev_refusal(args.precision, args.schedule, "--schedule")
    if refusal:  # (at once: the first step's weight-gradient pass failed on such a torch, the GPU machines' 2.11)
        raise SystemExit(refusal)
    stages = args.pp * (2 if args.schedule == "dualpipev" else 1)
    return PipelineConfig(pp=args.pp, schedule=args.schedule, n_microbatches=args.n_microbatches or stages, ep=ep,
                          dp=world // (args.pp * ep), zero=not args.no_zero)


def planned(cfg, args, pc: PipelineConfig, world: int, batch: int, gpu_gib: float):
    """dsv3.plan's worst rank for this layout, in its own terms (module docstring)."""
    zero = pc.zero and pc.replicas > 1
    return plan(cfg, PlanConfig(
        gpus=world, gpu_mem_gib=gpu_gib, pp=pc.pp, ep=pc.ep, dp=pc.dp * pc.ep, zero=1 if zero else 0,
        precision=args.precision, micro_batch=args.micro_batch, seq_len=args.seq_len, global_batch=batch,
        recompute={"selective": "paper", "none": "none", "full": "full"}[args.recompute], schedule=pc.schedule,
        weight_dtype="bf16" if args.bf16_weights else "fp32", master_dtype="fp32",  # (fp32 weights: no masters)
        grad_dtype="bf16" if args.bf16_weights else "fp32", optim_dtype=args.optim_state,
        fp8_weight_copies="none" if args.precision != "fp8" or args.fp8_recompute_weights else
        "all" if args.fp8_experts else "dense"), "671b cut")


NEXT = "paper_config_next.pt"  # beside the checkpoint: the batch and loss of the step after it


def save(args, ps, opt, cfg, nxt, hp) -> dict:
    """Run 4's writer: the checkpoint (timed), then one more step on `nxt`, its batch and loss kept in the
    directory for a resume to compare with."""
    from dsv3.checkpoints.dcp import save_dcp

    dist.barrier()
    t = time.perf_counter()
    path = save_dcp(args.save, 1, ps.stages[0], opt, ps, {"tokens": 0, "sampler": {}})
    dist.barrier()
    secs = time.perf_counter() - t
    r = train_step(ps, opt, nxt, **hp)
    if dist.get_rank() == 0:
        torch.save({"batch": nxt.cpu(), "loss": r["loss"], "layers": cfg.num_hidden_layers}, os.path.join(path, NEXT))
    dist.barrier()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return {"save_s": secs, "checkpoint_gib": size / GiB, "saved_next_loss": r["loss"]}


def resume(args, ps, opt, batch: int, dev, hp) -> dict:
    """Run 4's reader: load --resume's checkpoint (timed) into this layout and take the recorded next step."""
    from dsv3.checkpoints.dcp import load_dcp

    path = os.path.join(args.resume, "step_00000001")
    rec = torch.load(os.path.join(path, NEXT), weights_only=True)
    if rec["batch"].shape != (batch, args.seq_len + 1):
        raise SystemExit(f"--resume: the checkpoint's next step has a batch of {tuple(rec['batch'].shape)}, this "
                         f"layout reads ({batch}, {args.seq_len + 1}): set --n-microbatches / --micro-batch / "
                         "--seq-len so that the global batch is the same")
    dist.barrier()
    t = time.perf_counter()
    load_dcp(path, ps.stages[0], opt, ps)
    dist.barrier()
    secs = time.perf_counter() - t
    r = train_step(ps, opt, rec["batch"].to(dev), **hp)
    return {"load_s": secs, "resumed_loss": r["loss"], "saved_next_loss": rec["loss"],
            "resume_loss_diff": abs(r["loss"] - rec["loss"])}


def main(argv=None) -> dict:
    args = parse(argv)
    env = init_distributed(args.device)
    if env.backend is None:
        raise SystemExit("run it under torchrun (e.g. torchrun --nproc-per-node 4 bench/paper_config.py --smoke)")
    rank, world, dev = env.rank, env.world_size, env.device
    cuda = dev.type == "cuda"
    pc = layout(args, world)
    cfg = model_config(args)
    R = pc.replicas
    batch = pc.n_microbatches * R * args.micro_batch

    ceiling = None
    if cuda and rank == 0:
        from bandwidth import matmul_ceiling

        ceiling = matmul_ceiling(dev)
    t0 = time.perf_counter()
    model = dsv3.build_model(cfg, device="meta")
    model.set_recompute(args.recompute)
    if args.precision == "fp8":
        from dsv3.training.fp8 import convert_to_fp8_training

        convert_to_fp8_training(model, experts=args.fp8_experts, recompute_weights=args.fp8_recompute_weights)
    ps = build_pipeline(model, pc, args.micro_batch, args.seq_len, device=dev, init_seed=0, overlap=args.overlap)
    del model
    opt = make_pipeline_optimizer(ps, 1e-4, state_dtype=torch.bfloat16 if args.optim_state == "bf16" else torch.float32,
                                  bf16_weights=args.bf16_weights)
    weights = torch.cuda.memory_allocated(dev) / GiB if cuda else None
    build_s = time.perf_counter() - t0
    autocast = precision_recipe(args.precision, dev, args.bf16_weights)  # dsv3 train's choice for this precision
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, args.seq_len + 1), generator=g).to(dev) for _ in range(2)]
    hp = dict(mtp_lambda=0.3, balance_alpha=1e-4, gamma=1e-3, autocast=autocast)
    ckpt = {}
    if args.resume:
        ckpt.update(resume(args, ps, opt, batch, dev, hp))
        args.warmup = args.steps = 0

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(dev)
        dist.barrier()
        if i == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(dev)  # the timed steps: weights, optimizer state, activations
        t = time.perf_counter()
        r = train_step(ps, opt, batches[i % 2], **hp)
        if cuda:
            torch.cuda.synchronize(dev)
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(r["loss"])
    if args.save:
        ckpt.update(save(args, ps, opt, cfg, batches[(args.warmup + args.steps) % 2], hp))
    step = statistics.median(times) if times else float("nan")
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) / GiB
    else:  # KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t)) / GiB
    masters = (sum(m.numel() * 4 for m in opt.masters.values())  # AdamW's masters and ZeRO's fp32 copies
               + sum(z.flat.numel() * 4 for z in ps.zero if z.flat is not None)) / GiB
    mine = torch.tensor([peak, weights or 0.0, state, masters], dtype=torch.float64, device=dev)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    out = None
    if rank == 0:
        from train_speed import datasheet_peak, flops_per_token

        card = torch.cuda.get_device_name(dev) if cuda else "CPU"
        gpu_gib = torch.cuda.get_device_properties(dev).total_memory / GiB if cuda else 80.0
        tok_s = batch * args.seq_len / step
        fpt = flops_per_token(cfg, args.seq_len)
        peak_flops = (datasheet_peak(card) or ceiling["flops_per_s"]) if cuda else None
        pr = planned(cfg, args, pc, world, batch, gpu_gib)
        measured = max(float(e[0]) for e in every)
        out = {
            "date": datetime.date.today().isoformat(), "card": card, "torch": torch.__version__, "world": world,
            "command": " ".join(sys.argv), "layout": {k: getattr(pc, k) for k in ("pp", "dp", "ep", "schedule",
                                                                                   "n_microbatches", "zero")},
            "model": {"layers": cfg.num_hidden_layers, "dense_layers": cfg.first_k_dense_replace,
                      "experts": cfg.n_routed_experts, "params": dsv3.info.param_count(cfg)},
            "precision": args.precision, "fp8_experts": args.fp8_experts,
            "fp8_recompute_weights": args.fp8_recompute_weights and args.precision == "fp8",
            "optim_state": args.optim_state,
            "recompute": args.recompute, "bf16_weights": args.bf16_weights, "batch": batch, "seq_len": args.seq_len,
            "build_s": build_s, "step_s": step, "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / world,
            "flops_per_token": fpt, "peak_flops": peak_flops,
            "mfu": tok_s * fpt / (world * peak_flops) if peak_flops else None,
            "measured_matmul_flops": ceiling["flops_per_s"] if ceiling else None,
            "losses": losses, "per_rank": [{"peak_gib": float(e[0]), "weights_gib": float(e[1]),
                                            "optimizer_state_gib": float(e[2]), "masters_gib": float(e[3])}
                                           for e in every],
            "peak_gib_max": measured, "peak_is": "cuda max_memory_allocated" if cuda else "process peak RSS",
            "plan": {"worst_rank": pr.rank, "stages": list(pr.stages), "total_gib": pr.total / GiB,
                     "mem_gib": {k: v / GiB for k, v in pr.mem.items()}},
            "plan_error_pct": 100 * (pr.total / GiB - measured) / measured if cuda else None, **ckpt,
        }
        print(f"| card | layout | model | tokens/s | tokens/s/GPU | MFU | peak GiB (max rank) | plan GiB | "
              f"plan error |\n|---|---|---|---|---|---|---|---|---|\n| {card} x {world} | pp {pc.pp} x dp {pc.dp} x ep "
              f"{pc.ep} {pc.schedule}, {pc.n_microbatches} mb, ZeRO-1 {'on' if pc.zero and R > 1 else 'off'}, "
              f"{args.precision}{' +experts' if args.fp8_experts else ''}"
              f"{' +recomputed weights' if args.fp8_recompute_weights and args.precision == 'fp8' else ''}, "
              f"{args.optim_state} moments, recompute "
              f"{args.recompute}{', bf16 weights' if args.bf16_weights else ''} | {cfg.num_hidden_layers} layers "
              f"({cfg.n_routed_experts} experts) | {tok_s:,.0f} | {tok_s / world:,.0f} | "
              f"{'%.1f%%' % (100 * out['mfu']) if out['mfu'] else 'n/a (CPU)'} | {measured:.2f}"
              f"{'' if cuda else ' (RSS)'} | {pr.total / GiB:.2f} | "
              f"{'%+.1f%%' % out['plan_error_pct'] if cuda else 'n/a (CPU)'} |")
        if ckpt:
            print("checkpoint: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in ckpt.items()))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
