"""ZeRO-1's chunk arithmetic (dsv3/distributed/zero.py) against DTensor's own: a master stored as a DTensor
must hold the rows DTensor thinks it holds, or a checkpoint would put them at the wrong global offsets.
The collectives themselves run in tests/distributed/test_pipeline_dp.py (8 gloo processes, ZeRO-1 against
one process) and the composition matrix (tests/distributed/test_compose.py, the pp2xdp2 / pp2xep2 cells)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dsv3.distributed.zero import chunk, divmod_all, nested_chunk


def test_chunk_is_torch_chunk():
    for n, k in itertools.product(range(0, 13), range(1, 6)):
        got = [chunk(n, k, i)[1] for i in range(k)]
        want = [c.shape[0] for c in torch.arange(n).chunk(k)] if n else []
        want += [0] * (k - len(want))  # torch.chunk drops the empty tail chunks
        assert got == want, (n, k)
        offs = [chunk(n, k, i)[0] for i in range(k)]
        assert all(o + ln <= n for o, ln in zip(offs, got))
        assert sum(got) == n


def test_nested_chunk_matches_dtensor():
    utils = pytest.importorskip("torch.distributed.tensor._utils")
    fn = getattr(utils, "_compute_local_shape_and_global_offset", None)
    if fn is None:
        pytest.skip("this torch has no coordinate-taking _compute_local_shape_and_global_offset")
    from torch.distributed.tensor import Shard

    for sizes in ((2,), (3,), (2, 2), (2, 3), (4, 2), (3, 4)):
        for rows in range(0, 15):
            seen = []
            for i in range(len(list(itertools.product(*map(range, sizes))))):
                coord = divmod_all(i, sizes)
                shape, offset = fn((rows, 5), sizes, list(coord), [Shard(0)] * len(sizes))
                off, n = nested_chunk(rows, sizes, tuple(coord))
                assert n == shape[0], (sizes, rows, coord)
                if n:
                    assert off == offset[0], (sizes, rows, coord)
                    seen += list(range(off, off + n))
            assert seen == list(range(rows)), (sizes, rows)  # rank-major order covers the rows once, in order


def test_divmod_all_is_row_major():
    assert [divmod_all(i, (2, 3)) for i in range(6)] == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
