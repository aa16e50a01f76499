"""A faster CPU path for `kernels.sparq.sparq_decode_reference`: the same function, laid out for CPUs.

The reference gathers phase 1's key components with advanced indexing into [n, MB, r, bs] and then
permutes them into [n, r, width] (a second full copy); here one `index_select` over kt viewed as
rows of block_size positions produces [n, r, MB · bs] directly, ready for one bmm (its output cut
to the widest lane; masks are skipped when every lane is that wide):

    kt_cache [num_blocks, D, bs] ─view─▶ [num_blocks · D, bs]      row (block, component)
    rows [n, r, MB] = table[:, None, :] · D + idx[:, :, None]     ─index_select─▶ [n, r, MB · bs]

The top-k is a numpy partition (`top_positions`), the same set as `torch.topk` without its sort.
Phase 2 gathers the k selected K and V rows with `index_select` as well. Positions past a lane's
length (its last partial block, and other lanes' longer tables) are masked exactly as the reference
masks them, so the selection and the output are the reference's (tests/unit/test_attention_policies.py;
ties at the k-th score may be broken differently, as the reference allows).
"""

from __future__ import annotations

import numpy as np
import torch

from services.attention.kernels import PagedLanes
from services.attention.kernels.sparq import (
    SparqOutput,
    _check,
    attend_selected,
    select_components,
    sparq_bytes,
)


def sparq_positions(
    q: torch.Tensor,  # [n, G, D]
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    r: int,
    k: int,
    local_window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # sel [n, kk] positions, table [n, MB] padded block ids
    """Phases 1 and selection of the SparQ step: the positions phase 2 reads, per lane."""
    lengths = lanes.lengths()
    _check(q, kt_cache, lengths, r, k, local_window)
    n, _, head_dim = q.shape
    bs, width = lanes.block_size, max(lengths)
    blocks = -(-width // bs)
    table = lanes.padded_table(blocks)  # [n, MB]
    length = lanes.lane_len.long()[:, None]  # [n, 1]
    pos = torch.arange(width, device=q.device)[None, :]  # [1, width]
    valid = pos < length
    ragged = min(lengths) < width  # else every position up to width holds a token: nothing to mask

    idx, q_sel = select_components(q, r, scale)  # [n, r], [n, G, r]
    rows = table[:, None, :] * head_dim + idx[:, :, None]  # [n, r, MB]
    kt = kt_cache.view(-1, bs).index_select(0, rows.reshape(-1)).view(n, r, blocks * bs)
    logits = torch.bmm(q_sel, kt.float())[:, :, :width]  # [n, G, width]: whole blocks, cut to width
    if ragged:
        logits.masked_fill_(~valid[:, None, :], float("-inf"))
    score = logits.softmax(dim=-1).sum(dim=1)  # [n, width]
    score.masked_fill_(valid & (pos >= length - local_window), float("inf"))
    if ragged:
        score.masked_fill_(~valid, float("-inf"))
    return top_positions(score, min(k, width)), table


def top_positions(score: torch.Tensor, kk: int) -> torch.Tensor:  # [n, W] -> [n, kk] int64
    """The kk largest entries of each row, unordered (torch.topk's set; ties broken arbitrarily).
    numpy's introselect partition is ~4x faster than torch.topk for k = 256 of 4096 on one core."""
    width = score.shape[1]
    part = np.argpartition(score.numpy(), width - kk, axis=1)[:, width - kk :]
    return torch.from_numpy(np.ascontiguousarray(part)).long()


def sparq_decode_cpu(
    q: torch.Tensor,  # [n, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    r: int,
    k: int,
    local_window: int,
    scale: float,
) -> SparqOutput:
    """Same contract as `kernels.sparq.sparq_decode_reference`."""
    sel, table = sparq_positions(q, kt_cache, lanes, r, k, local_window, scale)
    out = attend_selected(q, k_cache, v_cache, table, lanes, sel, scale)
    return SparqOutput(out, sparq_bytes(lanes.lengths(), r, k, q.shape[-1], k_cache.element_size()))
