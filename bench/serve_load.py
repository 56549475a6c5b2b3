"""Load test of the OpenAI-compatible server: N concurrent streaming clients (the official `openai`
async client), each sending R greedy completion requests one after another, against a server this
script starts itself on 127.0.0.1 (a free port; nothing else is contacted), or with --url against one
already running (the expert-parallel server under torchrun, issue 19).

    python bench/serve_load.py                         # a random tiny model (CPU), 32 clients x 3 requests
    python bench/serve_load.py runs/tiny --clients 64 --requests 4 --max-tokens 64 --speculative-k 2
    python bench/serve_load.py runs/small --device cuda --max-batch-size 64 --check
    python bench/serve_load.py runs/small --device cuda --long-prompt-len 3000 --long-every 8 --max-prefill-tokens 0
    torchrun --nproc-per-node 8 -m dsv3.cli serve CKPT --ep 8 --port 8000 &
    python bench/serve_load.py CKPT --url http://127.0.0.1:8000 --clients 64 --requests 4

Prompts are --prompt-len-token windows of held-out stdlib files, sent as token ids. Prints requests/s,
output tokens/s (from the streamed usage), mean/p50/p95 time to first token (client side: request
sent -> first streamed text), inter-token latency (the gaps between streamed chunks; a chunk holds the
tokens of one engine step) and end-to-end latency, and the server's own view from /metrics (peak
queue, MTP acceptance). --check compares every output with offline `Engine.generate`. The workload runs
once offline first (--no-warmup skips it), so graph capture on a GPU is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import threading
import time

import httpx
import openai
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # background_server.py

from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv3.inference.server import create_app, load_for_serving  # noqa: E402
from background_server import BackgroundServer  # noqa: E402 (tests/)
from dsv3.training.data import find_corpus, read_documents, split_of  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402


def random_tiny(device: str):
    """The tiny preset with random weights and a 2048-token BPE trained on ~1 MB of stdlib."""
    from dsv3.config import preset
    from dsv3.model import build_model

    texts, size = [], 0
    for f in find_corpus(None).files:
        for d in read_documents(f) or []:
            texts.append(d.text)
            size += len(d.text)
        if size > 1_000_000:
            break
    tok = DSTokenizer.train(texts, 2048)
    cfg = preset("tiny").replace(vocab_size=2048)
    return build_model(cfg, device=device, seed=0).eval(), tok


def make_prompts(tok: DSTokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from the held-out documents: every other window of `length` tokens first (a gap
    between prompts of one document), then, where those run out (a small held-out split), the windows between."""
    spaced, between = [], []
    for f in find_corpus(None).files:
        for d in read_documents(f) or []:
            if split_of(d.key) != "val":
                continue
            ids = tok.encode(d.text)
            for j, i in enumerate(range(0, len(ids) - length, length)):
                (between if j % 2 else spaced).append(ids[i: i + length])
                if len(spaced) == n:
                    return spaced
    if len(spaced) + len(between) >= n:
        return (spaced + between)[:n]
    raise RuntimeError(f"only {len(spaced) + len(between)} prompts of {length} tokens in the held-out stdlib files, "
                       f"{n} asked (--clients x --requests, --prompt-len)")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def divergence(offline, text: str, tok) -> tuple[int, float | None]:
    """Where a streamed text first differs from an offline output (a RequestOutput with top-2 log-probabilities):
    (the first differing character, the offline gap between the two most likely tokens at the token that character
    belongs to; None where the position is past its tokens)."""
    w = offline.text
    c = next((i for i, (a, b) in enumerate(zip(w, text)) if a != b), min(len(w), len(text)))
    for t in range(len(offline.token_ids)):
        if len(tok.decode(offline.token_ids[: t + 1])) > c:
            top = offline.logprobs[t].top if offline.logprobs else []
            return c, (top[0][1] - top[1][1]) if len(top) > 1 else None
    return c, None


def load_clients(url: str, name: str, prompts: list[list[int]], clients: int, requests: int, max_tokens: int):
    """`clients` concurrent streaming clients against `url`, each sending `requests` greedy completions one
    after another -> (results, wall seconds, peak running/waiting from /metrics, the final /metrics). A
    result: (time to first text, latency, output tokens, text, gaps between streamed chunks with text)."""
    results: list[tuple[float, float, int, str, list[float]]] = []
    peak = {"waiting": 0.0, "running": 0.0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            m = metrics(url)
            for k in peak:
                peak[k] = max(peak[k], m[f"dsv3_requests_{k}"])
            time.sleep(0.05)

    async def client(jobs: list[list[int]]):
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"),
                               max_retries=0, timeout=600)
        out = []
        for ids in jobs:
            t = time.perf_counter()
            ttft, parts, usage, gaps, last = None, [], 0, [], None
            stream = await c.completions.create(model=name, prompt=ids, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
            async for ch in stream:
                if ch.usage is not None:
                    usage = ch.usage.completion_tokens
                for choice in ch.choices:
                    if choice.text:
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t
                        else:
                            gaps.append(now - last)
                        last = now
                    parts.append(choice.text)
            lat = time.perf_counter() - t
            out.append((ttft if ttft is not None else lat, lat, usage, "".join(parts), gaps))
        await c.close()
        return out

    async def run():
        per = [prompts[i * requests:(i + 1) * requests] for i in range(clients)]
        return await asyncio.gather(*(client(p) for p in per))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t = time.perf_counter()
    try:
        for r in asyncio.run(run()):
            results.extend(r)
    finally:
        wall = time.perf_counter() - t
        stop.set()
        poller.join()
    return results, wall, peak, metrics(url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="checkpoint or run directory (default: a random tiny model)")
    ap.add_argument("--url", help="load a server that is already running (e.g. `torchrun ... dsv3.cli serve CKPT --ep "
                                  "N`) instead of starting one: the checkpoint then only gives the tokenizer "
                                  "(and the model of --check); the key, if any, from OPENAI_API_KEY")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, sent one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--cache-tokens", type=int, default=0, help="default: the engine's")
    ap.add_argument("--speculative-k", type=int, default=0)
    ap.add_argument("--compile-decode", action="store_true",
                    help="torch.compile the graphed decode steps (a checkpoint on a GPU; as `dsv3 serve "
                         "--compile-decode`)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="the engine's batch-invariant mode (a GPU; as `dsv3 serve --batch-invariant`), the offline "
                         "reference of --check too: every output should then equal offline generation")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-prefill-tokens", type=int, default=8192,
                    help="the engine's chunked-prefill budget per step (0: whole prompts at once)")
    ap.add_argument("--long-prompt-len", type=int, default=0,
                    help="with --long-every N: every N-th request's prompt has this many tokens (what chunked "
                         "prefill is for: the others' inter-token latency while a long prompt is prefilled)")
    ap.add_argument("--long-every", type=int, default=8)
    ap.add_argument("--check", action="store_true", help="compare outputs with offline Engine.generate")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the pass over the same workload before the timed load (offline, or with --url "
                         "through the server; on a GPU it captures the CUDA graphs of every batch / context "
                         "bucket, as a server does once at start-up)")
    args = ap.parse_args()
    if args.clients * args.requests > 10_000:
        ap.error("at most 10,000 requests")
    if args.url and not args.checkpoint:
        ap.error("--url needs the served checkpoint (for its tokenizer)")
    if args.compile_decode and (args.url or not args.checkpoint):
        ap.error("--compile-decode compiles the decode steps of a checkpoint this script serves (not --url's server, "
                 "not the random tiny model)")

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # leave a core for the event loop and clients
    t0 = time.perf_counter()
    engine = model = None
    if args.url:
        from dsv3.cli import _resolve_checkpoint

        tok = DSTokenizer.load(_resolve_checkpoint(args.checkpoint))
        name = httpx.get(args.url.rstrip("/") + "/v1/models", timeout=30,
                         headers={"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}"}
                         ).json()["data"][0]["id"]
    elif args.checkpoint:
        from dsv3.cli import _resolve_checkpoint

        path = _resolve_checkpoint(args.checkpoint)
        engine, tok = load_for_serving(path, device=args.device, max_batch_size=args.max_batch_size,
                                       cache_tokens=args.cache_tokens or None, speculative_k=args.speculative_k,
                                       max_prefill_tokens=args.max_prefill_tokens, compile_decode=args.compile_decode,
                                       batch_invariant=args.batch_invariant)
        name, model = os.path.basename(os.path.normpath(path)), engine.model
    else:
        model, tok = random_tiny(args.device)
        if args.batch_invariant:  # (the mode takes a 16-bit model)
            model = model.to(torch.bfloat16)
        engine = Engine(model, tok, max_batch_size=args.max_batch_size, cache_tokens=args.cache_tokens or None,
                        speculative_k=args.speculative_k, max_prefill_tokens=args.max_prefill_tokens,
                        batch_invariant=args.batch_invariant)
        name = "random-tiny"
    n = args.clients * args.requests
    prompts = make_prompts(tok, n, args.prompt_len)
    if args.long_prompt_len:  # every --long-every-th request (client 0's first, ...) gets a long prompt
        if args.long_every < 1:
            ap.error("--long-every must be >= 1")
        longs = make_prompts(tok, -(-n // args.long_every), args.long_prompt_len)
        prompts = [longs[i // args.long_every] if i % args.long_every == 0 else p for i, p in enumerate(prompts)]
    where = f"the server at {args.url}" if args.url else args.device
    print(f"model {name} on {where} ({platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}); setup {time.perf_counter() - t0:.1f}s")
    served = "" if engine is None else (f"; batch {args.max_batch_size}, "
                                        f"{engine.cache.num_blocks * engine.cache.block_size} cache tokens, "
                                        f"speculative k={args.speculative_k}")
    longs = (f" (every {args.long_every}th {args.long_prompt_len} tokens)" if args.long_prompt_len else "")
    served += f", max_prefill_tokens {args.max_prefill_tokens}" if engine is not None else ""
    print(f"{args.clients} clients x {args.requests} streaming requests, {args.prompt_len}-token prompts{longs}, "
          f"max_tokens {args.max_tokens}, greedy{served}")

    if args.url:
        url = args.url.rstrip("/")
        if args.warmup:
            t1 = time.perf_counter()
            load_clients(url, name, prompts, args.clients, args.requests, args.max_tokens)
            print(f"warm-up       the same {n} requests through the server in {time.perf_counter() - t1:.1f}s "
                  "(not timed)")
        results, wall, peak, m = load_clients(url, name, prompts, args.clients, args.requests, args.max_tokens)
    else:
        if args.warmup:
            t1 = time.perf_counter()
            engine.generate(prompts, SamplingParams(max_new_tokens=args.max_tokens, temperature=0))
            engine.stats = type(engine.stats)()  # /metrics counts the timed load only
            print(f"warm-up       the same {n} requests offline in {time.perf_counter() - t1:.1f}s (not timed)")
        app = create_app(engine, tok, name, max_queue=n)
        with BackgroundServer(app, host="127.0.0.1") as srv:
            results, wall, peak, m = load_clients(srv.url, name, prompts, args.clients, args.requests,
                                                  args.max_tokens)

    ttft, lat = [r[0] for r in results], [r[1] for r in results]
    gaps = [g for r in results for g in r[4]]
    toks = sum(r[2] for r in results)
    print(f"requests      {len(results)}/{n} completed in {wall:.2f}s: {len(results) / wall:.2f} requests/s, "
          f"{toks / wall:.1f} output tokens/s ({toks} tokens)")
    print(f"TTFT          mean {statistics.mean(ttft) * 1e3:.0f} ms, p50 {pct(ttft, 0.5) * 1e3:.0f} ms, "
          f"p95 {pct(ttft, 0.95) * 1e3:.0f} ms")
    if gaps:  # a chunk holds every token a step accepted (several with speculation)
        chunks = len(gaps) + len(results)
        print(f"inter-token   mean {statistics.mean(gaps) * 1e3:.1f} ms, p50 {pct(gaps, 0.5) * 1e3:.1f} ms, "
              f"p95 {pct(gaps, 0.95) * 1e3:.1f} ms between streamed chunks ({toks / max(chunks, 1):.2f} tokens "
              "per chunk)")
    print(f"latency       mean {statistics.mean(lat) * 1e3:.0f} ms, p50 {pct(lat, 0.5) * 1e3:.0f} ms, "
          f"p95 {pct(lat, 0.95) * 1e3:.0f} ms")
    rate = m["dsv3_spec_decode_acceptance_rate"]
    print(f"server        peak running {peak['running']:.0f}, peak waiting {peak['waiting']:.0f}, "
          f"{m['dsv3_engine_steps_total']:.0f} engine steps"
          + (f", MTP acceptance {rate:.3f}" if rate == rate else ""))
    if args.check:
        if model is None:  # --url: the served checkpoint in this process
            from dsv3.inference.engine import load_engine

            model = load_engine(args.checkpoint, device=args.device, max_batch_size=1,
                                batch_invariant=args.batch_invariant)[0].model
        longest = max(len(p) for p in prompts)
        ref = Engine(model, tok, max_batch_size=64, cache_tokens=64 * (longest + args.max_tokens + 16),
                     max_prefill_tokens=0, batch_invariant=args.batch_invariant)
        # (the top-2 log-probabilities: where a streamed text parts from the offline one, the offline gap between its
        # two most likely tokens there tells a near-tie from a bug)
        offline = ref.generate(prompts, SamplingParams(max_new_tokens=args.max_tokens, temperature=0, logprobs=2))
        want = [o.text for o in offline]
        bad = sum(w != r[3] for w, r in zip(want, results))
        print(f"check         {n - bad}/{n} outputs equal offline Engine.generate"
              + (" (both batch-invariant)" if args.batch_invariant else ""))
        # where they part (first differing character of streamed vs offline text): on a GPU in bf16 a divergence can
        # be a near-tie resolved differently by another batch composition or kernel
        parts = sorted(divergence(o, r[3], tok) for o, r in zip(offline, results) if o.text != r[3])
        if parts:
            print("              first differing character of each mismatch (offline top-2 log-probability gap at "
                  "its token): " + ", ".join(f"{c} ({g:.3f})" if g is not None else f"{c}" for c, g in parts[:20]))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
