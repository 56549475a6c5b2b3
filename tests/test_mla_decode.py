"""Absorbed-MLA decode attention over the paged latent cache: the specification `mla_decode_ref`
(dsv3/kernels/reference.py), the decode view's block tables / lengths (dsv3/inference/graphs.py),
and the Triton kernel (dsv3/kernels/mla_decode_triton.py) run by the Triton interpreter on the CPU.

Run: python -m pytest tests/test_mla_decode.py -q
The kernel tests need triton and the interpreter (skipped otherwise, e.g. in CI):

    TRITON_INTERPRET=1 python -m pytest tests/test_mla_decode.py -q

The interpreter has no bf16 matmul (it multiplies the raw bits), so it checks fp32 and fp16; bf16
and the real GPU runs are in tests/test_gpu_mla_decode.py.
"""

from __future__ import annotations


import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.inference.cache import PagedLatentCache
from dsv3.inference.graphs import DecodeGraphs, StaticBatch
from dsv3.kernels import mla_decode_ref
from dsv3.model import build_model, rope
from dsv3.model.mla import MLA
from conftest import needs_interpreter  # noqa: E402




def _cfg() -> ModelConfig:
    """2 layers (dense, MoE), 4 heads, latent C = 32, rope R = 16."""
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                       q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                       n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                       max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=0,
                       initializer_range=0.2).validate()


def _random_mla(cfg: ModelConfig, seed: int = 0) -> MLA:
    g = torch.Generator().manual_seed(seed)
    mla = MLA(cfg)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            p.copy_((1.0 + 0.3 * torch.randn(p.shape, generator=g)) if "layernorm" in name
                    else 0.2 * torch.randn(p.shape, generator=g))
    return mla.eval()


def _random_paged(B: int, nblk: int, block_size: int, C: int, R: int, dtype: torch.dtype, seed: int):
    """One layer's cache (random latents everywhere), random distinct block tables (B, nblk) and
    lengths (B,) covering 1, the full nblk * block_size and values in between."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = B * nblk + 3
    kv = torch.randn(num_blocks * block_size, C, generator=g).to(dtype)
    pe = torch.randn(num_blocks * block_size, R, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: B * nblk].view(B, nblk)
    S = nblk * block_size
    lens = torch.randint(1, S + 1, (B,), generator=g)
    lens[0] = 1
    if B > 1:
        lens[1] = S
    return kv, pe, tables, lens


# ------------------------------------------------------------------------------------------------
# the specification

@pytest.mark.parametrize("block_size", [3, 16])
@torch.no_grad()
def test_mla_decode_ref_is_forward_absorbed_at_one_token(block_size):
    """mla_decode_ref over the paged cache = the einsum attention of MLA.forward_absorbed (T = 1, through
    CacheBatch's gathered context and mask) for random block tables and lengths 1 .. full."""
    cfg = _cfg()
    mla = _random_mla(cfg)
    C, R, B, nblk = cfg.kv_lora_rank, cfg.qk_rope_head_dim, 5, 4
    S = nblk * block_size
    g = torch.Generator().manual_seed(block_size)
    cache = PagedLatentCache(1, B * nblk + 3, block_size, C, R)
    cache.kv.normal_(generator=g)  # the context written by earlier steps
    cache.pe.normal_(generator=g)
    tables = torch.randperm(cache.num_blocks, generator=g)[: B * nblk].view(B, nblk)
    seq_lens = torch.tensor([1, S, 2, block_size + 1, S - 1])  # the new token included
    pos = seq_lens - 1
    x = torch.randn(B, 1, cfg.hidden_size, generator=g)
    cos, sin = rope.cos_sin(pos[:, None], rope.inv_freq(cfg), rope.cos_sin_factor(cfg))  # (B, 1, R/2)

    out = mla.forward_absorbed(x, cos, sin, cache.batch(tables.tolist(), pos.tolist(), [1] * B).layer(0))
    # the same layer through the specification, over the cache as forward_absorbed left it
    q_nope, q_pe = mla.query(x, cos, sin)
    w_uk, w_uv = mla.kv_b_weights(x.dtype)
    q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)[:, 0]  # (B, H, C)
    o_lat = mla_decode_ref(q_lat, q_pe[:, 0], cache.kv[0], cache.pe[0], tables, seq_lens, block_size, mla.scale)
    ref = mla.o_proj(torch.einsum("bhc,hdc->bhd", o_lat, w_uv).reshape(B, 1, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 3])
def test_static_batch_derives_tables_slots_and_mask(T):
    """prepare() derives from meta = [pos0, tokens (T), block table]: positions pos0 .. pos0+T-1, read
    slots, write slots, the causal mask (B, 1, T, S), and the kernel's per-query block tables and
    lengths (query t of sequence b: b's table, length pos0 + t + 1); padding rows: the pad block."""
    cache = PagedLatentCache(1, num_blocks=20, block_size=4, kv_dim=8, pe_dim=4)
    pad = cache.reserve()
    sb = StaticBatch(cache, batch=4, T=T, nblk=4, pad_block=pad)
    tables, positions = [[3, 7], [5, 1, 9, 2], [11]], [5, 12, 0]
    for b, (tbl, p) in enumerate(zip(tables, positions)):  # as DecodeGraphs fills it
        sb.meta[b, 0] = p
        sb.meta[b, 1: 1 + T] = torch.arange(T) + 10 * b
        sb.meta[b, 1 + T: 1 + T + len(tbl)] = torch.tensor(tbl)
    sb.prepare()
    want = torch.full((4, 4), pad)
    for b, tbl in enumerate(tables):
        want[b, : len(tbl)] = torch.tensor(tbl)
    assert torch.equal(sb.block_table, want) and torch.equal(sb.ids[:3, 0], torch.tensor([0, 10, 20]))
    s = torch.arange(sb.S)
    rows = want[:, s // 4] * 4 + s % 4  # (B, S)
    for b, p in enumerate(positions + [0]):
        assert sb.positions[b].tolist() == list(range(p, p + T))
        assert torch.equal(sb.read_slots[b], rows[b])
        for t in range(T):
            assert torch.equal(sb.mask[b, 0, t], s <= p + t)
            assert sb.write_slots[b, t] == rows[b, p + t]
            assert torch.equal(sb.q_tables[b * T + t], want[b]) and sb.q_lens[b * T + t] == p + t + 1


def _model_and_cache(block_size: int = 16):
    """The tiny model and a paged cache whose every row holds random latents (a prefilled context)."""
    model = build_model(_cfg(), seed=0).eval()
    cache = PagedLatentCache.for_model(model, num_blocks=16, block_size=block_size)
    g = torch.Generator().manual_seed(3)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    cache.pe.copy_(torch.randn(cache.pe.shape, generator=g))
    return model, cache, cache.reserve()


@torch.no_grad()
def _static_step(model, cache, pad: int, attention, T: int = 1) -> torch.Tensor:
    """One static step of T tokens for 3 sequences in a 4-row bucket (one padding row), 4 blocks of
    context (up to 2 kernel tiles);
    `attention` None: MLA's einsums over update()'s gathered context; else the layer views' attend()."""
    sb = StaticBatch(cache, batch=4, T=T, nblk=4, pad_block=pad, attention=attention)
    tables, positions = [[0, 5, 2], [7], [1, 3, 4, 6]], [40, 0, 64 - T]
    for b, (tbl, p) in enumerate(zip(tables, positions)):
        sb.meta[b, 0] = p
        sb.meta[b, 1: 1 + T] = torch.arange(T) + 11 * b + 1
        sb.meta[b, 1 + T: 1 + T + len(tbl)] = torch.tensor(tbl)
    sb.prepare()
    return model(sb.ids, sb.positions, cache=sb, with_mtp=False).logits  # (4, T, V)


@pytest.mark.parametrize("T", [1, 3])
def test_static_decode_attend_path_equals_update_path(T):
    """MLA's fused branch (store + attend, here with the reference as the kernel, over B·T queries for
    T > 1) gives the logits of the gathered-context einsums with the causal mask; the padding row
    stays finite. On the CPU DecodeGraphs keeps the einsums (no kernel)."""
    model, cache, pad = _model_and_cache()
    ref = _static_step(model, cache, pad, None, T)
    got = _static_step(model, cache, pad, mla_decode_ref, T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()
    graphs = DecodeGraphs(model, cache, pad, max_batch_size=4, max_blocks=4, use_graphs=False)
    assert graphs._entry(("main",), 4, T, 4).sb.attention is None


def test_static_main_step_takes_device_positions_with_a_host_bound():
    """DecodeGraphs.main with pos0 as a device tensor (overlapped speculation: the next round's positions are the
    round in flight's, advanced by its accepted counts) gives the logits of the same step with host positions; a
    device pos0 needs last_pos, the host bound that picks the context bucket."""
    model, cache, pad = _model_and_cache()
    graphs = DecodeGraphs(model, cache, pad, max_batch_size=4, max_blocks=4, use_graphs=False)
    tokens, pos0, tables = [[5, 7], [9, 11], [3, 4]], [20, 33, 9], [[0, 1, 2], [3, 4, 5], [6, 7]]
    want = graphs.main(tokens, pos0, tables)[0].clone()
    got = graphs.main(torch.tensor(tokens), torch.tensor(pos0), tables, last_pos=40)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs last_pos"):
        graphs.main(tokens, torch.tensor(pos0), tables)


# ------------------------------------------------------------------------------------------------
# the Triton kernel, interpreted on the CPU

@pytest.fixture
def mla_decode_interpreted(monkeypatch):
    """The kernel under the Triton interpreter. Triton 3.6's interpreter turns its scalars (1-element
    arrays) into ints with int(), which NumPy >= 2.4 refuses, so loops with run-time bounds fail
    (triton-lang/triton#9171, fixed upstream by #9172): apply that one-line fix for the test."""
    from triton.runtime import interpreter

    if hasattr(interpreter, "_patch_lang_tensor"):
        patch = interpreter._patch_lang_tensor

        def fixed(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        monkeypatch.setattr(interpreter, "_patch_lang_tensor", fixed)
    from dsv3.kernels.mla_decode_triton import mla_decode

    return mla_decode


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,C,R,block_size,nblk,num_splits", [
    (3, 4, 32, 16, 4, 20, None),  # test config: 4 heads padded to a 16-head group; 3 splits of 1 tile
    (2, 40, 48, 8, 16, 3, None),  # 3 groups of 16 heads (the last half masked); C, R padded
    (4, 16, 64, 16, 3, 40, 2),  # block size 3 (tiles straddle blocks), 2 splits of up to 2 tiles
    (3, 16, 32, 16, 4, 12, 5),  # 5 splits: the short sequences leave some empty
    (1, 16, 32, 16, 16, 8, 64),  # more splits asked than tiles: capped, one tile per split
])
def test_triton_mla_decode_matches_reference(mla_decode_interpreted, dtype, B, H, C, R, block_size, nblk, num_splits):
    kv, pe, tables, lens = _random_paged(B, nblk, block_size, C, R, dtype, seed=H + C)
    g = torch.Generator().manual_seed(1)
    q_lat = torch.randn(B, H, C, generator=g).to(dtype)
    q_pe = torch.randn(B, H, R, generator=g).to(dtype)
    scale = 0.3
    got = mla_decode_interpreted(q_lat, q_pe, kv, pe, tables, lens, block_size, scale, num_splits)
    ref = mla_decode_ref(q_lat, q_pe, kv, pe, tables, lens, block_size, scale)
    assert got.dtype == dtype and got.shape == (B, H, C)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: p rounded to fp16 for the p · kv product
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@needs_interpreter
def test_static_decode_step_with_interpreted_kernel(mla_decode_interpreted):
    """The whole decode step through MLA's fused branch with the (interpreted) Triton kernel."""
    model, cache, pad = _model_and_cache()
    ref = _static_step(model, cache, pad, None)
    got = _static_step(model, cache, pad, mla_decode_interpreted)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the merge with W_UV in one launch (mla_decode_uv, kernels.set_mla_uv)

def _w_uv(H: int, nope: int, V: int, C: int, dtype, seed: int) -> torch.Tensor:
    """W_UV as the model holds it: a view (H, v, C) of kv_b_proj's weight (H · (nope + v), C)."""
    g = torch.Generator().manual_seed(seed)
    kv_b = (0.2 * torch.randn(H * (nope + V), C, generator=g)).to(dtype)
    return kv_b.view(H, nope + V, C)[:, nope:]


def test_mla_decode_uv_reference_is_attention_then_w_uv():
    from dsv3 import kernels

    kv, pe, tables, lens = _random_paged(3, 5, 4, 32, 16, torch.float32, seed=2)
    g = torch.Generator().manual_seed(5)
    q_lat, q_pe = torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, 16, generator=g)
    w_uv = _w_uv(4, 16, 24, 32, torch.float32, seed=1)
    got = kernels.mla_decode_uv(q_lat, q_pe, kv, pe, tables, lens, 4, 0.3, w_uv)  # CPU: the reference
    o_lat = mla_decode_ref(q_lat, q_pe, kv, pe, tables, lens, 4, 0.3)
    want = torch.stack([o_lat[:, h] @ w_uv[h].T for h in range(4)], 1)  # (B, H, v) head by head
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="w_uv"):
        kernels.mla_decode_uv(q_lat, q_pe, kv, pe, tables, lens, 4, 0.3, w_uv[:, :, :16])


def test_mla_uv_rule_takes_one_query_row(monkeypatch):
    """The merge + W_UV launch (on by default) for one query row only (backend.MLA_UV_ROWS: slower at batch 32 on an
    H100); bf16 W_UV C-contiguous in q's dtype; with the model's (B, T, H, C) and the kernel's (B, H, C) shapes."""
    from dsv3 import kernels
    from dsv3.kernels import backend as kb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kb, "_probes", {"triton": True, "scaled_mm": True, ("capability", 0): (9, 0)})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    w_uv = _w_uv(4, 16, 24, 32, torch.bfloat16, seed=1)
    assert kb.SWITCHED["mla_uv"] is True and kb.MLA_UV_ROWS == 1
    for shape, ok in (((1, 1, 4, 32), True), ((1, 4, 32), True), ((2, 1, 4, 32), False), ((1, 2, 4, 32), False),
                      ((3, 4, 32), False), ((0, 4, 32), False)):
        q = torch.zeros(shape, dtype=torch.bfloat16)
        assert (kernels.select_backend("mla_uv", q, w_uv) == "triton") is ok, shape
    q = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    assert kernels.select_backend("mla_uv", q.float(), w_uv) == "reference"  # W_UV not in q's dtype
    assert kernels.select_backend("mla_uv", q, w_uv.contiguous().transpose(1, 2).contiguous().transpose(1, 2)) \
        == "reference"  # W_UV not C-contiguous


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,C,R,V,block_size,nblk,num_splits", [
    (3, 4, 32, 16, 16, 4, 20, None),  # 3 splits of 1 tile; v = 16: two 8-row W_UV slices a head
    (2, 40, 48, 8, 20, 16, 3, None),  # C padded to 64, v = 20: the last slice masked
    (3, 16, 32, 16, 8, 4, 12, 5),  # 5 splits, some empty for the short sequences
])
def test_triton_mla_decode_uv_matches_reference(mla_decode_interpreted, dtype, B, H, C, R, V, block_size, nblk,
                                                num_splits):
    from dsv3.kernels.mla_decode_triton import mla_decode_uv

    kv, pe, tables, lens = _random_paged(B, nblk, block_size, C, R, dtype, seed=H + C)
    g = torch.Generator().manual_seed(1)
    q_lat = torch.randn(B, H, C, generator=g).to(dtype)
    q_pe = torch.randn(B, H, R, generator=g).to(dtype)
    w_uv = _w_uv(H, 8, V, C, dtype, seed=V)
    got = mla_decode_uv(q_lat, q_pe, kv, pe, tables, lens, block_size, 0.3, w_uv, num_splits)
    o_lat = mla_decode_ref(q_lat, q_pe, kv, pe, tables, lens, block_size, 0.3)  # rounded to dtype, as the kernel
    want = torch.einsum("bhc,hvc->bhv", o_lat.float(), w_uv.float())
    assert got.dtype == dtype and got.shape == (B, H, V)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@needs_interpreter
def test_static_decode_step_with_interpreted_uv_kernel(mla_decode_interpreted):
    """The whole decode step through MLA's fused branch taking attend_uv (switched on) with the interpreted
    kernels: the logits of the einsum path; off, the view's attend runs as before."""
    from dsv3 import kernels

    model, cache, pad = _model_and_cache()
    ref = _static_step(model, cache, pad, None)
    with kernels.use_backend(mla_uv="triton"):
        got = _static_step(model, cache, pad, mla_decode_interpreted)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
