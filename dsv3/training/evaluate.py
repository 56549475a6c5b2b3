"""Validation loss and bits per byte of a checkpoint on a corpus (`dsv3 eval`).

The corpus is tokenized with the checkpoint's tokenizer into the same token cache `dsv3 train` uses
(`<cache_dir>/tokens`, without FIM), split the same way (`val_permille`), and read in order in
windows of `seq_len` + 1 tokens (dsv3.training.data.ValBatches); the loss is that of
dsv3.training.loop.evaluate, in fp32, so bits per byte are exact over whatever is evaluated. Split
"all" reads the train split then the val split: the whole of a file or directory given as --data.

Beside the model, gzip -9 and xz -9e compress the same bytes: the text of the evaluated target tokens
(the windows' targets are one contiguous run of the token stream, tokens[1 : 1 + val_tokens]; EOS
between documents carries no bytes), so the three figures share one denominator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dsv3.checkpoints.hf import load_pretrained
from dsv3.checkpoints.rundir import resolve_checkpoint
from dsv3.cliargs import setting
from dsv3.eval.compress import compressor_bits_per_byte
from dsv3.checkpoints.loads import check_writable, save_counts
from dsv3.model.loads import ExpertLoadRecorder
from dsv3.model.moe import max_violation
from dsv3.tokenizer import DSTokenizer
from dsv3.training.config import TrainConfig, default_cache_dir, resolve_device
from dsv3.training.data import Corpus, ValBatches, build_token_cache, find_corpus, sample_corpus
from dsv3.training.loop import evaluate
from dsv3.training.strategy import Strategy


@dataclass
class EvalConfig:
    """What `evaluate_checkpoint` measures; the fields are also the flags of `dsv3 eval`."""
    data: str | None = setting(None, "file or directory to evaluate (default: the Python standard library)")
    # a corpus the user names is evaluated whole; the default corpus (the stdlib) is trained on, so only
    # its held-out split is fair
    split: str | None = setting(None, "which part of the corpus: all (train then val), train, or val (the "
                                      "split a training run holds out, --val-permille); default: all of --data "
                                      "when it is given, else the stdlib's val split",
                                choices=("val", "train", "all"))
    # None: the checkpoint's run's (trainer_state.json), so that "val" is the split that run held out, at the
    # context it trained on; train's defaults for a checkpoint without a run (exported, another tool's)
    val_permille: int | None = setting(None, "held-out split, per mille of the corpus (default: the checkpoint's "
                                             f"run's --val-permille, else {TrainConfig.val_permille})")
    seq_len: int | None = setting(None, "tokens per window (default: the checkpoint's run's --seq-len, else "
                                        f"{TrainConfig.seq_len})")
    batch_size: int = setting(8, "windows per forward")
    max_batches: int = setting(0, "evaluate at most this many batches (0: the whole split)")
    max_bytes: int = setting(0, "evaluate a sample of the files of at most this many bytes, the same on every "
                                "machine (chosen by a hash of their paths); 0: every file")
    device: str = setting("auto", "auto | cpu | cuda")
    # as in `train`: the root; token caches live in its tokens/ subdirectory
    cache_dir: str = setting(factory=default_cache_dir,
                             help="where token caches go, under tokens/ ($DSV3_CACHE, else ~/.cache/dsv3)")
    progress: bool = setting(True, "no progress bars (tokenizing, evaluating)")  # the flag is --no-progress
    compressors: bool = setting(True, "do not compress the evaluated bytes with gzip and xz")  # --no-compressors
    record_expert_loads: str | None = setting(None, "also count the tokens routed to each expert of each MoE block "
                                                    "(main layers, then MTP: the MTP modules run too) and write them "
                                                    "(.pt or .npy) to FILE: the loads `dsv3 serve --expert-loads` "
                                                    "places redundant experts from", metavar="FILE")


class _WithMTP(Strategy):
    """One process, the MTP modules run in evaluation too (their routers' loads; the loss is the main model's)."""

    def eval_logits(self, x: torch.Tensor, autocast) -> torch.Tensor | None:
        with autocast():
            return self.model(x, with_mtp=True).logits


def run_settings(path: str) -> dict:
    """{"val_permille", "seq_len"}: the settings of the training run that wrote checkpoint directory `path`, from
    its trainer_state.json's train_config; those it does not hold (a checkpoint without a run: exported,
    converted, another tool's; a malformed value) are left out."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            tc = json.load(f).get("train_config")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(tc, dict):
        return {}
    out = {k: tc[k] for k in ("val_permille", "seq_len") if type(tc.get(k)) is int}
    if not 0 <= out.get("val_permille", 0) <= 1000:
        del out["val_permille"]
    if out.get("seq_len", 1) <= 0:
        del out["seq_len"]
    return out


def evaluate_checkpoint(checkpoint: str, cfg: EvalConfig, corpus: Corpus | None = None) -> dict:
    """{checkpoint, split, source, val_loss (nats/token), val_bpb (bits/byte), val_tokens, val_bytes,
    compressors ({"gzip -9": bpb, "xz -9e": bpb} on the same bytes, unless cfg.compressors is False)} of a
    checkpoint directory or run directory (its latest checkpoint) on cfg.data's cfg.split split (or on
    `corpus`, a Corpus built by the caller)."""
    split = cfg.split or ("all" if cfg.data is not None or corpus is not None else "val")
    for name in ("seq_len", "batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("max_batches", "max_bytes"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(cfg, name)}")
    if cfg.record_expert_loads:
        check_writable(cfg.record_expert_loads)
    path = resolve_checkpoint(checkpoint)
    run = run_settings(path)
    # "all" reads both splits, so its bytes do not depend on the split; its default stays train's (same windows)
    val_permille = (cfg.val_permille if cfg.val_permille is not None else
                    run.get("val_permille", TrainConfig.val_permille) if split != "all" else TrainConfig.val_permille)
    cfg = dataclasses.replace(cfg, val_permille=val_permille,
                              seq_len=cfg.seq_len if cfg.seq_len is not None else run.get("seq_len", TrainConfig.seq_len))
    device = resolve_device(cfg.device)
    tok = DSTokenizer.load(path)
    model = load_pretrained(path, device=device, dtype=torch.float32).eval()
    recorder = ExpertLoadRecorder(model) if cfg.record_expert_loads else None
    context = model.config.max_position_embeddings
    if cfg.seq_len > context:  # (positions past it would extrapolate RoPE: a loss, but not the model's)
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's context (max_position_embeddings "
                         f"{context}): give --seq-len <= {context}")
    source = sample_corpus(corpus or find_corpus(cfg.data), cfg.max_bytes)
    cache = build_token_cache(source, tok, os.path.join(cfg.cache_dir, "tokens"), val_permille=cfg.val_permille,
                              fim_rate=0.0, progress=cfg.progress)
    splits = ("train", "val") if split == "all" else (split,)
    n_tokens = sum(cache.meta["splits"][s]["n_tokens"] for s in splits)
    hint = "" if split == "all" else " (--split all evaluates the whole corpus)"
    if n_tokens == 0:
        raise ValueError(f"the {split} split of {cache.meta['source']} holds no text{hint}")
    if n_tokens <= cfg.seq_len:
        raise ValueError(f"the {split} split of {cache.meta['source']} has too few tokens for seq_len "
                         f"{cfg.seq_len} ({n_tokens} tokens){hint}")
    tokens = cache.tokens(splits[0]) if len(splits) == 1 else np.concatenate([cache.tokens(s) for s in splits])
    batches = ValBatches(tokens, cfg.seq_len, cfg.batch_size, name=f"{split} split")
    token_bytes = tok.token_byte_lengths()
    n = min(len(batches), cfg.max_batches) if cfg.max_batches else len(batches)
    bar = tqdm(total=n, desc="eval", unit="batch", dynamic_ncols=True, file=sys.stderr) if cfg.progress else None
    try:
        with recorder.recording() if recorder is not None else contextlib.nullcontext():
            ev = evaluate((Strategy if recorder is None else _WithMTP).of(model), batches, token_bytes,
                          contextlib.nullcontext, cfg.max_batches or None,
                          on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    targets = np.asarray(tokens[1: 1 + ev["val_tokens"]], dtype=np.int64)
    r = {"checkpoint": path, "split": split, "source": cache.meta["source"], "val_permille": cfg.val_permille,
         "seq_len": cfg.seq_len, **ev,
         "val_bytes": int(token_bytes[targets].sum())}
    if recorder is not None:
        counts = recorder.read()
        save_counts(counts, cfg.record_expert_loads, checkpoint=path, source=cache.meta["source"], split=split,
                    tokens=ev["val_tokens"])
        r["expert_loads"] = {"file": cfg.record_expert_loads, "blocks": counts.shape[0], "experts": counts.shape[1],
                             "max_violation": max_violation(counts).tolist()}  # per block, max / mean - 1
    if cfg.compressors:  # the bytes the loss covers, in order
        text = tok.decode_bytes(targets[token_bytes[targets] > 0].tolist())
        r["compressors"] = compressor_bits_per_byte(text)
    return r


# The other Python source the default run (the stdlib corpus) is judged on: pip's own code ships with every
# virtual environment and interpreter install, is pure Python by many authors (its vendored libraries
# included), and is not in the default corpus (the stdlib walk skips site-packages).
HELDOUT_PACKAGE = "pip"
HELDOUT_BYTES = 400_000  # its sample (sample_corpus): ~20 s of evaluation for the tiny model on 2 cores


def heldout_corpus() -> Corpus | None:
    """HELDOUT_PACKAGE's `.py` files (tests and generated files left out), or None where it is not installed."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    from dsv3.training.data import python_corpus

    spec = importlib.util.find_spec(HELDOUT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    try:
        version = importlib.metadata.version(HELDOUT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    corpus = python_corpus(root, f"{HELDOUT_PACKAGE} {version} ({root})")
    return corpus if corpus.files else None


def default_run_report(checkpoint: str, tc: TrainConfig) -> list[dict]:
    """What the default run (`dsv3 train`, stdlib corpus) prints at its end: bits per byte beside gzip -9 and
    xz -9e on the stdlib's held-out split and on a sample of other Python source (heldout_corpus)."""
    base = EvalConfig(split="val", val_permille=tc.val_permille, seq_len=tc.seq_len, device=tc.device,
                      cache_dir=tc.cache_dir, progress=False)
    rows = [{"name": "stdlib, held-out split", **evaluate_checkpoint(checkpoint, base)}]
    other = heldout_corpus()
    if other is not None:
        cfg = EvalConfig(split="all", seq_len=tc.seq_len, device=tc.device, cache_dir=tc.cache_dir, progress=False,
                         max_bytes=HELDOUT_BYTES)
        rows.append({"name": f"{HELDOUT_PACKAGE} (never trained on)", **evaluate_checkpoint(checkpoint, cfg, other)})
    return rows


def format_report(rows: list[dict]) -> str:
    """A markdown table of default_run_report's rows."""
    out = ["| held-out Python | bytes | dsv3 | gzip -9 | xz -9e |", "|---|---|---|---|---|"]
    for r in rows:
        c = r["compressors"]
        out.append(f"| {r['name']} | {r['val_bytes']:,} | {r['val_bpb']:.3f} | {c['gzip -9']:.3f} | {c['xz -9e']:.3f} |")
    return "\n".join(out)
