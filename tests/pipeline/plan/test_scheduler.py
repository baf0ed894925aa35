"""The scheduler (memdefragd.pipeline.plan.scheduler): ranking, chunking, budgets and reactions.

Pure code on a fake clock: every call gets `now` from a `Clock` the test advances by hand,
so budgets, cooldowns and backoffs are checked to the second without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memdefragd.model import (
    PMD_PAGES,
    PMD_SIZE,
    Layout,
    MemoryState,
    Outcome,
    Pressure,
    Request,
    Vma,
)
from memdefragd.pipeline.plan.scheduler import (
    Candidate,
    Reaction,
    Scheduler,
    SchedulerSettings,
    benefit_per_byte,
    merge_ranges,
    pressure_reason,
    reaction,
    region_cost,
)
from memdefragd.pipeline.score import VmaAccumulator
from memdefragd.pipeline.targets import Target

MiB = 1 << 20
GiB = 1 << 30
BASE = 1 * GiB  # where test VMAs start (2 MiB-aligned)
HYPOTHESIS = settings(max_examples=200, deadline=None)


@dataclass
class Clock:
    t: float = 0.0

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def roomy(**kw) -> SchedulerSettings:
    """Budgets that never bind unless a test tightens one: each test isolates one rule."""
    base = {
        "bytes_per_second": 1 << 40,
        "cpu_share": 1.0,
        "chunk_bytes": PMD_SIZE,
        "cooldown": 0.0,
        "backoff_initial": 1.0,
        "backoff_max": 4.0,
    }
    return SchedulerSettings(**{**base, **kw})


def cand(
    target: str = "a",
    pid: int = 1,
    *,
    start_time: int = 100,
    present=(512,),
    slots=None,
    vma_start: int = BASE,
    vma_regions: int | None = None,
    priority: int = 0,
    mode: str = "enforce",
    hotness=None,
) -> Candidate:
    """A VMA of `vma_regions` 2 MiB regions; the collapsible ones at `slots` (default 0..n-1)."""
    present = np.asarray(present, dtype=np.int64)
    slots = np.arange(present.size) if slots is None else np.asarray(slots)
    n = vma_regions if vma_regions is not None else int(slots.max(initial=-1)) + 1
    regions = (vma_start + slots.astype(np.uint64) * PMD_SIZE).astype(np.uint64)
    return Candidate(
        target=target, priority=priority, mode=mode, pid=pid, start_time=start_time,
        vma_start=vma_start, vma_end=vma_start + max(n, 1) * PMD_SIZE,
        regions=regions, present=present, hotness=hotness,
    )  # fmt: skip


def outcome(
    req: Request,
    *,
    attempted: int | None = None,
    done: int | None = None,
    failures=None,
    duration: float = 0.0,
    stopped: str = "",
    ineligible=(),
) -> Outcome:
    attempted = req.bytes if attempted is None else attempted
    return Outcome(
        request=req, bytes_attempted=attempted, bytes_done=attempted if done is None else done,
        failures=MappingProxyType(dict(failures or {})), duration=duration, stopped=stopped,
        ineligible=tuple(ineligible),
    )  # fmt: skip


def memory(avg10: float | None = None, available: int | None = None) -> MemoryState:
    some = None if avg10 is None else Pressure(avg10, avg10, avg10, 0)
    meminfo = {} if available is None else {"MemAvailable": available}
    return MemoryState(
        zones=(), pagetype_free=None, vmstat={}, thp={}, khugepaged={},
        pressure_some=some, pressure_full=None, meminfo=MappingProxyType(meminfo),
    )  # fmt: skip


def drain(s: Scheduler, clock: Clock, step: float = 1.0) -> list[Request]:
    """Every request, recording each as a clean success, with time moving on between them."""
    out = []
    while (r := s.next_request(clock.advance(step))) is not None:
        out.append(r)
        s.record(outcome(r), clock.t)
    return out


def region_starts(requests) -> list[int]:
    return sorted(a for r in requests for lo, hi in r.ranges for a in range(lo, hi, PMD_SIZE))


# ------------------------------------------------------------------------------ benefit


def test_benefit_per_byte_model():
    present = np.array([512, 256, 128, 1])
    assert benefit_per_byte(present).tolist() == [1.0, 0.5, 0.25, 1 / 512]
    assert benefit_per_byte(present, priority=1).tolist() == [2.0, 1.0, 0.5, 2 / 512]
    assert benefit_per_byte(present, priority=-1).tolist() == [0.5, 0.25, 0.125, 0.5 / 512]
    hot = np.array([0.5, 1.0, 2.0, 0.0])
    assert benefit_per_byte(present, hotness=hot).tolist() == [0.5, 0.5, 0.5, 0.0]
    # Copy plus zero-fill is always one 2 MiB region, whatever is present.
    assert region_cost(present).tolist() == [PMD_SIZE] * 4


def test_priority_ten_steps_is_strict_precedence():
    """The sparsest region of a priority-10 target beats the fullest of a priority-0 one."""
    assert benefit_per_byte(np.array([1]), priority=10)[0] > benefit_per_byte(np.array([512]))[0]
    assert benefit_per_byte(np.array([1]), priority=10**6)[0] < float("inf")


# ------------------------------------------------------------------------------ ranking


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        (cand("full", 1, present=[512]), cand("sparse", 2, present=[100])),
        (cand("prio", 1, present=[300], priority=1), cand("plain", 2, present=[512])),
        (
            cand("hot", 1, present=[400], hotness=[1.0]),
            cand("cold", 2, present=[400], hotness=[0.5]),
        ),
        (cand("unknown", 1, present=[400]), cand("lukewarm", 2, present=[400], hotness=[0.9])),
    ],
    ids=["fuller", "higher-priority", "hotter", "unknown-hotness-is-1"],
)
def test_ranking(better, worse):
    for order in ([better, worse], [worse, better]):
        s = Scheduler(roomy())
        s.plan(order, now=0.0)
        assert [r.target for r in s.queued()] == [better.target, worse.target]
        assert [r.target for r in drain(s, Clock())] == [better.target, worse.target]


def test_request_benefit_is_its_regions_gain_over_cost():
    s = Scheduler(roomy(chunk_bytes=4 * MiB))
    s.plan([cand(present=[512, 256, 128, 64])], now=0.0)
    assert [r.benefit for r in s.queued()] == [0.75, 0.1875]


def test_ties_are_broken_the_same_way_whatever_the_input_order():
    cs = [cand(t, pid, vma_start=BASE * k) for k, (t, pid) in enumerate(
        [("b", 2), ("a", 7), ("a", 3), ("b", 1)], start=1)]  # fmt: skip
    orders = set()
    for perm in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        s = Scheduler(roomy())
        s.plan([cs[i] for i in perm], now=0.0)
        orders.add(tuple((r.target, r.pid) for r in s.queued()))
    assert orders == {(("a", 3), ("a", 7), ("b", 1), ("b", 2))}


def test_best_regions_of_a_vma_go_first():
    s = Scheduler(roomy(chunk_bytes=4 * MiB))
    s.plan([cand(present=[10, 500, 20, 400, 512, 30])], now=0.0)
    first, second, third = s.queued()
    assert region_starts([first]) == [BASE + 1 * PMD_SIZE, BASE + 4 * PMD_SIZE]
    assert region_starts([second]) == [BASE + 3 * PMD_SIZE, BASE + 5 * PMD_SIZE]
    assert region_starts([third]) == [BASE, BASE + 2 * PMD_SIZE]


def test_regions_with_nothing_to_gain_are_not_planned():
    s = Scheduler(roomy())
    s.plan([cand(present=[0, 512, 300], hotness=[1.0, 0.0, 1.0])], now=0.0)
    assert region_starts(s.queued()) == [BASE + 2 * PMD_SIZE]


# ------------------------------------------------------------------------------ chunking


def test_merge_ranges_joins_adjacent_regions_only():
    starts = np.array([5, 0, 1, 2, 9, 10], dtype=np.uint64) * PMD_SIZE + BASE
    assert merge_ranges(starts) == (
        (BASE, BASE + 3 * PMD_SIZE),
        (BASE + 5 * PMD_SIZE, BASE + 6 * PMD_SIZE),
        (BASE + 9 * PMD_SIZE, BASE + 11 * PMD_SIZE),
    )
    assert merge_ranges(np.zeros(0, np.uint64)) == ()


def test_chunking_example():
    """40 regions, gaps included, at 16 MiB per request: 5 requests of 8 regions."""
    slots = [i for i in range(48) if i % 6 != 5]
    s = Scheduler(roomy(chunk_bytes=16 * MiB))
    s.plan([cand(present=[512] * len(slots), slots=slots)], now=0.0)
    reqs = s.queued()
    assert [r.bytes for r in reqs] == [16 * MiB] * 5
    assert reqs[0].ranges == (
        (BASE, BASE + 5 * PMD_SIZE),
        (BASE + 6 * PMD_SIZE, BASE + 9 * PMD_SIZE),
    )
    assert region_starts(reqs) == [BASE + i * PMD_SIZE for i in slots]
    assert s.queue_length == 5 and s.queue_bytes == 80 * MiB


@st.composite
def vmas(draw):
    """Several VMAs of several processes, each with some collapsible regions."""
    out = []
    for k in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 40))
        slots = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
        present = draw(st.lists(st.integers(1, 512), min_size=len(slots), max_size=len(slots)))
        out.append(cand(f"t{k % 2}", pid=k % 3 + 1, present=present, slots=slots,
                        vma_start=BASE * (k + 1), vma_regions=n, priority=k % 2))  # fmt: skip
    return out


@HYPOTHESIS
@given(vmas(), st.integers(1, 32))
def test_chunking_property(candidates, chunk_regions):
    """Each request: at most chunk_bytes, one VMA's regions only, disjoint, and all covered."""
    s = Scheduler(roomy(chunk_bytes=chunk_regions * PMD_SIZE))
    s.plan(candidates, now=0.0)
    reqs = s.queued()
    by_vma = {(c.pid, c.vma_start): c for c in candidates}
    for r in reqs:
        assert 0 < r.bytes <= chunk_regions * PMD_SIZE
        c = by_vma[(r.pid, r.vma_start)]
        assert (r.target, r.start_time, r.vma_end) == (c.target, c.start_time, c.vma_end)
        assert set(region_starts([r])) <= set(c.regions.tolist())
        assert all(hi > lo and lo % PMD_SIZE == 0 for lo, hi in r.ranges)
    for c in candidates:
        mine = [r for r in reqs if (r.pid, r.vma_start) == (c.pid, c.vma_start)]
        assert region_starts(mine) == sorted(c.regions.tolist())  # each region exactly once
    assert s.queue_bytes == sum(r.bytes for r in reqs)
    assert [r.benefit for r in reqs] == sorted((r.benefit for r in reqs), reverse=True)


# ------------------------------------------------------------------------------ budgets


def test_bytes_budget_over_time():
    clock = Clock()
    s = Scheduler(roomy(bytes_per_second=4 * MiB, chunk_bytes=4 * MiB))
    s.plan([cand(present=[512] * 8)], now=clock.t)
    r = s.next_request(clock.t)
    assert r is not None and r.bytes == 4 * MiB  # the burst: one chunk
    s.record(outcome(r), clock.t)
    assert s.next_request(clock.advance(0.5)) is None
    assert s.why_idle == "budget: bytes"
    assert s.snapshot(clock.t).tokens == pytest.approx(2 * MiB)
    r = s.next_request(clock.advance(0.5))
    assert r is not None
    # A backend that attempted nothing gets its reservation back.
    s.record(outcome(r, attempted=0), clock.t)
    assert s.next_request(clock.t) is not None


def test_settling_survives_the_executor_changing_the_method():
    s = Scheduler(roomy(bytes_per_second=1, chunk_bytes=4 * MiB))
    s.plan([cand(present=[512] * 4)], now=0.0)
    r = s.next_request(0.0)
    s.record(outcome(replace(r, method="ranger", benefit=0.0), attempted=PMD_SIZE), 0.0)
    assert s.snapshot(0.0).tokens == pytest.approx(2 * MiB)  # charged once, for 2 MiB


def test_bytes_reserved_at_dispatch_cover_outstanding_requests():
    s = Scheduler(roomy(bytes_per_second=2 * MiB, chunk_bytes=4 * MiB))
    s.plan([cand(present=[512] * 4, slots=[0, 2, 4, 6])], now=0.0)
    assert s.next_request(0.0) is not None
    assert s.next_request(0.0) is None  # the first is not recorded yet, but it is paid for
    assert s.why_idle == "budget: bytes"


def test_clock_going_back_mints_no_tokens():
    s = Scheduler(roomy(bytes_per_second=2 * MiB, chunk_bytes=2 * MiB))
    s.plan([cand(present=[512] * 3)], now=10.0)
    assert s.next_request(10.0) is not None
    assert s.next_request(5.0) is None
    assert s.next_request(10.5) is None
    assert s.next_request(11.0) is not None


@HYPOTHESIS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["dispatch", "record", "wait"]),
            st.floats(0, 3, allow_nan=False),
            st.floats(0, 1),
        ),
        max_size=60,
    ),
    st.sampled_from([1 * MiB, 3 * MiB, 16 * MiB]),
    st.sampled_from([2 * MiB, 8 * MiB]),
)
def test_bytes_attempted_never_exceed_rate_times_elapsed_plus_burst(steps, rate, chunk):
    s = Scheduler(roomy(bytes_per_second=rate, chunk_bytes=chunk))
    clock = Clock()
    candidates = [cand(present=[512] * 13, slots=[0, 1, 2, 4, 5, 9, 10, 11, 12, 13, 20, 21, 23])]
    s.plan(candidates, now=clock.t)
    outstanding: list[tuple[Request, int]] = []
    attempted = 0
    for action, dt, fraction in steps:
        clock.advance(dt)
        if action == "dispatch":
            if s.queue_length == 0:
                s.plan(candidates, now=clock.t)
            r = s.next_request(clock.t)
            if r is None:
                continue
            n = int(r.bytes * fraction)  # the backend may stop short
            attempted += n
            assert attempted <= rate * clock.t + chunk + 1e-3
            outstanding.append((r, n))
        elif action == "record" and outstanding:
            r, n = outstanding.pop(0)
            s.record(outcome(r, attempted=n), clock.t)


def test_cpu_share_over_a_sliding_window():
    clock = Clock()
    s = Scheduler(roomy(cpu_share=0.1, cpu_window=10.0))  # 1 s of kernel time per 10 s
    s.plan([cand(present=[512] * 6)], now=clock.t)
    s.record(outcome(s.next_request(clock.t), duration=0.6), clock.t)
    r = s.next_request(clock.advance(1.0))  # 0.6 s used < 1 s
    assert r is not None
    s.record(outcome(r, duration=0.6), clock.t)
    assert s.snapshot(clock.t).cpu_used == pytest.approx(1.2)
    assert s.next_request(clock.advance(1.0)) is None
    assert s.why_idle == "budget: cpu"
    assert s.next_request(clock.advance(7.9)) is None  # t = 9.9: the first 0.6 s still counts
    assert s.next_request(clock.advance(0.1)) is not None  # t = 10: it left the window
    assert s.snapshot(clock.t).cpu_used == pytest.approx(0.6)


# ------------------------------------------------------------------------------ cooldown


def test_cooldown_rests_a_target_while_others_go():
    clock = Clock()
    s = Scheduler(roomy(cooldown=5.0))
    s.plan([cand("a", 1, present=[512, 512]), cand("b", 2, present=[100])], now=clock.t)
    r = s.next_request(clock.t)
    assert r is not None and r.target == "a"
    s.record(outcome(r), clock.t)
    r = s.next_request(clock.advance(1.0))  # a's second request ranks higher but a rests
    assert r is not None and r.target == "b"
    s.record(outcome(r), clock.t)
    assert s.next_request(clock.advance(1.0)) is None
    assert s.why_idle == "cooldown"
    assert s.snapshot(clock.t).cooldown_until == {"a": 5.0, "b": 6.0}
    assert s.next_request(clock.advance(2.9)) is None  # t = 4.9
    r = s.next_request(clock.advance(0.1))
    assert r is not None and r.target == "a"


def test_per_target_overrides_of_chunk_and_cooldown():
    clock = Clock()
    st_ = roomy(
        chunk_bytes=8 * MiB, chunk_by_target={"db": 2 * MiB}, cooldown_by_target={"db": 3.0}
    )
    s = Scheduler(st_)
    s.plan(
        [cand("db", 1, present=[512] * 4), cand("web", 2, present=[512] * 4, vma_start=2 * GiB)],
        now=0.0,
    )
    assert sorted((r.target, r.bytes) for r in s.queued()) == [("db", 2 * MiB)] * 4 + [
        ("web", 8 * MiB)
    ]
    got = []
    for _ in range(10):
        if (r := s.next_request(clock.advance(1.0))) is not None:
            s.record(outcome(r), clock.t)
            got.append((clock.t, r.target))
    # db rests 3 s after each request; web, without a cooldown, goes at once.
    assert got == [(1.0, "db"), (2.0, "web"), (4.0, "db"), (7.0, "db"), (10.0, "db")]


# ------------------------------------------------------------------------------ backoff


def test_exponential_backoff_doubles_up_to_max_and_resets_on_success():
    clock = Clock()
    s = Scheduler(roomy(backoff_initial=1.0, backoff_max=4.0))
    s.plan([cand("a", 1, present=[512] * 20)], now=clock.t)
    expected = [1.0, 2.0, 4.0, 4.0]
    for delay in expected:
        r = s.next_request(clock.t)
        assert r is not None
        s.record(outcome(r, failures={"EAGAIN": 1}, done=0), clock.t)
        assert s.snapshot(clock.t).backoff_until == {"a": clock.t + delay}
        assert s.next_request(clock.advance(delay - 0.01)) is None
        assert s.why_idle == "backoff"
        clock.advance(0.01)
    s.record(outcome(s.next_request(clock.t)), clock.t)  # a clean success
    assert s.snapshot(clock.t).backoff_until == {}
    r = s.next_request(clock.advance(1.0))
    s.record(outcome(r, stopped="EBUSY", done=0), clock.t)
    assert s.snapshot(clock.t).backoff_until == {"a": clock.t + 1.0}  # back to the start


def test_target_backoff_leaves_other_targets_working():
    clock = Clock()
    s = Scheduler(roomy())
    s.plan([cand("a", 1, present=[512] * 3), cand("b", 2, present=[300] * 3)], now=clock.t)
    r = s.next_request(clock.t)
    assert r.target == "a"
    s.record(outcome(r, stopped="EBUSY", done=0), clock.t)
    assert [s.next_request(clock.advance(0.3)).target for _ in range(3)] == ["b", "b", "b"]
    assert s.next_request(clock.advance(0.05)) is None and s.why_idle == "backoff"
    assert s.next_request(clock.advance(0.05)).target == "a"  # t = 1.0


def test_enomem_backs_off_the_whole_machine():
    clock = Clock()
    s = Scheduler(roomy(backoff_initial=2.0, backoff_max=8.0))
    s.plan([cand("a", 1, present=[512] * 3), cand("b", 2, present=[300] * 3)], now=clock.t)
    r = s.next_request(clock.t)
    s.record(outcome(r, stopped="ENOMEM", attempted=PMD_SIZE, done=0), clock.t)
    snap = s.snapshot(clock.t)
    assert snap.machine_backoff_until == 2.0 and snap.backoff_until == {}  # not a's fault
    assert s.next_request(clock.advance(1.99)) is None
    assert s.why_idle == "backoff: ENOMEM"
    r = s.next_request(clock.advance(0.01))
    assert r is not None and r.target == "a"
    s.record(outcome(r, failures={"ENOMEM": 1}, done=0), clock.t)  # again: doubled
    assert s.snapshot(clock.t).machine_backoff_until == clock.t + 4.0
    r = s.next_request(clock.advance(4.0))
    s.record(outcome(r), clock.t)  # success resets the streak
    r = s.next_request(clock.advance(1.0))
    s.record(outcome(r, stopped="ENOMEM", done=0), clock.t)
    assert s.snapshot(clock.t).machine_backoff_until == clock.t + 2.0


# ------------------------------------------------------------------------------ stops


def test_esrch_drops_the_process_and_never_plans_it_again():
    clock = Clock()
    s = Scheduler(roomy())
    gone = cand("a", 1, present=[512] * 4)
    sibling = cand("a", 2, present=[400] * 2)  # same target, another process
    s.plan([gone, sibling], now=clock.t)
    r = s.next_request(clock.t)
    assert r.pid == 1
    s.record(outcome(r, stopped="ESRCH", attempted=0, done=0), clock.t)
    assert {r.pid for r in s.queued()} == {2}
    assert s.queue_bytes == 2 * PMD_SIZE
    s.plan([gone, sibling], now=clock.advance(1.0))  # a stale scan still lists it
    assert {r.pid for r in s.queued()} == {2}
    reused = cand("a", 1, start_time=999, present=[512])
    s.plan([reused], now=clock.t)
    assert [(r.pid, r.start_time) for r in s.queued()] == [(1, 999)]


def test_eperm_drops_the_process_until_the_next_plan():
    clock = Clock()
    s = Scheduler(roomy())
    c = cand("a", 1, present=[512] * 3)
    s.plan([c, cand("b", 2, present=[10])], now=clock.t)
    r = s.next_request(clock.t)
    s.record(outcome(r, stopped="EPERM", attempted=0, done=0), clock.t)
    assert [r.pid for r in s.queued()] == [2]
    assert s.snapshot(clock.t).denied == {(1, 100)}
    s.plan([c], now=clock.advance(1.0))
    assert len(s.queued()) == 3 and s.snapshot(clock.t).denied == set()


@pytest.mark.parametrize(
    ("stopped", "compaction", "want"),
    [
        ("ESRCH", False, Reaction.FORGET),  # gone: forget it
        ("EPERM", True, Reaction.DENIED),  # not allowed: say so
        ("ENOMEM", True, Reaction.COMPACT),  # no free 2 MiB block: compact, if configured
        ("ENOMEM", False, Reaction.NONE),
        ("EAGAIN", True, Reaction.NONE),  # the scheduler's backoff is reaction enough
        ("", True, Reaction.NONE),
    ],
)
def test_what_a_stopped_request_asks_of_the_daemon(stopped, compaction, want):
    assert reaction(stopped, compaction=compaction) is want


def test_einval_regions_are_never_planned_again_for_that_process():
    clock = Clock()
    s = Scheduler(roomy(chunk_bytes=8 * MiB))
    c = cand("a", 1, present=[512] * 4)
    s.plan([c], now=clock.t)
    r = s.next_request(clock.t)
    bad = (BASE + PMD_SIZE, BASE + 3 * PMD_SIZE)
    s.record(outcome(r, failures={"EINVAL": 2}, ineligible=bad), clock.t)
    s.plan([c], now=clock.advance(1.0))
    assert region_starts(s.queued()) == [BASE, BASE + 2 * PMD_SIZE]
    s.plan([c], now=clock.advance(1.0))  # and the plan after that
    assert region_starts(s.queued()) == [BASE, BASE + 2 * PMD_SIZE]
    # Another process (pid reused), or the same pid after forget(), starts afresh.
    s.plan([cand("a", 1, start_time=101, present=[512] * 4)], now=clock.t)
    assert len(region_starts(s.queued())) == 4
    s.forget(1)
    s.plan([c], now=clock.t)
    assert len(region_starts(s.queued())) == 4


def test_forget_drops_queued_work_of_the_pid():
    s = Scheduler(roomy())
    s.plan([cand("a", 1, present=[512] * 3), cand("a", 2, present=[512])], now=0.0)
    s.forget(1)
    assert [r.pid for r in s.queued()] == [2] and s.queue_bytes == PMD_SIZE


# ------------------------------------------------------------------------------ observe


def test_observe_mode_plans_nothing_but_counts():
    s = Scheduler(roomy())
    s.plan([cand("watch", 1, present=[512, 30, 0], mode="observe"),
            cand("watch", 2, present=[512], mode="observe")], now=0.0)  # fmt: skip
    assert s.queue_length == 0 and s.queue_bytes == 0
    assert s.planned_observe_bytes == 3 * PMD_SIZE  # the empty region would not be tried
    assert s.snapshot(0.0).planned_observe_bytes == {"watch": 3 * PMD_SIZE}
    assert s.next_request(1.0) is None and s.why_idle == "empty"
    s.plan([cand("act", 3, present=[512])], now=2.0)
    assert s.planned_observe_bytes == 0 and s.queue_length == 1


# ------------------------------------------------------------------------------ pressure


@pytest.mark.parametrize(
    ("avg10", "available", "paused"),
    [
        (None, None, False),  # no PSI, no MemAvailable: never pause on missing data
        (0.0, 8 * GiB, False),
        (10.0, 8 * GiB, False),  # at the threshold is not above it
        (10.5, 8 * GiB, True),
        (0.0, GiB, False),
        (0.0, GiB - 1, True),
        (None, GiB - 1, True),
        (50.0, None, True),
    ],
)
def test_pressure_reason(avg10, available, paused):
    reason = pressure_reason(memory(avg10, available), SchedulerSettings())
    assert (reason is not None) is paused


def test_pressure_pauses_and_resumes_by_itself():
    clock = Clock()
    s = Scheduler(roomy(psi_some_avg10=10.0, min_available_bytes=GiB))
    s.plan([cand(present=[512] * 3)], now=clock.t)
    reason = s.pressure(memory(avg10=25.0, available=8 * GiB), clock.t)
    assert reason == "PSI memory some avg10 25% > 10%"
    assert s.next_request(clock.advance(1.0)) is None
    assert s.why_idle == "paused: PSI memory some avg10 25% > 10%"
    assert s.snapshot(clock.t).paused == reason
    s.pressure(memory(avg10=25.0, available=GiB // 2), clock.t)
    assert s.next_request(clock.advance(1.0)) is None
    assert s.why_idle.startswith("paused: PSI") and "MemAvailable 512 MiB < 1024 MiB" in s.why_idle
    assert s.pressure(memory(avg10=3.0, available=8 * GiB), clock.t) is None
    assert s.next_request(clock.advance(1.0)) is not None


def test_a_pause_mirrored_into_set_paused_reads_once():
    s = Scheduler(roomy())
    reason = s.pressure(memory(avg10=50.0), 0.0)
    s.set_paused(reason)
    assert s.paused == reason
    s.set_paused(None)
    assert s.pressure(memory(avg10=0.0), 1.0) is None and s.paused is None


def test_manual_pause_outlasts_pressure_clearing():
    s = Scheduler(roomy())
    s.plan([cand(present=[512] * 2)], now=0.0)
    s.set_paused("operator")
    assert s.paused == "operator"
    s.pressure(memory(avg10=50.0), 0.0)
    s.pressure(memory(avg10=0.0), 1.0)
    assert s.next_request(1.0) is None and s.why_idle == "paused: operator"
    s.set_paused(None)
    assert s.next_request(2.0) is not None


# ------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize(
    "kw",
    [
        {"chunk_bytes": 3 * MiB},
        {"chunk_bytes": 66 * MiB},
        {"chunk_bytes": 0},
        {"chunk_by_target": {"a": MiB}},
        {"bytes_per_second": 0},
        {"cpu_share": 0.0},
        {"cpu_share": 1.5},
        {"cooldown": -1.0},
        {"backoff_initial": 10.0, "backoff_max": 5.0},
        {"psi_some_avg10": 101.0},
    ],
)
def test_settings_refuse_nonsense(kw):
    with pytest.raises(ValueError):
        SchedulerSettings(**kw)


def test_default_settings_are_valid_and_match_their_documented_limits():
    d = SchedulerSettings()
    assert d.chunk_bytes == 64 * MiB and d.burst == 64 * MiB and d.cpu_limit == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kw",
    [
        {"regions": np.array([BASE // 4096], np.uint64), "vma_start": 0},  # a vpn, not bytes
        {"regions": np.array([BASE + 4 * PMD_SIZE], np.uint64)},  # outside the VMA
        {"regions": np.array([BASE, BASE], np.uint64), "present": np.array([1, 1])},
        {"present": np.array([513])},
        {"present": np.array([1, 2])},
        {"hotness": np.array([-1.0])},
        {"hotness": np.array([np.nan])},
        {"mode": "enforcing"},
    ],
)
def test_candidate_refuses_nonsense(kw):
    base = {
        "target": "a", "priority": 0, "mode": "enforce", "pid": 1, "start_time": 1,
        "vma_start": BASE, "vma_end": BASE + 4 * PMD_SIZE,
        "regions": np.array([BASE], np.uint64), "present": np.array([512]),
    }  # fmt: skip
    with pytest.raises(ValueError):
        Candidate(**{**base, **kw})


def test_candidate_from_accumulated_metrics():
    start_vpn = BASE // 4096
    vpn = np.concatenate([np.arange(PMD_PAGES), PMD_PAGES + np.arange(0, 40, 4)]) + start_vpn
    layout = Layout(start_vpn, start_vpn + 3 * PMD_PAGES, vpn.astype(np.uint64),
                    np.zeros(vpn.size, np.uint64), np.zeros(vpn.size, bool), False)  # fmt: skip
    acc = VmaAccumulator(layout.start_vpn, layout.end_vpn, False, collect=True)
    acc.add(layout)
    vma = Vma(BASE, BASE + 3 * PMD_SIZE, "rw-p", 0, "00:00", 0, "[heap]")
    c = Candidate.from_metrics(Target("db", priority=3), 7, 1234, vma, acc.finish())
    assert c.regions.tolist() == [BASE, BASE + PMD_SIZE]
    assert c.present.tolist() == [512, 10]
    assert (c.target, c.priority, c.mode, c.key) == ("db", 3, "enforce", (7, 1234))
    s = Scheduler(roomy(chunk_bytes=4 * MiB))
    s.plan([c], now=0.0)
    (r,) = s.queued()
    assert r.ranges == ((BASE, BASE + 2 * PMD_SIZE),) and r.benefit == pytest.approx(8 * 522 / 1024)
