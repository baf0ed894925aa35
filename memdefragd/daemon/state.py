"""What the daemon remembers of each tracked process between scans: one `Process` record
per pid, so that forgetting a process is one deletion (the plan's own per-process
bookkeeping, in Scheduler, HugeMemory, Forks and AnchorWindows, is forgotten through their
`forget`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..model import PMD_SIZE, Outcome, ProcessInfo, Request, Vma
from ..pipeline.plan.access import Windows
from ..pipeline.plan.candidates import scan_candidates
from ..pipeline.plan.scheduler import Candidate
from ..pipeline.scan import ProcessReport, VmaKey, huge_and_collapsible
from ..pipeline.score import thp_coverage
from ..pipeline.targets import Target
from ..pipeline.verify import Verified

# A full cycle may keep a settled process's last scan (`Process.keeps`) this many cycles
# in a row, plus its pid modulo as many (so that the re-reads of processes found together
# spread over cycles): at the default 30 s interval, each is read again within 4-8
# minutes even when nothing it does shows (the kernel's compaction or khugepaged moving
# its pages fault nothing).
KEEP_CYCLES = 8


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
    # Its VMAs as smaps last listed them (VmFlags): while maps lists the same ones, a
    # scan reads maps, which does not walk its page tables (pipeline/scan.py).
    known_vmas: dict[VmaKey, Vma] = field(default_factory=dict)
    # Regions sent since its last scan: a plan made from that scan must not send them
    # again (its figures predate the work).
    tried: set[int] = field(default_factory=set)
    # Regions verified since its last scan that were collapsible in it (`first_verified`).
    booked: np.ndarray = field(default_factory=_no_regions)
    # Translation Ranger: a pass that made nothing new contiguous (a window held by what
    # its kernel cannot move, a VMA it skips) rests the process (`after_pass`).
    rest_until: float = float("-inf")
    futile: int = 0  # such passes in a row
    # Its stat counters when it was last scanned (`read_as`), whether the plan made from
    # that scan left it nothing to do (`settled`), and how many full cycles since kept
    # that scan instead of reading it again (`kept`).
    read_as: tuple[tuple[int, int, int], int] | None = None
    settled: bool = False
    kept: int = 0

    def scanned(self, report: ProcessReport) -> None:
        """A fresh scan: what was sent and made huge before it is in its figures now."""
        self.report, self.tried, self.made_huge = report, set(), 0
        self.booked = _no_regions()
        proc = report.proc
        self.read_as = None if proc.activity is None else (proc.activity, proc.rss)
        self.settled, self.kept = False, 0

    def keeps(self, proc: ProcessInfo) -> bool:
        """Whether a full cycle may keep its last scan instead of reading it again: the
        plan made from that scan left it nothing to do (`settled`), its faults, size and
        rss are what they were then (no fault: its page tables are as scanned, but for
        the kernel's own moves), and not too many cycles in a row kept it (KEEP_CYCLES)."""
        if not self.settled or self.read_as is None or proc.activity is None:
            return False
        if self.kept >= KEEP_CYCLES + proc.pid % KEEP_CYCLES:
            return False
        if self.read_as != (proc.activity, proc.rss):
            return False
        self.kept += 1
        return True

    def sent(self, request: Request, attempted: int) -> None:
        """The regions a request got to (its first `attempted` bytes)."""
        regions = [a for lo, hi in request.ranges for a in range(lo, hi, PMD_SIZE)]
        self.tried.update(regions[: attempted // PMD_SIZE])

    def first_verified(self, done: Verified) -> Verified:
        """Of what a verification of the backend's own ranges found (Translation Ranger's
        pass walks whole chunks, around the regions asked for), only the regions that
        were collapsible at the last scan and are not booked yet: each is counted once,
        not again at each pass that walks it."""
        if self.report is None:
            return Verified()
        _, collapsible = huge_and_collapsible(self.report)
        new = done.huge[np.isin(done.huge, collapsible) & ~np.isin(done.huge, self.booked)]
        self.booked = np.concatenate([self.booked, new])
        return Verified(int(new.size) * PMD_SIZE, new)

    def after_pass(self, verified: int, now: float, initial: float, maximum: float) -> float:
        """Book a Translation Ranger pass: one that verified nothing new rests the
        process, `initial` seconds doubling up to `maximum` with each such pass in a row,
        since every pass walks the whole process, and the same pass would do the same
        (each cost 0.8 s of kernel time on its kernel, and starved the other targets);
        one that verified something ends the rest. The rest (0: none)."""
        if verified:
            self.futile, self.rest_until = 0, float("-inf")
            return 0.0
        rest = min(maximum, initial * 2.0**self.futile)
        self.futile += 1
        self.rest_until = now + rest
        return rest

    def resting(self, now: float) -> bool:
        return now < self.rest_until

    def worked_in(self, outcome: Outcome) -> frozenset[int]:
        """The start addresses of its VMAs (as its last scan listed them) that a request's
        outcome worked in (where the backend says it worked, else the request's ranges),
        or the request's own VMA: where a Translation Ranger pass anchored."""
        req = outcome.request
        spans = outcome.touched or req.ranges
        vmas = [] if self.report is None else [v.vma for v in self.report.vmas]
        starts = {v.start for v in vmas if any(lo < v.end and v.start < hi for lo, hi in spans)}
        return frozenset(starts or {req.vma_start})

    def made(self, huge: np.ndarray) -> int | None:
        """Book regions verified huge; how many urgent ones that mended (None when there
        was nothing to compare: no urgent region, or nothing made huge)."""
        self.made_huge += int(huge.size)
        if not (self.urgent.size and huge.size):
            return None
        mended = np.isin(self.urgent, huge)
        self.urgent = self.urgent[~mended]
        return int(np.count_nonzero(mended))

    def measured(self, hotness: dict[int, np.ndarray] | None, now: float, windows: Windows) -> bool:
        """Book a scan's access figures (None: no window has ended for it). Without any,
        it keeps its last figures, or waits: its scan is due when its first window ends,
        unless it has waited past `windows.patience`, when it is worked on unmeasured.
        True at that moment (the caller says so, once)."""
        if hotness is not None:
            self.waiting, self.hotness = None, hotness
            return False
        self.waiting = now if self.waiting is None else self.waiting
        if self.hotness is not None:
            return False  # keeps its last figures
        if windows.given_up(self.waiting, now):
            self.hotness = {}  # no figures coming (a refusal): rank it unmeasured
            return True
        if self.measure_at is None:
            self.measure_at = now + windows.first
        return False

    def due(self, now: float) -> bool:
        """Its first access window has ended: scan it now (True once)."""
        if self.measure_at is None or self.measure_at > now:
            return False
        self.measure_at = None
        return True

    def candidates(self, target: Target, proc: ProcessInfo, *, measuring: bool) -> list[Candidate]:
        """What its last scan offers the plan: nothing before a scan, nor while access is
        `measuring` and its figures have not come (no collapsing blind), unless regions
        are urgent (split again since they were huge: they need no figures)."""
        if self.report is None or (measuring and self.hotness is None and not self.urgent.size):
            return []
        return scan_candidates(
            target, proc, self.report, hotness=self.hotness, urgent=self.urgent, tried=self.tried
        )

    @property
    def coverage(self) -> float | None:
        """THP coverage at the last scan plus the regions verified huge since."""
        if self.report is None:
            return None
        t = self.report.totals
        return thp_coverage(t.thp_regions + self.made_huge, t.aligned_regions)
