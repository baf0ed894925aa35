"""Thousands of idle connections to the metrics port cost nothing lasting:
scrapes still answer, threads and file descriptors stay bounded while they are open, cycles
keep coming, everything returns to its baseline once the clients leave, SIGTERM works."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import statistics
import time
from urllib.request import urlopen

import pytest

from tests.kernel.helpers import MiB, write_config

pytestmark = pytest.mark.kernel

CLIENTS = 3000
DAEMON_NOFILE = 1024  # what systemd gives the daemon unless told otherwise


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M)[1])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape_seconds(port: int) -> float:
    t0 = time.perf_counter()
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert b"memdefragd_scanned_pages_total" in r.read()
    return time.perf_counter() - t0


def test_idle_connections_cost_nothing_lasting(spawn, daemons, tmp_path):
    spawn(8 * MiB, comm="mdd-flood")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= CLIENTS + 100, f"RLIMIT_NOFILE hard limit {hard} is too low for the test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(DAEMON_NOFILE, hard), hard))
    try:  # the daemon inherits the limit it would have under systemd
        d = daemons(write_config(tmp_path / "m.yaml", "mdd-flood", listen="127.0.0.1:0"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pid = d.proc.pid
    port = d.metrics_port()
    d.wait_for("scanned 1 process(es)")
    d.wait_for("proc events")  # subscribed (or not) in its own thread, its fds open by then
    scrape_seconds(port)  # the endpoint's first answer is part of the baseline
    base_threads, base_fds, base_rss = status(pid, "Threads"), fds(pid), status(pid, "VmRSS")

    clients: list[socket.socket] = []
    latencies: list[float] = []  # answered, not timed out: while idle sockets pile up, then
    try:
        for i in range(CLIENTS):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            if i % 500 == 499:
                latencies.append(scrape_seconds(port))
        cycles = d.text().count("scanned 1 process(es)")
        latencies += [scrape_seconds(port) for _ in range(5)]
        threads, open_fds, rss = status(pid, "Threads"), fds(pid), status(pid, "VmRSS")
        time.sleep(2.5)  # scan_interval 1 s: cycles keep their pace
        assert d.text().count("scanned 1 process(es)") >= cycles + 2, d.text()
    finally:
        for s in clients:
            s.close()
    print(
        f"\n{CLIENTS} idle connections: threads {base_threads} -> {threads}, fds {base_fds} -> "
        f"{open_fds}, RSS {base_rss} -> {rss} KiB; scrape p50 "
        f"{statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
    )
    assert threads < 20, f"{threads} threads with {CLIENTS} idle connections"
    assert open_fds <= base_fds + 256 + 8, f"{open_fds} fds (baseline {base_fds})"

    left = time.monotonic()
    while time.monotonic() < left + 15:
        after = status(pid, "Threads"), fds(pid)
        if after[0] <= base_threads and after[1] <= base_fds:
            break
        time.sleep(0.2)
    print(f"{time.monotonic() - left:.1f} s after the clients left: threads {after[0]}, "
          f"fds {after[1]}, RSS {status(pid, 'VmRSS')} KiB")  # fmt: skip
    assert after[0] <= base_threads and after[1] <= base_fds, after

    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(Exception):
        d.proc.wait(2)
    assert d.proc.returncode == 0, f"SIGTERM not honoured within 2 s:\n{d.text()}"
    print(f"SIGTERM: exited in {time.monotonic() - t0:.2f} s")
