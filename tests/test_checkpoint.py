"""Checkpoint format (SPEC §6): FP8 block quantisation, official-layout checkpoints written by
`save_pretrained(fp8=True)` and by hand with safetensors (sharded, scales in other shards, MTP at layer
num_hidden_layers with its embed/head copies), sharding, and every refusal path.

Run: python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import dsv3
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3.checkpoints.hf import CheckpointError, load_pretrained, save_pretrained
from dsv3.config import ConfigError
from dsv3.kernels import act_dequant, act_quant, weight_dequant, weight_quant
from conftest import make_model, rand_ids, tiny_cfg

E4M3_MAX = 448.0
FP8_LOGIT_TOL = 0.15  # relative (Frobenius) logit error of an FP8 checkpoint vs the fp32 model


# ------------------------------------------------------------------------------------------------
# FP8 128x128 block quantisation

def blocks(rows, cols, b=128):
    for i in range(0, rows, b):
        for j in range(0, cols, b):
            yield i // b, j // b, slice(i, min(i + b, rows)), slice(j, min(j + b, cols))


@pytest.mark.parametrize("shape", [(300, 200), (576, 256), (128, 128), (129, 257), (1, 5), (192, 576)])
def test_weight_quant_round_trip(shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(shape, generator=g) * 0.05
    w[: min(shape[0], 128), : min(shape[1], 128)] *= 20  # blocks with very different ranges
    q, s = weight_quant(w)
    rows, cols = shape
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert s.dtype == torch.float32 and s.shape == (-(-rows // 128), -(-cols // 128))  # ceil-sized grid
    d = weight_dequant(q, s, dtype=torch.float32)
    assert d.shape == shape and d.dtype == torch.float32
    for bi, bj, r, c in blocks(rows, cols):
        blk, qb, err = w[r, c], q[r, c].float(), (w[r, c] - d[r, c]).abs()
        amax = blk.abs().max()
        assert s[bi, bj].item() == pytest.approx((amax / E4M3_MAX).item(), rel=1e-6)
        assert qb.abs().max().item() == E4M3_MAX  # the block's largest element uses the full range
        # worst case: half an ulp of the top binade [256, 448] (ulp 32) relative to amax = 16/448 < 2^-3
        assert (err.max() / amax).item() <= 16 / 448 + 1e-6
        # per element: 3 mantissa bits -> relative error <= 2^-4 for normal values, plus half of the
        # smallest subnormal (2^-10) in scaled units
        assert torch.all(err <= blk.abs() * 2.0 ** -4 + s[bi, bj] * 2.0 ** -10 + 1e-12)
        assert (err.norm() / blk.norm()).item() < 0.04  # typical error is far below the worst case
    # re-quantising the dequantised weight is lossless
    q2, s2 = weight_quant(d)
    assert torch.equal(s2, s) and torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_weight_quant_zero_block_and_dequant_formula():
    w = torch.zeros(200, 130)
    w[150:, 129] = torch.linspace(-3, 3, 50)  # only block (1, 1) is non-zero, and it is a 72x2 edge block
    q, s = weight_quant(w)
    d = weight_dequant(q, s, dtype=torch.float32)
    assert torch.all(d[:128] == 0) and torch.all(d[:, :128] == 0)
    assert s[1, 1].item() == pytest.approx(3 / 448)
    assert torch.allclose(d, w, atol=3 / 448 * 16)
    # dequant is exactly fp8 * scale_inv[r // 128, c // 128] (scale_inv is the multiplier)
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(300, 200, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2, generator=g) + 0.1
    d = weight_dequant(q, s, dtype=torch.float32)
    for r in (0, 127, 128, 255, 256, 299):
        for c in (0, 127, 128, 199):
            assert d[r, c].item() == (q[r, c].float() * s[r // 128, c // 128]).item()  # one fp32 multiply
    assert weight_dequant(q, s).dtype == torch.bfloat16  # default output dtype


def test_weight_quant_shape_errors():
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        weight_dequant(torch.zeros(300, 200).to(torch.float8_e4m3fn), torch.ones(2, 2))
    with pytest.raises(ValueError, match="2-D"):
        weight_quant(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="2-D"):
        weight_dequant(torch.zeros(4).to(torch.float8_e4m3fn), torch.ones(1))


def test_act_quant_tiles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 300, generator=g)
    x[..., 200:] *= 100
    q, s = act_quant(x)
    assert q.shape == x.shape and s.shape == (3, 5, 3) and q.dtype == torch.float8_e4m3fn
    for t, sl in enumerate([slice(0, 128), slice(128, 256), slice(256, 300)]):
        assert torch.allclose(s[..., t], x[..., sl].abs().amax(-1).clamp_min(1e-4) / 448)
    d = act_dequant(q, s)
    assert torch.all((d - x).abs() <= x.abs() * 2.0 ** -4 + s.repeat_interleave(128, -1)[..., :300] * 2.0 ** -10)
    _, s8 = act_quant(x, scale_fmt="ue8m0")  # power-of-two scales, rounded up
    assert torch.equal(torch.exp2(torch.log2(s8).round()), s8) and torch.all(s8 >= s)


# ------------------------------------------------------------------------------------------------
# a ragged FP8-sized tiny model: hidden 192 (1.5 blocks), kv_a 576 rows (4.5 blocks), experts 144 wide

def fp8_cfg(**kw):
    base = dict(vocab_size=160, hidden_size=192, intermediate_size=320, moe_intermediate_size=144,
                num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                q_lora_rank=96, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, initializer_range=0.05,
                num_nextn_predict_layers=1)
    base.update(kw)
    return tiny_cfg(**base)


def official_names(cfg) -> list[str]:
    """The tensor names of an official checkpoint for `cfg`, written out from SPEC §6.2 (no scales)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    n = cfg.num_hidden_layers
    for L in range(n + cfg.num_nextn_predict_layers):
        p = f"model.layers.{L}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "self_attn.kv_a_proj_with_mqa.weight", p + "self_attn.kv_a_layernorm.weight",
                  p + "self_attn.kv_b_proj.weight", p + "self_attn.o_proj.weight"]
        if cfg.q_lora_rank is None:
            names.append(p + "self_attn.q_proj.weight")
        else:
            names += [p + "self_attn.q_a_proj.weight", p + "self_attn.q_a_layernorm.weight",
                      p + "self_attn.q_b_proj.weight"]
        if L < cfg.first_k_dense_replace:
            names += [p + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        else:
            names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            names += [p + f"mlp.experts.{e}.{m}.weight" for e in range(cfg.n_routed_experts)
                      for m in ("gate_proj", "up_proj", "down_proj")]
            names += [p + f"mlp.shared_experts.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        if L >= n:
            names += [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight", p + "shared_head.norm.weight",
                      p + "embed_tokens.weight", p + "shared_head.head.weight"]
    return names


def official_tensor(model, name: str) -> torch.Tensor:
    """Read an official-named tensor out of a dsv3 model (test-side mapping, independent of checkpoint.py)."""
    cfg = model.config
    n = cfg.num_hidden_layers
    parts = name.split(".")
    if name == "lm_head.weight":
        return model.lm_head.weight
    if parts[1] in ("embed_tokens", "norm"):
        return getattr(model, parts[1]).weight
    L = int(parts[2])
    block = model.layers[L] if L < n else model.mtp[L - n]
    rest = parts[3:]
    if L >= n and rest[0] == "embed_tokens":
        return model.embed_tokens.weight
    if L >= n and rest[:2] == ["shared_head", "head"]:
        return model.lm_head.weight
    if rest[:2] == ["mlp", "experts"]:
        return getattr(block.mlp.experts, rest[3])[int(rest[2])]
    obj = block
    for a in rest:
        obj = getattr(obj, a)
    return obj


FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj"}


def is_fp8_name(name: str) -> bool:
    # SPEC §6.2 tables: the attention projections (kv_a_proj_with_mqa included, scale [5, 56] for 576
    # rows) and every FFN/expert matrix are FP8; embeddings, head, norms, router, bias and eh_proj are not
    parts = name.split(".")
    return parts[-1] == "weight" and parts[-2] in FP8_MODULES


def quantize_by_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-side FP8 quantiser with explicit block loops: scale_inv = amax/448, q = e4m3(w / scale_inv)."""
    rows, cols = w.shape
    s = torch.zeros(-(-rows // 128), -(-cols // 128))
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for bi, bj, r, c in blocks(rows, cols):
        s[bi, bj] = w[r, c].abs().max() / 448.0
        q[r, c] = (w[r, c] / s[bi, bj]).to(torch.float8_e4m3fn)
    return q, s


def dequantize_by_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(q.shape)
    for bi, bj, r, c in blocks(*q.shape):
        out[r, c] = q[r, c].float() * s[bi, bj]
    return out


def test_official_names_match_the_model():
    cfg = fp8_cfg()
    model = make_model(cfg)
    names = official_names(cfg)
    assert len(names) == len(set(names))
    # every learned tensor of the model appears exactly once (MTP copies aside)
    n_elems = sum(official_tensor(model, k).numel() for k in names
                  if not k.endswith(("layers.2.embed_tokens.weight", "shared_head.head.weight")))
    n_model = sum(p.numel() for p in model.parameters()) + sum(r.e_score_correction_bias.numel()
                                                               for r in model.routers())
    assert n_elems == n_model


def test_save_pretrained_fp8_layout(tmp_path):
    cfg = fp8_cfg()
    model = make_model(cfg, bias_std=0.3)
    save_pretrained(model, tmp_path, fp8=True)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                           "weight_block_size": [128, 128]}
    assert conf["torch_dtype"] == "float32"
    t = load_file(tmp_path / "model.safetensors")
    names = official_names(cfg)
    fp8 = [k for k in names if is_fp8_name(k)]
    assert set(t) == set(names) | {k + "_scale_inv" for k in fp8}
    for k in names:
        if k in fp8:
            assert t[k].dtype == torch.float8_e4m3fn, k
            rows, cols = t[k].shape
            assert t[k + "_scale_inv"].dtype == torch.float32
            assert t[k + "_scale_inv"].shape == (-(-rows // 128), -(-cols // 128)), k
        elif k.endswith("e_score_correction_bias"):
            assert t[k].dtype == torch.float32
        else:
            assert t[k].dtype == torch.float32, k
            assert torch.equal(t[k], official_tensor(model, k)), k
    assert t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)  # 576 x 192
    assert t["model.layers.2.eh_proj.weight"].dtype == torch.float32  # MTP eh_proj stays high precision
    assert torch.equal(t["model.layers.2.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(t["model.layers.2.shared_head.head.weight"], t["lm_head.weight"])
    for k in fp8:  # the stored values are the block quantisation of the weight
        q, s = quantize_by_blocks(official_tensor(model, k).detach())
        assert torch.equal(t[k + "_scale_inv"], s), k
        assert torch.equal(t[k].view(torch.uint8), q.view(torch.uint8)), k


def _fake_quantized_copy(model):
    """A copy of `model` whose FP8-stored matrices are replaced by their dequantised values."""
    ref = make_model(model.config)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for k in official_names(model.config):
            if is_fp8_name(k):
                dst = official_tensor(ref, k)
                dst.copy_(dequantize_by_blocks(*quantize_by_blocks(dst.detach().clone())))
    return ref


def test_fp8_save_load_round_trip(tmp_path):
    cfg = fp8_cfg()
    model = make_model(cfg, bias_std=0.3)
    save_pretrained(model, tmp_path, fp8=True)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.config.quantization_config["quant_method"] == "fp8"
    assert next(loaded.parameters()).dtype == torch.float32
    t = load_file(tmp_path / "model.safetensors")
    for k in official_names(cfg):
        got = official_tensor(loaded, k)
        if is_fp8_name(k):  # exactly the dequantised values
            assert torch.equal(got, dequantize_by_blocks(t[k], t[k + "_scale_inv"])), k
        else:
            assert torch.equal(got, official_tensor(model, k)), k
    ids = rand_ids(cfg, 2, 16)
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
        c = _fake_quantized_copy(model)(ids)
    # identical to the fake-quantised original ...
    assert torch.allclose(b.logits, c.logits, atol=1e-5)
    assert torch.allclose(b.mtp_logits[0], c.mtp_logits[0], atol=1e-5)
    # ... and within FP8 noise of the full-precision one: each quantised matrix adds ~2.6% relative
    # (RMS) error for Gaussian weights, about ten of them compound along a path in this model (~9%)
    rel = (a.logits - b.logits).norm() / a.logits.norm()
    assert 0 < rel < FP8_LOGIT_TOL


def _write_official_checkpoint(tmp_path, model, shard_of, dtype=torch.bfloat16, copies=None):
    """Hand-written official layout: FP8 *_proj + weight_scale_inv, BF16 rest, FP32 bias, a sharded index
    with the placement given by shard_of(name) -> shard number."""
    cfg = model.config
    tensors = {}
    for k in official_names(cfg):
        w = official_tensor(model, k).detach()
        if copies and k in copies:
            w = copies[k]
        if is_fp8_name(k):
            tensors[k], tensors[k + "_scale_inv"] = quantize_by_blocks(w)
        elif k.endswith("e_score_correction_bias"):
            tensors[k] = w.float().contiguous()
        else:
            tensors[k] = w.to(dtype).contiguous()
    shards = {}
    for k, v in tensors.items():
        shards.setdefault(shard_of(k), {})[k] = v
    nshard = max(shards)
    weight_map = {}
    for i, part in shards.items():
        fname = f"model-{i:05d}-of-{nshard:05d}.safetensors"
        save_file(part, tmp_path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
         "weight_map": weight_map}))
    conf = cfg.to_dict()
    conf.update(torch_dtype="bfloat16", quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})
    conf["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    return tensors, weight_map


def _scales_elsewhere(k):
    # scales live in shard 3 except layer 0's, which sit in shard 1 with the layer-1 weights; layer-0
    # weights are in shard 2; the MTP layer and globals in shard 1
    if k.endswith("_scale_inv"):
        return 1 if ".layers.0." in k else 3
    return 2 if ".layers.0." in k else 1


def test_hand_written_official_checkpoint(tmp_path):
    cfg = fp8_cfg()
    model = make_model(cfg, bias_std=0.3)
    tensors, weight_map = _write_official_checkpoint(tmp_path, model, _scales_elsewhere)
    k = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert weight_map[k] != weight_map[k + "_scale_inv"]
    assert tensors[k + "_scale_inv"].shape == (5, 2)

    loaded = load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.num_nextn_predict_layers == 1 and loaded.config.extra["auto_map"]
    for name in official_names(cfg):
        got = official_tensor(loaded, name)
        if is_fp8_name(name):
            want = dequantize_by_blocks(tensors[name], tensors[name + "_scale_inv"])
        else:
            want = tensors[name].float()
        assert torch.equal(got, want), name
    for r in loaded.routers():
        assert r.e_score_correction_bias.dtype == torch.float32
    ids = rand_ids(cfg, 2, 16)
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert 0 < (a.logits - b.logits).norm() / a.logits.norm() < FP8_LOGIT_TOL
    assert 0 < (a.mtp_logits[0] - b.mtp_logits[0]).norm() / a.mtp_logits[0].norm() < FP8_LOGIT_TOL

    # default dtype comes from config.json (bfloat16); the correction bias stays fp32
    bf = load_pretrained(tmp_path)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in bf.routers())
    assert torch.equal(bf.routers()[0].e_score_correction_bias, loaded.routers()[0].e_score_correction_bias)


def test_mtp_copies_that_differ_warn(tmp_path):
    cfg = fp8_cfg()
    model = make_model(cfg)
    other = model.embed_tokens.weight.detach() + 1.0
    _write_official_checkpoint(tmp_path, model, lambda k: 1,
                               copies={"model.layers.2.embed_tokens.weight": other})
    with pytest.warns(UserWarning, match=r"model\.layers\.2\.embed_tokens\.weight differs from model\.embed_tokens"):
        loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------------------------
# sharding

def _files(d):
    return sorted(f for f in os.listdir(d) if not f.startswith("."))


def test_sharded_save_and_resave(tmp_path):
    cfg = tiny_cfg()
    model = make_model(cfg, bias_std=0.3)
    ids = rand_ids(cfg, 2, 12)
    with torch.no_grad():
        ref = model(ids)

    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards1 = sorted(set(index["weight_map"].values()))
    assert len(shards1) > 3
    assert _files(tmp_path) == sorted(["config.json", "model.safetensors.index.json"] + shards1)
    total = 0
    for f in shards1:
        with safe_open(tmp_path / f, "pt") as h:
            for k in h.keys():
                assert index["weight_map"][k] == f
                t = h.get_tensor(k)
                total += t.numel() * t.element_size()
    assert total == index["metadata"]["total_size"]
    loaded = load_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = loaded(ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.mtp_logits[0], ref.mtp_logits[0])

    # re-save with a different sharding: the old shards are gone
    save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    index2 = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards2 = sorted(set(index2["weight_map"].values()))
    assert shards2 != shards1 and 1 < len(shards2) < len(shards1)
    assert _files(tmp_path) == sorted(["config.json", "model.safetensors.index.json"] + shards2)
    assert torch.equal(load_pretrained(tmp_path)(ids).logits, ref.logits)

    # unsharded: the index and every shard go
    save_pretrained(model, tmp_path)
    assert _files(tmp_path) == ["config.json", "model.safetensors"]
    assert torch.equal(load_pretrained(tmp_path)(ids).logits, ref.logits)

    # and back to sharded: model.safetensors goes
    save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    assert "model.safetensors" not in _files(tmp_path)
    assert torch.equal(load_pretrained(tmp_path)(ids).logits, ref.logits)


def test_bf16_save(tmp_path):
    cfg = tiny_cfg()
    model = make_model(cfg, bias_std=0.3)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    t = load_file(tmp_path / "model.safetensors")
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(t["model.layers.1.mlp.gate.e_score_correction_bias"],
                       model.layers[1].mlp.gate.e_score_correction_bias)
    loaded = load_pretrained(tmp_path)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))


def test_save_without_mtp_copies(tmp_path):
    model = make_model(tiny_cfg())
    save_pretrained(model, tmp_path, mtp_copies=False)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.3.enorm.weight" in keys and "model.layers.3.embed_tokens.weight" not in keys
    load_pretrained(tmp_path)  # copies are optional on load


# ------------------------------------------------------------------------------------------------
# refusals

def _saved(tmp_path, **kw):
    model = make_model(tiny_cfg())
    save_pretrained(model, tmp_path, **kw)
    return model


def test_all_mismatches_in_one_error(tmp_path):
    _saved(tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    del t["model.layers.1.self_attn.kv_b_proj.weight"]  # missing
    t["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)  # unexpected
    t["model.layers.2.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 7)  # mis-shaped
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(tmp_path)
    msg = str(ei.value)
    assert "missing tensors (1)" in msg and "model.layers.1.self_attn.kv_b_proj.weight" in msg
    assert "unexpected tensors (1)" in msg and "model.layers.0.mlp.extra_proj.weight" in msg
    assert "mis-shaped tensors (1)" in msg and "model.layers.2.mlp.experts.3.up_proj.weight: checkpoint [5, 7]" in msg


def test_missing_fp8_scale(tmp_path):
    _saved(tmp_path, fp8=True)
    t = load_file(tmp_path / "model.safetensors")
    del t["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    t["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(3, 3)  # wrong scale grid
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(tmp_path)
    assert "model.layers.1.self_attn.o_proj.weight_scale_inv" in str(ei.value)
    assert "model.layers.0.mlp.down_proj.weight_scale_inv: checkpoint [3, 3], expected [1, 1]" in str(ei.value)


def test_partial_mtp_is_an_error_not_a_warning(tmp_path):
    _saved(tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    del t["model.layers.3.eh_proj.weight"]
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.eh_proj\.weight"):
        load_pretrained(tmp_path)


def test_mtp_tensors_with_config_without_mtp(tmp_path):
    _saved(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*\n.*model\.layers\.3\."):
        load_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    _saved(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(tmp_path)


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.path, "w"))


def test_pickle_only_directory_is_refused_unread(tmp_path, monkeypatch):
    _saved(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    marker = tmp_path / "UNPICKLED"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Trap(str(marker)), f)

    def boom(*a, **k):
        raise AssertionError("pickle must never be read")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    with pytest.raises(CheckpointError, match=r"pickle.*pytorch_model\.bin.*safetensors"):
        load_pretrained(tmp_path)
    assert not marker.exists()


def test_nonexistent_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope")


def test_corrupt_config(tmp_path):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_pretrained(tmp_path)


def test_index_naming_missing_shard(tmp_path):
    _saved(tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / gone)
    with pytest.raises(CheckpointError, match=gone):
        load_pretrained(tmp_path)


def test_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path):
    """A directory with both model.safetensors and an index: transformers' from_pretrained reads the single file
    (and its save_pretrained of one file over a sharded checkpoint deletes the shards but leaves the index), so dsv3
    reads the single file too, with a warning naming both. It read the index: another model from the same
    directory, or an error about shards transformers had deleted."""
    cfg = tiny_cfg()
    a, b = make_model(cfg, seed=1), make_model(cfg, seed=2)
    ids = rand_ids(cfg, 2, 8)
    save_pretrained(a, tmp_path, max_shard_bytes=60_000)  # the shards and their index
    save_file({k: v.contiguous() for k, v in load_file(_one_file(b, tmp_path / "b")).items()},
              tmp_path / "model.safetensors")  # another model's single file beside them
    with pytest.warns(UserWarning, match="holds both model.safetensors and model.safetensors.index.json: reading "
                                         "model.safetensors"):
        got = load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, b(ids).logits)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for f in set(index["weight_map"].values()):  # transformers' leftovers: the stale index alone
        os.remove(tmp_path / f)
    with pytest.warns(UserWarning, match="reading model.safetensors"):
        assert torch.equal(load_pretrained(tmp_path)(ids).logits, b(ids).logits)


def _one_file(model, path) -> str:
    save_pretrained(model, path)
    return str(path / "model.safetensors")


def test_config_without_a_dtype_loads_in_the_stored_dtype(tmp_path):
    """A config.json naming no torch_dtype (nor v5's dtype): the stored weights' dtype, as transformers' default
    dtype="auto" reads it, with a warning; it loaded as ModelConfig's default bfloat16, rounding fp32 weights. A
    config that names one, or an explicit dtype=, still decides."""
    cfg = tiny_cfg()
    model = make_model(cfg, bias_std=0.3)
    ids = rand_ids(cfg, 2, 8)
    save_pretrained(model, tmp_path)  # fp32 tensors
    d = json.loads((tmp_path / "config.json").read_text())
    assert d.pop("torch_dtype") == "float32"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="config.json names no torch_dtype: loading in the stored weights' float32"):
        got = load_pretrained(tmp_path)
    assert got.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(got(ids).logits, model(ids).logits)
    assert load_pretrained(tmp_path, dtype=torch.bfloat16).embed_tokens.weight.dtype == torch.bfloat16
    (tmp_path / "config.json").write_text(json.dumps({**d, "dtype": "bfloat16"}))
    assert load_pretrained(tmp_path).embed_tokens.weight.dtype == torch.bfloat16


def test_a_size_config_json_leaves_out_is_named_as_absent(tmp_path):
    """A config.json without hidden_size: the 671B default (7168) is taken, and the mismatch with the weights used to
    read "config.json says ... hidden_size=7168", a size the file never said; now it says the value is the default.
    A resume (checkpoint_config) refuses such a config by name (it failed as "the model needs 39.1 GB")."""
    from dsv3.training.strategy import checkpoint_config

    save_pretrained(make_model(tiny_cfg()), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    del d["hidden_size"], d["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=61 \(absent from it: the 671B default\) but "):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"config.json has no hidden_size, num_hidden_layers: a checkpoint's "):
        checkpoint_config(str(tmp_path))
    d["num_hidden_layers"] = tiny_cfg().num_hidden_layers
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"vocab_size=\d+, hidden_size=7168 \(absent from it: the 671B default\)"):
        load_pretrained(tmp_path)


def test_index_placing_a_tensor_in_a_shard_without_it(tmp_path):
    """An index that maps a tensor to an existing shard that does not hold it: an error naming the index, the
    tensor and the shard (safetensors' own 'File does not contain tensor' named neither)."""
    _saved(tmp_path, max_shard_bytes=60_000)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"]["lm_head.weight"])
    index["weight_map"]["lm_head.weight"] = wrong
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json maps 1 tensor\(s\) to shards that do "
                                              rf"not contain them: lm_head\.weight -> {wrong}"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("fp8", [False, True])
def test_tensors_of_other_dtypes_are_refused(tmp_path, fp8):
    """A weight stored as e5m2 (with the e4m3 format's scale beside it), an integer norm weight, and a block scale
    beside a weight that is not e4m3: each named, none cast silently into other numbers."""
    _saved(tmp_path, fp8=fp8)
    t = load_file(tmp_path / "model.safetensors")
    o, n = "model.layers.1.self_attn.o_proj.weight", "model.norm.weight"
    t[o] = t[o].to(torch.float8_e5m2)
    t[n] = t[n].round().to(torch.int64)
    if not fp8:  # a scale beside a bf16/fp32 weight: it would be ignored
        t["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(t, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(tmp_path)
    msg = str(ei.value)
    assert "tensors of other dtypes" in msg and f"{o}: F8_E5M2" in msg and f"{n}: I64" in msg, msg
    if fp8:
        assert f"{o}_scale_inv: a block scale, but {o} is F8_E5M2, not F8_E4M3" in msg, msg
    else:
        assert "model.layers.0.mlp.down_proj.weight_scale_inv: a block scale, but" in msg, msg


def test_saved_checkpoint_files_follow_the_umask(tmp_path):
    """safetensors and mkdtemp create 0600/0700 entries; checkpoints must be readable like any file."""
    import stat

    from dsv3.checkpoints.hf import save_pretrained, tempdir_beside

    cfg = dsv3.preset("tiny").replace(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                      v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    model = dsv3.build_model(cfg)
    old = os.umask(0o022)
    try:
        d = tempdir_beside(str(tmp_path / "ckpt"))
        save_pretrained(model, d)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(d, "model.safetensors")).st_mode) == 0o644


@pytest.mark.parametrize("fp8", [True, False])
def test_random_checkpoint_written_part_by_part_equals_the_whole_model(tmp_path, fp8):
    """save_random_pretrained (one part allocated at a time) writes what save_pretrained writes for the whole model
    built with the same seed: the same tensor names (MTP copies of the embedding and head included), equal values
    once loaded (FP8 blocks bit for bit), one shard per part; a second write over the first leaves no stale shard."""
    from dsv3.checkpoints.hf import save_random_pretrained
    from dsv3.model.transformer import build_model

    cfg = tiny_cfg(num_nextn_predict_layers=1)
    done = []
    r = save_random_pretrained(cfg, tmp_path / "parts", seed=5, fp8=fp8, progress=lambda i, n, name: done.append(name))
    assert done == ["embed_head", "layer_0", "layer_1", "layer_2", "mtp"] and r["shards"] == 5
    save_pretrained(build_model(cfg, seed=5), tmp_path / "whole", dtype=torch.bfloat16, fp8=fp8)

    def names(d):
        with open(d / "model.safetensors.index.json") as f:
            return set(json.load(f)["weight_map"]) if (d / "model.safetensors.index.json").exists() else None

    whole_names = set()
    for f in os.listdir(tmp_path / "whole"):
        if f.endswith(".safetensors"):
            with safe_open(str(tmp_path / "whole" / f), "pt") as h:
                whole_names |= set(h.keys())
    assert names(tmp_path / "parts") == whole_names and any(k.endswith("_scale_inv") for k in whole_names) == fp8
    a = load_pretrained(tmp_path / "parts", keep_fp8=fp8).state_dict()
    b = load_pretrained(tmp_path / "whole", keep_fp8=fp8).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    cfg2 = dsv3.ModelConfig.from_json(str(tmp_path / "parts"))
    assert cfg2.num_hidden_layers == cfg.num_hidden_layers and (cfg2.quantization_config is not None) == fp8
    small = cfg.replace(num_hidden_layers=2, first_k_dense_replace=1)
    assert save_random_pretrained(small, tmp_path / "parts", seed=5, fp8=fp8)["shards"] == 4
    assert sorted(f for f in os.listdir(tmp_path / "parts") if f.endswith(".safetensors")) == [
        f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    load_pretrained(tmp_path / "parts")


def test_random_checkpoint_head_rows_keep_greedy_ids_in_a_smaller_tokenizer(tmp_path):
    """head_rows (bench/random_checkpoint.py passes the tokenizer's size): the head's rows from there on are zero, in
    the main head and the MTP layer's official copy, so greedy decoding picks ids below it."""
    from dsv3.checkpoints.hf import save_random_pretrained

    cfg = tiny_cfg(num_nextn_predict_layers=1)
    save_random_pretrained(cfg, tmp_path, seed=1, fp8=False, head_rows=100)
    m = load_pretrained(tmp_path)
    assert (m.lm_head.weight[100:] == 0).all() and (m.lm_head.weight[:100] != 0).any()
    with safe_open(str(tmp_path / "model-00005-of-00005.safetensors"), "pt") as f:
        copy = f.get_tensor(f"model.layers.{cfg.num_hidden_layers}.shared_head.head.weight")
    assert (copy[100:] == 0).all()
    with torch.no_grad():
        assert (m(rand_ids(cfg)).logits.argmax(-1) < 100).all()


def test_random_checkpoint_head_rows_is_checked(tmp_path):
    from dsv3.checkpoints.hf import save_random_pretrained

    for bad in (0, -3, 10**9):
        with pytest.raises(ValueError, match="head_rows must be in 1..vocab_size"):
            save_random_pretrained(tiny_cfg(), tmp_path, head_rows=bad)
    assert not any(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize("shard_bytes", [20_000, None])
def test_interrupted_resave_leaves_the_previous_checkpoint(tmp_path, monkeypatch, shard_bytes):
    """A save over an existing checkpoint that fails after writing some files (here: a full disk on the second
    file) leaves the previous checkpoint loadable and whole: never a mix of old and new tensors, and no
    partial temporary files."""
    import dsv3.checkpoints.hf as hf

    cfg = tiny_cfg()
    old, new = make_model(cfg, seed=0), make_model(cfg, seed=1)
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    save_pretrained(old, tmp_path, **kw)
    before = _files(tmp_path)
    real, calls = hf.save_file, []

    def fail_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # a partial file, then the disk is full
                f.write(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", fail_second)
    with pytest.raises(OSError):
        save_pretrained(new, tmp_path, **{"max_shard_bytes": 20_000, **kw})
    monkeypatch.setattr(hf, "save_file", real)
    assert _files(tmp_path) == before  # no partial file left behind
    loaded = load_pretrained(tmp_path).state_dict()
    for k, v in old.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_v31_scale_fmt_survives_an_fp8_save_and_a_bad_one_is_named(tmp_path):
    """DeepSeek-V3.1's quantization_config.scale_fmt "ue8m0" (its activation scales rounded to powers of two) is kept
    when a model loaded from such a checkpoint is saved in FP8 again (it was dropped); a bf16 save writes no
    quantization_config; any other scale_fmt is refused by name."""
    cfg = fp8_cfg()
    model = make_model(cfg, bias_std=0.3)
    save_pretrained(model, tmp_path / "a", fp8=True)
    conf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "scale_fmt" not in conf["quantization_config"]
    conf["quantization_config"]["scale_fmt"] = "ue8m0"
    (tmp_path / "a" / "config.json").write_text(json.dumps(conf))
    loaded = load_pretrained(tmp_path / "a")
    save_pretrained(loaded, tmp_path / "b", fp8=True)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0"}
    save_pretrained(loaded, tmp_path / "c", fp8=False)
    assert "quantization_config" not in json.loads((tmp_path / "c" / "config.json").read_text())
    conf["quantization_config"]["scale_fmt"] = "e8m0"
    (tmp_path / "a" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="scale_fmt"):
        load_pretrained(tmp_path / "a")
