"""From a scan to the scheduler's candidates: hotness and urgency carried per region,
regions already sent since the scan left out, VMAs with nothing to collapse skipped."""

from __future__ import annotations

import numpy as np

from memdefragd.backends.sim.backend import SimBackend
from memdefragd.backends.sim.machine import Machine
from memdefragd.model import PAGE_SIZE, PMD_PAGES, PMD_SIZE
from memdefragd.pipeline.plan.candidates import scan_candidates
from memdefragd.pipeline.scan import collapsible_regions, huge_and_collapsible, scan_process
from memdefragd.pipeline.targets import Target


def scanned():
    """A process with two VMAs: one of 3 collapsible regions (4 KiB pages), one of a THP."""
    m = Machine(8192)
    p = m.add_process("app")
    a, b = m.mmap(p.pid, 3 * PMD_PAGES), m.mmap(p.pid, PMD_PAGES)
    m.fault_at(p.pid, np.arange(a.start_vpn, a.end_vpn), np.arange(1024, 1024 + 3 * 512) * 2)
    m.fault_at(p.pid, np.arange(b.start_vpn, b.end_vpn), np.arange(512, 1024))
    assert m.promote(p.pid, b.start_vpn)
    backend = SimBackend(m)
    proc = backend.process(p.pid)
    return proc, scan_process(backend, proc, collect=True), a.start_vpn * PAGE_SIZE


def test_one_candidate_per_vma_with_collapsible_regions():
    proc, rep, base = scanned()
    (c,) = scan_candidates(Target("t", priority=2), proc, rep)
    assert (c.target, c.priority, c.pid, c.start_time) == ("t", 2, proc.pid, proc.start_time)
    np.testing.assert_array_equal(c.regions, base + PMD_SIZE * np.arange(3, dtype=np.uint64))
    assert c.hotness is None and c.urgent is None
    huge, coll = huge_and_collapsible(rep)
    assert huge.size == 1 and coll.size == 3
    np.testing.assert_array_equal(coll, collapsible_regions(rep.vmas[0].metrics))


def test_hotness_urgency_and_regions_already_sent():
    proc, rep, base = scanned()
    hot = {base: np.array([0.5, 1.0, 0.0])}
    urgent = np.array([base + 2 * PMD_SIZE], dtype=np.uint64)
    (c,) = scan_candidates(
        Target("t"), proc, rep, hotness=hot, urgent=urgent, tried={base + PMD_SIZE}
    )
    np.testing.assert_array_equal(c.regions, [base, base + 2 * PMD_SIZE])
    np.testing.assert_array_equal(c.hotness, [0.5, 0.0])
    np.testing.assert_array_equal(c.urgent, [False, True])
    # Measured, but no figures for this VMA: unknown hotness, as before the measurement.
    (c,) = scan_candidates(Target("t"), proc, rep, hotness={})
    assert c.hotness is None


def test_figures_from_an_older_scan_of_changed_regions_are_not_applied():
    """Kept figures for 2 regions (the sampler restarted and has none yet) against a scan
    that now finds 3: they say nothing of these regions, which rank as unmeasured, and
    planning goes on (it once raised, every cycle, after a fork split a heap)."""
    proc, rep, base = scanned()
    (c,) = scan_candidates(Target("t"), proc, rep, hotness={base: np.array([0.5, 1.0])})
    assert c.hotness is None and c.regions.size == 3
