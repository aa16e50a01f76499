"""The attention pod's engine without the network: head ranges, lanes, ImportKV, protocol errors."""

from __future__ import annotations

import pytest
import torch

from services.attention.blocks import UnknownSequenceError
from services.attention.engine import (
    AttentionEngine,
    InvalidFrameError,
    NotReservedError,
    PodClosingError,
    PodGeometry,
    SequenceExistsError,
    TooManyStepsError,
)
from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.core.attention import DENSE, OutOfBlocks, PolicySpec, Reserved, SeqChunk
from services.core.errors import InvalidRequestError

LAYERS, HKV, G, D = 2, 4, 2, 8
GEOMETRY = PodGeometry(LAYERS, HKV, G, D, torch.float32)


def _engine(num_blocks: int = 200, block_size: int = 4) -> AttentionEngine:
    pool = KVPool(KVPoolConfig(num_layers=LAYERS, head_dim=D, block_size=block_size), num_blocks)
    return AttentionEngine(GEOMETRY, pool, max_open_steps=2)


def _lanes(chunks: list[SeqChunk], heads: dict[int, range], queries: bool = False) -> list[tuple[int, int]]:
    """(row, head) of every lane of a step, in the pod's lane order; `queries`: only the query lanes
    (those of chunks that are not kv_only)."""
    lanes: list[tuple[int, int]] = []
    row = 0
    for chunk in chunks:
        if not (queries and chunk.kv_only):
            for token in range(chunk.length):
                lanes.extend((row + token, h) for h in heads[chunk.seq_id])
        row += chunk.length
    return lanes


def _pod_and_reference(heads: dict[int, range]) -> tuple[AttentionEngine, LocalAttention]:
    """A pod engine with each sequence open on its heads, and local attention over every head."""
    engine = _engine()
    reference = LocalAttention(
        KVPool(KVPoolConfig(num_layers=LAYERS, head_dim=D, block_size=4), 200), HKV, HKV * G
    )
    for seq, held in heads.items():
        engine.open(seq, held.start, len(held), DENSE)
        reference.open(seq)
    return engine, reference


def _run_steps(heads: dict[int, range], steps: list[list[SeqChunk]]) -> None:
    """Each step on one pod session and on local attention over every head: the pod's o equals the
    reference at its query lanes (kv_only chunks have none; a q for every lane is then refused)."""
    engine, reference = _pod_and_reference(heads)
    session = engine.session()
    for step_id, chunks in enumerate(steps):
        n = sum(c.length for c in chunks)
        for c in chunks:
            assert isinstance(engine.reserve(c.seq_id, c.end), Reserved)
            reference.reserve(c.seq_id, c.end)
        lanes = _lanes(chunks, heads)
        rows, cols = torch.tensor([r for r, _ in lanes]), torch.tensor([h for _, h in lanes])
        q_lanes = _lanes(chunks, heads, queries=True)
        q_rows, q_cols = torch.tensor([r for r, _ in q_lanes]), torch.tensor([h for _, h in q_lanes])
        session.begin(step_id, chunks)
        assert session.expect_layer(step_id, 0) == (len(q_lanes), len(lanes))
        ref_step = reference.begin([SeqChunk(c.seq_id, c.start, c.length) for c in chunks])
        for layer in range(LAYERS):
            q, k, v = torch.randn(n, HKV * G, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
            expected = ref_step.attend(layer, q, k, v).view(n, HKV, G, D)[q_rows, q_cols]  # [Mq, G, D]
            q4, k_lanes, v_lanes = q.view(n, HKV, G, D), k[rows, cols], v[rows, cols]
            if len(q_lanes) < len(lanes):  # q for every lane is refused before anything is written
                with pytest.raises(InvalidFrameError, match=rf"must be \[{len(q_lanes)}, {G}, {D}\]"):
                    session.layer(step_id, layer, q4[rows, cols], k_lanes, v_lanes)
            o = session.layer(step_id, layer, q4[q_rows, q_cols], k_lanes, v_lanes)
            torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)
    assert session.open_steps == 0  # a step closes after its last layer


HEADS = {1: range(0, 4), 2: range(1, 3), 3: range(3, 4)}  # all / a middle slice / the last head


def test_sequences_holding_different_heads_match_full_attention() -> None:
    """One pod, three sequences holding all / a middle slice / the last head, mixed steps."""
    torch.manual_seed(0)
    steps = [
        [SeqChunk(1, 0, 6), SeqChunk(2, 0, 3), SeqChunk(3, 0, 1)],  # prefill chunks and a decode row
        [SeqChunk(1, 6, 1), SeqChunk(2, 3, 5), SeqChunk(3, 1, 1)],  # decode, chunk, decode
        [SeqChunk(3, 2, 1), SeqChunk(1, 7, 1), SeqChunk(2, 8, 1)],  # pure decode, new order
    ]
    _run_steps(HEADS, steps)


def test_kv_only_chunks_are_stored_not_attended_and_later_rows_attend_them() -> None:
    """A kv_only chunk (the client attended it) writes its K/V and has no q or o lanes; the step's
    other rows keep their order in q and o; later steps attend the stored K/V exactly."""
    torch.manual_seed(2)
    steps = [
        [SeqChunk(1, 0, 6, kv_only=True), SeqChunk(2, 0, 3)],  # a prefill chunk after a kv_only one
        [SeqChunk(3, 0, 5, kv_only=True), SeqChunk(2, 3, 1), SeqChunk(1, 6, 2)],  # a decode row and a chunk
        [SeqChunk(1, 8, 1), SeqChunk(2, 4, 1), SeqChunk(3, 5, 2)],  # every row attends stored K/V
    ]
    _run_steps(HEADS, steps)


def test_imported_kv_is_attended_like_kv_written_by_steps() -> None:
    torch.manual_seed(1)
    engine = _engine()
    reference = LocalAttention(
        KVPool(KVPoolConfig(num_layers=LAYERS, head_dim=D, block_size=4), 200), HKV, HKV * G
    )
    engine.open(7, 2, 2, DENSE)  # heads 2..3
    reference.open(7)
    history = [(torch.randn(9, HKV, D), torch.randn(9, HKV, D)) for _ in range(LAYERS)]
    engine.reserve(7, 10)
    reference.reserve(7, 10)
    ref_step = reference.begin([SeqChunk(7, 0, 9)])
    for layer, (k, v) in enumerate(history):
        engine.import_kv(7, layer, 0, k[:, 2:], v[:, 2:])  # [T, h, D]: the pod's heads only
        ref_step.attend(layer, torch.randn(9, HKV * G, D), k, v)
    session = engine.session()
    session.begin(0, [SeqChunk(7, 9, 1)])
    ref_step = reference.begin([SeqChunk(7, 9, 1)])
    for layer in range(LAYERS):
        q, k, v = torch.randn(1, HKV * G, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D)
        expected = ref_step.attend(layer, q, k, v).view(HKV, G, D)[2:]
        o = session.layer(0, layer, q.view(HKV, G, D)[2:], k[0, 2:], v[0, 2:])
        torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)


def test_sequence_lifecycle_errors() -> None:
    engine = _engine(num_blocks=4)
    with pytest.raises(InvalidFrameError, match=r"\[3, 5\)"):
        engine.open(1, 3, 2, DENSE)
    with pytest.raises(InvalidRequestError, match=r"unknown attention policy 'sparse'.*dense, sink_window"):
        PolicySpec.parse("sparse")
    engine.open(1, 0, 2, DENSE)
    with pytest.raises(SequenceExistsError):
        engine.open(1, 0, 2, DENSE)
    assert engine.reserve(1, 12) == OutOfBlocks(needed=6, free=4)
    with pytest.raises(UnknownSequenceError):
        engine.reserve(2, 1)
    assert engine.reserve(1, 8) == Reserved(capacity_tokens=8, new_blocks=4)
    assert engine.stats().blocks_used == 4 and engine.stats().sequences == 1
    assert engine.free(1) == 4 and engine.free(1) == 0
    assert engine.stats().blocks_free == 4


def test_step_protocol_errors() -> None:
    engine = _engine()
    engine.open(1, 0, 1, DENSE)
    engine.reserve(1, 4)
    session = engine.session()
    with pytest.raises(UnknownSequenceError):
        session.begin(0, [SeqChunk(9, 0, 1)])
    with pytest.raises(NotReservedError, match="Reserve 5 tokens first"):
        session.begin(0, [SeqChunk(1, 4, 1)])
    with pytest.raises(InvalidFrameError, match="appears twice"):
        session.begin(0, [SeqChunk(1, 0, 1), SeqChunk(1, 1, 1)])
    with pytest.raises(InvalidFrameError, match="no chunks"):
        session.begin(0, [])
    session.begin(0, [SeqChunk(1, 0, 2)])
    with pytest.raises(InvalidFrameError, match="already open"):
        session.begin(0, [SeqChunk(1, 0, 2)])
    with pytest.raises(InvalidFrameError, match="expects layer 0 next, got layer 1"):
        session.expect_layer(0, 1)
    with pytest.raises(InvalidFrameError, match="not open"):
        session.expect_layer(5, 0)
    with pytest.raises(InvalidFrameError, match=r"must be \[2, 2, 8\]"):
        session.layer(0, 0, torch.zeros(3, G, D), torch.zeros(3, D), torch.zeros(3, D))
    session.begin(1, [SeqChunk(1, 0, 2)])
    with pytest.raises(TooManyStepsError):
        session.begin(2, [SeqChunk(1, 0, 2)])
    engine.close()
    with pytest.raises(PodClosingError):
        engine.session().begin(0, [SeqChunk(1, 0, 1)])
