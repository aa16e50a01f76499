"""Decode attention policies: which cached tokens a decode step reads, one file per policy.

Lifecycle, per attention part (LocalAttention, so the colocated engine and attention pods alike):

    policy = POLICIES[name](pool, group, scale, lock)    # once per part and policy, on first use
    step = policy.begin(lanes)                           # once per forward: its decode lanes
    for layer in range(L):
        o = step.decode(layer, q)                        # q [n, G, D] -> o [n, G, D]; K/V already written
    step.finish()                                        # after the last layer (heavy_hitter evicts here)
    policy.forget(seq_id)                                # the sequence was freed

The contract every policy keeps:

- Decode only. Prefill chunks (more than one new token) are exact causal attention, whatever the
  policy; a policy sees a sequence's prompt only through the K/V it finds in the pool.
- Budget: `lane.spec.budget` is the fraction of the dense K/V bytes (2 · length · D · itemsize per
  lane and layer) the step may read, with floors the policy's docstring names (a few sink tokens and a
  recent window are always kept). A budget >= 1, or one whose selection would cover every cached
  token, is exactly dense: those lanes go through the dense path (`DensePolicy`), bit for bit.
- Bytes: `PolicyStep.bytes_read` counts the pool bytes the step actually read (selected K/V rows,
  metadata such as Quest's bounds or SparQ's r key components, heavy_hitter's compaction), measured
  from what the step gathered, not estimated from a formula.
- Vectorized over the batch: one step handles all its lanes with tensor ops; Python loops run over
  groups (a handful), never over tokens.
- Per-block data a policy derives from the pool (SparQ's transposed K, Quest's bounds) is refreshed
  lazily at each step from the pool itself (`common.BlockMirror`), so K/V written by any path (steps,
  ImportKV, NIXL WRITEs) is seen without hooks on the write paths.
- `attended(layer, q)` says which positions the layer's attention reads (for the evaluation's
  attention-mass recall); it is not on the serving path.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from services.attention.kv_pool import KVPool
from services.core.attention import PolicyName, PolicySpec

SINK_TOKENS = 4  # the first positions of a sequence, kept by every sparse policy (attention sinks)
RECENT_TOKENS = 64  # the most recent positions, kept by every sparse policy


@dataclass(slots=True, frozen=True)
class DecodeLane:
    """One KV head of one sequence in a decode step (its new token already written)."""

    seq_id: int
    table: Sequence[int]  # the lane's block ids (may hold reserved blocks past `length`)
    length: int  # tokens stored in the lane: positions - evicted ones
    positions: int  # positions the sequence holds (the new token's position + 1)
    spec: PolicySpec  # budget resolved (never None)


class PolicyStep(ABC):
    """One forward's decode attention for a group of lanes; see the package docstring."""

    bytes_read: int = 0  # pool bytes read so far by this step (all layers)

    @abstractmethod
    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q: [n, G, D] (lanes in `begin` order) -> o: [n, G, D], q's dtype."""

    @abstractmethod
    def attended(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """[n, max positions] bool: the positions `decode(layer, q)` reads, per lane (evaluation)."""

    def finish(self) -> None:  # noqa: B027 (an optional hook: most policies keep no state to update)
        """Called once after the last layer (not after a failed step)."""


class AttentionPolicy(ABC):
    """A policy over one KV pool. `lock` guards the pool's allocator (held only to free blocks)."""

    name: ClassVar[PolicyName]

    def __init__(self, pool: KVPool, group: int, scale: float, lock: threading.Lock) -> None:
        self.pool = pool
        self.group = group  # G: query heads per KV head
        self.scale = scale
        self.lock = lock

    @abstractmethod
    def covers(self, lane: DecodeLane) -> bool:
        """True when the policy would read every cached token of `lane` (so dense is exact)."""

    @abstractmethod
    def begin_sparse(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        """The policy's own step over lanes it does not cover."""

    def begin(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        """Covered lanes go through the dense path, the others through the policy."""
        from services.attention.policies.dense import DenseStep, SplitStep

        covered = [lane.spec.is_dense or self.covers(lane) for lane in lanes]
        if all(covered):
            return DenseStep(self, lanes)
        if not any(covered):
            return self.begin_sparse(lanes)
        dense = [i for i, c in enumerate(covered) if c]
        sparse = [i for i, c in enumerate(covered) if not c]
        return SplitStep(
            (dense, DenseStep(self, [lanes[i] for i in dense])),
            (sparse, self.begin_sparse([lanes[i] for i in sparse])),
            device=self.pool.config.device,
        )

    def forget(self, seq_id: int) -> None:  # noqa: B027 (an optional hook, like `finish`)
        """Drop per-sequence state (the sequence was freed)."""


from services.attention.policies.dense import DensePolicy  # noqa: E402 (the interface comes first)
from services.attention.policies.heavy_hitter import HeavyHitterPolicy  # noqa: E402
from services.attention.policies.quest import QuestPolicy  # noqa: E402
from services.attention.policies.sink_window import SinkWindowPolicy  # noqa: E402
from services.attention.policies.sparq import SparqPolicy  # noqa: E402

POLICIES: dict[PolicyName, type[AttentionPolicy]] = {
    cls.name: cls for cls in (DensePolicy, SinkWindowPolicy, HeavyHitterPolicy, SparqPolicy, QuestPolicy)
}

__all__ = [
    "POLICIES",
    "RECENT_TOKENS",
    "SINK_TOKENS",
    "AttentionPolicy",
    "DecodeLane",
    "PolicyStep",
]
