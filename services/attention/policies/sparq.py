"""`sparq` (SparQ, arXiv 2312.04985): top-r query components approximate the scores, the top-k keys
(plus a recent window) are read exactly. The step itself is `kernels.sparq.sparq_decode` (Triton on
CUDA); on CPUs `sparq_cpu.sparq_decode_cpu`, the same function laid out for CPUs.

Budget b of dense bytes (2 · n · D per lane and layer) splits in half between the two phases:

    r      = clamp(round(b · D), 1, D)              phase 1 reads r of D components of every key: r / 2D
    k      = ceil((b - r / 2D) · n), at least 64   phase 2 reads k whole K and V rows:             k / n
    window = clamp(k / 4, 16, 64)                   the most recent positions, forced into the k

so b = 1/8 at D = 64 is r = 8 and k = n / 16. Sink tokens are not forced (the kernel's semantics);
their scores put them in the top-k anyway. Mean-value reallocation is off (see kernels/sparq.py: with
GQA the selection is shared by the group). Lanes where phase 2 would read every key (k >= n, or
r/2D · n + k >= n: no saving) are dense. Lanes of a step are grouped by (r, k rounded up to a block,
window) and each group is one vectorized call.

Phase 1 reads a transposed copy of K, `kt[layer]: [num_blocks, D, bs]` (kernels.sparq.kt_from_k's
layout), so the r components of a block's keys are r contiguous rows. It is derived from the pool
lazily (common.BlockMirror): a block once full, the lane's last block at every step. It costs as much
memory as K itself (allocated when the pod first runs a sparq step below full budget). Bytes read per step:
the kernel's count (r · n + 2 · min(k, n) · D per lane) plus the K rows read to refresh kt.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.attention.kernels import Backend, PagedLanes, use_triton
from services.attention.kernels.sparq import sparq_decode
from services.attention.kv_pool import KVPool
from services.attention.policies import RECENT_TOKENS, AttentionPolicy, DecodeLane, PolicyStep
from services.attention.policies.common import BlockMirror
from services.attention.policies.sparq_cpu import sparq_decode_cpu, sparq_positions
from services.core.attention import PolicyName

MIN_K = 64  # keys phase 2 reads at least
MIN_WINDOW = 16


@dataclass(slots=True, frozen=True)
class SparqParams:
    r: int  # query components phase 1 uses
    k: int  # keys phase 2 reads (the window included)
    window: int  # most recent positions forced into the k

    @classmethod
    def for_lane(cls, lane: DecodeLane, head_dim: int, block_size: int) -> SparqParams:
        budget = lane.spec.budget if lane.spec.budget is not None else 1.0
        r = min(head_dim, max(1, round(budget * head_dim)))
        k = max(MIN_K, math.ceil((budget - r / (2 * head_dim)) * lane.positions))
        k = -(-k // block_size) * block_size  # fewer distinct groups in a batch
        return cls(r, k, min(RECENT_TOKENS, max(MIN_WINDOW, k // 4)))

    def saves(self, length: int, head_dim: int) -> bool:
        """True when the step reads less than dense would: phase 1 plus phase 2 below 2 · n · D."""
        return self.k < length and self.r * length + 2 * self.k * head_dim < 2 * length * head_dim


class SparqPolicy(AttentionPolicy):
    name = PolicyName.SPARQ

    def __init__(self, pool: KVPool, group: int, scale: float, lock: threading.Lock) -> None:
        super().__init__(pool, group, scale, lock)
        # Per layer [num_blocks, D, bs], allocated on first use (as much memory as K); a block is
        # transposed into it before phase 1 reads it.
        self.kt: list[torch.Tensor] = []
        self.mirror = BlockMirror(pool.block_size, pool.config.device)

    def params(self, lane: DecodeLane) -> SparqParams:
        return SparqParams.for_lane(lane, self.pool.config.head_dim, self.pool.block_size)

    def covers(self, lane: DecodeLane) -> bool:
        return not self.params(lane).saves(lane.length, self.pool.config.head_dim)

    def begin_sparse(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        if not self.kt:
            config = self.pool.config
            shape = (self.pool.allocator.num_blocks, config.head_dim, self.pool.block_size)
            self.kt = [torch.empty(shape, dtype=config.dtype, device=config.device) for _ in self.pool.k]
        return SparqStep(self, lanes)

    def forget(self, seq_id: int) -> None:
        self.mirror.forget(seq_id)


@dataclass(slots=True, frozen=True)
class _Group:
    index: torch.Tensor  # [m] the group's lanes among the step's
    lanes: PagedLanes
    params: SparqParams


class SparqStep(PolicyStep):
    def __init__(self, policy: SparqPolicy, lanes: Sequence[DecodeLane]) -> None:
        pool = policy.pool
        device = pool.config.device
        self.policy = policy
        self.lanes = list(lanes)
        by_params: dict[SparqParams, list[int]] = {}
        for i, lane in enumerate(lanes):
            by_params.setdefault(policy.params(lane), []).append(i)
        self.groups = [
            _Group(
                torch.tensor(index, dtype=torch.long, device=device),
                PagedLanes.build([(lanes[i].table, lanes[i].length) for i in index], pool.block_size, device),
                params,
            )
            for params, index in by_params.items()
        ]
        self.refresh_blocks, _filled = policy.mirror.refresh(lanes)
        itemsize = torch.empty((), dtype=pool.config.dtype).element_size()
        self.refresh_bytes = self.refresh_blocks.numel() * pool.block_size * pool.config.head_dim * itemsize
        gpu = use_triton(torch.device(device), Backend.AUTO)
        self.step = sparq_decode if gpu else sparq_decode_cpu
        self.bytes_read = 0

    def _refresh(self, layer: int) -> None:
        """kt of the blocks that changed since they were last derived (idempotent within a step)."""
        if self.refresh_blocks.numel():
            keys = self.policy.pool.k[layer].index_select(0, self.refresh_blocks)  # [X, bs, D]
            self.policy.kt[layer][self.refresh_blocks] = keys.transpose(1, 2)

    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        self._refresh(layer)
        self.bytes_read += self.refresh_bytes
        pool, policy = self.policy.pool, self.policy
        k, v, kt = pool.k[layer], pool.v[layer], policy.kt[layer]
        if len(self.groups) == 1:
            g = self.groups[0]
            result = self.step(q, k, v, kt, g.lanes, g.params.r, g.params.k, g.params.window, policy.scale)
            self.bytes_read += result.bytes_read
            return result.out
        out = torch.empty_like(q)
        for g in self.groups:
            p = g.params
            result = self.step(
                q.index_select(0, g.index), k, v, kt, g.lanes, p.r, p.k, p.window, policy.scale
            )
            out.index_copy_(0, g.index, result.out)
            self.bytes_read += result.bytes_read
        return out

    def attended(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        self._refresh(layer)
        width = max(lane.length for lane in self.lanes)
        hits = torch.zeros((q.shape[0], width), dtype=torch.int32, device=q.device)
        for g in self.groups:
            p = g.params
            qg = q.index_select(0, g.index)
            sel, _ = sparq_positions(
                qg, self.policy.kt[layer], g.lanes, p.r, p.k, p.window, self.policy.scale
            )
            inside = (sel < g.lanes.lane_len.long()[:, None]).int()
            rows = torch.zeros((qg.shape[0], width), dtype=torch.int32, device=q.device)
            rows.scatter_add_(1, sel.clamp(max=width - 1), inside)
            hits.index_add_(0, g.index, rows)
        return hits > 0

    def finish(self) -> None:
        self.policy.mirror.commit(self.lanes)
