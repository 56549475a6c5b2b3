"""Generation engine: continuous batching over a paged latent KV cache, with optional MTP
self-speculative decoding.

Requests join and leave the running batch between steps. One `step()`:
  1. admits queued requests in arrival order while the batch has room and the cache pool has the
     blocks for the request's whole budget (prompt + max_new_tokens + draft room). Reserving the
     worst case up front means a running request can never run out of cache: no preemption, no
     out-of-memory under load; the price is memory held for tokens a request may not generate;
  2. prefills the admitted requests (one batched forward over their prompts; the last position's
     logits give each its first token);
  3. decodes every other running request: one batched forward over [last token, drafts...].

Speculative decoding with the MTP module(s) (paper §5.4.3), per request and round, with L tokens
in the main model's cache and x_L the last accepted token (not yet in the cache):
    verify:  main([x_L, d_1 .. d_k]) at positions L .. L+k  -> target distributions p_0 .. p_k
    accept:  d_j while it passes (greedy: d_j == argmax p_{j-1}; sampling: u < p(d_j)/q(d_j)); on the
             first rejection sample from norm(max(p - q, 0)); if all pass, sample a bonus token from p_k
    draft:   the MTP module runs over the newly accepted positions (next token embedding +
             main hidden, as in training) which fills its own cache; its last logits give d'_1,
             then chained steps (module min(j, D-1), EAGLE-style at position +1) give d'_2 .. d'_k.
This keeps the output distribution exactly that of the main model (greedy: identical tokens).
D > 1 modules past the first are used only for chained drafts, so their caches are approximate:
that can only lower acceptance, never change outputs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dsv3.cliargs import setting
from dsv3.inference.cache import PagedLatentCache
from dsv3.inference.params import SamplingParams  # noqa: F401 (re-exported: engine.SamplingParams)
from dsv3.inference.sampling import filter_logits


@dataclass
class EngineConfig:
    """How `load_engine(checkpoint, **vars(cfg))` builds the engine; the fields are also flags of `dsv3
    serve` (all) and `dsv3 generate/sample/chat` (device, speculative_k). 0 leaves a size to the engine."""
    device: str = setting("auto", "auto | cpu | cuda")
    max_batch_size: int = setting(32, "requests decoded together")
    cache_tokens: int = setting(0, "KV-cache budget in tokens (0: batch size x min(context, 4096))")
    speculative_k: int = setting(0, "tokens drafted per step by the MTP module (0: off)")
    max_model_len: int = setting(0, "context limit (0: the model's)")
    compile_decode: bool = setting(False, "GPU: torch.compile the graphed decode step (1.65x at batch 1 on the "
                                          "16b, H100); one compile per batch/context bucket on first use")


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


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float
    out: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    main_len: int = 0  # positions held in the main model's cache
    drafts: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor] = field(default_factory=list)
    gen: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    text: str = ""
    stopped_by_string: bool = False  # then `text` is already cut at the stop string
    emitted_tokens: int = 0
    emitted_chars: int = 0
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


@dataclass
class EngineStats:
    steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    first_draft_accepted: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
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
                 cuda_graphs: bool | None = None, compile_decode: bool = False):
        cfg = model.config
        if speculative_k > 0 and cfg.num_nextn_predict_layers == 0:
            raise ValueError("speculative decoding needs MTP modules, but this model has num_nextn_predict_layers=0")
        if speculative_k < 0:
            raise ValueError(f"speculative_k must be >= 0, got {speculative_k}")
        self.model = model.eval()
        self.tok = tokenizer
        self.k = speculative_k
        self.max_batch_size = max_batch_size
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        # room for max_batch_size requests of the full context (each also reserves k + 1 draft positions)
        cache_tokens = cache_tokens or max_batch_size * (min(self.max_model_len, 4096) + self.k + 1)
        num_blocks = -(-cache_tokens // block_size)
        # cuda_graphs (None: on for a bf16 CUDA model without speculation): single-token decode
        # steps run through dsv3/inference/graphs.py (static shapes, one graph replay per step). True
        # on the CPU runs that same static-shape step eagerly (how the tests check it). Speculative
        # verification ([x_L, drafts...], T = k + 1) and prefill stay eager. A graph holds only
        # sync-free code: the grouped-GEMM experts (bf16 on CUDA), not the per-expert loop.
        p0 = next(model.parameters())
        use = cuda_graphs if cuda_graphs is not None else (
            speculative_k == 0 and p0.is_cuda and p0.dtype == torch.bfloat16)  # grouped experts: bf16 only
        if compile_decode and not use:
            raise ValueError("compile_decode compiles the graphed decode step, which needs a bf16 model on a GPU "
                             "without speculative decoding (or cuda_graphs=True)")
        if use and speculative_k > 0:
            raise ValueError("cuda_graphs covers single-token decoding; it cannot be combined with speculative_k > 0")
        self.cache = PagedLatentCache.for_model(model, num_blocks + (1 if use else 0), block_size)
        self.device = self.cache.kv.device
        self._graphs = None
        if use:
            from dsv3.inference.graphs import DecodeGraphs

            pad = self.cache.reserve()  # padding rows of a bucket write and read here (not in num_blocks)
            max_blocks = -(-(self.max_model_len + self.k + 1) // block_size)
            self._graphs = DecodeGraphs(self.model, self.cache, pad, max_batch_size, max_blocks,
                                        compile=compile_decode)
        self.eos = [tokenizer.eos_id] if tokenizer is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else [])
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self._aborted: list[RequestOutput] = []  # final outputs of aborted requests, returned by the next step()
        self._ids = itertools.count()
        self.stats = EngineStats()

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
        need = len(ids) + params.max_new_tokens + self.k + 1
        if need > self.max_model_len + self.k + 1:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's context of {self.max_model_len} tokens")
        if self.cache.blocks_for(need) > self.cache.num_blocks:
            raise ValueError(f"this request needs {need} cache tokens; the cache holds "
                             f"{self.cache.num_blocks * self.cache.block_size}")
        rid = request_id or f"req-{next(self._ids)}"
        r = _Request(rid, ids, params, time.monotonic())
        if params.seed is not None:
            r.gen = torch.Generator(device=self.device).manual_seed(params.seed)
        self.waiting.append(r)
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request (e.g. its client disconnected) and free its cache blocks; the next step()
        returns its final output with finish_reason "abort"."""
        for lst in (self.waiting, self.running):
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
        return bool(self.waiting or self.running or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # --- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit, prefill, decode once. Returns an output for every request that changed (and the final
        output, finish_reason "abort", of each request aborted since the last step)."""
        self.stats.steps += 1
        aborted, self._aborted = self._aborted, []
        new: list[_Request] = []
        while self.waiting and len(self.running) + len(new) < self.max_batch_size:
            r = self.waiting[0]
            nb = self.cache.blocks_for(len(r.prompt) + r.params.max_new_tokens + self.k + 1)
            if nb > self.cache.free_blocks:
                break  # queue: first come, first served
            self.waiting.pop(0)
            r.blocks = self.cache.allocate(nb)
            new.append(r)
        decoding = [r for r in self.running if not r.finished]
        changed: list[_Request] = []
        if new:
            try:
                self._prefill(new)
            except BaseException:
                for r in new:  # they are in neither list: give their blocks back before failing
                    self.cache.release(r.blocks)
                    r.blocks = []
                    self._finish(r, "abort")
                raise
            self.running.extend(new)
            changed += new
        if decoding:
            self._decode(decoding)
            changed += decoding
        outs = aborted + [self._output(r) for r in changed]
        for r in [r for r in self.running if r.finished]:
            self.running.remove(r)
            self.cache.release(r.blocks)
            r.blocks = []
        return outs

    def _forward(self, reqs: list[_Request], inputs: list[list[int]]):
        starts = [r.main_len for r in reqs]
        n_new = [len(x) for x in inputs]
        T = max(n_new)
        ids = torch.zeros(len(reqs), T, dtype=torch.long)
        for b, x in enumerate(inputs):
            ids[b, : len(x)] = torch.tensor(x)
        cb = self.cache.batch([r.blocks for r in reqs], starts, n_new)
        out = self.model(ids.to(self.device), cb.positions, cache=cb)
        return out, cb

    def _prefill(self, reqs: list[_Request]) -> None:
        out, cb = self._forward(reqs, [r.prompt for r in reqs])
        self.stats.prefill_tokens += sum(len(r.prompt) for r in reqs)
        now = time.monotonic()
        last = torch.tensor([len(r.prompt) - 1 for r in reqs], device=out.logits.device)
        last_logits = out.logits[torch.arange(len(reqs), device=last.device), last]  # (B, V)
        top1 = last_logits.argmax(-1).tolist()  # one device->host copy for the whole batch
        for b, r in enumerate(reqs):
            n = len(r.prompt)
            t, lp = self._sample(r, last_logits[b], top1[b])
            r.main_len = n
            r.first_token_time = now
            self._append(r, [t], [lp])
        if self.k:
            self._draft(reqs, out.hidden, [len(r.prompt) for r in reqs], starts=[0] * len(reqs))

    def _decode(self, reqs: list[_Request]) -> None:
        inputs = [[r.tokens[-1]] + r.drafts for r in reqs]
        if self._graphs is not None:  # k == 0: one token per sequence through the static/graphed step
            logits = self._graphs.run([x[0] for x in inputs], [r.main_len for r in reqs],
                                      [r.blocks for r in reqs])  # (B, V)
            # choose every token on the device (greedy argmax, or a draw from the request's processed
            # distribution with its own generator), then one device->host copy for the whole batch
            chosen = logits.argmax(-1)
            for b, r in enumerate(reqs):
                probs = self._probs(r, logits[b], r.tokens)
                if probs is not None:
                    chosen[b] = self._draw_dev(r, probs)
            for r, t, row in zip(reqs, chosen.tolist(), logits):
                r.main_len += 1
                self._append(r, [t], [self._logprob(r, row, t)])
            return
        out, cb = self._forward(reqs, inputs)
        top1 = out.logits.argmax(-1).tolist()  # (B, T) greedy choices, one device->host copy
        n_acc = []
        for b, r in enumerate(reqs):
            accepted, lps = self._verify(r, out.logits[b], inputs[b], top1[b])
            n_acc.append(len(accepted))
            start = r.main_len
            r.main_len = start + len(accepted)  # x_L plus the accepted drafts are now valid in the cache
            self._append(r, accepted, lps)
        if self.k:
            self._draft(reqs, out.hidden, n_acc, starts=[r.main_len - n for r, n in zip(reqs, n_acc)])

    # --- sampling ---------------------------------------------------------------------------------
    def _probs(self, r: _Request, logits: torch.Tensor, history: list[int]) -> torch.Tensor | None:
        """The processed next-token distribution (V,) in fp32, or None for greedy."""
        p = r.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and history:
            idx = torch.tensor(sorted(set(history)), device=logits.device)
            sel = logits[idx]
            logits = logits.clone()
            logits[idx] = torch.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
        if p.temperature < 1e-5:  # greedy (vLLM's eps): logits / a tinier temperature overflow fp32
            return None if p.repetition_penalty == 1.0 else torch.nn.functional.one_hot(
                logits.argmax(), logits.shape[-1]).float()
        logits = filter_logits((logits / p.temperature).unsqueeze(0), p.top_k, p.top_p, p.min_p)[0]
        return logits.softmax(-1)

    @staticmethod
    def _draw_dev(r: _Request, probs: torch.Tensor) -> torch.Tensor:
        """One token from `probs` as a 0-dim device tensor, without a host sync: argmax(p / q) with
        q ~ Exp(1), the algorithm (and the random numbers) of torch.multinomial(probs, 1), minus its
        two validity checks that read values back to the host."""
        q = torch.empty_like(probs).exponential_(1, generator=r.gen)
        return (probs / q).argmax()

    def _draw(self, r: _Request, probs: torch.Tensor) -> int:
        return int(self._draw_dev(r, probs))

    def _logprob(self, r: _Request, logits: torch.Tensor, token: int) -> TokenLogprob | None:
        n = r.params.logprobs
        if n is None:
            return None
        lp = logits.float().log_softmax(-1)
        top = []
        if n > 0:
            v, i = lp.topk(min(n, lp.shape[-1]))
            top = list(zip(i.tolist(), v.tolist()))
        return TokenLogprob(token, float(lp[token]), top)

    def _sample(self, r: _Request, logits: torch.Tensor, top1: int) -> tuple[int, TokenLogprob | None]:
        probs = self._probs(r, logits, r.tokens)
        t = top1 if probs is None else self._draw(r, probs)
        return t, self._logprob(r, logits, t)

    def _verify(self, r: _Request, logits: torch.Tensor, inp: list[int], top1: list[int]) -> tuple[list[int], list]:
        """logits (T, V) for [x_L, d_1..d_k] and their argmaxes: the tokens this round produces
        (accepted drafts + one)."""
        drafts = inp[1:]
        history = list(r.tokens)
        out, lps = [], []
        for j, d in enumerate(drafts):
            probs = self._probs(r, logits[j], history)
            if probs is None:
                ok = top1[j] == d
            else:
                q = r.draft_probs[j]
                u = torch.rand((), generator=r.gen, device=probs.device)
                ok = bool(u * q[d] < probs[d])  # u < p/q without dividing by zero
            self.stats.drafted += 1
            if not ok:
                if probs is None:
                    t = top1[j]
                else:
                    resid = (probs - r.draft_probs[j]).clamp_min(0)
                    t = self._draw(r, resid / resid.sum()) if resid.sum() > 0 else self._draw(r, probs)
                out.append(t)
                lps.append(self._logprob(r, logits[j], t))
                self.stats.rounds += 1
                return out, lps
            self.stats.accepted += 1
            if j == 0:
                self.stats.first_draft_accepted += 1
            out.append(d)
            lps.append(self._logprob(r, logits[j], d))
            history.append(d)
            if self._stops(r, d) or len(r.out) + len(out) >= r.params.max_new_tokens:
                self.stats.rounds += 1
                return out, lps  # no bonus past a stop token or the length limit
        j = len(drafts)
        probs = self._probs(r, logits[j], history)
        t = top1[j] if probs is None else self._draw(r, probs)
        out.append(t)
        lps.append(self._logprob(r, logits[j], t))
        if drafts:
            self.stats.rounds += 1
        return out, lps

    # --- drafting with the MTP module(s) ------------------------------------------------------------
    def _draft(self, reqs: list[_Request], hidden: torch.Tensor, n_new: list[int], starts: list[int]) -> None:
        """Run MTP module 0 over each request's newly valid positions starts..starts+n-1 (inputs: the next
        token's embedding and the main hidden there), then chain k-1 more single-position steps."""
        n_layers = self.model.config.num_hidden_layers
        D = self.model.config.num_nextn_predict_layers
        live = [b for b, r in enumerate(reqs) if not r.finished]
        if not live:
            return
        reqs_l = [reqs[b] for b in live]
        T = max(n_new[b] for b in live)
        next_ids = torch.zeros(len(live), T, dtype=torch.long)
        hid = torch.zeros(len(live), T, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        for i, b in enumerate(live):
            r, n, s = reqs[b], n_new[b], starts[b]
            next_ids[i, :n] = torch.tensor(r.tokens[s + 1: s + 1 + n])
            hid[i, :n] = hidden[b, :n]
        cb = self.cache.batch([r.blocks for r in reqs_l], [starts[b] for b in live], [n_new[b] for b in live])
        h, logits = self.model.mtp_step(0, next_ids.to(self.device), hid, cb.positions, cb.layer(n_layers))
        last = torch.tensor([n_new[b] - 1 for b in live], device=h.device)
        ar = torch.arange(len(live), device=h.device)
        h_last, lg = h[ar, last], logits[ar, last]  # (B, D), (B, V)
        for r in reqs_l:
            r.drafts, r.draft_probs = [], []
        pos = [starts[b] + n_new[b] for b in live]  # position of the first chained draft step
        for j in range(self.k):
            top = lg.argmax(-1).tolist()
            for i, r in enumerate(reqs_l):
                probs = self._probs(r, lg[i], r.tokens + r.drafts)
                d = top[i] if probs is None else self._draw(r, probs)
                r.drafts.append(d)
                if probs is not None:
                    r.draft_probs.append(probs)
            if j + 1 == self.k:
                break
            mod = min(j + 1, D - 1)
            ids = torch.tensor([[r.drafts[-1]] for r in reqs_l], device=self.device)
            cb = self.cache.batch([r.blocks for r in reqs_l], pos, [1] * len(reqs_l))
            h, logits = self.model.mtp_step(mod, ids, h_last.unsqueeze(1), cb.positions, cb.layer(n_layers + mod))
            h_last, lg = h[:, 0], logits[:, 0]
            pos = [p + 1 for p in pos]

    # --- bookkeeping --------------------------------------------------------------------------------
    def _stops(self, r: _Request, t: int) -> bool:
        return t in r.params.stop_token_ids or (not r.params.ignore_eos and t in self.eos)

    def _append(self, r: _Request, tokens: list[int], lps: list) -> None:
        for t, lp in zip(tokens, lps):
            if self._stops(r, t):
                self._finish(r, "stop")
                return
            r.out.append(t)
            self.stats.generated_tokens += 1
            if lp is not None:
                r.logprobs.append(lp)
            if self.tok is not None and r.params.stop:
                text = self.tok.decode(r.out, skip_special_tokens=True)
                hit = [text.find(s) for s in r.params.stop if s and s in text]
                if hit:
                    r.text, r.stopped_by_string = text[: min(hit)], True
                    self._finish(r, "stop")
                    return
            if len(r.out) >= r.params.max_new_tokens:
                self._finish(r, "length")
                return

    def _finish(self, r: _Request, reason: str) -> None:
        if not r.finished:
            r.finished, r.finish_reason = True, reason
            r.drafts, r.draft_probs = [], []

    def _output(self, r: _Request) -> RequestOutput:
        if self.tok is not None:
            if not r.stopped_by_string:
                r.text = self.tok.decode(r.out, skip_special_tokens=True)
            # hold back an incomplete UTF-8 character and a possible stop-string prefix while streaming
            hold = 0
            if not r.finished:
                if r.text.endswith("\ufffd"):
                    hold = 1
                if r.params.stop:
                    hold = max(hold, max(len(s) for s in r.params.stop) - 1)
            end = max(r.emitted_chars, len(r.text) - hold)
            new_text = r.text[r.emitted_chars:end]
            r.emitted_chars = end
        else:
            new_text = ""
        new_ids = r.out[r.emitted_tokens:]
        r.emitted_tokens = len(r.out)
        return RequestOutput(r.id, new_ids, new_text, r.finished, r.finish_reason, list(r.out), r.text,
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
        """Yield incremental outputs of one request (other queued requests are served meanwhile)."""
        rid = self.add_request(prompt, params)
        while True:
            for o in self.step():
                if o.request_id == rid:
                    yield o
                    if o.finished:
                        return


def load_engine(checkpoint: str, *, device: str = "auto", keep_fp8: bool = True, **engine_kwargs):
    """(Engine, DSTokenizer) for a checkpoint directory or a run directory (its latest checkpoint):
    fp32 on the CPU, the checkpoint's dtype on a GPU. engine_kwargs go to `Engine` (max_batch_size,
    cache_tokens, speculative_k, max_model_len, ...)."""
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.checkpoints.rundir import resolve_checkpoint
    from dsv3.tokenizer import DSTokenizer

    checkpoint = resolve_checkpoint(checkpoint)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = DSTokenizer.load(checkpoint)
    # FP8 block-scaled weights of an official-format checkpoint stay FP8 in memory (dequantised per use)
    model = load_pretrained(checkpoint, device=device, dtype=torch.float32 if device == "cpu" else None,
                            keep_fp8=keep_fp8).eval()
    return Engine(model, tok, **engine_kwargs), tok
