"""The training loop: one for every task (pre-training, SFT, GRPO) and every layout (one process,
FSDP2 / expert parallelism, pipeline), which are plugged in (dsv3/training/strategy.py, a task below).

    for step in range(start, total):
        hp = task.hyper(step)                       lr, and the task's own (MTP weight λ, bias speed γ, ...)
        micro-batches = task.micro_batches(step)    this rank's rows of the step's global batch
        stats, counts = strategy.forward_backward   gradients of the global mean loss, synchronised
        AdamW step, the clip coefficient min(1, c / (‖g‖ + 1e-6)) applied inside the update
        task.after_step(counts, hp)                 e.g. the aux-loss-free bias update from global loads
        log (rank 0), periodic evaluation, periodic checkpoint
    final checkpoint (Ctrl-C / SIGTERM: after the current step, on every rank at the same step), final
    evaluation, plots and summary.json

A task is an object with:
    name, total_steps, stat_names (the names of the (k,) statistics its loss returns)
    hyper(step) -> dict with "lr"
    micro_batches(step) -> list of this rank's micro-batches (any objects model_inputs/loss understand)
    model_inputs(mb, hp) -> keyword arguments of the model's forward;  loss(out, mb, hp) -> (loss, stats)
    after_step(strategy, counts, hp) -> None;  log_fields(hp) -> dict added to each logged record
    tokens_per_step(step) -> int;  state_dict() / load_state_dict(sd) (the data position)
    evaluate(strategy, max_batches) -> dict or None (None: the task has no periodic evaluation);
    eval_message(ev) -> str
    summary() -> dict added to summary.json
    boundary(step) -> bool (optional, default True): whether a checkpoint may be written after `step` steps
        (GRPO: only between sampled batches); a Ctrl-C waits for the next boundary

Every rank runs the loop; rank 0 writes metrics.jsonl (+ TensorBoard when installed), the progress bar,
plots and summary.json. The loop reads the device once per logged step (loss and gradient norm).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from dsv3.model import max_violation


# --------------------------------------------------------------------------------------------------
# evaluation (every layout: the strategy gives this rank's logits and sums over the ranks)

@torch.no_grad()
def evaluate(strategy, batches, token_bytes: np.ndarray, autocast, max_batches: int | None = None) -> dict:
    """Mean next-token loss and bits per byte over the validation windows `batches` (this rank's rows;
    the byte count of the targets). Ranks without an output head (inner pipeline stages) add nothing."""
    was_training = strategy.module().training
    strategy.train(False)
    sums = torch.zeros(3, dtype=torch.float64, device=strategy.device)  # nats, target tokens, target bytes
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        b = b.to(strategy.device)
        x, y = b[:, :-1].contiguous(), b[:, 1:]
        logits = strategy.eval_logits(x, autocast)
        if logits is not None:
            sums[0] += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                         reduction="sum").double()
            sums[1] += y.numel()
            sums[2] += int(token_bytes[y.cpu().numpy()].sum())
    strategy.train(was_training)
    nats, n_tok, n_bytes = strategy.all_reduce_sum(sums).tolist()
    if n_tok == 0:
        return {"val_loss": float("nan"), "val_bpb": float("nan"), "val_tokens": 0}
    return {"val_loss": nats / n_tok, "val_bpb": nats / (math.log(2) * max(n_bytes, 1)), "val_tokens": int(n_tok)}


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


def log_step(rec: dict, counts, metrics: Metrics, bar=None) -> dict:
    """Complete a step record with MaxVio and the per-expert load shares of each MoE layer (counts
    (L, E) or None), write it, show loss/lr/speed on the progress bar. Returns the record."""
    if counts is not None:
        rec["maxvio"] = [round(float(v), 4) for v in max_violation(counts)]
        rec["load"] = (counts.float() / counts.sum(-1, keepdim=True)).cpu().numpy().round(4).tolist()
    metrics.log(rec)
    if bar is not None:
        post = {"loss": f"{rec.get('main', rec.get('loss', float('nan'))):.3f}"}
        if "mtp" in rec:
            post["mtp"] = f"{rec['mtp']:.3f}"
        post.update(lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tok_per_s']:.0f}")
        bar.set_postfix(**post)
    return rec


def write_run_outputs(out_dir: str, summary: dict, log, plots: bool = True) -> None:
    """The end of a run: the plots of metrics.jsonl (when matplotlib is installed and `plots`; ~2 s on a
    CPU, most of it importing matplotlib) and summary.json."""
    if plots:
        try:
            from dsv3.training.plots import plot_run
        except ImportError:
            log("matplotlib not installed: no plots (pip install matplotlib)")
        else:
            for p in plot_run(out_dir):
                log(f"plot: {p}")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


# --------------------------------------------------------------------------------------------------
# the loop

def optimizer_step(strategy, opt, grad_clip: float) -> torch.Tensor:
    """The AdamW step with the gradient clip folded in: coefficient min(1, c / (‖g‖ + 1e-6)) from the
    global norm (torch.nn.utils.clip_grad_norm_'s), applied inside the update. Returns ‖g‖ (device)."""
    norm = strategy.grad_norm(opt)
    coef = (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip and grad_clip > 0 else None
    opt.step(grad_scale=coef)
    opt.zero_grad(set_to_none=True)
    return norm


def run(task, strategy, opt, *, out_dir: str, step: int, tokens_seen: int, autocast, grad_clip: float,
        save, log_every: int = 1, eval_every: int = 0, eval_batches: int | None = None, save_every: int = 0,
        progress: bool = True, plots: bool = True, use_tb: bool = True, log=print) -> dict:
    """Run `task` from optimizer step `step` to task.total_steps. save(reason, step, tokens) writes a
    checkpoint and returns its path (a collective on every rank). Returns the summary (every rank)."""
    say = strategy.log(log)
    total = task.total_steps
    metrics = Metrics(out_dir, use_tb=use_tb) if strategy.is0 else None
    stop = {"flag": False}

    def on_signal(signum, frame):
        if stop["flag"]:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        stop["flag"] = True
        say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    old_handlers = {}
    with contextlib.suppress(ValueError):  # not in the main thread
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    if progress and strategy.is0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=task.name, dynamic_ncols=True, file=sys.stdout)
    last: dict = {}
    t_last, tok_since = time.perf_counter(), 0
    strategy.train(True)
    boundary = getattr(task, "boundary", lambda s: True)
    try:
        while step < total:
            if boundary(step) and strategy.any(stop["flag"]):  # one rank interrupted: all stop at this step
                stop["flag"] = True
                break
            hp = task.hyper(step)
            for g in opt.param_groups:
                g["lr"] = hp["lr"]
            mbs = task.micro_batches(step)
            stats, counts = strategy.forward_backward(task, mbs, hp, autocast)
            gnorm = optimizer_step(strategy, opt, grad_clip)
            task.after_step(strategy, counts, hp)
            n_tok = task.tokens_per_step(step)
            step += 1
            tokens_seen += n_tok
            tok_since += n_tok
            if step % log_every == 0 or step == total or step == 1:
                now = time.perf_counter()
                vals = stats.tolist() if stats is not None else []
                rec = {"step": step, "tokens": tokens_seen, "lr": hp["lr"], **task.log_fields(hp),
                       "grad_norm": float(gnorm), "tok_per_s": tok_since / max(now - t_last, 1e-9),
                       **dict(zip(task.stat_names, vals))}
                if strategy.world_size > 1:
                    rec["world_size"] = strategy.world_size
                if metrics is not None:
                    last = log_step(rec, counts, metrics, bar)
                else:
                    last = rec
                t_last, tok_since = now, 0
            if bar is not None:
                bar.update(1)
            if eval_every > 0 and step % eval_every == 0 and step < total:
                ev = task.evaluate(strategy, eval_batches)
                if ev is not None:
                    if metrics is not None:
                        metrics.log({"step": step, **ev})
                    say(f"step {step}: {task.eval_message(ev)}")
            if save_every > 0 and step % save_every == 0 and step < total and boundary(step):
                save("periodic", step, tokens_seen)
    except BaseException:  # a crash or a second Ctrl-C: no final save, but close the metrics file
        if metrics is not None:
            metrics.close()
        raise
    finally:
        if bar is not None:
            bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    path = save("interrupted" if stop["flag"] else "final", step, tokens_seen)
    summary = {"step": step, "total_steps": total, "tokens": tokens_seen, "checkpoint": path,
               "train_loss": last.get("main", last.get("loss")), "interrupted": stop["flag"], **task.summary()}
    if strategy.world_size > 1:
        summary["world_size"] = strategy.world_size
    if not stop["flag"]:
        ev = task.evaluate(strategy, None)
        if ev is not None:
            if metrics is not None:
                metrics.log({"step": step, **ev, "final": True})
            summary.update(ev)
            say(f"final: {task.eval_message(ev)}")
    if metrics is not None:
        metrics.close()
        write_run_outputs(out_dir, summary, say, plots)
    strategy.barrier()
    return summary


__all__ = ["Metrics", "evaluate", "log_step", "optimizer_step", "run", "write_run_outputs"]
