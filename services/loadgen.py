"""`disagg bench`: a closed-loop load generator for any OpenAI-compatible endpoint.

A run: resolve the model (GET /v1/models unless --model) -> build N distinct prompts from --seed ->
C workers each take the next request, stream it (POST, SSE parsed line by line, each chunk that
carries text time-stamped) and take another when it ends, so at most C are in flight -> one
`RequestRecord` per request -> a `BenchSummary` -> a rich table on stdout (+ --json, --plot).

What is measured and how: DESCRIPTION below, which is also `disagg bench --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress

from services.core.errors import DisaggError

# Tokens per vocabulary word: exactly 1.0 with SmolLM2's tokenizer (common words are single BPE tokens);
# other tokenizers may split a few, so the target is approximate. The report shows usage.prompt_tokens.
TOKENS_PER_WORD = 1.0
MAX_ERRORS_SHOWN = 5
DONE: Final = "[DONE]"
_WORDS = """the of and to in is was he for it with as his on be at by had are but from or have an they which
    one you were her all she there would their we him been has when who will more no if out so said what
    up its about into than them can only other new some could time these two may then do first any my now
    such like our over man me even most made after also did many before must through back years where much
    your way well down should because each just those people how too little state good very make world
    still own see men work long get here between both life being under never day same another know while
    last might us great old year off come since against go came right used take three small place house
    water number light river morning garden window letter music table story friend city road corner
    question answer reason paper voice color family winter summer animal bridge market island forest
    mountain history science picture kitchen village teacher doctor station journey evening silver"""
VOCABULARY = tuple(_WORDS.split())  # common English words

DESCRIPTION = """\
Send --requests streaming completions to an OpenAI-compatible server with at most --concurrency in
flight (closed loop: the next request starts when one ends), then report latency and throughput.

Each request: POST /v1/completions (/v1/chat/completions with --chat, one user message), a distinct
prompt of about --prompt-tokens tokens (seeded random common words; the chat template adds more),
temperature 0, max_tokens --max-tokens, stream_options.include_usage, and "ignore_eos": true so that
every request generates exactly max_tokens (--no-ignore-eos for servers that refuse unknown fields;
output lengths then vary with where the model stops).

Measured, times from the moment a request is sent:
  TTFT             the first streamed chunk that carries text
  ITL              gaps between consecutive chunks that carry text, pooled over requests; a chunk may
                   carry several tokens ("tokens per text chunk" above 1: ITL is then per chunk)
  e2e              the end of the stream
  output tokens    usage.completion_tokens when the server reports it, else one per text chunk
  prompt tokens    the mean of usage.prompt_tokens (the --prompt-tokens target is approximate)
  output tokens/s  all output tokens / wall time; requests/s: successful requests / wall time
  errors           HTTP status and the server's message, or the transport error: counted, never fatal
  $ / M tokens     sum of usage.cost_usd / (prompt + output tokens) x 1e6, and per output token,
                   when the server reports usage.cost_usd
Percentiles p50/p90/p99 interpolate linearly between the two nearest ranks (numpy's default).
Latencies and tokens count successful requests only.

Exit status 0 when a request succeeded; 2 when the server cannot be reached or every request failed,
with an error line that says what to check.
"""


class BenchError(DisaggError):
    """The run cannot start, or no request succeeded; the message says what to check."""


@dataclass(slots=True, frozen=True)
class BenchSettings:
    """What was asked for; written to the JSON as it is (the API key is not part of it)."""

    url: str  # base URL, without /v1
    model: str
    concurrency: int  # requests in flight at most (closed loop)
    requests: int
    prompt_tokens: int  # the target; approximate (see TOKENS_PER_WORD)
    max_tokens: int
    chat: bool  # /v1/chat/completions instead of /v1/completions
    ignore_eos: bool  # False: output lengths vary with where the model stops
    seed: int  # of the prompt words
    timeout_s: float  # per request

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1/chat/completions" if self.chat else f"{self.url}/v1/completions"


@dataclass(slots=True, frozen=True)
class RequestRecord:
    """One request; times in seconds since the run started."""

    index: int
    sent_s: float
    ended_s: float
    chunk_s: tuple[float, ...]  # arrival of each chunk that carried text
    output_tokens: int  # usage.completion_tokens when reported, else len(chunk_s)
    prompt_tokens: int | None  # usage.prompt_tokens when reported
    cost_usd: float | None  # usage.cost_usd when reported
    error: str | None  # "HTTP 400: <message>", "stream error: ...", "ConnectError: ..."; None: success

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] - self.sent_s if self.chunk_s else None

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_s)]

    @property
    def e2e_s(self) -> float:
        return self.ended_s - self.sent_s


def parse_sse_line(line: str) -> dict[str, Any] | Literal["[DONE]"] | None:
    """The payload of one SSE line: a JSON object, DONE, or None for lines without data
    (blank separators, `: comments`, `event:` / `id:` fields). Raises ValueError on malformed JSON."""
    if not line.startswith("data:"):
        return None
    data = line.removeprefix("data:").strip()
    if data == DONE:
        return DONE
    payload = json.loads(data)
    if not isinstance(payload, dict):
        raise ValueError(f"SSE data is not a JSON object: {data[:200]}")
    return payload


def chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    """The text a completion (`choices[0].text`) or chat (`choices[0].delta.content`) chunk carries."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return text or ""


def error_message(body: Any) -> str:
    """The message of an OpenAI error body `{"error": {"message": ...}}` (or a close variant)."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(error)
    return str(body)


def _body_message(raw: bytes) -> str:
    try:
        return error_message(json.loads(raw))
    except ValueError:
        return raw.decode(errors="replace").strip()[:300] or "(empty body)"


@dataclass(slots=True)
class StreamState:
    """What one SSE response has carried so far, fed one line at a time."""

    chat: bool
    chunk_s: list[float] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    done: bool = False

    def feed(self, line: str, now: float) -> None:
        try:
            payload = parse_sse_line(line)
        except ValueError as exc:
            self.error = f"malformed stream: {exc}"
            return
        if payload == DONE:
            self.done = True
        elif isinstance(payload, dict):
            if "error" in payload:  # the server failed after the headers were sent
                self.error = f"stream error: {error_message(payload)}"
                return
            self.usage = payload.get("usage") or self.usage
            if chunk_text(payload, self.chat):
                self.chunk_s.append(now)

    def record(self, index: int, sent_s: float, ended_s: float) -> RequestRecord:
        completion = self.usage.get("completion_tokens")
        prompt, cost = self.usage.get("prompt_tokens"), self.usage.get("cost_usd")
        return RequestRecord(
            index=index,
            sent_s=sent_s,
            ended_s=ended_s,
            chunk_s=tuple(self.chunk_s),
            output_tokens=int(completion) if completion is not None else len(self.chunk_s),
            prompt_tokens=int(prompt) if prompt is not None else None,
            cost_usd=float(cost) if cost is not None else None,
            error=self.error,
        )


def build_prompts(count: int, tokens: int, seed: int) -> list[str]:
    """`count` distinct prompts of about `tokens` tokens: the request number, then seeded random words."""
    rng = random.Random(seed)
    words = max(1, round(tokens / TOKENS_PER_WORD) - 1)
    return [f"{index} " + " ".join(rng.choices(VOCABULARY, k=words)) for index in range(count)]


def request_body(settings: BenchSettings, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True
    if settings.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def run_request(
    client: httpx.AsyncClient, settings: BenchSettings, index: int, prompt: str, t0: float
) -> RequestRecord:
    """Stream one request; every failure ends up in the record's `error`, none is raised."""
    state = StreamState(settings.chat)
    sent = time.perf_counter() - t0
    try:
        async with client.stream("POST", settings.endpoint, json=request_body(settings, prompt)) as response:
            if response.status_code != 200:
                state.error = f"HTTP {response.status_code}: {_body_message(await response.aread())}"
            else:
                async for line in response.aiter_lines():
                    state.feed(line, time.perf_counter() - t0)
                    if state.error or state.done:
                        break
    except httpx.HTTPError as exc:
        state.error = f"{type(exc).__name__}: {exc or 'no detail'}"
    if state.error is None and not state.done:
        state.error = "the stream ended without `data: [DONE]`"
    return state.record(index, sent, time.perf_counter() - t0)


async def run_load(
    settings: BenchSettings,
    prompts: Sequence[str],
    headers: dict[str, str],
    on_done: Callable[[RequestRecord], None],
) -> tuple[list[RequestRecord], float]:
    """All requests, at most `concurrency` in flight; (records by index, wall seconds)."""
    pool = settings.concurrency  # one connection per worker, so none waits for a connection
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    timeout = httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 10.0))
    pending = iter(range(settings.requests))  # shared: each worker takes the next index
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            for index in pending:
                records.append(await run_request(client, settings, index, prompts[index], t0))
                on_done(records[-1])

        await asyncio.gather(*(worker() for _ in range(min(settings.concurrency, settings.requests))))
        wall = time.perf_counter() - t0
    return sorted(records, key=lambda r: r.index), wall


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest ranks (numpy's "linear")."""
    if not values:
        raise ValueError("the percentile of no values is undefined")
    return float(np.percentile(np.asarray(values, dtype=float), q, method="linear"))


@dataclass(slots=True, frozen=True)
class Distribution:
    """One latency over the run, in seconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        if not values:
            return None
        return cls(float(np.mean(values)), *(percentile(values, q) for q in (50, 90, 99)))


@dataclass(slots=True, frozen=True)
class BenchSummary:
    """The numbers of a run; latencies, tokens and rates count successful requests only."""

    requests: int  # sent
    succeeded: int
    errors: int
    error_messages: tuple[str, ...]  # the first distinct ones, at most MAX_ERRORS_SHOWN
    wall_s: float  # first request sent -> last one ended
    ttft_s: Distribution | None
    itl_s: Distribution | None
    e2e_s: Distribution | None
    output_tokens: int
    output_tokens_per_s: float  # output_tokens / wall_s
    requests_per_s: float  # succeeded / wall_s
    prompt_tokens_mean: float | None  # measured (usage.prompt_tokens); None when not reported
    tokens_per_chunk: float | None  # above 1: chunks carried several tokens, ITL is per chunk
    usd_per_mtok: float | None  # sum(cost_usd) / (prompt + output tokens) x 1e6, requests with a cost
    usd_per_output_mtok: float | None  # sum(cost_usd) / output tokens x 1e6

    @classmethod
    def of(cls, records: Sequence[RequestRecord], wall_s: float) -> BenchSummary:
        ok = [r for r in records if r.error is None]
        failed = [r.error for r in records if r.error is not None]
        prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        chunks = sum(len(r.chunk_s) for r in ok)
        output = sum(r.output_tokens for r in ok)
        costed = [r for r in ok if r.cost_usd is not None]
        cost = sum(r.cost_usd or 0.0 for r in costed)
        costed_output = sum(r.output_tokens for r in costed)
        costed_all = costed_output + sum(r.prompt_tokens or 0 for r in costed)
        return cls(
            requests=len(records),
            succeeded=len(ok),
            errors=len(failed),
            error_messages=tuple(dict.fromkeys(failed))[:MAX_ERRORS_SHOWN],
            wall_s=wall_s,
            ttft_s=Distribution.of([r.ttft_s for r in ok if r.ttft_s is not None]),
            itl_s=Distribution.of([gap for r in ok for gap in r.itl_s]),
            e2e_s=Distribution.of([r.e2e_s for r in ok]),
            output_tokens=output,
            output_tokens_per_s=output / wall_s if wall_s > 0 else 0.0,
            requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
            prompt_tokens_mean=float(np.mean(prompts)) if prompts else None,
            tokens_per_chunk=output / chunks if chunks else None,
            usd_per_mtok=cost / costed_all * 1e6 if costed and costed_all else None,
            usd_per_output_mtok=cost / costed_output * 1e6 if costed and costed_output else None,
        )


def unreachable(url: str, exc: Exception) -> str:
    return (
        f"could not reach {url}: {exc or type(exc).__name__}; is the server running? start one with "
        "`make run` (or `disagg up`), or check --url"
    )


def resolve_model(url: str, headers: dict[str, str], timeout_s: float) -> str:
    """The first id of GET /v1/models."""
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=min(timeout_s, 30.0))
    except httpx.HTTPError as exc:
        raise BenchError(unreachable(url, exc)) from exc
    if response.status_code != 200:
        message = _body_message(response.content)
        raise BenchError(f"GET {url}/v1/models answered {response.status_code}: {message}; pass --model NAME")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"GET {url}/v1/models lists no model ({exc!r}); pass --model NAME") from exc


def run_bench(args: argparse.Namespace) -> int:
    url = str(args.url).rstrip("/").removesuffix("/v1")
    if not url.startswith(("http://", "https://")):
        raise BenchError(f"--url must start with http:// or https://, got {args.url!r}")
    if args.plot:
        from services.loadgen_plot import require_matplotlib

        require_matplotlib()  # fail before the run, not after it
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    settings = BenchSettings(
        url=url,
        model=args.model or resolve_model(url, headers, args.timeout),
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        chat=args.chat,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    prompts = build_prompts(settings.requests, settings.prompt_tokens, settings.seed)
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("requests", total=settings.requests)
        records, wall = asyncio.run(
            run_load(settings, prompts, headers, on_done=lambda _: progress.advance(task))
        )
    summary = BenchSummary.of(records, wall)
    from services.loadgen_report import render, write_json

    Console().print(*render(settings, summary))
    if args.json:
        write_json(Path(args.json), settings, summary, records)
    if args.plot:
        from services.loadgen_plot import plot_run

        plot_run(records, Path(args.plot), title=f"{settings.model}, concurrency {settings.concurrency}")
    if summary.succeeded == 0:
        first = summary.error_messages[0] if summary.error_messages else "no request was sent"
        if first.startswith(("ConnectError", "ConnectTimeout")):
            raise BenchError(unreachable(url, ConnectionError(first)))
        raise BenchError(f"all {summary.requests} requests failed, e.g. {first}")
    return 0


def _positive_int(text: str) -> int:
    if (value := int(text)) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    if (value := float(text)) <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def add_bench_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "bench",
        help="load-test any OpenAI-compatible endpoint: TTFT, ITL, e2e latency, tokens/s, errors",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000 (a /v1 suffix is ok)"
    )
    p.add_argument(
        "--model", metavar="NAME", help="model name to send (default: the first id of GET /v1/models)"
    )
    p.add_argument(
        "--concurrency",
        metavar="C",
        type=_positive_int,
        default=8,
        help="requests in flight at most (default 8)",
    )
    p.add_argument(
        "--requests", metavar="N", type=_positive_int, default=64, help="requests to send in all (default 64)"
    )
    p.add_argument(
        "--prompt-tokens",
        metavar="P",
        type=_positive_int,
        default=256,
        help="approximate prompt length: seeded random common words, ~1 token each; the report shows "
        "the measured mean from usage.prompt_tokens when the server sends it (default 256)",
    )
    p.add_argument(
        "--max-tokens",
        metavar="T",
        type=_positive_int,
        default=128,
        help="max_tokens per request (default 128)",
    )
    p.add_argument("--chat", action="store_true", help="POST /v1/chat/completions (default: /v1/completions)")
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help='omit "ignore_eos": true (for servers that reject unknown fields); output lengths then vary',
    )
    p.add_argument("--seed", metavar="S", type=int, default=0, help="seed of the prompt words (default 0)")
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=600.0,
        help="seconds per request (default 600)",
    )
    p.add_argument("--api-key", metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    p.add_argument(
        "--json", metavar="FILE", help="write settings, summary and every request's record as JSON"
    )
    p.add_argument("--plot", metavar="FILE.png", help="draw latency histograms/CDFs and tokens/s over time")
    p.set_defaults(func=run_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m services.loadgen ARGS` = `disagg bench ARGS`."""
    parser = argparse.ArgumentParser(prog="disagg")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench(args)
    except DisaggError as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
