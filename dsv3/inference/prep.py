"""Request preparation: a request body's bytes -> a validated, tokenised `Work` (or /tokenize's and
/detokenize's reply), or the APIError to answer. It runs in the server's process for small bodies and
in worker processes for large ones (server.py); it needs no engine, no model and no torch.

Why processes (issue 13). Turning megabytes of JSON into Python objects holds the GIL: `json` and
pydantic-core's parse of 450K token ids, the checks over them, building /tokenize's reply. On a
thread, each of those C calls held the GIL for up to ~40 ms, and the engine thread, which needs it
between its kernels, waited: a small completion took up to ~300 ms longer while large requests were
in flight. In a worker process that work has its own interpreter; what crosses back is compact: a
Work whose prompts are `array('i')` (their pickle is one memcpy, not one object per id), or the
reply's bytes, or an APIError. The body's bytes cross the other way as one pickled `bytes`.

A `Preparer` pickles as its settings (the tokenizer as its JSON, the template's source, the limits),
so a worker rebuilds one at start (`init_worker`) and keeps it: no per-request tokenizer load. The
worker's imports are light (json, pydantic, jinja2, tokenizers, numpy; not torch: dsv3/__init__
imports the model lazily), so a worker starts in about a second.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, replace

from pydantic import BaseModel, ValidationError

from dsv3.inference.params import SamplingParams
from dsv3.inference.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                     DetokenizeRequest, TokenizeRequest, bad_request, from_validation_error)
from dsv3.tokenizer import CHAT_TEMPLATE, DSTokenizer, MissingSpecialTokenError, compile_chat_template


@dataclass
class Work:
    """A validated, tokenised generation request: what the event loop submits to the engine."""
    prompts: list[list[int]] | list[array]  # array('i') when built in a worker
    echoes: list[str]
    params: list[SamplingParams]  # one per choice j of each prompt
    n: int
    want_lp: bool
    stream: bool
    include_usage: bool


_KEEPS_TEXT = {"Sequence", "ByteLevel", "Split", "Digits", "Punctuation"}  # pre-tokenizers that drop nothing


def _max_token_bytes(tok: DSTokenizer) -> int:
    """The most UTF-8 bytes of input text that one token can cover, or 0 when that is unbounded.

    In a byte-level BPE a token covers exactly its bytes, an added token its content, so a text of n
    bytes has at least n / max_token_bytes tokens. The bound does not hold when a normalizer could
    shrink the text, a pre-tokenizer drops characters (Whitespace, Split "removed"), or an added token
    strips the whitespace around it (lstrip/rstrip): then 0 and no text is refused by its size alone.
    DeepSeek-V3's 128K vocabulary: 128 bytes (a run of spaces)."""
    spec = json.loads(tok.tokenizer.to_str())
    norm = spec.get("normalizer")
    if norm is not None and not (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        return 0

    def keeps(pre) -> bool:
        if pre is None:
            return True
        if pre.get("type") not in _KEEPS_TEXT or str(pre.get("behavior", "")).lower() == "removed":
            return False
        return all(keeps(p) for p in pre.get("pretokenizers", []))

    added = spec.get("added_tokens", [])
    if not keeps(spec.get("pre_tokenizer")) or any(t.get("lstrip") or t.get("rstrip") for t in added):
        return 0
    try:
        lengths = tok.token_byte_lengths()
    except ValueError:  # not a byte-level BPE
        return 0
    return int(max([int(lengths.max()), *(len(t["content"].encode("utf-8")) for t in added)]))


# --- the preparer --------------------------------------------------------------------------------------
# route -> (request body model, Preparer method)
ROUTES = {"completion": (CompletionRequest, "prepare_completion"), "chat": (ChatCompletionRequest, "prepare_chat"),
          "tokenize": (TokenizeRequest, "tokenize"), "detokenize": (DetokenizeRequest, "detokenize")}


@dataclass(frozen=True)
class Limits:
    """What a request is checked against (server.py derives them from the engine and ServerConfig)."""
    model_name: str
    max_model_len: int
    max_prompt_tokens: int
    max_tokens_limit: int
    capacity: int  # batch + queue: the most choices one request may ask for
    cache_tokens: int  # the whole KV cache, in tokens
    slot_tokens: int  # one batch slot's share of the cache (cache_tokens // max_batch_size)
    draft_k: int  # tokens of draft room per request (speculative decoding)
    vocab_size: int
    max_token_bytes: int  # _max_token_bytes(tokenizer)


class Preparer:
    def __init__(self, tokenizer: DSTokenizer, limits: Limits, chat_template: str | None = None):
        self.tok, self.limits = tokenizer, limits
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        for k, v in vars(limits).items():  # self.max_model_len, ... (read by every check below)
            setattr(self, k, v)
        self.template = compile_chat_template(self.chat_template)  # as transformers compiles it
        # the tokenizer as it pickles (its JSON, ~5 MB for V3's), taken now: serialising it holds the GIL
        # (130 ms for V3's), which the event loop must not pay when the first large body starts the workers
        self._tok_state = tokenizer.__reduce__()

    def __reduce__(self):  # the settings, not the compiled template (see the module docstring)
        return _rebuild_preparer, (self._tok_state, self.limits, self.chat_template)

    def run(self, route: str, body: bytes, is_json: bool):
        """The whole preparation of one request body: parse, validate, then the route's work."""
        cls, method = ROUTES[route]
        return getattr(self, method)(self.parse(cls, body, is_json))

    # --- validation helpers ----------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def encode(self, text: str, param: str, limit: int | None = None) -> list[int]:
        """Token ids of `text`. With a `limit`, a text whose bytes cannot fit in `limit` tokens under any
        tokenisation is refused before it is tokenised (each token covers at most max_token_bytes)."""
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise bad_request(f"'{param}' is not valid Unicode (it contains a lone surrogate)", param) from None
        if limit is not None and self.max_token_bytes and n_bytes > limit * self.max_token_bytes:
            at_least = -(-n_bytes // self.max_token_bytes)
            raise bad_request(f"The prompt has at least {at_least} tokens ({n_bytes} bytes, at most "
                              f"{self.max_token_bytes} per token); this server accepts at most {limit}.", param,
                              "context_length_exceeded")
        # encode_batch_fast releases the GIL for the whole encoding (encode holds it while it builds
        # the offsets), so the event loop keeps running while a worker tokenises a large prompt; the
        # count is checked before the ids become a Python list (which holds the GIL, ~50 ms per 1M)
        t = self.tok.tokenizer
        enc = getattr(t, "encode_batch_fast", t.encode_batch)([text], add_special_tokens=False)[0]
        if limit is not None and len(enc) > limit:
            raise bad_request(f"The prompt has {len(enc)} tokens; this server accepts at most {limit}.", param,
                              "context_length_exceeded")
        return enc.ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`, through decode_batch: it releases the GIL, `decode` does not (measured, a
        570K-id decode slowed the engine thread's kernels 50-fold)."""
        return self.tok.tokenizer.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    def fits(self, n_prompt: int) -> int:
        """The most completion tokens a prompt of n_prompt tokens leaves room for (context and cache)."""
        return min(self.max_model_len - n_prompt, self.cache_tokens - n_prompt - self.draft_k - 1)

    def check_lengths(self, n_prompt: int, max_tokens: int, param: str, max_param: str) -> None:
        if n_prompt == 0:
            raise bad_request(f"'{param}' is empty", param)
        if n_prompt > self.max_prompt_tokens:
            raise bad_request(f"The prompt has {n_prompt} tokens; this server accepts at most "
                              f"{self.max_prompt_tokens}.", param, "context_length_exceeded")
        if self.fits(n_prompt) < 1:  # the prompt alone: blame it, not max_tokens
            raise bad_request(f"The prompt has {n_prompt} tokens; with one completion token it does not fit the "
                              f"server's KV cache of {self.cache_tokens} tokens.", param, "context_length_exceeded")
        if n_prompt + max_tokens > self.max_model_len:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for "
                              f"the completion). Please reduce the prompt or '{max_param}'.", max_param,
                              "context_length_exceeded")
        need = n_prompt + max_tokens + self.draft_k + 1
        if need > self.cache_tokens:
            raise bad_request(f"The request needs {need} tokens of KV cache; the server's cache holds "
                              f"{self.cache_tokens}. Reduce the prompt or '{max_param}'.",
                              max_param, "context_length_exceeded")

    def check_max_tokens(self, max_tokens: int, param: str) -> None:
        if max_tokens > self.max_tokens_limit:
            raise bad_request(f"'{param}' is {max_tokens}; this server allows at most {self.max_tokens_limit}.",
                              param, "max_tokens_exceeded")

    def sampling(self, req, max_tokens: int, logprobs: int | None, seed_offset: int) -> SamplingParams:
        if req.presence_penalty:
            raise bad_request("presence_penalty is not supported (use repetition_penalty)", "presence_penalty")
        if req.frequency_penalty:
            raise bad_request("frequency_penalty is not supported (use repetition_penalty)", "frequency_penalty")
        if req.logit_bias and any(v != 0 for v in req.logit_bias.values()):  # (all zero: neutral, accepted)
            raise bad_request("logit_bias is not supported (only biases of 0)", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        p = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p, min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, stop=[s for s in stop if s],
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=bool(req.ignore_eos),
            seed=None if req.seed is None else (req.seed + seed_offset) % 2**64, logprobs=logprobs)
        try:
            return p.validate()
        except ValueError as e:
            raise bad_request(str(e)) from None

    def check_choices(self, n_prompts: int, n: int) -> None:
        if n_prompts * n > self.capacity:
            raise bad_request(f"{n_prompts * n} choices in one request ({n_prompts} prompts x n = {n}) exceed the "
                              f"server's bound of {self.capacity}", "n")

    def parse(self, cls: type[BaseModel], body: bytes, is_json: bool):
        if not body:
            raise bad_request("The request body is missing: send a JSON object", code="invalid_json")
        if not is_json:
            raise bad_request("The request body must be JSON, sent with 'Content-Type: application/json'",
                              code="invalid_json")
        try:
            return cls.model_validate_json(body, context={"vocab_size": self.vocab_size})
        except ValidationError as e:
            raise from_validation_error(e) from None

    # --- the routes' work ----------------------------------------------------------------------------
    def prepare_completion(self, req: CompletionRequest) -> Work:
        self.check_model(req.model)
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise bad_request("best_of must equal n (candidates are not ranked server-side)", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported: prompt logprobs are not computed", "echo")
        p = req.prompt  # validated: a string, or a list whose elements all have the first one's type
        raw = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not raw:
            raise bad_request("'prompt' is empty", "prompt")
        self.check_choices(len(raw), n)  # before tokenising a batch that cannot be served
        given = req.max_tokens
        if given is not None:
            self.check_max_tokens(given, "max_tokens")
        params = [self.sampling(req, given or 16, req.logprobs, j) for j in range(n)]  # the cheap checks first
        fim = None
        if req.suffix is not None:
            try:
                fim = (self.tok.fim_begin_id, self.tok.fim_hole_id, self.tok.fim_end_id)
            except MissingSpecialTokenError as e:
                raise bad_request(f"'suffix' needs fill-in-the-middle tokens: {e}", "suffix") from None
            suffix = self.encode(req.suffix, "suffix", self.max_prompt_tokens)
        prompts, echoes = [], []
        for x in raw:
            if isinstance(x, str):
                ids, echo = self.encode(x, "prompt", self.max_prompt_tokens), x
            else:
                ids, echo = list(x), (self.decode(x, skip_special_tokens=True) if req.echo else "")
            if fim is not None:
                ids = [fim[0], *ids, fim[1], *suffix, fim[2]]
            self.check_lengths(len(ids), given or 1, "prompt", "max_tokens")
            prompts.append(ids)
            echoes.append(echo if req.echo else "")
        if given is None:  # OpenAI's default of 16, fewer when less fits: never a 400 for a limit not set
            room = min(self.fits(len(ids)) for ids in prompts)
            params = [replace(p, max_new_tokens=min(16, self.max_tokens_limit, room)) for p in params]
        return Work(prompts, echoes, params, n, req.logprobs is not None, bool(req.stream),
                     bool(req.stream_options and req.stream_options.include_usage))

    def prepare_chat(self, req: ChatCompletionRequest) -> Work:
        self.check_model(req.model)
        if req.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if req.functions:
            raise bad_request("functions are not supported by this server", "functions")
        if isinstance(req.function_call, dict):
            raise bad_request("function_call naming a function is not supported (no functions)", "function_call")
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        n = req.n or 1
        self.check_choices(1, n)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if given is not None:
            self.check_max_tokens(given, max_param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [self.sampling(req, given or 1, logprobs, j) for j in range(n)]  # the cheap checks first
        ids = self.encode(self.render_chat(req.messages, req.chat_template_kwargs), "messages",
                          self.max_prompt_tokens)
        self.check_lengths(len(ids), given or 1, "messages", max_param)
        if given is None:  # as many as fit (the context and the cache left after the prompt), at most one batch
            # slot's share of the cache: the engine reserves a request's whole budget when it joins the batch, so a
            # default of "the whole cache" made one such request hold it (with a long context, every chat without
            # max_tokens then ran alone: an audit with the openai client)
            max_tokens = min(self.max_tokens_limit, self.fits(len(ids)), self.slot_tokens)
            params = [replace(p, max_new_tokens=max_tokens) for p in params]
        return Work([ids], [""], params, n, logprobs is not None, bool(req.stream),
                     bool(req.stream_options and req.stream_options.include_usage))

    def tokenize(self, req: TokenizeRequest) -> bytes:
        """/tokenize's reply, as JSON bytes."""
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("'messages' is empty", "messages")
            ids = self.encode(self.render_chat(req.messages, None), "messages")
        else:
            ids = self.encode(req.prompt, "prompt")
        # serialised here (FastAPI's encoder takes hundreds of ms over a million ids), in slices: when
        # run in the server's process, the GIL is never held long
        head = f'{{"count":{len(ids)},"max_model_len":{self.max_model_len},"tokens":['.encode()
        step = 1 << 13
        parts = [",".join(map(str, ids[i:i + step])).encode() for i in range(0, len(ids), step)]
        return head + b",".join(parts) + b"]}"

    def detokenize(self, req: DetokenizeRequest) -> bytes:
        """/detokenize's reply, as JSON bytes."""
        self.check_model(req.model)
        return json.dumps({"prompt": self.decode(req.tokens)}, ensure_ascii=False, separators=(",", ":")).encode()

    # --- chat template ---------------------------------------------------------------------------
    def render_chat(self, messages: list[ChatMessage], kwargs: dict | None) -> str:
        msgs = []
        for m in messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            # content null stays None beside tool calls: DeepSeek-V3's own template (tokenizer_config.json) renders
            # the calls only when content is none (as "" it rendered an empty turn; the dsv3 template takes both)
            d = {"role": "system" if m.role == "developer" else m.role,
                 "content": content if content is not None else None if m.tool_calls else ""}
            if m.tool_calls:
                d["tool_calls"] = [{"type": tc.type, "id": tc.id, "function": {"name": tc.function.name,
                                                                                 "arguments": tc.function.arguments}}
                                   for tc in m.tool_calls]
            msgs.append(d)
        prefix = ""
        if messages[-1].prefix:
            if messages[-1].role != "assistant":
                raise bad_request("'prefix' is only allowed on the last message when it is an assistant message",
                                  "messages")
            prefix = msgs.pop()["content"]
        if any(m.prefix for m in messages[:-1]):
            raise bad_request("'prefix' is only allowed on the last message", "messages")
        ctx = {k: v for k, v in (kwargs or {}).items() if k not in ("messages", "bos_token", "eos_token")}
        ctx.setdefault("add_generation_prompt", True)
        try:
            text = self.template.render(messages=msgs, bos_token=self.tok.decode([self.tok.bos_id]),
                                        eos_token=self.tok.decode([self.tok.eos_id]), **ctx)
        except Exception as e:  # the template raised on this conversation
            raise bad_request(f"the chat template cannot render these messages: {type(e).__name__}: {e}",
                              "messages") from None
        return text + prefix


def _rebuild_preparer(tok_state: tuple, limits: Limits, chat_template: str) -> Preparer:
    rebuild, args = tok_state
    return Preparer(rebuild(*args), limits, chat_template)


# --- in a worker process ----------------------------------------------------------------------------
_worker: Preparer | None = None


def init_worker(preparer: Preparer) -> None:
    global _worker
    _worker = preparer


def worker_ready() -> bool:
    return _worker is not None


def run_in_worker(route: str, body: bytes, is_json: bool):
    """Preparer.run in a worker, its result made compact for the trip back (see the module docstring)."""
    out = _worker.run(route, body, is_json)
    if isinstance(out, Work):
        out = replace(out, prompts=[array("i", p) for p in out.prompts])
    return out
