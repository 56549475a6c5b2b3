"""Does a multi-megabyte request freeze the server's other clients? (issue 13)

Starts the OpenAI-compatible server on 127.0.0.1 over a random tiny model, measures /health and a
small completion (2 tokens) while idle, then again while R large requests of one kind are in flight,
and prints p50 / p99 / max of both, the wall time of the large requests and the growth of this
process's peak RSS (the server's preparation worker processes, spawned by the first large request,
are not counted: they hold the large bodies now):

    python bench/serve_big_requests.py                       # every kind, 2 requests of 4 MB each
    python bench/serve_big_requests.py --kind tokenize --mb 6 --requests 3
    python bench/serve_big_requests.py --tokenizer v3        # the real DeepSeek-V3 vocabulary (if installed)

Kinds: `completion` (a text prompt), `chat` (one user message), `tokenize` (/tokenize of the text),
`ids` (a completion whose prompt is token ids, about 7 bytes of JSON each), `detokenize`. The text
is random words. Run it against another checkout with PYTHONPATH=that/checkout (the script only
puts its own checkout on the path when `dsv3` is not importable), e.g. the code before issue 13.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import sys
import threading
import time

import httpx

try:
    import dsv3  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# torch and the server are imported in the functions: the server's preparation workers are spawned,
# and a spawned process imports this script again (as __mp_main__); a light top level keeps them light

WORDS = ["alpha", "beta", "gamma", "delta", "ro", "mi", "kuso", "tor", "(", ")", ":", "\n", "def", "return"]
KINDS = ("completion", "chat", "tokenize", "ids", "detokenize")


def tiny_model(vocab_size: int):
    from dsv3.config import ModelConfig
    from dsv3.model import build_model

    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
               q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
               max_position_embeddings=512, rope_scaling=None, num_nextn_predict_layers=0, torch_dtype="float32")
    return build_model(ModelConfig(**cfg).validate(), seed=0).eval()


def tokenizer(kind: str):
    from dsv3.tokenizer import DSTokenizer

    if kind == "v3":
        return DSTokenizer.from_deepseek_package()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) * (rng.random() < 0.1) for _ in range(200))
            for _ in range(300)]
    return DSTokenizer.train(docs, 512)


def body(kind: str, mb: float, vocab_size: int, seed: int) -> tuple[str, bytes]:
    rng = random.Random(seed)
    n = int(mb * 1e6)
    if kind in ("ids", "detokenize"):
        ids = [rng.randrange(20, vocab_size) for _ in range(n // 7)]
        if kind == "ids":
            return "/v1/completions", json.dumps({"model": "m", "prompt": ids, "max_tokens": 2}).encode()
        return "/detokenize", json.dumps({"tokens": ids[:1_000_000]}).encode()
    text = " ".join(rng.choice(WORDS) for _ in range(n // 4))[:n]
    if kind == "completion":
        return "/v1/completions", json.dumps({"model": "m", "prompt": text, "max_tokens": 2}).encode()
    if kind == "chat":
        return "/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                                                   "max_tokens": 2}).encode()
    return "/tokenize", json.dumps({"prompt": text}).encode()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=KINDS, action="append", help="repeatable (default: all)")
    ap.add_argument("--mb", type=float, default=4.0, help="size of each large request body, MB")
    ap.add_argument("--requests", type=int, default=2, help="large requests in flight at once")
    ap.add_argument("--tokenizer", choices=("tiny", "v3"), default="tiny")
    args = ap.parse_args()
    import torch

    from dsv3.inference.engine import Engine
    from dsv3.inference.server import create_app
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from background_server import BackgroundServer  # tests/

    torch.set_num_threads(1)
    tok = tokenizer(args.tokenizer)
    model = tiny_model(tok.vocab_size)
    eng = Engine(model, tok, max_batch_size=8, cache_tokens=1024)
    nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    small = {"model": "m", "prompt": "alpha", "max_tokens": 2, "temperature": 0}
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {args.tokenizer} tokenizer ({tok.vocab_size}), "
          f"{args.requests} x {args.mb} MB; dsv3 from {os.path.dirname(dsv3_path())}")
    with BackgroundServer(create_app(eng, tok, "m")) as s, httpx.Client(base_url=s.url, timeout=600,
                                                                         transport=nodelay) as c:
        def probe(lat: dict) -> None:
            for name, call in (("health", lambda: c.get("/health")),
                               ("completion", lambda: c.post("/v1/completions", json=small))):
                t = time.monotonic()
                call()
                lat[name].append(time.monotonic() - t)

        idle = {"health": [], "completion": []}
        for _ in range(50):
            probe(idle)
        print(f"{'idle':>10}: health p50 {pct(idle['health'], .5):5.0f} ms  p99 {pct(idle['health'], .99):5.0f}  "
              f"| completion p50 {pct(idle['completion'], .5):5.0f} ms  p99 {pct(idle['completion'], .99):5.0f}")
        for kind in args.kind or KINDS:
            bodies = [body(kind, args.mb, tok.vocab_size, i) for i in range(args.requests)]
            status, done = [], []
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

            def send(path, data):
                t = time.monotonic()
                r = httpx.post(s.url + path, content=data, headers={"content-type": "application/json"}, timeout=600)
                status.append(r.status_code)
                done.append(time.monotonic() - t)

            threads = [threading.Thread(target=send, args=b) for b in bodies]
            busy = {"health": [], "completion": []}
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                probe(busy)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"{kind:>10}: health p50 {pct(busy['health'], .5):5.0f} ms  p99 {pct(busy['health'], .99):5.0f}  "
                  f"max {max(busy['health']) * 1e3:5.0f} | completion p50 {pct(busy['completion'], .5):5.0f} ms  "
                  f"p99 {pct(busy['completion'], .99):5.0f}  max {max(busy['completion']) * 1e3:5.0f} | large: "
                  f"{sorted(set(status))} in {max(done):.2f} s, peak RSS +{(rss - rss0) / 1e3:.0f} MB "
                  f"({len(busy['health'])} probes)", flush=True)


def dsv3_path() -> str:
    import dsv3

    return dsv3.__file__


if __name__ == "__main__":
    main()
