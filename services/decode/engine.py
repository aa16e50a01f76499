"""The engine: continuous batching over the dense part and an attention part.

    engine.add_request(prompt_ids, params)      # any time between steps
    while engine.has_work():
        events = engine.step()                  # schedule -> forward -> sample -> update

One `step` is one forward pass over the scheduler's rows (decode rows and prefill chunks together).
Requests join and leave between steps; `abort` frees a request's KV at once. Text (incremental
detokenization and stop strings) is produced here so that every serving path streams the same text.

Remote prefill (a prefill pod computes the prompt's K/V, docs/architecture.md):

    engine.open_for_prefill(seq_id, len(prompt))      # open on the attention part, room for the prompt
    ... the prefill pod writes positions [0, n-1) ...
    engine.add_request(prompt, params, seq_id, prefilled=n - 1)   # first forward: the last token
    # or, when the prefill failed or was cancelled:  engine.free_prefill(seq_id)

Attention pod failures: when `step` raises `AttentionPodError`, `fail_pod` ends the requests with
KV on that pod (the others are untouched) and the next `step` runs the same rows for the rest —
nothing advanced, and K/V are written at explicit positions, so running them again is harmless.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from services.core.attention import AttentionPart, OutOfBlocks, PolicySpec
from services.core.cost import RequestCost
from services.core.model.dense import DenseModel, MicroBatchInput
from services.core.model.tokenizer import TextStream, Tokenizer
from services.decode.attention_link import AttentionPodError
from services.decode.metering import StepMeter, StepTiming
from services.decode.sampling import SamplingParams, sample
from services.decode.scheduler import (
    FinishReason,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    Sequence,
)

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """One generated token of one request (or its end without a token, after an abort)."""

    seq_id: int
    token_id: int | None  # None only for an abort
    text: str  # text that became final with this token (may be empty: held back or partial UTF-8)
    finish_reason: FinishReason | None  # set on the request's last event
    cost: RequestCost | None = None  # on the last event, from backends that account cost


@dataclass(slots=True, frozen=True)
class Completion:
    seq_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated, including a final EOS if one was produced
    text: str
    finish_reason: FinishReason


@runtime_checkable
class PodPlacements(Protocol):
    """An attention part whose sequences live on attention pods (RemoteAttention) says which."""

    def placed_on(self, seq_id: int, address: str) -> bool:
        """True when pod `address` holds (or will hold, once opened) KV heads of sequence `seq_id`."""
        ...


@runtime_checkable
class PodGroups(Protocol):
    """An attention part that can say which pods hold an open sequence (to group micro-batches)."""

    def pods_of(self, seq_id: int) -> tuple[str, ...]:
        """The pods holding the KV heads of an open sequence, sorted."""
        ...


@dataclass(slots=True)
class _Request:
    seq: Sequence
    text: TextStream
    generator: torch.Generator
    stop_ids: frozenset[int]


class Engine:
    def __init__(
        self,
        model: DenseModel,
        attention: AttentionPart,
        tokenizer: Tokenizer,
        config: SchedulerConfig | None = None,
        micro_batches: int = 1,
        meter: StepMeter | None = None,
        micro_batch_min_context: int = 0,
    ) -> None:
        """`micro_batches` > 1 splits each forward into ping-pong micro-batches (dense.py), which
        pays off only when the attention part computes elsewhere (attention pods), and only for
        forwards whose rows attend over `micro_batch_min_context` positions or more on average
        (`micro_batch_count`). `meter` prices each step and times its phases
        (services/decode/metering.py)."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if micro_batch_min_context < 0:
            raise ValueError(f"micro_batch_min_context must be >= 0, got {micro_batch_min_context}")
        self.micro_batches = micro_batches
        self.micro_batch_min_context = micro_batch_min_context
        self.model = model
        self.attention = attention
        self.tokenizer = tokenizer
        self.config = config or SchedulerConfig(max_model_len=model.config.max_position_embeddings)
        self.scheduler = Scheduler(attention, self.config)
        self.meter = meter or StepMeter()
        self.max_len = min(self.config.max_model_len, attention.max_tokens_per_sequence())
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise PromptTooLongError if the prompt can never run here; touches no state."""
        self.scheduler.check_prompt(len(prompt_ids))

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        seq_id: int | None = None,
        prefilled: int = 0,
    ) -> int:
        """Queue a request; returns its sequence id.

        `prefilled > 0`: the caller guarantees that the attention part already has the sequence
        open (`open_for_prefill`) with the K/V of positions [0, prefilled) written, so its first
        forward is only the remaining prompt tokens (normally just the last one, whose logits give
        the first generated token here, with the request's own sampler).
        """
        seq = Sequence(
            next(self._ids) if seq_id is None else seq_id,
            list(prompt_ids),
            params,
            num_computed=prefilled,
            kv_open=prefilled > 0,
        )
        self.scheduler.add(seq)  # raises PromptTooLongError before anything is kept
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        )
        stream = TextStream(self.tokenizer, seq.prompt_ids, params.stop)
        self._requests[seq.seq_id] = _Request(seq, stream, params.generator(self.model.device), stop_ids)
        return seq.seq_id

    def abort(self, seq_id: int) -> TokenEvent | None:
        """Cancel a request and free its KV now; returns its final event, or None if already done."""
        request = self._requests.pop(seq_id, None)
        if request is None:
            return None
        self.scheduler.finish(request.seq, FinishReason.ABORT)
        return TokenEvent(seq_id, None, "", FinishReason.ABORT)

    def abort_all(self) -> list[TokenEvent]:
        """Abort every request (shutdown): their KV is freed, which matters when it lives on pods."""
        return [event for seq_id in list(self._requests) if (event := self.abort(seq_id))]

    def open_for_prefill(self, seq_id: int, num_tokens: int, policy: PolicySpec | None = None) -> bool:
        """Open `seq_id` on the attention part with room for `num_tokens` positions (the whole
        prompt), for a prefill computed elsewhere. False when the KV has no room now: nothing is
        kept, and the request is better queued here (`add_request`), where it waits for room."""
        self.attention.open(seq_id, policy)
        try:
            result = self.attention.reserve(seq_id, num_tokens)
        except Exception:
            self.attention.free(seq_id)
            raise
        if isinstance(result, OutOfBlocks):
            self.attention.free(seq_id)
            return False
        return True

    def free_prefill(self, seq_id: int) -> None:
        """Drop a sequence opened by `open_for_prefill` that will not join (its prefill failed or
        the request was cancelled meanwhile)."""
        self.attention.free(seq_id)

    def fail_pod(self, error: AttentionPodError) -> list[int]:
        """End every request with KV on the pod that failed; returns their sequence ids.

        Their KV is freed (on the failed pod that is only logged). Raises `error` again when the
        attention part cannot say where sequences live, or no request is on that pod: then ending
        requests cannot help, and retrying would fail the same way.
        """
        if not isinstance(self.attention, PodPlacements):
            raise error
        placements = self.attention
        failed = [seq_id for seq_id in self._requests if placements.placed_on(seq_id, error.address)]
        if not failed:
            raise error
        log.warning("attention pod %s failed; ending its %d requests: %s", error.address, len(failed), error)
        for seq_id in failed:
            self.scheduler.finish(self._requests.pop(seq_id).seq, FinishReason.ABORT)
        return failed

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        with self.meter.step(plan.scheduled, self.attention) as timing:
            sampled = self._forward(plan, timing)
        self.scheduler.update(plan, sampled)
        return [self._after_token(self._requests[seq_id], token) for seq_id, token in sampled.items()]

    def generate(self, prompts: Iterable[list[int]], params: SamplingParams) -> list[Completion]:
        """Run requests to completion together (continuous batching); results in input order."""
        ids = [self.add_request(p, params) for p in prompts]
        done: dict[int, Completion] = {}
        seqs = {i: self._requests[i].seq for i in ids}
        texts: dict[int, list[str]] = {i: [] for i in ids}
        while self.has_work():
            for event in self.step():
                texts[event.seq_id].append(event.text)
                if event.finish_reason is not None:
                    seq = seqs[event.seq_id]
                    text = "".join(texts[event.seq_id])
                    done[event.seq_id] = Completion(
                        seq.seq_id, seq.prompt_ids, seq.output_ids, text, event.finish_reason
                    )
        return [done[i] for i in ids]

    def _forward(self, plan: SchedulerOutput, timing: StepTiming) -> dict[int, int]:
        """Run the model over the plan's rows; sample for rows that complete their sequence."""
        device = self.model.device
        items = plan.scheduled
        count = micro_batch_count(items, self.micro_batches, self.micro_batch_min_context)
        if count > 1 and isinstance(pods := self.attention, PodGroups):
            # Sequences of the same pods side by side: micro-batches then tend to follow pods, so
            # under request placement each talks to fewer pods (fewer frames per layer).
            items = sorted(items, key=lambda item: pods.pods_of(item.seq.seq_id))
        batches = []
        for group in split_micro_batches(items, count):
            tokens = [item.seq.token_at(p) for item in group for p in range(item.chunk.start, item.chunk.end)]
            positions = [p for item in group for p in range(item.chunk.start, item.chunk.end)]
            batches.append(
                MicroBatchInput(
                    torch.tensor(tokens, dtype=torch.long, device=device),
                    torch.tensor(positions, dtype=torch.long, device=device),
                    self.attention.begin([item.chunk for item in group]),
                )
            )
        hidden = torch.cat(self.model.forward_micro_batches(batches))  # [N, d], rows in `items` order
        timing.dense_done()
        last_rows, sampling = [], []
        row = 0
        for item in items:
            row += item.chunk.length
            if item.samples:
                last_rows.append(row - 1)
                sampling.append(self._requests[item.seq.seq_id])
        if not sampling:
            return {}
        logits = self.model.logits(hidden[torch.tensor(last_rows, device=device)])  # [M, V]
        ids = sample(logits, [r.seq.params for r in sampling], [r.generator for r in sampling])
        return {r.seq.seq_id: token for r, token in zip(sampling, ids, strict=True)}

    def _after_token(self, request: _Request, token: int) -> TokenEvent:
        """Detokenize, then apply the stop rules in OpenAI's order: stop token, stop string, length."""
        seq = request.seq
        delta = request.text.push(token)
        reason: FinishReason | None = None
        if token in request.stop_ids or delta.stopped:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_len:
            reason = FinishReason.LENGTH
        text = delta.text
        if reason is not None:
            if not delta.stopped:
                text += request.text.flush()
            self.scheduler.finish(seq, reason)
            del self._requests[seq.seq_id]
        return TokenEvent(seq.seq_id, token, text, reason)


MIN_ROWS_PER_MICRO_BATCH = 2  # a lone row per micro-batch: its weights are read twice for nothing


def micro_batch_count(items: list[ScheduledChunk], count: int, min_context: int) -> int:
    """`count` when the forward's rows attend over at least `min_context` positions on average,
    else 1. A row's attention work grows with its context and its dense work does not: below the
    threshold the attention pods answer a micro-batch before the dense part of the next could hide
    it, and splitting only adds a round trip per layer and halves the matmuls (measured on 2 shared
    cores: bench/RESULTS.md, issue-4 notes)."""
    if count <= 1 or min_context <= 0:
        return count
    rows = sum(item.chunk.length for item in items)
    # Row at position p attends over p + 1 positions; a chunk [s, e) sums them in closed form.
    attended = sum(
        (item.chunk.end * (item.chunk.end + 1) - item.chunk.start * (item.chunk.start + 1)) // 2
        for item in items
    )
    return count if rows and attended >= min_context * rows else 1


def split_micro_batches(items: list[ScheduledChunk], count: int) -> list[list[ScheduledChunk]]:
    """Cut a forward's chunks, in order, into at most `count` groups of about equal token counts
    (a chunk is never split, so the groups' rows concatenate back in plan order). Fewer groups
    when the forward is too small for each to hold MIN_ROWS_PER_MICRO_BATCH rows."""
    total = sum(item.chunk.length for item in items)
    count = max(1, min(count, len(items), total // MIN_ROWS_PER_MICRO_BATCH))
    groups: list[list[ScheduledChunk]] = [[]]
    done = 0  # tokens in the groups so far
    for item in items:
        # Close the open group when adding the chunk overshoots its share more than stopping short.
        target = total * len(groups) / count
        if groups[-1] and len(groups) < count and done + item.chunk.length - target > target - done:
            groups.append([])
        groups[-1].append(item)
        done += item.chunk.length
    return groups
