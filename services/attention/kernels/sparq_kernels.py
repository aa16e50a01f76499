"""Triton kernels of the SparQ step (semantics: sparq.sparq_decode_reference): four launches before phase 2.

    _sparq_select  grid [n_lanes]           top-r components of Σ_g |q|, q at them times each head's
                                            softmax temperature (sparq.select_components, one launch)
    _sparq_logits  grid [n_lanes, n_tiles]  ONE pass over the r selected rows of kt_cache [num_blocks, D, bs]:
                                            e = exp(logit - tile max) of every head -> [n_lanes, G, wpad]
                                            (coalesced), and per tile the max and Σ e of each head
    _sparq_keys    grid [n_lanes, n_tiles]  lse per head from the tile stats; score = Σ_g e · exp(m_tile -
                                            lse) (= Σ_g softmax_g); window +inf -> int32 keys [n_lanes, wpad]
    _sparq_pick    grid [n_lanes]           the exact k-th key by bisection on its bits, then the selected
                                            positions' pool rows in position order -> rows [n_lanes, k]
                                            int32 (-1: unused slot)
    phase 2        paged_decode.gathered_decode_attention over `rows` (+ the split-K merge)

Why this shape (bench/RESULTS-gpu.md has the numbers): the score of a GQA lane needs every head's
log-sum-exp over the whole lane before any position can be scored. The previous design re-read kt for
that (two passes of 32-byte runs at bs 16, the slowest access of the step) and then ran a 5-launch
histogram radix select (global atomics) or torch.topk; both selections cost about a dense phase-1 pass.
Here kt is read once; the G values e per position are written once and read once, fully coalesced, in
fp32, which keeps the scores those of the fp32 reference up to rounding. (An fp16 e was tried on the H200:
slower, because of its conversions, and the selection moved: error against the reference 1-3e-2
instead of 2e-3.)

_sparq_pick holds the lane's keys in registers ([WIDTH], WIDTH = next power of two >= the longest lane,
one program per lane), so it serves lanes up to PICK_MAX_WIDTH positions; longer lanes are selected by
torch.topk over the same keys (slower, same function). The threshold search:
  stage A  binary bisection of bits 30..SPLIT (16) over all keys (one CTA-wide count per bit),
  stage B  the keys inside the bin found (1/128 of an octave: typically well under 1 % of the lane; at
           SPLIT 20 the random bench data overflowed CAND and took the slow path) are compacted to a
           scratch row, and the
           remaining SPLIT bits are found 4 at a time (16 candidate thresholds per count) on them;
           if the bin holds more than CAND keys, stage A simply continues on all keys (exact either way).
Ties at the k-th score are broken by position (the lowest positions are taken).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from services.attention.kernels import PagedLanes

LOGITS_BLOCK_N = 512  # positions per _sparq_logits program
LOGITS_WARPS = 4
PICK_MAX_WIDTH = 32768  # longest lane _sparq_pick selects in registers; longer: torch


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
    gathered). Every tensor keeps the [RUNS, SUB] layout of those loads: heads and components are
    unrolled loops with scalar q, so nothing crosses threads but the per-head max and sum (a [G, N]
    tile would need layout conversions through shared memory: 44 barriers per program, measured slow).
    Heads after the first re-read the components from L1."""
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
        pos = base[:, None] + offs_sub[None, :]  # [RUNS, SUB]
        stat = (lane * tl.num_programs(1) + tile) * G
        for g in tl.static_range(G):
            s = tl.zeros([BLOCK_N // SUB, SUB], tl.float32)
            for i in tl.static_range(R):
                comp = tl.load(idx_ptr + lane * R + i).to(tl.int64)
                q_gi = tl.load(qs_ptr + (lane * G + g) * R + i)
                # Whole runs are read (rows past the length sit inside the lane's last block): the
                # mask stays constant along a run and the loads stay vectorized.
                ptrs = kt_ptr + (first + comp * stride_ktd)[:, None] + offs_sub[None, :]
                s += q_gi * tl.load(ptrs, mask=run_ok[:, None], other=0.0).to(tl.float32)
            s = tl.where(pos < length, s, float("-inf"))
            m = tl.max(tl.max(s, 1), 0)  # finite: the tile holds a position
            e = tl.exp(s - m)
            tl.store(m_ptr + stat + g, m)
            tl.store(l_ptr + stat + g, tl.sum(tl.sum(e, 1), 0))
            tl.store(e_ptr + (lane * G + g).to(tl.int64) * wpad + pos, e)


@triton.jit
def _sparq_keys(
    e_ptr,  # [n_lanes, G, wpad] from _sparq_logits
    m_ptr, l_ptr,  # [n_lanes, n_tiles, G]
    lane_len_ptr,
    keys_ptr,  # [n_lanes, wpad] int32 out: fp32 bits of the score (>= 0, window +inf); -1 or unwritten past
    # the length
    wpad, local_window,
    G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
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


@triton.jit
def _count_at_least(key, threshold):
    return tl.sum((key >= threshold).to(tl.int32), 0)


@triton.jit
def _sparq_pick(
    keys_ptr,  # [n_lanes, wpad] int32 from _sparq_keys
    blocks_ptr, lane_start_ptr, lane_len_ptr,  # PagedLanes
    cand_ptr,  # [n_lanes, CAND] int32 scratch: the keys inside the threshold's bin
    rows_ptr,  # [n_lanes, k] int32 out: pool rows (block * BS + row) of the selected positions, -1 unused
    wpad, k,
    BS: tl.constexpr, WIDTH: tl.constexpr, CHUNK: tl.constexpr, CAND: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The lane's keys stay in registers for the bisection; the two compactions (bin keys, selected rows)
    re-read them in CHUNK pieces, which bounds the registers of their scatters."""
    lane = tl.program_id(0)
    length = tl.load(lane_len_ptr + lane)
    start = tl.load(lane_start_ptr + lane)
    key_row = keys_ptr + lane.to(tl.int64) * wpad
    offs = tl.arange(0, WIDTH)
    key = tl.load(key_row + offs, mask=offs < length, other=-1)
    need = tl.minimum(k, length)

    # The k-th largest key `thr`: the largest value with at least `need` keys >= it, bit by bit.
    thr = tl.zeros([], tl.int32)
    at_least = length  # keys >= thr
    for i in range(31 - SPLIT):  # stage A: bits 30..SPLIT over all keys
        cand = thr | (tl.full([], 1, tl.int32) << (30 - i))
        count = _count_at_least(key, cand)
        thr = tl.where(count >= need, cand, thr)
        at_least = tl.where(count >= need, count, at_least)
    hi = thr + (1 << SPLIT)
    n_hi = _count_at_least(key, hi)  # < need
    if at_least - n_hi <= CAND:  # stage B on the bin's keys only, 4 bits per count
        filled = tl.zeros([], tl.int32)
        for c in tl.static_range(WIDTH // CHUNK):
            offs_c = c * CHUNK + tl.arange(0, CHUNK)
            chunk = tl.load(key_row + offs_c, mask=offs_c < length, other=-1)
            in_bin = ((chunk >= thr) & (chunk < hi)).to(tl.int32)
            tl.store(cand_ptr + lane * CAND + filled + tl.cumsum(in_bin, 0) - 1, chunk, mask=in_bin > 0)
            filled += tl.sum(in_bin, 0)
        tl.debug_barrier()  # the stores above are read back by other threads of this program
        offs_b = tl.arange(0, CAND)
        bin_ptrs = cand_ptr + lane * CAND + offs_b
        bin_keys = tl.load(bin_ptrs, mask=offs_b < filled, other=-1, cache_modifier=".cg")
        digits = tl.arange(0, 16)
        for it in tl.static_range(SPLIT // 4):
            shift = SPLIT - 4 * (it + 1)
            cands = thr + (digits << shift)  # [16]
            counts = tl.sum((bin_keys[:, None] >= cands[None, :]).to(tl.int32), 0)  # [16]
            thr = thr + (tl.max(tl.where(counts >= need - n_hi, digits, 0), 0) << shift)
        n_above = n_hi + tl.sum((bin_keys > thr).to(tl.int32), 0)
        n_tie = tl.sum((bin_keys == thr).to(tl.int32), 0)
    else:
        for i in range(SPLIT):  # a crowded bin: continue bit by bit over all keys
            cand = thr | (tl.full([], 1, tl.int32) << (SPLIT - 1 - i))
            thr = tl.where(_count_at_least(key, cand) >= need, cand, thr)
        n_above = tl.sum((key > thr).to(tl.int32), 0)
        n_tie = tl.sum((key == thr).to(tl.int32), 0)

    quota = need - n_above  # keys equal to thr to take, 1..n_tie: the lowest positions
    taken = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    for c in tl.static_range(WIDTH // CHUNK):
        offs_c = c * CHUNK + tl.arange(0, CHUNK)
        chunk = tl.load(key_row + offs_c, mask=offs_c < length, other=-1)
        tie = chunk == thr
        if n_tie > quota:
            take = (chunk > thr) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= quota))
            ties += tl.sum(tie.to(tl.int32), 0)
        else:
            take = chunk >= thr
        take_i = take.to(tl.int32)
        blk = tl.load(blocks_ptr + start + offs_c // BS, mask=take, other=0)
        tl.store(rows_ptr + lane * k + taken + tl.cumsum(take_i, 0) - 1, blk * BS + offs_c % BS, mask=take)
        taken += tl.sum(take_i, 0)
    offs_k = tl.arange(0, BLOCK_K)
    unused = (offs_k >= need) & (offs_k < k)
    tl.store(rows_ptr + lane * k + offs_k, tl.full([BLOCK_K], -1, tl.int32), mask=unused)


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


@dataclass(slots=True, frozen=True)
class Phase1:
    """SparQ phase 1 of one step: every position's score as an int32 key (the fp32 bits, >= 0; the window
    +inf), wpad >= the longest lane. Entries at or past a lane's length are unspecified: readers mask them
    with lane_len."""

    keys: torch.Tensor  # [n_lanes, wpad] int32
    wpad: int


def sparq_logits(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    block_n: int = LOGITS_BLOCK_N,
    num_warps: int = LOGITS_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:  # e [n_lanes, G, wpad] fp32, stats [2, n_lanes, n_tiles, G]
    """Phase 1, pass over kt: e = exp(logit - tile max) of every head, and each tile's max and Σ e."""
    n_lanes, group, r = q_sel.shape
    if kt_cache.dim() != 3 or kt_cache.shape[2] != lanes.block_size or kt_cache.stride(2) != 1:
        raise ValueError(f"kt_cache must be a contiguous [num_blocks, D, {lanes.block_size}]")
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
    local_window: int,
) -> Phase1:
    """Phase 1, scoring: Σ_g softmax_g from e and the tile stats, as int32 keys."""
    n_lanes, group, wpad = e.shape
    n_tiles = stats.shape[2]
    keys = torch.empty((n_lanes, wpad), dtype=torch.int32, device=e.device)
    _sparq_keys[(n_lanes, n_tiles)](
        e, stats[0], stats[1], lanes.lane_len, keys, wpad, local_window,
        G=group, BLOCK_N=wpad // n_tiles, BLOCK_T=triton.next_power_of_2(n_tiles), num_warps=4,
    )  # fmt: skip
    return Phase1(keys, wpad)


def sparq_scores(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    local_window: int,
    block_n: int = LOGITS_BLOCK_N,
    num_warps: int = LOGITS_WARPS,
) -> Phase1:
    """Score = Σ_g softmax_g(approximate logits): one pass over kt, then the keys."""
    e, stats = sparq_logits(q_sel, idx, kt_cache, lanes, width, block_n, num_warps)
    return sparq_keys(e, stats, lanes, local_window)


def pick_warps(width: int) -> int:
    """Warps of _sparq_pick: 32 keys per thread up to 16K, 16 at 32K (the bisection's register array;
    sm_90 compiles, cuobjdump: 128 registers at 16K / 16 warps, 64 at 32K / 32 warps, no spills)."""
    return max(4, min(32, triton.next_power_of_2(width) // 1024))


def sparq_pick(
    phase1: Phase1,
    lanes: PagedLanes,
    k: int,  # keys per lane (<= width)
    width: int,  # longest lane
    num_warps: int | None = None,
) -> torch.Tensor:  # [n_lanes, k] int32 pool rows (block * bs + row); -1: unused
    """Selection: the top-k positions of the score (window included); position order below
    PICK_MAX_WIDTH, any order above (torch.topk)."""
    keys = phase1.keys
    n_lanes = keys.shape[0]
    if width > PICK_MAX_WIDTH:
        return _pick_torch(phase1, lanes, k, width)
    warps = num_warps or pick_warps(width)
    block = triton.next_power_of_2(width)
    cand = min(block, max(512, 32 * warps))  # bin keys stage B handles: [cand, 16] compares
    rows = torch.empty((n_lanes, k), dtype=torch.int32, device=keys.device)
    scratch = torch.empty((n_lanes, cand), dtype=torch.int32, device=keys.device)
    _sparq_pick[(n_lanes,)](
        keys, lanes.blocks, lanes.lane_start, lanes.lane_len, scratch, rows, phase1.wpad, k,
        BS=lanes.block_size, WIDTH=block, CHUNK=min(block, 256 * warps), CAND=cand,
        SPLIT=16,
        BLOCK_K=triton.next_power_of_2(k), num_warps=warps,
    )  # fmt: skip
    return rows


def _pick_torch(phase1: Phase1, lanes: PagedLanes, k: int, width: int) -> torch.Tensor:
    """Lanes longer than PICK_MAX_WIDTH: torch.topk over the same keys (no host sync)."""
    bs = lanes.block_size
    length = lanes.lane_len.long()[:, None]  # [n_lanes, 1]
    keys = phase1.keys[:, :width]
    valid = (torch.arange(width, device=keys.device)[None, :] < length) & (keys >= 0)
    score = torch.where(valid, keys.view(torch.float32), float("-inf"))  # unwritten tiles: masked
    sel = score.topk(k, dim=1, sorted=False).indices  # [n_lanes, k]
    table = lanes.padded_table(-(-width // bs))  # [n_lanes, MB]
    rows = table.gather(1, sel // bs) * bs + sel % bs
    return torch.where(sel < length, rows, -1).to(torch.int32)
