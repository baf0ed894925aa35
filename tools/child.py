"""A child process with known anonymous memory, for the real-kernel tests and the benchmarks.

One file for both sides, so that tests and benchmarks start the same program without either
importing the other: run as a script it is the child; imported, ``spawn`` starts it and
``readline``/``answer`` read what it says. The child uses the standard library only (numpy
for ``gather``) and never memdefragd, so what it reports is independent of the code under
test. Its configuration is one JSON object, its first argument; ``comm`` sets its name
(PR_SET_NAME) so that a daemon's config can match it.

The mapping program (the default): one anonymous VMA of exactly ``size`` bytes (a multiple
of 2 MiB) at a 2 MiB-aligned address. It maps 4 MiB more and unmaps the unaligned head and
tail, both non-empty, so the VMA starts and ends next to a hole; MADV_DONTFORK gives it flags
no ordinary anonymous mapping has, so nothing the interpreter maps later into those holes can
merge with it. With ``forkable``, MADV_DONTDUMP does that instead, so that a fork shares it.

    advise    more madvise(2) advice over the whole mapping (15: MADV_NOHUGEPAGE, ...)
    populate  "touch" (default): write every page of ``touch`` ([[off, len]...], all of it by
              default) one by one, 0x5A throughout: 4 KiB faults while THP is ``madvise``
              and nobody asked for MADV_HUGEPAGE. "write": MADV_POPULATE_WRITE over all of
              it (Linux 5.14+, else one byte written per page), fast, the pages left zero.
    pattern   with "touch": page i also starts with the 32-bit word i + 0xdead0000 (the
              kernel selftest's integrity pattern), for "verify" and "fork"
    shuffle   with "touch": a seed; the pages are faulted in that random order, so that
              neighbouring pages land in unrelated frames (a fragmented layout, one run
              per page, for Translation Ranger to mend)
    punch     [[off, len, every]...]: MADV_DONTNEED every ``every``-th page there
    collapse  [off, len]: the child's own MADV_COLLAPSE there, EAGAIN tried again
    split     offsets of PMD mappings to split into PTEs, the 2 MiB folio kept
    guard     offsets of pages made PROT_NONE (splitting the mapping into VMAs for good)
    hot       [[off, len, every]...]: a thread reads every ``every``-th page there, for ever
    gather    k: prepare a random gather of k 8-byte words over the mapping (numpy)

It prints one JSON line, {"addr", "collapse_errno", "populate" (seconds)}, then answers
commands on stdin, one JSON line each, until stdin is closed:

    verify    {"checked": pages, "bad": [offsets of the first wrong pages]}: touched pages
              hold their pattern, punched ones zeros
    fork      fork; the parent rewrites every touched page with the bytes it already holds (a
              write: copy-on-write splits its huge pages while the child still shares them),
              then the child overwrites its own copy with garbage and exits: {"child": pid},
              once it is reaped
    collapse  MADV_COLLAPSE over the whole mapping, timed: {"seconds", "errno", "tries"}
    unmap     MADV_DONTNEED of the mapping's first page (which splits a huge page there):
              its rss and the region change, with no fault; "verify" expects zeros there
    remap     mmap a fresh page, write it, munmap it: both take the process's mmap_sem
              for writing, so this hangs while anyone holds it (a read lock a kernel
              call forgot to release, say): {"ok": true, "seconds"}
    hugepage  MADV_HUGEPAGE over the whole mapping: {"ok": true}
    gather    ns per access of the gather, best of ``rounds`` (3): {"ns", "all_ns"}

The hostile program (``"program": "hostile"``): ``segments`` anonymous segments of
``segment`` bytes, 2 MiB-aligned, every 8-byte word of page p holding a tag unique to that
page and its last write, mutated for ``seconds`` while a daemon works on them: munmap (whole
2 MiB regions or odd page runs), mremap to a new aligned address, mprotect to PROT_READ and
back (the range is verified while read-only), fork (the child verifies its copy-on-write view
and exits 0, or 1 on a bad word), rewrites with new tags, new segments. Every operation is
followed by a check of one segment, and every second by all of them. It prints "ready" once
its segments are written, and at the end one JSON line: {"words": 8-byte words checked,
"bad": wrong ones, "fork_bad": fork children that saw a wrong word, "forks", "ops": {name:
count}, "huge": the most AnonHugePages bytes seen}.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROGRAM = Path(__file__).resolve()

PAGE = 4096
PMD = 2 << 20
WORDS = PAGE // 8

PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
MAP_PRIVATE_ANONYMOUS = 0x22
MADV_DONTNEED, MADV_DONTFORK, MADV_HUGEPAGE = 4, 10, 14
MADV_DONTDUMP, MADV_POPULATE_WRITE, MADV_COLLAPSE = 16, 23, 25
EAGAIN = 11
PR_SET_NAME = 15
MREMAP_MAYMOVE_FIXED = 3


# ---------------------------------------------------------------- the parent's side


def spawn(cfg: dict[str, Any], **popen_kwargs: Any) -> subprocess.Popen[str]:
    """Start the child with ``cfg``; its stdin and stdout are text pipes unless
    ``popen_kwargs`` say otherwise."""
    kwargs = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, **popen_kwargs}
    return subprocess.Popen([sys.executable, str(PROGRAM), json.dumps(cfg)], **kwargs)


def readline(popen: subprocess.Popen[str], timeout: float) -> str:
    """The child's next line ("" once it has exited); TimeoutError if none comes in time."""
    assert popen.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(popen.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"child {popen.pid} did not answer within {timeout:g} s")
    return popen.stdout.readline()


def answer(popen: subprocess.Popen[str], timeout: float, command: str | None = None) -> Any:
    """Send ``command`` (if any), then read the child's JSON answer; RuntimeError, with its
    exit status, if it exited instead."""
    if command is not None:
        assert popen.stdin is not None
        popen.stdin.write(command + "\n")
        popen.stdin.flush()
    line = readline(popen, timeout)
    if not line:
        raise RuntimeError(f"child {popen.pid} exited with status {popen.wait()} instead")
    return json.loads(line)


# ---------------------------------------------------------------- the child's side


libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
)  # fmt: skip
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
)  # fmt: skip
libc.prctl.argtypes = (
    ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
)  # fmt: skip
MAP_FAILED = ctypes.c_void_p(-1).value


def check(ret: int, what: str) -> None:
    """Raise OSError with errno if a libc call returned non-zero."""
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def set_comm(comm: str | None) -> None:
    if comm:
        check(libc.prctl(PR_SET_NAME, comm.encode(), 0, 0, 0), "PR_SET_NAME")


def aligned_mapping(size: int, prot: int) -> int:
    """An anonymous mapping of ``size`` bytes at a 2 MiB-aligned address, a hole each side."""
    raw = libc.mmap(None, size + 2 * PMD, prot, MAP_PRIVATE_ANONYMOUS, -1, 0)
    if raw is None or raw == MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap")
    addr: int = (raw + PMD) & ~(PMD - 1)
    check(libc.munmap(raw, addr - raw), "munmap head")
    check(libc.munmap(addr + size, raw + size + 2 * PMD - (addr + size)), "munmap tail")
    return addr


def populate_write(addr: int, length: int) -> None:
    """Fault every page in, writable: MADV_POPULATE_WRITE (5.14+), else a byte per page."""
    if libc.madvise(addr, length, MADV_POPULATE_WRITE) != 0:
        for off in range(0, length, PAGE):
            ctypes.memset(addr + off, 0x5A, 1)


def collapse(addr: int, length: int) -> tuple[float, int, int]:
    """MADV_COLLAPSE, again while EAGAIN (some region was busy; the others are done), at
    most 8 times: (seconds, errno or 0, tries)."""
    seconds, err, tries = 0.0, 0, 0
    while tries < 8:
        tries += 1
        t0 = time.perf_counter()
        ok = libc.madvise(addr, length, MADV_COLLAPSE) == 0
        seconds += time.perf_counter() - t0
        err = 0 if ok else ctypes.get_errno()
        if err != EAGAIN:
            break
    return seconds, err, tries


def pages(spans: list[list[int]], step: int = PAGE) -> Iterator[int]:
    for span in spans:
        off, length = span[0], span[1]
        yield from range(off, off + length, span[2] * PAGE if len(span) > 2 else step)


def mapping_program(cfg: dict[str, Any]) -> None:
    size = cfg["size"]
    touch = cfg.get("touch", [[0, size]])
    t0 = time.perf_counter()
    addr = aligned_mapping(size, PROT_RW)
    for advice in [MADV_DONTDUMP if cfg.get("forkable") else MADV_DONTFORK, *cfg.get("advise", [])]:
        check(libc.madvise(addr, size, advice), f"madvise {advice}")
    if cfg.get("populate", "touch") == "write":
        populate_write(addr, size)
    else:
        order = list(pages(touch))
        if cfg.get("shuffle") is not None:
            random.Random(cfg["shuffle"]).shuffle(order)
        for page in order:  # one write per page: 4 KiB faults
            ctypes.memset(addr + page, 0x5A, PAGE)
            if cfg.get("pattern"):
                word = ctypes.c_uint32.from_address(addr + page)
                word.value = (page // PAGE + 0xDEAD0000) & 0xFFFFFFFF
    punched = set()
    for page in pages(cfg.get("punch", [])):
        check(libc.madvise(addr + page, PAGE, MADV_DONTNEED), "MADV_DONTNEED")
        punched.add(page)
    populated = time.perf_counter() - t0
    err = collapse(addr + cfg["collapse"][0], cfg["collapse"][1])[1] if cfg.get("collapse") else 0
    for off in cfg.get("split", []):
        # Split a PMD mapping into PTEs but keep the 2 MiB folio: mprotect one page (which
        # splits the VMA and the PMD), then give it back its protection (the VMAs merge again).
        check(libc.mprotect(addr + off, PAGE, PROT_READ), "mprotect PROT_READ")
        check(libc.mprotect(addr + off, PAGE, PROT_RW), "mprotect PROT_READ|PROT_WRITE")
    for off in cfg.get("guard", []):
        check(libc.mprotect(addr + off, PAGE, PROT_NONE), "mprotect PROT_NONE")

    def reader(spans: list[list[int]]) -> None:
        # One byte of each page per pass, at C speed (numpy's strided sum): a Python loop
        # is so slow under emulation (tests/vm) that DAMON, sampling each page for 5 ms,
        # would find even the hot pages idle.
        import numpy as np

        views = [
            np.frombuffer((ctypes.c_uint8 * span[1]).from_address(addr + span[0]), np.uint8)[
                :: (span[2] if len(span) > 2 else 1) * PAGE
            ]
            for span in spans
        ]
        # Each pass ends with a flush of this process's TLB, as a hardware TLB's few
        # thousand entries would force on a hot set this big: DAMON clears accessed bits
        # without flushing, and QEMU's software TLB (tests/vm) holds millions of entries,
        # so an emulated CPU never marked a hot page accessed again. An mprotect over more
        # pages than Linux flushes one by one (tlb_single_page_flush_ceiling, 33) flushes
        # the whole TLB of the process.
        flush = 64 * PAGE
        scratch = libc.mmap(None, flush, PROT_RW, MAP_PRIVATE_ANONYMOUS, -1, 0)
        check(0 if scratch not in (None, MAP_FAILED) else -1, "mmap scratch")
        check(libc.madvise(scratch, flush, MADV_DONTFORK), "madvise scratch")  # no merging
        ctypes.memset(scratch, 1, flush)  # present, so that mprotect changes PTEs
        while True:
            for v in views:
                v.sum()
            libc.mprotect(scratch, flush, PROT_READ)
            libc.mprotect(scratch, flush, PROT_RW)

    if cfg.get("hot"):
        threading.Thread(target=reader, args=(cfg["hot"],), daemon=True).start()

    def verify() -> dict[str, Any]:
        checked, bad = 0, list[int]()
        for page in pages(touch):
            if page in punched:
                want = bytes(PAGE)
            else:
                word = ((page // PAGE + 0xDEAD0000) & 0xFFFFFFFF).to_bytes(4, sys.byteorder)
                want = word + b"\x5a" * (PAGE - 4)
            checked += 1
            if ctypes.string_at(addr + page, PAGE) != want and len(bad) < 16:
                bad.append(page)
        return {"checked": checked, "bad": bad}

    def fork() -> dict[str, Any]:
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)  # the parent has written: now the child writes its own copy
            for page in pages(touch):
                ctypes.c_char.from_address(addr + page + 8).value = b"\xee"
            os._exit(0)
        os.close(go_r)
        for page in pages(touch):
            b = ctypes.c_char.from_address(addr + page + 8)
            b.value = b.value  # same byte, but a write: copy-on-write
        os.write(go_w, b"g")
        os.close(go_w)
        os.waitpid(pid, 0)
        return {"child": pid}

    def whole_collapse() -> dict[str, Any]:
        seconds, errno, tries = collapse(addr, size)
        return {"seconds": seconds, "errno": errno, "tries": tries}

    def hugepage() -> dict[str, Any]:
        check(libc.madvise(addr, size, MADV_HUGEPAGE), "MADV_HUGEPAGE")
        return {"ok": True}

    def unmap() -> dict[str, Any]:
        check(libc.madvise(addr, PAGE, MADV_DONTNEED), "MADV_DONTNEED")
        punched.add(0)
        return {"ok": True}

    def remap() -> dict[str, Any]:
        t0 = time.perf_counter()
        page = libc.mmap(None, PAGE, PROT_RW, MAP_PRIVATE_ANONYMOUS, -1, 0)
        check(0 if page not in (None, MAP_FAILED) else -1, "mmap")
        ctypes.memset(page, 1, PAGE)
        check(libc.munmap(page, PAGE), "munmap")
        return {"ok": True, "seconds": time.perf_counter() - t0}

    commands: dict[str, Callable[[], dict[str, Any]]] = {
        "verify": verify, "fork": fork, "collapse": whole_collapse, "hugepage": hugepage,
        "unmap": unmap, "remap": remap,
    }  # fmt: skip
    ready = {"addr": addr, "collapse_errno": err, "populate": populated}
    if cfg.get("gather"):
        commands["gather"], ready["aux_errno"] = gatherer(addr, size, cfg)
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        reply = commands[cmd]() if cmd in commands else {"error": f"unknown command {cmd!r}"}
        print(json.dumps(reply), flush=True)


def gatherer(addr: int, size: int, cfg: dict[str, Any]) -> tuple[Callable[[], Any], int]:
    """A random gather of cfg["gather"] words over the mapping, and the errno of making its
    own index and output arrays huge first (so that only the mapping's pages differ between
    a gather before and one after a collapse)."""
    import numpy as np

    k, rounds = cfg["gather"], cfg.get("rounds", 3)
    n = size // 8
    big = np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_uint64)), (n,))
    aux_size = -(-2 * k * 8 // PMD) * PMD
    aux = aligned_mapping(aux_size, PROT_RW)
    check(libc.madvise(aux, aux_size, MADV_DONTFORK), "MADV_DONTFORK")
    populate_write(aux, aux_size)
    aux_errno = collapse(aux, aux_size)[1]
    idx = np.ctypeslib.as_array(ctypes.cast(aux, ctypes.POINTER(ctypes.c_int64)), (k,))
    out = np.ctypeslib.as_array(ctypes.cast(aux + 8 * k, ctypes.POINTER(ctypes.c_uint64)), (k,))
    idx[:] = np.random.default_rng(20261125).integers(0, n, size=k)

    def gather() -> dict[str, Any]:
        np.take(big, idx, out=out)  # warm-up
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            np.take(big, idx, out=out)
            times.append(time.perf_counter() - t0)
        return {"ns": min(times) / k * 1e9, "all_ns": [t / k * 1e9 for t in times]}

    return gather, aux_errno


def hostile_program(cfg: dict[str, Any]) -> None:
    rng = random.Random(cfg.get("seed", os.getpid()))
    next_tag = [os.getpid() << 40]
    segs: list[list[Any]] = []  # [addr, [tag per page]]
    ops: dict[str, int] = {}
    total = [0]
    forks: list[int] = []

    def tags(n: int) -> list[int]:
        first = next_tag[0]
        next_tag[0] += n
        return list(range(first, first + n))

    def write(addr: int, tag_list: list[int]) -> None:
        for i, tag in enumerate(tag_list):
            ctypes.memmove(addr + i * PAGE, struct.pack("<Q", tag) * WORDS, PAGE)

    def verify(addr: int, tag_list: list[int]) -> tuple[int, int]:
        words = bad = 0
        for i, tag in enumerate(tag_list):
            want = struct.pack("<Q", tag)
            got = ctypes.string_at(addr + i * PAGE, PAGE)
            words += WORDS
            if got != want * WORDS:
                bad += sum(got[j : j + 8] != want for j in range(0, PAGE, 8))
        return words, bad

    def new_segment() -> None:
        n = cfg["segment"] // PAGE
        addr = aligned_mapping(n * PAGE, PROT_NONE)
        check(libc.mprotect(addr, n * PAGE, PROT_RW), "mprotect RW")
        segs.append([addr, tags(n)])
        write(addr, segs[-1][1])

    def span(seg: list[Any]) -> tuple[int, int]:
        # A random page range [lo, hi) of a segment: whole 2 MiB regions or an odd run.
        n = len(seg[1])
        if rng.random() < 0.5 and n >= 2 * WORDS:
            lo = rng.randrange(0, n // WORDS) * WORDS
            return lo, min(n, lo + WORDS)
        lo = rng.randrange(0, n)
        return lo, min(n, lo + rng.randint(1, 64))

    def op_munmap(seg: list[Any]) -> None:
        lo, hi = span(seg)
        check(libc.munmap(seg[0] + lo * PAGE, (hi - lo) * PAGE), "munmap")
        segs.remove(seg)
        if lo:
            segs.append([seg[0], seg[1][:lo]])
        if hi < len(seg[1]):
            segs.append([seg[0] + hi * PAGE, seg[1][hi:]])

    def op_mremap(seg: list[Any]) -> None:
        size = len(seg[1]) * PAGE
        dst = aligned_mapping(size, PROT_NONE)
        got = libc.mremap(seg[0], size, size, MREMAP_MAYMOVE_FIXED, dst)
        if got in (None, MAP_FAILED):  # spans two VMAs that did not merge again: not an error
            check(libc.munmap(dst, size), "munmap unused")
            ops["mremap_refused"] = ops.get("mremap_refused", 0) + 1
            return
        seg[0] = got

    def op_mprotect(seg: list[Any]) -> None:
        lo, hi = span(seg)
        addr, length = seg[0] + lo * PAGE, (hi - lo) * PAGE
        check(libc.mprotect(addr, length, PROT_READ), "mprotect PROT_READ")
        total[0] += verify(addr, seg[1][lo:hi])[0]
        check(libc.mprotect(addr, length, PROT_RW), "mprotect RW")

    def op_rewrite(seg: list[Any]) -> None:
        lo, hi = span(seg)
        seg[1][lo:hi] = tags(hi - lo)
        write(seg[0] + lo * PAGE, seg[1][lo:hi])

    def op_fork(seg: list[Any]) -> None:
        pid = os.fork()
        if pid == 0:
            bad = sum(verify(a, t)[1] for a, t in segs)
            os._exit(1 if bad else 0)
        forks.append(pid)
        write(seg[0], seg[1])  # the same words, but writes: copy-on-write splits under the child

    def huge() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("AnonHugePages:"))

    def check_all() -> int:
        bad = 0
        for a, t in segs:
            w, b = verify(a, t)
            total[0] += w
            bad += b
        return bad

    for _ in range(cfg["segments"]):
        new_segment()
    print("ready", flush=True)
    bad, fork_bad, most = 0, 0, 0
    operations = {
        "munmap": op_munmap, "mremap": op_mremap, "mprotect": op_mprotect,
        "rewrite": op_rewrite, "fork": op_fork,
    }  # fmt: skip
    end = time.monotonic() + cfg["seconds"]
    last_full = time.monotonic()
    least = cfg["segments"] * cfg["segment"] // 2
    while time.monotonic() < end:
        if len(segs) < cfg["segments"] or sum(len(t) for _, t in segs) * PAGE < least:
            new_segment()
        name = rng.choice(list(operations)) if rng.random() < 0.9 else "mremap"
        if name == "fork" and rng.random() > 0.1:
            name = "rewrite"  # forks hold the daemon back from the parent: keep them rare
        operations[name](rng.choice(segs))
        ops[name] = ops.get(name, 0) + 1
        w, b = verify(*rng.choice(segs))
        total[0] += w
        bad += b
        if time.monotonic() - last_full > 1.0:
            bad += check_all()
            most = max(most, huge())
            last_full = time.monotonic()
        time.sleep(cfg.get("pause", 0.02))
    bad += check_all()
    most = max(most, huge())
    for pid in forks:
        fork_bad += os.waitpid(pid, 0)[1] != 0
    result = {"words": total[0], "bad": bad, "fork_bad": fork_bad, "forks": len(forks)}
    print(json.dumps({**result, "ops": ops, "huge": most}), flush=True)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    set_comm(cfg.get("comm"))
    if cfg.get("program") == "hostile":
        hostile_program(cfg)
    else:
        mapping_program(cfg)


if __name__ == "__main__":
    main()
