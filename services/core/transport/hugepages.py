"""Transparent huge pages for host buffers that other processes copy into or out of.

Without an RDMA device UCX moves a NIXL WRITE between two processes of one host with CMA
(`process_vm_writev`): a kernel copy that pins the target's pages per call. On 4 KiB pages the pinning
and the TLB misses cost a large part of the copy; on 2 MiB transparent huge pages (THP) the same copy ran
1.2-1.8x faster on this project's 2-core machines (bench/RESULTS.md, section (b)).

`advise_huge_pages(t)` asks the kernel to back the 2 MiB-aligned interior of a tensor's memory with huge
pages: MADV_HUGEPAGE for pages not yet touched, then MADV_COLLAPSE (Linux 6.1+) for those already
touched, which copies them into huge pages once (about the cost of one memcpy of the buffer). It is
advice: where THP is off (`/sys/kernel/mm/transparent_hugepage/enabled` = never), the kernel is older,
or memory is too fragmented, the buffer keeps its pages and the call reports False. Set
DISAGG_HUGE_PAGES=0 to skip it (the default is on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from functools import cache

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def enabled() -> bool:
    return os.environ.get("DISAGG_HUGE_PAGES", "1").strip().lower() not in ("0", "false", "no", "off")


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Back `tensor`'s memory (a contiguous CPU tensor) with huge pages where possible; True if the
    kernel took both pieces of advice for at least one 2 MiB page."""
    libc = _libc()
    if libc is None or not enabled() or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = end // HUGE_PAGE * HUGE_PAGE
    if hi <= lo:
        return False  # smaller than one aligned huge page
    for advice, name in ((MADV_HUGEPAGE, "MADV_HUGEPAGE"), (MADV_COLLAPSE, "MADV_COLLAPSE")):
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice) != 0:
            log.debug("madvise(%s) on %d MiB: %s", name, (hi - lo) >> 20, os.strerror(ctypes.get_errno()))
            return False
    return True
