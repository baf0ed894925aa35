"""What collapsing costs a latency-sensitive target while it happens, paced and unpaced.

    python3 benchmarks/latency.py [--size-gib 2] [--baseline-seconds 30] [--duty 10%]
                                  [--timeout 600]

The target is a small C program (compiled here with gcc -O2) that maps --size-gib of
anonymous memory at a 2 MiB-aligned address, populates it with 4 KiB pages (THP
enabled=madvise, no MADV_HUGEPAGE) and then reads random 8-byte words from it for ever,
timing every read on its own: clock_gettime(CLOCK_MONOTONIC) around one load, whose
address depends on the value the previous load returned, so loads cannot overlap and
each sample is one load's latency plus the clock's fixed cost (two vDSO reads; the same in
every run, so ratios hold). Reads per second (M/s) shows what per-read figures cannot:
time the reader lost off the CPU between reads. Samples go into a log-linear
histogram (1 ns buckets below 16 us, 1.6% above); SIGUSR1 makes the program print the
histogram's p50/p99/p99.9/max since the last SIGUSR1 (and the histogram itself, its
non-empty buckets, so that windows can be merged: `merged`) and start afresh. A third
argument `huge` makes the heap born huge instead (MADV_HUGEPAGE before populating, then
MADV_COLLAPSE over it for whatever fell back to 4 KiB pages): benchmarks/watch_cost.py
times a target the daemon has nothing to do for.

Three runs, each on a fresh target, one after the other:

  untouched   no daemon, --baseline-seconds of reads;
  unpaced     `memdefragd run` with pacing.latency_sensitive: false (64 MiB requests
              back to back), from its start until 90% of the mapping is huge;
  paced       `memdefragd run` with the default pacing (one 2 MiB region per request,
              duty cycle --duty), from its start until 90% huge.

Both daemons run on the same config otherwise: scan_interval 30s (the default), budgets
raised to 8 GiB/s and a whole core and the pressure guard off (so that only pacing
differs: the default budgets would cap the unpaced run as well), access-aware priority as
configured by default (here: clear_refs + Referenced, since DAMON is unusable on this VM).
The latency figures of a daemon run cover exactly the time it worked: from its first
collapse to 90% coverage (time to 90% counts from the daemon's start: discovery, the first
scan and the first access window, a few seconds, come before any collapse). Coverage is
watched as benchmarks/daemon.py does (vmstat's thp_collapse_alloc first, smaps only near
the goal: reading smaps takes the target's mmap lock). Targets: paced p99 within 10% of
untouched; paced 90% in under 2 minutes for 2 GiB. Root is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon import REPO, coverage, progress, vmstat  # benchmarks/daemon.py

GiB = 1 << 30
PMD = 2 << 20
GOAL = 0.9

C_SOURCE = r"""
#define _GNU_SOURCE
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define LINEAR 16384
#define SUB 64
#define NBUCKETS (LINEAR + 40 * SUB)
static uint64_t hist[NBUCKETS], nops, maxv;
static volatile sig_atomic_t report;

static void on_usr1(int sig) { (void)sig; report = 1; }

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static inline int bucket(uint64_t v) {
    if (v < LINEAR) return (int)v;
    int e = 63 - __builtin_clzll(v);           /* >= 14 */
    int i = LINEAR + (e - 14) * SUB + (int)((v >> (e - 6)) & (SUB - 1));
    return i < NBUCKETS ? i : NBUCKETS - 1;
}

static double value(int i) {                      /* upper bound of bucket i, ns */
    if (i < LINEAR) return i;
    int e = (i - LINEAR) / SUB + 14, s = (i - LINEAR) % SUB;
    return ldexp(1.0, e) * (1.0 + (s + 1) / (double)SUB);
}

static double quantile(double q) {
    uint64_t want = (uint64_t)ceil(q * nops), acc = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        acc += hist[i];
        if (acc >= want && acc) return value(i);
    }
    return 0;
}

int main(int argc, char **argv) {
    size_t size = strtoull(argv[1], 0, 0), pmd = 2 << 20;
    int huge = argc > 3 && strcmp(argv[3], "huge") == 0;
    prctl(PR_SET_NAME, argv[2], 0, 0, 0);
    char *raw = mmap(0, size + 2 * pmd, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) { perror("mmap"); return 1; }
    char *base = (char *)(((uintptr_t)raw + pmd) & ~(pmd - 1));
    munmap(raw, base - raw);
    munmap(base + size, raw + size + 2 * pmd - (base + size));
    madvise(base, size, MADV_DONTDUMP);  /* flags of its own: nothing merges with it */
    if (huge) madvise(base, size, MADV_HUGEPAGE);
    for (size_t off = 0; off < size; off += 4096) memset(base + off, 0x5A, 4096);
    if (huge) madvise(base, size, MADV_COLLAPSE);  /* what fell back to 4 KiB pages */
    signal(SIGUSR1, on_usr1);
    printf("{\"addr\": %lu, \"size\": %zu}\n", (unsigned long)base, size);
    fflush(stdout);
    uint64_t *words = (uint64_t *)base, n = size / 8, x = 88172645463325252ull, t0, t1, v;
    uint64_t started = now_ns();
    for (;;) {
        for (int i = 0; i < 4096; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            uint64_t *p = &words[x % n];
            t0 = now_ns();
            v = *(volatile uint64_t *)p;
            x ^= v;                                 /* the next address needs this value */
            t1 = now_ns();
            uint64_t d = t1 - t0;
            hist[bucket(d)]++;
            if (d > maxv) maxv = d;
            nops++;
        }
        if (report) {
            report = 0;
            uint64_t end = now_ns();
            printf("{\"ops\": %lu, \"seconds\": %.3f, \"p50\": %.0f, \"p99\": %.0f, "
                   "\"p999\": %.0f, \"max\": %lu, \"hist\": [", (unsigned long)nops,
                   (end - started) / 1e9, quantile(0.5), quantile(0.99), quantile(0.999),
                   (unsigned long)maxv);
            const char *sep = "";
            for (int i = 0; i < NBUCKETS; i++)
                if (hist[i]) { printf("%s[%d,%lu]", sep, i, (unsigned long)hist[i]); sep = ","; }
            printf("]}\n");
            fflush(stdout);
            memset(hist, 0, sizeof hist);
            nops = maxv = 0;
            started = now_ns();
        }
    }
}
"""


LINEAR, SUB = 16384, 64  # the C program's histogram: 1 ns buckets, then 64 per power of 2


def bucket_value(i: int) -> float:
    """Upper bound in ns of the C program's bucket i (its value())."""
    if i < LINEAR:
        return float(i)
    e, s = divmod(i - LINEAR, SUB)
    return math.ldexp(1.0, e + 14) * (1.0 + (s + 1) / SUB)


def merged(*windows: dict) -> dict:
    """Figures of consecutive windows (Target.figures) taken together, as the C program
    would have printed them for the whole span."""
    hist: dict[int, int] = {}
    for w in windows:
        for i, n in w["hist"]:
            hist[i] = hist.get(i, 0) + n
    ops = sum(hist.values())

    def quantile(q: float) -> float:
        want, acc = math.ceil(q * ops), 0
        for i in sorted(hist):
            acc += hist[i]
            if acc >= want and acc:
                return bucket_value(i)
        return 0.0

    return {
        "ops": ops, "seconds": sum(w["seconds"] for w in windows),
        "p50": quantile(0.5), "p99": quantile(0.99), "p999": quantile(0.999),
        "max": max(w["max"] for w in windows), "hist": sorted(hist.items()),
    }  # fmt: skip


def build(workdir: Path) -> Path:
    if shutil.which("gcc") is None:
        raise SystemExit("benchmarks/latency.py needs gcc (apt-get install gcc)")
    src, exe = workdir / "latency_target.c", workdir / "latency_target"
    src.write_text(C_SOURCE)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src), "-lm"], check=True)
    return exe


class Target:
    """The C program: one mapping, random timed reads until killed."""

    def __init__(self, exe: Path, size: int, comm: str, huge: bool = False):
        self.comm, self.size = comm, size
        self.p = subprocess.Popen(
            [str(exe), str(size), comm, *(["huge"] if huge else [])],
            stdout=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self.addr = json.loads(self._line(600))["addr"]

    def _line(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.p.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"target {self.p.pid} did not answer in {timeout:g} s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"target exited with {self.p.wait()}")
        return line

    def figures(self) -> dict:
        """Latency since the last call (the first call only starts the window)."""
        os.kill(self.p.pid, signal.SIGUSR1)
        return json.loads(self._line(30))

    def coverage(self) -> float:
        return coverage(self.p.pid, self.addr)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.kill()
        self.p.wait()
        self.p.stdout.close()


def daemon_config(comm: str, paced: bool, duty: str) -> str:
    pacing = f"    latency_sensitive: true\n    duty_cycle: {duty}\n" if paced else (
        "    latency_sensitive: false\n"
    )  # fmt: skip
    fd, path = tempfile.mkstemp(prefix="memdefragd-latency-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(
            "daemon:\n"
            "  budget:\n    bytes_per_second: 8GiB\n    cpu_share: 1.0\n"
            "  pressure:\n    psi_some_avg10: 100\n    min_available: 0\n"
            f"  pacing:\n{pacing}"
            "  metrics:\n    listen: 'off'\n"
            "targets:\n  - name: bench\n    match:\n"
            f"      comm: {json.dumps('^' + re.escape(comm) + '$')}\n"
        )
    os.chmod(path, 0o644)
    return path


def wait_work(log: Path, timeout: float, daemon: subprocess.Popen) -> float | None:
    """Monotonic time of the daemon's first collapse (its log's first "collapse pid")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.returncode}")
        if "collapse pid" in log.read_text():
            return time.monotonic()
        time.sleep(0.02)
    return None


def wait_goal(t: Target, base: int, timeout: float, daemon: subprocess.Popen) -> float | None:
    """Monotonic time when GOAL of the mapping is huge (None at the timeout)."""
    need = GOAL * t.size / PMD
    deadline = time.monotonic() + timeout
    confirmed = False
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.returncode}")
        if confirmed or vmstat("thp_collapse_alloc") - base >= need:
            if t.coverage() >= GOAL:
                return time.monotonic()
            confirmed = True
            time.sleep(0.25)
        else:
            time.sleep(0.05)
    return None


def run(exe: Path, args: argparse.Namespace, kind: str) -> dict:
    size = int(args.size_gib * GiB)
    comm = f"mdd-lat-{kind}"[:15]
    progress(f"{kind}: populating a {size / GiB:g} GiB target")
    t = Target(exe, size, comm)
    try:
        time.sleep(2.0)  # warm-up: caches, the clock
        t.figures()
        if kind == "untouched":
            time.sleep(args.baseline_seconds)
            return {**t.figures(), "to_goal": None}
        log_path = Path(tempfile.mkstemp(prefix=f"memdefragd-latency-{kind}-", suffix=".log")[1])
        config = daemon_config(comm, kind == "paced", args.duty)
        base = vmstat("thp_collapse_alloc")
        with open(log_path, "w") as log:
            t0 = time.monotonic()
            d = subprocess.Popen(
                [sys.executable, "-m", "memdefragd.cli", "run", "-c", config],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                first = wait_work(log_path, args.timeout, d)
                t.figures()  # the window: first collapse to 90% (or the timeout)
                done = wait_goal(t, base, args.timeout, d) if first else None
                figures = t.figures()
            finally:
                d.send_signal(signal.SIGTERM)
                d.wait(30)
                os.unlink(config)
        text = log_path.read_text()
        paces = [int(m) for m in re.findall(r", pace (\d+) ms", text)]
        calls = [int(m) for m in re.findall(r"verified, (\d+) ms", text)]
        log_path.unlink()
        return {
            **figures,
            "to_goal": None if done is None else done - t0,
            "first": None if first is None else first - t0,
            "requests": len(calls),
            "call_ms": sum(calls) / len(calls) if calls else None,
            "pace_ms": sum(paces) / len(paces) if paces else None,
        }
    finally:
        t.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--baseline-seconds", type=float, default=30.0)
    ap.add_argument("--duty", default="10%", help="the paced run's duty cycle (default 10%%)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per daemon run, seconds")
    ap.add_argument("--only", default="untouched,unpaced,paced")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: process_madvise on another process needs CAP_SYS_NICE")
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        results = {k: run(exe, args, k) for k in args.only.split(",")}
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"\nrandom 8-byte reads over {args.size_gib:g} GiB, per-read latency in ns "
        f"(load average {' '.join(load)} on {os.cpu_count()} CPUs)\n"
    )
    head = f"{'run':<10} {'reads':>11} {'s':>6} {'M/s':>5} {'p50':>5} {'p99':>5} {'p99.9':>6}"
    head += f" {'max':>10}"
    print(head + f" {'1st call':>8} {'to 90%':>8} {'requests':>8} {'ms/call':>8} {'pace ms':>8}")
    for kind, r in results.items():
        goal = "-" if r["to_goal"] is None else f"{r['to_goal']:.1f} s"
        if kind != "untouched" and r["to_goal"] is None:
            goal = "timeout"
        print(
            f"{kind:<10} {r['ops']:>11} {r['seconds']:>6.1f} {r['ops'] / r['seconds'] / 1e6:>5.2f} "
            f"{r['p50']:>5.0f} {r['p99']:>5.0f} {r['p999']:>6.0f} {r['max']:>10} "
            f"{_num(r.get('first')):>8} {goal:>8} "
            f"{r.get('requests', '-'):>8} "
            f"{_num(r.get('call_ms')):>8} {_num(r.get('pace_ms')):>8}"
        )
    base = results.get("untouched")
    if base:
        print()
        for kind in ("unpaced", "paced"):
            r = results.get(kind)
            if r:
                print(
                    f"{kind}/untouched: p50 {r['p50'] / base['p50']:.2f}x, p99 "
                    f"{r['p99'] / base['p99']:.2f}x, p99.9 {r['p999'] / base['p999']:.2f}x, "
                    f"max {r['max'] / base['max']:.1f}x"
                )
        if "paced" in results:
            r = results["paced"]
            ok = r["p99"] <= 1.1 * base["p99"]
            fast = r["to_goal"] is not None and r["to_goal"] < 120 * args.size_gib / 2
            print(
                f"targets: paced p99 within 10% of untouched: {'met' if ok else 'NOT met'}; "
                f"paced 90% in under {120 * args.size_gib / 2:g} s: {'met' if fast else 'NOT met'}"
            )


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    main()
