"""FIFO admission for requests waiting for KV room, with a bounded queue (backpressure).

When every attention pod is full, a new request waits here instead of failing: the KV of running
requests comes back as they finish. Lifecycle of one request:

    route = await queue.admit(try_place, timeout_s)
      ├─ nobody waiting: try_place() at once ── placed ─▶ route
      │                                      └─ KvFullError ─▶ join the queue
      ├─ queue already holds `max_waiting` ─▶ NoCapacityError (503: shed load now, not later)
      ├─ at the head: try_place() whenever `notify()` says KV came back (a request ended here) and
      │  every `poll_s` (KV freed by another gateway, a new pod); placed ─▶ route, the next head tries
      └─ `timeout_s` passed ─▶ NoCapacityError naming the wait and the last reason

Only the head places, so requests are admitted in arrival order and a large request is not starved
by a stream of small ones (head-of-line blocking is the price; vLLM's scheduler makes the same
choice). Errors other than KvFullError (no decode pod, Redis down, a request that can never fit)
pass through at once: waiting would not help. Runs on one asyncio event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.core.errors import KvFullError, NoCapacityError

T = TypeVar("T")


class AdmissionQueue:
    def __init__(self, max_waiting: int, poll_s: float = 0.25) -> None:
        if max_waiting < 0 or poll_s <= 0:
            raise ValueError(f"need max_waiting >= 0 and poll_s > 0, got {max_waiting}, {poll_s}")
        self.max_waiting = max_waiting
        self.poll_s = poll_s
        self._queue: deque[asyncio.Event] = deque()  # one event per waiter, the head first

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def notify(self) -> None:
        """KV may have come back (a request ended): let the head try again now."""
        if self._queue:
            self._queue[0].set()

    async def admit(self, try_place: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """try_place's result once it stops raising KvFullError; see the module docstring."""
        if not self._queue:
            try:
                return await try_place()
            except KvFullError:
                pass
        if len(self._queue) >= self.max_waiting:
            raise NoCapacityError(
                f"every attention pod is full and the admission queue is too ({len(self._queue)} "
                f"requests waiting, limit {self.max_waiting}); retry later or add attention pods"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        turn = asyncio.Event()
        self._queue.append(turn)
        last = "every attention pod is full"
        try:
            while True:
                turn.clear()  # before trying: a notify() during the attempt is not lost
                at_head = self._queue[0] is turn
                if at_head:
                    try:
                        return await try_place()
                    except KvFullError as exc:
                        last = str(exc)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise NoCapacityError(
                        f"waited {timeout_s:g} s for KV room without getting it ({last}); "
                        "retry later, lower max_tokens, or add attention pods"
                    )
                wait_s = min(self.poll_s, remaining) if at_head else remaining
                with contextlib.suppress(TimeoutError):  # the head polls (KV can free elsewhere);
                    await asyncio.wait_for(turn.wait(), wait_s)  # the others sleep until they lead
        finally:
            was_head = self._queue[0] is turn
            self._queue.remove(turn)
            if was_head:
                self.notify()
