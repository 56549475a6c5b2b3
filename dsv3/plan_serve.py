"""`dsv3 plan --serve`: per-GPU weight bytes, latent KV-cache capacity and the largest batch at a given
context for a serving layout (issue 17, item 5). Arithmetic only, from the config (no model is built):
the 671B plans in microseconds. The expert-parallel engine on GPUs sizes its PagedLatentCache with the same
formula (`cache_capacity`) from the weights it actually loaded, when no --cache-tokens is given.

Layout: N GPUs (--gpus) of G GiB (--gpu-mem).
  routed experts   expert parallelism EP = N: each rank holds (E + R) / EP routed experts of every MoE
                   layer (R = --redundant slots, the paper's redundant experts, §3.4); refused when
                   E + R is not a multiple of EP.
  attention, dense T = --attn-tp. T = 1: data-parallel attention (the paper's decode layout, §3.4.2):
                   every rank holds all attention, dense-FFN and shared-expert weights. T > 1: tensor
                   parallel over groups of T ranks (the paper's prefill: TP4 x DP8 on 32 GPUs). Split T
                   ways, Megatron-style: q_b_proj (or q_proj), kv_b_proj, the dense FFN and shared-expert
                   gate/up (column-parallel), o_proj and their down projections (row-parallel; an uneven
                   split is rounded up: the worst rank is reported). Replicated in the group: q_a_proj and
                   kv_a_proj_with_mqa (they produce the latents every head reads), RMSNorms, the router
                   and its correction bias, the MTP eh_proj. Refused when the heads are not divisible by T.
  embedding, head  replicated on every rank (not vocab-parallel: the conservative choice; a vocab-parallel
                   head over the TP group would save (T - 1)/T of it).
  MTP              held where the model has MTP modules, as `dsv3 serve` holds them (dsv3.model builds them
                   from the checkpoint, PagedLatentCache.for_model keeps their cache layers); their
                   embedding and head are the main model's; their attention adds cache layers. --no-mtp plans
                   without them (a checkpoint stripped of its MTP layers), --mtp insists on them.

Weight bytes (--weights): fp8 = the official FP8 set (SPEC §9, dsv3.checkpoints.hf.is_fp8_weight: every
attention and FFN projection incl. shared and routed experts, except the MTP eh_proj) in e4m3, 1 byte per
weight + one fp32 scale per 128x128 block (`weight_scale_inv`, ceil(rows/128) x ceil(cols/128) per
matrix, per rank's shard), everything else bf16; bf16 = every tensor at 2 bytes. (The correction bias,
fp32 in the checkpoint, is counted at 2 bytes: E values per layer.)

Cache (the latent cache, dsv3.inference.cache.PagedLatentCache): bytes per token = (num_hidden_layers
(+ the MTP layers held)) x (kv_lora_rank + qk_rope_head_dim) x 2 (bf16). Each rank keeps the cache of
its own sequences. Data-parallel attention: the sequences are split over the N ranks. TP attention: the
latent is shared by all heads, so every rank of a TP group keeps the whole cache of the group's
sequences (replicated, not split): N / T distinct caches.

Capacity per GPU: usable = G GiB x --mem-fraction (default 0.9, the allocator's and the runtime's
slack); free = usable - weights - reserve, reserve = --reserve-gib (default 4 GiB: activations of a
chunked prefill, MoE all-to-all buffers, CUDA graphs and NCCL workspaces; an estimate, not measured).
  cache tokens per GPU   free // bytes per token
  cache tokens in total  that x N / T (distinct sequences' tokens)
  max batch at context C per data-parallel group B = free // (C x bytes per token + V x 4): each sequence
                         needs C cache tokens and a fp32 logits row; in total B x N / T.
Weights larger than the GPU's whole memory are refused (the message says by how much); weights that
fit but leave no room for the reserve give a cache of 0 tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from dsv3.cliargs import setting
from dsv3.config import ModelConfig
from dsv3.plan import GiB, PlanError

BLOCK = 128  # FP8 scale blocks: 128 x 128 weights share one fp32 scale


@dataclass
class ServePlanConfig:
    """A serving layout beside PlanConfig's gpus / gpu_mem_gib; the fields are flags of `dsv3 plan --serve`."""
    attn_tp: int = setting(1, "--serve: tensor-parallel degree of attention, dense FFN and shared experts "
                              "(1 = data-parallel attention, replicated on every GPU)")
    redundant: int = setting(0, "--serve: redundant routed-expert slots per MoE layer (experts per GPU = "
                                "(E + R) / gpus)")
    weights: str = setting("fp8", "--serve: weight dtype: fp8 = the official FP8 set (e4m3 + fp32 128x128 scales), "
                                  "the rest bf16; bf16 = everything bf16", choices=("fp8", "bf16"))
    mtp: bool | None = setting(None, "--serve: the MTP module(s) held (weights and cache layers): by default where "
                                     "the model has them, as dsv3 serve does; --no-mtp: planned without them")
    mem_fraction: float = setting(0.9, "--serve: fraction of the GPU memory the server may use")
    reserve_gib: float = setting(4.0, "--serve: GiB kept for activations and workspaces (an estimate)")
    context: int = setting(4096, "--serve: tokens per sequence (prompt + output) for the largest batch")


@dataclass
class _Matrix:
    rows: int
    cols: int
    split: str  # "rep" (replicated in the TP group), "col" (rows / T) or "row" (cols / T)
    fp8: bool = True  # in the official FP8 set

    def shard(self, t: int) -> tuple[int, int]:
        if self.split == "col":
            return -(-self.rows // t), self.cols
        if self.split == "row":
            return self.rows, -(-self.cols // t)
        return self.rows, self.cols


def _scale_bytes(rows: int, cols: int) -> int:
    return math.ceil(rows / BLOCK) * math.ceil(cols / BLOCK) * 4


def _attention(cfg: ModelConfig) -> tuple[list[_Matrix], int]:
    """(matrices, other parameters) of one MLA block."""
    D, H, r = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_rope_head_dim
    qr, kvr = cfg.q_lora_rank, cfg.kv_lora_rank
    mats, other = [], 0
    if qr is None:
        mats.append(_Matrix(H * cfg.qk_head_dim, D, "col"))
    else:
        mats += [_Matrix(qr, D, "rep"), _Matrix(H * cfg.qk_head_dim, qr, "col")]
        other += qr  # q_a_layernorm
    mats += [_Matrix(kvr + r, D, "rep"), _Matrix(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), kvr, "col"),
             _Matrix(D, H * cfg.v_head_dim, "row")]
    return mats, other + kvr  # kv_a_layernorm


def _mlp(D: int, F: int) -> list[_Matrix]:
    return [_Matrix(F, D, "col"), _Matrix(F, D, "col"), _Matrix(D, F, "row")]


def _block(cfg: ModelConfig, kind: str) -> dict:
    """One block's tensors by table row: {"attention": (matrices, other), "dense": (matrices, other)};
    the routed experts are counted apart (_expert)."""
    D, E = cfg.hidden_size, cfg.n_routed_experts
    attn, attn_other = _attention(cfg)
    other = 2 * D  # the block's two RMSNorms
    if kind == "moe" or (kind == "mtp" and E > 0):
        dense = _mlp(D, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else []
        other += E * D + E  # router + correction bias
    else:
        dense = _mlp(D, cfg.intermediate_size)
    if kind == "mtp":
        dense = dense + [_Matrix(D, 2 * D, "rep", fp8=False)]  # eh_proj: bf16 in the official checkpoint
        other += 3 * D  # enorm, hnorm, shared_head.norm
    return {"attention": (attn, attn_other), "dense": (dense, other)}


def _expert(cfg: ModelConfig) -> list[_Matrix]:
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    return [_Matrix(I, D, "rep"), _Matrix(I, D, "rep"), _Matrix(D, I, "rep")]


@dataclass
class ServePlanResult:
    model: str
    gpus: int
    gpu_mem_gib: float
    cfg: ServePlanConfig
    ep: int
    dp_groups: int  # N / T distinct caches
    experts_per_gpu: int  # routed experts per MoE layer per GPU (redundant slots included)
    moe_layers: int  # MoE layers held (the MTP modules' included where held)
    weights: dict = field(default_factory=dict)  # bytes per GPU by component
    params_per_gpu: int = 0
    cache_bytes_per_token: int = 0
    cache_layers: int = 0
    main_layers: int = 0  # (cache_layers - main_layers: the MTP modules held)
    usable_bytes: float = 0.0
    reserve_bytes: float = 0.0
    free_bytes: float = 0.0
    cache_tokens_per_gpu: int = 0
    cache_tokens_total: int = 0
    max_batch_per_group: int = 0
    max_batch: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    def to_json(self) -> dict:
        d = asdict(self)
        d["weights"]["total"] = self.weight_bytes
        return d

    def format(self) -> str:
        c, T = self.cfg, self.cfg.attn_tp
        attn = "data-parallel (replicated per GPU)" if T == 1 else f"TP{T} x DP{self.dp_groups}"
        rows = [("model", self.model),
                ("layout", f"{self.gpus} x {self.gpu_mem_gib:g} GiB; EP{self.ep} ({self.experts_per_gpu} routed "
                           f"experts/GPU/layer, {c.redundant} redundant); attention {attn}; embedding/head "
                           f"replicated; MTP {'held' if self.cache_layers > self.main_layers else 'not held'}"),
                (f"weights per GPU ({c.weights})", f"{self.params_per_gpu / 1e9:.2f}B parameters")]
        rows += [(f"  {k}", f"{v / GiB:9.2f} GiB") for k, v in self.weights.items()]
        rows += [("  total", f"{self.weight_bytes / GiB:9.2f} GiB ({self.weight_bytes / 1e9:.1f} GB)"),
                 ("memory per GPU", f"{self.usable_bytes / GiB:.2f} GiB usable ({c.mem_fraction:g} x "
                                    f"{self.gpu_mem_gib:g}) - weights - {self.reserve_bytes / GiB:g} GiB reserve = "
                                    f"{self.free_bytes / GiB:.2f} GiB for the cache"),
                ("KV cache / token", f"{self.cache_bytes_per_token:,} bytes (latent, bf16, "
                                      f"{self.cache_layers} layers)"),
                ("cache tokens per GPU", f"{self.cache_tokens_per_gpu:,}"),
                ("cache tokens in total", f"{self.cache_tokens_total:,} ({self.dp_groups} distinct "
                                          f"cache{'s' if self.dp_groups > 1 else ''}"
                                          f"{'' if T == 1 else f', each replicated over TP{T}'})"),
                (f"max batch at {c.context:,} tokens", f"{self.max_batch:,} sequences ({self.max_batch_per_group:,} "
                                                        f"per data-parallel group x {self.dp_groups})")]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}".rstrip() for k, v in rows)


def cache_capacity(gpu_bytes: float, weight_bytes: float, bytes_per_token: int, mem_fraction: float = 0.9,
                   reserve_gib: float = 4.0) -> tuple[float, int]:
    """(free bytes, latent-cache tokens) of one GPU: free = gpu_bytes x mem_fraction - weights - reserve
    (>= 0), tokens = free // bytes per token. The plan's arithmetic (module docstring), and how the
    expert-parallel engine sizes its cache on a GPU when no --cache-tokens is given (dsv3/ep_serve.py, with
    the weights it measured)."""
    free = max(0.0, gpu_bytes * mem_fraction - weight_bytes - reserve_gib * GiB)
    return free, int(free // bytes_per_token)


def plan_serve(cfg: ModelConfig, sc: ServePlanConfig, gpus: int, gpu_mem_gib: float,
               name: str = "model") -> ServePlanResult:
    def need(cond, msg):
        if not cond:
            raise PlanError(msg)

    T, R, E = sc.attn_tp, sc.redundant, cfg.n_routed_experts
    for k, v in (("gpus", gpus), ("attn_tp", T), ("context", sc.context)):
        need(isinstance(v, int) and v >= 1, f"{k} must be an integer >= 1, got {v!r}")
    need(isinstance(R, int) and R >= 0, f"redundant must be an integer >= 0, got {R!r}")
    need(sc.weights in ("fp8", "bf16"), f"weights must be fp8 or bf16, got {sc.weights!r}")
    need(0 < sc.mem_fraction <= 1, f"mem_fraction must be in (0, 1], got {sc.mem_fraction}")
    need(sc.reserve_gib >= 0, f"reserve_gib must be >= 0, got {sc.reserve_gib}")
    need(gpus % T == 0, f"gpus ({gpus}) is not divisible by the attention TP degree ({T})")
    H = cfg.num_attention_heads
    need(H % T == 0, f"num_attention_heads ({H}) is not divisible by the attention TP degree ({T})")
    need(R == 0 or E > 0, f"redundant ({R}) > 0 but the model has no routed experts")
    need(E == 0 or (E + R) % gpus == 0,
         f"routed experts + redundant slots ({E} + {R} = {E + R}) are not divisible by EP = gpus ({gpus})")
    ep = gpus
    per_gpu = (E + R) // ep if E else 0

    fp8 = sc.weights == "fp8"
    need(sc.mtp is not True or cfg.num_nextn_predict_layers > 0, "--mtp, but the model has no MTP modules "
                                                                  "(num_nextn_predict_layers = 0)")
    n_mtp = cfg.num_nextn_predict_layers if sc.mtp is not False else 0  # None: as dsv3 serve, where the model has them
    L, n_moe = cfg.num_hidden_layers, cfg.num_moe_layers()
    blocks = {"dense": L - n_moe, "moe": n_moe, "mtp": n_mtp}
    moe_layers = n_moe + (n_mtp if E > 0 else 0)

    w = {"routed experts": 0, "attention": 0, "dense FFN + shared experts": 0, "norms, router, eh_proj": 0,
         "embedding + head": 0, "FP8 scales": 0}
    params = 0

    def add(mats, count, key, t):
        nonlocal params
        for m in mats:
            r, c = m.shard(t)
            params += count * r * c
            q = fp8 and m.fp8
            row = key if m.fp8 else "norms, router, eh_proj"
            w[row] += count * r * c * (1 if q else 2)
            if q:
                w["FP8 scales"] += count * _scale_bytes(r, c)

    for kind, n in blocks.items():
        if not n:
            continue
        parts = _block(cfg, kind)
        add(parts["attention"][0], n, "attention", T)
        add(parts["dense"][0], n, "dense FFN + shared experts", T)
        other = parts["attention"][1] + parts["dense"][1]
        params += n * other
        w["norms, router, eh_proj"] += n * other * 2
    add(_expert(cfg), moe_layers * per_gpu, "routed experts", 1)
    V, D = cfg.vocab_size, cfg.hidden_size
    params += 2 * V * D + D  # embedding, head, final norm
    w["embedding + head"] = (2 * V * D + D) * 2
    if not fp8:
        del w["FP8 scales"]
    weights = sum(w.values())
    mem = gpu_mem_gib * GiB
    need(weights <= mem, f"the weights need {weights / GiB:.2f} GiB per GPU ({sc.weights}), "
                         f"{(weights - mem) / GiB:.2f} GiB more than the {gpu_mem_gib:g} GiB of a GPU: "
                         f"use more GPUs{', FP8 weights' if not fp8 else ''} or a larger --attn-tp")

    layers = L + n_mtp
    bpt = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    usable, reserve = mem * sc.mem_fraction, sc.reserve_gib * GiB
    free, tokens = cache_capacity(mem, weights, bpt, sc.mem_fraction, sc.reserve_gib)
    groups = gpus // T
    batch = int(free // (sc.context * bpt + V * 4))
    return ServePlanResult(name, gpus, gpu_mem_gib, sc, ep, groups, per_gpu, moe_layers, w, params, bpt, layers, L,
                           usable, reserve, free, tokens, tokens * groups, batch, batch * groups)


def format_json(res: ServePlanResult) -> str:
    return json.dumps(res.to_json(), indent=2)
