"""Triton kernels over the paged KV pool: flash-decoding attention and SparQ's scoring pass.

Decode (split-K, "flash-decoding"): a lane's context is cut into `n_splits` equal partitions.

    kernel 1  _decode_partial  grid [n_lanes, n_splits]
        one program = one lane, all its G query heads (padded to BLOCK_H >= 16 rows for tl.dot), one
        partition, BLOCK_N positions per step: each K/V row is read once for the whole group.
        q [BLOCK_H, D] · K^T [D, BLOCK_N] -> online softmax (base 2) -> acc [BLOCK_H, D] += p · V
        out: acc / l and lse = m + log2(l) per (lane, split, head)     (n_splits == 1: final output)
    kernel 2  _decode_merge    grid [n_lanes, G]
        o = Σ_s 2^(lse_s - max) acc_s / Σ_s 2^(lse_s - max)

"Gather" mode (SparQ phase 2) walks a list of selected positions per lane instead of 0..len-1.

SparQ (see sparq.py for the semantics), phase 1: two passes over the r selected components of every
key, read from the transposed copy kt_cache [num_blocks, D, bs] so component i of a block is contiguous:

    _sparq_select  grid [n_lanes]           top-r components of Σ_g |q|, temperature (one launch)
    _sparq_stats   grid [n_lanes, n_tiles]  per-tile max and Σexp of each head's approximate logits
    _sparq_lse     grid [n_lanes]           per-head log-sum-exp over the lane's tiles
    _sparq_scores  grid [n_lanes, n_tiles]  recompute logits, score = Σ_g softmax_g (window: +inf,
                                            padding: -inf); re-reading r components costs less than
                                            storing G fp32 logits at r = D/8
    selection      top_k_positions (radix select, below RADIX_MAX_SCORES) or torch.topk

With bs = 16 a component's run in a block is 32 bytes, so phase 1 reaches about 1.15 TB/s on an H100
(vs 2.8 TB/s for dense decode, whose K/V rows are 2 KiB runs); larger pool blocks help it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from services.attention.kernels import PagedLanes

LOG2E = 1.4426950408889634
MAX_SPLITS = 128


@dataclass(slots=True, frozen=True)
class DecodeConfig:
    block_n: int  # positions per inner step
    num_warps: int
    num_stages: int
    programs_per_sm: int  # split-K target: n_lanes * n_splits ≈ programs_per_sm * SMs
    min_split: int  # fewest positions per partition


def decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Tuned on an H100 (bench/gpu_attention.py --tune); see bench/RESULTS-gpu.md."""
    if dtype == torch.float32:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2, programs_per_sm=4, min_split=256)
    if head_dim <= 64:
        return DecodeConfig(block_n=64, num_warps=4, num_stages=4, programs_per_sm=4, min_split=256)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2, min_split=256)


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few partitions keep the merge path exercised
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def num_splits_for(n_lanes: int, avg_len: float, config: DecodeConfig, device: torch.device) -> int:
    """Enough programs to fill the GPU, but no partition shorter than config.min_split."""
    wanted = -(-config.programs_per_sm * _num_sms(device) // max(n_lanes, 1))
    by_length = max(1, int(avg_len) // config.min_split)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@triton.jit
def _decode_partial(
    q_ptr,  # [n_lanes, G, D]
    k_ptr,  # [num_blocks, BS, D]
    v_ptr,  # [num_blocks, BS, D]
    blocks_ptr,  # [NB] int32
    lane_start_ptr,  # [n_lanes] int32
    lane_len_ptr,  # [n_lanes] int32
    sel_ptr,  # GATHER: [n_lanes, n_sel] positions
    acc_ptr,  # [n_lanes, n_splits, G, D] fp32 (or the final [n_lanes, G, D] output when DIRECT)
    lse_ptr,  # [n_lanes, n_splits, G] fp32, log2 units
    qk_scale,  # scale * log2(e)
    n_sel,
    stride_qn,
    stride_qg,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_sel,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GATHER: tl.constexpr,
    DIRECT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    lane = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    length = tl.load(lane_len_ptr + lane)
    start = tl.load(lane_start_ptr + lane)
    count = n_sel if GATHER else length
    per_split = tl.cdiv(tl.cdiv(count, n_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, count)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    q_mask = (offs_h[:, None] < G) & d_ok[None, :]
    q = tl.load(
        q_ptr + lane * stride_qn + offs_h[:, None] * stride_qg + offs_d[None, :], mask=q_mask, other=0.0
    )
    q = q.to(k_ptr.dtype.element_ty)  # [BLOCK_H, BLOCK_D]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        j = t0 + offs_n
        ok = j < hi
        if GATHER:
            pos = tl.load(sel_ptr + lane * stride_sel + j, mask=ok, other=0)
            ok = ok & (pos < length)
        else:
            pos = j
        blk = tl.load(blocks_ptr + start + pos // BS, mask=ok, other=0).to(tl.int64)
        row = pos % BS
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + (blk * stride_kb + row * stride_kt)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile adds nothing
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + (blk * stride_vb + row * stride_vt)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    if DIRECT:
        o_ptr = acc_ptr + (lane * G + offs_h[:, None]) * D + offs_d[None, :]
        tl.store(o_ptr, out.to(acc_ptr.dtype.element_ty), mask=q_mask)
    else:
        base = (lane * n_splits + split) * G + offs_h
        tl.store(acc_ptr + base[:, None] * D + offs_d[None, :], out, mask=q_mask)
        lse = tl.where(l_sum > 0, m + tl.log2(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + base, lse, mask=offs_h < G)


@triton.jit
def _decode_merge(
    acc_ptr,  # [n_lanes, n_splits, G, D] fp32
    lse_ptr,  # [n_lanes, n_splits, G] fp32
    out_ptr,  # [n_lanes, G, D]
    n_splits,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    lane = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    rows = (lane * n_splits + offs_s) * G + head  # [BLOCK_S]
    lse = tl.load(lse_ptr + rows, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # empty partitions weigh 0
    mask = s_ok[:, None] & (offs_d[None, :] < D)
    acc = tl.load(acc_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (lane * G + head) * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def _check_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lanes: PagedLanes) -> None:
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "want q [n_lanes, G, D] and k/v caches [num_blocks, bs, D] of one shape; "
            f"got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    if q.shape[2] != k_cache.shape[2] or k_cache.shape[1] != lanes.block_size:
        raise ValueError(
            f"head_dim/block_size mismatch: q D={q.shape[2]}, cache [_, {k_cache.shape[1]}, "
            f"{k_cache.shape[2]}], lanes block_size={lanes.block_size}"
        )
    if q.shape[0] != lanes.n_lanes:
        raise ValueError(f"q has {q.shape[0]} lanes, the block tables {lanes.n_lanes}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"K/V must share a dtype among fp32/fp16/bf16; got {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("q, K and V need a contiguous last (head_dim) dimension")
    if not (q.device == k_cache.device == v_cache.device == lanes.blocks.device):
        raise ValueError("q, the caches and the block tables must be on one device")


def _launch_decode(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lanes: PagedLanes,
    scale: float,
    positions: torch.Tensor | None,  # [n_lanes, n_sel] (gather mode) or None (every position)
    avg_len: float,
    num_splits: int | None,
    config: DecodeConfig | None,
) -> torch.Tensor:  # [n_lanes, G, D]
    _check_decode(q, k_cache, v_cache, lanes)
    n_lanes, group, head_dim = q.shape
    out = torch.empty_like(q)
    if n_lanes == 0:
        return out
    config = config or decode_config(head_dim, k_cache.dtype)
    splits = num_splits or num_splits_for(n_lanes, avg_len, config, q.device)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {splits}")
    direct = splits == 1
    acc = (
        out
        if direct
        else torch.empty((n_lanes, splits, group, head_dim), dtype=torch.float32, device=q.device)
    )
    lse = torch.empty((n_lanes, splits, group), dtype=torch.float32, device=q.device)
    sel = positions if positions is not None else lanes.lane_len  # unused pointer outside gather mode
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_partial[(n_lanes, splits)](
        q, k_cache, v_cache, lanes.blocks, lanes.lane_start, lanes.lane_len, sel, acc, lse,
        scale * LOG2E,
        positions.shape[1] if positions is not None else 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        sel.stride(0),
        G=group, D=head_dim, BS=lanes.block_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=config.block_n,
        GATHER=positions is not None, DIRECT=direct,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not direct:
        _decode_merge[(n_lanes, group)](
            acc, lse, out, splits,
            G=group, D=head_dim, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
            num_warps=2,
        )  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    lanes: PagedLanes,
    scale: float,
    num_splits: int | None = None,  # partitions per lane; None: fill the GPU
    config: DecodeConfig | None = None,  # None: decode_config(D, dtype)
) -> torch.Tensor:  # [n_lanes, G, D], q's dtype
    """Exact decode attention of every lane over its whole context (fp32 accumulation)."""
    avg_len = lanes.total_blocks * lanes.block_size / max(lanes.n_lanes, 1)
    return _launch_decode(q, k_cache, v_cache, lanes, scale, None, avg_len, num_splits, config)


def gathered_decode_attention(
    q: torch.Tensor,  # [n_lanes, G, D]
    k_cache: torch.Tensor,  # [num_blocks, bs, D]
    v_cache: torch.Tensor,  # [num_blocks, bs, D]
    lanes: PagedLanes,
    positions: torch.Tensor,  # [n_lanes, n_sel] positions to attend to; entries >= the lane's length skipped
    scale: float,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:  # [n_lanes, G, D]
    """Exact attention of each lane over the listed positions only (SparQ phase 2)."""
    if positions.dim() != 2 or positions.shape[0] != q.shape[0] or positions.stride(1) != 1:
        raise ValueError(f"positions must be a row-contiguous [n_lanes, n_sel]; got {tuple(positions.shape)}")
    n_sel = positions.shape[1]
    return _launch_decode(q, k_cache, v_cache, lanes, scale, positions, n_sel, num_splits, config)


@triton.jit
def _sparq_select(
    q_ptr,  # [n_lanes, G, D]
    idx_ptr,  # [n_lanes, R] int32 out: the lane's top-R components of Σ_g |q|
    qs_ptr,  # [n_lanes, G, R] fp32 out: q at them times each head's temperature
    scale,
    stride_qn,
    stride_qg,
    G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """sparq.select_components in one program per lane (R rounds of argmax; ties: lowest index)."""
    lane = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    q = tl.load(
        q_ptr + lane * stride_qn + offs_g[:, None] * stride_qg + offs_d[None, :], mask=mask, other=0.0
    )
    q = q.to(tl.float32)  # [BLOCK_G, BLOCK_D]
    mass = tl.where(offs_d < D, tl.sum(tl.abs(q), 0), -1.0)  # [BLOCK_D]; -1 marks taken or padding
    total = tl.sum(tl.abs(q), 1)  # [BLOCK_G]
    kept = tl.zeros([BLOCK_G], tl.float32)
    idx = tl.zeros([BLOCK_R], tl.int32)
    qs = tl.zeros([BLOCK_G, BLOCK_R], tl.float32)
    for i in range(R):
        j = tl.min(tl.where(mass == tl.max(mass, 0), offs_d, BLOCK_D), 0)
        q_j = tl.sum(tl.where(offs_d[None, :] == j, q, 0.0), 1)  # [BLOCK_G] = q[:, j]
        kept += tl.abs(q_j)
        idx = tl.where(offs_r == i, j, idx)
        qs = tl.where(offs_r[None, :] == i, q_j[:, None], qs)
        mass = tl.where(offs_d == j, -1.0, mass)
    ratio = tl.where(total > 0, kept / tl.where(total > 0, total, 1.0), 1.0)
    qs = qs * (scale / tl.sqrt(tl.maximum(ratio, 1e-12)))[:, None]
    tl.store(idx_ptr + lane * R + offs_r, idx, mask=offs_r < R)
    qs_mask = (offs_g[:, None] < G) & (offs_r[None, :] < R)
    tl.store(qs_ptr + (lane * G + offs_g[:, None]) * R + offs_r[None, :], qs, mask=qs_mask)


@triton.jit
def _approx_logits(
    qs_ptr,  # [n_lanes, G, R] fp32: q's selected components, softmax temperature folded in
    idx_ptr,  # [n_lanes, R] component ids
    kt_ptr,  # [num_blocks, D, BS]
    blocks_ptr,
    start,
    length,
    lane,
    tile,
    stride_ktb,
    stride_ktd,
    G: tl.constexpr,
    R: tl.constexpr,
    BS: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Approximate logits [BLOCK_G, BLOCK_N] of one tile of positions, -inf past the lane's length.

    The tile is BLOCK_N / SUB runs of SUB positions, each inside one pool block, so a component's run
    is contiguous in kt_cache and loads as wide vectors (the block id alone is gathered)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    comp = tl.load(idx_ptr + lane * R + offs_r, mask=r_ok, other=0).to(tl.int64)
    qs_mask = (offs_g[:, None] < G) & r_ok[None, :]
    qs = tl.load(qs_ptr + (lane * G + offs_g[:, None]) * R + offs_r[None, :], mask=qs_mask, other=0.0)
    base = tile * BLOCK_N + tl.arange(0, BLOCK_N // SUB) * SUB  # [TB] first position of each run
    run_ok = base < length
    blk = tl.load(blocks_ptr + start + base // BS, mask=run_ok, other=0).to(tl.int64)
    first = blk * stride_ktb + (base % BS if SUB < BS else 0)  # [TB]
    offs = first[None, :, None] + (comp * stride_ktd)[:, None, None] + tl.arange(0, SUB)[None, None, :]
    # Whole runs are read (rows past the length sit inside the lane's last block) and masked below,
    # which keeps the mask constant along a run and the loads vectorized.
    kt = tl.load(kt_ptr + offs, mask=r_ok[:, None, None] & run_ok[None, :, None], other=0.0)
    kt = tl.reshape(kt, [BLOCK_R, BLOCK_N]).to(tl.float32)  # [BLOCK_R, BLOCK_N]
    s = tl.sum(qs[:, :, None] * kt[None, :, :], axis=1)  # [BLOCK_G, BLOCK_N]
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.where(offs_n[None, :] < length, s, float("-inf"))


@triton.jit
def _sparq_stats(
    qs_ptr, idx_ptr, kt_ptr, blocks_ptr, lane_start_ptr, lane_len_ptr,
    m_ptr,  # [n_lanes, n_tiles, G] fp32 tile max
    l_ptr,  # [n_lanes, n_tiles, G] fp32 tile Σ exp(logit - max)
    stride_ktb, stride_ktd,
    G: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    tile = tl.program_id(1)
    start = tl.load(lane_start_ptr + lane)
    length = tl.load(lane_len_ptr + lane)
    s = _approx_logits(
        qs_ptr, idx_ptr, kt_ptr, blocks_ptr, start, length, lane, tile, stride_ktb, stride_ktd,
        G, R, BS, SUB, BLOCK_G, BLOCK_R, BLOCK_N,
    )  # fmt: skip
    m = tl.max(s, 1)
    l_sum = tl.sum(tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), 1)
    offs_g = tl.arange(0, BLOCK_G)
    at = (lane * tl.num_programs(1) + tile) * G + offs_g
    tl.store(m_ptr + at, m, mask=offs_g < G)
    tl.store(l_ptr + at, l_sum, mask=offs_g < G)


@triton.jit
def _sparq_lse(
    m_ptr, l_ptr,  # [n_lanes, n_tiles, G]
    lse_ptr,  # [n_lanes, G] fp32
    n_tiles,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        at = (lane * n_tiles + t[:, None]) * G + offs_g[None, :]
        mask = (t[:, None] < n_tiles) & g_ok[None, :]
        m = tl.load(m_ptr + at, mask=mask, other=float("-inf"))  # [BLOCK_T, BLOCK_G]
        l_sum = tl.load(l_ptr + at, mask=mask, other=0.0)
        new_top = tl.maximum(top, tl.max(m, 0))
        use = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - use) + tl.sum(l_sum * tl.exp(m - use[None, :]), 0)
        top = new_top
    tl.store(lse_ptr + lane * G + offs_g, top + tl.log(tl.where(total > 0, total, 1.0)), mask=g_ok)


@triton.jit
def _sparq_scores(
    qs_ptr, idx_ptr, kt_ptr, blocks_ptr, lane_start_ptr, lane_len_ptr,
    lse_ptr,  # [n_lanes, G]
    score_ptr,  # [n_lanes, width] fp32
    hist_ptr,  # HIST: [RADIX_PASSES, n_lanes, 256] int32, zeroed: radix pass 0 is counted here
    width, local_window,
    stride_ktb, stride_ktd,
    G: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HIST: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    tile = tl.program_id(1)
    start = tl.load(lane_start_ptr + lane)
    length = tl.load(lane_len_ptr + lane)
    s = _approx_logits(
        qs_ptr, idx_ptr, kt_ptr, blocks_ptr, start, length, lane, tile, stride_ktb, stride_ktd,
        G, R, BS, SUB, BLOCK_G, BLOCK_R, BLOCK_N,
    )  # fmt: skip
    offs_g = tl.arange(0, BLOCK_G)
    lse = tl.load(lse_ptr + lane * G + offs_g, mask=offs_g < G, other=float("inf"))  # padded heads: p = 0
    score = tl.sum(tl.exp(s - lse[:, None]), 0)  # [BLOCK_N] Σ_g softmax_g
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs_n < length
    score = tl.where(ok & (offs_n >= length - local_window), float("inf"), score)
    score = tl.where(ok, score, float("-inf"))
    tl.store(score_ptr + lane * width + offs_n, score, mask=offs_n < width)
    if HIST:
        _radix_count(score, ok, 0, hist_ptr + lane * 256, 0, BLOCK_N)  # radix pass 0


# Exact top-k per lane by radix select on the fp32 bits of the scores (>= 0, so the bits order like the
# values): 4 passes of 8 bits, each a 256-bin histogram of the keys that match the bits fixed so far.
# A pass re-derives the earlier passes' choices from their histograms (_radix_state), so no extra
# launch picks digits; the last kernel writes the positions (keys above the k-th, then enough ties).
RADIX_PASSES = 4
RADIX_BLOCK = 1024  # positions per program of the passes after the first
RADIX_WARPS = 4
# Above this many scores (n_lanes × width) torch.topk's multi-block radix select is faster (H200:
# 2.1 M scores even, 3.1 M: 89 vs 93 us); below it this one wins (0.2 M: 30 vs 83 us).
RADIX_MAX_SCORES = 2_000_000


@triton.jit
def _radix_count(score, ok, prefix, hist_ptr, PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Add this tile's histogram of digit PASS of the keys matching `prefix` above it to hist_ptr [256]."""
    shift: tl.constexpr = 24 - 8 * PASS
    key = score.to(tl.int32, bitcast=True)
    match = ok
    if PASS > 0:
        match = ok & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
    digit = tl.where(match, (key >> shift) & 255, 0)
    bins = tl.arange(0, 256)
    counts = tl.histogram(digit, 256) - tl.where(bins == 0, BLOCK - tl.sum(match.to(tl.int32), 0), 0)
    tl.atomic_add(hist_ptr + bins, counts, mask=counts > 0)


@triton.jit
def _radix_state(hist_ptr, lane, n_lanes, need, PASSES: tl.constexpr):
    """(key bits fixed by passes 0..PASSES-1, how many keys equal to them are still to take)."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int32)
    for p in tl.static_range(PASSES):
        h = tl.load(hist_ptr + (p * n_lanes + lane) * 256 + bins)
        total = tl.sum(h, 0)
        above = total - tl.cumsum(h, 0)  # [256] keys with a larger digit
        digit = tl.max(tl.where(above + h >= need, bins, -1), 0)  # the digit holding the need-th key
        need = need - tl.sum(tl.where(bins == digit, above, 0), 0)
        prefix = prefix | (digit << (24 - 8 * p))
    return prefix, need


@triton.jit
def _radix_hist(
    score_ptr, lane_len_ptr, hist_ptr, k, width, n_lanes, PASS: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    lane = tl.program_id(0)
    length = tl.load(lane_len_ptr + lane)
    prefix, _ = _radix_state(hist_ptr, lane, n_lanes, tl.minimum(k, length), PASS)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < length
    score = tl.load(score_ptr + lane * width + offs, mask=ok, other=0.0)
    _radix_count(score, ok, prefix, hist_ptr + (PASS * n_lanes + lane) * 256, PASS, BLOCK)


@triton.jit
def _radix_gather(
    score_ptr, lane_len_ptr, hist_ptr,
    taken_ptr,  # [n_lanes, 2] int32, zeroed: slots used by keys above the k-th, by ties
    sel_ptr,  # [n_lanes, k] int32 out, prefilled with `width` (>= any length: skipped by phase 2)
    k, width, n_lanes,
    PASSES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    length = tl.load(lane_len_ptr + lane)
    keep = tl.minimum(k, length)
    kth, ties = _radix_state(hist_ptr, lane, n_lanes, keep, PASSES)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < length
    key = tl.load(score_ptr + lane * width + offs, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    above = (ok & (key > kth)).to(tl.int32)
    first = tl.atomic_add(taken_ptr + lane * 2, tl.sum(above, 0))
    tl.store(sel_ptr + lane * k + first + tl.cumsum(above, 0) - 1, offs, mask=above > 0)
    equal = (ok & (key == kth)).to(tl.int32)
    rank = tl.atomic_add(taken_ptr + lane * 2 + 1, tl.sum(equal, 0)) + tl.cumsum(equal, 0) - 1
    take = (equal > 0) & (rank < ties)
    tl.store(sel_ptr + lane * k + (keep - ties) + rank, offs, mask=take)


def top_k_positions(
    score: torch.Tensor,  # [n_lanes, width] fp32 >= 0 (+inf allowed) up to each lane's length
    lane_len: torch.Tensor,  # [n_lanes] int32
    k: int,
    hist: torch.Tensor | None = None,  # [RADIX_PASSES, n_lanes, 256] int32 with pass 0 counted, or None
) -> torch.Tensor:  # [n_lanes, k] int32 positions (any order); entries >= the lane's length: unused
    """Exact per-lane top-k positions (ties broken arbitrarily), torch.topk's selection in 5 launches."""
    n_lanes, width = score.shape
    if hist is None:
        hist = torch.zeros((RADIX_PASSES, n_lanes, 256), dtype=torch.int32, device=score.device)
        first = 0
    else:
        first = 1
    tiles = (n_lanes, triton.cdiv(width, RADIX_BLOCK))
    for p in range(first, RADIX_PASSES):
        _radix_hist[tiles](
            score, lane_len, hist, k, width, n_lanes, PASS=p, BLOCK=RADIX_BLOCK, num_warps=RADIX_WARPS
        )
    taken = torch.zeros((n_lanes, 2), dtype=torch.int32, device=score.device)
    sel = torch.full((n_lanes, k), width, dtype=torch.int32, device=score.device)
    _radix_gather[tiles](
        score, lane_len, hist, taken, sel, k, width, n_lanes,
        PASSES=RADIX_PASSES, BLOCK=RADIX_BLOCK, num_warps=RADIX_WARPS,
    )  # fmt: skip
    return sel


SCORE_BLOCK_N = 256  # positions per phase-1 program
SCORE_WARPS = 4


def sparq_select(
    q: torch.Tensor,  # [n_lanes, G, D]
    r: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # idx [n_lanes, r] int32, q_sel [n_lanes, G, r] fp32
    """sparq.select_components as one kernel (the torch version is a dozen tiny launches)."""
    n_lanes, group, head_dim = q.shape
    idx = torch.empty((n_lanes, r), dtype=torch.int32, device=q.device)
    q_sel = torch.empty((n_lanes, group, r), dtype=torch.float32, device=q.device)
    _sparq_select[(n_lanes,)](
        q, idx, q_sel, scale, q.stride(0), q.stride(1),
        G=group, D=head_dim, R=r, BLOCK_G=triton.next_power_of_2(group),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_R=triton.next_power_of_2(r), num_warps=1,
    )  # fmt: skip
    return idx, q_sel


def sparq_lane_scores(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane: the score row length
    local_window: int,
    radix: bool = True,  # count radix pass 0 for top_k_positions while scoring
    block_n: int = SCORE_BLOCK_N,
    num_warps: int = SCORE_WARPS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SparQ phase 1 over the paged pool (semantics: sparq.sparq_decode_reference).

    Returns score [n_lanes, width] fp32 (Σ_g softmax_g of the approximate logits; window +inf, padding
    -inf) and, with `radix`, the histograms [RADIX_PASSES, n_lanes, 256] with pass 0 counted.
    """
    n_lanes, group, r = q_sel.shape
    if kt_cache.dim() != 3 or kt_cache.shape[2] != lanes.block_size or kt_cache.stride(2) != 1:
        raise ValueError(f"kt_cache must be a contiguous [num_blocks, D, {lanes.block_size}]")
    q_sel, idx = q_sel.contiguous(), idx.contiguous()
    n_tiles = triton.cdiv(width, block_n)
    stats = torch.empty((2, n_lanes, n_tiles, group), dtype=torch.float32, device=q_sel.device)
    lse = torch.empty((n_lanes, group), dtype=torch.float32, device=q_sel.device)
    score = torch.empty((n_lanes, width), dtype=torch.float32, device=q_sel.device)
    hist = (
        torch.zeros((RADIX_PASSES, n_lanes, 256), dtype=torch.int32, device=q_sel.device) if radix else None
    )
    common = (q_sel, idx, kt_cache, lanes.blocks, lanes.lane_start, lanes.lane_len)
    shapes = {
        "G": group, "R": r, "BS": lanes.block_size, "SUB": min(block_n, lanes.block_size & -lanes.block_size),
        "BLOCK_G": triton.next_power_of_2(group),
        "BLOCK_R": triton.next_power_of_2(r), "BLOCK_N": block_n, "num_warps": num_warps,
    }  # fmt: skip
    strides = (kt_cache.stride(0), kt_cache.stride(1))
    _sparq_stats[(n_lanes, n_tiles)](*common, stats[0], stats[1], *strides, **shapes)
    _sparq_lse[(n_lanes,)](
        stats[0], stats[1], lse, n_tiles, G=group, BLOCK_G=shapes["BLOCK_G"], BLOCK_T=64, num_warps=2
    )
    _sparq_scores[(n_lanes, n_tiles)](
        *common,
        lse,
        score,
        score if hist is None else hist,
        width,
        local_window,
        *strides,
        HIST=radix,
        **shapes,
    )
    return score, hist
