"""Shared pieces of the real-kernel tests: a child process with a known mapping, the
skip-or-fail rule, and brute-force readers of /proc/PID/pagemap and /proc/kpageflags that
share no code with memdefragd (so the tests compare two independent computations).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PAGE = 4096
PMD = 2 << 20
PMD_PAGES = PMD // PAGE
MiB = 1 << 20

MADV_DONTNEED = 4
MADV_DONTFORK = 10
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_COLLAPSE = 25

KPF_COMPOUND_HEAD = 1 << 15
KPF_THP = 1 << 22

REQUIRE_ENV = "MEMDEFRAGD_REQUIRE_KERNEL"


def require_kernel(condition: object, reason: str) -> None:
    """Skip when the kernel refuses what a test needs; fail instead under CI's variable."""
    if condition:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set and the kernel refused: {reason}", pytrace=False)
    pytest.skip(f"kernel refused: {reason}")


# The child: one anonymous VMA of exactly `size` bytes at a 2 MiB-aligned address, touched
# page by page (THP enabled=madvise and no MADV_HUGEPAGE, so faults map 4 KiB pages),
# optionally collapsed in part by its own MADV_COLLAPSE. It reports {"addr", "collapse_errno"}
# as one JSON line, then blocks until its stdin is closed.
#
# With `pattern`, every touched page also gets the kernel selftest's integrity pattern (the
# 32-bit word i + 0xdead0000 at the start of page i, the rest 0x5A), and each "verify" line
# on stdin is answered with {"checked": pages, "bad": [offsets of the first wrong pages]}:
# touched pages must hold their pattern, punched ones zeros.
#
# It maps size + 4 MiB and unmaps the unaligned head and tail, both non-empty, so the VMA
# starts and ends next to a hole; MADV_DONTFORK gives it flags no ordinary anonymous mapping
# has, so nothing the interpreter maps later into those holes can merge with it. With
# `forkable`, MADV_DONTDUMP does that instead, so that a fork shares the mapping.
#
# `guard` offsets become PROT_NONE pages (splitting the mapping into VMAs for good); `hot`
# lists [off, len, every]: a thread reads one byte of every `every`-th page there, for ever.
# A "fork" line on stdin (pattern mode) forks: the parent rewrites every touched page with
# the bytes it already holds (a write: copy-on-write splits its huge pages while the child
# still shares them), then the child overwrites its own copy with garbage and exits; the
# answer {"child": pid} comes once the child is reaped.
CHILD_SCRIPT = r"""
import ctypes, json, os, sys

cfg = json.loads(sys.argv[1])
PAGE, PMD = 4096, 2 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong)


def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


if cfg.get("comm"):
    check(libc.prctl(15, cfg["comm"].encode(), 0, 0, 0), "PR_SET_NAME")
size = cfg["size"]
raw = libc.mmap(None, size + 2 * PMD, 3, 0x22, -1, 0)  # PROT_RW, MAP_PRIVATE|MAP_ANONYMOUS
if raw is None or raw == ctypes.c_void_p(-1).value:
    raise OSError(ctypes.get_errno(), "mmap")
addr = (raw + PMD) & ~(PMD - 1)
check(libc.munmap(raw, addr - raw), "munmap head")
check(libc.munmap(addr + size, raw + size + 2 * PMD - (addr + size)), "munmap tail")
for advice in [16 if cfg.get("forkable") else 10, *cfg.get("advise", [])]:  # DONTDUMP/DONTFORK
    check(libc.madvise(addr, size, advice), f"madvise {advice}")
for off, length in cfg.get("touch", [[0, size]]):
    for page in range(off, off + length, PAGE):  # one write per page: 4 KiB faults
        ctypes.memset(addr + page, 0x5A, PAGE)
        if cfg.get("pattern"):
            ctypes.c_uint32.from_address(addr + page).value = (page // PAGE + 0xDEAD0000) & 0xFFFFFFFF
punched = set()
for off, length, every in cfg.get("punch", []):
    for page in range(off, off + length, every * PAGE):
        check(libc.madvise(addr + page, PAGE, 4), "MADV_DONTNEED")
        punched.add(page)


def verify():
    checked, bad = 0, []
    for off, length in cfg.get("touch", [[0, size]]):
        for page in range(off, off + length, PAGE):
            if page in punched:
                want = bytes(PAGE)
            else:
                word = ((page // PAGE + 0xDEAD0000) & 0xFFFFFFFF).to_bytes(4, sys.byteorder)
                want = word + b"\x5a" * (PAGE - 4)
            checked += 1
            if ctypes.string_at(addr + page, PAGE) != want and len(bad) < 16:
                bad.append(page)
    return {"checked": checked, "bad": bad}
err = 0
if cfg.get("collapse"):
    off, length = cfg["collapse"]
    for _ in range(8):
        if libc.madvise(addr + off, length, 25) == 0:
            err = 0
            break
        err = ctypes.get_errno()
        if err != 11:  # EAGAIN: transient, try again
            break
for off in cfg.get("split", []):
    # Split a PMD mapping into PTEs but keep the 2 MiB folio: mprotect one page (which
    # splits the VMA and the PMD), then give it back its protection (the VMAs merge again).
    check(libc.mprotect(addr + off, PAGE, 1), "mprotect PROT_READ")
    check(libc.mprotect(addr + off, PAGE, 3), "mprotect PROT_READ|PROT_WRITE")
for off in cfg.get("guard", []):
    check(libc.mprotect(addr + off, PAGE, 0), "mprotect PROT_NONE")


def reader(spans):
    while True:
        for off, length, every in spans:
            for page in range(off, off + length, every * PAGE):
                ctypes.c_char.from_address(addr + page).value


if cfg.get("hot"):
    import threading

    threading.Thread(target=reader, args=(cfg["hot"],), daemon=True).start()


def fork():
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.read(go_r, 1)  # the parent has written: now the child writes its own copy
        for off, length in cfg.get("touch", [[0, size]]):
            for page in range(off, off + length, PAGE):
                ctypes.c_char.from_address(addr + page + 8).value = b"\xee"
        os._exit(0)
    os.close(go_r)
    for off, length in cfg.get("touch", [[0, size]]):
        for page in range(off, off + length, PAGE):
            b = ctypes.c_char.from_address(addr + page + 8)
            b.value = b.value  # same byte, but a write: copy-on-write
    os.write(go_w, b"g")
    os.close(go_w)
    os.waitpid(pid, 0)
    return {"child": pid}


sys.stdout.write(json.dumps({"addr": addr, "collapse_errno": err}) + "\n")
sys.stdout.flush()
if cfg.get("pattern"):
    for line in sys.stdin:
        cmd = line.strip()
        if cmd in ("verify", "fork"):
            sys.stdout.write(json.dumps(verify() if cmd == "verify" else fork()) + "\n")
            sys.stdout.flush()
else:
    while os.read(0, 4096):
        pass
"""


@dataclass
class Child:
    """A child started by the test, with the one VMA it mapped: [addr, addr + size)."""

    popen: subprocess.Popen
    size: int
    addr: int = 0
    collapse_errno: int = 0
    config: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def collapse_error(self) -> str:
        e = self.collapse_errno
        return f"{errno.errorcode.get(e, e)} ({os.strerror(e)})" if e else ""

    def verify(self, timeout: float = 120.0) -> dict:
        """Ask a child started with pattern=True to check its data: {"checked", "bad"}."""
        if not self.config.get("pattern"):
            raise ValueError("verify() needs a child started with pattern=True")
        self.popen.stdin.write("verify\n")
        self.popen.stdin.flush()
        line = _readline(self.popen, timeout)
        if not line:
            raise RuntimeError(f"child {self.pid} exited instead of verifying")
        return json.loads(line)

    def fork(self, timeout: float = 120.0) -> int:
        """Ask a pattern=True, forkable=True child to fork a writer child and reap it: the
        pid of that (now gone) child."""
        if not (self.config.get("pattern") and self.config.get("forkable")):
            raise ValueError("fork() needs a child started with pattern=True, forkable=True")
        self.popen.stdin.write("fork\n")
        self.popen.stdin.flush()
        line = _readline(self.popen, timeout)
        if not line:
            raise RuntimeError(f"child {self.pid} exited instead of forking")
        return int(json.loads(line)["child"])

    def kill(self, reap: bool = True) -> None:
        """SIGKILL; with reap=False leave a zombie (waits until it is one, without reaping)."""
        if self.popen.returncode is not None:
            return
        os.kill(self.pid, signal.SIGKILL)
        if reap:
            self.popen.wait()
        else:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)

    def stop(self) -> None:
        """Teardown: close stdin, kill, reap. Safe to call twice."""
        if self.popen.stdin and not self.popen.stdin.closed:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait()
        if self.popen.stdout:
            self.popen.stdout.close()


def start_child(
    size: int,
    *,
    collapse: tuple[int, int] | None = None,
    touch: list[tuple[int, int]] | None = None,
    punch: list[tuple[int, int, int]] | None = None,
    advise: list[int] | None = None,
    split: list[int] | None = None,
    comm: str | None = None,
    pattern: bool = False,
    forkable: bool = False,
    guard: list[int] | None = None,
    hot: list[tuple[int, int, int]] | None = None,
    timeout: float = 120.0,
) -> Child:
    """Start the child and wait for its JSON line. The caller must stop() it."""
    if size % PMD:
        raise ValueError("size must be a multiple of 2 MiB")
    cfg: dict = {"size": size}
    if collapse is not None:
        cfg["collapse"] = list(collapse)
    if touch is not None:
        cfg["touch"] = [list(t) for t in touch]
    if punch:
        cfg["punch"] = [list(p) for p in punch]
    if advise:
        cfg["advise"] = list(advise)
    if split:
        cfg["split"] = list(split)
    if comm:
        cfg["comm"] = comm
    if pattern:
        cfg["pattern"] = True
    if forkable:
        cfg["forkable"] = True
    if guard:
        cfg["guard"] = list(guard)
    if hot:
        cfg["hot"] = [list(h) for h in hot]
    popen = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = Child(popen, size, config=cfg)
    try:
        line = _readline(popen, timeout)
        if not line:
            popen.wait(timeout)
            raise RuntimeError(f"child exited with {popen.returncode} before reporting")
        report = json.loads(line)
        child.addr = int(report["addr"])
        child.collapse_errno = int(report["collapse_errno"])
    except BaseException:
        child.stop()
        raise
    return child


def _readline(popen: subprocess.Popen, timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(popen.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"child {popen.pid} did not report within {timeout} s")
    return popen.stdout.readline()


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()[0]


def stat_start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return int(text[text.rindex(")") + 2 :].split()[19])


# ---- brute force, independent of memdefragd -------------------------------------------


def read_pagemap(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """(vpn, pfn) of every present page in [start, end), by a plain loop over entries."""
    first, n = start // PAGE, (end - start) // PAGE
    data = b""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        f.seek(first * 8)
        while len(data) < n * 8:
            chunk = f.read(n * 8 - len(data))
            if not chunk:
                raise EOFError("short pagemap read")
            data += chunk
    out = []
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
        if entry >> 63 & 1:
            out.append((first + i, entry & ((1 << 55) - 1)))
    return out


def kpageflags(pfn: int) -> int:
    with open("/proc/kpageflags", "rb", buffering=0) as f:
        f.seek(pfn * 8)
        return struct.unpack("<Q", f.read(8))[0]


def brute_runs(entries: list[tuple[int, int]]) -> list[int]:
    runs: list[int] = []
    prev = None
    for vpn, pfn in entries:
        if prev is not None and vpn == prev[0] + 1 and pfn == prev[1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = (vpn, pfn)
    return runs


def brute_contiguity(runs: list[int], ks=(32, 128), ps=(0.9, 0.99)) -> dict:
    total = sum(runs)
    desc = sorted(runs, reverse=True)
    runs_for = {}
    for p in ps:
        acc = 0
        for i, r in enumerate(desc, 1):
            acc += r
            if acc >= p * total:
                runs_for[p] = i
                break
    return {
        "runs": len(runs),
        "largest_run": desc[0],
        "mean_run": total / len(runs),
        "coverage": {k: sum(desc[:k]) / total for k in ks},
        "runs_for": runs_for,
    }


def brute_regions(entries: list[tuple[int, int]], start: int, end: int) -> list[dict]:
    """Per aligned 2 MiB region fully inside [start, end), in order: present pages, whether
    its head frame is a THP head (kpageflags), and whether it is aligned-contiguous (all 512
    present, each pfn one more than the last, head pfn 512-aligned) without being a THP."""
    by_vpn = dict(entries)
    first = -(-(start // PAGE) // PMD_PAGES) * PMD_PAGES
    last = (end // PAGE) // PMD_PAGES * PMD_PAGES
    out = []
    for head in range(first, last, PMD_PAGES):
        pfns = [by_vpn.get(v) for v in range(head, head + PMD_PAGES)]
        present = sum(p is not None for p in pfns)
        contiguous = (
            present == PMD_PAGES
            and pfns[0] % PMD_PAGES == 0
            and all(p == pfns[0] + i for i, p in enumerate(pfns))
        )
        flags = kpageflags(pfns[0]) if contiguous else 0
        thp = bool(flags & KPF_THP and flags & KPF_COMPOUND_HEAD)
        out.append({"present": present, "thp": thp, "aligned_contiguous": contiguous and not thp})
    return out


def stable_read(pid: int, start: int, end: int, fn, attempts: int = 6):
    """Run fn() between two identical brute-force pagemap reads (compaction or NUMA
    balancing may migrate a page meanwhile; then try again). Returns (entries, fn())."""
    for _ in range(attempts):
        before = read_pagemap(pid, start, end)
        result = fn()
        after = read_pagemap(pid, start, end)
        if before == after:
            return before, result
        time.sleep(0.2)
    pytest.fail(f"the layout of pid {pid} kept changing over {attempts} attempts")


def write_config(
    path: Path, comm: str, extra: str = "", listen: str = "off", pacing: str = "duty_cycle: 50%"
) -> Path:
    """Budgets and the pressure guard out of the way; paced (the default) but at 50%, ten
    times the default duty cycle, so that tests wait seconds, not minutes."""
    path.write_text(
        textwrap.dedent(
            f"""
            daemon:
              scan_interval: 1s
              budget: {{bytes_per_second: 8GiB, cpu_share: 1.0}}
              pressure: {{psi_some_avg10: 100, min_available: 0}}
              pacing: {{{pacing}}}
              metrics: {{listen: "{listen}"}}
            {extra}
            targets:
              - name: testee
                match: {{comm: '^{comm}$'}}
            """
        )
    )
    os.chmod(path, 0o644)
    return path


class Daemon:
    """`memdefragd run` as a subprocess, its log lines collected."""

    def __init__(self, config: Path, *args: str, env: dict | None = None):
        self.log_path = config.with_suffix(".log")
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memdefragd.cli", "run", "-c", str(config), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.text()
            if needle in text:
                return text
            assert self.proc.poll() is None, f"daemon exited early:\n{text}"
            time.sleep(0.1)
        raise AssertionError(
            f"{needle!r} not in the daemon's log within {timeout} s:\n{self.text()}"
        )

    def wait_settled(self, timeout: float = 30.0) -> str:
        """Until a scan after the last request found nothing to do (so figures settle). The
        first scan queues nothing either: the daemon waits for an access window first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.text()
            if "scanned 1 process(es): 0 MiB queued" in text.rpartition("collapse pid")[2]:
                return text
            time.sleep(0.1)
        raise AssertionError(f"no idle scan after the work within {timeout} s:\n{self.text()}")

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# A hostile target: anonymous segments (2 MiB-aligned, every 8-byte word of page p holding
# a tag unique to that page and its last write), mutated for `seconds` while a daemon works
# on them: munmap (whole 2 MiB regions or odd page runs), mremap to a new aligned address,
# mprotect to PROT_READ and back (the range is verified while read-only), fork (the child
# verifies its copy-on-write view and exits 0, or 1 on a bad word), rewrites with new tags,
# new segments. Every operation is followed by a check of one segment and every second by
# all of them. Ends with one JSON line: {"words": 8-byte words checked, "bad": wrong ones,
# "fork_bad": fork children that saw a wrong word, "ops": {name: count}, "huge": the most
# AnonHugePages bytes seen}.
HOSTILE_SCRIPT = r"""
import ctypes, json, os, random, struct, sys, time

cfg = json.loads(sys.argv[1])
PAGE, PMD, WORDS = 4096, 2 << 20, 512
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong)
FAILED = ctypes.c_void_p(-1).value


def check(ok, what):
    if not ok:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


check(libc.prctl(15, cfg["comm"].encode(), 0, 0, 0) == 0, "PR_SET_NAME")
rng = random.Random(cfg.get("seed", os.getpid()))
next_tag = [os.getpid() << 40]
segs = []  # [addr, [tag per page]]
ops = {}


def tags(n):
    first = next_tag[0]
    next_tag[0] += n
    return list(range(first, first + n))


def reserve(size):
    # A PMD-aligned range of `size` bytes: mapped PROT_NONE, the slack around it unmapped.
    raw = libc.mmap(None, size + PMD, 0, 0x22, -1, 0)
    check(raw not in (None, FAILED), "mmap")
    addr = (raw + PMD - 1) & ~(PMD - 1)
    if addr > raw:
        check(libc.munmap(raw, addr - raw) == 0, "munmap head")
    if raw + PMD > addr:
        check(libc.munmap(addr + size, raw + PMD - addr) == 0, "munmap tail")
    return addr


def write(addr, tag_list):
    for i, tag in enumerate(tag_list):
        ctypes.memmove(addr + i * PAGE, struct.pack("<Q", tag) * WORDS, PAGE)


def verify(addr, tag_list):
    words = bad = 0
    for i, tag in enumerate(tag_list):
        want = struct.pack("<Q", tag)
        got = ctypes.string_at(addr + i * PAGE, PAGE)
        words += WORDS
        if got != want * WORDS:
            bad += sum(got[j:j + 8] != want for j in range(0, PAGE, 8))
    return words, bad


def new_segment():
    n = cfg["segment"] // PAGE
    addr = reserve(n * PAGE)
    check(libc.mprotect(addr, n * PAGE, 3) == 0, "mprotect RW")
    segs.append([addr, tags(n)])
    write(addr, segs[-1][1])


def span(seg):
    # A random page range [lo, hi) of a segment: whole 2 MiB regions or an odd run.
    n = len(seg[1])
    if rng.random() < 0.5 and n >= 2 * WORDS:
        lo = rng.randrange(0, n // WORDS) * WORDS
        return lo, min(n, lo + WORDS)
    lo = rng.randrange(0, n)
    return lo, min(n, lo + rng.randint(1, 64))


def op_munmap(seg):
    lo, hi = span(seg)
    check(libc.munmap(seg[0] + lo * PAGE, (hi - lo) * PAGE) == 0, "munmap")
    segs.remove(seg)
    if lo:
        segs.append([seg[0], seg[1][:lo]])
    if hi < len(seg[1]):
        segs.append([seg[0] + hi * PAGE, seg[1][hi:]])


def op_mremap(seg):
    size = len(seg[1]) * PAGE
    dst = reserve(size)
    got = libc.mremap(seg[0], size, size, 3, dst)  # MREMAP_MAYMOVE | MREMAP_FIXED
    if got in (None, FAILED):  # spans two VMAs that did not merge again: not an error here
        check(libc.munmap(dst, size) == 0, "munmap unused")
        ops["mremap_refused"] = ops.get("mremap_refused", 0) + 1
        return
    seg[0] = got


def op_mprotect(seg):
    lo, hi = span(seg)
    addr, length = seg[0] + lo * PAGE, (hi - lo) * PAGE
    check(libc.mprotect(addr, length, 1) == 0, "mprotect PROT_READ")
    total[0] += verify(addr, seg[1][lo:hi])[0]
    check(libc.mprotect(addr, length, 3) == 0, "mprotect RW")


def op_rewrite(seg):
    lo, hi = span(seg)
    seg[1][lo:hi] = tags(hi - lo)
    write(seg[0] + lo * PAGE, seg[1][lo:hi])


forks = []


def op_fork(seg):
    pid = os.fork()
    if pid == 0:
        bad = sum(verify(a, t)[1] for a, t in segs)
        os._exit(1 if bad else 0)
    forks.append(pid)
    write(seg[0], seg[1])  # the same words, but writes: copy-on-write splits under the child


def huge():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("AnonHugePages:"))


for _ in range(cfg["segments"]):
    new_segment()
sys.stdout.write("ready\n")
sys.stdout.flush()
total, bad, fork_bad, most = [0], 0, 0, 0
OPS = {"munmap": op_munmap, "mremap": op_mremap, "mprotect": op_mprotect,
       "rewrite": op_rewrite, "fork": op_fork}
end = time.monotonic() + cfg["seconds"]
last_full = time.monotonic()
while time.monotonic() < end:
    if len(segs) < cfg["segments"] or sum(len(t) for _, t in segs) * PAGE < cfg["segments"] * cfg["segment"] // 2:
        new_segment()
    name = rng.choice(list(OPS)) if rng.random() < 0.9 else "mremap"
    if name == "fork" and rng.random() > 0.1:
        name = "rewrite"  # forks hold the daemon back from the parent: keep them rare
    OPS[name](rng.choice(segs))
    ops[name] = ops.get(name, 0) + 1
    seg = rng.choice(segs)
    w, b = verify(*seg)
    total[0] += w
    bad += b
    if time.monotonic() - last_full > 1.0:
        for a, t in segs:
            w, b = verify(a, t)
            total[0] += w
            bad += b
        most = max(most, huge())
        last_full = time.monotonic()
    time.sleep(cfg.get("pause", 0.02))
for a, t in segs:
    w, b = verify(a, t)
    total[0] += w
    bad += b
most = max(most, huge())
for pid in forks:
    fork_bad += os.waitpid(pid, 0)[1] != 0
print(json.dumps({"words": total[0], "bad": bad, "fork_bad": fork_bad, "forks": len(forks),
                  "ops": ops, "huge": most}), flush=True)
"""


def start_hostile(
    comm: str, seconds: float, *, segments: int = 4, segment: int = 16 * MiB, seed: int = 0
) -> subprocess.Popen:
    """Start HOSTILE_SCRIPT and wait until its segments are written ("ready"); read its
    JSON line from stdout once it ends. The caller kills it if the test fails first."""
    cfg = {"comm": comm, "seconds": seconds, "segments": segments, "segment": segment}
    if seed:
        cfg["seed"] = seed
    popen = subprocess.Popen(
        [sys.executable, "-c", HOSTILE_SCRIPT, json.dumps(cfg)], stdout=subprocess.PIPE, text=True
    )
    line = _readline(popen, 60.0)
    if line != "ready\n":
        popen.kill()
        popen.wait()
        raise RuntimeError(f"hostile child {popen.pid} did not start: {line!r}")
    return popen
