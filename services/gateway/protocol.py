"""The OpenAI REST API as pydantic models: requests, responses, stream chunks, errors.

Requests ignore unknown fields, as OpenAI's API does. Fields we know but do not implement (logprobs,
penalties, tools, ...) are declared so that a request using them is refused with a 400 naming the
field (see `services/gateway/prompts.py`) rather than silently served differently. Responses and
chunks follow OpenAI's shapes field for field; `usage` appears on stream chunks only when the client
asked for `stream_options.include_usage`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the first served model
    max_tokens: int | None = None
    temperature: float | None = None  # default 1.0, 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM); 0 = off
    ignore_eos: bool | None = None  # extension (vLLM): always generate max_tokens (benchmarks)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None  # only 1
    user: str | None = None  # accepted and ignored
    # Extension: the request's decode attention policy (docs/attention-policies.md); None: the server's.
    attention_policy: AttentionPolicyParam | None = None
    # Declared only to be refused when set (not implemented yet):
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class AttentionPolicyParam(BaseModel):
    """`{"name": "sparq", "budget": 0.125}`: which cached tokens each decode step reads."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must not silently mean the default

    name: str  # dense, sink_window, heavy_hitter, sparq or quest
    budget: float | None = None  # fraction of dense K/V bytes per decode step (> 0; >= 1: dense)
    scoring: str | None = None  # heavy_hitter only: h2o or vatp (default)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # one last chunk with empty `choices` and the request's `usage`


class CompletionRequest(_Request):
    """POST /v1/completions."""

    # One prompt: a string, token ids, or a list holding one of those.
    prompt: str | list[int] | list[str] | list[list[int]] | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: handed to the chat template

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


# ---- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int  # len(prompt ids) after tokenization (and the chat template)
    completion_tokens: int  # generated tokens, a final EOS included
    total_tokens: int
    # Extensions (docs/cost.md): what the request cost in USD, and that by the role that spent it
    # (prefill, decode, attention, gateway); the breakdown sums to cost_usd.
    cost_usd: float | None = None
    cost_breakdown: dict[str, float] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    """The body of a non-streaming completion; stream chunks have the same shape (one delta each)."""

    id: str  # cmpl-...
    object: Literal["text_completion"] = "text_completion"
    created: int  # unix seconds
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str  # chatcmpl-...
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None  # first chunk only
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Unset fields are absent, not null, as OpenAI sends them: the last chunk's delta is `{}`."""
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "disagg"
    max_model_len: int  # extension: the context window in tokens


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str  # invalid_request_error, server_error, timeout_error
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok", "unavailable", "draining"]
    running: int  # requests the backend is generating for
    waiting: int  # requests queued in the backend
    in_flight: int  # requests the gateway is serving (running + waiting + ones being tokenized)
