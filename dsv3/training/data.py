"""Pre-training data: corpus discovery, one-time tokenization into a memory-mapped cache, FIM,
packing into fixed windows, and a resumable, rank-sharded batch sampler.

    source (dir | file | .jsonl | stdlib) -> documents -> split by path hash -> [FIM] -> tokens + EOS
        -> cache_dir/<key>/{train.bin, val.bin, meta.json} -> windows of seq_len+1 -> (B, seq_len+1)

Corpus. One document per file (text/code extensions, recursively; hidden and `__pycache__`
directories skipped) or per line of a `.jsonl` file (its `text` field). The default corpus is the
running interpreter's standard library (`.py`, without `test/`, `tests/`, `idle_test/`,
`site-packages/`, and without generated files such as the codec tables, `is_generated`; 663 files /
10.1 MB on CPython 3.11.7, ANCHORS §6.1), so record which Python a run used: `meta.json` does. Files that are not valid UTF-8 are skipped and counted.

Split. A document goes to validation iff int(sha1(key)) % 1000 < val_permille, with key = the
file's path relative to the corpus root (posix), or "relpath:lineno" for a jsonl line: stable across
machines and independent of which other files exist.

FIM (SPEC §8, PSM at document level, rate 0.1) is applied at tokenization time, train split only.
Whether a document is FIM'd and where it is cut comes from an RNG seeded by (fim_seed, key), so the
result does not depend on file order or on the other documents. Cuts are two uniform character
positions; the pieces are tokenized separately and laid out as
    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>
Doing it once at tokenization keeps sampling a pure memmap slice; the price is that the same
documents are FIM'd in every epoch, and that fim_rate/fim_seed are part of the cache key.

Tokens. Documents are encoded with `parse_special=False` (a literal "<｜end▁of▁sentence｜>" in a
file stays text), each followed by EOS, and appended to `train.bin` / `val.bin`: raw uint16 when
every id fits (vocab_size <= 65536), else uint32. `meta.json` holds per split n_docs, n_tokens and
n_bytes (UTF-8 bytes of the text, the bits-per-byte denominator) plus skipped files, dtype, the
tokenizer fingerprint and the source.

Cache key = sha256 of (format version, every file's relpath/kind/size/mtime_ns, tokenizer.json
fingerprint, special ids used, val_permille, fim_rate, fim_seed). Size+mtime (as make does) avoids
reading every file twice; touching a file rebuilds. Every file is written to a temporary name and
`os.replace`d; `meta.json` goes last and marks the cache complete, so an interrupted build is
simply redone. In data parallel runs build on one rank first (then barrier): concurrent builders do
not corrupt each other, they just duplicate work.

Packing. The split's token stream (documents joined by their EOS, no cross-document masking,
SPEC §8) is cut at multiples of seq_len into windows of seq_len+1 tokens: window k = stream[k*L :
k*L + L + 1], input = [:-1], target = [1:]. Neighbouring windows share one token (the last target
of one is the first input of the next), so each token is a target at most once per epoch; the tail
shorter than a window is not used.

Sampling. `PackedSampler` shuffles the window indices with a seeded RNG per epoch and yields global
batches of `batch_size` windows, of which rank r gets rows [r*b, (r+1)*b), b = batch_size/world_size:
disjoint across ranks, their union is the single-process batch. Its state is (epoch, batch index),
so `load_state_dict` resumes mid-epoch with exactly the batches an uninterrupted run would have seen,
even with a different world size (same global batch). `ValBatches` walks the val stream in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dsv3.tokenizer import DSTokenizer, MissingSpecialTokenError

log = logging.getLogger(__name__)

# Part of every token cache's key: bump it when the same files and tokenizer would give other tokens or splits, so
# that caches built before are rebuilt, not reused. 2: JSONL records end only at CR / LF (490c8b5; U+2028 and
# U+2029 split them before), and a file name that is not UTF-8 is hashed by its bytes (it failed before).
FORMAT_VERSION = 2

# One document per file with one of these endings (lower-cased); `.jsonl` files hold one per line.
TEXT_EXTENSIONS = frozenset({
    ".txt", ".md", ".rst", ".tex", ".pod", ".adoc",  # prose (`x.rst.txt` ends in .txt)
    ".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu", ".cuh", ".rs", ".go",
    ".java", ".kt", ".scala", ".js", ".jsx", ".ts", ".tsx", ".rb", ".pl", ".pm", ".lua", ".jl",
    ".hs", ".ml", ".swift", ".sh", ".bash", ".sql", ".html", ".css", ".toml", ".yaml", ".yml",
    ".cfg", ".ini",
})
JSONL_EXTENSION = ".jsonl"
SKIP_DIRS = frozenset({"__pycache__", "node_modules"})  # plus hidden directories (".git", ...)
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
SPLITS = ("train", "val")


class CorpusError(ValueError):
    """A corpus that cannot be used: malformed jsonl, no documents, fewer tokens than one window."""


# --- corpus discovery --------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFile:
    relpath: str  # posix path relative to the corpus root: split hash and cache key use it
    path: Path
    kind: str  # "text" (one document) or "jsonl" (one document per line)
    size: int
    mtime_ns: int


@dataclass
class Corpus:
    description: str  # e.g. "stdlib of CPython 3.11.7 (/usr/lib/python3.11)" or "directory /data/x"
    root: Path
    files: list[SourceFile]

    @property
    def n_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Document:
    key: str  # relpath, or "relpath:lineno" for a jsonl line
    text: str


def _source_file(path: Path, root: Path, kind: str) -> SourceFile:
    st = path.stat()
    return SourceFile(path.relative_to(root).as_posix(), path, kind, st.st_size, st.st_mtime_ns)


# A dsv3 run directory (it holds train_config.json) inside a corpus, or the corpus itself (--out = --data): its
# metrics.jsonl and checkpoints are the run's outputs, not text to train on (a resume once read metrics.jsonl's
# records as documents and stopped: "each line must be a JSON object with a string 'text' field")
RUN_MARKER = "train_config.json"
RUN_OUTPUTS = frozenset({"metrics.jsonl", "checkpoints"})


def _walk(root: Path, skip_dirs: frozenset[str], extensions: frozenset[str]) -> list[SourceFile]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        run_dir = RUN_MARKER in filenames
        # prune in place so os.walk does not descend; sorted for a stable order
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith(".")
                             and not (run_dir and d in RUN_OUTPUTS))
        for name in sorted(filenames):
            if run_dir and name in RUN_OUTPUTS:
                continue
            path = Path(dirpath) / name
            ext = path.suffix.lower()
            if ext == JSONL_EXTENSION:
                kind = "jsonl"
            elif ext in extensions:
                kind = "text"
            else:
                continue
            if path.is_file():  # skips broken links, sockets
                files.append(_source_file(path, root, kind))
    return sorted(files, key=lambda f: f.relpath)


# A file whose first lines say a program wrote it: the stdlib's codec tables ("generated from ... with
# gencodec.py"), Sphinx's pydoc topics ("Autogenerated by Sphinx"), sysconfig's data; vendored tables
# ("automatically generated by ..."). They are data, not Python as people write it.
GENERATED_HEADER = re.compile(r"(?i)auto-?generated|automatically generated|do not edit|\bgenerated (from|by|and used by)\b")


def is_generated(path: Path) -> bool:
    """Whether the file's first three lines say that it was generated (GENERATED_HEADER)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512).decode("utf-8", "replace")
    except OSError:
        return False
    return bool(GENERATED_HEADER.search("\n".join(head.splitlines()[:3])))


def python_corpus(root: Path, description: str, skip_dirs: frozenset[str] = frozenset()) -> Corpus:
    """The `.py` files under `root` written by people: test directories and generated files left out."""
    files = [f for f in _walk(root, SKIP_DIRS | STDLIB_SKIP_DIRS | skip_dirs, frozenset({".py"}))
             if f.kind == "text" and not is_generated(f.path)]
    return Corpus(description, root, files)


def stdlib_corpus() -> Corpus:
    """The running interpreter's standard library: its non-test `.py` files, generated files left out
    (is_generated: 71 files / 2.0 MB on CPython 3.11.7, most of them codec tables, and pydoc's topics)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    return python_corpus(root, f"stdlib of {sys.implementation.name} {version} ({root})")


def sample_corpus(corpus: Corpus, max_bytes: int) -> Corpus:
    """A deterministic sample of `corpus`'s files of at most `max_bytes` (all when 0 or when it is smaller):
    files in the order of a hash of their relative paths (spread over the whole tree, the same on every
    machine), kept while they fit."""
    if max_bytes <= 0 or corpus.n_bytes <= max_bytes:
        return corpus
    order = sorted(corpus.files, key=lambda f: hashlib.sha1(key_bytes(f.relpath)).hexdigest())
    kept, total = [], 0
    for f in order:
        if total + f.size <= max_bytes:
            kept.append(f)
            total += f.size
    return Corpus(f"{corpus.description}, a {total:,}-byte sample of {len(kept)} of its {len(corpus.files)} files",
                  corpus.root, sorted(kept, key=lambda f: f.relpath))


def find_corpus(source: str | os.PathLike | None = None, *,
                extensions: frozenset[str] = TEXT_EXTENSIONS) -> Corpus:
    """Resolve a source: None or "stdlib", a directory (recursive), or a single text/.jsonl file."""
    if source is None or (isinstance(source, str) and source == "stdlib"):
        corpus = stdlib_corpus()
    else:
        if not str(source).strip():  # ("" resolves to the working directory)
            raise FileNotFoundError("corpus path is empty: give a directory or a file")
        try:
            path = Path(source).expanduser().resolve()
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise FileNotFoundError(f"corpus path {source} cannot be resolved ({e})") from None
        special = (f"corpus path {source} is a pipe or another special file (process substitution <(...), "
                   "/dev/stdin): the corpus is read more than once (tokenizer, token cache, validation split); give "
                   "a regular file or a directory")
        if not path.exists():  # (/dev/fd/63 resolves to "pipe:[...]", which does not exist)
            if os.path.exists(source):
                raise CorpusError(special)
            raise FileNotFoundError(f"corpus path {source} does not exist")
        if not path.is_dir() and not path.is_file():  # a FIFO, a device
            raise CorpusError(special)
        if path.is_dir():
            corpus = Corpus(f"directory {path}", path, _walk(path, SKIP_DIRS, extensions))
        else:  # a file named explicitly is read whatever its extension
            kind = "jsonl" if path.suffix.lower() == JSONL_EXTENSION or _json_lines(path) else "text"
            corpus = Corpus(f"file {path}", path.parent, [_source_file(path, path.parent, kind)])
    if not corpus.files:
        raise CorpusError(f"no documents in {corpus.description}: no .jsonl file and no file ending in "
                          f"{', '.join(sorted(extensions))}")
    return corpus


def _json_lines(path: Path) -> bool:
    """Whether `path` is a `.json` file of JSON Lines records with a 'text' field (what datasets' `to_json`
    writes, and many corpora ship as `.json`): its first non-blank line is such an object. Read as `.jsonl` then,
    not as one document of JSON syntax."""
    if path.suffix.lower() != ".json":
        return False
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    record = json.loads(raw.decode("utf-8-sig"))
                    return isinstance(record, dict) and "text" in record
    except (OSError, ValueError):  # unreadable, not UTF-8, not one JSON value a line: a document as named
        pass
    return False


def jsonl_records(lines, name: str, error: type[Exception] = ValueError):
    """(line number, parsed object) for every non-blank line of a JSONL text; a malformed line raises
    `error` with "name:line: malformed JSON (...)". The one JSONL parser of the project."""
    lineno, lines = 0, iter(lines)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except UnicodeDecodeError as e:  # a file opened as UTF-8 text that is not (decoded in blocks: no line number)
            raise error(f"{name}: not UTF-8 text ({e.reason}), after line {lineno}") from None
        lineno += 1
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{name}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str from json.loads: an escape with no UTF-8 form


def not_unicode(text: str) -> str | None:
    """Why `text` (a str from json.loads) is not Unicode text, or None: a lone surrogate escape ("\\ud800" parses
    as JSON but has no UTF-8 form, and the tokenizer fails on it with a TypeError). The one check of the JSONL
    readers (corpus records, SFT chats, GRPO task files)."""
    bad = _LONE_SURROGATE.search(text)
    return f"holds a lone surrogate escape (\\u{ord(bad[0]):04x}), which is not Unicode text" if bad else None


def read_documents(file: SourceFile) -> list[Document] | None:
    """The documents of one file (empty texts dropped), or None when it is not valid UTF-8.

    A `.jsonl` file is read whole: split very large ones into several files.
    """
    try:
        text = file.path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    if file.kind == "text":
        return [Document(file.relpath, text)] if text else []
    docs = []
    # records end at \n, \r\n or \r only (as a text-mode file's lines): str.splitlines() also breaks at U+2028,
    # U+2029 and U+0085, which JSON allows unescaped inside strings
    # (a byte-order mark, which Windows editors write, is no part of the first record)
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, record in jsonl_records(lines, str(file.path), CorpusError):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = "no 'text' field" if not isinstance(record, dict) or "text" not in record else \
                f"'text' is {type(record['text']).__name__}, not a string"
            raise CorpusError(f"{file.path}:{lineno}: each line must be a JSON object with a string "
                              f"'text' field; {got}")
        if why := not_unicode(record["text"]):
            raise CorpusError(f"{file.path}:{lineno}: 'text' {why}")
        if record["text"]:
            docs.append(Document(f"{file.relpath}:{lineno}", record["text"]))
    return docs


def key_bytes(key: str) -> bytes:
    """The bytes of a relative path or document key, what the split and FIM hash: its UTF-8, and a file name that is
    not UTF-8 (which Python holds with surrogate escapes, b"caf\xe9" as "caf\udce9") as its own bytes."""
    return key.encode("utf-8", "surrogateescape")


def shown(key: str) -> str:
    """A file name as messages show it: a byte that is not UTF-8 as its backslash escape (the byte 0xE9 as the four
    characters \\xe9), so the message can be written anywhere (a lone surrogate cannot be encoded as UTF-8: a log
    file or a pipe refuses it)."""
    return key_bytes(key).decode("utf-8", "backslashreplace")


def split_of(key: str, val_permille: int = 10) -> str:
    """'val' for about val_permille/1000 of the keys, chosen by a stable hash of the key."""
    return "val" if int(hashlib.sha1(key_bytes(key)).hexdigest(), 16) % 1000 < val_permille else "train"


def validation_overlap(main: Corpus, extra: Corpus, val_permille: int) -> list[Path]:
    """The files of `extra` (training data only) that hold documents of `main`'s validation split: a text file
    whose key falls in it, or a .jsonl file (split line by line) that `main` also holds."""
    if val_permille <= 0:
        return []
    val = {f.path.resolve() for f in main.files if f.kind == "jsonl" or split_of(f.relpath, val_permille) == "val"}
    return [f.path for f in extra.files if f.path.resolve() in val]


# --- FIM -----------------------------------------------------------------------------------------

def fim_rng(seed: int, key: str) -> random.Random:
    # str and bytes seeds go through sha512: the same stream on every machine and PYTHONHASHSEED
    return random.Random(key_bytes(f"fim:{seed}:{key}"))


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """(prefix, middle, suffix) at two uniform character cut points; prefix+middle+suffix == text."""
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:i], text[i:j], text[j:]


def fim_tokens(prefix: list[int], middle: list[int], suffix: list[int], tok: DSTokenizer) -> list[int]:
    """PSM layout (SPEC §8), EOS included."""
    return [tok.fim_begin_id, *prefix, tok.fim_hole_id, *suffix, tok.fim_end_id, *middle, tok.eos_id]


# --- token cache ---------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class TokenCache:
    directory: Path
    meta: dict
    reused: bool = False  # True when build_token_cache found it complete and tokenized nothing

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TokenCache:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no token cache at {directory} (meta.json missing: not built or interrupted)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"]) if meta["dtype"] in ("uint16", "uint32") else None
            counts = {split: meta["splits"][split]["n_tokens"] for split in SPLITS}
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorpusError(f"token cache {meta_path} is malformed ({type(e).__name__}: {e}); delete the "
                              "directory to rebuild it") from None
        if dtype is None or not all(type(n) is int and n >= 0 for n in counts.values()):
            raise CorpusError(f"token cache {meta_path} is malformed (dtype {meta['dtype']!r}, token counts "
                              f"{counts}); delete the directory to rebuild it")
        cache = cls(directory, meta, reused=True)
        for split in SPLITS:  # a truncated or foreign .bin means the cache is unusable
            expected = counts[split] * dtype.itemsize
            path = directory / f"{split}.bin"
            if not path.is_file() or path.stat().st_size != expected:
                raise CorpusError(f"token cache {directory} is inconsistent: {path.name} should hold {expected} bytes")
        return cache

    def tokens(self, split: str = "train") -> np.ndarray:
        """(n_tokens,) read-only memmap of the split's stream (an empty array for an empty split)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        dtype = np.dtype(self.meta["dtype"])
        if self.meta["splits"][split]["n_tokens"] == 0:
            return np.zeros(0, dtype)  # np.memmap cannot map an empty file
        return np.memmap(self.directory / f"{split}.bin", dtype=dtype, mode="r")

    def sampler(self, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                world_size: int = 1) -> PackedSampler:
        return PackedSampler(self.tokens("train"), seq_len, batch_size, seed=seed, rank=rank,
                             world_size=world_size, name=f"train split of {self.meta['source']}",
                             fingerprint=self.fingerprint("train"))

    def fingerprint(self, split: str = "train") -> str | None:
        """The blake2b of the split's token stream as built (None: a cache built before dsv3 recorded it)."""
        return self.meta["splits"][split].get("blake2b")

    def val_batches(self, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                    drop_last: bool | None = None) -> ValBatches:
        return ValBatches(self.tokens("val"), seq_len, batch_size, rank=rank, world_size=world_size,
                          drop_last=drop_last, name=f"val split of {self.meta['source']}")


def cache_key(corpus: Corpus, tok: DSTokenizer, *, val_permille: int, fim_rate: float, fim_seed: int) -> str:
    specials = {"eos": tok.eos_id}
    if fim_rate > 0:  # a tokenizer without FIM tokens is fine when FIM is off
        try:
            specials.update(fim_begin=tok.fim_begin_id, fim_hole=tok.fim_hole_id, fim_end=tok.fim_end_id)
        except MissingSpecialTokenError as e:  # the way out a command-line user has: FIM off
            raise MissingSpecialTokenError(f"FIM at rate {fim_rate} needs the tokenizer's FIM tokens: {e}; or train "
                                           "without FIM (dsv3 train --fim-rate 0)") from None
    payload = {
        "format": FORMAT_VERSION,
        "files": [[f.relpath, f.kind, f.size, f.mtime_ns] for f in corpus.files],
        "tokenizer": tok.fingerprint,
        "specials": specials,
        "val_permille": val_permille,
        "fim": [fim_rate, fim_seed] if fim_rate > 0 else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class _SplitWriter:
    """Appends one split's tokens to a temporary file and counts documents, tokens and bytes."""
    path: Path
    dtype: np.dtype
    n_docs: int = 0
    n_tokens: int = 0
    n_bytes: int = 0
    n_fim_docs: int = 0
    _tmp: Path = field(init=False)

    def __post_init__(self):
        self._tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._f = open(self._tmp, "wb")
        self._hash = hashlib.blake2b(digest_size=16)  # of the stream's bytes: a resume's check that it is the run's

    def write(self, ids: list[int], text_bytes: int, fim: bool) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        arr.tofile(self._f)
        self._hash.update(arr)  # (its buffer: no copy)
        self.n_docs += 1
        self.n_tokens += len(ids)
        self.n_bytes += text_bytes
        self.n_fim_docs += fim

    def commit(self) -> dict:
        self._f.close()
        os.replace(self._tmp, self.path)
        return {"n_docs": self.n_docs, "n_tokens": self.n_tokens, "n_bytes": self.n_bytes,
                "n_fim_docs": self.n_fim_docs, "blake2b": self._hash.hexdigest()}

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def build_token_cache(source: str | os.PathLike | Corpus | None, tokenizer: DSTokenizer,
                      cache_dir: str | os.PathLike, *, val_permille: int = 10, fim_rate: float = 0.1,
                      fim_seed: int = 0, progress: bool = True, chunk_bytes: int = 4 << 20) -> TokenCache:
    """Tokenize `source` once into `cache_dir/<key>/`; later calls with the same inputs reuse it.

    `chunk_bytes` of text are handed to `encode_batch` at a time (parallel over cores, bounded memory).
    """
    if not 0 <= val_permille <= 1000:
        raise ValueError(f"val_permille must be in [0, 1000], got {val_permille}")
    if not 0.0 <= fim_rate <= 1.0:
        raise ValueError(f"fim_rate must be in [0, 1], got {fim_rate}")
    corpus = source if isinstance(source, Corpus) else find_corpus(source)
    key = cache_key(corpus, tokenizer, val_permille=val_permille, fim_rate=fim_rate, fim_seed=fim_seed)
    directory = Path(cache_dir) / key[:24]
    try:
        cache = TokenCache.open(directory)
        if cache.meta["key"] == key:
            return cache
    except (FileNotFoundError, CorpusError, KeyError, json.JSONDecodeError):
        pass  # absent, interrupted or damaged: (re)build
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta.json lands

    t0 = time.perf_counter()
    dtype = token_dtype(tokenizer.id_limit)  # the largest id, not the count: a file's ids may skip
    eos = tokenizer.eos_id
    writers = {s: _SplitWriter(directory / f"{s}.bin", dtype) for s in SPLITS}
    skipped: list[str] = []
    # pending work: texts to encode and, per document, (split, number of pieces, text bytes)
    texts: list[str] = []
    layout: list[tuple[str, int, int]] = []
    pending = 0

    def flush() -> None:
        ids = iter(tokenizer.encode_batch(texts, parse_special=False))
        for split, n_pieces, n_bytes in layout:
            if n_pieces == 1:
                writers[split].write([*next(ids), eos], n_bytes, fim=False)
            else:  # texts were queued as prefix, suffix, middle
                prefix, suffix, middle = next(ids), next(ids), next(ids)
                writers[split].write(fim_tokens(prefix, middle, suffix, tokenizer), n_bytes, fim=True)
        texts.clear()
        layout.clear()

    bar = tqdm(total=corpus.n_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    try:
        for file in corpus.files:
            docs = read_documents(file)
            if docs is None:
                skipped.append(file.relpath)
            for doc in docs or ():
                split = split_of(doc.key, val_permille)
                n_bytes = len(doc.text.encode("utf-8"))
                rng = fim_rng(fim_seed, doc.key) if split == "train" and fim_rate > 0 else None
                if rng is not None and rng.random() < fim_rate:
                    prefix, middle, suffix = fim_split(doc.text, rng)
                    texts.extend((prefix, suffix, middle))
                    layout.append((split, 3, n_bytes))
                else:
                    texts.append(doc.text)
                    layout.append((split, 1, n_bytes))
                pending += n_bytes
            if pending >= chunk_bytes:
                flush()
                pending = 0
            bar.update(file.size)
        flush()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

    if skipped:
        log.warning("skipped %d of %d files that are not valid UTF-8 (e.g. %s)", len(skipped),
                    len(corpus.files), shown(skipped[0]))
    if sum(w.n_docs for w in writers.values()) == 0:
        for w in writers.values():
            w.abort()
        raise CorpusError(f"no documents in {corpus.description}: {len(corpus.files)} files, "
                          f"{len(skipped)} skipped as not UTF-8, the rest empty")
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": corpus.description,
        "python": sys.version.split()[0],
        "n_files": len(corpus.files),
        "n_skipped": len(skipped),
        "skipped_files": skipped,  # not valid UTF-8
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "eos_id": eos,
        "val_permille": val_permille,
        "fim_rate": fim_rate,
        "fim_seed": fim_seed,
        "splits": {s: w.commit() for s, w in writers.items()},
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    # (ASCII, \u escapes: a file name that is not UTF-8, in skipped_files or source, has no UTF-8 to write)
    _atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2) + "\n")
    return TokenCache(directory, meta, reused=False)


# --- packing and sampling ------------------------------------------------------------------------

def _check_windows(n_tokens: int, seq_len: int, name: str) -> int:
    """Number of windows of seq_len+1 tokens at stride seq_len in a stream of n_tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if n_tokens < seq_len + 1:
        raise CorpusError(f"the {name} has {n_tokens} tokens, fewer than one sequence of seq_len+1 = "
                          f"{seq_len + 1}: use a smaller seq_len or a larger corpus")
    return (n_tokens - 1) // seq_len


def _check_ranks(batch_size: int, rank: int, world_size: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"the global batch_size={batch_size} must be a positive multiple of world_size={world_size}")
    return batch_size // world_size


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    # (b, 1) + (1, L+1) -> (b, L+1) indices into the stream; one fancy-indexed read of the memmap
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


class PackedSampler:
    """Infinite iterator of (batch_size/world_size, seq_len+1) LongTensor batches of shuffled windows.

    Each epoch draws an order of all windows from (seed, epoch) and yields its first
    n_windows // batch_size global batches: the n_windows % batch_size windows at the end of that
    order are not seen in that epoch (a later epoch's order places them afresh).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, name: str = "token stream", fingerprint: str | None = None):
        self.tokens = tokens
        # a hash of the stream (TokenCache.fingerprint): saved with the state, so that a resume on other tokens of
        # the same count (a corpus file edited in place) is refused instead of silently training on other windows
        self.fingerprint = fingerprint
        self.seq_len = seq_len
        self.batch_size = batch_size  # global: all ranks together
        self.local_batch_size = _check_ranks(batch_size, rank, world_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.n_windows = _check_windows(len(tokens), seq_len, name)
        if self.n_windows < batch_size:
            raise CorpusError(f"the {name} has {len(tokens)} tokens = {self.n_windows} windows of seq_len "
                              f"{seq_len}, fewer than one global batch of {batch_size}")
        self.batches_per_epoch = self.n_windows // batch_size
        self.epoch = 0
        self.batch_in_epoch = 0  # index of the next batch to yield
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) memo

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(n_windows,) window indices in the order epoch `epoch` visits them."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._order[1]

    def __iter__(self) -> PackedSampler:
        return self

    def __next__(self) -> torch.Tensor:
        order = self.epoch_order(self.epoch)
        first = self.batch_in_epoch * self.batch_size + self.rank * self.local_batch_size
        windows = order[first:first + self.local_batch_size]  # this rank's rows of the global batch
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return _gather(self.tokens, windows * self.seq_len, self.seq_len)

    def state_dict(self) -> dict:
        # rank/world_size are not state: a run may resume on another number of ranks
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                 "seq_len": self.seq_len, "batch_size": self.batch_size, "n_tokens": len(self.tokens)}
        if self.fingerprint is not None:
            state["fingerprint"] = self.fingerprint
        return state

    def load_state_dict(self, state: dict) -> None:
        for k in ("epoch", "batch_in_epoch", "seed", "seq_len", "batch_size", "n_tokens"):  # a checkpoint's, untrusted
            if not isinstance(state.get(k), (int, np.integer)) or isinstance(state.get(k), bool):
                raise ValueError(f"cannot resume: the saved sampler state's {k} is "
                                 f"{repr(state[k]) if k in state else 'missing'}, not an integer")
        mine = {"seq_len": self.seq_len, "batch_size": self.batch_size, "n_tokens": len(self.tokens)}
        for k, v in mine.items():
            if state[k] != v:
                why = (": the token stream has changed since the checkpoint (the corpus' files, or the tokenizer, "
                       "are not the run's)") if k == "n_tokens" else ""
                raise ValueError(f"cannot resume: the saved sampler has {k}={state[k]}, this one {v}{why}")
        saved = state.get("fingerprint")
        if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
            raise ValueError("cannot resume: the token stream has changed since the checkpoint (as many tokens, "
                             "other ones: a corpus file edited, or another tokenizer)")
        if not 0 <= state["batch_in_epoch"] < self.batches_per_epoch:
            raise ValueError(f"batch_in_epoch={state['batch_in_epoch']} out of range [0, {self.batches_per_epoch})")
        self.seed, self.epoch, self.batch_in_epoch = state["seed"], state["epoch"], state["batch_in_epoch"]


class ValBatches:
    """The val stream in order: windows 0, 1, 2, ... at stride seq_len, in global batches of
    `batch_size` of which each rank gets its rows. Re-iterable; each pass starts at window 0.

    The last, partial global batch is kept with one process (drop_last=False) and dropped with
    several (drop_last=True), so that every rank runs the same number of forward passes. Bits per
    byte stays exact over whatever is evaluated when the byte count is summed over the targets
    (`DSTokenizer.token_byte_lengths()[targets]`).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 drop_last: bool | None = None, name: str = "val stream"):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = _check_ranks(batch_size, rank, world_size)
        self.n_windows = _check_windows(len(tokens), seq_len, name)
        self.drop_last = world_size > 1 if drop_last is None else drop_last
        if self.drop_last and self.n_windows < batch_size:
            raise CorpusError(f"the {name} has {self.n_windows} windows of seq_len {seq_len}, fewer than one "
                              f"global batch of {batch_size}")
        if not self.drop_last and world_size > 1:
            raise ValueError("drop_last=False needs world_size=1 (ranks would run different numbers of batches)")

    def __len__(self) -> int:
        full, rest = divmod(self.n_windows, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(len(self)):
            first = b * self.batch_size + self.rank * self.local_batch_size
            windows = np.arange(first, min(first + self.local_batch_size, self.n_windows))
            yield _gather(self.tokens, windows * self.seq_len, self.seq_len)


def bits_per_byte(loss_sum_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte from a summed (not averaged) cross-entropy in nats; tokenizer-independent."""
    return loss_sum_nats / (math.log(2) * n_bytes)
