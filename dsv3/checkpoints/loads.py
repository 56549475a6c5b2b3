"""Recorded expert loads on disk: (MoE blocks, experts) token counts as a .pt dict {"expert_counts": ...} or a
bare .npy array, written atomically (`save_counts`) and read back (`load_counts`) for `--expert-loads`
(dsv3/inference/eplb.py); `check_writable` refuses a path that cannot take the file before any work starts."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from dsv3.checkpoints.hf import _umask


def check_writable(path: str) -> None:
    """Raise ValueError naming `path` unless a file can be written there (its directory is made if missing)."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"{path}: is a directory; give a file name (e.g. {os.path.join(path, 'loads.pt')})")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{path}: cannot create its directory: {e.strerror}") from None
    if not os.access(d, os.W_OK):
        raise ValueError(f"{path}: its directory {d} is not writable")


def save_counts(counts: torch.Tensor, path: str, **meta) -> str:
    """Write recorded loads (L, E) as a .pt dict {"expert_counts": counts, **meta} (or, for a path ending in
    .npy, the bare array) atomically: a temporary file beside `path`, then a rename, so an interrupted write
    never leaves a truncated file where an earlier recording was. Returns the path."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".loads-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".npy"):
                np.save(f, counts.cpu().numpy())
            else:
                torch.save({"expert_counts": counts.cpu(), **meta}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_counts(path: str) -> torch.Tensor:
    """Recorded loads (L, E) from a .npy array or a .pt tensor (or a dict holding 'expert_counts')."""
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if "expert_counts" not in obj:
            raise ValueError(f"{path}: a dict without 'expert_counts' (keys: {sorted(map(str, obj))[:8]})")
        obj = obj["expert_counts"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a tensor of per-expert token counts")
    return obj
