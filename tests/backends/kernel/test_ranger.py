"""Translation Ranger's scan_process_memory: the support gate, the refusal on this kernel,
the call loop with a scripted syscall, and the parsers of the kernel's text.

No sample below was recorded from a kernel: this machine runs mainline, which has no
scan_process_memory. Each sample is built by hand from the format strings of RFC04 and of
the ISCA tree at commit 08047bf (docs/simulator.md, "Sources"), except the first contiguity
line, which is the example of the author's tutorial (normal.zone, June 2019) verbatim.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.procs import PidHandle
from memdefragd.backends.kernel.ranger import (
    BUF_LEN,
    CHUNK_LINE_MAX,
    LOG_LINES_PER_CHUNK,
    MEM_DEFRAG_CONTIG_SCAN,
    MEM_DEFRAG_DEFRAG,
    VMA_LINE_MAX,
    ChunkResult,
    ContigVma,
    DefragStats,
    DefragVma,
    Ranger,
    RangerParseError,
    RangerUnavailable,
    last_attempts,
    log_buffer_len,
    parse_contig_dump,
    parse_defrag_log,
    parse_stats,
    ranger_support,
    summarize,
)
from memdefragd.model import AccessDenied, ProcessGone

PAGE = 4096

# ---- the gate ---------------------------------------------------------------------------


@pytest.fixture
def patched_root(tmp_path: Path) -> str:
    """A fake /proc of a Translation Ranger kernel: the identity sysctl and a release."""
    (tmp_path / "sys/vm").mkdir(parents=True)
    (tmp_path / "sys/vm/kmem_defragd_always").write_text("0\n")
    (tmp_path / "sys/kernel").mkdir(parents=True)
    (tmp_path / "sys/kernel/osrelease").write_text("5.0.0-rc5-ranger+\n")
    (tmp_path / "sys/vm/num_breakout_chunks").write_text("0\n")
    (tmp_path / "vmstat").write_text("nr_free_pages 1000\nmemdefrag_defrag 0\nmemdefrag_scan 0\n")
    return str(tmp_path)


@pytest.fixture
def no_ctypes_calls(monkeypatch):
    """Any attempt to load a C library (and so to reach syscall()) fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError(f"a C library was loaded: {args}")

    class NoLoader:
        def __getattr__(self, name):
            boom(name)

    monkeypatch.setattr(ctypes, "CDLL", boom)
    monkeypatch.setattr(ctypes, "cdll", NoLoader())


def test_this_kernel_is_refused_with_an_actionable_reason():
    if Path("/proc/sys/vm", "kmem_defragd_always").exists():
        pytest.skip("this kernel is patched with Translation Ranger")
    release = os.uname().release
    for nr in (None, 333, 335):  # 333 and 335 are io_pgetevents and uretprobe on mainline
        ok, reason = ranger_support(nr)
        assert ok is False
        assert "/proc/sys/vm/kmem_defragd_always" in reason
        assert f"Linux {release}" in reason
        assert "use method 'collapse'" in reason


@pytest.mark.parametrize("nr", [None, 333, 335])
def test_ranger_refuses_to_exist_on_this_kernel_without_any_call(no_ctypes_calls, nr):
    if Path("/proc/sys/vm", "kmem_defragd_always").exists():
        pytest.skip("this kernel is patched with Translation Ranger")
    with pytest.raises(RangerUnavailable, match="kmem_defragd_always"):
        Ranger(nr)


def test_no_ctypes_calls_fixture_can_fail(no_ctypes_calls):
    """The guard above really trips when a library is loaded."""
    with pytest.raises(AssertionError):
        ctypes.CDLL(None)


def test_patched_kernel_without_a_number_is_refused(patched_root, no_ctypes_calls):
    ok, reason = ranger_support(None, patched_root)
    assert ok is False
    assert "daemon.ranger.syscall" in reason
    with pytest.raises(RangerUnavailable, match=r"daemon\.ranger\.syscall"):
        Ranger(None, proc_root=patched_root)


@pytest.mark.parametrize("nr", [-1, True, "335", 3.0])
def test_bad_numbers_are_refused(patched_root, nr):
    ok, reason = ranger_support(nr, patched_root)
    assert ok is False
    assert "non-negative integer" in reason


def test_patched_kernel_with_a_number_is_accepted_and_construction_calls_nothing(
    patched_root, no_ctypes_calls
):
    assert ranger_support(335, patched_root) == (True, "")
    r = Ranger(335, proc_root=patched_root)
    assert r.syscall_nr == 335


def test_unpatched_fake_root_names_its_release(tmp_path):
    (tmp_path / "sys/kernel").mkdir(parents=True)
    (tmp_path / "sys/kernel/osrelease").write_text("6.18.0-test\n")
    ok, reason = ranger_support(335, str(tmp_path))
    assert ok is False
    assert "Linux 6.18.0-test" in reason


# ---- the call loop, with the syscall scripted ----------------------------------------------


@pytest.fixture
def me() -> PidHandle:
    """A handle on this test process: the scripted syscall never touches it."""
    h = PidHandle(KernelBackend().process(os.getpid()))
    yield h
    h.close()


def scripted(ranger: Ranger, monkeypatch, answers, log=None):
    """Replace the raw syscall: each answer is bytes (written to the buffer; their length
    returned), an int >= 0 (returned), or -errno."""
    script = list(answers)
    calls = log if log is not None else []

    def fake(pid, buf, buf_len, action):
        calls.append((pid, buf_len, action))
        a = script.pop(0)
        if isinstance(a, bytes):
            assert buf is not None and len(a) <= buf_len
            ctypes.memmove(buf, a, len(a))
            return len(a), 0
        return (a, 0) if a >= 0 else (-1, -a)

    monkeypatch.setattr(ranger, "_syscall", fake)
    return calls, script


def test_defrag_loops_until_zero_and_parses_the_log(patched_root, monkeypatch, me):
    r = Ranger(335, proc_root=patched_root, buf_len=1 << 16)
    text = RFC_LOG.encode()
    cut = text.index(b"[0x7f0000200000")
    calls, script = scripted(r, monkeypatch, [text[:cut], text[cut:], 0])
    done = r.defrag(me)
    assert calls == [(os.getpid(), 1 << 16, MEM_DEFRAG_DEFRAG)] * 3
    assert script == []
    assert (done.calls, done.complete) == (3, True)
    assert done.log == parse_defrag_log(RFC_LOG)
    assert len(done.log.chunks) == 4


def test_defrag_without_log_follows_one_and_zero(patched_root, monkeypatch, me):
    r = Ranger(335, proc_root=patched_root)
    calls, _ = scripted(r, monkeypatch, [1, 1, 0])
    done = r.defrag(me, log=False)
    assert [c[1] for c in calls] == [0, 0, 0]  # no buffer given
    assert (done.calls, done.complete, done.log.chunks) == (3, True, ())


def test_defrag_stops_at_max_calls_and_should_stop(patched_root, monkeypatch, me):
    r = Ranger(335, proc_root=patched_root)
    scripted(r, monkeypatch, [1, 1, 1])
    done = r.defrag(me, log=False, max_calls=2)
    assert (done.calls, done.complete) == (2, False)
    asked = []
    done = r.defrag(me, log=False, should_stop=lambda: asked.append(1) or True)
    assert (done.calls, done.complete, asked) == (1, False, [1])  # asked between calls only


@pytest.mark.parametrize(
    ("err", "exc"),
    [
        (errno.ESRCH, ProcessGone),
        (errno.EPERM, AccessDenied),
        (errno.ENOSYS, RangerUnavailable),
        (errno.EINVAL, OSError),
    ],
)
def test_errors_of_the_syscall(patched_root, monkeypatch, me, err, exc):
    r = Ranger(335, proc_root=patched_root)
    scripted(r, monkeypatch, [-err])
    with pytest.raises(exc):
        r.defrag(me)


def test_an_exited_process_is_never_named(patched_root, monkeypatch):
    """The syscall takes a pid; once the process exits that pid may name another one, so
    the pidfd is checked first and no call is made."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        h = PidHandle(KernelBackend().process(child.pid))
    finally:
        child.stdin.close()
        child.wait()
    r = Ranger(335, proc_root=patched_root)
    calls, _ = scripted(r, monkeypatch, [0])
    with h, pytest.raises(ProcessGone):
        r.defrag(h)
    assert calls == []


def test_passes_never_interleave(patched_root, monkeypatch, me):
    """Two threads, each with its own Ranger, run a three-call pass each: the kernel must
    see one whole pass, then the other (it keeps one scan state for the whole system and
    resets it when another mm is named)."""
    rangers = {n: Ranger(335, proc_root=patched_root) for n in "AB"}
    seen: list[str] = []
    busy = threading.Lock()

    def fake(pid, buf, buf_len, action):
        assert busy.acquire(blocking=False), "two calls at once"
        try:
            name = threading.current_thread().name
            seen.append(name)
            time.sleep(0.01)
            return (0 if seen.count(name) == 3 else 1), 0
        finally:
            busy.release()

    for r in rangers.values():
        monkeypatch.setattr(r, "_syscall", fake)
    threads = [
        threading.Thread(target=r.defrag, args=(me,), kwargs={"log": False}, name=n)
        for n, r in rangers.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen in (list("AAABBB"), list("BBBAAA"))


def test_contig_scan_joins_a_line_split_across_calls(patched_root, monkeypatch, me):
    r = Ranger(335, proc_root=patched_root)
    calls, _ = scripted(
        r,
        monkeypatch,
        [
            b"00000000a8b6e356, 0xffff9b35d7817550, 0x7ffc42439000, 0x7ffc4245a000, -29, 1, ",
            b"1, 1, 1, -1\n",
            0,
        ],
    )
    (vma,) = r.contig_scan(me)
    assert {c[2] for c in calls} == {MEM_DEFRAG_CONTIG_SCAN}
    assert vma.runs == (-29, 1, 1, 1, 1)


# ---- the contiguity dump (action 5) --------------------------------------------------------

CONTIG = (
    # the example in the author's tutorial (normal.zone, June 2019)
    "00000000a8b6e356, 0xffff9b35d7817550, 0x7ffc42439000, 0x7ffc4245a000, -29, 1, 1, 1, 1, -1\n"
    # ineligible VMA: "%p, 0x%lx, 0x%lx, 0x%lx, -1\n"
    "00000000a8b6e356, 0xffff9b35d78176e0, 0x7ffc42500000, 0x7ffc42502000, -1\n"
    # eligible, built: two whole THPs (512 each), a 256-page hole, 255 pages, one not present
    "00000000a8b6e356, 0xffff9b35d7817870, 0x7f0000000000, 0x7f0000600000, 512, 512, -256, 255, -1, -1\n"
)


def test_parse_contig_dump():
    blog, ineligible, built = parse_contig_dump(CONTIG)
    assert blog == ContigVma(
        "00000000a8b6e356", 0xFFFF9B35D7817550, 0x7FFC42439000, 0x7FFC4245A000, (-29, 1, 1, 1, 1)
    )
    assert blog.eligible
    assert blog.pages == (blog.end - blog.start) // PAGE == 33
    assert blog.present_runs == (1, 1, 1, 1)
    assert blog.present_pages == 4

    assert ineligible.runs == ()
    assert not ineligible.eligible
    assert ineligible.present_pages == 0

    assert built.runs == (512, 512, -256, 255, -1)  # a last run of -1 before the end mark
    assert built.pages == (built.end - built.start) // PAGE
    assert built.present_pages == 1279


def test_contig_dump_blank_lines_and_no_trailing_newline():
    assert parse_contig_dump("") == ()
    assert len(parse_contig_dump(CONTIG.rstrip("\n") + "\n\n")) == 3


@pytest.mark.parametrize(
    "line",
    [
        "00000000a8b6e356, 0xffff9b35d7817550, 0x7ffc42439000, 0x7ffc4245a000, -29, 1",  # no end mark
        "00000000a8b6e356, 0xffff9b35d7817550, 0x7ffc42439000, -1",  # no end address
        "00000000a8b6e356, ffff9b35d7817550, 0x7ffc42439000, 0x7ffc4245a000, -1",  # no 0x
        "00000000a8b6e356, 0xffff9b35d7817550, 0x7ffc42439000, 0x7ffc4245a000, x, -1",
        "00000000a8b6e356, 0xffff9b35d7817550, 0x7ffc4245a000, 0x7ffc42439000, -1",  # end < start
        "----",  # the launcher's snapshot separator is not kernel output
    ],
)
def test_contig_dump_rejects(line):
    with pytest.raises(RangerParseError):
        parse_contig_dump(line + "\n")


# ---- the defrag log (action 3) -------------------------------------------------------------

VMA_ID = "ffff9b35d7817870"
TAIL = f"anchor: (7f0000000, 40000), range: [7f0000000000, 7f00005ff000], vma: 0x{VMA_ID}"


def rfc_chunk(start: int, end: int, pages: int, nd: int = 0, **counts: int) -> str:
    """One chunk line by RFC04's format string (no comma before "dst:")."""
    c = {
        "alig": 0, "migrated": 0, "not": 0, "src_thp_dst_not": 0, "src_pte_thp": 0,
        "out_bound": 0, "dst_thp_src_not": 0, "dst_pte_thp": 0, "isolate_free": 0,
        "migrate_free": 0, "anon": 0, "file": 0, "non_lru": 0, "non_moveable": 0,
    } | counts  # fmt: skip
    return (
        f"[0x{start:x}, 0x{end:x}):{pages} [alig:{c['alig']}, migrated:{c['migrated']}, "
        f"src: not:{c['not']}, src_thp_dst_not:{c['src_thp_dst_not']}, "
        f"src_pte_thp:{c['src_pte_thp']} dst: out_bound:{c['out_bound']}, "
        f"dst_thp_src_not:{c['dst_thp_src_not']}, dst_pte_thp:{c['dst_pte_thp']}, "
        f"isolate_free:{c['isolate_free']}, migrate_free:{c['migrate_free']}, "
        f"anon:{c['anon']}, file:{c['file']}, non-lru:{c['non_lru']}, "
        f"non-moveable:{c['non_moveable']}], {TAIL}, not_defrag_vpn: {nd:x}\n"
    )


B = 0x7F0000000000
MiB2 = 2 << 20
BLOCKED = B + MiB2 + 101 * PAGE  # just after the unmovable page 100 of the second chunk
RFC_LOG = (
    f"vma: 0x{VMA_ID}, 0x{B:x}, 0x{B + 3 * MiB2:x}, -1\n"
    # chunk 1: clean, 12 pages already in place
    + rfc_chunk(B, B + MiB2, 512, alig=12, migrated=500)
    # chunk 2: hard stop on an unmovable destination, then the rest of the same chunk
    # (counters carry over: migrated 100 then 100 + 411)
    + rfc_chunk(B + MiB2, B + 2 * MiB2, 512, nd=BLOCKED, migrated=100, non_moveable=1)
    + rfc_chunk(BLOCKED, B + 2 * MiB2, 411, migrated=511, non_moveable=1)
    # chunk 3: half not present
    + rfc_chunk(B + 2 * MiB2, B + 3 * MiB2, 512, migrated=256, **{"not": 256})
)

ISCA_LINE = (
    f"[0x{B:x}, 0x{B + MiB2:x}):512 [alig:3, migrated:505, src: not:0, compound:1, "
    f"dst: out_bound:0, compound:2, free:1, anon:0, file:0, non-lru:0, non-moveable:0], "
    f"{TAIL}, not_defrag_vpn: 0\n"
)


def test_parse_rfc_defrag_log():
    log = parse_defrag_log(RFC_LOG)
    assert log.vmas == (DefragVma(int(VMA_ID, 16), B, B + 3 * MiB2),)
    assert not log.truncated
    first, stop, rest, holes = log.chunks
    assert first == ChunkResult(
        start=B,
        end=B + MiB2,
        pages=512,
        stats=DefragStats(aligned=12, migrated=500),
        anchor_vpn=B >> 12,
        anchor_pfn=0x40000,
        anchor_start=B,
        anchor_last=B + 3 * MiB2 - PAGE,
        vma_id=int(VMA_ID, 16),
        not_defrag=0,
    )
    assert not first.hard_stop
    assert first.stats.failures() == {}
    assert stop.hard_stop and stop.not_defrag == BLOCKED
    assert stop.stats.failures() == {"dst_non_moveable_failed": 1}
    assert (rest.start, rest.pages, rest.stats.migrated) == (BLOCKED, 411, 511)
    assert holes.stats.failures() == {"src_not_present": 256}
    assert holes.stats.failed == 256


def test_every_rfc_counter_lands_in_its_field():
    keys = {
        "alig": "aligned", "migrated": "migrated", "not": "src_not_present",
        "src_thp_dst_not": "src_thp_dst_not_failed", "src_pte_thp": "src_pte_thp_failed",
        "out_bound": "dst_out_of_bound_failed", "dst_thp_src_not": "dst_thp_src_not_failed",
        "dst_pte_thp": "dst_pte_thp_failed", "isolate_free": "dst_isolate_free_failed",
        "migrate_free": "dst_migrate_free_failed", "anon": "dst_anon_failed",
        "file": "dst_file_failed", "non_lru": "dst_non_lru_failed",
        "non_moveable": "dst_non_moveable_failed",
    }  # fmt: skip
    counts = {k: i + 1 for i, k in enumerate(keys)}  # all different
    (chunk,) = parse_defrag_log(rfc_chunk(B, B + MiB2, 512, **counts)).chunks
    got = {f: getattr(chunk.stats, f) for f in keys.values()}
    assert got == {keys[k]: v for k, v in counts.items()}
    assert chunk.stats.dst_compound_failed == 0


def test_parse_isca_layout():
    (chunk,) = parse_defrag_log(ISCA_LINE).chunks
    assert chunk.stats == DefragStats(
        aligned=3,
        migrated=505,
        src_pte_thp_failed=1,  # ISCA "src: compound" = RFC src_pte_thp_failed
        dst_compound_failed=2,  # ISCA "dst: compound": no stated RFC equivalent
        dst_migrate_free_failed=1,  # ISCA "dst: free" = RFC dst_migrate_free_failed
    )


def test_retries_of_one_chunk_count_once():
    chunks = parse_defrag_log(RFC_LOG).chunks
    settled = last_attempts(chunks)
    assert [c.start for c in settled] == [B, BLOCKED, B + 2 * MiB2]
    s = summarize(chunks)
    assert s.chunks == 3
    assert s.clean_chunks == 1
    assert s.pages.aligned == 12
    assert s.pages.migrated == 500 + 511 + 256  # not 500 + 100 + 511 + 256
    assert s.pages.dst_non_moveable_failed == 1  # not 2
    assert s.pages.src_not_present == 256
    assert dict(s.chunk_failures) == {"dst_non_moveable_failed": 1, "src_not_present": 1}


def test_a_hard_stop_at_a_chunk_end_starts_no_retry():
    """A stop whose next address is the chunk's end moves on to the next chunk: two
    chunks, both counted."""
    a = rfc_chunk(B, B + MiB2, 512, nd=B + MiB2, migrated=511, anon=1)
    b = rfc_chunk(B + MiB2, B + 2 * MiB2, 512, migrated=512)
    assert summarize(parse_defrag_log(a + b).chunks).chunks == 2


def test_cut_off_log_is_flagged_truncated():
    cut = RFC_LOG[: RFC_LOG.rindex("[0x") + 40]
    log = parse_defrag_log(cut)
    assert log.truncated
    assert len(log.chunks) == 3
    assert parse_defrag_log("") == parse_defrag_log("\n")


@pytest.mark.parametrize(
    "line",
    [
        rfc_chunk(B, B + MiB2, 512).replace("src: not", "src: weird"),  # unknown counter
        rfc_chunk(B, B + MiB2, 512).replace("anon:0", "anon:0, anon:1"),  # given twice
        rfc_chunk(B, B + MiB2, 512).replace("migrated:0", "migrated:zero"),
        rfc_chunk(B, B + MiB2, 512).replace("not_defrag_vpn", "not_defrag"),
        "vma: 0x1, 0x2, 0x3\n",
        "something else\n",
    ],
)
def test_defrag_log_rejects(line):
    with pytest.raises(RangerParseError):
        parse_defrag_log(line)


def test_parse_stats_needs_the_aligned_counter():
    with pytest.raises(RangerParseError):
        parse_stats("migrated:5")
    assert parse_stats("alig:1, migrated:2") == DefragStats(aligned=1, migrated=2)


def test_stats_add_up():
    a = DefragStats(aligned=1, dst_anon_failed=2)
    b = DefragStats(aligned=3, src_not_present=4)
    assert a + b == DefragStats(aligned=4, dst_anon_failed=2, src_not_present=4)
    assert (a + b).failed == 6


# ---- presence, the number, one pass per machine, short calls ----------------------------


def test_the_sysctl_without_the_vmstat_counters_is_refused(patched_root):
    Path(patched_root, "vmstat").write_text("nr_free_pages 1000\n")
    ok, reason = ranger_support(335, patched_root)
    assert ok is False and "no memdefrag_* counters" in reason


def test_a_wrong_number_is_found_out_in_a_child_process():
    """Called only in a child: getpid answers, but not with a contiguity dump; on this
    kernel 335 is uretprobe, which kills a caller outside a uprobe trampoline."""
    from memdefragd.backends.kernel.ranger import syscall_check

    if Path("/proc/sys/vm", "kmem_defragd_always").exists():
        pytest.skip("this kernel is patched with Translation Ranger")
    getpid = syscall_check(39)
    assert getpid is not None and getpid.startswith(
        "daemon.ranger.syscall 39 is not scan_process_memory on this kernel: action 2:"
    )
    uretprobe = syscall_check(335)
    assert uretprobe is not None and "a child process calling it died of signal" in uretprobe


def test_a_pass_sets_num_breakout_chunks_and_puts_it_back(patched_root, monkeypatch, me, tmp_path):
    knob = Path(patched_root, "sys/vm/num_breakout_chunks")
    r = Ranger(335, proc_root=patched_root, breakout_chunks=8, lock_file=str(tmp_path / "l"))
    seen = []

    def fake(pid, buf, buf_len, action):
        seen.append((action, knob.read_text().strip()))
        return (1 if action == 3 and len(seen) < 4 else 0), 0  # "call again" twice

    monkeypatch.setattr(r, "_syscall", fake)
    r.mark_all(me)
    p = r.defrag(me, log=False)
    assert p.calls == 3 and p.complete
    # action 1 leaves the knob alone; every call of the pass saw 8
    assert seen == [(1, "0"), (3, "8"), (3, "8"), (3, "8")]
    assert knob.read_text() == "0\n"


def test_passes_of_two_processes_exclude_each_other_through_the_lock_file(
    patched_root, monkeypatch, me, tmp_path
):
    """The lock is an flock on a file: another memdefragd (here, a child holding it)
    keeps our pass waiting."""
    import subprocess
    import sys

    lock, released = tmp_path / "ranger.lock", tmp_path / "released"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.0)\n"
         f"open({str(released)!r}, 'w').close(); fcntl.flock(fd, fcntl.LOCK_UN)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    r = Ranger(335, proc_root=patched_root, lock_file=str(lock))
    seen = []
    monkeypatch.setattr(r, "_syscall", lambda *a: (seen.append(released.exists()), (0, 0))[1])
    r.defrag(me, log=False)
    holder.wait()
    assert seen == [True]  # the call came only once the holder had let go


def test_a_daemon_request_is_a_slice_of_the_pass(patched_root, monkeypatch, me, tmp_path):
    """The kernel cannot be pointed at ranges: a request of 6 regions buys 3 calls of 2
    chunks each, after action 1 once per process; the outcome counts the log's chunks
    and says where they were, for verification."""
    from memdefragd.backends.kernel.ranger import carry_out
    from memdefragd.model import PMD_SIZE, Request

    r = Ranger(335, proc_root=patched_root, breakout_chunks=2, lock_file=str(tmp_path / "l"))
    text = RFC_LOG.encode()
    cut = text.index(b"[0x7f0000200000")
    calls, script = scripted(r, monkeypatch, [0, text[:cut], text[cut:], 0, 0])
    req = Request("t", me.pid, me.proc.start_time, B, B + 6 * PMD_SIZE,
                  ((B, B + 6 * PMD_SIZE),), method="ranger")  # fmt: skip
    marked: set[tuple[int, int]] = set()
    out = carry_out(r, me, req, marked=marked)
    assert [c[2] for c in calls] == [1, 3, 3, 3]  # action 1, then 6 regions / 2 per call
    want = summarize(parse_defrag_log(RFC_LOG).chunks)
    assert out.bytes_attempted == want.chunks * PMD_SIZE
    assert out.bytes_done == want.clean_chunks * PMD_SIZE
    assert dict(out.failures) == dict(want.chunk_failures) and out.failures
    regions = {
        a
        for c in last_attempts(parse_defrag_log(RFC_LOG).chunks)
        for a in range(c.start // PMD_SIZE * PMD_SIZE, c.end, PMD_SIZE)
    }
    assert {a for lo, hi in out.touched for a in range(lo, hi, PMD_SIZE)} == regions
    assert all(lo % PMD_SIZE == 0 == hi % PMD_SIZE for lo, hi in out.touched)
    carry_out(r, me, req, marked=marked)  # the same process again: no second action 1
    assert [c[2] for c in calls[4:]] == [3] and script == []


# ---- the size of action 3's log buffer ------------------------------------------------------

MAPS = (
    "7f0000000000-7f0010000000 rw-p 00000000 00:00 0 \n"  # 256 MiB anonymous: 128 chunks
    "7f0010000000-7f0010800000 rw-p 00000000 00:00 0 \n"  # 8 MiB: under defrag_size_threshold
    "7f0020000000-7f0040000000 r--p 00000000 08:01 1234                       /usr/lib/big.so\n"
    "7f0050100000-7f0050b00000 rw-s 00000000 00:05 99     /dev/zero (deleted)\n"  # 10 MiB shmem
    "55d0c0000000-55d0c0c00000 rw-p 00000000 00:00 0                          [heap]\n"  # 12 MiB
)
# what the kernel may walk in MAPS: the 128 chunks of the 256 MiB, the shmem's 10 MiB from
# 1 MiB past a 2 MiB boundary (6 chunks, the first and last partial), the heap's 6
MAPS_CHUNKS = (128, 6, 6)


def _widest_line(v: int) -> str:
    """RFC04's chunk line with every field, the hex ones too, at `v`."""
    return (
        f"[0x{v:x}, 0x{v:x}):{v} [alig:{v}, migrated:{v}, src: not:{v}, "
        f"src_thp_dst_not:{v}, src_pte_thp:{v} "
        f"dst: out_bound:{v}, dst_thp_src_not:{v}, dst_pte_thp:{v}, isolate_free:{v}, "
        f"migrate_free:{v}, anon:{v}, file:{v}, non-lru:{v}, non-moveable:{v}], "
        f"anchor: ({v:x}, {v:x}), range: [{v:x}, {v:x}], vma: 0x{v:x}, not_defrag_vpn: {v:x}\n"
    )


def test_the_widest_lines_the_kernel_can_print():
    """Every field at 2**64 - 1: the chunk line is CHUNK_LINE_MAX long and parses; the
    lines seen on the kernel (about 350 bytes) and the samples above are shorter."""
    top = (1 << 64) - 1
    line = _widest_line(top)
    assert len(line) == CHUNK_LINE_MAX == 671
    (chunk,) = parse_defrag_log(line).chunks
    assert chunk.stats.migrated == top and chunk.not_defrag == top
    assert len(f"vma: 0x{top:x}, 0x{top:x}, 0x{top:x}, -1\n") == VMA_LINE_MAX
    assert len(ISCA_LINE) < CHUNK_LINE_MAX
    assert max(len(x) + 1 for x in RFC_LOG.splitlines()) < CHUNK_LINE_MAX


def test_log_buffer_len_is_what_one_call_can_log():
    M = 1 << 20
    heap = [(B, B + 256 * M)]
    per_chunk = LOG_LINES_PER_CHUNK * CHUNK_LINE_MAX
    whole = VMA_LINE_MAX + 128 * per_chunk
    assert log_buffer_len(heap) == -(-whole // PAGE) * PAGE  # whole pages
    assert log_buffer_len(heap) < BUF_LEN // 64  # 84 pages, not 4,096
    # num_breakout_chunks: at most that many chunks per VMA and call
    assert log_buffer_len(heap, 8) == -(-(VMA_LINE_MAX + 8 * per_chunk) // PAGE) * PAGE
    assert log_buffer_len(heap, 1000) == log_buffer_len(heap)
    # the kernel's count restarts at each VMA: one call may do 8 chunks of each of them
    two = [(B, B + 256 * M), (B + 512 * M, B + 532 * M)]  # 128 and 10 chunks
    assert log_buffer_len(two, 8) == -(-(2 * (VMA_LINE_MAX + 8 * per_chunk)) // PAGE) * PAGE
    assert log_buffer_len(two, 16) == -(-(2 * VMA_LINE_MAX + 26 * per_chunk) // PAGE) * PAGE
    # a VMA off the 2 MiB grid has a partial chunk at each end
    odd = [(B + M, B + 11 * M)]
    assert log_buffer_len(odd, lines_per_chunk=1, cap=1 << 30) == PAGE * -(
        -(VMA_LINE_MAX + 6 * CHUNK_LINE_MAX) // PAGE
    )
    # at least a page (an empty buffer would mean "no log" to the kernel), at most the cap
    assert log_buffer_len([]) == PAGE
    assert log_buffer_len([(B, B + (64 << 30))]) == BUF_LEN
    assert log_buffer_len([(B, B + (64 << 30))], cap=1 << 20) == 1 << 20


def write_maps(root: str, pid: int, text: str = MAPS) -> None:
    Path(root, str(pid)).mkdir(exist_ok=True)
    Path(root, str(pid), "maps").write_text(text)


def maps_len(breakout: int, chunks=MAPS_CHUNKS) -> int:
    per = [min(c, breakout) if breakout else c for c in chunks]
    need = sum(VMA_LINE_MAX + c * LOG_LINES_PER_CHUNK * CHUNK_LINE_MAX for c in per)
    return -(-need // PAGE) * PAGE


def test_the_ranger_sizes_its_buffer_from_the_vmas_the_kernel_walks(patched_root, me):
    """Anonymous VMAs (and what may be shmem) of at least defrag_size_threshold x 2 MiB,
    with the breakout configured, or the sysctl's when none is."""
    write_maps(patched_root, me.pid)
    r = Ranger(335, proc_root=patched_root)
    assert r.log_buffer_len(me) == maps_len(0)
    Path(patched_root, "sys/vm/defrag_size_threshold").write_text("6\n")  # 12 MiB and up
    assert r.log_buffer_len(me) == maps_len(0, (128, 6))
    Path(patched_root, "sys/vm/defrag_size_threshold").write_text("5\n")
    Path(patched_root, "sys/vm/num_breakout_chunks").write_text("4\n")
    assert r.log_buffer_len(me) == maps_len(4)  # None: the sysctl as it is
    assert Ranger(335, proc_root=patched_root, breakout_chunks=0).log_buffer_len(me) == maps_len(0)
    assert Ranger(335, proc_root=patched_root, breakout_chunks=2).log_buffer_len(me) == maps_len(2)
    # no maps to read (the process is gone, say): the cap
    assert Ranger(335, proc_root=patched_root, buf_len=1 << 20).log_buffer_len(me) != 1 << 20
    Path(patched_root, str(me.pid), "maps").unlink()
    assert Ranger(335, proc_root=patched_root, buf_len=1 << 20).log_buffer_len(me) == 1 << 20


def test_defrag_gives_the_kernel_that_size_and_the_dump_the_cap(patched_root, monkeypatch, me):
    write_maps(patched_root, me.pid)
    r = Ranger(335, proc_root=patched_root)
    calls, _ = scripted(r, monkeypatch, [RFC_LOG.encode(), 0])
    done = r.defrag(me)
    assert [c[1] for c in calls] == [maps_len(0)] * 2
    assert (done.buf_len, done.truncated_calls, done.log.truncated) == (maps_len(0), 0, False)
    calls, _ = scripted(r, monkeypatch, [b"00000000a8b6e356, 0x1, 0x7f0000, 0x7f1000, -1\n", 0])
    r.contig_scan(me)
    assert [c[1] for c in calls] == [BUF_LEN] * 2  # a full dump would keep mmap_sem held


def full(lines: str, size: int) -> tuple[bytes, str]:
    """What the kernel returns when the log fills: `size` bytes, `lines` and as many more
    whole chunk lines as fit, then the cut line with its first byte a NUL (RFC04:
    stats_buf[pos] = '\\0'); and the whole lines of it."""
    text, k = lines, 16
    while True:
        line = rfc_chunk(B + k * MiB2, B + (k + 1) * MiB2, 512, migrated=512)
        if len(text) + len(line) >= size:
            break
        text, k = text + line, k + 1
    out = (text + "\0" + line[1:]).encode()[:size]
    assert len(out) == size
    return out, text


def test_a_full_log_is_counted_cut_at_its_last_line_and_the_next_call_gets_more(
    patched_root, monkeypatch, me, caplog
):
    """Measured on the RFC kernel: a full log buffer in action 3 returns buf_len, leaves
    no lock held and the pass goes on; only the lines that did not fit are lost."""
    write_maps(patched_root, me.pid)
    r = Ranger(335, proc_root=patched_root, breakout_chunks=2)
    size = maps_len(2)
    first = RFC_LOG[: RFC_LOG.index("[0x7f0000400000")]  # the vma line and three attempts
    last = RFC_LOG[len(first) :]
    answer, kept = full(first, size)
    calls, script = scripted(r, monkeypatch, [answer, last.encode(), 0])
    with caplog.at_level("WARNING", logger="memdefragd"):
        done = r.defrag(me)
    assert script == []
    assert [c[1] for c in calls] == [size, 2 * size, 2 * size]  # doubled after the full one
    assert (done.calls, done.complete, done.truncated_calls, done.buf_len) == (3, True, 1, size)
    assert done.log.truncated
    # the cut line is gone; the next call's lines parse on their own
    assert done.log.chunks == parse_defrag_log(kept + last).chunks
    assert len(done.log.chunks) == len(kept.splitlines())  # kept's, less its vma line, + 1
    assert r.truncated_calls == 1
    assert "filled its buffer" in caplog.text and f"pid {me.pid}" in caplog.text
    # the same process again: counted, but warned of once
    caplog.clear()
    scripted(r, monkeypatch, [answer, 0])
    with caplog.at_level("WARNING", logger="memdefragd"):
        assert r.defrag(me).truncated_calls == 1
    assert r.truncated_calls == 2 and "filled its buffer" not in caplog.text
    # the doubling stops at the cap
    r = Ranger(335, proc_root=patched_root, breakout_chunks=2, buf_len=size)
    calls, _ = scripted(r, monkeypatch, [answer, answer, 0])
    done = r.defrag(me)
    assert [c[1] for c in calls] == [size] * 3 and done.truncated_calls == 2
    # a buffer too small for a single chunk line: only the vma line is kept
    r = Ranger(335, proc_root=patched_root, buf_len=256)
    tiny = RFC_LOG.splitlines(keepends=True)[0] + "\0" + rfc_chunk(B, B + MiB2, 512)[1:]
    calls, _ = scripted(r, monkeypatch, [tiny.encode()[:256], 0])
    done = r.defrag(me)
    assert [c[1] for c in calls] == [256, 256]
    assert len(done.log.vmas) == 1 and done.log.chunks == () and done.log.truncated


def test_a_caller_may_ask_for_a_log_buffer_of_its_own(patched_root, monkeypatch, me):
    """log_len: that many bytes instead of the sized buffer, at most the cap."""
    write_maps(patched_root, me.pid)
    r = Ranger(335, proc_root=patched_root, buf_len=1 << 22)
    calls, _ = scripted(r, monkeypatch, [RFC_LOG.encode(), 0, RFC_LOG.encode(), 0, 0])
    assert r.defrag(me, log_len=1 << 20).buf_len == 1 << 20
    assert r.defrag(me, log_len=1 << 30).buf_len == 1 << 22  # the cap
    assert r.defrag(me, log=False, log_len=1 << 20).buf_len == 0  # no log, no buffer
    assert [c[1] for c in calls] == [1 << 20] * 2 + [1 << 22] * 2 + [0]
