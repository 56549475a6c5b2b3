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
"""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class StaticDecodeBatch:
    """One new token per sequence, fixed (B, S). Call `prepare()` (inside the graph) after filling meta."""

    def __init__(self, cache, batch: int, nblk: int, pad_block: int):
        dev = cache.kv.device
        self.cache, self.B, self.nblk, self.pad_block = cache, batch, nblk, pad_block
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
        """Derive ids (B, 1), positions (B, 1), read slots (B, S), write slot (B,), mask (B, 1, 1, S)."""
        m = self.meta
        self.ids = m[:, :1]
        pos = m[:, 1]  # position of the new token = tokens already in the cache
        tables = m[:, 2:]  # (B, nblk)
        self.read_slots = tables[:, self._blk] * self.bs + self._off  # (B, S)
        self.write_slots = self.read_slots.gather(1, pos.unsqueeze(1)).squeeze(1)  # (B,)
        self.mask = (self._s[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S) keys 0..pos
        self.positions = pos.unsqueeze(1)  # (B, 1)

    def layer(self, i: int) -> "_StaticLayerView":
        return _StaticLayerView(self, i)


class _StaticLayerView:
    def __init__(self, batch: StaticDecodeBatch, slot: int):
        self.b, self.slot = batch, slot

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """c_kv (B, 1, C), k_pe (B, 1, R): store, then return the (B, S, ·) context and mask."""
        b = self.b
        kv, pe = b.cache.kv[self.slot], b.cache.pe[self.slot]
        kv.index_copy_(0, b.write_slots, c_kv[:, 0].to(kv.dtype))  # padding rows all hit the pad block
        pe.index_copy_(0, b.write_slots, k_pe[:, 0].to(pe.dtype))
        return kv[b.read_slots], pe[b.read_slots], b.mask


class DecodeGraphs:
    """Decode-step runner over a PagedLatentCache: `run(tokens, positions, tables) -> logits (B, V)`.

    `use_graphs=False` runs the same static-shape forward eagerly (the CPU path, and the reference of
    the graph replay). The caller reserves `pad_block` in the cache for the padding rows."""

    def __init__(self, model, cache, pad_block: int, max_batch_size: int, max_blocks: int, use_graphs: bool = True,
                 compile: bool = False):
        self.model, self.cache, self.pad_block = model, cache, pad_block
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
        sb = StaticDecodeBatch(self.cache, Bp, nblk, self.pad_block)
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
