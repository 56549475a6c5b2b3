"""Supervised fine-tuning on chat conversations (paper §5.1), with the pre-training machinery.

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
The MTP modules are not trained in SFT (`with_mtp=False`; their weights get no gradient and AdamW
leaves them unchanged), and the MoE correction bias is frozen (the loads of SFT data are not those
of pre-training).

Loss: next-token cross-entropy on targets whose token is an assistant token, averaged over all
assistant tokens of the optimizer step (micro-batches are summed, then divided by the step's count).
Schedule: linear warmup then cosine from `lr` to `min_lr` (the paper: 5e-6 -> 1e-6 over 2 epochs).
Checkpoints, resume and metrics.jsonl are those of pre-training (dsv3/training/checkpointing.py):
the checkpoint holds the model, AdamW state, RNG states and the data position (epoch, row), so a
resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dsv3.checkpoint import load_pretrained
from dsv3.training import checkpointing as ckpt
from dsv3.training.loop import Metrics, resolve_device
from dsv3.training.loss import IGNORE
from dsv3.training.data import jsonl_records
from dsv3.training.optim import clip_and_step, make_optimizer
from dsv3.training.tokenizer import DSTokenizer

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

    def _pack(self, epoch: int) -> dict[str, torch.Tensor]:
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return pack([self.samples[i] for i in order], self.seq_len, self.pad_id)

    def rows_per_epoch(self) -> int:
        return self._rows["input_ids"].shape[0]

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "targets", "doc_ids", "position_ids")
        take: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for _ in range(batch_size):
            if self.row >= self.rows_per_epoch():  # rows are gathered at once: a batch may span two epochs,
                self.epoch, self.row = self.epoch + 1, 0  # whose packings differ (even in their row count)
                self._rows = self._pack(self.epoch)
            for k in keys:
                take[k].append(self._rows[k][self.row])
            self.row += 1
        b = {k: torch.stack(v) for k, v in take.items()}
        b["attn_mask"] = block_causal_mask(b["doc_ids"])
        return b

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.row = s["epoch"], s["row"]
        self._rows = self._pack(self.epoch)


# --------------------------------------------------------------------------------------------------
# loss and schedule

def sft_loss(model, batch: Mapping[str, torch.Tensor], denom: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token CE summed over the assistant targets, divided by `denom` (default: their count, i.e.
    the mean over this batch's assistant tokens). batch: input_ids, targets, position_ids, attn_mask."""
    out = model(batch["input_ids"], batch["position_ids"], attn_mask=batch["attn_mask"], with_mtp=False)
    tgt = batch["targets"]
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum")
    if denom is None:
        denom = (tgt != IGNORE).sum().clamp_min(1)
    return ce / denom


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
    seq_len: int = 4096
    batch_size: int = 16  # packed rows per optimizer step
    micro_batch_size: int = 0  # rows per forward/backward; 0 = batch_size
    epochs: float = 2.0  # the paper's 2 epochs; used when steps == 0
    steps: int = 0  # > 0 overrides epochs
    lr: float = 5e-6  # the paper's cosine 5e-6 -> 1e-6
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 (CUDA autocast) | auto
    save_every: int = 200
    keep: int = 3
    log_every: int = 1
    resume: bool = False

    def validate(self) -> None:
        mb = self.micro_batch_size or self.batch_size
        if self.seq_len <= 1 or self.batch_size <= 0 or self.batch_size % mb:
            raise ValueError("need seq_len > 1, batch_size > 0 and batch_size a multiple of micro_batch_size")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got {self.min_lr}, {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def train_sft(checkpoint_dir: str, data_path: str, out_dir: str, cfg: SFTConfig, log=print) -> dict:
    """Fine-tune the checkpoint (a checkpoint or run directory; its tokenizer is used) on the chats of
    `data_path`; writes out_dir/checkpoints/step_*, out_dir/metrics.jsonl, out_dir/summary.json."""
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    os.makedirs(out_dir, exist_ok=True)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    resume_from = ckpt.latest_checkpoint(ckpt_root) if cfg.resume else None
    if not cfg.resume and resume_from is None and ckpt.latest_checkpoint(ckpt_root):
        raise ValueError(f"{out_dir} already holds checkpoints: pass resume=True to continue, or another out_dir")

    src = resume_from or ckpt.resolve_checkpoint(checkpoint_dir)
    tok = DSTokenizer.load(src)
    convs = read_chats(data_path)
    samples = [render_conversation(tok, m) for m in convs]
    data = PackedChats(samples, cfg.seq_len, tok.pad_id, cfg.seed)
    micro = cfg.micro_batch_size or cfg.batch_size
    total = cfg.steps or max(1, math.ceil(cfg.epochs * data.rows_per_epoch() / cfg.batch_size))
    n_trunc = int(data._rows["n_truncated"])
    log(f"sft data: {len(convs)} conversations, {sum(sum(m) for _, m in samples):,} assistant tokens, "
        f"{data.rows_per_epoch()} rows of {cfg.seq_len} per epoch ({n_trunc} truncated); {total} steps")

    torch.manual_seed(cfg.seed)
    model = load_pretrained(src, device=device, dtype=torch.float32)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    step, tokens = 0, 0
    if resume_from is not None:
        state, opt_t, rng_t = _read_state(resume_from)
        ckpt.load_optimizer(model, opt, opt_t, state["optimizer"])
        data.load_state_dict(state["sampler"])
        ckpt.set_rng_state(rng_t, state["rng"])
        step, tokens = state["step"], state["tokens"]
        log(f"resumed from {resume_from} at step {step}")
    model.train()
    metrics = Metrics(out_dir, use_tb=False)

    def save(reason: str) -> str:
        return ckpt.save_checkpoint(ckpt_root, step, model, opt, {"tokens": tokens, "sampler": data.state_dict(),
                                    "reason": reason, "sft_config": asdict(cfg)}, tokenizer=tok, keep=cfg.keep)

    last: dict = {}
    t_last, tok_since = time.perf_counter(), 0
    try:
        while step < total:
            lr = cosine_lr(step, total, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            batches = [data.next_batch(micro) for _ in range(cfg.batch_size // micro)]
            n_loss = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
            loss_sum = 0.0
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                with autocast():
                    loss = sft_loss(model, b, denom=max(n_loss, 1))
                loss.backward()
                loss_sum += float(loss.detach())
            gnorm = clip_and_step(opt, cfg.grad_clip)
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tok = cfg.batch_size * cfg.seq_len
            tokens, tok_since = tokens + n_tok, tok_since + n_tok
            if step % cfg.log_every == 0 or step in (1, total):
                now = time.perf_counter()
                last = {"step": step, "tokens": tokens, "lr": lr, "grad_norm": float(gnorm),
                        "tok_per_s": tok_since / max(now - t_last, 1e-9), "loss": loss_sum, "main": loss_sum,
                        "loss_tokens": n_loss, "epoch": data.epoch}
                t_last, tok_since = now, 0
                metrics.log(last)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and step < total:
                save("periodic")
        path = save("final")
    finally:
        metrics.close()
    summary = {"step": step, "total_steps": total, "tokens": tokens, "checkpoint": path, "train_loss": last.get("loss")}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def _read_state(path: str) -> tuple[dict, dict, dict]:
    """Trainer state, optimizer tensors and RNG tensors of a checkpoint (the model is loaded apart)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return state, load_file(os.path.join(path, "optimizer.safetensors")), load_file(os.path.join(path, "rng.safetensors"))
