"""Data pipeline tests: corpus discovery and errors, the token cache (layout, FIM, reuse, atomicity),
packing, and the sampler (determinism, exact resume, rank sharding). CPU, tiny synthetic corpora.

Run: python -m pytest tests/test_data.py -q
"""

import hashlib
import json

import numpy as np
import pytest
import torch

from dsv3.training import data as D
from dsv3.training.data import (
    CorpusError, PackedSampler, TokenCache, ValBatches, bits_per_byte, build_token_cache, find_corpus,
    fim_rng, fim_split, split_of, stdlib_corpus, token_dtype,
)
from dsv3.tokenizer import DSTokenizer, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "# Title\n\nSome *markdown* prose with émoji 🙂 and 中文.\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    "Plain text, numbers 12345 and tabs\tand\r\nwindows line ends.\n",
    "for i in range(10):\n    print(i * i)\n",
    "A literal <｜end▁of▁sentence｜> in a file must stay text.\n",
]


@pytest.fixture(scope="module")
def tok() -> DSTokenizer:
    return DSTokenizer(train_tokenizer(TEXTS * 4, vocab_size=400))


def write_corpus(root, n_files=12):
    """n_files small documents under root (some nested) plus files that must be ignored."""
    texts = {}
    for i in range(n_files):
        rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"doc_{i}.md"
        text = f"# document {i}\n" + TEXTS[i % len(TEXTS)] * (1 + i % 3)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="")
        texts[rel] = text
    (root / "image.png").write_bytes(b"\x89PNG\r\n")  # unknown extension: ignored
    (root / ".git").mkdir()
    (root / ".git" / "config.txt").write_text("hidden dir: ignored")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("ignored")
    return texts


def split_docs(stream, eos):
    """The stream cut after every EOS: one list of ids per document (EOS dropped)."""
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert ends[-1] == len(stream) - 1  # every document, the last included, ends with EOS
    return [stream[s:e].tolist() for s, e in zip(starts, ends)]


# --- corpus --------------------------------------------------------------------------------------

def test_find_corpus_directory(tmp_path):
    texts = write_corpus(tmp_path)
    corpus = find_corpus(tmp_path)
    assert [f.relpath for f in corpus.files] == sorted(texts)
    assert all(f.kind == "text" for f in corpus.files)
    single = find_corpus(tmp_path / "doc_0.md")
    assert [f.relpath for f in single.files] == ["doc_0.md"]


def test_a_pipe_as_the_corpus_is_named_as_one(tmp_path):
    """--data <(cat ...) (a /dev/fd link to "pipe:[...]") or a FIFO: said to be a pipe, which dsv3 cannot read more
    than once (it was "corpus path /dev/fd/63 does not exist", a path that does exist)."""
    import os

    r, w = os.pipe()
    try:
        with pytest.raises(CorpusError, match=rf"corpus path /dev/fd/{r} is a pipe or another special file"):
            find_corpus(f"/dev/fd/{r}")
    finally:
        os.close(r)
        os.close(w)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CorpusError, match="fifo is a pipe or another special file"):
        find_corpus(tmp_path / "fifo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_corpus(tmp_path / "nothing")


def test_run_directories_in_a_corpus_give_no_documents(tmp_path):
    """A dsv3 run directory inside --data, or --data itself used as --out: the run's metrics.jsonl and checkpoints
    are not documents (a resume read metrics.jsonl's records and stopped); the user's files around them are."""
    texts = write_corpus(tmp_path)
    run = tmp_path / "runs" / "custom"
    for d in (run, tmp_path):  # a run below the corpus, and the corpus as a run directory
        (d / "checkpoints" / "step_00000002").mkdir(parents=True, exist_ok=True)
        (d / "checkpoints" / "step_00000002" / "notes.md").write_text("not data")
        (d / "train_config.json").write_text("{}")
        (d / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (run / "readme.md").write_text("a file of the user's beside the run's outputs")
    got = [f.relpath for f in find_corpus(tmp_path).files]
    assert got == sorted([*texts, "runs/custom/readme.md"])
    with pytest.raises(FileNotFoundError, match="corpus path is empty"):
        find_corpus("")


def test_stdlib_corpus_lists_many_files():
    corpus = stdlib_corpus()
    assert len(corpus.files) > 500
    assert all(f.relpath.endswith(".py") for f in corpus.files)
    skip = {"test", "tests", "idle_test", "site-packages"}
    assert not any(skip & set(f.relpath.split("/")[:-1]) for f in corpus.files)
    assert "json/decoder.py" in {f.relpath for f in corpus.files}


def test_nonexistent_and_empty_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        find_corpus(tmp_path / "nope")
    (tmp_path / "a.bin").write_bytes(b"x")
    with pytest.raises(CorpusError, match=str(tmp_path)):
        find_corpus(tmp_path)


def test_only_empty_documents_is_an_error(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="no documents"):
        build_token_cache(tmp_path, tok, tmp_path / "cache", progress=False)


def test_non_utf8_file_skipped_and_counted(tmp_path, tok):
    texts = write_corpus(tmp_path / "c", n_files=4)
    (tmp_path / "c" / "latin1.txt").write_bytes("café".encode("latin-1"))
    cache = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", progress=False)
    assert cache.meta["n_skipped"] == 1 and cache.meta["skipped_files"] == ["latin1.txt"]
    assert cache.meta["n_files"] == 5
    assert sum(s["n_docs"] for s in cache.meta["splits"].values()) == len(texts)


def test_jsonl_documents_and_errors(tmp_path, tok):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first doc"}\n\n{"text": "second", "id": 2}\n{"text": ""}\n', encoding="utf-8")
    docs = D.read_documents(find_corpus(good).files[0])
    assert [(d.key, d.text) for d in docs] == [("good.jsonl:1", "first doc"), ("good.jsonl:3", "second")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: malformed JSON"):
        build_token_cache(bad, tok, tmp_path / "cache", progress=False)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"missing\.jsonl:2: .*no 'text' field"):
        build_token_cache(missing, tok, tmp_path / "cache", progress=False)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('[1, 2]\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"wrong\.jsonl:1"):
        build_token_cache(wrong, tok, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("*.bin*"))  # failed builds leave nothing behind


def test_split_by_path_hash():
    keys = [f"dir/file_{i}.py" for i in range(20000)]
    val = [k for k in keys if split_of(k) == "val"]
    assert 0.007 < len(val) / len(keys) < 0.013  # ~1%
    assert val == [k for k in keys if split_of(k, 10) == "val"]  # stable
    assert all(split_of(k, 0) == "train" for k in keys[:100])
    assert all(split_of(k, 1000) == "val" for k in keys[:100])


# --- FIM -----------------------------------------------------------------------------------------

def test_fim_split_pieces():
    for seed in range(200):
        text = TEXTS[seed % len(TEXTS)]
        prefix, middle, suffix = fim_split(text, fim_rng(seed, "k"))
        assert prefix + middle + suffix == text
    assert fim_split("", fim_rng(0, "k")) == ("", "", "")
    a, b = fim_split(TEXTS[2], fim_rng(3, "x")), fim_split(TEXTS[2], fim_rng(3, "x"))
    assert a == b  # deterministic per (seed, key)


def test_fim_layout_in_cache(tmp_path, tok):
    texts = write_corpus(tmp_path / "c", n_files=6)
    cache = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", val_permille=0, fim_rate=1.0,
                              fim_seed=7, progress=False)
    assert cache.meta["splits"]["train"]["n_fim_docs"] == len(texts)
    docs = split_docs(np.asarray(cache.tokens("train")), tok.eos_id)
    assert len(docs) == len(texts)
    for ids, (rel, text) in zip(docs, sorted(texts.items())):
        # <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>
        assert ids[0] == tok.fim_begin_id
        assert ids.count(tok.fim_hole_id) == ids.count(tok.fim_end_id) == 1
        hole, end = ids.index(tok.fim_hole_id), ids.index(tok.fim_end_id)
        assert 0 < hole < end
        prefix, suffix, middle = (tok.decode(ids[1:hole]), tok.decode(ids[hole + 1:end]),
                                  tok.decode(ids[end + 1:]))
        assert prefix + middle + suffix == text
        rng = fim_rng(7, rel)
        rng.random()  # the FIM decision draw
        assert (prefix, middle, suffix) == fim_split(text, rng)
    # the val split never gets FIM
    val = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", val_permille=1000, fim_rate=1.0,
                            progress=False)
    stream = np.asarray(val.tokens("val"))
    assert val.meta["splits"]["val"]["n_fim_docs"] == 0 and tok.fim_begin_id not in stream


# --- token cache ---------------------------------------------------------------------------------

def test_fim_without_fim_tokens_names_the_way_out(tmp_path):
    """A tokenizer without FIM tokens (a GPT-2-style tokenizer.json) at the default FIM rate: the error says FIM needs
    them and how to train without FIM from the command line; at rate 0 the same tokenizer builds the cache."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsv3.tokenizer import MissingSpecialTokenError

    write_corpus(tmp_path / "c")
    vocab = {chr(i): i for i in range(32, 127)} | {"<|endoftext|>": 127, "\n": 128}
    bare = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    bare.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    bare.save(str(tmp_path / "tokenizer.json"))
    tok = DSTokenizer.load(tmp_path, special_tokens={"eos": "<|endoftext|>"})
    with pytest.raises(MissingSpecialTokenError, match=r"FIM at rate 0.1 needs the tokenizer's FIM tokens: the "
                                                       r"tokenizer has no fim_begin token .*--fim-rate 0"):
        build_token_cache(tmp_path / "c", tok, tmp_path / "cache", val_permille=0, fim_rate=0.1, progress=False)
    cache = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", val_permille=0, fim_rate=0.0, progress=False)
    assert len(cache.tokens()) > 0


def test_cache_layout_without_fim(tmp_path, tok):
    texts = write_corpus(tmp_path / "c")
    cache = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", val_permille=300, fim_rate=0.0,
                              progress=False)
    assert cache.meta["dtype"] == "uint16" and cache.tokens().dtype == np.uint16
    lengths = tok.token_byte_lengths()
    for split in ("train", "val"):
        rels = [r for r in sorted(texts) if split_of(r, 300) == split]
        assert rels, "the fixture should put documents in both splits"
        stream = cache.tokens(split)
        expected = [t for r in rels for t in [*tok.encode(texts[r], parse_special=False), tok.eos_id]]
        assert stream.tolist() == expected  # each document followed by EOS, in path order
        meta = cache.meta["splits"][split]
        assert meta == {"n_docs": len(rels), "n_tokens": len(expected), "n_fim_docs": 0,
                        "n_bytes": sum(len(texts[r].encode()) for r in rels),
                        "blake2b": hashlib.blake2b(np.asarray(stream).tobytes(), digest_size=16).hexdigest()}
        assert lengths[np.asarray(stream)].sum() == meta["n_bytes"]  # bits-per-byte denominator is exact
    # the literal EOS string in a document did not become an EOS token
    assert len(split_docs(np.asarray(cache.tokens("train")), tok.eos_id)) == cache.meta["splits"]["train"]["n_docs"]


def test_cache_reuse_and_invalidation(tmp_path, tok, monkeypatch):
    write_corpus(tmp_path / "c")
    first = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", progress=False)
    assert not first.reused
    mtime = (first.directory / "train.bin").stat().st_mtime_ns

    calls = []
    real = DSTokenizer.encode_batch
    monkeypatch.setattr(DSTokenizer, "encode_batch", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    second = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", progress=False)
    assert second.reused and not calls and second.directory == first.directory
    assert (second.directory / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(second.tokens(), first.tokens()) and second.meta == first.meta
    assert TokenCache.open(first.directory).meta == first.meta

    # different FIM settings, or a changed file, give another key and a rebuild
    other = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", fim_seed=1, progress=False)
    assert not other.reused and other.directory != first.directory
    path = tmp_path / "c" / "doc_0.md"
    path.write_text(path.read_text() + "more\n")
    changed = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", progress=False)
    assert calls and not changed.reused and changed.directory not in (first.directory, other.directory)


def test_interrupted_build_leaves_no_cache(tmp_path, tok, monkeypatch):
    write_corpus(tmp_path / "c")

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(DSTokenizer, "encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(tmp_path / "c", tok, tmp_path / "cache", progress=False)
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []  # no meta.json, no partial .bin, no temp file
    monkeypatch.undo()
    assert not build_token_cache(tmp_path / "c", tok, tmp_path / "cache", progress=False).reused


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert token_dtype(129280) == np.uint32


# --- packing and sampling (synthetic streams: token i has value i, so windows are identifiable) ---

def stream(n):
    return np.arange(n, dtype=np.uint32)


def test_windows_are_contiguous_slices():
    L, B = 8, 4
    s = PackedSampler(stream(203), seq_len=L, batch_size=B, seed=0)
    assert s.n_windows == (203 - 1) // L == 25 and s.batches_per_epoch == 6
    seen = []
    for _ in range(s.batches_per_epoch):
        batch = next(s)
        assert batch.shape == (B, L + 1) and batch.dtype == torch.int64
        for row in batch:
            start = int(row[0])
            assert start % L == 0 and torch.equal(row, torch.arange(start, start + L + 1))
            seen.append(start // L)
    assert len(set(seen)) == len(seen) == 6 * B  # no window twice within an epoch
    assert sorted(s.epoch_order(0)) == list(range(25))
    assert s.epoch == 1 and s.batch_in_epoch == 0
    assert not np.array_equal(s.epoch_order(0), s.epoch_order(1))  # reshuffled each epoch


def test_sampler_determinism_and_resume():
    tokens, L, B, N = stream(1000), 16, 4, 40  # 15 batches per epoch: N crosses two epoch boundaries
    a = PackedSampler(tokens, L, B, seed=3)
    straight = [next(a) for _ in range(N)]
    b = PackedSampler(tokens, L, B, seed=3)
    first_half = [next(b) for _ in range(N // 2 + 1)]
    state = json.loads(json.dumps(b.state_dict()))  # checkpointable as plain JSON
    c = PackedSampler(tokens, L, B, seed=0)  # fresh, even with another seed: the state carries it
    c.load_state_dict(state)
    resumed = first_half + [next(c) for _ in range(N - len(first_half))]
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed))
    other_seed = PackedSampler(tokens, L, B, seed=4)
    assert not torch.equal(next(other_seed), straight[0])
    with pytest.raises(ValueError, match="seq_len"):
        PackedSampler(tokens, 8, B).load_state_dict(state)


def test_rank_sharding():
    tokens, L, B, W = stream(2000), 8, 6, 3
    single = PackedSampler(tokens, L, B, seed=1)
    ranks = [PackedSampler(tokens, L, B, seed=1, rank=r, world_size=W) for r in range(W)]
    for _ in range(50):
        full = next(single)
        parts = [next(r) for r in ranks]
        assert all(p.shape == (B // W, L + 1) for p in parts)
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])  # disjoint
        assert torch.equal(torch.cat(parts), full)  # the ranks together see the global batch
    # resume on another world size with the same global batch
    two = PackedSampler(tokens, L, B, seed=1, rank=1, world_size=2)
    two.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(two), next(single)[B // 2:])
    with pytest.raises(ValueError, match="multiple of world_size"):
        PackedSampler(tokens, L, 5, world_size=2)


def test_too_small_corpus_errors(tmp_path, tok):
    with pytest.raises(CorpusError, match=r"has 10 tokens, fewer than one sequence of seq_len\+1 = 17"):
        PackedSampler(stream(10), seq_len=16, batch_size=1)
    with pytest.raises(CorpusError, match="fewer than one global batch of 8"):
        PackedSampler(stream(50), seq_len=16, batch_size=8)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("tiny")
    cache = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", val_permille=0, progress=False)
    n = cache.meta["splits"]["train"]["n_tokens"]
    with pytest.raises(CorpusError, match=f"train split of directory .* has {n} tokens"):
        cache.sampler(seq_len=64, batch_size=1)


def test_val_batches_in_order():
    tokens, L = stream(8 * 10 + 3), 8  # 10 windows
    vb = ValBatches(tokens, L, batch_size=4)
    batches = list(vb)
    assert len(vb) == len(batches) == 3 and [b.shape[0] for b in batches] == [4, 4, 2]
    starts = torch.cat(batches)[:, 0].tolist()
    assert starts == [k * L for k in range(10)]
    assert all(torch.equal(r, torch.arange(r[0], r[0] + L + 1)) for b in batches for r in b)
    assert [torch.equal(x, y) for x, y in zip(batches, list(vb))] == [True] * 3  # re-iterable
    # two ranks: partial last batch dropped so both run the same number of batches
    parts = [list(ValBatches(tokens, L, 4, rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    assert torch.equal(torch.cat([parts[0][0], parts[1][0]]), batches[0])


def test_sampler_from_cache_and_bits_per_byte(tmp_path, tok):
    write_corpus(tmp_path / "c", n_files=30)
    cache = build_token_cache(tmp_path / "c", tok, tmp_path / "cache", val_permille=200, progress=False)
    batch = next(cache.sampler(seq_len=16, batch_size=2))
    train = np.asarray(cache.tokens("train"))
    windows = np.lib.stride_tricks.sliding_window_view(train, 17)[::16]  # (n_windows, 17), stride seq_len
    for row in batch.numpy():
        assert (windows == row).all(1).any()  # each row is one of the aligned windows
    # bits per byte over the whole val split, with a uniform "model": log(V) nats per target
    val = cache.val_batches(seq_len=16, batch_size=2)
    lengths = torch.from_numpy(tok.token_byte_lengths())
    n_targets = sum(b[:, 1:].numel() for b in val)
    n_bytes = sum(int(lengths[b[:, 1:]].sum()) for b in val)
    bpb = bits_per_byte(n_targets * np.log(tok.vocab_size), n_bytes)
    assert bpb == pytest.approx(n_targets * np.log2(tok.vocab_size) / n_bytes)
    assert 0 < n_bytes <= cache.meta["splits"]["val"]["n_bytes"]


def test_generated_files_are_left_out_of_python_corpora(tmp_path):
    """The default corpus is Python people wrote: a file whose first lines say a program generated it
    (the stdlib's codec tables, pydoc's topics) is data, and stays out of training and of the headline."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "real.py").write_text('"""Helpers."""\n\ndef f(x):\n    return x\n')
    (tmp_path / "pkg" / "table.py").write_text('""" Python Character Mapping Codec cp860 generated from '
                                               "'VENDORS/CP860.TXT' with gencodec.py.\n\"\"\"\nt = (1, 2)\n")
    (tmp_path / "pkg" / "topics.py").write_text("# -*- coding: utf-8 -*-\n# Autogenerated by Sphinx\nx = 1\n")
    (tmp_path / "pkg" / "late.py").write_text("x = 1\n" * 5 + "# generated by nothing: only the header counts\n")
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "tests" / "test_real.py").write_text("def test(): pass\n")
    c = D.python_corpus(tmp_path, "pkg")
    assert [f.relpath for f in c.files] == ["pkg/late.py", "pkg/real.py"]
    std = D.stdlib_corpus()
    names = {f.relpath for f in std.files}
    assert "encodings/cp860.py" not in names and "pydoc_data/topics.py" not in names and "os.py" in names
    assert "encodings/utf_8.py" in names  # a codec written by people stays


def test_sample_corpus_is_deterministic_and_bounded(tmp_path):
    for i in range(30):
        (tmp_path / f"m{i:02d}.py").write_text("x = 1\n" * (i + 1))
    c = D.find_corpus(tmp_path)
    s1, s2 = D.sample_corpus(c, 200), D.sample_corpus(c, 200)
    assert [f.relpath for f in s1.files] == [f.relpath for f in s2.files]
    assert 0 < s1.n_bytes <= 200 and len(s1.files) < len(c.files) and "sample" in s1.description
    assert D.sample_corpus(c, 0) is c and D.sample_corpus(c, 10**9) is c
    # spread by a hash of the paths, not the first files in order
    assert [f.relpath for f in s1.files] != [f.relpath for f in c.files[:len(s1.files)]]


# --- malformed or unusual inputs ----------------------------------------------------------------------

def test_jsonl_text_with_unicode_line_separators(tmp_path, tok):
    """JSON lets U+2028, U+2029 and U+0085 stand unescaped inside strings (json.dumps(ensure_ascii=False) writes them
    so): they are part of a document's text, not line breaks of the file (str.splitlines() split the record and
    refused a valid file as "malformed JSON"). CRLF and CR line ends still end records."""
    texts = ["para\u2028graph", "next\u2029para", "nel\x85line", "plain"]
    f = tmp_path / "u.jsonl"
    f.write_bytes(("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts[:3]) + "\r"
                   + json.dumps({"text": texts[3]}) + "\n").encode("utf-8"))
    docs = D.read_documents(find_corpus(f).files[0])
    assert [(d.key, d.text) for d in docs] == [(f"u.jsonl:{i + 1}", t) for i, t in enumerate(texts)]
    cache = build_token_cache(f, tok, tmp_path / "cache", val_permille=0, fim_rate=0.0, progress=False)
    assert cache.meta["splits"]["train"]["n_bytes"] == sum(len(t.encode()) for t in texts)


def test_a_json_file_of_json_lines_is_read_as_jsonl(tmp_path):
    """A `.json` file named by --data whose lines are records with a 'text' field (datasets' to_json writes JSON
    Lines under .json) gives its records' texts, not one document of JSON syntax; any other .json file is still
    one document, as every explicitly named file is. A byte-order mark before the first record is not part of it."""
    records = [{"text": "first doc"}, {"text": "second doc", "id": 2}]
    lines = tmp_path / "export.json"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    corpus = find_corpus(lines)
    assert corpus.files[0].kind == "jsonl"
    assert [d.text for d in D.read_documents(corpus.files[0])] == ["first doc", "second doc"]
    pretty = tmp_path / "config.json"
    pretty.write_text(json.dumps({"text": "x", "n": 1}, indent=2), encoding="utf-8")
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records), encoding="utf-8")
    for f in (pretty, array):
        doc, = D.read_documents(find_corpus(f).files[0])
        assert doc.text == f.read_text(encoding="utf-8")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + lines.read_bytes())
    assert [d.text for d in D.read_documents(find_corpus(bom).files[0])] == ["first doc", "second doc"]
    bom_json = tmp_path / "bom.json"
    bom_json.write_bytes(bom.read_bytes())
    assert [d.text for d in D.read_documents(find_corpus(bom_json).files[0])] == ["first doc", "second doc"]


def test_jsonl_lone_surrogate_is_a_clear_error(tmp_path, tok):
    """"\\ud800" is valid JSON but no Unicode text (it has no UTF-8 form): one CorpusError naming the file and line,
    not a bare UnicodeEncodeError from the tokenizer trainer or the cache build."""
    f = tmp_path / "sur.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "bad \\ud800 escape"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"sur\.jsonl:2: .*surrogate"):
        build_token_cache(f, tok, tmp_path / "cache", progress=False)
    with pytest.raises(CorpusError, match=r"sur\.jsonl:2"):
        D.read_documents(find_corpus(f).files[0])


def test_symlink_loop_as_corpus_path(tmp_path):
    """--data naming a symlink loop: one error naming the path (pathlib's resolve() raised RuntimeError)."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(FileNotFoundError, match="loop"):
        find_corpus(tmp_path / "loop")
    # inside a directory, loops are not documents (like broken links) and directory links are not followed
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("text")
    (tmp_path / "d" / "b.txt").symlink_to(tmp_path / "d" / "b.txt")
    (tmp_path / "d" / "up").symlink_to(tmp_path)
    assert [f.relpath for f in find_corpus(tmp_path / "d").files] == ["a.txt"]


def test_resume_on_a_changed_stream_says_so():
    a = PackedSampler(stream(1000), 16, 4, seed=3)
    next(a)
    with pytest.raises(ValueError, match="token stream .* changed"):
        PackedSampler(stream(1003), 16, 4, seed=3).load_state_dict(a.state_dict())


def test_cache_dtype_covers_the_largest_id_not_the_count(tmp_path, tok):
    """A tokenizer.json whose ids skip (here every added token moved past 65,535, with 290-odd tokens in all): the
    token dtype must hold the largest id (uint16 raised OverflowError mid-build), and the byte table reach it."""
    spec = json.loads(tok.tokenizer.to_str())
    for t in spec["added_tokens"]:
        spec["model"]["vocab"][t["content"]] = t["id"] = t["id"] + 70000
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    sparse = DSTokenizer.load(tmp_path / "tok")
    assert sparse.vocab_size < 1 << 16 and sparse.eos_id == tok.eos_id + 70000
    texts = write_corpus(tmp_path / "c", n_files=3)
    cache = build_token_cache(tmp_path / "c", sparse, tmp_path / "cache", val_permille=0, fim_rate=0.0,
                              progress=False)
    assert cache.meta["dtype"] == "uint32" and sparse.id_limit == max(spec["model"]["vocab"].values()) + 1
    stream = np.asarray(cache.tokens("train"))
    assert (stream == sparse.eos_id).sum() == len(texts)
    assert sparse.token_byte_lengths()[stream].sum() == sum(len(t.encode()) for t in texts.values())
    # the model's embedding must cover the largest id too (vocab_size 512 >= 290-odd tokens passed, then indexed 70,017)
    from types import SimpleNamespace

    from dsv3.training.config import TrainConfig
    from dsv3.training.pretrain import get_tokenizer
    with pytest.raises(ValueError, match=r"ids up to 700\d\d but the model's vocab_size is 512"):
        get_tokenizer(TrainConfig(tokenizer=str(tmp_path / "tok")), SimpleNamespace(vocab_size=512), print)


def test_a_cache_of_another_format_version_is_rebuilt(tmp_path, tok, monkeypatch):
    """FORMAT_VERSION is part of the cache key: a cache built by a dsv3 whose reading of the files differed
    (another version) is rebuilt, not reused; the same version reuses it."""
    import dsv3.training.data as data

    f = tmp_path / "a.txt"
    f.write_text("alpha beta gamma delta " * 50)
    old = build_token_cache(f, tok, tmp_path / "cache", val_permille=0, fim_rate=0.0, progress=False)
    again = build_token_cache(f, tok, tmp_path / "cache", val_permille=0, fim_rate=0.0, progress=False)
    assert again.directory == old.directory
    monkeypatch.setattr(data, "FORMAT_VERSION", data.FORMAT_VERSION + 1)
    new = build_token_cache(f, tok, tmp_path / "cache", val_permille=0, fim_rate=0.0, progress=False)
    assert new.directory != old.directory and new.meta["format_version"] == data.FORMAT_VERSION
    assert new.fingerprint("train") == old.fingerprint("train")  # the same text: the same tokens (resumes allowed)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.pop("epoch"), "epoch is missing"),
    (lambda s: s.update(batch_in_epoch="3"), "batch_in_epoch is '3'"),
    (lambda s: s.update(seed=None), "seed is None"),
    (lambda s: s.update(n_tokens=1.5), "n_tokens is 1.5"),
])
def test_a_malformed_sampler_state_is_named(edit, needle):
    """A checkpoint's sampler state is untrusted: a missing or non-integer field is a one-line error naming it (a
    bare KeyError, 'dsv3 train: error: epoch', or a TypeError's traceback mid-run before)."""
    s = PackedSampler(np.arange(1000, dtype=np.uint16), 16, 4, seed=3)
    next(s)
    state = s.state_dict()
    PackedSampler(np.arange(1000, dtype=np.uint16), 16, 4, seed=3).load_state_dict(dict(state))
    edit(state)
    with pytest.raises(ValueError, match=f"saved sampler state's {needle}, not an integer"):
        PackedSampler(np.arange(1000, dtype=np.uint16), 16, 4, seed=3).load_state_dict(state)


def test_resume_refused_on_other_tokens_of_the_same_count(tmp_path, tok):
    """The cache records a blake2b of each split's stream; the sampler saves it with its state, so a resume on a
    corpus edited in place (as many tokens, other ones) is refused, while a rebuild of the same text resumes."""
    f = tmp_path / "a.txt"
    f.write_text("alpha beta gamma delta " * 200)
    c1 = build_token_cache(f, tok, tmp_path / "c1", val_permille=0, fim_rate=0.0, progress=False)
    fp = c1.fingerprint("train")
    assert fp == hashlib.blake2b((c1.directory / "train.bin").read_bytes(), digest_size=16).hexdigest()
    s1 = c1.sampler(16, 4, seed=1)
    next(s1)
    state = s1.state_dict()
    assert state["fingerprint"] == fp
    same = build_token_cache(f, tok, tmp_path / "c2", val_permille=0, fim_rate=0.0, progress=False)
    same.sampler(16, 4, seed=1).load_state_dict(state)  # the same tokens: fine
    # an edit in place that keeps the token count: the first candidate whose encoding is as long
    text = f.read_text()
    n = len(tok.encode(text, parse_special=False))
    edited = next(t for t in (text.replace("gamma", w, 1) for w in ("gammo", "gamme", "gemma", "gammx", "gamna",
                                                                     "gbmma", "gamba", "gama", "gammaa"))
                  if len(tok.encode(t, parse_special=False)) == n)
    f.write_text(edited)
    other = build_token_cache(f, tok, tmp_path / "c3", val_permille=0, fim_rate=0.0, progress=False)
    assert other.meta["splits"]["train"]["n_tokens"] == c1.meta["splits"]["train"]["n_tokens"]
    with pytest.raises(ValueError, match="as many tokens, other ones"):
        other.sampler(16, 4, seed=1).load_state_dict(state)
    old = dict(state)
    del old["fingerprint"]  # a checkpoint from before the fingerprint: resumes as before
    other.sampler(16, 4, seed=1).load_state_dict(old)


def test_a_failed_tokenizer_save_leaves_no_cached_tokenizer(tmp_path, monkeypatch):
    """get_tokenizer caches the BPE it trains; a save cut short (a full disk, a kill) left a truncated tokenizer.json
    there, which every later run on that corpus loaded and failed on ("not a valid tokenizer file"), and a run
    started beside one that was saving could read half a file. The files now land whole or not at all."""
    from types import SimpleNamespace

    from dsv3.training.config import TrainConfig
    from dsv3.training.pretrain import get_tokenizer

    write_corpus(tmp_path / "c", n_files=6)
    tc = TrainConfig(data=str(tmp_path / "c"), cache_dir=str(tmp_path / "cache"), val_permille=0)
    save = DSTokenizer.save

    def full_disk(self, directory, **kw):  # the disk fills up halfway through tokenizer.json
        out = save(self, directory, **kw)
        text = (out / "tokenizer.json").read_text(encoding="utf-8")
        (out / "tokenizer.json").write_text(text[:len(text) // 2], encoding="utf-8")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DSTokenizer, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        get_tokenizer(tc, SimpleNamespace(vocab_size=300), lambda s: None)
    monkeypatch.setattr(DSTokenizer, "save", save)
    tok = get_tokenizer(tc, SimpleNamespace(vocab_size=300), lambda s: None)  # trains again
    again = get_tokenizer(tc, SimpleNamespace(vocab_size=300), lambda s: None)  # the cached one
    assert again.fingerprint == tok.fingerprint and tok.encode("def add(a, b):") == again.encode("def add(a, b):")
    assert not [p for p in (tmp_path / "cache").rglob("*") if "tmp" in p.name]  # no temporary file left behind


def test_file_names_that_are_not_utf8(tmp_path, tok, caplog):
    """A file name that is not UTF-8 (b"caf\\xe9.txt" from a latin-1 archive; Python holds it with surrogate escapes)
    stopped every build with "'utf-8' codec can't encode character '\\udce9' ... surrogates not allowed", naming no
    file: the split hash, the FIM seed and meta.json encoded it strictly. It is hashed by its bytes now, a UTF-8
    name as before."""
    root = tmp_path / "c"
    root.mkdir()
    try:
        (root / b"caf\xe9.txt".decode("utf-8", "surrogateescape")).write_text("un texte " * 40, encoding="utf-8")
        (root / b"bin\xff.txt".decode("utf-8", "surrogateescape")).write_bytes(b"\xff\xfe not UTF-8")  # skipped
    except (OSError, UnicodeEncodeError):
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    (root / "ok.txt").write_text("plain text " * 40, encoding="utf-8")
    odd = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    assert split_of(odd, 500) == ("val" if int(hashlib.sha1(b"caf\xe9.txt").hexdigest(), 16) % 1000 < 500 else "train")
    assert split_of("ok.txt", 500) == ("val" if int(hashlib.sha1(b"ok.txt").hexdigest(), 16) % 1000 < 500 else "train")
    fim_split("abc", fim_rng(0, odd))
    for fim in (0.0, 1.0):
        cache = build_token_cache(root, tok, tmp_path / "cache", val_permille=0, fim_rate=fim, progress=False)
        assert cache.meta["splits"]["train"]["n_docs"] == 2 and cache.meta["n_skipped"] == 1
        again = build_token_cache(root, tok, tmp_path / "cache", val_permille=0, fim_rate=fim, progress=False)
        assert again.reused and again.meta == cache.meta
    assert len(D.sample_corpus(find_corpus(root), 500).files) == 2
    # the skipped file's warning names it with its byte escaped: a lone surrogate cannot be written as UTF-8
    warned = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert warned and all("bin\\xff.txt" in m and m.encode("utf-8") for m in warned), warned
