"""Scheduler decisions on a real (tiny) KV pool; no model, milliseconds."""

from __future__ import annotations

import pytest

from services.attention.kv_pool import KVPool, KVPoolConfig
from services.attention.local import LocalAttention
from services.core.errors import PromptTooLongError
from services.decode.sampling import SamplingParams
from services.decode.scheduler import FinishReason, Scheduler, SchedulerConfig, SeqStatus, Sequence


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **config: int) -> tuple[Scheduler, KVPool]:
    pool = KVPool(KVPoolConfig(num_layers=1, head_dim=2, block_size=block_size), num_blocks)
    kv = LocalAttention(pool, num_kv_heads=1, num_heads=1)
    return Scheduler(kv, SchedulerConfig(**config)), pool


def seq(seq_id: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id, list(range(prompt_len)), SamplingParams(max_tokens=100))


def run_step(s: Scheduler) -> list[tuple[int, int, int, bool]]:
    """Schedule, pretend the forward ran and sampled token 7; return (seq, start, length, samples)."""
    out = s.schedule()
    s.update(out, {i.seq.seq_id: 7 for i in out.scheduled if i.samples})
    return [(i.seq.seq_id, i.chunk.start, i.chunk.length, i.samples) for i in out.scheduled]


def test_long_prompt_is_chunked_and_decode_rows_come_first() -> None:
    s, _ = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    s.add(seq(0, 3))
    s.add(seq(1, 13))
    assert run_step(s) == [(0, 0, 3, True), (1, 0, 5, False)]
    assert run_step(s) == [(0, 3, 1, True), (1, 5, 7, False)]
    assert run_step(s) == [(0, 4, 1, True), (1, 12, 1, True)]
    assert run_step(s) == [(0, 5, 1, True), (1, 13, 1, True)]


def test_max_num_seqs_limits_the_batch_and_fifo_admits_later() -> None:
    s, _ = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(3):
        s.add(seq(i, 2))
    assert [r[0] for r in run_step(s)] == [0, 1]
    s.finish(s.running[0], FinishReason.STOP)
    assert [r[0] for r in run_step(s)] == [1, 2]


def test_waiting_request_queues_when_blocks_run_out() -> None:
    s, pool = make_scheduler(num_blocks=4, block_size=4)
    s.add(seq(0, 12))  # 3 blocks
    s.add(seq(1, 8))  # 2 blocks: does not fit next to 0
    assert [r[0] for r in run_step(s)] == [0]
    assert [x.seq_id for x in s.waiting] == [1]
    s.finish(s.running[0], FinishReason.STOP)
    assert pool.allocator.num_free_blocks == 4
    assert [r[0] for r in run_step(s)] == [1]


def test_newest_running_sequence_is_preempted_and_recomputed() -> None:
    s, pool = make_scheduler(num_blocks=4, block_size=4)
    s.add(seq(0, 7))
    s.add(seq(1, 8))
    run_step(s)  # 0 holds 2 blocks (7 tokens), 1 holds 2 blocks; 0 sampled its 8th token
    assert pool.allocator.num_free_blocks == 0
    out = s.schedule()  # 0 needs position 8 -> a third block -> 1 is preempted
    assert [x.seq_id for x in out.preempted] == [1]
    assert [i.seq.seq_id for i in out.scheduled] == [0]
    victim = s.waiting[0]
    assert victim.status is SeqStatus.WAITING and victim.num_computed == 0 and victim.output_ids == [7]
    s.update(out, {0: 7})
    s.finish(s.running[0], FinishReason.STOP)
    # Recompute: prompt + the token generated before preemption, then sample again.
    assert run_step(s) == [(1, 0, 9, True)]


def test_a_sequence_that_outgrows_the_pool_preempts_itself() -> None:
    s, _ = make_scheduler(num_blocks=2, block_size=4)
    s.add(seq(0, 7))
    run_step(s)
    run_step(s)  # 9 tokens now: the next decode row needs a third block of a 2-block pool
    out = s.schedule()
    assert out.scheduled == [] and [x.seq_id for x in out.preempted] == [0]


def test_prompt_longer_than_the_window_or_pool_is_rejected() -> None:
    s, _ = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(PromptTooLongError, match="at most 15"):
        s.add(seq(0, 16))
    s2, _ = make_scheduler(num_blocks=100, max_model_len=10)
    with pytest.raises(PromptTooLongError, match="at most 9"):
        s2.add(seq(0, 10))


def test_finish_frees_kv_of_waiting_and_running_sequences() -> None:
    s, pool = make_scheduler(num_blocks=8, max_num_seqs=1)
    a, b = seq(0, 5), seq(1, 5)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(b, FinishReason.ABORT)
    s.finish(a, FinishReason.ABORT)
    assert not s.has_work() and pool.allocator.num_free_blocks == 8
    assert a.finish_reason is FinishReason.ABORT


def test_config_rejects_a_budget_smaller_than_the_batch() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)


# ---- prefilled admission (a prefill pod wrote the prompt's KV) ----------------------------------
def prefilled(s: Scheduler, seq_id: int, prompt_len: int) -> Sequence:
    """A sequence whose first prompt_len - 1 positions are in the KV already, as after a remote prefill."""
    s.kv.open(seq_id)
    s.kv.reserve(seq_id, prompt_len)
    sequence = Sequence(
        seq_id,
        list(range(prompt_len)),
        SamplingParams(max_tokens=100),
        num_computed=prompt_len - 1,
        kv_open=True,
    )
    s.add(sequence)
    return sequence


def test_a_prefilled_sequence_runs_only_its_last_prompt_token() -> None:
    s, pool = make_scheduler(num_blocks=16, block_size=4)
    prefilled(s, 0, 10)
    used = pool.allocator.num_used_blocks
    assert run_step(s) == [(0, 9, 1, True)]
    assert run_step(s) == [(0, 10, 1, True)]
    assert pool.allocator.num_used_blocks == used  # 11 positions fit the 3 blocks reserved for 10


def test_prefilled_sequences_go_ahead_of_those_without_kv_in_arrival_order() -> None:
    s, _ = make_scheduler(num_blocks=64, max_num_seqs=8)
    s.add(seq(0, 3))
    prefilled(s, 1, 5)
    prefilled(s, 2, 5)
    assert [x.seq_id for x in s.waiting] == [1, 2, 0]
    assert run_step(s) == [(1, 4, 1, True), (2, 4, 1, True), (0, 0, 3, True)]


def test_a_prefilled_sequence_is_not_stuck_behind_one_waiting_for_its_blocks() -> None:
    """The pool is full of a prefilled sequence's KV: admitting it first is what frees the blocks."""
    s, pool = make_scheduler(num_blocks=3, block_size=4)
    s.add(seq(0, 8))  # needs 2 blocks; only 1 is free once 1 holds its 2
    first = prefilled(s, 1, 8)
    assert run_step(s) == [(1, 7, 1, True)]
    s.finish(first, FinishReason.STOP)
    assert pool.allocator.num_free_blocks == 3
    assert run_step(s) == [(0, 0, 8, True)]


def test_a_preempted_prefilled_sequence_is_recomputed_from_position_zero() -> None:
    s, pool = make_scheduler(num_blocks=4, block_size=4)
    s.add(seq(0, 7))
    run_step(s)  # 0 holds 2 blocks
    prefilled(s, 1, 8)  # 1 holds 2 blocks: the pool is full
    assert run_step(s) == [(0, 7, 1, True), (1, 7, 1, True)]  # neither needs a new block yet
    out = s.schedule()  # 0 needs a third block for position 8: 1, the newest, is preempted
    preempted = [x.seq_id for x in out.preempted]
    assert preempted == [1]
    victim = s.waiting[0]
    assert victim.num_computed == 0 and not victim.kv_open and len(victim.output_ids) == 1
    s.update(out, {0: 7})
    s.finish(s.running[0], FinishReason.STOP)
    assert run_step(s) == [(1, 0, 9, True)]  # prompt + its first token, computed here
    assert pool.allocator.num_used_blocks == 3


def test_prefilled_sequences_must_hold_kv_and_leave_a_token_to_run() -> None:
    s, _ = make_scheduler()
    with pytest.raises(ValueError, match="prefilled"):
        s.add(Sequence(0, [1, 2, 3], SamplingParams(), num_computed=2, kv_open=False))
    s.kv.open(1)
    with pytest.raises(ValueError, match="prefilled"):
        s.add(Sequence(1, [1, 2, 3], SamplingParams(), num_computed=3, kv_open=True))


def test_a_failed_forward_is_planned_again_unchanged() -> None:
    """The engine does not call update when the forward raises: the next plan is the same rows."""
    s, _ = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    s.add(seq(0, 3))
    s.add(seq(1, 13))
    plan = [(i.seq.seq_id, i.chunk.start, i.chunk.length, i.samples) for i in s.schedule().scheduled]
    assert run_step(s) == plan == [(0, 0, 3, True), (1, 0, 5, False)]
