"""Decode speed and MTP acceptance of a checkpoint through the continuous-batching engine.

    python bench/decode.py runs/tiny                      # CPU, the trained tiny model
    python bench/decode.py runs/tiny --device cuda

For batch sizes 1 and 32 and speculative_k in {0, 1, 2, 3}: time to first token (a 1-token generation
of one 64-token prompt), generated tokens/s over a whole greedy generation of --new tokens per
request (prefill included), and for speculative runs the acceptance rate of drafted tokens, the
acceptance of the first draft (the paper's "second token", §5.4.3) and the mean number of tokens each
verification round produces. Prompts are 64-token windows of held-out stdlib files.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3.checkpoint import load_pretrained  # noqa: E402
from dsv3.cli import _resolve_checkpoint  # noqa: E402
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv3.training.data import find_corpus, read_documents, split_of  # noqa: E402
from dsv3.training.tokenizer import DSTokenizer  # noqa: E402


def prompts(tok: DSTokenizer, n: int, length: int = 64) -> list[list[int]]:
    out = []
    for f in find_corpus(None).files:
        for d in read_documents(f) or []:
            if split_of(d.key) != "val":
                continue
            ids = tok.encode(d.text)
            for i in range(0, len(ids) - length, 4 * length):
                out.append(ids[i:i + length])
                if len(out) == n:
                    return out
    while len(out) < n:
        out.append(out[len(out) % max(len(out), 1)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ks", default="0,1,2,3")
    args = ap.parse_args()
    path = _resolve_checkpoint(args.checkpoint)
    tok = DSTokenizer.load(path)
    model = load_pretrained(path, device=args.device, dtype=torch.float32).eval()
    ps = prompts(tok, 32)
    greedy = SamplingParams(max_new_tokens=args.new, temperature=0, ignore_eos=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"checkpoint {path}; device {dev}; torch {torch.__version__}")
    print("| batch | speculative k | TTFT (ms) | generated tok/s | acceptance | first-draft acc. | tokens/round |")
    print("|---|---|---|---|---|---|---|")
    for B in [int(b) for b in args.batches.split(",")]:
        for k in [int(k) for k in args.ks.split(",")]:
            eng = Engine(model, tok, max_batch_size=B, speculative_k=k, cache_tokens=B * (64 + args.new + 8))
            eng.generate([ps[0]], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
            ttft = []
            for _ in range(3):
                t = time.perf_counter()
                eng.generate([ps[0]], SamplingParams(max_new_tokens=1, temperature=0))
                ttft.append(time.perf_counter() - t)
            eng.stats = type(eng.stats)()
            t = time.perf_counter()
            res = eng.generate(ps[:max(B, 8)], greedy)  # batch 1: 8 prompts one after another
            dt = time.perf_counter() - t
            n = sum(len(r.token_ids) for r in res)
            s = eng.stats
            acc = f"{s.acceptance_rate:.3f}" if k else "-"
            fd = f"{s.first_draft_acceptance:.3f}" if k else "-"
            mal = f"{s.mean_accepted_length:.2f}" if k else "1"
            print(f"| {B} | {k} | {statistics.median(ttft) * 1e3:.1f} | {n / dt:.1f} | {acc} | {fd} | {mal} |",
                  flush=True)


if __name__ == "__main__":
    main()
