"""The FP8-weight decode GEMMs' launch configurations (dsv3/kernels/fp8_gemm_triton.py): the heuristics'
choices are valid, and every config they can return (plus a few others the sweep tries) computes
dequantise-then-matmul under the Triton interpreter, on ragged shapes (N and K not multiples of 128,
partial row tiles, several K iterations) and, for the per-row expert kernel, rows with expert -1 that
must come out 0 without reading a weight:

    python -m pytest -q tests/test_fp8_gemv.py                       (the heuristic checks; CPU, < 1 s)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_fp8_gemv.py    (+ the kernels, interpreted)

The same configs on the GPU at 16b decode shapes: tests/test_gpu.py (fp8_configs); their speed:
bench/fp8_gemv_sweep.py."""

from __future__ import annotations

import pytest
import torch

from conftest import bench_module
from test_fp8_experts import interp, numpy24_interpreter  # noqa: F401 (numpy24_interpreter: a fixture)
from dsv3.kernels import weight_dequant, weight_quant
from dsv3.kernels.backend import DENSE_DECODE_ROWS, EXPERT_DECODE_ROWS

fk = pytest.importorskip("dsv3.kernels.fp8_gemm_triton", reason="needs triton")

_NS = (8, 100, 200, 576, 1408, 2048, 2816, 3072, 4096, 10944, 18432)
_KS = (128, 256, 300, 512, 1024, 1408, 2048, 7168, 10944)


def _key(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


def small_m_configs() -> list[dict]:
    """Every config `_config_small_m` returns over decode shapes (M up to DENSE_DECODE_ROWS; N and K from
    tiny to the 671b's widths, which cover each cap of the rules), then a few the sweep also tries."""
    seen = {_key(fk._config_small_m(M, N, K)) for M in range(1, DENSE_DECODE_ROWS + 1) for N in _NS for K in _KS}
    extra = [dict(BM=16, BN=64, KU=1, num_warps=4, num_stages=3),  # the old fixed config
             dict(BM=32, BN=16, KU=4, num_warps=8, num_stages=2), dict(BM=1, BN=64, KU=1, num_warps=2, num_stages=1),
             dict(BM=2, BN=16, KU=8, num_warps=8, num_stages=1), dict(BM=4, BN=16, KU=2, num_warps=8, num_stages=2),
             # PSUM (_gemv_tile's per-group partial sums), with and without the prefetch
             dict(BM=1, BN=8, KU=4, num_warps=4, num_stages=2, PSUM=True),
             dict(BM=4, BN=16, KU=2, num_warps=4, num_stages=1, PSUM=True)]
    return [dict(k) for k in sorted(seen | {_key(c) for c in extra})]


def rows_configs() -> list[dict]:
    seen = {_key(fk._config_rows(M, N, K)) for M in (1, 2, 6, 12, 48, 192, 768, EXPERT_DECODE_ROWS)
            for N in _NS for K in _KS}
    extra = [dict(BN=32, KU=8, num_warps=2, num_stages=1), dict(BN=8, KU=8, num_warps=8, num_stages=2),
             dict(BN=32, KU=2, num_warps=4, num_stages=2, PSUM=True),
             dict(BN=128, KU=2, num_warps=4, num_stages=1)]
    return [dict(k) for k in sorted(seen | {_key(c) for c in extra})]


def config_id(cfg: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in cfg.items())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- the heuristics (plain Python: run everywhere) -------------------------------------------------

def test_small_m_heuristic_configs_are_valid():
    for M in range(1, DENSE_DECODE_ROWS + 1):
        for N in _NS:
            for K in _KS:
                c = fk._config_small_m(M, N, K)
                dot = c["BM"] >= 16
                assert dot == (M > fk.GEMV_ROWS), (M, c)
                assert 128 % c["BN"] == 0 and (not dot or c["BN"] >= 16), c  # one scale row; tl.dot's minimum
                assert c["BM"] >= M if not dot else c["BM"] == 16, (M, c)
                assert 1 <= c["KU"] <= min(8, fk._pow2(-(-K // 128))), (K, c)
                if dot:  # pipelined shared memory: (stages - 1) x KU x (x tile + w tile) bytes, well under 227 KiB
                    smem = (c["num_stages"] - 1) * c["KU"] * (c["BM"] * 128 * 2 + c["BN"] * 128)
                    assert smem <= 96 * 1024, (c, smem)
                else:  # a register tile of at most GEMV_TILE elements
                    assert c["BM"] * c["BN"] * c["KU"] * 128 <= fk.GEMV_TILE, c
                programs = -(-M // c["BM"]) * -(-N // c["BN"])
                # else the smallest BN allowed: 32 for tl.dot (16 measured up to 2x slower on an H200), 8 for GEMVs
                assert programs >= fk.TARGET_PROGRAMS or c["BN"] == (32 if dot else 8), (M, N, c)


def test_heuristics_fill_the_gpu_at_batch_one():
    """The reason for the change: at M = 1 a 2048-wide projection had 32 programs (16x64 tiles) for 132 SMs."""
    c = fk._config_small_m(1, 2048, 2048)
    assert c["BM"] == 1 and 2048 // c["BN"] == 256  # the GEMV form's narrowest tiles
    r = fk._config_rows(6, 1408, 2048)
    assert 6 * (1408 // r["BN"]) >= fk.TARGET_PROGRAMS


def test_rows_heuristic_configs_are_valid():
    for M in (1, 6, 192, EXPERT_DECODE_ROWS):
        for N in _NS:
            for K in _KS:
                c = fk._config_rows(M, N, K)
                assert 128 % c["BN"] == 0 and c["BN"] * c["KU"] * 128 <= fk.GEMV_TILE, c
                assert 1 <= c["KU"] <= min(8, fk._pow2(-(-K // 128))), (K, c)


# --- the kernels under the Triton interpreter -------------------------------------------------------

def _rows_for(BM: int) -> tuple[int, ...]:
    """Row counts that exercise a BM tile: full, partial, and (tl.dot tiles) more than one tile."""
    return {1: (1,), 2: (2,), 4: (3, 4)}.get(BM, (5, BM + 3))


@interp
@pytest.mark.parametrize("cfg", small_m_configs(), ids=config_id)
def test_interp_small_m_config_vs_reference(cfg):
    g = torch.Generator().manual_seed(cfg["BN"] * 10 + cfg["KU"])
    N, K = 200, 1100  # 1.6 N blocks, 8.6 K blocks: partial blocks and more than one K iteration for KU <= 8
    w, s = weight_quant(torch.randn(N, K, generator=g) * 0.05)
    wd = weight_dequant(w, s, dtype=torch.float32)
    for M in _rows_for(cfg["BM"]):
        x = torch.randn(M, K, generator=g).half()  # (the interpreter has no bf16: numpy lacks it)
        y = fk._launch_small_m(x, w, s, **cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        assert rel(y, x.float() @ wd.T) < 2e-3, (M, rel(y, x.float() @ wd.T))  # fp16 output rounding


@interp
@pytest.mark.parametrize("cfg", rows_configs(), ids=config_id)
def test_interp_rows_config_vs_reference_and_skips_foreign_rows(cfg):
    """Expert 0 holds NaN weights and scales and no row routes to it: rows with expert -1 (which the kernel
    clamps to expert 0 for its pointers) come out exactly 0 only if they read nothing."""
    g = torch.Generator().manual_seed(cfg["BN"] + cfg["KU"])
    N, K = 200, 1100
    qs = [weight_quant(torch.randn(N, K, generator=g) * 0.05) for _ in range(3)]
    w, s = torch.stack([q for q, _ in qs]), torch.stack([t for _, t in qs])
    w.view(torch.uint8)[0], s[0] = 0x7F, float("nan")  # e4m3 NaN
    expert = torch.tensor([2, -1, 1, 1, -1, 2, 1])
    x = torch.randn(len(expert), K, generator=g).half()
    y = fk._launch_rows(x, w, s, expert, **cfg)
    foreign = expert < 0
    assert y.shape == (len(expert), N) and torch.equal(y[foreign], torch.zeros_like(y[foreign]))
    ref = torch.stack([x[m].float() @ weight_dequant(w[e], s[e], dtype=torch.float32).T
                       for m, e in enumerate(expert.tolist()) if e >= 0])
    assert rel(y[~foreign], ref) < 2e-3, rel(y[~foreign], ref)


# --- bench/fp8_gemv_sweep.py's plumbing, interpreted on the CPU ---------------------------------------------

def _sweep_bench(monkeypatch):
    """The bench module on tiny shapes on the CPU (conftest.sweep_on_cpu): interpreted kernels."""
    from conftest import sweep_on_cpu

    bench = bench_module("fp8_gemv_sweep")
    sweep_on_cpu(monkeypatch, bench)
    monkeypatch.setattr(bench, "shapes_16b", lambda: [
        dict(name="lin", kind="linear", N=200, K=300, per_step=2, E=0, top_k=0),
        dict(name="rows", kind="rows", N=72, K=320, per_step=1, E=3, top_k=1)])  # torch._grouped_mm: 16-byte rows
    return bench


@interp
def test_interp_sweep_bench_runs_and_reports(monkeypatch, tmp_path, capsys):
    import json
    import sys

    bench = _sweep_bench(monkeypatch)
    argv = ["fp8_gemv_sweep.py", "--quick", "--calls", "2", "--json", str(tmp_path / "r.json")]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "failed" not in out and "per decode step at batch 32" in out
    shapes = json.load(open(tmp_path / "r.json"))["shapes"]
    assert [(s["name"], s["M"]) for s in shapes] == [("lin", 1), ("lin", 32), ("rows", 1), ("rows", 32)]
    for s in shapes:
        assert all(r["err"] < bench.TOL for r in s["results"]), s["name"]
        heur = fk._config_small_m(s["M"], 200, 300) if s["name"] == "lin" else fk._config_rows(s["M"], 72, 320)
        assert s["heur"] == heur


@interp
def test_interp_sweep_bench_flags_a_wrong_kernel(monkeypatch, capsys):
    import sys

    bench = _sweep_bench(monkeypatch)
    launch = fk._launch_rows
    monkeypatch.setattr(fk, "_launch_rows", lambda *a, **cfg: launch(*a, **cfg) * (1.1 if cfg["BN"] == 16 else 1.0))
    monkeypatch.setattr(bench, "stage1", lambda shape, M, quick: [dict(BN=16, KU=1, num_warps=4, num_stages=1)])
    monkeypatch.setattr(sys, "argv", ["fp8_gemv_sweep.py", "--quick", "--calls", "2", "--only", "rows"])
    assert bench.main() == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "0 mismatching" not in out
