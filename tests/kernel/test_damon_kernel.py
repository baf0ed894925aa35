"""Access-aware ranking through DAMON on the real kernel: memdefragd's own kdamond over
`vaddr`, per 2 MiB region, where the kernel lets it have one (Debian's 6.12 in tests/vm);
elsewhere (6.1: no DAMON; this machine's 6.18: a boot-time kdamond and no vaddr) the
daemon says why and takes the clear_refs + Referenced fallback, per VMA."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from memdefragd.backends.kernel.damon import Damon, DamonUnavailable

from .helpers import PMD, MiB, write_config
from .test_persistence_kernel import collapsed_in_order

pytestmark = pytest.mark.kernel

ADMIN = Path("/sys/kernel/mm/damon/admin")


def damon_refusal() -> str | None:
    """Why memdefragd cannot have a kdamond of its own here (None: it can), asked the way
    the daemon asks, and left as found."""
    d = Damon(state_file="/nonexistent/memdefragd-test/damon.json")
    try:
        d.open()
    except DamonUnavailable as e:
        return str(e)
    d.close()
    return None


def nr_kdamonds() -> int:
    f = ADMIN / "kdamonds/nr_kdamonds"
    return int(f.read_text()) if f.exists() else 0


def test_one_vma_hot_half_first_through_our_own_kdamond(spawn, daemons, tmp_path, record_property):
    # One VMA (so clear_refs + Referenced, which measures per VMA, cannot tell the halves
    # apart), its cold half first in address order, a thread reading every page of the hot
    # half and every 32nd page of the cold one.
    half = 64 * MiB
    refusal = damon_refusal()
    child = spawn(2 * half, comm="mdd-damon", hot=[(half, half, 1), (0, half, 32)])
    cfg = write_config(tmp_path / "m.yaml", "mdd-damon", extra="  access: {source: auto}")
    # A 10 s interval: the first access window is then FIRST_WINDOW (5 s), time enough for
    # DAMON's sampling to find the hot half under emulation (tests/vm); 3 s was not, always.
    cfg.write_text(cfg.read_text().replace("scan_interval: 1s", "scan_interval: 10s"))
    d = daemons(cfg, "--log-level", "debug")
    if refusal is not None:
        # No kdamond for us here: the daemon says why and measures through clear_refs.
        text = d.wait_for("access-aware priority from", timeout=60)
        assert f"DAMON unusable: {refusal}" in text
        assert "access-aware priority from clear_refs + smaps Referenced, per VMA" in text
        return
    text = d.wait_for("access-aware priority from", timeout=60)
    assert "access-aware priority from DAMON (our own kdamond)" in text
    assert "clear_refs" not in text
    assert nr_kdamonds() == 1
    assert (ADMIN / "kdamonds/0/contexts/0/operations").read_text().strip() == "vaddr"
    hot = lambda a: child.addr + half <= a < child.end  # noqa: E731
    cold = lambda a: child.addr <= a < child.addr + half  # noqa: E731
    end = time.monotonic() + 300
    while time.monotonic() < end:
        order = collapsed_in_order(d.text(), child.pid)
        if sum(map(hot, order)) >= half // PMD and sum(map(cold, order)) >= half // PMD:
            break
        assert d.proc.poll() is None, d.text()
        time.sleep(0.5)
    kdamond = (ADMIN / "kdamonds/0/pid").read_text().strip()  # running by now
    assert int(kdamond) > 0, kdamond
    order = [a for a in collapsed_in_order(d.text(), child.pid) if hot(a) or cold(a)]
    text = d.text()
    n = half // PMD
    assert sum(map(hot, order)) == n and sum(map(cold, order)) == n, text[-4000:]
    last_hot = max(i for i, a in enumerate(order) if hot(a))
    first_cold = min(i for i, a in enumerate(order) if cold(a))
    assert last_hot < first_cold, ([hex(a - child.addr) for a in order], text[-6000:])
    # the evidence, in tests/vm's report: the order of requests, by half, from the log
    record_property("request order", "".join("H" if hot(a) else "c" for a in order))
    record_property("kdamond", f"pid {kdamond}, {nr_kdamonds()} kdamond(s) while running")
    assert d.stop() == 0
    # the kdamond it made is gone with it
    assert nr_kdamonds() == 0
    assert not Path(f"/proc/{kdamond}").exists()
    record_property("after stop", f"nr_kdamonds {nr_kdamonds()}, /proc/{kdamond} gone")
