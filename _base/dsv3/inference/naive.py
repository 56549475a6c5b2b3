"""Generation by full recomputation (no KV cache): simple and obviously correct; the reference
that cached generation is tested against."""

from __future__ import annotations

import torch

from dsv3.inference.sampling import sample


@torch.no_grad()
def generate_naive(model, ids: list[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, eos_id: int | None = None, seed: int | None = None) -> list[int]:
    """Continue `ids` by up to max_new_tokens tokens; stops after eos_id. Returns only the new tokens."""
    if not ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    max_len = model.config.max_position_embeddings
    x = torch.tensor([ids], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        out = model(x[:, -max_len:], with_mtp=False)
        t = sample(out.logits[:, -1], temperature, top_k, top_p, generator=g)
        new.append(int(t))
        if eos_id is not None and new[-1] == eos_id:
            break
        x = torch.cat([x, t.view(1, 1)], dim=1)
    return new
