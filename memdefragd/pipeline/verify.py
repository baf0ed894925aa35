"""Verify: re-read what a request touched and count what really became huge.

A backend's outcome says what it did; the daemon books what a fresh read of the same
ranges shows (what really improved, not what was asked for). Pure but for
the read, which goes through the backend protocol (`iter_ranges`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..backends.protocol import Backend
from ..model import (
    PAGE_SIZE,
    PMD_PAGES,
    PMD_SIZE,
    AccessDenied,
    Method,
    ProcessGone,
    ProcessInfo,
    Request,
)

__all__ = ["Verified", "verify"]


def _no_regions() -> np.ndarray:
    return np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True, slots=True)
class Verified:
    """Bytes of a request's ranges PMD-mapped now, and the 2 MiB regions (byte
    addresses, uint64) wholly so."""

    bytes: int = 0
    huge: np.ndarray = field(default_factory=_no_regions)


def verify(
    backend: Backend,
    proc: ProcessInfo,
    request: Request,
    ranges: Sequence[tuple[int, int]] | None = None,
) -> Verified:
    """What a fresh read of the request's ranges (or of `ranges`: where the backend says
    it worked, Translation Ranger's pass going its own way) finds huge, or for method
    'ranger' translation-contiguous (2 MiB regions whose pages are all present at one
    VA-PA offset: what Translation Ranger makes); nothing when the process exited or
    refused meanwhile (a race, not an error: the request's outcome has it)."""
    pages, heads = 0, []
    contiguity = request.method == Method.RANGER
    try:
        for w in backend.iter_ranges(proc, request.ranges if ranges is None else ranges):
            if contiguity:
                regions = _contiguous_regions(w.vpn, w.pfn) if w.pfn_known else _no_regions()
                pages += int(regions.size) * PMD_PAGES
                heads.append(regions * np.uint64(PMD_SIZE))
                continue
            vpn = w.vpn[w.thp]
            pages += int(vpn.size)
            h, n = np.unique(vpn // PMD_PAGES, return_counts=True)
            heads.append(h[n == PMD_PAGES] * np.uint64(PMD_SIZE))
    except (ProcessGone, AccessDenied):
        return Verified()
    return Verified(pages * PAGE_SIZE, np.concatenate(heads) if heads else _no_regions())


def _contiguous_regions(vpn: np.ndarray, pfn: np.ndarray) -> np.ndarray:
    """Region numbers (vpn // 512) of the aligned regions whose 512 pages are all present
    with one pfn - vpn offset."""
    if not vpn.size:
        return _no_regions()
    region = vpn // np.uint64(PMD_PAGES)
    offset = pfn.astype(np.int64) - vpn.astype(np.int64)
    cut = np.flatnonzero(np.diff(region)) + 1  # vpn is sorted: regions are runs of it
    starts = np.concatenate(([0], cut))
    count = np.diff(np.append(starts, vpn.size))
    same = np.minimum.reduceat(offset, starts) == np.maximum.reduceat(offset, starts)
    found: np.ndarray = region[starts][(count == PMD_PAGES) & same].astype(np.uint64)
    return found
