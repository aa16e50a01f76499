"""Torch reference attention over the paged KV pool (exact; CPU or GPU).

Decode: one query per lane (lane = one KV head of one sequence, carrying its G query heads),
variable lengths with no padding beyond the last partial block of each lane. Every block is
scored independently and the per-lane softmax is assembled with scatter reductions — the same
split-K ("flash-decoding") arithmetic a GPU kernel does, written with batched matmuls:

    blocks  [NB]            block ids of all lanes, lane after lane
    k, v    [NB, bs, D]     gathered whole blocks
    scores  [NB, G, bs]     q_lane[block_lane] @ k^T, masked past each lane's length
    m       [n_lanes, G]    running max per lane (scatter amax)
    o       [n_lanes, G, D] Σ_blocks exp(scores - m) @ v / Σ exp(scores - m)

Prefill: per sequence, causal over the prompt with SDPA (GQA), queries offset by `start`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_attention(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    blocks: torch.Tensor,  # [NB] int64 block ids, lane after lane
    block_lane: torch.Tensor,  # [NB] int64 lane of each block
    valid: torch.Tensor,  # [NB, bs] bool: position holds a token
    scale: float,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,  # reusable [NB, bs, D] buffers for k, v
) -> torch.Tensor:  # [n_lanes, G, D]
    n_lanes, group, head_dim = q.shape
    if workspace is None:
        k = k_cache.index_select(0, blocks)  # [NB, bs, D]
        v = v_cache.index_select(0, blocks)
    else:  # gathering into warm buffers avoids page-faulting fresh memory every layer
        k = torch.index_select(k_cache, 0, blocks, out=workspace[0])
        v = torch.index_select(v_cache, 0, blocks, out=workspace[1])
    scores = torch.bmm(q.index_select(0, block_lane), k.transpose(1, 2)).float() * scale  # [NB, G, bs]
    scores.masked_fill_(~valid.unsqueeze(1), float("-inf"))
    block_max = scores.amax(dim=-1)  # [NB, G]
    lane_max = torch.full((n_lanes, group), float("-inf"), dtype=scores.dtype, device=q.device)
    lane_max.scatter_reduce_(0, block_lane[:, None].expand_as(block_max), block_max, reduce="amax")
    probs = torch.exp(scores - lane_max.index_select(0, block_lane).unsqueeze(-1))  # [NB, G, bs]
    denom = torch.zeros((n_lanes, group), dtype=scores.dtype, device=q.device)
    denom.index_add_(0, block_lane, probs.sum(dim=-1))
    partial = torch.bmm(probs.to(v.dtype), v).float()  # [NB, G, D]
    out = torch.zeros((n_lanes, group, head_dim), dtype=partial.dtype, device=q.device)
    out.index_add_(0, block_lane, partial)
    return (out / denom.unsqueeze(-1)).to(q.dtype)


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
