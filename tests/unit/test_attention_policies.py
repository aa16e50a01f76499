"""Attention policies without the model: invariants (hypothesis), exactness at full budget, eviction
that frees real blocks, bytes counted from what a step reads, and the pod engine's policy checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.attention.engine import AttentionEngine, InvalidFrameError, PodGeometry
from services.attention.kernels import PagedLanes, paged_cpu
from services.attention.kernels.sparq import kt_from_k, sparq_decode_reference
from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import EvictedPrefillError, LocalAttention
from services.attention.policies import RECENT_TOKENS, SINK_TOKENS
from services.attention.policies.heavy_hitter import HeavyHitterPolicy
from services.attention.policies.quest import PAGE_SIZE, QuestPolicy
from services.attention.policies.quest_bounds import page_upper_bounds, round_outward
from services.attention.policies.sparq_cpu import sparq_decode_cpu
from services.attention.reference import DecodeLayout, paged_decode_attention
from services.core.attention import DENSE, PolicyName, PolicySpec, Scoring, SeqChunk

LAYERS, HKV, G, D, BS = 2, 2, 3, 16, 4
SPARSE = [n for n in PolicyName if n is not PolicyName.DENSE]


def _part(num_blocks: int = 600) -> LocalAttention:
    return LocalAttention(KVPool(KVPoolConfig(LAYERS, D, BS), num_blocks), HKV, HKV * G)


def _run(
    part: LocalAttention, specs: list[PolicySpec], lengths: list[int], steps: int, seed: int
) -> torch.Tensor:
    """Prefill `lengths`, then `steps` decode steps of every sequence; o of every decode step."""
    gen = torch.Generator().manual_seed(seed)

    def qkv(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.randn(n, HKV * G, D, generator=gen),
            torch.randn(n, HKV, D, generator=gen),
            torch.randn(n, HKV, D, generator=gen),
        )

    for seq, (spec, n) in enumerate(zip(specs, lengths, strict=True)):
        part.open(seq, spec)
        part.reserve(seq, n + steps)
    step = part.begin([SeqChunk(seq, 0, n) for seq, n in enumerate(lengths)])
    for layer in range(LAYERS):
        step.attend(layer, *qkv(sum(lengths)))
    outs = []
    for t in range(steps):
        step = part.begin([SeqChunk(seq, n + t, 1) for seq, n in enumerate(lengths)])
        outs += [step.attend(layer, *qkv(len(lengths))) for layer in range(LAYERS)]
    return torch.stack(outs)


# ---- invariants ----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(0.1, 10))
def test_quest_page_bound_is_never_below_the_true_max(
    pages: int, size: int, seed: int, spread: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, G, D, generator=gen) * spread
    keys = torch.randn(2, pages, size, D, generator=gen) * spread  # [n, P, tokens, D]
    bound = page_upper_bounds(q, torch.stack([keys.amax(dim=2), keys.amin(dim=2)], dim=2))  # [n, G, P]
    true_max = torch.einsum("ngd,nptd->ngpt", q, keys).amax(dim=-1)
    assert torch.all(bound >= true_max - 1e-4 * (1 + true_max.abs()))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]),
    st.integers(0, 2**31 - 1),
    st.floats(0.001, 1000),
)
def test_quest_narrow_bounds_round_outward(dtype: torch.dtype, seed: int, spread: float) -> None:
    """Bounds stored narrow (bf16, float8) still contain every fp32 key; a component past the
    dtype's range is stored as NaN, and that page's bound is +inf (so never below the true max)."""
    keys = torch.randn(2, 8, 4, D, generator=torch.Generator().manual_seed(seed)) * spread  # [n, P, t, D]
    low = round_outward(keys.amin(dim=2), dtype, down=True)
    high = round_outward(keys.amax(dim=2), dtype, down=False)
    assert low.dtype == high.dtype == dtype
    top = torch.finfo(dtype).max
    inside = keys.abs().amax(dim=(2, 3)) < top  # [n, P] pages whose keys the dtype can hold
    assert torch.all((low.float() <= keys.amin(dim=2)) | ~inside[..., None])
    assert torch.all((high.float() >= keys.amax(dim=2)) | ~inside[..., None])
    q = torch.randn(2, G, D, generator=torch.Generator().manual_seed(seed + 1)) * spread
    bound = page_upper_bounds(q, torch.stack([high, low], dim=2))  # [n, G, P]
    true_max = torch.einsum("ngd,nptd->ngpt", q, keys).amax(dim=-1)
    assert torch.all(bound >= true_max - 1e-4 * (1 + true_max.abs()))
    assert torch.all(bound.isposinf() | inside[:, None, :])


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(120, 200), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_quest_sub_block_pages_bound_their_keys(lengths: list[int], seed: int) -> None:
    """Pages of PAGE_SIZE positions inside 16-position blocks: each page's stored bounds contain
    the keys of exactly its positions."""
    part = LocalAttention(KVPool(KVPoolConfig(LAYERS, D, 16), 200), HKV, HKV * G)
    _run(part, [PolicySpec(PolicyName.QUEST, 0.3)] * len(lengths), lengths, 3, seed)
    policy = part.policy(PolicyName.QUEST)
    assert isinstance(policy, QuestPolicy) and policy.page_size == PAGE_SIZE < 16
    per_block = 16 // PAGE_SIZE
    for seq, n in enumerate(lengths):
        stored = n + 3  # every decode step derives its lane's last block, its new token included
        for table in part.pool.allocator.block_table(seq):
            for page in range(stored // PAGE_SIZE):
                block, j = table[page // per_block], page % per_block
                for layer in range(LAYERS):
                    keys = part.pool.k[layer][block, j * PAGE_SIZE : (j + 1) * PAGE_SIZE]  # [ps, D]
                    row = block * per_block + j
                    high, low = policy.bounds[layer][row].float()  # [D] each
                    assert torch.all(low <= keys.amin(dim=0)) and torch.all(high >= keys.amax(dim=0))


def _lanes(lengths: list[int], gen: torch.Generator, blocks: int) -> PagedLanes:
    perm = torch.randperm(blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in lengths:
        count = -(-n // BS)
        tables.append(perm[used : used + count])
        used += count
    return PagedLanes.build(list(zip(tables, lengths, strict=True)), BS, "cpu")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_sparq_with_every_component_and_key_is_dense(lengths: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks = sum(-(-n // BS) for n in lengths) + 3
    k_cache, v_cache = torch.randn(blocks, BS, D, generator=gen), torch.randn(blocks, BS, D, generator=gen)
    lanes = _lanes(lengths, gen, blocks)
    q = torch.randn(len(lengths), G, D, generator=gen)
    layout = DecodeLayout.build(
        [
            (lanes.blocks[s : s + -(-n // BS)].tolist(), n)
            for s, n in zip(lanes.lane_start.tolist(), lengths, strict=True)
        ],
        BS,
        G,
        "cpu",
    )
    dense = paged_decode_attention(q, k_cache, v_cache, layout, D**-0.5)
    width = max(lengths)
    for step in (sparq_decode_reference, sparq_decode_cpu):
        out = step(q, k_cache, v_cache, kt_from_k(k_cache), lanes, D, width, min(4, width), D**-0.5).out
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(8, 90), min_size=1, max_size=4),
    st.integers(1, D),
    st.integers(4, 64),
    st.integers(0, 2**31 - 1),
)
def test_sparq_cpu_path_is_the_reference(lengths: list[int], r: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks = sum(-(-n // BS) for n in lengths) + 2
    k_cache, v_cache = torch.randn(blocks, BS, D, generator=gen), torch.randn(blocks, BS, D, generator=gen)
    kt = kt_from_k(k_cache)
    lanes = _lanes(lengths, gen, blocks)
    q = torch.randn(len(lengths), G, D, generator=gen)
    window = min(4, k)
    ref = sparq_decode_reference(q, k_cache, v_cache, kt, lanes, r, k, window, D**-0.5)
    fast = sparq_decode_cpu(q, k_cache, v_cache, kt, lanes, r, k, window, D**-0.5)
    torch.testing.assert_close(fast.out, ref.out, rtol=1e-4, atol=1e-5)  # random scores: no ties
    assert fast.bytes_read == ref.bytes_read


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 150), min_size=1, max_size=3),
    st.integers(1, 40),
    st.sampled_from([0.05, 0.2, 0.5]),
    st.sampled_from(list(Scoring)),
    st.integers(0, 2**31 - 1),
)
def test_heavy_hitter_never_evicts_sinks_or_the_recent_window(
    lengths: list[int], steps: int, budget: float, scoring: Scoring, seed: int
) -> None:
    part = _part()
    spec = PolicySpec(PolicyName.HEAVY_HITTER, budget, scoring)
    _run(part, [spec] * len(lengths), lengths, steps, seed)
    policy = part.policy(PolicyName.HEAVY_HITTER)
    assert isinstance(policy, HeavyHitterPolicy)
    allocator = part.pool.allocator
    for seq, n in enumerate(lengths):
        positions = n + steps
        stored = positions - allocator.dropped(seq)
        must = set(range(min(SINK_TOKENS, positions))) | set(
            range(max(positions - RECENT_TOKENS, 0), positions)
        )
        for lane in allocator.block_table(seq):
            slots = torch.tensor([lane[i // BS] * BS + i % BS for i in range(stored)])
            for layer in range(LAYERS):
                kept = policy.pos[layer].view(-1)[slots].tolist()
                assert must <= set(kept)
                assert kept == sorted(kept) and len(set(kept)) == stored  # compacted in position order


# ---- exactness, bytes, eviction ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PolicyName))
def test_a_budget_covering_the_cache_is_exactly_dense(name: PolicyName) -> None:
    lengths, steps = [3, 40, 130], 12
    dense = _run(_part(), [DENSE] * 3, lengths, steps, seed=5)
    full = _run(_part(), [PolicySpec(name, 1.0)] * 3, lengths, steps, seed=5)
    assert_dense(name, full, dense)
    # Below 1, but every sequence shorter than the policy's floors: still dense, bit for bit.
    short = _run(_part(), [PolicySpec(name, 0.1)] * 2, [3, 40], 12, seed=5)
    assert_dense(name, short, _run(_part(), [DENSE] * 2, [3, 40], 12, seed=5))


def assert_dense(name: PolicyName, out: torch.Tensor, dense: torch.Tensor) -> None:
    """Bit for bit, except heavy_hitter: it needs the attention probabilities, so it runs the torch
    reference's arithmetic, while dense runs the numba kernel on CPU (kernels/paged_cpu.py): the same
    sums in another order, equal to fp32 rounding."""
    if name is PolicyName.HEAVY_HITTER and paged_cpu.supports(dense, dense):
        assert float((out.double() - dense.double()).norm() / dense.double().norm()) < 1e-5
    else:
        assert torch.equal(out, dense)


@pytest.mark.parametrize("name", SPARSE)
def test_sparse_budgets_read_fewer_bytes_and_mixed_batches_split_by_policy(name: PolicyName) -> None:
    lengths, steps = [300, 260], 8
    dense_part, part = _part(), _part()
    _run(dense_part, [DENSE, DENSE], lengths, steps, seed=2)
    out = _run(part, [PolicySpec(name, 0.125), DENSE], lengths, steps, seed=2)
    dense_out = _run(_part(), [DENSE, DENSE], lengths, steps, seed=2)
    # The dense sequence of the mixed batch is untouched by its neighbour's policy.
    assert torch.equal(out[:, 1], dense_out[:, 1])
    read = part.bytes_read_total()
    dense_read = dense_part.bytes_read_total()["dense"]
    per_sequence_dense = sum(2 * (260 + t + 1) * D * 4 * HKV * LAYERS for t in range(steps))
    assert read["dense"] == per_sequence_dense
    assert 0 < read[name.value] < 0.6 * (dense_read - per_sequence_dense)


def test_sink_window_reads_exactly_its_tokens() -> None:
    part = _part()
    _run(part, [PolicySpec(PolicyName.SINK_WINDOW, 0.25)], [400], 1, seed=0)
    keep = max(SINK_TOKENS + RECENT_TOKENS, -(-401 // 4))
    assert part.bytes_read_total() == {"sink_window": 2 * keep * D * 4 * HKV * LAYERS}


def test_heavy_hitter_frees_blocks_and_keeps_capacity_in_positions() -> None:
    part = _part()
    spec = PolicySpec(PolicyName.HEAVY_HITTER, 0.25)
    part.open(0, spec)
    part.reserve(0, 600)
    free_before = part.pool.allocator.num_free_blocks
    capacity = part.pool.allocator.capacity(0)
    _run_more(part, 0, 0, 400)  # prefill
    _run_more(part, 0, 400, 1)  # a decode step: it evicts after its last layer
    allocator = part.pool.allocator
    assert allocator.dropped(0) >= 400 - max(68, 101) - BS
    assert allocator.num_free_blocks > free_before  # the evicted tokens' blocks are back
    assert allocator.capacity(0) == capacity  # what the client was promised still holds
    # Blocks are held for stored tokens only: 900 positions take 150 blocks per lane, not 225.
    part.reserve(0, 900)
    assert [len(lane) for lane in allocator.block_table(0)] == [(900 - allocator.dropped(0)) // BS] * HKV
    with pytest.raises(EvictedPrefillError, match="decode rows"):
        part.begin([SeqChunk(0, 401, 5)])


def _run_more(part: LocalAttention, seq: int, start: int, n: int) -> None:
    step = part.begin([SeqChunk(seq, start, n)])
    for layer in range(LAYERS):
        step.attend(layer, torch.randn(n, HKV * G, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D))


def test_pod_engine_opens_policies_and_refuses_imports_after_eviction() -> None:
    pool = KVPool(KVPoolConfig(LAYERS, D, BS), 400)
    default = PolicySpec(PolicyName.SPARQ, 0.5)
    engine = AttentionEngine(PodGeometry(LAYERS, HKV, G, D, torch.float32), pool, default_policy=default)
    engine.open(1, 0, HKV)
    engine.open(2, 0, HKV, PolicySpec(PolicyName.HEAVY_HITTER))
    engine.open(3, 0, 1, PolicySpec(PolicyName.QUEST, 0.2))
    assert engine.policy_of(1) == default
    assert engine.policy_of(2) == PolicySpec(PolicyName.HEAVY_HITTER, 0.5)  # the pod's default budget
    assert engine.policy_of(3).budget == 0.2
    engine.reserve(2, 300)
    engine.import_kv(2, 0, 0, torch.randn(200, HKV, D), torch.randn(200, HKV, D))
    session = engine.session()
    session.begin(7, [SeqChunk(2, 200, 1)])
    for layer in range(LAYERS):
        session.layer(7, layer, torch.randn(HKV, G, D), torch.randn(HKV, D), torch.randn(HKV, D))
    assert pool.allocator.dropped(2) > 0
    assert set(engine.bytes_read_total()) == {"heavy_hitter"}
    with pytest.raises(InvalidFrameError, match="cannot be imported"):
        engine.import_kv(2, 0, 201, torch.randn(1, HKV, D), torch.randn(1, HKV, D))
    assert engine.free(2) > 0 and engine.free(2) == 0
