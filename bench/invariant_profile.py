"""Where the batch-invariant mode's decode time goes: the GPU kernels of an eager engine, mode off and on.

    PYTHONPATH=. python bench/invariant_profile.py [--preset small] [--batches 1,32] [--new 24] [--rows 18]

For each batch size: a `--preset` model with random bf16 weights, B random 64-token prompts, one untimed generate
(warm-up, Triton compilation), then the same generate under torch.profiler (one prefill and new - 1 decode steps,
eager: a graph replay shows one launch and hides its kernels; the kernels are the same). Prints each run's kernel
table sorted by GPU time and its total. bench/invariant_speed.py measures the mode's tokens/s with graphs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3 import kernels  # noqa: E402
from dsv3.config import preset  # noqa: E402
from dsv3.inference.engine import Engine  # noqa: E402
from dsv3.inference.params import SamplingParams  # noqa: E402
from dsv3.model import build_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new", type=int, default=24, help="tokens generated per prompt")
    ap.add_argument("--rows", type=int, default=18, help="kernels listed per table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("invariant_profile.py: the batch-invariant mode needs a GPU")
    model = build_model(preset(args.preset), device="cuda", seed=0).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    print(f"{args.preset} (random bf16 weights) on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for B in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, model.config.vocab_size, (B, 64), generator=g).tolist()
        for on in (False, True):
            kernels.set_batch_invariant(on)
            eng = Engine(model, None, cuda_graphs=False, max_batch_size=B, cache_tokens=B * (64 + args.new + 64),
                         max_prefill_tokens=0)
            sps = [SamplingParams(max_new_tokens=args.new, ignore_eos=True) for _ in prompts]
            eng.generate(prompts, sps)  # warm-up: compilation
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                eng.generate(prompts, sps)
                torch.cuda.synchronize()
            print(f"==== B={B} mode={'on' if on else 'off'} (eager; 1 prefill + {args.new - 1} decode steps)")
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    kernels.set_batch_invariant(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
