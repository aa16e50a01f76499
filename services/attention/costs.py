"""What an attention pod's price pays for, and how it is attributed to sequences (docs/cost.md).

    costs = AttentionCosts(usd_per_hour=0.8, memory_share=0.5, total_blocks=pool_blocks)
    costs.hold(seq, blocks)                         # after every Reserve: KV memory × time
    work = costs.compute.open({seq: lane_context})  # a Step: busy during each layer frame
    usd = costs.release(seq)                        # at Free: memory + compute of the sequence

`memory_share` of the price (a setting, `--kv-memory-cost-share`) pays for the KV pool: every block
costs the same per second, held blocks charge their sequence, free blocks are idle. The rest pays
for compute: the pod's busy time (Step layer frames, ImportKV chunks) is shared among concurrent
work, and a step's time goes to its sequences by lanes × context (the K/V positions each attends
over), which is what decode attention's time grows with.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

from services.core.cost import BlockMeter, Clock, CostMeter, CostTotals, process_started_at


class AttentionCosts:
    def __init__(
        self,
        usd_per_hour: float,
        memory_share: float,
        total_blocks: int,
        *,
        started_at: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0.0 <= memory_share <= 1.0:
            raise ValueError(f"memory_share must be within [0, 1], got {memory_share}")
        start = process_started_at() if started_at is None else started_at
        self._price = usd_per_hour
        self.memory = BlockMeter(usd_per_hour * memory_share, total_blocks, started_at=start, clock=clock)
        self.compute = CostMeter(usd_per_hour * (1.0 - memory_share), started_at=start, clock=clock)

    @property
    def usd_per_hour(self) -> float:
        return self._price

    def hold(self, seq_id: Hashable, blocks: int) -> None:
        self.memory.hold(seq_id, blocks)

    def release(self, seq_id: Hashable) -> float:
        """The sequence is gone: its memory and compute cost on this pod, forgotten here."""
        return self.memory.release(seq_id) + self.compute.take(seq_id)

    def totals(self) -> CostTotals:
        return self.memory.totals() + self.compute.totals()
