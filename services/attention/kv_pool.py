"""Paged KV pool: the attention pod's memory.

Memory layout (per layer, K and V alike), one block = `block_size` positions of ONE KV head:

    k[layer]: [num_blocks, block_size, D]
              ┌──────── block 0 ────────┐┌──────── block 1 ────────┐
              │ pos 0..bs-1 of lane a   ││ pos 0..bs-1 of lane b   │ ...
              └─────────────────────────┘└─────────────────────────┘

A lane (one KV head of one sequence) owns a list of blocks (services/attention/blocks.py); position p
of a lane lives in block table[p // bs] at offset p % bs. Keeping a head's tokens contiguous within a
block makes decode attention read whole 4 KiB blocks (bs=16, D=64, fp32) and lets Quest keep min/max
bounds per block later.

The pool is sized from a byte budget: num_blocks = budget // (2 * layers * block_size * D * itemsize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.attention.blocks import BlockAllocator
from services.core.errors import DisaggError


@dataclass(slots=True, frozen=True)
class KVPoolConfig:
    num_layers: int
    head_dim: int  # D
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def bytes_per_block(self) -> int:
        """K and V of one block over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.head_dim * itemsize

    def blocks_for_budget(self, budget_bytes: int) -> int:
        blocks = budget_bytes // self.bytes_per_block()
        if blocks < 1:
            raise DisaggError(
                f"a KV budget of {budget_bytes} bytes holds no block of {self.bytes_per_block()} bytes; "
                "raise the KV memory budget"
            )
        return blocks


class KVPool:
    """KV tensors plus their allocator. Writes and reads go through block tables."""

    def __init__(self, config: KVPoolConfig, num_blocks: int) -> None:
        self.config = config
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        shape = (num_blocks, config.block_size, config.head_dim)
        # One tensor per layer and kind so a layer's blocks are contiguous and views stay cheap.
        self.k = [
            torch.zeros(shape, dtype=config.dtype, device=config.device) for _ in range(config.num_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=config.dtype, device=config.device) for _ in range(config.num_layers)
        ]

    @classmethod
    def from_budget(cls, config: KVPoolConfig, budget_bytes: int) -> KVPool:
        return cls(config, config.blocks_for_budget(budget_bytes))

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.num_blocks * self.config.bytes_per_block()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows at flat slots (block * block_size + offset). slots: [M]; k, v: [M, D]."""
        self.k[layer].view(-1, self.config.head_dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, self.config.head_dim).index_copy_(0, slots, v)
