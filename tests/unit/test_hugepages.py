"""Transparent huge pages for NIXL-registered buffers (services/core/transport/hugepages.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.core.transport.hugepages import HUGE_PAGE, advise_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_huge_pages_keep_the_data_and_back_the_buffer() -> None:
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("transparent huge pages are off on this host")
    t = torch.arange(8 * HUGE_PAGE // 4, dtype=torch.int32)  # 8 MiB, touched: MADV_COLLAPSE's case
    expected = t.clone()
    if not advise_huge_pages(t):
        pytest.skip("the kernel refused MADV_COLLAPSE (older than 6.1, or memory too fragmented)")
    assert torch.equal(t, expected)  # collapsing copies the pages; the contents stay
    first = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the advice splits the mapping there
    assert _anon_huge_kib(first) >= 2048


def test_huge_pages_are_skipped_when_off_or_too_small(monkeypatch: pytest.MonkeyPatch) -> None:
    assert advise_huge_pages(torch.zeros(1024)) is False  # 4 KiB: no aligned 2 MiB page inside
    monkeypatch.setenv("DISAGG_HUGE_PAGES", "0")
    assert advise_huge_pages(torch.zeros(4 * HUGE_PAGE // 4)) is False
