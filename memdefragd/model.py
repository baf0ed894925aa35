"""Value types passed between pipeline stages.

Everything here is immutable data: backends produce it, pure functions consume it. Sizes
are bytes unless a name says pages; addresses are virtual byte addresses; `vpn`/`pfn`
are page numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_ORDER = 9
PMD_PAGES = 1 << PMD_ORDER
PMD_SIZE = PAGE_SIZE * PMD_PAGES

# VmFlags (proc(5)) that make MADV_COLLAPSE refuse a VMA: VM_NOHUGEPAGE, and the kernel's
# VM_NO_KHUGEPAGED = VM_SPECIAL (io, de, pf, mm) | VM_HUGETLB (ht).
_NO_COLLAPSE_FLAGS = frozenset({"nh", "ht", "pf", "io", "de", "mm"})


# ---------------------------------------------------------------- names, in one place
# StrEnum: each member is its own string, so comparisons, dict keys, JSON and Prometheus
# label values are exactly today's strings. Declaration order is the order messages list.


class Method(StrEnum):
    """How contiguity is made, whichever backend makes it; `Backend.refusal` says which
    ones a backend carries out."""

    COLLAPSE = "collapse"  # MADV_COLLAPSE, or khugepaged's copy on the simulator
    RANGER = "ranger"  # Translation Ranger, as in its RFC
    RANGER_IMPROVED = "ranger-improved"  # simulator only: cost-chosen anchors
    COMPACTION = "compaction"  # zone compaction


class Mode(StrEnum):
    """What the daemon does with a target's processes."""

    ENFORCE = "enforce"  # measure and defragment
    OBSERVE = "observe"  # measure and export, never move memory


class BackendKind(StrEnum):
    """The machine the daemon talks to."""

    KERNEL = "kernel"
    SIMULATED = "simulated"


class AccessSource(StrEnum):
    """Where region hotness comes from."""

    AUTO = "auto"  # DAMON where usable, else REFERENCED
    DAMON = "damon"
    REFERENCED = "referenced"  # clear_refs + smaps Referenced
    OFF = "off"


class Untouched(StrEnum):
    """What becomes of regions nobody touched in the last access window."""

    SKIP = "skip"  # never collapsed
    LAST = "last"  # queued after everything else


class Heat(StrEnum):
    """The hot/cold class of pending work, a label of the pending-work metrics."""

    HOT = "hot"
    COLD = "cold"
    UNTOUCHED = "untouched"
    UNKNOWN = "unknown"  # not measured yet


class UnmovableLayout(StrEnum):
    """How a simulated machine's unmovable kernel memory lies (backends/sim/aging.py)."""

    SCATTERED = "scattered"  # a few pages in many pageblocks, as fallbacks leave them
    CLUSTERED = "clustered"  # whole unmovable pageblocks


class ProcessGone(Exception):
    """The process exited (or its PID was reused) while we were looking at it."""


class AccessDenied(Exception):
    """The kernel refused to show us this process's memory."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    comm: str
    cmdline: tuple[str, ...]
    exe: str | None
    uid: int
    cgroup: str
    start_time: int  # clock ticks since boot (/proc/PID/stat field 22): identity with pid
    rss: int
    # Minor and major faults and virtual size (stat fields 10, 12, 23): while they and
    # rss stay the same, its page tables did not change but for the kernel's own moves
    # (compaction, khugepaged). None where the backend has no such counts (the simulator).
    activity: tuple[int, int, int] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str
    fields: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    vmflags: frozenset[str] | None = None  # None: kernel did not report VmFlags

    @property
    def size(self) -> int:
        return self.end - self.start

    def field(self, name: str, default: int = 0) -> int:
        """An smaps size field in bytes (or a plain integer such as THPeligible)."""
        return self.fields.get(name, default)

    @property
    def rss(self) -> int:
        return self.field("Rss")

    @property
    def anon_huge(self) -> int:
        return self.field("AnonHugePages")

    @property
    def pmd_mapped(self) -> int:
        """Bytes mapped by PMD-size pages according to the kernel's own smaps counters."""
        return (
            self.field("AnonHugePages") + self.field("ShmemPmdMapped") + self.field("FilePmdMapped")
        )

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and not self.path.startswith("/")

    @property
    def collapse_eligible(self) -> bool:
        """Whether MADV_COLLAPSE could apply: it ignores sysfs policy but not these flags."""
        if self.path in ("[vsyscall]", "[vvar]", "[vdso]", "[vvar_vclock]"):
            return False
        return not (self.vmflags and self.vmflags & _NO_COLLAPSE_FLAGS)


@dataclass(frozen=True, slots=True, eq=False)
class Layout:
    """Present pages of one VMA in virtual order.

    `pfn` is meaningful only when `pfn_known`: without CAP_SYS_ADMIN the kernel reports
    zero for every frame, and contiguity figures computed from that would be fiction.
    `thp` marks pages mapped by a PMD-size huge page.
    """

    start_vpn: int
    end_vpn: int
    vpn: np.ndarray  # uint64, strictly increasing
    pfn: np.ndarray  # uint64
    thp: np.ndarray  # bool
    pfn_known: bool

    @property
    def present_pages(self) -> int:
        return int(self.vpn.size)

    @classmethod
    def join(cls, vma: Vma, windows: list[Layout], visible: bool) -> Layout:
        """One VMA's layout from its windows (in virtual order), as backends read them."""
        start, end = vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT
        if not windows:
            none = np.zeros(0, dtype=np.uint64)
            return cls(start, end, none, none, np.zeros(0, dtype=bool), visible)
        return cls(
            start,
            end,
            np.concatenate([w.vpn for w in windows]),
            np.concatenate([w.pfn for w in windows]),
            np.concatenate([w.thp for w in windows]),
            all(w.pfn_known for w in windows),
        )


@dataclass(frozen=True, slots=True)
class ZoneFree:
    """Free blocks per order of one zone, as /proc/buddyinfo shows them."""

    node: int
    zone: str
    free: tuple[int, ...]  # index = order


@dataclass(frozen=True, slots=True)
class Pressure:
    """One line of /proc/pressure/memory: share of time stalled, in percent."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True, slots=True)
class MemoryState:
    zones: tuple[ZoneFree, ...]
    pagetype_free: Mapping[tuple[int, str, str], tuple[int, ...]] | None  # (node, zone, type)
    vmstat: Mapping[str, int]  # thp_* and compact_* counters
    thp: Mapping[str, str]  # transparent_hugepage knobs
    khugepaged: Mapping[str, str]
    pressure_some: Pressure | None
    pressure_full: Pressure | None
    meminfo: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # bytes

    @property
    def max_ptes_none(self) -> int:
        try:
            return int(self.khugepaged.get("max_ptes_none", PMD_PAGES - 1))
        except ValueError:
            return PMD_PAGES - 1


@dataclass(frozen=True, slots=True)
class PfnVisibility:
    """Whether this process can see physical frame numbers, and if not, why."""

    visible: bool
    reason: str = ""


# ---------------------------------------------------------------- daemon work


@dataclass(frozen=True, slots=True)
class Request:
    """Work for one VMA of one process: 2 MiB-aligned [start, end) byte ranges inside it.

    `start_time` pins the process identity (pid + start time), so that a request is never
    carried out on a process that reused the pid.
    """

    target: str
    pid: int
    start_time: int
    vma_start: int
    vma_end: int
    ranges: tuple[tuple[int, int], ...]
    method: str = Method.COLLAPSE
    benefit: float = 0.0  # expected benefit per byte, as ranked by the scheduler

    @property
    def bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a backend did with a request, as it reports it (before verification).

    `failures` counts 2 MiB regions by reason, each region sent counted once: errno names
    for the kernel (EAGAIN, ENOMEM, EBUSY, EINVAL, ESRCH, EPERM...), UNMAPPED for a region
    the target unmapped since planning, SHORT for a short return; Translation Ranger's
    categories for `ranger`. `stopped` names what ended the request early for the whole
    target or machine (ESRCH: the process is gone; EPERM: not allowed; EBUSY: its cgroup
    is full; ENOMEM: no free huge page; "cancelled": the daemon is stopping), else "".
    `ineligible` lists region start addresses the kernel said will never work (EINVAL).
    `touched`: where the backend worked when that is not the request's ranges (Translation
    Ranger's pass goes its own way through the process): what verification re-reads.
    `frames`: Translation Ranger's anchor windows, the [first, end) frame numbers where the
    pass put (or meant to put) the pages of each VMA it anchored, merged and in order:
    the daemon notices from them when two processes' passes fill the same frames.
    """

    request: Request
    bytes_attempted: int
    bytes_done: int
    failures: Mapping[str, int]
    duration: float  # seconds of wall time spent in the kernel (or simulator)
    stopped: str = ""
    ineligible: tuple[int, ...] = ()
    touched: tuple[tuple[int, int], ...] = ()
    frames: tuple[tuple[int, int], ...] = ()
