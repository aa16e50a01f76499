"""Block allocator and paged attention: pure logic and small tensors, milliseconds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.attention.blocks import BlockAllocator, UnknownSequenceError
from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.attention.reference import (
    BUCKET_MIN_WASTE,
    BUCKET_SLACK,
    DecodeLayout,
    DecodeWorkspace,
    causal_prefill_attention,
    paged_decode_attention,
)
from services.core.attention import OutOfBlocks, Reserved, SeqChunk
from services.core.errors import DisaggError


def test_reserve_grows_in_blocks_and_free_returns_them() -> None:
    alloc = BlockAllocator(num_blocks=10, block_size=4)
    alloc.open(1, num_lanes=2)
    assert alloc.reserve(1, 5) == Reserved(capacity_tokens=8, new_blocks=4)
    assert alloc.reserve(1, 8) == Reserved(capacity_tokens=8, new_blocks=0)
    assert alloc.reserve(1, 9) == Reserved(capacity_tokens=12, new_blocks=2)
    assert alloc.num_free_blocks == 4
    assert [len(lane) for lane in alloc.block_table(1)] == [3, 3]
    assert alloc.free(1) == 6
    assert alloc.num_free_blocks == 10
    assert alloc.free(1) == 0  # idempotent


def test_out_of_blocks_is_a_value_and_allocates_nothing() -> None:
    alloc = BlockAllocator(num_blocks=5, block_size=4)
    alloc.open(1, num_lanes=3)
    result = alloc.reserve(1, 8)  # needs 6
    assert result == OutOfBlocks(needed=6, free=5)
    assert alloc.num_free_blocks == 5
    assert alloc.capacity(1) == 0


def test_unknown_and_duplicate_sequences() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=4)
    with pytest.raises(UnknownSequenceError):
        alloc.reserve(7, 1)
    alloc.open(7, 1)
    with pytest.raises(ValueError):
        alloc.open(7, 1)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40)), max_size=60))
@settings(max_examples=200, deadline=None)
def test_blocks_are_never_shared_or_lost(ops: list[tuple[int, int]]) -> None:
    alloc = BlockAllocator(num_blocks=24, block_size=4)
    for seq, tokens in ops:
        if tokens == 0:
            alloc.free(seq)
            continue
        if not alloc.has(seq):
            alloc.open(seq, num_lanes=1 + seq % 3)
        alloc.reserve(seq, tokens)
        owned = [b for s in range(6) if alloc.has(s) for lane in alloc.block_table(s) for b in lane]
        assert len(owned) == len(set(owned))
        assert len(owned) + alloc.num_free_blocks == 24


def test_pool_is_sized_from_a_byte_budget() -> None:
    config = KVPoolConfig(num_layers=2, head_dim=8, block_size=4)
    assert config.bytes_per_block() == 2 * 2 * 4 * 8 * 4
    pool = KVPool.from_budget(config, 10 * config.bytes_per_block() + 5)
    assert pool.allocator.num_blocks == 10
    with pytest.raises(DisaggError, match="raise the KV memory budget"):
        KVPool.from_budget(config, 10)


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Hq, D] attends over k, v [S, Hkv, D]; plain softmax, GQA by repeat."""
    group = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,shd->hs", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hs,shd->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_dense_over_mixed_prefill_and_decode(block_size: int) -> None:
    torch.manual_seed(0)
    layers, hq, hkv, d = 2, 6, 2, 8
    pool = KVPool(KVPoolConfig(num_layers=layers, head_dim=d, block_size=block_size), num_blocks=400)
    part = LocalAttention(pool, num_kv_heads=hkv, num_heads=hq)
    lengths = {10: 7, 11: 1, 12: 23, 13: 16}
    history = {s: (torch.randn(n, hkv, d), torch.randn(n, hkv, d)) for s, n in lengths.items()}
    for seq, n in lengths.items():  # prefill each sequence (chunks of up to 9 tokens)
        part.open(seq)
        for start in range(0, n, 9):
            length = min(9, n - start)
            assert isinstance(part.reserve(seq, start + length), Reserved)
            step = part.begin([SeqChunk(seq, start, length)])
            k, v = history[seq][0][start : start + length], history[seq][1][start : start + length]
            for layer in range(layers):
                o = step.attend(layer, torch.randn(length, hq, d), k, v)
                assert o.shape == (length, hq, d)
    # One mixed forward: decode rows for 10, 11, 13 and a 5-token prefill chunk for a new sequence 14.
    part.open(14)
    chunks = [SeqChunk(10, 7, 1), SeqChunk(14, 0, 5), SeqChunk(11, 1, 1), SeqChunk(13, 16, 1)]
    for c in chunks:
        part.reserve(c.seq_id, c.end)
    q, k, v = torch.randn(8, hq, d), torch.randn(8, hkv, d), torch.randn(8, hkv, d)
    step = part.begin(chunks)
    out = step.attend(1, q, k, v)
    history[14] = (torch.empty(0, hkv, d), torch.empty(0, hkv, d))
    row = 0
    for c in chunks:
        keys = torch.cat([history[c.seq_id][0], k[row : row + c.length]])
        values = torch.cat([history[c.seq_id][1], v[row : row + c.length]])
        for i in range(c.length):
            visible = c.start + i + 1
            expected = _dense_attention(q[row + i], keys[:visible], values[:visible])
            torch.testing.assert_close(out[row + i], expected, rtol=1e-5, atol=1e-5)
        row += c.length


def test_causal_prefill_with_offset_matches_full_causal() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(12, 4, 8), torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    full = causal_prefill_attention(q, k, v, start=0, scale=8**-0.5)
    tail = causal_prefill_attention(q[5:], k, v, start=5, scale=8**-0.5)
    torch.testing.assert_close(tail, full[5:], rtol=1e-5, atol=1e-6)


def test_free_releases_blocks_immediately() -> None:
    pool = KVPool(KVPoolConfig(num_layers=1, head_dim=4, block_size=2), num_blocks=12)
    part = LocalAttention(pool, num_kv_heads=3, num_heads=3)
    part.open(1)
    part.reserve(1, 7)
    assert pool.allocator.num_free_blocks == 0
    part.free(1)
    assert pool.allocator.num_free_blocks == 12
    assert part.max_tokens_per_sequence() == 8


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=24),
    block_size=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_bucketed_decode_attention_equals_dense_per_lane(
    lengths: list[int], block_size: int, seed: int
) -> None:
    """Lanes of any lengths, blocks scattered over the pool: every lane equals its own dense attention,
    and buckets pad no more than the bound allows."""
    gen = torch.Generator().manual_seed(seed)
    group, d = 3, 8
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 5
    k_cache = torch.randn(num_blocks, block_size, d, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, d, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    lanes = []
    for n_blocks, length in zip(needed, lengths, strict=True):
        lanes.append((free[:n_blocks], length))
        free = free[n_blocks:]
    layout = DecodeLayout.build(lanes, block_size, group, "cpu")
    q = torch.randn(len(lengths), group, d, generator=gen)
    out = paged_decode_attention(
        q, k_cache, v_cache, layout, d**-0.5, DecodeWorkspace.for_layout(layout, k_cache)
    )
    for i, (table, length) in enumerate(lanes):
        keys = k_cache[table].reshape(-1, d)[:length]
        values = v_cache[table].reshape(-1, d)[:length]
        expected = torch.softmax(q[i] @ keys.T * d**-0.5, dim=-1) @ values
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)
    assert sorted(int(i) for b in layout.buckets for i in b.lanes) == list(range(len(lengths)))
    for bucket in layout.buckets:
        real = sum(needed[int(i)] for i in bucket.lanes)
        assert bucket.blocks.numel() <= max(BUCKET_SLACK * real, real + BUCKET_MIN_WASTE)
