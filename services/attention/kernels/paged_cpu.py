"""Paged decode attention on CPU that reads the KV pool in place (numba, no gather).

The torch reference (reference.py) gathers each lane's blocks into a padded workspace, then runs two
batched matmuls and a masked softmax over it: every K/V byte is read from the pool, written to the
workspace and read again, and the matmuls with G = 3 query rows run far from the CPU's speed. Decode
attention is memory-bound, so this kernel reads each K and V row of a lane once, straight from its
pool block, and keeps everything else in cache:

    for each lane i (one KV head of one sequence, G query heads):
        pass 1, K:  s[p, g] = q[i, g] · K[block(p), p % bs] * scale   for p < len(i)   (scores, [L, G])
                    m[g] = max_p s[p, g]
        pass 2, V:  e = exp(s[p, g] - m[g]);  acc[g] += e * V[block(p), p % bs];  sum[g] += e
        out[i, g] = acc[g] / sum[g]

Block `block(p)` of lane i is `blocks[lane_start[i] + p // bs]` (PagedLanes, kernels/__init__.py).
The arithmetic is the reference's (fp32 scores, max-subtracted softmax), summed in another order:
results agree to ~1e-6 (tests/unit/test_paged_cpu.py), and greedy tokens stay those of transformers
(the end-to-end tests run through this kernel).

The kernel runs on the calling thread and releases the GIL (`nogil`), so attention pods serving
several Step streams run one kernel per stream thread at once. `decode` splits the lanes over
`threads` threads (by positions, so each gets a similar share of the bytes); the colocated engine
passes its torch thread count. fp32 pools only: other dtypes take the torch reference
(`supports`). numba compiles the kernel on first use and caches it on disk (`cache=True`); `warm_up`
does that at start-up so the first request does not pay for it.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np
import torch

# Split a step's lanes over threads only when each thread gets at least this many positions: below
# it, handing work to a thread costs more than it saves (~20-50 µs per hand-off).
MIN_POSITIONS_PER_THREAD = 4096


@cache
def available() -> bool:
    return importlib.util.find_spec("numba") is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode` runs this call: CPU, fp32 q and pool, numba installed."""
    return (
        q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32 and available()
    )


@cache
def _kernel() -> Any:
    import numba

    @numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
    def paged_decode(q, k_cache, v_cache, blocks, lane_start, lane_len, scale, out, first, last):
        _, group, dim = q.shape
        bs = k_cache.shape[1]
        longest = 1
        for i in range(first, last):
            longest = max(longest, lane_len[i])
        scores = np.empty((longest, group), dtype=np.float32)
        acc = np.empty((group, dim), dtype=np.float32)
        peak = np.empty(group, dtype=np.float32)
        total = np.empty(group, dtype=np.float32)
        for i in range(first, last):
            length, start = lane_len[i], lane_start[i]
            peak[:] = -np.inf
            for p0 in range(0, length, bs):  # pass 1: scores and their max, K read once
                block = blocks[start + p0 // bs]
                for t in range(min(bs, length - p0)):
                    for g in range(group):
                        s = np.float32(0.0)
                        for d in range(dim):
                            s += q[i, g, d] * k_cache[block, t, d]
                        s *= scale
                        scores[p0 + t, g] = s
                        peak[g] = max(peak[g], s)
            acc[:] = 0.0
            total[:] = 0.0
            for p0 in range(0, length, bs):  # pass 2: softmax weights times V, V read once
                block = blocks[start + p0 // bs]
                for t in range(min(bs, length - p0)):
                    for g in range(group):
                        e = np.float32(math.exp(scores[p0 + t, g] - peak[g]))
                        total[g] += e
                        for d in range(dim):
                            acc[g, d] += e * v_cache[block, t, d]
            for g in range(group):
                inverse = np.float32(1.0) / total[g]
                for d in range(dim):
                    out[i, g, d] = acc[g, d] * inverse

    return paged_decode


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads - 1, thread_name_prefix="paged-cpu")


def decode(
    q: torch.Tensor,  # [n_lanes, G, D] fp32
    k_cache: torch.Tensor,  # [num_blocks, bs, D] fp32
    v_cache: torch.Tensor,
    blocks: torch.Tensor,  # [NB] int32, lane after lane (PagedLanes.blocks)
    lane_start: torch.Tensor,  # [n_lanes] int32
    lane_len: torch.Tensor,  # [n_lanes] int32, each >= 1
    scale: float,
    threads: int = 1,
) -> torch.Tensor:  # [n_lanes, G, D]
    """Dense decode attention of every lane, its K/V read in place from the pool's blocks."""
    q = q.contiguous()
    out = torch.empty_like(q)
    n = q.shape[0]
    if n == 0:
        return out
    _check_layout(q, k_cache, v_cache, blocks, lane_start, lane_len)
    args = (
        q.numpy(),
        k_cache.numpy(),
        v_cache.numpy(),
        blocks.numpy(),
        lane_start.numpy(),
        lane_len.numpy(),
        np.float32(scale),
        out.numpy(),
    )
    kernel: Callable[..., None] = _kernel()
    cuts = _split(lane_len.numpy(), threads)
    if len(cuts) == 2:
        kernel(*args, 0, n)
        return out
    futures = [_pool(threads).submit(kernel, *args, lo, hi) for lo, hi in itertools.pairwise(cuts[1:])]
    kernel(*args, cuts[0], cuts[1])
    for future in futures:
        future.result()
    return out


_checked: tuple[torch.Tensor, torch.Tensor, int] | None = None  # the last table that passed


def _check_layout(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lane_start: torch.Tensor,
    lane_len: torch.Tensor,
) -> None:
    """The kernel does not bounds-check (numba): a bad table would read outside the pool, so check
    it (the tables come from the pod's own allocator, never from the wire). Every layer of a step
    passes the same `blocks` tensor (PagedLanes, built once per step): its table is checked once."""
    global _checked
    bs = k_cache.shape[1]
    if v_cache.shape != k_cache.shape or q.shape[-1] != k_cache.shape[-1] or k_cache.dim() != 3:
        raise ValueError(
            f"q {list(q.shape)} and K/V caches {list(k_cache.shape)}, {list(v_cache.shape)} disagree"
        )
    if lane_start.shape != (q.shape[0],) or lane_len.shape != (q.shape[0],):
        raise ValueError(f"{q.shape[0]} lanes need {q.shape[0]} starts and lengths")
    last = _checked  # one read: another thread may replace it (then this one checks again)
    if last is not None and last[0] is blocks and last[1] is lane_len and last[2] == k_cache.shape[0]:
        return
    if int(lane_len.min()) < 1:
        raise ValueError("every lane needs at least one position")
    needed = lane_start.long() + (lane_len.long() + bs - 1) // bs  # one past each lane's last block
    if int(lane_start.min()) < 0 or int(needed.max()) > blocks.numel():
        raise ValueError("a lane's blocks run past the block table")
    if int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]:
        raise ValueError(f"a block id is outside the pool's {k_cache.shape[0]} blocks")
    _checked = (blocks, lane_len, k_cache.shape[0])


def _split(lengths: np.ndarray, threads: int) -> list[int]:
    """Lane boundaries [0, ..., n] cutting the lanes into ≤ `threads` runs of similar total length."""
    n = len(lengths)
    total = int(lengths.sum())
    parts = min(threads, n, max(1, total // MIN_POSITIONS_PER_THREAD))
    if parts <= 1:
        return [0, n]
    running = np.cumsum(lengths)
    cuts = [0]
    for part in range(1, parts):
        cut = int(np.searchsorted(running, total * part / parts)) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), n - (parts - part)))
    cuts.append(n)
    return cuts


def warm_up(cache_like: torch.Tensor) -> None:
    """Compile (or load from numba's disk cache) the kernel now, not on the first request, when it
    will serve a pool like `cache_like` (one of its layers' K)."""
    if supports(cache_like, cache_like):
        _compile()


@cache
def _compile() -> None:
    q = torch.zeros(1, 1, 4)
    cache_ = torch.zeros(1, 2, 4)
    index = torch.zeros(1, dtype=torch.int32)
    decode(q, cache_, cache_, index, index, torch.ones(1, dtype=torch.int32), 1.0)
