"""Triton kernels of SparQ's phase 1 (semantics: sparq.sparq_decode_reference): components, logits, scores.

    _sparq_select  grid [n_lanes]           top-r components of Σ_g |q|, q at them times each head's
                                            softmax temperature (sparq.select_components, one launch)
    _sparq_logits  grid [n_lanes, n_tiles]  ONE pass over the r selected rows of kt_cache [num_blocks, D, bs]:
                                            e = exp(logit - tile max) of every head -> [n_lanes, G, wpad]
                                            (coalesced), and per tile the max and Σ e of each head
                                            (LogitsConfig: tile size, warps)
    _sparq_keys    grid [n_lanes, programs] lse per head from the tile stats, once per program; score =
                                            Σ_g e · exp(m_tile - lse) (= Σ_g softmax_g); window +inf ->
                                            int32 keys [n_lanes, wpad] (keys_config)
    selection      sparq_pick.py: the top-k keys of each lane -> pool rows [n_lanes, k] int32 (-1 unused)
    phase 2        paged_decode.gathered_decode_attention over `rows` (+ the split-K merge)

Why this shape (bench/RESULTS-gpu.md has the numbers): the score of a GQA lane needs every head's
log-sum-exp over the whole lane before any position can be scored. The previous design re-read kt for
that (two passes of 32-byte runs at bs 16, the slowest access of the step) and then ran a 5-launch
histogram radix select (global atomics) or torch.topk; either selection cost about a phase-1 pass.
Here kt is read once; the G values e per position are written once and read once, fully coalesced, in
fp32, which keeps the scores those of the fp32 reference up to rounding. (An fp16 e was tried on the H200:
slower, because of its conversions, and the selection moved: error against the reference 1-3e-2
instead of 2e-3. Re-reading kt for the keys instead of the e round trip was slower: bench/RESULTS-gpu.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from services.attention.kernels import PagedLanes


@dataclass(slots=True, frozen=True)
class LogitsConfig:
    """_sparq_logits launch settings (bench/gpu_attention.py --stages sweeps them).

    The default, one warp per 128-position tile, measured best at every pool block size (H200, bench
    --stages, 16K-32K): llama8b bs 128, B 64, 32K 212 us (3.8 TB/s of kt + e), 512 positions on 4 warps
    233 us even with per-run stats that avoid its cross-warp max (tried, removed). Pool blocks of 16: 128
    on 1 warp beats 256 on 2 (the previous setting) once lane_start is loaded before the tile branch:
    llama8b B 64, 32K 499 vs 590 us; B 16, 16K 69 vs 84; smollm2 B 64, 32K 93 vs 115; B 16, 16K 20 vs 25.
    Programs looping over 8-16 tiles were equal at 512 lanes and 1.4-2.2x slower at 128 (removed)."""

    block_n: int = 128  # positions per tile (a power of two)
    num_warps: int = 1


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
    start = tl.load(lane_start_ptr + lane)  # before the branch: one dependent load less per program
    if tile * BLOCK_N < length:
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
    m_ptr, l_ptr,  # [n_lanes, n_stat, G]: per logits tile of STAT_N positions
    lane_len_ptr,
    keys_ptr,  # [n_lanes, wpad] int32 out: fp32 bits of the score (>= 0, window +inf); -1 or unwritten past
    # the length
    sample_ptr,  # [n_lanes, NS] int32 out: the keys at positions 0, SS, 2·SS, ... (the selection's sample)
    wpad, n_stat, local_window,
    G: tl.constexpr, BLOCK_G: tl.constexpr, STAT_N: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES: tl.constexpr, SS: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    """score = Σ_g e_g · exp(m_tile_g - M_g) / Σ_tiles l · exp(m - M_g) = Σ_g softmax_g(logits).

    Each program scores TILES tiles of BLOCK_N positions of one lane; the lane's M_g and Σ_g come from
    the tile stats once per program ([BLOCK_T, BLOCK_G]), and each position takes the max of its own
    logits tile (STAT_N positions: a gather that hits L1)."""
    lane = tl.program_id(0)
    length = tl.load(lane_len_ptr + lane)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    offs_t = tl.arange(0, BLOCK_T)
    stat_ok = (offs_t < tl.cdiv(length, STAT_N))[:, None] & g_ok[None, :]
    stat_at = (lane * n_stat + offs_t[:, None]) * G + offs_g[None, :]  # [BLOCK_T, BLOCK_G]
    m = tl.load(m_ptr + stat_at, mask=stat_ok, other=float("-inf"))
    top = tl.max(m, 0)  # [BLOCK_G]; -inf for padding heads
    top = tl.where(g_ok, top, 0.0)
    total = tl.sum(tl.load(l_ptr + stat_at, mask=stat_ok, other=0.0) * tl.exp(m - top[None, :]), 0)
    inv = tl.where(g_ok, 1.0 / tl.where(g_ok, total, 1.0), 0.0)  # [BLOCK_G]
    first_tile = tl.program_id(1) * TILES
    e_rows = e_ptr + (lane * G + offs_g).to(tl.int64)[:, None] * wpad  # [BLOCK_G, 1]
    for tile in range(first_tile, tl.minimum(first_tile + TILES, tl.cdiv(length, BLOCK_N))):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        at_g = (lane * n_stat + offs_n // STAT_N)[None, :] * G + offs_g[:, None]  # [BLOCK_G, BLOCK_N]
        m_tile = tl.load(m_ptr + at_g, mask=g_ok[:, None], other=0.0)
        c = tl.exp(m_tile - top[:, None]) * inv[:, None]
        e = tl.load(e_rows + offs_n[None, :], mask=g_ok[:, None], other=0.0)
        score = tl.sum(c * e, 0)  # [BLOCK_N]
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


@dataclass(slots=True, frozen=True)
class KeysConfig:
    """_sparq_keys launch settings (bench/gpu_attention.py --stages sweeps them; keys_config picks one)."""

    block_n: int = 512  # positions per loop step (a power of two; at most the largest dividing wpad)
    tiles: int = 4  # loop steps per program
    num_warps: int = 4
    num_stages: int = 2


def keys_config(n_lanes: int) -> KeysConfig:
    """H200, bench --stages. From 256 lanes one warp loops over 16 steps of 128 positions, 3 stages
    (llama8b bs 128 B 64 = 512 lanes: 32K 97 vs 104 us, 16K 54 vs 56; bs 16 32K 95 vs 100). From 128
    lanes 4 warps over 4 steps of 512 (llama8b B 16, 16K: 20 us, the one-warp loop 25; smollm2 B 64, 32K:
    38 vs 43 for a single step). Fewer lanes take one step per program: more programs in flight."""
    if n_lanes >= 256:
        return KeysConfig(block_n=128, tiles=16, num_warps=1, num_stages=3)
    return KeysConfig() if n_lanes >= 128 else KeysConfig(tiles=1)


def sparq_logits(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    config: LogitsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # e [n_lanes, G, wpad] fp32, stats [2, n_lanes, n_tiles, G]
    """Phase 1, pass over kt: e = exp(logit - tile max) of every head, and each tile's max and Σ e."""
    n_lanes, group, r = q_sel.shape
    if kt_cache.dim() != 3 or kt_cache.shape[2] != lanes.block_size or kt_cache.stride(2) != 1:
        raise ValueError(f"kt_cache must be a contiguous [num_blocks, D, {lanes.block_size}]")
    if group > MAX_GROUP:
        raise ValueError(f"the Triton SparQ kernels take up to {MAX_GROUP} query heads per KV head: {group}")
    config = config or LogitsConfig()
    block_n = config.block_n
    n_tiles = triton.cdiv(width, block_n)
    e = torch.empty((n_lanes, group, n_tiles * block_n), dtype=torch.float32, device=q_sel.device)
    stats = torch.empty((2, n_lanes, n_tiles, group), dtype=torch.float32, device=q_sel.device)
    _sparq_logits[(n_lanes, n_tiles)](
        q_sel.contiguous(), idx.contiguous(), kt_cache, lanes.blocks, lanes.lane_start, lanes.lane_len,
        e, stats[0], stats[1], e.shape[2], kt_cache.stride(0), kt_cache.stride(1),
        G=group, R=r, BS=lanes.block_size, SUB=min(block_n, lanes.block_size & -lanes.block_size),
        BLOCK_N=block_n, num_warps=config.num_warps,
    )  # fmt: skip
    return e, stats


def sparq_keys(
    e: torch.Tensor,  # [n_lanes, G, wpad] from sparq_logits
    stats: torch.Tensor,  # [2, n_lanes, n_tiles, G]
    lanes: PagedLanes,
    width: int,  # longest lane
    local_window: int,
    config: KeysConfig | None = None,
) -> Phase1:
    """Phase 1, scoring: Σ_g softmax_g from e and the tile stats, as int32 keys (and their sample)."""
    n_lanes, group, wpad = e.shape
    n_stat = stats.shape[2]
    config = config or keys_config(n_lanes)
    block_n = math.gcd(config.block_n, wpad)  # a power of two that divides the rows of e
    n_tiles = wpad // block_n
    stride, ns = sample_shape(width)
    keys = torch.empty((n_lanes, wpad), dtype=torch.int32, device=e.device)
    sample = torch.empty((n_lanes, ns), dtype=torch.int32, device=e.device)
    _sparq_keys[(n_lanes, triton.cdiv(n_tiles, config.tiles))](
        e, stats[0], stats[1], lanes.lane_len, keys, sample, wpad, n_stat, local_window,
        G=group, BLOCK_G=triton.next_power_of_2(group), STAT_N=wpad // n_stat,
        BLOCK_T=triton.next_power_of_2(n_stat), BLOCK_N=block_n, TILES=config.tiles, SS=stride,
        NS=sample.shape[1], num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return Phase1(keys, wpad, sample, stride)


def sparq_scores(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    local_window: int,
    config: LogitsConfig | None = None,
    keys_config: KeysConfig | None = None,
) -> Phase1:
    """Score = Σ_g softmax_g(approximate logits): one pass over kt, then the keys."""
    e, stats = sparq_logits(q_sel, idx, kt_cache, lanes, width, config)
    return sparq_keys(e, stats, lanes, width, local_window, keys_config)
