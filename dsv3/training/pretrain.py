"""Pre-training (`dsv3 train`): the task (data + loss + schedule) and the entry point for every layout.

    train(mc, tc, pcfg=None)     one process when pcfg is None (or all degrees 1 and no torchrun world);
                                 under torchrun every rank calls it with the same arguments

The task (`Pretrain`):
    data         the tokenizer (given, or a BPE of the model's vocab size trained on the corpus' train split,
                 cached) and the token cache, built by rank 0 first; a PackedSampler of windows of
                 seq_len + 1 tokens, this rank's rows of every global micro-batch (the pipeline reads
                 the whole global batch: its stages split it)
    loss         CE + λ/D·Σ MTP + α·Σ L_Bal (dsv3/training/loss.py); statistics (loss, main, mtp, balance)
    schedule     the paper's, scaled to the run (dsv3/training/optim.py): lr, MTP weight λ, bias speed γ,
                 optional batch-size ramp
    after_step   the aux-loss-free bias update from the step's global expert loads
    evaluate     validation loss and bits per byte (the final one over the whole validation split)

Exact resume: a checkpoint holds model, optimizer, sampler position, RNG states and step, so N steps in
one go and N/2 + resume + N/2 give identical losses on the CPU; a checkpoint of any layout resumes under
any other (names are the model's; dsv3/checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from dsv3.checkpoints import rundir
from dsv3.checkpoints.files import CheckpointError, check_creatable
from dsv3.config import ModelConfig
from dsv3.info import param_count, param_line
from dsv3.memory import ensure_fits
from dsv3.model import build_model
from dsv3.tokenizer import DSTokenizer, MissingSpecialTokenError, check_trainable_vocab
from dsv3.training import extend, loop
from dsv3.training.config import TrainConfig, deterministic_mode, resolve_device
from dsv3.training.data import (CorpusError, PackedSampler, build_token_cache, find_corpus, read_documents, split_of,
                                validation_overlap)
from dsv3.training.loss import compute_loss
from dsv3.training.optim import Schedule
from dsv3.training.strategy import (Strategy, checkpoint_config, precision_recipe, prepare_model,
                                    resolve_precision)


def get_tokenizer(tc: TrainConfig, mc: ModelConfig, log) -> DSTokenizer:
    """The given tokenizer, or a BPE of the model's vocab size trained on the corpus' train split
    (cached by corpus + vocab size, so a second run reuses it)."""
    if tc.tokenizer:
        tok = DSTokenizer.load(tc.tokenizer)
    else:
        corpus = find_corpus(tc.data)
        key = hashlib.sha256(json.dumps([mc.vocab_size, tc.val_permille, [[f.relpath, f.size, f.mtime_ns]
                                         for f in corpus.files]]).encode()).hexdigest()[:24]
        path = os.path.join(tc.cache_dir, "tokenizers", key, "tokenizer.json")
        if os.path.exists(path):
            tok = DSTokenizer.load(path)
        else:
            try:
                check_trainable_vocab(mc.vocab_size, corpus.n_bytes, corpus.description)
            except ValueError:  # a corpus this small reads at once: its own errors (a malformed .jsonl line, a
                for f in corpus.files:  # record without "text") come first, since fixing them is the first step
                    read_documents(f)
                raise
            log(f"training a {mc.vocab_size}-token BPE on {corpus.description} ...")
            t0 = time.time()

            seen = {"bytes": 0}

            def texts():
                for f in corpus.files:
                    for d in read_documents(f) or []:
                        if split_of(d.key, tc.val_permille) == "train":
                            seen["bytes"] += len(d.text)
                            yield d.text

            tok = DSTokenizer.train(texts(), mc.vocab_size)
            if seen["bytes"] == 0:  # nothing to learn from: no tokenizer is cached for it
                raise CorpusError(f"no training text in {corpus.description}: every file is empty, not UTF-8, or in "
                                  f"the held-out split (--val-permille {tc.val_permille})")
            # written beside, then renamed in, tokenizer.json last: a save cut short (a full disk, a kill) leaves no
            # half file for every later run to fail on, and a run started meanwhile reads whole files or none
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=directory)
            try:
                tok.save(tmp)
                for name in ("tokenizer_config.json", "tokenizer.json"):
                    os.replace(os.path.join(tmp, name), os.path.join(directory, name))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log(f"tokenizer trained in {time.time() - t0:.1f}s")
    if tok.id_limit > mc.vocab_size:  # ids index the embedding: the largest one counts, not how many there are
        ids = f" with ids up to {tok.id_limit - 1}" if tok.id_limit != tok.vocab_size else ""
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens{ids} but the model's vocab_size is {mc.vocab_size}")
    return tok


def check_context(mc: ModelConfig, tc: TrainConfig) -> None:
    """Refuse a sequence length beyond the model's context (its position embeddings stop there), or too short for
    the MTP depths (depth k predicts token t + 1 + k: a window of D tokens leaves the last depth no position)."""
    D = mc.num_nextn_predict_layers
    if tc.seq_len <= D:
        raise ValueError(f"--seq-len {tc.seq_len} leaves the model's {D} MTP depth(s) no position to predict: give "
                         f"--seq-len > {D}")
    if tc.seq_len > mc.max_position_embeddings:
        raise ValueError(f"--seq-len {tc.seq_len} is longer than the model's context (max_position_embeddings "
                         f"{mc.max_position_embeddings}): give --seq-len <= {mc.max_position_embeddings}, or extend "
                         "a trained model's context with --init-from CHECKPOINT --rope-factor S (README: context "
                         "extension)")


def check_memory(mc: ModelConfig, tc: TrainConfig, strategy: Strategy) -> None:
    """Refuse (dsv3.memory.InsufficientMemoryError, one line) a run whose training state cannot fit:
    one process holds fp32 weights + fp32 gradients + two AdamW moments per parameter, and at least the
    fp32 logits of one micro-batch with their gradients for the output head and each MTP depth (the
    largest activations of a small model; the rest are not counted, so this is a lower bound); under
    torchrun every rank first builds the whole fp32 model, then shards it (so that much at least), except
    the pipeline, whose ranks allocate their stages only (checked there, dsv3/distributed/pipeline.py)."""
    n = param_count(mc)
    if strategy.world_size == 1:
        per = 4 + 4 + 2 * (2 if tc.optim_state_dtype == "bf16" else 4)
        rows = (tc.micro_batch_size or tc.batch_size) * tc.seq_len
        logits = rows * mc.vocab_size * 4 * 2 * (1 + mc.num_nextn_predict_layers)
        ensure_fits(n * per + logits, strategy.device,
                    f"for fp32 weights + gradients + AdamW state ({n:,} parameters x {per} bytes) and the logits of "
                    f"one micro-batch with their gradients ({rows:,} tokens x {mc.vocab_size:,} x 4 bytes x 2 x "
                    f"{1 + mc.num_nextn_predict_layers} heads; lower --batch-size, --seq-len or set "
                    "--micro-batch-size)")
    elif not (getattr(strategy, "builds_on_meta", False) and tc.init_from is None):
        ensure_fits(n * 4, strategy.device, f"for its fp32 weights, built whole on every rank before sharding "
                                            f"({n:,} parameters)")


def run_length(tc: TrainConfig | dict) -> int:
    """Optimizer steps of a run: --steps, or ceil(--tokens / (batch x seq_len)) (a TrainConfig or its dict)."""
    d = asdict(tc) if isinstance(tc, TrainConfig) else tc
    return d["steps"] if d["tokens"] <= 0 else math.ceil(d["tokens"] / (d["batch_size"] * d["seq_len"]))


def schedule_of(tc: TrainConfig, total: int | None = None) -> Schedule:
    """The run's schedule over `total` steps (default: its length)."""
    total = run_length(tc) if total is None else total
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else min(2000, max(1, total // 20))
    return Schedule(total, tc.lr, warmup, tc.mtp_lambda, tc.mtp_lambda_late, tc.bias_gamma,
                    tc.batch_ramp_steps, tc.batch_start, kind=tc.schedule)


def resumed_schedule(tc: TrainConfig, state: dict, step: int, source: str = "trainer_state.json") -> Schedule:
    """The schedule of a run resumed at `step` from a checkpoint's trainer state. A new length (--steps /
    --tokens other than the run's) does not restart the schedule: the rest of it is stretched over the
    new remaining steps (dsv3/training/optim.py), so the learning rate continues without a jump. The
    schedule's first length and its stretches travel in the checkpoints ("schedule")."""
    saved = saved_schedule(tc, state, source)
    return saved.stretched(step, run_length(tc))


def saved_schedule(tc: TrainConfig, state: dict, source: str = "trainer_state.json") -> Schedule:
    """The schedule a checkpoint's run had (its first length and stretches; tc's other settings); `source`, the
    file `state` was read from, names it in the error for a malformed one."""
    saved = state.get("schedule")
    if saved is not None and not (
            isinstance(saved, dict) and type(saved.get("total_steps")) is int and saved["total_steps"] > 0
            and isinstance(saved.get("stretches"), list)
            and all(isinstance(x, list) and len(x) == 3 and all(type(v) is int for v in x)
                    for x in saved["stretches"])):
        raise CheckpointError(f"{source}: schedule {saved!r} is not {{\"total_steps\": N > 0, \"stretches\": "
                              "[[step, old length, new length], ...]}")
    if saved is not None:
        first, stretches = int(saved["total_steps"]), tuple(tuple(int(v) for v in x) for x in saved["stretches"])
    elif "train_config" in state:  # checkpoints written before "schedule" existed: the run never changed length
        first, stretches = run_length(state["train_config"]), ()
    else:
        return schedule_of(tc)
    return dataclasses.replace(schedule_of(tc, first), stretches=stretches)


class Pretrain:
    """The pre-training task of the loop (see the module docstring)."""

    name = "train"
    stat_names = ("loss", "main", "mtp", "balance")
    pipeline_loss = True  # its loss is the pipeline's (dsv3/distributed/pipeline.py computes it in the last stage)

    def __init__(self, tc: TrainConfig, mc: ModelConfig, strategy: Strategy, tok: DSTokenizer, cache, extra, log):
        self.tc, self.strategy = tc, strategy
        self.set_schedule(schedule_of(tc))
        self.micro = tc.micro_batch_size or tc.batch_size
        self.token_bytes = tok.token_byte_lengths()
        # the pipeline: every rank reads the whole global batch (its stages split it into micro-batches)
        rows, r, w = ((tc.batch_size, 0, 1) if strategy.reads_global_batch
                      else (self.micro, strategy.data_rank, strategy.data_world))
        if extra:
            stream = np.concatenate([cache.tokens("train")] + [e.tokens("train") for e in extra])
            prints = [c.fingerprint("train") for c in (cache, *extra)]
            self.sampler = PackedSampler(stream, tc.seq_len, rows, seed=tc.seed, rank=r, world_size=w,
                                         name="training streams",
                                         fingerprint=None if None in prints else "+".join(prints))
        else:
            self.sampler = cache.sampler(tc.seq_len, rows, seed=tc.seed, rank=r, world_size=w)
        self.val = None
        if cache.meta["splits"]["val"]["n_tokens"] > tc.seq_len:
            vr, vw = strategy.eval_rows()
            try:
                self.val = cache.val_batches(tc.seq_len, self.micro if not strategy.reads_global_batch
                                             else tc.batch_size, rank=vr, world_size=vw)
            except CorpusError as e:  # fewer val windows than one global micro-batch
                log(f"no periodic evaluation: {e}")

    def set_schedule(self, sched: Schedule) -> None:
        self.sched, self.total_steps = sched, sched.run_steps

    # --- the loop's interface -------------------------------------------------------------------
    def hyper(self, step: int) -> dict:
        s = self.sched
        return {"lr": s.lr(step), "mtp_lambda": s.mtp_weight(step), "gamma": s.gamma(step),
                "balance_alpha": self.tc.balance_alpha}

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        dev = self.strategy.device
        if self.strategy.reads_global_batch:
            return [next(self.sampler).to(dev, non_blocking=True)]
        return [next(self.sampler).to(dev, non_blocking=True) for _ in range(self._n_micro(step))]

    def _n_micro(self, step: int) -> int:
        """Micro-batches in step `step` (the batch-size ramp rounded down to whole micro-batches)."""
        return self.sched.batch_size(step, self.tc.batch_size) // self.micro

    def model_inputs(self, mb: torch.Tensor, hp: dict) -> dict:
        return {"input_ids": mb[:, :-1], "with_balance": hp["balance_alpha"] > 0}

    def loss(self, out, mb: torch.Tensor, hp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        parts = compute_loss(out, mb[:, 1:], hp["mtp_lambda"], hp["balance_alpha"], compiled=self.tc.compile)
        zero = parts.main.new_zeros(())
        mtp = torch.stack(parts.mtp_per_depth).mean() if parts.mtp_per_depth else zero
        bal = parts.balance if parts.balance is not None else zero
        return parts.total, torch.stack([parts.total, parts.main, mtp, bal]).detach().float()

    def after_step(self, strategy: Strategy, counts, hp: dict, applied: torch.Tensor | None = None) -> None:
        if counts is not None:
            strategy.update_bias(counts, hp["gamma"], applied)

    def tokens_per_step(self, step: int) -> int:
        if self.strategy.reads_global_batch:
            return self.tc.batch_size * self.tc.seq_len
        return self._n_micro(step) * self.micro * self.tc.seq_len

    def log_fields(self, hp: dict) -> dict:
        return {"mtp_lambda": hp["mtp_lambda"], "gamma": hp["gamma"]}

    def evaluate(self, strategy: Strategy, max_batches: int | None) -> dict | None:
        if self.val is None:
            return None
        autocast = precision_recipe(resolve_precision(self.tc.precision, strategy.device), strategy.device,
                                    self.tc.bf16_weights)
        return loop.evaluate(strategy, self.val, self.token_bytes, autocast, max_batches)

    def eval_message(self, ev: dict) -> str:
        tail = f" over {ev['val_tokens']:,} tokens" if ev.get("val_tokens") else ""
        return f"val loss {ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte{tail}"

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.sampler.load_state_dict(sd)

    def summary(self) -> dict:
        return {}


# --------------------------------------------------------------------------------------------------

def _load_data(tc: TrainConfig, mc: ModelConfig, tok_from: str | None, strategy: Strategy, say):
    """Tokenizer (`tok_from`'s: the checkpoint resumed or started from; else get_tokenizer) and token caches
    (training corpus + extra training data): rank 0 builds them, then the other ranks read them from the cache."""
    def data():
        tok = DSTokenizer.load(tok_from) if tok_from else get_tokenizer(tc, mc, say)
        show = tc.progress and strategy.is0
        main = find_corpus(tc.data)  # (each corpus walked once: the caches take the Corpus)
        cache = build_token_cache(main, tok, os.path.join(tc.cache_dir, "tokens"), val_permille=tc.val_permille,
                                  fim_rate=tc.fim_rate, fim_seed=tc.seed, progress=show)
        extra = []
        for src in tc.extra_data:
            corpus = find_corpus(src)
            bad = validation_overlap(main, corpus, tc.val_permille)
            if bad:  # (trained on, they made the validation loss meaningless, without a word)
                raise ValueError(f"--extra-data {src}: {len(bad)} of its files hold documents of --data's validation "
                                 f"split (e.g. {bad[0]}): give extra data outside --data, or --val-permille 0")
            e = build_token_cache(corpus, tok, os.path.join(tc.cache_dir, "tokens"), val_permille=0,
                                  fim_rate=tc.fim_rate, fim_seed=tc.seed, progress=show)
            say(f"extra training data: {e.meta['source']}: {e.meta['splits']['train']['n_tokens']:,} tokens")
            extra.append(e)
        return tok, cache, extra

    if strategy.is0:
        out = data()
    strategy.barrier()
    if not strategy.is0:
        out = data()
    tok, cache, extra = out
    meta = cache.meta["splits"]
    say(f"data: {cache.meta['source']}: train {meta['train']['n_tokens']:,} tokens ({meta['train']['n_docs']} docs), "
        f"val {meta['val']['n_tokens']:,} tokens; skipped {cache.meta['n_skipped']} non-UTF-8 files")
    if meta["val"]["n_tokens"] < tc.seq_len + 1:  # (it showed only as "val 0 tokens", and no val_loss in the summary)
        say(f"note: the validation split holds {meta['val']['n_tokens']:,} tokens, less than one window of "
            f"{tc.seq_len + 1}: this run reports no validation loss (raise --val-permille, or give more data)")
    return tok, cache, extra


def _restarted(say) -> bool:
    """A worker group restarted by torchrun --max-restarts resumes as --resume does: from the latest
    complete checkpoint of its run directory (a half-written one is never listed, dsv3/checkpoints)."""
    from dsv3.distributed.mesh import torchrun_restarts

    n = torchrun_restarts()
    if n:
        say(f"torchrun restart {n}: resuming from the run directory's latest complete checkpoint")
    return n > 0


def make_strategy(pcfg, device: str = "auto") -> Strategy:
    """The strategy of layout `pcfg` (dsv3.distributed.mesh.ParallelConfig, or None): the torchrun world's
    when there is one (degrees left at 0 derived from its size), else one process on `device`."""
    from dsv3.distributed.strategy import distributed_strategy

    dev = resolve_device(device)  # a clear error when CUDA is asked for and missing
    return distributed_strategy(pcfg, device) or Strategy(dev)


def train(mc: ModelConfig | None, tc: TrainConfig, pcfg=None, log=print, strategy: Strategy | None = None) -> dict:
    """Train (or resume) and return the summary. One process, or every rank of a torchrun world (layout
    `pcfg`). Writes checkpoints, metrics.jsonl, plots and summary.json to tc.out_dir.

    With tc.init_from the model config, weights and tokenizer come from that checkpoint (dsv3/training/
    extend.py, with the YaRN settings of tc.rope_factor / tc.rope_original_len); `mc` may then be None, or a
    config whose architecture must match the checkpoint's."""
    tc.validate()
    with deterministic_mode(tc.deterministic):
        return _train(mc, tc, pcfg, log, strategy)


def _finished_summary(out_dir: str, step: int, tokens: int, checkpoint: str) -> dict | None:
    """The summary of a run that finished (its summary.json as written then: not interrupted, at this step), pointing
    at its last checkpoint; None when there is no such summary (then the run is not known to be finished)."""
    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("interrupted") or saved.get("step") != step:
        return None
    return {**saved, "tokens": saved.get("tokens", tokens), "checkpoint": checkpoint}


def _train(mc: ModelConfig | None, tc: TrainConfig, pcfg, log, strategy: Strategy | None) -> dict:
    check_creatable(tc.out_dir, "--out")  # (a file there or above it: an OS error after the data and the model)
    check_creatable(tc.cache_dir, "--cache-dir")  # (after the BPE had been trained)
    strategy = strategy or make_strategy(pcfg, tc.device)
    say = strategy.log(log)
    precision = resolve_precision(tc.precision, strategy.device)
    strategy.check_settings(tc, precision)

    ckpt_root = os.path.join(tc.out_dir, "checkpoints")
    resume = tc.resume or _restarted(say)
    resume_from = rundir.latest_checkpoint(ckpt_root) if resume else None
    if tc.resume and resume_from is None and os.path.exists(os.path.join(tc.out_dir, "metrics.jsonl")):
        # nothing to continue, and starting over would append this run's records to that run's metrics
        raise ValueError(f"--resume: {tc.out_dir} holds metrics.jsonl of an earlier run but no checkpoint to continue "
                         "from (it ran with --no-checkpoints, or stopped before its first save): give another --out, "
                         "or remove that directory")
    if resume and resume_from is None:
        say(f"--resume: no checkpoint in {ckpt_root}; starting from scratch")
    if not resume and rundir.latest_checkpoint(ckpt_root):
        if tc.init_from:
            raise ValueError(f"{tc.out_dir} already holds checkpoints: --init-from starts a new run, give another "
                             "--out (to continue that run: --resume without --init-from)")
        raise ValueError(f"{tc.out_dir} already holds checkpoints: pass --resume to continue, or another --out")
    if not resume and os.path.exists(os.path.join(tc.out_dir, "metrics.jsonl")):
        # an earlier run that left no checkpoint (--no-checkpoints, or stopped before its first save): its
        # records would mix with this run's in metrics.jsonl (appended to) and the plots
        raise ValueError(f"{tc.out_dir} holds metrics.jsonl of an earlier run that left no checkpoint: give another "
                         "--out, or remove that directory")
    init_from = None
    if resume_from is not None:
        saved = checkpoint_config(resume_from)
        # torch_dtype is the stored weights' (fp32 masters), not the architecture: a preset's bf16 is no conflict
        arch = lambda c: {k: v for k, v in c.to_dict().items() if k != "torch_dtype"}  # noqa: E731
        if mc is not None and arch(saved) != arch(mc):
            diff = sorted(k for k in set(arch(saved)) | set(arch(mc)) if arch(saved).get(k) != arch(mc).get(k))
            say(f"note: resuming with the checkpoint's model config; the command line's preset/config differs in "
                f"{', '.join(diff)} and is ignored")
        mc = saved
    elif tc.init_from:  # (a torchrun restart of such a run resumes from its own checkpoints, above)
        init_from = extend.resolve(tc.init_from)
        mc = extend.init_model_config(init_from, tc, mc)
    elif mc is None:
        raise ValueError("no model config: give one (a preset or config.json), or init_from (--init-from)")
    strategy.check_model(mc, tc)
    check_context(mc, tc)
    check_memory(mc, tc, strategy)  # before the tokenizer, the data or the run directory are touched

    tok_from = resume_from or (extend.tokenizer_source(init_from, tc) if init_from else None)
    tok, cache, extra = _load_data(tc, mc, tok_from, strategy, say)
    # config.json names the tokenizer's BOS / EOS, the ids transformers' generate starts and stops at: 0 / 1 in
    # DeepSeek-V3's and dsv3's tokenizers, others in another file (DeepSeek-V2's are 100000 / 100001)
    try:
        bos = tok.bos_id
    except MissingSpecialTokenError:
        bos = None
    if (mc.bos_token_id, mc.eos_token_id) != (bos, tok.eos_id):
        mc = mc.replace(bos_token_id=bos, eos_token_id=tok.eos_id)
    task = Pretrain(tc, mc, strategy, tok, cache, extra, say)
    strategy.check_task(task)

    torch.manual_seed(tc.seed)
    # the same on every rank; a pipeline rank allocates and initialises only its own stages from the meta model
    # (the same values: the initialisation draws per tensor), except where --init-from must load the whole one
    meta = strategy.builds_on_meta and init_from is None
    model = build_model(mc, device="meta" if meta else strategy.device, dtype=torch.float32, seed=tc.seed)
    if init_from is not None:  # before preparation: every rank holds the whole model here
        n = extend.load_weights(model, init_from)
        held = ("MTP and correction biases included" if mc.num_nextn_predict_layers else
                "correction biases included; no MTP modules: the checkpoint holds none")
        say(f"initialised from {init_from}: its {n} tensors ({held}) and tokenizer; "
            f"{extend.describe_rope(checkpoint_config(init_from), mc)}; a new run in {tc.out_dir}: optimizer, step "
            "and data position start fresh")
    prepare_model(model, strategy, precision=precision, recompute=tc.recompute, fp8_experts=tc.fp8_experts,
                  fp8_recompute_weights=tc.fp8_recompute_weights, compile=tc.compile, log=say)
    state_dtype = torch.bfloat16 if tc.optim_state_dtype == "bf16" else torch.float32
    opt = strategy.make_optimizer(tc.lr, tc.weight_decay, state_dtype=state_dtype, bf16_weights=tc.bf16_weights)
    step, tokens_seen = 0, 0
    skip_counts = {"skipped_steps": 0, "consecutive_skipped_steps": 0}  # the loop's non-finite guard, run state
    if resume_from is not None:
        st = strategy.load(resume_from, opt)
        task.load_state_dict(st["sampler"])
        step, tokens_seen = st["step"], st["tokens"]
        skip_counts["skipped_steps"] = int(st.get("skipped_steps", 0))
        if st.get("reason") != "nonfinite":  # a run stopped for them and resumed is a new attempt (as after a fix)
            skip_counts["consecutive_skipped_steps"] = int(st.get("consecutive_skipped_steps", 0))
        lay = st.get("layout", {"world_size": 1})
        say(f"resumed from {resume_from} at step {step} (written by {lay['world_size']} rank(s))")
        skipped = rundir.incomplete_after(ckpt_root, resume_from)
        if skipped:
            say(f"note: skipped {', '.join(skipped)}, incomplete (a save that was interrupted); replaced when this "
                "run saves that step")
        source = os.path.join(resume_from, "trainer_state.json")
        before = saved_schedule(tc, st, source).run_steps
        task.set_schedule(resumed_schedule(tc, st, step, source))
        if task.total_steps != before:
            say(f"schedule: the run's length changes from {before} to {task.total_steps} steps at step {step}; the "
                f"learning rate continues from {task.sched.lr(step):.3g}, the rest of its schedule stretched over "
                "the new steps (to restart it at the peak, start a new run with --init-from)")
    say(f"parameters: {param_line(mc)}; {strategy.describe()} on {strategy.device.type} ({precision}"
        f"{', bf16 weights + fp32 masters' if tc.bf16_weights else ''}); "
        f"{task.total_steps} steps of {tc.batch_size} x {tc.seq_len} tokens, lr {tc.lr:g}, "
        f"warmup {task.sched.warmup_steps}")
    finished = _finished_summary(tc.out_dir, step, tokens_seen, resume_from) \
        if resume_from is not None and step >= task.total_steps and st.get("reason") == "final" else None
    if finished is not None:
        # a finished run resumed at its own length: nothing to train and nothing written (this used to run the final
        # evaluation again and rewrite summary.json without the training loss). One stopped at its last step (Ctrl-C,
        # a crash in the final evaluation) goes on: the loop saves and evaluates as a finished run does
        say(f"the run in {tc.out_dir} is finished (step {step} of {task.total_steps}): nothing to train; give "
            "--steps / --tokens beyond that to continue it")
        return finished
    # the run directory is made only now, once the data and the model are ready: a run that fails before
    # (bad data, an empty corpus, a config error) leaves no empty directory behind
    if strategy.is0:
        os.makedirs(tc.out_dir, exist_ok=True)
    strategy.barrier()
    if strategy.is0:
        with open(os.path.join(tc.out_dir, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump({"train": asdict(tc), "model": mc.to_dict(), "layout": strategy.layout(),
                       **({"init_from": init_from} if init_from else {})}, f, indent=1)

    def save(reason: str, step: int, tokens: int) -> str | None:
        if not tc.checkpoints:  # --no-checkpoints
            return None
        sched = {"total_steps": task.sched.total_steps, "stretches": [list(x) for x in task.sched.stretches]}
        return strategy.save(ckpt_root, step, opt, {"tokens": tokens, "sampler": task.state_dict(), "reason": reason,
                                                    "train_config": asdict(tc), "schedule": sched, **skip_counts},
                             tokenizer=tok, keep=tc.keep, final=reason != "periodic")

    return loop.run(task, strategy, opt, out_dir=tc.out_dir, step=step, tokens_seen=tokens_seen,
                    autocast=precision_recipe(precision, strategy.device, tc.bf16_weights), grad_clip=tc.grad_clip,
                    save=save, log_every=tc.log_every, eval_every=tc.eval_every if task.val is not None else 0,
                    eval_batches=tc.eval_batches, save_every=tc.save_every, max_skipped_steps=tc.max_skipped_steps,
                    progress=tc.progress, plots=tc.plots, saves=tc.checkpoints, skip_counts=skip_counts, log=log)


__all__ = ["Pretrain", "check_context", "check_memory", "get_tokenizer", "make_strategy", "schedule_of", "train"]
