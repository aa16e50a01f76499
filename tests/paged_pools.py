"""Random paged K/V pools for the decode-attention kernel tests (Triton and numba)."""

from __future__ import annotations

import torch

Lanes = list[tuple[list[int], int]]  # (block table, length) per lane, as DecodeLayout.build takes them


def make_pool(
    lengths: list[int],
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    group: int = 3,
    head_dim: int = 64,
    k_scale: float = 1.0,
) -> tuple[Lanes, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V in shuffled blocks (never zeros: they hide unwritten outputs) and random q [lanes,
    group, head_dim]. `k_scale` > 1 makes the softmax peaky (max-subtraction then matters)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in lengths]
    num_blocks = sum(counts) + 3  # spare blocks nobody reads
    order = torch.randperm(num_blocks, generator=gen).tolist()
    lanes, at = [], 0
    for n, c in zip(lengths, counts, strict=True):
        lanes.append((order[at : at + c], n))
        at += c
    k = (torch.randn(num_blocks, block_size, head_dim, generator=gen) * k_scale).to(
        device=device, dtype=dtype
    )
    v = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(device=device, dtype=dtype)
    q = torch.randn(len(lengths), group, head_dim, generator=gen).to(device=device, dtype=dtype)
    return lanes, q, k, v
