"""`memdefragd report`: scan processes, score their VMAs, and say so plainly.

Scanning goes through the backend protocol, scoring through `layout`, and the two
renderings (a table for people, JSON for programs) are pure functions of a `Report`.
The JSON schema is documented in docs/report-json.md; bump SCHEMA when it changes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from . import buddy
from .backends import Backend
from .layout import DEFAULT_KS, DEFAULT_PS, Rollup, VmaAccumulator, VmaMetrics, rollup
from .model import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_PAGES,
    PMD_SIZE,
    AccessDenied,
    MemoryState,
    PfnVisibility,
    ProcessGone,
    ProcessInfo,
    Vma,
)
from .units import format_size

SCHEMA = "memdefragd.report/1"


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
) -> ProcessReport:
    """Scan one process, window by window; raises ProcessGone or AccessDenied.

    With `detail`, VMAs come from smaps and those with nothing resident are not read;
    without, from maps, and PAGEMAP_SCAN finds the empty ones just as cheaply. With
    `collect`, each VMA's metrics list its collapsible regions (for the scheduler);
    `runs=False` skips the contiguity figures; `only` picks the VMAs worth reading.
    """
    vmas = backend.list_vmas(proc, detail=detail)
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


# ---------------------------------------------------------------- JSON


def to_json(report: Report) -> dict[str, object]:
    return {
        "schema": SCHEMA,
        "time": round(report.time, 3),
        "kernel": report.kernel,
        "page_size": PAGE_SIZE,
        "pmd_size": PMD_SIZE,
        "pfn_visible": report.pfn.visible,
        "pfn_unavailable_reason": None if report.pfn.visible else report.pfn.reason,
        "max_ptes_none": report.max_ptes_none,
        "processes": [_process_json(p, report) for p in report.processes],
        "skipped": [
            {"pid": s.pid, "comm": s.comm, "reason": s.reason, "detail": s.detail}
            for s in report.skipped
        ],
        "system": _system_json(report.system) if report.system else None,
    }


def _metrics_json(m: VmaMetrics | Rollup, ks: Sequence[int], ps: Sequence[float]) -> dict:
    c = m.contiguity
    return {
        "present_bytes": m.present_pages * PAGE_SIZE,
        "thp_bytes": m.thp_pages * PAGE_SIZE,
        "aligned_regions": m.aligned_regions,
        "thp_regions": m.thp_regions,
        "thp_coverage_ratio": m.thp_coverage,
        "collapsible_regions": m.collapsible_regions,
        "aligned_contiguous_regions": m.aligned_contiguous_regions,
        "contiguity": None
        if c is None
        else {
            "runs": c.runs,
            "largest_run_pages": c.largest_run,
            "mean_run_pages": round(c.mean_run, 3),
            "coverage_ratio": {str(k): round(c.coverage[k], 6) for k in ks},
            "runs_for": {str(p): c.runs_for[p] for p in ps},
        },
    }


def _process_json(p: ProcessReport, report: Report) -> dict:
    return {
        "pid": p.proc.pid,
        "comm": p.proc.comm,
        "cmdline": list(p.proc.cmdline),
        "exe": p.proc.exe,
        "uid": p.proc.uid,
        "cgroup": p.proc.cgroup,
        "start_time_ticks": p.proc.start_time,
        "rss_bytes": p.proc.rss,
        "target": p.target,
        "empty_vmas": p.empty_vmas,
        "totals": _metrics_json(p.totals, report.ks, report.ps),
        "vmas": [
            {
                "start": f"0x{v.vma.start:x}",
                "end": f"0x{v.vma.end:x}",
                "perms": v.vma.perms,
                "path": v.vma.path,
                "size_bytes": v.vma.size,
                "rss_bytes": v.vma.rss,
                "smaps_pmd_mapped_bytes": v.vma.pmd_mapped,
                "collapse_eligible": v.vma.collapse_eligible,
                **_metrics_json(v.metrics, report.ks, report.ps),
            }
            for v in p.vmas
        ],
    }


def _system_json(s: MemoryState) -> dict:
    return {
        "zones": [
            {
                "node": z.node,
                "zone": z.zone,
                "free_blocks": list(z.free),
                "free_pages": buddy.free_pages(z.free),
                "unusable_index": [round(float(x), 6) for x in buddy.unusable_index(z.free)],
            }
            for z in s.zones
        ],
        "pagetype_free": None
        if s.pagetype_free is None
        else [
            {"node": n, "zone": z, "type": t, "free_blocks": list(f)}
            for (n, z, t), f in s.pagetype_free.items()
        ],
        "thp": dict(s.thp),
        "khugepaged": dict(s.khugepaged),
        "vmstat": dict(s.vmstat),
        "pressure": None
        if s.pressure_some is None
        else {
            kind: None
            if pr is None
            else {
                "avg10": pr.avg10,
                "avg60": pr.avg60,
                "avg300": pr.avg300,
                "total_us": pr.total_us,
            }
            for kind, pr in (("some", s.pressure_some), ("full", s.pressure_full))
        },
    }


# ---------------------------------------------------------------- text


def render_text(report: Report, *, min_vma_rss: int = PMD_SIZE) -> str:
    out: list[str] = []
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.time))
    out.append(f"memdefragd report  {stamp}  kernel {report.kernel}")
    if not report.pfn.visible:
        out.append(f"PFNs unavailable: {report.pfn.reason}.")
        out.append("Contiguity columns (ALIGNC, RUNS ... R99) are left blank, not guessed.")
    out.append("")
    known = report.pfn.visible
    if not report.processes:
        out.append("No process scanned." if report.skipped else "No process matched.")
    else:
        out.append(_HEADER)
    for p in report.processes:
        out.extend(_render_process(p, report, known, min_vma_rss))
        out.append("")
    if report.skipped:
        out.append(f"Skipped {len(report.skipped)} process(es):")
        for s in report.skipped:
            out.append(f"  {s.pid:>7} {s.comm:<16} {s.reason}: {s.detail}")
        out.append("")
    if report.system is not None:
        out.extend(_render_system(report.system))
    return "\n".join(out).rstrip() + "\n"


_HEADER = (
    f"  {'ADDRESS':<29} {'PERM':4} {'SIZE':>9} {'RSS':>9} {'THP':>9} {'THP%':>5} "
    f"{'COLLAPS':>7} {'ALIGNC':>6} {'RUNS':>7} {'LARGEST':>7} {'MEAN':>7} "
    f"{'COV@32':>6} {'COV@128':>7} {'R90':>6} {'R99':>6}  PATH"
)


def _render_process(p: ProcessReport, report: Report, known: bool, min_rss: int) -> list[str]:
    proc = p.proc
    head = f"PID {proc.pid}  {proc.comm}"
    if p.target:
        head += f"  target={p.target}"
    head += f"  rss {format_size(proc.rss)}  cgroup {proc.cgroup or '-'}"
    lines = [head]
    shown = [v for v in p.vmas if v.vma.rss >= min_rss]
    for v in shown:
        lines.append(
            _row(
                f"{v.vma.start:012x}-{v.vma.end:012x}", v.vma.perms, format_size(v.vma.size),
                format_size(v.vma.rss), v.metrics, report, known, v.vma.path or "[anon]",
            )
        )  # fmt: skip
    hidden = len(p.vmas) - len(shown)
    t = p.totals
    lines.append(
        _row(
            f"total ({t.vmas} VMAs)", "", "", format_size(t.present_pages * PAGE_SIZE), t, report,
            known, f"{hidden} smaller VMAs not listed" if hidden else "",
        )
    )  # fmt: skip
    return lines


def _row(
    addr: str, perms: str, size: str, rss: str, m: VmaMetrics | Rollup, report: Report,
    known: bool, path: str,
) -> str:  # fmt: skip
    cov = "-" if m.thp_coverage is None else f"{m.thp_coverage:.0%}"
    c = m.contiguity if known else None
    ac = m.aligned_contiguous_regions if known else None

    def opt(x: object, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    k1, k2 = report.ks[0], report.ks[-1]
    p1, p2 = report.ps[0], report.ps[-1]
    return (
        f"  {addr:<29} {perms:4} {size:>9} {rss:>9} {format_size(m.thp_pages * PAGE_SIZE):>9} "
        f"{cov:>5} {m.collapsible_regions:>7} {opt(ac, 'd'):>6} "
        f"{opt(c and c.runs, 'd'):>7} {opt(c and c.largest_run, 'd'):>7} "
        f"{opt(c and c.mean_run, '.1f'):>7} {opt(c and c.coverage[k1], '.1%'):>6} "
        f"{opt(c and c.coverage[k2], '.1%'):>7} {opt(c and c.runs_for[p1], 'd'):>6} "
        f"{opt(c and c.runs_for[p2], 'd'):>6}  {path}"
    ).rstrip()


def _render_system(s: MemoryState) -> list[str]:
    lines = ["System memory"]
    lines.append("  THP: " + "  ".join(f"{k}={v}" for k, v in s.thp.items()))
    lines.append("  khugepaged: " + "  ".join(f"{k}={v}" for k, v in s.khugepaged.items()))
    if s.pressure_some is not None:
        some, full = s.pressure_some, s.pressure_full
        text = f"some avg10={some.avg10:.2f} avg60={some.avg60:.2f} avg300={some.avg300:.2f}"
        if full is not None:
            text += f"; full avg10={full.avg10:.2f} avg60={full.avg60:.2f}"
        lines.append(f"  memory pressure (% of time stalled): {text}")
    orders = max((len(z.free) for z in s.zones), default=0)
    lines.append("")
    lines.append(f"  {'ZONE':<16} {'':<12}" + "".join(f"{o:>7}" for o in range(orders)))
    for z in s.zones:
        name = f"node{z.node} {z.zone}"
        lines.append(f"  {name:<16} {'free blocks':<12}" + "".join(f"{n:>7}" for n in z.free))
        idx = buddy.unusable_index(z.free)
        lines.append(f"  {'':<16} {'unusable':<12}" + "".join(f"{x:>7.3f}" for x in idx))
    lines.append("")
    counters = [f"{k}={v}" for k, v in s.vmstat.items() if v]
    lines.append("  counters (non-zero): " + ("  ".join(counters) if counters else "none"))
    return lines
