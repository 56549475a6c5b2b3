"""PNG plots of a run, from its metrics.jsonl: loss curves, the per-layer expert load over time as
heatmaps (the share of routed tokens each expert received at each logged step), and for GRPO runs the
reward, accuracy and KL to the reference."""

from __future__ import annotations

import json
import os
import warnings

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def plot_run(run_dir: str) -> list[str]:
    recs = read_metrics(run_dir)
    key = "main" if any("main" in r for r in recs) else "loss"  # GRPO: the surrogate loss (no "main")
    train = [r for r in recs if key in r and "lr" in r]
    val = [r for r in recs if "val_loss" in r]
    out = []

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        s = [r["step"] for r in train]
        ax[0].plot(s, [r[key] for r in train], label="train next-token loss" if key == "main" else "train loss")
        if any(r.get("mtp") for r in train):
            ax[0].plot(s, [r["mtp"] for r in train], label="train MTP loss (mean over depths)")
        ax[1].plot(s, [r["lr"] for r in train], color="tab:gray")
    if val:
        ax[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("cross-entropy (nats)" if key == "main" else "loss")
    ax[0].legend(), ax[0].grid(alpha=0.3)
    ax[1].set_xlabel("step"), ax[1].set_ylabel("learning rate"), ax[1].grid(alpha=0.3)
    fig.tight_layout()
    p = os.path.join(run_dir, "loss.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)

    loads = [r for r in train if "load" in r]
    if loads:
        arr = np.array([r["load"] for r in loads])  # (steps, layers, experts)
        L = arr.shape[1]
        names = _moe_layer_names(run_dir, L)
        fig, axes = plt.subplots(L, 1, figsize=(10, 1.6 + 1.4 * L), squeeze=False)
        for i in range(L):
            a = axes[i, 0]
            im = a.imshow(arr[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                          extent=(loads[0]["step"] - 0.5, loads[-1]["step"] + 0.5, -0.5, arr.shape[2] - 0.5))
            mv = [r["maxvio"][i] for r in loads]
            a.set_title(f"{names[i]}: expert load share (final MaxVio {mv[-1]:.2f})", fontsize=9)
            a.set_ylabel("expert")
            fig.colorbar(im, ax=a, fraction=0.02)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        p = os.path.join(run_dir, "expert_load.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)

    rl = [r for r in train if "reward_mean" in r]
    if rl:  # GRPO
        held = [r for r in recs if "heldout_acc" in r]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        s = [r["step"] for r in rl]
        ax[0].plot(s, [r["reward_mean"] for r in rl], label="reward (mean over the P x G samples)")
        ax[0].plot(s, [r["accuracy"] for r in rl], label="sample accuracy")
        if held:
            ax[0].plot([r["step"] for r in held], [r["heldout_acc"] for r in held], "o-", label="held-out greedy accuracy")
        ax[0].set_xlabel("step"), ax[0].set_ylabel("reward / accuracy"), ax[0].legend(fontsize=8), ax[0].grid(alpha=0.3)
        ax[1].plot(s, [r["kl"] for r in rl], color="tab:red")
        ax[1].set_xlabel("step"), ax[1].set_ylabel("KL(policy || reference), k3, per token"), ax[1].grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(run_dir, "reward.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    return out
