"""A new run from a trained checkpoint's weights (`dsv3 train --init-from CKPT`): continued training, and
the paper's long-context extension (§4.3, SPEC §3.3, §3.4, §8).

    init_model_config(path, tc, given)   the new run's model config: the checkpoint's, with the YaRN
                                         settings of --rope-factor / --rope-original-len applied
    load_weights(model, path)            every tensor of the checkpoint into the built model, exactly
    tokenizer_source(path, tc)           where the run's tokenizer comes from (the checkpoint's)

What comes from the checkpoint: the architecture (its config.json, or a sharded checkpoint's model
config), every tensor (main layers, MTP modules, the routers' correction biases) and the tokenizer.
What starts fresh: the optimizer state, the step count, the schedule and the data position; it is a new
run in its own directory (--out), whose checkpoints are self-contained (config.json with the new
rope_scaling, weights, tokenizer). A --preset / --config given as well is only a check: each of its
architecture fields must equal the checkpoint's (the rope fields, the context length and storage/init
settings excepted), or the run is refused naming the first field that differs.

YaRN of the new stage (--rope-factor S > 0):
    rope_scaling = {"type": "yarn", "factor": S, "original_max_position_embeddings": L0,
                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    max_position_embeddings = floor(L0 x S)
the official DeepSeek-V3 layout (SPEC §1): beta_fast/beta_slow bound the frequency ramp (§3.3);
mscale_all_dim enters the attention softmax scale as (0.1·mscale_all_dim·ln S + 1)² (§3.4, the paper's
√t = 0.1 ln s + 1 on q and k); mscale / mscale_all_dim = 1 leaves cos/sin unscaled. A checkpoint that already
has YaRN keeps its beta/mscale values. L0 is the context of the *first* stage, the one trained without
YaRN: the checkpoint's original_max_position_embeddings when it already has YaRN (the paper's second
stage, 32K -> 128K, keeps s = 40 and L0 = 4096 and only raises the sequence length), else the sequence
length its run trained at (trainer_state.json), else --rope-original-len must say it. --rope-factor 0
keeps the checkpoint's rope settings (plain continued training, or a stacked stage at the same s).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from dsv3.checkpoints import dcp
from dsv3.checkpoints.files import read_json
from dsv3.checkpoints.hf import loaded_config
from dsv3.config import ModelConfig
from dsv3.training.strategy import checkpoint_config

# the official DeepSeek-V3 YaRN parameters besides factor and original length (SPEC §1)
YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# fields of a --preset / --config that need not match the checkpoint's: the positions (set by the rope
# flags), storage and initialisation (weights come from the checkpoint), legacy training fields, the tokenizer's ids
NOT_ARCHITECTURE = ("rope_scaling", "max_position_embeddings", "torch_dtype", "initializer_range",
                    "quantization_config", "aux_loss_alpha", "seq_aux", "bos_token_id", "eos_token_id", "pad_token_id")


def resolve(path: str) -> str:
    """The checkpoint directory of --init-from (a run directory: its latest checkpoint, either kind)."""
    return dcp.resolve_any(path)


def trained_seq_len(path: str) -> int | None:
    """The sequence length the run that wrote checkpoint `path` trained at (its trainer_state.json), or None
    (a checkpoint without one, e.g. an exported or downloaded model)."""
    p = os.path.join(path, "trainer_state.json")
    if not os.path.exists(p):
        return None
    state = read_json(p)
    for key in ("train_config", "sft_config"):
        n = state.get(key, {}).get("seq_len") if isinstance(state.get(key), dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def check_same_architecture(given: ModelConfig, saved: ModelConfig, what: str, path: str) -> None:
    """Raise naming the first architecture field where `given` (--preset / --config) differs from the checkpoint's."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in NOT_ARCHITECTURE or not f.compare:
            continue
        a, b = getattr(given, f.name), getattr(saved, f.name)
        if a != b:
            raise ValueError(f"--init-from {path}: its {f.name} is {b!r} but {what} says {a!r} (the architecture "
                             "comes from the checkpoint: drop --preset/--config, or give a matching one)")


def yarn_scaling(saved: ModelConfig, factor: float, original_len: int) -> dict:
    """The rope_scaling of a YaRN stage with scale `factor` over original context `original_len`."""
    prev = saved.yarn or {}
    out = {"type": "yarn", "factor": int(factor) if float(factor).is_integer() else float(factor),
           "original_max_position_embeddings": int(original_len)}
    for k, v in YARN_DEFAULTS.items():
        out[k] = prev[k] if prev.get(k) is not None else v  # a YaRN checkpoint keeps the values it trained with
    return out


def init_model_config(path: str, tc, given: ModelConfig | None = None,
                      what: str = "--preset/--config") -> ModelConfig:
    """The new run's model config (see the module docstring); raises naming the field or flag at fault."""
    # a Hugging Face-format directory as its weights load (dcp.load_whole): one written by transformers keeps
    # num_nextn_predict_layers in config.json but holds no MTP tensors, so the run has no MTP modules either
    hf_dir = os.path.exists(os.path.join(path, "config.json"))
    saved = loaded_config(path) if hf_dir else checkpoint_config(path)
    if given is not None:
        check_same_architecture(given, saved, what, path)
    mc = saved
    if tc.rope_factor:
        L0 = tc.rope_original_len
        if not L0:
            L0 = int(saved.yarn["original_max_position_embeddings"]) if saved.yarn else trained_seq_len(path)
        if not L0:
            raise ValueError(f"--init-from {path}: no trainer_state.json tells the context it was trained at and its "
                             "config has no YaRN rope_scaling: pass --rope-original-len")
        rs = yarn_scaling(saved, tc.rope_factor, L0)
        mc = saved.replace(rope_scaling=rs, max_position_embeddings=max(1, math.floor(L0 * tc.rope_factor)))
    if tc.seq_len > mc.max_position_embeddings:
        raise ValueError(f"seq_len {tc.seq_len} > max_position_embeddings {mc.max_position_embeddings} of the model "
                         f"from {path}" + (": raise --rope-factor" if tc.rope_factor else
                                           ": extend the context with --rope-factor"))
    return mc


def describe_rope(before: ModelConfig, after: ModelConfig) -> str:
    """One phrase for the log line: what the new stage does to the positions."""
    y = after.yarn
    if after.rope_scaling == before.rope_scaling and after.max_position_embeddings == before.max_position_embeddings:
        kind = f"YaRN factor {float(y['factor']):g}" if y else "plain RoPE"
        return f"rope unchanged ({kind}, max_position_embeddings {after.max_position_embeddings})"
    return (f"YaRN factor {float(y['factor']):g} over original {y['original_max_position_embeddings']}, "
            f"max_position_embeddings {before.max_position_embeddings} -> {after.max_position_embeddings}")


def tokenizer_source(path: str, tc) -> str:
    """The tokenizer of the new run: the checkpoint's (its ids are the ones the weights learned); --tokenizer
    only where the checkpoint holds none."""
    has = os.path.exists(os.path.join(path, "tokenizer.json"))
    if has and tc.tokenizer:
        raise ValueError(f"--tokenizer: the run uses the tokenizer of --init-from {path} (its ids are the ones the "
                         "weights learned); drop --tokenizer")
    if not has and not tc.tokenizer:
        raise ValueError(f"--init-from {path} holds no tokenizer.json: pass --tokenizer (the one it was trained with)")
    return path if has else tc.tokenizer


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str) -> int:
    """Copy every tensor of checkpoint `path` (parameters and the routers' correction biases; MTP
    included) into `model` exactly, by name and shape; the RoPE buffer stays the model's own (computed
    from the new config). Returns the number of tensors."""
    src = dcp.load_whole(path, "cpu").state_dict()
    dst = model.state_dict()
    missing, unexpected = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
    bad = [k for k in dst.keys() & src.keys() if dst[k].shape != src[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"--init-from {path} does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, mis-shaped {bad[:5]}")
    for k, t in src.items():
        dst[k].copy_(t)
    return len(src)


__all__ = ["YARN_DEFAULTS", "check_same_architecture", "describe_rope", "init_model_config",
           "load_weights", "resolve", "tokenizer_source", "trained_seq_len", "yarn_scaling"]
