"""Property tests: random sequences of operations never corrupt the simulated machine.

After every operation: `Machine.check` (page tables and reverse map agree, no frame owned
twice, tokens unique, THPs well formed, buddy bitmaps equal to a recomputation), every
page present before and after holds its original token, pages appear only where faulted
or collapsed and vanish only where unmapped, unmovable frames never move, and exchange
leaves the free lists exactly as they were.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memdefragd.backends.sim import baselines
from memdefragd.backends.sim.buddy import PAGEBLOCK_ORDER, Zone
from memdefragd.backends.sim.machine import (
    ANON,
    BASE,
    CACHE,
    FREE,
    HEAD,
    UNMOVABLE,
    Machine,
    SimVma,
)
from memdefragd.model import PMD_PAGES

NFRAMES = 8192
ZONES = (Zone(0, "DMA32", 0, 4096), Zone(0, "Normal", 4096, NFRAMES))
OPS = (
    "fault", "unmap", "migrate", "migrate_thp", "exchange", "exchange_thp", "split",
    "promote", "compact", "collapse", "cache", "drop_cache",
)  # fmt: skip


def build(data: st.DataObject) -> Machine:
    m = Machine(NFRAMES, ZONES, seed=data.draw(st.integers(0, 3)), random_alloc=True)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    m.alloc_at(np.sort(rng.choice(NFRAMES, data.draw(st.integers(0, 200)), replace=False)))
    a, b = m.add_process("a"), m.add_process("b")
    m.mmap(a.pid, 1536)
    m.mmap(a.pid, 700, thp=False)
    m.mmap(b.pid, 1024)
    return m


def vmas(m: Machine) -> list[tuple[int, SimVma]]:
    return [(pid, v) for pid, p in m.processes.items() for v in p.vmas]


def pick(data: st.DataObject, pool: np.ndarray, most: int) -> np.ndarray:
    if pool.size == 0:
        return pool
    k = data.draw(st.integers(0, min(most, pool.size)))
    seed = data.draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).choice(pool, k, replace=False)


def base_movable(m: Machine) -> np.ndarray:
    return np.flatnonzero(((m.kind == ANON) | (m.kind == CACHE)) & (m.compound == BASE))


def apply(m: Machine, op: str, data: st.DataObject) -> tuple[set, set]:
    """Carry out `op`; return the (pid, vpn) pages it may remove and may add."""
    may_remove: set = set()
    may_add: set = set()
    if op in ("fault", "unmap", "collapse"):
        pid, v = data.draw(st.sampled_from(vmas(m)))
        lo = data.draw(st.integers(v.start_vpn, v.end_vpn - 1))
        hi = data.draw(st.integers(lo + 1, v.end_vpn))
        span = {(pid, x) for x in range(lo, hi)}
        if op == "fault":
            m.fault(pid, lo, hi)
            may_add = span
        elif op == "unmap":
            m.unmap(pid, lo, hi)
            may_remove = span
        else:
            baselines.collapse(m, pid, lo, hi, max_ptes_none=data.draw(st.integers(0, 511)))
            may_add = span
    elif op == "migrate":
        src = pick(data, base_movable(m), 300)
        dst = pick(data, np.flatnonzero(m.kind == FREE), src.size)
        m.migrate(src[: dst.size], dst)
    elif op == "migrate_thp":
        heads = np.flatnonzero(m.compound == HEAD)
        free_blocks = np.flatnonzero(m.buddy.levels[PAGEBLOCK_ORDER]) << PAGEBLOCK_ORDER
        if heads.size and free_blocks.size:
            h = data.draw(st.sampled_from(heads.tolist()))
            d = data.draw(st.sampled_from(free_blocks.tolist()))
            m.migrate(np.arange(h, h + PMD_PAGES), np.arange(d, d + PMD_PAGES))
    elif op == "exchange":
        both = pick(data, base_movable(m), 400)
        half = both.size // 2
        free_before = [m.buddy.free_blocks(z) for z in m.zones]
        m.exchange(both[:half], both[half : 2 * half])
        assert [m.buddy.free_blocks(z) for z in m.zones] == free_before
    elif op == "exchange_thp":
        heads = np.flatnonzero(m.compound == HEAD)
        if heads.size >= 2:
            h = pick(data, heads, 2)
            if h.size == 2:
                nr_free = m.nr_free
                m.exchange(np.arange(h[0], h[0] + PMD_PAGES), np.arange(h[1], h[1] + PMD_PAGES))
                assert m.nr_free == nr_free
    elif op == "split":
        m.split_thp(pick(data, np.flatnonzero(m.compound == HEAD), 2))
    elif op == "promote":
        # Make a present, non-THP aligned region contiguous in a free pageblock, then
        # promote it: that must work. A random region must never be promoted wrongly
        # (check() would see a malformed THP).
        pid, v = data.draw(st.sampled_from(vmas(m)))
        first = -(-v.start_vpn // PMD_PAGES) * PMD_PAGES
        starts = np.arange(first, v.end_vpn - PMD_PAGES + 1, PMD_PAGES)
        if starts.size:
            vpn = int(data.draw(st.sampled_from(starts.tolist())))
            m.promote(pid, data.draw(st.integers(v.start_vpn, v.end_vpn - 1)))
            table = v.pfn[vpn - v.start_vpn : vpn - v.start_vpn + PMD_PAGES]
            free_blocks = np.flatnonzero(m.buddy.levels[PAGEBLOCK_ORDER]) << PAGEBLOCK_ORDER
            if (table >= 0).all() and not m.compound[table].any() and free_blocks.size:
                d = int(free_blocks[0])
                m.migrate(table.copy(), np.arange(d, d + PMD_PAGES))
                assert m.promote(pid, vpn) == v.thp
    elif op == "compact":
        baselines.compact(m)
    elif op == "cache":
        m.alloc_at(np.sort(pick(data, np.flatnonzero(m.kind == FREE), 300)), kind=CACHE)
    elif op == "drop_cache":
        m.free(pick(data, np.flatnonzero(m.kind == CACHE), 300))
    return may_remove, may_add


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_operation_sequences_keep_every_invariant(data):
    m = build(data)
    unmovable = {int(p): int(m.token[p]) for p in np.flatnonzero(m.kind == UNMOVABLE)}
    for _ in range(data.draw(st.integers(1, 14))):
        op = data.draw(st.sampled_from(OPS))
        before = m.snapshot()
        newest = m._next_token
        may_remove, may_add = apply(m, op, data)
        m.check()
        after = m.snapshot()
        for page, token in before.items():
            if page in after:
                assert after[page] == token, f"{op}: page {page} lost its contents"
            else:
                assert page in may_remove, f"{op}: page {page} vanished"
        for page in after.keys() - before.keys():
            assert page in may_add, f"{op}: page {page} appeared"
            assert after[page] >= newest, f"{op}: page {page} has a recycled token"
        now = {int(p): int(m.token[p]) for p in np.flatnonzero(m.kind == UNMOVABLE)}
        assert now == unmovable, f"{op}: an unmovable frame moved"
