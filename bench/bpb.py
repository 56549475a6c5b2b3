"""Validation bits per byte of a trained checkpoint beside general-purpose compressors on the same
held-out bytes (the 1% of stdlib files chosen by the path hash, or another corpus).

    python bench/bpb.py runs/tiny                      # checkpoint or run directory
    python bench/bpb.py runs/small --data corpus/ --seq-len 1024

The model's figure is the cross-entropy over every target of the validation windows divided by the
UTF-8 bytes of those targets (exact per-token byte counts). gzip -9 and xz -9e compress the
concatenated validation documents as one stream (dsv3/eval/compress.py, which `dsv3 eval` also uses;
`dsv3 eval CHECKPOINT --data PATH` prints the same comparison on the exact bytes the model scored).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3.checkpoints.hf import load_pretrained  # noqa: E402
from dsv3.cli import _resolve_checkpoint  # noqa: E402
from dsv3.eval.compress import compressor_bits_per_byte  # noqa: E402
from dsv3.training.data import ValBatches, build_token_cache, find_corpus, read_documents, split_of  # noqa: E402
from dsv3.training.config import TrainConfig, resolve_device  # noqa: E402
from dsv3.training.loop import evaluate  # noqa: E402
from dsv3.training.strategy import Strategy  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402


def split_bytes(source, val_permille: int) -> tuple[bytes, bytes]:
    """(train bytes, held-out bytes), documents joined by newlines."""
    corpus = find_corpus(source)
    parts = {"train": [], "val": []}
    for f in corpus.files:
        for d in read_documents(f) or []:
            parts[split_of(d.key, val_permille)].append(d.text.encode("utf-8"))
    return b"\n".join(parts["train"]), b"\n".join(parts["val"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default=None)
    ap.add_argument("--val-permille", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    train_raw, raw = split_bytes(args.data, args.val_permille)
    t0 = time.time()

    comp = compressor_bits_per_byte(raw, primer=train_raw)
    gz, xz, xz_primed = comp["gzip -9"], comp["xz -9e"], comp["xz -9e primed"]

    path = _resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    tok = DSTokenizer.load(path)
    model = load_pretrained(path, device=device, dtype=torch.float32).eval()
    cache = build_token_cache(args.data, tok, os.path.join(TrainConfig().cache_dir, "tokens"),
                              val_permille=args.val_permille, fim_rate=0.0, progress=False)
    val = ValBatches(cache.tokens("val"), args.seq_len, args.batch_size, name="val split")
    import contextlib
    ev = evaluate(Strategy.of(model), val, tok.token_byte_lengths(), contextlib.nullcontext)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"held-out: {len(raw):,} bytes of {cache.meta['source']}")
    print("| method | bits/byte |\n|---|---|")
    print(f"| gzip -9 | {gz:.3f} |\n| xz -9e | {xz:.3f} |")
    print(f"| xz -9e primed with the {len(train_raw):,} training bytes | {xz_primed:.3f} |")
    print(f"| dsv3 {os.path.basename(os.path.dirname(os.path.dirname(path)))} ({path}) | {ev['val_bpb']:.3f} |")
    print(f"model val loss {ev['val_loss']:.4f} nats/token over {ev['val_tokens']:,} tokens; device {dev}; "
          f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
