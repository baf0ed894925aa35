"""A simulated physical machine: frames, zones, pageblocks, processes, page tables.

Everything per frame is a numpy array (one element per 4 KiB frame), and every mechanism
takes arrays of frames, so that moving a million pages costs a few numpy passes, not a
million Python steps. Each in-use frame carries a content token that moves with its
contents: data integrity is checkable after any sequence of operations (`check`).

A PMD THP is 512 frames, 512-aligned, with `compound` HEAD then TAILs, mapped by one
process at a 512-aligned vpn run of one VMA. A THP is always PMD-mapped here: whatever
would leave it PTE-mapped (a partial unmap) splits it first. Page cache may hold THPs
too, unowned: a machine seeded from a real one keeps other processes' THPs that way
(backends/sim/seed.py), where Translation Ranger meets them as the kernel does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...model import PAGE_SIZE, PMD_PAGES
from ...pipeline.score import unusable_index
from .buddy import (
    MAX_ORDER,
    MT_MOVABLE,
    MT_RECLAIMABLE,
    MT_UNMOVABLE,
    PAGEBLOCK_ORDER,
    Buddy,
    Zone,
)

__all__ = [
    "ANON",
    "CACHE",
    "FREE",
    "HEAD",
    "KIND_NAMES",
    "MT_MOVABLE",
    "MT_RECLAIMABLE",
    "MT_UNMOVABLE",
    "NONLRU",
    "TAIL",
    "UNMOVABLE",
    "Machine",
    "MoveError",
    "MoveStats",
    "OutOfMemory",
    "SimProcess",
    "SimVma",
    "Zone",
]

FREE, ANON, CACHE, NONLRU, UNMOVABLE = 0, 1, 2, 3, 4
KIND_NAMES = ("free", "anon", "cache", "non-lru", "unmovable")
BASE, HEAD, TAIL = 0, 1, 2  # values of Machine.compound

DMA32_END = (4 << 30) // PAGE_SIZE  # first frame above 4 GiB
MMAP_BASE_VPN = 0x7F00_0000_0000 // PAGE_SIZE  # where mmap() places VMAs, growing up
FIRST_PID = 1000
_MT_KIND = {MT_UNMOVABLE: UNMOVABLE, MT_MOVABLE: CACHE, MT_RECLAIMABLE: UNMOVABLE}
_PMD = np.arange(PMD_PAGES, dtype=np.int64)


class MoveError(Exception):
    """A mechanism was asked to move what cannot move (unmovable, free, a partial THP) or
    to put it where it cannot go (a frame in use)."""


class OutOfMemory(Exception):
    """Not enough free frames, even after dropping the whole page cache."""


@dataclass
class MoveStats:
    """Running counters since the machine was built (vmstat-like)."""

    pages_migrated: int = 0
    pages_exchanged: int = 0  # pairs swapped: each moves two pages
    bytes_copied: int = 0
    thp_split: int = 0
    thp_promoted: int = 0
    thp_collapsed: int = 0
    thp_fault_alloc: int = 0
    thp_fault_fallback: int = 0
    pages_faulted: int = 0
    pages_reclaimed: int = 0
    compact_migrate_scanned: int = 0
    compact_free_scanned: int = 0
    compact_isolated: int = 0
    compact_stall: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(eq=False)
class SimVma:
    """One mapping; `pfn` is its page table: a frame per page, -1 when not present."""

    start_vpn: int
    end_vpn: int
    perms: str = "rw-p"
    path: str = ""
    thp: bool = True  # THP allowed: VmFlags "hg" (or system "always")
    pfn: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.end_vpn <= self.start_vpn:
            raise ValueError(f"empty VMA [{self.start_vpn:#x}, {self.end_vpn:#x})")
        if self.pfn.size != self.pages:
            self.pfn = np.full(self.pages, -1, dtype=np.int64)

    @property
    def pages(self) -> int:
        return self.end_vpn - self.start_vpn

    @property
    def present(self) -> int:
        return int(np.count_nonzero(self.pfn >= 0))


@dataclass(eq=False)
class SimProcess:
    pid: int
    comm: str
    cmdline: tuple[str, ...]
    uid: int
    start_time: int
    vmas: list[SimVma] = field(default_factory=list)  # sorted, non-overlapping
    node: int = 0  # preferred NUMA node for its allocations

    def vma_at(self, vpn: int) -> SimVma | None:
        for v in self.vmas:
            if v.start_vpn <= vpn < v.end_vpn:
                return v
        return None

    @property
    def rss_pages(self) -> int:
        return sum(v.present for v in self.vmas)


class Machine:
    """Frames of all zones, their buddy allocator and the processes mapping them."""

    def __init__(
        self,
        nframes: int,
        zones: Sequence[Zone] | None = None,
        *,
        seed: int = 0,
        random_alloc: bool = False,
    ):
        """A machine of `nframes` free frames (a multiple of 1024). `zones` default to one
        Normal zone on node 0. `random_alloc` hands out free blocks of one order from a
        seeded random position instead of the lowest address (see Buddy)."""
        self.nframes = nframes
        self.zones: tuple[Zone, ...] = tuple(zones or (Zone(0, "Normal", 0, nframes),))
        _check_zones(self.zones, nframes)
        self.kind = np.zeros(nframes, dtype=np.uint8)
        self.owner = np.full(nframes, -1, dtype=np.int32)
        self.vpn = np.full(nframes, -1, dtype=np.int64)
        self.token = np.zeros(nframes, dtype=np.uint64)
        self.compound = np.zeros(nframes, dtype=np.uint8)
        self.pageblock_mt = np.full(nframes >> PAGEBLOCK_ORDER, MT_MOVABLE, dtype=np.uint8)
        self.buddy = Buddy(
            np.ones(nframes, dtype=bool),
            self.zones,
            self.pageblock_mt,
            rng=np.random.default_rng([seed, 1]) if random_alloc else None,
        )
        self.processes: dict[int, SimProcess] = {}
        self.stats = MoveStats()
        self.meta: dict[str, Any] = {}  # what built it (aging figures), for reports
        self.clock = 0  # ticks: process start times
        self._next_pid = FIRST_PID
        self._next_token = 1
        self._zone_starts = np.array([z.start_pfn for z in self.zones], dtype=np.int64)

    @classmethod
    def build(
        cls, memory: int, *, nodes: int = 1, seed: int = 0, random_alloc: bool = False
    ) -> Machine:
        """A machine shaped like x86_64: memory split evenly over `nodes`; node 0 has
        DMA32 below 4 GiB and Normal above, other nodes Normal only. (No DMA zone: the
        kernel keeps its 16 MiB for devices anyway.)"""
        unit = (1 << MAX_ORDER) * nodes
        frames = memory // PAGE_SIZE // unit * unit
        if frames == 0:
            raise ValueError(f"memory {memory} is below {unit * PAGE_SIZE} bytes")
        per_node = frames // nodes
        zones = []
        for node in range(nodes):
            lo, hi = node * per_node, (node + 1) * per_node
            if lo < DMA32_END:
                cut = min(hi, DMA32_END)
                zones.append(Zone(node, "DMA32", lo, cut))
                lo = cut
            if lo < hi:
                zones.append(Zone(node, "Normal", lo, hi))
        return cls(frames, zones, seed=seed, random_alloc=random_alloc)

    # ------------------------------------------------------------------ geometry

    @property
    def nodes(self) -> int:
        return max(z.node for z in self.zones) + 1

    def zone_index(self, pfns: np.ndarray | int) -> np.ndarray:
        """Index into `zones` of each frame."""
        return np.searchsorted(self._zone_starts, pfns, side="right") - 1

    def zone_of(self, pfn: int) -> Zone:
        return self.zones[int(self.zone_index(pfn))]

    def zonelist(self, node: int = 0) -> list[Zone]:
        """Fallback order of an allocation on `node`: Normal zones nearest first, then the
        lower zones (the kernel keeps DMA32 for when Normal runs out)."""
        n = self.nodes
        normal = sorted(
            (z for z in self.zones if z.name == "Normal"), key=lambda z: (z.node - node) % n
        )
        low = sorted(
            (z for z in self.zones if z.name != "Normal"), key=lambda z: (z.node - node) % n
        )
        return normal + low

    def free_blocks(self) -> list[tuple[Zone, tuple[int, ...]]]:
        return [(z, self.buddy.free_blocks(z)) for z in self.zones]

    def unusable_index(self, order: int = PAGEBLOCK_ORDER, zone: Zone | None = None) -> float:
        """Mel Gorman's unusable free space index at `order`, for one zone or, summing the
        zones' free lists, the whole machine."""
        zs = self.zones if zone is None else (zone,)
        counts = np.sum([self.buddy.free_blocks(z) for z in zs], axis=0)
        return float(unusable_index(counts)[order])

    @property
    def nr_free(self) -> int:
        return self.buddy.nr_free()

    def is_movable(self, pfns: np.ndarray) -> np.ndarray:
        """Whether each frame holds an LRU page (anon or page cache): what migration and
        exchange_pages accept."""
        k = self.kind[pfns]
        movable: np.ndarray = (k == ANON) | (k == CACHE)
        return movable

    # ------------------------------------------------------------------ processes

    def add_process(
        self,
        comm: str,
        *,
        cmdline: Sequence[str] | None = None,
        uid: int = 1000,
        node: int | None = None,
        pid: int | None = None,
    ) -> SimProcess:
        """A new process, numbered from FIRST_PID up unless `pid` is given (a machine
        seeded from a real one keeps its processes' own pids)."""
        if pid is None:
            pid = self._next_pid
            self._next_pid += 1
        elif pid in self.processes:
            raise ValueError(f"pid {pid} exists already")
        self.clock += 1
        proc = SimProcess(
            pid=pid,
            comm=comm[:15],
            cmdline=tuple(cmdline) if cmdline is not None else (comm,),
            uid=uid,
            start_time=self.clock,
            node=(pid - FIRST_PID) % self.nodes if node is None else node,
        )
        self.processes[pid] = proc
        return proc

    def mmap(
        self,
        pid: int,
        pages: int,
        *,
        thp: bool = True,
        start_vpn: int | None = None,
        path: str = "",
        perms: str = "rw-p",
    ) -> SimVma:
        """A new anonymous VMA of `pages` pages (none present). Without `start_vpn`, it
        goes 2 MiB-aligned above the process's last VMA, leaving a 2 MiB gap."""
        proc = self.processes[pid]
        if start_vpn is None:
            top = max((v.end_vpn for v in proc.vmas), default=MMAP_BASE_VPN - PMD_PAGES)
            start_vpn = -(-(top + PMD_PAGES) // PMD_PAGES) * PMD_PAGES
        vma = SimVma(start_vpn, start_vpn + pages, perms=perms, path=path, thp=thp)
        if any(v.start_vpn < vma.end_vpn and vma.start_vpn < v.end_vpn for v in proc.vmas):
            raise ValueError(f"pid {pid}: [{start_vpn:#x}, +{pages}) overlaps a VMA")
        proc.vmas.append(vma)
        proc.vmas.sort(key=lambda v: v.start_vpn)
        return vma

    def exit_process(self, pid: int) -> None:
        """The process exits: all its frames go back to the buddy."""
        proc = self.processes[pid]
        for v in proc.vmas:
            self.unmap(pid, v.start_vpn, v.end_vpn)
        del self.processes[pid]

    def _pieces(self, pid: int, start_vpn: int, end_vpn: int) -> list[tuple[SimVma, int, int]]:
        """(vma, lo, hi) offsets into each VMA's page table covering [start, end); raises
        ValueError if part of the range is not mapped (the process would get SIGSEGV)."""
        proc = self.processes[pid]
        out, covered = [], 0
        for v in proc.vmas:
            lo, hi = max(start_vpn, v.start_vpn), min(end_vpn, v.end_vpn)
            if lo < hi:
                out.append((v, lo - v.start_vpn, hi - v.start_vpn))
                covered += hi - lo
        if covered != end_vpn - start_vpn:
            raise ValueError(f"pid {pid}: [{start_vpn:#x}, {end_vpn:#x}) is not all mapped")
        return out

    # ------------------------------------------------------------------ allocation

    def _tokens(self, n: int) -> np.ndarray:
        t = np.arange(self._next_token, self._next_token + n, dtype=np.uint64)
        self._next_token += n
        return t

    def _fill(
        self,
        pfns: np.ndarray,
        kind: int,
        owner: int | np.ndarray = -1,
        vpn: int | np.ndarray = -1,
        compound: int | np.ndarray = BASE,
    ) -> None:
        """New contents (fresh tokens) in frames already taken from the buddy."""
        self.kind[pfns] = kind
        self.owner[pfns] = owner
        self.vpn[pfns] = vpn
        self.compound[pfns] = compound
        self.token[pfns] = self._tokens(pfns.size)

    def take(self, count: int, order: int = 0, mt: int = MT_MOVABLE, node: int = 0) -> np.ndarray:
        """Up to `count` blocks of `order` from the buddy (first pfns), reclaiming page
        cache for order 0 when short. The frames are left without contents: callers fill
        them."""
        zl = self.zonelist(node)
        heads = self.buddy.take(count, order, mt, zl)
        if heads.size < count and order == 0:
            self.reclaim(count - heads.size)
            heads = np.concatenate((heads, self.buddy.take(count - heads.size, 0, mt, zl)))
        return heads

    def alloc(
        self, order: int, mt: int = MT_MOVABLE, zone: Zone | None = None, *, kind: int | None = None
    ) -> int | None:
        """One 2^order block for the kernel or the page cache (process pages come through
        `fault`): its frames become `kind` (default: page cache for movable requests,
        unmovable otherwise). None when no block is free."""
        kind = _MT_KIND[mt] if kind is None else kind
        if kind in (FREE, ANON):
            raise ValueError("alloc() gives kernel or page-cache frames; map anon via fault")
        zones = [zone] if zone is not None else self.zonelist(0)
        heads = self.buddy.take(1, order, mt, zones)
        if heads.size == 0:
            return None
        head = int(heads[0])
        self._fill(np.arange(head, head + (1 << order)), kind)
        return head

    def alloc_at(self, pfns: np.ndarray, kind: int = UNMOVABLE) -> None:
        """Take these specific free frames (any order) and give them new `kind` contents:
        how tests and aging place kernel, non-LRU or page-cache pages exactly."""
        pfns = _as_pfns(pfns)
        if kind in (FREE, ANON):
            raise ValueError("alloc_at() gives kernel or page-cache frames; map anon via fault_at")
        _unique(pfns, "alloc_at")
        if (self.kind[pfns] != FREE).any():
            bad = pfns[self.kind[pfns] != FREE][0]
            raise MoveError(f"alloc_at: pfn {bad} is {KIND_NAMES[self.kind[bad]]}, not free")
        self.buddy.set_free(pfns, False)
        self._fill(pfns, kind)

    def free(self, pfns: np.ndarray) -> None:
        """Return frames to the buddy (merging). Anon frames are unmapped from their
        process; a THP freed in part is split first."""
        pfns = _as_pfns(pfns)
        if pfns.size == 0:
            return
        _unique(pfns, "free")
        kinds = self.kind[pfns]
        if (kinds == FREE).any():
            raise MoveError(f"free: pfn {pfns[kinds == FREE][0]} is already free")
        comp = pfns[self.compound[pfns] != BASE]
        if comp.size:
            heads = np.unique(comp - comp % PMD_PAGES)
            self.split_thp(heads[_sticks_out(heads, comp)])
        anon = kinds == ANON
        if anon.any():
            a = pfns[anon]
            self._set_ptes(self.owner[a], self.vpn[a], np.full(a.size, -1, dtype=np.int64))
        self._clear(pfns)
        self.buddy.set_free(pfns, True)

    def _clear(self, pfns: np.ndarray) -> None:
        self.kind[pfns] = FREE
        self.owner[pfns] = -1
        self.vpn[pfns] = -1
        self.token[pfns] = 0
        self.compound[pfns] = BASE

    def reclaim(self, pages: int) -> int:
        """Drop the `pages` oldest page-cache pages (lowest tokens); returns how many."""
        cache = np.flatnonzero(self.kind == CACHE)
        if cache.size > pages:
            cache = cache[np.argpartition(self.token[cache], pages)[:pages]]
        self.free(cache)
        self.stats.pages_reclaimed += int(cache.size)
        return int(cache.size)

    # ------------------------------------------------------------------ faults

    def fault(self, pid: int, start_vpn: int, end_vpn: int, *, thp: bool | None = None) -> None:
        """Touch [start, end): every page not present gets a frame from the buddy and a
        fresh token. A 512-aligned region fully inside the range and the VMA, with no page
        present, gets a THP when THP is allowed (`thp`, else the VMA's setting) and an
        order-9 block is free; everything else gets order-0 pages, handed out in vpn
        order. Raises OutOfMemory (having taken nothing) when memory runs out."""
        proc = self.processes[pid]
        pieces = self._pieces(pid, start_vpn, end_vpn)
        regions: list[np.ndarray] = []  # per piece: offsets of regions wanting a THP
        for vma, lo, hi in pieces:
            r = np.zeros(0, dtype=np.int64)
            if vma.thp if thp is None else thp:
                first = -(-(vma.start_vpn + lo) // PMD_PAGES) * PMD_PAGES - vma.start_vpn
                r = np.arange(first, hi - PMD_PAGES + 1, PMD_PAGES, dtype=np.int64)
                if r.size:
                    r = r[(vma.pfn[r[:, None] + _PMD] < 0).all(axis=1)]
            regions.append(r)
        want = sum(r.size for r in regions)
        blocks = self.buddy.take(want, PAGEBLOCK_ORDER, MT_MOVABLE, self.zonelist(proc.node))
        self.stats.thp_fault_alloc += int(blocks.size)
        self.stats.thp_fault_fallback += want - int(blocks.size)
        used = 0
        plan: list[tuple[SimVma, np.ndarray, np.ndarray]] = []  # vma, THP regions, pages
        for (vma, lo, hi), r in zip(pieces, regions, strict=True):
            got = r[: min(r.size, blocks.size - used)]
            heads = blocks[used : used + got.size]
            used += got.size
            if got.size:
                offs = (got[:, None] + _PMD).ravel()
                pfns = (heads[:, None] + _PMD).ravel()
                comp = np.full(offs.size, TAIL, dtype=np.uint8)
                comp[::PMD_PAGES] = HEAD
                vma.pfn[offs] = pfns
                self._fill(pfns, ANON, pid, vma.start_vpn + offs, comp)
            plan.append((vma, got, lo + np.flatnonzero(vma.pfn[lo:hi] < 0)))
        need = sum(p.size for _, _, p in plan)
        frames = self.take(need, 0, MT_MOVABLE, proc.node)
        if frames.size < need:
            self.buddy.set_free(frames, True)
            for vma, got, _ in plan:  # give back the THPs too: all or nothing
                if got.size:
                    self.free(vma.pfn[(got[:, None] + _PMD).ravel()])
            raise OutOfMemory(f"pid {pid}: {need} pages wanted, {frames.size} to be had")
        at = 0
        for vma, _, offs in plan:
            pfns = frames[at : at + offs.size]
            at += offs.size
            vma.pfn[offs] = pfns
            self._fill(pfns, ANON, pid, vma.start_vpn + offs)
        self.stats.pages_faulted += need + int(blocks.size) * PMD_PAGES

    def fault_at(self, pid: int, vpns: np.ndarray, pfns: np.ndarray) -> None:
        """Map not-present pages `vpns` of process `pid` onto these free frames (base
        pages): how tests build exact layouts."""
        vpns, pfns = _as_pfns(vpns), _as_pfns(pfns)
        if vpns.shape != pfns.shape:
            raise ValueError("fault_at: vpns and pfns differ in length")
        _unique(pfns, "fault_at")
        _unique(vpns, "fault_at")
        if (self.kind[pfns] != FREE).any():
            raise MoveError("fault_at: a destination frame is in use")
        proc = self.processes[pid]
        # Validate first (nothing changes on error), one VMA at a time, not page by page.
        inside = np.zeros(vpns.size, dtype=bool)
        for vma in proc.vmas:
            sel = (vpns >= vma.start_vpn) & (vpns < vma.end_vpn)
            inside |= sel
            taken = vpns[sel][vma.pfn[vpns[sel] - vma.start_vpn] >= 0]
            if taken.size:
                raise ValueError(
                    f"fault_at: vpn {int(taken[0]):#x} of pid {pid} is already present"
                )
        if not inside.all():
            v = int(vpns[~inside][0])
            raise ValueError(f"fault_at: pid {pid} has no VMA at vpn {v:#x}")
        self.buddy.set_free(pfns, False)
        self._fill(pfns, ANON, pid, vpns)
        self._set_ptes(np.full(vpns.size, pid, dtype=np.int32), vpns, pfns)
        self.stats.pages_faulted += int(vpns.size)

    def unmap(self, pid: int, start_vpn: int, end_vpn: int) -> None:
        """Zap [start, end) (MADV_DONTNEED): present pages are freed, THPs that stick out
        of the range are split first; the VMAs stay."""
        for vma, lo, hi in self._pieces(pid, start_vpn, end_vpn):
            table = vma.pfn[lo:hi]
            self.free(table[table >= 0])

    # ------------------------------------------------------------------ page tables

    def _set_ptes(self, owners: np.ndarray, vpns: np.ndarray, values: np.ndarray) -> None:
        """Point each (owner, vpn) page-table entry at values[i] (-1: not present)."""
        if owners.size == 0:
            return
        if (owners == owners[0]).all():
            self._set_ptes_of(int(owners[0]), vpns, values)
            return
        order = np.argsort(owners, kind="stable")
        o = owners[order]
        cuts = np.flatnonzero(o[1:] != o[:-1]) + 1
        for seg in np.split(order, cuts):
            self._set_ptes_of(int(owners[seg[0]]), vpns[seg], values[seg])

    def _set_ptes_of(self, pid: int, vpns: np.ndarray, values: np.ndarray) -> None:
        vmas = self.processes[pid].vmas
        if len(vmas) == 1:
            vmas[0].pfn[vpns - vmas[0].start_vpn] = values
            return
        starts = np.array([v.start_vpn for v in vmas], dtype=np.int64)
        which = np.searchsorted(starts, vpns, side="right") - 1
        for i in np.unique(which):
            m = which == i
            vmas[i].pfn[vpns[m] - vmas[i].start_vpn] = values[m]

    # ------------------------------------------------------------------ mechanisms

    def migrate(self, src: np.ndarray, dst: np.ndarray, *, allow_nonlru: bool = False) -> None:
        """Move the contents of src[i] into the free frame dst[i] (taking it from the
        buddy); the old frames become free. Page tables and tokens follow. THP frames
        move only as whole THPs onto 512-aligned destinations (the THP is kept); split
        them first otherwise. Raises MoveError, changing nothing, on an unmovable or free
        source (non-LRU movable needs `allow_nonlru`), a destination in use, or a THP
        moved in part."""
        src, dst = _pair(src, dst, "migrate")
        if src.size == 0:
            return
        k = self.kind[src]
        ok = (k == ANON) | (k == CACHE)
        if allow_nonlru:
            ok |= k == NONLRU
        if not ok.all():
            bad = src[~ok][0]
            raise MoveError(f"migrate: pfn {bad} is {KIND_NAMES[self.kind[bad]]}: cannot move")
        if (self.kind[dst] != FREE).any():
            bad = dst[self.kind[dst] != FREE][0]
            raise MoveError(f"migrate: destination pfn {bad} is {KIND_NAMES[self.kind[bad]]}")
        _unique(dst, "migrate")  # src are in use and dst free: the sets cannot meet
        comp = self.compound[src] != BASE
        if comp.any():
            _whole_thps(src[comp], dst[comp], "migrate")
        for arr in (self.kind, self.owner, self.vpn, self.token, self.compound):
            arr[dst] = arr[src]
        self._clear(src)
        anon = self.kind[dst] == ANON
        if anon.any():
            d = dst[anon]
            self._set_ptes(self.owner[d], self.vpn[d], d)
        self.buddy.update(used=dst, freed=src)
        self.stats.pages_migrated += int(src.size)
        self.stats.bytes_copied += PAGE_SIZE * int(src.size)

    def exchange(self, a: np.ndarray, b: np.ndarray) -> None:
        """Swap the contents of in-use LRU frames a[i] and b[i] (exchange_pages: no free
        frame needed, free memory unchanged); both owners' page tables follow. A THP
        exchanges only as a whole with a whole THP at the same offsets. Raises MoveError,
        changing nothing, on a frame that is free, unmovable or non-LRU, or on a THP
        paired with base pages."""
        a, b = _pair(a, b, "exchange")
        if a.size == 0:
            return
        both = np.concatenate((a, b))
        ok = self.is_movable(both)
        if not ok.all():
            bad = both[~ok][0]
            raise MoveError(f"exchange: pfn {bad} is {KIND_NAMES[self.kind[bad]]}: cannot move")
        _unique(both, "exchange")
        ca, cb = self.compound[a], self.compound[b]
        if (ca != cb).any():
            i = int(np.flatnonzero(ca != cb)[0])
            raise MoveError(f"exchange: pfn {a[i]} and pfn {b[i]} differ in THP-ness; split")
        comp = ca != BASE
        if comp.any():
            _whole_thps(a[comp], b[comp], "exchange")
        for arr in (self.kind, self.owner, self.vpn, self.token):
            arr[a], arr[b] = arr[b], arr[a]  # fancy indexing copies the right-hand side
        anon = self.kind[both] == ANON
        if anon.any():
            f = both[anon]
            self._set_ptes(self.owner[f], self.vpn[f], f)
        self.stats.pages_exchanged += int(a.size)
        self.stats.bytes_copied += 2 * PAGE_SIZE * int(a.size)

    def split_thp(self, head_pfns: np.ndarray) -> None:
        """Split THPs into base pages in place (the mappings stay, now PTE-level)."""
        heads = _as_pfns(head_pfns)
        if heads.size == 0:
            return
        _unique(heads, "split_thp")
        if (self.compound[heads] != HEAD).any():
            bad = heads[self.compound[heads] != HEAD][0]
            raise ValueError(f"split_thp: pfn {bad} is not a THP head")
        self.compound[(heads[:, None] + _PMD).ravel()] = BASE
        self.stats.thp_split += int(heads.size)

    def promote(self, pid: int, vpn: int) -> bool:
        """Make the 2 MiB region at `vpn` a THP in place if its 512 pages are present on
        512 contiguous, 512-aligned frames (one pageblock) and the VMA allows THP."""
        return bool(self.promote_many(pid, np.array([vpn], dtype=np.int64))[0])

    def promote_many(self, pid: int, vpns: np.ndarray) -> np.ndarray:
        """`promote` over an array of region starts; returns which were promoted."""
        vpns = _as_pfns(vpns)
        done = np.zeros(vpns.size, dtype=bool)
        proc = self.processes.get(pid)
        if proc is None:
            return done
        for vma in proc.vmas:
            inside = (vpns >= vma.start_vpn) & (vpns + PMD_PAGES <= vma.end_vpn)
            sel = np.flatnonzero(inside & (vpns % PMD_PAGES == 0))
            if sel.size == 0 or not vma.thp:
                continue
            offs = vpns[sel] - vma.start_vpn
            p = vma.pfn[offs[:, None] + _PMD]
            head = p[:, 0]
            ok = (head >= 0) & (head % PMD_PAGES == 0) & (p == head[:, None] + _PMD).all(axis=1)
            ok[ok] &= self.compound[head[ok]] == BASE
            heads = head[ok]
            if heads.size:
                self.compound[(heads[:, None] + _PMD).ravel()] = TAIL
                self.compound[heads] = HEAD
            done[sel[ok]] = True
        self.stats.thp_promoted += int(np.count_nonzero(done))
        return done

    def collapse_into(self, pid: int, vpns: np.ndarray, heads: np.ndarray) -> int:
        """khugepaged's collapse: copy each 2 MiB region at vpns[i] (not a THP) into the
        order-9 block at heads[i], already taken from the buddy; pages not present are
        zero-filled (fresh tokens), the old frames freed, the block mapped as a THP.
        Returns the pages copied."""
        vpns, heads = _pair(vpns, heads, "collapse_into")
        proc = self.processes[pid]
        copied = 0
        for vma in proc.vmas:
            sel = (vpns >= vma.start_vpn) & (vpns + PMD_PAGES <= vma.end_vpn)
            if not sel.any():
                continue
            offs = (vpns[sel] - vma.start_vpn)[:, None] + _PMD
            new = heads[sel][:, None] + _PMD
            old = vma.pfn[offs]
            present = old >= 0
            src, dst = old[present], new[present]
            if (self.compound[src] != BASE).any():
                raise MoveError("collapse_into: the region is a THP already")
            for arr in (self.kind, self.owner, self.vpn, self.token):
                arr[dst] = arr[src]
            self._clear(src)
            self.buddy.set_free(src, True)
            self._fill(new[~present], ANON, pid, vma.start_vpn + offs[~present])
            self.compound[new] = TAIL
            self.compound[new[:, 0]] = HEAD
            vma.pfn[offs] = new
            copied += int(src.size)
        self.stats.thp_collapsed += int(vpns.size)
        self.stats.bytes_copied += PAGE_SIZE * copied
        return copied

    # ------------------------------------------------------------------ checking

    def check(self) -> None:
        """Every invariant, from scratch; raises AssertionError naming the first broken."""
        n = self.nframes
        for name, arr, dtype in (
            ("kind", self.kind, np.uint8),
            ("owner", self.owner, np.int32),
            ("vpn", self.vpn, np.int64),
            ("token", self.token, np.uint64),
            ("compound", self.compound, np.uint8),
        ):
            assert arr.shape == (n,) and arr.dtype == dtype, f"{name}: wrong shape or dtype"
        free = self.kind == FREE
        self.buddy.check(free)
        assert (self.kind <= UNMOVABLE).all(), "unknown frame kind"
        anon = self.kind == ANON
        assert (self.owner[~anon] == -1).all(), "a non-anon frame has an owner"
        assert (self.vpn[~anon] == -1).all(), "a non-anon frame has a vpn"
        assert (self.token[free] == 0).all(), "a free frame holds a token"
        used_tokens = self.token[~free]
        assert (used_tokens > 0).all(), "an in-use frame has no token"
        assert np.unique(used_tokens).size == used_tokens.size, "two frames share a token"
        cache = self.kind == CACHE
        assert (self.compound[~(anon | cache)] == BASE).all(), "a THP frame not anon or cache"
        # Page tables <-> reverse map: every present pte names an anon frame of that
        # owner at that vpn, no frame twice, and no anon frame without its pte.
        mapped = 0
        for pid, proc in self.processes.items():
            last = -1
            for v in proc.vmas:
                assert v.start_vpn >= last, f"pid {pid}: VMAs overlap or are unsorted"
                last = v.end_vpn
                assert v.pfn.shape == (v.pages,), f"pid {pid}: page table size"
                idx = np.flatnonzero(v.pfn >= 0)
                p = v.pfn[idx]
                assert (p < n).all(), f"pid {pid}: pte beyond memory"
                assert (self.kind[p] == ANON).all(), f"pid {pid}: pte to a non-anon frame"
                assert (self.owner[p] == pid).all(), f"pid {pid}: pte to another's frame"
                assert (self.vpn[p] == v.start_vpn + idx).all(), f"pid {pid}: rmap vpn wrong"
                mapped += p.size
        assert mapped == int(np.count_nonzero(anon)), "anon frames without a pte (or twice)"
        assert np.isin(self.owner[anon], list(self.processes)).all(), "anon of a dead pid"
        # THPs: whole aligned 512 blocks of one kind, head first; anonymous ones at
        # consecutive aligned vpns of one owner.
        c = self.compound.reshape(-1, PMD_PAGES)
        blocks = np.flatnonzero(c.any(axis=1))
        if blocks.size:
            cb = c[blocks]
            assert (cb[:, 0] == HEAD).all() and (cb[:, 1:] == TAIL).all(), "THP shape"
            frames = blocks[:, None] * PMD_PAGES + _PMD
            k = self.kind[frames]
            assert (k == k[:, :1]).all(), "THP of two kinds"
            frames = frames[k[:, 0] == ANON]
            v = self.vpn[frames]
            assert (v[:, 0] % PMD_PAGES == 0).all(), "THP at an unaligned vpn"
            assert (v == v[:, :1] + _PMD).all(), "THP vpns not consecutive"
            o = self.owner[frames]
            assert (o == o[:, :1]).all(), "THP shared by two owners"

    def snapshot(self) -> dict[tuple[int, int], int]:
        """{(pid, vpn): token} of every present page: what integrity checks compare."""
        out: dict[tuple[int, int], int] = {}
        for pid, proc in self.processes.items():
            for v in proc.vmas:
                idx = np.flatnonzero(v.pfn >= 0)
                toks = self.token[v.pfn[idx]].tolist()
                keys = ((pid, v.start_vpn + i) for i in idx.tolist())
                out.update(zip(keys, toks, strict=True))
        return out


# ---------------------------------------------------------------------- helpers


def _check_zones(zones: Iterable[Zone], nframes: int) -> None:
    at = 0
    for z in zones:
        if z.start_pfn != at or z.end_pfn <= z.start_pfn:
            raise ValueError(f"zones must be contiguous, ascending and non-empty ({z})")
        at = z.end_pfn
    if at != nframes:
        raise ValueError(f"zones cover {at} frames, the machine has {nframes}")


def _as_pfns(x: np.ndarray | Sequence[int]) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        a = a.reshape(-1)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"frame numbers must be integers, not {a.dtype}")
    return a.astype(np.int64, copy=False)


def _pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_pfns(a), _as_pfns(b)
    if a.shape != b.shape:
        raise ValueError(f"{what}: {a.size} sources but {b.size} destinations")
    return a, b


def _unique(pfns: np.ndarray, what: str) -> None:
    if pfns.size > 1:
        s = np.sort(pfns)
        dup = s[1:] == s[:-1]
        if dup.any():
            raise ValueError(f"{what}: pfn {s[1:][dup][0]} given twice")


def _whole_thps(src: np.ndarray, dst: np.ndarray, what: str) -> None:
    """THP frames in `src` form whole THPs, each sent as a whole to one 512-aligned run."""
    g = src >> PAGEBLOCK_ORDER
    order = np.argsort(g, kind="stable")
    g, delta = g[order], (dst - src)[order]
    _, first, counts = np.unique(g, return_index=True, return_counts=True)
    if (counts != PMD_PAGES).any():
        raise MoveError(f"{what}: part of a THP; split it first or move all 512 pages")
    if (delta != np.repeat(delta[first], counts)).any() or (delta % PMD_PAGES).any():
        raise MoveError(f"{what}: a THP must land whole on a 512-aligned block")


def _sticks_out(heads: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Which THP heads have fewer than 512 of their frames in `comp`."""
    counts = np.bincount(np.searchsorted(heads, comp - comp % PMD_PAGES), minlength=heads.size)
    short: np.ndarray = counts != PMD_PAGES
    return short
