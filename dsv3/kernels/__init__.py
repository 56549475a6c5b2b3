"""Kernel dispatch: the only import point for kernels. Each kernel has a plain-PyTorch reference in
`reference.py` (the specification, used on the CPU and in tests); GPU versions are optional
accelerations selected here."""

from dsv3.kernels.attention import attention
from dsv3.kernels.reference import BLOCK, FP8_MAX, act_dequant, act_quant, weight_dequant, weight_quant

__all__ = ["attention", "BLOCK", "FP8_MAX", "act_dequant", "act_quant", "weight_dequant", "weight_quant"]
