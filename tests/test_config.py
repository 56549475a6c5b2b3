"""ModelConfig: validation rules, JSON round trips, the official 671B config.json, presets.

Run: python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import json
import math

import pytest

from dsv3.config import PRESETS, ConfigError, ModelConfig, preset, softmax_scale
from conftest import tiny_cfg

# The hub config.json of deepseek-ai/DeepSeek-V3, written out from SPEC §1 (HF name / value columns).
OFFICIAL_671B = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

ARCH_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "moe_layer_freq", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "scoring_func", "topk_method", "norm_topk_prob",
    "routed_scaling_factor", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps", "hidden_act",
    "attention_bias", "tie_word_embeddings", "num_nextn_predict_layers", "bos_token_id", "eos_token_id",
    "quantization_config", "torch_dtype",
]


# ------------------------------------------------------------------------------------------------
# validation: each rule raises ConfigError naming the field

@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),  # > n_routed_experts (8)
    (dict(topk_group=5), "topk_group"),  # > n_group (4)
    (dict(n_group=3), "n_group"),  # 8 % 3 != 0
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),  # odd
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),  # 1 group * 2 experts < 3
    (dict(hidden_size=-32), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(kv_lora_rank=-1), "kv_lora_rank"),
    (dict(intermediate_size=-1), "intermediate_size"),
    (dict(moe_intermediate_size=-4), "moe_intermediate_size"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),  # > num_hidden_layers (3)
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(n_group=8, topk_group=4), "n_group"),  # 1 expert per group: no top-2 group score
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.type"),
    (dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 32}),
     "rope_scaling.factor"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling.original_max_position_embeddings"),
    (dict(quantization_config={"quant_method": "int8"}), "quantization_config.quant_method"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]}),
     "quantization_config.weight_block_size"),
])
def test_validation_rule_names_field(changes, field):
    with pytest.raises(ConfigError, match=r"(^|\W)" + field.replace(".", r"\.") + r"\b"):
        tiny_cfg(**changes)


@pytest.mark.parametrize("field, value", [
    ("hidden_size", "64"),
    ("hidden_size", 64.0),
    ("hidden_size", True),
    ("num_hidden_layers", "3"),
    ("num_experts_per_tok", "2"),
    ("n_group", "4"),
    ("q_lora_rank", "24"),
    ("rms_norm_eps", "1e-6"),
    ("rope_theta", "10000"),
    ("max_position_embeddings", "256"),
    ("routed_scaling_factor", "2.5"),
    ("norm_topk_prob", "yes"),
    ("scoring_func", 1),
    ("rope_scaling", "yarn"),
])
def test_wrong_types_raise_config_error_naming_field(field, value):
    d = tiny_cfg().to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=r"\b" + field + r"\b"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("changes, field", [
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(n_routed_experts=-8), "n_routed_experts"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(q_lora_rank=True), "q_lora_rank"),
    (dict(num_experts_per_tok=True), "num_experts_per_tok"),
    (dict(topk_group=1.0), "topk_group"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps"),
    (dict(initializer_range=float("nan")), "initializer_range"),
    (dict(initializer_range=-0.1), "initializer_range"),
    (dict(max_position_embeddings=2**40), "max_position_embeddings"),
    (dict(max_position_embeddings=True), "max_position_embeddings"),
    (dict(bos_token_id=-1), "bos_token_id"),
    (dict(eos_token_id="1"), "eos_token_id"),
    (dict(pad_token_id=2.0), "pad_token_id"),
    (dict(rope_scaling={"type": "yarn", "factor": float("inf"), "original_max_position_embeddings": 32}),
     "rope_scaling.factor"),
    (dict(rope_scaling={"type": "yarn", "factor": True, "original_max_position_embeddings": 32}),
     "rope_scaling.factor"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": True}),
     "rope_scaling.original_max_position_embeddings"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": "x"}),
     "rope_scaling.beta_fast"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_slow": 0}),
     "rope_scaling.beta_slow"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": -1.0}),
     "rope_scaling.mscale"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                        "mscale_all_dim": float("nan")}), "rope_scaling.mscale_all_dim"),
    (dict(rope_theta=1.0, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     "rope_theta"),  # YaRN's correction range divides by ln(rope_theta)
    (dict(quantization_config="fp8"), "quantization_config"),
])
def test_absurd_values_raise_config_error_naming_field(changes, field):
    """Issue 13: NaN/inf, bools where ints are expected, huge positions, garbage in rope_scaling."""
    with pytest.raises(ConfigError, match=r"(^|\W)" + field.replace(".", r"\.") + r"\b"):
        tiny_cfg(**changes)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", "4"), ("num_hidden_layers", True),
                                          ("n_routed_experts", 8.0), ("kv_lora_rank", None)])
def test_absurd_types_from_json_raise_config_error(tmp_path, field, value):
    d = tiny_cfg().to_dict()
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"\b" + field + r"\b"):
        ModelConfig.from_json(tmp_path)


def test_valid_yarn_keys_accepted():
    # null / absent optional YaRN keys take their defaults (rope.py); mscale 0 is allowed
    tiny_cfg(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": None,
                           "mscale": 0, "mscale_all_dim": 0})
    tiny_cfg(max_position_embeddings=2**24)


def test_wrong_type_in_json_file_names_field(tmp_path):
    d = tiny_cfg().to_dict()
    d["rms_norm_eps"] = "tiny"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        ModelConfig.from_json(tmp_path)


def test_valid_edge_cases_accepted():
    # exactly enough experts left in the kept groups; a single group; all-dense model without MoE fields
    tiny_cfg(n_group=4, topk_group=1, num_experts_per_tok=2)
    tiny_cfg(n_group=1, topk_group=1, num_experts_per_tok=8)
    tiny_cfg(n_routed_experts=0, first_k_dense_replace=3, num_nextn_predict_layers=0)
    tiny_cfg(q_lora_rank=None)


def test_non_object_config_rejected():
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_dict([1, 2, 3])


def test_missing_and_corrupt_json(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "nope.json")
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json(tmp_path)


# ------------------------------------------------------------------------------------------------
# JSON round trips and the two RoPE spellings

def test_json_round_trip_keeps_unknown_keys(tmp_path):
    d = tiny_cfg(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0},
                 q_lora_rank=None).to_dict()
    d["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    d["ep_size"] = 1
    d["some_future_field"] = [1, {"a": 2}]
    src = tmp_path / "src.json"
    src.write_text(json.dumps(d))
    cfg = ModelConfig.from_json(src)
    assert cfg.extra["auto_map"] == d["auto_map"]
    assert cfg.extra["some_future_field"] == [1, {"a": 2}]
    assert cfg.q_lora_rank is None and cfg.rope_scaling["mscale"] == 0.707

    out = tmp_path / "out"
    out.mkdir()
    cfg.to_json(out)  # a directory: writes out/config.json
    written = json.loads((out / "config.json").read_text())
    for k, v in d.items():
        assert written[k] == v, k
    again = ModelConfig.from_json(out / "config.json")
    assert again == cfg
    assert again.extra == cfg.extra


def test_round_trip_preserves_every_field(tmp_path):
    cfg = tiny_cfg(first_k_dense_replace=2, moe_layer_freq=1, n_shared_experts=2, routed_scaling_factor=1.5,
                   rms_norm_eps=1e-5, rope_theta=50000.0, norm_topk_prob=False, bos_token_id=5, eos_token_id=6,
                   pad_token_id=7, aux_loss_alpha=0.01, seq_aux=False, initializer_range=0.02,
                   quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128]})
    cfg.to_json(tmp_path / "c.json")
    back = ModelConfig.from_json(tmp_path / "c.json")
    assert back == cfg
    # the dataclass comparison covers every field: a changed one must make it unequal
    assert back != cfg.replace(rope_theta=10000.0)


def test_rope_parameters_and_rope_scaling_spellings_agree():
    old = tiny_cfg(rope_theta=5000.0, rope_scaling={"type": "yarn", "factor": 4.0,
                   "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                   "mscale": 0.707, "mscale_all_dim": 1.0}).to_dict()
    new = dict(old)
    new.pop("rope_scaling")
    new.pop("rope_theta")
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                              "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                              "mscale": 0.707, "mscale_all_dim": 1.0}
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a == b
    assert b.rope_theta == 5000.0 and b.yarn is not None and b.yarn["factor"] == 4.0
    assert "rope_parameters" not in b.to_dict()  # written back in the rope_scaling spelling

    # default RoPE in the v5 spelling -> rope_scaling None, theta kept
    plain = dict(new)
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    c = ModelConfig.from_dict(plain)
    assert c.rope_scaling is None and c.yarn is None and c.rope_theta == 12345.0
    assert c == ModelConfig.from_dict({**old, "rope_scaling": None, "rope_theta": 12345.0})


def test_transformers_aliases_and_nulls():
    d = tiny_cfg().to_dict()
    d.pop("num_nextn_predict_layers")
    d["num_mtp_layers"] = 2
    d["dtype"] = d.pop("torch_dtype")
    d["num_key_value_heads"] = None
    d["n_group"], d["topk_group"] = None, None
    cfg = ModelConfig.from_dict(d)
    assert cfg.num_nextn_predict_layers == 2
    assert cfg.torch_dtype == "float32"
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert (cfg.n_group, cfg.topk_group) == (1, 1)


# ------------------------------------------------------------------------------------------------
# the official 671B config and the presets

def test_official_671b_config_parses_to_preset(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(OFFICIAL_671B, indent=2))
    cfg = ModelConfig.from_json(tmp_path)
    ref = preset("671b")
    for f in ARCH_FIELDS:
        assert getattr(cfg, f) == getattr(ref, f), f
    # the only declared difference: dsv3 initialises with the paper's std, the hub file says 0.02
    assert cfg.initializer_range == 0.02 and ref.initializer_range == 0.006
    assert cfg.replace(initializer_range=0.006) == ref
    # legacy / remote-code keys survive in `extra` and are written back
    for k in ("auto_map", "ep_size", "pretraining_tp", "transformers_version", "use_cache", "attention_dropout"):
        assert cfg.extra[k] == OFFICIAL_671B[k], k
    out = cfg.to_dict()
    for k, v in OFFICIAL_671B.items():
        assert out[k] == v, k
    # derived facts of SPEC §1 / §3.4
    assert cfg.qk_head_dim == 192
    assert [cfg.is_moe_layer(i) for i in (0, 1, 2, 3, 60)] == [False, False, False, True, True]
    assert softmax_scale(cfg) == pytest.approx(0.1352338, abs=1e-7)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    cfg = preset(name)
    assert cfg.validate() is cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # round trip through the dict form
    assert preset(name.upper()) == cfg  # case-insensitive


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")


def test_replace_validates_and_keeps_extra():
    cfg = ModelConfig.from_dict({**tiny_cfg().to_dict(), "auto_map": {"x": "y"}})
    new = cfg.replace(num_hidden_layers=4)
    assert new.num_hidden_layers == 4 and new.extra["auto_map"] == {"x": "y"}
    assert new.extra is not cfg.extra
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        cfg.replace(num_experts_per_tok=100)


# ------------------------------------------------------------------------------------------------
# what other tools read differently (an independent audit against transformers 5, 2026-12-05)

def test_absent_rope_fields_take_transformers_defaults(tmp_path):
    """A config.json without rope_scaling / rope_parameters or max_position_embeddings means plain RoPE over 4,096
    positions to transformers (DeepseekV3Config); it used to load as the 671B's YaRN (factor 40), silently."""
    transformers = pytest.importorskip("transformers")
    d = tiny_cfg(max_position_embeddings=8192, rope_scaling={"type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32}).to_dict()
    del d["rope_scaling"], d["max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.rope_scaling is None and cfg.yarn is None and cfg.max_position_embeddings == 4096
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.max_position_embeddings == cfg.max_position_embeddings
    assert hf.rope_parameters["rope_type"] == "default" and hf.rope_parameters["rope_theta"] == cfg.rope_theta


@pytest.mark.parametrize("key, value", [("attention_factor", 1.3), ("truncate", False), ("attn_factor", 2.0),
                                        ("extrapolation_factor", 0.5)])
def test_yarn_options_other_tools_read_differently_are_refused(key, value):
    y = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0}
    with pytest.raises(ConfigError, match=rf"rope_scaling\.{key} = {value!r} is not supported"):
        tiny_cfg(rope_scaling={**y, key: value})
    tiny_cfg(rope_scaling={**y, "truncate": True, "attn_factor": 1, "extrapolation_factor": 1.0,
                           "attention_factor": None})  # their neutral values load


def test_fp8_format_and_rope_layout_other_than_the_official_are_refused():
    base = tiny_cfg().to_dict()
    q = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    for extra, field in (({"quantization_config": {**q, "fmt": "e5m2"}}, r"quantization_config\.fmt"),
                         ({"quantization_config": {**q, "activation_scheme": "static"}},
                          r"quantization_config\.activation_scheme"),
                         ({"rope_interleave": False}, r"rope_interleave = False is not supported")):
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_dict({**base, **extra})
    ok = ModelConfig.from_dict({**base, "rope_interleave": True, "quantization_config": {
        **q, "fmt": "e4m3", "activation_scheme": "dynamic"}})
    assert ok.extra["rope_interleave"] is True and ok.to_dict()["rope_interleave"] is True  # kept, written back


@pytest.mark.parametrize("mscale, mscale_all_dim", [(0, 1.0), (0.707, 1.0), (1.0, 0), (None, 1.0), (0.5, None),
                                                    (1.0, 1.0)])
def test_yarn_cos_sin_factor_is_vllms(mscale, mscale_all_dim):
    """The cos/sin factor as vLLM's DeepseekScalingRotaryEmbedding computes it: yarn_get_mscale(s, mscale) /
    yarn_get_mscale(s, mscale_all_dim), an absent key 1 and 0; a 0 is a value (it once became 1)."""
    from dsv3.model.rope import cos_sin_factor

    s = 4.0
    y = {"type": "yarn", "factor": s, "original_max_position_embeddings": 32}
    y.update({k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)) if v is not None})

    def vllm_mscale(scale, m=1.0):  # vllm/model_executor/layers/rotary_embedding: yarn_get_mscale
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    want = vllm_mscale(s, 1.0 if mscale is None else mscale) / vllm_mscale(s, 0.0 if mscale_all_dim is None
                                                                          else mscale_all_dim)
    assert cos_sin_factor(tiny_cfg(rope_scaling=y)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mscale, mscale_all_dim, agree", [(None, 1.0, True), (None, None, True), (1.0, 0, True),
                                                           (0.707, 0.707, True), (0.0, 1.0, False), (2.0, None, False)])
def test_saved_yarn_reads_the_same_in_transformers_or_is_said(tmp_path, mscale, mscale_all_dim, agree):
    """A checkpoint's YaRN mscale keys as transformers reads them: an absent mscale means 1 to dsv3 and vLLM but
    makes transformers ignore mscale_all_dim (cos/sin factor 1.369 against 1.0 at factor 40, logits 6 apart), so
    the save writes mscale 1.0; where the file cannot say dsv3's factor to transformers (one key zero or absent
    with the other not 1), the save warns with both factors."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from dsv3.checkpoints.hf import save_pretrained
    from dsv3.model.rope import cos_sin_factor
    from conftest import make_model

    y = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32}
    y.update({k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)) if v is not None})
    cfg = tiny_cfg(rope_scaling=y, max_position_embeddings=1280, num_nextn_predict_layers=0)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        save_pretrained(make_model(cfg), tmp_path)
    said = [str(w.message) for w in seen if "rope_scaling mscale" in str(w.message)]
    written = json.loads((tmp_path / "config.json").read_text())["rope_scaling"]
    assert written["mscale"] == (1.0 if mscale is None else mscale)
    assert ModelConfig.from_json(tmp_path).yarn is not None and cos_sin_factor(ModelConfig.from_json(tmp_path)) == \
        pytest.approx(cos_sin_factor(cfg), rel=1e-12)  # dsv3 reads its own file as before
    theirs = DeepseekV3RotaryEmbedding(transformers.AutoConfig.from_pretrained(tmp_path)).attention_scaling
    assert (theirs == pytest.approx(cos_sin_factor(cfg), rel=1e-6)) == agree
    assert bool(said) == (not agree)
    if said:
        assert f"{cos_sin_factor(cfg):.6g} in dsv3 and vLLM, but transformers reads {theirs:.6g}" in said[0]


def test_saved_config_keeps_only_what_other_tools_can_use(tmp_path):
    """num_key_value_heads is written as the head count (MLA has no K/V groups; transformers' DeepseekV3 repeats
    K/V by heads / num_key_value_heads and failed on a smaller value); an auto_map naming code files the directory
    lacks is dropped (from_pretrained(trust_remote_code=True) failed on the missing file), one whose files are
    there is kept; moe_layer_freq != 1, which transformers ignores, is warned about."""
    pytest.importorskip("transformers")
    from dsv3.checkpoints.hf import save_pretrained
    from conftest import make_model

    am = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
          "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    cfg = ModelConfig.from_dict({**tiny_cfg(num_nextn_predict_layers=0).to_dict(), "auto_map": am,
                                 "num_key_value_heads": 1})
    assert cfg.num_key_value_heads == 1 and cfg.to_dict()["num_key_value_heads"] == cfg.num_attention_heads
    model = make_model(cfg)
    save_pretrained(model, tmp_path / "a")
    d = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "auto_map" not in d and d["num_key_value_heads"] == cfg.num_attention_heads
    (tmp_path / "b").mkdir()
    for f in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (tmp_path / "b" / f).write_text("# the remote code\n")
    save_pretrained(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["auto_map"] == am
    freq = tiny_cfg(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2, num_nextn_predict_layers=0)
    with pytest.warns(UserWarning, match="moe_layer_freq 2 is ignored by transformers' DeepseekV3"):
        save_pretrained(make_model(freq), tmp_path / "c")


def test_a_misspelt_key_warns_naming_the_field():
    """A key one typo away from a field (`num_hiden_layers`) is kept as an extra key, as unknown keys are, but
    warned about, naming the field that keeps its default (the 671B's 61 layers, silently, before)."""
    d = tiny_cfg().to_dict()
    d["num_hiden_layers"] = d.pop("num_hidden_layers")
    with pytest.warns(UserWarning, match="'num_hiden_layers' is not a DeepSeek-V3 field .* did you mean "
                                         "'num_hidden_layers'"):
        ModelConfig.from_dict(d)
    import warnings

    official = {**OFFICIAL_671B, "transformers_version": "4.46.3", "use_cache": True, "attention_dropout": 0.0,
                "ep_size": 1, "pretraining_tp": 1, "rope_interleave": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official file's own extra keys: no warning
        ModelConfig.from_dict(official)
