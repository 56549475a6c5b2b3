"""Training throughput and MFU on one GPU, dsv3 beside Hugging Face transformers on the same config.

    PYTHONPATH=. python bench/train_speed.py                 # all shapes
    PYTHONPATH=. python bench/train_speed.py --only small --hf

Shapes:
  small      the `small` preset (12 layers, 64 experts top-6, MTP)
  16b-cut    the `16b` preset cut to --layers-16b layers (1 dense + MoE), MTP off
  671b-slice the 671B's layer dimensions (hidden 7168, 128 heads, q/kv ranks 1536/512, dense FFN 18432,
             expert width 2048) with 1 dense + 2 MoE layers of 16 routed experts top-4 + 1 shared,
             32K vocabulary, MTP off (a full 256-expert layer does not fit one card with its optimizer)

FLOPs per token (training = 3 x forward), counted from the model:
  6 * (matmul parameters a token uses: activated parameters without the embedding lookup, with the
       output head, the router, the MTP module's matrices when it is on)
  + 6 * L_attn * H * (T + 1) / 2 * (d_qk + d_v)    (causal attention: each query sees (t+1) keys on average)
MFU = achieved FLOP/s / the card's dense bf16 datasheet peak (989.4 TFLOP/s for an H100 or H200 SXM; a card not
in DATASHEET_BF16 gets its measured ceiling); the "of measured" column divides by the bf16 matmul throughput this
same run measures on this card first (bench/bandwidth.py matmul_ceiling: ~770-800 TFLOP/s on an H100 or H200).
Step: bf16 autocast, fp32 master weights, AdamW, grad clip 1.0; median of timed steps after warm-up. dsv3
uses its own AdamW (dsv3/training/optim.py: one Triton kernel per parameter with the clip coefficient folded
in, `clip_and_step`); transformers gets torch's fused AdamW and clip_grad_norm_, as its users run it.
--micro-batch B: B sequences per micro-batch instead of the shape's own (e.g. FP8's peak memory against bf16's as
activations outgrow the fixed FP8 weight copies).
--accum N: N micro-batches (forward + backward) per optimizer step, for both, as real runs do (the paper's
batch is 15,360 sequences); tokens/s counts all N micro-batches.
--bf16-weights: beside each bf16 row, the same step with bf16 working weights and fp32 masters in the
optimizer (`dsv3 train --bf16-weights`, dsv3/training/optim.py AdamW masters): no per-step weight casts,
bf16 weight gradients, the master update writing the bf16 copy (variant tag bf16w; bf16w+g32: the same with
the weight gradients accumulated in fp32, AdamW's fp32_grads, bitwise the autocast step).
--precision fp8: the same step with the attention and dense/shared-expert linears in FP8 (three GEMMs,
dsv3/training/fp8.py); TFLOP/s and MFU keep the bf16 FLOP count and the bf16 peak, for comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.info import model_info  # noqa: E402
from dsv3.training.loss import compute_loss  # noqa: E402
from dsv3.training.optim import clip_and_step, make_optimizer  # noqa: E402

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by a substring of the CUDA device name
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12,
                  "H800": 989.4e12, "H20": 148e12, "A100": 312e12, "B200": 2250e12}


def datasheet_peak(card: str) -> float | None:
    """The dense bf16 datasheet peak of a card by its name (the first key it contains, longest keys first)."""
    for key in sorted(DATASHEET_BF16, key=len, reverse=True):
        if key in card:
            return DATASHEET_BF16[key]
    return None


def shapes(layers_16b: int) -> dict[str, tuple[dsv3.ModelConfig, int, int]]:
    """name -> (config, micro batch, seq len)"""
    small = dsv3.preset("small")
    b16 = dsv3.preset("16b").replace(num_hidden_layers=layers_16b, num_nextn_predict_layers=0)
    s671 = dsv3.preset("671b").replace(
        vocab_size=32768, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=0, quantization_config=None,
        rope_scaling=None, max_position_embeddings=4096)
    return {"small": (small, 8, 2048), "16b-cut": (b16, 4, 2048), "671b-slice": (s671, 2, 2048)}


def flops_per_token(cfg: dsv3.ModelConfig, T: int) -> float:
    info = model_info(cfg)
    dense = info.activated_no_embedding + (info.mtp_activated if cfg.num_nextn_predict_layers else 0)
    if cfg.num_nextn_predict_layers:
        dense += cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # the head runs again
    n_attn = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attn = 6 * n_attn * cfg.num_attention_heads * (T + 1) / 2 * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * dense + attn


VARIANT_TAGS = ("bf16", "fp8", "fp8e", "compile", "sel", "full", "bf16opt", "bf16w", "g32", "rw")


def parse_variant(v: str) -> dict:
    """A '+'-joined variant ('bf16+compile+bf16w') -> the keyword arguments of `setup_dsv3` (ValueError if bad)."""
    tags = v.split("+")
    bad = set(tags) - set(VARIANT_TAGS)
    if bad or tags[0] not in ("bf16", "fp8", "fp8e") or ("g32" in tags and (tags[0] != "bf16" or "bf16w" not in tags)) \
            or ("rw" in tags and tags[0] == "bf16"):
        raise ValueError(f"bad variant {v!r}: tags {'+'.join(VARIANT_TAGS)}, the first a precision; g32 with bf16 "
                         "and bf16w; rw with fp8 or fp8e")
    return dict(precision=tags[0], compile_blocks="compile" in tags,
                recompute="selective" if "sel" in tags else "full" if "full" in tags else "none",
                state_dtype=torch.bfloat16 if "bf16opt" in tags else torch.float32,
                bf16_weights="bf16w" in tags, fp32_grads="g32" in tags, recompute_weights="rw" in tags)


def setup_dsv3(cfg, compile_blocks=False, precision="bf16", recompute="none", state_dtype=torch.float32,
               bf16_weights=False, fp32_grads=False, recompute_weights=False):
    """(model, optimizer) of one variant on the GPU, seeded: what train_speed times and profile_gpu profiles."""
    torch.manual_seed(0)
    model = dsv3.build_model(cfg, device="cuda", dtype=torch.float32)
    model.set_experts_impl("grouped")
    model.set_recompute(recompute)
    if precision in ("fp8", "fp8e"):  # attention + dense/shared MLP linears (+ experts: fp8e) in FP8; before compile
        from dsv3.training.fp8 import convert_to_fp8_training
        convert_to_fp8_training(model, experts=precision == "fp8e", recompute_weights=recompute_weights)
    if compile_blocks:  # per block, in place (state-dict names unchanged): fuses norms, RoPE, SwiGLU
        for blk in list(model.layers) + list(model.mtp):
            blk.compile()
    # bf16w: casts the GEMM weights to bf16, the optimizer keeps their fp32 masters
    opt = make_optimizer(model, 1e-4, state_dtype=state_dtype, bf16_weights=bf16_weights, fp32_grads=fp32_grads)
    return model, opt


def time_dsv3(cfg, B, T, steps, warmup, accum=1, **variant):
    release_memory()  # (whatever ran before in this process)
    model, opt = setup_dsv3(cfg, **variant)
    compile_blocks = variant.get("compile_blocks", False)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x[:, :-1])
            loss = compute_loss(out, x[:, 1:], 0.3, compiled=compile_blocks).total / accum
            loss.backward()
        clip_and_step(opt, 1.0)
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, out, loss
    torch._dynamo.reset()  # compiled blocks keep their modules (and memory) alive otherwise
    release_memory()
    return statistics.median(times), mem


def release_memory():
    """Free what one variant left (reference cycles included) before the next one's peak is counted: without the
    collection an uncollected model of the variant before counted in the next variant's peak whenever the
    collector ran after that peak (H100, 2026-12-06: the same FP8 variant 46.9 or 51.5 GiB by its place in the
    list)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def time_hf(cfg, B, T, steps, warmup, accum=1):
    release_memory()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = cfg.to_dict()
    d.pop("quantization_config", None)
    hcfg = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(hcfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=x[:, :-1], labels=x[:, :-1])  # HF shifts labels itself
            (out.loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, out
    release_memory()
    return statistics.median(times), mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers-16b", type=int, default=4)
    ap.add_argument("--hf", action="store_true", help="also time transformers' DeepseekV3ForCausalLM")
    ap.add_argument("--compile", action="store_true", help="also time dsv3 with torch.compile per block")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="also time each bf16 dsv3 row with bf16 working weights + fp32 masters in the optimizer")
    ap.add_argument("--precision", default="bf16",
                    help="dsv3 precision: bf16 | fp8 | bf16,fp8 (fp8: bf16 autocast + the FP8 GEMMs of SPEC §9)")
    ap.add_argument("--variants", default=None,
                    help="comma list replacing --precision/--compile, each '+'-joined tags: bf16|fp8|fp8e (fp8 "
                         "with the routed experts' grouped GEMMs in FP8 too), compile, "
                         "sel (selective recompute) | full (full recompute), bf16opt (AdamW moments in bf16), bf16w (bf16 "
                         "working weights + fp32 masters), g32 (with bf16w: fp32 weight gradients), rw (with fp8/fp8e: "
                         "the FP8 weights re-quantised in backward, none kept from the forward); "
                         "e.g. bf16+compile,bf16+bf16w,bf16+bf16w+g32,fp8+compile")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (both implementations)")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="sequences per micro-batch instead of the shape's own (small 8, 16b-cut 4, 671b-slice 2)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.micro_batch < 0:
        raise SystemExit(f"--micro-batch must be >= 1 (0: the shape's own), got {args.micro_batch}")
    rows = []
    from bandwidth import matmul_ceiling

    ceiling = matmul_ceiling()  # this card, this run
    measured = ceiling["flops_per_s"]
    peak = datasheet_peak(ceiling["card"]) or measured
    print(f"device {ceiling['card']}, torch {torch.__version__}; {args.accum} micro-batch(es) per step")
    print(f"{ceiling['caption']}; MFU against {peak / 1e12:.1f} TFLOP/s "
          f"({'the datasheet bf16 peak' if datasheet_peak(ceiling['card']) else 'no datasheet figure: the measured one'})")
    print(f"| shape | impl | micro batch x seq | step (ms) | tokens/s | TFLOP/s | MFU ({peak / 1e12:.0f}) | "
          f"of measured ({measured / 1e12:.0f}) | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (cfg, B, T) in shapes(args.layers_16b).items():
        if args.only and name != args.only:
            continue
        B = args.micro_batch or B
        fpt = flops_per_token(cfg, T)
        impls = []
        for prec in args.precision.split(","):
            if prec not in ("bf16", "fp8"):
                raise SystemExit(f"--precision: bf16 | fp8 | bf16,fp8, got {args.precision!r}")
            tag = "" if prec == "bf16" else "+fp8"
            impls.append((f"dsv3{tag}", lambda *a, p=prec: time_dsv3(*a, precision=p)))
            if args.bf16_weights and prec == "bf16":
                impls.append(("dsv3+bf16w", lambda *a: time_dsv3(*a, bf16_weights=True)))
            if args.compile:
                impls.append((f"dsv3{tag}+compile", lambda *a, p=prec: time_dsv3(*a, compile_blocks=True, precision=p)))
                if args.bf16_weights and prec == "bf16":
                    impls.append(("dsv3+bf16w+compile",
                                  lambda *a: time_dsv3(*a, compile_blocks=True, bf16_weights=True)))
        if args.variants:
            impls = []
            for v in args.variants.split(","):
                try:
                    kw = parse_variant(v)
                except ValueError as e:
                    raise SystemExit(f"--variants: {e}")
                impls.append((f"dsv3 {v}", lambda *a, kw=kw: time_dsv3(*a, **kw)))
        if args.hf:
            impls.append(("transformers", time_hf))
        for impl, fn in impls:
            try:
                dt, mem = fn(cfg, B, T, args.steps, args.warmup, args.accum)
            except torch.OutOfMemoryError:
                print(f"| {name} | {impl} | {B}x{T} | OOM | | | | | |", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # e.g. a compile failure: report it, keep measuring the rest
                print(f"| {name} | {impl} | {B}x{T} | error: {type(e).__name__}: {str(e)[:120]} | | | | | |",
                      flush=True)
                torch.cuda.empty_cache()
                continue
            tps = args.accum * B * T / dt
            fl = tps * fpt
            rows.append({"shape": name, "impl": impl, "B": B, "T": T, "accum": args.accum, "step_s": dt, "tok_s": tps,
                         "tflops": fl / 1e12, "mfu": fl / peak, "of_measured": fl / measured, "mem_gib": mem,
                         "flops_per_token": fpt, "card": ceiling["card"], "peak_flops": peak,
                         "measured_matmul_flops": measured})
            print(f"| {name} | {impl} | {B}x{T} | {dt * 1e3:.0f} | {tps:,.0f} | {fl / 1e12:.0f} | "
                  f"{fl / peak:.1%} | {fl / measured:.1%} | {mem:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
