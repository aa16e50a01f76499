"""SparQ selection: the top-k positions of each lane's score keys (sparq_kernels.Phase1) as pool rows.

    _sparq_bounds  grid [n_lanes], 1 warp   the sample of the lane's keys (every SS-th position, NS <=
                                            2048, written compactly by _sparq_keys: Phase1.sample)
                                            gives two order statistics around the k-th
                                            score: upper U (ρ - δ-th largest sample key) and lower L
                                            (ρ + δ), ρ = k·NS/len, δ = 5·sqrt(ρ) + 2; zeroes the counters
    _sparq_band    grid [n_lanes, tiles]    keys > U: selected, their rows written at once; L <= key <=
                                            U: the band, compacted (key, position). Slots from relaxed
                                            counter adds: one per key from ATOMIC_MIN_LANES lanes, one
                                            per tile plus a scan below (PickConfig.atomic_slots)
    _sparq_finish  grid [n_lanes], 4 warps  checks count(> U) <= need <= count(> U) + band <= BAND;
                                            then the exact threshold inside the band by bisection, ties
                                            by lowest position, their rows; sets done[lane]
    _sparq_pick    grid [n_lanes], 16 warps the exact selection over all keys for lanes not done
                                            (a sample off by more than δ, a band over BAND keys: heavy
                                            ties); a lane done exits at once. Stage A: bisection of
                                            bits 30..16 over all keys; stage B: the keys of that
                                            1/128-octave bin compacted, 4 bits per count; a crowded bin
                                            continues bit by bit over all keys (exact either way)

Why: one CTA selecting among 16K keys spends ~25 sequential cross-warp reductions (barriers), about 40
us per lane on the H200, one lane per SM. Here the sequential work runs on ~0.5-2K keys in small
programs (the sample in one warp: shuffle reductions only), many per SM, and the pass over all keys is
spread over the whole GPU. A
sample off by more than δ (~5 sigma for random positions) costs speed only, never exactness. Rows come
out in no particular order; the selection itself is deterministic (ties: lowest positions).
Lanes longer than PICK_MAX_WIDTH go to torch.topk over the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from services.attention.kernels import PagedLanes
from services.attention.kernels.sparq_kernels import Phase1

PICK_MAX_WIDTH = 32768  # longest lane the Triton selection serves; longer: torch.topk
BAND = 4096  # band keys _sparq_finish selects among (32 per thread of its 4 warps)
BAND_TILE = 1024  # keys per _sparq_band program
ATOMIC_MIN_LANES = 128  # PickConfig.atomic_slots None: per-key counter adds from this many lanes


@dataclass(slots=True, frozen=True)
class PickConfig:
    """Launch settings of the sampled selection (bench/gpu_attention.py --stages sweeps them)."""

    band_tile: int = BAND_TILE  # keys per _sparq_band program
    band_warps: int = 4
    bounds_warps: int = 1
    finish_warps: int = 4
    sem: str = "relaxed"  # memory order of _sparq_band's counter adds ("acq_rel": Triton's default)
    # _sparq_band's slots: one counter add per key taken (True), or one add per tile and a scan (False);
    # None: atomic from ATOMIC_MIN_LANES lanes. Adds to one lane's counter serialize, so with few lanes
    # the scan wins (H200, 32K: 48 lanes, the whole step 116 us with scans, 134 us with adds); with many
    # the scan's registers cost more (512 lanes: pick 140 us with adds, 180 us with scans; 128: 41 / 45).
    atomic_slots: bool | None = None


@triton.jit
def _sparq_bounds(
    sample_ptr,  # [n_lanes, NS] int32: the keys at positions 0, SS, 2·SS, ... (Phase1.sample)
    lane_len_ptr,
    bounds_ptr,  # meta[:, 1:3] (lane stride 5) int32 out: L, U (U = -2: take every position)
    counts_ptr,  # meta[:, 3:5] int32 out: zeroed (selected above U, band)
    k, local_window,
    SS: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    """The window's keys are +inf: always above U (finite), never in the band, so L and U share their
    high bits and _sparq_finish's bisection starts low. The ranks are taken among the finite keys."""
    lane = tl.program_id(0)
    length = tl.load(lane_len_ptr + lane)
    need = tl.minimum(k, length)
    n_win = tl.minimum(local_window, length)
    finite = length - n_win
    offs = tl.arange(0, NS)
    ok = offs * SS < finite
    sample = tl.load(sample_ptr + lane * NS + offs, mask=ok, other=-1)
    n_s = tl.sum(ok.to(tl.int32), 0)
    rho = (need - n_win).to(tl.float32) * n_s.to(tl.float32) / tl.maximum(finite, 1).to(tl.float32)
    delta = 5.0 * tl.sqrt(rho) + 2.0
    r_hi = tl.maximum(rho - delta, 0.0).to(tl.int32)  # 0: U = the largest finite key, only +inf above
    r_lo = (rho + delta).to(tl.int32) + 1  # > n_s: L = 0, the band reaches the bottom
    upper = tl.zeros([], tl.int32)
    lower = tl.zeros([], tl.int32)
    # Bisection, bit by bit from the top, for U and L: the largest value with >= r samples at or above
    # it, or (stopping early, the loop's only exit before bit 0) any value with exactly r there; both
    # put the band edge between the r-th and (r+1)-th largest sample keys. Each bound stops once exact,
    # after about log2(samples) + the keys' common leading bits steps instead of 31.
    bit_hi = tl.full([], 30, tl.int32)
    bit_lo = tl.full([], 30, tl.int32)
    while (bit_hi >= 0) | (bit_lo >= 0):
        hi_cand = upper | (tl.full([], 1, tl.int32) << tl.maximum(bit_hi, 0))
        lo_cand = lower | (tl.full([], 1, tl.int32) << tl.maximum(bit_lo, 0))
        n_hi = _count_at_least(sample, hi_cand)
        n_lo = _count_at_least(sample, lo_cand)
        upper = tl.where((bit_hi >= 0) & (n_hi >= r_hi), hi_cand, upper)
        lower = tl.where((bit_lo >= 0) & (n_lo >= r_lo), lo_cand, lower)
        bit_hi = tl.where(n_hi == r_hi, -1, bit_hi - 1)
        bit_lo = tl.where(n_lo == r_lo, -1, bit_lo - 1)
    upper = tl.minimum(upper, 0x7F7FFFFF)  # the bits of the largest finite fp32
    tl.store(bounds_ptr + lane * 5, lower)
    tl.store(bounds_ptr + lane * 5 + 1, tl.where(need >= length, -2, upper))
    tl.store(counts_ptr + lane * 5, 0)
    tl.store(counts_ptr + lane * 5 + 1, 0)


@triton.jit
def _sparq_band(
    keys_ptr, blocks_ptr, lane_start_ptr, lane_len_ptr,
    bounds_ptr, counts_ptr,  # from _sparq_bounds
    band_key_ptr, band_pos_ptr,  # [n_lanes, BAND] int32 out
    rows_ptr,  # [n_lanes, k] int32 out: the rows of the keys above U, from slot 0
    wpad, k,
    BS: tl.constexpr, BAND: tl.constexpr, BLOCK: tl.constexpr, SEM: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    tile = tl.program_id(1)
    length = tl.load(lane_len_ptr + lane)
    if tile * BLOCK < length:
        start = tl.load(lane_start_ptr + lane)
        lower = tl.load(bounds_ptr + lane * 5)
        upper = tl.load(bounds_ptr + lane * 5 + 1)
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        ok = offs < length
        key = tl.load(keys_ptr + lane.to(tl.int64) * wpad + offs, mask=ok, other=-1)
        above = ok & (key > upper)
        band = ok & (key >= lower) & (key <= upper)
        # Relaxed: nothing in this launch reads the counters back (acq_rel adds a memory fence per add).
        if ATOMIC:  # one add per key taken: no scan of the tile (its layout cost 123 registers)
            counter = counts_ptr + lane * 5 + tl.zeros([BLOCK], tl.int32)
            slot = tl.atomic_add(counter, 1, mask=above, sem=SEM)
        else:
            above_i = above.to(tl.int32)
            slot = (
                tl.atomic_add(counts_ptr + lane * 5, tl.sum(above_i, 0), sem=SEM) + tl.cumsum(above_i, 0) - 1
            )
        take = above & (slot < k)  # slot >= k: a bad sample, _sparq_pick redoes the lane
        blk = tl.load(blocks_ptr + start + offs // BS, mask=take, other=0)
        tl.store(rows_ptr + lane * k + slot, blk * BS + offs % BS, mask=take)
        if ATOMIC:
            slot = tl.atomic_add(counter + 1, 1, mask=band, sem=SEM)
        else:
            band_i = band.to(tl.int32)
            slot = (
                tl.atomic_add(counts_ptr + lane * 5 + 1, tl.sum(band_i, 0), sem=SEM)
                + tl.cumsum(band_i, 0)
                - 1
            )
        keep = band & (slot < BAND)
        tl.store(band_key_ptr + lane * BAND + slot, key, mask=keep)
        tl.store(band_pos_ptr + lane * BAND + slot, offs, mask=keep)


@triton.jit
def _sparq_finish(
    blocks_ptr, lane_start_ptr, lane_len_ptr,
    counts_ptr, band_key_ptr, band_pos_ptr,  # from _sparq_band
    rows_ptr,  # [n_lanes, k] int32: the band's selected rows go after the keys above U
    done_ptr,  # meta[:, 0] (lane stride 5) int32 out: 1 when the sample was good and the lane selected
    k,
    BS: tl.constexpr, BAND: tl.constexpr, POS_BITS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    length = tl.load(lane_len_ptr + lane)
    start = tl.load(lane_start_ptr + lane)
    need = tl.minimum(k, length)
    n_above = tl.load(counts_ptr + lane * 5)
    n_band = tl.load(counts_ptr + lane * 5 + 1)
    good = (n_above <= need) & (need <= n_above + n_band) & (n_band <= BAND)
    tl.store(done_ptr + lane * 5, good.to(tl.int32))
    if good:
        need_in_band = need - n_above
        offs = tl.arange(0, BAND)
        ok = offs < n_band
        key = tl.load(band_key_ptr + lane * BAND + offs, mask=ok, other=-1)
        # The bits above the highest one where the band's smallest and largest keys differ are common
        # to all of them, so the bisection starts below it (about a third of the 31 counts saved).
        # need_in_band = 0: thr ends above every band key, nothing is taken.
        lower = tl.min(tl.where(ok, key, 0x7FFFFFFF), 0)
        diff = lower ^ tl.max(key, 0)
        top = tl.zeros([], tl.int32)
        for i in range(31):
            top = tl.where(diff >= (tl.full([], 1, tl.int32) << i), i, top)
        thr = (lower >> (top + 1)) << (top + 1)
        # Stops early once exactly need_in_band keys are >= thr: those are the top ones (every other
        # key is below thr), and no tie straddles the cut. Otherwise it ends on the need-th largest key.
        bit = top
        while bit >= 0:
            cand = thr | (tl.full([], 1, tl.int32) << bit)
            count = _count_at_least(key, cand)
            thr = tl.where(count >= need_in_band, cand, thr)
            bit = tl.where(count == need_in_band, -1, bit - 1)
        above = key > thr
        tie = key == thr
        quota = need_in_band - tl.sum(above.to(tl.int32), 0)
        pos = tl.load(band_pos_ptr + lane * BAND + offs, mask=ok, other=0)
        if tl.sum(tie.to(tl.int32), 0) > quota:  # the quota-th lowest tie position
            cut = tl.zeros([], tl.int32)
            for i in range(POS_BITS):
                cand = cut | (tl.full([], 1, tl.int32) << (POS_BITS - 1 - i))
                below = tl.sum((tie & (pos < cand)).to(tl.int32), 0)
                cut = tl.where(below < quota, cand, cut)
            tie = tie & (pos <= cut) & (quota > 0)  # quota 0: cut stays 0, which takes nothing
        take = ok & (above | tie)
        slot = n_above + tl.cumsum(take.to(tl.int32), 0) - 1
        blk = tl.load(blocks_ptr + start + pos // BS, mask=take, other=0)
        tl.store(rows_ptr + lane * k + slot, blk * BS + pos % BS, mask=take)
        offs_k = tl.arange(0, BLOCK_K)
        unused = (offs_k >= need) & (offs_k < k)
        tl.store(rows_ptr + lane * k + offs_k, tl.full([BLOCK_K], -1, tl.int32), mask=unused)


@triton.jit
def _count_at_least(key, threshold):
    return tl.sum((key >= threshold).to(tl.int32), 0)


@triton.jit
def _sparq_pick(
    keys_ptr,  # [n_lanes, wpad] int32 from _sparq_keys
    blocks_ptr, lane_start_ptr, lane_len_ptr,  # PagedLanes
    cand_ptr,  # [n_lanes, CAND] int32 scratch: the keys inside the threshold's bin
    rows_ptr,  # [n_lanes, k] int32 out: pool rows (block * BS + row) of the selected positions, -1 unused
    done_ptr,  # meta[:, 0] (lane stride 5) int32: 1 where _sparq_finish selected the lane: exit
    wpad, k,
    BS: tl.constexpr, WIDTH: tl.constexpr, CHUNK: tl.constexpr, CAND: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The exact selection of one lane by one CTA (the fallback of the sampled path). The lane's keys
    stay in registers for the bisection; the two compactions (bin keys, selected rows) re-read them in
    CHUNK pieces, which bounds the registers of their scatters. About 40 us per lane at 16K on the
    H200 (1 CTA per SM): the cross-warp reductions of ~25 sequential steps dominate."""
    lane = tl.program_id(0)
    if tl.load(done_ptr + lane * 5) == 0:
        _pick_lane(keys_ptr, blocks_ptr, lane_start_ptr, lane_len_ptr, cand_ptr, rows_ptr, wpad, k, lane,
                   BS, WIDTH, CHUNK, CAND, SPLIT, BLOCK_K)  # fmt: skip


@triton.jit
def _pick_lane(
    keys_ptr, blocks_ptr, lane_start_ptr, lane_len_ptr, cand_ptr, rows_ptr, wpad, k, lane,
    BS: tl.constexpr, WIDTH: tl.constexpr, CHUNK: tl.constexpr, CAND: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
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


def pick_warps(width: int) -> int:
    """Warps of the one-CTA fallback _sparq_pick: 32 keys per thread up to 16K, 16 at 32K (sm_90
    compiles, cuobjdump: 128 registers at 16K / 16 warps, 64 at 32K / 32 warps)."""
    return max(4, min(32, triton.next_power_of_2(width) // 1024))


def sparq_pick(
    phase1: Phase1,
    lanes: PagedLanes,
    k: int,  # keys per lane (<= width)
    width: int,  # longest lane
    local_window: int,  # the +inf keys at the end of each lane
    num_warps: int | None = None,  # of the fallback kernel; None: pick_warps(width)
    sampled: bool = True,  # False: every lane through the one-CTA kernel (bench, tests)
    launches: int = 4,  # bench only: run the first `launches` kernels (the stage timings)
    config: PickConfig = PickConfig(),
) -> torch.Tensor:  # [n_lanes, k] int32 pool rows (block * bs + row), any order; -1: unused
    """Selection: the top-k positions of the score (window included), ties by lowest position."""
    keys = phase1.keys
    n_lanes, device = keys.shape[0], keys.device
    if width > PICK_MAX_WIDTH:
        return _pick_torch(phase1, lanes, k, width)
    bs, block = lanes.block_size, triton.next_power_of_2(width)
    rows = torch.empty((n_lanes, k), dtype=torch.int32, device=device)
    band = torch.empty((2, n_lanes, BAND), dtype=torch.int32, device=device)  # keys, positions
    meta = torch.empty((n_lanes, 5), dtype=torch.int32, device=device)  # done, L, U, n_above, n_band
    done, bounds, counts = meta[:, 0], meta[:, 1:3], meta[:, 3:5]  # kernels index lane * 5 + ...
    atomic = config.atomic_slots if config.atomic_slots is not None else n_lanes >= ATOMIC_MIN_LANES
    if sampled:
        _sparq_bounds[(n_lanes,)](
            phase1.sample, lanes.lane_len, bounds, counts, k, local_window,
            SS=phase1.stride, NS=phase1.sample.shape[1], num_warps=config.bounds_warps,
        )  # fmt: skip
        if launches > 1:
            _sparq_band[(n_lanes, triton.cdiv(width, config.band_tile))](
                keys, lanes.blocks, lanes.lane_start, lanes.lane_len, bounds, counts, band[0], band[1],
                rows, phase1.wpad, k, BS=bs, BAND=BAND, BLOCK=config.band_tile, SEM=config.sem,
                ATOMIC=atomic,
                num_warps=config.band_warps,
            )  # fmt: skip
        if launches > 2:
            _sparq_finish[(n_lanes,)](
                lanes.blocks, lanes.lane_start, lanes.lane_len, counts, band[0], band[1], rows, done, k,
                BS=bs, BAND=BAND, POS_BITS=block.bit_length(), BLOCK_K=triton.next_power_of_2(k),
                num_warps=config.finish_warps,
            )  # fmt: skip
    else:
        done.zero_()
    warps = num_warps or pick_warps(width)
    cand = min(block, max(512, 32 * warps))  # bin keys stage B handles: [cand, 16] compares
    if launches > 3:
        _sparq_pick[(n_lanes,)](
            keys, lanes.blocks, lanes.lane_start, lanes.lane_len, band[0], rows, done, phase1.wpad, k,
            BS=bs, WIDTH=block, CHUNK=min(block, 256 * warps), CAND=cand, SPLIT=16,
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
