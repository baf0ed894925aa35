"""Command lines an unprivileged user writes to stall the daemon.

`nobody` starts processes whose command lines make backtracking regexes explode: 40 `a`s
and a `b` against `(a+)+$` (2^40 steps for Python's `re`), and 70 KB of `python worker
worker ...` without a `queue` against `python.*worker.*queue` (minutes for `re`). Under
them the daemon must keep its cycles, answer scrapes and honour SIGTERM within 2 s; RE2
and the 4096-byte cap on what a pattern sees make each match take microseconds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from urllib.request import urlopen

import pytest

from tests.kernel.helpers import require_kernel, write_config

pytestmark = pytest.mark.kernel

INTERVAL = 1.0  # write_config's scan_interval
TARGETS = """\
  - name: nested
    match: {cmdline: '(a+)+$'}
  - name: queue
    match: {cmdline: 'python.*worker.*queue'}
"""
SCANNED = re.compile(r"^(\S+ \S+) .*scanned \d+ process\(es\)", re.M)


@pytest.fixture
def as_nobody() -> Iterator:
    """Factory: as_nobody(*args) starts `/bin/sh -c 'sleep 600; :' ARGS...` as `nobody`, a
    shell that stays with that command line (the `; :` keeps it from exec'ing sleep)."""
    require_kernel(os.geteuid() == 0, "starting processes as nobody needs root")
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen(
            ["/bin/sh", "-c", "sleep 600; :", *args],
            user="nobody", cwd="/", start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        started.append(p)
        return p

    yield start
    for p in started:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def scrape(port: int) -> dict[str, float]:
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M)}


def cmdline_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def test_hostile_command_lines_stall_nothing(as_nobody, daemons, tmp_path):
    nested = as_nobody("a" * 40 + "b")
    long = as_nobody("python", *["worker"] * 10_000)  # 70 KB, and no "queue"
    benign = as_nobody("python", "worker", "queue")  # a match all the same
    for p in (nested, long, benign):  # each shell is up with its hostile command line
        end = time.monotonic() + 10
        while not cmdline_of(p.pid).startswith(b"/bin/sh\0") and time.monotonic() < end:
            time.sleep(0.05)
    assert len(cmdline_of(long.pid)) > 70_000

    cfg = write_config(tmp_path / "m.yaml", "mdd-hostile", listen="127.0.0.1:0")
    cfg.write_text(cfg.read_text() + TARGETS)
    d = daemons(cfg, "--log-level", "debug")
    port = d.metrics_port()
    d.wait_for("started:", timeout=10)  # after the first rescan, which met all three

    # Cycles keep their interval: a few intervals give as many "scanned" lines.
    first = len(SCANNED.findall(d.text()))
    time.sleep(4 * INTERVAL)
    assert len(SCANNED.findall(d.text())) - first >= 3, d.text()

    # Scrapes answer, and show what discovery costs and found.
    t0 = time.monotonic()
    m = scrape(port)
    assert time.monotonic() - t0 < 2.0
    assert m["memdefragd_discovery_duration_seconds_count"] >= 1
    assert m["memdefragd_discovery_tracked_processes"] >= 1  # the benign shell, at least
    assert m["memdefragd_discovery_listed_processes"] >= 3
    assert time.time() - m["memdefragd_last_cycle_timestamp_seconds"] < 3 * INTERVAL

    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(2.0) == 0
    assert time.monotonic() - t0 < 2.0
    text = d.text()
    assert "Traceback" not in text
    # Matching still means what it says: the benign shell is claimed, the hostile ones not.
    assert f"tracking pid {benign.pid} (sh) for target queue" in text, text
    assert f"tracking pid {nested.pid} " not in text and f"tracking pid {long.pid} " not in text
