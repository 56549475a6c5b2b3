"""Overlapped decoding (dsv3/inference/engine.py: the next graphed step queued before the one in flight is read)
on the GPU.

    python -m pytest tests/test_gpu_overlap.py -m gpu -q

Through CUDA graphs (and compiled graphs) the overlapped engine must give the tokens of the same engine reading
each step at once: greedy, seeded sampling (a seeded row's draws do not depend on the rows beside it), a request
ending by a stop token while its next step is queued, requests joining a running batch. Log-probabilities agree
to bf16 rounding (a queued step may carry one more row, of a request that just ended)."""

from __future__ import annotations

import pytest
import torch

from dsv3.inference.engine import Engine, SamplingParams
from test_engine import spec_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(eng, prompts, params, join_at=3):
    """The first half of the prompts at once, the rest joining after `join_at` steps -> final outputs in order."""
    half = len(prompts) // 2
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts[:half], params[:half])]
    final, step = {}, 0
    while eng.has_unfinished() or step <= join_at:
        if step == join_at:
            ids += [eng.add_request(p, sp) for p, sp in zip(prompts[half:], params[half:])]
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        step += 1
    return [final[i] for i in ids]


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("compile_decode", [False, True])
def test_overlapped_graphed_decoding_equals_reading_each_step(compile_decode, k):
    """k = 2: speculation rounds queued on the round in flight (drafts, accepted counts and positions on the device),
    with the aligned drafter (long accepted runs). One engine reads each step at once, then overlaps (the same
    captured graphs): a round graph's whole forward compiled again in another engine (round_compile) need not round
    the same (two engines' greedy tokens parted at bf16 near-ties on an H100, 2026-12-06; with round_compile off
    they did not)."""
    m = spec_model(1, "aligned" if k else "random", vocab=256).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (L,), generator=g).tolist() for L in (3, 17, 40, 1, 70, 9)]
    eng = Engine(m, None, max_batch_size=8, block_size=16, cuda_graphs=True, compile_decode=compile_decode,
                 overlap=False, speculative_k=k)
    # greedy with log-probs, seeded samples, and a greedy request that stops at its own 5th token
    params = [SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, logprobs=2)]
    params += [SamplingParams(max_new_tokens=25 + i, temperature=0.8, top_k=50, seed=i, ignore_eos=True)
               for i in range(3)]
    params += [SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True) for _ in range(2)]
    probe = _run(eng, prompts, params)
    params[4] = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[probe[4].token_ids[4]])
    want = _run(eng, prompts, params)
    assert want[4].finish_reason == "stop"
    eng.overlap = True
    got = _run(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    for a, b in zip(got[0].logprobs, want[0].logprobs):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 0.05
