"""Placements: both standard shapes, and every way of not covering the heads exactly once."""

from __future__ import annotations

import pytest

from services.core.placement import Placement, PlacementEntry, PlacementError


def test_request_and_head_partitioned_shapes() -> None:
    assert Placement.request_partitioned("a:1", 3).entries == (PlacementEntry("a:1", 0, 3),)
    split = Placement.head_partitioned(["a:1", "b:1"], 3)
    assert split.entries == (PlacementEntry("a:1", 0, 2), PlacementEntry("b:1", 2, 1))
    assert split.num_kv_heads == 3 and split.addresses == ("a:1", "b:1")
    assert [e.kv_head_count for e in Placement.head_partitioned(list("abcd"), 8).entries] == [2, 2, 2, 2]


def test_entries_may_come_in_any_order() -> None:
    placement = Placement((PlacementEntry("b:1", 1, 2), PlacementEntry("a:1", 0, 1)))
    assert placement.num_kv_heads == 3


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ((), "at least one"),
        ((PlacementEntry("a:1", 0, 2), PlacementEntry("b:1", 1, 2)), "overlap at head 1"),
        ((PlacementEntry("a:1", 0, 1), PlacementEntry("b:1", 2, 1)), "gap or overlap at head 1"),
        ((PlacementEntry("a:1", 1, 2),), "gap or overlap at head 0"),
        ((PlacementEntry("a:1", 0, 1), PlacementEntry("a:1", 1, 1)), "lists a pod twice"),
        ((PlacementEntry("a:1", 0, 0),), "at least 1"),
    ],
)
def test_invalid_placements_name_the_problem(entries: tuple[PlacementEntry, ...], needle: str) -> None:
    with pytest.raises(PlacementError, match=needle):
        Placement(entries)


def test_cannot_split_over_more_pods_than_heads() -> None:
    with pytest.raises(PlacementError, match="cannot split 2 KV heads over 3 pods"):
        Placement.head_partitioned(["a", "b", "c"], 2)
