"""Discovery without a kernel: the pure planning functions and the Discovery shell
driven by fakes (a backend, pidfds, events). The kernel's event reader is tested in
tests/backends/kernel/test_events.py."""

from __future__ import annotations

import re
import threading
from dataclasses import replace

import pytest

from memdefragd.model import AccessDenied, ProcessGone, ProcessInfo
from memdefragd.pipeline.discover import (
    EXITED,
    NO_MATCH,
    REUSED,
    Changes,
    Discovery,
    Plan,
    Tracked,
    plan,
    reduce_events,
)
from memdefragd.pipeline.targets import Matcher, Target

REDIS = Target("redis", Matcher(comm=re.compile("^redis")))
PG = Target("postgres", Matcher(comm=re.compile("^postgres$")))
BIG = Target("big", Matcher(), min_rss=1 << 30)


def proc(pid: int, comm: str, start_time: int = 100, rss: int = 1 << 20, uid: int = 0):
    return ProcessInfo(
        pid=pid, comm=comm, cmdline=(comm,), exe=f"/usr/bin/{comm}", uid=uid, cgroup="/",
        start_time=start_time, rss=rss,
    )  # fmt: skip


# ---------------------------------------------------------------- plan


def test_plan_adds_matches_only():
    p = plan({}, [proc(1, "redis-server"), proc(2, "bash"), proc(3, "postgres")], [REDIS, PG])
    assert p == Plan(add=((proc(1, "redis-server"), REDIS), (proc(3, "postgres"), PG)))


def test_plan_first_target_in_order_claims():
    both = Target("any", Matcher())
    assert plan({}, [proc(1, "redis")], [REDIS, both]).add == ((proc(1, "redis"), REDIS),)
    assert plan({}, [proc(1, "redis")], [both, REDIS]).add == ((proc(1, "redis"), both),)


def test_plan_full_listing_drops_with_reasons():
    current = {
        1: proc(1, "redis"),  # still there: kept
        2: proc(2, "redis"),  # gone from the listing: exited
        3: proc(3, "redis", start_time=5),  # same pid, other start time: reused
        4: proc(4, "redis"),  # renamed: no longer matches
    }
    seen = [proc(1, "redis"), proc(3, "redis", start_time=9), proc(4, "bash")]
    p = plan(current, seen, [REDIS])
    assert p.drop == ((2, EXITED), (3, REUSED), (4, NO_MATCH))
    assert p.keep == ((proc(1, "redis"), REDIS),)
    assert p.add == ((proc(3, "redis", start_time=9), REDIS),)  # the new process at pid 3


def test_plan_reused_pid_not_matching_is_only_dropped():
    p = plan({3: proc(3, "redis", start_time=5)}, [proc(3, "bash", start_time=9)], [REDIS])
    assert p == Plan(drop=((3, REUSED),))


def test_plan_scope_limits_what_can_be_dropped():
    current = {1: proc(1, "redis"), 2: proc(2, "redis")}
    # Only pid 2 was looked up (and is gone); pid 1 was not looked at: untouched.
    assert plan(current, [], [REDIS], scope={2}) == Plan(drop=((2, EXITED),))
    # A lookup that found a new match.
    p = plan(current, [proc(7, "redis")], [REDIS], scope={7})
    assert p == Plan(add=((proc(7, "redis"), REDIS),))


def test_plan_keep_carries_fresh_info_and_target():
    current = {1: proc(1, "redis", rss=1)}
    p = plan(current, [proc(1, "redis", rss=2 << 30)], [BIG, REDIS])
    assert p.keep == ((proc(1, "redis", rss=2 << 30), BIG),)
    assert not p.drop and not p.add


def test_plan_min_rss():
    assert plan({}, [proc(1, "x", rss=1 << 20)], [BIG]) == Plan()
    assert plan({}, [proc(1, "x", rss=2 << 30)], [BIG]).add


# ---------------------------------------------------------------- events


def test_reduce_events_last_event_per_pid_wins():
    lost, lookups, exits = reduce_events(
        [
            ("fork", 10), ("exec", 10), ("exit", 10),  # short-lived: just an exit
            ("exit", 11), ("fork", 11),  # pid reused: look the new one up
            ("comm", 12), ("uid", 13), ("exec", 14), ("exec", 14),
            ("exit", 15),
        ]
    )  # fmt: skip
    assert lost == []
    assert lookups == {11, 12, 13, 14}
    assert exits == {10, 15}


def test_reduce_events_lost():
    lost, lookups, exits = reduce_events([("exec", 1), ("lost", "ENOBUFS"), ("lost", "again")])
    assert lost == ["ENOBUFS", "again"]
    assert lookups == {1} and exits == set()


# ---------------------------------------------------------------- Discovery with fakes


class FakeBackend:
    name = "fake"

    def __init__(self, *procs: ProcessInfo):
        self.procs = {p.pid: p for p in procs}
        self.denied: set[int] = set()
        self.listings = 0

    def list_processes(self):
        self.listings += 1
        return [p for pid, p in sorted(self.procs.items()) if pid not in self.denied]

    def process(self, pid):
        if pid in self.denied:
            raise AccessDenied(f"pid {pid}")
        try:
            return self.procs[pid]
        except KeyError:
            raise ProcessGone(f"pid {pid}") from None


class FakeHandle:
    def __init__(self, info: ProcessInfo):
        self.proc = info
        self.closed = False

    def close(self):
        self.closed = True


class FakeEvents:
    """Scripted batches; with none left, wait() blocks out its timeout on the fake clock."""

    def __init__(self, *batches):
        self.batches = list(batches)
        self.available = True
        self.waits: list[float] = []
        self.clock: Clock | None = None

    def wait(self, timeout):
        self.waits.append(timeout)
        if self.batches:
            return self.batches.pop(0)
        if self.clock is not None:
            self.clock.sleep(timeout)
        return []


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def discovery(backend, targets, events=None, **kw):
    clock = Clock()
    kw.setdefault("opener", FakeHandle)
    if isinstance(events, FakeEvents):
        events.clock = clock
    d = Discovery(backend, targets, events, clock=clock, sleep=clock.sleep, **kw)
    return d, clock


def test_rescan_tracks_matches_with_handles():
    b = FakeBackend(proc(1, "redis-server"), proc(2, "bash"))
    d, _ = discovery(b, [REDIS])
    ch = d.rescan()
    assert dict(ch.added) == {1: "redis"} and not ch.dropped and bool(ch)
    assert set(d.tracked) == {1}
    t = d.tracked[1]
    assert isinstance(t, Tracked) and t.pid == 1 and t.target is REDIS
    assert t.handle.proc == proc(1, "redis-server")
    assert not d.rescan()  # nothing changed


def test_rescan_drops_exited_and_closes_the_handle():
    b = FakeBackend(proc(1, "redis"))
    d, _ = discovery(b, [REDIS])
    d.rescan()
    handle = d.tracked[1].handle
    del b.procs[1]
    ch = d.rescan()
    assert dict(ch.dropped) == {1: EXITED} and list(ch.dropped) == [1]
    assert handle.closed and not d.tracked


def test_rescan_pid_reuse_via_stale_start_time():
    b = FakeBackend(proc(1, "redis", start_time=200))
    d, _ = discovery(b, [REDIS])
    stale = FakeHandle(proc(1, "redis", start_time=100))
    d.tracked[1] = Tracked(stale.proc, REDIS, stale)
    ch = d.rescan()
    assert dict(ch.dropped) == {1: REUSED} and dict(ch.added) == {1: "redis"}
    assert stale.closed
    assert d.tracked[1].proc.start_time == 200 and d.tracked[1].handle is not stale


def test_rescan_keeps_a_tracked_process_it_may_no_longer_read():
    b = FakeBackend(proc(1, "redis"))
    d, _ = discovery(b, [REDIS])
    d.rescan()
    b.denied.add(1)
    assert not d.rescan()
    assert 1 in d.tracked and d.counters["denied"] == 1


def test_rescan_stops_between_processes_when_told_and_changes_nothing():
    """SIGTERM in the middle of a rescan of thousands of processes: matching stops at the
    next process, the tracked set stays as it was, and the rescan's time is still told."""
    stop = threading.Event()

    class Pattern:  # a comm pattern that asks the daemon to stop at its 100th search
        searches = 0

        def search(self, text):
            Pattern.searches += 1
            if Pattern.searches == 100:
                stop.set()
            return text.startswith("redis")

    target = Target("redis", Matcher(comm=Pattern()))
    b = FakeBackend(proc(1, "redis"))
    took: list[float] = []
    d, _ = discovery(b, [target], should_stop=stop.is_set, on_rescan=took.append)
    d.rescan()
    assert set(d.tracked) == {1} and d.listed == 1
    b.procs = {pid: proc(pid, "redis") for pid in range(10, 5010)}  # pid 1 exited

    assert d.rescan() == Changes()
    assert Pattern.searches == 100  # not 5,000: it stopped at once
    assert set(d.tracked) == {1} and not d.tracked[1].handle.closed and d.listed == 1

    stop.clear()
    ch = d.rescan()
    assert dict(ch.dropped) == {1: EXITED} and len(ch.added) == 5000 and d.listed == 5000
    assert len(took) == 3 and all(t >= 0 for t in took)


def test_poll_event_flow_exec_comm_fork_exit():
    b = FakeBackend(proc(1, "bash"))
    ev = FakeEvents()
    d, _ = discovery(b, [REDIS], ev)
    assert not d.poll(0.5)  # the first poll lists everything once
    assert b.listings == 1
    b.procs[5] = proc(5, "redis")
    ev.batches = [[("fork", 5), ("exec", 5)]]
    ch = d.poll(0.5)
    assert dict(ch.added) == {5: "redis"}
    b.procs[1] = proc(1, "redis-cli")  # pid 1 renamed itself: now a match
    ev.batches = [[("comm", 1)]]
    assert dict(d.poll(0.5).added) == {1: "redis"}
    handle = d.tracked[5].handle
    del b.procs[5]
    ev.batches = [[("exit", 5)]]
    ch = d.poll(0.5)
    assert dict(ch.dropped) == {5: EXITED} and handle.closed
    assert set(d.tracked) == {1}
    assert b.listings == 1  # events alone did it
    assert d.counters["events"] == 4


def test_poll_exec_reevaluates_a_tracked_process():
    b = FakeBackend(proc(5, "redis"))
    ev = FakeEvents()
    d, _ = discovery(b, [REDIS, PG], ev)
    d.rescan()
    b.procs[5] = proc(5, "postgres")  # exec'd something else, still claimed
    ev.batches = [[("exec", 5)]]
    ch = d.poll(0.5)
    assert dict(ch.retargeted) == {5: "postgres"} and not ch.added and not ch.dropped
    assert d.tracked[5].target is PG and d.tracked[5].proc.comm == "postgres"
    b.procs[5] = proc(5, "sh")
    ev.batches = [[("exec", 5)]]
    assert dict(d.poll(0.5).dropped) == {5: NO_MATCH}


def test_poll_races_are_counted_never_raised():
    b = FakeBackend()
    b.denied.add(8)
    ev = FakeEvents([("exec", 7), ("fork", 8), ("exit", 9)])
    d, _ = discovery(b, [REDIS], ev)
    d.rescan()
    assert not d.poll(0.1)
    assert d.counters["vanished"] == 1 and d.counters["denied"] == 1


def test_poll_opener_races_are_counted():
    def opener(info):
        if info.pid == 1:
            raise ProcessGone("gone")
        if info.pid == 2:
            raise AccessDenied("no")
        raise OSError(24, "Too many open files")

    b = FakeBackend(proc(1, "redis"), proc(2, "redis"), proc(3, "redis"))
    d, _ = discovery(b, [REDIS], opener=opener)
    assert not d.rescan() and not d.tracked
    assert (d.counters["vanished"], d.counters["denied"], d.counters["open_failed"]) == (1, 1, 1)


class Garbled(Exception):
    pass


def test_a_pid_failing_mid_batch_costs_no_other_pid(caplog):
    """ESRCH raised raw (a process exiting as /proc/PID is opened), or anything unforeseen,
    for one pid of a batch: counted, logged once, and the rest of the batch still lands."""

    class Racy(FakeBackend):
        def process(self, pid):
            if pid == 6:
                raise ProcessLookupError(3, "No such process")
            if pid == 7:
                raise Garbled("stat: text the process controls")
            return super().process(pid)

    def opener(info):
        if info.pid == 9:
            raise Garbled("pidfd")
        return FakeHandle(info)

    b = Racy(*(proc(pid, "redis") for pid in (5, 8, 9)))
    d, _ = discovery(b, [REDIS], FakeEvents(), opener=opener)
    with caplog.at_level("WARNING", logger="memdefragd.pipeline.discover"):
        ch = d.handle([("exec", 5), ("exec", 6), ("exec", 7), ("exec", 8), ("exec", 9)])
        d.handle([("exec", 7)])
    assert dict(ch.added) == {5: "redis", 8: "redis"} and set(d.tracked) == {5, 8}
    assert d.races() == {
        "discovery_vanished": 1, "discovery_denied": 0,
        "discovery_open_failed": 1, "discovery_lookup_failed": 2,
    }  # fmt: skip
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "unexpected Garbled" in warned[0], warned  # once per kind
    assert "the process controls" not in caplog.text


@pytest.mark.parametrize(
    ("call", "error"),
    [("open", ProcessLookupError(3, "No such process")), ("pidfd_open", OSError(22, "EINVAL"))],
)
def test_kernel_backend_turns_a_process_exiting_mid_open_into_process_gone(
    monkeypatch, call, error
):
    """ESRCH from opening /proc/PID, EINVAL from pidfd_open (the pid leads no process any
    more): both are "process gone" to discovery, as ENOENT always was."""
    import os

    from memdefragd.backends.kernel import procs
    from memdefragd.backends.kernel.backend import KernelBackend

    real = getattr(os, call)

    def fail(target, *a, **kw):  # only ours: os.open serves everyone else meanwhile
        if target == os.getpid() or str(target).startswith(f"/proc/{os.getpid()}"):
            raise error
        return real(target, *a, **kw)

    monkeypatch.setattr(procs.os, call, fail)
    b = KernelBackend()
    with pytest.raises(ProcessGone):
        if call == "open":
            b.process(os.getpid())
        else:
            b.open(proc(os.getpid(), "me"))


def test_lost_event_means_a_full_rescan():
    b = FakeBackend()
    ev = FakeEvents()
    d, _ = discovery(b, [REDIS], ev)
    d.rescan()
    b.procs[3] = proc(3, "redis")  # started while events were being lost
    ev.batches = [[("exit", 77), ("lost", "OSError: [Errno 105] No buffer space available")]]
    ch = d.poll(0.5)
    assert dict(ch.added) == {3: "redis"}
    assert b.listings == 2 and d.counters["lost"] == 1


def test_first_subscription_means_a_rescan_not_a_loss():
    """The daemon does not wait for the subscription: what started before it is found by
    one more listing, which is not counted as lost events."""
    b = FakeBackend()
    ev = FakeEvents()
    d, _ = discovery(b, [REDIS], ev)
    d.rescan()
    b.procs[3] = proc(3, "redis")  # started before events flowed
    ev.batches = [[("subscribed", None)]]
    ch = d.poll(0.5)
    assert dict(ch.added) == {3: "redis"}
    assert b.listings == 2 and d.counters["lost"] == 0


def test_periodic_rescan_with_events_catches_what_has_no_event():
    b = FakeBackend(proc(1, "x", rss=1 << 20))
    ev = FakeEvents()
    d, clock = discovery(b, [BIG], ev, rescan_interval=60.0)
    d.rescan()
    b.procs[1] = proc(1, "x", rss=2 << 30)  # grew past min_rss: no event says so
    clock.now += 30
    assert not d.poll(0)
    clock.now += 31
    assert dict(d.poll(0).added) == {1: "big"}


def test_without_events_poll_lists_every_fallback_interval():
    b = FakeBackend()
    d, clock = discovery(b, [REDIS], None, fallback_interval=2.0)
    t0 = clock.now
    assert not d.poll(1.0)  # the first poll lists once, then sleeps out the timeout
    assert b.listings == 1 and clock.now == t0 + 1.0
    b.procs[4] = proc(4, "redis")
    ch = d.poll(5.0)  # the next listing is due 2 s after the first: returns then
    assert dict(ch.added) == {4: "redis"}
    assert b.listings == 2 and clock.now == t0 + 2.0


def test_unavailable_events_fall_back_to_listing():
    b = FakeBackend()
    ev = FakeEvents()
    ev.available = False
    d, _ = discovery(b, [REDIS], ev, fallback_interval=2.0, rescan_interval=600.0)
    d.rescan()
    b.procs[4] = proc(4, "redis")
    assert dict(d.poll(3.0).added) == {4: "redis"}
    assert ev.waits == [0]  # drained without blocking, then slept until the listing


def test_rescan_by_the_caller_restarts_the_clock():
    b = FakeBackend()
    d, clock = discovery(b, [REDIS], FakeEvents(), rescan_interval=10.0)
    d.rescan()
    clock.now += 9
    d.rescan()
    clock.now += 9
    d.poll(0)
    assert b.listings == 2


def test_set_targets_judges_everything_again():
    b = FakeBackend(proc(1, "redis"), proc(2, "postgres"), proc(3, "bash"))
    d, _ = discovery(b, [REDIS])
    d.rescan()
    assert set(d.tracked) == {1}
    ch = d.set_targets([PG])
    assert dict(ch.dropped) == {1: NO_MATCH} and dict(ch.added) == {2: "postgres"}
    pg2 = replace(PG, mode="observe")
    ch = d.set_targets([pg2])
    assert dict(ch.retargeted) == {2: "postgres"}
    assert d.tracked[2].target is pg2
    assert not d.set_targets([pg2])


def test_close_closes_every_handle():
    b = FakeBackend(proc(1, "redis"), proc(2, "redis"))
    d, _ = discovery(b, [REDIS])
    d.rescan()
    handles = [t.handle for t in d.tracked.values()]
    with d:
        pass
    assert all(h.closed for h in handles) and not d.tracked


def test_handles_come_from_the_backend_unless_an_opener_is_given():
    class Opening(FakeBackend):
        def open(self, info):
            return FakeHandle(info)

    b = Opening(proc(1, "redis"))
    d = Discovery(b, [REDIS], None)
    d.rescan()
    assert isinstance(d.tracked[1].handle, FakeHandle) and d.tracked[1].handle.proc.pid == 1


def test_changes_is_falsy_when_empty():
    assert not Changes()
    assert Changes(added={1: "a"})


def test_forks_of_tracked_processes_and_their_childrens_exit_and_exec():
    b = FakeBackend(proc(1, "redis"), proc(2, "bash"))
    ev = FakeEvents()
    d, _ = discovery(b, [REDIS], ev)
    d.poll(0.5)
    b.procs[5] = proc(5, "redis")  # a fork child: same name, so tracked too
    ev.batches = [[("forked", (1, 5)), ("fork", 5), ("forked", (2, 6)), ("fork", 6)]]
    ch = d.poll(0.5)
    assert dict(ch.forked) == {5: 1}  # bash (2) is no target: its fork is not ours to watch
    assert dict(ch.added) == {5: "redis"}
    del b.procs[5]
    ev.batches = [[("exit", 5)]]
    ch = d.poll(0.5)
    assert dict(ch.fork_exited) == {5: 1} and dict(ch.dropped) == {5: EXITED}
    ev.batches = [[("forked", (1, 7)), ("exec", 7), ("exit", 7)]]
    ch = d.poll(0.5)
    assert ch.execd == {7} and not ch.fork_exited  # exec'd: a new program, not a fork child
    ev.batches = [[("forked", (1, 8))], [("lost", "ENOBUFS")]]
    d.poll(0.5)
    ch = d.poll(0.5)  # the child vanished while events were lost: the rescan tells
    assert dict(ch.fork_exited) == {8: 1} and d.fork_children == {}
