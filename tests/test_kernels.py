"""The kernel seam (dsv3/kernels): which backend runs, the override, and the references the
accelerated backends are held to. On the CPU:

    python -m pytest tests/test_kernels.py -q

  * the choice: every op runs its reference on the CPU; the capability table of backend.py; the
    per-call decode conditions; `use_backend` and `backend=` (priority, nesting, bad names);
  * the FP8 ops on the CPU are their references (layouts of the Triton quantisers included) and
    check their inputs; the selection traces under torch.compile (fullgraph);
  * AdamW: the reference is bitwise torch.optim.AdamW(foreach=True) with fp32 moments, weight decay
    on and off, several shapes and bucketings, over 6 steps; a grad_scale equals torch's
    clip_grad_norm_ then step, bitwise; bf16 moments are read up, updated, used unrounded, rounded
    back (exactly); DTensor parameters (FSDP2 on a 1-rank gloo group) give the plain tensors' bits.

With triton installed and TRITON_INTERPRET=1, the Triton AdamW kernel is also run by the
interpreter against the reference (else skipped):

    TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -q

GPU parity: tests/test_gpu*.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels import reference
from dsv3.training.optim import AdamW

E4M3 = torch.float8_e4m3fn


def _same_fp8(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# --- the choice ----------------------------------------------------------------------------------

def test_every_op_runs_its_reference_on_the_cpu():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    for op in kb.FAST:
        assert kernels.select_backend(op, x) == "reference", op
        assert not kernels.backend_available(op, "cpu"), op
    assert kernels.adamw_backend([torch.nn.Parameter(torch.randn(3))]) == "reference"
    assert kernels.adamw_backend([]) == "reference"
    with pytest.raises(ValueError, match="unknown kernel op"):
        kernels.select_backend("fp8_gemmm", x)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device with triton and F.scaled_mm; the test sets the capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    probes = {"triton": True, "scaled_mm": True}
    monkeypatch.setattr(kb, "_probes", probes)

    def set_capability(cap):
        probes[("capability", 0)] = cap

    return set_capability


def test_capability_table(fake_gpu):
    """backend.available: fp8_gemm needs SM 9.x, the FP8 quantisers and grouped GEMMs SM 8.9+, the rest any
    CUDA device with triton."""
    want = {  # capability -> ops with an accelerated backend
        (8, 0): {"fp8_weight_gemm", "fp8_expert_rows", "expert_gemv", "dense_gemv", "head_gemv", "latent_store",
                 "swiglu_gemv", "moe_gemm", "mla_decode", "mla_uv", "adamw", "router_topk", "shared_gemv",
                 "mla_prep", "hashed_race"},
        (8, 9): {"fp8_quant", "fp8_grouped_gemm", "fp8_weight_gemm", "fp8_expert_rows", "expert_gemv", "dense_gemv",
                 "head_gemv", "latent_store", "swiglu_gemv", "moe_gemm", "mla_decode", "mla_uv", "adamw",
                 "router_topk", "shared_gemv", "mla_prep", "hashed_race"},
        (9, 0): set(kb.FAST),
        (10, 0): set(kb.FAST) - {"fp8_gemm"},
    }
    for cap, ops in want.items():
        fake_gpu(cap)
        got = {op for op in kb.FAST if kb.available(op, "cuda:0")}
        assert got == ops, (cap, got)
    fake_gpu((9, 0))
    kb._probes["scaled_mm"] = False  # torch < 2.10
    assert not kb.available("fp8_gemm", "cuda:0") and kb.available("fp8_quant", "cuda:0")
    kb._probes["triton"] = False
    assert not any(kb.available(op, "cuda:0") for op in kb.FAST)
    assert not kb.available("adamw", "cpu")


def test_e4m3_weights_need_sm89_in_the_new_decode_kernels(fake_gpu, monkeypatch):
    """The grouped decode GEMM and the dense SwiGLU GEMV convert e4m3 weights in Triton, which compiles e4m3 for
    SM 8.9+ only: on an A100 their rules refuse FP8 weights and keep 16-bit ones."""
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    w8 = torch.zeros(4, 64, 128).to(torch.float8_e4m3fn)
    g8 = torch.zeros(64, 128).to(torch.float8_e4m3fn)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    for cap, ok in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        fake_gpu(cap)
        assert kb._fast_fits("moe_gemm", (x, w8)) is ok, cap
        assert kb._fast_fits("swiglu_gemv", (x[:1], g8, g8)) is ok, cap  # (one row: DENSE_GEMV_ROWS)
        assert kb._fast_fits("moe_gemm", (x, w8.bfloat16()))
        assert kb._fast_fits("swiglu_gemv", (x[:1], g8.bfloat16(), g8.bfloat16()))


def test_decode_conditions():
    """The Triton FP8-weight GEMMs run for 16-bit activations, few rows and no autograd only."""
    x = torch.randn(3, 1, 64, dtype=torch.bfloat16)
    assert kb._decode_fits(x, kb.DENSE_DECODE_ROWS)
    assert kb._decode_fits(x.half(), kb.DENSE_DECODE_ROWS)
    assert not kb._decode_fits(x.float(), kb.DENSE_DECODE_ROWS)
    assert not kb._decode_fits(torch.randn(kb.DENSE_DECODE_ROWS + 1, 64, dtype=torch.bfloat16), kb.DENSE_DECODE_ROWS)
    assert kb._decode_fits(torch.randn(kb.DENSE_DECODE_ROWS + 1, 64, dtype=torch.bfloat16), kb.EXPERT_DECODE_ROWS)
    xr = x.clone().requires_grad_()
    assert not kb._decode_fits(xr, kb.DENSE_DECODE_ROWS)
    with torch.no_grad():
        assert kb._decode_fits(xr, kb.DENSE_DECODE_ROWS)


def test_override_priority_nesting_and_errors(monkeypatch):
    x = torch.randn(2, 128)
    # the rule says "accelerated" everywhere (as on a GPU)
    monkeypatch.setattr(kb, "_fast_fits", lambda op, tensors: True)
    assert kernels.select_backend("fp8_gemm", x) == "scaled_mm"
    with kernels.use_backend("reference"):
        assert all(kernels.select_backend(op, x) == "reference" for op in kb.FAST)
        with kernels.use_backend(mla_decode="triton"):  # one op back on, inside the blanket override
            assert kernels.select_backend("mla_decode", x) == "triton"
            assert kernels.select_backend("adamw", x) == "reference"
        assert kernels.select_backend("mla_decode", x) == "reference"
        assert kernels.select_backend("adamw", x, backend="triton") == "triton"  # an explicit argument wins
    assert kernels.select_backend("adamw", x) == "triton"  # restored
    with kernels.use_backend(fp8_grouped_gemm="reference"):
        assert kernels.select_backend("fp8_grouped_gemm", x) == "reference"
        assert kernels.select_backend("fp8_quant", x) == "triton"
        assert kernels.select_backend("fp8_grouped_gemm", x, backend="auto") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.select_backend("fp8_gemm", x, backend="triton")  # fp8_gemm's is scaled_mm
    with pytest.raises(ValueError, match="backend must be one of"):
        with kernels.use_backend(adamw="cuda"):
            pass
    with pytest.raises(ValueError, match="unknown kernel op"):
        with kernels.use_backend(adam="reference"):
            pass
    with pytest.raises(ValueError, match="only 'reference'"):
        with kernels.use_backend("triton"):
            pass
    assert kb._forced == {}
    # forcing an accelerated backend on the CPU reaches the op (here: the kernel's device check)
    monkeypatch.undo()
    with kernels.use_backend(fp8_gemm="scaled_mm"):
        assert kernels.select_backend("fp8_gemm", x) == "scaled_mm"


def test_selection_traces_under_torch_compile(monkeypatch):
    """The FP8-weight decode op (kernels.fp8_weight_linear, called by FP8Linear inside the compiled decode
    step) compiles without graph breaks and gives the eager result; the availability probes, met for
    the first time while tracing, are called rather than traced (a failing `import triton` inside a
    traced function would break the graph)."""
    w, s = kernels.weight_quant(torch.randn(96, 200) * 0.05)
    x = torch.randn(3, 200)
    fn = torch.compile(lambda t: kernels.fp8_weight_linear(t, w, s), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), kernels.fp8_weight_linear(x, w, s), rtol=0, atol=0)
    monkeypatch.setattr(kb, "_probes", {})
    probe = torch.compile(lambda t: t * 2 if kb._triton() and kb._scaled_mm() else t, backend="eager", fullgraph=True)
    probe(x)
    assert set(kb._probes) == {"triton"} | ({"scaled_mm"} if kb._probes["triton"] else set())


@pytest.mark.parametrize("cap, fast", [((9, 0), True), ((8, 0), False)])
def test_capability_checks_are_constants_under_torch_compile(monkeypatch, cap, fast):
    """The e4m3 capability rule (kb._sm89, taken by every FP8 decode selection inside the compiled step) is a
    constant of the process: torch 2.11's dynamo cannot trace `tuple >= tuple` on the capability probe's constant
    (the FP8 decode step failed to compile on the H200, 2026-12-05; reproduced on the CPU with torch 2.11)."""
    assert getattr(kb._sm89, "_dynamo_marked_constant", False)
    monkeypatch.setattr(kb, "_probes", {("capability", 0): cap})
    torch._dynamo.reset()  # a constant of the process: the other case's compiled code would be reused
    dev = torch.device("cuda", 0)
    fn = torch.compile(lambda t: t * 2 if kb._sm89(dev) else t, backend="eager", fullgraph=True)
    x = torch.ones(3)
    assert torch.equal(fn(x), x * 2 if fast else x)


# --- the FP8 ops on the CPU: their references -----------------------------------------------------

def test_quantisers_on_the_cpu_are_the_references_in_the_triton_layouts():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 384, generator=g) * torch.logspace(-3, 3, 384)).to(torch.bfloat16)
    q, s = kernels.act_quant_cm(x)
    rq, rs = kernels.act_quant(x)
    assert _same_fp8(q, rq) and torch.equal(s, rs) and s.stride() == (1, 256)
    qt, st = kernels.act_quant_t(x)  # 128x1 tiles of x: quantised xᵀ
    rqt, rst = kernels.act_quant(x.t().contiguous())
    assert _same_fp8(qt, rqt) and torch.equal(st, rst) and st.stride() == (1, 384)
    qt2, st2 = kernels.act_quant_t(q, s)  # re-tiled from the fp8 x
    rqt2, rst2 = kernels.act_quant(kernels.act_dequant(rq, rs).t().contiguous())
    assert _same_fp8(qt2, rqt2) and torch.equal(st2, rst2)
    # with a gradient pre-scale p: the bytes and scales of reference.grad_quant
    gr = torch.randn(256, 384, generator=g) * 1e-9
    p = reference.grad_prescale(gr).reshape(1)
    gq, gs = kernels.act_quant_cm(gr, p)
    hq, hs = reference.grad_quant(gr)
    assert _same_fp8(gq, hq) and torch.equal(gs, hs)
    gtq, gts = kernels.act_quant_t(gr, p=p)
    htq, hts = reference.grad_quant(gr.t().contiguous())
    assert _same_fp8(gtq, htq) and torch.equal(gts, hts)
    w = torch.randn(200, 300, generator=g) * 0.02
    wq, ws, wqt = kernels.weight_quant_pad(w, transposed=True)
    rwq, rws = kernels.weight_quant(w)
    assert _same_fp8(wq, rwq) and _same_fp8(wqt, rwq.t()) and ws.shape == (2, 4)
    assert torch.equal(ws[:, :3], rws) and torch.equal(ws[:, 3], torch.ones(2))


def test_fp8_ops_check_their_inputs():
    with pytest.raises(AssertionError, match="multiple of 128"):
        kernels.act_quant_cm(torch.randn(4, 100))
    with pytest.raises(AssertionError, match="multiples of 128"):
        kernels.act_quant_t(torch.randn(100, 128))
    with pytest.raises(AssertionError, match="1-element fp32"):
        kernels.act_quant_cm(torch.randn(4, 128), torch.ones(2))
    with pytest.raises(AssertionError, match="fp8_gemm_fwd"):
        kernels.fp8_gemm_fwd(torch.randn(4, 128), torch.randn(8, 64), torch.float32)
    w, s = kernels.weight_quant(torch.randn(64, 96))
    with pytest.raises(AssertionError, match="K = 95"):
        kernels.fp8_weight_linear(torch.randn(2, 95), w, s)
    with pytest.raises(AssertionError, match="do not match"):
        kernels.fp8_weight_linear(torch.randn(2, 96), w, s[:, :0])
    with pytest.raises(AssertionError, match="e4m3"):
        kernels.fp8_weight_linear(torch.randn(2, 96), w.float(), s)


def test_fp8_training_ops_on_the_cpu_run_the_reference():
    """The training GEMM ops pick the reference on the CPU (tagged in `saved`) and give its numbers;
    fp8_linear "auto" equals "emulate" there."""
    from dsv3.training.fp8 import fp8_linear

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(130, 256, generator=g), torch.randn(72, 256, generator=g) * 0.05
    y, saved = kernels.fp8_gemm_fwd(x, w, torch.float32)
    ry, _ = reference.fp8_gemm_fwd_ref(x, w, torch.float32)
    assert saved[0] == "reference" and torch.equal(y, ry)
    # scaled_mm asked for unaligned fp8 rows (K % 16) runs the reference
    xu, wu = torch.randn(8, 200, generator=g), torch.randn(16, 200, generator=g)
    assert kernels.fp8_gemm_fwd(xu, wu, torch.float32, backend="scaled_mm")[1][0] == "reference"
    offs = torch.tensor([30, 30, 130], dtype=torch.int32)
    ws = [torch.randn(3, 128, 256, generator=g) * 0.05]
    yg, sg = kernels.fp8_grouped_gemm_fwd(x, ws, offs, torch.float32)
    assert sg[0] == "reference" and torch.equal(yg, reference.fp8_grouped_gemm_fwd_ref(x, ws, offs, torch.float32)[0])
    res = []
    for backend in ("auto", "emulate"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        yy = fp8_linear(xr, wr, backend)
        yy.backward(torch.ones_like(yy))
        res.append((yy, xr.grad, wr.grad))
    assert all(torch.equal(a, b) for a, b in zip(*res))


def test_fp8_weight_ops_on_the_cpu_are_dequantise_then_matmul():
    g = torch.Generator().manual_seed(2)
    w, s = kernels.weight_quant(torch.randn(300, 200, generator=g) * 0.05)
    x = torch.randn(2, 5, 200, generator=g).to(torch.bfloat16)
    assert torch.equal(kernels.fp8_weight_linear(x, w, s), F.linear(x, kernels.weight_dequant(w, s, x.dtype)))
    qs = [kernels.weight_quant(torch.randn(130, 200, generator=g) * 0.05) for _ in range(4)]
    we, se = torch.stack([q for q, _ in qs]), torch.stack([t for _, t in qs])
    expert = torch.tensor([0, 0, 3, 1, 3, 2])
    xe = torch.randn(6, 200, generator=g)
    y = kernels.fp8_expert_rows(xe, we, se, expert)
    ref = torch.stack([xe[m] @ kernels.weight_dequant(we[e], se[e], torch.float32).T
                       for m, e in enumerate(expert.tolist())])
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_mla_decode_op_on_the_cpu_is_the_reference():
    g = torch.Generator().manual_seed(3)
    B, H, C, R, bs, nblk = 3, 4, 32, 16, 4, 3
    kv, pe = torch.randn(40, C, generator=g), torch.randn(40, R, generator=g)
    table = torch.randperm(10, generator=g)[: B * nblk].view(B, nblk)
    lens = torch.tensor([1, 12, 7])
    q_lat, q_pe = torch.randn(B, H, C, generator=g), torch.randn(B, H, R, generator=g)
    out = kernels.mla_decode(q_lat, q_pe, kv, pe, table, lens, bs, 0.3)
    assert torch.equal(out, kernels.mla_decode_ref(q_lat, q_pe, kv, pe, table, lens, bs, 0.3))
    with pytest.raises(AssertionError, match="mla_decode"):
        kernels.mla_decode(q_lat, q_pe[:, :2], kv, pe, table, lens, bs, 0.3)


# --- AdamW: the reference is torch.optim.AdamW ---------------------------------------------------

SHAPES = [(33, 17), (1000,), (3, 8, 5), (1,), (64, 64)]
HP = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)


def _params(seed: int, shapes=SHAPES, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*sh, generator=g).to(dtype)) for sh in shapes]


def _grads(step: int, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(*sh, generator=g) * (10.0 if step % 3 == 0 else 0.1) for sh in shapes]


def _bits(ps) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("bucket_numel", [1 << 24, 1000])  # one bucket; a bucket per tensor or two
def test_reference_is_bitwise_torch_adamw_foreach(weight_decay, bucket_numel):
    """The op (reference backend, fp32 moments) over 6 steps against torch.optim.AdamW(foreach=True)."""
    a, b = _params(0), _params(0)
    opt = torch.optim.AdamW(a, weight_decay=weight_decay, foreach=True, **HP)
    m = [torch.zeros_like(p) for p in b]
    v = [torch.zeros_like(p) for p in b]
    for t in range(1, 7):
        grads = _grads(t)
        for p, g in zip(a, grads):
            p.grad = g.clone()
        opt.step()
        kw = dict(lr=HP["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, step=float(t))
        if bucket_numel == reference.BUCKET_NUMEL:  # through the op
            kernels.adamw_step_(b, grads, m, v, backend="reference", **kw)
        else:
            reference.adamw_step_ref_([p.data for p in b], grads, m, v, bucket_numel=bucket_numel, **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y), (t, (x - y).abs().max())
    for p, mm, vv in zip(a, m, v):
        assert torch.equal(opt.state[p]["exp_avg"], mm) and torch.equal(opt.state[p]["exp_avg_sq"], vv)
    assert len(reference.buckets([p.numel() for p in b], bucket_numel)) == (1 if bucket_numel == 1 << 24 else 4)
    assert all(torch.equal(g, h) for g, h in zip(grads, _grads(6)))  # the gradients are only read


def test_adamw_class_fp32_is_bitwise_torch_adamw_with_groups():
    """dsv3's AdamW (state_dtype fp32, two groups with and without decay) against torch's foreach AdamW."""
    def groups(ps):
        return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}]

    a, b = _params(1), _params(1)
    ta = torch.optim.AdamW(groups(a), foreach=True, **HP)
    ob = AdamW(groups(b), state_dtype=torch.float32, **HP)
    assert not ob.fused
    for t in range(1, 7):
        for ps in (a, b):
            for p, g in zip(ps, _grads(t)):
                p.grad = g
        ta.step()
        ob.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # the clip binds / does not (coefficient 1)
def test_grad_scale_is_bitwise_clip_grad_norm_then_step(max_norm):
    """torch: clip_grad_norm_(params, c); AdamW.step(). dsv3: step(grad_scale=coef) with torch's
    coefficient min(1, c / (norm + 1e-6)); the .grad tensors are left unclipped."""
    a, b = _params(2), _params(2)
    ta = torch.optim.AdamW(a, weight_decay=0.1, foreach=True, **HP)
    ob = AdamW([{"params": b, "weight_decay": 0.1}], state_dtype=torch.float32, **HP)
    for t in range(1, 7):
        for ps in (a, b):
            for p, g in zip(ps, _grads(t)):
                p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(a, max_norm, foreach=True)
        ta.step()
        nb = torch.nn.utils.get_total_norm([p.grad for p in b])
        coef = torch.clamp(max_norm / (nb + 1e-6), max=1.0)
        assert torch.equal(norm, nb) and (coef < 1).item() == (max_norm < 1)
        ob.step(grad_scale=coef)
        assert all(torch.equal(p.grad, g) for p, g in zip(b, _grads(t)))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), t


def test_bf16_moments_are_read_up_updated_used_unrounded_and_rounded_back():
    """One step from bf16 moments equals the fp32 step from the same (upcast) moments: the parameters
    bit for bit (the update uses the unrounded fp32 moments), the stored moments the fp32 ones rounded to
    nearest; over several steps the moments stay bf16."""
    ps = _params(3)
    m16 = [(torch.randn(p.shape) * 0.1).to(torch.bfloat16) for p in ps]
    v16 = [(torch.rand(p.shape) * 0.01).to(torch.bfloat16) for p in ps]
    p32 = [p.detach().clone() for p in ps]
    m32, v32 = [x.float() for x in m16], [x.float() for x in v16]
    grads = _grads(4)
    scale = torch.tensor(0.7)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=4.0, grad_scale=scale)
    kernels.adamw_step_([p.data for p in ps], grads, m16, v16, **kw)
    kernels.adamw_step_(p32, grads, m32, v32, **kw)
    assert all(torch.equal(p, q) for p, q in zip(ps, p32))
    assert all(x.dtype == torch.bfloat16 and torch.equal(x, y.to(torch.bfloat16)) for x, y in zip(m16, m32))
    assert all(torch.equal(x, y.to(torch.bfloat16)) for x, y in zip(v16, v32))
    assert not all(torch.equal(x.float(), y) for x, y in zip(m16, m32))  # the rounding is real
    opt = AdamW(ps, lr=1e-2, state_dtype=torch.bfloat16)
    for t in range(1, 4):
        for p, g in zip(ps, _grads(t)):
            p.grad = g
        opt.step()
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in opt.state.values())


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_adamw_skip_flag_changes_nothing_and_the_next_step_is_the_unskipped_one(state_dtype):
    """AdamW.step(skip=True) with NaN gradients (the loop's non-finite guard): parameters, moments and step
    counts keep every bit; skip=False is bitwise the step without a flag; so steps g1, (NaN, skipped), g2,
    g3 end bitwise where g1, g2, g3 do (the bias corrections use the applied steps' count)."""
    def groups(ps):
        return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}]

    a, b = _params(4), _params(4)
    oa = AdamW(groups(a), state_dtype=state_dtype, **HP)
    ob = AdamW(groups(b), state_dtype=state_dtype, **HP)
    nan = [torch.full(sh, float("nan")) for sh in SHAPES]
    no, yes = torch.tensor(False), torch.tensor(True)
    for t, grads in enumerate([_grads(1), nan, _grads(2), _grads(3)]):
        for p, g in zip(a, grads):
            p.grad = g.clone()
        before = ([p.detach().clone() for p in a], {k: {n: x.clone() for n, x in st.items()}
                                                    for k, st in enumerate(oa.state.values())})
        skipped = t == 1
        oa.step(grad_scale=torch.tensor(0.5), skip=yes if skipped else no)
        if skipped:
            assert all(torch.equal(p, q) for p, q in zip(a, before[0]))
            after = {k: st for k, st in enumerate(oa.state.values())}
            assert all(torch.equal(after[k][n], x) for k, st in before[1].items() for n, x in st.items())
            continue
        for p, g in zip(b, grads):
            p.grad = g.clone()
        ob.step(grad_scale=torch.tensor(0.5))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), t
    for p, q in zip(a, b):
        sa, sb = oa.state[p], ob.state[q]
        assert float(sa["step"]) == float(sb["step"]) == 3.0
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_adamw_op_skip_flag_is_decided_on_the_device():
    """The op with skip: a 0-dim bool tensor selects, per call, between the update and no change."""
    ps, grads = _params(5), _grads(5)
    m = [torch.randn(p.shape) for p in ps]
    v = [torch.rand(p.shape) for p in ps]
    ref = [_bits(ps), [x.clone() for x in m], [x.clone() for x in v]]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=2.0)
    kernels.adamw_step_([p.data for p in ps], grads, m, v, skip=torch.tensor(True), **kw)
    assert all(torch.equal(x, y) for x, y in zip(ps + m + v, ref[0] + ref[1] + ref[2]))
    kernels.adamw_step_([p.data for p in ps], grads, m, v, skip=torch.tensor(False), **kw)
    kernels.adamw_step_(ref[0], grads, ref[1], ref[2], **kw)
    assert all(torch.equal(x, y) for x, y in zip(ps + m + v, ref[0] + ref[1] + ref[2]))
    with pytest.raises(AssertionError, match="skip is a 1-element bool tensor"):
        kernels.adamw_step_([p.data for p in ps], grads, m, v, skip=torch.tensor(1.0), **kw)


def test_adamw_op_checks_its_inputs():
    p, g = torch.randn(4), torch.randn(4)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1.0)
    with pytest.raises(AssertionError, match="list lengths"):
        kernels.adamw_step_([p], [g], [torch.zeros(4)], [], **kw)
    with pytest.raises(AssertionError, match="shape"):
        kernels.adamw_step_([p], [torch.randn(5)], [torch.zeros(4)], [torch.zeros(4)], **kw)
    with pytest.raises(AssertionError, match="grad_scale"):
        kernels.adamw_step_([p], [g], [torch.zeros(4)], [torch.zeros(4)], grad_scale=torch.ones(2), **kw)
    with pytest.raises(ValueError, match="fused=True"):
        AdamW([torch.nn.Parameter(p)], lr=1e-3, fused=True)


# --- AdamW on DTensors (FSDP2) -------------------------------------------------------------------

@pytest.fixture
def gloo_one_rank():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")

    from torch.distributed.device_mesh import init_device_mesh

    from tests.distributed.harness import free_port

    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_adamw_on_dtensors_equals_plain_tensors(gloo_one_rank, monkeypatch):
    """FSDP2-sharded parameters (DTensors, 1-device mesh) and distribute_tensor ones: the op runs on
    their local shards (what the backend choice sees, so sharded parameters get the plain rule), the
    parameters stay DTensors, and the numbers equal the plain tensors' bit for bit, with a DTensor
    grad_scale (the norm of DTensor gradients) too."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = gloo_one_rank
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    sharded = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    extra_plain = torch.nn.Parameter(torch.randn(10, 6))
    extra = torch.nn.Parameter(distribute_tensor(extra_plain.detach().clone(), mesh, [Shard(0)]))

    seen = []
    select = kernels.select_backend
    monkeypatch.setattr(kernels, "select_backend", lambda op, *ts, **kw: seen.extend(ts) or select(op, *ts, **kw))
    ps = [*plain.parameters(), extra_plain]
    pd = [*sharded.parameters(), extra]
    oa = AdamW([{"params": ps, "weight_decay": 0.1}], lr=1e-2, state_dtype=torch.float32)
    ob = AdamW([{"params": pd, "weight_decay": 0.1}], lr=1e-2, state_dtype=torch.float32)
    assert not ob.fused and seen and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in seen)
    x = torch.randn(5, 16)
    for t in range(1, 5):
        for model, e in ((plain, extra_plain), (sharded, extra)):
            (model(x).pow(2).mean() * t).backward()
            e.pow(3).sum().backward()
        assert isinstance(extra.grad, DTensor) and isinstance(pd[0].grad, DTensor)
        na = torch.nn.utils.get_total_norm([p.grad for p in ps])
        nb = torch.nn.utils.get_total_norm([p.grad for p in pd])
        assert isinstance(nb, DTensor)
        oa.step(grad_scale=torch.clamp(0.5 / (na + 1e-6), max=1.0))
        ob.step(grad_scale=torch.clamp(0.5 / (nb + 1e-6), max=1.0))
        for o in (oa, ob):
            o.zero_grad(set_to_none=True)
    assert all(isinstance(p, DTensor) for p in pd)
    for a, b in zip(ps, pd):
        assert torch.equal(a.detach(), b.full_tensor().detach())
    for a, b in zip(ps, pd):
        assert torch.equal(oa.state[a]["exp_avg_sq"], ob.state[b]["exp_avg_sq"].full_tensor())
    # the op directly on replicated DTensors
    r = distribute_tensor(torch.randn(7), mesh, [Replicate()])
    rp, q = r.to_local().clone(), r.to_local().clone()
    grad = torch.randn(7)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1.0)
    kernels.adamw_step_([r], [distribute_tensor(grad, mesh, [Replicate()])], [torch.zeros_like(r)],
                        [torch.zeros_like(r)], **kw)
    kernels.adamw_step_([q], [grad], [torch.zeros(7)], [torch.zeros(7)], **kw)
    assert isinstance(r, DTensor) and torch.equal(r.to_local(), q) and not torch.equal(q, rp)


# --- the Triton AdamW kernel under the interpreter -----------------------------------------------

def _interpreter() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _interpreter(), reason="needs triton and TRITON_INTERPRET=1")
def test_interp_triton_adamw_vs_reference():
    """dsv3/kernels/adamw_triton.py (forced: backend="triton", CPU tensors under the interpreter) against
    the reference, fp32 moments, 4 steps with and without a grad_scale (one with skip=False), then a
    skipped step of NaN gradients that changes nothing: fp32 op order only. (bf16
    moments only on the GPU, tests/test_gpu.py: the interpreter truncates fp32 -> bf16 where the GPU
    rounds to nearest, measured.)"""
    shapes = [(257, 129), (1000,), (3, 64, 7)]
    ps = [_params(5, shapes) for _ in range(2)]
    ms = [[torch.zeros(sh) for sh in shapes] for _ in range(2)]
    vs = [[torch.zeros(sh) for sh in shapes] for _ in range(2)]
    for t in range(1, 5):
        grads = _grads(t, shapes)
        scale = torch.tensor(0.37) if t % 2 else None
        for i, backend in enumerate(("triton", "reference")):
            kernels.adamw_step_([p.data for p in ps[i]], grads, ms[i], vs[i], lr=1e-2, beta1=0.9, beta2=0.95,
                                eps=1e-8, weight_decay=0.1, step=float(t), grad_scale=scale, backend=backend,
                                skip=torch.tensor(False) if t == 3 else None)
    before = [[x.clone() for x in xs] for xs in (ps[0], ms[0], vs[0])]
    nan = [torch.full(sh, float("nan")) for sh in shapes]  # a skipped step: not a bit changes
    kernels.adamw_step_([p.data for p in ps[0]], nan, ms[0], vs[0], lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                        weight_decay=0.1, step=5.0, skip=torch.tensor(True), backend="triton")
    assert all(torch.equal(x, y) for xs, ys in zip((ps[0], ms[0], vs[0]), before) for x, y in zip(xs, ys))
    for a, b in zip(*ps):
        assert (a - b).abs().max() < 1e-6, (a - b).abs().max()
    for a, b in zip(*ms):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not _interpreter(), reason="needs triton and TRITON_INTERPRET=1")
def test_interp_triton_adamw_writes_the_bf16_copies_of_fp32_masters():
    """The kernel's extra output (`copy=`, bf16 working weights with fp32 masters, dsv3/training/optim.py):
    fp32 masters and bf16 gradients, 3 steps with and without a grad_scale against the reference (which
    copies with torch), then a skipped step that leaves masters, moments and copies as they were. The
    copies are the new masters in bf16: within one bf16 ulp under the interpreter (it truncates where the
    GPU rounds to nearest; tests/test_gpu.py checks them bitwise there)."""
    shapes = [(257, 129), (1000,), (3, 64, 7)]
    ps = [_params(6, shapes) for _ in range(2)]
    cs = [[p.detach().bfloat16() for p in ps[i]] for i in range(2)]
    ms = [[torch.zeros(sh) for sh in shapes] for _ in range(2)]
    vs = [[torch.zeros(sh) for sh in shapes] for _ in range(2)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for t in range(1, 4):
        grads = [g.bfloat16() for g in _grads(t, shapes)]
        scale = torch.tensor(0.37) if t % 2 else None
        for i, backend in enumerate(("triton", "reference")):
            kernels.adamw_step_([p.data for p in ps[i]], grads, ms[i], vs[i], **kw, step=float(t), grad_scale=scale,
                                backend=backend, copies=cs[i])
    for a, b in zip(*ps):
        assert (a - b).abs().max() < 1e-6
    for c, ref, master in zip(cs[0], cs[1], ps[0]):
        assert c.dtype == torch.bfloat16 and torch.equal(ref, master.detach().bfloat16())
        ulp = master.detach().abs() * 2.0 ** -7
        assert ((c.float() - master.detach()).abs() <= ulp).all()  # (the masters moved ~3e-2: a stale copy fails)
    before = [[x.clone() for x in xs] for xs in (ps[0], ms[0], vs[0], cs[0])]
    nan = [torch.full(sh, float("nan"), dtype=torch.bfloat16) for sh in shapes]
    kernels.adamw_step_([p.data for p in ps[0]], nan, ms[0], vs[0], **kw, step=4.0, skip=torch.tensor(True),
                        backend="triton", copies=cs[0])
    assert all(torch.equal(x, y) for xs, ys in zip((ps[0], ms[0], vs[0], cs[0]), before) for x, y in zip(xs, ys))


def test_switches_from_the_environment():
    """DSV3_KERNELS turns the switched decode kernels on (or off) from the command line, read at the first choice;
    a malformed value or an unknown op is refused with the accepted names."""
    import os
    import subprocess
    import sys

    assert kb.switches_from_env(None) == {} and kb.switches_from_env("") == {}
    assert kb.switches_from_env("all=on") == {op: True for op in kb.SWITCHED}
    assert kb.switches_from_env("all=on, moe_gemm=off") == {**{op: True for op in kb.SWITCHED}, "moe_gemm": False}
    assert kb.switches_from_env("dense_gemv=1,head_gemv=false") == {"dense_gemv": True, "head_gemv": False}
    with pytest.raises(ValueError, match="not a switched kernel op.*dense_gemv"):
        kb.switches_from_env("expert_gemv=on")
    with pytest.raises(ValueError, match="op=on|off"):
        kb.switches_from_env("dense_gemv")
    with pytest.raises(ValueError, match="op=on|off"):
        kb.switches_from_env("dense_gemv=maybe")
    code = ("from dsv3.kernels import backend as kb; import torch; kb.select('dense_gemv', torch.zeros(1, 1), "
            "torch.zeros(1, 1)); print(sorted(op for op, on in kb.SWITCHED.items() if on))")
    good_env = {**os.environ, "DSV3_KERNELS": "all=on,latent_store=off"}
    env = {**os.environ, "DSV3_KERNELS": "bogus=on"}
    # the three fresh processes side by side (each ~2 s of a core importing torch)
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, e in (([sys.executable, "-c", code], good_env), ([sys.executable, "-c", code], env),
                            ([sys.executable, "-m", "dsv3.cli", "info", "--preset", "tiny"], env))]
    (good, good_err), (_, bad_err), (_, cli_err) = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 0, good_err
    assert good.strip() == str(sorted(set(kb.SWITCHED) - {"latent_store"}))
    assert procs[1].returncode != 0 and "bogus" in bad_err
    assert "ValueError: DSV3_KERNELS: 'bogus' is not a switched kernel op" in bad_err  # (the CLI's one-line kind)
    # read at the first choice, not at import: a verb that chooses no kernel runs, and one that does fails inside
    # the command, where the CLI turns a ValueError into its one-line error (not an import traceback)
    assert procs[2].returncode == 0 and "Traceback" not in cli_err, cli_err
