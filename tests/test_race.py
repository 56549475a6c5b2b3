"""The hashed exponential race in one Triton kernel (dsv3/kernels/race_triton.py) against its reference
(sampling.race_ref, what BatchSampler.draw runs otherwise). The kernel tests need triton and the interpreter
(skipped otherwise, e.g. in CI):

    TRITON_INTERPRET=1 python -m pytest tests/test_race.py -q

The GPU runs (bitwise scores: libdevice's log and a rounded division; CUDA graphs; torch.compile; the engine) are in
tests/test_gpu_race.py."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_interpreter
from dsv3.inference.params import SamplingParams
from dsv3.inference.sampling import BatchSampler, phase_key, race_ref, request_seed
from dsv3.kernels import backend as kb

SHAPES = [(1, 1), (1, 7), (3, 256), (2, 4096), (2, 4097), (4, 10_000), (1, 129_280)]


def _keys(B: int, phase: int = 3) -> torch.Tensor:
    return torch.tensor([phase_key(request_seed(s * 7919 + 1), phase) for s in range(B)])


def test_the_draw_takes_the_kernel_on_a_gpu_and_the_reference_elsewhere_or_compiled():
    """hashed_race's automatic choice (backend.py): the kernel for CUDA weights (no longer PENDING: its GPU tests
    passed on an H200; switched on, DSV3_KERNELS=hashed_race=off turns it off), the reference on the CPU; under torch.compile BatchSampler.draw traces the reference whatever
    is chosen (inductor fuses it, as fast as the kernel or faster), so a forced kernel never reaches a CPU graph."""
    assert "hashed_race" not in kb.PENDING
    assert kb.select("hashed_race", torch.rand(2, 5)) == "reference"
    sb = BatchSampler([SamplingParams(temperature=1.0, seed=s) for s in range(2)], [1, 2], [[], []], 5,
                      torch.device("cpu"))
    w = torch.rand(2, 5)
    assert torch.equal(sb.draw(w, 4), race_ref(w, sb.keys, 4))
    assert kb.switches_from_env("hashed_race=off") == {"hashed_race": False} and kb.SWITCHED["hashed_race"] is True
    with kb.use_backend(hashed_race="triton"):
        assert kb.select("hashed_race", w) == "triton"
        draw = torch.compile(lambda w: sb.draw(w, 4), backend="eager", fullgraph=True)
        assert torch.equal(draw(w), race_ref(w, sb.keys, 4))


@needs_interpreter
@pytest.mark.parametrize("B,V", SHAPES)
def test_the_race_kernel_hashes_what_the_reference_hashes(B, V):
    """Uniform weights: the race's winner is the row's largest uniform (the first of equal ones), so the kernel's
    token equals the reference's exactly whatever the log's last bit: the hash, the key column, the slot and the
    tiles across V (4,096 wide) are checked bit for bit."""
    from dsv3.kernels.race_triton import hashed_race

    keys = _keys(B)
    w = torch.ones(B, V)
    for slot in (0, 1, 5):
        want = race_ref(w, keys, slot)
        assert torch.equal(hashed_race(w, keys, slot), want), slot
        assert torch.equal(hashed_race(w, keys.double(), slot), want)  # (BatchSampler's float64 key column)
    assert not torch.equal(hashed_race(w, keys, 0), hashed_race(w, keys, 1)) or V < 8


@needs_interpreter
@pytest.mark.parametrize("B,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_race_kernel_draws_the_reference_tokens(B, V, dtype):
    """Random weights (distributions of very different spread, zeros among them, a strided view): the reference's
    tokens (the interpreter's numpy log may differ from torch's in the last bit: no near ties at these sizes)."""
    from dsv3.kernels.race_triton import hashed_race

    g = torch.Generator().manual_seed(B * 100_003 + V)
    base = torch.rand(B, V + 3, generator=g).pow(torch.tensor([1.0, 8.0, 40.0, 2.0])[torch.arange(B) % 4, None])
    base[:, ::5] = 0.0
    w = base[:, 1:V + 1].to(dtype)  # (a view: row stride V + 3, offset 1)
    keys = _keys(B, phase=11)
    for slot in (0, 2):
        got = hashed_race(w, keys, slot)
        assert torch.equal(got, race_ref(w, keys, slot)), (slot, got)
        assert bool((w.float().gather(1, got[:, None]) > 0).all()) or V == 1


@needs_interpreter
def test_the_race_kernel_edge_rows():
    """A row of zeros draws token 0 (as argmax); a one-hot row draws its token; an empty batch draws nothing; the
    draws follow the weights (chi-square over 4,000 keys against the exact distribution)."""
    from dsv3.kernels.race_triton import hashed_race

    keys = _keys(3)
    w = torch.zeros(3, 50)
    w[1, 37] = 1.0
    w[2, 49] = 0.3
    assert hashed_race(w, keys, 0).tolist() == [0, 37, 49]
    assert hashed_race(torch.zeros(0, 9), torch.zeros(0, dtype=torch.long), 0).shape == (0,)
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    n = 4000
    keys = torch.tensor([phase_key(request_seed(s), 0) for s in range(n)])
    tok = hashed_race(p.expand(n, 5), keys, 2)
    counts = torch.bincount(tok, minlength=5).double()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.5, (chi2, counts)  # (4 degrees of freedom: p = 0.001)


@needs_interpreter
def test_the_sampler_draws_through_the_kernel_when_chosen():
    """BatchSampler.draw with hashed_race chosen (use_backend) hands the kernel its float64 key column: the tokens of
    its reference draw."""
    sb = BatchSampler([SamplingParams(temperature=1.0, seed=s) for s in range(3)], [11, 2 ** 32 - 1, 2 ** 31],
                      [[], [], []], 1000, torch.device("cpu"))
    w = torch.rand(3, 1000, generator=torch.Generator().manual_seed(5)).pow(5)
    with kb.use_backend(hashed_race="triton"):
        got = sb.draw(w, 2)
    assert torch.equal(got, sb.draw(w, 2)) and torch.equal(got, race_ref(w, sb.keys, 2))
