"""Aging: turn a fresh simulated machine into one that looks like a long uptime.

The story, replayed through the real allocator in a few vectorized rounds:

1. *Boot*: unmovable kernel memory is placed, either `scattered` (a few pages in many
   movable pageblocks, as fallback allocations leave them; Contiguitas found this the main
   blocker of huge pages) or `clustered` (whole UNMOVABLE pageblocks, as grouping by
   mobility would like). The page cache then fills memory: small files and large files.
2. *Churn*, each round: small files are evicted (random holes of a few pages), the
   long-running processes grow their heaps into those holes (smallest free blocks first,
   as the buddy allocator serves them), short-lived jobs come and go, large files are
   replaced, and memory refills until reclaim keeps a low watermark free.
3. *Calibration*, per zone: the free set is adjusted to the target exactly. A frame is in
   an order >= 9 free block iff its pageblock is wholly free, so the unusable free space
   index at order 9 is (free frames in partly used pageblocks) / (free frames): whole
   cache-only pageblocks are dropped (or filled) to set the first term's complement, and
   single files inside partly used pageblocks are dropped (or free frames filled) to set
   the first term.

Deterministic for a seed. The survivors are the long-running processes: their heaps were
faulted while memory was fragmented, so they are scattered, which is what defragmentation
has to fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...config.schema import SimProcessSettings, SimulatedSettings, check_machine
from ...model import PAGE_SIZE, PMD_PAGES, UnmovableLayout
from .buddy import MT_UNMOVABLE, PAGEBLOCK_PAGES
from .machine import ANON, CACHE, FREE, NONLRU, UNMOVABLE, Machine, Zone

Progress = Callable[[float, str], None]  # (fraction done, stage)

LOW_WATER = 0.02  # fraction of memory reclaim keeps free during the churn
SMALL_FILE = (1, 64)  # pages, log-uniform
LARGE_FILE = (256, 16384)
JOBS_PER_ROUND = 4
JOB_MEMORY = 0.04  # fraction of memory the short-lived jobs of one round use
EXTRA_SMALL_EVICT = 0.02  # small-file churn beyond what the heaps need, per round
LARGE_EVICT = 0.04  # large-file churn per round


ProcSpec = SimProcessSettings  # a long-running process: comm, heap, thp, count

BIG_MACHINE = 16 << 30  # what `simulate` and benchmarks/simulate.py study by default


@dataclass(frozen=True)
class Scenario(SimulatedSettings):
    """A machine to age: the settings of the config's `daemon.simulated` (declared once,
    with their bounds and help, in config/schema.py), plus the aging's own knobs.

    Two defaults differ from the config's on purpose: `memory` is BIG_MACHINE, the size
    `simulate` studies, and no `processes` means default_workload(memory), a mix that
    scales with the machine (a config names the processes its targets match)."""

    memory: int = BIG_MACHINE
    processes: tuple[ProcSpec, ...] = ()
    polluted: float = 0.5  # scattered: fraction of pageblocks holding unmovable frames
    rounds: int = 10

    def workload(self) -> tuple[ProcSpec, ...]:
        return self.processes or default_workload(self.memory)

    def validate(self) -> None:
        """Refuse what the config would refuse, and what aging cannot do."""
        if self.unmovable_layout not in tuple(UnmovableLayout):
            raise ValueError(f"unmovable_layout must be {' or '.join(UnmovableLayout)}, not "
                             f"{self.unmovable_layout!r}")  # fmt: skip
        problem = next(check_machine(self), None)
        if problem is not None:
            raise ValueError(": ".join(problem))
        if not 0 <= self.polluted <= 1:
            raise ValueError(f"polluted must be within [0, 1], not {self.polluted}")
        heaps = sum(p.heap * p.count for p in self.workload()) / self.memory
        if heaps + self.unmovable + self.free > 0.9:
            raise ValueError(
                f"heaps ({heaps:.0%}), unmovable ({self.unmovable:.0%}) and free "
                f"({self.free:.0%}) leave less than 10% of memory for the page cache"
            )
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")


def default_workload(memory: int) -> tuple[ProcSpec, ...]:
    """A database with a large THP-enabled heap, four web workers, a batch job without
    THP: 40% of memory in all."""
    return (
        ProcSpec("db", memory // 4),
        ProcSpec("web", memory // 40, count=4),
        ProcSpec("batch", memory // 20, thp=False),
    )


def age(scenario: Scenario, progress: Progress | None = None) -> Machine:
    """A machine aged by `scenario`; its `meta` records the targets and what was reached
    (achieved index and free fraction, per zone and overall)."""
    scenario.validate()
    say = progress or (lambda fraction, stage: None)
    rng = np.random.default_rng(scenario.seed)
    m = Machine.build(scenario.memory, nodes=scenario.nodes, seed=scenario.seed, random_alloc=True)
    n = m.nframes
    say(0.0, "boot")
    _place_unmovable(m, scenario, rng)
    cache = _PageCache(m, rng)
    survivors = []
    for spec in scenario.workload():
        for i in range(spec.count):
            comm = spec.comm if spec.count == 1 else f"{spec.comm}-{i}"
            p = m.add_process(comm, cmdline=(spec.comm, f"--worker={i}"))
            pages = -(-spec.heap // PAGE_SIZE // PMD_PAGES) * PMD_PAGES
            m.mmap(p.pid, pages, thp=spec.thp, path="[heap]" if i == 0 else "")
            survivors.append(p.pid)
    for _ in range(8):  # boot-time reads: interleaved regions of small and large files
        cache.add(m.nr_free // 8, small=0.5)
    cache.add(m.nr_free, small=0.5)
    cache.reclaim(int(LOW_WATER * n))
    jobs: list[int] = []
    rounds = scenario.rounds
    for r in range(rounds):
        say(0.1 + 0.8 * r / rounds, f"churn {r + 1}/{rounds}")
        slices = [_slice(m, pid, r, rounds) for pid in survivors]
        cache.evict(sum(b - a for _, a, b in slices) + int(EXTRA_SMALL_EVICT * n), small=True)
        for pid, a, b in slices:
            if b > a:
                m.fault(pid, a, b)
        for pid in jobs:
            m.exit_process(pid)
        jobs = _start_jobs(m, rng, int(JOB_MEMORY * n))
        cache.evict(int(LARGE_EVICT * n), small=False)
        cache.add(m.nr_free, small=0.5)
        cache.reclaim(int(LOW_WATER * n))
    for pid in jobs:
        m.exit_process(pid)
    say(0.9, "calibrate")
    for z in m.zones:
        _calibrate(m, z, scenario, rng, cache)
    m.meta.update(_report(m, scenario))
    say(1.0, "done")
    return m


def _slice(m: Machine, pid: int, r: int, rounds: int) -> tuple[int, int, int]:
    """Round r's share of the heap: [a, b) vpns, cut at 2 MiB boundaries."""
    v = m.processes[pid].vmas[0]
    regions = v.pages // PMD_PAGES
    a = v.start_vpn + regions * r // rounds * PMD_PAGES
    b = v.start_vpn + regions * (r + 1) // rounds * PMD_PAGES
    return pid, a, b if r < rounds - 1 else v.end_vpn


def _start_jobs(m: Machine, rng: np.random.Generator, pages: int) -> list[int]:
    """Short-lived processes (builds, cron jobs) without THP, faulting `pages` in all."""
    shares = rng.dirichlet(np.ones(JOBS_PER_ROUND)) * pages
    out = []
    for share in shares.astype(np.int64):
        if share <= 0:
            continue
        p = m.add_process("job", cmdline=("job",))
        v = m.mmap(p.pid, int(share), thp=False)
        m.fault(p.pid, v.start_vpn, v.end_vpn)
        out.append(p.pid)
    return out


# ---------------------------------------------------------------------- unmovable


def _place_unmovable(m: Machine, sc: Scenario, rng: np.random.Generator) -> None:
    total = round(sc.unmovable * m.nframes)
    if total == 0:
        return
    npb = m.nframes // PAGEBLOCK_PAGES
    if sc.unmovable_layout == UnmovableLayout.CLUSTERED:
        pfns = _clustered(npb, total, rng)
        m.pageblock_mt[np.unique(pfns // PAGEBLOCK_PAGES)] = MT_UNMOVABLE
    else:
        pfns = _scattered(npb, total, max(sc.polluted, total / m.nframes), rng)
        per_pb = np.bincount(pfns // PAGEBLOCK_PAGES, minlength=npb)
        m.pageblock_mt[per_pb >= PAGEBLOCK_PAGES // 2] = MT_UNMOVABLE  # claimed on fallback
    m.alloc_at(pfns, kind=UNMOVABLE)


def _scattered(npb: int, total: int, polluted: float, rng: np.random.Generator) -> np.ndarray:
    """`total` frames in a `polluted` share of pageblocks, a heavy-tailed number in each
    (most pageblocks hold a few kernel pages, some many)."""
    blocks = np.sort(rng.choice(npb, size=max(1, round(polluted * npb)), replace=False))
    weight = rng.lognormal(0.0, 1.0, blocks.size)
    prob = np.minimum(weight / weight.sum() * total / PAGEBLOCK_PAGES, 1.0)
    frames = (blocks[:, None] * PAGEBLOCK_PAGES + np.arange(PAGEBLOCK_PAGES)).ravel()
    chosen = rng.random(frames.size) < np.repeat(prob, PAGEBLOCK_PAGES)
    picked, rest = frames[chosen], frames[~chosen]
    if picked.size > total:
        picked = rng.choice(picked, total, replace=False)
    elif picked.size < total:
        picked = np.concatenate((picked, rng.choice(rest, total - picked.size, replace=False)))
    return np.sort(picked)


def _clustered(npb: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """`total` frames packed into whole pageblocks, in clusters of 8 pageblocks (16 MiB)
    at random places."""
    blocks = -(-total // PAGEBLOCK_PAGES)
    size = min(8, npb)
    slots = rng.choice(npb // size, size=-(-blocks // size), replace=False)
    pbs = np.sort((slots[:, None] * size + np.arange(size)).ravel())[:blocks]
    return (pbs[:, None] * PAGEBLOCK_PAGES + np.arange(PAGEBLOCK_PAGES)).ravel()[:total]


# ---------------------------------------------------------------------- page cache


class _PageCache:
    """Files as the aging knows them: each file's frames in file order, so that whole
    files can be evicted. Aging never migrates, so frames stay put; tokens tell whether a
    frame still holds the file (reclaim may have dropped it meanwhile)."""

    def __init__(self, m: Machine, rng: np.random.Generator):
        self.m = m
        self.rng = rng
        self._frames: list[np.ndarray] = []  # per batch, consolidated when read
        self._tokens: list[np.ndarray] = []
        self.nframes = 0
        self.start = np.zeros(0, dtype=np.int64)  # per file: offset into frames
        self.size = np.zeros(0, dtype=np.int64)
        self.small = np.zeros(0, dtype=bool)
        self.alive = np.zeros(0, dtype=bool)

    def consolidate(self) -> None:
        """Join the batches and, once a quarter of them is dead, forget dropped files. File
        indices may change: callers consolidate before they pick files."""
        if len(self._frames) > 1:
            self._frames = [np.concatenate(self._frames)]
            self._tokens = [np.concatenate(self._tokens)]
        live = int(self.size[self.alive].sum())
        if live * 4 > self.nframes * 3:  # under a quarter dead: not worth a copy
            return
        keep = np.repeat(self.alive, self.size)
        self._frames = [self._frames[0][keep]]
        self._tokens = [self._tokens[0][keep]]
        self.nframes = live
        self.size, self.small = self.size[self.alive], self.small[self.alive]
        self.start = np.cumsum(self.size) - self.size
        self.alive = np.ones(self.size.size, dtype=bool)

    def add(self, pages: int, small: float) -> None:
        """Read `pages` of new files (a `small` share of them in small files); small
        files first, so they take the smallest holes and large files the large blocks."""
        if pages <= 0:
            return
        for is_small, share in ((True, small), (False, 1 - small)):
            want = int(pages * share)
            if want <= 0:
                continue
            lo, hi = SMALL_FILE if is_small else LARGE_FILE
            sizes = _sizes(self.rng, want, lo, hi)
            frames = self.m.take(int(sizes.sum()), 0)
            sizes = _clip(sizes, frames.size)
            self.m._fill(frames, CACHE)
            self._register(frames, sizes, is_small)

    def fill(self, pfns: np.ndarray) -> None:
        """New cache pages in these free frames, as one file."""
        if pfns.size:
            self.m.alloc_at(pfns, kind=CACHE)
            self._register(pfns, np.array([pfns.size]), False)

    def _register(self, frames: np.ndarray, sizes: np.ndarray, small: bool) -> None:
        self.start = np.concatenate((self.start, self.nframes + np.cumsum(sizes) - sizes))
        self.size = np.concatenate((self.size, sizes))
        self.small = np.concatenate((self.small, np.full(sizes.size, small)))
        self.alive = np.concatenate((self.alive, np.ones(sizes.size, dtype=bool)))
        self._frames.append(frames)
        self._tokens.append(self.m.token[frames])
        self.nframes += frames.size

    def reclaim(self, pages: int) -> None:
        """kswapd: drop the oldest files (LRU order) until about `pages` are free."""
        self.consolidate()
        alive = np.flatnonzero(self.alive)
        k = int(np.searchsorted(np.cumsum(self.size[alive]), pages)) + 1
        self.drop(alive[:k])

    def evict(self, pages: int, *, small: bool) -> None:
        """Drop random whole files of one kind until `pages` frames are freed."""
        self.consolidate()
        cand = np.flatnonzero(self.alive & (self.small == small))
        if pages <= 0 or cand.size == 0:
            return
        cand = self.rng.permutation(cand)
        k = int(np.searchsorted(np.cumsum(self.size[cand]), pages)) + 1
        self.drop(cand[:k])

    def drop(self, files: np.ndarray) -> None:
        self.alive[files] = False
        idx = _ranges(self.start[files], self.size[files])
        pfns = self._frames[0][idx]
        still = self.m.token[pfns] == self._tokens[0][idx]
        self.m.free(pfns[still])

    def file_of(self, pfns: np.ndarray) -> np.ndarray:
        """File index of cache frames (by token: files hold consecutive tokens)."""
        self.consolidate()
        first = self._tokens[0][self.start]
        index: np.ndarray = np.searchsorted(first, self.m.token[pfns], side="right") - 1
        return index


def _sizes(rng: np.random.Generator, pages: int, lo: int, hi: int) -> np.ndarray:
    """Log-uniform file sizes adding up to about `pages`."""
    mean = (hi - lo) / np.log(hi / lo)
    sizes = np.exp(rng.uniform(np.log(lo), np.log(hi), int(pages / mean) + 16))
    sizes = sizes.astype(np.int64)
    return _clip(sizes, pages)


def _clip(sizes: np.ndarray, total: int) -> np.ndarray:
    """The leading sizes adding up to exactly `total` (the last one cut)."""
    cum = np.cumsum(sizes)
    k = int(np.searchsorted(cum, total))
    if k >= sizes.size:
        return sizes if cum[-1] == total else np.append(sizes, total - cum[-1])
    out = sizes[: k + 1].copy()
    out[-1] -= cum[k] - total
    return out[out > 0]


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenated arange(start, start + size) for each pair."""
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.repeat(starts - np.cumsum(sizes) + sizes, sizes)
    return offs + np.arange(total)


# ---------------------------------------------------------------------- calibration


def _calibrate(
    m: Machine, z: Zone, sc: Scenario, rng: np.random.Generator, cache: _PageCache
) -> None:
    """Set this zone's free frames and unusable index at order 9 to the targets."""
    want_free = round(sc.free * z.pages)
    npb = z.pages // PAGEBLOCK_PAGES
    want_big = min(round((1 - sc.fragmentation) * want_free / PAGEBLOCK_PAGES), npb)
    _set_big(m, z, want_big, rng, cache)
    kind, nfree, _ = _counts(m, z)
    partial = nfree < PAGEBLOCK_PAGES
    small = int(nfree[partial].sum())
    want_small = want_free - want_big * PAGEBLOCK_PAGES
    if small > want_small:  # fill random holes of partly used pageblocks
        holes = np.flatnonzero((kind == FREE) & partial[:, None]) + z.start_pfn
        cache.fill(np.sort(rng.choice(holes, small - want_small, replace=False)))
    elif small < want_small:
        _drop_cache(m, z, want_small - small, np.zeros(npb, dtype=bool), rng, cache)


def _counts(m: Machine, z: Zone) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kinds by pageblock, and free and cache frames per pageblock."""
    k = m.kind[z.start_pfn : z.end_pfn].reshape(-1, PAGEBLOCK_PAGES)
    return k, (k == FREE).sum(axis=1), (k == CACHE).sum(axis=1)


def _set_big(m: Machine, z: Zone, want: int, rng: np.random.Generator, cache: _PageCache) -> None:
    """Make exactly `want` pageblocks of the zone wholly free: fill surplus ones with page
    cache, or empty the cheapest others (fewest anon pages, then fewest cache pages; none
    holding kernel pages or THPs): drop their cache and migrate their anon pages into
    holes elsewhere, as kcompactd would."""
    kind, nfree, ncache = _counts(m, z)
    full = np.flatnonzero(nfree == PAGEBLOCK_PAGES)
    if full.size > want:
        extra = np.sort(rng.choice(full, full.size - want, replace=False))
        cache.fill(_block_frames(z.start_pfn, extra))
        return
    if full.size == want:
        return
    anon = (kind == ANON).sum(axis=1)
    stuck = ((kind == UNMOVABLE) | (kind == NONLRU)).any(axis=1)
    stuck |= (m.compound[z.start_pfn : z.end_pfn].reshape(-1, PAGEBLOCK_PAGES) != 0).any(axis=1)
    cand = np.flatnonzero((nfree < PAGEBLOCK_PAGES) & ~stuck)
    cand = cand[np.lexsort((rng.random(cand.size), ncache[cand], anon[cand]))]
    chosen = np.zeros(kind.shape[0], dtype=bool)
    chosen[cand[: want - full.size]] = True
    frames = _block_frames(z.start_pfn, np.flatnonzero(chosen))
    m.free(frames[m.kind[frames] == CACHE])
    src = frames[m.kind[frames] == ANON]
    if src.size == 0:
        return
    kind, nfree, _ = _counts(m, z)
    into = (nfree < PAGEBLOCK_PAGES) & ~chosen
    holes = np.flatnonzero((kind == FREE) & into[:, None]) + z.start_pfn
    if holes.size < src.size:
        _drop_cache(m, z, src.size - holes.size, chosen, rng, cache)
        kind, nfree, _ = _counts(m, z)
        holes = np.flatnonzero((kind == FREE) & into[:, None]) + z.start_pfn
    dst = np.sort(rng.choice(holes, min(src.size, holes.size), replace=False))
    m.migrate(src[: dst.size], dst)


def _drop_cache(
    m: Machine,
    z: Zone,
    need: int,
    exclude: np.ndarray,
    rng: np.random.Generator,
    cache: _PageCache,
) -> None:
    """Free `need` cache frames in partly used pageblocks (not `exclude`d), whole files in
    random order, always leaving a pageblock at least one page in use so that it stays
    partly used."""
    kind, nfree, ncache = _counts(m, z)
    partial = (nfree < PAGEBLOCK_PAGES) & ~exclude
    cand = (kind == CACHE) & partial[:, None]
    lone = np.flatnonzero(partial & (nfree + ncache == PAGEBLOCK_PAGES))
    cand[lone, np.argmax(kind[lone] == CACHE, axis=1)] = False
    pfns = np.flatnonzero(cand) + z.start_pfn
    if pfns.size > need:
        files = cache.file_of(pfns)
        rank = rng.permutation(cache.alive.size)[files]
        pfns = np.sort(pfns[np.argpartition(rank, need)[:need]])
    m.free(pfns)


def _block_frames(lo: int, blocks: np.ndarray) -> np.ndarray:
    return (lo + blocks[:, None] * PAGEBLOCK_PAGES + np.arange(PAGEBLOCK_PAGES)).ravel()


def _report(m: Machine, sc: Scenario) -> dict[str, object]:
    zones = {
        f"{z.node}/{z.name}": {
            "unusable_index_9": m.unusable_index(zone=z),
            "free": m.buddy.nr_free(z) / z.pages,
        }
        for z in m.zones
    }
    return {
        "scenario": sc,
        "unusable_index_9": m.unusable_index(),
        "free": m.nr_free / m.nframes,
        "unmovable": float(np.count_nonzero(m.kind == UNMOVABLE)) / m.nframes,
        "zones": zones,
    }
