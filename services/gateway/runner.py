"""One request's generation, guarded: it ends early, with a typed error, when the client goes away,
the deadline passes or the server shuts down.

    generation = admission.admit(backend, prompt_ids, params, timeout_s=..., disconnected=...)
    try:
        async for event in generation: ...       # TokenEvents; typed errors raise here
    finally:
        generation.close()                        # cancels the backend request if still running

Per request there is a queue and three helpers:

    producer task   iterates backend.generate(...) and puts each event (or its error) on the queue
    watcher task    waits for the client to disconnect
    timer           loop.call_later(deadline)

Whatever ends a request early puts its error on the queue and cancels the producer; cancelling the
producer cancels the backend iterator, and the backend frees the request's KV. The consumer only
ever waits on the queue, so a streaming response and a plain one share this one code path.

The request's `RequestMeter` (metering.py) sees what the consumer sees: each event, the error that
ended it, and `close()`. The last event leaves here carrying the full cost (the pods' plus the
gateway's share), so `usage` renders it on both paths.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

from services.core.errors import NoCapacityError
from services.decode.engine import TokenEvent
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason
from services.gateway.backend import Backend
from services.gateway.errors import (
    ClientDisconnectedError,
    DeadlineExceededError,
    RequestAbortedError,
    ShuttingDownError,
)
from services.gateway.metering import RequestMeter

WaitForDisconnect = Callable[[], Awaitable[None]]  # returns once the client has gone away


class Generation:
    """The events of one request, in order, ending with one that has a finish_reason."""

    def __init__(
        self,
        events: AsyncIterator[TokenEvent],
        *,
        timeout_s: float,
        disconnected: WaitForDisconnect | None,
        on_close: Callable[[Generation], None],
        meter: RequestMeter,
    ) -> None:
        self.meter = meter
        self._queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._on_close = on_close
        self._ended = False  # a final event or an error was queued
        self._closed = False
        loop = asyncio.get_running_loop()
        self._producer = loop.create_task(self._pump(events))
        self._watcher = loop.create_task(self._watch(disconnected)) if disconnected else None
        deadline = DeadlineExceededError(
            f"the request did not finish within {timeout_s:g} s (request_timeout_seconds) and was cancelled"
        )
        self._timer = loop.call_later(timeout_s, self.abort, deadline)

    async def next(self) -> TokenEvent:
        item = await self._queue.get()
        if isinstance(item, TokenEvent) and item.finish_reason is FinishReason.ABORT:
            item = RequestAbortedError("the server aborted the request before it finished")
        if isinstance(item, BaseException):
            self.meter.fail(item)
            raise item
        self.meter.event(item)
        if item.finish_reason is not None:
            item = dataclasses.replace(item, cost=self.meter.complete(item.cost))
        return item

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self.next()
            yield event
            if event.finish_reason is not None:
                return

    def abort(self, error: BaseException) -> None:
        """End the request now with `error` (unless it already ended) and cancel the backend request."""
        if self._ended:
            return
        self._ended = True
        self._queue.put_nowait(error)
        self._producer.cancel()

    def close(self) -> None:
        """Release everything; idempotent, and safe to call from any `finally`."""
        if self._closed:
            return
        self._closed = True
        self._ended = True
        self._timer.cancel()
        self._producer.cancel()  # a no-op once the request finished
        if self._watcher is not None:
            self._watcher.cancel()
        self.meter.finish()
        self._on_close(self)

    async def _pump(self, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in events:
                if event.finish_reason is not None:
                    self._ended = True
                self._queue.put_nowait(event)
        except Exception as exc:  # typed backend errors, or a bug: the consumer maps them to a status
            self._ended = True
            self._queue.put_nowait(exc)
        if not self._ended:
            self.abort(RequestAbortedError("the backend ended the request without a finish reason"))

    async def _watch(self, disconnected: WaitForDisconnect) -> None:
        await disconnected()
        self.abort(ClientDisconnectedError("the client disconnected; the request was cancelled"))


class Admission:
    """Admits generations up to a limit, refuses them while draining, and aborts them at shutdown."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.draining = False
        self._live: set[Generation] = set()

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def admit(
        self,
        backend: Backend,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        timeout_s: float,
        meter: RequestMeter,
        disconnected: WaitForDisconnect | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> Generation:
        """A guarded generation; `on_close` runs once when it is closed (the tenant's usage)."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests; retry elsewhere")
        if len(self._live) >= self.limit:
            raise NoCapacityError(
                f"the gateway is serving its limit of {self.limit} concurrent requests "
                "(max_concurrent_requests); retry later"
            )

        def closed(generation: Generation) -> None:
            self._live.discard(generation)
            if on_close is not None:
                on_close()

        generation = Generation(
            backend.generate(prompt_ids, params, tenant=meter.tenant),
            timeout_s=timeout_s,
            disconnected=disconnected,
            on_close=closed,
            meter=meter,
        )
        self._live.add(generation)
        return generation

    def drain(self) -> None:
        """Stop admitting; requests in flight go on."""
        self.draining = True

    def abort_all(self, error: BaseException) -> None:
        for generation in list(self._live):
            generation.abort(error)
