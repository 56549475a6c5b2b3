"""Token sampling: the engine's only sampler. Every choice happens on the device, without a host sync.

`filter_logits` and `sample` are the per-call functions (scalar parameters; the naive reference
generator uses them). `BatchSampler` is what the engine uses: one per batch and step, holding each
row's parameters as tensors, so that a whole batch of requests with different temperatures,
top-k/top-p/min-p, repetition penalties, seeds and log-probability counts is processed by a fixed
number of batched tensor ops:

    probs(logits (B, T, V), extra (B, T-1))  the processed next-token distributions; position j sees
                                             the request's history plus extra[:, :j] (the drafts
                                             before it) for the repetition penalty
    draw(w (B, V), slot)                     one token per row from weights w (need not be normalised)
    uniform(n, slot)                         (B, n) uniforms (speculative acceptance): slot `slot` of
                                             the phase (below), indices 0 .. n-1
    logprobs(logits, tokens)                 the raw model's log-probabilities of the chosen tokens
                                             and its n most likely tokens (`token_logprobs`; n the
                                             most a request may ask for)

Draws use the exponential race, argmax(w / Exp(1)) — the algorithm of torch.multinomial(w, 1) without
its validity checks, which read values back to the host. The random numbers are a counter-based hash
(`random_bits`): each row's come from its request's 32-bit seed (the one asked for, else one drawn from
torch's default CPU generator when the request is added), the phase counter (the request's final
prefill chunk is phase 0, each decode round the next) and the slot within the phase (speculation.py:
k uniforms, then the correction's draw, then one draw per draft), hashed with the token index for a
draw over the vocabulary. They are pure tensor functions of per-row keys, so a request's tokens do not
depend on what it is batched with, a CUDA graph replays them (per-request torch generators cannot be
captured), and a graphed round gives the tokens of the eager one. (vLLM's Triton sampling kernels key
Philox the same way, tl.rand(seed + position, offset); a plain integer hash runs as tensor ops on any
device, the CPU reference included.)
Greedy (temperature < 1e-5, vLLM's eps: logits divided by a tinier temperature overflow fp32) is the
one-hot distribution of the argmax, so greedy and sampled rows share every formula; a batch of greedy
rows without a repetition penalty (`all_greedy`) skips the distributions altogether and uses argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv3.inference.params import LOGPROBS_MAX, SamplingParams
from dsv3.kernels import backend as kernel_backend

GREEDY_EPS = 1e-5


# Vocabulary-wide argmax in two passes on CUDA: torch's single-pass argmax over one 102,400-wide row runs as one
# reduction kernel of 26 us at batch 1 (`reduce_kernel<512, 1, ArgMaxOps>`, bench/profile_gpu.py --decode 1 on the
# H200, 2026-12-05: ~1% of a 16b decode step); a max over ARGMAX_CHUNK-wide groups spreads the row over the SMs. Not
# timed apart yet: on an H100 the argmax and the results' copy after a graph replay took 0.077 ms in two passes and
# 0.080 in one (bench/decode_gpu.py's gap line, 2026-12-05), the same within that run's spread.
ARGMAX_CHUNK = 1024
ARGMAX_MIN = 16384  # narrower rows (and any CPU tensor) take torch.argmax


def argmax(x: torch.Tensor, two_pass: bool | None = None) -> torch.Tensor:
    """x.argmax(-1), the same indices (the first of tied maxima; the first NaN) in two passes on wide CUDA rows
    (two_pass None; True / False force either, tests): each ARGMAX_CHUNK-wide group's max and its first index,
    then the first group holding the row's max. The tail past the last whole group is padded with -inf (never
    chosen before a real element: a row of only -inf gives 0 as argmax does)."""
    V = x.shape[-1]
    if not (two_pass if two_pass is not None else x.is_cuda and V >= ARGMAX_MIN) or V == 0:
        return x.argmax(-1)
    pad = -V % ARGMAX_CHUNK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=float("-inf"))
    vals, idx = x.unflatten(-1, (-1, ARGMAX_CHUNK)).max(-1)  # (..., G): each group's max, its first index
    g = vals.argmax(-1, keepdim=True)  # the first group holding the max (NaN: the first group with a NaN)
    return (idx.gather(-1, g) + g * ARGMAX_CHUNK).squeeze(-1)


def filter_logits(logits: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """logits (..., V) fp32 -> logits with the excluded tokens at -inf. top_k, top_p, min_p: numbers,
    or per-row tensors broadcastable to (..., 1) (0 / 1.0 / 0.0 switch a row's filter off)."""
    V = logits.shape[-1]
    if isinstance(top_k, torch.Tensor):
        k = top_k.clamp(1, V).to(torch.long).expand(*logits.shape[:-1], 1)
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)
        logits = logits.masked_fill((logits < kth) & (top_k > 0) & (top_k < V), float("-inf"))
    elif top_k and top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if isinstance(min_p, torch.Tensor) or min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        p_sorted = sorted_logits.softmax(-1)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[..., 0] = False  # never the most likely token (a top_p that rounds to 0 in fp32 would drop all)
        if isinstance(top_p, torch.Tensor):
            drop &= top_p < 1.0  # (a cumulative sum that rounds past 1 must not cut an unfiltered row)
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). A temperature below GREEDY_EPS is greedy, as in the engine's sampler (a tiny
    positive one divided the logits into inf and the softmax into NaN)."""
    logits = logits.float()
    if temperature < GREEDY_EPS:
        return argmax(logits)
    logits = filter_logits(logits / temperature, top_k, top_p, min_p)
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return argmax(probs / noise)


def penalize(logits: torch.Tensor, present: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """The CTRL repetition penalty: logits of tokens already seen (present, bool, same shape) divided
    by the penalty where positive, multiplied where negative. penalty broadcastable to (..., 1)."""
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, pen, logits)


# The random numbers (module docstring): a 32-bit integer hash, Thomas Mueller's (0x45d9f3b: each round's product
# stays below 2^59, so int64 tensor arithmetic never overflows on any device and Python ints give the same values).
M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B
_GOLDEN = 0x9E3779B9  # (spreads the slot and index counters before they meet a key)


def hash32(x):
    """A bijective mix of 32-bit values: a Python int, or an int64 tensor of values in [0, 2^32), -> the same."""
    x = ((x >> 16) ^ x) * _MIX & M32
    x = ((x >> 16) ^ x) * _MIX & M32
    return (x >> 16) ^ x


def request_seed(seed: int) -> int:
    """A request's seed (any int, SamplingParams.seed) -> its 32-bit seed: both halves of its 64 bits hashed in."""
    s = seed & (2 ** 64 - 1)
    return hash32((s & M32) ^ hash32(s >> 32))


def phase_key(seed32: int, phase: int) -> int:
    """The key of a request's sampling phase `phase` (0: its final prefill chunk, then one per decode round)."""
    return hash32(hash32(seed32) ^ (phase * _GOLDEN & M32))


def random_bits(keys: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """keys (B,) int64 (phase keys) -> (B, n) int64 in [0, 2^32): the random numbers of slot `slot` of each row's
    phase, index 0 .. n-1 (a draw over a vocabulary of n: one per token)."""
    base = hash32(keys ^ hash32((slot + 1) * _GOLDEN & M32))[:, None]  # (B, 1)
    # (n,): the `& M32` before the product is a no-op that keeps torch.compile from folding arange * _GOLDEN into
    # an index expression, which Inductor (torch 2.11, CUDA) emits with 32-bit index arithmetic: a Triton compile
    # error ("Scalar 2654435769 is out of range for type int32"), measured on an H200 (2026-12-06)
    idx = (torch.arange(n, device=keys.device) & M32) * _GOLDEN & M32
    return hash32(base ^ idx)  # (one round over (B, n): each elementwise op is a kernel on the eager path)


def uniforms(bits: torch.Tensor, open_low: bool = False) -> torch.Tensor:
    """random_bits -> fp32 uniforms from their top 24 bits: in [0, 1), or (0, 1) with open_low (for a log): each
    24-bit value's bin centre, the top bin's at its lower edge 1 - 2^-24 (its centre, 2^24 - 0.5, rounds to 2^24 in
    fp32: u = 1, whose -log is -0.0, would score -inf in the race and never win where it should almost surely; the
    Triton race kernel and the reference parted on it in its first GPU run, on an H200, 2026-12-06)."""
    if not open_low:
        return (bits >> 8).float() * 2.0 ** -24
    return (((bits >> 8).float() + 0.5) * 2.0 ** -24).clamp_max(1.0 - 2.0 ** -24)


# columns of BatchSampler.rows
_GREEDY, _TEMP, _TOPK, _TOPP, _MINP, _PENALTY, _KEY = range(7)


def race_ref(w: torch.Tensor, keys: torch.Tensor, slot: int) -> torch.Tensor:
    """The exponential race: w (B, V) non-negative weights, keys (B,) int64 phase keys -> (B,) int64, argmax over V
    of w / Exp(1) with slot `slot`'s random numbers (the reference of kernels/race_triton.py's hashed_race)."""
    e = -torch.log(uniforms(random_bits(keys, slot, w.shape[-1]), open_low=True))  # (B, V) Exp(1)
    return argmax(w / e)


def param_row(p: SamplingParams, key: int) -> list[float]:
    """One row of BatchSampler.rows: a request's parameters and its phase key (a greedy row's temperature is 1: it
    takes the one-hot distribution, and must not divide the logits by 0)."""
    g = p.temperature < GREEDY_EPS
    return [float(g), 1.0 if g else p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, float(key)]


class BatchSampler:
    """Sampling state of one batch for one step (module docstring). `histories[b]`: the tokens request b
    has seen (prompt + output), needed only when some row has a repetition penalty; keys[b]: row b's phase key
    (`phase_key`; ignored for greedy rows).

    Every row's parameters live in `rows` (B, 7) float64 on the device (one host -> device copy; a key < 2^32
    is exact in it), read by the properties below where a distribution needs them: `over` builds a sampler on a
    CUDA graph's static rows, refilled before each replay."""

    def __init__(self, params: Sequence[SamplingParams], keys: Sequence[int], histories: Sequence[Sequence[int]],
                 vocab_size: int, device: torch.device):
        self.B, self.V, self.device = len(params), vocab_size, device
        greedy = [p.temperature < GREEDY_EPS for p in params]
        pens = [p.repetition_penalty for p in params]
        self.all_greedy = all(greedy) and all(x == 1.0 for x in pens)
        # None: no row wants log-probabilities; else how many of the most likely tokens' every row gets: the most a
        # request may ask (within V), whatever the rows ask (each request keeps its own count), so that a request's
        # numbers do not depend on what it is batched with (torch.topk orders tied values differently for different
        # counts) and a round graph (graphs.py) serves every count
        self.logprobs_n = None if all(p.logprobs is None for p in params) else min(LOGPROBS_MAX, vocab_size)
        self.present = None  # (B, V) bool: tokens in each row's history, where a penalty is used
        # which filters some row uses (the others are skipped: their sorts cost the most)
        self.filters = (any(p.top_k for p in params), any(p.top_p < 1 for p in params),
                        any(p.min_p > 0 for p in params))
        if self.all_greedy:
            return
        rows_t = torch.tensor([param_row(p, key) for p, key in zip(params, keys)], dtype=torch.float64)
        if torch.device(device).type == "cuda":  # pinned, without blocking: a pageable copy would wait for the step
            rows_t = rows_t.pin_memory()  # still running (the engine's overlapped decoding queues steps ahead)
        self.rows = rows_t.to(device, non_blocking=True)
        if any(x != 1.0 for x in pens):
            L = max(1, max(len(h) for h in histories))
            ids = torch.zeros(self.B, L, dtype=torch.long)
            valid = torch.zeros(self.B, L, dtype=torch.bool)
            for b, h in enumerate(histories):
                if pens[b] != 1.0 and h:
                    ids[b, : len(h)] = torch.tensor(list(h), dtype=torch.long)
                    valid[b, : len(h)] = True
            self.present = torch.zeros(self.B, vocab_size, dtype=torch.bool, device=device)
            self.add_history(ids.to(device), valid.to(device))

    @classmethod
    def over(cls, rows: torch.Tensor, filters: tuple[bool, bool, bool], vocab_size: int) -> "BatchSampler":
        """A sampler reading its parameters from `rows` (B, 7) float64 (a graph's static buffer): no repetition
        penalty, no log-probabilities; filters: which of top-k, top-p, min-p to apply."""
        s = cls.__new__(cls)
        s.B, s.V, s.device, s.rows, s.filters = rows.shape[0], vocab_size, rows.device, rows, tuple(filters)
        s.all_greedy, s.logprobs_n, s.present = False, None, None
        return s

    # --- the rows' columns, (B, 1, 1) against (B, T, V) (read where used: a graph recomputes them each replay) --
    def _col(self, c: int) -> torch.Tensor:
        return self.rows[:, c].view(self.B, 1, 1)

    @property
    def greedy(self) -> torch.Tensor:
        return self._col(_GREEDY) > 0

    @property
    def temperature(self) -> torch.Tensor:
        return self._col(_TEMP).float()

    @property
    def top_k(self):
        return self._col(_TOPK).long() if self.filters[0] else 0

    @property
    def top_p(self):
        return self._col(_TOPP).float() if self.filters[1] else 1.0

    @property
    def min_p(self):
        return self._col(_MINP).float() if self.filters[2] else 0.0

    @property
    def penalty(self) -> torch.Tensor:
        return self._col(_PENALTY).float()

    @property
    def keys(self) -> torch.Tensor:
        """(B,) int64: each row's phase key."""
        return self.rows[:, _KEY].long()

    # --- distributions --------------------------------------------------------------------------
    def add_history(self, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Mark tokens (B, n) where valid (B, n) as seen (after they are accepted)."""
        if self.present is None:
            return
        hits = torch.zeros(self.B, self.V, device=self.device).scatter_add_(1, tokens, valid.float())
        self.present |= hits > 0

    def probs(self, logits: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, T, V) -> processed distributions (B, T, V) fp32; position j's history includes
        extra[:, :j] (extra (B, T - 1): the drafts verified at positions 0 .. T-2)."""
        x = logits.float()
        B, T, V = x.shape
        if self.present is not None:
            present = self.present[:, None].expand(B, T, V)
            if T > 1 and extra is not None:
                present = present.clone()
                for j in range(1, T):  # draft j-1 is history from position j on
                    present[:, j:].scatter_(2, extra[:, j - 1].view(B, 1, 1).expand(B, T - j, 1), True)
            x = penalize(x, present, self.penalty)
        one_hot = torch.zeros_like(x).scatter_(-1, argmax(x).unsqueeze(-1), 1.0)
        p = filter_logits(x / self.temperature, self.top_k, self.top_p, self.min_p).softmax(-1)
        return torch.where(self.greedy, one_hot, p)

    # --- random numbers (module docstring; the slots of a phase: speculation.py) ----------------------
    def uniform(self, n: int, slot: int) -> torch.Tensor:
        """(B, n) uniforms in [0, 1): slot `slot` of each row's phase."""
        return uniforms(random_bits(self.keys, slot, n))

    def draw(self, w: torch.Tensor, slot: int) -> torch.Tensor:
        """w (B, V) non-negative weights, not all zero per row -> one token per row (B,), on the device: the
        exponential race with slot `slot`'s random numbers (`race_ref`; on a GPU, where kernels/backend.py chooses
        "hashed_race", the same in one Triton launch: kernels/race_triton.py). Under torch.compile the reference,
        whatever the choice: inductor fuses it into one reduction, as fast as the kernel at V = 32,768 and faster at
        102,400 and 129,280 (0.054 / 0.064 ms against 0.083 / 0.098 at batch 1 on an H200, bench/sampler_speed.py,
        2026-12-06), where the kernel takes 0.26-0.44 ms of eager draws down to 0.05-0.10."""
        if not torch.compiler.is_compiling() and kernel_backend.select("hashed_race", w) == "triton":
            from dsv3.kernels.race_triton import hashed_race
            return hashed_race(w, self.rows[:, _KEY], slot)  # (the key column read as it is: float64 integers)
        return race_ref(w, self.keys, slot)

    def choose(self, logits: torch.Tensor, slot: int, extra: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, V) -> (token (B,), its processed distribution (B, V), None when all_greedy)."""
        if self.all_greedy:
            return argmax(logits), None
        p = self.probs(logits[:, None], extra)[:, 0]
        return self.draw(p, slot), p

    # --- log-probabilities ----------------------------------------------------------------------
    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The raw model distribution's log-probabilities: logits (B, T, V), chosen tokens (B, T) ->
        (chosen (B, T), top ids (B, T, n), top values (B, T, n)) with n = logprobs_n; None if no row asked."""
        return None if self.logprobs_n is None else token_logprobs(logits, tokens, self.logprobs_n)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw model distribution's log-probabilities: logits (B, T, V), chosen tokens (B, T) -> (chosen (B, T), the
    min(n, V) most likely tokens' ids (B, T, n) and values (B, T, n), most likely first)."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(min(n, lp.shape[-1]), dim=-1)
    return lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), top.indices, top.values
