"""The metric specs and per-process registries: docs/metrics.md is generated from them, every process
exports only its role's metrics with its role/pod/model labels, and a pod serves them over HTTP."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.core.cost import CostMeter
from services.core.metrics import (
    ALL_METRICS,
    COST_USD,
    DECODE_STEP_SECONDS,
    KV_BLOCKS_USED,
    REQUESTS,
    PodMetrics,
    export_cost,
    markdown,
)

ROOT = Path(__file__).resolve().parents[2]


def test_docs_metrics_md_is_generated_from_the_specs() -> None:
    assert (ROOT / "docs" / "metrics.md").read_text() == markdown(), (
        "docs/metrics.md is stale: python -m services.core.metrics --markdown > docs/metrics.md"
    )


def test_specs_follow_the_naming_conventions() -> None:
    names = [spec.name for spec in ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in ALL_METRICS:
        assert spec.name.startswith("disagg_"), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert bool(spec.buckets) == (spec.kind == "histogram"), spec.name
        assert not {"role", "pod", "model"} & set(spec.labels), spec.name
        assert "tenant" not in spec.labels or set(spec.roles) <= {"gateway", "colocated"}, spec.name


def test_a_process_exports_its_metrics_with_its_labels_over_http() -> None:
    metrics = PodMetrics("decode", "decode-7", "smollm2-135m")
    metrics.histogram(DECODE_STEP_SECONDS, phase="dense").observe(0.02)
    export_cost(metrics, CostMeter(7.2))
    server = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    step = [s for s in families["disagg_decode_step_seconds"].samples if s.name.endswith("_count")]
    assert step[0].labels == {"role": "decode", "pod": "decode-7", "model": "smollm2-135m", "phase": "dense"}
    cost = {s.labels["kind"]: s.value for s in families["disagg_cost_usd"].samples}
    assert set(cost) == {"request", "idle"} and cost["request"] == 0 and cost["idle"] > 0
    assert families["disagg_pod_cost_usd_per_hour"].samples[0].value == 7.2
    assert "process_start_time_seconds" in families


def test_a_role_cannot_export_another_roles_metric_or_wrong_labels() -> None:
    metrics = PodMetrics("attention", "a-0")
    with pytest.raises(ValueError, match="not a attention metric"):
        metrics.counter(REQUESTS, tenant="t", status="ok")
    with pytest.raises(ValueError, match="takes labels"):
        PodMetrics("gateway").counter(REQUESTS, tenant="t")
    with pytest.raises(ValueError, match="is a gauge"):
        metrics.counter(KV_BLOCKS_USED)
    with pytest.raises(ValueError, match="unknown role"):
        PodMetrics("router")
    metrics.computed(COST_USD, lambda: [])
    with pytest.raises(ValueError, match="already registered"):
        metrics.computed(COST_USD, lambda: [])
