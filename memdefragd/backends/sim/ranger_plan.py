"""Where the improved Translation Ranger puts each VMA: obstacle-aware, machine-wide.

The RFC gives each VMA one anchor, packed from the zone start whatever lies there, keeps
it when an unmovable page blocks the range ("the contiguous pages stop at the
non-moveable page", Zi Yan on LKML), and keeps VMAs apart only within one process, so two
processes defragmented in turn overwrite each other. Here, instead:

- *Obstacles first.* Frames that cannot be exchanged (unmovable, non-LRU), frames already
  reserved for another VMA (of any process: one `RangeTree` for the machine), and zone
  edges cut the node's memory into clean gaps. A VMA is placed in as few pieces
  (segments) as the gaps allow, the longest gaps first, so every run ends at the end of a
  gap, never at an obstacle inside it.
- *Then fewest pages moved.* When a gap can hold the whole rest of a VMA, the anchor
  inside it is the one that leaves most pages where they already are (scored over every
  candidate at once), then the one whose frames are most often free (a migration copies
  one page, an exchange two).
- *THP-capable where it can be.* Segments that can hold a whole 2 MiB chunk keep the
  RFC's congruence (pfn = vpn modulo 512) and whole multiples of 512 pages, so their
  chunks are promoted in place; only what is left when no gap can take a whole chunk goes
  into smaller gaps, page-contiguous but not promotable. A THP that would land there
  stays where it is (its frames are reserved for it) rather than be split.
- *Relocate when blocked.* If, at execution, a destination has become an obstacle since
  planning, the rest of that segment is planned again around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ...model import PMD_PAGES
from .machine import FREE, HEAD, NONLRU, UNMOVABLE, Machine, SimProcess, SimVma

BIG_HOLE = PMD_PAGES  # a run of absent pages this long is not given frames

Owner = tuple[int, int]  # (pid, VMA start vpn)


class RangeTree:
    """Disjoint reserved frame ranges [lo, hi), each mapping vpns vpn.. of one VMA.

    Kept as sorted numpy arrays (a VMA may own thousands of small segments); adding checks
    that nothing overlaps, so two VMAs, of one process or of two, never share a frame.
    """

    def __init__(self) -> None:
        self.lo = np.zeros(0, np.int64)
        self.hi = np.zeros(0, np.int64)
        self.vpn = np.zeros(0, np.int64)
        self.pid = np.zeros(0, np.int64)
        self.vma = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.lo.size)

    def add(self, owner: Owner, vpn: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        vpn, lo, hi = (np.asarray(x, np.int64) for x in (vpn, lo, hi))
        if not lo.size:
            return
        n = lo.size
        cols = [
            np.concatenate((self.lo, lo)),
            np.concatenate((self.hi, hi)),
            np.concatenate((self.vpn, vpn)),
            np.concatenate((self.pid, np.full(n, owner[0], np.int64))),
            np.concatenate((self.vma, np.full(n, owner[1], np.int64))),
        ]
        order = np.argsort(cols[0], kind="stable")
        cols = [c[order] for c in cols]
        if (cols[1] <= cols[0]).any() or (cols[0][1:] < cols[1][:-1]).any():
            raise ValueError(f"{owner}: reserved frame ranges would overlap")
        mine = np.flatnonzero((cols[3] == owner[0]) & (cols[4] == owner[1]))
        v = np.sort(cols[2][mine])
        sizes = (cols[1] - cols[0])[mine][np.argsort(cols[2][mine], kind="stable")]
        if (v[1:] < v[:-1] + sizes[:-1]).any():
            raise ValueError(f"{owner}: two segments would map the same pages")
        self.lo, self.hi, self.vpn, self.pid, self.vma = cols

    def remove(self, keep: np.ndarray) -> None:
        """Keep only the entries where `keep` is True."""
        self.lo, self.hi, self.vpn, self.pid, self.vma = (
            a[keep] for a in (self.lo, self.hi, self.vpn, self.pid, self.vma)
        )

    def of(self, owner: Owner) -> np.ndarray:
        """Indices of the owner's entries."""
        return np.flatnonzero((self.pid == owner[0]) & (self.vma == owner[1]))

    def covered(self, nframes: int) -> np.ndarray:
        """Bool per frame: reserved by someone."""
        d = np.zeros(nframes + 1, np.int32)
        np.add.at(d, self.lo, 1)
        np.add.at(d, self.hi, -1)
        return np.cumsum(d[:-1]) > 0


@dataclass
class Plan:
    """One VMA's segments, in virtual order: vpns [vlo, vhi) go to frames plo.. ."""

    vlo: np.ndarray
    vhi: np.ndarray
    plo: np.ndarray

    def dest(self, vpns: np.ndarray) -> np.ndarray:
        """Planned frame of each vpn, -1 where no segment covers it."""
        if not self.vlo.size:
            return np.full(vpns.size, -1, np.int64)
        k = np.maximum(np.searchsorted(self.vlo, vpns, side="right") - 1, 0)
        ok = (vpns >= self.vlo[k]) & (vpns < self.vhi[k])
        return np.where(ok, self.plo[k] + (vpns - self.vlo[k]), -1)

    def first_pfn(self) -> int | None:
        return int(self.plo[0]) if self.plo.size else None

    def segments(self) -> list[tuple[int, int, int]]:
        return list(zip(self.vlo.tolist(), self.vhi.tolist(), self.plo.tolist(), strict=True))


class Planner:
    """Plans VMAs into the machine's free-of-obstacle gaps and remembers the plans (in
    the tree) between calls, as the kernel remembers anchors."""

    def __init__(self, tree: RangeTree):
        self.tree = tree
        self.bounds: dict[Owner, tuple[int, int]] = {}  # VMA bounds a plan was made for

    def prune(self, alive: Mapping[int, set[int]]) -> None:
        """Drop the plans of VMAs that are gone (their frames become free to others)."""
        t = self.tree
        live = np.array([_key(p, v) for p, vs in alive.items() for v in vs], np.int64)
        keep = np.isin(_key(t.pid, t.vma), live)
        if not keep.all():
            t.remove(keep)
        for owner in [o for o in self.bounds if o[1] not in alive.get(o[0], ())]:
            del self.bounds[owner]

    def plan(self, m: Machine, proc: SimProcess, vma: SimVma) -> Plan | None:
        """The VMA's plan, extended to cover pages present now but not yet planned."""
        owner = (proc.pid, vma.start_vpn)
        if self.bounds.get(owner, (vma.start_vpn, vma.end_vpn))[1] > vma.end_vpn:
            self._drop(owner)  # it shrank: plan again
        self.bounds[owner] = (vma.start_vpn, vma.end_vpn)
        plan = self._plan_of(owner)
        present = np.flatnonzero(vma.pfn >= 0) + vma.start_vpn
        if not present.size:
            return None
        todo = present[plan.dest(present) < 0]
        if todo.size:
            self._place(m, proc, vma, todo)
            plan = self._plan_of(owner)
        return plan

    def relocate(
        self, m: Machine, proc: SimProcess, vma: SimVma, plan: Plan, blocked: np.ndarray
    ) -> bool:
        """Cut each segment holding a blocked vpn just before it, give the rest of the
        segment up and place those pages again around today's obstacles."""
        owner = (proc.pid, vma.start_vpn)
        d = plan.dest(blocked)
        blocked = blocked[d >= 0]
        if not blocked.size:
            return False
        kinds = m.kind[plan.dest(blocked)]
        if not ((kinds == UNMOVABLE) | (kinds == NONLRU)).any():
            return False  # nothing new in the way: planning again would change nothing
        t = self.tree
        mine = t.of(owner)
        cut_at = {}  # tree index -> first blocked vpn inside it
        for v in np.unique(blocked).tolist():
            i = mine[(t.vpn[mine] <= v) & (t.vpn[mine] + t.hi[mine] - t.lo[mine] > v)]
            if i.size and int(i[0]) not in cut_at:
                cut_at[int(i[0])] = v
        if not cut_at:
            return False
        idx = np.array(sorted(cut_at), np.int64)
        cuts = np.array([cut_at[i] for i in idx.tolist()], np.int64)
        new_hi = t.lo[idx] + (cuts - t.vpn[idx])
        t.hi[idx] = new_hi
        t.remove(t.hi > t.lo)
        present = np.flatnonzero(vma.pfn >= 0) + vma.start_vpn
        todo = present[self._plan_of(owner).dest(present) < 0]
        if todo.size:
            self._place(m, proc, vma, todo)
        new = self._plan_of(owner)
        plan.vlo, plan.vhi, plan.plo = new.vlo, new.vhi, new.plo
        return True

    # ------------------------------------------------------------ internals

    def _drop(self, owner: Owner) -> None:
        t = self.tree
        t.remove((t.pid != owner[0]) | (t.vma != owner[1]))

    def _plan_of(self, owner: Owner) -> Plan:
        t = self.tree
        i = t.of(owner)
        order = np.argsort(t.vpn[i], kind="stable")
        i = i[order]
        return Plan(t.vpn[i], t.vpn[i] + (t.hi[i] - t.lo[i]), t.lo[i].copy())

    def _place(self, m: Machine, proc: SimProcess, vma: SimVma, vpns: np.ndarray) -> None:
        """Plan the present pages `vpns` (sorted) of the VMA into the node's gaps."""
        owner = (proc.pid, vma.start_vpn)
        gaps = _Gaps(m, self.tree, proc.node)
        keep_vpn = _thp_heads(m, vma, vpns)
        for lo, hi in _extents(vpns):
            segs = gaps.place(vma, lo, hi, keep_vpn)
            if segs:
                v, p, n = (np.array(x, np.int64) for x in zip(*segs, strict=True))
                self.tree.add(owner, v, p, p + n)
        # THPs left out of every segment stay in place, their frames theirs, unless a
        # segment (of any VMA) covers them: then they will be moved out of its way.
        out = keep_vpn[self._plan_of(owner).dest(keep_vpn) < 0]
        if out.size:
            kp = vma.pfn[out - vma.start_vpn]
            taken = self.tree.covered(m.nframes)[kp[:, None] + np.arange(PMD_PAGES)]
            ok = ~taken.any(axis=1)
            self.tree.add(owner, out[ok], kp[ok], kp[ok] + PMD_PAGES)


def _key(pid: np.ndarray | int, vma: np.ndarray | int) -> np.ndarray | int:
    """One integer per (pid, VMA start vpn): vpns stay below 2^36 on x86_64."""
    return (np.asarray(pid, np.int64) << 36) | np.asarray(vma, np.int64)


def _extents(vpns: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) spans of sorted present vpns, cut where BIG_HOLE or more pages are absent."""
    cut = np.flatnonzero(np.diff(vpns) > BIG_HOLE) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [vpns.size]))
    return list(zip(vpns[starts].tolist(), (vpns[ends - 1] + 1).tolist(), strict=True))


def _thp_heads(m: Machine, vma: SimVma, vpns: np.ndarray) -> np.ndarray:
    """First vpns of the THPs among the given pages."""
    h = vpns[vpns % PMD_PAGES == 0]
    h = h[h + PMD_PAGES <= vma.end_vpn]
    p = vma.pfn[h - vma.start_vpn]
    ok = (p % PMD_PAGES == 0) & (m.compound[p] == HEAD)
    heads: np.ndarray = h[ok]
    return heads


class _Gaps:
    """The clean gaps of one node (no obstacle, no reservation, one zone), consumed as
    segments are placed."""

    def __init__(self, m: Machine, tree: RangeTree, node: int):
        bad = (m.kind == UNMOVABLE) | (m.kind == NONLRU) | tree.covered(m.nframes)
        starts, ends = [], []
        for z in m.zones:
            if z.node != node:
                continue
            good = ~bad[z.start_pfn : z.end_pfn]
            edges = np.flatnonzero(np.diff(np.concatenate(([False], good, [False])).view(np.int8)))
            starts.append(edges[0::2] + z.start_pfn)
            ends.append(edges[1::2] + z.start_pfn)
        self.g0 = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.g1 = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self.free = m.kind == FREE

    def _carve(self, heads: np.ndarray) -> None:
        """Keep the frames of these THPs out of every gap (they stay where they are)."""
        for h in heads.tolist():
            j = int(np.searchsorted(self.g0, h, side="right")) - 1
            if j >= 0 and h + PMD_PAGES <= self.g1[j]:
                self._take(np.array([j]), np.array([h]), np.array([PMD_PAGES]))

    def _take(self, i: np.ndarray, a: np.ndarray, n: np.ndarray) -> None:
        """Gap i gives up frames [a, a+n): what is left of it on both sides stays."""
        left_lo, left_hi = self.g0[i], a
        right_lo, right_hi = a + n, self.g1[i]
        keep = np.ones(self.g0.size, bool)
        keep[i] = False
        g0 = np.concatenate((self.g0[keep], left_lo, right_lo))
        g1 = np.concatenate((self.g1[keep], left_hi, right_hi))
        ok = g1 > g0
        order = np.argsort(g0[ok], kind="stable")
        self.g0, self.g1 = g0[ok][order], g1[ok][order]

    def place(
        self, vma: SimVma, lo: int, hi: int, thp_vpns: np.ndarray
    ) -> list[tuple[int, int, int]]:
        """Segments (vpn, pfn, pages) covering vpns [lo, hi) of the VMA."""
        segs: list[tuple[int, int, int]] = []
        pos = lo
        if hi - lo >= PMD_PAGES:
            if self._whole(vma, lo, hi, segs):
                return segs
            head = min(-lo % PMD_PAGES, hi - lo)  # a partial chunk: never a THP
            if head:
                self._pieces(vma, lo, lo + head, thp_vpns, segs)
            pos = self._chunks(lo + head, hi, segs)
        if pos < hi:
            self._pieces(vma, pos, hi, thp_vpns, segs)
        return segs

    def _congruent_windows(self, lo: int) -> tuple[np.ndarray, np.ndarray]:
        """Per gap, the first frame congruent with vpn lo modulo 512 and the room from it."""
        a = self.g0 + (lo % PMD_PAGES - self.g0) % PMD_PAGES
        return a, self.g1 - a

    def _whole(self, vma: SimVma, lo: int, hi: int, segs: list[tuple[int, int, int]]) -> bool:
        """[lo, hi) in one congruent segment, if some gap has room for all of it."""
        a, use = self._congruent_windows(lo)
        fits = np.flatnonzero(use >= hi - lo)
        if not fits.size:
            return False
        best, at = self._best_anchor(vma, lo, hi, fits, a)
        segs.append((lo, at, hi - lo))
        self._take(np.array([best]), np.array([at]), np.array([hi - lo]))
        return True

    def _chunks(self, lo: int, hi: int, segs: list[tuple[int, int, int]]) -> int:
        """Place whole chunks from the chunk-aligned lo into the gaps with room for the
        most of them (aligned blocks), largest first; returns the first vpn left."""
        need = hi - lo
        a, use = self._congruent_windows(lo)
        big = np.flatnonzero(use >= PMD_PAGES)
        if not big.size:
            return lo
        order = big[np.lexsort((a[big], -use[big]))]
        length = use[order] // PMD_PAGES * PMD_PAGES
        cum = np.cumsum(length)
        k = min(int(np.searchsorted(cum, need)) + 1, order.size)
        order, length = order[:k], length[:k].copy()
        start = np.concatenate(([0], cum[: k - 1]))
        length[-1] = min(int(length[-1]), need - int(start[-1]))
        segs.extend(zip((lo + start).tolist(), a[order].tolist(), length.tolist(), strict=True))
        self._take(order, a[order], length)
        return lo + int(start[-1] + length[-1])

    def _best_anchor(
        self, vma: SimVma, lo: int, hi: int, fits: np.ndarray, a: np.ndarray
    ) -> tuple[int, int]:
        """Among anchors whose window [anchor, anchor + need) lies in one gap: most pages
        already in place, then most free frames (cheaper migrations than exchanges)."""
        need = hi - lo
        pfn = vma.pfn[lo - vma.start_vpn : hi - vma.start_vpn]
        vpn = np.arange(lo, hi)
        have = (pfn >= 0) & (pfn % PMD_PAGES == vpn % PMD_PAGES)
        cand = np.unique(pfn[have] - (vpn[have] - lo))  # anchors implied by present pages
        if cand.size:
            g = np.searchsorted(self.g0, cand, side="right") - 1
            ok = (g >= 0) & (cand + need <= self.g1[np.maximum(g, 0)])
            cand, g = cand[ok], g[ok]
        if cand.size:
            delta = pfn[have] - vpn[have]
            vals, counts = np.unique(delta, return_counts=True)
            score = counts[np.searchsorted(vals, cand - lo)]
            i = int(np.argmax(score))
            return int(g[i]), int(cand[i])
        # No present page is in place anywhere: the window with most free frames.
        starts = a[fits]
        idx = np.stack((starts, starts + need), axis=1).ravel()
        free = np.add.reduceat(self.free.astype(np.int32), np.minimum(idx, self.free.size - 1))
        free = free[0::2]
        i = int(np.argmax(free))
        return int(fits[i]), int(starts[i])

    def _pieces(
        self, vma: SimVma, lo: int, hi: int, thp_vpns: np.ndarray, segs: list[tuple[int, int, int]]
    ) -> None:
        """Place [lo, hi) in the largest gaps, page-contiguous but not congruent (nothing
        here can hold a whole chunk), skipping whole THPs: they stay where they are."""
        vpn = np.arange(lo, hi)
        t = thp_vpns[(thp_vpns >= lo) & (thp_vpns < hi)]
        if t.size:
            vpn = vpn[~np.isin(vpn // PMD_PAGES * PMD_PAGES, t)]
            self._carve(vma.pfn[t - vma.start_vpn])
        if not vpn.size or not self.g0.size:
            return
        size = self.g1 - self.g0
        fit = np.flatnonzero(size >= vpn.size)
        if fit.size:  # best fit: keep the large gaps for what needs them
            order = fit[np.argsort(size[fit], kind="stable")][:1]
        else:
            order = np.argsort(-size, kind="stable")
        cum = np.cumsum(size[order])
        k = min(int(np.searchsorted(cum, vpn.size)) + 1, order.size)
        order = order[:k]
        take = size[order].copy()
        start = np.concatenate(([0], cum[: k - 1]))
        take[-1] = min(int(take[-1]), vpn.size - int(start[-1]))
        stream_pfn = np.repeat(self.g0[order] - start, take) + np.arange(int(take.sum()))
        vpn = vpn[: stream_pfn.size]
        # One segment per run where both vpn and pfn step by one.
        brk = np.flatnonzero((np.diff(vpn) != 1) | (np.diff(stream_pfn) != 1)) + 1
        s = np.concatenate(([0], brk))
        e = np.concatenate((brk, [vpn.size]))
        segs.extend(zip(vpn[s].tolist(), stream_pfn[s].tolist(), (e - s).tolist(), strict=True))
        self._take(order, self.g0[order], take)
