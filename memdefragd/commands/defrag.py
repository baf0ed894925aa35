"""`memdefragd defrag`: one scan-plan-execute-verify pass over one process, by hand.

The same pieces as the daemon (scan_process, the Scheduler's ranking and chunking, the
kernel executor), without budgets: the operator asked for it now. Before and after
figures come from two full scans, so they show what really changed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..backends.kernel.backend import KernelBackend
from ..backends.kernel.collapse import CANCELLED, collapse
from ..backends.kernel.procs import PidHandle
from ..backends.kernel.ranger import (
    Ranger,
    RangerUnavailable,
    summarize,
    syscall_check,
    vmstat_counters,
)
from ..config import DEFAULT_PATH as DEFAULT_CONFIG
from ..config import ConfigError, load_config
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
    method: str = Method.COLLAPSE.value
    kernel_counters: dict[str, int] = field(default_factory=dict)  # ranger's vmstat deltas


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
    ranger: Ranger | None = None,
) -> DefragResult:
    """Collapse every collapsible region of `proc` (within `span`); raises ProcessGone.
    Method 'ranger' takes a `ranger` (a Translation Ranger kernel's syscall) instead."""
    if method == Method.RANGER.value:
        if ranger is None or span is not None:
            raise ValueError("method 'ranger' needs a Ranger and works on the whole process")
        return _ranger_pass(backend, proc, ranger, should_stop)
    if method != "collapse":
        raise ValueError(f"method {method!r}: only 'collapse' and 'ranger' exist here")
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


def _ranger_pass(
    backend: KernelBackend, proc: ProcessInfo, ranger: Ranger, should_stop: Callable[[], bool]
) -> DefragResult:
    """Translation Ranger's own pass over the whole process, as its launcher runs it:
    action 1 (every VMA eligible), then action 3 until the kernel says the pass is
    complete. Before and after come from our pagemap scans; what it did per 2 MiB chunk,
    and why chunks failed, from its log."""
    max_ptes_none = backend.memory_state().max_ptes_none
    before = scan_process(backend, proc, collect=True, max_ptes_none=max_ptes_none)
    counters = vmstat_counters(backend.proc_root)
    t0 = time.monotonic()
    with PidHandle(proc, backend.proc_root) as handle:
        ranger.mark_all(handle)
        done = ranger.defrag(handle, should_stop=should_stop)
    seconds = time.monotonic() - t0
    after = scan_process(backend, proc, max_ptes_none=max_ptes_none)
    summary = summarize(done.log.chunks)
    moved = {
        k: v - counters.get(k, 0)
        for k, v in vmstat_counters(backend.proc_root).items()
        if v != counters.get(k, 0)
    }
    return DefragResult(
        before, after, done.calls,
        summary.chunks * PMD_SIZE, summary.clean_chunks * PMD_SIZE,
        dict(summary.chunk_failures), "" if done.complete else CANCELLED, seconds,
        method=Method.RANGER.value, kernel_counters=moved,
    )  # fmt: skip


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
    if result.method == Method.RANGER.value:
        out.append(
            f"  Translation Ranger: {result.requests} call(s) of its pass, "
            f"{result.bytes_attempted // PMD_SIZE} 2 MiB chunk(s) worked on, "
            f"{result.bytes_done // PMD_SIZE} without a failed page, in {result.seconds:.2f} s"
        )
        if result.kernel_counters:
            out.append(
                "  kernel counters: "
                + ", ".join(f"{k} +{v}" for k, v in sorted(result.kernel_counters.items()))
            )
    else:
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
        "the daemon's budgets, and print its figures before and after. With --method\n"
        "ranger, on a kernel patched with Translation Ranger, run its pass over the\n"
        "whole process instead.",
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
        "--ranger-syscall",
        type=int,
        metavar="N",
        help="scan_process_memory's number on this Translation Ranger kernel (default: "
        "daemon.ranger.syscall of --config); checked in a child process before use",
    )
    dfr.add_argument(
        "--breakout-chunks",
        type=int,
        metavar="N",
        help="ranger: 2 MiB chunks per call of its pass (num_breakout_chunks, put back "
        "after; default: daemon.ranger.breakout_chunks of --config, else left as it is)",
    )
    dfr.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        help=f"config to take the ranger settings from (default: {DEFAULT_CONFIG}, if present)",
    )
    dfr.add_argument(
        "--range",
        metavar="START-END",
        help="only regions inside this address range (hex, as in /proc/PID/maps)",
    )
    dfr.set_defaults(func=main)


def _ranger(args: argparse.Namespace) -> Ranger:
    """The Ranger this command line asks for, its number checked in a child process;
    RangerUnavailable (or ConfigError) says why not."""
    nr, chunks = args.ranger_syscall, args.breakout_chunks
    if (nr is None or chunks is None) and os.path.exists(args.config):
        daemon = load_config(args.config).daemon
        nr = daemon.ranger_syscall if nr is None else nr
        chunks = daemon.ranger_breakout_chunks if chunks is None else chunks
    ranger = Ranger(nr, breakout_chunks=chunks)
    wrong = syscall_check(ranger.syscall_nr)
    if wrong is not None:
        raise RangerUnavailable(wrong)
    return ranger


def main(args: argparse.Namespace) -> int:
    try:
        span = parse_range(args.range) if args.range else None
    except ValueError as e:
        print(f"memdefragd: --range: {e}", file=sys.stderr)
        return 2
    ranger = None
    if args.method == Method.RANGER.value:
        if span is not None:
            print("memdefragd: --range: Translation Ranger's pass covers the whole process",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            ranger = _ranger(args)
        except (RangerUnavailable, ConfigError, ValueError) as e:
            why = str(e) if str(e).startswith("method 'ranger'") else f"method 'ranger': {e}"
            print(f"memdefragd: {why}", file=sys.stderr)
            return 2
    backend = KernelBackend()
    reason = None if ranger else backend.refusal(args.method)
    if reason is not None:  # a kernel before 6.1: say so rather than fail per region
        backend.close()
        print(f"memdefragd: method {args.method!r}: {reason}", file=sys.stderr)
        return 2
    try:
        proc = backend.process(args.pid)
        result = defrag(
            backend, proc, method=args.method, span=span, progress=_bytes_bar(), ranger=ranger
        )
    except (ProcessGone, AccessDenied) as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    print(render(result), end="")
    return 1 if result.stopped else 0
