"""`memdefragd report`: a per-VMA fragmentation report of processes, now.

The two renderings (a table for people, JSON for programs) are pure functions of a
`pipeline.scan.Report`. The JSON schema is documented in docs/report-json.md; bump SCHEMA
when it changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from ..backends.kernel.backend import KernelBackend
from ..backends.protocol import Backend
from ..config import ConfigError, load_config
from ..model import PAGE_SIZE, PMD_SIZE, AccessDenied, MemoryState, ProcessGone, ProcessInfo
from ..pipeline.scan import ProcessReport, Report, Skipped, build_report
from ..pipeline.score import Rollup, VmaMetrics, free_pages, unusable_index
from ..pipeline.targets import Matcher, Target, select
from ..units import format_size
from .common import (
    Subparsers,
    add_machine_args,
    machine_scenario,
    positive_arg,
    progress_bar,
    regex_arg,
    size_arg,
)

SCHEMA = "memdefragd.report/1"

EPILOG = """\
Privileges: physical frame numbers (and so every contiguity figure) need CAP_SYS_ADMIN;
reading another user's /proc/PID/pagemap needs ptrace access (root, or CAP_SYS_PTRACE).
Without CAP_SYS_ADMIN the report still shows THP and collapsible figures and says why the
contiguity columns are blank.
"""


def set_argparser(sub: Subparsers) -> None:
    rep = sub.add_parser(
        "report",
        help="per-VMA fragmentation report (THP coverage, collapsible regions, contiguity)",
        description=(
            "Scan processes and report, per VMA and per process, how much memory is mapped\n"
            "by huge pages, how much could be collapsed, and how translation-contiguous it\n"
            "is. Filters combine: a process must pass every one given. With none, every\n"
            "process is scanned."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="scan this process (repeatable)",
    )
    rep.add_argument(
        "--name",
        type=regex_arg,
        metavar="REGEX",
        help="processes whose name (comm) matches REGEX (searched anywhere)",
    )
    rep.add_argument(
        "--cgroup",
        metavar="PATH",
        help="processes in this cgroup (v2 path, e.g. /system.slice/x.service) or below it",
    )
    rep.add_argument(
        "--min-rss",
        type=size_arg,
        default=0,
        metavar="SIZE",
        help="skip processes with less resident memory (e.g. 64M, 1GiB)",
    )
    rep.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="scan the processes the targets of this config name (labelled with the target's name)",
    )
    rep.add_argument(
        "--system",
        action="store_true",
        help="add free blocks per order, unusable free space index, THP knobs, "
        "counters and memory pressure",
    )
    rep.add_argument(
        "--json",
        action="store_true",
        help="print JSON (schema memdefragd.report/1, see docs/report-json.md); "
        "with --watch, one document per line",
    )
    rep.add_argument(
        "--all-vmas",
        action="store_true",
        help="list every VMA with resident pages in the table, not only those "
        "with at least 2 MiB resident",
    )
    rep.add_argument(
        "--watch",
        type=positive_arg,
        metavar="SECONDS",
        help="repeat every SECONDS until interrupted",
    )
    rep.add_argument(
        "--simulated",
        action="store_true",
        help="report on a simulated machine aged as the options below say, not on this kernel",
    )
    add_machine_args(rep, "simulated machine (with --simulated)")
    rep.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    targets: Sequence[Target] = [Target("", Matcher())]
    if args.config:
        try:
            targets = load_config(args.config).targets
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
    cli = Matcher(
        comm=args.name, cgroup=args.cgroup, pids=frozenset(args.pid) if args.pid else None
    )
    try:
        backend, kernel = _report_backend(args)
    except ValueError as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 2
    try:
        while True:
            procs, skipped = (
                _explicit(backend, args.pid) if args.pid else (backend.list_processes(), [])
            )
            procs = [p for p in procs if cli.matches(p) and p.rss >= args.min_rss]
            chosen = [(p, t.name or None) for p, t in select(procs, targets)]
            report = build_report(backend, chosen, system=args.system, skipped=skipped)
            if kernel:
                report = replace(report, kernel=kernel)
            if args.json:
                indent = None if args.watch else 2
                print(json.dumps(to_json(report), indent=indent), flush=True)
            else:
                print(render_text(report, min_vma_rss=0 if args.all_vmas else PMD_SIZE), flush=True)
            if not args.watch:
                break
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        backend.close()
    missing = set(args.pid) - {p.proc.pid for p in report.processes}
    return 1 if missing else 0


def _report_backend(args: argparse.Namespace) -> tuple[Backend, str]:
    """The kernel, or with --simulated an aged simulated machine and what to call it."""
    if not args.simulated:
        if args.memory is not None:
            raise ValueError("--memory describes a simulated machine: add --simulated")
        return KernelBackend(), ""
    from ..backends.sim.aging import age
    from ..backends.sim.backend import SimBackend

    scenario = machine_scenario(args)
    machine = age(scenario, progress_bar(min_seconds=1.0))
    name = (
        f"simulated ({format_size(scenario.memory)}, fragmentation {scenario.fragmentation}, "
        f"{scenario.unmovable:.1%} {scenario.unmovable_layout} unmovable, seed {scenario.seed})"
    )
    return SimBackend(machine), name


def _explicit(backend: Backend, pids: Sequence[int]) -> tuple[list[ProcessInfo], list[Skipped]]:
    """Processes asked for by pid, and those that could not even be looked up."""
    procs, skipped = [], []
    for pid in dict.fromkeys(pids):
        try:
            procs.append(backend.process(pid))
        except ProcessGone as e:
            skipped.append(Skipped(pid, "?", "exited", str(e)))
        except AccessDenied as e:
            skipped.append(Skipped(pid, "?", "access_denied", str(e)))
    return procs, skipped


# ---------------------------------------------------------------- rendering


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


def _metrics_json(
    m: VmaMetrics | Rollup, ks: Sequence[int], ps: Sequence[float]
) -> dict[str, object]:
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


def _process_json(p: ProcessReport, report: Report) -> dict[str, object]:
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


def _system_json(s: MemoryState) -> dict[str, object]:
    return {
        "zones": [
            {
                "node": z.node,
                "zone": z.zone,
                "free_blocks": list(z.free),
                "free_pages": free_pages(z.free),
                "unusable_index": [round(float(x), 6) for x in unusable_index(z.free)],
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
        idx = unusable_index(z.free)
        lines.append(f"  {'':<16} {'unusable':<12}" + "".join(f"{x:>7.3f}" for x in idx))
    lines.append("")
    counters = [f"{k}={v}" for k, v in s.vmstat.items() if v]
    lines.append("  counters (non-zero): " + ("  ".join(counters) if counters else "none"))
    return lines
