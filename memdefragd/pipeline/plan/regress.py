"""Persistence: notice when huge pages a target had are split again, and mend them first.

Huge pages do not stay huge. A fork shares them copy-on-write, and each write of the
parent (or the child) while both live splits the PMD and copies one 4 KiB page (measured:
one snapshot child split 92% of a database's huge pages); an allocator purge
(MADV_DONTNEED of part of a region, then a refault) splits them too. So the daemon keeps,
per process, the 2 MiB regions it has seen huge (`HugeMemory`); a region that was huge and
is collapsible again is *urgent* (the scheduler ranks it first). Forks get their own
bookkeeping (`Forks`): while a tracked process has a fork child that has not exec'd, both
are held back (collapsing either copies pages the other still shares, and the parent's
writes split again whatever we mend); when the child exits, the parent is re-scanned at
once and its split regions come back urgent; the time until its coverage is restored is
measured.

Pure: no I/O, the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FORK_GRACE", "RESTORED", "Forks", "HugeMemory"]

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


@dataclass(slots=True)
class _Fork:
    parent: int
    target: str
    at: float
    coverage: float | None  # the parent's, at its last scan before the fork


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
