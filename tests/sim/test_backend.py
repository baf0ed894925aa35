"""SimBackend: the Backend protocol over a hand-built machine, with hand-computed figures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from memdefragd.backends.sim.backend import SimBackend
from memdefragd.backends.sim.machine import CACHE, Machine
from memdefragd.model import PAGE_SIZE, PMD_SIZE, ProcessGone, Request, Vma
from memdefragd.pipeline.scan import scan_process
from memdefragd.pipeline.score import VmaAccumulator, unusable_index, vma_metrics

MiB = 1 << 20


@pytest.fixture
def sim():
    """A 16 MiB machine with one process whose 1600-page VMA is laid out as:
    region 0 on frames 512..1023, promoted to a THP; region 1 on frames 2048..2559
    (aligned and contiguous, not a THP); region 2 with 300 pages on frames 3000..3299
    and 212 pages not present; a 64-page tail on every other frame from 100."""
    m = Machine(4096)
    p = m.add_process("app", cmdline=("app", "--serve"))
    v = m.mmap(p.pid, 1600)
    s = v.start_vpn
    m.fault_at(p.pid, np.arange(s, s + 512), np.arange(512, 1024))
    assert m.promote(p.pid, s)
    m.fault_at(p.pid, np.arange(s + 512, s + 1024), np.arange(2048, 2560))
    m.fault_at(p.pid, np.arange(s + 1024, s + 1324), np.arange(3000, 3300))
    m.fault_at(p.pid, np.arange(s + 1536, s + 1600), np.arange(100, 228, 2))
    return SimBackend(m), p.pid, v


def only(backend: SimBackend):
    (proc,) = backend.list_processes()
    (vma,) = backend.list_vmas(proc)
    return proc, vma


def test_process_info(sim):
    backend, pid, _ = sim
    proc = backend.process(pid)
    assert (proc.pid, proc.comm, proc.cmdline) == (pid, "app", ("app", "--serve"))
    assert (proc.exe, proc.cgroup, proc.uid) == ("/usr/bin/app", "/", 1000)
    assert proc.rss == 1388 * PAGE_SIZE
    assert backend.list_processes() == [proc]
    with pytest.raises(ProcessGone):
        backend.process(pid + 1)


def test_vmas_look_like_smaps_and_maps(sim):
    backend, _, v = sim
    proc, vma = only(backend)
    assert (vma.start, vma.end) == (v.start_vpn * PAGE_SIZE, v.end_vpn * PAGE_SIZE)
    assert vma.anonymous and vma.collapse_eligible
    assert vma.rss == 1388 * PAGE_SIZE and vma.anon_huge == PMD_SIZE
    assert vma.field("Size") == 1600 * PAGE_SIZE
    assert vma.vmflags == {"rd", "wr", "mr", "mw", "me", "ac", "hg"}
    (bare,) = backend.list_vmas(proc, detail=False)
    assert (bare.start, bare.end, dict(bare.fields), bare.vmflags) == (vma.start, vma.end, {}, None)


def test_layout_feeds_the_shared_metrics_with_hand_computed_results(sim):
    backend, _, _ = sim
    proc, vma = only(backend)
    layout = backend.read_layout(proc, vma)
    assert layout.pfn_known and layout.present_pages == 1388
    assert int(layout.thp.sum()) == 512
    got = vma_metrics(layout)
    # Runs: 512 (region 0) + 512 (region 1) + 300 (region 2) + 64 singles = 67 runs.
    c = got.contiguity
    assert (c.runs, c.largest_run) == (67, 512)
    assert c.mean_run == pytest.approx(1388 / 67)
    assert c.coverage == {32: pytest.approx((1324 + 29) / 1388), 128: 1.0}
    # 90% of 1388 = 1249.2 pages: the three big runs; 99% = 1374.12: those and 51 singles.
    assert c.runs_for == {0.9: 3, 0.99: 54}
    assert (got.thp_pages, got.aligned_regions, got.thp_regions) == (512, 3, 1)
    assert got.collapsible_regions == 2  # regions 1 and 2 (max_ptes_none 511)
    assert got.aligned_contiguous_regions == 1  # region 1: region 2 is not all present
    assert got.thp_coverage == pytest.approx(1 / 3)


def test_windows_are_pmd_aligned_and_add_up_to_the_layout(sim):
    backend, _, v = sim
    backend.window = 512
    proc, vma = only(backend)
    windows = [w for _, w in backend.iter_layouts(proc, [vma])]
    s = v.start_vpn
    assert [(w.start_vpn - s, w.end_vpn - s) for w in windows] == [
        (0, 512), (512, 1024), (1024, 1536), (1536, 1600),
    ]  # fmt: skip
    acc = VmaAccumulator(s, v.end_vpn, True)
    for w in windows:
        acc.add(w)
    windowed, whole = acc.finish(), vma_metrics(backend.read_layout(proc, vma))
    assert windowed.contiguity == whole.contiguity
    assert windowed.aligned_contiguous_regions == whole.aligned_contiguous_regions == 1


def test_any_address_range_reads_as_a_layout(sim):
    """The daemon verifies a request by reading its ranges, which are not VMAs."""
    backend, _, v = sim
    proc, _ = only(backend)
    start = v.start_vpn * PAGE_SIZE
    ranges = [Vma(start, start + 2 * PMD_SIZE, "rw-p", 0, "00:00", 0, "")]
    (i, w), *rest = backend.iter_layouts(proc, ranges)
    assert i == 0 and not rest and int(w.thp.sum()) == 512 and w.present_pages == 1024


def test_memory_state_is_the_buddy_allocator(sim):
    backend, _, _ = sim
    m = backend.machine
    state = backend.memory_state()
    (zone,) = state.zones
    assert (zone.node, zone.zone) == (0, "Normal")
    assert zone.free == m.buddy.free_blocks(m.zones[0])
    assert sum(c << k for k, c in enumerate(zone.free)) == 4096 - 1388
    assert unusable_index(zone.free)[9] == pytest.approx(m.unusable_index())
    assert state.pagetype_free[(0, "Normal", "Movable")] == zone.free
    assert state.meminfo["MemTotal"] == 16 * MiB
    assert state.meminfo["MemFree"] == (4096 - 1388) * PAGE_SIZE
    assert state.vmstat["thp_promoted"] == 1
    assert state.thp["enabled"] == "madvise" and state.max_ptes_none == 511
    assert state.pressure_some is None
    light = backend.pressure_state()
    assert light.zones == () and light.meminfo == state.meminfo
    assert backend.pfn_visibility().visible


def test_report_scans_a_simulated_process(sim):
    backend, _, _ = sim
    proc, _ = only(backend)
    rep = scan_process(backend, proc)
    (v,) = rep.vmas
    assert v.metrics.contiguity.runs == 67 and v.metrics.thp_regions == 1


def request(backend: SimBackend, pid: int, v, regions, method: str = "collapse") -> Request:
    proc = backend.process(pid)
    s = v.start_vpn * PAGE_SIZE
    return Request(
        target="app",
        pid=pid,
        start_time=proc.start_time,
        vma_start=s,
        vma_end=v.end_vpn * PAGE_SIZE,
        ranges=tuple((s + a * PMD_SIZE, s + b * PMD_SIZE) for a, b in regions),
        method=method,
    )


def test_collapse_request(sim):
    backend, pid, v = sim
    handle = backend.open(backend.process(pid))
    out = backend.execute(handle, request(backend, pid, v, [(1, 3)]))
    assert (out.bytes_attempted, out.bytes_done, dict(out.failures), out.stopped) == (
        2 * PMD_SIZE, 2 * PMD_SIZE, {}, "",
    )  # fmt: skip
    proc, vma = only(backend)
    assert vma_metrics(backend.read_layout(proc, vma)).thp_regions == 3
    backend.machine.check()


def test_collapse_request_failures(sim):
    backend, pid, v = sim
    m = backend.machine
    w = m.mmap(pid, 1024)  # nothing present: MADV_COLLAPSE says EINVAL
    handle = backend.open(backend.process(pid))
    out = backend.execute(handle, request(backend, pid, w, [(0, 1)]))
    assert dict(out.failures) == {"EINVAL": 1} and out.ineligible == (w.start_vpn * PAGE_SIZE,)
    m.alloc_at(np.flatnonzero(m.kind == 0))  # memory full: ENOMEM stops the request
    out = backend.execute(handle, request(backend, pid, v, [(1, 2), (2, 3)]))
    assert (out.bytes_attempted, dict(out.failures), out.stopped) == (
        PMD_SIZE,
        {"ENOMEM": 1},
        "ENOMEM",
    )


def test_request_is_cancelled_between_ranges(sim):
    backend, pid, v = sim
    handle = backend.open(backend.process(pid))
    out = backend.execute(
        handle, request(backend, pid, v, [(1, 2), (2, 3)]), should_stop=lambda: True
    )
    assert (out.bytes_attempted, out.bytes_done, out.stopped) == (PMD_SIZE, PMD_SIZE, "cancelled")


def test_exited_process_stops_with_esrch_and_handles_go_stale(sim):
    backend, pid, v = sim
    proc = backend.process(pid)
    handle = backend.open(proc)
    req = request(backend, pid, v, [(1, 2)])
    backend.machine.exit_process(pid)
    assert handle.exited
    out = backend.execute(handle, req)
    assert (out.bytes_attempted, out.stopped) == (0, "ESRCH")
    with pytest.raises(ProcessGone):
        backend.open(proc)
    with pytest.raises(ProcessGone):
        backend.list_vmas(proc)
    handle.close()
    with pytest.raises(ValueError, match="closed"):
        backend.execute(handle, req)


def test_malformed_requests_are_refused(sim):
    backend, pid, v = sim
    handle = backend.open(backend.process(pid))
    req = request(backend, pid, v, [(1, 2)])
    with pytest.raises(ValueError, match="start time"):
        backend.execute(handle, replace(req, start_time=req.start_time + 1))
    with pytest.raises(ValueError, match="aligned"):
        backend.execute(
            handle, replace(req, ranges=((req.vma_start + 4096, req.vma_start + PMD_SIZE),))
        )
    with pytest.raises(ValueError, match="outside"):
        backend.execute(
            handle, replace(req, ranges=((req.vma_start, req.vma_start + 4 * PMD_SIZE),))
        )
    with pytest.raises(ValueError, match="unknown method"):
        backend.execute(handle, replace(req, method="magic"))
    assert backend.refusal("magic") is not None
    assert backend.refusal("collapse") is None and backend.refusal("compaction") is None


def test_compaction_request(sim):
    backend, pid, v = sim
    handle = backend.open(backend.process(pid))
    out = backend.execute(handle, request(backend, pid, v, [(1, 2)], method="compaction"))
    assert out.bytes_attempted == PMD_SIZE and not out.failures and not out.stopped
    assert backend.memory_state().vmstat["compact_stall"] == 1
    backend.machine.check()


def test_ranger_request_goes_through_the_simulated_ranger(sim):
    pytest.importorskip("memdefragd.backends.sim.ranger")
    backend, pid, v = sim
    assert backend.refusal("ranger") is None
    handle = backend.open(backend.process(pid))
    for method in ("ranger", "ranger-improved"):
        out = backend.execute(handle, request(backend, pid, v, [(0, 3)], method=method))
        assert out.bytes_attempted == 3 * PMD_SIZE and not out.stopped
        assert 0 <= out.bytes_done <= out.bytes_attempted
    backend.machine.check()


def test_node_compaction_like_the_sysfs_knob():
    m = Machine.build(16 * MiB, nodes=2)
    m.alloc_at(np.arange(0, 4096, 3), kind=CACHE)  # page cache on every third frame
    backend = SimBackend(m)
    assert backend.compact([1]) == [1]
    assert m.stats.pages_migrated > 0 and (m.kind[:2048:3] == CACHE).all()  # node 0 untouched
    assert backend.compact() == [0, 1]
    m.check()


def test_capabilities_compaction_rate_limited_per_node_events_and_access_declined():
    m = Machine.build(16 * MiB, nodes=2)
    m.alloc_at(np.arange(0, 4096, 3), kind=CACHE)
    backend = SimBackend(m)
    t = [0.0]
    compactor = backend.compactor(60.0)
    compactor.clock = lambda: t[0]
    assert compactor.maybe_compact() == [0, 1]
    assert compactor.maybe_compact() == [] and compactor.maybe_compact([1]) == []
    t[0] = 60.0
    assert compactor.maybe_compact([1]) == [1]
    m.check()
    assert backend.process_events() is None  # the daemon lists processes instead
    sampler, why = backend.access_sampler("auto")
    assert sampler is None and "no access bits" in why
