"""Parsers of /proc and sysfs text (memdefragd.backends.kernel.procfs) over recorded and hand-made fixtures.

Every expected value below was read off the fixture file by eye; see tests/fixtures/README.md
for where each file comes from.
"""

from __future__ import annotations

import pytest

from memdefragd.backends.kernel.procfs import (
    PF_KTHREAD,
    ParseError,
    parse_buddyinfo,
    parse_cgroup,
    parse_knob,
    parse_pagetypeinfo,
    parse_pressure,
    parse_smaps,
    parse_stat,
    parse_status_uid,
    parse_vmstat,
    parse_zoneinfo,
)
from memdefragd.model import PMD_PAGES, MemoryState, Pressure, Vma, ZoneFree
from tests.paths import FIXTURES

KB = 1024


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def by_path(vmas: list[Vma], path: str) -> Vma:
    (vma,) = [v for v in vmas if v.path == path]
    return vma


def by_start(vmas: list[Vma], start: int) -> Vma:
    (vma,) = [v for v in vmas if v.start == start]
    return vma


SMAPS_FILES = [
    "recorded/smaps_python.txt",
    "handmade/smaps_names_6x.txt",
    "handmade/smaps_linux4.4.txt",
    "handmade/smaps_linux3.2.txt",
]


# --------------------------------------------------------------------------------------------
# smaps: recorded on Linux 6.18
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def py_smaps() -> list[Vma]:
    return parse_smaps(fixture("recorded/smaps_python.txt"))


def test_recorded_smaps_headers(py_smaps: list[Vma]) -> None:
    got = [(v.start, v.end, v.perms, v.offset, v.dev, v.inode, v.path) for v in py_smaps]
    assert got == [
        (
            0x55D0B1D91000,
            0x55D0B1D92000,
            "r--p",
            0,
            "fe:00",
            26723,
            "/root/.pyenv/versions/3.11.7/bin/python3.11",
        ),
        (0x55D0CF8E1000, 0x55D0CFAB5000, "rw-p", 0, "00:00", 0, "[heap]"),
        (0x7FBA98A00000, 0x7FBA98C00000, "rw-p", 0, "00:00", 0, ""),
        (0x7FBA98C00000, 0x7FBA98E00000, "rw-p", 0, "00:00", 0, ""),
        (0x7FBA98E00000, 0x7FBA98E40000, "rw-p", 0, "00:00", 0, ""),
        (0x7FBA99200000, 0x7FBA99600000, "rw-p", 0, "00:00", 0, ""),
        (
            0x7FBA99FAB000,
            0x7FBA99FAE000,
            "rw-s",
            0,
            "fe:00",
            2146505,
            "/tmp/rec/files/gone.bin (deleted)",
        ),
        (0x7FBA9AC28000, 0x7FBA9AC2A000, "r--s", 0, "fe:00", 2146503, "/tmp/rec/files/my file.so"),
        (0x7FBA9AC33000, 0x7FBA9AC37000, "r--p", 0, "00:00", 0, "[vvar]"),
        (0x7FBA9AC37000, 0x7FBA9AC39000, "r--p", 0, "00:00", 0, "[vvar_vclock]"),
        (0x7FBA9AC39000, 0x7FBA9AC3B000, "r-xp", 0, "00:00", 0, "[vdso]"),
        (0x7FFF9DFEF000, 0x7FFF9E010000, "rw-p", 0, "00:00", 0, "[stack]"),
        (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, "00:00", 0, "[vsyscall]"),
    ]


def test_recorded_smaps_no_path_header_keeps_empty_path(py_smaps: list[Vma]) -> None:
    # The kernel prints "... 00:00 0 " (trailing space) for a VMA without a name.
    raw = fixture("recorded/smaps_python.txt").splitlines()
    assert "7fba98a00000-7fba98c00000 rw-p 00000000 00:00 0 " in raw
    vma = by_start(py_smaps, 0x7FBA98A00000)
    assert vma.path == ""
    assert vma.anonymous
    assert not vma.deleted


def test_recorded_smaps_fields_in_bytes(py_smaps: list[Vma]) -> None:
    heap = by_path(py_smaps, "[heap]")
    assert heap.field("Size") == 1872 * KB
    assert heap.rss == 1788 * KB
    assert heap.field("Pss_Dirty") == 1788 * KB
    assert heap.field("KernelPageSize") == 4 * KB
    assert heap.field("THPeligible") == 0
    assert heap.field("NoSuchField", -7) == -7
    assert len(heap.fields) == 23

    thp = by_start(py_smaps, 0x7FBA99200000)
    assert thp.size == 4 << 20
    assert thp.rss == 4096 * KB
    assert thp.anon_huge == 4096 * KB
    assert thp.pmd_mapped == 4096 * KB
    assert thp.field("THPeligible") == 1  # a plain integer: not multiplied by 1024
    assert thp.vmflags == frozenset({"rd", "wr", "mr", "mw", "me", "ac", "hg"})

    stack = by_path(py_smaps, "[stack]")
    assert stack.rss == 60 * KB
    assert stack.vmflags == frozenset({"rd", "wr", "mr", "mw", "me", "gd", "ac"})


def test_recorded_smaps_deleted_and_spaces(py_smaps: list[Vma]) -> None:
    gone = by_start(py_smaps, 0x7FBA99FAB000)
    assert gone.path == "/tmp/rec/files/gone.bin (deleted)"
    assert gone.deleted
    assert not gone.anonymous
    assert gone.rss == 12 * KB
    assert gone.vmflags == frozenset({"rd", "wr", "sh", "mr", "mw", "me", "ms"})

    spaced = by_start(py_smaps, 0x7FBA9AC28000)
    assert spaced.path == "/tmp/rec/files/my file.so"
    assert not spaced.deleted
    assert not spaced.anonymous
    assert spaced.size == 8 * KB


@pytest.mark.parametrize(
    ("start", "eligible"),
    [
        (0x55D0CF8E1000, True),  # [heap]
        (0x7FBA99200000, True),  # THP region, hg
        (0x7FBA98C00000, True),  # plain anonymous
        (0x7FBA98E00000, False),  # nh: MADV_NOHUGEPAGE
        (0x7FBA9AC33000, False),  # [vvar]
        (0x7FBA9AC37000, False),  # [vvar_vclock]
        (0x7FBA9AC39000, False),  # [vdso]
        (0xFFFFFFFFFF600000, False),  # [vsyscall]
    ],
)
def test_recorded_smaps_collapse_eligible(py_smaps: list[Vma], start: int, eligible: bool) -> None:
    assert by_start(py_smaps, start).collapse_eligible is eligible


def test_recorded_smaps_nohugepage_flag(py_smaps: list[Vma]) -> None:
    nh = by_start(py_smaps, 0x7FBA98E00000)
    assert nh.vmflags is not None
    assert "nh" in nh.vmflags
    assert nh.rss == 64 * KB


def test_recorded_dontdump_vma_was_collapsed_so_is_eligible(py_smaps: list[Vma]) -> None:
    """'dd' (VM_DONTDUMP) does not stop MADV_COLLAPSE: this very VMA was collapsed by it."""
    dd = by_start(py_smaps, 0x7FBA98A00000)
    assert dd.vmflags is not None and "dd" in dd.vmflags
    assert dd.anon_huge == 2048 * KB  # the kernel did collapse it
    assert dd.collapse_eligible


# --------------------------------------------------------------------------------------------
# smaps: hand-made names and old kernels
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def names_smaps() -> list[Vma]:
    return parse_smaps(fixture("handmade/smaps_names_6x.txt"))


def test_handmade_smaps_paths(names_smaps: list[Vma]) -> None:
    assert [v.path for v in names_smaps] == [
        "[heap]",
        "[anon:some name]",
        "[anon:name with spaces]",
        "[anon_shmem:shared buf]",
        "",
        "",
        "/tmp/my file.so",
        "/srv/data/two  spaces.db",
        "/memfd:jit cache (deleted)",
        "/anon_hugepage (deleted)",
        "[stack]",
        "[vsyscall]",
    ]


def test_handmade_smaps_header_without_trailing_space(names_smaps: list[Vma]) -> None:
    raw = fixture("handmade/smaps_names_6x.txt").splitlines()
    assert "7f1234a00000-7f1234a01000 ---p 00000000 00:00 0" in raw
    guard = by_start(names_smaps, 0x7F1234A00000)
    assert (guard.end, guard.perms, guard.path) == (0x7F1234A01000, "---p", "")
    assert guard.rss == 0
    assert guard.vmflags == frozenset({"mr", "mw", "me"})


def test_handmade_smaps_anon_names(names_smaps: list[Vma]) -> None:
    some = by_path(names_smaps, "[anon:some name]")
    assert (some.start, some.end) == (0x7F1234400000, 0x7F1234600000)
    assert some.anonymous and not some.deleted
    assert some.anon_huge == 2048 * KB
    assert some.field("ProtectionKey", -1) == 0
    assert some.collapse_eligible

    spaced = by_path(names_smaps, "[anon:name with spaces]")
    assert spaced.rss == 1024 * KB
    assert spaced.vmflags is not None and "nh" in spaced.vmflags
    assert not spaced.collapse_eligible

    shmem = by_path(names_smaps, "[anon_shmem:shared buf]")
    assert shmem.inode == 3074
    assert shmem.dev == "00:01"
    assert shmem.anon_huge == 0
    assert shmem.pmd_mapped == 2048 * KB  # ShmemPmdMapped counts


def test_handmade_smaps_files(names_smaps: list[Vma]) -> None:
    so = by_path(names_smaps, "/tmp/my file.so")
    assert (so.offset, so.dev, so.inode) == (0x1000, "08:02", 131074)
    assert so.pmd_mapped == 2048 * KB  # FilePmdMapped counts
    assert not so.deleted

    memfd = by_path(names_smaps, "/memfd:jit cache (deleted)")
    assert memfd.deleted
    assert not memfd.anonymous
    assert memfd.rss == 64 * KB

    hugetlb = by_path(names_smaps, "/anon_hugepage (deleted)")
    assert hugetlb.deleted
    assert hugetlb.field("KernelPageSize") == 2048 * KB
    assert hugetlb.field("Private_Hugetlb") == 2048 * KB
    assert not hugetlb.collapse_eligible  # ht


def test_handmade_smaps_vsyscall(names_smaps: list[Vma]) -> None:
    vsys = by_path(names_smaps, "[vsyscall]")
    assert vsys.vmflags == frozenset({"ex"})
    assert not vsys.collapse_eligible


def test_linux44_smaps_without_new_fields() -> None:
    vmas = parse_smaps(fixture("handmade/smaps_linux4.4.txt"))
    assert [v.path for v in vmas] == [
        "/bin/cat",
        "[heap]",
        "",
        "[stack:1235]",
        "[stack]",
        "[vsyscall]",
    ]
    for v in vmas:
        assert len(v.fields) == 17
        for missing in ("THPeligible", "Pss_Dirty", "ProtectionKey", "ShmemPmdMapped", "KSM"):
            assert missing not in v.fields
        assert v.vmflags is not None
    anon = vmas[2]
    assert (anon.start, anon.end) == (0x7F3C2A000000, 0x7F3C2A400000)
    assert anon.anon_huge == 2048 * KB
    assert anon.pmd_mapped == 2048 * KB  # absent Shmem/FilePmdMapped read as 0
    assert anon.field("THPeligible") == 0
    assert vmas[0].vmflags == frozenset({"rd", "ex", "mr", "mw", "me", "dw"})
    assert vmas[0].field("SwapPss", -1) == 0
    assert [v.collapse_eligible for v in vmas] == [True, True, True, True, True, False]


def test_linux32_smaps_without_vmflags() -> None:
    vmas = parse_smaps(fixture("handmade/smaps_linux3.2.txt"))
    assert [(v.start, v.path) for v in vmas] == [
        (0x400000, "/bin/cat"),
        (0x7F1D0C000000, ""),
        (0x7FFF5B7E4000, "[stack]"),
        (0xFFFFFFFFFF600000, "[vsyscall]"),
    ]
    assert all(v.vmflags is None for v in vmas)
    assert all(len(v.fields) == 14 for v in vmas)
    anon = vmas[1]
    assert anon.rss == 6144 * KB
    assert anon.anon_huge == 4096 * KB
    # No VmFlags: nothing is known to forbid collapse, except the special mappings.
    assert [v.collapse_eligible for v in vmas] == [True, True, True, False]


@pytest.mark.parametrize("name", SMAPS_FILES)
def test_every_fixture_size_field_matches_header(name: str) -> None:
    vmas = parse_smaps(fixture(name))
    assert vmas
    for v in vmas:
        assert v.field("Size") == v.size == v.end - v.start
        assert v.rss <= v.size
        assert v.field("KernelPageSize") in (4 * KB, 2048 * KB)


@pytest.mark.parametrize("name", SMAPS_FILES)
def test_maps_text_parses_without_fields(name: str) -> None:
    """/proc/PID/maps is smaps without the field lines."""
    text = fixture(name)
    headers = "\n".join(line for line in text.splitlines() if not line[:1].isupper()) + "\n"
    from_maps = parse_smaps(headers)
    from_smaps = parse_smaps(text)
    assert [(v.start, v.end, v.perms, v.path) for v in from_maps] == [
        (v.start, v.end, v.perms, v.path) for v in from_smaps
    ]
    assert all(v.vmflags is None and dict(v.fields) == {} for v in from_maps)


def test_smaps_path_with_trailing_space_is_kept() -> None:
    # a /proc/self/maps line recorded on Linux 6.18 after mmap() of a file named "trail "
    # (only the temporary directory name shortened to /tmp/t)
    line = "7fb39ba78000-7fb39ba79000 r--s 00000000 fe:00 2146378" + " " * 20 + "/tmp/t/trail \n"
    (vma,) = parse_smaps(line)
    assert vma.path == "/tmp/t/trail "


def test_smaps_empty_and_blank_lines() -> None:
    assert parse_smaps("") == []
    text = "\n00400000-00401000 r-xp 00000000 08:01 12 /bin/x\n\nRss:  8 kB\n\n"
    (vma,) = parse_smaps(text)
    assert vma.path == "/bin/x"
    assert vma.rss == 8 * KB


def test_smaps_vmflags_empty_line_is_empty_set_not_none() -> None:
    (vma,) = parse_smaps("00400000-00401000 r-xp 00000000 08:01 12 /bin/x\nVmFlags: \n")
    assert vma.vmflags == frozenset()


@pytest.mark.parametrize(
    ("text", "lineno"),
    [
        ("this is not smaps\n", 1),
        ("Rss:  4 kB\n", 1),  # a field before any header
        ("00400000-00401000 r-xp 00000000 08:01 12 /bin/x\nRss: 4 kB\ngarbage here\n", 3),
        ("00400000-00401000 r-xp 00000000 08:01 12 /bin/x\n00401000-00402000 rw-p\n", 2),
        ("00400000-00401000 r-xp 00000000 08:01 12 /bin/x\n0040zzzz-00402000 rw-p 0 0:0 0\n", 2),
    ],
)
def test_smaps_garbage_raises_parse_error_naming_the_line(text: str, lineno: int) -> None:
    with pytest.raises(ParseError, match=rf"line {lineno}\b"):
        parse_smaps(text)


# --------------------------------------------------------------------------------------------
# Vma.collapse_eligible against the kernel's VmFlags rules
# --------------------------------------------------------------------------------------------


def _vma(path: str = "", vmflags: frozenset[str] | None = None) -> Vma:
    return Vma(0x7F0000000000, 0x7F0000200000, "rw-p", 0, "00:00", 0, path, vmflags=vmflags)


BASE_FLAGS = {"rd", "wr", "mr", "mw", "me", "ac"}


@pytest.mark.parametrize("flag", ["nh", "ht", "pf", "io", "de", "mm"])
def test_flag_that_blocks_collapse(flag: str) -> None:
    # include/linux/mm.h: VM_NO_KHUGEPAGED = VM_SPECIAL | VM_HUGETLB, with VM_SPECIAL =
    # VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP; VM_NOHUGEPAGE also disables collapse
    # (vma_thp_disabled). Mnemonics from fs/proc/task_mmu.c show_smap_vma_flags().
    assert _vma(vmflags=frozenset(BASE_FLAGS | {flag})).collapse_eligible is False


@pytest.mark.parametrize(
    "flag",
    [
        "hg",
        "gd",
        "sh",
        "ms",
        "lo",
        "dc",
        "wf",
        "mg",
        "dd",  # VM_DONTDUMP: see test_recorded_dontdump_vma_was_collapsed_so_is_eligible
    ],
)
def test_flag_that_does_not_block_collapse(flag: str) -> None:
    assert _vma(vmflags=frozenset(BASE_FLAGS | {flag})).collapse_eligible is True


@pytest.mark.parametrize("path", ["[vsyscall]", "[vvar]", "[vdso]", "[vvar_vclock]"])
def test_special_mappings_never_collapse_even_without_vmflags(path: str) -> None:
    assert _vma(path=path, vmflags=None).collapse_eligible is False


@pytest.mark.parametrize(
    ("path", "deleted", "anonymous"),
    [
        ("/tmp/x (deleted)", True, False),
        ("/memfd:a (deleted) (deleted)", True, False),
        ("/var/lib/app/deleted-items.db", False, False),
        ("/tmp/x(deleted)", False, False),
        ("/tmp/(deleted)/lib.so", False, False),
        ("[anon:deleted]", False, True),
        ("", False, True),
    ],
)
def test_vma_deleted_and_anonymous(path: str, deleted: bool, anonymous: bool) -> None:
    vma = _vma(path=path)
    assert vma.deleted is deleted
    assert vma.anonymous is anonymous


def test_unknown_vmflags_do_not_block() -> None:
    assert _vma(path="[heap]", vmflags=None).collapse_eligible is True
    assert _vma(path="[anon:x]", vmflags=frozenset()).collapse_eligible is True


# --------------------------------------------------------------------------------------------
# stat, status
# --------------------------------------------------------------------------------------------


def test_parse_stat_recorded_python() -> None:
    assert parse_stat(fixture("recorded/stat_python.txt")) == {
        "pid": 4446,
        "comm": "python3",
        "state": "R",
        "ppid": 4401,
        "flags": 4194304,
        "minflt": 3553,
        "majflt": 0,
        "start_time": 92943,
        "vsize": 36581376,
        "rss_pages": 5131,
    }


def test_parse_stat_recorded_comm_with_parens_and_spaces() -> None:
    st = parse_stat(fixture("recorded/stat_comm_parens.txt"))
    assert st["comm"] == "(a) b)"
    assert st["pid"] == 4938
    assert st["state"] == "R"
    assert st["ppid"] == 4936
    assert st["start_time"] == 95030
    assert st["rss_pages"] == 3361
    assert not int(st["flags"]) & PF_KTHREAD


def test_parse_stat_comm_cannot_forge_log_lines_and_errors_quote_nothing() -> None:
    """stat prints comm unescaped: a process named "x\\nERROR y" must not start a log line."""
    text = fixture("recorded/stat_comm_parens.txt").replace("(a) b)", "(x\nERROR\x1b[2J y)")
    assert parse_stat(text)["comm"] == "(x?ERROR?[2J y)"
    with pytest.raises(ParseError) as e:
        parse_stat("4938 secret-looking-text R 1")
    assert "secret" not in str(e.value)


def test_parse_stat_recorded_kthread() -> None:
    st = parse_stat(fixture("recorded/stat_kthreadd.txt"))
    assert (st["pid"], st["comm"], st["state"], st["ppid"]) == (2, "kthreadd", "S", 0)
    assert st["flags"] == 2129984
    assert int(st["flags"]) & PF_KTHREAD
    assert (st["start_time"], st["rss_pages"]) == (30, 0)


def _stat_line(pid: int, comm: str, start_time: int, rss: int) -> str:
    # fields 3..52 of a 6.x stat line; field N is at index N - 3
    rest = ["S", "1", "1", "1", "0", "-1", "4194560"] + ["0"] * 43
    rest[22 - 3] = str(start_time)
    rest[24 - 3] = str(rss)
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


@pytest.mark.parametrize(
    "comm", [") R 1 2 (x", "a b", "((", "))", "", "x) S 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9"]
)
def test_parse_stat_handmade_hostile_comm(comm: str) -> None:
    st = parse_stat(_stat_line(321, comm, start_time=123456, rss=789))
    assert st["comm"] == comm
    assert (st["pid"], st["state"], st["ppid"], st["flags"]) == (321, "S", 1, 4194560)
    assert (st["start_time"], st["rss_pages"]) == (123456, 789)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1234 python3 S 1 2 3",  # no parentheses
        "1234 (python3 S 1 2 3",  # unclosed
        "1234 (python3) S 1 2 3 4 5 6 7 8 9 10",  # truncated before field 24
    ],
)
def test_parse_stat_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_stat(text)


def test_parse_status_uid() -> None:
    assert parse_status_uid(fixture("recorded/status_python.txt")) == 0
    assert parse_status_uid(fixture("recorded/status_nobody.txt")) == 65534
    assert parse_status_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n") == 1000  # real, not effective
    with pytest.raises(ParseError):
        parse_status_uid("Name:\tx\nGid:\t0\t0\t0\t0\n")


# --------------------------------------------------------------------------------------------
# cgroup
# --------------------------------------------------------------------------------------------


def test_parse_cgroup_v2() -> None:
    assert (
        parse_cgroup(fixture("handmade/cgroup_v2.txt")) == "/system.slice/memdefragd-target.service"
    )
    assert parse_cgroup("0::/a/b\n") == "/a/b"
    assert parse_cgroup("0::/a/b:c\n") == "/a/b:c"  # a ':' in the path stays


def test_parse_cgroup_v1_prefers_name_systemd() -> None:
    text = fixture("handmade/cgroup_v1.txt")
    want = "/system.slice/postgresql.service/main"
    assert parse_cgroup(text) == want
    # the order of the lines does not matter
    assert parse_cgroup("\n".join(reversed(text.splitlines()))) == want


def test_parse_cgroup_v1_falls_back_to_memory() -> None:
    assert parse_cgroup(fixture("handmade/cgroup_v1_no_systemd.txt")) == "/docker/3f1c2a9b7e"


def test_parse_cgroup_hybrid_recorded_takes_unified() -> None:
    assert parse_cgroup(fixture("recorded/cgroup_hybrid.txt")) == "/"


def test_parse_cgroup_nothing_usable() -> None:
    assert parse_cgroup("") == ""
    assert parse_cgroup("3:cpuset:/x\n2:pids:/y\n") == ""


# --------------------------------------------------------------------------------------------
# buddyinfo, pagetypeinfo
# --------------------------------------------------------------------------------------------


def test_parse_buddyinfo_recorded() -> None:
    assert parse_buddyinfo(fixture("recorded/buddyinfo.txt")) == [
        ZoneFree(0, "DMA", (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 3)),
        ZoneFree(0, "DMA32", (1, 2, 4, 2, 5, 4, 3, 3, 4, 2, 752)),
        ZoneFree(0, "Normal", (1, 1, 1, 1, 0, 1, 0, 1, 5, 1, 11)),
    ]


def test_parse_buddyinfo_numa() -> None:
    zones = parse_buddyinfo(fixture("handmade/buddyinfo_numa.txt"))
    assert [(z.node, z.zone) for z in zones] == [
        (0, "DMA"),
        (0, "DMA32"),
        (0, "Normal"),
        (1, "Normal"),
        (1, "Movable"),
    ]
    assert zones[2].free == (40213, 21877, 9820, 3012, 811, 204, 51, 12, 3, 0, 0)
    assert zones[3].free[10] == 2104
    assert zones[4].free == (0,) * 11


@pytest.mark.parametrize(
    ("text", "lineno"),
    [
        ("hello\n", 1),
        ("Node 0, zone DMA 1 2 3\nNode 0 zone Normal 1 2 3\n", 2),
        ("Node 0, zone DMA 1 2 3\n\nfree pages: lots\n", 3),
    ],
)
def test_parse_buddyinfo_garbage_line(text: str, lineno: int) -> None:
    with pytest.raises(ParseError, match=rf"line {lineno}\b"):
        parse_buddyinfo(text)


def test_parse_buddyinfo_non_numeric_count_is_parse_error() -> None:
    with pytest.raises(ParseError, match=r"line 2\b"):
        parse_buddyinfo("Node 0, zone DMA 1 2 3\nNode 0, zone Normal 4 5 x6\n")


def test_parse_pagetypeinfo_recorded() -> None:
    pt = parse_pagetypeinfo(fixture("recorded/pagetypeinfo.txt"))
    types = ("Unmovable", "Movable", "Reclaimable", "HighAtomic", "Isolate")
    assert set(pt) == {(0, z, t) for z in ("DMA", "DMA32", "Normal") for t in types}
    assert pt[(0, "DMA32", "Movable")] == (1, 2, 4, 2, 5, 4, 3, 3, 4, 2, 752)
    assert pt[(0, "Normal", "Unmovable")] == (0, 1, 1, 1, 0, 1, 0, 0, 3, 0, 0)
    assert pt[(0, "Normal", "Reclaimable")] == (0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0)
    assert pt[(0, "DMA", "Isolate")] == (0,) * 11


def test_pagetypeinfo_sums_to_buddyinfo_recorded() -> None:
    """The two files were read back to back: free blocks per type add up to the zone's."""
    pt = parse_pagetypeinfo(fixture("recorded/pagetypeinfo.txt"))
    for zone in parse_buddyinfo(fixture("recorded/buddyinfo.txt")):
        rows = [c for (n, z, _), c in pt.items() if (n, z) == (zone.node, zone.zone)]
        assert tuple(map(sum, zip(*rows, strict=True))) == zone.free


def test_parse_pagetypeinfo_handmade_plain_rows() -> None:
    pt = parse_pagetypeinfo(fixture("handmade/pagetypeinfo_overflow.txt"))
    assert pt[(0, "Normal", "Unmovable")] == (1520, 830, 412, 96, 20, 4, 1, 0, 0, 0, 0)
    assert pt[(0, "DMA32", "Movable")] == (12, 9, 7, 5, 4, 4, 3, 3, 2, 2, 620)
    assert pt[(0, "Normal", "CMA")] == (0,) * 11
    assert pt[(1, "Normal", "Unmovable")] == (884, 501, 120, 33, 9, 2, 0, 0, 0, 0, 0)


def test_parse_pagetypeinfo_capped_counts_are_kept() -> None:
    pt = parse_pagetypeinfo(fixture("handmade/pagetypeinfo_overflow.txt"))
    assert len(pt) == 24  # 4 zones x 6 types, none lost
    assert pt[(0, "Normal", "Movable")] == (100000, 64211, 20117, 3301, 877, 140, 22, 5, 1, 0, 0)
    assert pt[(1, "Normal", "Movable")][:3] == (100000, 100000, 47011)


# --------------------------------------------------------------------------------------------
# vmstat, pressure, knobs
# --------------------------------------------------------------------------------------------


def test_parse_vmstat_default_prefixes() -> None:
    vm = parse_vmstat(fixture("recorded/vmstat.txt"))
    assert len(vm) == 34
    assert all(k.startswith(("thp_", "compact_")) for k in vm)
    assert vm["thp_collapse_alloc"] == 65
    assert vm["thp_fault_alloc"] == 8
    assert vm["compact_stall"] == 0
    assert vm["thp_swpout_fallback"] == 0
    assert "nr_anon_transparent_hugepages" not in vm
    assert "nr_free_pages" not in vm


def test_parse_vmstat_custom_prefixes() -> None:
    vm = parse_vmstat(fixture("recorded/vmstat.txt"), prefixes=("nr_free_pages", "pgmajfault"))
    # prefixes, not names: nr_free_pages_blocks (new in 6.x) comes along
    assert vm == {"nr_free_pages": 790004, "nr_free_pages_blocks": 786432, "pgmajfault": 1134}
    assert parse_vmstat("thp_x 3\nthp_y\nthp_z 1 2\n") == {"thp_x": 3}


def test_parse_pressure_recorded_idle() -> None:
    zero = Pressure(0.0, 0.0, 0.0, 0)
    assert parse_pressure(fixture("recorded/pressure_memory.txt")) == {"some": zero, "full": zero}


def test_parse_pressure_busy() -> None:
    assert parse_pressure(fixture("handmade/pressure_memory_busy.txt")) == {
        "some": Pressure(1.53, 0.87, 0.21, 58761459),
        "full": Pressure(0.72, 0.35, 0.08, 26117374),
    }


@pytest.mark.parametrize(
    "text",
    [
        "some avg10=0.00 avg60=0.00 avg300=0.00\n",  # no total
        "some avg10=x avg60=0.00 avg300=0.00 total=0\n",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=1.5\n",
        "garbage\n",
    ],
)
def test_parse_pressure_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_pressure(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("always [madvise] never", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always defer defer+madvise [madvise] never\n", "madvise"),
        ("511\n", "511"),
        ("  4096  \n", "4096"),
    ],
)
def test_parse_knob(text: str, want: str) -> None:
    assert parse_knob(text) == want


def test_parse_knob_recorded() -> None:
    assert parse_knob(fixture("recorded/thp_enabled.txt")) == "madvise"
    assert parse_knob(fixture("recorded/thp_defrag.txt")) == "madvise"
    assert parse_knob(fixture("recorded/thp_shmem_enabled.txt")) == "never"
    assert parse_knob(fixture("recorded/khugepaged_max_ptes_none.txt")) == "511"


def test_memory_state_max_ptes_none_from_knob() -> None:
    def state(khugepaged: dict[str, str]) -> MemoryState:
        return MemoryState((), None, {}, {}, khugepaged, None, None)

    knob = parse_knob(fixture("recorded/khugepaged_max_ptes_none.txt"))
    assert state({"max_ptes_none": knob}).max_ptes_none == 511
    assert state({"max_ptes_none": "0"}).max_ptes_none == 0
    assert state({}).max_ptes_none == PMD_PAGES - 1
    assert state({"max_ptes_none": "bogus"}).max_ptes_none == PMD_PAGES - 1


def test_parse_zoneinfo_keeps_populated_zones():
    text = (
        "Node 0, zone      DMA\n  pages free     3840\n        spanned  4095\n"
        "        present  3998\n        managed  3840\n  start_pfn:           1\n"
        "Node 0, zone   Normal\n        spanned  5505024\n        present  5505024\n"
        "        managed  1638400\n  start_pfn:           1048576\n"
        "Node 0, zone  Movable\n  pages free     0\n        spanned  0\n        present  0\n"
    )
    assert parse_zoneinfo(text) == [
        (0, "DMA", 1, 4095, 3998, 3840),
        (0, "Normal", 1048576, 5505024, 5505024, 1638400),
    ]
