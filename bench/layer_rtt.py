"""Per-layer round trip decode pod ⇄ attention pod: the Step socket (tcp) vs the gRPC Step stream.

    .venv/bin/python bench/layer_rtt.py [--batches 1,32] [--context 256] [--steps 20] [--json FILE]

This process plays the decode pod (`RemoteAttention`, the decode pod's own code); a real attention
pod process serves the SmolLM2-135M geometry (30 layers, 3 KV heads of 64, fp32). B sequences of
`--context` positions each, one decode row per sequence: every `attend` sends q [B,9,64], k/v
[B,3,64] and gets o [B,9,64] back, and the pod really attends over the B × 3 lanes. Per transport:

    p50 / p99 µs      wall time of one `attend` (one layer's round trip, attention included)
    client CPU µs     this process's CPU time per attend (what the decode pod pays)
    pod CPU µs        the attention pod process's CPU time per attend (/proc), attention included
    attention µs      the pod's attention alone at this shape, timed in-process (the floor)

The gRPC stream carries protobuf frames; the Step socket carries `begin` as protobuf and each
layer as a raw tensor frame (see services/core/transport/step_socket.py). Both processes share this
machine's cores. The NIXL activation path is not built (docs/architecture.md says why), so it is not
in the table.
`measure(...)` returns the rows as dicts for bench/disaggregation.py section (c).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._pods import attention_pod, cpu_seconds, geometry_folder
from bench._results import write_section
from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.core.attention import SeqChunk
from services.core.model.config import ModelConfig
from services.core.placement import Placement
from services.decode.attention_link import StepTransport
from services.decode.remote_attention import RemoteAttention, RemoteAttentionOptions

LAYERS, HQ, HKV, D = 30, 9, 3, 64


@dataclass(slots=True)
class Side:
    """One transport's RemoteAttention with its own B sequences, and what it measured."""

    transport: StepTransport
    remote: RemoteAttention
    chunks: list[SeqChunk]
    samples: list[float] = field(default_factory=list)  # seconds per attend
    client_cpu: float = 0.0
    pod_cpu: float = 0.0

    def step(self, pid: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, record: bool) -> None:
        cpu0, pod0 = time.process_time(), cpu_seconds(pid)
        step = self.remote.begin(self.chunks)
        for layer in range(LAYERS):
            started = time.perf_counter()
            step.attend(layer, q, k, v)
            if record:
                self.samples.append(time.perf_counter() - started)
        if record:
            self.client_cpu += time.process_time() - cpu0
            self.pod_cpu += cpu_seconds(pid) - pod0

    def row(self, batch: int, context: int) -> dict[str, Any]:
        samples, n = sorted(self.samples), len(self.samples)
        return {
            "transport": self.transport.value,
            "batch": batch,
            "context": context,
            "p50_us": round(statistics.median(samples) * 1e6),
            "p99_us": round(samples[min(n - 1, int(0.99 * n))] * 1e6),
            "client_cpu_us": round(self.client_cpu / n * 1e6),
            "pod_cpu_us": round(self.pod_cpu / n * 1e6),
        }


def time_transports(
    address: str, pid: int, config: ModelConfig, batch: int, context: int, steps: int
) -> list[dict[str, Any]]:
    """Both transports against the same pod, steps alternating (grpc, tcp, grpc, ...) so that both
    see the same background load on a shared machine."""
    sides = []
    for i, transport in enumerate((StepTransport.GRPC, StepTransport.TCP)):
        options = RemoteAttentionOptions(step_transport=transport, layer_timeout_s=60)
        remote = RemoteAttention(config, torch.float32, Placement.request_partitioned(address, HKV), options)
        seqs = [i * batch + j for j in range(batch)]
        for seq in seqs:
            remote.open(seq)
            remote.reserve(seq, context)
        sides.append(Side(transport, remote, [SeqChunk(seq, context - 1, 1) for seq in seqs]))
    q, k, v = torch.randn(batch, HQ, D), torch.randn(batch, HKV, D), torch.randn(batch, HKV, D)
    try:
        for index in range(2 + steps):
            for side in sides:
                side.step(pid, q, k, v, record=index >= 2)  # two warm-up steps each
    finally:
        for side in sides:
            for chunk in side.chunks:
                side.remote.free(chunk.seq_id)
            side.remote.close()
    return [side.row(batch, context) for side in sides]


def local_attention_us(batch: int, context: int, repeats: int = 50) -> float:
    """The same attention in-process on one thread: what the pod must spend whatever the carrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = KVPool(KVPoolConfig(num_layers=1, head_dim=D), num_blocks=batch * HKV * (context // 16 + 1))
        part = LocalAttention(pool, num_kv_heads=HKV, num_heads=HQ)
        for seq in range(batch):
            part.open(seq)
            part.reserve(seq, context)
        step = part.begin([SeqChunk(seq, context - 1, 1) for seq in range(batch)])
        q, k, v = torch.randn(batch, HQ, D), torch.randn(batch, HKV, D), torch.randn(batch, HKV, D)
        for _ in range(5):
            step.attend(0, q, k, v)
        started = time.perf_counter()
        for _ in range(repeats):
            step.attend(0, q, k, v)
        return (time.perf_counter() - started) / repeats * 1e6
    finally:
        torch.set_num_threads(threads)


def measure(batches: tuple[int, ...] = (1, 32), context: int = 256, steps: int = 20) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="disagg-rtt-") as tmp, Progress(transient=True) as progress:
        config = ModelConfig.from_folder(geometry_folder(Path(tmp)))
        task = progress.add_task("round trips", total=2 * len(batches))
        # One torch thread, as `disagg up` runs attention pods.
        with attention_pod({"torch_threads": "1", "kv_budget_bytes": str(1 << 30)}) as (address, pid):
            for batch in batches:
                floor = round(local_attention_us(batch, context))
                measured = time_transports(address, pid, config, batch, context, steps)
                progress.advance(task, 2)
                grpc_p50 = measured[0]["p50_us"]
                for row in measured:
                    rows.append(
                        {**row, "attention_us": floor, "p50_vs_grpc": round(grpc_p50 / row["p50_us"], 2)}
                    )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,32", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=256, help="positions per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps (x 30 layers) per case")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    rows = measure(tuple(int(b) for b in args.batches.split(",")), args.context, args.steps)
    table = Table(title="per-layer round trip, decode pod ⇄ attention pod")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.no_write:
        command = "python bench/layer_rtt.py " + " ".join(sys.argv[1:])
        body = (
            "## Per-layer round trip: Step socket vs gRPC stream (bench/layer_rtt.py)\n\n"
            f"Command: `{command.strip()}`  \nMachine: {os.cpu_count()} cores, torch {torch.__version__}; "
            "both processes on this machine. µs per layer; CPU columns are per round trip.\n\n" + render(rows)
        )
        write_section("layer-rtt", body)


if __name__ == "__main__":
    main()
