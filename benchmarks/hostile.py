"""The daemon under the hostile situations of issue 11, current tree next to a baseline, in one run.

    sudo .venv/bin/python benchmarks/hostile.py [--baseline DIR] [--cases 1a,1b,2,3,4] [--keep]

DIR holds an older `memdefragd/` package, for example the code before the fix of issue 11:

    git -C /work/main worktree add /tmp/mdd-base 2192edd       (or)
    mkdir /tmp/mdd-base && git -C /work/main archive 2192edd | tar -x -C /tmp/mdd-base

Each tree's daemon is `python -m memdefragd.cli run -c CONFIG` as a subprocess (this
script's interpreter; PYTHONPATH and cwd set to the tree), so nothing here imports the
package and a reorganised package still runs. The daemon gets RLIMIT_NOFILE 1024, as
systemd would give it; its config (written as root, 0644, in a root-owned 0755 temporary
directory) has scan_interval 1s, the metrics endpoint on a free loopback port, the pressure
guard off (psi_some_avg10 100, min_available 0) and a harmless target next to the case's.

Cases (each a few seconds of load, then 5 s without it, then SIGTERM):
  1a  a target `cmdline: '(a+)+$'` and a process of user nobody whose argument is 40 'a's
      and a 'b' (`sh -c 'read x' aaa...ab`): catastrophic backtracking for a backtracking
      regex engine.
  1b  a target `cmdline: 'python.*worker.*queue'` and a process of nobody whose command line
      is ~28 KB of "python worker " (cubic time for a backtracking engine).
  2   3,000 idle TCP connections to the metrics endpoint (4 non-blocking connects a
      millisecond, never a byte sent), closed when the load ends.
  3   an exec storm: a symlink to /bin/true, named like a target's comm, spawned ~400
      times a second (posix_spawn) while the load lasts.
  4   SIGHUP after replacing the config by a 50 MB one (root-owned, 0644): ~900,000
      targets, valid YAML.

Figures, per case and tree: the daemon's CPU share (utime + stime from /proc/PID/stat over
the load window, and over the 5 s after it), threads, open fds and RSS (/proc/PID/status,
sampled every 0.1 s: idle, peak under load, 5 s after), "scanned N process(es)" log lines
per second (full cycles and the scans that process events trigger: both log that line), the
longest cycle age (the longest stretch without such a line, seen within 0.1 s, or the age of
memdefragd_last_cycle_timestamp_seconds in an answered scrape, whichever is larger: a lower
bound), scrape latency (GET /metrics every 0.5 s with a 2 s deadline for the whole answer;
p50 and max of the answered ones, and how many failed), the time from SIGTERM to exit
(capped at 10 s, then SIGKILL) and the tracebacks and WARNING/ERROR lines in the daemon's
log. The ratio column is baseline / current of the figure marked * in the row's label.

Every child is killed at the end, whatever happens; a daemon that hangs or dies is reported,
never waited for beyond its case's budget (about 20 s). Root is needed (the daemon itself,
processes of user nobody). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20

DAEMON_NOFILE = 1024  # what systemd gives a service unless told otherwise
START_TIMEOUT = 8.0  # until the daemon's first cycle
LOAD_SECONDS = 3.5
AFTER_SECONDS = 5.0
TERM_CAP = 10.0
SCRAPE_TIMEOUT = 2.0
SCRAPE_EVERY = 0.5
SAMPLE_EVERY = 0.1

CLIENTS = 3000
CLIENT_BATCH = 4  # connects per millisecond
STORM_RATE = 400  # spawns per second
STORM_COMM = "mddh-storm"
BIG_CONFIG_BYTES = 50 * 1000 * 1000
HOSTILE_CMDLINE = ["python", "worker"] * 2000  # joined by spaces: ~28 KB

SCANNED = re.compile(r"scanned \d+ process\(es\)")
LOG_PREFIX = re.compile(r"^\S+ \S+ \S+\[\d+\] ")  # "2026-01-01 12:00:00 memdefragd[123] "


# ----------------------------------------------------------------------------- children

_cleanups: list[Callable[[], None]] = []


def cleanup_all() -> None:
    while _cleanups:
        with contextlib.suppress(Exception):
            _cleanups.pop()()


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL a child started with start_new_session=True, and its group; reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_root_file(path: Path, data: bytes) -> None:
    """Write as root, mode 0644, replacing `path` in one rename (never a symlink)."""
    tmp = path.with_name(path.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class Tree:
    label: str
    root: Path

    def describe(self) -> str:
        try:
            head = subprocess.run(
                ["git", "-C", str(self.root), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()  # fmt: skip
            changed = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(self.root), "status", "--porcelain"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.count("\n")  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return f"{self.root} (no git)"
        dirty = f", {changed} uncommitted path(s)" if changed else ""
        return f"{self.root} (git {head}{dirty})"


def daemon_limits() -> None:  # in the child, before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(DAEMON_NOFILE, hard), hard))


@dataclass
class Sample:
    t: float
    ticks: int
    threads: int
    rss_kib: int
    fds: int


class Daemon:
    """`memdefragd run` of one tree as a subprocess; its log lines timed as they appear."""

    def __init__(self, tree: Tree, config: Path, log: Path):
        self.log_path = log
        log_file = open(log, "wb")  # noqa: SIM115  (closed below, the child has its copy)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memdefragd.cli", "run", "-c", str(config)],
                cwd=tree.root,
                env={**os.environ, "PYTHONPATH": str(tree.root), "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                preexec_fn=daemon_limits, start_new_session=True,
            )  # fmt: skip
        finally:
            log_file.close()
        _cleanups.append(lambda: kill_group(self.proc))
        self.pid = self.proc.pid
        self.lines: list[tuple[float, str]] = []  # (monotonic time seen, line)
        self._offset = 0
        self._partial = b""

    def poll_log(self) -> None:
        now = time.monotonic()
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read(4 * MiB)
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        self.lines += [(now, b.decode(errors="replace")) for b in complete]

    def cycles(self) -> list[float]:
        return [t for t, line in self.lines if SCANNED.search(line)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample(self) -> Sample | None:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{self.pid}/status") as f:
                status = f.read()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None
        rest = stat[stat.rindex(b")") + 2 :].split()  # fields from 3 (state) on
        threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
        rss = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
        if not threads or not rss:  # a zombie
            return None
        ticks = int(rest[11]) + int(rest[12])  # utime, stime: fields 14 and 15
        return Sample(time.monotonic(), ticks, int(threads[1]), int(rss[1]), fds)

    def wait_started(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.alive():
            self.poll_log()
            if self.cycles():
                return True
            time.sleep(SAMPLE_EVERY)
        self.poll_log()
        return bool(self.cycles())

    def port(self, default: int) -> int:
        for _, line in self.lines:
            if m := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", line):
                return int(m[1])
        return default

    def terminate(self) -> tuple[float | None, str]:
        """SIGTERM, then at most TERM_CAP seconds; SIGKILL after that."""
        if not self.alive():
            return None, f"exited before SIGTERM (rc {self.proc.returncode})"
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(TERM_CAP)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            return None, f">{TERM_CAP:g} s (killed)"
        took = time.monotonic() - t0
        return took, f"{took:.2f} s" + (f" (rc {rc})" if rc else "")

    def last_line(self) -> str:
        self.poll_log()
        for _, line in reversed(self.lines):
            if line.strip():
                return LOG_PREFIX.sub("", line.strip())[:100]
        return "(no output)"


# ----------------------------------------------------------------------------- scrapes


def scrape(port: int) -> tuple[float, float | None] | None:
    """Seconds for a whole GET /metrics (HTTP/1.0) within SCRAPE_TIMEOUT, and the age of
    the last full cycle it shows (memdefragd_last_cycle_timestamp_seconds); None if not."""
    t0 = time.monotonic()
    deadline = t0 + SCRAPE_TIMEOUT
    chunks = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return None
    body = b"".join(chunks)
    if not re.match(rb"HTTP/1\.[01] 200", body) or b"memdefragd_" not in body:
        return None
    took, age = time.monotonic() - t0, None
    if m := re.search(rb"^memdefragd_last_cycle_timestamp_seconds (\S+)$", body, re.M):
        with contextlib.suppress(ValueError):
            age = time.time() - float(m[1]) if float(m[1]) > 0 else None
    return took, age


class Scraper(threading.Thread):
    """GET /metrics every SCRAPE_EVERY seconds; each result tagged with the phase."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.phase = "load"
        self.results: list[tuple[str, float | None]] = []  # (phase, seconds or None)
        self.ages: list[float] = []  # cycle ages shown by the answered scrapes
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.monotonic()
            phase = self.phase
            r = scrape(self.port)
            if not self.done.is_set():
                self.results.append((phase, r and r[0]))
                if r and r[1] is not None:
                    self.ages.append(r[1])
            self.done.wait(max(0.0, SCRAPE_EVERY - (time.monotonic() - t0)))

    def stop(self) -> None:
        self.done.set()
        self.join(SCRAPE_TIMEOUT + 0.5)


# ----------------------------------------------------------------------------- loads


class Load:
    """Something hostile, started and stopped within a bounded time."""

    extra_targets = ""

    def prepare(self, tmp: Path, config: Path, daemon: Daemon, port: int) -> None:
        pass

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def note(self) -> str:
        return ""


class HostileCmdline(Load):
    """A process of user nobody with the given arguments: `sh -c 'read x' ARGS...` (the
    builtin `read` keeps sh itself waiting, so its own command line is the hostile one)."""

    def __init__(self, pattern: str, args: list[str]):
        self.extra_targets = f"  - name: hostile\n    match: {{cmdline: '{pattern}'}}\n"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["sh", "-c", "read x", *self.args],
            user="nobody", group="nogroup", extra_groups=[], cwd="/",
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        _cleanups.append(lambda p=self.proc: kill_group(p))

    def stop(self) -> None:
        if self.proc:
            kill_group(self.proc)

    def note(self) -> str:
        n = len(" ".join(["sh", "-c", "read x", *self.args]))
        return f"command line of nobody's process: {n:,} bytes"


class IdleConnections(Load):
    """CLIENTS connects to the metrics port, nothing ever sent on them. Non-blocking, CLIENT_BATCH
    at a time, a millisecond apart: a burst would overflow a small listen backlog (Python's
    socketserver asks for 5), whose dropped SYNs wait seconds for their retransmission, and
    would measure the backlog rather than idle connections."""

    def __init__(self) -> None:
        self.port = 0
        self.socks: list[socket.socket] = []
        self.refused = 0
        self.held = 0  # established on the daemon's side (accepted, or waiting for accept)
        self.open_seconds = 0.0
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def prepare(self, tmp: Path, config: Path, daemon: Daemon, port: int) -> None:
        self.port = port

    def _open(self) -> None:
        t0 = time.monotonic()
        while len(self.socks) < CLIENTS and not self.stopping.is_set():
            for _ in range(min(CLIENT_BATCH, CLIENTS - len(self.socks))):
                s = socket.socket()
                s.setblocking(False)
                self.socks.append(s)
                if s.connect_ex(("127.0.0.1", self.port)) not in (0, errno.EINPROGRESS):
                    self.refused += 1
            self.stopping.wait(0.001)
        self.open_seconds = time.monotonic() - t0

    def start(self) -> None:
        _cleanups.append(self.stop)
        self.thread = threading.Thread(target=self._open, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread:
            self.thread.join(5)
            self.thread = None
            self.held = established_at(self.port)
        for s in self.socks:
            s.close()
        self.socks = []

    def note(self) -> str:
        refused = f", {self.refused} refused at once" if self.refused else ""
        return (
            f"{CLIENTS:,} connects in {self.open_seconds:.1f} s{refused}; when they closed, the "
            f"daemon's side held {self.held:,} established (accepted or in its backlog)"
        )


def established_at(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is `port` (/proc/net/tcp*)."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


class ExecStorm(Load):
    """STORM_RATE spawns a second of a symlink to /bin/true named STORM_COMM."""

    extra_targets = f"  - name: storm\n    match: {{comm: '^{STORM_COMM}$'}}\n"

    def __init__(self) -> None:
        self.link = Path()
        self.spawned = 0
        self.seconds = 0.0
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def prepare(self, tmp: Path, config: Path, daemon: Daemon, port: int) -> None:
        self.link = tmp / STORM_COMM
        if not self.link.is_symlink():
            self.link.symlink_to(shutil.which("true") or "/bin/true")

    def _run(self) -> None:
        path = str(self.link)
        outstanding: list[int] = []
        t0 = time.monotonic()
        try:
            while not self.stopping.is_set():
                due = t0 + self.spawned / STORM_RATE
                if (wait := due - time.monotonic()) > 0:
                    self.stopping.wait(wait)
                    continue
                outstanding.append(os.posix_spawn(path, [path], {}))
                self.spawned += 1
                outstanding = [p for p in outstanding if os.waitpid(p, os.WNOHANG)[0] == 0]
        finally:
            self.seconds = time.monotonic() - t0
            end = time.monotonic() + 2
            while outstanding and time.monotonic() < end:
                outstanding = [p for p in outstanding if os.waitpid(p, os.WNOHANG)[0] == 0]
                time.sleep(0.01)
            for p in outstanding:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p, 0)

    def start(self) -> None:
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        _cleanups.append(self.stop)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread:
            self.thread.join(5)

    def note(self) -> str:
        rate = self.spawned / self.seconds if self.seconds else 0
        return f"{self.spawned:,} spawns of {STORM_COMM} in {self.seconds:.1f} s ({rate:.0f}/s)"


_big_targets: list[bytes] = []  # made once, shared by every tree


def big_config(port: int) -> bytes:
    """Valid YAML of about BIG_CONFIG_BYTES: the usual daemon section, ~900,000 targets."""
    head = (
        "daemon:\n  scan_interval: 1s\n"
        "  pressure: {psi_some_avg10: 100, min_available: 0}\n"
        f'  metrics: {{listen: "127.0.0.1:{port}"}}\ntargets:\n'
    )
    if not _big_targets:
        one = "  - name: t{0:07d}\n    match: {{comm: '^x{0:07d}$'}}\n"
        n = (BIG_CONFIG_BYTES - len(head)) // len(one.format(0))
        _big_targets.append("".join(one.format(i) for i in range(n)).encode())
    return head.encode() + _big_targets[0]


class HugeReload(Load):
    """The config replaced by a 50 MB one (root-owned, 0644), then SIGHUP."""

    def __init__(self) -> None:
        self.daemon: Daemon | None = None
        self.config = Path()
        self.size = 0
        self.sent = 0.0

    def prepare(self, tmp: Path, config: Path, daemon: Daemon, port: int) -> None:
        self.daemon, self.config = daemon, config
        data = big_config(port)
        self.size = len(data)
        write_root_file(config, data)

    def start(self) -> None:
        assert self.daemon
        self.sent = time.monotonic()
        self.daemon.proc.send_signal(signal.SIGHUP)

    def note(self) -> str:
        assert self.daemon
        said = [
            LOG_PREFIX.sub("", line.strip())
            for t, line in self.daemon.lines
            if t >= self.sent and re.search(r"reload|config", line, re.I)
        ]
        said = [line.replace(f"{self.config.parent}/", "") for line in said]
        what = f"first reload line: {said[0][:160]!r}" if said else "no reload line logged"
        return f"{self.size / 1e6:.0f} MB config; {what}"


@dataclass
class Case:
    key: str
    title: str
    load: Callable[[], Load]


CASES = [
    Case(
        "1a",
        "hostile command line: cmdline '(a+)+$' vs nobody's 40 'a's and a 'b'",
        lambda: HostileCmdline("(a+)+$", ["a" * 40 + "b"]),
    ),
    Case(
        "1b",
        "hostile command line: cmdline 'python.*worker.*queue' vs nobody's ~28 KB argv",
        lambda: HostileCmdline("python.*worker.*queue", HOSTILE_CMDLINE),
    ),
    Case("2", f"{CLIENTS:,} idle TCP connections to the metrics endpoint", IdleConnections),
    Case("3", f"exec storm: ~{STORM_RATE}/s spawns of a target-named /bin/true", ExecStorm),
    Case("4", "SIGHUP with a 50 MB config, then SIGTERM", HugeReload),
]


# ----------------------------------------------------------------------------- one run


@dataclass
class Result:
    error: str = ""
    note: str = ""
    idle: Sample | None = None
    load: list[Sample] = field(default_factory=list)
    cpu_load: float | None = None
    cpu_after: float | None = None
    after: Sample | None = None
    cycles_load: float | None = None
    cycles_after: float | None = None
    max_age: float | None = None
    scrapes: list[tuple[str, float | None]] = field(default_factory=list)
    term: float | None = None
    term_text: str = ""
    died: str = ""
    tracebacks: int = 0
    warnings: int = 0


def config_text(port: int, extra_targets: str) -> str:
    return (
        "daemon:\n"
        "  scan_interval: 1s\n"
        "  pressure: {psi_some_avg10: 100, min_available: 0}\n"
        f'  metrics: {{listen: "127.0.0.1:{port}"}}\n'
        "targets:\n"
        "  - name: harmless\n"
        "    match: {comm: '^mddh-idle$'}\n" + extra_targets
    )


def watch(d: Daemon, until: float, samples: list[Sample]) -> bool:
    """Sample the daemon and read its log until `until`; False once it has exited."""
    while time.monotonic() < until:
        if not d.alive():
            d.poll_log()
            return False
        if s := d.sample():
            samples.append(s)
        d.poll_log()
        time.sleep(max(0.0, min(SAMPLE_EVERY, until - time.monotonic())))
    d.poll_log()
    return d.alive()


def cpu_share(a: Sample | None, b: Sample | None) -> float | None:
    if not a or not b or b.t <= a.t:
        return None
    return (b.ticks - a.ticks) / TICK / (b.t - a.t)


def run_case(case: Case, tree: Tree, tmp: Path) -> Result:
    r = Result()
    load = case.load()
    port = free_port()
    config = tmp / f"{case.key}-{tree.label}.yaml"
    write_root_file(config, config_text(port, load.extra_targets).encode())
    d = Daemon(tree, config, config.with_suffix(".log"))
    scraper: Scraper | None = None
    try:
        if not d.wait_started(START_TIMEOUT):
            r.error = f"no cycle within {START_TIMEOUT:g} s: {d.last_line()}"
            return r
        port = d.port(port)
        scrape(port)  # the endpoint's first answer belongs to the idle state
        r.idle = d.sample()
        load.prepare(tmp, config, d, port)
        scraper = Scraper(port)
        t0 = time.monotonic()
        s0 = d.sample()
        load.start()
        scraper.start()
        alive = watch(d, t0 + LOAD_SECONDS, r.load)
        s1 = d.sample()
        load.stop()
        t1 = time.monotonic()
        scraper.phase = "after"
        after: list[Sample] = []
        if alive:
            alive = watch(d, t1 + AFTER_SECONDS, after)
        t2 = time.monotonic()
        s2 = d.sample()
        scraper.stop()
        r.scrapes = list(scraper.results)
        ages = list(scraper.ages)
        r.cpu_load, r.cpu_after = cpu_share(s0, s1), cpu_share(s1, s2)
        r.after = s2
        cycles = d.cycles()
        r.cycles_load = sum(t0 <= t < t1 for t in cycles) / (t1 - t0)
        r.cycles_after = sum(t1 <= t < t2 for t in cycles) / (t2 - t1)
        marks = [max([t for t in cycles if t < t0], default=t0)]
        marks += [t for t in cycles if t0 <= t < t2] + [t2]
        r.max_age = max([b - a for a, b in itertools.pairwise(marks)] + ages)
        if not alive:
            r.died = f"exited (rc {d.proc.returncode}): {d.last_line()}"
        r.term, r.term_text = d.terminate()
        d.poll_log()
        r.note = load.note()
    finally:
        load.stop()
        if scraper:
            scraper.done.set()
        kill_group(d.proc)
        d.poll_log()
        text = "\n".join(line for _, line in d.lines)
        r.tracebacks = text.count("Traceback (most recent call last)")
        r.warnings = len(re.findall(r" (WARNING|ERROR|CRITICAL) ", text))
    return r


# ----------------------------------------------------------------------------- the table


@dataclass
class Cell:
    text: str
    key: float | None = None  # the figure the ratio compares
    more: bool = False  # the true figure is larger than key (a capped wait)


def mib(s: Sample | None) -> str:
    return f"{s.rss_kib / 1024:.0f}" if s else "-"


def peak(samples: list[Sample], attr: str) -> int | None:
    return max((getattr(s, attr) for s in samples), default=None)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def scrape_cell(results: list[tuple[str, float | None]], phase: str) -> Cell:
    got = [r for p, r in results if p == phase]
    ok = [r for r in got if r is not None]
    failed = f"{len(got) - len(ok)}/{len(got)} failed"
    if not ok:
        return Cell(f"- / - ({failed})")
    p50, worst = statistics.median(ok) * 1e3, max(ok) * 1e3
    return Cell(f"{p50:.1f} / {worst:.1f} ({failed})", worst)


def rows(r: Result) -> list[tuple[str, Cell]]:
    if r.error:
        return [("daemon", Cell(r.error))]
    out: list[tuple[str, Cell]] = []
    three = ("threads", "fds", "rss_kib")
    for label, attr in zip(("threads", "open fds", "RSS MiB"), three, strict=True):
        top = peak(r.load, attr)
        if attr == "rss_kib":
            vals = [mib(r.idle), "-" if top is None else f"{top / 1024:.0f}", mib(r.after)]
        else:
            vals = [str(getattr(s, attr)) if s else "-" for s in (r.idle, None, r.after)]
            vals[1] = "-" if top is None else str(top)
        out.append((f"{label}: idle / load peak* / 5 s after", Cell(" / ".join(vals), top)))
    out += [
        ("CPU, of one core: load* / after", Cell(f"{pct(r.cpu_load)} / {pct(r.cpu_after)}",
                                                 r.cpu_load)),
        ("scan lines per second: load* / after", Cell(f"{r.cycles_load:.2f} / {r.cycles_after:.2f}",
                                                  r.cycles_load)),
        ("longest cycle age* (at least), s", Cell(f"{r.max_age:.1f}", r.max_age)),
        ("scrape ms under load: p50 / max*", scrape_cell(r.scrapes, "load")),
        ("scrape ms 5 s after: p50 / max*", scrape_cell(r.scrapes, "after")),
        ("SIGTERM to exit*", Cell(r.term_text, r.term if r.term is not None else
                                  (TERM_CAP if "killed" in r.term_text else None),
                                  "killed" in r.term_text)),
        ("log: tracebacks / WARNING+ERROR lines", Cell(f"{r.tracebacks} / {r.warnings}")),
    ]  # fmt: skip
    if r.died:
        out.append(("daemon died", Cell(r.died[:60])))
    return out


def ratio(base: Cell, cur: Cell) -> str:
    if base.key is None or cur.key is None or cur.key <= 0:
        return ""
    x = base.key / cur.key
    return (">" if base.more else "") + (f"{x:.1f}x" if x < 100 else f"{x:.0f}x")


def print_table(trees: list[Tree], results: dict[tuple[str, str], Result], cases: list[Case]):
    w_label, w_cell = 46, 30
    head = f"{'case / figure':<{w_label}}" + "".join(f"{t.label:<{w_cell}}" for t in trees)
    if len(trees) == 2:
        head += "base/cur"
    print(head)
    print("-" * len(head))
    for case in cases:
        print(f"{case.key:<3} {case.title}")
        per_tree = [rows(results[case.key, t.label]) for t in trees]
        labels = list(dict.fromkeys(label for rs in per_tree for label, _ in rs))
        for label in labels:
            cells = [dict(rs).get(label, Cell("")) for rs in per_tree]
            line = f"    {label:<{w_label - 4}}" + "".join(
                f"{c.text:<{w_cell - 1}} " for c in cells
            )
            if len(trees) == 2:
                line += ratio(cells[1], cells[0])
            print(line.rstrip())
        for t in trees:
            if note := results[case.key, t.label].note:
                print(f"    note, {t.label}: {note}")
        print()


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="a directory holding an older memdefragd/")
    ap.add_argument("--cases", default=",".join(c.key for c in CASES), help="e.g. 1a,2,4")
    ap.add_argument("--keep", action="store_true", help="keep the configs and daemon logs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("hostile.py: needs root (the daemon, processes of user nobody)", file=sys.stderr)
        return 2
    trees = [Tree("current", REPO)]
    if args.baseline:
        base = args.baseline.resolve()
        if not (base / "memdefragd" / "cli.py").is_file():
            print(f"hostile.py: {base} holds no memdefragd/cli.py", file=sys.stderr)
            return 2
        trees.append(Tree("baseline", base))
    wanted = args.cases.split(",")
    cases = [c for c in CASES if c.key in wanted]
    if not cases:
        print(f"hostile.py: no case among {args.cases!r}", file=sys.stderr)
        return 2

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 3,000 clients of our own

    def interrupted(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="mdd-hostile-"))
    os.chmod(tmp, 0o755)  # root-owned, not writable by others: the loader's rule
    started = time.monotonic()
    results: dict[tuple[str, str], Result] = {}
    try:
        for case in cases:  # both trees one after the other, case by case
            for t in trees:
                t0 = time.monotonic()
                print(f"[{t0 - started:5.0f} s] case {case.key}, {t.label} ...", file=sys.stderr)
                results[case.key, t.label] = run_case(case, t, tmp)
        print()
        print("memdefragd under hostile input (issue 11), measured side by side in one run")
        for t in trees:
            print(f"  {t.label}: {t.describe()}")
        print(
            f"  daemon: scan_interval 1s, RLIMIT_NOFILE {DAEMON_NOFILE}, pressure guard off; "
            f"load {LOAD_SECONDS:g} s, then {AFTER_SECONDS:g} s without it, then SIGTERM\n"
            f"  scrapes every {SCRAPE_EVERY:g} s, {SCRAPE_TIMEOUT:g} s deadline; SIGTERM "
            f"capped at {TERM_CAP:g} s; ratio = baseline / current of the figure marked *; "
            f"{os.cpu_count()} CPUs"
        )
        print()
        print_table(trees, results, cases)
        print(f"total {time.monotonic() - started:.0f} s")
    finally:
        cleanup_all()
        if args.keep:
            print(f"configs and daemon logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
