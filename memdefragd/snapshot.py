"""A snapshot of a real machine's memory, and its file.

What `memdefragd snapshot` and `simulate --from-host` take (backends/kernel/snapshot.py
reads it) and what the simulator is seeded from (backends/sim/seed.py): every frame's
/proc/kpageflags word, the zone layout of /proc/zoneinfo, /proc/buddyinfo, and for each
chosen process its VMAs and present pages (vpn, pfn, PMD-mapped). Raw flags are kept, not
a verdict about them, so that the seeding can change without taking the snapshot again.

The file is one compressed .npz (numpy only, no pickle): a JSON document `meta` and
arrays, so a snapshot taken in a guest or on a production machine is simulated elsewhere.
It is read as untrusted input: shapes, dtypes and bounds are checked before use.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .model import ZoneFree

SCHEMA = "memdefragd.snapshot/1"

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h, and the kernel-internal
# KPF_RESERVED and up, which /proc/kpageflags exports too).
KPF_LOCKED, KPF_REFERENCED, KPF_UPTODATE, KPF_DIRTY, KPF_LRU = 0, 2, 3, 4, 5
KPF_SLAB, KPF_BUDDY, KPF_MMAP, KPF_ANON = 7, 10, 11, 12
KPF_SWAPBACKED = 14
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_HUGE, KPF_UNEVICTABLE = 15, 16, 17, 18
KPF_HWPOISON, KPF_NOPAGE, KPF_KSM, KPF_THP, KPF_OFFLINE = 19, 20, 21, 22, 23
KPF_ZERO_PAGE, KPF_IDLE, KPF_PGTABLE = 24, 25, 26
KPF_RESERVED, KPF_MLOCKED = 32, 33


def bit(n: int) -> np.uint64:
    return np.uint64(1 << n)


class SnapshotError(ValueError):
    """A snapshot file that is not one, or is inconsistent; names what is wrong."""


@dataclass(frozen=True, slots=True)
class ZoneSpan:
    """One populated zone, as /proc/zoneinfo gives it (frames)."""

    node: int
    name: str
    start_pfn: int
    spanned: int  # start_pfn + spanned is the zone's end, holes included
    present: int  # spanned minus holes
    managed: int  # present minus what the page allocator was never given

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.spanned


@dataclass(frozen=True, slots=True)
class VmaShot:
    start_vpn: int
    end_vpn: int
    perms: str
    path: str
    thp: bool  # THP allowed (smaps THPeligible, else VmFlags "hg")


@dataclass(frozen=True, eq=False)
class ProcessShot:
    """One process's VMAs (with Rss) and its present pages in virtual order."""

    pid: int
    comm: str
    cmdline: tuple[str, ...]
    vmas: tuple[VmaShot, ...]
    vpn: np.ndarray  # int64, strictly increasing
    pfn: np.ndarray  # int64
    thp: np.ndarray  # bool: mapped by a PMD

    @property
    def present_pages(self) -> int:
        return int(self.vpn.size)


@dataclass(frozen=True, eq=False)
class HostSnapshot:
    kernel: str  # uname release
    taken: float  # time.time() at the start
    seconds: float  # how long taking it took
    flags: np.ndarray  # uint64 per frame from pfn 0: /proc/kpageflags
    zones: tuple[ZoneSpan, ...]
    buddyinfo: tuple[ZoneFree, ...]
    processes: tuple[ProcessShot, ...] = ()
    notes: tuple[str, ...] = field(default=())  # what the reader could not do, and why

    @property
    def nframes(self) -> int:
        return int(self.flags.size)


def save(snap: HostSnapshot, path: str | os.PathLike[str]) -> None:
    """Write `snap` to `path` (a compressed .npz; numpy adds no suffix to a file object)."""
    meta = {
        "schema": SCHEMA,
        "kernel": snap.kernel,
        "taken": snap.taken,
        "seconds": snap.seconds,
        "zones": [
            [z.node, z.name, z.start_pfn, z.spanned, z.present, z.managed] for z in snap.zones
        ],
        "buddyinfo": [[b.node, b.zone, list(b.free)] for b in snap.buddyinfo],
        "processes": [
            {
                "pid": p.pid,
                "comm": p.comm,
                "cmdline": list(p.cmdline),
                "vmas": [[v.start_vpn, v.end_vpn, v.perms, v.path, v.thp] for v in p.vmas],
            }
            for p in snap.processes
        ],
        "notes": list(snap.notes),
    }
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta)), "flags": snap.flags}
    for i, p in enumerate(snap.processes):
        arrays[f"vpn{i}"], arrays[f"pfn{i}"], arrays[f"thp{i}"] = p.vpn, p.pfn, p.thp
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]


def load(path: str | os.PathLike[str]) -> HostSnapshot:
    """Read a snapshot written by `save`; raises SnapshotError (or OSError) naming why not."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
            if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
                raise SnapshotError(f"{path}: not a {SCHEMA} file")
            flags = _array(z, "flags", np.uint64)
            procs = []
            for i, p in enumerate(meta["processes"]):
                vmas = tuple(
                    VmaShot(int(a), int(b), str(perms), str(name), bool(thp))
                    for a, b, perms, name, thp in p["vmas"]
                )
                procs.append(
                    ProcessShot(
                        int(p["pid"]),
                        str(p["comm"]),
                        tuple(str(c) for c in p["cmdline"]),
                        vmas,
                        _array(z, f"vpn{i}", np.int64),
                        _array(z, f"pfn{i}", np.int64),
                        _array(z, f"thp{i}", np.bool_),
                    )
                )
            snap = HostSnapshot(
                kernel=str(meta["kernel"]),
                taken=float(meta["taken"]),
                seconds=float(meta["seconds"]),
                flags=flags,
                zones=tuple(
                    ZoneSpan(int(n), str(name), int(s), int(sp), int(pr), int(m))
                    for n, name, s, sp, pr, m in meta["zones"]
                ),
                buddyinfo=tuple(
                    ZoneFree(int(n), str(name), tuple(int(c) for c in free))
                    for n, name, free in meta["buddyinfo"]
                ),
                processes=tuple(procs),
                notes=tuple(str(n) for n in meta.get("notes", [])),
            )
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, SnapshotError):
            raise
        raise SnapshotError(f"{path}: not a readable snapshot ({type(e).__name__})") from None
    check(snap)
    return snap


def _array(z: np.lib.npyio.NpzFile, name: str, dtype: type) -> np.ndarray:
    a = z[name]
    if a.ndim != 1 or a.dtype != np.dtype(dtype):
        raise SnapshotError(f"array {name}: {a.dtype} of {a.ndim} dimension(s), not {dtype}")
    return a


def check(snap: HostSnapshot) -> None:
    """Refuse a snapshot the seeding could not trust: pages outside the flags, unsorted or
    outside their VMAs, zones beyond the frames."""
    n = snap.nframes
    for z in snap.zones:
        if z.start_pfn < 0 or z.spanned <= 0 or z.end_pfn > n:
            raise SnapshotError(f"zone {z.node}/{z.name} lies outside the {n} frames read")
    for p in snap.processes:
        if not p.vpn.size == p.pfn.size == p.thp.size:
            raise SnapshotError(f"pid {p.pid}: vpn, pfn and thp differ in length")
        if p.pfn.size and (p.pfn.min() < 0 or p.pfn.max() >= n):
            raise SnapshotError(f"pid {p.pid}: a frame number beyond the {n} frames read")
        if p.vpn.size > 1 and (np.diff(p.vpn) <= 0).any():
            raise SnapshotError(f"pid {p.pid}: pages not in strictly increasing vpn order")
        starts = np.array([v.start_vpn for v in p.vmas], dtype=np.int64)
        ends = np.array([v.end_vpn for v in p.vmas], dtype=np.int64)
        if (ends <= starts).any() or (starts[1:] < ends[:-1]).any():
            raise SnapshotError(f"pid {p.pid}: VMAs empty, unsorted or overlapping")
        i = np.searchsorted(starts, p.vpn, side="right") - 1
        if p.vpn.size and ((i < 0).any() or (p.vpn >= ends[np.maximum(i, 0)]).any()):
            raise SnapshotError(f"pid {p.pid}: a page outside every VMA")
