"""MTP self-speculative decoding on one GPU, end to end: train `small` for a few minutes, then decode greedily
with speculative_k in {0, 1, 2} through CUDA-graph engines, beside transformers' `generate` on the same
checkpoint.

    PYTHONPATH=. python bench/spec_gpu.py --out-json /tmp/spec.json                 # train 5 min, then measure
    PYTHONPATH=. python bench/spec_gpu.py --run runs/small_spec --compile           # an existing run / checkpoint

1. Training (skipped with --run): bench/gpu_small.py's path (`train_for_minutes`): the stdlib corpus, a
   32K BPE and token caches, a 25-step probe for tokens/s, then a run whose step count fits --minutes,
   into --out (default runs/small_spec; micro-batch 8, as measured on an 80 GB card).
2. The checkpoint loads with `load_pretrained` in bf16 on the GPU (fp32 on the CPU). The card's copy
   bandwidth is measured (bench/bandwidth.py: 2 x bytes of a device-to-device copy / median time).
3. For every batch size B of --batches and k of --ks, one Engine(cuda_graphs=True, speculative_k=k,
   compile_decode=--compile) decodes max(B, --min-prompts) prompts, B at a time: --prompt-len-token
   windows of held-out (val split) stdlib documents, greedy (--temperature T: sampled, prompt i with seed i),
   --new tokens each, ignore_eos. The whole
   workload runs once untimed (it captures the graphs of every batch / context bucket it uses), then
   again timed: decode tok/s = tokens produced after each batch's prefill step / time of those steps.
   Acceptance (drafted tokens accepted), first-draft acceptance (the paper's second-token figure) and
   mean accepted length (tokens per verification round) come from the engine's stats of the timed pass.
   Greedy outputs of every k are compared with k = 0's token for token (same B): a bf16 mismatch can come
   from near-ties (verification runs k + 1 positions through other kernels than one-token decode), so the
   count of identical sequences and the first divergence index are reported, not asserted; the same
   comparison between k = 0 at two batch sizes gives the bf16 noise floor.
   Where the engine refuses cuda_graphs with k > 0 (before issue 14), that k runs eager, labelled so;
   --spec-eager asks for that path (k > 0 without graphs) on purpose, for a before / after comparison;
   --verify-rows on / both runs k > 0 with the `verify_rows` switch (dsv3/kernels/backend.py) on / both ways (it
   changes only steps of at most k + 1 rows: at larger batches one row, with the switch as asked);
   --round-graph on / both likewise with `round_graph` (a round as one CUDA graph; with --temperature
   `round_sampled` instead, for k = 0 too: a sampled step or round as one graph), --round-compile with
   `round_compile` (with --compile, a round graph's whole forward compiled as one function; default: as shipped).
4. transformers: the same checkpoint directory through AutoModelForCausalLM (DeepseekV3ForCausalLM; it drops
   the MTP layer) in bf16 on the GPU, `generate` greedy on the first B prompts (min_new_tokens = --new):
   decode tok/s = B (new - 1) / (t(new tokens) - t(1 token)), beside ours, and whether its tokens equal
   ours (k = 0).

Results go to stdout (markdown tables, each captioned with the card and its measured copy bandwidth) and
to --out-json (rewritten after every row, so a run stopped at a time limit keeps what it measured).
--export-bf16 DIR also writes the loaded bf16 model + tokenizer as a checkpoint directory (for
bench/serve_load.py on the GPU: a run's own checkpoints are fp32, which the server would run eagerly).
--tok-s N skips the throughput probe (the figure an earlier run printed), saving about a minute.
CPU smoke test: --device cpu --preset tiny --minutes 0.2 --seq-len 64 --batch-size 4 --micro-batch-size 0
--batches 1,4 --new 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3.checkpoints.hf import load_pretrained, save_pretrained  # noqa: E402
from dsv3.checkpoints.rundir import resolve_checkpoint  # noqa: E402
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv3.kernels import backend as kernel_backend  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402
from bandwidth import copy_bandwidth  # noqa: E402  (bench/bandwidth.py)
from decode import prompts as heldout_prompts  # noqa: E402  (bench/decode.py: windows of val-split documents)
from gpu_small import add_train_args, train_for_minutes  # noqa: E402

T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s]", *a, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def divergence(a: list[int], b: list[int]) -> int | None:
    """First index where two token sequences differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(outs: list[list[int]], ref: list[list[int]], margins: list[list[float]] | None = None) -> dict:
    """outs against ref, sequence by sequence. margins: ref's per-token gap between its two most likely tokens'
    log-probabilities (timed_decode's); then each first divergence's gap is reported with it: a near-tie (a gap
    within bf16's rounding) is what another kernel's reduction order may flip, a wide gap would be a bug."""
    div = [divergence(a, b) for a, b in zip(outs, ref)]
    pairs = sorted(((d, None if margins is None or d >= len(margins[i]) else margins[i][d])
                    for i, d in enumerate(div) if d is not None), key=lambda p: p[0])
    return {"identical": sum(d is None for d in div), "of": len(div), "first_divergence": [d for d, _ in pairs],
            "margin_at_divergence": [m for _, m in pairs]}


def fmt_cmp(c: dict | None) -> tuple[str, str]:
    if c is None:
        return "-", "-"
    f = c["first_divergence"]
    gaps = c.get("margin_at_divergence") or [None] * len(f)
    shown = ", ".join(f"{d}" + ("" if m is None else f" (gap {m:.3f})") for d, m in zip(f[:6], gaps))
    shown += ", ..." if len(f) > 6 else ""
    return f"{c['identical']}/{c['of']}", (shown or "-")


def timed_decode(model, tok, prompts: list[list[int]], B: int, k: int, new: int, graphs: bool, compile_decode: bool,
                 device: torch.device, temperature: float = 0.0, logprobs: int | None = None) -> dict:
    """Warm-up pass (graph capture) then the timed pass of the workload, B prompts at a time. With k = 0 (greedy)
    a second warm-up pass asks for the top-2 log-probabilities (outside the timed pass): "margins", per prompt and
    generated token, the gap between the two most likely tokens, kept where its tokens are the timed pass's.
    temperature > 0: prompt i samples with seed i (the same requests in every row); logprobs: every request asks
    for the log-probabilities of its tokens and of the `logprobs` most likely."""
    kw = dict(max_batch_size=B, cache_tokens=B * (len(prompts[0]) + new + k + 1 + 32), speculative_k=k,
              max_prefill_tokens=0)  # a batch's prompts in its one prefill step, before the timed decode steps
    label = ("graphs" + ("+compile" if compile_decode else "")) if device.type == "cuda" else "static step, eager"
    try:
        eng = Engine(model, tok, cuda_graphs=graphs, compile_decode=compile_decode and graphs, **kw)
    except ValueError as e:
        if not (graphs and k > 0):
            raise
        log(f"note: the engine refuses cuda_graphs with speculative_k={k} ({e}); k={k} runs EAGER")
        eng = Engine(model, tok, cuda_graphs=False, **kw)
        label = "eager (graphs refused)"
    if not graphs:
        label = "eager"
    sps = [SamplingParams(max_new_tokens=new, temperature=temperature, ignore_eos=True,
                          seed=i if temperature else None, logprobs=logprobs) for i in range(len(prompts))]
    chunks = [list(range(i, min(i + B, len(prompts)))) for i in range(0, len(prompts), B)]
    t = time.perf_counter()
    lp_outs = []
    for c in chunks:  # (the timed pass's requests: it captures their graphs, with or without log-probabilities)
        eng.generate([prompts[i] for i in c], [sps[i] for i in c])
        if k == 0 and not temperature:
            lp_outs += eng.generate([prompts[i] for i in c], [dataclasses.replace(sps[i], logprobs=2) for i in c])
    sync(device)
    warm = time.perf_counter() - t
    captured = getattr(eng, "graph_captures", None)  # graphs captured so far (engines that count them)
    eng.stats = type(eng.stats)()
    dt, n, outs, steps = 0.0, 0, [], 0
    for c in chunks:
        ids = [eng.add_request(prompts[i], sps[i]) for i in c]
        final = {o.request_id: o.token_ids for o in eng.step() if o.finished}  # the batch's prefill
        sync(device)
        t = time.perf_counter()
        while eng.has_unfinished():
            steps += 1
            for o in eng.step():
                n += len(o.new_token_ids)
                if o.finished:
                    final[o.request_id] = o.token_ids
        sync(device)
        dt += time.perf_counter() - t
        outs += [final[i] for i in ids]
    s = eng.stats
    margins = None
    if k == 0 and not temperature and [o.token_ids for o in lp_outs] == outs:
        margins = [[lp.top[0][1] - lp.top[1][1] if len(lp.top) > 1 else float("inf") for lp in o.logprobs]
                   for o in lp_outs]
    late = None if captured is None else eng.graph_captures - captured  # should be 0: none in the timed pass
    del eng
    free(device)
    spec = {"acceptance": s.acceptance_rate if k else None, "first_draft_acceptance": s.first_draft_acceptance
            if k else None, "mean_accepted_length": s.mean_accepted_length if k else None}
    return {"batch": B, "k": k, "path": label, "prompts": len(prompts), "decode_tok_s": n / dt, "decode_s": dt,
            "decode_tokens": n, "decode_steps": steps, "warmup_s": warm,
            "graph_captures": captured, "captures_while_timed": late, "rounds": s.rounds, **spec, "outputs": outs,
            "margins": margins}


def hf_generate(path: str, prompts: list[list[int]], batches: list[int], new: int, device: torch.device, dtype,
                ours: dict[int, list[list[int]]], pad_id: int) -> list[dict]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    hf = hf.to(device).eval()
    skipped = sorted({".".join(k.split(".")[:3]) for k in info["unexpected_keys"]})
    log(f"transformers {type(hf).__name__} loaded in {time.perf_counter() - t:.1f}s (not loaded: "
        f"{', '.join(skipped) or 'nothing'}; missing: {len(info['missing_keys'])})")
    rows = []
    for B in batches:
        ids = torch.tensor(prompts[:B], device=device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad_id)

        def gen(m: int) -> tuple[float, torch.Tensor]:
            sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(ids, max_new_tokens=m, min_new_tokens=m, **kw)
            sync(device)
            return time.perf_counter() - t, out

        gen(2)  # warm-up
        t1 = statistics.median(gen(1)[0] for _ in range(3))
        tn, out = gen(new)
        toks = out[:, ids.shape[1]:].tolist()
        rows.append({"batch": B, "decode_tok_s": B * (new - 1) / max(tn - t1, 1e-9), "e2e_tok_s": B * new / tn,
                     "prefill_s": t1, "total_s": tn,
                     "vs_dsv3_k0": compare(toks, ours[B][:B]) if B in ours else None})
        log(f"transformers batch {B}: {rows[-1]['decode_tok_s']:,.1f} decode tok/s")
    return rows  # the model goes with this frame


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(ap, minutes=5.0, out="runs/small_spec", micro_batch_size=8)
    ap.add_argument("--run", help="an existing run or checkpoint directory: skip training")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ks", default="0,1,2")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--min-prompts", type=int, default=8, help="a batch size below this decodes this many prompts, "
                                                                 "B at a time")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the graphed decode step")
    ap.add_argument("--spec-eager", action="store_true", help="k > 0 without CUDA graphs (the pre-issue-14 path)")
    ap.add_argument("--verify-rows", choices=("off", "on", "both"), default="on",
                    help="k > 0 with the verify_rows switch (dsv3/kernels/backend.py: the verification step of one "
                         "sequence takes the one-row decode kernels) off, on (default, as shipped), or each k both "
                         "ways")
    ap.add_argument("--round-graph", choices=("off", "on", "both"), default="on",
                    help="k > 0 with the round_graph switch (dsv3/kernels/backend.py: a round as one CUDA graph) "
                         "off, on (default, as shipped for speculation rounds), or each k both ways; k = 0 decodes "
                         "with the switch as the process has it (DSV3_KERNELS=round_graph=on: one graph a step with "
                         "its argmax); with --temperature, round_sampled instead, for k = 0 too")
    ap.add_argument("--round-compile", choices=("off", "on", "both"),
                    help="k > 0 with the round_compile switch (dsv3/kernels/backend.py: with --compile, a round "
                         "graph's whole forward compiled as one function) off, on, or each k both ways (default: as "
                         "shipped)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (prompt i with seed i) instead of greedy decoding; --round-graph "
                    "then sets round_sampled (k = 0 too): with both, steps one by one and in one graph")
    ap.add_argument("--logprobs", type=int, metavar="N",
                    help="every request asks for log-probabilities (its tokens' and the N most likely); --round-graph "
                         "then sets round_graph for k = 0 too (greedy)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--bw-gib", type=float, default=2.0, help="size of the copy that measures the bandwidth")
    ap.add_argument("--export-bf16", metavar="DIR", help="also save the loaded model + tokenizer there (bf16)")
    ap.add_argument("--out-json")
    ap.add_argument("--deadline-min", type=float, default=9.3,
                    help="skip what is left (decode rows, transformers) once this much wall time has passed")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("spec_gpu.py: CUDA is not available. This benchmark needs a GPU (a CPU smoke run: "
                         "--device cpu --preset tiny --minutes 0.2 --seq-len 64 --batch-size 4 --micro-batch-size 0 "
                         "--batches 1,4 --new 16)")
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    deadline = args.deadline_min * 60
    result: dict = {"command": sys.argv, "torch": torch.__version__, "rows": [], "hf_rows": []}

    def dump() -> None:
        if args.out_json:
            with open(args.out_json, "w") as f:
                json.dump(result, f, indent=1)

    run = args.run
    if run is None:
        log(f"training {args.preset} for ~{args.minutes} min into {args.out}")
        result["train_summary"] = train_for_minutes(args, log=log)
        run = args.out
        free(device)
    path = resolve_checkpoint(run)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = time.perf_counter()
    tok = DSTokenizer.load(path)
    model = load_pretrained(path, device=device, dtype=dtype).eval()
    cfg = model.config
    log(f"loaded {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, "
        f"{cfg.num_nextn_predict_layers} MTP module(s)) in {time.perf_counter() - t:.1f}s")
    if args.export_bf16:
        save_pretrained(model, args.export_bf16, dtype=torch.bfloat16)
        tok.save(args.export_bf16)
        log(f"wrote the bf16 checkpoint {args.export_bf16}")
    bw = copy_bandwidth(device, int(args.bw_gib * 2**30) if device.type == "cuda" else None)
    card = bw["short"]
    result.update(checkpoint=path, card=bw["card"], copy_bandwidth=bw)
    log(f"torch {torch.__version__}; {bw['caption']}")
    n_prompts = max(max(batches), args.min_prompts)
    prompts = heldout_prompts(tok, n_prompts, args.prompt_len)
    result["prompts"] = {"n": n_prompts, "len": args.prompt_len, "new": args.new}

    rows: list[dict] = result["rows"]
    outs: dict[tuple[int, int, bool, bool, bool], list[list[int]]] = {}  # (B, k, verify_rows, round_graph, compile)
    margins: dict[int, list[list[float]] | None] = {}  # k = 0's top-2 gaps per batch size (timed_decode)
    modes = {"off": [False], "on": [True], "both": [False, True]}
    shipped_vr = kernel_backend.switch("verify_rows", False)
    shipped_rg = kernel_backend.switch("round_graph", False)
    shipped_rc = kernel_backend.switch("round_compile", False)
    shipped_rs = kernel_backend.switch("round_sampled", False)
    rcs = modes[args.round_compile] if args.round_compile and args.compile else [bool(shipped_rc)]
    # (round_compile changes only compiled round graphs)
    variants = [(vr, rg, rc) for vr in modes[args.verify_rows] for rg in modes[args.round_graph]
                for rc in (rcs if rg else rcs[-1:])]
    # sampled (--temperature): plain decoding (k = 0) with round_sampled as --round-graph says too (off: its graph and
    # the eager draw; on: its step and draw in one graph); each k > 0 row's speed-up is against k = 0 the same way.
    # base_key: k = 0's first row, the one k > 0's outputs are compared with
    # --logprobs (greedy): k = 0 likewise with round_graph
    k0_rg = args.logprobs is not None and not args.temperature
    k0_variants = ([(False, rg, rcs[-1] if rg else False) for rg in modes[args.round_graph]]
                   if args.temperature or k0_rg else [(False, False, False)])
    base_key = k0_variants[0]
    for B in batches:
        # verify_rows changes only steps of at most k + 1 rows (batch 1): above, one row per round_graph setting
        at_b = variants if B == 1 else [v for v in variants if v[0] == modes[args.verify_rows][-1]]
        for k, (vr, rg, rc) in [(k, v) for k in ks for v in (at_b if k else k0_variants)]:
            if time.perf_counter() - T0 > deadline:
                log(f"deadline: skipping batch {B}, k={k}")
                continue
            # cuda_graphs=True on the CPU runs the same static-shape steps eagerly (how the tests check them)
            graphs = not (k > 0 and args.spec_eager)
            kernel_backend.switch("verify_rows", vr)  # (the engine reads them when it is made)
            # (k = 0: as the process has it: DSV3_KERNELS=round_graph=on makes plain decoding's step one graph too)
            kernel_backend.switch("round_graph", rg if k or k0_rg else shipped_rg)
            kernel_backend.switch("round_sampled", rg if args.temperature else shipped_rs)
            kernel_backend.switch("round_compile", rc if k or rg else shipped_rc)
            r = timed_decode(model, tok, prompts[:max(B, args.min_prompts)], B, k, args.new, graphs,
                             args.compile and device.type == "cuda", device, args.temperature, args.logprobs)
            # (greedy: round_graph(k) True, or LOGPROB_STEPS where k = 0, one graph if the requests ask for them)
            greedy_round = kernel_backend.round_graph(k) in (True, kernel_backend.LOGPROB_STEPS) if args.logprobs \
                is not None else kernel_backend.round_graph(k) is True
            rounds = kernel_backend.round_sampled() if args.temperature else greedy_round
            r["path"] += (("+verify_rows" if vr and B == 1 else "")
                          + ("+round_graph" if greedy_round else "")
                          + ("+round_sampled" if args.temperature and kernel_backend.round_sampled() else "")
                          + ("+round_compile" if rounds and kernel_backend.round_compile() and args.compile else ""))
            r["one_graph"] = rounds
            outs[(B, k, vr, rg, rc)] = r.pop("outputs")
            m = r.pop("margins")
            margins[B] = m if k == 0 and (vr, rg, rc) == base_key else margins.get(B)
            base = next((x for x in rows if x["batch"] == B and x["k"] == 0 and x["one_graph"] == rounds),
                        next((x for x in rows if x["batch"] == B and x["k"] == 0), None))
            r["speedup_vs_k0"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
            r["vs_k0"] = (compare(outs[(B, k, vr, rg, rc)], outs[(B, 0, *base_key)], margins.get(B))
                          if k and (B, 0, *base_key) in outs else None)
            rows.append(r)
            log(f"batch {B}, k={k} ({r['path']}): {r['decode_tok_s']:,.1f} decode tok/s, warm-up {r['warmup_s']:.1f}s, "
                f"graphs captured in warm-up {r['graph_captures']}, while timed {r['captures_while_timed']}")
            dump()
    kernel_backend.switch("verify_rows", shipped_vr)
    kernel_backend.switch("round_graph", shipped_rg)
    kernel_backend.switch("round_compile", shipped_rc)
    kernel_backend.switch("round_sampled", shipped_rs)
    # noise floor: k = 0 at each batch size against the smallest, on the prompts they share (bf16 numerics vary
    # with the batch: another GEMM tiling can resolve a near-tie differently)
    noise = []
    b0 = min(batches)
    for B in batches:
        if B != b0 and (B, 0, *base_key) in outs and (b0, 0, *base_key) in outs:
            a, b = outs[(B, 0, *base_key)], outs[(b0, 0, *base_key)]
            m = min(len(a), len(b))
            ref_m = margins.get(b0)
            noise.append({"batch": B, "against_batch": b0, **compare(a[:m], b[:m], ref_m[:m] if ref_m else None)})
    result["batch_noise"] = noise

    def na(x, f="{:.3f}"):
        return "-" if x is None or x != x else f.format(x)

    how = (f"sampled (temperature {args.temperature})" if args.temperature else "greedy") + (
        f" with log-probabilities (top {args.logprobs})" if args.logprobs is not None else "")
    print(f"\nTable: MTP self-speculative {how} decode, {cfg.num_hidden_layers}-layer checkpoint {path}, "
          f"{args.prompt_len}-token held-out prompts, {args.new} new tokens; {bw['caption']}\n")
    print("| card (measured copy BW) | batch | k | decode path | decode tok/s | speed-up vs k=0 | acceptance | "
          "first-draft acc. | mean accepted length | identical to k=0 | first divergence (token) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same, first = fmt_cmp(r["vs_k0"])
        print(f"| {card} | {r['batch']} | {r['k']} | {r['path']} | {r['decode_tok_s']:,.1f} | "
              f"{na(r['speedup_vs_k0'], '{:.2f}x')} | {na(r['acceptance'])} | {na(r['first_draft_acceptance'])} | "
              f"{na(r['mean_accepted_length'], '{:.2f}')} | {same} | {first} |")
    mism = sum(r["vs_k0"]["of"] - r["vs_k0"]["identical"] for r in rows if r["vs_k0"])
    print(f"\n{how} outputs of k > 0 that differ from k = 0: {mism} sequence(s)"
          + (" (sampled: k > 0 draws other random numbers; only greedy outputs should agree)" if args.temperature
             else ""))
    for x in noise:
        same, first = fmt_cmp(x)
        print(f"noise floor: k=0 at batch {x['batch']} vs batch {x['against_batch']} on their {x['of']} shared "
              f"prompts: {same} identical (first divergences: {first})")
    dump()

    if not args.no_hf:
        if time.perf_counter() - T0 > deadline:
            log("deadline: skipping transformers")
        else:
            del model
            free(device)
            try:
                k0 = {B: outs[(B, 0, *base_key)] for B in batches if (B, 0, *base_key) in outs}
                result["hf_rows"] = hf_generate(path, prompts, batches, args.new, device, dtype, k0, tok.eos_id)
            except ImportError as e:
                log(f"transformers not available ({e}); skipped")
            free(device)
            dump()
    if result["hf_rows"]:
        print(f"\nTable: transformers generate vs dsv3 on the same checkpoint and prompts; {bw['caption']}\n")
        print("| card (measured copy BW) | batch | transformers decode tok/s | dsv3 k=0 tok/s | dsv3 best k tok/s "
              "(k) | dsv3 k=0 / transformers | dsv3 best / transformers | transformers tokens = dsv3 k=0 |")
        print("|---|---|---|---|---|---|---|---|")
        for h in result["hf_rows"]:
            mine = [r for r in rows if r["batch"] == h["batch"]]
            k0 = next((r for r in mine if r["k"] == 0), None)
            best = max(mine, key=lambda r: r["decode_tok_s"]) if mine else None
            h["ratio_k0"] = k0["decode_tok_s"] / h["decode_tok_s"] if k0 else None
            h["ratio_best"] = best["decode_tok_s"] / h["decode_tok_s"] if best else None
            same, first = fmt_cmp(h["vs_dsv3_k0"])
            print(f"| {card} | {h['batch']} | {h['decode_tok_s']:,.1f} | {na(k0 and k0['decode_tok_s'], '{:,.1f}')} | "
                  f"{na(best and best['decode_tok_s'], '{:,.1f}')} ({best['k'] if best else '-'}) | "
                  f"{na(h['ratio_k0'], '{:.1f}x')} | {na(h['ratio_best'], '{:.1f}x')} | {same} |")
        dump()
    log(f"done; {bw['caption']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
