"""dsv3/training/plots.py: the figures of a run, built from a synthetic metrics.jsonl and inspected as
matplotlib objects: titles naming the run, the next-token loss drawn over the lighter MTP curve, labelled
axes and colour bars; plot_run writes the PNGs. CPU, a few seconds (most of it importing matplotlib).

Run: python -m pytest tests/test_plots.py -q
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from dsv3.config import ModelConfig  # noqa: E402
from dsv3.training.plots import LOAD_LABEL, plot_run, run_figures  # noqa: E402


def write_run(run_dir, grpo: bool = False) -> None:
    """metrics.jsonl of 12 logged steps over 2 MoE rows of 4 experts (pre-training's fields, or GRPO's),
    a validation record, and the train_config.json that names the MoE rows."""
    run_dir.mkdir(parents=True)
    recs = []
    for s in range(1, 13):
        r = {"step": s, "lr": 1e-3, "load": [[0.25] * 4, [0.4, 0.3, 0.2, 0.1]], "maxvio": [0.0, 0.6]}
        if grpo:
            r.update(loss=0.01, reward_mean=s / 12, accuracy=s / 24, kl=0.001 * s)
        else:
            r.update(main=5 - 0.1 * s, mtp=5.1 - 0.1 * s, loss=6.0)
        recs.append(r)
    recs.append({"step": 12, "heldout_acc": 0.5} if grpo else {"step": 12, "val_loss": 3.9})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = ModelConfig(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_group=1, topk_group=1,
                      num_experts_per_tok=2, num_nextn_predict_layers=1)
    (run_dir / "train_config.json").write_text(json.dumps({"model": cfg.to_dict()}), encoding="utf-8")


def test_loss_figure_names_the_run_and_keeps_the_next_token_loss_on_top(tmp_path):
    write_run(tmp_path / "tiny-lr3e-3")
    fig = run_figures(str(tmp_path / "tiny-lr3e-3"))["loss.png"]
    assert "tiny-lr3e-3" in fig.get_suptitle()
    loss_ax, lr_ax = fig.axes
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    main, mtp = lines["train next-token loss"], lines["train MTP loss (mean over depths)"]
    assert "val loss" in lines
    # the MTP curve lies close to the next-token one: drawn first, below, lighter and thinner
    assert loss_ax.get_lines().index(mtp) < loss_ax.get_lines().index(main)
    assert mtp.get_zorder() < main.get_zorder()
    assert mtp.get_alpha() is not None and mtp.get_alpha() < 1 and (main.get_alpha() or 1) == 1
    assert mtp.get_linewidth() < main.get_linewidth()
    for ax in (loss_ax, lr_ax):
        assert ax.get_xlabel() == "step" and ax.get_ylabel()


def test_expert_load_figure_labels_every_axis_and_colour_bar(tmp_path):
    write_run(tmp_path / "tiny")
    fig = run_figures(str(tmp_path / "tiny"))["expert_load.png"]
    assert "tiny" in fig.get_suptitle()
    heat = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split(":")[0] for ax in heat] == ["layer 1", "MTP module 1"]
    for ax in heat:
        assert ax.get_xlabel() == "step" and ax.get_ylabel() == "expert"
        assert ax.images[0].colorbar.ax.get_ylabel() == LOAD_LABEL == "share of routed tokens"


def test_grpo_figures_and_plot_run_writes_them(tmp_path):
    run = tmp_path / "grpo-run"
    write_run(run, grpo=True)
    figs = run_figures(str(run))
    assert set(figs) == {"loss.png", "expert_load.png", "reward.png"}
    for fig in figs.values():
        assert "grpo-run" in fig.get_suptitle()
        assert all(ax.get_xlabel() == "step" for ax in fig.axes if ax.get_lines() or ax.images)
    assert [ln.get_label() for ln in figs["loss.png"].axes[0].get_lines()] == ["train loss"]  # no MTP in GRPO
    paths = plot_run(str(run))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["expert_load.png", "loss.png", "reward.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
