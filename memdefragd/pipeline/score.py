"""Fragmentation metrics over a VMA layout: pure numpy, shared by every backend.

Definitions, the same for the scanner, the simulator, the daemon and its metrics:

- a *run* is a maximal sequence of present pages whose vpn and pfn both step by exactly 1;
- coverage@K is the fraction of present pages inside the K largest runs;
- runs_for(p) is the fewest runs that together cover a fraction p of present pages;
- THP coverage is bytes mapped by PMD-size pages over bytes of the 2 MiB-aligned regions
  that lie fully inside the VMA;
- a *collapsible* region is such an aligned region, not PMD-mapped, with at least
  ``512 - max_ptes_none`` present pages (khugepaged's rule);
- an *aligned-contiguous* region is one whose 512 frames are present, contiguous and
  512-aligned but not yet PMD-mapped (it can be promoted in place).

A VMA's layout may arrive in windows (consecutive Layouts whose bounds are multiples of
the PMD size, except at the VMA's ends), so that memory stays bounded by the window, not
by the target: `VmaAccumulator` folds them in order. Runs are kept as a histogram (run
length -> count), which is all that coverage@K and runs_for(p) need and which stays small.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..model import PMD_PAGES, Layout

DEFAULT_KS = (32, 128)
DEFAULT_PS = (0.9, 0.99)

RunHistogram = tuple[np.ndarray, np.ndarray]  # (distinct lengths ascending, counts)
_EMPTY_HIST: RunHistogram = (np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass(frozen=True, slots=True)
class Contiguity:
    runs: int
    largest_run: int  # pages
    mean_run: float  # pages
    coverage: dict[int, float]  # K -> fraction of present pages in the K largest runs
    runs_for: dict[float, int]  # p -> fewest runs covering fraction p


def thp_coverage(thp_regions: int, aligned_regions: int) -> float | None:
    """Huge 2 MiB regions over the aligned regions that could be huge; None when there is
    no aligned region (a VMA under 2 MiB), which is "cannot be huge", not 0%."""
    return thp_regions / aligned_regions if aligned_regions else None


@dataclass(frozen=True, slots=True, eq=False)
class VmaMetrics:
    present_pages: int
    thp_pages: int  # pages mapped by PMD-size huge pages
    aligned_regions: int  # 2 MiB-aligned regions fully inside the VMA
    thp_regions: int
    collapsible_regions: int
    aligned_contiguous_regions: int | None  # None: PFNs not visible
    contiguity: Contiguity | None  # None: PFNs not visible
    run_hist: RunHistogram | None  # kept for per-process rollups
    # With collect=True: first vpn and present pages of each collapsible region, for the
    # scheduler (None otherwise).
    collapsible_vpns: np.ndarray | None = None
    collapsible_present: np.ndarray | None = None
    thp_vpns: np.ndarray | None = None  # with collect=True: first vpn of each huge region

    @property
    def thp_coverage(self) -> float | None:
        return thp_coverage(self.thp_regions, self.aligned_regions)


def run_lengths(vpn: np.ndarray, pfn: np.ndarray) -> np.ndarray:
    """Lengths (pages) of the translation-contiguous runs, in virtual order."""
    n = vpn.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.diff(np.append(_run_starts(vpn, pfn), n))


def _run_starts(vpn: np.ndarray, pfn: np.ndarray) -> np.ndarray:
    """Indices where a run starts (0 included)."""
    step_ok = (np.diff(vpn) == 1) & (np.diff(pfn) == 1)
    starts = np.flatnonzero(~step_ok)
    starts += 1
    return np.concatenate((np.zeros(1, np.int64), starts))


def histogram(lengths: np.ndarray) -> RunHistogram:
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    return values, counts.astype(np.int64)


def merge_histograms(hists: Iterable[RunHistogram]) -> RunHistogram:
    hs = [h for h in hists if h[0].size]
    if not hs:
        return _EMPTY_HIST
    if len(hs) == 1:
        return hs[0]
    values, inverse = np.unique(np.concatenate([h[0] for h in hs]), return_inverse=True)
    counts = np.zeros(values.size, np.int64)
    np.add.at(counts, inverse, np.concatenate([h[1] for h in hs]))
    return values, counts


def contiguity(
    lengths: np.ndarray, ks: Sequence[int] = DEFAULT_KS, ps: Sequence[float] = DEFAULT_PS
) -> Contiguity:
    return contiguity_from_histogram(histogram(lengths), ks, ps)


def contiguity_from_histogram(
    hist: RunHistogram, ks: Sequence[int] = DEFAULT_KS, ps: Sequence[float] = DEFAULT_PS
) -> Contiguity:
    values, counts = hist
    if values.size == 0:
        return Contiguity(0, 0, 0.0, {k: 0.0 for k in ks}, {p: 0 for p in ps})
    v, c = values[::-1], counts[::-1]  # largest runs first
    cum_runs = np.cumsum(c)
    cum_pages = np.cumsum(v * c)
    total, nruns = int(cum_pages[-1]), int(cum_runs[-1])

    def pages_in_top(k: int) -> int:
        if k <= 0:
            return 0
        i = int(np.searchsorted(cum_runs, k, side="left"))
        if i >= v.size:
            return total
        before_runs = int(cum_runs[i - 1]) if i else 0
        before_pages = int(cum_pages[i - 1]) if i else 0
        return before_pages + (k - before_runs) * int(v[i])

    def fewest_runs(p: float) -> int:
        target = _decimal(p) * total
        i = min(int(np.searchsorted(cum_pages, float(target), side="left")), v.size - 1)
        while i and cum_pages[i - 1] >= target:  # the float search may overshoot by one
            i -= 1
        while i < v.size - 1 and cum_pages[i] < target:
            i += 1
        before_runs = int(cum_runs[i - 1]) if i else 0
        before_pages = int(cum_pages[i - 1]) if i else 0
        need = math.ceil((target - before_pages) / int(v[i]))
        return before_runs + min(max(need, 0), int(c[i]))

    return Contiguity(
        runs=nruns,
        largest_run=int(v[0]),
        mean_run=total / nruns,
        coverage={k: pages_in_top(k) / total for k in ks},
        runs_for={p: fewest_runs(p) for p in ps},
    )


@functools.lru_cache(maxsize=64)
def _decimal(p: float) -> Fraction:
    """p as the decimal the user wrote (0.07, not 0.07000000000000000666), exactly."""
    return Fraction(str(p))


def aligned_bounds(start_vpn: int, end_vpn: int, pmd_pages: int = PMD_PAGES) -> tuple[int, int]:
    """First and one-past-last vpn of the aligned regions fully inside [start, end)."""
    first = -(-start_vpn // pmd_pages) * pmd_pages
    last = (end_vpn // pmd_pages) * pmd_pages
    return first, max(first, last)


class VmaAccumulator:
    """Folds the windows of one VMA's layout, in virtual order, into VmaMetrics."""

    def __init__(
        self,
        start_vpn: int,
        end_vpn: int,
        pfn_known: bool,
        *,
        max_ptes_none: int = PMD_PAGES - 1,
        collapse_eligible: bool = True,
        pmd_pages: int = PMD_PAGES,
        collect: bool = False,
        runs: bool = True,
        work: str = "collapse",
    ):
        """`work` says what makes a region worth sending: "collapse" (not huge, with
        enough present pages for MADV_COLLAPSE) or "ranger" (Translation Ranger: every
        page present, not huge, and not translation-contiguous yet; needs frame numbers)."""
        self.first, self.last = aligned_bounds(start_vpn, end_vpn, pmd_pages)
        self.work = work
        self.runs = runs  # False: skip contiguity (the scheduler needs only the regions)
        self.collect = collect
        self.found_vpns: list[np.ndarray] = []
        self.found_present: list[np.ndarray] = []
        self.found_thp: list[np.ndarray] = []
        self.pfn_known = pfn_known
        self.need = max(pmd_pages - max_ptes_none, 1)
        self.eligible = collapse_eligible
        self.pmd = pmd_pages
        self.present = self.thp = self.thp_regions = self.collapsible = self.aligned_contig = 0
        self.hists: list[RunHistogram] = []
        self.pending: tuple[int, int, int] | None = None  # last run: (vpn, pfn, length)

    def add(self, layout: Layout) -> None:
        vpn, pfn, thp = layout.vpn, layout.pfn, layout.thp
        n = vpn.size
        self.present += n
        self.thp += int(np.count_nonzero(thp))
        self.pfn_known &= layout.pfn_known
        starts = _run_starts(vpn, pfn) if (self.runs and self.pfn_known and n) else None
        self._regions(layout, starts)
        if starts is not None:
            self._runs(vpn, pfn, starts)

    def _regions(self, layout: Layout, starts: np.ndarray | None) -> None:
        lo = max(self.first, -(-layout.start_vpn // self.pmd) * self.pmd)
        hi = min(self.last, layout.end_vpn // self.pmd * self.pmd)
        if hi <= lo:
            return
        vpn = layout.vpn
        bounds = np.arange(lo, hi + 1, self.pmd, dtype=np.uint64)
        pos = np.searchsorted(vpn, bounds)  # vpn is sorted: region r is pos[r]:pos[r+1]
        heads, present = pos[:-1], np.diff(pos)
        full = present == self.pmd
        flagged = np.flatnonzero(layout.thp)  # a region is huge only if all its pages are
        is_thp = full & (np.diff(np.searchsorted(flagged, pos)) == self.pmd)
        self.thp_regions += int(np.count_nonzero(is_thp))
        if self.collect:
            self.found_thp.append(bounds[:-1][is_thp])
        candidates = full & ~is_thp
        h = heads[candidates]
        contiguous = np.zeros(h.size, dtype=bool)  # one run (one VA-PA offset) each
        if starts is not None and h.size:
            # Contiguous iff no run starts inside (head, head + pmd).
            inside = np.searchsorted(starts, h + self.pmd, "left")
            contiguous = inside == np.searchsorted(starts, h, "right")
            ok = contiguous & (layout.pfn[h] % np.uint64(self.pmd) == 0)  # and aligned
            self.aligned_contig += int(np.count_nonzero(ok))
        if self.work == "ranger":
            can = np.zeros(present.size, dtype=bool)
            if starts is not None:  # without frame numbers, nothing to judge by
                can[np.flatnonzero(candidates)[~contiguous]] = True
        elif self.eligible:
            can = ~is_thp & (present >= self.need)
        else:
            can = np.zeros(present.size, dtype=bool)
        self.collapsible += int(np.count_nonzero(can))
        if self.collect:
            self.found_vpns.append(bounds[:-1][can])
            self.found_present.append(present[can])

    def _runs(self, vpn: np.ndarray, pfn: np.ndarray, starts: np.ndarray) -> None:
        lengths = np.diff(np.append(starts, vpn.size))
        if self.pending is not None:
            pv, pp, plen = self.pending
            if int(vpn[0]) == pv + 1 and int(pfn[0]) == pp + 1:
                lengths[0] += plen  # the previous window's last run goes on
            else:
                self.hists.append((np.array([plen]), np.ones(1, np.int64)))
        self.pending = (int(vpn[-1]), int(pfn[-1]), int(lengths[-1]))
        if lengths.size > 1:
            self.hists.append(histogram(lengths[:-1]))
        if len(self.hists) > 64:
            self.hists = [merge_histograms(self.hists)]

    def finish(
        self, ks: Sequence[int] = DEFAULT_KS, ps: Sequence[float] = DEFAULT_PS
    ) -> VmaMetrics:
        hist = cont = aligned = None
        if self.pfn_known and self.runs:
            if self.pending is not None:
                self.hists.append((np.array([self.pending[2]]), np.ones(1, np.int64)))
                self.pending = None
            hist = merge_histograms(self.hists)
            cont = contiguity_from_histogram(hist, ks, ps)
            aligned = self.aligned_contig
        return VmaMetrics(
            present_pages=self.present,
            thp_pages=self.thp,
            aligned_regions=(self.last - self.first) // self.pmd,
            thp_regions=self.thp_regions,
            collapsible_regions=self.collapsible,
            aligned_contiguous_regions=aligned,
            contiguity=cont,
            run_hist=hist,
            collapsible_vpns=_cat(self.found_vpns, np.uint64) if self.collect else None,
            collapsible_present=_cat(self.found_present, np.int64) if self.collect else None,
            thp_vpns=_cat(self.found_thp, np.uint64) if self.collect else None,
        )


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def vma_metrics(
    layout: Layout | Sequence[Layout],
    *,
    max_ptes_none: int = PMD_PAGES - 1,
    collapse_eligible: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    ps: Sequence[float] = DEFAULT_PS,
    pmd_pages: int = PMD_PAGES,
) -> VmaMetrics:
    """Metrics of one VMA from its whole layout, or from its windows in order."""
    windows = [layout] if isinstance(layout, Layout) else list(layout)
    acc = VmaAccumulator(
        windows[0].start_vpn,
        windows[-1].end_vpn,
        all(w.pfn_known for w in windows),
        max_ptes_none=max_ptes_none,
        collapse_eligible=collapse_eligible,
        pmd_pages=pmd_pages,
    )
    for w in windows:
        acc.add(w)
    return acc.finish(ks, ps)


@dataclass(frozen=True, slots=True)
class Rollup:
    vmas: int
    present_pages: int
    thp_pages: int
    aligned_regions: int
    thp_regions: int
    collapsible_regions: int
    aligned_contiguous_regions: int | None
    contiguity: Contiguity | None

    @property
    def thp_coverage(self) -> float | None:
        return thp_coverage(self.thp_regions, self.aligned_regions)


def rollup(
    metrics: Iterable[VmaMetrics],
    ks: Sequence[int] = DEFAULT_KS,
    ps: Sequence[float] = DEFAULT_PS,
) -> Rollup:
    """Per-process totals; contiguity over all the process's runs (one TLB serves them)."""
    ms = list(metrics)
    known = all(m.run_hist is not None for m in ms)
    cont = ac = None
    if known:
        cont = contiguity_from_histogram(
            merge_histograms(m.run_hist for m in ms if m.run_hist is not None), ks, ps
        )
        ac = sum(m.aligned_contiguous_regions or 0 for m in ms)
    return Rollup(
        vmas=len(ms),
        present_pages=sum(m.present_pages for m in ms),
        thp_pages=sum(m.thp_pages for m in ms),
        aligned_regions=sum(m.aligned_regions for m in ms),
        thp_regions=sum(m.thp_regions for m in ms),
        collapsible_regions=sum(m.collapsible_regions for m in ms),
        aligned_contiguous_regions=ac,
        contiguity=cont,
    )


# ---------------------------------------------------------------- system: free memory
# The unusable free space index is Mel Gorman's, as the kernel computes it for debugfs
# `extfrag/unusable_index` (mm/vmstat.c): for order j, the fraction of free memory held in
# blocks smaller than 2^j pages. 0 means every free page could serve an order-j request;
# 1 means none could. Computed from /proc/buddyinfo because debugfs is often not mounted.


def free_pages(free_blocks: Sequence[int]) -> int:
    counts = np.asarray(free_blocks, dtype=np.int64)
    return int((counts << np.arange(counts.size)).sum())


def unusable_index(free_blocks: Sequence[int]) -> np.ndarray:
    """Index per order (same length as `free_blocks`); 1.0 everywhere when nothing is free."""
    counts = np.asarray(free_blocks, dtype=np.int64)
    pages_per_order = counts << np.arange(counts.size)
    total = pages_per_order.sum()
    if total == 0:
        return np.ones(counts.size)
    usable = np.cumsum(pages_per_order[::-1])[::-1]  # pages in blocks of order >= j
    index: np.ndarray = (total - usable) / total
    return index
