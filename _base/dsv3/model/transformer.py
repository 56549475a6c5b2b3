"""The DeepSeek-V3 decoder with its Multi-Token Prediction modules (SPEC §2, §5).

    h = embed(tokens)
    for each layer:  h = h + MLA(attn_norm(h));  h = h + FFN(ffn_norm(h))     FFN = dense SwiGLU or MoE
    logits = lm_head(norm(h))
    MTP module k = 1..D (training; position i, length T-k):
        x = eh_proj([enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)])       embedding first (engines' order)
        h^k = Block_k(x);  logits^k = lm_head(shared_head.norm(h^k))   predicts t_{i+k+1}
    h^0 is the main model's output after the final norm (vLLM / SGLang; SPEC §5.2 [U]).

Module names follow the Hugging Face checkpoint (`self_attn.q_a_proj`, `mlp.gate`, ...) so the
translation to disk (dsv3/checkpoint.py) only adds the `model.` prefix, splits the stacked experts
and moves `mtp.k` to `model.layers.{num_hidden_layers + k}`.

Build on the meta device and initialise in one place (`build_model` / `init_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import rope
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA
from dsv3.model.moe import Experts, MoE, Router

RECOMPUTE = ("none", "selective", "full")


def _ckpt(fn, *args):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        # activation recomputation in the backward (training only; `Transformer.set_recompute`):
        # "selective" = the paper's §3.2.2 choice, the RMSNorms and the MLA up-projections;
        # "full" = the whole block (only its input is kept)
        self.recompute = "none"

    def forward(self, h, cos, sin, attn_mask=None, with_balance=False, cache=None):
        if self.recompute == "full" and cache is None and torch.is_grad_enabled():
            return _ckpt(self._forward, h, cos, sin, attn_mask, with_balance, None)
        return self._forward(h, cos, sin, attn_mask, with_balance, cache)

    def _forward(self, h, cos, sin, attn_mask, with_balance, cache):
        sel = self.recompute == "selective" and cache is None and torch.is_grad_enabled()
        x = _ckpt(self.input_layernorm, h) if sel else self.input_layernorm(h)
        h = h + self.self_attn(x, cos, sin, attn_mask, cache)
        x = _ckpt(self.post_attention_layernorm, h) if sel else self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(x, with_balance)
            return h + y, stats
        return h + self.mlp(x), None


class SharedHead(nn.Module):
    """Holds only the MTP module's own final norm; the output matrix is the main lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(Block):
    """One MTP depth: a full (MoE) block plus enorm, hnorm, eh_proj and its own output norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, moe=cfg.n_routed_experts > 0)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, emb: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """emb, h_prev (B, T', D) -> block input (B, T', D). Embedding first, then hidden."""
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    mtp_logits: list[torch.Tensor]  # D entries; entry k-1 is (B, T-k, V) and predicts token i+k+1
    hidden: torch.Tensor  # (B, T, D) after the final norm
    expert_counts: torch.Tensor | None  # (L_moe, E) tokens per expert, main MoE layers then MTP layers
    balance: torch.Tensor | None  # scalar: sequence-wise balance term summed over MoE layers (without α)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_nextn_predict_layers))
        self.register_buffer("rope_inv_freq", torch.empty(cfg.qk_rope_head_dim // 2, dtype=torch.float32),
                             persistent=False)
        self.rope_factor = rope.cos_sin_factor(cfg)

    # --- helpers ---------------------------------------------------------------------------------
    def routers(self) -> list[Router]:
        """The MoE routers in the order of `ModelOutput.expert_counts` rows."""
        blocks = list(self.layers) + list(self.mtp)
        return [b.mlp.gate for b in blocks if isinstance(b.mlp, MoE)]

    def set_recompute(self, policy: str) -> None:
        """Activation recomputation for training: "none", "selective" (RMSNorms and MLA up-projections,
        paper §3.2.2) or "full" (every block keeps only its input). Same numbers, less memory."""
        if policy not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {policy!r}")
        for blk in list(self.layers) + list(self.mtp):
            blk.recompute = policy
            blk.self_attn.recompute_up = policy == "selective"

    def set_experts_impl(self, impl: str) -> None:
        if impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"experts impl must be 'auto', 'grouped' or 'loop', got {impl!r}")
        for m in self.modules():
            if isinstance(m, MoE):
                m.experts_impl = impl

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the RoPE frequencies stay fp32 whatever dtype the model is cast to
        if self.rope_inv_freq.dtype != torch.float32:
            self.rope_inv_freq = rope.inv_freq(self.config, device=self.rope_inv_freq.device)
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Non-learned buffers computed from the config (after `to_empty` or a checkpoint load)."""
        self.rope_inv_freq = rope.inv_freq(self.config, device=self.rope_inv_freq.device)

    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """The one place where weights are initialised: every matrix and the embedding N(0, std)
        (std = initializer_range, the paper's 0.006 by default), norm gains 1, correction bias 0."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std, generator=generator)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    p.normal_(0.0, std, generator=generator)
        self.init_buffers()

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                attn_mask: torch.Tensor | None = None, with_mtp: bool = True,
                with_balance: bool = False, cache=None) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput. position_ids (B, T) or (T,), default 0..T-1.
        attn_mask: None for causal attention, or boolean (B, 1, T, T), True where attention is allowed.
        cache: a latent KV cache (dsv3/inference/cache.py); then `cache.layer(i)` serves layer i, the
        absorbed attention runs, and MTP is left to `mtp_step`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)  # (1, T)
        cos, sin = rope.cos_sin(position_ids, self.rope_inv_freq, self.rope_factor)  # (B|1, T, rope/2)

        emb = self.embed_tokens(input_ids)  # (B, T, D)
        h = emb
        counts, balance = [], []
        for i, layer in enumerate(self.layers):
            h, stats = layer(h, cos, sin, attn_mask, with_balance, cache.layer(i) if cache is not None else None)
            if stats is not None:
                counts.append(stats.counts)
                if stats.balance is not None:
                    balance.append(stats.balance)
        h = self.norm(h)
        logits = self.lm_head(h)

        mtp_logits = []
        if with_mtp and cache is None:
            h_prev = h
            for k, mod in enumerate(self.mtp, start=1):
                Tk = T - k
                if Tk <= 0:
                    break
                x = mod.combine(emb[:, k:], h_prev[:, :Tk])  # token i+k with hidden at position i
                m = attn_mask[..., :Tk, :Tk] if attn_mask is not None else None
                h_prev, stats = mod(x, cos[:, :Tk], sin[:, :Tk], m, with_balance)
                if stats is not None:
                    counts.append(stats.counts)
                    if stats.balance is not None:
                        balance.append(stats.balance)
                mtp_logits.append(self.lm_head(mod.shared_head.norm(h_prev)))
        return ModelOutput(
            logits=logits,
            mtp_logits=mtp_logits,
            hidden=h,
            expert_counts=torch.stack(counts) if counts else None,
            balance=torch.stack(balance).sum() if balance else None,
        )


    def mtp_step(self, k: int, next_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                 cache) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module at inference (speculative drafting). next_ids (B, T): the token after each
        position; hidden (B, T, D): the previous depth's hidden (the main model's post-norm output for
        depth 1) at those positions; RoPE positions as the main model's. -> (hidden out, logits)."""
        mod = self.mtp[k]
        cos, sin = rope.cos_sin(position_ids, self.rope_inv_freq, self.rope_factor)
        x = mod.combine(self.embed_tokens(next_ids), hidden)
        h, _ = mod(x, cos, sin, None, False, cache)
        return h, self.lm_head(mod.shared_head.norm(h))


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0, init: bool = True) -> Transformer:
    """Construct on the meta device, allocate on `device`, then initialise (or leave empty for a
    checkpoint load, `init=False`)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model = model.to(dtype)
    if init:
        g = None
        if seed is not None:
            g = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator=g)
    else:
        model.init_buffers()
    return model
