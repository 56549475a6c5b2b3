"""The batch-invariant kernels as the GPU would compile them, without a GPU: Triton's own launch binder (the one
`kernel[grid](...)` runs) turns each launch the wrappers make into its specialisation (the key of the compiled
variant: argument types, which ints are 1 or divisible by 16, which pointers are 16-byte aligned), and Triton
compiles it for sm_90 on the CPU.

The mode's promise rests on one compiled variant per kernel and shape family: a second variant is a second
compilation whose layouts, and so whose reduction orders, may differ (the H200 gave a prompt other bits through the
attention's masked variant than through its positional one, 2026-12-07, bench/RESULTS.md). So: every causal form
of a prompt (whole, a lower-right chunk, a padded batch's ranges, fewer heads, a sliced query) reaches the attention
with the same key; the GEMM's key does not move with the row count; and each variant compiles.

    python -m pytest -q tests/test_invariant_compile.py
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("binds and compiles the kernels: not under the interpreter", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from dsv3.kernels import invariant  # noqa: E402
from dsv3.kernels import invariant_triton as it  # noqa: E402
from dsv3.kernels.masks import CausalRanges  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_LAUNCH_OPTS = ("num_warps", "num_stages", "enable_fp_fusion")


def _launches(monkeypatch, name: str, call) -> list[tuple[tuple, dict]]:
    """Run `call` with invariant_triton's kernel `name` replaced by a recorder: the (args, kwargs) of each launch."""
    seen = {n: [] for n in ("_attention_kernel", "_bmm_kernel", "_chunk_sum_kernel", "_weighted_sum_kernel")}

    class Rec:
        def __init__(self, n):
            self.n = n

        def __getitem__(self, grid):
            return lambda *a, **kw: seen[self.n].append((a, kw))

    with monkeypatch.context() as mp:
        mp.setattr(it, "_interp_ok", lambda *ts: None)
        for n in seen:  # (every kernel: none may launch without a GPU)
            mp.setattr(it, n, Rec(n))
        call()
    return seen[name]


def _bind(kernel, args: tuple, kwargs: dict):
    """Triton's launch binder on the sm_90 back end: (key of the compiled variant, what compile takes)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    key = (tuple(spec), str(sorted(options.items())))
    return key, (backend, bound, spec, options, kwargs)


def _compile(kernel, packed) -> str | None:
    """Compile for sm_90 -> the PTX (None where no ptxas finished the job)."""
    backend, bound, spec, options, kwargs = packed
    opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    try:
        return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                              options=opts.__dict__).asm["ptx"]
    except RuntimeError as e:  # no ptxas: the front end's verdict (types, layouts, the IR) is what counts here
        if "ptxas" not in str(e).lower():
            raise
    return None


def _att(B, H, T, S, d=192, dv=128, heads_of=None):
    g = torch.Generator().manual_seed(B * 1000 + T)
    q = torch.randn(B, heads_of or H, T + 3, d, generator=g).bfloat16()[:, :H, 3:]  # a sliced view, as a chunk's
    k = torch.randn(B, S, H, d, generator=g).bfloat16().transpose(1, 2)  # (B, H, S, d) strided, as MLA's
    v = torch.randn(B, S, H, dv, generator=g).bfloat16().transpose(1, 2)
    return q, k, v


def test_every_causal_form_reaches_one_attention_variant_and_it_compiles(monkeypatch):
    from torch.nn.attention.bias import causal_lower_right

    calls = []
    q, k, v = _att(1, 16, 75, 75)
    calls.append(lambda: invariant.attention(q, k, v, 0.1, None))  # a whole prompt (prefill: causal)
    q2, k2, v2 = _att(1, 16, 40, 75)
    calls.append(lambda: invariant.attention(q2, k2, v2, 0.1, causal_lower_right(40, 75)))  # its last 40: a chunk
    q3, k3, v3 = _att(3, 16, 33, 129)
    ranges = CausalRanges(torch.tensor([5, 0, 96]), torch.tensor([38, 20, 129]), None)
    calls.append(lambda: invariant.attention(q3, k3, v3, 0.1, ranges))  # a padded batch of chunks
    q4, k4, v4 = _att(2, 7, 17, 61, heads_of=16)
    calls.append(lambda: invariant.attention(q4, k4, v4, 0.1, None))  # a group of 7 heads (MLA.forward_chunk's)
    q5, k5, v5 = _att(1, 16, 1, 1)
    calls.append(lambda: invariant.attention(q5, k5, v5, 0.1, None))  # one token
    keys = [_bind(it._attention_kernel, *_launches(monkeypatch, "_attention_kernel", c)[0]) for c in calls]
    assert len({kk for kk, _ in keys}) == 1, "the positional attention specialised differently across the forms"
    _compile(it._attention_kernel, keys[0][1])
    mask = torch.ones(1, 1, 75, 75, dtype=torch.bool).tril()
    (args, kw), = _launches(monkeypatch, "_attention_kernel", lambda: invariant.attention(q, k, v, 0.1, mask))
    mkey, packed = _bind(it._attention_kernel, args, kw)
    assert mkey != keys[0][0]  # (the masked variant: its own compilation, which no engine path reaches)
    _compile(it._attention_kernel, packed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_gemm_variant_does_not_follow_the_row_count_and_compiles(monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 1024, generator=g).to(dtype)
    keys = {}
    for M in (1, 3, 32, 77, 300):
        x = torch.randn(M, 1024, generator=g).to(dtype)
        for split in (False, True):
            launches = _launches(monkeypatch, "_bmm_kernel",
                                 lambda: it.bmm(x.unsqueeze(0), w.t().unsqueeze(0), split=split))
            (args, kw), = launches
            key, packed = _bind(it._bmm_kernel, args, kw)
            keys.setdefault(split, {})[M] = (key, packed)
    for split in (False, True):
        assert len({kk for kk, _ in keys[split].values()}) == 1, f"split={split}: the key moved with M"
        _compile(it._bmm_kernel, keys[split][1][1])
    # the split's second kernel, which adds the chunks in order
    x = torch.randn(5, 1024, generator=g).to(dtype)
    sums = []
    for M in (1, 5):
        (args, kw), = _launches(monkeypatch, "_chunk_sum_kernel",
                                lambda: it.bmm(x[:M].unsqueeze(0), w.t().unsqueeze(0), split=True))
        sums.append(_bind(it._chunk_sum_kernel, args, kw))
    assert sums[0][0] == sums[1][0]
    _compile(it._chunk_sum_kernel, sums[0][1])


def test_the_moe_combine_variant_does_not_follow_the_token_count_and_compiles(monkeypatch):
    """The mode's MoE combine (weighted_sum): one variant for 1, 7 or 300 tokens, bf16 out or fp32, and the sm_90
    compile of it keeps its products and sums apart (no multiply-add contraction: enable_fp_fusion=False)."""
    g = torch.Generator().manual_seed(1)
    for out in (torch.bfloat16, torch.float32):
        keys = []
        for N in (1, 7, 300):
            y, w = torch.randn(N, 6, 1024, generator=g).bfloat16(), torch.rand(N, 6, generator=g)
            (args, kw), = _launches(monkeypatch, "_weighted_sum_kernel", lambda: it.weighted_sum(y, w, out))
            assert kw["enable_fp_fusion"] is False
            keys.append(_bind(it._weighted_sum_kernel, args, kw))
        assert len({k for k, _ in keys}) == 1, f"{out}: the key moved with the token count"
        ptx = _compile(it._weighted_sum_kernel, keys[0][1])
        assert ptx is None or ("fma.rn.f32" not in ptx and "mul.rn.f32" in ptx), "products contracted into FMAs"
