"""Gentle and persistent, the pure parts on a fake clock: pacing arithmetic and the
scheduler's rests, ranking by hotness and urgency, the hot/cold split of pending work,
regression detection, fork bookkeeping, hotness from DAMON ranges or Referenced, and the
access windows' rules."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from memdefragd.backends.sim.backend import SimBackend
from memdefragd.backends.sim.machine import Machine
from memdefragd.model import PAGE_SIZE, PMD_PAGES, PMD_SIZE, Outcome, Request
from memdefragd.pipeline.discover import Changes
from memdefragd.pipeline.plan.access import (
    FIRST_WINDOW,
    Windows,
    by_vma,
    hotness_from_ranges,
    hotness_from_referenced,
    sampled_regions,
)
from memdefragd.pipeline.plan.pacing import Pacer, pace_delay
from memdefragd.pipeline.plan.regress import Forked, Forks, HugeMemory, split_again
from memdefragd.pipeline.plan.scheduler import (
    URGENT_BOOST,
    Candidate,
    Scheduler,
    SchedulerSettings,
    benefit_per_byte,
    heat_of,
)
from memdefragd.pipeline.scan import scan_process

GiB = 1 << 30
BASE = GiB


def cand(target="a", pid=1, present=(512,), hotness=None, urgent=None, priority=0):
    present = np.asarray(present)
    regions = BASE + np.arange(present.size, dtype=np.uint64) * PMD_SIZE
    return Candidate(
        target=target, priority=priority, mode="enforce", pid=pid, start_time=100,
        vma_start=BASE, vma_end=BASE + present.size * PMD_SIZE, regions=regions,
        present=present, hotness=hotness, urgent=urgent,
    )  # fmt: skip


def settings(**kw) -> SchedulerSettings:
    base = dict(bytes_per_second=1 << 40, cpu_share=1.0, chunk_bytes=64 << 20)
    return SchedulerSettings(**{**base, **kw})


def done(r: Request, duration: float) -> Outcome:
    return Outcome(r, r.bytes, r.bytes, MappingProxyType({}), duration)


def slots(requests) -> list[int]:
    return [(r.ranges[0][0] - BASE) // PMD_SIZE for r in requests]


# ------------------------------------------------------------------------------ pacing


@pytest.mark.parametrize(
    ("duration", "duty", "cap", "rest"),
    [
        (0.001, 0.05, 1.0, 0.019),  # 1 ms of work, 19 ms of rest: 5% of wall time
        (0.010, 0.05, 1.0, 0.190),
        (0.010, 0.5, 1.0, 0.010),
        (0.200, 0.05, 1.0, 1.0),  # bounded: one slow call does not park a target for long
        (0.010, 1.0, 1.0, 0.0),  # duty 100%: back to back
        (0.0, 0.05, 1.0, 0.0),  # nothing ran (cancelled before the first call)
    ],
)
def test_pace_delay(duration, duty, cap, rest):
    assert pace_delay(duration, duty, cap) == pytest.approx(rest)


def test_pace_delay_gives_the_duty_cycle():
    for t in (0.0005, 0.003, 0.014):
        rest = pace_delay(t, 0.05, 10.0)
        assert t / (t + rest) == pytest.approx(0.05)


@pytest.mark.parametrize("duty", [0.0, -0.1, 1.5])
def test_pace_delay_refuses_nonsense(duty):
    with pytest.raises(ValueError):
        pace_delay(0.001, duty, 1.0)


def test_pacer_adapts_to_each_call_and_keeps_totals():
    p = Pacer(max_pause=1.0)
    assert p.record("db", 0.001, 0.05, now=10.0) == pytest.approx(0.019)
    assert p.resting("db", 10.01) and not p.resting("db", 10.02)
    assert p.record("db", 0.010, 0.05, now=11.0) == pytest.approx(0.19)  # slower now: longer
    pace = p.paces["db"]
    assert (pace.calls, pace.busy, pace.paused) == (2, pytest.approx(0.011), pytest.approx(0.209))
    assert pace.smoothed == pytest.approx(0.8 * 0.001 + 0.2 * 0.010)
    assert not p.resting("other", 0.0)


def test_a_paced_target_gets_one_region_per_request_and_rests_between():
    s = Scheduler(settings(duty_by_target={"db": 0.05}))
    s.plan([cand("db", present=[512] * 3)], now=0.0)
    assert [r.bytes for r in s.queued()] == [PMD_SIZE] * 3
    r = s.next_request(0.0)
    s.record(done(r, 0.002), now=0.002)
    assert s.next_request(0.010) is None and s.why_idle == "pacing"
    assert s.next_ready(0.010) == pytest.approx(0.002 + 0.038)  # 2 ms * 0.95 / 0.05
    assert s.next_request(0.040) is not None
    assert s.snapshot(0.040).pacing_until == {}


def test_pacing_is_per_target_and_others_go_meanwhile():
    s = Scheduler(settings(duty_by_target={"db": 0.05, "batch": None}, chunk_bytes=4 << 20))
    s.plan([cand("db", 1, present=[512] * 2), cand("batch", 2, present=[400] * 4)], now=0.0)
    first = s.next_request(0.0)
    assert first.target == "db"  # fuller regions first
    s.record(done(first, 0.01), now=0.01)
    got = [s.next_request(0.02), s.next_request(0.03)]  # (the byte bucket holds one chunk)
    assert [r.target for r in got] == ["batch", "batch"]  # db rests, batch is not paced
    assert got[0].bytes == 4 << 20
    assert s.next_request(0.04) is None and s.why_idle == "pacing"


def test_the_rest_after_a_request_is_known_only_for_paced_targets():
    s = Scheduler(settings(duty_by_target={"db": 0.05, "batch": None}))
    assert (s.rest("db"), s.rest("batch")) == (0.0, None)  # paced, nothing recorded yet
    s.plan([cand("db", present=[512] * 2)], now=0.0)
    s.record(done(s.next_request(0.0), 0.002), now=0.002)
    assert s.rest("db") == pytest.approx(0.038)  # 2 ms * 0.95 / 0.05
    assert s.rest("batch") is None


def test_paced_targets_still_obey_the_byte_budget():
    s = Scheduler(settings(duty_cycle=1.0, bytes_per_second=PMD_SIZE, chunk_bytes=PMD_SIZE))
    s.plan([cand(present=[512] * 3)], now=0.0)
    assert s.next_request(0.0) is not None
    assert s.next_request(0.0) is None and s.why_idle == "budget: bytes"
    assert s.next_ready(0.0) == pytest.approx(1.0)  # one region's worth of tokens


def test_duty_cycle_setting_refuses_nonsense():
    with pytest.raises(ValueError):
        SchedulerSettings(duty_cycle=0.0)
    with pytest.raises(ValueError):
        SchedulerSettings(duty_by_target={"a": 2.0})


# ------------------------------------------------------------------------------ priority


def test_hotter_regions_go_first_across_processes():
    s = Scheduler(settings(duty_cycle=0.05))
    s.plan([cand("a", 1, present=[512] * 2, hotness=[0.1, 0.9]), cand("a", 2, hotness=[0.5])], 0.0)
    order = [(r.pid, slots([r])[0]) for r in s.queued()]
    assert order == [(1, 1), (2, 0), (1, 0)]


def test_untouched_regions_are_skipped_or_queued_last():
    c = cand(present=[512] * 3, hotness=[0.0, 0.2, 0.0])
    skip = Scheduler(settings(duty_cycle=0.05))
    skip.plan([c], 0.0)
    assert slots(skip.queued()) == [1]
    assert skip.snapshot(0.0).untouched == {"a": 2 * PMD_SIZE}
    last = Scheduler(settings(duty_cycle=0.05, collapse_untouched=True))
    last.plan([c], 0.0)
    assert slots(last.queued()) == [1, 0, 2]


def test_urgent_regions_outrank_fresh_ones_of_the_same_target():
    c = cand(present=[512, 300], hotness=[1.0, 0.5], urgent=[False, True])
    gain = benefit_per_byte(c.present, 0, c.hotness, c.urgent)
    assert gain[1] == pytest.approx(URGENT_BOOST * 0.5 * 300 / 512)
    s = Scheduler(settings(duty_cycle=0.05))
    s.plan([c], 0.0)
    assert slots(s.queued()) == [1, 0]
    with pytest.raises(ValueError):
        cand(present=[512, 512], urgent=[True])


def test_pending_work_is_split_hot_cold_and_drains():
    s = Scheduler(settings(duty_cycle=1.0))
    s.plan([cand("db", present=[512] * 4, hotness=[0.9, 0.6, 0.1, 0.3])], 0.0)
    assert s.snapshot(0.0).pending == {("db", "hot"): 2 * PMD_SIZE, ("db", "cold"): 2 * PMD_SIZE}
    r = s.next_request(0.0)
    s.record(done(r, 0.001), 0.001)
    assert s.snapshot(0.001).pending == {("db", "hot"): PMD_SIZE, ("db", "cold"): 2 * PMD_SIZE}
    s.forget(1)
    assert s.snapshot(0.002).pending == {}
    assert [heat_of(h) for h in (None, 0.0, 0.2, 0.5)] == ["unknown", "untouched", "cold", "hot"]


# ------------------------------------------------------------------------------ regressions


def regions(*slots_: int) -> np.ndarray:
    return BASE + np.asarray(slots_, dtype=np.uint64) * np.uint64(PMD_SIZE)


def test_regions_huge_before_and_collapsible_now_are_regressions():
    m = HugeMemory()
    assert not m.scanned(7, regions(0, 1, 2), regions(3)).any()  # first scan: nothing known
    split = m.scanned(7, regions(2), regions(0, 1, 3))  # 0 and 1 were split
    assert split.tolist() == [True, True, False]
    assert m.scanned(7, regions(2), regions(0, 1, 3)).tolist() == [True, True, False]  # still
    m.made_huge(7, regions(0, 1))
    # 1 was unmapped meanwhile (neither huge nor collapsible): forgotten, no false alarm later
    assert m.scanned(7, regions(0, 2), regions(3)).tolist() == [False]
    assert m.scanned(7, regions(0, 2), regions(1, 3)).tolist() == [False, False]
    m.forget(7)
    assert 7 not in m


def test_fork_holds_parent_and_child_then_times_the_restore():
    f = Forks(grace=60.0)
    f.fork(parent=10, child=11, target="db", now=100.0, coverage=0.98)
    assert f.held(10, 100.5) and f.held(11, 100.5) and not f.held(12, 100.5)
    assert f.forking(10)
    assert f.exited(11, now=103.0) == 10
    assert not f.held(10, 103.0)
    assert f.restored(10, 0.50, now=104.0) is None  # 0.5 < 0.9 * 0.98
    assert f.restored(10, 0.90, now=105.5) == ("db", pytest.approx(2.5))
    assert f.restored(10, 0.99, now=106.0) is None  # booked once
    assert f.exited(99, now=106.0) is None  # not a fork child we know


def test_fork_grace_execs_and_orphans():
    f = Forks(grace=60.0)
    f.fork(10, 11, "db", 0.0, 0.9)
    assert not f.held(10, 61.0) and not f.held(11, 61.0)  # a long-lived worker, not a snapshot
    f.fork(10, 12, "db", 70.0, 0.9)
    f.execd(12)  # a new program shares nothing
    assert not f.held(10, 71.0) and f.exited(12, 72.0) is None
    f.fork(10, 13, "db", 80.0, 0.9)
    f.forget(10)  # the parent exited
    assert not f.held(13, 81.0) and f.exited(13, 82.0) is None
    f.fork(20, 21, "db", 0.0, None)  # no coverage before the fork: nothing to restore
    assert f.exited(21, 1.0) == 20 and 20 not in f.restoring


def test_a_scan_shows_what_was_split_again_and_why():
    m, f = HugeMemory(), Forks()
    none = np.zeros(0, np.uint64)
    first = split_again(m, f, 7, regions(0, 1, 2), regions(3), none)
    assert (first.urgent.size, first.new, first.cause) == (0, 0, "drop")
    s = split_again(m, f, 7, regions(2), regions(0, 1, 3), none)  # coverage fell: 0 and 1
    assert (s.urgent.tolist(), s.new, s.cause) == (regions(0, 1).tolist(), 2, "drop")
    again = split_again(m, f, 7, regions(2), regions(0, 1, 3), s.urgent)  # nothing new
    assert (again.urgent.tolist(), again.new) == (regions(0, 1).tolist(), 0)
    f.fork(7, 8, "db", now=0.0, coverage=0.9)
    assert split_again(m, f, 7, regions(2), regions(0, 1, 3), none).cause == "fork"


def test_a_fork_that_split_nothing_has_nothing_to_restore():
    m, f = HugeMemory(), Forks()
    none = np.zeros(0, np.uint64)
    split_again(m, f, 7, regions(0, 1), none, none)
    f.fork(7, 8, "db", now=0.0, coverage=1.0)
    assert f.exited(8, now=1.0) == 7 and 7 in f.restoring
    s = split_again(m, f, 7, regions(0, 1), none, none)  # all still huge
    assert (s.urgent.size, s.new, s.cause) == (0, 0, "fork") and 7 not in f.restoring
    f.fork(7, 9, "db", now=2.0, coverage=1.0)
    f.exited(9, now=3.0)
    s = split_again(m, f, 7, regions(1), regions(0), none)  # one split: its restore is timed
    assert (s.new, s.cause) == (1, "fork") and 7 in f.restoring


def test_forks_take_in_what_discovery_saw():
    f = Forks(grace=60.0)
    targets = {10: "db", 20: "db"}  # tracked parents; 30 is not
    cov = {10: 0.8}
    forked, rescan = f.seen(Changes(forked={11: 10, 21: 20, 31: 30}), 100.0, targets.get, cov.get)
    assert forked == [Forked(10, 11, "db", 0.8), Forked(20, 21, "db", None)]
    assert rescan == [] and f.held(10, 100.5) and not f.held(30, 100.5)
    forked, rescan = f.seen(
        Changes(execd=frozenset({21}), fork_exited={11: 10, 31: 30}), 103.0, targets.get, cov.get
    )
    assert forked == [] and rescan == [(10, 11)]  # 31 was never taken in
    assert not f.held(20, 103.0)  # 21 exec'd: it shares nothing with 20 any more
    assert f.restored(10, 0.8, now=104.0) == ("db", pytest.approx(1.0))
    f.fork(20, 22, "db", 104.0, 0.5)
    del targets[20]  # the parent is no longer tracked: nothing to re-scan
    assert f.seen(Changes(fork_exited={22: 20}), 105.0, targets.get, cov.get) == ([], [])
    assert 22 not in f.children


# ------------------------------------------------------------------------------ access


def test_hotness_from_damon_ranges_is_overlap_weighted():
    r = regions(0, 1, 2, 3)
    starts = np.array([BASE, BASE + PMD_SIZE + PMD_SIZE // 2, BASE + 3 * PMD_SIZE])
    ends = np.array([BASE + PMD_SIZE, BASE + 3 * PMD_SIZE, BASE + 3 * PMD_SIZE + PMD_SIZE // 4])
    freq = np.array([1.0, 0.5, 0.8])
    # region 1: its second half at 0.5; region 2: all at 0.5; region 3: a quarter at 0.8
    assert hotness_from_ranges(r, starts, ends, freq).tolist() == pytest.approx(
        [1.0, 0.25, 0.5, 0.2]
    )
    assert hotness_from_ranges(r, [], [], []).tolist() == [0, 0, 0, 0]


def test_hotness_from_referenced():
    assert hotness_from_referenced(512 << 10, 2048 << 10) == 0.25
    assert hotness_from_referenced(5, 0) is None
    assert hotness_from_referenced(10, 5) == 1.0


def test_access_windows():
    w = Windows(scan_interval=30.0)
    assert (w.first, w.patience) == (FIRST_WINDOW, 3 * FIRST_WINDOW + 30.0)
    assert not w.given_up(100.0, 100.0 + w.patience) and w.given_up(100.0, 100.1 + w.patience)
    quick = Windows(scan_interval=2.0)  # a scan interval shorter than the first window
    assert (quick.first, quick.patience) == (2.0, 8.0)
    slow = Windows(scan_interval=2.0, settle=10.0)  # a sampler that takes 10 s to learn
    assert slow.patience == 12.0


def test_a_sampler_is_asked_about_collapsible_regions_and_answers_by_vma():
    m = Machine(8192)
    p = m.add_process("app")
    a, b = m.mmap(p.pid, 2 * PMD_PAGES), m.mmap(p.pid, PMD_PAGES)
    m.fault_at(p.pid, np.arange(a.start_vpn, a.end_vpn), np.arange(1024, 1024 + 2 * 512) * 2)
    m.fault_at(p.pid, np.arange(b.start_vpn, b.end_vpn), np.arange(512, 1024))
    assert m.promote(p.pid, b.start_vpn)  # b: one THP, nothing to collapse
    backend = SimBackend(m)
    rep = scan_process(backend, backend.process(p.pid), collect=True)
    pairs = sampled_regions(rep)
    a0, b0 = a.start_vpn * PAGE_SIZE, b.start_vpn * PAGE_SIZE
    assert [(v.start, r.tolist()) for v, r in pairs] == [(a0, [a0, a0 + PMD_SIZE]), (b0, [])]
    hot = [np.array([0.5, 0.0]), np.zeros(0)]
    got = by_vma(pairs, hot)
    assert {k: v.tolist() for k, v in got.items()} == {a0: [0.5, 0.0], b0: []}
    with pytest.raises(ValueError):
        by_vma(pairs, hot[:1])  # one answer per VMA asked about


# ------------------------------------------------------------------------------ config


def test_duty_cycles_from_the_config():
    from memdefragd.config import parse_config, scheduler_settings

    cfg = parse_config(
        "daemon: {pacing: {duty_cycle: 10%}}\n"
        "targets:\n"
        "  - {name: plain}\n"
        "  - {name: strict, overrides: {duty_cycle: 1%}}\n"
        "  - {name: batch, overrides: {latency_sensitive: false}}\n"
    )
    s = scheduler_settings(cfg)
    assert [s.duty_for(t) for t in ("plain", "strict", "batch")] == [0.1, 0.01, None]
    assert s.chunk_for("plain") == PMD_SIZE and s.chunk_for("batch") == 64 << 20
    off = scheduler_settings(parse_config(
        "daemon: {pacing: {latency_sensitive: false}}\n"
        "targets: [{name: a}, {name: b, overrides: {duty_cycle: 3%}}]\n"
    ))  # fmt: skip
    assert (off.duty_for("a"), off.duty_for("b")) == (None, 0.03)
