"""Small building blocks: the dense Linear, RMSNorm and the SwiGLU MLP (dense FFN and shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import kernels


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
        if self.bias is None and kernels.select_backend("dense_gemv", x, self.weight) == "triton":
            return kernels.dense_gemv(x, self.weight, backend="triton")
        return F.linear(x, self.weight, self.bias)


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
        # decode on the GPU with the dense decode GEMVs switched on (kernels.set_dense_gemv): gate, up and the
        # SwiGLU in one launch (kernels.swiglu_gemv; the product rounded once), for 16-bit or FP8Linear weights
        if kernels.select_backend("swiglu_gemv", x, g.weight, u.weight) == "triton" and not hooked(g, u):
            gs, us = getattr(g, "weight_scale_inv", None), getattr(u, "weight_scale_inv", None)
            return self.down_proj(kernels.swiglu_gemv(x, g.weight, gs, u.weight, us, backend="triton"))
        return self.down_proj(F.silu(g(x)) * u(x))
