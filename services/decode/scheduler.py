"""Continuous-batching scheduler: which tokens of which sequences run in the next forward.

Pure logic — no torch, no model. Each step:

    running (oldest first): one decode row each, or the next chunk of an unfinished prefill
    waiting (FIFO):         admitted while the token budget, the sequence limit and KV allow

KV comes from a `KVSpace` (the attention part). When a running sequence cannot grow, the newest
running sequence is preempted: its KV is freed and it goes back to the head of the queue, to be
recomputed from prompt + generated tokens later (vLLM's recompute preemption). When a waiting
sequence does not fit, it simply waits. A prompt too large for the whole pool is rejected up front.

A sequence samples a token whenever a forward completes all of its known tokens (end of prefill, or
a decode row); `update` appends it.

A *prefilled* sequence arrives with the K/V of its first `num_computed` prompt positions already in
the attention part (a prefill pod wrote them) and its KV open: its first forward is just the rest
of the prompt (normally the last prompt token). It joins the queue ahead of sequences holding no KV:
it needs no new blocks to start, and running it is what gives its blocks back, so it can never be
stuck behind a sequence waiting for those very blocks. Preempted, it is recomputed from position 0
like any other sequence.

If the forward fails, `update` is not called: nothing advances, and the next `schedule` plans the
same rows again (K/V are written at explicit positions, so re-running them is harmless).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from services.core.attention import OutOfBlocks, PolicySpec, ReserveResult, SeqChunk
from services.core.errors import PromptTooLongError
from services.decode.sampling import SamplingParams


class KVSpace(Protocol):
    def open(self, seq_id: int, policy: PolicySpec | None = None) -> None: ...
    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult: ...
    def free(self, seq_id: int) -> None: ...
    def max_tokens_per_sequence(self) -> int: ...


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the client or the operator


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    kv_open: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]


@dataclass(slots=True, frozen=True)
class ScheduledChunk:
    seq: Sequence
    chunk: SeqChunk  # positions computed in this forward
    samples: bool  # this forward completes the sequence's known tokens: sample the next one


@dataclass(slots=True, frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledChunk]  # rows of the forward, in order
    preempted: list[Sequence]  # sent back to the queue during this call

    @property
    def num_tokens(self) -> int:
        return sum(s.chunk.length for s in self.scheduled)


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one forward
    max_num_batched_tokens: int = 512  # new tokens in one forward (bounds a prefill chunk)
    max_model_len: int = 8192  # prompt + generated tokens at most

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs so every decode row fits a step")


class Scheduler:
    def __init__(self, kv: KVSpace, config: SchedulerConfig) -> None:
        self.kv = kv
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start; exported as a metric by the services

    def check_prompt(self, num_tokens: int) -> None:
        limit = min(self.config.max_model_len, self.kv.max_tokens_per_sequence())
        if num_tokens >= limit:
            raise PromptTooLongError(
                f"the prompt has {num_tokens} tokens but at most {limit - 1} fit "
                "(context window or KV pool); shorten the prompt",
                "prompt",
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence: FIFO, except that prefilled ones (holding KV) go ahead of the rest."""
        self.check_prompt(len(seq.prompt_ids))
        if seq.num_computed == 0:
            self.waiting.append(seq)
            return
        if not seq.kv_open or seq.num_computed >= len(seq.prompt_ids):
            raise ValueError(
                f"sequence {seq.seq_id}: a prefilled sequence has its KV open and at least its last "
                f"prompt token still to run (num_computed {seq.num_computed}, prompt {len(seq.prompt_ids)})"
            )
        first_without_kv = next((i for i, s in enumerate(self.waiting) if s.num_computed == 0), None)
        self.waiting.insert(len(self.waiting) if first_without_kv is None else first_without_kv, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            length = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow_or_preempt(seq, seq.num_computed + length, preempted):
                continue
            scheduled.append(self._chunk(seq, length))
            budget -= length
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            length = min(seq.num_tokens - seq.num_computed, budget)
            if not seq.kv_open:
                self.kv.open(seq.seq_id, seq.params.attention_policy)
                seq.kv_open = True
            if isinstance(self.kv.reserve(seq.seq_id, seq.num_computed + length), OutOfBlocks):
                break  # it waits for blocks to come back
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._chunk(seq, length))
            budget -= length
        return SchedulerOutput(scheduled, preempted)

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Record a finished forward: computed positions advance, sampled tokens are appended."""
        for item in output.scheduled:
            item.seq.num_computed = item.chunk.end
            if item.samples:
                item.seq.output_ids.append(sampled[item.seq.seq_id])

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Stop a sequence now and free its KV (also used for cancellation)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _chunk(self, seq: Sequence, length: int) -> ScheduledChunk:
        chunk = SeqChunk(seq.seq_id, seq.num_computed, length)
        return ScheduledChunk(seq, chunk, samples=chunk.end == seq.num_tokens)

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Reserve room for `seq`, preempting the newest running sequences until it fits."""
        while isinstance(self.kv.reserve(seq.seq_id, num_tokens), OutOfBlocks):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.kv_open:
            self.kv.free(seq.seq_id)
            seq.kv_open = False
