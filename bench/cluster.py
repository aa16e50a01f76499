"""Disaggregated cluster vs the colocated engine, through the OpenAI API, in one run.

    .venv/bin/python bench/cluster.py [--batches 8,32] [--prompt-tokens 128] [--new-tokens 64]
                                      [--modes colocated,head,request] [--no-write]

Each mode is started exactly as users start it (`disagg up --colocated`, `disagg up --placement head`
or `--placement request`; 1 prefill, 1 decode, 2 attention pods), warmed up, then sent `batch`
concurrent streaming completions at once (distinct prompts of exactly --prompt-tokens tokens, greedy,
`ignore_eos` so every request generates exactly --new-tokens). Per mode and batch:

    output tok/s    all generated tokens / wall time of the batch (prefill included)
    TTFT p50        time to the first streamed token
    ITL p50         median gap between consecutive tokens of a request

Ratios are against `colocated` in the same run. The table and the command go into bench/RESULTS.md.
All processes share this machine's cores, so the cluster pays for its extra processes here; the
comparison says what the network hops and process split cost, not what separate machines would give.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._results import write_section
from services.core.model.sources import DEFAULT_MODEL, resolve_model
from services.core.model.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "tests" / "data" / "alice_ch1.txt").read_text()


@dataclass(slots=True, frozen=True)
class Result:
    mode: str
    batch: int
    tokens: int
    seconds: float
    ttft: list[float]
    itl: list[float]

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


class Server:
    """`disagg up` in a subprocess; output goes to a log file so no pipe can block it."""

    def __init__(self, mode: str, log_dir: Path) -> None:
        argv = [sys.executable, "-m", "services.cli", "up", "--port", "0"]
        argv += ["--colocated"] if mode == "colocated" else ["--placement", mode, "--attention", "2"]
        self.log = log_dir / f"{mode}.log"
        self.out = log_dir / f"{mode}.out"
        with self.log.open("w") as err, self.out.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err)
        deadline = time.monotonic() + 300
        while not (lines := self.out.read_text().splitlines()) or not lines[0].startswith("ready: "):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{mode} did not start; see {self.log}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.url = lines[0].removeprefix("ready: ")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int) -> tuple:
    body = {
        "model": DEFAULT_MODEL,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"request failed: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise SystemExit(f"request failed: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                stamps.append(time.perf_counter())
    return tokens, stamps[0] - started, [b - a for a, b in itertools.pairwise(stamps)]


async def run_batch(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[int, float, list, list]:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, new_tokens) for p in prompts))
        seconds = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    return tokens, seconds, [r[1] for r in results], [gap for r in results for gap in r[2]]


def make_prompts(count: int, length: int) -> list[list[int]]:
    folder = resolve_model(DEFAULT_MODEL, show_progress=True)
    ids = Tokenizer.from_folder(folder).encode(TEXT * 4, add_special_tokens=False)
    stride = max(1, (len(ids) - length) // max(count, 1))
    return [ids[i * stride : i * stride + length] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="8,32", help="concurrent requests per batch (default 8,32)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", default="colocated,head,request", help="colocated first: the baseline")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    prompts = make_prompts(max(batches), args.prompt_tokens)
    results: list[Result] = []
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="disagg-bench-") as logs, Progress(console=console) as progress:
        task = progress.add_task("modes × batches", total=len(modes) * len(batches))
        for mode in modes:
            progress.update(task, description=f"starting {mode}")
            server = Server(mode, Path(logs))
            try:
                asyncio.run(run_batch(server.url, prompts[:2], 8))  # warm-up
                for batch in batches:
                    progress.update(task, description=f"{mode}, batch {batch}")
                    tokens, seconds, ttft, itl = asyncio.run(
                        run_batch(server.url, prompts[:batch], args.new_tokens)
                    )
                    results.append(Result(mode, batch, tokens, seconds, ttft, itl))
                    progress.advance(task)
            finally:
                server.stop()
    base = {r.batch: r for r in results if r.mode == modes[0]}
    table = Table(title=f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each")
    for column in ("mode", "batch", "output tok/s", f"vs {modes[0]}", "TTFT p50 (s)", "ITL p50 (ms)"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    lines = [
        f"| mode | batch | output tok/s | vs {modes[0]} | TTFT p50 (s) | ITL p50 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        row = (
            r.mode,
            str(r.batch),
            f"{r.tps:.1f}",
            f"{r.tps / base[r.batch].tps:.2f}×",
            f"{statistics.median(r.ttft):.2f}",
            f"{1000 * statistics.median(r.itl):.1f}",
        )
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    Console().print(table)
    if not args.no_write:
        command = "python bench/cluster.py " + " ".join(sys.argv[1:])
        body = (
            "## Disaggregated cluster vs colocated (bench/cluster.py)\n\n"
            f"Command: `{command.strip()}`  \n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            "every process on this one machine.\n\n" + "\n".join(lines) + "\n"
        )
        write_section("cluster", body)


if __name__ == "__main__":
    main()
