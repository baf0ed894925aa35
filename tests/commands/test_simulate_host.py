"""`simulate --from-host` on the real kernel: a child's fragmented heap, snapshotted, seeded
at the same frames, with the figures `report` computes for it before any method runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.snapshot import take_snapshot
from memdefragd.backends.sim.backend import SimBackend
from memdefragd.backends.sim.seed import seed
from memdefragd.pipeline.scan import scan_process
from tests.kernel.helpers import MiB, read_pagemap, require_kernel, start_child

pytestmark = pytest.mark.kernel


@pytest.fixture
def child():
    require_kernel(os.access("/proc/kpageflags", os.R_OK), "/proc/kpageflags is not readable")
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    require_kernel(
        not (enabled.exists() and "[always]" in enabled.read_text()),
        "THP enabled=always: faults would map 2 MiB pages, this test needs 4 KiB",
    )
    backend = KernelBackend()
    vis = backend.pfn_visibility()
    backend.close()
    require_kernel(vis.visible, vis.reason)
    c = start_child(64 * MiB, shuffle=7)  # 4 KiB pages faulted in random order
    yield c
    c.stop()


def test_seeded_machine_holds_the_childs_pages_at_their_frames_with_reports_figures(child):
    backend = KernelBackend()
    try:
        proc = backend.process(child.pid)
        snap = take_snapshot([proc], backend=backend)
        real = scan_process(backend, proc)
    finally:
        backend.close()
    m, seeding = seed(snap)
    m.check()
    sim_proc = m.processes[child.pid]
    (heap,) = [v for v in sim_proc.vmas if v.start_vpn == child.addr // 4096]
    expect = read_pagemap(child.pid, child.addr, child.end)  # brute force, after the snapshot
    assert len(expect) == 64 * MiB // 4096
    vpn = np.array([v for v, _ in expect]) - heap.start_vpn
    assert (heap.pfn[vpn] == np.array([p for _, p in expect])).all()

    sim = SimBackend(m)
    seeded = scan_process(sim, sim.process(child.pid))
    by_start = {r.vma.start: r.metrics for r in real.vmas}
    for r in seeded.vmas:
        want, got = by_start[r.vma.start], r.metrics
        if r.vma.start == child.addr or got.present_pages == want.present_pages:
            assert got.contiguity == want.contiguity, r.vma
    c = by_start[child.addr].contiguity
    assert c is not None and c.runs > 1000  # shuffled: fragmented, as the test needs
    dropped = real.totals.present_pages - seeded.totals.present_pages
    assert 0 <= dropped <= sum(int(n.split(": ")[1].split()[0]) for n in seeding.notes
                               if "pages on frames" in n)  # fmt: skip


def test_snapshot_command_then_simulate_from_its_file(child, tmp_path):
    path = tmp_path / "host.npz"
    cli = [sys.executable, "-m", "memdefragd.cli"]
    r = subprocess.run(
        [*cli, "snapshot", "--pid", str(child.pid), "-o", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"pid {child.pid}" in r.stdout and path.stat().st_size > 0
    r = subprocess.run(
        [*cli, "simulate", "--from-snapshot", str(path), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    before = doc["before"]["processes"][0]
    assert before["pid"] == child.pid
    for method in ("ranger", "ranger-improved"):
        after = doc["methods"][method]["after"]["processes"][0]
        assert after["present_bytes"] == before["present_bytes"]
        assert after["runs_for"]["0.99"] < before["runs_for"]["0.99"]
