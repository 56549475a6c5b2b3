"""One-pass AdamW update in Triton: the "triton" backend of `dsv3.kernels.adamw_step_`.

    adamw_step_(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=None, skip=None,
                copy=None)

Per element, in fp32 whatever the storage dtypes (p fp32 masters; g fp32 or bf16; m, v fp32 or bf16):
    g  = g * grad_scale                      (grad_scale: a 0-dim fp32 device tensor, e.g. the
                                              gradient-clipping coefficient; no host sync)
    m  = m + (1 - β1)(g - m)                 v = β2 v + (1 - β2) g²
    m, v stored rounded to their dtype (round to nearest even); the update uses the unrounded values
    p  = p (1 - lr·wd) - lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)
(the reference's, i.e. torch.optim.AdamW's, order of operations; fp32 op order may still differ by
fused multiply-adds). skip: a 0-dim bool device tensor; where True every load and store is masked off,
so p, m, v keep their bits (a skipped non-finite step; read by the kernel, no host sync).
copy: an optional tensor of p's shape (bf16: the working weight of fp32 master p) that also receives the
new p rounded to its dtype, one more store in the same pass: with an fp32 master, a bf16 gradient and fp32
moments, 28 bytes per parameter (autocast's fp32 weights: 28 in this kernel plus the per-step casts).

One kernel reads p, g, m, v and writes p, m, v once: 28 bytes per parameter with fp32 moments, 20 with
bf16 moments (torch's fused AdamW plus a separate clip pass: 28 + 12). The specification is
`dsv3.kernels.reference.adamw_step_ref_`, itself bitwise torch.optim.AdamW(foreach=True) on the CPU
(tests/test_kernels.py); tests/test_gpu.py compares the two on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, scale_ptr, skip_ptr, n, lr, beta1, beta2, eps, decay, bc2_sqrt,
                  step_size, HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_COPY: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if HAS_SKIP:  # a skipped step: no element is in range, nothing is read or written
        n = tl.where(tl.load(skip_ptr) != 0, 0, n)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)  # torch.lerp with weight < 0.5
    v = v * beta2 + (1.0 - beta2) * (g * g)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p * decay - step_size * tl.math.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    if HAS_COPY:  # the working copy of an fp32 master: the new value rounded to its dtype
        tl.store(c_ptr + offs, p.to(c_ptr.dtype.element_ty), mask=mask)


def adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, step: float,
                grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                copy: torch.Tensor | None = None) -> None:
    """Update p, m, v (and `copy`) in place (module docstring). All contiguous, same shape, on one CUDA device."""
    n = p.numel()
    checked = (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)) + ((("copy", copy),) if copy is not None else ())
    for name, t in checked:
        if t.shape != p.shape or not t.is_contiguous() or t.device != p.device:
            raise ValueError(f"adamw_step_: {name} must be contiguous, shaped {tuple(p.shape)}, on {p.device}")
    if not p.is_contiguous():
        raise ValueError("adamw_step_: the parameter must be contiguous")
    if n == 0:
        return
    scale = grad_scale if grad_scale is not None else p  # dummy pointer when HAS_SCALE is off
    flag = skip.view(torch.uint8) if skip is not None else p  # bool as bytes: 0 = apply the step
    c = copy if copy is not None else p  # dummy pointer when HAS_COPY is off
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        p, g, m, v, c, scale, flag, n, lr, beta1, beta2, eps, 1.0 - lr * weight_decay, (1.0 - beta2 ** step) ** 0.5,
        lr / (1.0 - beta1 ** step), HAS_SCALE=grad_scale is not None, HAS_SKIP=skip is not None,
        HAS_COPY=copy is not None, BLOCK=BLOCK, num_warps=8)
