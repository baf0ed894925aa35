"""Pieces shared by the figure tests of tests/ranger: report's figures of real processes,
the memdefrag_* vmstat deltas split into migration and exchange, the anchor window the
RFC's get_undefragged_area gives a process's first VMA, and aging the guest's memory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.procs import PidHandle
from memdefragd.backends.kernel.ranger import DefragPass, Ranger
from memdefragd.backends.kernel.snapshot import take_snapshot
from memdefragd.backends.sim.ranger import clamp, congruent
from memdefragd.commands.simulate import KS, PS
from memdefragd.model import PMD_PAGES
from memdefragd.pipeline.scan import ProcessReport, scan_process
from memdefragd.pipeline.score import Rollup, rollup
from memdefragd.snapshot import ProcessShot

from ..kernel.helpers import MiB
from .conftest import TR_SYSCALL
from .hog import HogProcess

PUD_PAGES = 1 << 18


def reports(pids: Iterable[int]) -> dict[int, ProcessReport]:
    """`report`'s scan of each process (pagemap + kpageflags, frame numbers as root)."""
    b = KernelBackend()
    try:
        return {pid: scan_process(b, b.process(pid), ks=KS, ps=PS) for pid in pids}
    finally:
        b.close()


def process_shot(pid: int) -> ProcessShot:
    """The snapshot of one process: its VMAs and present pages' frames."""
    kb = KernelBackend()
    try:
        return take_snapshot([kb.process(pid)], backend=kb).processes[0]
    finally:
        kb.close()


def total(reps: Iterable[ProcessReport]) -> Rollup:
    """One rollup over every VMA of these processes, as `report` totals a process."""
    return rollup((v.metrics for r in reps for v in r.vmas), KS, PS)


def figures(t: Rollup, *, every: bool = False) -> dict[str, float]:
    """`report`'s figures of a rollup: the four the issue names, or `every` one."""
    c = t.contiguity
    assert c is not None, "frame numbers must be visible (root)"
    if not every:
        return {
            "runs": c.runs,
            "largest run": c.largest_run,
            "coverage@128": c.coverage[128],
            "runs_for(0.99)": c.runs_for[0.99],
            "present pages": t.present_pages,
        }
    return {
        "runs": c.runs,
        "largest run": c.largest_run,
        "mean run": c.mean_run,
        **{f"coverage@{k}": c.coverage[k] for k in KS},
        **{f"runs_for({p})": c.runs_for[p] for p in PS},
        "present pages": t.present_pages,
    }


def fmt(name: str, v: float) -> str:
    if name.startswith("coverage"):
        return f"{v:.4f}"
    return f"{v:.1f}" if name.startswith("mean") else str(int(v))


def driver_log_len(pid: int) -> int:
    """The log buffer the driver's next pass over `pid` will give the kernel (which
    vzallocs it for each call: frames the simulator's Knobs.log_buffer takes too)."""
    kb = KernelBackend()
    try:
        handle = PidHandle(kb.process(pid))
        try:
            return Ranger(TR_SYSCALL, lock_file=None).log_buffer_len(handle)
        finally:
            handle.close()
    finally:
        kb.close()


def kernel_pass(pid: int) -> DefragPass:
    """The kernel's whole pass over a process, as its launcher does it: action 1 (every
    VMA eligible), then action 3 in one call (num_breakout_chunks as it is), logged."""
    ranger = Ranger(TR_SYSCALL, breakout_chunks=None, lock_file=None)
    kb = KernelBackend()
    try:
        handle = PidHandle(kb.process(pid))
        try:
            ranger.mark_all(handle)
            return ranger.defrag(handle, log=True)
        finally:
            handle.close()
    finally:
        kb.close()


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            parts = v.split()
            out[k] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def deltas(v0: Mapping[str, int], v1: Mapping[str, int]) -> dict[str, int]:
    """The memdefrag_* counters that changed."""
    return {
        k: v1[k] - v0.get(k, 0) for k in v1 if k.startswith("memdefrag") and v1[k] != v0.get(k, 0)
    }


def moved(d: Mapping[str, int]) -> tuple[int, int]:
    """Pages moved (migration into free frames, exchange with in-use ones) from vmstat
    deltas: each counter of pages tried, less its _failed twin."""
    mig = d.get("memdefrag_dest_free_pages", 0) - d.get("memdefrag_dest_free_pages_failed", 0)
    exc = sum(
        d.get(f"memdefrag_dest_{k}_pages", 0) - d.get(f"memdefrag_dest_{f}_pages_failed", 0)
        for k, f in (("anon", "anon"), ("file", "file"), ("non_lru", "nonlru"))
    )
    return mig, exc


def anchor_window(
    zones: Sequence, vpn: np.ndarray, pfn: np.ndarray, lo: int, hi: int
) -> tuple[int, int]:
    """[first, end) frames where the RFC puts the VMA [lo, hi) (vpns) when it is the first
    VMA of its process to get an anchor: the start of the zone of its lowest present page,
    raised to be congruent with the VMA's start modulo 512 (2^18 from 1 GiB), clamped into
    the zone (RFC04's find_anchor_pages_in_vma and get_undefragged_area)."""
    keep = (vpn >= lo) & (vpn < hi) & (pfn >= 0)
    first = int(pfn[keep][np.argmin(vpn[keep])])
    z = next(z for z in zones if z.start_pfn <= first < z.end_pfn)
    pages = hi - lo
    align = PUD_PAGES if pages >= PUD_PAGES else PMD_PAGES if pages >= PMD_PAGES else 1
    a = clamp(congruent(z.start_pfn, lo, align), z.start_pfn, z.end_pfn, align)
    return a, a + pages


def age(reserve: int, freed: int, seed: int, comm: str = "mdd-hog") -> HogProcess:
    """Fill all but `reserve` bytes of free memory with a hog's anonymous pages, then free
    `freed` bytes of them one page at a time in random order: in-use movable pages
    everywhere, free memory in scattered 4 KiB holes. The caller stops the hog."""
    size = (meminfo()["MemFree"] - reserve) // (2 * MiB) * (2 * MiB)
    hog = HogProcess(size, comm=comm)
    try:
        hog.command("free_random", fraction=min(freed / size, 1.0), seed=seed)
    except BaseException:
        hog.stop()
        raise
    return hog
