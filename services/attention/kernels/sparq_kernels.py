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
Here kt is read once; the G values e per position are written once and read once, fully coalesced.
`e_dtype` float32 (the default) keeps the scores those of the fp32 reference up to rounding; float16
halves those bytes at a relative error of 2^-11 on each e (more where e < 6e-5, fp16's subnormals), which
can move positions that sit within that distance of the k-th score.

_sparq_pick holds the lane's keys in registers ([WIDTH], WIDTH = next power of two >= the longest lane,
one program per lane), so it serves lanes up to PICK_MAX_WIDTH positions; longer lanes are selected by
torch.topk over the same keys (slower, same function). The threshold search:
  stage A  binary bisection of bits 30..SPLIT over all keys (one CTA-wide count per bit),
  stage B  the keys inside the bin found (typically a few %) are compacted to a scratch row, and the
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
def _sparq_logits(
    qs_ptr,  # [n_lanes, G, R] fp32: q's selected components, softmax temperature folded in
    idx_ptr,  # [n_lanes, R] int32 component ids
    kt_ptr,  # [num_blocks, D, BS]
    blocks_ptr, lane_start_ptr, lane_len_ptr,  # PagedLanes
    e_ptr,  # [n_lanes, G, wpad] out (fp32 or fp16): exp(logit - tile max); tiles past the length unwritten
    m_ptr, l_ptr,  # [n_lanes, n_tiles, G] fp32 out: tile max of the logits, tile Σ e
    wpad, stride_ktb, stride_ktd,
    G: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, SUB: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK_N positions = BLOCK_N / SUB runs of SUB positions, each inside one pool block, so
    a component's run is contiguous in kt_cache and loads as wide vectors (the block id alone is
    gathered). Components are unrolled: each is one [runs, SUB] load and one rank-1 update of the
    [BLOCK_G, BLOCK_N] logits, which keeps the layouts 2-D (no cross-thread reduction)."""
    lane = tl.program_id(0)
    tile = tl.program_id(1)
    length = tl.load(lane_len_ptr + lane)
    if tile * BLOCK_N < length:
        start = tl.load(lane_start_ptr + lane)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        base = tile * BLOCK_N + tl.arange(0, BLOCK_N // SUB) * SUB  # [runs] first position of each run
        run_ok = base < length
        blk = tl.load(blocks_ptr + start + base // BS, mask=run_ok, other=0).to(tl.int64)
        first = blk * stride_ktb + (base % BS if SUB < BS else 0)  # [runs]
        s = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        for i in tl.static_range(R):
            comp = tl.load(idx_ptr + lane * R + i).to(tl.int64)
            q_i = tl.load(qs_ptr + (lane * G + offs_g) * R + i, mask=g_ok, other=0.0)  # [BLOCK_G]
            # Whole runs are read (rows past the length sit inside the lane's last block): the mask
            # stays constant along a run and the loads stay vectorized.
            ptrs = kt_ptr + (first + comp * stride_ktd)[:, None] + tl.arange(0, SUB)[None, :]
            kt = tl.load(ptrs, mask=run_ok[:, None], other=0.0)  # [runs, SUB]
            s += q_i[:, None] * tl.reshape(kt, [BLOCK_N]).to(tl.float32)[None, :]
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        s = tl.where((offs_n < length)[None, :], s, float("-inf"))
        m = tl.max(s, 1)  # [BLOCK_G], finite: the tile holds a position
        e = tl.exp(s - m[:, None])
        at = (lane * tl.num_programs(1) + tile) * G + offs_g
        tl.store(m_ptr + at, m, mask=g_ok)
        tl.store(l_ptr + at, tl.sum(e, 1), mask=g_ok)
        out = e_ptr + (lane * G + offs_g).to(tl.int64) * wpad + tile * BLOCK_N  # [BLOCK_G]
        e = e.to(e_ptr.dtype.element_ty)
        tl.store(out[:, None] + tl.arange(0, BLOCK_N)[None, :], e, mask=g_ok[:, None])


@triton.jit
def _sparq_keys(
    e_ptr,  # [n_lanes, G, wpad] from _sparq_logits
    m_ptr, l_ptr,  # [n_lanes, n_tiles, G]
    lane_len_ptr,
    keys_ptr,  # [n_lanes, wpad] int32 out: fp32 bits of the score (>= 0, window +inf); -1 or unwritten past
    # the length
    wpad, local_window,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """score = Σ_g exp(logit_g - lse_g) = Σ_g e_g · exp(m_tile_g - lse_g), lse_g from the tile stats."""
    lane = tl.program_id(0)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    length = tl.load(lane_len_ptr + lane)
    if tile * BLOCK_N < length:
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        offs_t = tl.arange(0, BLOCK_T)
        at = (lane * n_tiles + offs_t[:, None]) * G + offs_g[None, :]  # [BLOCK_T, BLOCK_G]
        mask = (offs_t[:, None] < tl.cdiv(length, BLOCK_N)) & g_ok[None, :]
        m = tl.load(m_ptr + at, mask=mask, other=float("-inf"))
        top = tl.where(g_ok, tl.max(m, 0), 0.0)  # [BLOCK_G]
        total = tl.sum(tl.load(l_ptr + at, mask=mask, other=0.0) * tl.exp(m - top[None, :]), 0)
        lse = top + tl.log(tl.where(total > 0, total, 1.0))
        m_tile = tl.load(m_ptr + (lane * n_tiles + tile) * G + offs_g, mask=g_ok, other=0.0)
        c = tl.where(g_ok, tl.exp(m_tile - lse), 0.0)  # [BLOCK_G]
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = e_ptr + (lane * G + offs_g).to(tl.int64) * wpad  # [BLOCK_G]
        e = tl.load(rows[:, None] + offs_n[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        score = tl.sum(e * c[:, None], 0)  # [BLOCK_N]
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
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_R=triton.next_power_of_2(r), num_warps=1,
    )  # fmt: skip
    return idx, q_sel


@dataclass(slots=True, frozen=True)
class Phase1:
    """SparQ phase 1 of one step: every position's score as an int32 key (the fp32 bits, >= 0; the window
    +inf), wpad >= the longest lane. Entries at or past a lane's length are unspecified: readers mask them
    with lane_len."""

    keys: torch.Tensor  # [n_lanes, wpad] int32
    wpad: int


def sparq_scores(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    local_window: int,
    e_dtype: torch.dtype = torch.float32,  # storage of exp(logit - tile max) between the two launches
    block_n: int = LOGITS_BLOCK_N,
    num_warps: int = LOGITS_WARPS,
) -> Phase1:
    """Score = Σ_g softmax_g(approximate logits): one pass over kt (_sparq_logits), then _sparq_keys."""
    n_lanes, group, r = q_sel.shape
    if kt_cache.dim() != 3 or kt_cache.shape[2] != lanes.block_size or kt_cache.stride(2) != 1:
        raise ValueError(f"kt_cache must be a contiguous [num_blocks, D, {lanes.block_size}]")
    if e_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"e_dtype must be float32 or float16, got {e_dtype}")
    device = q_sel.device
    n_tiles = triton.cdiv(width, block_n)
    wpad = n_tiles * block_n
    e = torch.empty((n_lanes, group, wpad), dtype=e_dtype, device=device)
    stats = torch.empty((2, n_lanes, n_tiles, group), dtype=torch.float32, device=device)
    keys = torch.empty((n_lanes, wpad), dtype=torch.int32, device=device)
    block_g = triton.next_power_of_2(group)
    _sparq_logits[(n_lanes, n_tiles)](
        q_sel.contiguous(), idx.contiguous(), kt_cache, lanes.blocks, lanes.lane_start, lanes.lane_len,
        e, stats[0], stats[1], wpad, kt_cache.stride(0), kt_cache.stride(1),
        G=group, R=r, BS=lanes.block_size, SUB=min(block_n, lanes.block_size & -lanes.block_size),
        BLOCK_G=block_g, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    _sparq_keys[(n_lanes, n_tiles)](
        e, stats[0], stats[1], lanes.lane_len, keys, wpad, local_window,
        G=group, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_T=triton.next_power_of_2(n_tiles), num_warps=4,
    )  # fmt: skip
    return Phase1(keys, wpad)


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
        SPLIT=16 if block > 16384 else 20,
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
