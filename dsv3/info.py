"""Parameter and KV-cache accounting, computed arithmetically from the config: no model is built, so
`dsv3 info`, `dsv3 plan` and the memory checks cost the same for 4 layers or 10^12. The formulas mirror
the modules (tests/test_info.py checks them against a model built on the meta device). SPEC §7 has
the expected figures for the 671B config.

Per block (D hidden, V vocab, H heads, qr/kvr q/kv latent ranks, r rope dims, dqk = nope + r, dv,
F dense FFN width, E experts, K top-k, I expert width, S shared experts):
    attention   q: D·qr + qr + qr·H·dqk (q-LoRA) or D·H·dqk;  kv: D·(kvr + r) + kvr + kvr·H·(nope + dv);  o: H·dv·D
    dense       attention + 2D (two RMSNorms) + 3·D·F
    MoE         attention + 2D + E·D (router) + E (correction bias, a buffer) + 3·D·S·I (shared)
                + 3·E·I·D (routed experts; a token uses K of the E)
    MTP module  an MoE block (dense when E = 0) + 3D (enorm, hnorm, shared_head.norm) + 2D·D (eh_proj)
    model       V·D (embedding) + blocks + D (final norm) + V·D (lm_head)
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig


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


def attention_params(cfg: ModelConfig) -> int:
    D, H, r = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_rope_head_dim
    qr, kvr = cfg.q_lora_rank, cfg.kv_lora_rank
    q = D * H * cfg.qk_head_dim if qr is None else D * qr + qr + qr * H * cfg.qk_head_dim
    kv = D * (kvr + r) + kvr + kvr * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * cfg.hidden_size


def routed_expert_params(cfg: ModelConfig) -> int:
    """One routed expert (gate, up and down projections)."""
    return 3 * cfg.moe_intermediate_size * cfg.hidden_size


def block_params(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """(parameters outside the routed experts, routed-expert parameters) of one block; kind is "dense",
    "moe" or "mtp". The router's correction bias (a buffer, saved with the model) counts as a parameter."""
    D, E = cfg.hidden_size, cfg.n_routed_experts
    base = attention_params(cfg) + 2 * D
    moe = kind == "moe" or (kind == "mtp" and E > 0)
    if moe:
        own = base + E * D + E + 3 * D * cfg.n_shared_experts * cfg.moe_intermediate_size
        routed = E * routed_expert_params(cfg)
    else:
        own, routed = base + 3 * D * cfg.intermediate_size, 0
    if kind == "mtp":
        own += 3 * D + 2 * D * D
    return own, routed


def param_count(cfg: ModelConfig) -> int:
    """Every parameter the model holds (main model + MTP modules, correction biases included)."""
    i = model_info(cfg)
    return i.total + i.mtp_unique


def model_info(cfg: ModelConfig) -> ModelInfo:
    L, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    n_moe = cfg.num_moe_layers()
    embed = head = cfg.vocab_size * cfg.hidden_size
    dense, _ = block_params(cfg, "dense")
    moe = sum(block_params(cfg, "moe"))
    mtp_own, mtp_routed = block_params(cfg, "mtp")
    inactive = (cfg.n_routed_experts - cfg.num_experts_per_tok) * routed_expert_params(cfg)  # per MoE block
    total = embed + (L - n_moe) * dense + n_moe * moe + cfg.hidden_size + head
    mtp_unique = n_mtp * (mtp_own + mtp_routed)
    activated = total - n_moe * inactive
    bf16 = 2
    return ModelInfo(
        total=total,
        activated=activated,
        activated_no_embedding=activated - embed,
        mtp_unique=mtp_unique,
        mtp_stored=mtp_unique + n_mtp * (embed + head),
        mtp_activated=mtp_unique - (n_mtp * inactive if mtp_routed else 0),
        kv_latent_bytes=L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bf16,
        kv_expanded_bytes=L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * bf16,
        n_layers=L,
        n_moe_layers=n_moe,
    )


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# The parameter counts of a model, named once. `dsv3 info`, `dsv3 train`'s start line and the README use
# these names, so a user never has to reconcile three different figures for one model:
#   main model           what predicts the next token: embedding, layers, final norm, head ("671B")
#   MTP modules          the multi-token-prediction modules' own weights (they share the embedding and head)
#   as stored            everything in a run's checkpoint file: main model + MTP modules (the embedding and
#                        head once). The official layout (`dsv3 convert`, `dsv3 quantize`, save_pretrained)
#                        adds a copy of both per MTP layer: ModelInfo.mtp_stored, the hub's "685B".
#   activated per token  the main-model parameters one token uses (its top-k routed experts)
def param_counts(cfg: ModelConfig) -> dict[str, int]:
    i = model_info(cfg)
    return {"main model": i.total, "MTP modules": i.mtp_unique, "as stored": i.total + i.mtp_unique,
            "activated per token": i.activated}


def param_line(cfg: ModelConfig) -> str:
    """The counts on one line, as `dsv3 info` and `dsv3 train` print them:
    "main model 5.05M, MTP modules 1.10M, as stored 6.15M, activated per token 3.06M" (the tiny preset)."""
    return ", ".join(f"{name} {_fmt(n)}" for name, n in param_counts(cfg).items())


def format_info(cfg: ModelConfig, name: str) -> str:
    i = model_info(cfg)
    n = param_counts(cfg)
    rows = [
        ("model", name),
        ("layers", f"{i.n_layers} ({i.n_layers - i.n_moe_layers} dense, {i.n_moe_layers} MoE) "
                   f"+ {cfg.num_nextn_predict_layers} MTP"),
        ("experts", f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
                    f"top-{cfg.topk_group} groups) + {cfg.n_shared_experts} shared"),
        ("parameters", param_line(cfg)),
        ("  main model", f"{n['main model']:,}: embedding, layers, final norm, head (what predicts the next token)"),
        ("  MTP modules", f"{n['MTP modules']:,}: their own weights (embedding and head shared with the main "
                          f"model); {_fmt(i.mtp_activated)} activated per token"),
        ("  as stored", f"{n['as stored']:,}: main model + MTP modules, what a run's checkpoint holds; "
                        f"{_fmt(i.total + i.mtp_stored)} in the official layout (dsv3 convert / quantize), "
                        "which adds an embedding and head copy per MTP layer"),
        ("  activated per token", f"{n['activated per token']:,}: the main model's weights one token uses ("
                                  + (f"top-{cfg.num_experts_per_tok} of {cfg.n_routed_experts} routed experts per "
                                     "MoE layer" if i.n_moe_layers else "all of them: no MoE layer")
                                  + f"); {_fmt(i.activated_no_embedding)} without the embedding"),
        ("KV cache / token, latent (bf16)", f"{i.kv_latent_bytes:,} bytes "
                                            f"({cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} values x {i.n_layers} layers)"),
        ("KV cache / token, expanded (bf16)", f"{i.kv_expanded_bytes:,} bytes "
                                              f"({i.kv_expanded_bytes / i.kv_latent_bytes:.1f}x the latent cache)"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
