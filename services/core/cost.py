"""Cost accounting: what a priced resource spent, split between the requests that used it and idle.

    meter = CostMeter(usd_per_hour=2.0)         # accrues from process start (see `process_started_at`)
    with meter.busy({seq_a: 3, seq_b: 1}):      # one unit of work: a's share of its time is 3/4
        ...                                     # a decode step, a prefill forward
    usd = meter.take(seq_a)                     # what a has cost so far; forgotten here
    meter.totals()                              # CostTotals(request_usd, idle_usd), at any time

Work that holds the resource only now and then (an attention step holds the pod during each layer
frame, not while the decode pod computes between frames) opens once and marks its busy periods:

    work = meter.open(weights)
    with work: ...                              # one busy period; as many as needed
    work.close()

The model, and why conservation holds by construction (docs/cost.md has the equations):

- The meter keeps an *accounted-until* clock. Every event (a busy period starting or ending, a
  scrape, a take) first settles the closed interval [until, now] and moves `until` to now.
- A settled interval with no busy work is idle. Otherwise it is split equally between the busy works
  (processor sharing: each gets dt / n). A virtual clock makes that O(1) per event: it advances by
  dt / n, and a work's seconds are the virtual time that passed while it was busy.
- A work's seconds go to its keys by weight when it is flushed: when it closes, and for every open
  work at each `totals()` and `take()`. Work without weight goes to idle.

So at any moment, after `totals()`: request + idle = price × (until − start) exactly (up to float
rounding), nothing is left pending, and both counters only grow. Costs are kept per key until
`take(key)`; owners take every key they charge, or the dict grows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # monotonic seconds


@dataclass(slots=True, frozen=True)
class CostTotals:
    """What a pod has spent since it started: request + idle = price × accounted time."""

    request_usd: float  # attributed to requests
    idle_usd: float  # no request used the resource

    def __add__(self, other: CostTotals) -> CostTotals:
        return CostTotals(self.request_usd + other.request_usd, self.idle_usd + other.idle_usd)


class CostSource(Protocol):
    """Anything that accrues a pod's price: a `CostMeter`, or the attention pod's memory + compute."""

    @property
    def usd_per_hour(self) -> float: ...

    def totals(self) -> CostTotals: ...


@dataclass(slots=True, frozen=True)
class RequestCost:
    """One request's cost in USD, by the role of the pods that spent it (`usage.cost_breakdown`)."""

    prefill_usd: float = 0.0  # its share of the prefill pod's forwards
    decode_usd: float = 0.0  # its share of the decode pod's steps (local prefill chunks included)
    attention_usd: float = 0.0  # KV memory × time, attention compute and KV import on attention pods
    gateway_usd: float = 0.0  # its share of the gateway's time

    @property
    def total_usd(self) -> float:
        return self.prefill_usd + self.decode_usd + self.attention_usd + self.gateway_usd

    def breakdown(self) -> dict[str, float]:
        return {
            "prefill": self.prefill_usd,
            "decode": self.decode_usd,
            "attention": self.attention_usd,
            "gateway": self.gateway_usd,
        }


def process_started_at() -> float:
    """time.monotonic() at which this process started, from /proc (Linux): pods accrue their price
    from process start, model loading included. Elsewhere: now (logged)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of proc(5): start time in clock ticks after boot
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, IndexError, ValueError, AttributeError) as exc:
        log.warning("cannot read this process's start time (%s); cost accounting starts now", exc)
        return time.monotonic()
    age = max(0.0, since_boot - started_ticks / os.sysconf("SC_CLK_TCK"))
    return time.monotonic() - age


class Work:
    """One unit of work on a `CostMeter`: its keys' weights, and the seconds it was busy and not yet
    flushed. `with work:` is one busy period. Not thread-safe on its own: one owner drives it."""

    __slots__ = ("_busy", "_meter", "_seconds", "_shares", "_since")

    def __init__(self, meter: CostMeter, shares: dict[Hashable, float]) -> None:
        self._meter = meter
        self._shares = shares  # key -> fraction of this work's seconds; empty: idle
        self._seconds = 0.0  # busy seconds not yet flushed to the keys
        self._since = 0.0  # the meter's virtual time when the current busy period began
        self._busy = False

    def __enter__(self) -> Work:
        self._meter._start(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._meter._stop(self)

    def close(self) -> None:
        """Flush its seconds to its keys and drop it (ends a busy period still open)."""
        self._meter._close(self)


class CostMeter:
    """A price accrued over time and attributed to the keys of the work that used it. Thread-safe."""

    def __init__(
        self, usd_per_hour: float, *, started_at: float | None = None, clock: Clock = time.monotonic
    ):
        if usd_per_hour < 0:
            raise ValueError(f"a price cannot be negative, got {usd_per_hour} USD/hour")
        self._price = usd_per_hour
        self._rate = usd_per_hour / 3600.0  # USD per second
        self._clock = clock
        self._lock = threading.Lock()
        self._until = process_started_at() if started_at is None else started_at  # accounted until
        self._virtual = 0.0  # seconds each busy work has received so far (advances by dt / busy)
        self._num_busy = 0
        self._idle_s = 0.0
        self._request_usd = 0.0
        self._open: set[Work] = set()
        self._costs: dict[Hashable, float] = {}

    @property
    def usd_per_hour(self) -> float:
        return self._price

    # ---- work ----------------------------------------------------------------------------------
    def open(self, weights: Mapping[Any, float]) -> Work:  # keys: any hashable
        """Work whose seconds go to `weights`' keys in proportion (none, or all zero: idle)."""
        total = sum(weights.values())
        shares = {key: w / total for key, w in weights.items() if w > 0} if total > 0 else {}
        work = Work(self, shares)
        with self._lock:
            self._open.add(work)
        return work

    def busy(self, weights: Mapping[Any, float]) -> _BusyWork:
        """`with meter.busy(weights):` opens a work, is its one busy period, and closes it."""
        return _BusyWork(self.open(weights))

    def take(self, key: Hashable) -> float:
        """The key's cost so far (open work flushed first), forgotten here: 0.0 for an unknown key."""
        with self._lock:
            self._settle()
            for work in self._open:
                self._flush(work)
            return self._costs.pop(key, 0.0)

    def totals(self) -> CostTotals:
        """Request and idle cost accounted up to now (every open work flushed)."""
        with self._lock:
            self._settle()
            for work in self._open:
                self._flush(work)
            return CostTotals(self._request_usd, self._idle_s * self._rate)

    # ---- internals (under the lock) ------------------------------------------------------------
    def _settle(self) -> None:
        now = self._clock()
        dt = now - self._until
        if dt <= 0:
            return
        self._until = now
        if self._num_busy:
            self._virtual += dt / self._num_busy
        else:
            self._idle_s += dt

    def _start(self, work: Work) -> None:
        with self._lock:
            if work._busy:
                raise RuntimeError("a work's busy periods cannot nest")
            self._settle()
            work._busy, work._since = True, self._virtual
            self._num_busy += 1

    def _stop(self, work: Work) -> None:
        with self._lock:
            self._settle()
            self._end_period(work)

    def _end_period(self, work: Work) -> None:
        if work._busy:
            work._seconds += self._virtual - work._since
            work._busy = False
            self._num_busy -= 1

    def _close(self, work: Work) -> None:
        with self._lock:
            self._settle()
            self._end_period(work)
            self._flush(work)
            self._open.discard(work)

    def _flush(self, work: Work) -> None:
        if work._busy:  # take the busy period so far, keep it open
            work._seconds += self._virtual - work._since
            work._since = self._virtual
        seconds, work._seconds = work._seconds, 0.0
        if not seconds:
            return
        if not work._shares:
            self._idle_s += seconds
            return
        usd = seconds * self._rate
        self._request_usd += usd
        for key, share in work._shares.items():
            self._costs[key] = self._costs.get(key, 0.0) + usd * share


class _BusyWork:
    """The context manager of `CostMeter.busy`."""

    __slots__ = ("work",)

    def __init__(self, work: Work) -> None:
        self.work = work

    def __enter__(self) -> Work:
        return self.work.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.work.close()


class BlockMeter:
    """A price for memory held: each of `total_blocks` blocks costs usd_per_hour / total_blocks per
    hour; a block held by a sequence charges that sequence, a free block is idle.

        meter.hold(seq, blocks)      # after every change of what the sequence holds
        usd = meter.release(seq)     # the sequence is freed: its memory cost, forgotten here

    Exact at every event: used block-seconds are integrated globally and per sequence over the same
    intervals, so Σ sequences = the global integral. Thread-safe.
    """

    def __init__(
        self,
        usd_per_hour: float,
        total_blocks: int,
        *,
        started_at: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if usd_per_hour < 0 or total_blocks < 1:
            raise ValueError(f"need a price >= 0 and >= 1 block, got {usd_per_hour} and {total_blocks}")
        self._price = usd_per_hour
        self._rate = usd_per_hour / 3600.0 / total_blocks  # USD per block-second
        self._total = total_blocks
        self._clock = clock
        self._lock = threading.Lock()
        self._start = process_started_at() if started_at is None else started_at
        self._until = self._start
        self._used = 0  # blocks held by sequences now
        self._used_block_s = 0.0  # ∫ used dt from start to `until`
        self._held: dict[Hashable, list[float]] = {}  # key -> [blocks, block-seconds, since]

    @property
    def usd_per_hour(self) -> float:
        return self._price

    def hold(self, key: Hashable, blocks: int) -> None:
        """The sequence `key` holds `blocks` blocks from now on."""
        with self._lock:
            now = self._settle()
            entry = self._held.setdefault(key, [0, 0.0, now])
            self._settle_key(entry, now)
            self._used += blocks - int(entry[0])
            entry[0] = blocks

    def release(self, key: Hashable) -> float:
        """Stop charging `key` and return its memory cost since it first held blocks (0.0 if never)."""
        with self._lock:
            now = self._settle()
            entry = self._held.pop(key, None)
            if entry is None:
                return 0.0
            self._settle_key(entry, now)
            self._used -= int(entry[0])
            return entry[1] * self._rate

    def totals(self) -> CostTotals:
        with self._lock:
            self._settle()
            all_block_s = self._total * (self._until - self._start)
            return CostTotals(
                self._used_block_s * self._rate, (all_block_s - self._used_block_s) * self._rate
            )

    def _settle(self) -> float:
        now = max(self._clock(), self._until)
        self._used_block_s += self._used * (now - self._until)
        self._until = now
        return now

    @staticmethod
    def _settle_key(entry: list[float], now: float) -> None:
        entry[1] += entry[0] * (now - entry[2])
        entry[2] = now


class CostBook:
    """Costs that arrive for a key from elsewhere (a pod's answer), summed until taken. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usd: dict[Hashable, float] = {}

    def add(self, key: Hashable, usd: float) -> None:
        with self._lock:
            self._usd[key] = self._usd.get(key, 0.0) + usd

    def take(self, key: Hashable) -> float:
        with self._lock:
            return self._usd.pop(key, 0.0)
