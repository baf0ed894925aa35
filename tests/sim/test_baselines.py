"""Linux-style compaction and khugepaged-style collapse, with figures worked out by hand."""

from __future__ import annotations

import numpy as np

from memdefragd.backends.sim.baselines import collapse, compact
from memdefragd.backends.sim.buddy import MT_UNMOVABLE
from memdefragd.backends.sim.machine import ANON, CACHE, FREE, HEAD, UNMOVABLE, Machine
from memdefragd.model import PMD_PAGES


def test_compaction_scanners_meet_where_the_free_frames_above_run_out():
    # Four pageblocks: 0 holds 100 cache pages and a kernel page, 1 holds 50 anon pages,
    # 2 is wholly free (the free scanner never breaks up a free pageblock), 3 holds 400
    # cache pages at its top and 112 free frames.
    m = Machine(2048)
    m.alloc_at(np.arange(100), kind=CACHE)
    m.alloc_at(np.array([200]))
    p = m.add_process("a")
    v = m.mmap(p.pid, 50, thp=False)
    m.fault_at(p.pid, np.arange(v.start_vpn, v.end_vpn), np.arange(512, 562))
    m.alloc_at(np.arange(1536 + 112, 2048), kind=CACHE)
    tokens = m.token[:100].copy()
    # Sources needed after pageblock 0: 100 <= 462 + 0 + 112 free above it; after
    # pageblock 1: 150 > 112 free above it. So only pageblock 0 is migrate-scanned.
    res = compact(m)
    assert res.pages_migrated == 100
    assert res.failures == {"unmovable": 1}
    assert res.migrate_scanned == 512
    assert np.array_equal(m.token[1536:1636], tokens)  # the top block's holes, upward
    assert (m.kind[:512] == FREE).sum() == 511 and m.kind[200] == UNMOVABLE
    assert (m.kind[512:562] == ANON).all()
    assert m.stats.compact_migrate_scanned == 512 and m.stats.pages_migrated == 100
    m.check()


def test_compaction_makes_free_pageblocks_out_of_scattered_pages():
    m = Machine(4096)
    rng = np.random.default_rng(0)
    m.alloc_at(np.sort(rng.choice(4096, 1500, replace=False)), kind=CACHE)
    assert m.buddy.free_blocks(m.zones[0])[9:] == (0, 0)
    res = compact(m)
    assert res.pages_migrated > 0 and not res.failures
    big = m.buddy.free_blocks(m.zones[0])
    assert big[9] + 2 * big[10] >= 2  # scattered pages packed up, pageblocks freed
    m.check()


def test_compaction_skips_thps_and_uses_only_movable_pageblocks_as_targets():
    m = Machine(2048)
    p = m.add_process("a")
    v = m.mmap(p.pid, 512)
    m.fault(p.pid, v.start_vpn, v.end_vpn)  # a THP at 0
    m.alloc_at(np.arange(1024, 1034), kind=CACHE)
    m.alloc_at(np.arange(1600, 2040), kind=CACHE)
    m.pageblock_mt[3] = MT_UNMOVABLE  # pageblock 3's holes are no target
    res = compact(m)
    # Pageblock 0 is the THP, 1 is wholly free: nothing to migrate below pageblock 2,
    # whose 10 pages have no target above it, so the scanners meet there.
    assert m.compound[0] == HEAD and v.pfn[0] == 0
    assert res.pages_migrated == 0
    m.check()


def machine_with_heap(pages: int = 1024 + 300):
    m = Machine(4096)
    p = m.add_process("app")
    v = m.mmap(p.pid, pages, thp=False)
    return m, p.pid, v


def test_collapse_copies_present_pages_and_zero_fills_the_rest():
    m, pid, v = machine_with_heap()
    rng = np.random.default_rng(3)
    some = np.sort(rng.choice(512, 300, replace=False))
    m.fault(pid, v.start_vpn + 512, v.end_vpn)  # region 1 full, region 0 has 300 pages
    for off in some:
        m.fault(pid, v.start_vpn + int(off), v.start_vpn + int(off) + 1)
    before = m.snapshot()
    res = collapse(m, pid, v.start_vpn, v.end_vpn)
    assert res.regions.tolist() == [v.start_vpn, v.start_vpn + 512]
    assert res.status == ["ok", "ok"] and res.collapsed == 2 and not res.failures
    assert res.pages_copied == 300 + 512
    assert (m.compound[v.pfn[[0, 512]]] == HEAD).all()
    after = m.snapshot()
    assert all(after[k] == t for k, t in before.items())
    assert len(after) == 1024 + 300  # the 212 holes of region 0 are now zero pages
    assert m.stats.thp_collapsed == 2 and m.stats.bytes_copied == 812 * 4096
    m.check()


def test_collapse_reasons():
    m, pid, v = machine_with_heap(2048)
    m.fault(pid, v.start_vpn, v.start_vpn + 100)  # region 0: 100 pages
    m.fault(pid, v.start_vpn + 512, v.start_vpn + 1024)  # region 1: full
    m.promote(pid, v.start_vpn + 512)  # not a THP VMA: refused, stays base pages
    res = collapse(m, pid, v.start_vpn, v.end_vpn + 512, max_ptes_none=411)
    # region 0: 100 < 512 - 411; region 2 and 3: empty; region 4: beyond the VMA
    assert res.status == [
        "not_enough_present", "ok", "not_enough_present", "not_enough_present", "unmapped",
    ]  # fmt: skip
    assert res.failures == {"not_enough_present": 3, "unmapped": 1}
    res = collapse(m, pid, v.start_vpn + 512, v.start_vpn + 1024)
    assert res.status == ["already_thp"] and not res.failures


def test_collapse_without_free_order_9_blocks():
    m, pid, v = machine_with_heap(1024)
    m.fault(pid, v.start_vpn, v.end_vpn)
    m.alloc_at(np.arange(1024 + 7, 4096, 512))  # a kernel page in each pageblock above
    res = collapse(m, pid, v.start_vpn, v.end_vpn)
    assert res.status == ["no_free_block", "no_free_block"]
    assert res.failures == {"no_free_block": 2} and res.collapsed == 0
    compact(m)  # moves the heap up against the kernel pages: frees pageblocks 0 and 1
    res = collapse(m, pid, v.start_vpn, v.end_vpn)
    assert res.collapsed == 2
    assert (v.pfn[:PMD_PAGES] == v.pfn[0] + np.arange(PMD_PAGES)).all()
    m.check()
