"""An exec storm: hundreds of matching processes a second that exec and exit at once, so
the daemon's lookups and pidfd opens keep meeting processes mid-exit.
Every such race must be counted and exported, never a traceback or a lost cycle."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.kernel.helpers import Daemon, write_config

pytestmark = pytest.mark.kernel

RATE = 400  # spawns a second, at most
STORM = 3.0  # seconds


def storm(program: str, stop: threading.Event, spawned: list[int]) -> None:
    """Spawn `program` (a symlink to /bin/true: its comm is the link's name) and reap it,
    paced to RATE a second, until `stop`."""
    t0 = time.monotonic()
    while not stop.is_set():
        pid = os.posix_spawn(program, [program], {})
        os.waitpid(pid, 0)
        spawned.append(pid)
        ahead = len(spawned) / RATE - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)


def scrape(port: int) -> tuple[dict[str, float], float]:
    """memdefragd_races_total by kind, and the time of the last full scan cycle."""
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    races = re.finditer(r'^memdefragd_races_total\{kind="(\w+)"\} (\S+)$', text, re.M)
    cycle = re.search(r"^memdefragd_last_cycle_timestamp_seconds (\S+)$", text, re.M)
    assert cycle is not None, text
    return {m[1]: float(m[2]) for m in races}, float(cycle[1])


def test_exec_storm_races_are_counted_exported_and_harmless(tmp_path: Path) -> None:
    link = tmp_path / "mdd-storm"
    link.symlink_to("/bin/true")
    cfg = write_config(tmp_path / "m.yaml", "mdd-storm", listen="127.0.0.1:0")
    d = Daemon(cfg)
    stop, spawned = threading.Event(), []
    thread = threading.Thread(target=storm, args=(str(link), stop, spawned), daemon=True)
    try:
        port = d.metrics_port()
        d.wait_for("scanned 0 process(es)")
        thread.start()
        time.sleep(0.5)
        _, first = scrape(port)
        time.sleep(STORM - 0.5)
        assert d.proc.poll() is None, d.text()[-3000:]
        races, last = scrape(port)  # scrapes answer mid-storm
        assert last - first >= 1.0, "full scan cycles stopped during the storm"
        t0 = time.monotonic()
        assert d.stop() == 0  # SIGTERM, the storm still raging
        took = time.monotonic() - t0
    finally:
        stop.set()
        d.stop()
    thread.join(5)
    text = d.text()
    assert len(spawned) >= RATE * STORM / 4, f"only {len(spawned)} spawns"
    assert took < 2.0, f"SIGTERM took {took:.1f} s"
    for bad in ("Traceback", "unexpected", " ERROR "):
        assert bad not in text, text[-3000:]
    assert {"discovery_vanished", "discovery_denied", "discovery_lookup_failed"} <= set(races)
    assert races["discovery_vanished"] + races.get("exited", 0) > 0, races
    assert races["discovery_lookup_failed"] == 0, races
