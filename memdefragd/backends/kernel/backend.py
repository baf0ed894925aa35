"""The `kernel` backend: real Linux through /proc and sysfs, with every optional
capability of the protocol: process events (events.py), access sampling (access.py) and
node compaction (compaction.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

from ...model import (
    AccessDenied,
    Layout,
    MemoryState,
    Method,
    Outcome,
    PfnVisibility,
    ProcessGone,
    ProcessInfo,
    Request,
    Vma,
)
from ..protocol import AccessSampler, Handle
from . import collapse as _collapse  # the module: tests patch its syscall wrapper
from . import procfs
from .compaction import Compactor
from .events import ProcEvents
from .pagemap import NO_SCAN_REASON, WINDOW_PAGES, PagemapReader, scan_refusal
from .privileges import CAP_SYS_ADMIN, effective_capabilities, privilege_problems
from .procs import PidHandle, ProcDir, list_pids, pidfd_refusal
from .ranger import Ranger, carry_out, ranger_refusal

DENSE_VMA_BYTES = 64 << 20  # below this, reading a VMA straight through costs little

THP_KNOBS = ("enabled", "defrag", "use_zero_page", "hpage_pmd_size", "shmem_enabled")
KHUGEPAGED_KNOBS = (
    "pages_to_scan", "scan_sleep_millisecs", "alloc_sleep_millisecs", "max_ptes_none",
    "max_ptes_swap", "max_ptes_shared", "defrag", "pages_collapsed", "full_scans",
)  # fmt: skip


class KernelBackend:
    name = "kernel"
    methods = frozenset({Method.COLLAPSE.value, Method.RANGER.value})

    def __init__(
        self,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        use_scan: bool = True,
        window_pages: int = WINDOW_PAGES,
        density: str = "auto",
        ranger_syscall: int | None = None,
        ranger_breakout_chunks: int | None = None,
    ):
        """`use_scan=False` never uses PAGEMAP_SCAN (as on kernels before 6.7);
        `density` forces how VMAs are read: "dense" straight through, "sparse" present
        ranges first, "auto" by the VMA's Rss (or a guess without smaps)."""
        if density not in ("auto", "dense", "sparse"):
            raise ValueError(f"density must be auto, dense or sparse, not {density!r}")
        self.density = density
        self.proc_root = proc_root
        self.window_pages = window_pages
        self.sys_root = sys_root
        self.use_scan = use_scan
        self.ranger_syscall = ranger_syscall
        self.ranger_breakout_chunks = ranger_breakout_chunks
        self._ranger: Ranger | None = None  # made at the first ranger request
        self._marked: set[tuple[int, int]] = set()  # processes given action 1
        self._visibility: PfnVisibility | None = None
        self._kpf_fd: int | None = None
        self._kpf_tried = False

    def open(self, proc: ProcessInfo) -> PidHandle:
        return PidHandle(proc, self.proc_root)

    def privilege_problems(self) -> list[str]:
        """Each capability the daemon lacks, with what that costs (empty: none missing)."""
        return privilege_problems(self.proc_root)

    def refusal(self, method: str) -> str | None:
        if method == "collapse":
            try:
                _collapse.process_madvise_nr()
            except NotImplementedError as e:
                return str(e)
            return _collapse.madv_collapse_refusal()
        if method == "ranger":
            return ranger_refusal(self.ranger_syscall)
        if method == "compaction":
            return (
                "the kernel backend compacts whole nodes through daemon.compaction.enabled, "
                "not as a per-target method: use method 'collapse'"
            )
        return f"method {method!r} exists only on the simulated backend (daemon.backend)"

    def execute(
        self, handle: Handle, request: Request, *, should_stop: Callable[[], bool]
    ) -> Outcome:
        if not isinstance(handle, PidHandle):  # the protocol's Handle: ours come from open()
            raise TypeError(f"the kernel backend needs a PidHandle, not {type(handle).__name__}")
        reason = self.refusal(request.method)
        if reason is not None:
            raise NotImplementedError(reason)
        if request.method == Method.RANGER:
            if self._ranger is None:
                self._ranger = Ranger(
                    self.ranger_syscall,
                    proc_root=self.proc_root,
                    breakout_chunks=self.ranger_breakout_chunks,
                )
            return carry_out(self._ranger, handle, request, marked=self._marked,
                             should_stop=should_stop)  # fmt: skip
        return _collapse.collapse(
            handle, request, should_stop=should_stop, proc_root=self.proc_root
        )

    def process_events(self) -> ProcEvents:
        """The proc connector's events (netlink); `start()` says whether they flow here."""
        return ProcEvents()

    def access_sampler(self, source: str) -> tuple[AccessSampler | None, str]:
        """DAMON, or clear_refs + smaps Referenced (access.py); DAMON's module is loaded
        only when asked for."""
        from .access import open_sampler

        return open_sampler(source, self.proc_root)

    def compactor(self, min_interval: float) -> Compactor:
        """Writes to /sys/devices/system/node/nodeN/compact, at most once per node per
        `min_interval` seconds."""
        return Compactor(min_interval, self.sys_root)

    def close(self) -> None:
        if self._kpf_fd is not None:
            os.close(self._kpf_fd)
            self._kpf_fd = None

    def list_processes(self) -> list[ProcessInfo]:
        out = []
        for pid in list_pids(self.proc_root):
            try:
                out.append(self.process(pid))
            except (ProcessGone, AccessDenied):
                continue
        return out

    def process(self, pid: int) -> ProcessInfo:
        with ProcDir(self.proc_root, pid) as d:
            return d.info()

    def list_vmas(self, proc: ProcessInfo, *, detail: bool = True) -> list[Vma]:
        """VMAs from smaps (sizes, THP counters, VmFlags), or with detail=False from maps:
        bounds only, but without smaps' walk of every page table of the target."""
        with ProcDir(self.proc_root, proc.pid) as d:
            state = d.check_identity(proc)
            text = d.read_text("smaps" if detail else "maps")
            if not text and state in ("Z", "X"):
                raise ProcessGone(f"pid {proc.pid}: exited (zombie, not yet reaped)")
            return procfs.parse_smaps(text)

    def read_layout(self, proc: ProcessInfo, vma: Vma) -> Layout:
        return self.read_layouts(proc, [vma])[0]

    def read_layouts(self, proc: ProcessInfo, vmas: Sequence[Vma]) -> list[Layout]:
        """Whole layouts (memory grows with the VMAs; scans use iter_layouts)."""
        parts: list[list[Layout]] = [[] for _ in vmas]
        for i, window in self.iter_layouts(proc, vmas):
            parts[i].append(window)
        return [
            Layout.join(v, p, self.pfn_visibility().visible)
            for v, p in zip(vmas, parts, strict=True)
        ]

    def iter_layouts(self, proc: ProcessInfo, vmas: Sequence[Vma]) -> Iterator[tuple[int, Layout]]:
        """(index into vmas, window) for every window holding present pages, in order,
        through one pagemap fd; memory is bounded by the window size."""
        visible = self.pfn_visibility().visible
        with self._pagemap(proc) as reader:
            guess = _dense_guess(proc, vmas)
            for i, v in enumerate(vmas):
                if v.path == "[vsyscall]":
                    continue  # above the task size: pagemap has no entries for it
                if self.density != "auto":
                    dense = self.density == "dense"
                else:
                    dense = v.rss * 2 >= v.size if "Rss" in v.fields else guess(v)
                for window in reader.windows(v.start, v.end, visible, dense):
                    yield i, _distrust_zero_pfns(window) if visible else window

    def iter_ranges(self, proc: ProcessInfo, ranges: Sequence[tuple[int, int]]) -> Iterator[Layout]:
        """Windows of arbitrary byte ranges, through one pagemap fd as iter_layouts reads
        VMAs: straight through, since a request's ranges are small and just made present
        (only speed depends on that, never a figure)."""
        visible = self.pfn_visibility().visible
        with self._pagemap(proc) as reader:
            for lo, hi in ranges:
                for window in reader.windows(lo, hi, visible, dense=True):
                    yield _distrust_zero_pfns(window) if visible else window

    @contextmanager
    def _pagemap(self, proc: ProcessInfo) -> Iterator[PagemapReader]:
        """A reader of the process's pagemap (one fd), checked to be this very process
        before anything is read through it and after everything was."""
        with ProcDir(self.proc_root, proc.pid) as d:
            d.check_identity(proc)
            fd = d.open("pagemap")
            try:
                # An exited process's pagemap has no mm behind it; some kernels mishandled
                # PAGEMAP_SCAN on such a file, so do not even try.
                d.check_identity(proc, alive=True)
                reader = PagemapReader(fd, self._kpageflags(), self.use_scan, self.window_pages)
                yield reader
                self.use_scan = self.use_scan and reader.use_scan  # found absent: stop asking
            finally:
                os.close(fd)
            d.check_identity(proc)  # everything read above was of this very process

    def limitations(self) -> list[str]:
        # MADV_COLLAPSE is the config's business (config/plan.check_methods), DAMON the
        # access sampler's; what is left is how processes are pinned and memory is read.
        out = [r for r in (pidfd_refusal(), self.pagemap_scan_refusal()) if r is not None]
        if not Path(self.proc_root, "pressure/memory").exists():
            out.append(
                f"no {self.proc_root}/pressure/memory (PSI: Linux 4.20+ with CONFIG_PSI, or "
                "psi=0 on the command line): the pressure guard watches MemAvailable only"
            )
        return out

    @property
    def sparse_scan(self) -> bool:
        """PAGEMAP_SCAN skips what is not resident: VMAs may come from maps (protocol)."""
        return self.pagemap_scan_refusal() is None

    def pagemap_scan_refusal(self) -> str | None:
        """None where layouts are read with PAGEMAP_SCAN (Linux 6.7+); else why not and what
        is read instead (also when this backend was made with use_scan=False)."""
        if not self.use_scan:
            return "PAGEMAP_SCAN not used (use_scan=False): " + NO_SCAN_REASON.split(": ", 1)[1]
        reason = scan_refusal(self.proc_root)
        if reason is not None:
            self.use_scan = False
        return reason

    def pfn_visibility(self) -> PfnVisibility:
        if self._visibility is None:
            self._visibility = _pfn_visibility(self.proc_root)
        return self._visibility

    def memory_state(self) -> MemoryState:
        p, s = Path(self.proc_root), Path(self.sys_root) / "kernel/mm/transparent_hugepage"
        pagetype = _read_optional(p / "pagetypeinfo")
        pressure = _read_optional(p / "pressure/memory")
        psi = procfs.parse_pressure(pressure) if pressure is not None else {}
        return MemoryState(
            zones=tuple(procfs.parse_buddyinfo((p / "buddyinfo").read_text())),
            pagetype_free=(
                MappingProxyType(procfs.parse_pagetypeinfo(pagetype)) if pagetype else None
            ),
            vmstat=MappingProxyType(procfs.parse_vmstat((p / "vmstat").read_text())),
            thp=MappingProxyType(_knobs(s, THP_KNOBS)),
            khugepaged=MappingProxyType(_knobs(s / "khugepaged", KHUGEPAGED_KNOBS)),
            pressure_some=psi.get("some"),
            pressure_full=psi.get("full"),
            meminfo=MappingProxyType(procfs.parse_meminfo((p / "meminfo").read_text())),
        )

    def pressure_state(self) -> MemoryState:
        """Only what the pressure guard reads (PSI and meminfo): cheap enough for every
        second, unlike memory_state, whose pagetypeinfo walks the free lists."""
        p = Path(self.proc_root)
        pressure = _read_optional(p / "pressure/memory")
        psi = procfs.parse_pressure(pressure) if pressure is not None else {}
        return MemoryState(
            zones=(),
            pagetype_free=None,
            vmstat=MappingProxyType({}),
            thp=MappingProxyType({}),
            khugepaged=MappingProxyType({}),
            pressure_some=psi.get("some"),
            pressure_full=psi.get("full"),
            meminfo=MappingProxyType(procfs.parse_meminfo((p / "meminfo").read_text())),
        )

    def _kpageflags(self) -> int | None:
        if not self._kpf_tried:
            self._kpf_tried = True
            try:
                self._kpf_fd = os.open(f"{self.proc_root}/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._kpf_fd = None
        return self._kpf_fd


def _dense_guess(proc: ProcessInfo, vmas: Sequence[Vma]) -> Callable[[Vma], bool]:
    """Without smaps' Rss per VMA, guess which VMAs are mostly present (read them straight
    through) and which are sparse reservations (find their present ranges first). Only
    speed depends on this guess, never a figure."""
    mapped = sum(v.size for v in vmas)
    dense_process = proc.rss * 2 >= mapped
    return lambda v: dense_process or v.size <= DENSE_VMA_BYTES


def _distrust_zero_pfns(layout: Layout) -> Layout:
    if layout.present_pages and not layout.pfn.any():
        return Layout(layout.start_vpn, layout.end_vpn, layout.vpn, layout.pfn, layout.thp, False)
    return layout


def _pfn_visibility(proc_root: str) -> PfnVisibility:
    cap_eff = effective_capabilities(proc_root)
    if cap_eff is None:
        return PfnVisibility(False, f"cannot read CapEff from {proc_root}/self/status")
    if not cap_eff & (1 << CAP_SYS_ADMIN):
        return PfnVisibility(
            False,
            "no CAP_SYS_ADMIN: the kernel zeroes page frame numbers in /proc/PID/pagemap, "
            "so physical contiguity cannot be measured (run as root with CAP_SYS_ADMIN)",
        )
    return PfnVisibility(True)


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _knobs(directory: Path, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        text = _read_optional(directory / name)
        if text is not None:
            out[name] = procfs.parse_knob(text)
    return out
