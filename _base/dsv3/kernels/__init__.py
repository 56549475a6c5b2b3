"""Kernel dispatch: the only import point for kernels. Each kernel has a plain-PyTorch reference in
`reference.py` (the specification, used on the CPU and in tests); GPU versions are optional
accelerations selected here."""

from dsv3.kernels.attention import attention
from dsv3.kernels.reference import (BLOCK, FP8_MAX, act_dequant, act_quant, mla_decode_ref, weight_dequant,
                                    weight_quant)

__all__ = ["attention", "BLOCK", "FP8_MAX", "act_dequant", "act_quant", "fp8_gemm_kernels", "fp8_grouped_kernels", "fp8_quant_kernels",
           "mla_decode_kernel", "mla_decode_ref", "weight_dequant", "weight_quant"]


def fp8_quant_kernels():
    """The Triton FP8 training quantisation kernels (`fp8_triton.py`: act_quant_cm, act_quant_t,
    weight_quant_pad), imported on first use: they need CUDA and triton. References: `reference.py`."""
    from dsv3.kernels import fp8_triton

    return fp8_triton


def fp8_grouped_kernels():
    """The Triton grouped FP8 GEMMs of the routed experts in training (`fp8_grouped_triton.py`: fprop/dgrad
    over sorted rows and per-expert wgrad), imported on first use (CUDA + triton, or the Triton interpreter).
    Reference: the emulation backend of dsv3/training/fp8.py `fp8_grouped_linear`."""
    from dsv3.kernels import fp8_grouped_triton

    return fp8_grouped_triton


def fp8_gemm_kernels():
    """The Triton FP8-weight GEMMs for decoding (`fp8_gemm_triton.py`: fp8_linear_small_m,
    fp8_expert_rows), or None where CUDA or triton is missing. Reference: weight_dequant + matmul."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from dsv3.kernels import fp8_gemm_triton
    except ImportError:
        return None
    return fp8_gemm_triton


def mla_decode_kernel():
    """The Triton absorbed-MLA decode attention over the paged latent cache (`mla_decode_triton.mla_decode`,
    the contract of `reference.mla_decode_ref`), or None where CUDA or triton is missing."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from dsv3.kernels.mla_decode_triton import mla_decode
    except ImportError:
        return None
    return mla_decode
