"""Seeding a simulated machine from a snapshot of a real one (memdefragd/snapshot.py).

Every frame gets the simulator's nearest kind from its /proc/kpageflags word, the chosen
processes' pages go to their real frames at their real virtual addresses, and the zones
keep their real boundaries (to 4 MiB). What the model cannot hold is mapped to the nearest
thing it can and counted, so a prediction always says what it assumed:

- a free frame is one the kernel marks BUDDY. Since Linux 4.4 (`is_free_buddy_page` in
  stable_page_flags) that is every frame of a free block, not only its head as
  pagemap.rst says; the block's order is not exported, but with eager merging the free set
  decides the blocks, so the simulated buddy rebuilds /proc/buddyinfo from it. On a kernel
  that marks heads only, each head is grown to the largest aligned block of flagless frames
  after it (an upper bound: per-CPU free pages and flagless kernel pages look the same);
- LRU pages (anonymous or page cache) of other processes become unowned page cache: the
  simulator's anonymous pages need an owner and a page table, and both kinds are what
  migration and exchange_pages accept. Their 2 MiB THPs stay THPs (unowned page-cache
  THPs), since Translation Ranger stops at a THP it meets as a destination (RFC 04: at
  each of its 512 frames; measured on its kernel as dst_thp_src_not and dst_pte_thp);
  other compound pages (smaller folios, parts of larger ones) become base pages;
- shmem and tmpfs pages (page cache marked SwapBacked, not anonymous) are movable but not
  on terms exchange_pages accepts: it swaps only with anonymous pages or page cache whose
  migratepage is buffer_migrate_page or none, and shmem's is migrate_page (RFC 01/31,
  exchange_from_to_pages: -EBUSY; measured on its kernel as dst_file_failed, one skipped
  destination each). They become the simulator's non-LRU kind: compaction and migration
  move them, Translation Ranger's exchange stops at them;
- slab, page tables, reserved frames, hugetlb, the zero page and pages with no flag at all
  are unmovable; flagless whole pageblocks are counted apart (holes, memory not yet handed
  to the allocator, as zoneinfo's present and managed show).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...model import PAGE_SIZE, PMD_PAGES
from ...snapshot import (
    KPF_ANON,
    KPF_BUDDY,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_HUGE,
    KPF_HWPOISON,
    KPF_LRU,
    KPF_MLOCKED,
    KPF_NOPAGE,
    KPF_OFFLINE,
    KPF_PGTABLE,
    KPF_RESERVED,
    KPF_SLAB,
    KPF_SWAPBACKED,
    KPF_THP,
    KPF_UNEVICTABLE,
    KPF_ZERO_PAGE,
    HostSnapshot,
    ProcessShot,
    bit,
)
from ...units import format_size
from .buddy import MAX_ORDER, MT_UNMOVABLE, PAGEBLOCK_PAGES, Zone
from .machine import CACHE, FREE, HEAD, KIND_NAMES, NONLRU, TAIL, UNMOVABLE, Machine, MoveStats

# Frame classes: (name, simulated kind, what the kernel's flags said). Their order is
# their code in `classify`'s result.
CLASSES: tuple[tuple[str, int, str], ...] = (
    ("free", FREE, "free (buddy)"),
    ("anon", CACHE, "anonymous pages of other processes"),
    ("file", CACHE, "page cache"),
    ("unevictable", CACHE, "mlocked or unevictable pages (migratable)"),
    ("shmem", NONLRU, "shmem/tmpfs pages (migratable, refused by exchange_pages)"),
    ("slab", UNMOVABLE, "slab"),
    ("pgtable", UNMOVABLE, "page tables"),
    ("reserved", UNMOVABLE, "reserved, offline, poisoned or no page"),
    ("hugetlb", UNMOVABLE, "hugetlbfs pages"),
    ("zero", UNMOVABLE, "the zero page"),
    (
        "unmanaged",
        UNMOVABLE,
        "flagless whole pageblocks (holes, memory not given to the allocator)",
    ),
    ("noflag", UNMOVABLE, "flagless kernel pages (vmalloc, per-CPU lists, driver buffers)"),
    ("other", UNMOVABLE, "other pages off the LRU (driver mappings, pages in transit)"),
)
CODE = {name: i for i, (name, _, _) in enumerate(CLASSES)}
SIM_KIND = np.array([k for _, k, _ in CLASSES], dtype=np.uint8)
MOVABLE = np.array([k in (CACHE, NONLRU) for _, k, _ in CLASSES])  # a process page may sit on
UNIT = 1 << MAX_ORDER  # the simulator's zones start and end on order-10 blocks


def classify(flags: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Class code (index into CLASSES) of every frame, from its kpageflags and whether it is
    free. Tail pages of a compound page take their head's class (older kernels set LRU,
    SLAB... on heads only)."""
    f = flags

    def has(b: int) -> np.ndarray:
        out: np.ndarray = (f & bit(b)) != 0
        return out

    lru_or_anon = has(KPF_LRU) | has(KPF_ANON)
    blank = f == 0
    pb_blank = np.zeros(f.size, dtype=bool)
    whole = f.size // PAGEBLOCK_PAGES * PAGEBLOCK_PAGES
    pb_blank[:whole] = np.repeat(
        blank[:whole].reshape(-1, PAGEBLOCK_PAGES).all(axis=1), PAGEBLOCK_PAGES
    )
    conds = [
        free,
        has(KPF_NOPAGE) | has(KPF_RESERVED) | has(KPF_HWPOISON) | has(KPF_OFFLINE),
        has(KPF_HUGE),
        has(KPF_SLAB),
        has(KPF_PGTABLE),
        has(KPF_ZERO_PAGE),
        lru_or_anon & (has(KPF_UNEVICTABLE) | has(KPF_MLOCKED)),
        lru_or_anon & has(KPF_ANON),
        lru_or_anon & has(KPF_SWAPBACKED),
        lru_or_anon,
        pb_blank,
        blank,
    ]
    names = ["free", "reserved", "hugetlb", "slab", "pgtable", "zero", "unevictable", "anon",
             "shmem", "file", "unmanaged", "noflag"]  # fmt: skip
    cls = np.select(conds, [np.uint8(CODE[n]) for n in names], np.uint8(CODE["other"]))
    cls = cls.astype(np.uint8)
    heads = np.flatnonzero(has(KPF_COMPOUND_HEAD))
    tails = np.flatnonzero(has(KPF_COMPOUND_TAIL) & ~free)
    if heads.size and tails.size:
        h = np.searchsorted(heads, tails, side="right") - 1
        ok = h >= 0
        cls[tails[ok]] = cls[heads[h[ok]]]
    return cls


def free_frames(flags: np.ndarray, buddyinfo_pages: int) -> tuple[np.ndarray, bool]:
    """Which frames are free, and whether the kernel marked block heads only (then grown)."""
    buddy: np.ndarray = (flags & bit(KPF_BUDDY)) != 0
    marked = int(np.count_nonzero(buddy))
    if marked * 2 >= buddyinfo_pages:  # every frame of each block is marked
        return buddy, False
    return grow_heads(flags, buddy), True


def grow_heads(flags: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Each BUDDY head extended to the largest aligned block (order <= 10) whose other
    frames have no flag at all."""
    n = flags.size
    blank = np.concatenate(([0], np.cumsum(flags == 0)))  # blank[i]: flagless frames < i
    idx = np.flatnonzero(heads)
    order = np.zeros(idx.size, dtype=np.int64)
    for k in range(1, MAX_ORDER + 1):
        size = 1 << k
        ok = (order == k - 1) & (idx % size == 0) & (idx + size <= n)
        end = np.minimum(idx + size, n)
        ok &= blank[end] - blank[np.minimum(idx + 1, n)] == size - 1
        order[ok] = k
    free = np.zeros(n, dtype=bool)
    sizes = np.left_shift(1, order)
    starts = np.repeat(idx - np.cumsum(sizes) + sizes, sizes)
    free[starts + np.arange(int(sizes.sum()))] = True
    return free


@dataclass
class Seeding:
    """What the seeding made of a snapshot: frames per class (targets' frames excluded),
    the processes' pages placed and dropped, and each approximation in words."""

    frames: dict[str, int]
    pages: int = 0  # process pages placed at their frames
    thps: int = 0
    other_thps: int = 0  # THPs of other processes and the page cache, kept whole
    notes: list[str] = field(default_factory=list)


def seed(snap: HostSnapshot) -> tuple[Machine, Seeding]:
    """A simulated machine holding the snapshot's frames, zones and processes."""
    zones, nframes, zone_note = _zones(snap)
    flags = np.zeros(nframes, dtype=np.uint64)
    flags[: min(snap.nframes, nframes)] = snap.flags[:nframes]
    listed = sum(sum(c << k for k, c in enumerate(b.free)) for b in snap.buddyinfo)
    free, heads_only = free_frames(flags, listed)
    cls = classify(flags, free)
    cls[snap.nframes :] = CODE["unmanaged"]  # padding up to a 4 MiB multiple
    m = Machine(nframes, zones)
    taken = np.zeros(nframes, dtype=bool)
    notes = [zone_note] if zone_note else []
    pages = thps = 0
    for p in snap.processes:
        placed, made, said = _place(m, p, cls, taken)
        pages, thps = pages + placed, thps + made
        notes += said
    for kind in (UNMOVABLE, NONLRU, CACHE):
        pfns = np.flatnonzero((SIM_KIND[cls] == kind) & ~taken)
        m.alloc_at(pfns, kind)
    others, loose = other_thps(flags, cls, taken)
    if others.size:
        m.compound[(others[:, None] + np.arange(PMD_PAGES)).ravel()] = TAIL
        m.compound[others] = HEAD
    if others.size or loose:
        notes.append(f"{others.size} THPs of other processes or the page cache kept whole"
                     + (f"; {loose} pages of other compound pages (smaller or unaligned "
                        "folios) as base pages" if loose else ""))  # fmt: skip
    per_pb = np.count_nonzero(m.kind.reshape(-1, PAGEBLOCK_PAGES) == UNMOVABLE, axis=1)
    m.pageblock_mt[per_pb >= PAGEBLOCK_PAGES // 2] = MT_UNMOVABLE  # as fallback claims them
    m.stats = MoveStats()
    counts = np.bincount(cls[~taken], minlength=len(CLASSES))
    frames = {name: int(counts[i]) for i, (name, _, _) in enumerate(CLASSES)}
    found = int(np.count_nonzero(free))
    how = "heads grown over flagless frames" if heads_only else "every frame of a block marked"
    notes.insert(0, f"free: {format_size(found * PAGE_SIZE)} from kpageflags ({how}), "
                    f"{format_size(listed * PAGE_SIZE)} in /proc/buddyinfo")  # fmt: skip
    for i, (name, kind, what) in enumerate(CLASSES):
        if name != "free" and counts[i]:
            notes.append(f"{format_size(int(counts[i]) * PAGE_SIZE)} {what}: {KIND_NAMES[kind]}")
    m.meta["seeding"] = frames
    return m, Seeding(frames, pages, thps, int(others.size), notes)


def other_thps(flags: np.ndarray, cls: np.ndarray, taken: np.ndarray) -> tuple[np.ndarray, int]:
    """Head frames of the 2 MiB THPs outside the chosen processes that the model holds
    whole (512 aligned frames marked THP, head then tails, all of a page-cache kind), and
    how many other THP-marked frames of those kinds it does not (left as base pages)."""
    n = flags.size // PMD_PAGES * PMD_PAGES
    f = flags[:n].reshape(-1, PMD_PAGES)
    thp = (f & bit(KPF_THP)) != 0
    cache = (SIM_KIND[cls[:n]] == CACHE).reshape(-1, PMD_PAGES) & ~taken[:n].reshape(-1, PMD_PAGES)
    ok = thp.all(axis=1) & cache.all(axis=1) & ((f[:, 0] & bit(KPF_COMPOUND_HEAD)) != 0)
    ok &= ((f[:, 1:] & bit(KPF_COMPOUND_TAIL)) != 0).all(axis=1)
    heads: np.ndarray = np.flatnonzero(ok) * PMD_PAGES
    loose = int(np.count_nonzero(thp & cache)) - heads.size * PMD_PAGES
    return heads, loose


def _zones(snap: HostSnapshot) -> tuple[list[Zone], int, str]:
    """The snapshot's zones, each starting on a 4 MiB boundary (the first at frame 0, the
    last ending on one), so that no buddy block crosses a zone: the simulator's rule."""
    spans = sorted(snap.zones, key=lambda z: z.start_pfn)
    if not spans:
        raise ValueError("the snapshot has no populated zone")
    end = -(-max(z.end_pfn for z in spans) // UNIT) * UNIT
    starts = [0] + [z.start_pfn // UNIT * UNIT for z in spans[1:]]
    zones, moved = [], 0
    for i, z in enumerate(spans):
        lo, hi = starts[i], starts[i + 1] if i + 1 < len(spans) else end
        moved += abs(lo - z.start_pfn) + abs(hi - z.end_pfn)
        if hi > lo:
            zones.append(Zone(z.node, z.name, lo, hi))
    note = ""
    if moved:
        note = f"zone boundaries moved to 4 MiB multiples: {moved} frames change zone or pad"
    return zones, end, note


def _place(
    m: Machine, p: ProcessShot, cls: np.ndarray, taken: np.ndarray
) -> tuple[int, int, list[str]]:
    """Map `p`'s pages onto their frames: those on frames the model can hold as a
    process's page, each frame once. Returns pages placed, THPs made, and notes."""
    m.add_process(p.comm, cmdline=p.cmdline, pid=p.pid)
    for v in p.vmas:
        m.mmap(p.pid, v.end_vpn - v.start_vpn, thp=v.thp, start_vpn=v.start_vpn, path=v.path,
               perms=v.perms)  # fmt: skip
    c = cls[p.pfn]
    ok = MOVABLE[c] | (c == CODE["free"])  # free: the kernel freed or reused it meanwhile
    fixed = int(np.count_nonzero(~ok))
    _, first = np.unique(p.pfn, return_index=True)
    once = np.zeros(p.pfn.size, dtype=bool)
    once[first] = True
    shared = int(np.count_nonzero(ok & ~(once & ~taken[p.pfn])))
    keep = ok & once & ~taken[p.pfn]
    vpn, pfn, thp = p.vpn[keep], p.pfn[keep], p.thp[keep]
    m.fault_at(p.pid, vpn, pfn)
    taken[pfn] = True
    heads = _thp_heads(m, p, vpn, pfn, thp)
    if heads.size:
        m.compound[(heads[:, None] + np.arange(PMD_PAGES)).ravel()] = TAIL
        m.compound[heads] = HEAD
    notes = []
    who = f"pid {p.pid} ({p.comm})"
    if fixed:
        notes.append(f"{who}: {fixed} pages on frames the kernel cannot move (zero page, vDSO, "
                     "driver memory) left unmapped, their frames unmovable")  # fmt: skip
    if shared:
        notes.append(f"{who}: {shared} pages on frames mapped already (shared): mapped once")
    lost = int(np.count_nonzero(thp)) - heads.size * PMD_PAGES
    if lost:
        notes.append(f"{who}: {lost} PMD-mapped pages the model cannot hold as THPs: base pages")
    return int(vpn.size), int(heads.size), notes


def _thp_heads(
    m: Machine, p: ProcessShot, vpn: np.ndarray, pfn: np.ndarray, thp: np.ndarray
) -> np.ndarray:
    """Head frames of the 2 MiB regions the model can hold as THPs: PMD-mapped, aligned in
    both spaces, contiguous, inside one VMA."""
    n = vpn.size
    if n < PMD_PAGES:
        return np.zeros(0, dtype=np.int64)
    brk = np.concatenate(([0], np.cumsum((np.diff(vpn) != 1) | (np.diff(pfn) != 1))))
    cold = np.concatenate(([0], np.cumsum(~thp)))
    i = np.flatnonzero(
        (vpn[: n - PMD_PAGES + 1] % PMD_PAGES == 0) & (pfn[: n - PMD_PAGES + 1] % PMD_PAGES == 0)
    )
    j = i + PMD_PAGES - 1
    ok = (brk[j] == brk[i]) & (cold[j + 1] == cold[i])
    ends = np.array([v.end_vpn for v in p.vmas], dtype=np.int64)
    starts = np.array([v.start_vpn for v in p.vmas], dtype=np.int64)
    w = np.searchsorted(starts, vpn[i], side="right") - 1
    ok &= vpn[i] + PMD_PAGES <= ends[w]
    heads: np.ndarray = pfn[i[ok]]
    return heads
