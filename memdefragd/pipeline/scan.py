"""Scan: a process's VMAs and their layouts, read through the backend protocol in bounded
windows and scored on the fly (score.py), into value types (`ProcessReport`, `Report`)
that the daemon plans from and `memdefragd report` renders (commands/report.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..backends.protocol import Backend
from ..model import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_PAGES,
    AccessDenied,
    MemoryState,
    PfnVisibility,
    ProcessGone,
    ProcessInfo,
    Vma,
)
from .score import (
    DEFAULT_KS,
    DEFAULT_PS,
    Rollup,
    VmaAccumulator,
    VmaMetrics,
    rollup,
)


@dataclass(frozen=True, slots=True)
class VmaReport:
    vma: Vma
    metrics: VmaMetrics


@dataclass(frozen=True, slots=True)
class ProcessReport:
    proc: ProcessInfo
    target: str | None
    vmas: tuple[VmaReport, ...]
    totals: Rollup
    empty_vmas: int  # VMAs with Rss 0: not read


@dataclass(frozen=True, slots=True)
class Skipped:
    pid: int
    comm: str
    reason: str  # "exited" or "access_denied"
    detail: str


@dataclass(frozen=True, slots=True)
class Report:
    time: float
    kernel: str
    pfn: PfnVisibility
    max_ptes_none: int
    ks: tuple[int, ...]
    ps: tuple[float, ...]
    processes: tuple[ProcessReport, ...]
    skipped: tuple[Skipped, ...]
    system: MemoryState | None


def scan_process(
    backend: Backend,
    proc: ProcessInfo,
    *,
    target: str | None = None,
    detail: bool = True,
    collect: bool = False,
    runs: bool = True,
    only: Callable[[Vma], bool] | None = None,
    max_ptes_none: int = PMD_PAGES - 1,
    ks: Sequence[int] = DEFAULT_KS,
    ps: Sequence[float] = DEFAULT_PS,
    work: str = "collapse",
    vmas: Sequence[Vma] | None = None,
) -> ProcessReport:
    """Scan one process, window by window; raises ProcessGone or AccessDenied.

    With `detail`, VMAs come from smaps and those with nothing resident are not read;
    without, from maps, and PAGEMAP_SCAN finds the empty ones just as cheaply. `vmas`,
    listed by the caller (as `detail` says), saves listing them again. With `collect`,
    each VMA's metrics list its collapsible regions (for the scheduler); `runs=False`
    skips the contiguity figures; `only` picks the VMAs worth reading; `work` ("collapse"
    or "ranger") says which regions count as collapsible.
    """
    vmas = backend.list_vmas(proc, detail=detail) if vmas is None else vmas
    wanted = [v for v in vmas if v.rss > 0] if detail else vmas
    if only is not None:
        wanted = [v for v in wanted if only(v)]
    visible = backend.pfn_visibility().visible
    accs = [
        VmaAccumulator(
            v.start >> PAGE_SHIFT,
            v.end >> PAGE_SHIFT,
            visible,
            max_ptes_none=max_ptes_none,
            collapse_eligible=v.collapse_eligible,
            collect=collect,
            runs=runs,
            work=work,
        )
        for v in wanted
    ]
    for i, window in backend.iter_layouts(proc, wanted):
        accs[i].add(window)
    reports = tuple(VmaReport(v, a.finish(ks, ps)) for v, a in zip(wanted, accs, strict=True))
    if not detail:
        reports = tuple(r for r in reports if r.metrics.present_pages)
    totals = rollup((r.metrics for r in reports), ks, ps)
    return ProcessReport(proc, target, reports, totals, len(vmas) - len(reports))


def build_report(
    backend: Backend,
    selected: Iterable[tuple[ProcessInfo, str | None]],
    *,
    system: bool = False,
    skipped: Iterable[Skipped] = (),
    ks: Sequence[int] = DEFAULT_KS,
    ps: Sequence[float] = DEFAULT_PS,
) -> Report:
    """Scan every selected process; those that vanish or refuse are recorded, not raised."""
    state = backend.memory_state()
    done: list[ProcessReport] = []
    skipped = list(skipped)
    for proc, target in selected:
        try:
            done.append(
                scan_process(
                    backend, proc, target=target, max_ptes_none=state.max_ptes_none, ks=ks, ps=ps
                )
            )
        except ProcessGone as e:
            skipped.append(Skipped(proc.pid, proc.comm, "exited", str(e)))
        except AccessDenied as e:
            skipped.append(Skipped(proc.pid, proc.comm, "access_denied", str(e)))
    return Report(
        time=time.time(),
        kernel=os.uname().release,
        pfn=backend.pfn_visibility(),
        max_ptes_none=state.max_ptes_none,
        ks=tuple(ks),
        ps=tuple(ps),
        processes=tuple(done),
        skipped=tuple(skipped),
        system=state if system else None,
    )


# ---------------------------------------------------------------- for the daemon


VmaKey = tuple[int, int, str, int, int, str]


def vma_key(vma: Vma) -> VmaKey:
    """What maps and smaps both say of a VMA: equal keys, the same mapping."""
    return (vma.start, vma.end, vma.perms, vma.offset, vma.inode, vma.path)


def with_known_flags(maps: Sequence[Vma], known: Mapping[VmaKey, Vma]) -> list[Vma] | None:
    """The VMAs of a maps listing with the VmFlags an earlier smaps listing gave them (the
    daemon's cheap scan: maps does not walk the target's page tables, smaps does); None
    if one is new or changed, whose flags (VM_NOHUGEPAGE, say) only smaps can tell."""
    out = []
    for v in maps:
        seen = known.get(vma_key(v))
        if seen is None:
            return None
        out.append(replace(v, vmflags=seen.vmflags))
    return out


def worth_collapsing(vma: Vma) -> bool:
    """The VMAs the daemon works on: private anonymous memory (heaps, arenas, stacks).

    File-backed text could be collapsed too (CONFIG_READ_ONLY_THP_FOR_FS), but it is small
    next to heaps and its pages are shared; leaving it out also keeps idle scans cheap.
    """
    return vma.anonymous and vma.perms[1] == "w" and vma.perms[3] == "p" and vma.collapse_eligible


def collapsible_regions(metrics: VmaMetrics) -> np.ndarray:
    """A VMA's collapsible regions as byte addresses (uint64, as a Candidate has them);
    none unless scanned with `collect`."""
    if metrics.collapsible_vpns is None:
        return _NONE
    return metrics.collapsible_vpns.astype(np.uint64) * np.uint64(PAGE_SIZE)


def huge_and_collapsible(report: ProcessReport) -> tuple[np.ndarray, np.ndarray]:
    """A scan's huge and collapsible regions over all its VMAs, as byte addresses."""
    huge = [v.metrics.thp_vpns for v in report.vmas if v.metrics.thp_vpns is not None]
    coll = [collapsible_regions(v.metrics) for v in report.vmas]
    return (
        np.concatenate(huge).astype(np.uint64) * np.uint64(PAGE_SIZE) if huge else _NONE,
        np.concatenate(coll) if coll else _NONE,
    )


_NONE = np.zeros(0, dtype=np.uint64)
