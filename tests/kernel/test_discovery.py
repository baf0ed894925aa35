"""Discovery on the real kernel: proc events through pyroute2, pidfds, /proc listings.

Every process these tests look for is one they started, under a name nobody else uses;
other processes on the machine only pass by as events.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from memdefragd.backends.kernel.events import PROC_EVENT_COMM, ProcEvents, _poke, open_socket
from memdefragd.pipeline.discover import EXITED, REUSED, Changes, Discovery, Tracked
from memdefragd.pipeline.targets import Matcher, Target

from .helpers import require_kernel

pytestmark = pytest.mark.kernel

# New processes are seen within a second of their exec because they come by proc events,
# not by the periodic /proc listing: the tests assert the way (no rescan), not the time
# (wall clock depends on the machine: a 5.10 guest under emulation took 2.04 s once), and
# print the latency.

# Sets its comm (PR_SET_NAME), optionally forks a child that stays (and dies with it),
# prints the child's pid (or 0), then blocks until stdin is closed.
COMM_CHILD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(15, ctypes.c_char_p(sys.argv[1].encode()), 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_NAME")
child = 0
if sys.argv[2] == "fork":
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGKILL when the parent dies
        if os.getppid() != parent:
            os._exit(0)
        while os.read(0, 4096):
            pass
        os._exit(0)
print(child, flush=True)
while os.read(0, 4096):
    pass
"""


def unique_name() -> str:
    return "mdd" + uuid.uuid4().hex[:12]  # 15 characters: all of it fits in comm


class Children:
    """Processes started by a test; killed and reaped at teardown whatever happened."""

    def __init__(self):
        self.popens: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, **kw)
        self.popens.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.stdin and not p.stdin.closed:
            with contextlib.suppress(OSError):
                p.stdin.close()
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
        if p.stdout:
            p.stdout.close()

    def stop_all(self) -> None:
        for p in self.popens:
            self.stop(p)


@pytest.fixture
def children():
    c = Children()
    yield c
    c.stop_all()


@pytest.fixture
def events():
    ev = ProcEvents()
    ok = ev.start(timeout=5)
    try:
        require_kernel(ok, f"proc events unavailable: {ev.error}")
        # Subscribed before any Discovery exists: its first rescan covers what came before.
        assert ev.wait(0)[:1] == [("subscribed", None)]
        yield ev
    finally:
        ev.stop()


def named_sleep(tmp_path: Path, name: str) -> str:
    """A path that execs `sleep` under `name`: the kernel takes comm from the file name."""
    link = tmp_path / name
    link.symlink_to(shutil.which("sleep"))
    return str(link)


def comm_target(name: str) -> Target:
    return Target("t-" + name, Matcher(comm=re.compile(f"^{re.escape(name)}$")))


def poll_until(
    d: Discovery, done: Callable[[Changes], bool], t0: float, limit: float = 10.0
) -> tuple[float, Changes]:
    """poll() until `done(changes)`; (seconds since t0, those changes)."""
    while time.monotonic() - t0 < limit:
        ch = d.poll(0.25)
        if done(ch):
            return time.monotonic() - t0, ch
    pytest.fail(f"not seen within {limit} s; tracked: {sorted(d.tracked)}")


def is_pidfd_of(fd: int, pid: int) -> bool:
    if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]":
        return False
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return any(line.split() == ["Pid:", str(pid)] for line in f)


def test_exec_is_picked_up_within_a_second_and_dropped_on_exit(events, backend, tmp_path, children):
    name, other = unique_name(), unique_name()
    target = comm_target(name)
    with Discovery(backend, [target], events) as d:
        d.rescan()
        bystander = children.start([named_sleep(tmp_path, other), "60"])
        t0 = time.monotonic()
        child = children.start([named_sleep(tmp_path, name), "60"])
        latency, ch = poll_until(d, lambda ch: child.pid in ch.added, t0)
        assert ch.added[child.pid] == target.name

        tracked = d.tracked[child.pid]
        assert isinstance(tracked, Tracked)
        assert tracked.target is target and tracked.proc.comm == name
        assert is_pidfd_of(tracked.handle.fd, child.pid)
        assert bystander.pid not in d.tracked  # its exec came first: judged, not taken
        assert d.counters["rescans"] == 1  # found by its events, not by a listing

        handle = tracked.handle
        children.stop(child)
        t1 = time.monotonic()
        _, ch = poll_until(d, lambda ch: child.pid in ch.dropped, t1)
        assert ch.dropped[child.pid] == EXITED
        assert child.pid not in d.tracked
        assert handle.fd == -1  # closed on drop
    print(f"pickup latency {latency * 1e3:.1f} ms")


def test_comm_change_and_fork_are_picked_up(events, backend, children):
    name = unique_name()
    target = comm_target(name)
    with Discovery(backend, [target], events) as d:
        d.rescan()
        t0 = time.monotonic()
        # The interpreter execs as "python3...", then renames itself: the COMM event.
        p = children.start(
            [sys.executable, "-c", COMM_CHILD, name, "fork"], stdout=subprocess.PIPE, text=True
        )
        grandchild = int(p.stdout.readline())
        seen: set[int] = set()
        latency, _ = poll_until(
            d, lambda ch: seen.update(ch.added) or {p.pid, grandchild} <= seen, t0
        )
        assert d.tracked[p.pid].proc.comm == name
        assert d.tracked[grandchild].proc.comm == name  # inherited by the fork
        assert d.counters["rescans"] == 1 and d.counters["events"]  # by events, not a listing
        print(f"pickup latency {latency * 1e3:.1f} ms (the interpreter's start included)")
        handles = [d.tracked[p.pid].handle, d.tracked[grandchild].handle]
    assert all(h.fd == -1 for h in handles) and not d.tracked  # close() closed them


def test_stale_start_time_is_dropped_as_reused_on_rescan(backend, tmp_path, children):
    name = unique_name()
    target = comm_target(name)
    child = children.start([named_sleep(tmp_path, name), "60"])
    with Discovery(backend, [target], None) as d:
        deadline = time.monotonic() + 10
        while child.pid not in d.tracked and time.monotonic() < deadline:
            d.rescan()  # until the child has exec'd
        real = d.tracked[child.pid]
        # Pretend we tracked an earlier process that had this pid.
        old = real.proc
        d.tracked[child.pid] = replace(real, proc=replace(old, start_time=old.start_time - 1))
        ch = d.rescan()
        assert ch.dropped[child.pid] == REUSED
        assert ch.added[child.pid] == target.name  # and the process there now is taken
        assert real.handle.fd == -1
        fresh = d.tracked[child.pid]
        assert fresh.handle is not real.handle and is_pidfd_of(fresh.handle.fd, child.pid)
        assert fresh.proc.start_time == old.start_time


def test_non_matching_and_exited_processes_are_not_tracked(backend, tmp_path, children):
    name = unique_name()
    target = comm_target(name)
    child = children.start([named_sleep(tmp_path, unique_name()), "60"])
    with Discovery(backend, [target], None) as d:
        assert child.pid not in d.tracked
        d.rescan()
        assert child.pid not in d.tracked
        gone = children.start([named_sleep(tmp_path, name), "0"])
        gone.wait()
        # Events about a process that is already gone: a counted race, no exception.
        assert not d.handle([("exec", gone.pid), ("comm", gone.pid)])
        assert d.counters["vanished"] == 1


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_stop_returns_promptly_and_releases_the_socket():
    before = fd_count()
    ev = ProcEvents()
    require_kernel(ev.start(timeout=5), f"proc events unavailable: {ev.error}")
    assert ev.available and ev.running
    time.sleep(0.2)  # the reader is blocked in get() by now
    t0 = time.monotonic()
    assert ev.stop(timeout=5.0)
    elapsed = time.monotonic() - t0
    assert not ev.running and not ev.available
    assert elapsed < 1.0, f"stop() took {elapsed:.3f} s"
    assert fd_count() == before  # the socket and its event loop were closed


def test_the_wakeup_is_a_comm_event_of_our_own():
    """stop() relies on this: renaming a thread to its own name makes the kernel send a
    COMM event to every subscriber, so a reader blocked in get() always wakes up."""
    try:
        ps = open_socket()
    except Exception as e:
        require_kernel(False, f"proc events unavailable: {e!r}")
    try:
        with open("/proc/thread-self/comm") as f:
            before = f.read()
        _poke()
        with open("/proc/thread-self/comm") as f:
            assert f.read() == before  # the name is unchanged
        tid = threading.get_native_id()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msgs = ps.get()
            if any(m["what"] == PROC_EVENT_COMM and m["process_pid"] == tid for m in msgs):
                break
        else:
            pytest.fail("no COMM event for our own thread")
    finally:
        ps.close()


class GatedSocket:
    """A real proc event socket whose first get() waits for the test to open the gate,
    so that the kernel's receive buffer fills up meanwhile."""

    def __init__(self, gate, rcvbuf):
        self.ps = open_socket(rcvbuf)
        self.gate = gate

    def get(self):
        self.gate.wait(30)
        return self.ps.get()

    def close(self):
        self.ps.close()


def test_overflow_is_lost_events_then_a_rescan_finds_the_target(backend, tmp_path, children):
    gate = threading.Event()
    made: list[GatedSocket] = []

    def factory():  # a tiny buffer first; the default after the failure
        s = GatedSocket(gate, rcvbuf=None if made else 4096)
        made.append(s)
        return s

    ev = ProcEvents(backoff=(0.05, 0.5), socket_factory=factory)
    require_kernel(ev.start(timeout=5), f"proc events unavailable: {ev.error}")
    assert ev.wait(0) == [("subscribed", None)]  # before the Discovery: its rescan covers it
    try:
        name = unique_name()
        target = comm_target(name)
        with Discovery(backend, [target], ev) as d:
            d.rescan()
            for _ in range(50):  # far more events than a 4 KiB buffer holds
                subprocess.run(["true"], check=True)
            child = children.start([named_sleep(tmp_path, name), "60"])
            t0 = time.monotonic()
            gate.set()
            poll_until(d, lambda ch: child.pid in ch.added, t0)
            assert ev.counters["lost"] >= 1
            assert d.counters["lost"] >= 1 and d.counters["rescans"] >= 2
            # A new socket, and events flow again on it.
            deadline = time.monotonic() + 10
            while not (ev.available and ev.counters["resubscribed"]):
                assert time.monotonic() < deadline, "never subscribed again"
                d.poll(0.05)
            d.poll(0.2)  # the ("lost", "resubscribed") that follows: one more rescan
            assert len(made) >= 2
            other = unique_name()
            d.set_targets([target, comm_target(other)])
            rescans = d.counters["rescans"]
            t1 = time.monotonic()
            later = children.start([named_sleep(tmp_path, other), "60"])
            latency, _ = poll_until(d, lambda ch: later.pid in ch.added, t1)
            assert d.counters["rescans"] == rescans, latency  # by its events
    finally:
        assert ev.stop(timeout=5.0)


def test_without_the_host_network_namespace_discovery_lists(tmp_path):
    """Under `unshare --net` the kernel refuses the subscription: start() says so once,
    and Discovery still finds processes by listing."""
    unshare = shutil.which("unshare")
    require_kernel(unshare, "unshare(1) is not installed")
    script = r"""
import json, os
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.events import ProcEvents
from memdefragd.pipeline.discover import Discovery
from memdefragd.pipeline.targets import Matcher, Target
ev = ProcEvents()
ok = ev.start(timeout=5)
me = Target("me", Matcher(pids=frozenset({os.getpid()})))
with Discovery(KernelBackend(), [me], ev) as d:
    ch = d.poll(0.2)
    out = {"ok": ok, "error": ev.error, "added": list(ch.added), "pid": os.getpid(),
           "stopped": ev.stop(2.0)}
print(json.dumps(out))
"""
    r = subprocess.run(
        [unshare, "--net", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    require_kernel(r.returncode == 0 or "unshare failed" not in r.stderr, r.stderr.strip())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False and "ConnectionRefused" in out["error"]
    assert out["added"] == [out["pid"]] and out["stopped"]
    assert r.stderr.count("proc events unavailable") == 1
