"""Access sampling on the real kernel: the kernel backend's `access_sampler()` capability
(pipeline/plan/access.py says why access matters and turns samples into hotness).

- **damon**: DAMON's own kdamond (damon.py), per region, at a cost DAMON bounds (sampling
  one page per region per 5 ms); used only where it can run without disturbing kdamonds
  someone else made.
- **referenced**: `/proc/PID/clear_refs` then the `Referenced` field of smaps at the next
  scan: the share of each VMA's resident pages touched in between. Per VMA only (smaps
  has no finer grain), and it has side effects on the target, which is why `auto` uses
  it only where DAMON is unusable: writing "1" to clear_refs clears the accessed (young)
  bits of every page of the process, so reclaim (and anyone else sampling them: a
  working-set estimator, khugepaged's "referenced" rule) sees its pages as idle until
  they are touched again, and it walks every page table of the process under its mmap
  read lock. It never writes "4", so the soft-dirty bits CRIU and similar tools use are
  left alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ...model import AccessDenied, ProcessGone, ProcessInfo, Vma
from ...pipeline.plan.access import hotness_from_ranges, hotness_from_referenced
from ..protocol import AccessSampler
from .damon import SETTLE, Damon, DamonUnavailable
from .procs import ProcDir

log = logging.getLogger("memdefragd")

MIN_WINDOW = 1.0  # seconds: a shorter Referenced window says more about luck than heat


class DamonSampler:
    """Hotness per region from our kdamond."""

    name = "damon"
    settle = SETTLE
    walks_target = False

    def __init__(self, damon: Damon):
        """`damon` is opened already; `close()` closes it."""
        self.damon = damon

    def watch(self, procs: Mapping[int, ProcessInfo]) -> None:
        try:
            self.damon.watch(procs.keys())
        except OSError as e:
            log.warning("DAMON: cannot update the monitored processes: %s", e)

    def refresh(self) -> None:
        try:
            self.damon.refresh()
        except OSError as e:
            log.warning("DAMON: cannot read monitoring results: %s", e)

    def hotness(
        self, proc: ProcessInfo, vmas: Sequence[tuple[Vma, np.ndarray]]
    ) -> list[np.ndarray] | None:
        got = self.damon.ranges(proc.pid)
        if got is None:
            return None
        if self.damon.monitored() < SETTLE:
            # DAMON's regions are still coarse: a hot half and a cold half can read the
            # same, or a cold part hotter (seen under emulation at 2-6 s), and one early
            # reading orders all the work. An idle process reads 0 until then, too.
            return None
        starts, ends, freq = got
        return [hotness_from_ranges(regions, starts, ends, freq) for _, regions in vmas]

    def close(self) -> None:
        self.damon.close()


class ReferencedSampler:
    """Hotness per VMA: clear_refs, then smaps' Referenced over Rss at the next scan."""

    name = "referenced"
    settle = 0.0  # figures after one window: Windows' own rule
    walks_target = True  # clear_refs, then smaps' Referenced, at every window

    def __init__(
        self,
        proc_root: str = "/proc",
        *,
        clock: Callable[[], float] = time.monotonic,
        min_window: float = MIN_WINDOW,
    ):
        self.proc_root = proc_root
        self.clock = clock
        self.min_window = min_window
        self.since: dict[int, float] = {}  # pid -> when its window began
        self.last: dict[int, dict[int, float | None]] = {}  # pid -> vma start -> hotness

    def watch(self, procs: Mapping[int, ProcessInfo]) -> None:
        for pid in set(self.since) - set(procs):
            self.since.pop(pid, None)
            self.last.pop(pid, None)
        for pid, proc in procs.items():
            if pid not in self.since:
                self._clear(proc)

    def refresh(self) -> None:
        pass  # each process's window ends at its own scan

    def hotness(
        self, proc: ProcessInfo, vmas: Sequence[tuple[Vma, np.ndarray]]
    ) -> list[np.ndarray] | None:
        began = self.since.get(proc.pid)
        if began is None:
            self._clear(proc)
            return None
        if self.clock() - began >= self.min_window:
            self.last[proc.pid] = {
                v.start: hotness_from_referenced(v.field("Referenced"), v.rss) for v, _ in vmas
            }
            self._clear(proc)
        seen = self.last.get(proc.pid)
        if seen is None:
            return None
        # A VMA that appeared since the window began has no figure: count it as hot (it
        # was just mapped and filled, so it is being used).
        return [np.full(r.size, _or(seen.get(v.start), 1.0)) for v, r in vmas]

    def close(self) -> None:
        self.since.clear()
        self.last.clear()

    def _clear(self, proc: ProcessInfo) -> None:
        try:
            with ProcDir(self.proc_root, proc.pid) as d:
                d.check_identity(proc, alive=True)
                fd = d.open("clear_refs", os.O_WRONLY)
                try:
                    os.write(fd, b"1")  # "1": accessed bits only; never "4" (soft-dirty)
                finally:
                    os.close(fd)
        except (ProcessGone, AccessDenied, OSError) as e:
            log.debug("clear_refs of pid %d: %s", proc.pid, e)
            return
        self.since[proc.pid] = self.clock()


def _or(x: float | None, default: float) -> float:
    return default if x is None else x


def open_sampler(source: str, proc_root: str = "/proc") -> tuple[AccessSampler | None, str]:
    """The sampler `daemon.access.source` asks for, and a sentence for the log saying
    which and why (DAMON's refusal reason, for one): DAMON first where allowed, else
    clear_refs + Referenced."""
    why = ""
    if source in ("auto", "damon"):
        damon = Damon()
        try:
            damon.open()
        except (DamonUnavailable, OSError) as e:
            why = f"DAMON unusable: {e}"
        else:
            return DamonSampler(damon), "access-aware priority from DAMON (our own kdamond)"
        if source == "damon":
            return None, f"access-aware priority off: {why}"
    if source not in ("auto", "referenced"):
        return None, f"access-aware priority off (daemon.access.source: {source})"
    return ReferencedSampler(proc_root), (
        "access-aware priority from clear_refs + smaps Referenced, per VMA"
        + (f" ({why})" if why else "")
    )
