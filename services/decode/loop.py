"""A background thread that drives an `Engine`, for servers.

    loop = EngineLoop(engine); loop.start()
    stream = loop.submit(prompt_ids, params)          # bad input (prompt too long, ...) raises here
    for event in stream: ...                          # or: async for event in stream
    stream.cancel()                                   # KV freed before the next step
    loop.stop()                                       # KV of whatever is left is freed

The engine is not thread-safe and only the loop thread touches it. `submit` and `cancel` only
append to a pending list under a short lock, so an asyncio server never waits for a step to finish;
the loop applies pending work between steps. Events reach each request's stream through a
thread-safe queue, or through its asyncio loop when the stream was created from a coroutine, so an
asyncio server never parks a thread per request.

A request submitted with a `PrefillJob` (a prefill pod, remote_prefill.py) goes through one more
stage while the batch keeps decoding:

    engine thread: open its KV with room for the prompt ─▶ job.start(seq_id, done)
    any thread:    done(error) ─▶ pending ─▶ engine thread: add_request(prefilled=job.num_tokens)
                                                            or free the KV and end the stream

A cancel while prefilling ends the stream at once; the KV is freed when the job reports back. When
the KV has no room now the request is prefilled here instead, queued like any other.

Failures: an `AttentionPodError` in a step ends only the requests with KV on that pod (their streams
get the error) and the next step runs the same rows for the others (see `Engine.fail_pod`). Any
other exception in a step is a bug: every request fails loudly with `EngineStoppedError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from services.core.errors import DisaggError
from services.decode.attention_link import AttentionPodError
from services.decode.engine import Engine, TokenEvent
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason

log = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine loop stopped (shutdown or a crash) before the request finished."""


class PrefillUnavailableError(DisaggError):
    """The prefill side could not take the prompt (gone, overloaded, timed out): prefill it here."""


class PrefillJob(ABC):
    """Writes the K/V of a prompt's first `num_tokens` positions from outside the engine.

    The loop opens the sequence with room for the whole prompt, then calls `start` on the engine
    thread; `start` must not block, and calls `done` exactly once, from any thread: with None when
    positions [0, num_tokens) are written, else with the exception that says why not. A
    `PrefillUnavailableError` (the prefill side is gone or overloaded) makes the loop prefill the
    prompt itself instead of failing the request.
    """

    num_tokens: int  # positions filled: the prompt minus at least its last token

    @abstractmethod
    def start(self, seq_id: int, done: Callable[[Exception | None], None]) -> None: ...


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
    prefill: PrefillJob | None


@dataclass(slots=True, frozen=True)
class _Cancel:
    seq_id: int


@dataclass(slots=True, frozen=True)
class _Prefilled:
    """A prefill job reported back."""

    seq_id: int
    error: Exception | None


@dataclass(slots=True)
class _Prefilling:
    add: _Add
    job: PrefillJob
    cancelled: bool = False


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "engine-loop") -> None:
        self.engine = engine
        self._wake = threading.Condition()  # guards _pending, _streams and _running only
        self._pending: list[_Add | _Cancel | _Prefilled] = []
        self._streams: dict[int, RequestStream] = {}
        self._prefilling: dict[int, _Prefilling] = {}  # engine thread only
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
        """Stop stepping; requests still in flight end with EngineStoppedError and their KV is freed."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # the engine is ours now; a hung step keeps it (and its KV)
            self._release_all()
        with self._wake:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.put(EngineStoppedError("the engine is shutting down"))

    def new_seq_id(self) -> int:
        """An id for `submit(seq_id=...)`, for callers that must know it first (to register the
        request's placement before the engine thread opens its KV)."""
        with self._wake:
            return next(self._ids)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        prefill: PrefillJob | None = None,
        seq_id: int | None = None,
    ) -> RequestStream:
        """Queue a request; `prefill` fills its prompt's KV elsewhere first (see the module doc)."""
        self.engine.check_prompt(prompt_ids)  # stateless: safe from any thread
        try:
            aio: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            aio = None
        with self._wake:
            if not self._running:
                raise EngineStoppedError("the engine is not running")
            stream = RequestStream(self, next(self._ids) if seq_id is None else seq_id, aio)
            self._streams[stream.seq_id] = stream
            self._pending.append(_Add(stream, list(prompt_ids), params, prefill))
            self._wake.notify()
        return stream

    def cancel(self, seq_id: int) -> None:
        self._post(_Cancel(seq_id))

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        """Admitted but not running: queued in the engine or prefilling elsewhere."""
        return self.engine.num_waiting + len(self._prefilling)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._next_batch_of_work():
                self._deliver(self._step())
        except Exception as exc:  # a bug in a step: fail every request loudly rather than hang them
            log.exception("engine loop crashed")
            with self._wake:
                self._running = False
                streams = list(self._streams.values())
                self._streams.clear()
            for stream in streams:
                stream.put(EngineStoppedError(f"the engine failed: {exc}"))

    def _step(self) -> list[TokenEvent]:
        """One engine step. An attention pod failure ends only that pod's requests; the others run
        the same step again on the next turn of the loop."""
        try:
            events = self.engine.step()
        except AttentionPodError as exc:
            self._fail(self.engine.fail_pod(exc), exc)  # raises exc again when no request is on it
            return []
        self.steps += 1
        return events

    def _next_batch_of_work(self) -> bool:
        """Wait for work, apply pending submissions/cancellations/prefills; False once stopped."""
        with self._wake:
            while self._running and not self._pending and not self.engine.has_work():
                self._wake.wait()
            if not self._running:
                return False
            pending, self._pending = self._pending, []
        for item in pending:
            if isinstance(item, _Add):
                self._add(item)
            elif isinstance(item, _Cancel):
                self._cancel(item.seq_id)
            else:
                self._prefilled(item)
        return True

    def _add(self, item: _Add) -> None:
        seq_id = item.stream.seq_id
        try:
            prefill, policy = item.prefill, item.params.attention_policy
            if prefill is not None and self.engine.open_for_prefill(seq_id, len(item.prompt_ids), policy):
                self._start_prefill(item, prefill)
            else:
                self.engine.add_request(item.prompt_ids, item.params, seq_id=seq_id)
        except Exception as exc:  # validated in submit already; anything here is reported to the caller
            self._fail([seq_id], exc)

    def _start_prefill(self, item: _Add, job: PrefillJob) -> None:
        seq_id = item.stream.seq_id
        self._prefilling[seq_id] = _Prefilling(item, job)
        try:
            job.start(seq_id, lambda error: self._post(_Prefilled(seq_id, error)))
        except Exception:
            del self._prefilling[seq_id]
            self.engine.free_prefill(seq_id)
            raise

    def _prefilled(self, item: _Prefilled) -> None:
        state = self._prefilling.pop(item.seq_id, None)
        if state is None:  # released by stop() already
            return
        add, prefilled = state.add, state.job.num_tokens
        if isinstance(item.error, PrefillUnavailableError) and not state.cancelled:
            log.warning("request %d: %s; prefilling it here instead", item.seq_id, item.error)
            prefilled = 0  # positions already written are simply written again, at the same places
        elif state.cancelled or item.error is not None:
            self.engine.free_prefill(item.seq_id)
            if item.error is not None and not state.cancelled:
                self._fail([item.seq_id], item.error)
            return
        if prefilled == 0:
            self.engine.free_prefill(item.seq_id)  # add_request opens it again, empty
        try:
            self.engine.add_request(add.prompt_ids, add.params, seq_id=item.seq_id, prefilled=prefilled)
        except Exception as exc:
            self.engine.free_prefill(item.seq_id)
            self._fail([item.seq_id], exc)

    def _cancel(self, seq_id: int) -> None:
        state = self._prefilling.get(seq_id)
        if state is None:
            event = self.engine.abort(seq_id)
        elif not state.cancelled:  # its KV is freed when the job reports back
            state.cancelled = True
            event = TokenEvent(seq_id, None, "", FinishReason.ABORT)
        else:
            event = None
        self._deliver([event] if event else [])

    def _release_all(self) -> None:
        """Free the KV of every request left (after the thread ended): pods outlive this process."""
        try:
            self.engine.abort_all()
            for seq_id in list(self._prefilling):
                self.engine.free_prefill(seq_id)
        except Exception:  # shutting down anyway; the pods' reservations expire
            log.exception("could not free every request's KV at shutdown")
        self._prefilling.clear()

    # ---- any thread ----------------------------------------------------------------------------
    def _post(self, item: _Cancel | _Prefilled) -> None:
        with self._wake:
            self._pending.append(item)
            self._wake.notify()

    def _fail(self, seq_ids: list[int], error: BaseException) -> None:
        with self._wake:
            streams = [s for i in seq_ids if (s := self._streams.pop(i, None)) is not None]
        for stream in streams:
            stream.put(error)

    def _deliver(self, events: list[TokenEvent]) -> None:
        with self._wake:
            targets = [(self._streams.get(e.seq_id), e) for e in events]
            for event in events:
                if event.finish_reason is not None:
                    self._streams.pop(event.seq_id, None)
        for stream, event in targets:
            if stream is not None:
                stream.put(event)
