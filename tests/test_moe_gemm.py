"""The routed experts' grouped decode GEMM (dsv3/kernels/moe_gemm_triton.py, `kernels.moe_gemm_swiglu` /
`kernels.moe_gemm_down`) and `Experts.forward_moe_gemm`.

    python -m pytest -q tests/test_moe_gemm.py                      (CPU, CI: no triton needed)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_moe_gemm.py   (+ the kernel, interpreted)

CPU: the reference against a per-row statement of the contract (x_rows, y_rows, experts without rows, rows past
the last expert); forward_moe_gemm equals the per-expert loop (bf16 and FP8 experts); the argument contract; the
switch (on by default, e4m3 weights too) and Experts.forward takes the path only between the per-row GEMV and
prefill sizes and never where the expert weights need gradients. Triton interpreter: the kernel against the reference (fp16 and
e4m3 weights, fused SwiGLU or not, ragged N and K, 16/32/64-row tiles, several tiles for one expert, empty
experts, foreign rows left alone); the custom ops compiled; Experts.forward through the kernels. GPU:
tests/test_gpu_moe_gemm.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import moe_gemm_ref, weight_dequant, weight_quant
from dsv3.model.moe import Experts
from tests.conftest import random_experts
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _stack(E, N, K, g, fp8):
    w = torch.randn(E, N, K, generator=g) * 0.1
    if not fp8:
        return w, None
    qs = [weight_quant(w_e) for w_e in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _case(E=4, N=200, K=136, T=5, counts=(3, 0, 6, 2), extra=0, fp8=False, seed=0, dtype=torch.float32):
    """x (T, K); w, up (E, N, K) (e4m3 + scales with fp8); pairs sorted by expert with `counts` rows each, plus
    `extra` foreign rows past offs[-1]; x_rows (a token per sorted row), y_rows (a permutation)."""
    g = torch.Generator().manual_seed(seed)
    w, s = _stack(E, N, K, g, fp8)
    u, us = _stack(E, N, K, g, fp8)
    x = torch.randn(T, K, generator=g).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    M = int(offs[-1]) + extra
    x_rows = torch.randint(0, T, (M,), generator=g)
    y_rows = torch.randperm(M, generator=g)
    return x, w, s, u, us, offs, M, x_rows, y_rows


def _per_row(x, w, s, offs, M, x_rows, y_rows, up=None, up_s=None):
    """Row by row with F.linear on the dequantised weights: an independent statement of the contract."""
    out = torch.zeros(M, w.shape[1])
    for m in range(M):
        e = int((offs <= m).sum())
        if e >= w.shape[0]:
            continue
        xm = x[x_rows[m] if x_rows is not None else m].float()

        def wd(w, s):
            return weight_dequant(w[e], s[e], torch.float32) if s is not None else w[e].float()

        y = F.linear(xm, wd(w, s))
        out[y_rows[m] if y_rows is not None else m] = F.silu(y) * F.linear(xm, wd(up, up_s)) if up is not None else y
    return out.to(x.dtype)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_reference_matches_per_row(fp8, fused):
    x, w, s, u, us, offs, M, x_rows, y_rows = _case(fp8=fp8, extra=2)
    up = (u, us) if fused else (None, None)
    for xr, yr in ((x_rows, None), (None, y_rows), (x_rows, y_rows)):
        xx = x if xr is not None else torch.randn(M, x.shape[1])
        got = moe_gemm_ref(xx, w, s, offs, M, x_rows=xr, y_rows=yr, up=up[0], up_s=up[1])
        want = _per_row(xx, w, s, offs, M, xr, yr, *up)
        assert got.shape == (M, w.shape[1]) and _rel(got, want) < 1e-5


def _routing(cfg, N, seed=2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                       for _ in range(N)])
    return idx, torch.rand(N, cfg.num_experts_per_tok, generator=g), g


@pytest.mark.parametrize("fp8", [False, True])
def test_forward_moe_gemm_equals_loop(fp8):
    m, cfg = random_experts(fp8)
    idx, w, g = _routing(cfg, 9)  # 36 pairs over 16 experts: several rows for most experts, none for some
    x = torch.randn(9, cfg.hidden_size, generator=g)
    assert _rel(m.forward_moe_gemm(x, idx, w), m.forward_loop(x, idx, w)) < 1e-5


def test_contract():
    x, w, s, u, us, offs, M, x_rows, y_rows = _case()
    with pytest.raises(ValueError, match="offs"):
        kernels.moe_gemm_swiglu(x, w, s, u, us, offs[:3], x_rows)
    with pytest.raises(ValueError, match="x_rows"):
        kernels.moe_gemm_swiglu(x, w, s, u, us, offs, x_rows.float())
    with pytest.raises(ValueError, match="y_rows"):
        kernels.moe_gemm_down(torch.randn(M, 136), w, s, offs, y_rows[:-1])
    with pytest.raises(TypeError):
        kernels.moe_gemm_swiglu(x, w, s, u.half(), us, offs, x_rows)


def test_switch_and_where_experts_take_the_path(monkeypatch):
    m, cfg = random_experts(False, torch.bfloat16)
    m.requires_grad_(False)
    K = cfg.num_experts_per_tok
    # bf16 1.38x at batch 32 on the H200, e4m3 2.07x on an H100 (backend.py SWITCHED)
    assert kb.SWITCHED["moe_gemm"] is True
    x = torch.randn(8, cfg.hidden_size, dtype=torch.bfloat16)
    idx = torch.zeros(8, K, dtype=torch.long)
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: True)  # every rule holds (as on a GPU)
    m8, _ = random_experts(True)
    m8.requires_grad_(False)
    assert m._moe_gemm_fits(x, idx) and m8._moe_gemm_fits(x, idx)  # every weight dtype by default
    old = kernels.set_moe_gemm(False)
    try:
        assert not m._moe_gemm_fits(x, idx)  # switched off
        kernels.set_moe_gemm(kb.WEIGHTS_16BIT)
        assert m._moe_gemm_fits(x, idx) and not m8._moe_gemm_fits(x, idx)  # 16-bit weights only
    finally:
        kernels.set_moe_gemm(old)
    calls = []
    for name in ("forward_gemv", "forward_moe_gemm", "forward_grouped"):
        monkeypatch.setattr(Experts, name, lambda self, *a, _n=name: calls.append(_n))
    monkeypatch.setattr(Experts, "_impl", staticmethod(lambda x, impl: "grouped"))
    old = kernels.set_moe_gemm(True)
    try:
        assert m._moe_gemm_fits(x, idx)
        m(x[:2], idx[:2], None)  # 8 pairs <= 16 experts: the per-row GEMV
        m(x, idx, None)  # 32 pairs: the grouped decode GEMM
        big = kernels.backend.MOE_GEMM_ROWS // K + 1
        m(torch.randn(big, cfg.hidden_size, dtype=torch.bfloat16), torch.zeros(big, K, dtype=torch.long), None)
        assert calls == ["forward_gemv", "forward_moe_gemm", "forward_grouped"]
        m.requires_grad_(True)
        assert not m._moe_gemm_fits(x, idx)  # trainable expert weights with grad enabled: the grouped GEMM
    finally:
        kernels.set_moe_gemm(old)


# --- the kernel under the Triton interpreter -----------------------------------------------------------------

@interp
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("BM", [16, 32, 64])
def test_interp_kernel_vs_reference(fp8, fused, BM):
    from dsv3.kernels import moe_gemm_triton as k

    # expert 2 owns 40 rows (several 16-row tiles), expert 1 none; 3 foreign rows past offs[-1]
    x, w, s, u, us, offs, M, x_rows, y_rows = _case(E=4, N=200, K=200, T=7, counts=(3, 0, 40, 2), extra=3, fp8=fp8,
                                                    seed=BM, dtype=torch.float16)
    w, u = (w, u) if fp8 else (w.half(), u.half())
    up = dict(up=u, up_s=us) if fused else {}
    owned = torch.arange(M) < int(offs[-1])
    for xr, yr in ((x_rows, None), (None, y_rows), (x_rows, y_rows)):
        xx = x if xr is not None else torch.randn(M, 200).half()
        sentinel = torch.full((M, 200), 7.0).half()
        got = k.launch(xx, w, s, offs, M, x_rows=xr, y_rows=yr, BM=BM, out=sentinel.clone(), **up)
        want = moe_gemm_ref(xx, w, s, offs, M, x_rows=xr, y_rows=yr, **up)
        rows = yr[owned] if yr is not None else torch.arange(M)[owned]
        assert _rel(got[rows], want[rows]) < 3e-3, (xr is None, _rel(got[rows], want[rows]))
        foreign = yr[~owned] if yr is not None else torch.arange(M)[~owned]  # the foreign rows: not written
        assert torch.equal(got[foreign], sentinel[foreign])


@interp
def test_interp_ops_compile_and_experts_through_them(monkeypatch):
    from dsv3.kernels import moe_gemm_triton as k

    x, w, s, u, us, offs, M, x_rows, y_rows = _case(dtype=torch.float16)
    w, u = w.half(), u.half()
    assert isinstance(k.moe_gemm_swiglu_op, torch._library.custom_ops.CustomOpDef)

    def f(x):
        h = kernels.moe_gemm_swiglu(x, w, s, u, us, offs, x_rows, backend="triton")
        return kernels.moe_gemm_down(h, w.transpose(1, 2).contiguous()[:, :, :200], None, offs, y_rows,
                                     backend="triton")

    def ref(x):
        h = moe_gemm_ref(x, w, s, offs, M, x_rows=x_rows, up=u, up_s=us)
        return moe_gemm_ref(h, w.transpose(1, 2).contiguous()[:, :, :200], None, offs, M, y_rows=y_rows)

    for got in (f(x), torch.compile(f, backend="aot_eager", fullgraph=True)(x)):
        assert got.shape == (M, 136) and _rel(got, ref(x)) < 3e-3
    # Experts.forward through the two kernels (forced; fp16 experts and FP8 experts) against the per-expert loop
    monkeypatch.setattr(Experts, "_impl", staticmethod(lambda x, impl: "grouped"))
    for fp8 in (False, True):
        m, cfg = random_experts(fp8, torch.float16)
        m.requires_grad_(False)
        idx, wt, g = _routing(cfg, 9, seed=3)
        xe = torch.randn(9, cfg.hidden_size, generator=g).half()
        with kernels.use_backend(moe_gemm="triton", expert_gemv="reference"):
            got = m(xe, idx, wt)
        assert _rel(got, m.forward_loop(xe, idx, wt)) < 5e-3, fp8


def _partials_match(monkeypatch, fp8: bool):
    """Expert-parallel decode (`forward_partial`) through the grouped decode GEMM: the partials of contiguous
    expert slices add up to the whole module's per-expert loop, and a slice with none of the selected experts
    gives exactly 0 (the foreign pairs' rows are never written; `where` drops whatever they hold)."""
    from tests.test_moe import _experts as dense_experts
    from tests.test_moe import _slice

    from dsv3.model.fp8 import swap_to_fp8

    calls = []
    orig = kernels.moe_gemm_down
    monkeypatch.setattr(kernels, "moe_gemm_down", lambda *a, **k: calls.append(1) or orig(*a, **k))
    monkeypatch.setattr(Experts, "_moe_gemm_fits", lambda self, x, idx: True)
    monkeypatch.setattr(Experts, "_impl", staticmethod(lambda x, impl: "grouped"))
    idx = torch.tensor([[1, 2], [2, 3], [1, 3], [6, 2], [3, 1], [2, 6], [7, 0], [3, 2], [6, 1]])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(idx.shape[0], 16, generator=g)
    w = torch.rand(idx.shape, generator=g)
    full = dense_experts(8)
    if fp8:
        holder = torch.nn.ModuleDict({"e": full})
        swap_to_fp8(holder, ["e.gate_proj", "e.up_proj", "e.down_proj"], quantize=True)
        full = holder["e"]
    return full, x, idx, w, calls, _slice


@pytest.mark.parametrize("fp8", [False, True])
def test_forward_partial_through_the_grouped_decode_gemm(monkeypatch, fp8):
    full, x, idx, w, calls, _slice = _partials_match(monkeypatch, fp8)
    with torch.no_grad():
        ref = full.forward_loop(x, idx, w, out_dtype=torch.float32)
        for bounds in ([0, 4, 8], [0, 3, 8]):
            total = sum(_slice(full, lo, hi).forward_partial(x, idx - lo, w) for lo, hi in zip(bounds, bounds[1:]))
            assert torch.allclose(total, ref, atol=1e-5, rtol=1e-5), bounds
        assert torch.equal(_slice(full, 4, 6).forward_partial(x, idx - 4, w), torch.zeros_like(ref))
    assert len(calls) == 5  # every partial took the grouped decode GEMM


@interp
def test_interp_forward_partial_through_the_kernels(monkeypatch):
    full, x, idx, w, calls, _slice = _partials_match(monkeypatch, False)
    full.half()
    x = x.half()
    with torch.no_grad(), kernels.use_backend(moe_gemm="triton"):
        ref = full.forward_loop(x, idx, w, out_dtype=torch.float32)
        total = sum(_slice(full, lo, hi).forward_partial(x, idx - lo, w) for lo, hi in ((0, 3), (3, 8)))
        assert _rel(total, ref) < 3e-3
        assert torch.equal(_slice(full, 4, 6).forward_partial(x, idx - 4, w), torch.zeros_like(ref))
    assert len(calls) == 3
