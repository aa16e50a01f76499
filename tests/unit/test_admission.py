"""The gateway's admission queue: FIFO, bounded, timed out, woken when KV comes back (pure asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from services.core.errors import BackendUnavailableError, KvFullError, NoCapacityError
from services.gateway.admission import AdmissionQueue


class Pool:
    """A KV pool of `free` slots: placing takes one or raises KvFullError; `release` gives one back."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.attempts = 0

    async def place(self, name: str, order: list[str]) -> str:
        self.attempts += 1
        if self.free == 0:
            raise KvFullError("full")
        self.free -= 1
        order.append(name)
        return name


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_waiters_are_admitted_in_arrival_order_as_kv_comes_back() -> None:
    async def main() -> list[str]:
        queue, pool, order = AdmissionQueue(max_waiting=8, poll_s=10), Pool(free=1), []
        first = await queue.admit(lambda: pool.place("first", order), timeout_s=5)
        waiters = []
        for name in ("a", "b", "c"):
            waiters.append(asyncio.create_task(queue.admit(lambda n=name: pool.place(n, order), 5)))
            await asyncio.sleep(0.01)  # arrival order a, b, c
        assert queue.waiting == 3 and first == "first"
        for _ in range(3):
            pool.free += 1
            queue.notify()  # a request ended: the head places at once (poll_s is 10 s)
            await asyncio.sleep(0.05)
        await asyncio.gather(*waiters)
        assert queue.waiting == 0
        return order

    assert run(main()) == ["first", "a", "b", "c"]


def test_only_the_head_tries_so_a_small_request_does_not_overtake() -> None:
    async def main() -> int:
        queue, pool = AdmissionQueue(max_waiting=8, poll_s=0.01), Pool(free=0)
        tasks = [asyncio.create_task(queue.admit(lambda: pool.place("x", []), 0.2)) for _ in range(4)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, NoCapacityError) and "waited 0.2 s" in str(r) for r in results)
        return pool.attempts

    attempts = run(main())
    # Only the head polls (about 0.2 / 0.01 times, then the next head once its wait is spent); four
    # polling waiters would make ~4x as many attempts.
    assert isinstance(attempts, int) and attempts < 40


def test_a_full_queue_sheds_load_at_once() -> None:
    async def main() -> None:
        queue, pool = AdmissionQueue(max_waiting=2, poll_s=0.01), Pool(free=0)
        waiting = [asyncio.create_task(queue.admit(lambda: pool.place("x", []), 5)) for _ in range(2)]
        await asyncio.sleep(0.02)
        with pytest.raises(NoCapacityError, match=r"admission queue is too \(2 requests waiting, limit 2\)"):
            await queue.admit(lambda: pool.place("x", []), 5)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert queue.waiting == 0  # cancelled waiters leave the queue

    run(main())


def test_errors_other_than_kv_full_pass_through_without_waiting() -> None:
    async def fail() -> str:
        raise BackendUnavailableError("Redis down")

    async def main() -> None:
        queue = AdmissionQueue(max_waiting=2)
        with pytest.raises(BackendUnavailableError, match="Redis down"):
            await asyncio.wait_for(queue.admit(fail, timeout_s=60), 1)

    run(main())
