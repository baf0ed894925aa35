"""Command line: `memdefragd report`, `run`, `defrag`, `simulate` and `check-config`."""

from __future__ import annotations

import argparse
import json
import os
import select as _select
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from . import __version__
from .backends import Backend
from .backends.kernel import KernelBackend
from .config import DEFAULT_PATH, ConfigError, load_config
from .model import PMD_SIZE, AccessDenied, ProcessGone, ProcessInfo
from .report import Skipped, build_report, render_text, to_json
from .targets import Matcher, Regex, RegexError, Target, select
from .units import format_size, parse_size

EPILOG = """\
Privileges: physical frame numbers (and so every contiguity figure) need CAP_SYS_ADMIN;
reading another user's /proc/PID/pagemap needs ptrace access (root, or CAP_SYS_PTRACE).
Without CAP_SYS_ADMIN the report still shows THP and collapsible figures and says why the
contiguity columns are blank.
"""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _regex(text: str) -> Regex:
    try:
        return Regex(text)  # RE2, as config patterns: the same syntax, linear time
    except RegexError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def _add_machine_args(p: argparse.ArgumentParser, memory: str, title: str) -> None:
    """The aging scenario of a simulated machine (see backends/sim/aging.py)."""
    g = p.add_argument_group(title)
    g.add_argument(
        "--memory", type=_size, default=None, metavar="SIZE",
        help=f"physical memory of the simulated machine (default {memory})",
    )  # fmt: skip
    g.add_argument(
        "--fragmentation", type=_fraction, default=0.7, metavar="F",
        help="unusable free space index at order 9 to age it to (default 0.7)",
    )  # fmt: skip
    g.add_argument(
        "--unmovable", type=_fraction, default=0.02, metavar="F",
        help="fraction of frames held by the kernel, unmovable (default 0.02)",
    )  # fmt: skip
    g.add_argument(
        "--unmovable-layout", choices=["scattered", "clustered"], default="scattered",
        help="scattered: a few kernel pages in many pageblocks (default); clustered: "
        "whole unmovable pageblocks",
    )  # fmt: skip
    g.add_argument(
        "--free", type=_fraction, default=0.25, metavar="F",
        help="fraction of memory left free after aging (default 0.25)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="aging seed (default 0)")


def _scenario(args: argparse.Namespace, memory: int):  # -> backends.sim.aging.Scenario
    from .backends.sim.aging import Scenario

    return Scenario(
        memory=args.memory if args.memory is not None else memory,
        fragmentation=args.fragmentation,
        unmovable=args.unmovable,
        unmovable_layout=args.unmovable_layout,
        free=args.free,
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memdefragd",
        description="User-space memory-contiguity agent: measures how physically fragmented "
        "processes' memory is and collapses it into huge pages.",
    )
    parser.add_argument("--version", action="version", version=f"memdefragd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        type=_regex,
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
        type=_size,
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
        "--watch", type=_positive, metavar="SECONDS", help="repeat every SECONDS until interrupted"
    )
    rep.add_argument(
        "--simulated",
        action="store_true",
        help="report on a simulated machine aged as the options below say, not on this kernel",
    )
    _add_machine_args(rep, "1G", "simulated machine (with --simulated)")
    rep.set_defaults(func=cmd_report)

    run = sub.add_parser(
        "run",
        help="run the daemon: watch the configured targets and collapse their memory",
        description=(
            "Run the daemon in the foreground: find the processes the config's targets\n"
            "name, scan them every scan_interval, and collapse their memory into huge\n"
            "pages within the configured budgets. SIGHUP reloads the config (a bad one\n"
            "keeps the old running); SIGTERM stops within seconds."
        ),
        epilog="Needs root: CAP_SYS_ADMIN (frame numbers), CAP_SYS_PTRACE and CAP_SYS_NICE\n"
        "(process_madvise on other processes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-c",
        "--config",
        default=DEFAULT_PATH,
        metavar="FILE",
        help=f"configuration file (default {DEFAULT_PATH})",
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="one cycle: discover, scan, carry out what the budget allows, exit",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and log, but never act (as if every target were in observe mode)",
    )
    run.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    run.set_defaults(func=cmd_run)

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
        default="collapse",
        choices=["collapse", "ranger"],
        help="collapse: process_madvise(MADV_COLLAPSE) (default); ranger: "
        "Translation Ranger, only on a kernel patched with it",
    )
    dfr.add_argument(
        "--range",
        metavar="START-END",
        help="only regions inside this address range (hex, as in /proc/PID/maps)",
    )
    dfr.set_defaults(func=cmd_defrag)

    sim = sub.add_parser(
        "simulate",
        help="age a simulated machine, run one method on it, print before and after",
        description=(
            "Build a simulated machine, age it until its free memory is as fragmented as\n"
            "asked, run one method over every process on it, and print the contiguity of\n"
            "their memory before and after (pooled over all processes), the free memory's\n"
            "unusable index, and what the method moved and why it failed where it did."
        ),
        epilog="Methods: none; compaction (Linux zone compaction); collapse (khugepaged's\n"
        "copy into free 2 MiB blocks); ranger (Translation Ranger as in its RFC);\n"
        "ranger-improved (obstacle-aware anchors, one range tree for all processes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_machine_args(sim, "16G", "simulated machine")
    sim.add_argument(
        "--method",
        default="ranger",
        choices=["none", "compaction", "collapse", "ranger", "ranger-improved"],
        help="what to run on it (default ranger)",
    )
    sim.add_argument("--json", action="store_true", help="print JSON (memdefragd.simulate/1)")
    sim.add_argument(
        "--png", metavar="FILE", help="also draw physical memory before and after into FILE"
    )
    sim.set_defaults(func=cmd_simulate)

    chk = sub.add_parser("check-config", help="validate a configuration file and exit")
    chk.add_argument("file", help="the YAML file to check")
    chk.set_defaults(func=cmd_check_config)
    return parser


def cmd_report(args: argparse.Namespace) -> int:
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
    from .backends.sim import SimBackend
    from .backends.sim.aging import age
    from .simulate import progress_bar

    scenario = _scenario(args, 1 << 30)
    machine = age(scenario, progress_bar())
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


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from .daemon.logs import setup_logging
    from .daemon.loop import Daemon, default_events

    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    daemon = Daemon(config, dry_run=args.dry_run, events=default_events())
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    return daemon.run(once=args.once)


def cmd_defrag(args: argparse.Namespace) -> int:
    from .daemon.loop import ranger_refusal
    from .defrag import defrag, parse_range, progress_bar, render

    if args.method == "ranger":
        print(f"memdefragd: {ranger_refusal(None)}", file=sys.stderr)
        return 2
    try:
        span = parse_range(args.range) if args.range else None
    except ValueError as e:
        print(f"memdefragd: --range: {e}", file=sys.stderr)
        return 2
    backend = KernelBackend()
    try:
        proc = backend.process(args.pid)
        result = defrag(backend, proc, span=span, progress=progress_bar())
    except (ProcessGone, AccessDenied) as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    print(render(result), end="")
    return 1 if result.stopped else 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import progress_bar, render, simulate, to_json

    try:
        scenario = _scenario(args, 16 << 30)
        scenario.validate()
    except ValueError as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 2
    shots = None
    if args.png:
        from .backends.sim.render import Snapshots

        shots = Snapshots()
    try:
        result = simulate(scenario, args.method, progress=progress_bar(), keep=shots)
    except ValueError as e:  # a machine too small to build, a workload that cannot fit
        print(f"memdefragd: {e}", file=sys.stderr)
        return 2
    if shots is not None:
        title = (
            f"{format_size(scenario.memory)} fragmentation {scenario.fragmentation} "
            f"seed {scenario.seed}: {args.method}"
        )
        try:
            shots.write(args.png, title)
        except OSError as e:
            print(f"memdefragd: --png {args.png}: {e.strerror}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print(render(result), end="")
        if args.png:
            print(f"  picture: {args.png}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """0 if the daemon would accept the file (the same checks: where it lies, owner, mode,
    size, schema), 2 with every problem found if not. It runs as root on whatever path it
    is given, so it never prints what the file says, only where and what kind of value."""
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except Exception as e:  # a bug: its message or traceback might quote the file
        print(
            f"{args.file}: could not be checked: internal error ({type(e).__name__}); "
            "please report it",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.file}: OK, {len(cfg.targets)} target(s): " + ", ".join(t.name for t in cfg.targets)
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone shows here, not as a traceback at exit
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a pipe of our own, not the reader of our output: a real error
        # `memdefragd report | head`: the reader has all it wanted. As Python's docs
        # (signal module, "Note on SIGPIPE") advise: point stdout at /dev/null, so the
        # interpreter's own flush at exit cannot fail again, and exit 1 without a word.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return code


def _stdout_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has closed it."""
    try:
        poller = _select.poll()  # (`select` is the targets' function here)
        poller.register(sys.stdout.fileno(), _select.POLLOUT)
        return any(ev & (_select.POLLERR | _select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
