"""Properties of both Translation Ranger variants over random small machines.

- Data stays intact: every present page still holds its content token, no frame is owned
  twice, the buddy allocator agrees with the frames (Machine.check), free memory is
  conserved (migration takes one free frame and frees one; exchange takes none).
- Unmovable and non-LRU frames never move.
- The faithful variant, which works on whole arrays at once, ends in exactly the state
  (and counters) of a page-by-page transcription of the RFC's loop, below.
- The improved variant never lets two VMAs share a frame range.
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memdefragd.backends.sim.machine import (
    ANON,
    CACHE,
    FREE,
    HEAD,
    NONLRU,
    TAIL,
    UNMOVABLE,
    Machine,
)
from memdefragd.backends.sim.ranger import Knobs, RangerState, defrag, find_anchor

from .test_ranger_faithful import V

NFRAMES = 8192
KNOBS = Knobs(defrag_size_threshold=1)


@st.composite
def machines(draw) -> Machine:
    """8192 frames: some unmovable, non-LRU and page-cache frames, 1-3 processes with one
    VMA each (same or different vpns), pages present or not, some of them THPs."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    m = Machine(NFRAMES)
    for kind, share in ((UNMOVABLE, draw(st.sampled_from([0, 0.002, 0.02]))),
                        (NONLRU, 0.002), (CACHE, draw(st.sampled_from([0, 0.1, 0.4])))):  # fmt: skip
        free = np.flatnonzero(m.kind == FREE)
        n = int(share * NFRAMES)
        if n:
            m.alloc_at(np.sort(rng.choice(free, n, replace=False)), kind)
    for _ in range(draw(st.integers(1, 3))):
        p = m.add_process("p")
        pages = int(draw(st.sampled_from([512, 1024, 1536, 2048])) + draw(st.sampled_from([0, 7])))
        start = V + draw(st.sampled_from([0, 0, 3, 4096]))
        m.mmap(p.pid, pages, start_vpn=start)
        for c in range(0, pages - 511, 512):  # some whole THPs on free aligned blocks
            if (start + c) % 512 or rng.random() > draw(st.sampled_from([0, 0.3, 0.9])):
                continue
            blocks = np.flatnonzero((m.kind.reshape(-1, 512) == FREE).all(axis=1))
            if blocks.size:
                b = int(rng.choice(blocks)) * 512
                m.fault_at(p.pid, start + c + np.arange(512), b + np.arange(512))
                m.promote(p.pid, start + c)
        vma = p.vmas[0]
        want = np.flatnonzero(
            (vma.pfn < 0) & (rng.random(pages) < draw(st.sampled_from([0.6, 1.0])))
        )
        free = np.flatnonzero(m.kind == FREE)
        want = want[: free.size]
        if want.size:
            m.fault_at(p.pid, start + want, rng.choice(free, want.size, replace=False))
    m.check()
    return m


def fixed(m: Machine) -> tuple[np.ndarray, np.ndarray]:
    keep = (m.kind == UNMOVABLE) | (m.kind == NONLRU)
    return np.flatnonzero(keep), m.token[keep]


def check_intact(m: Machine, before: dict, free: int, pinned) -> None:
    m.check()
    assert m.snapshot() == before
    assert m.nr_free == free
    where, tokens = fixed(m)
    assert np.array_equal(where, pinned[0]) and np.array_equal(tokens, pinned[1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines(), st.sampled_from([frozenset(), frozenset({"units"}), frozenset({"clamp"})]))
def test_faithful_keeps_data_and_never_moves_unmovable(m: Machine, quirks):
    before, free, pinned = m.snapshot(), m.nr_free, fixed(m)
    st_ = RangerState()
    for pid in list(m.processes):
        defrag(m, pid, quirks=quirks, knobs=KNOBS, tree=st_)
    check_intact(m, before, free, pinned)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines())
def test_improved_keeps_data_and_vmas_never_share_frames(m: Machine):
    before, free, pinned = m.snapshot(), m.nr_free, fixed(m)
    st_ = RangerState()
    for _ in range(2):
        for pid in list(m.processes):
            defrag(m, pid, improved=True, knobs=KNOBS, tree=st_)
    check_intact(m, before, free, pinned)
    t = st_.tree
    assert (t.hi > t.lo).all() and (t.lo[1:] >= t.hi[:-1]).all()
    # Each process's planned pages that are in place sit inside its own ranges only.
    for pid, proc in m.processes.items():
        mine = t.pid == pid
        for v in proc.vmas:
            present = v.pfn[v.pfn >= 0]
            owners = np.searchsorted(t.lo, present, side="right") - 1
            inside = (owners >= 0) & (present < t.hi[np.maximum(owners, 0)])
            assert mine[owners[inside]].all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines())
def test_faithful_equals_the_page_by_page_loop(m: Machine):
    same_as_page_by_page(m)


def shifted(by: int) -> Machine:
    """A VMA already contiguous but `by` frames off its anchor, with a free frame at
    each end: every page's destination holds another page of the same batch."""
    m = Machine(NFRAMES)
    p = m.add_process("shifted")
    m.mmap(p.pid, 1024, start_vpn=V)
    m.fault_at(p.pid, V + np.arange(1024), 8 + by + np.arange(1024))
    other = m.add_process("other")
    m.mmap(other.pid, 512, start_vpn=V)
    m.fault_at(other.pid, V + np.arange(4), np.arange(4))  # the anchor's first frames
    return m


def test_a_vma_shifted_by_a_frame_degrades_to_small_batches_and_stays_exact():
    for by in (-1, 1, 5):
        same_as_page_by_page(shifted(by))


def same_as_page_by_page(m: Machine) -> None:
    ref = copy.deepcopy(m)
    st_ = RangerState()
    got, want = {}, {}
    for pid in list(m.processes):
        r = defrag(m, pid, knobs=KNOBS, tree=st_)
        for k in ("aligned", "promoted", "hard_stops"):
            got[k] = got.get(k, 0) + getattr(r, k)
        got["moved"] = got.get("moved", 0) + r.pages_migrated + r.pages_exchanged
        for k, v in r.failures.items():
            got[k] = got.get(k, 0) + v
    anchors: dict[int, dict] = {}
    for pid in list(ref.processes):
        reference_defrag(ref, pid, anchors.setdefault(pid, {}), want)
    assert {k: v for k, v in got.items() if v} == want
    for name in ("kind", "owner", "vpn", "token", "compound"):
        assert np.array_equal(getattr(m, name), getattr(ref, name)), name


# ---------------------------------------------------------------- the RFC, page by page


def reference_defrag(m: Machine, pid: int, anchors: dict, count: dict) -> None:
    """defrag_address_range and its chunk loop (RFC04, with RFC05's THP rules; see
    docs/simulator.md, "Sources"), one page at a time, for comparison only."""

    def add(k: str, n: int = 1) -> None:
        count[k] = count.get(k, 0) + n

    for vma in m.processes[pid].vmas:
        a = find_anchor(m, vma, anchors)
        if a is None:
            continue
        zone = m.zones[a.zone]
        off = a.pfn - a.vpn
        for c in range(vma.start_vpn // 512 * 512, vma.end_vpn, 512):
            lo, hi = max(c, vma.start_vpn), min(c + 512, vma.end_vpn)
            failed, was_thp, v = 0, False, lo
            while v < hi:
                s, d = int(vma.pfn[v - vma.start_vpn]), v + off
                if s < 0:
                    add("src_not_present")
                    failed, v = failed + 1, v + 1
                    continue
                if m.compound[s] != 0:
                    if m.compound[s] == HEAD and v % 512 == 0 and hi - lo == 512:
                        outcome = _reference_thp(m, s, d, zone, add)
                        if outcome != "split":
                            was_thp = outcome in ("kept", "moved")
                            failed += 512 if outcome == "failed" else 0
                            v += 512
                        continue
                    add("src_pte_thp_failed")
                    add("hard_stops")
                    failed, v = failed + 1, v + 1
                    continue
                if s == d:
                    add("aligned")
                elif not zone.start_pfn <= d < zone.end_pfn:
                    failed += _stop("dst_out_of_bound_failed", add)
                elif m.kind[d] == FREE:
                    m.migrate(np.array([s]), np.array([d]))
                    add("moved")
                elif m.kind[d] in (ANON, CACHE) and m.compound[d] == TAIL:
                    failed += _stop("dst_pte_thp_failed", add)
                elif m.kind[d] in (ANON, CACHE):
                    if m.compound[d] == HEAD:
                        m.split_thp(np.array([d]))
                    m.exchange(np.array([s]), np.array([d]))
                    add("moved")
                elif m.kind[d] == NONLRU:
                    failed += _stop("dst_non_lru_failed", add)
                else:
                    failed += _stop("dst_non_moveable_failed", add)
                v += 1
            if lo % 512 == 0 and hi - lo == 512 and failed == 0 and not was_thp:
                p = vma.pfn[lo - vma.start_vpn : hi - vma.start_vpn]
                if p[0] % 512 == 0 and (np.diff(p) == 1).all() and m.compound[p[0]] == 0:
                    add("promoted", int(m.promote(pid, lo)))


def _stop(reason: str, add) -> int:
    add(reason)
    add("hard_stops")
    return 1


def _reference_thp(m: Machine, s: int, d: int, zone, add) -> str:
    block = np.arange(512)
    if s == d:
        add("aligned", 512)
        return "kept"
    if not zone.start_pfn <= d < zone.end_pfn:
        return _thp_stop("dst_out_of_bound_failed", add)
    if m.kind[d] == FREE:
        if d % 512 == 0 and d + 512 <= zone.end_pfn and (m.kind[d : d + 512] == FREE).all():
            m.migrate(s + block, d + block)
            add("moved", 512)
            return "moved"
    elif m.kind[d] in (ANON, CACHE):
        if m.compound[d] == TAIL:
            return _thp_stop("dst_pte_thp_failed", add)
        if m.compound[d] == HEAD and d % 512 == 0:
            m.exchange(s + block, d + block)
            add("moved", 512)
            return "moved"
    else:
        return _thp_stop("src_thp_dst_not_failed", add)
    m.split_thp(np.array([s]))
    return "split"


def _thp_stop(reason: str, add) -> str:
    add(reason, 512)
    add("hard_stops")
    return "failed"
