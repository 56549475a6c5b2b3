"""The host's part of an engine decode step: `Engine.step()` at batch 1 with the model's forwards replaced by stand-ins
that return fixed logits, so that only the host's work is timed (scheduling, the sampler, the meta fill, accept, the
drafts, the results' copy and the bookkeeping): plain decoding with and without overlapped decoding, and steps and
speculation rounds (k = 1, 2) one by one and as one graph (round_graph). Runs anywhere (CPU).

    PYTHONPATH=. python bench/engine_host_cost.py [--steps 400] [--reps 5] [--ks 0,1,2]

The stand-ins sit where a CUDA graph replays (DecodeGraphs' step functions), so each step still fills its bucket's
meta; every draft is accepted (the drafter's and the main model's fixed logits agree). On a GPU the real step adds
the meta copies, the graph launches and the eager kernels' launches; bench/profile_gpu.py --decode measures a step's
host time and the device's busy time there."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402


def stub(eng: Engine, token: int) -> None:
    """Replace the engine's decode forwards (main, MTP, a whole round) with fixed outputs whose argmax is `token`
    everywhere: every draft is accepted."""
    cfg = eng.model.config
    g = eng._graphs
    V, D = cfg.vocab_size, cfg.hidden_size
    logits = torch.zeros(eng.max_batch_size, eng.k + 1, V)
    logits[..., token] = 1.0
    hidden = torch.zeros(eng.max_batch_size, eng.k + 1, D)

    def main(sb):
        return logits[: sb.B, : sb.T], hidden[: sb.B, : sb.T], sb.ids, sb.pos0

    def mtp(sb, module):
        return hidden[: sb.B, 0], logits[: sb.B, 0]

    def round_(r):
        B, k = r.sb.B, r.k
        tokens = torch.full((B, k + 1), token, dtype=torch.long)
        if not k:
            return (tokens,)
        n = torch.full((B,), k + 1, dtype=torch.long)
        drafts = tokens[:, 1:]
        return tokens, n, drafts, r.sb.pos0 + n, torch.cat([tokens, n[:, None], drafts], 1)

    g._main, g._mtp, g._forward_round = main, mtp, round_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ks", default="0,1,2", help="speculative k values (0: plain decoding)")
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    if any(k < 0 for k in ks) or args.steps < 1 or args.reps < 1:
        ap.error("--ks must be >= 0, --steps and --reps >= 1")
    cases = [(k, False, False) for k in ks if k == 0] + [(k, True, rg) for k in ks for rg in (False, True)]
    for k, overlap, rg in cases:
        n = (args.steps * args.reps + 2) * (k + 1)  # one request's tokens over every timed step
        # (the forwards are stand-ins: a context as long as the request needs costs only its cache's memory)
        cfg = dsv3.preset("tiny").replace(num_nextn_predict_layers=1 if k else 0,
                                          max_position_embeddings=max(2048, n + 64))
        model = dsv3.build_model(cfg, device="cpu", dtype=torch.float32)
        # cuda_graphs=True on the CPU: the bucketed static steps (kept per bucket, as on a GPU), run eagerly
        eng = Engine(model, None, max_batch_size=1, cache_tokens=n + 64, overlap=overlap, speculative_k=k,
                     cuda_graphs=True)
        eng.round_graph = rg
        stub(eng, token=7)
        eng.add_request(list(range(20)), SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
        eng.step()  # the prefill
        eng.step()  # the first decode step (its buckets made)
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            times.append((time.perf_counter() - t) / args.steps * 1e6)
        s = eng.stats
        extra = f", round_graph={rg}" + (f", {s.accepted / max(s.rounds, 1) + 1:.2f} tokens a round" if k else "")
        print(f"k={k}, overlap={overlap}{extra}: host us per step, median of {args.reps} x {args.steps} steps: "
              f"{sorted(times)[len(times) // 2]:.1f}", flush=True)


if __name__ == "__main__":
    main()
