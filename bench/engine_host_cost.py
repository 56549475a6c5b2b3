"""The host's part of an engine decode step: `Engine.step()` at batch 1 with the model's decode step replaced by a
stand-in that returns fixed logits, so that only the host's work is timed (scheduling, the sampler, the meta fill,
accept, the results' copy and the bookkeeping), with and without overlapped decoding. Runs anywhere (CPU).

    PYTHONPATH=. python bench/engine_host_cost.py [--steps 400] [--reps 5]

On a GPU the real step adds the meta copy, the graph launch and a few eager kernels; bench/decode_gpu.py measures
the whole step against back-to-back graph replays."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cfg = dsv3.preset("tiny").replace(num_nextn_predict_layers=0)
    model = dsv3.build_model(cfg, device="cpu", dtype=torch.float32)
    logits, hidden = torch.randn(1, 1, cfg.vocab_size), torch.randn(1, 1, cfg.hidden_size)
    n = args.steps * args.reps + 2
    if n + 20 > cfg.max_position_embeddings:
        raise SystemExit(f"--steps x --reps = {n} exceeds the tiny preset's context ({cfg.max_position_embeddings})")
    for overlap in (False, True):
        eng = Engine(model, None, max_batch_size=1, cache_tokens=n + 64, overlap=overlap)
        eng._graphs.main = lambda tokens, pos0, tables, last_pos=None: (logits, hidden,
                                                                        torch.zeros(1, 1, dtype=torch.long),
                                                                        torch.as_tensor(pos0))
        eng.add_request(list(range(20)), SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
        eng.step()  # the prefill
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            times.append((time.perf_counter() - t) / args.steps * 1e6)
        print(f"overlap={overlap}: host us per step, median of {args.reps} x {args.steps} steps: "
              f"{sorted(times)[len(times) // 2]:.1f}", flush=True)


if __name__ == "__main__":
    main()
