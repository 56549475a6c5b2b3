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

    retain_freed_host_memory()   glibc's malloc keeps the host memory a process frees for its next
                                 allocations (the CLI, where the model runs on the CPU; DSV3_MALLOC=system
                                 leaves glibc's defaults)
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

SKIP_ENV = "DSV3_SKIP_MEMORY_CHECK"
MALLOC_ENV = "DSV3_MALLOC"
# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_BYTES = 1 << 30


def retain_freed_host_memory() -> bool:
    """Make glibc's malloc take every block from its heap (no mmap: M_MMAP_MAX 0) and keep up to 1 GiB of freed
    memory at the heap's top (M_TRIM_THRESHOLD), so that a step's large CPU tensors (logits, their gradients,
    activations: one 32 MiB block each at the `tiny` preset's 8 x 256 x 4,096 logits) reuse pages already mapped
    instead of an mmap, a page fault per 4 KiB touched and a munmap each time. The established remedy for CPU
    PyTorch (PyTorch's CPU tuning guide, Intel's launcher: jemalloc or tcmalloc that keep freed memory); this one
    needs no preloaded library. Measured on the 2-core CPU VM (bench/cpu_malloc.py, bench/RESULTS.md, 2026-12-07):
    a `tiny` training step 1.26x faster, a width-512 one 1.37x, the same losses to the bit; minor page faults a
    step 2 against 33-41k (`tiny`) and 335-351k (width 512); the cost is resident memory, freed memory being
    kept, not returned: 1.01-1.07 GB against 0.78-0.87 (`tiny`, steady over 120 steps), 2.6 against 1.6 GB at
    width 512. Only where the C library is glibc (Linux); elsewhere,
    or with DSV3_MALLOC=system, nothing changes. Returns whether the settings took. Process-wide and for the
    process's life: the CLI calls it for the verbs whose model runs on the CPU (cli.computes_on_the_cpu; a
    library user may call it too)."""
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has a mallopt that does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))


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
