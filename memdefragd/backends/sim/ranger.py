"""Translation Ranger on the simulated machine: the RFC's algorithm, and an improved one.

`defrag(machine, pid)` is one complete call of scan_process_memory's defrag action
(action 3 until it returns 0) for one process. With the default `improved=False` it is
the RFC (RFC04 with RFC05's THP rules, or RFC04's own with `Knobs.rfc04`;
docs/simulator.md, "Sources"):

- each eligible VMA gets one anchor (vpn, pfn): `get_undefragged_area` packs the process's
  VMAs back to back in virtual order from the start of the zone of the VMA's first present
  page, the pfn is then raised to be congruent with the vpn modulo 512 (modulo 2^18 for
  VMAs of 1 GiB or more) and clamped into the zone;
- the VMA is walked in 1 GiB regions of 2 MiB chunks; page vpn goes to frame
  anchor_pfn + (vpn - anchor_vpn), by migration when that frame is free and by exchange
  when it holds an anon or page-cache page (of any process); any other destination is a
  hard stop that skips the page and keeps the anchor;
- a chunk that ended with no failure and held no THP is promoted to a THP in place.

Anchors persist between calls, per machine, as the kernel keeps them in the VMA, and, as
in the RFC, only VMAs of the same process keep out of each other's way.

The RFC's known bugs are reproduced only when asked, through `quirks`:
"units" (get_undefragged_area adds the VMA size in bytes to frame numbers, so its gap
checks need a gap 4096 times too large) and "clamp" (the zone clamp steps by
alignment_size / PAGE_SHIFT instead of >> PAGE_SHIFT, breaking the congruence).

`improved=True` answers the question the review left open (what if unmovable pages block
the anchor's range?): see ranger_plan.py.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ...model import PAGE_SHIFT, PAGE_SIZE, PMD_PAGES, ProcessGone
from .machine import MT_UNMOVABLE, NONLRU, UNMOVABLE, Machine, SimProcess, SimVma
from .ranger_engine import PUD_PAGES, RANGER_FAILURES, Placer, Tally
from .ranger_plan import Planner, RangeTree

__all__ = [
    "ISCA_KERNEL",
    "QUIRKS",
    "RANGER_FAILURES",
    "RFC04_KERNEL",
    "Knobs",
    "RangerResult",
    "RangerState",
    "defrag",
]

QUIRKS = frozenset({"units", "clamp"})


@dataclass(frozen=True, slots=True)
class Knobs:
    """The RFC's sysctls that matter here (defaults as in RFC04)."""

    defrag_size_threshold: int = 5  # skip VMAs smaller than this many 2 MiB units
    promote: bool = True  # mem_defrag_promote_thp = 12: promote clean 2 MiB chunks
    # Bytes of the call's log buffer. The kernel vzalloc()s a bounce buffer of the
    # caller's buf_len at the start of every call of action 3 given one and frees it on
    # return: order-0 unmovable pages, taken where the buddy allocator takes them, which
    # can be inside the anchor's window (measured on its kernel with the launcher's 16 MiB:
    # 3,532 of the 4,096 pages of a free window's start, each a hard stop; memdefragd's
    # driver now sizes it to what a call can log, Ranger.log_buffer_len).
    log_buffer: int = 0
    # THP rules: RFC 05's (the ISCA tree: split what cannot move whole) or, with `rfc04`,
    # RFC 04's alone (the February 2019 posting, the kernel tests/ranger boots: never
    # split, THP-THP exchange fails; set promote=False too, RFC 04 has no promotion).
    rfc04: bool = False


# The ISCA'19 tree's rules (RFC 04 with RFC 05's THP handling) at the RFC's defaults,
# and the kernel of tests/ranger's guest: v5.0 with RFC 01/31 and 04/31 only.
ISCA_KERNEL = Knobs()
RFC04_KERNEL = Knobs(promote=False, rfc04=True)


@dataclass(slots=True)
class Anchor:
    """One VMA's anchor: page vma_start+k belongs at frame pfn + (vma_start+k - vpn)."""

    vma_start: int
    vma_end: int
    vpn: int
    pfn: int
    zone: int  # index into machine.zones: destinations outside it are out of bound

    @property
    def pages(self) -> int:
        return self.vma_end - self.vma_start


class RangerState:
    """What persists between calls on one machine: the faithful anchors of each process
    (the kernel keeps them in each VMA) and the improved variant's machine-wide tree."""

    def __init__(self) -> None:
        self.anchors: dict[int, dict[int, Anchor]] = {}  # pid -> vma start -> anchor
        self.tree = RangeTree()
        self.planner = Planner(self.tree)

    def prune(self, machine: Machine) -> None:
        """Forget anchors and reservations of VMAs that no longer exist."""
        alive = {pid: {v.start_vpn for v in p.vmas} for pid, p in machine.processes.items()}
        for pid in list(self.anchors):
            starts = alive.get(pid, set())
            mine = self.anchors[pid]
            for s in [s for s in mine if s not in starts]:
                del mine[s]
            if not mine:
                del self.anchors[pid]
        self.planner.prune(alive)


_STATES: dict[int, tuple[weakref.ref[Machine], RangerState]] = {}


def _forget(key: int, _ref: weakref.ref[Machine]) -> None:
    """A machine was collected: drop its state."""
    _STATES.pop(key, None)


def state_of(machine: Machine) -> RangerState:
    """The machine's RangerState, created on first use and dropped with the machine."""
    key = id(machine)
    entry = _STATES.get(key)
    if entry is None or entry[0]() is not machine:
        st = RangerState()
        _STATES[key] = (weakref.ref(machine, functools.partial(_forget, key)), st)
        return st
    return entry[1]


@dataclass
class RangerResult:
    """What one call did; pages unless named otherwise. `failures` by defrag_result_stats
    category (pages); `anchors` maps (pid, VMA start vpn) to the frame of its first page
    (for the improved variant, of its first segment; `segments` has them all)."""

    pages_migrated: int = 0  # into free frames
    pages_exchanged: int = 0  # pairs swapped with in-use frames
    promoted: int = 0  # 2 MiB chunks made THPs in place
    bytes_copied: int = 0
    aligned: int = 0  # pages found already in place
    chunks: int = 0
    hard_stops: int = 0
    thp_moved: int = 0
    thp_split: int = 0
    vmas: int = 0  # VMAs defragmented
    failures: dict[str, int] = field(default_factory=dict)
    anchors: dict[tuple[int, int], int] = field(default_factory=dict)
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)  # pid, vpn lo, hi, pfn


def defrag(
    machine: Machine,
    pid: int,
    *,
    vma_start_vpn: int | None = None,
    ranges: Iterable[tuple[int, int]] | None = None,
    improved: bool = False,
    quirks: frozenset[str] = frozenset(),
    tree: RangerState | None = None,
    knobs: Knobs = Knobs(),
) -> RangerResult:
    """One defrag call for process `pid`: all its eligible VMAs, or only the one starting
    at `vma_start_vpn`, limited to the vpn `ranges` if given. `tree` is the state shared
    between calls (default: the machine's own). Raises ProcessGone if there is no such
    process."""
    unknown = set(quirks) - QUIRKS
    if unknown:
        raise ValueError(f"unknown quirks {sorted(unknown)} (known: {sorted(QUIRKS)})")
    proc = machine.processes.get(pid)
    if proc is None:
        raise ProcessGone(f"pid {pid}: no such simulated process")
    st = tree if tree is not None else state_of(machine)
    st.prune(machine)
    spans = None if ranges is None else sorted((int(a), int(b)) for a, b in ranges)
    tally = Tally()
    result = RangerResult()
    copied = machine.stats.bytes_copied
    buffer = _log_buffer(machine, knobs.log_buffer)
    try:
        _vmas(machine, proc, vma_start_vpn, spans, improved, quirks, st, tally, knobs, result)
    finally:
        if buffer.size:
            machine.free(buffer)
    result.pages_migrated = tally.migrated
    result.pages_exchanged = tally.exchanged
    result.promoted = tally.promoted
    result.aligned = tally.aligned
    result.chunks = tally.chunks
    result.hard_stops = tally.hard_stops
    result.thp_moved = tally.thp_moved
    result.thp_split = tally.thp_split
    result.failures = {k: tally.failures[k] for k in RANGER_FAILURES if tally.failures[k]}
    result.bytes_copied = machine.stats.bytes_copied - copied
    return result


def _log_buffer(m: Machine, size: int) -> np.ndarray:
    """The kernel's vzalloc(buf_len) for the call: order-0 unmovable frames as the buddy
    hands them out (own pageblocks first, then stolen from the largest free blocks)."""
    pages = -(-size // PAGE_SIZE)
    if pages <= 0:
        return np.zeros(0, dtype=np.int64)
    pfns = m.take(pages, 0, MT_UNMOVABLE)
    m.alloc_at(pfns, UNMOVABLE)
    return pfns


def _vmas(
    machine: Machine,
    proc: SimProcess,
    vma_start_vpn: int | None,
    spans: Sequence[tuple[int, int]] | None,
    improved: bool,
    quirks: frozenset[str],
    st: RangerState,
    tally: Tally,
    knobs: Knobs,
    result: RangerResult,
) -> None:
    for vma in list(proc.vmas):
        if vma_start_vpn is not None and vma.start_vpn != vma_start_vpn:
            continue
        if not _eligible(vma, knobs):
            continue
        todo = _clip(vma, spans)
        if not todo:
            continue
        if improved:
            done = _improved_vma(machine, proc, vma, todo, st, tally, knobs, result)
        else:
            done = _faithful_vma(machine, proc, vma, todo, st, quirks, tally, knobs, result)
        result.vmas += done


def _eligible(vma: SimVma, knobs: Knobs) -> bool:
    """mem_defrag_vma_check: private anonymous memory, not a stack, big enough."""
    anon = "p" in vma.perms and vma.path in ("", "[heap]")
    return anon and vma.pages >= knobs.defrag_size_threshold * PMD_PAGES


def _clip(vma: SimVma, spans: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if spans is None:
        return [(vma.start_vpn, vma.end_vpn)]
    out = []
    for a, b in spans:
        lo, hi = max(a, vma.start_vpn), min(b, vma.end_vpn)
        if lo < hi:
            out.append((lo, hi))
    return out


# ---------------------------------------------------------------- faithful


def _faithful_vma(
    m: Machine,
    proc: SimProcess,
    vma: SimVma,
    todo: list[tuple[int, int]],
    st: RangerState,
    quirks: frozenset[str],
    tally: Tally,
    knobs: Knobs,
    result: RangerResult,
) -> int:
    anchors = st.anchors.setdefault(proc.pid, {})
    a = find_anchor(m, vma, anchors, quirks)
    if a is None:
        return 0  # nothing present: the RFC skips the VMA
    result.anchors[(proc.pid, vma.start_vpn)] = a.pfn + (vma.start_vpn - a.vpn)
    zone = m.zones[a.zone]
    offset = a.pfn - a.vpn

    def dest(vpns: np.ndarray) -> np.ndarray:
        return vpns + offset

    placer = Placer(
        m, proc.pid, vma, dest, (zone.start_pfn, zone.end_pfn), tally,
        promote=knobs.promote, rfc04=knobs.rfc04,
    )  # fmt: skip
    for lo, hi in todo:
        placer.run(lo, hi)
    return 1


def find_anchor(
    m: Machine, vma: SimVma, anchors: dict[int, Anchor], quirks: frozenset[str] = frozenset()
) -> Anchor | None:
    """find_anchor_pages_in_vma: the VMA's anchor, made on first use (None: no page
    present). A VMA that grew up keeps its anchor; one that starts elsewhere is new."""
    a = anchors.get(vma.start_vpn)
    if a is not None:
        a.vma_end = vma.end_vpn
        return a
    present = np.flatnonzero(vma.pfn >= 0)
    if not present.size:
        return None
    zi = int(m.zone_index(int(vma.pfn[present[0]])))
    zone = m.zones[zi]
    pages = vma.pages
    pfn = undefragged_area(zone.start_pfn, anchors, pages, "units" in quirks)
    align = PUD_PAGES if pages >= PUD_PAGES else PMD_PAGES if pages >= PMD_PAGES else 1
    pfn = congruent(pfn, vma.start_vpn, align)
    pfn = clamp(pfn, zone.start_pfn, zone.end_pfn, align, "clamp" in quirks)
    a = Anchor(vma.start_vpn, vma.end_vpn, vma.start_vpn, pfn, zi)
    anchors[vma.start_vpn] = a
    return a


def undefragged_area(
    zone_start: int, anchors: dict[int, Anchor], pages: int, units_bug: bool = False
) -> int:
    """get_undefragged_area (§2.3 step 3): where a new VMA of `pages` pages goes among the
    process's anchored VMAs, in virtual order. May evict the first anchor (RFC04)."""
    size = pages * PAGE_SIZE if units_bug else pages  # the bug: bytes added to pfns
    placed = sorted(anchors.values(), key=lambda a: a.vma_start)
    if not placed:
        return zone_start
    first = placed[0]
    if zone_start + size < first.pfn:
        return zone_start
    if pages > 2 * first.pages:  # a much bigger VMA takes the first one's place
        del anchors[first.vma_start]
        placed = placed[1:]
    for i, a in enumerate(placed):
        end = a.pfn + a.pages
        if i + 1 == len(placed) or end + size < placed[i + 1].pfn:
            return end
    return zone_start


def congruent(pfn: int, vpn: int, align: int) -> int:
    """The smallest frame >= pfn with the vpn's offset inside the alignment unit, so that
    aligned 2 MiB (1 GiB) chunks land on aligned blocks and can be promoted in place."""
    if align <= 1:
        return pfn
    if vpn % align < pfn % align:
        pfn += align
    return pfn - pfn % align + vpn % align


def clamp(pfn: int, lo: int, hi: int, align: int, shift_bug: bool = False) -> int:
    """The zone clamp: step back (forth) by the alignment until inside [lo, hi). The bug
    divides the alignment in bytes by PAGE_SHIFT (12) instead of shifting by it."""
    step = (align * PAGE_SIZE) // PAGE_SHIFT if shift_bug else align
    while pfn >= hi:
        pfn -= step
    while pfn < lo:
        pfn += step
    return pfn


# ---------------------------------------------------------------- improved


def _improved_vma(
    m: Machine,
    proc: SimProcess,
    vma: SimVma,
    todo: list[tuple[int, int]],
    st: RangerState,
    tally: Tally,
    knobs: Knobs,
    result: RangerResult,
) -> int:
    plan = st.planner.plan(m, proc, vma)
    if plan is None:
        return 0
    first = plan.first_pfn()
    if first is not None:
        result.anchors[(proc.pid, vma.start_vpn)] = first
    # Relocate before moving anything: a destination that became an obstacle since the
    # plan was made (a new kernel allocation) gets the rest of its segment placed anew.
    for lo, hi in todo:
        vpns = np.arange(lo, hi, dtype=np.int64)
        vpns = vpns[vma.pfn[lo - vma.start_vpn : hi - vma.start_vpn] >= 0]
        d = plan.dest(vpns)
        k = m.kind[np.maximum(d, 0)]
        blocked = vpns[(d >= 0) & ((k == UNMOVABLE) | (k == NONLRU))]
        if blocked.size:
            st.planner.relocate(m, proc, vma, plan, blocked)
    placer = Placer(
        m, proc.pid, vma, plan.dest, (0, m.nframes), tally,
        promote=knobs.promote, keep_thp=True, split_any=True,
    )  # fmt: skip
    for lo, hi in todo:
        placer.run(lo, hi)
    result.segments.extend((proc.pid, lo, hi, p) for lo, hi, p in plan.segments())
    return 1
