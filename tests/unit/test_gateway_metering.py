"""The gateway's per-request metering without a model: statuses, tokens, latencies and the cost
counters, which must add up to what the requests' usage reported, gateway share included."""

from __future__ import annotations

import asyncio

import pytest

from services.core.cost import CostMeter, RequestCost
from services.core.errors import BackendUnavailableError, NoCapacityError, PromptTooLongError
from services.core.metrics import PodMetrics
from services.decode.engine import TokenEvent
from services.decode.scheduler import FinishReason
from services.gateway.backend import BackendLoad
from services.gateway.errors import ClientDisconnectedError, DeadlineExceededError, ShuttingDownError
from services.gateway.metering import GatewayMetering, Status, status_of

PODS = RequestCost(prefill_usd=0.25, decode_usd=0.5, attention_usd=0.125)


def metering() -> GatewayMetering:
    metrics = PodMetrics("gateway", "gw-0", "m")
    return GatewayMetering(metrics, CostMeter(36.0), lambda: BackendLoad(running=2, waiting=1))


def sample(m: GatewayMetering, name: str, **labels: str) -> float:
    value = m.metrics.registry.get_sample_value(
        name, {"role": "gateway", "pod": "gw-0", "model": "m", **labels}
    )
    return 0.0 if value is None else value


def test_an_ok_request_counts_tokens_latencies_and_its_full_cost() -> None:
    m = metering()
    meter = m.begin("acme")
    meter.prompt(5)
    for token in (10, 11):
        meter.event(TokenEvent(0, token, "x", None))
    meter.event(TokenEvent(0, 12, "y", FinishReason.STOP))
    cost = meter.complete(PODS)
    meter.finish()
    meter.finish()  # idempotent
    assert cost.gateway_usd > 0 and cost.prefill_usd == 0.25 and cost.total_usd > PODS.total_usd
    assert sample(m, "disagg_requests_total", tenant="acme", status="ok") == 1
    assert sample(m, "disagg_prompt_tokens_total", tenant="acme") == 5
    assert sample(m, "disagg_generation_tokens_total", tenant="acme") == 3
    assert sample(m, "disagg_time_to_first_token_seconds_count", tenant="acme") == 1
    assert sample(m, "disagg_inter_token_latency_seconds_count", tenant="acme") == 2
    assert sample(m, "disagg_request_duration_seconds_count", tenant="acme") == 1
    for component, usd in cost.breakdown().items():
        assert sample(m, "disagg_request_cost_usd_total", tenant="acme", component=component) == usd
    assert sample(m, "disagg_cost_usd_total", kind="request") == pytest.approx(cost.gateway_usd)
    assert sample(m, "disagg_requests_running") == 2 and sample(m, "disagg_requests_waiting") == 1


def test_a_failed_request_counts_its_status_and_the_gateway_share_only() -> None:
    m = metering()
    meter = m.begin("default")
    meter.fail(NoCapacityError("full"))
    meter.fail(ValueError("later errors do not replace the first"))
    meter.finish()
    assert sample(m, "disagg_requests_total", tenant="default", status="no_capacity") == 1
    assert sample(m, "disagg_time_to_first_token_seconds_count", tenant="default") == 0
    gateway = sample(m, "disagg_request_cost_usd_total", tenant="default", component="gateway")
    assert (
        gateway > 0 and sample(m, "disagg_request_cost_usd_total", tenant="default", component="decode") == 0
    )
    # every status exists from the start for a known tenant, so error ratios have data before an error
    assert (
        m.metrics.registry.get_sample_value(
            "disagg_requests_total",
            {"role": "gateway", "pod": "gw-0", "model": "m", "tenant": "default", "status": "error"},
        )
        == 0
    )


def test_a_request_that_ends_without_its_last_event_was_cancelled() -> None:
    m = metering()
    meter = m.begin("default")
    meter.event(TokenEvent(0, 1, "a", None))
    meter.finish()
    assert sample(m, "disagg_requests_total", tenant="default", status="cancelled") == 1


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (PromptTooLongError("long"), Status.INVALID),
        (NoCapacityError("full"), Status.NO_CAPACITY),
        (ShuttingDownError("bye"), Status.UNAVAILABLE),
        (BackendUnavailableError("pod died"), Status.UNAVAILABLE),
        (DeadlineExceededError("slow"), Status.TIMEOUT),
        (ClientDisconnectedError("gone"), Status.CANCELLED),
        (asyncio.CancelledError(), Status.CANCELLED),
        (RuntimeError("bug"), Status.ERROR),
    ],
)
def test_statuses_follow_the_error_classes(error: BaseException, status: Status) -> None:
    assert status_of(error) is status
