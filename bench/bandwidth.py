"""The ceilings of the card a benchmark runs on, measured in that same run: memory bandwidth (a copy) and
dense matmul throughput.

    from bandwidth import copy_bandwidth      # (bench/ is on sys.path when a bench script runs)
    bw = copy_bandwidth()                     # {'card': 'NVIDIA H200', 'bytes_per_s': 4.3e12, ...}
    print(bw["caption"])                      # one line for a table caption or header

What is timed: `dst.copy_(src)` of two contiguous --bytes-long uint8 buffers on the device (a device-to-
device memcpy), `warmup` untimed copies, then `repeats` copies each timed with its own pair of CUDA events.
Convention: a copy of N bytes moves 2N bytes through HBM (N read + N written), as STREAM's "copy" counts
it, so the figure is 2N / time. The median over the repeats is the one reported and used (`bytes_per_s`);
the best is kept beside it. A decode roofline divided by this figure is "bytes the step must read over
what this card moves per second in a copy", so a step that only reads could in principle go slightly
faster than the roofline (reads alone are not bounded by the write half of a copy).

On the CPU (smoke tests only) the same copy is timed with perf_counter, on a smaller buffer.

    mm = matmul_ceiling()                     # {'card': ..., 'flops_per_s': 7.8e14, 'caption': ...}

What is timed: `torch.mm` of two n x n matrices (bf16 by default; n = 8192 on a GPU, 1024 on the CPU), each call
timed with its own CUDA events, median reported (2·n³ FLOP per call). This is the "of measured" denominator of a
training table: what this card's cuBLAS reaches on one large square GEMM, beside the datasheet's peak.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch


def card_name(device: torch.device | str = "cuda") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _seconds(fn, cuda: bool, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn() over `repeats` calls after `warmup` untimed ones, each timed on its own (CUDA
    events on a GPU, perf_counter on the CPU)."""
    times = []
    for i in range(warmup + repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
        if i >= warmup:
            times.append(dt)
    return statistics.median(times), min(times)


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int | None = None, repeats: int = 20,
                   warmup: int = 3) -> dict:
    """Measured device-to-device copy bandwidth (read + write bytes per second); see the module docstring."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = nbytes or (2 * 1024**3 if cuda else 256 * 1024**2)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    med, best = _seconds(lambda: dst.copy_(src), cuda, warmup, repeats)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    out = {"card": card_name(device), "bytes": nbytes, "repeats": repeats, "bytes_per_s": 2 * nbytes / med,
           "best_bytes_per_s": 2 * nbytes / best, "convention": "2 x bytes copied (read + write) / median time"}
    out["short"] = f"{out['card']}, {out['bytes_per_s'] / 1e12:.2f} TB/s copy"
    out["caption"] = (f"card {out['card']}; measured copy bandwidth {out['bytes_per_s'] / 1e12:.3f} TB/s "
                      f"(median of {repeats} copies of {nbytes / 2**30:.2f} GiB, read + write bytes counted; "
                      f"best {out['best_bytes_per_s'] / 1e12:.3f} TB/s)")
    return out


def matmul_ceiling(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                   repeats: int = 20, warmup: int = 5) -> dict:
    """Measured dense matmul throughput (FLOP/s) of an n x n x n `torch.mm` in `dtype`; see the module docstring."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    med, best = _seconds(lambda: torch.mm(a, b), cuda, warmup, repeats)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    out = {"card": card_name(device), "n": n, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
           "flops_per_s": 2 * n**3 / med, "best_flops_per_s": 2 * n**3 / best}
    out["caption"] = (f"card {out['card']}; measured {out['dtype']} matmul {out['flops_per_s'] / 1e12:.4g} TFLOP/s "
                      f"(median of {repeats} {n}x{n}x{n} torch.mm; best {out['best_flops_per_s'] / 1e12:.4g})")
    return out


def graph_us(fn, calls: int, reps: int) -> float:
    """Median microseconds per call of fn(0..calls-1) captured in one CUDA graph, replayed `reps` times."""
    side = torch.cuda.Stream()  # warm-up (Triton compile, cuBLAS workspace) on a side stream, outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times) * 1e3 / calls
