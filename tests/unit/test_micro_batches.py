"""Ping-pong micro-batches: how a forward's chunks are cut, and that the interleaved dense forward
equals the sequential one (a tiny random model, local attention; milliseconds)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.core.attention import SeqChunk
from services.core.model.config import ModelConfig
from services.core.model.dense import DenseModel, MicroBatchInput
from services.decode.engine import MIN_ROWS_PER_MICRO_BATCH, micro_batch_count, split_micro_batches
from services.decode.sampling import SamplingParams
from services.decode.scheduler import ScheduledChunk, Sequence


def chunks(lengths: list[int]) -> list[ScheduledChunk]:
    params = SamplingParams(max_tokens=1)
    return [
        ScheduledChunk(Sequence(i, [1] * n, params), SeqChunk(i, 0, n), True) for i, n in enumerate(lengths)
    ]


def sizes(groups: list[list[ScheduledChunk]]) -> list[int]:
    return [sum(item.chunk.length for item in g) for g in groups]


@pytest.mark.parametrize(
    ("lengths", "count", "expected"),
    [
        ([1] * 32, 2, [16, 16]),
        ([1] * 32, 3, [11, 10, 11]),
        ([1] * 9, 2, [5, 4]),
        ([1] * 3, 2, [3]),  # too small to split: one row per micro-batch reads the weights twice
        ([1] * 32, 1, [32]),
        ([100] + [1] * 31, 2, [100, 31]),  # a prefill chunk is never cut
        ([1] * 31 + [100], 2, [31, 100]),
    ],
)
def test_split_balances_tokens_in_order(lengths: list[int], count: int, expected: list[int]) -> None:
    assert sizes(split_micro_batches(chunks(lengths), count)) == expected


def decode_rows(contexts: list[int]) -> list[ScheduledChunk]:
    """One decode row per sequence, attending over `context` positions (its new token included)."""
    params = SamplingParams(max_tokens=1)
    return [
        ScheduledChunk(Sequence(i, [1] * n, params), SeqChunk(i, n - 1, 1), True)
        for i, n in enumerate(contexts)
    ]


@pytest.mark.parametrize(
    ("contexts", "min_context", "expected"),
    [
        ([256] * 32, 512, 1),  # short contexts: too little attention to hide
        ([1000] * 16, 512, 2),
        ([512] * 4, 512, 2),  # exactly the threshold splits
        ([511] * 4, 512, 1),
        ([100, 924], 512, 2),  # the mean decides, not the longest or the shortest
        ([256] * 32, 0, 2),  # 0: always split
    ],
)
def test_micro_batches_only_where_the_context_is_long(
    contexts: list[int], min_context: int, expected: int
) -> None:
    assert micro_batch_count(decode_rows(contexts), 2, min_context) == expected
    assert micro_batch_count(decode_rows(contexts), 1, min_context) == 1  # never more than asked


def test_a_prefill_chunk_counts_every_row_it_attends_with() -> None:
    # 100 new tokens at positions 900..999 attend over 901..1000 positions: mean 950.5.
    params = SamplingParams(max_tokens=1)
    chunk = [ScheduledChunk(Sequence(0, [1] * 1000, params), SeqChunk(0, 900, 100), True)]
    assert micro_batch_count(chunk, 3, 950) == 3
    assert micro_batch_count(chunk, 3, 951) == 1


@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(1, 4))
def test_split_keeps_every_chunk_once_in_order(lengths: list[int], count: int) -> None:
    items = chunks(lengths)
    groups = split_micro_batches(items, count)
    assert [item for g in groups for item in g] == items
    assert all(groups) and len(groups) <= max(1, sum(lengths) // MIN_ROWS_PER_MICRO_BATCH)


TINY = ModelConfig.from_dict(
    {
        "vocab_size": 50,
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
)


def tiny_dense() -> DenseModel:
    cfg, d, hd = TINY, TINY.hidden_size, TINY.head_dim
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    weights = {"model.embed_tokens.weight": w(cfg.vocab_size, d), "model.norm.weight": 1 + w(d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        weights |= {
            f"{p}input_layernorm.weight": 1 + w(d),
            f"{p}post_attention_layernorm.weight": 1 + w(d),
            f"{p}self_attn.q_proj.weight": w(cfg.num_heads * hd, d),
            f"{p}self_attn.k_proj.weight": w(cfg.num_kv_heads * hd, d),
            f"{p}self_attn.v_proj.weight": w(cfg.num_kv_heads * hd, d),
            f"{p}self_attn.o_proj.weight": w(d, cfg.num_heads * hd),
            f"{p}mlp.gate_proj.weight": w(cfg.intermediate_size, d),
            f"{p}mlp.up_proj.weight": w(cfg.intermediate_size, d),
            f"{p}mlp.down_proj.weight": w(d, cfg.intermediate_size),
        }
    return DenseModel(cfg, weights)


def local_attention() -> LocalAttention:
    pool = KVPool(KVPoolConfig(TINY.num_layers, TINY.head_dim, block_size=4), 64)
    return LocalAttention(pool, TINY.num_kv_heads, TINY.num_heads)


@pytest.mark.parametrize("count", [2, 3])
def test_interleaved_forward_equals_sequential(count: int) -> None:
    """Rows of the micro-batches equal the same rows in one sequential forward (K/V too: a decode
    step after the prefill attends over what the interleaved prefill wrote)."""
    model = tiny_dense()
    lengths = [5, 1, 7, 3, 2, 6][: count * 2]
    prompts = [[(3 * i + 7 * j) % 50 for j in range(n)] for i, n in enumerate(lengths)]
    results = []
    for split in (False, True):
        attention = local_attention()
        for seq_id, prompt in enumerate(prompts):
            attention.open(seq_id)
            attention.reserve(seq_id, len(prompt) + 1)
        plan = [SeqChunk(i, 0, len(p)) for i, p in enumerate(prompts)]
        groups = [plan[i::count] for i in range(count)] if split else [plan]
        inputs = [
            MicroBatchInput(
                torch.tensor([t for c in g for t in prompts[c.seq_id]]),
                torch.tensor([p for c in g for p in range(c.length)]),
                attention.begin(g),
            )
            for g in groups
        ]
        hidden = dict(
            zip(
                (tuple(c.seq_id for c in g) for g in groups), model.forward_micro_batches(inputs), strict=True
            )
        )
        rows = {}
        for ids, h in hidden.items():
            starts = torch.cumsum(torch.tensor([0] + [len(prompts[i]) for i in ids]), 0)
            rows |= {i: h[starts[k] : starts[k + 1]] for k, i in enumerate(ids)}
        decode = [SeqChunk(i, len(p), 1) for i, p in enumerate(prompts)]
        last = model.forward(
            torch.tensor([p[-1] for p in prompts]),
            torch.tensor([len(p) for p in prompts]),
            attention.begin(decode),
        )
        results.append(([rows[i] for i in range(len(prompts))], last))
    (seq_rows, seq_last), (mb_rows, mb_last) = results
    for a, b in zip(seq_rows, mb_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq_last, mb_last, rtol=1e-5, atol=1e-5)
