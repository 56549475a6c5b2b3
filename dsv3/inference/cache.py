"""Paged latent KV cache (SPEC §3.5; vLLM's paged layout).

Per layer slot (the main layers, then one per MTP module) and per token, only the normalised latent
c_kv (kv_lora_rank values) and the rotated shared key k_pe (qk_rope_head_dim values) are stored:
576 values per token per layer for DeepSeek-V3 instead of 128 x (192 + 128) for an expanded cache.

Memory is a pool of fixed-size blocks (`block_size` tokens each) shared by all sequences; each
sequence owns a block table (list of block ids) and its token at position p lives in block
table[p // block_size], row p % block_size. Memory therefore follows the actual lengths of the
running sequences, and a finished sequence returns its blocks to the pool.

    kv: (n_slots, num_blocks * block_size, kv_lora_rank)   pe: (n_slots, num_blocks * block_size, rope)

A forward over a batch of sequences uses a `CacheBatch`: for each sequence b it writes the latents of
its n_new[b] new tokens at positions start[b] .. start[b] + n_new[b] - 1 and reads back all
start[b] + n_new[b] positions, with a causal mask. Reading gathers the context into a padded tensor:
simple and correct on every device (the reference); a fused GPU kernel reading the block tables
directly is an acceleration of this.
"""

from __future__ import annotations

import torch


class CacheFull(RuntimeError):
    """Not enough free blocks: the caller must queue the request (admission control)."""


class PagedLatentCache:
    def __init__(self, n_slots: int, num_blocks: int, block_size: int, kv_dim: int, pe_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.n_slots, self.num_blocks, self.block_size = n_slots, num_blocks, block_size
        self.kv = torch.zeros(n_slots, num_blocks * block_size, kv_dim, device=device, dtype=dtype)
        self.pe = torch.zeros(n_slots, num_blocks * block_size, pe_dim, device=device, dtype=dtype)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: allocate from the end

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16, dtype: torch.dtype | None = None):
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers + cfg.num_nextn_predict_layers, num_blocks, block_size,
                   cfg.kv_lora_rank, cfg.qk_rope_head_dim, p.device, dtype or p.dtype)

    @staticmethod
    def bytes_per_token(model, dtype: torch.dtype) -> int:
        cfg = model.config
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        return n * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * torch.empty(0, dtype=dtype).element_size()

    # --- block pool ----------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def allocate(self, n_blocks: int) -> list[int]:
        if n_blocks > len(self._free):
            raise CacheFull(f"need {n_blocks} cache blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n_blocks)]
        if blocks:  # a re-used block must not show its previous owner's latents (an MTP module > 1
            # reads positions of its slot that its chained drafts never wrote; see engine._draft)
            rows = torch.tensor(blocks)[:, None] * self.block_size + torch.arange(self.block_size)
            rows = rows.flatten().to(self.kv.device)
            self.kv[:, rows] = 0
            self.pe[:, rows] = 0
        return blocks

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def reserve(self) -> int:
        """Take one block out of the pool for good (e.g. the padding rows of graphed decode steps): it
        no longer counts in `num_blocks`, so capacity checks and `free_blocks == num_blocks` stay exact."""
        blk = self.allocate(1)[0]
        self.num_blocks -= 1
        return blk

    # --- per-forward view ----------------------------------------------------------------------
    def batch(self, block_tables: list[list[int]], start: list[int], n_new: list[int],
              chunk: bool = False) -> "CacheBatch":
        return CacheBatch(self, block_tables, start, n_new, chunk)


class CacheBatch:
    """Slot indices and the causal mask of one forward, shared by all layers."""

    def __init__(self, cache: PagedLatentCache, block_tables: list[list[int]], start: list[int], n_new: list[int],
                 chunk: bool = False):
        self.cache = cache
        dev = cache.kv.device
        B, T = len(start), max(n_new)
        S = max(s + n for s, n in zip(start, n_new))
        bs = cache.block_size
        for b, (tbl, s, n) in enumerate(zip(block_tables, start, n_new)):
            if -(-(s + n) // bs) > len(tbl):
                raise CacheFull(f"sequence {b} needs {s + n} positions but holds {len(tbl) * bs}")
        # flat slot of every position 0..S-1 of every sequence (positions past its end -> slot 0, masked)
        pos = torch.arange(S)
        tables = torch.zeros(B, max(len(t) for t in block_tables) or 1, dtype=torch.long)
        for b, tbl in enumerate(block_tables):
            tables[b, : len(tbl)] = torch.tensor(tbl, dtype=torch.long)
        total = torch.tensor([s + n for s, n in zip(start, n_new)])
        blk = (pos // bs).clamp_max(tables.shape[1] - 1)
        read = tables[:, blk] * bs + pos % bs  # (B, S)
        self.read_slots = torch.where(pos < total[:, None], read, 0).to(dev)
        # new token j of sequence b sits at position start[b] + j
        st = torch.tensor(start)
        j = torch.arange(T)
        wpos = st[:, None] + j  # (B, T)
        valid = j[None, :] < torch.tensor(n_new)[:, None]  # (B, T) real (not padding) tokens
        wslot = torch.gather(read, 1, wpos.clamp_max(S - 1))
        self.write_b, self.write_t = [x.to(dev) for x in valid.nonzero(as_tuple=True)]
        self.write_slots = wslot[valid].to(dev)
        self.positions = wpos.to(dev)  # (B, T) RoPE positions of the new tokens
        self._total, self._ranges = total, None  # (B,) context lengths (host); the ranges when first asked
        # one sequence whose new tokens end its context: the mask is causal aligned to the lower right, which
        # SDPA takes as a CausalBias without a (T, S) tensor (a long prompt's chunk: 1 GiB of bool at T = 8K,
        # S = 128K)
        self.lower_right = B == 1 and S == start[0] + n_new[0]
        # every sequence starts empty: its new tokens are its whole context, so attention needs nothing
        # from the cache and MLA attends in the expanded form (prefill), only storing the latents here
        self.prefill = all(s == 0 for s in start)
        # prompt chunks after cached positions (the engine's chunked prefill): MLA attends in the expanded form over
        # the up-projected cache (MLA.forward_chunk), not the absorbed one, whose scores grow as T x S
        self.chunk = chunk and not self.prefill

    @property
    def ranges(self):
        """kernels.masks.CausalRanges: sequence b's new tokens start at position start[b] (q_start: the device's
        positions, no copy) of a context of total[b] keys (k_len: B integers copied when first asked); its `mask`
        is built from them on the device."""
        if self._ranges is None:
            from dsv3.kernels.masks import CausalRanges

            self._ranges = CausalRanges(self.positions[:, 0], self._total.to(self.positions.device), self._build_mask)
        return self._ranges

    def _build_mask(self) -> torch.Tensor:
        q_start, k_len = self._ranges.q_start, self._ranges.k_len
        T, S = self.positions.shape[1], self.read_slots.shape[1]
        keys = torch.arange(S, device=q_start.device)[None, None, :]  # (1, 1, S)
        qpos = (q_start[:, None] + torch.arange(T, device=q_start.device))[:, :, None]  # (B, T, 1)
        in_context = keys < k_len[:, None, None]  # (B, 1, S)
        # padding queries (qpos past the context) see the whole sequence: no empty rows
        return torch.where(qpos < k_len[:, None, None], (keys <= qpos) & in_context, in_context).unsqueeze(1)

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, S) bool: query j of sequence b may see keys s <= start[b] + j of its context (padding queries
        see the whole sequence: no empty rows)."""
        return self.ranges.mask

    def attn_mask(self):
        """The mask as kernels.attention takes it best: a lower-right CausalBias for one sequence (`lower_right`),
        else CausalRanges: each sequence's new tokens from its start position over its own context, which SDPA
        takes as `mask` and the batch-invariant attention by position (one kernel for every form)."""
        if self.lower_right:
            from torch.nn.attention.bias import causal_lower_right

            return causal_lower_right(self.positions.shape[1], self.read_slots.shape[1])
        return self.ranges

    def layer(self, i: int) -> "_LayerView":
        return _LayerView(self, i)


class _LayerView:
    def __init__(self, batch: CacheBatch, slot: int):
        self.b, self.slot = batch, slot

    @property
    def prefill(self) -> bool:
        return self.b.prefill

    @property
    def chunk(self) -> bool:
        return self.b.chunk

    def store(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store the new tokens' (B, T, C) / (B, T, R) latents (padding tokens are not stored)."""
        b = self.b
        kv, pe = b.cache.kv[self.slot], b.cache.pe[self.slot]
        kv[b.write_slots] = c_kv[b.write_b, b.write_t].to(kv.dtype)
        pe[b.write_slots] = k_pe[b.write_b, b.write_t].to(pe.dtype)

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor, attn_mask: bool = False):
        """Store the new tokens' (B, T, C) / (B, T, R) latents; return the sequences' whole context and the mask
        (attn_mask: in the form SDPA takes best, CacheBatch.attn_mask)."""
        self.store(c_kv, k_pe)
        b = self.b
        kv, pe = b.cache.kv[self.slot], b.cache.pe[self.slot]
        return kv[b.read_slots], pe[b.read_slots], (b.attn_mask() if attn_mask else b.mask)
