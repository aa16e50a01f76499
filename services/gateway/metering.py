"""The gateway's request metrics and its own share of each request's cost.

    metering = GatewayMetering(metrics, CostMeter(price), backend.load)     # one per app
    meter = metering.begin(tenant)        # at arrival: the gateway's work for the request starts
    meter.prompt(len(prompt_ids))
    meter.event(event)                    # each token event (`Generation.next`)
    cost = meter.complete(event.cost)     # the last event: the gateway's share closes; full cost
    meter.fail(exc)                       # the request ends with an error instead
    meter.finish()                        # once, idempotent: status, latencies, tokens, costs

Every gateway-side function takes the request's `tenant` (its API key's, docs/tenants.md; "default"
without keys). Requests refused by authentication (401) never reach a route and are not counted.
Series of a tenant are created, at zero, for every status and component the first time the tenant
is seen, so ratios and rates have data before the first error.

The gateway's cost: its time is shared equally among the requests in flight (processor sharing on
its CostMeter, from arrival to the last event); no request in flight is idle. Latency histograms
observe ok requests only; token and cost counters count every request that ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import Counter, Histogram

from services.core.cost import CostMeter, CostSource, RequestCost
from services.core.errors import BackendUnavailableError, InvalidRequestError, NoCapacityError
from services.core.metrics import (
    E2E,
    GENERATION_TOKENS,
    ITL,
    PROMPT_TOKENS,
    REQUEST_COST_USD,
    REQUESTS,
    RUNNING,
    TTFT,
    WAITING,
    PodMetrics,
    export_cost,
)
from services.core.tenants import DEFAULT_TENANT, BudgetExceededError, RateLimitedError
from services.decode.engine import TokenEvent
from services.gateway.auth import InvalidApiKeyError
from services.gateway.backend import BackendLoad
from services.gateway.errors import ClientDisconnectedError, DeadlineExceededError, ModelNotServedError

COMPONENTS = ("prefill", "decode", "attention", "gateway")  # the keys of usage.cost_breakdown


class Status(StrEnum):
    OK = "ok"
    UNAUTHORIZED = "unauthorized"  # 401: no, an unknown or a revoked API key (tenant label "-")
    INVALID = "invalid"  # 400 / 404: the request's fault
    RATE_LIMITED = "rate_limited"  # 429: the tenant's requests or tokens per minute
    OVER_BUDGET = "over_budget"  # 402: the tenant's monthly budget is spent
    NO_CAPACITY = "no_capacity"  # 503: no room now
    UNAVAILABLE = "unavailable"  # 503: a pod failed, shutting down
    TIMEOUT = "timeout"  # 504: the request deadline passed
    CANCELLED = "cancelled"  # the client went away
    ERROR = "error"  # 500: a bug


def status_of(exc: BaseException) -> Status:
    """The status label of a request that ended with `exc` (the same classes as errors.describe)."""
    match exc:
        case InvalidApiKeyError():
            return Status.UNAUTHORIZED
        case InvalidRequestError() | ModelNotServedError():
            return Status.INVALID
        case RateLimitedError():
            return Status.RATE_LIMITED
        case BudgetExceededError():
            return Status.OVER_BUDGET
        case NoCapacityError():
            return Status.NO_CAPACITY
        case BackendUnavailableError():
            return Status.UNAVAILABLE
        case DeadlineExceededError():
            return Status.TIMEOUT
        case ClientDisconnectedError() | asyncio.CancelledError():
            return Status.CANCELLED
    return Status.ERROR


@dataclass(slots=True, frozen=True)
class _TenantSeries:
    """One tenant's bound metric children."""

    requests: dict[Status, Counter]
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    cost: dict[str, Counter]  # component -> USD


class GatewayMetering:
    def __init__(
        self,
        metrics: PodMetrics,
        meter: CostMeter,
        load: Callable[[], BackendLoad],
        more_costs: Sequence[CostSource] = (),
    ) -> None:
        """`more_costs`: what else this process accrues (the colocated engine) for its cost totals."""
        self.metrics = metrics
        self.meter = meter
        export_cost(metrics, meter, *more_costs)
        metrics.computed(RUNNING, lambda: [({}, load().running)])
        metrics.computed(WAITING, lambda: [({}, load().waiting)])
        self._tenants: dict[str, _TenantSeries] = {}
        self.series(DEFAULT_TENANT)

    def begin(self, tenant: str) -> RequestMeter:
        return RequestMeter(self, tenant)

    def series(self, tenant: str) -> _TenantSeries:
        series = self._tenants.get(tenant)
        if series is None:
            m = self.metrics
            series = self._tenants[tenant] = _TenantSeries(
                requests={s: m.counter(REQUESTS, tenant=tenant, status=s.value) for s in Status},
                ttft=m.histogram(TTFT, tenant=tenant),
                itl=m.histogram(ITL, tenant=tenant),
                e2e=m.histogram(E2E, tenant=tenant),
                prompt_tokens=m.counter(PROMPT_TOKENS, tenant=tenant),
                generation_tokens=m.counter(GENERATION_TOKENS, tenant=tenant),
                cost={c: m.counter(REQUEST_COST_USD, tenant=tenant, component=c) for c in COMPONENTS},
            )
        return series


class RequestMeter:
    """One request at the gateway, from arrival to `finish`. Used from the event loop only."""

    def __init__(self, metering: GatewayMetering, tenant: str) -> None:
        self.tenant = tenant
        self._metering = metering
        self._arrival = time.perf_counter()
        self._work = metering.meter.open({self: 1.0})
        self._work.__enter__()  # the gateway holds the request until its last event
        self._tokens: list[float] = []  # perf_counter() of each generated token
        self._prompt_tokens = 0
        self._pods_cost: RequestCost | None = None  # from the backend's last event
        self._cost: RequestCost | None = None  # the full cost, once the gateway's share is closed
        self._error: BaseException | None = None
        self._completed = False  # the last event arrived
        self._finished = False

    def prompt(self, num_tokens: int) -> None:
        self._prompt_tokens = num_tokens

    def event(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self._tokens.append(time.perf_counter())

    def complete(self, pods_cost: RequestCost | None) -> RequestCost:
        """The last event arrived with what the pods spent: the full cost, gateway share included."""
        self._completed = True
        self._pods_cost = pods_cost
        return self.cost()

    def fail(self, exc: BaseException) -> None:
        if self._error is None and not self._finished:
            self._error = exc

    def cost(self) -> RequestCost:
        """Closes the gateway's share (idempotent): what the request cost as far as it is known."""
        if self._cost is None:
            self._work.close()
            gateway = self._metering.meter.take(self)
            self._cost = dataclasses.replace(self._pods_cost or RequestCost(), gateway_usd=gateway)
        return self._cost

    @property
    def status(self) -> Status:
        if self._error is not None:
            return status_of(self._error)
        return Status.OK if self._completed else Status.CANCELLED

    def finish(self) -> None:
        """Count the request once: its status, tokens and cost; latencies when it succeeded."""
        if self._finished:
            return
        self._finished = True
        cost, status = self.cost(), self.status
        series = self._metering.series(self.tenant)
        series.requests[status].inc()
        series.prompt_tokens.inc(self._prompt_tokens)
        series.generation_tokens.inc(len(self._tokens))
        for component, usd in cost.breakdown().items():
            series.cost[component].inc(usd)
        if status is Status.OK and self._tokens:
            series.ttft.observe(self._tokens[0] - self._arrival)
            for earlier, later in zip(self._tokens, self._tokens[1:], strict=False):
                series.itl.observe(later - earlier)
            series.e2e.observe(self._tokens[-1] - self._arrival)
