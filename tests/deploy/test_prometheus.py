"""A real Prometheus server, and a real Alertmanager, on a real daemon: the dashboard's
queries and the alert rules, evaluated by the server they are written for.

Prometheus and Alertmanager are Debian's (`make promtool` takes .cache/promtool/prometheus,
.cache/promtool/prometheus-alertmanager and its templates out of the `prometheus` and
`prometheus-alertmanager` .debs, never installing them; PROMETHEUS=path and
ALERTMANAGER=path override). Without them these tests skip, or fail under
MEMDEFRAGD_REQUIRE_KERNEL=1 (as CI runs them).

One scenario (the module's `scenario` fixture), then tests of what it left: a child
process the test starts (16 MiB touched page by page), a `memdefragd run` on it (kernel
backend, scan_interval 1s, metrics on 127.0.0.1:0, paced so that a pass over the child
takes seconds), a Prometheus scraping it and evaluating etc/prometheus/memdefragd.rules.yml
every second and sending its alerts to an Alertmanager, which posts them to a webhook the
test serves. What the daemon sees causes every alert; no series is written by hand. Each
fault is held until the webhook has the alert firing (Alertmanager never notifies an alert
resolved within its group_wait).

1. The config asks for method ranger, which no kernel here has: the daemon only observes
   the target and exports memdefragd_method_refused{method="ranger"} 1, and
   MemdefragdObserveOnly fires. A SIGHUP to a config without ranger resolves it.
2. The daemon collapses the child; the child forks (copy-on-write splits its huge pages)
   and the daemon makes them huge again (the fork and regression panels' data;
   MemdefragdThpCoverageDropping goes pending, not firing).
3. A SIGHUP to a broken config: MemdefragdConfigReloadFailed fires, and resolves once the
   failed reload leaves the rule's window.
4. The daemon's main thread is held in a ptrace stop while its metrics thread goes on
   answering scrapes (a stuck main loop): MemdefragdNotCycling fires, and resolves when
   the thread is let go. `up` stays 1 meanwhile.
5. SIGSTOP: no scrape is answered and MemdefragdDown fires; SIGCONT resolves it.
   MemdefragdNotCycling cannot fire then: a failed scrape marks all of the target's
   series stale, so that rule covers only a daemon that still answers (step 4).

The tests: `up` and the target; every rule loaded and evaluated without error; the four
alerts firing then resolved, each in its step, and notified so to the webhook; every query
of etc/grafana/memdefragd.json run as its panel runs it (instant targets at the end, range
targets over the whole scenario with a 1 s step), its variables all selected (.+) and
Grafana's durations as Grafana sets them for a 1 s scrape interval, returning data unless
EXPECTED_EMPTY or EMPTY_AT_END says why not (and then returning nothing, so that those
lists stay honest) or MAY_BE_EMPTY says why it may not; the label_values() variables
listing this daemon; the stat panels' values at the end; and the event panels showing
the events the scenario caused (per-target series exist at 0 from the start, so a single
fork shows).

The rules wait `for: 5m` to `30m` over windows up to `[6h]`, and NotCycling has a 300 s
floor: no test can wait that long, so the test loads the rules with yaml and divides every
duration in them (each `for:`, each range selector, that floor) by SCALE, programmatically
(shortened_rules, checked by test_rules_are_shortened_throughout), before Prometheus loads
them; the expressions are otherwise the project's own. Each alert's pending, firing and
resolved times, polled from /api/v1/alerts every 0.5 s, are printed and listed in the
deployment figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
import yaml

from tests.kernel.helpers import Daemon, MiB, start_child, write_config
from tests.paths import REPO

from .conftest import report, require
from .test_dashboard_rules import RULES, dashboard, expand, panels, variable_queries

CACHE = REPO / ".cache" / "promtool"
SYSTEM_TEMPLATES = "/usr/share/prometheus/alertmanager/default.tmpl"
COMM = "mdd-prom"
TARGET = "testee"  # write_config's target name
SIZE = 16 * MiB
SCALE = 150  # for: 5m -> 2s, 10m -> 4s, 30m -> 12s; [15m] -> 6s, [6h] -> 144s; 300 -> 2
STEP = 1  # seconds: scrape and evaluation interval, and the step of range queries
# Grafana's $__rate_interval with a 1 s scrape interval and a 1 s step:
# max(4 * scrape interval, step + scrape interval).
RATE_INTERVAL = "4s"

# Queries expected to return nothing here, by panel title and a metric in the query (a
# panel may have several), and why. Each must indeed return nothing (then take it off).
EXPECTED_EMPTY = {
    ("Failed regions by reason", "memdefragd_failures_total"):
        "no collapse fails here, and the counter has a series only from a target's first failure",
    ("Races and errors", "memdefragd_errors_total"):
        "no unexpected error in the daemon, and the counter has a series only from the first",
}  # fmt: skip
# Queries that may return data or not, and why: only their errors count.
MAY_BE_EMPTY = {
    # The restore is timed only when the daemon sees the fork child exit; a child that
    # lives milliseconds sometimes exits before discovery reads it (about 1 run in 6 here:
    # the split is then counted as cause "drop", and no restore is timed).
    ("Fork restore time", "memdefragd_fork_restore_seconds_bucket"):
        "the fork child's exit can be missed",
}  # fmt: skip
# Instant queries that show, at the end, a state the scenario has left: (panel title,
# metric) -> the step of the scenario (Scenario.moments) at which they must return data.
EMPTY_AT_END = {
    ("Refused methods", "memdefragd_method_refused"): "ranger refused",
}
# Stat panels (instant) at the end: one daemon, one target, one process, nothing wrong.
STATS_AT_END = {
    "Daemons": 1, "Targets": 1, "Processes": 1, "Paused": 0, "Daemons down": 0,
    "Not cycling": 0, "Method refused": 0, "Collectors failing": 0,
}  # fmt: skip
# Range panels of counters the scenario moves: each must show a non-zero value at some step.
EVENTS = {
    ("Attempted, done and verified bytes/s", "memdefragd_verified_bytes_total"): "the child made huge, twice",
    ("Requests by result", "memdefragd_requests_total"): "a request per 2 MiB region",
    ("Pacing rest after a request", "memdefragd_pacing_delay_seconds_bucket"): "every request paced",
    ("Config reloads", "memdefragd_config_reloads_total"): "a reload, and a failed one",
    ("Forks", "memdefragd_forks_total"): "the child forked once",
    ("Regressions by cause", "memdefragd_regressions_total"): "the fork split its huge pages",
    ("Bytes made huge again", "memdefragd_recollapsed_bytes_total"): "they were made huge again",
}  # fmt: skip

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000  # waitpid's __WALL


# ---------------------------------------------------------------- the rules, shortened

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
DURATION = re.compile(r"(\d+)(ms|[smhdwy])")
RANGE = re.compile(r"\[((?:\d+(?:ms|[smhdwy]))+)\]")
# clamp_min(x, N): in these rules a floor in seconds (NotCycling's 300 s)
FLOOR = re.compile(r"(clamp_min\([^,()]*,\s*)(\d+(?:\.\d+)?)(\s*\))")


def seconds(text: str) -> float:
    parts = DURATION.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * UNITS[u] for n, u in parts)


def duration(s: float) -> str:
    ms = round(s * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def shortened_rules() -> dict:
    """etc/prometheus/memdefragd.rules.yml with every duration divided by SCALE."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = duration(seconds(rule["for"]) / SCALE)
            expr = RANGE.sub(lambda m: f"[{duration(seconds(m[1]) / SCALE)}]", rule["expr"])
            rule["expr"] = FLOOR.sub(lambda m: f"{m[1]}{float(m[2]) / SCALE:g}{m[3]}", expr)
    return doc


def test_rules_are_shortened_throughout():
    """Every duration in the rules divided by SCALE, nothing else changed."""
    original = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}  # fmt: skip
    short = {r["alert"]: r for g in shortened_rules()["groups"] for r in g["rules"]}
    assert short.keys() == original.keys()
    for name, rule in short.items():
        was = original[name]
        if "for" in was:
            assert seconds(rule["for"]) * SCALE == seconds(was["for"]), name
        ranges = [seconds(r) for r in RANGE.findall(rule["expr"])]
        assert ranges == [seconds(r) / SCALE for r in RANGE.findall(was["expr"])], name
        assert RANGE.sub("[]", FLOOR.sub(r"\1\3", rule["expr"])) == RANGE.sub(
            "[]", FLOOR.sub(r"\1\3", was["expr"])
        ), name
    assert "3 * memdefragd_scan_interval_seconds, 2)" in short["MemdefragdNotCycling"]["expr"]
    assert short["MemdefragdDown"]["for"] == "2s"
    assert "[144s]" in short["MemdefragdThpCoverageDropping"]["expr"]


# ---------------------------------------------------------------- servers


def binary(env: str, *names: str) -> str | None:
    """$env if set (None unless executable), else `make promtool`'s copy, else PATH's."""
    if os.environ.get(env):
        return os.environ[env] if os.access(os.environ[env], os.X_OK) else None
    for name in names:
        if os.access(CACHE / name, os.X_OK):
            return str(CACHE / name)
    return next(filter(None, map(shutil.which, names)), None)


def in_template_overlay(argv: list[str]) -> list[str]:
    """Debian's Alertmanager reads its templates from /usr/share/prometheus/alertmanager/.
    Where they are not installed, `make promtool` put them in .cache/promtool/share/: then
    run it in a mount namespace of its own where they are laid over /usr/share (an
    overlay, gone with the process: nothing on the host changes). Upstream's binary has
    them built in and runs as it is."""
    if Path(SYSTEM_TEMPLATES).exists() or not (CACHE / "share" / "prometheus").is_dir():
        return argv
    unshare = shutil.which("unshare")
    require(unshare, "unshare (util-linux) is missing: Alertmanager cannot find its templates")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    script = 'mount -t overlay overlay -o "lowerdir=$0:/usr/share" /usr/share && exec "$@"'
    return [unshare, "--mount", "--propagation", "private", *user, "sh", "-c", script,
            str(CACHE / "share"), *argv]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server binary as a subprocess in `workdir`, its output in NAME.log there."""

    def __init__(self, name: str, argv: list[str], workdir: Path):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, url: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.text()[-5000:]}"
            with contextlib.suppress(OSError), urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready in {timeout} s:\n{self.text()[-5000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Webhook(http.server.ThreadingHTTPServer):
    """Alertmanager's webhook receiver: every POSTed notification, with when it came."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict]] = []
        super().__init__(("127.0.0.1", 0), WebhookHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def notified(self, alertname: str, status: str) -> float | None:
        """When a notification said `alertname` is `status` (firing, resolved)."""
        for t, payload in list(self.received):
            for alert in payload.get("alerts", []):
                if alert["labels"].get("alertname") == alertname and alert["status"] == status:
                    return t
        return None


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append((time.time(), json.loads(body)))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def api(base: str, path: str, **params: Any) -> Any:
    """GET Prometheus' API: its `data`, or AssertionError with the error it gave."""
    url = f"{base}{path}?{urlencode(params, doseq=True)}"
    try:
        with urlopen(url, timeout=10) as r:
            body = json.load(r)
    except HTTPError as e:
        raise AssertionError(
            f"{path} {params}: HTTP {e.code}: {e.read().decode()[:2000]}"
        ) from None
    assert body["status"] == "success", body
    return body["data"]


class AlertWatch(threading.Thread):
    """Polls /api/v1/alerts every 0.5 s; keeps each alert's state changes (pending, firing,
    inactive: gone from the list, i.e. resolved or never fired), with their times."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base = base
        self.events: list[tuple[float, str, str]] = []  # (unix time, alertname, new state)
        self.state: dict[str, str] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.5):
            try:
                alerts = api(self.base, "/api/v1/alerts")["alerts"]
            except (OSError, AssertionError):
                continue
            now, current = time.time(), {}
            for a in alerts:
                name = a["labels"]["alertname"]
                if current.get(name) != "firing":
                    current[name] = a["state"]
            for name in sorted(set(self.state) | set(current)):
                new = current.get(name, "inactive")
                if self.state.get(name, "inactive") != new:
                    self.events.append((now, name, new))
                    self.state[name] = new

    def first(self, name: str, state: str, after: float = 0.0) -> float | None:
        return next((t for t, n, s in list(self.events) if n == name and s == state and t >= after), None)  # fmt: skip

    def wait(self, name: str, state: str, after: float, timeout: float) -> float | None:
        """When `name` went `state` at or after `after`, waiting up to `timeout`; None if it
        did not (the tests say what is missing, from the timeline)."""
        end = time.monotonic() + timeout
        while (t := self.first(name, state, after)) is None and time.monotonic() < end:
            time.sleep(0.1)
        return t

    def timeline(self, name: str) -> list[tuple[float, str]]:
        return [(t, s) for t, n, s in list(self.events) if n == name]


# ---------------------------------------------------------------- the daemon


def anon_huge(pid: int, addr: int) -> int:
    """AnonHugePages (bytes) of the VMA starting at addr, from the kernel's smaps."""
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":
            inside = line.startswith(f"{addr:x}-")
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VMA at 0x{addr:x}")


def ptrace(request: int, pid: int) -> None:
    if libc.ptrace(request, pid, None, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"ptrace({request:#x}, {pid}): {os.strerror(e)}")


def scrapes(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/metrics"
    with contextlib.suppress(OSError), urlopen(url, timeout=2) as r:
        return r.status == 200 and b"memdefragd_last_cycle_timestamp_seconds" in r.read()
    return False


@contextlib.contextmanager
def main_thread_held(pid: int, port: int) -> Iterator[None]:
    """The daemon's main thread (tid == pid) in a ptrace stop, its other threads running:
    a main loop stuck while the metrics thread answers. A thread stopped while it holds
    the GIL (or a lock a scrape needs) would stop the metrics thread too: then let it go
    and stop it again, until a scrape is answered while it is held."""
    for _ in range(20):
        try:
            ptrace(PTRACE_SEIZE, pid)
        except PermissionError as e:  # Yama's ptrace_scope 3, a seccomp filter
            require(False, f"ptrace refused on the daemon, our child: {e}")
        try:
            ptrace(PTRACE_INTERRUPT, pid)
            _, status = os.waitpid(pid, WALL)
            assert os.WIFSTOPPED(status), f"wait status {status:#x}"
            if scrapes(port):
                break
        except BaseException:
            ptrace(PTRACE_DETACH, pid)
            raise
        ptrace(PTRACE_DETACH, pid)
        time.sleep(0.2)
    else:
        raise AssertionError("no scrape answered while the main thread was held, 20 times")
    try:
        yield
    finally:
        ptrace(PTRACE_DETACH, pid)


# ---------------------------------------------------------------- the scenario


@dataclass
class Scenario:
    base: str  # Prometheus' URL, still serving during the tests
    port: int  # the daemon's metrics port
    start: float  # unix time: Prometheus ready, the alert watch started
    watch: AlertWatch
    hook: Webhook
    end: float = 0.0  # unix time: every step done, every alert resolved (or given up on)
    moments: dict[str, float] = field(default_factory=dict)  # step -> unix time in it
    notes: list[str] = field(default_factory=list)  # what went wrong in a step
    seconds: float = 0.0  # the fixture's wall time, servers' start and last waits included


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Iterator[Scenario]:
    """The five steps of the module's docstring, once for all the tests of this module.
    What the tests check is recorded (alert states, webhook notifications) or left in
    Prometheus, which serves until the module is done."""
    t0 = time.monotonic()
    prometheus = binary("PROMETHEUS", "prometheus")
    require(
        prometheus, "prometheus is missing: `make promtool` fetches it (or set PROMETHEUS=path)"
    )
    alertmanager = binary("ALERTMANAGER", "prometheus-alertmanager", "alertmanager")
    require(
        alertmanager,
        "prometheus-alertmanager is missing: `make promtool` fetches it (or set ALERTMANAGER=path)",
    )
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    require(
        thp.exists() and "[always]" not in thp.read_text(),
        "THP must be there and not `always`: the child needs 4 KiB pages to be collapsed",
    )
    tmp = tmp_path_factory.mktemp("prometheus")

    with contextlib.ExitStack() as stack:
        hook = Webhook()
        stack.callback(hook.shutdown)
        am_port, prom_port = free_port(), free_port()
        (tmp / "am.yml").write_text(
            yaml.safe_dump({
                "route": {"receiver": "test", "group_by": ["alertname"], "group_wait": "1s",
                          "group_interval": "1s", "repeat_interval": "1h"},
                "receivers": [{"name": "test", "webhook_configs": [
                    {"url": f"http://127.0.0.1:{hook.server_port}/", "send_resolved": True}]}],
            })
        )  # fmt: skip
        am = Server(
            "alertmanager",
            in_template_overlay(
                [alertmanager, "--config.file=am.yml", "--storage.path=am-data",
                 f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="]
            ),
            tmp,
        )  # fmt: skip
        stack.callback(am.stop)

        child = start_child(SIZE, pattern=True, forkable=True, comm=COMM)
        stack.callback(child.stop)
        # Paced to a 0.1% duty cycle, a rest of max_pause (500 ms) after each 2 MiB region:
        # each pass over the child takes seconds, so scrapes see a queue (pending bytes).
        pacing = "duty_cycle: 0.1%, max_pause: 500ms"
        good = write_config(
            tmp / "good.yaml", COMM, listen="127.0.0.1:0", pacing=pacing
        ).read_text()
        ranger = yaml.safe_load(good)
        ranger["daemon"]["method"] = "ranger"
        conf = tmp / "memdefragd.yaml"
        conf.write_text(yaml.safe_dump(ranger))
        d = Daemon(conf)

        def stop_daemon() -> None:
            d.stop()
            print(f"----- daemon log -----\n{d.text()[-20000:]}")

        stack.callback(stop_daemon)
        port = d.metrics_port()

        (tmp / "rules.yml").write_text(yaml.safe_dump(shortened_rules(), sort_keys=False))
        (tmp / "prometheus.yml").write_text(
            yaml.safe_dump({
                "global": {"scrape_interval": f"{STEP}s", "scrape_timeout": f"{STEP}s",
                           "evaluation_interval": f"{STEP}s"},
                "rule_files": ["rules.yml"],
                "alerting": {"alertmanagers": [
                    {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [{"job_name": "memdefragd",
                                    "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
            })
        )  # fmt: skip
        prom = Server(
            "prometheus",
            [prometheus, "--config.file=prometheus.yml", "--storage.tsdb.path=tsdb",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            tmp,
        )  # fmt: skip
        stack.callback(lambda: print(f"----- prometheus log -----\n{prom.text()[-5000:]}"))
        stack.callback(prom.stop)
        base = f"http://127.0.0.1:{prom_port}"
        prom.wait_ready(f"{base}/-/ready")
        am.wait_ready(f"http://127.0.0.1:{am_port}/-/ready")
        sc = Scenario(base, port, time.time(), AlertWatch(base), hook)
        watch = sc.watch
        watch.start()
        stack.callback(watch.halt.set)

        def step(name: str, alert: str, state: str, after: float, timeout: float = 30) -> float:
            """When `alert` went `state`; if firing, once the webhook has it too (an alert
            resolved before Alertmanager's group_wait is never notified)."""
            t = watch.wait(alert, state, after, timeout)
            if t is None:
                sc.notes.append(f"{name}: {alert} not {state} within {timeout} s")
                return time.time()
            deadline = time.monotonic() + timeout
            while state == "firing" and not hook.notified(alert, "firing"):
                if time.monotonic() > deadline:
                    sc.notes.append(f"{name}: {alert} firing, not at the webhook in {timeout} s")
                    break
                time.sleep(0.1)
            return t

        # The target is up.
        deadline = time.monotonic() + 30
        while not api(base, "/api/v1/query", query='up{job="memdefragd"}')["result"]:
            assert time.monotonic() < deadline, f"no `up` within 30 s:\n{prom.text()[-3000:]}"
            time.sleep(0.2)

        # 1. Method ranger refused: ObserveOnly; a config without it resolves it.
        assert "method 'ranger' cannot run on this machine" in d.text(), d.text()
        fired = step("1. ranger refused", "MemdefragdObserveOnly", "firing", sc.start)
        sc.moments["ranger refused"] = fired
        conf.write_text(good)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("reloaded")
        step("1. ranger dropped", "MemdefragdObserveOnly", "inactive", fired)

        # 2. Collapsed, forked (split copy-on-write), collapsed again.
        d.wait_for(f"collapse pid {child.pid} ", timeout=60)
        d.wait_settled(timeout=60)
        assert anon_huge(child.pid, child.addr) >= 0.9 * SIZE, d.text()[-3000:]
        gone = child.fork()
        require(
            anon_huge(child.pid, child.addr) < 0.5 * SIZE,
            "copy-on-write kept the parent's huge pages: no regression to show",
        )
        # (Its log says "THP coverage restored" only if it saw the fork child exit, which
        # it may miss: the child lives a few ms. Then the split counts as cause "drop".)
        d.wait_for("that were huge are split again")
        deadline = time.monotonic() + 60
        while anon_huge(child.pid, child.addr) < 0.9 * SIZE:
            assert time.monotonic() < deadline, f"not made huge again:\n{d.text()[-3000:]}"
            time.sleep(0.2)
        assert f"pid {child.pid} ({TARGET}) forked pid {gone}" in d.text()
        sc.moments["fork mended"] = time.time()

        # 3. A broken config: ConfigReloadFailed, until the failure leaves its window.
        hup = time.time()
        assert "scan_interval: 1s" in good, good
        conf.write_text(good.replace("scan_interval: 1s", "scan_interval: soon"))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("reload failed, keeping the running config")
        conf.write_text(good)
        step("3. bad config", "MemdefragdConfigReloadFailed", "firing", hup)

        # 4. The main loop stuck, the metrics thread answering: NotCycling, with `up` 1.
        sc.moments["main thread held"] = time.time()
        with main_thread_held(d.proc.pid, port):
            fired = step("4. main thread held", "MemdefragdNotCycling", "firing", sc.moments["main thread held"])  # fmt: skip
            sc.moments["not cycling"] = time.time()
        step("4. main thread let go", "MemdefragdNotCycling", "inactive", fired)

        # 5. Stopped: no scrape answered: Down.
        sc.moments["stopped"] = time.time()
        d.proc.send_signal(signal.SIGSTOP)
        try:
            fired = step("5. SIGSTOP", "MemdefragdDown", "firing", sc.moments["stopped"])
        finally:
            d.proc.send_signal(signal.SIGCONT)
        sc.moments["continued"] = time.time()
        step("5. SIGCONT", "MemdefragdDown", "inactive", fired)
        step("3. window passed", "MemdefragdConfigReloadFailed", "inactive", hup)
        sc.end = time.time()

        # Alertmanager's notifications: wait for the resolved ones too.
        deadline = time.monotonic() + 30
        while not all(hook.notified(n, "resolved") for n in FIRED):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        sc.seconds = time.monotonic() - t0
        yield sc


# Alerts the scenario causes, each in its step.
FIRED = ("MemdefragdObserveOnly", "MemdefragdConfigReloadFailed", "MemdefragdNotCycling",
         "MemdefragdDown")  # fmt: skip


def clock(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-5]


# ---------------------------------------------------------------- the dashboard


def has_data(data: dict, nonzero: bool = False) -> bool:
    """A finite sample (a finite non-zero one) in an instant or a range result."""
    for series in data["result"]:
        for _, v in series.get("values") or [series["value"]]:
            if math.isfinite(float(v)) and (float(v) != 0 or not nonzero):
                return True
    return False


def dashboard_queries(sc: Scenario) -> Iterator[tuple[set[tuple[str, str]], str, dict | str]]:
    """Every panel's queries, run as the panel runs them (instant targets at the end, range
    targets over the scenario): (its (panel title, metric) keys, a description, the data
    or the error)."""
    d = dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    durations = {"__rate_interval": RATE_INTERVAL, "__interval": f"{STEP}s",
                 "__range": f"{math.ceil(sc.end - sc.start)}s"}  # fmt: skip
    for p in panels(d):
        for t in p.get("targets", []):
            expr = expand(t["expr"], names, durations)
            assert not re.search(r"\$(?!\d)", expr), f"a variable left in {expr!r}"
            where = f"panel {p['title']!r} ({'instant' if t.get('instant') else 'range'}): {expr}"
            keys = {(p["title"], piece) for piece in re.findall(r"memdefragd_\w+|\bup\b", expr)}
            try:
                if t.get("instant"):
                    data = api(sc.base, "/api/v1/query", query=expr, time=sc.end)
                else:
                    data = api(sc.base, "/api/v1/query_range", query=expr, start=sc.start,
                               end=sc.end, step=STEP)  # fmt: skip
            except AssertionError as e:
                yield keys, where, str(e)
                continue
            yield keys, where, data


# ---------------------------------------------------------------- the tests


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_prometheus_scrapes_the_daemon_and_it_is_down_only_when_stopped(scenario):
    sc = scenario
    up = api(sc.base, "/api/v1/query", query='up{job="memdefragd"}')["result"]
    assert [s["value"][1] for s in up] == ["1"], up
    (target,) = api(sc.base, "/api/v1/targets")["activeTargets"]
    assert target["health"] == "up" and target["labels"]["job"] == "memdefragd", target
    assert target["scrapeUrl"] == f"http://127.0.0.1:{sc.port}/metrics", target
    down = api(sc.base, "/api/v1/query_range", query='up{job="memdefragd"} == 0',
               start=sc.start, end=sc.end, step=STEP)["result"]  # fmt: skip
    when = [float(t) for series in down for t, _ in series["values"]]
    assert when, "`up` never 0, not even while the daemon was stopped"
    # the main thread held (step 4) did not stop the scrapes; SIGSTOP (step 5) did
    stopped, continued = sc.moments["stopped"], sc.moments["continued"]
    assert all(stopped <= t <= continued + 3 * STEP for t in when), (sc.moments, when)


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_every_rule_is_loaded_and_evaluates_without_error(scenario):
    rules = [r for g in api(scenario.base, "/api/v1/rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(
        r["alert"] for g in shortened_rules()["groups"] for r in g["rules"]
    )
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_alerts_fire_and_resolve_on_what_the_daemon_sees(scenario, record_property):
    sc, watch = scenario, scenario.watch
    lines = []
    for name in sorted({n for _, n, _ in watch.events}):
        steps = ", ".join(
            f"{s} {clock(t)} (+{t - sc.start:.1f} s)" for t, s in watch.timeline(name)
        )
        lines.append(f"{name}: {steps}")
    lines.append(f"scenario {sc.end - sc.start:.1f} s, the whole fixture {sc.seconds:.1f} s")
    for line in lines:
        print(line)
        report(f"prometheus: {line}")
    record_property("alerts", "\n".join(lines))

    assert sc.notes == [], "\n".join(sc.notes + lines)
    for name in FIRED:
        states = [s for _, s in watch.timeline(name)]
        assert "firing" in states and states[-1] == "inactive", (name, states)
    # Each in its own step: Down only once stopped; NotCycling only while the main thread
    # was held, never while stopped (a failed scrape marks the target's series stale).
    held, stopped = sc.moments["main thread held"], sc.moments["stopped"]
    down = [t for t, s in watch.timeline("MemdefragdDown") if s == "pending"]
    stuck = [t for t, s in watch.timeline("MemdefragdNotCycling") if s == "pending"]
    assert down and all(t >= stopped for t in down), watch.events
    assert stuck and all(held <= t < stopped for t in stuck), watch.events


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_alertmanager_notifies_the_webhook_firing_then_resolved(scenario):
    hook = scenario.hook
    notified = {n: (hook.notified(n, "firing"), hook.notified(n, "resolved")) for n in FIRED}
    for name, (fired, resolved) in notified.items():
        line = f"webhook {name}: firing {clock(fired)}, resolved {clock(resolved)}"
        print(line)
        report(f"prometheus: {line}")
    missing = [n for n, (f, r) in notified.items() if f is None or r is None or r < f]
    assert missing == [], (notified, hook.received)


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_every_dashboard_query_returns_data_or_is_expected_empty(scenario):
    problems, seen = [], set()
    for keys, where, data in dashboard_queries(scenario):
        if isinstance(data, str):
            problems.append(f"{where}: {data}")
            continue
        expected_empty, at_end = keys & EXPECTED_EMPTY.keys(), keys & EMPTY_AT_END.keys()
        either = keys & MAY_BE_EMPTY.keys()
        seen |= expected_empty | at_end | either
        if either:
            continue
        if expected_empty:
            if has_data(data):
                problems.append(f"{where}: has data: take it off EXPECTED_EMPTY")
        elif at_end:
            (key,) = at_end
            when = scenario.moments[EMPTY_AT_END[key]]
            expr = where.partition("): ")[2]
            earlier = api(scenario.base, "/api/v1/query", query=expr, time=when)
            if has_data(data) or not has_data(earlier):
                problems.append(f"{where}: at the end {data['result']}, during "
                                f"{EMPTY_AT_END[key]!r} {earlier['result']}")  # fmt: skip
        elif not has_data(data):
            problems.append(f"{where}: no data")
    unused = (EXPECTED_EMPTY.keys() | EMPTY_AT_END.keys() | MAY_BE_EMPTY.keys()) - seen
    problems += [f"allow-list entry {k} matches no query" for k in sorted(unused)]
    assert problems == [], "\n".join(problems)


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_dashboard_variables_list_this_daemon(scenario):
    sc = scenario
    want = {"job": {"memdefragd"}, "instance": {f"127.0.0.1:{sc.port}"}, "target": {TARGET}}
    for expr, label in variable_queries(dashboard()):
        series = api(sc.base, "/api/v1/series", **{"match[]": expand(expr, list(want))},
                     start=sc.start, end=sc.end)  # fmt: skip
        assert {s.get(label) for s in series} == want[label], (expr, series)


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_dashboard_stats_at_the_end(scenario):
    values = {}
    for keys, where, data in dashboard_queries(scenario):
        title = next(iter(keys))[0] if keys else where
        if title in STATS_AT_END and "(instant)" in where:
            assert not isinstance(data, str), data
            values[title] = [float(s["value"][1]) for s in data["result"]]
    assert values == {k: [v] for k, v in STATS_AT_END.items()}


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_dashboard_shows_what_the_scenario_did(scenario):
    """Per-target series exist at 0 from the start (Metrics.targets), so rate() and
    increase() see even a single event."""
    shown, missing = set(), []
    for keys, where, data in dashboard_queries(scenario):
        for key in keys & EVENTS.keys():
            shown.add(key)
            if isinstance(data, str) or not has_data(data, nonzero=True):
                missing.append(f"{where}: {EVENTS[key]}, but it shows no non-zero value")
    assert shown == EVENTS.keys()
    assert missing == [], "\n".join(missing)
