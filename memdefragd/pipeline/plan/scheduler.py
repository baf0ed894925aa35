"""Which collapse request goes next, and whether anything may go now: the daemon's policy.

The pipeline's *plan* stage (docs/architecture.md). Pure: no I/O and no clock; the caller
passes the time (`now`, seconds on a monotonic clock) into every call, so tests run on a
fake clock and the simulator replays deterministically.

The policy, and where each part comes from:

- **Ranking** by expected benefit per byte moved (`benefit_per_byte`): a region is worth the
  TLB reach it buys, weighted by its target's priority and its hotness, divided by what the
  collapse costs. Like HawkEye (ASPLOS 2019) we promote the regions with most to gain
  first, across processes; unlike khugepaged (mm/khugepaged.c), which is plain round robin.
- **Budgets** like DAMOS quotas (the kernel's Documentation/mm/damon/design.rst) and
  khugepaged's pages_to_scan: a bytes-per-second token bucket with a burst of one chunk,
  and a cap on the share of one core spent over a sliding window, in the kernel collapsing
  and in the daemon's own watching (`charge`). Bytes bound memory bandwidth and
  allocations; CPU time catches the expensive case bytes cannot see (direct compaction or
  reclaim inside the huge page allocation), and a heavy scan cycle.
- **Pacing** per latency-sensitive target (`pacing.py`): one 2 MiB region per request and
  a rest after each, proportional to the call's measured duration, so that the target
  spends at most its duty cycle with a collapse in progress. The budgets still apply.
- **Access and regressions**: a region's hotness (HawkEye's access coverage, measured by
  DAMON or the Referenced fallback) multiplies its benefit, so hot regions go first and
  cold ones wait; a region nobody touched is skipped (or, configured, queued last).
  Regions that were huge and were split again (a fork's copy-on-write, a purge) are
  `urgent`: worth URGENT_BOOST times more, like four steps of target priority.
- **Errno reactions** from MADV_COLLAPSE's contract (madvise(2)): EAGAIN and EBUSY back the
  target off exponentially; ENOMEM backs the whole machine off (no free huge page for
  anyone, as khugepaged sleeps alloc_sleep_millisecs); EINVAL marks the region ineligible
  for the life of the process; ESRCH (gone) and EPERM (not allowed) drop the process's
  queued work.
- **Pressure**: pause while PSI memory "some" avg10 or MemAvailable says memory is tight,
  since each collapse allocates a huge page and may reclaim or compact to get it (DAMOS
  watermarks and quota goals on some_mem_psi_us, 4.2); resume by itself when it clears.

A process is known by (pid, start_time), so that nothing learned about one process (an
ineligible region, a refusal) leaks to a later one that reuses its pid.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from ...model import PAGE_SIZE, PMD_PAGES, PMD_SIZE, Heat, MemoryState, Mode, Outcome, Request, Vma
from ..scan import collapsible_regions
from ..score import VmaMetrics
from ..targets import Target
from .pacing import Pacer

__all__ = [
    "MAX_CHUNK",
    "Candidate",
    "Reaction",
    "Scheduler",
    "SchedulerSettings",
    "SchedulerState",
    "benefit_per_byte",
    "heat_of",
    "merge_ranges",
    "pause_kinds",
    "pressure_reason",
    "priority_weight",
    "reaction",
    "region_cost",
    "region_gain",
]

MiB = 1 << 20
GiB = 1 << 30
MAX_CHUNK = 64 * MiB
MODES = tuple(m.value for m in Mode)

# Reactions to an outcome's errno names (MADV_COLLAPSE's errors, madvise(2)).
TARGET_BACKOFF = frozenset({"EAGAIN", "EBUSY"})  # transient, or this target's cgroup is full
MACHINE_BACKOFF = "ENOMEM"  # no free huge page: nobody can collapse until memory frees up
GONE = "ESRCH"
DENIED = "EPERM"


class Reaction(enum.Enum):
    """What the daemon does about a request that stopped early, besides the scheduler's own
    reaction (`Scheduler.record`): see `reaction`."""

    NONE = "none"
    FORGET = "forget"  # GONE: the process exited: forget it (a race, counted)
    DENIED = "denied"  # DENIED: not allowed: say what the daemon needs, once per process
    COMPACT = "compact"  # MACHINE_BACKOFF, with compaction on: ask for a free 2 MiB block


def reaction(stopped: str, *, compaction: bool) -> Reaction:
    """What an outcome's `stopped` (an errno name, or "") asks of the daemon."""
    if stopped == GONE:
        return Reaction.FORGET
    if stopped == DENIED:
        return Reaction.DENIED
    if stopped == MACHINE_BACKOFF and compaction:
        return Reaction.COMPACT
    return Reaction.NONE


# Regressed regions (huge once, split since) outrank fresh ones of the same target: 16x is
# four priority steps, more than any hotness or fill difference short of a tenfold one.
URGENT_BOOST = 16.0
# With untouched regions queued last (`collapse_untouched`), their hotness counts as this:
# below any touched region's (one page in 512 accessed is 0.002).
UNTOUCHED_HOTNESS = 1e-4
# Hot/cold split of pending work, for metrics: at least half the pages of a region accessed
# in the last window is hot (HawkEye buckets access coverage; one cut is enough for a gauge).
HOT = 0.5
HEATS = tuple(Heat)

# Priorities beyond this act as strict precedence anyway (2**10 > 512, see priority_weight);
# clamping keeps 2.0**priority finite for any integer a config may hold.
_PRIORITY_CLAMP = 64

ProcKey = tuple[int, int]  # (pid, start_time): one process, never a reused pid


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Budgets and reactions. Defaults match the daemon section of memdefragd.yaml.

    - bytes_per_second = 256 MiB/s: 128 collapses a second, each copying at most 2 MiB: a
      few percent of one channel's memory bandwidth, so neighbours do not notice, while a
      64 GiB heap is converted in about four minutes.
    - cpu_share = 0.1 of one core over cpu_window = 10 s: a collapse normally costs well
      under a millisecond, so the byte budget binds first; this cap is what stops us when
      the kernel has to compact or reclaim for every huge page, or when watching (a scan
      cycle's CPU time is charged too) grows heavy. 10 s matches PSI's avg10 and
      khugepaged's scan_sleep_millisecs.
    - chunk_bytes = 64 MiB (at most 64 MiB, a multiple of 2 MiB): 32 regions per
      process_madvise call amortise the syscall and pidfd work, yet one call takes only
      milliseconds, so pauses, signals and budgets take effect between chunks. Latency-
      sensitive targets get a smaller chunk in `chunk_by_target`.
    - cooldown = 0 s: the budgets already pace the work; a per-target rest (for example in
      `cooldown_by_target`) gives a target whose mmap lock we keep taking time to breathe.
    - backoff_initial = 5 s, doubling up to backoff_max = 600 s: hundreds of requests'
      worth of rest, so a failing target really stops, yet a one-off EAGAIN (a page locked
      for I/O) costs little; the fifth failure in a row waits 80 s, past khugepaged's 60 s
      alloc_sleep, and ten minutes bounds how long a recovered target waits.
    - psi_some_avg10 = 10 %: at least one task stalled on memory a tenth of the time means
      memory is the bottleneck; our allocations would make it worse.
    - min_available_bytes = 1 GiB: each chunk may take 64 MiB of huge pages at once; a
      gigabyte keeps us far above the kernel's watermarks (min_free_kbytes is typically
      tens of MiB), so a collapse never pushes the machine into direct reclaim.
    - duty_cycle = None (unpaced) here, per target in `duty_by_target` (None there too:
      unpaced): the daemon fills both from its config, whose default paces every target
      at 10% (config.py says why). A paced target gets one 2 MiB region per request.
    - max_pause = 1 s: the longest rest after one call (pacing.pace_delay).
    - collapse_untouched = False: a region with hotness 0 (nobody touched it in the last
      access window) is not queued at all; True queues it after everything else.
    """

    bytes_per_second: int = 256 * MiB
    cpu_share: float = 0.1
    cpu_window: float = 10.0
    chunk_bytes: int = MAX_CHUNK
    cooldown: float = 0.0
    backoff_initial: float = 5.0
    backoff_max: float = 600.0
    psi_some_avg10: float = 10.0
    min_available_bytes: int = GiB
    # Per-target replacements (config `overrides:`), by target name.
    chunk_by_target: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    cooldown_by_target: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    duty_cycle: float | None = None
    duty_by_target: Mapping[str, float | None] = field(default_factory=lambda: MappingProxyType({}))
    max_pause: float = 1.0
    collapse_untouched: bool = False

    def __post_init__(self) -> None:
        if self.bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be positive, got {self.bytes_per_second}")
        if not 0 < self.cpu_share <= 1:
            raise ValueError(f"cpu_share is a fraction of one core in (0, 1], got {self.cpu_share}")
        if self.cpu_window <= 0:
            raise ValueError(f"cpu_window must be positive seconds, got {self.cpu_window}")
        _check_chunk("chunk_bytes", self.chunk_bytes)
        for name, chunk in self.chunk_by_target.items():
            _check_chunk(f"chunk_by_target[{name!r}]", chunk)
        for name, value in [("cooldown", self.cooldown), *self.cooldown_by_target.items()]:
            if value < 0:
                raise ValueError(f"cooldown {name!r} must not be negative, got {value}")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError(
                f"need 0 < backoff_initial <= backoff_max, got {self.backoff_initial} and "
                f"{self.backoff_max}"
            )
        if not 0 <= self.psi_some_avg10 <= 100:
            raise ValueError(f"psi_some_avg10 is a percentage, got {self.psi_some_avg10}")
        if self.min_available_bytes < 0:
            raise ValueError(
                f"min_available_bytes must not be negative: {self.min_available_bytes}"
            )
        for name, duty in [("duty_cycle", self.duty_cycle), *self.duty_by_target.items()]:
            if duty is not None and not 0 < duty <= 1:
                raise ValueError(f"duty cycle {name!r} must be in (0, 1], got {duty}")
        if self.max_pause < 0:
            raise ValueError(f"max_pause must not be negative, got {self.max_pause}")

    def duty_for(self, target: str) -> float | None:
        """The target's duty cycle, None when it is not paced."""
        return self.duty_by_target.get(target, self.duty_cycle)

    def chunk_for(self, target: str) -> int:
        if self.duty_for(target) is not None:
            return PMD_SIZE  # paced: one region per request, a rest after each
        return self.chunk_by_target.get(target, self.chunk_bytes)

    def cooldown_for(self, target: str) -> float:
        return self.cooldown_by_target.get(target, self.cooldown)

    @property
    def burst(self) -> int:
        """Token bucket size: one chunk, the largest any target uses, so every request fits."""
        return max([self.chunk_bytes, *self.chunk_by_target.values()])

    @property
    def cpu_limit(self) -> float:
        """Seconds of CPU time (collapsing and watching) allowed per cpu_window."""
        return self.cpu_share * self.cpu_window


def _check_chunk(name: str, chunk: int) -> None:
    if not (PMD_SIZE <= chunk <= MAX_CHUNK and chunk % PMD_SIZE == 0):
        raise ValueError(
            f"{name} must be a multiple of 2 MiB between 2 MiB and 64 MiB, got {chunk} bytes"
        )


# ------------------------------------------------------------------------------ candidates


@dataclass(frozen=True, slots=True, eq=False)
class Candidate:
    """The collapsible regions of one VMA of one process, as the scan found them.

    `regions` are 2 MiB-aligned byte addresses (uint64) of regions fully inside
    [vma_start, vma_end); `present` their present pages. `hotness` is a per-region weight,
    None for unknown (counted as 1.0): HawkEye's access coverage, the share of the region's
    pages accessed in the last access window (0 to 1). `urgent` marks regions that were
    huge once and were split since (fork copy-on-write, a purge): see URGENT_BOOST.
    """

    target: str
    priority: int
    mode: str
    pid: int
    start_time: int
    vma_start: int
    vma_end: int
    regions: np.ndarray
    present: np.ndarray
    hotness: np.ndarray | None = None
    urgent: np.ndarray | None = None

    def __post_init__(self) -> None:
        regions = np.asarray(self.regions, dtype=np.uint64).reshape(-1)
        present = np.asarray(self.present, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "present", present)
        where = f"target {self.target!r} pid {self.pid} VMA {self.vma_start:#x}-{self.vma_end:#x}"
        if self.mode not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}, got {self.mode!r}")
        if present.size != regions.size:
            raise ValueError(f"{where}: {regions.size} regions but {present.size} present counts")
        if np.any(regions % np.uint64(PMD_SIZE)):
            raise ValueError(f"{where}: region addresses must be 2 MiB-aligned bytes (not vpns)")
        if regions.size and (
            int(regions.min()) < self.vma_start or int(regions.max()) + PMD_SIZE > self.vma_end
        ):
            raise ValueError(f"{where}: a region lies outside the VMA")
        if np.unique(regions).size != regions.size:
            raise ValueError(f"{where}: duplicate regions")
        if np.any((present < 0) | (present > PMD_PAGES)):
            raise ValueError(f"{where}: present pages must be within 0..{PMD_PAGES}")
        if self.hotness is not None:
            hot = np.asarray(self.hotness, dtype=np.float64).reshape(-1)
            object.__setattr__(self, "hotness", hot)
            if hot.size != regions.size or not np.all(np.isfinite(hot) & (hot >= 0)):
                raise ValueError(f"{where}: hotness needs one finite value >= 0 per region")
        if self.urgent is not None:
            urgent = np.asarray(self.urgent, dtype=bool).reshape(-1)
            object.__setattr__(self, "urgent", urgent)
            if urgent.size != regions.size:
                raise ValueError(f"{where}: urgent needs one flag per region")

    @property
    def key(self) -> ProcKey:
        return (self.pid, self.start_time)

    @classmethod
    def from_metrics(
        cls,
        target: Target,
        pid: int,
        start_time: int,
        vma: Vma,
        metrics: VmaMetrics,
        hotness: np.ndarray | None = None,
        urgent: np.ndarray | None = None,
    ) -> Candidate:
        """From a VMA's metrics collected with VmaAccumulator(collect=True)."""
        if metrics.collapsible_vpns is None or metrics.collapsible_present is None:
            raise ValueError(
                "VmaMetrics lacks region lists: scan with VmaAccumulator(collect=True)"
            )
        return cls(
            target=target.name,
            priority=target.priority,
            mode=target.mode,
            pid=pid,
            start_time=start_time,
            vma_start=vma.start,
            vma_end=vma.end,
            regions=collapsible_regions(metrics),
            present=metrics.collapsible_present,
            hotness=hotness,
            urgent=urgent,
        )


# ------------------------------------------------------------------------------ benefit


def priority_weight(priority: int) -> float:
    """2**priority: each step doubles what a target's regions are worth.

    One step makes a half-full region of the higher priority tie a full one of the lower;
    ten steps (1024x) are strict precedence, since within one priority the benefit of two
    regions differs by at most 512x (1 to 512 present pages). Negative priorities work too.
    """
    return 2.0 ** max(-_PRIORITY_CLAMP, min(_PRIORITY_CLAMP, priority))


def region_gain(
    present: np.ndarray,
    priority: int,
    hotness: np.ndarray | None,
    urgent: np.ndarray | None = None,
) -> np.ndarray:
    """Bytes of TLB reach bought per region, weighted: `present` pages now behind one entry.

    Pages that were not present gain nothing: they were never touched through the TLB.
    Hotness scales the gain (a TLB entry nobody looks up buys nothing); urgent regions
    (split again since they were huge) count URGENT_BOOST times.
    """
    reach = np.asarray(present, dtype=np.float64) * PAGE_SIZE * priority_weight(priority)
    if hotness is not None:
        reach = reach * np.asarray(hotness, dtype=np.float64)
    if urgent is not None:
        reach = np.where(np.asarray(urgent, dtype=bool), reach * URGENT_BOOST, reach)
    return reach


def heat_of(hotness: float | None) -> Heat:
    """The hot/cold class of a hotness (one of HEATS), for the pending-work metrics."""
    if hotness is None:
        return Heat.UNKNOWN
    if hotness <= 0:
        return Heat.UNTOUCHED
    return Heat.HOT if hotness >= HOT else Heat.COLD


def region_cost(present: np.ndarray) -> np.ndarray:
    """Bytes a collapse of each region costs: pages copied plus pages zero-filled.

    The copy moves the present pages; the zero-fill adds memory the process never asked for
    (the bloat HawkEye guards against). Both are 4 KiB pages, so today they always sum to
    one 2 MiB region, which is also what the byte budget charges. Keeping the two terms
    apart is where a heavier price on bloat would go.
    """
    present = np.asarray(present, dtype=np.float64)
    copied = present * PAGE_SIZE
    zero_filled = (PMD_PAGES - present) * PAGE_SIZE
    cost: np.ndarray = copied + zero_filled
    return cost


def benefit_per_byte(
    present: np.ndarray,
    priority: int = 0,
    hotness: np.ndarray | None = None,
    urgent: np.ndarray | None = None,
) -> np.ndarray:
    """Expected benefit per byte moved, per region: region_gain / region_cost.

    A full region of a priority-0 target with unknown hotness scores 1.0 (each byte moved
    buys one byte of TLB reach); a region with 128 of 512 pages present scores 0.25.
    """
    ratio: np.ndarray = region_gain(present, priority, hotness, urgent) / region_cost(present)
    return ratio


def merge_ranges(starts: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Adjacent 2 MiB regions as [start, end) byte ranges: fewer iovecs for process_madvise."""
    s = np.sort(np.asarray(starts, dtype=np.uint64))
    if s.size == 0:
        return ()
    breaks = np.flatnonzero(np.diff(s) != np.uint64(PMD_SIZE)) + 1
    firsts = np.concatenate(([0], breaks))
    lasts = np.concatenate((breaks - 1, [s.size - 1]))
    return tuple((int(a), int(b) + PMD_SIZE) for a, b in zip(s[firsts], s[lasts], strict=True))


def _requests_of(
    c: Candidate, keep: np.ndarray, chunk: int, untouched_last: bool = False
) -> list[tuple[Request, dict[str, int]]]:
    """One VMA's kept regions, best first, grouped into requests of at most `chunk` bytes,
    each with its bytes by heat class (HEATS).

    The best regions go into the first request, so a VMA's first request is its best one;
    regions of equal benefit go in address order, so plans are reproducible.
    """
    regions, present = c.regions[keep], c.present[keep]
    hot = None if c.hotness is None else c.hotness[keep]
    urgent = None if c.urgent is None else c.urgent[keep]
    weight = hot if hot is None or not untouched_last else np.maximum(hot, UNTOUCHED_HOTNESS)
    gain, cost = region_gain(present, c.priority, weight, urgent), region_cost(present)
    order = np.lexsort((regions, -(gain / cost)))
    per = chunk // PMD_SIZE
    out = []
    for i in range(0, order.size, per):
        g = order[i : i + per]
        heat: dict[str, int] = {}
        for h in [None] * g.size if hot is None else hot[g].tolist():
            name = heat_of(h)
            heat[name] = heat.get(name, 0) + PMD_SIZE
        out.append((
            Request(
                target=c.target,
                pid=c.pid,
                start_time=c.start_time,
                vma_start=c.vma_start,
                vma_end=c.vma_end,
                ranges=merge_ranges(regions[g]),
                method="collapse",
                benefit=float(gain[g].sum() / cost[g].sum()),
            ),
            heat,
        ))  # fmt: skip
    return out


# ------------------------------------------------------------------------------ pressure


def pressure_reason(state: MemoryState, settings: SchedulerSettings) -> str | None:
    """Why memory is too tight to collapse now, or None. Missing data never pauses.

    (A kernel without PSI or a meminfo without MemAvailable must not stop the daemon for
    good; the errno reactions still protect the machine there.)
    """
    reasons = []
    some = state.pressure_some
    if some is not None and some.avg10 > settings.psi_some_avg10:
        reasons.append(f"PSI memory some avg10 {some.avg10:g}% > {settings.psi_some_avg10:g}%")
    available = state.meminfo.get("MemAvailable")
    if available is not None and available < settings.min_available_bytes:
        reasons.append(
            f"MemAvailable {available / MiB:.0f} MiB < {settings.min_available_bytes / MiB:.0f} MiB"
        )
    return "; ".join(reasons) or None


def pause_kinds(reason: str | None) -> tuple[str, ...]:
    """What a pause reason is about, without its figures: for each "; "-separated part, its
    words before any ":" and up to the first figure ("PSI memory some avg10 25% > 10%" ->
    "PSI memory some avg10", "MemAvailable 512 MiB < 1024 MiB" -> "MemAvailable"). The
    figures move with every reading; the kinds change only when the cause does, which is
    when a pause is worth a log line."""
    kinds = []
    for part in (reason or "").split("; "):
        if not part.strip():
            continue
        words = []
        for word in part.split(":", 1)[0].split():
            if word[0].isdigit():
                break
            words.append(word)
        kinds.append(" ".join(words))
    return tuple(kinds)


# ------------------------------------------------------------------------------ budgets


class _TokenBucket:
    """Bytes per second with a burst: full at first use, refilled continuously.

    Bytes are reserved when a request is handed out (so several outstanding requests cannot
    overdraw) and settled to what the backend attempted when its outcome is recorded. Hence
    the bytes attempted over any span never exceed rate * span + capacity.
    """

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.tokens = capacity
        self.stamp: float | None = None

    def refill(self, now: float) -> None:
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        if self.stamp is None or now > self.stamp:  # a clock going back refills nothing
            self.stamp = now

    def adjust(self, delta: float) -> None:
        self.tokens = min(self.capacity, self.tokens + delta)


class _CpuWindow:
    """CPU time per sliding window (the kernel's, collapsing, and the daemon's own,
    watching); admits work while the window's total is below limit.

    Each outcome counts, whole, until `window` seconds after it was recorded. One request can
    overshoot the limit by its own duration, which the chunk size bounds.
    """

    def __init__(self, window: float, limit: float):
        self.window, self.limit = window, limit
        self.spent: deque[tuple[float, float]] = deque()  # (recorded at, seconds)

    def used(self, now: float) -> float:
        while self.spent and self.spent[0][0] <= now - self.window:
            self.spent.popleft()
        return sum(d for _, d in self.spent)

    def add(self, now: float, seconds: float) -> None:
        if seconds > 0:
            self.spent.append((now, seconds))


@dataclass(slots=True)
class _Backoff:
    """Exponential: backoff_initial after the first failure, doubling, up to backoff_max."""

    streak: int = 0
    until: float = float("-inf")

    def fail(self, now: float, initial: float, maximum: float) -> None:
        self.streak += 1
        self.until = now + min(maximum, initial * 2.0 ** min(self.streak - 1, 64))

    def reset(self) -> None:
        self.streak, self.until = 0, float("-inf")


# ------------------------------------------------------------------------------ scheduler


@dataclass(frozen=True, slots=True)
class SchedulerState:
    """A snapshot for metrics and `memdefragd status`."""

    paused: str | None  # reason, None when running
    why_idle: str  # "" if the last next_request handed out work
    tokens: float  # bytes that may start now
    cpu_used: float  # kernel seconds in the current window
    cpu_limit: float  # kernel seconds allowed per window
    queue_length: int
    queue_bytes: int
    planned_observe_bytes: Mapping[str, int]  # by target: work observe mode left undone
    backoff_until: Mapping[str, float]  # by target, only those still backing off
    machine_backoff_until: float | None  # ENOMEM, None when not backing off
    cooldown_until: Mapping[str, float]  # by target, only those still resting
    denied: frozenset[ProcKey]  # EPERM since the last plan
    pacing_until: Mapping[str, float]  # by paced target, only those resting now
    pending: Mapping[tuple[str, str], int]  # (target, heat) -> bytes queued (HEATS)
    untouched: Mapping[str, int]  # by target: bytes not queued, nobody touched them


_Entry = tuple[float, str, int, int, int, int, Request]  # heap order, then the request
_Work = tuple[int, int, int, tuple[tuple[int, int], ...]]  # (pid, start_time, vma, ranges)


def _work(r: Request) -> _Work:
    """What a request covers, whatever the executor changed in it (method, say)."""
    return (r.pid, r.start_time, r.vma_start, r.ranges)


class Scheduler:
    """The request queue and everything that decides whether its head may run.

    Call `plan` after each scan, `pressure` whenever memory state is read, then loop:
    `next_request` -> execute -> `record`. `why_idle` says why `next_request` gave nothing;
    the part before any ":" is a fixed vocabulary fit for a metric label: empty, paused,
    backoff, cooldown, pacing, budget. `next_ready` says when waiting may end.
    """

    def __init__(self, settings: SchedulerSettings | None = None):
        self.settings = settings or SchedulerSettings()
        s = self.settings
        self._bytes = _TokenBucket(s.bytes_per_second, s.burst)
        self._cpu = _CpuWindow(s.cpu_window, s.cpu_limit)
        self._queue: list[_Entry] = []
        self._queue_bytes = 0
        self._seq = 0
        self._reserved: dict[_Work, int] = {}  # bytes taken at dispatch, until recorded
        self._cooldown_until: dict[str, float] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._machine = _Backoff()
        self._ineligible: dict[ProcKey, set[int]] = {}
        self._denied: set[ProcKey] = set()
        self._gone: set[ProcKey] = set()
        self._observe: dict[str, int] = {}
        self._pressure: str | None = None
        self._manual: str | None = None
        self.pacer = Pacer(s.max_pause)
        self._heat: dict[int, dict[str, int]] = {}  # seq -> bytes by heat, while queued
        self._pending: dict[tuple[str, str], int] = {}  # (target, heat) -> bytes queued
        self._untouched: dict[str, int] = {}  # by target: bytes the last plan left out
        self.why_idle = "empty"

    # ---------------------------------------------------------------- planning

    def plan(self, candidates: Iterable[Candidate], now: float) -> None:
        """Replace the queue with requests for these candidates, best first.

        Observe-mode targets are counted, never queued. Regions the kernel called ineligible
        for that process, and processes that are gone, are skipped. EPERM refusals are
        forgotten: a new plan tries those processes again (credentials and capabilities
        change, and one refused call per plan is cheap).
        """
        self._bytes.refill(now)
        self._prune(now)
        self._denied.clear()
        self._queue, self._queue_bytes, self._observe = [], 0, {}
        self._heat, self._pending, self._untouched = {}, {}, {}
        untouched_last = self.settings.collapse_untouched
        for c in candidates:
            if c.key in self._gone:
                continue
            keep = self._plannable(c)
            if c.hotness is not None and not untouched_last:
                cold = keep & (c.hotness <= 0)
                n = int(np.count_nonzero(cold))
                if n:
                    self._untouched[c.target] = self._untouched.get(c.target, 0) + n * PMD_SIZE
                keep &= ~cold
            if c.mode == Mode.OBSERVE:
                n = int(np.count_nonzero(keep))
                self._observe[c.target] = self._observe.get(c.target, 0) + n * PMD_SIZE
                continue
            for r, heat in _requests_of(c, keep, self.settings.chunk_for(c.target), untouched_last):
                self._push(r, heat)

    def _plannable(self, c: Candidate) -> np.ndarray:
        """Regions worth a request: not known ineligible, and with something present."""
        keep = c.present > 0  # the kernel refuses a region with nothing present
        bad = self._ineligible.get(c.key)
        if bad:
            keep &= ~np.isin(c.regions, np.fromiter(bad, np.uint64, len(bad)))
        return keep

    def _push(self, r: Request, heat: Mapping[str, int] | None = None) -> None:
        self._seq += 1
        first = r.ranges[0][0] if r.ranges else 0
        heapq.heappush(
            self._queue, (-r.benefit, r.target, r.pid, r.start_time, first, self._seq, r)
        )
        self._queue_bytes += r.bytes
        heat = dict(heat) if heat else {Heat.UNKNOWN: r.bytes}
        self._heat[self._seq] = heat
        self._count(r.target, heat, +1)

    def _count(self, target: str, heat: Mapping[str, int], sign: int) -> None:
        for name, n in heat.items():
            key = (target, name)
            left = self._pending.get(key, 0) + sign * n
            if left:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)

    def _taken(self, entry: _Entry) -> None:
        """An entry left the queue for good: uncount it."""
        self._queue_bytes -= entry[-1].bytes
        heat = self._heat.pop(entry[5], None)
        if heat:
            self._count(entry[1], heat, -1)

    def _drop(self, keep: Iterable[_Entry]) -> None:
        self._queue = list(keep)
        heapq.heapify(self._queue)
        self._queue_bytes = sum(e[-1].bytes for e in self._queue)
        self._heat = {e[5]: self._heat[e[5]] for e in self._queue if e[5] in self._heat}
        self._pending = {}
        for e in self._queue:
            self._count(e[1], self._heat.get(e[5], {}), +1)

    def _prune(self, now: float) -> None:
        """Forget expired rests so the per-target maps stay as small as the target list."""
        self._cooldown_until = {t: u for t, u in self._cooldown_until.items() if u > now}

    # ---------------------------------------------------------------- dispatch

    def next_request(self, now: float) -> Request | None:
        """The best request allowed now, taken off the queue; else None and `why_idle`."""
        self._bytes.refill(now)
        request, self.why_idle = self._select(now)
        if request is not None:
            self._bytes.adjust(-request.bytes)
            key = _work(request)
            self._reserved[key] = self._reserved.get(key, 0) + request.bytes
        return request

    def _select(self, now: float) -> tuple[Request | None, str]:
        paused = self.paused
        if paused is not None:
            return None, f"paused: {paused}"
        if self._machine.until > now:
            return None, f"backoff: {MACHINE_BACKOFF}"
        if not self._queue:
            return None, "empty"
        if self._cpu.used(now) >= self._cpu.limit:
            return None, "budget: cpu"
        blocked = {self._blocked(t, now) for t, _ in self._pending}
        if "" not in blocked and self._pending:  # every target rests: no need to look
            return None, next(w for w in ("backoff", "cooldown", "pacing") if w in blocked)
        skipped: list[_Entry] = []  # targets resting: put back, keep looking
        try:
            while self._queue:
                entry = heapq.heappop(self._queue)
                request = entry[-1]
                if self._blocked(request.target, now):
                    skipped.append(entry)
                    continue
                if request.bytes > self._bytes.tokens:
                    skipped.append(entry)  # no smaller request jumps ahead: big ones would starve
                    return None, "budget: bytes"
                self._taken(entry)
                return request, ""
            why = {self._blocked(e[-1].target, now) for e in skipped}
            return None, next(w for w in ("backoff", "cooldown", "pacing") if w in why)
        finally:
            for e in skipped:
                heapq.heappush(self._queue, e)

    def _blocked(self, target: str, now: float) -> str:
        b = self._backoff.get(target)
        if b is not None and b.until > now:
            return "backoff"
        if self._cooldown_until.get(target, float("-inf")) > now:
            return "cooldown"
        if self.pacer.resting(target, now):
            return "pacing"
        return ""

    def next_ready(self, now: float) -> float | None:
        """When the queue head could next be handed out, judging by rests and budgets; None
        when the queue is empty or only a pause (pressure, ENOMEM backoff) holds it.

        A hint for how long the caller may sleep: waking earlier costs a look, later costs
        pace (a 10% duty cycle rests 9 ms after a 1 ms call).
        """
        if not self._queue or self.paused is not None or self._machine.until > now:
            return None
        times = []
        for target in {e[1] for e in self._queue}:
            b = self._backoff.get(target)
            times.append(
                max(
                    b.until if b is not None else float("-inf"),
                    self._cooldown_until.get(target, float("-inf")),
                    self.pacer.until(target),
                )
            )
        ready = max(now, min(times))
        self._bytes.refill(now)
        head = self._queue[0][-1].bytes
        if head > self._bytes.tokens:
            ready = max(ready, now + (head - self._bytes.tokens) / self._bytes.rate)
        if self._cpu.used(now) >= self._cpu.limit and self._cpu.spent:
            ready = max(ready, self._cpu.spent[0][0] + self._cpu.window)
        return ready

    # ---------------------------------------------------------------- outcomes

    def record(self, outcome: Outcome, now: float) -> None:
        """Charge the budgets and react to what the backend reported (errnos: madvise(2))."""
        r, s = outcome.request, self.settings
        key = (r.pid, r.start_time)
        self._settle(outcome, now)
        self._cooldown_until[r.target] = max(
            self._cooldown_until.get(r.target, float("-inf")), now + s.cooldown_for(r.target)
        )
        duty = s.duty_for(r.target)
        if duty is not None:
            self.pacer.record(r.target, outcome.duration, duty, now)
        if outcome.stopped == GONE:
            self._gone.add(key)
            self._ineligible.pop(key, None)
            self._drop(e for e in self._queue if (e[2], e[3]) != key)
            return
        if outcome.stopped == DENIED:
            self._denied.add(key)
            self._drop(e for e in self._queue if (e[2], e[3]) != key)
        if outcome.ineligible:
            self._ineligible.setdefault(key, set()).update(outcome.ineligible)
        self._react(outcome, now)

    def charge(self, seconds: float, now: float) -> None:
        """CPU the daemon spent watching (discovery, scans, access figures): it counts
        against the same CPU budget as the kernel's time collapsing, so that a heavy
        cycle leaves less for collapses until it leaves the window."""
        self._cpu.add(now, seconds)

    def rest(self, target: str) -> float | None:
        """The rest pacing imposed after `target`'s last request (0 before any); None when
        the target is not paced."""
        if self.settings.duty_for(target) is None:
            return None
        pace = self.pacer.paces.get(target)
        return pace.last_delay if pace is not None else 0.0

    def _settle(self, outcome: Outcome, now: float) -> None:
        """Turn the reservation made at dispatch into what was really attempted."""
        self._bytes.refill(now)
        reserved = self._reserved.pop(_work(outcome.request), 0)
        self._bytes.adjust(reserved - outcome.bytes_attempted)
        self._cpu.add(now, outcome.duration)

    def _react(self, outcome: Outcome, now: float) -> None:
        """Back off on transient failures; a clean outcome resets the target and machine.

        A reason counts whether the backend reports it as `stopped` or among `failures`
        (EBUSY, say, may end a request or fail one region of it).
        """
        s, target = self.settings, outcome.request.target
        seen = {outcome.stopped} | {k for k, n in outcome.failures.items() if n > 0}
        if MACHINE_BACKOFF in seen:
            self._machine.fail(now, s.backoff_initial, s.backoff_max)
        if seen & TARGET_BACKOFF:
            self._backoff.setdefault(target, _Backoff()).fail(now, s.backoff_initial, s.backoff_max)
        elif not outcome.stopped and MACHINE_BACKOFF not in seen:
            self._backoff.pop(target, None)
            self._machine.reset()

    def unqueue(self, pid: int) -> None:
        """Drop a live process's queued work (it is held back), keeping what was learned
        about it."""
        self._drop(e for e in self._queue if e[2] != pid)

    def forget(self, pid: int) -> None:
        """The process exited: drop its queued work and everything learned about it."""
        self._drop(e for e in self._queue if e[2] != pid)
        self._ineligible = {k: v for k, v in self._ineligible.items() if k[0] != pid}
        self._reserved = {w: n for w, n in self._reserved.items() if w[0] != pid}
        self._denied = {k for k in self._denied if k[0] != pid}
        self._gone = {k for k in self._gone if k[0] != pid}

    # ---------------------------------------------------------------- pressure

    def pressure(self, state: MemoryState, now: float) -> str | None:
        """Pause or resume on this reading of memory state; returns the pressure reason.

        Only the pressure half of the pause follows the readings: a pause set with
        `set_paused` (by the operator, say) stays until cleared there. No hold-down time:
        avg10 is already a ten-second average, so it does not flap on one stall. (`now` is
        unused so far; it is where a hold-down would start if one proves needed.)
        """
        self._pressure = pressure_reason(state, self.settings)
        return self._pressure

    def set_paused(self, reason: str | None) -> None:
        """Pause for a reason of the caller's (None resumes), independent of pressure."""
        self._manual = reason

    @property
    def paused(self) -> str | None:
        # dict.fromkeys: a caller that mirrors the pressure reason into set_paused sees it once
        return "; ".join(dict.fromkeys(r for r in (self._manual, self._pressure) if r)) or None

    # ---------------------------------------------------------------- state

    def queued_pids(self) -> set[int]:
        """The processes with work in the queue."""
        return {e[2] for e in self._queue}

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def queue_bytes(self) -> int:
        return self._queue_bytes

    @property
    def planned_observe_bytes(self) -> int:
        """Bytes the last plan would have queued for observe-mode targets."""
        return sum(self._observe.values())

    def queued(self) -> list[Request]:
        """The queue in the order `next_request` would hand it out, budgets aside."""
        return [e[-1] for e in sorted(self._queue)]

    def snapshot(self, now: float) -> SchedulerState:
        self._bytes.refill(now)
        m = self._machine.until
        return SchedulerState(
            paused=self.paused,
            why_idle=self.why_idle,
            tokens=self._bytes.tokens,
            cpu_used=self._cpu.used(now),
            cpu_limit=self._cpu.limit,
            queue_length=self.queue_length,
            queue_bytes=self.queue_bytes,
            planned_observe_bytes=MappingProxyType(dict(self._observe)),
            backoff_until=MappingProxyType(
                {t: b.until for t, b in self._backoff.items() if b.until > now}
            ),
            machine_backoff_until=m if m > now else None,
            cooldown_until=MappingProxyType(
                {t: u for t, u in self._cooldown_until.items() if u > now}
            ),
            denied=frozenset(self._denied),
            pacing_until=MappingProxyType(
                {t: p.until for t, p in self.pacer.paces.items() if p.until > now}
            ),
            pending=MappingProxyType(dict(self._pending)),
            untouched=MappingProxyType(dict(self._untouched)),
        )
