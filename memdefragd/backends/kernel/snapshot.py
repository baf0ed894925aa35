"""Taking a HostSnapshot of this machine: /proc/kpageflags for every frame, /proc/zoneinfo,
/proc/buddyinfo, and chosen processes' VMAs and pagemaps.

kpageflags is read in windows of `WINDOW_FRAMES` straight into one preallocated array (8
bytes per frame: 50 MB for 24 GiB), so a read costs no more than the result. Processes are
read as `report` reads them (smaps, then pagemap in bounded windows through the backend),
so the simulator's figures before any method are the report's. Nothing here is atomic:
the machine moves on while it is read (the seeding counts what disagrees).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...model import PAGE_SHIFT, AccessDenied, ProcessGone, ProcessInfo
from ...snapshot import HostSnapshot, ProcessShot, VmaShot, ZoneSpan
from . import procfs
from .backend import KernelBackend

WINDOW_FRAMES = 1 << 20  # 8 MiB of kpageflags per read


def read_kpageflags(path: str, nframes: int, window: int = WINDOW_FRAMES) -> np.ndarray:
    """Flags of frames [0, nframes), fewer if the file ends first (past max_pfn)."""
    flags = np.empty(nframes, dtype=np.uint64)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = 0
        while got < nframes:
            n = min(window, nframes - got)
            r = os.preadv(fd, [flags[got : got + n].data.cast("B")], got * 8)
            got += r // 8
            if r < n * 8:
                break
    finally:
        os.close(fd)
    return flags[:got]


def read_process(backend: KernelBackend, proc: ProcessInfo) -> ProcessShot:
    """A process's VMAs with Rss (as `report` picks them) and their present pages."""
    vmas = [v for v in backend.list_vmas(proc, detail=True) if v.rss > 0]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for _, w in backend.iter_layouts(proc, vmas):
        if not w.pfn_known:
            raise AccessDenied("pagemap: frame numbers are hidden (needs CAP_SYS_ADMIN)")
        parts.append((w.vpn.astype(np.int64), w.pfn.astype(np.int64), w.thp))
    vpn, pfn, thp = (
        (np.concatenate([p[i] for p in parts]) for i in range(3))
        if parts
        else (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    )
    shots = tuple(
        VmaShot(
            v.start >> PAGE_SHIFT,
            v.end >> PAGE_SHIFT,
            v.perms,
            v.path,
            bool(v.field("THPeligible"))
            if "THPeligible" in v.fields
            else "hg" in (v.vmflags or ()),
        )
        for v in vmas
        if v.path != "[vsyscall]"  # above the task size: pagemap has no entries for it
    )
    return ProcessShot(proc.pid, proc.comm, proc.cmdline, shots, vpn, pfn, thp.astype(bool))


def take_snapshot(
    procs: Sequence[ProcessInfo], *, proc_root: str = "/proc", backend: KernelBackend | None = None
) -> HostSnapshot:
    """Snapshot this machine and `procs` (those that exit or refuse meanwhile are noted and
    left out). Raises OSError when /proc/kpageflags cannot be read (root is needed)."""
    t0, taken = time.perf_counter(), time.time()
    root = Path(proc_root)
    own = backend is None
    kb = backend or KernelBackend(proc_root=proc_root)
    notes = []
    try:
        shots = []
        for p in procs:
            try:
                shots.append(read_process(kb, p))
            except (ProcessGone, AccessDenied) as e:
                notes.append(f"pid {p.pid} ({p.comm}) left out: {e}")
    finally:
        if own:
            kb.close()
    zones = tuple(ZoneSpan(*z) for z in procfs.parse_zoneinfo((root / "zoneinfo").read_text()))
    end = max((z.end_pfn for z in zones), default=0)
    buddy = tuple(procfs.parse_buddyinfo((root / "buddyinfo").read_text()))
    flags = read_kpageflags(str(root / "kpageflags"), end)
    if flags.size < end:
        notes.append(f"/proc/kpageflags ends at frame {flags.size}, the zones at {end}")
        zones = tuple(z for z in zones if z.end_pfn <= flags.size)
    return HostSnapshot(
        kernel=os.uname().release,
        taken=taken,
        seconds=time.perf_counter() - t0,
        flags=flags,
        zones=zones,
        buddyinfo=buddy,
        processes=tuple(shots),
        notes=tuple(notes),
    )
