"""A real Prometheus against a real `disagg up --prometheus` cluster under load (1 prefill, 1 decode,
2 attention pods, every role priced): every panel query of every shipped dashboard returns data,
and the cost invariants hold within 2%:

    per pod:    Σ_kind disagg_cost_usd_total = price × uptime
    cluster:    Σ gateway disagg_request_cost_usd_total = Σ pods' disagg_cost_usd_total{kind="request"}
                = Σ responses' usage.cost_usd, and each usage.cost_usd > 0

The cluster is the real command (`python -m services.cli up --prometheus`), scraped every second.
Needs Debian's `prometheus` (`make setup` installs it as root); skipped, saying so, without it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.local_prometheus import INSTALL_HINT, query

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "helm" / "disagg" / "dashboards"
MODEL = "smollm2-135m"
PRICES = {"gateway": 0.4, "prefill": 3.0, "decode": 4.0, "attention": 1.2}  # USD per hour
RATE_INTERVAL = "2m"  # what $__rate_interval becomes: Grafana's is >= 4 scrapes; 2m covers the load
REQUESTS = 12


@dataclass(slots=True)
class Cluster:
    process: subprocess.Popen[bytes]
    url: str  # the gateway
    prometheus_url: str  # the launcher's Prometheus
    usages: list[dict[str, Any]]  # of the load's responses

    def query(self, expr: str) -> list[dict[str, Any]]:
        return query(self.prometheus_url, expr)

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])


def wait_for_lines(out: Path, err: Path, process: subprocess.Popen[bytes], timeout: float) -> list[str]:
    """The `ready:` and `prometheus:` lines the launcher prints once everything is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines()
        if len(lines) >= 2:
            return lines[:2]
        if process.poll() is not None:
            raise AssertionError(f"disagg up exited with {process.returncode}:\n{err.read_text()[-5000:]}")
        time.sleep(0.2)
    raise AssertionError(f"disagg up printed no ready lines in {timeout} s:\n{err.read_text()[-5000:]}")


def load(url: str) -> list[dict[str, Any]]:
    """A burst of requests through both endpoints, streaming (with include_usage) and not; their usage."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    def one(i: int) -> dict[str, Any]:
        common: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "temperature": 0}
        if i % 3 == 0:
            stream = client.completions.create(
                prompt=f"Count from {i}:", stream=True, stream_options={"include_usage": True}, **common
            )
            usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
        elif i % 3 == 1:
            usage = client.completions.create(prompt=f"The number {i} is", **common).usage
        else:
            messages: Any = [{"role": "user", "content": f"Name {i} colours."}]
            usage = client.chat.completions.create(messages=messages, **common).usage
        assert usage is not None
        return usage.model_dump()

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(REQUESTS)))


def wait_scraped(cluster: Cluster, timeout: float = 30) -> None:
    """Until Prometheus holds the gateway's counts of every request, and two more scrapes after that."""
    total = sum(u["cost_usd"] for u in cluster.usages)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = cluster.query("sum(disagg_requests_total)")
        if ended and float(ended[0]["value"][1]) >= REQUESTS:
            seen = cluster.value("sum(disagg_request_cost_usd_total)")
            assert seen == pytest.approx(total, rel=1e-6), "the gateway counted other costs than it reported"
            time.sleep(2.5)  # two more scrapes (1 s apart) and rule evaluations
            return
        time.sleep(0.5)
    raise AssertionError("Prometheus did not see every request in time")


@pytest.fixture(scope="module")
def cluster(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("prometheus") is None:
        pytest.skip(f"no prometheus binary: {INSTALL_HINT}")
    logs = tmp_path_factory.mktemp("prometheus-cluster")
    out, err = logs / "up.out", logs / "up.err"
    argv = [sys.executable, "-m", "services.cli", "up", "--port", "0", "--model", MODEL, "--prometheus"]
    argv += ["--scrape-interval", "1", "--kv-budget-gb", "0.5", "--max-num-seqs", "16"]
    argv += ["--remote-prefill-min-tokens", "2"]  # every prompt through the prefill pod: its metrics move
    for role, price in PRICES.items():
        argv += ["--cost-usd-per-hour", f"{role}={price}"]
    env = {**os.environ, "DISAGG_CACHE_DIR": str(model_folder.parent)}
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=stdout, stderr=stderr, env=env)
    try:
        ready, prometheus_line = wait_for_lines(out, err, process, timeout=240)
        assert ready.startswith("ready: http://") and prometheus_line.startswith("prometheus: http://")
        url = ready.removeprefix("ready: ")
        cluster = Cluster(process, url, prometheus_line.removeprefix("prometheus: "), load(url))
        wait_scraped(cluster)
        yield cluster
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(20) == 0, err.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every target of every shipped dashboard, template variables
    substituted as Grafana would for "All"."""
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                expr = expr.replace("$model", ".*").replace("$tenant", ".*")
                queries.append((path.stem, panel["title"], expr))
    return queries


def test_every_panel_query_returns_data(cluster: Cluster) -> None:
    queries = panel_queries()
    assert len({board for board, _, _ in queries}) >= 4 and len(queries) >= 30
    answers = {expr: cluster.query(expr) for _, _, expr in queries}
    empty = [f"{board} / {title}: {expr}" for board, title, expr in queries if not answers[expr]]
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    nan = [expr for expr, result in answers.items() for r in result if math.isnan(float(r["value"][1]))]
    assert not nan, f"queries answering NaN: {nan}"


def test_every_response_carries_its_cost(cluster: Cluster) -> None:
    for usage in cluster.usages:
        breakdown = usage["cost_breakdown"]
        assert usage["cost_usd"] > 0 and set(breakdown) == {"prefill", "decode", "attention", "gateway"}
        assert sum(breakdown.values()) == pytest.approx(usage["cost_usd"], rel=1e-9)
        assert all(breakdown[role] > 0 for role in breakdown), breakdown  # every role worked on it


def by_instance(cluster: Cluster, expr: str) -> dict[str, tuple[dict[str, str], float]]:
    return {r["metric"]["instance"]: (r["metric"], float(r["value"][1])) for r in cluster.query(expr)}


def test_each_pod_accrues_price_times_uptime(cluster: Cluster) -> None:
    totals = by_instance(cluster, "sum by (instance, role) (disagg_cost_usd_total)")
    prices = by_instance(cluster, "disagg_pod_cost_usd_per_hour")
    scraped_at = by_instance(cluster, "max by (instance) (timestamp(disagg_cost_usd_total))")
    started_at = by_instance(cluster, "process_start_time_seconds")
    assert len(totals) == 5 and set(totals) == set(prices) == set(scraped_at) == set(started_at)
    for instance, (labels, usd) in totals.items():
        price = prices[instance][1]
        assert price == pytest.approx(PRICES[labels["role"]])
        uptime = scraped_at[instance][1] - started_at[instance][1]  # at the scrape that read `usd`
        # Within 1.5 s of uptime: the pod accounts on its monotonic clock, Prometheus stamps a scrape
        # when it starts, in wall-clock time; on a loaded 2-core VM the two were seen 0.8 s apart.
        assert usd == pytest.approx(price / 3600 * uptime, abs=price / 3600 * 1.5), (labels["role"], instance)


def test_request_costs_at_the_gateway_equal_the_pods_request_costs(cluster: Cluster) -> None:
    gateway = cluster.value("sum(disagg_request_cost_usd_total)")
    pods = cluster.value('sum(disagg_cost_usd_total{kind="request"})')
    responses = sum(u["cost_usd"] for u in cluster.usages)
    assert gateway == pytest.approx(pods, rel=0.02)
    assert gateway == pytest.approx(responses, rel=0.02)
    by_role = cluster.query('sum by (role) (disagg_cost_usd_total{kind="request"})')
    by_component = {
        r["metric"]["component"]: float(r["value"][1])
        for r in cluster.query("sum by (component) (disagg_request_cost_usd_total)")
    }
    assert len(by_role) == 4
    for sample in by_role:  # per role too: every pod's request cost reached a response
        role, usd = sample["metric"]["role"], float(sample["value"][1])
        assert by_component[role] == pytest.approx(usd, rel=0.02), role


def test_the_launcher_scrapes_every_pod(cluster: Cluster) -> None:
    up = cluster.query("up")
    assert len(up) == 5 and all(r["value"][1] == "1" for r in up)
    health = httpx.get(f"{cluster.url}/health", timeout=10).json()
    assert health["status"] == "ok"


def test_both_ends_count_the_same_transferred_bytes(cluster: Cluster) -> None:
    def total(role: str, direction: str, payload: str) -> float:
        labels = f'role="{role}", direction="{direction}", payload="{payload}"'
        return cluster.value(f"sum(disagg_transfer_bytes_total{{{labels}}})")

    assert total("decode", "sent", "activations") == total("attention", "received", "activations") > 0
    assert total("attention", "sent", "activations") == total("decode", "received", "activations") > 0
    assert total("prefill", "sent", "kv") == total("attention", "received", "kv") > 0
    read = cluster.value("sum(disagg_attention_bytes_read_total)")
    assert read == cluster.value("sum(disagg_attention_dense_bytes_total)") > 0  # dense: no savings
