"""Attention placement: which attention pods hold which KV heads of one sequence.

    request-partitioned   [(pod-a, 0, 3)]                   every KV head on one pod
    head-partitioned      [(pod-a, 0, 2), (pod-b, 2, 1)]    a slice of heads per pod (Lamina)

Both are the same data and the same code path: the decode pod sends each pod the lanes of the heads
it holds. A placement covers KV heads 0..n-1 exactly once, each pod at most once (a pod holds one
contiguous head range per sequence); whoever uses it checks n against the model's Hkv. The Redis
router produces these; the helpers below build the two standard shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.core.errors import DisaggError
from services.proto import placement_pb2


class PlacementError(DisaggError):
    """A placement that does not cover the model's KV heads exactly once."""


@dataclass(slots=True, frozen=True)
class PlacementEntry:
    address: str  # the attention pod's gRPC address, host:port
    kv_head_start: int  # first KV head this pod holds
    kv_head_count: int  # consecutive KV heads held, >= 1

    @property
    def kv_head_end(self) -> int:
        return self.kv_head_start + self.kv_head_count


@dataclass(slots=True, frozen=True)
class Placement:
    """Entries in any order; together they tile the KV heads [0, num_kv_heads) exactly once."""

    entries: tuple[PlacementEntry, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))  # a list would make it unhashable
        if not self.entries:
            raise PlacementError("a placement needs at least one attention pod")
        addresses = [e.address for e in self.entries]
        if len(set(addresses)) != len(addresses):
            raise PlacementError(
                f"a placement lists a pod twice ({addresses}); give each pod one contiguous head range"
            )
        covered = 0
        for entry in sorted(self.entries, key=lambda e: e.kv_head_start):
            if entry.kv_head_count < 1:
                raise PlacementError(f"{entry.address} holds {entry.kv_head_count} KV heads; at least 1")
            if entry.kv_head_start != covered:
                raise PlacementError(
                    f"KV heads {_describe(self.entries)} leave a gap or overlap at head "
                    f"{min(covered, entry.kv_head_start)}; cover every head from 0 exactly once"
                )
            covered = entry.kv_head_end

    @property
    def num_kv_heads(self) -> int:
        """The KV heads covered, which must be the model's Hkv (checked by the user of the placement)."""
        return sum(e.kv_head_count for e in self.entries)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(e.address for e in self.entries)

    @classmethod
    def request_partitioned(cls, address: str, num_kv_heads: int) -> Placement:
        """Every KV head of the sequence on one pod."""
        return cls((PlacementEntry(address, 0, num_kv_heads),))

    @classmethod
    def head_partitioned(cls, addresses: Sequence[str], num_kv_heads: int) -> Placement:
        """Heads split as evenly as possible, earlier pods taking the remainder: 3 over 2 -> 2 + 1."""
        if not addresses or len(addresses) > num_kv_heads:
            raise PlacementError(
                f"cannot split {num_kv_heads} KV heads over {len(addresses)} pods; use 1 to {num_kv_heads}"
            )
        base, extra = divmod(num_kv_heads, len(addresses))
        entries, start = [], 0
        for index, address in enumerate(addresses):
            count = base + (1 if index < extra else 0)
            entries.append(PlacementEntry(address, start, count))
            start += count
        return cls(tuple(entries))


def _describe(entries: Sequence[PlacementEntry]) -> str:
    return ", ".join(f"{e.address}:[{e.kv_head_start},{e.kv_head_end})" for e in entries)


# ---- wire form (proto/disagg/v1/placement.proto) ------------------------------------------------
MAX_PLACEMENT_ENTRIES = 1024  # far above any cluster; bounds what a peer can make us allocate


def is_host_port(address: str) -> bool:
    """`host:port` with a non-empty host and a numeric port (what every pod address looks like)."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit())


def placement_to_proto(placement: Placement, message: placement_pb2.Placement) -> None:
    """Fill `message` (usually a request's submessage) from `placement`."""
    del message.entries[:]
    for e in placement.entries:
        message.entries.add(address=e.address, kv_head_start=e.kv_head_start, kv_head_count=e.kv_head_count)


def placement_from_proto(message: placement_pb2.Placement, num_kv_heads: int) -> Placement:
    """Validate a received placement against the model's KV heads; PlacementError names the problem."""
    if len(message.entries) > MAX_PLACEMENT_ENTRIES:
        count = len(message.entries)
        raise PlacementError(f"a placement lists {count} pods; at most {MAX_PLACEMENT_ENTRIES}")
    placement = Placement(
        tuple(PlacementEntry(e.address, e.kv_head_start, e.kv_head_count) for e in message.entries)
    )
    if placement.num_kv_heads != num_kv_heads:
        raise PlacementError(
            f"the placement covers {placement.num_kv_heads} KV heads but the model has {num_kv_heads}"
        )
    for e in placement.entries:
        if not is_host_port(e.address):
            raise PlacementError(f"attention pod address {e.address!r} is not host:port")
    return placement
