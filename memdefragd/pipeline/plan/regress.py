"""Persistence: notice when huge pages a target had are split again, and mend them first.

Huge pages do not stay huge. A fork shares them copy-on-write, and each write of the
parent (or the child) while both live splits the PMD and copies one 4 KiB page (measured:
one snapshot child split 92% of a database's huge pages); an allocator purge
(MADV_DONTNEED of part of a region, then a refault) splits them too. So the daemon keeps,
per process, the 2 MiB regions it has seen huge (`HugeMemory`); a region that was huge and
is collapsible again is *urgent* (the scheduler ranks it first; `split_again` says which
after each scan). Forks get their own
bookkeeping (`Forks`): while a tracked process has a fork child that has not exec'd, both
are held back (collapsing either copies pages the other still shares, and the parent's
writes split again whatever we mend); when the child exits, the parent is re-scanned at
once and its split regions come back urgent; the time until its coverage is restored is
measured.

Pure: no I/O, the caller passes `now`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..discover import Changes

__all__ = ["FORK_GRACE", "RESTORED", "Forked", "Forks", "HugeMemory", "Split", "split_again"]

# A fork child that has not exec'd after this long is a worker (prefork servers: postgres,
# gunicorn), not a snapshot: it and its parent are worked on again. Snapshot children
# (redis BGSAVE, fork-based checkpoints) mostly end well within it.
FORK_GRACE = 60.0
RESTORED = 0.9  # coverage back to this share of what it was at the fork counts as restored


class HugeMemory:
    """Per process, the region addresses (bytes, uint64) seen huge and still mapped."""

    def __init__(self) -> None:
        self._huge: dict[int, np.ndarray] = {}

    def scanned(self, pid: int, huge: np.ndarray, collapsible: np.ndarray) -> np.ndarray:
        """Fold in a scan (its huge and collapsible regions); returns a mask over
        `collapsible`: True where the region was huge before (split since: urgent).

        Regions neither huge nor collapsible now (unmapped, emptied) are forgotten, so a
        region mapped again later is not mistaken for a regression."""
        huge = np.unique(np.asarray(huge, dtype=np.uint64))
        collapsible = np.asarray(collapsible, dtype=np.uint64)
        before = self._huge.get(pid)
        if before is None or before.size == 0:
            split = np.zeros(collapsible.size, dtype=bool)
            kept = np.zeros(0, dtype=np.uint64)
        else:
            split = np.isin(collapsible, before)
            kept = collapsible[split]
        self._huge[pid] = np.union1d(huge, kept)
        return split

    def made_huge(self, pid: int, regions: np.ndarray) -> None:
        """Regions a request made huge (verified)."""
        regions = np.asarray(regions, dtype=np.uint64)
        if regions.size:
            self._huge[pid] = np.union1d(self._huge.get(pid, np.zeros(0, np.uint64)), regions)

    def forget(self, pid: int) -> None:
        self._huge.pop(pid, None)

    def __contains__(self, pid: int) -> bool:
        return pid in self._huge


@dataclass(frozen=True, slots=True)
class Split:
    """What a scan shows split again in one process."""

    urgent: np.ndarray  # its urgent regions now: collapsible, and huge before
    new: int  # how many of them were not urgent before this scan
    cause: str  # "fork" (a fork child alive, or on its way back after one) or "drop"


def split_again(
    memory: HugeMemory,
    forks: Forks,
    pid: int,
    huge: np.ndarray,
    collapsible: np.ndarray,
    urgent: np.ndarray,
) -> Split:
    """Fold a scan's huge and collapsible regions (`scan.huge_and_collapsible`) into the
    bookkeeping, given the process's `urgent` regions before it. A fork that split nothing
    leaves nothing to restore: its restore clock is dropped."""
    collapsible = np.asarray(collapsible, dtype=np.uint64)
    now_urgent = collapsible[memory.scanned(pid, huge, collapsible)]
    new = int(np.count_nonzero(~np.isin(now_urgent, urgent)))
    cause = "fork" if forks.forking(pid) else "drop"
    if not now_urgent.size:
        forks.restoring.pop(pid, None)
    return Split(now_urgent, new, cause)


@dataclass(slots=True)
class _Fork:
    parent: int
    target: str
    at: float
    coverage: float | None  # the parent's, at its last scan before the fork


class Forked(NamedTuple):
    """A fork of a tracked process, as `Forks.seen` took it in."""

    parent: int
    child: int
    target: str
    coverage: float | None  # the parent's THP coverage before the fork (None: unknown)


@dataclass(slots=True)
class _Restore:
    target: str
    exited: float
    baseline: float


class Forks:
    """Fork children of tracked processes, and the parents' way back to their coverage."""

    def __init__(self, grace: float = FORK_GRACE):
        self.grace = grace
        self.children: dict[int, _Fork] = {}
        self.restoring: dict[int, _Restore] = {}  # parent -> since its child's exit

    def fork(
        self, parent: int, child: int, target: str, now: float, coverage: float | None
    ) -> None:
        self.children[child] = _Fork(parent, target, now, coverage)

    def seen(
        self,
        changes: Changes,
        now: float,
        target_of: Callable[[int], str | None],
        coverage_of: Callable[[int], float | None],
    ) -> tuple[list[Forked], list[tuple[int, int]]]:
        """Take in what discovery saw: forks, execs and exits of fork children. A fork
        counts when its parent is tracked (`target_of` gives its target's name, None for
        an untracked pid); `coverage_of` gives the parent's THP coverage now. Returns the
        forks taken in and the (parent, child) pairs whose child exited while the parent
        is still tracked: re-scan those parents at once."""
        forked = []
        for child, parent in changes.forked.items():
            target = target_of(parent)
            if target is not None:
                cov = coverage_of(parent)
                self.fork(parent, child, target, now, cov)
                forked.append(Forked(parent, child, target, cov))
        for child in changes.execd:
            self.execd(child)
        rescan = [
            (parent, child)
            for child, parent in changes.fork_exited.items()
            if self.exited(child, now) is not None and target_of(parent) is not None
        ]
        return forked, rescan

    def execd(self, child: int) -> None:
        """A new program: it shares nothing with its parent any more."""
        self.children.pop(child, None)

    def exited(self, child: int, now: float) -> int | None:
        """The child exited: its parent (to re-scan at once), or None if not a fork child
        we know of. The parent's restore clock starts if it had coverage to restore."""
        f = self.children.pop(child, None)
        if f is None:
            return None
        if f.coverage and not self._has_children(f.parent):
            old = self.restoring.get(f.parent)
            baseline = max(f.coverage, old.baseline) if old else f.coverage
            self.restoring[f.parent] = _Restore(f.target, now, baseline)
        return f.parent

    def held(self, pid: int, now: float) -> bool:
        """Leave this process alone now: a young fork child, or the parent of one."""
        f = self.children.get(pid)
        if f is not None and now - f.at < self.grace:
            return True
        return any(c.parent == pid and now - c.at < self.grace for c in self.children.values())

    def forking(self, pid: int) -> bool:
        """pid has a fork child alive, or is on its way back after one exited."""
        return pid in self.restoring or self._has_children(pid)

    def restored(self, parent: int, coverage: float | None, now: float) -> tuple[str, float] | None:
        """(target, seconds since the child's exit) once the parent's coverage is back to
        RESTORED of what it had at the fork; None before that (or if nothing is pending)."""
        r = self.restoring.get(parent)
        if r is None or coverage is None or coverage < RESTORED * r.baseline:
            return None
        del self.restoring[parent]
        return r.target, max(0.0, now - r.exited)

    def forget(self, pid: int) -> None:
        """The process exited: drop it as a parent (its children are orphans now)."""
        self.restoring.pop(pid, None)
        self.children.pop(pid, None)
        for child in [c for c, f in self.children.items() if f.parent == pid]:
            del self.children[child]

    def _has_children(self, parent: int) -> bool:
        return any(f.parent == parent for f in self.children.values())
