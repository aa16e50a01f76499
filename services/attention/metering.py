"""The attention pod's metrics: KV pool, bytes read by policy, cost, and the bytes and time of its
frames. Read at scrape from the engine where possible; hot-path counters are bound once here."""

from __future__ import annotations

import torch

from services.attention.engine import AttentionEngine
from services.core.metrics import (
    ATTENTION_BYTES_READ,
    ATTENTION_DENSE_BYTES,
    ATTENTION_LAYER_SECONDS,
    KV_BLOCKS_TOTAL,
    KV_BLOCKS_USED,
    KV_SEQUENCES,
    TRANSFER_BYTES,
    PodMetrics,
    Samples,
    export_cost,
)


class AttentionMetrics:
    def __init__(self, metrics: PodMetrics, engine: AttentionEngine) -> None:
        self.metrics = metrics
        export_cost(metrics, engine.costs)
        metrics.computed(KV_BLOCKS_USED, lambda: [({}, engine.stats().blocks_used)])
        metrics.computed(KV_BLOCKS_TOTAL, lambda: [({}, engine.stats().blocks_total)])
        metrics.computed(KV_SEQUENCES, lambda: [({}, engine.stats().sequences)])
        metrics.computed(ATTENTION_BYTES_READ, lambda: _by_policy(engine.bytes_read_total()))
        metrics.computed(ATTENTION_DENSE_BYTES, lambda: _by_policy(engine.dense_bytes_total()))
        self._layer_seconds = metrics.histogram(ATTENTION_LAYER_SECONDS)
        carriers = ("tcp", "grpc")  # the Step socket, the gRPC Step stream
        self._in = {
            t: metrics.counter(TRANSFER_BYTES, transport=t, direction="received", payload="activations")
            for t in carriers
        }
        self._out = {
            t: metrics.counter(TRANSFER_BYTES, transport=t, direction="sent", payload="activations")
            for t in carriers
        }

    def frame(
        self,
        transport: str,
        seconds: float,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        o: torch.Tensor,
    ) -> None:
        """One Step layer frame over `transport` computed in `seconds`: q/k/v in, o out."""
        self._layer_seconds.observe(seconds)
        self._in[transport].inc(q.nbytes + k.nbytes + v.nbytes)
        self._out[transport].inc(o.nbytes)

    def imported(self, transport: str, nbytes: int) -> None:
        """K/V of a prompt written into the pool (ImportKV over grpc, or a NIXL transfer)."""
        self.metrics.counter(TRANSFER_BYTES, transport=transport, direction="received", payload="kv").inc(
            nbytes
        )


def _by_policy(totals: dict[str, int]) -> Samples:
    return [({"policy": policy}, value) for policy, value in sorted(totals.items())]
