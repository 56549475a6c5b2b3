"""AdamW and the paper's schedules (SPEC §8), scaled to the length of a run.

Weight decay: applied to every matrix (attention and FFN projections, experts, router, embedding,
output head, eh_proj); exempt are the 1-D parameters, i.e. the RMSNorm gains, whose scale is a
feature and not capacity (the paper does not say [U]; this is the nanoGPT/torchtitan-style choice).
The correction bias is a buffer updated by the sign rule, so no optimizer touches it.

Learning rate (paper: 2K warmup steps, 2.2e-4 constant until 10T of 14.8T tokens, cosine to
2.2e-5 over 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B), as fractions of the run:
    [0, warmup)              linear 0 -> peak
    [warmup, 67.6%)          peak
    [67.6%, 96.6%)           cosine peak -> 10% of peak
    [96.6%, 98.9%)           10% of peak
    [98.9%, 100%]            3.3% of peak (7.3e-6 / 2.2e-4)
MTP weight λ: 0.3 for the first 67.6% (10T/14.8T), then 0.1. Bias-update speed γ: 0.001 for the first
96.6% (14.3T/14.8T), then 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONSTANT_END = 10.0 / 14.8  # end of the constant phase (and of λ = 0.3)
COSINE_END = 14.3 / 14.8  # end of the cosine decay (and of γ > 0)
TAIL1_END = (14.3 + 0.333) / 14.8
TAIL1_FRAC = 0.1  # 2.2e-5 / 2.2e-4
TAIL2_FRAC = 7.3e-6 / 2.2e-4


@dataclass
class Schedule:
    total_steps: int
    peak_lr: float = 2.2e-4
    warmup_steps: int = 2000
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    bias_gamma: float = 0.001
    batch_ramp_steps: int = 0  # steps over which the batch grows from batch_start to the full batch
    batch_start: int = 0  # sequences per step at step 0 (0: no ramp)

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        T = max(self.total_steps, 1)
        w = min(self.warmup_steps, T)
        if step < w:
            return self.peak_lr * (step + 1) / w
        f = step / T
        if f < CONSTANT_END:
            return self.peak_lr
        if f < COSINE_END:
            p = (f - CONSTANT_END) / (COSINE_END - CONSTANT_END)
            return self.peak_lr * (TAIL1_FRAC + (1 - TAIL1_FRAC) * 0.5 * (1 + math.cos(math.pi * p)))
        if f < TAIL1_END:
            return self.peak_lr * TAIL1_FRAC
        return self.peak_lr * TAIL2_FRAC

    def mtp_weight(self, step: int) -> float:
        return self.mtp_lambda if step / max(self.total_steps, 1) < CONSTANT_END else self.mtp_lambda_late

    def gamma(self, step: int) -> float:
        return self.bias_gamma if step / max(self.total_steps, 1) < COSINE_END else 0.0

    def batch_size(self, step: int, full: int) -> int:
        """Sequences in step `step`'s global batch under the optional linear ramp (paper: 3072 -> 15360
        over the first 469B tokens; the shape of the ramp is not published [U], linear is our choice)."""
        if self.batch_ramp_steps <= 0 or self.batch_start <= 0 or step >= self.batch_ramp_steps:
            return full
        return int(round(self.batch_start + (full - self.batch_start) * step / self.batch_ramp_steps))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


BUCKET_NUMEL = 1 << 24  # elements per foreach bucket: at most ~200 MB of fp32 working copies at a time


def _buckets(params: list, numel: int) -> list[list]:
    """Consecutive groups of parameters of about `numel` elements (a larger tensor alone)."""
    out, cur, n = [], [], 0
    for p in params:
        if cur and n + p.numel() > numel:
            out.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += p.numel()
    return out + ([cur] if cur else [])


def _is_plain_cuda(p: torch.Tensor) -> bool:
    """A CUDA tensor the Triton kernel can take (not a DTensor or other tensor subclass)."""
    return p.is_cuda and type(p) in (torch.Tensor, torch.nn.Parameter)


def fused_available(params) -> bool:
    """True where `AdamW(fused=None)` picks the Triton kernel: every parameter a plain CUDA tensor, triton importable."""
    params = list(params)
    if not params or not all(_is_plain_cuda(p) for p in params):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class AdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's rule: decoupled decay p *= 1 - lr·wd, bias corrections) with the moments
    *stored* in `state_dtype`: fp32, or bf16 as the paper keeps them (§3.3; saves 4 bytes/parameter),
    while the parameters stay fp32 masters. Each step computes in fp32: m, v are read up from storage,
    updated, used for the update unrounded, then rounded (to nearest) back.

    fused=True: one Triton kernel per parameter (dsv3/kernels/adamw_triton.py) reads p, g, m, v and writes
    p, m, v once; `step(grad_scale=t)` multiplies the gradients by the 0-dim device tensor t inside that
    kernel, which is how `clip_and_step` clips without a separate pass over the gradients. fused=False:
    torch._foreach ops in bounded fp32 buckets (any device, DTensors included): the reference.
    fused=None: the kernel where every parameter is a plain CUDA tensor and triton imports."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dtype: torch.dtype = torch.bfloat16, fused: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamW state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        self.state_dtype = state_dtype
        all_params = [p for g in self.param_groups for p in g["params"]]
        if fused is None:
            fused = fused_available(all_params)
        elif fused and not fused_available(all_params):
            raise ValueError("AdamW(fused=True) needs plain CUDA parameters and triton")
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None):
        """One update. grad_scale: optional 0-dim fp32 tensor on the parameters' device multiplying every
        gradient first (the clip coefficient); the .grad tensors themselves are left as they are."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            b1, b2 = g["betas"]
            lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
            by_step: dict[float, list] = {}  # foreach ops need one bias correction per list
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                st["step"] += 1
                by_step.setdefault(float(st["step"]), []).append(p)
            for t, group_ps in by_step.items():
                if self.fused:
                    from dsv3.kernels.adamw_triton import adamw_step_

                    for p in group_ps:
                        st = self.state[p]
                        adamw_step_(p, p.grad, st["exp_avg"], st["exp_avg_sq"], lr=lr, beta1=b1, beta2=b2, eps=eps,
                                    weight_decay=wd, step=t, grad_scale=grad_scale)
                    continue
                for ps in _buckets(group_ps, BUCKET_NUMEL):  # bounded fp32 working copies
                    grads = [p.grad.float() for p in ps]  # no copy for fp32 grads: only read below
                    if grad_scale is not None:
                        grads = torch._foreach_mul(grads, grad_scale)
                    m_store = [self.state[p]["exp_avg"] for p in ps]
                    v_store = [self.state[p]["exp_avg_sq"] for p in ps]
                    m = [x.float() for x in m_store]  # fp32 working copies
                    v = [x.float() for x in v_store]
                    if self.state_dtype == torch.float32:  # .float() returned the stored tensors themselves
                        m, v = [x.clone() for x in m], [x.clone() for x in v]
                    torch._foreach_lerp_(m, grads, 1 - b1)
                    torch._foreach_mul_(v, b2)
                    torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
                    torch._foreach_copy_(m_store, m)  # round to the storage dtype
                    torch._foreach_copy_(v_store, v)
                    if wd:
                        torch._foreach_mul_(ps, 1 - lr * wd)
                    denom = torch._foreach_div(v, 1 - b2 ** t)
                    torch._foreach_sqrt_(denom)
                    torch._foreach_add_(denom, eps)
                    torch._foreach_addcdiv_(ps, m, denom, value=-lr / (1 - b1 ** t))
        return loss


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients (fp32, on their device, no host sync): torch.nn.utils.clip_grad_norm_'s."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)


def clip_and_step(opt: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Clip the gradients of `opt`'s parameters to total norm `max_norm` (None or <= 0: no clipping), then
    step; returns the norm before clipping. The coefficient is torch's, min(1, max_norm / (norm + 1e-6)).
    With a fused `AdamW` it is applied inside the update kernel (no pass over the gradients, .grad left
    unclipped); otherwise through torch.nn.utils.clip_grad_norm_ and a plain step."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if isinstance(opt, AdamW) and opt.fused:
        norm = grad_norm(params)
        coef = None
        if max_norm is not None and max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        opt.step(grad_scale=coef)
        return norm
    if max_norm is not None and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = grad_norm(params)
    opt.step()
    return norm


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   state_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, moments stored in `state_dtype` (float32 or bfloat16). On plain CUDA
    parameters: our `AdamW` with the fused Triton update (both dtypes; `clip_and_step` folds the clip into
    it). Elsewhere: torch.optim.AdamW (foreach) for float32, our `AdamW` (foreach) for bfloat16."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    if state_dtype != torch.float32 or fused_available(params):
        return AdamW(groups, lr=lr, betas=betas, eps=eps, state_dtype=state_dtype)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {"foreach": True}))
