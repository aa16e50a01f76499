"""What the attention engine accounts, without the network: K/V bytes read by policy (dense reads
2 · context · D · itemsize per lane per layer) and each sequence's cost, returned by `release`."""

from __future__ import annotations

import time

import pytest
import torch

from services.attention.costs import AttentionCosts
from services.attention.engine import AttentionEngine, PodGeometry
from services.attention.kv_pool import KVPool, KVPoolConfig
from services.core.attention import DENSE, SeqChunk

LAYERS, HKV, G, D = 2, 4, 2, 8
GEOMETRY = PodGeometry(LAYERS, HKV, G, D, torch.float32)


def engine(usd_per_hour: float = 0.0) -> AttentionEngine:
    pool = KVPool(KVPoolConfig(num_layers=LAYERS, head_dim=D, block_size=4), 64)
    return AttentionEngine(GEOMETRY, pool, costs=AttentionCosts(usd_per_hour, 0.5, 64))


def run_step(e: AttentionEngine, step_id: int, chunks: list[SeqChunk], heads: dict[int, int]) -> None:
    session = e.session()
    session.begin(step_id, chunks)
    lanes = sum(c.length * heads[c.seq_id] for c in chunks)
    for layer in range(LAYERS):
        session.layer(step_id, layer, torch.randn(lanes, G, D), torch.randn(lanes, D), torch.randn(lanes, D))
    session.close()


def test_dense_bytes_read_count_every_lane_over_its_context_per_layer() -> None:
    e = engine()
    e.open(1, 0, 4, DENSE)
    e.open(2, 1, 2, DENSE)  # a head-partitioned slice: 2 lanes per token
    e.reserve(1, 8)
    e.reserve(2, 8)
    run_step(e, 0, [SeqChunk(1, 0, 3), SeqChunk(2, 0, 1)], {1: 4, 2: 2})  # a prefill chunk and a row
    run_step(e, 1, [SeqChunk(1, 3, 1), SeqChunk(2, 1, 1)], {1: 4, 2: 2})  # two decode rows
    row = 2 * D * 4  # K and V of one position of one head, fp32
    # Decode rows only (lanes × the context each attends): policies act there; prefill is exact.
    positions = 2 * 1 + 4 * 4 + 2 * 2
    assert e.bytes_read_total() == {"dense": LAYERS * positions * row}
    assert e.dense_bytes_total() == e.bytes_read_total()


def test_release_returns_the_sequences_memory_and_compute_cost() -> None:
    e = engine(usd_per_hour=3600.0)
    e.open(1, 0, 4, DENSE)
    e.open(2, 0, 4, DENSE)
    e.reserve(1, 8)  # 2 blocks per lane: 8 blocks
    e.reserve(2, 1)  # 4 blocks
    time.sleep(0.05)
    run_step(e, 0, [SeqChunk(1, 0, 8), SeqChunk(2, 0, 1)], {1: 4, 2: 4})  # lanes × context: 144 and 4
    one, two = e.release(1), e.release(2)
    assert (one.blocks, two.blocks) == (8, 4)
    assert one.cost_usd > two.cost_usd > 0  # twice the memory, most of the compute
    assert e.release(1).cost_usd == 0.0 and e.release(1).blocks == 0
    totals = e.costs.totals()
    assert totals.request_usd == pytest.approx(one.cost_usd + two.cost_usd, rel=1e-9)
