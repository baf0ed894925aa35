"""Translation Ranger as in its RFC, on small machines built by hand.

Each expected figure is worked out in the comments from RFC04's algorithm: anchors
packed from the zone start (pfn congruent with vpn modulo 512), dest = anchor_pfn + (vpn
- anchor_vpn), migrate into free frames, exchange with anon/page-cache frames, hard stops
on everything else, promotion of a clean whole chunk. Machines are one Normal zone of
16384 frames (64 MiB); VMAs start at MMAP_BASE_VPN, which is 512-aligned.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from memdefragd.backends.sim.machine import (
    CACHE,
    HEAD,
    MMAP_BASE_VPN,
    NONLRU,
    TAIL,
    UNMOVABLE,
    Machine,
)
from memdefragd.backends.sim.ranger import (
    RFC04_KERNEL,
    Anchor,
    Knobs,
    RangerState,
    clamp,
    congruent,
    defrag,
    undefragged_area,
)
from memdefragd.pipeline.score import run_lengths

V = MMAP_BASE_VPN  # 0x7f000000: a multiple of 512
SMALL = Knobs(defrag_size_threshold=1)  # VMAs from 2 MiB (the RFC's default is 10 MiB)
RFC04 = replace(RFC04_KERNEL, defrag_size_threshold=1)


def build(nframes: int = 16384) -> Machine:
    return Machine(nframes)


def mapped(m: Machine, pages: int, offsets, pfns, *, start: int = V, comm: str = "t") -> int:
    """A process with one VMA of `pages` pages at `start`, page start+offsets[i] on pfns[i]."""
    p = m.add_process(comm)
    m.mmap(p.pid, pages, start_vpn=start)
    m.fault_at(p.pid, start + np.asarray(offsets, np.int64), np.asarray(pfns, np.int64))
    return p.pid


def thp_at(m: Machine, pid: int, vpn: int, pfn: int) -> None:
    """A THP of `pid` at vpn on the 512 frames from pfn (both 512-aligned)."""
    m.fault_at(pid, vpn + np.arange(512), pfn + np.arange(512))
    assert m.promote(pid, vpn)


def one_thp(m: Machine) -> int:
    """A process whose one 512-page VMA at V is a THP on frames 4096..4607."""
    p = m.add_process("t")
    m.mmap(p.pid, 512, start_vpn=V)
    thp_at(m, p.pid, V, 4096)
    return p.pid


def cache_thp(m: Machine, head: int) -> None:
    """Turn the page-cache frames head..head+511 into one THP (as seeding does)."""
    m.compound[head : head + 512] = TAIL
    m.compound[head] = HEAD


def runs(m: Machine, pid: int) -> list[int]:
    v = m.processes[pid].vmas[0]
    idx = np.flatnonzero(v.pfn >= 0)
    return run_lengths(v.start_vpn + idx, v.pfn[idx]).tolist()


def frame_of(m: Machine, pid: int, vpn: int) -> int:
    return int(m.processes[pid].vma_at(vpn).pfn[vpn - m.processes[pid].vma_at(vpn).start_vpn])


# ---------------------------------------------------------------- anchors (pure)


def test_congruent_raises_the_pfn_to_the_vpns_offset_in_the_unit():
    # vpn offset 5 in its 512-unit; pfn 1000 has offset 488 > 5, so go to the next unit:
    # 1024 + 5 = 1029. pfn 1030 has offset 6 > 5 too: 1536 + 5 = 1541 is wrong, it is
    # 1030 -> 1030 + 512 = 1542 -> 1542 - 6 + 5 = 1541. pfn 1027 (offset 3 < 5): 1029.
    assert congruent(1000, 5, 512) == 1029
    assert congruent(1030, 5, 512) == 1541
    assert congruent(1027, 5, 512) == 1029
    assert congruent(1029, 5, 512) == 1029
    assert congruent(1000, 5, 1) == 1000  # VMAs under 2 MiB are not aligned
    assert congruent(0, 3 + (1 << 18), 1 << 18) == 3  # 1 GiB VMAs: modulo 2^18


def test_clamp_steps_back_into_the_zone_and_the_quirk_steps_by_bytes_over_twelve():
    # 16384 is the zone end: one 512 step back gives 15872.
    assert clamp(16384, 0, 16384, 512) == 15872
    # The bug's step is 2 MiB / 12 = 174762 frames: 16384 - 174762 < 0, and adding it
    # back lands on 16384 again, outside the zone (the loops are not nested).
    assert clamp(16384, 0, 16384, 512, shift_bug=True) == 16384
    assert clamp(100, 0, 16384, 512, shift_bug=True) == 100  # inside: untouched


def _anchor(start: int, pages: int, pfn: int) -> Anchor:
    return Anchor(start, start + pages, start, pfn, 0)


def test_undefragged_area_packs_in_virtual_order_and_the_units_quirk_misses_gaps():
    # No anchor yet: the zone start.
    assert undefragged_area(0, {}, 1024) == 0
    # One VMA of 1024 pages anchored at 8000: a 1024-page VMA fits before it
    # (0 + 1024 < 8000), so the zone start. With the units bug the check is
    # 0 + 1024 * 4096 < 8000, false: it goes after the last one, at 8000 + 1024.
    one = {V: _anchor(V, 1024, 8000)}
    assert undefragged_area(0, dict(one), 1024) == 0
    assert undefragged_area(0, dict(one), 1024, units_bug=True) == 9024
    # Two VMAs at 0 and 5000 (1024 pages each): the gap 1024..5000 takes a 2048-page
    # VMA (1024 + 2048 < 5000) but, with the bug, only the end of the last: 6024.
    two = {V: _anchor(V, 1024, 0), V + 4096: _anchor(V + 4096, 1024, 5000)}
    assert undefragged_area(0, dict(two), 2048) == 1024
    assert undefragged_area(0, dict(two), 2048, units_bug=True) == 6024


def test_a_vma_more_than_twice_the_first_anchored_evicts_its_anchor():
    # RFC04: the first anchored VMA (512 pages at 0) is evicted by a 2048-page VMA, and
    # the walk goes on without it: after the next one, 600 + 512 = 1112.
    anchors = {V: _anchor(V, 512, 0), V + 2048: _anchor(V + 2048, 512, 600)}
    assert undefragged_area(0, anchors, 2048) == 1112
    assert V not in anchors


# ---------------------------------------------------------------- moves, hand-worked


def test_migrate_exchange_and_hard_stops_on_a_two_chunk_vma():
    m = build()
    # The VMA's 1024 pages sit reversed on frames 8192..9215 (page i on 9215 - i).
    a = mapped(m, 1024, np.arange(1024), 9215 - np.arange(1024))
    # Anchor: zone start 0, already congruent with V. Destination of page i: frame i.
    # In the way: page cache on frame 5 and another process's page on frame 10 (both
    # exchanged), an unmovable page on 600 and a non-LRU page on 700 (hard stops).
    m.alloc_at(np.array([5]), CACHE)
    b = mapped(m, 16, [3], [10], start=V, comm="other")
    m.alloc_at(np.array([600]), UNMOVABLE)
    m.alloc_at(np.array([700]), NONLRU)
    cache_token, b_token = int(m.token[5]), int(m.token[10])
    before = m.snapshot()

    r = defrag(m, a, knobs=SMALL, tree=RangerState())

    assert r.anchors == {(a, V): 0}
    # Chunk 0: 510 migrations, 2 exchanges, no failure -> promoted.
    # Chunk 1: 510 migrations, 2 hard stops -> not promoted.
    assert (r.pages_migrated, r.pages_exchanged, r.promoted) == (1020, 2, 1)
    assert r.failures == {"dst_non_lru_failed": 1, "dst_non_moveable_failed": 1}
    assert r.hard_stops == 2 and r.chunks == 2 and r.aligned == 0
    assert r.bytes_copied == 1020 * 4096 + 2 * 8192
    # The exchanged page cache and the other process's page took the old frames of
    # pages 5 and 10: 9210 and 9205.
    assert m.token[9210] == cache_token and m.kind[9210] == CACHE
    assert m.token[9205] == b_token and frame_of(m, b, V + 3) == 9205
    # Blocked pages stay where they were; their neighbours go on at the same offset.
    assert frame_of(m, a, V + 600) == 9215 - 600
    assert frame_of(m, a, V + 700) == 9215 - 700
    assert runs(m, a) == [600, 1, 99, 1, 323]
    assert m.compound[0] == HEAD and m.compound[512] == 0
    assert m.snapshot() == before
    m.check()


def test_a_second_call_finds_everything_in_place_and_keeps_the_anchor():
    m = build()
    a = mapped(m, 1024, np.arange(1024), 9215 - np.arange(1024))
    st = RangerState()
    defrag(m, a, knobs=SMALL, tree=st)
    r = defrag(m, a, knobs=SMALL, tree=st)
    # Chunk 0 is a THP now (512 aligned, counted whole); chunk 1 was promoted too.
    assert (r.pages_migrated, r.pages_exchanged, r.aligned) == (0, 0, 1024)
    assert r.anchors == {(a, V): 0} and r.failures == {}


def test_an_already_contiguous_aligned_chunk_is_promoted_in_place():
    m = build()
    a = mapped(m, 512, np.arange(512), np.arange(512))  # already on its anchor's frames
    r = defrag(m, a, knobs=SMALL, tree=RangerState())
    assert (r.aligned, r.pages_migrated, r.promoted) == (512, 0, 1)
    assert m.compound[0] == HEAD


def test_a_missing_page_counts_as_a_failure_and_blocks_promotion():
    m = build()
    a = mapped(m, 512, np.arange(1, 512), 4096 + np.arange(1, 512))  # page 0 absent
    r = defrag(m, a, knobs=SMALL, tree=RangerState())
    assert r.pages_migrated == 511 and r.failures == {"src_not_present": 1}
    assert r.promoted == 0 and r.hard_stops == 0  # not a stop, but no THP either


def test_a_thp_source_moves_whole_onto_a_free_aligned_block():
    m = build()
    p = m.add_process("t")
    m.mmap(p.pid, 1024, start_vpn=V)
    m.fault_at(p.pid, V + np.arange(512), 8191 - np.arange(512))  # chunk 0: base, reversed
    thp_at(m, p.pid, V + 512, 4096)  # chunk 1: a THP on 4096..4607
    r = defrag(m, p.pid, knobs=SMALL, tree=RangerState())
    # Chunk 1's destination 512..1023 is one free order-9 block: the THP migrates whole
    # (512 pages, still a THP, not "promoted"); chunk 0 migrates page by page and is
    # promoted.
    assert (r.pages_migrated, r.thp_moved, r.promoted, r.thp_split) == (1024, 1, 1, 0)
    assert m.compound[512] == HEAD and m.compound[0] == HEAD
    assert runs(m, p.pid) == [1024]


def test_a_thp_source_over_used_frames_is_split_and_moved_page_by_page():
    m = build()
    pid = one_thp(m)
    m.alloc_at(np.array([7]), CACHE)  # destination block 0..511 is not wholly free
    r = defrag(m, pid, knobs=SMALL, tree=RangerState())
    # RFC05: free destination in a block below order 9 -> split the source, restart:
    # 511 migrations and one exchange (frame 7), then the clean chunk is promoted.
    assert (r.thp_split, r.pages_migrated, r.pages_exchanged, r.promoted) == (1, 511, 1, 1)
    assert m.compound[0] == HEAD


def test_a_thp_destination_met_at_its_head_is_split_and_exchanged():
    m = build()
    other = m.add_process("other")
    m.mmap(other.pid, 512, start_vpn=V)
    thp_at(m, other.pid, V, 0)  # another process's THP on our destination block 0..511
    a = mapped(m, 512, np.arange(512), 8191 - np.arange(512))
    splits = m.stats.thp_split
    r = defrag(m, a, knobs=SMALL, tree=RangerState())
    # Page 0 meets the head: split it (RFC05), then all 512 exchange.
    assert (r.pages_exchanged, r.pages_migrated, r.promoted) == (512, 0, 1)
    assert m.stats.thp_split == splits + 1
    assert runs(m, a) == [512] and m.owner[0] == a


def test_a_thp_destination_met_past_its_head_stops_every_page():
    m = build()
    other = m.add_process("other")
    m.mmap(other.pid, 512, start_vpn=V)
    thp_at(m, other.pid, V, 0)
    a = mapped(m, 512, np.arange(1, 512), 8191 - np.arange(1, 512))  # page 0 absent
    r = defrag(m, a, knobs=SMALL, tree=RangerState())
    # Page 0 is not present (a failure, not a stop), so nobody meets the head: pages
    # 1..511 each hit a tail: dst_pte_thp_failed, a hard stop each. The THP survives.
    assert r.failures == {"dst_pte_thp_failed": 511, "src_not_present": 1}
    assert r.hard_stops == 511 and r.pages_migrated == r.pages_exchanged == 0
    assert m.compound[0] == HEAD and m.owner[0] == other.pid


def test_vmas_of_one_process_are_packed_back_to_back():
    m = build()
    p = m.add_process("t")
    m.mmap(p.pid, 1024, start_vpn=V)
    m.mmap(p.pid, 1024, start_vpn=V + 4096)
    m.fault_at(p.pid, V + np.arange(4), 12000 + np.arange(4))
    m.fault_at(p.pid, V + 4096 + np.arange(4), 13000 + np.arange(4))
    r = defrag(m, p.pid, knobs=SMALL, tree=RangerState())
    # First VMA at the zone start, the second right after its 1024 pages.
    assert r.anchors == {(p.pid, V): 0, (p.pid, V + 4096): 1024}
    assert frame_of(m, p.pid, V + 4096 + 3) == 1027


def test_the_clamp_quirk_sends_a_vma_out_of_its_zone():
    def run(quirks: frozenset[str]):
        m = build()
        p = m.add_process("t")
        m.mmap(p.pid, 16384, start_vpn=V)  # as big as memory: one page present
        m.mmap(p.pid, 1024, start_vpn=V + 32768)
        m.fault_at(p.pid, np.array([V]), np.array([100]))
        m.fault_at(p.pid, V + 32768 + np.arange(8), 200 + np.arange(8))
        return defrag(m, p.pid, knobs=SMALL, quirks=quirks, tree=RangerState())

    # The second VMA's candidate is 0 + 16384, the zone end. Fixed: one 512 step back
    # to 15872, where its 8 pages migrate. With the quirk: back at 16384, out of bound.
    fixed, quirky = run(frozenset()), run(frozenset({"clamp"}))
    pid = min(p for p, _ in fixed.anchors)
    assert fixed.anchors[(pid, V + 32768)] == 15872
    # (Absent pages of both VMAs count as src_not_present either way.)
    assert "dst_out_of_bound_failed" not in fixed.failures
    assert quirky.anchors[(pid, V + 32768)] == 16384
    assert quirky.failures["dst_out_of_bound_failed"] == 8


def test_small_vmas_are_skipped_by_the_default_size_threshold():
    m = build()
    a = mapped(m, 1024, np.arange(1024), 9215 - np.arange(1024))
    r = defrag(m, a, tree=RangerState())  # default: VMAs under 10 MiB are skipped
    assert r.vmas == 0 and r.pages_migrated == 0


def test_unknown_quirks_and_processes_are_refused():
    m = build()
    with pytest.raises(ValueError, match="quirks"):
        defrag(m, 1, quirks=frozenset({"nope"}))
    from memdefragd.model import ProcessGone

    with pytest.raises(ProcessGone):
        defrag(m, 12345)


def test_two_processes_fight_over_the_same_frames():
    # The RFC keeps VMAs apart only within a process: two processes whose VMAs start at
    # the same vpn get the same anchor (the zone start), so the second one's exchanges
    # push the first one's pages back out to the second one's old frames.
    m = build()
    a = mapped(m, 512, np.arange(512), 4095 - np.arange(512), comm="a")
    b = mapped(m, 512, np.arange(512), 8191 - np.arange(512), comm="b")
    st = RangerState()
    defrag(m, a, knobs=SMALL, tree=st)
    assert runs(m, a) == [512]
    r = defrag(m, b, knobs=SMALL, tree=st)
    assert r.anchors == {(b, V): 0}
    # b's page 0 meets a's new THP at its head: split, then 512 exchanges. a's pages
    # land on b's old, reversed frames: a is back to 512 runs of one page.
    assert (r.pages_exchanged, r.promoted) == (512, 1) and runs(m, b) == [512]
    assert frame_of(m, a, V) == 8191 and runs(m, a) == [1] * 512
    m.check()


# ---------------------------------------------------------------- RFC 04's THP rules


def test_rfc04_a_thp_destination_stops_each_page_that_meets_it():
    # RFC 04 never splits: page 0 meets the other process's THP at its head
    # (dst_thp_src_not), pages 1..511 at its tails (dst_pte_thp), each a hard stop, and
    # the THP stays whole where it was. RFC05 (test above) split it and exchanged.
    m = build()
    other = m.add_process("other")
    m.mmap(other.pid, 512, start_vpn=V)
    thp_at(m, other.pid, V, 0)
    a = mapped(m, 512, np.arange(512), 8191 - np.arange(512))
    r = defrag(m, a, knobs=RFC04, tree=RangerState())
    assert r.failures == {"dst_thp_src_not_failed": 1, "dst_pte_thp_failed": 511}
    assert r.hard_stops == 512 and r.pages_exchanged == r.pages_migrated == r.promoted == 0
    assert m.compound[0] == HEAD and m.owner[0] == other.pid and m.stats.thp_split == 0
    m.check()


def test_rfc04_an_unowned_page_cache_thp_is_met_as_a_process_thp():
    # A THP the machine holds as page cache (how seeding keeps other processes' THPs).
    m = build()
    m.alloc_at(np.arange(512), CACHE)
    cache_thp(m, 0)
    m.check()
    a = mapped(m, 512, np.arange(512), 8191 - np.arange(512))
    r = defrag(m, a, knobs=RFC04, tree=RangerState())
    assert r.failures == {"dst_thp_src_not_failed": 1, "dst_pte_thp_failed": 511}
    assert (m.compound[:512] != 0).all() and (m.kind[:512] == CACHE).all()


def test_rfc04_a_thp_source_moves_only_whole_onto_a_free_block():
    m = build()
    pid = one_thp(m)
    m.alloc_at(np.array([7]), CACHE)  # destination block 0..511 is not wholly free
    r = defrag(m, pid, knobs=RFC04, tree=RangerState())
    # RFC 04: no free order-9 block at the destination is -ENOMEM, a stop; no split.
    assert r.failures == {"dst_isolate_free_failed": 512} and r.thp_split == 0
    assert frame_of(m, pid, V) == 4096 and m.compound[4096] == HEAD
    m.free(np.array([7]))
    r = defrag(m, pid, knobs=RFC04, tree=RangerState())
    assert (r.pages_migrated, r.thp_moved) == (512, 1) and m.compound[0] == HEAD


def test_rfc04_a_thp_source_over_a_base_page_or_a_thp_stops():
    m = build()
    pid = one_thp(m)
    m.alloc_at(np.arange(512), CACHE)  # base page cache on the whole destination
    r = defrag(m, pid, knobs=RFC04, tree=RangerState())
    assert r.failures == {"src_thp_dst_not_failed": 512} and r.pages_exchanged == 0
    cache_thp(m, 0)  # now a page-cache THP there: exchange_pages refuses both
    r = defrag(m, pid, knobs=RFC04, tree=RangerState())
    assert r.failures == {"dst_file_failed": 512} and frame_of(m, pid, V) == 4096
    m.check()


def test_rfc04_promotes_nothing():
    m = build()
    a = mapped(m, 512, np.arange(512), 8191 - np.arange(512))
    r = defrag(m, a, knobs=RFC04, tree=RangerState())
    assert runs(m, a) == [512] and r.promoted == 0 and m.compound[0] == 0
