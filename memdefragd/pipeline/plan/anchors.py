"""Translation Ranger's anchor windows across processes: which passes fight over the same
frames, and which process is held back so that they stop.

A ranger pass puts each VMA of a process at one VA->PA offset, its anchor: page v goes to
frame anchor_pfn + (v - anchor_vpn), migrated into a free frame or exchanged with whatever
in-use page is there. The RFC kernel anchors a process's first VMA at the start of the
zone of its lowest page and looks at that one process only (get_undefragged_area), so
processes in one zone are given the same frames: each pass takes them from the process
passed before, by exchange, and the next pass of that process takes them back. Measured
on its kernel (4 processes, 30 passes): 921k pages exchanged, and only the process passed
last ends contiguous.

The rule: **the process whose pass filled a window last keeps it.** When a pass of A
anchors in frames that overlap the window a pass of another tracked process B put in
place, B gets no more ranger passes while A is tracked and A's window overlaps B's: B's
anchor stays in its VMA in the kernel, so its next pass would only take the frames back.
The hold is lifted when A is forgotten (it exited, or no target claims it any more), or
when the VMAs A's or B's windows were made for are all gone (the kernel frees an anchor
with its VMA, and a new VMA gets a new anchor: the next pass shows where). A held process
takes nothing from anybody, so holds never form a cycle; a process whose window nobody
else's overlaps is never held. The holder's own passes go on as before (one that makes
nothing new contiguous rests it: daemon/state.py, `Process.after_pass`).

Pure: no I/O; the caller says which processes are still tracked.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["AnchorWindows", "Frames", "ProcKey", "Taken", "merge_frames", "shared"]

Frames = tuple[tuple[int, int], ...]  # [first, end) frame numbers, in order, disjoint
ProcKey = tuple[int, int]  # (pid, start_time): one process, never a reused pid


def merge_frames(spans: Iterable[tuple[int, int]]) -> Frames:
    """[first, end) frame ranges sorted and merged (overlapping or adjacent ones joined;
    empty ones dropped)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted((int(lo), int(hi)) for lo, hi in spans if hi > lo):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def shared(a: Frames, b: Frames) -> tuple[int, int] | None:
    """The first [first, end) frame range both `a` and `b` cover (each sorted and
    disjoint, as merge_frames makes them); None if they have no frame in common."""
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            return lo, hi
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return None


@dataclass(frozen=True, slots=True)
class Taken:
    """A pass of `holder` filled `window` (frames), which `held`'s last pass had put in
    place: `held` gets no more ranger passes while `holder` keeps it."""

    holder: ProcKey
    held: ProcKey
    window: tuple[int, int]


@dataclass(slots=True)
class _Record:
    frames: Frames  # every window its passes anchored in since its VMAs were last new
    vmas: frozenset[int]  # start addresses of the VMAs those windows were made for
    holders: set[ProcKey] = field(default_factory=set)  # who took its window


class AnchorWindows:
    """Per tracked process, the frame windows its ranger passes anchored in, and who holds
    it back (the module's rule)."""

    def __init__(self) -> None:
        self._procs: dict[ProcKey, _Record] = {}

    def passed(
        self,
        key: ProcKey,
        frames: Frames,
        vmas: Collection[int],
        tracked: Callable[[ProcKey], bool] = lambda _: True,
    ) -> list[Taken]:
        """Book a pass of `key` that anchored in `frames` for the VMAs starting at `vmas`;
        the tracked processes it holds back from now on (each once: those whose windows
        overlap the frames and that nobody held yet; one held already is held by it too,
        silently, so that its hold outlasts the first holder). Its windows add to those of
        its earlier passes (a pass in slices walks some VMAs at a time, and anchors move
        only with their VMAs: `rescanned`)."""
        frames = merge_frames(frames)
        if not frames:
            return []
        rec = self._procs.get(key)
        if rec is None:
            rec = self._procs[key] = _Record(frames, frozenset(vmas))
        else:
            rec.frames = merge_frames(rec.frames + frames)
            rec.vmas |= frozenset(vmas)
        rec.holders.clear()  # it filled its window: it holds it (the daemon passes no held one)
        taken = []
        for other, r in self._procs.items():
            if other == key or key in r.holders or not tracked(other):
                continue
            window = shared(frames, r.frames)
            if window is not None:
                if not r.holders:
                    taken.append(Taken(key, other, window))
                r.holders.add(key)
        return taken

    def held(self, key: ProcKey) -> bool:
        """Whether `key` gets no ranger pass now."""
        rec = self._procs.get(key)
        return rec is not None and bool(rec.holders)

    def holders(self, key: ProcKey) -> tuple[ProcKey, ...]:
        rec = self._procs.get(key)
        return tuple(sorted(rec.holders)) if rec is not None else ()

    def frames(self, key: ProcKey) -> Frames:
        rec = self._procs.get(key)
        return rec.frames if rec is not None else ()

    def held_keys(self) -> Iterator[ProcKey]:
        return (k for k, r in self._procs.items() if r.holders)

    def rescanned(self, key: ProcKey, vma_starts: Collection[int]) -> list[ProcKey]:
        """A scan of `key` lists VMAs starting at `vma_starts`: when none of the VMAs its
        windows were made for is among them, the kernel freed those anchors with their
        VMAs, so its windows are forgotten (its next pass shows where it anchors now) and
        so are its holds, either way. The processes free again (itself included)."""
        rec = self._procs.get(key)
        if rec is None or not rec.vmas or rec.vmas & frozenset(vma_starts):
            return []
        return self._drop(key)

    def forget(self, pid: int) -> list[ProcKey]:
        """A process gone (or no longer tracked): what it held is free again. The
        processes free again."""
        freed: list[ProcKey] = []
        for key in [k for k in self._procs if k[0] == pid]:
            freed += [k for k in self._drop(key) if k != key]
        return freed

    def _drop(self, key: ProcKey) -> list[ProcKey]:
        rec = self._procs.pop(key)
        freed = [key] if rec.holders else []
        for other, r in self._procs.items():
            if key in r.holders:
                r.holders.discard(key)
                if not r.holders:
                    freed.append(other)
        return freed

    def __len__(self) -> int:
        return len(self._procs)
