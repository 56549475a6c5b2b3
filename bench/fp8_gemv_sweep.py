"""FP8-weight decode GEMMs (dsv3/kernels/fp8_gemm_triton.py) on the `16b` model's decode shapes: bf16 cuBLAS
on the same shape, the old fixed tiles, the heuristic's config (what the model runs) and a sweep of launch
configs, each checked against the reference and timed inside a CUDA graph.

    PYTHONPATH=. python bench/fp8_gemv_sweep.py              (H200: ~2 min, most of it Triton compiles)
    PYTHONPATH=. python bench/fp8_gemv_sweep.py --quick      (a smaller sweep, < 1 min)
    PYTHONPATH=. python bench/fp8_gemv_sweep.py --list       (the shapes and configs only; runs on a CPU)
    options: --only NAME (shapes whose name contains it), --all (print every config), --json PATH,
             --rows 1,32 (the linears' row counts), --wide (the WIDE tiles too), --psum (each GEMV-form
             config also with PSUM: per-group partial sums, fp8_gemm_triton._gemv_tile)

Shapes (from `dsv3.config.preset("16b")`): every FP8 nn.Linear at M = 1 and 32 rows (batch 1 and 32) and
the routed experts' per-row GEMVs (`fp8_expert_rows`, as FP8Experts.sorted_mlp calls it: gate and up
separately, (E, I, D) = (64, 1408, 2048) each, down (64, 2048, 1408)) at 6 and 192 rows (top-6 of 1 and of
32 tokens, rows sorted by expert, experts drawn at random per call). kv_b_proj is listed for completeness:
absorbed decode dequantises it instead (MLA.kv_b_weights), so the per-step sums leave it out.

Rows of each table: "bf16" = the bf16 model's op on bf16 weights (F.linear -> cuBLAS; for the experts
`torch._grouped_mm` over the sorted rows, what Experts.sorted_mlp runs); "old" = the fixed tiles before
the launch configs (16-row tl.dot, BN 64; rows: BN 64), through today's kernel code; "heur" = the config
`_config_small_m` / `_config_rows` return; then the sweep, fastest first (--all: every config). Columns:
microseconds per call, GB/s of the weight bytes read (e4m3 + fp32 scales; bf16: 2 bytes per weight; for
the experts only the distinct experts each call selects), that as a share of the copy bandwidth measured
in this run (bench/bandwidth.py), speed-up over bf16, and the check against the reference
(`reference.fp8_weight_linear_ref` / `fp8_expert_rows_ref`, relative Frobenius error < 1e-2: bf16 output
and weight rounding are ~0.2%); a failed check prints MISMATCH and the script exits 1.

Timing: `--calls` calls (64; --quick 32) captured in one CUDA graph, replayed `--reps` times (7; --quick 5),
median replay / calls: launch overhead is the graph's, as in the graphed decode step. The calls cycle
through copies of the weight, 128 MiB of them per replay (small matrices get up to 4x --calls calls for
it; the experts: random experts of a 184 MB stack per call), so each call reads its weight from HBM, not
from the ~50 MiB L2, as in a decode step where ~2.5 GB of other weights pass between two uses of one matrix.

Sweep (two stages per shape): stage 1 a grid (GEMV form: BN x KU x num_stages 1, 2 at 4 warps; tl.dot form:
BM x BN x (KU, num_stages) at 4 warps; at M = 1 both forms), stage 2 the 2 fastest of stage 1 at 2, 4, 8
warps. (GEMV form num_stages: 2 = the next iteration's loads issued before this one's FMAs.) A config that fails
to compile or launch (shared memory) is listed as failed. At the end: per shape the best config and
whether the heuristic is within 5% of it, and the per-decode-step sums of every call of these GEMMs in the
16b model (batch 1: linears at M = 1, experts at 6 rows; batch 32: M = 32 and 192 rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bandwidth import graph_us  # noqa: E402  (bench/bandwidth.py)
from dsv3.config import preset  # noqa: E402
from dsv3.kernels import reference  # noqa: E402

ROTATE_BYTES = 128 * 2**20  # weight bytes one graph replay cycles through: > 2.5x the L2 of an H100/H200
TOL = 1e-2
# What the script runs on: the GPU and bf16 activations. tests/test_fp8_gemv.py runs it on the CPU under the
# Triton interpreter (which lacks bf16) to check its plumbing: DEVICE "cpu", ACT float16, no CUDA graphs.
DEVICE, ACT = "cuda", torch.bfloat16
OLD_SMALL_M = dict(BM=16, BN=64, KU=1, num_warps=4, num_stages=3)
OLD_ROWS = dict(BN=64, KU=1, num_warps=4, num_stages=1)  # (num_stages: no effect in the GEMV form)


def shapes_16b() -> list[dict]:
    """The FP8 GEMMs of one 16b decode step: name, kind ("linear" / "rows"), N, K, calls per token step."""
    c = preset("16b")
    D, H = c.hidden_size, c.num_attention_heads
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    shared = c.n_shared_experts * c.moe_intermediate_size
    q = ("q_proj", H * (c.qk_nope_head_dim + c.qk_rope_head_dim), D) if c.q_lora_rank is None else \
        ("q_b_proj", H * (c.qk_nope_head_dim + c.qk_rope_head_dim), c.q_lora_rank)
    lin = [
        (*q, c.num_hidden_layers),
        ("kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, D, c.num_hidden_layers),
        ("kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, 0),  # absorbed: dequantised
        ("o_proj", D, H * c.v_head_dim, c.num_hidden_layers),
        ("dense gate/up", c.intermediate_size, D, 2 * c.first_k_dense_replace),
        ("dense down", D, c.intermediate_size, c.first_k_dense_replace),
        ("shared gate/up", shared, D, 2 * moe_layers),
        ("shared down", D, shared, moe_layers),
    ]
    out = [dict(name=n, kind="linear", N=N, K=K, per_step=k, E=0, top_k=0) for n, N, K, k in lin]
    for n, N, K, k in (("experts gate/up", c.moe_intermediate_size, D, 2 * moe_layers),
                       ("experts down", D, c.moe_intermediate_size, moe_layers)):
        out.append(dict(name=n, kind="rows", N=N, K=K, per_step=k, E=c.n_routed_experts, top_k=c.num_experts_per_tok))
    return out


def cfg_str(cfg: dict) -> str:
    bm = f"BM{cfg['BM']:<2} " if "BM" in cfg else ""
    return (f"{bm}BN{cfg['BN']:<2} KU{cfg['KU']} w{cfg['num_warps']} s{cfg['num_stages']}"
            + (" psum" if cfg.get("PSUM") else ""))


def _key(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


# --- the sweep's configs ---------------------------------------------------------------------------------

def gemv_grid(BM: int | None, quick: bool) -> list[dict]:
    """GEMV form: BN x KU x num_stages (1, or 2 = the next iteration's loads prefetched) at 4 warps, tiles up
    to 2x GEMV_TILE elements (beyond, double-buffered, the registers spill: sm_90)."""
    from dsv3.kernels.fp8_gemm_triton import GEMV_TILE

    triples = ((8, 4, 1), (8, 4, 2), (8, 8, 2), (16, 2, 2), (32, 1, 2), (64, 1, 2)) if quick else \
        [(bn, ku, st) for bn in (8, 16, 32, 64) for ku in (1, 2, 4, 8) for st in (1, 2)
         if (BM or 1) * bn * ku * 128 <= 2 * GEMV_TILE]
    bm = {} if BM is None else dict(BM=BM)
    return [dict(**bm, BN=bn, KU=ku, num_warps=4, num_stages=st) for bn, ku, st in triples]


def dot_grid(BMs: tuple[int, ...], quick: bool) -> list[dict]:
    """tl.dot form: BM x BN x (KU, num_stages) at 4 warps; shared memory (stages - 1)·KU·(BM·256 + BN·128)."""
    pairs = ((2, 4),) if quick else ((1, 3), (1, 5), (2, 3), (2, 4), (4, 3))
    return [dict(BM=bm, BN=bn, KU=ku, num_warps=4, num_stages=st) for bm in BMs for bn in (16, 32, 64)
            for ku, st in pairs]


# --wide: GEMV tiles beyond the grid's register budget, one load of up to 16 scale blocks per program (the whole K of
# a 2048-wide projection in flight at once: one DRAM round trip instead of a chain of them), at 4 and 8 warps
WIDE = ((8, 16, 1, 4), (8, 16, 1, 8), (8, 8, 1, 8), (16, 8, 1, 8), (16, 16, 1, 8), (8, 16, 2, 8))
wide = False  # set by --wide
# --psum: every GEMV-form config of stage 1 also with PSUM (fp8_gemm_triton._gemv_tile: per-group partial sums,
# the scale once a group; its accumulator is 16x smaller, so tiles up to 4x GEMV_TILE are tried too)
psum = False  # set by --psum


def with_psum(cfgs: list[dict], BM: int | None) -> list[dict]:
    from dsv3.kernels.fp8_gemm_triton import GEMV_TILE

    if not psum:
        return cfgs
    gemv = [c for c in cfgs if c.get("BM", 1) < 16]
    big = [dict(**({} if BM is None else dict(BM=BM)), BN=bn, KU=ku, num_warps=w, num_stages=st)
           for bn, ku in ((16, 8), (32, 4), (32, 8), (64, 4)) for w in (4, 8) for st in (1, 2)
           if (BM or 1) * bn * ku * 128 <= 4 * GEMV_TILE]
    return cfgs + [dict(c, PSUM=True) for c in gemv + big]


def stage1(shape: dict, M: int, quick: bool) -> list[dict]:
    if shape["kind"] == "rows":
        return with_psum(gemv_grid(None, quick), None)
    if M <= 4:  # both forms at the GEMV sizes: is the GEMV form worth having?
        BM = 1 << (M - 1).bit_length()
        extra = [dict(BM=BM, BN=bn, KU=ku, num_warps=w, num_stages=st) for bn, ku, st, w in WIDE] if wide else []
        return with_psum(gemv_grid(BM, quick) + extra, BM) + dot_grid((16,), True)
    return dot_grid((16, 32) if M > 16 else (16,), quick)


def stage2(best: list[dict]) -> list[dict]:
    return [dict(cfg, num_warps=w) for cfg in best for w in (2, 4, 8) if w != cfg["num_warps"]]


# --- operands, timing --------------------------------------------------------------------------------------

class Case:
    """One (shape, M): operands, the reference output, and how to call each variant on call i."""

    def __init__(self, shape: dict, M: int, calls: int, seed: int = 0):
        from dsv3.kernels import fp8_gemm_triton as fk

        self.shape, self.M, self.fk = shape, M, fk
        N, K = shape["N"], shape["K"]
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        self.x = torch.randn(M, K, device=DEVICE, generator=g).to(ACT)
        if shape["kind"] == "linear":
            w, s = reference.weight_quant(torch.randn(N, K, device=DEVICE, generator=g) * 0.05)
            # enough calls (up to 4x --calls) that one replay cycles through ROTATE_BYTES of weight copies
            n8 = math.ceil(ROTATE_BYTES / (w.numel() + 4 * s.numel()))
            self.calls = min(4 * calls, max(calls, n8))
            n8, nb = min(self.calls, n8), min(self.calls, math.ceil(ROTATE_BYTES / (2 * w.numel())))
            self.w8 = [(w.clone(), s.clone()) for _ in range(n8)]
            wb = reference.weight_dequant(w, s, dtype=ACT)
            self.wb = [wb.clone() for _ in range(nb)]
            self.ref = reference.fp8_weight_linear_ref(self.x, w, s)
            self.bytes8 = w.numel() + 4 * s.numel()
            self.bytesb = 2 * w.numel()
            self.heur = fk._config_small_m(M, N, K)
            self.old = OLD_SMALL_M
        else:
            E, k = shape["E"], shape["top_k"]
            assert M % k == 0, "rows = tokens x top_k"
            qs = [reference.weight_quant(torch.randn(N, K, device=DEVICE, generator=g) * 0.05) for _ in range(E)]
            w, s = torch.stack([q for q, _ in qs]), torch.stack([t for _, t in qs])
            self.calls = calls  # each call reads 6+ experts of 2.9 MiB at random from ROTATE_BYTES or more
            n8 = math.ceil(ROTATE_BYTES / (w.numel() + 4 * s.numel()))
            self.w8 = [(w, s)] + [(w.clone(), s.clone()) for _ in range(n8 - 1)]
            self.wb = [torch.stack([reference.weight_dequant(w[e], s[e], dtype=ACT) for e in range(E)])]
            self.wbt = [t.transpose(-2, -1) for t in self.wb]  # (E, K, N), as sorted_mlp hands torch._grouped_mm
            tokens = M // k
            self.expert, self.offs, distinct = [], [], []
            for _ in range(calls):  # top-k distinct experts per token, the pairs sorted by expert
                e = torch.rand(tokens, E, device=DEVICE, generator=g).topk(k, dim=-1).indices.reshape(-1).sort().values
                self.expert.append(e)
                self.offs.append(torch.bincount(e, minlength=E).cumsum(0).to(torch.int32))
                distinct.append(e.unique().numel())
            self.ref = reference.fp8_expert_rows_ref(self.x, w, s, self.expert[0])
            per_expert8, per_expertb = N * K + 4 * s[0].numel(), 2 * N * K
            self.bytes8 = statistics.mean(distinct) * per_expert8
            self.bytesb = statistics.mean(distinct) * per_expertb
            self.heur = fk._config_rows(M, N, K)
            self.old = OLD_ROWS

    def run(self, cfg: dict, i: int) -> torch.Tensor:
        w, s = self.w8[i % len(self.w8)]
        if self.shape["kind"] == "linear":
            return self.fk._launch_small_m(self.x, w, s, **cfg)
        return self.fk._launch_rows(self.x, w, s, self.expert[i], **cfg)

    def run_bf16(self, i: int) -> torch.Tensor:
        if self.shape["kind"] == "linear":
            return F.linear(self.x, self.wb[i % len(self.wb)])
        return torch._grouped_mm(self.x, self.wbt[i % len(self.wbt)], offs=self.offs[i])

    def check(self, cfg: dict) -> float:
        y = self.run(cfg, 0)
        return ((y.float() - self.ref.float()).norm() / self.ref.float().norm()).item()


def measure(case, cfg: dict, reps: int) -> dict:
    """One config of a case: its check and its time, or why it failed. Any case with check(cfg) -> relative
    error, run(cfg, call) and calls (this file's Case; dense_gemv_sweep.py's)."""
    try:
        err = case.check(cfg)
        us = graph_us(lambda i: case.run(cfg, i), case.calls, reps)
    except Exception as e:  # a config that does not compile or launch (e.g. out of shared memory)
        return dict(cfg=cfg, us=math.inf, err=math.nan, failed=f"{type(e).__name__}: {str(e)[:80]}")
    return dict(cfg=cfg, us=us, err=err, failed=None)


def sweep_configs(case, first: list[dict], stage2_of, reps: int, quick: bool) -> list[dict]:
    """`measure` each config of `first` (one listed twice runs once) and, unless quick, the configs
    `stage2_of(the two fastest that ran)` returns: the results, one per distinct config. Shared with
    dense_gemv_sweep.py."""
    res: dict[tuple, dict] = {}

    def run(cfgs):
        for cfg in cfgs:
            if _key(cfg) not in res:
                res[_key(cfg)] = measure(case, cfg, reps)

    run(first)
    if not quick:
        ok = sorted((r for r in res.values() if r["failed"] is None), key=lambda r: r["us"])
        run(stage2_of([r["cfg"] for r in ok[:2]]))
    return list(res.values())


def sweep_case(case: Case, reps: int, quick: bool) -> dict:
    results = sweep_configs(case, [case.old, case.heur] + stage1(case.shape, case.M, quick), stage2, reps, quick)
    return dict(bf16=graph_us(case.run_bf16, case.calls, reps), results=results)


def drive(cases, make_case, sweep, print_case, print_summary, *, device: str, calls: int, reps: int, quick: bool,
          show_all: bool, json_path: str | None) -> int:
    """The sweep scripts' main loop (this one's and dense_gemv_sweep.py's): the copy bandwidth of this run, then
    per (shape, M) case build it, sweep it, print it; the summary, the JSON; exit status 1 on a mismatch."""
    from bandwidth import copy_bandwidth

    t0 = time.time()
    bw = copy_bandwidth(device)
    print(bw["caption"])
    print(f"{'quick' if quick else 'full'} sweep: {calls} calls per CUDA graph, median of {reps} replays; "
          f"torch {torch.__version__}")
    summaries, mismatches = [], 0
    for sh, M in cases:
        case = make_case(sh, M, calls)
        s, bad = print_case(case, sweep(case, reps, quick), bw["bytes_per_s"], show_all)
        summaries.append(s)
        mismatches += bad
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    print_summary(summaries)
    print(f"\n{time.time() - t0:.0f} s in all; {mismatches} mismatching config(s)"
          + (" !!!!!!!!" if mismatches else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(bandwidth=bw, calls=calls, reps=reps, quick=quick, shapes=summaries), f, indent=1,
                      default=str)
    return 1 if mismatches else 0


# --- report ------------------------------------------------------------------------------------------------

def print_case(case: Case, out: dict, bw: float, show_all: bool, top: int = 8) -> tuple[dict, int]:
    sh, M = case.shape, case.M
    bf16 = out["bf16"]
    res = sorted(out["results"], key=lambda r: r["us"])
    old = next(r for r in res if _key(r["cfg"]) == _key(case.old))
    heur = next(r for r in res if _key(r["cfg"]) == _key(case.heur))
    best = res[0]
    print(f"\n{sh['name']}  M={M}  N={sh['N']} K={sh['K']}" + (f"  E={sh['E']}" if sh["E"] else "") +
          f"  ({case.bytes8 / 1e6:.2f} MB e4m3 + scales read per call; bf16 {case.bytesb / 1e6:.2f} MB; "
          f"{case.calls} calls per graph)")
    print(f"  {'':5} {'config':<26} {'us/call':>8} {'GB/s':>7} {'of copy':>8} {'vs bf16':>8}  check")

    def line(tag, cfg_s, us, nbytes, err=None, failed=None):
        if failed:
            print(f"  {tag:5} {cfg_s:<26} {'failed':>8}  {failed}")
            return
        gbs = nbytes / us / 1e3
        chk = "" if err is None else ("ok" if err < TOL else f"MISMATCH rel err {err:.3g} !!!!!!!!")
        print(f"  {tag:5} {cfg_s:<26} {us:8.2f} {gbs:7.0f} {gbs * 1e9 / bw:7.0%} {bf16 / us:7.2f}x  {chk}")

    line("bf16", "F.linear (cuBLAS)" if sh["kind"] == "linear" else "torch._grouped_mm", bf16, case.bytesb)
    for tag, r in (("old", old), ("heur", heur)):
        line(tag, cfg_str(r["cfg"]), r["us"], case.bytes8, r["err"], r["failed"])
    shown = res if show_all else res[:top]
    for r in shown:
        line("", cfg_str(r["cfg"]), r["us"], case.bytes8, r["err"], r["failed"])
    if len(shown) < len(res):
        print(f"  ({len(res) - len(shown)} slower configs not shown; --all shows them)")
    mismatches = [r for r in res if r["failed"] is None and not r["err"] < TOL]
    for r in mismatches:  # also those not shown above
        print(f"  !!!!!!!! MISMATCH {cfg_str(r['cfg'])}: rel err {r['err']:.3g} (tolerance {TOL})")
    within = heur["us"] <= 1.05 * best["us"]
    print(f"  best {cfg_str(best['cfg'])} {best['us']:.2f} us; heuristic {heur['us'] / best['us']:.2f}x of it "
          f"({'within' if within else 'NOT within'} 5%)")
    summary = dict(name=sh["name"], M=M, N=sh["N"], K=sh["K"], per_step=sh["per_step"], bf16_us=bf16,
                   old_us=old["us"], heur_us=heur["us"], best_us=best["us"], heur=heur["cfg"], best=best["cfg"],
                   heur_within_5pct=within, bytes_fp8=case.bytes8, bytes_bf16=case.bytesb,
                   results=[dict(r, cfg=r["cfg"]) for r in res])
    return summary, len(mismatches)


def print_summary(summaries: list[dict]) -> None:
    print("\nSummary (us per call; x = bf16 time / this time)")
    print(f"  {'shape':<20} {'M':>4} {'bf16':>7} {'old':>7} {'heur':>7} {'best':>7} {'heur x':>7} {'best x':>7}  "
          f"{'heur~best':<9} best config")
    for s in summaries:
        print(f"  {s['name']:<20} {s['M']:>4} {s['bf16_us']:7.2f} {s['old_us']:7.2f} {s['heur_us']:7.2f} "
              f"{s['best_us']:7.2f} {s['bf16_us'] / s['heur_us']:6.2f}x {s['bf16_us'] / s['best_us']:6.2f}x  "
              f"{'yes' if s['heur_within_5pct'] else 'NO':<9} {cfg_str(s['best'])}")
    for batch in (1, 32):
        rows = [s for s in summaries if s["per_step"] and s["M"] in ((1, 6) if batch == 1 else (32, 192))]
        if not rows:
            continue
        tot = {k: sum(s["per_step"] * s[k] for s in rows) for k in ("bf16_us", "old_us", "heur_us", "best_us")}
        print(f"  per decode step at batch {batch} ({sum(s['per_step'] for s in rows)} calls of these GEMMs; "
              f"not kv_b, lm_head, the rest): bf16 {tot['bf16_us']:.0f} us, fp8 old {tot['old_us']:.0f} us, "
              f"heuristic {tot['heur_us']:.0f} us, best per shape {tot['best_us']:.0f} us")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller sweep, fewer calls and replays (< 1 min)")
    ap.add_argument("--list", action="store_true", help="print the shapes and the configs, time nothing")
    ap.add_argument("--only", default=None, help="only shapes whose name contains this")
    ap.add_argument("--all", action="store_true", help="print every config of the sweep, not the fastest 8")
    ap.add_argument("--calls", type=int, default=None, help="calls per CUDA graph (64; --quick 32)")
    ap.add_argument("--reps", type=int, default=None, help="graph replays timed (7; --quick 5)")
    ap.add_argument("--json", default=None, help="write every measurement to this file")
    ap.add_argument("--rows", default="1,32", help="comma list of the linears' row counts M (the experts: top-k x "
                    "the batches these make)")
    ap.add_argument("--wide", action="store_true", help="also the wide one-load GEMV tiles at M <= 4 (WIDE)")
    ap.add_argument("--psum", action="store_true", help="also each GEMV-form config with PSUM (and wider PSUM tiles)")
    args = ap.parse_args()
    global wide, psum
    wide, psum = args.wide, args.psum
    calls = args.calls or (32 if args.quick else 64)
    reps = args.reps or (5 if args.quick else 7)
    cases = []
    for sh in shapes_16b():
        if args.only and args.only not in sh["name"]:
            continue
        rows = [int(r) for r in args.rows.split(",")]
        Ms = rows if sh["kind"] == "linear" else [r * sh["top_k"] for r in rows]
        cases += [(sh, M) for M in Ms]
    if args.list:
        from dsv3.kernels import fp8_gemm_triton as fk

        keys = set()
        for sh, M in cases:
            cfgs = stage1(sh, M, args.quick)
            heur = fk._config_small_m(M, sh["N"], sh["K"]) if sh["kind"] == "linear" else \
                fk._config_rows(M, sh["N"], sh["K"])
            keys |= {(sh["kind"], M == 1, _key(c)) for c in cfgs + [heur]}
            print(f"{sh['name']:<20} M={M:<4} N={sh['N']:<6} K={sh['K']:<6} per step {sh['per_step']:>3}  "
                  f"heuristic {cfg_str(heur)}; stage 1: {len(cfgs)} configs")
        print(f"{len(keys)} distinct (kernel, M = 1, config) compiles in stage 1"
              + ("" if args.quick else ", up to 4 more per shape in stage 2"))
        return 0
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/fp8_gemv_sweep.py times Triton kernels in CUDA graphs: it needs a CUDA GPU "
                 "(--list works anywhere)")
    return drive(cases, Case, sweep_case, print_case, print_summary, device=DEVICE, calls=calls, reps=reps,
                 quick=args.quick, show_all=args.all, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
