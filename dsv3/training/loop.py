"""The training loop: one for every task (pre-training, SFT, GRPO) and every layout (one process,
FSDP2 / expert parallelism, pipeline), which are plugged in (dsv3/training/strategy.py, a task below).

    for step in range(start, total):
        hp = task.hyper(step)                       lr, and the task's own (MTP weight λ, bias speed γ, ...)
        micro-batches = task.micro_batches(step)    this rank's rows of the step's global batch
        stats, counts = strategy.forward_backward   gradients of the global mean loss, synchronised
        AdamW step, the clip coefficient min(1, c / (‖g‖ + 1e-6)) applied inside the update; skipped
            (nothing changes) where the loss or the gradient norm is not finite
        task.after_step(counts, hp, applied)        e.g. the aux-loss-free bias update from global loads
        log (rank 0), periodic evaluation, periodic checkpoint
    final checkpoint (Ctrl-C / SIGTERM: after the current step, on every rank at the same step), final
    evaluation, plots and summary.json

Non-finite steps (NonFiniteGuard): a step whose loss (the task's first statistic) or global gradient
norm is NaN or infinite is skipped on the device, without a host sync: the AdamW update is masked
(parameters, moments and step counts keep their bits) and so is the bias update (`applied` False).
Skipped steps are counted (`skipped_steps` in the logged records and the summary). After
`max_skipped_steps` consecutive skipped steps every later step is skipped too, and the loop stops at the
next logged step (so up to log_every - 1 steps later; every rank reads the same global values, so all
stop together): it saves a checkpoint, reason "nonfinite", holding the weights, optimizer state and
biases from before the first skipped step of that run (they were never touched) with the data position
after it (a resume does not replay those batches), writes the summary and raises NonFiniteError.

A task is an object with:
    name, total_steps, stat_names (the names of the (k,) statistics its loss returns; the first is the loss)
    hyper(step) -> dict with "lr"
    micro_batches(step) -> list of this rank's micro-batches (any objects model_inputs/loss understand)
    model_inputs(mb, hp) -> keyword arguments of the model's forward;  loss(out, mb, hp) -> (loss, stats)
    after_step(strategy, counts, hp, applied) -> None (applied: a 0-dim bool device tensor, False on a skipped
        step: the task leaves its state as it was);  log_fields(hp) -> dict added to each logged record
    tokens_per_step(step) -> int;  state_dict() / load_state_dict(sd) (the data position)
    evaluate(strategy, max_batches) -> dict or None (None: the task has no periodic evaluation);
    eval_message(ev) -> str
    summary() -> dict added to summary.json
    boundary(step) -> bool (optional, default True): whether a checkpoint may be written after `step` steps
        (GRPO: only between sampled batches); a Ctrl-C waits for the next boundary

Every rank runs the loop; rank 0 writes metrics.jsonl (+ TensorBoard when installed), the progress bar,
plots and summary.json. The loop reads the device once per logged step (loss, gradient norm and the
skipped-step counters).
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
from dsv3.training.config import MAX_SKIPPED_STEPS


class NonFiniteError(RuntimeError):
    """The run stopped after too many consecutive steps with a non-finite loss or gradient norm."""


# --------------------------------------------------------------------------------------------------
# evaluation (every layout: the strategy gives this rank's logits and sums over the ranks)

@torch.no_grad()
def evaluate(strategy, batches, token_bytes: np.ndarray, autocast, max_batches: int | None = None,
             on_batch=None) -> dict:
    """Mean next-token loss and bits per byte over the validation windows `batches` (this rank's rows;
    the byte count of the targets). Ranks without an output head (inner pipeline stages) add nothing.
    `on_batch()` is called after each batch (a progress bar's update)."""
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
        if on_batch is not None:
            on_batch()
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
    path = os.path.join(out_dir, "summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:  # a crash mid-write leaves the old summary whole
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------------------
# the loop

class NonFiniteGuard:
    """Device-side counters of skipped steps (module docstring): `check` gives the step's `applied` flag
    from its gradient norm and loss; `read` (a host read, at logged steps) the counters."""

    def __init__(self, device: torch.device, max_consecutive: int):
        self.max_consecutive = max_consecutive  # 0: never stop
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # in this process
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)

    def check(self, gnorm: torch.Tensor, loss: torch.Tensor | None) -> torch.Tensor:
        ok = torch.isfinite(gnorm).to(self.tripped.device)
        if loss is not None:
            ok = ok & torch.isfinite(loss).to(ok.device)
        ok = ok & ~self.tripped
        self.skipped += ~ok
        self.consecutive = torch.where(ok, 0, self.consecutive + 1)
        if self.max_consecutive > 0:
            self.tripped |= self.consecutive >= self.max_consecutive
        return ok

    def restore(self, skipped: int, consecutive: int) -> None:
        """The counters of a resumed run (its checkpoint's); tripped where `consecutive` reaches the limit (as it
        was: a tripped guard skips every step until the loop stops)."""
        self.skipped.fill_(skipped)
        self.consecutive.fill_(consecutive)
        self.tripped.fill_(self.max_consecutive > 0 and consecutive >= self.max_consecutive)

    def read(self, gnorm: torch.Tensor | None = None) -> tuple[float, int, int, bool]:
        """(gnorm, skipped steps, consecutive skipped steps, stop): one host read (the logged step's)."""
        g = torch.zeros(()) if gnorm is None else gnorm.detach()
        g = g.to(self.skipped.device)
        g, s, c, t = torch.stack([g.double(), self.skipped.double(), self.consecutive.double(),
                                  self.tripped.double()]).tolist()
        return g, int(s), int(c), bool(t)


def optimizer_step(strategy, opt, grad_clip: float, guard: NonFiniteGuard | None = None,
                   loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The AdamW step with the gradient clip folded in: coefficient min(1, c / (‖g‖ + 1e-6)) from the
    global norm (torch.nn.utils.clip_grad_norm_'s), applied inside the update. With `guard`, the step is
    skipped on the device where ‖g‖ or `loss` is not finite. Returns (‖g‖, applied) (device tensors;
    applied None without a guard)."""
    norm = strategy.grad_norm(opt)
    coef = (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip and grad_clip > 0 else None
    applied = guard.check(norm, loss) if guard is not None else None
    if applied is None:
        opt.step(grad_scale=coef)
    else:
        opt.step(grad_scale=coef, skip=~applied)
    opt.zero_grad(set_to_none=True)
    return norm, applied


def run(task, strategy, opt, *, out_dir: str, step: int, tokens_seen: int, autocast, grad_clip: float,
        save, log_every: int = 1, eval_every: int = 0, eval_batches: int | None = None, save_every: int = 0,
        max_skipped_steps: int = MAX_SKIPPED_STEPS, progress: bool = True, plots: bool = True, use_tb: bool = True,
        saves: bool = True, skip_counts: dict | None = None, log=print) -> dict:
    """Run `task` from optimizer step `step` to task.total_steps. save(reason, step, tokens) writes a
    checkpoint and returns its path (a collective on every rank), or, with saves=False (a run without
    checkpoints), writes nothing and returns None. Returns the summary (every rank);
    raises NonFiniteError after saving where max_skipped_steps consecutive steps were not finite.
    skip_counts: the guard's counters {"skipped_steps", "consecutive_skipped_steps"}, run state that a checkpoint
    carries: their values at `step` (a resumed run's), kept current before every save for `save` to write."""
    say = strategy.log(log)
    total = task.total_steps
    metrics = Metrics(out_dir, use_tb=use_tb) if strategy.is0 else None
    stop = {"flag": False}
    guard = NonFiniteGuard(strategy.device, max_skipped_steps)
    if skip_counts is not None:
        guard.restore(skip_counts["skipped_steps"], skip_counts["consecutive_skipped_steps"])

    def counted() -> None:  # the counters, for the save that follows (a host read: a save syncs anyway)
        if skip_counts is not None:
            _, s, c, _ = guard.read()
            skip_counts.update(skipped_steps=s, consecutive_skipped_steps=c)
    nonfinite = None  # (skipped, consecutive) when the guard stopped the run

    def on_signal(signum, frame):
        if stop["flag"]:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        stop["flag"] = True
        say("\ninterrupt: " + ("saving a checkpoint after this step" if saves else
                                "stopping after this step, without a checkpoint (--no-checkpoints)")
            + " (Ctrl-C again to abort)")

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
            gnorm, applied = optimizer_step(strategy, opt, grad_clip, guard, stats[0] if stats is not None else None)
            task.after_step(strategy, counts, hp, applied)
            n_tok = task.tokens_per_step(step)
            step += 1
            tokens_seen += n_tok
            tok_since += n_tok
            if step % log_every == 0 or step == total or step == 1:
                now = time.perf_counter()
                vals = stats.tolist() if stats is not None else []
                gn, skipped, consecutive, tripped = guard.read(gnorm)
                rec = {"step": step, "tokens": tokens_seen, "lr": hp["lr"], **task.log_fields(hp),
                       "grad_norm": gn, "tok_per_s": tok_since / max(now - t_last, 1e-9),
                       "skipped_steps": skipped, **dict(zip(task.stat_names, vals))}
                if strategy.world_size > 1:
                    rec["world_size"] = strategy.world_size
                if metrics is not None:
                    last = log_step(rec, counts, metrics, bar)
                else:
                    last = rec
                t_last, tok_since = now, 0
                if tripped:  # the same values on every rank: all stop here
                    nonfinite = (skipped, consecutive)
                    break
            if bar is not None:
                bar.update(1)
            if eval_every > 0 and step % eval_every == 0 and step < total:
                ev = task.evaluate(strategy, eval_batches)
                if ev is not None:
                    if metrics is not None:
                        metrics.log({"step": step, **ev})
                    say(f"step {step}: {task.eval_message(ev)}")
            if save_every > 0 and step % save_every == 0 and step < total and boundary(step):
                _settle(opt)
                counted()
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

    _settle(opt)
    skipped = guard.read()[1] if nonfinite is None else nonfinite[0]
    counted()
    path = save("nonfinite" if nonfinite else "interrupted" if stop["flag"] else "final", step, tokens_seen)
    summary = {"step": step, "total_steps": total, "tokens": tokens_seen, "checkpoint": path,
               "train_loss": last.get("main", last.get("loss")), "interrupted": stop["flag"],
               "skipped_steps": skipped, **task.summary()}
    if nonfinite:
        first = step - nonfinite[1] + 1
        summary["stopped"] = (f"{nonfinite[1]} consecutive steps skipped (steps {first}-{step}): the loss or "
                              f"gradient norm was not finite in max_skipped_steps ({max_skipped_steps}) steps in a "
                              f"row; the weights and optimizer state are those after step {first - 1}, "
                              + (f"saved in {path} with the data position after step {step}" if path else
                                 "not saved (no checkpoints)"))
    if strategy.world_size > 1:
        summary["world_size"] = strategy.world_size
    if not stop["flag"] and not nonfinite:
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
    if nonfinite:
        raise NonFiniteError(f"stopped at step {step}: {summary['stopped']}")
    return summary


def _settle(opt) -> None:
    """The optimizer's step counts made current before a checkpoint reads them (dsv3 AdamW.settle)."""
    settle = getattr(opt, "settle", None)
    if settle is not None:
        settle()


__all__ = ["Metrics", "NonFiniteError", "NonFiniteGuard", "evaluate", "log_step", "optimizer_step", "run",
           "write_run_outputs"]
