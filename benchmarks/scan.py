"""Scanner throughput against the kernel's own limit, side by side in one run.

    python3 benchmarks/scan.py [--size-gib 4] [--repeat 5]

Starts a child with one anonymous mapping of --size-gib GiB populated with 4 KiB pages
(MADV_NOHUGEPAGE, so no THP whatever sysfs says), then measures, interleaved round by
round and keeping the best of --repeat rounds for each:

  (a) raw         one os.preadv of the whole VMA's pagemap range into a preallocated
                  buffer: what fetching the kernel's answer costs, nothing else
  (b) scan        pipeline.scan.scan_process without detail: the VMA list from /proc/PID/maps,
                  then pagemap read in windows (PAGEMAP_SCAN first for sparse VMAs, or only
                  over THP candidates for dense ones), the metrics of every VMA folded
                  window by window, and the per-process rollup (the daemon's periodic scan)
  (c) report      the same with detail: the VMA list from /proc/PID/smaps (Rss,
                  AnonHugePages, VmFlags), whose generation walks every page table of
                  the target once more (what `memdefragd report` does)
  (d) fallback    (b) with use_scan=False (whole-VMA pagemap reads + /proc/kpageflags)

Rates are pages per second counting the big VMA's pages; the target is (b)/(a) >= 0.5.
An instrumented pass splits (b) into the VMA list, PAGEMAP_SCAN, pagemap reads, the THP
candidate check and the rest (decode, metrics, rollup). Peak RSS (ru_maxrss) of this
scanning process is shown after each phase and as a ratio to the target's size. Frame
numbers need CAP_SYS_ADMIN.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memdefragd.backends.kernel.backend as kernel_backend
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.pipeline.scan import scan_process
from tools.child import spawn

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
MADV_NOHUGEPAGE = 15


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def end_to_end(backend: KernelBackend, proc, max_ptes_none: int, detail: bool):
    return scan_process(backend, proc, detail=detail, max_ptes_none=max_ptes_none)


INNER = ("PAGEMAP_SCAN", "pagemap reads", "THP candidates")


def breakdown(backend: KernelBackend, proc, max_ptes_none: int, repeat: int) -> dict:
    """The best instrumented pass of (b), its reader's methods timed through a subclass."""
    base = kernel_backend.PagemapReader
    acc: dict[str, float] = {}

    def clock(name: str, key: str):
        original = getattr(base, name)

        def wrapper(self, *args):
            t0 = time.perf_counter()
            try:
                return original(self, *args)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

        return wrapper

    methods = ("_scan", "_read_span", "_thp_of_candidates")
    reader = type(
        "TimedReader", (base,), {m: clock(m, k) for m, k in zip(methods, INNER, strict=True)}
    )
    list_vmas = backend.list_vmas

    def timed_list_vmas(*a, **kw):
        t0 = time.perf_counter()
        try:
            return list_vmas(*a, **kw)
        finally:
            acc["VMA list (/proc/PID/maps)"] = time.perf_counter() - t0

    best: dict[str, float] = {}
    kernel_backend.PagemapReader = reader
    backend.list_vmas = timed_list_vmas
    try:
        for _ in range(repeat):
            acc.clear()
            t0 = time.perf_counter()
            end_to_end(backend, proc, max_ptes_none, detail=False)
            run = {"total": time.perf_counter() - t0, **acc}
            run["decode, metrics, rollup"] = run["total"] - sum(acc.values())
            if not best or run["total"] < best["total"]:
                best = run
    finally:
        kernel_backend.PagemapReader = base
        del backend.list_vmas
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="target mapping size (GiB)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best of each is kept")
    args = ap.parse_args()
    size = int(args.size_gib * GiB) // (2 * MiB) * (2 * MiB)
    if size <= 0 or args.repeat < 1:
        ap.error("--size-gib and --repeat must be positive")
    npages = size // PAGE

    rss = {"at start (interpreter + numpy)": maxrss()}
    t0 = time.perf_counter()
    # tools/child.py: one 2 MiB-aligned mapping, MADV_NOHUGEPAGE, MADV_POPULATE_WRITE.
    child = spawn({"size": size, "populate": "write", "advise": [MADV_NOHUGEPAGE]})
    backend = KernelBackend()
    fallback = KernelBackend(use_scan=False)
    try:
        line = child.stdout.readline()
        if not line:
            print(f"child failed (exit status {child.wait()})", file=sys.stderr)
            return 1
        addr = json.loads(line)["addr"]
        populate = time.perf_counter() - t0

        vis = backend.pfn_visibility()
        max_ptes_none = backend.memory_state().max_ptes_none
        proc = backend.process(child.pid)
        vma = next(v for v in backend.list_vmas(proc) if v.start == addr)
        rss["ready"] = maxrss()

        # First passes, in this order, so each phase's memory shows on its own.
        scanned = end_to_end(backend, proc, max_ptes_none, detail=False)
        rss["after (b)"] = maxrss()
        reported = end_to_end(backend, proc, max_ptes_none, detail=True)
        rss["after (c)"] = maxrss()
        fell_back = end_to_end(fallback, proc, max_ptes_none, detail=False)
        rss["after (d)"] = maxrss()
        big = next(r.metrics for r in scanned.vmas if r.vma.start == addr)
        same = {
            name: next(r.metrics for r in rep.vmas if r.vma.start == addr).contiguity
            == big.contiguity
            for name, rep in (("(c)", reported), ("(d)", fell_back))
        }
        buf = np.empty(vma.size // PAGE, dtype=np.uint64)
        view = memoryview(buf).cast("B")
        fd = os.open(f"/proc/{child.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)

        def raw() -> int:
            return os.preadv(fd, [view], vma.start // PAGE * 8)

        try:
            got = raw()
            rss["after (a) (+ its own buffer)"] = maxrss()
            best = dict.fromkeys(("a", "b", "c", "d", "maps", "smaps"), float("inf"))
            for _ in range(args.repeat):
                for key, fn in (
                    ("a", raw),
                    ("b", lambda: end_to_end(backend, proc, max_ptes_none, False)),
                    ("c", lambda: end_to_end(backend, proc, max_ptes_none, True)),
                    ("d", lambda: end_to_end(fallback, proc, max_ptes_none, False)),
                    ("maps", lambda: Path(f"/proc/{child.pid}/maps").read_bytes()),
                    ("smaps", lambda: Path(f"/proc/{child.pid}/smaps").read_bytes()),
                ):
                    best[key] = min(best[key], timed(fn)[0])
        finally:
            os.close(fd)
        parts = breakdown(backend, proc, max_ptes_none, args.repeat)
        rss["end"] = maxrss()
    finally:
        backend.close()
        fallback.close()
        if child.stdin:
            child.stdin.close()
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()

    if got != buf.nbytes:
        print(f"short pagemap read: {got} of {buf.nbytes} bytes", file=sys.stderr)
        return 1
    raw_present = int(np.count_nonzero(buf >> np.uint64(63)))
    rates = {k: npages / best[k] for k in ("a", "b", "c", "d")}
    ratio = rates["b"] / rates["a"]

    w = 36

    def line_(label: str, value: str, note: str = "") -> None:
        print(f"  {label:<{w}} {value:>14}  {note}".rstrip())

    print(f"memdefragd scan benchmark: Linux {os.uname().release}, best of {args.repeat} rounds")
    print()
    line_("target mapping", f"{size / GiB:.2f} GiB", f"{npages:,} pages of 4 KiB")
    line_("populated in", f"{populate:.1f} s", "(setup, not measured)")
    line_("big VMA present pages", f"{big.present_pages:,}", f"raw read saw {raw_present:,}")
    line_("big VMA THP pages", f"{big.thp_pages:,}", f"smaps AnonHugePages {vma.anon_huge}")
    line_(
        "VMAs with present pages",
        f"{len(scanned.vmas)}",
        f"{scanned.totals.present_pages:,} present pages in all",
    )
    line_("PFNs visible", str(vis.visible), vis.reason[:48])
    if big.contiguity is not None:
        c = big.contiguity
        line_("big VMA runs", f"{c.runs:,}", f"largest {c.largest_run:,}, mean {c.mean_run:.1f}")
        line_("(c) and (d) agree with (b)", str(all(same.values())), str(same))
    print()
    print(f"  {'throughput':<{w}} {'pages/s':>14}  {'time':>9}  {'vs (a)':>6}")
    for key, label in (
        ("a", "(a) raw preadv of pagemap"),
        ("b", "(b) scan: maps + pagemap"),
        ("c", "(c) report: smaps + pagemap"),
        ("d", "(d) scan, kpageflags fallback"),
    ):
        print(
            f"  {label:<{w}} {rates[key]:>14,.0f}  {best[key] * 1e3:>7.1f}ms"
            f"  {rates[key] / rates['a']:>6.2f}"
        )
    verdict = "meets" if ratio >= 0.5 else "BELOW"
    print(f"  {'ratio (b)/(a)':<{w}} {ratio:>14.2f}  {verdict} the target (>= 0.5)")
    print()
    total = parts["total"]
    print(f"  {'breakdown of (b), instrumented':<{w}} {'time':>14}  {'share':>9}")
    keys = ("VMA list (/proc/PID/maps)", *INNER, "decode, metrics, rollup", "total")
    for key in keys:
        if key in parts:
            print(f"  {key:<{w}} {parts[key] * 1e3:>12.1f}ms  {parts[key] / total:>9.0%}")
    ref = best["smaps"]
    print(
        f"  {'for reference: read /proc/PID/smaps':<{w}} {ref * 1e3:>12.1f}ms  {ref / total:>9.0%}"
    )
    print()
    print(f"  {'peak RSS of the scanner':<{w}} {'ru_maxrss':>14}  {'/ target':>9}")
    for label, value in rss.items():
        print(f"  {label:<{w}} {value / MiB:>11.1f}MiB  {value / size:>9.2%}")
    grow = rss["after (b)"] - rss["ready"]
    print(f"  {'growth during the first (b)':<{w}} {grow / MiB:>11.1f}MiB  {grow / size:>9.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
