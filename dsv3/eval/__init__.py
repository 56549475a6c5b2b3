"""Evaluation tasks of `dsv3 eval`: passkey retrieval over context length and depth (needle.py) and
general-purpose compressors beside the model's bits per byte (compress.py). Validation loss itself is
dsv3/training/evaluate.py."""
