"""The DeepSeek-V3 decoder with its Multi-Token Prediction modules (SPEC §2, §5).

    h = embed(tokens)
    for each layer:  h = h + MLA(attn_norm(h));  h = h + FFN(ffn_norm(h))     FFN = dense SwiGLU or MoE
    logits = lm_head(norm(h))
    MTP module k = 1..D (training; position i, length T-k):
        x = eh_proj([enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)])       embedding first (engines' order)
        h^k = Block_k(x);  logits^k = lm_head(shared_head.norm(h^k))   predicts t_{i+k+1}
    h^0 is the main model's output after the final norm (vLLM / SGLang; SPEC §5.2 [U]).

Module names follow the Hugging Face checkpoint (`self_attn.q_a_proj`, `mlp.gate`, ...) so the
translation to disk (dsv3/checkpoints/hf.py) only adds the `model.` prefix, splits the stacked experts
and moves `mtp.k` to `model.layers.{num_hidden_layers + k}`.

Build on the meta device and initialise in one place (`build_model` / `init_weights`).

Parts (pipeline stages): `Transformer.part` returns a model that holds only some of these modules,
the same module objects (so FP8 module swaps and per-block `torch.compile` applied before the split
carry over, and the state-dict names stay `layers.{i}...`, `embed_tokens.weight`, ...). What a part
does not hold is None in its slot: `layers[i]` (the list keeps its length, so `layers[i]` and
`enumerate(layers)` still speak of global layer indices, and so does `cache.layer(i)`),
`embed_tokens`, `norm`, `lm_head`; the MTP modules are held all together with the head (their chain
h^{k-1} -> h^k runs in one forward) or not at all (`mtp` empty). The one forward serves both
(torchtitan's decoder does the same; a second forward in the pipeline code would drift):

    input (B, T) token ids       -> embed_tokens (must be held)
    input (B, T, D) hidden state -> the previous part's output, used as it is (the first argument
                                    keeps its name `input_ids`, which callers pass by keyword)
    layers[i] None               -> skipped
    norm / lm_head None          -> ModelOutput(logits=None, hidden=the un-normed h) for the next part
    mtp held                     -> needs the token ids: the input itself, or `tokens=` with a hidden state
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import rope
from dsv3.model.layers import MLP, Linear, RMSNorm
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
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, emb: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """emb, h_prev (B, T', D) -> block input (B, T', D). Embedding first, then hidden."""
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V); None from a part without the head
    mtp_logits: list[torch.Tensor]  # D entries; entry k-1 is (B, T-k, V) and predicts token i+k+1
    hidden: torch.Tensor  # (B, T, D) after the final norm (before it, from a part without the head)
    expert_counts: torch.Tensor | None  # (L_moe, E) tokens per expert, main MoE layers then MTP layers
    #                                     (a part: the MoE blocks it holds, in the same order)
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
    def blocks(self) -> list[Block]:
        """The blocks this model holds: the main layers in order, then the MTP modules (all of them
        for the full model; a part's own, skipping the None slots)."""
        return [b for b in self.layers if b is not None] + list(self.mtp)

    def routers(self) -> list[Router]:
        """The MoE routers in the order of `ModelOutput.expert_counts` rows."""
        return [b.mlp.gate for b in self.blocks() if isinstance(b.mlp, MoE)]

    def set_recompute(self, policy: str) -> None:
        """Activation recomputation for training: "none", "selective" (RMSNorms and MLA up-projections,
        paper §3.2.2) or "full" (every block keeps only its input). Same numbers, less memory."""
        if policy not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {policy!r}")
        for blk in self.blocks():
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
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None,
                     seed: int | None = None) -> None:
        """The one place where weights are initialised: every matrix and the embedding N(0, std)
        (std = initializer_range, the paper's 0.006 by default), norm gains 1, correction bias 0.

        Random numbers: with `seed`, every tensor draws from a generator of its own, seeded from the seed
        and the tensor's name (each routed expert from its global index: `Experts.expert_offset` + local),
        so the values do not depend on which other tensors a process holds. A pipeline stage or an
        expert-parallel slice built on the meta device and initialised alone (dsv3/distributed/pipeline.py)
        then equals the same tensors of the whole model built with that seed. Else one `generator` (or
        torch's global one) draws for the tensors in module order."""
        std = self.config.initializer_range if std is None else std

        def normal_(t: torch.Tensor, name: str) -> None:
            g = generator
            if seed is not None:
                g = torch.Generator(device=t.device).manual_seed(tensor_seed(seed, name))
            t.normal_(0.0, std, generator=g)

        for name, m in self.named_modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                normal_(m.weight, f"{name}.weight")
            elif isinstance(m, Router):
                normal_(m.weight, f"{name}.weight")
                m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                for pname in ("gate_proj", "up_proj", "down_proj"):
                    p = getattr(m, pname)
                    if seed is None:
                        normal_(p, "")
                        continue
                    for j in range(p.shape[0]):  # expert by expert: a slice draws what the whole tensor draws
                        normal_(p[j], f"{name}.{pname}[{getattr(m, 'expert_offset', 0) + j}]")
        self.init_buffers()

    # --- partial models ----------------------------------------------------------------------------
    def part(self, layers, *, embed: bool = False, head: bool = False, mtp: bool = False) -> "Transformer":
        """A model holding only main layers `layers` (global indices), the embedding if `embed`, the
        final norm and lm_head if `head`, all MTP modules if `mtp` (which share the embedding and the
        head, so they need both): the same module objects as this model, everything else None (module
        docstring). A pipeline stage is such a part (dsv3/distributed/pipeline.py)."""
        keep = set(layers)
        if not keep <= set(range(len(self.layers))):
            raise ValueError(f"layers {sorted(keep)} outside 0..{len(self.layers) - 1}")
        if mtp and not (embed and head):
            raise ValueError("the MTP modules share the embedding and the output head: mtp=True needs embed=True "
                             "and head=True")
        with torch.device("meta"):  # every attribute __init__ sets; the module slots are replaced below
            p = type(self)(self.config)
        p.embed_tokens = self.embed_tokens if embed else None
        p.layers = nn.ModuleList(blk if i in keep else None for i, blk in enumerate(self.layers))
        p.norm = self.norm if head else None
        p.lm_head = self.lm_head if head else None
        p.mtp = nn.ModuleList(self.mtp if mtp else [])
        p.rope_inv_freq = self.rope_inv_freq.clone()
        p.training = self.training  # (not .train(): that would also set the shared modules)
        return p

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                tokens: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                with_mtp: bool = True, with_balance: bool = False, cache=None,
                logits_at: torch.Tensor | None = None) -> ModelOutput:
        """input_ids: token ids (B, T); on a part without the embedding (a later pipeline stage) the
        hidden state (B, T, D) the part before it returned -> ModelOutput. position_ids (B, T) or (T,),
        default 0..T-1. tokens (B, T): the token ids, needed where the input is a hidden state and this
        part holds the MTP modules. attn_mask: None for causal attention, or boolean (B, 1, T, T), True
        where attention is allowed. cache: a latent KV cache (dsv3/inference/cache.py); then
        `cache.layer(i)` serves layer i, the absorbed attention runs, and MTP is left to `mtp_step`.
        logits_at (B,): compute the logits only at that position of each row, (B, 1, V) (a prefill needs
        the last prompt position's; all T positions' would be B x T x V floats)."""
        if input_ids.dim() == 2:  # token ids
            if self.embed_tokens is None:
                raise ValueError("this part of the model holds no embedding: pass the hidden state (batch, seq, dim)")
            tokens = input_ids
            emb = self.embed_tokens(input_ids)  # (B, T, D)
            h = emb
        elif input_ids.dim() == 3:  # the previous part's hidden state
            emb, h = None, input_ids
        else:
            raise ValueError(f"input_ids must be token ids (batch, seq) or a hidden state (batch, seq, dim), got "
                             f"shape {tuple(input_ids.shape)}")
        T = h.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)  # (1, T)
        cos, sin = rope.cos_sin(position_ids, self.rope_inv_freq, self.rope_factor)  # (B|1, T, rope/2)

        counts, balance = [], []
        for i, layer in enumerate(self.layers):
            if layer is None:  # held by another part
                continue
            h, stats = layer(h, cos, sin, attn_mask, with_balance, cache.layer(i) if cache is not None else None)
            if stats is not None:
                counts.append(stats.counts)
                if stats.balance is not None:
                    balance.append(stats.balance)
        if self.norm is None:  # a part before the head: the residual stream goes on to the next part
            return _output(None, [], h, counts, balance)
        h = self.norm(h)
        if logits_at is not None:  # (B,): one position per row (prefill: the last prompt token) -> logits (B, 1, V)
            B, _, D = h.shape
            logits = self.lm_head(h.gather(1, logits_at.view(B, 1, 1).expand(B, 1, D)))
        else:
            logits = self.lm_head(h)

        mtp_logits = []
        if with_mtp and cache is None and len(self.mtp):
            if emb is None:
                if tokens is None:
                    raise ValueError("the MTP modules embed the tokens ahead: pass tokens= (batch, seq) with a "
                                     "hidden-state input")
                emb = self.embed_tokens(tokens)  # (B, T, D)
            h_prev = h
            for k, mod in enumerate(self.mtp, start=1):
                Tk = T - k
                if Tk <= 0:
                    break
                xk = mod.combine(emb[:, k:], h_prev[:, :Tk])  # token i+k with hidden at position i
                m = attn_mask[..., :Tk, :Tk] if attn_mask is not None else None
                h_prev, stats = mod(xk, cos[:, :Tk], sin[:, :Tk], m, with_balance)
                if stats is not None:
                    counts.append(stats.counts)
                    if stats.balance is not None:
                        balance.append(stats.balance)
                mtp_logits.append(self.lm_head(mod.shared_head.norm(h_prev)))
        return _output(logits, mtp_logits, h, counts, balance)

    def mtp_step(self, k: int, next_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                 cache, select: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module at inference (speculative drafting). next_ids (B, T): the token after each
        position; hidden (B, T, D): the previous depth's hidden (the main model's post-norm output for
        depth 1) at those positions; RoPE positions as the main model's. -> (hidden out (B, T, D),
        logits (B, T, V)); with select (B,), only position select[b] of each row: (B, D), (B, V)."""
        mod = self.mtp[k]
        cos, sin = rope.cos_sin(position_ids, self.rope_inv_freq, self.rope_factor)
        x = mod.combine(self.embed_tokens(next_ids), hidden)
        h, _ = mod(x, cos, sin, None, False, cache)
        if select is not None:  # (the head only where a draft is read)
            B, _, D = h.shape
            h = h.gather(1, select.view(B, 1, 1).expand(B, 1, D))[:, 0]
        return h, self.lm_head(mod.shared_head.norm(h))


def _output(logits, mtp_logits, h, counts: list, balance: list) -> ModelOutput:
    return ModelOutput(
        logits=logits,
        mtp_logits=mtp_logits,
        hidden=h,
        expert_counts=torch.stack(counts) if counts else None,
        balance=torch.stack(balance).sum() if balance else None,
    )


def tensor_seed(seed: int, name: str) -> int:
    """The seed of tensor `name`'s generator under run seed `seed` (Transformer.init_weights): 63 bits of
    BLAKE2b over both (stable across processes and Python versions, unlike hash())."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little") >> 1


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0, init: bool = True) -> Transformer:
    """Construct on the meta device, allocate on `device`, then initialise (or leave empty for a
    checkpoint load, `init=False`). Refuses first (dsv3.memory.InsufficientMemoryError) when the
    weights, counted from the config, exceed the memory `device` has available. device "meta": the
    model stays on the meta device, uninitialised (a pipeline rank allocates and initialises only its
    stages: `to_empty`, then `init_weights(seed=seed)`, which gives the same values)."""
    from dsv3.info import param_count
    from dsv3.memory import ensure_fits

    n = param_count(cfg.validate())
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return Transformer(cfg).to(dtype)
    ensure_fits(n * dtype.itemsize, device, f"for its {str(dtype).removeprefix('torch.')} weights ({n:,} parameters)")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model = model.to(dtype)
    if init:
        model.init_weights(seed=seed)
    else:
        model.init_buffers()
    return model
