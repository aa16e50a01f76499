"""In-process attention part: the KV pool and reference attention in the caller's process.

Used by the colocated engine and by tests; attention pods wrap the same pool behind gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.attention.kv_pool import KVPool
from services.attention.reference import causal_prefill_attention, paged_decode_attention
from services.core.attention import AttentionPart, AttentionStep, ReserveResult, SeqChunk


class LocalAttention(AttentionPart):
    """Holds every KV head of every sequence (request-partitioned placement on one device)."""

    def __init__(self, pool: KVPool, num_kv_heads: int, num_heads: int) -> None:
        self.pool = pool
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.scale = pool.config.head_dim**-0.5

    def open(self, seq_id: int) -> None:
        self.pool.allocator.open(seq_id, self.num_kv_heads)

    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        return self.pool.allocator.reserve(seq_id, num_tokens)

    def free(self, seq_id: int) -> None:
        self.pool.allocator.free(seq_id)

    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the whole pool could hold."""
        return self.pool.allocator.num_blocks // self.num_kv_heads * self.pool.block_size

    def begin(self, chunks: Sequence[SeqChunk]) -> AttentionStep:
        return _LocalStep(self, chunks)


class _LocalStep(AttentionStep):
    """Index tensors for one forward, computed once and reused by every layer."""

    def __init__(self, part: LocalAttention, chunks: Sequence[SeqChunk]) -> None:
        self.part = part
        self.chunks = list(chunks)
        alloc, bs = part.pool.allocator, part.pool.block_size
        device = part.pool.config.device
        tables = [alloc.block_table(c.seq_id) for c in self.chunks]
        # Write slots, [N, Hkv] flattened in row order: where each new token's K/V go.
        write: list[int] = []
        for chunk, table in zip(self.chunks, tables, strict=True):
            for pos in range(chunk.start, chunk.end):
                write.extend(lane[pos // bs] * bs + pos % bs for lane in table)
        self.write_slots = torch.tensor(write, dtype=torch.long, device=device)
        # Decode rows (length 1) are batched together; longer chunks run one sequence at a time.
        self.decode_rows = [i for i, c in enumerate(self.chunks) if c.length == 1]
        self.row_offsets = [0]
        for chunk in self.chunks:
            self.row_offsets.append(self.row_offsets[-1] + chunk.length)
        blocks: list[int] = []
        lane_blocks: list[int] = []
        lane_lens: list[int] = []
        for i in self.decode_rows:
            n_blocks = -(-self.chunks[i].end // bs)
            for lane in tables[i]:
                blocks.extend(lane[:n_blocks])
                lane_blocks.append(n_blocks)
                lane_lens.append(self.chunks[i].end)
        self.blocks = torch.tensor(blocks, dtype=torch.long, device=device)
        counts = torch.tensor(lane_blocks, dtype=torch.long, device=device)
        self.block_lane = torch.repeat_interleave(torch.arange(len(lane_blocks), device=device), counts)
        first_block = torch.cumsum(counts, 0) - counts  # [n_lanes]
        block_pos0 = (torch.arange(len(blocks), device=device) - first_block[self.block_lane]) * bs
        lens = torch.tensor(lane_lens, dtype=torch.long, device=device)[self.block_lane]
        self.valid = (block_pos0[:, None] + torch.arange(bs, device=device)) < lens[:, None]  # [NB, bs]
        self.prefill_tables = {
            i: torch.tensor(tables[i], dtype=torch.long, device=device)  # [Hkv, n_blocks]
            for i, c in enumerate(self.chunks)
            if c.length > 1
        }
        self.decode_index = torch.tensor(
            [self.row_offsets[i] for i in self.decode_rows], dtype=torch.long, device=device
        )

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        pool, part = self.part.pool, self.part
        head_dim = q.shape[-1]
        pool.write(layer, self.write_slots, k_new.reshape(-1, head_dim), v_new.reshape(-1, head_dim))
        if len(self.decode_rows) == len(self.chunks):  # pure decode step: no scatter needed
            q_lanes = q.reshape(-1, part.group, head_dim)  # [B*Hkv, G, D]
            o = paged_decode_attention(
                q_lanes, pool.k[layer], pool.v[layer], self.blocks, self.block_lane, self.valid, part.scale
            )
            return o.reshape(q.shape)
        out = torch.empty_like(q)
        if self.decode_rows:
            q_lanes = q.index_select(0, self.decode_index).reshape(-1, part.group, head_dim)
            o = paged_decode_attention(
                q_lanes, pool.k[layer], pool.v[layer], self.blocks, self.block_lane, self.valid, part.scale
            )
            out.index_copy_(0, self.decode_index, o.reshape(-1, q.shape[1], head_dim))
        for i, table in self.prefill_tables.items():
            chunk, lo, hi = self.chunks[i], self.row_offsets[i], self.row_offsets[i + 1]
            k = pool.k[layer][table].flatten(1, 2)[:, : chunk.end]  # [Hkv, S, D]
            v = pool.v[layer][table].flatten(1, 2)[:, : chunk.end]
            out[lo:hi] = causal_prefill_attention(q[lo:hi], k, v, chunk.start, part.scale)
        return out
