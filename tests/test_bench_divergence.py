"""How the benches report where greedy outputs part (bench/spec_gpu.py against k = 0, bench/serve_load.py --check
against offline generation): the first divergence with the reference's gap between its two most likely tokens there,
so that a bf16 near-tie can be told from a bug. CPU, about a second.

Run: python -m pytest tests/test_bench_divergence.py -q
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from conftest import bench_module

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")


def test_spec_gpu_reports_each_first_divergence_with_the_reference_gap(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)  # (spec_gpu imports its neighbours in bench/)
    spec = bench_module("spec_gpu")
    ref = [[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5]]
    outs = [[1, 2, 3], [1, 2, 9], [1, 7, 3], [4, 5, 6]]
    margins = [[0.5, 0.25, 0.1], [0.5, 0.25, 0.001], [0.5, 0.02, 0.1], [0.3, 0.2]]
    c = spec.compare(outs, ref, margins)
    # sorted by position; a longer output parts where the reference ends (no gap there)
    assert c == {"identical": 1, "of": 4, "first_divergence": [1, 2, 2], "margin_at_divergence": [0.02, 0.001, None]}
    assert spec.fmt_cmp(c) == ("1/4", "1 (gap 0.020), 2 (gap 0.001), 2")
    bare = spec.compare(outs, ref)  # without margins: positions only
    assert bare["first_divergence"] == [1, 2, 2] and spec.fmt_cmp(bare)[1] == "1, 2, 2"
    assert spec.fmt_cmp(spec.compare(ref, ref, margins)) == ("4/4", "-")


def test_serve_load_finds_the_offline_token_of_the_first_differing_character():
    serve = bench_module("serve_load")

    class Letters:  # token i decodes to the i-th letter, two letters for token 9
        @staticmethod
        def decode(ids):
            return "".join("jj" if i == 9 else chr(97 + i) for i in ids)

    top = [[(0, -0.1), (5, -0.3)], [(9, -0.2), (5, -0.9)], [(2, -0.30), (5, -0.31)]]
    offline = SimpleNamespace(text="ajjc", token_ids=[0, 9, 2],
                              logprobs=[SimpleNamespace(top=t) for t in top])
    c, gap = serve.divergence(offline, "ajxc", Letters())  # the second letter of token 9
    assert c == 2 and abs(gap - 0.7) < 1e-9
    c, gap = serve.divergence(offline, "ajjd", Letters())  # token 2, a near-tie
    assert c == 3 and abs(gap - 0.01) < 1e-9
    assert serve.divergence(offline, "ajjcz", Letters()) == (4, None)  # past the offline tokens


def test_serve_load_spaces_its_prompts_then_takes_the_windows_between(monkeypatch):
    """bench/serve_load.py's prompts: every other window of a held-out document first (the prompts of the runs recorded
    so far), then the windows between where a small held-out split runs out (32 clients x 4 requests asked 128 of a
    trained tokenizer's 83 spaced windows on the H100, 2026-12-06), then a clear error."""
    serve = bench_module("serve_load")
    docs = {"a": list(range(100, 150)), "b": list(range(200, 236)), "train": list(range(10))}
    monkeypatch.setattr(serve, "find_corpus", lambda _: SimpleNamespace(files=["f"]))
    monkeypatch.setattr(serve, "read_documents", lambda f: [SimpleNamespace(key=k, text=k) for k in docs])
    monkeypatch.setattr(serve, "split_of", lambda key: "train" if key == "train" else "val")
    tok = SimpleNamespace(encode=lambda text: docs[text])
    # windows of 10: a has 0, 10, 20, 30 (40 would end at its end: not taken), b has 0, 10, 20
    assert serve.make_prompts(tok, 3, 10) == [docs["a"][0:10], docs["a"][20:30], docs["b"][0:10]]
    got = serve.make_prompts(tok, 6, 10)
    assert got[:4] == [docs["a"][0:10], docs["a"][20:30], docs["b"][0:10], docs["b"][20:30]]
    assert got[4:] == [docs["a"][10:20], docs["a"][30:40]]
    assert len({tuple(p) for p in serve.make_prompts(tok, 7, 10)}) == 7
    with pytest.raises(RuntimeError, match="only 7 prompts of 10 tokens.*8 asked"):
        serve.make_prompts(tok, 8, 10)
