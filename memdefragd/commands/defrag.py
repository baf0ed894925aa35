"""`memdefragd defrag`: one scan-plan-execute-verify pass over one process, by hand.

The same pieces as the daemon (scan_process, the Scheduler's ranking and chunking, the
kernel executor), without budgets: the operator asked for it now. Before and after
figures come from two full scans, so they show what really changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..backends.kernel.backend import KernelBackend
from ..backends.kernel.collapse import collapse
from ..backends.kernel.procs import PidHandle
from ..model import PAGE_SIZE, PMD_SIZE, AccessDenied, Method, ProcessGone, ProcessInfo
from ..pipeline.plan.scheduler import Candidate, Scheduler, SchedulerSettings
from ..pipeline.scan import ProcessReport, scan_process
from ..pipeline.score import Rollup
from ..pipeline.targets import Target
from ..units import format_size
from .common import Subparsers, progress_bar


@dataclass(frozen=True, slots=True)
class DefragResult:
    before: ProcessReport
    after: ProcessReport
    requests: int
    bytes_attempted: int
    bytes_done: int
    failures: dict[str, int]
    stopped: str
    seconds: float


def parse_range(text: str) -> tuple[int, int]:
    """'START-END' in hex (0x optional), as /proc/PID/maps prints it."""
    try:
        lo, hi = (int(x, 16) for x in text.split("-", 1))
    except ValueError as e:
        raise ValueError(f"expected START-END in hex, e.g. 7f0000000000-7f0040000000: {e}") from e
    if hi <= lo:
        raise ValueError(f"range end 0x{hi:x} is not above its start 0x{lo:x}")
    return lo, hi


def defrag(
    backend: KernelBackend,
    proc: ProcessInfo,
    *,
    method: str = "collapse",
    span: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> DefragResult:
    """Collapse every collapsible region of `proc` (within `span`); raises ProcessGone."""
    if method != "collapse":
        raise ValueError(f"method {method!r}: only 'collapse' is available on this kernel")
    max_ptes_none = backend.memory_state().max_ptes_none
    before = scan_process(backend, proc, collect=True, max_ptes_none=max_ptes_none)
    me = Target("defrag")
    candidates = []
    for v in before.vmas:
        vpns = v.metrics.collapsible_vpns
        if vpns is None or not vpns.size:
            continue
        c = Candidate.from_metrics(me, proc.pid, proc.start_time, v.vma, v.metrics)
        if span is not None:
            inside = (c.regions >= span[0]) & (c.regions + np.uint64(PMD_SIZE) <= span[1])
            c = replace(c, regions=c.regions[inside], present=c.present[inside])
        candidates.append(c)
    unlimited = SchedulerSettings(bytes_per_second=1 << 50, cpu_share=1.0)
    sched = Scheduler(unlimited)
    t0 = time.monotonic()
    sched.plan(candidates, t0)
    total, done_bytes, attempted, requests = sched.queue_bytes, 0, 0, 0
    failures: Counter[str] = Counter()
    stopped = ""
    progress(0, total)
    with PidHandle(proc) as handle:
        while not should_stop() and (req := sched.next_request(time.monotonic())) is not None:
            out = collapse(handle, req, should_stop=should_stop)
            sched.record(out, time.monotonic())
            requests += 1
            attempted += out.bytes_attempted
            done_bytes += out.bytes_done
            failures.update(out.failures)
            progress(attempted, total)
            if out.stopped in ("ESRCH", "EPERM", "ENOMEM", "EBUSY"):
                stopped = out.stopped
                break
    seconds = time.monotonic() - t0
    after = scan_process(backend, proc, max_ptes_none=max_ptes_none)
    return DefragResult(
        before, after, requests, attempted, done_bytes, dict(failures), stopped, seconds
    )


def _bytes_bar() -> Callable[[int, int], None]:
    """The progress bar, fed bytes done of bytes to do."""
    show = progress_bar()

    def bytes_done(done: int, total: int) -> None:
        label = f"{format_size(done)} of {format_size(total)}"
        show(done / total if total else 1.0, label)

    return bytes_done


def render(result: DefragResult) -> str:
    b, a = result.before.totals, result.after.totals
    rows = [
        ("THP", size_arg(b.thp_pages), size_arg(a.thp_pages)),
        ("THP coverage", _pct(b.thp_coverage), _pct(a.thp_coverage)),
        ("collapsible regions", str(b.collapsible_regions), str(a.collapsible_regions)),
        ("contiguity runs", _runs(b), _runs(a)),
        ("largest run", _largest(b), _largest(a)),
        ("coverage@32", _cov(b, 32), _cov(a, 32)),
    ]
    p = result.before.proc
    out = [f"PID {p.pid}  {p.comm}", f"  {'':<22}{'before':>14}{'after':>14}"]
    out += [f"  {name:<22}{x:>14}{y:>14}" for name, x, y in rows]
    out.append(
        f"  {result.requests} request(s), {format_size(result.bytes_attempted)} attempted, "
        f"{format_size(result.bytes_done)} collapsed in {result.seconds:.2f} s"
    )
    if result.failures:
        out.append(
            "  failures: " + ", ".join(f"{k} {v}" for k, v in sorted(result.failures.items()))
        )
    if result.stopped:
        out.append(f"  stopped early: {result.stopped}")
    return "\n".join(out) + "\n"


def size_arg(pages: int) -> str:
    return format_size(pages * PAGE_SIZE)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _runs(r: Rollup) -> str:
    return "-" if r.contiguity is None else str(r.contiguity.runs)


def _largest(r: Rollup) -> str:
    return "-" if r.contiguity is None else f"{r.contiguity.largest_run} pages"


def _cov(r: Rollup, k: int) -> str:
    return "-" if r.contiguity is None else f"{r.contiguity.coverage.get(k, 0):.1%}"


# ---------------------------------------------------------------- command line


def set_argparser(sub: Subparsers) -> None:
    dfr = sub.add_parser(
        "defrag",
        help="one pass over one process now: scan, collapse, verify, print before/after",
        description="Collapse every collapsible 2 MiB region of one process now, without\n"
        "the daemon's budgets, and print its figures before and after.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dfr.add_argument("--pid", type=int, required=True, help="the process")
    dfr.add_argument(
        "--method",
        default=Method.COLLAPSE.value,
        choices=[Method.COLLAPSE.value, Method.RANGER.value],
        help="collapse: process_madvise(MADV_COLLAPSE) (default); ranger: "
        "Translation Ranger, only on a kernel patched with it",
    )
    dfr.add_argument(
        "--range",
        metavar="START-END",
        help="only regions inside this address range (hex, as in /proc/PID/maps)",
    )
    dfr.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..backends.kernel.ranger import ranger_refusal

    if args.method == "ranger":
        print(f"memdefragd: {ranger_refusal(None)}", file=sys.stderr)
        return 2
    try:
        span = parse_range(args.range) if args.range else None
    except ValueError as e:
        print(f"memdefragd: --range: {e}", file=sys.stderr)
        return 2
    backend = KernelBackend()
    reason = backend.refusal(args.method)
    if reason is not None:  # a kernel before 6.1: say so rather than fail per region
        backend.close()
        print(f"memdefragd: method {args.method!r}: {reason}", file=sys.stderr)
        return 2
    try:
        proc = backend.process(args.pid)
        result = defrag(backend, proc, span=span, progress=_bytes_bar())
    except (ProcessGone, AccessDenied) as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    print(render(result), end="")
    return 1 if result.stopped else 0
