"""In-process attention part: the KV pool and reference attention in the caller's process.

Used by the colocated engine and by tests; attention pods wrap the same pool behind gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.attention.kernels import decode_attention
from services.attention.kv_pool import KVPool
from services.attention.reference import DecodeLayout, DecodeWorkspace, causal_prefill_attention
from services.core.attention import AttentionPart, AttentionStep, ReserveResult, SeqChunk


class LocalAttention(AttentionPart):
    """Holds every KV head of every sequence (request-partitioned placement on one device)."""

    def __init__(self, pool: KVPool, num_kv_heads: int, num_heads: int) -> None:
        self.pool = pool
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.scale = pool.config.head_dim**-0.5

    def open(self, seq_id: int, num_lanes: int | None = None) -> None:
        """Start an empty sequence holding `num_lanes` KV heads (default: all of the model's).

        An attention pod holds only its placement's slice of a sequence's heads; a step may mix
        sequences holding different numbers of heads (see `LocalStep.attend_lanes`).
        """
        self.pool.allocator.open(seq_id, self.num_kv_heads if num_lanes is None else num_lanes)

    def reserve(self, seq_id: int, num_tokens: int) -> ReserveResult:
        return self.pool.allocator.reserve(seq_id, num_tokens)

    def free(self, seq_id: int) -> None:
        self.pool.allocator.free(seq_id)

    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the whole pool could hold."""
        return self.pool.allocator.num_blocks // self.num_kv_heads * self.pool.block_size

    def begin(self, chunks: Sequence[SeqChunk]) -> LocalStep:
        return LocalStep(self, chunks)


class LocalStep(AttentionStep):
    """Index tensors for one forward, computed once and reused by every layer.

    Works on *lanes* (one KV head of one new token), laid out chunk after chunk, token after token,
    then the sequence's heads in order: M = sum(length * heads of the sequence). A sequence holds
    any number of heads (its block table's lanes), so on an attention pod rows of different
    sequences may carry different head counts; `attend` is the uniform case reshaped.
    """

    def __init__(self, part: LocalAttention, chunks: Sequence[SeqChunk]) -> None:
        self.part = part
        self.chunks = list(chunks)
        config, bs = part.pool.config, part.pool.block_size
        tables = [part.pool.allocator.block_table(c.seq_id) for c in self.chunks]
        # Write slots, [M] in lane order: where each new token's K/V go.
        write = [
            lane[pos // bs] * bs + pos % bs
            for chunk, table in zip(self.chunks, tables, strict=True)
            for pos in range(chunk.start, chunk.end)
            for lane in table
        ]
        self.write_slots = torch.tensor(write, dtype=torch.long, device=config.device)
        self.lane_offsets = [0]  # [len(chunks) + 1]: first lane of each chunk
        for chunk, table in zip(self.chunks, tables, strict=True):
            self.lane_offsets.append(self.lane_offsets[-1] + chunk.length * len(table))
        # Decode rows (length 1) are batched together; longer chunks run one sequence at a time.
        self.decode_rows = [i for i, c in enumerate(self.chunks) if c.length == 1]
        self.decode_index = torch.tensor(
            [
                lane
                for i in self.decode_rows
                for lane in range(self.lane_offsets[i], self.lane_offsets[i + 1])
            ],
            dtype=torch.long,
            device=config.device,
        )
        lanes = [(lane, self.chunks[i].end) for i in self.decode_rows for lane in tables[i]]
        self.layout = DecodeLayout.build(lanes, bs, part.group, config.device)
        # Gather buffers reused by every layer; only the torch reference gathers, the GPU kernels
        # read the pool in place.
        on_gpu = torch.device(config.device).type == "cuda"
        self.workspace = None if on_gpu else DecodeWorkspace.for_layout(self.layout, part.pool.k[0])
        self.prefill_tables = {
            i: torch.tensor(tables[i], dtype=torch.long, device=config.device)  # [heads, n_blocks]
            for i, c in enumerate(self.chunks)
            if c.length > 1
        }

    @property
    def num_lanes(self) -> int:
        return self.lane_offsets[-1]

    def _decode(self, layer: int, q_lanes: torch.Tensor) -> torch.Tensor:
        """q_lanes: [n_lanes, G, D] -> [n_lanes, G, D]."""
        pool = self.part.pool
        return decode_attention(  # Triton on CUDA, the torch reference elsewhere
            q_lanes, pool.k[layer], pool.v[layer], self.layout, self.part.scale, self.workspace
        )

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
        """q: [M, G, D]; k_new, v_new: [M, D] -> o: [M, G, D], lanes in the step's lane order."""
        pool, part = self.part.pool, self.part
        pool.write(layer, self.write_slots, k_new, v_new)
        if len(self.decode_rows) == len(self.chunks):  # pure decode step: no scatter needed
            return self._decode(layer, q)
        out = torch.empty_like(q)
        if self.decode_rows:
            o = self._decode(layer, q.index_select(0, self.decode_index))
            out.index_copy_(0, self.decode_index, o)
        for i, table in self.prefill_tables.items():
            chunk, lo, hi = self.chunks[i], self.lane_offsets[i], self.lane_offsets[i + 1]
            q_rows = q[lo:hi].reshape(chunk.length, -1, q.shape[-1])  # [L, heads * G, D]
            k = pool.k[layer][table].flatten(1, 2)[:, : chunk.end]  # [heads, S, D]
            v = pool.v[layer][table].flatten(1, 2)[:, : chunk.end]
            o = causal_prefill_attention(q_rows, k, v, chunk.start, part.scale)
            out[lo:hi] = o.reshape(hi - lo, part.group, -1)
        return out
