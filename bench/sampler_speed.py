"""What a token draw costs: the engine's exponential race with sampling.py's hashed random numbers against the same
race with torch's generator (`exponential_`, what the sampler drew with before the hash), eagerly (draws outside
compiled code: prefill's last chunk, steps with a repetition penalty, graphs captured without compile) and compiled
(as inside a compiled round graph), and the hashed race as one Triton launch (dsv3/kernels/race_triton.py, "hashed_race"; on a GPU), for
a batch x vocabulary of each shape; and the whole sampled distribution + draw of one decode step (BatchSampler.probs
with temperature and top-p, then the reference draw), eager.

    PYTHONPATH=. python bench/sampler_speed.py                       # on the GPU: 1 x 32,768 .. 32 x 129,280
    PYTHONPATH=. python bench/sampler_speed.py --device cpu --shapes 1x4096,8x4096

Each figure: the median of --repeats calls, each timed with its own CUDA events after --warmup untimed calls (on the
CPU: perf_counter). Prints a markdown table captioned with the card.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bandwidth import card_name  # noqa: E402
from dsv3.inference.params import SamplingParams  # noqa: E402
from dsv3.inference.sampling import BatchSampler, argmax, phase_key  # noqa: E402
from dsv3.kernels import backend as kernel_backend  # noqa: E402


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds a call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="1x32768,1x102400,1x129280,32x32768,32x102400,32x129280",
                    help="comma list of BxV")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sampler_speed.py: CUDA is not available (a CPU run: --device cpu --shapes 1x4096)")
    print(f"\nTable: one token draw per row (ms), {card_name(device)}, torch {torch.__version__}\n")
    kernel = kernel_backend.available("hashed_race", device)
    print("| B x V | race, torch generator (eager) | race, hashed (eager) | hashed (compiled) | "
          "hashed (Triton kernel) | probs (T 0.8, top-p 0.9) + hashed draw (eager) |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        B, V = (int(x) for x in shape.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(B, V, device=device, generator=g)
        w = logits.softmax(-1)
        params = [SamplingParams(temperature=0.8, top_p=0.9)] * B
        sampler = BatchSampler(params, [phase_key(b, 3) for b in range(B)], [()] * B, V, device)

        def torch_race():
            return argmax(w / torch.empty_like(w).exponential_(1))

        def hashed():
            return sampler.draw(w, 1)

        compiled = torch.compile(lambda: sampler.draw(w, 1), dynamic=False) if device.type == "cuda" else None

        def full():
            return sampler.draw(sampler.probs(logits[:, None])[:, 0], 1)

        def ms(f) -> float:
            return timed(f, device, args.warmup, args.repeats) * 1e3 if f is not None else float("nan")

        with kernel_backend.use_backend(hashed_race="reference"):
            row = [ms(torch_race), ms(hashed), ms(compiled), float("nan"), ms(full)]
            want = hashed()
        if kernel:  # the same draw through the Triton kernel (column 4), its tokens checked first
            with kernel_backend.use_backend(hashed_race="triton"):
                assert torch.equal(hashed(), want), "the kernel's tokens differ from the reference's"
                row[3] = ms(hashed)
        print(f"| {B} x {V:,} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
