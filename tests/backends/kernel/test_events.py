"""The kernel backend's process events without a kernel: proc connector messages as
events, and the ProcEvents reader driven by a fake socket (moved from
tests/pipeline/test_discover.py with the reader)."""

from __future__ import annotations

import itertools
import struct
import threading
import time

import pytest

from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.events import (
    KTHREADD_PID,
    PROC_EVENT_COMM,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_NONE,
    PROC_EVENT_UID,
    ProcEvents,
    namespace_problem,
    translate,
)
from tests.pipeline.test_discover import REDIS, FakeBackend, discovery, proc


def fork(parent, child_pid, child_tgid):
    return {"what": PROC_EVENT_FORK, "parent_pid": parent, "parent_tgid": parent,
            "child_pid": child_pid, "child_tgid": child_tgid}  # fmt: skip


def pev(what, pid, tgid, **kw):
    return {"what": what, "process_pid": pid, "process_tgid": tgid, **kw}


@pytest.mark.parametrize(
    ("msg", "event"),
    [
        (fork(100, 200, 200), ("fork", 200)),
        (fork(100, 201, 100), None),  # a new thread
        (fork(KTHREADD_PID, 300, 300), None),  # a kernel thread
        (pev(PROC_EVENT_EXEC, 50, 50), ("exec", 50)),
        (pev(PROC_EVENT_EXIT, 50, 50, exit_code=0), ("exit", 50)),
        (pev(PROC_EVENT_EXIT, 51, 50, exit_code=0), None),  # a thread exits
        (pev(PROC_EVENT_COMM, 50, 50, comm="x"), ("comm", 50)),
        (pev(PROC_EVENT_COMM, 51, 50, comm="x"), None),  # a thread renamed
        (pev(PROC_EVENT_UID, 50, 50, ruid=1, euid=1), ("uid", 50)),
        ({"what": PROC_EVENT_NONE}, None),  # the subscription's ack
        ({"what": 0x40000000, "process_pid": 5, "process_tgid": 5}, None),  # coredump
    ],
)
def test_translate(msg, event):
    assert translate(msg) == event


# ---------------------------------------------------------------- ProcEvents with fakes


class FakeSocket:
    """Serves scripted batches; an exception in the script is raised from get()."""

    def __init__(self, script, log):
        self.script = list(script)
        self.log = log
        self.closed = False
        self.thread = threading.get_ident()
        log.append(("open", self.thread))

    def get(self):
        assert threading.get_ident() == self.thread, "read from another thread"
        if not self.script:
            time.sleep(0.005)
            return []
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.log.append(("close", threading.get_ident() == self.thread))
        self.closed = True


def collect(ev, n, timeout=5.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += ev.wait(0.05)
    return out


def test_proc_events_translate_recover_and_stop():
    log = []
    scripts = [
        [[fork(1, 10, 10), pev(PROC_EVENT_EXEC, 10, 10)], OSError(105, "No buffer space")],
        [[pev(PROC_EVENT_EXIT, 10, 10)]],
    ]
    ev = ProcEvents(backoff=(0.01, 0.05), socket_factory=lambda: FakeSocket(scripts.pop(0), log))
    assert ev.start(timeout=5)  # (available, briefly: this socket fails at once)
    events = collect(ev, 6)
    assert events == [
        ("subscribed", None),  # what started before the subscription: a rescan
        ("forked", (1, 10)),  # the parent's pid, for fork-aware re-collapse
        ("fork", 10),
        ("exec", 10),
        ("lost", "OSError: [Errno 105] No buffer space"),
        ("lost", "resubscribed"),
        ("exit", 10),
    ]
    assert ev.counters == {"events": 3, "lost": 1, "resubscribed": 1}
    assert ev.stop(timeout=2.0) and not ev.running and not ev.available
    opened = [x for x in log if x[0] == "open"]
    closed = [x for x in log if x[0] == "close"]
    assert len(opened) == len(closed) == 2
    assert all(same_thread for _, same_thread in closed)  # closed where created
    assert opened[0][1] != threading.get_ident()  # not in the caller's thread


def test_proc_events_unavailable_at_start(caplog):
    def refuse():
        raise ConnectionRefusedError(111, "Connection refused")

    ev = ProcEvents(socket_factory=refuse)
    with caplog.at_level("WARNING", logger="memdefragd.backends.kernel.events"):
        assert ev.start(timeout=5) is False
    assert not ev.available and "Connection refused" in ev.error
    assert sum("proc events unavailable" in r.getMessage() for r in caplog.records) == 1
    assert ev.wait(0) == []
    assert ev.stop(timeout=1.0)
    # Discovery runs on it by listing.
    b = FakeBackend(proc(4, "redis"))
    d, _ = discovery(b, [REDIS], ev)
    assert dict(d.poll(0).added) == {4: "redis"}


def test_proc_events_resubscribe_retries_with_backoff():
    log, attempts = [], []

    def factory():
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            return FakeSocket([RuntimeError("boom")], log)
        if len(attempts) < 4:
            raise OSError(111, "refused for now")
        return FakeSocket([[pev(PROC_EVENT_EXEC, 3, 3)]], log)

    ev = ProcEvents(backoff=(0.01, 0.04), socket_factory=factory)
    assert ev.start(timeout=5)
    events = collect(ev, 4)
    assert events == [
        ("subscribed", None),
        ("lost", "RuntimeError: boom"),
        ("lost", "resubscribed"),
        ("exec", 3),
    ]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert [g >= d * 0.99 for g, d in zip(gaps, (0.01, 0.02, 0.04), strict=True)] == [True] * 3
    assert ev.stop(timeout=2.0)


def test_proc_events_queue_overflow_is_a_lost_event(monkeypatch):
    import memdefragd.backends.kernel.events as mod

    monkeypatch.setattr(mod, "_MAX_QUEUE", 3)
    batch = [pev(PROC_EVENT_EXEC, p, p) for p in range(10, 20)]
    ev = ProcEvents(socket_factory=lambda: FakeSocket([batch], []))
    assert ev.start(timeout=5)
    deadline = time.monotonic() + 5
    while ev.counters["events"] < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ev.wait(0) == [
        ("subscribed", None),
        ("exec", 10),
        ("exec", 11),
        ("lost", "event queue full"),
    ]
    assert ev.stop(timeout=2.0)


@pytest.mark.parametrize(
    ("nspid", "uid_map", "problem"),
    [
        ("NSpid:\t4242\n", "         0          0 4294967295\n", None),
        ("NSpid:\t4242\t7\n", "         0          0 4294967295\n", "nested PID namespace"),
        ("NSpid:\t4242\n", "         0     100000      65536\n", "user namespace"),
        ("NSpid:\t4242\n", None, None),  # no uid_map: a kernel without user namespaces
    ],
)
def test_namespace_problem(tmp_path, nspid, uid_map, problem):
    (tmp_path / "self").mkdir()
    (tmp_path / "self/status").write_text(f"Name:\tpython\n{nspid}Uid:\t0\t0\t0\t0\n")
    if uid_map is not None:
        (tmp_path / "self/uid_map").write_text(uid_map)
    found = namespace_problem(str(tmp_path))
    assert found is None if problem is None else problem in found
    assert "cannot read" in namespace_problem(str(tmp_path / "missing"))


def test_the_kernel_backend_hands_out_an_unstarted_reader():
    ev = KernelBackend().process_events()
    assert isinstance(ev, ProcEvents) and not ev.running and not ev.available


def test_a_kernel_whose_subscription_answer_pyroute2_cannot_read_lists_instead(monkeypatch):
    """Linux 5.10 answers PROC_CN_MCAST_LISTEN with a message 4 bytes shorter than
    pyroute2 unpacks (seen in tests/vm): events are said unavailable, with the cause."""
    import pyroute2

    import memdefragd.backends.kernel.events as mod

    class OldKernelSocket:
        def setsockopt(self, *a):
            pass

        def bind(self):
            pass

        def control(self, listen):
            raise struct.error("unpack_from requires a buffer of at least 44 bytes")

        def close(self):
            self.closed = True

    monkeypatch.setattr(mod, "namespace_problem", lambda: None)
    monkeypatch.setattr(mod, "_check_permission", lambda: None)
    monkeypatch.setattr(pyroute2, "ProcEventSocket", OldKernelSocket)
    ev = mod.ProcEvents()
    assert ev.start(timeout=5) is False
    assert ev.error == (
        "pyroute2 cannot read this kernel's answer to the subscription "
        "(unpack_from requires a buffer of at least 44 bytes)"
    )
    assert ev.hint == mod.OLD_KERNEL_HINT
    assert not ev.available


def test_a_stop_before_the_subscription_does_not_wait_for_it():
    """The daemon does not wait for the subscription (pyroute2's import alone took 13 s
    in an emulated guest), nor does a stop that comes first: the reader ends by itself
    once subscribed, closing its socket."""
    log: list = []
    gate, entered = threading.Event(), threading.Event()

    def slow():
        entered.set()
        gate.wait(5)  # importing, subscribing...
        return FakeSocket([], log)

    ev = ProcEvents(socket_factory=slow)
    assert ev.start() is False  # not subscribed yet, and not waited for
    assert entered.wait(5)
    t0 = time.monotonic()
    assert ev.stop(timeout=5.0) is False  # still on its way: not waited for either
    assert time.monotonic() - t0 < 2.0
    gate.set()
    deadline = time.monotonic() + 5
    while ev.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ev.running and [k for k, _ in log] == ["open", "close"]
    assert ev.wait(0) in ([], [("subscribed", None)])
