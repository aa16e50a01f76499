"""Token events in, OpenAI response bodies and SSE chunks out.

A stream is, for both endpoints:

    [chat only: a chunk with delta.role = "assistant"]
    one chunk per event that carries text
    a chunk with the finish_reason (and no text)
    [a chunk with empty choices and `usage`, if stream_options.include_usage]
    data: [DONE]

`usage.completion_tokens` counts generated tokens, a final EOS included (OpenAI counts it too): it
equals `len(Completion.token_ids)` of the engine. An error after the first byte is sent as one
`data: {"error": {...}}` event, and the stream ends without [DONE].
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from services.core.cost import RequestCost
from services.decode.engine import TokenEvent
from services.decode.scheduler import FinishReason
from services.gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

DONE = b"data: [DONE]\n\n"
Finish = Literal["stop", "length"]


@dataclass(slots=True)
class Tally:
    """What a request produced so far."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: Finish | None = None
    pieces: list[str] = field(default_factory=list)
    cost: RequestCost | None = None  # from the last event

    def add(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.completion_tokens += 1
        self.pieces.append(event.text)
        if event.finish_reason is not None:
            self.finish_reason = finish_name(event.finish_reason)
            self.cost = event.cost

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            cost_usd=self.cost.total_usd if self.cost is not None else None,
            cost_breakdown=self.cost.breakdown() if self.cost is not None else None,
        )


def finish_name(reason: FinishReason) -> Finish:
    if reason is FinishReason.STOP:
        return "stop"
    if reason is FinishReason.LENGTH:
        return "length"
    raise ValueError(f"{reason} has no OpenAI finish_reason; aborted requests end with an error")


def sse(chunk: BaseModel, *, exclude: set[str] | None = None) -> bytes:
    return b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"


class ResponseFormat(ABC):
    """One endpoint's response shapes; `id`, `created` and `model` are shared by all its chunks."""

    prefix: str  # of the response id

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self._no_usage = None if include_usage else {"usage"}  # OpenAI sends `usage: null` only then

    @abstractmethod
    def response(self, tally: Tally) -> BaseModel:
        """The whole non-streaming body."""

    def opening(self) -> list[bytes]:
        """Chunks sent before the first token's text."""
        return []

    @abstractmethod
    def delta(self, text: str) -> bytes: ...

    @abstractmethod
    def finish(self, reason: Finish) -> bytes: ...

    @abstractmethod
    def usage(self, usage: Usage) -> bytes:
        """The last chunk when include_usage: empty choices, the request's usage."""


class CompletionFormat(ResponseFormat):
    prefix = "cmpl"

    def response(self, tally: Tally) -> CompletionResponse:
        choice = CompletionChoice(text=tally.text, finish_reason=tally.finish_reason)
        return self._body([choice], tally.usage)

    def delta(self, text: str) -> bytes:
        return sse(self._body([CompletionChoice(text=text, finish_reason=None)]), exclude=self._no_usage)

    def finish(self, reason: Finish) -> bytes:
        return sse(self._body([CompletionChoice(text="", finish_reason=reason)]), exclude=self._no_usage)

    def usage(self, usage: Usage) -> bytes:
        return sse(self._body([], usage))

    def _body(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


class ChatFormat(ResponseFormat):
    prefix = "chatcmpl"

    def response(self, tally: Tally) -> ChatCompletionResponse:
        if tally.finish_reason is None:
            raise ValueError("a chat response needs a finished request")
        choice = ChatChoice(message=AssistantMessage(content=tally.text), finish_reason=tally.finish_reason)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=tally.usage
        )

    def opening(self) -> list[bytes]:
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def delta(self, text: str) -> bytes:
        return self._chunk(ChatDelta(content=text))

    def finish(self, reason: Finish) -> bytes:
        return self._chunk(ChatDelta(), reason)

    def usage(self, usage: Usage) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )
        return sse(chunk)

    def _chunk(self, delta: ChatDelta, reason: Finish | None = None) -> bytes:
        choice = ChatChunkChoice(delta=delta, finish_reason=reason)
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        return sse(chunk, exclude=self._no_usage)
