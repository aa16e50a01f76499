"""SparQ attention decode step (Ribar et al., "SparQ Attention", arXiv 2312.04985) over the paged pool.

The semantics are defined once, by `sparq_decode_reference` (torch, CPU or GPU); `sparq_decode_triton`
computes the same function with the kernels of sparq_kernels.py (phase 1), sparq_pick.py (the selection)
and paged_decode.py (phase 2), and `sparq_decode` picks one.

Per lane (one KV head of one sequence, carrying its G query heads), with r components, k keys:

    components   i1 = top-r of Σ_g |q[g]|                     one set per lane: K is read once
    temperature  τ_g = scale / sqrt(‖q[g, i1]‖₁ / ‖q[g]‖₁)      (paper: 1 / sqrt(D · ratio), scale = D^-½)
    phase 1      ŝ_g[t] = softmax_t(τ_g · q[g, i1] · K[t, i1])  reads r components of every key, from
                                                              kt_cache [num_blocks, D, bs] (contiguous)
                 score[t] = Σ_g ŝ_g[t]                          one position set for the whole group
    selection    i2 = top-k of score, the last `local_window` positions forced in (they count in k);
                 ties at the k-th score are broken arbitrarily
    phase 2      o_g = softmax(scale · q[g] · K[i2]ᵀ) · V[i2]   exact, full q; reads k rows of K and V

Mean-value reallocation (the paper's y = α·ŝ V[i2] + (1 - α)·mean(V)) is off: with GQA the position set
is shared by the G heads but α_g = Σ_{i2} ŝ_g differs per head, and for a head whose mass the group's
choice misses the mean(V) term dominates with a crude estimate; it also needs a running mean of V per
lane kept beside the pool. Dropping it makes r = D, k >= length exactly dense attention.

Bytes read per step (`sparq_bytes`): Σ_lanes (r · len + 2 · min(k, len) · D) · itemsize. With r = D/8 and
k = len/16 that is dense/8 (dense reads 2 · len · D).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.attention.kernels import Backend, PagedLanes, use_triton


@dataclass(slots=True, frozen=True)
class SparqOutput:
    out: torch.Tensor  # [n_lanes, G, D], q's dtype
    bytes_read: int  # K/V bytes the step reads from the pool (see sparq_bytes)


def sparq_bytes(lengths: Sequence[int], r: int, k: int, head_dim: int, itemsize: int) -> int:
    """Phase 1 reads r components of every key; phase 2 reads min(k, len) whole K and V rows."""
    return sum(r * n + 2 * min(k, n) * head_dim for n in lengths) * itemsize


def kt_from_k(k_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, D] -> the transposed copy [num_blocks, D, bs] phase 1 reads."""
    return k_cache.transpose(1, 2).contiguous()


def select_components(
    q: torch.Tensor,  # [n_lanes, G, D]
    r: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # idx [n_lanes, r] int64, q_sel [n_lanes, G, r] fp32
    """The lane's top-r components of Σ_g |q| and q at them, times each head's softmax temperature."""
    q_abs = q.float().abs()  # [n_lanes, G, D]
    idx = q_abs.sum(dim=1).topk(r, dim=-1).indices  # [n_lanes, r]
    at = idx[:, None, :].expand(-1, q.shape[1], -1)  # [n_lanes, G, r]
    total = q_abs.sum(dim=-1)  # [n_lanes, G]
    ratio = torch.where(total > 0, q_abs.gather(2, at).sum(dim=-1) / total, torch.ones_like(total))
    temperature = scale * ratio.clamp_min(1e-12).rsqrt()  # [n_lanes, G]
    return idx, q.float().gather(2, at) * temperature[..., None]


def _check(
    q: torch.Tensor, kt_cache: torch.Tensor, lengths: Sequence[int], r: int, k: int, local_window: int
) -> None:
    head_dim = q.shape[-1]
    if not 1 <= r <= head_dim:
        raise ValueError(f"r (query components kept) must be in 1..{head_dim}, got {r}")
    if not 0 <= local_window <= k:
        raise ValueError(f"need 0 <= local_window <= k (the window counts in k); got {local_window}, {k}")
    if kt_cache.dim() != 3 or kt_cache.shape[1] != head_dim:
        raise ValueError(f"kt_cache must be [num_blocks, {head_dim}, bs], got {tuple(kt_cache.shape)}")
    if not lengths or min(lengths) < 1:
        raise ValueError("SparQ needs at least one lane and every lane at least one token")


def sparq_decode_reference(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    r: int,
    k: int,
    local_window: int,
    scale: float,
) -> SparqOutput:
    """The definition of the SparQ step (module docstring), in torch."""
    lengths = lanes.lengths()
    _check(q, kt_cache, lengths, r, k, local_window)
    n_lanes, _, head_dim = q.shape
    bs, width = lanes.block_size, max(lengths)
    table = lanes.padded_table(-(-width // bs))  # [n_lanes, MB]
    length = lanes.lane_len.long()[:, None]  # [n_lanes, 1]
    pos = torch.arange(width, device=q.device)[None, :]  # [1, width]
    valid = pos < length  # [n_lanes, width]

    idx, q_sel = select_components(q, r, scale)
    kt = kt_cache[table[:, :, None], idx[:, None, :]]  # [n_lanes, MB, r, bs]: r components per key
    kt = kt.permute(0, 2, 1, 3).reshape(n_lanes, r, -1)[:, :, :width].float()  # [n_lanes, r, width]
    logits = torch.bmm(q_sel, kt).masked_fill(~valid[:, None, :], float("-inf"))  # [n_lanes, G, width]
    score = logits.softmax(dim=-1).sum(dim=1)  # [n_lanes, width]
    score = score.masked_fill(valid & (pos >= length - local_window), float("inf"))
    score = score.masked_fill(~valid, float("-inf"))
    sel = score.topk(min(k, width), dim=1, sorted=False).indices  # [n_lanes, kk]
    out = attend_selected(q, k_cache, v_cache, table, lanes, sel, scale)
    return SparqOutput(out, sparq_bytes(lengths, r, k, head_dim, k_cache.element_size()))


def attend_selected(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    table: torch.Tensor,  # [n_lanes, MB] padded block ids (PagedLanes.padded_table)
    lanes: PagedLanes,
    sel: torch.Tensor,  # [n_lanes, kk] positions; those past a lane's length are masked
    scale: float,
) -> torch.Tensor:  # [n_lanes, G, D], q's dtype
    """Phase 2 in torch: exact attention with the full q over the selected K/V rows."""
    n_lanes, kk = sel.shape
    head_dim, bs = q.shape[-1], lanes.block_size
    slots = (table.gather(1, sel // bs) * bs + sel % bs).reshape(-1)  # [n_lanes · kk] flat pool rows
    keys = k_cache.reshape(-1, head_dim).index_select(0, slots).view(n_lanes, kk, head_dim).float()
    values = v_cache.reshape(-1, head_dim).index_select(0, slots).view(n_lanes, kk, head_dim).float()
    s = torch.bmm(q.float(), keys.transpose(1, 2)) * scale  # [n_lanes, G, kk]
    s.masked_fill_(~(sel < lanes.lane_len.long()[:, None])[:, None, :], float("-inf"))
    return torch.bmm(s.softmax(dim=-1), values).to(q.dtype)


def sparq_decode_triton(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    r: int,
    k: int,
    local_window: int,
    scale: float,
    num_splits: int | None = None,  # phase-2 partitions per lane; None: fill the GPU
) -> SparqOutput:
    """Same function as sparq_decode_reference, in Triton (ties at the k-th score broken by position).

    Components, logits (one pass over kt) and scores (sparq_kernels.py), the selection (sparq_pick.py,
    four launches; the last works only on lanes the sampled path left), phase 2 and its merge
    (paged_decode.py). No host sync once the lengths are known on the host (PagedLanes.build), so a
    step can be captured in a CUDA graph."""
    from services.attention.kernels import paged_decode, sparq_kernels, sparq_pick

    lengths = lanes.lengths()
    _check(q, kt_cache, lengths, r, k, local_window)
    width = max(lengths)
    if k_cache.shape[0] * lanes.block_size >= 2**31:
        raise ValueError("the Triton SparQ step indexes pool rows in int32: pool too large for one layer")
    idx, q_sel = sparq_kernels.sparq_select(q, r, scale)  # = select_components, one launch
    phase1 = sparq_kernels.sparq_scores(q_sel, idx, kt_cache, lanes, width, local_window)
    rows = sparq_pick.sparq_pick(phase1, lanes, min(k, width), width, local_window)  # [n_lanes, kk]
    out = paged_decode.gathered_decode_attention(q, k_cache, v_cache, lanes, rows, scale, num_splits)
    return SparqOutput(out, sparq_bytes(lengths, r, k, q.shape[-1], k_cache.element_size()))


def sparq_decode(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    r: int,
    k: int,
    local_window: int,
    scale: float,
    *,
    backend: Backend = Backend.AUTO,
) -> SparqOutput:
    """The SparQ step: Triton for CUDA tensors when triton is installed, else the torch reference."""
    step = sparq_decode_triton if use_triton(q.device, backend) else sparq_decode_reference
    return step(q, k_cache, v_cache, kt_cache, lanes, r, k, local_window, scale)
