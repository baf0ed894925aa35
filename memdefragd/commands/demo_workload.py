"""The workload `memdefragd demo` starts: a heap of 4 KiB pages, read at random for ever,
timing its own reads.

Run as a script (``python -m memdefragd.commands.demo_workload SIZE``), never imported by
the daemon. It is the mapping and the gather of ``tools/child.py`` (the tests' and the
benchmarks' child), which the package cannot import (tools/ is not installed with it):

- one anonymous mapping of SIZE bytes at a 2 MiB-aligned address, a hole each side, with
  MADV_DONTFORK (flags no neighbour has, so nothing merges with it);
- faulted in as 4 KiB pages: with no advice where THP's ``enabled`` is ``madvise`` or
  ``never`` (khugepaged then leaves it alone too, so only the demo's daemon collapses it);
  under ``always``, under MADV_NOHUGEPAGE, then given MADV_HUGEPAGE (MADV_COLLAPSE refuses
  a VM_NOHUGEPAGE area; khugepaged may collapse some of it meanwhile, as it would anyway);
- a random gather of GATHER 8-byte words over it with numpy (its index and output arrays
  made huge first, so only the heap differs between a reading before and one after).

It prints one JSON line, {"addr", "size"}, then gathers round after round (the workload),
and answers each line on stdin, "latency", with {"ns": ns per read in the best of
ROUNDS rounds}. It exits when stdin closes, when its parent dies (PR_SET_PDEATHSIG) and on
SIGTERM; it ignores SIGINT (a Ctrl-C reaches the whole terminal's process group: the demo
ends the child itself, after saying what it was doing).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable

import numpy as np

PMD = 2 << 20
PROT_RW = 3
MAP_PRIVATE_ANONYMOUS = 0x22
MADV_DONTFORK, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 10, 14, 15
MADV_POPULATE_WRITE, MADV_COLLAPSE = 23, 25
PR_SET_PDEATHSIG = 1
GATHER = 1 << 20  # words per round: long enough to time, short enough to answer quickly
ROUNDS = 7

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
)  # fmt: skip
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def die_with_parent() -> None:
    """SIGKILL when the parent dies; exit now if it already has (the race before prctl)."""
    parent = os.getppid()
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != parent:
        os._exit(1)


def aligned_mapping(size: int) -> int:
    """An anonymous mapping of ``size`` bytes at a 2 MiB-aligned address, a hole each side."""
    raw = _libc.mmap(None, size + 2 * PMD, PROT_RW, MAP_PRIVATE_ANONYMOUS, -1, 0)
    if raw is None or raw == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap")
    addr: int = (raw + PMD) & ~(PMD - 1)
    _check(_libc.munmap(raw, addr - raw), "munmap head")
    _check(_libc.munmap(addr + size, raw + size + 2 * PMD - (addr + size)), "munmap tail")
    _check(_libc.madvise(addr, size, MADV_DONTFORK), "MADV_DONTFORK")
    return addr


def populate(addr: int, size: int) -> None:
    """Fault every page in, writable: MADV_POPULATE_WRITE (5.14+), else a byte per page."""
    if _libc.madvise(addr, size, MADV_POPULATE_WRITE) != 0:
        for off in range(0, size, 4096):
            ctypes.memset(addr + off, 0x5A, 1)


THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_always(path: str = THP_ENABLED) -> bool:
    """THP's ``enabled`` is ``always``: a fault would map a huge page unasked."""
    try:
        with open(path) as f:
            return "[always]" in f.read()
    except OSError:
        return False


def small_page_heap(size: int) -> int:
    """The heap: 4 KiB pages, open to MADV_COLLAPSE (see the module's docstring)."""
    addr = aligned_mapping(size)
    always = thp_always()
    if always:
        _check(_libc.madvise(addr, size, MADV_NOHUGEPAGE), "MADV_NOHUGEPAGE")
    populate(addr, size)
    if always:
        _check(_libc.madvise(addr, size, MADV_HUGEPAGE), "MADV_HUGEPAGE")
    return addr


def words(addr: int, n: int, ctype: type[ctypes._SimpleCData[int]]) -> np.ndarray:
    return np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctype)), (n,))


def gatherer(addr: int, size: int, k: int = GATHER) -> Callable[[], float]:
    """One round of k random reads over the heap: its seconds. The index and output arrays
    live in a mapping made huge at once (best effort: a kernel without MADV_COLLAPSE keeps
    them on 4 KiB pages, before and after alike)."""
    heap = words(addr, size // 8, ctypes.c_uint64)
    aux_size = -(-2 * k * 8 // PMD) * PMD
    aux = aligned_mapping(aux_size)
    populate(aux, aux_size)
    _libc.madvise(aux, aux_size, MADV_COLLAPSE)
    idx = words(aux, k, ctypes.c_int64)
    out = words(aux + 8 * k, k, ctypes.c_uint64)
    idx[:] = np.random.default_rng(20261125).integers(0, heap.size, size=k)

    def round_seconds() -> float:
        t0 = time.perf_counter()
        np.take(heap, idx, out=out)
        return time.perf_counter() - t0

    return round_seconds


def latency_ns(round_seconds: Callable[[], float], k: int = GATHER, rounds: int = ROUNDS) -> float:
    """ns per read in the best of ``rounds`` rounds, after one to warm up: whatever else
    runs on the machine can only add time, so the best round is the heap's own figure."""
    round_seconds()
    return min(round_seconds() for _ in range(rounds)) / k * 1e9


def serve(round_seconds: Callable[[], float]) -> None:
    """Read at random until stdin closes, answering "latency" lines between rounds."""
    while True:
        round_seconds()
        if not select.select([sys.stdin], [], [], 0)[0]:
            continue
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip() == "latency":
            reply: dict[str, object] = {"ns": latency_ns(round_seconds)}
        else:
            reply = {"error": "unknown command"}
        print(json.dumps(reply), flush=True)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    size = int(sys.argv[1])
    addr = small_page_heap(size)
    round_seconds = gatherer(addr, size)
    print(json.dumps({"addr": addr, "size": size}), flush=True)
    serve(round_seconds)


if __name__ == "__main__":
    main()
