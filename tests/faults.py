"""Test-only fault injection around `dsv3` (the CLI), for the failure tests: run it as torchrun's script
(or as a plain script); it patches this process from the JSON in $DSV3_TEST_FAULTS, then calls
dsv3.cli.main(argv). Nothing of it is in the package.

    python tests/faults.py train ...                                  (one process)
    python -m torch.distributed.run --nproc-per-node 2 --max-restarts 2 tests/faults.py train ...

$DSV3_TEST_FAULTS: a list of {"kind", "step", "rank" (default: every rank), "restart" (default 0:
torchrun's TORCHELASTIC_RESTART_COUNT of the attempt it applies to)}; kinds:
    nan          the loss of optimizer step `step` (1-based) is NaN on that rank
    kill_step    SIGKILL inside optimizer step `step` (after its forward/backward, before the update)
    kill_save    SIGKILL while checkpoint `step` is half written (after DCP wrote this rank's shard)
    disk_full    shutil.disk_usage reports 1 MiB free from optimizer step `step` on
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(plan: list[dict]) -> None:
    from dsv3.checkpoints import dcp
    from dsv3.training import loop
    from dsv3.training.pretrain import Pretrain

    rank = int(os.environ.get("RANK", "0"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    mine = [f for f in plan if f.get("rank", rank) == rank and f.get("restart", 0) == restart]
    now = {"step": 0}  # the optimizer step in progress (1-based)

    def when(kind):
        return {f["step"] for f in mine if f["kind"] == kind}

    real_hyper, real_loss = Pretrain.hyper, Pretrain.loss

    def hyper(self, step):
        now["step"] = step + 1
        return real_hyper(self, step)

    def loss(self, out, mb, hp):
        value, stats = real_loss(self, out, mb, hp)
        if now["step"] in when("nan"):
            value, stats = value * float("nan"), stats * float("nan")
        return value, stats

    Pretrain.hyper, Pretrain.loss = hyper, loss

    real_step = loop.optimizer_step

    def optimizer_step(*a, **k):
        if now["step"] in when("kill_step"):
            print(f"FAULT: killing rank {rank} in step {now['step']}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*a, **k)

    loop.optimizer_step = optimizer_step

    real_save_file = dcp.save_file

    def save_file(tensors, path, *a, **k):
        if any(f"step_{s:08d}" in path for s in when("kill_save")):
            print(f"FAULT: killing rank {rank} while saving {path}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save_file(tensors, path, *a, **k)

    dcp.save_file = save_file

    real_usage = shutil.disk_usage

    def disk_usage(path):
        u = real_usage(path)
        full = when("disk_full")
        if full and now["step"] >= min(full):
            return type(u)(u.total, u.total - 2**20, 2**20)
        return u

    shutil.disk_usage = disk_usage


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    install(json.loads(os.environ.get("DSV3_TEST_FAULTS", "[]")))
    from dsv3.cli import main

    sys.exit(main(sys.argv[1:]))
