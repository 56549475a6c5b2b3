"""The kernel seam: operations, each of which picks its backend in one place (`backend.py`) from the
tensors' device, the GPU's capability and whether triton / `F.scaled_mm` exist. Callers ask for an
operation ("quantise this", "FP8 GEMM this", "decode attention over this cache", "AdamW step these")
and never probe for Triton or the GPU. Every operation has a plain-PyTorch reference in
`reference.py` (the specification; what runs on the CPU) and a parity test; accelerated backends are
optional.

    operation                                           accelerated backend (where: backend.py)
    act_quant, act_dequant, weight_quant, weight_dequant  - (reference only)
    act_quant_cm, act_quant_t, weight_quant_pad(_t)     "triton" (fp8_triton.py)
    fp8_gemm_fwd, fp8_gemm_bwd                          "scaled_mm" (F.scaled_mm + fp8_triton.py)
    fp8_linear                                          the two above as one differentiable custom op (no
                                                        graph break under torch.compile)
    fp8_grouped_gemm_fwd, fp8_grouped_gemm_bwd          "triton" (fp8_grouped_triton.py)
    fp8_grouped_linear                                  the two above as one differentiable custom op
    fp8_weight_linear, fp8_expert_rows                  "triton" (fp8_gemm_triton.py)
    fp8_weight_linear2                                  "triton" (dense_gemv_triton.py's dual launch)
    expert_gemv, swiglu_gemv                            "triton" (expert_gemv_triton.py; swiglu_gemv
                                                        switched with dense_gemv; the shared experts in its
                                                        launches: set_shared_gemv, on for e4m3 weights)
    moe_gemm_swiglu, moe_gemm_down                      "triton" (moe_gemm_triton.py; switched:
                                                        set_moe_gemm, on by default)
    dense_gemv, dense_gemv2                             "triton" (dense_gemv_triton.py; switched:
                                                        set_dense_gemv, on by default)
    head_gemv                                           "triton" (head_gemv_triton.py; switched:
                                                        set_head_gemv, on by default)
    store_latents                                       "triton" (latent_store_triton.py; switched:
                                                        set_latent_store, on by default)
    mla_prep                                            "triton" (mla_prep_triton.py: store_latents and the W_UK
                                                        head_gemv in one launch; switched: set_mla_prep, on)
    mla_decode                                          "triton" (mla_decode_triton.py)
    mla_decode_uv                                       "triton" (mla_decode_triton.py; switched:
                                                        set_mla_uv, on by default, one query row)
    adamw_step_                                         "triton" (adamw_triton.py)
    router_topk                                         "triton" (router_triton.py)
    hashed_race (called by inference/sampling.py's      "triton" (race_triton.py; not under torch.compile,
    BatchSampler.draw, which holds the reference)       which fuses the reference)
    attention                                           SDPA, cuDNN first on CUDA (attention.py); in the
                                                        batch-invariant mode invariant_triton.py's
    set_batch_invariant, batch_invariant                the batch-invariant mode (invariant.py): aten's CUDA
                                                        GEMMs / means / softmaxes replaced by fixed-tile Triton
                                                        kernels (invariant_triton.py), row-count-chosen kernels
                                                        aside, the rest fixed per row

Each operation takes `backend=` (None: choose); `use_backend(...)` forces the automatic choices in a
`with` block (tests, benchmarks); `select_backend(op, *tensors)` tells what would run (callers that
pick an algorithm by it: FP8Experts, DecodeGraphs, AdamW.fused); `backend_available(op, device)` tells
whether an op's accelerated backend exists on a device at all. The Triton modules are imported on
first use only: importing dsv3 never imports triton.
"""

from __future__ import annotations

import math

import torch

from dsv3.kernels import reference
from dsv3.kernels.attention import attention
from dsv3.kernels.backend import available as backend_available
from dsv3.kernels.backend import select as select_backend
from dsv3.kernels.backend import switch as _switch
from dsv3.kernels.backend import use_backend
from dsv3.kernels.fp8 import (act_quant_cm, act_quant_t, fp8_expert_rows, fp8_gemm_bwd, fp8_gemm_fwd, fp8_linear,
                              fp8_grouped_gemm_bwd, fp8_grouped_gemm_fwd, fp8_grouped_linear, fp8_weight_linear,
                              fp8_weight_linear2,
                              weight_quant_pad, weight_quant_pad_t)
from dsv3.kernels.reference import (BLOCK, FP8_MAX, act_dequant, act_quant, dense_gemv_ref, expert_gemv_ref,
                                    expert_ids, head_gemv_ref, mla_decode_ref, moe_gemm_ref, router_topk_ref,
                                    store_latents_ref, weight_dequant, weight_quant)

__all__ = ["BLOCK", "batch_invariant", "set_batch_invariant",
           "FP8_MAX", "act_dequant", "act_quant", "act_quant_cm", "act_quant_t",
           "adamw_backend",
           "adamw_step_", "attention", "backend_available", "dense_gemv", "dense_gemv2", "dense_gemv_ref",
           "expert_gemv", "expert_ids",
           "expert_gemv_ref", "fp8_expert_rows", "fp8_gemm_bwd", "fp8_gemm_fwd", "fp8_grouped_gemm_bwd", "fp8_linear",
           "fp8_grouped_linear",
           "fp8_grouped_gemm_fwd", "fp8_weight_linear", "fp8_weight_linear2", "head_gemv", "head_gemv_ref",
           "mla_decode", "mla_decode_ref",
           "mla_decode_uv", "set_mla_uv", "mla_prep", "set_mla_prep",
           "moe_gemm_down", "moe_gemm_ref", "moe_gemm_swiglu", "set_moe_gemm",
           "router_topk", "router_topk_ref", "select_backend", "set_dense_gemv", "set_head_gemv", "set_latent_store",
           "set_pdl", "set_shared_gemv", "store_latents", "store_latents_ref", "swiglu_gemv", "use_backend",
           "weight_dequant", "weight_quant",
           "weight_quant_pad", "weight_quant_pad_t"]


def set_batch_invariant(on: bool) -> bool:
    """Turn the batch-invariant mode on or off, process-wide (dsv3/kernels/invariant.py: every result of a row the
    same bits whatever its batch; CUDA and triton); returns the previous setting."""
    from dsv3.kernels import invariant

    return invariant.set_mode(on)


def batch_invariant() -> bool:
    """Whether the batch-invariant mode is on (`set_batch_invariant`)."""
    from dsv3.kernels import backend

    return backend.BATCH_INVARIANT


def expert_gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, expert: torch.Tensor, x_div: int = 1,
                up: torch.Tensor | None = None, up_s: torch.Tensor | None = None, *,
                extra: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
                routed: int = 0, backend: str | None = None) -> torch.Tensor:
    """Routed experts of a decode step, one output row per (token, expert) pair (the contract:
    `reference.expert_gemv_ref`): x (T, K), w (E, N, K) in x's dtype or e4m3 with 128x128 scales s, expert
    (M,) -> y (M, N), row m = x[m // x_div] through expert[m] (0 where < 0); with `up`, silu(x·wᵀ) * (x·upᵀ).
    extra: a second stack (w2, s2, up2, up_s2) of E2 experts stored as the first, any strides but K's 1 (the shared
    experts as views of their matrices, MoE.shared_stacks): ids E .. E + E2 - 1 name them, as if the stacks were one.
    routed > 0 (with extra): `expert` holds `routed` ids a token (T·routed,) and every token also takes each of the
    E2 experts after them: the rows of `expert_ids(expert, routed, E, E2)`, without launching that concatenation
    (MoE.forward_gemv at decode: one launch a MoE layer fewer).
    "triton": one program per row and weight tile, no sort (expert_gemv_triton.py)."""
    M = reference.routed_rows(expert, routed, extra)
    assert x.dim() == 2 and w.dim() == 3 and expert.dim() == 1 and x.shape[0] * x_div >= M, \
        f"expert_gemv: x (T, K), w (E, N, K), expert (M <= T * x_div,); got {tuple(x.shape)}, {tuple(w.shape)}, " \
        f"{tuple(expert.shape)}, x_div {x_div}, routed {routed}"
    if select_backend("expert_gemv", x, backend=backend) == "triton":  # (its launch checks the arguments)
        from dsv3.kernels import expert_gemv_triton as k

        if extra is not None:
            w2, s2, u2, us2 = extra
            if up is None:
                return k.expert_gemv_two_op(x, w, s, w2, s2, expert, x_div, routed)
            return k.expert_swiglu_gemv_two_op(x, w, s, up, up_s, w2, s2, u2, us2, expert, x_div, routed)
        if up is None:
            return k.expert_gemv_op(x, w, s, expert, x_div)
        return k.expert_swiglu_gemv_op(x, w, s, up, up_s, expert, x_div)
    reference.check_expert_gemv_args(x, w, s, up, up_s)
    if extra is not None:  # the reference: the stacks as one
        reference.check_second_stack(w, s, up, extra)
        if routed:
            expert = expert_ids(expert, routed, w.shape[0], extra[0].shape[0])
        w, s, up, up_s = (None if a is None else torch.cat([a, b]) for a, b in zip((w, s, up, up_s), extra))
    return reference.expert_gemv_ref(x, w, s, expert, x_div, up, up_s)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None,
               backend: str | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) · w (N, K)ᵀ, w in x's dtype (bf16 / fp16 / fp32), no bias (the contract:
    `reference.dense_gemv_ref`, fp32 sums, one rounding to `out_dtype`: None for x's dtype, float32 for the
    unrounded sums, the router's logits). "triton": the decode GEMV (dense_gemv_triton.py, a
    custom op: opaque to torch.compile, capturable in a CUDA graph), for up to 4 rows; no backward. The
    automatic choice takes it only while switched on (`set_dense_gemv`); the model's dense linears ask
    `select_backend("dense_gemv", x, w)` first and run F.linear otherwise (dsv3/model/layers.py `Linear`)."""
    if select_backend("dense_gemv", x, w, backend=backend) == "triton":  # (its launch checks the arguments)
        from dsv3.kernels.dense_gemv_triton import dense_gemv_op

        reference.check_dense_gemv_args(x, w, out_dtype=out_dtype)  # (before the op: a clear error, not its schema's)
        y = dense_gemv_op(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), w, out_dtype == torch.float32)  # (M, N)
        return y.view(*x.shape[:-1], y.shape[-1])
    reference.check_dense_gemv_args(x, w, out_dtype=out_dtype)
    return reference.dense_gemv_ref(x, w, out_dtype)


def head_gemv(x: torch.Tensor, w: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """y (..., H, N) = einsum("...hk,hnk->...hn", x (..., H, K), w (H, N, K)): each head's rows times its own
    matrix, w in x's dtype (the contract: `reference.head_gemv_ref`, fp32 sums, one rounding). "triton": the
    per-head decode GEMV (head_gemv_triton.py, a custom op), for up to 4 rows, w read along K or N as it is
    stored (absorbed MLA's W_UV and W_UKᵀ, views of kv_b_proj's weight); no backward. The automatic choice takes
    it only while switched on (`set_head_gemv`); MLA.forward_absorbed asks `select_backend("head_gemv", x, w)`
    and runs its einsums otherwise."""
    if select_backend("head_gemv", x, w, backend=backend) == "triton":
        from dsv3.kernels.head_gemv_triton import head_gemv_op

        reference.check_head_gemv_args(x, w)
        y = head_gemv_op(x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:]), w)  # (M, H, N)
        return y.view(*x.shape[:-1], w.shape[1])
    reference.check_head_gemv_args(x, w)
    return reference.head_gemv_ref(x, w)


def store_latents(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor,
                  w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor | None = None,
                  *, backend: str | None = None) -> torch.Tensor | None:
    """In place: kv[slot][rows] = RMSNorm(kv_a[:, :C]; w, eps), pe[slot][rows] = RoPE(kv_a[:, C:]; cos, sin), from
    the raw kv_a projection (M, C + P) of M new tokens; with the query's rope part q_pe (M, H, P) (a strided view
    of the q projection is fine) also returns RoPE(q_pe; cos, sin), a new contiguous (M, H, P), else None (the
    contract: `reference.store_latents_ref`). "triton": one launch for all of it (latent_store_triton.py, custom
    ops that declare the caches they mutate; the query's heads in extra programs). The automatic choice takes it
    only while switched on (`set_latent_store`); MLA.forward_absorbed asks `select_backend("latent_store", kv_a,
    norm_weight)` where the cache view offers the fused store, and then passes its query."""
    if select_backend("latent_store", kv_a, w, backend=backend) == "triton":
        from dsv3.kernels.latent_store_triton import store_latents_op, store_latents_q_op

        reference.check_store_latents_args(kv, pe, slot, rows, kv_a, w, cos, sin, q_pe)
        if q_pe is None:
            return store_latents_op(kv, pe, slot, rows, kv_a, w, float(eps), cos, sin)
        return store_latents_q_op(kv, pe, slot, rows, kv_a, w, float(eps), cos, sin, q_pe)
    reference.check_store_latents_args(kv, pe, slot, rows, kv_a, w, cos, sin, q_pe)
    return reference.store_latents_ref(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe)


def set_latent_store(on: bool) -> bool:
    """Let the automatic choice take the fused latent store (`store_latents`: RMSNorm + RoPE + the paged cache
    write of the decode step's new tokens, and in the same launch the RoPE of their query) wherever its rule holds
    (CUDA, bf16/fp16 kv_a, no autograd: backend.py), process-wide; returns the previous setting. ON BY DEFAULT:
    faster than the compiled norm + RoPE + two index_copy launches on the H200 (bench/decode_gpu.py's +latentstore
    modes; backend.py SWITCHED; the query's RoPE in the same launch measured on an H200 later: no faster, no slower,
    bench/RESULTS.md 2026-12-06)."""
    return _switch("latent_store", on)


def mla_prep(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, kv_a: torch.Tensor, w: torch.Tensor,
             eps: float, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor, q_nope: torch.Tensor,
             w_uk_t: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`store_latents(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe)` and `head_gemv(q_nope, w_uk_t)` together:
    the caches written in place, returns (q_lat (M, H, C), the rotated q_pe (M, H, P)) for q_nope (M, H, nope) and
    W_UKᵀ (H, C, nope) (absorbed MLA's, a view of kv_b_proj's weight). The contract: the two operations' (their
    references, `reference.store_latents_ref` and `reference.head_gemv_ref`). "triton": one launch for both
    (mla_prep_triton.py, a custom op that declares the caches it mutates), the two launches' results bit for bit;
    W_UKᵀ read along C. The automatic choice takes it only while switched on (`set_mla_prep`); MLA.forward_absorbed
    asks `select_backend("mla_prep", kv_a, norm_weight, q_nope, w_uk_t)` where it takes both the fused store and
    the W_UK head GEMV, and runs them as two launches otherwise."""
    reference.check_mla_prep_args(kv, pe, slot, rows, kv_a, w, cos, sin, q_pe, q_nope, w_uk_t)
    if select_backend("mla_prep", kv_a, w, q_nope, w_uk_t, backend=backend) == "triton":
        from dsv3.kernels.mla_prep_triton import mla_prep_op

        return mla_prep_op(kv, pe, slot, rows, kv_a, w, float(eps), cos, sin, q_pe, q_nope, w_uk_t)
    q_rot = reference.store_latents_ref(kv, pe, slot, rows, kv_a, w, eps, cos, sin, q_pe)
    return reference.head_gemv_ref(q_nope, w_uk_t), q_rot


def set_mla_prep(on: bool) -> bool:
    """Let the automatic choice run the latent store and absorbed MLA's W_UK product in one launch (`mla_prep`:
    MLA.forward_absorbed, where the static decode view's fused store and the W_UK head GEMV are both taken, so at
    batch 1), process-wide; returns the previous setting. One launch a layer fewer, the same bits. ON BY DEFAULT
    (its GPU tests, tests/test_gpu_mla_prep.py, passed on an H100); on an H200 it measured FP8 554.8 against 541.9
    tok/s, bf16 442.6 against 442.2 (16b batch 1, bench/decode_gpu.py's +mlaprep modes). As `set_dense_gemv` for compiled
    steps and CUDA graphs."""
    return _switch("mla_prep", on)


def swiglu_gemv(x: torch.Tensor, gate: torch.Tensor, gate_s: torch.Tensor | None, up: torch.Tensor,
                up_s: torch.Tensor | None, *, backend: str | None = None) -> torch.Tensor:
    """h (..., N) = silu(x · gateᵀ) * (x · upᵀ) for x (..., K): a dense SwiGLU's first half (the shared experts,
    a dense FFN). gate / up (N, K) in x's dtype without scales, or e4m3 with their 128x128 block scales (FP8Linear);
    fp32 sums, silu and product, one rounding to x's dtype (the contract: `reference.expert_gemv_ref` over one
    expert). "triton": the expert GEMV's fused gate+up launch with every row through the one matrix pair
    (expert_gemv_triton.py), for up to 4 rows; switched with the dense GEMV (`set_dense_gemv`); MLP.forward asks
    `select_backend("swiglu_gemv", x, gate, up)`."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), K)
    if select_backend("swiglu_gemv", x2, gate, up, backend=backend) == "triton":
        from dsv3.kernels.expert_gemv_triton import swiglu_gemv_op

        reference.check_expert_gemv_args(x2, gate[None], None if gate_s is None else gate_s[None], up[None],
                                         None if up_s is None else up_s[None], kernel=True)
        return swiglu_gemv_op(x2, gate, gate_s, up, up_s).view(*lead, gate.shape[0])
    g, gs, u, us = gate[None], None if gate_s is None else gate_s[None], up[None], None if up_s is None else up_s[None]
    reference.check_expert_gemv_args(x2, g, gs, u, us)
    zero = torch.zeros(x2.shape[0], dtype=torch.long, device=x.device)
    return reference.expert_gemv_ref(x2, g, gs, zero, 1, u, us).view(*lead, gate.shape[0])


def moe_gemm_swiglu(x: torch.Tensor, gate: torch.Tensor, gate_s: torch.Tensor | None, up: torch.Tensor,
                    up_s: torch.Tensor | None, offs: torch.Tensor, x_rows: torch.Tensor, *,
                    backend: str | None = None) -> torch.Tensor:
    """h (M, I): the SwiGLU's first half, silu(x·gateᵀ) * (x·upᵀ), of the M (token, expert) pairs sorted by
    expert, sorted row m reading x[x_rows[m]] through expert e's matrices (offs (E,) the experts' end rows);
    gate / up (E, I, D) in x's dtype or e4m3 with block scales. The contract: `reference.moe_gemm_ref`. "triton":
    one grouped launch reading each expert's weights once (moe_gemm_triton.py), for decode batches (up to
    MOE_GEMM_ROWS pairs); switched, on by default (`set_moe_gemm`)."""
    M = x_rows.shape[0]
    if select_backend("moe_gemm", x, gate, backend=backend) == "triton":
        from dsv3.kernels.moe_gemm_triton import moe_gemm_swiglu_op

        reference.check_moe_gemm_args(x, gate, gate_s, offs, M, x_rows, None, up, up_s, kernel=True)
        return moe_gemm_swiglu_op(x, gate, gate_s, up, up_s, offs, x_rows)
    reference.check_moe_gemm_args(x, gate, gate_s, offs, M, x_rows, None, up, up_s)
    return reference.moe_gemm_ref(x, gate, gate_s, offs, M, x_rows=x_rows, up=up, up_s=up_s)


def moe_gemm_down(h: torch.Tensor, down: torch.Tensor, down_s: torch.Tensor | None, offs: torch.Tensor,
                  y_rows: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """y (M, D): the down projection of the sorted rows h (M, I) (sorted row m through expert e's matrix, offs as
    `moe_gemm_swiglu`), stored at y[y_rows[m]]: the pairs' own order when y_rows is the sort's permutation. The
    contract: `reference.moe_gemm_ref`; "triton" as `moe_gemm_swiglu`."""
    if select_backend("moe_gemm", h, down, backend=backend) == "triton":
        from dsv3.kernels.moe_gemm_triton import moe_gemm_down_op

        reference.check_moe_gemm_args(h, down, down_s, offs, h.shape[0], None, y_rows, kernel=True)
        return moe_gemm_down_op(h, down, down_s, offs, y_rows)
    reference.check_moe_gemm_args(h, down, down_s, offs, h.shape[0], None, y_rows)
    return reference.moe_gemm_ref(h, down, down_s, offs, h.shape[0], y_rows=y_rows)


def set_moe_gemm(on: bool) -> bool:
    """Let the automatic choice take the grouped decode GEMM of the routed experts (`moe_gemm_swiglu` /
    `moe_gemm_down`: Experts.forward between the one-row-per-expert GEMV and prefill) wherever its rule holds
    (CUDA, bf16/fp16 x, weights in x's dtype or e4m3, at most MOE_GEMM_ROWS pairs, no autograd: backend.py),
    process-wide; returns the previous setting. ON BY DEFAULT: faster than torch._grouped_mm (bf16) at batch 32
    and 128 on the H200, and than the per-row FP8 kernel (e4m3, 2.07x at batch 32 on an H100) (bench/decode_gpu.py's
    +moegemm modes; backend.py SWITCHED and MOE_GEMM_ROWS). `backend.WEIGHTS_16BIT` keeps it to 16-bit weights."""
    return _switch("moe_gemm", on)


def set_head_gemv(on: bool) -> bool:
    """Let the automatic choice take the per-head decode GEMV (`head_gemv`: absorbed MLA's W_UK / W_UV products)
    wherever its rule holds (CUDA, bf16/fp16, at most DENSE_GEMV_ROWS rows, no autograd: backend.py),
    process-wide; returns the previous setting. On by default: alone it was not faster than the einsums' cuBLAS
    batched GEMMs on the H200 (bench/decode_gpu.py's +headgemv modes, 2026-12-05: 289.9 against 295.4 tok/s; with
    PDL 413.2 against 417.8), but on the later path an H100 measured it and `set_mla_uv` together faster at batch 1
    (16b: bf16 384.1 against 358.9 tok/s, FP8 459.3 against 428.6; backend.py SWITCHED). As `set_dense_gemv` for
    compiled steps and CUDA graphs."""
    return _switch("head_gemv", on)


def set_shared_gemv(on: bool | str) -> bool | str:
    """Let the automatic choice run the shared experts inside the routed experts' two decode GEMV launches (MoE.
    forward, where the routed experts take `expert_gemv`: batch 1): two launches a MoE layer fewer; the shared part
    is then the fp32 sum of its n_shared experts' rounded outputs instead of one rounded product. Process-wide;
    returns the previous setting. By default on for e4m3 expert weights only (`backend.WEIGHTS_E4M3`; True: every
    dtype): faster for an FP8 checkpoint, slower for bf16 (backend.SWITCHED's note). As `set_dense_gemv` for
    compiled steps and CUDA graphs."""
    return _switch("shared_gemv", on)


def set_pdl(on: bool) -> bool:
    """Launch dsv3's decode kernels with programmatic dependent launch on GPUs that have it (compute capability
    9.0+): each launch may start while the one before it drains, reading its weights before it waits for that
    launch's results (backend.pdl). Process-wide; returns the previous setting. The launches read it when they
    are made: eager steps follow it at once, CUDA graphs keep what they captured. Same results bit for bit
    (tests/test_gpu_pdl.py)."""
    return _switch("pdl", on)


def dense_gemv2(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, backend: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x · w1ᵀ, x · w2ᵀ): two projections of one input (`dense_gemv`'s contract for each). "triton": one launch
    over both weights' column tiles (dense_gemv_triton.py `launch_dual`); the automatic choice as `dense_gemv`'s,
    for both weights. MLA.forward_absorbed takes it for q_proj (or q_a_proj) and kv_a_proj_with_mqa."""
    if select_backend("dense_gemv", x, w1, backend=backend) == "triton" and \
            select_backend("dense_gemv", x, w2, backend=backend) == "triton":
        from dsv3.kernels.dense_gemv_triton import dense_gemv2_op

        reference.check_dense_gemv_args(x, w1)
        reference.check_dense_gemv_args(x, w2)
        y1, y2 = dense_gemv2_op(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), w1, w2)
        return y1.view(*x.shape[:-1], w1.shape[0]), y2.view(*x.shape[:-1], w2.shape[0])
    return dense_gemv(x, w1, backend="reference"), dense_gemv(x, w2, backend="reference")


def set_dense_gemv(on: bool) -> bool:
    """Let the automatic choice take the dense decode GEMV (`dense_gemv`) wherever its rule holds (CUDA,
    bf16/fp16, at most DENSE_GEMV_ROWS rows, no autograd: backend.py), process-wide; returns the previous
    setting. ON BY DEFAULT: faster than cuBLAS at one row on the H200 (bench/dense_gemv_sweep.py,
    bench/decode_gpu.py's +densegemv modes; backend.py SWITCHED and DENSE_GEMV_ROWS); the SwiGLU GEMV follows this
    switch, its e4m3 form (FP8 checkpoints' shared experts) too (`backend.WEIGHTS_16BIT`: 16-bit weights only).
    A torch.compile'd step
    traced with one setting recompiles under the other (its guards read it); CUDA graphs keep what they
    captured."""
    return _switch("dense_gemv", on)


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float, *,
               backend: str | None = None) -> torch.Tensor:
    """Absorbed-MLA attention of one new token per sequence over one layer of the paged latent cache
    (the contract: `reference.mla_decode_ref`). q_lat (B, H, C), q_pe (B, H, R), kv (n_rows, C),
    pe (n_rows, R), block_table (B, nblk), seq_lens (B,) -> o_lat (B, H, C). "triton": the
    flash-decoding kernel (a custom op: opaque to torch.compile, capturable in a CUDA graph)."""
    B, H, C = q_lat.shape
    assert q_pe.shape[:2] == (B, H) and kv.shape[-1] == C and pe.shape[-1] == q_pe.shape[-1] \
        and block_table.shape[0] == B and seq_lens.shape == (B,), \
        f"mla_decode: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, kv {tuple(kv.shape)}, " \
        f"pe {tuple(pe.shape)}, block_table {tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)}"
    if select_backend("mla_decode", kv, backend=backend) == "triton":
        from dsv3.kernels.mla_decode_triton import mla_decode as kernel

        return kernel(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale)
    return mla_decode_ref(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale)


def mla_decode_uv(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                  w_uv: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """`mla_decode` followed by absorbed MLA's value projection: o (B, H, v) = einsum("bhc,hvc->bhv", o_lat, w_uv)
    for w_uv (H, v, C) (W_UV, a view of kv_b_proj's weight), o_lat rounded to q_lat's dtype first. "triton": the
    split kernel, then the merge and W_UV in one launch (mla_decode_triton.py); "reference": mla_decode_ref and
    the einsum."""
    B, H, C = q_lat.shape
    assert w_uv.dim() == 3 and w_uv.shape[0] == H and w_uv.shape[2] == C, \
        f"mla_decode_uv: w_uv (H, v, C) = ({H}, v, {C}) expected, got {tuple(w_uv.shape)}"
    if select_backend("mla_uv", q_lat, w_uv, backend=backend) == "triton":
        from dsv3.kernels.mla_decode_triton import mla_decode_uv as kernel

        return kernel(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale, w_uv)
    o_lat = mla_decode_ref(q_lat, q_pe, kv, pe, block_table, seq_lens, block_size, scale)
    return torch.einsum("bhc,hvc->bhv", o_lat, w_uv)


def set_mla_uv(on: bool) -> bool:
    """Let the automatic choice take `mla_decode_uv`'s fused merge + W_UV launch in the graphed decode steps
    (MLA.forward_absorbed through a cache view that offers `attend_uv`), process-wide; returns the previous
    setting. On by default, for one query row (backend.MLA_UV_ROWS: slower at batch 32); with `set_head_gemv` an H100
    decoded the 16b at batch 1 7% faster in bf16 and FP8 (bench/decode_gpu.py's +headgemv+mlauv modes, 2026-12-05;
    backend.py SWITCHED). As `set_dense_gemv` for compiled steps and CUDA graphs."""
    return _switch("mla_uv", on)


def router_topk(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                norm_topk_prob: bool, scale: float, *,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing from the router logits (the contract: `reference.router_topk_ref`):
    logits (N, E) fp32, bias (E,) fp32 -> w (N, K) fp32, idx (N, K) int64, s = sigmoid(logits) (N, E).
    "triton": one kernel (router_triton.py, a custom op: opaque to torch.compile, capturable in a CUDA
    graph) for the selection. The selection has no gradient, so where autograd records (grad enabled
    and logits requiring grad) s and w are recomputed in torch from the logits and the kernel's idx
    (`reference.router_weights`): their gradients are the reference's."""
    N, E = logits.shape
    assert bias.shape == (E,) and E % n_group == 0 and 1 <= topk_group <= n_group \
        and 1 <= top_k <= topk_group * (E // n_group), \
        f"router_topk: logits {tuple(logits.shape)}, bias {tuple(bias.shape)}, top_k={top_k}, n_group={n_group}, " \
        f"topk_group={topk_group}"
    if select_backend("router_topk", logits, bias, backend=backend) == "triton":
        from dsv3.kernels.router_triton import router_topk as kernel

        if torch.is_grad_enabled() and logits.requires_grad:
            _, idx, _ = kernel(logits.detach(), bias, top_k, n_group, topk_group, norm_topk_prob, scale, False)
            s = logits.sigmoid()
            return reference.router_weights(s, idx, norm_topk_prob, scale), idx, s
        return kernel(logits, bias, top_k, n_group, topk_group, norm_topk_prob, scale)
    return router_topk_ref(logits, bias, top_k, n_group, topk_group, norm_topk_prob, scale)


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (under no_grad its own tensor: in-place updates reach the DTensor), else t."""
    return t.to_local() if _is_dtensor(t) else t


@torch.no_grad()
def adamw_backend(params, backend: str | None = None) -> str:
    """The backend `adamw_step_` picks for these parameters (DTensors: their local shards)."""
    return select_backend("adamw", *[_local(p) for p in params], backend=backend)


@torch.no_grad()
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: float, grad_scale: torch.Tensor | None = None,
                skip: torch.Tensor | None = None, backend: str | None = None,
                copies: list[torch.Tensor] | None = None) -> None:
    """One AdamW step, in place, over parameters of one group sharing one step count t (1-based):
    torch.optim.AdamW's rule (`reference.adamw_step_ref_` gives the formulas and torch's op order; with
    fp32 moments it is bitwise torch.optim.AdamW(foreach=True)). Moments may be stored in bf16 (read up
    to fp32, rounded back). grad_scale: an optional 0-dim fp32 tensor on the parameters' device (the
    clip coefficient) multiplying the gradients first; the gradient tensors are not modified.
    skip: an optional 0-dim bool tensor on the parameters' device; where it is True nothing changes
    (parameters and moments keep their bits: the training loop's skipped non-finite step), decided on
    the device, no host sync; where False the update is bitwise the one without `skip`.
    DTensors (FSDP2) run on their local shards, so sharded parameters get the same backend as plain
    ones. "triton": one kernel per parameter reading p, g, m, v and writing p, m, v once (grad_scale
    applied inside).
    copies: optional list (one per parameter, same shape, e.g. bf16) that receives each updated parameter
    rounded to its dtype in the same pass: the working copies of fp32 master weights (AdamW with
    bf16 working weights, dsv3/training/optim.py); params are then the fp32 masters. Where a step is
    skipped the copies keep their bits too."""
    lists = [[_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    cps = None if copies is None else [_local(t) for t in copies]
    if cps is not None:
        assert len(cps) == len(lists[0]) and all(c.shape == p.shape for c, p in zip(cps, lists[0])), \
            "adamw_step_: one copy per parameter, of its shape"
    n = len(lists[0])
    assert all(len(ts) == n for ts in lists), f"adamw_step_: list lengths {[len(ts) for ts in lists]}"
    assert all(g.shape == p.shape and m.shape == p.shape and v.shape == p.shape for p, g, m, v in zip(*lists)), \
        "adamw_step_: every gradient and moment has its parameter's shape"
    if grad_scale is not None:
        if _is_dtensor(grad_scale):  # e.g. computed from DTensor gradients: its full (replicated) value
            grad_scale = grad_scale.full_tensor()
        assert grad_scale.numel() == 1, "adamw_step_: grad_scale is a 1-element tensor"
    if skip is not None:
        if _is_dtensor(skip):
            skip = skip.full_tensor()
        assert skip.numel() == 1 and skip.dtype == torch.bool, "adamw_step_: skip is a 1-element bool tensor"
    if not n:
        return
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, grad_scale=grad_scale,
              skip=skip)
    if select_backend("adamw", *(t for ts in lists for t in ts), *(cps or ()), backend=backend) == "triton":
        from dsv3.kernels.adamw_triton import adamw_step_ as kernel

        for i, (p, g, m, v) in enumerate(zip(*lists)):
            kernel(p, g, m, v, **hp, copy=None if cps is None else cps[i])
        return
    reference.adamw_step_ref_(*lists, **hp, copies=cps)
