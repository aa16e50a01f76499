"""`disagg bench` output: the rich tables on stdout and the --json file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from services.loadgen import BenchSettings, BenchSummary, RequestRecord


def render(settings: BenchSettings, summary: BenchSummary) -> list[str | Table]:
    """A header line, the latency table and the totals table."""
    api = "chat/completions" if settings.chat else "completions"
    header = (
        f"[bold]{escape(settings.model)}[/] at {settings.url}/v1/{api}: {settings.requests} requests, "
        f"concurrency {settings.concurrency}, ~{settings.prompt_tokens} prompt + {settings.max_tokens} "
        f"output tokens, ignore_eos {'on' if settings.ignore_eos else 'off'}"
    )
    latency = Table()
    for column in ("latency", "mean", "p50", "p90", "p99"):
        latency.add_column(column, justify="left" if column == "latency" else "right")
    for name, dist in (
        ("TTFT (ms)", summary.ttft_s),
        ("ITL (ms)", summary.itl_s),
        ("e2e (ms)", summary.e2e_s),
    ):
        values = (dist.mean, dist.p50, dist.p90, dist.p99) if dist else ()
        latency.add_row(name, *[f"{1000 * v:.1f}" for v in values] or ["-"] * 4)
    totals = Table(show_header=False)
    totals.add_column("metric")
    totals.add_column("value", justify="right")

    def opt(value: float | None, spec: str, missing: str = "not reported") -> str:
        return missing if value is None else format(value, spec)

    rows = [
        ("requests ok / errors", f"{summary.succeeded} / {summary.errors}"),
        ("wall time (s)", f"{summary.wall_s:.2f}"),
        ("output tokens", str(summary.output_tokens)),
        ("output tokens/s", f"{summary.output_tokens_per_s:.1f}"),
        ("requests/s", f"{summary.requests_per_s:.2f}"),
        ("prompt tokens (mean, measured)", opt(summary.prompt_tokens_mean, ".1f")),
        ("tokens per text chunk", opt(summary.tokens_per_chunk, ".2f", "-")),
        ("$ / M tokens (prompt + output)", opt(summary.usd_per_mtok, ".4f")),
        ("$ / M output tokens", opt(summary.usd_per_output_mtok, ".4f")),
    ]
    for metric, value in rows:
        totals.add_row(metric, value)
    for message in summary.error_messages:  # Text: no markup in server messages ("[Errno 111]")
        totals.add_row("error", Text(message, justify="left"))
    return [header, latency, totals]


def write_json(
    path: Path, settings: BenchSettings, summary: BenchSummary, records: Sequence[RequestRecord]
) -> None:
    derived = [{"ttft_s": r.ttft_s, "itl_s": r.itl_s, "e2e_s": r.e2e_s} for r in records]
    body = {
        "settings": asdict(settings),
        "summary": asdict(summary),
        "requests": [asdict(r) | extra for r, extra in zip(records, derived, strict=True)],
    }
    path.write_text(json.dumps(body, indent=1) + "\n")
