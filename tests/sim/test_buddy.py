"""The simulated buddy allocator, by hand on tiny machines: split, merge, free lists."""

from __future__ import annotations

import numpy as np
import pytest

from memdefragd.backends.sim.buddy import (
    MAX_ORDER,
    MT_MOVABLE,
    MT_UNMOVABLE,
    Buddy,
    Zone,
    decompose,
)
from memdefragd.backends.sim.machine import CACHE, Machine


def free_list(buddy: Buddy, zone: Zone) -> list[tuple[int, int]]:
    """(pfn, order) of every block on the free lists, by address."""
    out = [(int(h) << k, k) for k in range(MAX_ORDER + 1) for h in buddy.heads(k, zone)]
    return sorted(out)


def counts(m: Machine) -> tuple[int, ...]:
    return m.buddy.free_blocks(m.zones[0])


def test_fresh_machine_is_two_order_10_blocks():
    m = Machine(2048)
    assert counts(m) == (0,) * 10 + (2,)
    assert free_list(m.buddy, m.zones[0]) == [(0, 10), (1024, 10)]


def test_allocating_one_page_splits_all_the_way_down_and_freeing_merges_back():
    m = Machine(2048)
    assert m.alloc(0, kind=CACHE) == 0  # lowest address first without an rng
    # expand(): the upper halves go back, one block per order, 1, 2-3, 4-7, ... 512-1023.
    assert counts(m) == (1,) * 10 + (1,)
    assert free_list(m.buddy, m.zones[0]) == [(1 << k, k) for k in range(10)] + [(1024, 10)]
    m.free(np.array([0]))
    assert counts(m) == (0,) * 10 + (2,)
    m.check()


def test_smallest_order_first():
    m = Machine(1024)
    m.alloc_at(np.arange(1024))  # all in use
    m.free(np.array([5, 8, 9, 10, 11, 600]))  # an order-0 at 5, an order-2 at 8, one at 600
    assert free_list(m.buddy, m.zones[0]) == [(5, 0), (8, 2), (600, 0)]
    assert m.alloc(0, kind=CACHE) == 5  # order 0 before splitting the order-2 block
    assert m.alloc(0, kind=CACHE) == 600
    assert m.alloc(1, kind=CACHE) == 8  # the order-2 block split: 8-9 out, 10-11 back
    assert free_list(m.buddy, m.zones[0]) == [(10, 1)]
    assert m.alloc(2, kind=CACHE) is None
    m.check()


def test_merging_is_order_independent():
    m = Machine(1024)
    m.alloc_at(np.arange(1024))
    rng = np.random.default_rng(1)
    for pfn in rng.permutation(1024)[:700]:
        m.free(np.array([pfn]))
        assert free_list(m.buddy, m.zones[0]) == decompose(m.buddy.levels[0])
    m.free(np.flatnonzero(m.kind != 0))
    assert counts(m) == (0,) * 10 + (1,)


def test_bulk_updates_equal_page_by_page_ones():
    rng = np.random.default_rng(2)
    bulk, single = Machine(4096), Machine(4096)
    pfns = np.sort(rng.choice(4096, 3000, replace=False))
    bulk.alloc_at(pfns)
    for p in pfns:
        single.alloc_at(np.array([p]))
    back = rng.choice(pfns, 2000, replace=False)
    bulk.free(back)
    for p in back:
        single.free(np.array([p]))
    for k in range(MAX_ORDER + 1):
        assert np.array_equal(bulk.buddy.levels[k], single.buddy.levels[k])
    bulk.check()


def test_blocks_never_cross_zones():
    zones = (Zone(0, "DMA32", 0, 1024), Zone(0, "Normal", 1024, 2048))
    m = Machine(2048, zones)
    m.alloc_at(np.array([0]))
    assert m.buddy.free_blocks(zones[0]) == (1,) * 10 + (0,)
    assert m.buddy.free_blocks(zones[1]) == (0,) * 10 + (1,)
    assert m.buddy.nr_free(zones[0]) == 1023
    # Normal first, then DMA32 (the kernel keeps the lower zone for when Normal runs out).
    assert m.alloc(10, kind=CACHE) == 1024
    assert m.alloc(9, kind=CACHE) == 512


def test_zone_must_be_aligned_to_order_10():
    with pytest.raises(ValueError, match="aligned"):
        Machine(2048, (Zone(0, "DMA32", 0, 512), Zone(0, "Normal", 512, 2048)))
    with pytest.raises(ValueError, match="multiple"):
        Machine(1000)


def test_pagetypeinfo_puts_blocks_on_their_pageblocks_list():
    m = Machine(2048)
    m.pageblock_mt[1] = MT_UNMOVABLE
    m.alloc_at(np.array([0]))
    by_mt = m.buddy.free_blocks_by_mt(m.zones[0])
    assert by_mt["Unmovable"] == (0,) * 9 + (1, 0)  # 512-1023: pageblock 1
    assert by_mt["Movable"] == (1,) * 9 + (0, 1)
    assert by_mt["Reclaimable"] == (0,) * 11


def test_unmovable_request_steals_the_largest_block_and_claims_its_pageblock():
    m = Machine(2048)
    m.alloc_at(np.array([1024]), kind=CACHE)  # leaves one order-10 block, at 0
    first = m.alloc(0, MT_UNMOVABLE)
    assert first == 0 and m.pageblock_mt[0] == MT_UNMOVABLE  # over half free: claimed
    assert m.alloc(0, MT_UNMOVABLE) == 1  # now from its own pageblock
    assert m.alloc(0, MT_MOVABLE, kind=CACHE) == 1025  # movable stays in movable blocks
    m.check()


def test_movable_request_falls_back_to_the_smallest_block_without_claiming():
    m = Machine(1024)
    m.pageblock_mt[:] = MT_UNMOVABLE
    m.alloc_at(np.array([0]))
    assert m.alloc(0, MT_MOVABLE, kind=CACHE) == 1
    assert (m.pageblock_mt == MT_UNMOVABLE).all()


def test_random_order_is_seeded():
    a = Machine(4096, seed=5, random_alloc=True)
    b = Machine(4096, seed=5, random_alloc=True)
    got = [a.alloc(0, kind=CACHE) for _ in range(20)]
    assert got == [b.alloc(0, kind=CACHE) for _ in range(20)]
    assert got != list(range(20))


def test_check_catches_a_stale_level():
    m = Machine(2048)
    m.buddy.levels[3][5] = False
    with pytest.raises(AssertionError, match="order-3"):
        m.buddy.check()
    m = Machine(2048)
    m.kind[7] = CACHE  # a frame in use behind the buddy's back
    with pytest.raises(AssertionError, match="free bitmap"):
        m.check()


def test_decompose_reference():
    free = np.zeros(32, dtype=bool)
    free[1:16] = True
    assert decompose(free) == [(1, 0), (2, 1), (4, 2), (8, 3)]
