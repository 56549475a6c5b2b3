"""The shared experts on a second CUDA stream (kernels.set_side_stream; dsv3/kernels/side_stream.py) on a GPU: the
CUDA-graph decode step (compiled or not, bf16 and FP8 weights) and eager generation against the same with the side
stream off. tests/test_side_stream.py checks the plumbing on the CPU.

Run: python -m pytest -m gpu tests/test_gpu_side_stream.py -q
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import kernels
from dsv3.kernels import side_stream
from test_gpu_expert_gemv import _rel, decode_model_and_prompts, graphed_step_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _with_side(on: bool, fn):
    old = kernels.set_side_stream(on)
    try:
        return fn()
    finally:
        kernels.set_side_stream(old)


@pytest.fixture
def forks(monkeypatch):
    """Counts the side stream's forks (each MoE layer's shared experts on it, at capture or eager run time)."""
    calls = []
    real = side_stream.fork
    monkeypatch.setattr(side_stream, "fork", lambda device: calls.append(device) or real(device))
    return calls


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_step_with_the_side_stream_matches_without(compile, fp8, forks):
    """Teacher-forced CUDA-graph decode step with the shared experts on the side stream against the same step with
    them inline: the same bits without torch.compile (the same kernels; the sum y + ys the same op), within 1%
    and the same top-1 compiled (inductor fuses the inline sum into its neighbours in fp32); each MoE layer forked."""
    m, prompts = decode_model_and_prompts()
    if fp8:
        from dsv3.checkpoints.hf import quantize_model_fp8

        quantize_model_fp8(m)
    ref = _with_side(False, lambda: graphed_step_logits(m, prompts, compile_decode=compile))
    assert not forks
    got = _with_side(True, lambda: graphed_step_logits(m, prompts, compile_decode=compile))
    n_moe = m.config.num_hidden_layers - m.config.first_k_dense_replace
    assert forks and len(forks) % n_moe == 0, len(forks)
    if compile:
        assert _rel(got, ref) < 1e-2, _rel(got, ref)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    else:
        assert torch.equal(got, ref)


def test_eager_generation_with_the_side_stream_matches_without(forks):
    """Greedy generation without CUDA graphs (real streams, the allocator's cross-stream reuse): the same tokens."""
    from dsv3.inference.engine import Engine, SamplingParams

    m, prompts = decode_model_and_prompts()

    def run():
        eng = Engine(m, None, max_batch_size=4, cuda_graphs=False)
        out = eng.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
        return [o.token_ids for o in out]

    ref = _with_side(False, run)
    got = _with_side(True, run)
    assert forks
    assert got == ref
