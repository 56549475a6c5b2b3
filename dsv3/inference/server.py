"""OpenAI-compatible HTTP server over the continuous-batching Engine (ANCHORS §5).

    POST /v1/completions        prompt (text, token ids, or a batch of either), `suffix` for FIM, echo,
                                logprobs, n, stop, streaming
    POST /v1/chat/completions   messages through the tokenizer's chat template; logprobs/top_logprobs;
                                DeepSeek chat prefix completion (last assistant message `prefix: true`)
    GET  /v1/models, /v1/models/{id};  POST /tokenize, /detokenize (vLLM's extras)
    GET  /health;  GET /metrics (Prometheus text format)

Threading. The Engine is not thread-safe: exactly one thread, `EngineLoop` (engine_loop.py), touches
it. Handlers on the asyncio event loop never call the engine; they submit "add" and "abort"
commands, and the loop thread hands each RequestOutput back to the request's asyncio.Queue with
`loop.call_soon_threadsafe`. Commands apply between steps, which is where continuous batching lets
requests join and leave the batch. Request bodies and errors are in protocol.py, /metrics in metrics.py.

Limits in front of the work (issue 13; each a 4xx before anything expensive runs):
  * the API key (`api_key`), when set, is required on every route except GET /health (a load
    balancer's probe): /v1/*, /tokenize, /detokenize, /metrics (Prometheus sends it with
    `authorization: {credentials: KEY}`), /openapi.json and /docs. Checked before the body is read;
  * a request body larger than `max_request_bytes` (default 8 MiB) is a 413, decided from
    Content-Length before reading, or while reading a chunked body;
  * a text prompt with more UTF-8 bytes than `max_prompt_tokens` x the longest token's bytes cannot
    fit whatever its tokenisation: a 400 before it is tokenised (`Preparer.encode`, prep.py);
  * a completion batch with more choices (prompts x n) than the server's bound is a 400 before it
    is tokenised.
Types are strict (protocol.py): `"n": "2"` or `"stream": "false"` are 400s, as on the OpenAI API.

Off the event loop, and out of the process. A request body over 64 KiB is parsed, validated,
rendered through the chat template and tokenised (or detokenised) in a worker process (prep.py,
`prep_workers` of them, spawned with the first large body), so one multi-megabyte prompt stalls
neither /health nor the other clients' generation. Threads were not enough: turning megabytes of
JSON into Python lists (450K token ids) holds the GIL for ~40 ms per C call, and the engine thread
needs the GIL between its kernels, so a small completion took up to ~300 ms longer while large
requests were in flight. What comes back from a worker is compact (prompts as array('i'), a reply's
bytes, or the APIError to answer), so the server's own GIL cost is a memcpy (figures in
bench/serve_big_requests.py and bench/RESULTS.md). Small bodies are prepared inline (a process hop
would cost more than the work). The pool's size bounds the CPU and memory a burst of large prompts
can take (tokenising 8 MiB of text holds about 1 GB while it runs); requests beyond it wait for a
worker, not the event loop. A worker that dies (out of memory) costs its request a 503, and the next
large body starts a fresh pool.

Admission. The engine reserves each request's worst-case cache (prompt + max_tokens + draft room)
when it joins the batch and queues it otherwise, so load never exhausts the cache. The server adds
the limits in front of it: a request that could never fit (prompt longer than `max_prompt_tokens`,
`max_tokens` over `max_tokens_limit`, prompt + max_tokens over the context or the whole cache) is a
400; when more than `max_batch_size + max_queue` engine requests are outstanding a new one is a 503
with `Retry-After: 1` (the openai client retries those). A client that disconnects, streaming or
not, has its engine requests aborted, which frees their batch slots and cache blocks at once.

Decisions (recorded here because clients depend on them):
  * unknown body fields: 400 naming the field, as the OpenAI API ("Unrecognized request argument
    supplied"); see protocol.py for the accepted-but-neutral-only fields;
  * unknown `model`: 404 `model_not_found` (OpenAI's and vLLM's answer);
  * an omitted `max_tokens` in a chat request means "as many as fit": the context left after
    the prompt, capped by `max_tokens_limit`, by the KV cache and by one batch slot's share of it
    (cache tokens / max_batch_size; with the default cache min(context, 4096)): the engine reserves
    a request's whole budget when it joins the batch (vLLM preempts instead), and without the last
    cap one such request could hold the whole cache of a long-context model, serving chats one at a
    time. A client that wants longer answers sets max_tokens. /v1/completions keeps OpenAI's default
    of 16, lowered to what fits (an omitted max_tokens is never the reason for a 400);
  * `n` > 1 (up to 16): n engine requests; with a `seed`, choice j samples with seed + j;
    `best_of` must equal n; a batch of prompts gives len(prompts) * n choices, index = i * n + j;
  * text prompts are encoded without BOS (as the training data, documents are EOS-separated); the
    chat template emits BOS itself; `temperature` is passed through unchanged (no DeepSeek API
    0.3x mapping; below 1e-5 the engine is greedy); `echo` with `logprobs` is a 400 (prompt
    logprobs are not computed); `suffix` (FIM) on a token-id prompt wraps the ids;
  * logprobs are the model's raw ones, before temperature, penalty and filters (vLLM's default); a
    stop or EOS token ends the choice without being part of it (not in its tokens, logprobs or
    usage; vLLM counts it in the tokens and usage);
  * errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}; validation
    errors are 400s (not FastAPI's 422); errors after a stream started are sent as one SSE `data:
    {"error": ...}` event followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import multiprocessing
import re
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dsv3.cliargs import setting
from dsv3.inference.engine import Engine, RequestOutput, SamplingParams, TokenLogprob, load_engine
from dsv3.inference.engine_loop import ACCEPTED, EngineLoop
from dsv3.inference.metrics import ServerMetrics, prometheus_text
from dsv3.inference.prep import (Limits, Preparer, Work, _max_token_bytes, init_worker, run_in_worker,
                                 worker_ready)
from dsv3.inference.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     ErrorResponse, TokenizeRequest, bad_request,
                                     from_validation_error)
from dsv3.model.moe import max_violation
from dsv3.tokenizer import DSTokenizer

_INLINE_BYTES = 64 * 1024  # bodies up to this size are prepared on the event loop, larger ones in worker processes
_RETRY_AFTER_S = 1  # the Retry-After of a 503 queue_full


@dataclass
class ServerConfig:
    """The HTTP side of `dsv3 serve` (the engine's settings are EngineConfig's); the fields are also
    its flags. 0 limits default to the engine's context (see create_app)."""
    host: str = setting("127.0.0.1", "address to bind (default: loopback only)")
    port: int = setting(8000, "TCP port (0: one the system picks, printed when serving starts)")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on every route but /health "
                                        "(default: no key)")
    model_name: str | None = setting(None, "model id listed in /v1/models, which clients send (default: the run "
                                           "directory's name, the same after every resume; else the checkpoint "
                                           "directory's name)")
    max_prompt_tokens: int = setting(0, "longest prompt accepted (0: context - 1)")
    max_tokens_limit: int = setting(0, "largest max_tokens accepted (0: context)")
    max_queue: int = setting(256, "requests waiting beyond the batch before 503s")
    max_request_bytes: int = setting(8 * 1024 * 1024, "largest request body accepted, in bytes (then 413)")
    prep_workers: int = setting(2, "processes that parse and tokenise request bodies over 64 KiB (each holds "
                                   "about 1 GB while it tokenises 8 MiB of text)")
    log_level: str = setting("info", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))
    allowed_origins: str = setting("", "comma-separated web origins whose pages may call the API from a browser "
                                       "(CORS), e.g. 'http://localhost:3000', or '*' for any (default: none: "
                                       "without a key any page the user opens could use the server)")


# --- one HTTP request's engine requests -----------------------------------------------------------------
@dataclass
class _Choice:
    index: int
    rid: str
    prompt_ids: Sequence[int]  # a list, or an array('i') when prepared in a worker process (prep.py)
    params: SamplingParams
    echo: str = ""
    done: bool = False
    final: RequestOutput | None = None
    first_token: bool = False
    lp_sent: int = 0  # logprob entries already streamed


class _Disconnected(Exception):
    pass


_DISCONNECTED = object()


class _Job:
    def __init__(self, srv: "_Server", choices: list[_Choice], n: int):
        self.srv, self.choices, self.n = srv, choices, n
        self.by_rid = {c.rid: c for c in choices}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t0 = time.monotonic()
        self.reserved = self.accepted = self.closed = self.failed = False

    async def start(self) -> None:
        srv = self.srv
        if not srv.engine_loop.alive:
            raise APIError(503, "the engine is not running", "server_error")
        if srv.outstanding + len(self.choices) > srv.capacity:
            srv.metrics.rejected_full += 1
            raise APIError(503, f"the server is overloaded ({srv.outstanding} requests in flight, queue bound "
                                f"{srv.capacity}); retry later", "server_error", code="queue_full",
                           headers={"Retry-After": str(_RETRY_AFTER_S)})
        srv.outstanding += len(self.choices)
        self.reserved = True
        loop = asyncio.get_running_loop()

        def sink(item):  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        try:
            srv.engine_loop.submit([(c.rid, c.prompt_ids, c.params) for c in self.choices], sink)
            item = await self.queue.get()
        except BaseException:
            self.close()
            raise
        if item is not ACCEPTED:
            self.close()
            if isinstance(item, APIError):
                raise item
            raise bad_request(str(item))  # the engine refused a parameter (ValueError)
        self.accepted = True

    async def events(self) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        remaining = sum(not c.done for c in self.choices)
        while remaining:
            item = await self.queue.get()
            if item is _DISCONNECTED:
                raise _Disconnected()
            if isinstance(item, BaseException):
                self.failed = True
                raise item
            c = self.by_rid[item.request_id]
            now = time.monotonic()
            if not c.first_token and (item.new_token_ids or item.finished):
                c.first_token = True
                self.srv.metrics.ttft.observe(now - self.t0)
            if item.finished:
                c.done, c.final = True, item
                remaining -= 1
                self.srv.metrics.latency.observe(now - self.t0)
            yield c, item

    def close(self) -> None:
        """Idempotent: abort the engine requests still running (client gone or error), release the slot."""
        if self.closed:
            return
        self.closed = True
        live = [c.rid for c in self.choices if not c.done]
        if self.accepted and live:
            self.srv.engine_loop.abort(live)
        if self.reserved:
            self.srv.outstanding -= len(self.choices)

    async def wait_for_disconnect(self, request: Request) -> None:
        """Non-streaming requests: uvicorn does not cancel the handler when the client goes, so watch."""
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                self.queue.put_nowait(_DISCONNECTED)
                return

    async def collect(self, request: Request) -> None:
        watcher = asyncio.ensure_future(self.wait_for_disconnect(request))
        try:
            async for _ in self.events():
                pass
        except _Disconnected:
            self.srv.metrics.client_disconnects += 1
            raise
        finally:
            watcher.cancel()
            self.close()


class _SSE(StreamingResponse):
    """A streaming response whose job is closed however the stream ends: normally, by an error,
    or cancelled by Starlette when the client disconnects (possibly before the first chunk)."""

    def __init__(self, job: _Job, body: AsyncIterator[str]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            job = self.job
            if not (job.closed or job.failed or all(c.done for c in job.choices)):
                job.srv.metrics.client_disconnects += 1
            job.close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _is_json(content_type: str | None) -> bool:
    """As FastAPI decides: no Content-Type, application/json or application/*+json."""
    if content_type is None:
        return True
    main, _, sub = content_type.split(";")[0].strip().lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


# --- the server -----------------------------------------------------------------------------------------
_LIMITS = (("max_prompt_tokens", 0, " (0: context - 1)"), ("max_tokens_limit", 0, " (0: context)"),
           ("max_queue", 0, ""), ("max_request_bytes", 1, ""), ("prep_workers", 1, ""))


def check_limits(limits: dict, flags: bool = False) -> None:
    """A ValueError naming the first of the server's limits in `limits` ({name: value}; None: the default) below
    its least value (a negative one made a server that refused every request). flags: named as `dsv3 serve`'s
    flags (which checks them before the model loads)."""
    for name, least, note in _LIMITS:
        value = limits.get(name)
        if value is not None and value < least:
            shown = "--" + name.replace("_", "-") if flags else name
            raise ValueError(f"{shown} must be >= {least}{note}, got {value}")


class _Server:
    def __init__(self, engine: Engine, tokenizer: DSTokenizer, model_name: str, *, api_key: str | None,
                 max_prompt_tokens: int | None, max_tokens_limit: int | None, max_queue: int,
                 max_request_bytes: int, chat_template: str | None, prep_workers: int):
        check_limits(dict(max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit, max_queue=max_queue,
                          max_request_bytes=max_request_bytes, prep_workers=prep_workers))
        self.engine, self.tok, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.max_model_len = n = engine.max_model_len
        self.capacity = engine.max_batch_size + max_queue
        self.max_request_bytes = max_request_bytes
        # a request's tokens (prompt, completion, draft room) must fit the context and the whole cache; the draft room
        # is what the engine reserves past the completion (Engine.spare) less the one position of k = 0 (k + 1, or
        # 2k - 2 for k >= 4: chained drafts)
        cache_tokens = engine.cache.num_blocks * engine.cache.block_size
        self.prep = Preparer(tokenizer, Limits(
            model_name, n, max_prompt_tokens=min(max_prompt_tokens or n - 1, n - 1),
            max_tokens_limit=min(max_tokens_limit or n, n), capacity=self.capacity, cache_tokens=cache_tokens,
            slot_tokens=cache_tokens // engine.max_batch_size, draft_k=engine.spare - 1,
            vocab_size=engine.model.config.vocab_size, max_token_bytes=_max_token_bytes(tokenizer)), chat_template)
        self.prep_workers = prep_workers
        self.pool: asyncio.Future[ProcessPoolExecutor] | None = None  # started by the first large body
        self.engine_loop = EngineLoop(engine)
        self.metrics = ServerMetrics()
        self.outstanding = 0  # engine requests submitted and not yet closed (event-loop thread only)
        self.created = int(time.time())
        self._token_str: dict[int, tuple[str, list[int]]] = {}

    def token_str(self, t: int) -> tuple[str, list[int]]:
        if t not in self._token_str:
            try:
                b = self.tok.decode_bytes([t])
            except ValueError:
                b = b""
            self._token_str[t] = (b.decode("utf-8", "replace"), list(b))
        return self._token_str[t]

    def new_job(self, work: Work) -> _Job:
        base, n = uuid.uuid4().hex, work.n
        choices = []
        for i, ids in enumerate(work.prompts):
            for j in range(n):
                k = i * n + j
                choices.append(_Choice(k, f"{base}-{k}", ids, work.params[j], work.echoes[i]))
        return _Job(self, choices, n)

    # --- request bodies ----------------------------------------------------------------------------
    async def handle(self, request: Request, route: str):
        """Read the body (at most max_request_bytes) and prepare it (prep.py): in this process when it
        is small, in a worker process when it is large (see the module docstring)."""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_request_bytes:
                    raise self.too_large()
                chunks.append(chunk)
        except ClientDisconnect:  # gone before its whole body: a 499 nobody reads, not a crash's traceback
            raise _Disconnected() from None
        body = b"".join(chunks)
        is_json = _is_json(request.headers.get("content-type"))
        if size <= _INLINE_BYTES:
            return self.prep.run(route, body, is_json)
        if self.pool is None:
            self.pool = asyncio.ensure_future(asyncio.to_thread(self._start_pool))
        start = self.pool
        try:
            pool = await asyncio.shield(start)
            return await asyncio.get_running_loop().run_in_executor(pool, run_in_worker, route, body, is_json)
        except BrokenProcessPool:  # a worker died (out of memory) or did not start: the next large body starts new ones
            if self.pool is start:
                self.shutdown_pool()
            raise APIError(503, "the request could not be prepared: a worker process died; retry later",
                           "server_error", headers={"Retry-After": str(_RETRY_AFTER_S)}) from None

    def _start_pool(self) -> ProcessPoolExecutor:
        """The preparation workers, started and ready (on a helper thread: starting a spawned process
        blocks until the child has read its arguments, the tokenizer, after its imports: ~1 s)."""
        # spawn, not fork: this process runs threads (the engine's, uvicorn's), which fork would copy
        # mid-flight; a spawned worker imports only prep.py's modules
        pool = ProcessPoolExecutor(self.prep_workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init_worker, initargs=(self.prep,))
        try:
            for f in [pool.submit(worker_ready) for _ in range(self.prep_workers)]:  # one start per worker
                f.result()
        except Exception as e:
            pool.shutdown(wait=False, cancel_futures=True)
            raise BrokenProcessPool(f"the preparation workers did not start: {e!r}") from e
        return pool

    def shutdown_pool(self) -> None:
        """Stop the workers (now, or when they have started); the next large body starts new ones."""
        start, self.pool = self.pool, None

        def stop(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                f.result().shutdown(wait=False, cancel_futures=True)
        if start is not None:
            stop(start) if start.done() else start.add_done_callback(stop)

    def too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server's limit of {self.max_request_bytes} "
                             "bytes (dsv3 serve --max-request-bytes).", code="request_too_large")

# --- response bodies ------------------------------------------------------------------------------------
def _usage(job: _Job) -> dict:
    prompt = sum(len(c.prompt_ids) for c in job.choices if c.index % job.n == 0)  # each prompt once
    completion = sum(len(c.final.token_ids) for c in job.choices if c.final is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(srv: _Server, lps: list[TokenLogprob], offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        s = srv.token_str(lp.token_id)[0]
        out["tokens"].append(s)
        out["token_logprobs"].append(_finite(lp.logprob))
        # the legacy format keys the alternatives by text: tokens with the same text (partial UTF-8 bytes all show
        # as U+FFFD) share a key, which keeps the most likely one's value (lp.top is in descending order), so the
        # greedy token's value is the dict's largest
        top: dict = {}
        for t, v in lp.top:
            top.setdefault(srv.token_str(t)[0], _finite(v))
        # the sampled token always among them (OpenAI's legacy API: "up to logprobs + 1 elements"; vLLM adds it)
        top.setdefault(s, _finite(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _chat_logprobs(srv: _Server, lps: list[TokenLogprob]) -> dict:
    def entry(t, v):
        s, b = srv.token_str(t)
        return {"token": s, "logprob": _finite(v), "bytes": b}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


# --- the app --------------------------------------------------------------------------------------------
_BODIES = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
_REF = "#/components/schemas/{model}"


def _body(cls: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its body itself (_Server.handle)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": _REF.format(model=cls.__name__)}}}}}


class _Middleware:
    """Pure ASGI (no BaseHTTPMiddleware: it interferes with streaming and disconnects): the API key
    check on every route but /health, the body limit from Content-Length (a chunked body is counted
    as it is read, in _Server.handle), and the request counter by status."""

    def __init__(self, app, srv: _Server):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, srv = scope["path"], self.srv
        headers = dict(scope["headers"])
        err = None
        if srv.api_key is not None and path != "/health":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), srv.api_key.encode()):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
        length = headers.get(b"content-length", b"")
        if err is None and length.isdigit() and int(length) > srv.max_request_bytes:
            err = srv.too_large()  # answered before reading the body
        if err is not None:
            srv.metrics.count(path, err.status)
            return await err.response()(scope, receive, send)
        status = [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            srv.metrics.count(path, status[0])


def origins(text: str) -> list[str]:
    """--allowed-origins' comma-separated list -> its origins; ValueError naming a bad one. An origin is what a
    browser sends in its Origin header: scheme://host[:port], no path, or "*" (any)."""
    out = [o.strip() for o in (text or "").split(",") if o.strip()]
    for o in out:
        if o != "*" and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s?#]+", o):
            raise ValueError(f"--allowed-origins: {o!r} is not an origin (scheme://host[:port], no path or trailing "
                             "slash; or '*')")
    return out


def create_app(engine: Engine, tokenizer: DSTokenizer, model_name: str, *, api_key: str | None = None,
               max_prompt_tokens: int | None = None, max_tokens_limit: int | None = None, max_queue: int = 256,
               max_request_bytes: int = ServerConfig.max_request_bytes, chat_template: str | None = None,
               prep_workers: int = ServerConfig.prep_workers, allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving `engine`. Limits default to the engine's context (`max_model_len`);
    `max_queue` bounds the engine requests waiting beyond the running batch (then 503); bodies over
    `max_request_bytes` are 413s; `prep_workers` processes prepare bodies over 64 KiB. The chat
    template defaults to the tokenizer's (tokenizer_config.json's when it was loaded from a directory).
    `allowed_origins`: the origins (or "*") whose browser pages may call it (CORS, as vLLM's --allowed-origins,
    whose default is "*"; here none unless given): their preflight is answered before the API key check, which a
    preflight cannot pass (browsers send no Authorization header with it)."""
    srv = _Server(engine, tokenizer, model_name, api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                  max_tokens_limit=max_tokens_limit, max_queue=max_queue, max_request_bytes=max_request_bytes,
                  chat_template=chat_template, prep_workers=prep_workers)

    @asynccontextmanager
    async def lifespan(app):
        srv.engine_loop.start()
        yield
        srv.shutdown_pool()
        await asyncio.to_thread(srv.engine_loop.stop)

    app = FastAPI(title="dsv3 OpenAI-compatible server", version="0.1.0", lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}})
    app.state.server = srv
    app.add_middleware(_Middleware, srv=srv)
    if allowed_origins:  # (added last: the outermost layer, so that preflights and 401s carry the CORS headers)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(_Disconnected)
    async def _gone(request, exc):  # nobody reads it; 499 is nginx's "client closed request" in the metrics
        return JSONResponse(APIError(499, "client disconnected").body(), status_code=499)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        traceback.print_exception(exc)
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    # --- completions and chat completions -----------------------------------------------------------
    async def generate(request: Request, work: Work, meta: dict):
        job = srv.new_job(work)
        await job.start()
        if work.stream:
            stream = _stream_completion if meta["object"] == "text_completion" else _stream_chat
            chunk_meta = meta if meta["object"] == "text_completion" else {**meta, "object": "chat.completion.chunk"}
            return _SSE(job, stream(srv, job, chunk_meta, work.include_usage, work.want_lp))
        await job.collect(request)
        if meta["object"] == "text_completion":
            choices = [{"index": c.index, "text": c.echo + c.final.text,
                        "logprobs": _completion_logprobs(srv, c.final.logprobs or [], len(c.echo)) if work.want_lp
                        else None, "finish_reason": c.final.finish_reason} for c in job.choices]
        else:
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.final.text},
                        "logprobs": _chat_logprobs(srv, c.final.logprobs or []) if work.want_lp else None,
                        "finish_reason": c.final.finish_reason} for c in job.choices]
        return {**meta, "choices": choices, "usage": _usage(job), "system_fingerprint": None}

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request):
        work = await srv.handle(request, "completion")
        return await generate(request, work, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                                              "created": int(time.time()), "model": srv.model_name})

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        work = await srv.handle(request, "chat")
        return await generate(request, work, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                                              "created": int(time.time()), "model": srv.model_name})

    # --- models, tokenizer, health, metrics -------------------------------------------------------
    def model_card() -> dict:
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "dsv3",
                "max_model_len": srv.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        srv.prep.check_model(model_id)
        return model_card()

    @app.post("/tokenize", openapi_extra=_body(TokenizeRequest))
    async def tokenize(request: Request):
        return Response(await srv.handle(request, "tokenize"), media_type="application/json")

    @app.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
    async def detokenize(request: Request):
        return Response(await srv.handle(request, "detokenize"), media_type="application/json")

    @app.get("/health")
    async def health():
        if not srv.engine_loop.alive:
            raise APIError(503, f"the engine loop stopped: {srv.engine_loop.error!r}", "server_error")
        return {"status": "ok"}

    @app.get("/expert_loads")
    async def expert_loads():
        """The tokens routed to each expert of each MoE block since the server started (--record-expert-loads):
        read on the engine thread between steps (under --ep --dp-attention, summed over the ranks)."""
        def read(engine):
            if getattr(engine, "loads", None) is None:
                raise APIError(404, "this server does not record expert loads: start it with --record-expert-loads "
                                    "FILE", "invalid_request_error")
            return engine.expert_loads(), engine.model.config.num_experts_per_tok

        counts, k = await asyncio.wrap_future(srv.engine_loop.call(read))
        return {"blocks": counts.shape[0], "experts": counts.shape[1], "positions": int(counts[0].sum()) // k,
                "counts": counts.tolist(), "max_violation": max_violation(counts).tolist()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(prometheus_text(srv.engine_loop.snapshot, srv.metrics, srv.outstanding),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi():  # the request bodies (read by _Server.handle); the 400 the server sends instead of a 422
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            from pydantic.json_schema import models_json_schema
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            _, defs = models_json_schema([(m, "validation") for m in _BODIES], ref_template=_REF)
            components.update(defs.get("$defs", {}))
            app.openapi_schema = jsonable_encoder(schema)
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _stream_completion(srv: _Server, job: _Job, meta: dict, include_usage: bool,
                             want_lp: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(c: _Choice, text: str, lp, reason):
        return _sse({**meta, "choices": [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason}],
                     **extra})

    try:
        for c in job.choices:
            if c.echo:
                yield chunk(c, c.echo, None, None)
        # each choice's text_offset: advanced by its tokens' strings, as the non-streamed response counts them (the
        # text released so far lags behind them while a stop string may still begin: that once gave other offsets)
        offsets = {c.index: len(c.echo) for c in job.choices}
        async for c, o in job.events():
            lp = None
            if want_lp and o.logprobs is not None and len(o.logprobs) > c.lp_sent:
                lp = _completion_logprobs(srv, o.logprobs[c.lp_sent:], offsets[c.index])
                offsets[c.index] += sum(map(len, lp["tokens"]))
                c.lp_sent = len(o.logprobs)
            if o.new_text or lp:
                yield chunk(c, o.new_text, lp, None)
            if o.finished:
                yield chunk(c, "", None, o.finish_reason)
        if include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(job)})
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield _sse(e.body())
        yield "data: [DONE]\n\n"


async def _stream_chat(srv: _Server, job: _Job, meta: dict, include_usage: bool, want_lp: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(c: _Choice, delta: dict, lp, reason):
        return _sse({**meta, "choices": [{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": reason}],
                     **extra})

    try:
        for c in job.choices:
            yield chunk(c, {"role": "assistant", "content": ""}, None, None)
        async for c, o in job.events():
            lp = None
            if want_lp and o.logprobs is not None and len(o.logprobs) > c.lp_sent:
                lp = _chat_logprobs(srv, o.logprobs[c.lp_sent:])
                c.lp_sent = len(o.logprobs)
            if o.new_text or lp:
                yield chunk(c, {"content": o.new_text}, lp, None)
            if o.finished:
                yield chunk(c, {}, None, o.finish_reason)
        if include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(job)})
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield _sse(e.body())
        yield "data: [DONE]\n\n"


# --- running it -----------------------------------------------------------------------------------------
def load_for_serving(checkpoint: str, *, device: str = "auto", max_batch_size: int = 32,
                     cache_tokens: int | None = None, speculative_k: int = 0,
                     max_model_len: int | None = None, compile_decode: bool = False,
                     cuda_graphs: bool | str | None = None,
                     max_prefill_tokens: int = 8192, record_expert_loads: bool = False,
                     overlap: bool = True, batch_invariant: bool = False) -> tuple[Engine, DSTokenizer]:
    """Engine + tokenizer (with its chat template) of a checkpoint directory (see engine.load_engine).
    On a GPU with a bf16 (or FP8) checkpoint, decode steps run as CUDA graphs unless cuda_graphs says off."""
    return load_engine(checkpoint, device=device, max_batch_size=max_batch_size, cache_tokens=cache_tokens,
                       speculative_k=speculative_k, max_model_len=max_model_len, compile_decode=compile_decode,
                       cuda_graphs=cuda_graphs, max_prefill_tokens=max_prefill_tokens,
                       record_expert_loads=record_expert_loads, overlap=overlap, batch_invariant=batch_invariant)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: `dsv3 serve` binds it before the model loads, so that a port in use (or an
    address not of this machine) is a one-line error at once rather than uvicorn's log line after the load; with
    port 0 its getsockname() says the port the system chose. (As uvicorn binds: IPv6 when the host has a colon,
    SO_REUSEADDR.)"""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


SHUTDOWN_GRACE = 5.0  # seconds a shutdown (Ctrl-C, SIGTERM) waits for in-flight requests before cancelling them


def uvicorn_server(app, *, log_level: str = "info", host: str = "127.0.0.1", port: int = 8000,
                   grace: float = SHUTDOWN_GRACE):
    """A uvicorn.Server for create_app's `app` whose shutdown lets in-flight requests run on for `grace` - 1 s,
    then stops the engine loop, so that each one still running answers the OpenAI-shaped 503 "the server is
    shutting down" (a stream: its error event and `data: [DONE]`) before uvicorn cancels what is left at `grace`
    s. (uvicorn alone cancelled the handlers first: a text/plain 500, which the openai client retries against a
    closed port, or a stream cut mid-chunk; the engine loop's 503s came after, in the lifespan's shutdown.)
    `run(sockets=[sock])` serves on a bound socket, `run()` binds host:port."""
    import uvicorn

    class _Graceful(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            async def fail_late() -> None:
                await asyncio.sleep(max(grace - 1.0, 0.0))
                await asyncio.to_thread(app.state.server.engine_loop.stop)

            late = asyncio.create_task(fail_late())
            try:
                await super().shutdown(sockets)
            finally:
                late.cancel()

    return _Graceful(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace))


def serve(engine: Engine, tokenizer: DSTokenizer, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", sock: socket.socket | None = None, **app_kwargs) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM: in-flight requests get SHUTDOWN_GRACE - 1 s, then a 503).
    Binds loopback unless `host` says otherwise; `sock` (listen(...)): serve on that socket instead of binding
    host:port. Returns with nothing of the server holding `engine` any more."""
    app = create_app(engine, tokenizer, model_name, **app_kwargs)
    try:
        try:
            uvicorn_server(app, log_level=log_level, host=host, port=port).run(sockets=[sock] if sock else None)
        except KeyboardInterrupt:  # (the Ctrl-C uvicorn shut down on, re-raised by Server.run)
            pass
    finally:
        # FastAPI keeps the route handlers, which hold the server, in a module-level cache: the engine would live
        # as long as the process, and under expert parallelism (dsv3/ep_serve.py) so would the process groups its
        # MoE layers hold, which each rank must destroy before it exits (ep_serve.close_groups says why)
        srv = app.state.server
        srv.engine_loop.stop()  # (stopped already, unless uvicorn failed before its shutdown)
        srv.engine = srv.engine_loop = None


__all__ = ["APIError", "EngineLoop", "check_limits", "create_app", "listen", "load_for_serving", "origins", "serve",
           "uvicorn_server"]
