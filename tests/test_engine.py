"""Inference: absorbed MLA, the paged latent KV cache, the continuous-batching engine, sampling
parameters and MTP self-speculative decoding (greedy identity and a statistical test of the
speculative-sampling rule).

Run: python -m pytest tests/test_engine.py -q

Everything is fp32 on the CPU with tiny random models (init std 0.2 so that attention, routing and
next-token distributions are far from uniform). References are independent of the code under test
where possible: the expanded MLA, the uncached full forward, `generate_naive` (full recomputation),
and exact next-token distributions computed from uncached forwards.
"""

from __future__ import annotations

import dataclasses

import itertools
import math
import random
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from dsv3.config import preset
from dsv3.inference.cache import CacheFull, PagedLatentCache
from dsv3.inference.engine import Engine, SamplingParams
from dsv3.inference.naive import generate_naive
from dsv3.inference.sampling import BatchSampler, filter_logits, sample
from dsv3.model import rope
from dsv3.model.mla import MLA
from dsv3.tokenizer import DSTokenizer
from conftest import make_model, tiny_cfg, yarn

STD = 0.2


# ------------------------------------------------------------------------------------------------
# models and helpers

def cfg_plain(**kw):
    """3 layers (1 dense + 2 MoE), q-LoRA, plain RoPE, D = 1."""
    return tiny_cfg(initializer_range=STD, **kw)


def cfg_yarn(**kw):
    """YaRN (original context 32, so prompts of ~40 tokens cross it), no q-LoRA, D = 2."""
    return tiny_cfg(initializer_range=STD, q_lora_rank=None, rope_scaling=yarn(factor=4.0, original=32),
                    num_nextn_predict_layers=2, **kw)


CFGS = {"plain": cfg_plain, "yarn": cfg_yarn}


@pytest.fixture(scope="module")
def models():
    return {name: make_model(f(), seed=3, bias_std=0.3) for name, f in CFGS.items()}


def spec_model(D: int, drafter: str, vocab: int = 64, seed: int = 5):
    """A 1-layer MoE model with D MTP modules and no EOS.

    drafter "random": the MTP modules keep their random weights (low acceptance: the rejection path).
    drafter "aligned": each MTP block is a copy of the main layer fed only the next token's embedding
    (eh_proj = [I, 0], embedding rows of unit RMS so enorm is the identity); because RoPE is relative,
    MTP position i then computes almost exactly what the main model computes at position i + 1, so
    drafts are mostly right (long accepted runs, stops and length limits inside accepted drafts)."""
    cfg = tiny_cfg(initializer_range=STD, num_hidden_layers=1, first_k_dense_replace=0, vocab_size=vocab,
                   num_nextn_predict_layers=D, eos_token_id=None)
    model = make_model(cfg, seed=seed, bias_std=0.3)
    if drafter == "aligned":
        with torch.no_grad():
            E = model.embed_tokens.weight
            E.div_(E.pow(2).mean(-1, keepdim=True).sqrt())
            H = cfg.hidden_size
            for mod in model.mtp:
                missing, unexpected = mod.load_state_dict(model.layers[0].state_dict(), strict=False)
                assert not unexpected
                mod.eh_proj.weight.zero_()
                mod.eh_proj.weight[:, :H] = torch.eye(H)
                mod.enorm.weight.fill_(1.0)
                mod.shared_head.norm.weight.copy_(model.norm.weight)
    return model.eval()


@pytest.fixture(scope="module")
def spec_models():
    return {(D, d): spec_model(D, d) for D in (1, 2) for d in ("aligned", "random")}


def prompts_for(cfg, lengths, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Uncached forward of the whole sequence: (T, V)."""
    return model(torch.tensor([ids]), with_mtp=False).logits[0]


def naive_greedy(model, prompt, n):
    """Greedy continuation by full recomputation, with EOS handled as the engine does it
    (the stop token ends the output and is not part of it)."""
    eos = model.config.eos_token_id
    new = generate_naive(model, prompt, n, temperature=0.0, eos_id=eos)
    if eos is not None and new and new[-1] == eos:
        return new[:-1], "stop"
    return new, "length"


def run_all(engine: Engine) -> dict[str, object]:
    """Step the engine until idle; the final output of every request by id."""
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    return final


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


# ------------------------------------------------------------------------------------------------
# 1. absorbed == expanded

def _random_mla(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    mla = MLA(cfg)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if "layernorm" in name:  # non-trivial norm gains: the cache must hold the *normalised* latent
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=g))
    return mla.eval()


@pytest.mark.parametrize("name", ["plain", "yarn"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 5), (3, 17), (2, 40)])
@torch.no_grad()
def test_mla_absorbed_equals_expanded(name, B, T):
    cfg = CFGS[name]()
    mla = _random_mla(cfg)
    x = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(B * 100 + T))
    cos, sin = rope.cos_sin(torch.arange(T), rope.inv_freq(cfg), rope.cos_sin_factor(cfg))
    ref = mla(x, cos.unsqueeze(0), sin.unsqueeze(0))  # expanded, causal

    cache = PagedLatentCache(1, num_blocks=64, block_size=3, kv_dim=cfg.kv_lora_rank, pe_dim=cfg.qk_rope_head_dim)
    tables = [cache.allocate(cache.blocks_for(T)) for _ in range(B)]
    cb = cache.batch(tables, [0] * B, [T] * B)
    out = mla.forward_absorbed(x, cos.unsqueeze(0), sin.unsqueeze(0), cb.layer(0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the `cache=` argument of forward dispatches to the absorbed form
    for t in tables:
        cache.release(t)
    tables = [cache.allocate(cache.blocks_for(T)) for _ in range(B)]
    out2 = mla(x, cos.unsqueeze(0), sin.unsqueeze(0), None, cache.batch(tables, [0] * B, [T] * B).layer(0))
    torch.testing.assert_close(out2, ref, rtol=1e-5, atol=1e-5)

    # the same sequence in two chunks: the second chunk attends to the cached first one
    if T > 1:
        t1 = T // 2
        for t in tables:
            cache.release(t)
        tables = [cache.allocate(cache.blocks_for(T)) for _ in range(B)]
        o1 = mla.forward_absorbed(x[:, :t1], cos[None, :t1], sin[None, :t1],
                                  cache.batch(tables, [0] * B, [t1] * B).layer(0))
        o2 = mla.forward_absorbed(x[:, t1:], cos[None, t1:], sin[None, t1:],
                                  cache.batch(tables, [t1] * B, [T - t1] * B).layer(0))
        torch.testing.assert_close(torch.cat([o1, o2], 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "yarn"])
@torch.no_grad()
def test_model_prefill_through_cache_equals_uncached(models, name):
    model = models[name]
    cfg = model.config
    lengths = [7, 1, 23, 40]
    prompts = prompts_for(cfg, lengths)
    cache = PagedLatentCache.for_model(model, num_blocks=64, block_size=4)
    tables = [cache.allocate(cache.blocks_for(n)) for n in lengths]
    cb = cache.batch(tables, [0] * len(lengths), lengths)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    out = model(ids, cb.positions, cache=cb)
    assert out.mtp_logits == []  # with a cache, MTP is left to mtp_step
    for b, p in enumerate(prompts):
        ref = model(torch.tensor([p]))
        n = len(p)
        torch.testing.assert_close(out.logits[b, :n], ref.logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.hidden[b, :n], ref.hidden[0], rtol=1e-5, atol=1e-5)
        # MTP modules through the cache == the uncached (training) MTP forward
        n_layers = cfg.num_hidden_layers
        h_prev = ref.hidden
        for k in range(cfg.num_nextn_predict_layers):
            Tk = n - k - 1
            if Tk <= 0:
                break
            tbl = cache.allocate(cache.blocks_for(n))
            mcb = cache.batch([tbl], [0], [Tk])
            h_prev, lg = model.mtp_step(k, torch.tensor([p[k + 1:]]), h_prev[:, :Tk], mcb.positions,
                                        mcb.layer(n_layers + k))
            torch.testing.assert_close(lg[0], ref.mtp_logits[k][0], rtol=1e-5, atol=1e-5)
            cache.release(tbl)


@pytest.mark.parametrize("name", ["plain", "yarn"])
@torch.no_grad()
def test_prefill_expanded_path_equals_absorbed_and_chunked(models, name):
    """A prefill view (every sequence from position 0) attends in the expanded form and only stores the
    latents: its logits and the stored latents equal the absorbed path's (the same batch with the flag
    off); a prompt prefilled in two chunks (the second one absorbed, T > 1, over the first's cache)
    gives the uncached logits."""
    model = models[name]
    lengths = [7, 1, 23]
    prompts = prompts_for(model.config, lengths, seed=5)
    ids = torch.zeros(3, 23, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    outs, caches = [], []
    for prefill in (True, False):
        cache = PagedLatentCache.for_model(model, num_blocks=32, block_size=4)
        cb = cache.batch([cache.allocate(cache.blocks_for(n)) for n in lengths], [0] * 3, lengths)
        assert cb.prefill
        cb.prefill = prefill
        outs.append(model(ids, cb.positions, cache=cb).logits)
        caches.append(cache)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(outs[0][b, :n], outs[1][b, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].kv, caches[1].kv, rtol=1e-5, atol=1e-5)  # (later layers see the
    # attention outputs of the two forms, equal to fp32 rounding)
    torch.testing.assert_close(caches[0].pe, caches[1].pe, rtol=1e-5, atol=1e-5)
    p = prompts[2]
    cache = PagedLatentCache.for_model(model, num_blocks=32, block_size=4)
    tbl = cache.allocate(cache.blocks_for(len(p)))
    model(torch.tensor([p[:9]]), cache.batch([tbl], [0], [9]).positions, cache=cache.batch([tbl], [0], [9]))
    want = model(torch.tensor([p])).logits[0, 9:]
    for chunk, budget in ((False, None), (True, None), (True, 1)):  # absorbed over the cache, or (the engine's
        # chunked prefill) expanded over it: all heads at once, or (a 1-byte budget) one head at a time
        cb = cache.batch([tbl], [9], [len(p) - 9], chunk=chunk)
        assert not cb.prefill and cb.chunk == chunk
        with mock.patch.object(MLA, "chunk_context_bytes", budget or MLA.chunk_context_bytes):
            got = model(torch.tensor([p[9:]]), cb.positions, cache=cb).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_chunk_view_of_a_batch_from_position_0_is_a_prefill():
    """cache.batch(..., chunk=True) with every sequence from position 0 is the plain prefill view (not a chunk)."""
    cache = PagedLatentCache(1, 8, 4, 8, 4)
    assert cache.batch([[0], [1]], [0, 0], [3, 2], chunk=True).prefill
    assert not cache.batch([[0], [1]], [0, 0], [3, 2], chunk=True).chunk
    assert cache.batch([[0], [1]], [0, 2], [3, 2], chunk=True).chunk
    # one sequence: SDPA gets a lower-right causal bias, and no (T, S) mask is built; it equals the mask
    from torch.nn.attention.bias import CausalBias

    one, two = cache.batch([[2, 3]], [3], [4], chunk=True), cache.batch([[2, 3], [4]], [3, 0], [4, 2], chunk=True)
    assert one.lower_right and isinstance(one.attn_mask(), CausalBias) and one._ranges is None
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=one.attn_mask()), sdpa(q, k, v, attn_mask=one.mask))
    # several: per-sequence causal ranges (query t of sequence b sees keys <= start[b] + t of its own context),
    # which kernels.attention gives SDPA as the (B, 1, T, S) mask and the batch-invariant kernel by position
    from dsv3.kernels import attention as kattention
    from dsv3.kernels.masks import CausalRanges

    r = two.attn_mask()
    assert not two.lower_right and isinstance(r, CausalRanges) and r._mask is None  # (built when asked)
    assert r.q_start.tolist() == [3, 0] and r.k_len.tolist() == [7, 2] and r.mask is two.mask
    s, t = torch.arange(7), torch.arange(4)[:, None]
    assert torch.equal(two.mask[0, 0], s <= 3 + t)  # 4 new tokens from position 3 of 7
    assert torch.equal(two.mask[1, 0, :2], (s <= t[:2]) & (s < 2))  # 2 new tokens of a 2-token context
    assert torch.equal(two.mask[1, 0, 2:], (s < 2).expand(2, 7))  # its padding queries: the whole context
    q2, k2, v2 = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 4)
    torch.testing.assert_close(kattention(q2, k2, v2, 0.3, r), sdpa(q2, k2, v2, attn_mask=two.mask, scale=0.3))


# ------------------------------------------------------------------------------------------------
# 2. cached decode == full recomputation, on fragmented block tables

def _fragmented_tables(cache: PagedLatentCache, needs: list[int]) -> list[list[int]]:
    """Block tables for sequences of the given lengths, allocated one block at a time round-robin,
    interleaved with blocks of a dummy sequence that is then freed and partly re-used: every table
    ends up non-contiguous and out of order."""
    tables: list[list[int]] = [[] for _ in needs]
    dummy: list[int] = []
    want = [cache.blocks_for(n) for n in needs]
    half = [w // 2 for w in want]
    for r in range(max(half)):
        for b in range(len(needs)):
            if r < half[b]:
                tables[b] += cache.allocate(1)
            dummy += cache.allocate(1)
    cache.release(dummy)
    for r in range(max(want)):
        for b in range(len(needs)):
            if len(tables[b]) < want[b]:
                tables[b] += cache.allocate(1)
    for t in tables:
        if len(t) > 2:
            assert any(b2 != b1 + 1 for b1, b2 in zip(t, t[1:])), t
    return tables


@pytest.mark.parametrize("name,block_size", [("plain", 2), ("yarn", 3), ("plain", 4)])
@torch.no_grad()
def test_cached_decode_equals_full_recomputation(models, name, block_size):
    model = models[name]
    cfg = model.config
    total = [38, 21, 44]
    prompt_len = [5, 13, 2]
    seqs = prompts_for(cfg, total, seed=block_size)
    refs = [full_logits(model, s) for s in seqs]  # causal: row p is the logits after s[:p+1]
    cache = PagedLatentCache.for_model(model, num_blocks=120, block_size=block_size)
    tables = _fragmented_tables(cache, total)
    pos = [0] * len(seqs)
    # chunk schedules: prefill, then single tokens and chunks (speculative verification), ragged across
    # the batch so that every forward has padding
    sched = [[p] for p in prompt_len]
    for b, seq in enumerate(seqs):
        pattern = itertools.cycle([[1, 3], [1], [2, 1, 4]][b])  # tokens per forward
        left = total[b] - prompt_len[b]
        while left > 0:
            n = min(next(pattern), left)
            sched[b].append(n)
            left -= n
    step = 0
    while any(pos[b] < total[b] for b in range(len(seqs))):
        active = [b for b in range(len(seqs)) if pos[b] < total[b]]
        n_new = [sched[b][step] if step < len(sched[b]) else 0 for b in active]
        active = [b for b, n in zip(active, n_new) if n > 0]
        n_new = [n for n in n_new if n > 0]
        ids = torch.zeros(len(active), max(n_new), dtype=torch.long)
        for i, (b, n) in enumerate(zip(active, n_new)):
            ids[i, :n] = torch.tensor(seqs[b][pos[b]: pos[b] + n])
        cb = cache.batch([tables[b] for b in active], [pos[b] for b in active], n_new)
        out = model(ids, cb.positions, cache=cb)
        for i, (b, n) in enumerate(zip(active, n_new)):
            torch.testing.assert_close(out.logits[i, :n], refs[b][pos[b]: pos[b] + n], rtol=1e-5, atol=2e-5)
            pos[b] += n
        step += 1
    assert step > 15


# ------------------------------------------------------------------------------------------------
# 3. PagedLatentCache

def test_cache_block_accounting():
    cache = PagedLatentCache(n_slots=2, num_blocks=5, block_size=4, kv_dim=16, pe_dim=8)
    assert cache.free_blocks == 5
    assert [cache.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    a = cache.allocate(2)
    b = cache.allocate(3)
    assert cache.free_blocks == 0 and sorted(a + b) == list(range(5))
    with pytest.raises(CacheFull):
        cache.allocate(1)
    assert cache.allocate(0) == []
    cache.release(a)
    assert cache.free_blocks == 2
    with pytest.raises(CacheFull):
        cache.allocate(3)
    c = cache.allocate(2)
    assert sorted(c) == sorted(a)
    cache.release(b)
    cache.release(c)
    assert cache.free_blocks == 5
    # a forward that would write past a sequence's table is refused
    tbl = cache.allocate(1)
    with pytest.raises(CacheFull):
        cache.batch([tbl], [3], [2])  # positions 3, 4 need 2 blocks
    cache.batch([tbl], [3], [1])  # position 3 fits
    with pytest.raises(ValueError):
        PagedLatentCache(1, 0, 4, 16, 8)
    with pytest.raises(ValueError):
        PagedLatentCache(1, 4, 0, 16, 8)


def test_cache_layout_and_bytes_per_token(models):
    model = models["plain"]
    cfg = model.config
    n_slots = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    cache = PagedLatentCache.for_model(model, num_blocks=7, block_size=3)
    # exactly (slots, tokens, kv_lora_rank) and (slots, tokens, rope): no per-head K/V anywhere
    tensors = {k: v for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == {"kv", "pe"}
    assert cache.kv.shape == (n_slots, 21, cfg.kv_lora_rank)
    assert cache.pe.shape == (n_slots, 21, cfg.qk_rope_head_dim)
    per_token = n_slots * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert PagedLatentCache.bytes_per_token(model, torch.float32) == 4 * per_token
    assert PagedLatentCache.bytes_per_token(model, torch.bfloat16) == 2 * per_token
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total == PagedLatentCache.bytes_per_token(model, torch.float32) * 21
    # DeepSeek-V3 itself: 61 layers x 576 values in BF16 = 70,272 bytes (SPEC §3.5), plus the MTP layer
    v3 = SimpleNamespace(config=preset("671b"))
    assert PagedLatentCache.bytes_per_token(v3, torch.bfloat16) == 70_272 + 576 * 2


@torch.no_grad()
def test_cache_holds_normalised_latent_and_rotated_key(models):
    """The stored rows are kv_a_layernorm(c_kv) and the RoPE-rotated k_pe of each token, at
    slot table[p // block_size] * block_size + p % block_size, computed here by hand."""
    model = models["yarn"]
    cfg = model.config
    cache = PagedLatentCache.for_model(model, num_blocks=40, block_size=3)
    seqs = prompts_for(cfg, [11, 36], seed=4)
    tables = _fragmented_tables(cache, [len(s) for s in seqs])
    attn_in = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, inp, out, i=i: attn_in.__setitem__(i, inp[0].detach())) for i, layer in enumerate(model.layers)]
    try:
        T = max(len(s) for s in seqs)
        ids = torch.zeros(2, T, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
        cb = cache.batch(tables, [0, 0], [len(s) for s in seqs])
        model(ids, cb.positions, cache=cb)
    finally:
        for h in hooks:
            h.remove()
    C, bs = cfg.kv_lora_rank, cache.block_size
    written = torch.zeros(cache.kv.shape[1], dtype=torch.bool)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        kv = attn_in[i] @ attn.kv_a_proj_with_mqa.weight.T  # (B, T, C + R)
        c, pe = kv[..., :C], kv[..., C:]
        c_norm = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.kv_a_layernorm.weight
        for b, s in enumerate(seqs):
            for p in range(len(s)):
                slot = tables[b][p // bs] * bs + p % bs
                written[slot] = True
                theta = p * model.rope_inv_freq  # (R/2,), YaRN-corrected frequencies
                x1, x2 = pe[b, p, 0::2], pe[b, p, 1::2]
                rot = torch.stack([x1 * theta.cos() - x2 * theta.sin(), x1 * theta.sin() + x2 * theta.cos()], -1).flatten()
                torch.testing.assert_close(cache.kv[i, slot], c_norm[b, p], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(cache.pe[i, slot], rot, rtol=1e-5, atol=1e-6)
    # nothing else was written (padding positions of the shorter sequence included)
    assert cache.kv[:, ~written].abs().max() == 0 and cache.pe[:, ~written].abs().max() == 0


def test_allocated_blocks_read_as_zeros():
    """A re-used block must not carry another sequence's latents (positions an MTP module > 1 reads
    but never writes would otherwise make drafts depend on other requests)."""
    cache = PagedLatentCache(n_slots=2, num_blocks=3, block_size=2, kv_dim=4, pe_dim=2)
    blocks = cache.allocate(3)
    cache.kv.fill_(1.0)
    cache.pe.fill_(1.0)
    cache.release(blocks[:2])
    again = cache.allocate(2)
    for blk in again:
        assert cache.kv[:, blk * 2: blk * 2 + 2].abs().max() == 0
        assert cache.pe[:, blk * 2: blk * 2 + 2].abs().max() == 0
    assert cache.kv[:, blocks[2] * 2].min() == 1  # the block still held is untouched


# ------------------------------------------------------------------------------------------------
# 4. the engine vs full recomputation; continuous batching, queueing, admission, abort

LENGTHS = [3, 9, 1, 14, 6]


@pytest.fixture(scope="module")
def naive_refs(models):
    refs = {}
    for name, model in models.items():
        prompts = prompts_for(model.config, LENGTHS, seed=21)
        refs[name] = (prompts, [naive_greedy(model, p, 10) for p in prompts])
    return refs


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name", ["plain", "yarn"])
def test_engine_greedy_matches_naive(models, naive_refs, name, graphs):
    # graphs=True: the static-shape decode step of dsv3/inference/graphs.py (run eagerly on the CPU;
    # batch 5 pads to 8, context buckets of 1/2/4/8 blocks of 3 are crossed by the growing sequences)
    model = models[name]
    prompts, refs = naive_refs[name]
    eng = Engine(model, max_batch_size=8, block_size=3, cuda_graphs=graphs)
    outs = eng.generate(prompts, greedy(10))
    for o, p, (toks, reason) in zip(outs, prompts, refs):
        assert o.token_ids == toks and o.finish_reason == reason and o.finished
        assert o.prompt_tokens == len(p) and o.logprobs is None and o.text == ""
    assert eng.cache.free_blocks == eng.cache.num_blocks and not eng.has_unfinished()
    if graphs:  # the first decode step runs every sequence the prefill's token did not finish, padded to a power of 2
        from dsv3.inference.graphs import next_pow2

        first = sum(len(t) > 1 for t, _ in refs)  # e.g. 5 rows pad to 8, 4 run as 4
        assert first >= 3 and {k[1] for k in eng._graphs._entries} >= {next_pow2(first)}
    else:  # exact shapes: a step's static batch is not kept (one per (batch, context) would pile up)
        assert not eng._graphs._entries
    assert eng.stats.prefill_tokens == sum(LENGTHS)
    assert eng.stats.generated_tokens == sum(len(t) for t, _ in refs)


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_continuous_batching(models, naive_refs, graphs):
    model = models["plain"]
    prompts, refs = naive_refs["plain"]
    eng = Engine(model, max_batch_size=8, block_size=2, cuda_graphs=graphs)
    final, ids = {}, {}

    def step():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o

    ids[0] = eng.add_request(prompts[0], greedy(10))
    ids[1] = eng.add_request(prompts[1], greedy(10))
    step(); step()
    ids[2] = eng.add_request(prompts[2], greedy(10))
    step()
    assert eng.num_running == 3
    ids[3] = eng.add_request(prompts[3], greedy(10))
    step(); step(); step()
    ids[4] = eng.add_request(prompts[4], greedy(10), request_id="late")
    assert ids[4] == "late"
    # an id in use is refused (abort and the final outputs go by id); a generated id skips one a caller gave
    with pytest.raises(ValueError, match="'late' is already in use"):
        eng.add_request(prompts[4], greedy(10), request_id="late")
    taken = f"req-{int(ids[3].split('-')[1]) + 1}"  # the next id the engine would generate
    assert eng.add_request(prompts[0], greedy(2), request_id=taken) == taken
    assert eng.add_request(prompts[1], greedy(2)) not in (taken, *ids.values())
    while eng.has_unfinished():
        step()
    for i, (toks, reason) in enumerate(refs):
        assert final[ids[i]].token_ids == toks and final[ids[i]].finish_reason == reason
    assert eng.cache.free_blocks == eng.cache.num_blocks


def _record_prefills(eng: Engine) -> list[list[tuple[int, int]]]:
    """Wrap eng._prefill: each call's [(start, chunk, request id)] per row."""
    calls, inner = [], eng._prefill

    def spy(reqs):
        calls.append([(r.prefilled, r.chunk, r.id) for r in reqs])
        return inner(reqs)

    eng._prefill = spy
    return calls


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name,P", [("plain", 1), ("plain", 5), ("yarn", 7), ("yarn", 16)])
def test_chunked_prefill_matches_naive(models, naive_refs, name, P, graphs):
    """max_prefill_tokens P: prompts longer than the budget are prefilled over several steps (each chunk after
    the first attends over the cached ones), a step's padded prefill batch is at most P tokens, and the greedy
    outputs are those of full recomputation."""
    model = models[name]
    prompts, refs = naive_refs[name]
    eng = Engine(model, max_batch_size=8, block_size=3, cuda_graphs=graphs, max_prefill_tokens=P)
    calls = _record_prefills(eng)
    outs = eng.generate(prompts, greedy(10))
    for o, (toks, reason) in zip(outs, refs):
        assert o.token_ids == toks and o.finish_reason == reason
    assert eng.stats.prefill_tokens == sum(LENGTHS) and eng.cache.free_blocks == eng.cache.num_blocks
    covered = {}  # each prompt's chunks follow each other and cover it exactly once
    for rows in calls:
        assert len(rows) * max(n for _, n, _ in rows) <= P, rows
        for s, n, rid in rows:
            assert n >= 1 and covered.get(rid, 0) == s
            covered[rid] = s + n
    assert sorted(covered.values()) == sorted(LENGTHS)
    assert any(s > 0 for rows in calls for s, _, _ in rows)  # (the padded budget splits prompts at P = 16 too)


@pytest.mark.parametrize("overlap", [False, True])
def test_chunked_prefill_keeps_decoding_and_seeds(models, naive_refs, overlap):
    """A long prompt's chunks share the steps with the running requests, which keep decoding a token per step
    (the point of chunked prefill; with overlapped decoding each step returns the step before's token, so from
    the second step on); seeded sampling draws the same tokens as without chunks (a chunk that is not the
    prompt's last draws nothing from the request's generator)."""
    model = models["yarn"]
    prompts, refs = naive_refs["yarn"]
    eng = Engine(model, max_batch_size=8, block_size=3, max_prefill_tokens=4, overlap=overlap)
    a = eng.add_request(prompts[0], greedy(10))  # 3 tokens: one chunk
    first = eng.step()
    long_prompt = prompts[3] * 3  # 42 tokens: 11 chunks of <= 4
    b = eng.add_request(long_prompt, greedy(3))
    got = {a: list(first[0].new_token_ids), b: []}
    steps = 0
    while eng.has_unfinished():
        steps += 1
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
        if steps <= 9:  # b is still prefilling: a gets a token every step
            assert len(got[a]) == 1 + steps - overlap and not got[b], (steps, got)
    assert got[a] == refs[0][0] and got[b] == naive_greedy(model, long_prompt, 3)[0]
    sp = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s, ignore_eos=True) for s in range(3)]
    for k in (0, 2):
        plain = Engine(model, max_batch_size=8, block_size=3, speculative_k=k, max_prefill_tokens=0)
        chunked = Engine(model, max_batch_size=8, block_size=3, speculative_k=k, max_prefill_tokens=5)
        want = [o.token_ids for o in plain.generate([long_prompt, prompts[1], prompts[3]], sp)]
        assert [o.token_ids for o in chunked.generate([long_prompt, prompts[1], prompts[3]], sp)] == want


def test_chunked_prefill_seeded_drafts_do_not_depend_on_the_batch(spec_models):
    """Found by review: with 2 MTP modules and k >= 2, a chunk that was not the prompt's last ran its chained draft
    steps on the request's own blocks, leaving module 1's latents at prompt positions it never writes otherwise;
    later drafts read them, so a seeded request's tokens depended on how its prompt was cut, i.e. on the traffic
    beside it. Now the thrown-away drafts run on the padding block: alone or queued behind another request, with
    or without chunks, the same tokens."""
    model = spec_models[(2, "aligned")]
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 64, (20,), generator=g).tolist()
    other = torch.randint(0, 64, (5,), generator=g).tolist()
    for seed in range(4):
        sp = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)
        runs = []
        for P, before in ((0, False), (16, False), (16, True)):  # whole; 16 + 4; 8 + 12 behind the other request
            eng = Engine(model, max_batch_size=8, block_size=4, speculative_k=3, max_prefill_tokens=P)
            if before:
                eng.add_request(other, greedy(4))
            rid = eng.add_request(prompt, sp)
            runs.append(run_all(eng)[rid].token_ids)
        assert runs[1] == runs[0] and runs[2] == runs[0], (seed, runs)


@pytest.mark.parametrize("D,k", [(1, 2), (2, 3)])
def test_chunked_prefill_speculative_greedy_identical(spec_models, spec_refs, D, k):
    """With speculation, MTP module 0 runs over every chunk (its cache filled before the prompt's end) and the
    drafts come at the last one: the greedy outputs of the unchunked engine without speculation."""
    model = spec_models[(D, "aligned")]
    prompts, ref = spec_refs[(D, "aligned", 1.0)]
    eng = Engine(model, max_batch_size=8, block_size=3, speculative_k=k, max_prefill_tokens=6)
    calls = _record_prefills(eng)
    assert [o.token_ids for o in eng.generate(prompts, greedy(24))] == ref
    assert any(s > 0 for rows in calls for s, _, _ in rows)  # some prompt was chunked
    assert eng.stats.acceptance_rate > 0.5


def test_engine_queueing_batch_and_cache_limits(models, naive_refs):
    model = models["plain"]
    prompts, refs = naive_refs["plain"]
    # more requests than batch slots
    eng = Engine(model, max_batch_size=2, block_size=4)
    for p in prompts:
        eng.add_request(p, greedy(10))
    seen_running, final = [], {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        seen_running.append(eng.num_running)
    assert max(seen_running) <= 2
    assert [final[f"req-{i}"].token_ids for i in range(5)] == [t for t, _ in refs]

    # a cache that holds the budget of only ~two requests at a time: queueing, never CacheFull
    eng = Engine(model, max_batch_size=8, block_size=4, cache_tokens=48)
    ids = [eng.add_request(p, greedy(10)) for p in prompts]
    waited = False
    final = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        waited |= eng.num_waiting > 0 and eng.num_running > 0
        held = sum(len(r.blocks) for r in eng.running)
        assert eng.cache.free_blocks == eng.cache.num_blocks - held
    assert waited
    assert [final[i].token_ids for i in ids] == [t for t, _ in refs]
    assert eng.cache.free_blocks == eng.cache.num_blocks


def test_engine_admission_errors(models):
    model = models["plain"]
    V, L = model.config.vocab_size, model.config.max_position_embeddings
    eng = Engine(model, max_batch_size=4, block_size=4, cache_tokens=32)
    with pytest.raises(ValueError, match="cache"):
        eng.add_request(list(range(20)), greedy(20))  # needs more than the whole cache
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], greedy(4))
    with pytest.raises(ValueError):
        eng.add_request([1, V], greedy(4))
    with pytest.raises(ValueError):
        eng.add_request([-1, 2], greedy(4))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request("text without a tokenizer", greedy(4))
    for bad in (V, -1):  # a stop token id that can never be sampled was silently ignored
        with pytest.raises(ValueError, match=f"stop token ids must be in \\[0, {V}\\), got {bad}"):
            eng.add_request([1, 2], dataclasses.replace(greedy(4), stop_token_ids=[bad]))
    big = Engine(model, max_batch_size=1, block_size=16)
    with pytest.raises(ValueError, match="context"):
        big.add_request([5] * (L - 9), greedy(10))
    rid = big.add_request([5] * (L - 10), greedy(10))  # exactly the context: accepted
    assert big.abort(rid) and big.has_unfinished()  # until its final output is returned
    (o,) = big.step()
    assert o.request_id == rid and o.finish_reason == "abort" and o.token_ids == [] and not big.has_unfinished()
    assert not eng.has_unfinished() and eng.cache.free_blocks == eng.cache.num_blocks
    with pytest.raises(ValueError):
        Engine(model, speculative_k=-1)
    with pytest.raises(ValueError, match="MTP"):
        Engine(make_model(tiny_cfg(num_nextn_predict_layers=0)), speculative_k=1)
    with pytest.raises(TypeError):
        eng.generate([1, 2, 3])
    with pytest.raises(TypeError):
        eng.generate("a prompt")


def test_generate_refuses_a_params_list_of_another_length(models):
    """generate(prompts, [params...]) with fewer (or more) params than prompts: zip dropped the prompts past the
    shorter list, and the results silently had fewer entries than the prompts."""
    eng = Engine(models["plain"], max_batch_size=4, block_size=4)
    with pytest.raises(ValueError, match="3 prompts but 2 SamplingParams"):
        eng.generate([[1, 2], [3], [4, 5]], [greedy(2), greedy(3)])
    assert not eng.has_unfinished()
    assert len(eng.generate([[1, 2], [3]], (greedy(2), greedy(3)))) == 2


def test_stop_strings_without_a_tokenizer_are_refused(models):
    """An engine without a tokenizer cannot see text: a stop string was silently never matched."""
    eng = Engine(models["plain"], max_batch_size=2, block_size=4)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.add_request([1, 2], greedy(4, stop=["x"]))
    assert not eng.has_unfinished()
    eng.add_request([1, 2], greedy(4, stop_token_ids=[3]))  # token ids need none


def test_engine_abort(models, naive_refs):
    model = models["plain"]
    prompts, refs = naive_refs["plain"]
    eng = Engine(model, max_batch_size=2, block_size=2)
    ids = [eng.add_request(p, greedy(10)) for p in prompts[:3]]
    eng.step()
    assert eng.num_running == 2 and eng.num_waiting == 1
    assert eng.cache.free_blocks < eng.cache.num_blocks
    assert eng.abort(ids[0])  # running
    assert eng.abort(ids[2])  # waiting
    assert not eng.abort(ids[2]) and not eng.abort("no-such-request")
    held = sum(len(r.blocks) for r in eng.running)
    assert eng.cache.free_blocks == eng.cache.num_blocks - held
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    # the aborted requests report once, finished with reason "abort"
    for i in (0, 2):
        (o,) = outs[ids[i]]
        assert o.finished and o.finish_reason == "abort"
    assert outs[ids[1]][-1].token_ids == refs[1][0]
    assert eng.cache.free_blocks == eng.cache.num_blocks
    # aborting from a streaming consumer ends the stream
    eng = Engine(model, max_batch_size=2, block_size=2)
    got = []
    for o in eng.stream(prompts[3], greedy(10)):
        got.append(o)
        if len(got) == 2:
            eng.abort(o.request_id)
    assert got[-1].finish_reason == "abort" and len(got) == 3
    assert eng.cache.free_blocks == eng.cache.num_blocks
    # and from generate's callback: the request's result says so
    eng = Engine(model, max_batch_size=4, block_size=2)
    res = eng.generate(prompts[:2], greedy(10),
                       on_output=lambda o: eng.abort(o.request_id) if o.request_id == "req-0" else None)
    assert res[0].finish_reason == "abort" and res[1].token_ids == refs[1][0]


# ------------------------------------------------------------------------------------------------
# 5. MTP self-speculative decoding, greedy

SPEC_PROMPT_LENS = [4, 11, 1, 7]


@pytest.fixture(scope="module")
def spec_refs(spec_models):
    """Greedy outputs without speculation, per (D, drafter, repetition_penalty)."""
    refs = {}
    for (D, d), model in spec_models.items():
        prompts = prompts_for(model.config, SPEC_PROMPT_LENS, seed=31)
        for pen in (1.0, 1.3):
            outs = Engine(model, max_batch_size=8, block_size=4).generate(prompts, greedy(24, repetition_penalty=pen))
            refs[(D, d, pen)] = (prompts, [o.token_ids for o in outs])
    return refs


SPEC_STATS = {}  # filled by the tests below, printed by test_report_speculative_stats (pytest -s)
CHI2 = {}


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drafter", ["aligned", "random"])
@pytest.mark.parametrize("pen", [1.0, 1.3])
def test_speculative_greedy_identical(spec_models, spec_refs, D, k, drafter, pen):
    model = spec_models[(D, drafter)]
    prompts, ref = spec_refs[(D, drafter, pen)]
    eng = Engine(model, max_batch_size=8, block_size=3, speculative_k=k)
    outs = eng.generate(prompts, greedy(24, repetition_penalty=pen))
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" for o in outs)
    s = eng.stats
    assert 0 <= s.acceptance_rate <= 1 and 0 <= s.first_draft_acceptance <= 1
    assert 1 <= s.mean_accepted_length <= k + 1
    assert s.accepted <= s.drafted <= k * s.rounds and s.first_draft_accepted <= s.accepted
    # every decode step is one verification round (the prefill step makes the first token; with overlapped
    # decoding a last step reads the round queued in the step before)
    assert s.rounds > 0 and s.steps <= 24 + eng.overlap
    if drafter == "aligned":  # fewer steps than tokens
        assert s.acceptance_rate > 0.5 and s.mean_accepted_length > 1.5 and s.steps < 20
    SPEC_STATS[(D, k, drafter, pen)] = (s.acceptance_rate, s.mean_accepted_length, s.first_draft_acceptance)
    assert eng.cache.free_blocks == eng.cache.num_blocks


def test_speculative_without_spec_has_no_stats(spec_models, spec_refs):
    model = spec_models[(1, "aligned")]
    prompts, ref = spec_refs[(1, "aligned", 1.0)]
    eng = Engine(model, max_batch_size=8)
    assert [o.token_ids for o in eng.generate(prompts, greedy(24))] == ref
    s = eng.stats
    assert s.drafted == s.rounds == 0
    assert math.isnan(s.acceptance_rate) and math.isnan(s.mean_accepted_length)


@pytest.mark.parametrize("D,k", [(1, 3), (2, 3), (1, 2)])
def test_speculative_stops_inside_drafts(spec_models, spec_refs, D, k, monkeypatch):
    """Stop tokens and the max_new_tokens limit falling inside a run of accepted drafts."""
    model = spec_models[(D, "aligned")]
    prompts, ref = spec_refs[(D, "aligned", 1.0)]
    # count the rounds whose accepted drafts were cut short by a stop token or the length limit
    inside = {"stop": 0, "length": 0}
    append = Engine._append

    def spy(self, r, tokens, lps):
        before = len(r.out)
        append(self, r, tokens, lps)
        used = len(r.out) - before  # a stop token is not appended: it sat at tokens[used]
        if r.finished and len(tokens) > 1:
            if r.finish_reason == "stop" and used < len(tokens) - 1:
                inside["stop"] += 1
            elif r.finish_reason == "length" and used < len(tokens):
                inside["length"] += 1

    monkeypatch.setattr(Engine, "_append", spy)
    # length limit at every offset: output is exactly the first n tokens
    for n in range(1, 11):
        eng = Engine(model, max_batch_size=8, block_size=2, speculative_k=k)
        outs = eng.generate(prompts, greedy(n))
        for o, r in zip(outs, ref):
            assert o.token_ids == r[:n] and len(o.token_ids) == n and o.finish_reason == "length"
        assert eng.cache.free_blocks == eng.cache.num_blocks
    # stop tokens: each prompt stops at the first occurrence of a token from its reference output
    for j in range(1, 10):
        eng = Engine(model, max_batch_size=8, block_size=2, speculative_k=k)
        params = [greedy(24, stop_token_ids=[r[j]]) for r in ref]
        outs = eng.generate(prompts, params)
        for o, r in zip(outs, ref):
            cut = r.index(r[j])
            assert o.token_ids == r[:cut] and o.finish_reason == "stop"
        assert eng.stats.accepted > 0
    assert inside["stop"] > 0 and inside["length"] > 0, inside


# ------------------------------------------------------------------------------------------------
# 6. speculative sampling keeps the output distribution (statistical test)

def _chi2_quantile(df: int, z: float) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile at standard-normal quantile z."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int, float]:
    """Pearson chi-square of counts against n * probs, pooling cells with expected count < 5.
    Counts in cells of zero probability give an infinite statistic."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    if counts[probs == 0].sum() > 0:
        return math.inf, 1, 0.0
    exp = n * probs
    big = exp >= 5
    obs_b, exp_b = counts[big], exp[big]
    rest_o, rest_e = counts[~big & (probs > 0)].sum(), exp[~big & (probs > 0)].sum()
    if rest_e > 0:
        obs_b, exp_b = torch.cat([obs_b, rest_o.view(1)]), torch.cat([exp_b, rest_e.view(1)])
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    df = len(exp_b) - 1
    return stat, df, _chi2_quantile(df, 4.265)  # p = 1e-5: a false alarm essentially never


@torch.no_grad()
def _exact_joint(model, prompt, params: SamplingParams, n_tokens: int) -> torch.Tensor:
    """P(t_1, ..., t_n) of the main model's processed distribution (temperature, repetition penalty,
    top-k/top-p/min-p), as a (V,)*n tensor, from uncached forwards over every prefix."""
    V = model.config.vocab_size
    joint = torch.ones(())
    for i in range(n_tokens):
        prefixes = list(itertools.product(range(V), repeat=i))
        ids = torch.tensor([prompt + list(pre) for pre in prefixes])
        logits = model(ids, with_mtp=False).logits[:, -1].double()
        if params.repetition_penalty != 1.0:
            for b, pre in enumerate(prefixes):
                seen = sorted(set(prompt + list(pre)))
                sel = logits[b, seen]
                logits[b, seen] = torch.where(sel > 0, sel / params.repetition_penalty, sel * params.repetition_penalty)
        logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
        cond = logits.softmax(-1).view(*([V] * i), V)
        joint = joint.unsqueeze(-1) * cond
    return joint


def _sample_joint(model, prompt, params: SamplingParams, n_tokens: int, N: int, k: int, seed0: int = 0):
    V = model.config.vocab_size
    eng = Engine(model, max_batch_size=N, block_size=4, speculative_k=k, cache_tokens=N * 12)
    ps = []
    for i in range(N):
        p = SamplingParams(**{**vars(params), "seed": seed0 + i, "max_new_tokens": n_tokens})
        ps.append(p)
    outs = eng.generate([prompt] * N, ps)
    counts = torch.zeros([V] * n_tokens)
    for o in outs:
        assert len(o.token_ids) == n_tokens
        counts[tuple(o.token_ids)] += 1
    return counts, eng.stats


@pytest.fixture(scope="module")
def vocab8_model():
    # 8 tokens, no EOS; random MTP module: its draft distribution q is far from the target p, so
    # both the acceptance test and the residual resampling are exercised heavily
    cfg = tiny_cfg(vocab_size=8, eos_token_id=None, bos_token_id=None, initializer_range=0.3)
    return make_model(cfg, seed=2, bias_std=0.3)


STAT_CASES = {
    "t1": SamplingParams(temperature=1.0),
    "topk_topp": SamplingParams(temperature=1.0, top_k=5, top_p=0.9),
    "t07_minp_pen": SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.5),
}


@pytest.mark.parametrize("case", list(STAT_CASES))
def test_speculative_sampling_distribution(vocab8_model, case, monkeypatch):
    model = vocab8_model
    params = STAT_CASES[case]
    prompt = [3, 5, 2, 7, 1]
    n_tok, N = 3, 4000
    exact = _exact_joint(model, prompt, params, n_tok)
    assert abs(float(exact.sum()) - 1) < 1e-9
    # non-degenerate: the first three tokens have many likely outcomes
    assert (exact > 1e-3).sum() > 40

    counts, stats = _sample_joint(model, prompt, params, n_tok, N, k=2)
    stat, df, thr = _chi2(counts, exact, N)
    assert stat < thr, f"speculative sampling: chi2 {stat:.1f} (df {df}) > {thr:.1f}"
    # the draft was often wrong and often right: both branches of the rule were used
    assert 0.1 < stats.acceptance_rate < 0.9, stats
    assert 1 < stats.mean_accepted_length < 3
    SPEC_STATS[("sampling", case)] = (stats.acceptance_rate, stats.mean_accepted_length, stats.first_draft_acceptance)
    CHI2[case] = (stat, df, thr)

    if case == "t1":
        # the same test on plain sampling passes too ...
        counts0, _ = _sample_joint(model, prompt, params, n_tok, N, k=0, seed0=10**6)
        stat0, _, _ = _chi2(counts0, exact, N)
        assert stat0 < thr
        # ... and it does detect a wrong rule: accepting every draft (u = 0 always)
        monkeypatch.setattr(BatchSampler, "uniform", lambda self, n, slot: torch.zeros(self.B, n))
        counts_bad, bad_stats = _sample_joint(model, prompt, params, n_tok, N, k=2, seed0=2 * 10**6)
        monkeypatch.undo()
        assert bad_stats.acceptance_rate > 0.99
        stat_bad, _, _ = _chi2(counts_bad, exact, N)
        assert stat_bad > 3 * thr, (stat_bad, thr)
        CHI2["t1 without speculation"] = (stat0, df, thr)
        CHI2["t1 accept-every-draft (wrong rule)"] = (stat_bad, df, thr)


# ------------------------------------------------------------------------------------------------
# 7. sampling parameters, stops, logprobs, streaming

def test_sample_function_basics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, generator=g), logits.argmax(-1))
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # below GREEDY_EPS: greedy, as the engine's sampler (1e-40 once made inf logits, NaN probabilities, token 0)
    close = torch.tensor([[2.9, 3.0, -1.0]])
    assert [sample(close, t).item() for t in (1e-40, 1e-30, 9e-6)] == [1, 1, 1]


def test_the_hashed_random_numbers():
    """sampling.py's counter-based random numbers: the hash is a bijection of 32-bit values, the same on Python ints
    and tensors; any int seeds a request (both halves of 64 bits count); the bits of a slot are uniform and show no
    correlation between neighbouring tokens, slots, phases or seeds."""
    from dsv3.inference.sampling import M32, hash32, phase_key, random_bits, request_seed, uniforms
    x = torch.randint(0, 2 ** 32, (4096,))
    assert hash32(x).tolist() == [hash32(int(v)) for v in x]
    assert int(hash32(x).max()) <= M32 and int(hash32(x).min()) >= 0
    assert torch.unique(hash32(torch.arange(2 ** 16) * 65521)).numel() == 2 ** 16
    seeds = {request_seed(s) for s in (0, 1, -1, 2 ** 32, 2 ** 33, 2 ** 63 - 1, -(2 ** 63), 7 << 40)}
    assert len(seeds) == 8 and all(0 <= v <= M32 for v in seeds)
    n = 2 ** 16
    keys = torch.tensor([phase_key(request_seed(s), p) for s, p in ((0, 0), (0, 1), (1, 0), (12345, 77))])
    bits = random_bits(keys, 1, n)  # (4, n)
    counts = torch.bincount((bits >> 24).flatten(), minlength=256).double()  # 256 cells, 1024 expected each
    stat = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert stat < _chi2_quantile(255, 4.265), stat
    u = uniforms(bits).double()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert float(uniforms(bits, open_low=True).min()) > 0
    top = torch.tensor([0xFFFFFFFF, 0xFFFFFE00, 0xFFFFFF00, 0x000000FF])  # (the top 24-bit values, and 0)
    assert uniforms(top, open_low=True).tolist() == [1 - 2 ** -24, 1 - 2 ** -23, 1 - 2 ** -24, 2 ** -25]

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    limit = 5 / n ** 0.5  # five standard deviations of a correlation between independent samples
    assert abs(corr(u[0, 1:], u[0, :-1])) < limit  # neighbouring tokens
    assert abs(corr(u[0], u[1])) < limit and abs(corr(u[0], u[2])) < limit  # neighbouring phases, seeds
    assert abs(corr(u[0], uniforms(random_bits(keys, 2, n))[0].double())) < limit  # neighbouring slots
    assert torch.equal(random_bits(keys, 1, n), bits)  # (a pure function of key, slot and index)


def test_unseeded_requests_follow_torch_manual_seed(models):
    """An unseeded request's seed comes from torch's default CPU generator when it is added: torch.manual_seed makes
    a run repeatable, and unseeded requests differ from one another."""
    model = models["plain"]
    prompts = prompts_for(model.config, [4, 4], seed=3)
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([o.token_ids for o in Engine(model, max_batch_size=4, block_size=4).generate(
            [prompts[0]] * 3, sp)])
    assert runs[0] == runs[1] and len({tuple(t) for t in runs[0]}) == 3


def test_filter_logits_by_hand():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    ninf = float("-inf")
    # top-k 2: 0.4 and 0.3
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out[0, [0, 2, 4]]).all() and torch.equal(out[0, [1, 3]], logits[0, [1, 3]])
    # top-p 0.7: sorted 0.4, 0.3 (cum 0.7 reaches it) -> keep {1, 3}; 0.71 needs 0.15 too
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.71)).tolist() == [[False, True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.3)).tolist() == [[False, True, False, False, False]]
    # min-p 0.3: threshold 0.3 * 0.4 = 0.12 -> keep 0.4, 0.3, 0.15
    assert torch.isfinite(filter_logits(logits, min_p=0.3)).tolist() == [[False, True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, min_p=0.5)).tolist() == [[False, True, False, True, False]]
    # combined: top-k 3 renormalises {0.4, 0.3, 0.15} -> {0.47, 0.35, 0.18}; top-p 0.8 keeps the first two
    out = filter_logits(logits, top_k=3, top_p=0.8)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert out[0, 0] == ninf
    # nothing to filter
    assert torch.equal(filter_logits(logits), logits)


def _probs(params, logits, history):
    from dsv3.inference.sampling import BatchSampler
    sp = BatchSampler([params.validate()], [0], [history], logits.shape[-1], logits.device)
    return sp.probs(logits.view(1, 1, -1))[0, 0]


def test_repetition_penalty_ctrl_rule():
    """CTRL (Keskar et al. 2019): a seen token's logit is divided by the penalty if positive and
    multiplied by it if negative; unseen tokens are untouched; then temperature."""
    logits = torch.tensor([2.0, -1.0, 0.5, -0.3, 1.5, 0.0])
    history = [0, 1, 1, 3, 5]
    probs = _probs(SamplingParams(temperature=1.0, repetition_penalty=2.0), logits, history)
    pen = torch.tensor([1.0, -2.0, 0.5, -0.6, 1.5, 0.0])
    torch.testing.assert_close(probs, pen.softmax(-1))
    probs = _probs(SamplingParams(temperature=0.5, repetition_penalty=2.0), logits, history)
    torch.testing.assert_close(probs, (pen / 0.5).softmax(-1))
    # greedy with a penalty: the argmax of the penalised logits (token 4 now beats token 0)
    probs = _probs(SamplingParams(temperature=0.0, repetition_penalty=2.0), logits, history)
    assert int(probs.argmax()) == 4 and float(probs.max()) == 1.0


@torch.no_grad()
def test_repetition_penalty_generation(models):
    """Greedy generation with a penalty == a hand-written full-recomputation reference; and != none."""
    model = models["plain"]
    prompt = prompts_for(model.config, [6], seed=8)[0]
    eng = Engine(model, max_batch_size=2, block_size=4)
    pen = 1.8
    (o,) = eng.generate([prompt], greedy(12, repetition_penalty=pen, ignore_eos=True))
    seq = list(prompt)
    for _ in range(12):
        lg = full_logits(model, seq)[-1]
        idx = torch.tensor(sorted(set(seq)))
        lg[idx] = torch.where(lg[idx] > 0, lg[idx] / pen, lg[idx] * pen)
        seq.append(int(lg.argmax()))
    assert o.token_ids == seq[len(prompt):]
    (o0,) = Engine(model, max_batch_size=2).generate([prompt], greedy(12, ignore_eos=True))
    assert o0.token_ids != o.token_ids
    # a penalty is visible: fewer repeated tokens
    assert len(set(o.token_ids)) >= len(set(o0.token_ids))


@pytest.mark.parametrize("k", [0, 2])
def test_temperature_topk_and_seeds(models, naive_refs, k):
    name = "yarn"  # D = 2: chained drafts run the second MTP module
    model = models[name]
    prompts, refs = naive_refs[name]
    eng = Engine(model, max_batch_size=8, block_size=3, speculative_k=k)
    # top_k = 1 at any temperature is greedy
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, seed=4))
    assert [o.token_ids for o in outs] == [t for t, _ in refs]
    # seeds: same seed -> same tokens, whatever else the engine runs alongside or ran before;
    # different seeds differ
    sp = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in range(6)]
    fresh = Engine(model, max_batch_size=8, block_size=3, speculative_k=k)
    a = [o.token_ids for o in fresh.generate(prompts[:1] * 6, sp)]
    eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, ignore_eos=True))
    b = [o.token_ids for o in eng.generate(prompts[3:4] + prompts[:1] * 6, [sp[0]] + sp)[1:]]
    assert a == b
    assert len({tuple(x) for x in a}) == 6


def test_graphs_padding_block_is_outside_the_capacity(models):
    """The block reserved for padding rows is not counted: a request needing the whole cache runs with
    cuda_graphs as without (it once queued forever), one block more is refused by name."""
    model = models["plain"]
    for graphs in (False, True):
        eng = Engine(model, max_batch_size=2, block_size=4, cache_tokens=20, cuda_graphs=graphs)
        assert eng.cache.num_blocks == 5 and eng.cache.free_blocks == 5
        out = eng.generate([[1, 2, 3]], greedy(16))  # 3 + 16 + 1 = 20 positions = all 5 blocks
        assert len(out[0].token_ids) > 0 and eng.cache.free_blocks == eng.cache.num_blocks
        with pytest.raises(ValueError, match="cache"):
            eng.add_request([1, 2, 3, 4], greedy(16))  # 21 positions: 6 blocks


@pytest.mark.parametrize("k", [0, 1, 2])
def test_default_cache_holds_a_full_batch_of_full_contexts(models, k):
    """The default cache (cache_tokens 0) holds max_batch_size requests of the whole context at once: it was
    max_batch_size x (context + draft room) tokens rounded up to blocks once, while each request takes its own
    blocks rounded up, so with a block size that does not divide a request's tokens the last request queued."""
    model = spec_model(1, "random") if k else models["plain"]
    L = model.config.max_position_embeddings
    for block_size in (16, 3):
        eng = Engine(model, max_batch_size=4, block_size=block_size, speculative_k=k, max_prefill_tokens=0)
        for _ in range(4):
            eng.add_request([1] * (L - 2), greedy(2))
        eng.step()
        assert eng.num_running == 4 and eng.num_waiting == 0, (block_size, eng.cache.num_blocks)


def test_compile_decode_without_the_graphed_step_is_refused(models):
    with pytest.raises(ValueError, match="bf16 model on a GPU"):
        Engine(models["plain"], max_batch_size=2, compile_decode=True)  # fp32 on the CPU: no graphed step


@pytest.mark.parametrize("k", [0, 2])
def test_idle_phases_change_nothing(k):
    """Attention data parallelism (lockstep.py's DPLeader) makes a rank with no work in a phase that another
    rank runs run it on a throwaway request in the padding block (`Engine._idle`), so the ranks' collectives
    meet. Forced here in one process (`phase_sync` saying every phase runs): the idle prefills and decodes
    run their forwards (main model; MTP module and chained drafts with k) yet the real requests' tokens and
    log-probabilities, the stats and the cache's free blocks are exactly those of a plain engine."""
    model = spec_model(2, "aligned")
    prompts = prompts_for(model.config, [5, 9, 3], seed=4)
    sp = [SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=2, ignore_eos=True) for n in (6, 3, 8)]

    def run(force: bool):
        eng = Engine(model, max_batch_size=4, block_size=4, speculative_k=k, record_expert_loads=True)
        calls = {"forward": 0, "mtp": 0}
        if force:
            eng.phase_sync = lambda has_new, has_decode: (True, True)
            for name, attr in (("forward", "forward"), ("mtp", "mtp_step")):
                orig = getattr(model, attr)

                def counted(*a, _o=orig, _n=name, **kw):
                    calls[_n] += 1
                    return _o(*a, **kw)
                setattr(model, attr, counted)
        try:
            eng.add_request(prompts[0], sp[0])
            outs = {}
            for step in range(40):
                if step == 3:  # a prefill while the first request decodes; idle decodes after all finish
                    eng.add_request(prompts[1], sp[1])
                    eng.add_request(prompts[2], sp[2])
                for o in eng.step():
                    outs[o.request_id] = (o.token_ids, [lp.logprob for lp in o.logprobs])
                if step > 3 and not eng.has_unfinished():
                    eng.step()  # nothing to do: both idle phases
                    break
            return (outs, dataclasses.asdict(eng.stats), eng.cache.free_blocks == eng.cache.num_blocks, calls,
                    eng.expert_loads())
        finally:
            for attr in ("forward", "mtp_step"):
                model.__dict__.pop(attr, None)

    plain, forced = run(False), run(True)
    assert forced[0] == plain[0] and forced[2] and plain[2]
    assert torch.equal(forced[4], plain[4]) and plain[4].sum() > 0  # idle rows route, but do not count as load
    assert {k_: v for k_, v in forced[1].items() if k_ != "steps"} == \
        {k_: v for k_, v in plain[1].items() if k_ != "steps"}
    steps = forced[1]["steps"]
    assert forced[3]["forward"] == 2 * steps  # every step: one prefill (real or idle) and one decode forward
    if k:
        assert forced[3]["mtp"] == 2 * steps * k  # per phase: MTP module 0 and k - 1 chained drafts


@pytest.mark.parametrize("graphs,P", [(False, 0), (True, 0), (True, 8)])
def test_expert_loads_equal_the_routing_of_the_tokens_run(graphs, P):
    """record_expert_loads: with greedy decoding the engine runs every prompt token and every generated token
    but the last through the model once, so its per-expert counts equal the routing of one uncached forward
    over prompt + output[:-1] per request (an independent count: ModelOutput.expert_counts), padding rows of
    the bucketed steps (5 requests in a bucket of 8), chunked prefill (P) and the requests' mix excluded."""
    model = make_model(tiny_cfg(initializer_range=STD, num_nextn_predict_layers=1), seed=3, bias_std=0.3)
    prompts = prompts_for(model.config, (5, 9, 13, 3, 7), seed=1)
    eng = Engine(model, max_batch_size=8, block_size=3, cuda_graphs=graphs, max_prefill_tokens=P,
                 record_expert_loads=True)
    outs = eng.generate(prompts, greedy(6, ignore_eos=True))
    got = eng.expert_loads()
    want = torch.zeros_like(got)
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            c = model(torch.tensor([p + o.token_ids[:-1]]), with_mtp=False).expert_counts  # main layers only
            want[: c.shape[0]] += c
    assert got.shape == (len(model.routers()), model.config.n_routed_experts) and got.dtype == torch.long
    assert torch.equal(got, want) and got[-1].sum() == 0  # k = 0: the MTP module never runs
    model(torch.tensor([prompts[0]]))  # the model outside the engine's steps: not counted
    assert torch.equal(eng.expert_loads(), got)
    eng.reset_expert_loads()
    assert eng.expert_loads().sum() == 0


@pytest.mark.parametrize("D,k", [(1, 1), (2, 2), (1, 3)])
def test_expert_loads_with_speculation(spec_models, D, k):
    """With MTP speculation the main layers run k + 1 positions per request and round (the drafts verified,
    accepted or not) besides the prompts; MTP module 0 runs the same positions (k = 1: exactly as many), the
    chained drafts add theirs. Bucketed (padded) steps count what exact shapes count, and a round in one graph
    (round_graph) what its steps one by one count."""
    model = spec_models[(D, "aligned")]
    prompts = prompts_for(model.config, (5, 9, 13, 3, 7))
    K = model.config.num_experts_per_tok
    loads = []
    for graphs, fused in ((False, False), (True, False), (False, True), (True, True)):
        eng = Engine(model, max_batch_size=8, block_size=3, cuda_graphs=graphs, speculative_k=k,
                     max_prefill_tokens=8, record_expert_loads=True)
        eng.round_graph = fused
        eng.generate(prompts, greedy(9))
        got, s = eng.expert_loads(), eng.stats
        assert s.accepted > 0
        main = K * (s.prefill_tokens + s.rounds * (k + 1))
        assert got[0].sum() == main  # (one MoE layer, then D MTP modules)
        if k == 1:
            assert got[1].sum() == main
        else:
            assert got[1:].sum() > main
        loads.append(got)
    assert all(torch.equal(loads[0], x) for x in loads[1:])


def test_expert_load_recorder_lifetime_and_errors(models):
    """The hooks count only inside recording() and leave the model with the recorder; an engine built
    without recording says how to turn it on; a model without MoE layers is refused by name."""
    import gc

    from dsv3.model.loads import ExpertLoadRecorder

    model = models["plain"]
    routers = model.routers()
    rec = ExpertLoadRecorder(model)
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        model(x)
        assert rec.read().sum() == 0
        with rec.recording():
            c = model(x, with_mtp=False).expert_counts
            rec.rows = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])  # only the first sequence
            model(x, with_mtp=False)
        c0 = model(x[:1], with_mtp=False).expert_counts
    assert torch.equal(rec.read()[: c.shape[0]], c + c0)
    assert all(len(r._forward_hooks) == 1 for r in routers)
    del rec
    gc.collect()
    assert all(len(r._forward_hooks) == 0 for r in routers)
    eng = Engine(model, max_batch_size=2)
    with pytest.raises(ValueError, match="record_expert_loads=True"):
        eng.expert_loads()
    with pytest.raises(ValueError, match="no MoE layers"):
        ExpertLoadRecorder(make_model(tiny_cfg(first_k_dense_replace=3, num_hidden_layers=3,
                                               num_nextn_predict_layers=0)))


def test_cuda_graphs_setting_forms(models):
    """EngineConfig's --cuda-graphs auto|on|off reach the engine as None/True/False: on (the CPU) runs the
    bucketed static steps, off and auto (an fp32 CPU model) the exact-shape ones; another word is refused."""
    model = models["plain"]
    for form, bucketed in (("on", True), ("off", False), ("auto", False), (True, True), (None, False)):
        assert Engine(model, max_batch_size=2, cuda_graphs=form)._graphs.bucketed is bucketed, form
    with pytest.raises(ValueError, match="cuda_graphs must be auto, on or off, got 'yes'"):
        Engine(model, max_batch_size=2, cuda_graphs="yes")


def test_static_decode_step_sampling_and_logprobs_match_eager(models, naive_refs):
    """The static-shape decode step (graphs.py; eager on the CPU) feeds the same sampler: seeded
    sampling, top-p and logprobs give the same tokens and (to fp32 rounding) the same log-probs."""
    model = models["yarn"]
    prompts, _ = naive_refs["yarn"]
    sp = [SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=s, logprobs=2, ignore_eos=True)
          for s in range(len(prompts))]
    a = Engine(model, max_batch_size=8, block_size=3, cuda_graphs=False).generate(prompts, sp)
    b = Engine(model, max_batch_size=8, block_size=3, cuda_graphs=True).generate(prompts, sp)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert max(abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)) < 1e-5


@pytest.mark.parametrize("D,k", [(1, 1), (2, 3)])
def test_static_speculative_steps_match_eager(spec_models, D, k):
    """Speculation through the bucketed static steps (graphs.py: what CUDA graphs capture; eager on the
    CPU) equals the exact-shape eager path token for token: greedy, seeded sampling with top-k and a
    repetition penalty, log-probs; mixed in one batch, prompts of several lengths crossing buckets."""
    model = spec_models[(D, "random")]
    prompts = prompts_for(model.config, [5, 9, 3, 12, 1], seed=43)
    sp = [greedy(14, logprobs=1), SamplingParams(max_new_tokens=14, temperature=0.8, top_k=20, seed=1, logprobs=0),
          SamplingParams(max_new_tokens=9, temperature=1.0, repetition_penalty=1.3, seed=2),
          greedy(14, repetition_penalty=1.2), SamplingParams(max_new_tokens=14, temperature=1.2, top_p=0.8, seed=3)]
    runs = []
    for graphs in (False, True):
        eng = Engine(model, max_batch_size=8, block_size=2, speculative_k=k, cuda_graphs=graphs)
        runs.append((eng.generate(prompts, sp), eng.stats))
        assert eng.cache.free_blocks == eng.cache.num_blocks
    (a, sa), (b, sb) = runs
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason
        if x.logprobs is not None:
            assert max(abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)) < 1e-5
            assert [[t for t, _ in p.top] for p in x.logprobs] == [[t for t, _ in q.top] for q in y.logprobs]
    assert (sa.rounds, sa.accepted, sa.first_draft_accepted) == (sb.rounds, sb.accepted, sb.first_draft_accepted)
    assert sa.rounds > 0 and sa.accepted > 0


def test_seeded_speculative_sampling_independent_of_cache_history(spec_models):
    """With D = 2 the chained drafts attend over positions of MTP module 2's cache slot that this
    request never wrote; those must not carry other requests' latents into this request's drafts."""
    model = spec_models[(2, "random")]
    prompts = prompts_for(model.config, [5, 9, 3, 12], seed=41)
    sp = [SamplingParams(max_new_tokens=16, temperature=1.0, seed=100 + s) for s in range(8)]
    fresh = Engine(model, max_batch_size=8, block_size=2, speculative_k=3, cache_tokens=400)
    a = [o.token_ids for o in fresh.generate([prompts[0]] * 8, sp)]
    used = Engine(model, max_batch_size=8, block_size=2, speculative_k=3, cache_tokens=400)
    used.generate(prompts * 2, SamplingParams(max_new_tokens=30, temperature=1.0, seed=7))
    b = [o.token_ids for o in used.generate([prompts[0]] * 8, sp)]
    assert a == b


@pytest.fixture(scope="module")
def text_model():
    rng = random.Random(0)
    words = ("the cat sat on a mat and dog ran to big red blue house tree sun moon star fish bird "
             "stop here now go").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(1500)]
    tok = DSTokenizer.train(texts, 320)
    cfg = tiny_cfg(vocab_size=tok.vocab_size, initializer_range=STD, eos_token_id=tok.eos_id)
    return make_model(cfg, seed=9, bias_std=0.3), tok


def _clean_substring(text: str, start: int, n: int) -> tuple[str, int]:
    """A substring of printable characters (no U+FFFD) of length n at or after `start`."""
    for i in range(start, len(text) - n):
        s = text[i: i + n]
        if "\ufffd" not in s and s.strip() == s and s:
            return s, i
    raise AssertionError(f"no clean substring in {text!r}")


@pytest.mark.parametrize("k", [0, 2])
def test_stop_strings_stop_tokens_and_eos(text_model, k):
    model, tok = text_model
    prompt = "the cat sat on"
    eng = Engine(model, tok, max_batch_size=4, block_size=4, speculative_k=k)
    (full,) = eng.generate([prompt], greedy(40, ignore_eos=True))
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    # stop string: text cut before its first occurrence, reason "stop"
    s, _ = _clean_substring(full.text, len(full.text) // 3, 2)
    first = full.text.find(s)
    (o,) = eng.generate([prompt], greedy(40, ignore_eos=True, stop=[s]))
    assert o.finish_reason == "stop" and o.text == full.text[:first]
    assert full.token_ids[: len(o.token_ids)] == o.token_ids and len(o.token_ids) < 40
    # the earliest of several stop strings wins
    s2, _ = _clean_substring(full.text, len(full.text) * 2 // 3, 3)
    (o2,) = eng.generate([prompt], greedy(40, ignore_eos=True, stop=[s2, s, "never in the text \u2603"]))
    assert o2.text == full.text[: min(first, full.text.find(s2))]
    # stop token ids: output ends before the token, which is not included
    j = 7
    t = full.token_ids[j]
    cut = full.token_ids.index(t)
    (o3,) = eng.generate([prompt], greedy(40, ignore_eos=True, stop_token_ids=[t]))
    assert o3.token_ids == full.token_ids[:cut] and o3.finish_reason == "stop"
    # EOS: make the tokenizer's EOS a token the model emits; ignore_eos runs on to the length limit
    eos = tok.eos_id
    eng2 = Engine(model, tok, max_batch_size=4, block_size=4, speculative_k=k)
    eng2.eos = [t]
    (o4,) = eng2.generate([prompt], greedy(40))
    assert o4.token_ids == full.token_ids[:cut] and o4.finish_reason == "stop"
    (o5,) = eng2.generate([prompt], greedy(40, ignore_eos=True))
    assert o5.token_ids == full.token_ids and o5.finish_reason == "length"
    assert eng.eos == [eos]  # by default the tokenizer's EOS


@pytest.mark.parametrize("k", [0, 2])
def test_logprobs(models, k):
    model = models["yarn"]
    prompts = prompts_for(model.config, [4, 10], seed=17)
    eng = Engine(model, max_batch_size=4, block_size=3, speculative_k=k)
    params = [SamplingParams(max_new_tokens=9, temperature=0.0, logprobs=3, ignore_eos=True),
              SamplingParams(max_new_tokens=9, temperature=1.0, seed=3, logprobs=0, ignore_eos=True)]
    outs = eng.generate(prompts, params)
    for o, p, sp in zip(outs, prompts, params):
        assert len(o.logprobs) == len(o.token_ids) == 9
        ref = full_logits(model, p + o.token_ids).log_softmax(-1)
        for i, lp in enumerate(o.logprobs):
            row = ref[len(p) - 1 + i]
            assert lp.token_id == o.token_ids[i]
            assert abs(lp.logprob - float(row[lp.token_id])) < 1e-4
            assert len(lp.top) == sp.logprobs
            vals = [v for _, v in lp.top]
            assert vals == sorted(vals, reverse=True)
            if lp.top:
                assert [t for t, _ in lp.top] == row.topk(sp.logprobs).indices.tolist()
                assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
                torch.testing.assert_close(torch.tensor(vals), row.topk(sp.logprobs).values.float(), atol=1e-4, rtol=0)
    # a request without logprobs reports None
    (o,) = eng.generate(prompts[:1], greedy(3))
    assert o.logprobs is None


def test_logprobs_more_than_vocab(vocab8_model):
    eng = Engine(vocab8_model, max_batch_size=2)
    (o,) = eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.0, logprobs=20))
    assert all(len(lp.top) == 8 for lp in o.logprobs)


@pytest.mark.parametrize("k", [0, 2])
def test_streaming(text_model, k):
    model, tok = text_model
    prompts = ["the cat sat on", "a dog", "blue house tree sun moon"]
    eng = Engine(model, tok, max_batch_size=4, block_size=4, speculative_k=k)
    (full,) = eng.generate(prompts[:1], greedy(30, ignore_eos=True))
    s, _ = _clean_substring(full.text, len(full.text) // 2, 3)
    cases = [greedy(30, ignore_eos=True), greedy(30, ignore_eos=True, stop=[s]),
             SamplingParams(max_new_tokens=25, temperature=1.0, seed=1)]
    for sp in cases:
        # Engine.stream (an iterator)
        chunks = list(eng.stream(prompts[0], sp))
        final = chunks[-1]
        assert final.finished and all(not c.finished for c in chunks[:-1])
        assert "".join(c.new_text for c in chunks) == final.text
        assert sum((c.new_token_ids for c in chunks), []) == final.token_ids
        assert len(chunks) > 3
        # generate(on_output=...) with several requests interleaved
        got: dict[str, list] = {}
        res = eng.generate(prompts, sp, on_output=lambda o: got.setdefault(o.request_id, []).append(o))
        for r in res:
            cs = got[r.request_id]
            assert cs[-1] is not None and cs[-1].finished and cs[-1].text == r.text
            assert "".join(c.new_text for c in cs) == r.text
            assert sum((c.new_token_ids for c in cs), []) == r.token_ids
        if sp.stop:
            assert res[0].finish_reason == "stop" and s not in res[0].text
            assert res[0].text == full.text[: full.text.find(s)]
            # while streaming, no prefix of the stop string leaks out before the stop is known
            assert not any(s in "".join(c.new_text for c in chunks[: i + 1]) for i in range(len(chunks)))


# ------------------------------------------------------------------------------------------------
# 8. SamplingParams validation

@pytest.mark.parametrize("bad", [
    {"max_new_tokens": 0}, {"max_new_tokens": -3}, {"max_new_tokens": 2.5},
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"top_k": -1},
    {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 1.1},
    {"repetition_penalty": 0.0}, {"repetition_penalty": -1.0}, {"logprobs": -1}, {"logprobs": 21},
])
def test_sampling_params_validation(models, bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()
    eng = Engine(models["plain"], max_batch_size=1)
    with pytest.raises(ValueError):
        eng.add_request([1, 2], SamplingParams(**bad))
    assert not eng.has_unfinished()


def test_sampling_params_valid_edges():
    for ok in ({"max_new_tokens": 1}, {"temperature": 0.0}, {"top_p": 1.0}, {"min_p": 0.0}, {"min_p": 1.0},
               {"logprobs": 0}, {"logprobs": 20}, {"top_k": 0}, {"repetition_penalty": 0.5}):
        SamplingParams(**ok).validate()


def test_report_speculative_stats():
    """Not a check: prints the acceptance statistics measured above (pytest -s shows them)."""
    for key, (rate, mal, first) in sorted(SPEC_STATS.items(), key=str):
        print(f"spec {key}: acceptance_rate={rate:.3f} mean_accepted_length={mal:.3f} first_draft={first:.3f}")
    for key, (stat, df, thr) in CHI2.items():
        print(f"chi2 {key}: {stat:.1f} (df {df}, threshold {thr:.1f})")


def test_failed_prefill_releases_its_blocks(monkeypatch):
    """A forward that raises during prefill must not leak the admitted requests' cache blocks."""
    from dsv3 import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                      q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                      max_position_embeddings=64, rope_scaling=None)
    eng = Engine(build_model(cfg), max_batch_size=2, cache_tokens=64, block_size=4)
    full = eng.cache.free_blocks
    eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))

    def boom(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(eng, "_prefill", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        eng.step()
    assert eng.cache.free_blocks == full
    assert not eng.has_unfinished() or not eng.running


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    """textstream.TextStream by itself: a delta never ends in an incomplete UTF-8 character (the
    decoder's U+FFFD) or in a prefix of a stop string; the final delta releases the rest; a stop string
    cuts the text before it, at the token that completes it."""
    from dsv3.inference.textstream import TextStream

    pieces = {0: "ab", 1: "\xe2", 2: "\x82\xac", 3: "S", 4: "TO", 5: "P", 6: "cd"}

    class Tok:  # bytes per token; decoding an incomplete UTF-8 tail gives U+FFFD, as a byte-level BPE does
        def decode(self, ids, skip_special_tokens=True):
            return b"".join(pieces[i].encode("latin-1") for i in ids).decode("utf-8", errors="replace")

    s = TextStream(Tok(), stop=["STOP"])
    toks = [0, 1, 2]  # "ab", then "€" in two tokens: 3 = len("STOP") - 1 characters are always held
    assert [s.delta(toks[:i], finished=False) for i in (1, 2, 3)] == ["", "", ""]
    toks += [3, 4]  # "ab€STO": the last 3 characters could begin "STOP"
    assert not s.hits_stop(toks) and s.delta(toks, finished=False) == "ab\u20ac"
    toks.append(5)  # "P" completes the stop string: the text is cut before it
    assert s.hits_stop(toks) and s.text == "ab\u20ac" and s.delta(toks, finished=True) == ""
    s = TextStream(Tok(), stop=["STOP"])
    assert s.delta([0, 1, 2, 6], finished=False) == "ab" and s.delta([0, 1, 2, 6, 3], finished=True) == "\u20accdS"
    # without stop strings only the incomplete character is held
    s = TextStream(Tok())
    assert s.delta([0, 1], finished=False) == "ab" and s.delta([0, 1, 2], finished=False) == "\u20ac"
    assert s.delta([0, 1, 2, 6, 1], finished=True) == "cd\ufffd"  # finished: nothing held back


def _cuts(data: bytes):
    """Every way of cutting `data` into pieces of 1-3 bytes."""
    if not data:
        yield []
        return
    for c in (1, 2, 3):
        if c <= len(data):
            for rest in _cuts(data[c:]):
                yield [data[:c], *rest]


def test_text_stream_never_streams_a_stop_string_that_ends_in_a_multibyte_character():
    """The engine's order per token (hits_stop, then delta, finished at the hit or the end): the streamed deltas
    join to the final text for stop strings ending in a character still incomplete in the text so far (an audit
    found "b🙂" streamed "ab" where the text is "a", and "问题：" streamed "Q: 问"), over every way of cutting
    the bytes into tokens of 1-3 bytes."""
    from dsv3.inference.textstream import TextStream

    for text, stops in (("ab\U0001f642cd", ["b\U0001f642"]), ("Q: \u95ee\u9898\uff1a\u597d", ["\u95ee\u9898\uff1a"]),
                        ("x\u20acy\u20ac\u20acz", ["\u20ac\u20ac", "zz"]),
                        ("\u00e9t\u00e9", ["t\u00e9", "\u00e9t\u00e9!"])):
        data = text.encode()
        for pieces in _cuts(data):
            class Tok:  # bytes per token; an incomplete UTF-8 tail decodes to U+FFFD, as a byte-level BPE does
                def decode(self, ids, skip_special_tokens=True):
                    return b"".join(pieces[j] for j in ids).decode("utf-8", errors="replace")

            ts, streamed = TextStream(Tok(), stops), []
            ids = list(range(len(pieces)))
            for n in range(1, len(ids) + 1):
                hit = ts.hits_stop(ids[:n])
                streamed.append(ts.delta(ids[:n], hit or n == len(ids)))
                if hit:
                    break
            assert "".join(streamed) == ts.text, (text, stops, pieces, streamed)
            assert not any(s in "".join(streamed) for s in stops)


def test_text_stream_decodes_a_short_window_and_gives_the_whole_decode():
    """TextStream decodes incrementally (only the tokens since the text last ended whole, plus their context): its
    text after every token equals the decode of all the tokens, through characters cut across tokens, invalid bytes
    that never complete and a literal U+FFFD; and for text that ends whole at each token a decode covers at most
    two tokens (the whole output each time before: O(n) a token, ~5 s of host time over an 8k-token stream)."""
    from dsv3.inference.textstream import TextStream

    rng = random.Random(0)
    text = "ab \U0001f642 caf\u00e9 \u95ee\u9898 \ufffd x\u20acy " * 12
    data = bytearray(text.encode())
    for at in (40, 95, 300):  # bytes that are no UTF-8: U+FFFD for ever, in the middle of the stream
        data[at:at] = b"\xff"
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, 3)
        pieces.append(bytes(data[i: i + n]))
        i += n
    sizes = []

    class Tok:  # one token a piece of 1-3 bytes; an incomplete or invalid sequence decodes to U+FFFD (byte-level)
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return b"".join(pieces[j] for j in ids).decode("utf-8", errors="replace")

    ts, streamed, ids = TextStream(Tok(), ["never"]), [], list(range(len(pieces)))
    for n in range(1, len(ids) + 1):
        assert not ts.hits_stop(ids[:n])
        streamed.append(ts.delta(ids[:n], n == len(ids)))
        assert ts.text == bytes(data[: sum(map(len, pieces[:n]))]).decode("utf-8", errors="replace")
    assert "".join(streamed) == ts.text == bytes(data).decode("utf-8", errors="replace")
    assert max(sizes) <= 12 and sum(sizes) < 6 * len(pieces)  # windows, not the output (len(pieces) ~ 270)
    ascii_pieces = [b"ab", b"c ", b"d"] * 100
    sizes.clear()
    pieces = ascii_pieces
    ts = TextStream(Tok())
    for n in range(1, len(pieces) + 1):
        ts.delta(list(range(n)), n == len(pieces))
    assert ts.text == b"".join(pieces).decode() and max(sizes) <= 2


def test_logits_at_one_position_equal_the_full_logits(models):
    """Transformer.forward(logits_at=...) (the engine's prefill: the head only at each prompt's last
    position) gives those positions' rows of the full logits."""
    model = models["plain"]
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    at = torch.tensor([8, 0, 5])
    with torch.no_grad():
        full = model(ids, with_mtp=False).logits
        got = model(ids, with_mtp=False, logits_at=at).logits
    assert got.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(got[:, 0], full[torch.arange(3), at])


# ------------------------------------------------------------------------------------------------
# overlapped decoding: the next step queued before the one in flight is read

def _mixed_params(eos_free: bool):
    """Requests that end at different steps, by length, stop token and stop string, greedy and seeded, with
    log-probabilities: each way a request can leave a batch whose next step is already queued."""
    return [SamplingParams(max_new_tokens=9, temperature=0.0, logprobs=2),
            SamplingParams(max_new_tokens=4, temperature=0.0),
            SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, logprobs=0),
            SamplingParams(max_new_tokens=7, temperature=0.8, top_k=5, seed=9, stop_token_ids=[5, 17, 33]),
            SamplingParams(max_new_tokens=1, temperature=0.0),
            SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1, ignore_eos=eos_free)]


def _final(eng, prompts, params, arrivals=None):
    """Outputs by prompt index; arrivals[i]: the step before which prompt i is added (default: all at once)."""
    arrivals = arrivals or [0] * len(prompts)
    ids, final, step = {}, {}, 0
    while len(final) < len(prompts):
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if arrivals[i] == step:
                ids[eng.add_request(p, sp)] = i
        step += 1
        for o in eng.step():
            assert o.request_id in ids
            if o.finished:
                final[ids[o.request_id]] = (o.token_ids, o.finish_reason, o.logprobs or [])
        assert step < 500
    return final


@pytest.mark.parametrize("name", ["plain", "yarn"])
def test_overlapped_decoding_gives_the_same_outputs(models, name):
    """Overlapped decoding (the default) against each step read at once: the same tokens, log-probabilities and
    finish reasons for greedy and seeded requests ending by length, stop token and EOS at different steps,
    arriving together and one by one (a batch that changes while a step is queued)."""
    model = models[name]
    prompts = prompts_for(model.config, [3, 9, 5, 14, 2, 7], seed=4)
    params = _mixed_params(eos_free=False)
    # stop tokens that occur: requests 0 (greedy) and 2 (seeded) stop at their own 3rd and 6th token
    first = _final(Engine(model, max_batch_size=4, block_size=4, overlap=False), prompts, params)
    params[0] = dataclasses.replace(params[0], stop_token_ids=[first[0][0][2]])
    params[2] = dataclasses.replace(params[2], stop_token_ids=[first[2][0][5]])
    for arrivals in (None, [0, 0, 2, 3, 3, 9]):
        want = _final(Engine(model, max_batch_size=4, block_size=4, overlap=False), prompts, params, arrivals)
        eng = Engine(model, max_batch_size=4, block_size=4)
        assert eng.overlap
        got = _final(eng, prompts, params, arrivals)
        # every block free; a queued step left behind holds only ended requests (one that stopped)
        assert eng.cache.free_blocks == eng.cache.num_blocks
        assert eng._inflight is None or all(r.finished for r in eng._inflight.reqs)
        assert {i: g[:2] for i, g in got.items()} == {i: w[:2] for i, w in want.items()}
        for i, w in want.items():  # log-probabilities: equal up to the last bits (a step's batch may hold a row
            # more with overlap: a request that ended in the step before)
            assert len(got[i][2]) == len(w[2]) == (len(w[0]) if params[i].logprobs is not None else 0)
            for a, b in zip(got[i][2], w[2]):
                assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
                assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)
    reasons = {r for _, r, _ in want.values()}
    assert {"length", "stop"} <= reasons, reasons  # (the prompts exercise both ways to end)


def _counted_run(eng, prompts, params, arrivals, monkeypatch):
    """eng's final outputs (`_final`), its stats, how many times it ran a round graph and a main step, and every
    request's drafts as each round is read; its cache all free after."""
    calls = {"round": 0, "main": 0}
    for name in calls:
        fn = getattr(eng._graphs, name)
        monkeypatch.setattr(eng._graphs, name, lambda *a, _fn=fn, _n=name, **kw:
                            calls.__setitem__(_n, calls[_n] + 1) or _fn(*a, **kw))
    drafts = []
    set_drafts = eng._set_drafts
    monkeypatch.setattr(eng, "_set_drafts", lambda r, ds, q, b, _f=set_drafts:
                        drafts.append((r.id, list(ds))) or _f(r, ds, q, b))
    out = _final(eng, prompts, params, arrivals)
    assert eng.cache.free_blocks == eng.cache.num_blocks
    return out, eng.stats, calls, drafts


@pytest.mark.parametrize("D,k,drafter,graphs", [(1, 1, "aligned", False), (2, 3, "aligned", True),
                                                  (1, 2, "random", True), (2, 2, "aligned", False)])
def test_overlapped_speculation_gives_the_same_outputs(spec_models, D, k, drafter, graphs):
    """Speculation rounds queued on the round in flight (its last token, new drafts, draft distributions and
    positions taken on the device) against each round read at once: the same tokens, log-probabilities, finish
    reasons and acceptance counts for greedy and seeded requests ending by length, stop token and EOS, arriving
    together and one by one; through the exact-shape eager steps and the bucketed static ones (graphs.py)."""
    model = spec_models[(D, drafter)]
    prompts = prompts_for(model.config, [3, 9, 5, 14, 2, 7], seed=6)
    params = _mixed_params(eos_free=True)
    first = _final(Engine(model, max_batch_size=4, block_size=3, speculative_k=k, overlap=False), prompts, params)
    params[0] = dataclasses.replace(params[0], stop_token_ids=[first[0][0][4]])  # stops inside a run of drafts
    params[2] = dataclasses.replace(params[2], stop_token_ids=[first[2][0][7]])
    for arrivals in (None, [0, 0, 2, 3, 3, 9]):
        runs = []
        for overlap in (False, True):
            eng = Engine(model, max_batch_size=4, block_size=3, speculative_k=k, overlap=overlap, cuda_graphs=graphs)
            runs.append((_final(eng, prompts, params, arrivals), eng.stats))
            assert eng.cache.free_blocks == eng.cache.num_blocks
        (want, sw), (got, sg) = runs
        assert {i: g[:2] for i, g in got.items()} == {i: w[:2] for i, w in want.items()}
        for i, w in want.items():
            assert len(got[i][2]) == len(w[2]) == (len(w[0]) if params[i].logprobs is not None else 0)
            for a, b in zip(got[i][2], w[2]):
                assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        # the rounds of requests that ended while a round was queued are discarded unread, so the counts of the
        # rounds that were read are the same
        assert (sg.rounds, sg.accepted, sg.first_draft_accepted) == (sw.rounds, sw.accepted, sw.first_draft_accepted)
        assert sg.rounds > 0
        assert {"length", "stop"} <= {r for _, r, _ in want.values()}
    if drafter == "aligned":
        assert sg.accepted > 0


def _greedy_params():
    """Greedy requests without log-probabilities (a round of them may run as one graph) ending at different rounds, by
    length (1 .. 13 tokens: inside a round's drafts too; the test adds stop tokens)."""
    return [SamplingParams(max_new_tokens=9, temperature=0.0), SamplingParams(max_new_tokens=4, temperature=0.0),
            SamplingParams(max_new_tokens=13, temperature=0.0), SamplingParams(max_new_tokens=7, temperature=0.0),
            SamplingParams(max_new_tokens=1, temperature=0.0), SamplingParams(max_new_tokens=10, temperature=0.0)]


@pytest.mark.parametrize("D,k,drafter,graphs", [(1, 1, "aligned", False), (2, 3, "aligned", True),
                                                  (1, 2, "random", True), (2, 2, "aligned", False),
                                                  (1, 0, "aligned", True), (1, 0, "aligned", False)])
def test_a_greedy_round_in_one_graph_gives_the_same_outputs(spec_models, D, k, drafter, graphs, monkeypatch):
    """"round_graph" (graphs.py DecodeGraphs.round: a greedy round's verification, acceptance, MTP step and chained
    drafts as one static forward; k = 0 the one-token step and its argmax) against the round's steps run one by one:
    the same tokens, finish reasons and acceptance counts, overlapped or not, arriving together and one by one,
    exact-shape and bucketed steps; requests asking for log-probabilities (0, 1 and 3 of the most likely tokens)
    get those of the steps too; rounds with a sampled request (round_sampled off here) take the steps one by one."""
    model = spec_models[(D, drafter)]
    prompts = prompts_for(model.config, [3, 9, 5, 14, 2, 7], seed=8)
    params = _greedy_params()
    first = _final(Engine(model, max_batch_size=4, block_size=3, speculative_k=k, overlap=False), prompts, params)
    params[0] = dataclasses.replace(params[0], stop_token_ids=[first[0][0][4]])  # stops inside a run of drafts
    params[2] = dataclasses.replace(params[2], stop_token_ids=[first[2][0][7]])
    logp = list(params)  # log-probabilities: from the round graph too
    for i, n in ((0, 3), (2, 0), (5, 1)):
        logp[i] = dataclasses.replace(logp[i], logprobs=n)
    mixed = list(logp)  # a sampled request among them: those rounds step by step
    mixed[3] = dataclasses.replace(mixed[3], temperature=0.9, seed=5)
    for ps, arrivals, overlap in ((params, None, True), (params, [0, 0, 2, 3, 3, 9], True), (params, None, False),
                                  (logp, [0, 0, 2, 3, 3, 9], True), (logp, None, False),
                                  (mixed, [0, 0, 2, 3, 3, 9], True)):
        runs = []
        for fused in (False, True):
            eng = Engine(model, max_batch_size=4, block_size=3, speculative_k=k, overlap=overlap, cuda_graphs=graphs)
            eng.round_graph, eng.round_graph_sampled = fused, False  # (sampled rounds: the test after the next)
            runs.append(_counted_run(eng, prompts, ps, arrivals, monkeypatch))
        (want, sw, cw, dw), (got, sg, cg, dg) = runs
        assert got == want and dg == dw
        assert (sg.rounds, sg.accepted, sg.first_draft_accepted) == (sw.rounds, sw.accepted, sw.first_draft_accepted)
        assert cw["round"] == 0 and cg["round"] > 0  # (one graph a round only where switched on)
        if ps is mixed:
            assert cg["main"] > 0  # the rounds with the sampled request
        else:
            assert cg["main"] == 0  # every round greedy: none step by step
        for i, p in enumerate(ps):  # (log-probabilities where asked, of every token, as many as asked)
            lps = want[i][2]
            assert len(lps) == (0 if p.logprobs is None else len(want[i][0]))
            assert all(len(x.top) == p.logprobs and (not x.top or x.top[0][1] >= x.logprob) for x in lps)
        assert {"length", "stop"} <= {r for _, r, _ in want.values()}
    if drafter == "aligned" and k:
        assert sg.accepted > 0


def test_round_graph_follows_its_switch(spec_models, monkeypatch):
    """The engine takes "round_graph" (kernels/backend.py SWITCHED: as shipped, speculation rounds and, in plain
    decoding, the steps asking for log-probabilities (LOGPROB_STEPS); DSV3_KERNELS=round_graph=on: every greedy
    step, =off: none) when it is made."""
    from dsv3.kernels import backend as kb

    model = spec_models[(1, "aligned")]
    assert kb.SWITCHED["round_graph"] == kb.SPECULATION_ROUNDS
    assert Engine(model, speculative_k=1).round_graph is True and Engine(model).round_graph == kb.LOGPROB_STEPS
    assert kb.switches_from_env("round_graph=on") == {"round_graph": True}
    monkeypatch.setitem(kb.SWITCHED, "round_graph", True)
    assert Engine(model, speculative_k=1).round_graph is True and Engine(model).round_graph is True
    assert kb.switch("round_graph", False) is True
    assert Engine(model, speculative_k=2).round_graph is False and Engine(model).round_graph is False
    assert kb.switch("round_graph", kb.SPECULATION_ROUNDS) is False
    assert Engine(model, speculative_k=2).round_graph is True and Engine(model).round_graph == kb.LOGPROB_STEPS
    with pytest.raises(ValueError, match="'round_graph' takes on, off or SPECULATION_ROUNDS, got 'e4m3 weights'"):
        kb.switch("round_graph", kb.WEIGHTS_E4M3)
    with pytest.raises(ValueError, match="'dense_gemv' takes on, off or WEIGHTS_16BIT, WEIGHTS_E4M3, got 'spec"):
        kb.switch("dense_gemv", kb.SPECULATION_ROUNDS)
    assert kb.SWITCHED["round_graph"] == kb.SPECULATION_ROUNDS and kb.SWITCHED["dense_gemv"] is True
    # "round_sampled" (sampled steps, plain decoding's too, in one graph): on as shipped, whatever round_graph says
    assert Engine(model).round_graph_sampled and Engine(model, speculative_k=1).round_graph_sampled
    assert kb.switches_from_env("round_sampled=off") == {"round_sampled": False}
    monkeypatch.setitem(kb.SWITCHED, "round_sampled", True)  # (restored after the test, as round_graph above)
    assert kb.switch("round_sampled", False) is True and kb.switch("round_graph", True) == kb.SPECULATION_ROUNDS
    assert not Engine(model).round_graph_sampled and Engine(model).round_graph is True


@pytest.mark.parametrize("graphs", [False, True])
def test_plain_decoding_takes_the_round_graph_for_log_probabilities(spec_models, graphs, monkeypatch):
    """As shipped (round_graph SPECULATION_ROUNDS), a plain decoding step of greedy requests runs its graph and
    an eager argmax, unless some request of the batch asks for log-probabilities: then the one-token step, its
    argmax and the log-probabilities run as one round graph (the compiled one fuses them: 1.16x on an H100), with
    the tokens and log-probabilities of the eager path (round_graph off); overlapped or not."""
    from dsv3.kernels import backend as kb

    model = spec_models[(1, "aligned")]
    prompts = prompts_for(model.config, [3, 9, 5, 14], seed=3)
    params = _greedy_params()[:4]
    logp = [dataclasses.replace(params[0], logprobs=2), *params[1:3], dataclasses.replace(params[3], logprobs=0)]
    for ps, overlap in ((params, True), (logp, True), (logp, False), (params[1:3] + logp[:1], True)):
        runs = []
        for rg in (False, kb.LOGPROB_STEPS):
            eng = Engine(model, max_batch_size=4, block_size=3, overlap=overlap, cuda_graphs=graphs)
            assert eng.round_graph == kb.LOGPROB_STEPS  # as shipped
            eng.round_graph = rg
            runs.append(_counted_run(eng, prompts[:len(ps)], ps, [0, 0, 2, 3][:len(ps)], monkeypatch))
        (want, _, cw, _), (got, _, cg, _) = runs
        assert cw["round"] == 0 and cw["main"] > 0
        assert got.keys() == want.keys()
        for i in want:  # the same tokens and finish reasons; log-probabilities within fp32 rounding of each other
            assert got[i][:2] == want[i][:2]
            assert [(x.token_id, [t for t, _ in x.top]) for x in got[i][2]] == \
                [(x.token_id, [t for t, _ in x.top]) for x in want[i][2]]
            for a, b in zip(got[i][2], want[i][2]):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        if ps is params:  # no request asks: the steps as before
            assert cg["round"] == 0 and cg["main"] == cw["main"]
        else:  # a step whose batch holds a request asking takes the round graph; the others the main step
            assert cg["round"] > 0 and sum(p.logprobs is not None for p in ps) > 0
            assert cg["round"] + cg["main"] == cw["main"]


def test_compiled_steps_raise_dynamos_limits_to_their_buckets(spec_models):
    """Each (batch, context) bucket of a compiled decode step is one compiled entry of its function: a server's
    buckets (batch 1 .. 32 x context 1 .. 256 blocks: 54, and each step kind's widths) exceed dynamo's default limit
    of 8 (64 before this), past which a new bucket would run uncompiled. DecodeGraphs raises the limits to cover
    them, and never lowers them."""
    import torch._dynamo

    from dsv3.inference import graphs as g

    # (per bucket: the main step's 2 widths, the MTP steps' max(1, D), a round's 2 context variants x greedy and
    # the 8 sets of filters of sampled rounds x with and without log-probabilities)
    assert g.compile_entries(32, 256, 1) == 6 * 9 * (3 + 36) + 8 and g.compile_entries(1, 1, 0) == 64
    assert g.compile_entries(33, 257, 2) == 7 * 10 * (4 + 36) + 8  # (the caps are buckets of their own)
    eng = Engine(spec_models[(1, "aligned")], speculative_k=1)
    cfg = torch._dynamo.config
    # (config.patch restores the settings after; pytest's monkeypatch would delete them, which hides them for good)
    with cfg.patch(recompile_limit=8, accumulated_recompile_limit=256):
        g.DecodeGraphs(eng.model, eng.cache, eng._graphs.pad_block, 32, 256, use_graphs=False, compile=True)
        assert cfg.recompile_limit == 2114 and cfg.accumulated_recompile_limit == 3 * 2114
    with cfg.patch(recompile_limit=1000):
        g.DecodeGraphs(eng.model, eng.cache, eng._graphs.pad_block, 4, 8, use_graphs=False, compile=True)
        assert cfg.recompile_limit == 1000
    assert cfg.accumulated_recompile_limit >= 256  # (still there)


def test_a_round_whose_compile_fails_runs_its_steps(spec_models):
    """Should compiling a round graph's whole forward fail (round_compile), the engine warns, naming the error, and
    runs that round and every later one through the round's steps (the static forwards, eager on the CPU): the same
    tokens as an engine whose rounds never tried."""
    model = spec_models[(1, "aligned")]
    prompts = prompts_for(model.config, [5, 12, 3])
    sp = SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True)

    def engine():
        eng = Engine(model, max_batch_size=4, block_size=4, speculative_k=2, cuda_graphs=True)
        eng.round_graph = True
        return eng

    want = [o.token_ids for o in engine().generate(prompts, sp)]
    eng = engine()
    g, calls = eng._graphs, []

    def failing(r):
        calls.append(r)
        raise RuntimeError("cannot lower op 'x'")

    g._round = failing
    with pytest.warns(UserWarning, match=r"whole forward failed \(RuntimeError: cannot lower op 'x'\); its steps"):
        got = [o.token_ids for o in eng.generate(prompts, sp)]
    assert got == want and len(calls) == 1 and g._round == g._forward_round
    assert ("round", 2, None, None) in {key[0] for key in g._entries}


def test_round_compile_follows_its_switch(spec_models, monkeypatch):
    """"round_compile" (kernels/backend.py SWITCHED, on as shipped): compiled decode steps compile a round graph's
    whole forward as one function where it is on, and only the steps where it is off; the switch takes on or off,
    nothing else. (That the compiled round gives the steps' tokens: tests/test_gpu_speculation.py.)"""
    from dsv3.inference.graphs import DecodeGraphs
    from dsv3.kernels import backend as kb

    eng = Engine(spec_models[(1, "aligned")], speculative_k=1)

    def graphs():
        return DecodeGraphs(eng.model, eng.cache, eng._graphs.pad_block, 4, 8, use_graphs=False, compile=True)

    assert kb.SWITCHED["round_compile"] is True
    g = graphs()
    assert g._round != g._forward_round and g._main != g._forward_main  # (compiled lazily, at a bucket's first run)
    plain = DecodeGraphs(eng.model, eng.cache, eng._graphs.pad_block, 4, 8, use_graphs=False)
    assert plain._round == plain._forward_round  # (steps not compiled: nor the round)
    monkeypatch.setitem(kb.SWITCHED, "round_compile", False)
    g = graphs()
    assert g._round == g._forward_round and g._main != g._forward_main  # the steps alone
    assert kb.switches_from_env("round_compile=off") == {"round_compile": False}
    with pytest.raises(ValueError, match="'round_compile' takes on or off, got 'speculation rounds'"):
        kb.switch("round_compile", kb.SPECULATION_ROUNDS)
    with pytest.raises(ValueError, match="'verify_rows' takes on, off or WEIGHTS_16BIT, WEIGHTS_E4M3, got 'x'"):
        kb.switch("verify_rows", "x")
    assert kb.SWITCHED["round_compile"] is False


def _sampled_params():
    """Sampling requests without repetition penalties or log-probabilities (a round of them may run as one graph):
    seeded and unseeded, each filter, a greedy one among them, ending at different rounds."""
    return [SamplingParams(max_new_tokens=9, temperature=0.9, seed=5),
            SamplingParams(max_new_tokens=4, temperature=1.0, top_k=5, seed=6),
            SamplingParams(max_new_tokens=13, temperature=1.2, top_p=0.8),
            SamplingParams(max_new_tokens=7, temperature=0.0),
            SamplingParams(max_new_tokens=1, temperature=0.7, min_p=0.1, seed=7),
            SamplingParams(max_new_tokens=10, temperature=1.0, top_k=8, top_p=0.9, seed=8)]


@pytest.mark.parametrize("D,k,drafter,graphs", [(1, 1, "aligned", True), (2, 3, "aligned", True),
                                                  (1, 2, "random", False), (2, 2, "aligned", True),
                                                  (1, 0, "aligned", True)])
def test_a_sampled_round_in_one_graph_gives_the_same_outputs(spec_models, D, k, drafter, graphs, monkeypatch):
    """"round_sampled" (graphs.py DecodeGraphs.round with the batch's sampler: its rows and the verified drafts'
    distributions copied into the round's static buffers, the hashed random numbers drawn inside): the same tokens,
    log-probabilities (where asked), finish reasons, acceptance counts and drafts as the round's steps run one by
    one, overlapped or not, arriving together and one by one; with the switch off, or a request with a repetition
    penalty in the batch, the steps one by one."""
    model = spec_models[(D, drafter)]
    prompts = prompts_for(model.config, [3, 9, 5, 14, 2, 7], seed=9)
    params = _sampled_params()
    penalised = list(params)
    penalised[3] = dataclasses.replace(penalised[3], repetition_penalty=1.2)
    logp = list(params)  # log-probabilities (the raw model's) from the round graph too
    logp[0], logp[5] = dataclasses.replace(logp[0], logprobs=2), dataclasses.replace(logp[5], logprobs=0)
    for ps, arrivals, overlap in ((params, None, True), (params, [0, 0, 2, 3, 3, 9], True), (params, None, False),
                                  (logp, [0, 0, 2, 3, 3, 9], True), (penalised, [0, 0, 2, 3, 3, 9], True)):
        runs = []
        for fused, sampled in ((False, False), (True, True), (True, False)):
            torch.manual_seed(0)  # (the unseeded requests' seeds)
            eng = Engine(model, max_batch_size=4, block_size=3, speculative_k=k, overlap=overlap, cuda_graphs=graphs)
            eng.round_graph, eng.round_graph_sampled = fused, sampled
            runs.append(_counted_run(eng, prompts, ps, arrivals, monkeypatch))
        (want, sw, cw, dw) = runs[0]
        for got, sg, _, dg in runs[1:]:
            assert got == want and dg == dw
            assert (sg.rounds, sg.accepted, sg.first_draft_accepted) == (sw.rounds, sw.accepted,
                                                                         sw.first_draft_accepted)
        (_, _, cg, _), (_, _, co, _) = runs[1:]
        assert cw["round"] == 0 and cg["round"] > 0 and co["main"] > 0
        if ps is penalised:
            assert cg["main"] > 0  # the rounds with the penalised request
        else:
            assert cg["main"] == 0  # every round without penalties: none step by step
            assert co["round"] < cg["round"]  # (round_sampled off: only rounds of the greedy request alone, if any)
        assert [len(want[i][2]) > 0 for i in range(len(ps))] == [p.logprobs is not None for p in ps]
        assert "length" in {r for _, r, _ in want.values()}
        assert len({tuple(t) for t, _, _ in want.values()}) == len(ps)
    if drafter == "aligned" and k:
        assert sg.accepted > 0


def test_a_sampled_round_graph_refuses_what_it_cannot_sample(spec_models):
    model = spec_models[(1, "aligned")]
    eng = Engine(model, max_batch_size=2, block_size=4, speculative_k=2, cuda_graphs=True)
    tables = [eng.cache.allocate(2)]
    pen = eng._sampler([SimpleNamespace(params=SamplingParams(temperature=1.0, repetition_penalty=1.1), seed32=1,
                                        phase=0, tokens=[1, 2])])
    with pytest.raises(ValueError, match="without repetition penalties"):
        eng._graphs.round(2, [[1, 2, 3]], [0], tables, sampler=pen)
    ok = eng._sampler([SimpleNamespace(params=SamplingParams(temperature=1.0), seed32=1, phase=0, tokens=[1])])
    with pytest.raises(ValueError, match="needs the drafts' distributions"):
        eng._graphs.round(2, [[1, 2, 3]], [0], tables, sampler=ok)


def test_a_round_graph_refuses_a_round_without_drafts_or_of_the_wrong_width(spec_models):
    model = spec_models[(1, "aligned")]
    eng = Engine(model, max_batch_size=2, block_size=4, speculative_k=2)
    tables = [eng.cache.allocate(2)]
    with pytest.raises(ValueError, match="must be >= 0"):
        eng._graphs.round(-1, [[1]], [0], tables)
    with pytest.raises(ValueError, match="k \\+ 1 = 3 tokens"):
        eng._graphs.round(2, [[1, 2]], [0], tables)


def test_overlapped_decoding_with_stop_strings(text_model):
    """Requests of one batch ending by stop strings (found in the text of a step in flight, whose queued next step
    is then discarded) at different steps: the texts, tokens and reasons of the engine reading each step at once."""
    model, tok = text_model
    prompts = ["the cat sat on", "a dog ran to", "big red house", "sun moon star"]
    sync = Engine(model, tok, max_batch_size=4, block_size=4, overlap=False)
    full = sync.generate(prompts, greedy(30, ignore_eos=True))
    stops = [o.text[len(o.text) // (2 + i): len(o.text) // (2 + i) + 2] for i, o in enumerate(full)]
    params = [greedy(30, ignore_eos=True, stop=[st]) for st in stops if st.strip()]
    prompts = prompts[: len(params)]
    want = sync.generate(prompts, params)
    assert sum(o.finish_reason == "stop" for o in want) >= 2
    got = Engine(model, tok, max_batch_size=4, block_size=4).generate(prompts, params)
    assert [(o.text, o.token_ids, o.finish_reason) for o in got] == [(o.text, o.token_ids, o.finish_reason)
                                                                      for o in want]


def test_overlapped_decoding_queues_the_next_step_before_reading(models, spec_models, monkeypatch):
    """In a steady batch each step queues the next one (its input tokens from the device) before reading the one
    in flight, with speculation too (the next round's tokens, drafts and positions from the device); a repetition
    penalty turns the overlap off (each step read at once)."""

    def logged(eng):
        log = []
        launch, read = eng._launch_decode, eng._read
        monkeypatch.setattr(eng, "_launch_decode",
                            lambda reqs, prev=None: log.append(("launch", prev is not None)) or launch(reqs, prev))
        monkeypatch.setattr(eng, "_read", lambda fl: log.append(("read", len(fl.reqs))) or read(fl))
        return log

    model = models["plain"]
    prompts = prompts_for(model.config, [4, 6], seed=2)
    eng = Engine(model, max_batch_size=4, block_size=4)
    log = logged(eng)
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    out = eng.generate(prompts, sp)
    assert [len(o.token_ids) for o in out] == [6, 6]
    # the first decode step from the host's tokens, then launch-before-read from the device's, and the last
    # step (both requests end by length in it) read before anything else is queued
    assert log == [("launch", False)] + [("launch", True), ("read", 2)] * 4 + [("read", 2)], log
    ref = Engine(model, max_batch_size=4, block_size=4, overlap=False).generate(prompts, sp)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    # speculation (k = 2): rounds queued on the round in flight while it cannot end a request by length
    spec_model = spec_models[(1, "aligned")]
    spec_prompts = [[t % 64 for t in p[:3]] for p in prompts]  # (the spec model has 64 tokens)
    spec = Engine(spec_model, max_batch_size=4, block_size=4, speculative_k=2)
    spec_log = logged(spec)
    sp16 = dataclasses.replace(sp, max_new_tokens=16)
    got = spec.generate(spec_prompts, sp16)
    want = Engine(spec_model, max_batch_size=4, block_size=4, speculative_k=2, overlap=False).generate(spec_prompts,
                                                                                                       sp16)
    assert [o.token_ids for o in got] == [o.token_ids for o in want] and all(len(o.token_ids) == 16 for o in got)
    chained = spec_log.count(("launch", True))
    assert spec_log[0] == ("launch", False) and chained >= 2, spec_log
    assert spec_log[1: 1 + 2 * chained] == [("launch", True), ("read", 2)] * chained, spec_log
    assert all(x[0] == "read" or x == ("launch", False) for x in spec_log[1 + 2 * chained:]), spec_log
    sp_off = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
    log.clear()
    eng.generate(prompts, sp_off)
    assert log and log[::2] == [("launch", False)] * (len(log) // 2) and all(x[0] == "read" for x in log[1::2]), log


@pytest.mark.parametrize("k", [0, 2])
def test_overlapped_decoding_with_an_abort_and_reused_blocks(models, spec_models, k):
    """A request aborted while its next step (k = 2: speculation round) is queued ends with "abort" and its queued
    row is discarded; its blocks, released while that step may still write them, go to a new request whose output is
    the uncached reference's (the queued write lands before the new request's prefill, in stream order, and within
    the aborted request's blocks)."""
    model = spec_models[(1, "aligned")] if k else models["plain"]
    prompts = prompts_for(model.config, [5, 8, 6], seed=8)
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    # (cache for two requests' budgets and, with speculation, the positions a round may write past them)
    eng = Engine(model, max_batch_size=2, block_size=4, cache_tokens=2 * (24 + 2 * k), speculative_k=k)
    a, b = eng.add_request(prompts[0], sp), eng.add_request(prompts[1], sp)
    for _ in range(3 if k else 4):  # (k = 2: the third step queues a round on the round in flight)
        eng.step()
    assert eng._inflight is not None and len(eng._inflight.reqs) == 2
    assert eng.abort(a)
    c = eng.add_request(prompts[2], sp)
    final = run_all(eng)
    assert final[a].finish_reason == "abort" and len(final[a].token_ids) < 12
    for rid, p in ((b, prompts[1]), (c, prompts[2])):
        assert final[rid].token_ids == generate_naive(model, p, 12, temperature=0.0, eos_id=None)
