"""Verify: re-read what a request touched and count what really became huge.

A backend's outcome says what it did; the daemon books what a fresh read of the same
ranges shows (what really improved, not what was asked for). Pure but for
the read, which goes through the backend protocol (`iter_ranges`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backends.protocol import Backend
from ..model import PAGE_SIZE, PMD_PAGES, PMD_SIZE, AccessDenied, ProcessGone, ProcessInfo, Request

__all__ = ["Verified", "verify"]


def _no_regions() -> np.ndarray:
    return np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True, slots=True)
class Verified:
    """Bytes of a request's ranges PMD-mapped now, and the 2 MiB regions (byte
    addresses, uint64) wholly so."""

    bytes: int = 0
    huge: np.ndarray = field(default_factory=_no_regions)


def verify(backend: Backend, proc: ProcessInfo, request: Request) -> Verified:
    """What a fresh read of the request's ranges finds huge; nothing when the process
    exited or refused meanwhile (a race, not an error: the request's outcome has it)."""
    pages, heads = 0, []
    try:
        for w in backend.iter_ranges(proc, request.ranges):
            vpn = w.vpn[w.thp]
            pages += int(vpn.size)
            h, n = np.unique(vpn // PMD_PAGES, return_counts=True)
            heads.append(h[n == PMD_PAGES] * np.uint64(PMD_SIZE))
    except (ProcessGone, AccessDenied):
        return Verified()
    return Verified(pages * PAGE_SIZE, np.concatenate(heads) if heads else _no_regions())
