"""Triton kernels over the paged KV pool: flash-decoding attention, dense or over selected rows.

Decode (split-K, "flash-decoding"): a lane's context is cut into `n_splits` equal partitions.

    kernel 1  _decode_partial  grid [n_lanes, n_splits]
        one program = one lane, all its G query heads (padded to BLOCK_H >= 16 rows for tl.dot), one
        partition, BLOCK_N positions per step: each K/V row is read once for the whole group.
        q [BLOCK_H, D] · K^T [D, BLOCK_N] -> online softmax (base 2) -> acc [BLOCK_H, D] += p · V
        out: acc / l and lse = m + log2(l) per (lane, split, head)     (n_splits == 1: final output)
    kernel 2  _decode_merge    grid [n_lanes, G]
        o = Σ_s 2^(lse_s - max) acc_s / Σ_s 2^(lse_s - max)

"Gather" mode (SparQ phase 2, sparq_kernels.py) walks a list of pool rows per lane (block * bs + row, -1 for
an unused slot) instead of the positions 0..len-1: the selection already resolved the block table, so
each step issues one dependent load (row -> K/V) instead of two (position -> block -> K/V).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


def gather_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Gather mode (SparQ phase 2): at least 4 programs per SM, 8 at head_dim 128. Each step's rows are
    scattered, so more programs in flight pay (H200, bench/gpu_attention.py --stages, llama8b shape,
    512 lanes x 2048 rows: 1 split 193 us, 2 (4 per SM) 165, 3 (8 per SM) 157; x 1024 rows at 16K: 95
    vs 92. smollm2, head_dim 64, 192 lanes x 2048: 8 per SM 47 us against 4 per SM 45)."""
    config = decode_config(head_dim, dtype)
    return replace(config, programs_per_sm=max(config.programs_per_sm, 4 if head_dim <= 64 else 8))


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
    sel_ptr,  # GATHER: [n_lanes, n_sel] int32 pool rows (block * BS + row), -1: skip
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
            flat = tl.load(sel_ptr + lane * stride_sel + j, mask=ok, other=-1)
            ok = ok & (flat >= 0)
            flat = tl.where(ok, flat, 0).to(tl.int64)
            blk = flat // BS
            row = flat % BS
        else:
            blk = tl.load(blocks_ptr + start + j // BS, mask=ok, other=0).to(tl.int64)
            row = j % BS
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
    rows: torch.Tensor | None,  # [n_lanes, n_sel] int32 pool rows (gather mode) or None (every position)
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
    sel = rows if rows is not None else lanes.lane_len  # unused pointer outside gather mode
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_partial[(n_lanes, splits)](
        q, k_cache, v_cache, lanes.blocks, lanes.lane_start, lanes.lane_len, sel, acc, lse,
        scale * LOG2E,
        rows.shape[1] if rows is not None else 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        sel.stride(0),
        G=group, D=head_dim, BS=lanes.block_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=config.block_n,
        GATHER=rows is not None, DIRECT=direct,
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
    rows: torch.Tensor,  # [n_lanes, n_sel] int32 pool rows (block * bs + row) to attend to; -1: skipped
    scale: float,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:  # [n_lanes, G, D]
    """Exact attention of each lane over the listed pool rows only (SparQ phase 2)."""
    if rows.dim() != 2 or rows.shape[0] != q.shape[0] or rows.stride(1) != 1 or rows.dtype != torch.int32:
        raise ValueError(f"rows must be a row-contiguous int32 [n_lanes, n_sel]; got {tuple(rows.shape)}")
    n_sel = rows.shape[1]
    config = config or gather_config(q.shape[-1], k_cache.dtype)
    return _launch_decode(q, k_cache, v_cache, lanes, scale, rows, n_sel, num_splits, config)
