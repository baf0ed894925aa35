"""Exposition from a snapshot: families, bounded labels, a failing collector isolated."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from memdefragd.daemon import metrics as exporter
from memdefragd.daemon.metrics import Histogram, Snapshot, SnapshotCollector, pause_reason_label
from memdefragd.model import MemoryState, ZoneFree
from memdefragd.pipeline.score import VmaMetrics, histogram


def snapshot(**kw) -> Snapshot:
    memory = MemoryState(
        zones=(ZoneFree(0, "Normal", (4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0)),),
        pagetype_free=None, vmstat=MappingProxyType({}), thp=MappingProxyType({}),
        khugepaged=MappingProxyType({}), pressure_some=None, pressure_full=None,
    )  # fmt: skip
    h = Histogram(exporter.REQUEST_BUCKETS)
    h.observe(0.003)
    h.observe(0.2)

    def vma(runs: list[int]) -> VmaMetrics:
        return VmaMetrics(1024, 512, 2, 1, 1, 0, None, histogram(np.array(runs)))

    base = Snapshot(
        time=1.0, config_sha256="ab" * 32,
        targets=exporter.target_figures(
            [("db", [vma([512, 256, 256])]), ("db", [vma([8])])]
        ),
        requests={("db", "collapse", "ok"): 2}, bytes_attempted={("db", "collapse"): 4 << 20},
        bytes_done={("db", "collapse"): 4 << 20}, bytes_verified={("db", "collapse"): 2 << 20},
        failures={("db", "collapse", "EAGAIN"): 1}, races={"exited": 1}, errors={},
        reloads={"ok": 1},
        request_seconds={"collapse": h}, scan_seconds=Histogram(exporter.SCAN_BUCKETS),
        pages_scanned=2048, scans=2, last_cycle=1234.5, scan_interval=30.0, paused=None, pressure_some_avg10=2.5,
        budget_tokens=1e6, cpu_used=0.5, cpu_limit=1.0, queue_bytes=0, memory=memory,
    )  # fmt: skip
    return replace(base, **kw)


def scrape(snap: Snapshot) -> dict:
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(lambda: snap))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_families_and_values():
    m = scrape(snapshot())
    assert m["memdefragd_target_processes", (("target", "db"),)] == 2
    assert m["memdefragd_target_thp_bytes", (("target", "db"),)] == 2 * 512 * 4096
    assert m["memdefragd_target_thp_coverage_ratio", (("target", "db"),)] == 0.5
    assert m["memdefragd_target_contiguity_runs", (("target", "db"),)] == 4
    assert m["memdefragd_target_contiguity_coverage_ratio", (("k", "32"), ("target", "db"))] == 1.0
    db_collapse = (("method", "collapse"), ("target", "db"))
    assert m["memdefragd_requests_total", (*db_collapse[:1], ("result", "ok"), db_collapse[1])] == 2
    assert m["memdefragd_verified_bytes_total", db_collapse] == 2 << 20
    assert (
        m["memdefragd_failures_total", (*db_collapse[:1], ("reason", "EAGAIN"), db_collapse[1])]
        == 1
    )
    assert m["memdefragd_scan_interval_seconds", ()] == 30.0
    assert (
        m["memdefragd_request_duration_seconds_bucket", (("le", "0.005"), ("method", "collapse"))]
        == 1
    )
    assert (
        m["memdefragd_request_duration_seconds_bucket", (("le", "+Inf"), ("method", "collapse"))]
        == 2
    )
    assert m["memdefragd_memory_pressure_some_ratio", ()] == 0.025
    assert (
        m[
            "memdefragd_unusable_free_space_index_ratio",
            (("node", "0"), ("order", "10"), ("zone", "Normal")),
        ]
        == 1.0
    )
    assert m["memdefragd_config_reloads_total", (("result", "failed"),)] == 0
    assert all(
        m["memdefragd_collector_success", (("collector", c),)] == 1 for c in exporter.COLLECTORS
    )


def test_a_failing_collector_fails_only_itself(monkeypatch):
    def broken(snap):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    monkeypatch.setitem(exporter.COLLECTORS, "system", broken)
    m = scrape(snapshot())
    assert m["memdefragd_collector_success", (("collector", "system"),)] == 0
    assert m["memdefragd_collector_success", (("collector", "work"),)] == 1
    labels = (("method", "collapse"), ("result", "ok"), ("target", "db"))
    assert ("memdefragd_requests_total", labels) in m


def test_no_snapshot_yet_still_answers():
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(lambda: None))
    text = generate_latest(reg).decode()
    assert 'memdefragd_collector_success{collector="work"} 1.0' in text


def test_pause_reasons_are_a_bounded_vocabulary():
    assert pause_reason_label(None) == ""
    assert pause_reason_label("memory pressure: PSI some avg10 12.0% > 10.0%") == "pressure"
    assert pause_reason_label("MemAvailable 200 MiB < 1024 MiB") == "low_memory"
    assert pause_reason_label("operator said so") == "other"
    m = scrape(snapshot(paused="MemAvailable 1 MiB < 1 GiB"))
    paused = {k[1][0][1]: v for k, v in m.items() if k[0] == "memdefragd_paused"}
    assert paused == {"pressure": 0, "low_memory": 1, "other": 0}
    # Not paused: every reason's series is still there, at 0 (no series appear or vanish).
    m = scrape(snapshot())
    paused = {k[1][0][1]: v for k, v in m.items() if k[0] == "memdefragd_paused"}
    assert paused == dict.fromkeys(exporter.PAUSE_REASONS, 0)


def test_persistence_families():
    h = Histogram(exporter.PACING_BUCKETS)
    h.observe(0.02)
    r = Histogram(exporter.RESTORE_BUCKETS)
    r.observe(1.5)
    m = scrape(
        snapshot(
            pending={("db", "hot"): 4 << 20, ("db", "cold"): 2 << 20}, untouched={"db": 6 << 20},
            forks={"db": 2}, regressions={("db", "fork"): 1}, recollapsed={"db": 8 << 20},
            fork_restore={"db": r}, pacing={"db": h},
        )
    )  # fmt: skip
    pending = {dict(k[1])["heat"]: v for k, v in m.items() if k[0] == "memdefragd_pending_bytes"}
    assert pending == {"hot": 4 << 20, "cold": 2 << 20, "untouched": 6 << 20, "unknown": 0}
    assert m["memdefragd_forks_total", (("target", "db"),)] == 2
    assert m["memdefragd_regressions_total", (("cause", "fork"), ("target", "db"))] == 1
    assert m["memdefragd_recollapsed_bytes_total", (("target", "db"),)] == 8 << 20
    assert m["memdefragd_fork_restore_seconds_sum", (("target", "db"),)] == 1.5
    assert m["memdefragd_pacing_delay_seconds_count", (("target", "db"),)] == 1


def test_discovery_families():
    """What listing and matching every process costs per rescan, and what it found."""
    took = Histogram(exporter.DISCOVERY_BUCKETS)
    for seconds in (0.004, 0.3, 0.3):
        took.observe(seconds)
    m = scrape(snapshot(discovery_seconds=took, discovery_listed=812, discovery_tracked=3))
    assert m["memdefragd_discovery_duration_seconds_count", ()] == 3
    assert m["memdefragd_discovery_duration_seconds_bucket", (("le", "0.005"),)] == 1
    assert m["memdefragd_discovery_duration_seconds_bucket", (("le", "0.5"),)] == 3
    assert m["memdefragd_discovery_listed_processes", ()] == 812
    assert m["memdefragd_discovery_tracked_processes", ()] == 3
    assert m["memdefragd_collector_success", (("collector", "discovery"),)] == 1
