"""The Grafana dashboards, built with grafana-foundation-sdk (a dev dependency) into committed JSON.

    python -m services.dashboards --write     # regenerate deploy/helm/disagg/dashboards/*.json
    python -m services.dashboards --check     # exit 1 when the committed JSON is stale

Four dashboards, each with template variables `datasource`, `model` and `tenant` (multi-value,
"All" = `.*`), rates over `$__rate_interval`:

    overview    traffic, errors, TTFT / inter-token / end-to-end percentiles, tokens, load, engine
    cost        $/hour by role (priced and spent), $ per million tokens by role and by tenant,
                cost by tenant and by component, idle share
    attention   KV use per pod, bytes read and savings by attention policy, layer compute time
    transport   bytes/s by transport and direction, per-layer round trips, K/V export latency

Panels query the metrics of docs/metrics.md and the recording rules in
deploy/helm/disagg/rules/. tests/integration/test_prometheus.py evaluates every panel query against
a real Prometheus scraping a real cluster under load and requires data from each;
tests/unit/test_dashboards.py checks the committed JSON equals what this module builds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

FOLDER = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "disagg" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
M = 'model=~"$model"'  # every panel's model filter
MT = 'model=~"$model", tenant=~"$tenant"'  # gateway metrics carry the tenant too
RATE = "[$__rate_interval]"


@dataclass(slots=True, frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(slots=True, frozen=True)
class Chart:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""


def percentiles(metric: str, labels: str, by: str = "") -> tuple[Query, ...]:
    """p50, p90 and p99 of a histogram over the rate interval."""
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{labels}}}{RATE})))",
            f"{legend}p{round(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    )


def rate(metric: str, labels: str, by: str, scale: str = "") -> str:
    return f"{scale}sum by ({by}) (rate({metric}{{{labels}}}{RATE}))"


OVERVIEW = (
    Chart("Requests by status", "reqps", (Query(rate("disagg_requests_total", MT, "status"), "{{status}}"),)),
    Chart(
        "Error ratio",
        "percentunit",
        (
            Query(
                f'sum(rate(disagg_requests_total{{{MT}, status!="ok"}}{RATE})) '
                f"/ sum(rate(disagg_requests_total{{{MT}}}{RATE}))",
                "errors",
            ),
        ),
        "Requests that did not end ok, of all requests that ended.",
    ),
    Chart("Time to first token", "s", percentiles("disagg_time_to_first_token_seconds", MT)),
    Chart("Inter-token latency", "s", percentiles("disagg_inter_token_latency_seconds", MT)),
    Chart("End-to-end latency", "s", percentiles("disagg_request_duration_seconds", MT)),
    Chart(
        "Tokens",
        "short",
        (
            Query(f"sum(rate(disagg_prompt_tokens_total{{{MT}}}{RATE}))", "prompt tokens/s"),
            Query(f"sum(rate(disagg_generation_tokens_total{{{MT}}}{RATE}))", "generated tokens/s"),
        ),
    ),
    Chart(
        "Running and waiting requests",
        "short",
        (
            Query(f"sum by (role) (disagg_requests_running{{{M}}})", "{{role}} running"),
            Query(f"sum by (role) (disagg_requests_waiting{{{M}}})", "{{role}} waiting"),
        ),
    ),
    Chart("Decode step phases (p90)", "s", percentiles("disagg_decode_step_seconds", M, by="phase")[1:2]),
    Chart(
        "Decode batch size (mean)",
        "short",
        (
            Query(
                f"sum(rate(disagg_decode_batch_size_sum{{{M}}}{RATE})) "
                f"/ sum(rate(disagg_decode_batch_size_count{{{M}}}{RATE}))",
                "sequences per step",
            ),
        ),
    ),
    Chart(
        "Prefill",
        "s",
        (
            *percentiles("disagg_prefill_seconds", M)[:2],
            Query(percentiles("disagg_prefill_queue_seconds", M)[1].expr, "queue p90"),
        ),
        "One prefill forward until every attention pod acknowledged its K/V, and the queueing before it.",
    ),
)
COST = (
    Chart(
        "Price by role",
        "currencyUSD",
        (Query(f"sum by (role) (disagg_pod_cost_usd_per_hour{{{M}}})", "{{role}}"),),
        "USD per hour of the pods, as configured (--cost-usd-per-hour).",
    ),
    Chart(
        "Spent by role",
        "currencyUSD",
        (Query(rate("disagg_cost_usd_total", M, "role, kind", "3600 * "), "{{role}} {{kind}}"),),
        "USD per hour accrued, attributed to requests (request) or not (idle).",
    ),
    Chart(
        "$ per million tokens by role",
        "currencyUSD",
        (
            Query(f"disagg:cost_usd_per_million_tokens:rate1m{{{M}}}", "{{role}}"),
            Query(f"sum by (model) (disagg:cost_usd_per_million_tokens:rate1m{{{M}}})", "all roles"),
        ),
        "What the pods cost (idle included) per million prompt + generated tokens served.",
    ),
    Chart(
        "$ per million tokens by tenant",
        "currencyUSD",
        (Query(f"disagg:request_cost_usd_per_million_tokens:rate1m{{{MT}}}", "{{tenant}}"),),
        "Cost attributed to each tenant's requests per million of its tokens (idle excluded).",
    ),
    Chart(
        "Cost by tenant",
        "currencyUSD",
        (Query(rate("disagg_request_cost_usd_total", MT, "tenant", "3600 * "), "{{tenant}}"),),
        "USD per hour attributed to each tenant's requests.",
    ),
    Chart(
        "Cost by component",
        "currencyUSD",
        (Query(rate("disagg_request_cost_usd_total", MT, "component", "3600 * "), "{{component}}"),),
        "USD per hour of the selected tenants' requests, by the role that spent it.",
    ),
    Chart(
        "Idle share by role",
        "percentunit",
        (Query(f"disagg:cost_idle_ratio:rate1m{{{M}}}", "{{role}}"),),
        "Of what each role's pods cost, the share no request used.",
    ),
)
ATTENTION = (
    Chart(
        "KV pool use",
        "percentunit",
        (
            Query(
                f"sum by (pod) (disagg_kv_blocks_used{{{M}}}) "
                f"/ sum by (pod) (disagg_kv_blocks_capacity{{{M}}})",
                "{{pod}}",
            ),
        ),
    ),
    Chart(
        "KV blocks",
        "short",
        (
            Query(f"sum(disagg_kv_blocks_used{{{M}}})", "used"),
            Query(f"sum(disagg_kv_blocks_capacity{{{M}}})", "total"),
        ),
    ),
    Chart("Open sequences", "short", (Query(f"sum by (pod) (disagg_kv_sequences{{{M}}})", "{{pod}}"),)),
    Chart(
        "Bytes read by policy",
        "Bps",
        (Query(rate("disagg_attention_bytes_read_total", M, "policy"), "{{policy}}"),),
        "K/V bytes attention steps read from the pools.",
    ),
    Chart(
        "Savings by policy",
        "percentunit",
        (
            Query(
                f"1 - {rate('disagg_attention_bytes_read_total', M, 'policy')} "
                f"/ {rate('disagg_attention_dense_bytes_total', M, 'policy')}",
                "{{policy}}",
            ),
        ),
        "Bytes a policy did not read, of what dense attention would have read (dense: 0).",
    ),
    Chart("Layer frame compute (p90)", "s", percentiles("disagg_attention_layer_seconds", M, by="pod")[1:2]),
)
TRANSPORT = (
    Chart(
        "Bytes by transport",
        "Bps",
        (
            Query(
                rate("disagg_transfer_bytes_total", M, "role, transport, direction, payload"),
                "{{role}} {{payload}} {{direction}} ({{transport}})",
            ),
        ),
    ),
    Chart(
        "Layer round trip (decode to attention pods)",
        "s",
        percentiles("disagg_transfer_seconds", f'{M}, payload="activations"'),
        "A layer's frames sent until every attention pod's answer arrived.",
    ),
    Chart(
        "K/V export (prefill to attention pods)",
        "s",
        percentiles("disagg_transfer_seconds", f'{M}, payload="kv"', by="transport")[:2],
        "A prompt's forward start until every attention pod acknowledged its K/V.",
    ),
    Chart(
        "Attention wait share of decode steps",
        "percentunit",
        (
            Query(
                f'sum(rate(disagg_decode_step_seconds_sum{{{M}, phase="attention_wait"}}{RATE})) '
                f"/ sum(rate(disagg_decode_step_seconds_sum{{{M}}}{RATE}))",
                "attention wait",
            ),
        ),
    ),
)
DASHBOARDS = {
    "overview": ("disagg — overview", OVERVIEW),
    "cost": ("disagg — cost", COST),
    "attention": ("disagg — attention pool", ATTENTION),
    "transport": ("disagg — transport", TRANSPORT),
}


LEGEND = (
    common.VizLegendOptions()
    .display_mode(LegendDisplayMode.LIST)
    .placement(LegendPlacement.BOTTOM)
    .show_legend(True)
)
TOOLTIP = common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)


def variable(name: str, query: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(name)
        .query(query)
        .datasource(DATASOURCE)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )


def build(key: str) -> dashboard.Dashboard:
    title, charts = DASHBOARDS[key]
    board = (
        dashboard.Dashboard(title)
        .uid(f"disagg-{key}")
        .tags(["disagg"])
        .refresh("10s")
        .time("now-1h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").type("prometheus"))
        .with_variable(variable("model", "label_values(disagg_pod_cost_usd_per_hour, model)"))
        .with_variable(variable("tenant", 'label_values(disagg_requests_total{model=~"$model"}, tenant)'))
    )
    for number, chart in enumerate(charts, start=1):
        panel = (
            timeseries.Panel()
            .id(number)
            .title(chart.title)
            .unit(chart.unit)
            .datasource(DATASOURCE)
            .legend(LEGEND)
            .tooltip(TOOLTIP)
        )
        if chart.description:
            panel = panel.description(chart.description)
        for ref, query in zip("ABCDEFGH", chart.queries, strict=False):
            panel = panel.with_target(
                prometheus.Dataquery().ref_id(ref).expr(query.expr).legend_format(query.legend or "__auto")
            )
        board = board.with_panel(panel)
    return board


def render(key: str) -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build(key).build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.dashboards", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help=f"write {FOLDER}/*.json")
    group.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = [
        key
        for key in DASHBOARDS
        if not (FOLDER / f"{key}.json").is_file() or (FOLDER / f"{key}.json").read_text() != render(key)
    ]
    if args.check:
        for key in stale:
            print(f"stale: {FOLDER / key}.json (run python -m services.dashboards --write)", file=sys.stderr)
        return 1 if stale else 0
    FOLDER.mkdir(parents=True, exist_ok=True)
    for key in DASHBOARDS:
        (FOLDER / f"{key}.json").write_text(render(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
