"""What the gateway serves from: the `Backend` interface and the colocated backend.

The gateway tokenizes, validates and renders; a backend only turns prompt ids into token events:

    backend.start()
    async for event in backend.generate(prompt_ids, params):   # TokenEvents; the last has a finish_reason
        ...
    backend.stop()

Cancellation is the consumer's business: when it stops iterating (its task is cancelled, or it
closes the iterator), the backend cancels the request and frees its KV. `ColocatedBackend` runs
the whole engine in this process (`disagg up --colocated`); the disaggregated backend will place
requests on decode pods through Redis and stream their tokens over gRPC behind the same interface.
"""

from __future__ import annotations

import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from services.core.attention import DEFAULT_POLICY, PolicySpec
from services.core.cost import CostMeter, CostSource, RequestCost
from services.core.errors import BackendUnavailableError
from services.core.metrics import COLOCATED, GATEWAY, PodMetrics
from services.core.model.load import LoadedModel
from services.core.model.tokenizer import Tokenizer
from services.core.tenants import DEFAULT_TENANT
from services.decode.colocated import DEFAULT_KV_BUDGET_BYTES, build_engine
from services.decode.engine import TokenEvent
from services.decode.loop import EngineLoop, EngineStoppedError
from services.decode.metering import StepMeter
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason, SchedulerConfig


@dataclass(slots=True, frozen=True)
class BackendLoad:
    running: int  # requests being generated
    waiting: int  # requests queued, not yet admitted


class Backend(ABC):
    """A model the gateway can generate from.

    Contract: `generate` raises typed errors from `services.core.errors` — `PromptTooLongError` /
    `InvalidRequestError` for requests it cannot take, `NoCapacityError` when it has no room now,
    `BackendUnavailableError` when it cannot finish a request (shutdown, a failed pod) — before or
    while yielding events. Events arrive in order; the last one has a finish_reason (and, from
    backends that account cost, `cost`: what the pods spent on it). Abandoning the iterator
    cancels the request.
    """

    model_name: str  # the OpenAI model id served by default
    max_model_len: int  # prompt + generated tokens at most
    tokenizer: Tokenizer
    role: str = GATEWAY  # the metrics role of the process serving it

    def instrument(self, metrics: PodMetrics) -> None:
        """Register metrics of the backend's own (default: none); called once by the app."""
        return None

    def cost_sources(self) -> Sequence[CostSource]:
        """What this process accrues besides the gateway's own meter. A backend that returns any
        runs in this process and carries the process's price: the gateway's own meter is then
        unpriced, so the process is not charged twice (default: none)."""
        return ()

    @abstractmethod
    def start(self) -> None:
        """Begin serving (threads, connections); called once before the first request."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving; requests still in flight end with `BackendUnavailableError`. Blocks."""

    @abstractmethod
    def ready(self) -> bool:
        """True while requests can be served (drives GET /health)."""

    @abstractmethod
    def load(self) -> BackendLoad:
        """Current load, for GET /health and tests."""

    @abstractmethod
    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[TokenEvent]:
        """The events of one request of `tenant`; see the class docstring for errors and cancellation."""


class ColocatedBackend(Backend):
    """The continuous-batching engine with local attention, driven by an `EngineLoop` thread. Each
    request's cost is its share of the engine's steps, reported as `decode` (prefill chunks and
    attention run inside the same forwards)."""

    role = COLOCATED

    def __init__(
        self,
        model: LoadedModel,
        *,
        model_name: str | None = None,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
        scheduler: SchedulerConfig | None = None,
        cost_usd_per_hour: float = 0.0,
        default_policy: PolicySpec = DEFAULT_POLICY,
    ) -> None:
        """`cost_usd_per_hour`: the process's price, accrued by the engine's steps (docs/cost.md).
        `default_policy`: the attention policy of requests that name none."""
        self._meter = StepMeter(CostMeter(cost_usd_per_hour))
        engine = build_engine(
            model,
            kv_budget_bytes=kv_budget_bytes,
            scheduler=scheduler,
            meter=self._meter,
            default_policy=default_policy,
        )
        self.model_name = model_name or model.name
        self.max_model_len = engine.max_len
        self.tokenizer = model.tokenizer
        self._loop = EngineLoop(engine, name="colocated-engine")
        self._state_lock = threading.Lock()
        self._serving = False

    def start(self) -> None:
        self._loop.start()
        with self._state_lock:
            self._serving = True

    def stop(self) -> None:
        with self._state_lock:
            self._serving = False
        self._loop.stop()

    def ready(self) -> bool:
        return self._serving

    def load(self) -> BackendLoad:
        return BackendLoad(running=self._loop.num_running, waiting=self._loop.num_waiting)

    def instrument(self, metrics: PodMetrics) -> None:
        self._meter.attach(metrics, self._loop.engine.scheduler)

    def cost_sources(self) -> Sequence[CostSource]:
        return (self._meter.cost,)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str = DEFAULT_TENANT
    ) -> AsyncIterator[TokenEvent]:
        try:
            stream = self._loop.submit(prompt_ids, params)  # PromptTooLongError and the like raise here
        except EngineStoppedError as exc:
            self._serving = False  # the loop stopped or crashed: /health turns 503
            raise BackendUnavailableError(str(exc)) from exc
        finished = False
        try:
            async for event in stream:
                finished = event.finish_reason is not None
                if finished and event.finish_reason is not FinishReason.ABORT:
                    event = dataclasses.replace(
                        event, cost=RequestCost(decode_usd=self._meter.take(stream.seq_id))
                    )
                yield event
        except EngineStoppedError as exc:
            finished = True  # the loop already dropped the request
            raise BackendUnavailableError(str(exc)) from exc
        finally:
            if not finished:  # the consumer went away: free the KV now
                stream.cancel()
            self._meter.take(stream.seq_id)  # an aborted request's share stays unattributed
