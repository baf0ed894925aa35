"""The daemon loop over a stand-in backend: it keeps serving through unexpected errors."""

from __future__ import annotations

import logging
import threading
import time
from types import MappingProxyType

import pytest

from memdefragd.config import load_config, parse_config
from memdefragd.daemon.loop import Daemon
from memdefragd.model import MemoryState, PfnVisibility, Pressure, ZoneFree


class FlakyBackend:
    """No processes; memory_state fails the first `failures` times it is asked."""

    name = "stand-in"

    def __init__(self, failures: int = 1):
        self.failures = failures
        self.closed = False

    def list_processes(self):
        return []

    def memory_state(self) -> MemoryState:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("buddyinfo went away")
        return MemoryState(
            zones=(ZoneFree(0, "Normal", (1,) * 11),),
            pagetype_free=None,
            vmstat=MappingProxyType({}),
            thp=MappingProxyType({}),
            khugepaged=MappingProxyType({}),
            pressure_some=None,
            pressure_full=None,
        )

    def pfn_visibility(self) -> PfnVisibility:
        return PfnVisibility(True)

    def open(self, proc):
        raise AssertionError("the stand-in lists no process, so none is opened")

    methods = frozenset({"collapse", "ranger"})

    def refusal(self, method: str) -> str | None:
        if method == "ranger":
            return "the stand-in's kernel has no ranger"
        return None if method == "collapse" else f"the stand-in cannot do {method}"

    def close(self) -> None:
        self.closed = True


def by_label(d: Daemon, name: str) -> dict[str, float]:
    """A one-label family's samples from the daemon's own registry: label value -> value."""
    (family,) = [f for f in d.metrics.registry.collect() if f.name == name]
    return {next(iter(s.labels.values())): s.value for s in family.samples}


class Sink:
    """A Notifier that remembers what it was told."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def __getattr__(self, name):
        return lambda *a, **kw: self.sent.append(name)


def test_unexpected_error_is_counted_and_the_loop_goes_on():
    cfg = parse_config("daemon: {scan_interval: 0.2s}\ntargets:\n  - name: t\n")
    backend, sink = FlakyBackend(failures=1), Sink()
    d = Daemon(cfg, backend=backend, notifier=sink, events=False)
    t = threading.Thread(target=d.run)
    t.start()
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and d.cycles < 2:
            time.sleep(0.05)
    finally:
        d.request_stop()
        t.join(10)
    assert not t.is_alive()
    assert by_label(d, "memdefragd_errors") == {"RuntimeError": 1}
    assert d.cycles >= 2  # cycles after the error completed
    assert sink.sent[0] == "ready" and sink.sent[-1] == "stopping"
    assert backend.closed


def test_once_run_raises_what_it_hits():
    """--once is a command, not a service: an error must reach the caller, not vanish."""
    cfg = parse_config("targets:\n  - name: t\n")
    d = Daemon(cfg, backend=FlakyBackend(failures=1), notifier=Sink(), events=False)
    try:
        d.run(once=True)
    except RuntimeError as e:
        assert "buddyinfo went away" in str(e)
    else:
        raise AssertionError("the error was swallowed")


def test_a_method_the_backend_does_not_implement_stops_the_start_with_its_reason():
    cfg = parse_config("targets:\n  - name: t\n    overrides: {method: compaction}\n")
    try:
        Daemon(cfg, backend=FlakyBackend(failures=0), notifier=Sink(), events=False)
    except SystemExit as e:
        assert str(e) == "memdefragd: method 'compaction': the stand-in cannot do compaction"
    else:
        raise AssertionError("started with a method the backend refuses")


def test_a_method_the_machine_lacks_leaves_its_targets_observed_only(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "targets:\n  - name: a\n  - name: r\n    overrides: {method: ranger}\n"
        "  - name: o\n    mode: observe\n    overrides: {method: ranger}\n"
    )
    d = Daemon(load_config(path), backend=FlakyBackend(failures=0), notifier=Sink(), events=False)
    assert {t.name: str(t.mode) for t in d.config.targets} == {
        "a": "enforce", "r": "observe", "o": "observe"
    }  # fmt: skip
    assert by_label(d, "memdefragd_method_refused") == {"ranger": 1.0}
    # a reload to a config without ranger: the gauge goes
    path.write_text("targets:\n  - name: a\n")
    d.reload()
    assert by_label(d, "memdefragd_method_refused") == {}
    assert [t.name for t in d.config.targets] == ["a"]  # the reload took


def test_reload_keeps_the_backend_it_started_with(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("targets:\n  - name: t\n")

    d = Daemon(load_config(path), backend=FlakyBackend(failures=0), notifier=Sink(), events=False)
    path.write_text("daemon: {backend: simulated}\ntargets:\n  - name: t\n")
    d.reload()
    assert by_label(d, "memdefragd_config_reloads") == {"ok": 0, "failed": 1}
    assert d.config.daemon.backend == "kernel"
    path.write_text("daemon: {scan_interval: 5s}\ntargets:\n  - name: u\n")
    d.reload()
    assert by_label(d, "memdefragd_config_reloads") == {"failed": 1, "ok": 1}
    assert [t.name for t in d.config.targets] == ["u"]


def test_pressure_pause_is_logged_once_per_transition_not_per_reading():
    """PSI avg10 wandering above the threshold for 200 readings is one pause, one line;
    a change of cause (MemAvailable) and the end of the pause are one line each."""

    def reading(avg10: float, available: int = 1 << 40) -> MemoryState:
        return MemoryState(
            zones=(), pagetype_free=None, vmstat={}, thp={}, khugepaged={},
            pressure_some=Pressure(avg10, avg10, avg10, 0), pressure_full=None,
            meminfo=MappingProxyType({"MemAvailable": available}),
        )  # fmt: skip

    cfg = parse_config("daemon: {pressure: {psi_some_avg10: 10}}\ntargets:\n  - name: t\n")
    d = Daemon(cfg, backend=FlakyBackend(failures=0), notifier=Sink(), events=False)
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: lines.append(f"{r.levelname} {r.getMessage()}")  # type: ignore[method-assign]
    logger = logging.getLogger("memdefragd")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for i in range(200):
            d.update_pressure(reading(11.0 + i % 37 * 0.7))
        assert d.paused == "PSI memory some avg10 20.8% > 10%"  # the latest figures
        d.update_pressure(reading(0.0, available=1 << 20))
        d.update_pressure(reading(0.0, available=2 << 20))
        d.update_pressure(reading(0.0))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [line.split(":")[0] for line in lines] == [
        "WARNING pausing",
        "WARNING pausing",
        "INFO resuming",
    ], lines
    assert "MemAvailable 1 MiB" in lines[1] and d.paused is None


class SlowBackend(FlakyBackend):
    """Each cycle's memory reading moves a fake clock on: a cycle that takes `took` s."""

    def __init__(self, clock: list[float], took: float):
        super().__init__(failures=0)
        self.clock, self.took = clock, took

    def memory_state(self) -> MemoryState:
        self.clock[0] += self.took
        return super().memory_state()


def test_cycles_slower_than_half_the_interval_stretch_it(caplog):
    """Watching gets at most half the time: the work a cycle plans gets the rest."""
    now = [100.0]
    cfg = parse_config("daemon: {scan_interval: 1s}\ntargets:\n  - name: t\n")
    fast = Daemon(cfg, backend=SlowBackend(now, 0.3), notifier=Sink(), events=False,
                  clock=lambda: now[0])  # fmt: skip
    fast.step()
    assert fast._next_scan == 101.0  # the interval holds
    now[0] = 200.0
    slow = Daemon(cfg, backend=SlowBackend(now, 1.5), notifier=Sink(), events=False,
                  clock=lambda: now[0])  # fmt: skip
    slow._next_scan = 200.0
    with caplog.at_level(logging.WARNING, logger="memdefragd"):
        slow.step()
        now[0] = slow._next_scan
        slow.step()
    assert slow._next_scan == 203.0 + 3.0  # twice 1.5 s after each start
    warned = [r.getMessage() for r in caplog.records if "full cycle" in r.getMessage()]
    assert len(warned) == 1 and "took 1.50 s" in warned[0], warned  # the first: INFO
    assert "cycles now come every 3.00 s" in warned[0]


class CpuHeavyBackend(FlakyBackend):
    """Each cycle's memory reading burns `cpu` s of a fake CPU clock, no wall time."""

    def __init__(self, cpu: list[float], each: float):
        super().__init__(failures=0)
        self.cpu, self.each = cpu, each

    def memory_state(self) -> MemoryState:
        self.cpu[0] += self.each
        return super().memory_state()


def test_watching_is_charged_to_the_cpu_budget_and_stretches_the_interval(caplog):
    """A cycle's CPU time counts against budget.cpu_share (with collapsing's), and a
    cycle that uses more than half of the share of its interval pushes the next one
    out: 0.2 s of CPU at cpu_share 0.1 allows a cycle every 4 s, not every 1 s."""
    now, cpu = [100.0], [0.0]
    cfg = parse_config(
        "daemon: {scan_interval: 1s, budget: {cpu_share: 0.1}}\ntargets:\n  - name: t\n"
    )
    d = Daemon(cfg, backend=CpuHeavyBackend(cpu, 0.2), notifier=Sink(), events=False,
               clock=lambda: now[0], cpu_clock=lambda: cpu[0])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="memdefragd"):
        d.step()
        assert d._next_scan == 100.0 + 0.2 / (0.5 * 0.1)
        assert d.scheduler.snapshot(now[0]).cpu_used == pytest.approx(0.2)
        spent = d.metrics.registry.get_sample_value("memdefragd_watch_cpu_seconds_total")
        assert spent == pytest.approx(0.2)
        for _ in range(2):
            now[0] = d._next_scan
            d.step()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "full cycle" in r.getMessage()]
    # The first cycle reads every process: said at INFO; the next overrun is a warning,
    # said once.
    assert [level for level, _ in said] == ["INFO", "WARNING"], said
    assert "used 0.20 s of CPU" in said[0][1] and "the next one comes in 4.00 s" in said[0][1]
    assert "cycles now come every 4.00 s" in said[1][1]
    # exported, so that MemdefragdNotCycling waits three of these, not of scan_interval
    assert d.metrics.registry.get_sample_value("memdefragd_cycle_interval_seconds") == 4.0
    assert d.metrics.registry.get_sample_value("memdefragd_scan_interval_seconds") == 1.0
    light = Daemon(cfg, backend=CpuHeavyBackend(cpu, 0.01), notifier=Sink(), events=False,
                   clock=lambda: now[0], cpu_clock=lambda: cpu[0])  # fmt: skip
    light.step()
    assert light._next_scan == now[0] + 1.0  # 0.01 s of CPU: the interval holds
    assert light.metrics.registry.get_sample_value("memdefragd_cycle_interval_seconds") == 1.0


def test_a_fork_child_found_gone_by_a_scan_rescans_its_parent(caplog):
    """The scan can meet a short-lived fork child's exit before its event does: the
    parent is re-scanned all the same (the event, coming later, changes nothing)."""
    cfg = parse_config("targets:\n  - name: t\n")
    d = Daemon(cfg, backend=FlakyBackend(failures=0), notifier=Sink(), events=False)
    d.forks.fork(10, 11, "t", 0.0, 0.99)
    d.discovery.tracked[10] = object()  # the parent, still tracked
    with caplog.at_level(logging.INFO, logger="memdefragd"):
        d.gone(11)
    assert 10 in d._dirty
    assert "pid 10's fork child 11 exited: re-scanning it" in caplog.text
    assert d.forks.exited(11, 1.0) is None  # taken in once
    assert d.forks.forking(10)  # on its way back to its coverage
    d.discovery.tracked.clear()
