"""Where a post-training run (SFT, GRPO) starts: the starting checkpoint and the run directory.

    resolve_start(path)      a Hugging Face-format checkpoint directory, a sharded (DCP) checkpoint of a
                             torchrun run, or a run directory (-> its latest checkpoint, either kind)
    load_start(path, device) the whole model of that checkpoint, fp32, on every rank alike (it is then
                             prepared for the layout: dsv3.training.strategy.prepare_model)
    run_directory(...)       out_dir/checkpoints and the checkpoint to resume from (the run's own)
    make_run_directory(...)  creates out_dir, once the data and the model are ready
    freeze_mtp(model)        the MTP modules are not trained after pre-training: frozen, no optimizer state

The rest of a run is the training loop's (dsv3/training/loop.py) with the layout's strategy: exact resume
from out_dir's checkpoints in any layout, Ctrl-C saves, metrics.jsonl, plots and summary.json.
"""

from __future__ import annotations

import os

from dsv3.checkpoints import dcp, rundir
from dsv3.checkpoints.files import check_creatable


# the starting checkpoint is found and loaded as `dsv3 train --init-from` does (dsv3/checkpoints/dcp.py)
resolve_start = dcp.resolve_any
load_start = dcp.load_whole


def run_directory(out_dir: str, resume: bool, strategy, say) -> tuple[str, str | None]:
    """-> (out_dir/checkpoints, the latest of them when resuming, else None). A run directory that already
    holds checkpoints is refused unless resuming (or restarted by torchrun). It is not created here but by
    make_run_directory, once the data and the model are ready: a run that fails before (bad data, a missing
    checkpoint) leaves no empty directory behind, as pre-training's does."""
    from dsv3.distributed.mesh import torchrun_restarts

    check_creatable(out_dir, "--out")  # (a file there or above it: os.makedirs's "[Errno 17]" / "[Errno 20]")
    ckpt_root = os.path.join(out_dir, "checkpoints")
    latest = rundir.latest_checkpoint(ckpt_root)
    resume = resume or torchrun_restarts() > 0  # a torchrun --max-restarts restart resumes
    if latest is not None and not resume:
        raise ValueError(f"{out_dir} already holds checkpoints: pass resume=True (--resume) to continue, or "
                         "another out_dir")
    if resume and latest is None:
        say(f"resume: no checkpoint in {ckpt_root}; starting from the given checkpoint")
    return ckpt_root, latest


def make_run_directory(out_dir: str, strategy) -> None:
    """Rank 0 creates the run directory (every rank calls this, after run_directory and before writing in it)."""
    if strategy.is0:
        os.makedirs(out_dir, exist_ok=True)
    strategy.barrier()


def freeze_mtp(model) -> None:
    """Post-training trains the main model only (forwards with with_mtp=False): the MTP modules' parameters
    are frozen before the model is prepared, so every layout leaves them exactly as they were (no
    gradient, no optimizer state; a replicated layout would otherwise step them with zero gradients)."""
    for mod in model.mtp:
        mod.requires_grad_(False)


__all__ = ["freeze_mtp", "load_start", "make_run_directory", "resolve_start", "run_directory"]
