"""What watching many small processes costs the daemon (issue 16, item 3), for the current
tree and, with --baseline DIR, an older one, in one run.

    sudo .venv/bin/python benchmarks/many_targets.py [--counts 1000,20] [--mib 4]
        [--interval 30s] [--warmup 90] [--seconds 300] [--baseline DIR]

DIR holds an older `memdefragd/` package, e.g. the tree before the watch budget:

    mkdir /tmp/mdd-base && git -C /work/main archive ece5213 | tar -x -C /tmp/mdd-base

Per --counts N, N small long-lived children (a C program compiled here: one anonymous
2 MiB-aligned mapping of --mib MiB written once, then pause() for ever, its comm set so
that only the config's target matches it; with --pages huge, the default, the mapping is
given MADV_HUGEPAGE first, so it is born huge and there is nothing to collapse: the
figures are watching alone; with --pages small it holds 4 KiB pages, which the daemon
collapses, paced, and collapsing counts in the figures too) and, per tree, `memdefragd
run` on a config naming that comm at scan_interval --interval (30s, the default) with
everything else at its default:
access source auto (DAMON where usable, else clear_refs + smaps Referenced), budgets,
pacing. The daemon's first --warmup seconds (discovery, the first scans and access
windows, whatever it collapses) are not measured; then over --seconds:

  - its CPU share (utime + stime from /proc/PID/stat over the window, of one core), and
    the collapse requests it logged in the window;
  - its RSS at the end (VmRSS) and its peak (VmHWM, the warm-up included);
  - full cycles ("scanned N process(es)" lines with N >= the children), the longest gap
    between two of them against the interval, and whether it said a cycle was stretched;
  - from a scrape at the end: process scans read and kept (memdefragd_scans_total),
    memdefragd_watch_cpu_seconds_total, the mean ms per read scan
    (memdefragd_scan_duration_seconds) ("-" where the tree lacks a metric).

Targets of the issue: 1,000 processes at 30 s under 2% of a core and 100 MiB; 20 under
1%. Runs go one after another (the children of one count are shared by both trees' runs,
which follow each other). Figures and ratios are printed, nothing is asserted. Root is
needed; every child is killed on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import watch_cost  # its cleanup list: DaemonRun registers there
from daemon import progress, status_kib  # benchmarks/daemon.py
from hostile import Tree, free_port, write_root_file  # benchmarks/hostile.py
from watch_cost import DaemonRun, cleanup_all, config_text, metric  # benchmarks/watch_cost.py

COMM = "mdd-many"

SOURCE = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t size = (size_t)atol(argv[1]) << 20, pmd = 2 << 20;
    prctl(PR_SET_NAME, argv[2]);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 1;
    char *p = mmap(0, size + pmd, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    p = (char *)(((unsigned long)p + pmd - 1) & ~(pmd - 1));
    if (argv[3][0] == 'h' && madvise(p, size, MADV_HUGEPAGE)) return 1;
    memset(p, 0x5a, size);
    for (;;) pause();
}
"""


def build(workdir: Path) -> Path:
    if shutil.which("gcc") is None:
        raise SystemExit("benchmarks/many_targets.py needs gcc (apt-get install gcc)")
    src, exe = workdir / "small.c", workdir / "small"
    src.write_text(SOURCE)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


class Children:
    """N small children; killed (and reaped) on close."""

    def __init__(self, exe: Path, n: int, mib: int, pages: str):
        self.procs = [
            subprocess.Popen([str(exe), str(mib), COMM, pages], stdin=subprocess.DEVNULL)
            for _ in range(n)
        ]
        watch_cost._cleanups.append(self.close)

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


@dataclass
class Result:
    tree: str
    n: int
    share: float | None = None
    rss: int | None = None
    hwm: int | None = None
    cycles: int = 0
    longest_gap: float | None = None
    stretched: bool = False
    read: float | None = None
    kept: float | None = None
    watch_cpu: float | None = None
    ms_per_scan: float | None = None
    requests: int = 0  # collapse requests in the window
    warnings: list[str] = field(default_factory=list)
    error: str = ""


def one_run(tree: Tree, n: int, args, tmp: Path) -> Result:
    res = Result(tree.label, n)
    port = free_port()
    cfg = tmp / f"{tree.label}-{n}.yaml"
    write_root_file(cfg, config_text(COMM, args.interval, port).encode())
    d = DaemonRun(tree, cfg, port)
    try:
        d.wait_until(d.t0 + args.warmup)
        c0, w0, line0 = d.cpu(), time.monotonic(), len(d.lines)
        d.wait_until(w0 + args.seconds)
        c1, w1 = d.cpu(), time.monotonic()
        if c0 is not None and c1 is not None:
            res.share = (c1 - c0) / (w1 - w0)
        with contextlib.suppress(OSError, KeyError, ValueError):
            res.rss = status_kib(d.proc.pid, "VmRSS") * 1024
        res.hwm = d.hwm()
        scraped = d.scrape()
    except RuntimeError as e:
        res.error = f"{e}: {d.tail()}"
        return res
    finally:
        d.stop()
    window = d.lines[line0:]
    full = [
        t
        for t, line in window
        if (m := re.search(r"scanned (\d+) process", line)) and int(m[1]) >= n
    ]
    res.cycles = len(full)
    if len(full) >= 2:
        res.longest_gap = max(b - a for a, b in itertools.pairwise(full))
    text = "\n".join(line for _, line in d.lines)
    res.stretched = "a full cycle" in text and "cycles now come every" in text
    res.warnings = [line for _, line in d.lines if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]
    res.requests = sum(" collapse pid " in line for _, line in window)
    scans = metric(scraped, "memdefragd_scans_total")
    if scans:
        res.read = sum(v for k, v in scans.items() if 'result="read"' in k)
        res.kept = sum(v for k, v in scans.items() if 'result="kept"' in k)
    res.watch_cpu = metric(scraped, "memdefragd_watch_cpu_seconds_total").get("")
    s = metric(scraped, "memdefragd_scan_duration_seconds_sum").get("")
    c = metric(scraped, "memdefragd_scan_duration_seconds_count").get("")
    if s is not None and c:
        res.ms_per_scan = 1e3 * s / c
    return res


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / (1 << 20):.0f} MiB"


def num(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def print_results(results: list[Result], args, interval: float) -> None:
    print()
    print(f"== {args.mib} MiB children ({args.pages} pages), scan_interval {args.interval}, "
          f"window {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up ==")  # fmt: skip
    head = ("targets", "tree", "CPU share", "RSS", "peak RSS", "cycles", "longest gap",
            "stretched", "scans read", "kept", "watch CPU s", "ms/scan", "requests")  # fmt: skip
    rows = [head]
    for r in results:
        if r.error:
            rows.append((str(r.n), r.tree, f"failed: {r.error}"[:120]))
            continue
        rows.append((
            str(r.n), r.tree, pct(r.share), mib(r.rss), mib(r.hwm), str(r.cycles),
            num(r.longest_gap, "{:.1f} s"), "yes" if r.stretched else "no", num(r.read),
            num(r.kept), num(r.watch_cpu, "{:.2f}"), num(r.ms_per_scan, "{:.2f}"), str(r.requests),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
    print()
    goals = {1000: (0.02, 100 << 20), 20: (0.01, None)}
    for n in sorted({r.n for r in results}):
        by = {r.tree: r for r in results if r.n == n and not r.error}
        cur, base = by.get("current"), by.get("baseline")
        if cur is None:
            continue
        line = f"{n} targets: current {pct(cur.share)}, {mib(cur.rss)}"
        if base is not None:
            line += f"; baseline {pct(base.share)}, {mib(base.rss)}; CPU current/baseline "
            line += ratio(cur.share, base.share)
        if n in goals:
            share, rss = goals[n]
            ok = cur.share is not None and cur.share < share
            if rss is not None:
                ok = ok and cur.rss is not None and cur.rss < rss
            line += f" (target < {100 * share:g}% of a core"
            line += f", < {rss >> 20} MiB" if rss else ""
            line += f": {'met' if ok else 'NOT met'})"
        if cur.longest_gap is not None:
            within = cur.longest_gap <= interval * 1.1
            line += f"; cycles {'within' if within else 'NOT within'} the interval"
        print(line)
        for w in cur.warnings[:3]:
            print(f"    current said: {w[:200]}")


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"a duration such as 30s, not {text!r}")
    return float(m[1]) * {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[m[2]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1000,20", help="numbers of children, one run each")
    ap.add_argument("--mib", type=int, default=4, help="each child's mapping")
    ap.add_argument(
        "--pages", choices=("huge", "small"), default="huge",
        help="huge: each mapping born huge (MADV_HUGEPAGE), nothing to collapse, so the "
        "figures are watching alone; small: 4 KiB pages, collapsing included",
    )  # fmt: skip
    ap.add_argument("--interval", default="30s", help="the daemon's scan_interval")
    ap.add_argument("--warmup", type=float, default=90.0, help="unmeasured seconds first")
    ap.add_argument("--seconds", type=float, default=300.0, help="the measured window")
    ap.add_argument("--baseline", type=Path, help="an older tree (holding memdefragd/)")
    args = ap.parse_args()
    interval = seconds(args.interval)
    trees = [Tree("current", Path(__file__).resolve().parents[1])]
    if args.baseline:
        if not (args.baseline / "memdefragd").is_dir():
            raise SystemExit(f"--baseline {args.baseline}: no memdefragd/ package there")
        trees.append(Tree("baseline", args.baseline.resolve()))
    results = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix="mdd-many-") as t:
            tmp = Path(t)
            exe = build(tmp)
            for n in [int(x) for x in args.counts.split(",")]:
                progress(f"starting {n} children of {args.mib} MiB")
                kids = Children(exe, n, args.mib, args.pages)
                time.sleep(2 + n / 500)
                for tree in trees:
                    progress(f"{tree.label}: {n} targets, {args.warmup:.0f} + {args.seconds:.0f} s")
                    results.append(one_run(tree, n, args, tmp))
                    if kids.alive() != n:
                        progress(f"only {kids.alive()} of {n} children are alive")
                kids.close()
    finally:
        cleanup_all()
    print_results(results, args, interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
