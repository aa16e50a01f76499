"""The prefill pod's engine: batches prompts into forwards and streams their K/V to attention pods.

Lifecycle of one prompt:

    RPC thread   submit(request, is_active)   checks the prompt (stateless), queues it, or refuses:
                                              InvalidRequestError / PromptTooLongError, QueueFullError,
                                              PodClosingError
    worker       take a batch                 FIFO, up to `max_num_tokens` prompt tokens; a longer
                                              prompt (up to max_model_len) runs alone; callers that
                                              cancelled or passed their deadline are skipped
                 start exports                one ImportKV call per (prompt, pod of its placement)
                 forward                      per layer, attend = hand each prompt's k/v to its
                                              exports, then causal SDPA per prompt; the next layer
                                              computes while gRPC's threads encode and send
                 finish exports               end the streams, wait for every pod's answer
                                              (`import_timeout_s`); each prompt completes on its own:
                                              one prompt's failing pod does not fail the others
    RPC thread   job.wait()                   PrefillResult, or the prompt's error

Cost (docs/cost.md): a forward and its exports are one work on the pod's `CostMeter`, shared among
its prompts by tokens; each prompt's share travels back in its PrefillResult.

One worker thread owns the model; RPC threads only touch the queue, under a short lock. Each prompt
of a batch is its own sequence at positions 0..n-1, so the forward mixes rows of several sequences
exactly as the decode pod's chunked prefill does, and the K/V written are what a local forward
would hold. The last layer's MLP still runs (DenseModel has one forward); its output is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.attention.reference import causal_prefill_attention
from services.core.attention import AttentionStep
from services.core.cost import CostMeter
from services.core.errors import DisaggError, InvalidRequestError, PromptTooLongError
from services.core.metrics import PREFILL, PodMetrics
from services.core.model.dense import DenseModel
from services.core.placement import Placement
from services.prefill.kv_export import KVExport, KVExporter
from services.prefill.metering import PrefillMetrics

log = logging.getLogger(__name__)


class QueueFullError(DisaggError):
    """Too many prompt tokens are queued on this pod; retry later or on another prefill pod."""


class PodClosingError(DisaggError):
    """The pod is shutting down and takes no new prompts; use another prefill pod."""


class CallerGoneError(DisaggError):
    """The caller cancelled or passed its deadline while the prompt was queued; it was skipped."""


class PrefillFailedError(DisaggError):
    """The forward itself failed (a bug or out of memory); the pod's log has the traceback."""


@dataclass(slots=True, frozen=True)
class PrefillOptions:
    max_num_tokens: int = 2048  # prompt tokens per forward (a longer prompt runs alone)
    max_queued_tokens: int = 65536  # waiting + running tokens beyond which new prompts are refused
    import_timeout_s: float = 30.0  # after the forward, how long pods get to acknowledge their K/V


@dataclass(slots=True, frozen=True)
class PrefillRequest:
    seq_id: int  # the sequence's id on the attention pods (opened and reserved by the caller)
    token_ids: Sequence[int]  # positions 0..n-1
    placement: Placement
    request_id: str = ""  # for logs only


@dataclass(slots=True, frozen=True)
class PrefillResult:
    tokens: int  # positions written on every pod
    kv_bytes: int  # K and V bytes the pods acknowledged
    queue_seconds: float  # submit -> start of its forward
    compute_seconds: float  # start of its forward -> last pod's acknowledgement
    cost_usd: float = 0.0  # its share (by tokens) of the forward, exports included


@dataclass(slots=True, frozen=True)
class PrefillStats:
    queued_requests: int  # waiting or running
    queued_tokens: int
    max_num_tokens: int
    max_model_len: int
    completed: int  # prompts prefilled successfully since start
    forwards: int  # forward passes run since start
    running_requests: int = 0  # of queued_requests, those in the forward now


@dataclass(slots=True, eq=False)
class PrefillJob:
    """One queued prompt; the RPC thread waits on it, the worker completes it once."""

    request: PrefillRequest
    is_active: Callable[[], bool]  # False once the caller cancelled or its deadline passed
    submitted_at: float = field(default_factory=time.monotonic)
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _outcome: PrefillResult | DisaggError | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.request.token_ids)

    def complete(self, outcome: PrefillResult | DisaggError) -> bool:
        """First completion wins (the worker and a shutdown may race); returns whether it was this one."""
        with self._lock:
            if self._done.is_set():
                return False
            self._outcome = outcome
            self._done.set()
            return True

    def wait(self) -> PrefillResult:
        self._done.wait()
        if isinstance(self._outcome, DisaggError):
            raise self._outcome
        assert self._outcome is not None  # set before the event
        return self._outcome


class PrefillEngine:
    """Owns the model on one worker thread; `submit` from any thread."""

    def __init__(
        self,
        model: DenseModel,
        exporter: KVExporter,
        options: PrefillOptions,
        meter: CostMeter | None = None,
        metrics: PodMetrics | None = None,
    ) -> None:
        self.model = model
        self.exporter = exporter
        self.options = options
        self.meter = meter or CostMeter(0.0)  # unpriced
        self.max_model_len = model.config.max_position_embeddings
        self._waiting: deque[PrefillJob] = deque()
        self._running: list[PrefillJob] = []
        self._queued_tokens = 0  # waiting + running
        self._completed = 0
        self._forwards = 0
        self._closing = False
        self._stopped = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="prefill-worker", daemon=True)
        transport = "grpc" if exporter.nixl is None else "nixl"
        self.observe = PrefillMetrics(metrics or PodMetrics(PREFILL), transport, self.stats, self.meter)

    def start(self) -> PrefillEngine:
        self._worker.start()
        return self

    # ---- RPC threads ---------------------------------------------------------------------------
    def submit(self, request: PrefillRequest, is_active: Callable[[], bool] = lambda: True) -> PrefillJob:
        self.check_prompt(request.token_ids)
        job = PrefillJob(request, is_active)
        with self._cond:
            if self._closing:
                raise PodClosingError("this prefill pod is shutting down; send the prompt to another one")
            queued = self._queued_tokens
            if queued and queued + job.num_tokens > self.options.max_queued_tokens:
                raise QueueFullError(
                    f"{queued} prompt tokens are queued on this prefill pod and {job.num_tokens} more would "
                    f"pass its limit of {self.options.max_queued_tokens}; retry later or use another pod"
                )
            self._queued_tokens += job.num_tokens
            self._waiting.append(job)
            self._cond.notify()
        return job

    def check_prompt(self, token_ids: Sequence[int]) -> None:
        """Length first, so nothing is built from a prompt longer than the model takes."""
        n, vocab = len(token_ids), self.model.config.vocab_size
        if n == 0:
            raise InvalidRequestError("the prompt has no tokens; send at least one token id", "token_ids")
        if n > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but this model takes at most {self.max_model_len}; shorten it",
                "token_ids",
            )
        largest = max(token_ids)
        if largest >= vocab:
            raise InvalidRequestError(
                f"token id {largest} (position {list(token_ids).index(largest)}) is outside the "
                f"vocabulary of {vocab} tokens",
                "token_ids",
            )

    def stats(self) -> PrefillStats:
        with self._cond:
            return PrefillStats(
                queued_requests=len(self._waiting) + len(self._running),
                queued_tokens=self._queued_tokens,
                max_num_tokens=self.options.max_num_tokens,
                max_model_len=self.max_model_len,
                completed=self._completed,
                forwards=self._forwards,
                running_requests=len(self._running),
            )

    # ---- shutdown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Refuse new prompts; queued and running ones go on."""
        with self._cond:
            self._closing = True

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the queue to empty; returns whether it did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._queued_tokens == 0, timeout_s)

    def stop(self) -> None:
        """Fail whatever is still queued or running with PodClosingError and end the worker."""
        with self._cond:
            self._closing = self._stopped = True
            leftover = [*self._waiting, *self._running]
            self._waiting.clear()
            self._running = []
            self._queued_tokens = 0
            self._cond.notify_all()
        for job in leftover:
            job.complete(PodClosingError("this prefill pod shut down before the prompt was done; retry"))
        self.exporter.close()

    # ---- worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._prefill(batch)
            except Exception as exc:  # a bug or OOM: fail this batch, keep the pod serving
                log.exception("prefill forward over %d prompts failed", len(batch))
                error = PrefillFailedError(f"the prefill forward failed: {type(exc).__name__}: {exc}")
                for job in batch:
                    self._settle(job, error)  # a no-op for prompts already settled

    def _next_batch(self) -> list[PrefillJob] | None:
        """FIFO up to max_num_tokens; the first prompt always goes, however long."""
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._waiting or self._stopped)
                if self._stopped:
                    return None
                batch: list[PrefillJob] = []
                tokens = 0
                while self._waiting:
                    job = self._waiting[0]
                    if batch and tokens + job.num_tokens > self.options.max_num_tokens:
                        break
                    self._waiting.popleft()
                    if not job.is_active():
                        self._queued_tokens -= job.num_tokens
                        job.complete(CallerGoneError("the caller went away while the prompt was queued"))
                        continue
                    batch.append(job)
                    tokens += job.num_tokens
                if batch:
                    self._running = list(batch)  # settled prompts leave it one by one
                    self._forwards += 1
                    return batch
                self._cond.notify_all()  # drain() may be waiting for an empty queue

    def _settle(self, job: PrefillJob, outcome: PrefillResult | DisaggError) -> None:
        """Complete a running prompt with its cost and take it off the load (unless `stop` got
        there first). A failed prompt's cost stays unattributed (counted as request cost here)."""
        cost = self.meter.take(job)
        if isinstance(outcome, PrefillResult):
            outcome = dataclasses.replace(outcome, cost_usd=cost)
        self.observe.prompt(outcome)
        if not job.complete(outcome):
            return
        with self._cond:
            self._running.remove(job)
            self._queued_tokens -= job.num_tokens
            self._completed += isinstance(outcome, PrefillResult)
            self._cond.notify_all()  # drain() may be waiting for an empty queue

    def _prefill(self, batch: list[PrefillJob]) -> None:
        started = time.monotonic()
        with self.meter.busy({job: job.num_tokens for job in batch}):
            exports = self._forward(batch)
            deadline = time.monotonic() + self.options.import_timeout_s
            outcomes = [
                self._finish_export(job, export, started, deadline)
                for job, export in zip(batch, exports, strict=True)
            ]
        self.observe.forward(time.monotonic() - started)
        for job, outcome in zip(batch, outcomes, strict=True):
            self._complete(job, outcome, started)

    def _forward(self, batch: list[PrefillJob]) -> list[KVExport]:
        """Start each prompt's export and run the forward; on failure the exports are cancelled."""
        lengths = [job.num_tokens for job in batch]
        device = self.model.device
        exports: list[KVExport] = []
        try:
            for job in batch:  # appended one by one, so a failing start cancels those before it
                exports.append(self.exporter.start(job.request.seq_id, job.request.placement, job.num_tokens))
            tokens = torch.tensor([t for job in batch for t in job.request.token_ids], device=device)  # [N]
            positions = torch.cat([torch.arange(n, device=device) for n in lengths])  # [N], each from 0
            self.model.forward(
                tokens, positions, PrefillStep(lengths, exports, self.model.config.head_dim**-0.5)
            )
        except Exception:
            for export in exports:  # the pods drop the half-written sequences' calls
                export.cancel()
            raise
        return exports

    def _finish_export(
        self, job: PrefillJob, export: KVExport, started: float, deadline: float
    ) -> PrefillResult | DisaggError:
        """Wait for every pod's acknowledgement of the prompt's K/V (cost added at `_settle`)."""
        request = job.request
        try:
            kv_bytes = export.finish(deadline)
        except DisaggError as exc:
            log.warning(
                "prefill of sequence %d (request %r) failed: %s", request.seq_id, request.request_id, exc
            )
            return exc
        seconds = time.monotonic() - started
        self.observe.exported(kv_bytes, seconds)
        return PrefillResult(job.num_tokens, kv_bytes, started - job.submitted_at, seconds)

    def _complete(self, job: PrefillJob, outcome: PrefillResult | DisaggError, started: float) -> None:
        self._settle(job, outcome)
        if not isinstance(outcome, PrefillResult):
            return
        request, result, kv_bytes = job.request, outcome, outcome.kv_bytes
        log.info(
            "prefilled sequence %d (request %r): %d tokens, %.1f KiB of K/V, queued %.3f s, compute %.3f s",
            request.seq_id,
            request.request_id,
            result.tokens,
            kv_bytes / 1024,
            result.queue_seconds,
            result.compute_seconds,
        )


class PrefillStep(AttentionStep):
    """One forward over whole prompts, each its own sequence at positions 0..n-1.

    Rows are prompt after prompt; `attend` hands each prompt's rows of k_new/v_new to its export
    first (queue puts: the sends overlap the attention below and the rest of the layer), then
    attends each prompt causally over its own keys.
    """

    def __init__(self, lengths: Sequence[int], exports: Sequence[KVExport], scale: float) -> None:
        self.bounds: list[tuple[int, int]] = []  # [lo, hi) rows of each prompt
        lo = 0
        for n in lengths:
            self.bounds.append((lo, lo + n))
            lo += n
        self.exports = exports
        self.scale = scale

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """q [N,Hq,D], k_new/v_new [N,Hkv,D] -> o [N,Hq,D]."""
        for (lo, hi), export in zip(self.bounds, self.exports, strict=True):
            export.send_layer(layer, k_new[lo:hi], v_new[lo:hi])  # [T, Hkv, D] each
        if len(self.bounds) == 1:
            return self._causal(q, k_new, v_new)
        out = torch.empty_like(q)
        for lo, hi in self.bounds:
            out[lo:hi] = self._causal(q[lo:hi], k_new[lo:hi], v_new[lo:hi])
        return out

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T,Hq,D], k/v [T,Hkv,D] of one prompt -> o [T,Hq,D]."""
        return causal_prefill_attention(q, k.transpose(0, 1), v.transpose(0, 1), 0, self.scale)
