"""`quest` (Quest, arXiv 2406.10774): per-block (page) min/max key bounds pick the pages to read.

A page is one pool block (block_size positions of one KV head). For every page the policy keeps the
element-wise min and max of its keys, per layer; for a query q the page's upper bound on q·k is

    u(q, page) = Σ_d max(q_d · kmin_d, q_d · kmax_d) = q⁺ · kmax + q⁻ · kmin  >=  max_{t in page} q · k_t

With GQA a lane's G query heads share one page set: each head's bounds become a softmax over the
lane's pages (scaled by 1/sqrt(D), like the scores they bound), summed over the heads. The top pages
by that score are read exactly, always with page 0 (the sink tokens) and the pages holding the last
64 positions.

Bounds are stored in bfloat16 when the pool's dtype is wider (fp32 on CPU), rounded outward (kmin
down, kmax up) so they still bound every key: half the metadata bytes of fp32 bounds, which at
block_size 16 cost 1/16 of dense on their own (at budget 1/4, a quarter of the budget). Measured at
1/4 (2K contexts, SmolLM2-135M, text and agreement only): ppl 1.052x -> 1.037x, mass recall 0.836 ->
0.871, top-1 agreement 0.883 either way.

Budget b of dense bytes, per lane with n positions in nb pages: the bounds cost 2 · D · s per page
(kmin and kmax, s = bound itemsize / K/V itemsize: s · nb / n of the dense bytes), the rest buys
P = floor((b · n - s · nb) / block_size) pages, at least the forced ones. Lanes where P covers all nb
pages are dense. Bytes per lane and layer, as read: 2 · nb · D · bound itemsize (bounds) + refreshed
blocks' keys + 2 · P · block_size · D · itemsize.

Bounds are derived from the pool lazily (common.BlockMirror): a block once full, the lane's last
block at every step, so imported K/V needs no hook.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from services.attention.kv_pool import KVPool
from services.attention.policies import RECENT_TOKENS, AttentionPolicy, DecodeLane, PolicyStep
from services.attention.policies.common import BlockMirror, LaneTensors, gathered_attention, row_bytes
from services.core.attention import PolicyName


def page_upper_bounds(
    q: torch.Tensor,  # [n, G, D]
    kmin: torch.Tensor,  # [n, P, D] per-page element-wise min of the keys
    kmax: torch.Tensor,  # [n, P, D] per-page element-wise max
) -> torch.Tensor:  # [n, G, P] >= max over the page's keys of q · k
    qf = q.float()
    upper = torch.bmm(qf.clamp(min=0), kmax.float().transpose(1, 2))
    return upper + torch.bmm(qf.clamp(max=0), kmin.float().transpose(1, 2))


BOUNDS_DTYPE = torch.bfloat16  # half the bytes of fp32 bounds; rounded outward, so still bounds


def round_outward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """x in `dtype`, rounded down (kmin) or up (kmax), so the stored bounds still bound every key."""
    y = x.to(dtype)
    if y.dtype == x.dtype:
        return y
    wrong = y.to(x.dtype) > x if down else y.to(x.dtype) < x
    toward = torch.full_like(y, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(y, toward), y)


def pages_for(lane: DecodeLane, block_size: int, bound_share: float) -> int:
    """Pages lane's budget buys after paying for the bounds (may exceed the lane's pages).
    `bound_share`: one page's bounds over one token's K and V bytes (bound itemsize / K/V itemsize)."""
    budget = lane.spec.budget if lane.spec.budget is not None else 1.0
    pages = -(-lane.length // block_size)
    forced = 1 + _recent_pages(lane.length, block_size)
    return max(forced, int((budget * lane.positions - pages * bound_share) // block_size))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _recent_pages(length: int, block_size: int) -> int:
    """Pages holding the last RECENT_TOKENS positions."""
    first = max(length - RECENT_TOKENS, 0) // block_size
    return (length - 1) // block_size - first + 1


class QuestPolicy(AttentionPolicy):
    name = PolicyName.QUEST

    def __init__(self, pool: KVPool, group: int, scale: float, lock: threading.Lock) -> None:
        super().__init__(pool, group, scale, lock)
        # Per layer [num_blocks, D], allocated on first use; a block's bounds are derived before read.
        self.kmin: list[torch.Tensor] = []
        self.kmax: list[torch.Tensor] = []
        self.mirror = BlockMirror(pool.block_size, pool.config.device)
        self.bound_dtype = (
            BOUNDS_DTYPE if _itemsize(BOUNDS_DTYPE) < _itemsize(pool.config.dtype) else pool.config.dtype
        )
        self.bound_share = _itemsize(self.bound_dtype) / _itemsize(pool.config.dtype)

    def covers(self, lane: DecodeLane) -> bool:
        pages = pages_for(lane, self.pool.block_size, self.bound_share)
        return pages >= -(-lane.length // self.pool.block_size)

    def begin_sparse(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        if not self.kmin:
            config = self.pool.config
            shape = (self.pool.allocator.num_blocks, config.head_dim)
            dtype = self.bound_dtype
            self.kmin = [torch.empty(shape, dtype=dtype, device=config.device) for _ in self.pool.k]
            self.kmax = [torch.empty(shape, dtype=dtype, device=config.device) for _ in self.pool.k]
        return QuestStep(self, lanes)

    def forget(self, seq_id: int) -> None:
        self.mirror.forget(seq_id)


class QuestStep(PolicyStep):
    def __init__(self, policy: QuestPolicy, lanes: Sequence[DecodeLane]) -> None:
        pool = policy.pool
        bs, device = pool.block_size, pool.config.device
        self.policy = policy
        self.lanes = list(lanes)
        self.t = LaneTensors.build(lanes, bs, device)
        self.refresh_blocks, self.refresh_filled = policy.mirror.refresh(lanes)
        n_pages = (self.t.length + bs - 1) // bs  # [n]
        page = torch.arange(self.t.table.shape[1], device=device)[None, :]  # [1, MB]
        self.page_valid = page < n_pages[:, None]
        first_recent = (self.t.length - RECENT_TOKENS).clamp(min=0) // bs
        self.forced = self.page_valid & ((page == 0) | (page >= first_recent[:, None]))
        pages = [pages_for(lane, bs, policy.bound_share) for lane in lanes]
        self.pages = torch.tensor(pages, device=device).minimum(n_pages)
        itemsize = torch.empty((), dtype=pool.config.dtype).element_size()
        d = pool.config.head_dim
        bounds = 2 * int(n_pages.sum()) * d * _itemsize(policy.bound_dtype)
        refresh = int(self.refresh_filled.sum()) * d * itemsize
        self.layer_bytes = bounds + refresh + row_bytes(int(self.pages.sum()) * bs, d, itemsize)
        self.bytes_read = 0

    def _refresh(self, layer: int) -> None:
        """Bounds of the blocks that changed since they were last derived: [X, D] each."""
        if self.refresh_blocks.numel() == 0:
            return
        policy, bs = self.policy, self.policy.pool.block_size
        keys = policy.pool.k[layer].index_select(0, self.refresh_blocks)  # [X, bs, D]
        row = torch.arange(bs, device=keys.device)[None, :, None]
        holds = row < self.refresh_filled[:, None, None]  # [X, bs, 1]
        kmin = keys.masked_fill(~holds, float("inf")).amin(dim=1)
        kmax = keys.masked_fill(~holds, float("-inf")).amax(dim=1)
        policy.kmin[layer][self.refresh_blocks] = round_outward(kmin, policy.bound_dtype, down=True)
        policy.kmax[layer][self.refresh_blocks] = round_outward(kmax, policy.bound_dtype, down=False)

    def _select(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored indices [n, P·bs] of the chosen pages' rows, valid [n, P·bs])."""
        self._refresh(layer)
        policy, t, bs = self.policy, self.t, self.policy.pool.block_size
        kmin = policy.kmin[layer][t.table]  # [n, MB, D]
        kmax = policy.kmax[layer][t.table]
        bound = page_upper_bounds(q, kmin, kmax) * policy.scale  # [n, G, MB]
        bound.masked_fill_(~self.page_valid[:, None, :], float("-inf"))
        score = bound.softmax(dim=-1).sum(dim=1).masked_fill(self.forced, float("inf"))  # [n, MB]
        score.masked_fill_(~self.page_valid, float("-inf"))
        width = int(self.pages.max())
        chosen = score.topk(width, dim=1).indices  # [n, P] best first
        rank = torch.arange(width, device=q.device)[None, :]
        offsets = torch.arange(bs, device=q.device)
        index = (chosen[:, :, None] * bs + offsets).reshape(q.shape[0], -1)  # [n, P·bs]
        valid = ((rank < self.pages[:, None])[:, :, None].expand(-1, -1, bs)).reshape(q.shape[0], -1)
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
