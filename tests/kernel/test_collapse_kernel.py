"""The `collapse` method against the real kernel: process_madvise(pidfd, MADV_COLLAPSE).

Every test collapses memory of a child it started itself (tools/child.py) and checks
the result with oracles that share no code with memdefragd: the child's smaps
AnonHugePages, pagemap plus kpageflags, and the child's own check of the kernel selftest's
data pattern. Tests skip only where the kernel refuses (no free huge page, transient
EAGAIN); MEMDEFRAGD_REQUIRE_KERNEL=1 turns those skips into failures. The errno table at
the end scripts the syscall's answers, for the errnos a test cannot provoke on demand.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import memdefragd.backends.kernel.collapse as collapse_mod
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.collapse import CANCELLED, UNMAPPED, collapse
from memdefragd.backends.kernel.procs import PidHandle
from memdefragd.model import Outcome, ProcessGone, Request
from tests.paths import REPO

from .helpers import PAGE, PMD, MiB, brute_regions, read_pagemap, require_kernel

pytestmark = pytest.mark.kernel

MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
CAP_SYS_NICE = 23


# ---- independent oracles ----------------------------------------------------------------


def anon_huge(pid: int, start: int) -> int:
    """AnonHugePages in bytes of the VMA starting at `start`, by a plain read of smaps."""
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.read().splitlines()
    head = f"{start:x}-"
    for i, line in enumerate(lines):
        if line.startswith(head):
            for field in lines[i + 1 :]:
                if field.startswith("AnonHugePages:"):
                    return int(field.split()[1]) * 1024
                if "-" in field.split()[0]:
                    break  # next VMA's header: this one had no such line
            raise AssertionError(f"no AnonHugePages for the VMA at {start:#x}")
    raise AssertionError(f"no VMA starts at {start:#x} in pid {pid}")


def mapped(pid: int, start: int, end: int) -> bool:
    """Whether any byte of [start, end) is mapped, by a plain read of maps."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo < end and start < hi:
                return True
    return False


# ---- helpers ----------------------------------------------------------------------------


def handle_for(child) -> PidHandle:
    return PidHandle(KernelBackend().process(child.pid))


def request(handle: PidHandle, child, ranges, **kw) -> Request:
    fields = {
        "target": "test",
        "pid": handle.pid,
        "start_time": handle.proc.start_time,
        "vma_start": child.addr,
        "vma_end": child.end,
        "ranges": tuple(ranges),
    }
    fields.update(kw)
    return Request(**fields)


def require_collapsed(outcome: Outcome) -> None:
    """Skip (or fail under CI's variable) where the kernel had no huge page to give or
    stayed busy; any other shortfall is left to the test's own asserts."""
    refused = {"ENOMEM", "EAGAIN", "EBUSY"} & set(outcome.failures)
    require_kernel(not refused, f"MADV_COLLAPSE refused: {dict(outcome.failures)}")


@pytest.fixture
def spy(monkeypatch):
    """Records every process_madvise call (start, length) and passes it to the kernel."""
    calls: list[tuple[int, int]] = []
    real = collapse_mod._process_madvise

    def recording(nr, pidfd, start, length):
        calls.append((start, length))
        return real(nr, pidfd, start, length)

    monkeypatch.setattr(collapse_mod, "_process_madvise", recording)
    return calls


# ---- collapsing ---------------------------------------------------------------------------


@pytest.mark.needs_collapse
def test_whole_vma_collapses_and_data_survives(spawn, spy):
    child = spawn(64 * MiB, pattern=True)
    assert anon_huge(child.pid, child.addr) == 0  # 4 KiB pages to begin with
    with handle_for(child) as h:
        out = collapse(h, request(h, child, [(child.addr, child.end)]))
    require_collapsed(out)

    assert out.bytes_done == 64 * MiB
    assert out.bytes_attempted == 64 * MiB
    assert dict(out.failures) == {}
    assert out.stopped == ""
    assert out.ineligible == ()
    assert out.duration > 0
    # one region per call, in order (an EAGAIN retry repeats a call)
    assert list(dict.fromkeys(spy)) == [(a, PMD) for a in range(child.addr, child.end, PMD)]
    assert anon_huge(child.pid, child.addr) == 64 * MiB  # the kernel's own count
    assert child.verify() == {"checked": 64 * MiB // PAGE, "bad": []}


def test_child_verify_catches_corruption(spawn):
    """The data oracle itself can fail: a page changed behind the child's back is found."""
    child = spawn(4 * MiB, pattern=True)
    assert child.verify() == {"checked": 4 * MiB // PAGE, "bad": []}
    with open(f"/proc/{child.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(child.addr + 5 * PAGE + 100)
        mem.write(b"\0")
    assert child.verify()["bad"] == [5 * PAGE]


@pytest.mark.needs_collapse
def test_half_request_collapses_exactly_that_half(spawn, pfns):
    child = spawn(64 * MiB)
    half = child.addr + 32 * MiB
    with handle_for(child) as h:
        out = collapse(h, request(h, child, [(half, child.end)]))
    require_collapsed(out)

    assert (out.bytes_attempted, out.bytes_done) == (32 * MiB, 32 * MiB)
    assert dict(out.failures) == {}
    assert anon_huge(child.pid, child.addr) == 32 * MiB
    # which half: the head frame of each region is a THP head exactly in the second half
    regions = brute_regions(read_pagemap(child.pid, child.addr, child.end), child.addr, child.end)
    assert [r["thp"] for r in regions] == [False] * 16 + [True] * 16


@pytest.mark.needs_collapse
def test_several_ranges(spawn):
    child = spawn(16 * MiB)
    a = child.addr
    ranges = [(a + 12 * MiB, a + 16 * MiB), (a, a + 2 * MiB)]
    with handle_for(child) as h:
        out = collapse(h, request(h, child, ranges))
    require_collapsed(out)
    assert (out.bytes_attempted, out.bytes_done) == (6 * MiB, 6 * MiB)
    assert anon_huge(child.pid, child.addr) == 6 * MiB


# ---- requests refused before any call -----------------------------------------------------

BAD = {
    "unaligned start": lambda a, e: [(a + PAGE, a + PMD + PAGE)],
    "unaligned end": lambda a, e: [(a, a + PMD + PAGE)],
    "no whole 2 MiB block": lambda a, e: [(a + PAGE, a + 2 * PAGE)],
    "empty": lambda a, e: [(a, a)],
    "reversed": lambda a, e: [(a + PMD, a)],
    "before the VMA": lambda a, e: [(a - PMD, a + PMD)],
    "past the VMA": lambda a, e: [(e - PMD, e + PMD)],
    "overlapping": lambda a, e: [(a, a + 2 * PMD), (a + PMD, a + 3 * PMD)],
    "good then bad": lambda a, e: [(a, a + PMD), (a + PMD + PAGE, a + 3 * PMD)],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_range_raises_before_any_call(spawn, monkeypatch, case):
    child = spawn(8 * MiB)
    calls = []
    monkeypatch.setattr(collapse_mod, "_process_madvise", lambda *a: calls.append(a) or (PMD, 0))
    with handle_for(child) as h:
        req = request(h, child, BAD[case](child.addr, child.end))
        with pytest.raises(ValueError):
            collapse(h, req)
    assert calls == []
    assert anon_huge(child.pid, child.addr) == 0


@pytest.mark.parametrize("change", ["method", "pid", "start_time"])
def test_request_for_another_process_or_method_raises(spawn, monkeypatch, change):
    child = spawn(4 * MiB)
    calls = []
    monkeypatch.setattr(collapse_mod, "_process_madvise", lambda *a: calls.append(a) or (PMD, 0))
    with handle_for(child) as h:
        req = request(h, child, [(child.addr, child.end)])
        other = {
            "method": {"method": "ranger"},
            "pid": {"pid": h.pid + 1},
            "start_time": {"start_time": h.proc.start_time + 1},
        }[change]
        with pytest.raises(ValueError):
            collapse(h, dataclasses.replace(req, **other))
    assert calls == []


def test_unknown_machine_is_refused_by_name(spawn, monkeypatch):
    child = spawn(4 * MiB)
    calls = []
    monkeypatch.setattr(collapse_mod, "_process_madvise", lambda *a: calls.append(a) or (PMD, 0))
    monkeypatch.setattr(collapse_mod, "PROCESS_MADVISE_NR", {})
    with handle_for(child) as h, pytest.raises(NotImplementedError, match=os.uname().machine):
        collapse(h, request(h, child, [(child.addr, child.end)]))
    assert calls == []
    with pytest.raises(NotImplementedError, match="riscv64"):
        collapse_mod.process_madvise_nr("riscv64")


# ---- what the kernel refuses --------------------------------------------------------------


def test_nohugepage_regions_are_ineligible(spawn):
    child = spawn(8 * MiB, advise=[MADV_NOHUGEPAGE])
    with handle_for(child) as h:
        out = collapse(h, request(h, child, [(child.addr, child.end)]))
    assert dict(out.failures) == {"EINVAL": 4}
    assert out.ineligible == tuple(range(child.addr, child.end, PMD))
    assert (out.bytes_attempted, out.bytes_done) == (8 * MiB, 0)
    assert out.stopped == ""
    assert anon_huge(child.pid, child.addr) == 0


@pytest.mark.needs_collapse
def test_already_huge_regions_count_as_done(spawn):
    """MADV_HUGEPAGE makes the child's faults map 2 MiB pages at once; MADV_COLLAPSE
    reports regions that are already PMD-mapped as success (the kernel's rule), with no
    EINVAL: verification, not this count, tells real work from none."""
    child = spawn(8 * MiB, advise=[MADV_HUGEPAGE])
    require_kernel(
        anon_huge(child.pid, child.addr) == 8 * MiB, "faults did not map huge pages (none free?)"
    )
    with handle_for(child) as h:
        out = collapse(h, request(h, child, [(child.addr, child.end)]))
    assert dict(out.failures) == {}
    assert (out.bytes_attempted, out.bytes_done) == (8 * MiB, 8 * MiB)
    assert anon_huge(child.pid, child.addr) == 8 * MiB


@pytest.mark.needs_collapse
def test_unmapped_region_is_not_out_of_memory(spawn):
    """ENOMEM from a region the target no longer maps is counted as UNMAPPED, does not
    stop the request, and is not taken for "no free huge page"."""
    child = spawn(4 * MiB)
    hole = (child.end, child.end + PMD)  # the child unmapped at least 2 MiB after its VMA
    assert not mapped(child.pid, *hole)
    with handle_for(child) as h:
        # the plan still believes the VMA reaches past the hole's end; the hole goes first,
        # so its answer cannot depend on whether huge pages are free
        req = request(h, child, [hole, (child.addr, child.end)], vma_end=child.end + PMD)
        out = collapse(h, req)
    assert out.failures.get(UNMAPPED) == 1
    require_collapsed(out)
    assert dict(out.failures) == {UNMAPPED: 1}
    assert out.stopped == ""
    assert (out.bytes_attempted, out.bytes_done) == (6 * MiB, 4 * MiB)
    assert out.ineligible == ()


# ---- processes that go away ---------------------------------------------------------------


@pytest.mark.needs_collapse
@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_process_killed_after_handle(spawn, reap):
    child = spawn(8 * MiB)
    with handle_for(child) as h:
        req = request(h, child, [(child.addr, child.end)])
        child.kill(reap=reap)
        out = collapse(h, req)  # no exception
    assert out.stopped == "ESRCH"
    assert dict(out.failures) == {"ESRCH": 1}
    assert (out.bytes_attempted, out.bytes_done) == (PMD, 0)  # one call, then stop


def test_handle_on_dead_pid_is_gone(spawn):
    child = spawn(4 * MiB)
    with handle_for(child) as h:
        proc = h.proc
    child.kill()
    with pytest.raises(ProcessGone):
        PidHandle(proc)


def test_handle_with_wrong_start_time_is_gone(spawn):
    child = spawn(4 * MiB)
    with handle_for(child) as h:
        proc = h.proc
    with pytest.raises(ProcessGone):
        PidHandle(dataclasses.replace(proc, start_time=proc.start_time + 1))
    PidHandle(proc).close()  # the right identity still works


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_without_pidfd_open_the_proc_directory_pins_the_process(spawn, monkeypatch, reap):
    """A kernel before 5.3 (the Translation Ranger kernel is 5.0) has no pidfd_open: the
    handle holds /proc/PID open instead and proves identity through it."""
    from memdefragd.backends.kernel import procs

    def enosys(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(procs.os, "pidfd_open", enosys)
    monkeypatch.setattr(procs, "_HAS_PIDFD", None)
    child = spawn(4 * MiB)
    proc = KernelBackend().process(child.pid)
    with PidHandle(proc) as h:
        assert not h.is_pidfd and procs.pidfd_refusal() == procs.NO_PIDFD_REASON
        assert os.readlink(f"/proc/self/fd/{h.fd}") == f"/proc/{child.pid}"
        h.check_alive()
        assert not h.exited  # (a directory fd always polls readable: not asked that way)
        with pytest.raises(NotImplementedError, match="no pidfd_open"):
            h.pidfd  # noqa: B018
        child.kill(reap=reap)
        with pytest.raises(ProcessGone):
            h.check_alive()
        assert h.exited
    with pytest.raises(ProcessGone):
        PidHandle(proc)
    other = spawn(4 * MiB)
    with pytest.raises(ProcessGone):
        PidHandle(dataclasses.replace(KernelBackend().process(other.pid), start_time=1))


# ---- permissions --------------------------------------------------------------------------

NO_NICE_SCRIPT = r"""
import json, sys
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.collapse import collapse
from memdefragd.backends.kernel.procs import PidHandle
from memdefragd.model import Request

pid, start, end = (int(a) for a in sys.argv[1:4])
cap_eff = next(int(l.split()[1], 16) for l in open("/proc/self/status") if l.startswith("CapEff:"))
proc = KernelBackend().process(pid)
with PidHandle(proc) as h:
    req = Request("test", pid, proc.start_time, start, end, ((start, end),))
    out = collapse(h, req)
print(json.dumps({
    "cap_sys_nice": bool(cap_eff >> 23 & 1),
    "bytes_attempted": out.bytes_attempted,
    "bytes_done": out.bytes_done,
    "failures": dict(out.failures),
    "stopped": out.stopped,
}))
"""


@pytest.mark.needs_collapse
def test_without_cap_sys_nice_stops_at_eperm(spawn):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    child = spawn(8 * MiB)
    argv = [
        "setpriv",
        "--inh-caps=-sys_nice",
        "--bounding-set=-sys_nice",
        "--",
        sys.executable,
        "-c",
        NO_NICE_SCRIPT,
        str(child.pid),
        str(child.addr),
        str(child.end),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)

    assert got["cap_sys_nice"] is False  # the drop worked
    assert got["stopped"] == "EPERM"
    assert got["bytes_done"] == 0
    assert got["bytes_attempted"] == PMD  # the first refusal ends it: no further calls
    assert got["failures"] == {"EPERM": 1}
    assert anon_huge(child.pid, child.addr) == 0


# ---- stopping between regions -------------------------------------------------------------


@pytest.mark.needs_collapse
def test_should_stop_after_first_region(spawn, spy):
    child = spawn(8 * MiB)
    asked = []

    def should_stop() -> bool:
        asked.append(len({start for start, _ in spy}))
        return True

    with handle_for(child) as h:
        out = collapse(h, request(h, child, [(child.addr, child.end)]), should_stop=should_stop)
    assert asked == [1]  # asked once, after the first region and not before it
    assert [start for start, _ in spy] in ([child.addr], [child.addr] * 2)  # EAGAIN retry
    assert out.bytes_attempted == PMD
    assert out.stopped == CANCELLED
    require_collapsed(out)
    assert out.bytes_done == PMD
    assert anon_huge(child.pid, child.addr) == PMD


# ---- the errno table, with the kernel's answers scripted ----------------------------------

E = errno
# (answers per call, expected (done regions, failures, stopped, ineligible indexes, calls))
TABLE = {
    "all done": ([0, 0, 0, 0], (4, {}, "", [], 4)),
    "EAGAIN then done": ([E.EAGAIN, 0, 0, 0, 0], (4, {}, "", [], 5)),
    "EAGAIN twice": ([E.EAGAIN, E.EAGAIN, 0, 0, 0], (3, {"EAGAIN": 1}, "", [], 5)),
    "EAGAIN then EINVAL": ([0, E.EAGAIN, E.EINVAL, 0, 0], (3, {"EINVAL": 1}, "", [1], 5)),
    "EAGAIN then ENOMEM": ([E.EAGAIN, E.ENOMEM], (0, {"ENOMEM": 1}, "ENOMEM", [], 2)),
    "EINVAL": ([0, E.EINVAL, 0, E.EINVAL], (2, {"EINVAL": 2}, "", [1, 3], 4)),
    "ENOMEM": ([0, E.ENOMEM], (1, {"ENOMEM": 1}, "ENOMEM", [], 2)),
    "EBUSY": ([0, 0, E.EBUSY], (2, {"EBUSY": 1}, "EBUSY", [], 3)),
    "ESRCH": ([E.ESRCH], (0, {"ESRCH": 1}, "ESRCH", [], 1)),
    "EBADF": ([0, E.EBADF], (1, {"EBADF": 1}, "ESRCH", [], 2)),
    "EPERM": ([E.EPERM], (0, {"EPERM": 1}, "EPERM", [], 1)),
    "EACCES": ([E.EACCES], (0, {"EACCES": 1}, "EPERM", [], 1)),
    "other errno": ([E.EFAULT, 0, E.EINTR, 0], (2, {"EFAULT": 1, "EINTR": 1}, "", [], 4)),
    "short return": (["short", 0, 0, 0], (3, {"SHORT": 1}, "", [], 4)),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_errno_table(spawn, monkeypatch, case):
    """What each errno does to the request, the kernel's answers scripted (a real pidfd on
    a real child, but no real call): these errnos cannot be provoked on demand here."""
    answers, (done, failures, stopped, ineligible, ncalls) = TABLE[case]
    script = list(answers)
    calls = []

    def fake(nr, pidfd, start, length):
        calls.append(start)
        a = script.pop(0)
        if a == "short":
            return PAGE, 0
        return (length, 0) if a == 0 else (-1, a)

    ticks = iter(range(1000))
    monkeypatch.setattr(collapse_mod, "_process_madvise", fake)
    child = spawn(8 * MiB)
    with handle_for(child) as h:
        out = collapse(
            h, request(h, child, [(child.addr, child.end)]), clock=lambda: float(next(ticks))
        )
    regions = list(range(child.addr, child.end, PMD))
    short = PAGE if case == "short return" else 0
    assert out.bytes_done == done * PMD + short
    assert out.bytes_attempted == len(dict.fromkeys(calls)) * PMD  # retries count once
    assert dict(out.failures) == failures
    assert out.stopped == stopped
    assert out.ineligible == tuple(regions[i] for i in ineligible)
    assert len(calls) == ncalls
    assert script == []
    assert out.duration == ncalls  # one tick per call: only time inside calls counts


def test_the_probe_agrees_with_the_kernel_version(backend):
    """The probe behind the pre-6.1 refusal (madvise(0, 0, MADV_COLLAPSE)) finds
    MADV_COLLAPSE exactly on kernels from 6.1 on: this one, Debian's 6.1 and 6.12, and
    refuses on Debian 11's 5.10 (tests/vm), naming what is missing."""
    major, minor = (int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    reason = backend.refusal("collapse")
    if (major, minor) >= (6, 1):
        assert reason is None
    else:
        assert reason is not None and "does not know MADV_COLLAPSE" in reason, reason
