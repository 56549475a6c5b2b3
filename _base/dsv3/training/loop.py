"""The pre-training loop: one readable function, no parallelism code.

    for step in range(start, total):
        for each micro-batch:  forward -> loss (CE + λ/D·MTP + α·balance) / n_micro -> backward
        clip grad norm 1.0 -> AdamW step (lr from the schedule)
        aux-loss-free bias update from the step's expert loads (speed γ from the schedule)
        log (loss, MTP loss, lr, grad norm, tokens/s, MaxVio per MoE layer); periodic eval / checkpoint

Precision: fp32 on the CPU; on CUDA fp32 master weights with bf16 autocast. Exact resume: the
checkpoint holds model, optimizer, sampler position, RNG states and step, so N steps in one go
and N/2 + resume + N/2 give identical losses on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dsv3.config import ModelConfig
from dsv3.model import build_model, max_violation, update_expert_bias
from dsv3.training import checkpointing as ckpt
from dsv3.training.data import CorpusError, PackedSampler, build_token_cache, find_corpus, read_documents, split_of
from dsv3.training.loss import compute_loss
from dsv3.training.optim import Schedule, clip_and_step, make_optimizer
from dsv3.training.tokenizer import DSTokenizer


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    data: str | None = None  # directory / file / .jsonl; None: the Python standard library
    # more corpora used for training only (all their documents; validation stays on `data`'s split)
    extra_data: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # tokenizer.json or directory; None: train a BPE of the model's vocab size
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "DSV3_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dsv3")))
    steps: int = 300
    tokens: int = 0  # if > 0, overrides steps: steps = ceil(tokens / (batch_size * seq_len))
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step (global)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = batch_size (no accumulation)
    lr: float = 3e-3
    warmup_steps: int = -1  # -1: 5% of the steps, at most 2000 (the paper's 2K)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    bias_gamma: float = 0.001
    balance_alpha: float = 1e-4
    batch_ramp_steps: int = 0
    batch_start: int = 0
    fim_rate: float = 0.1
    val_permille: int = 10
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 (autocast, CUDA) | fp8 (bf16 autocast + FP8 GEMMs, dsv3/training/fp8.py) | auto
    fp8_experts: bool = False  # with fp8: the routed experts' grouped GEMMs in FP8 as well
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8  # per periodic eval; the final eval covers the whole val split
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    resume: bool = False
    progress: bool = True
    compile: bool = False  # torch.compile each block (1.2-1.6x training speed on an H100, bench/RESULTS.md)
    recompute: str = "none"  # none | selective (RMSNorms + MLA up-projections, paper §3.2.2) | full (per block)
    optim_state_dtype: str = "fp32"  # fp32 | bf16 (AdamW moments stored in bf16, paper §3.3)

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_size"):
            if getattr(self, name) <= 0 and not (name == "steps" and self.tokens > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({mb})")
        if self.batch_start and self.batch_start % mb:
            raise ValueError(f"batch_start ({self.batch_start}) must be a multiple of micro_batch_size ({mb})")
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp8, got {self.precision!r}")
        if self.fp8_experts and self.precision != "fp8":
            raise ValueError(f"fp8_experts (--fp8-experts) needs precision fp8, got {self.precision!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be none, selective or full, got {self.recompute!r}")
        if self.optim_state_dtype not in ("fp32", "bf16"):
            raise ValueError(f"optim_state_dtype must be fp32 or bf16, got {self.optim_state_dtype!r}")
        if self.log_every < 1:  # the loop logs at step % log_every == 0
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return dev


# --------------------------------------------------------------------------------------------------
# tokenizer and data

def get_tokenizer(tc: TrainConfig, mc: ModelConfig, log) -> DSTokenizer:
    """The given tokenizer, or a BPE of the model's vocab size trained on the corpus' train split
    (cached by corpus + vocab size, so a second run reuses it)."""
    if tc.tokenizer:
        tok = DSTokenizer.load(tc.tokenizer)
    else:
        corpus = find_corpus(tc.data)
        import hashlib
        key = hashlib.sha256(json.dumps([mc.vocab_size, tc.val_permille, [[f.relpath, f.size, f.mtime_ns]
                                         for f in corpus.files]]).encode()).hexdigest()[:24]
        path = os.path.join(tc.cache_dir, "tokenizers", key, "tokenizer.json")
        if os.path.exists(path):
            tok = DSTokenizer.load(path)
        else:
            log(f"training a {mc.vocab_size}-token BPE on {corpus.description} ...")
            t0 = time.time()

            def texts():
                for f in corpus.files:
                    for d in read_documents(f) or []:
                        if split_of(d.key, tc.val_permille) == "train":
                            yield d.text

            tok = DSTokenizer.train(texts(), mc.vocab_size)
            tok.save(os.path.dirname(path))
            log(f"tokenizer trained in {time.time() - t0:.1f}s")
    if tok.vocab_size > mc.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {mc.vocab_size}")
    return tok


# --------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, batches, token_bytes: np.ndarray, device, autocast, max_batches: int | None = None) -> dict:
    """Mean next-token loss and bits per byte over the val windows (byte count of the targets)."""
    was_training = model.training
    model.eval()
    nats, n_tok, n_bytes = 0.0, 0, 0
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        b = b.to(device)
        x, y = b[:, :-1], b[:, 1:]
        with autocast():
            out = model(x, with_mtp=False)
        nats += torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        n_tok += y.numel()
        n_bytes += int(token_bytes[y.cpu().numpy()].sum())
    model.train(was_training)
    if n_tok == 0:
        return {"val_loss": float("nan"), "val_bpb": float("nan"), "val_tokens": 0}
    return {"val_loss": nats / n_tok, "val_bpb": nats / (math.log(2) * max(n_bytes, 1)), "val_tokens": n_tok}


# --------------------------------------------------------------------------------------------------
# metrics

class Metrics:
    """JSONL in the run directory, TensorBoard when installed, and the console."""

    def __init__(self, out_dir: str, use_tb: bool = True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.f = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if use_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])
                elif isinstance(v, list) and k == "maxvio":
                    for j, x in enumerate(v):
                        self.tb.add_scalar(f"maxvio/layer{j}", x, rec["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------------

def log_step(rec: dict, counts, metrics: "Metrics", bar=None) -> dict:
    """Complete a step record with MaxVio and the per-expert load shares of each MoE layer (counts
    (L, E) or None), write it, show loss/lr/speed on the progress bar. Returns the record."""
    if counts is not None:
        rec["maxvio"] = [round(float(v), 4) for v in max_violation(counts)]
        rec["load"] = (counts.float() / counts.sum(-1, keepdim=True)).cpu().numpy().round(4).tolist()
    metrics.log(rec)
    if bar is not None:
        bar.set_postfix(loss=f"{rec['main']:.3f}", mtp=f"{rec['mtp']:.3f}", lr=f"{rec['lr']:.1e}",
                        tok_s=f"{rec['tok_per_s']:.0f}")
    return rec


def train(mc: ModelConfig, tc: TrainConfig, log=print) -> dict:
    """Train (or resume) and return a summary dict. Writes checkpoints, metrics.jsonl and plots."""
    tc.validate()
    device = resolve_device(tc.device)
    precision = tc.precision if tc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("bf16 autocast is for CUDA; use --precision fp32 on the CPU")

    def autocast():
        if precision == "bf16" or (precision == "fp8" and device.type == "cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    os.makedirs(tc.out_dir, exist_ok=True)
    ckpt_root = os.path.join(tc.out_dir, "checkpoints")
    resume_from = ckpt.latest_checkpoint(ckpt_root) if tc.resume else None
    if tc.resume and resume_from is None:
        log(f"--resume: no checkpoint in {ckpt_root}; starting from scratch")
    if not tc.resume and ckpt.latest_checkpoint(ckpt_root):
        raise ValueError(f"{tc.out_dir} already holds checkpoints: pass --resume to continue, or another --out")

    tok = get_tokenizer(tc, mc, log) if resume_from is None else DSTokenizer.load(resume_from)
    cache = build_token_cache(tc.data, tok, os.path.join(tc.cache_dir, "tokens"), val_permille=tc.val_permille,
                              fim_rate=tc.fim_rate, fim_seed=tc.seed, progress=tc.progress)
    meta = cache.meta["splits"]
    log(f"data: {cache.meta['source']}: train {meta['train']['n_tokens']:,} tokens "
        f"({meta['train']['n_docs']} docs), val {meta['val']['n_tokens']:,} tokens; "
        f"skipped {cache.meta['n_skipped']} non-UTF-8 files")
    token_bytes = tok.token_byte_lengths()

    micro = tc.micro_batch_size or tc.batch_size
    total_steps = tc.steps if tc.tokens <= 0 else math.ceil(tc.tokens / (tc.batch_size * tc.seq_len))
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else min(2000, max(1, total_steps // 20))
    sched = Schedule(total_steps, tc.lr, warmup, tc.mtp_lambda, tc.mtp_lambda_late, tc.bias_gamma,
                     tc.batch_ramp_steps, tc.batch_start)
    if tc.extra_data:
        streams = [cache.tokens("train")]
        for src in tc.extra_data:
            extra = build_token_cache(src, tok, os.path.join(tc.cache_dir, "tokens"), val_permille=0,
                                      fim_rate=tc.fim_rate, fim_seed=tc.seed, progress=tc.progress)
            streams.append(extra.tokens("train"))
            log(f"extra training data: {extra.meta['source']}: {extra.meta['splits']['train']['n_tokens']:,} tokens")
        sampler = PackedSampler(np.concatenate(streams), tc.seq_len, micro, seed=tc.seed, name="training streams")
    else:
        sampler = cache.sampler(tc.seq_len, micro, seed=tc.seed)
    val = cache.val_batches(tc.seq_len, micro) if meta["val"]["n_tokens"] > tc.seq_len else None

    torch.manual_seed(tc.seed)
    state_dtype = torch.bfloat16 if tc.optim_state_dtype == "bf16" else torch.float32
    if resume_from is None:
        model = build_model(mc, device=device, dtype=torch.float32, seed=tc.seed)
        opt = make_optimizer(model, tc.lr, tc.weight_decay, state_dtype=state_dtype)
        step, tokens_seen = 0, 0
    else:
        model, state, opt_t, rng_t = ckpt.load_checkpoint(resume_from, device, torch.float32)
        if model.config.to_dict() != mc.to_dict():
            log("note: resuming with the checkpoint's model config (the command line's preset/config is ignored)")
        mc = model.config
        opt = make_optimizer(model, tc.lr, tc.weight_decay, state_dtype=state_dtype)
        ckpt.load_optimizer(model, opt, opt_t, state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(rng_t, state["rng"])
        step, tokens_seen = state["step"], state["tokens"]
        log(f"resumed from {resume_from} at step {step}")
    model.train()
    model.set_recompute(tc.recompute)
    if precision == "fp8":  # in place, before compile; on the CPU the FP8 GEMMs are emulated (slow)
        from dsv3.training.fp8 import convert_to_fp8_training
        n = len(convert_to_fp8_training(model, experts=tc.fp8_experts))
        log(f"fp8: {n} modules in FP8 (attention, dense/shared MLPs{', routed experts' if tc.fp8_experts else ''})")
    if tc.compile:  # in place, per block: state-dict names (and so checkpoints) are unchanged
        for blk in list(model.layers) + list(model.mtp):
            blk.compile()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters on {device} ({precision}); {total_steps} steps of "
        f"{tc.batch_size} x {tc.seq_len} tokens, lr {tc.lr:g}, warmup {warmup}")
    with open(os.path.join(tc.out_dir, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump({"train": asdict(tc), "model": mc.to_dict()}, f, indent=1)

    metrics = Metrics(tc.out_dir)
    routers = model.routers()

    def save(reason: str) -> str:
        p = ckpt.save_checkpoint(ckpt_root, step, model, opt,
                                 {"tokens": tokens_seen, "sampler": sampler.state_dict(), "reason": reason,
                                  "train_config": asdict(tc)}, tokenizer=tok, keep=tc.keep)
        return p

    # Ctrl-C / SIGTERM: finish the current step, save, exit
    stop = {"flag": False}

    def on_signal(signum, frame):
        if stop["flag"]:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        stop["flag"] = True
        log("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    old_handlers = {}
    if hasattr(signal, "SIGINT"):
        with contextlib.suppress(ValueError):  # not in the main thread
            old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    bar = None
    if tc.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout)
    last = {}
    t_last = time.perf_counter()
    tok_since = 0
    try:
        while step < total_steps and not stop["flag"]:
            lr = sched.lr(step)
            for g in opt.param_groups:
                g["lr"] = lr
            lam, gamma = sched.mtp_weight(step), sched.gamma(step)
            n_micro = sched.batch_size(step, tc.batch_size) // micro
            counts = None
            sums = {"loss": 0.0, "main": 0.0, "mtp": 0.0, "balance": 0.0}
            for _ in range(n_micro):
                b = next(sampler).to(device, non_blocking=True)
                x, y = b[:, :-1], b[:, 1:]
                with autocast():
                    out = model(x, with_balance=tc.balance_alpha > 0)
                parts = compute_loss(out, y, lam, tc.balance_alpha, compiled=tc.compile)
                (parts.total / n_micro).backward()
                c = out.expert_counts
                counts = c if counts is None else counts + c
                sums["loss"] += parts.total.detach()
                sums["main"] += parts.main.detach()
                if parts.mtp_per_depth:
                    sums["mtp"] += torch.stack(parts.mtp_per_depth).mean().detach()
                if parts.balance is not None:
                    sums["balance"] += parts.balance.detach()
            gnorm = clip_and_step(opt, tc.grad_clip)  # fused into the update on CUDA (optim.py)
            opt.zero_grad(set_to_none=True)
            if counts is not None:
                update_expert_bias(routers, counts, gamma)
            step += 1
            n_tok = n_micro * micro * tc.seq_len
            tokens_seen += n_tok
            tok_since += n_tok

            if step % tc.log_every == 0 or step == total_steps or step == 1:
                now = time.perf_counter()
                rec = {"step": step, "tokens": tokens_seen, "lr": lr, "mtp_lambda": lam, "gamma": gamma,
                       "grad_norm": float(gnorm), "tok_per_s": tok_since / max(now - t_last, 1e-9)}
                rec.update({k: float(v) / n_micro for k, v in sums.items()})
                last = log_step(rec, counts, metrics, bar)
                t_last, tok_since = now, 0
            if bar is not None:
                bar.update(1)
            if val is not None and tc.eval_every > 0 and step % tc.eval_every == 0 and step < total_steps:
                ev = evaluate(model, val, token_bytes, device, autocast, tc.eval_batches)
                metrics.log({"step": step, **ev})
                log(f"step {step}: val loss {ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte")
            if tc.save_every > 0 and step % tc.save_every == 0 and step < total_steps:
                save("periodic")
    except BaseException:  # a crash or a second Ctrl-C: no final save, but close the metrics file
        metrics.close()
        raise
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    path = save("interrupted" if stop["flag"] else "final")
    summary = {"step": step, "total_steps": total_steps, "tokens": tokens_seen, "checkpoint": path,
               "train_loss": last.get("main"), "interrupted": stop["flag"]}
    if val is not None and not stop["flag"]:
        ev = evaluate(model, val, token_bytes, device, autocast)
        metrics.log({"step": step, **ev, "final": True})
        summary.update(ev)
        log(f"final: val loss {ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte over {ev['val_tokens']:,} tokens")
    metrics.close()
    write_run_outputs(tc.out_dir, summary, log)
    return summary


def write_run_outputs(out_dir: str, summary: dict, log) -> None:
    """The end of a run: the plots of metrics.jsonl (when matplotlib is installed) and summary.json."""
    try:
        from dsv3.training.plots import plot_run

        for p in plot_run(out_dir):
            log(f"plot: {p}")
    except ImportError:
        log("matplotlib not installed: no plots (pip install matplotlib)")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


__all__ = ["TrainConfig", "train", "evaluate", "get_tokenizer", "resolve_device", "CorpusError"]
