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

The "constant" schedule (the paper's long-context extension stages, §4.3: 1000 steps at 7.3e-6 each):
linear warm-up (usually 0 steps), then the peak LR for the whole run; λ and γ keep their given values
for the whole run (no late phase).

Changing a run's length on resume (`dsv3 train --resume --steps N` with another N than the run's):
the schedule continues where it was, with no jump: the part of it that the run had not reached yet is
stretched (or squeezed) over the steps from the resume point to the new end (`stretches`). A run that had
finished continues at its final learning rate (the paper's last phase, 3.3% of the peak). The warm-up
and the phase fractions stay those of the run's first length. To train on at a high learning rate,
start a new stage instead: `--init-from CHECKPOINT` with its own schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from dsv3 import kernels

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
    kind: str = "paper"  # "paper": the pre-training phases above; "constant": warm-up, then the peak LR
    # changes of the run's length on resume, oldest first: (at step s, length before, length after); the
    # phases above are fractions of total_steps, the run's first length
    stretches: tuple[tuple[int, int, int], ...] = ()

    @property
    def run_steps(self) -> int:
        """The run's length now (total_steps unless a resume changed it)."""
        return self.stretches[-1][2] if self.stretches else self.total_steps

    def stretched(self, at_step: int, new_length: int) -> Schedule:
        """This schedule with the run's length changed to `new_length` at step `at_step` (a resume): steps
        before `at_step` keep their values, the rest of the schedule spans [at_step, new_length)."""
        old = self.run_steps
        if new_length == old:
            return self
        if not 0 <= at_step < new_length:
            raise ValueError(f"the run is at step {at_step}: a new length of {new_length} steps leaves nothing "
                             "to train (give more steps)")
        return dataclasses.replace(self, stretches=(*self.stretches, (at_step, old, new_length)))

    def position(self, step: float) -> float:
        """Where step `step` of the run falls on the first length's schedule (newest stretch first: each
        maps [s, after) onto [s, before) linearly)."""
        for s, before, after in reversed(self.stretches):
            if step >= s:
                step = s + (step - s) * (before - s) / (after - s)
        return step

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        step = self.position(step)
        T = max(self.total_steps, 1)
        w = min(self.warmup_steps, T)
        if step < w:
            return self.peak_lr * (step + 1) / w
        if self.kind == "constant":
            return self.peak_lr
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
        if self.kind == "constant":
            return self.mtp_lambda
        f = self.position(step) / max(self.total_steps, 1)
        return self.mtp_lambda if f < CONSTANT_END else self.mtp_lambda_late

    def gamma(self, step: int) -> float:
        if self.kind == "constant":
            return self.bias_gamma
        return self.bias_gamma if self.position(step) / max(self.total_steps, 1) < COSINE_END else 0.0

    def batch_size(self, step: int, full: int) -> int:
        """Sequences in step `step`'s global batch under the optional linear ramp (paper: 3072 -> 15360
        over the first 469B tokens; the shape of the ramp is not published [U], linear is our choice)."""
        if self.batch_ramp_steps <= 0 or self.batch_start <= 0 or step >= self.batch_ramp_steps:
            return full
        return int(round(self.batch_start + (full - self.batch_start) * step / self.batch_ramp_steps))


def bf16_weight_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters stored in bf16 under bf16 working weights (`AdamW(masters=...)`): every weight whose
    every use is a GEMM that bf16 autocast runs in bf16 anyway, i.e. the nn.Linear weights (attention
    projections, dense and shared MLPs, MTP eh_proj, lm_head) and the routed experts' stacked weights. The
    forward then does what autocast did (its cast of an fp32 weight is the master rounded to nearest, which
    is the stored copy) without the per-step casts, and the backward's weight gradients are the bf16 ones
    autocast made before casting them up. Kept fp32 (Megatron keeps all in bf16; here each would change
    the arithmetic, not only the storage): the embedding (a lookup, no autocast op: its fp32 output is the
    fp32 residual stream), the router gate (routing is fp32, SPEC §4.1; its correction bias is a buffer,
    fp32 always) and the RMSNorm gains (1-D, elementwise on the fp32 residual stream)."""
    from dsv3.model.moe import Experts

    out, seen = [], set()
    for m in model.modules():
        ws = ([m.weight] if isinstance(m, torch.nn.Linear) else
              [m.gate_proj, m.up_proj, m.down_proj] if isinstance(m, Experts) else [])
        for w in ws:
            if w is not None and w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                out.append(w)
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_available(params) -> bool:
    """True where `AdamW(fused=None)` gets the Triton backend of `kernels.adamw_step_` (CUDA parameters,
    plain or DTensor shards, and triton: dsv3/kernels/backend.py decides)."""
    return kernels.adamw_backend(list(params)) != "reference"


class AdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's rule: decoupled decay p *= 1 - lr·wd, bias corrections) with the moments
    *stored* in `state_dtype`: fp32, or bf16 as the paper keeps them (§3.3; saves 4 bytes/parameter),
    while the parameters stay fp32 (or bf16 with fp32 masters: `masters` below). Each step computes in fp32:
    m, v are read up from storage, updated, used for the update unrounded, then rounded (to nearest) back.
    The update is `dsv3.kernels.adamw_step_`, once per group and step count; with fp32 moments its
    reference is bitwise torch.optim.AdamW(foreach=True).

    fused=True: the op's Triton backend, one kernel per parameter reading p, g, m, v and writing p, m, v
    once; `step(grad_scale=t)` multiplies the gradients by the 0-dim device tensor t inside that kernel,
    which is how `clip_and_step` clips without a separate pass over the gradients. fused=False: the
    reference (torch._foreach ops in bounded fp32 buckets, any device). fused=None: Triton where the
    kernels seam offers it (CUDA parameters, DTensors by their local shards, triton importable).
    `.fused` tells which one runs.

    masters: bf16 working weights with fp32 masters (the paper's §3.3 and Megatron's mixed precision).
    For each of these (fp32) parameters the optimizer keeps the fp32 value as its master (`self.masters`)
    and stores the parameter itself in bf16, so forward and backward read bf16 weights and make bf16
    gradients. A step updates the master in fp32 (the gradient read up to fp32, the same rule and op order
    as for an fp32 parameter) and writes the new master rounded to nearest into the bf16 parameter in the
    same pass (`kernels.adamw_step_(copies=...)`; one more store in the Triton kernel). So a master's step
    is bitwise a plain fp32 AdamW step on it followed by a bf16 cast. The masters are not optimizer state
    (`state_dict()` is unchanged); checkpoints write them as the model's weights through
    `masters_as_params()`, so the files are those of fp32 training and a resume restores them exactly.
    fp32_grads: those parameters' gradients accumulate in fp32 (`grad_dtype`; the paper keeps the gradients
    of batch accumulation in FP32): each backward's bf16 gradient is added into an fp32 .grad, which is
    what autocast's cast-back did, so a step is then bitwise the fp32-weight + autocast one (measured on the
    CPU, tests/test_bf16_weights.py), at the cost of fp32 gradient memory and the cast in the accumulation.
    Except for a weight used twice in one forward (the output head, by the main logits and the MTP modules'):
    autocast sums its two bf16 gradients in bf16, this in fp32 (the more exact sum; up to 4e-3 apart on the
    head's gradient with MTP on, the other gradients bitwise equal: an audit, 2026-12-05)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dtype: torch.dtype = torch.bfloat16, fused: bool | None = None, masters=None,
                 fp32_grads: bool = False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamW state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        self.state_dtype = state_dtype
        self.masters: dict[torch.Tensor, torch.Tensor] = {}  # bf16 parameter -> its fp32 master
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        for p in masters or ():
            if id(p) not in mine:
                raise ValueError("AdamW(masters=...): every master-weight parameter must be one of the optimised ones")
            if p.dtype != torch.float32 or _is_dtensor(p):
                raise ValueError(f"AdamW(masters=...) takes plain fp32 parameters (FSDP2 keeps its own fp32 shards "
                                 f"and casts them itself), got {p.dtype} {type(p).__name__}")
            with torch.no_grad():
                master = p.detach().clone()  # the exact fp32 value (init, or --init-from's weights)
                p.data = master.to(torch.bfloat16)  # the same Parameter object, bf16 storage
            if fp32_grads:  # autograd accumulates the bf16 weight gradients into fp32 .grad (torch's grad_dtype)
                p.grad_dtype = torch.float32
            self.masters[p] = master
        auto = kernels.adamw_backend([p for g in self.param_groups for p in g["params"]])
        if fused and auto == "reference":
            raise ValueError("AdamW(fused=True) needs CUDA parameters (plain tensors or DTensors) and triton")
        self._backend = auto if fused is None or fused else "reference"
        self.fused = self._backend != "reference"
        self._pending = None  # a CUDA step with a skip flag whose step counts are not advanced yet

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None, skip: torch.Tensor | None = None):
        """One update. grad_scale: optional 0-dim fp32 tensor on the parameters' device multiplying every
        gradient first (the clip coefficient); the .grad tensors themselves are left as they are.

        skip: optional 0-dim bool tensor on the parameters' device (the loop's non-finite guard); where it
        is True the step changes nothing: parameters, moments and step counts keep their values. The
        update is masked on the device (no host sync); the step counts, which are host numbers (the bias
        corrections are computed from them, as torch's AdamW does), advance once the flag is known: at
        once for CPU tensors, else at the next `step()` or `settle()` through a copy to pinned memory
        made right after this step (a wait on work one forward/backward old, which keeps the GPU busy)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.settle()
        backend = self._backend if self.fused else "reference"
        stepped = []
        for g in self.param_groups:
            b1, b2 = g["betas"]
            # one op call per step count (one bias correction per call) and kind: plain parameters, or
            # fp32 masters updated with their bf16 working copies written in the same pass
            by_step: dict[tuple[float, bool], list] = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                by_step.setdefault((float(st["step"]) + 1, p in self.masters), []).append(p)
                stepped.append(st)
            for (t, mastered), ps in by_step.items():
                sts = [self.state[p] for p in ps]
                kernels.adamw_step_([self.masters[p] for p in ps] if mastered else ps, [p.grad for p in ps],
                                    [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts], lr=g["lr"],
                                    beta1=b1, beta2=b2, eps=g["eps"], weight_decay=g["weight_decay"], step=t,
                                    grad_scale=grad_scale, skip=skip, backend=backend,
                                    copies=[p.data for p in ps] if mastered else None)
        if skip is None or skip.device.type == "cpu":
            if skip is None or not bool(skip):
                for st in stepped:
                    st["step"] += 1
        else:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(skip.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (flag, event, stepped)
        return loss

    def settle(self) -> None:
        """Advance the step counts of the last step once its `skip` flag is known (a no-op unless a CUDA
        step with a skip flag is pending). Called by `step()`, `state_dict()` and before checkpoints."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is None:
            return
        flag, event, stepped = pending
        event.synchronize()
        if not bool(flag):
            for st in stepped:
                st["step"] += 1

    def state_dict(self):
        self.settle()
        return super().state_dict()

    @contextlib.contextmanager
    def masters_as_params(self):
        """Inside: every master-weight parameter holds its fp32 master itself (`p.data` is the master
        tensor), so the model's state dict, a checkpoint written from it and `load_state_dict` into it see
        the fp32 masters: saving writes the masters, loading fills them bit for bit. On exit each parameter
        gets its bf16 storage back, re-derived from the (possibly loaded) master. A no-op without masters.
        Between steps only (the gradients must be unset or are left with their bf16 dtype)."""
        if not self.masters:
            yield
            return
        work = {p: p.data for p in self.masters}
        for p, master in self.masters.items():
            p.data = master
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in work.items():
                    p.data = w
                    w.copy_(self.masters[p])


def global_norm(params) -> torch.Tensor:
    """The 2-norm of the gradients of `params` (fp32, on their device, no host sync): the same arithmetic
    as torch.nn.utils.clip_grad_norm_ (per-tensor norms, then the norm of their stack)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(tensor_norms(grads)), 2.0)


# Elements from which a tensor's norm is a launch of its own (tensor_norms): torch's per-tensor reduction reads a large
# tensor at 2.4-2.5 TB/s on an H100, the multi-tensor kernel at ~2.0. Measured (bench/grad_norm_speed.py, an H100,
# 2026-12-06, two runs; the global norm of every gradient with bf16 working weights): `small` (211 gradients, 2.18 GB)
# 2.47 / 3.56 ms in one mixed call, 1.44 / 1.79 ms with this threshold (1.76 / 1.69 at 2^26, 1.95 / 2.05 at 2^20);
# the 671b-slice (47 gradients, 6.32 GB) 2.60 / 2.57 ms mixed, 2.56 / 2.49 with it, 3.18 / 3.11 with none alone.
NORM_ALONE = 2**24


def tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor, 0-dim fp32 on its device, in the list's order: torch._foreach_norm once per (device,
    dtype), and torch.linalg.vector_norm for each tensor of NORM_ALONE elements or more. A list of mixed dtypes (bf16
    working weights' gradients beside fp32 ones) in one _foreach_norm call takes its per-tensor fallback on CUDA, a
    reduction launch per tensor (142 a `small` step); one dtype a call takes the multi-tensor kernel. 16-bit tensors'
    norms are accumulated and returned in fp32 (not rounded to 8 bits). torch.nn.utils.clip_grad_norm_ groups its
    _foreach_norm calls by dtype too; on the CPU each norm is the same per-tensor reduction either way (the fallback
    runs vector_norm), so the CPU's bits do not change."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        # (a tensor of at least NORM_ALONE elements in a group of its own: the per-tensor reduction)
        groups.setdefault((t.device, t.dtype, i if t.numel() >= NORM_ALONE else -1), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for (_, dtype, alone), idx in groups.items():
        wide = {"dtype": torch.float32} if dtype in (torch.bfloat16, torch.float16) else {}
        if alone >= 0:  # what _foreach_norm's per-tensor fallback runs
            out[alone] = torch.linalg.vector_norm(tensors[alone], 2.0, **wide).float()
            continue
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2.0, **wide)):
            out[i] = n.float()  # (fp64 tensors' norms: computed in fp64, returned in fp32)
    return out


def grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients (fp32, on their device, no host sync): torch.nn.utils.clip_grad_norm_'s."""
    return global_norm(params)


def clip_and_step(opt: "AdamW", max_norm: float | None, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Clip the gradients of `opt`'s parameters to total norm `max_norm` (None or <= 0: no clipping), then
    step; returns the norm before clipping. The coefficient is torch's, min(1, max_norm / (norm + 1e-6)),
    applied inside the AdamW update (the .grad tensors are left unclipped). `norm`: the global norm when the
    caller computed it (a sharded model's); default: the norm of the local gradients."""
    if norm is None:
        norm = grad_norm([p for g in opt.param_groups for p in g["params"] if p.grad is not None])
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm is not None and max_norm > 0 else None
    opt.step(grad_scale=coef)
    return norm


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   state_dtype: torch.dtype = torch.float32, bf16_weights: bool = False,
                   fp32_grads: bool = False) -> "AdamW":
    """The one optimizer of every layout: our AdamW over `param_groups`, moments stored in `state_dtype`
    (float32 or bfloat16). It picks its kernel itself (dsv3.kernels: the fused Triton update on CUDA, the
    foreach reference elsewhere; with float32 moments the reference equals torch.optim.AdamW bitwise).
    bf16_weights: the model's `bf16_weight_params` become bf16 working weights whose fp32 masters the
    optimizer keeps (AdamW's `masters`; the model must still be fp32 here: the masters are its values), except
    FSDP2's DTensor parameters, whose fp32 shards are their masters (gathered in bf16 by its MixedPrecisionPolicy);
    fp32_grads: their gradients accumulated in fp32 (AdamW's docstring)."""
    groups = []
    for g in param_groups(model, weight_decay):  # DTensor (FSDP2) and plain parameters in separate groups
        for want in (False, True):
            ps = [p for p in g["params"] if _is_dtensor(p) == want]
            if ps:  # no empty groups: DCP's state dicts map groups by their parameters' names
                groups.append({"params": ps, "weight_decay": g["weight_decay"]})
    masters = [p for p in bf16_weight_params(model) if not _is_dtensor(p)] if bf16_weights else None
    return AdamW(groups, lr=lr, betas=betas, eps=eps, state_dtype=state_dtype, masters=masters, fp32_grads=fp32_grads)


def _is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)
