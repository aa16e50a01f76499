"""Placement decisions without Redis: least-loaded picks, head splits, request vs head partitioning."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.errors import KvFullError, NoCapacityError
from services.core.placement import Placement, PlacementEntry
from services.core.registry import DecodeCapacity, PodInfo, PodStatus, Role
from services.core.router import (
    AttentionCandidate,
    PlacementMode,
    newest_per_address,
    pick_least_loaded,
    plan_attention,
)


def decode_pod(pod_id: str, load: int) -> PodStatus:
    info = PodInfo(pod_id, Role.DECODE, f"{pod_id}:9000", "m", DecodeCapacity(max_num_seqs=32), 0.0)
    return PodStatus(info, load=load, heartbeat_at=0.0)


def attn(pod_id: str, free: int, block_size: int = 16) -> AttentionCandidate:
    return AttentionCandidate(pod_id, f"{pod_id}:7000", free, block_size)


def test_least_loaded_wins_and_ties_are_deterministic() -> None:
    pods = [decode_pod("b", 3), decode_pod("a", 5), decode_pod("c", 3)]
    assert pick_least_loaded(pods, "decode").pod_id == "b"
    assert pick_least_loaded(list(reversed(pods)), "decode").pod_id == "b"


def test_no_pods_is_no_capacity_naming_the_role() -> None:
    with pytest.raises(NoCapacityError, match="disagg serve prefill"):
        pick_least_loaded([], "prefill")


def test_head_partitioned_three_heads_over_two_pods() -> None:
    plan = plan_attention(
        [attn("a", 100), attn("b", 200)], num_kv_heads=3, num_tokens=20, mode=PlacementMode.HEAD
    )
    # The pod with more room takes the larger share; 20 positions = 2 blocks of 16 per head.
    assert plan.placement == Placement((PlacementEntry("b:7000", 0, 2), PlacementEntry("a:7000", 2, 1)))
    assert plan.blocks == {"b": 4, "a": 2}


def test_request_partitioned_puts_every_head_on_the_freest_pod() -> None:
    plan = plan_attention(
        [attn("a", 100), attn("b", 200), attn("c", 50)],
        num_kv_heads=3,
        num_tokens=16,
        mode=PlacementMode.REQUEST,
    )
    assert plan.placement == Placement((PlacementEntry("b:7000", 0, 3),))
    assert plan.blocks == {"b": 3}


def test_head_mode_uses_at_most_one_pod_per_head_and_max_pods() -> None:
    pods = [attn(f"p{i}", 100) for i in range(5)]
    assert len(plan_attention(pods, 3, 1, PlacementMode.HEAD).shares) == 3
    assert [
        s.entry.kv_head_count for s in plan_attention(pods, 3, 1, PlacementMode.HEAD, max_pods=2).shares
    ] == [
        2,
        1,
    ]


def test_head_mode_falls_back_to_fewer_pods_when_one_is_nearly_full() -> None:
    plan = plan_attention(
        [attn("big", 100), attn("tiny", 1)], num_kv_heads=2, num_tokens=32, mode=PlacementMode.HEAD
    )
    assert plan.blocks == {"big": 4}


def test_block_size_is_per_pod() -> None:
    plan = plan_attention(
        [attn("a", 100, block_size=8), attn("b", 100, block_size=32)], 2, 33, PlacementMode.HEAD
    )
    assert plan.blocks == {"a": 5, "b": 2}  # ceil(33/8) and ceil(33/32), one head each


def test_nothing_fits_is_no_capacity() -> None:
    with pytest.raises(NoCapacityError, match="add attention pods"):
        plan_attention([attn("a", 3), attn("b", 3)], num_kv_heads=3, num_tokens=64, mode=PlacementMode.HEAD)
    with pytest.raises(NoCapacityError, match="disagg serve attention"):
        plan_attention([], 3, 1, PlacementMode.REQUEST)


@given(
    frees=st.lists(st.integers(0, 64), min_size=1, max_size=6),
    num_kv_heads=st.integers(1, 8),
    num_tokens=st.integers(1, 100),
    mode=st.sampled_from(PlacementMode),
)
def test_any_plan_covers_every_head_once_and_fits(
    frees: list[int], num_kv_heads: int, num_tokens: int, mode: PlacementMode
) -> None:
    pods = [attn(f"p{i}", free, block_size=16) for i, free in enumerate(frees)]
    try:
        plan = plan_attention(pods, num_kv_heads, num_tokens, mode)
    except NoCapacityError:
        # Every width down to one pod was tried, so not even the freest pod holds all heads.
        assert max(frees) < num_kv_heads * -(-num_tokens // 16)
        return
    assert plan.placement.num_kv_heads == num_kv_heads  # Placement itself checks each head is held once
    free_of = {p.pod_id: p.free_blocks for p in pods}
    assert all(blocks <= free_of[pod] for pod, blocks in plan.blocks.items())
    if mode is PlacementMode.REQUEST:
        assert len(plan.shares) == 1


def test_newest_registration_at_an_address_shadows_the_old_one() -> None:
    old, new, other = decode_pod("old", 0), decode_pod("new", 9), decode_pod("other", 1)
    new = PodStatus(replace(new.info, address=old.info.address, started_at=1.0), new.load, 0.0)
    assert [p.pod_id for p in newest_per_address([old, new, other])] == ["new", "other"]


def test_full_pods_are_kv_full_but_a_request_no_pod_could_ever_hold_is_not() -> None:
    """KvFullError means "wait and it fits" (the gateway queues it); NoCapacityError means it never will."""
    full = [AttentionCandidate("a", "a:7000", 2, 16, total_blocks=100)]
    with pytest.raises(KvFullError, match="no attention pod has room now"):
        plan_attention(full, num_kv_heads=3, num_tokens=160, mode=PlacementMode.REQUEST)  # needs 30
    with pytest.raises(NoCapacityError, match="could ever hold") as never:
        plan_attention(full, num_kv_heads=3, num_tokens=1600, mode=PlacementMode.REQUEST)  # needs 300
    assert not isinstance(never.value, KvFullError)
    # Head placement: 300 blocks fit two empty pods of 200 (2 heads + 1 head), so the request waits.
    two = [AttentionCandidate(p, f"{p}:7000", 0, 16, total_blocks=200) for p in ("a", "b")]
    with pytest.raises(KvFullError):
        plan_attention(two, num_kv_heads=3, num_tokens=1600, mode=PlacementMode.HEAD)
