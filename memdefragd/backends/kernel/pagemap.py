"""Reading a VMA's physical layout from /proc/PID/pagemap.

Two ways to find what to read, both ending in windows of at most `WINDOW_PAGES` entries
cut at fixed, PMD-aligned addresses (each window becomes one Layout, so memory is bounded
by the window whatever the target's size, and no 2 MiB region straddles two windows):

- *sparse* VMAs (or when frame numbers are hidden): one PAGEMAP_SCAN ioctl (Linux 6.7+)
  finds the present ranges and which are PMD-mapped, and only those are read;
- *dense* VMAs: the pagemap is read straight through (the ioctl would walk every page
  table for nothing), and PAGEMAP_SCAN is asked only about the few regions that could be
  PMD-mapped: aligned, fully present, and backed by 512 contiguous, aligned frames.

Kernels without PAGEMAP_SCAN get the dense path, with /proc/kpageflags read for the head
frame of each such candidate instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator

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

WINDOW_PAGES = 1 << 18  # 1 GiB of address space, 2 MiB of pagemap entries per window
_SCAN_VEC = 4096  # regions returned per PAGEMAP_SCAN call
_GAP_PAGES = PMD_PAGES  # read across holes smaller than this rather than issue another pread


class PagemapReader:
    """Reads layouts of one process through an already opened pagemap fd."""

    def __init__(
        self,
        pagemap_fd: int,
        kpageflags_fd: int | None,
        use_scan: bool = True,
        window_pages: int = WINDOW_PAGES,
    ):
        if window_pages % PMD_PAGES:
            raise ValueError("window_pages must be a multiple of the PMD size in pages")
        self.fd = pagemap_fd
        self.kpf_fd = kpageflags_fd
        self.use_scan = use_scan
        self.window = window_pages
        self._buf = np.empty(0, dtype=np.uint64)
        self._vec = np.zeros(_SCAN_VEC, dtype=_PAGE_REGION)

    def windows(
        self, start: int, end: int, pfn_known: bool, dense: bool = False
    ) -> Iterator[Layout]:
        """The layout of [start, end) as consecutive windows holding present pages."""
        start_vpn, end_vpn = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        ranges = None
        if self.use_scan and not (dense and pfn_known):
            ranges = self._scan(start, end, PAGE_IS_PRESENT, PAGE_IS_PRESENT | PAGE_IS_HUGE)
        if ranges is None:
            spans: list[tuple[int, int]] = [(start_vpn, end_vpn)]
        else:
            spans = _spans(ranges["start"] >> PAGE_SHIFT, ranges["end"] >> PAGE_SHIFT)
        for w_lo, pieces in _by_window(spans, self.window):
            vpns, pfns = zip(*(self._read_span(lo, hi) for lo, hi in pieces), strict=True)
            vpn = vpns[0] if len(vpns) == 1 else np.concatenate(vpns)
            pfn = pfns[0] if len(pfns) == 1 else np.concatenate(pfns)
            if ranges is not None:
                thp = _huge_pages(vpn, ranges)
            elif pfn_known:
                thp = self._thp_of_candidates(start_vpn, end_vpn, vpn, pfn)
            else:
                thp = np.zeros(vpn.size, dtype=bool)  # kernel < 6.7 and no CAP_SYS_ADMIN
            lo = max(start_vpn, w_lo)
            yield Layout(lo, min(end_vpn, w_lo + self.window), vpn, pfn, thp, pfn_known)

    def _read_span(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        n = hi - lo
        if self._buf.size < n:
            self._buf = np.empty(max(n, self.window), dtype=np.uint64)
        entries = self._buf[:n]
        got = _preadv(self.fd, entries.data.cast("B"), lo * 8)
        if got != n * 8:
            raise ProcessGone(f"pagemap: short read ({got} of {n * 8} bytes): process exited")
        if np.bitwise_and.reduce(entries) & PM_PRESENT:  # all present: no selection needed
            return np.arange(lo, hi, dtype=np.uint64), entries & PM_PFN_MASK
        idx = np.flatnonzero(entries & PM_PRESENT)
        return idx.astype(np.uint64) + np.uint64(lo), entries[idx] & PM_PFN_MASK

    def _thp_of_candidates(
        self, start_vpn: int, end_vpn: int, vpn: np.ndarray, pfn: np.ndarray
    ) -> np.ndarray:
        """Mark PMD-mapped pages, asking the kernel only about regions that could be."""
        thp = np.zeros(vpn.size, dtype=bool)
        heads = _candidate_heads(start_vpn, end_vpn, vpn, pfn)
        if heads.size == 0:
            return thp
        if self.use_scan:
            hv = vpn[heads]
            cut = np.flatnonzero(np.diff(hv) != PMD_PAGES) + 1  # stretches of candidates
            for a, b in zip(np.r_[0, cut], np.r_[cut, hv.size], strict=True):
                lo, hi = int(hv[a]) << PAGE_SHIFT, (int(hv[b - 1]) + PMD_PAGES) << PAGE_SHIFT
                ranges = self._scan(lo, hi, PAGE_IS_HUGE, PAGE_IS_HUGE)
                if ranges is None:  # the kernel has no PAGEMAP_SCAN after all
                    return self._thp_of_candidates(start_vpn, end_vpn, vpn, pfn)
                thp |= _huge_pages(vpn, ranges)
            return thp
        if self.kpf_fd is None:
            return thp  # kernel < 6.7 and /proc/kpageflags unreadable: cannot tell
        flags = np.zeros(1, dtype=np.uint64)
        for h in heads.tolist():
            # kpageflags cannot tell a PMD mapping from a PTE-mapped 2 MiB folio; only
            # PAGEMAP_SCAN can, so on kernels without it such folios count as THP.
            _preadv(self.kpf_fd, flags.data.cast("B"), int(pfn[h]) * 8)
            f = int(flags[0])
            if f & KPF_THP and f & KPF_COMPOUND_HEAD:
                thp[h : h + PMD_PAGES] = True
        return thp

    def _scan(self, start: int, end: int, category: int, returned: int) -> np.ndarray | None:
        """Ranges of [start, end) whose pages have every bit of `category`, with the bits
        of `returned`; None if the kernel has no PAGEMAP_SCAN."""
        out: list[np.ndarray] = []
        vec_addr = self._vec.ctypes.data
        while start < end:
            arg = bytearray(
                _PM_SCAN_ARG.pack(
                    _PM_SCAN_ARG.size, 0, start, end, 0, vec_addr, _SCAN_VEC, 0,
                    0, category, 0, returned,
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


def _by_window(
    spans: list[tuple[int, int]], window: int
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Cut spans at multiples of `window` and group the pieces by window, in order."""
    current = -1
    pieces: list[tuple[int, int]] = []
    for lo, hi in spans:
        while lo < hi:
            w = lo // window * window
            cut = min(hi, w + window)
            if w != current:
                if pieces:
                    yield current, pieces
                current, pieces = w, []
            pieces.append((lo, cut))
            lo = cut
    if pieces:
        yield current, pieces


def _candidate_heads(start_vpn: int, end_vpn: int, vpn: np.ndarray, pfn: np.ndarray) -> np.ndarray:
    """Indices of the first page of each aligned region inside [start, end) that is fully
    present and whose frames span exactly 512 from an aligned head: the only regions a
    PMD can map."""
    if vpn.size < PMD_PAGES:
        return np.zeros(0, dtype=np.int64)
    lo = max(start_vpn, int(vpn[0]))
    first = -(-lo // PMD_PAGES) * PMD_PAGES
    last = min(end_vpn, int(vpn[-1]) + 1) // PMD_PAGES * PMD_PAGES
    if last <= first:
        return np.zeros(0, dtype=np.int64)
    want = np.arange(first, last, PMD_PAGES, dtype=np.uint64)
    heads = np.searchsorted(vpn, want)
    tails = heads + (PMD_PAGES - 1)
    ok = tails < vpn.size
    heads, tails, want = heads[ok], tails[ok], want[ok]
    ok = (vpn[heads] == want) & (vpn[tails] == want + np.uint64(PMD_PAGES - 1))
    ok &= (pfn[tails] - pfn[heads] == PMD_PAGES - 1) & (pfn[heads] % PMD_PAGES == 0)
    aligned: np.ndarray = heads[ok]
    return aligned


def _huge_pages(vpn: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    sel = (ranges["categories"] & np.uint64(PAGE_IS_HUGE)) != 0
    return _in_ranges(vpn, ranges["start"][sel] >> PAGE_SHIFT, ranges["end"][sel] >> PAGE_SHIFT)


def _in_ranges(vpn: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    if starts.size == 0 or vpn.size == 0:
        return np.zeros(vpn.size, dtype=bool)
    i = np.searchsorted(starts, vpn, side="right") - 1
    ok = i >= 0
    ok[ok] = vpn[ok] < ends[i[ok]]
    return ok


NO_SCAN_REASON = (
    "this kernel has no PAGEMAP_SCAN ioctl (Linux < 6.7): layouts are read whole from "
    "/proc/PID/pagemap, and THPs found through /proc/kpageflags, which cannot tell a "
    "PMD mapping from a PTE-mapped 2 MiB folio (such a folio counts as THP)"
)


def scan_refusal(proc_root: str = "/proc") -> str | None:
    """None where the kernel has PAGEMAP_SCAN; else what the reads fall back to. Asks about
    one page of our own memory."""
    page = 1 << PAGE_SHIFT
    buf = np.ones(2 * page, dtype=np.uint8)  # touched: a present page lies inside
    addr = -(-buf.ctypes.data // page) * page
    fd = os.open(f"{proc_root}/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = PagemapReader(fd, None)._scan(addr, addr + page, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
    finally:
        os.close(fd)
    del buf
    return None if found is not None else NO_SCAN_REASON
