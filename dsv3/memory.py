"""Memory checks before allocating: a model that cannot fit is refused in one line, instead of an
allocator traceback minutes later (or the kernel's OOM killer).

    available_bytes(device)      what the device can still give: CPU = MemAvailable of /proc/meminfo,
                                 lowered to the cgroup's limit - usage when the process runs in one
                                 (a container); CUDA = free memory (torch.cuda.mem_get_info); None where
                                 unknown (then nothing is checked)
    ensure_fits(nbytes, device, what)   raise InsufficientMemoryError when nbytes > available_bytes

Callers compute `nbytes` from the config alone (dsv3.info.param_count, no model built): loading
(dsv3.checkpoints.hf.load_pretrained, the weights), building (dsv3.model.build_model, the weights) and
pre-training (dsv3.training.pretrain.train, weights + gradients + AdamW state, before the tokenizer or
the data are touched). The estimate leaves out activations and allocator slack, so passing the check
does not promise that a run fits; failing it means it cannot.

Escape hatch: the environment variable DSV3_SKIP_MEMORY_CHECK=1 turns the check off (swap, memory that
frees up later, an estimate that is wrong for an unusual setup).
"""

from __future__ import annotations

import os

import torch

SKIP_ENV = "DSV3_SKIP_MEMORY_CHECK"


class InsufficientMemoryError(ValueError):
    """The device does not have the memory a model needs; the message gives both figures."""


def format_bytes(n: float) -> str:
    """Decimal units, one decimal: 21.3 GB, 4.0 TB."""
    for unit, div in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{int(n)} B"


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cpu_available() -> int | None:
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # kB
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    # cgroup v2 (containers): the limit minus what the group already uses
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        avail = min(avail, max(0, limit - used))
    return avail


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes the device can still allocate, or None where dsv3 cannot tell (then nothing is checked)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return _cpu_available()
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(dev)[0]
    return None


def _describe(device: torch.device) -> str:
    if device.type == "cpu":
        return "this CPU has"
    return f"this GPU ({device}) has"


def ensure_fits(nbytes: int, device: torch.device | str, what: str) -> None:
    """Raise InsufficientMemoryError when `nbytes` exceed what `device` has available. `what` completes
    "... needs N bytes <what>", e.g. "for fp32 weights + gradients + AdamW state (1.2B parameters)"."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    dev = torch.device(device)
    avail = available_bytes(dev)
    if avail is None or nbytes <= avail:
        return
    raise InsufficientMemoryError(f"the model needs {format_bytes(nbytes)} {what}; {_describe(dev)} "
                                  f"{format_bytes(avail)} available (set {SKIP_ENV}=1 to try anyway)")


__all__ = ["InsufficientMemoryError", "available_bytes", "ensure_fits", "format_bytes"]
