"""`disagg bench` (services/loadgen.py) as users run it: a real process against a real
`disagg up --colocated`, against a port nobody listens on, and its SSE parsing and statistics on
synthetic input (no server).

The command runs as `python -m services.loadgen`, the module's own entry point: the same parser,
`run_bench` and error line as `disagg bench`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.loadgen import (
    BenchSettings,
    BenchSummary,
    Distribution,
    RequestRecord,
    StreamState,
    percentile,
    run_request,
)

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.loadgen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def server_url(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`disagg up --colocated --port 0 --cost-usd-per-hour 2`; its URL once it prints `ready: URL`."""
    logs = tmp_path_factory.mktemp("bench-server")
    out, err = logs / "up.out", logs / "up.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            # Priced, so responses carry usage.cost_usd > 0 and the bench reports $ per million tokens.
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--colocated",
                "--port",
                "0",
                "--cost-usd-per-hour",
                "2",
            ],
            cwd=ROOT,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "DISAGG_CACHE_DIR": str(model_folder.parent)},
        )
    try:
        deadline = time.monotonic() + 120
        while not (lines := out.read_text().splitlines()) or not lines[0].startswith("ready: "):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`disagg up --colocated` did not start:\n{err.read_text()[-3000:]}")
            time.sleep(0.1)
        yield lines[0].removeprefix("ready: ")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def max_in_flight(records: list[dict[str, float]]) -> int:
    """The most requests in flight at once, from their send and end times."""
    return max(sum(r["sent_s"] <= s["sent_s"] < r["ended_s"] for r in records) for s in records)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_against_a_colocated_server(server_url: str, tmp_path: Path) -> None:
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = bench(
        *("--url", server_url, "--requests", "6", "--concurrency", "3", "--max-tokens", "8"),
        *("--prompt-tokens", "32", "--json", str(report), "--plot", str(plot)),
    )
    assert result.returncode == 0, result.stderr
    assert "TTFT (ms)" in result.stdout and "output tokens/s" in result.stdout
    body = json.loads(report.read_text())
    summary, records = body["summary"], body["requests"]
    assert body["settings"]["model"] == "smollm2-135m"  # the first id of GET /v1/models
    assert (summary["requests"], summary["succeeded"], summary["errors"]) == (6, 6, 0)
    assert summary["output_tokens"] == 6 * 8  # ignore_eos: every request runs to max_tokens
    assert [r["output_tokens"] for r in records] == [8] * 6
    assert 24 <= summary["prompt_tokens_mean"] <= 40  # ~32 asked, measured by the server
    assert summary["tokens_per_chunk"] >= 1.0  # our gateway sends one chunk per token that has text
    for name in ("ttft_s", "itl_s", "e2e_s"):
        dist = summary[name]
        assert 0 < dist["p50"] <= dist["p90"] <= dist["p99"], name
    assert summary["ttft_s"]["p99"] <= summary["e2e_s"]["p99"]
    assert max_in_flight(records) == 3  # closed loop: three at once, never more
    assert summary["output_tokens_per_s"] > 0
    # A 2 $/h process: every request carries its share, so the bench prices the tokens.
    assert all(r["cost_usd"] > 0 for r in records) and summary["usd_per_mtok"] > 0
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_400_is_counted_with_its_message(server_url: str, tmp_path: Path) -> None:
    context = httpx.get(f"{server_url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]
    report = tmp_path / "bench.json"
    result = bench(
        *("--url", server_url, "--requests", "3", "--concurrency", "2", "--max-tokens", "4"),
        *("--prompt-tokens", str(2 * context), "--json", str(report)),
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "all 3 requests failed, e.g. HTTP 400: This model's maximum context length" in result.stderr
    body = json.loads(report.read_text())
    assert (body["summary"]["succeeded"], body["summary"]["errors"]) == (0, 3)
    assert all(r["error"].startswith("HTTP 400: This model's maximum context") for r in body["requests"])
    assert "│ error" in result.stdout and "HTTP 400: This model" in result.stdout  # listed in the table


def test_an_unreachable_url_says_what_to_check() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    for extra in ([], ["--model", "smollm2-135m"]):  # fails on GET /v1/models / on every request
        result = bench("--url", url, "--requests", "2", *extra, timeout=60)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"disagg: error: could not reach {url}: "), result.stderr
        assert "is the server running? start one with `make run`" in last
        assert "Traceback" not in result.stderr


# ---- no server: SSE parsing, statistics ---------------------------------------------------------


def feed(state: StreamState, lines: list[str]) -> StreamState:
    for now, line in enumerate(lines):
        state.feed(line, float(now))
    return state


def test_sse_parsing_and_percentiles_on_synthetic_input() -> None:
    completion = feed(
        StreamState(chat=False),
        [
            ": a comment",
            'data: {"choices": [{"text": "Hel"}]}',
            "",
            'data: {"choices": [{"text": "lo, world"}]}',  # several tokens in one chunk
            'data: {"choices": [{"text": "", "finish_reason": "length"}]}',  # no text: not timed
            'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "cost_usd": 2e-6}}',
            "data: [DONE]",
        ],
    )
    record = completion.record(index=0, sent_s=0.0, ended_s=7.0)
    assert completion.done and record.error is None
    assert record.chunk_s == (1.0, 3.0) and record.ttft_s == 1.0 and record.itl_s == [2.0]
    assert (record.output_tokens, record.prompt_tokens, record.cost_usd) == (4, 5, 2e-6)

    chat = feed(
        StreamState(chat=True),
        [
            'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}',  # no text yet
            'data: {"choices": [{"delta": {"content": "Hi"}}]}',
            "data:[DONE]",
        ],
    )
    assert chat.record(0, 0.0, 3.0).chunk_s == (1.0,)
    assert chat.record(0, 0.0, 3.0).output_tokens == 1  # no usage: one token per text chunk

    failed = feed(StreamState(chat=False), ['data: {"error": {"message": "pod lost", "type": "x"}}'])
    assert failed.record(0, 0.0, 1.0).error == "stream error: pod lost"
    assert feed(StreamState(chat=False), ["data: {not json"]).error is not None

    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # linear between the two nearest ranks
    assert percentile([float(v) for v in range(1, 11)], 90) == pytest.approx(9.1)
    assert percentile([7.0], 99) == 7.0
    assert Distribution.of([]) is None
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_costs_and_errors_on_synthetic_records() -> None:
    def record(index: int, cost: float | None, error: str | None = None) -> RequestRecord:
        return RequestRecord(index, 0.0, 2.0, (0.5, 1.0, 1.5), 3, 7, cost, error)

    summary = BenchSummary.of(
        [record(0, 1e-5), record(1, 3e-5), record(2, None), record(3, None, "HTTP 503: busy")], wall_s=2.0
    )
    assert (summary.requests, summary.succeeded, summary.errors) == (4, 3, 1)
    assert summary.error_messages == ("HTTP 503: busy",)
    assert summary.output_tokens == 9 and summary.output_tokens_per_s == 4.5
    assert summary.usd_per_mtok == pytest.approx(4e-5 / 20 * 1e6)  # two costed requests, 10 tokens each
    assert summary.usd_per_output_mtok == pytest.approx(4e-5 / 6 * 1e6)
    assert summary.ttft_s == Distribution(0.5, 0.5, 0.5, 0.5)


def test_http_errors_and_cut_streams_become_records_not_exceptions() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        if prompt == "bad":
            return httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1"}})
        if prompt == "cut":
            return httpx.Response(200, content=b'data: {"choices": [{"text": "a"}]}\n\n')
        return httpx.Response(503, text="upstream gone")

    settings = BenchSettings("http://test", "m", 1, 3, 8, 4, False, True, 0, 10.0)

    async def run(prompt: str) -> str | None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return (await run_request(client, settings, 0, prompt, time.perf_counter())).error

    assert asyncio.run(run("bad")) == "HTTP 400: max_tokens must be at least 1"
    assert asyncio.run(run("cut")) == "the stream ended without `data: [DONE]`"
    assert asyncio.run(run("other")) == "HTTP 503: upstream gone"
