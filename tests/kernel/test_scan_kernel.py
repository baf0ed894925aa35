"""The kernel backend against the real kernel, with figures checked two ways.

Every test starts its own child process with one anonymous mapping of known shape (see
tools/child.py) and never looks at a process it did not start, except to check that
kernel threads are left out of the process list. Tests skip only where the kernel refuses
(no PFNs, MADV_COLLAPSE failing, no /proc/kpageflags); MEMDEFRAGD_REQUIRE_KERNEL=1 turns
those skips into failures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import memdefragd.backends.kernel.backend as kernel_backend
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.model import ProcessGone
from memdefragd.pipeline.score import vma_metrics
from memdefragd.pipeline.targets import MAX_CMDLINE
from tests.paths import REPO

from .helpers import (
    MADV_DONTDUMP,
    NO_SCAN_NO_CAP_THP_BUG,
    PAGE,
    PMD,
    PMD_PAGES,
    MiB,
    brute_contiguity,
    brute_regions,
    brute_runs,
    proc_state,
    require_kernel,
    stable_read,
    stat_start_time,
)

pytestmark = pytest.mark.kernel

THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage")
PF_KTHREAD = 0x00200000


def require_collapsed(child) -> None:
    require_kernel(
        child.collapse_errno == 0, f"MADV_COLLAPSE in the child failed: {child.collapse_error}"
    )


def the_vma(backend, proc, child):
    """The child's mapping as list_vmas reports it: exactly [addr, addr + size)."""
    vmas = backend.list_vmas(proc)
    mine = [v for v in vmas if v.start < child.end and v.end > child.addr]
    assert [(v.start, v.end) for v in mine] == [(child.addr, child.end)]
    return mine[0]


def scan(backend, child):
    """(vma, layout, metrics) of the child's mapping, with max_ptes_none from the kernel."""
    proc = backend.process(child.pid)
    vma = the_vma(backend, proc, child)
    layout = backend.read_layouts(proc, [vma])[0]
    metrics = vma_metrics(
        layout,
        max_ptes_none=backend.memory_state().max_ptes_none,
        collapse_eligible=vma.collapse_eligible,
    )
    return vma, layout, metrics


@pytest.fixture(params=["scan", "sparse", "dense", "windowed", "fallback"])
def any_backend(request):
    """KernelBackend on every read path: automatic, PAGEMAP_SCAN of present ranges first
    (sparse), straight reads with PAGEMAP_SCAN of THP candidates only (dense), and the
    /proc/kpageflags fallback of kernels without PAGEMAP_SCAN; and with 4 MiB windows, so
    that a VMA is read in many pieces."""
    if request.param == "scan":
        return request.getfixturevalue("backend")
    if request.param in ("sparse", "dense", "windowed"):
        kw = {"window_pages": 2 * PMD_PAGES} if request.param == "windowed" else {}
        b = KernelBackend(density=request.param if request.param != "windowed" else "auto", **kw)
        request.addfinalizer(b.close)
        return b
    request.getfixturevalue("pfns")  # the fallback finds THPs from frame numbers
    return request.getfixturevalue("fallback_backend")


# ---- THP figures --------------------------------------------------------------------


@pytest.mark.needs_collapse
def test_half_collapsed_mapping_thp_figures(spawn, any_backend):
    child = spawn(64 * MiB, collapse=(0, 32 * MiB))
    require_collapsed(child)

    vma, layout, m = scan(any_backend, child)

    assert vma.anon_huge == 32 * MiB  # the kernel's own count (smaps AnonHugePages)
    assert m.thp_pages * PAGE == vma.anon_huge
    assert m.present_pages == 64 * MiB // PAGE
    assert m.aligned_regions == 32
    assert m.thp_regions == 16
    assert m.thp_coverage == 0.5
    assert m.collapsible_regions == 16  # the 4 KiB half: 512 present pages per region
    # and the THP pages are exactly the collapsed half
    mid = (child.addr + 32 * MiB) // PAGE
    np.testing.assert_array_equal(layout.thp, layout.vpn < mid)


@pytest.mark.parametrize(
    "use_scan",
    [
        True,
        pytest.param(
            False,
            marks=pytest.mark.xfail(
                strict=True,
                reason="known limitation of kernels without PAGEMAP_SCAN (< 6.7): "
                "/proc/kpageflags marks a THP folio the same whether it is mapped by a PMD "
                "or by PTEs, so the fallback counts a PTE-mapped 2 MiB folio as THP",
            ),
        ),
    ],
    ids=["scan", "fallback"],
)
@pytest.mark.needs_collapse
def test_pte_mapped_thp_is_not_counted_as_thp(spawn, pfns, use_scan):
    """A 2 MiB folio whose PMD was split into PTEs (same frames, still contiguous and
    aligned) is not PMD-mapped: smaps leaves it out of AnonHugePages, and the metrics must
    agree; it is exactly what aligned_contiguous_regions is for."""
    require_kernel(os.access("/proc/kpageflags", os.R_OK), "/proc/kpageflags is not readable")
    child = spawn(8 * MiB, collapse=(0, 8 * MiB), split=[2 * MiB + 5 * PAGE])
    require_collapsed(child)
    b = KernelBackend(use_scan=use_scan)
    try:
        no_scan = b.pagemap_scan_refusal()
        entries, (vma, _layout, m) = stable_read(
            child.pid, child.addr, child.end, lambda: scan(b, child)
        )
    finally:
        b.close()

    regions = brute_regions(entries, child.addr, child.end)
    # all four regions are 2 MiB folios; the second is mapped by PTEs
    assert [r["present"] for r in regions] == [PMD_PAGES] * 4
    assert vma.anon_huge == 6 * MiB
    if use_scan and no_scan is not None:
        # A kernel without PAGEMAP_SCAN (< 6.7, e.g. Debian's 6.1 in tests/vm): memdefragd
        # says so, reads through the kpageflags fallback, and the documented limit shows
        # for real: the PTE-mapped folio counts as THP.
        assert "PAGEMAP_SCAN" in no_scan and "PTE-mapped" in no_scan
        assert not b.use_scan
        assert m.thp_regions == 4
        assert m.thp_pages * PAGE == vma.anon_huge + 2 * MiB
        return
    assert m.thp_pages * PAGE == vma.anon_huge
    assert m.thp_regions == 3
    assert m.aligned_contiguous_regions == 1
    assert m.collapsible_regions == 1


# ---- contiguity against a brute-force reading of pagemap ------------------------------


@pytest.mark.needs_collapse
def test_contiguity_matches_brute_force(spawn, any_backend, pfns):
    size = 64 * MiB
    child = spawn(
        size,
        # THPs in [0, 16M); 4 KiB pages elsewhere, with holes of every kind: one page in 97
        # over [16M, 28M), nothing in [40M, 44M) (wider than a region), and a 16-page hole
        # at 50M (narrower than pagemap.py's gap threshold)
        touch=[(0, 40 * MiB), (44 * MiB, 6 * MiB), (50 * MiB + 64 * 1024, 14 * MiB - 64 * 1024)],
        punch=[(16 * MiB, 12 * MiB, 97)],
        collapse=(0, 16 * MiB),
    )
    require_collapsed(child)

    entries, (vma, layout, m) = stable_read(
        child.pid, child.addr, child.end, lambda: scan(any_backend, child)
    )
    require_kernel(layout.pfn_known, "pagemap shows zero page frame numbers")

    # the layout itself: every present page, its frame, nothing else
    assert layout.vpn.tolist() == [v for v, _ in entries]
    assert layout.pfn.tolist() == [p for _, p in entries]
    expected_pages = (size - 4 * MiB - 64 * 1024) // PAGE - len(range(0, 12 * MiB // PAGE, 97))
    assert m.present_pages == len(entries) == expected_pages

    runs = brute_runs(entries)
    want = brute_contiguity(runs)
    c = m.contiguity
    values, counts = m.run_hist
    assert np.repeat(values, counts).tolist() == sorted(runs)
    assert c.runs == want["runs"]
    assert c.largest_run == want["largest_run"]
    assert c.mean_run == pytest.approx(want["mean_run"], rel=1e-12)
    assert c.coverage == pytest.approx(want["coverage"], rel=1e-12)
    assert c.runs_for == want["runs_for"]
    assert c.largest_run >= PMD_PAGES  # a THP is one run at least

    # regions: no PMD was split here, so a THP head frame means a PMD mapping (and smaps
    # agrees on the count)
    regions = brute_regions(entries, child.addr, child.end)
    need = max(PMD_PAGES - any_backend.memory_state().max_ptes_none, 1)
    assert m.aligned_regions == len(regions) == 32
    assert [r["thp"] for r in regions] == [True] * 8 + [False] * 24
    assert m.thp_regions == 8 == vma.anon_huge // PMD
    assert m.thp_pages == 8 * PMD_PAGES
    assert m.aligned_contiguous_regions == sum(r["aligned_contiguous"] for r in regions)
    assert m.collapsible_regions == sum(not r["thp"] and r["present"] >= need for r in regions)


def _release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


@pytest.mark.needs_collapse
def test_pagemap_scan_support_is_said_and_the_fallback_taken(spawn, pfns):
    """PAGEMAP_SCAN came in Linux 6.7: memdefragd finds it there, and elsewhere (Debian's
    6.1 in tests/vm) says it is missing and reads through /proc/kpageflags instead, with
    the same THP figures for a workload without PTE-mapped folios."""
    child = spawn(16 * MiB, collapse=(0, 8 * MiB))
    require_collapsed(child)
    b = KernelBackend()
    try:
        reason = b.pagemap_scan_refusal()
        _, _, m = scan(b, child)
    finally:
        b.close()
    if _release() >= (6, 7):
        assert reason is None
        assert b.use_scan
    else:
        assert reason is not None and "PAGEMAP_SCAN" in reason and "kpageflags" in reason
        assert not b.use_scan
    assert m.thp_pages == 8 * MiB // PAGE
    assert m.thp_regions == 4


@pytest.mark.parametrize("density", ["sparse", "dense"])
@pytest.mark.needs_collapse
def test_fallback_and_scan_agree(spawn, fallback_backend, pfns, density):
    child = spawn(32 * MiB, collapse=(4 * MiB, 8 * MiB), punch=[(20 * MiB, 8 * MiB, 13)])
    require_collapsed(child)
    backend = KernelBackend(density=density)

    def both():
        return scan(backend, child), scan(fallback_backend, child)

    _, ((_, a, ma), (_, b, mb)) = stable_read(child.pid, child.addr, child.end, both)
    np.testing.assert_array_equal(a.vpn, b.vpn)
    np.testing.assert_array_equal(a.pfn, b.pfn)
    np.testing.assert_array_equal(a.thp, b.thp)
    assert ma.thp_pages == mb.thp_pages == 8 * MiB // PAGE
    assert ma.contiguity == mb.contiguity
    assert ma.collapsible_regions == mb.collapsible_regions


# ---- PFN visibility -----------------------------------------------------------------

NO_CAP_SCRIPT = r"""
import json, sys
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.pipeline.score import vma_metrics

pid, addr = int(sys.argv[1]), int(sys.argv[2])
cap_eff = next(int(l.split()[1], 16) for l in open("/proc/self/status") if l.startswith("CapEff:"))
b = KernelBackend()
vis = b.pfn_visibility()
proc = b.process(pid)
vma = next(v for v in b.list_vmas(proc) if v.start == addr)
lay = b.read_layouts(proc, [vma])[0]
m = vma_metrics(lay, max_ptes_none=b.memory_state().max_ptes_none)
print(json.dumps({
    "cap_sys_admin": bool(cap_eff >> 21 & 1),
    "visible": vis.visible,
    "reason": vis.reason,
    "pfn_known": lay.pfn_known,
    "pfn_nonzero": int((lay.pfn != 0).sum()),
    "present_pages": m.present_pages,
    "thp_pages": m.thp_pages,
    "anon_huge": vma.anon_huge,
    "contiguity": None if m.contiguity is None else m.contiguity.runs,
    "aligned_contiguous_regions": m.aligned_contiguous_regions,
    "run_hist": None if m.run_hist is None else len(m.run_hist[0]),
}))
"""


def _without_cap_sys_admin(argv: list[str]) -> list[str]:
    if shutil.which("setpriv"):
        return [
            "setpriv",
            "--inh-caps=-sys_admin",
            "--bounding-set=-sys_admin",
            *argv,
        ]
    if shutil.which("capsh"):
        return ["capsh", "--drop=cap_sys_admin", "--", "-c", 'exec "$0" "$@"', *argv]
    pytest.skip("neither setpriv nor capsh is installed")


@NO_SCAN_NO_CAP_THP_BUG
@pytest.mark.needs_collapse
def test_no_cap_sys_admin_hides_pfns_but_not_thps(spawn):
    child = spawn(16 * MiB, collapse=(0, 8 * MiB))
    require_collapsed(child)
    argv = _without_cap_sys_admin(
        [sys.executable, "-c", NO_CAP_SCRIPT, str(child.pid), str(child.addr)]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)

    assert got["cap_sys_admin"] is False  # the drop worked
    assert got["visible"] is False
    assert "CAP_SYS_ADMIN" in got["reason"]
    assert got["pfn_known"] is False
    assert got["pfn_nonzero"] == 0  # the kernel really zeroes them
    assert got["contiguity"] is None
    assert got["run_hist"] is None
    assert got["aligned_contiguous_regions"] is None
    # PAGEMAP_SCAN needs no CAP_SYS_ADMIN: THPs are still known exactly
    assert got["present_pages"] == 16 * MiB // PAGE
    assert got["anon_huge"] == 8 * MiB
    assert got["thp_pages"] * PAGE == 8 * MiB


# ---- processes that go away -----------------------------------------------------------


@pytest.mark.parametrize("use_scan", [True, False], ids=["scan", "fallback"])
def test_exit_between_list_vmas_and_read_layouts(spawn, use_scan):
    child = spawn(8 * MiB)

    class KillAfterListing(KernelBackend):
        def list_vmas(self, proc):
            vmas = super().list_vmas(proc)
            child.kill(reap=True)
            return vmas

    b = KillAfterListing(use_scan=use_scan)
    try:
        proc = b.process(child.pid)
        vmas = b.list_vmas(proc)
        assert any(v.start == child.addr for v in vmas)
        with pytest.raises(ProcessGone):
            b.read_layouts(proc, vmas)
    finally:
        b.close()


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
@pytest.mark.parametrize(
    ("use_scan", "hook"),
    [(True, "_scan"), (True, "_read_span"), (False, "_read_span")],
    ids=["scan-before-ioctl", "scan-before-pread", "fallback-before-pread"],
)
def test_exit_while_reading_pagemap(spawn, monkeypatch, use_scan, hook, reap):
    """The child dies after read_layouts opened its pagemap: before the PAGEMAP_SCAN
    ioctl, or between it and the pagemap reads."""
    child = spawn(8 * MiB)
    calls = []
    original = getattr(kernel_backend.PagemapReader, hook)

    class KillingReader(kernel_backend.PagemapReader):
        pass

    def killing(self, *args):
        if not calls:
            child.kill(reap=reap)
        calls.append(args)
        return original(self, *args)

    setattr(KillingReader, hook, killing)
    monkeypatch.setattr(kernel_backend, "PagemapReader", KillingReader)
    b = KernelBackend(use_scan=use_scan, density="sparse" if use_scan else "auto")
    try:
        proc = b.process(child.pid)
        vmas = b.list_vmas(proc)
        with pytest.raises(ProcessGone):
            b.read_layouts(proc, vmas)
    finally:
        b.close()
    assert calls, f"{hook} was never called"
    if not reap:
        assert proc_state(child.pid) == "Z"


def test_zombie_list_vmas(spawn, backend):
    child = spawn(8 * MiB)
    proc = backend.process(child.pid)
    child.kill(reap=False)
    assert proc_state(child.pid) == "Z"
    with pytest.raises(ProcessGone):
        backend.list_vmas(proc)


def test_zombie_read_layouts_fallback(spawn, fallback_backend):
    # Only the fallback path: a pagemap fd opened on a zombie carries no mm at all, and a
    # test should not be the one to find a kernel whose PAGEMAP_SCAN ioctl trips on that
    # (the syzbot report behind the NULL-mm check in do_pagemap_cmd). The scan path is
    # covered above for an fd opened before the exit, where 6.18 answers ESRCH.
    child = spawn(8 * MiB)
    proc = fallback_backend.process(child.pid)
    vmas = fallback_backend.list_vmas(proc)
    child.kill(reap=False)
    assert proc_state(child.pid) == "Z"
    with pytest.raises(ProcessGone):
        fallback_backend.read_layouts(proc, vmas)


def test_pid_with_other_start_time_is_gone(spawn, backend):
    child = spawn(8 * MiB)
    proc = backend.process(child.pid)
    vmas = backend.list_vmas(proc)  # the real identity works
    other = dataclasses.replace(proc, start_time=proc.start_time + 1)
    with pytest.raises(ProcessGone):
        backend.list_vmas(other)
    with pytest.raises(ProcessGone):
        backend.read_layouts(other, vmas)
    assert backend.read_layouts(proc, vmas)  # and the process itself is still fine


# ---- process list and system state ----------------------------------------------------


def test_list_processes(spawn, backend):
    # Spaces and parentheses in comm; a command line longer than a `cmdline` pattern sees.
    child = spawn(16 * MiB, comm="mdd (t) child", padding=MAX_CMDLINE)
    procs = {p.pid: p for p in backend.list_processes()}

    p = procs[child.pid]
    assert p.comm == "mdd (t) child"
    # Read as far as a `cmdline` pattern sees.
    full = "\0".join(child.popen.args).encode()
    assert len(full) > MAX_CMDLINE
    assert "\0".join(p.cmdline).encode() == full[:MAX_CMDLINE]
    assert p.exe == os.path.realpath(sys.executable)
    assert p.uid == os.getuid()
    assert p.rss >= 16 * MiB
    assert p.start_time == stat_start_time(child.pid)
    assert os.getpid() in procs

    assert 2 not in procs  # kthreadd
    assert "kthreadd" not in {q.comm for q in procs.values()}
    for pid in procs:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited since
        flags = int(text[text.rindex(")") + 2 :].split()[6])
        assert not flags & PF_KTHREAD, f"kernel thread {pid} listed"
    with pytest.raises(ProcessGone):
        backend.process(2)


def test_memory_state(backend):
    state = backend.memory_state()

    buddy = Path("/proc/buddyinfo").read_text().split("\n")
    want_zones = [
        (int(m[1]), m[2], len(m[3].split()))
        for line in buddy
        if (m := re.match(r"Node\s+(\d+),\s+zone\s+(\S+)\s+(.*)", line))
    ]
    assert state.zones
    assert [(z.node, z.zone, len(z.free)) for z in state.zones] == want_zones

    max_ptes_none = int((THP_SYSFS / "khugepaged/max_ptes_none").read_text())
    assert state.max_ptes_none == max_ptes_none
    enabled = re.search(r"\[(\w+)\]", (THP_SYSFS / "enabled").read_text())[1]
    assert state.thp["enabled"] == enabled
    assert state.thp["hpage_pmd_size"] == (THP_SYSFS / "hpage_pmd_size").read_text().strip()


# ---- VmFlags and MADV_COLLAPSE ----------------------------------------------------------


@pytest.mark.needs_collapse
def test_dontdump_mapping_is_collapse_eligible(spawn, backend):
    child = spawn(8 * MiB, advise=[MADV_DONTDUMP], collapse=(0, 2 * MiB))
    require_collapsed(child)  # the kernel collapsed a VM_DONTDUMP mapping...
    proc = backend.process(child.pid)
    vma = the_vma(backend, proc, child)
    assert "dd" in vma.vmflags
    assert vma.anon_huge == 2 * MiB
    assert vma.collapse_eligible  # ...so memdefragd must not rule it out
