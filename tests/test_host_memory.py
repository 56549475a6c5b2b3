"""dsv3.memory.retain_freed_host_memory: glibc's malloc keeps freed host memory, so that a CPU step's large
tensors reuse mapped pages instead of faulting them in again; the CLI sets it where a model runs on the CPU;
DSV3_MALLOC=system keeps glibc's defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsv3 import cli, memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a fresh process: a training step's pattern (32 MiB activations, their gradients, all freed at its end) run
# 8 times, then the median of the minor page faults of 9 more steps (with the setting the heap grows by a block
# at a few of the first ~20 steps, 5 times in 300, then not at all)
_FAULTS = """
import resource
import torch
from dsv3.memory import retain_freed_host_memory
took = retain_freed_host_memory()
torch.manual_seed(0)
def step():
    a = torch.randn(2048, 4096, requires_grad=True)
    torch.log_softmax(a, -1).pow(2).sum().backward()
    return a.grad.sum().item()
for _ in range(8):
    step()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, sorted(faults)[4])
"""


def _faults(*env_values: str | None) -> list[tuple[bool, int]]:
    """(whether the setting took, the median page faults of a step) of one fresh process per value of DSV3_MALLOC
    (None: unset), the processes run side by side (each counts its own faults)."""
    procs = []
    for v in env_values:
        # one thread each: the two processes share the cores (the faults are counted per process, threads included)
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        env.pop(memory.MALLOC_ENV, None)
        if v is not None:
            env[memory.MALLOC_ENV] = v
        procs.append(subprocess.Popen([sys.executable, "-c", _FAULTS], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        took, faults = stdout.split()
        out.append((took == "True", int(faults)))
    return out


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_a_steps_memory_is_reused_without_page_faults():
    (took, kept), (off, default) = _faults(None, "system")
    assert took
    # the step's blocks are the last step's, already mapped: no page faults (the `tiny` training step: 0 a step
    # against 25-50k with glibc's defaults, bench/RESULTS.md 2026-12-07)
    assert kept < 1024, kept
    assert not off
    # glibc's default maps blocks of 32 MiB and more with mmap and unmaps them when freed: their pages fault in
    # again every step (8,192 a block; unless transparent huge pages back them: nothing to compare then)
    if default > 8192:
        assert kept * 8 < default, (kept, default)


def test_system_malloc_is_left_alone(monkeypatch):
    monkeypatch.setenv(memory.MALLOC_ENV, "system")
    assert memory.retain_freed_host_memory() is False


def test_the_cli_sets_it_where_the_model_runs_on_the_cpu(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(memory, "retain_freed_host_memory", lambda: calls.append(1) or True)
    assert cli.main(["info", "--preset", "tiny"]) == 0  # no model runs: nothing set
    assert calls == []
    assert cli.main(["eval", str(tmp_path / "missing"), "--device", "cpu"]) == 2  # set before the error
    assert calls == [1]
    parse = cli.build_parser("generate").parse_args
    for device, cuda, want in (("cpu", True, True), ("auto", False, True), ("auto", True, False),
                               ("cuda", True, False), ("cuda:1", True, False)):
        monkeypatch.setattr("torch.cuda.is_available", lambda c=cuda: c)
        args = parse(["generate", "ckpt", "--prompt", "x", "--device", device])
        assert cli.computes_on_the_cpu(args) is want, (device, cuda)
    assert not cli.computes_on_the_cpu(cli.build_parser("convert").parse_args(["convert", "a", "b"]))
