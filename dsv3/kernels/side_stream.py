"""A second CUDA stream inside a decode step: independent chains of launches side by side.

At decode sizes a MoE layer's launches are latency-bound (a one-row FP8 projection of a few MB takes ~5 us on an H100
for ~1-2 us of HBM time; bench/RESULTS.md), and the shared experts do not depend on the router or the routed experts.
Run on a second stream, forked from the current one and joined back before their sum, the two chains overlap: the
step takes about the longer chain instead of both (SGLang's DeepSeek decode does the same with its `alt_stream`).

    with fork(x.device):            # the side stream waits for everything queued on the current one, then
        ys = f(x)                   # f's launches go to it (the caller returns ys from a custom op)
    y = join(y, ys, x)              # the current stream waits for the side stream; y + ys

`join` is a custom op (opaque to torch.compile, like the decode kernels), as must be whatever launches inside
`fork` (dsv3/model/layers.py `mlp_side`): a compiled step then calls both as they are, in order, and a CUDA graph
captures them as any launch: a stream forked from the capturing stream by an event and joined back by one belongs
to the same capture, and its allocations come from the graph's pool.

Memory: the side stream reads x and writes ys while the current stream goes on. `join` takes x (`keep`) so that a
compiled step keeps x's buffer alive until the join (inductor reuses a buffer after its last reader in program
order, which would be a write racing the side stream's reads). ys and the side chain's temporaries are allocated
on the side stream; once freed, the allocator hands their blocks to side-stream allocations only, and the side
stream's next work comes after its next fork, which waits for everything the current stream had queued (the
consumers of ys included). On the CPU (tests, the reference) there is one stream: `fork` does nothing and the
chain runs inline, in program order.
"""

from __future__ import annotations

import contextlib

import torch

_streams: dict[int, torch.cuda.Stream] = {}  # device index -> its side stream (one per device and process)


def side(device: torch.device) -> torch.cuda.Stream:
    """The side stream of a CUDA device, created on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    s = _streams.get(index)
    if s is None:
        s = _streams[index] = torch.cuda.Stream(device=index)
    return s


@contextlib.contextmanager
def fork(device: torch.device):
    """Inside: launches go to `device`'s side stream, after all the work queued so far on the current stream.
    Nothing on the CPU."""
    if device.type != "cuda":
        yield
        return
    s = side(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        yield


@torch.library.custom_op("dsv3::side_join", mutates_args=())
def join(y: torch.Tensor, ys: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """y + ys, after the current stream has waited for the side stream's work (ys among it). `keep`: the side
    chain's input, held alive until here (module docstring)."""
    if y.is_cuda:
        torch.cuda.current_stream(y.device).wait_stream(side(y.device))
    return y + ys


@join.register_fake
def _(y, ys, keep):
    return torch.empty_like(y + ys)
