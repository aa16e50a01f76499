"""Greedy output of the engine equals transformers on the same GGUF weights, token for token.

The reference is transformers' LlamaForCausalLM loaded straight from the bundled GGUF (it does its
own dequantization and tokenizer conversion), so these tests check our conversion, the dense part,
the paged attention and the scheduler together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.core.model.load import LoadedModel
from services.decode.colocated import build_engine
from services.decode.engine import Engine
from services.decode.sampling import SamplingParams
from services.decode.scheduler import SchedulerConfig

pytestmark = pytest.mark.slow

NEW_TOKENS = 48
LONG_TEXT = (Path(__file__).parent.parent / "data" / "alice_ch1.txt").read_text()
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Paris is the capital of",
    "1, 2, 3, 5, 8, 13,",
    "Température de l'eau: 20 °C — ",
    LONG_TEXT + "\n\nIn one sentence, what happened to Alice?",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def prompts(model: LoadedModel) -> list[list[int]]:
    tok = model.tokenizer
    raw = [tok.encode(p) for p in RAW_PROMPTS]
    chat = [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    return raw + chat


@pytest.fixture(scope="module")
def reference(hf_reference_model: Any, prompts: list[list[int]]) -> list[list[int]]:
    outputs = []
    for ids in prompts:
        x = torch.tensor([ids])
        out = hf_reference_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
        )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


def small_chunk_engine(model: LoadedModel) -> Engine:
    """Prefill in 128-token chunks, so the long prompt is chunked and mixes with decode rows."""
    return build_engine(model, scheduler=SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=32))


def test_prompt_set_covers_chat_raw_and_a_long_prompt(prompts: list[list[int]]) -> None:
    assert len(prompts) >= 10
    assert max(len(p) for p in prompts) > 500


def test_one_request_at_a_time_matches_transformers(
    model: LoadedModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    engine = small_chunk_engine(model)
    for ids, expected in zip(prompts, reference, strict=True):
        assert engine.generate([ids], greedy())[0].token_ids == expected


def test_one_continuous_batch_matches_transformers(
    model: LoadedModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    engine = small_chunk_engine(model)
    results = engine.generate(prompts, greedy())
    assert [r.token_ids for r in results] == reference
    assert all(r.finish_reason.value in ("stop", "length") for r in results)


def test_requests_joining_a_running_batch_match_transformers(
    model: LoadedModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """Requests arrive while others are mid-decode: continuous batching must not change tokens."""
    engine = small_chunk_engine(model)
    outputs: dict[int, list[int]] = {}
    pending = list(enumerate(prompts))
    ids: dict[int, int] = {}
    while pending or engine.has_work():
        if pending:  # one new request every other step
            index, prompt = pending.pop(0)
            ids[engine.add_request(prompt, greedy())] = index
        for event in engine.step() + engine.step():
            if event.token_id is not None:
                outputs.setdefault(ids[event.seq_id], []).append(event.token_id)
    assert [outputs[i] for i in range(len(prompts))] == reference


def test_batch_of_sixteen_mixed_lengths_is_batch_invariant(
    model: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = small_chunk_engine(model)
    batch = [*[p[: 8 + 37 * i % 300] for i, p in enumerate(prompts * 2)][:15], prompts[0]]
    alone = engine.generate([prompts[0]], greedy())[0].token_ids
    together = engine.generate(batch, greedy())
    assert together[-1].token_ids == alone
    for ids, result in zip(batch[:4], together[:4], strict=True):
        assert engine.generate([ids], greedy())[0].token_ids == result.token_ids


def test_seeded_sampling_is_reproducible_in_any_batch(model: LoadedModel, prompts: list[list[int]]) -> None:
    engine = small_chunk_engine(model)
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate([prompts[1]], params)[0].token_ids
    in_batch = engine.generate([prompts[3], prompts[1], prompts[7]], params)[1].token_ids
    assert alone == in_batch
    other_seed = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=4321)
    assert engine.generate([prompts[1]], other_seed)[0].token_ids != alone


def test_preemption_under_memory_pressure_keeps_greedy_tokens(
    model: LoadedModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """A KV pool too small for the whole batch forces recompute preemption; tokens stay exact."""
    block_bytes = 2 * model.config.num_layers * 16 * model.config.head_dim * 4
    tight = build_engine(
        model,
        kv_budget_bytes=model.config.num_kv_heads * 70 * block_bytes,  # 70 blocks per head: ~1,100 tokens
        scheduler=SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=32),
    )
    results = tight.generate(prompts, greedy())
    assert [r.token_ids for r in results] == reference
    assert tight.scheduler.num_preemptions > 0
    pool = tight.attention.pool  # type: ignore[attr-defined]
    assert pool.allocator.num_free_blocks == pool.allocator.num_blocks
