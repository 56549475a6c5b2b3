"""bench/fp8_memory.py --variants: the allocator-trace replay that says what is alive at a training step's peak
(`peak_breakdown`, `_label`), on hand-written traces in the layout of torch.cuda.memory._snapshot()'s
device_traces. CPU, well under a second (the GPU run itself: bench/RESULTS.md).

Run: python -m pytest tests/test_fp8_memory_bench.py -q
"""

from __future__ import annotations

from conftest import bench_module


def _bench():
    return bench_module("fp8_memory")


def _f(filename, line=1, name="f"):
    return {"filename": filename, "line": line, "name": name}


REPO = "/work/x/dsv3/kernels/fp8.py"
TORCH = "/venv/lib/python3.12/site-packages/torch/nn/modules/module.py"
GEN = "/tmp/torchinductor_root/ab/cabc123.py"


def _alloc(addr, size, *frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def _free(addr, action="free_requested"):
    return {"action": action, "addr": addr, "size": 0, "frames": []}


def test_label_prefers_the_repository_then_the_compiled_graph():
    b = _bench()
    assert b._label([_f(TORCH), _f(REPO, 7, "_smm_fwd"), _f("/work/x/bench/train_speed.py", 3)]) == \
        "dsv3/kernels/fp8.py:7 _smm_fwd"  # the innermost repository frame (frames are innermost first)
    assert b._label([_f(TORCH), _f(GEN, 40, "call")]) == "inductor cabc123.py"
    assert b._label([_f(TORCH)]) == b._label([]) == "(no Python frame)"
    # a site-packages torch file under a directory named bench/ or dsv3/ is still torch's
    assert b._label([_f("/dsv3/venv/lib/site-packages/torch/autograd/graph.py")]) == "(no Python frame)"


def test_peak_breakdown_replays_to_the_peak():
    b = _bench()
    trace = [
        _alloc(1, 100, _f(REPO, 10, "fwd")),            # 100
        _alloc(2, 50, _f(GEN)),                          # 150
        _free(2),                                        # 100
        _free(2, "free_completed"),                      # (already freed: no double count)
        _alloc(3, 300, _f(REPO, 10, "fwd")),             # 400
        _alloc(4, 20, _f(TORCH)),                        # 420  <- the peak
        _free(3),                                        # 120
        _alloc(5, 250, _f(GEN)),                         # 370: below the peak, not in its set
        _free(99),                                       # a block from before the trace: ignored
        {"action": "segment_alloc", "addr": 7, "size": 10 ** 9, "frames": []},  # segments are not allocations
    ]
    peak, rows = b.peak_breakdown(trace)
    assert peak == 420
    assert rows == [("dsv3/kernels/fp8.py:10 fwd", 400, 2), ("(no Python frame)", 20, 1)]
    peak, rows = b.peak_breakdown(trace, top=1)
    assert rows == [("dsv3/kernels/fp8.py:10 fwd", 400, 2), ("(the rest)", 20, 1)]
    assert b.peak_breakdown([]) == (0, [])
    # where: the 4th allocation (index 3) of 5, made by code outside the repository
    assert b.peak_event(trace) == (3, 5, "(no Python frame)")
    assert b.peak_event(trace[:5]) == (2, 3, "dsv3/kernels/fp8.py:10 fwd")  # before the peak's allocation
    assert b.peak_event([]) == (0, 0, "")


def test_train_speed_variant_tags():
    """bench/train_speed.py's variants (what fp8_memory.py --variants measures too): rw re-quantises the FP8
    weights in backward and needs an FP8 precision; unknown tags and a non-precision first tag are refused."""
    import pytest

    ts = bench_module("train_speed")
    kw = ts.parse_variant("fp8e+compile+bf16w+rw")
    assert kw["precision"] == "fp8e" and kw["recompute_weights"] and kw["bf16_weights"] and kw["compile_blocks"]
    assert not ts.parse_variant("fp8+compile")["recompute_weights"]
    for bad in ("bf16+rw", "fp8+turbo", "compile+fp8"):
        with pytest.raises(ValueError, match="bad variant"):
            ts.parse_variant(bad)
