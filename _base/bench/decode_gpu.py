"""Decode speed of a randomly initialised model on one GPU through the engine, against the HBM roofline,
and transformers' `generate` on the same config.

    PYTHONPATH=. python bench/decode_gpu.py --preset 16b --batches 1,32,128 --hf

Roofline: the bytes a decode step must read from HBM — every non-expert weight, each MoE layer's
shared experts and the routed experts that the batch's tokens select (expected distinct experts
E·(1 − (1 − K/E)^B) for uniform routing), the output head, and the latent KV cache of the batch —
divided by the measured HBM copy bandwidth (~3.0 TB/s, shared/design/ANCHORS.md §1), in bf16.
Greedy, 128-token random prompts, --new tokens per request, no speculation (random weights make MTP
drafts meaningless).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv3.inference.fp8 import FP8Linear, quantize_model_fp8  # noqa: E402
from dsv3.info import model_info  # noqa: E402

HBM = 3.0e12


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--modes", default="eager,graphs", help="engine decode paths to time: eager, graphs, graphs+compile, "
                         "graphs+compile+einsum (the absorbed attention as compiled einsums over the gathered context "
                         "instead of the Triton paged-latent kernel), graphs+fp8 (128x128-block e4m3 weights through "
                         "the Triton FP8 GEMMs; put it last: it quantizes the model in place)")
    args = ap.parse_args()
    cfg = dsv3.preset(args.preset).replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = dsv3.build_model(cfg, device="cuda", dtype=torch.bfloat16)
    model.set_experts_impl("grouped")
    g = torch.Generator().manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.preset} random weights, bf16, "
          f"{model_info(cfg).total / 1e9:.2f}B params")
    print("| impl | batch | TTFT (ms) | decode tok/s | step (ms) | roofline step (ms) | of roofline |")
    print("|---|---|---|---|---|---|---|")
    modes = args.modes.split(",")
    bad = set(modes) - {"eager", "graphs", "graphs+compile", "graphs+compile+einsum", "graphs+fp8"}
    if bad or ("graphs+fp8" in modes and modes[-1] != "graphs+fp8"):
        raise SystemExit(f"--modes: unknown {sorted(bad)}" if bad else "--modes: graphs+fp8 quantizes the model in "
                         "place, so it must come last")
    for mode, B in [(m, int(b)) for m in modes for b in args.batches.split(",")]:
        if mode == "graphs+fp8" and not any(isinstance(x, FP8Linear) for x in model.modules()):
            quantize_model_fp8(model)
        prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(B)]
        eng = Engine(model, None, max_batch_size=B, cache_tokens=B * (args.prompt_len + args.new + 16),
                     cuda_graphs=mode != "eager", compile_decode=mode.startswith("graphs+compile"))
        if mode == "graphs+compile+einsum":  # before the first bucket is built
            eng._graphs.use_triton_attention = False
        if mode != "eager":  # capture the buckets this run uses before timing (a server does this at start-up)
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
        roof = step_bytes(cfg, B, args.prompt_len + args.new // 2, fp8=mode == "graphs+fp8") / HBM
        print(f"| dsv3 {mode} | {B} | {ttft * 1e3:.1f} | {n / dt:,.1f} | {dt / steps * 1e3:.1f} | {roof * 1e3:.2f} | "
              f"{roof / (dt / steps):.1%} |", flush=True)
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
            print(f"| transformers generate | {B} | - | {B * args.new / dt:,.1f} | {dt / args.new * 1e3:.1f} | | |",
                  flush=True)


if __name__ == "__main__":
    main()
