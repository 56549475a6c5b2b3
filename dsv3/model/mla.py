"""Multi-head Latent Attention (SPEC §3; paper eqs. 1–11).

Queries go through a low-rank bottleneck (q_a_proj -> RMSNorm -> q_b_proj) unless q_lora_rank is
null (then a single q_proj). Keys and values share one compressed latent c_kv (kv_lora_rank dims,
RMS-normalised) plus one rotary key k_pe (qk_rope_head_dim dims) shared by every head; kv_b_proj
expands the latent into per-head k_nope and v. Inside each head vector the order is nope first,
rope last, and the kv_a output is latent first, rope last.

`forward` is the expanded ("naive") form used for training. `forward_absorbed` is the form used
with a latent KV cache (SPEC §3.5): per token only the normalised latent (kv_lora_rank) and the
rotated shared key (qk_rope_head_dim) are stored; W_UK (the key half of kv_b_proj) is folded into
the query and W_UV (the value half) is applied after attending over the latents:

    q_lat[h] = q_nope[h] @ W_UK[h]                      (nope -> kv_lora_rank)
    score[h, s] = (q_lat[h] . c_kv[s] + q_pe[h] . k_pe[s]) * scale
    o[h] = W_UV[h] @ (softmax_s(score[h]) @ c_kv)       (kv_lora_rank -> v_head_dim)

The two forms are the same function (tested). The cache object is duck-typed: the model never
manages memory, it only calls `cache.update(c_kv, k_pe)` (see dsv3/inference/cache.py) and computes
the attention above itself; a decode view that says `fused_decode` (the static decode steps on
CUDA, dsv3/inference/graphs.py) instead takes `cache.store(c_kv, k_pe)` and returns the
attended latents from `cache.attend(q_lat, q_pe, scale)` (a Triton kernel over the paged cache, the
same math: dsv3/kernels/reference.py `mla_decode_ref`). Where the latent store's kernel is switched on
such a view also takes the raw kv_a projection and the unrotated query rope part,
`cache.store_kv_a(kv_a, norm, cos, sin, q_pe)`: norm, both RoPEs and the cache write in one launch,
the same math as `_latent` and `apply_rope` (dsv3/kernels/reference.py `store_latents_ref`); where the
W_UK product takes the per-head GEMV too and the two are switched into one launch (kernels.set_mla_prep),
`cache.store_kv_a_uk(kv_a, norm, cos, sin, q_pe, q_nope, w_uk_t)` does both and returns q_lat as well.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3 import kernels
from dsv3.config import ModelConfig, softmax_scale
from dsv3.kernels import attention
from dsv3.model.fp8 import FP8Linear
from dsv3.model.layers import Linear, RMSNorm, hooked
from dsv3.model.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.scale = softmax_scale(cfg)
        D, H = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=False)
            # the latent norms use a fixed eps of 1e-6 (official code and HF), not rms_norm_eps
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=False)
        self.recompute_up = False  # set by Transformer.set_recompute("selective")
        self._absorbed = None  # FP8 kv_b_proj's W_UK / W_UV for inference (cache_absorbed_weights)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q_nope (B, T, H, nope), rotated q_pe (B, T, H, rope)."""
        return self._query(self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x), cos, sin)

    def _query(self, q_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first projection's output q_a (q_proj's, or q_a_proj's) -> q_nope, rotated q_pe."""
        q_nope, q_pe = self._query_heads(q_a)
        return q_nope, apply_rope(q_pe, cos, sin)

    def _query_heads(self, q_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_a (B, T, ·) -> q_nope (B, T, H, nope) and the unrotated q_pe (B, T, H, rope): views of the query
        (after q_b_proj in a q-LoRA model), each head's nope columns first, its rope columns last."""
        B, T, _ = q_a.shape
        q = q_a if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        return q_nope, q_pe

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> normalised latent c_kv (B, T, kv_lora_rank), rotated k_pe (B, T, rope).
        These two are all that a latent KV cache stores per token."""
        return self._latent(self.kv_a_proj_with_mqa(x), cos, sin)

    def _latent(self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw projection kv_a (B, T, kv_lora_rank + rope) -> normalised c_kv, rotated k_pe."""
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # one rope "head" shared by all heads
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Expanded attention (or the absorbed form when a latent cache is given). x (B, T, D); cos/sin (B|1, T, rope/2); attn_mask: None for causal, or a
        boolean (B, 1, T, T) mask (True = may attend), e.g. for packed samples kept apart."""
        if cache is not None and getattr(cache, "chunk", False):
            return self.forward_chunk(x, cos, sin, cache)
        if cache is not None and not getattr(cache, "prefill", False):
            return self.forward_absorbed(x, cos, sin, cache)
        B, T, _ = x.shape
        # down-projections (their outputs are small: q_lora_rank / kv_lora_rank + rope wide)
        q_a = self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x)
        kv_a = self.kv_a_proj_with_mqa(x)  # (B, T, kv_lora_rank + rope)
        if self.recompute_up and torch.is_grad_enabled():
            # paper §3.2.2: norms + up-projections + RoPE re-run in the backward, so only the small
            # down-projected latents (and attention's own q, k, v) stay alive between the passes
            q, k, v = torch.utils.checkpoint.checkpoint(self._up, q_a, kv_a, cos, sin, use_reentrant=False)
        else:
            q, k, v = self._up(q_a, kv_a, cos, sin)
        if cache is not None:
            # a prefill view (every sequence starts at position 0, so the new tokens are the whole context):
            # store the latents, then attend in the expanded form like training (causal; SDPA's fused
            # kernels keep memory linear in T, where the absorbed einsums hold B x H x T x T fp32 scores)
            c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
            cache.store(self.kv_a_layernorm(c_kv), apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2))
        o = attention(q, k, v, self.scale, attn_mask)  # (B, H, T, v); causal when attn_mask is None
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim)  # (B, T, H*v)
        return self.o_proj(o)

    # forward_chunk's bound on the up-projected context it holds at once (k and v of a group of heads over every
    # cached position): past it the heads are taken in groups, each attended on its own (heads are independent,
    # so the result is the same; only the launches multiply). Counted per head and position: kv_b's output (nope + v)
    # and the concatenated key (qk), which live together. 1 GiB: a 671B-shaped layer (128 heads, 896 bytes in bf16
    # per head and position) holds every head up to 9.3K positions; at 128K it takes 9 at a time, instead of the
    # 14 GiB all 128 would need.
    chunk_context_bytes = 1 << 30

    def forward_chunk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """A prompt chunk after cached positions (chunked prefill): x (B, T, D) the chunk's tokens. Stores their
        latents, then attends in the expanded form over every cached position: the cached latents are up-projected
        by kv_b_proj (as vLLM's MLA does for a prefill's cached context), so memory stays linear in the context
        (SDPA over (B, H, T, S) with the cache's causal mask), where the absorbed einsums would hold B x H x T x S
        fp32 scores; a long context is up-projected a group of heads at a time (`chunk_context_bytes`). The new
        tokens' keys come from the cache too: the same values the one-shot prefill computes with (the cache holds
        the normalised latent in the activations' dtype)."""
        B, T, _ = x.shape
        H = self.n_heads
        q_nope, q_pe = self.query(x, cos, sin)  # (B, T, H, nope), (B, T, H, rope)
        c_kv, k_pe = self.latent(x, cos, sin)
        c_all, pe_all, mask = cache.update(c_kv, k_pe, attn_mask=True)  # (B, S, C), (B, S, rope), (B, 1, T, S)
        S = c_all.shape[1]
        c_all, pe_all = c_all.to(x.dtype), pe_all.to(x.dtype)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, qk)
        per_head = B * S * (self.nope + self.v_dim + self.qk_dim) * x.element_size()  # kv_b's output + the key
        G = max(1, min(H, self.chunk_context_bytes // per_head))
        if G == H:  # the whole context at once, through kv_b_proj as the model holds it
            kv = self.kv_b_proj(c_all).view(B, S, H, self.nope + self.v_dim)
            o = self._attend_expanded(q, kv, pe_all, mask)
        else:  # G heads at a time: their rows of kv_b's weight (dequantised if FP8, as the absorbed path reads it)
            w_uk, w_uv = self.kv_b_weights(x.dtype)  # (H, nope, C), (H, v, C)
            w = torch.cat([w_uk, w_uv], dim=1)  # (H, nope + v, C)
            o = torch.cat([self._attend_expanded(q[:, h:h + G], torch.nn.functional.linear(
                c_all, w[h:h + G].flatten(0, 1)).view(B, S, -1, self.nope + self.v_dim), pe_all, mask)
                for h in range(0, H, G)], dim=1)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _attend_expanded(self, q: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, mask) -> torch.Tensor:
        """q (B, h, T, qk) of h heads, their up-projected context kv (B, S, h, nope + v) and the shared rotary keys
        pe (B, S, rope) -> the attention output (B, h, T, v)."""
        B, S, h, _ = kv.shape
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, S, h, nope), (B, S, h, v)
        k = torch.cat([k_nope, pe.unsqueeze(2).expand(B, S, h, self.rope)], dim=-1).transpose(1, 2)
        return attention(q, k, v.transpose(1, 2), self.scale, mask)

    def _up(self, q_a: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Down-projected q_a (B, T, q_lora_rank or H*qk) and kv_a (B, T, C + rope) -> q, k (B, H, T, qk), v (B, H, T, v)."""
        B, T, _ = q_a.shape
        H = self.n_heads
        q = q_a if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_a))
        q_nope, q_pe = q.view(B, T, H, self.qk_dim).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)  # (B, T, H, rope)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, rope): one key shared by all heads
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, T, H, nope), (B, T, H, v)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, qk)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope)], dim=-1).transpose(1, 2)
        return q, k, v.transpose(1, 2)

    def cache_absorbed_weights(self, dtype: torch.dtype) -> bool:
        """Inference on FP8 weights: dequantise kv_b_proj once into W_UK / W_UV in `dtype` (as vLLM's MLA does
        after loading), instead of in every absorbed forward (per layer and decode step a read of the e4m3
        weight, a write and a re-read of the 16-bit copy, and the kernels that do it). Costs 2 x kv_b's
        elements per layer (16b: 113 MB). Returns whether a copy exists (not for 16-bit weights, whose W_UK /
        W_UV are views). A valid copy is kept, not rebuilt: an engine built earlier on this model may hold
        CUDA graphs that read it. Invalidation: a move or cast (`_apply`) and a state-dict load drop it, a
        change of the head count (attention TP) or of the weight's storage or version makes it stale (then
        rebuilt here, and never used by `kv_b_weights` meanwhile); an FP8Linear's buffers are not trained."""
        lin = self.kv_b_proj
        if not hasattr(lin, "dequantized_weight"):
            self._absorbed = None
            return False
        key = (lin.weight.data_ptr(), lin.weight._version, self.n_heads, dtype)
        cached = self._absorbed
        if cached is not None and cached[0] == key:
            return True
        w = lin.dequantized_weight(dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        self._absorbed = (key, w[:, : self.nope], w[:, self.nope:])
        return True

    def _apply(self, fn, recurse=True):
        self._absorbed = None  # a device or dtype change: the next cache_absorbed_weights makes it again
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._absorbed = None  # new weights
        return super()._load_from_state_dict(*args, **kwargs)

    def kv_b_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, nope, C) and W_UV (H, v, C), views of kv_b_proj's weight (dequantised if FP8: the copy of
        `cache_absorbed_weights` when there is one for this dtype and head count)."""
        cached = self._absorbed
        if cached is not None and cached[0][2:] == (self.n_heads, dtype):  # (shapes and dtype: no device work)
            return cached[1], cached[2]
        lin = self.kv_b_proj
        w = lin.dequantized_weight(dtype) if hasattr(lin, "dequantized_weight") else lin.weight.to(dtype)
        w = w.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope:]

    def forward_absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """x (B, T, D): the new tokens. `cache.update(c_kv, k_pe)` stores their latents and returns every
        cached latent of each sequence, (B, S, C) and (B, S, rope), plus a boolean mask (B, 1, T, S).
        A decode view with `fused_decode` stores with `store` (or `store_kv_a`, which also rotates the query, or
        `store_kv_a_uk`, which also computes q_lat) and attends itself with `attend`."""
        B, T, _ = x.shape
        q_mod = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        kv_mod = self.kv_a_proj_with_mqa
        if (type(q_mod) is Linear and type(kv_mod) is Linear and q_mod.bias is None and kv_mod.bias is None
                and not hooked(q_mod, kv_mod)  # the fused call runs no module: hooks would not fire
                and kernels.select_backend("dense_gemv", x, q_mod.weight) == "triton"
                and kernels.select_backend("dense_gemv", x, kv_mod.weight) == "triton"):
            # the decode GEMV switched on: both projections of x in one launch (kv_a alone would leave most
            # SMs idle and cost a launch of its own)
            q_a, kv_a = kernels.dense_gemv2(x, q_mod.weight, kv_mod.weight, backend="triton")
            q_nope, q_pe = self._query_heads(q_a)
        elif (type(q_mod) is FP8Linear and type(kv_mod) is FP8Linear and not hooked(q_mod, kv_mod)
              and kernels.select_backend("fp8_weight_gemm", x) == "triton"):
            # FP8 weights (an FP8 checkpoint's FP8Linear) at decode: the same pair in one launch where the rows fit
            # its GEMV form (kernels.fp8_weight_linear2; else two launches, as the modules would run)
            q_a, kv_a = kernels.fp8_weight_linear2(x, q_mod.weight, q_mod.weight_scale_inv, kv_mod.weight,
                                                   kv_mod.weight_scale_inv)
            q_nope, q_pe = self._query_heads(q_a)
        else:
            q_nope, q_pe = self._query_heads(q_mod(x))  # (B, T, H, nope), (B, T, H, rope) not rotated yet
            kv_a = kv_mod(x)  # (B, T, C + rope)
        fused = getattr(cache, "fused_decode", False)
        norm_w = self.kv_a_layernorm.weight
        store = fused and kernels.select_backend("latent_store", kv_a, norm_w) == "triton"
        w_uk, w_uv = self.kv_b_weights(q_nope.dtype)
        # at decode sizes, where switched on (kernels.set_head_gemv), each head's product is the per-head GEMV
        # reading its matrix where it lies (W_UKᵀ along C, W_UV along C): the same sums, in another order
        w_uk_t = w_uk.transpose(1, 2)  # (H, C, nope)
        gemv = kernels.select_backend("head_gemv", q_nope, w_uk_t) == "triton"
        # where switched on (kernels.set_mla_prep): the fused store below and the W_UK GEMV in one launch (the same
        # bodies, so the same bits; the two are independent and read only the projections' output)
        prep = store and gemv and kernels.select_backend("mla_prep", kv_a, norm_w, q_nope, w_uk_t) == "triton"
        c_kv = k_pe = None
        if prep:
            q_lat, q_pe = cache.store_kv_a_uk(kv_a, self.kv_a_layernorm, cos, sin, q_pe, q_nope, w_uk_t)
        elif store:
            # where switched on (kernels.set_latent_store): the latent's norm, k_pe's RoPE and the cache write in
            # one kernel, and the query's RoPE in extra programs of that launch (read from the query where it lies,
            # in the same fp32 math as apply_rope: no RoPE kernel of its own)
            q_pe = cache.store_kv_a(kv_a, self.kv_a_layernorm, cos, sin, q_pe=q_pe)  # (B, T, H, rope) rotated
        else:
            q_pe = apply_rope(q_pe, cos, sin)  # (B, T, H, rope)
            c_kv, k_pe = self._latent(kv_a, cos, sin)  # (B, T, C), (B, T, rope)
        if not prep:
            q_lat = (kernels.head_gemv(q_nope, w_uk_t, backend="triton") if gemv
                     else torch.einsum("bthd,hdc->bthc", q_nope, w_uk))  # (B, T, H, C)
        if fused:
            if c_kv is not None:
                cache.store(c_kv, k_pe)
            if hasattr(cache, "attend_uv") and kernels.select_backend("mla_uv", q_lat, w_uv) == "triton":
                # where switched on (kernels.set_mla_uv): W_UV inside the attention's merge launch
                o = cache.attend_uv(q_lat, q_pe, self.scale, w_uv)  # (B, T, H, v)
                return self.o_proj(o.reshape(B, T, self.n_heads * self.v_dim))
            o_lat = cache.attend(q_lat, q_pe, self.scale)  # (B, T, H, C), query t causal over its sequence
        else:
            kv_all, pe_all, mask = cache.update(c_kv, k_pe)  # (B, S, C), (B, S, rope), (B, 1, T, S)
            scores = (torch.einsum("bthc,bsc->bhts", q_lat.float(), kv_all.float())
                      + torch.einsum("bthr,bsr->bhts", q_pe.float(), pe_all.float())) * self.scale  # (B, H, T, S)
            scores = scores.masked_fill(~mask, float("-inf"))
            p = scores.softmax(-1)
            o_lat = torch.einsum("bhts,bsc->bthc", p, kv_all.float()).to(x.dtype)  # (B, T, H, C)
        if kernels.select_backend("head_gemv", o_lat, w_uv) == "triton":
            o = kernels.head_gemv(o_lat, w_uv, backend="triton")  # (B, T, H, v)
        else:
            o = torch.einsum("bthc,hdc->bthd", o_lat, w_uv)  # (B, T, H, v)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.v_dim))
