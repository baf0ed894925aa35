"""The daemon's `method: ranger` on several processes whose Translation Ranger anchors lie
in the same frames (pipeline/plan/anchors.py), on the simulated backend.

The faithful simulator anchors each process's first VMA at the start of its zone, looking
at that process only, as the RFC kernel does: processes in one zone are given the same
window, and each pass takes it from the process passed before, by exchange. Measured on
the kernel (tests/ranger/test_ranger_figures.py) and reproduced here: passes alternate
without end. With the rule, the process whose pass filled the window last keeps it and the
ones it took it from get no more passes, said once each and counted; a process alone in
its window is never held back.

The daemon is driven by hand on a clock of its own (a full cycle every 30 simulated
seconds, every request the plan allows in between), so each run is deterministic and
takes well under a second.
"""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from memdefragd import logonce
from memdefragd.backends.sim.backend import SimBackend
from memdefragd.backends.sim.buddy import Zone
from memdefragd.backends.sim.machine import Machine
from memdefragd.config import load_config
from memdefragd.daemon.loop import Daemon
from memdefragd.model import PAGE_SHIFT
from memdefragd.pipeline.scan import scan_process, worth_collapsing
from memdefragd.pipeline.score import rollup

SCAN_EVERY = 30.0  # simulated seconds between full cycles (the config's scan_interval)


@pytest.fixture(autouse=True)
def fresh_log_once(monkeypatch):
    """Each test's daemon says its once-only lines afresh (the same pids recur here)."""
    monkeypatch.setattr(logonce, "_ONCE", logonce.OnceMemory())


def write_config(tmp_path: Path, processes: str = "{comm: simdb, heap: 32M, count: 3}") -> Path:
    path = tmp_path / "ranger.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            daemon:
              backend: simulated
              method: ranger
              scan_interval: {SCAN_EVERY:g}s
              budget: {{bytes_per_second: 64GiB, cpu_share: 1.0}}
              pressure: {{psi_some_avg10: 100, min_available: 0}}
              metrics: {{listen: off}}
              simulated:
                memory: 256M
                fragmentation: 0.5
                unmovable: 0.01
                free: 0.4
                seed: 3
                processes:
                  - {processes}
            targets:
              - name: db
                match: {{comm: '^simdb'}}
            """
        )
    )
    os.chmod(path, 0o644)
    return path


class Driven:
    """A daemon on a clock of its own: `run(seconds)` does what its loop would do in that
    much time, and records the pid of each request carried out."""

    def __init__(self, path: Path, backend: SimBackend | None = None, *, holding: bool = True):
        self.now = 0.0
        self.d = Daemon(
            load_config(path), backend=backend, events=False,
            clock=lambda: self.now, cpu_clock=lambda: 0.0,
        )  # fmt: skip
        if not holding:  # as before the rule: where a pass anchored is never compared
            self.d.anchors.passed = lambda *a, **kw: []  # type: ignore[method-assign]
        self.machine: Machine = self.d.backend.machine  # type: ignore[attr-defined]
        self.passes: list[int] = []
        self._next_scan = 0.0

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            if self.now >= self._next_scan:
                self.d.scan_cycle(full=True)
                self._next_scan = self.now + SCAN_EVERY
            while self.d.work_once():
                self.passes.append(self.d.outcomes[-1][0].request.pid)
            self.now += 1.0

    def turns(self) -> list[int]:
        """The pids in the order their passes came, one entry per run of passes."""
        return [p for i, p in enumerate(self.passes) if i == 0 or self.passes[i - 1] != p]

    def value(self, name: str, target: str = "db") -> float:
        for family in self.d.metrics.registry.collect():
            for s in family.samples:
                if s.name == name and s.labels.get("target") == target:
                    return s.value
        raise KeyError(name)

    def runs(self, pid: int) -> tuple[int, int]:
        """(runs, largest run) of the process's heap now."""
        rep = scan_process(self.d.backend, self.d.backend.process(pid), only=worth_collapsing)
        c = rollup([v.metrics for v in rep.vmas]).contiguity
        assert c is not None
        return c.runs, c.largest_run

    def close(self) -> None:
        self.d.backend.close()


def warnings_about(caplog, pid: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.getMessage().startswith(f"pid {pid} (target db): ")
        and "anchor window" in r.getMessage()
    ]


def test_passes_over_one_window_alternate_without_the_rule_and_stop_with_it(tmp_path, caplog):
    """Three 32 MiB heaps on an aged 256 MiB machine, one zone: every anchor is at its
    start. Without the rule the daemon goes back to each process again and again, each
    pass exchanging the window's pages with the process passed before; with it, each of
    the first two is held back by the pass that took its window, once, and the pages
    exchanged drop."""
    path = write_config(tmp_path)
    before = Driven(path, holding=False)
    try:
        before.run(1200)
        exchanged_before = before.machine.stats.pages_exchanged
    finally:
        before.close()
    pids = sorted(set(before.passes))
    assert len(pids) == 3
    # Alternation: each process comes back after the others took the window from it.
    assert len(before.turns()) >= 2 * len(pids), before.turns()
    assert all(before.turns().count(p) >= 2 for p in pids), before.turns()

    with caplog.at_level(logging.INFO, logger="memdefragd"):
        after = Driven(path)
        try:
            after.run(1200)
            exchanged_after = after.machine.stats.pages_exchanged
            turns = after.turns()
            holder = turns[-1]
            # Each process had its turn, once: none was passed again after another's pass
            # took its window.
            assert sorted(turns) == pids, turns
            held = [p for p in pids if p != holder]
            assert all(after.d.anchors.held((p, after.d.backend.process(p).start_time))
                       for p in held)  # fmt: skip
            assert after.passes.count(holder) > max(after.passes.count(p) for p in held)
            # Said once for each process held back, whoever holds it, however long it lasts.
            for p in held:
                said = warnings_about(caplog, p)
                assert len(said) == 1, said
                assert f"No more ranger passes for pid {p} while pid " in said[0]
                assert "method collapse for target db" in said[0]
            assert warnings_about(caplog, holder) == []
            # Counted: holds started, and processes held now.
            assert after.value("memdefragd_ranger_window_conflicts_total") == len(held)
            assert after.value("memdefragd_ranger_held_processes") == len(held)
            # The window's last filler ends more contiguous than it began.
            assert after.runs(holder)[1] > 512
        finally:
            after.close()
    print(
        f"\nranger, 3 processes in one window, 1200 s: passes per pid "
        f"{ {p: before.passes.count(p) for p in pids} } in {len(before.turns())} turns, "
        f"{exchanged_before} pages exchanged without the rule; "
        f"{ {p: after.passes.count(p) for p in pids} } in {len(turns)} turns, "
        f"{exchanged_after} exchanged with it"
    )
    assert exchanged_after < exchanged_before / 2


ZONE_FRAMES = 8192  # 32 MiB per zone
HEAP_PAGES = 3072  # 12 MiB: above Translation Ranger's defrag_size_threshold (10 MiB)


def two_zones(seed: int = 5) -> tuple[Machine, dict[str, int]]:
    """Two zones; two processes with their heaps scattered over the first, one over the
    second: the first two anchor at the first zone's start, the third alone at the
    second's. (comm -> pid)"""
    m = Machine(2 * ZONE_FRAMES, [Zone(0, "DMA32", 0, ZONE_FRAMES),
                                  Zone(0, "Normal", ZONE_FRAMES, 2 * ZONE_FRAMES)])  # fmt: skip
    rng = np.random.default_rng(seed)
    first = rng.permutation(ZONE_FRAMES)
    frames = {
        "simdb-a": first[:HEAP_PAGES],
        "simdb-b": first[HEAP_PAGES : 2 * HEAP_PAGES],
        "simdb-alone": ZONE_FRAMES + rng.permutation(ZONE_FRAMES)[:HEAP_PAGES],
    }
    pids = {}
    for comm, pfns in frames.items():
        p = m.add_process(comm)
        vma = m.mmap(p.pid, HEAP_PAGES)
        m.fault_at(p.pid, np.arange(vma.start_vpn, vma.end_vpn), pfns)
        pids[comm] = p.pid
    return m, pids


def test_a_process_alone_in_its_window_keeps_its_passes(tmp_path, caplog):
    m, pids = two_zones()
    a, b, alone = pids["simdb-a"], pids["simdb-b"], pids["simdb-alone"]
    with caplog.at_level(logging.INFO, logger="memdefragd"):
        run = Driven(write_config(tmp_path), SimBackend(m))
        try:
            runs_before = run.runs(alone)
            run.run(60)
            keys = {p: (p, m.processes[p].start_time) for p in pids.values()}
            held = [p for p in (a, b) if run.d.anchors.held(keys[p])]
            assert len(held) == 1  # of the two sharing a window, the one passed first
            assert not run.d.anchors.held(keys[alone])
            window = run.d.anchors.frames(keys[alone])
            assert window and window[0][0] >= ZONE_FRAMES  # its own zone's start
            assert run.passes.count(alone) >= HEAP_PAGES * 4096 // (2 << 20) // 2
            n = len(run.passes)
            run.run(600)
            assert held[0] not in run.passes[n:]  # held throughout
            assert run.value("memdefragd_ranger_held_processes") == 1
        finally:
            run.close()
    assert warnings_about(caplog, alone) == []
    assert len(warnings_about(caplog, held[0])) == 1
    runs_after = run.runs(alone)
    assert runs_after[0] < runs_before[0] and runs_after[1] == HEAP_PAGES  # all contiguous


def test_the_hold_ends_when_the_holder_exits(tmp_path, caplog):
    m, pids = two_zones()
    a, b = pids["simdb-a"], pids["simdb-b"]
    with caplog.at_level(logging.INFO, logger="memdefragd"):
        run = Driven(write_config(tmp_path), SimBackend(m))
        try:
            run.run(60)
            keys = {p: (p, m.processes[p].start_time) for p in (a, b)}
            (held,) = [p for p in (a, b) if run.d.anchors.held(keys[p])]
            holder = b if held == a else a
            with run.d.backend.lock:  # type: ignore[attr-defined]
                m.exit_process(holder)
            n = len(run.passes)
            run.run(120)  # the next full cycle finds it gone
            assert not run.d.anchors.held(keys[held])
            assert held in run.passes[n:]  # its passes resume
            assert run.value("memdefragd_ranger_held_processes") == 0
            assert run.value("memdefragd_ranger_window_conflicts_total") == 1
        finally:
            run.close()
    resumed = [r.getMessage() for r in caplog.records if "ranger passes resume" in r.getMessage()]
    assert resumed == [
        f"pid {held} (target db): ranger passes resume: no tracked process holds its "
        f"Translation Ranger anchor window any more (pid {holder}, which held it, is no "
        "longer tracked)"
    ]


def test_where_a_simulated_pass_anchored_is_in_its_outcome(tmp_path):
    """The simulated backend reports the faithful anchor's window in frames: the VMA's
    first page's frame, for as many frames as the VMA has pages."""
    m, pids = two_zones()
    run = Driven(write_config(tmp_path), SimBackend(m))
    try:
        run.run(60)
        outcomes = {o.request.pid: o for o, _ in run.d.outcomes}
        vma = m.processes[pids["simdb-alone"]].vmas[0]
        out = outcomes[pids["simdb-alone"]]
        assert (out.request.vma_start >> PAGE_SHIFT) == vma.start_vpn
        assert out.frames == ((ZONE_FRAMES, ZONE_FRAMES + HEAP_PAGES),)
    finally:
        run.close()
