"""Group Relative Policy Optimization (DeepSeekMath §4.1, used for DeepSeek-V3's RL stage, paper §5.2.2).

Per iteration (ppo_epochs optimizer steps of the training loop, dsv3/training/loop.py):
    sample P prompts; G completions each from the current policy (dsv3.inference.engine.Engine:
        batched, latent-KV-cached, seeded per completion, temperature ~1)
    rewards r (P, G) from a plain Python callable; advantages A = (r - mean_g r) / (std_g r + eps)
    log-probs of the completions under the sampling policy (old) and the frozen reference, no grad
    ppo_epochs optimizer steps on the whole batch (micro-batched gradient accumulation), minimising
        L = -1/N Σ_i 1/|o_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε) A_i) - β KL_it ]
        ρ_it = π_θ(o_it | q, o_<t) / π_old(o_it | ...),   KL_it = k3 = π_ref/π_θ - log(π_ref/π_θ) - 1
    log reward mean/std, KL, response length, clip fraction; greedy held-out accuracy every N iterations.

Decisions:
* std: the population std of the G rewards of a group (`unbiased=False`); a group whose rewards are
  all equal gets advantage 0 (no signal), whatever eps. eps = 1e-4.
* Averaging: token mean within each completion, then mean over the completions (the GRPO paper's
  1/G Σ_i 1/|o_i| Σ_t), over the whole P·G batch.
* KL: the k3 estimator, per token, evaluated on the sampled tokens; unbiased for KL(π_θ || π_ref) when
  the tokens come from π_θ, and always >= 0. With ppo_epochs > 1 the tokens come from π_old (as in the
  paper, no correction).
* Old log-probs are recomputed with the training forward (expanded MLA) instead of taken from the
  engine (absorbed MLA on the cache): the same function, but the ratio is then exactly 1 at the first
  step, with no numerical drift between the two attention forms. With ppo_epochs = 1 they are the
  step's own log-probs, detached (π_old = π_θ at that step), so that forward is skipped.
* Log-probs use logits / temperature (the distribution that was sampled) for policy, old and ref.
* A completion that ended with EOS gets the EOS token appended (the engine does not return it), so
  the policy learns to stop; one cut by max_new_tokens has no EOS.
* The MTP modules and the MoE correction bias are left untouched (frozen, no bias update).
* In one process (and with replicated weights) the Engine holds the policy module itself, not a copy:
  every generation after an optimizer step runs the updated weights (MLA's absorbed weights are
  re-derived from kv_b_proj at each call). Its paged KV cache is per request: blocks are allocated at
  admission, filled by that request's own prefill/decode and released when it finishes, so after
  `generate` returns no latent computed with old weights survives (checked: all blocks are free
  again). So nothing is rebuilt between iterations. Under FSDP2 the engine gets a plain copy
  gathered from the shards for each generation (Strategy.whole_model), freed afterwards. The
  reference model is a separate frozen copy loaded from the starting checkpoint (whole, on every rank).

The training loop runs it (`GRPO` is its task): one loop step is one optimizer step; the first step of
each iteration samples the rollouts. Checkpoints (and Ctrl-C stops) happen only between iterations, so
a resumed run samples the next iteration from the same policy and seeds and continues exactly.
Under torchrun (FSDP2 or replicated weights; not expert parallelism, whose experts the engine cannot
reach, nor the pipeline) the P prompts are split over the data-parallel ranks, each rank generating the
G completions of its P/W prompts (a group's advantages need its whole group) with the same per-completion
seeds as one process, and the loss is averaged over all P·G completions of all ranks.
Metrics per optimizer step: the loss, kl, clip_frac of that step, and the iteration's rollout statistics
(reward_mean, reward_std, accuracy, response_len, frac_groups_no_signal, gen_s); held-out greedy accuracy
(heldout_acc, heldout_reward, heldout_n) every eval_every iterations and at the end, split over the ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from dsv3.cliargs import setting
from dsv3.inference.engine import Engine, SamplingParams
from dsv3.posttrain.start import (freeze_mtp, load_start, make_run_directory, resolve_start,
                                  run_directory)
from dsv3.posttrain.tasks import Task
from dsv3.tokenizer import DSTokenizer
from dsv3.training import loop
from dsv3.training.config import check_common
from dsv3.training.pretrain import make_strategy
from dsv3.training.strategy import _masters, check_weights, precision_recipe, prepare_model, resolve_precision


# --------------------------------------------------------------------------------------------------
# the math

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> (P, G) float32: (r - group mean) / (group population std + eps), in float64; exactly 0 for
    a group whose rewards are all equal (the rounding of its mean, e.g. of eight 0.1s, is no signal, whatever eps)."""
    r = rewards.double()
    same = (r == r[..., :1]).all(-1, keepdim=True)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True, unbiased=False)
    adv = (r - mean) / torch.where(same, 1.0, std + eps)
    return torch.where(same, 0.0, adv).float()


def score(fn, completion: str, example: dict, what: str) -> float:
    """fn(completion, example) as a finite float; anything else (an exception, NaN, inf, None, a string, a list)
    is a ValueError naming the reward function and `what` (one NaN would otherwise poison its group's advantages
    and the whole step's loss, which the training loop then skips without a word)."""
    try:
        v = fn(completion, example)
    except Exception as e:  # (not KeyboardInterrupt)
        raise ValueError(f"the reward function raised {type(e).__name__} on {what}: {e}") from e
    try:
        x = float(v) if not isinstance(v, (str, bytes)) else None
    except (TypeError, ValueError):
        x = None
    if x is None or not math.isfinite(x):
        raise ValueError(f"the reward function returned {repr(v)[:80]} for {what}: expected a finite number")
    return x


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref) at tokens sampled from π: exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> tuple[torch.Tensor, dict]:
    """Per-token log-probs (B, L), advantages (B,), mask (B, L) (1 on completion tokens) -> (loss, stats).
    loss = -mean_i [ Σ_t m_it (min(ρ A, clip(ρ) A) - β k3)_it / Σ_t m_it ]. stats (detached): kl (token
    mean), clip_frac (tokens whose clipped term is active: ρ > 1+ε with A > 0 or ρ < 1-ε with A < 0)."""
    m = mask.float()
    A = advantages.float().unsqueeze(-1)  # (B, 1)
    ratio = torch.exp(logp_new - logp_old)
    surr = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    kl = kl_k3(logp_new, ref_logp)
    per_tok = surr - beta * kl  # (B, L)
    n = m.sum(-1).clamp_min(1)
    loss = -((per_tok * m).sum(-1) / n).mean()
    with torch.no_grad():
        clipped = ((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))
        tot = m.sum().clamp_min(1)
        stats = {"kl": (kl * m).sum() / tot, "clip_frac": (clipped.float() * m).sum() / tot}
    return loss, stats


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """logits (B, T, V) of ids (B, T) -> (B, T-1): log p(ids[:, t+1] | ids[:, :t+1]) of logits / temperature,
    zeroed where mask[:, t+1] == 0 when a (B, T) mask (1 = completion token) is given."""
    lg = logits[:, :-1].float() / temperature  # (B, T-1, V)
    tgt = ids[:, 1:]
    lp = lg.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lg.logsumexp(-1)  # (B, T-1)
    if mask is not None:
        lp = lp * mask[:, 1:].to(lp.dtype)
    return lp


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0,
                      attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """ids (B, T) -> (B, T-1): `token_logprobs` of `model`'s logits. Gradients flow if enabled: wrap in
    torch.no_grad() for the old / reference log-probs."""
    out = model(ids, position_ids, attn_mask=attn_mask, with_mtp=False)
    return token_logprobs(out.logits, ids, mask, temperature)


# --------------------------------------------------------------------------------------------------
# training

@dataclass
class GRPOConfig:
    """Each field is also a `dsv3 grpo` flag (dsv3/cliargs.py; prompts_per_iter is --prompts)."""
    iterations: int = setting(200, "sampling + optimisation rounds")
    prompts_per_iter: int = setting(16, "prompts per iteration (P)")
    group_size: int = setting(8, "completions per prompt (G; DeepSeekMath: 64)")
    # 256, what `dsv3 grpo` has always used (the library said 512): the built-in arithmetic task's answers
    # take a few tokens, and the sampling time and KV cache of P x G completions grow with this bound
    max_new_tokens: int = setting(256, "longest completion, in tokens (also for the held-out evaluation)")
    temperature: float = setting(1.0, "sampling temperature of the completions (> 0)")
    top_p: float = setting(1.0, "nucleus sampling of the completions (1: off)")
    ppo_epochs: int = setting(2, "optimizer steps per sampled batch (mu)")
    micro_batch_size: int = setting(8, "sequences per forward/backward")
    clip_eps: float = setting(0.2, "PPO ratio clip")
    beta: float = setting(0.04, "KL weight (DeepSeekMath)")
    adv_eps: float = setting(1e-4, "added to the group's reward std in the advantage")
    lr: float = setting(1e-6, "learning rate, constant (DeepSeekMath GRPO)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    eval_every: int = setting(10, "held-out greedy accuracy every N iterations (0: only at the end)")
    eval_max_examples: int = setting(200, "held-out examples per evaluation")
    save_every: int = setting(50, "checkpoint every N iterations (0: only at the end)")
    keep: int = setting(3, "checkpoints kept, the latest ones (0: all)")
    seed: int = setting(0, "random seed (prompt order, sampling)")
    device: str = setting("auto", "auto | cpu | cuda")
    # the loss's forward/backward under bf16 autocast on CUDA; generation in fp32
    precision: str = setting("auto", "fp32, or bf16 autocast for the loss; auto: bf16 on CUDA, else fp32",
                             choices=("auto", "fp32", "bf16"))
    recompute: str = setting("none", "activation recomputation in the loss's backward: none | selective | full",
                             choices=("none", "selective", "full"))
    # as pre-training's --bf16-weights (dsv3/training/optim.py AdamW(masters=...)); the rollouts sample from the
    # fp32 masters (the policy the optimizer holds), as without the flag
    bf16_weights: bool = setting(False, "with --precision bf16: store the GEMM weights in bf16 (no per-step casts, "
                                        "bf16 weight gradients) with fp32 masters in the optimizer; rollouts and "
                                        "held-out generation sample from the fp32 masters")
    progress: bool = setting(True, "no progress bar")  # the flag is --no-progress
    plots: bool = setting(True, "no PNG plots (loss, expert load) at the end of the run")  # --no-plots
    resume: bool = setting(False, "continue from the run directory's latest checkpoint")

    def validate(self) -> None:
        check_common(self)
        if not 0 < self.top_p <= 1:  # (NaN fails it)
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.eval_max_examples < 1:
            raise ValueError(f"eval_max_examples must be >= 1, got {self.eval_max_examples}")
        if min(self.iterations, self.prompts_per_iter, self.group_size, self.max_new_tokens, self.ppo_epochs,
               self.micro_batch_size) < 1:
            raise ValueError("iterations, prompts_per_iter, group_size, max_new_tokens, ppo_epochs and "
                             "micro_batch_size must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"GRPO samples: temperature must be a finite number > 0, got {self.temperature}")
        if not (self.clip_eps > 0 and self.beta >= 0 and self.adv_eps >= 0) or not all(
                map(math.isfinite, (self.clip_eps, self.beta, self.adv_eps))):
            raise ValueError(f"need clip_eps > 0, beta >= 0 and adv_eps >= 0 (finite), got {self.clip_eps}, "
                             f"{self.beta}, {self.adv_eps}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative to the group)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"GRPO precision must be auto, fp32 or bf16, got {self.precision!r} (fp8 training "
                             "modules would also be the engine's: generation is not FP8-checked)")
        if self.bf16_weights and self.precision != "auto":  # auto: checked once resolved (train_grpo)
            check_weights(self, self.precision)


def _prompt_ids(tok: DSTokenizer, ex: dict) -> list[int]:
    return tok.encode(tok.apply_chat_template(ex["messages"], add_generation_prompt=True))


def _generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    outs = engine.generate(prompts, params)
    assert engine.cache.free_blocks == engine.cache.num_blocks, "KV cache blocks leaked across iterations"
    return outs


@torch.no_grad()
def heldout_sums(engine: Engine, tok: DSTokenizer, task: Task, examples: list[dict], max_new_tokens: int) -> tuple[int, float]:
    """(correct answers, summed reward) of greedy completions of `examples`."""
    if not examples:
        return 0, 0.0
    outs = _generate(engine, [_prompt_ids(tok, e) for e in examples],
                     [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)] * len(examples))
    return (sum(bool(task.correct(o.text, e)) for o, e in zip(outs, examples)),
            sum(score(task.reward, o.text, e, f"held-out example {i}")
                for i, (o, e) in enumerate(zip(outs, examples))))


@torch.no_grad()
def evaluate_task(engine: Engine, tok: DSTokenizer, task: Task, max_new_tokens: int, limit: int) -> dict:
    """Greedy accuracy and mean reward on the held-out set (one process)."""
    exs = task.heldout[:limit]
    if not exs:
        return {}
    correct, reward = heldout_sums(engine, tok, task, exs, max_new_tokens)
    return {"heldout_acc": correct / len(exs), "heldout_reward": reward / len(exs), "heldout_n": len(exs)}


_FLAG = {"seed": "--seed", "prompts_per_iter": "--prompts", "group_size": "--group-size"}  # dsv3 grpo's flags


class GRPO:
    """The GRPO task of the training loop: rollouts from the Engine, group advantages, the clipped
    surrogate with the k3 KL (see the module docstring). Loop step s is optimizer step s % ppo_epochs of
    iteration s // ppo_epochs; its micro-batches are this rank's completions, whose loss is scaled by
    len(mb)·n·W / (P·G) (n micro-batches on each of W ranks; the strategy divides by n and averages over
    the ranks), so the gradient is that of the mean over all P·G completions."""

    name = "grpo"
    stat_names = ("loss", "kl", "clip_frac")

    def __init__(self, cfg: GRPOConfig, task: Task, tok: DSTokenizer, strategy, ref, autocast, say):
        P, G, W = cfg.prompts_per_iter, cfg.group_size, strategy.data_world
        if P % W:
            raise ValueError(f"prompts_per_iter ({P}) must be a multiple of the data-parallel ranks ({W}): each "
                             "rank samples the G completions of its P / W prompts (advantages need whole groups)")
        self.cfg, self.task, self.tok, self.strategy, self.ref = cfg, task, tok, strategy, ref
        self.autocast, self.say = autocast, say
        self.total_steps = cfg.iterations * cfg.ppo_epochs
        self.p_lo, self.p_hi = strategy.data_rank * P // W, (strategy.data_rank + 1) * P // W  # this rank's prompts
        max_prompt = max(len(_prompt_ids(tok, e)) for e in task.train + task.heldout[:cfg.eval_max_examples])
        self.per_seq = max_prompt + cfg.max_new_tokens + 1
        self._engine = None  # over the policy module itself, when the layout keeps it whole on this rank
        self._mbs: list[dict] = []
        self._roll: dict = {}  # the current iteration's rollout statistics (global)
        self.opt = None  # the optimizer (train_grpo sets it): its fp32 masters are what the rollouts sample from
        self._iterations = 0  # iterations whose rollouts were sampled
        # what picks iteration it's prompts and seeds (`_rollout`): the task's training examples, the seed, P and G.
        # A resume on other ones would go on with other prompts than the run's, silently
        h = hashlib.blake2b(json.dumps(task.train, sort_keys=True, default=str).encode(), digest_size=16)
        self.fingerprint = h.hexdigest()
        self.sampling = {"seed": cfg.seed, "prompts_per_iter": P, "group_size": G}

    # --- generation -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _engine_over_policy(self):
        """An Engine over the current policy weights (collective under FSDP2: Strategy.whole_model)."""
        n = (self.p_hi - self.p_lo) * self.cfg.group_size
        # --bf16-weights: the engine samples from the fp32 masters (swapped into the parameters meanwhile; the
        # same tensors at every rollout, so a captured decode graph stays valid), not from their bf16 copies
        with _masters(self.opt) if self.opt is not None else contextlib.nullcontext(), \
                self.strategy.whole_model() as model:
            was = model.training
            if model is self.strategy.module():  # the policy itself: one engine for the whole run
                if self._engine is None:
                    self._engine = Engine(model, self.tok, max_batch_size=n, cache_tokens=n * (self.per_seq + 16),
                                          max_model_len=self.per_seq)
                engine = self._engine
            else:
                engine = Engine(model, self.tok, max_batch_size=n, cache_tokens=n * (self.per_seq + 16),
                                max_model_len=self.per_seq)
            model.eval()
            try:
                yield engine
            finally:
                model.train(was)
                del engine

    @torch.no_grad()
    def _rollout(self, it: int) -> None:
        """Sample iteration `it` (this rank's prompts), score it, and make the micro-batches of its steps."""
        cfg, s, tok = self.cfg, self.strategy, self.tok
        P, G, dev = cfg.prompts_per_iter, cfg.group_size, s.device
        t0 = time.perf_counter()
        rng = random.Random(f"{cfg.seed}/{it}")
        exs = rng.sample(self.task.train, P) if len(self.task.train) >= P else rng.choices(self.task.train, k=P)
        mine = exs[self.p_lo:self.p_hi]
        prompts = [_prompt_ids(tok, e) for e in mine]
        # completion j of the global P·G has the seed it has in one process, whichever rank samples it
        params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=(cfg.seed * 1_000_003 + it * P * G + j) % 2**63)
                  for j in range(self.p_lo * G, self.p_hi * G)]
        with self._engine_over_policy() as engine:
            outs = _generate(engine, [p for p in prompts for _ in range(G)], params)
        t_gen = time.perf_counter() - t0

        eos, pad = tok.eos_id, tok.pad_id
        comps = [o.token_ids + ([eos] if o.finish_reason == "stop" else []) for o in outs]
        Pl = len(mine)
        rewards = torch.tensor([score(self.task.reward, o.text, mine[j // G], f"completion {j % G} of prompt "
                                      f"{self.p_lo + j // G} in iteration {it + 1}") for j, o in enumerate(outs)],
                               dtype=torch.float64).view(Pl, G)
        correct = torch.tensor([float(bool(self.task.correct(o.text, mine[j // G]))) for j, o in enumerate(outs)])
        adv = group_advantages(rewards, cfg.adv_eps).flatten().to(dev)  # (Pl·G,)
        # every rank's rewards, correctness and lengths in their global places (exact: the others add zeros)
        glob = torch.zeros(4, P, G, dtype=torch.float64, device=dev)
        glob[0, self.p_lo:self.p_hi] = rewards.to(dev)
        glob[1, self.p_lo:self.p_hi] = correct.view(Pl, G).double().to(dev)
        glob[2, self.p_lo:self.p_hi] = torch.tensor([float(len(o.token_ids)) for o in outs],
                                                    dtype=torch.float64).view(Pl, G).to(dev)
        glob[3, self.p_lo:self.p_hi] = torch.tensor([float(len(c)) for c in comps],  # the loss's tokens (+ EOS)
                                                    dtype=torch.float64).view(Pl, G).to(dev)
        glob = s.all_reduce_sum(glob).cpu()
        loss_tokens = float(glob[3].sum())
        r_all = glob[0].float()
        self._roll = {"iteration": it + 1, "reward_mean": float(r_all.mean()),
                      "reward_std": float(r_all.std(unbiased=False)), "accuracy": float(glob[1].mean()),
                      "response_len": float(glob[2].mean()),
                      "frac_groups_no_signal": float((glob[0] == glob[0][:, :1]).all(-1).float().mean()),
                      "gen_s": t_gen,
                      "gen_tokens": int(glob[2].sum())}
        self.say(f"iter {it + 1}: reward {self._roll['reward_mean']:.3f}±{self._roll['reward_std']:.3f} "
                 f"acc {self._roll['accuracy']:.3f} len {self._roll['response_len']:.1f} ({t_gen:.1f}s generating)")

        N = Pl * G
        seqs = [prompts[j // G] + c for j, c in enumerate(comps)]
        lens = torch.tensor([len(q) for q in seqs])
        ids = torch.full((N, int(lens.max())), pad, dtype=torch.long)
        cmask = torch.zeros(N, ids.shape[1])
        for j, q in enumerate(seqs):
            ids[j, :len(q)] = torch.tensor(q)
            cmask[j, len(prompts[j // G]):len(q)] = 1.0
        ids, cmask = ids.to(dev), cmask.to(dev)
        rows = [list(range(i, min(i + cfg.micro_batch_size, N))) for i in range(0, N, cfg.micro_batch_size)]
        policy = s.module()
        self._mbs = []
        for mb in rows:  # trimmed to the micro-batch's longest sequence
            L = int(lens[mb].max())
            x, m = ids[mb, :L], cmask[mb, :L]
            with self.autocast():
                # with one optimizer step per batch, π_old is the policy of that step: its log-probs are
                # the step's own, detached (ratio exactly 1), and need no forward of their own
                old = sequence_logprobs(policy, x, m, cfg.temperature) if cfg.ppo_epochs > 1 else None
                ref = sequence_logprobs(self.ref, x, m, cfg.temperature)
            self._mbs.append({"ids": x, "mask": m, "adv": adv[mb], "old": old, "ref": ref,
                              "scale": len(mb) * len(rows) * s.world_size / (P * G),
                              # kl and clip_frac: token means over the step, not means of micro-batch means
                              "tok_scale": sum(len(comps[j]) for j in mb) * len(rows) * s.world_size
                              / max(loss_tokens, 1.0)})
        self._iterations = it + 1

    # --- the loop's interface ---------------------------------------------------------------------
    def boundary(self, step: int) -> bool:
        return step % self.cfg.ppo_epochs == 0

    def hyper(self, step: int) -> dict:
        return {"lr": self.cfg.lr}

    def micro_batches(self, step: int) -> list[dict]:
        if step % self.cfg.ppo_epochs == 0:
            self._rollout(step // self.cfg.ppo_epochs)
        return self._mbs

    def model_inputs(self, mb: dict, hp: dict) -> dict:
        return {"input_ids": mb["ids"], "with_mtp": False}

    def loss(self, out, mb: dict, hp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        lp = token_logprobs(out.logits, mb["ids"], mb["mask"], cfg.temperature)
        old = mb["old"] if mb["old"] is not None else lp.detach()
        loss, st = grpo_loss(lp, old, mb["ref"], mb["adv"], mb["mask"][:, 1:], cfg.clip_eps, cfg.beta)
        k, kt = mb["scale"], mb["tok_scale"]
        return loss * k, torch.stack([loss.detach() * k, st["kl"] * kt, st["clip_frac"] * kt]).float()

    def after_step(self, strategy, counts, hp: dict, applied=None) -> None:
        pass  # the correction bias stays frozen

    def tokens_per_step(self, step: int) -> int:
        """Completion tokens generated (all ranks): counted at the iteration's first step."""
        return self._roll["gen_tokens"] if step % self.cfg.ppo_epochs == 0 else 0

    def log_fields(self, hp: dict) -> dict:
        return {k: v for k, v in self._roll.items() if k != "gen_tokens"}

    @torch.no_grad()
    def evaluate(self, strategy, max_batches) -> dict | None:
        """Held-out greedy accuracy over the first eval_max_examples problems, split over the ranks."""
        exs = self.task.heldout[:self.cfg.eval_max_examples]
        if not exs:
            return None
        r, w = strategy.data_rank, strategy.data_world
        with self._engine_over_policy() as engine:
            correct, reward = heldout_sums(engine, self.tok, self.task, exs[r * len(exs) // w:(r + 1) * len(exs) // w],
                                           self.cfg.max_new_tokens)
        c, rew = strategy.all_reduce_sum(torch.tensor([correct, reward], dtype=torch.float64,
                                                      device=strategy.device)).tolist()
        return {"heldout_acc": c / len(exs), "heldout_reward": rew / len(exs), "heldout_n": len(exs)}

    def eval_message(self, ev: dict) -> str:
        return f"held-out greedy accuracy {ev['heldout_acc']:.3f} over {ev['heldout_n']} problems"

    def state_dict(self) -> dict:
        return {"iterations": self._iterations, "fingerprint": self.fingerprint, "sampling": dict(self.sampling)}

    def load_state_dict(self, sd: dict) -> None:
        it = sd.get("iterations")  # a checkpoint's, untrusted
        if type(it) is not int or it < 0:
            raise ValueError(f"cannot resume: the saved iteration count is {it!r}, not an integer >= 0")
        # (checkpoints written before these were saved hold neither)
        if sd.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ValueError(f"cannot resume: task {self.task.name!r} has other training examples than the run's "
                             "(its file changed, or another task): iteration i samples the run's examples; give the "
                             "run's --task, or start a new run with --out")
        sampling = sd.get("sampling", {})
        if not isinstance(sampling, dict):
            raise ValueError(f"cannot resume: the saved sampling settings are {sampling!r}, not an object")
        for k, v in sampling.items():
            if self.sampling.get(k, v) != v:
                raise ValueError(f"cannot resume: the run sampled with {k} = {v!r}, this one asks {self.sampling[k]!r}"
                                 f"; resume with the run's {_FLAG[k]} (or start a new run with --out)")
        self._iterations = it

    def summary(self) -> dict:
        return {"iterations": self._iterations, **self.log_fields({})}


def train_grpo(checkpoint_dir: str, task: Task, out_dir: str, cfg: GRPOConfig, log=print, pcfg=None) -> dict:
    """GRPO from a checkpoint (a checkpoint or run directory, either kind; its tokenizer is used) on `task`.
    One process, or every rank of a torchrun world (layout `pcfg`, a ParallelConfig; degrees left at 0 are
    derived from the world size). Writes out_dir/checkpoints/step_* (step = optimizer step =
    iteration x ppo_epochs), out_dir/metrics.jsonl, plots and out_dir/summary.json; returns the summary."""
    cfg.validate()
    strategy = make_strategy(pcfg, cfg.device)
    say = strategy.log(log)
    precision = resolve_precision(cfg.precision, strategy.device)
    check_weights(cfg, precision)
    ckpt_root, resume_from = run_directory(out_dir, cfg.resume, strategy, say)
    src = resolve_start(checkpoint_dir)
    tok = DSTokenizer.load(src)
    autocast = precision_recipe(precision, strategy.device, cfg.bf16_weights)

    torch.manual_seed(cfg.seed)
    ref = load_start(src, strategy.device).eval().requires_grad_(False)  # frozen, whole on every rank
    grpo = GRPO(cfg, task, tok, strategy, ref, autocast, say)
    strategy.check_task(grpo)
    strategy.check_generation()
    strategy.check_model(ref.config, cfg)
    policy = load_start(src, strategy.device)
    freeze_mtp(policy)
    prepare_model(policy, strategy, precision=precision, recompute=cfg.recompute, log=say)
    opt = strategy.make_optimizer(cfg.lr, cfg.weight_decay, bf16_weights=cfg.bf16_weights)
    grpo.opt = opt
    step = tokens = 0
    if resume_from is not None:
        st = strategy.load(resume_from, opt)
        step, tokens = st["step"], st["tokens"]
        grpo.load_state_dict(st["sampler"])
        if step != grpo._iterations * cfg.ppo_epochs:
            raise ValueError(f"{resume_from} was written after {grpo._iterations} iterations at optimizer step {step}: "
                             f"not {cfg.ppo_epochs} steps per iteration (resume with the run's ppo_epochs)")
        say(f"resumed from {resume_from} at iteration {grpo._iterations} (written by "
            f"{st.get('layout', {'world_size': 1})['world_size']} rank(s))")
    say(f"grpo: {task.name}, {len(task.train)} train / {len(task.heldout)} held-out prompts; "
        f"P={cfg.prompts_per_iter} x G={cfg.group_size}, {cfg.ppo_epochs} steps per batch, {cfg.iterations} "
        f"iterations; {strategy.describe()} on {strategy.device.type} ({precision}"
        f"{', bf16 weights + fp32 masters' if cfg.bf16_weights else ''})")
    make_run_directory(out_dir, strategy)  # only now: a run that failed before leaves no directory
    if strategy.is0:
        with open(os.path.join(out_dir, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump({"grpo": asdict(cfg), "task": task.name, "model": policy.config.to_dict(),
                       "layout": strategy.layout(), "start": src}, f, indent=1)

    def save(reason: str, step: int, tokens: int) -> str:
        return strategy.save(ckpt_root, step, opt, {"tokens": tokens, "sampler": grpo.state_dict(), "reason": reason,
                                                    "task": task.name, "grpo_config": asdict(cfg)},
                             tokenizer=tok, keep=cfg.keep, final=reason != "periodic")

    per_it = cfg.ppo_epochs  # the loop counts optimizer steps
    return loop.run(grpo, strategy, opt, out_dir=out_dir, step=step, tokens_seen=tokens, autocast=autocast,
                    grad_clip=cfg.grad_clip, save=save, eval_every=cfg.eval_every * per_it,
                    save_every=cfg.save_every * per_it, progress=cfg.progress, plots=cfg.plots, log=log)
