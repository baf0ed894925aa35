"""Exposition: live counters and histograms, gauges from a snapshot, bounded labels, a
failing collector isolated."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memdefragd.daemon import metrics as exporter
from memdefragd.daemon.metrics import Metrics, Snapshot, pause_reason_label
from memdefragd.model import MemoryState, Outcome, Request, ZoneFree
from memdefragd.pipeline.score import VmaMetrics, histogram


def snapshot(**kw) -> Snapshot:
    memory = MemoryState(
        zones=(ZoneFree(0, "Normal", (4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0)),),
        pagetype_free=None, vmstat=MappingProxyType({}), thp=MappingProxyType({}),
        khugepaged=MappingProxyType({}), pressure_some=None, pressure_full=None,
    )  # fmt: skip

    def vma(runs: list[int]) -> VmaMetrics:
        return VmaMetrics(1024, 512, 2, 1, 1, 0, None, histogram(np.array(runs)))

    base = Snapshot(
        targets=exporter.target_figures(
            [("db", [vma([512, 256, 256])]), ("db", [vma([8])])]
        ),
        paused=None, pressure_some_avg10=2.5, budget_tokens=1e6, cpu_used=0.5, cpu_limit=1.0,
        queue_bytes=0, memory=memory,
    )  # fmt: skip
    return replace(base, **kw)


def exported(snap: Snapshot | None = None) -> Metrics:
    """A daemon's metrics after some work: two requests of db, one failed region..."""
    m = Metrics(lambda: snapshot() if snap is None else snap)
    m.configured("ab" * 32, 30.0)
    m.requests.labels("db", "collapse", "ok").inc(2)
    m.attempted.labels("db", "collapse").inc(4 << 20)
    m.done.labels("db", "collapse").inc(4 << 20)
    m.verified.labels("db", "collapse").inc(2 << 20)
    m.failures.labels("db", "collapse", "EAGAIN").inc()
    m.races.labels("exited").inc()
    m.reloads.labels("ok").inc()
    for seconds in (0.003, 0.2):
        m.request_seconds.labels("collapse").observe(seconds)
    m.scanned_pages.inc(2048)
    m.last_cycle.set(1234.5)
    return m


def scrape(metrics: Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_families_and_values():
    m = scrape(exported())
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
    assert all(m["memdefragd_collector_success", (("collector", c),)] == 1 for c in exporter.GROUPS)
    assert m["memdefragd_config_info", (("sha256", "ab" * 32),)] == 1
    assert m["memdefragd_last_cycle_timestamp_seconds", ()] == 1234.5
    assert m["memdefragd_scanned_pages_total", ()] == 2048
    # The exposition the dashboard and the rules were written against: no _created series.
    assert not [name for name, _ in m if name.endswith("_created")]


def test_a_request_is_counted_in_every_family_it_feeds():
    m = Metrics()
    req = Request("db", 1, 2, 0, 8 << 20, ((0, 8 << 20),), method="collapse")
    m.record(Outcome(req, 8 << 20, 6 << 20, {"EAGAIN": 1}, 0.02), verified=4 << 20)
    m.record(Outcome(req, 2 << 20, 0, {}, 0.001, stopped="ESRCH"), verified=0)
    get = m.registry.get_sample_value
    work = {"target": "db", "method": "collapse"}
    assert get("memdefragd_requests_total", {**work, "result": "partial"}) == 1
    assert get("memdefragd_requests_total", {**work, "result": "ESRCH"}) == 1
    assert get("memdefragd_attempted_bytes_total", work) == 10 << 20
    assert get("memdefragd_done_bytes_total", work) == 6 << 20
    assert get("memdefragd_verified_bytes_total", work) == 4 << 20
    assert exporter.total(m.verified) == 4 << 20
    assert get("memdefragd_failures_total", {**work, "reason": "EAGAIN"}) == 1
    assert get("memdefragd_request_duration_seconds_count", {"method": "collapse"}) == 2


def test_config_info_names_only_the_config_in_force():
    m = exported()
    m.configured("cd" * 32, 10.0)
    info = {k: v for k, v in scrape(m).items() if k[0] == "memdefragd_config_info"}
    assert info == {("memdefragd_config_info", (("sha256", "cd" * 32),)): 1}
    assert m.registry.get_sample_value("memdefragd_scan_interval_seconds") == 10.0


def test_races_counted_elsewhere_are_added_once():
    m = exported()
    m.count_races({"discovery_vanished": 0, "discovery_denied": 2})
    m.count_races({"discovery_vanished": 3, "discovery_denied": 2})
    races = {
        dict(k[1])["kind"]: v for k, v in scrape(m).items() if k[0] == "memdefragd_races_total"
    }
    assert races == {"exited": 1, "discovery_vanished": 3, "discovery_denied": 2}


def test_a_failing_collector_fails_only_itself(monkeypatch):
    def broken(snap):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    monkeypatch.setitem(exporter.COLLECTORS, "system", broken)
    m = scrape(exported())
    assert m["memdefragd_collector_success", (("collector", "system"),)] == 0
    assert m["memdefragd_collector_success", (("collector", "work"),)] == 1
    labels = (("method", "collapse"), ("result", "ok"), ("target", "db"))
    assert ("memdefragd_requests_total", labels) in m


def test_no_snapshot_yet_still_answers():
    text = generate_latest(Metrics(lambda: None).registry).decode()
    assert 'memdefragd_collector_success{collector="work"} 1.0' in text


def test_pause_reasons_are_a_bounded_vocabulary():
    assert pause_reason_label(None) == ""
    assert pause_reason_label("memory pressure: PSI some avg10 12.0% > 10.0%") == "pressure"
    assert pause_reason_label("MemAvailable 200 MiB < 1024 MiB") == "low_memory"
    assert pause_reason_label("operator said so") == "other"
    m = scrape(exported(snapshot(paused="MemAvailable 1 MiB < 1 GiB")))
    paused = {k[1][0][1]: v for k, v in m.items() if k[0] == "memdefragd_paused"}
    assert paused == {"pressure": 0, "low_memory": 1, "other": 0}
    # Not paused: every reason's series is still there, at 0 (no series appear or vanish).
    m = scrape(exported())
    paused = {k[1][0][1]: v for k, v in m.items() if k[0] == "memdefragd_paused"}
    assert paused == dict.fromkeys(exporter.PAUSE_REASONS, 0)


def test_persistence_families():
    e = exported(
        snapshot(
            pending={("db", "hot"): 4 << 20, ("db", "cold"): 2 << 20}, untouched={"db": 6 << 20}
        )
    )
    e.forks.labels("db").inc(2)
    e.regressions.labels("db", "fork").inc()
    e.recollapsed.labels("db").inc(8 << 20)
    e.fork_restore.labels("db").observe(1.5)
    e.pacing.labels("db").observe(0.02)
    m = scrape(e)
    pending = {dict(k[1])["heat"]: v for k, v in m.items() if k[0] == "memdefragd_pending_bytes"}
    assert pending == {"hot": 4 << 20, "cold": 2 << 20, "untouched": 6 << 20, "unknown": 0}
    assert m["memdefragd_forks_total", (("target", "db"),)] == 2
    assert m["memdefragd_regressions_total", (("cause", "fork"), ("target", "db"))] == 1
    assert m["memdefragd_recollapsed_bytes_total", (("target", "db"),)] == 8 << 20
    assert m["memdefragd_fork_restore_seconds_sum", (("target", "db"),)] == 1.5
    assert m["memdefragd_pacing_delay_seconds_count", (("target", "db"),)] == 1


def test_discovery_families():
    """What listing and matching every process costs per rescan, and what it found."""
    e = exported()
    for seconds in (0.004, 0.3, 0.3):
        e.discovery_seconds.observe(seconds)
    e.listed.set(812)
    e.tracked.set(3)
    m = scrape(e)
    assert m["memdefragd_discovery_duration_seconds_count", ()] == 3
    assert m["memdefragd_discovery_duration_seconds_bucket", (("le", "0.005"),)] == 1
    assert m["memdefragd_discovery_duration_seconds_bucket", (("le", "0.5"),)] == 3
    assert m["memdefragd_discovery_listed_processes", ()] == 812
    assert m["memdefragd_discovery_tracked_processes", ()] == 3
    assert m["memdefragd_collector_success", (("collector", "discovery"),)] == 1


def test_ranger_window_families_are_there_from_the_start_for_ranger_targets_only():
    """A hold's first event must show in increase(): its series exist at 0 from the moment
    a ranger target is configured; a collapse target has none."""
    e = exported()
    e.targets({"db": "ranger", "web": "collapse"})
    m = scrape(e)
    db = (("target", "db"),)
    assert m["memdefragd_ranger_window_conflicts_total", db] == 0
    assert m["memdefragd_ranger_held_processes", db] == 0
    assert not [k for k in m if k[0].startswith("memdefragd_ranger_") and k[1] != db]
    e.ranger_conflicts.labels("db").inc()
    e.ranger_held.labels("db").set(1)
    m = scrape(e)
    assert m["memdefragd_ranger_window_conflicts_total", db] == 1
    assert m["memdefragd_ranger_held_processes", db] == 1
