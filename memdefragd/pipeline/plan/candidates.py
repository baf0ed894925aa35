"""From a process's last scan to the scheduler's candidates (the plan stage's input).

One candidate per VMA with collapsible regions, each region weighted by how hot it is and
marked urgent if it was huge once; regions already sent since that scan are left out,
since the scan's figures predate the work. Pure.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

import numpy as np

from ...model import ProcessInfo
from ..scan import ProcessReport, collapsible_regions
from ..targets import Target
from .scheduler import Candidate

__all__ = ["scan_candidates"]


def scan_candidates(
    target: Target,
    proc: ProcessInfo,
    report: ProcessReport,
    *,
    hotness: Mapping[int, np.ndarray] | None = None,
    urgent: np.ndarray | None = None,
    tried: Collection[int] = (),
) -> list[Candidate]:
    """`hotness` by VMA start (None: not measured), `urgent` and `tried` as region
    addresses."""
    out = []
    sent = np.fromiter(tried, np.uint64, len(tried)) if tried else None
    for v in report.vmas:
        if v.metrics.collapsible_vpns is None or not v.metrics.collapsible_vpns.size:
            continue
        hot = None if hotness is None else hotness.get(v.vma.start)
        if hot is not None and hot.size != v.metrics.collapsible_vpns.size:
            # Figures kept from an older scan (a sampler restarting gives none for a
            # while) of a VMA whose regions have changed since (a fork split them, say):
            # they say nothing of these regions, which rank as unmeasured.
            hot = None
        c = Candidate.from_metrics(
            target, proc.pid, proc.start_time, v.vma, v.metrics,
            hotness=hot,
            urgent=None if urgent is None or not urgent.size else np.isin(
                collapsible_regions(v.metrics), urgent
            ),
        )  # fmt: skip
        if sent is not None:
            fresh = ~np.isin(c.regions, sent)
            c = replace(
                c, regions=c.regions[fresh], present=c.present[fresh],
                hotness=None if c.hotness is None else c.hotness[fresh],
                urgent=None if c.urgent is None else c.urgent[fresh],
            )  # fmt: skip
        out.append(c)
    return out
