"""Triton kernels of SparQ's phase 1 (semantics: sparq.sparq_decode_reference): components, logits, scores.

    _sparq_select  grid [n_lanes]           top-r components of Σ_g |q|, q at them times each head's
                                            softmax temperature (sparq.select_components, one launch)
    _sparq_logits  grid [n_lanes, n_tiles]  ONE pass over the r selected rows of kt_cache [num_blocks, D, bs]:
                                            e = exp(logit - tile max) of every head -> [n_lanes, G, wpad]
                                            (coalesced), and per tile the max and Σ e of each head
    _sparq_keys    grid [n_lanes, n_tiles]  lse per head from the tile stats; score = Σ_g e · exp(m_tile -
                                            lse) (= Σ_g softmax_g); window +inf -> int32 keys [n_lanes, wpad]
    selection      sparq_pick.py: the top-k keys of each lane -> pool rows [n_lanes, k] int32 (-1 unused)
    phase 2        paged_decode.gathered_decode_attention over `rows` (+ the split-K merge)

Why this shape (bench/RESULTS-gpu.md has the numbers): the score of a GQA lane needs every head's
log-sum-exp over the whole lane before any position can be scored. The previous design re-read kt for
that (two passes of 32-byte runs at bs 16, the slowest access of the step) and then ran a 5-launch
histogram radix select (global atomics) or torch.topk; either selection cost about a phase-1 pass.
Here kt is read once; the G values e per position are written once and read once, fully coalesced, in
fp32, which keeps the scores those of the fp32 reference up to rounding. (An fp16 e was tried on the H200:
slower, because of its conversions, and the selection moved: error against the reference 1-3e-2
instead of 2e-3.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from services.attention.kernels import PagedLanes

LOGITS_WARPS = 4


def logits_block_n(block_size: int) -> int:
    """Positions per _sparq_logits program (H200, bench --stages: bs 16, 256 and 512 equal at 66 us;
    bs 128, 512 at 42 us against 67 us at 256)."""
    return 256 if block_size < 64 else 512


@triton.jit
def _sparq_select(
    q_ptr,  # [n_lanes, G, D]
    idx_ptr,  # [n_lanes, R] int32 out: the lane's top-R components of Σ_g |q|, by decreasing mass
    qs_ptr,  # [n_lanes, G, R] fp32 out: q at them times each head's temperature
    scale,
    stride_qn,
    stride_qg,
    G: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sparq.select_components in one program per lane. Each component's rank (how many components
    have more mass, ties: lower index first) comes from one [D, D] comparison, so there is no serial
    loop of R argmax rounds; the top R are scattered to their rank."""
    lane = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_g[:, None] < G) & (offs_d[None, :] < D)
    q = tl.load(
        q_ptr + lane * stride_qn + offs_g[:, None] * stride_qg + offs_d[None, :], mask=mask, other=0.0
    )
    q = q.to(tl.float32)  # [BLOCK_G, BLOCK_D]
    mass = tl.where(offs_d < D, tl.sum(tl.abs(q), 0), -1.0)  # [BLOCK_D]; -1: padding
    mass_c = tl.expand_dims(mass, 1)  # [BLOCK_D, 1]
    mass_r = tl.expand_dims(mass, 0)  # [1, BLOCK_D]
    d_c = tl.expand_dims(offs_d, 1)
    d_r = tl.expand_dims(offs_d, 0)
    before = (mass_r > mass_c) | ((mass_r == mass_c) & (d_r < d_c))  # [BLOCK_D, BLOCK_D]
    rank = tl.sum(before.to(tl.int32), 1)  # [BLOCK_D]
    chosen = (rank < R) & (offs_d < D)
    total = tl.sum(tl.abs(q), 1)  # [BLOCK_G]
    kept = tl.sum(tl.where(chosen[None, :], tl.abs(q), 0.0), 1)
    ratio = tl.where(total > 0, kept / tl.where(total > 0, total, 1.0), 1.0)
    qs = q * (scale / tl.sqrt(tl.maximum(ratio, 1e-12)))[:, None]
    tl.store(idx_ptr + lane * R + rank, offs_d, mask=chosen)
    qs_ptrs = qs_ptr + (lane * G + offs_g[:, None]) * R + rank[None, :]
    tl.store(qs_ptrs, qs, mask=(offs_g[:, None] < G) & chosen[None, :])


MAX_GROUP = 8  # query heads per KV head _sparq_logits accumulates (one register tile each)


@triton.jit
def _tile_out(s, g, e_ptr, m_ptr, l_ptr, stat, e_row, pos, length):
    """Head g of one tile: e = exp(logit - tile max) -> e_ptr, the max and Σ e -> the stats."""
    s = tl.where(pos < length, s, float("-inf"))
    m = tl.max(tl.max(s, 1), 0)  # finite: the tile holds a position
    e = tl.exp(s - m)
    tl.store(m_ptr + stat + g, m)
    tl.store(l_ptr + stat + g, tl.sum(tl.sum(e, 1), 0))
    tl.store(e_ptr + e_row + pos, e)


@triton.jit
def _sparq_logits(
    qs_ptr,  # [n_lanes, G, R] fp32: q's selected components, softmax temperature folded in
    idx_ptr,  # [n_lanes, R] int32 component ids
    kt_ptr,  # [num_blocks, D, BS]
    blocks_ptr, lane_start_ptr, lane_len_ptr,  # PagedLanes
    e_ptr,  # [n_lanes, G, wpad] fp32 out: exp(logit - tile max); tiles past the length unwritten
    m_ptr, l_ptr,  # [n_lanes, n_tiles, G] fp32 out: tile max of the logits, tile Σ e
    wpad, stride_ktb, stride_ktd,
    G: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK_N positions = RUNS runs of SUB positions, each inside one pool block, so a
    component's run is contiguous in kt_cache and loads as wide vectors (the block id alone is
    gathered). Every tensor keeps the [RUNS, SUB] layout of those loads: components are an unrolled
    loop, each read once, and each head (up to MAX_GROUP) has its own accumulator updated with a scalar
    q, so nothing crosses threads but the per-head max and sum. (Measured on the H200: a [G, N] tile
    needed layout conversions through shared memory, 44 barriers per program; re-reading the
    components per head from L1 was slower still for G = 4, R = 16.)"""
    lane = tl.program_id(0)
    tile = tl.program_id(1)
    length = tl.load(lane_len_ptr + lane)
    if tile * BLOCK_N < length:
        start = tl.load(lane_start_ptr + lane)
        base = tile * BLOCK_N + tl.arange(0, BLOCK_N // SUB) * SUB  # [RUNS] first position of each run
        run_ok = base < length
        blk = tl.load(blocks_ptr + start + base // BS, mask=run_ok, other=0).to(tl.int64)
        first = blk * stride_ktb + (base % BS if SUB < BS else 0)  # [RUNS]
        offs_sub = tl.arange(0, SUB)
        s0 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        s1 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        s2 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        s3 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        s4 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        s5 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        s6 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        s7 = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
        q_row = qs_ptr + lane * G * R
        for i in tl.static_range(R):
            comp = tl.load(idx_ptr + lane * R + i).to(tl.int64)
            # Whole runs are read (rows past the length sit inside the lane's last block): the
            # mask stays constant along a run and the loads stay vectorized.
            ptrs = kt_ptr + (first + comp * stride_ktd)[:, None] + offs_sub[None, :]
            kt = tl.load(ptrs, mask=run_ok[:, None], other=0.0).to(tl.float32)  # [RUNS, SUB]
            s0 += tl.load(q_row + i) * kt
            if G > 1:
                s1 += tl.load(q_row + R + i) * kt
            if G > 2:
                s2 += tl.load(q_row + 2 * R + i) * kt
            if G > 3:
                s3 += tl.load(q_row + 3 * R + i) * kt
            if G > 4:
                s4 += tl.load(q_row + 4 * R + i) * kt
            if G > 5:
                s5 += tl.load(q_row + 5 * R + i) * kt
            if G > 6:
                s6 += tl.load(q_row + 6 * R + i) * kt
            if G > 7:
                s7 += tl.load(q_row + 7 * R + i) * kt
        pos = base[:, None] + offs_sub[None, :]  # [RUNS, SUB]
        stat = (lane * tl.num_programs(1) + tile) * G
        e_row = (lane * G).to(tl.int64) * wpad
        _tile_out(s0, 0, e_ptr, m_ptr, l_ptr, stat, e_row, pos, length)
        if G > 1:
            _tile_out(s1, 1, e_ptr, m_ptr, l_ptr, stat, e_row + wpad, pos, length)
        if G > 2:
            _tile_out(s2, 2, e_ptr, m_ptr, l_ptr, stat, e_row + 2 * wpad, pos, length)
        if G > 3:
            _tile_out(s3, 3, e_ptr, m_ptr, l_ptr, stat, e_row + 3 * wpad, pos, length)
        if G > 4:
            _tile_out(s4, 4, e_ptr, m_ptr, l_ptr, stat, e_row + 4 * wpad, pos, length)
        if G > 5:
            _tile_out(s5, 5, e_ptr, m_ptr, l_ptr, stat, e_row + 5 * wpad, pos, length)
        if G > 6:
            _tile_out(s6, 6, e_ptr, m_ptr, l_ptr, stat, e_row + 6 * wpad, pos, length)
        if G > 7:
            _tile_out(s7, 7, e_ptr, m_ptr, l_ptr, stat, e_row + 7 * wpad, pos, length)


@triton.jit
def _sparq_keys(
    e_ptr,  # [n_lanes, G, wpad] from _sparq_logits
    m_ptr, l_ptr,  # [n_lanes, n_tiles, G]
    lane_len_ptr,
    keys_ptr,  # [n_lanes, wpad] int32 out: fp32 bits of the score (>= 0, window +inf); -1 or unwritten past
    # the length
    sample_ptr,  # [n_lanes, NS] int32 out: the keys at positions 0, SS, 2·SS, ... (the selection's sample)
    wpad, local_window,
    G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SS: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    """score = Σ_g e_g · exp(m_tile_g - M_g) / Σ_tiles l · exp(m - M_g) = Σ_g softmax_g(logits)."""
    lane = tl.program_id(0)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    length = tl.load(lane_len_ptr + lane)
    if tile * BLOCK_N < length:
        offs_t = tl.arange(0, BLOCK_T)
        t_ok = offs_t < tl.cdiv(length, BLOCK_N)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        score = tl.zeros([BLOCK_N], tl.float32)
        for g in tl.static_range(G):
            m = tl.load(m_ptr + (lane * n_tiles + offs_t) * G + g, mask=t_ok, other=float("-inf"))
            top = tl.max(m, 0)  # [BLOCK_T] -> scalar, finite
            total = tl.sum(
                tl.load(l_ptr + (lane * n_tiles + offs_t) * G + g, mask=t_ok, other=0.0) * tl.exp(m - top), 0
            )
            c = tl.exp(tl.load(m_ptr + (lane * n_tiles + tile) * G + g) - top) / total
            score += c * tl.load(e_ptr + (lane * G + g).to(tl.int64) * wpad + offs_n)
        ok = offs_n < length
        score = tl.where(ok & (offs_n >= length - local_window), float("inf"), score)
        key = tl.where(ok, score.to(tl.int32, bitcast=True), -1)
        tl.store(keys_ptr + lane.to(tl.int64) * wpad + offs_n, key)
        # A compact copy of the strided sample: read from `keys` it would cost a DRAM burst per sample
        # key, i.e. the whole array at SS = 16 (bench/RESULTS-gpu.md: bounds 39 -> 21 us at 512 lanes
        # x 32K, `bench/gpu_attention.py --stages`).
        on_grid = (offs_n % SS == 0) & (offs_n // SS < NS)
        tl.store(sample_ptr + lane * NS + offs_n // SS, key, mask=on_grid)


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
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )  # fmt: skip
    return idx, q_sel


MAX_SAMPLE = 2048  # sample keys per lane (the selection's bounds)


def sample_stride(width: int) -> int:
    """Positions per sampled key: the expected band, 2·δ·SS ~ 2.5·sqrt(width·SS) keys at k = width/16,
    stays under 45 % of sparq_pick.BAND, and the sample under MAX_SAMPLE (SS 32 at 16K: 512 samples,
    band ~1.8K; 16 at 32K: 2048 samples, band ~1.8K). Interpreter check, 16K keys, SS 32 and BAND 2048:
    a band of 2065 keys (too many), hence BAND 4096."""
    stride = 1
    while stride * 2 * width <= 966_000 and stride < width:
        stride *= 2
    while triton.cdiv(width, stride) > MAX_SAMPLE:
        stride *= 2
    return stride


def sample_shape(width: int) -> tuple[int, int]:
    """(stride, NS): the sample's stride and its row length (a power of two >= its keys)."""
    stride = sample_stride(width)
    return stride, triton.next_power_of_2(triton.cdiv(width, stride))


@dataclass(slots=True, frozen=True)
class Phase1:
    """SparQ phase 1 of one step: every position's score as an int32 key (the fp32 bits, >= 0; the window
    +inf), wpad >= the longest lane, and every `stride`-th key again in `sample`. Entries at or past a
    lane's length are unspecified: readers mask them with lane_len."""

    keys: torch.Tensor  # [n_lanes, wpad] int32
    wpad: int
    sample: torch.Tensor  # [n_lanes, NS] int32: keys[:, ::stride], NS a power of two
    stride: int

    @classmethod
    def of_keys(cls, keys: torch.Tensor, width: int) -> Phase1:
        """From keys made elsewhere (tests): the sample taken in torch."""
        stride, ns = sample_shape(width)
        strided = keys[:, ::stride][:, : triton.cdiv(width, stride)]
        sample = torch.full((keys.shape[0], ns), -1, dtype=torch.int32, device=keys.device)
        sample[:, : strided.shape[1]] = strided
        return cls(keys, keys.shape[1], sample, stride)


def sparq_logits(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    block_n: int | None = None,  # None: logits_block_n(bs)
    num_warps: int = LOGITS_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:  # e [n_lanes, G, wpad] fp32, stats [2, n_lanes, n_tiles, G]
    """Phase 1, pass over kt: e = exp(logit - tile max) of every head, and each tile's max and Σ e."""
    n_lanes, group, r = q_sel.shape
    if kt_cache.dim() != 3 or kt_cache.shape[2] != lanes.block_size or kt_cache.stride(2) != 1:
        raise ValueError(f"kt_cache must be a contiguous [num_blocks, D, {lanes.block_size}]")
    if group > MAX_GROUP:
        raise ValueError(f"the Triton SparQ kernels take up to {MAX_GROUP} query heads per KV head: {group}")
    block_n = block_n or logits_block_n(lanes.block_size)
    n_tiles = triton.cdiv(width, block_n)
    e = torch.empty((n_lanes, group, n_tiles * block_n), dtype=torch.float32, device=q_sel.device)
    stats = torch.empty((2, n_lanes, n_tiles, group), dtype=torch.float32, device=q_sel.device)
    _sparq_logits[(n_lanes, n_tiles)](
        q_sel.contiguous(), idx.contiguous(), kt_cache, lanes.blocks, lanes.lane_start, lanes.lane_len,
        e, stats[0], stats[1], e.shape[2], kt_cache.stride(0), kt_cache.stride(1),
        G=group, R=r, BS=lanes.block_size, SUB=min(block_n, lanes.block_size & -lanes.block_size),
        BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return e, stats


def sparq_keys(
    e: torch.Tensor,  # [n_lanes, G, wpad] from sparq_logits
    stats: torch.Tensor,  # [2, n_lanes, n_tiles, G]
    lanes: PagedLanes,
    width: int,  # longest lane
    local_window: int,
) -> Phase1:
    """Phase 1, scoring: Σ_g softmax_g from e and the tile stats, as int32 keys (and their sample)."""
    n_lanes, group, wpad = e.shape
    n_tiles = stats.shape[2]
    stride, ns = sample_shape(width)
    keys = torch.empty((n_lanes, wpad), dtype=torch.int32, device=e.device)
    sample = torch.empty((n_lanes, ns), dtype=torch.int32, device=e.device)
    _sparq_keys[(n_lanes, n_tiles)](
        e, stats[0], stats[1], lanes.lane_len, keys, sample, wpad, local_window,
        G=group, BLOCK_N=wpad // n_tiles, BLOCK_T=triton.next_power_of_2(n_tiles), SS=stride,
        NS=sample.shape[1], num_warps=4,
    )  # fmt: skip
    return Phase1(keys, wpad, sample, stride)


def sparq_scores(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    local_window: int,
    block_n: int | None = None,
    num_warps: int = LOGITS_WARPS,
) -> Phase1:
    """Score = Σ_g softmax_g(approximate logits): one pass over kt, then the keys."""
    e, stats = sparq_logits(q_sel, idx, kt_cache, lanes, width, block_n, num_warps)
    return sparq_keys(e, stats, lanes, width, local_window)
