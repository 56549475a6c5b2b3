"""Architecture configuration: one flat dataclass whose fields are those of the Hugging Face
`config.json` of `DeepseekV3ForCausalLM` (SPEC §1), plus the presets.

Only architecture lives here. Training, parallelism and inference settings are separate dataclasses
next to the code that uses them. `ModelConfig.from_json(path)` reads an official `config.json`
(unknown keys are kept in `extra` so that a round trip loses nothing); `to_json` writes one that
`transformers.AutoConfig` reads back.

RoPE settings: `rope_theta` and `rope_scaling` are the fields the official checkpoint carries.
transformers v5 writes `rope_parameters` instead (`rope_type`, `rope_theta` and the YaRN keys in
one dict); both spellings are read, and `rope_scaling` is written because every version of
transformers (and vLLM / SGLang) understands it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a DeepSeek-V3 model. The message names the field and the rule."""


MAX_POSITIONS = 1 << 24  # RoPE computes positions in fp32, whose integers are exact up to 2^24


@dataclass
class ModelConfig:
    # --- sizes --------------------------------------------------------------------------------
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width (the first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 2048  # width of each routed and shared expert
    num_hidden_layers: int = 61  # main model only; MTP modules come on top
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1  # layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0
    # --- MLA ------------------------------------------------------------------------------------
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # only meaningful for expanded attention; kept for HF compatibility
    q_lora_rank: int | None = 1536  # None: direct query projection `q_proj` (no query compression)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- MoE ------------------------------------------------------------------------------------
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"  # aux-loss-free: `e_score_correction_bias` chooses experts only
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # --- positions ------------------------------------------------------------------------------
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    # --- misc -----------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # D, the number of MTP modules
    initializer_range: float = 0.006  # the paper's std (HF's default is 0.02)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # Legacy training fields of the official config; dsv3 keeps them for round trips only.
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str = "bfloat16"
    # Keys of a config.json that dsv3 does not model (auto_map, architectures, ...), kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def num_moe_layers(self, start: int = 0, stop: int | None = None) -> int:
        """How many main layers i in [start, stop) are MoE (`is_moe_layer`; default: all of them), counted
        arithmetically: validation, `dsv3 info` and the memory checks never walk the layers, so a config
        claiming 10^12 layers costs them nothing."""
        stop = self.num_hidden_layers if stop is None else min(stop, self.num_hidden_layers)
        lo = max(start, self.first_k_dense_replace)
        if self.n_routed_experts <= 0 or stop <= lo:
            return 0
        f = self.moe_layer_freq
        return (stop - 1) // f - (lo + f - 1) // f + 1  # multiples of f in [lo, stop - 1]

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters, or None for plain RoPE."""
        rs = self.rope_scaling
        if not rs:
            return None
        kind = rs.get("type", rs.get("rope_type", "default"))
        return rs if kind == "yarn" else None

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first field that breaks a rule. O(1) in the config's sizes: no
        loop over layers or experts (sizes are checked against memory and files where they are used)."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:  # a finite int or float (NaN and inf excluded), not a bool
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq"):
            v = getattr(self, name)
            need(is_int(v) and v > 0, f"{name} must be a positive integer, got {v!r}")
        for name in ("intermediate_size", "moe_intermediate_size", "qk_nope_head_dim", "first_k_dense_replace",
                     "n_routed_experts", "n_shared_experts", "num_nextn_predict_layers"):
            v = getattr(self, name)
            need(is_int(v) and v >= 0, f"{name} must be a non-negative integer, got {v!r}")
        need(self.q_lora_rank is None or (is_int(self.q_lora_rank) and self.q_lora_rank > 0),
             f"q_lora_rank must be null (direct query projection) or a positive integer, got {self.q_lora_rank!r}")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even (RoPE rotates pairs of dims), got {self.qk_rope_head_dim}")
        need(self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace ({self.first_k_dense_replace}) > num_hidden_layers ({self.num_hidden_layers})")
        n_moe = self.num_moe_layers()
        need(n_moe == self.num_hidden_layers or self.intermediate_size > 0,
             "intermediate_size must be > 0 when the model has dense FFN layers")
        has_moe = n_moe > 0 or (self.num_nextn_predict_layers > 0 and self.n_routed_experts > 0)
        if has_moe:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0 for MoE layers")
            need(is_int(self.num_experts_per_tok) and self.num_experts_per_tok >= 1,
                 f"num_experts_per_tok must be an integer >= 1, got {self.num_experts_per_tok!r}")
            need(self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) > n_routed_experts ({self.n_routed_experts})")
            need(is_int(self.n_group) and self.n_group >= 1, f"n_group must be an integer >= 1, got {self.n_group!r}")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group ({self.n_group})")
            need(is_int(self.topk_group) and 1 <= self.topk_group <= self.n_group,
                 f"topk_group ({self.topk_group!r}) must be an integer in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_group * per_group >= self.num_experts_per_tok,
                 f"topk_group * experts per group ({self.topk_group} * {per_group}) < num_experts_per_tok "
                 f"({self.num_experts_per_tok}): not enough experts left to choose from")
            need(self.n_group == 1 or per_group >= 2,
                 f"each of the n_group={self.n_group} groups needs >= 2 experts (group score = sum of its top-2)")
        need(self.scoring_func == "sigmoid",
             f"scoring_func must be 'sigmoid' (DeepSeek-V3 routing), got {self.scoring_func!r}")
        need(self.topk_method == "noaux_tc",
             f"topk_method must be 'noaux_tc' (bias-corrected group-limited top-k), got {self.topk_method!r}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu', got {self.hidden_act!r}")
        need(not self.attention_bias, "attention_bias must be false (DeepSeek-V3 has no biases)")
        need(not self.tie_word_embeddings, "tie_word_embeddings must be false (DeepSeek-V3 has an untied head)")
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            v = getattr(self, name)
            need(is_num(v) and v > 0, f"{name} must be a positive finite number, got {v!r}")
        need(is_num(self.initializer_range) and self.initializer_range >= 0,
             f"initializer_range must be a finite number >= 0, got {self.initializer_range!r}")
        # positions go through fp32 in RoPE (rope.cos_sin): integers above 2^24 are no longer exact there
        need(is_int(self.max_position_embeddings) and 0 < self.max_position_embeddings <= MAX_POSITIONS,
             f"max_position_embeddings must be an integer in [1, {MAX_POSITIONS}] (RoPE positions are fp32, exact up "
             f"to 2^24), got {self.max_position_embeddings!r}")
        need(isinstance(self.norm_topk_prob, bool), f"norm_topk_prob must be true or false, got {self.norm_topk_prob!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v >= 0), f"{name} must be null or an integer >= 0, got {v!r}")
        rs = self.rope_scaling
        if rs:
            need(isinstance(rs, dict), f"rope_scaling must be an object or null, got {rs!r}")
            kind = rs.get("type", rs.get("rope_type", "default"))
            need(kind in ("yarn", "default"),
                 f"rope_scaling.type must be 'yarn' (or 'default'), got {kind!r}")
            if kind == "yarn":
                f = rs.get("factor")
                need(is_num(f) and f >= 1, f"rope_scaling.factor must be a finite number >= 1, got {f!r}")
                L0 = rs.get("original_max_position_embeddings")
                need(is_int(L0) and L0 > 0,
                     f"rope_scaling.original_max_position_embeddings must be a positive integer, got {L0!r}")
                for key, low in (("beta_fast", ">"), ("beta_slow", ">"), ("mscale", ">="), ("mscale_all_dim", ">=")):
                    v = rs.get(key)  # null or absent: the default (rope.py)
                    need(v is None or (is_num(v) and (v > 0 if low == ">" else v >= 0)),
                         f"rope_scaling.{key} must be null or a finite number {low} 0, got {v!r}")
                # YaRN options of other models that the tools read differently (transformers' attention_factor
                # replaces the mscale ratio; vLLM reads attn_factor and extrapolation_factor; truncate false keeps
                # the correction range unrounded): refused unless neutral, rather than silently ignored
                for key, neutral in (("attention_factor", None), ("attn_factor", 1), ("extrapolation_factor", 1),
                                     ("truncate", True)):
                    v = rs.get(key, neutral)
                    need(v is None or v == neutral,
                         f"rope_scaling.{key} = {v!r} is not supported (DeepSeek-V3's YaRN: mscale / mscale_all_dim "
                         f"set the attention factor; leave {key} out)")
                # YaRN's correction range divides by ln(rope_theta) (rope.inv_freq)
                need(self.rope_theta > 1, f"rope_theta must be > 1 with YaRN rope_scaling, got {self.rope_theta!r}")
        if self.quantization_config:
            q = self.quantization_config
            need(isinstance(q, dict), f"quantization_config must be an object or null, got {q!r}")
            need(q.get("quant_method") == "fp8",
                 f"quantization_config.quant_method must be 'fp8', got {q.get('quant_method')!r}")
            wbs = q.get("weight_block_size", [128, 128])
            need(isinstance(wbs, (list, tuple)) and list(wbs) == [128, 128],
                 f"quantization_config.weight_block_size must be [128, 128], got {q.get('weight_block_size')!r}")
            need(q.get("fmt", "e4m3") == "e4m3",
                 f"quantization_config.fmt must be 'e4m3' (the official FP8 weights), got {q.get('fmt')!r}")
            need(q.get("scale_fmt") in (None, "ue8m0"),
                 f"quantization_config.scale_fmt must be 'ue8m0' (DeepSeek-V3.1) or absent, got {q.get('scale_fmt')!r}")
            need(q.get("activation_scheme", "dynamic") == "dynamic",
                 f"quantization_config.activation_scheme must be 'dynamic' (activations quantised per 1x128 tile at "
                 f"run time, no stored scales), got {q.get('activation_scheme')!r}")
        # transformers' DeepseekV3 reads rope_interleave (default true: the official checkpoints' q/k rope dims are
        # interleaved pairs); false means half-split pairs, which dsv3's RoPE (and its decode kernels) do not apply
        ri = self.extra.get("rope_interleave", True)
        need(ri is True, f"rope_interleave = {ri!r} is not supported: dsv3 rotates interleaved pairs of the rope "
                         "dims, as the official checkpoints store them (rope_interleave true)")
        return self

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # transformers v5 spelling: rope_parameters = {rope_type, rope_theta, factor, ...}
        rp = d.pop("rope_parameters", None)
        if rp and "rope_scaling" not in d:
            rp = dict(rp)
            if "rope_theta" in rp and "rope_theta" not in d:
                d["rope_theta"] = rp["rope_theta"]
            rp.pop("rope_theta", None)
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        # absent from a config.json, RoPE scaling and the context take transformers' defaults (DeepseekV3Config:
        # plain RoPE, 4,096 positions), not the official 671B values this dataclass holds: every other tool reads
        # such a file so (a missing rope_scaling once loaded as YaRN with factor 40)
        if "rope_scaling" not in d:
            d["rope_scaling"] = None
        d.setdefault("max_position_embeddings", 4096)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:  # transformers attribute alias
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        # fields that the official config writes as null but that mean "not used"
        for name, default in (("n_group", 1), ("topk_group", 1)):
            if name in d and d[name] is None:
                d[name] = default
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        for k in extra:  # kept (a round trip loses nothing), but a near miss of a field is most likely a typo
            near = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.85)
            if near and near[0] not in d:
                warnings.warn(f"config key {k!r} is not a DeepSeek-V3 field (kept as an extra key); did you mean "
                              f"{near[0]!r}? {near[0]} keeps its default", stacklevel=2)
        for name in ("scoring_func", "topk_method", "hidden_act", "torch_dtype"):
            if name in kwargs and not isinstance(kwargs[name], str):
                raise ConfigError(f"{name} must be a string, got {kwargs[name]!r}")
        cfg = cls(**kwargs)
        cfg.extra = extra
        return cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        out.update(self.extra)
        out.update(d)
        out["architectures"] = ["DeepseekV3ForCausalLM"]
        out["model_type"] = "deepseek_v3"
        # MLA gives every head its own K and V (no grouping): dsv3 never reads this field, and transformers'
        # DeepseekV3 repeats K/V by heads / num_key_value_heads, so any other value breaks its forward (the official
        # config has 128 = 128)
        out["num_key_value_heads"] = self.num_attention_heads
        out.pop("rope_parameters", None)
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (a JSON config file): {e}") from None
        try:
            return cls.from_dict(d)
        except TypeError as e:  # wrong value types that the dataclass cannot take
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.extra = dict(self.extra)
        return cfg.validate()


# -------------------------------------------------------------------------------------------------
# YaRN helpers shared by the model (rope.py, mla.py) and by tests.

def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """0.1·mscale·ln(s) + 1 for s > 1 (SPEC §3.4); vLLM/HF `yarn_get_mscale`."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-1/2, times mscale(s, mscale_all_dim)² when YaRN is on (SPEC §3.4).

    Choice ([U] in the official code, which gates YaRN on its runtime max_seq_len): follow HF, vLLM
    and SGLang and apply YaRN whenever the config says `rope_scaling.type == "yarn"`.
    """
    scale = cfg.qk_head_dim ** -0.5
    y = cfg.yarn
    if y is not None:
        mad = y.get("mscale_all_dim", 0) or 0
        if mad:
            m = yarn_get_mscale(float(y["factor"]), float(mad))
            scale = scale * m * m
    return scale


# -------------------------------------------------------------------------------------------------
# Presets. Parameter counts are computed by `dsv3 info`, never typed in.

def _tiny() -> ModelConfig:
    # The main job's model (`dsv3 train`): ~4M parameters that a 2-core CPU trains in about 8 minutes. 1 dense +
    # 3 MoE layers, 16 experts in 4 groups (top-2 groups, top-4 experts), one shared expert, one MTP module, plain
    # RoPE. Chosen for quality per CPU-minute on code it never trained on (bench/main_job.py, bench/RESULTS.md
    # "The main job's default, issue 20"): at equal CPU time, width 192 beat 256 and 384, a 4,096-entry
    # vocabulary beat 8,192 and 16,384, and init std 0.04 beat the paper's 0.006 by ~0.15 bits per byte (0.006
    # is the paper's for width 7168; at width 192 it leaves the model learning slowly for the first hundreds
    # of steps).
    return ModelConfig(
        vocab_size=4096, hidden_size=192, intermediate_size=576, moe_intermediate_size=96,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=3, num_key_value_heads=3,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, max_position_embeddings=2048, rope_scaling=None,
        num_nextn_predict_layers=1, initializer_range=0.04,
    )


def _small() -> ModelConfig:
    # ~1B total / ~200M active: one GPU. 12 layers (1 dense), 64 experts top-6 in 8 groups.
    return ModelConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=384,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, max_position_embeddings=4096, rope_scaling=None,
        num_nextn_predict_layers=1,
    )


def _16b() -> ModelConfig:
    # The 16B-A3B class shape (DeepSeek-V2-Lite / torchtitan "16B") with V3 routing: sigmoid
    # affinities, correction bias, normalised top-6 gates. V2-Lite has a single expert group; the
    # scaling factor is 1.0 as in V2-Lite (the V3 value 2.5 belongs to its 8-of-256 routing).
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, max_position_embeddings=4096, rope_scaling=None,
        num_nextn_predict_layers=1,
    )


def _671b() -> ModelConfig:
    # The official DeepSeek-V3 config.json (SPEC §1), FP8 quantization_config included.
    return ModelConfig(
        # initializer_range: the hub file says 0.02 (HF's default); dsv3 initializes with the
        # paper's 0.006 (SPEC §8). It only matters when training from scratch.
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]},
        aux_loss_alpha=0.001,
    )


PRESETS = {"tiny": _tiny, "small": _small, "16b": _16b, "671b": _671b}


def preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]().validate()


def resolve_device(name: str):
    """"auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N" -> torch.device; an unknown name, or
    cuda without CUDA, is a ValueError naming it. (Here, a floor module, for training and inference alike.)"""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:  # torch's message lists every device type it knows; ours names the supported ones
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return dev
