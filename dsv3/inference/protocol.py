"""Request bodies of the OpenAI-compatible server (ANCHORS §5.1), as pydantic models.

They are the server's OpenAPI schema, so they double as the fuzzing grammar (tests/test_server.py
runs schemathesis over it). Rules:
  * unknown fields are rejected (`extra="forbid"`), as the OpenAI API does ("Unrecognized request
    argument supplied: foo"): a misspelt `max_token` must not silently fall back to a default;
  * OpenAI fields this server cannot honour are accepted at their neutral value only
    (`presence_penalty: 0`, `logit_bias: {}`, `tools: []`, `response_format: {"type": "text"}`); any
    other value gets a 400 that names the field (checked in server.py);
  * types are strict, as the OpenAI API's: a bool is not an integer, a string is not a number or a
    bool (`"n": "2"`, `"max_tokens": true`, `"stream": "false"` are 400s); an integer is a number;
  * `user`, `metadata`, `store`, `service_tier` (and for chat `safety_identifier`, `prompt_cache_key`, which
    OpenAI says replace `user`) are accepted and ignored (they do not change outputs);
  * an assistant message sent back as the openai client parsed it (`message.model_dump()`: `refusal`,
    `audio`, `function_call` null, `annotations`) is accepted; chat's `modalities: ["text"]`, `functions: []`
    and `function_call: "none"` / `"auto"` (the deprecated forms of tools) are their neutral values;
  * vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
    `stop_token_ids`, `chat_template_kwargs`) are accepted in the body ("extra_body").
Ranges follow the OpenAI reference (temperature [0, 2], logprobs <= 20 as vLLM, 4 stop strings).

Token ids (`prompt`, `stop_token_ids`, /detokenize's `tokens`) are checked against the vocabulary
when the server validates with `context={"vocab_size": V}`, and a bad one is named by its position
("prompt[3] = -1 is not a token id (0..511)"); the union-typed fields (`prompt`, `stop`, a message's
`content`, a tool call's `arguments`) answer with one message saying what is wrong, not one error
per member of the union.

Errors are answered in the OpenAI shape {"error": {"message", "type", "param", "code"}} (`APIError`);
validation errors are turned into that shape with status 400 (`from_validation_error`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo, WrapValidator,
                      model_validator)
from pydantic_core import PydanticCustomError

NonNegInt = Annotated[int, Field(ge=0, le=2**31 - 1)]
VALUE_ERROR = "dsv3_value"  # the type of the errors below: their message names the field itself


def _json_type(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _bad_id(where: str, ids: list, vocab_size: int | None) -> str | None:
    """The first element of `ids` that is not a token id, described; None when all are."""
    hi = vocab_size - 1 if vocab_size else 2**31 - 1
    for i, t in enumerate(ids):
        if type(t) is not int or not 0 <= t <= hi:
            what = f"= {t} is" if type(t) is int else f"is {_json_type(t)},"
            return f"{where}[{i}] {what} not a token id (0..{hi})"
    return None


def _fail(message: str):
    raise PydanticCustomError(VALUE_ERROR, "{message}", {"message": message})


def _vocab(info: ValidationInfo) -> int | None:
    return (info.context or {}).get("vocab_size")


def _token_ids(where: str, v, vocab_size: int | None) -> list[int]:
    if not isinstance(v, list):
        _fail(f"'{where}' must be a list of token ids; got {_json_type(v)}")
    hi = vocab_size - 1 if vocab_size else 2**31 - 1
    if not set(map(type, v)) <= {int} or (v and (min(v) < 0 or max(v) > hi)):  # C loops: 8 ms per 400K ids
        _fail(_bad_id(where, v, vocab_size))
    return v


_PROMPT_KINDS = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _check_prompt(v, info: ValidationInfo):
    """str | list[str] | list[token id] | list[list[token id]], decided by the first element and checked
    in one pass. (Not a pydantic union: a failing member builds one error per element, which took
    0.85 s, holding the GIL, for a 300K-id prompt.)"""
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        _fail(f"'prompt' must be {_PROMPT_KINDS}; got {_json_type(v)}")
    if not v:
        return v
    first = v[0]
    if isinstance(first, str):
        bad = next((i for i, x in enumerate(v) if not isinstance(x, str)), None)
        if bad is not None:
            _fail(f"prompt[{bad}] is {_json_type(v[bad])}; a list of prompts holds strings only")
        return v
    if isinstance(first, list):
        for i, row in enumerate(v):
            if not isinstance(row, list):
                _fail(f"prompt[{i}] is {_json_type(row)}; a batch of token-id prompts holds lists only")
            _token_ids(f"prompt[{i}]", row, _vocab(info))
        return v
    if type(first) is int:
        return _token_ids("prompt", v, _vocab(info))
    _fail(f"prompt[0] is {_json_type(first)}; 'prompt' must be {_PROMPT_KINDS}")


def _ids(name: str, max_length: int):
    """A list of at most `max_length` token ids, checked in one pass (see _check_prompt)."""
    def check(v, info: ValidationInfo):
        if isinstance(v, list) and len(v) > max_length:
            _fail(f"'{name}' has {len(v)} token ids; at most {max_length} are allowed")
        return _token_ids(name, v, _vocab(info))
    return Annotated[list[int], PlainValidator(
        check, json_schema_input_type=Annotated[list[NonNegInt], Field(max_length=max_length)])]


def _one_of(name: str, kinds: str, element: type | None = None):
    """A union's one message ("'stop' must be a string or a list of strings; got an integer") instead
    of one error per member. `element`: the JSON type of the list member's elements."""
    def check(v, handler, info: ValidationInfo):
        try:
            return handler(v)
        except ValidationError as e:
            if not (isinstance(v, list) and element is not None):
                _fail(f"'{name}' must be {kinds}; got {_json_type(v)}")
            bad = next((i for i, x in enumerate(v) if not isinstance(x, element)), None)
            if bad is not None:
                _fail(f"{name}[{bad}] is {_json_type(v[bad])}; '{name}' must be {kinds}")
            # the elements have the right type: the list member's own error (a bound, a part's field)
            err = next(x for x in e.errors() if x["loc"] and str(x["loc"][0]).startswith("list["))
            where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"][1:])
            _fail(f"{name}{where}: {err['msg']}" if where else f"'{name}': {err['msg']}")
    return WrapValidator(check)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; chunks carry no `obfuscation` field


class _SamplingRequest(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    stop: Annotated[str | Annotated[list[str], Field(max_length=4)],
                    _one_of("stop", "a string or a list of at most 4 strings", str)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None  # only 0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None  # only 0
    logit_bias: dict[str, float] | None = None  # only empty
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM-style extras
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    # (a tinier repetition_penalty overflows the logits; NaN / inf anywhere: "Input should be a finite number", not
    # a range's message)
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100, allow_inf_nan=False)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: _ids("stop_token_ids", 64) | None = None


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], PlainValidator(
        _check_prompt, json_schema_input_type=str | list[str] | list[NonNegInt] | list[list[NonNegInt]])]
    suffix: str | None = None  # fill-in-the-middle
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None  # only == n


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: Annotated[str | dict[str, Any], _one_of("arguments", "a string or an object")]


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart], _one_of("content", "a string or a list of text parts "
                                                     "({\"type\": \"text\", \"text\": ...})", dict)] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    prefix: bool | None = None  # DeepSeek chat prefix completion: continue the last assistant message
    # the rest of OpenAI's assistant message object, which clients send back as they got it (null here; a refusal
    # or audio or a function call would have to reach the model, which this server cannot render); annotations
    # (URL citations) are metadata: ignored
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    annotations: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _needs_content(self):
        for name in ("refusal", "audio", "function_call"):
            if getattr(self, name) is not None:
                _fail(f"'{name}' in a message is not supported by this server (only null, as its responses carry)")
        # as the OpenAI API: every message carries content, except an assistant turn that made tool calls
        # (a message without it would otherwise render as an empty turn, silently)
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            what = "an assistant message without tool calls" if self.role == "assistant" else f"a {self.role} message"
            _fail(f"'content' is missing: {what} needs its content (a string or a list of text parts)")
        return self


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]  # only "text"
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # only empty
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    safety_identifier: str | None = None  # accepted and ignored, as `user` (which it replaces in OpenAI's API)
    prompt_cache_key: str | None = None  # accepted and ignored (a cache-routing hint; the prefix cache needs none)
    modalities: list[Literal["text"]] | None = None  # text only
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools: only empty
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None  # deprecated tool_choice: no function


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered with the chat template (generation prompt added)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: _ids("tokens", 1_000_000)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- errors -------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def __reduce__(self):  # pickled whole: it comes back from the server's preparation workers (prep.py)
        return APIError, (self.status, self.message, self.type, self.param, self.code, self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc, body_is_json: bool = True) -> APIError:
    """A pydantic ValidationError (or FastAPI's RequestValidationError, a 422) -> OpenAI's 400, with
    a message a person can act on. `body_is_json` False: the body was not sent as JSON."""
    errors = exc.errors()
    e = errors[0] if errors else {}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    more = f" (and {len(errors) - 1} more error{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    if kind == VALUE_ERROR:
        return bad_request(f"{e['msg']}{more}", param=param, code="invalid_value")
    if kind == "json_invalid":
        ctx = e.get("ctx", {}).get("error", "")
        if "surrogate" in ctx or "hex escape" in ctx:  # JSON syntax allows "\ud800" alone; Unicode does not
            ctx += " (a \\ud800-\\udfff escape without its pair is not valid Unicode)"
        return bad_request(f"Invalid JSON in the request body: {ctx}".rstrip(": "), code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter")
    if kind == "missing" and not loc:
        return bad_request("The request body is missing: send a JSON object", code="invalid_json")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter")
    if not loc and kind in ("model_attributes_type", "model_type", "dict_type"):
        if not body_is_json or isinstance(getattr(exc, "body", None), (bytes, bytearray)):
            return bad_request("The request body must be JSON, sent with 'Content-Type: application/json'",
                               code="invalid_json")
        return bad_request("The request body must be a JSON object", code="invalid_json")
    msg = e.get("msg", "invalid value")
    return bad_request(f"Invalid value for '{param}': {msg}{more}" if param else f"{msg}{more}", param=param,
                       code="invalid_value")
