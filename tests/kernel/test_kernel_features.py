"""What this kernel lacks, and what memdefragd says and does about it: the same tests on
every kernel of the matrix (tests/vm), each asserting the path the kernel allows.

- MADV_COLLAPSE (Linux 6.1+): without it the daemon still starts, observes its targets
  (scans, scores, exports), moves no memory, and says why in its log and in
  memdefragd_method_refused; `memdefragd defrag` refuses with the reason.
- PAGEMAP_SCAN (Linux 6.7+): without it the daemon says that it reads pagemap whole and
  finds THPs through /proc/kpageflags.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest

from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.pagemap import NO_SCAN_REASON, scan_refusal

from .helpers import MiB, write_config

pytestmark = pytest.mark.kernel


def collapse_refusal() -> str | None:
    b = KernelBackend()
    try:
        return b.refusal("collapse")
    finally:
        b.close()


def anon_huge_kib(pid: int) -> int:
    return sum(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines()
        if line.startswith("AnonHugePages:")
    )


def scrape(port: int) -> str:
    return urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_the_daemon_collapses_or_observes_and_says_which(spawn, daemons, tmp_path):
    refusal = collapse_refusal()
    no_scan = scan_refusal()
    child = spawn(32 * MiB, comm="mdd-features")
    cfg = write_config(tmp_path / "m.yaml", "mdd-features", listen="127.0.0.1:0")
    d = daemons(cfg, "--log-level", "debug")
    port = d.metrics_port()
    # PAGEMAP_SCAN or the fallback, said at start either way it goes
    text = d.wait_for("scanned 1 process(es)", timeout=60)
    assert (NO_SCAN_REASON in text) == (no_scan is not None), text[-3000:]
    if refusal is None:
        text = d.wait_for("collapse pid", timeout=120)
        assert "cannot run on this machine" not in text
        assert "memdefragd_method_refused{" not in scrape(port)
        assert d.stop() == 0
        return
    # A kernel before 6.1: an observer, said in the log and the metrics.
    assert (
        f"method 'collapse' cannot run on this machine ({refusal}): target(s) testee are "
        "observed only (scanned, scored and exported; no memory is moved)"
    ) in text
    text = d.wait_for("scanned 1 process(es)", timeout=60, count=4)
    assert "collapse pid" not in text and "Traceback" not in text, text[-3000:]
    metrics = scrape(port)
    assert 'memdefragd_method_refused{method="collapse"} 1.0' in metrics
    assert 'memdefragd_target_processes{target="testee"} 1.0' in metrics, metrics
    # the child's 32 MiB of 4 KiB pages are collapsible (and some of its heap besides)
    m = re.search(r'memdefragd_target_collapsible_bytes\{target="testee"\} (\S+)', metrics)
    assert m and float(m[1]) >= 32 * MiB, metrics
    assert anon_huge_kib(child.pid) == 0  # nothing moved
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5.0


def test_defrag_command_refuses_a_kernel_without_madv_collapse_with_the_reason(spawn):
    refusal = collapse_refusal()
    child = spawn(4 * MiB, comm="mdd-features-cli")
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "defrag", "--pid", str(child.pid)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if refusal is None:
        assert r.returncode == 0, r.stderr
        assert "MADV_COLLAPSE" not in r.stderr
        return
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"memdefragd: method 'collapse': {refusal}\n"
    assert "Traceback" not in r.stderr
