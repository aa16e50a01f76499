"""In-process attention part: the KV pool and its attention in the caller's process.

Used by the colocated engine and by tests; attention pods wrap the same pool behind gRPC, so a
policy behaves the same in `disagg generate`, `disagg up --colocated` and the cluster.

Each sequence is opened with a `PolicySpec` (None: the part's default). Prefill chunks are exact
causal attention; decode rows go to their policy (services/attention/policies/): a step groups its
decode lanes by policy and budget, and each group is one vectorized `PolicyStep`. Bytes each policy reads are
summed per policy name (`bytes_read_total`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from services.attention.kv_pool import KVPool
from services.attention.policies import POLICIES, AttentionPolicy, DecodeLane, PolicyStep
from services.attention.reference import causal_prefill_attention
from services.core.attention import (
    DEFAULT_POLICY,
    AttentionPart,
    AttentionStep,
    PolicyName,
    PolicySpec,
    ReserveResult,
    SeqChunk,
)
from services.core.errors import DisaggError


class EvictedPrefillError(DisaggError):
    """A multi-token chunk (or imported K/V) for a sequence heavy_hitter has already evicted from."""


class LocalAttention(AttentionPart):
    """Holds every KV head of every sequence (request-partitioned placement on one device).

    `lock` guards the allocator when a policy frees blocks in the middle of a step (heavy_hitter);
    an attention pod passes the lock its own bookkeeping holds. `default_policy` serves sequences
    opened without one, and its budget is the budget of a policy named without one.
    """

    def __init__(
        self,
        pool: KVPool,
        num_kv_heads: int,
        num_heads: int,
        default_policy: PolicySpec = DEFAULT_POLICY,
        lock: threading.Lock | None = None,
    ) -> None:
        if default_policy.budget is None:
            raise ValueError("the default attention policy needs a budget (it is the default budget too)")
        self.pool = pool
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.scale = pool.config.head_dim**-0.5
        self.default_policy = default_policy
        self.default_budget: float = default_policy.budget
        self.lock = lock or threading.Lock()
        self._specs: dict[int, PolicySpec] = {}
        self._policies: dict[PolicyName, AttentionPolicy] = {}
        self._bytes: dict[PolicySpec, int] = {}  # by the spec a step's group ran
        self._bytes_lock = threading.Lock()

    def open(self, seq_id: int, policy: PolicySpec | None = None, num_lanes: int | None = None) -> None:
        """Start an empty sequence holding `num_lanes` KV heads (default: all of the model's).

        An attention pod holds only its placement's slice of a sequence's heads; a step may mix
        sequences holding different numbers of heads (see `LocalStep.attend_lanes`).
        """
        spec = self.resolve(policy)
        self.pool.allocator.open(seq_id, self.num_kv_heads if num_lanes is None else num_lanes)
        self._specs[seq_id] = spec

    def resolve(self, policy: PolicySpec | None) -> PolicySpec:
        """The spec a sequence opened with `policy` runs with (defaults applied)."""
        return (policy or self.default_policy).with_default_budget(self.default_budget)

    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        return self.pool.allocator.reserve(seq_id, num_tokens)

    def free(self, seq_id: int) -> None:
        self.release(seq_id)

    def release(self, seq_id: int) -> int:
        """Free the sequence; returns the blocks given back (0 for an unknown id)."""
        self._specs.pop(seq_id, None)
        for policy in self._policies.values():
            policy.forget(seq_id)
        return self.pool.allocator.free(seq_id)

    def spec(self, seq_id: int) -> PolicySpec:
        return self._specs[seq_id]

    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the whole pool could hold."""
        return self.pool.allocator.num_blocks // self.num_kv_heads * self.pool.block_size

    def begin(self, chunks: Sequence[SeqChunk]) -> LocalStep:
        return LocalStep(self, chunks)

    def policy(self, name: PolicyName) -> AttentionPolicy:
        """The part's instance of a policy (created on first use: it may allocate per-block data)."""
        policy = self._policies.get(name)
        if policy is None:
            policy = self._policies[name] = POLICIES[name](self.pool, self.group, self.scale, self.lock)
        return policy

    def bytes_read_total(self) -> dict[str, int]:
        """K/V bytes decode attention has read from the pool since start, per policy name."""
        totals: dict[str, int] = {}
        for spec, count in self.bytes_read_by_spec().items():
            totals[spec.name.value] = totals.get(spec.name.value, 0) + count
        return totals

    def bytes_read_by_spec(self) -> dict[PolicySpec, int]:
        """The same, per policy and budget (the evaluation runs several budgets in one batch)."""
        with self._bytes_lock:
            return dict(self._bytes)

    def count_bytes(self, spec: PolicySpec, count: int) -> None:
        with self._bytes_lock:
            self._bytes[spec] = self._bytes.get(spec, 0) + count


class _DecodeGroup:
    """The decode lanes of one policy and budget in a step."""

    def __init__(self, spec: PolicySpec, index: list[int], step: PolicyStep, device: str) -> None:
        self.spec = spec
        self.index = torch.tensor(index, dtype=torch.long, device=device)  # [m] among the step's lanes
        self.step = step


class LocalStep(AttentionStep):
    """Index tensors for one forward, computed once and reused by every layer.

    Works on *lanes* (one KV head of one new token), laid out chunk after chunk, token after token,
    then the sequence's heads in order: M = sum(length * heads of the sequence). A sequence holds
    any number of heads (its block table's lanes), so on an attention pod rows of different
    sequences may carry different head counts; `attend` is the uniform case reshaped. K/V-only
    chunks (`SeqChunk.kv_only`) have K/V lanes but no query or output lanes: q and o hold the
    Mq <= M lanes of the other chunks, in the same order.
    """

    def __init__(self, part: LocalAttention, chunks: Sequence[SeqChunk]) -> None:
        self.part = part
        self.chunks = list(chunks)
        allocator, bs = part.pool.allocator, part.pool.block_size
        device = part.pool.config.device
        tables = [allocator.block_table(c.seq_id) for c in self.chunks]
        dropped = [allocator.dropped(c.seq_id) for c in self.chunks]  # heavy_hitter's evictions
        for chunk, d in zip(self.chunks, dropped, strict=True):
            if d and chunk.length > 1:
                raise EvictedPrefillError(
                    f"sequence {chunk.seq_id} has evicted {d} tokens (heavy_hitter) and takes only "
                    f"decode rows now, not a chunk of {chunk.length}; free it and start again"
                )
        # Write slots, [M] in lane order: where each new token's K/V go (stored index = position - dropped).
        write = [
            lane[(pos - d) // bs] * bs + (pos - d) % bs
            for chunk, table, d in zip(self.chunks, tables, dropped, strict=True)
            for pos in range(chunk.start, chunk.end)
            for lane in table
        ]
        self.write_slots = torch.tensor(write, dtype=torch.long, device=device)
        self.lane_offsets = [0]  # [len(chunks) + 1]: first K/V lane of each chunk
        self.q_offsets = [0]  # [len(chunks) + 1]: first query lane of each chunk (none if kv_only)
        for chunk, table in zip(self.chunks, tables, strict=True):
            self.lane_offsets.append(self.lane_offsets[-1] + chunk.length * len(table))
            self.q_offsets.append(self.q_offsets[-1] + (0 if chunk.kv_only else chunk.length * len(table)))
        self.decode_rows = [i for i, c in enumerate(self.chunks) if c.length == 1 and not c.kv_only]
        self.groups = self._decode_groups(tables, dropped)
        self.prefill_tables = {
            i: torch.tensor(tables[i], dtype=torch.long, device=device)  # [heads, n_blocks]
            for i, c in enumerate(self.chunks)
            if c.length > 1 and not c.kv_only
        }
        self.last_layer = part.pool.config.num_layers - 1

    def _decode_groups(self, tables: list[list[list[int]]], dropped: list[int]) -> list[_DecodeGroup]:
        """Decode lanes grouped by policy and budget, each group begun as one PolicyStep."""
        by_policy: dict[PolicySpec, tuple[list[int], list[DecodeLane]]] = {}
        for i in self.decode_rows:
            chunk, spec = self.chunks[i], self.part.spec(self.chunks[i].seq_id)
            index, lanes = by_policy.setdefault(spec, ([], []))
            for head, table in enumerate(tables[i]):
                index.append(self.q_offsets[i] + head)
                lanes.append(DecodeLane(chunk.seq_id, table, chunk.end - dropped[i], chunk.end, spec))
        device = self.part.pool.config.device
        return [
            _DecodeGroup(spec, index, self.part.policy(spec.name).begin(lanes), device)
            for spec, (index, lanes) in by_policy.items()
        ]

    @property
    def num_lanes(self) -> int:
        """M: the K/V lanes of the step."""
        return self.lane_offsets[-1]

    @property
    def num_q_lanes(self) -> int:
        """Mq: the query (and output) lanes, those of chunks that are not kv_only."""
        return self.q_offsets[-1]

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Every sequence holds all `q.shape[1] // G` heads: [N, Hq, D] is [M, G, D] reshaped."""
        head_dim = q.shape[-1]
        o = self.attend_lanes(
            layer,
            q.reshape(-1, self.part.group, head_dim),
            k_new.reshape(-1, head_dim),
            v_new.reshape(-1, head_dim),
        )
        return o.reshape(q.shape)

    def attend_lanes(
        self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> torch.Tensor:
        """q: [Mq, G, D]; k_new, v_new: [M, D] -> o: [Mq, G, D], lanes in the step's lane order."""
        pool, part = self.part.pool, self.part
        pool.write(layer, self.write_slots, k_new, v_new)
        if len(self.groups) == 1 and not self.prefill_tables:  # pure decode, one policy: no scatter
            out = self._decode(self.groups[0], layer, q)
        else:
            out = torch.empty_like(q)
            for group in self.groups:
                out.index_copy_(0, group.index, self._decode(group, layer, q.index_select(0, group.index)))
            for i, table in self.prefill_tables.items():
                chunk, lo, hi = self.chunks[i], self.q_offsets[i], self.q_offsets[i + 1]
                q_rows = q[lo:hi].reshape(chunk.length, -1, q.shape[-1])  # [L, heads * G, D]
                k = pool.k[layer][table].flatten(1, 2)[:, : chunk.end]  # [heads, S, D]
                v = pool.v[layer][table].flatten(1, 2)[:, : chunk.end]
                o = causal_prefill_attention(q_rows, k, v, chunk.start, part.scale)
                out[lo:hi] = o.reshape(hi - lo, part.group, -1)
        if layer == self.last_layer:
            for group in self.groups:
                before = group.step.bytes_read
                group.step.finish()  # heavy_hitter evicts here; its reads count too
                part.count_bytes(group.spec, group.step.bytes_read - before)
        return out

    def _decode(self, group: _DecodeGroup, layer: int, q: torch.Tensor) -> torch.Tensor:
        before = group.step.bytes_read
        o = group.step.decode(layer, q)
        self.part.count_bytes(group.spec, group.step.bytes_read - before)
        return o
