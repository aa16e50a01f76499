"""`dense`: exact attention over every cached token (the Triton kernel on CUDA, the numba kernel on
CPU fp32, the torch reference elsewhere: kernels/__init__.py). Every other policy sends the lanes it
covers here, so "covers the whole cache" is exactly dense. Bytes read per lane and layer:
2 · length · D · itemsize (every K and V row once)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.attention.kernels import decode_attention, decode_bytes, paged_cpu
from services.attention.policies import AttentionPolicy, DecodeLane, PolicyStep
from services.attention.policies.common import positions_mask
from services.attention.reference import DecodeLayout, DecodeWorkspace
from services.core.attention import PolicyName


class DensePolicy(AttentionPolicy):
    name = PolicyName.DENSE

    def covers(self, lane: DecodeLane) -> bool:
        return True

    def begin_sparse(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        return DenseStep(self, lanes)


class DenseStep(PolicyStep):
    """Dense decode over the lanes' stored tokens, one layout for every layer."""

    def __init__(self, policy: AttentionPolicy, lanes: Sequence[DecodeLane]) -> None:
        pool = policy.pool
        config = pool.config
        self.policy = policy
        self.lanes = list(lanes)
        self.layout = DecodeLayout.build(
            [(list(lane.table), lane.length) for lane in lanes], pool.block_size, policy.group, config.device
        )
        # Gather buffers reused by every layer (fresh memory per layer would page-fault); only the
        # torch reference gathers, the GPU and CPU kernels read the pool in place.
        in_place = torch.device(config.device).type == "cuda" or paged_cpu.supports(pool.k[0], pool.k[0])
        self.workspace = None if in_place else DecodeWorkspace.for_layout(self.layout, pool.k[0])
        itemsize = torch.empty((), dtype=config.dtype).element_size()
        self.layer_bytes = decode_bytes([lane.length for lane in lanes], config.head_dim, itemsize)
        self.bytes_read = 0

    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        pool = self.policy.pool
        self.bytes_read += self.layer_bytes
        return decode_attention(
            q, pool.k[layer], pool.v[layer], self.layout, self.policy.scale, self.workspace
        )

    def attended(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return positions_mask(self.lanes, self.policy.pool.config.device)


class SplitStep(PolicyStep):
    """Two steps over disjoint lane subsets (`begin` splits covered lanes from the others)."""

    def __init__(
        self, *parts: tuple[list[int], PolicyStep], device: str
    ) -> None:  # parts: (lane indices, step)
        self.parts = [(torch.tensor(index, dtype=torch.long, device=device), step) for index, step in parts]
        self.bytes_read = 0

    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for index, step in self.parts:
            before = step.bytes_read
            out.index_copy_(0, index, step.decode(layer, q.index_select(0, index)))
            self.bytes_read += step.bytes_read - before
        return out

    def attended(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        masks = [(index, step.attended(layer, q.index_select(0, index))) for index, step in self.parts]
        width = max(mask.shape[1] for _, mask in masks)
        out = torch.zeros((q.shape[0], width), dtype=torch.bool, device=q.device)
        for index, mask in masks:
            out[index, : mask.shape[1]] = mask
        return out

    def finish(self) -> None:
        for _, step in self.parts:
            step.finish()
