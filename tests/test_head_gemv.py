"""The per-head decode GEMV (dsv3/kernels/head_gemv_triton.py, `kernels.head_gemv`) and absorbed MLA taking it
for its W_UK / W_UV products (dsv3/model/mla.py `forward_absorbed`).

    python -m pytest -q tests/test_head_gemv.py                      (CPU, CI: no triton needed)
    TRITON_INTERPRET=1 python -m pytest -q tests/test_head_gemv.py   (+ the kernel, interpreted)

CPU: the reference is the fp32 einsum rounded once; the argument contract; the switch is on by default; the
per-call rule (rows, dtypes, strides, gradients, CUDA autocast); absorbed MLA asks for the kernel for both
products with the operands it should (W_UKᵀ and W_UV, views of kv_b_proj's weight: no copy) and keeps its
einsums otherwise. Triton interpreter: the kernel against the reference in both orientations, ragged N and K,
M = 1..4 and more than one row tile, strided x and w as MLA passes them, every config the heuristic returns at
the presets' shapes; the custom op under torch.compile (fullgraph); the engine's static decode step with every
absorbed product through the kernel. GPU: tests/test_gpu_head_gemv.py.
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import kernels
from dsv3.config import preset
from dsv3.kernels import backend as kb
from dsv3.kernels.reference import head_gemv_ref
from dsv3.model.mla import MLA
from tests.conftest import decode_step, make_model, tiny_cfg
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)

BF16 = torch.bfloat16


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _kv_b(H=3, nope=16, v=12, C=40, dtype=torch.float32, seed=0):
    """A kv_b_proj-like weight (H·(nope + v), C) and its W_UK (H, nope, C) / W_UV (H, v, C) views."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(H * (nope + v), C, generator=g) * 0.1).to(dtype).view(H, nope + v, C)
    return w, w[:, :nope], w[:, nope:]


# --- the reference, the contract and the choice (CPU) -------------------------------------------------------

def test_reference_is_the_fp32_einsum_rounded_once_and_the_contract():
    _, w_uk, w_uv = _kv_b(dtype=BF16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 3, 40, generator=g).to(BF16)  # (B, T, H, C): absorbed MLA's o_lat
    y = head_gemv_ref(x, w_uv)
    assert y.shape == (2, 1, 3, 12) and y.dtype == BF16
    assert torch.equal(y, torch.einsum("bthc,hdc->bthd", x.float(), w_uv.float()).to(BF16))
    q = torch.randn(2, 1, 3, 16, generator=g).to(BF16)  # q_nope; W_UKᵀ (H, C, nope): N contiguous
    assert torch.equal(kernels.head_gemv(q, w_uk.transpose(1, 2)),
                       torch.einsum("bthd,hdc->bthc", q.float(), w_uk.float()).to(BF16))  # the CPU: the reference
    with pytest.raises(TypeError, match="one dtype"):
        kernels.head_gemv(x, w_uv.half())
    with pytest.raises(ValueError, match="H, K"):
        kernels.head_gemv(x[..., :39], w_uv)
    with pytest.raises(ValueError, match="H, K"):
        kernels.head_gemv(x[:, :, :2], w_uv)
    with pytest.raises(ValueError, match=r"w \(H, N, K\)"):
        kernels.head_gemv(x, w_uv[0])


def test_switch_is_on_by_default_and_the_overrides_win(monkeypatch):
    _, _, w_uv = _kv_b(dtype=BF16)
    x = torch.randn(1, 3, 40, dtype=BF16)
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: True)  # the rule holds (as on a GPU)
    assert kb.SWITCHED["head_gemv"] is True  # on: measured faster with the merge + W_UV launch (backend.py)
    assert kernels.select_backend("head_gemv", x, w_uv) == "triton"
    assert kernels.set_head_gemv(False) is True
    try:
        assert kernels.select_backend("head_gemv", x, w_uv) == "reference"
        with kernels.use_backend(head_gemv="triton"):
            assert kernels.select_backend("head_gemv", x, w_uv) == "triton"
    finally:
        assert kernels.set_head_gemv(True) is False
    with kernels.use_backend("reference"):
        assert kernels.select_backend("head_gemv", x, w_uv) == "reference"


def test_rule_rows_dtypes_strides_gradients_autocast(monkeypatch):
    fits = kb._head_gemv_fits
    _, w_uk, w_uv = _kv_b(dtype=BF16)
    w_ukt = w_uk.transpose(1, 2)
    x = torch.randn(1, 1, 3, 40, dtype=BF16)
    assert fits(x, w_uv) and fits(torch.randn(1, 1, 3, 16, dtype=BF16), w_ukt)
    assert fits(torch.randn(1, 3, 40).half(), w_uv.half())
    assert not fits(torch.randn(2, 3, 40, dtype=BF16), w_uv)  # above the decode rows (DENSE_GEMV_ROWS): the einsum
    assert not fits(x.float(), w_uv.float())  # fp32: not a decode dtype here
    assert not fits(x, w_uv.half())
    assert not fits(torch.randn(1, 3, 80, dtype=BF16)[..., ::2], w_uv)  # x's K strided
    assert not fits(x, torch.randn(40, 3, 12, 2, dtype=BF16)[..., 0].permute(1, 2, 0))  # neither N nor K contiguous
    assert not fits(x.clone().requires_grad_(), w_uv)
    p = torch.nn.Parameter(w_uv.clone())
    assert not fits(x, p)
    with torch.no_grad():
        assert fits(x, p)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    assert not fits(x, w_uv)
    assert kernels.select_backend("head_gemv", x, w_uv) == "reference"  # (and the CPU never fits)


@pytest.fixture
def cpu_rule(monkeypatch):
    """The per-head GEMV's rule on CPU tensors (as on a GPU with triton), switched on; the kernel call recorded
    and replaced by the reference + 1 (a marker)."""
    monkeypatch.setattr(kb, "_fast_fits", lambda op, t: op == "head_gemv" and kb._head_gemv_fits(*t))
    calls = []

    def fake(x, w, *, backend=None):
        calls.append((x, w))
        return head_gemv_ref(x, w) + 1

    monkeypatch.setattr(kernels, "head_gemv", fake)
    old = kernels.set_head_gemv(True)
    yield calls
    kernels.set_head_gemv(old)


def test_absorbed_mla_takes_the_kernel_for_both_products_where_the_seam_picks_it(cpu_rule):
    """A decode-sized absorbed forward of a bf16 MLA asks for W_UKᵀ (N contiguous) and W_UV (K contiguous),
    both views of kv_b_proj's weight (no copy), and gives the einsum form's output when the kernel is exact."""
    from dsv3.inference.cache import PagedLatentCache

    calls = cpu_rule
    cfg = tiny_cfg()
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, 0, 0.05) if p.dim() > 1 else torch.nn.init.ones_(p)
    mla.to(BF16).requires_grad_(False)
    rope = cfg.qk_rope_head_dim
    cache = PagedLatentCache(1, 4, 4, cfg.kv_lora_rank, rope, dtype=BF16)
    blocks = cache.allocate(2)
    x = torch.randn(1, 1, cfg.hidden_size, dtype=BF16)
    cos, sin = torch.ones(1, 1, rope // 2), torch.zeros(1, 1, rope // 2)

    def run():
        return mla(x, cos, sin, cache=cache.batch([blocks], [3], [1]).layer(0))

    with torch.no_grad():
        got = run()
        assert len(calls) == 2
        (q_nope, w_ukt), (o_lat, w_uv) = calls
        wk = mla.kv_b_proj.weight
        assert w_ukt.shape == (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim)
        assert w_ukt.stride(1) == 1 and w_ukt.data_ptr() == wk.data_ptr()  # W_UKᵀ: a view, read along C
        assert w_uv.stride(2) == 1 and w_uv.data_ptr() == wk.data_ptr() + cfg.qk_nope_head_dim * wk.stride(0) * 2
        assert q_nope.shape[:3] == (1, 1, cfg.num_attention_heads) and o_lat.shape[-1] == cfg.kv_lora_rank
        kernels.set_head_gemv(False)
        want = run()  # the einsums
        assert len(calls) == 2
    assert not torch.equal(got, want)  # (the marker moved the output: the kernel's result was used)
    with torch.no_grad():  # prefill-sized: the einsums (a prefill view expands instead; a 5-token decode view)
        kernels.set_head_gemv(True)
        mla(torch.randn(1, 5, cfg.hidden_size, dtype=BF16), cos.expand(1, 5, -1), sin.expand(1, 5, -1),
            cache=cache.batch([blocks], [0], [5]).layer(0))
    assert len(calls) == 2


# --- the kernel under the Triton interpreter -----------------------------------------------------------------

def _model_configs():
    """Every config the heuristic returns at the presets' absorbed products (M = 1..4), as (M, H, N, K, k_contig)
    cases on small stand-ins (the same BM, BN, BK/KU, PREFETCH)."""
    try:
        from dsv3.kernels import head_gemv_triton as k
    except ImportError:  # no triton (CI): the interpreter tests skip anyway
        return []
    seen = {}
    for name in ("tiny", "small", "16b", "671b"):
        c = preset(name)
        H, C, nope, v = c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim, c.v_head_dim
        for M in range(1, 5):
            for N, K, kc in ((C, nope, False), (v, C, True)):
                cfg = k.default_config(M, H, N, K, kc)
                seen.setdefault(tuple(sorted(cfg.items())) + (kc,), (M, name, N, K))
    return [dict(cfg[:-1]) | {"k_contig": cfg[-1]} for cfg in seen]


@interp
@pytest.mark.parametrize("k_contig", [True, False])
def test_interp_kernel_vs_reference_both_orientations_ragged(k_contig):
    from dsv3.kernels import head_gemv_triton as k

    g = torch.Generator().manual_seed(3)
    H, N, K = 3, 70, 300 if k_contig else 100  # ragged: no BN divides N, no chunk K
    w_full = torch.randn(H, N + 5, K + 7, generator=g) * 0.05  # w a strided slice, as W_UV / W_UK in kv_b
    if k_contig:
        w = w_full[:, 2:N + 2, :K]
    else:
        w = torch.randn(H, K + 5, N, generator=g)[:, 1:K + 1].transpose(1, 2) * 0.05  # N contiguous
    assert k.k_contiguous(w) == k_contig
    for M in (1, 2, 3, 4, 6):  # 6: two row tiles
        for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-5)):
            x = torch.randn(M, H, K + 4, generator=g)[:, :, 2:K + 2].to(dtype)  # x's rows and heads strided
            y = k.launch(x, w.to(dtype))
            assert y.shape == (M, H, N) and y.dtype == dtype
            assert _rel(y, head_gemv_ref(x, w.to(dtype))) < tol, (M, dtype)


@interp
@pytest.mark.parametrize("cfg", _model_configs(), ids=lambda c: "-".join(f"{a}{b}" for a, b in c.items()))
def test_interp_every_heuristic_config(cfg):
    from dsv3.kernels import head_gemv_triton as k

    cfg = dict(cfg)
    kc = cfg.pop("k_contig")
    g = torch.Generator().manual_seed(cfg["BN"] + cfg["BK"])
    H, N, K = 2, cfg["BN"] * 2 + 3, (cfg["KU"] * 128 + 40 if kc else cfg["BK"] + 9)  # partial tiles, 2 iterations
    w = torch.randn(H, N, K, generator=g) * 0.05
    w = w if kc else w.transpose(1, 2).contiguous().transpose(1, 2)
    for M in {1: (1,), 2: (2,), 4: (3, 4)}[cfg["BM"]]:
        x = torch.randn(M, H, K, generator=g).half()
        y = k.launch(x, w.half(), cfg)
        assert _rel(y, head_gemv_ref(x, w.half())) < 2e-3, (M, cfg)


def test_heuristic_shapes():
    """The presets' configs: about two programs per SM where the heads allow, a register tile of at most
    GEMV_TILE elements, one K iteration at the 16b shapes."""
    pytest.importorskip("triton")
    from dsv3.kernels.fp8_gemm_triton import GEMV_TILE
    from dsv3.kernels import head_gemv_triton as k

    uk = k.default_config(1, 16, 512, 128, False)  # 16b W_UKᵀ: 16 x 512 / 16 = 512 programs, one K iteration
    uv = k.default_config(1, 16, 128, 512, True)  # 16b W_UV: 16 x 128 / 4 = 512 programs, one K iteration
    assert (uk["BN"], uk["BK"]) == (16, 128)
    assert (uv["BN"], uv["KU"], uv["PREFETCH"]) == (4, 4, False)
    big = k.default_config(4, 128, 512, 128, False)  # 671b, 4 rows
    assert big["BN"] == 64 and big["BM"] * big["BK"] * big["BN"] <= GEMV_TILE
    for cfg in _model_configs():
        tile = cfg["BM"] * cfg["BN"] * (cfg["KU"] * 128 if cfg["k_contig"] else cfg["BK"])
        assert tile <= GEMV_TILE, cfg


@interp
def test_interp_op_compiles_without_graph_break_and_keeps_the_strides():
    from dsv3.kernels import head_gemv_triton as k

    _, w_uk, w_uv = _kv_b(H=2, nope=16, v=12, C=136, dtype=torch.float16, seed=4)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 2, 20, generator=g).half()[..., :16]  # q_nope: a split, rows strided
    o = torch.randn(2, 1, 2, 136, generator=g).half()
    assert isinstance(k.head_gemv_op, torch._library.custom_ops.CustomOpDef)
    seen = []
    launch = k.launch
    k_launch = lambda x, w, config=None: seen.append(w.stride()) or launch(x, w, config)  # noqa: E731

    def f(q, o):
        return (kernels.head_gemv(q, w_uk.transpose(1, 2), backend="triton"),
                kernels.head_gemv(o, w_uv, backend="triton"))

    k.launch = k_launch
    try:
        # inductor included: custom ops get their inputs with the traced strides (needs_exact_strides by default)
        for got_q, got_o in (f(q, o), torch.compile(f, backend="aot_eager", fullgraph=True)(q, o),
                             torch.compile(f, backend="inductor", fullgraph=True)(q, o)):
            assert got_q.shape == (2, 1, 2, 136) and _rel(got_q, head_gemv_ref(q, w_uk.transpose(1, 2))) < 2e-3
            assert got_o.shape == (2, 1, 2, 12) and _rel(got_o, head_gemv_ref(o, w_uv)) < 2e-3
    finally:
        k.launch = launch
    # the op got the views as they lie (no contiguous copy of W_UKᵀ or W_UV), eager and compiled
    assert seen == [w_uk.transpose(1, 2).stride(), w_uv.stride()] * 3
    assert k.launch(torch.randn(0, 2, 136).half(), w_uv).shape == (0, 2, 12)
    for w in (torch.randn(2, 1, 136).half(), torch.randn(2, 12, 1).half()):  # N or K of 1: both strides 1
        x = torch.randn(3, 2, w.shape[2]).half()
        assert _rel(k.launch(x, w), head_gemv_ref(x, w)) < 2e-3
    with pytest.raises(ValueError, match="K contiguous"):
        k.launch(torch.randn(1, 2, 272).half()[..., ::2], w_uv)


@interp
def test_interp_engine_decode_step_through_the_kernel(monkeypatch):
    """The engine's static decode step (bucketed, run eagerly on the CPU: what a CUDA graph records) with both
    absorbed products of every layer through the interpreted kernel (forced) gives the same next-token logits."""
    from dsv3.kernels import head_gemv_triton as k

    seen, launch = [], k.launch
    monkeypatch.setattr(k, "launch", lambda x, w, config=None: seen.append(x.shape[0]) or launch(x, w, config))
    model = make_model(tiny_cfg(num_nextn_predict_layers=0))

    want = decode_step(model)[0]  # (the prefill attends in the expanded form: no absorbed products)
    with kernels.use_backend(head_gemv="triton"):
        got = decode_step(model)[0]
    assert seen == [2] * (2 * model.config.num_hidden_layers)  # the decode step's 2 rows, 2 products a layer
    assert _rel(got, want) < 1e-5, _rel(got, want)
