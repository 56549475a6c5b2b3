"""Decode speed of a randomly initialised model on one GPU through the engine, against the HBM roofline,
and transformers' `generate` on the same config.

    PYTHONPATH=. python bench/decode_gpu.py --preset 16b --batches 1,32,128 --hf

Roofline: the bytes a decode step must read from HBM — every non-expert weight, each MoE layer's
shared experts and the routed experts that the batch's tokens select (expected distinct experts
E·(1 − (1 − K/E)^B) for uniform routing), the output head, and the latent KV cache of the batch —
divided by the copy bandwidth of this card measured at the start of the same run (bench/bandwidth.py: a
--bw-gib GiB device-to-device `copy_`, timed with CUDA events, median of 20 after 3 warm-ups, counting the
bytes read plus the bytes written, i.e. 2 x the size, as STREAM's copy does), in bf16. The card's name and
that bandwidth head the output and caption every table (transformers rows included, in a column).
Greedy, 128-token random prompts, --new tokens per request, no speculation (random weights make MTP
drafts meaningless).

Mode suffixes (any order, on any mode): +nogemv, the routed experts without their decode GEMV. The switched decode
kernels (dsv3/kernels/backend.py SWITCHED): a mode without kernel suffixes runs the shipped defaults (the dense GEMV,
the latent store, the grouped decode GEMM, the head GEMV and the merge + W_UV launch on); +nokernels turns every one off (the path before
them); +densegemv, +headgemv, +latentstore, +moegemm run exactly the ones named. +densegemv: the dense bf16 linears
(attention projections, dense FFN, shared experts) and the routers' logits through the dense decode GEMV
(kernels.set_dense_gemv) instead of cuBLAS; +headgemv: absorbed MLA's W_UK / W_UV products through the per-head
decode GEMV (kernels.set_head_gemv) instead of the einsums' batched GEMMs; +latentstore: the decode step's latent
RMSNorm + RoPE + cache write as one kernel (kernels.set_latent_store) instead of the compiled norm and RoPE and two
index_copy launches; +moegemm: the routed experts of batches above one pair per expert through the grouped decode
GEMM (kernels.set_moe_gemm) instead of torch._grouped_mm (bf16) or the per-row FP8 GEMV; +mlauv: absorbed MLA's W_UV
product inside the attention's merge launch (kernels.set_mla_uv) instead of a launch of its own. The paged MLA decode
kernel's split (mla_decode_triton: one 32-position tile per program, shipped): +twotiles, two tiles per program (the
earlier default); +tile16, one 16-position tile. At batch 1 a layer's attention is latency-bound (8.5 us at ~190
positions, 2026-12-04), so more, shorter programs help. +pdl / +nopdl: dsv3's decode kernels with or without
programmatic dependent launch (kernels.set_pdl); +ipdl / +noipdl: the compiled step's inductor kernels with or without
it (graphs.INDUCTOR_PDL, where the torch has the option); without them, the shipped defaults. +argmax1: the greedy
argmax as torch's single pass over the vocabulary (before the two-pass sampling.argmax); +sync: the engine without
overlapped decoding (each step's results read before the next step is queued). Under each graphed row a line splits
the step: the graph replayed back to back (the GPU's time), replayed with the argmax and the copy to the host synced
each time, and the rest (the engine's host work). +nodual: absorbed MLA's q (or q_a) and kv_a projections as two
launches (each its own GEMV / FP8 GEMM) instead of one dual launch (kernels.dense_gemv2, kernels.fp8_weight_linear2).
+sharedgemv / +nosharedgemv: the shared experts as more rows of the routed experts' two GEMV launches, for every
weight dtype / for none (kernels.set_shared_gemv; shipped: e4m3 weights only). +tuned: the
expert GEMV's launch configs of `--gemv-configs PATH` (bench/expert_gemv_sweep.py --json: the best per weight
dtype, rows and columns) instead of `expert_gemv_triton.default_config`, where they name the call's shape (with
+sharedgemv the routed launches have K + n_shared rows a token, which a sweep at K rows does not name: defaults).
+psum: the decode GEMVs (expert GEMV, FP8 and dense GEMV forms) sum each thread's 16-byte group of a row and scale it
once (expert_gemv_triton._dot_part, fp8_gemm_triton._gemv_tile) where the config does not say (GEMV_PSUM).
+mlaprep / +nomlaprep: the latent store and absorbed MLA's W_UK head GEMV in one launch where both run (batch 1: the
head GEMV's rule), or as two (kernels.set_mla_prep; shipped: one). It needs both kernels
on: with +nokernels, or kernel flags that leave +latentstore or +headgemv out, it changes nothing.
Before and after in one run:

    PYTHONPATH=. python bench/decode_gpu.py --preset 16b --batches 1,32 --modes graphs+compile+nokernels,\
graphs+compile,graphs+compile+densegemv,graphs+compile+latentstore,graphs+compile+moegemm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3 import kernels  # noqa: E402
from dsv3.kernels import backend as kb  # noqa: E402
from dsv3.kernels import mla_decode_triton as mla_k  # noqa: E402  (the +twotiles / +tile16 experiments)
from dsv3.kernels import expert_gemv_triton as egk  # noqa: E402  (the +tuned modes)
from dsv3.kernels import fp8_gemm_triton as fgk  # noqa: E402  (+psum)
from dsv3.inference import graphs  # noqa: E402  (INDUCTOR_PDL: the +ipdl modes)
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv3.inference import sampling  # noqa: E402  (the +argmax1 mode: torch's one-pass argmax)
from dsv3.inference.graphs import next_pow2  # noqa: E402
from dsv3.checkpoints.hf import quantize_model_fp8  # noqa: E402
from dsv3.model.fp8 import FP8Linear  # noqa: E402
from dsv3.info import model_info  # noqa: E402
from bandwidth import copy_bandwidth  # noqa: E402  (bench/bandwidth.py)

# kernel choices a mode may add to its path, in any order
MODE_FLAGS = ("+nogemv", "+nokernels", "+densegemv", "+headgemv", "+latentstore", "+moegemm", "+mlauv", "+twotiles",
              "+tile16", "+pdl", "+nopdl", "+ipdl", "+noipdl", "+argmax1", "+sync", "+nodual",
              "+tuned", "+sharedgemv", "+nosharedgemv", "+psum", "+mlaprep", "+nomlaprep")
KERNEL_FLAGS = {"+densegemv": "dense_gemv", "+headgemv": "head_gemv", "+latentstore": "latent_store",
                "+moegemm": "moe_gemm", "+mlauv": "mla_uv"}  # the switched decode kernels (backend.py SWITCHED)
SHIPPED = dict(kb.SWITCHED)  # their defaults, as `dsv3 serve` runs them
SHIPPED_INDUCTOR_PDL = graphs.INDUCTOR_PDL
SHIPPED_ARGMAX_MIN = sampling.ARGMAX_MIN  # the two-pass argmax's threshold (+argmax1: never)
DUALS = (kernels.dense_gemv2, kernels.fp8_weight_linear2)  # MLA's pair in one launch (+nodual: two)
SHIPPED_GEMV_CONFIG = egk.default_config  # the expert GEMV's launch rule (+tuned: a sweep's configs first)
SHIPPED_PSUM = (egk.GEMV_PSUM, fgk.GEMV_PSUM)  # the GEMVs' per-group partial sums (+psum: on in both)


def tuned_config(path: str | None):
    """expert_gemv_triton.default_config with the best configs of an expert_gemv_sweep.py --json file first."""
    if not path:
        raise SystemExit("the +tuned modes need --gemv-configs PATH (bench/expert_gemv_sweep.py --json)")
    with open(path) as f:
        best = {(b["fp8"], b["M"], b["N"]): b["cfg"] for b in json.load(f)["best"]}

    def config(fp8: bool = False, M: int = 6, N: int = 2048) -> dict:
        return dict(best.get((fp8, M, N)) or SHIPPED_GEMV_CONFIG(fp8, M, N))

    return config


def kernel_switches(flags: set[str]) -> dict[str, bool]:
    """A mode's switched kernels: the shipped defaults without kernel flags; all off with +nokernels; else exactly
    the ones its flags name."""
    if "+nokernels" not in flags and not flags & set(KERNEL_FLAGS):
        return {op: SHIPPED[op] for op in KERNEL_FLAGS.values()}
    return {op: flag in flags for flag, op in KERNEL_FLAGS.items()}


def pdl_switches(flags: set[str]) -> tuple[bool, bool]:
    """A mode's programmatic dependent launch: (dsv3's decode kernels, inductor's generated kernels). +pdl / +nopdl
    set dsv3's and +ipdl / +noipdl inductor's (torch._inductor.config.triton.enable_pdl; it follows dsv3's switch);
    without them, the shipped defaults."""
    ours = True if "+pdl" in flags else False if "+nopdl" in flags else bool(SHIPPED["pdl"])
    inductor = True if "+ipdl" in flags else False if "+noipdl" in flags else SHIPPED_INDUCTOR_PDL
    return ours, inductor


def set_inductor_pdl(on: bool) -> bool:
    """Inductor's PDL in the engine's compiled decode steps (graphs.INDUCTOR_PDL, applied where dsv3's kernels use PDL
    and the torch has the option); returns whether it can be on. Each mode's engine compiles anew under it."""
    graphs.INDUCTOR_PDL = on
    return on and hasattr(torch._inductor.config.triton, "enable_pdl")


def split_mode(mode: str) -> tuple[str, set[str]]:
    """'graphs+compile+densegemv' -> ('graphs+compile', {'+densegemv'}): the decode path and its kernel flags."""
    parts = mode.split("+")
    return "+".join(p for p in parts if f"+{p}" not in MODE_FLAGS), {f"+{p}" for p in parts if f"+{p}" in MODE_FLAGS}


def step_bytes(cfg, B: int, ctx: int, fp8: bool = False) -> float:
    info = model_info(cfg)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = info.n_moe_layers
    routed_all = n_moe * E * per_expert
    non_routed = info.total - routed_all - cfg.vocab_size * cfg.hidden_size  # embedding rows: ~B reads, ignore
    distinct = E * (1 - (1 - K / E) ** B)
    kv_bytes = B * ctx * info.kv_latent_bytes  # kv_latent_bytes: per token, all layers, bf16
    if fp8:  # the official FP8 set (projections, experts) at 1 byte; the output head stays bf16
        head = cfg.vocab_size * cfg.hidden_size
        return 2 * head + (non_routed - head + n_moe * distinct * per_expert) + kv_bytes
    return 2 * (non_routed + n_moe * distinct * per_expert) + kv_bytes


def gap_line(eng: Engine, B: int, step_s: float, reps: int = 50) -> None:
    """Where an engine step's time goes beyond the GPU's: the last decode bucket's graph replayed back to back
    (the GPU's time per step, nothing on the host between), then replayed with the greedy argmax and the copy to
    the host synced after each (what a step needs before the host can schedule the next). Printed under the
    row; what the step takes beyond the back-to-back replays is the engine's host work that the device waited for
    (scheduling, the meta copy, sampling set-up, outputs: hidden by overlapped decoding where it works)."""
    entries = [(key, e) for key, e in eng._graphs._entries.items()
               if key[0] == ("main",) and key[1] == min(next_pow2(B), eng._graphs.max_batch_size) and e.graph]
    if not entries:
        return
    e = max(entries, key=lambda kv: kv[0][3])[1]  # the longest context bucket: the last steps ran it
    for _ in range(3):
        e.graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        e.graph.replay()
    torch.cuda.synchronize()
    replay = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        e.graph.replay()
        sampling.argmax(e.outputs[0][:B, -1]).tolist()
    synced = (time.perf_counter() - t) / reps
    print(f"|  | (step {step_s * 1e3:.3f} ms: graph replays back to back {replay * 1e3:.3f} ms, replay + argmax + "
          f"copy to the host synced each step {synced * 1e3:.3f} ms; the step beyond the GPU's time "
          f"{(step_s - replay) * 1e3:.3f} ms) | | | | | | |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--moe-gemm-rows", type=int, default=0,
                    help="raise the grouped decode GEMM's limit (kernels.backend.MOE_GEMM_ROWS, (token, expert) pairs; "
                         "default: the shipped 1024) to measure other limits")
    ap.add_argument("--gemv-configs", default=None, help="bench/expert_gemv_sweep.py --json output for the +tuned "
                    "modes")
    ap.add_argument("--bw-gib", type=float, default=2.0, help="size of the copy that measures the bandwidth")
    ap.add_argument("--modes", default="eager,graphs",
                    help="engine decode paths to time: eager, graphs, graphs+compile, graphs+compile+einsum (the "
                         "absorbed attention as compiled einsums over the gathered context instead of the Triton "
                         "paged-latent kernel), graphs+fp8 / graphs+compile+fp8 (128x128-block e4m3 weights through "
                         "the Triton FP8 GEMMs; put it last: it quantizes the model in place); any mode + '+nogemv': "
                         "the routed experts without the decode GEMV kernel (kernels.expert_gemv), as before it; the "
                         "switched decode kernels: the shipped defaults, or +nokernels (all off), or exactly those of "
                         "'+densegemv', '+headgemv', '+latentstore', '+moegemm', '+mlauv' (module docstring); "
                         "'+twotiles', '+tile16': the MLA decode split; '+pdl', '+nopdl', '+ipdl', '+noipdl': "
                         "programmatic dependent launch; '+argmax1': torch's one-pass greedy argmax; '+sync': the "
                         "engine without overlapped decoding (each step read before the next is queued); "
                         "'+mlaprep' / '+nomlaprep': the latent store and the W_UK head GEMV in one launch / two")
    args = ap.parse_args()
    if args.moe_gemm_rows < 0:
        raise SystemExit(f"--moe-gemm-rows must be >= 0 (0: the shipped limit), got {args.moe_gemm_rows}")
    if args.moe_gemm_rows:  # the pairs' limit (Experts._moe_gemm_fits) and the kernel rule's token rows
        kb.MOE_GEMM_ROWS = args.moe_gemm_rows
    if not torch.cuda.is_available():
        raise SystemExit("decode_gpu.py: CUDA is not available; this benchmark runs on a GPU")
    cfg = dsv3.preset(args.preset).replace(num_nextn_predict_layers=0)
    bw = copy_bandwidth("cuda", int(args.bw_gib * 2**30))  # before the model takes memory
    hbm = bw["bytes_per_s"]  # the roofline's bytes/s
    torch.manual_seed(0)
    model = dsv3.build_model(cfg, device="cuda", dtype=torch.bfloat16)
    # the experts' "auto" path, as the engine serves (on a GPU: grouped GEMMs, the decode GEMV for <= 1 pair per
    # expert); forcing "grouped" here, as this script did until 2026-12-04, also turns the GEMV off
    g = torch.Generator().manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.preset} random weights, bf16, "
          f"{model_info(cfg).total / 1e9:.2f}B params")
    print(f"roofline ceiling: {bw['caption']}")
    card = bw["short"]
    print(f"\nTable: decode speed, {bw['caption']}\n")
    print("| card (measured copy BW) | impl | batch | TTFT (ms) | decode tok/s | step (ms) | roofline step (ms) | "
          "of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    modes = args.modes.split(",")
    bad = {split_mode(m)[0] for m in modes} - {"eager", "graphs", "graphs+compile", "graphs+compile+einsum",
                                                 "graphs+fp8", "graphs+compile+fp8"}
    if bad:
        raise SystemExit(f"--modes: unknown {sorted(bad)}")
    # the +fp8 modes quantise the model in place: they run after the others, in their given order (a device call
    # that named one earlier used to stop here, its time spent)
    ordered = [m for m in modes if "+fp8" not in m] + [m for m in modes if "+fp8" in m]
    if ordered != modes:
        print(f"(--modes run as {','.join(ordered)}: the +fp8 modes last, since they quantise the model in place)")
        modes = ordered
    for mode, B in [(m, int(b)) for m in modes for b in args.batches.split(",")]:
        base, flags = split_mode(mode)  # the path; the flags only change kernels
        if "+fp8" in mode and not any(isinstance(x, FP8Linear) for x in model.modules()):
            quantize_model_fp8(model)
        prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(B)]
        # max_prefill_tokens=0: the whole batch's prompts in the one step before the timed decode steps (with the
        # default chunked prefill a batch of 128 x 128 tokens would spill prefill chunks into them)
        eng = Engine(model, None, max_batch_size=B, cache_tokens=B * (args.prompt_len + args.new + 16),
                     cuda_graphs=base != "eager", compile_decode=base.startswith("graphs+compile"),
                     max_prefill_tokens=0, overlap="+sync" not in flags)
        # graphs+compile+einsum: the reference (einsum) attention; the choice is made as each bucket is built
        attention = (kernels.use_backend(mla_decode="reference") if base == "graphs+compile+einsum"
                     else contextlib.nullcontext())
        # +nogemv: the routed experts through the grouped GEMMs (FP8: the per-row kernel) instead of the
        # decode GEMV (kernels.expert_gemv), the path before it, for the before/after in one run
        gemv = kernels.use_backend(expert_gemv="reference") if "+nogemv" in flags else contextlib.nullcontext()
        # +nodual: MLA's pair of projections as two launches (the dual launches replaced for this mode, restored
        # below; the engine's step is traced and captured under it)
        kernels.dense_gemv2, kernels.fp8_weight_linear2 = DUALS if "+nodual" not in flags else (
            lambda x, w1, w2, *, backend=None: (kernels.dense_gemv(x, w1, backend=backend),
                                                 kernels.dense_gemv(x, w2, backend=backend)),
            lambda x, w1, s1, w2, s2, *, backend=None: (kernels.fp8_weight_linear(x, w1, s1, backend=backend),
                                                         kernels.fp8_weight_linear(x, w2, s2, backend=backend)))
        # the switched kernels (process-wide; every mode sets all of them; a compiled step recompiles on a change,
        # new graphs capture it)
        for op, on in kernel_switches(flags).items():
            kb.switch(op, on)
        # +sharedgemv / +nosharedgemv: the shared experts inside the routed experts' GEMV launches for every weight
        # dtype / for none (kernels.set_shared_gemv; shipped: e4m3 weights only)
        kb.switch("shared_gemv", True if "+sharedgemv" in flags else False if "+nosharedgemv" in flags
                  else SHIPPED["shared_gemv"])
        # +mlaprep / +nomlaprep: the latent store and the W_UK head GEMV in one launch / two (kernels.set_mla_prep;
        # shipped: one)
        kb.switch("mla_prep", True if "+mlaprep" in flags else False if "+nomlaprep" in flags
                  else SHIPPED["mla_prep"])
        # +tuned: the sweep's expert GEMV configs where they name the call's (dtype, rows, columns); a compiled step
        # recompiles nothing for it (the config is chosen at each launch, on the host), the graphs capture it
        egk.default_config = SHIPPED_GEMV_CONFIG if "+tuned" not in flags else tuned_config(args.gemv_configs)
        # +psum: the GEMV forms' per-group partial sums (expert GEMV, FP8 / dense GEMV) where a config does not say
        egk.GEMV_PSUM, fgk.GEMV_PSUM = (True, True) if "+psum" in flags else SHIPPED_PSUM
        ours, inductor = pdl_switches(flags)
        kb.switch("pdl", ours)
        if set_inductor_pdl(inductor) != inductor:
            print(f"({mode}: this torch's inductor has no enable_pdl; its kernels launch without PDL)")
        # the MLA decode split: one 32-position tile per program (shipped), two (+twotiles, the earlier default) or
        # one 16-position tile (+tile16); read at each launch
        # +argmax1: the greedy argmax as torch's one pass over the vocabulary (before 2026-12-05), not two
        sampling.ARGMAX_MIN = 1 << 62 if "+argmax1" in flags else SHIPPED_ARGMAX_MIN
        mla_k.BLOCK_N = 16 if "+tile16" in flags else 32
        mla_k.MIN_CHUNK = 2 * mla_k.BLOCK_N if "+twotiles" in flags else mla_k.BLOCK_N
        with attention, gemv:
            if base != "eager":  # capture the buckets this run uses before timing (a server does this at start-up)
                eng.generate(prompts, SamplingParams(max_new_tokens=args.new, temperature=0, ignore_eos=True))
            eng.generate(prompts[:1], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            eng.generate(prompts[:1], SamplingParams(max_new_tokens=1, temperature=0))
            torch.cuda.synchronize()
            ttft = time.perf_counter() - t
            sp = SamplingParams(max_new_tokens=args.new, temperature=0, ignore_eos=True)
            for r in prompts:
                eng.add_request(r, sp)
            eng.step()  # prefill of the whole batch
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = 0
            while eng.has_unfinished():
                n += sum(len(o.new_token_ids) for o in eng.step())
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            steps = args.new - 1
            roof = step_bytes(cfg, B, args.prompt_len + args.new // 2, fp8="+fp8" in mode) / hbm
            print(f"| {card} | dsv3 {mode} | {B} | {ttft * 1e3:.1f} | {n / dt:,.1f} | {dt / steps * 1e3:.1f} | "
                  f"{roof * 1e3:.2f} | {roof / (dt / steps):.1%} |", flush=True)
            if base != "eager":
                gap_line(eng, B, dt / steps)
    for op, on in SHIPPED.items():
        kb.switch(op, on)
    set_inductor_pdl(SHIPPED_INDUCTOR_PDL)
    sampling.ARGMAX_MIN = SHIPPED_ARGMAX_MIN
    mla_k.BLOCK_N, mla_k.MIN_CHUNK = 32, 32
    egk.default_config = SHIPPED_GEMV_CONFIG
    del model, eng
    torch.cuda.empty_cache()
    if args.hf:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        d = cfg.to_dict()
        d.pop("quantization_config", None)
        hcfg = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            hf = DeepseekV3ForCausalLM(hcfg).eval()
        torch.set_default_dtype(torch.float32)
        for B in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=g).cuda()
            hf.generate(ids, max_new_tokens=2, do_sample=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            print(f"| {card} | transformers generate | {B} | - | {B * args.new / dt:,.1f} | "
                  f"{dt / args.new * 1e3:.1f} | | |", flush=True)


if __name__ == "__main__":
    main()
