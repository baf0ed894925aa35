"""Reading a VMA's physical layout from /proc/PID/pagemap and /proc/kpageflags.

One PAGEMAP_SCAN ioctl (Linux 6.7+) finds the present ranges and which of them are
PMD-mapped; pagemap entries are then read with one pread per window of at most
`WINDOW_PAGES` entries (a VMA up to 4 GiB takes one pread), into a reused buffer, so the
scanner's memory stays flat however large the target's reservations are. Where the ioctl
is missing, the whole VMA is read and /proc/kpageflags is consulted only for the head
frame of each 2 MiB region that could be a THP.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import numpy as np

from ...model import PAGE_SHIFT, PMD_PAGES, AccessDenied, Layout, ProcessGone

PM_PRESENT = np.uint64(1 << 63)
PM_PFN_MASK = np.uint64((1 << 55) - 1)

KPF_COMPOUND_HEAD = 1 << 15
KPF_THP = 1 << 22

PAGE_IS_PRESENT = 1 << 3
PAGE_IS_HUGE = 1 << 6

_PM_SCAN_ARG = struct.Struct("12Q")  # struct pm_scan_arg (include/uapi/linux/fs.h)
PAGEMAP_SCAN = (3 << 30) | (_PM_SCAN_ARG.size << 16) | (ord("f") << 8) | 16
_PAGE_REGION = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])

WINDOW_PAGES = 1 << 20  # 8 MiB of entries per pread, 4 GiB of address space
_SCAN_VEC = 4096  # regions returned per PAGEMAP_SCAN call
_GAP_PAGES = 512  # read across holes smaller than this rather than issue another pread


class PagemapReader:
    """Reads layouts of one process through an already opened pagemap fd."""

    def __init__(self, pagemap_fd: int, kpageflags_fd: int | None, use_scan: bool = True):
        self.fd = pagemap_fd
        self.kpf_fd = kpageflags_fd
        self.use_scan = use_scan
        self._buf = np.empty(0, dtype=np.uint64)
        self._vec = np.zeros(_SCAN_VEC, dtype=_PAGE_REGION)

    def read(self, start: int, end: int, pfn_known: bool) -> Layout:
        start_vpn, end_vpn = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        ranges = self._scan(start, end) if self.use_scan else None
        if ranges is None:
            spans = [(start_vpn, end_vpn)]
        else:
            spans = _spans(ranges["start"] >> PAGE_SHIFT, ranges["end"] >> PAGE_SHIFT)
        vpns, pfns = [], []
        for lo, hi in spans:
            for w in range(lo, hi, WINDOW_PAGES):
                v, p = self._read_window(w, min(hi, w + WINDOW_PAGES))
                vpns.append(v)
                pfns.append(p)
        vpn = np.concatenate(vpns) if vpns else np.zeros(0, np.uint64)
        pfn = np.concatenate(pfns) if pfns else np.zeros(0, np.uint64)
        if ranges is not None:
            thp = _in_ranges(vpn, ranges, PAGE_IS_HUGE)
        elif pfn_known and self.kpf_fd is not None:
            thp = self._thp_from_kpageflags(start_vpn, end_vpn, vpn, pfn)
        else:
            thp = np.zeros(vpn.size, dtype=bool)
        return Layout(start_vpn, end_vpn, vpn, pfn, thp, pfn_known)

    def _read_window(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        n = hi - lo
        if self._buf.size < n:
            self._buf = np.empty(n, dtype=np.uint64)
        view = memoryview(self._buf[:n]).cast("B")
        got = _preadv(self.fd, view, lo * 8)
        if got != n * 8:
            raise ProcessGone(f"pagemap: short read ({got} of {n * 8} bytes): process exited")
        entries = self._buf[:n]
        idx = np.flatnonzero(entries & PM_PRESENT)
        return (idx.astype(np.uint64) + np.uint64(lo)), entries[idx] & PM_PFN_MASK

    def _scan(self, start: int, end: int) -> np.ndarray | None:
        """Present ranges of [start, end) with their HUGE bit, or None if unsupported."""
        out = []
        vec_addr = self._vec.ctypes.data
        while start < end:
            arg = bytearray(
                _PM_SCAN_ARG.pack(
                    _PM_SCAN_ARG.size, 0, start, end, 0, vec_addr, _SCAN_VEC, 0,
                    0, PAGE_IS_PRESENT, 0, PAGE_IS_PRESENT | PAGE_IS_HUGE,
                )
            )  # fmt: skip
            try:
                n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg)
            except OSError as e:
                if e.errno in (errno.ENOTTY, errno.EINVAL) and not out:
                    self.use_scan = False
                    return None
                raise _translate(e) from e
            out.append(self._vec[:n].copy())
            walk_end = _PM_SCAN_ARG.unpack(arg)[4]
            if walk_end <= start:
                break
            start = walk_end
        return np.concatenate(out) if out else np.zeros(0, dtype=_PAGE_REGION)

    def _thp_from_kpageflags(
        self, start_vpn: int, end_vpn: int, vpn: np.ndarray, pfn: np.ndarray
    ) -> np.ndarray:
        """Mark pages of aligned, fully present, pfn-contiguous regions whose head is a THP."""
        thp = np.zeros(vpn.size, dtype=bool)
        if vpn.size < PMD_PAGES:
            return thp
        heads = np.flatnonzero(vpn % PMD_PAGES == 0)
        heads = heads[heads + PMD_PAGES <= vpn.size]
        tails = heads + PMD_PAGES - 1
        cand = heads[
            (vpn[tails] - vpn[heads] == PMD_PAGES - 1)
            & (pfn[tails] - pfn[heads] == PMD_PAGES - 1)
            & (pfn[heads] % PMD_PAGES == 0)
            & (vpn[heads] >= start_vpn)
            & (vpn[tails] < end_vpn)
        ]
        flags = np.zeros(1, dtype=np.uint64)
        for h in cand:
            _preadv(self.kpf_fd, memoryview(flags).cast("B"), int(pfn[h]) * 8)
            f = int(flags[0])
            if f & KPF_THP and f & KPF_COMPOUND_HEAD:
                thp[h : h + PMD_PAGES] = True
        return thp


def _preadv(fd: int, view: memoryview, offset: int) -> int:
    try:
        return os.preadv(fd, [view], offset)
    except OSError as e:
        raise _translate(e) from e


def _translate(e: OSError) -> Exception:
    if e.errno in (errno.ESRCH, errno.ENOENT):
        return ProcessGone(f"pagemap: {e.strerror}")
    if e.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"pagemap: {e.strerror}")
    return e


def _spans(starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """Merge present ranges separated by small holes into spans to read."""
    if starts.size == 0:
        return []
    gap = starts[1:] - ends[:-1]
    cut = np.flatnonzero(gap >= _GAP_PAGES)
    lo = np.concatenate(([0], cut + 1))
    hi = np.concatenate((cut, [starts.size - 1]))
    return list(zip(starts[lo].tolist(), ends[hi].tolist(), strict=True))


def _in_ranges(vpn: np.ndarray, ranges: np.ndarray, category: int) -> np.ndarray:
    sel = ranges[(ranges["categories"] & np.uint64(category)) != 0]
    if sel.size == 0 or vpn.size == 0:
        return np.zeros(vpn.size, dtype=bool)
    starts, ends = sel["start"] >> PAGE_SHIFT, sel["end"] >> PAGE_SHIFT
    i = np.searchsorted(starts, vpn, side="right") - 1
    ok = i >= 0
    ok[ok] = vpn[ok] < ends[i[ok]]
    return ok
