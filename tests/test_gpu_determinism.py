"""`dsv3 train --deterministic` on a GPU: two runs of the same seed give the same training losses and the same
validation loss bit for bit, eagerly and compiled, in bf16 and FP8; no op of the training step lacks a
deterministic algorithm (PyTorch would raise, naming it). What it costs, and how far apart two default runs
land: bench/fp8_loss_text.py (bench/RESULTS.md, issue 15).

Run on the device: python -m pytest -m gpu -q tests/test_gpu_determinism.py
"""

from __future__ import annotations

import pytest
import torch

from dsv3.training.pretrain import train
from test_training import env, micro_config, quiet, read_steps, tcfg  # noqa: F401 (env: the corpus fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision,compile", [("bf16", False), ("fp8", False), ("bf16", True), ("fp8", True)])
def test_deterministic_cuda_runs_repeat_bit_for_bit(env, tmp_path, precision, compile):  # noqa: F811
    mc = micro_config()
    sums, curves = [], []
    for i in range(2):
        out = tmp_path / f"r{i}"
        sums.append(train(mc, tcfg(env, out, steps=6, device="cuda", precision=precision, compile=compile,
                                   deterministic=True, checkpoints=False), log=quiet))
        curves.append([(r["loss"], r["grad_norm"]) for r in read_steps(out).values()])
    assert len(curves[0]) == 6 and curves[0] == curves[1]
    assert sums[0]["val_loss"] == sums[1]["val_loss"]
    assert not torch.are_deterministic_algorithms_enabled()  # restored after each run
