"""OpenAI-compatible server (dsv3/inference/server.py) against a live uvicorn on 127.0.0.1, driven by
the official `openai` client: completions, chat, streaming, FIM, logprobs, stop strings, n/seed,
errors and their status codes, the API key, the 503 queue bound, client disconnects (streaming and
not) freeing their slot and cache blocks, a schemathesis fuzz of the server's own OpenAPI schema
(no 5xx, server still healthy), a 32-client streaming load test whose greedy outputs equal
offline `Engine.generate`, and the hardening of issue 13: strict types, errors that name the bad
element, the body limit (413), work refused before tokenising, the API key on every route but
/health, the default max_tokens, Retry-After, large bodies (prepared in worker processes) answered
as small ones, and an event loop and engine that large requests do not stall.

The model is a random 2-layer MoE with one MTP module (the main server speculates with k=1, so the
load test also checks that self-speculation leaves greedy outputs unchanged); the tokenizer is a
512-token BPE trained on generated text. CPU, about 60 s on 2 cores.

Run: python -m pytest tests/test_server.py -q
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from dsv3.config import ModelConfig  # noqa: E402
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv3.inference.server import create_app  # noqa: E402
from background_server import BackgroundServer, wait_healthy  # noqa: E402
from dsv3.model import build_model  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402

MODEL = "tiny-dsv3"
MAX_TOKENS = 16  # the main server's max_tokens limit: keeps fuzzed requests short
MAX_PROMPT = 96

CFG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    max_position_embeddings=512, rope_scaling=None, num_nextn_predict_layers=1, initializer_range=0.1,
    torch_dtype="float32",
)


def _corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syll = ["al", "be", "ga", "de", "ta", "ro", "mi", "ne", "so", "ku", "pi", "lo", "ver", "tor", "ing", "ed"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    punct = ["", "", "", ",", ".", "(", ")", ":", " =", "\n", "\n    "]
    return [" ".join(rng.choice(words) + rng.choice(punct) + (str(rng.randint(0, 999)) if rng.random() < 0.1 else "")
                     for _ in range(150)) for _ in range(n_docs)]


PROMPTS = [f"{w} alpha(beta, {i}):" for i, w in enumerate(["def", "class", "return", "print", "import", "for"])]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    DSTokenizer.train(_corpus(), 512).save(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return DSTokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_model(ModelConfig(**CFG).validate(), seed=0).eval()


@pytest.fixture(scope="module")
def server(model, tok):
    # 10 blocks of 16 tokens: a request reserves 2-8 blocks, so fewer requests fit the cache than the
    # batch (8): admission is limited by cache memory and requests queue
    eng = Engine(model, tok, max_batch_size=8, cache_tokens=160, speculative_k=1)
    app = create_app(eng, tok, MODEL, max_prompt_tokens=MAX_PROMPT, max_tokens_limit=MAX_TOKENS, max_queue=64)
    with BackgroundServer(app) as s:
        s.engine, s.srv = eng, app.state.server
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def offline(model, tok, prompts_ids, max_tokens, **kw) -> list[str]:
    """Greedy reference: a fresh Engine, no speculation, everything in one batch."""
    eng = Engine(model, tok, max_batch_size=64, cache_tokens=8192)
    sp = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **kw)
    return [o.text for o in eng.generate(prompts_ids, sp)]


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until no request runs, waits or holds a cache block."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["dsv3_requests_running"] == m["dsv3_requests_waiting"] == m["dsv3_cache_blocks_used"] == 0 \
                and m["dsv3_requests_outstanding"] == 0:
            return m
        assert time.monotonic() < deadline, f"server not idle after {timeout}s: {m}"
        time.sleep(0.05)


def sse_events(url: str, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


# --- basic endpoints -------------------------------------------------------------------------------------
def test_models_health_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = metrics(server.url)
    assert m["dsv3_cache_blocks_total"] == 10 and "dsv3_spec_decode_acceptance_rate" in m
    assert m["dsv3_time_to_first_token_seconds_count"] >= 0


def test_completion_greedy_equals_offline(server, client, model, tok):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    (c,) = r.choices
    ids = tok.encode(PROMPTS[0])
    assert c.text == offline(model, tok, [ids], 12)[0]
    assert c.finish_reason in ("stop", "length") and c.index == 0
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    # token-id prompt, echo, batch of prompts
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, echo=True)
    assert r2.choices[0].text == tok.decode(ids, skip_special_tokens=True) + c.text
    rb = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    ref = offline(model, tok, [tok.encode(p) for p in PROMPTS[:3]], 6)
    assert [ch.index for ch in rb.choices] == [0, 1, 2] and [ch.text for ch in rb.choices] == ref


def test_chat(server, client, model, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alpha beta"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    ids = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜>be brief<｜User｜>alpha beta<｜Assistant｜>"
    assert r.usage.prompt_tokens == len(ids)
    assert c.message.content == offline(model, tok, [ids], 10)[0]
    # max_completion_tokens wins over max_tokens; default max_tokens = the server limit
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == MAX_TOKENS
    # DeepSeek chat prefix completion: the answer continues the given assistant prefix
    pre = messages + [{"role": "assistant", "content": "ro", "prefix": True}]
    r = client.chat.completions.create(model=MODEL, messages=pre, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == offline(model, tok, [ids + tok.encode("ro")], 5)[0]


def test_chat_template_matches_transformers(server, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    ref = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"] == ref


def test_a_template_that_reads_null_content_gets_none(model, tok):
    """An assistant turn with tool calls and `content: null` reaches the chat template as None (DeepSeek-V3's own
    template, from tokenizer_config.json, renders the calls only when content is none: as "" it rendered an empty
    turn); other messages' null content stays "". Two system messages are joined with "\n\n" (dsv3's template,
    as DeepSeek's)."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and m['content'] is none %}"
                "[calls:{{ m['tool_calls'] | length }}]{% else %}[{{ m['role'] }}:{{ m['content'] }}]{% endif %}"
                "{% endfor %}")
    eng = Engine(model, tok, max_batch_size=2, cache_tokens=256)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "r", "tool_call_id": "c1"}]
    with BackgroundServer(create_app(eng, tok, MODEL, chat_template=template)) as s:
        ids = httpx.post(s.url + "/tokenize", json={"messages": messages}).json()["tokens"]
    assert tok.decode(ids).endswith("[user:q][calls:1][tool:r]"), tok.decode(ids)
    eng = Engine(model, tok, max_batch_size=2, cache_tokens=256)
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:
        two = [{"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
               {"role": "user", "content": "q"}]
        ids = httpx.post(s.url + "/tokenize", json={"messages": two}).json()["tokens"]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜>S1\n\nS2<｜User｜>q<｜Assistant｜>"


# --- streaming ---------------------------------------------------------------------------------------------
def test_streaming_completion(server, client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.object == "text_completion" for ch in chunks)
    body, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(ch.choices[0].text for ch in body) == full.choices[0].text
    reasons = [ch.choices[0].finish_reason for ch in body]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])
    assert all(ch.usage is None for ch in body)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    # raw SSE: JSON events, no usage key without include_usage, terminated by [DONE]
    events = sse_events(server.url, "/v1/completions",
                        {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "stream": True})
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


def test_streaming_chat(server, client):
    messages = [{"role": "user", "content": "gamma delta"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    body = chunks[:-1]
    assert body[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].delta.role is None for ch in body[1:])
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == full.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in body][-1] == full.choices[0].finish_reason
    assert not any(ch.choices[0].finish_reason for ch in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


# --- FIM, logprobs, stop strings, n/seed ---------------------------------------------------------------------
def test_fim_suffix(server, client, model, tok):
    prefix, suffix = "def alpha(beta):\n    ", "\n    return gamma\n"
    r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=10, temperature=0)
    ids = [tok.fim_begin_id, *tok.encode(prefix), tok.fim_hole_id, *tok.encode(suffix), tok.fim_end_id]
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text == offline(model, tok, [ids], 10)[0]


def test_logprobs(server, client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and 1 <= len(top) <= 3 and top[t] == v
        assert v == pytest.approx(max(top.values()), abs=1e-6)  # greedy picks the most likely token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    # streamed, with a stop string that holds text back (never found): the same tokens, values and offsets (the
    # offsets once followed the text released, which lags behind the tokens while a stop string may begin)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3,
                                            stop="@@@@@@", stream=True, extra_body={"ignore_eos": True}))
    parts = [c.logprobs for ch in chunks for c in ch.choices if c.logprobs]
    for key in ("tokens", "text_offset", "top_logprobs"):
        assert [x for p in parts for x in getattr(p, key)] == getattr(lp, key), key
    assert [x for p in parts for x in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    # streamed logprobs: the same entries, spread over the chunks
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                                 stream=True))
    streamed = [e for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_stop_strings(server, client):
    base = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(base[i:i + 2] for i in range(3, len(base) - 2) if base[i:i + 2].strip())
    cut = base[:base.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop, "@@@"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_n_and_seed(server, client):
    kw = dict(model=MODEL, prompt=PROMPTS[4], max_tokens=8, temperature=1.0, n=3, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # choice j uses seed + j
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text


def test_extreme_sampling_values(client):
    """Found by the fuzz: a top_p or temperature that rounds to 0 in fp32 made every probability NaN and
    crashed the engine step (failing the whole batch). Now: top_p keeps the top token; temperatures
    below 1e-5 are greedy."""
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0).choices[0].text
    for kw in (dict(temperature=1e-300), dict(temperature=1.0, top_p=5e-324), dict(temperature=2.0, top_p=1e-9),
               dict(temperature=1e-30, extra_body={"repetition_penalty": 0.01})):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, seed=0, **kw)
        if "repetition_penalty" not in kw.get("extra_body", {}):
            assert r.choices[0].text == greedy, kw


# --- errors ------------------------------------------------------------------------------------------------
COMPLETION_ERRORS = [
    (dict(max_tokens=MAX_TOKENS + 1), openai.BadRequestError, "max_tokens"),
    (dict(prompt="alpha beta gamma " * 200), openai.BadRequestError, "prompt"),
    (dict(prompt=[5] * (MAX_PROMPT + 1)), openai.BadRequestError, "prompt"),
    (dict(prompt=[0, 1, 100000]), openai.BadRequestError, "prompt"),
    (dict(prompt=""), openai.BadRequestError, "prompt"),
    (dict(temperature=2.5), openai.BadRequestError, "temperature"),
    (dict(temperature=-1), openai.BadRequestError, "temperature"),
    (dict(top_p=0), openai.BadRequestError, "top_p"),
    (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
    (dict(logprobs=21), openai.BadRequestError, "logprobs"),
    (dict(echo=True, logprobs=1), openai.BadRequestError, "echo"),
    (dict(presence_penalty=0.5), openai.BadRequestError, "presence_penalty"),
    (dict(logit_bias={"5": 0, "7": 1.5}), openai.BadRequestError, "logit_bias"),
    (dict(best_of=3), openai.BadRequestError, "best_of"),
    (dict(n=17), openai.BadRequestError, "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, "stop"),
    (dict(stream_options={"include_usage": True}), openai.BadRequestError, "stream_options"),
    (dict(extra_body={"max_token": 5}), openai.BadRequestError, "max_token"),
    (dict(extra_body={"top_k": "many"}), openai.BadRequestError, "top_k"),
    (dict(model="gpt-4"), openai.NotFoundError, "model"),
]


@pytest.mark.parametrize("kw,exc,param", COMPLETION_ERRORS,
                         ids=[e[2] + str(i) for i, e in enumerate(COMPLETION_ERRORS)])
def test_completion_errors(client, kw, exc, param):
    args = dict(model=MODEL, prompt="alpha", max_tokens=4)
    args.update(kw)
    with pytest.raises(exc) as e:
        client.completions.create(**args)
    assert e.value.status_code == (404 if exc is openai.NotFoundError else 400)
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["param"] == param or body["param"].startswith(param + "."), body


def test_chat_errors(client):
    user = [{"role": "user", "content": "x"}]
    cases = [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
        (dict(messages=user, max_completion_tokens=MAX_TOKENS + 1), "max_completion_tokens"),
        (dict(messages=[{"role": "user", "content": "alpha " * 300}]), "messages"),
        (dict(messages=user, top_logprobs=2), "top_logprobs"),
        (dict(messages=user, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (dict(messages=user, response_format={"type": "json_object"}), "response_format"),
        (dict(messages=user + [{"role": "user", "content": "y", "prefix": True}]), "messages"),
        (dict(messages=[{"role": "user"}]), "messages.0"),  # as OpenAI: content is required ...
        (dict(messages=user + [{"role": "assistant", "content": None}]), "messages.1"),  # ... without tool calls
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)


def test_malformed_http(server):
    url = server.url
    for content, headers, needle in [
        (b"{not json", {"content-type": "application/json"}, "Invalid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, "JSON object"),
        (b'{"model": "x", "prompt": "y"}', {"content-type": "text/plain"}, "Content-Type: application/json"),
        (b"", {"content-type": "application/json"}, "missing"),
        (b'{"model": "tiny-dsv3", "prompt": "\\ud800"}', {"content-type": "application/json"}, "Unicode"),
        (b'{"model": "tiny-dsv3", "prompt": "a", "temperature": NaN}', {"content-type": "application/json"},
         "temperature"),
    ]:
        r = httpx.post(url + "/v1/completions", content=content, headers=headers)
        assert r.status_code == 400, (content, r.text)
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", (content, err)
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(url + "/health").status_code == 200


def test_api_key(model, tok):
    eng = Engine(model, tok, max_batch_size=2, cache_tokens=256)
    with BackgroundServer(create_app(eng, tok, MODEL, api_key="sekret", max_tokens_limit=8)) as s:
        for key in ("wrong", "sekret2"):
            bad = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as e:
                bad.completions.create(model=MODEL, prompt="a", max_tokens=2)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "a"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="a", max_tokens=2).choices[0].finish_reason
        # issue 13: the key guards every route but /health (a load balancer's probe), not only /v1
        auth = {"Authorization": "Bearer sekret"}
        for method, path, body in [("POST", "/tokenize", {"prompt": "alpha"}), ("POST", "/detokenize", {"tokens": [5]}),
                                   ("GET", "/metrics", None), ("GET", "/openapi.json", None), ("GET", "/docs", None),
                                   ("GET", "/no-such-route", None)]:
            r = httpx.request(method, s.url + path, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
            r = httpx.request(method, s.url + path, json=body, headers=auth)
            assert r.status_code == (404 if path == "/no-such-route" else 200), (path, r.text)
        assert httpx.post(s.url + "/tokenize", json={"prompt": "alpha"}, headers=auth).json()["tokens"] == \
            tok.encode("alpha")
        assert httpx.get(s.url + "/health").status_code == 200


def test_cli_serve(tmp_path, model, tok):
    """`dsv3 serve CHECKPOINT` in another process: loads the checkpoint with its tokenizer and chat
    template, binds 127.0.0.1, requires the API key, and exits cleanly on Ctrl-C."""
    import signal
    import subprocess

    from dsv3.checkpoints.hf import save_pretrained

    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt)
    tok.save(ckpt)
    from tests.distributed.harness import cli_process, free_port

    port = free_port()
    # a process forked from the distributed tests' fork server (torch and dsv3 imported once; as Popen)
    proc = cli_process(["serve", ckpt, "--port", port, "--api-key", "k", "--max-batch-size", "4", "--cache-tokens",
                        "1024", "--speculative-k", "1", "--log-level", "warning", "--record-expert-loads",
                        tmp_path / "loads.pt"], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], timeout=60)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["ckpt"]
        r = c.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "alpha"}], max_tokens=5,
                                      temperature=0)
        ids = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "alpha"}]},
                         headers={"Authorization": "Bearer k"}).json()["tokens"]
        assert r.choices[0].message.content == offline(model, tok, [ids], 5)[0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert proc.returncode == 0, out
    assert f"serving {ckpt} as 'ckpt' on http://127.0.0.1:{port}/v1" in out
    # --record-expert-loads: written when the server stops; the request's prompt and its 5 tokens (with their
    # verified drafts) went through every MoE block of the main model alike
    from dsv3.checkpoints.loads import load_counts

    counts, K = load_counts(str(tmp_path / "loads.pt")), model.config.num_experts_per_tok
    main = len(model.routers()) - model.config.num_nextn_predict_layers
    assert counts.shape == (len(model.routers()), model.config.n_routed_experts)
    assert (counts[:main].sum(1) == counts[0].sum()).all() and counts[0].sum() >= K * (len(ids) + 4)
    assert counts[main:].sum() > 0  # the MTP module drafted
    assert f"wrote the expert loads ({counts.shape[0]} MoE blocks" in out


def _run_layout(root, steps=(3, 6)):
    """A run directory RUN/checkpoints/step_* whose checkpoints hold the files resolve_checkpoint looks for."""
    for s in steps:
        ck = root / "checkpoints" / f"step_{s:08d}"
        ck.mkdir(parents=True)
        (ck / "config.json").write_text("{}", encoding="utf-8")
        (ck / "trainer_state.json").write_text("{}", encoding="utf-8")
    return root


def test_run_name_is_stable_across_checkpoints(tmp_path, monkeypatch):
    from dsv3.checkpoints.rundir import run_name

    run = _run_layout(tmp_path / "runs" / "tiny")
    assert run_name(str(run)) == run_name(str(run) + "/") == "tiny"
    for s in ("step_00000003", "step_00000006"):
        assert run_name(str(run / "checkpoints" / s)) == "tiny"
    plain = tmp_path / "DeepSeek-V3"  # a checkpoint directory outside a run: its own name
    plain.mkdir()
    assert run_name(str(plain)) == "DeepSeek-V3"
    stray = tmp_path / "elsewhere" / "step_00000009"  # a step_ name, but not under RUN/checkpoints
    stray.mkdir(parents=True)
    assert run_name(str(stray)) == "step_00000009"
    monkeypatch.chdir(run)
    assert run_name(".") == "tiny"


def test_cli_serve_names_the_model_after_the_run(tmp_path, monkeypatch, capsys):
    """`dsv3 serve RUN` serves the run's latest checkpoint as RUN's name (not step_*, which changes after
    every resume), a checkpoint of the run the same way; --served-model-name (or --model-name) wins."""
    import types

    import dsv3.inference.server as server
    from dsv3.cli import main

    run = _run_layout(tmp_path / "tiny")
    fake = types.SimpleNamespace(cache=types.SimpleNamespace(num_blocks=4, block_size=16), max_model_len=64)
    served = []
    monkeypatch.setattr(server, "load_for_serving", lambda path, **kw: (fake, "tok"))
    monkeypatch.setattr(server, "serve", lambda engine, tok, name, **kw: served.append(name))
    sock = types.SimpleNamespace(getsockname=lambda: ("127.0.0.1", 8000), close=lambda: None)
    monkeypatch.setattr(server, "listen", lambda host, port: sock)  # (no socket bound by this test)
    for argv, want in (([run], "tiny"), ([run / "checkpoints" / "step_00000003"], "tiny"),
                       ([run, "--served-model-name", "mine"], "mine"), ([run, "--model-name", "old"], "old")):
        assert main(["serve", *map(str, argv)]) == 0
        assert served[-1] == want
        assert f"as {want!r} on http://" in capsys.readouterr().out



def test_create_app_refuses_limits_below_their_least(model, tok):
    """The library's server refuses what `dsv3 serve` refuses before its load (a negative limit made a server that
    refused every request), naming the argument."""
    eng = Engine(model, tok, max_batch_size=2, cache_tokens=256)
    for kw, want in (({"max_queue": -1}, "max_queue must be >= 0, got -1"),
                     ({"max_tokens_limit": -5}, "max_tokens_limit must be >= 0 (0: context), got -5"),
                     ({"max_prompt_tokens": -2}, "max_prompt_tokens must be >= 0"),
                     ({"max_request_bytes": 0}, "max_request_bytes must be >= 1, got 0"),
                     ({"prep_workers": 0}, "prep_workers must be >= 1, got 0")):
        with pytest.raises(ValueError, match=re.escape(want)):
            create_app(eng, tok, MODEL, **kw)
    create_app(eng, tok, MODEL, max_queue=0, max_prompt_tokens=None)  # the least values and the defaults pass

def test_cli_serve_binds_before_loading_and_prints_the_port_it_got(tmp_path, monkeypatch, capsys):
    """`dsv3 serve` binds its socket before the model loads and serves on that socket; with --port 0 the line
    it prints names the port the system chose; the socket is closed when serving returns."""
    import types

    import dsv3.inference.server as server
    from dsv3.cli import main

    run = _run_layout(tmp_path / "tiny")
    fake = types.SimpleNamespace(cache=types.SimpleNamespace(num_blocks=4, block_size=16), max_model_len=64)
    socks = []

    def load(path, **kw):
        assert len(socks) == 1  # bound already
        return fake, "tok"

    real_listen = server.listen
    monkeypatch.setattr(server, "listen", lambda host, port: socks.append(real_listen(host, port)) or socks[-1])
    monkeypatch.setattr(server, "load_for_serving", load)
    served = []
    monkeypatch.setattr(server, "serve", lambda engine, tok, name, sock, **kw: served.append(sock))
    assert main(["serve", str(run), "--port", "0"]) == 0
    (sock,) = socks
    assert served == [sock] and sock.fileno() == -1  # served on it, then closed
    port = int(capsys.readouterr().out.split("on http://127.0.0.1:")[1].split("/")[0])
    assert port > 0

# --- hardening (issue 13): strict types, limits before work, auth, defaults, a responsive event loop ----------
SHARED_LOOSE = [  # (field, value) of both generation routes that the OpenAI API answers with a 400
    ("n", "2"), ("n", True), ("max_tokens", True), ("max_tokens", 2.0), ("temperature", "0.5"), ("top_p", True),
    ("stream", "false"), ("stream", 0), ("seed", "7"), ("seed", 7.5), ("presence_penalty", "0"),
    ("frequency_penalty", False), ("top_k", "1"), ("min_p", "0.1"), ("repetition_penalty", True),
    ("ignore_eos", "true"), ("ignore_eos", 1), ("stop", 5), ("stop", ["a", 5]), ("stop_token_ids", ["1"]),
    ("stop_token_ids", [True]), ("user", 5), ("model", 5), ("stream_options", {"include_usage": "yes"}),
    ("logit_bias", []), ("metadata", {"k": 1}), ("store", "no"),
]
COMPLETION_LOOSE = [("echo", "yes"), ("logprobs", "1"), ("logprobs", True), ("best_of", "1"), ("suffix", 5),
                    ("prompt", 5), ("prompt", [True]), ("prompt", [1.5]), ("prompt", [[1], "a"])]
CHAT_LOOSE = [("logprobs", 1), ("top_logprobs", "2"), ("max_completion_tokens", "5"), ("chat_template_kwargs", "x"),
              ("parallel_tool_calls", "no"), ("tool_choice", 5), ("messages", "hi")]


def test_strict_types(server):
    """A bool is not an integer and a string is not a number or a bool, on both generation routes and
    every field; an integer is a number (temperature: 1 is fine)."""
    user = [{"role": "user", "content": "x"}]
    cases = [("/v1/completions", {"prompt": "alpha"}, f, v) for f, v in SHARED_LOOSE + COMPLETION_LOOSE] + \
        [("/v1/chat/completions", {"messages": user}, f, v) for f, v in SHARED_LOOSE + CHAT_LOOSE]
    for path, base, field, value in cases:
        r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 2, **base, field: value}, timeout=30)
        assert r.status_code == 400, (path, field, value, r.text)
        err = r.json()["error"]
        assert err["param"] == field or err["param"].startswith(field + "."), (path, field, value, err)
    call = {"function": {"name": "f", "arguments": 5}}
    for value in [[{"role": "user", "content": 5}], [{"role": "user", "content": "x", "prefix": "yes"}],
                  [{"role": "assistant", "tool_calls": [call]}]]:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": value, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0."), r.text
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "alpha", "max_tokens": 2,
                                                         "temperature": 1, "top_p": 1, "stream": False, "seed": 7})
    assert r.status_code == 200, r.text


def test_non_finite_numbers_are_named_as_such(server):
    """NaN or inf in a number field (JSON's NaN / Infinity literals, which Python's json writes) is "Input should be
    a finite number", not a range's message ("should be less than or equal to 2" for a NaN temperature)."""
    for field in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
        for value in ("NaN", "Infinity", "-Infinity"):
            body = f'{{"model": "{MODEL}", "prompt": "alpha", "max_tokens": 2, "{field}": {value}}}'
            r = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == field and "finite number" in err["message"], (field, err)


def test_openai_fields_at_their_neutral_values_and_the_clients_round_trip(server, client):
    """The usual next turn, `messages.append(resp.choices[0].message.model_dump())` (refusal, audio, function_call
    null, annotations), and OpenAI's newer or deprecated request fields at neutral values are accepted (an audit with
    openai 3.x got "Unrecognized request argument supplied: messages.1.refusal"); a value this server cannot honour
    is a 400 naming it."""
    user = {"role": "user", "content": "alpha"}
    r = client.chat.completions.create(model=MODEL, messages=[user], max_tokens=3, temperature=0)
    turn = r.choices[0].message.model_dump()
    assert {"refusal", "audio", "function_call"} <= set(turn) and turn["refusal"] is None
    r2 = client.chat.completions.create(model=MODEL, messages=[user, turn, {"role": "user", "content": "beta"}],
                                        max_tokens=3, temperature=0, safety_identifier="u-1", prompt_cache_key="k",
                                        extra_body={"modalities": ["text"], "functions": [], "function_call": "none"})
    said = {"role": "assistant", "content": turn["content"]}
    plain = client.chat.completions.create(model=MODEL, messages=[user, said, {"role": "user", "content": "beta"}],
                                           max_tokens=3, temperature=0)
    assert r2.choices[0].message.content == plain.choices[0].message.content  # the extra fields change nothing
    for extra, param in (({"messages": [user, {**turn, "refusal": "no"}]}, "messages.1"),
                         ({"messages": [user, {**turn, "audio": {"id": "a"}}]}, "messages.1"),
                         ({"functions": [{"name": "f"}]}, "functions"),
                         ({"function_call": {"name": "f"}}, "function_call"),
                         ({"modalities": ["audio"]}, "modalities")):
        body = {"model": MODEL, "messages": [user], "max_tokens": 2, **extra}
        e = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert e.status_code == 400 and e.json()["error"]["param"].startswith(param), (extra, e.text)


def test_error_names_the_bad_element(server):
    """A bad token id is named by its position (it was "Invalid value for 'prompt.str' ... (and 5 more
    errors)"); the union fields answer with one message."""
    url = server.url
    for path, body, param, message in [
        ("/v1/completions", {"prompt": [5, 6, 7, -1]}, "prompt", "prompt[3] = -1 is not a token id (0..511)"),
        ("/v1/completions", {"prompt": [5, 600]}, "prompt", "prompt[1] = 600 is not a token id (0..511)"),
        ("/v1/completions", {"prompt": [[5], [6, -2]]}, "prompt", "prompt[1][1] = -2 is not a token id (0..511)"),
        ("/v1/completions", {"prompt": [5, True]}, "prompt", "prompt[1] is a boolean, not a token id (0..511)"),
        ("/v1/completions", {"prompt": ["a", 5]}, "prompt", "prompt[1] is an integer; a list of prompts holds strings"),
        ("/v1/completions", {"prompt": "a", "stop_token_ids": [1, 512]}, "stop_token_ids",
         "stop_token_ids[1] = 512 is not a token id (0..511)"),
        ("/v1/completions", {"prompt": "a", "stop": 5}, "stop", "'stop' must be a string or a list of at most 4"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens", "tokens[1] = -1 is not a token id (0..511)"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]},
         "messages.0.content", "content[0].type: Input should be 'text'"),
    ]:
        r = httpx.post(url + path, json={"model": MODEL, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"].startswith(message) and "more error" not in err["message"], err


class _TokenizerSpy:
    """Counts the server's ways into the tokenizer's encoder (before and after issue 13)."""

    def __init__(self, tok):
        self._tok, self.calls = tok, 0

    def __getattr__(self, name):
        if name in ("encode", "encode_batch", "tokenizer"):
            self.calls += 1
        return getattr(self._tok, name)


@pytest.fixture
def spy(server):
    srv, real = server.srv.prep, server.srv.prep.tok
    srv.tok = _TokenizerSpy(real)
    try:
        yield srv.tok
    finally:
        srv.tok = real


def test_refused_before_tokenising(server, spy, tok, tok_dir):
    """A prompt too long for the context whatever its tokenisation, and a batch with more choices than
    the server's bound, are 400s before any text is tokenised."""
    longest = max(len(tok.decode_bytes([i])) for i in range(tok.vocab_size))  # 30: a special token
    big = "alpha beta " * (MAX_PROMPT * longest // 10)  # more bytes than MAX_PROMPT of the longest tokens
    answers = [httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 2, **body}) for path, body in [
        ("/v1/completions", {"prompt": big}), ("/v1/completions", {"prompt": "a", "suffix": big}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
        ("/v1/completions", {"prompt": ["alpha"] * 10, "n": 8})]]
    assert spy.calls == 0
    for r, param in zip(answers, ["prompt", "suffix", "messages"]):
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param, err
        assert err["message"].startswith("The prompt has at least"), err
    r = answers[-1]
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "80 choices" in r.text, r.text
    # the bound: the longest token, and none when a normalizer could shrink the text or a special
    # token eats the whitespace around it
    from tokenizers import AddedToken, normalizers

    from dsv3.inference.prep import _max_token_bytes

    assert server.srv.prep.max_token_bytes == longest == 30
    shrinks = DSTokenizer.load(tok_dir)
    shrinks.tokenizer.normalizer = normalizers.Strip()
    assert _max_token_bytes(shrinks) == 0
    eats = DSTokenizer.load(tok_dir)
    eats.tokenizer.add_special_tokens([AddedToken("<sep>", rstrip=True)])
    assert _max_token_bytes(eats) == 0 and _max_token_bytes(DSTokenizer.load(tok_dir)) == 30


def test_chat_without_max_tokens_gets_what_fits(model, tok):
    """With no max_tokens a chat request gets the context left after the prompt, capped by the cache
    (it was the whole context: a 400 for a limit the client never set) and by one batch slot's share of it (it
    was the whole cache: one such request held it, and chats ran one at a time), a completion OpenAI's 16 or
    what fits if less; a prompt that does not fit is blamed on the prompt, not on max_tokens."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "alpha"}], "ignore_eos": True}
    eng = Engine(model, tok, max_batch_size=4, cache_tokens=128)  # context 512, 128 cache tokens: 32 a slot
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32, r.text  # not 128 - 1 - prompt
    eng = Engine(model, tok, max_batch_size=1, cache_tokens=64)  # context 512, cache 64 tokens, one slot
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == 64 - 1 - usage["prompt_tokens"]  # 1: the draft room of k = 0
        body["messages"][0]["content"] = "alpha beta gamma " * 40
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages" and err["code"] == "context_length_exceeded", err
        # the same on /v1/completions: its default of 16 is lowered to the 8 tokens that fit
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": [5] * 55, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": [5] * 64})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.parametrize("k", [1, 4, 6])
def test_default_max_tokens_leave_the_engines_draft_room(model, tok, k):
    """The server's limits reserve the cache positions the engine reserves past a completion (Engine.spare): k + 1,
    but 2k - 2 for k >= 4 (chained drafts). They reserved k + 1, so at k >= 4 a chat without max_tokens got a
    default the engine then refused (a 400 for a limit the client never set), as did a max_tokens the server's check
    had let through."""
    eng = Engine(model, tok, max_batch_size=1, cache_tokens=64, speculative_k=k)
    prep = create_app(eng, tok, MODEL).state.server.prep
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "alpha"}]}
    work = prep.run("chat", json.dumps(chat).encode(), True)
    (ids,), (sp,) = work.prompts, work.params
    assert len(ids) + sp.max_new_tokens + eng.spare == 64  # the whole cache, not a token more
    eng.abort(eng.add_request(ids, sp))
    from dsv3.inference.protocol import APIError

    with pytest.raises(APIError, match="KV cache"):  # one more: refused by the server's own check, naming the cache
        prep.run("chat", json.dumps({**chat, "max_tokens": sp.max_new_tokens + 1}).encode(), True)


def _raw_http(url: str, head: bytes, chunks=(), timeout: float = 10) -> tuple[int, dict, bytes]:
    """One request over a socket: send `head` then `chunks`, read the response (status, headers, body)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for c in chunks:
            sock.sendall(c)
        data = b""
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            assert got, f"connection closed before a response: {data!r}"
            data += got
        head_text, body = data.split(b"\r\n\r\n", 1)
        lines = head_text.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_client_gone_before_its_body_leaves_no_traceback(model, tok, capfd):
    """A client that announces 5,000 bytes, sends 7 and closes: no traceback on the server's stderr (it was the
    catch-all's "internal error" print of starlette's ClientDisconnect), a 499 in the metrics as for any client
    gone, and the server keeps answering."""
    import socket

    eng = Engine(model, tok, max_batch_size=2, cache_tokens=256)
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000\r\n\r\n{\"a\": 1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 'status="499"' not in httpx.get(s.url + "/metrics").text:
            time.sleep(0.05)
        assert 'status="499"' in httpx.get(s.url + "/metrics").text
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ClientDisconnect" not in err, err


def test_body_limit_413(model, tok):
    """Bodies over max_request_bytes (8 MiB by default) are 413s: from Content-Length before the body
    is read, and while reading a chunked body (neither request sends its whole body: the server must
    answer without it)."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"  # 64 KiB
    eng = Engine(model, tok, max_batch_size=2, cache_tokens=256)
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:
        status, _, body = _raw_http(s.url, head + b"Content-Length: 1000000000\r\n\r\n")
        err = json.loads(body)["error"]
        assert status == 413 and err["code"] == "request_too_large" and "8388608 bytes" in err["message"], body
        status, _, body = _raw_http(s.url, head + b"Transfer-Encoding: chunked\r\n\r\n", [chunk] * 129)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", body
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "a " * 4_000_000})  # 8 MB: read
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert metrics(s.url)['dsv3_requests_total{endpoint="/v1/completions",status="413"}'] == 2
    with BackgroundServer(create_app(eng, tok, MODEL, max_request_bytes=100_000)) as s:  # dsv3 serve's flag
        status, _, body = _raw_http(s.url, head + b"Content-Length: 100001\r\n\r\n")
        assert status == 413 and "100000 bytes" in json.loads(body)["error"]["message"], body
        assert httpx.post(s.url + "/tokenize", json={"prompt": "alpha " * 16_000}).status_code == 200  # 96 KB


def test_event_loop_stays_responsive(model, tok):
    """Large requests in flight (two /tokenize of 0.6 MB of text, a /detokenize of 450K ids and a
    completion with a 450K-id prompt, 2 MB of JSON each) stall neither the event loop nor the engine:
    /health and a small completion keep answering within 100 ms (p99) of their times on the idle
    server, the start of the preparation workers included (the first large body starts them).
    Relative to the idle figures because the test machine's cores may be shared with other work.
    Before issue 13 both took a second or more (tokenisation ran on the event loop); with the large
    bodies prepared on threads, the small completion took up to ~300 ms longer (its engine steps need
    the GIL, which a thread turning megabytes of JSON into Python lists held ~40 ms at a time)."""
    import socket

    eng = Engine(model, tok, max_batch_size=4, cache_tokens=256)
    rng = random.Random(2)
    text = " ".join(rng.choices(["alpha", "beta", "gamma", "ro", "mi", "(", ")", "\n"], k=200_000))[:600_000]
    ids = rng.choices(range(20, 512), k=450_000)
    bodies = [("/tokenize", json.dumps({"prompt": text})), ("/tokenize", json.dumps({"prompt": text[::-1]})),
              ("/detokenize", json.dumps({"tokens": ids})),
              ("/v1/completions", json.dumps({"model": MODEL, "prompt": ids[::-1], "max_tokens": 2}))]
    # no Nagle: a request's header and body writes would wait for the server's delayed ACK (~40 ms)
    nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    small = {"model": MODEL, "prompt": "alpha", "max_tokens": 2, "temperature": 0}
    with BackgroundServer(create_app(eng, tok, MODEL)) as s, httpx.Client(base_url=s.url, timeout=60,
                                                                           transport=nodelay) as c:
        def probe(lat: dict) -> None:
            for name, call in (("health", lambda: c.get("/health")),
                               ("completion", lambda: c.post("/v1/completions", json=small))):
                t = time.monotonic()
                assert call().status_code == 200
                lat[name].append(time.monotonic() - t)

        idle = {"health": [], "completion": []}
        for _ in range(15):
            probe(idle)
        results = {}

        def send(i, path, body):  # one sendall and recv: this process's client side holds the GIL very little
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            data = body.encode()
            results[i] = _raw_http(s.url, f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data, timeout=120)

        threads = [threading.Thread(target=send, args=(i, *b)) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        busy = {"health": [], "completion": []}
        while any(t.is_alive() for t in threads):
            probe(busy)
        for t in threads:
            t.join()

    def p99(xs):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))]

    figures = {k: f"{p99(busy[k]) * 1e3:.0f} ms busy ({len(busy[k])}), {p99(idle[k]) * 1e3:.0f} ms idle" for k in busy}
    print("p99:", figures)
    assert p99(busy["health"]) < p99(idle["health"]) + 0.1, figures
    assert p99(busy["completion"]) < p99(idle["completion"]) + 0.1, figures
    assert len(busy["health"]) >= 5, figures  # probed while the large requests ran
    assert [results[i][0] for i in range(4)] == [200, 200, 200, 400]
    out = [json.loads(results[i][2]) for i in range(4)]
    assert out[0]["tokens"] == tok.encode(text) and out[1]["count"] == len(out[1]["tokens"]) > 0
    assert out[2]["prompt"] == tok.decode(ids) and out[3]["error"]["code"] == "context_length_exceeded"


def test_large_bodies_answer_as_small_ones(server, tok):
    """A body over 64 KiB is prepared in a worker process (server.py): padded with whitespace past that
    size, every request gets the answer the same request gets in the server's own process, errors
    (status, message, param, code) included."""
    ids = tok.encode(PROMPTS[0])
    cases = [
        ("/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 4, "temperature": 0}),
        ("/v1/completions", {"model": MODEL, "prompt": [PROMPTS[1], PROMPTS[2]], "max_tokens": 3, "temperature": 0,
                             "echo": True}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[3]}],
                                  "max_tokens": 3, "temperature": 0}),
        ("/tokenize", {"prompt": PROMPTS[4]}), ("/detokenize", {"tokens": ids}),
        ("/v1/completions", {"model": MODEL, "prompt": [5, 600, 7], "max_tokens": 2}),  # not a token id
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_token": 2}),  # unknown field
        ("/v1/completions", {"model": "other", "prompt": "a"}),  # 404
        ("/v1/completions", {"model": MODEL, "prompt": "alpha " * 400}),  # too long
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a", "prefix": True}]}),
        ("/v1/completions", b'{"model": "m", "prompt": [1,,2]}'),  # invalid JSON
    ]

    def answer(path, body, pad):
        data = (body if isinstance(body, bytes) else json.dumps(body).encode()) + b" " * pad
        r = httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, timeout=60)
        out = r.json()
        for k in ("id", "created"):
            out.pop(k, None)
        return r.status_code, out

    for path, body in cases:
        small, large = answer(path, body, 0), answer(path, body, 70_000)
        assert small == large, (path, body)
    assert server.srv.pool is not None
    statuses = [answer(path, body, 0)[0] for path, body in cases]
    assert statuses == [200] * 5 + [400, 400, 404, 400, 400, 400], statuses


# --- admission, queue bound, disconnects -----------------------------------------------------------------------
class SlowEngine(Engine):
    """Each step takes at least 10 ms, so that a long request is reliably still running when its
    client goes away (the tiny model would otherwise finish it in about a second)."""

    def step(self):
        time.sleep(0.01)
        return super().step()


@pytest.fixture
def one_slot(model, tok):
    """A server with room for one running request and no queue."""
    eng = SlowEngine(model, tok, max_batch_size=1, cache_tokens=512)
    with BackgroundServer(create_app(eng, tok, MODEL, max_queue=0)) as s:
        yield s


LONG = {"model": MODEL, "prompt": "alpha", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def test_queue_full_503_then_slot_frees(one_slot):
    url = one_slot.url
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()  # keep the iterator: dropping it closes the response
        assert next(lines).startswith("data: ")  # the request is admitted and streaming
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="beta", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"  # issue 13: when to come back
    m = wait_idle(url)  # closing the stream aborted the request and freed its slot and blocks
    assert m["dsv3_requests_aborted_total"] == 1 and m["dsv3_requests_rejected_queue_full_total"] == 1
    assert c.completions.create(model=MODEL, prompt="beta", max_tokens=2).choices[0].text is not None


def test_disconnect_mid_stream_frees_slot(one_slot):
    url = one_slot.url
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={**{k: v for k, v in LONG.items() if k != "prompt"}, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a few tokens
        assert any('"content"' in g for g in got)
        m = metrics(url)
        assert m["dsv3_requests_running"] == 1 and m["dsv3_cache_blocks_used"] > 0
    m = wait_idle(url, timeout=10)
    assert m["dsv3_requests_aborted_total"] == 1 and m["dsv3_client_disconnects_total"] == 1
    assert m["dsv3_generation_tokens_total"] < 300  # stopped early, not run to max_tokens


def test_disconnect_non_streaming_frees_slot(one_slot):
    url = one_slot.url
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.5))
    m = wait_idle(url, timeout=10)
    assert m["dsv3_requests_aborted_total"] == 1 and m["dsv3_client_disconnects_total"] == 1
    assert m['dsv3_requests_total{endpoint="/v1/completions",status="499"}'] == 1
    assert m["dsv3_generation_tokens_total"] < 300
    r = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_neutral_logit_bias_is_accepted(client):
    """logit_bias whose biases are all 0 changes nothing: accepted, as OpenAI and vLLM accept it (only {} was)."""
    a = client.completions.create(model=MODEL, prompt="alpha", max_tokens=3, temperature=0, logit_bias={"5": 0})
    b = client.completions.create(model=MODEL, prompt="alpha", max_tokens=3, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_cors_only_for_the_allowed_origins(model, tok):
    """--allowed-origins: a browser page of such an origin may call the API (its preflight answered before the API
    key check, which a preflight cannot pass; the answers, 401s included, carry the CORS headers); other origins,
    and every origin without the flag, get no CORS headers. A malformed origin is a clear error."""
    from dsv3.inference.server import origins

    eng = Engine(model, tok, max_batch_size=2, cache_tokens=256)
    pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    body = {"model": MODEL, "prompt": "alpha", "max_tokens": 2}
    with BackgroundServer(create_app(eng, tok, MODEL, api_key="k", allowed_origins=origins(
            "http://localhost:3000, https://ui.example"))) as s:
        r = httpx.options(s.url + "/v1/completions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        ok = httpx.post(s.url + "/v1/completions", json=body, timeout=30,
                        headers={"Origin": "https://ui.example", "Authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
        denied = httpx.post(s.url + "/v1/completions", json=body, headers={"Origin": "http://localhost:3000"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.post(s.url + "/v1/completions", json=body, timeout=30,
                           headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:  # the default: no CORS
        assert "access-control-allow-origin" not in httpx.options(s.url + "/v1/completions", headers=pre).headers
    assert origins(" * ") == ["*"] and origins("") == []
    for bad in ("localhost:3000", "http://x.example/", "http://x.example/app"):
        with pytest.raises(ValueError, match=f"--allowed-origins: {re.escape(repr(bad))} is not an origin"):
            origins(bad)


def test_shutdown_answers_in_flight_requests_with_503_in_the_openai_shape(model, tok):
    """Ctrl-C / SIGTERM while requests run (`dsv3 serve`'s uvicorn_server, grace 2 s here, 5 s there): they run on
    for grace - 1 s, then the non-streaming one gets the OpenAI-shaped JSON 503 "the server is shutting down" and
    the stream its error event and `data: [DONE]`, before uvicorn cancels. (uvicorn cancelled the handlers first:
    a text/plain 500, retried by the openai client against a closed port, and a stream cut mid-chunk.)"""
    eng = SlowEngine(model, tok, max_batch_size=2, cache_tokens=1024)
    s = BackgroundServer(create_app(eng, tok, MODEL), grace=2.0).start()
    got: dict = {}

    def plain():
        got["plain"] = httpx.post(s.url + "/v1/completions", json=LONG, timeout=30)

    def stream():
        with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
            got["stream"] = [ln for ln in r.iter_lines() if ln]

    threads = [threading.Thread(target=f, daemon=True) for f in (plain, stream)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while metrics(s.url)["dsv3_requests_running"] < 2:  # both admitted and generating
        assert time.monotonic() < deadline, "the requests did not start"
        time.sleep(0.05)
    t0 = time.monotonic()
    s.stop()
    for t in threads:
        t.join(20)
    took = time.monotonic() - t0
    r = got["plain"]
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
    assert r.json()["error"]["message"] == "the server is shutting down"
    lines = got["stream"]
    assert len(lines) > 3 and lines[-1] == "data: [DONE]", lines[-3:]
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["message"] == "the server is shutting down"
    assert 0.9 < took < 3.0  # (ran on for grace - 1 s; nothing waited for the cancel)


class FlakyEngine(Engine):
    """Its step raises once, on demand, before touching any state (a stand-in for a model failure)."""

    fail_next = False

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated device failure")
        time.sleep(0.005)
        return super().step()


def test_engine_failure_fails_requests_not_server(model, tok):
    eng = FlakyEngine(model, tok, max_batch_size=4, cache_tokens=1024)
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:
        with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            eng.fail_next = True
            events = [line for line in lines if line.startswith("data: ")]
        err = json.loads(events[-2][len("data: "):])["error"]
        assert events[-1] == "data: [DONE]" and err["type"] == "server_error" and "simulated" in err["message"]
        m = wait_idle(s.url)
        assert m["dsv3_client_disconnects_total"] == 0
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.post(s.url + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3



def _dying_loop():
    """(an EngineLoop whose step is running and raises once `gate` is set, gate): a loop about to die."""
    import threading
    from types import SimpleNamespace

    from dsv3.inference.engine_loop import EngineLoop

    started, gate = threading.Event(), threading.Event()

    def step():
        started.set()
        gate.wait(5)
        raise RuntimeError("simulated")

    stats = SimpleNamespace(steps=0, generated_tokens=0, prefill_tokens=0, drafted=0, accepted=0)
    eng = SimpleNamespace(has_unfinished=lambda: True, step=step, num_running=1, num_waiting=0, stats=stats,
                          cache=SimpleNamespace(free_blocks=0, num_blocks=4), abort=lambda rid: False)
    loop = EngineLoop(eng)
    loop.start()
    assert started.wait(5)
    return loop, gate

def test_engine_loop_call_is_answered_when_the_loop_has_died():
    """EngineLoop.call (GET /expert_loads) after the loop ended on an inconsistent engine: a 503 at once, and a call
    queued before it died fails with it, rather than a future nobody completes."""
    from dsv3.inference.protocol import APIError

    loop, gate = _dying_loop()
    queued = loop.call(lambda e: 1)  # queued while the failing step runs
    gate.set()
    with pytest.raises(APIError, match="engine loop stopped"):
        queued.result(timeout=10)
    assert not loop.alive
    with pytest.raises(APIError, match="engine loop stopped"):
        loop.call(lambda e: 1).result(timeout=1)


def test_engine_loop_answers_requests_submitted_while_it_dies():
    """A request submitted while the step that kills the loop runs (the server checked `alive` before), or at the
    moment it stops: its sink gets a 503, not nothing (the loop drained it with the queued calls and dropped it,
    so the client waited forever)."""
    import queue
    from dsv3.inference.protocol import APIError

    loop, gate = _dying_loop()
    during, after = queue.SimpleQueue(), queue.SimpleQueue()
    loop.submit([("a", [1, 2], SamplingParams())], during.put)  # queued while the failing step runs
    gate.set()
    err = during.get(timeout=10)
    assert isinstance(err, APIError) and err.status == 503 and "engine loop stopped" in str(err)
    assert not loop.alive
    loop.submit([("b", [1, 2], SamplingParams())], after.put)
    assert isinstance(after.get(timeout=1), APIError)


# --- fuzz -----------------------------------------------------------------------------------------------------
def test_schemathesis_fuzz(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}

    def keep_or_fix(case, keep):  # 4 cases in 5 name the served model, so that they reach the engine
        if not keep and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
        return case

    seen = []
    for op in ops:
        post, generating = op.method.upper() == "POST", op.path in ("/v1/completions", "/v1/chat/completions")
        # the GETs take no input that could be invalid (a path segment is any string)
        for mode in [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * post:
            examples = (50 if generating and mode == GenerationMode.POSITIVE else 20) if post else 5
            strategy = st.builds(keep_or_fix, op.as_strategy(generation_mode=mode),
                                 st.integers(0, 4).map(lambda i: i == 4))

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=strategy)
            def run(case):
                response = case.call(base_url=server.url, timeout=30)
                seen.append(response.status_code)
                case.validate_response(response, checks=[not_a_server_error])

            run()
    assert all(s < 500 for s in seen) and 200 in seen and 400 in seen
    assert httpx.get(server.url + "/health").status_code == 200
    m = wait_idle(server.url)
    assert not any(k.startswith("dsv3_requests_total") and 'status="5' in k for k in m)


# --- load ----------------------------------------------------------------------------------------------------
def test_load_32_streaming_clients(server, model, tok):
    """32 concurrent streaming clients, 3 requests each (completions and chat), greedy: every request
    completes, and every output equals offline Engine.generate (no speculation, one big batch)."""
    n_clients, per_client, max_tokens = 32, 3, 10
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "ro", "mi", "kuso", "tor", "(", ")", ":", "\n"]
    jobs = [[("chat" if (i + j) % 3 == 0 else "text", " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
             for j in range(per_client)] for i in range(n_clients)]
    before = metrics(server.url)

    async def one_client(jobs_i):
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        out = []
        for kind, text in jobs_i:
            if kind == "chat":
                stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                                         max_tokens=max_tokens, temperature=0, stream=True)
                parts, reason = [], None
                async for ch in stream:
                    for choice in ch.choices:
                        parts.append(choice.delta.content or "")
                        reason = choice.finish_reason or reason
            else:
                stream = await c.completions.create(model=MODEL, prompt=text, max_tokens=max_tokens, temperature=0,
                                                    stream=True)
                parts, reason = [], None
                async for ch in stream:
                    for choice in ch.choices:
                        parts.append(choice.text)
                        reason = choice.finish_reason or reason
            out.append(("".join(parts), reason))
        await c.close()
        return out

    async def main():
        return await asyncio.gather(*(one_client(j) for j in jobs))

    peak = {"waiting": 0, "running": 0, "blocks": 0}
    done = threading.Event()

    def poll():  # what the scheduler does under load, seen through /metrics
        while not done.is_set():
            m = metrics(server.url)
            peak["waiting"] = max(peak["waiting"], m["dsv3_requests_waiting"])
            peak["running"] = max(peak["running"], m["dsv3_requests_running"])
            peak["blocks"] = max(peak["blocks"], m["dsv3_cache_blocks_used"])
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.monotonic()
    try:
        results = asyncio.run(main())
    finally:
        done.set()
        poller.join()
    elapsed = time.monotonic() - t0
    assert peak["waiting"] > 0 and 1 < peak["running"] <= 8 and peak["blocks"] <= 10, peak
    flat_jobs = [job for js in jobs for job in js]
    flat_out = [o for rs in results for o in rs]
    assert len(flat_out) == n_clients * per_client and all(r in ("stop", "length") for _, r in flat_out)

    def ids_of(kind, text):
        if kind == "text":
            return tok.encode(text)
        body = {"messages": [{"role": "user", "content": text}]}
        return httpx.post(server.url + "/tokenize", json=body).json()["tokens"]

    ref = offline(model, tok, [ids_of(k, t) for k, t in flat_jobs], max_tokens)
    mismatches = [(job, got, want) for job, (got, _), want in zip(flat_jobs, flat_out, ref) if got != want]
    assert not mismatches, mismatches[:3]
    m = wait_idle(server.url)
    assert m["dsv3_time_to_first_token_seconds_count"] - before["dsv3_time_to_first_token_seconds_count"] >= 96
    assert m["dsv3_spec_decode_draft_tokens_total"] > before["dsv3_spec_decode_draft_tokens_total"]
    assert elapsed < 60


def test_legacy_top_logprobs_keep_the_most_likely_of_equal_texts():
    """Legacy completions key the alternatives by text: two tokens that print the same (partial UTF-8 bytes, both
    U+FFFD) share one key, which holds the more likely one's value (not whichever came last)."""
    from types import SimpleNamespace

    from dsv3.inference.engine import TokenLogprob
    from dsv3.inference.server import _completion_logprobs

    srv = SimpleNamespace(token_str=lambda t: ({1: "a", 2: "\ufffd", 3: "\ufffd"}[t], b""))
    lps = [TokenLogprob(token_id=2, logprob=-1.0, top=[(2, -1.0), (1, -1.5), (3, -2.0)])]
    out = _completion_logprobs(srv, lps, 0)
    assert out["top_logprobs"] == [{"\ufffd": -1.0, "a": -1.5}] and out["token_logprobs"] == [-1.0]
    # a sampled token outside the top alternatives is added to them (OpenAI: up to logprobs + 1; vLLM does so)
    lps = [TokenLogprob(token_id=1, logprob=-3.0, top=[(2, -1.0)]), TokenLogprob(token_id=1, logprob=-0.5, top=[])]
    out = _completion_logprobs(srv, lps, 0)
    assert out["top_logprobs"] == [{"\ufffd": -1.0, "a": -3.0}, {"a": -0.5}]


def test_expert_loads_route(model, tok, server):
    """GET /expert_loads (a server started with --record-expert-loads): the tokens routed per expert so far, read on
    the engine thread between steps: those of the same request in one process; a server that does not record
    says how to turn it on (404)."""
    eng = Engine(model, tok, max_batch_size=4, cache_tokens=256, speculative_k=1, record_expert_loads=True)
    with BackgroundServer(create_app(eng, tok, MODEL)) as s:
        r = httpx.get(s.url + "/expert_loads").json()
        assert r["positions"] == 0 and r["blocks"] == len(model.routers())
        ids = tok.encode("def alpha")
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        c.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
        r = httpx.get(s.url + "/expert_loads").json()
    ref = Engine(model, tok, max_batch_size=4, cache_tokens=256, speculative_k=1, record_expert_loads=True)
    ref.generate([ids], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert r["counts"] == ref.expert_loads().tolist() and r["positions"] >= len(ids) + 5
    assert r["experts"] == model.config.n_routed_experts and len(r["max_violation"]) == r["blocks"]
    bad = httpx.get(server.url + "/expert_loads")
    assert bad.status_code == 404 and "--record-expert-loads" in bad.json()["error"]["message"]
