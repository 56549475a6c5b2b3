"""Logit parity with Hugging Face `transformers.DeepseekV3ForCausalLM` (an independent implementation)
on random tiny configs, through the checkpoint format in both directions:
  (a) dsv3 model -> dsv3.save_pretrained -> AutoModelForCausalLM.from_pretrained -> same logits;
  (b) HF model with random weights and biases -> hf.save_pretrained -> dsv3.load_pretrained -> same logits.
Plus: the config.json written by dsv3 reads back in `transformers.AutoConfig` with the same values.

Run: python -m pytest tests/test_hf_parity.py -q
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from dsv3.checkpoints.hf import load_pretrained, save_pretrained  # noqa: E402
from dsv3.config import softmax_scale  # noqa: E402
from dsv3.model import rope  # noqa: E402
from dsv3.model.mla import MLA  # noqa: E402
from conftest import capture_router_io, make_model, rand_ids, tiny_cfg, yarn  # noqa: E402

TOL = 1e-4

CASES = {
    # plain RoPE, q-LoRA, 4 groups keep 2
    "plain-qlora-groups": dict(rope_scaling=None, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                               num_experts_per_tok=2),
    # plain RoPE, direct q_proj, one group, two shared experts, two dense layers
    "plain-qproj-1group": dict(rope_scaling=None, q_lora_rank=None, n_routed_experts=8, n_group=1, topk_group=1,
                               num_experts_per_tok=3, n_shared_experts=2, num_hidden_layers=4,
                               first_k_dense_replace=2),
    # no shared experts: transformers saves their weights with 0 rows, which dsv3 once refused as unexpected
    "plain-no-shared": dict(rope_scaling=None, q_lora_rank=24, n_routed_experts=8, n_group=2, topk_group=1,
                            num_experts_per_tok=2, n_shared_experts=0),
    # YaRN with a fractional ramp (rope dim 16, L0 = 32), mscale == mscale_all_dim, q_proj, groups
    "yarn-qproj-groups": dict(rope_scaling=yarn(4.0, 32), qk_rope_head_dim=16, max_position_embeddings=128,
                              q_lora_rank=None, n_routed_experts=16, n_group=4, topk_group=2,
                              num_experts_per_tok=4),
    # YaRN with mscale != mscale_all_dim (cos/sin factor != 1), q-LoRA, 8 groups of 2 keep 3
    "yarn-mscale-ratio": dict(rope_scaling=yarn(4.0, 32, mscale=0.707, mscale_all_dim=1.0), qk_rope_head_dim=16,
                              max_position_embeddings=128, q_lora_rank=24, n_routed_experts=16, n_group=8,
                              topk_group=3, num_experts_per_tok=3, routed_scaling_factor=1.5),
}


def case_cfg(name):
    return tiny_cfg(hidden_size=48, initializer_range=0.2, **CASES[name])


def _hf_config_kwargs(cfg) -> dict:
    """The same architecture as a transformers v5 DeepseekV3Config (rope in the v5 `rope_parameters` spelling)."""
    rp = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.yarn:
        rp = {"rope_type": "yarn", "rope_theta": cfg.rope_theta,
              **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
    names = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
             "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
             "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
             "norm_topk_prob", "max_position_embeddings", "rms_norm_eps"]
    return dict({n: getattr(cfg, n) for n in names}, rope_parameters=rp,
                num_mtp_layers=cfg.num_nextn_predict_layers)


def assert_routing_nontrivial(model, ids):
    """The case must exercise the bias and the group limit: both change some selections."""
    with capture_router_io(model) as calls, torch.no_grad():
        model(ids, with_mtp=False)
    bias_matters = group_matters = False
    for r, x, (w, idx, s) in calls:
        plain = s.topk(r.top_k, dim=-1).indices  # no bias
        unlimited = (s + r.e_score_correction_bias).topk(r.top_k, dim=-1).indices  # no group limit
        same = lambda a, b: all(set(u.tolist()) == set(v.tolist()) for u, v in zip(a, b))
        bias_matters |= not same(idx, plain)
        group_matters |= not same(idx, unlimited)
    assert bias_matters
    if model.config.topk_group < model.config.n_group:
        assert group_matters


def _hf_logits(hf, ids, position_ids=None):
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=position_ids).logits


@pytest.mark.parametrize("name", list(CASES))
def test_dsv3_to_hf(name, tmp_path):
    cfg = case_cfg(name)
    model = make_model(cfg, seed=11, bias_std=0.3)
    ids = rand_ids(cfg, 2, 20)
    assert_routing_nontrivial(model, ids)
    save_pretrained(model, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert isinstance(hf, DeepseekV3ForCausalLM)
    # (no shared experts: transformers expects shared-expert weights of 0 rows, which hold nothing to load)
    hf_params = dict(hf.named_parameters())
    assert all(hf_params[k].numel() == 0 for k in info["missing_keys"]) and not info["mismatched_keys"]
    n = cfg.num_hidden_layers  # transformers drops the MTP layer: it is the only thing it did not load
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{n}.") for k in info["unexpected_keys"])

    # component-level agreement first (for a readable failure), then logits
    assert torch.allclose(hf.model.rotary_emb.inv_freq, model.rope_inv_freq, rtol=1e-6)
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(model.rope_factor, rel=1e-9)
    assert hf.model.layers[0].self_attn.scaling == pytest.approx(model.layers[0].self_attn.scale, rel=1e-9)

    with torch.no_grad():
        ours = model(ids).logits
    theirs = _hf_logits(hf, ids)
    assert ours.abs().max() > 1.0  # non-trivial logits
    assert (ours - theirs).abs().max() <= TOL
    pos = (torch.arange(20) + 90).unsqueeze(0).expand(2, 20)  # positions past original_max_position_embeddings
    with torch.no_grad():
        ours = model(ids, pos).logits
    assert (ours - _hf_logits(hf, ids, pos)).abs().max() <= TOL


def _random_hf_model(cfg, seed):
    hc = DeepseekV3Config(**_hf_config_kwargs(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM(hc).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        n_bias = 0
        for bname, b in hf.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
                n_bias += 1
    assert n_bias == sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return hf


@pytest.mark.parametrize("name", list(CASES))
def test_hf_to_dsv3(name, tmp_path):
    cfg = case_cfg(name)
    hf = _random_hf_model(cfg, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)

    with pytest.warns(UserWarning, match=r"num_nextn_predict_layers=1 but the checkpoint holds no MTP tensors"):
        model = load_pretrained(tmp_path)
    model.eval()
    assert model.config.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    for f in ("hidden_size", "q_lora_rank", "n_group", "topk_group", "num_experts_per_tok", "rope_theta",
              "routed_scaling_factor", "n_shared_experts", "first_k_dense_replace"):
        assert getattr(model.config, f) == getattr(cfg, f), f
    assert model.config.rope_scaling == cfg.rope_scaling
    # every correction bias came across (they decide the routing)
    hf_bias = [b for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(hf_bias) == len(model.routers())
    for a, r in zip(hf_bias, model.routers()):
        assert torch.equal(a, r.e_score_correction_bias)

    ids = rand_ids(cfg, 2, 20, seed=3)
    assert_routing_nontrivial(model, ids)
    with torch.no_grad():
        ours = model(ids).logits
    theirs = _hf_logits(hf, ids)
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max() <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_written_config_reads_in_autoconfig(name, tmp_path):
    cfg = case_cfg(name)
    save_pretrained(make_model(cfg), tmp_path)
    hc = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hc, DeepseekV3Config)
    for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
              "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
              "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
              "norm_topk_prob", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "attention_bias", "hidden_act", "bos_token_id", "eos_token_id", "initializer_range"):
        assert getattr(hc, f) == getattr(cfg, f), f
    assert hc.num_mtp_layers == cfg.num_nextn_predict_layers
    assert hc.head_dim == cfg.qk_rope_head_dim and hc.qk_head_dim == cfg.qk_head_dim
    assert hc.rope_interleave is True  # the default; dsv3's interleaved-pair RoPE relies on it
    rp = hc.rope_parameters
    assert rp["rope_theta"] == cfg.rope_theta
    if cfg.yarn:
        assert rp["rope_type"] == "yarn"
        for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim"):
            assert rp[k] == cfg.rope_scaling[k], k
    else:
        assert rp["rope_type"] == "default"


@pytest.mark.parametrize("mscale, mscale_all_dim", [(1.0, 1.0), (0.707, 1.0), (0.707, 0.707), (1.0, 0.5)])
@pytest.mark.parametrize("factor", [4.0, 40.0])
def test_yarn_scales_match_hf(mscale, mscale_all_dim, factor):
    """cos/sin factor mscale(s, mscale)/mscale(s, mscale_all_dim), softmax scale x mscale(s, mscale_all_dim)^2
    and the YaRN frequencies agree with transformers whenever both mscale keys are given (as in every
    official config)."""
    cfg = tiny_cfg(qk_rope_head_dim=16, max_position_embeddings=int(32 * factor),
                   rope_scaling=yarn(factor, 32, mscale=mscale, mscale_all_dim=mscale_all_dim))
    hc = DeepseekV3Config(**_hf_config_kwargs(cfg))
    inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hc)
    assert attention_factor == pytest.approx(rope.cos_sin_factor(cfg), rel=1e-12)
    assert torch.allclose(inv.float(), rope.inv_freq(cfg), rtol=1e-6)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    assert yarn_apply_mscale(hc.rope_parameters, cfg.qk_head_dim ** -0.5) == pytest.approx(softmax_scale(cfg))
    expect = cfg.qk_head_dim ** -0.5 * (0.1 * mscale_all_dim * math.log(factor) + 1) ** 2
    assert softmax_scale(cfg) == pytest.approx(expect)
    m = make_model(cfg)
    assert all(a.scale == pytest.approx(expect) for a in m.modules() if isinstance(a, MLA))
