"""The switched decode kernels together (dense GEMV, per-head GEMV, fused latent store, the paged MLA decode
kernel) in the engine's static decode steps, with and without MTP speculation, under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/test_decode_kernels.py

Each kernel has its own tests (tests/test_dense_gemv.py, test_head_gemv.py, test_latent_store.py, ...); this one
checks that they compose: the same greedy tokens and nearly the same log-probabilities as the reference path, in
fp32 (the interpreter has no bf16), for plain decoding and for speculative rounds whose verify step sends B x (k+1)
rows through them. (Skipped without triton and TRITON_INTERPRET=1; the GPU counterpart is
tests/test_gpu_speculation.py with the switches on.)
"""

from __future__ import annotations

import pytest

from dsv3 import kernels
from dsv3.inference.engine import Engine, SamplingParams
from tests.test_engine import spec_model
from tests.test_fp8_experts import interp, numpy24_interpreter  # noqa: F401  (the fixture interp uses)

FORCED = dict(dense_gemv="triton", head_gemv="triton", latent_store="triton", mla_decode="triton")


@interp
@pytest.mark.parametrize("k", [0, 2])
def test_interp_the_decode_kernels_compose(monkeypatch, k):
    from dsv3.kernels import dense_gemv_triton, head_gemv_triton, latent_store_triton

    ran = set()
    for mod in (dense_gemv_triton, head_gemv_triton, latent_store_triton):
        launch = mod.launch
        monkeypatch.setattr(mod, "launch", lambda *a, _l=launch, _m=mod.__name__, **kw: ran.add(_m) or _l(*a, **kw))
    model = spec_model(1, "aligned", vocab=64)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=1)

    def run():
        eng = Engine(model, None, max_batch_size=4, speculative_k=k, cuda_graphs=True)  # bucketed, eager on CPU
        return eng.generate(prompts, sp), eng.stats

    want, _ = run()
    with kernels.use_backend(**FORCED):
        got, stats = run()
    assert ran == {m.__name__ for m in (dense_gemv_triton, head_gemv_triton, latent_store_triton)}
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert all(abs(p.logprob - q.logprob) < 1e-4 for p, q in zip(a.logprobs, b.logprobs))
    if k:
        assert stats.accepted > 0  # speculative rounds ran (the verify step's rows through the kernels)
