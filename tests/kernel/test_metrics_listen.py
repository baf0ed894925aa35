"""daemon.metrics.listen at start and on SIGHUP: an address that cannot
be bound is a config error (exit 2) at start, a failed reload (old endpoint kept) later;
a reload that moves the endpoint binds the new one before letting the old one go."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from urllib.request import urlopen

import pytest

from .helpers import MiB, write_config

pytestmark = pytest.mark.kernel

UNBINDABLE = "192.0.2.1"  # TEST-NET-1: on no interface of this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_reloads(port: int, ok: int, failed: int) -> None:
    """The reload counters port serves reach ok/failed (snapshots follow cycles)."""
    want, end = {"ok": ok, "failed": failed}, time.monotonic() + 5
    while True:
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        found = re.findall(r'memdefragd_config_reloads_total\{result="(\w+)"\} (\S+)', text)
        got = {k: float(v) for k, v in found}
        if got == want:
            return
        assert time.monotonic() < end, f"reloads {got} on port {port}, expected {want}"
        time.sleep(0.2)


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_unbindable_listen_at_start_is_a_config_error(tmp_path):
    cfg = write_config(tmp_path / "m.yaml", "mdd-nobind", listen=f"{UNBINDABLE}:9847")
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "run", "-c", str(cfg)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "daemon.metrics.listen" in r.stderr and str(cfg) in r.stderr, r.stderr
    assert f"{UNBINDABLE}:9847" in r.stderr and "started:" not in r.stderr, r.stderr


def test_reload_moves_the_endpoint_or_keeps_it(spawn, daemons, tmp_path):
    spawn(8 * MiB, comm="mdd-listen")
    cfg = write_config(tmp_path / "m.yaml", "mdd-listen", listen="127.0.0.1:0")
    d = daemons(cfg)
    first = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", d.wait_for("metrics on"))[1])
    d.wait_for("started:")

    def reload(listen: str, done: str) -> None:
        before = d.text().count(done)
        write_config(cfg, "mdd-listen", listen=listen)
        d.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 20
        while d.text().count(done) == before:
            assert time.monotonic() < end and d.proc.poll() is None, d.text()
            time.sleep(0.1)

    port = free_port()
    reload(f"127.0.0.1:{port}", "reloaded")
    assert refuses(first), d.text()
    assert_reloads(port, ok=1, failed=0)
    # Same port, another address: the old socket is in the way, the switch still happens.
    reload(f"0.0.0.0:{port}", "reloaded")
    assert_reloads(port, ok=2, failed=0)
    assert "metrics on http://0.0.0.0:" in d.text()
    # Cannot bind: the reload fails, the endpoint stays where it was.
    reload(f"{UNBINDABLE}:{port}", "reload failed")
    assert "daemon.metrics.listen" in d.text().rpartition("reload failed")[2], d.text()
    assert_reloads(port, ok=2, failed=1)
    reload("off", "reloaded")
    assert refuses(port), d.text()
    again = free_port()
    reload(f"127.0.0.1:{again}", "reloaded")
    assert_reloads(again, ok=4, failed=1)
    assert d.stop() == 0
