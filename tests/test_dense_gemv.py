"""The dense decode GEMV (dsv3/kernels/dense_gemv_triton.py, `kernels.dense_gemv`) and the model's `Linear` that
takes it (dsv3/model/layers.py).

    python -m pytest -q tests/test_dense_gemv.py                      (CPU, CI: no triton needed, < 5 s)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_dense_gemv.py   (+ the kernel, interpreted)

CPU: the reference; the switch defaults (on, e4m3 weights too) and the overrides; the per-call rule (rows, dtypes,
contiguity, gradients through x or w, CUDA autocast); the model's Linear is bit for bit nn.Linear wherever the
kernel does not run, takes the kernel only where the seam picks it (never with a bias, never where x or its
weight needs a gradient) and, in a model, for every projection but the head; a torch.compile'd caller follows
the switch; the sweep's shape list and arguments.
Triton interpreter: the kernel against the reference for every config the heuristic returns (and TUNED's, and a
few of the sweep's grid), ragged N and K, M = 1..4 and more than one row tile, fp16 and fp32 (the interpreter
has no bf16); the custom op under torch.compile (fullgraph); a tiny model's forward and the engine's static decode
step with every Linear through the kernel; the sweep's plumbing. GPU: tests/test_gpu_dense_gemv.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import dense_gemv_ref
from dsv3.model.layers import Linear
from dsv3.model.moe import MoE
from tests.conftest import bench_module, decode_step, make_model, rand_ids, tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)

BF16 = torch.bfloat16


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture
def switched_on():
    old = kernels.set_dense_gemv(True)
    yield
    kernels.set_dense_gemv(old)


@pytest.fixture
def cpu_rule(monkeypatch):
    """The dense GEMV's per-call rule on CPU tensors (as if they were on a GPU with triton); the kernel call
    recorded and replaced by F.linear + 1 (a marker)."""
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op == "dense_gemv" and len(t) == 2 and kb._dense_gemv_fits(*t))
    calls = []

    def fake(x, w, *, out_dtype=None, backend=None):
        calls.append((tuple(x.shape), w) if out_dtype is None else (tuple(x.shape), w, out_dtype))
        return F.linear(x, w) + 1 if out_dtype is None else F.linear(x.float(), w.float()).to(out_dtype) + 1

    monkeypatch.setattr(kernels, "dense_gemv", fake)
    return calls


# --- the reference and the choice (CPU) -------------------------------------------------------------------

def test_reference_is_an_fp32_linear_rounded_once():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 96, generator=g).to(BF16), torch.randn(40, 96, generator=g).to(BF16)
    y = dense_gemv_ref(x, w)
    assert y.shape == (2, 3, 40) and y.dtype == BF16
    assert torch.equal(y, (x.float() @ w.float().T).to(BF16))
    assert torch.equal(kernels.dense_gemv(x, w), y)  # the CPU: the reference backend
    with pytest.raises(TypeError, match="one dtype"):
        kernels.dense_gemv(x, w.half())
    with pytest.raises(TypeError, match="one dtype"):
        kernels.dense_gemv(x.to(torch.int32), w.to(torch.int32))
    with pytest.raises(ValueError, match="K = 95"):
        kernels.dense_gemv(x[..., :95], w)
    with pytest.raises(ValueError, match=r"w \(N, K\)"):
        kernels.dense_gemv(x, w[None])
    assert torch.equal(kernels.dense_gemv(x, w, out_dtype=torch.float32), x.float() @ w.float().T)
    assert torch.equal(kernels.dense_gemv(x, w, out_dtype=BF16), y)
    with pytest.raises(TypeError, match="or float32"):
        kernels.dense_gemv(x, w, out_dtype=torch.float16)


def test_switch_defaults_are_the_measured_ones_and_the_overrides_win(monkeypatch):
    x, w = torch.randn(1, 64, dtype=BF16), torch.randn(32, 64, dtype=BF16)
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: True)  # the rule holds (as on a GPU)
    # on where the GPUs measured them faster (backend.py SWITCHED: the e4m3 forms, the head GEMV and the merge + W_UV
    # launch too, the store and the W_UK GEMV in one launch); the shared experts inside the routed GEMV for e4m3
    # weights only (bf16: measured slower); a greedy round as one graph for speculation rounds only, compiled whole;
    # sampled steps as one graph; the draw's race kernel
    assert kb.SWITCHED == {"dense_gemv": True, "head_gemv": True, "latent_store": True,
                           "moe_gemm": True, "pdl": True, "mla_uv": True, "shared_gemv": kb.WEIGHTS_E4M3,
                           "mla_prep": True, "verify_rows": True, "round_graph": kb.SPECULATION_ROUNDS,
                           "round_compile": True, "round_sampled": True, "hashed_race": True}
    assert kernels.select_backend("dense_gemv", x, w) == "triton"
    assert kernels.set_dense_gemv(False) is True
    try:
        assert kernels.select_backend("dense_gemv", x, w) == "reference"
        with kernels.use_backend(dense_gemv="triton"):  # forcing needs no switch (the interpreter tests)
            assert kernels.select_backend("dense_gemv", x, w) == "triton"
    finally:
        assert kernels.set_dense_gemv(True) is False
    with kernels.use_backend("reference"):
        assert kernels.select_backend("dense_gemv", x, w) == "reference"
    assert kernels.select_backend("dense_gemv", x, w, backend="reference") == "reference"
    with pytest.raises(ValueError, match="not a switched op"):
        kb.switch("expert_gemv", True)


def test_verify_rows_raise_the_one_row_limits_inside_a_speculative_engines_steps(monkeypatch):
    """"verify_rows" (on by default): a speculative engine's decode steps take the one-row kernels up to k + 1 rows
    (graphs.py DecodeGraphs.row_limit, applied around each step's launch, hence inside its capture or compile); the
    limits are restored after each step, and other engines keep theirs."""
    from dsv3.inference.engine import Engine, SamplingParams

    x2, w = torch.randn(2, 64, dtype=BF16), torch.randn(32, 64, dtype=BF16)
    assert not kb._dense_gemv_fits(x2, w)  # the rule (less the GPU): two rows are above DENSE_GEMV_ROWS
    with kb.row_limits(3):
        assert (kb.DENSE_GEMV_ROWS, kb.MLA_UV_ROWS) == (3, 3)
        assert kb._dense_gemv_fits(x2, w)
        with kb.row_limits(None):  # (no change)
            assert kb.DENSE_GEMV_ROWS == 3
    assert (kb.DENSE_GEMV_ROWS, kb.MLA_UV_ROWS) == (1, 1)
    with pytest.raises(RuntimeError), kb.row_limits(2):  # restored on an error too
        raise RuntimeError
    assert kb.DENSE_GEMV_ROWS == 1
    model = make_model(tiny_cfg(num_nextn_predict_layers=1), seed=0)
    assert kb.verify_rows(0) is None and kb.verify_rows(2) == 3  # on by default
    monkeypatch.setitem(kb.SWITCHED, "verify_rows", False)
    assert kb.verify_rows(2) is None and Engine(model, speculative_k=2)._graphs.row_limit is None
    monkeypatch.setitem(kb.SWITCHED, "verify_rows", True)
    eng = Engine(model, speculative_k=2, cuda_graphs=True)
    assert eng._graphs.row_limit == 3 and Engine(model)._graphs.row_limit is None
    seen = []
    forward = eng._graphs._forward_main
    monkeypatch.setattr(eng._graphs, "_main", lambda sb: seen.append(kb.DENSE_GEMV_ROWS) or forward(sb))
    eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
    assert seen and set(seen) == {3} and kb.DENSE_GEMV_ROWS == 1  # inside every step, restored after
    assert kb.switches_from_env("verify_rows=off") == {"verify_rows": False}


def test_pdl_on_by_default_and_only_on_sm90_cuda_outside_the_interpreter(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(kb, "_probes", {("capability", 0): (9, 0)})  # as on an H100 / H200
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kb.pdl(gpu) and not kb.pdl(cpu)  # on by default, where the GPU has it
    old = kernels.set_pdl(False)
    try:
        assert old is True and not kb.pdl(gpu)
        kernels.set_pdl(True)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no griddepcontrol
        assert not kb.pdl(gpu)
        monkeypatch.delenv("TRITON_INTERPRET")
        monkeypatch.setattr(kb, "_probes", {("capability", 0): (8, 9)})  # Ada: no griddepcontrol
        assert not kb.pdl(gpu)
        monkeypatch.setattr(kb, "_probes", {("capability", 0): (9, 4)})  # an MI300 under ROCm: PTX only on NVIDIA
        monkeypatch.setattr(torch.version, "hip", "6.2")
        assert not kb.pdl(gpu)
    finally:
        kernels.set_pdl(old)
    assert kb.switches_from_env("pdl=off") == {"pdl": False}


def test_inductor_pdl_off_by_default_and_only_with_dsv3s(monkeypatch):
    """graphs.INDUCTOR_PDL (inductor's kernels of a compiled decode step on PDL): off, since a capture failed with it on
    (its comment); where switched on it still applies only where dsv3's kernels use PDL and the torch has the option."""
    import torch._inductor.config as ic

    from dsv3.inference import graphs

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(kb, "_probes", {("capability", 0): (9, 0)})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert graphs.INDUCTOR_PDL is False and graphs._inductor_options(gpu) is None
    monkeypatch.setattr(graphs, "INDUCTOR_PDL", True)
    has = hasattr(ic.triton, "enable_pdl")
    assert graphs._inductor_options(gpu) == ({"triton.enable_pdl": True} if has else None)
    assert graphs._inductor_options(torch.device("cpu")) is None
    old = kernels.set_pdl(False)
    try:
        assert graphs._inductor_options(gpu) is None
    finally:
        kernels.set_pdl(old)


def test_rule_decode_rows_dtypes_layout_gradients_autocast(monkeypatch):
    fits = kb._dense_gemv_fits
    x, w = torch.randn(1, 1, 64, dtype=BF16), torch.randn(32, 64, dtype=BF16)
    assert fits(x, w) and fits(x.half(), w.half())
    assert not fits(torch.randn(2, 64, dtype=BF16), w)  # above DENSE_GEMV_ROWS (1): cuBLAS was faster at 2 and 4
    assert not fits(x.float(), w.float())  # fp32: not a decode dtype here
    assert not fits(x, w.half())  # mixed dtypes
    assert not fits(x, torch.randn(64, 32, dtype=BF16).t())  # a transposed weight
    assert not fits(x.clone().requires_grad_(), w)  # no backward
    p = nn.Parameter(w.clone())
    assert not fits(x, p)  # a trainable weight with grad enabled (a fine-tune with frozen inputs)
    with torch.no_grad():
        assert fits(x.clone().requires_grad_(), p)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    assert not fits(x, w)  # CUDA autocast: F.linear would compute in the autocast dtype
    assert kernels.select_backend("dense_gemv", x, w) == "reference"  # (and the CPU never fits)


def test_linear_is_nn_linear_bit_for_bit_where_the_kernel_does_not_run(switched_on):
    g = torch.Generator().manual_seed(1)
    ref = nn.Linear(96, 40, bias=False)
    lin = Linear(96, 40, bias=False)
    assert isinstance(lin, nn.Linear) and list(lin.state_dict()) == list(ref.state_dict()) == ["weight"]
    lin.load_state_dict(ref.state_dict())
    for dtype in (BF16, torch.float32):
        ref.to(dtype), lin.to(dtype)
        for shape in ((1, 96), (3, 5, 96)):
            x = torch.randn(*shape, generator=g).to(dtype)
            assert torch.equal(lin(x), ref(x))  # switched on, but the CPU: F.linear
    x = torch.randn(4, 96, generator=g, requires_grad=True)
    lin.float(), ref.float()
    lin(x).square().sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, ref.weight.grad)


def test_linear_takes_the_kernel_only_where_the_seam_picks_it(cpu_rule, switched_on):
    calls = cpu_rule
    lin = Linear(64, 32, bias=False).to(BF16)
    x = torch.randn(1, 64, dtype=BF16)
    assert torch.equal(lin(x), F.linear(x, lin.weight))  # its weight is trainable, grad enabled: cuBLAS
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight) + 1) and calls[-1] == ((1, 64), lin.weight)
        assert len(calls) == 1
        lin(torch.randn(5, 64, dtype=BF16))  # prefill-sized
        biased = Linear(64, 32, bias=True).to(BF16)
        biased(x)  # a bias: the kernel has none
        kernels.set_dense_gemv(False)
        lin(x)
        kernels.set_dense_gemv(True)
    assert len(calls) == 1
    lin.requires_grad_(False)
    lin(x)  # inference weights, grad enabled, x without grad: the kernel
    lin(x.clone().requires_grad_())  # x needs a gradient: F.linear
    assert len(calls) == 2


def test_model_routes_every_projection_but_the_head(cpu_rule, switched_on):
    """A decode-sized forward of a bf16 model: every Linear of the blocks (attention projections, dense FFN,
    shared experts) asks for the kernel, and every router for its fp32 logits; the output head (nn.Linear) does
    not."""
    calls = cpu_rule
    model = make_model(tiny_cfg()).to(BF16).requires_grad_(False)
    with torch.no_grad():
        model(rand_ids(model.config, B=1, T=1), with_mtp=False)  # one row: DENSE_GEMV_ROWS
    want = {id(m.weight) for name, m in model.named_modules() if type(m) is Linear and not name.startswith("mtp")}
    routers = {id(m.gate.weight) for name, m in model.named_modules()
               if isinstance(m, MoE) and not name.startswith("mtp")}
    cfg = model.config
    assert {id(c[1]) for c in calls if len(c) == 2} == want
    assert len(routers) == cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert {id(c[1]) for c in calls if len(c) == 3 and c[2] == torch.float32} == routers
    assert len(calls) == len(want) + len(routers)
    assert type(model.lm_head) is nn.Linear and isinstance(model.mtp[0].eh_proj, Linear)


def test_router_logits_through_the_kernel_are_the_fp32_linear(cpu_rule, switched_on):
    """Router.logits: F.linear on fp32 copies, or the kernel's fp32 output from the 16-bit x and weight (the
    products are exact in fp32: only the summation order may differ); the routing that follows is unchanged."""
    calls = cpu_rule
    cfg = tiny_cfg()
    router = MoE(cfg).gate
    with torch.no_grad():
        router.weight.normal_(0, 0.05), router.e_score_correction_bias.zero_()
    router.to(BF16).requires_grad_(False)
    assert router.e_score_correction_bias.dtype == torch.float32 and router.weight.dtype == BF16
    x = torch.randn(1, cfg.hidden_size, dtype=BF16)
    want = F.linear(x.float(), router.weight.float())
    with torch.no_grad():
        got = router.logits(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want + 1)  # (the marker)
    assert len(calls) == 1 and calls[0][2] == torch.float32
    router.requires_grad_(True)
    assert torch.equal(router.logits(x), want) and len(calls) == 1  # a trainable router: F.linear
    with torch.no_grad():
        assert torch.equal(router.float().logits(x.float()), want)  # fp32: not a decode dtype here


def test_compiled_caller_follows_the_switch(cpu_rule):
    """The switch is read while tracing: a compiled step recompiles when it changes (decode_gpu.py's modes)."""
    lin = Linear(64, 32, bias=False).to(BF16).requires_grad_(False)
    x = torch.randn(1, 64, dtype=BF16)
    step = torch.compile(lin, backend="eager", fullgraph=True)
    plain = F.linear(x, lin.weight)
    assert torch.equal(step(x), plain + 1)  # on by default (backend.py SWITCHED)
    old = kernels.set_dense_gemv(False)
    try:
        assert torch.equal(step(x), plain)
    finally:
        kernels.set_dense_gemv(old)
    assert torch.equal(step(x), plain + 1)


# --- bench/dense_gemv_sweep.py (its CPU-safe parts; the plumbing under the interpreter below) ----------------

def _bench():
    return bench_module("dense_gemv_sweep")


def test_sweep_shapes_and_arguments(capsys):
    bench = _bench()
    got = {s["name"]: (s["N"], s["K"], s["per_step"]) for s in bench.shapes("16b")}
    assert got["q_proj"] == (3072, 2048, 27) and got["kv_a_proj_with_mqa"] == (576, 2048, 27)
    assert got["o_proj"] == (2048, 2048, 27) and got["shared gate/up"] == (2816, 2048, 52)
    assert got["shared down"] == (2048, 2816, 26) and got["lm_head (not routed)"][2] == 0
    assert {"q_a_proj", "q_b_proj"} <= {s["name"] for s in bench.shapes("small")}
    args = bench.parse_args(["--rows", "1,2", "--quick"])
    assert args.rows == [1, 2] and args.calls == 32 and args.reps == 5
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "8"])
    assert all(c["BM"] * c["BN"] * c["KU"] * 128 <= bench.GEMV_TILE_MAX
               for M in (1, 2, 4) for c in bench.stage1(M, False))
    assert bench.main(["--list", "--presets", "small", "--rows", "1"]) == 0
    assert "q_b_proj" in capsys.readouterr().out


# --- the kernel under the Triton interpreter ---------------------------------------------------------------

def _key(cfg):
    return tuple(sorted(cfg.items()))


def _configs():
    """Every config `default_config` returns over decode shapes (M 1..4, N and K from tiny to the 671b's widths
    and vocabularies), TUNED's, and a few of the sweep's grid."""
    try:
        from dsv3.kernels import dense_gemv_triton as k
    except ImportError:
        return []
    seen = {_key(k.default_config(M, N, K)) for M in range(1, 5)
            for N in (8, 100, 576, 1408, 2048, 2816, 3072, 10944, 18432, 102400, 129280)
            for K in (128, 300, 512, 1408, 2048, 7168, 10944)}
    seen |= {_key(c) for c in k.TUNED.values()}
    extra = [dict(BM=1, BN=4, KU=8, num_warps=2, num_stages=1), dict(BM=1, BN=64, KU=1, num_warps=8, num_stages=2),
             dict(BM=2, BN=32, KU=1, num_warps=4, num_stages=1), dict(BM=4, BN=4, KU=4, num_warps=4, num_stages=2),
             # PSUM (fp8_gemm_triton._gemv_tile's per-group partial sums: 8 fp16 / 4 fp32 columns a group)
             dict(BM=1, BN=8, KU=4, num_warps=4, num_stages=2, PSUM=True),
             dict(BM=4, BN=4, KU=2, num_warps=4, num_stages=1, PSUM=True)]
    return [dict(c) for c in sorted(seen | {_key(c) for c in extra})]


def _cfg_id(cfg):
    return "-".join(f"{k}{v}" for k, v in cfg.items())


@interp
@pytest.mark.parametrize("cfg", _configs(), ids=_cfg_id)
def test_interp_config_vs_reference(cfg):
    from dsv3.kernels import dense_gemv_triton as k

    g = torch.Generator().manual_seed(cfg["BN"] + 10 * cfg["KU"])
    N, K = 70, 300  # N a multiple of no BN >= 8, K of no 128-chunk: partial tiles and K iterations
    w = torch.randn(N, K, generator=g) * 0.05
    rows = {1: (1,), 2: (2,), 4: (3, 4)}[cfg["BM"]]
    for M in rows + ((6,) if cfg["BM"] == 4 and cfg["BN"] == 8 else ()):  # 6: two row tiles
        for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-5)) if M == rows[0] else ((torch.float16, 2e-3),):
            x = torch.randn(M, K, generator=g).to(dtype)
            y = k.launch(x, w.to(dtype), cfg)
            assert y.shape == (M, N) and y.dtype == dtype
            assert _rel(y, dense_gemv_ref(x, w.to(dtype))) < tol, (M, dtype, _rel(y, dense_gemv_ref(x, w.to(dtype))))


@interp
def test_interp_op_shapes_and_compile_without_graph_break():
    from dsv3.kernels import dense_gemv_triton as k

    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 136, generator=g).half()
    x = torch.randn(2, 1, 136, generator=g).half()
    assert isinstance(k.dense_gemv_op, torch._library.custom_ops.CustomOpDef)
    f = lambda t: kernels.dense_gemv(t, w, backend="triton")  # noqa: E731
    for got in (f(x), torch.compile(f, backend="aot_eager", fullgraph=True)(x)):
        assert got.shape == (2, 1, 24) and _rel(got, dense_gemv_ref(x, w)) < 2e-3
    xs = torch.randn(3, 272, generator=g).half()[:, ::2]  # K strided: copied to a contiguous x
    assert _rel(k.launch(xs, w), dense_gemv_ref(xs, w)) < 2e-3
    assert k.launch(torch.randn(0, 136).half(), w).shape == (0, 24)
    # fp32 output (the router's logits): the fp32 sums of the 16-bit products, unrounded, compiled or not
    f32 = lambda t: kernels.dense_gemv(t, w, out_dtype=torch.float32, backend="triton")  # noqa: E731
    want = dense_gemv_ref(x, w, torch.float32)
    assert want.dtype == torch.float32 and torch.equal(want, F.linear(x.float(), w.float()))
    for got in (f32(x), torch.compile(f32, backend="aot_eager", fullgraph=True)(x)):
        assert got.dtype == torch.float32 and got.shape == (2, 1, 24) and _rel(got, want) < 1e-6
    with pytest.raises(TypeError, match="or float32"):
        kernels.dense_gemv(x, w, out_dtype=torch.bfloat16, backend="triton")
    with pytest.raises(ValueError, match="K = 135"):  # the contract, checked by the launch on this path
        kernels.dense_gemv(x[..., :135], w, backend="triton")
    with pytest.raises(TypeError, match="one dtype"):
        kernels.dense_gemv(x, w.float(), backend="triton")


@interp
def test_interp_model_forward_through_the_kernel(monkeypatch):
    """Every Linear of a tiny fp32 model through the interpreted kernel (forced: the CPU never fits the rule)
    gives the F.linear model's logits."""
    from dsv3.kernels import dense_gemv_triton as k

    launches, launch = [], k.launch
    monkeypatch.setattr(k, "launch", lambda x, w, config=None, out_dtype=None: launches.append(w.shape)
                        or launch(x, w, config, out_dtype))
    model = make_model(tiny_cfg())
    ids = rand_ids(model.config, B=1, T=3)
    with torch.no_grad():
        want = model(ids, with_mtp=False).logits
        with kernels.use_backend(dense_gemv="triton"):
            got = model(ids, with_mtp=False).logits
    n_linears = sum(type(m) is Linear for name, m in model.named_modules() if not name.startswith("mtp"))
    n_routers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert len(launches) == n_linears + n_routers  # (the routers' logits: fp32 out)
    assert _rel(got, want) < 1e-5, _rel(got, want)


@interp
def test_interp_engine_decode_step_through_the_kernel(monkeypatch):
    """The engine's static decode step (bucketed, run eagerly on the CPU: what a CUDA graph records on a GPU)
    with every Linear through the interpreted kernel (forced) gives the same next-token logits."""
    from dsv3.kernels import dense_gemv_triton as k

    rows, launch = [], k.launch
    monkeypatch.setattr(k, "launch", lambda x, w, config=None, out_dtype=None: rows.append(x.shape[0])
                        or launch(x, w, config, out_dtype))
    model = make_model(tiny_cfg(num_nextn_predict_layers=0))

    want = decode_step(model)[0]
    with kernels.use_backend(dense_gemv="triton"):
        got = decode_step(model)[0]
    assert 2 in rows  # the decode step's two rows went through the kernel (the prefill's too: forced)
    assert _rel(got, want) < 1e-5, _rel(got, want)


def _sweep_on_cpu(monkeypatch):
    """bench/dense_gemv_sweep.py on a tiny shape on the CPU (conftest.sweep_on_cpu): interpreted kernels."""
    import sys

    from conftest import sweep_on_cpu

    bench = _bench()
    sweep_on_cpu(monkeypatch, bench, sys.modules["fp8_gemv_sweep"])  # (the FP8 sweep's `measure` times the configs)
    monkeypatch.setattr(bench, "shapes", lambda p: [dict(preset=p, name="lin", N=40, K=200, per_step=2)])
    return bench


@interp
def test_interp_sweep_runs_reports_and_flags_a_wrong_kernel(monkeypatch, tmp_path, capsys):
    import json

    from dsv3.kernels import dense_gemv_triton as k

    bench = _sweep_on_cpu(monkeypatch)
    assert bench.main(["--quick", "--calls", "2", "--rows", "1,3", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "failed" not in out and "per token step at M = 3" in out
    shapes = json.load(open(tmp_path / "r.json"))["shapes"]
    assert [s["M"] for s in shapes] == [1, 3] and all(s["model"] == k.default_config(s["M"], 40, 200) for s in shapes)
    launch = k.launch
    monkeypatch.setattr(k, "launch", lambda x, w, cfg=None: launch(x, w, cfg) * (1.1 if cfg["BN"] == 4 else 1.0))
    monkeypatch.setattr(bench, "stage1", lambda M, quick: [dict(BM=1, BN=4, KU=1, num_warps=4, num_stages=1)])
    assert bench.main(["--quick", "--calls", "2", "--rows", "1"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


# --- two projections of one input in one launch (MLA's q and kv_a at decode) -------------------------------------

def _mla_decode_step(q_lora, fp8: bool):
    """A tiny bf16 MLA (q_proj, or q_a_proj with q_lora_rank), its q and kv_a projections FP8Linear if `fp8`, and
    one decode step of it over a paged latent cache: (mla, its first query projection, run)."""
    from dsv3.inference.cache import PagedLatentCache
    from dsv3.model.fp8 import FP8Linear
    from dsv3.model.mla import MLA

    cfg = tiny_cfg(q_lora_rank=q_lora)
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, 0, 0.05) if p.dim() > 1 else torch.nn.init.ones_(p)
    q_name = "q_proj" if q_lora is None else "q_a_proj"
    if fp8:
        for name in (q_name, "kv_a_proj_with_mqa"):
            setattr(mla, name, FP8Linear.from_linear(getattr(mla, name)))
    mla.to(BF16).requires_grad_(False)
    cache = PagedLatentCache(1, 4, 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=BF16)
    blocks = cache.allocate(2)
    x = torch.randn(1, 1, cfg.hidden_size, dtype=BF16)
    cos, sin = torch.ones(1, 1, cfg.qk_rope_head_dim // 2), torch.zeros(1, 1, cfg.qk_rope_head_dim // 2)
    return mla, getattr(mla, q_name), lambda: mla(x, cos, sin, cache=cache.batch([blocks], [3], [1]).layer(0))


def test_absorbed_mla_takes_both_projections_in_one_call(monkeypatch, switched_on):
    """Where the dense GEMV runs, absorbed MLA computes q_proj (or q_a_proj) and kv_a_proj_with_mqa of x with one
    `dense_gemv2` call (both weights, both of the kernel's results used: a marker added to either output moves
    the attention output, and without markers it equals the unfused path); elsewhere its Linears as before; and
    not where a module has hooks (they would be skipped)."""
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op == "dense_gemv" and len(t) == 2 and kb._dense_gemv_fits(*t))
    calls, marker = [], {"q": 0.0, "kv": 0.0}

    def fake(x, w1, w2, *, backend=None):
        calls.append((w1, w2))
        return F.linear(x, w1) + marker["q"], F.linear(x, w2) + marker["kv"]

    monkeypatch.setattr(kernels, "dense_gemv2", fake)
    monkeypatch.setattr(kernels, "dense_gemv", lambda x, w, *, out_dtype=None, backend=None: F.linear(x, w))
    for q_lora in (None, 24):
        mla, q_mod, run = _mla_decode_step(q_lora, fp8=False)
        with torch.no_grad():
            kernels.set_dense_gemv(False)
            want = run()
            kernels.set_dense_gemv(True)
            got = {}
            for name, m in (("plain", {}), ("q", {"q": 1.0}), ("kv", {"kv": 1.0})):
                marker.update({"q": 0.0, "kv": 0.0, **m})
                got[name] = run()
                assert len(calls) == 1 and calls[-1][0] is q_mod.weight and calls[-1][1] is mla.kv_a_proj_with_mqa.weight
                calls.clear()
            marker.update(q=0.0, kv=0.0)
            torch.testing.assert_close(got["plain"], want, rtol=0, atol=0)
            assert not torch.equal(got["q"], want) and not torch.equal(got["kv"], want)
            seen = []
            h = mla.kv_a_proj_with_mqa.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
            torch.testing.assert_close(run(), want, rtol=0, atol=0)
            h.remove()
            assert not calls and len(seen) == 1  # a hooked module runs as a module, its hook fires
            h = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: seen.append(type(mod)))
            try:  # a global hook (module trackers, FlopCounterMode) too
                torch.testing.assert_close(run(), want, rtol=0, atol=0)
            finally:
                h.remove()
            assert not calls and len(seen) > 2
            run()
            assert len(calls) == 1  # without hooks the fused call again
            calls.clear()


@interp
def test_interp_dual_launch_vs_reference():
    from dsv3.kernels import dense_gemv_triton as k

    g = torch.Generator().manual_seed(7)
    for N1, N2, K in ((70, 24, 300), (200, 130, 136), (8, 576, 128)):
        w1, w2 = torch.randn(N1, K, generator=g) * 0.05, torch.randn(N2, K, generator=g) * 0.05
        for M in (1, 2, 3, 4, 6):
            for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-5)):
                x = torch.randn(M, K, generator=g).to(dtype)
                y1, y2 = k.launch_dual(x, w1.to(dtype), w2.to(dtype))
                assert y1.shape == (M, N1) and y2.shape == (M, N2) and y1.dtype == dtype
                assert _rel(y1, dense_gemv_ref(x, w1.to(dtype))) < tol
                assert _rel(y2, dense_gemv_ref(x, w2.to(dtype))) < tol
    x = torch.randn(2, 1, 136, generator=g).half()
    w1, w2 = torch.randn(24, 136, generator=g).half(), torch.randn(40, 136, generator=g).half()
    f = lambda t: kernels.dense_gemv2(t, w1, w2, backend="triton")  # noqa: E731
    for a, b in (f(x), torch.compile(f, backend="aot_eager", fullgraph=True)(x)):
        assert a.shape == (2, 1, 24) and b.shape == (2, 1, 40)
        assert _rel(a, dense_gemv_ref(x, w1)) < 2e-3 and _rel(b, dense_gemv_ref(x, w2)) < 2e-3


# --- the same for e4m3 weights (an FP8 checkpoint's FP8Linear q and kv_a projections) ---------------------------

def test_absorbed_mla_takes_both_fp8_projections_in_one_call(monkeypatch):
    """With FP8Linear q_proj (or q_a_proj) and kv_a_proj_with_mqa, where the FP8 decode GEMM runs, absorbed MLA
    computes both with one `fp8_weight_linear2` call (weights and scales of both; a marker on either output moves
    the attention output; without markers it equals the two modules' path); not where a module has hooks, nor
    where the FP8 decode GEMM does not run."""
    from dsv3.kernels.reference import fp8_weight_linear_ref

    fits = {"on": True}
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op == "fp8_weight_gemm" and fits["on"])
    calls, marker = [], {"q": 0.0, "kv": 0.0}

    def fake(x, w1, s1, w2, s2, *, backend=None):
        calls.append((w1, s1, w2, s2))
        return fp8_weight_linear_ref(x, w1, s1) + marker["q"], fp8_weight_linear_ref(x, w2, s2) + marker["kv"]

    monkeypatch.setattr(kernels, "fp8_weight_linear2", fake)
    monkeypatch.setattr(kernels, "fp8_weight_linear", lambda x, w, s, *, backend=None: fp8_weight_linear_ref(x, w, s))
    for q_lora in (None, 24):
        mla, q_mod, run = _mla_decode_step(q_lora, fp8=True)
        kv_mod = mla.kv_a_proj_with_mqa
        with torch.no_grad():
            fits["on"] = False
            want = run()
            assert not calls  # the FP8 decode GEMM not taken: the modules, one at a time
            fits["on"] = True
            got = {}
            for name, m in (("plain", {}), ("q", {"q": 1.0}), ("kv", {"kv": 1.0})):
                marker.update({"q": 0.0, "kv": 0.0, **m})
                got[name] = run()
                assert len(calls) == 1 and [t is u for t, u in zip(calls[-1], (
                    q_mod.weight, q_mod.weight_scale_inv, kv_mod.weight, kv_mod.weight_scale_inv))] == [True] * 4
                calls.clear()
            marker.update(q=0.0, kv=0.0)
            torch.testing.assert_close(got["plain"], want, rtol=0, atol=0)
            assert not torch.equal(got["q"], want) and not torch.equal(got["kv"], want)
            h = kv_mod.register_forward_hook(lambda mod, i, o: None)
            torch.testing.assert_close(run(), want, rtol=0, atol=0)
            h.remove()
            assert not calls  # a hooked module runs as a module


@interp
def test_interp_fp8_dual_launch_vs_reference():
    """e4m3 weights with their block scales through the dual launch: ragged N and K (scale rows and columns cut
    by a tile's end, w2's tiles starting mid-grid), 1-4 rows, its own config and other BN; then the public op
    (its custom op compiled without a graph break; above 4 rows two single launches)."""
    from dsv3.kernels import dense_gemv_triton as k
    from dsv3.kernels.reference import fp8_weight_linear_ref, weight_quant

    g = torch.Generator().manual_seed(9)
    for N1, N2, K in ((70, 24, 300), (200, 130, 136), (8, 576, 128), (384, 200, 520)):
        (w1, s1), (w2, s2) = (weight_quant(torch.randn(n, K, generator=g) * 0.05) for n in (N1, N2))
        for M in (1, 2, 3, 4):
            x = torch.randn(M, K, generator=g).half()
            for cfg in (None, dict(BM=k._pow2(M), BN=16, KU=2, num_warps=4, num_stages=1),
                        dict(BM=4, BN=64, KU=1, num_warps=4, num_stages=2),
                        dict(BM=k._pow2(M), BN=8, KU=4, num_warps=4, num_stages=2, PSUM=True)):
                y1, y2 = k.launch_dual(x, w1, w2, cfg, s1=s1, s2=s2)
                assert y1.shape == (M, N1) and y2.shape == (M, N2) and y1.dtype == torch.float16
                assert _rel(y1, fp8_weight_linear_ref(x, w1, s1)) < 2e-3, (N1, N2, K, M, cfg)
                assert _rel(y2, fp8_weight_linear_ref(x, w2, s2)) < 2e-3, (N1, N2, K, M, cfg)
    (w1, s1), (w2, s2) = weight_quant(torch.randn(136, 264, generator=g)), weight_quant(torch.randn(40, 264, generator=g))
    f = lambda t: kernels.fp8_weight_linear2(t, w1, s1, w2, s2, backend="triton")  # noqa: E731
    for rows in (1, 3, 6):
        x = torch.randn(rows, 1, 264, generator=g).half()
        for a, b in (f(x), torch.compile(f, backend="aot_eager", fullgraph=True)(x)):
            assert a.shape == (rows, 1, 136) and b.shape == (rows, 1, 40)
            assert _rel(a, fp8_weight_linear_ref(x, w1, s1)) < 2e-3 and _rel(b, fp8_weight_linear_ref(x, w2, s2)) < 2e-3
    with pytest.raises(AssertionError, match="scales"):
        kernels.fp8_weight_linear2(x, w1, s1, w2, s1)
