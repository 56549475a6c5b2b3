"""Small building blocks: the dense Linear, RMSNorm and the SwiGLU MLP (dense FFN and shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import kernels
from dsv3.kernels import side_stream


def hooked(*mods: nn.Module) -> bool:
    """Whether any of `mods` has forward (pre-)hooks, its own or global ones (module trackers such as
    FlopCounterMode register global hooks): a fused path that reads their weights without calling them would
    skip the hooks, so it steps aside."""
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in mods))


class Linear(nn.Linear):
    """nn.Linear (the same parameters, state dict, init and FSDP behaviour; `isinstance(m, nn.Linear)` holds)
    whose forward takes the dense decode GEMV (`kernels.dense_gemv`, dsv3/kernels/dense_gemv_triton.py) where
    the kernel seam picks it for this call: switched (`kernels.set_dense_gemv`; on by default, measured faster on
    the H200), x on CUDA with at most DENSE_GEMV_ROWS (1) rows, x and the weight bf16/fp16 alike, the weight
    contiguous, nothing needing a gradient, no bias. Otherwise F.linear: bit for bit nn.Linear (training,
    prefill, the CPU). The model's projections (attention, dense FFN, shared experts, MTP eh_proj) are these;
    the output head and the router are not (plain nn.Linear and an fp32 F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """x · wᵀ as the bias-free projections compute it: `Linear.forward` (16-bit w: the dense decode GEMV where the
    kernel seam picks it, else F.linear) or, with block scales s, `FP8Linear.forward` (e4m3 w)."""
    if s is not None:
        return kernels.fp8_weight_linear(x, w, s)
    if kernels.select_backend("dense_gemv", x, w) == "triton":
        return kernels.dense_gemv(x, w, backend="triton")
    return F.linear(x, w)


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), normalised in fp32 then cast back (HF; SPEC §2 recommends fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Official names w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter, bias=False)
        self.up_proj = Linear(dim, inter, bias=False)
        self.down_proj = Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        # (`swiglu_mlp` is this sum on the weight tensors: the shared experts' side-stream path, MoE.forward)
        # decode on the GPU with the dense decode GEMVs switched on (kernels.set_dense_gemv): gate, up and the
        # SwiGLU in one launch (kernels.swiglu_gemv; the product rounded once), for 16-bit or FP8Linear weights
        if kernels.select_backend("swiglu_gemv", x, g.weight, u.weight) == "triton" and not hooked(g, u):
            gs, us = getattr(g, "weight_scale_inv", None), getattr(u, "weight_scale_inv", None)
            return self.down_proj(kernels.swiglu_gemv(x, g.weight, gs, u.weight, us, backend="triton"))
        return self.down_proj(F.silu(g(x)) * u(x))

    def weight_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                      torch.Tensor, torch.Tensor | None] | None:
        """(gate, its scales, up, its scales, down, its scales) for `swiglu_mlp` (scales None for 16-bit weights), or
        None where this module's forward must run as modules: hooks (which the tensor form would skip), a bias, or
        a projection other than Linear / FP8Linear (a wrapper whose forward does more)."""
        from dsv3.model.fp8 import FP8Linear  # (fp8.py imports moe.py, which imports this module)

        mods = (self.gate_proj, self.up_proj, self.down_proj)
        if hooked(self, *mods):
            return None
        out: list[torch.Tensor | None] = []
        for m in mods:
            if type(m) is Linear and m.bias is None:
                out += [m.weight, None]
            elif type(m) is FP8Linear:
                out += [m.weight, m.weight_scale_inv]
            else:
                return None
        return tuple(out)


def swiglu_mlp(x: torch.Tensor, g: torch.Tensor, gs: torch.Tensor | None, u: torch.Tensor, us: torch.Tensor | None,
               d: torch.Tensor, ds: torch.Tensor | None) -> torch.Tensor:
    """`MLP.forward` on the weight tensors of `MLP.weight_tensors` (the same kernels, so the same bits): x (..., D)
    -> (..., D)."""
    if kernels.select_backend("swiglu_gemv", x, g, u) == "triton":
        h = kernels.swiglu_gemv(x, g, gs, u, us, backend="triton")
    else:
        h = F.silu(linear(x, g, gs)) * linear(x, u, us)
    return linear(h, d, ds)


@torch.library.custom_op("dsv3::mlp_side", mutates_args=())
def mlp_side(x: torch.Tensor, g: torch.Tensor, gs: torch.Tensor | None, u: torch.Tensor, us: torch.Tensor | None,
             d: torch.Tensor, ds: torch.Tensor | None) -> torch.Tensor:
    """`swiglu_mlp` launched on the side stream (dsv3/kernels/side_stream.py): returns at once on the host; the
    result is valid on the current stream only after `side_stream.join`. A custom op, so that a compiled decode
    step calls it as it is (torch.compile would otherwise trace the stream switch away)."""
    with side_stream.fork(x.device):
        return swiglu_mlp(x, g, gs, u, us, d, ds)


@mlp_side.register_fake
def _(x, g, gs, u, us, d, ds):
    return x.new_empty(*x.shape[:-1], d.shape[0])
