"""Expert-parallel serving throughput on N GPUs (issue 17): prefill and decode tokens/s of the lockstep EP
engine (dsv3/ep_serve.py) on a 671B-shaped model cut to --layers layers, random weights, FP8 by default.

    torchrun --nproc-per-node 8 bench/ep_serve_gpu.py --preset 671b --layers 8 --batches 1,32,128 --out OUT
    torchrun --nproc-per-node 2 bench/ep_serve_gpu.py --preset tiny --device cpu          # the CPU check (gloo)

Each rank builds its own part directly (no checkpoint on disk: a 671B layer is ~11 GB in FP8): the model on
the meta device, the routed experts cut to the rank's contiguous block (`local_experts`, the layout
`ReplicatedTokensDispatcher` routes by), allocated, initialised with the same seed on every rank (so the
replicated weights agree), then the official FP8 128x128 block quantisation of the matrices the official
checkpoint stores in FP8 (`quantize_model_fp8`, --bf16 skips it). The engine runs on every rank in lockstep:
every rank submits the same requests in the same order, decisions are rank 0's (`agree_with_rank0`).

Decode steps (at most the largest batch of tokens) take the dispatcher's static path (each rank's experts
on the pairs routed to them, one all-reduce; no host sync), prefill the all-to-all. --modes eager,graphs
measures the decode steps run eagerly and captured as CUDA graphs (cuda_graphs=True; on the CPU the
bucketed steps run eagerly); dp is attention data parallelism (each rank its own requests, B/N of the batch;
their tokens to the experts by all-to-all; eager); tp splits attention, the dense FFNs and the shared experts
over the ranks (--attn-tp N; eager; run last, as it slices the model).

Measured per mode and batch size B (greedy, random --prompt-len-token prompts, ignore_eos):
  prefill  B prompts with max_new_tokens=1: B x prompt_len / time
  decode   the same prompts with --new tokens: B x (new - 1) / (time - prefill time)
Rank 0 prints a table (device name, ranks, layers, experts per rank, weight GiB per rank) and writes
OUT/ep_serve.json. Every rank holds 1/N of the routed experts and all the rest (attention, dense, shared
experts, head, the latent cache of every sequence).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.distributed.expert_parallel import (AllToAllDispatcher, ReplicatedTokensDispatcher,  # noqa: E402
                                              local_experts)
from dsv3.distributed.attention_tp import check_attn_tp, shard_attention_tp  # noqa: E402
from dsv3.distributed.mesh import init_distributed  # noqa: E402
from dsv3.inference.engine import Engine  # noqa: E402
from dsv3.inference.lockstep import DPLeader, agree_with_rank0, control_group, follow, sync_phases  # noqa: E402
from dsv3.inference.params import SamplingParams  # noqa: E402
from dsv3.model.moe import MoE  # noqa: E402
from dsv3.model.transformer import Transformer  # noqa: E402


def rank_model(cfg, rank: int, world: int, device, dtype, fp8: bool, seed: int = 0) -> Transformer:
    """This rank's part of a randomly initialised model: its block of routed experts, everything else (the
    MoE dispatchers are installed per mode by main)."""
    from dsv3.checkpoints.hf import quantize_model_fp8

    E = cfg.n_routed_experts
    r = local_experts(E, rank, world)
    with torch.device("meta"):
        model = Transformer(cfg)
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts.keep_experts(r.start, len(r))  # on meta: shapes only
    model = model.to_empty(device=device).to(dtype)
    model.init_weights(generator=torch.Generator(device=device).manual_seed(seed))
    if fp8:
        quantize_model_fp8(model)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="671b")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (first_k_dense_replace stay dense)")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-prefill-tokens", type=int, default=0,
                    help="the engine's chunked-prefill budget (default 0: a batch's prompts in one step, so that "
                         "decode = total - prefill time stays a decode figure; dsv3 serve's default is 8192)")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request in the decode run")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights instead of the official FP8 blocks")
    ap.add_argument("--modes", default="eager,graphs,dp,tp",
                    help="engine modes: eager, graphs (the bucketed static decode steps captured as CUDA graphs; "
                         "on the CPU they run eagerly), dp (attention data parallelism: each rank its own "
                         "requests, all-to-all MoE, eager), tp (attention, dense FFNs and shared experts "
                         "tensor-parallel over the ranks, --attn-tp; eager)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join("runs", "ep_serve")))
    args = ap.parse_args()

    env = init_distributed(args.device)
    if not dist.is_initialized():
        if os.environ.get("WORLD_SIZE") != "1":
            raise SystemExit("run under torchrun (torchrun --nproc-per-node N bench/ep_serve_gpu.py ...)")
        # torchrun --nproc-per-node 1 (one GPU): init_distributed leaves one process alone; the engine's
        # collectives need a group, of one rank
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = env.device
    cuda = device.type == "cuda"
    cfg = dsv3.preset(args.preset)
    cfg = cfg.replace(num_hidden_layers=args.layers, first_k_dense_replace=min(cfg.first_k_dense_replace,
                                                                               args.layers - 1),
                      quantization_config=None)
    if cfg.n_routed_experts % world:
        raise SystemExit(f"{world} ranks do not divide {cfg.n_routed_experts} routed experts")
    fp8 = not args.bf16 and cuda  # the FP8 modules need CUDA (Triton) to be fast; the CPU check stays fp32
    dtype = torch.bfloat16 if cuda else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    if set(modes) - {"eager", "graphs", "dp", "tp"}:
        raise SystemExit(f"--modes: some of eager, graphs, dp, tp; got {args.modes!r}")
    if "tp" in modes:
        try:
            check_attn_tp(cfg, world)
        except ValueError as e:
            modes.remove("tp")
            if rank == 0:
                print(f"mode tp skipped: {e}")
    ctrl = control_group()
    model = rank_model(cfg, rank, world, device, dtype, fp8)
    wb = weight_bytes(model)
    g = torch.Generator().manual_seed(1)
    engine = None

    def run(B: int, new: int, dp: bool = False) -> float:
        prompts = [torch.randint(1, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(B)]
        sp = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        if not dp:  # every rank submits the same requests; decisions are rank 0's
            outs = engine.generate(prompts, sp)
        elif rank == 0:  # rank 0 spreads the requests over the ranks; the others follow until it stops
            leader = DPLeader(engine, ctrl)
            outs = leader.generate(prompts, sp)
            leader.shutdown()
        else:
            follow(engine, ctrl, dp=True)
            outs = [None]
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        assert all(o is None or len(o.token_ids) == new for o in outs), "a request stopped early"
        return time.perf_counter() - t

    rows = []
    for mode in sorted(modes, key=lambda m: m == "tp"):  # tp last: it slices the model in place
        engine = None  # one latent cache at a time
        if cuda:
            torch.cuda.empty_cache()
        dp = mode == "dp"
        if mode == "tp":
            shard_attention_tp(model, dist.group.WORLD)
        for m in model.modules():
            # dp: each rank's own tokens by all-to-all; else replicated tokens, decode steps (<= the largest
            # batch) through the static all-reduce path and prefill through the all-to-all
            if isinstance(m, MoE):
                m.dispatcher = AllToAllDispatcher(dist.group.WORLD, cfg.n_routed_experts) if dp else \
                    ReplicatedTokensDispatcher(dist.group.WORLD, cfg.n_routed_experts, max(batches))
        engine = Engine(model, None, max_batch_size=max(batches), cuda_graphs=mode == "graphs",
                        max_model_len=args.prompt_len + args.new + 1, max_prefill_tokens=args.max_prefill_tokens)
        engine = sync_phases(engine, ctrl) if dp else agree_with_rank0(engine, dist.group.WORLD)
        for B in batches:  # warm-up: kernels, allocator, and every decode bucket's graph capture
            run(B, 3, dp)
        for B in batches:
            t_pre = run(B, 1, dp)
            t_all = run(B, args.new, dp)
            rows.append({"mode": mode, "batch": B, "weight_bytes_per_rank": weight_bytes(model),
                         "prefill_tok_s": B * args.prompt_len / t_pre,
                         "decode_tok_s": B * (args.new - 1) / max(t_all - t_pre, 1e-9),
                         "prefill_s": t_pre, "total_s": t_all})
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU"
        head = (f"{world} x {name}, {args.preset} cut to {args.layers} layers, {cfg.n_routed_experts // world} of "
                f"{cfg.n_routed_experts} routed experts per rank, {'FP8' if fp8 else str(dtype)[6:]} weights "
                f"{wb / 2**30:.2f} GiB per rank, prompts {args.prompt_len}, decode {args.new} tokens")
        print(head)
        print("| mode | batch | prefill tok/s | decode tok/s |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['batch']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} |")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ep_serve.json"), "w") as f:
            json.dump({"setup": head, "ranks": world, "device": name, "layers": args.layers, "fp8": fp8,
                       "weight_bytes_per_rank": wb, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
