"""System-wide free-memory fragmentation from buddy allocator counts.

The unusable free space index is Mel Gorman's, as the kernel computes it for
debugfs `extfrag/unusable_index` (mm/vmstat.c): for order j, the fraction of free memory
held in blocks smaller than 2^j pages. 0 means every free page could serve an order-j
request; 1 means none could. We compute it from /proc/buddyinfo because debugfs is often
not mounted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def free_pages(free_blocks: Sequence[int]) -> int:
    counts = np.asarray(free_blocks, dtype=np.int64)
    return int((counts << np.arange(counts.size)).sum())


def unusable_index(free_blocks: Sequence[int]) -> np.ndarray:
    """Index per order (same length as `free_blocks`); 1.0 everywhere when nothing is free."""
    counts = np.asarray(free_blocks, dtype=np.int64)
    pages_per_order = counts << np.arange(counts.size)
    total = pages_per_order.sum()
    if total == 0:
        return np.ones(counts.size)
    usable = np.cumsum(pages_per_order[::-1])[::-1]  # pages in blocks of order >= j
    return (total - usable) / total
