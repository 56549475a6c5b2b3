"""The router's logits GEMV and its selection in one launch (dsv3/kernels/router_triton.py `launch_gemv`,
`kernels.router_gemv_topk`, `Router._one_launch`).

    python -m pytest -q tests/test_router_gemv.py                      (CPU, CI: no triton needed)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_router_gemv.py   (+ the kernel, interpreted)

CPU: the reference backend is router_topk_ref on F.linear's fp32 logits; the switch is off by default; the per-call
rule (rows, dtypes, contiguity, gradients, the switch) and Router's choice (only where the dense GEMV and the router
kernel would both run). Triton interpreter: the kernel against the reference for M = 1..8 at the 16b (64 experts,
one group, top-6) and 671B (256 experts, 8 groups, top-4 groups, top-8, scale 2.5) routers, bf16 and fp16, and bit
for bit against the two launches it replaces (the dense GEMV's fp32 logits, then the router kernel); launches in a
row of different shapes on the one counter, which is back at 0 after each (and a counter not at 0 gives a wrong
answer: the test has teeth); the custom op under torch.compile (fullgraph); a MoE layer, eager and compiled, and the
engine's static decode step with the switch on against off, bit for bit, the router hooks seeing the same idx.
GPU: tests/test_gpu_router.py, tests/test_gpu_pdl.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dsv3 import kernels
from dsv3.config import preset
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import router_topk_ref
from dsv3.model.moe import MoE, Router
from tests.conftest import capture_router_io, decode_step, make_model, tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)

BF16, FP16 = torch.bfloat16, torch.float16


def _rule(name: str) -> dict:
    c = preset(name)
    return dict(top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
                norm_topk_prob=c.norm_topk_prob, scale=c.routed_scaling_factor)


RULES = {"16b": (64, _rule("16b")), "671b": (256, _rule("671b"))}


def _inputs(M, E, D, dtype, seed):
    """x (M, D), a router weight (E, D) scaled so the logits spread like a trained router's (std ~2), a bias of a
    few γ-steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g).to(dtype)
    w = (torch.randn(E, D, generator=g) * 2 / D ** 0.5).to(dtype)
    return x, w, 0.05 * torch.randn(E, generator=g)


def _robust(logits, bias, top_k, n_group, topk_group, margin=1e-5, **_):
    """(M,) bool: rows whose reference choice is decided by more than `margin` (tests/test_gpu_router.py's rule)."""
    M, E = logits.shape
    sel = logits.sigmoid() + bias
    ok = torch.ones(M, dtype=torch.bool)
    if topk_group < n_group:
        gs = sel.view(M, n_group, -1).topk(2, -1).values.sum(-1)
        v = gs.sort(-1, descending=True).values
        ok &= v[:, topk_group - 1] - v[:, topk_group] > margin
        mask = torch.ones(M, n_group, dtype=torch.bool).scatter_(1, gs.topk(topk_group, -1).indices, False)
        sel = sel.view(M, n_group, -1).masked_fill(mask[..., None], float("-inf")).view(M, E)
    v = sel.sort(-1, descending=True).values
    return ok & (v[:, top_k - 1] - v[:, top_k] > margin)


# --- the reference and the choice (CPU) -------------------------------------------------------------------------

def test_reference_backend_is_the_routing_of_fp32_logits():
    E, kw = RULES["671b"]
    x, w, b = _inputs(3, E, 96, BF16, seed=0)
    assert kernels.select_backend("router_gemv", x, w) == "reference"  # the CPU
    got = kernels.router_gemv_topk(x, w, b, **kw)
    want = router_topk_ref(F.linear(x.float(), w.float()), b, **kw)
    assert all(a.dtype == c.dtype and torch.equal(a, c) for a, c in zip(got, want))
    with pytest.raises(TypeError, match="one dtype"):
        kernels.router_gemv_topk(x, w.half(), b, **kw)


def _pretend_gpu(monkeypatch):
    """CPU tensors that the backend rule takes for CUDA tensors on an H100 with triton (from here on)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kb, "_probes", {"triton": True, "scaled_mm": True, ("capability", 0): (9, 0)})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))


def test_off_by_default_and_the_rule(monkeypatch):
    """Off (not measured on a GPU yet); switched on: 16-bit x of up to ROUTER_GEMV_ROWS rows, the weight in x's
    dtype and contiguous, no gradient through either."""
    _pretend_gpu(monkeypatch)
    x, w = torch.randn(1, 64, dtype=BF16), torch.randn(16, 64, dtype=BF16)
    assert kb.SWITCHED["router_gemv"] is False and kb.ROUTER_GEMV_ROWS == 8
    assert kernels.select_backend("router_gemv", x, w) == "reference"
    assert kernels.set_router_gemv(True) is False
    try:
        assert kernels.select_backend("router_gemv", x, w) == "triton"
        assert kernels.select_backend("router_gemv", torch.randn(8, 64, dtype=FP16), w.half()) == "triton"
        assert kernels.select_backend("router_gemv", torch.randn(9, 64, dtype=BF16), w) == "reference"  # rows
        assert kernels.select_backend("router_gemv", x.float(), w.float()) == "reference"  # fp32 x
        assert kernels.select_backend("router_gemv", x, w.half()) == "reference"  # another dtype
        assert kernels.select_backend("router_gemv", x, torch.randn(64, 16, dtype=BF16).T) == "reference"  # strided
        assert kernels.select_backend("router_gemv", x.clone().requires_grad_(), w) == "reference"
        assert kernels.select_backend("router_gemv", x, w.clone().requires_grad_()) == "reference"  # training
        with torch.no_grad():
            assert kernels.select_backend("router_gemv", x, w.clone().requires_grad_()) == "triton"
        assert kernels.select_backend("router_gemv", x) == "reference"  # no weight named
    finally:
        kernels.set_router_gemv(False)
    assert kb.switches_from_env("router_gemv=on") == {"router_gemv": True}


def test_router_takes_one_launch_only_where_both_kernels_would_run(monkeypatch):
    """Router._one_launch: the switch, the dense GEMV's choice (on, DENSE_GEMV_ROWS rows, no autograd) and the router
    kernel's, and at most ROUTER_GEMV_ROWS rows; forward then calls the one op, else the two."""
    E, kw = RULES["16b"]
    r = Router(tiny_cfg(hidden_size=64, n_routed_experts=E, n_group=1, topk_group=1, num_experts_per_tok=6))
    with torch.no_grad():
        r.weight.normal_()
        r.e_score_correction_bias.zero_()
    r = r.to(BF16)
    assert r.e_score_correction_bias.dtype == torch.float32
    _pretend_gpu(monkeypatch)
    x1, x2 = torch.randn(1, 64, dtype=BF16), torch.randn(2, 64, dtype=BF16)
    calls = []
    monkeypatch.setattr(kernels, "router_gemv_topk", lambda *a, **k: calls.append(a[0].shape) or "one launch")
    with torch.no_grad():
        assert not r._one_launch(x1)  # off by default
        old = kernels.set_router_gemv(True)
        try:
            assert r._one_launch(x1) and r(x1) == "one launch" and calls == [(1, 64)]
            assert not r._one_launch(x2)  # the dense GEMV takes one row (DENSE_GEMV_ROWS)
            with kernels.use_backend(dense_gemv="reference"):
                assert not r._one_launch(x1)
            with kernels.use_backend(router_topk="reference"):
                assert not r._one_launch(x1)
            kernels.set_dense_gemv(False)
            assert not r._one_launch(x1)
            kernels.set_dense_gemv(True)
            with kernels.use_backend(dense_gemv="triton", router_topk="triton", router_gemv="triton"):
                assert r._one_launch(torch.randn(8, 64, dtype=BF16))
                assert not r._one_launch(torch.randn(9, 64, dtype=BF16))  # the kernel's limit, even forced
        finally:
            kernels.set_router_gemv(old)
            kernels.set_dense_gemv(True)
    r.weight.requires_grad_(True)
    kernels.set_router_gemv(True)
    try:
        assert not r._one_launch(x1)  # training the router: the two launches (the logits' F.linear has a backward)
    finally:
        kernels.set_router_gemv(False)


# --- the sm_90 compile (no GPU: Triton's front end and back end on the CPU) -------------------------------------

_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


def _sm90_ptx(monkeypatch, M: int, name: str) -> str:
    """The PTX of the launch `launch_gemv` makes for an M-row bf16 x at a preset's router shape, with PDL and the
    GPU's exact sigmoid, compiled for sm_90 as Triton's launcher specialises it (tests/test_shared_gemv_compile.py)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv3.kernels import router_triton as rt

    seen = {}

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(args=a, kw=kw)

    real = rt._router_gemv_kernel
    E, kw = RULES[name]
    D = preset(name).hidden_size
    with monkeypatch.context() as mp:
        mp.setattr(rt, "_router_gemv_kernel", Rec())
        mp.setattr(rt.backend, "pdl", lambda device: True)
        mp.setenv("TRITON_INTERPRET", "1")  # (the launcher's CPU-tensor check)
        rt.launch_gemv(torch.zeros(M, D, dtype=BF16), torch.zeros(E, D, dtype=BF16), torch.zeros(E), **kw)
    bound = dict(zip(real.arg_names, seen["args"]))
    bound.update({n: v for n, v in seen["kw"].items() if n not in ("num_warps", "num_stages", "launch_pdl")})
    bound["EXACT"] = True  # the GPU's sigmoid (libdevice)
    signature, constexprs, attrs = {}, {}, {}
    for i, n in enumerate(real.arg_names):
        v, p = bound[n], real.params[i]
        if isinstance(v, torch.Tensor):
            signature[n], attrs[(i,)] = "*" + _TT[v.dtype], [["tt.divisibility", 16]]
        elif p.is_constexpr:
            signature[n], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, float):
            signature[n] = "fp32"
        elif v == 1 and not p.do_not_specialize:  # Triton's specialisation of 1
            signature[n], constexprs[(i,)] = "constexpr", 1
        else:
            signature[n] = "i32"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {o: seen["kw"][o] for o in ("num_warps", "num_stages")}
    try:
        k = triton.compile(ASTSource(real, signature, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)
    except RuntimeError as e:  # (triton bundles ptxas; a build without it cannot finish the compile)
        if "ptxas" not in str(e).lower():
            raise
        pytest.skip("no ptxas to finish the compile")
    return k.asm["ptx"]


@pytest.mark.parametrize("name,M", [("16b", 1), ("671b", 8)])
def test_launch_compiles_for_sm90_with_the_ordering_the_docstring_argues(monkeypatch, name, M):
    """The sm_90 code of the launch: the wait for the launch before (PDL) comes before the arrival; the CTA's
    logits stores, then a barrier, then one gpu-scope acq_rel atomic add; the last program's logits loads are
    volatile (L2) and come after it; the counter's reset is its last store."""
    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles the kernel: not under the interpreter")
    ptx = _sm90_ptx(monkeypatch, M, name)
    lines = [ln.strip() for ln in ptx.splitlines()]
    at = [i for i, ln in enumerate(lines) if "atom.global.gpu.acq_rel.add" in ln]
    assert len(at) == 1, at
    a = at[0]
    waits = [i for i, ln in enumerate(lines) if ln.startswith("griddepcontrol.wait")]
    assert waits and max(waits) < a
    bar = max(i for i, ln in enumerate(lines[:a]) if ln.startswith("bar.sync"))
    logits_store = max(i for i, ln in enumerate(lines[:a]) if "st.global" in ln)
    assert logits_store < bar < a
    vol = [i for i, ln in enumerate(lines) if "ld.volatile.global" in ln]
    assert vol and min(vol) > a


# --- the kernel, interpreted -------------------------------------------------------------------------------------

def _two_launches(x, w, b, kw):
    """What the one launch replaces: the dense GEMV's fp32 logits, then the router kernel (both interpreted)."""
    from dsv3.kernels import dense_gemv_triton, router_triton

    logits = dense_gemv_triton.launch(x, w, out_dtype=torch.float32)
    return logits, router_triton.router_topk(logits, b, kw["top_k"], kw["n_group"], kw["topk_group"],
                                             kw["norm_topk_prob"], kw["scale"])


@interp
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("name", ["16b", "671b"])
def test_interp_kernel_vs_reference_and_the_two_launches(name, dtype):
    """M = 1..8 (one to two row tiles, several expert tiles; D not a multiple of 128): the same experts as the
    reference in the same order where no near-tie decides, w and s to a few ulps; the scratch logits are the dense
    GEMV's bits and every output the two launches' bits; the counter back at 0."""
    from dsv3.kernels import router_triton as rt

    E, kw = RULES[name]
    D = 320
    for M in range(1, 9):
        x, w, b = _inputs(M, E, D, dtype, seed=M + E)
        scratch = torch.full((M, E), float("nan"))
        got = rt.launch_gemv(x, w, b, **kw, logits=scratch)
        want = router_topk_ref(F.linear(x.float(), w.float()), b, **kw)
        robust = _robust(F.linear(x.float(), w.float()), b, **kw)
        assert robust.sum() >= M - 1, (M, robust)
        assert got[1].dtype == torch.int64 and got[0].dtype == got[2].dtype == torch.float32
        assert got[0].shape == (M, kw["top_k"]) and got[2].shape == (M, E)
        assert torch.equal(got[1][robust], want[1][robust]), (M, got[1], want[1])
        same = (got[1] == want[1]).all(-1)
        torch.testing.assert_close(got[0][same], want[0][same], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
        logits, two = _two_launches(x, w, b, kw)
        assert torch.equal(scratch, logits), M  # the dense GEMV's summation, bit for bit
        assert all(torch.equal(a, c) for a, c in zip(got, two)), M
        assert rt.arrival_counter(x.device).item() == 0


@interp
def test_interp_launches_in_a_row_share_the_counter_and_leave_it_at_zero():
    """Launches of different grids (1 to 64 programs) on the one counter, each right and each leaving it at 0; a
    counter not at 0 makes an early program route from a scratch whose last tile is not written yet (the wrong
    experts): what the reset prevents. Without s: an empty (0, E) s, the same w and idx."""
    from dsv3.kernels import router_triton as rt

    assert rt.MAX_ROWS == kb.ROUTER_GEMV_ROWS  # the rule's limit is the kernel's
    count = rt.arrival_counter(torch.device("cpu"))
    for i, (name, M, dtype) in enumerate([("16b", 1, BF16), ("671b", 8, FP16), ("16b", 5, FP16), ("671b", 1, BF16),
                                          ("16b", 8, BF16), ("671b", 3, BF16)]):
        E, kw = RULES[name]
        x, w, b = _inputs(M, E, 256, dtype, seed=100 + i)
        got = rt.launch_gemv(x, w, b, **kw)
        assert all(torch.equal(a, c) for a, c in zip(got, _two_launches(x, w, b, kw)[1])), (name, M)
        assert count.item() == 0
        wo, idx, s = rt.launch_gemv(x, w, b, **kw, with_s=False)
        assert torch.equal(wo, got[0]) and torch.equal(idx, got[1]) and s.shape == (0, E)
    E, kw = RULES["16b"]
    x, w, b = _inputs(1, E, 256, BF16, seed=7)
    want = rt.launch_gemv(x, w, b, **kw)
    count.fill_(1)  # as if a launch had not reset it
    try:
        scratch = torch.full((1, E), 30.0)  # the last tile's experts unwritten: s = 1 there, chosen first
        bad = rt.launch_gemv(x, w, b, **kw, logits=scratch)
        assert not torch.equal(bad[1], want[1])
        assert count.item() == 1  # the early router reset it, the last program then arrived
    finally:
        count.zero_()
    assert rt.launch_gemv(torch.zeros(0, 256, dtype=BF16), w, b, **kw)[1].shape == (0, 6)  # nothing launched
    with pytest.raises(AssertionError, match="at most 8 rows"):
        rt.launch_gemv(torch.zeros(9, 256, dtype=BF16), w, b, **kw)


@interp
def test_interp_op_under_torch_compile():
    """The custom op traces in one graph (fullgraph; aot_eager: no code generation on the CPU) to the eager bits;
    the fake gives the shapes."""
    from dsv3.kernels import router_triton as rt

    assert isinstance(rt.router_gemv_topk, torch._library.custom_ops.CustomOpDef)
    E, kw = RULES["671b"]
    x, w, b = _inputs(2, E, 256, FP16, seed=3)

    def route(x):
        return kernels.router_gemv_topk(x * 2, w, b, **kw, backend="triton")

    eager = route(x)
    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)(x)
    assert all(torch.equal(a, c) for a, c in zip(eager, compiled))
    want = router_topk_ref(F.linear((x * 2).float(), w.float()), b, **kw)
    assert torch.equal(eager[1], want[1])
    torch.testing.assert_close(eager[0], want[0], rtol=1e-5, atol=1e-6)
    with torch._subclasses.FakeTensorMode():
        fw, fi, fs = rt.router_gemv_topk(torch.empty(3, 256, dtype=BF16), torch.empty(E, 256, dtype=BF16),
                                         torch.empty(E), kw["top_k"], kw["n_group"], kw["topk_group"], True, 2.5)
    assert fw.shape == fi.shape == (3, 8) and fi.dtype == torch.int64 and fs.shape == (3, E)


def _moe_layer(dtype):
    """A MoE layer with the 671B's routing (256 experts in 8 groups) at a small width, in `dtype`."""
    cfg = tiny_cfg(hidden_size=256, moe_intermediate_size=32, n_routed_experts=256, n_group=8, topk_group=4,
                   num_experts_per_tok=8, n_shared_experts=1)
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.normal_(std=0.05)
    return layer.to(dtype).eval()


@interp
@pytest.mark.parametrize("compiled", [False, True])
def test_interp_moe_layer_switch_on_equals_off(compiled, monkeypatch):
    """A MoE layer at decode (one token, fp16) with the router's two kernels forced (the CPU never fits their rule),
    then with the one launch too: the same output, stats and router outputs (a forward hook's view: what
    ExpertLoadRecorder counts) bit for bit; eagerly and compiled in one graph (aot_eager). The one launch ran."""
    from dsv3.kernels import router_triton as rt

    layer = _moe_layer(FP16)
    x = torch.randn(1, 1, 256).half()
    seen, launches, launch = [], [], rt.launch_gemv
    layer.gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    monkeypatch.setattr(rt, "launch_gemv", lambda *a, **k: launches.append(a[0].shape) or launch(*a, **k))
    # the routed experts on their decode GEMV (interpreted; its backend rule wants a GPU): the decode step's path,
    # and one that compiles in one graph (the CPU's per-expert loop syncs)
    monkeypatch.setattr(layer.experts, "_gemv_fits", lambda x_ND, idx: True)
    monkeypatch.setattr(layer.experts, "_impl", lambda x_ND, impl: "grouped")
    fn = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    with torch.no_grad(), kernels.use_backend(dense_gemv="triton", router_topk="triton", expert_gemv="triton"):
        y_off, stats_off = fn(x)
        assert not launches
        with kernels.use_backend(router_gemv="triton"):
            y_on, stats_on = fn(x)
    assert launches == [(1, 256)]
    assert torch.equal(y_on, y_off) and torch.equal(stats_on.counts, stats_off.counts)
    assert len(seen) == 2 and all(torch.equal(a, c) for a, c in zip(*seen))


@interp
def test_interp_engine_decode_step_switch_on_equals_off(monkeypatch):
    """The engine's static decode step (bucketed, run eagerly on the CPU: what a CUDA graph records on a GPU) of a
    tiny fp16 model, the dense GEMV and the router kernel forced, with the one launch on against off: the same
    next-token logits and router choices, bit for bit; the decode rows (2) took the one launch, the prefill's (more
    than 8) the two."""
    from dsv3.kernels import router_triton as rt

    launches, launch = [], rt.launch_gemv
    monkeypatch.setattr(rt, "launch_gemv", lambda *a, **k: launches.append(a[0].shape[0]) or launch(*a, **k))
    model = make_model(tiny_cfg(num_nextn_predict_layers=0, hidden_size=128, n_routed_experts=16), bias_std=0.05)
    model = model.half()
    prompts = (tuple(range(1, 11)), tuple(range(20, 29)))  # each prefill above 8 rows
    with torch.no_grad(), kernels.use_backend(dense_gemv="triton", router_topk="triton"):
        with capture_router_io(model) as off_io:
            want = decode_step(model, prompts)[0]
        assert not launches
        with kernels.use_backend(router_gemv="triton"), capture_router_io(model) as on_io:
            got = decode_step(model, prompts)[0]
    n_moe = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert launches == [2] * n_moe  # the decode step's routers; the prefills (10, 9 rows) took the two
    assert torch.equal(got, want)
    assert len(on_io) == len(off_io) and all(torch.equal(a[2][1], c[2][1]) and torch.equal(a[2][0], c[2][0])
                                             for a, c in zip(on_io, off_io))
