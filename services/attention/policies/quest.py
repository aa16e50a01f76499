"""`quest` (Quest, arXiv 2406.10774): per-page min/max key bounds pick the pages to read.

A page is PAGE_SIZE = 4 consecutive positions of one KV head, inside one pool block (a block of 16
holds 4 pages; pools with smaller blocks use the whole block). For every page the policy keeps the
element-wise min and max of its keys, per layer; for a query q the page's upper bound on q·k is

    u(q, page) = Σ_d max(q_d · kmin_d, q_d · kmax_d) = q⁺ · kmax + q⁻ · kmin  >=  max_{t in page} q · k_t

With GQA a lane's G query heads share one page set: each head's bounds become a softmax over the
lane's pages (scaled by 1/sqrt(D), like the scores they bound), summed over the heads. The top pages
by that score are read exactly, always with page 0 (the sink tokens) and the pages holding the last
64 positions.

Bounds are stored in float8 (quest_bounds.py: rounded outward, so they still bound every key; a
component past float8's range makes its page unbounded, and such a page is always read), the two
of a page packed in one row, so one gather and one bmm give every page's bound. Small pages
make the selection fine-grained, narrow bounds pay for them: at budget 1/4 the bounds of 4-position
pages cost 1/16 of dense in float8 (1/8 in bf16), and the other 3/16 buy pages. Measured at 1/4 and
1/8 (2K contexts, SmolLM2-135M; top-1 agreement over 64 greedy steps per window, the evaluation's
earlier default / ppl vs dense / mass recall), each row with PAGE_SIZE and BOUNDS_DTYPE set as it says:
`disagg eval-attention --policy quest --budget B --agreement-steps 64` (its passkey and timing
columns aside; the 1/4 row kept gives 0.961 / 1.0148 / 0.8995 there):

    pages, bounds      1/4                    1/8
    16, fp32 (before)  0.883 / 1.056 / 0.850  0.781 / 1.239 / 0.670  (the recorded sweep)
    16, bf16           0.883 / 1.037 / 0.871  0.820 / 1.126 / 0.736
     8, bf16           0.930 / 1.035 / 0.880  0.797 / 1.136 / 0.714
     4, bf16           0.961 / 1.027 / 0.865  0.766 / 1.494 / 0.597  (bounds alone 1/8: floors only)
    16, float8 e4m3    0.922 / 1.031 / 0.879  0.828 / 1.085 / 0.760
     8, float8 e4m3    0.930 / 1.027 / 0.895  0.844 / 1.086 / 0.788
     4, float8 e4m3    0.969 / 1.014 / 0.901  0.820 / 1.099 / 0.773
     4, float8 e5m2    0.961 / 1.015 / 0.900  0.820 / 1.087 / 0.769  (kept: quest_bounds.py says why)

Budget b of dense bytes, per lane with n positions in np pages of ps positions: the bounds cost
2 · D · s per page (kmin and kmax, s = bound itemsize / K/V itemsize: s · np / n of the dense
bytes), the rest buys P = floor((b · n - s · np) / ps) pages, at least the forced ones. Lanes where
P covers all np pages are dense. Bytes per lane and layer, as read: 2 · np · D · bound itemsize
(bounds) + refreshed blocks' keys + 2 · P · ps · D · itemsize.

Bounds are derived from the pool lazily (common.BlockMirror): a block's pages once the block is
full, the lane's last block at every step, so imported K/V needs no hook.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from services.attention.kv_pool import KVPool
from services.attention.policies import RECENT_TOKENS, AttentionPolicy, DecodeLane, PolicyStep
from services.attention.policies.common import BlockMirror, LaneTensors, gathered_attention, row_bytes
from services.attention.policies.quest_bounds import BOUNDS_DTYPE, page_upper_bounds, round_outward
from services.core.attention import PolicyName

PAGE_SIZE = 4  # positions per page; pages tile the pool's blocks (see the module docstring)


def pages_for(lane: DecodeLane, page_size: int, bound_share: float) -> int:
    """Pages lane's budget buys after paying for the bounds (may exceed the lane's pages).
    `bound_share`: one page's bounds over one token's K and V bytes (bound itemsize / K/V itemsize)."""
    budget = lane.spec.budget if lane.spec.budget is not None else 1.0
    pages = -(-lane.length // page_size)
    forced = 1 + _recent_pages(lane.length, page_size)
    return max(forced, int((budget * lane.positions - pages * bound_share) // page_size))


def page_rows(blocks: torch.Tensor, per_block: int) -> torch.Tensor:
    """[n, B] block ids -> [n, B · per_block] rows of their pages in the bounds (page j of block b is
    row b · per_block + j)."""
    within = torch.arange(per_block, device=blocks.device)
    return (blocks[:, :, None] * per_block + within).flatten(1)


def page_size_for(block_size: int) -> int:
    """PAGE_SIZE, or the whole block when blocks are smaller (a page never spans two blocks)."""
    if block_size % PAGE_SIZE and PAGE_SIZE % block_size:
        raise ValueError(f"quest pages of {PAGE_SIZE} positions do not tile blocks of {block_size}")
    return min(PAGE_SIZE, block_size)


def _recent_pages(length: int, page_size: int) -> int:
    """Pages holding the last RECENT_TOKENS positions."""
    first = max(length - RECENT_TOKENS, 0) // page_size
    return (length - 1) // page_size - first + 1


class QuestPolicy(AttentionPolicy):
    name = PolicyName.QUEST

    def __init__(self, pool: KVPool, group: int, scale: float, lock: threading.Lock) -> None:
        super().__init__(pool, group, scale, lock)
        # Per layer [num_blocks · pages per block, 2, D] (kmax, kmin): page j of block b is row
        # b · per_block + j. Allocated on first use; a block's bounds are derived before they are read.
        self.bounds: list[torch.Tensor] = []
        self.mirror = BlockMirror(pool.block_size, pool.config.device)
        self.page_size = page_size_for(pool.block_size)
        self.bound_dtype = (
            BOUNDS_DTYPE if BOUNDS_DTYPE.itemsize < pool.config.dtype.itemsize else pool.config.dtype
        )
        self.bound_share = self.bound_dtype.itemsize / pool.config.dtype.itemsize

    def covers(self, lane: DecodeLane) -> bool:
        pages = pages_for(lane, self.page_size, self.bound_share)
        return pages >= -(-lane.length // self.page_size)

    def begin_sparse(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        if not self.bounds:
            config = self.pool.config
            per_block = self.pool.block_size // self.page_size
            shape = (self.pool.allocator.num_blocks * per_block, 2, config.head_dim)
            dtype = self.bound_dtype
            self.bounds = [torch.empty(shape, dtype=dtype, device=config.device) for _ in self.pool.k]
        return QuestStep(self, lanes)

    def forget(self, seq_id: int) -> None:
        self.mirror.forget(seq_id)


class QuestStep(PolicyStep):
    def __init__(self, policy: QuestPolicy, lanes: Sequence[DecodeLane]) -> None:
        pool = policy.pool
        bs, ps, device = pool.block_size, policy.page_size, pool.config.device
        per_block = bs // ps
        self.policy = policy
        self.lanes = list(lanes)
        self.t = LaneTensors.build(lanes, bs, device)
        self.refresh_blocks, self.refresh_filled = policy.mirror.refresh(lanes)
        self.page_rows = page_rows(self.t.table, per_block)  # [n, MB · per_block]
        n_pages = (self.t.length + ps - 1) // ps  # [n]
        page = torch.arange(self.page_rows.shape[1], device=device)[None, :]  # [1, MP]
        self.page_valid = page < n_pages[:, None]
        first_recent = (self.t.length - RECENT_TOKENS).clamp(min=0) // ps
        self.forced = self.page_valid & ((page == 0) | (page >= first_recent[:, None]))
        pages = [pages_for(lane, ps, policy.bound_share) for lane in lanes]
        self.pages = torch.tensor(pages, device=device).minimum(n_pages)
        kv_itemsize = pool.config.dtype.itemsize
        d = pool.config.head_dim
        bounds = 2 * int(n_pages.sum()) * d * policy.bound_dtype.itemsize
        refresh = int(self.refresh_filled.sum()) * d * kv_itemsize
        self.layer_bytes = bounds + refresh + row_bytes(int(self.pages.sum()) * ps, d, kv_itemsize)
        self.bytes_read = 0

    def _refresh(self, layer: int) -> None:
        """Bounds of the pages of the blocks that changed since they were last derived."""
        if self.refresh_blocks.numel() == 0:
            return
        policy, bs, ps = self.policy, self.policy.pool.block_size, self.policy.page_size
        keys = policy.pool.k[layer].index_select(0, self.refresh_blocks)  # [X, bs, D]
        row = torch.arange(bs, device=keys.device)[None, :, None]
        holds = row < self.refresh_filled[:, None, None]  # [X, bs, 1]
        paged = (-1, bs // ps, ps, keys.shape[-1])  # [X, per_block, ps, D]; empty pages: ±inf
        kmin = keys.masked_fill(~holds, float("inf")).view(paged).amin(dim=2).flatten(0, 1)
        kmax = keys.masked_fill(~holds, float("-inf")).view(paged).amax(dim=2).flatten(0, 1)
        rows = page_rows(self.refresh_blocks[:, None], bs // ps).flatten()  # [X · per_block]
        bounds = policy.bounds[layer]
        bounds[rows, 0] = round_outward(kmax, policy.bound_dtype, down=False)
        bounds[rows, 1] = round_outward(kmin, policy.bound_dtype, down=True)

    def _select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored indices [n, P·ps] of the chosen pages' rows, valid [n, P·ps])."""
        self._refresh(layer)
        policy, t, ps = self.policy, self.t, self.policy.page_size
        bounds = policy.bounds[layer][self.page_rows]  # [n, MP, 2, D]
        bound = page_upper_bounds(q, bounds) * policy.scale  # [n, G, MP]
        unbounded = bound[:, 0, :].isposinf()  # [n, MP] a saturated bound: such pages are forced
        bound.masked_fill_(~(self.page_valid & ~unbounded)[:, None, :], float("-inf"))
        score = bound.softmax(dim=-1).sum(dim=1).masked_fill(self.forced | unbounded, float("inf"))
        score.masked_fill_(~self.page_valid, float("-inf"))
        width = int(self.pages.max())
        chosen = score.topk(width, dim=1).indices  # [n, P] best first
        rank = torch.arange(width, device=q.device)[None, :]
        offsets = torch.arange(ps, device=q.device)
        index = (chosen[:, :, None] * ps + offsets).reshape(q.shape[0], -1)  # [n, P·ps]
        valid = ((rank < self.pages[:, None])[:, :, None].expand(-1, -1, ps)).reshape(q.shape[0], -1)
        return index, valid & (index < t.length[:, None])

    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        pool = self.policy.pool
        index, valid = self._select(layer, q)
        slots = self.t.slots(index, pool.block_size)
        self.bytes_read += self.layer_bytes
        return gathered_attention(q, pool.k[layer], pool.v[layer], slots, valid, self.policy.scale)

    def attended(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        index, valid = self._select(layer, q)
        width = int(self.t.table.shape[1]) * self.policy.pool.block_size
        hits = torch.zeros((q.shape[0], width), dtype=torch.int32, device=q.device)
        return (hits.scatter_add_(1, index, valid.int()) > 0)[:, : self.t.width]

    def finish(self) -> None:
        self.policy.mirror.commit(self.lanes)
