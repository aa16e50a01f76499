"""The prefill pod's metrics: forwards, queueing, prompts by status, K/V exported, load and cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from services.core.cost import CostMeter
from services.core.errors import DisaggError
from services.core.metrics import (
    PREFILL_QUEUE_SECONDS,
    PREFILL_REQUESTS,
    PREFILL_SECONDS,
    PREFILL_TOKENS,
    RUNNING,
    TRANSFER_BYTES,
    TRANSFER_SECONDS,
    WAITING,
    PodMetrics,
    export_cost,
)

if TYPE_CHECKING:
    from services.prefill.engine import PrefillResult, PrefillStats


class PrefillMetrics:
    def __init__(
        self, metrics: PodMetrics, transport: str, stats: Callable[[], PrefillStats], meter: CostMeter
    ) -> None:
        export_cost(metrics, meter)
        metrics.computed(RUNNING, lambda: [({}, stats().running_requests)])
        metrics.computed(WAITING, lambda: [({}, (s := stats()).queued_requests - s.running_requests)])
        self._forward = metrics.histogram(PREFILL_SECONDS)
        self._queue = metrics.histogram(PREFILL_QUEUE_SECONDS)
        self._tokens = metrics.counter(PREFILL_TOKENS)
        self._ok = metrics.counter(PREFILL_REQUESTS, status="ok")
        self._failed = metrics.counter(PREFILL_REQUESTS, status="failed")
        self._kv_bytes = metrics.counter(TRANSFER_BYTES, transport=transport, direction="sent", payload="kv")
        self._kv_seconds = metrics.histogram(TRANSFER_SECONDS, transport=transport, payload="kv")

    def forward(self, seconds: float) -> None:
        self._forward.observe(seconds)

    def exported(self, kv_bytes: int, seconds: float) -> None:
        """A prompt's K/V acknowledged by every pod, `seconds` after its forward began."""
        self._kv_bytes.inc(kv_bytes)
        self._kv_seconds.observe(seconds)

    def prompt(self, outcome: PrefillResult | DisaggError) -> None:
        if isinstance(outcome, DisaggError):
            self._failed.inc()
            return
        self._ok.inc()
        self._tokens.inc(outcome.tokens)
        self._queue.observe(outcome.queue_seconds)
