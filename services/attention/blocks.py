"""Block allocator for the paged KV pool: pure bookkeeping, no torch.

A *lane* is one KV head of one sequence. Each lane owns a list of fixed-size blocks; a block holds
`block_size` consecutive token positions of that one head (see kv_pool.py for the memory layout).
Allocating per head rather than per token-of-all-heads lets one pool serve both placements in
DESIGN.md: request-partitioned (a sequence brings all its KV heads) and head-partitioned (a sequence
brings only the slice of heads this pod owns).

Lifecycle of a sequence here:

    open(seq, num_lanes) ─▶ reserve(seq, n_tokens)* ─▶ free(seq)

`reserve` grows the sequence so it can hold `n_tokens` positions, all-or-nothing; when the pool cannot
give the blocks it returns `OutOfBlocks` (a value, not an exception) and the caller — the scheduler —
decides whether to queue or preempt.

Eviction (the heavy_hitter policy): `evict(seq, n)` gives back the last n / block_size blocks of every
lane after the caller compacted the lane's kept tokens to its front. From then on the sequence stores
`dropped` fewer tokens than it has positions, identically in every lane: the token at position p
(p past the eviction) is stored at index p - dropped. Capacity stays counted in positions and never
shrinks (`blocks * block_size + dropped`), so a client's cached capacity stays true.

    position  0 1 2 3 4 5 6 7 8 9        stored index = position - dropped, for new positions
    stored    0 1 . 2 . . 3 4 5 6        (dropped = 3 after evicting positions 2, 4, 5)
"""

from __future__ import annotations

from services.core.attention import OutOfBlocks, Reserved, ReserveResult
from services.core.errors import DisaggError


class UnknownSequenceError(DisaggError):
    """A sequence id that was never opened (or already freed)."""


class BlockAllocator:
    """Free list plus one block table per lane. O(new blocks) per call."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popping from the end hands out low block ids first, which keeps early tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[list[int]]] = {}  # seq -> lanes -> block ids
        self._dropped: dict[int, int] = {}  # seq -> positions evicted (absent: none)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int, num_lanes: int) -> int:
        """Blocks a sequence of `num_lanes` heads needs to hold `num_tokens` positions."""
        return num_lanes * (-(-num_tokens // self.block_size))

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def capacity(self, seq_id: int) -> int:
        """Positions the sequence can hold without another reservation."""
        return len(self._lanes(seq_id)[0]) * self.block_size + self._dropped.get(seq_id, 0)

    def dropped(self, seq_id: int) -> int:
        """Positions of the sequence evicted so far (0 unless a policy evicts)."""
        self._lanes(seq_id)
        return self._dropped.get(seq_id, 0)

    def block_table(self, seq_id: int) -> list[list[int]]:
        """Block ids per lane, `[num_lanes][num_blocks_of_lane]`. Read-only view: do not mutate."""
        return self._lanes(seq_id)

    # ---- verbs ---------------------------------------------------------------------------------
    def open(self, seq_id: int, num_lanes: int) -> None:
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} is already open")
        if num_lanes < 1:
            raise ValueError(f"a sequence needs at least one KV head, got {num_lanes}")
        self._tables[seq_id] = [[] for _ in range(num_lanes)]

    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        """Make room for `num_tokens` positions in total (not additional). All-or-nothing."""
        lanes = self._lanes(seq_id)
        stored = num_tokens - self._dropped.get(seq_id, 0)
        per_lane = -(-stored // self.block_size) - len(lanes[0])
        if per_lane <= 0:
            return Reserved(capacity_tokens=self.capacity(seq_id), new_blocks=0)
        needed = per_lane * len(lanes)
        if needed > len(self._free):
            return OutOfBlocks(needed=needed, free=len(self._free))
        for lane in lanes:
            for _ in range(per_lane):
                lane.append(self._free.pop())
        return Reserved(capacity_tokens=self.capacity(seq_id), new_blocks=needed)

    def evict(self, seq_id: int, positions: int) -> int:
        """Drop `positions` (a multiple of block_size) stored tokens from every lane by giving back
        each lane's last positions // block_size blocks; returns the blocks freed. The caller has
        moved every token it keeps into the lanes' remaining blocks first."""
        lanes = self._lanes(seq_id)
        per_lane, rest = divmod(positions, self.block_size)
        if positions < 0 or rest or per_lane > len(lanes[0]):
            raise ValueError(
                f"evict {positions} positions of sequence {seq_id}: need a multiple of {self.block_size} "
                f"within its {len(lanes[0])} blocks per lane"
            )
        for lane in lanes:
            for _ in range(per_lane):
                self._free.append(lane.pop())
        self._dropped[seq_id] = self._dropped.get(seq_id, 0) + positions
        return per_lane * len(lanes)

    def free(self, seq_id: int) -> int:
        """Return every block of the sequence to the pool; returns how many. Unknown ids are a no-op."""
        self._dropped.pop(seq_id, None)
        lanes = self._tables.pop(seq_id, None)
        if lanes is None:
            return 0
        released = 0
        for lane in lanes:
            self._free.extend(reversed(lane))
            released += len(lane)
        return released

    def _lanes(self, seq_id: int) -> list[list[int]]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"sequence {seq_id} is not open in this KV pool") from None
