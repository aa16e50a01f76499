"""The numba CPU decode kernel (kernels/paged_cpu.py) vs the torch reference, and its dispatch."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from services.attention.kernels import (
    Backend,
    PagedLanes,
    decode_attention,
    paged_cpu,
    use_cpu_kernel,
)
from services.attention.reference import DecodeLayout, paged_decode_attention
from tests import paged_pools
from tests.paged_pools import Lanes

D = 64


def make_pool(
    lengths: list[int], block_size: int, group: int, seed: int = 0
) -> tuple[Lanes, torch.Tensor, torch.Tensor, torch.Tensor]:
    return paged_pools.make_pool(lengths, block_size, seed=seed, group=group, head_dim=D, k_scale=3.0)


def run_kernel(
    lanes: list[tuple[list[int], int]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threads: int
) -> torch.Tensor:
    paged = PagedLanes.build(lanes, k.shape[1], "cpu")
    return paged_cpu.decode(q, k, v, paged.blocks, paged.lane_start, paged.lane_len, D**-0.5, threads)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 sums in another order: ‖out - ref‖ / ‖ref‖ within fp32 rounding (as the Triton tests)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.isfinite().all()
    assert float((out.double() - ref.double()).norm() / ref.double().norm()) < 1e-5


def reference(
    lanes: list[tuple[list[int], int]], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    layout = DecodeLayout.build(lanes, k.shape[1], q.shape[1], "cpu")
    return paged_decode_attention(q, k, v, layout, D**-0.5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_the_reference(threads: int, block_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paged_cpu, "MIN_POSITIONS_PER_THREAD", 1)  # split even these small steps
    lengths = [1, 37, 200, 16, 300, 5]  # one token, partial last blocks, exact blocks, ragged
    lanes, q, k, v = make_pool(lengths, block_size, group=3)
    out = run_kernel(lanes, q, k, v, threads)
    assert_close(out, reference(lanes, q, k, v))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 90), min_size=1, max_size=7),
    group=st.integers(1, 4),
    block_size=st.sampled_from([1, 4, 16]),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_any_lanes_match_the_reference(
    lengths: list[int], group: int, block_size: int, threads: int, seed: int
) -> None:
    lanes, q, k, v = make_pool(lengths, block_size, group, seed)
    old = paged_cpu.MIN_POSITIONS_PER_THREAD
    paged_cpu.MIN_POSITIONS_PER_THREAD = 1
    try:
        out = run_kernel(lanes, q, k, v, threads)
    finally:
        paged_cpu.MIN_POSITIONS_PER_THREAD = old
    assert_close(out, reference(lanes, q, k, v))


def test_split_cuts_lanes_into_runs_of_similar_length() -> None:
    import numpy as np

    lengths = np.array([100] * 10, dtype=np.int32)
    assert paged_cpu._split(lengths, 1) == [0, 10]
    assert paged_cpu._split(lengths, 2) == [0, 10]  # 1000 positions: not worth a second thread
    lengths = np.array([5000, 100, 100, 5000, 100], dtype=np.int32)
    cuts = paged_cpu._split(lengths, 2)
    assert cuts[0] == 0 and cuts[-1] == 5 and len(cuts) == 3
    assert all(a < b for a, b in itertools.pairwise(cuts))  # every run holds at least one lane
    assert paged_cpu._split(np.array([9000], dtype=np.int32), 4) == [0, 1]  # never more runs than lanes


def test_dispatch_runs_the_kernel_on_cpu_fp32_and_the_reference_otherwise() -> None:
    lanes, q, k, v = make_pool([5, 64, 130], 16, group=3, seed=1)
    layout = DecodeLayout.build(lanes, 16, 3, "cpu")
    assert use_cpu_kernel(q, k) and use_cpu_kernel(q, k, Backend.CPU)
    assert not use_cpu_kernel(q, k, Backend.TORCH)
    auto = decode_attention(q, k, v, layout, D**-0.5)
    assert_close(auto, paged_decode_attention(q, k, v, layout, D**-0.5))
    half = q.half(), k.half()
    assert not use_cpu_kernel(*half)  # fp16 pools take the torch reference
    with pytest.raises(RuntimeError, match="CPU fp32"):
        use_cpu_kernel(*half, Backend.CPU)


def test_a_table_outside_the_pool_is_refused_not_read() -> None:
    """numba does not bounds-check: the wrapper must, or a bad table reads foreign memory."""
    lanes, q, k, v = make_pool([20, 7], 16, group=3)
    paged = PagedLanes.build(lanes, 16, "cpu")
    with pytest.raises(ValueError, match="outside the pool"):
        bad = paged.blocks.clone()
        bad[0] = k.shape[0]
        paged_cpu.decode(q, k, v, bad, paged.lane_start, paged.lane_len, 0.125)
    with pytest.raises(ValueError, match="past the block table"):
        paged_cpu.decode(q, k, v, paged.blocks, paged.lane_start, paged.lane_len + 16, 0.125)
    with pytest.raises(ValueError, match="at least one position"):
        paged_cpu.decode(q, k, v, paged.blocks, paged.lane_start, paged.lane_len * 0, 0.125)
