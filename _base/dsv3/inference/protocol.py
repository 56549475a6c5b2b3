"""Request bodies of the OpenAI-compatible server (ANCHORS §5.1), as pydantic models.

They are the server's OpenAPI schema, so they double as the fuzzing grammar (tests/test_server.py
runs schemathesis over it). Rules:
  * unknown fields are rejected (`extra="forbid"`), as the OpenAI API does ("Unrecognized request
    argument supplied: foo"): a misspelt `max_token` must not silently fall back to a default;
  * OpenAI fields this server cannot honour are accepted at their neutral value only
    (`presence_penalty: 0`, `logit_bias: {}`, `tools: []`, `response_format: {"type": "text"}`); any
    other value gets a 400 that names the field (checked in server.py);
  * `user`, `metadata`, `store`, `service_tier` are accepted and ignored (they do not change outputs);
  * vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
    `stop_token_ids`, `chat_template_kwargs`) are accepted in the body ("extra_body").
Ranges follow the OpenAI reference (temperature [0, 2], logprobs <= 20 as vLLM, 4 stop strings).

Errors are answered in the OpenAI shape {"error": {"message", "type", "param", "code"}} (`APIError`);
FastAPI's 422 validation errors are turned into that shape with status 400 (`from_validation_error`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

NonNegInt = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; chunks carry no `obfuscation` field


class _SamplingRequest(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None  # only 0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None  # only 0
    logit_bias: dict[str, float] | None = None  # only empty
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM-style extras
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] | None = None  # tinier overflows the logits
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[NonNegInt], Field(max_length=64)] | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[NonNegInt] | list[list[NonNegInt]]
    suffix: str | None = None  # fill-in-the-middle
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None  # only == n


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    prefix: bool | None = None  # DeepSeek chat prefix completion: continue the last assistant message


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


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered with the chat template (generation prompt added)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: Annotated[list[NonNegInt], Field(max_length=1_000_000)]


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
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 -> OpenAI's 400, with a message a person can act on."""
    errors = exc.errors()
    e = errors[0] if errors else {}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        ctx = e.get("ctx", {}).get("error", "")
        return bad_request(f"Invalid JSON in the request body: {ctx}".rstrip(": "), code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter")
    if kind == "missing" and not loc:
        return bad_request("The request body is missing: send a JSON object", code="invalid_json")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter")
    if not loc and kind in ("model_attributes_type", "dict_type"):
        if isinstance(exc.body, (bytes, bytearray)):  # FastAPI parses JSON only when the content type says so
            return bad_request("The request body must be JSON, sent with 'Content-Type: application/json'",
                               code="invalid_json")
        return bad_request("The request body must be a JSON object", code="invalid_json")
    msg = e.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more error{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for '{param}': {msg}{more}" if param else f"{msg}{more}", param=param,
                       code="invalid_value")
