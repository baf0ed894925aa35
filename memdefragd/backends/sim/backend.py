"""The `simulated` backend: the Backend protocol over a simulated machine.

The daemon and `report` run on it unchanged: processes, VMAs (with smaps-like fields),
layouts in PMD-aligned windows and buddyinfo-like memory state all come from the machine,
and requests are carried out by the simulated mechanisms. One lock serializes all access,
so a daemon thread executing a request never races a scan.

Of the protocol's optional capabilities it implements node compaction (the kernel's
compaction baseline, per node) and declines the others: the machine has no process event
stream (processes change only when a caller changes them; the daemon's periodic listing
sees that) and keeps no accessed bits to sample.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

import numpy as np

from ...model import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_PAGES,
    PMD_SIZE,
    Layout,
    MemoryState,
    Method,
    Outcome,
    PfnVisibility,
    ProcessGone,
    ProcessInfo,
    Request,
    Vma,
    ZoneFree,
)
from ...pipeline.plan.anchors import merge_frames
from ..protocol import AccessSampler, Handle
from . import baselines
from .machine import HEAD, Machine, SimProcess

WINDOW_PAGES = 1 << 18  # as the kernel backend: 1 GiB of address space per window
METHODS = tuple(Method)
BASE_FLAGS = frozenset({"rd", "wr", "mr", "mw", "me", "ac"})
CANCELLED = "cancelled"
UNMAPPED = "UNMAPPED"

# CollapseResult reasons -> the errno names MADV_COLLAPSE gives for them, so that the
# daemon's scheduler reacts to the simulator as it does to the kernel.
COLLAPSE_ERRNO = {
    "no_free_block": "ENOMEM",
    "not_enough_present": "EINVAL",  # an empty region: SCAN_PMD_NULL
    "unmapped": UNMAPPED,
}


class SimHandle:
    """A pinned reference to a simulated process, like a pidfd: once the process exits,
    the handle goes stale and requests through it stop with ESRCH."""

    _fds = itertools.count(3)

    def __init__(self, machine: Machine, proc: ProcessInfo):
        self.machine = machine
        self.proc = proc
        self.fd = next(self._fds)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        p = self.machine.processes.get(self.proc.pid)
        return p is None or p.start_time != self.proc.start_time

    def close(self) -> None:
        self.fd = -1

    def __enter__(self) -> SimHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimBackend:
    name = "simulated"
    sparse_scan = True  # VMAs from maps cost nothing to scan here either (protocol)
    methods = frozenset(map(str, METHODS))

    def __init__(self, machine: Machine, window_pages: int = WINDOW_PAGES):
        if window_pages % PMD_PAGES:
            raise ValueError("window_pages must be a multiple of the PMD size in pages")
        self.machine = machine
        self.window = window_pages
        self.lock = threading.RLock()

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ processes

    def list_processes(self) -> list[ProcessInfo]:
        with self.lock:
            return [_info(p) for p in self.machine.processes.values()]

    def process(self, pid: int) -> ProcessInfo:
        with self.lock:
            p = self.machine.processes.get(pid)
            if p is None:
                raise ProcessGone(f"pid {pid}: no such simulated process")
            return _info(p)

    def _proc(self, proc: ProcessInfo) -> SimProcess:
        p = self.machine.processes.get(proc.pid)
        if p is None or p.start_time != proc.start_time:
            raise ProcessGone(f"pid {proc.pid}: simulated process exited")
        return p

    def list_vmas(self, proc: ProcessInfo, *, detail: bool = True) -> list[Vma]:
        """As smaps (with detail) or maps (without: no fields, no VmFlags)."""
        with self.lock:
            p = self._proc(proc)
            out = []
            for v in p.vmas:
                fields: dict[str, int] = {}
                flags = None
                if detail:
                    present = v.pfn[v.pfn >= 0]
                    rss = present.size * PAGE_SIZE
                    huge = int(np.count_nonzero(self.machine.compound[present] == HEAD))
                    fields = {
                        "Size": v.pages * PAGE_SIZE,
                        "KernelPageSize": PAGE_SIZE,
                        "MMUPageSize": PAGE_SIZE,
                        "Rss": rss,
                        "Pss": rss,
                        "Private_Dirty": rss,
                        "Anonymous": rss,
                        "AnonHugePages": huge * PMD_SIZE,
                        "THPeligible": int(v.thp),
                    }
                    flags = BASE_FLAGS | {"hg"} if v.thp else BASE_FLAGS
                out.append(
                    Vma(
                        start=v.start_vpn << PAGE_SHIFT,
                        end=v.end_vpn << PAGE_SHIFT,
                        perms=v.perms,
                        offset=0,
                        dev="00:00",
                        inode=0,
                        path=v.path,
                        fields=MappingProxyType(fields),
                        vmflags=flags,
                    )
                )
            return out

    # ------------------------------------------------------------------ layouts

    def read_layout(self, proc: ProcessInfo, vma: Vma) -> Layout:
        return Layout.join(vma, [w for _, w in self.iter_layouts(proc, [vma])], True)

    def iter_layouts(self, proc: ProcessInfo, vmas: Sequence[Vma]) -> Iterator[tuple[int, Layout]]:
        """(index, window) with present pages, windows cut at multiples of the window
        size as the kernel backend cuts them, each read under the lock (so memory stays
        bounded and a request may run between windows, as on the kernel)."""
        for i, v in enumerate(vmas):
            for window in self.iter_ranges(proc, [(v.start, v.end)]):
                yield i, window

    def iter_ranges(self, proc: ProcessInfo, ranges: Sequence[tuple[int, int]]) -> Iterator[Layout]:
        """Windows of arbitrary byte ranges, VMA or not, cut as iter_layouts cuts them."""
        for start, end in ranges:
            lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
            for w in range(lo // self.window * self.window, hi, self.window):
                a, b = max(lo, w), min(hi, w + self.window)
                with self.lock:
                    vpn, pfn = _present(self._proc(proc), a, b)
                    thp = self.machine.compound[pfn] != 0
                if vpn.size:
                    yield Layout(a, b, _u64(vpn), _u64(pfn), thp, True)

    def pfn_visibility(self) -> PfnVisibility:
        return PfnVisibility(True)

    # ------------------------------------------------------------------ memory state

    def memory_state(self) -> MemoryState:
        with self.lock:
            m = self.machine
            zones, pagetype = [], {}
            for z in m.zones:
                zones.append(ZoneFree(z.node, z.name, m.buddy.free_blocks(z)))
                for mt, counts in m.buddy.free_blocks_by_mt(z).items():
                    pagetype[(z.node, z.name, mt)] = counts
            s = m.stats
            vmstat = {
                "nr_free_pages": m.nr_free,
                "thp_fault_alloc": s.thp_fault_alloc,
                "thp_fault_fallback": s.thp_fault_fallback,
                "thp_collapse_alloc": s.thp_collapsed,
                "thp_split_page": s.thp_split,
                "thp_promoted": s.thp_promoted,
                "pgmigrate_success": s.pages_migrated,
                "pgexchange_success": s.pages_exchanged,
                "compact_migrate_scanned": s.compact_migrate_scanned,
                "compact_free_scanned": s.compact_free_scanned,
                "compact_isolated": s.compact_isolated,
                "compact_stall": s.compact_stall,
            }
            return MemoryState(
                zones=tuple(zones),
                pagetype_free=MappingProxyType(pagetype),
                vmstat=MappingProxyType(vmstat),
                thp=MappingProxyType({"enabled": "madvise", "defrag": "madvise"}),
                khugepaged=MappingProxyType({"max_ptes_none": "511"}),
                pressure_some=None,
                pressure_full=None,
                meminfo=MappingProxyType(self._meminfo()),
            )

    def pressure_state(self) -> MemoryState:
        with self.lock:
            return MemoryState(
                zones=(),
                pagetype_free=None,
                vmstat=MappingProxyType({}),
                thp=MappingProxyType({}),
                khugepaged=MappingProxyType({}),
                pressure_some=None,
                pressure_full=None,
                meminfo=MappingProxyType(self._meminfo()),
            )

    def _meminfo(self) -> dict[str, int]:
        m = self.machine
        free = m.nr_free * PAGE_SIZE
        cache = int(np.count_nonzero(m.kind == 2)) * PAGE_SIZE
        return {
            "MemTotal": m.nframes * PAGE_SIZE,
            "MemFree": free,
            "MemAvailable": free + cache,
            "Cached": cache,
        }

    # ------------------------------------------------------------------ requests

    def open(self, proc: ProcessInfo) -> SimHandle:
        with self.lock:
            self._proc(proc)
            return SimHandle(self.machine, proc)

    def privilege_problems(self) -> list[str]:
        return []  # a machine in memory: nothing to be allowed

    def limitations(self) -> list[str]:
        return []  # the simulator models what it models; see its README section

    def refusal(self, method: str) -> str | None:
        if method not in METHODS:
            return f"unknown method (the simulated backend knows {', '.join(METHODS)})"
        if method.startswith("ranger"):
            try:
                from . import ranger  # noqa: F401
            except ImportError as e:
                return f"the simulated Translation Ranger is not available ({e})"
        return None

    def execute(
        self,
        handle: Handle,
        request: Request,
        *,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Outcome:
        """Carry out `request` on the machine: `collapse` region by region as
        MADV_COLLAPSE would (failures by its errno names), `ranger`/`ranger-improved`
        through the simulated Translation Ranger (failures by defrag_result_stats
        category), `compaction` as one full compaction of every zone."""
        if not isinstance(handle, SimHandle):  # the protocol's Handle: ours come from open()
            raise TypeError(f"the simulated backend needs a SimHandle, not {type(handle).__name__}")
        if handle.fd < 0:
            raise ValueError(f"SimHandle of pid {handle.pid} is closed")
        if (request.pid, request.start_time) != (handle.pid, handle.proc.start_time):
            raise ValueError(
                f"request for pid {request.pid} (start time {request.start_time}) given a "
                f"handle on pid {handle.pid} (start time {handle.proc.start_time})"
            )
        _check_ranges(request)
        t0 = time.perf_counter()
        with self.lock:
            if handle.exited:
                return _outcome(request, 0, 0, {}, t0, "ESRCH")
            if request.method == "collapse":
                return self._collapse(request, should_stop, t0)
            if request.method in ("ranger", "ranger-improved"):
                return self._ranger(request, t0)
            if request.method == "compaction":
                res = baselines.compact(self.machine)
                done = min(request.bytes, res.pages_migrated * PAGE_SIZE)
                return _outcome(request, request.bytes, done, {}, t0)
        raise ValueError(f"unknown method {request.method!r}")

    def compact(self, nodes: Sequence[int] | None = None) -> list[int]:
        """What writing /sys/devices/system/node/nodeN/compact does, for these nodes (all
        by default): full compaction of each of their zones. Returns the nodes done."""
        with self.lock:
            m = self.machine
            done = sorted({z.node for z in m.zones} if nodes is None else set(nodes))
            for z in m.zones:
                if z.node in done:
                    baselines.compact(m, z)
            return done

    def process_events(self) -> None:
        """None: the machine's processes change only when a caller changes them, so the
        daemon's periodic listing sees everything there is."""
        return None

    def access_sampler(self, source: str) -> tuple[AccessSampler | None, str]:
        """Declined: simulated pages carry no accessed bits."""
        return None, f"access-aware priority off: the {self.name} backend has no access bits"

    def compactor(self, min_interval: float) -> SimCompactor:
        """`compact` per node, at most once per node per `min_interval` seconds."""
        return SimCompactor(self, min_interval)

    def _collapse(self, request: Request, should_stop: Callable[[], bool], t0: float) -> Outcome:
        attempted = done = 0
        failures: dict[str, int] = {}
        ineligible: list[int] = []
        for i, (start, end) in enumerate(request.ranges):
            if i and should_stop():
                return _outcome(request, attempted, done, failures, t0, CANCELLED, ineligible)
            res = baselines.collapse(
                self.machine, request.pid, start >> PAGE_SHIFT, end >> PAGE_SHIFT
            )
            for vpn, reason in zip(res.regions.tolist(), res.status, strict=True):
                attempted += PMD_SIZE
                if reason in ("ok", "already_thp"):
                    done += PMD_SIZE
                    continue
                name = COLLAPSE_ERRNO.get(reason, reason)
                failures[name] = failures.get(name, 0) + 1
                if name == "EINVAL":
                    ineligible.append(vpn << PAGE_SHIFT)
                if name == "ENOMEM":
                    return _outcome(request, attempted, done, failures, t0, "ENOMEM", ineligible)
        return _outcome(request, attempted, done, failures, t0, "", ineligible)

    def _ranger(self, request: Request, t0: float) -> Outcome:
        from .ranger import defrag

        res = defrag(
            self.machine,
            request.pid,
            vma_start_vpn=request.vma_start >> PAGE_SHIFT,
            ranges=[(s >> PAGE_SHIFT, e >> PAGE_SHIFT) for s, e in request.ranges],
            improved=request.method == "ranger-improved",
        )
        moved = (res.pages_migrated + res.pages_exchanged) * PAGE_SIZE
        failures = {k: int(v) for k, v in res.failures.items() if v}
        out = _outcome(request, request.bytes, min(request.bytes, moved), failures, t0)
        return replace(out, frames=_anchor_frames(request, res.anchors, res.segments))


class SimCompactor:
    """Node compaction on the simulated machine, rate-limited per node as the kernel
    backend's Compactor is: the daemon asks both the same way when a collapse finds no
    free 2 MiB block."""

    def __init__(
        self,
        backend: SimBackend,
        min_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backend = backend
        self.min_interval = min_interval
        self.clock = clock
        self.last: dict[int, float] = {}

    def maybe_compact(self, nodes: Iterable[int] | None = None) -> list[int]:
        """Compact the nodes not compacted within min_interval; return those compacted."""
        if nodes is None:
            nodes = sorted({z.node for z in self.backend.machine.zones})
        now = self.clock()
        due = [n for n in nodes if now - self.last.get(n, -self.min_interval) >= self.min_interval]
        self.last.update(dict.fromkeys(due, now))
        return self.backend.compact(due) if due else []


def _info(p: SimProcess) -> ProcessInfo:
    return ProcessInfo(
        pid=p.pid,
        comm=p.comm,
        cmdline=p.cmdline,
        exe=f"/usr/bin/{p.comm}",
        uid=p.uid,
        cgroup="/",
        start_time=p.start_time,
        rss=p.rss_pages * PAGE_SIZE,
    )


def _present(p: SimProcess, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Present (vpn, pfn) of [lo, hi) across the process's VMAs, in virtual order."""
    vpns, pfns = [], []
    for v in p.vmas:
        a, b = max(lo, v.start_vpn), min(hi, v.end_vpn)
        if a >= b:
            continue
        table = v.pfn[a - v.start_vpn : b - v.start_vpn]
        idx = np.flatnonzero(table >= 0)
        vpns.append(idx + a)
        pfns.append(table[idx])
    if not vpns:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(vpns), np.concatenate(pfns)


def _anchor_frames(
    request: Request,
    anchors: Mapping[tuple[int, int], int],
    segments: Iterable[tuple[int, int, int, int]],
) -> tuple[tuple[int, int], ...]:
    """Where a ranger call meant the request's VMA to lie, in frames, as the kernel
    backend reads it from its log: the faithful anchor's window (its first page's frame,
    for as many frames as the VMA has pages), or the improved variant's segments."""
    pages = (request.vma_end - request.vma_start) >> PAGE_SHIFT
    spans = [(pfn, pfn + pages) for (pid, _), pfn in anchors.items() if pid == request.pid]
    if segments:  # the improved variant: a window per segment
        spans = [(pfn, pfn + hi - lo) for pid, lo, hi, pfn in segments if pid == request.pid]
    return merge_frames(spans)


def _u64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.uint64)


def _check_ranges(request: Request) -> None:
    """Refuse a malformed request before doing anything, as the kernel backend does."""
    seen: list[tuple[int, int]] = []
    for start, end in request.ranges:
        where = f"range [{start:#x}, {end:#x}) of pid {request.pid}"
        if start % PMD_SIZE or end % PMD_SIZE or end <= start:
            raise ValueError(f"{where} is empty or not 2 MiB-aligned")
        if start < request.vma_start or end > request.vma_end:
            raise ValueError(f"{where} is outside its VMA")
        if any(start < e and s < end for s, e in seen):
            raise ValueError(f"{where} overlaps another range of the request")
        seen.append((start, end))


def _outcome(
    request: Request,
    attempted: int,
    done: int,
    failures: dict[str, int],
    t0: float,
    stopped: str = "",
    ineligible: Sequence[int] = (),
) -> Outcome:
    return Outcome(
        request=request,
        bytes_attempted=attempted,
        bytes_done=done,
        failures=MappingProxyType(failures),
        duration=time.perf_counter() - t0,
        stopped=stopped,
        ineligible=tuple(ineligible),
    )


__all__ = ["SimBackend", "SimCompactor", "SimHandle"]
