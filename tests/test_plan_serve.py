"""`dsv3 plan --serve` (issue 17, item 5): weights per GPU, latent KV-cache capacity, largest batch.
CPU, about a second (one small ragged FP8 model is built and quantised; the rest is arithmetic).

Run: python -m pytest tests/test_plan_serve.py -q
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import make_model, tiny_cfg
from dsv3.checkpoints.hf import quantize_model_fp8
from dsv3.cli import main
from dsv3.config import preset
from dsv3.inference.cache import PagedLatentCache
from dsv3.model import build_model
from dsv3.info import model_info, param_count
from dsv3.plan import GiB, PlanError
from dsv3.plan_serve import ServePlanConfig, plan_serve

H200 = 140  # GiB: nvidia-smi reports 143,771 MiB for the "141 GB" H200


@pytest.fixture(scope="module")
def v3():
    return preset("671b")


def ragged_cfg():
    """Sizes that are not multiples of the 128x128 FP8 blocks (hidden 192, kv_a 576 rows, experts 144)."""
    return tiny_cfg(vocab_size=160, hidden_size=192, intermediate_size=320, moe_intermediate_size=144,
                    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                    q_lora_rank=96, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                    n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                    num_nextn_predict_layers=1)


def test_bf16_single_gpu_totals_match_param_count():
    for name in ("tiny", "small", "16b", "671b"):
        cfg = preset(name)
        for mtp in (False, True):
            r = plan_serve(cfg, ServePlanConfig(weights="bf16", mtp=mtp), 1, 1e6, name)
            i = model_info(cfg)
            n = param_count(cfg) if mtp else i.total
            assert r.params_per_gpu == n and r.weight_bytes == 2 * n, (name, mtp)


def test_fp8_bytes_match_a_quantised_model():
    cfg = ragged_cfg()
    q = quantize_model_fp8(make_model(cfg))
    fp8_bytes = scale_bytes = other = 0
    for name, t in list(q.named_parameters()) + list(q.named_buffers()):
        if name not in q.state_dict():  # non-persistent buffers (RoPE tables)
            continue
        if t.dtype == torch.float8_e4m3fn:
            fp8_bytes += t.numel()
        elif name.endswith("scale_inv"):
            scale_bytes += t.numel() * t.element_size()
        else:
            other += t.numel()
    r = plan_serve(cfg, ServePlanConfig(weights="fp8", mtp=True), 1, 1e6)
    w = r.weights
    assert w["FP8 scales"] == scale_bytes
    assert w["routed experts"] + w["attention"] + w["dense FFN + shared experts"] == fp8_bytes
    assert w["norms, router, eh_proj"] + w["embedding + head"] == 2 * other  # the rest in bf16
    assert r.params_per_gpu == param_count(cfg) == fp8_bytes + other


def test_cache_bytes_per_token():
    cfg = ragged_cfg()
    model = make_model(cfg)
    r = plan_serve(cfg, ServePlanConfig(mtp=True), 1, 1e6)
    assert r.cache_bytes_per_token == PagedLatentCache.bytes_per_token(model, torch.bfloat16)
    r0 = plan_serve(cfg, ServePlanConfig(mtp=False), 1, 1e6)
    assert r0.cache_bytes_per_token == model_info(cfg).kv_latent_bytes
    # capacity arithmetic
    assert r0.cache_tokens_per_gpu == int(r0.free_bytes // r0.cache_bytes_per_token)
    assert r0.max_batch == int(r0.free_bytes // (4096 * r0.cache_bytes_per_token + cfg.vocab_size * 4))


def test_ep_halves_routed_experts_and_tp_splits_attention(v3):
    sc = ServePlanConfig()
    a, b = plan_serve(v3, sc, 8, 1e4), plan_serve(v3, sc, 16, 1e4)
    assert b.weights["routed experts"] * 2 == a.weights["routed experts"] and b.experts_per_gpu == 16
    assert b.weights["attention"] == a.weights["attention"]  # data-parallel attention: replicated
    assert b.cache_tokens_total > a.cache_tokens_total
    # redundant experts: (256 + 32) / 32 = 9 per GPU (the paper's prefill)
    p = plan_serve(v3, ServePlanConfig(attn_tp=4, redundant=32), 32, H200)
    assert p.experts_per_gpu == 9 and p.dp_groups == 8
    t1 = plan_serve(v3, ServePlanConfig(redundant=32), 32, H200)
    assert t1.weights["attention"] / 4 < p.weights["attention"] < t1.weights["attention"] / 2  # q_a, kv_a replicated
    # TP attention: the latent cache is replicated over the TP group, only 8 distinct caches
    assert p.cache_tokens_total == p.cache_tokens_per_gpu * 8


def test_671b_on_8_h200(v3):
    r = plan_serve(v3, ServePlanConfig(weights="fp8", mtp=False), 8, H200, "671b")
    assert 85 * GiB < r.weight_bytes < 100 * GiB and r.experts_per_gpu == 32
    assert r.cache_tokens_per_gpu > 100_000 and r.max_batch > 0
    # all experts of the 8 GPUs: about 656 GB of FP8 (+ scales) for the main model
    assert 650e9 < 8 * r.weights["routed experts"] < 660e9


def test_mtp_held_by_default_as_dsv3_serve_holds_it(v3):
    """The default plans what `dsv3 serve` loads from an official checkpoint: its MTP module's weights (a MoE layer:
    256 more experts) and its cache layer (PagedLatentCache.for_model: 61 + 1 layers, 71,424 bytes a token for the
    671B); --no-mtp (mtp=False) plans without them; --mtp on a model without MTP modules is refused."""
    r, r0 = plan_serve(v3, ServePlanConfig(), 8, H200), plan_serve(v3, ServePlanConfig(mtp=False), 8, H200)
    assert plan_serve(v3, ServePlanConfig(mtp=True), 8, H200).weight_bytes == r.weight_bytes
    assert (r.cache_layers, r0.cache_layers) == (62, 61) and r.cache_bytes_per_token == 71_424
    assert r.moe_layers == r0.moe_layers + 1 and r.weight_bytes > r0.weight_bytes
    tiny = preset("tiny")
    model = build_model(tiny, device="meta")
    assert plan_serve(tiny, ServePlanConfig(), 1, 1e3).cache_bytes_per_token == \
        PagedLatentCache.bytes_per_token(model, torch.bfloat16)
    no_mtp = dataclasses.replace(tiny, num_nextn_predict_layers=0)
    assert plan_serve(no_mtp, ServePlanConfig(), 1, 1e3).cache_layers == no_mtp.num_hidden_layers
    with pytest.raises(PlanError, match=r"--mtp, but the model has no MTP modules"):
        plan_serve(no_mtp, ServePlanConfig(mtp=True), 1, 1e3)
    assert "MTP held" in r.format() and "MTP not held" in r0.format()
    with pytest.raises(PlanError, match=r"the weights need 1\d\d\.\d\d GiB per GPU \(bf16\), \d+\.\d\d GiB more than "
                                        r"the 140 GiB"):
        plan_serve(v3, ServePlanConfig(weights="bf16"), 8, H200)


@pytest.mark.parametrize("kw, gpus, msg", [
    (dict(), 3, r"routed experts \+ redundant slots \(256 \+ 0 = 256\) are not divisible by EP = gpus \(3\)"),
    (dict(redundant=1), 8, r"\(256 \+ 1 = 257\) are not divisible by EP = gpus \(8\)"),
    (dict(attn_tp=3), 24, r"num_attention_heads \(128\) is not divisible by the attention TP degree \(3\)"),
    (dict(attn_tp=16), 8, r"gpus \(8\) is not divisible by the attention TP degree \(16\)"),
])
def test_bad_layouts_refused(v3, kw, gpus, msg):
    with pytest.raises(PlanError, match=msg):
        plan_serve(v3, ServePlanConfig(**kw), gpus, H200)


def test_cli_table_and_json(capsys):
    args = ["plan", "--serve", "--preset", "671b", "--gpus", "8", "--gpu-mem", str(H200), "--context", "8192"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for row in ("routed experts", "attention", "embedding + head", "FP8 scales", "cache tokens per GPU",
                "cache tokens in total", "max batch at 8,192 tokens"):
        assert row in out
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    want = plan_serve(preset("671b"), ServePlanConfig(context=8192), 8, H200, "671b")
    assert d["max_batch"] == want.max_batch and d["weights"]["total"] == want.weight_bytes
    assert d["cfg"]["context"] == 8192


def test_cli_flags_reach_the_config(capsys):
    assert main(["plan", "--serve", "--preset", "671b", "--gpus", "32", "--attn-tp", "4", "--redundant", "32",
                 "--weights", "bf16", "--mtp", "--mem-fraction", "0.8", "--reserve-gib", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cfg"] == dict(attn_tp=4, redundant=32, weights="bf16", mtp=True, mem_fraction=0.8, reserve_gib=2.0,
                            context=4096)
    assert d["experts_per_gpu"] == 9 and d["dp_groups"] == 8 and d["gpu_mem_gib"] == 80.0
    # bf16 on 8 GPUs of the default 80 GiB: refused by the CLI in one line (exit status 2)
    assert main(["plan", "--serve", "--preset", "671b", "--gpus", "8", "--weights", "bf16"]) == 2
    assert "GiB more than the 80 GiB of a GPU" in capsys.readouterr().err


def test_official_fp8_config_json(tmp_path, capsys):
    """--config with the official 671B config.json (quantization_config: fp8, 128x128 blocks)."""
    import dataclasses

    cfg = dataclasses.replace(preset("671b"), quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})
    cfg.to_json(tmp_path / "config.json")
    assert main(["plan", "--serve", "--config", str(tmp_path / "config.json"), "--gpus", "8", "--gpu-mem",
                 str(H200), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["weights"]["total"] == plan_serve(preset("671b"), ServePlanConfig(), 8, H200).weight_bytes


def test_ep_engine_sizes_its_gpu_cache_by_the_plans_formula(monkeypatch):
    """`load_ep_engine` on a GPU without --cache-tokens: (total x 0.9 - allocated - 4 GiB) // bytes per token
    of the engine's cache (main + MTP layers, the model's dtype), the plan's `cache_capacity`; no room is an
    error naming the figures. (torch.cuda faked: the arithmetic and its inputs are what is checked here.)"""
    from types import SimpleNamespace

    from dsv3 import ep_serve
    from dsv3.plan_serve import cache_capacity

    model = make_model(tiny_cfg(num_nextn_predict_layers=1), seed=0).to(torch.bfloat16)
    bpt = PagedLatentCache.bytes_per_token(model, torch.bfloat16)
    assert bpt == (model.config.num_hidden_layers + 1) * (model.config.kv_lora_rank + model.config.qk_rope_head_dim) * 2
    total, used = 141 * GiB, 60 * GiB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: used)
    tokens = ep_serve.gpu_cache_tokens(model)
    assert tokens == int((total * 0.9 - used - 4 * GiB) // bpt) == cache_capacity(total, used, bpt)[1] > 0
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 125 * GiB)
    with pytest.raises(ValueError, match=r"no GPU memory left for the KV cache: 141.0 GiB x 0.9 - 125.0 GiB"):
        ep_serve.gpu_cache_tokens(model)
