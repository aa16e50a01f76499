"""Torch reference attention over the paged KV pool (exact; CPU or GPU).

Decode: one query per lane (lane = one KV head of one sequence, carrying its G query heads),
variable lengths with no padding beyond the last partial block of each lane. Every block is
scored independently and the per-lane softmax is assembled with scatter reductions — the same
split-K ("flash-decoding") arithmetic a GPU kernel does, written with batched matmuls:

    blocks  [NB]            block ids of all lanes, lane after lane
    k, v    [NB, bs, D]     gathered whole blocks
    scores  [NB, G, bs]     q_lane[block_lane] @ k^T, masked past each lane's length
    m       [n_lanes, G]    running max per lane (scatter amax)
    o       [n_lanes, G, D] Σ_t p[t] v[t], p = exp(scores - m) / Σ exp(scores - m), computed with
                            embedding_bag straight from the pool (V is never gathered)

Prefill: per sequence, causal over the prompt with SDPA (GQA), queries offset by `start`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True, frozen=True)
class DecodeLayout:
    """Where every decode lane's blocks are; built once per step, used by every layer."""

    blocks: torch.Tensor  # [NB] block ids, lane after lane
    block_lane: torch.Tensor  # [NB] lane of each block
    valid: torch.Tensor  # [NB, bs] position holds a token (only each lane's last block is partial)
    bag_slots: torch.Tensor  # [G * NB * bs] flat pool slots, once per query head of the group
    bag_offsets: torch.Tensor  # [G * n_lanes] start of bag (g, lane) in bag_slots

    @classmethod
    def build(
        cls, lanes: list[tuple[list[int], int]], block_size: int, group: int, device: str
    ) -> DecodeLayout:
        """lanes: (block table, length) per lane; group: query heads per KV head (G)."""
        blocks: list[int] = []
        block_lane: list[int] = []
        filled: list[int] = []  # tokens in each block
        first: list[int] = []  # first block of each lane
        for index, (table, length) in enumerate(lanes):
            n_blocks = -(-length // block_size)
            first.append(len(blocks))
            blocks.extend(table[:n_blocks])
            block_lane.extend([index] * n_blocks)
            filled.extend([block_size] * (n_blocks - 1))
            filled.append(length - (n_blocks - 1) * block_size)
        block_ids = torch.tensor(blocks, dtype=torch.long, device=device)
        offsets = torch.arange(block_size, device=device)
        slots = (block_ids[:, None] * block_size + offsets).reshape(-1)  # [NB * bs]
        starts = torch.tensor(first, dtype=torch.long, device=device) * block_size  # [n_lanes]
        heads = torch.arange(group, device=device)[:, None] * slots.numel()  # [G, 1]
        return cls(
            blocks=block_ids,
            block_lane=torch.tensor(block_lane, dtype=torch.long, device=device),
            valid=offsets[None, :] < torch.tensor(filled, dtype=torch.long, device=device)[:, None],
            bag_slots=slots.repeat(group),
            bag_offsets=(heads + starts[None, :]).reshape(-1),
        )


def paged_decode_attention(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    layout: DecodeLayout,
    scale: float,
    k_workspace: torch.Tensor | None = None,  # reusable [NB, bs, D] buffer for the gathered keys
) -> torch.Tensor:  # [n_lanes, G, D]
    probs = decode_probabilities(q, k_cache, layout, scale, k_workspace)
    return combine_values(probs, v_cache, layout, q.shape[0], q.dtype)


def decode_probabilities(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    layout: DecodeLayout,
    scale: float,
    k_workspace: torch.Tensor | None = None,
) -> torch.Tensor:  # [NB, G, bs] fp32: each lane's softmax over its blocks' positions (0 where masked)
    """The first half of `paged_decode_attention` (heavy_hitter also accumulates these)."""
    n_lanes, group, _ = q.shape
    blocks, block_lane = layout.blocks, layout.block_lane
    # Gathering into a warm buffer avoids page-faulting fresh memory every layer.
    k = (
        torch.index_select(k_cache, 0, blocks, out=k_workspace)
        if k_workspace is not None
        else k_cache[blocks]
    )
    scores = torch.bmm(q.index_select(0, block_lane), k.transpose(1, 2)).float() * scale  # [NB, G, bs]
    scores.masked_fill_(~layout.valid.unsqueeze(1), float("-inf"))
    block_max = scores.amax(dim=-1)  # [NB, G]
    lane_max = torch.full((n_lanes, group), float("-inf"), dtype=scores.dtype, device=q.device)
    lane_max.scatter_reduce_(0, block_lane[:, None].expand_as(block_max), block_max, reduce="amax")
    probs = torch.exp(scores - lane_max.index_select(0, block_lane).unsqueeze(-1))  # [NB, G, bs]
    denom = torch.zeros((n_lanes, group), dtype=scores.dtype, device=q.device)
    denom.index_add_(0, block_lane, probs.sum(dim=-1))
    probs /= denom.index_select(0, block_lane).unsqueeze(-1)
    return probs


def combine_values(
    probs: torch.Tensor,  # [NB, G, bs] from decode_probabilities
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    layout: DecodeLayout,
    n_lanes: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [n_lanes, G, D]
    """The second half of `paged_decode_attention`: o[lane, g] = Σ_t p[lane, g, t] · V[slot_t]."""
    group, head_dim = probs.shape[1], v_cache.shape[-1]
    # embedding_bag reads V rows in place (no gather), one bag per (g, lane) over the lane's slots;
    # masked positions carry weight 0.
    weights = probs.transpose(0, 1).reshape(-1).to(v_cache.dtype)  # [G * NB * bs]
    out = F.embedding_bag(
        layout.bag_slots,
        v_cache.view(-1, head_dim),
        layout.bag_offsets,
        mode="sum",
        per_sample_weights=weights,
    )  # [G * n_lanes, D]
    return out.view(group, n_lanes, head_dim).transpose(0, 1).to(dtype)


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
