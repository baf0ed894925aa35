"""Layout metrics (memdefragd.pipeline.score) and the unusable free space index (memdefragd.pipeline.score).

Each property test compares the numpy code with a slow reference written here straight from
the definitions (the pipeline/score.py docstring, and the kernel's mm/vmstat.c
for the unusable index): plain Python loops over pages and over aligned regions, exact
fractions. Hypothesis builds layouts the way the kernel makes them: present pages in runs,
physical frames that are often contiguous, and THP flags only on whole aligned regions that
are fully present and mapped by one aligned, contiguous huge page.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memdefragd.model import PMD_PAGES, Layout
from memdefragd.pipeline.score import (
    DEFAULT_KS,
    DEFAULT_PS,
    Contiguity,
    aligned_bounds,
    contiguity,
    free_pages,
    rollup,
    run_lengths,
    unusable_index,
    vma_metrics,
)

SETTINGS = settings(max_examples=200, deadline=None)
SMALL_PMDS = (4, 8, 16)
# Fractions p as an operator writes them; see test_runs_for_uses_the_decimal_fraction for others.
PS = (0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


# --------------------------------------------------------------------------------------------
# Reference implementations (slow, obvious)
# --------------------------------------------------------------------------------------------


def ref_runs(vpn: Sequence[int], pfn: Sequence[int]) -> list[int]:
    """A run grows while both vpn and pfn step by exactly +1."""
    runs: list[int] = []
    for i in range(len(vpn)):
        if i > 0 and vpn[i] == vpn[i - 1] + 1 and pfn[i] == pfn[i - 1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


@dataclass
class RefContiguity:
    runs: int
    largest_run: int
    mean_run: Fraction
    coverage: dict[int, Fraction]
    runs_for: dict[float, int]


def ref_contiguity(runs: Sequence[int], ks: Sequence[int], ps: Sequence[float]) -> RefContiguity:
    total = sum(runs)
    if total == 0:
        return RefContiguity(0, 0, Fraction(0), {k: Fraction(0) for k in ks}, {p: 0 for p in ps})
    desc = sorted(runs, reverse=True)
    coverage = {k: Fraction(sum(desc[:k]), total) for k in ks}
    runs_for = {}
    for p in ps:
        target = Fraction(str(p))  # the decimal the operator wrote: 0.9 means 9/10
        covered = used = 0
        while Fraction(covered, total) < target:
            covered += desc[used]
            used += 1
        runs_for[p] = used
    return RefContiguity(len(desc), desc[0], Fraction(total, len(desc)), coverage, runs_for)


def assert_contiguity_matches(got: Contiguity | None, want: RefContiguity) -> None:
    assert got is not None
    assert got.runs == want.runs
    assert got.largest_run == want.largest_run
    assert got.mean_run == float(want.mean_run)
    assert got.coverage == {k: float(v) for k, v in want.coverage.items()}
    assert got.runs_for == want.runs_for


@dataclass
class Case:
    """A generated layout plus the plain lists it was built from."""

    start: int
    end: int
    vpn: list[int]
    pfn: list[int]  # the true frames, even when the layout hides them
    thp: list[bool]
    pfn_known: bool
    pmd: int

    @property
    def layout(self) -> Layout:
        return Layout(
            start_vpn=self.start,
            end_vpn=self.end,
            vpn=np.array(self.vpn, dtype=np.uint64),
            pfn=np.array(self.pfn if self.pfn_known else [0] * len(self.pfn), dtype=np.uint64),
            thp=np.array(self.thp, dtype=bool),
            pfn_known=self.pfn_known,
        )


@dataclass
class RefMetrics:
    present_pages: int
    thp_pages: int
    aligned_regions: int
    thp_regions: int
    collapsible_regions: int
    aligned_contiguous_regions: int | None
    runs: list[int] | None


def ref_metrics(case: Case, max_ptes_none: int, eligible: bool = True) -> RefMetrics:
    pmd = case.pmd
    frame = dict(zip(case.vpn, case.pfn, strict=True))
    huge = dict(zip(case.vpn, case.thp, strict=True))
    regions = thp_regions = collapsible = aligned_contig = 0
    for head in range(case.start, case.end):
        # an aligned region counts only if it lies fully inside [start, end)
        if head % pmd or head + pmd > case.end:
            continue
        pages = range(head, head + pmd)
        present = sum(v in frame for v in pages)
        regions += 1
        is_thp = present == pmd and all(huge[v] for v in pages)
        thp_regions += is_thp
        # khugepaged: at most max_ptes_none empty PTEs, and something to collapse
        if eligible and not is_thp and present >= max(pmd - max_ptes_none, 1):
            collapsible += 1
        if (
            present == pmd
            and not is_thp
            and frame[head] % pmd == 0
            and all(frame[v] == frame[head] + (v - head) for v in pages)
        ):
            aligned_contig += 1
    return RefMetrics(
        present_pages=len(case.vpn),
        thp_pages=sum(case.thp),
        aligned_regions=regions,
        thp_regions=thp_regions,
        collapsible_regions=collapsible,
        aligned_contiguous_regions=aligned_contig if case.pfn_known else None,
        runs=ref_runs(case.vpn, case.pfn) if case.pfn_known else None,
    )


def ref_unusable_index(blocks: Sequence[int]) -> list[Fraction]:
    """mm/vmstat.c fill_contig_page_info() + unusable_free_index(), exact (not in 1/1000)."""
    total = sum(b << order for order, b in enumerate(blocks))
    out = []
    for j in range(len(blocks)):
        if total == 0:
            out.append(Fraction(1))
            continue
        suitable = sum(blocks[i] << (i - j) for i in range(j, len(blocks)))
        out.append(Fraction(total - (suitable << j), total))
    return out


def kernel_unusable_thousandths(blocks: Sequence[int], j: int) -> int:
    """What debugfs extfrag/unusable_index prints (integer 0..1000) for order j."""
    total = sum(b << order for order, b in enumerate(blocks))
    if total == 0:
        return 1000
    suitable = sum(blocks[i] << (i - j) for i in range(j, len(blocks)))
    return (total - (suitable << j)) * 1000 // total


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

PFN_MAX = 1 << 24


@st.composite
def cases(draw: st.DrawFn, pmd: int | None = None, pfn_known: bool | None = None) -> Case:
    if pmd is None:
        pmd = draw(st.sampled_from((*SMALL_PMDS, 8, PMD_PAGES)))
    start = draw(st.integers(0, 1 << 20)) * pmd
    if draw(st.booleans()):
        start += draw(st.integers(0, pmd - 1))  # VMA not aligned
    length = draw(st.integers(1, (5 if pmd == PMD_PAGES else 24) * pmd))
    end = start + length
    if draw(st.booleans()) and end // pmd * pmd > start:
        end = end // pmd * pmd  # aligned end
    if pfn_known is None:
        pfn_known = draw(st.sampled_from((True, True, True, False)))

    vpn: list[int] = []
    pfn: list[int] = []
    thp: list[bool] = []
    nxt = draw(st.integers(0, PFN_MAX))  # the frame a continuing run would use next
    for region in range(start // pmd, (end - 1) // pmd + 1):
        lo, hi = max(start, region * pmd), min(end, (region + 1) * pmd)
        whole = hi - lo == pmd
        modes = ["empty", "sparse", "dense", "full"]
        if whole:
            modes += ["thp", "thp", "aligned", "aligned", "shifted", "broken"]
        mode = draw(st.sampled_from(modes))
        if mode in ("thp", "aligned", "shifted", "broken"):
            # one physically contiguous block of pmd frames, aligned unless 'shifted'
            head = draw(st.integers(0, PFN_MAX // pmd)) * pmd
            if mode == "shifted":
                head += draw(st.integers(1, pmd - 1))
            frames = [head + i for i in range(pmd)]
            if mode == "broken":  # one frame elsewhere: neither THP nor aligned-contiguous
                i = draw(st.integers(0, pmd - 1))
                frames[i] = draw(st.integers(0, PFN_MAX).filter(lambda f, bad=head + i: f != bad))
            vpn += range(lo, hi)
            pfn += frames
            thp += [mode == "thp"] * pmd
            nxt = frames[-1] + 1
            continue
        if mode == "empty":
            pages: list[int] = []
        elif mode == "sparse":
            pages = sorted(set(draw(st.lists(st.integers(lo, hi - 1), max_size=6))))
        elif mode == "dense":
            holes = set(draw(st.lists(st.integers(lo, hi - 1), max_size=6)))
            pages = [v for v in range(lo, hi) if v not in holes]
        else:
            pages = list(range(lo, hi))
        # frames continue the current run (also across holes in vpn, which must still
        # break a run) except where a new run starts at a random frame
        jumps = draw(
            st.dictionaries(
                st.integers(0, max(len(pages) - 1, 0)), st.integers(0, PFN_MAX), max_size=4
            )
        )
        for i, v in enumerate(pages):
            nxt = jumps.get(i, nxt)
            vpn.append(v)
            pfn.append(nxt)
            thp.append(False)
            nxt += 1
    return Case(start, end, vpn, pfn, thp, pfn_known, pmd)


ks_st = st.lists(st.integers(1, 300), min_size=1, max_size=4, unique=True)
ps_st = st.lists(st.sampled_from(PS), min_size=1, max_size=4, unique=True)


@st.composite
def case_and_knob(draw: st.DrawFn, pmd: int | None = None) -> tuple[Case, int]:
    case = draw(cases(pmd=pmd))
    knob = draw(st.one_of(st.sampled_from((0, case.pmd - 1)), st.integers(0, case.pmd - 1)))
    return case, knob


def metrics_of(case: Case, **kw):
    return vma_metrics(case.layout, pmd_pages=case.pmd, **kw)


def hist_list(hist) -> list[int]:
    """A run histogram (lengths, counts) as the sorted list of run lengths."""
    values, counts = hist
    return np.repeat(values, counts).tolist()


def windows_of(case: Case, cuts: list[int]) -> list[Layout]:
    """The case's layout cut at PMD-aligned vpns, as a windowed reader would deliver it."""
    bounds = sorted({case.start, case.end, *(c for c in cuts if case.start < c < case.end)})
    lay = case.layout
    out = []
    for lo, hi in itertools.pairwise(bounds):
        sel = (lay.vpn >= lo) & (lay.vpn < hi)
        out.append(Layout(lo, hi, lay.vpn[sel], lay.pfn[sel], lay.thp[sel], lay.pfn_known))
    return out


# --------------------------------------------------------------------------------------------
# Sanity of the generator itself: it must produce the interesting cases, or the properties
# below test little.
# --------------------------------------------------------------------------------------------


def test_generator_covers_thp_aligned_contiguous_and_unaligned_vmas() -> None:
    seen = {"thp": 0, "aligned": 0, "unaligned": 0, "collapsible": 0, "unknown": 0, "512": 0}

    @settings(max_examples=200, deadline=None, database=None)
    @given(cases())
    def look(case: Case) -> None:
        ref = ref_metrics(case, case.pmd - 1)
        seen["thp"] += ref.thp_regions > 0
        seen["aligned"] += bool(ref.aligned_contiguous_regions)
        seen["unaligned"] += case.start % case.pmd != 0
        seen["collapsible"] += ref.collapsible_regions > 0
        seen["unknown"] += not case.pfn_known
        seen["512"] += case.pmd == PMD_PAGES

    look()
    assert all(n >= 5 for n in seen.values()), seen


# --------------------------------------------------------------------------------------------
# Properties against the references
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(
    case_and_knob(),
    st.lists(st.integers(0, 64), max_size=6),
    st.lists(st.sampled_from(PS), min_size=1, max_size=3, unique=True),
)
def test_windows_fold_to_the_same_metrics(
    ck: tuple[Case, int], cut_regions: list[int], ps: list[float]
) -> None:
    """Feeding a layout in PMD-aligned windows (bounded memory) changes no figure."""
    case, knob = ck
    base = case.start // case.pmd
    cuts = [(base + r) * case.pmd for r in cut_regions]
    whole = vma_metrics(case.layout, pmd_pages=case.pmd, max_ptes_none=knob, ps=ps)
    parts = vma_metrics(windows_of(case, cuts), pmd_pages=case.pmd, max_ptes_none=knob, ps=ps)
    for name in ("present_pages", "thp_pages", "aligned_regions", "thp_regions",
                 "collapsible_regions", "aligned_contiguous_regions", "contiguity"):  # fmt: skip
        assert getattr(parts, name) == getattr(whole, name), name
    if case.pfn_known:
        assert hist_list(parts.run_hist) == sorted(ref_runs(case.vpn, case.pfn))


@SETTINGS
@given(cases(pfn_known=True))
def test_run_lengths_match_reference(case: Case) -> None:
    got = run_lengths(case.layout.vpn, case.layout.pfn)
    assert got.dtype == np.int64
    assert got.tolist() == ref_runs(case.vpn, case.pfn)


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(-3, 3)), max_size=60),
    st.integers(0, 1 << 30),
    st.integers(3, 1 << 30),
)
def test_run_lengths_arbitrary_steps(steps: list[tuple[int, int]], v0: int, f0: int) -> None:
    """vpn steps of 1..3 and pfn steps of -3..3 (incl. 0: the shared zero page)."""
    vpn, pfn = [], []
    if steps:
        vpn, pfn = [v0], [f0 + 1000]
        for dv, df in steps[1:]:
            vpn.append(vpn[-1] + dv)
            pfn.append(pfn[-1] + df)
    got = run_lengths(np.array(vpn, dtype=np.uint64), np.array(pfn, dtype=np.uint64))
    assert got.tolist() == ref_runs(vpn, pfn)
    assert int(got.sum()) == len(vpn)


@SETTINGS
@given(st.lists(st.integers(1, 5000), max_size=300), ks_st, ps_st)
def test_contiguity_matches_reference(lengths: list[int], ks: list[int], ps: list[float]) -> None:
    assert_contiguity_matches(
        contiguity(np.array(lengths, dtype=np.int64), ks, ps), ref_contiguity(lengths, ks, ps)
    )


@SETTINGS
@given(cases(pfn_known=True), ks_st, ps_st)
def test_contiguity_of_layout_matches_reference(case: Case, ks: list[int], ps: list[float]) -> None:
    m = metrics_of(case, ks=ks, ps=ps)
    assert_contiguity_matches(m.contiguity, ref_contiguity(ref_runs(case.vpn, case.pfn), ks, ps))


@SETTINGS
@given(case_and_knob(), st.booleans())
def test_vma_metrics_match_reference(ck: tuple[Case, int], eligible: bool) -> None:
    case, knob = ck
    m = metrics_of(case, max_ptes_none=knob, collapse_eligible=eligible)
    ref = ref_metrics(case, knob, eligible)
    assert m.present_pages == ref.present_pages
    assert m.thp_pages == ref.thp_pages
    assert m.aligned_regions == ref.aligned_regions
    assert m.thp_regions == ref.thp_regions
    assert m.collapsible_regions == ref.collapsible_regions
    assert m.aligned_contiguous_regions == ref.aligned_contiguous_regions
    if ref.runs is None:
        assert m.run_hist is None
        assert m.contiguity is None
    else:
        assert m.run_hist is not None
        assert hist_list(m.run_hist) == sorted(ref.runs)
        assert_contiguity_matches(m.contiguity, ref_contiguity(ref.runs, DEFAULT_KS, DEFAULT_PS))


@SETTINGS
@given(case_and_knob(pmd=PMD_PAGES))
def test_vma_metrics_real_pmd_size(ck: tuple[Case, int]) -> None:
    """Same property with the real 512-page regions and the default pmd_pages argument."""
    case, knob = ck
    m = vma_metrics(case.layout, max_ptes_none=knob)
    ref = ref_metrics(case, knob)
    assert (m.aligned_regions, m.thp_regions, m.collapsible_regions, m.thp_pages) == (
        ref.aligned_regions,
        ref.thp_regions,
        ref.collapsible_regions,
        ref.thp_pages,
    )
    assert m.aligned_contiguous_regions == ref.aligned_contiguous_regions


@SETTINGS
@given(cases())
def test_thp_coverage_matches_reference(case: Case) -> None:
    m = metrics_of(case)
    ref = ref_metrics(case, case.pmd - 1)
    if ref.aligned_regions == 0:
        assert m.thp_coverage is None
    else:
        assert m.thp_coverage == float(Fraction(ref.thp_regions, ref.aligned_regions))
        # bytes mapped by PMD THPs over bytes of aligned regions: the same ratio in pages
        assert m.thp_coverage == ref.thp_pages / (ref.aligned_regions * case.pmd)


@SETTINGS
@given(cases())
def test_collapsible_is_monotone_in_max_ptes_none(case: Case) -> None:
    counts = [
        metrics_of(case, max_ptes_none=n).collapsible_regions
        for n in sorted({0, 1, case.pmd // 2, case.pmd - 1})
    ]
    assert counts == sorted(counts)
    assert counts[-1] == ref_metrics(case, case.pmd - 1).collapsible_regions


@SETTINGS
@given(cases(pfn_known=True))
def test_hiding_pfns_keeps_the_pfn_free_figures(case: Case) -> None:
    shown = metrics_of(case)
    hidden_case = Case(case.start, case.end, case.vpn, case.pfn, case.thp, False, case.pmd)
    hidden = metrics_of(hidden_case)
    assert hidden.contiguity is None
    assert hidden.aligned_contiguous_regions is None
    assert hidden.run_hist is None
    for name in ("present_pages", "thp_pages", "aligned_regions", "thp_regions"):
        assert getattr(hidden, name) == getattr(shown, name)
    assert hidden.collapsible_regions == shown.collapsible_regions


@SETTINGS
@given(st.integers(0, 1 << 40), st.integers(0, 5000), st.sampled_from((*SMALL_PMDS, PMD_PAGES)))
def test_aligned_bounds_match_reference(start: int, length: int, pmd: int) -> None:
    end = start + length
    first, last = aligned_bounds(start, end, pmd)
    heads = [h for h in range(start, end) if h % pmd == 0 and h + pmd <= end]
    assert (last - first) // pmd == len(heads)
    if heads:
        assert (first, last) == (heads[0], heads[-1] + pmd)
    assert first % pmd == 0 and last % pmd == 0 and first <= last


@SETTINGS
@given(
    st.sampled_from((*SMALL_PMDS, PMD_PAGES)).flatmap(
        lambda pmd: st.lists(cases(pmd=pmd), max_size=4)
    ),
    ks_st,
    ps_st,
)
def test_rollup_matches_reference(cs: list[Case], ks: list[int], ps: list[float]) -> None:
    ms = [metrics_of(c, ks=ks, ps=ps) for c in cs]
    r = rollup(ms, ks, ps)
    refs = [ref_metrics(c, c.pmd - 1) for c in cs]
    assert r.vmas == len(cs)
    assert r.present_pages == sum(x.present_pages for x in refs)
    assert r.thp_pages == sum(x.thp_pages for x in refs)
    assert r.aligned_regions == sum(x.aligned_regions for x in refs)
    assert r.thp_regions == sum(x.thp_regions for x in refs)
    assert r.collapsible_regions == sum(x.collapsible_regions for x in refs)
    regions = sum(x.aligned_regions for x in refs)
    thp = sum(x.thp_regions for x in refs)
    assert r.thp_coverage == (float(Fraction(thp, regions)) if regions else None)
    if all(c.pfn_known for c in cs):
        # one TLB serves the whole process: contiguity over all its runs, VMA by VMA
        runs = [n for x in refs for n in (x.runs or [])]
        assert_contiguity_matches(r.contiguity, ref_contiguity(runs, ks, ps))
        assert r.aligned_contiguous_regions == sum(x.aligned_contiguous_regions or 0 for x in refs)
    else:
        assert r.contiguity is None
        assert r.aligned_contiguous_regions is None


@SETTINGS
@given(
    st.lists(
        st.one_of(st.just(0), st.integers(0, 40), st.integers(0, 1 << 20)), min_size=1, max_size=14
    )
)
def test_unusable_index_matches_kernel_formula(blocks: list[int]) -> None:
    got = unusable_index(blocks)
    want = ref_unusable_index(blocks)
    assert got.shape == (len(blocks),)
    for j, (g, w) in enumerate(zip(got.tolist(), want, strict=True)):
        assert g == pytest.approx(float(w), rel=1e-12, abs=1e-15)
        k = kernel_unusable_thousandths(blocks, j)
        # debugfs prints floor(index * 1000): our float must land in that bucket
        assert k / 1000 - 1e-12 <= g < (k + 1) / 1000 + 1e-12
    assert free_pages(blocks) == sum(b << i for i, b in enumerate(blocks))


# --------------------------------------------------------------------------------------------
# Exact examples with hand-computed answers
# --------------------------------------------------------------------------------------------


def _layout(start: int, end: int, vpn, pfn, thp=None, pfn_known: bool = True) -> Layout:
    vpn = np.asarray(vpn, dtype=np.uint64)
    return Layout(
        start_vpn=start,
        end_vpn=end,
        vpn=vpn,
        pfn=np.asarray(pfn, dtype=np.uint64),
        thp=np.zeros(vpn.size, bool) if thp is None else np.asarray(thp, dtype=bool),
        pfn_known=pfn_known,
    )


def test_64_region_vma_half_thp() -> None:
    """128 MiB VMA at 1 GiB, all present. Regions 0-31: THPs; 32-47: aligned and contiguous
    (continuing the same physical range); 48-63: frames in reverse order (no run > 1)."""
    n = 64 * PMD_PAGES
    start = 1 << 18  # vpn of 1 GiB
    vpn = np.arange(start, start + n, dtype=np.uint64)
    pfn = np.arange(0x100000, 0x100000 + n, dtype=np.uint64)
    tail = 48 * PMD_PAGES
    pfn[tail:] = pfn[tail:][::-1]
    thp = np.zeros(n, bool)
    thp[: 32 * PMD_PAGES] = True
    m = vma_metrics(_layout(start, start + n, vpn, pfn, thp))

    assert m.present_pages == 32768
    assert m.aligned_regions == 64
    assert m.thp_regions == 32
    assert m.thp_pages == 32 * 512
    assert m.thp_coverage == 0.5
    assert m.collapsible_regions == 32  # every non-THP region is full
    assert m.aligned_contiguous_regions == 16
    c = m.contiguity
    assert c is not None
    # one run of 48 regions = 24576 pages, then 8192 single pages
    assert (c.runs, c.largest_run) == (8193, 24576)
    assert c.mean_run == 32768 / 8193
    assert c.coverage == {32: (24576 + 31) / 32768, 128: (24576 + 127) / 32768}
    # 0.9 * 32768 = 29491.2 -> 24576 + 4916 singles; 0.99 * 32768 = 32440.32 -> + 7865
    assert c.runs_for == {0.9: 4917, 0.99: 7866}


def test_unaligned_vma_counts_only_inner_regions() -> None:
    # [100, 1636): aligned regions [512, 1024) and [1024, 1536) only
    start, end = 100, 100 + 3 * PMD_PAGES
    vpn = np.arange(start, end)
    m = vma_metrics(_layout(start, end, vpn, vpn))  # pfn == vpn: one run, aligned frames
    assert m.aligned_regions == 2
    assert m.aligned_contiguous_regions == 2
    assert m.collapsible_regions == 2
    assert m.thp_coverage == 0.0
    assert m.run_hist is not None and hist_list(m.run_hist) == [1536]
    # the same frames shifted by one page are contiguous but not 512-aligned
    m = vma_metrics(_layout(start, end, vpn, vpn + 1))
    assert m.aligned_contiguous_regions == 0
    assert m.contiguity is not None and m.contiguity.largest_run == 1536


def test_small_vma_has_no_regions() -> None:
    vpn = np.arange(10, 500)
    m = vma_metrics(_layout(1, 511, vpn, vpn))
    assert (m.aligned_regions, m.thp_regions, m.collapsible_regions) == (0, 0, 0)
    assert m.thp_coverage is None
    assert m.aligned_contiguous_regions == 0


@pytest.mark.parametrize(
    ("max_ptes_none", "eligible", "want"),
    [(7, True, 3), (6, True, 2), (3, True, 2), (2, True, 1), (0, True, 1), (7, False, 0)],
)
def test_collapsible_with_max_ptes_none(max_ptes_none: int, eligible: bool, want: int) -> None:
    """pmd_pages=8, VMA [0, 40): region 0 full, 1 with 5 pages, 2 with 1, 3 empty, 4 a THP."""
    vpn = [*range(0, 8), 8, 9, 11, 13, 15, 20, *range(32, 40)]
    thp = [False] * 14 + [True] * 8
    m = vma_metrics(
        _layout(0, 40, vpn, [1000 + 2 * v for v in vpn], thp),
        max_ptes_none=max_ptes_none,
        collapse_eligible=eligible,
        pmd_pages=8,
    )
    assert (m.aligned_regions, m.thp_regions) == (5, 1)
    assert m.collapsible_regions == want


def test_empty_region_is_never_collapsible() -> None:
    m = vma_metrics(_layout(0, 16, [], []), max_ptes_none=7, pmd_pages=8)
    assert (m.aligned_regions, m.collapsible_regions, m.present_pages) == (2, 0, 0)
    assert m.contiguity == Contiguity(0, 0, 0.0, {32: 0.0, 128: 0.0}, {0.9: 0, 0.99: 0})
    # even when the knob allows more empty PTEs than a region has (511 > 8): nothing to collapse
    m = vma_metrics(_layout(0, 16, [3], [77]), pmd_pages=8)
    assert m.collapsible_regions == 1


def test_partly_flagged_region_is_not_a_thp() -> None:
    """Only a region whose every page is PMD-mapped counts as a THP: a region where some
    pages carry the flag (say a scanner flagged the PTE-mapped remains of a THP after one
    page was zapped) is an ordinary, collapsible region."""
    vpn = np.arange(PMD_PAGES, 3 * PMD_PAGES)
    vpn = np.delete(vpn, 7)  # one hole in the first region
    thp = np.ones(vpn.size, bool)
    thp[PMD_PAGES - 1 :] = False  # second region: flags on its first page only
    thp[PMD_PAGES - 1] = True
    m = vma_metrics(_layout(PMD_PAGES, 3 * PMD_PAGES, vpn, vpn, thp))
    assert (m.aligned_regions, m.thp_regions, m.thp_coverage) == (2, 0, 0.0)
    assert m.collapsible_regions == 2
    assert m.thp_pages == PMD_PAGES  # 511 + 1 flagged pages
    assert m.aligned_contiguous_regions == 1  # the second region, full and aligned


def test_pfn_unknown_gives_no_contiguity() -> None:
    n = 4 * PMD_PAGES
    vpn = np.arange(n)
    thp = np.zeros(n, bool)
    thp[:PMD_PAGES] = True
    m = vma_metrics(_layout(0, n, vpn, np.zeros(n), thp, pfn_known=False))
    assert m.contiguity is None
    assert m.aligned_contiguous_regions is None
    assert m.run_hist is None
    assert (m.thp_regions, m.collapsible_regions, m.thp_coverage) == (1, 3, 0.25)

    known = vma_metrics(_layout(0, n, vpn, vpn, thp))
    r = rollup([m, known])
    assert r.contiguity is None
    assert r.aligned_contiguous_regions is None
    assert (r.vmas, r.present_pages, r.thp_regions, r.aligned_regions) == (2, 2 * n, 2, 8)
    assert r.thp_coverage == 0.25

    r = rollup([known, known])
    assert r.aligned_contiguous_regions == 6
    assert r.contiguity is not None
    assert (r.contiguity.runs, r.contiguity.largest_run) == (2, n)  # VMAs never share a run


def test_rollup_of_nothing() -> None:
    r = rollup([])
    assert (r.vmas, r.present_pages, r.aligned_regions) == (0, 0, 0)
    assert r.thp_coverage is None
    assert r.aligned_contiguous_regions == 0
    assert r.contiguity == Contiguity(0, 0, 0.0, {32: 0.0, 128: 0.0}, {0.9: 0, 0.99: 0})


@pytest.mark.parametrize(
    ("vpn", "pfn", "want"),
    [
        ([], [], []),
        ([7], [0], [1]),
        ([0, 1, 2, 5, 6], [10, 11, 12, 13, 14], [3, 2]),  # vpn hole breaks the run
        ([0, 1, 2], [5, 4, 3], [1, 1, 1]),  # descending frames
        ([0, 1, 2, 3], [9, 9, 9, 9], [1, 1, 1, 1]),  # zero page everywhere
        ([0, 1, 2, 3], [4, 5, 9, 10], [2, 2]),
    ],
)
def test_run_lengths_examples(vpn, pfn, want) -> None:
    got = run_lengths(np.array(vpn, dtype=np.uint64), np.array(pfn, dtype=np.uint64))
    assert got.tolist() == want


def test_contiguity_example() -> None:
    c = contiguity(np.array([2, 5, 3]), ks=(1, 2, 5), ps=(0.5, 0.8, 0.81, 1.0))
    assert (c.runs, c.largest_run, c.mean_run) == (3, 5, 10 / 3)
    assert c.coverage == {1: 0.5, 2: 0.8, 5: 1.0}
    assert c.runs_for == {0.5: 1, 0.8: 2, 0.81: 3, 1.0: 3}


def test_runs_for_uses_the_decimal_fraction() -> None:
    c = contiguity(np.array([7] + [1] * 93), ps=(0.07,))
    assert c.runs_for == {0.07: 1}


def test_coverage_with_zero_entries_is_zero() -> None:
    assert contiguity(np.array([4, 4]), ks=(0,)).coverage == {0: 0.0}


@pytest.mark.parametrize(
    ("blocks", "want"),
    [
        ([0] * 11, [1.0] * 11),
        ([4, 0, 1], [0.0, 0.5, 0.5]),
        ([8], [0.0]),
        ([0, 0, 0, 1], [0.0, 0.0, 0.0, 0.0]),
        # recorded/buddyinfo.txt zone DMA: 256 + 512 + 3 * 1024 = 3840 free pages
        ([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 3], [0.0] * 9 + [256 / 3840, 768 / 3840]),
    ],
)
def test_unusable_index_examples(blocks: list[int], want: list[float]) -> None:
    assert unusable_index(blocks).tolist() == pytest.approx(want, abs=1e-15)


def test_free_pages_example() -> None:
    assert free_pages([3, 2, 0, 1]) == 3 + 4 + 8
    assert free_pages([]) == 0


def test_ranger_work_is_full_regions_not_yet_translation_contiguous():
    """For method ranger the regions worth sending are those Translation Ranger can mend:
    every page present, not huge, not at one VA-PA offset yet; judged only with frame
    numbers."""
    from memdefragd.pipeline.score import VmaAccumulator

    P = PMD_PAGES
    vpn = np.concatenate([np.arange(0, 3 * P), np.arange(3 * P, 3 * P + P // 2)]).astype(np.uint64)
    pfn = np.concatenate([
        np.arange(10 * P, 11 * P),  # region 0: one run, not huge
        np.arange(20 * P + P - 1, 20 * P - 1, -1),  # region 1: full but scattered
        np.arange(30 * P, 31 * P),  # region 2: a THP
        np.arange(40 * P + P // 2, 40 * P, -1),  # region 3: half present, scattered
    ]).astype(np.uint64)  # fmt: skip
    thp = np.zeros(vpn.size, bool)
    thp[2 * P : 3 * P] = True

    def regions(work: str, known: bool = True) -> list[int]:
        acc = VmaAccumulator(0, 4 * P, known, collect=True, work=work)
        acc.add(Layout(0, 4 * P, vpn, pfn if known else np.zeros_like(pfn), thp, known))
        got = acc.finish().collapsible_vpns
        return [int(v) // P for v in got]

    assert regions("ranger") == [1]
    assert regions("collapse") == [0, 1, 3]
    assert regions("ranger", known=False) == []  # nothing to judge contiguity by
