"""The dense decode GEMV (dsv3/kernels/dense_gemv_triton.py) on a GPU against its reference at the 16b model's
shapes, the model's Linear taking it when switched on, and a bf16 model's graphed (and compiled) decode step
with the switch on against the same step with it off. Run on the device machine:

    python -m pytest tests/test_gpu_dense_gemv.py -m gpu -q
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import bench_module
from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import dense_gemv_ref
from dsv3.model.layers import Linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# the 16b model's dense decode linears (q_proj, kv_a, o_proj, shared gate/up and down, dense FFN), ragged ones
SHAPES = [(3072, 2048), (576, 2048), (2048, 2048), (2816, 2048), (2048, 2816), (10944, 2048), (2048, 10944),
          (200, 130), (70, 1100)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def switched_on():
    old = kernels.set_dense_gemv(True)
    yield
    kernels.set_dense_gemv(old)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_kernel_vs_reference(M, N, K):
    g = torch.Generator(device="cuda").manual_seed(M + N + K)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.05).bfloat16()
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    y = kernels.dense_gemv(x, w, backend="triton")
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert _rel(y, dense_gemv_ref(x, w)) < 1e-2, _rel(y, dense_gemv_ref(x, w))  # bf16 output rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes_and_the_sweeps_configs(dtype):
    """fp16 / fp32 weights, and every config of the sweep's stage-1 grid (bench/dense_gemv_sweep.py) on a ragged
    shape (bf16): none may be wrong, whichever the sweep ends up choosing."""
    from dsv3.kernels import dense_gemv_triton as k

    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(300, 1100, device="cuda", generator=g) * 0.05).to(dtype)
    x = torch.randn(3, 1100, device="cuda", generator=g).to(dtype)
    assert _rel(k.launch(x, w), dense_gemv_ref(x, w)) < (2e-3 if dtype == torch.float16 else 1e-5)
    bench = bench_module("dense_gemv_sweep")
    wb = w.bfloat16()
    for M in (1, 2, 4):
        xb = torch.randn(M, 1100, device="cuda", generator=g).bfloat16()
        for cfg in bench.stage1(M, quick=False):
            assert _rel(k.launch(xb, wb, cfg), dense_gemv_ref(xb, wb)) < 1e-2, cfg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_psum_vs_reference(dtype):
    """PSUM (fp8_gemm_triton._gemv_tile's per-group partial sums) at the 16b one-row shapes and a ragged one: dense
    bf16 / fp32 weights (groups of 8 / 4 columns) through the dense GEMV and its dual launch, e4m3 with block scales
    through the FP8 GEMV form, with and without the prefetch, at 4 and 8 warps."""
    from dsv3.kernels import dense_gemv_triton as k
    from dsv3.kernels import fp8_gemm_triton as fk
    from dsv3.kernels.reference import fp8_weight_linear_ref, weight_quant

    g = torch.Generator(device="cuda").manual_seed(11)
    for N, K in ((2048, 2048), (2048, 2816), (576, 2048), (300, 1100)):
        for M in (1, 3):
            x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
            w = torch.randn(N, K, device="cuda", generator=g) * 0.05
            for bn, ku, warps, st in ((8, 4, 4, 2), (16, 8, 8, 1), (32, 4, 8, 2)):
                cfg = dict(BM=4 if M == 3 else 1, BN=bn, KU=ku, num_warps=warps, num_stages=st, PSUM=True)
                if dtype == torch.float8_e4m3fn:
                    q, sc = weight_quant(w)
                    y, ref = fk._launch_small_m(x, q, sc, **cfg), fp8_weight_linear_ref(x, q, sc)
                    y2, _ = k.launch_dual(x, q, q[:40], cfg, s1=sc, s2=sc[:1])
                else:
                    xd, wd = x.to(dtype), w.to(dtype)
                    y, ref = k.launch(xd, wd, cfg), dense_gemv_ref(xd, wd)
                    y2, _ = k.launch_dual(xd, wd, wd[:40], cfg)
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                assert _rel(y, ref) < tol and _rel(y2, ref) < tol, (N, K, M, cfg, _rel(y, ref), _rel(y2, ref))


def test_linear_takes_the_kernel_when_switched_on(switched_on, monkeypatch):
    from dsv3.kernels import dense_gemv_triton as k

    launches, launch = [], k.launch
    monkeypatch.setattr(k, "launch", lambda x, w, config=None, out_dtype=None: launches.append(x.shape)
                        or launch(x, w, config, out_dtype))
    lin = Linear(2048, 3072, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
        assert launches == [(1, 2048)] and y.shape == (1, 1, 3072)
        assert _rel(y, F.linear(x, lin.weight)) < 1e-2
        lin(torch.randn(5, 2048, device="cuda", dtype=torch.bfloat16))  # 5 rows: cuBLAS
    lin(x)  # a trainable weight with grad enabled: cuBLAS
    assert len(launches) == 1


@pytest.mark.parametrize("N1,N2,K", [(3072, 576, 2048), (1536, 576, 7168), (384, 288, 1024), (70, 24, 300)])
@pytest.mark.parametrize("M", [1, 2, 4])
def test_dual_launch_vs_reference(M, N1, N2, K):
    """MLA's q_proj (16b) / q_a_proj (671b, small) and kv_a_proj_with_mqa of one input in one launch."""
    from dsv3.kernels import dense_gemv_triton as k

    g = torch.Generator(device="cuda").manual_seed(M + N1)
    w1, w2 = ((torch.randn(N, K, device="cuda", generator=g) * 0.05).bfloat16() for N in (N1, N2))
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    y1, y2 = k.launch_dual(x, w1, w2)
    assert _rel(y1, dense_gemv_ref(x, w1)) < 1e-2 and _rel(y2, dense_gemv_ref(x, w2)) < 1e-2


@pytest.mark.parametrize("N1,N2,K", [(3072, 576, 2048), (1536, 576, 7168), (384, 288, 1024), (70, 24, 300)])
@pytest.mark.parametrize("M", [1, 2, 4])
def test_fp8_dual_launch_vs_reference(M, N1, N2, K):
    """The same pair with e4m3 weights and their block scales (`dsv3::fp8_linear2`, an FP8 checkpoint's), its
    config and through the public op."""
    from dsv3.kernels import dense_gemv_triton as k
    from dsv3.kernels.reference import fp8_weight_linear_ref, weight_quant

    g = torch.Generator(device="cuda").manual_seed(M + N1)
    (w1, s1), (w2, s2) = (weight_quant(torch.randn(N, K, device="cuda", generator=g) * 0.05) for N in (N1, N2))
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    for y1, y2 in (k.launch_dual(x, w1, w2, s1=s1, s2=s2), kernels.fp8_weight_linear2(x, w1, s1, w2, s2)):
        assert _rel(y1, fp8_weight_linear_ref(x, w1, s1)) < 1e-2 and _rel(y2, fp8_weight_linear_ref(x, w2, s2)) < 1e-2


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("N,K", [(2816, 2048), (10944, 2048), (2048, 7168), (200, 136)])
@pytest.mark.parametrize("M", [1, 3])
def test_swiglu_gemv_vs_reference(M, N, K, fp8):
    """The dense SwiGLU's first half (kernels.swiglu_gemv: shared experts, dense FFN) at the 16b / 671b shapes,
    bf16 and block-scaled e4m3 weights, against the fp32 reference rounded once."""
    from dsv3.kernels.reference import expert_gemv_ref, weight_quant

    g = torch.Generator(device="cuda").manual_seed(M + N + K)
    gate, up = ((torch.randn(N, K, device="cuda", generator=g) * 0.05).bfloat16() for _ in range(2))
    gs = us = None
    if fp8:
        (gate, gs), (up, us) = weight_quant(gate.float()), weight_quant(up.float())
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    y = kernels.swiglu_gemv(x, gate, gs, up, us, backend="triton")
    want = expert_gemv_ref(x, gate[None], None if gs is None else gs[None], torch.zeros(M, dtype=torch.long,
                           device="cuda"), 1, up[None], None if us is None else us[None])
    assert y.shape == (M, N) and _rel(y, want) < 1e-2, _rel(y, want)


@pytest.mark.parametrize("E,D", [(64, 2048), (256, 7168), (16, 192)])
@pytest.mark.parametrize("M", [1, 4])
def test_fp32_output_is_the_routers_fp32_linear(M, E, D):
    """The router's logits (Router.logits): the kernel's fp32 output from bf16 x and weight is F.linear on fp32
    copies up to the summation order (the bf16 products are exact in fp32)."""
    g = torch.Generator(device="cuda").manual_seed(M + E)
    w = (torch.randn(E, D, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.randn(M, D, device="cuda", generator=g).bfloat16()
    y = kernels.dense_gemv(x, w, out_dtype=torch.float32, backend="triton")
    want = F.linear(x.float(), w.float())
    assert y.dtype == torch.float32 and y.shape == (M, E)
    assert (y - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_the_switch_on_matches_off(compile, monkeypatch):
    """A bf16 model's CUDA-graph decode step (compiled or not) with the dense GEMV switched on against the same
    step switched off (cuBLAS), teacher-forced on the same prompts: logits within 2%, top-1 equal on at least 2
    of 3 rows, and the kernel really ran while the graphs were built (replays run no Python)."""
    # the shipped rule takes the dense / head GEMVs at one row only (backend.DENSE_GEMV_ROWS: faster than cuBLAS
    # there); the kernels hold up to 4 rows, and this test checks them at the bucket's 4
    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 4)
    from dsv3.kernels import dense_gemv_triton as k
    from test_gpu_expert_gemv import decode_model_and_prompts, graphed_step_logits

    m, prompts = decode_model_and_prompts()

    def step_logits(on: bool):
        old = kernels.set_dense_gemv(on)
        try:
            return graphed_step_logits(m, prompts, compile_decode=compile)  # decode: the bucket's 4 rows
        finally:
            kernels.set_dense_gemv(old)

    ref = step_logits(False)
    launches, launch = [], k.launch
    k.launch = lambda x, w, config=None, out_dtype=None: launches.append(x.shape) or launch(x, w, config, out_dtype)
    try:
        got = step_logits(True)
    finally:
        k.launch = launch
    assert launches and all(s[0] == 4 for s in launches), launches[:4]  # the bucket's 4 rows, decode only
    assert _rel(got, ref) < 2e-2, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 2 / 3
