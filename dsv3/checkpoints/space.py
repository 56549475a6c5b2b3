"""Disk space for training checkpoints: the check before a save and the error when the disk fills.

A checkpoint needs about the bytes of its tensors: the model's state dict (fp32 masters) plus the AdamW
moments and step counts, i.e. ~12 bytes per parameter with fp32 moments (a `small` run's ~12 GB). Old
checkpoints are deleted only after the new one is complete (keep-last-K rotation), so the new one needs
all of that space free. Before writing, a save compares `required(bytes)` with the free space of the
checkpoint directory's filesystem (shutil.disk_usage); a save that would not fit, or one whose write
fails with ENOSPC / EDQUOT after all (another writer, a wrong estimate), removes its temporary
directory, leaves the earlier checkpoints as they were and raises DiskFullError, whose message is one
line with what the save needed and what was free. Sharded saves (dsv3/checkpoints/dcp.py) decide on
every rank together: one rank's full disk stops all of them. `dsv3` prints the message and exits 2.
"""

from __future__ import annotations

import errno
import os
import shutil

import torch

SLACK = 64 * 2**20  # JSON, tokenizer files, RNG states, file headers
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# how the errors of writers that are not Python file objects read (safetensors: a Rust io::Error)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded",
                  f"os error {errno.ENOSPC}", f"os error {errno.EDQUOT}")


class DiskFullError(RuntimeError):
    """A checkpoint that does not fit on the disk; nothing of it was left behind."""


def fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of `t` on disk: its global size (a DTensor's numel is the global one)."""
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, opt) -> int:
    """Bytes of a one-process checkpoint's tensors: the model's state dict and the optimizer's state."""
    n = sum(tensor_bytes(t) for t in model.state_dict().values())
    for st in opt.state.values():
        n += sum(tensor_bytes(v) for v in st.values() if torch.is_tensor(v))
    return n


def required(nbytes: int) -> int:
    """What a checkpoint of `nbytes` tensor bytes asks the disk for: + 1% and SLACK."""
    return nbytes + nbytes // 100 + SLACK


def free_bytes(path: str) -> int:
    """Free bytes (for this user) on the filesystem of `path` or of its nearest existing parent."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, its causes or (torch.distributed.checkpoint's CheckpointException) any rank's
    failure is a full disk or an exhausted quota."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        if not isinstance(e, OSError) and any(s in str(e) for s in DISK_FULL_TEXT):
            return True
        failures = getattr(e, "failures", None)  # {rank: (exception, traceback)}
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        stack += [e.__cause__, e.__context__]
    return False


def no_room(root: str, step: int, needed: int, free: int, previous: str | None) -> DiskFullError:
    """The error of a save that does not fit (checked before writing)."""
    return DiskFullError(f"not enough disk space for checkpoint step {step} in {root}: it needs {fmt(needed)}, "
                         f"{fmt(free)} free; {_kept(previous)}")


def filled(root: str, step: int, needed: int, free: int, previous: str | None) -> DiskFullError:
    """The error of a save whose write ran out of space (its partial files already removed)."""
    return DiskFullError(f"the disk filled while writing checkpoint step {step} in {root}: it needs about "
                         f"{fmt(needed)}, {fmt(free)} free after removing its partial files; {_kept(previous)}")


def _kept(previous: str | None) -> str:
    return (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint") + \
        " (free some space, e.g. fewer kept checkpoints, then resume)"


def check(root: str, step: int, needed: int, previous: str | None) -> None:
    """Raise DiskFullError unless `needed` bytes are free for checkpoint `step` under `root`."""
    free = free_bytes(root)
    if free < needed:
        raise no_room(root, step, needed, free, previous)


__all__ = ["DiskFullError", "check", "filled", "free_bytes", "is_disk_full", "no_room", "required", "state_bytes",
           "tensor_bytes"]
