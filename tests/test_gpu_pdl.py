"""Programmatic dependent launch (kernels.set_pdl, backend.pdl) on a GPU of compute capability 9.0+: every decode
kernel launched with it waits for the launch before it before reading that launch's output.

Each case runs a kernel on an input that a slow producer writes just before: the producer lets dependent launches
start at once (griddepcontrol.launch_dependents) and spins for ~1 ms before it writes. A kernel that read its
input before its wait would read the zeros the buffer held. The control shows the setup has teeth: a copy kernel
launched the same way without the wait reads zeros. Run on the device machine:

    python -m pytest tests/test_gpu_pdl.py -m gpu -q
"""

import pytest
import torch

from dsv3 import kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                 reason="needs a CUDA GPU of compute capability 9.0+ (griddepcontrol)")]

if torch.cuda.is_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _slow_copy(src, dst, n, spins, BLOCK: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()  # a dependent launch may start now, long before dst is written
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(src + offs, mask=m)
        t = tl.zeros([BLOCK], tl.float32)
        for _ in range(spins):  # dependent multiply-adds, ~1 ms at SPINS
            t = t * 0.5 + 1.0
        tl.store(dst + offs, tl.where(t < 0.0, tl.zeros_like(v), v), mask=m)

    @triton.jit
    def _copy_without_wait(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

SPINS = 400_000  # ~1 ms: longer than any launcher's host work between the two launches


def slow_copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src, written ~1 ms after the launch lets its dependents start."""
    d, s = dst.reshape(-1).view(torch.uint8), src.contiguous().reshape(-1).view(torch.uint8)
    _slow_copy[(triton.cdiv(s.numel(), 1024),)](s, d, s.numel(), SPINS, BLOCK=1024)


@pytest.fixture
def pdl_on():
    old = kernels.set_pdl(True)
    yield
    kernels.set_pdl(old)


def test_the_control_reads_before_the_producer_writes():
    x = torch.arange(1, 4097, device="cuda", dtype=torch.float32)
    buf, out = torch.zeros_like(x), torch.full_like(x, -1.0)
    for _ in range(2):  # the first round compiles both kernels (the producer would finish during the second's compile)
        buf.zero_()
        torch.cuda.synchronize()
        slow_copy_(buf, x)
        _copy_without_wait[(4,)](buf, out, x.numel(), BLOCK=1024, launch_pdl=True)
        torch.cuda.synchronize()
    assert torch.equal(buf, x)
    assert (out == 0).any(), "a launch without the wait read the producer's output: PDL had no effect here"


def _bf16(*shape, g):
    return torch.randn(*shape, device="cuda", generator=g).bfloat16()


def _cases():
    """name -> (inputs dict, the names of the inputs a producer may write, fn(inputs) -> output tensors)."""
    from dsv3.kernels import (dense_gemv_triton, expert_gemv_triton, fp8_gemm_triton, head_gemv_triton,
                              latent_store_triton, mla_decode_triton, mla_prep_triton, moe_gemm_triton, router_triton)

    g = torch.Generator(device="cuda").manual_seed(0)
    D, I, E = 2048, 1408, 16
    cases = {}
    x1 = _bf16(1, D, g=g)
    cases["dense_gemv"] = ({"x": x1, "w": _bf16(2048, D, g=g)}, ["x"],
                           lambda t: dense_gemv_triton.launch(t["x"], t["w"]))
    cases["dense_gemv_fp32_out"] = ({"x": x1, "w": _bf16(64, D, g=g)}, ["x"],
                                    lambda t: dense_gemv_triton.launch(t["x"], t["w"], out_dtype=torch.float32))
    cases["dense_gemv2"] = ({"x": x1, "w1": _bf16(3072, D, g=g), "w2": _bf16(576, D, g=g)}, ["x"],
                            lambda t: dense_gemv_triton.launch_dual(t["x"], t["w1"], t["w2"]))
    gw, uw = _bf16(2816, D, g=g), _bf16(2816, D, g=g)
    cases["swiglu_gemv"] = ({"x": x1, "g": gw, "u": uw}, ["x"],
                            lambda t: expert_gemv_triton.launch(t["x"], t["g"][None], None, None, 1, t["u"][None]))
    ew = {"x": x1, "g": _bf16(E, I, D, g=g), "u": _bf16(E, I, D, g=g),
          "e": torch.tensor([3, 0, 15, 7, 8, 2], device="cuda")}
    cases["expert_gemv_swiglu"] = (ew, ["x", "e"],
                                   lambda t: expert_gemv_triton.launch(t["x"], t["g"], None, t["e"], 6, t["u"]))
    cases["expert_gemv_down"] = ({"h": _bf16(6, I, g=g), "d": _bf16(E, D, I, g=g), "e": ew["e"]}, ["h", "e"],
                                 lambda t: expert_gemv_triton.launch(t["h"], t["d"], None, t["e"], 1))
    wq, ws = kernels.weight_quant(_bf16(2048, D, g=g).float())
    cases["fp8_small_m"] = ({"x": x1, "w": wq, "s": ws}, ["x"], lambda t: fp8_gemm_triton._launch_small_m(
        t["x"], t["w"], t["s"], **fp8_gemm_triton._config_small_m(1, 2048, D)))
    eq, es = zip(*(kernels.weight_quant(_bf16(I, D, g=g).float()) for _ in range(E)))
    fe = {"x": _bf16(6, D, g=g), "w": torch.stack(eq), "s": torch.stack(es), "e": ew["e"]}
    cases["fp8_rows"] = (fe, ["x", "e"], lambda t: fp8_gemm_triton._launch_rows(
        t["x"], t["w"], t["s"], t["e"], **fp8_gemm_triton._config_rows(6, I, D)))
    fe["u"], fe["us"] = fe["w"].flip(0), fe["s"].flip(0)
    cases["fp8_expert_gemv_swiglu"] = (fe, ["x", "e"], lambda t: expert_gemv_triton.launch(
        t["x"][:1], t["w"], t["s"], t["e"], 6, t["u"], t["us"]))
    x16 = _bf16(16, D, g=g)  # the FP8 GEMM's tensor-core form (16 rows: DOT), which waits first
    cases["fp8_small_m_dot"] = ({"x": x16, "w": wq, "s": ws}, ["x"], lambda t: fp8_gemm_triton._launch_small_m(
        t["x"], t["w"], t["s"], **fp8_gemm_triton._config_small_m(16, 2048, D)))
    cases["router_topk"] = (
        {"l": torch.randn(4, 256, device="cuda", generator=g), "b": torch.randn(256, device="cuda", generator=g)},
        ["l"], lambda t: router_triton.router_topk(t["l"], t["b"], 8, 8, 4, True, 2.5))
    C, P = 512, 64
    ang = torch.rand(3, P // 2, device="cuda", generator=g) * 100

    def store(t):  # in place into kv, pe (zeroed by the test before the producer runs)
        latent_store_triton.launch(t["kv"], t["pe"], 1, t["rows"], t["kv_a"], t["w"], 1e-6, t["cos"], t["sin"])
        return t["kv"], t["pe"]

    cases["store_latents"] = ({"kv_a": _bf16(3, C + P, g=g), "w": _bf16(C, g=g),
                               "rows": torch.tensor([5, 60, 7], device="cuda"), "cos": ang.cos(), "sin": ang.sin(),
                               "kv": torch.zeros(2, 64, C, device="cuda", dtype=torch.bfloat16),
                               "pe": torch.zeros(2, 64, P, device="cuda", dtype=torch.bfloat16)},
                              ["kv_a", "rows"], store)

    def store_q(t):  # the same, and the query's rope part (a view of q) rotated into a new tensor
        q_out = latent_store_triton.launch(t["kv"], t["pe"], 1, t["rows"], t["kv_a"], t["w"], 1e-6, t["cos"],
                                           t["sin"], t["q"][..., 128:])
        return t["kv"], t["pe"], q_out

    cases["store_latents_q"] = ({**cases["store_latents"][0], "q": _bf16(3, 16, 128 + P, g=g),
                                 "kv": torch.zeros(2, 64, C, device="cuda", dtype=torch.bfloat16),
                                 "pe": torch.zeros(2, 64, P, device="cuda", dtype=torch.bfloat16)},
                                ["q", "kv_a"], store_q)

    def prep(t):  # the store with the query and the W_UK GEMV (W_UKᵀ a view of kv_b) in one launch
        q_lat, q_rot = mla_prep_triton.launch(t["kv"], t["pe"], 1, t["rows"], t["kv_a"], t["w"], 1e-6, t["cos"],
                                              t["sin"], t["q"][..., 128:], t["q"][..., :128],
                                              t["kv_b"][:, :128].transpose(1, 2))
        return t["kv"], t["pe"], q_lat, q_rot

    cases["mla_prep"] = ({**cases["store_latents_q"][0], "kv_b": _bf16(16, 256, C, g=g),
                          "kv": torch.zeros(2, 64, C, device="cuda", dtype=torch.bfloat16),
                          "pe": torch.zeros(2, 64, P, device="cuda", dtype=torch.bfloat16)},
                         ["q", "kv_a"], prep)
    B, H, page = 2, 16, 16  # two sequences of 30 and 17 positions in 8 pages of 16 each
    ml = {"q": _bf16(B, H, C, g=g), "qp": _bf16(B, H, P, g=g), "kv": _bf16(16 * page, C, g=g),
          "pe": _bf16(16 * page, P, g=g), "table": torch.randperm(16, device="cuda", generator=g).view(B, 8),
          "lens": torch.tensor([30, 17], device="cuda", dtype=torch.int32)}
    cases["mla_decode"] = (ml, ["q", "qp", "kv", "lens"], lambda t: mla_decode_triton.mla_decode(
        t["q"], t["qp"], t["kv"], t["pe"], t["table"], t["lens"], page, 0.1))
    offs = torch.tensor([2, 2, 5, 9, 12, 12, 12, 16], device="cuda", dtype=torch.int32)  # 8 experts, 16 rows
    mg = {"x": _bf16(4, 256, g=g), "w": _bf16(8, 128, 256, g=g), "u": _bf16(8, 128, 256, g=g), "offs": offs,
          "rows": torch.randint(0, 4, (16,), device="cuda", generator=g)}
    cases["moe_gemm_swiglu"] = (mg, ["x", "offs", "rows"], lambda t: moe_gemm_triton.launch(
        t["x"], t["w"], None, t["offs"], 16, x_rows=t["rows"], up=t["u"]))
    cases["head_gemv"] = ({"x": _bf16(1, 16, 128, g=g), "w": _bf16(16, 512, 128, g=g)}, ["x"],
                          lambda t: head_gemv_triton.launch(t["x"], t["w"]))
    return cases


CASES = ["dense_gemv", "dense_gemv_fp32_out", "dense_gemv2", "swiglu_gemv", "expert_gemv_swiglu",
         "expert_gemv_down", "fp8_small_m", "fp8_small_m_dot", "fp8_rows", "fp8_expert_gemv_swiglu",
         "router_topk", "store_latents", "store_latents_q", "mla_decode", "moe_gemm_swiglu",
         "head_gemv", "mla_prep"]
# outputs written in place: zeroed before each producer
IN_PLACE = {"store_latents": ("kv", "pe"), "store_latents_q": ("kv", "pe"), "mla_prep": ("kv", "pe")}
# Nothing but the producer may launch between it and the kernel under test: an ordinary launch in between (a copy,
# a fill) would wait for the producer to finish, and a missing wait in the kernel would go unseen. So each case's
# tensors are made up front and the launchers allocate with torch.empty only.


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_kernel_waits_for_the_launch_before_it(name, graph, pdl_on, monkeypatch):
    case_name = name
    cases = _cases()
    inputs, produced, fn = cases[name]
    kernels.set_pdl(False)
    for n in IN_PLACE.get(name, ()):
        inputs[n].zero_()
    want = [t.clone() for t in _as_tuple(fn(inputs))]
    kernels.set_pdl(True)
    launches = []
    run = triton.runtime.jit.JITFunction.run

    def spy(self, *a, **kw):
        launches.append((self.fn.__name__, kw.get("launch_pdl", False)))
        return run(self, *a, **kw)

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", spy)
    fn(inputs), slow_copy_(torch.empty_like(inputs[produced[0]]), inputs[produced[0]])  # compiled before the rounds
    torch.cuda.synchronize()
    for key in produced:
        buf = torch.zeros_like(inputs[key])
        t = {**inputs, key: buf}
        if graph:
            fn(t), slow_copy_(buf, inputs[key])  # (compile and warm up outside the capture)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                slow_copy_(buf, inputs[key])
                out = _as_tuple(fn(t))
            buf.zero_()
            for name in IN_PLACE.get(case_name, ()):
                t[name].zero_()
            g.replay()
        else:
            for name in IN_PLACE.get(case_name, ()):
                t[name].zero_()
            slow_copy_(buf, inputs[key])
            out = _as_tuple(fn(t))
        torch.cuda.synchronize()
        for o, w in zip(out, want):
            assert torch.equal(o, w), f"{name}: input {key!r} written by the launch before: output differs"
    ours = [(k, p) for k, p in launches if k not in ("_slow_copy",)]
    assert ours and all(p for _, p in ours), f"{name}: launches without PDL: {ours}"


def test_graphed_decode_step_with_pdl_is_bitwise_the_same(monkeypatch):
    """A bf16 micro model's CUDA-graph decode step (compiled), every decode kernel switched on, with and without
    PDL: the same logits bit for bit (PDL changes when a launch starts,
    not what it computes)."""
    from dsv3.kernels import backend as kb
    from test_gpu_expert_gemv import decode_model_and_prompts, graphed_step_logits

    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 4)
    m, prompts = decode_model_and_prompts()
    sets = (kernels.set_dense_gemv, kernels.set_head_gemv, kernels.set_latent_store, kernels.set_moe_gemm,
            kernels.set_mla_prep)
    olds = [f(True) for f in sets]
    old_pdl = kernels.set_pdl(False)
    try:
        ref = graphed_step_logits(m, prompts, compile_decode=True)
        kernels.set_pdl(True)
        got = graphed_step_logits(m, prompts, compile_decode=True)
    finally:
        kernels.set_pdl(old_pdl)
        for f, o in zip(sets, olds):
            f(o)
    assert torch.equal(got, ref)
