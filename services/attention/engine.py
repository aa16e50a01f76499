"""The attention pod's logic: sequences holding a range of KV heads, over one paged KV pool.

No network and no weights here (server.py is the gRPC edge). Lifecycle of a sequence:

    open(seq, kv_head_start, kv_head_count, policy) ─▶ reserve(seq, n)* ─▶ import_kv / steps ─▶ free(seq)

`policy` (a PolicySpec, None: the pod's default) picks the sequence's decode attention
(services/attention/policies/); prefill chunks and imported K/V are policy-free.

A step (one forward of one client) lives in a `StepSession`, one per Step stream:

    session.begin(step_id, chunks)                  # indices built once per forward
    mq, m = session.expect_layer(step_id, layer)    # lanes of the next frame, checks the order
    o = session.layer(step_id, layer, q, k, v)      # q [Mq,G,D], k/v [M,D] -> o [Mq,G,D]

Mq < M when the step has K/V-only chunks (`SeqChunk.kv_only`): the client attended them itself
and the pod only writes their K/V.

Rows travel as lanes (one KV head of one new token, see proto/disagg/v1/attention.proto), so
sequences holding different head ranges can share a step. Concurrency: gRPC runs every call on its
own thread. Bookkeeping (allocator, sequence table, a step's indices) holds one lock; per-layer
arithmetic runs outside it, since a client only touches the blocks of its own sequences.

Accounting (services/attention/costs.py, docs/cost.md): blocks held are reported to `costs` at every
Reserve and Free; a step is one compute work, busy during its layer frames, shared among its
sequences by lanes × context. `bytes_read_total()` counts, per attention policy, the K/V bytes its
steps read from the pool, where the step runs; `dense_bytes_total()` what dense attention would have
read for the same lanes (2 · context · D · itemsize per lane per layer), so savings are measured.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.attention.blocks import UnknownSequenceError
from services.attention.costs import AttentionCosts
from services.attention.kv_pool import KVPool
from services.attention.local import LocalAttention, LocalStep
from services.core.attention import DEFAULT_POLICY, OutOfBlocks, PolicySpec, ReserveResult, SeqChunk
from services.core.cost import Work
from services.core.errors import DisaggError
from services.core.model.config import ModelConfig


class SequenceExistsError(DisaggError):
    """Open of a sequence id that is already open on this pod."""


class InvalidFrameError(DisaggError):
    """A call or step frame that contradicts the protocol (head range, layer order, shapes, ids)."""


class NotReservedError(DisaggError):
    """Positions beyond what the sequence has reserved: call Reserve first."""


class TooManyStepsError(DisaggError):
    """More steps open on one stream than the pod allows (finish or abandon earlier ones)."""


class PodClosingError(DisaggError):
    """The pod is shutting down and takes no new steps; use another pod."""


@dataclass(slots=True, frozen=True)
class PodGeometry:
    """The model shapes a pod needs (no weights)."""

    num_layers: int
    num_kv_heads: int  # Hkv
    group_size: int  # G = Hq / Hkv
    head_dim: int  # D
    dtype: torch.dtype  # of the KV pool and of every q/k/v/o on the wire

    @classmethod
    def from_model(cls, config: ModelConfig, dtype: torch.dtype) -> PodGeometry:
        return cls(config.num_layers, config.num_kv_heads, config.group_size, config.head_dim, dtype)


@dataclass(slots=True, frozen=True)
class PodSequence:
    kv_head_start: int  # first of the model's KV heads held here
    kv_head_count: int  # lanes per token
    policy: PolicySpec  # resolved: the pod's defaults applied
    owner: str = ""  # the decode pod that opened it ("" = none given)


@dataclass(slots=True, frozen=True)
class PodStats:
    blocks_total: int
    blocks_free: int
    block_size: int
    sequences: int
    bytes_per_block: int  # K and V of one block over all layers

    @property
    def blocks_used(self) -> int:
        return self.blocks_total - self.blocks_free


@dataclass(slots=True, frozen=True)
class Released:
    """What a Free gave back."""

    blocks: int  # returned to the free list
    cost_usd: float  # the sequence's KV memory and compute cost on this pod since it opened


@dataclass(slots=True, frozen=True)
class StepUsage:
    """What one step's layer frames use, by sequence and by policy (the same every layer)."""

    lane_context: dict[int, int]  # seq -> Σ over its lanes of the positions attended (compute weight)
    dense_bytes: dict[str, int]  # policy -> K/V bytes dense attention reads per layer for them


class AttentionEngine:
    def __init__(
        self,
        geometry: PodGeometry,
        pool: KVPool,
        max_open_steps: int = 8,
        costs: AttentionCosts | None = None,
        default_policy: PolicySpec = DEFAULT_POLICY,
    ) -> None:
        if pool.config.num_layers != geometry.num_layers or pool.config.head_dim != geometry.head_dim:
            raise ValueError("the KV pool was sized for another model geometry")
        self.geometry = geometry
        self.pool = pool
        self.max_open_steps = max_open_steps
        self.costs = costs or AttentionCosts(0.0, 0.5, pool.allocator.num_blocks)  # unpriced
        heads = geometry.num_kv_heads
        self._lock = threading.Lock()
        self._local = LocalAttention(
            pool, heads, heads * geometry.group_size, default_policy=default_policy, lock=self._lock
        )
        self._sequences: dict[int, PodSequence] = {}
        self._closing = False
        self._bytes_dense: Counter[str] = Counter()  # policy -> what dense would have read

    # ---- sequences -----------------------------------------------------------------------------
    def open(
        self,
        seq_id: int,
        kv_head_start: int,
        kv_head_count: int,
        policy: PolicySpec | None = None,
        owner: str = "",
    ) -> None:
        heads = self.geometry.num_kv_heads
        if kv_head_count < 1 or kv_head_start < 0 or kv_head_start + kv_head_count > heads:
            raise InvalidFrameError(
                f"KV heads [{kv_head_start}, {kv_head_start + kv_head_count}) are not a non-empty range "
                f"within the model's {heads} KV heads"
            )
        with self._lock:
            if seq_id in self._sequences:
                raise SequenceExistsError(f"sequence {seq_id} is already open on this pod; free it first")
            self._local.open(seq_id, policy, num_lanes=kv_head_count)
            spec = self._local.spec(seq_id)
            self._sequences[seq_id] = PodSequence(kv_head_start, kv_head_count, spec, owner)

    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        with self._lock:
            result = self._local.reserve(seq_id, num_tokens)
            if not isinstance(result, OutOfBlocks) and result.new_blocks:
                table = self.pool.allocator.block_table(seq_id)
                self.costs.hold(seq_id, len(table) * len(table[0]))
            return result

    def free(self, seq_id: int) -> int:
        """Blocks released; unknown ids are a no-op (0)."""
        return self.release(seq_id).blocks

    def release(self, seq_id: int) -> Released:
        """Free the sequence and say what it cost here; unknown ids are a no-op (0 blocks, 0 USD)."""
        with self._lock:
            self._sequences.pop(seq_id, None)
            blocks = self._local.release(seq_id)
        return Released(blocks, self.costs.release(seq_id))

    def dense_bytes_total(self) -> dict[str, int]:
        """Policy name -> K/V bytes dense attention would have read for the same lanes since start
        (beside `bytes_read_total`: what each policy saved)."""
        with self._lock:
            return dict(self._bytes_dense)

    def owners(self) -> set[str]:
        """Owners (decode pod ids) of the open sequences; "" for sequences opened without one."""
        with self._lock:
            return {seq.owner for seq in self._sequences.values()}

    def free_owned_by(self, owner: str, free: Callable[[int], int] | None = None) -> tuple[int, int]:
        """Free every sequence of `owner` (a decode pod that went away) with `free` (default
        `self.free`; the pod passes one that waits for NIXL writes in flight); (sequences, blocks)."""
        with self._lock:
            ids = [i for i, seq in self._sequences.items() if seq.owner == owner]
        blocks = sum((free or self.free)(i) for i in ids)
        return len(ids), blocks

    def import_kv(self, seq_id: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V computed elsewhere. k, v: [T, h, D], h = the sequence's head count here."""
        self._check_layer(layer)
        bs = self.pool.block_size
        with self._lock:
            seq = self._sequence(seq_id)
            expected = (k.shape[0], seq.kv_head_count, self.geometry.head_dim)
            if tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise InvalidFrameError(
                    f"ImportKV for sequence {seq_id}: k {list(k.shape)} and v {list(v.shape)} must both be "
                    f"[T, {seq.kv_head_count}, {self.geometry.head_dim}]"
                )
            self._check_reserved(seq_id, start + k.shape[0])
            self.check_importable(seq_id)
            table = torch.tensor(self.pool.allocator.block_table(seq_id), dtype=torch.long)  # [h, n_blocks]
        positions = torch.arange(start, start + k.shape[0])  # [T]
        slots = table[:, positions // bs] * bs + positions % bs  # [h, T]
        d = self.geometry.head_dim
        with self.costs.compute.busy({seq_id: 1}):  # a KV import is the sequence's compute
            self.pool.write(layer, slots.t().reshape(-1), k.reshape(-1, d), v.reshape(-1, d))

    def stats(self) -> PodStats:
        with self._lock:
            allocator = self.pool.allocator
            return PodStats(
                blocks_total=allocator.num_blocks,
                blocks_free=allocator.num_free_blocks,
                block_size=self.pool.block_size,
                sequences=len(self._sequences),
                bytes_per_block=self.pool.config.bytes_per_block(),
            )

    def bytes_read_total(self) -> dict[str, int]:
        """K/V bytes decode attention has read from the pool since start, per policy name."""
        return self._local.bytes_read_total()

    def policy_of(self, seq_id: int) -> PolicySpec:
        with self._lock:
            return self._sequence(seq_id).policy

    def check_importable(self, seq_id: int) -> None:
        """K/V may be written from outside (ImportKV, NIXL) only before any eviction (hold the lock)."""
        dropped = self.pool.allocator.dropped(seq_id)
        if dropped:
            raise InvalidFrameError(
                f"sequence {seq_id} has evicted {dropped} tokens (heavy_hitter); its positions no longer "
                "map to blocks one to one, so K/V cannot be imported into it; free it and open it again"
            )

    def max_tokens_per_sequence(self, kv_head_count: int) -> int:
        return self.pool.allocator.num_blocks // kv_head_count * self.pool.block_size

    def session(self) -> StepSession:
        return StepSession(self)

    def close(self) -> None:
        """Refuse new steps from now on (shutdown); steps already begun may finish."""
        self._closing = True

    # ---- steps ---------------------------------------------------------------------------------
    def begin_step(self, chunks: Sequence[SeqChunk]) -> LocalStep:
        """Check the chunks (open, reserved, distinct) and build the step's indices."""
        if self._closing:
            raise PodClosingError("this attention pod is shutting down and takes no new steps")
        seen: set[int] = set()
        with self._lock:
            for chunk in chunks:
                self._sequence(chunk.seq_id)
                if chunk.seq_id in seen:
                    raise InvalidFrameError(f"sequence {chunk.seq_id} appears twice in one step")
                if chunk.start < 0 or chunk.length < 1:
                    raise InvalidFrameError(
                        f"sequence {chunk.seq_id}: chunk start {chunk.start}, length {chunk.length}; "
                        "need start >= 0 and length >= 1"
                    )
                self._check_reserved(chunk.seq_id, chunk.end)
                seen.add(chunk.seq_id)
            return self._local.begin(chunks)

    def step_usage(self, chunks: Sequence[SeqChunk]) -> StepUsage:
        """Lanes × context per sequence (compute weight, prefill chunks included) and the bytes dense
        attention would read for its decode rows, per policy, in each layer of a begun step.
        A chunk of L new tokens from position s: its lanes attend over s+1 .. s+L positions; a
        K/V-only chunk attends nowhere here and weighs its L writes per lane."""
        row_bytes = 2 * self.geometry.head_dim * self.pool.k[0].element_size()  # K and V of a position
        lane_context: dict[int, int] = {}
        dense: Counter[str] = Counter()
        with self._lock:
            for chunk in chunks:
                seq = self._sequence(chunk.seq_id)
                n = chunk.length
                if chunk.kv_only:
                    lane_context[chunk.seq_id] = seq.kv_head_count * n
                    continue
                lane_context[chunk.seq_id] = seq.kv_head_count * (n * chunk.start + n * (n + 1) // 2)
                if n == 1:  # decode rows: where policies act (prefill chunks are exact, not counted)
                    dense[seq.policy.name.value] += lane_context[chunk.seq_id] * row_bytes
        return StepUsage(lane_context, dict(dense))

    def count_layer(self, usage: StepUsage) -> None:
        """One layer of a step ran: what dense attention would have read for its lanes (the bytes
        each policy really read are counted where it runs, `bytes_read_total`)."""
        with self._lock:
            self._bytes_dense.update(usage.dense_bytes)

    def _sequence(self, seq_id: int) -> PodSequence:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise UnknownSequenceError(
                f"sequence {seq_id} is not open on this pod; call Open first"
            ) from None

    def _check_reserved(self, seq_id: int, end: int) -> None:
        capacity = self.pool.allocator.capacity(seq_id)
        if end > capacity:
            raise NotReservedError(
                f"sequence {seq_id} has reserved {capacity} positions but position {end - 1} was sent; "
                f"Reserve {end} tokens first"
            )

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.geometry.num_layers:
            raise InvalidFrameError(f"layer {layer} is outside 0..{self.geometry.num_layers - 1}")


@dataclass(slots=True)
class _OpenStep:
    local: LocalStep
    next_layer: int  # the layer the next frame must carry
    usage: StepUsage
    work: Work  # the step's compute: busy during each layer frame


class StepSession:
    """The steps open on one Step stream. Not thread-safe: one stream is read by one thread."""

    def __init__(self, engine: AttentionEngine) -> None:
        self.engine = engine
        self._steps: dict[int, _OpenStep] = {}

    def begin(self, step_id: int, chunks: Sequence[SeqChunk]) -> None:
        if not chunks:
            raise InvalidFrameError(f"step {step_id} begins with no chunks")
        if step_id in self._steps:
            raise InvalidFrameError(f"step {step_id} is already open on this stream")
        if len(self._steps) >= self.engine.max_open_steps:
            raise TooManyStepsError(
                f"{len(self._steps)} steps are already open on this stream (the limit); finish them first"
            )
        local = self.engine.begin_step(chunks)
        usage = self.engine.step_usage(chunks)
        work = self.engine.costs.compute.open(usage.lane_context)
        self._steps[step_id] = _OpenStep(local, 0, usage, work)

    def expect_layer(self, step_id: int, layer: int) -> tuple[int, int]:
        """(Mq, M): the query lanes and K/V lanes the frame for (step_id, layer) must carry (Mq < M
        when the step has kv_only chunks); checks the step and layer order."""
        step = self._steps.get(step_id)
        if step is None:
            raise InvalidFrameError(f"layer frame for step {step_id}, which is not open on this stream")
        if layer != step.next_layer:
            raise InvalidFrameError(f"step {step_id} expects layer {step.next_layer} next, got layer {layer}")
        return step.local.num_q_lanes, step.local.num_lanes

    def layer(
        self, step_id: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [Mq, G, D]; k, v: [M, D] -> o: [Mq, G, D]. The step closes after its last layer."""
        q_lanes, lanes = self.expect_layer(step_id, layer)
        geometry = self.engine.geometry
        d, g = geometry.head_dim, geometry.group_size
        if tuple(q.shape) != (q_lanes, g, d) or tuple(k.shape) != (lanes, d) or tuple(v.shape) != (lanes, d):
            raise InvalidFrameError(
                f"step {step_id} layer {layer}: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                f"must be [{q_lanes}, {g}, {d}], [{lanes}, {d}], [{lanes}, {d}]"
            )
        step = self._steps[step_id]
        with step.work:
            o = step.local.attend_lanes(layer, q, k, v)
        self.engine.count_layer(step.usage)
        step.next_layer += 1
        if step.next_layer == geometry.num_layers:
            del self._steps[step_id]
            step.work.close()
        return o

    @property
    def open_steps(self) -> int:
        return len(self._steps)

    def close(self) -> None:
        """The stream ended: steps still open are abandoned (their compute so far stays charged)."""
        for step in self._steps.values():
            step.work.close()
        self._steps.clear()
