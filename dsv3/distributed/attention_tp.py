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
heads. Each all-reduce (a forward hook) sums the ranks' partial projections in the activations' dtype (bf16
on GPUs, as Megatron and vLLM do; fp32 on the CPU): the same terms as one process, each partial rounded
to that dtype before the sum.

FP8 weights (keep_fp8) are sliced in their 128x128 scale blocks where the split falls on block boundaries
(the 671B's does for T = 2, 4, 8: 192-row heads in multiples of 128 rows per rank, hidden widths divisible
by 128 T); a split that cuts a block dequantises that projection to the activations' dtype first.

Loading: `load_pretrained(split=...)` with `split_modules` bound to a rank splits the model on the meta
device and reads only each rank's
slices from the safetensors files (an FP8 slice that cuts scale blocks reads the blocks it touches and
dequantises them); `shard_attention_tp` splits an already loaded model instead (the benchmarks' in-place
use). Forward only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.fp8 import FP8Linear
from dsv3.model.layers import MLP, Linear
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
    when FP8 blocks allow it, else a dense Linear in `dtype` (the model's compute dtype)."""
    if isinstance(lin, FP8Linear):
        if lo % BLOCK == 0 and (hi % BLOCK == 0 or hi == lin.weight.shape[dim]):  # on block boundaries
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
    m = Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    m.weight = nn.Parameter(w, requires_grad=False)
    return m


def _all_reduce_output(group):
    def hook(module, inputs, out):
        dist.all_reduce(out, group=group)
        return out
    return hook


@torch.no_grad()
def split_modules(model: nn.Module, t: int, T: int, dtype: torch.dtype) -> dict[str, tuple[int, int, int]]:
    """Replace every MLA block's and SwiGLU's projections by rank t's slices of T (module docstring), in place,
    on the model's device (on the meta device: shapes only, for a loader to fill). Returns, for each sliced
    tensor (state-dict name), (dim, lo, hi): the range of the full tensor it holds, in rows or columns, and
    for an FP8 weight kept FP8 its scale's block range. dtype: what a projection whose FP8 split cuts a scale
    block is dequantised to."""
    check_attn_tp(model.config, T)
    specs: dict[str, tuple[int, int, int]] = {}

    def cut(owner: nn.Module, prefix: str, attr: str, dim: int, lo: int, hi: int) -> None:
        new = _slice_linear(getattr(owner, attr), dim, lo, hi, dtype)
        setattr(owner, attr, new)
        specs[f"{prefix}{attr}.weight"] = (dim, lo, hi)
        if isinstance(new, FP8Linear):
            specs[f"{prefix}{attr}.weight_scale_inv"] = (dim, lo // BLOCK, -(-hi // BLOCK))

    for name, m in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(m, MLA):
            h = m.n_heads // T
            q = "q_proj" if m.q_lora_rank is None else "q_b_proj"
            cut(m, prefix, q, 0, t * h * m.qk_dim, (t + 1) * h * m.qk_dim)
            kv = m.nope + m.v_dim
            cut(m, prefix, "kv_b_proj", 0, t * h * kv, (t + 1) * h * kv)
            cut(m, prefix, "o_proj", 1, t * h * m.v_dim, (t + 1) * h * m.v_dim)
            m.n_heads = h
        elif isinstance(m, MLP):
            f = m.gate_proj.weight.shape[0] // T
            for attr in ("gate_proj", "up_proj"):
                cut(m, prefix, attr, 0, t * f, (t + 1) * f)
            cut(m, prefix, "down_proj", 1, t * f, (t + 1) * f)
    return specs


def install_all_reduces(model: nn.Module, group) -> int:
    """The row-parallel projections' all-reduce over `group` (a forward hook on every MLA's o_proj and every
    SwiGLU's down_proj): after `split_modules`, or after a loader that read the slices. Returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, (MLA, MLP)):
            (m.o_proj if isinstance(m, MLA) else m.down_proj).register_forward_hook(_all_reduce_output(group))
            n += 1
    return n


@torch.no_grad()
def shard_attention_tp(model: nn.Module, group=None) -> int:
    """Split a loaded `model` over the ranks of `group` (module docstring), in place: `split_modules` on the
    loaded weights, then `install_all_reduces`. Returns how many modules were split. (The serving loader
    instead reads only the slices: `load_pretrained(split=...)`, dsv3/ep_serve.py.)"""
    group = group or dist.group.WORLD
    T, t = dist.get_world_size(group), dist.get_rank(group)
    split_modules(model, t, T, next(model.parameters()).dtype)  # the embedding's: the activations' dtype
    return install_all_reduces(model, group)


__all__ = ["check_attn_tp", "install_all_reduces", "shard_attention_tp", "split_modules"]
