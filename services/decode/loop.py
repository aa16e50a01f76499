"""A background thread that drives an `Engine`, for servers.

    loop = EngineLoop(engine); loop.start()
    stream = loop.submit(prompt_ids, params)          # bad input (prompt too long, ...) raises here
    for event in stream: ...                          # or: async for event in stream
    stream.cancel()                                   # KV freed before the next step
    loop.stop()

The engine is not thread-safe and only the loop thread touches it. `submit` and `cancel` only
append to a pending list under a short lock, so an asyncio server never waits for a step to finish;
the loop applies pending work between steps. Events reach each request's stream through a
thread-safe queue, or through its asyncio loop when the stream was created from a coroutine, so an
asyncio server never parks a thread per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from services.decode.engine import Engine, TokenEvent
from services.decode.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine loop stopped (shutdown or a crash) before the request finished."""


class RequestStream:
    """The events of one request, in order; the last one has a finish_reason."""

    def __init__(self, loop: EngineLoop, seq_id: int, aio: asyncio.AbstractEventLoop | None) -> None:
        self.seq_id = seq_id
        self._loop = loop
        self._aio = aio
        self._sync: queue.Queue[TokenEvent | BaseException] = queue.Queue()
        self._async: asyncio.Queue[TokenEvent | BaseException] | None = asyncio.Queue() if aio else None

    def put(self, item: TokenEvent | BaseException) -> None:
        """Called from the engine thread."""
        if self._aio is not None and self._async is not None:
            try:
                self._aio.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                self._loop.cancel(self.seq_id)
        else:
            self._sync.put(item)

    def cancel(self) -> None:
        self._loop.cancel(self.seq_id)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self._sync.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._async is None:
            raise TypeError("this stream was submitted outside an event loop; iterate it synchronously")
        while True:
            item = await self._async.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


@dataclass(slots=True, frozen=True)
class _Add:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(slots=True, frozen=True)
class _Cancel:
    seq_id: int


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "engine-loop") -> None:
        self.engine = engine
        self._wake = threading.Condition()  # guards _pending, _streams and _running only
        self._pending: list[_Add | _Cancel] = []
        self._streams: dict[int, RequestStream] = {}
        self._ids = itertools.count()
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps = 0

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping; requests still in flight end with EngineStoppedError."""
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join(timeout)
        with self._wake:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.put(EngineStoppedError("the engine is shutting down"))

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        self.engine.check_prompt(prompt_ids)  # stateless: safe from any thread
        try:
            aio: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            aio = None
        with self._wake:
            if not self._running:
                raise EngineStoppedError("the engine is not running")
            stream = RequestStream(self, next(self._ids), aio)
            self._streams[stream.seq_id] = stream
            self._pending.append(_Add(stream, list(prompt_ids), params))
            self._wake.notify()
        return stream

    def cancel(self, seq_id: int) -> None:
        with self._wake:
            self._pending.append(_Cancel(seq_id))
            self._wake.notify()

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    def _run(self) -> None:
        try:
            while self._next_batch_of_work():
                events = self.engine.step()
                self.steps += 1
                self._deliver(events)
        except Exception as exc:  # a bug in a step: fail every request loudly rather than hang them
            log.exception("engine loop crashed")
            with self._wake:
                self._running = False
                streams = list(self._streams.values())
                self._streams.clear()
            for stream in streams:
                stream.put(EngineStoppedError(f"the engine failed: {exc}"))

    def _next_batch_of_work(self) -> bool:
        """Wait for work, apply pending submissions/cancellations; False once stopped."""
        with self._wake:
            while self._running and not self._pending and not self.engine.has_work():
                self._wake.wait()
            if not self._running:
                return False
            pending, self._pending = self._pending, []
        for item in pending:
            if isinstance(item, _Add):
                self._add(item)
            else:
                self._deliver([event] if (event := self.engine.abort(item.seq_id)) else [])
        return True

    def _add(self, item: _Add) -> None:
        try:
            self.engine.add_request(item.prompt_ids, item.params, seq_id=item.stream.seq_id)
        except Exception as exc:  # validated in submit already; anything here is reported to the caller
            with self._wake:
                self._streams.pop(item.stream.seq_id, None)
            item.stream.put(exc)

    def _deliver(self, events: list[TokenEvent]) -> None:
        with self._wake:
            targets = [(self._streams.get(e.seq_id), e) for e in events]
            for event in events:
                if event.finish_reason is not None:
                    self._streams.pop(event.seq_id, None)
        for stream, event in targets:
            if stream is not None:
                stream.put(event)
