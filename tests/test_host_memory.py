"""dsv3.memory.retain_freed_host_memory: glibc's malloc keeps freed host memory, so that a CPU step's large
tensors reuse mapped pages instead of faulting them in again; the CLI sets it first; DSV3_MALLOC=system keeps
glibc's defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsv3 import cli, memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a fresh process: 64 MiB allocated, touched and freed, then the minor page faults of doing it again
_FAULTS = """
import resource, sys
import torch
from dsv3.memory import retain_freed_host_memory
took = retain_freed_host_memory()
def touch():
    t = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB
    t.fill_(1.0)
    del t
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str | None) -> tuple[bool, int]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(memory.MALLOC_ENV, None)
    if env_value is not None:
        env[memory.MALLOC_ENV] = env_value
    r = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    took, faults = r.stdout.split()
    return took == "True", int(faults)


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    took, kept = _faults(None)
    assert took
    # 64 MiB is 16,384 pages of 4 KiB: reused, the second pass faults (almost) none of them in
    assert kept < 2048, kept
    off, default = _faults("system")
    assert not off
    # glibc's default maps a block this large with mmap and unmaps it when freed: every page faults again
    # (unless transparent huge pages back it: then 2 MiB pages, and nothing to compare)
    if default > 8192:
        assert kept * 4 < default, (kept, default)


def test_system_malloc_is_left_alone(monkeypatch):
    monkeypatch.setenv(memory.MALLOC_ENV, "system")
    assert memory.retain_freed_host_memory() is False


def test_the_cli_sets_it(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "retain_freed_host_memory", lambda: calls.append(1) or True)
    assert cli.main(["info", "--preset", "tiny"]) == 0
    assert calls == [1]
