"""`heavy_hitter` (H2O, arXiv 2306.14048; VATP, arXiv 2406.12335): keep the tokens with the highest
accumulated attention, evict the rest, and give their blocks back to the allocator.

Scores, per layer and lane (one KV head: its G query heads summed):

    h2o    acc[t] = Σ over the decode steps since t was stored of the attention t received
    vatp   acc[t] · ‖v_t‖₁                                    (scoring "vatp", the default)

Scores accumulate from decode steps only: a prompt's K/V may arrive from a prefill pod (ImportKV,
NIXL) with no queries, so decode steps are the one source every serving path has. The first
eviction after a prompt therefore ranks the prompt by the first decode query's attention (like
TOVA, arXiv 2401.06104), later ones by the accumulated scores.

Budget b, per sequence with n positions: keep = max(4 + 64, ceil(b · n)) tokens. A decode step reads
every stored token (dense attention over what is kept, which is exact while nothing was evicted:
the same arithmetic as `dense`). After the step's last layer, a sequence storing s >= keep + block_size
tokens evicts x = block_size · floor((s - keep) / block_size) of them in every layer and lane: the 4 sink
tokens (positions 0..3) and the 64 most recent are never evicted; of the others the highest scores
stay. Kept tokens are compacted, in position order, to the front of the lane (K, V, scores and
positions move together) and the lanes' last x / block_size blocks go back to the allocator
(`BlockAllocator.evict`), so the pool really gains free blocks. New tokens are stored after the kept
ones (stored index = position - evicted). Capacity stays counted in positions, so the decode pod's
reservations, and the Redis ledger's, are unchanged by an eviction (the ledger keeps the request's
reservation until it ends; only the pod's free-block count reflects the freed blocks).

Bytes per step: 2 · s · D · itemsize per lane and layer (the stored tokens), plus an eviction's reads
(the V of every stored token for vatp, the kept K and V rows it moves).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from services.attention.kv_pool import KVPool
from services.attention.policies import RECENT_TOKENS, SINK_TOKENS, AttentionPolicy, DecodeLane, PolicyStep
from services.attention.reference import DecodeBucket, DecodeLayout, DecodeWorkspace, paged_decode_attention
from services.core.attention import PolicyName, Scoring

FLOOR = SINK_TOKENS + RECENT_TOKENS


def keep_count(positions: int, budget: float) -> int:
    return max(FLOOR, math.ceil(budget * positions))


def eviction(length: int, positions: int, budget: float, block_size: int) -> int:
    """Tokens to evict now from a lane storing `length` of `positions`: a multiple of block_size."""
    return max(length - keep_count(positions, budget), 0) // block_size * block_size


def choose_kept(
    score: torch.Tensor,  # [h, s] each stored token's score
    keep: int,  # tokens to keep per lane, >= FLOOR
) -> torch.Tensor:  # [h, keep] stored indices, ascending
    """The sinks, the recent window, and the highest other scores."""
    s = score.shape[1]
    index = torch.arange(s, device=score.device)
    forced = (index < SINK_TOKENS) | (index >= s - RECENT_TOKENS)
    ranked = score.masked_fill(forced[None, :], float("inf"))
    return ranked.topk(keep, dim=1).indices.sort(dim=1).values


class HeavyHitterPolicy(AttentionPolicy):
    name = PolicyName.HEAVY_HITTER

    def __init__(self, pool: KVPool, group: int, scale: float, lock: threading.Lock) -> None:
        super().__init__(pool, group, scale, lock)
        # Per layer [num_blocks, bs], allocated on first use; entries are set before they are read.
        self.acc: list[torch.Tensor] = []  # scores (fp32)
        self.pos: list[torch.Tensor] = []  # positions of the stored tokens (int32)
        self._scored: dict[int, int] = {}  # seq -> stored tokens whose score and position are set

    def covers(self, lane: DecodeLane) -> bool:
        return False  # below budget 1 every step accumulates scores for the evictions to come

    def begin_sparse(self, lanes: Sequence[DecodeLane]) -> PolicyStep:
        if not self.acc:
            shape, device = (self.pool.allocator.num_blocks, self.pool.block_size), self.pool.config.device
            self.acc = [torch.empty(shape, dtype=torch.float32, device=device) for _ in self.pool.k]
            self.pos = [torch.empty(shape, dtype=torch.int32, device=device) for _ in self.pool.k]
        return HeavyHitterStep(self, lanes)

    def forget(self, seq_id: int) -> None:
        self._scored.pop(seq_id, None)


class HeavyHitterStep(PolicyStep):
    def __init__(self, policy: HeavyHitterPolicy, lanes: Sequence[DecodeLane]) -> None:
        pool, bs = policy.pool, policy.pool.block_size
        device = pool.config.device
        self.policy = policy
        self.lanes = list(lanes)
        self.layout = DecodeLayout.build([(list(x.table), x.length) for x in lanes], bs, policy.group, device)
        self.workspace = DecodeWorkspace.for_layout(self.layout, pool.k[0])
        offsets = torch.arange(bs, device=device)
        self.block_rows = (self.layout.blocks[:, None] * bs + offsets).reshape(-1)  # [NB · bs] pool rows
        # Pool rows of each bucket's padded positions, [n · MB · bs] (padding repeats a lane's last
        # block, where the probabilities are 0).
        self.bucket_rows = {
            id(b): (b.blocks[:, None] * bs + offsets).reshape(-1) for b in self.layout.buckets
        }
        # Stored tokens seen for the first time (prompt, new token): their score starts at 0.
        fresh = [(lane, policy._scored.get(lane.seq_id, 0)) for lane in lanes]
        fresh = [(lane, start) for lane, start in fresh if start < lane.length]
        slots, positions = [], []
        for lane, start in fresh:
            index = torch.arange(start, lane.length, device=device)
            table = torch.tensor(list(lane.table), dtype=torch.long, device=device)
            slots.append(table[index // bs] * bs + index % bs)
            positions.append((index + lane.positions - lane.length).int())
        empty = torch.empty(0, dtype=torch.long, device=device)
        self.new_slots = torch.cat(slots) if slots else empty
        self.new_positions = torch.cat(positions) if positions else empty.int()
        self.itemsize = torch.empty((), dtype=pool.config.dtype).element_size()
        self.layer_bytes = 2 * sum(x.length for x in lanes) * pool.config.head_dim * self.itemsize
        self.bytes_read = 0

    def _start_scores(self, layer: int) -> None:
        if self.new_slots.numel():
            self.policy.acc[layer].view(-1).index_fill_(0, self.new_slots, 0.0)
            self.policy.pos[layer].view(-1).index_copy_(0, self.new_slots, self.new_positions)

    def decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Dense attention over the stored tokens (the reference's arithmetic), adding each token's
        attention, summed over the lane's G heads, to its score."""
        pool, acc = self.policy.pool, self.policy.acc[layer].view(-1)
        self._start_scores(layer)

        def accumulate(bucket: DecodeBucket, probs: torch.Tensor) -> None:  # probs [n, G, W]
            acc.index_add_(0, self.bucket_rows[id(bucket)], probs.sum(dim=1).reshape(-1))

        self.bytes_read += self.layer_bytes
        return paged_decode_attention(
            q, pool.k[layer], pool.v[layer], self.layout, self.policy.scale, self.workspace, accumulate
        )

    def attended(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Every stored token, by position (evicted positions are not attended)."""
        self._start_scores(layer)
        width = max(lane.positions for lane in self.lanes)
        stored = self.policy.pos[layer].view(-1)[self.block_rows].long().clamp(max=width - 1)
        valid = self.layout.valid.reshape(-1).int()  # [NB · bs]
        lane_of_row = self.layout.block_lane.repeat_interleave(self.policy.pool.block_size)
        hits = torch.zeros((q.shape[0], width), dtype=torch.int32, device=q.device)
        hits.index_put_((lane_of_row, stored), valid, accumulate=True)
        return hits > 0

    def finish(self) -> None:
        """Evict, sequence by sequence (their lanes together): see the module docstring."""
        bs = self.policy.pool.block_size
        groups: dict[tuple[int, int, Scoring], list[DecodeLane]] = {}
        seen: set[int] = set()
        for lane in self.lanes:
            budget = lane.spec.budget if lane.spec.budget is not None else 1.0
            x = eviction(lane.length, lane.positions, budget, bs)
            groups.setdefault((lane.length, x, lane.spec.scoring), []).append(lane)
            seen.add(lane.seq_id)
        for seq_id in seen:
            self.policy._scored[seq_id] = next(x.length for x in self.lanes if x.seq_id == seq_id)
        for (length, x, scoring), lanes in groups.items():
            if x > 0:
                self._evict(lanes, length, length - x, scoring)

    def _evict(self, lanes: list[DecodeLane], length: int, keep: int, scoring: Scoring) -> None:
        policy, pool = self.policy, self.policy.pool
        bs, d = pool.block_size, pool.config.head_dim
        device = pool.config.device
        index = torch.arange(length, device=device)
        tables = torch.tensor([list(x.table[: -(-length // bs)]) for x in lanes], device=device)
        slots = tables[:, index // bs] * bs + index % bs  # [h, s] flat rows of the stored tokens
        for layer in range(len(pool.k)):
            k, v = pool.k[layer].view(-1, d), pool.v[layer].view(-1, d)
            score = policy.acc[layer].view(-1)[slots]  # [h, s]
            if scoring is Scoring.VATP:
                score = score * v[slots.reshape(-1)].float().abs().sum(dim=-1).view_as(score)
                self.bytes_read += slots.numel() * d * self.itemsize
            kept = choose_kept(score, keep)  # [h, keep]
            src, dst = slots.gather(1, kept).reshape(-1), slots[:, :keep].reshape(-1)
            for flat in (k, v, policy.acc[layer].view(-1, 1), policy.pos[layer].view(-1, 1)):
                flat.index_copy_(0, dst, flat.index_select(0, src))  # the select copies: overlap is safe
            self.bytes_read += 2 * src.numel() * d * self.itemsize
        with policy.lock:
            for seq_id in {x.seq_id for x in lanes}:
                pool.allocator.evict(seq_id, length - keep)
                policy._scored[seq_id] = keep
