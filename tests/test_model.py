"""The Transformer: MTP shapes and causality, construction and init, positions and masks, RoPE/YaRN,
partial models (pipeline stages) chained equal to the whole.

Run: python -m pytest tests/test_model.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.config import preset, softmax_scale
from dsv3.model import Transformer, build_model
from dsv3.model import rope
from dsv3.model.layers import RMSNorm
from dsv3.model.mla import MLA
from conftest import make_model, rand_ids, tiny_cfg, yarn


# ------------------------------------------------------------------------------------------------
# MTP

@pytest.mark.parametrize("D", [1, 2])
def test_output_shapes(D):
    cfg = tiny_cfg(num_nextn_predict_layers=D)
    model = make_model(cfg)
    B, T, V = 2, 9, cfg.vocab_size
    with torch.no_grad():
        out = model(rand_ids(cfg, B, T))
    assert out.logits.shape == (B, T, V)
    assert out.hidden.shape == (B, T, cfg.hidden_size)
    assert len(out.mtp_logits) == D
    for k, lg in enumerate(out.mtp_logits, start=1):
        assert lg.shape == (B, T - k, V)
    assert torch.allclose(out.logits, model.lm_head(out.hidden), atol=1e-6)


def test_with_mtp_false():
    cfg = tiny_cfg(num_nextn_predict_layers=2)
    model = make_model(cfg, bias_std=0.3)
    ids = rand_ids(cfg, 2, 8)
    with torch.no_grad():
        full = model(ids)
        main = model(ids, with_mtp=False)
    assert main.mtp_logits == []
    assert len(full.mtp_logits) == 2
    assert torch.equal(main.logits, full.logits)


@pytest.mark.parametrize("positions", [None, [0, 1, 3, 4, 7, 8, 10, 15, 16, 20]])
def test_mtp_recomputed_from_its_definition(positions):
    """MTP depth 1 = lm_head(shared_head.norm(Block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])))) with h the
    main output after the final norm and the RoPE position of i (SPEC §5.1, §5.2). Non-affine positions
    tell "position of i" from "position of i+1" (RoPE is invariant to a constant shift)."""
    cfg = tiny_cfg(num_nextn_predict_layers=1)
    model = make_model(cfg, bias_std=0.3)
    with torch.no_grad():
        for n in (model.mtp[0].enorm, model.mtp[0].hnorm, model.mtp[0].shared_head.norm, model.norm):
            n.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(n.weight)))
    ids = rand_ids(cfg, 2, 10)
    T = ids.shape[1]
    mod = model.mtp[0]
    pos = torch.arange(T) if positions is None else torch.tensor(positions)
    with torch.no_grad():
        out = model(ids, None if positions is None else pos)
        emb = model.embed_tokens(ids[:, 1:])
        D = cfg.hidden_size
        W = mod.eh_proj.weight
        x = mod.enorm(emb) @ W[:, :D].T + mod.hnorm(out.hidden[:, :-1]) @ W[:, D:].T  # embedding first
        assert torch.allclose(x, mod.combine(emb, out.hidden[:, :-1]), atol=1e-6)
        cos, sin = rope.cos_sin(pos[: T - 1].unsqueeze(0), model.rope_inv_freq)
        h, _ = mod(x, cos, sin)
        want = model.lm_head(mod.shared_head.norm(h))
    assert torch.allclose(out.mtp_logits[0], want, atol=1e-5)
    # the MTP module has its own output norm: scaling it changes the MTP logits only
    with torch.no_grad():
        mod.shared_head.norm.weight.mul_(2.0)
        out2 = model(ids, None if positions is None else pos)
    assert torch.equal(out2.logits, out.logits)
    assert not torch.allclose(out2.mtp_logits[0], out.mtp_logits[0])


def test_main_logits_are_causal(model):
    cfg = model.config
    ids = rand_ids(cfg, 2, 12)
    j = 7
    ids2 = ids.clone()
    ids2[:, j] = (ids2[:, j] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


def test_mtp_logits_are_causal():
    """mtp_logits[k-1][:, i] depends on tokens 0..i+k only."""
    cfg = tiny_cfg(num_nextn_predict_layers=2)
    model = make_model(cfg, bias_std=0.3)
    ids = rand_ids(cfg, 2, 12)
    for j in (5, 9):
        ids2 = ids.clone()
        ids2[:, j] = (ids2[:, j] + 3) % cfg.vocab_size
        with torch.no_grad():
            a, b = model(ids).mtp_logits, model(ids2).mtp_logits
        for k in (1, 2):
            i0 = j - k  # the first position whose input includes token j
            assert torch.allclose(a[k - 1][:, :i0], b[k - 1][:, :i0], atol=1e-6), (j, k)
            assert (a[k - 1][:, i0] - b[k - 1][:, i0]).abs().max() > 1e-4, (j, k)


def test_batch_rows_are_independent(model):
    """No capacity limit and no token dropping: a sequence's logits do not depend on its batch mates."""
    ids = rand_ids(model.config, 3, 10)
    with torch.no_grad():
        batched = model(ids)
        alone = model(ids[1:2])
    assert torch.allclose(batched.logits[1:2], alone.logits, atol=1e-5)
    assert torch.allclose(batched.mtp_logits[0][1:2], alone.mtp_logits[0], atol=1e-5)


def test_grouped_and_loop_models_agree(model):
    ids = rand_ids(model.config, 2, 10)
    outs = []
    for impl in ("grouped", "loop"):
        model.set_experts_impl(impl)
        with torch.no_grad():
            outs.append(model(ids))
    assert torch.allclose(outs[0].logits, outs[1].logits, atol=1e-5)
    assert torch.allclose(outs[0].mtp_logits[0], outs[1].mtp_logits[0], atol=1e-5)
    assert torch.equal(outs[0].expert_counts, outs[1].expert_counts)


def test_every_parameter_gets_a_gradient(model):
    ids = rand_ids(model.config, 2, 12)
    out = model(ids, with_balance=True)
    loss = out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean() + out.balance
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_input_must_be_ids_or_hidden(model):
    with pytest.raises(ValueError, match=r"token ids \(batch, seq\) or a hidden state"):
        model(torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# partial models: a pipeline stage is the model minus some modules, running the same forward

SPLIT = [dict(layers=[0, 1], embed=True), dict(layers=[2]), dict(layers=[3], embed=True, head=True, mtp=True)]


def _chain(parts, ids, **kw):
    """The parts one after the other, as a pipeline runs them: -> (last output, all outputs)."""
    outs, x = [], ids
    for p in parts:
        outs.append(p(x, tokens=ids, **kw))
        x = outs[-1].hidden
    return outs[-1], outs


def test_parts_chained_equal_the_full_model():
    """Three parts (embedding + layers 0-1 | layer 2 | layer 3 + head + 2 MTP modules) chained give
    the full model's logits, MTP logits and expert counts bit for bit (the same ops on the same
    tensors), the balance terms summed per part (another fp32 summation order: one ulp of the ~5.2
    total, 4.8e-7 measured), and the same gradients (the embedding is looked up twice, by the first
    and the last part, its two gradients summed in another order: 1e-6)."""
    cfg = tiny_cfg(num_hidden_layers=4, num_nextn_predict_layers=2)
    model = make_model(cfg, bias_std=0.3)
    ids = rand_ids(cfg, 2, 11)
    full = model(ids, with_balance=True)
    parts = [model.part(**kw) for kw in SPLIT]
    last, outs = _chain(parts, ids, with_balance=True)
    assert [o.logits is None for o in outs] == [True, True, False]
    assert torch.equal(last.logits, full.logits) and torch.equal(last.hidden, full.hidden)
    assert len(last.mtp_logits) == 2 and all(torch.equal(a, b) for a, b in zip(last.mtp_logits, full.mtp_logits))
    # rows: part 0 holds MoE layer 1, part 1 layer 2, part 2 layer 3 and the two MTP blocks
    assert [o.expert_counts.shape[0] for o in outs] == [1, 1, 3]
    assert torch.equal(torch.cat([o.expert_counts for o in outs]), full.expert_counts)
    balance = sum(o.balance for o in outs)
    torch.testing.assert_close(balance, full.balance, rtol=0, atol=1e-6)

    def loss(o, bal):
        return o.logits.logsumexp(-1).mean() + sum(lg.logsumexp(-1).mean() for lg in o.mtp_logits) + bal

    grads = {}
    for tag, out, bal in (("full", full, full.balance), ("parts", last, balance)):
        model.zero_grad(set_to_none=True)
        loss(out, bal).backward()
        grads[tag] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["full"].items():
        torch.testing.assert_close(grads["parts"][n], g, rtol=0, atol=1e-6, msg=n)


def test_part_holds_the_same_modules_under_the_same_names():
    """A part shares the model's module objects (so FP8 swaps and compiled blocks carry over), keeps
    global layer indices (None where not held) and the state-dict names; the parts of a split cover
    the model's state dict; helpers that iterate blocks see the held ones only."""
    cfg = tiny_cfg(num_hidden_layers=4, num_nextn_predict_layers=2)
    model = make_model(cfg)
    parts = [model.part(**kw) for kw in SPLIT]
    p0, p1, p2 = parts
    assert len(p1.layers) == 4 and p1.layers[2] is model.layers[2]
    assert p1.layers[0] is None and p1.layers[3] is None and p1.embed_tokens is None and p1.norm is None
    assert p2.embed_tokens is model.embed_tokens and p2.lm_head is model.lm_head
    assert all(a is b for a, b in zip(p2.mtp, model.mtp)) and len(p0.mtp) == 0
    full = model.state_dict()
    keys = [set(p.state_dict()) for p in parts]
    assert keys[1] == {k for k in full if k.startswith("layers.2.")}
    assert set().union(*keys) == set(full)
    for p in parts:
        for k, v in p.state_dict().items():
            assert v.data_ptr() == full[k].data_ptr(), k  # the model's tensors, not copies
    assert [id(r) for r in p2.routers()] == [id(b.mlp.gate) for b in [model.layers[3], *model.mtp]]
    p1.set_recompute("full")
    assert model.layers[2].recompute == "full" and model.layers[1].recompute == "none"
    assert p2.rope_inv_freq.dtype == torch.float32 and not p2.rope_inv_freq.is_meta
    assert not any(t.is_meta for p in parts for t in [*p.parameters(), *p.buffers()])


def test_part_boundary_dtypes_under_autocast():
    """What the pipeline's static stage metadata assumes: under bf16 autocast the hidden state a
    part hands on stays in the parameters' dtype (fp32), only the logits come out in bf16."""
    cfg = tiny_cfg(num_hidden_layers=4, num_nextn_predict_layers=2)
    model = make_model(cfg)
    ids = rand_ids(cfg, 2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        last, outs = _chain([model.part(**kw) for kw in SPLIT], ids)
    assert [o.hidden.dtype for o in outs[:2]] == [torch.float32, torch.float32]
    assert last.logits.dtype == torch.bfloat16 and {lg.dtype for lg in last.mtp_logits} == {torch.bfloat16}


def test_part_errors_name_the_missing_piece():
    cfg = tiny_cfg(num_hidden_layers=4, num_nextn_predict_layers=1)
    model = make_model(cfg)
    ids = rand_ids(cfg, 2, 9)
    h = torch.zeros(2, 9, cfg.hidden_size)
    with pytest.raises(ValueError, match="holds no embedding"):
        model.part([2])(ids)
    with pytest.raises(ValueError, match="pass tokens="):
        model.part([3], embed=True, head=True, mtp=True)(h)
    with pytest.raises(ValueError, match="mtp=True needs embed=True and head=True"):
        model.part([3], head=True, mtp=True)
    with pytest.raises(ValueError, match="outside 0..3"):
        model.part([4])


# ------------------------------------------------------------------------------------------------
# construction and initialisation

def test_build_model_deterministic_per_seed():
    cfg = tiny_cfg()
    a, b, c = build_model(cfg, seed=1), build_model(cfg, seed=1), build_model(cfg, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    random_keys = [k for k in sa if sa[k].dim() >= 2]
    assert random_keys
    for k in random_keys:
        assert not torch.equal(sa[k], sc[k]), k


def test_build_model_leaves_global_rng_alone():
    """Construction happens on meta and init uses its own generator: the global RNG is untouched."""
    torch.manual_seed(1234)
    expect = torch.rand(4)
    torch.manual_seed(1234)
    build_model(tiny_cfg(), seed=3)
    assert torch.equal(torch.rand(4), expect)


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        m = Transformer(tiny_cfg())
    assert all(p.is_meta for p in m.parameters())
    assert all(b.is_meta for b in m.buffers())


def test_init_statistics():
    cfg = tiny_cfg(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   initializer_range=0.02)
    model = build_model(cfg, seed=0)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert abs(p.float().mean().item()) < 0.002, name
            assert p.float().std().item() == pytest.approx(0.02, rel=0.1), name
        else:
            assert torch.all(p == 1.0), name  # every 1-D parameter is an RMSNorm gain
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.02)  # 16K samples
    for r in model.routers():
        assert torch.all(r.e_score_correction_bias == 0)
    assert torch.equal(model.rope_inv_freq, rope.inv_freq(cfg))
    # explicit std overrides initializer_range
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.3, rel=0.02)
    # the paper's std at the paper's width; the tiny preset's own (bench/main_job.py: 0.04 at width 192)
    assert preset("671b").initializer_range == 0.006 and preset("small").initializer_range == 0.006
    assert preset("tiny").initializer_range == 0.04


def test_norm_count():
    cfg = tiny_cfg(num_hidden_layers=3, num_nextn_predict_layers=1)
    model = build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    # 4 per block (attn, ffn, q latent, kv latent) x 4 blocks + final + enorm, hnorm, shared_head.norm
    assert len(norms) == 4 * 4 + 1 + 3


def test_q_lora_rank_none():
    cfg = tiny_cfg(q_lora_rank=None)
    model = make_model(cfg, bias_std=0.3)
    attn = model.layers[0].self_attn
    assert hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj") and not hasattr(attn, "q_b_proj")
    assert attn.q_proj.weight.shape == (cfg.num_attention_heads * cfg.qk_head_dim, cfg.hidden_size)
    out = model(rand_ids(cfg, 2, 6))
    out.logits.sum().backward()
    assert attn.q_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# positions and masks

def test_default_positions_equal_explicit(model):
    ids = rand_ids(model.config, 2, 10)
    with torch.no_grad():
        a = model(ids)
        b = model(ids, torch.arange(10))
        c = model(ids, torch.arange(10).expand(2, 10))
    for o in (b, c):
        assert torch.equal(a.logits, o.logits)
        assert torch.equal(a.mtp_logits[0], o.mtp_logits[0])


@pytest.mark.parametrize("rope_scaling", [None, yarn(4.0, 32)])
def test_rope_is_relative(rope_scaling):
    """Shifting every position by a constant leaves attention scores (hence logits) unchanged;
    other position changes do change them."""
    cfg = tiny_cfg(rope_scaling=rope_scaling, max_position_embeddings=256)
    model = make_model(cfg, bias_std=0.3)
    ids = rand_ids(cfg, 2, 10)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, torch.arange(10) + 37).logits
        c = model(ids, torch.arange(10) * 3).logits
    assert torch.allclose(a, b, atol=2e-4)
    assert (a - c).abs().max() > 1e-2


def test_causal_bool_mask_equals_none(model):
    T = 10
    ids = rand_ids(model.config, 2, T)
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(2, 1, T, T)
    with torch.no_grad():
        a, b = model(ids), model(ids, attn_mask=mask)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.mtp_logits[0], b.mtp_logits[0], atol=1e-5)
    # a mask that is not causal does change the result (the mask is really used)
    full = torch.ones(2, 1, T, T, dtype=torch.bool)
    with torch.no_grad():
        c = model(ids, attn_mask=full)
    assert (a.logits - c.logits).abs().max() > 1e-3


def test_packed_documents_with_block_mask(model):
    """Two documents packed with a block-diagonal causal mask and restarted positions give the same
    main logits as each document alone."""
    cfg = model.config
    d1, d2 = rand_ids(cfg, 1, 6, seed=1), rand_ids(cfg, 1, 9, seed=2)
    ids = torch.cat([d1, d2], 1)
    T = ids.shape[1]
    doc = torch.tensor([0] * 6 + [1] * 9)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    pos = torch.cat([torch.arange(6), torch.arange(9)])
    with torch.no_grad():
        packed = model(ids, pos.unsqueeze(0), attn_mask=mask.view(1, 1, T, T), with_mtp=False).logits
        a = model(d1, with_mtp=False).logits
        b = model(d2, with_mtp=False).logits
    assert torch.allclose(packed[:, :6], a, atol=1e-5)
    assert torch.allclose(packed[:, 6:], b, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# RoPE and YaRN

@pytest.mark.parametrize("rope_scaling", [None, yarn(4.0, 64)])
def test_apply_rope_matches_complex_rotation(rope_scaling):
    cfg = tiny_cfg(qk_rope_head_dim=16, rope_scaling=rope_scaling)
    B, T, H, dim = 2, 11, 3, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, dim, generator=g)
    pos = torch.randint(0, 300, (B, T), generator=g)
    freqs = rope.inv_freq(cfg)
    cos, sin = rope.cos_sin(pos, freqs)
    got = rope.apply_rope(x, cos, sin)
    # reference: adjacent pairs as complex numbers times e^{i·pos·θ_j}, in float64
    xc = torch.view_as_complex(x.double().reshape(B, T, H, dim // 2, 2))
    angle = pos.double()[..., None] * freqs.double()  # (B, T, dim/2)
    rot = torch.polar(torch.ones_like(angle), angle).unsqueeze(2)  # (B, T, 1, dim/2)
    want = torch.view_as_real(xc * rot).reshape(B, T, H, dim)
    assert torch.allclose(got.double(), want, atol=2e-5)
    # the rope-of-a-pair is a rotation: norms per pair are kept
    assert torch.allclose(got.view(B, T, H, -1, 2).norm(dim=-1), x.view(B, T, H, -1, 2).norm(dim=-1), atol=1e-5)
    # dtype in = dtype out, computed in fp32
    assert rope.apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_yarn_inv_freq_671b():
    cfg = preset("671b")
    f = rope.inv_freq(cfg)
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert f.shape == (32,) and f.dtype == torch.float32
    assert torch.allclose(f[:11].double(), base[:11], rtol=1e-6)  # j <= 10 unchanged
    assert torch.allclose(f[23:].double(), base[23:] / 40, rtol=1e-6)  # j >= 23 interpolated by 1/40
    for j in range(11, 23):  # linear blend in between, ramp (j - 10) / 13
        r = (j - 10) / 13
        assert f[j].item() == pytest.approx(base[j].item() * (1 - r) + base[j].item() / 40 * r, rel=1e-6)
        assert base[j] / 40 < f[j] < base[j]
    # the correction range of SPEC §3.3
    corr = lambda rot: 64 * math.log(4096 / (2 * math.pi * rot)) / (2 * math.log(10000))
    assert (math.floor(corr(32)), math.ceil(corr(1))) == (10, 23)


def test_softmax_scale_and_cos_sin_factor():
    cfg = preset("671b")
    assert softmax_scale(cfg) == pytest.approx(0.1352338, abs=1e-7)
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert rope.cos_sin_factor(cfg) == 1.0
    plain = tiny_cfg()  # no YaRN: plain 1/sqrt(d) and no cos/sin factor
    assert softmax_scale(plain) == plain.qk_head_dim ** -0.5
    assert rope.cos_sin_factor(plain) == 1.0
    # mscale != mscale_all_dim: cos/sin are scaled by the ratio (HF attention_factor, vLLM mscale)
    s = 4.0
    c = tiny_cfg(rope_scaling=yarn(s, 32, mscale=0.707, mscale_all_dim=1.0))
    assert rope.cos_sin_factor(c) == pytest.approx((0.1 * 0.707 * math.log(s) + 1) / (0.1 * math.log(s) + 1))
    assert softmax_scale(c) == pytest.approx(c.qk_head_dim ** -0.5 * (0.1 * math.log(s) + 1) ** 2)
    # neither given: cos/sin factor 0.1 ln s + 1, softmax scale untouched (HF and vLLM agree here)
    bare = tiny_cfg(rope_scaling={"type": "yarn", "factor": s, "original_max_position_embeddings": 32})
    assert rope.cos_sin_factor(bare) == pytest.approx(0.1 * math.log(s) + 1)
    assert softmax_scale(bare) == bare.qk_head_dim ** -0.5
    # the model uses them
    m = build_model(c)
    assert all(mla.scale == softmax_scale(c) for mla in m.modules() if isinstance(mla, MLA))
    assert m.rope_factor == rope.cos_sin_factor(c)


def test_yarn_inv_freq_tiny_ramp():
    """A tiny YaRN config whose ramp has fractional values, against the SPEC §3.3 formula."""
    cfg = tiny_cfg(qk_rope_head_dim=16, rope_scaling=yarn(4.0, 64), max_position_embeddings=256)
    dim, L0, s = 16, 64, 4.0
    corr = lambda rot: dim * math.log(L0 / (2 * math.pi * rot)) / (2 * math.log(10000.0))
    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
    f = rope.inv_freq(cfg)
    ramps = []
    for j in range(dim // 2):
        base = 10000.0 ** (-2 * j / dim)
        r = min(max((j - low) / (high - low), 0.0), 1.0)
        ramps.append(r)
        assert f[j].item() == pytest.approx(base * (1 - r) + base / s * r, rel=1e-6)
    assert any(0 < r < 1 for r in ramps) and ramps[0] == 0 and ramps[-1] == 1


def test_rope_buffer_fp32_after_cast():
    cfg = tiny_cfg(rope_scaling=yarn(4.0, 32))
    m = build_model(cfg).to(torch.bfloat16)
    assert m.rope_inv_freq.dtype == torch.float32
    assert torch.equal(m.rope_inv_freq, rope.inv_freq(cfg))
    m2 = build_model(cfg, dtype=torch.bfloat16)
    assert m2.rope_inv_freq.dtype == torch.float32 and torch.equal(m2.rope_inv_freq, rope.inv_freq(cfg))


@pytest.mark.parametrize("q_lora", [True, False])
def test_recompute_policies_give_identical_gradients(q_lora):
    """Selective (RMSNorms + MLA up-projections, paper §3.2.2) and full recomputation re-run the same
    ops in the backward: loss and every gradient equal the stored-activation run exactly (fp32, CPU);
    and the checkpointed regions really run twice (forward-call counts)."""
    from dsv3.training.loss import compute_loss

    cfg = tiny_cfg(q_lora_rank=24 if q_lora else None, num_nextn_predict_layers=1)
    x = rand_ids(cfg, 2, 13, seed=4)
    res = {}
    for policy in ("none", "selective", "full"):
        m = make_model(cfg, seed=1, bias_std=0.2)
        m.set_recompute(policy)
        calls = []
        h = m.layers[1].self_attn.kv_a_layernorm.register_forward_hook(lambda *a: calls.append(1))
        loss = compute_loss(m(x[:, :-1], with_balance=True), x[:, 1:], 0.3, 1e-2).total
        loss.backward()
        h.remove()
        res[policy] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
                      len(calls))
    base_loss, base_g, base_calls = res["none"]
    assert base_calls == 1
    for policy in ("selective", "full"):
        loss, g, calls = res[policy]
        assert calls == 2, policy  # recomputed in the backward
        assert torch.equal(loss, base_loss)
        assert g.keys() == base_g.keys()
        for n in g:
            torch.testing.assert_close(g[n], base_g[n], rtol=0, atol=1e-6, msg=f"{policy}: {n}")
    with pytest.raises(ValueError, match="recompute"):
        make_model(cfg).set_recompute("some")


def test_init_does_not_depend_on_what_a_process_holds():
    """init_weights(seed=...) draws every tensor (each routed expert) from a generator of its own: a part of
    the model built on the meta device, with an expert slice, allocated and initialised alone (a pipeline
    rank's stage) equals the same tensors of the whole model built with that seed, and another seed differs."""
    from tests.distributed.harness import tiny_cfg

    cfg = tiny_cfg()
    whole = dict(build_model(cfg, seed=3).named_parameters())
    other = dict(build_model(cfg, seed=4).named_parameters())
    part = build_model(cfg, device="meta", seed=3).part([2], embed=True, head=True, mtp=True)
    assert next(part.parameters()).is_meta
    for b in part.blocks():
        if hasattr(b.mlp, "experts"):
            b.mlp.experts.keep_experts(4, 4)  # experts 4..7 of 8
    part = part.to_empty(device="cpu")
    part.init_weights(seed=3)
    names = dict(part.named_parameters())
    assert any("experts" in n for n in names) and any(n.startswith("mtp.") for n in names)
    for n, p in names.items():
        w = whole[n] if p.shape == whole[n].shape else whole[n][4:8]
        assert torch.equal(p, w), n
        if p.dim() >= 2:
            assert not torch.equal(w, other[n] if p.shape == other[n].shape else other[n][4:8]), n
    assert torch.equal(part.rope_inv_freq, build_model(cfg, seed=3).rope_inv_freq)


def test_full_recompute_in_a_fresh_process():
    """`--recompute full` in a new process: the one-time CPU grouped-GEMM check used to run inside the first
    checkpointed block's forward (its saved tensors then differ from the recomputation's: torch's CheckpointError,
    found by an audit of the CLI); it now runs when a MoE is built, also under the meta device and no_grad."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from dsv3.model import moe\n"
        "from conftest import make_model, rand_ids, tiny_cfg\n"
        "cfg = tiny_cfg()\n"
        "m = make_model(cfg, seed=1)\n"
        "m.set_recompute('full')\n"
        "x = rand_ids(cfg, 2, 9, seed=0)\n"
        "m(x).logits.float().square().mean().backward()\n"
        "moe._CPU_GROUPED = None\n"
        "with torch.device('meta'), torch.no_grad():\n"
        "    moe.MoE(cfg)\n"
        "seen = moe._CPU_GROUPED\n"
        "moe._CPU_GROUPED = None\n"
        "assert seen is not None and moe._cpu_grouped_mm_works() is seen  # as in a plain context\n"
        "print('ok')\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
