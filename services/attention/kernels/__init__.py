"""Attention kernels for the attention pod (Triton on GPU, numba on CPU), behind one dispatcher.

Lifecycle of one decode step on the pod (one forward, every layer):

    layout = DecodeLayout.build(lanes, bs, G, device)          # once per step (reference.py)
    o = decode_attention(q, pool.k[l], pool.v[l], layout, s)   # every layer, q [n_lanes, G, D]
        ├─ CUDA tensors and triton installed ─▶ paged_decode.paged_decode_attention (Triton)
        │     PagedLanes.from_layout(layout)   built on the step's first layer, reused by the others
        │     kernel 1, grid [n_lanes, n_splits]: one program = one lane's G query heads over one
        │               partition of its context (each K/V row read once) ─▶ partial out + log-sum-exp
        │     kernel 2, grid [n_lanes, G]: merge the partitions (skipped when n_splits == 1)
        ├─ CPU fp32 tensors and numba installed ─▶ paged_cpu.decode (numba, same PagedLanes,
        │     reads each lane's K/V rows once from its pool blocks; lanes split over torch's threads)
        └─ otherwise ─▶ reference.paged_decode_attention (torch, CPU or GPU)

SparQ (sparq.py): phase 1 in sparq_kernels.py (one pass over kt_cache, then the scores), the selection in
sparq_pick.py (pool rows of the top-k positions), phase 2 = kernel 1 in "gather" mode over those rows.

Memory layout the kernels read (kv_pool.py), per layer, one block = `bs` positions of ONE KV head:

    k_cache, v_cache [num_blocks, bs, D]        kt_cache [num_blocks, D, bs] (SparQ only)
      block b: ┌ pos 0: d0 d1 ... dD-1 ┐          block b: ┌ d0:  pos 0 1 ... bs-1 ┐
               │ pos 1: d0 d1 ... dD-1 │                   │ d1:  pos 0 1 ... bs-1 │
               └ ...                   ┘                   └ ...                  ┘

    PagedLanes (CSR block table):
      blocks     [NB]       block ids, lane after lane (DecodeLayout.blocks)
      lane_start [n_lanes]  index in `blocks` of each lane's first block
      lane_len   [n_lanes]  tokens of each lane; position p of lane i lives in
                            block blocks[lane_start[i] + p // bs], row p % bs

triton and numba are imported lazily (inside their paths), so neither is needed where it is not used.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache

import torch

from services.attention.kernels import paged_cpu
from services.attention.reference import DecodeLayout, DecodeWorkspace, paged_decode_attention


class Backend(Enum):
    AUTO = "auto"  # Triton for CUDA tensors, numba for CPU fp32 ones (when installed), else torch
    TORCH = "torch"
    TRITON = "triton"  # CPU tensors only under TRITON_INTERPRET=1
    CPU = "cpu"  # the numba kernel (paged_cpu.py): CPU fp32 tensors


@dataclass(slots=True, frozen=True)
class PagedLanes:
    """Each lane's blocks and length as device tensors, the form the kernels index."""

    blocks: torch.Tensor  # [NB] int32 block ids, lane after lane
    lane_start: torch.Tensor  # [n_lanes] int32 index in `blocks` of each lane's first block
    lane_len: torch.Tensor  # [n_lanes] int32 tokens per lane (>= 1)
    block_size: int  # positions per block (bs)
    total_blocks: int  # NB, known on the host: bounds the work without reading lane_len back
    host_lengths: tuple[int, ...] | None = None  # lane_len on the host, when the builder knew it

    @property
    def n_lanes(self) -> int:
        return int(self.lane_len.shape[0])

    @classmethod
    def build(cls, lanes: Sequence[tuple[Sequence[int], int]], block_size: int, device: str) -> PagedLanes:
        """lanes: (block table, length) per lane, as DecodeLayout.build takes them."""
        blocks: list[int] = []
        starts: list[int] = []
        lengths: list[int] = []
        for table, length in lanes:
            n_blocks = -(-length // block_size)
            if length < 1 or n_blocks > len(table):
                raise ValueError(
                    f"a lane of length {length} needs {n_blocks} >= 1 blocks, its table has {len(table)}"
                )
            starts.append(len(blocks))
            blocks.extend(table[:n_blocks])
            lengths.append(length)
        return cls(
            blocks=torch.tensor(blocks, dtype=torch.int32, device=device),
            lane_start=torch.tensor(starts, dtype=torch.int32, device=device),
            lane_len=torch.tensor(lengths, dtype=torch.int32, device=device),
            block_size=block_size,
            total_blocks=len(blocks),
            host_lengths=tuple(lengths),
        )

    @classmethod
    def from_layout(cls, layout: DecodeLayout, n_lanes: int) -> PagedLanes:
        """Device-side conversion (no host sync): lanes' blocks are contiguous in layout.blocks."""
        device = layout.blocks.device
        lane = layout.block_lane
        ones = torch.ones_like(lane, dtype=torch.int32)
        counts = torch.zeros(n_lanes, dtype=torch.int32, device=device).index_add_(0, lane, ones)
        filled = layout.valid.sum(dim=1, dtype=torch.int32)  # [NB] tokens in each block
        return cls(
            blocks=layout.blocks.to(torch.int32),
            lane_start=torch.cumsum(counts, 0, dtype=torch.int32) - counts,
            lane_len=torch.zeros(n_lanes, dtype=torch.int32, device=device).index_add_(0, lane, filled),
            block_size=int(layout.valid.shape[1]),
            total_blocks=int(layout.blocks.numel()),
        )

    def lengths(self) -> tuple[int, ...]:
        """Lane lengths on the host (reads them back from the device when the builder did not know)."""
        if self.host_lengths is not None:
            return self.host_lengths
        return tuple(int(x) for x in self.lane_len.tolist())

    def padded_table(self, max_blocks: int) -> torch.Tensor:
        """[n_lanes, max_blocks] int64 block ids, 0 past each lane's last block (torch paths)."""
        j = torch.arange(max_blocks, device=self.blocks.device)
        index = self.lane_start.long()[:, None] + j[None, :]
        owned = j[None, :] < ((self.lane_len.long() + self.block_size - 1) // self.block_size)[:, None]
        table = self.blocks.long()[index.clamp(max=max(self.total_blocks - 1, 0))]
        return torch.where(owned, table, torch.zeros_like(table))


def decode_bytes(lengths: Sequence[int], head_dim: int, itemsize: int) -> int:
    """Bytes dense decode attention must read: every K and V row of every lane once."""
    return 2 * sum(lengths) * head_dim * itemsize


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device, backend: Backend) -> bool:
    if backend is Backend.TRITON:
        if not triton_available():
            raise RuntimeError(
                "Backend.TRITON needs triton: pip install triton (CUDA builds of torch bring it)"
            )
        return True
    return backend is Backend.AUTO and device.type == "cuda" and triton_available()


def use_cpu_kernel(q: torch.Tensor, k_cache: torch.Tensor, backend: Backend = Backend.AUTO) -> bool:
    """Whether decode attention of `q` over `k_cache` runs the numba kernel (paged_cpu.py)."""
    if backend is Backend.CPU:
        if not paged_cpu.supports(q, k_cache):
            raise RuntimeError(
                "Backend.CPU needs numba (pip install numba) and CPU fp32 tensors, "
                f"got {q.device.type} {q.dtype} q over a {k_cache.dtype} pool"
            )
        return True
    return backend is Backend.AUTO and paged_cpu.supports(q, k_cache)


class _StepLanes:
    """PagedLanes of the last DecodeLayout seen: a step's layers share one layout object, so the
    conversion runs once per step. Holding the layout keeps its identity from being reused."""

    def __init__(self) -> None:
        self._last: tuple[DecodeLayout, PagedLanes] | None = None

    def get(self, layout: DecodeLayout, n_lanes: int) -> PagedLanes:
        last = self._last  # one read: another thread may replace it (then we just convert again)
        if last is not None and last[0] is layout and last[1].n_lanes == n_lanes:
            return last[1]
        lanes = PagedLanes.from_layout(layout, n_lanes)
        self._last = (layout, lanes)
        return lanes


_step_lanes = _StepLanes()


def decode_attention(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    layout: DecodeLayout,
    scale: float,
    workspace: DecodeWorkspace | None = None,  # reference path only: reusable gather buffers
    *,
    backend: Backend = Backend.AUTO,
) -> torch.Tensor:  # [n_lanes, G, D], q's dtype
    """Same contract as reference.paged_decode_attention; the Triton kernel on CUDA, the numba
    kernel on CPU fp32 (`paged_cpu.supports`), the torch reference otherwise or when asked."""
    if use_cpu_kernel(q, k_cache, backend):
        lanes = _step_lanes.get(layout, q.shape[0])
        threads = torch.get_num_threads()
        return paged_cpu.decode(
            q, k_cache, v_cache, lanes.blocks, lanes.lane_start, lanes.lane_len, scale, threads
        )
    if not use_triton(q.device, backend):
        return paged_decode_attention(q, k_cache, v_cache, layout, scale, workspace)
    from services.attention.kernels import paged_decode

    lanes = _step_lanes.get(layout, q.shape[0])
    return paged_decode.paged_decode_attention(q, k_cache, v_cache, lanes, scale)
