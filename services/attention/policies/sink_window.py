"""`sink_window` (StreamingLLM, arXiv 2309.17453): the first tokens (attention sinks) and a recent window.

Per lane, with n positions and budget b: keep = max(4 + 64, ceil(b · n)) tokens, the 4 sink tokens
(positions 0..3) and the keep - 4 most recent ones. Nothing is evicted (the pool keeps every token;
only the reads shrink). Lanes with keep >= n are dense. Bytes per lane and layer: 2 · keep · D · itemsize
(the gathered K and V rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.attention.policies import RECENT_TOKENS, SINK_TOKENS, AttentionPolicy, DecodeLane, PolicyStep
from services.attention.policies.common import LaneTensors, gathered_attention, keep_tokens, row_bytes
from services.core.attention import PolicyName

FLOOR = SINK_TOKENS + RECENT_TOKENS


def window_indices(
    length: torch.Tensor,  # [n] tokens per lane
    keep: torch.Tensor,  # [n] tokens kept per lane (>= SINK_TOKENS)
    sinks: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # index [n, S] stored indices, valid [n, S]
    """Stored indices [0, sinks) then [length - (keep - sinks), length), padded to the widest lane."""
    j = torch.arange(int(keep.max()), device=length.device)[None, :]  # [1, S]
    window_start = (length - (keep - sinks))[:, None]  # [n, 1]
    index = torch.where(j < sinks, j, window_start + j - sinks)
    valid = j < keep[:, None]
    return index.clamp(min=0).minimum(length[:, None] - 1), valid


class SinkWindowPolicy(AttentionPolicy):
    name = PolicyName.SINK_WINDOW

    def covers(self, lane: DecodeLane) -> bool:
        return keep_tokens(lane, FLOOR) >= lane.length

    def begin_sparse(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        return SinkWindowStep(self, lanes)


class SinkWindowStep(PolicyStep):
    def __init__(self, policy: AttentionPolicy, lanes: Sequence[DecodeLane]) -> None:
        pool = policy.pool
        device = pool.config.device
        self.policy = policy
        self.lanes = LaneTensors.build(lanes, pool.block_size, device)
        keep = torch.tensor([keep_tokens(lane, FLOOR) for lane in lanes], device=device)
        self.index, self.valid = window_indices(self.lanes.length, keep, SINK_TOKENS)
        self.slots = self.lanes.slots(self.index, pool.block_size)  # [n, S]
        itemsize = torch.empty((), dtype=pool.config.dtype).element_size()
        self.layer_bytes = row_bytes(int(keep.sum()), pool.config.head_dim, itemsize)
        self.bytes_read = 0

    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        pool = self.policy.pool
        self.bytes_read += self.layer_bytes
        return gathered_attention(q, pool.k[layer], pool.v[layer], self.slots, self.valid, self.policy.scale)

    def attended(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        # Padding repeats the last index with valid False: add, so it cannot overwrite a True.
        hits = torch.zeros((q.shape[0], self.lanes.width), dtype=torch.int32, device=q.device)
        return hits.scatter_add_(1, self.index, self.valid.int()) > 0
