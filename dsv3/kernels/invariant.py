"""The batch-invariant mode: on a GPU, every result of a request is the same bits whatever else shares its batch, so
the server's outputs equal offline generation's (and a request's equal its own alone), as vLLM's
VLLM_BATCH_INVARIANT and SGLang's deterministic inference offer. Process-wide, like theirs; a separate, slower mode.

What changes while it is on (`kernels.set_batch_invariant(True)`, `Engine(batch_invariant=True)`,
`dsv3 serve/generate --batch-invariant`):
  * torch's CUDA GEMMs and the reductions a model row goes through are replaced, process-wide, by the fixed-tile
    Triton kernels of invariant_triton.py (torch.library overrides of the aten ops on the CUDA dispatch key, the
    way Thinking Machines' batch_invariant_ops does it): aten::mm, addmm, bmm (every Linear, the router's fp32
    logits, the head, absorbed MLA's einsums, the prefill's up-projection), mean.dim (RMSNorm), _softmax and
    _log_softmax (the eager decode attention, log-probabilities). Other dtypes than bf16 / fp16 / fp32 fall back
    to a plain (slow, exact-order) product;
  * dsv3's own kernels whose use depends on the row count step aside (backend.INVARIANT_ASIDE: the one-row decode
    GEMVs, the fused latent store, the per-head GEMV and its fusions); the grouped expert GEMM (moe_gemm) runs for
    every row count with one tile shape; the router kernel one token a program; the MLA decode kernel splits the
    context in fixed chunks of INVARIANT_CHUNK positions (not by batch size) and merges them in order; MLA's
    expanded attention (prefill and prompt chunks) takes invariant_triton.attention instead of SDPA, so a prompt's
    results do not depend on how it was chunked or padded; the MoE's weighted sum adds its k experts in order.
What it does not cover (the engine refuses them, with the reason): torch.compile (inductor picks its kernels per
shape bucket), FP8 weights (load_engine dequantises an FP8 checkpoint to bf16 in this mode), expert parallelism,
the CPU (its GEMM libraries choose by shape too; the CPU tests check server = offline in fp32 without it).
"""

from __future__ import annotations

import warnings

import torch

from dsv3.kernels import backend

_LIB: torch.library.Library | None = None


def set_mode(on: bool) -> bool:
    """Turn the mode on or off, process-wide; returns the previous setting. On needs CUDA and triton."""
    global _LIB
    old = backend.BATCH_INVARIANT
    if bool(on) == old:
        return old
    if on:
        if not torch.cuda.is_available() or not backend.available("mla_decode", "cuda"):
            raise RuntimeError("the batch-invariant mode needs a CUDA GPU and triton: its kernels are Triton's "
                               "(on the CPU the engine runs without it)")
        import dsv3.kernels.invariant_triton  # noqa: F401 (compiles nothing yet: fail here if it cannot import)

        _LIB = overrides("CUDA")
        backend.BATCH_INVARIANT = True
    else:
        if _LIB is not None:
            _LIB._destroy()  # torch's own CUDA kernels again
            _LIB = None
        backend.BATCH_INVARIANT = False
    return old


def overrides(dispatch_key: str) -> torch.library.Library:
    """The mode's aten kernels registered for `dispatch_key` ("CUDA"; the CPU tests run them on "CPU" under the
    Triton interpreter); `._destroy()` on the returned library gives torch's kernels back."""
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # ("Overriding a previously registered kernel": the point)
        warnings.simplefilter("ignore")
        for name, fn in (("mm", _mm), ("addmm", _addmm), ("bmm", _bmm), ("mean.dim", _mean_dim),
                         ("_softmax", _softmax), ("_log_softmax", _log_softmax)):
            lib.impl(name, fn, dispatch_key)
    return lib


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _plain_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Other dtypes (fp64): an elementwise product and a sum over K, which no override touches."""
    if a.dtype != b.dtype:
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {a.dtype} != {b.dtype}")
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({a.shape[0]}x{a.shape[1]} and "
                           f"{b.shape[0]}x{b.shape[1]})")
    if a.dtype != b.dtype or a.dtype not in _FLOATS:
        return _plain_mm(a, b)
    from dsv3.kernels.invariant_triton import bmm

    return bmm(a.unsqueeze(0), b.unsqueeze(0))[0]


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    y = _mm(a, b)
    if alpha != 1:
        y = y * alpha
    if beta == 0:
        return y
    return y + (bias if beta == 1 else bias * beta)  # (elementwise: the same for every row)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise RuntimeError(f"bmm: batch1 {tuple(a.shape)} and batch2 {tuple(b.shape)} cannot be multiplied")
    if a.dtype != b.dtype or a.dtype not in _FLOATS:
        return _plain_mm(a, b)
    from dsv3.kernels.invariant_triton import bmm

    return bmm(a, b)


def _mean_dim(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    dims = [] if dim is None else list(dim)
    last = len(dims) == 1 and x.dim() >= 1 and dims[0] % x.dim() == x.dim() - 1
    out_dtype = dtype or x.dtype
    if not last or x.dtype not in _FLOATS or out_dtype not in _FLOATS or x.numel() == 0:
        # not a row reduction (no batch rows to be invariant to): a sum and a division, which no override touches
        n = 1
        for d in (dims or range(x.dim())):
            n *= x.shape[d]
        return torch.sum(x, dim=dims or None, keepdim=keepdim, dtype=dtype) / n
    from dsv3.kernels.invariant_triton import row_mean

    D = x.shape[-1]
    y = row_mean(x.reshape(-1, D) if x.stride(-1) == 1 else x.contiguous().reshape(-1, D), out_dtype)
    shape = x.shape[:-1] + ((1,) if keepdim else ())
    return y.view(shape)


def _softmax_any(x: torch.Tensor, dim: int, half_to_float: bool, log: bool) -> torch.Tensor:
    out_dtype = torch.float32 if half_to_float else x.dtype
    if x.dtype not in _FLOATS or x.dim() == 0 or x.numel() == 0:
        xf = x.to(out_dtype) if half_to_float else x
        m = xf.amax(dim, keepdim=True)
        z = xf - m
        return z - z.exp().sum(dim, keepdim=True).log() if log else z.exp() / z.exp().sum(dim, keepdim=True)
    from dsv3.kernels.invariant_triton import softmax

    xt = x.movedim(dim, -1)
    V = xt.shape[-1]
    y = softmax(xt.reshape(-1, V) if xt.is_contiguous() else xt.contiguous().reshape(-1, V), log, out_dtype)
    return y.view(xt.shape).movedim(-1, dim).contiguous()


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    return _softmax_any(x, dim, half_to_float, log=False)


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    return _softmax_any(x, dim, half_to_float, log=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn_mask=None) -> torch.Tensor:
    """`kernels.attention`'s contract in the mode (CUDA tensors): None is SDPA's is_causal (upper-left), a
    lower-right CausalBias (CacheBatch.attn_mask's one-sequence chunk) the causal mask aligned to the last key,
    CausalRanges (its chunks of a padded batch) each sequence's own causal range, a bool tensor the keys it allows.
    The first three run the kernel's one variant by position, so a prompt's bits do not follow which of them
    reached it; a bool tensor runs the masked variant (its bits may differ: no engine path passes one)."""
    from dsv3.kernels.masks import CausalRanges
    from dsv3.kernels.invariant_triton import attention as kernel

    T, S = q.shape[2], k.shape[2]
    if attn_mask is None:
        return kernel(q, k, v, scale, q_start=0)
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if isinstance(attn_mask, CausalRanges):
        return kernel(q, k, v, scale, q_start=attn_mask.q_start, k_len=attn_mask.k_len)
    if isinstance(attn_mask, CausalBias):  # (a Tensor subclass: before Tensor)
        return kernel(q, k, v, scale, q_start=S - T if attn_mask.variant == CausalVariant.LOWER_RIGHT else 0)
    if isinstance(attn_mask, torch.Tensor):
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"the batch-invariant attention takes a bool mask, got {attn_mask.dtype}")
        return kernel(q, k, v, scale, mask=attn_mask)
    raise ValueError(f"the batch-invariant attention takes None, a bool mask, a CausalBias or CausalRanges, got "
                     f"{type(attn_mask).__name__}")
