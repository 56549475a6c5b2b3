"""The latent store and absorbed MLA's W_UK head GEMV in one launch (dsv3/kernels/mla_prep_triton.py,
`kernels.mla_prep`), and MLA / the static decode views taking it.

    python -m pytest -q tests/test_mla_prep.py                      (CPU, CI: no triton needed; + the sm_90 compile)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_mla_prep.py   (+ the kernel, interpreted)

CPU: the reference is the two operations' references; the argument contract; the switch is off by default and the
rule is both operations' rules with W_UKᵀ read along C; MLA takes the merged launch exactly where it takes both the
fused store and the W_UK head GEMV and the switch is on (else the two launches as before), hands it the query's
views and W_UKᵀ as a view of kv_b_proj's weight, with the same output and cache bit for bit; the engine's static
decode step with the switch on equals the step with it off, bit for bit. sm_90 compile (triton's NVIDIA back end and
ptxas, no GPU): the merged launch at the 16b and 671B shapes keeps the GEMV's fused multiply-adds and nothing else
(enable_fp_fusion=False leaves the rotations uncontracted), and the standalone head GEMV's PTX does not depend on
the flag. Triton interpreter: the merged launch against the two launches (latent_store_triton.launch with the
query, head_gemv_triton.launch), bit for bit: the 16b shapes, the 671B's scaled down in heads, ragged ones, M = 1..4,
bf16 and fp16, strided views of q; every GEMV config the heuristic returns at the presets' shapes; the custom op
under torch.compile (aot_eager and inductor); the engine's decode step through it. GPU: tests/test_gpu_mla_prep.py.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import head_gemv_ref, store_latents_ref
from tests.conftest import decode_step, make_model, tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)
from tests.test_head_gemv import _model_configs
from tests.test_latent_store import _mla_static_step, _sm90_ptx as _ptx_for_sm90

BF16, FP16 = torch.bfloat16, torch.float16


def _case(M=2, H=3, nope=40, C=200, P=6, dtype=torch.float32, seed=0, slots=2, R=16):
    """The merged launch's arguments as MLA hands them: caches (slots, R, C) / (slots, R, P), rows, kv_a (M, C + P)
    (a strided row view), the norm weight, cos / sin (M, P / 2), and the query q (M, H, nope + P) whose nope and rope
    columns are strided views, W_UKᵀ (H, C, nope) a view of a kv_b_proj-like weight (H, nope + v, C) read along C
    -> (kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.zeros(slots, R, C, dtype=dtype)
    pe = torch.zeros(slots, R, P, dtype=dtype)
    kv_a = torch.randn(M, C + P + 5, generator=g).to(dtype)[:, 3:C + P + 3]  # rows strided
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype)
    ang = torch.rand(M, P // 2, generator=g) * 6
    rows = torch.randperm(R, generator=g)[:M]
    q = torch.randn(M, H, nope + P, generator=g).to(dtype)
    kv_b = (torch.randn(H, nope + 24, C, generator=g) * 0.1).to(dtype)  # (H, nope + v, C)
    return kv, pe, rows, kv_a, w, ang.cos(), ang.sin(), q[..., nope:], q[..., :nope], kv_b[:, :nope].transpose(1, 2)


# --- the reference, the contract and the choice (CPU) -------------------------------------------------------

def test_reference_is_the_two_operations():
    """kernels.mla_prep on the CPU (the reference): the latent store's reference with the query and the head GEMV's
    reference, the caches written as by the store alone."""
    for dtype in (torch.float32, BF16):
        kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = _case(dtype=dtype)
        kv2, pe2 = kv.clone(), pe.clone()
        q_lat, q_rot = kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope, w_uk_t)
        want_rot = store_latents_ref(kv2, pe2, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe)
        assert torch.equal(q_rot, want_rot) and torch.equal(q_lat, head_gemv_ref(q_nope, w_uk_t))
        assert q_lat.shape == (2, 3, 200) and q_lat.dtype == dtype
        assert torch.equal(kv, kv2) and torch.equal(pe, pe2) and kv[1].any() and not kv[0].any()


def test_contract():
    from dsv3.kernels.reference import check_mla_prep_args

    kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = _case()
    with pytest.raises(ValueError, match="q_nope"):  # the query's rows
        kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope[:1], w_uk_t)
    with pytest.raises(ValueError, match="q_nope"):  # and heads
        kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope[:, :2], w_uk_t[:2])
    with pytest.raises(ValueError, match="q_nope"):
        kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope[None], w_uk_t)
    with pytest.raises(ValueError, match="H, K"):  # the head GEMV's own
        kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope[..., :39], w_uk_t)
    with pytest.raises(ValueError, match="slot 2 outside"):  # the store's own
        kernels.mla_prep(kv, pe, 2, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope, w_uk_t)
    check_mla_prep_args(kv, pe, 1, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t, kernel=True)
    with pytest.raises(ValueError, match="read along C"):  # the kernel's GEMV is the N-contiguous form only
        check_mla_prep_args(kv, pe, 1, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t.contiguous(), kernel=True)


def test_switch_on_by_default_and_the_rule(monkeypatch):
    """On by default (measured faster on an H200, its GPU tests passed on an H100); the rule is the fused store's
    (kv_a, its norm weight) and the head GEMV's (q_nope, W_UKᵀ: decode rows, no autograd) with W_UKᵀ read along C;
    switched off, the reference; the overrides win."""
    _, _, _, kv_a, w, _, _, _, q_nope, w_uk_t = _case(M=1, dtype=BF16)
    args = (kv_a, w, q_nope, w_uk_t)
    assert kb.SWITCHED["mla_prep"] is True
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: True)  # the rule holds (as on a GPU)
    assert kernels.select_backend("mla_prep", *args) == "triton"
    with kernels.use_backend(mla_prep="reference"):
        assert kernels.select_backend("mla_prep", *args) == "reference"
    assert kernels.set_mla_prep(False) is True
    try:
        assert kernels.select_backend("mla_prep", *args) == "reference"
    finally:
        assert kernels.set_mla_prep(True) is False
    with kernels.use_backend(mla_prep="triton"):  # forcing needs no switch (the interpreter tests)
        assert kernels.select_backend("mla_prep", *args) == "triton"
    monkeypatch.undo()
    monkeypatch.setattr(kb, "available", lambda op, device="cuda": True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    fits = kb._fast_fits
    assert fits("mla_prep", args) and fits("mla_prep", tuple(t.half() for t in args))
    assert not fits("mla_prep", args[:2])
    assert not fits("mla_prep", (kv_a, w, q_nope, w_uk_t.contiguous()))  # W_UKᵀ read along K: not this launch's
    assert not fits("mla_prep", (kv_a.float(), w.float(), q_nope, w_uk_t))  # the store's rule: 16-bit kv_a
    assert not fits("mla_prep", (kv_a, w.half(), q_nope, w_uk_t))
    q2 = torch.cat([q_nope, q_nope])  # two rows: above the head GEMV's DENSE_GEMV_ROWS
    assert not fits("mla_prep", (torch.cat([kv_a, kv_a]), w, q2, w_uk_t))
    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 2)
    assert fits("mla_prep", (torch.cat([kv_a, kv_a]), w, q2, w_uk_t))
    assert not fits("mla_prep", (kv_a, w, q_nope, torch.nn.Parameter(w_uk_t.clone())))  # a trainable W_UK
    assert not fits("mla_prep", (kv_a.clone().requires_grad_(), w, q_nope, w_uk_t))


def _record_ops(monkeypatch, fits: set[str]):
    """The rules answer yes for the ops in `fits` (as on a GPU); the three operations MLA may call at decode run
    their references, each call recorded as (op, the GEMV's weight or None) -> the list of calls."""
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op in fits)
    calls = []
    store, gemv, prep = kernels.store_latents, kernels.head_gemv, kernels.mla_prep
    monkeypatch.setattr(kernels, "store_latents", lambda *a, **k: calls.append(("store", None)) or store(
        *a, **{**k, "backend": "reference"}))
    monkeypatch.setattr(kernels, "head_gemv", lambda x, w, *, backend=None: calls.append(("gemv", w)) or gemv(
        x, w, backend="reference"))
    monkeypatch.setattr(kernels, "mla_prep", lambda *a, backend=None: calls.append(("prep", a)) or prep(
        *a, backend="reference"))
    return calls


@pytest.mark.parametrize("q_lora", [None, 24])
def test_mla_takes_the_merged_launch_exactly_where_both_are_taken(monkeypatch, q_lora):
    """forward_absorbed through a static decode view (B = 2, T = 2, bf16; the operations stood in for by their
    references, the rules told they hold): with the switch on and both the fused store and the W_UK head GEMV taken,
    one mla_prep call a layer (through the view's store_kv_a_uk) and no store or W_UK GEMV call of their own (the
    W_UV GEMV still runs), given q_nope and q_pe as views of the q projection and W_UKᵀ as a view of kv_b_proj's
    weight (read along C); with the switch off, or either operation not taken, or the merged rule failing, the two
    operations as before. The layer's output and the cache are the same bit for bit in every case where both
    operations run (the same references)."""
    calls = _record_ops(monkeypatch, set())
    mla, run = _mla_static_step(q_lora, fp8=False)
    w = mla.kv_b_proj.weight

    def step(fits: set[str], on: bool):
        monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op in fits)
        old = kernels.set_mla_prep(on)
        try:
            with torch.no_grad():
                return run()
        finally:
            kernels.set_mla_prep(old)

    both = {"latent_store", "head_gemv", "mla_prep"}
    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 4)  # (the step's 4 rows)
    want, cache_want = step(both, on=False)
    assert [c for c, _ in calls] == ["store", "gemv", "gemv"]  # the store, W_UKᵀ, W_UV
    calls.clear()
    got, cache_got = step(both, on=True)
    assert [c for c, _ in calls] == ["prep", "gemv"]  # one merged call, then W_UV
    (_, args), (_, w_uv) = calls
    kv_a, q_pe, q_nope, w_uk_t = args[4], args[9], args[10], args[11]
    H, nope, R, C = mla.n_heads, mla.nope, mla.rope, mla.kv_lora_rank
    assert q_nope.shape == (4, H, nope) and q_pe.shape == (4, H, R) and kv_a.shape == (4, C + R)
    assert q_nope.stride()[1:] == (nope + R, 1) and q_pe.stride()[1:] == (nope + R, 1)  # views of q (B·T, H, qk)
    assert q_pe.data_ptr() == q_nope.data_ptr() + nope * q_nope.element_size()
    assert w_uk_t.shape == (H, C, nope) and w_uk_t.stride(1) == 1 and w_uk_t.data_ptr() == w.data_ptr()
    assert w_uv.stride(2) == 1  # (W_UV: read along C, its own launch)
    assert torch.equal(got, want)
    assert torch.equal(cache_got.kv, cache_want.kv) and torch.equal(cache_got.pe, cache_want.pe)
    for fits, ops in ((both - {"latent_store"}, ["gemv", "gemv"]), (both - {"head_gemv"}, ["store"]),
                      (both - {"mla_prep"}, ["store", "gemv", "gemv"])):
        calls.clear()
        step(fits, on=True)
        assert [c for c, _ in calls] == ops, fits


def test_engine_decode_step_with_the_switch_on_equals_off(monkeypatch):
    """The engine's static decode step (bucketed, eager on the CPU: what a CUDA graph records; the paged-cache
    attention and the operations stood in for by their references, the rules told they hold) with the switch on
    gives the logits and the cache of the step with it off bit for bit, through one mla_prep call a layer."""
    from dsv3.kernels.reference import mla_decode_ref

    calls = _record_ops(monkeypatch, {"latent_store", "head_gemv", "mla_prep", "mla_decode"})
    monkeypatch.setattr(kb, "DENSE_GEMV_ROWS", 4)
    monkeypatch.setattr(kernels, "mla_decode", lambda *a, backend=None: mla_decode_ref(*a))
    model = make_model(tiny_cfg(num_nextn_predict_layers=0))
    old = kernels.set_mla_prep(False)
    try:
        want, eng = decode_step(model)
        assert "prep" not in [c for c, _ in calls]
        calls.clear()
        kernels.set_mla_prep(True)
        got, eng2 = decode_step(model)
    finally:
        kernels.set_mla_prep(old)
    assert [c for c, _ in calls].count("prep") == model.config.num_hidden_layers
    assert "store" not in [c for c, _ in calls]
    assert torch.equal(got, want)
    assert torch.equal(eng2.cache.kv, eng.cache.kv) and torch.equal(eng2.cache.pe, eng.cache.pe)


# --- the sm_90 compile (no GPU: Triton's front end, LLVM and ptxas on the CPU) -----------------------------------

def _fmas(ptx: str) -> int:
    return len(re.findall(r"\bfma\.", ptx))


def _code(ptx: str) -> list[str]:
    """The PTX's instructions without source-line markers, labels of debug scopes and the debug sections, an add
    with an explicit rounding mode spelled as the default one (the same IEEE add; the mode only forbids contraction)."""
    out = []
    for line in ptx.split("\n"):
        if line.lstrip().startswith(".section") and "debug" in line:
            break
        if ".loc" in line or re.match(r"^\$L__tmp\d+:", line) or line.lstrip().startswith(("//", ".file")):
            continue
        out.append(line.replace("add.rn.f32", "add.f32"))
    return out


@pytest.mark.parametrize("shape", ["16b", "671b"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_launch_compiles_for_sm90_keeping_the_gemvs_fma_and_nothing_else(monkeypatch, shape, dtype):
    """The merged launch at the presets' shapes (16b: 16 heads, 671B: 128; nope 128, C 512, rope 64; one row, and
    four for 671B) compiles for sm_90 with enable_fp_fusion=False, its grid the store's programs then the GEMV's
    (16b: 2 + 16 x 32). Its PTX has exactly the standalone head GEMV's fused multiply-adds (the GEMV's products:
    tl.fma, so the same bits as its own launch) and no other: with Triton's default fusion the same kernel has more
    (the rotations contracted: the check has teeth). The standalone head GEMV's PTX is the same with the flag on or
    off (its body says its FMAs itself). With PDL (a constexpr here) the launch waits on the launch before it."""
    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles the kernel: not under the interpreter")
    from dsv3.kernels import head_gemv_triton as hg
    from dsv3.kernels import mla_prep_triton as mp

    H = {"16b": 16, "671b": 128}[shape]
    for M in (1,) if shape == "16b" else (1, 4):
        kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = _case(M=M, H=H, nope=128, C=512, P=64, dtype=dtype)

        def prep():
            mp.launch(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope, w_uk_t)

        def gemv_launch():
            hg.launch(q_nope, w_uk_t)

        try:
            ptx, grid = _ptx_for_sm90(monkeypatch, mp, "_mla_prep_kernel", prep)
            fused, _ = _ptx_for_sm90(monkeypatch, mp, "_mla_prep_kernel", prep, enable_fp_fusion=True)
            gemv, _ = _ptx_for_sm90(monkeypatch, hg, "_head_gemv_kernel", gemv_launch)
            gemv_off, _ = _ptx_for_sm90(monkeypatch, hg, "_head_gemv_kernel", gemv_launch, enable_fp_fusion=False)
            pdl, _ = _ptx_for_sm90(monkeypatch, mp, "_mla_prep_kernel", prep, constexprs={"PDL": True})
        except RuntimeError as e:  # no ptxas: nothing to check here
            if "ptxas" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        cfg = hg.default_config(M, H, 512, 128, False)
        # the store's M x (1 + its query groups of 16 heads), then the GEMV's H x C / BN x M / BM
        assert grid == (M * (1 + H // 16) + H * (512 // cfg["BN"]) * (-(-M // cfg["BM"])),), grid
        assert shape != "16b" or grid == (2 + 16 * 32,)
        assert _fmas(gemv) > 0 and _fmas(ptx) == _fmas(gemv), (_fmas(ptx), _fmas(gemv))
        assert _fmas(fused) > _fmas(ptx)
        assert _code(gemv_off) == _code(gemv)
        assert re.findall(r"cvt\.rn\.(bf16|f16)\.f32", ptx)
        assert "griddepcontrol.wait" in pdl and "griddepcontrol.launch_dependents" in pdl
        assert "griddepcontrol" not in ptx


# --- the kernel under the Triton interpreter -----------------------------------------------------------------

def _two_launches(args):
    """The store's launch with the query and the head GEMV's launch -> (q_lat, q_rot, kv, pe)."""
    from dsv3.kernels import head_gemv_triton as hg
    from dsv3.kernels import latent_store_triton as ls

    kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = args
    kv, pe = kv.clone(), pe.clone()
    q_rot = ls.launch(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe)
    return hg.launch(q_nope, w_uk_t), q_rot, kv, pe


def _merged(args, config=None):
    from dsv3.kernels import mla_prep_triton as mp

    kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = args
    kv, pe = kv.clone(), pe.clone()
    q_lat, q_rot = mp.launch(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope, w_uk_t, config)
    return q_lat, q_rot, kv, pe


def _assert_same(got, want, what):
    for name, g, w in zip(("q_lat", "q_rot", "kv", "pe"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous() == w.is_contiguous(), (what, name)
        assert torch.equal(g, w), (what, name)


# (H, nope, C, P, rows): the 16b shapes; the 671B's with 40 of its 128 heads (its column tile BN = 64, and three query
# groups of 16 heads, the last partial); ragged ones (no tile divides H, nope, C; an odd pair count)
SHAPES = [(16, 128, 512, 64, (1, 4)), (40, 128, 512, 64, (1, 2)), (3, 40, 200, 6, (1, 2, 3, 4)),
          (5, 24, 100, 64, (1, 2, 3, 4)), (2, 8, 16, 8, (1, 2, 3, 4, 6))]


@interp
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("H,nope,C,P,Ms", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_interp_merged_launch_is_the_two_launches_bit_for_bit(dtype, H, nope, C, P, Ms):
    """q_lat, the rotated query and both caches are the two launches' bit for bit (the same bodies; the interpreter
    runs each program's body as the separate launches do); 6 rows: two of the GEMV's row tiles."""
    for M in Ms:
        args = _case(M=M, H=H, nope=nope, C=C, P=P, dtype=dtype, seed=M * H + C)
        q_pe, q_nope = args[7].clone(), args[8].clone()
        got, want = _merged(args), _two_launches(args)
        _assert_same(got, want, (M, H, nope, C, P))
        assert got[0].shape == (M, H, C) and got[1].shape == (M, H, P)
        assert torch.equal(args[7], q_pe) and torch.equal(args[8], q_nope)  # read, not written


@interp
@pytest.mark.parametrize("cfg", [c for c in _model_configs() if not c["k_contig"]],
                         ids=lambda c: "-".join(f"{a}{b}" for a, b in c.items()))
def test_interp_every_heuristic_gemv_config(cfg):
    """Every N-contiguous config the head GEMV's heuristic returns at the presets' W_UK products (M = 1..4), on
    small stand-ins (partial tiles, two K iterations): the merged launch under it equals the two launches (the GEMV's
    launch under the same config) bit for bit."""
    from dsv3.kernels import head_gemv_triton as hg
    from dsv3.kernels import latent_store_triton as ls

    cfg = {k: v for k, v in cfg.items() if k != "k_contig"}
    for M in {1: (1,), 2: (2,), 4: (3, 4)}[cfg["BM"]]:
        args = _case(M=M, H=2, nope=cfg["BK"] + 9, C=cfg["BN"] * 2 + 3, P=8, dtype=FP16, seed=cfg["BN"] + M)
        kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = args
        kv2, pe2 = kv.clone(), pe.clone()
        want = (hg.launch(q_nope, w_uk_t, cfg), ls.launch(kv2, pe2, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe), kv2, pe2)
        _assert_same(_merged(args, cfg), want, (M, cfg))


@interp
def test_interp_empty_and_the_kernel_contract():
    from dsv3.kernels import mla_prep_triton as mp

    kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = _case(M=0, dtype=FP16)
    q_lat, q_rot = mp.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope, w_uk_t)
    assert q_lat.shape == (0, 3, 200) and q_rot.shape == (0, 3, 6) and not kv.any()
    for H, nope in ((3, 0), (0, 8)):  # no nope columns (q_lat: zeros, as the GEMV's launch); no heads
        args = _case(M=2, H=H, nope=nope, C=40, P=8, dtype=FP16)
        _assert_same(_merged(args), _two_launches(args), (H, nope))
    kv, pe, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t = _case(dtype=FP16)
    with pytest.raises(ValueError, match="read along C"):
        mp.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, q_pe, q_nope, w_uk_t.contiguous())
    with pytest.raises(ValueError, match="K contiguous"):
        mp.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, q_pe, torch.randn(2, 3, 80).half()[..., ::2], w_uk_t)
    with pytest.raises(ValueError, match="last dimension contiguous"):
        mp.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, torch.randn(2, 3, 12).half()[..., ::2], q_nope, w_uk_t)


@interp
def test_interp_op_compiles_in_place_and_reads_the_views(monkeypatch):
    """kernels.mla_prep (dsv3::mla_prep) under torch.compile, aot_eager and inductor, fullgraph: the launch gets the
    caches themselves under inductor (aot_eager does not re-inplace: its results only), the query's parts and W_UKᵀ
    as the strided views they are; the outputs and the caches are the eager launch's bit for bit (fp16)."""
    from dsv3.kernels import mla_prep_triton as mp

    kv, pe, rows, kv_a, w, cos, sin, _, _, w_uk_t = _case(M=3, H=4, nope=16, C=40, P=8, dtype=FP16)
    q = torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(9)).half()
    seen, launch = [], mp.launch

    def spy(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe, q_nope, w_uk_t, config=None):
        seen.append((kv.data_ptr(), pe.data_ptr(), q_pe.stride(), q_nope.stride(), w_uk_t.stride()))
        return launch(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe, q_nope, w_uk_t, config)

    monkeypatch.setattr(mp, "launch", spy)

    def f(kv, pe, q):
        q = q * 1
        return kernels.mla_prep(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q[..., 16:], q[..., :16], w_uk_t,
                                backend="triton")

    want = None
    for name, fn in (("eager", f), ("aot_eager", torch.compile(f, backend="aot_eager", fullgraph=True)),
                     ("inductor", torch.compile(f, backend="inductor", fullgraph=True))):
        kv.zero_(), pe.zero_()
        q_lat, q_rot = fn(kv, pe, q)
        got = (q_lat, q_rot, kv.clone(), pe.clone())
        want = want or got
        _assert_same(got, want, name)
        kv_ptr, pe_ptr, s_pe, s_nope, s_w = seen.pop()
        assert s_pe == s_nope == (96, 24, 1) and s_w == w_uk_t.stride(), name
        if name != "aot_eager":
            assert (kv_ptr, pe_ptr) == (kv.data_ptr(), pe.data_ptr()), name
    assert torch.equal(want[1], store_latents_ref(kv.clone(), pe.clone(), 1, rows, kv_a, w, 1e-6, cos, sin,
                                                  q[..., 16:]))


@interp
def test_interp_engine_decode_step_through_the_merged_launch(monkeypatch):
    """The engine's static decode step (bucketed, eager on the CPU: what a CUDA graph records) with the store and
    the head GEMV forced to their interpreted kernels: with the merged launch (forced too) the logits and the cache
    are those of the two launches bit for bit, and the merged launch ran once a layer for the step's 2 rows (and the
    W_UK GEMV launch no more: the head GEMV launched for W_UV only)."""
    from dsv3.kernels import head_gemv_triton as hg
    from dsv3.kernels import mla_prep_triton as mp

    model = make_model(tiny_cfg(num_nextn_predict_layers=0))
    forced = dict(mla_decode="triton", latent_store="triton", head_gemv="triton")
    seen, prep, gemv = [], mp.launch, hg.launch
    monkeypatch.setattr(mp, "launch", lambda *a: seen.append(("prep", a[4].shape[0])) or prep(*a))
    monkeypatch.setattr(hg, "launch", lambda x, w, config=None: seen.append(("gemv", hg.k_contiguous(w))) or gemv(
        x, w, config))
    with kernels.use_backend(**forced):
        want, eng = decode_step(model)
    L = model.config.num_hidden_layers
    assert sorted(seen) == sorted([("gemv", False), ("gemv", True)] * L)
    seen.clear()
    with kernels.use_backend(**forced, mla_prep="triton"):
        got, eng2 = decode_step(model)
    assert sorted(seen) == sorted([("prep", 2), ("gemv", True)] * L)  # W_UKᵀ (read along C) inside the merged one
    assert torch.equal(got, want)
    assert torch.equal(eng2.cache.kv, eng.cache.kv) and torch.equal(eng2.cache.pe, eng.cache.pe)
