"""What the daemon remembers of each tracked process between scans: one `Process` record
per pid, so that forgetting a process is one deletion (the plan's own per-process
bookkeeping, in Scheduler, HugeMemory and Forks, is forgotten through their `forget`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..model import PMD_SIZE, Request
from ..pipeline.scan import ProcessReport
from ..pipeline.score import thp_coverage


def _no_regions() -> np.ndarray:
    return np.zeros(0, dtype=np.uint64)


@dataclass(eq=False, slots=True)
class Process:
    """One tracked process. Region lists are byte addresses of 2 MiB regions (uint64)."""

    report: ProcessReport | None = None  # its last scan
    # VMA start -> hotness per collapsible region. None: not measured yet, so its work
    # waits (no collapsing blind); {}: no figures are coming, worked on unmeasured.
    hotness: dict[int, np.ndarray] | None = None
    urgent: np.ndarray = field(default_factory=_no_regions)  # split since they were huge
    measure_at: float | None = None  # when its first access window ends: scan it then
    waiting: float | None = None  # since when it waits for access figures
    made_huge: int = 0  # regions verified huge since its last scan
    # Regions sent since its last scan: a plan made from that scan must not send them
    # again (its figures predate the work).
    tried: set[int] = field(default_factory=set)

    def scanned(self, report: ProcessReport) -> None:
        """A fresh scan: what was sent and made huge before it is in its figures now."""
        self.report, self.tried, self.made_huge = report, set(), 0

    def sent(self, request: Request, attempted: int) -> None:
        """The regions a request got to (its first `attempted` bytes)."""
        regions = [a for lo, hi in request.ranges for a in range(lo, hi, PMD_SIZE)]
        self.tried.update(regions[: attempted // PMD_SIZE])

    def made(self, huge: np.ndarray) -> int | None:
        """Book regions verified huge; how many urgent ones that mended (None when there
        was nothing to compare: no urgent region, or nothing made huge)."""
        self.made_huge += int(huge.size)
        if not (self.urgent.size and huge.size):
            return None
        mended = np.isin(self.urgent, huge)
        self.urgent = self.urgent[~mended]
        return int(np.count_nonzero(mended))

    @property
    def coverage(self) -> float | None:
        """THP coverage at the last scan plus the regions verified huge since."""
        if self.report is None:
            return None
        t = self.report.totals
        return thp_coverage(t.thp_regions + self.made_huge, t.aligned_regions)
