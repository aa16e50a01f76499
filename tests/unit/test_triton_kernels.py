"""Triton attention kernels vs the torch references.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before anything
imports triton): small shapes, big blocks, few lanes. With CUDA the same tests run compiled, plus bf16
(the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")

from services.attention.kernels import (  # noqa: E402
    Backend,
    PagedLanes,
    decode_attention,
    decode_bytes,
    paged_decode,
    sparq,
    sparq_kernels,
    sparq_pick,
)
from services.attention.reference import DecodeLayout, paged_decode_attention  # noqa: E402
from tests.paged_pools import make_pool  # noqa: E402

DEVICES = ["cpu"] if INTERPRET else ["cuda"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if not INTERPRET else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # ‖out - ref‖ / ‖ref‖
G, D = 3, 64  # SmolLM2-like group and head_dim
LENGTHS = [1, 37, 200]  # one token, a partial last block, several blocks


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.isfinite().all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lanes: list, bs: int) -> torch.Tensor:
    """The repo's reference on fp32 copies of the same values."""
    layout = DecodeLayout.build(lanes, bs, G, str(q.device))
    return paged_decode_attention(q.float(), k.float(), v.float(), layout, D**-0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "num_splits"), [(16, 1), (16, 3), (32, None)])
def test_dense_matches_reference(
    device: str, dtype: torch.dtype, block_size: int, num_splits: int | None
) -> None:
    lanes, q, k, v = make_pool(LENGTHS, block_size, dtype, device)
    paged = PagedLanes.build(lanes, block_size, device)
    out = paged_decode.paged_decode_attention(q, k, v, paged, D**-0.5, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, dense_reference(q, k, v, lanes, block_size)) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_dispatcher_follows_the_reference_contract(device: str) -> None:
    lanes, q, k, v = make_pool([5, 64, 130], 16, torch.float32, device, seed=1)
    layout = DecodeLayout.build(lanes, 16, G, device)
    ref = paged_decode_attention(q, k, v, layout, D**-0.5)
    converted = PagedLanes.from_layout(layout, len(lanes))
    built = PagedLanes.build(lanes, 16, device)
    for name in ("blocks", "lane_start", "lane_len"):
        assert torch.equal(getattr(converted, name), getattr(built, name)), name
    out = decode_attention(q, k, v, layout, D**-0.5, backend=Backend.TRITON)
    assert rel_err(out, ref) < 1e-5
    auto = decode_attention(q, k, v, layout, D**-0.5)  # CPU fp32: the numba kernel (paged_cpu.py)
    assert rel_err(auto, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparq_full_budget_is_dense(device: str, dtype: torch.dtype) -> None:
    """r = D and k >= length keep everything: SparQ must equal dense attention."""
    lanes, q, k, v = make_pool(LENGTHS, 16, dtype, device, seed=2)
    paged, kt = PagedLanes.build(lanes, 16, device), sparq.kt_from_k(k)
    ref = dense_reference(q, k, v, lanes, 16)
    for step in (sparq.sparq_decode_reference, sparq.sparq_decode_triton):
        result = step(q, k, v, kt, paged, D, max(LENGTHS), 4, D**-0.5)
        assert rel_err(result.out, ref) < TOLERANCE[dtype], step.__name__
        assert result.bytes_read == decode_bytes(LENGTHS, D, k.element_size()) * 3 // 2  # r·L + 2·L·D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 24, 1024])  # 1024: a phase-1 tile is part of a block
def test_sparq_triton_matches_reference(device: str, dtype: torch.dtype, block_size: int) -> None:
    lengths = [*LENGTHS, 600]
    lanes, q, k, v = make_pool(lengths, block_size, dtype, device, seed=3)
    paged, kt = PagedLanes.build(lanes, block_size, device), sparq.kt_from_k(k)
    ref = sparq.sparq_decode_reference(q, k, v, kt, paged, 8, 24, 4, D**-0.5)
    out = sparq.sparq_decode_triton(q, k, v, kt, paged, 8, 24, 4, D**-0.5, num_splits=2)
    assert rel_err(out.out, ref.out) < TOLERANCE[dtype]
    assert out.bytes_read == ref.bytes_read == sparq.sparq_bytes(lengths, 8, 24, D, k.element_size())
    assert rel_err(ref.out, dense_reference(q, k, v, lanes, block_size)) > 1e-2  # it did drop positions


@pytest.mark.parametrize("device", DEVICES)
def test_sparq_triton_with_torch_selection(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PICK_MAX_WIDTH the selection runs in torch over the same logits: same function."""
    monkeypatch.setattr(sparq_pick, "PICK_MAX_WIDTH", 0)
    lanes, q, k, v = make_pool(LENGTHS, 16, torch.float32, device, seed=7)
    paged, kt = PagedLanes.build(lanes, 16, device), sparq.kt_from_k(k)
    ref = sparq.sparq_decode_reference(q, k, v, kt, paged, 8, 24, 4, D**-0.5)
    out = sparq.sparq_decode_triton(q, k, v, kt, paged, 8, 24, 4, D**-0.5)
    assert rel_err(out.out, ref.out) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_sparq_select_kernel_matches_select_components(device: str) -> None:
    q = torch.randn(5, G, D, generator=torch.Generator().manual_seed(5)).to(device)
    idx, q_sel = sparq.select_components(q, 8, D**-0.5)
    idx_k, q_sel_k = sparq_kernels.sparq_select(q, 8, D**-0.5)
    order, order_k = idx.argsort(dim=1), idx_k.long().argsort(dim=1)  # same sets, any order
    assert torch.equal(idx.gather(1, order), idx_k.long().gather(1, order_k))
    expected = q_sel.gather(2, order[:, None, :].expand_as(q_sel))
    assert rel_err(q_sel_k.gather(2, order_k[:, None, :].expand_as(q_sel_k)), expected) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_sparq_window_only_attends_to_the_last_positions(device: str) -> None:
    """k == local_window: the kept set is exactly the window, whatever phase 1 scores."""
    lanes, q, k, v = make_pool([3, 40], 16, torch.float32, device, seed=4)
    paged, kt = PagedLanes.build(lanes, 16, device), sparq.kt_from_k(k)
    expected = []
    for lane, (table, n) in enumerate(lanes):
        rows = [table[p // 16] * 16 + p % 16 for p in range(max(0, n - 8), n)]
        keys, values = k.view(-1, D)[rows], v.view(-1, D)[rows]  # [w, D]
        expected.append(torch.softmax(q[lane] @ keys.T * D**-0.5, dim=-1) @ values)
    expected_out = torch.stack(expected)
    for step in (sparq.sparq_decode_reference, sparq.sparq_decode_triton):
        assert rel_err(step(q, k, v, kt, paged, 4, 8, 8, D**-0.5).out, expected_out) < 1e-5, step.__name__


LOGITS = [  # logits (tile, warps), keys (block, tiles per program, warps)
    ((256, 4), (512, 1, 4)),  # one keys step per program, of 256 positions (the divisor of wpad)
    ((128, 1), (64, 8, 2)),  # looping keys programs, the last one short; keys tiles inside stat tiles
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("launch", LOGITS, ids=["single", "loop"])
def test_sparq_scores_match_the_reference_score(
    device: str, launch: tuple[tuple[int, int], tuple[int, int, int]]
) -> None:
    """Phase 1 (logits over kt, then the keys): Σ_g softmax_g of the approximate logits, window +inf."""
    lengths, bs, r, window = [1, 37, 600, 1100], 16, 8, 4
    pool, q, k, _ = make_pool(lengths, bs, torch.float32, device, seed=8)
    paged, kt = PagedLanes.build(pool, bs, device), sparq.kt_from_k(k)
    idx, q_sel = sparq.select_components(q, r, D**-0.5)
    width = max(lengths)
    table = paged.padded_table(-(-width // bs))
    kt_sel = kt[table[:, :, None], idx[:, None, :]].permute(0, 2, 1, 3).reshape(len(lengths), r, -1)
    logits = torch.bmm(q_sel, kt_sel[:, :, :width])  # [n_lanes, G, width]
    length, pos = torch.tensor(lengths, device=device)[:, None], torch.arange(width, device=device)[None, :]
    valid = pos < length
    score = logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1).sum(dim=1)
    (block_n, warps), (keys_n, keys_tiles, keys_warps) = launch
    logits = sparq_kernels.LogitsConfig(block_n, warps)
    keys_config = sparq_kernels.KeysConfig(keys_n, keys_tiles, keys_warps)
    phase1 = sparq_kernels.sparq_scores(q_sel, idx.int(), kt, paged, width, window, logits, keys_config)
    keys = phase1.keys[:, :width]
    assert phase1.wpad >= width and keys.dtype == torch.int32
    got = keys.view(torch.float32)
    in_window = valid & (pos >= length - window)
    assert bool(got[in_window].isinf().all())
    middle = valid & ~in_window
    err = ((got[middle] - score[middle]).abs() / score[middle]).max()
    assert err < 1e-5, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["sampled_atomic", "sampled_scan", "one_cta", "torch"])
def test_sparq_pick_is_exact(device: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection = torch.topk of the keys, on each path: ties across the k-th value, a crowded
    threshold bin (lanes 4 and 5: every score equal; lane 5's band exceeds BAND, so the sampled path
    falls back), the forced window (+inf), lanes shorter than k, unused slots."""
    if path == "torch":
        monkeypatch.setattr(sparq_pick, "PICK_MAX_WIDTH", 0)
    gen = torch.Generator().manual_seed(6)
    lengths, bs = [1, 5, 300, 1500, 1500, 4200], 16
    pool, _, _, _ = make_pool(lengths, bs, torch.float32, "cpu", seed=6)
    paged = PagedLanes.build(pool, bs, device)
    width, wpad = max(lengths), max(lengths) + 7
    score = torch.rand(len(lengths), wpad, generator=gen) * 1e-3
    score[:, ::7] = torch.rand(len(lengths), -(-wpad // 7), generator=gen)  # several exponents
    score[3, 100:180] = 0.9  # 80 equal top scores: a tie across the k-th value at k = 64
    score[4:] = 0.25  # every score equal: the bin holds every key
    for lane, n in enumerate(lengths):
        score[lane, max(0, n - 4) : n] = float("inf")
    keys = score.view(torch.int32).clone()
    keys[torch.arange(wpad)[None, :] >= torch.tensor(lengths)[:, None]] = -1
    phase1 = sparq_kernels.Phase1.of_keys(keys.to(device), width)
    for k in (64, 1500):
        config = sparq_pick.PickConfig(atomic_slots=path == "sampled_atomic")
        rows = sparq_pick.sparq_pick(
            phase1, paged, k, width, 4, sampled=path != "one_cta", config=config
        ).cpu()
        assert rows.shape == (len(lengths), k) and rows.dtype == torch.int32
        for lane, ((table, n), got) in enumerate(zip(pool, rows.tolist(), strict=True)):
            at = {block: i for i, block in enumerate(table)}
            picked = [at[row // bs] * bs + row % bs for row in got if row >= 0]
            assert len(picked) == len(set(picked)) == min(k, n) and got.count(-1) == k - min(k, n)
            assert all(p < n for p in picked)
            expected = score[lane, :n].topk(min(k, n)).values
            assert torch.equal(score[lane, picked].sort(descending=True).values, expected)
            if lane >= 4 and path != "torch":  # ties: the lowest positions (window aside)
                assert sorted(p for p in picked if p < n - 4) == list(range(min(k, n) - 4))


def test_sparq_budget_and_validation() -> None:
    """r = D/8 and k = L/16 read an eighth of dense; bad arguments fail with the cause."""
    assert sparq.sparq_bytes([4096], 8, 256, 64, 2) * 8 == decode_bytes([4096], 64, 2)
    lanes, q, k, v = make_pool([20], 16, torch.float32, "cpu")
    paged, kt = PagedLanes.build(lanes, 16, "cpu"), sparq.kt_from_k(k)
    with pytest.raises(ValueError, match="r"):
        sparq.sparq_decode(q, k, v, kt, paged, D + 1, 8, 0, 1.0)
    with pytest.raises(ValueError, match="local_window"):
        sparq.sparq_decode(q, k, v, kt, paged, 8, 4, 8, 1.0)
    with pytest.raises(ValueError, match="blocks"):
        PagedLanes.build([([0], 40)], 16, "cpu")
