"""The decode step with fixed shapes, replayed as CUDA graphs.

Eager decoding of a 27-layer MoE at batch 1 issues ~2,000 small kernels per token and spends most
of its time in Python and kernel launches (measured: a flat ~56 ms step from batch 1 to 128 for the
`16b` preset on an H100). A CUDA graph records the whole forward once per shape and replays it with
one launch. What a graph needs is a forward whose shapes and addresses never change, so:

  * one *meta* tensor per shape bucket is the step's only input, (Bp, 2 + nblk) int64 on the device:
        meta[b] = [token, position, block_table[0 .. nblk-1]]
    filled on the host (pinned) and sent with one non-blocking copy;
  * everything else is derived from it inside the graph with tensor ops (no host sync): the RoPE
    position, the slot the new latent is written to, the slots of the context read back, the mask;
  * shapes are bucketed: batch Bp = the next power of two >= B (capped at max_batch_size), context
    S = nblk · block_size with nblk the next power of two >= the longest sequence's blocks. Rows
    past B are padding: they read and write only a reserved padding block;
  * all graphs share one memory pool (captured lazily, on first use of a bucket).

`StaticDecodeBatch` is the cache view (the `update(c_kv, k_pe)` contract of CacheBatch) and runs
eagerly on any device: the CPU tests check it against the reference `CacheBatch` path, and the GPU
tests check graph replay against eager decoding.

Attention. `update` gathers each sequence's padded context, (B, S, C) per layer, for the einsums of
`MLA.forward_absorbed` (the reference). On CUDA with triton the layer views instead offer
`store(c_kv, k_pe)` + `attend(q_lat, q_pe, scale)`: the Triton flash-decoding kernel
(dsv3/kernels/mla_decode_triton.py) reads the latents straight through the block tables, one pass
per group of heads, and never materialises the gathered copy. Its inputs, the block tables (B, nblk)
and the lengths seq_lens = position + 1 (B,), are derived from meta on the device like the rest, and
its grid depends on shapes only, so it is captured in the graph as is. The view decides (MLA only
asks `fused_decode`) because only the cache knows its device and the batch's layout; the switch
`DecodeGraphs.use_triton_attention = False` keeps the reference path on the GPU (tests compare).
Padding rows (pad block, position 0) attend over the one row they just wrote: finite, discarded.
"""

from __future__ import annotations

import torch

from dsv3.kernels import mla_decode_kernel


@torch.library.custom_op("dsv3::write_latents", mutates_args=("kv", "pe"))
def write_latents(kv: torch.Tensor, pe: torch.Tensor, slot: int, rows: torch.Tensor, c_kv: torch.Tensor,
                  k_pe: torch.Tensor) -> None:
    """kv[slot][rows] = c_kv, pe[slot][rows] = k_pe, in place, on the whole cache tensors (n_slots, R, ·).

    An op of its own because torch.compile functionalises an in-place index_copy_ on the view
    `cache.kv[slot]` into a select_scatter of the whole cache: measured on the H100 (`16b`, batch 32),
    the compiled decode step copied the entire (27, 8208, 512) cache several times per step (~2.8 ms of
    a 19 ms step), a cost that grows with the cache. A custom op that declares what it mutates is
    re-inplaced by inductor: one small scatter per layer, as in eager."""
    kv[slot].index_copy_(0, rows, c_kv.to(kv.dtype))
    pe[slot].index_copy_(0, rows, k_pe.to(pe.dtype))


@write_latents.register_fake
def _(kv, pe, slot, rows, c_kv, k_pe) -> None:
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class StaticDecodeBatch:
    """One new token per sequence, fixed (B, S). Call `prepare()` (inside the graph) after filling meta."""

    def __init__(self, cache, batch: int, nblk: int, pad_block: int, attention=None):
        dev = cache.kv.device
        self.cache, self.B, self.nblk, self.pad_block = cache, batch, nblk, pad_block
        # None: MLA attends over update()'s gathered context; else a function with mla_decode_ref's
        # signature (the Triton kernel) serving the layer views' attend()
        self.attention = attention
        self.bs = cache.block_size
        self.S = nblk * self.bs
        self.meta = torch.zeros(batch, 2 + nblk, dtype=torch.long, device=dev)
        self.fill_padding()
        s = torch.arange(self.S, device=dev)
        self._blk, self._off = s // self.bs, s % self.bs  # (S,) block index and row of each position
        self._s = s

    def fill_padding(self) -> None:
        self.meta.zero_()
        self.meta[:, 2:] = self.pad_block

    def prepare(self) -> None:
        """Derive ids (B, 1), positions (B, 1), block tables (B, nblk), context lengths (B,), read slots
        (B, S), write slot (B,), mask (B, 1, 1, S)."""
        m = self.meta
        self.ids = m[:, :1]
        pos = m[:, 1]  # position of the new token = tokens already in the cache
        self.block_table = m[:, 2:]  # (B, nblk)
        self.seq_lens = pos + 1  # (B,) keys 0 .. pos: the cached tokens and the new one
        self.read_slots = self.block_table[:, self._blk] * self.bs + self._off  # (B, S)
        self.write_slots = self.read_slots.gather(1, pos.unsqueeze(1)).squeeze(1)  # (B,)
        self.mask = (self._s[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S) keys 0..pos
        self.positions = pos.unsqueeze(1)  # (B, 1)

    def layer(self, i: int) -> "_StaticLayerView":
        return _StaticLayerView(self, i)


class _StaticLayerView:
    def __init__(self, batch: StaticDecodeBatch, slot: int):
        self.b, self.slot = batch, slot

    @property
    def fused_decode(self) -> bool:
        """True where `attend` serves (MLA.forward_absorbed then calls store + attend instead of update)."""
        return self.b.attention is not None

    def store(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """c_kv (B, 1, C), k_pe (B, 1, R): write the new token's latents at its slot."""
        b = self.b  # padding rows all write the pad block
        write_latents(b.cache.kv, b.cache.pe, self.slot, b.write_slots, c_kv[:, 0], k_pe[:, 0])

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """c_kv (B, 1, C), k_pe (B, 1, R): store, then return the (B, S, ·) context and mask."""
        self.store(c_kv, k_pe)
        b = self.b
        kv, pe = b.cache.kv[self.slot], b.cache.pe[self.slot]
        return kv[b.read_slots], pe[b.read_slots], b.mask

    def attend(self, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        """After `store`: q_lat (B, H, C), q_pe (B, H, R) -> o_lat (B, H, C), attention over keys 0 .. position
        read through the block tables (the math of mla_decode_ref)."""
        b = self.b
        return b.attention(q_lat, q_pe, b.cache.kv[self.slot], b.cache.pe[self.slot], b.block_table, b.seq_lens,
                           b.bs, scale)


class DecodeGraphs:
    """Decode-step runner over a PagedLatentCache: `run(tokens, positions, tables) -> logits (B, V)`.

    `use_graphs=False` runs the same static-shape forward eagerly (the CPU path, and the reference of
    the graph replay). The caller reserves `pad_block` in the cache for the padding rows.
    `use_triton_attention` (read when a bucket is first built): attend with the Triton decode kernel
    where the cache is on CUDA and triton imports; False keeps the einsum reference (GPU tests)."""

    def __init__(self, model, cache, pad_block: int, max_batch_size: int, max_blocks: int, use_graphs: bool = True,
                 compile: bool = False, use_triton_attention: bool = True):
        self.model, self.cache, self.pad_block = model, cache, pad_block
        self.use_triton_attention = use_triton_attention
        self._step = self._forward
        if compile:
            # torch.compile the step (per bucket, static shapes) before it is captured: inductor fuses the
            # elementwise chains (RMSNorm, RoPE, router, MoE permutation), ~100 kernels per layer otherwise.
            # One compile per bucket (tens of seconds for a 27-layer model): for servers and benchmarks.
            import torch._dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # one entry per bucket
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            self._step = torch.compile(self._forward, dynamic=False)
        self.max_batch_size, self.max_blocks = max_batch_size, max_blocks
        self.use_graphs = use_graphs and cache.kv.is_cuda
        self._entries: dict[tuple[int, int], tuple] = {}  # (Bp, nblk) -> (batch, graph | None, logits)
        self._pool = None
        self._copied = None  # CUDA event after the last host -> device copy of meta
        self.captures = 0

    def bucket(self, batch: int, blocks: int) -> tuple[int, int]:
        if batch > self.max_batch_size:
            raise ValueError(f"decode batch {batch} exceeds max_batch_size {self.max_batch_size}")
        return min(next_pow2(batch), self.max_batch_size), min(next_pow2(blocks), self.max_blocks)

    def _forward(self, sb: StaticDecodeBatch) -> torch.Tensor:
        sb.prepare()
        out = self.model(sb.ids, sb.positions, cache=sb, with_mtp=False)
        return out.logits[:, 0]  # (Bp, V)

    def _entry(self, Bp: int, nblk: int):
        key = (Bp, nblk)
        if key in self._entries:
            return self._entries[key]
        attention = mla_decode_kernel() if self.use_triton_attention and self.cache.kv.is_cuda else None
        sb = StaticDecodeBatch(self.cache, Bp, nblk, self.pad_block, attention)
        host = torch.empty(Bp, 2 + nblk, dtype=torch.long, pin_memory=self.use_graphs)
        graph, logits = None, None
        if self.use_graphs:
            # warm up on a side stream (lazy inits, autotuning) then capture; padding rows only touch
            # the pad block, so neither pass disturbs a sequence's cache
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(sb)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(sb)
            self._pool = graph.pool()
            self.captures += 1
        entry = (sb, host, graph, logits)
        self._entries[key] = entry
        return entry

    @torch.no_grad()
    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode step for B sequences: the new token of each, its position (= tokens already cached)
        and its block table (covering position). Returns the logits (B, V) (a view valid until the next run)."""
        B = len(tokens)
        bs = self.cache.block_size
        need = max(p // bs + 1 for p in positions)
        Bp, nblk = self.bucket(B, need)
        sb, host, graph, logits = self._entry(Bp, nblk)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy out of the pinned buffer is done
        h = host.numpy()
        h[:, :2] = 0
        h[:, 2:] = self.pad_block
        h[:B, 0], h[:B, 1] = tokens, positions
        for b, tbl in enumerate(tables):
            n = min(len(tbl), nblk)
            h[b, 2: 2 + n] = tbl[:n]
        sb.meta.copy_(host, non_blocking=True)
        if self.use_graphs:
            self._copied = torch.cuda.Event()
            self._copied.record()
        if graph is None:
            logits = self._step(sb)
        else:
            graph.replay()
        return logits[:B]
