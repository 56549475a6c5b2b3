"""FP8 weights for inference: linear layers and routed experts that keep the official checkpoint's
float8_e4m3fn weights with their 128x128 `weight_scale_inv` blocks in memory (SPEC §6.3) and
compute with them.

    FP8Linear      weight (out, in) e4m3 + weight_scale_inv (ceil(out/128), ceil(in/128)) fp32
    FP8Experts     gate/up_proj (E, I, D), down_proj (E, D, I) e4m3 + `<name>_scale_inv`
                   (E, ceil(rows/128), ceil(cols/128)) fp32: the official per-expert tensors, stacked
    swap_to_fp8(model, names)   swap the modules owning those weights (dsv3.checkpoints.hf's
                                quantize_model_fp8 picks the official FP8 set by on-disk name)
    linear_weight(module, dtype)  the dense weight of an nn.Linear or an FP8Linear (absorbed MLA needs
                                  W_UK / W_UV out of kv_b_proj whatever its storage)

Compute, through the kernel seam: `kernels.fp8_weight_linear` and `kernels.fp8_expert_rows`. Their
reference (CPU, prefill, training through x) dequantises on the fly, y = F.linear(x, weight_dequant(w,
s, x.dtype)), the official runtime's default `gemm_impl="bf16"`; experts dequantise only the expert
being run (loop) or the whole stack (grouped). So an FP8 model computes exactly what the dense model
loaded with `load_pretrained(keep_fp8=False)` from the same file computes; it differs from the
full-precision model only by the weight rounding. At decode sizes on the GPU the kernels read the
e4m3 bytes directly (no dequantised copy; fp32 accumulation in another order). A block-scaled FP8
GEMM (activations quantised per 1x128 tile) would add activation rounding on top; none is used here.

Storage: the tensors are persistent *buffers*, not parameters. They are inference state that no
optimizer, `requires_grad_()` or autograd may touch (an fp8 tensor has no useful gradient), so
`model.parameters()` lists only what could still be trained; state_dict keys are the same either
way (`weight`, `weight_scale_inv`, as on disk). `Module.to(dtype)` / `.half()` casts every floating
tensor, float8 included: these modules let such calls move them to another device but never change
their formats.

Accuracy: e4m3 keeps 3 mantissa bits, so block quantisation leaves ~2.6% RMS relative error in a
Gaussian matrix. Each quantised matrix then moves the logits independently and the contributions add
in quadrature (checked one matrix at a time: their root-sum-square, 9.3%, matches the 8.7% of all
together). Relative (Frobenius) logit error vs the fp32 model, measured:
  * ragged test model of tests/test_fp8.py (hidden 192, init std 0.05, logit RMS 0.7): 8.7-9.7% over
    seeds 0-2, max abs 0.23 (MTP logits 0.74); the test's tolerance is 12%;
  * `tiny` preset with its own init (std 0.006, logit RMS 0.095): 2.7%, max abs 0.036, top-1 95%;
  * `tiny` preset after 300 training steps (logit RMS 3.2): 0.67%, max abs 0.50, top-1 99%.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import kernels
from dsv3.kernels import BLOCK, weight_dequant, weight_quant
from dsv3.model.moe import Experts

_EXPERT_MATRICES = ("gate_proj", "up_proj", "down_proj")


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _move_only(fn):
    """Wrap a Module._apply function so that it may move a tensor to another device but never cast
    it. `fn` is probed on an empty tensor first, so no cast copy of a large weight is ever made."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        probe = fn(t.new_empty(0))
        return fn(t) if probe.dtype == t.dtype else t.to(probe.device)
    return apply


class FP8Linear(nn.Module):
    """A bias-free linear layer with an official-format FP8 weight: y = x W^T, W dequantised per
    128x128 block (W[r, c] = weight[r, c] · weight_scale_inv[r // 128, c // 128])."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale_inv", torch.empty(_blocks(out_features), _blocks(in_features),
                                                             dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Block-quantise a dense nn.Linear (amax/448 per 128x128 block, `weight_quant`)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias (no DeepSeek-V3 projection has one)")
        m = cls(linear.in_features, linear.out_features, device="meta")
        m.weight, m.weight_scale_inv = weight_quant(linear.weight.detach())
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight (out, in) in `dtype`, computed in fp32 then cast."""
        return weight_dequant(self.weight, self.weight_scale_inv, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode sizes on the GPU: a kernel reading the e4m3 bytes; else F.linear on the dequantised weight
        return kernels.fp8_weight_linear(x, self.weight, self.weight_scale_inv)

    def _apply(self, fn, recurse=True):
        return super()._apply(_move_only(fn), recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


class FP8Experts(Experts):
    """Routed experts with FP8 weights: the stacked layout of `Experts` (gate/up (E, I, D), down
    (E, D, I)) in e4m3, one 128x128 block grid per expert, as the official per-expert tensors are.
    Only `weights` differs from `Experts`: `forward_loop` / `forward_grouped` run unchanged on the
    dequantised weights."""

    def __init__(self, n_experts: int, hidden: int, inter: int, device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate the dense parameters
        E, D, I = n_experts, hidden, inter
        for name, (rows, cols) in zip(_EXPERT_MATRICES, ((I, D), (I, D), (D, I))):
            self.register_buffer(name, torch.empty(E, rows, cols, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer(name + "_scale_inv", torch.empty(E, _blocks(rows), _blocks(cols),
                                                                  dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts) -> "FP8Experts":
        E, I, D = experts.gate_proj.shape
        m = cls(E, D, I, device="meta")
        for name in _EXPERT_MATRICES:
            qs = [weight_quant(w) for w in getattr(experts, name).detach()]
            setattr(m, name, torch.stack([q for q, _ in qs]))
            setattr(m, name + "_scale_inv", torch.stack([s for _, s in qs]))
        return m

    def weights(self, e: int | None = None, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of expert e, or of all experts stacked, dequantised to `dtype`
        (None: bfloat16; fp8 itself cannot be multiplied here)."""
        dtype = dtype or torch.bfloat16
        out = []
        for name in _EXPERT_MATRICES:
            w, s = getattr(self, name), getattr(self, name + "_scale_inv")
            if e is not None:
                out.append(weight_dequant(w[e], s[e], dtype=dtype))
            else:  # the whole stack: the grouped path (a GPU grouped FP8 GEMM will replace this)
                out.append(torch.stack([weight_dequant(w[i], s[i], dtype=dtype) for i in range(w.shape[0])]))
        return out[0], out[1], out[2]

    def gemv_weights(self):
        """(gate, scales, up, scales, down, scales): the e4m3 stacks and their 128x128 block scales."""
        return (self.gate_proj, self.gate_proj_scale_inv, self.up_proj, self.up_proj_scale_inv, self.down_proj,
                self.down_proj_scale_inv)

    def sorted_mlp(self, x_MD: torch.Tensor, flat: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                   dt: torch.dtype) -> torch.Tensor:
        """Where the kernels have an accelerated `fp8_expert_rows` for x_MD (decode-sized batches on
        the GPU): one GEMV per routed row straight from the e4m3 experts (only the experts that rows
        select are read). Otherwise (prefill, CPU): dequantise the stack and run the grouped GEMMs."""
        backend = kernels.select_backend("fp8_expert_rows", x_MD)
        if backend == "reference":
            return super().sorted_mlp(x_MD, flat, order, offs, dt)
        expert = flat[order]  # (M,) each sorted row's expert
        h1 = kernels.fp8_expert_rows(x_MD, self.gate_proj, self.gate_proj_scale_inv, expert, backend=backend)
        h3 = kernels.fp8_expert_rows(x_MD, self.up_proj, self.up_proj_scale_inv, expert, backend=backend)
        return kernels.fp8_expert_rows(F.silu(h1) * h3, self.down_proj, self.down_proj_scale_inv, expert,
                                       backend=backend)

    def _apply(self, fn, recurse=True):
        return super()._apply(_move_only(fn), recurse)

    def extra_repr(self) -> str:
        E, I, D = self.gate_proj.shape
        return f"experts={E}, hidden={D}, inter={I}, fp8 e4m3 128x128 blocks"


def linear_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) weight of an nn.Linear (cast to `dtype`; autograd sees through) or of an
    FP8Linear (dequantised to `dtype`)."""
    if isinstance(module, FP8Linear):
        return module.dequantized_weight(dtype)
    if isinstance(module, nn.Linear):
        return module.weight.to(dtype)
    raise TypeError(f"linear_weight: expected nn.Linear or FP8Linear, got {type(module).__name__}")


@torch.no_grad()
def swap_to_fp8(model: nn.Module, params: Iterable[str], *, quantize: bool = False) -> list[str]:
    """Replace the modules owning the weights `params` (state_dict names: `X.weight` of an nn.Linear;
    `X.gate_proj`, `X.up_proj`, `X.down_proj` of an Experts module, all three or it stays dense) by
    FP8 modules, in place. quantize: fill them with the block quantisation of the current weights;
    otherwise leave them empty on the weights' device (a checkpoint load fills them). Modules that
    are FP8 already stay as they are. Returns the names of the modules replaced."""
    by_module: dict[str, set[str]] = defaultdict(set)
    for p in params:
        mod, _, attr = p.rpartition(".")
        by_module[mod].add(attr)
    replaced = []
    for name, attrs in sorted(by_module.items()):
        old = model.get_submodule(name)
        if isinstance(old, (FP8Linear, FP8Experts)):
            continue
        if isinstance(old, nn.Linear) and attrs == {"weight"}:
            new = (FP8Linear.from_linear(old) if quantize
                   else FP8Linear(old.in_features, old.out_features, device=old.weight.device))
        elif isinstance(old, Experts) and attrs <= set(_EXPERT_MATRICES):
            if attrs != set(_EXPERT_MATRICES):
                continue  # one storage format per Experts module: mixed ones load dequantised
            E, I, D = old.gate_proj.shape
            new = FP8Experts.from_experts(old) if quantize else FP8Experts(E, D, I, device=old.gate_proj.device)
        else:
            raise ValueError(f"cannot store {', '.join(f'{name}.{a}' for a in sorted(attrs))} of a "
                             f"{type(old).__name__} in FP8")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        replaced.append(name)
    return replaced


__all__ = ["FP8Experts", "FP8Linear", "linear_weight", "swap_to_fp8"]
