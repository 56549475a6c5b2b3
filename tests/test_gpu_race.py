"""The hashed exponential race kernel (dsv3/kernels/race_triton.py) on the GPU: bitwise the reference's tokens
(sampling.race_ref: libdevice's logf and a rounded division are torch's CUDA log and division), inside a CUDA graph
and under torch.compile, and an engine sampling with it against one without. Run on the device machine:

    python -m pytest tests/test_gpu_race.py -m gpu -q

hashed_race is PENDING in backend.py (automatic choice: the reference) until these pass on a GPU."""

from __future__ import annotations

import pytest
import torch

from dsv3 import kernels
from dsv3.inference.engine import Engine
from dsv3.inference.params import SamplingParams
from dsv3.inference.sampling import phase_key, race_ref, request_seed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _keys(B: int) -> torch.Tensor:
    return torch.tensor([phase_key(request_seed(s), 5) for s in range(B)], device="cuda")


@pytest.mark.parametrize("B,V", [(1, 129_280), (1, 32_768), (8, 102_400), (32, 129_280), (3, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_race_kernel_is_the_reference(B, V, dtype):
    from dsv3.kernels.race_triton import hashed_race

    g = torch.Generator(device="cuda").manual_seed(V + B)
    logits = torch.randn(B, V, device="cuda", generator=g) * 3
    keys = _keys(B)
    for w in (logits.softmax(-1).to(dtype), torch.ones(B, V, device="cuda", dtype=dtype)):
        for slot in (0, 3):
            assert torch.equal(hashed_race(w, keys, slot), race_ref(w, keys, slot))
            assert torch.equal(hashed_race(w, keys.double(), slot), race_ref(w, keys, slot))


def test_the_race_kernel_in_a_graph_and_compiled():
    from dsv3.kernels.race_triton import hashed_race

    w = torch.rand(4, 50_000, device="cuda").pow(6)
    keys = _keys(4)
    want = race_ref(w, keys, 1)
    compiled = torch.compile(lambda w, k: hashed_race(w, k, 1), fullgraph=True)
    assert torch.equal(compiled(w, keys), want)
    hashed_race(w, keys, 1)  # (warm: the kernel compiled before capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hashed_race(w, keys, 1)
    graph.replay()
    assert torch.equal(out, want)


def test_an_engine_samples_the_same_tokens_with_the_kernel():
    """Seeded sampled requests with log-probabilities (their steps draw eagerly): the same tokens with the kernel
    chosen as with the reference."""
    from test_engine import spec_model

    m = spec_model(1, "aligned", vocab=256).to("cuda", torch.bfloat16)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [9, 10, 11, 12, 13]]
    sp = [SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=i, logprobs=1, ignore_eos=True)
          for i in range(3)]

    def run(backend: str):
        with kernels.use_backend(hashed_race=backend):
            eng = Engine(m, None, max_batch_size=4, speculative_k=1, cuda_graphs=True)
            return [o.token_ids for o in eng.generate(prompts, sp)]

    assert run("triton") == run("reference")
