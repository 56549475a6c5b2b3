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

Issue 19 run 1 from disk (`--checkpoint DIR`, e.g. written by bench/random_checkpoint.py): each rank reads its
experts and the rest from the safetensors (FP8 kept FP8); the load time (slowest rank), the weights per rank
and, on GPUs, the cache the server would take beside `dsv3 plan --serve` for the same layout are reported.

Issue 19 run 3, redundant experts under a recorded skew (`--skew FILE --redundant-experts R`): FILE holds the
per-expert loads of a trained model (`dsv3 eval CKPT --data DIR --record-expert-loads FILE`). Each MoE block of
the cut takes a recorded block's sorted load shares (block i from recorded block i mod its blocks), resampled
to E experts and scattered over them by a seeded permutation, and the routers' correction biases are fitted
(sign steps on fixed router inputs, a few rounds of forward + fit) until the random model routes the prompts
that way; the fit is reported (imbalance over experts, target and measured). The engine records the loads it
routes (Engine(record_expert_loads=True)). Variant "contiguous" runs first; then the placement is planned from
the loads it measured (as a deployment re-plans from recorded traffic, dsv3/inference/eplb.py), every rank
rebuilds its experts as the placement's (E + R) / N slots, each with the weights of the expert placed there
(per-expert seeded draws: the same model, so the fitted routing carries over), and variant "eplb" runs the same
modes. Per variant: tokens/s,
and the rank imbalance (max rank load / mean - 1, mean and max over the blocks) of the loads it measured under
its own layout.

Issue 19 run 4, MTP speculation across ranks (`--speculative-k 0,1,2`): every mode and batch per k; the rows
add the acceptance (first draft, overall) and the decode step time, from which the speed at another
acceptance follows (random weights draft poorly: the paper's 85-90% would need a trained model). In the dp mode
the acceptance is rank 0's requests' (each rank drafts for its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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


def rank_model(cfg, rank: int, world: int, device, dtype, fp8: bool, seed: int = 0, placement=None) -> Transformer:
    """This rank's part of a randomly initialised model: its block of routed experts (or, under a redundant-expert
    `placement`, its slots, each holding the weights of the logical expert placed there), everything else (the
    MoE dispatchers are installed per mode by main). Every tensor, every expert, draws from its own generator
    (Transformer.init_weights(seed=)), so expert e has the same weights on every rank and in both layouts."""
    from dsv3.checkpoints.hf import quantize_model_fp8
    from dsv3.model.transformer import tensor_seed

    E = cfg.n_routed_experts
    r = local_experts(E, rank, world)
    with torch.device("meta"):
        model = Transformer(cfg)
    for m in model.modules():
        if isinstance(m, MoE):
            if placement is None:
                m.experts.keep_experts(r.start, len(r))
            else:
                m.experts.keep_experts(0, placement.slots.shape[-1])  # (shapes only; the slots' weights below)
    model = model.to_empty(device=device).to(dtype)
    model.init_weights(seed=seed)
    if placement is not None:
        with torch.no_grad():
            blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
            for i, (name, m) in enumerate(blocks):
                for j, e in enumerate(placement.slots[i, rank].tolist()):
                    for pname in ("gate_proj", "up_proj", "down_proj"):
                        w = getattr(m.experts, pname)[j]
                        gen = torch.Generator(device=w.device).manual_seed(
                            tensor_seed(seed, f"{name}.experts.{pname}[{e}]"))  # init_weights' draw for expert e
                        w.normal_(0.0, cfg.initializer_range, generator=gen)
    if fp8:
        quantize_model_fp8(model)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def target_shares(recorded: torch.Tensor, blocks: int, E: int, K: int, seed: int = 0) -> torch.Tensor:
    """(blocks, E) routing shares following recorded loads (Lr, Er): block i takes recorded block i mod Lr's
    shares sorted descending, resampled to E experts (expert rank j of E takes the share of recorded rank
    j * Er // E), renormalised, capped at 1 / K (an expert takes a token at most once among its K choices; the
    excess goes to the others in proportion), scattered over the experts by a seeded permutation."""
    Lr, Er = recorded.shape
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(blocks):
        row = recorded[i % Lr].double().clamp_min(0)
        if row.sum() <= 0:
            raise SystemExit(f"--skew: recorded block {i % Lr} holds no tokens")
        p = row.sort(descending=True).values
        q = p[(torch.arange(E) * Er) // E]
        q = q / q.sum()
        cap = 1 / K
        for _ in range(E):  # water-filling: cap, hand the excess to the experts under the cap, until none is over
            over, under = q > cap * (1 + 1e-9), q < cap
            if not over.any():
                break
            excess = (q[over] - cap).sum()
            q[over] = cap
            w = q[under] if q[under].sum() > 0 else torch.ones_like(q[under])  # (all zero: evenly)
            q[under] += excess * w / w.sum()
        out.append(q[torch.randperm(E, generator=g)])
    return torch.stack(out)


@torch.no_grad()
def fit_router_biases(model, target: torch.Tensor, tokens: torch.Tensor, rounds: int = 3, iters: int = 150) -> None:
    """Set the routers' correction biases so that `model` routes `tokens` (B, T) with per-expert shares
    `target` (blocks, E): per round, one forward records each router's input, then sign steps on the bias
    (b_e += step * sign(target_e - share_e), the step shrinking from 0.05 to 5e-4) on those fixed inputs. Later
    blocks' inputs move with earlier blocks' routing, hence the rounds. Every rank runs the forward (the MoE
    dispatchers are collective); rank 0's biases are broadcast."""
    routers = model.routers()
    xs: dict[int, torch.Tensor] = {}
    handles = [r.register_forward_hook(lambda m, a, o, i=i: xs.__setitem__(i, a[0].detach()))
               for i, r in enumerate(routers)]
    try:
        for _ in range(rounds):
            model(tokens)  # (the MTP modules run too: their routers are blocks)
            for i, r in enumerate(routers):
                t = target[i].to(r.e_score_correction_bias.device, torch.float32)
                b = r.e_score_correction_bias
                for it in range(iters):
                    _, idx, _ = r(xs[i])
                    share = torch.zeros_like(t).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(),
                                                                                          device=t.device))
                    share /= idx.numel()
                    b += 0.05 * (0.01 ** (it / iters)) * torch.sign(t - share)
    finally:
        for h in handles:
            h.remove()
    for r in routers:
        dist.broadcast(r.e_score_correction_bias, src=0)


def expert_imbalance(loads: torch.Tensor) -> tuple[float, float]:
    """MaxVio over experts (max / mean - 1) of (blocks, E) loads: mean and max over the blocks."""
    from dsv3.model.moe import max_violation

    v = max_violation(loads.double())
    return float(v.mean()), float(v.max())


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
    ap.add_argument("--speculative-k", default="0", help="MTP draft lengths to run, comma-separated (e.g. 0,1,2)")
    ap.add_argument("--skew", default=None, metavar="FILE",
                    help="recorded per-expert loads of a trained model (dsv3 eval --record-expert-loads): the "
                         "routers are fitted to route that way (module docstring)")
    ap.add_argument("--redundant-experts", type=int, default=0,
                    help="after the contiguous variant, re-place the experts from the loads it measured with this "
                         "many extra slots (a multiple of the ranks) and run the modes again")
    ap.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="load this checkpoint instead of building random weights (each rank reads its experts "
                         "only; timed, beside dsv3 plan --serve): e.g. bench/random_checkpoint.py's")
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
    if args.checkpoint:  # its config: --preset and --layers do not apply
        cfg = dsv3.ModelConfig.from_json(args.checkpoint)
    else:
        cfg = dsv3.preset(args.preset)
        cfg = cfg.replace(num_hidden_layers=args.layers, first_k_dense_replace=min(cfg.first_k_dense_replace,
                                                                                   args.layers - 1),
                          quantization_config=None)
    E = cfg.n_routed_experts
    if E % world:
        raise SystemExit(f"{world} ranks do not divide {E} routed experts")
    if args.redundant_experts % world or args.redundant_experts < 0:
        raise SystemExit(f"--redundant-experts {args.redundant_experts}: a multiple of the {world} ranks")
    if args.redundant_experts and world == 1:
        raise SystemExit("--redundant-experts places copies on other ranks: it needs 2 or more")
    ks = [int(k) for k in args.speculative_k.split(",")]
    if any(k < 0 for k in ks) or (max(ks) > 0 and cfg.num_nextn_predict_layers == 0):
        raise SystemExit(f"--speculative-k {args.speculative_k}: k >= 0, and k > 0 needs MTP modules")
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
    record = bool(args.skew or args.redundant_experts)  # the engine counts the loads it routes
    ctrl = control_group()
    g = torch.Generator().manual_seed(1)
    static_tokens = max(batches) * (max(ks) + 1)  # decode steps up to this many tokens: the static path

    def install(model, placement, dp: bool) -> None:
        from dsv3.ep_serve import PlacedDispatcher

        for i, m in enumerate(x for x in model.modules() if isinstance(x, MoE)):
            # dp: each rank's own tokens by all-to-all; else replicated tokens, decode steps through the static
            # all-reduce path and prefill through the all-to-all. Under a placement the dispatchers route by slot
            n = E if placement is None else placement.slots[i].numel()
            inner = AllToAllDispatcher(dist.group.WORLD, n) if dp else \
                ReplicatedTokensDispatcher(dist.group.WORLD, n, static_tokens)
            m.dispatcher = inner if placement is None else \
                PlacedDispatcher(inner, placement.layer(i).to(device), rank if dp else 0)

    def run(engine, B: int, new: int, dp: bool) -> tuple[float, tuple[float, int] | None]:
        """-> (the run's seconds, (the seconds until every request had its first token: the prefill phase, as rank 0
        sees it, and the engine's step count then); None on a data-parallel follower, which sees no outputs)."""
        prompts = [torch.randint(1, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(B)]
        sp = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        seen, first = set(), []

        def on_output(o) -> None:
            seen.add(o.request_id)
            if not first and len(seen) == B:
                first.append((time.perf_counter() - t, engine.stats.steps))

        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        if not dp:  # every rank submits the same requests; decisions are rank 0's
            outs = engine.generate(prompts, sp, on_output=on_output)
        elif rank == 0:  # rank 0 spreads the requests over the ranks; the others follow until it stops
            leader = DPLeader(engine, ctrl)
            outs = leader.generate(prompts, sp, on_output=on_output)
            leader.shutdown()
        else:
            follow(engine, ctrl, dp=True)
            outs = [None]
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        assert all(o is None or len(o.token_ids) == new for o in outs), "a request stopped early"
        return time.perf_counter() - t, (first[0] if first else None)

    def variant(name: str, model, placement) -> tuple[list[dict], torch.Tensor | None]:
        """Every mode x k x batch on `model`; the rows, and the loads the engines routed (summed over ranks'
        own requests in dp mode)."""
        rows, loads = [], None
        for mode in sorted(modes, key=lambda m: m == "tp"):  # tp last: it slices the model in place
            dp = mode == "dp"
            if mode == "tp":
                shard_attention_tp(model, dist.group.WORLD)
            install(model, placement, dp)
            for k in ks:
                engine = None  # one latent cache at a time
                if cuda:
                    torch.cuda.empty_cache()
                engine = Engine(model, None, max_batch_size=max(batches), cuda_graphs=mode == "graphs",
                                max_model_len=args.prompt_len + args.new + 2 * k + 2, speculative_k=k,
                                max_prefill_tokens=args.max_prefill_tokens, record_expert_loads=record)
                engine = sync_phases(engine, ctrl) if dp else agree_with_rank0(engine, dist.group.WORLD)
                for B in batches:  # warm-up: kernels, allocator, and every decode bucket's graph capture
                    run(engine, B, 3, dp)
                if record:
                    engine.reset_expert_loads()
                for B in batches:
                    s0 = dataclasses.replace(engine.stats)
                    t_pre, _ = run(engine, B, 1, dp)
                    s1 = dataclasses.replace(engine.stats)
                    t_all, first = run(engine, B, args.new, dp)
                    s2 = engine.stats
                    rounds, accepted = s2.rounds - s1.rounds, s2.accepted - s1.accepted
                    # decode: the same run's time and steps after every request had its first token (not the
                    # difference of two runs, which the prefill's run-to-run spread swamps where decoding is short:
                    # the CPU check read negative step times at batch 128)
                    t_first, steps_first = first if first is not None else (t_pre, s1.steps + (s1.steps - s0.steps))
                    t_dec, steps = t_all - t_first, s2.steps - steps_first
                    rows.append({"variant": name, "mode": mode, "k": k, "batch": B,
                                 "weight_bytes_per_rank": weight_bytes(model),
                                 "prefill_tok_s": B * args.prompt_len / t_pre,
                                 "decode_tok_s": B * (args.new - 1) / max(t_dec, 1e-9),
                                 "decode_step_ms": 1e3 * t_dec / max(steps, 1),
                                 "acceptance": accepted / (rounds * k) if rounds and k else None,
                                 "first_draft_acceptance": (s2.first_draft_accepted - s1.first_draft_accepted)
                                 / rounds if rounds and k else None,
                                 "prefill_s": t_pre, "total_s": t_all, "first_tokens_s": t_first,
                                 "decode_steps": steps})
                if record:
                    c = engine.loads.counts.clone()
                    if dp:
                        dist.all_reduce(c)  # each rank routed its own requests
                    loads = c.cpu() if loads is None else loads + c.cpu()
        return rows, loads

    def build(placement=None):
        """This rank's model: from --checkpoint (its experts or slots only, FP8 kept FP8), else random."""
        if not args.checkpoint:
            return rank_model(cfg, rank, world, device, dtype, fp8, placement=placement)
        from dsv3.checkpoints.hf import load_pretrained

        mine = local_experts(E, rank, world) if placement is None else \
            [placement.slots[i, rank].tolist() for i in range(placement.n_layers)]
        return load_pretrained(args.checkpoint, device=device, dtype=dtype, keep_fp8=cuda and not args.bf16,
                               experts=mine).eval()

    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t_load = time.perf_counter()
    model = build()
    if cuda:
        torch.cuda.synchronize()
    t_load = torch.tensor([time.perf_counter() - t_load], device=device)
    dist.all_reduce(t_load, op=dist.ReduceOp.MAX)  # the slowest rank's
    wb = weight_bytes(model)
    fp8 = any(t.dtype == torch.float8_e4m3fn for t in model.buffers())
    load = {"seconds": float(t_load), "weight_bytes_per_rank": wb}
    if cuda:  # beside `dsv3 plan --serve` for this layout: weights and the cache the server would take
        from dsv3.ep_serve import gpu_cache_tokens
        from dsv3.plan_serve import ServePlanConfig, plan_serve

        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        plan = plan_serve(cfg, ServePlanConfig(weights="fp8" if fp8 else "bf16", mtp=cfg.num_nextn_predict_layers > 0),
                          world, gib)
        load.update(plan_weight_bytes=plan.weight_bytes, cache_tokens=gpu_cache_tokens(model),
                    plan_cache_tokens=plan.cache_tokens_per_gpu,
                    weight_error_pct=100 * (wb - plan.weight_bytes) / plan.weight_bytes)
    fit = None
    if args.skew:
        from dsv3.checkpoints.loads import load_counts

        target = target_shares(load_counts(args.skew), len(model.routers()), E, cfg.num_experts_per_tok)
        install(model, None, False)
        calib = torch.randint(1, cfg.vocab_size, (max(1, 4096 // args.prompt_len), args.prompt_len), generator=g)
        fit_router_biases(model, target, calib.to(device))
        fit = {"target_expert_imbalance": expert_imbalance(target)}
    rows, loads = variant("contiguous", model, None)
    per_variant = {}
    if record:
        from dsv3.inference.eplb import baseline_rank_load, imbalance

        t = loads.to(device)  # rank 0's, so that every rank plans the same placement
        dist.broadcast(t, src=0)
        loads = t.cpu()
        v = imbalance(baseline_rank_load(loads, world))
        per_variant["contiguous"] = {"rank_imbalance": [float(v.mean()), float(v.max())],
                                     "expert_imbalance": list(expert_imbalance(loads)), "slots_per_rank": E // world}
    if args.redundant_experts:
        from dsv3.inference.eplb import placed_rank_load, plan_placement

        placement = plan_placement(loads.double(), world, args.redundant_experts)  # the same on every rank
        biases = [r.e_score_correction_bias.clone() for r in model.routers()]
        model = None
        gc.collect()  # the last engine (its decode steps hold reference cycles) and with it the model and cache
        if cuda:
            torch.cuda.empty_cache()
        spr = (E + args.redundant_experts) // world
        model = build(placement)
        for r, b in zip(model.routers(), biases):
            r.e_score_correction_bias.copy_(b)
        rows2, loads2 = variant("eplb", model, placement)
        rows += rows2
        v = imbalance(placed_rank_load(loads2, placement.replicas, placement.slots))
        per_variant["eplb"] = {"rank_imbalance": [float(v.mean()), float(v.max())],
                               "expert_imbalance": list(expert_imbalance(loads2)), "slots_per_rank": spr,
                               "planned_rank_imbalance": float(imbalance(placement.rank_load).mean())}
    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "CPU"
        what = f"{args.checkpoint} ({cfg.num_hidden_layers} layers)" if args.checkpoint else \
            f"{args.preset} cut to {args.layers} layers (random weights)"
        head = (f"{world} x {name}, {what}, {E // world} of "
                f"{E} routed experts per rank, {'FP8' if fp8 else str(dtype)[6:]} weights "
                f"{wb / 2**30:.2f} GiB per rank, prompts {args.prompt_len}, decode {args.new} tokens")
        print(head)
        print(f"{'loaded' if args.checkpoint else 'built'} in {load['seconds']:.1f} s (slowest rank)"
              + (f"; weights per rank {wb / 2**30:.2f} GiB, dsv3 plan --serve {load['plan_weight_bytes'] / 2**30:.2f} "
                 f"GiB ({load['weight_error_pct']:+.1f}%); cache tokens per rank {load['cache_tokens']:,}, plan "
                 f"{load['plan_cache_tokens']:,}" if "plan_weight_bytes" in load else ""))
        if fit is not None:
            print(f"--skew {args.skew}: target imbalance over experts (max / mean - 1) mean "
                  f"{fit['target_expert_imbalance'][0]:.3f}, max {fit['target_expert_imbalance'][1]:.3f}")
        for name_, pv in per_variant.items():
            print(f"{name_}: measured imbalance over experts mean {pv['expert_imbalance'][0]:.3f} max "
                  f"{pv['expert_imbalance'][1]:.3f}; over ranks ({pv['slots_per_rank']} slots each) mean "
                  f"{pv['rank_imbalance'][0]:.3f} max {pv['rank_imbalance'][1]:.3f}")
        print("| variant | mode | k | batch | prefill tok/s | decode tok/s | decode step ms | acceptance (first) |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in rows:
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f} ({r['first_draft_acceptance']:.2f})"
            print(f"| {r['variant']} | {r['mode']} | {r['k']} | {r['batch']} | {r['prefill_tok_s']:,.0f} | "
                  f"{r['decode_tok_s']:,.0f} | {r['decode_step_ms']:.2f} | {acc} |")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ep_serve.json"), "w") as f:
            json.dump({"setup": head, "ranks": world, "device": name, "layers": cfg.num_hidden_layers, "fp8": fp8,
                       "load": load, "checkpoint": args.checkpoint,
                       "weight_bytes_per_rank": wb, "rows": rows, "skew": args.skew, "fit": fit,
                       "variants": per_variant, "redundant_experts": args.redundant_experts}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
