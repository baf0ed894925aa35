"""The `ranger` method: Translation Ranger's scan_process_memory syscall, on a patched kernel.

Mainline kernels do not have this syscall, and its numbers from the out-of-tree trees are
taken on mainline: on x86_64, 332 is statx, 333 io_pgetevents and 335 uretprobe (which
kills a caller outside a uprobe trampoline). So nothing here ever calls a number to see
what happens. `Ranger` refuses to exist unless the kernel shows Translation Ranger's
sysctls *and* the operator configured the number for that kernel.

There is deliberately no table of "known" kernels: Translation Ranger's own launcher.c
(docs/simulator.md, "Sources") picks 332/333/335 only by base version (it compares uname
release strings),
and a release string does not tell a patched kernel from a mainline one of the same
version, so no number can be tied to a kernel identity we can check.

The text the kernel writes (RFC04's formats) is parsed by pure functions into value types
below.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

from ...model import PAGE_SHIFT, PMD_SIZE, AccessDenied, Outcome, ProcessGone, Request
from ...pipeline.plan.anchors import merge_frames
from .procfs import ParseError, parse_smaps
from .procs import PidHandle, ProcDir

# Actions ([RFC04] include/linux/mem_defrag.h; 4, 6, 7 exist only in the ISCA tree).
MEM_DEFRAG_SCAN = 0
MEM_DEFRAG_MARK_SCAN_ALL = 1
MEM_DEFRAG_CLEAR_SCAN_ALL = 2
MEM_DEFRAG_DEFRAG = 3
MEM_DEFRAG_CONTIG_SCAN = 5

# The sysctl whose presence identifies a Translation Ranger kernel (RFC04 and ISCA tree).
IDENTITY_SYSCTL = "kmem_defragd_always"
VMSTAT_PREFIX = "memdefrag_"
# Chunks per action-3 call (0: a whole pass in one call, the kernel's default).
BREAKOUT_SYSCTL = "num_breakout_chunks"
# The machine-wide lock of a pass: the kernel's scan state is one for the whole system, so
# two memdefragd processes (the daemon and `memdefragd defrag`, say) must not interleave.
LOCK_FILE = "/run/memdefragd/ranger.lock"
BUF_LEN = 16 << 20  # as the artifact's launcher: a buffer too small for one record ends a scan
DEFRAG_SIZE_SYSCTL = "defrag_size_threshold"  # action 3 skips VMAs under this many 2 MiB

# The log buffer of action 3. The kernel vzalloc()s a bounce buffer of the caller's buf_len
# on every call given one and frees it on return: order-0 unmovable pages, taken while the
# pass runs, which land in the anchor's own window when it is free (measured on the RFC
# kernel in a guest: the launcher's 16 MiB, 4,096 pages, left a 256 MiB heap in 3,283 runs
# after 3,280 hard stops; a 4 KiB or 64 KiB buffer, one run). So the driver passes no more
# than a call can log: per VMA the kernel walks, its `vma:` line and, per 2 MiB chunk of it
# (all of them, or num_breakout_chunks: the kernel counts those per VMA), one line per
# attempt at the widest its format can print (about twice the ~350 bytes seen), and
# LOG_LINES_PER_CHUNK attempts (each hard stop in a chunk prints another line). A full
# buffer is safe in action 3 (unlike actions 0 and 5, which return with the target's
# mmap_sem held): measured in the guest, the call returns buf_len, the cut line's first
# byte overwritten by a NUL, the target's mmap/munmap still work and the pass goes on to
# its end. Only the log is short then: Ranger counts those calls (DefragPass.truncated_calls,
# DefragLog.truncated), warns (once per process), and doubles the buffer for the pass's next
# calls. An obstructed window fills it (a hard stop per pinned page, page table or THP page
# in the window: tens of thousands of lines, more than even 16 MiB holds for pins); a caller
# that needs such a log whole asks for its size (Ranger.defrag's log_len).
LOG_LINES_PER_CHUNK = 2
_PAGE = 4096
_LU, _LX = 20, 16  # the widest %lu (2**64 - 1 in decimal) and %lx print
_VMA_FORMAT = "vma: 0x%lx, 0x%lx, 0x%lx, -1\n"
_CHUNK_FORMATS = (  # RFC04's chunk line, then the ISCA tree's ([ISCA@08047bf])
    "[0x%lx, 0x%lx):%lu [alig:%lu, migrated:%lu, src: not:%lu, src_thp_dst_not:%lu, "
    "src_pte_thp:%lu dst: out_bound:%lu, dst_thp_src_not:%lu, dst_pte_thp:%lu, "
    "isolate_free:%lu, migrate_free:%lu, anon:%lu, file:%lu, non-lru:%lu, non-moveable:%lu], "
    "anchor: (%lx, %lx), range: [%lx, %lx], vma: 0x%lx, not_defrag_vpn: %lx\n",
    "[0x%lx, 0x%lx):%lu [alig:%lu, migrated:%lu, src: not:%lu, compound:%lu, dst: "
    "out_bound:%lu, compound:%lu, free:%lu, anon:%lu, file:%lu, non-lru:%lu, "
    "non-moveable:%lu], anchor: (%lx, %lx), range: [%lx, %lx], vma: 0x%lx, "
    "not_defrag_vpn: %lx\n",
)


def _widest(fmt: str) -> int:
    """The longest text a kernel format of %lu and %lx conversions prints."""
    lu, lx = fmt.count("%lu"), fmt.count("%lx")
    return len(fmt) - 3 * (lu + lx) + _LU * lu + _LX * lx


VMA_LINE_MAX = _widest(_VMA_FORMAT)
CHUNK_LINE_MAX = max(_widest(f) for f in _CHUNK_FORMATS)

# The kernel keeps ONE scan state for the whole system (a static defrag_scan_control): a
# call for another mm resets it. Calls, and whole passes, must never interleave.
_LOCK = threading.Lock()
_logger = logging.getLogger("memdefragd")


class RangerUnavailable(Exception):
    """This kernel cannot run method 'ranger' (the message says why and what to do)."""


class RangerParseError(ValueError):
    """Text from scan_process_memory that matches none of the documented formats."""


def ranger_support(syscall_nr: int | None, proc_root: str = "/proc") -> tuple[bool, str]:
    """(True, "") if method 'ranger' may run here, else (False, what to do about it).
    Presence is proven by the kernel's own files (its sysctl and its vmstat counters),
    never by a call; the number is checked in a child process (`syscall_check`)."""
    sysctl = Path(proc_root, "sys/vm", IDENTITY_SYSCTL)
    if not sysctl.exists():
        return False, (
            f"method 'ranger' needs a kernel patched with Translation Ranger (no {sysctl} on "
            f"this kernel, {_kernel(proc_root)}): use method 'collapse'"
        )
    if not vmstat_counters(proc_root):
        return False, (
            f"this kernel has {sysctl} but no {VMSTAT_PREFIX}* counters in "
            f"{proc_root}/vmstat: not the Translation Ranger memdefragd knows"
        )
    if syscall_nr is None:
        return False, (
            f"this kernel shows Translation Ranger's sysctls ({sysctl}) but no number is "
            "configured for its scan_process_memory syscall: set daemon.ranger.syscall to the "
            "number in the syscall table of the tree this kernel was built from (memdefragd "
            "never guesses it: on mainline x86_64, 333 is io_pgetevents and 335 uretprobe)"
        )
    if isinstance(syscall_nr, bool) or not isinstance(syscall_nr, int) or syscall_nr < 0:
        return False, f"daemon.ranger.syscall must be a non-negative integer, not {syscall_nr!r}"
    return True, ""


def vmstat_counters(proc_root: str = "/proc") -> dict[str, int]:
    """Translation Ranger's counters in /proc/vmstat (memdefrag_*), {} on other kernels."""
    try:
        text = Path(proc_root, "vmstat").read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(VMSTAT_PREFIX) and value.strip().isdigit():
            out[name] = int(value)
    return out


# The child's part of syscall_check: action 2 (clear a flag nobody set) on itself, then
# action 5 (the contiguity dump of its own VMAs) into a buffer far larger than its dump,
# printed for the parent to parse: only scan_process_memory writes that text.
_CHECK = """
import ctypes, sys
nr, size = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
if libc.syscall(L(nr), L(0), None, L(0), L(2)) != 0:
    print("action 2:", ctypes.get_errno()); sys.exit(3)
buf = ctypes.create_string_buffer(size)
n = libc.syscall(L(nr), L(0), buf, L(size), L(5))
if n <= 0:
    print("action 5:", n, ctypes.get_errno()); sys.exit(4)
sys.stdout.write(buf.raw[:n].decode("ascii", "replace"))
"""


def syscall_check(syscall_nr: int, *, timeout: float = 30.0) -> str | None:
    """None if `syscall_nr` is scan_process_memory on this kernel, else why not. The call
    is made only in a child process (an unassigned number kills its caller with SIGILL on
    some kernels; an assigned one does whatever it does), and the child's answer must
    parse as Translation Ranger's contiguity dump."""
    try:
        r = subprocess.run(
            [sys.executable, "-I", "-c", _CHECK, str(syscall_nr), str(BUF_LEN)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"syscall {syscall_nr} did not return within {timeout:g} s in a child process"
    bad = f"daemon.ranger.syscall {syscall_nr} is not scan_process_memory on this kernel"
    if r.returncode < 0:
        return f"{bad}: a child process calling it died of signal {-r.returncode}"
    if r.returncode != 0:
        return f"{bad}: {r.stdout.strip() or r.stderr.strip()[-200:]}"
    try:
        vmas = parse_contig_dump(r.stdout)
    except RangerParseError as e:
        return f"{bad}: its answer is not a contiguity dump ({e})"
    if not vmas:
        return f"{bad}: it answered with no VMA"
    return None


def _sysctl(proc_root: str, name: str, default: int) -> int:
    """An integer sysctl of /proc/sys/vm, `default` if it cannot be read."""
    try:
        return int(Path(proc_root, "sys/vm", name).read_text().strip())
    except (OSError, ValueError):
        return default


def _kernel(proc_root: str) -> str:
    try:
        release = Path(proc_root, "sys/kernel/osrelease").read_text().strip()
    except OSError:
        release = os.uname().release
    return f"Linux {release}"


# ---------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class ContigVma:
    """One line of the contiguity dump (action 5).

    `runs` are signed lengths in 4 KiB pages: N > 0 is N present pages at one VA-PA offset
    (translation contiguity), -M is M pages not present. Empty for a VMA the kernel deems
    ineligible. `mm` is the kernel's hashed pointer text; `vma_id` its pseudo-unique id.
    """

    mm: str
    vma_id: int
    start: int
    end: int
    runs: tuple[int, ...]

    @property
    def eligible(self) -> bool:
        return bool(self.runs)

    @property
    def present_runs(self) -> tuple[int, ...]:
        return tuple(r for r in self.runs if r > 0)

    @property
    def present_pages(self) -> int:
        return sum(self.present_runs)

    @property
    def pages(self) -> int:
        """Pages the runs cover; equals the VMA's pages when the dump is whole."""
        return sum(abs(r) for r in self.runs)


@dataclass(frozen=True, slots=True)
class DefragVma:
    """A `vma:` line of the defrag log: a VMA that passed the filters, before its chunks."""

    vma_id: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class DefragStats:
    """defrag_result_stats of one chunk (RFC04's defrag_address_range), in 4 KiB pages.

    Field names are the RFC's; the ISCA tree's `src compound` and `dst free` are the RFC's
    src_pte_thp_failed and dst_migrate_free_failed, while its `dst
    compound` has no stated RFC equivalent and keeps its own name.
    """

    aligned: int = 0
    migrated: int = 0
    src_not_present: int = 0
    src_pte_thp_failed: int = 0
    src_thp_dst_not_failed: int = 0
    dst_out_of_bound_failed: int = 0
    dst_thp_src_not_failed: int = 0
    dst_pte_thp_failed: int = 0
    dst_compound_failed: int = 0
    dst_isolate_free_failed: int = 0
    dst_migrate_free_failed: int = 0
    dst_anon_failed: int = 0
    dst_file_failed: int = 0
    dst_non_lru_failed: int = 0
    dst_non_moveable_failed: int = 0

    def failures(self) -> dict[str, int]:
        """Pages per failure category, nonzero ones only (not-present pages included: the
        kernel counts them as failed, and they block promotion)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("aligned", "migrated") and getattr(self, f.name)
        }

    @property
    def failed(self) -> int:
        return sum(self.failures().values())

    def __add__(self, other: DefragStats) -> DefragStats:
        return DefragStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


FAILURE_CATEGORIES = tuple(f.name for f in fields(DefragStats))[2:]


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """One per-chunk line of the defrag log (action 3): one attempt at a 2 MiB sub-chunk.

    `anchor_vpn`/`anchor_pfn` pin the VMA's VA-PA offset; `anchor_start`/`anchor_last` are
    the anchor interval (byte addresses, `last` inclusive); `not_defrag` is the byte
    address just after the page that caused a hard stop, 0 if none.
    """

    start: int
    end: int
    pages: int
    stats: DefragStats
    anchor_vpn: int
    anchor_pfn: int
    anchor_start: int
    anchor_last: int
    vma_id: int
    not_defrag: int

    @property
    def hard_stop(self) -> bool:
        return self.not_defrag != 0


@dataclass(frozen=True, slots=True)
class DefragLog:
    vmas: tuple[DefragVma, ...]
    chunks: tuple[ChunkResult, ...]
    truncated: bool = False  # the text ended inside a line (the kernel's buffer filled)


@dataclass(frozen=True, slots=True)
class DefragSummary:
    """Totals over the chunks of a defrag log, each chunk counted once (its last attempt).

    `chunk_failures` counts chunks per failure category, the unit Outcome.failures uses.
    """

    chunks: int
    clean_chunks: int  # no failed page: the ones the kernel may promote to a THP
    pages: DefragStats
    chunk_failures: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class DefragPass:
    """What Ranger.defrag did: calls made, whether the kernel said the pass was complete,
    and its log (empty when asked for none). `truncated_calls`: calls whose log filled the
    buffer (the pass went on; the lines that did not fit are lost, so the log, and what is
    counted from it, covers less than the kernel did); `buf_len`: the buffer of the first
    call (the one of each call may have grown after a full one)."""

    calls: int
    complete: bool
    log: DefragLog
    truncated_calls: int = 0
    buf_len: int = 0


# ---------------------------------------------------------------- parsers


def parse_contig_dump(text: str) -> tuple[ContigVma, ...]:
    """The text of action 5, all calls' outputs concatenated (a line split across calls
    continues without a header, so split only after joining)."""
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5 or parts[-1] != "-1":
            raise RangerParseError(f"contiguity dump line {n}: not 'mm, vma, start, end, ..., -1'")
        try:
            vma_id, start, end = (_hex(p) for p in parts[1:4])
            runs = tuple(int(p) for p in parts[4:-1])
        except ValueError as e:
            raise RangerParseError(f"contiguity dump line {n}: {e}") from None
        if end <= start:
            raise RangerParseError(f"contiguity dump line {n}: VMA end {end:#x} <= start")
        out.append(ContigVma(parts[0], vma_id, start, end, runs))
    return tuple(out)


def _hex(text: str) -> int:
    if not text.startswith("0x"):
        raise ValueError(f"{text!r} is not 0x-prefixed hex")
    return int(text, 16)


_X = r"[0-9a-f]+"
_CHUNK = re.compile(
    rf"\[0x(?P<start>{_X}), 0x(?P<end>{_X})\):(?P<pages>\d+) \[(?P<stats>[^\]]*)\], "
    rf"anchor: \((?P<vpn>{_X}), (?P<pfn>{_X})\), range: \[(?P<rs>{_X}), (?P<rl>{_X})\], "
    rf"vma: 0x(?P<vma>{_X}), not_defrag_vpn: (?P<nd>{_X})"
)
_VMA = re.compile(rf"vma: 0x({_X}), 0x({_X}), 0x({_X}), -1")
# One item of the stats list with the separator before it: a section ("src: ", "dst: ") or
# a counter. RFC04 prints no comma before "dst:", so the comma is optional.
_STAT = re.compile(r",?\s*(?:(?P<section>src|dst):(?= )|(?P<key>[a-z_-]+):(?P<value>\d+))")

# (section, key) in the log -> DefragStats field. RFC04 layout, then ISCA@08047bf's.
_STAT_FIELDS = {
    ("", "alig"): "aligned",
    ("", "migrated"): "migrated",
    ("src", "not"): "src_not_present",
    ("src", "src_thp_dst_not"): "src_thp_dst_not_failed",
    ("src", "src_pte_thp"): "src_pte_thp_failed",
    ("dst", "out_bound"): "dst_out_of_bound_failed",
    ("dst", "dst_thp_src_not"): "dst_thp_src_not_failed",
    ("dst", "dst_pte_thp"): "dst_pte_thp_failed",
    ("dst", "isolate_free"): "dst_isolate_free_failed",
    ("dst", "migrate_free"): "dst_migrate_free_failed",
    ("dst", "anon"): "dst_anon_failed",
    ("dst", "file"): "dst_file_failed",
    ("dst", "non-lru"): "dst_non_lru_failed",
    ("dst", "non-moveable"): "dst_non_moveable_failed",
    ("src", "compound"): "src_pte_thp_failed",
    ("dst", "compound"): "dst_compound_failed",
    ("dst", "free"): "dst_migrate_free_failed",
}


def parse_stats(text: str) -> DefragStats:
    """The bracketed defrag_result_stats of a chunk line, in either documented layout."""
    values: dict[str, int] = {}
    section, pos = "", 0
    for m in _STAT.finditer(text):
        if m.start() != pos:
            raise RangerParseError(f"defrag stats: unexpected text {text[pos : m.start()]!r}")
        pos = m.end()
        if m["section"]:
            section = m["section"]
            continue
        name = _STAT_FIELDS.get((section, m["key"]))
        if name is None:
            where = f"{section}: " if section else ""
            raise RangerParseError(f"defrag stats: unknown field {where}{m['key']!r}")
        if name in values:
            raise RangerParseError(f"defrag stats: {name} given twice")
        values[name] = int(m["value"])
    if pos != len(text) or "aligned" not in values:
        raise RangerParseError(f"defrag stats: not a defrag_result_stats list: {text!r}")
    return DefragStats(**values)


def parse_defrag_log(text: str) -> DefragLog:
    """The log of action 3, all calls' outputs concatenated. Text after the last newline
    is a line cut short by a full buffer: dropped, and flagged as `truncated`."""
    body, _, tail = text.rpartition("\n")
    vmas: list[DefragVma] = []
    chunks: list[ChunkResult] = []
    for n, line in enumerate(body.split("\n"), 1):
        if not line.strip():
            continue
        if m := _VMA.fullmatch(line):
            vmas.append(DefragVma(*(int(g, 16) for g in m.groups())))
        elif m := _CHUNK.fullmatch(line):
            chunks.append(
                ChunkResult(
                    start=int(m["start"], 16),
                    end=int(m["end"], 16),
                    pages=int(m["pages"]),
                    stats=parse_stats(m["stats"]),
                    anchor_vpn=int(m["vpn"], 16),
                    anchor_pfn=int(m["pfn"], 16),
                    anchor_start=int(m["rs"], 16),
                    anchor_last=int(m["rl"], 16),
                    vma_id=int(m["vma"], 16),
                    not_defrag=int(m["nd"], 16),
                )
            )
        else:
            raise RangerParseError(f"defrag log line {n}: neither a vma nor a chunk line")
    return DefragLog(tuple(vmas), tuple(chunks), truncated=bool(tail))


def last_attempts(chunks: Iterable[ChunkResult]) -> list[ChunkResult]:
    """One line per chunk: after a hard stop the kernel redoes the rest of the same chunk
    and prints another line whose counters include the earlier attempts' (its stats are
    declared before the retry label), so only the last attempt of each chunk counts."""
    out: list[ChunkResult] = []
    for c in chunks:
        prev = out[-1] if out else None
        if prev and prev.hard_stop and (prev.vma_id, prev.end) == (c.vma_id, c.end):
            out[-1] = c
        else:
            out.append(c)
    return out


def summarize(chunks: Iterable[ChunkResult]) -> DefragSummary:
    settled = last_attempts(chunks)
    total = DefragStats()
    by_category: dict[str, int] = {}
    for c in settled:
        total += c.stats
        for name in c.stats.failures():
            by_category[name] = by_category.get(name, 0) + 1
    return DefragSummary(
        chunks=len(settled),
        clean_chunks=sum(1 for c in settled if not c.stats.failed),
        pages=total,
        chunk_failures=MappingProxyType(by_category),
    )


# ---------------------------------------------------------------- the syscall


def log_buffer_len(
    vmas: Iterable[tuple[int, int]],
    breakout_chunks: int = 0,
    *,
    lines_per_chunk: int = LOG_LINES_PER_CHUNK,
    cap: int = BUF_LEN,
) -> int:
    """Bytes of action 3's log buffer for one call over `vmas` ([start, end) of the VMAs the
    kernel may walk): per VMA its `vma:` line and, per 2 MiB chunk it may do in the call
    (all of them with `breakout_chunks` 0; at most that many, the kernel's count being per
    VMA), `lines_per_chunk` chunk lines of the widest text; whole pages (vzalloc's unit),
    at least one, at most `cap`."""
    need = 0
    for start, end in vmas:
        chunks = (-(-end // PMD_SIZE) - start // PMD_SIZE) if end > start else 0
        if breakout_chunks > 0:
            chunks = min(chunks, breakout_chunks)
        need += VMA_LINE_MAX + chunks * lines_per_chunk * CHUNK_LINE_MAX
    return min(cap, max(_PAGE, -(-need // _PAGE) * _PAGE))


# Paths of maps lines that may be shmem, which the kernel's mem_defrag_vma_check accepts
# (with CONFIG_TRANSPARENT_HUGE_PAGECACHE): shared anonymous memory, SysV segments, memfds.
_SHMEM_PATHS = ("/dev/zero", "/SYSV", "/memfd:")


class Ranger:
    """scan_process_memory on a kernel proven to have it; refuses to exist elsewhere.

    Calls are serialized by a module-wide lock held for a whole pass, because the kernel
    keeps one scan state for the system and resets it whenever another mm is named.
    """

    def __init__(
        self,
        syscall_nr: int | None,
        *,
        proc_root: str = "/proc",
        buf_len: int = BUF_LEN,
        breakout_chunks: int | None = None,
        lock_file: str | None = LOCK_FILE,
    ):
        """`breakout_chunks`: set the kernel's num_breakout_chunks to this for each pass
        (and put the old value back after), so that each call of action 3 stops after so
        many 2 MiB chunks and answers 1, "call again": short calls that should_stop and
        pacing can come between. None leaves the sysctl as it is.

        `buf_len`: the most bytes a log buffer may have. Action 3's is sized per pass from
        the process's VMAs (log_buffer_len); the contiguity dump (action 5) always gets
        all of it: a dump that fills its buffer mid-VMA leaves the target's mmap_sem held."""
        ok, reason = ranger_support(syscall_nr, proc_root)
        if not ok:
            raise RangerUnavailable(reason)
        assert syscall_nr is not None
        if breakout_chunks is not None and breakout_chunks < 0:
            raise ValueError(f"breakout_chunks must be >= 0, not {breakout_chunks}")
        self.syscall_nr = syscall_nr
        self.proc_root = proc_root
        self.buf_len = buf_len
        self.breakout_chunks = breakout_chunks
        self.lock_file = lock_file
        self._fn: Callable[..., int] | None = None  # libc's syscall(), loaded on first use
        self._buf: ctypes.Array[ctypes.c_char] | None = None
        self.truncated_calls = 0  # calls of action 3 whose log filled its buffer, ever
        self._warned: set[tuple[int, int]] = set()  # (pid, start time) warned of that

    def mark_all(self, handle: PidHandle) -> None:
        """Action 1: every VMA of the process becomes eligible (MMF_VM_MEM_DEFRAG_ALL),
        as Translation Ranger's launcher does before defragmenting."""
        self._run(handle, MEM_DEFRAG_MARK_SCAN_ALL, 0, 1, lambda: False)

    def defrag(
        self,
        handle: PidHandle,
        *,
        log: bool = True,
        max_calls: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        log_len: int | None = None,
    ) -> DefragPass:
        """Action 3 until the kernel returns 0 (pass complete), `max_calls` calls were
        made, or should_stop() says so between calls. With `log`, the per-chunk log is
        collected and parsed; without, the kernel only answers 1 (more to do) or 0.

        The log buffer is what a call can log with LOG_LINES_PER_CHUNK lines a chunk
        (log_buffer_len): a window full of obstacles (a THP, pinned pages, page tables:
        a hard stop, and a line, per page) fills it, and the log says so (`truncated`).
        `log_len` asks for that many bytes instead (at most `buf_len`), for a caller that
        needs the whole log of such a pass more than the kernel's pages it costs."""
        if not log:
            size = 0
        elif log_len is not None:
            size = max(1, min(log_len, self.buf_len))
        else:
            size = self.log_buffer_len(handle)
        text, calls, complete, full = self._run(
            handle, MEM_DEFRAG_DEFRAG, size, max_calls, should_stop
        )
        if not log:
            return DefragPass(calls, complete, DefragLog((), ()))
        parsed = parse_defrag_log(text)
        if full:
            parsed = DefragLog(parsed.vmas, parsed.chunks, truncated=True)
            self.truncated_calls += full
            key = (handle.pid, handle.proc.start_time)
            level = logging.DEBUG if key in self._warned else logging.WARNING
            if len(self._warned) >= 4096:  # a long-lived daemon: forget, warn again
                self._warned.clear()
            self._warned.add(key)  # once per process: an obstructed window stays so
            _logger.log(
                level,
                "Translation Ranger: the defrag log of pid %d filled its buffer (%d bytes at "
                "first) in %d of %d calls: the pass went on, but the lines that did not fit "
                "are lost (%d chunk lines kept; a hard stop is a line each)", handle.pid,
                size, full, calls, len(parsed.chunks),
            )  # fmt: skip
        return DefragPass(calls, complete, parsed, truncated_calls=full, buf_len=size)

    def log_buffer_len(self, handle: PidHandle) -> int:
        """The log buffer the next pass of action 3 over this process starts with: what
        one call can log (log_buffer_len) over the VMAs the kernel may walk now, those of
        /proc/PID/maps that are anonymous (or may be shmem) and no smaller than
        defrag_size_threshold x 2 MiB; `buf_len` (the cap) when maps cannot be read."""
        try:
            with ProcDir(self.proc_root, handle.pid) as d:
                vmas = parse_smaps(d.read_text("maps"))
        except (OSError, ProcessGone, AccessDenied, ParseError):
            return self.buf_len
        least = _sysctl(self.proc_root, DEFRAG_SIZE_SYSCTL, 5) * PMD_SIZE
        spans = [
            (v.start, v.end)
            for v in vmas
            if v.size >= least and (v.inode == 0 or v.path.startswith(_SHMEM_PATHS))
        ]
        breakout = self.breakout_chunks
        if breakout is None:  # the sysctl as it is
            breakout = _sysctl(self.proc_root, BREAKOUT_SYSCTL, 0)
        return log_buffer_len(spans, breakout, cap=self.buf_len)

    def contig_scan(self, handle: PidHandle) -> tuple[ContigVma, ...]:
        """Action 5: the kernel's own contiguity dump of every VMA of the process, into a
        buffer of `buf_len` (a dump that fills its buffer mid-VMA leaves the target's
        mmap_sem held: measured, the target's next mmap hangs)."""
        text, _, _, _ = self._run(handle, MEM_DEFRAG_CONTIG_SCAN, self.buf_len, None, lambda: False)
        return parse_contig_dump(text)

    def _run(
        self,
        handle: PidHandle,
        action: int,
        size: int,
        max_calls: int | None,
        should_stop: Callable[[], bool],
    ) -> tuple[str, int, bool, int]:
        """Calls of `action` with a buffer of `size` bytes (none if 0) until the kernel
        answers 0: (text, calls, complete, calls of action 3 that filled the buffer). A
        full defrag log ends in its cut line (its first byte a NUL): dropped, since the
        next call starts a line of its own, and the next call gets twice the buffer."""
        parts: list[bytes] = []
        calls = full = 0
        complete = False
        with _LOCK, self._machine_lock(), self._breakout(action):
            while max_calls is None or calls < max_calls:
                if calls and should_stop():
                    break
                buf = self._buffer(size) if size else None
                ret = self._call(handle, buf, size, action)
                calls += 1
                if ret == 0:
                    complete = True
                    break
                if buf is None:
                    continue
                text = buf.raw[:ret]
                if action == MEM_DEFRAG_DEFRAG and ret >= size:
                    full += 1
                    text = text[: text.rfind(b"\n") + 1]
                    size = min(self.buf_len, 2 * size)
                parts.append(text)
        return b"".join(parts).decode("ascii", "replace"), calls, complete, full

    @contextlib.contextmanager
    def _machine_lock(self) -> Iterator[None]:
        """flock on LOCK_FILE for the pass: one pass at a time on the machine."""
        if self.lock_file is None:
            yield
            return
        path = Path(self.lock_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _breakout(self, action: int) -> Iterator[None]:
        """num_breakout_chunks as configured for an action-3 pass, then as it was."""
        if action != MEM_DEFRAG_DEFRAG or self.breakout_chunks is None:
            yield
            return
        knob = Path(self.proc_root, "sys/vm", BREAKOUT_SYSCTL)
        old = knob.read_text().strip()
        knob.write_text(f"{self.breakout_chunks}\n")
        try:
            yield
        finally:
            knob.write_text(f"{old}\n")

    def _buffer(self, size: int) -> ctypes.Array[ctypes.c_char]:
        """Our side's buffer, at least `size` bytes (the kernel is told `size`)."""
        if self._buf is None or len(self._buf) < size:
            self._buf = ctypes.create_string_buffer(size)
        return self._buf

    def _call(
        self, handle: PidHandle, buf: ctypes.Array[ctypes.c_char] | None, size: int, action: int
    ) -> int:
        """One syscall on the process the handle proves, with `size` bytes of `buf`. The
        syscall takes a pid, not a pidfd: the pidfd is polled first, so a process that
        exited (whose pid may be reused) is never named."""
        handle.check_alive()
        ret, err = self._syscall(handle.pid, buf, size if buf is not None else 0, action)
        if ret >= 0:
            return ret
        if err == errno.ESRCH:
            raise ProcessGone(f"pid {handle.pid}: no such process")
        if err == errno.EPERM:
            raise AccessDenied(f"pid {handle.pid}: scan_process_memory: not permitted")
        if err == errno.ENOSYS:
            raise RangerUnavailable(
                f"the kernel has no syscall {self.syscall_nr}: daemon.ranger.syscall is wrong"
            )
        raise OSError(err, f"scan_process_memory(pid {handle.pid}, action {action})")

    def _syscall(
        self, pid: int, buf: ctypes.Array[ctypes.c_char] | None, buf_len: int, action: int
    ) -> tuple[int, int]:
        if self._fn is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            self._fn = libc.syscall
        ctypes.set_errno(0)
        ret = self._fn(
            ctypes.c_long(self.syscall_nr),
            ctypes.c_long(pid),
            buf,
            ctypes.c_long(buf_len),
            ctypes.c_long(action),
        )
        return (ret, 0) if ret >= 0 else (-1, ctypes.get_errno())


def carry_out(
    ranger: Ranger,
    handle: PidHandle,
    request: Request,
    *,
    marked: set[tuple[int, int]],
    should_stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    """A request as a slice of Translation Ranger's pass over the whole process: the
    kernel cannot be pointed at ranges, so the request's size buys calls of action 3
    (one per `breakout_chunks` regions; a whole pass in one call without), after action
    1 once per process (`marked` remembers). The outcome counts what the kernel's log
    says it worked on, in 2 MiB chunks like collapse's regions: attempted, done (no page
    failed) and failures by category; `touched` is where, for verification."""
    key = (handle.pid, handle.proc.start_time)
    t0 = time.monotonic()
    if key not in marked:
        ranger.mark_all(handle)
        marked.add(key)
    regions = request.bytes // PMD_SIZE
    per_call = ranger.breakout_chunks or 0
    calls = max(1, -(-regions // per_call)) if per_call else 1
    done = ranger.defrag(handle, max_calls=calls, should_stop=should_stop)
    chunks = last_attempts(done.log.chunks)
    summary = summarize(chunks)
    return Outcome(
        request=request,
        bytes_attempted=summary.chunks * PMD_SIZE,
        bytes_done=summary.clean_chunks * PMD_SIZE,
        failures=dict(summary.chunk_failures),
        duration=time.monotonic() - t0,
        touched=_aligned_ranges((c.start, c.end) for c in chunks),
        frames=anchor_frames(done.log),
    )


def anchor_frames(log: DefragLog) -> tuple[tuple[int, int], ...]:
    """Where the pass meant the pages of each VMA it walked to lie: per anchor of its
    chunk lines, the frames anchor_pfn + (vpn - anchor_vpn) of the vpns of its interval
    ([start, last], inclusive) inside the VMA (from its `vma:` line, when the log has
    it), merged and in order."""
    bounds = {v.vma_id: (v.start, v.end) for v in log.vmas}
    spans = set()
    for c in log.chunks:
        lo, hi = c.anchor_start >> PAGE_SHIFT, (c.anchor_last >> PAGE_SHIFT) + 1
        if c.vma_id in bounds:
            start, end = bounds[c.vma_id]
            lo, hi = max(lo, start >> PAGE_SHIFT), min(hi, end >> PAGE_SHIFT)
        first = c.anchor_pfn + (lo - c.anchor_vpn)
        spans.add((max(0, first), first + (hi - lo)))
    return merge_frames(spans)


def _aligned_ranges(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The 2 MiB-aligned ranges covering `spans`, merged, in order."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted((lo & ~(PMD_SIZE - 1), -(-hi // PMD_SIZE) * PMD_SIZE) for lo, hi in spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


_CHECKED: dict[int, str | None] = {}  # syscall number -> syscall_check's answer


def ranger_refusal(syscall_nr: int | None, proc_root: str = "/proc") -> str | None:
    """Why method 'ranger' cannot run here (this kernel lacks it, or the number is wrong:
    checked once per number, in a child process); None where it can."""
    ok, reason = ranger_support(syscall_nr, proc_root)
    if not ok:
        return reason
    assert syscall_nr is not None
    if syscall_nr not in _CHECKED:
        _CHECKED[syscall_nr] = syscall_check(syscall_nr)
    return _CHECKED[syscall_nr]
