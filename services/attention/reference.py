"""Torch reference attention over the paged KV pool (exact; CPU or GPU).

Decode: one query per lane (lane = one KV head of one sequence, carrying its G query heads). Lanes
of similar length are grouped into *buckets*; a bucket's blocks are gathered into one padded
`[n, W, D]` buffer per K and V (W = its longest lane, in whole blocks) and attended with two
batched matmuls and one masked softmax:

    bucket.blocks  [n * MB]        each lane's blocks, padded to MB with its last block (masked)
    k, v           [n, W, D]       gathered into a reusable workspace (W = MB * bs)
    scores         [n, G, W]       q_lane @ k^T * scale, -inf past each lane's length
    o              [n, G, D]       softmax(scores) @ v

Buckets keep the padding bounded (`BUCKET_SLACK`: padded blocks ≤ 1.25× real ones, or a few
blocks), so a long lane does not pad a batch of short ones. It replaced block-wise scoring with
scatter reductions (about twice as many, smaller ops); bench/engine.py measures the engine it serves.
GPUs use the Triton kernels instead (kernels/), which read the pool in place.

Prefill: per sequence, causal over the prompt with SDPA (GQA), queries offset by `start`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BUCKET_SLACK = 1.25  # a bucket's padded blocks may exceed its real blocks by this factor ...
BUCKET_MIN_WASTE = 4  # ... or by this many blocks per bucket, whichever is larger


@dataclass(slots=True, frozen=True)
class DecodeBucket:
    """Lanes attended together, padded to the longest of them."""

    lanes: torch.Tensor  # [n] lane indices, ascending
    blocks: torch.Tensor  # [n * MB] block ids, lane after lane, padded with each lane's last block
    valid: torch.Tensor  # [n, 1, MB * bs] position < lane length
    contiguous: bool  # lanes are 0..n-1 of the step (the bucket is the whole step): no gather of q


@dataclass(slots=True, frozen=True)
class DecodeLayout:
    """Where every decode lane's blocks are; built once per step, used by every layer."""

    blocks: torch.Tensor  # [NB] block ids, lane after lane (what the GPU kernels index)
    block_lane: torch.Tensor  # [NB] lane of each block
    valid: torch.Tensor  # [NB, bs] position holds a token (only each lane's last block is partial)
    buckets: tuple[DecodeBucket, ...]  # the torch path's grouping of lanes by length
    padded_blocks: int  # Σ over buckets of n * MB: the workspace's size in blocks

    @classmethod
    def build(
        cls, lanes: list[tuple[list[int], int]], block_size: int, group: int, device: str
    ) -> DecodeLayout:
        """lanes: (block table, length) per lane; group: query heads per KV head (G)."""
        blocks: list[int] = []
        block_lane: list[int] = []
        filled: list[int] = []  # tokens in each block
        for index, (table, length) in enumerate(lanes):
            n_blocks = -(-length // block_size)
            blocks.extend(table[:n_blocks])
            block_lane.extend([index] * n_blocks)
            filled.extend([block_size] * (n_blocks - 1))
            filled.append(length - (n_blocks - 1) * block_size)
        offsets = torch.arange(block_size, device=device)
        buckets = tuple(_bucket(lanes, members, block_size, device) for members in _group(lanes, block_size))
        return cls(
            blocks=torch.tensor(blocks, dtype=torch.long, device=device),
            block_lane=torch.tensor(block_lane, dtype=torch.long, device=device),
            valid=offsets[None, :] < torch.tensor(filled, dtype=torch.long, device=device)[:, None],
            buckets=buckets,
            padded_blocks=sum(b.blocks.numel() for b in buckets),
        )


def _group(lanes: list[tuple[list[int], int]], block_size: int) -> list[list[int]]:
    """Lane indices in buckets: longest first, a bucket grows while its padding stays bounded."""
    order = sorted(range(len(lanes)), key=lambda i: -lanes[i][1])
    groups: list[list[int]] = []
    widest = real = 0
    for i in order:
        n_blocks = -(-lanes[i][1] // block_size)
        padded, grown = widest * (len(groups[-1]) + 1) if groups else 0, real + n_blocks
        if groups and padded <= max(BUCKET_SLACK * grown, grown + BUCKET_MIN_WASTE):
            groups[-1].append(i)
            real = grown
        else:
            groups.append([i])
            widest, real = n_blocks, n_blocks
    return [sorted(g) for g in groups]


def _bucket(
    lanes: list[tuple[list[int], int]], members: list[int], block_size: int, device: str
) -> DecodeBucket:
    width = max(-(-lanes[i][1] // block_size) for i in members)  # MB
    blocks: list[int] = []
    for i in members:
        table, length = lanes[i]
        own = table[: -(-length // block_size)]
        blocks.extend(own + [own[-1]] * (width - len(own)))
    lengths = torch.tensor([lanes[i][1] for i in members], dtype=torch.long, device=device)
    positions = torch.arange(width * block_size, device=device)
    return DecodeBucket(
        lanes=torch.tensor(members, dtype=torch.long, device=device),
        blocks=torch.tensor(blocks, dtype=torch.long, device=device),
        valid=(positions[None, :] < lengths[:, None]).unsqueeze(1),
        contiguous=members == list(range(len(lanes))),
    )


@dataclass(slots=True, frozen=True)
class DecodeWorkspace:
    """Gather buffers reused by every layer of a step: fresh memory per layer would page-fault."""

    k: torch.Tensor  # [padded_blocks, bs, D]
    v: torch.Tensor

    @classmethod
    def for_layout(cls, layout: DecodeLayout, cache: torch.Tensor) -> DecodeWorkspace:
        """Buffers for `layout`, shaped and typed like the pool's `cache` [num_blocks, bs, D]."""
        shape = (layout.padded_blocks, *cache.shape[1:])
        return cls(cache.new_empty(shape), cache.new_empty(shape))


def paged_decode_attention(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    layout: DecodeLayout,
    scale: float,
    workspace: DecodeWorkspace | None = None,  # else allocated per call
    on_probs: Callable[[DecodeBucket, torch.Tensor], None] | None = None,
) -> torch.Tensor:  # [n_lanes, G, D]
    """`on_probs(bucket, p)` sees each bucket's attention probabilities p [n, G, W] (0 past a lane's
    length) before they weight V: heavy_hitter accumulates them, with the very arithmetic of dense."""
    work = workspace or DecodeWorkspace.for_layout(layout, k_cache)
    out = q if len(layout.buckets) == 1 and layout.buckets[0].contiguous else torch.empty_like(q)
    used = 0
    for bucket in layout.buckets:
        n, nb = bucket.lanes.numel(), bucket.blocks.numel()
        k = torch.index_select(k_cache, 0, bucket.blocks, out=work.k[used : used + nb]).view(
            n, -1, q.shape[-1]
        )
        v = torch.index_select(v_cache, 0, bucket.blocks, out=work.v[used : used + nb]).view(
            n, -1, q.shape[-1]
        )
        used += nb
        qb = q if bucket.contiguous else q.index_select(0, bucket.lanes)  # [n, G, D]
        scores = torch.bmm(qb, k.transpose(1, 2)).float() * scale  # [n, G, W]
        scores.masked_fill_(~bucket.valid, float("-inf"))
        probs = scores.softmax(dim=-1)
        if on_probs is not None:
            on_probs(bucket, probs)
        o = torch.bmm(probs.to(v.dtype), v).to(q.dtype)  # [n, G, D]
        if out is q:
            return o
        out.index_copy_(0, bucket.lanes, o)
    return out


def causal_prefill_attention(
    q: torch.Tensor,  # [L, Hq, D]   new tokens at positions start..start+L-1
    k: torch.Tensor,  # [Hkv, S, D]  all positions 0..S-1 of the sequence, S = start + L
    v: torch.Tensor,  # [Hkv, S, D]
    start: int,
    scale: float,
) -> torch.Tensor:  # [L, Hq, D]
    length = q.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
    kh, vh = k.unsqueeze(0), v.unsqueeze(0)
    if start == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        key_pos = torch.arange(k.shape[1], device=q.device)
        query_pos = torch.arange(start, start + length, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [L, S]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)  # [L, Hq, D]
