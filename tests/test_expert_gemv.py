"""The routed experts' decode GEMV (dsv3/kernels/expert_gemv_triton.py, `kernels.expert_gemv`) and the
`Experts.forward_gemv` path that uses it.

CPU (always): the reference equals the per-expert loop on bf16 and FP8 experts, and `forward_gemv` equals
`forward_loop`; the path is taken only where it should be. Triton interpreter (TRITON_INTERPRET=1 python -m
pytest tests/test_expert_gemv.py): the kernel against the reference, bf16/fp16 and e4m3 weights, fused
SwiGLU or not, partial blocks, rows with expert -1, every BN; the custom ops compile with fullgraph=True.
GPU: tests/test_gpu.py (the kernel at the 16b shapes, and a bf16 model's decode through it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3 import kernels
from dsv3.kernels.reference import check_expert_gemv_args, expert_gemv_ref, weight_dequant, weight_quant
from dsv3.model.moe import Experts
from tests.conftest import random_experts
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _quant_stack(w):
    qs = [weight_quant(w_e) for w_e in w]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _loop_rows(x, w, s, expert, x_div, up=None, up_s=None):
    """Row by row with F.linear on the dequantised weight (an independent statement of the contract)."""
    rows = []
    for m, e in enumerate(expert.tolist()):
        if e < 0:
            rows.append(torch.zeros(w.shape[1]))
            continue
        xm = x[m // x_div].float()

        def wd(w, s):
            return weight_dequant(w[e], s[e], torch.float32) if s is not None else w[e].float()

        y = F.linear(xm, wd(w, s))
        rows.append(F.silu(y) * F.linear(xm, wd(up, up_s)) if up is not None else y)
    return torch.stack(rows).to(x.dtype)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_reference_matches_row_loop(fp8, fused):
    g = torch.Generator().manual_seed(0)
    E, N, K, T, x_div = 3, 200, 136, 2, 3  # partial 128-blocks in N and K
    w, u = torch.randn(E, N, K, generator=g), torch.randn(E, N, K, generator=g)
    s = us = None
    if fp8:
        (w, s), (u, us) = _quant_stack(w), _quant_stack(u)
    x = torch.randn(T, K, generator=g)
    expert = torch.tensor([2, 0, -1, 1, 2, 0])
    args = (u, us) if fused else (None, None)
    got = expert_gemv_ref(x, w, s, expert, x_div, *args)
    assert got.shape == (6, N) and torch.equal(got[2], torch.zeros(N))
    assert _rel(got, _loop_rows(x, w, s, expert, x_div, *args)) < 1e-5


@pytest.mark.parametrize("fp8", [False, True])
def test_forward_gemv_equals_loop(fp8):
    m, cfg = random_experts(fp8)
    g = torch.Generator().manual_seed(2)
    N, K = 2, cfg.num_experts_per_tok
    x = torch.randn(N, cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    assert _rel(m.forward_gemv(x, idx, w), m.forward_loop(x, idx, w)) < 1e-5


def test_gemv_path_only_for_decode_sized_gpu_calls(monkeypatch):
    m, cfg = random_experts(False, torch.bfloat16)
    m.requires_grad_(False)  # inference (trainable weights: the next test)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(E // K, cfg.hidden_size, dtype=torch.bfloat16)
    idx = torch.zeros(E // K, K, dtype=torch.long)
    assert not m._gemv_fits(x, idx)  # the CPU: the reference backend, the grouped path
    monkeypatch.setattr(kernels, "select_backend", lambda op, *t, **kw: "triton")
    assert m._gemv_fits(x, idx)  # N*K <= E rows
    assert not m._gemv_fits(torch.cat([x, x]), torch.cat([idx, idx]))  # more rows than experts
    assert not m._gemv_fits(x.float(), idx)  # weights in another dtype than x
    f8, _ = random_experts(True)
    assert f8._gemv_fits(x, idx)  # e4m3 weights take any 16-bit x
    called = []
    monkeypatch.setattr(Experts, "forward_gemv", lambda self, *a: called.append(a) or a[0])
    monkeypatch.setattr(Experts, "_impl", staticmethod(lambda x, impl: "grouped"))
    m(x, idx, torch.ones(E // K, K))
    assert len(called) == 1
    m(x, idx, torch.ones(E // K, K), impl="grouped")  # an explicit impl is obeyed: no GEMV path
    assert len(called) == 1


@interp
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("BN,KU,prefetch", [(16, 2, True), (32, 1, False), (64, 2, False), (8, 1, True)])
def test_interp_kernel_vs_reference(fp8, fused, BN, KU, prefetch):
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator().manual_seed(3)
    E, N, K, T, x_div = 3, 200, 264, 3, 2  # N, K not multiples of 128 (nor of BN)
    w, u = torch.randn(E, N, K, generator=g), torch.randn(E, N, K, generator=g)
    s = us = None
    if fp8:
        (w, s), (u, us) = _quant_stack(w), _quant_stack(u)
    else:
        w, u = w.half(), u.half()  # (the interpreter has no bf16: numpy lacks it)
    x = torch.randn(T, K, generator=g).half()
    expert = torch.tensor([2, -1, 0, 1, 2, -1])
    args = (u, us) if fused else (None, None)
    got = k.launch(x, w, s, expert, x_div, *args, BN=BN, KU=KU, PREFETCH=prefetch)
    want = expert_gemv_ref(x, w, s, expert, x_div, *args)
    assert got.dtype == torch.float16 and torch.equal(got[1], torch.zeros(N)) and torch.equal(got[5], got[1])
    assert _rel(got, want) < 2e-3, _rel(got, want)  # fp16 output rounding


@interp
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("BN,KU,prefetch", [(16, 2, True), (32, 1, False), (8, 4, False), (8, 16, False)])
def test_interp_psum_vs_reference(fp8, BN, KU, prefetch):
    """PSUM (_dot_part: each thread's 16-byte group of a row summed, then scaled once): the plain and the fused
    launch against the reference; ragged N and K, a foreign row (0), KU blocks past K (the last load masked)."""
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator().manual_seed(7 + BN)
    E, N, K, T, x_div = 3, 200, 264, 3, 2
    w, u = torch.randn(E, N, K, generator=g), torch.randn(E, N, K, generator=g)
    s = us = None
    if fp8:
        (w, s), (u, us) = _quant_stack(w), _quant_stack(u)
    else:
        w, u = w.half(), u.half()  # G = 8 fp16 columns a group
    x = torch.randn(T, K, generator=g).half()
    expert = torch.tensor([2, -1, 0, 1, 2, 1])
    for args in ((None, None), (u, us)):
        got = k.launch(x, w, s, expert, x_div, *args, BN=BN, KU=KU, PREFETCH=prefetch, PSUM=True)
        want = expert_gemv_ref(x, w, s, expert, x_div, *args)
        assert torch.equal(got[1], torch.zeros(N)) and _rel(got, want) < 2e-3, _rel(got, want)


def test_fp8_default_config():
    """e4m3: PSUM: FP8_TUNED at the measured 16b shapes, else FP8_RULE (KU 4), the prefetch at one row only (measured
    on an H100, default_config's docstring). bf16 keeps its H200 config whatever the shape, without PSUM."""
    k = pytest.importorskip("dsv3.kernels.expert_gemv_triton")
    assert k.default_config(True, 6, 1408) == {"BN": 16, "KU": 4, "num_warps": 4, "PREFETCH": False, "PSUM": True}
    assert k.default_config(True, 6, 2048) == {"BN": 8, "KU": 4, "num_warps": 8, "PREFETCH": False, "PSUM": True}
    assert k.default_config(True, 1, 2816) == {"BN": 8, "KU": 4, "num_warps": 8, "PREFETCH": True, "PSUM": True}
    # 8 rows (6 routed + 2 shared, batch 1's shipped e4m3 launches): the 8-row sweep's best
    assert k.default_config(True, 8, 1408) == {"BN": 8, "KU": 2, "num_warps": 4, "PREFETCH": False, "PSUM": True}
    assert k.default_config(True, 8, 2048) == {"BN": 32, "KU": 4, "num_warps": 8, "PREFETCH": False, "PSUM": True}
    for M in (1, 2, 6, 8, 48):
        for N in (512, 1408, 2048, 2816, 7168, 18432):
            cfg = k.default_config(True, M, N)
            assert cfg["PSUM"] and cfg["KU"] in (2, 4) and k.BLOCK % cfg["BN"] == 0
            assert cfg["KU"] == 4 or (M, N) in k.FP8_TUNED
    assert k.default_config(False, 1, 2816) == k.default_config(False, 48, 1408) == \
        {"BN": 8, "KU": 1, "num_warps": 4, "PREFETCH": True}
    assert k.GEMV_PSUM is False  # bf16 (where a config does not say): measured slower with it


@interp
@pytest.mark.parametrize("M", [1, 6])
def test_interp_fp8_default_config_vs_reference(M):
    """The e4m3 launch with its default config (KU 4: of 6 K blocks the second load holds one partial block and two
    past K), at one row with the prefetch, at six without."""
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator().manual_seed(5)
    E, N, K = 4, 300, 5 * 128 + 40  # 6 K blocks, the last partial; N not a multiple of any BN
    (w, s), (u, us) = _quant_stack(torch.randn(E, N, K, generator=g)), _quant_stack(torch.randn(E, N, K, generator=g))
    x = torch.randn(M, K, generator=g).half()
    expert = torch.tensor([E - 1, 0, 2, 1, -1, E - 1][:M])
    assert k.default_config(True, M, N)["KU"] == 4 and k.default_config(True, M, N)["PREFETCH"] == (M == 1)
    for args in ((None, None), (u, us)):
        got = k.launch(x, w, s, expert, 1, *args)
        assert _rel(got, expert_gemv_ref(x, w, s, expert, 1, *args)) < 2e-3


@interp
def test_interp_custom_ops_compile_without_graph_break():
    from dsv3.kernels import expert_gemv_triton as k

    g = torch.Generator().manual_seed(4)
    (w, s), (u, us) = _quant_stack(torch.randn(2, 96, 128, generator=g)), _quant_stack(torch.randn(2, 96, 128,
                                                                                                  generator=g))
    d, ds = _quant_stack(torch.randn(2, 128, 96, generator=g))
    x, expert = torch.randn(2, 128, generator=g).half(), torch.tensor([1, 0, 0, 1])
    assert isinstance(k.expert_swiglu_gemv_op, torch._library.custom_ops.CustomOpDef)

    def f(x):
        h = kernels.expert_gemv(x, w, s, expert, 2, up=u, up_s=us, backend="triton")
        return kernels.expert_gemv(h, d, ds, expert, 1, backend="triton")

    want = expert_gemv_ref(expert_gemv_ref(x, w, s, expert, 2, u, us), d, ds, expert, 1)
    for got in (f(x), torch.compile(f, backend="aot_eager", fullgraph=True)(x)):
        assert _rel(got, want) < 3e-3


def test_bad_arguments():
    """The contract is checked before either backend runs (kernels.expert_gemv; the Triton launch too)."""
    x, e = torch.randn(2, 128, dtype=torch.bfloat16), torch.tensor([0, 1])

    def call(x, w, s=None, up=None, up_s=None):
        kernels.expert_gemv(x, w, s, e, 1, up=up, up_s=up_s, backend="reference")

    with pytest.raises(TypeError, match="bf16/fp16 activations"):  # the kernel's (the reference takes fp32)
        check_expert_gemv_args(x.float(), torch.randn(2, 4, 128), None, kernel=True)
    call(x.float(), torch.randn(2, 4, 128))
    with pytest.raises(TypeError, match="block scales"):
        call(x, torch.zeros(2, 4, 128, dtype=torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="x's dtype"):
        call(x, torch.randn(2, 4, 128))
    with pytest.raises(ValueError, match="K = 128"):
        call(x, torch.randn(2, 4, 64, dtype=torch.bfloat16))
    q, s = _quant_stack(torch.randn(2, 128, 128))
    with pytest.raises(ValueError, match="stored alike"):  # e4m3 gate, bf16 up
        call(x, q, s, torch.randn(2, 128, 128, dtype=torch.bfloat16), None)


def test_gemv_path_not_where_expert_weights_need_gradients(monkeypatch):
    """The kernel has no backward: with trainable expert weights (grad enabled) the grouped path runs even if x
    needs no gradient (a fine-tune with everything before the experts frozen)."""
    m, cfg = random_experts(False, torch.bfloat16)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(1, cfg.hidden_size, dtype=torch.bfloat16)
    idx = torch.zeros(1, K, dtype=torch.long)
    monkeypatch.setattr(kernels, "select_backend", lambda op, *t, **kw: "triton")
    assert m.gate_proj.requires_grad and not m._gemv_fits(x, idx)
    with torch.no_grad():
        assert m._gemv_fits(x, idx)
    m.requires_grad_(False)
    assert m._gemv_fits(x, idx)
