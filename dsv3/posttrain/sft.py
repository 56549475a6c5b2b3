"""Supervised fine-tuning on chat conversations (paper §5.1): a task of the pre-training loop.

Data: JSONL, one conversation per line, `{"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}`, rendered with the tokenizer's chat template (DeepSeek-V3's by default).

Loss mask (`render_conversation`): 1 exactly on each assistant message's content tokens and the
`<｜end▁of▁sentence｜>` that closes it; 0 on BOS, the system prompt, user turns and the
`<｜Assistant｜>` / `<｜User｜>` markers. Method: render growing prefixes of the conversation
(for assistant message i: messages[:i] with the generation prompt, then messages[:i+1]) and take
the string differences, so the template stays the single source of truth; every prefix must be a
string prefix of the next rendering (a template that reorders, e.g. a system message after the
first turn, is rejected). Each piece is encoded separately and the concatenation is checked against
the encoding of the whole rendering. With the V3 template every boundary sits next to a special
token (added tokens split the input before BPE), so the check always passes; a custom template
whose BPE merges across a boundary raises instead of silently shifting the mask.

Packing: conversations (shuffled per epoch by the seed) are placed greedily, in order, into rows of
`seq_len` tokens; a conversation that does not fit in the current row starts the next one, one
longer than `seq_len` is truncated to it (counted in the log). Every token carries a document id
(padding: -1), and attention is block-diagonal causal: token i may see token j iff j <= i and both
belong to the same conversation, so no conversation attends to another. RoPE positions restart at 0
for each conversation, so a packed conversation is computed exactly as it would be alone (tested).
Padding tokens attend causally among themselves (never an empty softmax row) and have no targets.
The MTP modules are not trained in SFT (`with_mtp=False`; their weights are frozen, so every layout
leaves them unchanged), and the MoE correction bias is frozen (the loads of SFT data are not those
of pre-training).

Loss: next-token cross-entropy on targets whose token is an assistant token, averaged over all
assistant tokens of the optimizer step (all micro-batches and all ranks: summed, then divided by the
step's global count, which one all-reduce gives before the backward).
Schedule: linear warmup then cosine from `lr` to `min_lr` (the paper: 5e-6 -> 1e-6 over 2 epochs).

Training: `SFT` is a task of the one training loop (dsv3/training/loop.py) and `train_sft` runs it with
the layout's strategy, in one process or under torchrun (FSDP2 and/or expert parallelism; the pipeline
layout refuses it), so checkpoints, exact resume (in any layout: the data position is global), Ctrl-C
saves, metrics.jsonl, plots and summary.json are pre-training's. The checkpoint holds the model, AdamW
state, RNG states and the data position (epoch, row), so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dsv3.cliargs import setting
from dsv3.model import build_model
from dsv3.posttrain.start import (freeze_mtp, load_start, make_run_directory, resolve_start,
                                  run_directory)
from dsv3.tokenizer import DSTokenizer
from dsv3.training import loop
from dsv3.training.config import check_common
from dsv3.training.data import jsonl_records, not_unicode
from dsv3.training.loss import IGNORE
from dsv3.training.pretrain import make_strategy
from dsv3.training.strategy import (PRECISIONS, check_weights, checkpoint_config, precision_recipe, prepare_model,
                                    resolve_precision)

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------------
# rendering and reading

def render_conversation(tok: DSTokenizer, messages: Sequence[Mapping]) -> tuple[list[int], list[int]]:
    """-> (token ids of the whole rendered conversation, loss mask of the same length)."""
    pieces: list[tuple[str, int]] = []  # (text, 1 if assistant output)
    prev = ""

    def add(text: str, is_assistant: int) -> None:
        nonlocal prev
        if not text.startswith(prev):
            raise ValueError("the chat template does not render this conversation incrementally (each prefix "
                             "must be a prefix of the next rendering; e.g. put the system message first)")
        pieces.append((text[len(prev):], is_assistant))
        prev = text

    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            add(tok.apply_chat_template(messages[:i], add_generation_prompt=True), 0)  # up to <｜Assistant｜>
        add(tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False), int(m["role"] == "assistant"))
    ids: list[int] = []
    mask: list[int] = []
    for text, a in pieces:
        t = tok.encode(text)
        ids += t
        mask += [a] * len(t)
    if ids != tok.encode(prev):
        raise ValueError("encoding the template's pieces separately differs from encoding the whole conversation "
                         "(BPE merges across a role boundary): this chat template needs another masking method")
    return ids, mask


def read_chats(path: str) -> list[list[dict]]:
    """Conversations of a JSONL file; clear `file:line: ...` errors for anything malformed."""
    convs = []
    with open(path, encoding="utf-8") as f:
        for n, row in jsonl_records(f, path):
            where = f"{path}:{n}"
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{where}: expected an object with a non-empty 'messages' list")
            for j, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    role = m.get("role") if isinstance(m, dict) else None
                    raise ValueError(f"{where}: message {j} has role {role!r}; expected one of {', '.join(ROLES)}")
                if not isinstance(m.get("content"), str):
                    raise ValueError(f"{where}: message {j} ({m['role']}) needs a string 'content'")
                if why := not_unicode(m["content"]):
                    raise ValueError(f"{where}: message {j} ({m['role']}) {why}")
                if m["role"] == "assistant" and not m["content"].strip():
                    raise ValueError(f"{where}: message {j} is an empty assistant message")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError(f"{where}: no assistant message (nothing to learn)")
            convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not convs:
        raise ValueError(f"{path}: no conversations")
    return convs


# --------------------------------------------------------------------------------------------------
# packing

def pack(samples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Greedy in-order packing -> {"input_ids", "targets", "doc_ids", "position_ids"}, each (N, seq_len),
    plus "n_truncated" (0-d). targets[t] = ids[t+1] when that token is an assistant token of the same
    conversation, else IGNORE."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used, truncated = 0, 0
    for ids, mask in samples:
        if len(ids) > seq_len:
            ids, mask, truncated = ids[:seq_len], mask[:seq_len], truncated + 1
        if used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
    N = len(rows)
    out = {"input_ids": torch.full((N, seq_len), pad_id, dtype=torch.long),
           "targets": torch.full((N, seq_len), IGNORE, dtype=torch.long),
           "doc_ids": torch.full((N, seq_len), -1, dtype=torch.long),
           "position_ids": torch.zeros(N, seq_len, dtype=torch.long)}
    for r, row in enumerate(rows):
        s = 0
        for d, (ids, mask) in enumerate(row):
            n = len(ids)
            t = torch.tensor(ids)
            out["input_ids"][r, s:s + n] = t
            tgt = torch.where(torch.tensor(mask[1:], dtype=torch.bool), t[1:], IGNORE)
            out["targets"][r, s:s + n - 1] = tgt
            out["doc_ids"][r, s:s + n] = d
            out["position_ids"][r, s:s + n] = torch.arange(n)
            s += n
        out["position_ids"][r, s:] = torch.arange(seq_len - s)  # padding: its own causal "document"
    out["n_truncated"] = torch.tensor(truncated)
    return out


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> boolean (B, 1, T, T): True where query i may attend key j (same document, j <= i)."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal).unsqueeze(1)


class PackedChats:
    """Epochs of packed rows; the order of conversations is reshuffled each epoch (seed, epoch).
    state_dict() = (epoch, row) for exact resume."""

    def __init__(self, samples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, seed: int = 0):
        self.samples, self.seq_len, self.pad_id, self.seed = samples, seq_len, pad_id, seed
        self.epoch, self.row = 0, 0
        self._rows = self._pack(0)
        # the conversations as tokens and loss masks (the data file, tokenizer and template together): a resume
        # on other ones would continue at the saved row of another packing
        h = hashlib.blake2b(digest_size=16)
        for ids, mask in samples:
            h.update(len(ids).to_bytes(8, "little"))
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(mask, dtype=np.int8).tobytes())
        self.fingerprint = h.hexdigest()

    def _pack(self, epoch: int) -> dict[str, torch.Tensor]:
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return pack([self.samples[i] for i in order], self.seq_len, self.pad_id)

    def rows_per_epoch(self) -> int:
        return self._rows["input_ids"].shape[0]

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """The next `batch_size` rows of the global sequence (every rank advances alike), of which this
        rank's share: rows [rank·b, (rank+1)·b), b = batch_size / world."""
        if batch_size % world:
            raise ValueError(f"a batch of {batch_size} rows does not split over {world} ranks")
        b = batch_size // world
        keys = ("input_ids", "targets", "doc_ids", "position_ids")
        take: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i in range(batch_size):
            if self.row >= self.rows_per_epoch():  # rows are gathered at once: a batch may span two epochs,
                self.epoch, self.row = self.epoch + 1, 0  # whose packings differ (even in their row count)
                self._rows = self._pack(self.epoch)
            if rank * b <= i < (rank + 1) * b:
                for k in keys:
                    take[k].append(self._rows[k][self.row])
            self.row += 1
        out = {k: torch.stack(v) for k, v in take.items()}
        out["attn_mask"] = block_causal_mask(out["doc_ids"])
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "fingerprint": self.fingerprint}

    def load_state_dict(self, s: dict) -> None:
        for k in ("epoch", "row"):  # a checkpoint's, untrusted
            if type(s.get(k)) is not int or s[k] < 0:
                raise ValueError(f"cannot resume: the saved data position's {k} is "
                                 f"{repr(s[k]) if k in s else 'missing'}, not an integer >= 0")
        if s.get("fingerprint", self.fingerprint) != self.fingerprint:  # (checkpoints before it hold none)
            raise ValueError("cannot resume: the chats are not the run's (its --data file, tokenizer or chat "
                             "template changed): the saved data position is a row of the run's packing; give the "
                             "run's --data, or start a new run with --out")
        self.epoch, self.row = s["epoch"], s["row"]
        self._rows = self._pack(self.epoch)


# --------------------------------------------------------------------------------------------------
# loss and schedule

def assistant_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed over the assistant targets (targets != IGNORE); logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def sft_loss(model, batch: Mapping[str, torch.Tensor], denom: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token CE summed over the assistant targets, divided by `denom` (default: their count, i.e.
    the mean over this batch's assistant tokens). batch: input_ids, targets, position_ids, attn_mask."""
    out = model(batch["input_ids"], batch["position_ids"], attn_mask=batch["attn_mask"], with_mtp=False)
    tgt = batch["targets"]
    if denom is None:
        denom = (tgt != IGNORE).sum().clamp_min(1)
    return assistant_ce(out.logits, tgt) / denom


def cosine_lr(step: int, total: int, peak: float, floor: float, warmup: int = 0) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` (first step after warmup) to `floor`
    (the last step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))


# --------------------------------------------------------------------------------------------------
# training

@dataclass
class SFTConfig:
    """Each field is also a `dsv3 sft` flag (dsv3/cliargs.py)."""
    # 2048, what `dsv3 sft` has always used (the library said 4096): the context (max_position_embeddings)
    # of the tiny preset, the model `dsv3 train` makes by default; longer rows would let one conversation
    # run to positions past the context the model declares. The small/16b presets' is 4096.
    seq_len: int = setting(2048, "tokens per packed row; a conversation longer than this is truncated (keep it "
                                 "at most the model's context)")
    batch_size: int = setting(16, "packed rows per optimizer step (global: split over the data-parallel ranks)")
    micro_batch_size: int = setting(0, "rows per forward/backward (gradient accumulation); 0: the batch size")
    epochs: float = setting(2.0, "passes over the chats (the paper's 2); used when --steps is 0")
    steps: int = setting(0, "if > 0, optimizer steps, overriding --epochs")
    lr: float = setting(5e-6, "peak learning rate (the paper's cosine 5e-6 -> 1e-6)")
    min_lr: float = setting(1e-6, "learning rate at the end of the cosine")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    seed: int = setting(0, "random seed (row order)")
    device: str = setting("auto", "auto | cpu | cuda")
    precision: str = setting("auto", "fp32, bf16 autocast, or fp8 (bf16 autocast + the paper's FP8 GEMMs); auto: "
                                     "bf16 on CUDA, else fp32", choices=("auto", "fp32", "bf16", "fp8"))
    # as pre-training's --bf16-weights (dsv3/training/optim.py AdamW(masters=...)): checkpoints hold the fp32 masters
    bf16_weights: bool = setting(False, "with --precision bf16 or fp8: store the GEMM weights in bf16 (no per-step "
                                        "casts, bf16 weight gradients) and keep fp32 master weights in the optimizer")
    recompute: str = setting("none", "activation recomputation (as pre-training's): none | selective | full",
                             choices=("none", "selective", "full"))
    save_every: int = setting(200, "checkpoint every N steps (0: only at the end)")
    keep: int = setting(3, "checkpoints kept, the latest ones (0: all)")
    log_every: int = setting(1, "log every N steps")
    progress: bool = setting(True, "no progress bar")  # the flag is --no-progress
    plots: bool = setting(True, "no PNG plots (loss, expert load) at the end of the run")  # --no-plots
    resume: bool = setting(False, "continue from the run directory's latest checkpoint")

    def validate(self) -> None:
        check_common(self)
        if self.seq_len <= 1:
            raise ValueError(f"seq_len must be > 1, got {self.seq_len}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({mb})")
        if not self.steps and not (math.isfinite(self.epochs) and self.epochs > 0):  # (0 ran one step, silently)
            raise ValueError(f"epochs must be a finite number > 0 (or give --steps), got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.bf16_weights and self.precision != "auto":  # auto: checked once resolved (strategy.check_settings)
            check_weights(self, self.precision)


class SFT:
    """The SFT task of the training loop (dsv3/training/loop.py): packed chats and the assistant-token loss.

    data       every rank packs the same global sequence of rows (PackedChats, same seed) and takes rows
               [r·b, (r+1)·b) of each global micro-batch of micro_batch_size rows (b = micro / world)
    loss       CE summed over this rank's assistant targets x n·W / N, where N is the number of assistant
               targets of the whole optimizer step (all micro-batches, all ranks: one all-reduce before the
               backward), n the micro-batches and W the ranks: the strategy divides by n and averages over
               the W ranks, so the gradient is that of Σ CE / N, the mean over the step's assistant tokens
    schedule   linear warmup, then cosine lr -> min_lr; no MTP (with_mtp=False), no bias update
    """

    name = "sft"
    # "main" = "loss" (no MTP, no balance term): named as pre-training's, so the plots and summary read it
    stat_names = ("loss", "main")

    def __init__(self, cfg: SFTConfig, strategy, data: PackedChats, total_steps: int):
        self.cfg, self.strategy, self.data, self.total_steps = cfg, strategy, data, total_steps
        self.micro = cfg.micro_batch_size or cfg.batch_size
        self.n_micro = cfg.batch_size // self.micro
        self._n_targets = None  # the step's assistant targets over all ranks (device)

    def hyper(self, step: int) -> dict:
        c = self.cfg
        return {"lr": cosine_lr(step, self.total_steps, c.lr, c.min_lr, c.warmup_steps)}

    def micro_batches(self, step: int) -> list[dict]:
        s = self.strategy
        mbs = [{k: v.to(s.device, non_blocking=True) for k, v in
                self.data.next_batch(self.micro, s.data_rank, s.data_world).items()} for _ in range(self.n_micro)]
        n = torch.stack([(b["targets"] != IGNORE).sum() for b in mbs]).sum().to(torch.float64).reshape(1)
        self._n_targets = s.all_reduce_sum(n)
        scale = (len(mbs) * s.world_size / self._n_targets.clamp_min(1)).float()  # (1,)
        for b in mbs:
            b["scale"] = scale
        return mbs

    def model_inputs(self, mb: dict, hp: dict) -> dict:
        return {"input_ids": mb["input_ids"], "position_ids": mb["position_ids"], "attn_mask": mb["attn_mask"],
                "with_mtp": False}

    def loss(self, out, mb: dict, hp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss = (assistant_ce(out.logits, mb["targets"]) * mb["scale"]).squeeze(0)
        d = loss.detach().float()
        return loss, torch.stack([d, d])

    def after_step(self, strategy, counts, hp: dict, applied=None) -> None:
        pass  # the correction bias stays frozen: the loads of SFT data are not those of pre-training

    def tokens_per_step(self, step: int) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def log_fields(self, hp: dict) -> dict:
        return {"loss_tokens": int(self._n_targets.item()), "epoch": self.data.epoch}

    def evaluate(self, strategy, max_batches) -> dict | None:
        return None

    def eval_message(self, ev: dict) -> str:
        return ""

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.data.load_state_dict(sd)

    def summary(self) -> dict:
        return {"epoch": self.data.epoch}


def train_sft(checkpoint_dir: str, data_path: str, out_dir: str, cfg: SFTConfig, log=print, pcfg=None) -> dict:
    """Fine-tune the checkpoint (a checkpoint or run directory, either kind; its tokenizer is used) on the
    chats of `data_path`. One process, or every rank of a torchrun world (layout `pcfg`, a ParallelConfig;
    degrees left at 0 are derived from the world size). Writes out_dir/checkpoints/step_*,
    out_dir/metrics.jsonl, plots and out_dir/summary.json; returns the summary."""
    cfg.validate()
    strategy = make_strategy(pcfg, cfg.device)
    say = strategy.log(log)
    precision = resolve_precision(cfg.precision, strategy.device)
    ckpt_root, resume_from = run_directory(out_dir, cfg.resume, strategy, say)
    src = resume_from or resolve_start(checkpoint_dir)
    tok = DSTokenizer.load(src)
    convs = read_chats(data_path)
    ctx = checkpoint_config(src).max_position_embeddings
    if cfg.seq_len > ctx:  # (positions past the context, silently; --seq-len 100000 ran out of memory)
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's context (max_position_embeddings "
                         f"{ctx}): give --seq-len <= {ctx}")
    samples = []
    for i, m in enumerate(convs):
        try:
            samples.append(render_conversation(tok, m))
        except ValueError as e:  # (a late system message, ...): which conversation
            raise ValueError(f"{data_path}: conversation {i + 1}: {e}") from None
    # a conversation whose assistant tokens all lie beyond seq_len teaches nothing (truncation cuts them)
    mute = sum(1 for _, m in samples if not any(m[1:cfg.seq_len]))
    if mute == len(samples):
        raise ValueError(f"{data_path}: no conversation has an assistant token within its first {cfg.seq_len} "
                         "tokens (--seq-len): nothing to learn; raise --seq-len")
    if mute:
        say(f"warning: {mute} of {len(samples)} conversations have no assistant token within their first "
            f"{cfg.seq_len} tokens (--seq-len) and teach nothing")
    data = PackedChats(samples, cfg.seq_len, tok.pad_id, cfg.seed)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * data.rows_per_epoch() / cfg.batch_size))
    task = SFT(cfg, strategy, data, total)
    strategy.check_task(task)
    strategy.check_settings(cfg, precision)
    say(f"sft data: {len(convs)} conversations, {sum(sum(m) for _, m in samples):,} assistant tokens, "
        f"{data.rows_per_epoch()} rows of {cfg.seq_len} per epoch ({int(data._rows['n_truncated'])} truncated); "
        f"{total} steps")

    torch.manual_seed(cfg.seed)
    if resume_from is not None:  # every tensor comes from the checkpoint (strategy.load below)
        model = build_model(checkpoint_config(resume_from), device=strategy.device, dtype=torch.float32, seed=cfg.seed)
    else:
        model = load_start(src, strategy.device)
    mc = model.config
    strategy.check_model(mc, cfg)
    freeze_mtp(model)
    prepare_model(model, strategy, precision=precision, recompute=cfg.recompute, log=say)
    opt = strategy.make_optimizer(cfg.lr, cfg.weight_decay, bf16_weights=cfg.bf16_weights)
    step, tokens = 0, 0
    if resume_from is not None:
        st = strategy.load(resume_from, opt)
        was = st.get("sft_config") or {}
        for k in ("seq_len", "batch_size", "seed"):  # the data position (epoch, row) is a row of their packing
            if k in was and was[k] != getattr(cfg, k):
                raise ValueError(f"{resume_from} was written with --{k.replace('_', '-')} {was[k]}, not "
                                 f"{getattr(cfg, k)}: its data position is a row of that run's packing; resume with "
                                 "the run's value")
        task.load_state_dict(st["sampler"])
        step, tokens = st["step"], st["tokens"]
        say(f"resumed from {resume_from} at step {step} (written by {st.get('layout', {'world_size': 1})['world_size']}"
            " rank(s))")
    say(f"sft: {strategy.describe()} on {strategy.device.type} ({precision}"
        f"{', bf16 weights + fp32 masters' if cfg.bf16_weights else ''}); {total} steps of {cfg.batch_size} x "
        f"{cfg.seq_len} tokens, lr {cfg.lr:g} -> {cfg.min_lr:g}")
    make_run_directory(out_dir, strategy)  # only now: a run that failed before leaves no directory
    if strategy.is0:
        with open(os.path.join(out_dir, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump({"sft": asdict(cfg), "model": mc.to_dict(), "layout": strategy.layout(), "start": src}, f,
                      indent=1)

    def save(reason: str, step: int, tokens: int) -> str:
        return strategy.save(ckpt_root, step, opt, {"tokens": tokens, "sampler": task.state_dict(), "reason": reason,
                                                    "sft_config": asdict(cfg)},
                             tokenizer=tok, keep=cfg.keep, final=reason != "periodic")

    return loop.run(task, strategy, opt, out_dir=out_dir, step=step, tokens_seen=tokens,
                    autocast=precision_recipe(precision, strategy.device, cfg.bf16_weights), grad_clip=cfg.grad_clip,
                    save=save,
                    log_every=cfg.log_every, save_every=cfg.save_every, progress=cfg.progress, plots=cfg.plots, log=log)
