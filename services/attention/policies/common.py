"""Pieces shared by the sparse policies: lane tensors, attention over gathered rows, block mirrors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.attention.kernels import PagedLanes
from services.attention.policies import DecodeLane


@dataclass(slots=True, frozen=True)
class LaneTensors:
    """A step's lanes as padded device tensors (built once per step, used by every layer)."""

    paged: PagedLanes  # CSR block tables (what the kernels take)
    table: torch.Tensor  # [n, MB] int64 block ids, 0 past each lane's blocks
    length: torch.Tensor  # [n] int64 tokens stored per lane
    width: int  # max length (positions of the widest lane)

    @classmethod
    def build(cls, lanes: Sequence[DecodeLane], block_size: int, device: str) -> LaneTensors:
        paged = PagedLanes.build([(lane.table, lane.length) for lane in lanes], block_size, device)
        width = max(lane.length for lane in lanes)
        table = paged.padded_table(-(-width // block_size))
        return cls(paged, table, paged.lane_len.long(), width)

    def slots(self, index: torch.Tensor, block_size: int) -> torch.Tensor:
        """Flat pool rows (block * bs + offset) of stored indices `index` [n, S] of each lane."""
        return self.table.gather(1, index // block_size) * block_size + index % block_size


def gathered_attention(
    q: torch.Tensor,  # [n, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    slots: torch.Tensor,  # [n, S] flat pool rows each lane attends to
    valid: torch.Tensor,  # [n, S] bool: the row holds a token the lane attends to
    scale: float,
) -> torch.Tensor:  # [n, G, D], q's dtype
    """Exact softmax attention of each lane's G queries over its selected rows (masked rows get 0)."""
    n, s = slots.shape
    d = q.shape[-1]
    flat = slots.reshape(-1)
    keys = k_cache.view(-1, d).index_select(0, flat).view(n, s, d).float()
    values = v_cache.view(-1, d).index_select(0, flat).view(n, s, d).float()
    scores = torch.bmm(q.float(), keys.transpose(1, 2)) * scale  # [n, G, S]
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    return torch.bmm(scores.softmax(dim=-1), values).to(q.dtype)


def keep_tokens(lane: DecodeLane, floor: int) -> int:
    """Tokens a budget of `lane.spec.budget` of dense bytes allows for this lane, at least `floor`."""
    budget = lane.spec.budget if lane.spec.budget is not None else 1.0
    return max(floor, math.ceil(budget * lane.positions))


def row_bytes(rows: int, head_dim: int, itemsize: int) -> int:
    """Bytes of `rows` K rows plus as many V rows."""
    return 2 * rows * head_dim * itemsize


class BlockMirror:
    """Which blocks of each sequence have their derived data (per layer, indexed by block id) up to
    date. Full blocks are derived once; the lane's last, partial block again at every step (its new
    token). `refresh(lanes)` says which blocks to derive this step; `commit` after the step."""

    def __init__(self, block_size: int, device: str) -> None:
        self.block_size = block_size
        self.device = device
        self._full: dict[int, int] = {}  # seq -> leading full blocks already derived

    def refresh(self, lanes: Sequence[DecodeLane]) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids [X], tokens in each [X]) to derive this step, over all lanes."""
        bs = self.block_size
        blocks: list[int] = []
        filled: list[int] = []
        for lane in lanes:
            done = min(self._full.get(lane.seq_id, 0), lane.length // bs)
            used = -(-lane.length // bs)
            blocks.extend(lane.table[done:used])
            filled.extend(bs if b < lane.length // bs else lane.length - b * bs for b in range(done, used))
        return (
            torch.tensor(blocks, dtype=torch.long, device=self.device),
            torch.tensor(filled, dtype=torch.long, device=self.device),
        )

    def commit(self, lanes: Sequence[DecodeLane]) -> None:
        for lane in lanes:
            self._full[lane.seq_id] = lane.length // self.block_size

    def forget(self, seq_id: int) -> None:
        self._full.pop(seq_id, None)


def positions_mask(lanes: Sequence[DecodeLane], device: str) -> torch.Tensor:
    """[n, max positions] bool: every position each lane holds (a dense lane's `attended`)."""
    positions = torch.tensor([lane.positions for lane in lanes], device=device)
    width = max(lane.positions for lane in lanes)
    return torch.arange(width, device=device)[None, :] < positions[:, None]
