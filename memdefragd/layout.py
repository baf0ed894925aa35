"""Fragmentation metrics over a VMA layout: pure numpy, shared by every backend.

Definitions (DESIGN.md, "Metrics over a layout"):

- a *run* is a maximal sequence of present pages whose vpn and pfn both step by exactly 1;
- coverage@K is the fraction of present pages inside the K largest runs;
- runs_for(p) is the fewest runs that together cover a fraction p of present pages;
- THP coverage is bytes mapped by PMD-size pages over bytes of the 2 MiB-aligned regions
  that lie fully inside the VMA;
- a *collapsible* region is such an aligned region, not PMD-mapped, with at least
  ``512 - max_ptes_none`` present pages (khugepaged's rule);
- an *aligned-contiguous* region is one whose 512 frames are present, contiguous and
  512-aligned but not yet PMD-mapped (it can be promoted in place).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .model import PMD_PAGES, Layout

DEFAULT_KS = (32, 128)
DEFAULT_PS = (0.9, 0.99)


@dataclass(frozen=True, slots=True)
class Contiguity:
    runs: int
    largest_run: int  # pages
    mean_run: float  # pages
    coverage: dict[int, float]  # K -> fraction of present pages in the K largest runs
    runs_for: dict[float, int]  # p -> fewest runs covering fraction p


@dataclass(frozen=True, slots=True, eq=False)
class VmaMetrics:
    present_pages: int
    thp_pages: int  # pages mapped by PMD-size huge pages
    aligned_regions: int  # 2 MiB-aligned regions fully inside the VMA
    thp_regions: int
    collapsible_regions: int
    aligned_contiguous_regions: int | None  # None: PFNs not visible
    contiguity: Contiguity | None  # None: PFNs not visible
    run_lengths: np.ndarray | None  # kept for per-process rollups

    @property
    def thp_coverage(self) -> float | None:
        if self.aligned_regions == 0:
            return None
        return self.thp_regions / self.aligned_regions


def run_lengths(vpn: np.ndarray, pfn: np.ndarray) -> np.ndarray:
    """Lengths (pages) of the translation-contiguous runs, in virtual order."""
    n = vpn.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    step_ok = (np.diff(vpn) == 1) & (np.diff(pfn) == 1)
    starts = np.flatnonzero(np.concatenate(([True], ~step_ok)))
    return np.diff(np.append(starts, n)).astype(np.int64)


def contiguity(
    lengths: np.ndarray, ks: Sequence[int] = DEFAULT_KS, ps: Sequence[float] = DEFAULT_PS
) -> Contiguity:
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return Contiguity(0, 0, 0.0, {k: 0.0 for k in ks}, {p: 0 for p in ps})
    desc = np.sort(lengths)[::-1]
    cum = np.cumsum(desc)
    coverage = {k: float(cum[min(k, desc.size) - 1]) / total for k in ks}
    runs_for = {p: int(np.searchsorted(cum, p * total, side="left")) + 1 for p in ps}
    return Contiguity(
        runs=int(desc.size),
        largest_run=int(desc[0]),
        mean_run=total / desc.size,
        coverage=coverage,
        runs_for=runs_for,
    )


def aligned_bounds(start_vpn: int, end_vpn: int, pmd_pages: int = PMD_PAGES) -> tuple[int, int]:
    """First and one-past-last vpn of the aligned regions fully inside [start, end)."""
    first = -(-start_vpn // pmd_pages) * pmd_pages
    last = (end_vpn // pmd_pages) * pmd_pages
    return first, max(first, last)


def vma_metrics(
    layout: Layout,
    *,
    max_ptes_none: int = PMD_PAGES - 1,
    collapse_eligible: bool = True,
    ks: Sequence[int] = DEFAULT_KS,
    ps: Sequence[float] = DEFAULT_PS,
    pmd_pages: int = PMD_PAGES,
) -> VmaMetrics:
    vpn, pfn, thp = layout.vpn, layout.pfn, layout.thp
    first, last = aligned_bounds(layout.start_vpn, layout.end_vpn, pmd_pages)
    nregions = (last - first) // pmd_pages

    inside = (vpn >= first) & (vpn < last)
    idx = np.flatnonzero(inside)
    region = ((vpn[idx] - first) // pmd_pages).astype(np.int64)
    present = np.bincount(region, minlength=nregions)
    thp_count = np.bincount(region, weights=thp[idx], minlength=nregions)
    is_thp = thp_count >= pmd_pages
    need = pmd_pages - max_ptes_none
    collapsible = (~is_thp) & (present >= max(need, 1)) if collapse_eligible else np.zeros(0)

    lengths = aligned_contig = cont = None
    if layout.pfn_known:
        lengths = run_lengths(vpn, pfn)
        cont = contiguity(lengths, ks, ps)
        aligned_contig = _aligned_contiguous(vpn, pfn, idx, region, present, is_thp, pmd_pages)

    return VmaMetrics(
        present_pages=int(vpn.size),
        thp_pages=int(np.count_nonzero(thp)),
        aligned_regions=int(nregions),
        thp_regions=int(np.count_nonzero(is_thp)),
        collapsible_regions=int(np.count_nonzero(collapsible)),
        aligned_contiguous_regions=aligned_contig,
        contiguity=cont,
        run_lengths=lengths,
    )


def _aligned_contiguous(
    vpn: np.ndarray,
    pfn: np.ndarray,
    idx: np.ndarray,
    region: np.ndarray,
    present: np.ndarray,
    is_thp: np.ndarray,
    pmd_pages: int,
) -> int:
    full = np.flatnonzero((present == pmd_pages) & ~is_thp)
    if full.size == 0:
        return 0
    # A full region's pages are consecutive entries of the layout; its head is the first.
    heads = idx[np.searchsorted(region, full, side="left")]
    tails = heads + pmd_pages - 1
    # Count unit pfn steps from head to tail: all 511 must be +1, and the head aligned.
    steps = np.concatenate(([0], np.cumsum(np.diff(pfn.astype(np.int64)) == 1)))
    ok = ((steps[tails] - steps[heads]) == pmd_pages - 1) & (pfn[heads] % pmd_pages == 0)
    return int(np.count_nonzero(ok))


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
        if self.aligned_regions == 0:
            return None
        return self.thp_regions / self.aligned_regions


def rollup(
    metrics: Iterable[VmaMetrics],
    ks: Sequence[int] = DEFAULT_KS,
    ps: Sequence[float] = DEFAULT_PS,
) -> Rollup:
    """Per-process totals; contiguity over all the process's runs (one TLB serves them)."""
    ms = list(metrics)
    known = all(m.contiguity is not None for m in ms)
    cont = None
    ac = None
    if known:
        lengths = [m.run_lengths for m in ms if m.run_lengths is not None]
        cont = contiguity(np.concatenate(lengths) if lengths else np.zeros(0), ks, ps)
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
