"""Evaluation tasks of `dsv3 eval` beyond validation loss (that is dsv3/training/evaluate.py): pass-key
retrieval over context length and depth (needle.py), general-purpose compressors beside the model's bits
per byte (compress.py), the lm-evaluation-harness adapter (lm_eval_adapter.py), HumanEval pass@k
(humaneval.py) run in a sandbox (sandbox.py); `resolve_dtype`, the weights' dtype of the benchmarks."""


def resolve_dtype(name: str, device: str):
    """(device, torch dtype or None = the checkpoint's) of a `dtype` setting (HumanEvalConfig.dtype, the
    lm-eval adapter's dtype=): auto is bfloat16 on a GPU (the engine's CUDA graphs run bf16 models), float32
    on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("auto", "bfloat16", "float32", "checkpoint"):
        raise ValueError(f"dtype must be auto, bfloat16, float32 or checkpoint, got {name!r}")
    if name == "auto":
        name = "float32" if device == "cpu" else "bfloat16"
    return device, None if name == "checkpoint" else getattr(torch, name)
