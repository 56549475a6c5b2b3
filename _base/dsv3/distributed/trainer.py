"""`dsv3 train` under torchrun: the pre-training loop of dsv3/training/loop.py over several processes.

    torchrun --nproc-per-node N -m dsv3.cli train --dp-shard D --ep E ...     (D x E = N)

The loop is the single-process one (same TrainConfig, schedule, data, metrics, checkpoints'
contents), with the parallel pieces in their places:

    every rank   builds the same model (same seed), `parallelize` (EP + FSDP2), reads its rows
                 [r·b, (r+1)·b) of every global micro-batch (PackedSampler rank sharding), runs
                 `train_step` (gradient sync, global clip, AdamW, bias update from global loads)
    rank 0 only  builds the tokenizer and token cache first (the others wait, then reuse the cache),
                 logs, writes metrics.jsonl / plots / summary.json
    all ranks    evaluation (each its rows of the val batches, sums all-reduced), the stop flag of
                 Ctrl-C / SIGTERM (all-reduced each step, so every rank saves at the same step),
                 sharded checkpoints (dsv3/distributed/checkpoint.py); the final (or interrupted) one
                 also holds the Hugging Face export, so `dsv3 sample/generate/eval RUN` work on it

The global batch is `batch_size` sequences as in one process; a micro-batch of `micro_batch_size`
sequences (default: the batch) is split over the ranks, so it must be a multiple of the world size.
Losses equal a single-process run on the same batches up to fp32 summation order
(tests/distributed/test_gloo.py, test_dcp.py). Resume (`--resume`) works from any layout and world
size; the global data position is kept (see checkpoint.py). Not supported here yet: --precision fp8
and resuming a single-process (Hugging Face-format) checkpoint.

Pipeline parallelism (`train_pipeline`): `--pp N [--pp-schedule 1f1b|dualpipev] [--n-microbatches M]
[--ep E]`, world = N (x E). Every rank builds the same model and keeps its stages (pipeline.py's
build_pipeline); every rank reads the same global batch each step (an ep rank its slice of every
micro-batch). Evaluation runs forward-only through the stages with plain P2P (pipeline.forward_only),
not torch's `schedule.eval`, so it does not depend on the torch version. Checkpoints are DCP under
the model's own names (expert slices as global (E, ...) tensors), so the final one exports to the
HF format and a pipeline run resumes under any pp / schedule / ep; a non-pipeline run and a
pipeline run do not resume each other's checkpoints (refused). fp32 only (no bf16/fp8, no
--compile, no batch ramp), no --dp-shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from dsv3.config import ModelConfig
from dsv3.distributed.checkpoint import is_dcp_checkpoint, load_dcp, read_state, save_dcp
from dsv3.distributed.mesh import DistEnv, ParallelConfig, build_mesh, init_distributed
from dsv3.distributed.parallelize import make_optimizer, parallelize, train_step
from dsv3.model import build_model
from dsv3.training import checkpointing as ckpt
from dsv3.training.data import CorpusError, PackedSampler, build_token_cache
from dsv3.training.loop import Metrics, TrainConfig, get_tokenizer, log_step, write_run_outputs
from dsv3.training.optim import Schedule
from dsv3.training.tokenizer import DSTokenizer


def start(device: str = "auto") -> DistEnv:
    """init_distributed, and a one-process group when there is no torchrun world (so that a run
    can resume a sharded checkpoint in one process)."""
    env = init_distributed(device)
    if env.backend is None:
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        env = DistEnv(0, 1, 0, env.device, backend)
    return env


def default_layout(world: int, dp_shard: int = 0, ep: int = 0, fsdp: bool = True, node_groups: int = 0) -> ParallelConfig:
    """Unset degrees (0) are derived: neither -> dp_shard = world, ep = 1; one -> the other = world / it."""
    if not dp_shard and not ep:
        dp_shard, ep = world, 1
    elif not dp_shard:
        dp_shard = max(world // ep, 1)
    elif not ep:
        ep = max(world // dp_shard, 1)
    return ParallelConfig(dp_shard=dp_shard, ep=ep, fsdp=fsdp, node_groups=node_groups).validate(world)


@torch.no_grad()
def evaluate(model, batches, token_bytes: np.ndarray, device, autocast, max_batches: int | None = None) -> dict:
    """dsv3.training.loop.evaluate over the ranks: each rank its rows, the sums all-reduced."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, target tokens, target bytes
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        b = b.to(device)
        x, y = b[:, :-1], b[:, 1:]
        with autocast():
            out = model(x, with_mtp=False)
        nats = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums[0] += nats.double()
        sums[1] += y.numel()
        sums[2] += int(token_bytes[y.cpu().numpy()].sum())
    model.train(was_training)
    dist.all_reduce(sums)
    nats, n_tok, n_bytes = sums.tolist()
    if n_tok == 0:
        return {"val_loss": float("nan"), "val_bpb": float("nan"), "val_tokens": 0}
    return {"val_loss": nats / n_tok, "val_bpb": nats / (math.log(2) * max(n_bytes, 1)), "val_tokens": int(n_tok)}


def _checkpoint_model_config(state: dict, mc: ModelConfig, say) -> ModelConfig:
    """On resume the checkpoint's model config wins over the command line's."""
    saved = ModelConfig.from_dict(state["model_config"])
    if saved.to_dict() != mc.to_dict():
        say("note: resuming with the checkpoint's model config (the command line's preset/config is ignored)")
    return saved


def _load_data(tc: TrainConfig, mc: ModelConfig, resume_from: str | None, is0: bool, say):
    """Tokenizer and token caches (training corpus + extra training data): rank 0 builds them, then the
    other ranks read them from the cache. Returns (tokenizer, cache, extra caches, split metadata)."""
    def data():
        tok = DSTokenizer.load(resume_from) if resume_from else get_tokenizer(tc, mc, say)
        cache = build_token_cache(tc.data, tok, os.path.join(tc.cache_dir, "tokens"), val_permille=tc.val_permille,
                                  fim_rate=tc.fim_rate, fim_seed=tc.seed, progress=tc.progress and is0)
        extra = [build_token_cache(src, tok, os.path.join(tc.cache_dir, "tokens"), val_permille=0,
                                   fim_rate=tc.fim_rate, fim_seed=tc.seed, progress=tc.progress and is0)
                 for src in tc.extra_data]
        return tok, cache, extra

    if is0:
        tok, cache, extra = data()
    dist.barrier()
    if not is0:
        tok, cache, extra = data()
    meta = cache.meta["splits"]
    say(f"data: {cache.meta['source']}: train {meta['train']['n_tokens']:,} tokens ({meta['train']['n_docs']} docs), "
        f"val {meta['val']['n_tokens']:,} tokens; skipped {cache.meta['n_skipped']} non-UTF-8 files")
    return tok, cache, extra, meta


def _schedule(tc: TrainConfig) -> tuple[int, Schedule]:
    total_steps = tc.steps if tc.tokens <= 0 else math.ceil(tc.tokens / (tc.batch_size * tc.seq_len))
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else min(2000, max(1, total_steps // 20))
    return total_steps, Schedule(total_steps, tc.lr, warmup, tc.mtp_lambda, tc.mtp_lambda_late, tc.bias_gamma,
                                 tc.batch_ramp_steps, tc.batch_start)


def _run_loop(tc: TrainConfig, env: DistEnv, say, metrics, sched: Schedule, opt, step: int, tokens_seen: int,
              total_steps: int, one_step, eval_fn, save, summary_extra: dict) -> dict:
    """The loop of both torchrun trainers. one_step(step, λ, γ) -> (train_step's result, tokens) runs one
    optimizer step; eval_fn(max_batches) -> validation dict (None: no validation data); save(reason, step,
    tokens) writes a checkpoint. Ctrl-C/SIGTERM on any rank stops every rank at the same step (the flag is
    all-reduced), which then saves. Rank 0 logs, plots and writes summary.json."""
    is0 = env.rank == 0
    stop = {"flag": False}

    def on_signal(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    old_handlers = {}
    with contextlib.suppress(ValueError):  # not in the main thread
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    if tc.progress and is0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout)
    last, t_last, tok_since = {}, time.perf_counter(), 0
    stopping = torch.zeros(1, device=env.device)
    try:
        while step < total_steps:
            stopping.fill_(float(stop["flag"]))
            dist.all_reduce(stopping, op=dist.ReduceOp.MAX)  # one rank interrupted: all stop at this step
            if stopping.item() > 0:
                stop["flag"] = True
                break
            lr = sched.lr(step)
            for g in opt.param_groups:
                g["lr"] = lr
            lam, gamma = sched.mtp_weight(step), sched.gamma(step)
            r, n_tok = one_step(step, lam, gamma)
            step += 1
            tokens_seen += n_tok
            tok_since += n_tok
            if is0 and (step % tc.log_every == 0 or step == total_steps or step == 1):
                now = time.perf_counter()
                rec = {"step": step, "tokens": tokens_seen, "lr": lr, "mtp_lambda": lam, "gamma": gamma,
                       "grad_norm": r["grad_norm"] if r["grad_norm"] is not None else float("nan"),
                       "tok_per_s": tok_since / max(now - t_last, 1e-9), "world_size": env.world_size,
                       "loss": r["loss"], "main": r["main"], "mtp": r["mtp"], "balance": r["balance"]}
                last = log_step(rec, r["counts"], metrics, bar)
                t_last, tok_since = now, 0
            if bar is not None:
                bar.update(1)
            if eval_fn is not None and tc.eval_every > 0 and step % tc.eval_every == 0 and step < total_steps:
                ev = eval_fn(tc.eval_batches)
                if is0:
                    metrics.log({"step": step, **ev})
                say(f"step {step}: val loss {ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte")
            if tc.save_every > 0 and step % tc.save_every == 0 and step < total_steps:
                save("periodic", step, tokens_seen)
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    path = save("interrupted" if stop["flag"] else "final", step, tokens_seen)
    summary = {"step": step, "total_steps": total_steps, "tokens": tokens_seen, "checkpoint": path,
               "train_loss": last.get("main"), "interrupted": stop["flag"], "world_size": env.world_size,
               **summary_extra}
    if eval_fn is not None and not stop["flag"]:
        ev = eval_fn()
        if is0:
            metrics.log({"step": step, **ev, "final": True})
        summary.update(ev)
        say(f"final: val loss {ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte over {ev['val_tokens']:,} tokens")
    if is0:
        metrics.close()
        write_run_outputs(tc.out_dir, summary, say)
    dist.barrier()
    return summary


def train_parallel(mc: ModelConfig, tc: TrainConfig, pcfg: ParallelConfig | None, env: DistEnv, log=print) -> dict:
    """Train (or resume) on the started process group; every rank calls it. pcfg None: from the
    checkpoint on resume, else dp_shard = world. Returns the summary (on every rank)."""
    tc.validate()
    rank, world = env.rank, env.world_size
    is0 = rank == 0
    say = log if is0 else (lambda *a, **k: None)
    device = env.device
    precision = tc.precision if tc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "fp8":
        raise ValueError("--precision fp8 is not supported with several processes yet")
    if tc.optim_state_dtype != "fp32":
        raise ValueError("--optim-state bf16 is not supported with several processes yet (use fp32)")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("bf16 autocast is for CUDA; use --precision fp32 on the CPU")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    micro = tc.micro_batch_size or tc.batch_size
    if micro % world:
        raise ValueError(f"the micro-batch ({micro} sequences) must be a multiple of the world size ({world}): "
                         "each rank reads an equal share of it")
    ckpt_root = os.path.join(tc.out_dir, "checkpoints")
    resume_from = ckpt.latest_checkpoint(ckpt_root) if tc.resume else None
    if tc.resume and resume_from is None:
        say(f"--resume: no checkpoint in {ckpt_root}; starting from scratch")
    if not tc.resume and ckpt.latest_checkpoint(ckpt_root):
        raise ValueError(f"{tc.out_dir} already holds checkpoints: pass --resume to continue, or another --out")
    if resume_from is not None and not is_dcp_checkpoint(resume_from):
        raise ValueError(f"{resume_from} is a single-process checkpoint; resuming it with several processes is "
                         "not supported yet (resume it with `dsv3 train --resume` in one process)")
    state = read_state(resume_from) if resume_from else None
    if state is not None and state["layout"].get("pp", 1) > 1:
        lay = state["layout"]
        raise ValueError(f"{resume_from} was written by a pipeline run (pp {lay['pp']}, {lay['schedule']}); "
                         f"resume it with --pp {lay['pp']} --pp-schedule {lay['schedule']} --ep {lay['ep']}")
    if state is not None:
        mc = _checkpoint_model_config(state, mc, say)
    if pcfg is None:
        pcfg = default_layout(world)
    pcfg.validate(world, mc)
    if is0:
        os.makedirs(tc.out_dir, exist_ok=True)

    tok, cache, extra, meta = _load_data(tc, mc, resume_from, is0, say)
    token_bytes = tok.token_byte_lengths()
    if extra:
        stream = np.concatenate([cache.tokens("train")] + [e.tokens("train") for e in extra])
        sampler = PackedSampler(stream, tc.seq_len, micro, seed=tc.seed, rank=rank, world_size=world,
                                name="training streams")
    else:
        sampler = cache.sampler(tc.seq_len, micro, seed=tc.seed, rank=rank, world_size=world)
    val = None
    if meta["val"]["n_tokens"] > tc.seq_len:
        try:
            val = cache.val_batches(tc.seq_len, micro, rank=rank, world_size=world)
        except CorpusError as e:  # fewer val windows than one global micro-batch
            say(f"no periodic evaluation: {e}")

    total_steps, sched = _schedule(tc)

    torch.manual_seed(tc.seed)
    model = build_model(mc, device=device, dtype=torch.float32, seed=tc.seed)  # the same on every rank
    n_params = sum(p.numel() for p in model.parameters())
    model.set_recompute(tc.recompute)
    if tc.compile:  # before sharding (as torchtitan); names, and so checkpoints, are unchanged
        for blk in list(model.layers) + list(model.mtp):
            blk.compile()
    ps = parallelize(model, pcfg, build_mesh(pcfg, device.type))
    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        st = load_dcp(resume_from, model, opt, ps)
        sampler.load_state_dict(st["sampler"])
        step, tokens_seen = st["step"], st["tokens"]
        lay = st["layout"]
        say(f"resumed from {resume_from} at step {step} (written by {lay['world_size']} ranks, dp_shard "
            f"{lay['dp_shard']} x ep {lay['ep']})")
    model.train()
    say(f"model: {n_params / 1e6:.2f}M parameters, {world} ranks (dp_shard {pcfg.dp_shard} x ep {pcfg.ep}, "
        f"fsdp {pcfg.fsdp}) on {device.type} ({precision}); {total_steps} steps of {tc.batch_size} x {tc.seq_len} "
        f"tokens, lr {tc.lr:g}, warmup {sched.warmup_steps}")
    if is0:
        with open(os.path.join(tc.out_dir, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump({"train": asdict(tc), "model": mc.to_dict(), "parallel": asdict(pcfg), "world_size": world},
                      f, indent=1)
    metrics = Metrics(tc.out_dir) if is0 else None

    def save(reason: str, step: int, tokens_seen: int) -> str:
        return save_dcp(ckpt_root, step, model, opt, ps,
                        {"tokens": tokens_seen, "sampler": sampler.state_dict(), "reason": reason,
                         "train_config": asdict(tc)}, tokenizer=tok, keep=tc.keep,
                        export_hf=reason != "periodic")

    def one_step(step: int, lam: float, gamma: float) -> tuple[dict, int]:
        n_micro = sched.batch_size(step, tc.batch_size) // micro
        batches = [next(sampler).to(device, non_blocking=True) for _ in range(n_micro)]
        r = train_step(model, opt, batches, ps, mtp_lambda=lam, balance_alpha=tc.balance_alpha, gamma=gamma,
                       grad_clip=tc.grad_clip, autocast=autocast if precision == "bf16" else None)
        return r, n_micro * micro * tc.seq_len

    def eval_fn(max_batches=None) -> dict:
        return evaluate(model, val, token_bytes, device, autocast, max_batches)

    return _run_loop(tc, env, say, metrics, sched, opt, step, tokens_seen, total_steps, one_step,
                     eval_fn if val is not None else None, save, {"layout": asdict(pcfg)})


# --------------------------------------------------------------------------------------------------
# pipeline parallelism: `dsv3 train --pp N [--pp-schedule 1f1b|dualpipev] [--n-microbatches M] [--ep E]`

@torch.no_grad()
def evaluate_pipeline(ps, batches, token_bytes: np.ndarray, device, max_batches: int | None = None) -> dict:
    """Validation loss through the pipeline: pipeline.forward_only (stage by stage, P2P, outside the
    schedule: torch's `schedule.eval` is not in every supported torch) on each val batch; the ranks
    holding the last stage sum the nats, and the sums are all-reduced over all pp x ep ranks. Under
    PP x EP `batches` are this ep rank's rows."""
    from dsv3.distributed.pipeline import forward_only

    was_training = ps.model_part.training
    ps.model_part.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        b = b.to(device)
        x, y = b[:, :-1].contiguous(), b[:, 1:]
        logits = forward_only(ps, x)
        if logits is not None:
            sums[0] += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                         reduction="sum").double()
            sums[1] += y.numel()
            sums[2] += int(token_bytes[y.cpu().numpy()].sum())
    ps.model_part.train(was_training)
    dist.all_reduce(sums, group=ps.all_group)
    nats, n_tok, n_bytes = sums.tolist()
    if n_tok == 0:
        return {"val_loss": float("nan"), "val_bpb": float("nan"), "val_tokens": 0}
    return {"val_loss": nats / n_tok, "val_bpb": nats / (math.log(2) * max(n_bytes, 1)), "val_tokens": int(n_tok)}


def train_pipeline(mc: ModelConfig, tc: TrainConfig, ppcfg, env: DistEnv, log=print) -> dict:
    """Pipeline-parallel training (dsv3/distributed/pipeline.py), PP alone (world = pp) or PP x EP
    (world = pp x ep); every rank calls it. `ppcfg` is a pipeline.PipelineConfig. Every rank builds
    the same model (same seed) and keeps its stages; every rank reads the same global batch of
    `batch_size` sequences each step (the pipeline's convention: its n_microbatches micro-batches; an
    ep rank reads its slice of each). Schedule, LR, MTP weight, bias update, logging, metrics, plots
    and checkpoints as `train_parallel`. Checkpoints hold the stage parameters, buffers and AdamW
    state under the model's own names (DCP), so the final one exports to the HF format; a resume must
    come from a pipeline run (any pp / schedule / ep: the names are the model's)."""
    from dsv3.distributed.pipeline import build_pipeline
    from dsv3.distributed.pipeline import make_optimizer as pp_optimizer
    from dsv3.distributed.pipeline import train_step as pp_train_step

    tc.validate()
    rank, world = env.rank, env.world_size
    is0 = rank == 0
    say = log if is0 else (lambda *a, **k: None)
    device = env.device
    precision = tc.precision if tc.precision != "auto" else "fp32"
    if precision == "fp8":
        raise ValueError("--pp with --precision fp8 is not supported")
    if precision != "fp32":
        raise ValueError(f"--pp supports --precision fp32 only for now, got {precision}")
    if tc.optim_state_dtype != "fp32":
        raise ValueError("--optim-state bf16 is not supported with several processes yet (use fp32)")
    if tc.batch_ramp_steps > 0:
        raise ValueError("--pp needs a fixed batch (static micro-batch shapes): no --batch-ramp-steps")
    if tc.compile:
        raise ValueError("--pp with --compile is not supported yet")
    ppcfg.validate(world)
    n_mb, ep = ppcfg.n_microbatches, ppcfg.ep
    if tc.micro_batch_size and tc.micro_batch_size != tc.batch_size // n_mb:
        raise ValueError(f"--pp splits the batch into --n-microbatches ({n_mb}) micro-batches; leave "
                         f"--micro-batch-size unset (or {tc.batch_size // n_mb})")
    ep_rank = rank % ep  # global rank = pp_index * ep + ep_index (pipeline_mesh)
    ckpt_root = os.path.join(tc.out_dir, "checkpoints")
    resume_from = ckpt.latest_checkpoint(ckpt_root) if tc.resume else None
    if tc.resume and resume_from is None:
        say(f"--resume: no checkpoint in {ckpt_root}; starting from scratch")
    if not tc.resume and ckpt.latest_checkpoint(ckpt_root):
        raise ValueError(f"{tc.out_dir} already holds checkpoints: pass --resume to continue, or another --out")
    if resume_from is not None and not (is_dcp_checkpoint(resume_from)
                                        and read_state(resume_from)["layout"].get("pp", 1) > 1):
        raise ValueError(f"{resume_from} was not written by a pipeline run (--pp); resuming it with --pp is "
                         "not supported (resume it with the layout flags it was trained with)")
    state = read_state(resume_from) if resume_from else None
    if state is not None:
        mc = _checkpoint_model_config(state, mc, say)
    ppcfg.validate(world, mc, tc.batch_size)
    if is0:
        os.makedirs(tc.out_dir, exist_ok=True)

    tok, cache, extra, meta = _load_data(tc, mc, resume_from, is0, say)
    token_bytes = tok.token_byte_lengths()
    # every rank reads the whole global batch (local_rows picks an ep rank's slice of each micro-batch)
    if extra:
        stream = np.concatenate([cache.tokens("train")] + [e.tokens("train") for e in extra])
        sampler = PackedSampler(stream, tc.seq_len, tc.batch_size, seed=tc.seed, name="training streams")
    else:
        sampler = cache.sampler(tc.seq_len, tc.batch_size, seed=tc.seed)
    val = None
    if meta["val"]["n_tokens"] > tc.seq_len:
        try:
            val = cache.val_batches(tc.seq_len, tc.batch_size, rank=ep_rank, world_size=ep)
        except CorpusError as e:
            say(f"no periodic evaluation: {e}")

    total_steps, sched = _schedule(tc)

    torch.manual_seed(tc.seed)
    model = build_model(mc, device=device, dtype=torch.float32, seed=tc.seed)  # the same on every rank
    n_params = sum(p.numel() for p in model.parameters())
    model.set_recompute(tc.recompute)
    ps = build_pipeline(model, ppcfg, tc.batch_size // (n_mb * ep), tc.seq_len, device=device,
                        mtp_lambda=tc.mtp_lambda)
    del model  # this rank keeps its stages only
    opt = pp_optimizer(ps, tc.lr, tc.weight_decay)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        st = load_dcp(resume_from, ps.stages[0], opt, ps)
        sampler.load_state_dict(st["sampler"])
        step, tokens_seen = st["step"], st["tokens"]
        lay = st["layout"]
        say(f"resumed from {resume_from} at step {step} (written by {lay['world_size']} ranks, pp {lay['pp']} "
            f"x ep {lay['ep']}, {lay['schedule']})")
    ps.model_part.train()
    say(f"model: {n_params / 1e6:.2f}M parameters, {world} ranks (pp {ppcfg.pp} x ep {ep}, {ppcfg.schedule}, "
        f"{n_mb} micro-batches, {ppcfg.n_stages} stages) on {device.type} ({precision}); {total_steps} steps of "
        f"{tc.batch_size} x {tc.seq_len} tokens, lr {tc.lr:g}, warmup {sched.warmup_steps}")
    if is0:
        with open(os.path.join(tc.out_dir, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump({"train": asdict(tc), "model": mc.to_dict(), "pipeline": asdict(ppcfg), "world_size": world},
                      f, indent=1)
    metrics = Metrics(tc.out_dir) if is0 else None

    def save(reason: str, step: int, tokens_seen: int) -> str:
        return save_dcp(ckpt_root, step, ps.stages[0], opt, ps,
                        {"tokens": tokens_seen, "sampler": sampler.state_dict(), "reason": reason,
                         "train_config": asdict(tc)}, tokenizer=tok, keep=tc.keep,
                        export_hf=reason != "periodic")

    def one_step(step: int, lam: float, gamma: float) -> tuple[dict, int]:
        batch = next(sampler).to(device, non_blocking=True)
        r = pp_train_step(ps, opt, batch, mtp_lambda=lam, balance_alpha=tc.balance_alpha, gamma=gamma,
                          grad_clip=tc.grad_clip)
        r["mtp"] = (r["loss"] - r["balance"] - r["main"]) / lam if lam > 0 else float("nan")
        return r, tc.batch_size * tc.seq_len

    def eval_fn(max_batches=None) -> dict:
        return evaluate_pipeline(ps, val, token_bytes, device, max_batches)

    return _run_loop(tc, env, say, metrics, sched, opt, step, tokens_seen, total_steps, one_step,
                     eval_fn if val is not None else None, save, {"pipeline": asdict(ppcfg)})


__all__ = ["default_layout", "evaluate", "evaluate_pipeline", "start", "train_parallel", "train_pipeline"]
