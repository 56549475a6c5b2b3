"""Host time of one FP8 training linear against a bf16 one: the launch loop's seconds per call, before and after the
device drains. Where host >= wall the CPU, not the GPU, bounds the step (FP8 `small`: bench/RESULTS.md, thirty-first
session). Rows: forward + backward through `kernels.fp8_linear` (custom ops + autograd) and `F.linear`; then the FP8
glue without the op wrappers (fp8_gemm_fwd / fp8_gemm_bwd) and its pieces.

    PYTHONPATH=. python bench/fp8_host_overhead.py [--device cuda] [--shape 16384,1024,384]
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


if __name__ == "__main__":
    main()
