"""bench/long_context_gpu.py's pass-key training data: the JSONL file of each stage (--passkey-docs), read
back by the data pipeline as `--extra-data` documents, each within the stage's sequence length; a new key
set per stage; --passkey-docs 0 adds nothing. CPU, about a second.

Run: python -m pytest tests/test_long_context_bench.py -q
"""

from __future__ import annotations

import argparse
import os

from conftest import bench_module
from dsv3.eval.needle import INTRO, QUESTION
from dsv3.tokenizer import DSTokenizer
from dsv3.training.data import find_corpus, read_documents


def _bench():
    return bench_module("long_context_gpu")


def test_passkey_docs_of_each_stage(tmp_path):
    bench = _bench()
    tok = DSTokenizer.train([INTRO, QUESTION, "The pass key is 12345. Remember it. 67890 is the pass key.",
                             "The river runs past the old mill. A cat sleeps on the warm stone wall."] * 20, 400)
    args = argparse.Namespace(passkey_docs=12, key_digits=5, out=str(tmp_path), extra_data=["mine.jsonl"])
    quiet = lambda *a: None  # noqa: E731
    extra = bench.write_passkey_docs("x4", 1, tok, 256, args, quiet)
    path = os.path.join(tmp_path, "passkey", "x4.jsonl")
    assert extra == ["mine.jsonl", path]  # the user's --extra-data, then the stage's documents
    docs = [d.text for f in find_corpus(path).files for d in read_documents(f)]
    assert len(docs) == 12 and all(len(tok.encode(d, parse_special=False)) <= 256 for d in docs)
    assert all(d.startswith(INTRO) and QUESTION in d for d in docs)
    base = bench.write_passkey_docs("base", 0, tok, 256, args, quiet)[-1]
    assert open(base).read() != open(path).read()  # another key stream per stage
    # a stage of 4x the base's sequence length: a quarter as many documents (the same tokens on average)
    x4 = bench.write_passkey_docs("x4", 1, tok, 1024, args, quiet, factor=4)[-1]
    assert len(open(x4).read().splitlines()) == 3
    args.passkey_docs = 0
    assert bench.write_passkey_docs("x16", 2, tok, 512, args, quiet) == ["mine.jsonl"]
    assert not os.path.exists(os.path.join(tmp_path, "passkey", "x16.jsonl"))
