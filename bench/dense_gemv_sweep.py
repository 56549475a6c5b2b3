"""The dense decode GEMV (dsv3/kernels/dense_gemv_triton.py) against cuBLAS on the model's dense bf16 linears at
decode sizes: for each shape and row count, F.linear (cuBLAS, what the model runs with the GEMV switched off),
the launch config the model would run (`default_config`: TUNED or the heuristic) and a sweep of configs, each
checked against the reference and timed inside a CUDA graph.

    PYTHONPATH=. python bench/dense_gemv_sweep.py                 (16b, M = 1, 2, 4: ~900 timings, est. 4 min)
    PYTHONPATH=. python bench/dense_gemv_sweep.py --presets small --quick     (small's shapes, a smaller sweep)
    PYTHONPATH=. python bench/dense_gemv_sweep.py --list          (the shapes and configs only; runs on a CPU)
    options: --presets 16b,small  --rows 1,2,4  --only NAME  --all  --calls N  --reps N  --json PATH
(The time estimate is the FP8 sweep's rate on an H200, ~0.25 s a timing with its compiles; not yet measured.)

Shapes (from `dsv3.config.preset(...)`): each dense projection the decode step runs through the model's Linear
(q_proj or q_a/q_b, kv_a_proj_with_mqa, o_proj, the first dense layers' FFN, the shared experts), with its
calls per token step; "lm_head" (not routed through the GEMV: a plain nn.Linear, listed to see whether it
should be) and "eh_proj" (MTP, speculative decoding only) have per step 0 and stay out of the sums. kv_b_proj
is left out: absorbed decode reads its weight as W_UK / W_UV einsums, not through the Linear.

Rows of each table: "cuBLAS" = F.linear on the bf16 weight; "model" = `default_config` (what the model runs
once switched on); then the sweep, fastest first (--all: every config). Columns: microseconds per call, GB/s
of weight bytes read (2 per element, x and y are noise), that as a share of the copy bandwidth measured in
this run (bench/bandwidth.py), speed-up over cuBLAS, and the check against `reference.dense_gemv_ref` (relative
Frobenius error < 1e-2: bf16 output rounding is ~0.2%); a mismatch prints MISMATCH and the script exits 1.

Timing: `--calls` calls (64; --quick 32) in one CUDA graph, replayed `--reps` times (7; --quick 5), median
replay / calls (bandwidth.graph_us): launch cost as in the graphed decode step. The calls cycle through copies
of the weight, 128 MiB per replay (ROTATE_BYTES), so each call reads its weight from HBM, not from L2, as in a
decode step where ~3 GB of other weights pass between two uses of one matrix.

Sweep: stage 1 a grid (BN 4..64 x KU 1..8 x num_stages 1, 2 at 4 warps, register tiles up to 2 x GEMV_TILE
elements: beyond, double-buffered, they spill), stage 2 the 2 fastest at 2, 4 and 8 warps. At the end: per
shape the best config and whether the model's is within 5% of it, the per-token-step sums at each row count
(cuBLAS, model, best per shape), and the TUNED entries to paste into dense_gemv_triton.py where the best config
beats the model's by more than 5%.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bandwidth import graph_us  # noqa: E402  (bench/bandwidth.py)
from fp8_gemv_sweep import ROTATE_BYTES, TOL, _key, cfg_str, drive, sweep_configs  # noqa: E402  (its harness)
from dsv3.config import preset  # noqa: E402
from dsv3.kernels import reference  # noqa: E402

# What the script runs on: the GPU and bf16. tests/test_dense_gemv.py runs it on the CPU under the Triton
# interpreter (which lacks bf16) to check its plumbing: DEVICE "cpu", ACT float16, no CUDA graphs.
DEVICE, ACT = "cuda", torch.bfloat16
GEMV_TILE_MAX = 2 * 4096  # the sweep's largest register tile, BM x BN x KU x 128 elements (fp8_gemm_triton.GEMV_TILE)


def shapes(name: str) -> list[dict]:
    """The dense linears of one decode step of preset `name`: name, N, K, calls per token step (0: not counted)."""
    c = preset(name)
    D, H = c.hidden_size, c.num_attention_heads
    L, dense = c.num_hidden_layers, c.first_k_dense_replace
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = [("q_proj", H * qk, D, L)] if c.q_lora_rank is None else \
        [("q_a_proj", c.q_lora_rank, D, L), ("q_b_proj", H * qk, c.q_lora_rank, L)]
    lin = q + [("kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, D, L), ("o_proj", D, H * c.v_head_dim, L)]
    if dense:
        lin += [("dense gate/up", c.intermediate_size, D, 2 * dense), ("dense down", D, c.intermediate_size, dense)]
    if c.n_shared_experts and L > dense:
        shared = c.n_shared_experts * c.moe_intermediate_size
        lin += [("shared gate/up", shared, D, 2 * (L - dense)), ("shared down", D, shared, L - dense)]
    if L > dense:  # the router's logits (Router.logits: the same kernel with an fp32 output; timed with bf16 out)
        lin += [("router gate", c.n_routed_experts, D, L - dense)]
    lin += [("eh_proj (MTP)", D, 2 * D, 0), ("lm_head (not routed)", c.vocab_size, D, 0)]
    return [dict(preset=name, name=n, N=N, K=K, per_step=k) for n, N, K, k in lin]


def stage1(M: int, quick: bool) -> list[dict]:
    """The grid at BM = M rounded up to a power of two (module docstring)."""
    BM = min(1 << (M - 1).bit_length(), 4)
    triples = ((4, 4, 2), (4, 2, 2), (8, 4, 2), (8, 2, 2), (8, 1, 2), (8, 4, 1), (16, 2, 2), (16, 1, 2), (32, 1, 2)) \
        if quick else \
        [(bn, ku, st) for bn in (4, 8, 16, 32, 64) for ku in (1, 2, 4, 8) for st in (1, 2)]
    return [dict(BM=BM, BN=bn, KU=ku, num_warps=4, num_stages=st) for bn, ku, st in triples
            if BM * bn * ku * 128 <= GEMV_TILE_MAX]


def stage2(best: list[dict]) -> list[dict]:
    """The best configs at the other warp counts, at most 64 tile elements per thread: compiled ahead of time for
    sm_90 (Triton 3.6, 2026-12-04), every stage-1 config at 4 and 8 warps takes <= 180 registers and no stack, at
    2 warps the 8192-element tiles spill."""
    return [dict(cfg, num_warps=w) for cfg in best for w in (2, 4, 8)
            if w != cfg["num_warps"] and cfg["BM"] * cfg["BN"] * cfg["KU"] * 128 <= 64 * 32 * w]


class Case:
    """One (shape, M): operands, the reference output, and the calls the timings replay."""

    def __init__(self, shape: dict, M: int, calls: int, seed: int = 0):
        from dsv3.kernels import dense_gemv_triton as k

        self.shape, self.M, self.k = shape, M, k
        N, K = shape["N"], shape["K"]
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        self.x = torch.randn(M, K, device=DEVICE, generator=g).to(ACT)
        w = (torch.randn(N, K, device=DEVICE, generator=g) * 0.05).to(ACT)
        self.bytes = w.numel() * w.element_size()
        n = math.ceil(ROTATE_BYTES / self.bytes)  # enough copies (up to 4x --calls calls) to cycle ROTATE_BYTES
        self.calls = min(4 * calls, max(calls, n))
        self.w = [w] + [w.clone() for _ in range(min(self.calls, n) - 1)]
        self.ref = reference.dense_gemv_ref(self.x, w)
        self.model = k.default_config(M, N, K)

    def run(self, cfg: dict, i: int) -> torch.Tensor:
        return self.k.launch(self.x, self.w[i % len(self.w)], cfg)

    def run_cublas(self, i: int) -> torch.Tensor:
        return F.linear(self.x, self.w[i % len(self.w)])

    def check(self, cfg: dict) -> float:
        y = self.run(cfg, 0)
        return ((y.float() - self.ref.float()).norm() / self.ref.float().norm()).item()


def sweep_case(case: Case, reps: int, quick: bool) -> dict:
    results = sweep_configs(case, [case.model] + stage1(case.M, quick), stage2, reps, quick)
    return dict(cublas=graph_us(case.run_cublas, case.calls, reps), results=results)


def print_case(case: Case, out: dict, bw: float, show_all: bool, top: int = 8) -> tuple[dict, int]:
    sh, M, cublas = case.shape, case.M, out["cublas"]
    res = sorted(out["results"], key=lambda r: r["us"])
    model = next(r for r in res if _key(r["cfg"]) == _key(case.model))
    best = res[0]
    print(f"\n{sh['preset']} {sh['name']}  M={M}  N={sh['N']} K={sh['K']}  ({case.bytes / 1e6:.2f} MB of weight per "
          f"call; {case.calls} calls per graph)")
    print(f"  {'':6} {'config':<26} {'us/call':>8} {'GB/s':>7} {'of copy':>8} {'vs cuBLAS':>9}  check")

    def line(tag, cfg_s, us, err=None, failed=None):
        if failed:
            print(f"  {tag:6} {cfg_s:<26} {'failed':>8}  {failed}")
            return
        gbs = case.bytes / us / 1e3
        chk = "" if err is None else ("ok" if err < TOL else f"MISMATCH rel err {err:.3g} !!!!!!!!")
        print(f"  {tag:6} {cfg_s:<26} {us:8.2f} {gbs:7.0f} {gbs * 1e9 / bw:7.0%} {cublas / us:8.2f}x  {chk}")

    line("cuBLAS", "F.linear", cublas)
    line("model", cfg_str(model["cfg"]), model["us"], model["err"], model["failed"])
    shown = res if show_all else res[:top]
    for r in shown:
        line("", cfg_str(r["cfg"]), r["us"], r["err"], r["failed"])
    if len(shown) < len(res):
        print(f"  ({len(res) - len(shown)} slower configs not shown; --all shows them)")
    mismatches = [r for r in res if r["failed"] is None and not r["err"] < TOL]
    for r in mismatches:
        print(f"  !!!!!!!! MISMATCH {cfg_str(r['cfg'])}: rel err {r['err']:.3g} (tolerance {TOL})")
    within = model["us"] <= 1.05 * best["us"]
    print(f"  best {cfg_str(best['cfg'])} {best['us']:.2f} us ({cublas / best['us']:.2f}x cuBLAS); model's config "
          f"{model['us'] / best['us']:.2f}x of it ({'within' if within else 'NOT within'} 5%)")
    summary = dict(preset=sh["preset"], name=sh["name"], M=M, N=sh["N"], K=sh["K"], per_step=sh["per_step"],
                   cublas_us=cublas, model_us=model["us"], best_us=best["us"], model=model["cfg"], best=best["cfg"],
                   model_within_5pct=within, bytes=case.bytes, results=res)
    return summary, len(mismatches)


def print_summary(summaries: list[dict]) -> None:
    print("\nSummary (us per call; x = cuBLAS time / this time)")
    print(f"  {'preset':<6} {'shape':<22} {'M':>2} {'cuBLAS':>7} {'model':>7} {'best':>7} {'model x':>7} "
          f"{'best x':>7}  {'model~best':<10} best config")
    for s in summaries:
        print(f"  {s['preset']:<6} {s['name']:<22} {s['M']:>2} {s['cublas_us']:7.2f} {s['model_us']:7.2f} "
              f"{s['best_us']:7.2f} {s['cublas_us'] / s['model_us']:6.2f}x {s['cublas_us'] / s['best_us']:6.2f}x  "
              f"{'yes' if s['model_within_5pct'] else 'NO':<10} {cfg_str(s['best'])}")
    for p in dict.fromkeys(s["preset"] for s in summaries):
        for M in sorted({s["M"] for s in summaries if s["preset"] == p}):
            rows = [s for s in summaries if s["preset"] == p and s["M"] == M and s["per_step"]]
            if rows:
                tot = {k: sum(s["per_step"] * s[k] for s in rows) for k in ("cublas_us", "model_us", "best_us")}
                print(f"  {p} per token step at M = {M} ({sum(s['per_step'] for s in rows)} calls of these linears): "
                      f"cuBLAS {tot['cublas_us']:.0f} us, GEMV as the model runs it {tot['model_us']:.0f} us, best "
                      f"per shape {tot['best_us']:.0f} us")
    tuned = {}
    for s in summaries:
        if not s["model_within_5pct"] and s["best_us"] < s["cublas_us"]:
            tuned[(s["best"]["BM"], s["N"], s["K"])] = s["best"]
    if tuned:
        print("\nTUNED entries for dsv3/kernels/dense_gemv_triton.py (best config > 5% faster than the model's):")
        for key, cfg in sorted(tuned.items()):
            print(f"    {key}: {dict(cfg)},")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="16b", help="comma list of model presets whose shapes to run (16b, small)")
    ap.add_argument("--rows", default="1,2,4", help="comma list of row counts M (decode batch x tokens)")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep, fewer calls and replays")
    ap.add_argument("--list", action="store_true", help="print the shapes and the configs, time nothing")
    ap.add_argument("--only", default=None, help="only shapes whose name contains this")
    ap.add_argument("--all", action="store_true", help="print every config of the sweep, not the fastest 8")
    ap.add_argument("--calls", type=int, default=None, help="calls per CUDA graph (64; --quick 32)")
    ap.add_argument("--reps", type=int, default=None, help="graph replays timed (7; --quick 5)")
    ap.add_argument("--json", default=None, help="write every measurement to this file")
    args = ap.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    if not all(1 <= r <= 4 for r in args.rows):
        ap.error("--rows: decode row counts 1..4 (the GEMV's tiles hold at most 4 rows)")
    args.calls = args.calls or (32 if args.quick else 64)
    args.reps = args.reps or (5 if args.quick else 7)
    return args


def cases(args) -> list[tuple[dict, int]]:
    return [(sh, M) for p in args.presets.split(",") for sh in shapes(p)
            if not args.only or args.only in sh["name"] for M in args.rows]


def list_cases(args) -> None:
    """--list: the shapes, and (where triton imports) the model's config and the stage-1 grid size of each."""
    try:
        from dsv3.kernels import dense_gemv_triton as k
    except ImportError:
        k = None
    for sh, M in cases(args):
        cfg = f"model {cfg_str(k.default_config(M, sh['N'], sh['K']))}" if k else "model config: needs triton"
        print(f"{sh['preset']:<6} {sh['name']:<22} M={M} N={sh['N']:<6} K={sh['K']:<6} per step {sh['per_step']:>3}  "
              f"{cfg}; stage 1: {len(stage1(M, args.quick))} configs")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_cases(args)
        return 0
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/dense_gemv_sweep.py times Triton kernels in CUDA graphs: it needs a CUDA GPU "
                 "(--list works anywhere)")
    return drive(cases(args), Case, sweep_case, print_case, print_summary, device=DEVICE, calls=args.calls,
                 reps=args.reps, quick=args.quick, show_all=args.all, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
