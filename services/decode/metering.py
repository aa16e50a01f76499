"""What the engine's steps cost and how long their phases took; the bytes and round trips of the
decode pod's link to attention pods. Bound once, called from named helpers outside the hot loops.

    meter = StepMeter(CostMeter(usd_per_hour))          # Engine(..., meter=meter)
    meter.attach(metrics, scheduler)                   # once a registry exists (pods, colocated)
    with meter.step(plan.scheduled, attention) as timing:
        ... dense layers (and attention) ...; timing.dense_done(); ... LM head, sampling ...
    usd = meter.take(seq_id)                           # at the request's end

A step is one work on the pod's CostMeter shared among its sequences by new tokens (a decode row
is 1, a prefill chunk its length). Phases: dense = the forward minus the time spent waiting for
attention pods' answers (`AttentionWait.wait_seconds`, RemoteAttention), sampling = LM head and
sampling. A step that raises is charged but not observed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client import Histogram

from services.core.cost import CostMeter, Work
from services.core.metrics import (
    BATCH_SIZE,
    DECODE,
    DECODE_STEP_SECONDS,
    PREEMPTIONS,
    TRANSFER_BYTES,
    TRANSFER_SECONDS,
    PodMetrics,
)

if TYPE_CHECKING:
    from services.decode.scheduler import ScheduledChunk, Scheduler


@runtime_checkable
class AttentionWait(Protocol):
    """An attention part that computes elsewhere and can say how long the dense part waited for it."""

    @property
    def wait_seconds(self) -> float:
        """Seconds spent waiting for attention outputs since start (grows monotonically)."""
        ...


class StepMeter:
    def __init__(self, cost: CostMeter | None = None) -> None:
        self.cost = cost or CostMeter(0.0)  # unpriced
        self._batch: Histogram | None = None  # None until attached
        self._phases: tuple[Histogram, ...] = ()

    def attach(self, metrics: PodMetrics, scheduler: Scheduler) -> None:
        """Observe batch sizes, phases and preemptions into `metrics` from now on."""
        self._batch = metrics.histogram(BATCH_SIZE)
        self._phases = tuple(
            metrics.histogram(DECODE_STEP_SECONDS, phase=phase)
            for phase in ("dense", "attention_wait", "sampling")
        )
        metrics.computed(PREEMPTIONS, lambda: [({}, scheduler.num_preemptions)])

    def step(self, scheduled: Sequence[ScheduledChunk], attention: object) -> StepTiming:
        weights = {item.seq.seq_id: item.chunk.length for item in scheduled}
        return StepTiming(self, self.cost.open(weights), len(scheduled), attention)

    def take(self, seq_id: int) -> float:
        return self.cost.take(seq_id)

    def _observe(self, sequences: int, dense: float, wait: float, sampling: float) -> None:
        if self._batch is None:
            return
        self._batch.observe(sequences)
        for histogram, seconds in zip(self._phases, (dense, wait, sampling), strict=True):
            histogram.observe(seconds)


class StepTiming:
    """The context of one step: busy on the cost meter, phase boundaries timed."""

    __slots__ = ("_attention", "_dense_done", "_meter", "_sequences", "_started", "_wait", "_work")

    def __init__(self, meter: StepMeter, work: Work, sequences: int, attention: object) -> None:
        self._meter, self._work, self._sequences = meter, work, sequences
        self._attention = attention if isinstance(attention, AttentionWait) else None
        self._started = self._dense_done = 0.0
        self._wait = 0.0

    def __enter__(self) -> StepTiming:
        self._wait = self._waited()
        self._started = self._dense_done = time.perf_counter()
        self._work.__enter__()
        return self

    def dense_done(self) -> None:
        self._dense_done = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._work.close()
        if kind is not None:
            return
        ended = time.perf_counter()
        wait = self._waited() - self._wait
        forward = max(self._dense_done - self._started, wait)
        self._meter._observe(self._sequences, forward - wait, wait, ended - self._dense_done)

    def _waited(self) -> float:
        return self._attention.wait_seconds if self._attention is not None else 0.0


class LinkMetrics:
    """The decode pod's Step exchanges, by carrier (tcp: the Step socket, grpc: the gRPC stream):
    activation bytes each way and each layer's round trip."""

    CARRIERS = ("tcp", "grpc")

    def __init__(self, metrics: PodMetrics | None = None) -> None:
        metrics = metrics or PodMetrics(DECODE)
        payload = "activations"
        self._sent = {
            t: metrics.counter(TRANSFER_BYTES, transport=t, direction="sent", payload=payload)
            for t in self.CARRIERS
        }
        self._received = {
            t: metrics.counter(TRANSFER_BYTES, transport=t, direction="received", payload=payload)
            for t in self.CARRIERS
        }
        self._round_trip = {
            t: metrics.histogram(TRANSFER_SECONDS, transport=t, payload=payload) for t in self.CARRIERS
        }

    def sent(self, transport: str, nbytes: int) -> None:
        self._sent[transport].inc(nbytes)

    def received(self, transport: str, nbytes: int) -> None:
        self._received[transport].inc(nbytes)

    def round_trip(self, transport: str, seconds: float) -> None:
        self._round_trip[transport].observe(seconds)
