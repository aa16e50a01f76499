"""CPU decode attention: the numba kernel (reads the pool in place) vs the torch reference (gathers).

    .venv/bin/python bench/cpu_attention.py [--lanes 3,24,48,96] [--contexts 256,2048]
                                            [--threads 1,2] [--repeats 5] [--no-write]

One layer of dense decode attention over the paged pool as an attention pod or the colocated engine
runs it (`kernels.decode_attention`, SmolLM2-135M geometry: G = 3 query heads per lane, D = 64, fp32,
16-position blocks scattered over a pool 3× larger than the lanes need, so blocks are not
neighbours). Lanes = sequences × 3 KV heads (an attention pod holding 16 sequences of a batch of 32
serves 48 lanes). Each cell alternates the two implementations `--repeats` times and reports the
median µs per call; the ratio is the median of the per-repeat ratios. "GB/s" is the K/V bytes one
call must read (every row once) over its time. The numba kernel's output is checked against the
reference in every cell (relative error < 1e-5).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._results import write_section
from services.attention.kernels import Backend, decode_attention, paged_cpu
from services.attention.reference import DecodeLayout, DecodeWorkspace

G, D, BLOCK = 3, 64, 16


def make_case(
    lanes: int, context: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DecodeLayout]:
    gen = torch.Generator().manual_seed(seed)
    per_lane = -(-context // BLOCK)
    num_blocks = 3 * lanes * per_lane
    order = torch.randperm(num_blocks, generator=gen).tolist()
    table = [(order[i * per_lane : (i + 1) * per_lane], context) for i in range(lanes)]
    k = torch.randn(num_blocks, BLOCK, D, generator=gen)
    v = torch.randn(num_blocks, BLOCK, D, generator=gen)
    q = torch.randn(lanes, G, D, generator=gen)
    layout = DecodeLayout.build(table, BLOCK, G, "cpu")
    return q, k, v, layout


def time_call(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def measure_cell(lanes: int, context: int, threads: int, repeats: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    q, k, v, layout = make_case(lanes, context)
    scale = D**-0.5
    workspace = DecodeWorkspace.for_layout(layout, k)

    def reference() -> torch.Tensor:
        return decode_attention(q, k, v, layout, scale, workspace, backend=Backend.TORCH)

    def kernel() -> torch.Tensor:
        return decode_attention(q, k, v, layout, scale, backend=Backend.CPU)

    ref, out = reference(), kernel()
    error = float((out.double() - ref.double()).norm() / ref.double().norm())
    if error >= 1e-5:
        raise SystemExit(f"the numba kernel is off by {error:.2e} at {lanes} lanes × {context}")
    calls = max(3, int(2e5 // (lanes * context)) + 1)  # ~tens of ms per timing
    times: dict[str, list[float]] = {"torch": [], "numba": []}
    for _ in range(repeats):
        for name, fn in (("torch", reference), ("numba", kernel)):
            fn()
            times[name].append(time_call(fn, calls))
    nbytes = 2 * lanes * context * D * 4
    numba_us = statistics.median(times["numba"])
    return {
        "lanes": lanes,
        "context": context,
        "threads": threads,
        "torch_us": statistics.median(times["torch"]),
        "numba_us": numba_us,
        "speedup": statistics.median(t / n for t, n in zip(times["torch"], times["numba"], strict=True)),
        "gbps": nbytes / numba_us / 1e3,
    }


def render(rows: list[dict[str, float]]) -> str:
    lines = [
        "| lanes | context | threads | torch reference µs | numba kernel µs | speed-up | numba GB/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['lanes']} | {r['context']} | {r['threads']} | {r['torch_us']:.0f} | {r['numba_us']:.0f} "
        f"| **{r['speedup']:.2f}×** | {r['gbps']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lanes", default="3,24,48,96", help="lanes per call, comma-separated")
    parser.add_argument("--contexts", default="256,2048", help="positions per lane, comma-separated")
    parser.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timings per cell")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    if not paged_cpu.available():
        raise SystemExit("numba is not installed: pip install numba (make setup installs it)")
    cells = [
        (int(n), int(c), int(t))
        for t in args.threads.split(",")
        for c in args.contexts.split(",")
        for n in args.lanes.split(",")
    ]
    rows = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("cells", total=len(cells))
        for lanes, context, threads in cells:
            rows.append(measure_cell(lanes, context, threads, args.repeats))
            progress.advance(task)
    table = Table(title="CPU decode attention, one layer")
    for column in ("lanes", "context", "threads", "torch µs", "numba µs", "speed-up", "numba GB/s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            *(str(r[key]) for key in ("lanes", "context", "threads")),
            f"{r['torch_us']:.0f}",
            f"{r['numba_us']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['gbps']:.1f}",
        )
    Console().print(table)
    if not args.no_write:
        command = "`.venv/bin/python bench/cpu_attention.py " + " ".join(sys.argv[1:]) + "`"
        body = (
            "## CPU decode attention: numba kernel vs torch reference (bench/cpu_attention.py)\n\n"
            f"Command: {command.replace(' `', '`')}\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; fp32, "
            "SmolLM2-135M geometry (G = 3, D = 64), 16-position blocks scattered over the pool; "
            "median of alternating repeats.\n\n" + render(rows)
        )
        write_section("cpu_attention", body)


if __name__ == "__main__":
    main()
