"""PNG plots of a run, from its metrics.jsonl: loss curves, the per-layer expert load over time as
heatmaps (the share of routed tokens each expert received at each logged step), and for GRPO runs the
reward, accuracy and KL to the reference. Each figure is built by its own function (loss_figure,
expert_load_figure, reward_figure) and titled with the run's name, so plots of several runs tell
themselves apart; plot_run writes them.

Figures are matplotlib `Figure`s, not pyplot's: no global figure registry, nothing to close, no window."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
from matplotlib.figure import Figure


def read_metrics(run_dir: str) -> list[dict]:
    """The records of run_dir/metrics.jsonl. A line that is not a JSON object with a step (a record torn
    by a crash, which a resumed run then appends to) is skipped with a warning naming it."""
    path = os.path.join(run_dir, "metrics.jsonl")
    recs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                r = e
            if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                warnings.warn(f"{path}:{lineno}: skipped a malformed record", stacklevel=2)
                continue
            recs.append(r)
    # a resumed run appends: keep the last record of each (step, kind); step records carry the lr,
    # evaluation records (val_loss, heldout_acc, ...) do not
    seen: dict[tuple, dict] = {}
    for r in recs:
        seen[(r["step"], "lr" in r)] = r
    return sorted(seen.values(), key=lambda r: r["step"])


def _moe_layer_names(run_dir: str, n: int) -> list[str]:
    """Rows of the load records are the main MoE layers, then the MTP modules."""
    try:
        from dsv3.config import ModelConfig

        with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as f:
            cfg = ModelConfig.from_dict(json.load(f)["model"])
        names = [f"layer {i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        names += [f"MTP module {k + 1}" for k in range(cfg.num_nextn_predict_layers)]
        if len(names) == n:
            return names
    except (OSError, KeyError, ValueError):
        pass
    return [f"MoE row {i}" for i in range(n)]


LOAD_LABEL = "share of routed tokens"  # what expert_load_figure's heatmaps show (metrics.jsonl "load")


def _train_key(recs: list[dict]) -> str:
    return "main" if any("main" in r for r in recs) else "loss"  # GRPO: the surrogate loss (no "main")


def loss_figure(recs: list[dict], run_name: str) -> Figure:
    """Training (and validation) loss beside the learning rate. The MTP loss is drawn first, thin and
    light, so the next-token loss (the one that matters, and close to it in value) stays visible on top."""
    key = _train_key(recs)
    train = [r for r in recs if key in r and "lr" in r]
    val = [r for r in recs if "val_loss" in r]
    fig = Figure(figsize=(11, 4.3))
    ax = fig.subplots(1, 2)
    if train:
        s = [r["step"] for r in train]
        if any(r.get("mtp") for r in train):
            ax[0].plot(s, [r.get("mtp", np.nan) for r in train], color="tab:orange", alpha=0.45, linewidth=0.9,
                       zorder=1, label="train MTP loss (mean over depths)")
        ax[0].plot(s, [r[key] for r in train], color="tab:blue", linewidth=1.6, zorder=3,
                   label="train next-token loss" if key == "main" else "train loss")
        ax[1].plot(s, [r["lr"] for r in train], color="tab:gray")
    if val:
        ax[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:green", zorder=4,
                   label="val loss")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("cross-entropy (nats)" if key == "main" else "loss")
    ax[0].legend(), ax[0].grid(alpha=0.3)
    ax[1].set_xlabel("step"), ax[1].set_ylabel("learning rate"), ax[1].grid(alpha=0.3)
    fig.suptitle(f"{run_name}: loss and learning rate")
    fig.tight_layout()
    return fig


def expert_load_figure(recs: list[dict], run_name: str, layer_names: list[str] | None = None) -> Figure | None:
    """One heatmap per MoE layer (rows of the records' "load": the main MoE layers, then the MTP
    modules): expert x step, coloured by the expert's share of the layer's routed tokens. None when the
    records carry no load."""
    loads = [r for r in recs if "load" in r and "lr" in r]
    if not loads:
        return None
    arr = np.array([r["load"] for r in loads])  # (steps, layers, experts)
    L = arr.shape[1]
    names = layer_names or [f"MoE row {i}" for i in range(L)]
    fig = Figure(figsize=(10, 1.9 + 1.6 * L))
    axes = fig.subplots(L, 1, squeeze=False)
    for i in range(L):
        a = axes[i, 0]
        im = a.imshow(arr[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                      extent=(loads[0]["step"] - 0.5, loads[-1]["step"] + 0.5, -0.5, arr.shape[2] - 0.5))
        mv = [r["maxvio"][i] for r in loads]
        a.set_title(f"{names[i]}: expert load share (final MaxVio {mv[-1]:.2f})", fontsize=9)
        a.set_ylabel("expert"), a.set_xlabel("step")
        fig.colorbar(im, ax=a, fraction=0.02).set_label(LOAD_LABEL, fontsize=8)
    fig.suptitle(f"{run_name}: expert load per MoE layer")
    fig.tight_layout()
    return fig


def reward_figure(recs: list[dict], run_name: str) -> Figure | None:
    """GRPO: reward and accuracy (samples and held-out), and the KL to the reference. None for other runs."""
    rl = [r for r in recs if "reward_mean" in r and "lr" in r]
    if not rl:
        return None
    held = [r for r in recs if "heldout_acc" in r]
    fig = Figure(figsize=(11, 4.3))
    ax = fig.subplots(1, 2)
    s = [r["step"] for r in rl]
    ax[0].plot(s, [r["reward_mean"] for r in rl], label="reward (mean over the P x G samples)")
    ax[0].plot(s, [r["accuracy"] for r in rl], label="sample accuracy")
    if held:
        ax[0].plot([r["step"] for r in held], [r["heldout_acc"] for r in held], "o-", label="held-out greedy accuracy")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("reward / accuracy"), ax[0].legend(fontsize=8), ax[0].grid(alpha=0.3)
    ax[1].plot(s, [r["kl"] for r in rl], color="tab:red")
    ax[1].set_xlabel("step"), ax[1].set_ylabel("KL(policy || reference), k3, per token"), ax[1].grid(alpha=0.3)
    fig.suptitle(f"{run_name}: reward and KL")
    fig.tight_layout()
    return fig


def run_figures(run_dir: str) -> dict[str, Figure]:
    """file name -> figure, for the plots run_dir's metrics.jsonl has data for."""
    recs = read_metrics(run_dir)
    name = os.path.basename(os.path.abspath(run_dir))
    figs = {"loss.png": loss_figure(recs, name)}
    n_rows = next((len(r["load"]) for r in recs if "load" in r), 0)
    extra = {"expert_load.png": expert_load_figure(recs, name, _moe_layer_names(run_dir, n_rows)),
             "reward.png": reward_figure(recs, name)}
    figs.update({k: f for k, f in extra.items() if f is not None})
    return figs


def plot_run(run_dir: str) -> list[str]:
    """Write run_dir's plots (loss.png, expert_load.png when the run has MoE layers, reward.png for GRPO);
    returns their paths."""
    out = []
    for fname, fig in run_figures(run_dir).items():
        p = os.path.join(run_dir, fname)
        fig.savefig(p, dpi=110)
        out.append(p)
    return out
