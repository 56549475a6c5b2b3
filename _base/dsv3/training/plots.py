"""PNG plots of a run, from its metrics.jsonl: loss curves, and the per-layer expert load over time
as heatmaps (the share of routed tokens each expert received at each logged step)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    recs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    # a resumed run appends: keep the last record of each (step, kind)
    seen: dict[tuple, dict] = {}
    for r in recs:
        seen[(r["step"], "val_loss" in r)] = r
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
    train = [r for r in recs if "main" in r]
    val = [r for r in recs if "val_loss" in r]
    out = []

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        s = [r["step"] for r in train]
        ax[0].plot(s, [r["main"] for r in train], label="train next-token loss")
        if any(r.get("mtp") for r in train):
            ax[0].plot(s, [r["mtp"] for r in train], label="train MTP loss (mean over depths)")
        ax[1].plot(s, [r["lr"] for r in train], color="tab:gray")
    if val:
        ax[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("cross-entropy (nats)"), ax[0].legend(), ax[0].grid(alpha=0.3)
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
    return out
