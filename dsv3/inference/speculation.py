"""MTP self-speculative decoding (paper §5.4.3): verify drafts, accept, draft again — batched, on the
device, in the spirit of gpt-fast's `speculative_decode`.

One round for a batch of B sequences, each with L tokens in the main model's cache, x_L its last
token (not yet cached) and k drafts d_1 .. d_k from the previous round:

    verify  main([x_L, d_1 .. d_k]) at positions L .. L+k -> target logits (B, k+1, V)   (engine)
    accept  `accept`: d_j is kept while every draft before it was (greedy: d_j == argmax p_{j-1};
            sampling: u_j · q_j(d_j) < p_{j-1}(d_j), u_j ~ U[0, 1)). At the first rejection one token is
            drawn from norm(max(p - q, 0)); if all k pass, a bonus token from p_k. Each round yields
            n = accepted + 1 tokens (1 .. k+1), which keeps the output distribution that of the main
            model (Leviathan et al. 2023; greedy: identical tokens).
    draft   `draft`: MTP module 0 runs over the round's k+1 positions (the next token's embedding and
            the main model's hidden state there, as in training), filling its own cache; its output
            at the last valid position n-1 gives q_1 and d'_1; chained single-position steps (module
            min(j, D-1), EAGLE-style, at positions L+n, L+n+1, ...) give d'_2 .. d'_k.

Everything stays on the device; the engine copies (tokens, n, drafts) to the host once per round.
Positions past n hold rejected drafts' latents in both caches until the next round overwrites them
(it writes from L+n on, before any query reads them). MTP modules past the first are used only for
chained drafts, so their caches are approximate: that can only lower acceptance, never change
outputs. k = 0 is plain decoding: `accept` with no drafts draws from p_0.

Random numbers (sampling.py): each row's are a hash of its request's seed, the phase (prefill or
round) and a slot: slot 0 the k uniforms and slot 1 the correction's draw (accept), slot 2 + j draft
j's draw — so the graphed and eager paths, and any batching, give a request the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.inference.sampling import BatchSampler, argmax

SLOT_UNIFORMS, SLOT_CORRECTION, SLOT_DRAFTS = 0, 1, 2  # a phase's random-number slots (module docstring)


def accept(sampler: BatchSampler, logits: torch.Tensor, drafts: torch.Tensor,
           q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits (B, k+1, V) of the verified positions, drafts (B, k), their draft distributions q (B, k, V)
    (None when sampler.all_greedy) -> (tokens (B, k+1), n (B,), p (B, k+1, V) or None): the round's
    tokens are tokens[b, :n[b]] (accepted drafts, then the drawn one); positions past n are junk.
    n is None for k = 0 with all_greedy (it is 1)."""
    B, T, V = logits.shape
    k = T - 1
    if sampler.all_greedy:
        top = argmax(logits)  # (B, T): at accepted positions it equals the draft; at n-1 the correction
        if k == 0:
            return top, None, None  # (n = 1 for every row: plain greedy decoding, no further kernels)
        ok = top[:, :k] == drafts
        n = ok.long().cumprod(-1).sum(-1) + 1
        return top, n, None
    p = sampler.probs(logits, drafts)  # (B, T, V): position j's history includes d_1 .. d_j
    if k:
        u = sampler.uniform(k, SLOT_UNIFORMS)
        pd = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k) p_{j-1}(d_j)
        qd = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k) q_j(d_j)
        ok = u * qd < pd  # u < p/q without dividing by zero
        acc = ok.long().cumprod(-1).sum(-1)  # (B,) drafts accepted
        p_at = p.gather(1, acc.view(B, 1, 1).expand(B, 1, V))[:, 0]  # (B, V) distribution at position acc
        q_at = torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, acc.view(B, 1, 1).expand(B, 1, V))[:, 0]
        w = (p_at - q_at).clamp_min(0)  # the residual; q_at = 0 for the bonus position (w = p_k)
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, p_at)  # (p == q exactly: any draw from p is right)
    else:
        acc = torch.zeros(B, dtype=torch.long, device=logits.device)
        w = p[:, 0]
    last = sampler.draw(w, SLOT_CORRECTION)  # (B,)
    tokens = torch.cat([drafts, last[:, None]], 1).scatter(1, acc[:, None], last[:, None])
    return tokens, acc + 1, p


def draft(sampler: BatchSampler, k: int, h: torch.Tensor, logits: torch.Tensor,
          step: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k drafts from the MTP output at each row's last valid position: h (B, D), logits (B, V).
    `step(j, d_j (B,), h (B, D)) -> (h, logits)` runs the chained MTP step for draft j+1.
    -> drafts (B, k), their distributions q (B, k, V) (None when sampler.all_greedy). The sampler's
    history must already include the round's accepted tokens; the drafts are added as they come."""
    ds, qs = [], []
    for j in range(k):
        d, q = sampler.choose(logits, SLOT_DRAFTS + j)
        ds.append(d)
        if q is not None:
            qs.append(q)
        if j + 1 == k:
            break
        sampler.add_history(d[:, None], torch.ones_like(d[:, None], dtype=torch.bool))
        h, logits = step(j + 1, d, h)
    return torch.stack(ds, 1), (torch.stack(qs, 1) if qs else None)
