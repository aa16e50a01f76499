"""Placement of a request: a decode pod, a prefill pod and the attention pods holding its KV heads.

Decisions are pure functions over snapshots (tested without Redis in tests/unit/test_router.py);
`Router` is the thin I/O shell that reads the snapshots from Redis and reserves the KV blocks.

    Router.place(request, model, num_kv_heads, num_tokens)
      ├─ live pods of each role (registry) + free KV blocks per attention pod (reservations)
      ├─ pick_least_loaded(decode)  pick_least_loaded(prefill)  plan_attention(attention)
      │  (no live prefill pod is not an error: the decode pod then prefills the prompt itself)
      └─ reserve the plan's blocks atomically ──▶ Route   (refused: the snapshot was stale → re-plan)

Attention placement is one code path for both modes: request-partitioned is head-partitioned over
at most one pod. Heads are split as evenly as possible (3 heads over 2 pods = 2+1), the larger
shares going to the pods with the most free blocks; when the widest split does not fit, fewer pods
are tried, because a pod with almost no room should not make the request fail.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from services.core.errors import KvFullError, NoCapacityError
from services.core.placement import Placement, PlacementEntry
from services.core.registry import AttentionCapacity, PodRegistry, PodStatus, Role
from services.core.reservations import Granted, KvReservations

log = logging.getLogger(__name__)


class PlacementMode(StrEnum):
    REQUEST = "request"  # one attention pod holds every KV head of the request
    HEAD = "head"  # Lamina: KV heads split across attention pods


@dataclass(slots=True, frozen=True)
class AttentionCandidate:
    """An attention pod as the planner sees it: where it is and how much room it has."""

    pod_id: str
    address: str
    free_blocks: int  # total − reserved, from Redis
    block_size: int  # positions per block (one block = one KV head)
    total_blocks: int | None = None  # the pod's whole pool; None: unknown (assume it could fit)


@dataclass(slots=True, frozen=True)
class PodShare:
    """One attention pod's part of a request: its KV-head slice and the blocks to reserve for it."""

    pod_id: str
    entry: PlacementEntry  # the pod's address and KV-head range
    blocks: int  # kv_head_count × ceil(num_tokens / block_size)


@dataclass(slots=True, frozen=True)
class AttentionPlan:
    shares: tuple[PodShare, ...]  # in KV-head order

    @property
    def placement(self) -> Placement:
        return Placement(tuple(s.entry for s in self.shares))

    @property
    def blocks(self) -> dict[str, int]:
        """pod id -> blocks, what `KvReservations.reserve` takes."""
        return {s.pod_id: s.blocks for s in self.shares}


@dataclass(slots=True, frozen=True)
class Route:
    """Where a request runs. Its KV blocks are reserved under the request id until released."""

    request_id: str
    decode: PodStatus
    prefill: PodStatus | None  # None: the decode pod prefills the prompt itself
    attention: AttentionPlan


# ---- pure decisions -----------------------------------------------------------------------------
def pick_least_loaded(
    pods: Sequence[PodStatus], what: str, pending: Mapping[str, int] | None = None
) -> PodStatus:
    """The pod with the lowest load; ties go to the smallest pod id (deterministic).

    Reported loads are as fresh as the last heartbeat (1 s), so a caller placing many requests per
    second passes its own in-flight placements per pod id as `pending`, added to the reported load;
    otherwise a burst piles onto one pod.
    """
    if not pods:
        raise NoCapacityError(
            f"no live {what} pod: start one (`disagg serve {what}`) or check its heartbeats"
        )
    extra = pending or {}
    return min(pods, key=lambda p: (p.load + extra.get(p.pod_id, 0), p.pod_id))


def newest_per_address(pods: Sequence[PodStatus]) -> list[PodStatus]:
    """Drop pods shadowed by a newer registration at the same address (restarted under a new id).

    The old record lives until its TTL runs out; routing to it would reach the new process anyway,
    and a placement must not list one address twice.
    """
    newest: dict[str, PodStatus] = {}
    for pod in pods:
        seen = newest.get(pod.info.address)
        if seen is None or (pod.info.started_at, pod.pod_id) > (seen.info.started_at, seen.pod_id):
            newest[pod.info.address] = pod
    return sorted(newest.values(), key=lambda p: p.pod_id)


def plan_attention(
    candidates: Sequence[AttentionCandidate],
    num_kv_heads: int,
    num_tokens: int,
    mode: PlacementMode,
    max_pods: int | None = None,
) -> AttentionPlan:
    """Choose pods and head slices for a request that will hold up to `num_tokens` positions.

    Head mode spreads over min(#candidates, num_kv_heads, max_pods) pods; request mode over one.
    Raises KvFullError when no split fits the free blocks but one would fit the pods' whole pools
    (the request can wait for others to finish), NoCapacityError when it never could.
    """
    if num_tokens < 1:
        raise ValueError(f"a request holds at least one position, got num_tokens={num_tokens}")
    if not candidates:
        raise NoCapacityError(
            "no live attention pod: start one (`disagg serve attention`) or check heartbeats"
        )
    plan = _widest_fit(candidates, num_kv_heads, num_tokens, mode, max_pods)
    if plan is not None:
        return plan
    best = max(candidates, key=lambda c: (c.free_blocks, c.pod_id))
    where = (
        f"{num_tokens} positions × {num_kv_heads} KV heads (most free: {best.pod_id} with "
        f"{best.free_blocks} blocks of {best.block_size})"
    )
    empty = [replace(c, free_blocks=c.total_blocks) for c in candidates if c.total_blocks is not None]
    if len(empty) == len(candidates) and _widest_fit(empty, num_kv_heads, num_tokens, mode, max_pods) is None:
        raise NoCapacityError(
            f"no attention pod could ever hold {where}, even empty; shorten the prompt or max_tokens, "
            "or add attention pods with larger KV pools"
        )
    raise KvFullError(f"no attention pod has room now for {where}; retry later or add attention pods")


def _widest_fit(
    candidates: Sequence[AttentionCandidate],
    num_kv_heads: int,
    num_tokens: int,
    mode: PlacementMode,
    max_pods: int | None,
) -> AttentionPlan | None:
    ranked = sorted(candidates, key=lambda c: (-c.free_blocks, c.pod_id))
    widest = 1 if mode is PlacementMode.REQUEST else min(len(ranked), num_kv_heads, max_pods or len(ranked))
    for num_pods in range(widest, 0, -1):
        shares = _fit(ranked[:num_pods], num_kv_heads, num_tokens)
        if shares is not None:
            return AttentionPlan(shares)
    return None


def _fit(
    pods: Sequence[AttentionCandidate], num_kv_heads: int, num_tokens: int
) -> tuple[PodShare, ...] | None:
    """Split the heads evenly over `pods` (earlier pods take the remainder), or None if one lacks blocks."""
    placement = Placement.head_partitioned([p.address for p in pods], num_kv_heads)
    shares = []
    for pod, entry in zip(pods, placement.entries, strict=True):
        blocks = entry.kv_head_count * -(-num_tokens // pod.block_size)
        if blocks > pod.free_blocks:
            return None
        shares.append(PodShare(pod.pod_id, entry, blocks))
    return tuple(shares)


# ---- I/O shell ----------------------------------------------------------------------------------
class Router:
    """Reads pods and free blocks from Redis, decides, and reserves the KV blocks.

    Lifecycle per request: `place(...)` ─▶ the request runs ─▶ `release(request_id)` on finish or
    cancel. While it runs, the owner calls `reservations.refresh(request_id)` within each lease.
    """

    def __init__(
        self,
        registry: PodRegistry,
        reservations: KvReservations,
        mode: PlacementMode,
        *,
        max_attention_pods: int | None = None,
        attempts: int = 3,
    ) -> None:
        self.registry = registry
        self.reservations = reservations
        self.mode = mode
        self.max_attention_pods = max_attention_pods
        self.attempts = attempts

    def place(
        self,
        request_id: str,
        model: str,
        num_kv_heads: int,
        num_tokens: int,
        *,
        prefill: bool = True,
        pending: Mapping[str, int] | None = None,
    ) -> Route:
        """Choose pods and reserve KV blocks; raises NoCapacityError when nothing fits.

        `prefill=False` (a one-token prompt) or no live prefill pod: the decode pod prefills itself.
        `pending`: the caller's not-yet-reported load per pod id (see `pick_least_loaded`).
        """
        decode = pick_least_loaded(
            newest_per_address(self.registry.live_pods(Role.DECODE, model)), "decode", pending
        )
        prefill_pods = newest_per_address(self.registry.live_pods(Role.PREFILL, model)) if prefill else []
        prefill_pod = pick_least_loaded(prefill_pods, "prefill", pending) if prefill_pods else None
        for attempt in range(1, self.attempts + 1):
            plan = plan_attention(
                self.attention_candidates(model), num_kv_heads, num_tokens, self.mode, self.max_attention_pods
            )
            result = self.reservations.reserve(request_id, plan.blocks)
            if isinstance(result, Granted):
                return Route(request_id, decode, prefill_pod, plan)
            # Another gateway reserved in between (or a pod died): re-read and re-plan.
            log.debug("request %s: reservation refused (%s), attempt %d", request_id, result, attempt)
        raise KvFullError(
            f"request {request_id}: KV blocks were taken by concurrent requests {self.attempts} times "
            "in a row; retry later or add attention pods"
        )

    def release(self, request_id: str) -> int:
        return self.reservations.release(request_id)

    def attention_candidates(self, model: str) -> list[AttentionCandidate]:
        pods = newest_per_address(self.registry.live_pods(Role.ATTENTION, model))
        usage = self.reservations.usage([p.pod_id for p in pods])
        out = []
        for pod, use in zip(pods, usage, strict=True):
            if use.total is None or not isinstance(pod.info.capacity, AttentionCapacity):
                continue  # expired between the two reads
            out.append(
                AttentionCandidate(
                    pod.pod_id, pod.info.address, use.free, pod.info.capacity.block_size, use.total
                )
            )
        return out
