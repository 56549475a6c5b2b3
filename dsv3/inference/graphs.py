"""The decode steps with fixed shapes, replayed as CUDA graphs.

Eager decoding of a 27-layer MoE at batch 1 issues ~2,000 small kernels per token and spends most
of its time in Python and kernel launches (measured: a flat ~56 ms step from batch 1 to 128 for the
`16b` preset on an H100). A CUDA graph records the whole forward once per shape and replays it with
one launch. What a graph needs is a forward whose shapes and addresses never change, so:

  * a step is T new tokens per sequence at positions pos0 .. pos0 + T - 1: T = 1 for plain decoding,
    T = k + 1 for speculative verification ([x_L, d_1 .. d_k]) and MTP module 0 over the same
    positions, T = 1 for a chained MTP draft step (dsv3/inference/speculation.py);
  * one *meta* tensor per shape bucket carries the step's integer inputs, (Bp, 1 + T + nblk) int64 on
    the device:   meta[b] = [pos0, token_0 .. token_{T-1}, block_table[0 .. nblk-1]]
    filled on the host (pinned) and sent with one non-blocking copy; an MTP step's tokens, hidden
    states, the row to read out and (chained steps) pos0 come from the previous step's device
    tensors instead, copied into the bucket's static buffers — no host round trip inside a round —
    and so do a main step's tokens when the engine queues it behind a step whose results it has not
    read yet (overlapped decoding: `main` given a device tensor);
  * everything else is derived from meta inside the graph with tensor ops (no host sync): the RoPE
    positions, the slots the new latents are written to, the slots of the context read back, the mask;
  * shapes are bucketed: batch Bp = the next power of two >= B (capped at max_batch_size), context
    S = nblk · block_size with nblk the next power of two >= the blocks the furthest position needs.
    Rows past B are padding: they read and write only a reserved padding block;
  * all graphs share one memory pool (captured lazily, on first use of a bucket);
  * a step may run as one graph (`round`, the "round_graph" switch of kernels/backend.py): a speculation
    round's verification step, the acceptance, MTP module 0 over the k + 1 positions and the k - 1 chained draft
    steps, each forward the one its own bucket would run (same shapes, same ops), the inputs of each
    step after the first copied from the step before inside the graph: one launch a round instead of k + 1 and the
    ~20 eager kernels between them (speculation.py's accept and draft, the copies into the buckets); without
    speculation (k = 0) the one-token step and its argmax (or draw). Greedy rounds take argmax; sampled ones
    ("round_sampled") the batch's sampler on static buffers: each row's parameters and phase key, and the verified
    drafts' distributions, copied in before the replay; their random numbers are sampling.py's hashed ones, pure
    functions of those keys, so a replay draws what the steps one by one would. With compiled steps the round's
    whole forward is compiled as one function ("round_compile"), so inductor fuses those kernels too (a k = 1 round
    of `small`: 248 -> 226 kernels, 0.870 -> 0.814 ms on an H100; of 16b: 419 -> 397, 3.723 -> 3.676 ms).

`StaticBatch` is the cache view (the `update(c_kv, k_pe)` contract of CacheBatch) and runs eagerly
on any device: with `use_graphs=False` (and unbucketed shapes) `DecodeGraphs` is the eager decode
path of the engine, the reference that the GPU tests check graph replay against.

Attention. `update` gathers each sequence's padded context, (B, S, C) per layer, for the einsums of
`MLA.forward_absorbed` (the reference). Where `kernels.mla_decode` has an accelerated backend for the
cache (dsv3/kernels/backend.py: CUDA with triton) the layer views instead offer `store(c_kv, k_pe)` +
`attend(q_lat, q_pe, scale)`: the flash-decoding kernel (dsv3/kernels/mla_decode_triton.py) reads
the latents straight through the block tables and never materialises the gathered copy. The kernel
takes one query per row, so T > 1 runs it over B·T rows, row (b, t) with sequence b's block table
and length pos0 + t + 1 (causal within the step). Its grid depends on shapes only, so it is captured
in the graph as is. The choice is made when a bucket is first built, so
`with kernels.use_backend(mla_decode="reference"):` around the first run keeps the einsum path on
the GPU (tests compare). Padding rows (pad block, position 0) attend over rows they just wrote:
finite, discarded.
"""

from __future__ import annotations

import functools
import warnings

import torch

from dsv3 import kernels
from dsv3.inference import speculation
from dsv3.inference.params import SamplingParams
from dsv3.inference.sampling import BatchSampler, param_row, token_logprobs
from dsv3.kernels import backend as kernel_backend

# INDUCTOR_PDL: inductor's generated kernels of a compiled decode step launch with programmatic dependent launch too,
# where dsv3's do (kernels.set_pdl, on by default on compute capability 9.0+) and the torch has the option
# (torch._inductor.config.triton.enable_pdl: 2.11 and later). OFF: on an H100 (2026-12-05, tenth session, torch 2.11,
# bench/RESULTS.md) a CUDA-graph capture of a compiled step failed with it on (cudaErrorStreamCaptureInvalidated, at
# the first dsv3 launch after inductor's kernels) when other compiled engines had captured before in the same process
# (tests/test_gpu_expert_gemv.py, test_gpu_dense_gemv.py, test_gpu_head_gemv.py -k graph, in that order: twice),
# and passed with it off, dsv3's kernels still on PDL; what it bought is gone on today's path (16b batch 1, one
# machine: FP8 459.5 on / 459.2 off, bf16 363.8 on / 377.9 off). It was on from the H200's 388.0 -> 417.8 tok/s
# (and 365.8 -> 369.2 in another run) on the path of that day. The bench's +ipdl / +noipdl modes set it.
INDUCTOR_PDL = False


def _inductor_options(device: torch.device) -> dict | None:
    """torch.compile options of the decode steps: inductor's PDL where INDUCTOR_PDL and dsv3's kernels use PDL."""
    import torch._inductor.config as inductor_config

    if INDUCTOR_PDL and kernel_backend.pdl(device) and hasattr(inductor_config.triton, "enable_pdl"):
        return {"triton.enable_pdl": True}
    return None


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


def compile_entries(max_batch_size: int, max_blocks: int, mtp_modules: int) -> int:
    """A bound on the compiled entries one decode function may need: one per (batch bucket, context bucket) and
    variant, the variants being the main step's two widths (1 and k + 1), the MTP step's widths and modules, and a
    round's: its chained steps' context buckets (at most two apart from the verification's), greedy or sampled with
    one of the 8 sets of filters (round_sampled: a graph per set), each with and without log-probabilities, with
    some to spare; at least 64."""
    buckets = ((max_batch_size - 1).bit_length() + 1) * ((max_blocks - 1).bit_length() + 1)  # (powers of two, the cap)
    return max(64, buckets * (2 + max(1, mtp_modules) + 2 * (1 + 8) * 2) + 8)


def result_rows(ints: list[torch.Tensor], lp: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """A decode step's results as one tensor, a row per sequence: the (B, x) integer tensors `ints` (tokens (B, T),
    then, where given, n (B, 1) and drafts (B, k)), then with log-probabilities (lp: sampling.token_logprobs') the
    chosen tokens' (T), the top ids (T·nt) and values (T·nt), all float64 (token ids are exact in it). Engine._parse
    reads it back."""
    if lp is None:
        return torch.cat(ints, 1) if len(ints) > 1 else ints[0]
    chosen, top_i, top_v = lp
    return torch.cat([x.double() for x in ints] + [chosen.double(), top_i.double().flatten(1),
                                                  top_v.double().flatten(1)], 1)


class StaticBatch:
    """T new tokens per sequence, fixed (B, T, nblk). Fill meta (and, for an MTP step, `hidden` and
    `select`), then call `prepare()` (inside the graph)."""

    def __init__(self, cache, batch: int, T: int, nblk: int, pad_block: int, attention=None,
                 hidden_dim: int | None = None):
        dev = cache.kv.device
        self.cache, self.B, self.T, self.nblk, self.pad_block = cache, batch, T, nblk, pad_block
        # None: MLA attends over update()'s gathered context; else a function with mla_decode_ref's
        # signature (kernels.mla_decode on its accelerated backend) serving the layer views' attend()
        self.attention = attention
        self.bs = cache.block_size
        self.S = nblk * self.bs
        if T > self.S:
            raise ValueError(f"a step of {T} tokens needs a context of at least {T} positions, bucket has {self.S}")
        self.meta = torch.zeros(batch, 1 + T + nblk, dtype=torch.long, device=dev)
        self.pos0, self.ids, self.block_table = self.meta[:, 0], self.meta[:, 1: 1 + T], self.meta[:, 1 + T:]
        # an MTP step's other inputs: the previous depth's hidden state at the T positions, and which
        # of the T positions' outputs to return per row (its last valid one)
        self.hidden = None if hidden_dim is None else torch.zeros(batch, T, hidden_dim, dtype=cache.kv.dtype, device=dev)
        self.select = torch.zeros(batch, dtype=torch.long, device=dev)
        self.block_table.fill_(pad_block)  # rows past B (padding) read and write only the pad block
        s = torch.arange(self.S, device=dev)
        self._blk, self._off, self._s = s // self.bs, s % self.bs, s  # (S,) block index and row of each position
        self._t = torch.arange(T, device=dev)

    def prepare(self) -> None:
        """Derive positions (B, T), read slots (B, S), write slots (B, T), mask (B, 1, T, S), and the
        attention kernel's per-query block tables (B·T, nblk) and lengths (B·T,)."""
        pos = self.pos0[:, None] + self._t  # (B, T): positions of the new tokens (pos0 = tokens already cached)
        self.positions = pos
        self.read_slots = self.block_table[:, self._blk] * self.bs + self._off  # (B, S)
        self.write_slots = self.read_slots.gather(1, pos)  # (B, T)
        self.mask = (self._s[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, S): query t sees keys 0..pos0+t
        self.q_tables = self.block_table.repeat_interleave(self.T, 0) if self.T > 1 else self.block_table
        self.q_lens = (pos + 1).reshape(-1)  # (B·T,)

    def real_seqs(self) -> torch.Tensor:
        """(B,) bool: the real sequences. A padding row (and the lockstep engine's idle request) has the pad block
        first in its table; a sequence never does. From the static inputs, so a graph replay derives its own."""
        return self.block_table[:, 0] != self.pad_block

    def real_rows(self) -> torch.Tensor:
        """(B·T,) bool, batch-major: the positions of real sequences (real_seqs)."""
        return self.real_seqs()[:, None].expand(self.B, self.T).reshape(-1)

    def layer(self, i: int) -> "_StaticLayerView":
        return _StaticLayerView(self, i)


class _StaticLayerView:
    def __init__(self, batch: StaticBatch, slot: int):
        self.b, self.slot = batch, slot

    @property
    def fused_decode(self) -> bool:
        """True where `attend` serves (MLA.forward_absorbed then calls store + attend instead of update)."""
        return self.b.attention is not None

    def store(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """c_kv (B, T, C), k_pe (B, T, R): write the new tokens' latents at their slots."""
        b = self.b  # padding rows all write the pad block
        write_latents(b.cache.kv, b.cache.pe, self.slot, b.write_slots.reshape(-1), c_kv.flatten(0, 1),
                      k_pe.flatten(0, 1))

    def store_kv_a(self, kv_a: torch.Tensor, norm, cos: torch.Tensor, sin: torch.Tensor,
                   q_pe: torch.Tensor | None = None) -> torch.Tensor | None:
        """kv_a (B, T, C + R): the new tokens' raw kv_a projection; writes RMSNorm(kv_a[..., :C]) (`norm`: the
        layer's kv_a_layernorm) and the RoPE of kv_a[..., C:] by cos / sin (B or 1, T, R / 2) at their slots:
        `store` of MLA's latents, with the norm and RoPE done by the store's kernel (kernels.store_latents). With
        the query's unrotated rope part q_pe (B, T, H, R) (a view of the q projection's output) the same launch
        rotates it too: returns RoPE(q_pe; cos, sin), a new contiguous (B, T, H, R); else None."""
        b = self.b
        B, T, W = kv_a.shape
        cos, sin = (t.expand(B, T, t.shape[-1]).reshape(B * T, t.shape[-1]) for t in (cos, sin))
        # (B·T, H, R): still a view of q (its (B, T) strides merge), read where it lies by the kernel
        q = None if q_pe is None else q_pe.reshape(B * T, *q_pe.shape[2:])
        q = kernels.store_latents(b.cache.kv, b.cache.pe, self.slot, b.write_slots.reshape(-1),
                                  kv_a.reshape(B * T, W), norm.weight, norm.eps, cos, sin, q_pe=q)
        return None if q is None else q.view(q_pe.shape)

    def store_kv_a_uk(self, kv_a: torch.Tensor, norm, cos: torch.Tensor, sin: torch.Tensor, q_pe: torch.Tensor,
                      q_nope: torch.Tensor, w_uk_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`store_kv_a` with the query, and absorbed MLA's W_UK product in the same launch (kernels.mla_prep, taken
        where switched on: kernels.set_mla_prep): q_nope (B, T, H, nope) and W_UKᵀ (H, C, nope), views as MLA holds
        them -> (q_lat (B, T, H, C), the rotated q_pe (B, T, H, R)), both new contiguous tensors."""
        b = self.b
        B, T, W = kv_a.shape
        cos, sin = (t.expand(B, T, t.shape[-1]).reshape(B * T, t.shape[-1]) for t in (cos, sin))
        # (B·T, H, ·): still views of q (their (B, T) strides merge), read where they lie by the kernel
        q_lat, q = kernels.mla_prep(b.cache.kv, b.cache.pe, self.slot, b.write_slots.reshape(-1),
                                    kv_a.reshape(B * T, W), norm.weight, norm.eps, cos, sin,
                                    q_pe.reshape(B * T, *q_pe.shape[2:]), q_nope.reshape(B * T, *q_nope.shape[2:]),
                                    w_uk_t)
        return q_lat.view(B, T, *q_lat.shape[1:]), q.view(q_pe.shape)

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """c_kv (B, T, C), k_pe (B, T, R): store, then return the (B, S, ·) context and mask (B, 1, T, S)."""
        self.store(c_kv, k_pe)
        b = self.b
        kv, pe = b.cache.kv[self.slot], b.cache.pe[self.slot]
        return kv[b.read_slots], pe[b.read_slots], b.mask

    def attend(self, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        """After `store`: q_lat (B, T, H, C), q_pe (B, T, H, R) -> o_lat (B, T, H, C), query t attending over
        keys 0 .. pos0 + t read through the block tables (the math of mla_decode_ref per query)."""
        b = self.b
        o = b.attention(q_lat.flatten(0, 1), q_pe.flatten(0, 1), b.cache.kv[self.slot], b.cache.pe[self.slot],
                        b.q_tables, b.q_lens, b.bs, scale)
        return o.view(q_lat.shape)

    def attend_uv(self, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float, w_uv: torch.Tensor) -> torch.Tensor:
        """`attend`, then W_UV (H, v, C) in the attention's last launch (kernels.mla_decode_uv, where switched on:
        kernels.set_mla_uv) -> o (B, T, H, v)."""
        b = self.b
        o = kernels.mla_decode_uv(q_lat.flatten(0, 1), q_pe.flatten(0, 1), b.cache.kv[self.slot],
                                  b.cache.pe[self.slot], b.q_tables, b.q_lens, b.bs, scale, w_uv)
        return o.view(*q_lat.shape[:3], w_uv.shape[1])


class _Entry:
    """One bucket: its static batch, pinned host meta, step function, graph and outputs (when captured),
    and the CUDA event of its last host -> device copy."""

    def __init__(self, sb: StaticBatch, host: torch.Tensor, step):
        self.sb, self.host, self.step = sb, host, step
        self.graph, self.outputs, self.copied = None, None, None


class _Round:
    """The static state of a round's one graph (DecodeGraphs.round): `sb` the round's inputs as the host fills them
    (T = k + 1 tokens, the block table of the round's furthest step, `nblk` blocks), then one static batch per
    forward with its own bucket's context: the verification step, MTP module 0 (T = k + 1) and the chained draft
    steps j = 1 .. k - 1 (T = 1); and the batch's sampler: greedy (stateless: argmax), or, for a sampled round
    (`filters`: which of top-k, top-p, min-p it applies), one reading each row's parameters from the static `rows`
    (BatchSampler.over; padding rows greedy) and the verified drafts' distributions from `q` (Bp, k, V). `nt`: with
    log-probabilities, how many of the most likely tokens' the round reports (BatchSampler.logprobs_n), else None."""

    def __init__(self, graphs: "DecodeGraphs", k: int, Bp: int, nblks: tuple[int, ...],
                 filters: tuple[bool, bool, bool] | None = None, nt: int | None = None):
        cache, pad, dev = graphs.cache, graphs.pad_block, graphs.cache.kv.device
        D, V = graphs.model.config.hidden_size, graphs.model.config.vocab_size
        self.k, self.nt = k, nt
        self.sb = StaticBatch(cache, Bp, k + 1, max(nblks), pad)
        self.sb.round = self  # (what DecodeGraphs.round's fill copies the sampler's rows and q into)
        attention = graphs._attention()
        self.main = StaticBatch(cache, Bp, k + 1, nblks[0], pad, attention)
        self.mtp = [StaticBatch(cache, Bp, k + 1, nblks[0], pad, attention, hidden_dim=D)] if k else []
        self.mtp += [StaticBatch(cache, Bp, 1, n, pad, attention, hidden_dim=D) for n in nblks[1:]]
        self.rows = self.q = None
        if filters is None:
            self.sampler = BatchSampler([SamplingParams(temperature=0.0)] * Bp, [0] * Bp, [()] * Bp, V, dev)
        else:
            greedy_row = param_row(SamplingParams(temperature=0.0), 0)  # (padding rows: the host fills rows[:B])
            self.rows = torch.tensor([greedy_row] * Bp, dtype=torch.float64, device=dev)
            self.q = torch.zeros(Bp, k, V, device=dev) if k else None
            self.sampler = BatchSampler.over(self.rows, filters, V)


class DecodeGraphs:
    """Decode-step runner over a PagedLatentCache (module docstring):

        main(tokens, pos0, tables)                        -> logits (B, T, V), hidden (B, T, D)
        mtp(module, tokens, hidden, pos0, tables, select) -> hidden (B, D), logits (B, V)

    `use_graphs=False` runs the same static-shape forwards eagerly (the CPU path, and the reference of
    the graph replay); `bucketed=False` then sizes each step exactly (no padding rows). The caller
    reserves `pad_block` in the cache for padding. Outputs are views of a bucket's buffers, valid
    until that bucket runs again."""

    def __init__(self, model, cache, pad_block: int, max_batch_size: int, max_blocks: int, use_graphs: bool = True,
                 compile: bool = False, bucketed: bool = True, loads=None, row_limit: int | None = None):
        self.model, self.cache, self.pad_block = model, cache, pad_block
        # the one-row decode kernels' row limit in these steps (kernels/backend.py row_limits, "verify_rows"), or None
        self.row_limit = row_limit
        self.loads = loads  # a dsv3.model.loads.ExpertLoadRecorder, or None: its row mask is derived inside each step
        self.n_layers = model.config.num_hidden_layers
        self._main, self._mtp, self._round = self._forward_main, self._forward_mtp, self._forward_round
        if compile:
            # torch.compile each step (per bucket, static shapes) before it is captured: inductor fuses the
            # elementwise chains (RMSNorm, RoPE, router, MoE permutation), ~100 kernels per layer otherwise.
            # One compile per bucket (tens of seconds for a 27-layer model): for servers and benchmarks.
            import torch._dynamo

            # one compiled entry per bucket and step kind: past dynamo's limits a new bucket would run uncompiled
            need = compile_entries(max_batch_size, max_blocks, model.config.num_nextn_predict_layers)
            for name, n in (("recompile_limit", need), ("cache_size_limit", need),  # (per function; older name)
                            ("accumulated_recompile_limit", 3 * need)):  # (all functions together)
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(n, getattr(torch._dynamo.config, name)))
            opts = _inductor_options(cache.kv.device)
            self._main = torch.compile(self._forward_main, dynamic=False, options=opts)
            self._mtp = torch.compile(self._forward_mtp, dynamic=False, options=opts)
            if kernel_backend.round_compile():  # the round graph's whole forward, its glue fused (backend.py)
                self._round = torch.compile(self._forward_round, dynamic=False, options=opts)
        self.max_batch_size, self.max_blocks = max_batch_size, max_blocks
        self.use_graphs = use_graphs and cache.kv.is_cuda
        self.bucketed = bucketed
        self._entries: dict[tuple, _Entry] = {}  # (kind, Bp, T, nblk) -> its static batch, graph, outputs
        self._pool = None
        self.captures = 0

    def bucket(self, batch: int, blocks: int) -> tuple[int, int]:
        if batch > self.max_batch_size:
            raise ValueError(f"decode batch {batch} exceeds max_batch_size {self.max_batch_size}")
        if not self.bucketed:
            return batch, blocks
        return min(next_pow2(batch), self.max_batch_size), min(next_pow2(blocks), self.max_blocks)

    # --- the forwards (what a graph records) ----------------------------------------------------
    def _forward_main(self, sb: StaticBatch) -> tuple[torch.Tensor, ...]:
        sb.prepare()
        if self.loads is not None:
            self.loads.rows = sb.real_rows()
        out = self.model(sb.ids, sb.positions, cache=sb, with_mtp=False)
        return out.logits, out.hidden, sb.ids, sb.pos0  # (Bp, T, V), (Bp, T, D), and its inputs

    def _forward_mtp(self, sb: StaticBatch, module: int) -> tuple[torch.Tensor, torch.Tensor]:
        sb.prepare()
        if self.loads is not None:
            self.loads.rows = sb.real_rows()
        return self.model.mtp_step(module, sb.ids, sb.hidden, sb.positions, sb.layer(self.n_layers + module),
                                   select=sb.select)  # (Bp, D), (Bp, V)

    def _forward_round(self, r: _Round) -> tuple[torch.Tensor, ...]:
        """A round (speculation.py) over r's static batches, each step's inputs copied from the step before on the
        device -> tokens (Bp, k+1), n (Bp,), drafts (Bp, k), the next round's first positions (Bp,), the results'
        row per sequence (`result_rows`: tokens, n, drafts, and the verified positions' log-probabilities where r.nt
        says), and for a sampled round the new drafts' distributions q (Bp, k, V); k = 0: tokens (Bp, 1) (the
        one-token step's argmax or draw, also its results' rows without log-probabilities), then with them the
        results' rows."""
        k, sb = r.k, r.sb
        T = k + 1
        r.main.meta.copy_(sb.meta[:, : 1 + T + r.main.nblk])  # (a prefix of the widest table: the same blocks)
        logits, hidden, ids, pos0 = self._main(r.main)
        tokens, n, _ = speculation.accept(r.sampler, logits, ids[:, 1:], r.q)  # (Bp, k+1), (Bp,)
        lp = None if r.nt is None else token_logprobs(logits, tokens, r.nt)  # (the raw model's, every position)
        if not k:
            return (tokens,) if lp is None else (tokens, result_rows([tokens], lp))
        next_pos = pos0 + n
        m = r.mtp[0]  # MTP module 0 over the k + 1 positions, read out at the last valid one (n - 1)
        m.meta.copy_(r.main.meta)
        m.ids.copy_(tokens)
        m.hidden.copy_(hidden)
        m.select.copy_(n - 1)
        h, lg = self._mtp(m, module=0)
        real = sb.real_seqs()  # (padding rows keep position 0 in the pad block)
        n_mtp = self.model.config.num_nextn_predict_layers

        def step(j: int, d: torch.Tensor, h: torch.Tensor):  # chained draft j + 1 at next_pos + j - 1
            c = r.mtp[j]
            c.block_table.copy_(sb.block_table[:, : c.nblk])
            c.pos0.copy_(torch.where(real, next_pos + (j - 1), 0))
            c.ids.copy_(d[:, None])
            c.hidden.copy_(h[:, None])
            c.select.zero_()
            return self._mtp(c, module=min(j, n_mtp - 1))

        drafts, q = speculation.draft(r.sampler, k, h, lg, step)
        out = tokens, n, drafts, next_pos, result_rows([tokens, n[:, None], drafts], lp)
        return out if q is None else out + (q,)

    def _run_round(self, r: _Round) -> tuple[torch.Tensor, ...]:
        """A round's forward: compiled whole where round_compile is on. Should that compile fail (glue inductor cannot
        take where the steps compile; round_compile is newer than the steps' compile and not measured on every model
        and weight format), this and every later round run their steps compiled one by one, with a warning that names
        the error; an error the steps raise too is raised."""
        if self._round != self._forward_round:  # (compiled whole)
            try:
                return self._round(r)
            except Exception as err:  # (a compiler's error has no one type)
                self._round = self._forward_round
                warnings.warn(f"compiling a round graph's whole forward failed ({type(err).__name__}: {err}); its "
                              "steps are compiled one by one instead (as with DSV3_KERNELS=round_compile=off)",
                              stacklevel=2)
        return self._forward_round(r)

    def _attention(self):
        """The attention of a new bucket's steps: None (the gathered context's einsums) or kernels.mla_decode on
        its accelerated backend for the cache."""
        backend = kernels.select_backend("mla_decode", self.cache.kv)
        return None if backend == "reference" else functools.partial(kernels.mla_decode, backend=backend)

    def _entry(self, kind: tuple, Bp: int, T: int, nblk: int | tuple[int, ...]) -> "_Entry":
        key = (kind, Bp, T, nblk)
        if key in self._entries:
            return self._entries[key]
        if kind[0] == "round":  # nblk: each forward's blocks (verification and MTP 0, then the chained steps)
            r = _Round(self, kind[1], Bp, nblk, kind[2], kind[3])
            sb = r.sb

            def step(_sb: StaticBatch, r: _Round = r):
                return self._run_round(r)
        else:
            is_mtp = kind[0] == "mtp"
            sb = StaticBatch(self.cache, Bp, T, nblk, self.pad_block, self._attention(),
                             hidden_dim=self.model.config.hidden_size if is_mtp else None)
            step = functools.partial(self._mtp, module=kind[1]) if is_mtp else self._main
        e = _Entry(sb, torch.empty(Bp, 1 + T + sb.nblk, dtype=torch.long, pin_memory=self.use_graphs), step)
        if self.use_graphs:
            # warm up on a side stream (lazy inits, autotuning) then capture; padding rows only touch
            # the pad block, so neither pass disturbs a sequence's cache
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    e.step(sb)
            torch.cuda.current_stream().wait_stream(stream)
            e.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(e.graph, pool=self._pool):
                e.outputs = e.step(sb)
            self._pool = e.graph.pool()
            self.captures += 1
        if self.bucketed:  # (exact shapes take any (B, nblk): keeping each would grow without bound)
            self._entries[key] = e
        return e

    def _launch(self, kind: tuple, B: int, T: int, last_pos: int | tuple[int, ...], tokens, pos0, tables, fill=None):
        """Fill a bucket's meta (host: tokens and pos0 where given as lists, the block tables), let `fill(sb)`
        copy device inputs in, run. last_pos: the furthest position any row may write (host bound); a round's:
        one per forward, each of which gets the context bucket of its own (`_Round`)."""
        with kernel_backend.row_limits(self.row_limit):  # (a bucket's first run captures or compiles inside)
            return self._launch_rows(kind, B, T, last_pos, tokens, pos0, tables, fill)

    def _launch_rows(self, kind: tuple, B: int, T: int, last_pos: int | tuple[int, ...], tokens, pos0, tables, fill):
        nblks = []
        for lp in last_pos if isinstance(last_pos, tuple) else (last_pos,):
            Bp, nb = self.bucket(B, lp // self.cache.block_size + 1)
            if nb * self.cache.block_size <= lp:
                raise ValueError(f"position {lp} is past the longest context bucket ({self.max_blocks} blocks)")
            nblks.append(nb)
        e = self._entry(kind, Bp, T, tuple(nblks) if isinstance(last_pos, tuple) else nblks[0])
        sb = e.sb
        nblk = sb.nblk
        if e.copied is not None:
            e.copied.synchronize()  # this bucket's previous copy out of its pinned buffer is done
        h = e.host.numpy()
        h[:, : 1 + T] = 0
        h[:, 1 + T:] = self.pad_block
        if pos0 is not None:
            h[:B, 0] = pos0
        if tokens is not None:
            h[:B, 1: 1 + T] = tokens
        for b, tbl in enumerate(tables):
            n = min(len(tbl), nblk)
            h[b, 1 + T: 1 + T + n] = tbl[:n]
        sb.meta.copy_(e.host, non_blocking=True)
        if self.use_graphs:
            e.copied = torch.cuda.Event()
            e.copied.record()
        if fill is not None:
            fill(sb)
        if e.graph is None:
            outputs = e.step(sb)
        else:
            e.graph.replay()
            outputs = e.outputs
        return tuple(o[:B] for o in outputs)

    # --- the steps ---------------------------------------------------------------------------------
    @torch.no_grad()
    def main(self, tokens: list[list[int]] | torch.Tensor, pos0: list[int] | torch.Tensor, tables: list[list[int]],
             last_pos: int | None = None):
        """The main model over T tokens per sequence (tokens[b], all of length T: host lists, or a (B, T) device
        tensor, e.g. the tokens of a step still running, copied in on the device: the engine's overlapped decoding)
        at positions pos0[b] .. pos0[b] + T - 1 (pos0 a host list, or a (B,) device tensor, then last_pos, a host
        bound on pos0 + T - 1, is required), with block tables covering them -> logits (B, T, V), hidden (B, T, D),
        and the inputs as device tensors, tokens (B, T) and pos0 (B,) (views valid until this bucket runs again)."""
        B, T, last_pos, host_tokens, host_pos, fill = self._inputs(tokens, pos0, last_pos)
        logits, hidden, ids, pos = self._launch(("main",), B, T, last_pos, host_tokens, host_pos, tables, fill)
        return logits, hidden, ids, pos

    @torch.no_grad()
    def round(self, k: int, tokens: list[list[int]] | torch.Tensor, pos0: list[int] | torch.Tensor,
              tables: list[list[int]], last_pos: int | None = None, sampler: BatchSampler | None = None,
              q: torch.Tensor | None = None):
        """A speculation round (speculation.py's accept and draft) in one graph: tokens (B, k+1) [x_L, d_1 .. d_k],
        pos0 and last_pos as `main` takes them -> tokens (B, k+1) (the round's are tokens[b, :n[b]]), n (B,), the
        new drafts (B, k), the next round's first positions pos0 + n (B,), and the results' rows (`result_rows`:
        tokens, n, drafts). Each forward runs in the bucket its own step would (verification and MTP module 0 up to
        last_pos, chained draft j up to last_pos + j), so the tokens are those of `main` + `mtp` + the chained steps
        run one by one. k = 0: a one-token step -> (tokens (B, 1),).

        Greedy (sampler None or all_greedy): argmax. Else the batch's sampler (no repetition penalty: that takes
        the steps one by one), its rows copied into the round's static ones (a graph per set of filters it
        applies), q (B, k, V) the verified drafts' distributions; the new drafts' distributions (B, k, V) come last
        in the outputs (k >= 1). Where some row of the sampler asks for log-probabilities, the results' rows carry
        those of every verified position (the sampler's logprobs_n most likely tokens': a graph with them and one
        without), and a one-token step returns (tokens, rows)."""
        if k < 0:
            raise ValueError(f"a round's k (drafts a sequence) must be >= 0, got {k}")
        B, T, last_pos, host_tokens, host_pos, fill = self._inputs(tokens, pos0, last_pos)
        if T != k + 1:
            raise ValueError(f"a round of k = {k} verifies k + 1 = {k + 1} tokens a sequence, got {T}")
        # (verification and MTP 0, then chained drafts 1 .. k-1)
        lasts = tuple(last_pos + j for j in range(max(k, 1)))
        if sampler is not None and sampler.present is not None:
            raise ValueError("a round graph samples without repetition penalties")
        nt = None if sampler is None else sampler.logprobs_n  # (one count for every request: BatchSampler)
        if sampler is None or sampler.all_greedy:
            return self._launch(("round", k, None, nt), B, T, lasts, host_tokens, host_pos, tables, fill)
        if k and (q is None or tuple(q.shape) != (B, k, self.model.config.vocab_size)):
            raise ValueError(f"a sampled round of k = {k} needs the drafts' distributions q ({B}, {k}, V)")

        def fill_sampled(sb: StaticBatch) -> None:
            if fill is not None:
                fill(sb)
            sb.round.rows[:B].copy_(sampler.rows)
            if k:
                sb.round.q[:B].copy_(q)

        return self._launch(("round", k, sampler.filters, nt), B, T, lasts, host_tokens, host_pos, tables,
                            fill_sampled)

    def _inputs(self, tokens, pos0, last_pos):
        """`main`'s and `round`'s inputs -> B, T, last_pos, the tokens and pos0 for the host meta (None where they
        come from the device), and the fill that copies the device ones in (None if none)."""
        on_device = isinstance(tokens, torch.Tensor)
        host_pos = not isinstance(pos0, torch.Tensor)
        B, T = tuple(tokens.shape) if on_device else (len(tokens), len(tokens[0]))
        if last_pos is None:
            if not host_pos:
                raise ValueError("a device pos0 needs last_pos, a host bound on the positions")
            last_pos = max(pos0) + T - 1

        def fill(sb: StaticBatch) -> None:  # over the meta just copied in (stream order)
            if on_device:
                sb.ids[:B].copy_(tokens)
            if not host_pos:
                sb.pos0[:B].copy_(pos0)

        return (B, T, last_pos, None if on_device else tokens, pos0 if host_pos else None,
                fill if on_device or not host_pos else None)

    @torch.no_grad()
    def mtp(self, module: int, tokens: torch.Tensor, hidden: torch.Tensor, pos0: list[int] | torch.Tensor,
            tables: list[list[int]], select: torch.Tensor | None = None, last_pos: int | None = None):
        """MTP module `module` over T positions per sequence: tokens (B, T) the token after each position,
        hidden (B, T, D) the previous depth's hidden state there (device tensors), pos0 (B,) as a host list
        or a device tensor (then last_pos, a host bound on pos0 + T - 1, is required); select (B,) the
        position whose output to return (default 0) -> hidden (B, D), logits (B, V)."""
        B, T = tokens.shape
        host_pos = not isinstance(pos0, torch.Tensor)
        if last_pos is None:
            if not host_pos:
                raise ValueError("a device pos0 needs last_pos, a host bound on the positions")
            last_pos = max(pos0) + T - 1

        def fill(sb: StaticBatch) -> None:
            sb.ids[:B].copy_(tokens)
            sb.hidden[:B].copy_(hidden)
            sb.hidden[B:].zero_()
            if select is None:
                sb.select.zero_()
            else:
                sb.select[:B].copy_(select)
                sb.select[B:].zero_()
            if not host_pos:
                sb.pos0[:B].copy_(pos0)

        return self._launch(("mtp", module), B, T, last_pos, None, pos0 if host_pos else None, tables, fill)
