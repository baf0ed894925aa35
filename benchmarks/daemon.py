"""The daemon against raw MADV_COLLAPSE and khugepaged, and what it costs, in one run.

    python3 benchmarks/daemon.py [--only a,b,c,d] [--size-gib 4] [--small-mib 512]
                                 [--skip-khugepaged] [--khugepaged-timeout 330]
                                 [--idle-seconds 60] [--idle-targets 20]

The daemons run unpaced and without access-aware priority (`pacing.latency_sensitive:
false`, `access.source: off`): this measures raw speed; benchmarks/latency.py measures
what pacing costs the conversion and buys the target.

Every target is a child of this script: one anonymous mapping at a 2 MiB-aligned address,
populated with 4 KiB pages (THP enabled=madvise and no MADV_HUGEPAGE, so faults map small
pages), its comm set to a name no other process has. Each daemon is `memdefragd run` as a
subprocess, on a temporary config naming that comm, with scan_interval 1s, a budget of
8 GiB/s and a whole core, and the pressure guard off (psi_some_avg10 100, min_available 0).
Coverage is smaps AnonHugePages of the child's mapping over its size.

  (a) time from starting the daemon to 90% coverage of a --size-gib target, next to one
      madvise(MADV_COLLAPSE) over the whole range of a fresh identical child (called by the
      child itself and timed there). Target: daemon <= 1.25 x raw + one scan interval.
  (b) khugepaged at the machine's knobs on a --small-mib target given MADV_HUGEPAGE after
      populating: time to 90% and khugepaged's CPU time (utime + stime of the kernel
      thread), next to the daemon on an identical target without MADV_HUGEPAGE. khugepaged
      is given --khugepaged-timeout seconds.
  (c) a random gather of 8-byte words over a --size-gib uint64 array (numpy take with a fixed
      random index array), in ns per access, before and after the daemon collapsed it.
  (d) the daemon's CPU time and peak RSS (VmHWM) over --idle-seconds while it watches
      --idle-targets children of 64 MiB whose memory is already huge, at scan_interval 1s
      (as above) and 30s (the default). Target: under 1% of one core, under 80 MiB.

Timing without disturbing what is timed: reading smaps walks every page table of the
target under its mmap lock (tens of ms for 4 GiB of small pages), which would delay the
collapses being timed. So the wait for 90% watches the machine-wide counter
thp_collapse_alloc in /proc/vmstat (touching no target) and reads smaps only once the
counter says 90% of the mapping may be huge, to confirm it (then every 0.25 s if not).

khugepaged's run lasts minutes and costs well under 1% of a core, so it runs concurrently
with the rest, but not with (a): it starts after (a), watched by a thread reading the
target's smaps every second, while the daemon side of (b), then (c) and (d) run. None of
those children asks for MADV_HUGEPAGE (numpy's own madvise is turned off in them), so
khugepaged's scan budget goes to its target and to whatever else on the machine is
registered with it, as it would without us; the daemons run as they would in production.
Root is needed (process_madvise on other processes, pagemap frame numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.child import answer, spawn

REPO = Path(__file__).resolve().parents[1]

MiB = 1 << 20
GiB = 1 << 30
PMD = 2 * MiB
TICK = os.sysconf("SC_CLK_TCK")
SCAN_INTERVAL = 1.0
GOAL = 0.9


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc readers


def vmstat(name: str) -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    raise KeyError(name)


def coverage(pid: int, addr: int) -> float:
    """AnonHugePages / Size of the mapping starting at addr, from /proc/PID/smaps."""
    head = f"{addr:x}-"
    size = huge = None
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                if inside:
                    break
                inside = line.startswith(head)
            elif inside and line.startswith("Size:"):
                size = int(line.split()[1])
            elif inside and line.startswith("AnonHugePages:"):
                huge = int(line.split()[1])
    if not size or huge is None:
        raise RuntimeError(f"pid {pid} has no mapping at {addr:#x}")
    return huge / size


def cpu(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds of a process (all its threads) or kernel thread."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def khugepaged_pid() -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "khugepaged":
                    return int(entry)
    return None


def knob(path: str) -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage", path).read_text().strip()
    except OSError:
        return "?"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text


def hugepage_vmas(pid: int) -> int:
    """Bytes of a process's mappings flagged MADV_HUGEPAGE (VmFlags hg): khugepaged scans
    them, sharing its scan budget with every other such process."""
    total, size = 0, 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("VmFlags:") and " hg" in line:
                total += size
    return total


# ---------------------------------------------------------------- processes


def child_env() -> dict[str, str]:
    return {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"}


class Child:
    """A target (tools/child.py): one mapping of `size` bytes at `addr`, populated with
    MADV_POPULATE_WRITE, under the name `comm`; commands "collapse", "hugepage", "gather"."""

    def __init__(self, comm: str, size: int, **cfg: object):
        self.comm, self.size = comm, size
        cfg = {"comm": comm, "size": size, "populate": "write", **cfg}
        self.p = spawn(cfg, env=child_env())
        self.ready: dict = {}

    def wait_ready(self, timeout: float = 600) -> Child:
        self.ready = answer(self.p, timeout)
        return self

    def __enter__(self) -> Child:
        """Ready, or stopped: `with Child(...) as child:` never leaves one behind."""
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.p.pid

    @property
    def addr(self) -> int:
        return self.ready["addr"]

    def ask(self, cmd: str, timeout: float = 600) -> dict:
        return answer(self.p, timeout, cmd)

    def coverage(self) -> float:
        return coverage(self.pid, self.addr)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.p.stdin.close()
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.p.wait()
        self.p.stdout.close()


@dataclass
class Daemon:
    """`memdefragd run` on a temporary config, its log lines stamped as they arrive."""

    comm_regex: str
    scan_interval: float = SCAN_INTERVAL
    t0: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)

    def start(self) -> Daemon:
        fd, self.config = tempfile.mkstemp(prefix="memdefragd-bench-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(
                "daemon:\n"
                f"  scan_interval: {self.scan_interval:g}s\n"
                "  budget:\n    bytes_per_second: 8GiB\n    cpu_share: 1.0\n"
                "  pressure:\n    psi_some_avg10: 100\n    min_available: 0\n"
                # Raw speed against the kernel: no pacing, no wait for an access window
                # (benchmarks/latency.py measures what pacing costs and buys).
                "  pacing:\n    latency_sensitive: false\n"
                "  access:\n    source: off\n"
                "  metrics:\n    listen: 127.0.0.1:0\n"
                "targets:\n  - name: bench\n    match:\n"
                f"      comm: {json.dumps(self.comm_regex)}\n"
            )
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(
            [sys.executable, "-m", "memdefragd.cli", "run", "-c", self.config],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.p.stderr:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def first(self, word: str, after: float = 0.0) -> float | None:
        return next((t for t, text in list(self.lines) if word in text and t >= after), None)

    def wait_for(self, word: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (t := self.first(word)) is None:
            if self.p.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(text for _, text in self.lines[-5:])
                raise RuntimeError(f"the daemon never logged {word!r}:\n{tail}")
            time.sleep(0.05)
        return t

    def collapses(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(
            1 for t, text in list(self.lines) if since <= t < until and "collapse pid" in text
        )

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.reader.join(5)
        os.unlink(self.config)


def wait_huge(
    child: Child, base: int, timeout: float, goal: float = GOAL
) -> tuple[float | None, float]:
    """Wait until `goal` of the child's mapping is huge: (monotonic time or None, coverage).

    `base` is thp_collapse_alloc before the work began: smaps is read only once the counter
    has grown by enough collapses, so the target's page tables are not walked meanwhile."""
    need = goal * child.size / PMD
    deadline = time.monotonic() + timeout
    confirmed_once = False
    cov = 0.0
    while time.monotonic() < deadline:
        if confirmed_once or vmstat("thp_collapse_alloc") - base >= need:
            cov = child.coverage()
            if cov >= goal:
                return time.monotonic(), cov
            confirmed_once = True  # other collapses counted too: read smaps from now on
            time.sleep(0.25)
        else:
            time.sleep(0.02)
    return None, child.coverage()


def daemon_to_goal(child: Child, timeout: float, goal: float = GOAL) -> dict:
    """Start a daemon on the child; time it to `goal`; stop it. Returns the figures."""
    base = vmstat("thp_collapse_alloc")
    d = Daemon(f"^{re.escape(child.comm)}$").start()
    try:
        t, cov = wait_huge(child, base, timeout, goal)
        used = cpu(d.p.pid)
        result = {
            "seconds": None if t is None else t - d.t0,
            "coverage": cov,
            "cpu": used,
            "started": d.first("started:"),
            "scanned": d.first("scanned"),
            "first_collapse": d.first("collapse pid"),
            "hg": hugepage_vmas(d.p.pid),
        }
    finally:
        d.stop()
    result["requests"] = d.collapses()
    return result


# ---------------------------------------------------------------- the parts


def part_a(args, tag: str) -> dict:
    size = args.size
    # On a VM, memory the guest has not touched since boot costs a host fault per page the
    # first time: the first collapse into it is several times slower than later ones (seen
    # here: 1.9 s, then 0.2 s, for 512 MiB). A throwaway collapse first, so that raw and
    # daemon both collapse into memory the host already backs.
    progress(f"(a) warm-up: populating {size / GiB:g} GiB, collapsing it, unmeasured")
    with Child(f"mdb{tag}awarm", size) as warm:
        w = warm.ask("collapse")
    progress(f"(a) raw: populating {size / GiB:g} GiB with 4 KiB pages")
    with Child(f"mdb{tag}araw", size) as raw:
        progress("(a) raw: madvise(MADV_COLLAPSE) over the whole range")
        r = raw.ask("collapse")
        r["coverage"] = raw.coverage()
        r["populate"] = raw.ready["populate"]
    progress(f"(a) daemon: populating a fresh {size / GiB:g} GiB child")
    with Child(f"mdb{tag}a", size) as child:
        progress("(a) daemon: running memdefragd until 90% is huge")
        d = daemon_to_goal(child, timeout=max(120.0, 20 * r["seconds"]))
    return {"warm": w, "raw": r, "daemon": d}


class Khugepaged(threading.Thread):
    """(b)'s khugepaged side, watched from a thread while the other parts run."""

    def __init__(self, args, tag: str):
        super().__init__(daemon=True)
        self.timeout = args.khugepaged_timeout
        self.kpid = khugepaged_pid()
        self.child = Child(f"mdb{tag}bkhp", args.small).wait_ready()
        self.result: dict = {}

    def run(self) -> None:
        k, child = self.kpid, self.child
        cpu0 = sum(cpu(k)) if k else None
        coll0 = int(knob("khugepaged/pages_collapsed"))
        scans0 = int(knob("khugepaged/full_scans"))
        child.ask("hugepage")
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        cov, t = 0.0, None
        while time.monotonic() < deadline:
            cov = child.coverage()
            if cov >= GOAL:
                t = time.monotonic() - t0
                break
            time.sleep(1.0)
        self.result = {
            "seconds": t,
            "waited": time.monotonic() - t0,
            "coverage": cov,
            "cpu": None if cpu0 is None else sum(cpu(k)) - cpu0,
            "collapsed": int(knob("khugepaged/pages_collapsed")) - coll0,
            "full_scans": int(knob("khugepaged/full_scans")) - scans0,
        }

    def stop(self) -> None:
        self.child.stop()


def part_b_daemon(args, tag: str) -> dict:
    progress(f"(b) daemon: {args.small // MiB} MiB target")
    with Child(f"mdb{tag}b", args.small) as child:
        return daemon_to_goal(child, timeout=300)


def part_c(args, tag: str) -> dict:
    size = args.size
    progress(f"(c) populating a {size / GiB:g} GiB array with 4 KiB pages")
    with Child(f"mdb{tag}c", size, gather=args.accesses) as child:
        progress("(c) random gather before")
        before = child.ask("gather")
        cov_before = child.coverage()
        progress("(c) memdefragd collapses it")
        d = daemon_to_goal(child, timeout=120, goal=0.99)  # all of it, not just 90%
        cov_after = child.coverage()
        progress("(c) random gather after (daemon stopped)")
        after = child.ask("gather")
    return {
        "before": before,
        "after": after,
        "coverage": (cov_before, cov_after),
        "daemon": d,
        "aux_errno": child.ready.get("aux_errno"),
    }


def part_d(args, tag: str) -> list[dict]:
    n = args.idle_targets
    progress(f"(d) starting {n} idle targets of 64 MiB, collapsed by themselves")
    kids = [Child(f"mdb{tag}d{i}", 64 * MiB, collapse=[0, 64 * MiB]) for i in range(n)]
    out = []
    try:
        for k in kids:
            k.wait_ready()
        covs = [k.coverage() for k in kids]
        for interval in (SCAN_INTERVAL, 30.0):
            progress(f"(d) scan_interval {interval:g}s: watching for {args.idle_seconds:g} s")
            d = Daemon(f"^mdb{tag}d[0-9]+$", scan_interval=interval).start()
            try:
                first = d.wait_for("scanned", timeout=60)
                time.sleep(max(0.0, first + 3.0 - (time.monotonic() - d.t0)))  # its first work
                w0, cpu0 = time.monotonic() - d.t0, cpu(d.p.pid)
                time.sleep(args.idle_seconds)
                w1, cpu1 = time.monotonic() - d.t0, cpu(d.p.pid)
                hwm, rss = status_kib(d.p.pid, "VmHWM"), status_kib(d.p.pid, "VmRSS")
                lines = [t for t, text in d.lines if w0 <= t < w1 and "scanned" in text]
                tracked = re.search(r"scanned (\d+) process", d.lines[-1][1] if d.lines else "")
            finally:
                d.stop()
            out.append(
                {
                    "interval": interval,
                    "window": w1 - w0,
                    "startup_cpu": sum(cpu0),
                    "cpu": (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]),
                    "hwm": hwm * 1024,
                    "rss": rss * 1024,
                    "cycles": len(lines),
                    "requests_warmup": d.collapses(0, w0),
                    "requests": d.collapses(w0, w1),
                    "tracked": int(tracked.group(1)) if tracked else None,
                    "targets_huge": min(covs),
                }
            )
    finally:
        for k in kids:
            k.stop()
    return out


# ---------------------------------------------------------------- output

W = 44


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<{W}} {value:>12}  {note}".rstrip())


def secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def print_a(a: dict, size: int) -> None:
    r, d = a["raw"], a["daemon"]
    print(f"(a) {size / GiB:g} GiB of 4 KiB pages to {GOAL:.0%} huge")
    note = f"{r['tries']} call(s), coverage after {r['coverage']:.1%}"
    if r["errno"]:
        note += f", last errno {r['errno']}"
    row(
        "warm-up: the same on cold memory",
        secs(a["warm"]["seconds"]),
        "(first touch on the host; not compared)",
    )
    row("raw: one madvise(MADV_COLLAPSE), in the child", secs(r["seconds"]), note)
    if d["seconds"] is None:
        row("daemon: start to 90%", "not reached", f"coverage {d['coverage']:.1%}")
        return
    row("daemon: start to 90%", secs(d["seconds"]), f"coverage {d['coverage']:.1%} when seen")
    row("  of which: start to 'started' log line", secs(d["started"]), "interpreter, imports")
    row("  start to first scan logged", secs(d["scanned"]))
    row("  start to first collapse logged", secs(d["first_collapse"]), "(after its 64 MiB)")
    u, s = d["cpu"]
    row("  daemon CPU until 90%", f"{u + s:.2f} s", f"user {u:.2f} s, system {s:.2f} s")
    row("  requests logged", str(d["requests"]))
    ratio = d["seconds"] / r["seconds"]
    limit = 1.25 * r["seconds"] + SCAN_INTERVAL
    row("ratio daemon / raw", f"{ratio:.2f}")
    row(
        "target: daemon <= 1.25 x raw + 1 s",
        secs(limit),
        f"{verdict(d['seconds'] <= limit)} the target",
    )
    print()


def print_b(b: dict, small: int, timeout: float, skipped: bool) -> None:
    print(f"(b) {small // MiB} MiB of 4 KiB pages to {GOAL:.0%} huge: khugepaged vs the daemon")
    k = b.get("khugepaged")
    if skipped:
        row("khugepaged (MADV_HUGEPAGE)", "skipped", "(--skip-khugepaged)")
    elif k:
        if k["seconds"] is None:
            row(
                "khugepaged (MADV_HUGEPAGE)",
                "not reached",
                f"in {k['waited']:.0f} s: "
                f"coverage {k['coverage']:.1%} (cap --khugepaged-timeout {timeout:g})",
            )
        else:
            row("khugepaged (MADV_HUGEPAGE)", secs(k["seconds"]), f"coverage {k['coverage']:.1%}")
        kc = "-" if k["cpu"] is None else f"{k['cpu']:.2f} s"
        row("  khugepaged CPU over that time", kc, "utime + stime of the kernel thread")
        row(
            "  pages_collapsed / full_scans growth",
            f"{k['collapsed']} / {k['full_scans']}",
            f"(its target: {round(k['coverage'] * small / PMD)} huge regions)",
        )
    d = b["daemon"]
    if d["seconds"] is None:
        row("daemon: start to 90%", "not reached", f"coverage {d['coverage']:.1%}")
    else:
        row("daemon: start to 90%", secs(d["seconds"]), f"coverage {d['coverage']:.1%}")
    u, s = d["cpu"]
    row(
        "  daemon CPU over that time",
        f"{u + s:.2f} s",
        f"user {u:.2f} s, system {s:.2f} s (startup included)",
    )
    if k and k["seconds"] and d["seconds"]:
        row("khugepaged time / daemon time", f"{k['seconds'] / d['seconds']:.0f}x")
    print()


def print_c(c: dict, size: int, accesses: int) -> None:
    print(f"(c) random gather of 8-byte words over {size / GiB:g} GiB ({accesses:,} accesses)")
    b, a = c["before"], c["after"]
    cb, ca = c["coverage"]
    row(
        "before: 4 KiB pages",
        f"{b['ns']:.1f} ns",
        f"coverage {cb:.1%}; passes " + ", ".join(f"{x:.1f}" for x in b["all_ns"]),
    )
    row(
        "after the daemon (stopped)",
        f"{a['ns']:.1f} ns",
        f"coverage {ca:.1%}; passes " + ", ".join(f"{x:.1f}" for x in a["all_ns"]),
    )
    row("speedup", f"{b['ns'] / a['ns']:.2f}x")
    d = c["daemon"]
    row("  daemon start to 99% meanwhile", secs(d["seconds"]), "(not compared: memory may be cold)")
    print()


def print_d(rows: list[dict], n: int) -> None:
    print(f"(d) the daemon watching {n} idle 64 MiB targets (already huge)")
    for r in rows:
        u, s = r["cpu"]
        share = (u + s) / r["window"]
        print(f"  scan_interval {r['interval']:g}s{' (default)' if r['interval'] == 30 else ''}:")
        row(
            "  CPU over the window",
            f"{u + s:.2f} s",
            f"user {u:.2f} s, system {s:.2f} s in {r['window']:.0f} s, {r['cycles']} cycle(s)",
        )
        row("  share of one core", f"{share:.2%}", f"{verdict(share < 0.01)} the target (< 1%)")
        row(
            "  peak RSS (VmHWM)",
            f"{r['hwm'] / MiB:.1f} MiB",
            f"{verdict(r['hwm'] < 80 * MiB)} the target (< 80 MiB); VmRSS {r['rss'] / MiB:.1f} MiB",
        )
        row(
            "  startup and first cycle (not counted)",
            f"{r['startup_cpu']:.2f} s",
            f"CPU; {r['requests_warmup']} request(s) then, {r['requests']} in the window",
        )
        row(
            "  targets tracked", str(r["tracked"]), f"least target coverage {r['targets_huge']:.1%}"
        )
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="a,b,c,d", help="parts to run, e.g. a,c (default all)")
    ap.add_argument("--size-gib", type=float, default=4.0, help="target of (a) and (c)")
    ap.add_argument("--small-mib", type=int, default=512, help="targets of (b)")
    ap.add_argument("--skip-khugepaged", action="store_true", help="(b) without khugepaged")
    ap.add_argument("--khugepaged-timeout", type=float, default=330.0, metavar="SECONDS")
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="(d)'s window")
    ap.add_argument("--idle-targets", type=int, default=20, help="(d)'s targets")
    ap.add_argument("--accesses", type=int, default=1 << 22, help="(c)'s gathers per pass")
    args = ap.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or parts - set("abcd"):
        ap.error("--only takes a comma-separated list of a, b, c, d")
    args.size = int(args.size_gib * GiB) // PMD * PMD
    args.small = args.small_mib * MiB // PMD * PMD
    if args.size <= 0 or args.small <= 0 or args.idle_seconds <= 0 or args.idle_targets < 1:
        ap.error("sizes, --idle-seconds and --idle-targets must be positive")
    if os.geteuid() != 0:
        ap.error("run as root: the daemon needs CAP_SYS_NICE, CAP_SYS_PTRACE, CAP_SYS_ADMIN")
    tag = f"{os.getpid() % 100000}"  # children are mdb<tag><part>...: unique comms

    a = c = d = None
    b: dict = {}
    khp: Khugepaged | None = None
    try:
        if "a" in parts:
            a = part_a(args, tag)
        if "b" in parts and not args.skip_khugepaged:
            progress(
                f"(b) khugepaged: {args.small // MiB} MiB target, MADV_HUGEPAGE, "
                f"watched in the background (cap {args.khugepaged_timeout:g} s)"
            )
            khp = Khugepaged(args, tag)
            khp.start()
        if "b" in parts:
            b["daemon"] = part_b_daemon(args, tag)
        if "c" in parts:
            c = part_c(args, tag)
        if "d" in parts:
            d = part_d(args, tag)
        if khp is not None:
            progress("(b) khugepaged: waiting for it")
            khp.join()
            b["khugepaged"] = khp.result
            b["hg_daemons"] = max(
                [x["hg"] for x in (b["daemon"], (c or {}).get("daemon", {"hg": 0}))]
            )
    finally:
        if khp is not None:
            khp.stop()

    mem = status_mem()
    print(
        f"memdefragd daemon benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"Linux {os.uname().release}  {os.cpu_count()} cores  {mem / GiB:.0f} GiB"
    )
    print(
        f"  THP enabled={knob('enabled')} defrag={knob('defrag')}; khugepaged "
        f"scan_sleep_millisecs={knob('khugepaged/scan_sleep_millisecs')} "
        f"pages_to_scan={knob('khugepaged/pages_to_scan')} "
        f"max_ptes_none={knob('khugepaged/max_ptes_none')}"
    )
    print(
        f"  daemon config: scan_interval {SCAN_INTERVAL:g}s, 8 GiB/s, cpu_share 1.0, "
        "pressure guard off; coverage = smaps AnonHugePages / Size"
    )
    print()
    if a:
        print_a(a, args.size)
    if b:
        print_b(b, args.small, args.khugepaged_timeout, args.skip_khugepaged)
        if b.get("hg_daemons"):
            print(
                f"  note: a daemon had {b['hg_daemons'] / MiB:.0f} MiB flagged MADV_HUGEPAGE "
                "(numpy): khugepaged scanned it too\n"
            )
    if c:
        print_c(c, args.size, args.accesses)
    if d:
        print_d(d, args.idle_targets)
    return 0


def status_mem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
