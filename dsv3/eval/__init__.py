"""Evaluation tasks of `dsv3 eval` beyond validation loss (that is dsv3/training/evaluate.py): pass-key
retrieval over context length and depth (needle.py), general-purpose compressors beside the model's bits
per byte (compress.py), the lm-evaluation-harness adapter (lm_eval_adapter.py), HumanEval pass@k
(humaneval.py) run in a sandbox (sandbox.py)."""
