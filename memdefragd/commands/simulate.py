"""`memdefragd simulate`: age a simulated machine, run one method on it, before and after.

The figures come from the same code as on a real kernel: the machine is read through the
simulated backend and scored by `report.scan_process` (so by `layout`), pooled over every
process on the machine as one contiguity-aware TLB would see them; the unusable free space
index comes from `buddy`. What the method did comes from the machine's own counters, so
every method is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..backends.sim import baselines
from ..backends.sim.aging import BIG_MACHINE, Scenario, age
from ..backends.sim.backend import SimBackend
from ..backends.sim.machine import Machine
from ..backends.sim.ranger import ISCA_KERNEL, RFC04_KERNEL, Knobs, defrag
from ..backends.sim.seed import Seeding, seed
from ..model import PAGE_SIZE, Method
from ..pipeline.scan import scan_process
from ..pipeline.score import Rollup, free_pages, rollup, unusable_index
from ..snapshot import HostSnapshot, SnapshotError, load, save
from ..units import format_size
from .common import Subparsers, add_machine_args, machine_scenario, progress_bar
from .snapshot import add_target_args, describe, take

SCHEMA = "memdefragd.simulate/1"
HOST_SCHEMA = "memdefragd.simulate-host/1"
# The table's rows: nothing, then each method by how much it sets out to move.
METHODS = ("none", Method.COMPACTION, Method.COLLAPSE, Method.RANGER, Method.RANGER_IMPROVED)
KS = (32, 128)
PS = (0.9, 0.99)

Progress = Callable[[float, str], None]  # (fraction of this phase, what is going on)


@dataclass(frozen=True, slots=True)
class ProcessFigures:
    pid: int
    comm: str
    totals: Rollup


@dataclass(frozen=True, slots=True)
class Figures:
    """The machine's processes, pooled, and each of them, at one moment."""

    totals: Rollup
    processes: tuple[ProcessFigures, ...]
    unusable_9: float  # unusable free space index at order 9, all zones' free lists summed
    free_pages: int


@dataclass(frozen=True, slots=True)
class Work:
    """What the method did, from the machine's counters (pages unless named otherwise)."""

    pages_migrated: int
    pages_exchanged: int  # pairs
    bytes_copied: int
    thp_promoted: int
    thp_collapsed: int
    thp_split: int
    failures: dict[str, int]
    seconds: float


@dataclass(frozen=True, slots=True)
class SimResult:
    scenario: Scenario
    method: str
    before: Figures
    after: Figures
    work: Work
    aging_seconds: float
    details: dict[str, object] = field(default_factory=dict)

    @property
    def pages_moved(self) -> int:
        """Pages copied to another frame: migrated, collapsed, or exchanged (two each)."""
        return self.work.bytes_copied // PAGE_SIZE


def measure(machine: Machine) -> Figures:
    """Contiguity of every process's memory, and the free memory's fragmentation."""
    backend = SimBackend(machine)
    procs = []
    for info in backend.list_processes():
        rep = scan_process(backend, info, ks=KS, ps=PS)
        procs.append((info, rep))
    totals = rollup((v.metrics for _, r in procs for v in r.vmas), KS, PS)
    counts = np.sum([f for _, f in machine.free_blocks()], axis=0)
    return Figures(
        totals=totals,
        processes=tuple(ProcessFigures(i.pid, i.comm, r.totals) for i, r in procs),
        unusable_9=float(unusable_index(counts)[9]),
        free_pages=free_pages(counts),
    )


def apply(
    machine: Machine, method: str, progress: Progress | None = None, *, knobs: Knobs = ISCA_KERNEL
) -> Work:
    """Run `method` once over the whole machine (every process, every zone); `knobs` are
    the ranger methods' (its kernel's sysctls and THP rules)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    say = progress or (lambda fraction, stage: None)
    s0 = machine.stats.as_dict()
    failures: dict[str, int] = {}
    t0 = time.perf_counter()
    if method == "compaction":
        say(0.0, "compaction")
        _merge(failures, baselines.compact(machine).failures)
    elif method in (Method.COLLAPSE, Method.RANGER, Method.RANGER_IMPROVED):
        total = sum(p.rss_pages for p in machine.processes.values()) or 1
        done = 0
        for pid, proc in list(machine.processes.items()):
            say(done / total, f"{method} pid {pid}")
            if method == "collapse":
                for v in proc.vmas:
                    _merge(
                        failures, baselines.collapse(machine, pid, v.start_vpn, v.end_vpn).failures
                    )
            else:
                res = defrag(machine, pid, improved=method == "ranger-improved", knobs=knobs)
                _merge(failures, res.failures)
            done += proc.rss_pages
    seconds = time.perf_counter() - t0
    say(1.0, "done")
    s1 = machine.stats.as_dict()
    d = {k: s1[k] - s0[k] for k in s1}
    return Work(
        pages_migrated=d["pages_migrated"],
        pages_exchanged=d["pages_exchanged"],
        bytes_copied=d["bytes_copied"],
        thp_promoted=d["thp_promoted"],
        thp_collapsed=d["thp_collapsed"],
        thp_split=d["thp_split"],
        failures=failures,
        seconds=seconds,
    )


def _merge(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + int(v)


def simulate(
    scenario: Scenario,
    method: str,
    *,
    progress: Progress | None = None,
    keep: Callable[[str, Machine], None] | None = None,
    knobs: Knobs = ISCA_KERNEL,
) -> SimResult:
    """Age a machine by `scenario`, measure, apply `method`, measure again. `keep(when,
    machine)` sees the machine before and after (for the picture)."""
    say = progress or (lambda fraction, stage: None)
    t0 = time.perf_counter()
    machine = age(scenario, lambda f, stage: say(0.5 * f, f"aging: {stage}"))
    aging = time.perf_counter() - t0
    before = measure(machine)
    if keep is not None:
        keep("before", machine)
    work = apply(machine, method, lambda f, stage: say(0.5 + 0.5 * f, stage), knobs=knobs)
    after = measure(machine)
    if keep is not None:
        keep("after", machine)
    return SimResult(scenario, method, before, after, work, aging)


@dataclass(frozen=True, slots=True)
class HostRun:
    """Methods run on machines seeded from one snapshot: the figures before (what the
    real kernel shows), and each method's after and work."""

    snapshot: HostSnapshot
    seeding: Seeding
    seed_seconds: float
    before: Figures
    runs: tuple[tuple[str, Figures, Work], ...]


def from_snapshot(
    snap: HostSnapshot,
    methods: Sequence[str],
    progress: Progress | None = None,
    *,
    knobs: Knobs = ISCA_KERNEL,
) -> HostRun:
    """Seed a machine from `snap` for each method (each starts from the same state) and
    run it; "none" is the before column."""
    say = progress or (lambda fraction, stage: None)
    t0 = time.perf_counter()
    machine, seeding = seed(snap)
    seconds = time.perf_counter() - t0
    before = measure(machine)
    runs = []
    todo = [m for m in methods if m != "none"]
    for i, method in enumerate(todo):
        if i:
            machine, _ = seed(snap)
        share = _share(say, i, len(todo))
        work = apply(machine, method, share, knobs=knobs)
        runs.append((method, measure(machine), work))
    return HostRun(snap, seeding, seconds, before, tuple(runs))


def _share(say: Progress, i: int, n: int) -> Progress:
    """Progress of the i-th of n equal phases as a share of the whole."""
    return lambda fraction, stage: say((i + fraction) / n, stage)


def render_host(r: HostRun) -> str:
    """Before, then each method's after, side by side; then what the seeding assumed."""
    out = [
        f"seeded from {describe(r.snapshot)} (seeded in {r.seed_seconds:.2f} s)",
        f"  {'':<28}{'before':>14}" + "".join(f"{m:>17}" for m, _, _ in r.runs),
    ]
    figs = [r.before, *(f for _, f, _ in r.runs)]
    rows = [
        ("runs", [_c(f, "runs") for f in figs]),
        *((f"coverage@{k}", [_cov(f, k) for f in figs]) for k in KS),
        *((f"runs_for({p})", [_rf(f, p) for f in figs]) for p in PS),
        ("largest run", [_largest(f) for f in figs]),
        ("mean run", [_mean(f) for f in figs]),
        ("THP coverage", [_pct(f.totals.thp_coverage) for f in figs]),
        ("unusable index (order 9)", [f"{f.unusable_9:.3f}" for f in figs]),
        ("free", [format_size(f.free_pages * PAGE_SIZE) for f in figs]),
    ]
    for name, cells in rows:
        out.append(f"  {name:<28}{cells[0]:>14}" + "".join(f"{c:>17}" for c in cells[1:]))
    for method, _, w in r.runs:
        out.append(
            f"  {method}: {w.pages_migrated} pages migrated, {w.pages_exchanged} exchanged, "
            f"{w.thp_promoted} THPs promoted, {w.thp_collapsed} collapsed, in {w.seconds:.2f} s"
        )
        if w.failures:
            out.append(
                "    failures: " + ", ".join(f"{k} {v}" for k, v in sorted(w.failures.items()))
            )
    out.append("  the model, from the kernel's flags:")
    out += [f"    {n}" for n in (*r.snapshot.notes, *r.seeding.notes)]
    return "\n".join(out) + "\n"


def host_to_json(r: HostRun) -> dict[str, object]:
    s = r.snapshot
    return {
        "schema": HOST_SCHEMA,
        "snapshot": {
            "kernel": s.kernel,
            "taken": s.taken,
            "seconds": round(s.seconds, 3),
            "frames": s.nframes,
            "processes": [{"pid": p.pid, "comm": p.comm} for p in s.processes],
        },
        "seeding": {
            "frames": r.seeding.frames,
            "pages": r.seeding.pages,
            "thps": r.seeding.thps,
            "other_thps": r.seeding.other_thps,
            "notes": [*s.notes, *r.seeding.notes],
        },
        "before": _figures_json(r.before),
        "methods": {m: {"after": _figures_json(f), "work": _work_json(w)} for m, f, w in r.runs},
    }


# ---------------------------------------------------------------- output


def to_json(r: SimResult) -> dict[str, object]:
    sc = r.scenario
    return {
        "schema": SCHEMA,
        "scenario": {
            "memory_bytes": sc.memory,
            "nodes": sc.nodes,
            "fragmentation": sc.fragmentation,
            "unmovable": sc.unmovable,
            "unmovable_layout": sc.unmovable_layout,
            "free": sc.free,
            "seed": sc.seed,
        },
        "method": r.method,
        "aging_seconds": round(r.aging_seconds, 3),
        "before": _figures_json(r.before),
        "after": _figures_json(r.after),
        "work": _work_json(r.work),
    }


def _work_json(w: Work) -> dict[str, object]:
    return {
        "pages_migrated": w.pages_migrated,
        "pages_exchanged": w.pages_exchanged,
        "pages_moved": w.bytes_copied // PAGE_SIZE,
        "bytes_copied": w.bytes_copied,
        "thp_promoted": w.thp_promoted,
        "thp_collapsed": w.thp_collapsed,
        "thp_split": w.thp_split,
        "failures": dict(sorted(w.failures.items())),
        "seconds": round(w.seconds, 3),
    }


def _rollup_json(t: Rollup) -> dict[str, object]:
    c = t.contiguity
    return {
        "present_bytes": t.present_pages * PAGE_SIZE,
        "thp_bytes": t.thp_pages * PAGE_SIZE,
        "thp_coverage_ratio": t.thp_coverage,
        "runs": c.runs if c else None,
        "largest_run_pages": c.largest_run if c else None,
        "mean_run_pages": round(c.mean_run, 3) if c else None,
        "coverage_ratio": {str(k): round(c.coverage[k], 6) for k in KS} if c else None,
        "runs_for": {str(p): c.runs_for[p] for p in PS} if c else None,
    }


def _figures_json(f: Figures) -> dict[str, object]:
    return {
        **_rollup_json(f.totals),
        "unusable_index_9": round(f.unusable_9, 6),
        "free_bytes": f.free_pages * PAGE_SIZE,
        "processes": [
            {"pid": p.pid, "comm": p.comm, **_rollup_json(p.totals)} for p in f.processes
        ],
    }


def render(r: SimResult) -> str:
    sc = r.scenario
    out = [
        f"simulated {format_size(sc.memory)}, fragmentation {sc.fragmentation:.2f}, "
        f"{sc.unmovable:.1%} {sc.unmovable_layout} unmovable, seed {sc.seed}: method {r.method}",
        f"  {len(r.before.processes)} processes, "
        f"{format_size(r.before.totals.present_pages * PAGE_SIZE)} resident "
        f"(aged in {r.aging_seconds:.2f} s)",
        f"  {'':<28}{'before':>14}{'after':>14}",
    ]
    b, a = r.before, r.after
    rows = [
        ("runs", _c(b, "runs"), _c(a, "runs")),
        *((f"coverage@{k}", _cov(b, k), _cov(a, k)) for k in KS),
        *((f"runs_for({p})", _rf(b, p), _rf(a, p)) for p in PS),
        ("largest run", _largest(b), _largest(a)),
        ("mean run", _mean(b), _mean(a)),
        ("THP coverage", _pct(b.totals.thp_coverage), _pct(a.totals.thp_coverage)),
        ("unusable index (order 9)", f"{b.unusable_9:.3f}", f"{a.unusable_9:.3f}"),
        ("free", format_size(b.free_pages * PAGE_SIZE), format_size(a.free_pages * PAGE_SIZE)),
    ]
    out += [f"  {name:<28}{x:>14}{y:>14}" for name, x, y in rows]
    w = r.work
    out.append(
        f"  {w.pages_migrated} pages migrated, {w.pages_exchanged} exchanged, "
        f"{format_size(w.bytes_copied)} copied, {w.thp_promoted} THPs promoted, "
        f"{w.thp_collapsed} collapsed, {w.thp_split} split, in {w.seconds:.2f} s"
    )
    if w.failures:
        out.append("  failures: " + ", ".join(f"{k} {v}" for k, v in sorted(w.failures.items())))
    return "\n".join(out) + "\n"


def _c(f: Figures, name: str) -> str:
    c = f.totals.contiguity
    return "-" if c is None else str(getattr(c, name))


def _cov(f: Figures, k: int) -> str:
    c = f.totals.contiguity
    return "-" if c is None else f"{c.coverage[k]:.2%}"


def _rf(f: Figures, p: float) -> str:
    c = f.totals.contiguity
    return "-" if c is None else str(c.runs_for[p])


def _largest(f: Figures) -> str:
    c = f.totals.contiguity
    return "-" if c is None else f"{format_size(c.largest_run * PAGE_SIZE)}"


def _mean(f: Figures) -> str:
    c = f.totals.contiguity
    return "-" if c is None else f"{c.mean_run:.1f} pages"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


__all__ = [
    "METHODS",
    "Figures",
    "HostRun",
    "SimResult",
    "Work",
    "apply",
    "from_snapshot",
    "measure",
    "render",
    "simulate",
    "to_json",
]


# ---------------------------------------------------------------- command line


def set_argparser(sub: Subparsers) -> None:
    sim = sub.add_parser(
        "simulate",
        help="run methods on a simulated machine (aged, or seeded from a real one)",
        description=(
            "Build a simulated machine, age it until its free memory is as fragmented as\n"
            "asked, run one method over every process on it, and print the contiguity of\n"
            "their memory before and after (pooled over all processes), the free memory's\n"
            "unusable index, and what the method moved and why it failed where it did.\n"
            "\n"
            "With --from-host (root) or --from-snapshot FILE the machine is instead seeded\n"
            "from a real one: its frames as /proc/kpageflags says, its zones, and the\n"
            "chosen processes' pages at their real frames; each method runs from that same\n"
            "state, side by side, and the figures before are what `report` shows for them."
        ),
        epilog="Methods: none; compaction (Linux zone compaction); collapse (khugepaged's\n"
        "copy into free 2 MiB blocks); ranger (Translation Ranger as in its RFC);\n"
        "ranger-improved (obstacle-aware anchors, one range tree for all processes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_machine_args(sim, "simulated machine", memory=BIG_MACHINE)
    host = sim.add_argument_group("a real machine instead")
    src = host.add_mutually_exclusive_group()
    src.add_argument(
        "--from-host", action="store_true",
        help="seed from this machine now (root: needs /proc/kpageflags and frame numbers)",
    )  # fmt: skip
    src.add_argument(
        "--from-snapshot", metavar="FILE", help="seed from `memdefragd snapshot`'s FILE"
    )
    host.add_argument("--save", metavar="FILE", help="with --from-host, also save the snapshot")
    add_target_args(host)
    sim.add_argument(
        "--method",
        action="append",
        choices=[str(m) for m in METHODS],
        help="what to run (repeatable; default ranger, or ranger and ranger-improved on a "
        "real machine's snapshot)",
    )
    sim.add_argument(
        "--ranger-rules",
        choices=("rfc05", "rfc04"),
        default="rfc05",
        help="THP rules of method ranger: rfc05 (the ISCA'19 tree: a THP that cannot move "
        "whole is split; default) or rfc04 (the February 2019 posting alone, the kernel "
        "tests/ranger boots: a THP is never split, nothing is promoted)",
    )
    sim.add_argument("--json", action="store_true", help="print JSON (memdefragd.simulate/1)")
    sim.add_argument(
        "--png", metavar="FILE", help="also draw physical memory before and after into FILE"
    )
    sim.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.from_host or args.from_snapshot:
        return _main_host(args)
    if args.save or args.pid or args.config:
        print("memdefragd: --save, --pid and -c need --from-host", file=sys.stderr)
        return 2
    try:
        scenario = machine_scenario(args)
        scenario.validate()
    except ValueError as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 2
    methods = list(dict.fromkeys(args.method or ["ranger"]))
    if args.png and len(methods) > 1:
        print("memdefragd: --png draws one method: give --method once", file=sys.stderr)
        return 2
    results = []
    for method in methods:
        shots = None
        if args.png:
            from ..backends.sim.render import Snapshots

            shots = Snapshots()
        try:
            result = simulate(
                scenario, method, progress=progress_bar(min_seconds=1.0), keep=shots,
                knobs=_knobs(args),
            )  # fmt: skip
        except ValueError as e:  # a machine too small to build, a workload that cannot fit
            print(f"memdefragd: {e}", file=sys.stderr)
            return 2
        if shots is not None:
            title = (
                f"{format_size(scenario.memory)} fragmentation {scenario.fragmentation} "
                f"seed {scenario.seed}: {method}"
            )
            try:
                shots.write(args.png, title)
            except OSError as e:
                print(f"memdefragd: --png {args.png}: {e.strerror}", file=sys.stderr)
                return 1
        results.append(result)
    if args.json:
        docs = [to_json(r) for r in results]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        for result in results:
            print(render(result), end="")
        if args.png:
            print(f"  picture: {args.png}")
    return 0


def _knobs(args: argparse.Namespace) -> Knobs:
    return RFC04_KERNEL if args.ranger_rules == "rfc04" else ISCA_KERNEL


def _main_host(args: argparse.Namespace) -> int:
    """`simulate --from-host` / `--from-snapshot`: seed, run each method, side by side."""
    if args.png or args.memory is not None:
        print("memdefragd: --png and --memory describe an aged machine, not a snapshot",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.from_snapshot and (args.save or args.pid or args.config):
        print("memdefragd: --save, --pid and -c take a snapshot: use --from-host", file=sys.stderr)
        return 2
    try:
        if args.from_snapshot:
            snap = load(args.from_snapshot)
        else:
            snap = take(args)
            if args.save:
                save(snap, args.save)
    except (ValueError, SnapshotError) as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"memdefragd: {e.filename or 'snapshot'}: {e.strerror}", file=sys.stderr)
        return 1
    methods = list(dict.fromkeys(args.method or ["ranger", "ranger-improved"]))
    try:
        result = from_snapshot(snap, methods, progress_bar(min_seconds=1.0), knobs=_knobs(args))
    except ValueError as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(host_to_json(result), indent=2))
    else:
        print(render_host(result), end="")
    return 0
