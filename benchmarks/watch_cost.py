"""What the daemon's watching alone costs a big target (issue 16, item 1), current tree next
to a baseline, in one run.

    sudo .venv/bin/python benchmarks/watch_cost.py [--sizes 1,4,8] [--seconds 60]
        [--scan-interval 10s] [--cases watch,observe,collapse] [--baseline DIR] [--timeout 900]

DIR holds an older `memdefragd/` package, e.g. the tree before "Watching cheaply":

    mkdir /tmp/mdd-base && git -C /work/main archive 680f9f7 | tar -x -C /tmp/mdd-base

The target is benchmarks/latency.py's C program (random 8-byte reads over one heap, every
read timed on its own, a histogram split by SIGUSR1), of each --sizes GiB. Per size:

  watch     the heap born huge (MADV_HUGEPAGE before populating, MADV_COLLAPSE after for
            whatever fell back to 4 KiB pages: the figure "huge at start"), so the daemon
            has nothing to collapse and only watches: discovery, scans (VMA listing,
            pagemap), access figures, planning. Timed for --seconds from the daemon's
            start, reported whole and split into the first 10 s (the start-up spike: the
            interpreter's start, the first smaps listing, the first access window) and
            the rest.
  observe   the heap of 4 KiB pages, the target in `mode: observe`: the daemon scans and
            samples access over full-size page tables (what a smaps walk or clear_refs
            costs grows with them) but never collapses; timed as watch.
  collapse  the heap of 4 KiB pages, everything to collapse: timed from the daemon's
            start to 90% THP coverage (what latency.py's paced run does; --timeout caps
            it), split the same way. Coverage is watched as latency.py does.

Each case has an unwatched twin: the same heap (born huge for watch, 4 KiB pages for
observe and collapse) timed for --seconds with no daemon, split at 10 s the same way; the ratios are
watched / twin window by window (p99 of the whole window over the twin's whole window,
first 10 s over the twin's first 10 s). Every run has a fresh target, and runs go one after
another, never side by side (2 CPUs: a second target or daemon would compete for them):
per size the watch twin, the current tree's daemon, the baseline's; then the same for
collapse. Each target gets 2 s of unmeasured reads before its window.

The daemon is `python -m memdefragd.cli run -c CONFIG` with PYTHONPATH and cwd set to its
tree (so nothing here imports the package), on a config naming the target's comm with
scan_interval --scan-interval (10s by default) and the metrics endpoint on a free loopback
port; everything else is the default: budgets, pacing (latency-sensitive, duty cycle 10%),
access source auto (DAMON where usable, else clear_refs + smaps Referenced, skipped above
access.referenced_max_rss, 4 GiB, in the current tree: a heap of 4 GiB is above it too, the
program's own pages count), the pressure guard. Per daemon run: its CPU time (utime +
stime, /proc/PID/stat) in the first 10 s and over the whole window, its peak RSS (VmHWM),
and from one scrape at the window's end (after the target's figures are taken)
memdefragd_scan_duration_seconds_sum/_count and memdefragd_vma_listings_total{source}
("-" where the tree has no such metric); from its log: full cycles, the access source and
whether clear_refs was skipped for the target, whether a cycle overran half the interval,
collapse requests, WARNING/ERROR lines.

Figures and ratios are printed; nothing about time is asserted. Every child (targets,
daemons) is killed on any exit, Ctrl-C included. Root is needed, and MemAvailable for the
largest target plus 1.5 GiB (the default pressure.min_available of 1 GiB, the daemon).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import REPO, coverage, cpu, progress, status_kib, vmstat  # benchmarks/daemon.py
from hostile import Tree, free_port, kill_group, write_root_file  # benchmarks/hostile.py
from latency import GOAL, PMD, GiB, Target, build, merged, wait_goal  # benchmarks/latency.py

STARTUP = 10.0  # seconds: the start-up window, reported on its own
WARMUP = 2.0  # unmeasured reads before each window (caches, the clock)
TERM_CAP = 10.0  # SIGTERM to exit, then SIGKILL
SLACK = 1.5 * GiB  # MemAvailable beyond the target: pressure.min_available (1 GiB), daemon
CASES = ("watch", "observe", "collapse")
WATCHING = ("watch", "observe")  # a fixed window; collapse runs to its goal

_cleanups: list[Callable[[], None]] = []


def cleanup_all() -> None:
    while _cleanups:
        with contextlib.suppress(Exception):
            _cleanups.pop()()


# ----------------------------------------------------------------------------- the daemon


class DaemonRun:
    """`memdefragd run` of one tree; its log lines stamped as they arrive."""

    def __init__(self, tree: Tree, config: Path, port: int):
        self.port = port
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memdefragd.cli", "run", "-c", str(config)],
            cwd=tree.root,
            env={**os.environ, "PYTHONPATH": str(tree.root), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        _cleanups.append(lambda: kill_group(self.proc))
        self.lines: list[tuple[float, str]] = []  # (seconds since start, line)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float | None:
        with contextlib.suppress(OSError, IndexError, ValueError):
            return sum(cpu(self.proc.pid))
        return None

    def hwm(self) -> int | None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            return status_kib(self.proc.pid, "VmHWM") * 1024
        return None

    def wait_until(self, when: float) -> None:
        """Sleep until monotonic `when`; RuntimeError if the daemon exits meanwhile."""
        while (left := when - time.monotonic()) > 0:
            if not self.alive():
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}")
            time.sleep(min(0.25, left))

    def scrape(self) -> str | None:
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode(errors="replace")
        except OSError:
            return None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TERM_CAP)
            except subprocess.TimeoutExpired:
                kill_group(self.proc)
        kill_group(self.proc)  # its session too
        self.reader.join(5)

    def tail(self) -> str:
        return " | ".join(text for _, text in self.lines[-3:]) or "(no output)"


def config_text(comm: str, interval: str, port: int, observe: bool = False) -> str:
    return (
        "daemon:\n"
        f"  scan_interval: {interval}\n"
        f'  metrics: {{listen: "127.0.0.1:{port}"}}\n'
        "targets:\n  - name: bench\n" + ("    mode: observe\n" if observe else "") + "    match:\n"
        f"      comm: {json.dumps('^' + re.escape(comm) + '$')}\n"
    )


def metric(text: str | None, name: str) -> dict[str, float]:
    """Samples of one metric in a scrape, by their label set ('' for none)."""
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text or "", re.M):
        with contextlib.suppress(ValueError):
            out[m[1] or ""] = float(m[2])
    return out


def daemon_figures(d: DaemonRun, scraped: str | None) -> dict:
    text = "\n".join(line for _, line in d.lines)
    scan_sum = metric(scraped, "memdefragd_scan_duration_seconds_sum").get("")
    scan_count = metric(scraped, "memdefragd_scan_duration_seconds_count").get("")
    listings = {
        re.sub(r'.*source="([^"]*)".*', r"\1", k): v
        for k, v in metric(scraped, "memdefragd_vma_listings_total").items()
    }
    if "DAMON" in text and "access-aware priority from DAMON" in text:
        access = "DAMON"
    elif "clear_refs" in text and "priority from clear_refs" in text:
        access = "clear_refs"
        if "above access.referenced_max_rss" in text:
            access += " skipped"
    elif "access-aware priority off" in text:
        access = "off"
    else:
        access = "?"
    first = next((t for t, line in d.lines if "scanned" in line), None)
    return {
        "scrape": scraped is not None,
        "scan_sum": scan_sum,
        "scan_count": scan_count,
        "listings": listings,
        "cycles": len(re.findall(r"scanned \d+ process\(es\)", text)),
        "first_scan": first,
        "access": access,
        "stretched": "more than half of scan_interval" in text,
        "requests": text.count("collapse pid"),
        "warnings": len(re.findall(r" (WARNING|ERROR|CRITICAL) ", text)),
        "tracebacks": text.count("Traceback (most recent call last)"),
    }


# ----------------------------------------------------------------------------- one run


@dataclass
class Run:
    case: str
    label: str  # twin, current, baseline
    populate: float = 0.0
    start_cov: float | None = None
    windows: dict[str, dict] = field(default_factory=dict)  # all, first, after
    cpu_first: float | None = None
    cpu_all: float | None = None
    hwm: int | None = None
    to_goal: float | None = None
    daemon: dict = field(default_factory=dict)
    error: str = ""


def split(run: Run, first: dict, rest: dict | None) -> None:
    run.windows["first"] = first
    if rest is not None and rest["ops"]:
        run.windows["after"] = rest
        run.windows["all"] = merged(first, rest)
    else:
        run.windows["all"] = first


def one_run(exe: Path, size: int, case: str, tree: Tree | None, args, tmp: Path, tag: str) -> Run:
    label = tree.label if tree else "twin"
    run = Run(case, label)
    comm = f"mddwc{tag}{case[0]}{label[0]}"[:15]
    p0 = time.monotonic()
    t = Target(exe, size, comm, huge=case == "watch")
    _cleanups.append(t.stop)
    d: DaemonRun | None = None
    try:
        run.populate = time.monotonic() - p0
        run.start_cov = coverage(t.p.pid, t.addr)  # smaps: before the window, never in it
        time.sleep(WARMUP)
        t.figures()  # the window starts here
        first_len = min(STARTUP, args.seconds)
        if tree is None:
            time.sleep(first_len)
            first = t.figures()
            rest = None
            if args.seconds > first_len:
                time.sleep(args.seconds - first_len)
                rest = t.figures()
            split(run, first, rest)
            return run
        port = free_port()
        config = tmp / f"{comm}.yaml"
        text = config_text(comm, args.scan_interval, port, observe=case == "observe")
        write_root_file(config, text.encode())
        base = vmstat("thp_collapse_alloc")
        d = DaemonRun(tree, config, port)
        try:
            if case in WATCHING:
                d.wait_until(d.t0 + first_len)
                first, run.cpu_first = t.figures(), d.cpu()
                rest = None
                if args.seconds > first_len:
                    d.wait_until(d.t0 + args.seconds)
                    rest = t.figures()
            else:
                done = wait_goal(t, base, STARTUP, d.proc)
                first, run.cpu_first = t.figures(), d.cpu()
                rest = None
                if done is None:
                    done = wait_goal(t, base, max(0.0, args.timeout - STARTUP), d.proc)
                    rest = t.figures()
                run.to_goal = None if done is None else done - d.t0
        except RuntimeError as e:  # the daemon exited, or the target did
            run.error = f"{e}; daemon log: {d.tail()}"[:300]
            return run
        split(run, first, rest)
        run.cpu_all, run.hwm = d.cpu(), d.hwm()
        run.daemon = daemon_figures(d, d.scrape())
        return run
    finally:
        if d is not None:
            d.stop()
        t.stop()


# ----------------------------------------------------------------------------- output


def x(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f}"


WINDOW_NAMES = {"all": "whole", "first": f"first {STARTUP:g}s", "after": f"after {STARTUP:g}s"}


def print_size(size: int, case: str, runs: list[Run]) -> None:
    twin = next((r for r in runs if r.label == "twin"), None)
    what = {
        "watch": "heap born huge, nothing to collapse: the daemon only watches",
        "observe": "heap of 4 KiB pages, the target in observe mode: the daemon scans and "
        "samples access (full-size page tables to walk), never collapses",
    }.get(case, f"heap of 4 KiB pages, everything to collapse: daemon start to {GOAL:.0%} huge")
    print(f"{size / GiB:g} GiB, {case}: {what}")
    head = (
        f"  {'run':<9} {'window':<10} {'s':>6} {'M/s':>5} {'p50':>5} {'p99':>6} {'p99.9':>7} "
        f"{'max ms':>7}   {'p50/twin':>8} {'p99/twin':>8} {'p99.9/tw':>8} {'max/twin':>8}"
    )
    print(head)
    for r in runs:
        cov = "-" if r.start_cov is None else f"{r.start_cov:.1%}"
        note = f"populated in {r.populate:.1f} s, huge at start {cov}"
        if r.error:
            print(f"  {r.label:<9} error: {r.error}  ({note})")
            continue
        for key in ("all", "first", "after"):
            w = r.windows.get(key)
            if w is None or (key == "first" and "after" not in r.windows):
                continue  # (no "after": the first window was all of it)
            tw = twin.windows.get(key) if twin and r is not twin else None
            ratios = "" if tw is None else (
                f"   {x(w['p50'], tw['p50']):>8} {x(w['p99'], tw['p99']):>8} "
                f"{x(w['p999'], tw['p999']):>8} {x(w['max'], tw['max']):>8}"
            )  # fmt: skip
            rate = w["ops"] / w["seconds"] / 1e6 if w["seconds"] else 0.0
            print(
                f"  {r.label if key == 'all' else '':<9} {WINDOW_NAMES[key]:<10} "
                f"{w['seconds']:>6.1f} {rate:>5.2f} {w['p50']:>5.0f} {w['p99']:>6.0f} "
                f"{w['p999']:>7.0f} {ms(w['max']):>7}{ratios}"
            )
        print(f"  {'':<9} ({note})")
    daemons = [r for r in runs if r.label != "twin" and not r.error]
    if daemons:
        print(
            f"  {'daemon':<9} {'CPU s: 10s / all':>16} {'share':>6} {'cycles':>6} "
            f"{'scans':>5} {'ms/scan':>7} {'listings smaps/maps':>19} {'1st scan':>8} "
            f"{'RSS MiB':>7} {'requests':>8} {'to 90%':>7}  access, notes"
        )
    for r in daemons:
        dd = r.daemon
        share = (
            "-"
            if r.cpu_all is None or not r.windows["all"]["seconds"]
            else f"{r.cpu_all / r.windows['all']['seconds']:.1%}"
        )
        per_scan = (
            f"{dd['scan_sum'] / dd['scan_count'] * 1e3:.1f}"
            if dd.get("scan_count") and dd.get("scan_sum") is not None
            else "-"
        )
        scans = "-" if dd.get("scan_count") is None else f"{dd['scan_count']:.0f}"
        lst = dd.get("listings") or {}
        listings = (
            f"{lst.get('smaps', 0):.0f}/{lst.get('maps', 0):.0f}" if lst else "-"
        )  # fmt: skip
        notes = [dd.get("access", "?")]
        if dd.get("stretched"):
            notes.append("a cycle overran half the interval")
        if not dd.get("scrape"):
            notes.append("no scrape answered")
        if dd.get("warnings") or dd.get("tracebacks"):
            notes.append(f"{dd['warnings']} WARNING+ lines, {dd['tracebacks']} tracebacks")
        goal = "-" if case in WATCHING else (secs(r.to_goal) if r.to_goal else "timeout")
        print(
            f"  {r.label:<9} {secs(r.cpu_first):>7} / {secs(r.cpu_all):>6} {share:>6} "
            f"{dd.get('cycles', 0):>6} {scans:>5} {per_scan:>7} {listings:>19} "
            f"{secs(dd.get('first_scan')):>8} "
            f"{'-' if r.hwm is None else f'{r.hwm / 2**20:.0f}':>7} {dd.get('requests', 0):>8} "
            f"{goal:>7}  {', '.join(notes)}"
        )
    print()


def print_summary(
    sizes: list[int], labels: list[str], results: dict[tuple[int, str, str], Run]
) -> None:
    """p99 ratios to the twin by size: how the cost scales with the heap."""
    for case in CASES:
        if not any(k[1] == case for k in results):
            continue
        print(f"{case}: p99 / twin's p99, by heap size (whole window; first {STARTUP:g}s)")
        print((f"  {'':<9} " + "".join(f"{f'{s / GiB:g} GiB':>18}    " for s in sizes)).rstrip())
        for label in labels:
            cells = []
            for s in sizes:
                r, tw = results.get((s, case, label)), results.get((s, case, "twin"))
                if not r or not tw or r.error or tw.error:
                    cells.append(f"{'-':>18}")
                    continue
                whole = x(r.windows["all"]["p99"], tw.windows["all"]["p99"])
                first = x(r.windows["first"]["p99"], tw.windows["first"]["p99"])
                cells.append(f"{whole + '; ' + first:>18}")
            print(f"  {label:<9} " + "".join(f"{c}    " for c in cells).rstrip())
        print()
    big = max(sizes)
    for label in labels:
        r, tw = results.get((big, "watch", label)), results.get((big, "watch", "twin"))
        if r and tw and not r.error and not tw.error:
            ratio = r.windows["all"]["p99"] / tw.windows["all"]["p99"]
            f = r.windows["first"]
            tf = tw.windows["first"]
            print(
                f"target (issue 16), {label}: watched p99 within 5% of the twin at "
                f"{big / GiB:g} GiB: {ratio:.2f}x, {'met' if ratio <= 1.05 else 'NOT met'}; "
                f"what remains of the start-up spike (first {STARTUP:g}s): "
                f"p99 {x(f['p99'], tf['p99'])}, p99.9 {x(f['p999'], tf['p999'])}, "
                f"max {ms(f['max'])} ms against {ms(tf['max'])} ms"
            )


# ----------------------------------------------------------------------------- main


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def interval_ok(text: str) -> bool:
    return re.fullmatch(r"\d+(\.\d+)?(ms|s|m)?", text) is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,8", help="heap sizes in GiB (default 1,4,8)")
    ap.add_argument("--seconds", type=float, default=60.0, help="each watch window (and twin)")
    ap.add_argument("--scan-interval", default="10s", help="the daemon's (default 10s)")
    ap.add_argument(
        "--cases", default="watch,observe,collapse", help="any of watch, observe, collapse"
    )
    ap.add_argument("--baseline", type=Path, help="a directory holding an older memdefragd/")
    ap.add_argument("--timeout", type=float, default=900.0, help="collapse: cap on start to 90%%")
    ap.add_argument("--keep", action="store_true", help="keep the configs")
    args = ap.parse_args()
    try:
        sizes = [int(float(s) * GiB) // PMD * PMD for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes: not a list of GiB: {args.sizes!r}")
    if not sizes or min(sizes) <= 0:
        ap.error("--sizes: each at least 2 MiB (0.002)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - set(CASES):
        ap.error("--cases takes any of watch, observe, collapse")
    if args.seconds <= 0 or args.timeout <= STARTUP:
        ap.error(f"--seconds must be positive, --timeout above {STARTUP:g}")
    if not interval_ok(args.scan_interval):
        ap.error("--scan-interval: a duration such as 10s, 500ms, 1m")
    if os.geteuid() != 0:
        print("watch_cost.py: run as root (the daemon needs CAP_SYS_ADMIN, CAP_SYS_NICE, "
              "CAP_SYS_PTRACE)", file=sys.stderr)  # fmt: skip
        return 2
    need, have = max(sizes) + SLACK, mem_available()
    if have < need:
        print(
            f"watch_cost.py: the largest target ({max(sizes) / GiB:g} GiB) needs "
            f"{need / GiB:.1f} GiB of MemAvailable (the target, the daemon's default "
            f"pressure.min_available of 1 GiB, 0.5 GiB for the daemon); "
            f"{have / GiB:.1f} GiB available",
            file=sys.stderr,
        )
        return 2
    trees = [Tree("current", REPO)]
    if args.baseline:
        base = args.baseline.resolve()
        if not (base / "memdefragd" / "cli.py").is_file():
            print(f"watch_cost.py: {base} holds no memdefragd/cli.py", file=sys.stderr)
            return 2
        trees.append(Tree("baseline", base))

    def interrupted(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    tag = f"{os.getpid() % 10000}"
    tmp = Path(tempfile.mkdtemp(prefix="mdd-watch-cost-"))
    os.chmod(tmp, 0o755)  # root-owned, not writable by others: the config loader's rule
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    started = time.monotonic()
    results: dict[tuple[int, str, str], Run] = {}
    stopped = ""
    try:
        exe = build(tmp)
        for size in sizes:
            for case in cases:
                for tree in [None, *trees]:
                    label = tree.label if tree else "twin"
                    progress(f"{size / GiB:g} GiB, {case}, {label}")
                    results[size, case, label] = one_run(exe, size, case, tree, args, tmp, tag)
                    cleanup_all()  # this run's target and daemon, whatever happened
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C): the runs done so far"
    finally:
        cleanup_all()
        if args.keep:
            print(f"configs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("what watching costs a target (issue 16, item 1), runs one after another")
    for t in trees:
        print(f"  {t.label}: {t.describe()}")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    print(
        f"  daemon: scan_interval {args.scan_interval}, defaults otherwise; target: random "
        f"8-byte reads, each timed (ns), {STARTUP:g} s start-up window\n"
        f"  Linux {os.uname().release}, {os.cpu_count()} CPUs, THP {thp}; load average "
        f"{' '.join(load0)} before, {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
        f"after; {time.monotonic() - started:.0f} s in all"
    )
    if stopped:
        print(f"  {stopped}")
    print()
    for size in sizes:
        for case in cases:
            runs = [results[k] for k in results if k[:2] == (size, case)]
            if runs:
                print_size(size, case, runs)
    print_summary(sizes, ["current"] + (["baseline"] if len(trees) == 2 else []), results)
    return 130 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
