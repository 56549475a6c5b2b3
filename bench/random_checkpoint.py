"""A randomly initialised checkpoint in the official layout, written one part at a time: for serving and loading
benchmarks at shapes nobody trains here (issue 19 run 1: a 671B-shaped model cut to L layers, FP8).

    python bench/random_checkpoint.py --preset 671b --layers 8 --out /data/v3_8l --device cuda
    torchrun --nproc-per-node 8 bench/ep_serve_gpu.py --checkpoint /data/v3_8l --batches 1,32,128,512
    torchrun --nproc-per-node 8 -m dsv3.cli serve /data/v3_8l --ep 8 --cuda-graphs on --port 8000 &
    python bench/serve_load.py /data/v3_8l --url http://127.0.0.1:8000 --clients 64 --requests 4

`dsv3.checkpoints.hf.save_random_pretrained` allocates one part on --device (the embedding and head, each decoder
layer, the MTP modules), initialises it as the whole model would be initialised with --seed (per-tensor
generators), quantises the official FP8 set to e4m3 + 128x128 scales there (--bf16: no FP8), writes it as a shard
and frees it: a 671B MoE layer is ~44 GB in fp32 while it is made and ~11 GB on disk (8 layers, the embedding and
head and the MTP layer with its official copies of them: 78 GB; the MTP part, ~53 GB in fp32, is the largest).
The values are those of the whole model built with --seed on the same kind of device (a CUDA generator draws
other numbers than the CPU's). The tokenizer is a byte-level BPE of --tokenizer-vocab tokens trained on a
sample of the Python standard library. The model's vocabulary is larger: the output head's rows past the
tokenizer's are zero, so greedy decoding (what bench/serve_load.py sends) picks ids the tokenizer can spell and
the server streams every token as text; the model still computes every logit. The layout is
`save_pretrained`'s (official names): it loads with `load_pretrained` and `dsv3 serve`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.checkpoints.hf import save_random_pretrained  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402
from dsv3.training.data import find_corpus, read_documents  # noqa: E402


def sample_texts(max_bytes: int):
    """Documents of the default corpus (the stdlib) up to max_bytes, in its file order (deterministic)."""
    n = 0
    for f in find_corpus(None).files:
        for d in read_documents(f) or []:
            yield d.text
            n += len(d.text)
            if n >= max_bytes:
                return


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="671b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: the preset's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", help="where each part is made and quantised (cuda: fast)")
    ap.add_argument("--bf16", action="store_true", help="every weight bf16 (default: the official FP8 set in FP8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-vocab", type=int, default=4096)
    ap.add_argument("--tokenizer-sample-bytes", type=int, default=4 * 2**20, help="stdlib text the BPE is trained on")
    a = ap.parse_args(argv)
    cfg = dsv3.preset(a.preset)
    if a.layers is not None:
        if a.layers < 1:
            raise SystemExit(f"--layers must be >= 1, got {a.layers}")
        cfg = cfg.replace(num_hidden_layers=a.layers,
                          first_k_dense_replace=min(cfg.first_k_dense_replace, a.layers - 1))
    cfg = cfg.replace(quantization_config=None)
    if a.tokenizer_vocab > cfg.vocab_size:
        raise SystemExit(f"--tokenizer-vocab {a.tokenizer_vocab} exceeds the model's vocabulary ({cfg.vocab_size})")
    t0 = time.perf_counter()
    tok = DSTokenizer.train(sample_texts(a.tokenizer_sample_bytes), a.tokenizer_vocab)
    if (tok.bos_id, tok.eos_id) != (cfg.bos_token_id, cfg.eos_token_id):
        cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    os.makedirs(a.out, exist_ok=True)
    tok.save(a.out)

    def progress(i: int, n: int, name: str) -> None:
        print(f"{i}/{n} {name} written ({time.perf_counter() - t0:.0f} s)", flush=True)

    r = save_random_pretrained(cfg, a.out, seed=a.seed, device=a.device, dtype=torch.bfloat16, fp8=not a.bf16,
                               progress=progress, head_rows=tok.vocab_size)
    print(f"{a.out}: {cfg.num_hidden_layers} layers of {a.preset}, {r['shards']} shards, {r['bytes'] / 1e9:.2f} GB, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
