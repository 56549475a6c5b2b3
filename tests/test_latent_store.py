"""The decode step's fused latent store (dsv3/kernels/latent_store_triton.py, `kernels.store_latents`): RMSNorm +
RoPE + the paged cache write from the raw kv_a projection, the RoPE of the query's rope part in the same launch, and
MLA / the static decode views taking it.

    python -m pytest -q tests/test_latent_store.py                      (CPU, CI: no triton needed)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_latent_store.py   (+ the kernel, interpreted)

CPU: the reference is the model's own RMSNorm and apply_rope followed by the cache write (bit for bit), and the
query's rotation apply_rope's (bit for bit, from a strided view); the argument contract; the switch is on by
default; MLA asks for the fused store only where the cache view offers it (the static decode steps) and the seam
picks it, hands it the unrotated query (a view, on each of the three projection branches, with and without q
LoRA), and the decode step's logits are the same either way; the 16b launch compiled for sm_90 (triton's NVIDIA
back end and ptxas, no GPU): no multiply-add contraction in its PTX. Triton interpreter: the kernel against the
reference (fp16 and fp32, ragged C and P, rows in any order, another layer slot left untouched; the query: M =
1..5, H = 1, 3, 16, 40, R = 64 and an odd pair count, strided views, bit for bit in fp16, and in bf16 up to the
interpreter's truncating cast); the custom ops under torch.compile (aot_eager and inductor: the caches mutated
where they lie, the query read as the view it is); MLA and the engine's static decode step through it. GPU:
tests/test_gpu_latent_store.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import store_latents_ref
from dsv3.model.layers import RMSNorm
from dsv3.model.rope import apply_rope
from tests.conftest import decode_step, make_model, tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)


def _case(M=3, C=40, P=8, slots=2, R=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.zeros(slots, R, C, dtype=dtype)
    pe = torch.zeros(slots, R, P, dtype=dtype)
    kv_a = torch.randn(M, C + P, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype)
    ang = torch.rand(M, P // 2, generator=g) * 6
    rows = torch.randperm(R, generator=g)[:M]
    return kv, pe, rows, kv_a, w, ang.cos(), ang.sin()


def test_reference_is_the_models_norm_and_rope_then_the_write():
    for dtype in (torch.float32, torch.bfloat16):
        kv, pe, rows, kv_a, w, cos, sin = _case(dtype=dtype)
        norm = RMSNorm(40, 1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
        store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin)
        c_want = norm(kv_a[:, :40])
        p_want = apply_rope(kv_a[None, :, None, 40:], cos[None], sin[None])[0, :, 0]
        assert torch.equal(kv[1][rows], c_want) and torch.equal(pe[1][rows], p_want)
        others = torch.ones(12, dtype=torch.bool)
        others[rows] = False
        assert not kv[0].any() and not pe[0].any() and not kv[1][others].any()  # nothing else written


def _query(M=3, H=3, P=8, nope=5, dtype=torch.float32, seed=1):
    """The q projection's output (M, H, nope + P) and its rope columns q_pe (M, H, P): a strided view, as MLA's."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(M, H, nope + P, generator=g).to(dtype)
    return q, q[..., nope:]


def test_reference_rotates_the_query_as_apply_rope():
    """With the query's rope part (a strided view), the reference returns apply_rope's rotation bit for bit (a new
    contiguous tensor in q's dtype) and writes the caches as without it; without it, None."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        kv, pe, rows, kv_a, w, cos, sin = _case(M=4, P=8, dtype=dtype)
        q, q_pe = _query(M=4, H=3, P=8, dtype=dtype)
        kv2, pe2 = kv.clone(), pe.clone()
        assert store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin) is None
        got = store_latents_ref(kv2, pe2, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe)
        want = apply_rope(q_pe[None], cos[None], sin[None])[0]  # (M, H, P)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want)
        assert torch.equal(kv2, kv) and torch.equal(pe2, pe)
        assert torch.equal(q[..., 5:], q_pe) and not torch.equal(got, q_pe)  # the input untouched


def test_contract():
    kv, pe, rows, kv_a, w, cos, sin = _case()
    with pytest.raises(ValueError, match="slot 2 outside"):
        kernels.store_latents(kv, pe, 2, rows, kv_a, w, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="kv_a"):
        kernels.store_latents(kv, pe, 0, rows, kv_a[:, :-1], w, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="cos / sin"):
        kernels.store_latents(kv, pe, 0, rows, kv_a, w, 1e-6, cos.double(), sin)
    with pytest.raises(ValueError, match="rows"):
        kernels.store_latents(kv, pe, 0, rows.float(), kv_a, w, 1e-6, cos, sin)
    with pytest.raises(ValueError, match="P even"):
        kernels.store_latents(kv, pe[..., :7], 0, rows, kv_a[:, :47], w, 1e-6, cos, sin)
    _, q_pe = _query(M=3, H=2, P=8)
    for bad in (q_pe[:2], q_pe[..., :6], q_pe[0], (q_pe * 10).int()):  # M, P, (M, H, P), floating
        with pytest.raises(ValueError, match="q_pe"):
            kernels.store_latents(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, q_pe=bad)


def test_switch_on_by_default_and_the_rule(monkeypatch):
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    assert kb.SWITCHED["latent_store"] is True  # 1.05x at batch 1 on the H200 (backend.py SWITCHED)
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: True)
    assert kernels.select_backend("latent_store", x) == "triton"
    old = kernels.set_latent_store(False)
    try:
        assert kernels.select_backend("latent_store", x) == "reference"
    finally:
        kernels.set_latent_store(old)
    monkeypatch.undo()
    monkeypatch.setattr(kb, "available", lambda op, device="cuda": True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    w = torch.ones(48, dtype=torch.bfloat16)
    assert kb._fast_fits("latent_store", (x, w)) and kb._fast_fits("latent_store", (x.half(), w.half()))
    assert not kb._fast_fits("latent_store", (x.float(), w.float()))
    assert not kb._fast_fits("latent_store", (x.half(), w))  # RMSNorm's output would be promote(w, kv_a)
    assert not kb._fast_fits("latent_store", (x.clone().requires_grad_(), w))
    assert not kb._fast_fits("latent_store", (x, torch.nn.Parameter(w)))  # a trainable norm weight
    with torch.no_grad():
        assert kb._fast_fits("latent_store", (x, torch.nn.Parameter(w)))
    assert not kb._fast_fits("latent_store", (torch.randn(2, 96, dtype=torch.bfloat16)[:, ::2], w))


def _engine_step_logits(model):
    """The engine's static decode step (bucketed, eager on the CPU: what a CUDA graph records), teacher-forced ->
    (its logits, the cache)."""
    logits, eng = decode_step(model)
    return logits, eng.cache


@pytest.mark.parametrize("q_lora", [24, None])
def test_mla_takes_the_fused_store_only_where_the_view_offers_it(monkeypatch, q_lora):
    """The static decode views attend with the paged-cache kernel on a GPU (`fused_decode`); here its reference
    stands in (the seam told it runs). With the seam also picking the fused store (its reference backend): the
    decode step stores through `store_kv_a` (one call a layer with the raw kv_a and the unrotated query), the
    prefill does not; the decode step's logits and the cache it wrote are the same bit for bit as with the store
    switched off (with q LoRA, whose rope columns come from q_b_proj, and without)."""
    from dsv3.inference.graphs import _StaticLayerView
    from dsv3.kernels.reference import mla_decode_ref

    real, fused_store = kb.select, []

    def select(op, *t, backend=None):
        if backend is None and op == "mla_decode" or (op == "latent_store" and backend is None and fused_store):
            return "triton"
        return real(op, *t, backend=backend)

    monkeypatch.setattr(kb, "select", select)
    monkeypatch.setattr(kernels, "select_backend", select)
    monkeypatch.setattr(kernels, "mla_decode", lambda *a, backend=None: mla_decode_ref(*a))
    ref_store = kernels.store_latents
    monkeypatch.setattr(kernels, "store_latents", lambda *a, **k: ref_store(*a, **{**k, "backend": "reference"}))
    model = make_model(tiny_cfg(num_nextn_predict_layers=0, q_lora_rank=q_lora))
    want, cache_want = _engine_step_logits(model)
    calls, orig = [], _StaticLayerView.store_kv_a
    monkeypatch.setattr(_StaticLayerView, "store_kv_a", lambda self, kv_a, *a, q_pe=None: calls.append(
        (tuple(kv_a.shape), None if q_pe is None else tuple(q_pe.shape))) or orig(self, kv_a, *a, q_pe=q_pe))
    fused_store.append(True)
    got, cache_got = _engine_step_logits(model)
    cfg = model.config
    C, H, R = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.num_attention_heads, cfg.qk_rope_head_dim
    assert calls == [((2, 1, C), (2, 1, H, R))] * cfg.num_hidden_layers  # the decode step only, once a layer
    assert torch.equal(got, want)
    assert torch.equal(cache_got.kv, cache_want.kv) and torch.equal(cache_got.pe, cache_want.pe)


# --- MLA's three projection branches handing the unrotated query to the store -----------------------------------

def _mla_static_step(q_lora, fp8: bool, dtype=torch.bfloat16, B=2, T=2):
    """A tiny MLA (q_proj, or q_a_proj with q_lora_rank), its q and kv_a projections FP8Linear if `fp8`, and a
    static decode view of B sequences at positions 5 .. 5 + T - 1 over a paged cache with random earlier latents,
    attending through mla_decode_ref (what `fused_decode` stands for) -> (mla, run: () -> (output, the cache))."""
    from dsv3.inference.cache import PagedLatentCache
    from dsv3.inference.graphs import StaticBatch
    from dsv3.kernels.reference import mla_decode_ref
    from dsv3.model.fp8 import FP8Linear
    from dsv3.model.mla import MLA

    cfg = tiny_cfg(q_lora_rank=q_lora, num_attention_heads=3)
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, 0, 0.2) if p.dim() > 1 else torch.nn.init.normal_(p, 1, 0.1)
    if fp8:
        for name in ("q_proj" if q_lora is None else "q_a_proj", "kv_a_proj_with_mqa"):
            setattr(mla, name, FP8Linear.from_linear(getattr(mla, name)))
    mla.to(dtype).requires_grad_(False)
    R = cfg.qk_rope_head_dim
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, cfg.hidden_size, generator=g).to(dtype)
    ang = torch.rand(B, T, R // 2, generator=g) * 6
    kv0 = torch.randn(1, 4 * B * 4, cfg.kv_lora_rank, generator=g).to(dtype)
    pe0 = torch.randn(1, 4 * B * 4, R, generator=g).to(dtype)

    def run():
        cache = PagedLatentCache(1, 4 * B, 4, cfg.kv_lora_rank, R, dtype=dtype)
        cache.kv.copy_(kv0), cache.pe.copy_(pe0)
        sb = StaticBatch(cache, B, T, 2, 4 * B - 1, attention=mla_decode_ref)
        sb.meta[:, 0] = 5
        sb.block_table.copy_(torch.arange(2 * B).view(B, 2))
        sb.prepare()
        return mla(x, ang.cos(), ang.sin(), cache=sb.layer(0)), cache

    return mla, run


@pytest.mark.parametrize("branch", ["modules", "dense_gemv2", "fp8_weight_linear2"])
def test_mla_hands_the_unrotated_query_to_the_store_on_every_branch(monkeypatch, branch):
    """On each projection branch of forward_absorbed (the modules; the dense GEMV's dual launch; the FP8 one: their
    kernels stood in for by the references, the seam told they run) and with or without q LoRA: where the fused
    store runs, store_kv_a gets the query's rope columns as a view of the projection's output (no copy, nothing
    rotated yet) and RoPE runs nowhere else (apply_rope not called); the layer's output and the cache are the same
    bit for bit as with the store off (then apply_rope rotates q and k_pe)."""
    import dsv3.model.mla as mla_mod
    from dsv3.inference.graphs import _StaticLayerView
    from dsv3.kernels.reference import dense_gemv_ref, fp8_weight_linear_ref

    on = {"dense_gemv2": {"dense_gemv"}, "fp8_weight_linear2": {"fp8_weight_gemm"}, "modules": set()}[branch]
    store = {"on": False}
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op in on or (op == "latent_store" and store["on"]))
    dual = []
    monkeypatch.setattr(kernels, "dense_gemv2", lambda x, w1, w2, *, backend=None: dual.append(1) or (
        dense_gemv_ref(x, w1), dense_gemv_ref(x, w2)))
    monkeypatch.setattr(kernels, "fp8_weight_linear2", lambda x, w1, s1, w2, s2, *, backend=None: dual.append(1) or (
        fp8_weight_linear_ref(x, w1, s1), fp8_weight_linear_ref(x, w2, s2)))
    monkeypatch.setattr(kernels, "dense_gemv", lambda x, w, *, out_dtype=None, backend=None: dense_gemv_ref(x, w))
    monkeypatch.setattr(kernels, "fp8_weight_linear", lambda x, w, s, *, backend=None: fp8_weight_linear_ref(x, w, s))
    ref_store = kernels.store_latents
    monkeypatch.setattr(kernels, "store_latents", lambda *a, **k: ref_store(*a, **{**k, "backend": "reference"}))
    ropes, rope = [], mla_mod.apply_rope
    monkeypatch.setattr(mla_mod, "apply_rope", lambda x, *a: ropes.append(x.shape) or rope(x, *a))
    seen, orig = [], _StaticLayerView.store_kv_a

    def spy(self, kv_a, norm, cos, sin, q_pe=None):
        seen.append(q_pe)
        return orig(self, kv_a, norm, cos, sin, q_pe=q_pe)

    monkeypatch.setattr(_StaticLayerView, "store_kv_a", spy)
    for q_lora in (None, 24):
        mla, run = _mla_static_step(q_lora, fp8=branch == "fp8_weight_linear2")
        want, cache_want = run()
        assert len(ropes) == 2 and not seen  # q_pe (B, T, H, R) and k_pe (B, T, 1, R) through apply_rope
        assert len(dual) == (branch != "modules")
        ropes.clear(), dual.clear()
        store["on"] = True
        got, cache_got = run()
        store["on"] = False
        assert not ropes and len(seen) == 1 and len(dual) == (branch != "modules")
        q_pe = seen.pop()
        nope, R = mla.nope, mla.rope
        assert q_pe.shape == (2, 2, 3, R) and q_pe.stride()[-2:] == (nope + R, 1)  # a view of q (B, T, H, nope + R)
        assert torch.equal(got, want)
        assert torch.equal(cache_got.kv, cache_want.kv) and torch.equal(cache_got.pe, cache_want.pe)
        dual.clear()


# --- the sm_90 compile (no GPU: Triton's front end, LLVM and ptxas on the CPU) -----------------------------------

_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


def _sm90_ptx(monkeypatch, module, name: str, run, constexprs: dict | None = None, **options):
    """Call `run()` with the kernel `module.name` recording its launch, then compile that launch for sm_90 (an
    int argument equal to 1 a constexpr, as Triton's launcher specialises it) with the launch's options (warps,
    stages, PDL, fp fusion) updated by `options` and its constexprs by `constexprs` -> (its PTX, the grid)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = {}

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(grid=grid, args=a, kw=kw)

    real = getattr(module, name)
    with monkeypatch.context() as mp:
        mp.setattr(module, name, Rec())
        run()
    opts = {o: seen["kw"].pop(o) for o in ("num_warps", "num_stages", "launch_pdl", "enable_fp_fusion")
            if o in seen["kw"]}
    bound = {**dict(zip(real.arg_names, seen["args"])), **seen["kw"], **(constexprs or {})}
    signature, consts = {}, {}
    for i, n in enumerate(real.arg_names):
        v = bound.get(n, real.params[i].default)
        if isinstance(v, torch.Tensor):
            signature[n] = "*" + _TT[v.dtype]
        elif real.params[i].is_constexpr or v == 1:
            signature[n], consts[(i,)] = "constexpr", v
        else:
            signature[n] = "fp32" if isinstance(v, float) else "i32"
    c = triton.compile(ASTSource(real, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={**opts, **options})
    return c.asm["ptx"], seen["grid"]


def _ptx_for_sm90(monkeypatch, *args, **options):
    """latent_store_triton.launch(*args) compiled for sm_90 (`_sm90_ptx`) -> (its PTX, the grid)."""
    from dsv3.kernels import latent_store_triton as k

    return _sm90_ptx(monkeypatch, k, "_store_latents_kernel", lambda: k.launch(*args), **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_launch_compiles_for_sm90_without_multiply_add_contraction(monkeypatch, dtype):
    """The 16b launch at batch 1 (C 512, R 64, 16 heads of nope 128 + rope 64, the query a view) compiles for sm_90:
    grid (1, 2) (the latent's program and one of the 16 heads), no fused multiply-add in its PTX (so the rotations
    round as eager apply_rope's separate products and sums: bit for bit on the GPU), rounding to nearest even; with
    Triton's default fp fusion the same kernel would contract them (the check has teeth)."""
    import re

    pytest.importorskip("triton.backends.nvidia")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles the kernel: not under the interpreter")
    kv, pe = torch.zeros(2, 16, 512, dtype=dtype), torch.zeros(2, 16, 64, dtype=dtype)
    kv_a, w = torch.randn(1, 576).to(dtype), torch.ones(512, dtype=dtype)
    q = torch.randn(1, 16, 192).to(dtype)
    cos = sin = torch.zeros(1, 32)
    args = (kv, pe, 1, torch.tensor([3]), kv_a, w, 1e-6, cos, sin, q[..., 128:])
    try:
        ptx, grid = _ptx_for_sm90(monkeypatch, *args)
        fused, _ = _ptx_for_sm90(monkeypatch, *args, enable_fp_fusion=True)
    except RuntimeError as e:  # no ptxas: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    assert grid == (1, 2)
    assert not re.findall(r"\bfma\.", ptx) and re.findall(r"\bfma\.", fused)
    assert re.findall(r"cvt\.rn\.(bf16|f16)\.f32", ptx)  # (PDL is off: a CPU launch)


@interp
def test_interp_kernel_vs_reference():
    from dsv3.kernels import latent_store_triton as k

    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-6)):
        for C, P, M in ((40, 8, 3), (512, 64, 2), (100, 6, 1)):
            kv, pe, rows, kv_a, w, cos, sin = _case(M=M, C=C, P=P, dtype=dtype, seed=C)
            kv2, pe2 = kv.clone(), pe.clone()
            kv[0].fill_(7), kv2[0].fill_(7)  # another layer slot: untouched
            store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin)
            k.launch(kv2, pe2, 1, rows, kv_a, w, 1e-6, cos, sin)
            assert (kv2[0] == 7).all()
            assert torch.allclose(kv2.float(), kv.float(), atol=tol, rtol=tol), (dtype, C, P)
            assert torch.allclose(pe2.float(), pe.float(), atol=tol, rtol=tol), (dtype, C, P)
    kv, pe, rows, kv_a, w, cos, sin = _case(M=0)
    k.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin)  # nothing to write
    assert not kv.any()
    # rows strided (a view): the rows it names, not its storage's
    kv, pe, _, kv_a, w, cos, sin = _case(M=3, dtype=torch.float16)
    rows = torch.tensor([0, 5, 1, 6, 2, 7])[::2]
    kv2, pe2 = kv.clone(), pe.clone()
    store_latents_ref(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin)
    k.launch(kv2, pe2, 0, rows, kv_a, w, 1e-6, cos, sin)
    assert torch.allclose(kv2.float(), kv.float(), atol=2e-3) and torch.allclose(pe2.float(), pe.float(), atol=2e-3)
    with pytest.raises(TypeError, match="norm weight alike"):  # RMSNorm's output dtype would be promote(w, kv_a)
        k.launch(kv2, pe2, 0, rows, kv_a, w.float(), 1e-6, cos, sin)


def _trunc_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounded toward zero: what Triton 3.6's interpreter's cast does (its _convert_float without a
    rounding mode drops the low 16 bits; a GPU rounds to nearest even)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interp_kernel_rotates_the_query(dtype):
    """The query's rope part, a strided view of q (M, H, nope + R), through the kernel's extra programs: M = 1..5,
    H = 1, 3, 16 (16b: one program), 40 (three programs of 16), R = 64 and 6 (3 pairs: an odd pair count, masked);
    the rotation is the reference's (apply_rope's) bit for bit in fp16; in bf16 the interpreter's cast truncates, so
    each value is the fp32 rotation rounded toward zero (the GPU test checks round-to-nearest bit for bit); the
    caches are written bit for bit as by the launch without the query."""
    from dsv3.kernels import latent_store_triton as k

    for M in (1, 2, 3, 4, 5):
        for H in (1, 3, 16, 40):
            for P, C in ((64, 40), (6, 24)):
                if H == 40 and M > 2:
                    continue  # (the interpreter is slow; the three programs of 16 heads are seen at M = 1, 2)
                kv, pe, rows, kv_a, w, cos, sin = _case(M=M, C=C, P=P, dtype=dtype, seed=M * H + P)
                q, q_pe = _query(M=M, H=H, P=P, nope=7, dtype=dtype, seed=M + H)
                kv2, pe2, kv3, pe3 = kv.clone(), pe.clone(), kv.clone(), pe.clone()
                want = store_latents_ref(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe)
                got = k.launch(kv2, pe2, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe)
                assert k.launch(kv3, pe3, 1, rows, kv_a, w, 1e-6, cos, sin) is None
                assert got.shape == (M, H, P) and got.dtype == dtype and got.is_contiguous()
                assert torch.equal(kv2, kv3) and torch.equal(pe2, pe3), (M, H, P)
                if dtype == torch.float16:
                    assert torch.equal(got, want), (M, H, P)
                else:
                    qf = q_pe.float()
                    c, s = cos[:, None], sin[:, None]
                    exact = torch.stack((qf[..., 0::2] * c - qf[..., 1::2] * s, qf[..., 0::2] * s + qf[..., 1::2] * c),
                                        -1).flatten(-2)  # fp32, unrounded
                    assert torch.equal(want, exact.bfloat16()) and torch.equal(got, _trunc_bf16(exact)), (M, H, P)
                assert torch.equal(q[..., 7:], q_pe)  # read, not written
    _, _, rows, kv_a, w, cos, sin = _case(M=0)
    kv, pe = torch.zeros(2, 12, 40), torch.zeros(2, 12, 8)
    assert k.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, torch.zeros(0, 3, 8)).shape == (0, 3, 8)
    kv, pe, rows, kv_a, w, cos, sin = _case(dtype=dtype)
    with pytest.raises(ValueError, match="last dimension contiguous"):
        k.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, _query(dtype=dtype, P=16)[1][..., ::2])
    with pytest.raises(TypeError, match="q_pe bf16"):
        k.launch(kv, pe, 0, rows, kv_a, w, 1e-6, cos, sin, _query(dtype=torch.float64)[1])


@interp
def test_interp_op_compiles_in_place():
    kv, pe, rows, kv_a, w, cos, sin = _case(dtype=torch.float16)
    kv_want, pe_want = kv.clone(), pe.clone()
    store_latents_ref(kv_want, pe_want, 1, rows, kv_a, w, 1e-6, cos, sin)

    def f(kv, pe, kv_a):
        kernels.store_latents(kv, pe, 1, rows, kv_a * 1, w, 1e-6, cos, sin, backend="triton")
        return kv.sum()

    torch.compile(f, backend="aot_eager", fullgraph=True)(kv, pe, kv_a)
    assert torch.allclose(kv.float(), kv_want.float(), atol=2e-3) and torch.allclose(pe.float(), pe_want.float(),
                                                                                      atol=2e-3)


@interp
def test_interp_query_op_compiles_in_place_and_reads_the_view(monkeypatch):
    """The op with the query (dsv3::store_latents_q) under torch.compile, aot_eager and inductor, fullgraph: the
    launch gets the caches themselves under inductor (not functionalised copies: their storage is the caller's, as
    eager; aot_eager does not re-inplace, so only its results are checked) and the query's rope
    part as the strided view it is (no contiguous copy first); the caches and the returned rotation are the eager
    reference's bit for bit (fp16)."""
    from dsv3.kernels import latent_store_triton as k

    kv, pe, rows, kv_a, w, cos, sin = _case(dtype=torch.float16)
    q, _ = _query(M=3, H=4, P=8, nope=5, dtype=torch.float16)
    kv_want, pe_want = kv.clone(), pe.clone()
    q_want = store_latents_ref(kv_want, pe_want, 1, rows, kv_a, w, 1e-6, cos, sin, (q * 1)[..., 5:])
    seen, launch = [], k.launch
    monkeypatch.setattr(k, "launch", lambda kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe=None: seen.append(
        (kv.data_ptr(), pe.data_ptr(), q_pe.stride())) or launch(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe))

    def f(kv, pe, q):
        return kernels.store_latents(kv, pe, 1, rows, kv_a, w, 1e-6, cos, sin, q_pe=(q * 1)[..., 5:],
                                     backend="triton")

    for name, compiled in (("eager", f), ("aot_eager", torch.compile(f, backend="aot_eager", fullgraph=True)),
                           ("inductor", torch.compile(f, backend="inductor", fullgraph=True))):
        kv.zero_(), pe.zero_()
        got = compiled(kv, pe, q)
        assert torch.equal(got, q_want) and torch.equal(kv, kv_want) and torch.equal(pe, pe_want), name
        kv_ptr, pe_ptr, q_stride = seen.pop()
        assert q_stride == (4 * 13, 13, 1), name
        if name != "aot_eager":  # (aot_eager runs the functionalised graph as is: copies; inductor re-inplaces it)
            assert (kv_ptr, pe_ptr) == (kv.data_ptr(), pe.data_ptr()), name


@interp
@pytest.mark.parametrize("branch", ["modules", "dense_gemv2"])
def test_interp_mla_through_the_kernel_rotates_the_query(monkeypatch, branch):
    """forward_absorbed through a static decode view with the store forced to the interpreted kernel (B = 2,
    T = 2: 4 rows, 3 heads; fp16, with and without q LoRA; the dense GEMV's dual launch interpreted too on its
    branch): one launch a call, given the query's view, whose rotation is apply_rope's bit for bit; the layer's
    output and the cache match the path with the store off (the latent's norm sums in another order: a rounding
    step)."""
    from dsv3.kernels import latent_store_triton as k
    from dsv3.model.rope import apply_rope as rope

    seen, launch = [], k.launch

    def spy(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe=None):
        out = launch(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe)
        seen.append(torch.equal(out, rope(q_pe[None], cos[None], sin[None])[0]))
        return out

    monkeypatch.setattr(k, "launch", spy)
    gemv = {"dense_gemv2": {"dense_gemv": "triton"}, "modules": {}}[branch]
    for q_lora in (None, 24):
        mla, run = _mla_static_step(q_lora, fp8=False, dtype=torch.float16)
        with kernels.use_backend(latent_store="reference", **gemv):
            want, cache_want = run()
        with kernels.use_backend(latent_store="triton", **gemv):
            got, cache_got = run()
        assert seen == [True]
        seen.clear()
        assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        assert torch.allclose(cache_got.kv.float(), cache_want.kv.float(), atol=4e-3, rtol=4e-3)
        assert torch.equal(cache_got.pe, cache_want.pe)


@interp
def test_interp_engine_decode_step_through_the_kernel(monkeypatch):
    """The static decode step with every layer's latents stored (and its query rotated) by the interpreted kernel
    (forced) gives the same next-token logits, and the kernel ran once a layer for the step's 2 rows, with the
    query."""
    from dsv3.kernels import latent_store_triton as k

    model = make_model(tiny_cfg(num_nextn_predict_layers=0))
    with kernels.use_backend(mla_decode="triton"):  # the views that store this way: the paged-cache attention's
        want, cache_want = _engine_step_logits(model)
    seen, launch = [], k.launch
    monkeypatch.setattr(k, "launch", lambda kv, pe, slot, rows, kv_a, *a: seen.append((kv_a.shape[0], a[-1].shape))
                        or launch(kv, pe, slot, rows, kv_a, *a))
    with kernels.use_backend(mla_decode="triton", latent_store="triton"):
        got, cache_got = _engine_step_logits(model)
    cfg = model.config
    assert seen == [(2, (2, cfg.num_attention_heads, cfg.qk_rope_head_dim))] * cfg.num_hidden_layers
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(cache_got.kv, cache_want.kv, atol=1e-6) and torch.allclose(cache_got.pe, cache_want.pe,
                                                                                      atol=1e-6)
