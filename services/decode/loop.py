"""A background thread that drives an `Engine`, for servers.

    loop = EngineLoop(engine); loop.start()
    stream = loop.submit(prompt_ids, params)          # errors (prompt too long, ...) raise here
    for event in stream: ...                          # or: async for event in stream
    stream.cancel()                                   # frees the request's KV at once
    loop.stop()

The engine is not thread-safe; every call into it holds `self._lock`, and the loop holds it for one
step at a time, so submissions and cancellations land between steps. Events reach each request's
stream through a thread-safe queue, or through its asyncio loop when the stream was created from
a coroutine, so an asyncio server never parks a thread per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from services.decode.engine import Engine, TokenEvent
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason

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


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "engine-loop") -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._streams: dict[int, RequestStream] = {}
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping; requests still in flight end with EngineStoppedError."""
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join(timeout)
        self._fail_all(EngineStoppedError("the engine is shutting down"))

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        try:
            aio: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            aio = None
        with self._wake:
            if not self._running:
                raise EngineStoppedError("the engine is not running")
            seq_id = self.engine.add_request(prompt_ids, params)  # raises on bad input
            stream = RequestStream(self, seq_id, aio)
            self._streams[seq_id] = stream
            self._wake.notify()
        return stream

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            event = self.engine.abort(seq_id)
            stream = self._streams.pop(seq_id, None)
        if event is not None and stream is not None:
            stream.put(event)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while self._running and not self.engine.has_work():
                        self._wake.wait()
                    if not self._running:
                        return
                    events = self.engine.step()
                    self.steps += 1
                    finished = [e.seq_id for e in events if e.finish_reason is not None]
                    targets = [(self._streams.get(e.seq_id), e) for e in events]
                    for seq_id in finished:
                        self._streams.pop(seq_id, None)
                for stream, event in targets:
                    if stream is not None:
                        stream.put(event)
        except Exception as exc:  # a bug in a step: fail every request loudly rather than hang them
            log.exception("engine loop crashed")
            self._running = False
            self._fail_all(EngineStoppedError(f"the engine failed: {exc}"))

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            for stream in streams:
                self.engine.abort(stream.seq_id)
        for stream in streams:
            stream.put(error)


__all__ = ["EngineLoop", "EngineStoppedError", "FinishReason", "RequestStream"]
