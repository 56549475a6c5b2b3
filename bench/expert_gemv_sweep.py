"""The routed experts of one decode step on one GPU: the grouped-GEMM path against the decode GEMV
(dsv3/kernels/expert_gemv_triton.py) and a sweep of the GEMV's launch parameters, at the 16b model's shapes.

    PYTHONPATH=. python bench/expert_gemv_sweep.py [--rows 6,48] [--fp8 | --fp8-only] [--quick]

Each timing replays a CUDA graph holding 50 calls (so launches cost what they cost in the graphed decode
step), median of 7 replays. GB/s counts the weight bytes the call must read: the distinct experts the rows
select (each expert once: what the grouped GEMM reads, the floor for any kernel) over the measured time, beside
the card's copy bandwidth measured in the same run (bench/bandwidth.py).

Each call of a graph draws other experts (a new random top-k per token, cycling through 16 draws) so that the
weights come from HBM, as in a decode step where gigabytes of other weights pass between two uses of an expert:
before 2026-12-05 (ninth session) every call reused one draw, and 6 FP8 experts (52 MB) sat largely in the H100's
50 MB L2 (the sweep's 12.5 / 6.3 us for gate+up / down were 17.2 / 10.8 us inside the decode step, the profile).
--shared also sweeps the shared experts' one-row SwiGLU (`swiglu_gemv`: one (n_shared x I, D) matrix pair, cycled
through copies of 128 MiB in all). --json PATH writes each part's best config, which `bench/decode_gpu.py
--gemv-configs PATH` runs in its +tuned modes. --shared-rows: the launches as the decode step makes them where the
shared experts run inside them (kernels.set_shared_gemv, on for e4m3 weights): n_shared more rows a token through a
second expert stack (`routed=K`), so the configs are named by K + n_shared rows a token (here the stack is the first
n_shared routed experts' weights, of the same shapes; the model's are views of the shared MLP).

    PYTHONPATH=. python bench/expert_gemv_sweep.py --fp8-only --rows 6 --shared --json gemv.json
    PYTHONPATH=. python bench/expert_gemv_sweep.py --fp8-only --psum ...   (the PSUM configs instead)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import dsv3  # noqa: E402
from dsv3 import kernels  # noqa: E402
from dsv3.kernels import expert_gemv_triton as k  # noqa: E402
from dsv3.model.fp8 import FP8Experts  # noqa: E402
from dsv3.model.moe import Experts  # noqa: E402
from bandwidth import copy_bandwidth, graph_us  # noqa: E402


def graph_time(fn, calls: int = 48, reps: int = 7) -> float:
    """Seconds per call of fn(i) (call i of the graph) replayed from a CUDA graph of `calls` calls (bench/bandwidth.py
    graph_us)."""
    return graph_us(fn, calls, reps) / 1e6


DRAWS = 16  # expert draws (and shared-weight copies, up to ROTATE_BYTES) cycled through by a graph's calls
ROTATE_BYTES = 128 << 20


def sweep_grid(fp8_only: bool, quick: bool, psum: bool = False) -> dict | list[dict]:
    """The configs: a product over these values (bf16 and mixed runs), or for e4m3 alone the tiles of at most
    8192 fp32 accumulator elements per matrix (BN x KU x 128; beyond, the fused gate+up kernel spills at 4 warps).
    psum (e4m3 alone): only PSUM configs (_dot_part: one accumulator per 16 columns, so tiles up to BN x KU = 128
    and the prefetch fit in registers), with and without the prefetch."""
    if psum:
        if not fp8_only:
            raise SystemExit("--psum sweeps the e4m3 experts: give --fp8-only")
        # (KU 8 and 16: a routed down's whole K (1,408 for 16b) in one or two loads a program, every load in flight at
        # once; compiled for sm_90 at 8 warps they take 64-141 registers, no spills: 2026-12-06)
        return [dict(BN=bn, KU=ku, num_warps=w, PREFETCH=pf, PSUM=True) for bn in (8, 16, 32)
                for ku in (1, 2, 4, 8, 16) if bn * ku <= 128
                for w in (4, 8) for pf in (False, True) if not (quick and w == 8 and bn * ku < 32)
                and not (ku >= 8 and (w == 4 or pf))]
    if not fp8_only:
        return (dict(BN=[8, 16, 32, 64], KU=[1, 2, 4], num_warps=[2, 4, 8], PREFETCH=[True, False]) if not quick
                else dict(BN=[8, 16, 32], KU=[1, 2], num_warps=[4], PREFETCH=[True, False]))
    tiles = [(bn, ku) for bn in (8, 16, 32) for ku in (1, 2, 4, 8) if bn * ku <= 64]
    return [dict(BN=bn, KU=ku, num_warps=w, PREFETCH=pf) for bn, ku in tiles for w in (4, 8)
            for pf in ((False,) if quick else (False, True))]


def configs(grid) -> list[dict]:
    return grid if isinstance(grid, list) else [dict(zip(grid, v)) for v in itertools.product(*grid.values())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--rows", default="6,48", help="(token, expert) pairs per call: batch x top-k")
    ap.add_argument("--fp8", action="store_true", help="also the e4m3 experts")
    ap.add_argument("--fp8-only", action="store_true", help="the e4m3 experts only (not the bf16 ones)")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    ap.add_argument("--shared", action="store_true", help="also the shared experts' one-row SwiGLU (swiglu_gemv)")
    ap.add_argument("--psum", action="store_true", help="sweep the PSUM configs (with --fp8-only)")
    ap.add_argument("--shared-rows", action="store_true", help="the routed launches with n_shared more rows a token "
                    "(the shared experts inside them, as the shipped FP8 decode step runs them)")
    ap.add_argument("--json", default=None, help="write each part's best config (and every timing) to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("expert_gemv_sweep.py: CUDA is not available; this benchmark runs on a GPU")
    bw = copy_bandwidth("cuda", 2**31)["bytes_per_s"]
    cfg = dsv3.preset(args.preset)
    E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    print(f"card {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.3f} TB/s; {args.preset} experts E={E} "
          f"D={D} I={I} top-{K}; {DRAWS} expert draws cycled through by each graph's calls")
    dense = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    for p in dense.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.02
    fp8 = FP8Experts.from_experts(dense).cuda() if args.fp8 or args.fp8_only else None  # (before .bfloat16(): in place)
    stores = ([] if args.fp8_only else [("bf16", dense.bfloat16().cuda())])
    stores += [("fp8", fp8)] if fp8 is not None else []
    grid = configs(sweep_grid(args.fp8_only, args.quick, args.psum))
    out = {"card": torch.cuda.get_device_name(), "copy_bw": bw, "best": [], "timings": []}

    def record(name, part, M, N, c, t):
        out["timings"].append(dict(store=name, part=part, M=M, N=N, cfg=c, us=t * 1e6))

    for (name, m), M in itertools.product(stores, [int(r) for r in args.rows.split(",")]):
        N = max(M // K, 1)
        x = torch.randn(N, D, device="cuda").bfloat16()
        draws = [torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).cuda() for _ in range(DRAWS)]
        w = torch.rand(N, K, device="cuda")
        flats = [d.reshape(-1) for d in draws]
        gw = m.gemv_weights()
        S = cfg.n_shared_experts if args.shared_rows else 0
        # --shared-rows: a second stack of S experts (routed experts 0 .. S-1's weights) taken by every token
        first = [None if t is None else t[:S] for t in gw]  # (gate, its scales, up, its scales, down, its scales)
        two = dict(extra=tuple(first[:4]), routed=K) if S else {}
        down_two = dict(extra=(*first[4:], None, None), routed=K) if S else {}
        R = K + S  # rows a token
        distinct = sum(f.unique().numel() for f in flats) / DRAWS + S
        per_byte = 1 if name == "fp8" else 2
        need = distinct * 3 * D * I * per_byte  # each selected expert read once
        print(f"\n### {name} experts, {N} tokens x (top-{K} + {S} shared) = {N * R} rows, {distinct:.1f} distinct "
              f"experts a call, {need / 1e6:.1f} MB of weights to read (roofline {need / bw * 1e6:.1f} us)")
        print("| path | config | us | GB/s | of copy BW |\n|---|---|---|---|---|")

        def row(path, cfg_s, t):
            print(f"| {path} | {cfg_s} | {t * 1e6:.1f} | {need / t / 1e9:,.0f} | {need / t / bw:.1%} |", flush=True)

        if not S:  # (the modules' paths: the routed experts alone)
            with torch.no_grad(), kernels.use_backend(expert_gemv="reference"):
                row("grouped (forward_grouped)" if name == "bf16" else "per-row FP8 kernel (sorted_mlp)", "-",
                    graph_time(lambda i: m.forward_grouped(x, draws[i % DRAWS], w)))
            with torch.no_grad():
                row("GEMV (forward_gemv)", "defaults " + str(k.default_config(name == "fp8", N * K, I)) + " / "
                    + str(k.default_config(name == "fp8", N * K, D)),
                    graph_time(lambda i: m.forward_gemv(x, draws[i % DRAWS], w)))
        with torch.no_grad():
            hs = [kernels.expert_gemv(x, gw[0], gw[1], f, R, up=gw[2], up_s=gw[3], **two) for f in flats]
            best = {}
            for c in grid:
                try:
                    t1 = graph_time(lambda i: k.launch(x, gw[0], gw[1], flats[i % DRAWS], R, gw[2], gw[3], **two,
                                                       **c))
                    t2 = graph_time(lambda i: k.launch(hs[i % DRAWS], gw[4], gw[5], flats[i % DRAWS], 1, **down_two,
                                                       **c))
                except Exception as e:  # a config that does not compile or launch (registers, shared memory)
                    print(f"| kernels: gate+up / down | {c} | failed: {type(e).__name__} | | |", flush=True)
                    continue
                for part, t, n_out in (("gate+up", t1, I), ("down", t2, D)):
                    record(name, part, N * R, n_out, c, t)
                    if part not in best or t < best[part][1]:
                        best[part] = (c, t)
                print(f"| kernels: gate+up / down | {c} | {t1 * 1e6:.1f} / {t2 * 1e6:.1f} | "
                      f"{need * 2 / 3 / t1 / 1e9:,.0f} / {need / 3 / t2 / 1e9:,.0f} | "
                      f"{need * 2 / 3 / t1 / bw:.1%} / {need / 3 / t2 / bw:.1%} |", flush=True)
            for part, (c, t) in best.items():
                print(f"best {part}: {c} {t * 1e6:.1f} us")
                out["best"].append(dict(fp8=name == "fp8", M=N * R, N=I if part == "gate+up" else D, part=part,
                                        cfg=c, us=t * 1e6))
    if args.shared and cfg.n_shared_experts:
        NS = cfg.n_shared_experts * I
        for name, _ in stores:
            gen = torch.Generator(device="cuda").manual_seed(1)
            gate = torch.randn(NS, D, device="cuda", generator=gen) * 0.02
            up = torch.randn(NS, D, device="cuda", generator=gen) * 0.02
            if name == "fp8":
                (gq, gs), (uq, us) = kernels.weight_quant(gate), kernels.weight_quant(up)
                one = (gq[None], gs[None], uq[None], us[None])
                per = 2 * NS * D
            else:
                one = (gate.bfloat16()[None], None, up.bfloat16()[None], None)
                per = 4 * NS * D
            copies = [tuple(t.clone() if t is not None else None for t in one)
                      for _ in range(max(1, min(DRAWS, math.ceil(ROTATE_BYTES / per))))]
            x1 = torch.randn(1, D, device="cuda").bfloat16()
            print(f"\n### {name} shared experts' SwiGLU, one row, ({NS}, {D}) x 2: {per / 1e6:.1f} MB a call "
                  f"(roofline {per / bw * 1e6:.1f} us), {len(copies)} weight copies cycled through")
            print("| config | us | GB/s | of copy BW |\n|---|---|---|---|")
            res = []
            for c in [k.default_config(name == "fp8", 1, NS)] + grid:
                try:
                    t = graph_time(lambda i: k.launch(x1, copies[i % len(copies)][0], copies[i % len(copies)][1],
                                                      None, 1, copies[i % len(copies)][2],
                                                      copies[i % len(copies)][3], **c))
                except Exception as e:
                    print(f"| {c} | failed: {type(e).__name__} | | |", flush=True)
                    continue
                res.append((t, c))
                record(name, "shared gate+up", 1, NS, c, t)
                print(f"| {c}{' (default)' if len(res) == 1 else ''} | {t * 1e6:.2f} | {per / t / 1e9:,.0f} | "
                      f"{per / t / bw:.1%} |", flush=True)
            t, c = min(res, key=lambda r: r[0])
            print(f"best shared gate+up: {c} {t * 1e6:.2f} us (default {res[0][0] * 1e6:.2f} us)")
            out["best"].append(dict(fp8=name == "fp8", M=1, N=NS, part="shared gate+up", cfg=c, us=t * 1e6))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
