"""Moving one VMA's pages onto planned destination frames, Translation Ranger's way.

This is `defrag_address_range` and the chunk loop around it (RFC04's `kmem_defragd_scan_mm`;
docs/simulator.md, "Sources"), applied to whole arrays: the RFC walks a VMA page by page,
each page either already in place (aligned), migrated into a free destination, exchanged
with an in-use movable one, or stopped by a destination it may not touch. Doing that per
page in Python would take minutes on a 16 GiB machine, so a window of chunks is classified
at once and carried out with one `migrate` and one `exchange` call.

A batch gives the same result as the page-by-page loop only if no page's action changes
what a later page of the batch sees. So before acting, the pages whose frames another
page of the batch touches (its source, its destination, a THP it splits) are found by one
sort, and the batch is cut just before the first such page; the rest is re-read from the
page table and classified again. Scattered memory has few such pairs; a VMA shifted by
one frame has one per page and degrades to small batches, still correct.

Where the destination is planned (`dest`), what counts as "in place", a hard stop or a
failure, and when a 2 MiB chunk is promoted are the RFC's; the planner (faithful anchor or
improved placement) only supplies the destinations.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ...model import PMD_PAGES
from .machine import ANON, CACHE, FREE, NONLRU, Machine, SimVma

PUD_PAGES = 1 << 18  # 1 GiB: the RFC walks a VMA in regions of this size
WINDOW_CHUNKS = 4  # chunks classified together: larger windows meet more conflicts

# defrag_result_stats failure categories (RFC04 names), in the RFC's order. Every one but
# dst_migrate_free_failed and src_not_present is a hard stop.
RANGER_FAILURES = (
    "src_not_present",
    "src_pte_thp_failed",
    "src_thp_dst_not_failed",
    "dst_out_of_bound_failed",
    "dst_thp_src_not_failed",
    "dst_pte_thp_failed",
    "dst_isolate_free_failed",
    "dst_migrate_free_failed",
    "dst_anon_failed",
    "dst_file_failed",
    "dst_non_lru_failed",
    "dst_non_moveable_failed",
)

Dest = Callable[[np.ndarray], np.ndarray]  # vpns -> planned pfns (-1: no plan, leave alone)


@dataclass
class Tally:
    """What one or more defrag passes did, in 4 KiB pages (RFC counters plus ours)."""

    aligned: int = 0  # already at the destination
    migrated: int = 0  # into a free destination
    exchanged: int = 0  # swapped with an in-use destination (pairs)
    promoted: int = 0  # 2 MiB chunks made THPs in place
    chunks: int = 0  # 2 MiB chunks attempted
    hard_stops: int = 0
    thp_moved: int = 0  # THPs moved whole (migrated onto a free block or exchanged)
    thp_split: int = 0  # source THPs split to be moved page by page (RFC05)
    failures: Counter[str] = field(default_factory=Counter)

    def fail(self, name: str, count: int) -> None:
        if count:
            self.failures[name] += count


class Placer:
    """Places the pages of one VMA of one process on the frames `dest` gives them.

    `zone` bounds the destinations ([lo, hi) pfns): anything outside is the RFC's
    dst_out_of_bound. THPs follow RFC05's rules (a source THP that cannot move whole is
    split, a destination THP met at its head is split) unless `rfc04`: RFC 04 alone never
    splits (a base page meeting another THP stops at each of its 512 frames, a source THP
    moves only whole onto a free aligned block, and THP-THP exchange fails, as
    exchange_pages refuses compound pages). Two departures from the RFC, for the improved
    planner: `keep_thp` leaves a THP whose destination is not a whole aligned block where
    it is instead of splitting it and moving its pages one by one; `split_any` splits a
    THP found at the destination even when the first page to meet it is not its head,
    where the RFC stops at each of its pages (dst_pte_thp_failed).
    """

    def __init__(
        self,
        machine: Machine,
        pid: int,
        vma: SimVma,
        dest: Dest,
        zone: tuple[int, int],
        tally: Tally,
        *,
        promote: bool = True,
        keep_thp: bool = False,
        split_any: bool = False,
        rfc04: bool = False,
    ):
        self.m, self.pid, self.vma, self.dest = machine, pid, vma, dest
        self.zlo, self.zhi = zone
        self.t = tally
        self.promote_on = promote
        self.keep_thp = keep_thp
        self.split_any = split_any
        self.rfc04 = rfc04

    def run(self, lo: int, hi: int) -> None:
        """The vpns [lo, hi) of the VMA: 1 GiB regions, each walked in 2 MiB chunks."""
        lo, hi = max(lo, self.vma.start_vpn), min(hi, self.vma.end_vpn)
        region = lo
        while region < hi:
            region_end = min((region // PUD_PAGES + 1) * PUD_PAGES, hi)
            # PUD promotion after a clean region is off by default (mem_defrag_promote_thp
            # = 12), so the region only bounds the windows here.
            w = region
            while w < region_end:
                w_end = min((w // PMD_PAGES + WINDOW_CHUNKS) * PMD_PAGES, region_end)
                self._window(w, w_end)
                w = w_end
            region = region_end

    # ------------------------------------------------------------ one window of chunks

    def _window(self, lo: int, hi: int) -> None:
        c0 = lo // PMD_PAGES
        nchunks = (hi - 1) // PMD_PAGES - c0 + 1
        self.t.chunks += nchunks
        fails = np.zeros(nchunks, np.int64)
        was_thp = np.zeros(nchunks, bool)
        pos = lo
        while pos < hi:
            head = self._first_thp(pos, hi)
            end = hi if head is None else head
            if end > pos:  # then look again: these pages may have split or moved the THP
                self._pages(pos, end, fails, c0)
                pos = end
                continue
            assert head is not None
            k = head // PMD_PAGES - c0
            outcome = self._thp(head, fails, k)
            was_thp[k] = outcome != "split"
            if outcome == "split":
                self._pages(head, head + PMD_PAGES, fails, c0)
            pos = head + PMD_PAGES
        if self.promote_on:
            self._promote(lo, hi, c0, fails, was_thp)

    def _first_thp(self, lo: int, hi: int) -> int | None:
        """The first vpn in [lo, hi) heading a whole PMD-mapped THP of this VMA."""
        v, m = self.vma, self.m
        first = -(-lo // PMD_PAGES) * PMD_PAGES
        if first + PMD_PAGES > hi:
            return None
        pfn = v.pfn[first - v.start_vpn : hi - v.start_vpn : PMD_PAGES]
        ok = (pfn >= 0) & (pfn % PMD_PAGES == 0)
        ok[ok] = m.compound[pfn[ok]] == 1
        for i in np.flatnonzero(ok):
            vpn = first + int(i) * PMD_PAGES
            if vpn + PMD_PAGES <= hi and _whole_thp(m, v, vpn):
                return vpn
        return None

    # ------------------------------------------------------------ base pages

    def _pages(self, lo: int, hi: int, fails: np.ndarray, c0: int) -> None:
        """Base pages of [lo, hi): batch after conflict-free batch, in virtual order."""
        m, v, t = self.m, self.vma, self.t
        while lo < hi:
            src = v.pfn[lo - v.start_vpn : hi - v.start_vpn].copy()
            vpn = np.arange(lo, hi, dtype=np.int64)
            dst = self.dest(vpn)
            planned = dst >= 0
            present = src >= 0
            comp = np.zeros(src.size, bool)
            comp[present] = m.compound[src[present]] != 0
            aligned = present & planned & ~comp & (src == dst)
            act = present & planned & ~comp & ~aligned
            oob = act & ((dst < self.zlo) | (dst >= self.zhi))
            act &= ~oob
            kind = np.full(src.size, -1, np.int16)
            kind[act] = m.kind[dst[act]]
            dcomp = np.zeros(src.size, np.uint8)
            dcomp[act] = m.compound[dst[act]]
            movable = act & ((kind == ANON) | (kind == CACHE))
            thp_dst = movable & (dcomp != 0)
            head = dst - dst % PMD_PAGES
            if self.split_any:  # the first page to meet a THP splits it, head or not
                splits = np.zeros(src.size, bool)
                at = np.flatnonzero(thp_dst)
                splits[at[np.unique(head[at], return_index=True)[1]]] = True
            elif self.rfc04:  # RFC04: no split, a stop at each of its frames
                splits = np.zeros(src.size, bool)
            else:  # RFC05: split a THP met at its head, then exchange
                splits = movable & (dcomp == 1)
            tail = thp_dst & ~splits  # inside a THP not split (yet): a hard stop
            at_head = tail & (dcomp == 1) if self.rfc04 else np.zeros(src.size, bool)
            to_free = act & (kind == FREE)
            swap = movable & ~tail
            cut = _first_conflict(
                src, dst, present & planned & ~aligned, to_free | swap, splits, head
            )
            n = src.size if cut is None else cut
            s = slice(0, n)

            chunk = vpn[s] // PMD_PAGES - c0
            stop_nonlru = act[s] & (kind[s] == NONLRU)
            stop_unmov = act[s] & ~to_free[s] & ~movable[s] & ~stop_nonlru
            missing = planned[s] & ~present[s]
            stops = comp[s] & planned[s] | oob[s] | tail[s] | stop_nonlru | stop_unmov
            t.fail("src_not_present", int(missing.sum()))
            t.fail("src_pte_thp_failed", int((comp[s] & planned[s]).sum()))
            t.fail("dst_out_of_bound_failed", int(oob[s].sum()))
            t.fail("dst_thp_src_not_failed", int(at_head[s].sum()))
            t.fail("dst_pte_thp_failed", int((tail[s] & ~at_head[s]).sum()))
            t.fail("dst_non_lru_failed", int(stop_nonlru.sum()))
            t.fail("dst_non_moveable_failed", int(stop_unmov.sum()))
            t.aligned += int(aligned[s].sum())
            t.hard_stops += int(stops.sum())
            bad = missing | stops
            if bad.any():
                fails += np.bincount(chunk[bad], minlength=fails.size)

            heads = head[s][splits[s]]
            if heads.size:
                m.split_thp(heads)
            f, w = to_free[s], swap[s]
            if f.any():
                m.migrate(src[s][f], dst[s][f])
                t.migrated += int(f.sum())
            if w.any():
                m.exchange(src[s][w], dst[s][w])
                t.exchanged += int(w.sum())
            lo += n

    # ------------------------------------------------------------ a THP source

    def _thp(self, head: int, fails: np.ndarray, k: int) -> str:
        """A whole THP at vpn `head` (§2.4 with RFC05, or RFC04's if `rfc04`): 'kept' in
        place, 'moved' whole, 'split' (its pages then go one by one) or 'failed' (a hard
        stop)."""
        m, v, t = self.m, self.vma, self.t
        s = int(v.pfn[head - v.start_vpn])
        d = int(self.dest(np.array([head], np.int64))[0])
        if d < 0:
            return "kept"
        if d == s:
            t.aligned += PMD_PAGES
            return "kept"
        block = np.arange(PMD_PAGES, dtype=np.int64)
        whole = d % PMD_PAGES == 0 and (
            self.dest(np.array([head + PMD_PAGES - 1], np.int64))[0] == d + PMD_PAGES - 1
        )
        if self.keep_thp and not whole:
            return "kept"
        if not self.zlo <= d < self.zhi:
            return self._thp_stop("dst_out_of_bound_failed", head, fails, k)
        kind = int(m.kind[d])
        if kind == FREE:
            if whole and d + PMD_PAGES <= self.zhi and (m.kind[d : d + PMD_PAGES] == FREE).all():
                m.migrate(s + block, d + block)
                t.migrated += PMD_PAGES
                t.thp_moved += 1
                return "moved"
            if self.rfc04:  # no free order-9 block at the destination: -ENOMEM
                return self._thp_stop("dst_isolate_free_failed", head, fails, k)
        elif kind in (ANON, CACHE):
            dc = int(m.compound[d])
            if dc == 2:
                return self._thp_stop("dst_pte_thp_failed", head, fails, k)
            if self.rfc04:  # exchange_pages refuses compound pages; no split
                if dc == 1:
                    what = "dst_anon_failed" if kind == ANON else "dst_file_failed"
                    return self._thp_stop(what, head, fails, k)
                return self._thp_stop("src_thp_dst_not_failed", head, fails, k)
            if dc == 1 and whole:
                _exchange_thps(m, s, d)
                t.exchanged += PMD_PAGES
                t.thp_moved += 1
                return "moved"
        else:
            return self._thp_stop("src_thp_dst_not_failed", head, fails, k)
        m.split_thp(np.array([s], np.int64))
        t.thp_split += 1
        return "split"

    def _thp_stop(self, reason: str, head: int, fails: np.ndarray, k: int) -> str:
        self.t.fail(reason, PMD_PAGES)
        self.t.hard_stops += 1
        fails[k] += PMD_PAGES
        return "failed"

    # ------------------------------------------------------------ promotion

    def _promote(self, lo: int, hi: int, c0: int, fails: np.ndarray, was_thp: np.ndarray) -> None:
        """In-place promotion of each whole chunk that ended with no failure and held no
        THP before (§2.2 step 4.3): its 512 pages now sit on one aligned block."""
        v = self.vma
        first = -(-max(lo, v.start_vpn) // PMD_PAGES) * PMD_PAGES
        last = min(hi, v.end_vpn) // PMD_PAGES * PMD_PAGES
        if last <= first:
            return
        ks = np.arange(first // PMD_PAGES, last // PMD_PAGES) - c0
        ks = ks[(fails[ks] == 0) & ~was_thp[ks]]
        if not ks.size:
            return
        heads = (ks + c0) * PMD_PAGES
        pfn = v.pfn[(heads - v.start_vpn)[:, None] + np.arange(PMD_PAGES)]
        ok = (pfn[:, 0] >= 0) & (pfn[:, 0] % PMD_PAGES == 0)
        ok &= (np.diff(pfn, axis=1) == 1).all(axis=1)
        ok[ok] &= self.m.compound[pfn[ok, 0]] == 0
        if ok.any():
            self.t.promoted += int(self.m.promote_many(self.pid, heads[ok]).sum())


def _whole_thp(m: Machine, vma: SimVma, vpn: int) -> bool:
    """Whether vpn heads a PMD-mapped THP: 512 aligned frames, head then tails."""
    pfn = vma.pfn[vpn - vma.start_vpn : vpn - vma.start_vpn + PMD_PAGES]
    p0 = int(pfn[0])
    if p0 < 0 or p0 % PMD_PAGES or pfn.size < PMD_PAGES:
        return False
    if not (pfn == p0 + np.arange(PMD_PAGES)).all():
        return False
    return bool(m.compound[p0] == 1 and (m.compound[p0 + 1 : p0 + PMD_PAGES] == 2).all())


def _exchange_thps(m: Machine, a: int, b: int) -> None:
    """exchange_huge_page: two THPs swap places whole."""
    block = np.arange(PMD_PAGES, dtype=np.int64)
    m.exchange(a + block, b + block)


def _first_conflict(
    src: np.ndarray,
    dst: np.ndarray,
    relevant: np.ndarray,
    acting: np.ndarray,
    splits: np.ndarray,
    heads: np.ndarray,
) -> int | None:
    """Index of the first page whose classification or action depends on an earlier
    page of the same batch: the smallest max(x, y) over pages x != y where a frame that x
    touches (its source, its destination, the THP it splits) is one y reads or touches.
    None when the whole batch is independent."""
    act = np.flatnonzero(acting)
    rel = np.flatnonzero(relevant & ~acting)
    sp = np.flatnonzero(splits)
    block = np.arange(PMD_PAGES, dtype=np.int64)
    frames = np.concatenate(
        (
            src[act],
            dst[act],
            src[rel],
            dst[rel],
            (heads[sp][:, None] + block).ravel(),
        )
    )
    idx = np.concatenate((act, act, rel, rel, np.repeat(sp, block.size)))
    touch = np.concatenate(
        (
            np.ones(2 * act.size, bool),
            np.zeros(2 * rel.size, bool),
            np.ones(sp.size * block.size, bool),
        )
    )
    keep = frames >= 0
    frames, idx, touch = frames[keep], idx[keep], touch[keep]
    if frames.size < 2:
        return None
    order = np.lexsort((idx, frames))
    frames, idx, touch = frames[order], idx[order], touch[order]
    pair = (frames[1:] == frames[:-1]) & (idx[1:] != idx[:-1]) & (touch[1:] | touch[:-1])
    if not pair.any():
        return None
    return int(idx[1:][pair].min())
