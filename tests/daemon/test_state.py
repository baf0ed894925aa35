"""One record per tracked process: what a scan resets, what a request books, when its
access figures are due, and what it offers the plan."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from memdefragd.backends.sim.backend import SimBackend
from memdefragd.backends.sim.machine import Machine
from memdefragd.daemon.state import Process
from memdefragd.model import PAGE_SIZE, PMD_PAGES, PMD_SIZE, ProcessInfo, Request
from memdefragd.pipeline.plan.access import Windows
from memdefragd.pipeline.scan import ProcessReport, VmaReport, scan_process
from memdefragd.pipeline.score import rollup
from memdefragd.pipeline.targets import Target


def report(pid: int = 7) -> ProcessReport:
    proc = ProcessInfo(pid, "app", (), "/app", 0, "/", 1, 0)
    return ProcessReport(proc, "t", (), replace(rollup([]), aligned_regions=4, thp_regions=1), 0)


def test_a_request_books_what_it_sent_and_made_huge_until_the_next_scan():
    p = Process()
    assert p.coverage is None  # no scan yet
    p.scanned(report())
    req = Request("t", 7, 1, 0, 8 * PMD_SIZE, ((0, 4 * PMD_SIZE), (6 * PMD_SIZE, 8 * PMD_SIZE)))
    p.sent(req, attempted=5 * PMD_SIZE)  # stopped after five regions
    assert p.tried == {0, PMD_SIZE, 2 * PMD_SIZE, 3 * PMD_SIZE, 6 * PMD_SIZE}
    assert p.made(np.zeros(0, np.uint64)) is None  # nothing urgent to mend
    p.urgent = np.array([0, 6 * PMD_SIZE], dtype=np.uint64)
    assert p.made(np.array([6 * PMD_SIZE, 7 * PMD_SIZE], dtype=np.uint64)) == 1
    np.testing.assert_array_equal(p.urgent, [0])
    assert p.made_huge == 2 and p.coverage == 3 / 4  # the scan's one, and two since
    p.scanned(report())
    assert (p.tried, p.made_huge) == (set(), 0)
    np.testing.assert_array_equal(p.urgent, [0])  # until the scan's regressions say otherwise


def test_access_figures_are_awaited_then_due_then_given_up():
    w = Windows(scan_interval=30.0)  # first window 5 s, patience 45 s
    p = Process()
    assert not p.measured(None, 100.0, w) and p.measure_at == 100.0 + w.first
    assert not p.due(104.0) and p.due(105.0) and not p.due(105.0)  # due once
    assert not p.measured(None, 105.0, w)  # still nothing: due again a window later
    assert (p.measure_at, p.waiting, p.hotness) == (110.0, 100.0, None)
    assert p.due(110.0)
    assert p.measured(None, 145.5, w)  # past patience: worked on without figures (said once)
    assert p.hotness == {} and not p.measured(None, 200.0, w)
    hot = {0: np.array([0.5])}
    assert not p.measured(hot, 201.0, w)
    assert (p.hotness, p.waiting) == (hot, None)
    assert not p.measured(None, 300.0, w) and p.hotness is hot  # keeps its last figures
    assert p.measure_at is None


def test_candidates_wait_for_a_scan_and_for_access_figures_unless_urgent():
    m = Machine(4096)
    sim = m.add_process("app")
    vma = m.mmap(sim.pid, 2 * PMD_PAGES)
    m.fault_at(sim.pid, np.arange(vma.start_vpn, vma.end_vpn), np.arange(512, 1536) * 2)
    backend = SimBackend(m)
    proc = backend.process(sim.pid)
    base = vma.start_vpn * PAGE_SIZE
    p = Process()
    assert p.candidates(Target("t"), proc, measuring=False) == []  # not scanned yet
    p.scanned(scan_process(backend, proc, collect=True))
    (c,) = p.candidates(Target("t"), proc, measuring=False)  # no sampler: no wait
    assert c.regions.tolist() == [base, base + PMD_SIZE] and c.hotness is None
    assert p.candidates(Target("t"), proc, measuring=True) == []  # no collapsing blind
    p.urgent = np.array([base + PMD_SIZE], np.uint64)  # split again: no figures needed
    (c,) = p.candidates(Target("t"), proc, measuring=True)
    assert c.urgent.tolist() == [False, True]
    p.urgent, p.hotness = np.zeros(0, np.uint64), {base: np.array([0.25, 1.0])}
    p.tried.add(base)  # sent since the scan: not offered again
    (c,) = p.candidates(Target("t"), proc, measuring=True)
    assert (c.regions.tolist(), c.hotness.tolist()) == ([base + PMD_SIZE], [1.0])


def test_with_known_flags_takes_smaps_flags_while_maps_lists_the_same_vmas():
    from memdefragd.model import Vma
    from memdefragd.pipeline.scan import vma_key, with_known_flags

    heap = Vma(0x200000, 0x600000, "rw-p", 0, "00:00", 0, "", vmflags=frozenset({"nh"}))
    lib = Vma(0x700000, 0x800000, "r-xp", 0, "08:01", 42, "/lib/x.so", vmflags=frozenset())
    known = {vma_key(v): v for v in (heap, lib)}
    maps = [Vma(v.start, v.end, v.perms, v.offset, v.dev, v.inode, v.path) for v in (heap, lib)]
    got = with_known_flags(maps, known)
    assert got is not None and [v.vmflags for v in got] == [frozenset({"nh"}), frozenset()]
    assert not got[0].collapse_eligible  # the flag smaps gave still decides
    grown = Vma(0x200000, 0x800000, "rw-p", 0, "00:00", 0, "")  # the heap grew: new bounds
    assert with_known_flags([grown, maps[1]], known) is None
    assert with_known_flags([], known) == []


def test_a_settled_unchanged_process_keeps_its_scan_for_a_bounded_number_of_cycles():
    """A full cycle may skip reading a process the plan left nothing to do for, while its
    faults, size and rss stay as they were at its scan; never one without such counts
    (the simulator), and never more than KEEP_CYCLES + pid % KEEP_CYCLES cycles in a row
    (the kernel moves pages without a fault)."""
    from memdefragd.daemon.state import KEEP_CYCLES

    pid = 13
    info = ProcessInfo(pid, "app", (), "/app", 0, "/", 1, 4096, activity=(100, 0, 1 << 30))
    rep = replace(report(pid), proc=info)
    p = Process()
    p.scanned(rep)
    assert not p.keeps(info)  # not settled: the plan has not said it has nothing to do
    p.settled = True
    limit = KEEP_CYCLES + pid % KEEP_CYCLES
    assert [p.keeps(info) for _ in range(limit + 1)] == [True] * limit + [False]
    p.scanned(rep)  # read again: the count starts over, and settling is asked again
    assert (p.kept, p.settled) == (0, False)
    p.settled = True
    assert p.keeps(info)
    assert not p.keeps(replace(info, activity=(101, 0, 1 << 30)))  # a minor fault
    assert not p.keeps(replace(info, activity=(100, 1, 1 << 30)))  # a major fault
    assert not p.keeps(replace(info, activity=(100, 0, 2 << 30)))  # it mapped more
    assert not p.keeps(replace(info, rss=8192))  # it gained or lost pages, no fault
    unknown = replace(info, activity=None)
    p.scanned(replace(rep, proc=unknown))
    p.settled = True
    assert not p.keeps(unknown)


def test_regions_verified_over_the_backends_own_ranges_count_once():
    """Translation Ranger's pass walks whole chunks: its verification finds regions that
    were fine before it, and regions an earlier pass made and that were counted then.
    Only regions collapsible at the scan count, each once, until the next scan."""
    from memdefragd.pipeline.verify import Verified

    m = Machine(4096)
    sim = m.add_process("app")
    vma = m.mmap(sim.pid, 3 * PMD_PAGES)
    # Regions 0 and 1 scattered (every other frame: collapsible); region 2 huge already.
    m.fault_at(sim.pid, np.arange(vma.start_vpn, vma.start_vpn + 2 * PMD_PAGES),
               np.arange(512, 1536) * 2)  # fmt: skip
    m.fault(sim.pid, vma.start_vpn + 2 * PMD_PAGES, vma.end_vpn, thp=True)
    backend = SimBackend(m)
    base = vma.start_vpn * PAGE_SIZE
    regions = np.array([base, base + PMD_SIZE, base + 2 * PMD_SIZE], dtype=np.uint64)
    p = Process()
    none = p.first_verified(Verified(3 * PMD_SIZE, regions))
    assert none.bytes == 0 and none.huge.size == 0  # no scan yet: nothing to compare
    p.scanned(scan_process(backend, backend.process(sim.pid), collect=True))
    first = p.first_verified(Verified(2 * PMD_SIZE, regions[[0, 2]]))
    assert first.bytes == PMD_SIZE and first.huge.tolist() == [base]  # 2 was huge at the scan
    again = p.first_verified(Verified(3 * PMD_SIZE, regions))  # the next pass, same chunk
    assert again.bytes == PMD_SIZE and again.huge.tolist() == [base + PMD_SIZE]
    assert p.first_verified(Verified(3 * PMD_SIZE, regions)).bytes == 0
    p.scanned(scan_process(backend, backend.process(sim.pid), collect=True))
    assert p.booked.size == 0  # a new scan: its own collapsible regions count


def test_a_ranger_pass_that_verified_nothing_new_rests_the_process_doubling():
    """Each Translation Ranger pass walks the whole process: one that made nothing new
    contiguous would do the same again (a window its kernel cannot clear, a VMA it
    skips), so the process rests, 5 s doubling up to the cap; a fruitful pass ends it."""
    p = Process()
    assert not p.resting(0.0)
    assert p.after_pass(0, 100.0, 5.0, 12.0) == 5.0
    assert p.resting(104.9) and not p.resting(105.0)
    assert p.after_pass(0, 105.0, 5.0, 12.0) == 10.0
    assert p.after_pass(0, 115.0, 5.0, 12.0) == 12.0  # capped
    assert p.resting(126.9)
    assert p.after_pass(PMD_SIZE, 127.0, 5.0, 12.0) == 0.0
    assert not p.resting(127.0) and p.futile == 0
    assert p.after_pass(0, 130.0, 5.0, 12.0) == 5.0  # the doubling starts over


def test_the_vmas_a_ranger_pass_worked_in():
    """Where a Translation Ranger pass anchored, by VMA: those of the last scan that the
    backend says it worked in (else the request's ranges), or the request's own VMA."""
    from memdefragd.model import Outcome, Vma

    def vma(start: int, end: int) -> VmaReport:
        return VmaReport(Vma(start, end, "rw-p", 0, "00:00", 0, ""), None)  # type: ignore[arg-type]

    heap, other = 0x7F0000000000, 0x7F0040000000
    p = Process()
    req = Request("t", 7, 1, heap, heap + 4 * PMD_SIZE, ((heap, heap + PMD_SIZE),), "ranger")
    assert p.worked_in(Outcome(req, 0, 0, {}, 0.0)) == {heap}  # no scan yet: its own VMA
    p.scanned(
        replace(report(), vmas=(vma(heap, heap + 4 * PMD_SIZE), vma(other, other + PMD_SIZE)))
    )
    assert p.worked_in(Outcome(req, 0, 0, {}, 0.0)) == {heap}
    both = ((heap + PMD_SIZE, heap + 2 * PMD_SIZE), (other, other + PMD_SIZE))
    assert p.worked_in(Outcome(req, 0, 0, {}, 0.0, touched=both)) == {heap, other}
