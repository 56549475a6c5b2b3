"""Parameter and KV-cache accounting, counted from a model built on the meta device (no memory, no
numbers typed in). SPEC §7 has the expected figures for the 671B config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.config import ModelConfig
from dsv3.model.moe import Experts, MoE
from dsv3.model.transformer import Transformer


@dataclass
class ModelInfo:
    total: int  # main model parameters (what "671B" means): embedding + layers + final norm + head
    activated: int  # main-model parameters used per token (K routed + shared experts), embedding included
    activated_no_embedding: int
    mtp_unique: int  # parameters of the MTP modules themselves (embedding and head are shared)
    mtp_stored: int  # as the official checkpoint stores them: + one embedding and head copy per module
    mtp_activated: int  # MTP module parameters used per token (without the shared embedding/head)
    kv_latent_bytes: int  # per token, all main layers, bf16: (kv_lora_rank + rope) values per layer
    kv_expanded_bytes: int  # per token, bf16, a per-head K (qk_head_dim) and V (v_head_dim) cache
    n_layers: int
    n_moe_layers: int


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers() if n.endswith("e_score_correction_bias"))


def _inactive(block, cfg: ModelConfig) -> int:
    """Parameters of a block's routed experts that a token does not use."""
    if not isinstance(block.mlp, MoE):
        return 0
    ex: Experts = block.mlp.experts
    per_expert = (ex.gate_proj.numel() + ex.up_proj.numel() + ex.down_proj.numel()) // cfg.n_routed_experts
    return (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert


def model_info(cfg: ModelConfig) -> ModelInfo:
    with torch.device("meta"):
        m = Transformer(cfg)
    mtp_unique = sum(_numel(mod) for mod in m.mtp)
    total = _numel(m) - mtp_unique
    embed = m.embed_tokens.weight.numel()
    activated = total - sum(_inactive(b, cfg) for b in m.layers)
    mtp_act = mtp_unique - sum(_inactive(b, cfg) for b in m.mtp)
    bf16 = 2
    L = cfg.num_hidden_layers
    return ModelInfo(
        total=total,
        activated=activated,
        activated_no_embedding=activated - embed,
        mtp_unique=mtp_unique,
        mtp_stored=mtp_unique + len(m.mtp) * (embed + m.lm_head.weight.numel()),
        mtp_activated=mtp_act,
        kv_latent_bytes=L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bf16,
        kv_expanded_bytes=L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * bf16,
        n_layers=L,
        n_moe_layers=sum(cfg.is_moe_layer(i) for i in range(L)),
    )


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_info(cfg: ModelConfig, name: str) -> str:
    i = model_info(cfg)
    rows = [
        ("model", name),
        ("layers", f"{i.n_layers} ({i.n_layers - i.n_moe_layers} dense, {i.n_moe_layers} MoE) "
                   f"+ {cfg.num_nextn_predict_layers} MTP"),
        ("experts", f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
                    f"top-{cfg.topk_group} groups) + {cfg.n_shared_experts} shared"),
        ("total parameters (main model)", f"{i.total:,} ({_fmt(i.total)})"),
        ("activated per token", f"{i.activated:,} ({_fmt(i.activated)}); "
                                f"{_fmt(i.activated_no_embedding)} without the embedding"),
        ("MTP parameters (unique)", f"{i.mtp_unique:,} ({_fmt(i.mtp_unique)}); {_fmt(i.mtp_stored)} as stored "
                                    f"with embedding/head copies; {_fmt(i.mtp_activated)} activated"),
        ("main + MTP as stored", f"{i.total + i.mtp_stored:,} ({_fmt(i.total + i.mtp_stored)})"),
        ("KV cache / token, latent (bf16)", f"{i.kv_latent_bytes:,} bytes "
                                            f"({cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} values x {i.n_layers} layers)"),
        ("KV cache / token, expanded (bf16)", f"{i.kv_expanded_bytes:,} bytes "
                                              f"({i.kv_expanded_bytes / i.kv_latent_bytes:.1f}x the latent cache)"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
