"""Passkey retrieval ("needle in a haystack"), the long-context test of the DeepSeek-V3 paper's Figure 8:
can the model repeat a number hidden at a given depth of a prompt of a given length?

A prompt of exactly `length` tokens (the checkpoint's tokenizer) is, in token ids:

    INTRO | filler[:b] | KEY(key) | filler[b:n] | QUESTION        n = length - |INTRO| - |KEY| - |QUESTION|

where `filler` is a neutral text (FILLER repeated, generated locally) tokenized once and cut at token
granularity, and b = round(depth / 100 * n): depth 0 puts the key right after the introduction, 100
right before the question. The pieces are concatenated as ids, not re-tokenized as one text, so the
length and the key's token position are exact (`build_prompt` returns that position). No special tokens
are added (no BOS: dsv3 documents start after an EOS, and the engine takes the ids as they are).

The model continues greedily for `new_tokens` tokens through the batched engine (the prompts of a
length in batches of max_batch_size prompts, at most max_batch_tokens prompt tokens). Scoring (`score_passkey`): the answer is right when the first
run of ASCII digits in the generated text is exactly the key. So "71432", " 71432." and "no, 71432"
are right; "7143", "714320", "71,432", "7 1432" and "" are wrong (the first digit run is not the
key). Signs, spaces and words before the first digit are ignored; what follows the number is ignored.

Lengths are prompt lengths; a length plus `new_tokens` must fit in the model's context
(max_position_embeddings), else `resolve_lengths` refuses it. The keys are random `key_digits`-digit
numbers drawn from a generator seeded with (seed, length, depth, trial): reruns are identical.

Training documents (`passkey_documents`). A model that never saw the task does not answer it (the first
H200 run of bench/long_context_gpu.py, trained on Python only, scored 0.00 even inside its trained
context: it never emitted a digit). `passkey_documents` writes texts in the same format, for training:

    INTRO + filler[:b] + KEY(key) + filler[b:] + QUESTION + " {key}.\n"

with the same INTRO / KEY / QUESTION, so a model trained on them is asked the eval's question, but a
different haystack (TRAIN_FILLERS: other neutral sentences, shuffled, cut at a word) and keys from
their own stream (random.Random(f"train-{seed}")), so the grid's filler is never memorised and its
keys are not the training keys (a collision of two random 5-digit numbers is possible, not systematic).
Each document's length in tokens is drawn uniformly in [min_tokens, max_tokens] and met to within the
bounds by measuring the text with the tokenizer; the key's depth is uniform in [0, 100].
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from dsv3.cliargs import setting

INTRO = "There is a pass key hidden in the text below. Find it and remember it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"

DEFAULT_DEPTHS = ",".join(str(d) for d in range(0, 101, 10))
_DIGITS = re.compile(r"[0-9]+")


@dataclass
class NeedleConfig:
    """The passkey grid of `dsv3 eval --task needle`; the fields are also its flags."""
    lengths: str = setting("auto", "prompt lengths in tokens, comma-separated (e.g. 256,512,1024), or auto: powers "
                                   "of two from 128 up to the model's context, and the longest prompt that fits")
    depths: str = setting(DEFAULT_DEPTHS, "key depths, percent of the filler placed before the key, comma-separated")
    trials: int = setting(4, "keys per (length, depth) cell")
    new_tokens: int = setting(8, "tokens generated greedily per prompt")
    key_digits: int = setting(5, "digits of each pass key")
    max_batch_size: int = setting(16, "prompts decoded together")
    # the prefill computes logits at every position: (batch x length x vocab) values at once
    max_batch_tokens: int = setting(65536, "prompt tokens prefilled together (fewer prompts per batch at long "
                                           "lengths)")
    seed: int = setting(0, "seed of the pass keys")

    def validate(self) -> "NeedleConfig":
        for name in ("trials", "new_tokens", "key_digits", "max_batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self


def batch_size_for(length: int, cfg: NeedleConfig) -> int:
    """Prompts of `length` tokens generated together: max_batch_size, fewer when they exceed max_batch_tokens."""
    return max(1, min(cfg.max_batch_size, cfg.max_batch_tokens // length))


def score_passkey(output: str, key: str) -> bool:
    """True when the first run of ASCII digits in `output` is exactly `key` (module docstring)."""
    m = _DIGITS.search(output)
    return m is not None and m.group(0) == key


def parse_depths(spec: str) -> list[float]:
    """"0,50,100" -> [0.0, 50.0, 100.0]; each in [0, 100]."""
    try:
        depths = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated percentages, got {spec!r}") from None
    if not depths or any(not 0 <= d <= 100 for d in depths):
        raise ValueError(f"--depths must be percentages in [0, 100], got {spec!r}")
    return depths


def resolve_lengths(spec: str, context: int, new_tokens: int) -> list[int]:
    """The prompt lengths of `spec` ("auto" or "256,512"), sorted; each + new_tokens must fit `context`."""
    longest = context - new_tokens
    if spec.strip() == "auto":
        lengths = [2**k for k in range(7, 40) if 2**k < longest]
        return lengths + [longest] if longest > 0 else []
    try:
        lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--lengths must be 'auto' or comma-separated token counts, got {spec!r}") from None
    if not lengths or lengths[0] < 1:
        raise ValueError(f"--lengths must be positive token counts, got {spec!r}")
    too_long = [n for n in lengths if n > longest]
    if too_long:
        raise ValueError(f"length {too_long[0]} is beyond the model's context: {too_long[0]} prompt + {new_tokens} "
                         f"generated tokens > max_position_embeddings {context} (longest prompt: {longest})")
    return lengths


def make_key(seed: int, length: int, depth: float, trial: int, digits: int = 5) -> str:
    """A `digits`-digit number (no leading zero) fixed by (seed, length, depth, trial)."""
    rng = random.Random(f"{seed}:{length}:{depth}:{trial}")
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


class PromptBuilder:
    """Builds needle prompts of exact token lengths with one tokenizer (the filler is tokenized once)."""

    def __init__(self, tok):
        self.tok = tok
        self.intro = tok.encode(INTRO, parse_special=False)
        self.question = tok.encode(QUESTION, parse_special=False)
        self._filler: list[int] = []

    def filler(self, n: int) -> list[int]:
        """The first n ids of FILLER repeated (tokenized as one text, so the cut falls anywhere)."""
        reps = 1
        while len(self._filler) < n:
            reps = max(2 * reps, n // max(len(self.tok.encode(FILLER, parse_special=False)), 1) + 2)
            self._filler = self.tok.encode(FILLER * reps, parse_special=False)
        return self._filler[:n]

    def key_ids(self, key: str) -> list[int]:
        return self.tok.encode(KEY.format(key=key), parse_special=False)

    def build(self, length: int, depth: float, key: str) -> tuple[list[int], int]:
        """(ids of exactly `length` tokens, index of the key sentence's first token)."""
        key_ids = self.key_ids(key)
        fixed = len(self.intro) + len(key_ids) + len(self.question)
        n = length - fixed
        if n < 0:
            raise ValueError(f"length {length} is shorter than the {fixed} tokens of the instructions, key and "
                             "question alone")
        filler = self.filler(n)
        before = round(depth / 100 * n)
        ids = self.intro + filler[:before] + key_ids + filler[before:] + self.question
        assert len(ids) == length
        return ids, len(self.intro) + before


def build_prompt(tok, length: int, depth: float, key: str) -> tuple[list[int], int]:
    """One prompt (PromptBuilder.build); many prompts: reuse a PromptBuilder."""
    return PromptBuilder(tok).build(length, depth, key)


# --- training documents (module docstring) -----------------------------------------------------------

# Neutral sentences unlike FILLER's; each document draws one pool, shuffled, repeated as long as needed.
TRAIN_FILLERS = (
    ("The river runs past the old mill.", "A cat sleeps on the warm stone wall.", "The bread is baked at dawn.",
     "Rain falls softly on the roof.", "The train leaves the station on time.", "Birds sing in the tall trees.",
     "The road winds up the quiet hill.", "A boat drifts across the calm lake.", "The lamp glows in the window.",
     "Snow covers the empty field."),
    ("The library opens early on Monday.", "A child draws a house with a red door.", "The market is busy today.",
     "Someone plays a slow tune on the piano.", "The clock in the hall ticks loudly.", "Fresh apples fill the basket.",
     "The bus stops at the corner.", "A letter waits on the kitchen table.", "The garden needs more water.",
     "The painter mixes blue and white."),
    ("Clouds move slowly over the valley.", "The farmer counts the sheep at night.", "A bell rings in the old tower.",
     "The tea is still hot.", "Leaves turn brown in the autumn wind.", "The fisherman mends his net by the shore.",
     "A dog runs along the sandy beach.", "The baker sells warm rolls.", "Stars shine above the sleeping town.",
     "The teacher writes a word on the board."),
)


def _filler_words(rng: random.Random, pool: Sequence[str]):
    """The words of `pool`'s sentences, in a new shuffled order at every pass, forever."""
    pool = list(pool)
    while True:
        rng.shuffle(pool)
        yield from " ".join(pool).split()


def _passkey_text(words: list[str], before: int, key: str) -> str:
    """INTRO + words[:before] + KEY + words[before:] + QUESTION + the answer. Spaced as the eval prompt, so
    that the text's tokens hold the eval's INTRO, KEY and QUESTION ids: KEY's trailing space stays its own
    token before the next " word", as when the eval concatenates ids."""
    return (INTRO + " ".join(words[:before]) + KEY.format(key=key) + "".join(" " + w for w in words[before:])
            + QUESTION + f" {key}.\n")


def passkey_documents(n: int, tok, min_tokens: int, max_tokens: int, seed: int = 0,
                      key_digits: int = 5) -> list[str]:
    """`n` pass-key training texts (module docstring) of min_tokens..max_tokens tokens each (`tok.encode`
    without special tokens; the EOS that the data pipeline appends is not counted); deterministic for `seed`.
    A min_tokens below the template's own length acts as that length."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if key_digits < 1:
        raise ValueError(f"key_digits must be >= 1, got {key_digits}")
    if min_tokens > max_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})")

    def count(text: str) -> int:
        return len(tok.encode(text, parse_special=False))

    rng = random.Random(f"train-{seed}")  # not make_key's stream: the eval's keys are not the training keys
    # the template with the longest key: digits are pre-tokenized apart from the rest (in groups of up to
    # three), so a key costs the same tokens in each of its three places, at most one per digit
    some_key = "1" * key_digits
    fixed = count(_passkey_text([], 0, some_key)) + 3 * (key_digits - count(some_key))
    if max_tokens < fixed:
        raise ValueError(f"max_tokens ({max_tokens}) is shorter than the {fixed} tokens of the instructions, a "
                         f"{key_digits}-digit key, the question and the answer alone")
    word_cost: dict[str, int] = {}  # tokens of " word": the pre-tokenizer cuts before each space, so they add up
    docs = []
    for _ in range(n):
        key = str(rng.randrange(10 ** (key_digits - 1), 10**key_digits))
        target = rng.randint(max(min_tokens, fixed), max_tokens)
        depth = rng.random()
        stream = _filler_words(rng, rng.choice(TRAIN_FILLERS))
        words: list[str] = []
        budget = target - count(_passkey_text([], 0, key))
        for w in stream:
            if w not in word_cost:
                word_cost[w] = count(" " + w)
            if word_cost[w] > budget:
                break
            words.append(w)
            budget -= word_cost[w]
        for _ in range(100):  # the estimate is close; settle it on the real count
            text = _passkey_text(words, round(depth * len(words)), key)
            got = count(text)
            if got > max_tokens:
                assert words, (got, fixed)  # fixed is the longest template
                del words[-max(1, (got - max_tokens) // 2):]
            elif got < min_tokens:
                words.append(next(stream))
            else:
                break
        else:
            raise ValueError(f"no document of {min_tokens}..{max_tokens} tokens found (a word is more tokens than "
                             "the range is wide): widen it")
        docs.append(text)
    return docs


def run_needle(engine, tok, lengths: Sequence[int], depths: Sequence[float], cfg: NeedleConfig,
               progress: Callable[[int, int, int], None] | None = None) -> dict:
    """Generate and score the grid. `engine` is anything with `generate(prompts, params)` returning
    outputs with `.text` (dsv3.inference.engine.Engine); `progress(done, total, length)` is called after
    each batch. Returns the report (`accuracy[i][j]`: length i, depth j; `results`: every trial)."""
    from dsv3.inference.params import SamplingParams

    cfg.validate()
    builder = PromptBuilder(tok)
    cells = [(L, d, t) for L in lengths for d in depths for t in range(cfg.trials)]
    # build every prompt first: a length too short for the fixed text fails before any generation
    prompts = []
    for L, d, t in cells:
        key = make_key(cfg.seed, L, d, t, cfg.key_digits)
        ids, pos = builder.build(L, d, key)
        prompts.append((ids, key, pos))
    params = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=0.0, ignore_eos=True)
    results, seconds = [], {}
    for L in lengths:
        idx = [i for i, c in enumerate(cells) if c[0] == L]
        t0 = time.perf_counter()
        n = batch_size_for(L, cfg)
        for s in range(0, len(idx), n):
            chunk = idx[s: s + n]
            outs = engine.generate([prompts[i][0] for i in chunk], params)
            for i, o in zip(chunk, outs):
                (_, d, t), (_, key, pos) = cells[i], prompts[i]
                results.append({"length": L, "depth": d, "trial": t, "key": key, "key_position": pos,
                                "output": o.text, "correct": score_passkey(o.text, key)})
            if progress is not None:
                progress(len(results), len(cells), L)
        seconds[L] = time.perf_counter() - t0
    acc = [[sum(r["correct"] for r in results if r["length"] == L and r["depth"] == d) / cfg.trials for d in depths]
           for L in lengths]
    return {"task": "needle", "lengths": list(lengths), "depths": list(depths), "trials": cfg.trials,
            "new_tokens": cfg.new_tokens, "accuracy": acc,
            "accuracy_by_length": [sum(row) / len(row) for row in acc],
            "overall": sum(r["correct"] for r in results) / len(results),
            "seconds_by_length": [seconds[L] for L in lengths], "results": results}


def needle_checkpoint(checkpoint: str, cfg: NeedleConfig, device: str = "auto",
                      progress: Callable[[int, int, int], None] | None = None) -> dict:
    """`run_needle` on a checkpoint or run directory: the lengths are checked against its context before
    the model loads; the engine's cache holds the largest batch of any length (batch_size_for)."""
    from dsv3.checkpoints.rundir import resolve_checkpoint
    from dsv3.config import ModelConfig
    from dsv3.inference.engine import load_engine

    cfg.validate()
    path = resolve_checkpoint(checkpoint)
    context = ModelConfig.from_json(path).max_position_embeddings
    lengths = resolve_lengths(cfg.lengths, context, cfg.new_tokens)
    if not lengths:
        raise ValueError(f"the model's context ({context} tokens) has no room for a needle prompt and "
                         f"{cfg.new_tokens} generated tokens")
    depths = parse_depths(cfg.depths)
    batches = {L: min(batch_size_for(L, cfg), len(depths) * cfg.trials) for L in lengths}
    engine, tok = load_engine(path, device=device, max_batch_size=max(batches.values()),
                              cache_tokens=max(b * (L + cfg.new_tokens + 16) for L, b in batches.items()))
    report = run_needle(engine, tok, lengths, depths, cfg, progress)
    return {"checkpoint": path, "context": context, **report}


def format_table(report: dict) -> str:
    """Markdown table: one row per length, one column per depth, then the row's mean."""
    depths = report["depths"]
    head = "| length | " + " | ".join(f"{d:g}%" for d in depths) + " | mean |"
    lines = [head, "|" + "---|" * (len(depths) + 2)]
    for L, row, m in zip(report["lengths"], report["accuracy"], report["accuracy_by_length"]):
        lines.append(f"| {L} | " + " | ".join(f"{a:.2f}" for a in row) + f" | {m:.2f} |")
    return "\n".join(lines)


def plot_heatmap(report: dict, path: str, title: str | None = None) -> str:
    """PNG heatmap as the paper's Figure 8: context length (x) by key depth (y), colour = accuracy."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    import numpy as np

    acc = np.array(report["accuracy"], dtype=float).T  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.8 * acc.shape[1]), max(3.5, 1.6 + 0.35 * acc.shape[0])))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(acc.shape[1]), [str(L) for L in report["lengths"]], rotation=45, ha="right")
    ax.set_yticks(range(acc.shape[0]), [f"{d:g}" for d in report["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth (%)")
    ax.set_title(title or f"pass key retrieval, {report['trials']} keys per cell, mean {report['overall']:.2f}",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
