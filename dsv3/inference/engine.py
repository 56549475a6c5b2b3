"""Generation engine: continuous batching over a paged latent KV cache, with optional MTP
self-speculative decoding. This module schedules and keeps the books; the jobs are elsewhere:

    graphs.py        the decode forwards at fixed shapes (CUDA graphs on a GPU, eager otherwise)
    speculation.py   verify / accept / draft, batched on the device
    sampling.py      the only sampler: per-request logit processing, the sync-free draw, log-probs
    textstream.py    stop strings and streaming text deltas

Requests join and leave the running batch between steps. One `step()`:
  1. admits queued requests in arrival order while the batch has room and the cache pool has the
     blocks for the request's whole budget (prompt + max_new_tokens + draft room). Reserving the
     worst case up front means a running request can never run out of cache: no preemption, no
     out-of-memory under load; the price is memory held for tokens a request may not generate;
  2. prefills prompt chunks (one batched forward): the prompts still being prefilled, then the admitted
     requests, within `max_prefill_tokens` padded tokens per step, a longer prompt split over several steps
     (chunked prefill, as vLLM and SGLang: a long prompt neither stalls the running requests' decoding nor
     needs activations for its whole length at once). A chunk after cached positions attends over them
     (MLA.forward_chunk). At a prompt's last chunk, the last position's logits give the request its first token;
     with speculation, MTP module 0 over each chunk fills its cache and, at the last chunk, gives the first
     drafts. A request joins the decoding batch after its last chunk;
  3. decodes every other running request: one round of speculation.py over [last token, drafts...]
     (k = 0: the last token alone), through the static-shape steps of graphs.py.
Each phase ends with one device -> host copy (tokens, accepted counts, drafts, log-probs); the host
then appends tokens, applies stop tokens, stop strings and length limits (which may cut a round's
accepted tokens short), and frees finished requests' blocks.

Overlapped decoding (`overlap`, on by default; vLLM's async scheduling, SGLang's overlap scheduler): while the
batch stays the same, a step queues the next decode step on the device first, its input tokens taken from the
step before's device output, and only then waits for that step's results and keeps the books, so in a steady
decode batch the device does not idle while the host works (at batch 1 the host's part of a step is otherwise a
gap in the device's work). Steps that prefill (whose first tokens are read at once) and steps where the batch
changes still wait. The results of a step reach the caller one `step()` later. A request that a step ends (stop
token, stop string) already has one more step queued: its result is discarded (the cache positions it wrote belong
to the ended request). Whenever the batch changes (a request joins, ends by its length limit or is aborted) the
step in flight is read first, as without overlap. With speculation the next round is queued the same way: its
input (the round's last token and new drafts) and positions (advanced by the accepted counts) come from the
round in flight's device tensors, the host bounding the positions by k + 1 more (the context bucket); a round is
queued only while the one in flight cannot end a request by length (len(out) + k + 1 < max_new_tokens), so every
position it writes lies in the request's blocks. Off (each step read at once) with a repetition penalty (its
history is built on the host) and in multi-rank lockstep. Measured on an H100 (16b, batch 1, graphs + compile,
bench/decode_gpu.py, 2026-12-05): 323.8 -> 364.8 tok/s, the step's time beyond the GPU's 0.31 -> 0.04 ms.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dsv3 import kernels
from dsv3.cliargs import setting
from dsv3.inference import speculation
from dsv3.inference.cache import PagedLatentCache
from dsv3.inference.graphs import DecodeGraphs, result_rows
from dsv3.inference.params import SamplingParams  # noqa: F401 (re-exported: engine.SamplingParams)
from dsv3.inference.sampling import BatchSampler, phase_key, request_seed
from dsv3.inference.textstream import TextStream
from dsv3.kernels import backend as kernel_backend
from dsv3.model.loads import ExpertLoadRecorder
from dsv3.model.mla import MLA


@dataclass
class EngineConfig:
    """How `load_engine(checkpoint, **vars(cfg))` builds the engine; the fields are also flags of `dsv3
    serve` (all) and `dsv3 generate/sample/chat` (device, speculative_k). 0 leaves a size to the engine."""
    device: str = setting("auto", "auto | cpu | cuda")
    max_batch_size: int = setting(32, "requests decoded together")
    cache_tokens: int = setting(0, "KV-cache budget in tokens (0: batch size x min(context, 4096); with --ep on "
                                   "GPUs: what each GPU holds after its weights, by dsv3 plan --serve's formula)")
    speculative_k: int = setting(0, "tokens drafted per step by the MTP module (0: off)")
    max_model_len: int = setting(0, "context limit (0: the model's)")
    max_prefill_tokens: int = setting(8192, "prompt tokens prefilled per step, padding included; a longer prompt is "
                                            "prefilled over several steps, between decode steps (chunked prefill); "
                                            "0: whole prompts at once")
    compile_decode: bool = setting(False, "GPU: torch.compile the graphed decode steps (1.65x at batch 1 on the "
                                          "16b, H100); one compile per batch/context bucket on first use")
    cuda_graphs: str = setting("auto", "decode steps as CUDA graphs: auto (on for a bf16/FP8 model on one GPU; off "
                                       "under --ep, where graph capture is not yet measured on GPUs), on, off",
                               choices=("auto", "on", "off"))
    batch_invariant: bool = setting(False, "GPU: the batch-invariant mode (dsv3/kernels/invariant.py): a request's "
                                           "tokens and log-probabilities the same bits whatever else is batched "
                                           "with it, so served outputs equal offline generation; slower; no "
                                           "--compile-decode; an FP8 checkpoint is dequantised to bf16")
    overlap: bool = setting(True, "read each decode step's results before queueing the next (overlapped decoding, "
                                  "the default, queues the next step first while the batch stays the same)")
    record_expert_loads: str | None = setting(None, "count the tokens routed to each expert of each MoE block "
                                                    "(GET /expert_loads shows them) and write them (MoE blocks x "
                                                    "experts, .pt or .npy) to FILE when the server stops: the loads "
                                                    "--expert-loads places experts from",
                                              metavar="FILE")
    ep: int = setting(1, "expert parallelism under torchrun: the routed experts split over this many ranks "
                         "(= the world size; rank 0 serves, dsv3/ep_serve.py); 1: one process")
    expert_loads: str | None = setting(None, "with --ep: recorded per-expert token counts (.pt or .npy, MoE blocks x "
                                             "experts) from which the experts are placed over the ranks "
                                             "(dsv3/inference/eplb.py)", metavar="FILE")
    redundant_experts: int = setting(0, "with --expert-loads or --eplb-interval: extra copies of the most loaded "
                                        "experts (a multiple of --ep), each hot expert's tokens split over its copies")
    eplb_interval: int = setting(0, "with --redundant-experts: every this many engine steps, re-place the experts "
                                    "from the load routed since the last placement (online EPLB; experts that move "
                                    "are read from the checkpoint); 0: the placement stays")
    attn_tp: int = setting(1, "with --ep: attention, dense FFNs and shared experts tensor-parallel over groups of "
                              "this many ranks (each 1/T of the heads and FFN widths): = --ep, or smaller with "
                              "--dp-attention (each group its own requests); 1: replicated on every rank")
    dp_attention: bool = setting(False, "with --ep: each rank holds, prefills and decodes its own requests (attention "
                                        "data parallelism: --ep times the cache capacity, attention split over the "
                                        "ranks; eager decoding); off: every rank runs every request")


def graphs_setting(value: bool | str | None) -> bool | None:
    """EngineConfig.cuda_graphs ("auto", "on", "off") or Engine's own form (None: auto, True, False) ->
    None / True / False."""
    if value is None or isinstance(value, bool):
        return value
    forms = {"auto": None, "on": True, "off": False}
    if value not in forms:
        raise ValueError(f"cuda_graphs must be auto, on or off, got {value!r}")
    return forms[value]


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position (raw model distribution)


@dataclass
class RequestOutput:
    """What one step produced for one request (streaming), or the whole result when finished."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    token_ids: list[int]  # all generated so far
    text: str  # all generated text so far
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int


@dataclass(eq=False)  # a request is itself: lists of them are searched by identity, not by comparing fields
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float
    out: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    main_len: int = 0  # positions held in the main model's cache
    prefilled: int = 0  # prompt positions prefilled so far (chunked prefill)
    chunk: int = 0  # prompt positions this step's prefill adds
    drafts: list[int] = field(default_factory=list)  # this round's drafts d_1 .. d_k
    draft_q: torch.Tensor | None = None  # (k, V) their distributions on the device (None: drafted by argmax)
    seed32: int = 0  # the request's 32-bit sampling seed (sampling.py: its random numbers)
    phase: int = 0  # sampling phases begun (its final prefill chunk, then one per decode round): the next one's key
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stream: TextStream | None = None
    emitted_tokens: int = 0
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def last(self) -> int:
        """The last token (not yet in the cache), without building `tokens` (O(length) per step)."""
        return self.out[-1] if self.out else self.prompt[-1]


_DISCARDED = SamplingParams(max_new_tokens=1, temperature=0.0)  # the draws of a prompt chunk that is not the last


@dataclass
class _InFlight:
    """A decode step queued on the device whose results the host has not read yet (module docstring)."""
    reqs: list[_Request]
    host: torch.Tensor  # the results as `_results` lays them out, copied to (pinned) host memory without blocking
    done: torch.cuda.Event | None  # recorded after that copy (None: the copy was synchronous)
    tokens: torch.Tensor  # (B, k + 1) the step's tokens on the device: the input of the step after it
    nt: int  # top log-probabilities per position
    q: torch.Tensor | None  # (B, k, V) the new drafts' distributions (sampled speculation), or None
    # with speculation (else None), on the device: the accepted counts (B,) (a column of the host rows then follows
    # the tokens), the new drafts (B, k) and the next round's first position per row (B,) (what overlapped decoding
    # queues the next round on)
    n: torch.Tensor | None = None
    drafts: torch.Tensor | None = None
    next_pos: torch.Tensor | None = None


@dataclass
class EngineStats:
    steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    drafted: int = 0  # k per verification round
    accepted: int = 0  # drafts accepted (before stop tokens or length limits cut a round short)
    first_draft_accepted: int = 0
    rounds: int = 0  # verification rounds (one per decoding request and step)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (vLLM's draft acceptance rate)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def first_draft_acceptance(self) -> float:
        """Acceptance of the first drafted token (the paper's "second token" acceptance, §5.4.3)."""
        return self.first_draft_accepted / self.rounds if self.rounds else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verification round (accepted drafts + the corrected/bonus token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else float("nan")


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 32, cache_tokens: int | None = None,
                 block_size: int = 16, speculative_k: int = 0, max_model_len: int | None = None,
                 cuda_graphs: bool | str | None = None, compile_decode: bool = False, max_prefill_tokens: int = 8192,
                 record_expert_loads: bool = False, overlap: bool = True, batch_invariant: bool = False):
        cfg = model.config
        if speculative_k > 0 and cfg.num_nextn_predict_layers == 0:
            raise ValueError("speculative decoding needs MTP modules, but this model has num_nextn_predict_layers=0")
        if speculative_k < 0:
            raise ValueError(f"speculative_k must be >= 0, got {speculative_k}")
        # (cache_tokens and max_model_len: 0 or None leave them to the engine, as EngineConfig's 0 does)
        for name, v, low in (("max_batch_size", max_batch_size, 1), ("block_size", block_size, 1),
                             ("cache_tokens", cache_tokens, 0), ("max_model_len", max_model_len, 0),
                             ("max_prefill_tokens", max_prefill_tokens, 0)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {low}, got {v!r}")
        self.model = model.eval()
        self.tok = tokenizer
        self.k = speculative_k
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens or 0  # 0: no limit
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        # positions a request may write past prompt + max_new_tokens: verification writes k past the
        # last token, chained drafts up to 2k - 1 past it (speculation.py); k = 0 writes the last token
        self.spare = max(self.k + 1, 2 * self.k - 2)
        # room for max_batch_size requests of the full context, each in whole blocks (as admission takes them)
        per_request = -(-(min(self.max_model_len, 4096) + self.spare) // block_size) * block_size
        cache_tokens = cache_tokens or max_batch_size * per_request
        num_blocks = -(-cache_tokens // block_size)
        # cuda_graphs (None: on for a bf16 CUDA model): the decode steps (graphs.py) are bucketed to
        # powers of two and, on CUDA, captured as graphs (one replay per step); True on the CPU runs the
        # bucketed steps eagerly (how the tests check them); False runs them eagerly at exact shapes.
        # Prefill is eager. A graph holds only sync-free code: the grouped-GEMM experts (bf16 or FP8
        # on CUDA), not the per-expert loop.
        p0 = next(model.parameters())
        # FP8 kv_b_proj: W_UK / W_UV dequantised once to the activations' dtype, not in every decode step
        for m in model.modules():
            if isinstance(m, MLA):
                m.cache_absorbed_weights(p0.dtype)
        cuda_graphs = graphs_setting(cuda_graphs)
        use = cuda_graphs if cuda_graphs is not None else (p0.is_cuda and p0.dtype == torch.bfloat16)
        if use and p0.is_cuda and p0.dtype == torch.float32:  # fp32 experts take the per-expert loop (host syncs)
            raise ValueError("cuda_graphs needs a bf16 (or FP8) model on a GPU: an fp32 model's routed experts run "
                             "a per-expert loop that syncs with the host (load it with dtype=torch.bfloat16, or "
                             "cuda_graphs=False)")
        if compile_decode and not use:
            raise ValueError("compile_decode compiles the graphed decode steps, which need a bf16 model on a GPU "
                             "(or cuda_graphs=True)")
        if batch_invariant:
            check_batch_invariant(model, compile_decode)
            kernels.set_batch_invariant(True)  # process-wide, from here on (kernels/invariant.py)
        self.cache = PagedLatentCache.for_model(model, num_blocks + 1, block_size)
        self.device = self.cache.kv.device
        self._pad = pad = self.cache.reserve()  # padding rows and table entries of the static steps (not in num_blocks)
        max_blocks = -(-(self.max_model_len + self.spare + self.k + 1) // block_size)
        # tokens per expert over the engine's life (model/loads.py's ExpertLoadRecorder; made before any graph is
        # captured, so that the graphs count too): the loads `--expert-loads` places redundant experts from
        self.loads = ExpertLoadRecorder(self.model) if record_expert_loads else None
        # with speculation and the "verify_rows" switch on (kernels/backend.py), one sequence's verification step
        # (k + 1 rows) takes the one-row decode kernels; with "round_graph" on (as shipped: speculation rounds, and
        # plain decoding's steps that ask for log-probabilities: backend.LOGPROB_STEPS), a
        # step (a round) of greedy requests (not in lockstep) runs as one graph (graphs.py DecodeGraphs.round), and
        # with "round_sampled" on (as shipped), so does a step (a round, or plain decoding's one-token step) of
        # requests that sample, without repetition penalties; log-probabilities come out of either graph
        self.round_graph = kernel_backend.round_graph(self.k)
        self.round_graph_sampled = kernel_backend.round_sampled()
        self._graphs = DecodeGraphs(self.model, self.cache, pad, max_batch_size, max_blocks, use_graphs=use,
                                    compile=compile_decode, bucketed=use, loads=self.loads,
                                    row_limit=kernel_backend.verify_rows(self.k))
        self.eos = [tokenizer.eos_id] if tokenizer is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else [])
        self.waiting: list[_Request] = []
        self.prefilling: list[_Request] = []  # admitted, their prompts partly in the cache (chunked prefill)
        self.running: list[_Request] = []
        self._aborted: list[RequestOutput] = []  # final outputs of aborted requests, returned by the next step()
        self._ids = itertools.count()
        self.stats = EngineStats()
        # Multi-rank lockstep (dsv3/inference/lockstep.py): None in one process; otherwise a callable that
        # replaces each phase's decisions (the tensor `_to_host` copies: tokens, accepted counts,
        # drafts, log-probs) by rank 0's, so that every rank's host bookkeeping, hence its next batch,
        # is identical even where the ranks' logits differ in the last bit.
        self.agree: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Attention data parallelism (lockstep.py's DPLeader): each rank steps its own requests, and the
        # model's collectives must still meet, so every rank runs the same phases. None in one process;
        # otherwise a callable (has prefill, has decode) -> (any rank has prefill, any rank has decode), and
        # a rank without work in a phase that another rank runs runs it on a throwaway request (`_idle`).
        self.phase_sync: Callable[[bool, bool], tuple[bool, bool]] | None = None
        # Called with the engine at the start of every step, before anything is scheduled (every rank of a
        # lockstep group at the same step): e.g. dsv3/ep_serve.py's Rebalancer, which re-places the experts.
        self.step_hooks: list[Callable[["Engine"], None]] = []
        # overlapped decoding (module docstring): the next decode step is queued before the one in flight is read
        self.overlap = overlap
        self._inflight: _InFlight | None = None

    # --- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = (params or SamplingParams()).validate()
        if isinstance(prompt, str):
            if self.tok is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
            ids = self.tok.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        V = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt token ids must be in [0, {V})")
        bad = [t for t in params.stop_token_ids if not 0 <= t < V]  # (one outside would never match: ignored)
        if bad:
            raise ValueError(f"stop token ids must be in [0, {V}), got {bad[0]}")
        if params.stop and self.tok is None:  # (without one no text is decoded: never matched)
            raise ValueError("stop strings need a tokenizer; pass stop_token_ids instead")
        if len(ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens")
        need = len(ids) + params.max_new_tokens + self.spare
        if self.cache.blocks_for(need) > self.cache.num_blocks:
            raise ValueError(f"this request needs {need} cache tokens; the cache holds "
                             f"{self.cache.num_blocks * self.cache.block_size}")
        live = {r.id for lst in (self.waiting, self.prefilling, self.running) for r in lst}
        if request_id and request_id in live:  # (as vLLM: abort and the outputs go by id)
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        rid = request_id or None
        while rid is None or rid in live:  # a generated id skips one a caller gave
            rid = f"req-{next(self._ids)}"
        r = _Request(rid, ids, params, time.monotonic())
        if self.tok is not None:
            r.stream = TextStream(self.tok, params.stop)
        # unseeded: a seed from torch's default CPU generator (so torch.manual_seed makes a run repeatable)
        r.seed32 = request_seed(params.seed) if params.seed is not None else int(torch.randint(2 ** 32, ()))
        self.waiting.append(r)
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request (e.g. its client disconnected) and free its cache blocks; the next step()
        returns its final output with finish_reason "abort"."""
        for lst in (self.waiting, self.prefilling, self.running):
            for r in lst:
                if r.id == request_id:
                    lst.remove(r)
                    self._finish(r, "abort")
                    self.cache.release(r.blocks)
                    r.blocks = []
                    self._aborted.append(self._output(r))
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self._aborted)

    @property
    def num_running(self) -> int:
        """Requests holding a batch slot: decoding, or with a prompt part-way through a chunked prefill."""
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def expert_loads(self) -> torch.Tensor:
        """Tokens routed to each expert of each MoE block since the engine was built or last reset, (MoE blocks,
        E) int64 on the CPU (main layers, then MTP): every position the model ran for a request (prompt
        chunks, decode tokens, verified drafts, the MTP module's drafting rows); padding and idle steps do
        not count. Needs record_expert_loads=True. One device sync."""
        if self.loads is None:
            raise ValueError("this engine does not record expert loads: build it with record_expert_loads=True "
                             "(dsv3 serve --record-expert-loads FILE)")
        return self.loads.read()

    def reset_expert_loads(self) -> None:
        if self.loads is None:
            raise ValueError("this engine does not record expert loads: build it with record_expert_loads=True")
        self.loads.reset()

    @property
    def graph_captures(self) -> int:
        return self._graphs.captures

    # --- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit, prefill, decode once. Returns an output for every request that changed (and the final
        output, finish_reason "abort", of each request aborted since the last step)."""
        for hook in self.step_hooks:
            hook(self)
        if self.loads is None:
            return self._step()
        with self.loads.recording():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        self.stats.steps += 1
        aborted, self._aborted = self._aborted, []
        chunks = self._schedule_prefill()
        decoding = [r for r in self.running if not r.finished]
        changed: list[_Request] = []
        any_new, any_decoding = (bool(chunks), bool(decoding)) if self.phase_sync is None else \
            self.phase_sync(bool(chunks), bool(decoding))
        if chunks:
            try:
                self._prefill(chunks)
            except BaseException:
                for r in chunks:  # not decoding yet: give their blocks back before failing
                    self.prefilling.remove(r)
                    self.cache.release(r.blocks)
                    r.blocks = []
                    self._finish(r, "abort")
                raise
            done = [r for r in chunks if r.prefilled == len(r.prompt)]
            self.prefilling = [r for r in self.prefilling if r not in done]
            self.running.extend(done)
            changed += done
        elif any_new:
            self._idle(self._prefill)
        if decoding:
            changed += self._decode(decoding)
        elif any_decoding:
            self._idle(self._decode)
        elif self._inflight is not None:  # every request of the step in flight has ended: its results go unread
            self._inflight = None
        outs = aborted + [self._output(r) for r in changed]
        for r in [r for r in self.running if r.finished]:
            self.running.remove(r)
            self.cache.release(r.blocks)
            r.blocks = []
        return outs

    def _schedule_prefill(self) -> list[_Request]:
        """This step's prompt chunks (each request's `chunk` set): first the prompts part-way through their prefill,
        then queued requests admitted in arrival order while the batch has room and the cache the blocks for the
        request's whole budget. The batch is padded to its longest chunk, so B x T stays within max_prefill_tokens
        (0: no limit): a request gets min(its rest, budget / (rows so far + 1)) positions, and no row joins once
        that would be shorter than the longest chunk already taken (a step always prefills something)."""
        P = self.max_prefill_tokens
        chunks: list[_Request] = []
        T = 0

        def take(r: _Request) -> bool:
            nonlocal T
            rest = len(r.prompt) - r.prefilled
            cap = P // (len(chunks) + 1) if P else rest
            if cap < max(T, 1):
                return False
            r.chunk = min(rest, cap)
            T = max(T, r.chunk)
            chunks.append(r)
            return True

        for r in self.prefilling:
            if not take(r):
                return chunks
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size:
            r = self.waiting[0]
            nb = self.cache.blocks_for(len(r.prompt) + r.params.max_new_tokens + self.spare)
            if nb > self.cache.free_blocks or not take(r):
                break  # queue: first come, first served
            self.waiting.pop(0)
            r.blocks = self.cache.allocate(nb)
            self.prefilling.append(r)
        return chunks

    def _idle(self, phase: Callable[[list[_Request]], None]) -> None:
        """Run `phase` (_prefill or _decode) on a throwaway one-token greedy request whose every block is the
        reserved padding block: the same forwards (main model, MTP module, chained drafts) and hence the
        same collectives as a real batch, writing only where padding rows write. Stats are left as they were."""
        saved = dataclasses.asdict(self.stats)
        r = _Request("<idle>", [0], SamplingParams(max_new_tokens=1, temperature=0.0), 0.0)
        r.blocks = [self._pad] * self.cache.blocks_for(2 * self.k + 2)  # every position the round may touch
        r.drafts, r.chunk = [0] * self.k, 1
        phase([r])
        for name, value in saved.items():  # in place: a Leader or the server may hold the stats object
            setattr(self.stats, name, value)

    def _sampler(self, reqs: list[_Request], live: list[bool] | None = None) -> BatchSampler:
        """The batch's sampler for a new phase of its requests (sampling.py: each live row's key is its request's
        next phase); rows with live[b] False (a prompt chunk that is not the last: its draws are thrown away) draw
        greedily and begin no phase, so a request's random numbers are the one-shot prefill's."""
        live = live or [True] * len(reqs)
        params = [r.params if ok else _DISCARDED for r, ok in zip(reqs, live)]
        pen = any(p.repetition_penalty != 1.0 for p in params)
        keys = []
        for r, ok in zip(reqs, live):
            keys.append(phase_key(r.seed32, r.phase) if ok else 0)
            r.phase += ok
        return BatchSampler(params, keys,
                            [r.tokens if pen and ok else () for r, ok in zip(reqs, live)],
                            self.model.config.vocab_size, self.device)

    def _prefill(self, reqs: list[_Request]) -> None:
        """One forward over each request's prompt chunk (positions r.prefilled .. + r.chunk). Every row runs the
        same phases (sampling, the MTP module, the chained drafts), so a batch, and a rank of an expert-parallel
        group, meets the same collectives whichever rows end their prompt; rows that do not are thrown away."""
        B, starts, lens = len(reqs), [r.prefilled for r in reqs], [r.chunk for r in reqs]
        final = [s + n == len(r.prompt) for r, s, n in zip(reqs, starts, lens)]
        T = max(lens)
        ids = torch.zeros(B, T + 1, dtype=torch.long)  # each chunk, then its prompt's next token if any (for MTP)
        for b, r in enumerate(reqs):
            row = r.prompt[starts[b]: starts[b] + lens[b] + 1]
            ids[b, : len(row)] = torch.tensor(row)
        # host -> device inputs first, while the device is idle (a pageable copy waits for the stream)
        sampler = self._sampler(reqs, final)
        ids_all, last = ids.to(self.device), torch.tensor([n - 1 for n in lens]).to(self.device)
        final_d = torch.tensor(final).to(self.device) if self.k else None
        ids_d = ids_all[:, :T]  # (a row's token past its chunk sits in a padding position: never stored or attended)
        cb = self.cache.batch([r.blocks for r in reqs], starts, lens, chunk=True)
        if self.loads is not None:  # the chunks' positions count; padding and an idle step's row do not
            real = (torch.arange(T)[None, :] < torch.tensor(lens)[:, None]) & \
                torch.tensor([r.blocks[0] != self._pad for r in reqs])[:, None]  # (B, T)
            self.loads.rows = real.to(self.device).reshape(-1)
        out = self.model(ids_d, cb.positions, cache=cb, logits_at=last)  # the head only at each chunk's end
        self.stats.prefill_tokens += sum(lens)
        last_logits = out.logits  # (B, 1, V)
        first, _, _ = speculation.accept(sampler, last_logits, ids_d[:, :0], None)  # (B, 1): a round without drafts
        lp = sampler.logprobs(last_logits, first)
        drafts = q = None
        if self.k:
            sampler.add_history(first, torch.ones_like(first, dtype=torch.bool))
            # MTP module 0 over the chunk: at position i the embedding of token i+1 (at a prompt's last position
            # the first generated token) and the main model's hidden state at i
            nxt_d = ids_all[:, 1:]  # (B, T): the token after each position
            at_last = torch.where(final_d[:, None], first, nxt_d.gather(1, last[:, None]))  # (B, 1)
            nxt_d = nxt_d.scatter(1, last[:, None], at_last)
            h, lg = self.model.mtp_step(0, nxt_d, out.hidden, cb.positions,
                                        cb.layer(self.model.config.num_hidden_layers), select=last)
            end = cb.positions.gather(1, last[:, None])[:, 0] + 1  # each chunk's end position (on the device)
            drafts, q = self._draft(sampler, reqs, h, lg, end, max(s + n for s, n in zip(starts, lens)), final)
        now = time.monotonic()
        for b, (r, row) in enumerate(zip(reqs, self._to_host(reqs, first, None, drafts, lp))):
            r.prefilled += lens[b]
            if not final[b]:
                continue
            toks, _, ds, lps = row
            r.main_len = len(r.prompt)
            r.first_token_time = now
            self._append(r, toks, lps)
            self._set_drafts(r, ds, q, b)

    def _decode(self, reqs: list[_Request]) -> list[_Request]:
        """One decode step (a speculation round) for `reqs`; returns the requests whose results the host read now:
        with overlap (module docstring) those of the step before, else these."""
        fl = self._inflight
        if self._overlaps(reqs):
            if (fl is not None and len(fl.reqs) == len(reqs) and all(a is b for a, b in zip(fl.reqs, reqs))
                    and all(len(r.out) + self.k + 1 < r.params.max_new_tokens for r in reqs)):
                # the same batch, none ended by length in flight: queue the next step on the step in flight's
                # device outputs, then read that step while the device runs this one
                self._inflight = self._launch_decode(reqs, fl)
                return self._read(fl)
            changed = self._read(fl) if fl is not None else []  # the batch changes: settle the step in flight
            live = [r for r in reqs if not r.finished]
            self._inflight = self._launch_decode(live) if live else None
            return changed
        changed = self._read(fl) if fl is not None else []
        self._inflight = None
        live = [r for r in reqs if not r.finished]
        if live:
            read = self._read(self._launch_decode(live))
            changed += [r for r in read if all(r is not c for c in changed)]
        return changed

    def _overlaps(self, reqs: list[_Request]) -> bool:
        """Whether this batch's decoding may overlap (module docstring)."""
        return (self.overlap and self.agree is None and self.phase_sync is None
                and all(r.params.repetition_penalty == 1.0 for r in reqs))

    def _launch_decode(self, reqs: list[_Request], prev: _InFlight | None = None) -> _InFlight:
        """Queue one decode step (a speculation round) for `reqs` and the copy of its results to the host.
        prev: the step in flight for the same requests, its results not read yet (overlapped decoding): this step's
        input is its device output, its last token (k = 0: its token) and, with speculation, the drafts it made, at
        its positions advanced by its accepted counts; each request's cache then holds up to k + 1 positions more
        than main_len says. None: each request's last token and drafts from the host."""
        k = self.k
        tables = [r.blocks for r in reqs]
        sampler = self._sampler(reqs)  # (its parameter tensors go to the device before the step is queued)
        if prev is None:  # the round's inputs reach the device inside the step's meta: [x_L, d_1 .. d_k] and pos0
            starts = [r.main_len for r in reqs]
            inp, pos_in, bound = [[r.last] + r.drafts for r in reqs], starts, max(starts)
        elif not k:
            starts = [r.main_len + 1 for r in reqs]
            inp, pos_in, bound = prev.tokens, starts, max(starts)
        else:  # copied in on the device; the host bounds the positions by the most prev can accept (k + 1)
            inp = torch.cat([prev.tokens.gather(1, prev.n[:, None] - 1), prev.drafts], 1)  # (B, k+1)
            pos_in, bound = prev.next_pos, max(r.main_len for r in reqs) + k + 1
        q_in = None  # the verified drafts' distributions (k = 0: no drafts to weigh; greedy: argmax)
        if k and not sampler.all_greedy:  # (the same batch, hence the same sampler settings, as prev)
            q_in = prev.q if prev is not None else self._draft_probs(reqs)
        greedy_round = self.round_graph is True or (self.round_graph == kernel_backend.LOGPROB_STEPS
                                                    and sampler.logprobs_n is not None)
        if (sampler.present is None and self.agree is None
                and (greedy_round if sampler.all_greedy else self.round_graph_sampled)):
            # a step in one launch (graphs.py DecodeGraphs.round): the same forwards, tokens and log-probabilities
            # as below
            nt = sampler.logprobs_n or 0
            if not k:
                tokens, *rows = self._graphs.round(0, inp, pos_in, tables, last_pos=bound, sampler=sampler)
                return self._queue(reqs, rows[0] if rows else tokens, tokens, nt)
            tokens, n, drafts, next_pos, rows, *q = self._graphs.round(k, inp, pos_in, tables, last_pos=bound + k,
                                                                        sampler=sampler, q=q_in)
            return self._queue(reqs, rows, tokens, nt, q=q[0] if q else None, n=n, drafts=drafts, next_pos=next_pos)
        logits, hidden, inp, pos0 = self._graphs.main(inp, pos_in, tables, last_pos=bound + k)
        d_in = inp[:, 1:]  # (B, k)
        tokens, n, _ = speculation.accept(sampler, logits, d_in, q_in)  # (B, k+1), (B,)
        lp = sampler.logprobs(logits, tokens)
        drafts = q = next_pos = None
        if k:
            if sampler.present is not None:  # (a repetition penalty's history: the round's accepted tokens)
                sampler.add_history(tokens, torch.arange(k + 1, device=self.device) < n[:, None])
            # MTP module 0 over the round's k+1 positions, read out at the last valid one (n - 1); the next round
            # starts at next_pos (a fresh tensor: pos0 is the bucket's input, rewritten when it runs again)
            next_pos = pos0 + n
            h, lg = self._graphs.mtp(0, tokens, hidden, pos0, tables, select=n - 1, last_pos=bound + k)
            drafts, q = self._draft(sampler, reqs, h, lg, next_pos, bound + k + 1)
        return self._queue(reqs, self._results(tokens, n, drafts, lp), tokens, lp[1].shape[-1] if lp is not None else 0,
                           q, n, drafts, next_pos)

    def _queue(self, reqs: list[_Request], rows: torch.Tensor, tokens: torch.Tensor, nt: int = 0, q=None, n=None,
               drafts=None, next_pos=None) -> _InFlight:
        """The step's results (`_results`' rows) on their way to the host, as an _InFlight."""
        done = None
        if rows.is_cuda:  # to pinned memory without blocking; `_read` waits for the event
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = rows
        return _InFlight(reqs, host, done, tokens, nt, q, n, drafts, next_pos)

    def _read(self, fl: _InFlight) -> list[_Request]:
        """Wait for a queued decode step's results and keep the books: tokens appended, stops applied. Rows of
        requests ended meanwhile (a stop in the step before, an abort) are discarded. Returns the requests read."""
        if all(r.finished for r in fl.reqs):  # nothing to read: no need to wait for it
            return []
        if fl.done is not None:
            fl.done.synchronize()
        rows = self._parse(fl.reqs, fl.host.tolist(), fl.tokens.shape[1], fl.n is not None, self.k, fl.nt)
        read = []
        for b, (r, row) in enumerate(zip(fl.reqs, rows)):
            if r.finished:
                continue
            toks, m, ds, lps = row
            if self.k:
                self.stats.rounds += 1
                self.stats.drafted += self.k
                self.stats.accepted += m - 1
                self.stats.first_draft_accepted += m > 1
            r.main_len += m  # x_L and the accepted drafts are now valid in the cache
            self._append(r, toks[:m], lps[:m])
            self._set_drafts(r, ds, fl.q, b)
            read.append(r)
        return read

    def _draft(self, sampler: BatchSampler, reqs: list[_Request], h: torch.Tensor, logits: torch.Tensor,
               first_pos: torch.Tensor, first_pos_bound: int, live: list[bool] | None = None):
        """k drafts from MTP module 0's output (h (B, D), logits (B, V)); chained step j runs module
        min(j, D-1) at position first_pos + j - 1 (a device tensor, host bound first_pos_bound). Rows with
        live[b] False (a prompt chunk that is not the last: drafts thrown away) run on the padding block, so
        that they write nothing into their request's cache (module j >= 1 would leave latents at prompt positions
        it never writes otherwise, which later drafts would read)."""
        D = self.model.config.num_nextn_predict_layers
        tables = [r.blocks if live is None or live[b] else [self._pad] * len(r.blocks) for b, r in enumerate(reqs)]

        def step(j: int, d: torch.Tensor, h: torch.Tensor):
            return self._graphs.mtp(min(j, D - 1), d[:, None], h[:, None], first_pos + (j - 1), tables,
                                    last_pos=first_pos_bound + j - 1)

        return speculation.draft(sampler, self.k, h, logits, step)

    def _draft_probs(self, reqs: list[_Request]) -> torch.Tensor:
        """(B, k, V): each request's draft distributions; a request drafted by argmax (in a batch of only
        greedy requests) has the one-hot distribution of its drafts (sent to the device without blocking)."""
        if all(r.draft_q is not None for r in reqs):
            return torch.stack([r.draft_q for r in reqs])
        host = torch.tensor([r.drafts for r in reqs], dtype=torch.long)
        drafts = (host.pin_memory() if self.device.type == "cuda" else host).to(self.device, non_blocking=True)
        one_hot = torch.nn.functional.one_hot(drafts, self.model.config.vocab_size).float()  # (B, k, V)
        return torch.stack([r.draft_q if r.draft_q is not None else one_hot[b] for b, r in enumerate(reqs)])

    def _set_drafts(self, r: _Request, ds: list[int], q: torch.Tensor | None, b: int) -> None:
        if not r.finished and self.k:
            r.drafts, r.draft_q = ds, (q[b] if q is not None else None)

    def _to_host(self, reqs: list[_Request], tokens: torch.Tensor, n: torch.Tensor | None, drafts: torch.Tensor | None,
                 lp) -> list:
        """One device -> host copy of a phase's results -> per row (tokens, n, drafts, log-probs per token).
        n None: 1 per row."""
        rows = self._results(tokens, n, drafts, lp).tolist()
        return self._parse(reqs, rows, tokens.shape[1], n is not None, 0 if drafts is None else drafts.shape[1],
                           lp[1].shape[-1] if lp is not None else 0)

    def _results(self, tokens: torch.Tensor, n: torch.Tensor | None, drafts: torch.Tensor | None, lp) -> torch.Tensor:
        """A phase's results as one tensor on the device (graphs.result_rows: tokens (T), n (if given), drafts (k),
        then with log-probs the chosen tokens' (T), the top ids (T·nt) and values (T·nt)); in lockstep, rank 0's
        (`agree`)."""
        rows_t = result_rows([x for x in (tokens, None if n is None else n[:, None], drafts) if x is not None], lp)
        if self.agree is not None:
            rows_t = self.agree(rows_t.contiguous())
        return rows_t

    def _parse(self, reqs: list[_Request], rows: list, T: int, has_n: bool, k: int, nt: int) -> list:
        """`_results`' rows (as lists) -> per row (tokens, n, drafts, log-probs per token)."""
        o = T + has_n + k  # where the log-probs start
        out = []
        for b, row in enumerate(rows):
            toks = [int(x) for x in row[:T]]
            m = int(row[T]) if has_n else 1
            ds = [int(x) for x in row[o - k: o]]
            lps = [None] * T
            want = reqs[b].params.logprobs if len(row) > o else None
            if want is not None:
                ch, ti, tv = row[o: o + T], row[o + T: o + T + T * nt], row[o + T + T * nt: o + T + 2 * T * nt]
                lps = [TokenLogprob(toks[j], ch[j], [(int(ti[j * nt + i]), tv[j * nt + i]) for i in range(min(want, nt))])
                       for j in range(T)]
            out.append((toks, m, ds, lps))
        return out

    # --- bookkeeping --------------------------------------------------------------------------------
    def _stops(self, r: _Request, t: int) -> bool:
        return t in r.params.stop_token_ids or (not r.params.ignore_eos and t in self.eos)

    def _append(self, r: _Request, tokens: list[int], lps: list) -> None:
        """Append a round's tokens up to a stop token (not included), a stop string or the length limit."""
        for t, lp in zip(tokens, lps):
            if self._stops(r, t):
                self._finish(r, "stop")
                return
            r.out.append(t)
            self.stats.generated_tokens += 1
            if lp is not None:
                r.logprobs.append(lp)
            if r.stream is not None and r.stream.hits_stop(r.out):
                self._finish(r, "stop")
                return
            if len(r.out) >= r.params.max_new_tokens:
                self._finish(r, "length")
                return

    def _finish(self, r: _Request, reason: str) -> None:
        if not r.finished:
            r.finished, r.finish_reason = True, reason
            r.drafts, r.draft_q = [], None

    def _output(self, r: _Request) -> RequestOutput:
        new_text = r.stream.delta(r.out, r.finished) if r.stream is not None else ""
        new_ids = r.out[r.emitted_tokens:]
        r.emitted_tokens = len(r.out)
        return RequestOutput(r.id, new_ids, new_text, r.finished, r.finish_reason, list(r.out),
                             r.stream.text if r.stream is not None else "",
                             list(r.logprobs) if r.params.logprobs is not None else None, len(r.prompt))

    # --- convenience ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run prompts of any lengths to completion as one continuously batched workload; results in
        prompt order. `on_output` is called with every incremental output (streaming)."""
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("generate takes a list of prompts (strings or token-id lists)")
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams: give one, or one per prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for o in self.step():
                if on_output is not None:
                    on_output(o)
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Incremental outputs of one request (other queued requests are served meanwhile). The request is
        admitted at the call, so a bad one raises here, before any output (`dsv3 generate` echoes the prompt only
        after); the outputs come as the returned iterator is read."""
        rid = self.add_request(prompt, params)

        def follow() -> Iterator[RequestOutput]:  # (self.step: a Leader's own, which borrows this method)
            while True:
                for o in self.step():
                    if o.request_id == rid:
                        yield o
                        if o.finished:
                            return
        return follow()


def check_batch_invariant(model, compile_decode: bool = False) -> None:
    """The engine's batch-invariant mode (kernels/invariant.py) for this model, or a ValueError that names what it
    does not cover and why."""
    p0 = next(model.parameters())
    if not p0.is_cuda:
        raise ValueError("batch_invariant (--batch-invariant) runs on a GPU: its kernels are Triton's, and on the "
                         "CPU torch's GEMMs choose their blocking by shape too (load the model on cuda)")
    if p0.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"batch_invariant needs a bf16 or fp16 model (got {p0.dtype}): the routed experts' grouped "
                         "kernel of the mode takes 16-bit activations (load it with dtype=torch.bfloat16)")
    if any(t.dtype == torch.float8_e4m3fn for t in itertools.chain(model.parameters(), model.buffers())):
        raise ValueError("batch_invariant does not cover FP8 weights (their decode kernels are chosen by row "
                         "count): load the checkpoint dequantised (load_engine does so in this mode: "
                         "keep_fp8=False)")
    if compile_decode:
        raise ValueError("batch_invariant cannot run with compile_decode: inductor generates and tunes its kernels "
                         "per batch bucket, so a row's sums would follow its bucket")
    if any(getattr(m, "dispatcher", None) is not None for m in model.modules()):
        raise ValueError("batch_invariant cannot run with expert parallelism (an MoE dispatcher is installed)")
    if not kernels.backend_available("mla_decode", p0.device):
        raise ValueError("batch_invariant needs triton on this GPU (its kernels are Triton's)")


def load_engine(checkpoint: str, *, device: str = "auto", keep_fp8: bool = True,
                dtype: torch.dtype | None = None, **engine_kwargs):
    """(Engine, DSTokenizer) for a checkpoint directory or a run directory (its latest checkpoint):
    in `dtype` when given, else fp32 on the CPU and the checkpoint's dtype on a GPU. engine_kwargs go to
    `Engine` (max_batch_size, cache_tokens, speculative_k, max_model_len, ...). One process; an expert-parallel rank's engine
    (EngineConfig.ep > 1, under torchrun) is dsv3/ep_serve.py's `load_ep_engine`."""
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.checkpoints.rundir import resolve_checkpoint
    from dsv3.tokenizer import DSTokenizer

    from dsv3.config import resolve_device

    checkpoint = resolve_checkpoint(checkpoint)
    device = str(resolve_device(device))  # a clear error for an unknown device, or cuda without CUDA
    tok = DSTokenizer.load(checkpoint)
    # FP8 block-scaled weights of an official-format checkpoint stay FP8 in memory (dequantised per use)
    if dtype is None and device == "cpu":
        dtype = torch.float32
    if engine_kwargs.get("batch_invariant"):
        keep_fp8 = False  # the mode does not cover FP8 weights (check_batch_invariant): bf16, dequantised once
    model = load_pretrained(checkpoint, device=device, dtype=dtype, keep_fp8=keep_fp8).eval()
    return Engine(model, tok, **engine_kwargs), tok
