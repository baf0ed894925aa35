"""Gentle and persistent, on the real kernel: fork-aware re-collapse, hot regions first,
pacing between regions, and DAMON left alone where it is not ours to use."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from memdefragd.backends.kernel.damon import Damon, DamonUnavailable

from .helpers import PMD, MiB, require_kernel, write_config
from .test_daemon_kernel import anon_huge

pytestmark = pytest.mark.kernel

COLLAPSE = re.compile(r"collapse pid (\d+) \(\w+\) 0x([0-9a-f]+): .*?verified")


def collapsed_in_order(text: str, pid: int) -> list[int]:
    """Start addresses of the daemon's requests on `pid`, in the order it logged them."""
    return [int(m[2], 16) for m in COLLAPSE.finditer(text) if int(m[1]) == pid]


def wait_huge(child, want: float, timeout: float, d) -> int:
    end = time.monotonic() + timeout
    while (huge := anon_huge(child.pid, child.addr)) < want * child.size:
        assert d.proc.poll() is None, d.text()
        if time.monotonic() > end:
            break
        time.sleep(0.1)
    return huge


@pytest.mark.needs_collapse
def test_fork_child_exit_restores_parent_coverage_and_keeps_data(spawn, daemons, tmp_path):
    scan = 5.0
    child = spawn(256 * MiB, pattern=True, forkable=True, comm="mdd-forker")
    cfg = write_config(tmp_path / "m.yaml", "mdd-forker", pacing="latency_sensitive: false")
    cfg.write_text(cfg.read_text().replace("scan_interval: 1s", f"scan_interval: {scan:g}s"))
    d = daemons(cfg, "--log-level", "debug")
    huge = wait_huge(child, 0.9, 120, d)
    assert huge >= 0.9 * child.size, d.text()[-3000:]

    gone = child.fork()  # parent rewrites its pages while the child shares them; child exits
    exited = time.monotonic()
    split = anon_huge(child.pid, child.addr)
    require_kernel(split < 0.5 * child.size, "copy-on-write kept the parent's huge pages")

    huge = wait_huge(child, 0.9, 2 * scan, d)  # within two scan intervals of the exit
    took = time.monotonic() - exited
    text = d.text()
    assert huge >= 0.9 * child.size, f"{huge >> 20} MiB after {took:.1f} s:\n{text[-4000:]}"
    assert f"pid {child.pid} (testee) forked pid {gone}" in text
    assert f"pid {child.pid}'s fork child {gone} exited: re-scanning it" in text
    assert "split again (after a fork" in text
    # The daemon says so once its own re-scan agrees, which may come just after smaps does.
    text = d.wait_for(f"pid {child.pid} (testee): THP coverage restored", timeout=2 * scan)
    assert f"collapse pid {gone} " not in text  # the fork child shared memory: left alone
    result = child.verify()
    assert result["bad"] == [] and result["checked"] == child.size // 4096


@pytest.mark.needs_collapse
def test_hot_part_of_the_heap_is_collapsed_before_the_cold_part(spawn, daemons, tmp_path):
    # Cold half first in address order (so address order alone would do it the wrong way
    # round), a PROT_NONE page between the halves (the Referenced fallback measures per
    # VMA), a thread reading every page of the hot half and every 32nd of the cold one.
    half = 64 * MiB
    child = spawn(
        2 * half, comm="mdd-hotcold", guard=[half],
        hot=[(half + PMD, half - PMD, 1), (0, half, 32)],
    )  # fmt: skip
    cfg = write_config(tmp_path / "m.yaml", "mdd-hotcold")  # paced, at 50%
    cfg.write_text(cfg.read_text().replace("scan_interval: 1s", "scan_interval: 2s"))
    d = daemons(cfg, "--log-level", "debug")
    end = time.monotonic() + 120
    hot = lambda a: child.addr + half <= a < child.end  # noqa: E731
    cold = lambda a: child.addr <= a < child.addr + half  # noqa: E731
    while time.monotonic() < end:
        order = collapsed_in_order(d.text(), child.pid)
        if sum(map(hot, order)) >= 31 and sum(map(cold, order)) >= 32:
            break
        assert d.proc.poll() is None, d.text()
        time.sleep(0.2)
    order = [a for a in collapsed_in_order(d.text(), child.pid) if hot(a) or cold(a)]
    text = d.text()
    assert "access-aware priority from" in text
    assert sum(map(hot, order)) == 31 and sum(map(cold, order)) == 32, text[-4000:]
    last_hot = max(i for i, a in enumerate(order) if hot(a))
    first_cold = min(i for i, a in enumerate(order) if cold(a))
    assert last_hot < first_cold, [hex(a - child.addr) for a in order]
    assert ", pace " in text  # paced: one region per request, a rest after each


def test_damon_is_left_alone_where_others_use_it():
    root = Path("/sys/kernel/mm/damon/admin")
    if not root.exists():  # no DAMON at all (Debian's 6.1 in tests/vm): memdefragd says so
        with pytest.raises(DamonUnavailable, match="no DAMON sysfs interface"):
            Damon(state_file="/nonexistent/memdefragd-test/damon.json").open()
        return
    nr = root / "kdamonds/nr_kdamonds"
    before = nr.read_text()
    states = [p.read_text() for p in sorted(root.glob("kdamonds/*/state"))]
    damon = Damon(state_file="/nonexistent/memdefragd-test/damon.json")
    try:
        damon.open()
    except DamonUnavailable as e:
        assert int(before) > 0 or "vaddr" in str(e), e  # refused, and says why
    else:  # free to use here: ours, and removed on close
        assert nr.read_text().strip() == "1"
        damon.close()
        assert nr.read_text() == before
        return
    assert nr.read_text() == before
    assert [p.read_text() for p in sorted(root.glob("kdamonds/*/state"))] == states
