"""Every Prometheus metric disagg exports, as data, and the registry each process serves them from.

    metrics = PodMetrics(Role.DECODE, pod_id, model)            # one per process (or per test app)
    steps = metrics.histogram(DECODE_STEP_SECONDS, phase="dense")  # bound once, outside hot loops
    steps.observe(0.012)
    metrics.computed(KV_BLOCKS_USED, lambda: [({}, engine.stats().blocks_used)])  # read at scrape
    server = metrics.serve(host, port)                         # /metrics (pods; the gateway mounts
                                                               # `metrics.exposition()` on its own port)

The specs below are the single source of truth: `PodMetrics` creates metrics only from them (and
refuses a role a spec does not list), and `python -m services.core.metrics --markdown` writes
docs/metrics.md from them, so the list cannot drift (tests/unit/test_metrics_docs.py).

Conventions (DESIGN.md): names start `disagg_`, units are seconds and bytes, counters end `_total`.
Every metric carries the process's `role`, `pod` and `model`; `tenant` only on gateway metrics
(pods do not know tenants), so series stay few. Scrape with `honor_labels: true` so these labels
win over the scraper's target labels.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.core.cost import CostSource, CostTotals
from services.core.errors import DisaggError


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


GATEWAY, COLOCATED, PREFILL, DECODE, ATTENTION = "gateway", "colocated", "prefill", "decode", "attention"
GATEWAYS = (GATEWAY, COLOCATED)  # processes serving the OpenAI API (colocated: engine included)
ENGINES = (DECODE, COLOCATED)  # processes running the continuous-batching engine
EVERY_ROLE = (GATEWAY, COLOCATED, PREFILL, DECODE, ATTENTION)
BASE_LABELS = ("role", "pod", "model")

REQUEST_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
STEP_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FRAME_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(slots=True, frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    roles: tuple[str, ...]  # processes that export it
    labels: tuple[str, ...] = ()  # beyond BASE_LABELS
    buckets: tuple[float, ...] = ()  # histograms only


def _spec(
    name: str, kind: Kind, roles: tuple[str, ...], help: str, *labels: str, buckets: Any = ()
) -> MetricSpec:
    return MetricSpec(name, kind, help, roles, labels, tuple(buckets))


C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
# ---- cost (every process) ------------------------------------------------------------------------
POD_COST_USD_PER_HOUR = _spec(
    "disagg_pod_cost_usd_per_hour", G, EVERY_ROLE, "This process's price (--cost-usd-per-hour)."
)
COST_USD = _spec(
    "disagg_cost_usd_total",
    C,
    EVERY_ROLE,
    "USD accrued since process start; kind=request: attributed to requests, kind=idle: not. "
    "The sum over kind is price × uptime (docs/cost.md).",
    "kind",
)
# ---- requests (gateways) -------------------------------------------------------------------------
REQUESTS = _spec(
    "disagg_requests_total",
    C,
    GATEWAYS,
    "Requests ended, by status: ok, unauthorized, invalid, rate_limited, over_budget, no_capacity, "
    'unavailable, timeout, cancelled, error. Turned away at authentication: tenant "-".',
    "tenant",
    "status",
)
TTFT = _spec(
    "disagg_time_to_first_token_seconds",
    H,
    GATEWAYS,
    "Arrival to the first generated token (ok requests).",
    "tenant",
    buckets=REQUEST_S,
)
ITL = _spec(
    "disagg_inter_token_latency_seconds",
    H,
    GATEWAYS,
    "Time between consecutive tokens of a request (ok requests).",
    "tenant",
    buckets=STEP_S,
)
E2E = _spec(
    "disagg_request_duration_seconds",
    H,
    GATEWAYS,
    "Arrival to the last token (ok requests).",
    "tenant",
    buckets=REQUEST_S,
)
PROMPT_TOKENS = _spec(
    "disagg_prompt_tokens_total",
    C,
    GATEWAYS,
    "Prompt tokens of ended requests (after the chat template).",
    "tenant",
)
GENERATION_TOKENS = _spec(
    "disagg_generation_tokens_total", C, GATEWAYS, "Tokens generated, a final EOS included.", "tenant"
)
REQUEST_COST_USD = _spec(
    "disagg_request_cost_usd_total",
    C,
    GATEWAYS,
    "USD of ended requests as reported in usage.cost_breakdown, by the component that spent it: "
    "prefill, decode, attention, gateway.",
    "tenant",
    "component",
)
RUNNING = _spec(
    "disagg_requests_running",
    G,
    (*GATEWAYS, PREFILL, DECODE),
    "Requests being served: generated (gateways, decode), in a forward (prefill).",
)
WAITING = _spec(
    "disagg_requests_waiting",
    G,
    (*GATEWAYS, PREFILL, DECODE),
    "Requests admitted, not running yet (queued, or prefilling elsewhere).",
)
# ---- engine (decode pods, colocated) -------------------------------------------------------------
BATCH_SIZE = _spec("disagg_decode_batch_size", H, ENGINES, "Sequences in one engine step.", buckets=BATCH)
DECODE_STEP_SECONDS = _spec(
    "disagg_decode_step_seconds",
    H,
    ENGINES,
    "One engine step's time by phase: dense (the model's own layers), attention_wait (waiting for "
    "attention pods' answers; 0 with local attention), sampling (LM head and sampling).",
    "phase",
    buckets=STEP_S,
)
PREEMPTIONS = _spec(
    "disagg_decode_preemptions_total", C, ENGINES, "Sequences preempted for KV room (recomputed later)."
)
# ---- prefill pods --------------------------------------------------------------------------------
PREFILL_SECONDS = _spec(
    "disagg_prefill_seconds",
    H,
    (PREFILL,),
    "One prefill forward, until every attention pod acknowledged its K/V.",
    buckets=REQUEST_S,
)
PREFILL_QUEUE_SECONDS = _spec(
    "disagg_prefill_queue_seconds", H, (PREFILL,), "Time a prompt waited for its forward.", buckets=REQUEST_S
)
PREFILL_TOKENS = _spec("disagg_prefill_tokens_total", C, (PREFILL,), "Prompt tokens prefilled.")
PREFILL_REQUESTS = _spec(
    "disagg_prefill_requests_total", C, (PREFILL,), "Prompts ended, by status: ok, failed.", "status"
)
# ---- attention pods ------------------------------------------------------------------------------
KV_BLOCKS_USED = _spec("disagg_kv_blocks_used", G, (ATTENTION,), "KV blocks held by sequences.")
KV_BLOCKS_TOTAL = _spec("disagg_kv_blocks_capacity", G, (ATTENTION,), "KV blocks in the pool.")
KV_SEQUENCES = _spec("disagg_kv_sequences", G, (ATTENTION,), "Sequences open on the pod.")
ATTENTION_BYTES_READ = _spec(
    "disagg_attention_bytes_read_total",
    C,
    (ATTENTION,),
    "K/V bytes attention steps read from the KV pool, by the sequences' attention policy.",
    "policy",
)
ATTENTION_DENSE_BYTES = _spec(
    "disagg_attention_dense_bytes_total",
    C,
    (ATTENTION,),
    "K/V bytes dense attention would have read for the same lanes (savings = 1 - read / this).",
    "policy",
)
ATTENTION_LAYER_SECONDS = _spec(
    "disagg_attention_layer_seconds",
    H,
    (ATTENTION,),
    "Compute time of one Step layer frame.",
    buckets=FRAME_S,
)
# ---- transport -----------------------------------------------------------------------------------
TRANSFER_BYTES = _spec(
    "disagg_transfer_bytes_total",
    C,
    (PREFILL, DECODE, ATTENTION),
    "Tensor bytes moved between pods: transport tcp (the Step socket) | grpc | nixl, direction "
    "sent|received, payload "
    "activations (per-layer q/k/v and o) | kv (prompt K/V from prefill to attention pods).",
    "transport",
    "direction",
    "payload",
)
TRANSFER_SECONDS = _spec(
    "disagg_transfer_seconds",
    H,
    (PREFILL, DECODE),
    "One transfer: payload activations = a layer's frames sent to the answers received (decode); "
    "payload kv = a prompt's K/V export until every pod acknowledged (prefill).",
    "transport",
    "payload",
    buckets=(*FRAME_S, 2.5, 5.0, 10.0),
)

ALL_METRICS: tuple[MetricSpec, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricSpec))

Samples = Iterable[tuple[Mapping[str, str], float]]  # (extra labels, value) per series


class PodMetrics:
    """The metrics of one process: a registry of its own (process_* metrics included), with every
    metric carrying this process's role, pod and model. Thread-safe."""

    def __init__(self, role: str, pod: str = "", model: str = "") -> None:
        if role not in EVERY_ROLE:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(EVERY_ROLE)}")
        disable_created_metrics()  # no `_created` series: they double the series and nobody reads them
        self.role = role
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._base = (role, pod, model)
        self._families: dict[str, Any] = {}
        self._lock = threading.Lock()

    def counter(self, spec: MetricSpec, **labels: str) -> Counter:
        return self._child(spec, Kind.COUNTER, labels)

    def gauge(self, spec: MetricSpec, **labels: str) -> Gauge:
        return self._child(spec, Kind.GAUGE, labels)

    def histogram(self, spec: MetricSpec, **labels: str) -> Histogram:
        return self._child(spec, Kind.HISTOGRAM, labels)

    def computed(self, spec: MetricSpec, samples: Callable[[], Samples]) -> None:
        """A counter or gauge whose series are read from `samples()` at each scrape."""
        self._check(spec, None)
        with self._lock:
            if spec.name in self._families:
                raise ValueError(f"{spec.name} is already registered")
            self._families[spec.name] = _Computed(spec, self._base, samples, self.registry)

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type, for an HTTP handler of one's own."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics on host:port (0: any free port) from a thread; raises DisaggError if taken."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise DisaggError(
                f"cannot serve metrics on {host}:{port} ({exc}); pick another --metrics-port"
            ) from exc
        return MetricsServer(server, thread)

    def _check(self, spec: MetricSpec, labels: Mapping[str, str] | None) -> None:
        if self.role not in spec.roles:
            raise ValueError(f"{spec.name} is not a {self.role} metric (roles: {', '.join(spec.roles)})")
        if labels is not None and set(labels) != set(spec.labels):
            raise ValueError(f"{spec.name} takes labels {spec.labels}, got {tuple(labels)}")

    def _child(self, spec: MetricSpec, kind: Kind, labels: Mapping[str, str]) -> Any:
        if spec.kind is not kind:
            raise ValueError(f"{spec.name} is a {spec.kind}, not a {kind}")
        self._check(spec, labels)
        with self._lock:
            family = self._families.get(spec.name)
            if family is None:
                family = self._families[spec.name] = _create(spec, self.registry)
        return family.labels(*self._base, *(labels[name] for name in spec.labels))


def _create(spec: MetricSpec, registry: CollectorRegistry) -> Any:
    names = (*BASE_LABELS, *spec.labels)
    if spec.kind is Kind.COUNTER:
        return Counter(spec.name, spec.help, names, registry=registry)
    if spec.kind is Kind.GAUGE:
        return Gauge(spec.name, spec.help, names, registry=registry)
    return Histogram(spec.name, spec.help, names, registry=registry, buckets=spec.buckets)


class _Computed(Collector):
    def __init__(
        self,
        spec: MetricSpec,
        base: tuple[str, ...],
        samples: Callable[[], Samples],
        registry: CollectorRegistry,
    ) -> None:
        if spec.kind is Kind.HISTOGRAM:
            raise ValueError(f"{spec.name}: only counters and gauges can be computed at scrape")
        self.spec, self.base, self.samples = spec, base, samples
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        names = [*BASE_LABELS, *self.spec.labels]
        family_type = CounterMetricFamily if self.spec.kind is Kind.COUNTER else GaugeMetricFamily
        family = family_type(self.spec.name, self.spec.help, labels=names)
        for labels, value in self.samples():
            family.add_metric([*self.base, *(labels[name] for name in self.spec.labels)], value)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())  # series are known only at scrape


def export_cost(metrics: PodMetrics, *sources: CostSource) -> None:
    """The process's price and its cost totals (the sum of `sources`), read at each scrape."""
    metrics.computed(POD_COST_USD_PER_HOUR, lambda: [({}, sum(s.usd_per_hour for s in sources))])

    def totals() -> Samples:
        total = sum((s.totals() for s in sources), CostTotals(0.0, 0.0))
        return [({"kind": "request"}, total.request_usd), ({"kind": "idle"}, total.idle_usd)]

    metrics.computed(COST_USD, totals)


@dataclass(slots=True)
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- docs/metrics.md -----------------------------------------------------------------------------
def markdown() -> str:
    """docs/metrics.md: every metric with its type, labels, the processes exporting it and its help."""
    lines = [
        "# Metrics",
        "",
        "Generated from `services/core/metrics.py` by `python -m services.core.metrics --markdown > "
        "docs/metrics.md`; `tests/unit/test_metrics_docs.py` fails when this file is stale.",
        "",
        "Every process serves `/metrics` (pods on `--metrics-port`, registered in Redis as "
        "`metrics_address`; the gateway on its HTTP port). Every metric carries `role`, `pod` and "
        "`model`; scrape with `honor_labels: true`. Each process also exports prometheus-client's "
        "`process_*` metrics (CPU, memory, `process_start_time_seconds`). Costs: see "
        "[cost.md](cost.md).",
        "",
        "| metric | type | labels | exported by | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in ALL_METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "—"
        lines.append(f"| `{spec.name}` | {spec.kind} | {labels} | {', '.join(spec.roles)} | {spec.help} |")
    lines += ["", "Histogram buckets (upper bounds):", ""]
    lines += [f"- `{s.name}`: {', '.join(f'{b:g}' for b in s.buckets)}" for s in ALL_METRICS if s.buckets]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.core.metrics", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--markdown", action="store_true", help="print docs/metrics.md")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
