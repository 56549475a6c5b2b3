"""Group Relative Policy Optimization (DeepSeekMath §4.1, used for DeepSeek-V3's RL stage, paper §5.2.2).

Per iteration:
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
* The MTP modules and the MoE correction bias are left untouched (no gradient, no bias update).
* The Engine holds the policy module itself, not a copy: every generation after an optimizer step
  runs the updated weights (MLA's absorbed weights are re-derived from kv_b_proj at each call).
  Its paged KV cache is per request: blocks are allocated at admission, filled by that request's
  own prefill/decode and released when it finishes, so after `generate` returns no latent computed
  with old weights survives (checked: all blocks are free again). So nothing is rebuilt between
  iterations. The reference model is a separate frozen copy loaded from the starting checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from dsv3.checkpoint import load_pretrained
from dsv3.inference.engine import Engine, SamplingParams
from dsv3.posttrain.tasks import Task
from dsv3.training import checkpointing as ckpt
from dsv3.training.loop import Metrics, resolve_device
from dsv3.training.optim import clip_and_step, make_optimizer
from dsv3.training.tokenizer import DSTokenizer


# --------------------------------------------------------------------------------------------------
# the math

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> (P, G): (r - group mean) / (group population std + eps)."""
    r = rewards.float()
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True, unbiased=False)
    return (r - mean) / (std + eps)


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


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0,
                      attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """ids (B, T) -> (B, T-1): log p(ids[:, t+1] | ids[:, :t+1]) under `model` (logits / temperature),
    zeroed where mask[:, t+1] == 0 when a (B, T) mask (1 = completion token) is given. Gradients flow
    if enabled: wrap in torch.no_grad() for the old / reference log-probs."""
    out = model(ids, position_ids, attn_mask=attn_mask, with_mtp=False)
    logits = out.logits[:, :-1].float() / temperature  # (B, T-1, V)
    tgt = ids[:, 1:]
    lp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B, T-1)
    if mask is not None:
        lp = lp * mask[:, 1:].to(lp.dtype)
    return lp


# --------------------------------------------------------------------------------------------------
# training

@dataclass
class GRPOConfig:
    iterations: int = 200
    prompts_per_iter: int = 16  # P
    group_size: int = 8  # G (DeepSeekMath: 64)
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    ppo_epochs: int = 2  # optimizer steps per sampled batch (μ)
    micro_batch_size: int = 8  # sequences per forward/backward
    clip_eps: float = 0.2
    beta: float = 0.04  # KL coefficient (DeepSeekMath)
    adv_eps: float = 1e-4
    lr: float = 1e-6  # constant (DeepSeekMath GRPO)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 10  # held-out greedy accuracy every N iterations (and at the end); 0: only at the end
    eval_max_examples: int = 200
    save_every: int = 50
    keep: int = 3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # forward/backward of the loss under bf16 autocast on CUDA; generation in fp32
    resume: bool = False

    def validate(self) -> None:
        if min(self.iterations, self.prompts_per_iter, self.group_size, self.max_new_tokens, self.ppo_epochs,
               self.micro_batch_size) < 1:
            raise ValueError("iterations, prompts_per_iter, group_size, max_new_tokens, ppo_epochs and "
                             "micro_batch_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError("GRPO samples: temperature must be > 0")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative to the group)")


def _prompt_ids(tok: DSTokenizer, ex: dict) -> list[int]:
    return tok.encode(tok.apply_chat_template(ex["messages"], add_generation_prompt=True))


def _generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    outs = engine.generate(prompts, params)
    assert engine.cache.free_blocks == engine.cache.num_blocks, "KV cache blocks leaked across iterations"
    return outs


@torch.no_grad()
def evaluate_task(engine: Engine, tok: DSTokenizer, task: Task, max_new_tokens: int, limit: int) -> dict:
    """Greedy accuracy and mean reward on the held-out set."""
    exs = task.heldout[:limit]
    if not exs:
        return {}
    outs = _generate(engine, [_prompt_ids(tok, e) for e in exs],
                     [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)] * len(exs))
    acc = sum(bool(task.correct(o.text, e)) for o, e in zip(outs, exs)) / len(exs)
    rew = sum(float(task.reward(o.text, e)) for o, e in zip(outs, exs)) / len(exs)
    return {"heldout_acc": acc, "heldout_reward": rew, "heldout_n": len(exs)}


def train_grpo(checkpoint_dir: str, task: Task, out_dir: str, cfg: GRPOConfig, log=print) -> dict:
    """GRPO from a checkpoint (or run directory; its tokenizer is used) on `task`. Writes
    out_dir/checkpoints/step_* (step = iteration), out_dir/metrics.jsonl and out_dir/summary.json."""
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    P, G = cfg.prompts_per_iter, cfg.group_size
    os.makedirs(out_dir, exist_ok=True)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    resume_from = ckpt.latest_checkpoint(ckpt_root) if cfg.resume else None
    if not cfg.resume and ckpt.latest_checkpoint(ckpt_root):
        raise ValueError(f"{out_dir} already holds checkpoints: pass resume=True to continue, or another out_dir")

    src = ckpt.resolve_checkpoint(checkpoint_dir)
    tok = DSTokenizer.load(src)
    eos, pad = tok.eos_id, tok.pad_id
    policy = load_pretrained(resume_from or src, device=device, dtype=torch.float32)
    ref = load_pretrained(src, device=device, dtype=torch.float32).eval().requires_grad_(False)
    opt = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    it = 0
    if resume_from is not None:
        from dsv3.posttrain.sft import _read_state

        state, opt_t, rng_t = _read_state(resume_from)
        ckpt.load_optimizer(policy, opt, opt_t, state["optimizer"])
        ckpt.set_rng_state(rng_t, state["rng"])
        it = state["step"]
        log(f"resumed from {resume_from} at iteration {it}")

    max_prompt = max(len(_prompt_ids(tok, e)) for e in task.train + task.heldout[:cfg.eval_max_examples])
    per_seq = max_prompt + cfg.max_new_tokens + 1
    engine = Engine(policy, tok, max_batch_size=P * G, cache_tokens=P * G * (per_seq + 16), max_model_len=per_seq)
    metrics = Metrics(out_dir, use_tb=False)
    log(f"grpo: {task.name}, {len(task.train)} train / {len(task.heldout)} held-out prompts; P={P} x G={G}, "
        f"{cfg.ppo_epochs} steps per batch, {cfg.iterations} iterations")

    def save(reason: str) -> str:
        return ckpt.save_checkpoint(ckpt_root, it, policy, opt, {"tokens": 0, "reason": reason, "task": task.name,
                                    "grpo_config": asdict(cfg)}, tokenizer=tok, keep=cfg.keep)

    last: dict = {}
    path = None
    try:
        while it < cfg.iterations:
            t0 = time.perf_counter()
            rng = random.Random(f"{cfg.seed}/{it}")
            exs = rng.sample(task.train, P) if len(task.train) >= P else rng.choices(task.train, k=P)
            prompts = [_prompt_ids(tok, e) for e in exs]
            params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                     seed=(cfg.seed * 1_000_003 + it * P * G + j) % 2**63) for j in range(P * G)]
            policy.eval()
            outs = _generate(engine, [p for p in prompts for _ in range(G)], params)
            t_gen = time.perf_counter() - t0

            comps = [o.token_ids + ([eos] if o.finish_reason == "stop" else []) for o in outs]
            rewards = torch.tensor([float(task.reward(o.text, exs[j // G])) for j, o in enumerate(outs)]).view(P, G)
            correct = [bool(task.correct(o.text, exs[j // G])) for j, o in enumerate(outs)]
            adv = group_advantages(rewards, cfg.adv_eps).flatten().to(device)  # (P*G,)

            N = P * G
            seqs = [prompts[j // G] + c for j, c in enumerate(comps)]
            lens = torch.tensor([len(s) for s in seqs])
            ids = torch.full((N, int(lens.max())), pad, dtype=torch.long)
            cmask = torch.zeros(N, ids.shape[1])
            for j, s in enumerate(seqs):
                ids[j, :len(s)] = torch.tensor(s)
                cmask[j, len(prompts[j // G]):len(s)] = 1.0
            ids, cmask = ids.to(device), cmask.to(device)
            mbs = [list(range(i, min(i + cfg.micro_batch_size, N))) for i in range(0, N, cfg.micro_batch_size)]

            def view(mb):  # rows of one micro-batch, trimmed to its longest sequence
                L = int(lens[mb].max())
                return ids[mb, :L], cmask[mb, :L]

            with torch.no_grad(), autocast():
                # with one optimizer step per batch, π_old is the policy of that step: its log-probs are
                # the step's own, detached (ratio exactly 1), and need no forward of their own
                old = [sequence_logprobs(policy, *view(mb), cfg.temperature) for mb in mbs] \
                    if cfg.ppo_epochs > 1 else None
                refl = [sequence_logprobs(ref, *view(mb), cfg.temperature) for mb in mbs]

            policy.train()
            for g in opt.param_groups:
                g["lr"] = cfg.lr
            dev_sums = torch.zeros(3, device=device)  # loss, kl, clip_frac: accumulated on the device, read once
            for _ in range(cfg.ppo_epochs):
                for k, mb in enumerate(mbs):
                    x, m = view(mb)
                    with autocast():
                        lp = sequence_logprobs(policy, x, m, cfg.temperature)
                    lp_old = old[k] if old is not None else lp.detach()
                    loss, st = grpo_loss(lp, lp_old, refl[k], adv[mb], m[:, 1:], cfg.clip_eps, cfg.beta)
                    w = len(mb) / N
                    (loss * w).backward()
                    dev_sums += torch.stack([loss.detach(), st["kl"], st["clip_frac"]]).float() * (w / cfg.ppo_epochs)
                gnorm = clip_and_step(opt, cfg.grad_clip)
                opt.zero_grad(set_to_none=True)
            sums = dict(zip(("loss", "kl", "clip_frac"), dev_sums.tolist()))
            it += 1
            dt = time.perf_counter() - t0
            n_gen = sum(len(c) for c in comps)
            last = {"step": it, "lr": cfg.lr, "grad_norm": float(gnorm), "reward_mean": float(rewards.mean()),
                    "reward_std": float(rewards.std(unbiased=False)), "accuracy": sum(correct) / N,
                    "response_len": n_gen / N, "frac_groups_no_signal": float((rewards.std(-1) == 0).float().mean()),
                    **sums, "gen_s": t_gen, "iter_s": dt, "tok_per_s": n_gen / max(t_gen, 1e-9)}
            if (cfg.eval_every > 0 and it % cfg.eval_every == 0) or it == cfg.iterations:
                policy.eval()
                last.update(evaluate_task(engine, tok, task, cfg.max_new_tokens, cfg.eval_max_examples))
            metrics.log(last)
            log(f"iter {it}: reward {last['reward_mean']:.3f}±{last['reward_std']:.3f} kl {last['kl']:.4f} "
                f"len {last['response_len']:.1f} clip {last['clip_frac']:.3f}"
                + (f" heldout acc {last['heldout_acc']:.3f}" if "heldout_acc" in last else ""))
            if cfg.save_every > 0 and it % cfg.save_every == 0 and it < cfg.iterations:
                save("periodic")
        path = save("final")
    finally:
        metrics.close()
    summary = {"iterations": it, "checkpoint": path, **{k: v for k, v in last.items() if k != "step"}}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary
