"""Triton kernels of the SparQ step (semantics: sparq.sparq_decode_reference), three launches before phase 2.

    _sparq_select  grid [n_lanes]           top-r components of Σ_g |q|, q at them times each head's
                                            softmax temperature (sparq.select_components, one launch)
    _sparq_logits  grid [n_lanes, n_tiles]  ONE pass over the r selected rows of kt_cache [num_blocks, D, bs]:
                                            approximate logits of every head -> logits [n_lanes, G, wpad]
                                            fp32 (G·4 B per position, written coalesced)
    _sparq_pick    grid [n_lanes]           reads the lane's logits (not kt): per-head softmax, score =
                                            Σ_g softmax_g (window +inf), the exact k-th score by bisection on
                                            its fp32 bits, then writes the selected positions' pool rows in
                                            position order -> rows [n_lanes, k] int32 (-1: unused slot)
    phase 2        paged_decode.gathered_decode_attention over `rows` (+ the split-K merge)

Why this shape (bench/RESULTS-gpu.md has the numbers): the score of a GQA lane needs every head's
log-sum-exp over the whole lane before any position can be scored. The previous design re-read kt for
that (two passes of 32-byte runs at bs 16, the slowest access of the step) and then ran a 5-launch
histogram radix select (global atomics) or torch.topk; both selections cost about a dense phase-1 pass.
Here kt is read once; the G fp32 logits per position are written once and read once at full coalescing
(fp32 keeps the scores, hence the selection, those of the fp32 reference: half-precision logits would move
positions across the k-th score).

_sparq_pick holds the lane's keys in registers ([WIDTH], WIDTH = next power of two >= the longest lane,
one program per lane), so it serves lanes up to PICK_MAX_WIDTH positions; longer lanes are scored and
selected by torch (softmax + topk over the same logits; slower, same function). The threshold search:
  stage A  binary bisection of bits 30..SPLIT over all keys (one CTA-wide count per bit),
  stage B  the keys inside the bin found (typically a few %) are compacted to a scratch row, and the
           remaining SPLIT bits are found 4 at a time (16 candidate thresholds per count) on them;
           if the bin holds more than CAND keys, stage A simply continues on all keys (exact either way).
Ties at the k-th score are broken by position (the lowest positions are taken).
"""

from __future__ import annotations

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
    logits_ptr,  # [n_lanes, G, wpad] fp32 out; positions >= the lane's length are left unwritten
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
        out = logits_ptr + (lane * G + offs_g).to(tl.int64) * wpad + tile * BLOCK_N  # [BLOCK_G]
        tl.store(out[:, None] + tl.arange(0, BLOCK_N)[None, :], s, mask=g_ok[:, None])


@triton.jit
def _count_at_least(key, threshold):
    return tl.sum((key >= threshold).to(tl.int32), 0)


@triton.jit
def _sparq_pick(
    logits_ptr,  # [n_lanes, G, wpad] fp32 approximate logits (temperature folded in)
    blocks_ptr, lane_start_ptr, lane_len_ptr,  # PagedLanes
    cand_ptr,  # [n_lanes, CAND] int32 scratch: the keys inside the threshold's bin
    rows_ptr,  # [n_lanes, k] int32 out: pool rows (block * BS + row) of the selected positions, -1 unused
    wpad, k, local_window,
    G: tl.constexpr, BS: tl.constexpr, WIDTH: tl.constexpr, CAND: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    lane = tl.program_id(0)
    length = tl.load(lane_len_ptr + lane)
    start = tl.load(lane_start_ptr + lane)
    offs = tl.arange(0, WIDTH)
    ok = offs < length
    score = tl.zeros([WIDTH], tl.float32)
    for g in tl.static_range(G):  # score = Σ_g softmax_g(logits), as the reference
        row = (lane * G + g).to(tl.int64) * wpad
        s = tl.load(logits_ptr + row + offs, mask=ok, other=float("-inf"))
        p = tl.exp(s - tl.max(s, 0))
        score += p * (1.0 / tl.sum(p, 0))
    score = tl.where(ok & (offs >= length - local_window), float("inf"), score)
    # Scores are >= 0 (or +inf), so their fp32 bits order like the values; -1 marks padding.
    key = tl.where(ok, score.to(tl.int32, bitcast=True), -1)
    need = tl.minimum(k, length)

    # The k-th largest key `thr`: the largest value with at least `need` keys >= it, bit by bit.
    thr = tl.zeros([], tl.int32)
    for i in range(31 - SPLIT):  # stage A: bits 30..SPLIT over all keys
        cand = thr | (tl.full([], 1, tl.int32) << (30 - i))
        thr = tl.where(_count_at_least(key, cand) >= need, cand, thr)
    hi = thr + (1 << SPLIT)
    in_bin = (key >= thr) & (key < hi)
    n_in = tl.sum(in_bin.to(tl.int32), 0)
    if n_in <= CAND:  # stage B: the bin's keys only, 4 bits per count
        slot = tl.cumsum(in_bin.to(tl.int32), 0) - 1
        tl.store(cand_ptr + lane * CAND + slot, key, mask=in_bin)
        tl.debug_barrier()  # the stores above are read back by other threads of this program
        offs_c = tl.arange(0, CAND)
        bin_keys = tl.load(cand_ptr + lane * CAND + offs_c, mask=offs_c < n_in, other=-1, cache_modifier=".cg")
        need_in_bin = need - _count_at_least(key, hi)
        digits = tl.arange(0, 16)
        for it in tl.static_range(SPLIT // 4):
            shift: tl.constexpr = SPLIT - 4 * (it + 1)
            cands = thr + (digits << shift)  # [16]
            counts = tl.sum((bin_keys[:, None] >= cands[None, :]).to(tl.int32), 0)  # [16]
            thr = thr + (tl.max(tl.where(counts >= need_in_bin, digits, 0), 0) << shift)
    else:
        for i in range(SPLIT):  # a crowded bin: continue bit by bit over all keys
            cand = thr | (tl.full([], 1, tl.int32) << (SPLIT - 1 - i))
            thr = tl.where(_count_at_least(key, cand) >= need, cand, thr)

    above = key > thr
    tie = key == thr
    quota = need - tl.sum(above.to(tl.int32), 0)  # ties to take, >= 1
    if tl.sum(tie.to(tl.int32), 0) > quota:
        take = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= quota))
    else:
        take = above | tie
    dest = tl.cumsum(take.to(tl.int32), 0) - 1  # position order
    blk = tl.load(blocks_ptr + start + offs // BS, mask=take, other=0)
    tl.store(rows_ptr + lane * k + dest, blk * BS + offs % BS, mask=take)
    offs_k = tl.arange(0, BLOCK_K)
    tl.store(rows_ptr + lane * k + offs_k, tl.full([BLOCK_K], -1, tl.int32), mask=(offs_k >= need) & (offs_k < k))


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


def sparq_logits(
    q_sel: torch.Tensor,  # [n_lanes, G, r] fp32, temperature folded in
    idx: torch.Tensor,  # [n_lanes, r] int32 selected components
    kt_cache: torch.Tensor,  # [num_blocks, D, bs]
    lanes: PagedLanes,
    width: int,  # longest lane
    block_n: int = LOGITS_BLOCK_N,
    num_warps: int = LOGITS_WARPS,
) -> torch.Tensor:  # [n_lanes, G, wpad] fp32, wpad >= width; valid up to each lane's length
    """SparQ phase 1: the approximate logits of every head at every position, one pass over kt."""
    n_lanes, group, r = q_sel.shape
    if kt_cache.dim() != 3 or kt_cache.shape[2] != lanes.block_size or kt_cache.stride(2) != 1:
        raise ValueError(f"kt_cache must be a contiguous [num_blocks, D, {lanes.block_size}]")
    n_tiles = triton.cdiv(width, block_n)
    wpad = n_tiles * block_n
    logits = torch.empty((n_lanes, group, wpad), dtype=torch.float32, device=q_sel.device)
    _sparq_logits[(n_lanes, n_tiles)](
        q_sel.contiguous(), idx.contiguous(), kt_cache, lanes.blocks, lanes.lane_start, lanes.lane_len,
        logits, wpad, kt_cache.stride(0), kt_cache.stride(1),
        G=group, R=r, BS=lanes.block_size, SUB=min(block_n, lanes.block_size & -lanes.block_size),
        BLOCK_G=triton.next_power_of_2(group), BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return logits


def pick_warps(width: int) -> int:
    """Warps of _sparq_pick: 32 keys per thread up to 16K, 64 at 32K (register file)."""
    return max(4, min(16, triton.next_power_of_2(width) // 1024))


def sparq_pick(
    logits: torch.Tensor,  # [n_lanes, G, wpad] from sparq_logits
    lanes: PagedLanes,
    k: int,  # keys per lane (<= width)
    local_window: int,
    width: int,  # longest lane
    num_warps: int | None = None,
) -> torch.Tensor:  # [n_lanes, k] int32 pool rows (block * bs + row), position order; -1: unused
    """Selection: the top-k positions of Σ_g softmax_g(logits), the last local_window forced in."""
    n_lanes, group, wpad = logits.shape
    bs = lanes.block_size
    if width > PICK_MAX_WIDTH:
        return _pick_torch(logits, lanes, k, local_window, width)
    warps = num_warps or pick_warps(width)
    block = triton.next_power_of_2(width)
    cand = min(block, 128 * warps)
    rows = torch.empty((n_lanes, k), dtype=torch.int32, device=logits.device)
    scratch = torch.empty((n_lanes, cand), dtype=torch.int32, device=logits.device)
    _sparq_pick[(n_lanes,)](
        logits, lanes.blocks, lanes.lane_start, lanes.lane_len, scratch, rows, wpad, k, local_window,
        G=group, BS=bs, WIDTH=block, CAND=cand, SPLIT=16 if block > 16384 else 20,
        BLOCK_K=triton.next_power_of_2(k), num_warps=warps,
    )  # fmt: skip
    return rows


def _pick_torch(
    logits: torch.Tensor, lanes: PagedLanes, k: int, local_window: int, width: int
) -> torch.Tensor:  # as sparq_pick, positions in any order
    """Lanes longer than PICK_MAX_WIDTH: the same selection in torch ops (no host sync)."""
    bs = lanes.block_size
    length = lanes.lane_len.long()[:, None]  # [n_lanes, 1]
    pos = torch.arange(width, device=logits.device)[None, :]  # [1, width]
    valid = pos < length
    score = logits[:, :, :width].masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1).sum(dim=1)
    score = score.masked_fill(valid & (pos >= length - local_window), float("inf"))
    sel = score.masked_fill(~valid, float("-inf")).topk(k, dim=1, sorted=False).indices  # [n_lanes, k]
    table = lanes.padded_table(-(-width // bs))  # [n_lanes, MB]
    rows = table.gather(1, sel // bs) * bs + sel % bs
    return torch.where(sel < length, rows, -1).to(torch.int32)
