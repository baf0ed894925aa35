"""What Linux does without Translation Ranger, as baselines for it.

- `compact`: the kernel's zone compaction as `echo 1 > /proc/sys/vm/compact_memory` runs
  it (sync, whole zone): a migrate scanner walks pageblocks up from the zone start
  isolating movable pages, a free scanner walks pageblocks down from the zone end
  isolating free pages, and pages move from the first to the second until the scanners
  meet. THPs are skipped (isolate_migratepages_block does), as are unmovable pages; free
  pages are taken only in MOVABLE pageblocks that are not wholly free.
- `collapse`: khugepaged / MADV_COLLAPSE: per 2 MiB-aligned region, allocate a free
  order-9 block, copy the present pages in, zero-fill the rest, map it with one PMD.

Both are computed over whole arrays: the scanners' meeting point comes from cumulative
sums per pageblock instead of stepping 32 pages at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...model import PMD_PAGES
from .buddy import MT_MOVABLE, PAGEBLOCK_ORDER, PAGEBLOCK_PAGES, Zone
from .machine import ANON, BASE, CACHE, FREE, NONLRU, UNMOVABLE, Machine

COLLAPSE_REASONS = ("already_thp", "not_enough_present", "no_free_block", "unmapped")


@dataclass
class CompactResult:
    pages_migrated: int = 0
    migrate_scanned: int = 0  # frames the migrate scanner walked
    free_scanned: int = 0  # frames the free scanner walked
    failures: dict[str, int] = field(default_factory=dict)  # pages left behind, by reason


@dataclass
class CollapseResult:
    collapsed: int = 0  # regions now THPs that were not
    pages_copied: int = 0
    regions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # vpns
    status: list[str] = field(default_factory=list)  # per region: "ok" or a reason
    failures: dict[str, int] = field(default_factory=dict)  # regions by reason


def compact(machine: Machine, zone: Zone | None = None) -> CompactResult:
    """Full compaction of one zone, or of every zone in turn."""
    out = CompactResult()
    for z in machine.zones if zone is None else (zone,):
        _compact_zone(machine, z, out)
    machine.stats.compact_migrate_scanned += out.migrate_scanned
    machine.stats.compact_free_scanned += out.free_scanned
    machine.stats.compact_isolated += 2 * out.pages_migrated
    machine.stats.compact_stall += 1
    return out


def _compact_zone(m: Machine, zone: Zone, out: CompactResult) -> None:
    lo, hi = zone.start_pfn, zone.end_pfn
    kind = m.kind[lo:hi].reshape(-1, PAGEBLOCK_PAGES)
    movable = ((kind == ANON) | (kind == CACHE) | (kind == NONLRU)) & (
        m.compound[lo:hi].reshape(-1, PAGEBLOCK_PAGES) == BASE
    )
    pb = np.arange(lo >> PAGEBLOCK_ORDER, hi >> PAGEBLOCK_ORDER)
    target = (m.pageblock_mt[pb] == MT_MOVABLE) & ~m.buddy.levels[PAGEBLOCK_ORDER][pb]
    free = (kind == FREE) & target[:, None]
    mv = movable.sum(axis=1)
    fr = free.sum(axis=1)
    # Pageblocks [0, meet) are migrate-scanned, [meet, n) free-scanned: the largest
    # `meet` whose sources all fit into the free frames above it.
    need = np.concatenate(([0], np.cumsum(mv)))  # need[i]: sources in blocks [0, i)
    have = np.concatenate((np.cumsum(fr[::-1])[::-1], [0]))  # have[i]: free in [i, n)
    meet = int(np.flatnonzero(need <= have)[-1])
    src = np.flatnonzero(movable[:meet].ravel()) + lo
    top = np.flatnonzero(free[meet:][::-1].ravel())  # blocks from the top, frames upward
    blocks, within = np.divmod(top, PAGEBLOCK_PAGES)
    dst = (hi - (blocks + 1) * PAGEBLOCK_PAGES + within)[: src.size]
    m.migrate(src, dst, allow_nonlru=True)
    out.pages_migrated += int(src.size)
    out.migrate_scanned += meet * PAGEBLOCK_PAGES
    last = int(blocks[src.size - 1]) + 1 if src.size else 0
    out.free_scanned += last * PAGEBLOCK_PAGES
    scanned = slice(lo, lo + meet * PAGEBLOCK_PAGES)
    left = {
        "unmovable": int(np.count_nonzero(m.kind[scanned] == UNMOVABLE)),
        "thp": int(np.count_nonzero(m.compound[scanned] != BASE)),
    }
    for k, v in left.items():
        if v:
            out.failures[k] = out.failures.get(k, 0) + v


def collapse(
    machine: Machine,
    pid: int,
    start_vpn: int,
    end_vpn: int,
    *,
    max_ptes_none: int = PMD_PAGES - 1,
) -> CollapseResult:
    """Collapse every 2 MiB-aligned region inside [start, end) into a THP, in order:
    a region needs at least 512 - max_ptes_none present pages and a free order-9 block;
    once blocks run out, the rest fail with no_free_block. Not-present pages become new
    zero-filled pages (fresh tokens), as khugepaged fills them."""
    first = -(-start_vpn // PMD_PAGES) * PMD_PAGES
    regions = np.arange(first, end_vpn - PMD_PAGES + 1, PMD_PAGES, dtype=np.int64)
    status = np.full(regions.size, "ok", dtype=object)
    proc = machine.processes[pid]
    vma_of = np.full(regions.size, -1)
    for i, v in enumerate(proc.vmas):
        vma_of[(regions >= v.start_vpn) & (regions + PMD_PAGES <= v.end_vpn)] = i
    status[vma_of < 0] = "unmapped"
    pfns = np.full((regions.size, PMD_PAGES), -1, dtype=np.int64)
    for i, v in enumerate(proc.vmas):
        sel = vma_of == i
        pfns[sel] = v.pfn[(regions[sel] - v.start_vpn)[:, None] + np.arange(PMD_PAGES)]
    present = (pfns >= 0).sum(axis=1)
    ok = status == "ok"
    huge = ok & (present == PMD_PAGES)
    huge[huge] = machine.compound[pfns[huge, 0]] != BASE
    status[huge] = "already_thp"
    ok &= ~huge
    few = ok & (present < max(PMD_PAGES - max_ptes_none, 1))
    status[few] = "not_enough_present"
    todo = np.flatnonzero(ok & ~few)
    heads = machine.buddy.take(todo.size, PAGEBLOCK_ORDER, MT_MOVABLE, machine.zonelist(proc.node))
    status[todo[heads.size :]] = "no_free_block"
    done = todo[: heads.size]
    copied = machine.collapse_into(pid, regions[done], heads)
    failures: dict[str, int] = {}
    for r in status[status != "ok"]:
        if r != "already_thp":
            failures[r] = failures.get(r, 0) + 1
    return CollapseResult(
        collapsed=int(done.size),
        pages_copied=copied,
        regions=regions,
        status=status.tolist(),
        failures=failures,
    )
