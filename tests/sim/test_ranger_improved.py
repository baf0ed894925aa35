"""The improved Translation Ranger: obstacle-aware anchors, one range tree for all
processes, fewest pages moved, relocation when a destination becomes blocked."""

from __future__ import annotations

import numpy as np

from memdefragd.backends.sim.machine import HEAD, UNMOVABLE
from memdefragd.backends.sim.ranger import RangerState, defrag
from memdefragd.backends.sim.ranger_plan import RangeTree

from .test_ranger_faithful import SMALL, V, build, frame_of, mapped, runs


def test_it_avoids_a_range_full_of_unmovable_pages():
    def machine():
        m = build()
        # An unmovable page every 64 frames in the first half (the last at 8128), the
        # VMA's 2048 pages reversed on 12288..14335.
        m.alloc_at(np.arange(0, 8192, 64), UNMOVABLE)
        return m, mapped(m, 2048, np.arange(2048), 14335 - np.arange(2048))

    m, a = machine()
    faithful = defrag(m, a, knobs=SMALL, tree=RangerState())
    # The RFC anchors at the zone start and stops at the 32 unmovable pages there.
    assert faithful.failures == {"dst_non_moveable_failed": 32}
    assert len(runs(m, a)) > 32

    m, a = machine()
    r = defrag(m, a, knobs=SMALL, improved=True, tree=RangerState())
    # The only clean gap big enough is 8129..16383; its first frame congruent with V
    # is 8192 (no page is already in place, so the window with most free frames).
    assert r.anchors == {(a, V): 8192} and r.segments == [(a, V, V + 2048, 8192)]
    assert r.failures == {} and r.hard_stops == 0
    assert runs(m, a) == [2048] and r.promoted == 4
    m.check()


def test_two_processes_never_share_frames_and_do_not_undo_each_other():
    m = build()
    a = mapped(m, 1024, np.arange(1024), 4095 - np.arange(1024), comm="a")
    b = mapped(m, 1024, np.arange(1024), 8191 - np.arange(1024), comm="b")
    st = RangerState()
    ra = defrag(m, a, knobs=SMALL, improved=True, tree=st)
    rb = defrag(m, b, knobs=SMALL, improved=True, tree=st)
    (_, _, _, pa), (_, _, _, pb) = ra.segments[0], rb.segments[0]
    assert abs(pa - pb) >= 1024  # disjoint frame ranges, though the VMAs share vpns
    assert runs(m, a) == [1024] and runs(m, b) == [1024]
    # b never touched a's frames: a second pass over a has nothing to do.
    again = defrag(m, a, knobs=SMALL, improved=True, tree=st)
    assert again.pages_migrated == again.pages_exchanged == 0 and again.aligned == 1024
    # Every reserved range belongs to one VMA and none overlap.
    t = st.tree
    assert (t.lo[1:] >= t.hi[:-1]).all()
    assert set(zip(t.pid.tolist(), t.vma.tolist(), strict=True)) == {(a, V), (b, V)}


def test_the_anchor_is_where_most_pages_already_are():
    m = build()
    # Chunks 1..3 already sit contiguously and congruently on 10752..12287 (page i on
    # 10240 + i); chunk 0 is scattered. Memory is otherwise clean.
    p = m.add_process("t")
    m.mmap(p.pid, 2048, start_vpn=V)
    m.fault_at(p.pid, V + np.arange(512, 2048), 10240 + np.arange(512, 2048))
    m.fault_at(p.pid, V + np.arange(512), 4095 - np.arange(512))
    r = defrag(m, p.pid, knobs=SMALL, improved=True, tree=RangerState())
    # The anchor implied by 1536 present pages is 10240: only chunk 0 moves (into free
    # frames 10240..10751). The RFC would have moved all 2048 to the zone start.
    assert r.anchors == {(p.pid, V): 10240}
    assert (r.pages_migrated, r.pages_exchanged, r.aligned) == (512, 0, 1536)
    assert runs(m, p.pid) == [2048] and r.promoted == 4


def test_a_destination_blocked_after_planning_is_relocated():
    m = build()
    a = mapped(m, 2048, np.arange(2048), 14335 - np.arange(2048))
    st = RangerState()
    first = defrag(m, a, knobs=SMALL, improved=True, tree=st, ranges=[(V, V + 512)])
    (_, lo, hi, pfn) = first.segments[0]
    assert (lo, hi) == (V, V + 2048)  # the whole VMA is planned, chunk 0 moved
    # The kernel then takes a frame in chunk 2's planned destination.
    blocked = pfn + 1024 + 100
    m.alloc_at(np.array([blocked]), UNMOVABLE)
    r = defrag(m, a, knobs=SMALL, improved=True, tree=st)
    assert r.failures == {} and r.hard_stops == 0
    assert m.kind[blocked] == UNMOVABLE  # still there: the pages went elsewhere
    # Chunks 0 and 1 stay where they were; from vpn V+1124 on, a new segment.
    assert frame_of(m, a, V + 1023) == pfn + 1023
    assert len(r.segments) >= 2 and r.segments[0][1:] == (V, V + 1124, pfn)
    assert all(k == 1 for k in runs(m, a)[:0]) and sum(runs(m, a)) == 2048
    m.check()


def test_thps_in_the_way_are_split_at_any_page_and_the_source_thp_is_kept_whole():
    m = build()
    other = m.add_process("other")
    m.mmap(other.pid, 512, start_vpn=V)
    m.fault_at(other.pid, V + np.arange(512), np.arange(512))
    assert m.promote(other.pid, V)
    a = mapped(m, 1024, np.arange(1024), 16383 - np.arange(1024))
    r = defrag(m, a, knobs=SMALL, improved=True, tree=RangerState())
    assert r.failures == {} and runs(m, a) == [1024]
    assert m.compound[r.segments[0][3]] == HEAD


def test_range_tree_refuses_overlaps():
    t = RangeTree()
    t.add((1, V), np.array([V]), np.array([100]), np.array([200]))
    t.add((2, V), np.array([V]), np.array([200]), np.array([300]))
    try:
        t.add((3, V), np.array([V]), np.array([250]), np.array([260]))
    except ValueError as e:
        assert "overlap" in str(e)
    else:
        raise AssertionError("an overlapping range was accepted")
    assert len(t) == 2 and t.covered(400)[[99, 100, 299, 300]].tolist() == [0, 1, 1, 0]
