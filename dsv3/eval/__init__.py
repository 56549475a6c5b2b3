"""Evaluation beyond validation loss: lm-evaluation-harness adapter, HumanEval pass@k, sandboxed execution."""
