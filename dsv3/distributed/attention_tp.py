"""Tensor parallelism of attention, dense FFNs and shared experts for inference (`dsv3 serve --ep N --attn-tp
N`), applied from outside to a loaded model (the model code stays single-device math).

The Megatron split over the T ranks of `group`, rank t keeping heads [t·H/T, (t+1)·H/T) of every MLA block
and columns [t·F/T, (t+1)·F/T) of every SwiGLU's F-wide hidden layer:

    MLA   q_b_proj (or q_proj), kv_b_proj  rows of my heads (column-parallel: my heads' q, k_nope and v)
          o_proj                          columns of my heads (row-parallel), + all-reduce of its output
          q_a_proj, kv_a_proj_with_mqa, the norms: whole (they make the latents every head reads), so the
          latent KV cache of a sequence is the same on every rank of the group (replicated, not split:
          MLA's cache has no head axis to split)
    MLP   gate_proj, up_proj              rows (column-parallel)
          down_proj                       columns (row-parallel), + all-reduce of its output
          (the dense layers' FFNs and each MoE block's shared experts; the routed experts are
          expert-parallel, dsv3/distributed/expert_parallel.py, and the router is whole)

`MLA.n_heads` becomes H/T, which is all the attention code reads (the softmax scale and RoPE do not depend
on the head count), so prefill, the absorbed decode path and the Triton kernels run unchanged on the local
heads. Each all-reduce (a forward hook) sums the ranks' partial projections in fp32 order of the backend:
the same terms as one process, summed in another order.

FP8 weights (keep_fp8) are sliced in their 128x128 scale blocks where the split falls on block boundaries
(the 671B's does for T = 2, 4, 8: 192-row heads in multiples of 128 rows per rank, hidden widths divisible
by 128 T); a split that cuts a block dequantises that projection to the activations' dtype first.

Memory: the slices are cut after loading the whole tensors (the loader reads every non-expert tensor), so a
rank holds each full attention/FFN weight once, briefly, while it is sliced. Forward only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.fp8 import FP8Linear
from dsv3.model.layers import MLP
from dsv3.model.mla import MLA

BLOCK = 128  # FP8 scale blocks


def check_attn_tp(cfg, tp: int) -> None:
    """A ValueError naming what does not divide: the heads, the dense FFN width, the shared experts' width."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--attn-tp must be an integer >= 1, got {tp!r}")
    widths = {"num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size}
    if cfg.n_shared_experts:
        widths["the shared experts' width (n_shared_experts x moe_intermediate_size)"] = \
            cfg.n_shared_experts * cfg.moe_intermediate_size
    for name, n in widths.items():
        if n % tp:
            raise ValueError(f"--attn-tp {tp} does not divide {name} ({n})")


def _slice_linear(lin: nn.Module, dim: int, lo: int, hi: int, dtype: torch.dtype) -> nn.Module:
    """Rows (dim 0) or columns (dim 1) [lo, hi) of a bias-free linear, as a new module of the same kind
    when FP8 blocks allow it, else a dense nn.Linear in `dtype` (the model's compute dtype)."""
    if isinstance(lin, FP8Linear):
        if lo % BLOCK == 0 and (hi % BLOCK == 0 or hi == lin.weight.shape[dim]):
            w = lin.weight.narrow(dim, lo, hi - lo).clone()
            s = lin.weight_scale_inv.narrow(dim, lo // BLOCK, -(-hi // BLOCK) - lo // BLOCK).clone()
            out, inp = w.shape
            m = FP8Linear(inp, out, device="meta")
            m.weight, m.weight_scale_inv = w, s
            return m
        dense = lin.dequantized_weight(dtype)
    else:
        dense = lin.weight.detach()
    w = dense.narrow(dim, lo, hi - lo).clone()
    m = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    m.weight = nn.Parameter(w, requires_grad=False)
    return m


def _all_reduce_output(group):
    def hook(module, inputs, out):
        dist.all_reduce(out, group=group)
        return out
    return hook


@torch.no_grad()
def shard_attention_tp(model: nn.Module, group=None) -> int:
    """Split every MLA block and SwiGLU (dense FFNs, shared experts; main layers and MTP modules) of `model`
    over the ranks of `group` (module docstring), in place. Returns how many modules were split."""
    group = group or dist.group.WORLD
    T, t = dist.get_world_size(group), dist.get_rank(group)
    check_attn_tp(model.config, T)
    dt = next(model.parameters()).dtype  # the embedding's: what the activations are computed in
    n = 0
    for m in list(model.modules()):
        if isinstance(m, MLA):
            h = m.n_heads // T
            q_name = "q_proj" if m.q_lora_rank is None else "q_b_proj"
            q_rows = (t * h * m.qk_dim, (t + 1) * h * m.qk_dim)
            setattr(m, q_name, _slice_linear(getattr(m, q_name), 0, *q_rows, dt))
            kv = m.nope + m.v_dim
            m.kv_b_proj = _slice_linear(m.kv_b_proj, 0, t * h * kv, (t + 1) * h * kv, dt)
            m.o_proj = _slice_linear(m.o_proj, 1, t * h * m.v_dim, (t + 1) * h * m.v_dim, dt)
            m.o_proj.register_forward_hook(_all_reduce_output(group))
            m.n_heads = h
            n += 1
        elif isinstance(m, MLP):
            f = m.gate_proj.weight.shape[0] // T
            m.gate_proj = _slice_linear(m.gate_proj, 0, t * f, (t + 1) * f, dt)
            m.up_proj = _slice_linear(m.up_proj, 0, t * f, (t + 1) * f, dt)
            m.down_proj = _slice_linear(m.down_proj, 1, t * f, (t + 1) * f, dt)
            m.down_proj.register_forward_hook(_all_reduce_output(group))
            n += 1
    return n


__all__ = ["check_attn_tp", "shard_attention_tp"]
