"""Host time of one FP8 training linear against a bf16 one: the launch loop's seconds per call, before and after the
device drains. Where host >= wall the CPU, not the GPU, bounds the step (FP8 `small`: bench/RESULTS.md, thirty-first
session). Rows: forward + backward through `kernels.fp8_linear` (custom ops + autograd) and `F.linear`; then the FP8
glue without the op wrappers (fp8_gemm_fwd / fp8_gemm_bwd) and its pieces; then the op wrappers taken apart (the
thirty-first session measured ~0.85 ms a linear between the op and its glue on an H100 and could not place it): the
forward op without autograd, with autograd but no backward, the ops' own bodies called directly, an
`autocast(enabled=False)` block alone, and a trivial custom op against its body. `--cprofile` prints where the host
time of the op row goes (cProfile, own time first).

    PYTHONPATH=. python bench/fp8_host_overhead.py [--device cuda] [--shape 16384,1024,384] [--cprofile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3 import kernels  # noqa: E402
from dsv3.kernels import fp8 as K  # noqa: E402


def timed(name: str, f, dev: str, n: int) -> None:
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(max(n // 10, 2)):
        f()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        f()
    host = time.perf_counter() - t
    sync()
    wall = time.perf_counter() - t
    print(f"  {name:<34} host {host / n * 1e6:8.0f} us/call   wall {wall / n * 1e6:8.0f} us/call", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="16384,1024,384", help="M,K,N of X (M, K) and W (N, K)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--cprofile", action="store_true", help="cProfile the fp8_linear row (own time, top 25)")
    a = ap.parse_args(argv)
    try:
        M, K_, N = (int(v) for v in a.shape.split(","))
        assert min(M, K_, N) > 0
    except (ValueError, AssertionError):
        ap.error(f"--shape takes M,K,N, three integers > 0; got {a.shape!r}")
    dev, n = a.device, a.calls
    if dev == "cuda":
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print(f"device cpu, torch {torch.__version__} (the FP8 GEMMs on their reference path)")
    print(f"X ({M}, {K_}), W ({N}, {K_}), bf16; {n} calls each")
    x = torch.randn(M, K_, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K_, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)

    def bf16():
        F.linear(x, w).backward(g)

    def fp8():
        kernels.fp8_linear(x, w, torch.bfloat16).backward(g)

    timed("bf16 F.linear fwd + bwd", bf16, dev, n)
    timed("fp8 kernels.fp8_linear fwd + bwd", fp8, dev, n)
    xd, wd = x.detach(), w.detach()
    timed("fp8 glue fwd (fp8_gemm_fwd)", lambda: K.fp8_gemm_fwd(xd, wd, torch.bfloat16), dev, n)
    _, saved = K.fp8_gemm_fwd(xd, wd, torch.bfloat16)
    timed("fp8 glue bwd (fp8_gemm_bwd)", lambda: K.fp8_gemm_bwd(g, saved, torch.bfloat16, torch.bfloat16, True, True),
          dev, n)
    timed("  act_quant_cm (X)", lambda: K.act_quant_cm(xd), dev, n)
    timed("  weight_quant_pad (W, transposed)", lambda: K.weight_quant_pad(wd, transposed=True), dev, n)
    timed("  grad_prescale (dY)", lambda: kernels.reference.grad_prescale(g), dev, n)
    xq, xs = K.act_quant_cm(K._pad2(xd, K._ceil(M), K._ceil(K_)))  # (the glue pads X to 128 multiples first)
    timed("  act_quant_t (X from its FP8)", lambda: K.act_quant_t(xq, xs), dev, n)
    wrappers(xd, wd, g, dev, n)
    if a.cprofile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            fp8()
        pr.disable()
        print(f"cProfile of {n} calls of kernels.fp8_linear forward + backward (own time first):")
        pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def wrappers(xd: torch.Tensor, wd: torch.Tensor, g: torch.Tensor, dev: str, n: int) -> None:
    """The op wrappers' share, taken apart: each row adds one layer to the one before it."""
    bf16 = torch.bfloat16
    which = K._linear_backend("fp8_linear", xd, wd, None)
    xg = xd.clone().requires_grad_(True)
    print(f"the op wrappers ({which!r} backend):")
    timed("fwd body (_fp8_linear_fwd_saved)", lambda: K._fp8_linear_fwd_saved(xd, wd, bf16, which, False), dev, n)

    def fwd_body_autocast():
        with torch.autocast(xd.device.type, enabled=False):
            K._fp8_linear_fwd_saved(xd, wd, bf16, which, False)

    timed("  + autocast(enabled=False)", fwd_body_autocast, dev, n)

    def fwd_op_nograd():
        with torch.no_grad():
            K._fp8_train_fwd(xd, wd, bf16, which, False)

    timed("  + the custom op (no grad)", fwd_op_nograd, dev, n)
    timed("  + autograd (x requires grad)", lambda: K._fp8_train_fwd(xg, wd, bf16, which, False), dev, n)
    _, xq, xs, wk, wsk = K._fp8_train_fwd(xd, wd, bf16, which, False)
    empty = K._empty(g)
    bwd_args = (g, xq, xs, wk, wsk, empty, xd.shape[1], bf16, bf16, which, False, True, True)
    timed("bwd op (_fp8_train_bwd)", lambda: K._fp8_train_bwd(*bwd_args), dev, n)
    timed("  its body (the function)", lambda: _bwd_body(*bwd_args), dev, n)

    def autocast_alone():
        with torch.autocast(xd.device.type, enabled=False):
            pass

    timed("autocast(enabled=False) alone", autocast_alone, dev, n)
    timed("trivial custom op (x + 1)", lambda: _trivial(xd), dev, n)
    timed("  its body", lambda: xd + 1, dev, n)


def _bwd_body(*args):
    """The Python function under the `dsv3::fp8_train_bwd` op (custom_op keeps it as the op's `_init_fn`)."""
    return K._fp8_train_bwd._init_fn(*args)


@torch.library.custom_op("dsv3_bench::trivial", mutates_args=())
def _trivial(x: torch.Tensor) -> torch.Tensor:
    return x + 1


if __name__ == "__main__":
    main()
