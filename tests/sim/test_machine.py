"""The simulated machine's mechanisms, one by one, on small hand-built machines."""

from __future__ import annotations

import numpy as np
import pytest

from memdefragd.backends.sim.machine import (
    ANON,
    CACHE,
    FREE,
    HEAD,
    MMAP_BASE_VPN,
    NONLRU,
    TAIL,
    UNMOVABLE,
    Machine,
    MoveError,
    OutOfMemory,
)
from memdefragd.model import PMD_PAGES


def machine_with(pages: int = 1024, *, thp: bool = True, nframes: int = 4096):
    m = Machine(nframes)
    p = m.add_process("app")
    v = m.mmap(p.pid, pages, thp=thp)
    return m, p.pid, v


def tokens_of(m: Machine, pid: int) -> dict[int, int]:
    return {vpn: tok for (p, vpn), tok in m.snapshot().items() if p == pid}


def test_mmap_places_vmas_2mib_aligned_with_a_gap():
    m, pid, v = machine_with(1000)
    assert v.start_vpn == MMAP_BASE_VPN and v.present == 0
    w = m.mmap(pid, 10)
    assert w.start_vpn == MMAP_BASE_VPN + 1024 + PMD_PAGES
    with pytest.raises(ValueError, match="overlaps"):
        m.mmap(pid, 10, start_vpn=v.start_vpn + 5)


def test_fault_gives_thps_where_a_whole_aligned_region_is_touched():
    m, pid, v = machine_with(1024 + 100)
    m.fault(pid, v.start_vpn, v.end_vpn)
    heads = v.pfn[[0, 512]]
    assert (heads % PMD_PAGES == 0).all()
    assert (m.compound[heads] == HEAD).all() and (m.compound[v.pfn[1:512]] == TAIL).all()
    assert (m.compound[v.pfn[1024:]] == 0).all()  # the tail of the VMA: base pages
    assert m.stats.thp_fault_alloc == 2 and m.stats.pages_faulted == 1124
    m.check()


def test_fault_without_thp_hands_out_ascending_frames():
    m, pid, v = machine_with(600, thp=False)
    m.fault(pid, v.start_vpn, v.end_vpn)
    assert np.array_equal(v.pfn, np.arange(600))
    assert not m.compound.any()


def test_fault_falls_back_to_base_pages_without_a_free_order_9_block():
    m, pid, v = machine_with(512, nframes=2048)
    m.alloc_at(np.arange(100, 2048, 512))  # one kernel page in every pageblock
    m.fault(pid, v.start_vpn, v.end_vpn)
    assert not m.compound.any() and m.stats.thp_fault_fallback == 1
    m.check()


def test_fault_of_a_partly_present_region_adds_base_pages_only():
    m, pid, v = machine_with(512)
    m.fault(pid, v.start_vpn + 10, v.start_vpn + 11)
    m.fault(pid, v.start_vpn, v.end_vpn)
    assert v.present == 512 and not m.compound.any()


def test_fault_outside_a_vma_is_refused():
    m, pid, v = machine_with(512)
    with pytest.raises(ValueError, match="not all mapped"):
        m.fault(pid, v.start_vpn, v.end_vpn + 1)


def test_out_of_memory_takes_nothing():
    m, pid, v = machine_with(2048, nframes=1024)
    with pytest.raises(OutOfMemory):
        m.fault(pid, v.start_vpn, v.end_vpn)
    assert m.nr_free == 1024 and v.present == 0
    m.check()


def test_fault_reclaims_page_cache_oldest_first():
    m, pid, v = machine_with(100, nframes=1024)
    m.alloc_at(np.arange(0, 1000), kind=CACHE)
    m.fault(pid, v.start_vpn, v.end_vpn)
    assert m.stats.pages_reclaimed == 76
    assert (m.kind[:76] != CACHE).all() and (m.kind[76:1000] == CACHE).all()
    m.check()


def test_unmap_splits_a_thp_that_sticks_out_and_frees_the_rest():
    m, pid, v = machine_with(1024)
    m.fault(pid, v.start_vpn, v.end_vpn)
    keep = tokens_of(m, pid)
    m.unmap(pid, v.start_vpn + 500, v.start_vpn + 600)
    assert m.stats.thp_split == 2 and not m.compound.any()
    assert v.present == 924 and m.nr_free == 4096 - 924
    now = tokens_of(m, pid)
    assert all(keep[vpn] == tok for vpn, tok in now.items())
    m.check()


def test_unmap_of_a_whole_thp_does_not_count_a_split():
    m, pid, v = machine_with(1024)
    m.fault(pid, v.start_vpn, v.end_vpn)
    m.unmap(pid, v.start_vpn, v.start_vpn + 512)
    assert m.stats.thp_split == 0 and (m.compound[v.pfn[512]] == HEAD)


def test_migrate_moves_contents_page_tables_and_tokens():
    m, pid, v = machine_with(8, thp=False)
    m.fault(pid, v.start_vpn, v.end_vpn)
    before = tokens_of(m, pid)
    m.migrate(np.array([0, 3]), np.array([2000, 1500]))
    assert v.pfn[[0, 3]].tolist() == [2000, 1500]
    assert m.kind[0] == FREE and m.token[0] == 0 and m.kind[2000] == ANON
    assert tokens_of(m, pid) == before
    assert m.stats.pages_migrated == 2 and m.stats.bytes_copied == 8192
    m.check()


def test_migrate_refuses_and_changes_nothing():
    m, pid, v = machine_with(8, thp=False)
    m.fault(pid, v.start_vpn, v.end_vpn)
    m.alloc_at(np.array([100]))
    m.alloc_at(np.array([101]), kind=NONLRU)
    state = m.kind.copy(), m.token.copy()
    with pytest.raises(MoveError, match="unmovable"):
        m.migrate(np.array([1, 100]), np.array([200, 201]))
    with pytest.raises(MoveError, match="non-lru"):
        m.migrate(np.array([101]), np.array([200]))
    with pytest.raises(MoveError, match="free"):
        m.migrate(np.array([50]), np.array([200]))
    with pytest.raises(MoveError, match="destination"):
        m.migrate(np.array([1]), np.array([2]))
    with pytest.raises(ValueError, match="twice"):
        m.migrate(np.array([1, 2]), np.array([300, 300]))
    assert np.array_equal(m.kind, state[0]) and np.array_equal(m.token, state[1])
    m.migrate(np.array([101]), np.array([200]), allow_nonlru=True)
    assert m.kind[200] == NONLRU
    m.check()


def test_a_thp_migrates_whole_onto_an_aligned_block_or_not_at_all():
    m, pid, v = machine_with(512)
    m.fault(pid, v.start_vpn, v.end_vpn)
    src = v.pfn.copy()
    with pytest.raises(MoveError, match="part of a THP"):
        m.migrate(src[:10], np.arange(1024, 1034))
    with pytest.raises(MoveError, match="aligned"):
        m.migrate(src, np.arange(1025, 1537))
    m.migrate(src, np.arange(1024, 1536))
    assert m.compound[1024] == HEAD and v.pfn[0] == 1024
    m.check()


def test_exchange_swaps_two_processes_pages_and_keeps_free_memory():
    m = Machine(2048)
    a, b = m.add_process("a"), m.add_process("b")
    va, vb = m.mmap(a.pid, 4, thp=False), m.mmap(b.pid, 4, thp=False)
    m.fault(a.pid, va.start_vpn, va.end_vpn)
    m.fault(b.pid, vb.start_vpn, vb.end_vpn)
    m.alloc_at(np.array([1000]), kind=CACHE)
    snap, free = m.snapshot(), m.buddy.free_blocks(m.zones[0])
    pa, pb = va.pfn.copy(), vb.pfn.copy()
    m.exchange(np.array([pa[0], pa[1]]), np.array([pb[3], 1000]))
    assert va.pfn[0] == pb[3] and vb.pfn[3] == pa[0] and va.pfn[1] == 1000
    assert m.kind[pa[1]] == CACHE
    assert m.snapshot() == snap and m.buddy.free_blocks(m.zones[0]) == free
    assert m.stats.pages_exchanged == 2 and m.stats.bytes_copied == 4 * 4096
    m.check()


def test_exchange_refuses_unmovable_free_and_mixed_thp_pairs():
    m, pid, v = machine_with(1024)
    m.fault(pid, v.start_vpn, v.start_vpn + 512)  # a THP
    m.fault(pid, v.start_vpn + 512, v.end_vpn, thp=False)
    m.alloc_at(np.array([3000]))
    with pytest.raises(MoveError, match="unmovable"):
        m.exchange(v.pfn[600:601], np.array([3000]))
    with pytest.raises(MoveError, match="free"):
        m.exchange(v.pfn[600:601], np.array([3500]))
    with pytest.raises(MoveError, match="THP-ness"):
        m.exchange(v.pfn[0:1], v.pfn[600:601])
    with pytest.raises(ValueError, match="twice"):
        m.exchange(v.pfn[600:602], v.pfn[601:603])
    m.split_thp(v.pfn[:1])
    m.exchange(v.pfn[0:1], v.pfn[600:601])
    m.check()


def test_whole_thps_exchange_with_each_other():
    m, pid, v = machine_with(1024)
    m.fault(pid, v.start_vpn, v.end_vpn)
    h0, h1 = int(v.pfn[0]), int(v.pfn[512])
    m.exchange(np.arange(h0, h0 + 512), np.arange(h1, h1 + 512))
    assert v.pfn[0] == h1 and v.pfn[512] == h0
    m.check()


def test_split_and_promote():
    m, pid, v = machine_with(1024)
    m.fault(pid, v.start_vpn, v.end_vpn)
    m.split_thp(v.pfn[[0, 512]])
    assert not m.compound.any()
    with pytest.raises(ValueError, match="not a THP head"):
        m.split_thp(v.pfn[:1])
    assert m.promote(pid, v.start_vpn)
    assert not m.promote(pid, v.start_vpn)  # already a THP
    assert not m.promote(pid, v.start_vpn + 1)  # not aligned
    m.exchange(v.pfn[512:513], v.pfn[513:514])  # breaks the second region's contiguity
    assert not m.promote(pid, v.start_vpn + 512)
    assert m.stats.thp_promoted == 1
    m.check()


def test_promote_needs_aligned_frames_and_a_thp_vma():
    m, pid, v = machine_with(512, thp=False)
    m.fault_at(pid, np.arange(v.start_vpn, v.end_vpn), np.arange(1024, 1536))
    assert not m.promote(pid, v.start_vpn)  # the VMA does not allow THP
    m2, pid2, v2 = machine_with(512)
    m2.fault_at(pid2, np.arange(v2.start_vpn, v2.end_vpn), np.arange(1000, 1512))
    assert not m2.promote(pid2, v2.start_vpn)  # contiguous but not aligned


def test_fault_at_validates_before_changing_anything():
    m, pid, v = machine_with(16, thp=False)
    with pytest.raises(ValueError, match="no VMA"):
        m.fault_at(pid, np.array([v.start_vpn, 5]), np.array([1, 2]))
    m.fault_at(pid, np.array([v.start_vpn]), np.array([7]))
    with pytest.raises(ValueError, match="already present"):
        m.fault_at(pid, np.array([v.start_vpn]), np.array([8]))
    with pytest.raises(MoveError, match="in use"):
        m.fault_at(pid, np.array([v.start_vpn + 1]), np.array([7]))
    assert m.nr_free == 4095
    m.check()


def test_free_unmaps_anon_and_exit_frees_everything():
    m, pid, v = machine_with(1024)
    m.fault(pid, v.start_vpn, v.end_vpn)
    m.free(v.pfn[:3].copy())
    assert v.present == 1021 and m.stats.thp_split == 1
    with pytest.raises(MoveError, match="already free"):
        m.free(np.array([4000]))
    m.exit_process(pid)
    assert m.nr_free == 4096 and not m.processes
    m.check()


def test_alloc_kinds():
    m = Machine(2048)
    assert m.alloc(3) == 0 and (m.kind[:8] == CACHE).all()
    assert m.alloc(0, mt=0) == 1024 and m.kind[1024] == UNMOVABLE  # stolen block
    with pytest.raises(ValueError, match="fault"):
        m.alloc(0, kind=ANON)
    with pytest.raises(MoveError, match="not free"):
        m.alloc_at(np.array([0]))


def test_build_shapes_zones_like_x86_64():
    m = Machine.build(6 << 30)
    assert [(z.node, z.name, z.start_pfn, z.end_pfn) for z in m.zones] == [
        (0, "DMA32", 0, 1 << 20),
        (0, "Normal", 1 << 20, 3 << 19),
    ]
    assert [z.name for z in m.zonelist()] == ["Normal", "DMA32"]
    two = Machine.build(2 << 30, nodes=2)
    assert [(z.node, z.name) for z in two.zones] == [(0, "DMA32"), (1, "DMA32")]
    assert two.zone_index(np.array([0, 300_000])).tolist() == [0, 1]
    assert two.zone_of(300_000).node == 1


def test_check_catches_broken_invariants():
    m, pid, v = machine_with(8, thp=False)
    m.fault(pid, v.start_vpn, v.end_vpn)
    v.pfn[1] = v.pfn[0]  # one frame mapped twice
    with pytest.raises(AssertionError):
        m.check()
    m, pid, v = machine_with(8, thp=False)
    m.fault(pid, v.start_vpn, v.end_vpn)
    m.token[3] = m.token[2]
    with pytest.raises(AssertionError, match="share a token"):
        m.check()
