"""Prometheus exposition of what the daemon saw and did.

Events are counted where they happen, on prometheus_client's own `Counter`, `Histogram`
and `Gauge` objects, which `Metrics` holds for one daemon on its own registry (two daemons
in one process, as in tests, never share a count). What only a scan can tell (per-target
coverage and contiguity, the queue, free memory, why work is paused) is computed from an
immutable `Snapshot` the daemon publishes at safe points (after each scan cycle and each
request), so a scrape never triggers work or sees a half-made plan.

The families come in groups (GROUPS); a group that fails is reported through
`memdefragd_collector_success{collector}` instead of failing the scrape.

Labels are bounded: target names from the config, methods, errno names, node/zone/order
as node_exporter spells them. No pid labels.
"""

from __future__ import annotations

import errno
import gzip
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from .. import __version__
from ..model import PAGE_SIZE, PMD_SIZE, Heat, MemoryState, Outcome
from ..pipeline.plan.scheduler import SchedulerState
from ..pipeline.score import Rollup, VmaMetrics, rollup, unusable_index
from . import httpd

log = logging.getLogger("memdefragd")

NS = "memdefragd"
KS = (32, 128)

REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCAN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
PACING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RESTORE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# A rescan reads every process (about 70 us each): ms for a few hundred, 0.3 s for 4,000.
DISCOVERY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HEATS = tuple(Heat)
# The groups a scrape is made of, in its order; each is reported by collector_success.
GROUPS = ("targets", "work", "state", "system", "persistence", "discovery")


@dataclass(frozen=True)
class TargetFigures:
    processes: int
    totals: Rollup


@dataclass(frozen=True)
class Snapshot:
    """The gauges only a scan (and the plan made from it) can tell, at one instant."""

    targets: Mapping[str, TargetFigures]
    paused: str | None
    pressure_some_avg10: float | None
    budget_tokens: float
    cpu_used: float
    cpu_limit: float
    queue_bytes: int
    memory: MemoryState | None
    # Gentle and persistent (issue 7), by target.
    pending: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (target, heat)
    untouched: Mapping[str, int] = field(default_factory=dict)  # held back, nobody touched

    @classmethod
    def of(
        cls,
        processes: Iterable[tuple[str, Sequence[VmaMetrics]]],
        plan: SchedulerState,
        memory: MemoryState | None,
        paused: str | None,
    ) -> Snapshot:
        """From the last scans (target name and VMA metrics, per process), the plan's
        state and the last reading of memory."""
        return cls(
            targets=target_figures(processes),
            paused=paused,
            pressure_some_avg10=(
                memory.pressure_some.avg10 if memory and memory.pressure_some else None
            ),
            budget_tokens=plan.tokens,
            cpu_used=plan.cpu_used,
            cpu_limit=plan.cpu_limit,
            queue_bytes=plan.queue_bytes,
            memory=memory,
            pending=dict(plan.pending),
            untouched=dict(plan.untouched),
        )


def target_figures(
    processes: Iterable[tuple[str, Sequence[VmaMetrics]]],
) -> dict[str, TargetFigures]:
    """Per target name: its processes, and one rollup over all their VMAs."""
    groups: dict[str, list[Sequence[VmaMetrics]]] = {}
    for name, metrics in processes:
        groups.setdefault(name, []).append(metrics)
    return {
        name: TargetFigures(len(procs), rollup((m for ms in procs for m in ms), KS))
        for name, procs in groups.items()
    }


PAUSE_REASONS = ("pressure", "low_memory", "other")


def pause_reason_label(reason: str | None) -> str:
    """A bounded label value (one of PAUSE_REASONS) for a free-text pause reason."""
    if not reason:
        return ""
    low = reason.lower()
    if "psi" in low or "pressure" in low:
        return "pressure"
    if "available" in low:
        return "low_memory"
    return "other"


# ---------------------------------------------------------------- events


_M = TypeVar("_M", bound=MetricWrapperBase)


class _Group:
    """The live metrics of one scrape group (GROUPS), in the order they are declared."""

    def __init__(self) -> None:
        self.members: list[MetricWrapperBase] = []

    def counter(self, name: str, doc: str, *labels: str) -> Counter:
        return self._add(Counter(f"{NS}_{name}", doc, labels, registry=None))

    def histogram(self, name: str, doc: str, buckets: Sequence[float], *labels: str) -> Histogram:
        return self._add(Histogram(f"{NS}_{name}", doc, labels, registry=None, buckets=buckets))

    def gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return self._add(Gauge(f"{NS}_{name}", doc, labels, registry=None))

    def _add(self, metric: _M) -> _M:
        self.members.append(metric)
        return metric


# Families of one shape: bytes of work by (target, method), as (name, help).
WORK_BYTES = (
    ("attempted_bytes", "Bytes of regions sent to the backend."),
    ("done_bytes", "Bytes the backend reported defragmented."),
    ("verified_bytes", "Bytes found huge by re-reading after a request."),
)


class Metrics:
    """One daemon's metrics: what it counts as things happen, and its registry, which
    also serves the gauges of the latest snapshot (`source`) and the process's own cost
    (process_cpu_seconds_total, resident memory)."""

    def __init__(self, source: Callable[[], Snapshot | None] = lambda: None):
        groups = {name: _Group() for name in ("work", "state", "persistence", "discovery")}
        self._work(groups["work"])
        self._state(groups["state"])
        self._persistence(groups["persistence"])
        self._discovery(groups["discovery"])
        self._counted_races: dict[str, int] = {}
        self._sha256: str | None = None
        self.registry = CollectorRegistry()
        live = {name: g.members for name, g in groups.items()}
        self.registry.register(GroupCollector(source, live))
        ProcessCollector(registry=self.registry)

    def _work(self, g: _Group) -> None:
        """Work, by (target, method[, result or reason]): an alert can name the target
        that fails."""
        self.requests = g.counter(
            "requests", "Defrag requests carried out, by target, method and result.",
            "target", "method", "result",
        )  # fmt: skip
        self.attempted, self.done, self.verified = (
            g.counter(name, doc, "target", "method") for name, doc in WORK_BYTES
        )
        self.failures = g.counter(
            "failures",
            "2 MiB regions that failed, by target, method and reason (errno name, or "
            "Translation Ranger's failure category).",
            "target", "method", "reason",
        )  # fmt: skip
        self.request_seconds = g.histogram(
            "request_duration_seconds", "Time in the kernel per request.", REQUEST_BUCKETS, "method"
        )
        self.ranger_conflicts = g.counter(
            "ranger_window_conflicts",
            "Times a Translation Ranger pass of another tracked process filled the anchor "
            "window of one of the target's processes (the RFC kernel anchors every process "
            "at the start of its zone): that process gets no ranger pass while the other "
            "holds the window. Counted when such a hold starts.",
            "target",
        )
        self.ranger_held = g.gauge(
            "ranger_held_processes",
            "The target's processes that get no Translation Ranger pass now, because "
            "another tracked process's pass holds their anchor window.",
            "target",
        )
        self.scan_seconds = g.histogram(
            "scan_duration_seconds", "Time to scan one process.", SCAN_BUCKETS
        )
        self.scanned_pages = g.counter("scanned_pages", "Present pages scanned.")
        self.scans = g.counter(
            "scans",
            "Process scans by target and result: read (VMAs and pagemap read), or kept (a "
            "full cycle kept the last scan: nothing to do for it and no fault since).",
            "target", "result",
        )  # fmt: skip
        self.scan_cpu = g.counter(
            "scan_cpu_seconds",
            "CPU time the daemon spent scanning each target's processes (VMA listing, "
            "pagemap, access figures).",
            "target",
        )
        self.watch_cpu = g.counter(
            "watch_cpu_seconds",
            "CPU time the daemon spent watching: discovery, matching, scans and planning; "
            "charged to budget.cpu_share with the kernel's time collapsing.",
        )
        self.vma_listings = g.counter(
            "vma_listings",
            "VMA listings read for scans, by source: smaps walks every page table of the "
            "target under its mmap lock, maps does not.",
            "source",
        )
        self.races = g.counter(
            "races", "Processes that exited or refused access mid-work, by kind.", "kind"
        )
        self.errors = g.counter(
            "errors", "Unexpected errors the daemon carried on after, by type.", "kind"
        )

    def _state(self, g: _Group) -> None:
        """The daemon itself."""
        self.reloads = g.counter("config_reloads", "Config reloads, by result.", "result")
        self.config_info = g.gauge("config_info", "The loaded config.", "sha256")
        self.build_info = g.gauge("build_info", "memdefragd's version.", "version")
        self.scan_interval = g.gauge(
            "scan_interval_seconds", "The configured time between full scan cycles."
        )
        self.last_cycle = g.gauge(
            "last_cycle_timestamp_seconds", "Unix time of the last completed scan cycle."
        )
        self.cycle_interval = g.gauge(
            "cycle_interval_seconds",
            "The time from the start of the last full scan cycle to the next one's: "
            "scan_interval, or longer when that cycle's own cost stretched it (more than "
            "half of scan_interval, or of budget.cpu_share of it: the log says which).",
        )
        self.method_refused = g.gauge(
            "method_refused",
            "1 for each method the config asks for that this machine cannot carry out (a "
            "kernel before 6.1 has no MADV_COLLAPSE): its targets are observed only.",
            "method",
        )
        for result in ("ok", "failed"):  # both always there
            self.reloads.labels(result)
        self.build_info.labels(__version__).set(1)

    def _persistence(self, g: _Group) -> None:
        """Gentle and persistent, by target: forks seen, regressions (cause: fork or drop),
        bytes made huge again, fork child exit -> coverage restored, rests between requests."""
        self.forks = g.counter(
            "forks", "Forks of tracked processes (their huge pages may split by copy-on-write).",
            "target",
        )  # fmt: skip
        self.regressions = g.counter(
            "regressions",
            "Times huge regions of a process were found split again, by cause (fork: after a "
            "fork child exited; drop: coverage fell otherwise).",
            "target", "cause",
        )  # fmt: skip
        self.recollapsed = g.counter(
            "recollapsed_bytes", "Bytes made huge again after they had been split.", "target"
        )
        self.fork_restore = g.histogram(
            "fork_restore_seconds",
            "From a fork child's exit to its parent's THP coverage being restored.",
            RESTORE_BUCKETS, "target",
        )  # fmt: skip
        self.pacing = g.histogram(
            "pacing_delay_seconds",
            "Rest imposed on a latency-sensitive target after each request.",
            PACING_BUCKETS, "target",
        )  # fmt: skip

    def _discovery(self, g: _Group) -> None:
        """Discovery (issue 11): what listing and matching every process costs, and finds."""
        self.discovery_seconds = g.histogram(
            "discovery_duration_seconds",
            "Time to list every process and match it against the targets (one rescan).",
            DISCOVERY_BUCKETS,
        )
        self.listed = g.gauge(
            "discovery_listed_processes", "Processes the last complete rescan read."
        )
        self.tracked = g.gauge("discovery_tracked_processes", "Processes the targets claim now.")

    def record(self, outcome: Outcome, verified: int) -> None:
        """A request carried out, and the bytes its verification found huge."""
        target, method = outcome.request.target, outcome.request.method
        result = outcome.stopped or ("ok" if not outcome.failures else "partial")
        self.requests.labels(target, method, result).inc()
        self.attempted.labels(target, method).inc(outcome.bytes_attempted)
        self.done.labels(target, method).inc(outcome.bytes_done)
        self.verified.labels(target, method).inc(verified)
        for reason, n in outcome.failures.items():
            self.failures.labels(target, method, reason).inc(n)
        self.request_seconds.labels(method).observe(outcome.duration)

    def configured(
        self, sha256: str, scan_interval: float, refused: Mapping[str, str] | None = None
    ) -> None:
        """The config in force (at start and after each reload), and the methods in it
        this machine refuses."""
        self.method_refused.clear()
        for method in refused or {}:
            self.method_refused.labels(method).set(1)
        old, self._sha256 = self._sha256, sha256
        self.config_info.labels(sha256).set(1)
        if old is not None and old != sha256:  # after the new one: never a scrape without
            self.config_info.remove(old)
        self.scan_interval.set(scan_interval)
        self.cycle_interval.set(scan_interval)  # until a cycle says otherwise

    def targets(self, methods: Mapping[str, str]) -> None:
        """Every per-target series at 0 from the moment a target is configured (target ->
        its method): a series born at its first event would have that event missed by
        rate() and increase(), so a first fork, regression or request would never show."""
        for target, method in methods.items():
            for result in ("ok", "partial"):
                self.requests.labels(target, method, result)
            for c in (self.attempted, self.done, self.verified):
                c.labels(target, method)
            self.forks.labels(target)
            for cause in ("fork", "drop"):
                self.regressions.labels(target, cause)
            self.recollapsed.labels(target)
            self.fork_restore.labels(target)
            self.pacing.labels(target)
            if method.startswith("ranger"):
                self.ranger_conflicts.labels(target)
                self.ranger_held.labels(target)

    def count_races(self, counts: Mapping[str, int]) -> None:
        """Races another part counts itself (discovery's, totals so far by kind): the
        counter grows by what is new since the last call."""
        for kind, n in counts.items():
            self.races.labels(kind).inc(n - self._counted_races.get(kind, 0))
            self._counted_races[kind] = n


def total(metric: Counter) -> float:
    """A counter's value summed over its labels (what the status line shows)."""
    return sum(s.value for f in metric.collect() for s in f.samples if s.name.endswith("_total"))


# ---------------------------------------------------------------- gauges from scans


def _targets(s: Snapshot) -> Iterator[Metric]:
    def gauge(name: str, doc: str, labels: tuple[str, ...] = ("target",)) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{NS}_target_{name}", doc, labels=list(labels))

    procs = gauge("processes", "Processes the target matched at the last scan.")
    present = gauge("present_bytes", "Resident bytes in the target's scanned VMAs.")
    thp = gauge("thp_bytes", "Bytes mapped by PMD-size huge pages.")
    cov = gauge("thp_coverage_ratio", "Huge 2 MiB regions over aligned regions.")
    coll = gauge("collapsible_bytes", "Bytes of aligned regions that could be collapsed.")
    runs = gauge("contiguity_runs", "Translation-contiguous runs (vpn and pfn both step by 1).")
    covk = gauge(
        "contiguity_coverage_ratio",
        "Share of present pages inside the K largest runs (a K-entry range TLB).",
        ("target", "k"),
    )
    for name, f in sorted(s.targets.items()):
        t = f.totals
        procs.add_metric([name], f.processes)
        present.add_metric([name], t.present_pages * PAGE_SIZE)
        thp.add_metric([name], t.thp_pages * PAGE_SIZE)
        if t.thp_coverage is not None:
            cov.add_metric([name], t.thp_coverage)
        coll.add_metric([name], t.collapsible_regions * PMD_SIZE)
        if t.contiguity is not None:
            runs.add_metric([name], t.contiguity.runs)
            for k in KS:
                covk.add_metric([name, str(k)], t.contiguity.coverage[k])
    yield from (procs, present, thp, cov, coll, runs, covk)


def _state(s: Snapshot) -> Iterator[Metric]:
    paused = GaugeMetricFamily(
        f"{NS}_paused", "1 for the kind of reason work is paused for, else 0.", labels=["reason"]
    )
    now = pause_reason_label(s.paused)
    for reason in PAUSE_REASONS:  # every series always there: no gaps, no stale ones
        paused.add_metric([reason], 1 if reason == now else 0)
    yield paused
    if s.pressure_some_avg10 is not None:
        yield GaugeMetricFamily(
            f"{NS}_memory_pressure_some_ratio",
            "PSI memory 'some avg10' at the last reading, as a ratio.",
            value=s.pressure_some_avg10 / 100,
        )
    yield GaugeMetricFamily(
        f"{NS}_budget_available_bytes", "Bytes that may start now under the bytes/s budget.",
        value=s.budget_tokens,
    )  # fmt: skip
    yield GaugeMetricFamily(
        f"{NS}_budget_cpu_used_ratio",
        "CPU time (collapsing and watching) used over the CPU budget's window.",
        value=s.cpu_used / s.cpu_limit if s.cpu_limit else 0.0,
    )  # fmt: skip
    yield GaugeMetricFamily(
        f"{NS}_queued_bytes", "Bytes planned and not yet done.", value=s.queue_bytes
    )


def _system(s: Snapshot) -> Iterator[Metric]:
    if s.memory is None:
        return
    free = GaugeMetricFamily(
        f"{NS}_free_blocks", "Free blocks per order (/proc/buddyinfo).",
        labels=["node", "zone", "order"],
    )  # fmt: skip
    idx = GaugeMetricFamily(
        f"{NS}_unusable_free_space_index_ratio",
        "Share of free memory in blocks smaller than the order (Gorman's unusable index).",
        labels=["node", "zone", "order"],
    )
    for z in s.memory.zones:
        for order, (n, u) in enumerate(zip(z.free, unusable_index(z.free), strict=True)):
            labels = [str(z.node), z.zone, str(order)]
            free.add_metric(labels, n)
            idx.add_metric(labels, float(u))
    yield free
    yield idx


def _persistence(s: Snapshot) -> Iterator[Metric]:
    """Work not done yet, by how hot its regions are."""
    pend = GaugeMetricFamily(
        f"{NS}_pending_bytes",
        "Bytes planned and not yet done, by how hot their regions are (hot: at least half "
        "their pages accessed in the last window; untouched: none, queued last or, with "
        "access.untouched skip, held back; unknown: not measured).",
        labels=["target", "heat"],
    )
    targets = sorted({t for t, _ in s.pending} | set(s.untouched) | set(s.targets))
    for t in targets:
        for heat in HEATS:
            n = s.pending.get((t, heat), 0) + (s.untouched.get(t, 0) if heat == "untouched" else 0)
            pend.add_metric([t, heat], n)
    yield pend


# Per group, the families computed from the snapshot (groups not named have none).
COLLECTORS: dict[str, Callable[[Snapshot], Iterator[Metric]]] = {
    "targets": _targets,
    "state": _state,
    "system": _system,
    "persistence": _persistence,
}


def _live(metric: MetricWrapperBase) -> Iterator[Metric]:
    """A live metric's families without the `_created` series prometheus_client adds:
    the exposition stays the one the dashboard and the rules were written against
    (done here, not with the process-wide `disable_created_metrics()`)."""
    for family in metric.collect():
        family.samples = [s for s in family.samples if not s.name.endswith("_created")]
        yield family


class GroupCollector(Collector):
    """Each group's families: its live metrics, then its gauges from the latest snapshot
    (none before the first); a group that fails leaves only itself out."""

    def __init__(
        self,
        source: Callable[[], Snapshot | None],
        live: Mapping[str, Sequence[MetricWrapperBase]],
    ):
        self.source = source
        self.live = live

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        ok = GaugeMetricFamily(
            f"{NS}_collector_success", "1 if the collector succeeded.", labels=["collector"]
        )
        took = GaugeMetricFamily(
            f"{NS}_collector_duration_seconds", "Time the collector took.", labels=["collector"]
        )
        for name in GROUPS:
            t0 = time.perf_counter()
            try:
                families = [f for m in self.live.get(name, ()) for f in _live(m)]
                derived = COLLECTORS.get(name)
                if derived is not None and snap is not None:
                    families += derived(snap)
            except Exception:
                log.exception("metrics collector %s failed", name)
                families, success = [], 0
            else:
                success = 1
            yield from families
            ok.add_metric([name], success)
            took.add_metric([name], time.perf_counter() - t0)
        yield ok
        yield took


INDEX = b"""<!doctype html>
<html><head><title>memdefragd</title></head>
<body><h1>memdefragd</h1><p><a href="/metrics">Metrics</a></p></body></html>
"""


def metrics_app(registry: CollectorRegistry) -> httpd.App:
    """GET/HEAD /metrics as prometheus_client's own handler answers it (text or
    OpenMetrics by the Accept header, gzip if accepted), / a link to it, 404 elsewhere.
    (`name[]` is ignored: prometheus_client restricts only collectors that describe()
    themselves, and the group collector cannot without collecting.) Collection runs on
    the server's loop: it reads the live metrics and formats the published snapshot, with
    no I/O but /proc/self for the process figures, in a few milliseconds."""

    def app(request: httpd.Request) -> httpd.Response:
        url = urlsplit(request.target)
        if url.path == "/metrics":
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            body = encoder(registry)
            headers = [("Content-Type", content_type)]
            if gzip_accepted(request.headers.get("accept-encoding", "")):
                body = gzip.compress(body)
                headers.append(("Content-Encoding", "gzip"))
            return httpd.Response(200, tuple(headers), body)
        if url.path == "/":
            return httpd.Response(200, (("Content-Type", "text/html; charset=utf-8"),), INDEX)
        return httpd.Response(
            404, (("Content-Type", "text/plain; charset=utf-8"),), b"not found; see /metrics\n"
        )

    return app


def cannot_serve(listen: tuple[str, int] | None, path: object, e: OSError) -> str:
    """Why metrics cannot be served at `listen`, and what to change (in config `path`)."""
    host, port = listen or ("", 0)
    return (
        f"cannot serve metrics on {host}:{port}: {e.strerror or e}; change or turn off "
        f"daemon.metrics.listen in {path}"
    )


class Endpoint:
    """Where a daemon's metrics are served, across reloads: a new address replaces the old
    one only once it is bound, so a bad address in a new config loses nothing."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.server: httpd.HttpServer | None = None
        self.listen: tuple[str, int] | None = None  # None exactly when server is None

    def move(self, want: tuple[str, int] | None, path: object) -> None:
        """Serve on `want` (None: nowhere); OSError, with the old endpoint kept, if it
        cannot be bound. `path` is the running config's, named if the old one is lost."""
        if want == self.listen:
            return
        old = self.server
        try:
            new = self._bind(want)
        except OSError as e:
            # Same port, another address (127.0.0.1 -> 0.0.0.0): the old socket is in the
            # way. Let it go, try again, and take it back if that fails too.
            if old is None or e.errno != errno.EADDRINUSE or want is None or want[1] != old.port:
                raise
            old.stop()
            self.server = None
            try:
                new = self._bind(want)
            except OSError:
                try:
                    self.server = self._bind(self.listen)
                except OSError as back:
                    log.error("metrics endpoint off: %s", cannot_serve(self.listen, path, back))
                    self.listen = None
                raise e from None
        else:
            if old is not None:
                old.stop()
        self.server, self.listen = new, want
        if new is None and old is not None:
            log.info("metrics endpoint off (daemon.metrics.listen: off)")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def _bind(self, listen: tuple[str, int] | None) -> httpd.HttpServer | None:
        if listen is None:
            return None
        host, port = listen
        server = serve(host, port, self.registry)
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", shown, server.port)
        return server


def serve(
    address: str,
    port: int,
    registry: CollectorRegistry,
    limits: httpd.Limits | None = None,
) -> httpd.HttpServer:
    """Serve `registry` (a daemon's `Metrics.registry`) on address:port from one thread,
    every connection bounded in time and number (httpd.py); OSError if it cannot bind.
    The caller stop()s it."""
    return httpd.start(address, port, metrics_app(registry), limits)
