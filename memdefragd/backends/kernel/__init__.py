"""The `kernel` backend: real Linux through /proc and sysfs."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ... import procfs
from ...model import (
    PAGE_SHIFT,
    AccessDenied,
    Layout,
    MemoryState,
    PfnVisibility,
    ProcessGone,
    ProcessInfo,
    Vma,
)
from .pagemap import PagemapReader
from .procs import ProcDir, list_pids

CAP_SYS_ADMIN = 21

THP_KNOBS = ("enabled", "defrag", "use_zero_page", "hpage_pmd_size", "shmem_enabled")
KHUGEPAGED_KNOBS = (
    "pages_to_scan", "scan_sleep_millisecs", "alloc_sleep_millisecs", "max_ptes_none",
    "max_ptes_swap", "max_ptes_shared", "defrag", "pages_collapsed", "full_scans",
)  # fmt: skip


class KernelBackend:
    name = "kernel"

    def __init__(self, proc_root: str = "/proc", sys_root: str = "/sys", use_scan: bool = True):
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.use_scan = use_scan
        self._visibility: PfnVisibility | None = None
        self._kpf_fd: int | None = None
        self._kpf_tried = False

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

    def list_vmas(self, proc: ProcessInfo) -> list[Vma]:
        with ProcDir(self.proc_root, proc.pid) as d:
            state = d.check_identity(proc)
            text = d.read_text("smaps")
            if not text and state in ("Z", "X"):
                raise ProcessGone(f"pid {proc.pid}: exited (zombie, not yet reaped)")
            return procfs.parse_smaps(text)

    def read_layout(self, proc: ProcessInfo, vma: Vma) -> Layout:
        return self.read_layouts(proc, [vma])[0]

    def read_layouts(self, proc: ProcessInfo, vmas: list[Vma]) -> list[Layout]:
        """Layouts of several VMAs of one process through one pagemap fd."""
        visible = self.pfn_visibility().visible
        with ProcDir(self.proc_root, proc.pid) as d:
            d.check_identity(proc)
            fd = d.open("pagemap")
            try:
                # An exited process's pagemap has no mm behind it; some kernels mishandled
                # PAGEMAP_SCAN on such a file, so do not even try.
                d.check_identity(proc, alive=True)
                reader = PagemapReader(fd, self._kpageflags(), self.use_scan)
                layouts = [
                    _empty(v, visible)
                    if v.path == "[vsyscall]"
                    else reader.read(v.start, v.end, visible)
                    for v in vmas
                ]
            finally:
                os.close(fd)
            d.check_identity(proc)  # the reads above were all of this process
        if visible:
            # Belt and braces: a kernel that hides PFNs from us despite the capability
            # (user namespaces, lockdown) shows zeros; never compute contiguity from those.
            layouts = [_distrust_zero_pfns(lay) for lay in layouts]
        return layouts

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
        )

    def _kpageflags(self) -> int | None:
        if not self._kpf_tried:
            self._kpf_tried = True
            try:
                self._kpf_fd = os.open(f"{self.proc_root}/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._kpf_fd = None
        return self._kpf_fd


def _empty(vma: Vma, visible: bool) -> Layout:
    """[vsyscall] lies above the task size: pagemap has no entries for it."""
    none = np.zeros(0, dtype=np.uint64)
    start, end = vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT
    return Layout(start, end, none, none, np.zeros(0, dtype=bool), visible)


def _distrust_zero_pfns(layout: Layout) -> Layout:
    if layout.present_pages and not layout.pfn.any():
        return Layout(layout.start_vpn, layout.end_vpn, layout.vpn, layout.pfn, layout.thp, False)
    return layout


def _pfn_visibility(proc_root: str) -> PfnVisibility:
    try:
        status = Path(proc_root, "self/status").read_text()
    except OSError as e:
        return PfnVisibility(False, f"cannot read {proc_root}/self/status: {e.strerror}")
    cap_eff = next(
        (int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:")),
        0,
    )
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
