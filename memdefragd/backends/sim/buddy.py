"""The simulated buddy allocator: orders 0..10, real split and merge, per-pageblock types.

With eager merging (Linux merges a freed block with its buddy at once, order after
order), the free lists are exactly the decomposition of the free set into maximal aligned
power-of-two blocks that never cross an order-10 boundary. So the allocator keeps no
lists: it keeps, for every order k, a bitmap `levels[k]` of the aligned 2^k blocks that
are entirely free. A block of order k is on a free list iff it is entirely free and its
buddy is not (for k = 10, iff it is entirely free). Splitting and merging are then
implicit in the bitmaps, and bulk updates over arrays of frames are vectorized: a change
of n frames touches n entries per order, a large change recomputes a level from the one
below with a 2-byte view (`== 0x0101`: both halves free).

Zones must start and end on order-10 boundaries so that no block crosses a zone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_ORDER = 10  # largest block: 2^10 pages = 4 MiB, as on x86_64
PAGEBLOCK_ORDER = 9
PAGEBLOCK_PAGES = 1 << PAGEBLOCK_ORDER
MT_UNMOVABLE, MT_MOVABLE, MT_RECLAIMABLE = 0, 1, 2
MT_NAMES = ("Unmovable", "Movable", "Reclaimable")  # as /proc/pagetypeinfo spells them

_BOTH_FREE = np.uint16(0x0101)  # two adjacent bool bytes, both True


@dataclass(frozen=True, slots=True)
class Zone:
    node: int
    name: str
    start_pfn: int
    end_pfn: int

    @property
    def pages(self) -> int:
        return self.end_pfn - self.start_pfn


class Buddy:
    """Free-block bitmaps for every order over all frames; zones only slice them."""

    def __init__(
        self,
        free: np.ndarray,
        zones: Sequence[Zone],
        pageblock_mt: np.ndarray,
        rng: np.random.Generator | None = None,
    ):
        """`free` (bool per frame) is copied; `pageblock_mt` is shared with the machine.
        With `rng`, blocks of one order are handed out from a random starting address
        (the kernel's free lists are LIFO, so their order looks random after churn);
        without, in ascending address order (hand-checkable)."""
        n = free.size
        if n % (1 << MAX_ORDER):
            raise ValueError(f"frame count {n} is not a multiple of {1 << MAX_ORDER}")
        for z in zones:
            if z.start_pfn % (1 << MAX_ORDER) or z.end_pfn % (1 << MAX_ORDER):
                raise ValueError(f"zone {z.name} is not aligned to order-{MAX_ORDER} blocks")
        self.nframes = n
        self.zones = tuple(zones)
        self.pageblock_mt = pageblock_mt
        self.rng = rng
        self.levels: list[np.ndarray] = [np.array(free, dtype=bool)]
        for _ in range(MAX_ORDER):
            self.levels.append(_halve(self.levels[-1]))

    # ------------------------------------------------------------------ updates

    def set_free(self, pfns: np.ndarray, free: bool) -> None:
        """Mark frames free (merging) or in use (splitting)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        if pfns.size == 0:
            return
        self.levels[0][pfns] = free
        self._propagate(pfns)

    def update(self, used: np.ndarray, freed: np.ndarray) -> None:
        """Both at once (a migration): one propagation for the two sets."""
        used = np.asarray(used, dtype=np.int64)
        freed = np.asarray(freed, dtype=np.int64)
        self.levels[0][used] = False
        self.levels[0][freed] = True
        self._propagate(np.concatenate((used, freed)))

    def _propagate(self, idx: np.ndarray) -> None:
        for k in range(1, MAX_ORDER + 1):
            below, here = self.levels[k - 1], self.levels[k]
            if idx.size * 4 > here.size:  # cheaper to recompute this level and all above
                for j in range(k, MAX_ORDER + 1):
                    np.equal(self.levels[j - 1].view(np.uint16), _BOTH_FREE, out=self.levels[j])
                return
            idx = idx >> 1
            here[idx] = below[2 * idx] & below[2 * idx + 1]

    # ------------------------------------------------------------------ queries

    def is_free(self, pfns: np.ndarray) -> np.ndarray:
        return self.levels[0][np.asarray(pfns, dtype=np.int64)]

    def nr_free(self, zone: Zone | None = None) -> int:
        lo, hi = (0, self.nframes) if zone is None else (zone.start_pfn, zone.end_pfn)
        return int(np.count_nonzero(self.levels[0][lo:hi]))

    def free_blocks(self, zone: Zone) -> tuple[int, ...]:
        """Blocks per order on the free lists, like one line of /proc/buddyinfo.

        An all-free block of order k is on a list unless its parent is all free too:
        count_k = all_free_k - 2 * all_free_{k+1}."""
        full = [self._count(k, zone) for k in range(MAX_ORDER + 1)]
        return (*(full[k] - 2 * full[k + 1] for k in range(MAX_ORDER)), full[MAX_ORDER])

    def _count(self, k: int, zone: Zone) -> int:
        return int(np.count_nonzero(self.levels[k][zone.start_pfn >> k : zone.end_pfn >> k]))

    def free_blocks_by_mt(self, zone: Zone) -> dict[str, tuple[int, ...]]:
        """Blocks per order per migratetype, like /proc/pagetypeinfo: a block is on the
        list of its (first) pageblock's type."""
        out = np.zeros((len(MT_NAMES), MAX_ORDER + 1), dtype=np.int64)
        for k in range(MAX_ORDER + 1):
            heads = self.heads(k, zone)
            mts = self.pageblock_mt[(heads << k) >> PAGEBLOCK_ORDER]
            out[:, k] = np.bincount(mts, minlength=len(MT_NAMES))[: len(MT_NAMES)]
        return {name: tuple(int(c) for c in out[i]) for i, name in enumerate(MT_NAMES)}

    def heads(self, k: int, zone: Zone) -> np.ndarray:
        """Indices (in units of 2^k pages) of the order-k blocks on the free lists of
        `zone`, ascending: all free while their buddy is not."""
        return self._heads_in(k, zone.start_pfn >> k, zone.end_pfn >> k)

    def largest_free_order(self, zone: Zone) -> int:
        """Highest order with a block on the free lists, -1 when the zone is full."""
        for k in range(MAX_ORDER, -1, -1):
            if self._count(k, zone):
                return k
        return -1

    # ------------------------------------------------------------------ allocation

    def take(
        self,
        count: int,
        order: int,
        mt: int,
        zones: Sequence[Zone],
        *,
        fallback: bool = True,
    ) -> np.ndarray:
        """Allocate up to `count` blocks of `order`; returns their first pfns in the order
        handed out (fewer when memory runs short).

        As __rmqueue_smallest: the smallest free order first, in pageblocks of `mt`; a
        larger block is split and its lowest pieces handed out first (what expand() does,
        so consecutive order-0 allocations from one block are ascending). Then, with
        `fallback`, blocks of other migratetypes as __rmqueue_fallback takes them: the
        largest first for unmovable/reclaimable requests (stealing the pageblock), the
        smallest first for movable ones (without stealing unless a whole pageblock goes).
        """
        out: list[np.ndarray] = []
        need = count
        for zone in zones:
            for own in (True, False) if fallback else (True,):
                if need <= 0:
                    break
                got = self._take_in_zone(need, order, mt, zone, own)
                if got.size:
                    out.append(got)
                    need -= got.size
        if not out:
            return np.zeros(0, dtype=np.int64)
        heads = np.concatenate(out)
        pfns = (heads[:, None] + np.arange(1 << order)).ravel() if order else heads
        self.set_free(pfns, False)
        return heads

    def _take_in_zone(self, need: int, order: int, mt: int, zone: Zone, own: bool) -> np.ndarray:
        orders = range(order, MAX_ORDER + 1)
        if not own and mt != MT_MOVABLE:
            orders = range(MAX_ORDER, order - 1, -1)
        taken: list[np.ndarray] = []
        for k in orders:
            per = 1 << (k - order)
            heads = self._find(k, zone, mt, own, -(-need // per))
            if heads.size == 0:
                continue
            pieces = ((heads << (k - order))[:, None] + np.arange(per)).ravel()[:need]
            if not own:
                self._steal(heads, k, mt)
            taken.append(pieces << order)
            need -= pieces.size
            if need <= 0:
                break
        return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)

    def _find(self, k: int, zone: Zone, mt: int, own: bool, want: int) -> np.ndarray:
        """Up to `want` free-list blocks of order k whose pageblock is (own) or is not of
        type `mt`, in address order from the zone start or, with an rng, from a random
        place (wrapping around). Scans in growing chunks: a small request stops early."""
        lo, hi = zone.start_pfn >> k, zone.end_pfn >> k
        if self._count(k, zone) == 0:
            return np.zeros(0, dtype=np.int64)
        at = lo + (int(self.rng.integers(hi - lo)) & ~1 if self.rng is not None else 0)
        spans = [(at, hi), (lo, at)] if at > lo else [(lo, hi)]
        found: list[np.ndarray] = []
        got, chunk = 0, 1 << 14
        for a, b in spans:
            while a < b and got < want:
                c = min(b, a + chunk)
                h = self._heads_in(k, a, c)
                pbs = (h << k) >> PAGEBLOCK_ORDER
                h = h[(self.pageblock_mt[pbs] == mt) == own]
                found.append(h)
                got += h.size
                a, chunk = c, chunk * 2
        out = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        return out[:want]

    def _heads_in(self, k: int, a: int, b: int) -> np.ndarray:
        """Free-list blocks of order k among block indices [a, b) (a, b even for k < 10)."""
        lv = self.levels[k][a:b]
        if k == MAX_ORDER:
            return np.flatnonzero(lv) + a
        even, odd = lv[0::2], lv[1::2]
        pairs = np.flatnonzero(even != odd)
        heads: np.ndarray = a + 2 * pairs + odd[pairs]
        return heads

    def _steal(self, heads: np.ndarray, k: int, mt: int) -> None:
        """Claim the pageblocks of fallback blocks: always for a whole pageblock or more;
        for unmovable/reclaimable requests when at least half the pageblock is free."""
        first = (heads << k) >> PAGEBLOCK_ORDER
        if k >= PAGEBLOCK_ORDER:
            span = 1 << (k - PAGEBLOCK_ORDER)
            self.pageblock_mt[(first[:, None] + np.arange(span)).ravel()] = mt
        elif mt != MT_MOVABLE:
            per_pb = self.levels[0][: self.nframes].reshape(-1, PAGEBLOCK_PAGES)
            half = np.count_nonzero(per_pb[first], axis=1) >= PAGEBLOCK_PAGES // 2
            self.pageblock_mt[first[half]] = mt

    # ------------------------------------------------------------------ checking

    def check(self, free: np.ndarray | None = None) -> None:
        """Every level equals its recomputation from the frames (and `free`, if given)."""
        if free is not None:
            assert np.array_equal(self.levels[0], free), "buddy: free bitmap differs from frames"
        lv = self.levels[0]
        for k in range(1, MAX_ORDER + 1):
            lv = _halve(lv)
            assert np.array_equal(self.levels[k], lv), f"buddy: order-{k} bitmap is stale"
        total = 0
        for z in self.zones:
            blocks = self.free_blocks(z)
            assert min(blocks) >= 0, f"buddy: negative count in zone {z.name}"
            pages = sum(c << k for k, c in enumerate(blocks))
            assert pages == self.nr_free(z), f"buddy: zone {z.name} lists lose pages"
            total += pages
        assert total == self.nr_free(), "buddy: free pages outside every zone"


def _halve(lv: np.ndarray) -> np.ndarray:
    both: np.ndarray = lv.view(np.uint16) == _BOTH_FREE
    return both


def decompose(free: np.ndarray, start: int = 0) -> list[tuple[int, int]]:
    """(pfn, order) of the maximal aligned free blocks, computed naively frame by frame:
    the reference the tests compare the bitmaps against."""
    out = []
    pfn, end = start, start + free.size
    while pfn < end:
        if not free[pfn - start]:
            pfn += 1
            continue
        order = 0
        while (
            order < MAX_ORDER
            and pfn % (1 << (order + 1)) == 0
            and pfn + (1 << (order + 1)) <= end
            and free[pfn - start : pfn - start + (1 << (order + 1))].all()
        ):
            order += 1
        out.append((pfn, order))
        pfn += 1 << order
    return out
