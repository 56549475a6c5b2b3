"""The engine's vocabulary-wide argmax (dsv3/inference/sampling.py `argmax`): the two-pass form returns exactly
torch.argmax's indices (first of tied maxima, first NaN, a row of -inf), on the CPU (forced) and on the GPU (the
automatic choice)."""

import pytest
import torch

from dsv3.inference import sampling
from dsv3.inference.sampling import argmax


def _cases(device):
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in [(1, 102400), (3, 1, 102400), (2, 4, 5000), (4, 129280), (1, 1025), (2, 7)]:
        x = torch.randn(shape, generator=g)
        out.append(x)
        t = x.clone()  # ties: the max repeated in later groups and later in the same group
        i = t.shape[-1] // 3
        t[..., i] = 50.0
        t[..., -1] = 50.0
        t[..., min(i + 1, t.shape[-1] - 1)] = 50.0
        out.append(t)
        q = (x * 2).round()  # many ties everywhere
        out.append(q)
    inf = torch.full((2, 3000), float("-inf"))
    nan = torch.randn(3, 70000, generator=g)
    nan[0, 4000] = nan[0, 65000] = float("nan")
    nan[1, -1] = float("nan")
    out += [inf, nan]
    return [x.to(device) for x in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_equals_torch_on_cpu(dtype, monkeypatch):
    for chunk in (1024, 256):
        monkeypatch.setattr(sampling, "ARGMAX_CHUNK", chunk)
        for x in _cases("cpu"):
            x = x.to(dtype)
            assert torch.equal(argmax(x, two_pass=True), x.argmax(-1)), (tuple(x.shape), chunk)


def test_argmax_is_torchs_on_the_cpu_and_an_empty_row_raises():
    x = torch.randn(2, 102400)
    assert torch.equal(argmax(x), x.argmax(-1))  # CPU: one pass
    with pytest.raises(IndexError):  # an empty row: torch's error, not a wrong index
        argmax(torch.empty(3, 0), two_pass=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_equals_torch_on_the_gpu(dtype):
    for x in _cases("cuda"):
        x = x.to(dtype)
        assert torch.equal(argmax(x), x.argmax(-1)), tuple(x.shape)
