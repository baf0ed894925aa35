"""Prometheus exposition of what the daemon saw and did.

The daemon publishes an immutable `Snapshot` at safe points (after each scan cycle and
each request); scrapes read the latest one, so a scrape never triggers work or sees a
half-updated state. Each family comes from one collector function; a collector that fails
is reported through `memdefragd_collector_success{collector}` instead of failing the scrape.

Labels are bounded: target names from the config, methods, errno names, node/zone/order
as node_exporter spells them. No pid labels.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from .. import __version__
from ..model import PAGE_SIZE, PMD_SIZE, MemoryState
from ..pipeline.score import Rollup, VmaMetrics, rollup, unusable_index
from . import httpd

log = logging.getLogger("memdefragd")

NS = "memdefragd"
KS = (32, 128)


@dataclass
class Histogram:
    """Fixed buckets, cumulative on output; seconds."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += n
            out.append(("+Inf" if b == float("inf") else repr(b), acc))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.total)


REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCAN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
PACING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
RESTORE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# A rescan reads every process (about 70 us each): ms for a few hundred, 0.3 s for 4,000.
DISCOVERY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HEATS = ("hot", "cold", "untouched", "unknown")  # as scheduler.HEATS


@dataclass(frozen=True)
class TargetFigures:
    processes: int
    totals: Rollup


@dataclass(frozen=True)
class Snapshot:
    """Everything a scrape shows, copied out of the daemon at one instant."""

    time: float
    config_sha256: str
    targets: Mapping[str, TargetFigures]
    requests: Mapping[tuple[str, str, str], int]  # (target, method, result)
    bytes_attempted: Mapping[tuple[str, str], int]  # (target, method)
    bytes_done: Mapping[tuple[str, str], int]
    bytes_verified: Mapping[tuple[str, str], int]
    failures: Mapping[tuple[str, str, str], int]  # (target, method, reason)
    races: Mapping[str, int]
    errors: Mapping[str, int]
    reloads: Mapping[str, int]
    request_seconds: Mapping[str, Histogram]
    scan_seconds: Histogram
    pages_scanned: int
    scans: int
    last_cycle: float
    scan_interval: float
    paused: str | None
    pressure_some_avg10: float | None
    budget_tokens: float
    cpu_used: float
    cpu_limit: float
    queue_bytes: int
    memory: MemoryState | None
    # Gentle and persistent (issue 7), by target unless said otherwise.
    pending: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (target, heat)
    untouched: Mapping[str, int] = field(default_factory=dict)  # held back, nobody touched
    forks: Mapping[str, int] = field(default_factory=dict)
    regressions: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (target, cause)
    recollapsed: Mapping[str, int] = field(default_factory=dict)  # bytes
    fork_restore: Mapping[str, Histogram] = field(default_factory=dict)
    pacing: Mapping[str, Histogram] = field(default_factory=dict)
    # Discovery (issue 11): what listing and matching every process costs, and finds.
    discovery_seconds: Histogram = field(default_factory=lambda: Histogram(DISCOVERY_BUCKETS))
    discovery_listed: int = 0  # processes the last complete listing read
    discovery_tracked: int = 0  # processes the targets claim now


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


# ---------------------------------------------------------------- collectors


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


def _work(s: Snapshot) -> Iterator[Metric]:
    req = CounterMetricFamily(
        f"{NS}_requests", "Defrag requests carried out, by target, method and result.",
        labels=["target", "method", "result"],
    )  # fmt: skip
    for key, n in sorted(s.requests.items()):
        req.add_metric(list(key), n)
    yield req
    for name, data, doc in (
        ("attempted_bytes", s.bytes_attempted, "Bytes of regions sent to the backend."),
        ("done_bytes", s.bytes_done, "Bytes the backend reported defragmented."),
        ("verified_bytes", s.bytes_verified, "Bytes found huge by re-reading after a request."),
    ):
        c = CounterMetricFamily(f"{NS}_{name}", doc, labels=["target", "method"])
        for key, n in sorted(data.items()):
            c.add_metric(list(key), n)
        yield c
    fail = CounterMetricFamily(
        f"{NS}_failures",
        "2 MiB regions that failed, by target, method and reason (errno name, or "
        "Translation Ranger's failure category).",
        labels=["target", "method", "reason"],
    )
    for key, n in sorted(s.failures.items()):
        fail.add_metric(list(key), n)
    yield fail
    dur = HistogramMetricFamily(
        f"{NS}_request_duration_seconds", "Time in the kernel per request.", labels=["method"]
    )
    for method, h in sorted(s.request_seconds.items()):
        dur.add_metric([method], h.cumulative(), h.total)
    yield dur
    scan = HistogramMetricFamily(f"{NS}_scan_duration_seconds", "Time to scan one process.")
    scan.add_metric([], s.scan_seconds.cumulative(), s.scan_seconds.total)
    yield scan
    yield CounterMetricFamily(
        f"{NS}_scanned_pages", "Present pages scanned.", value=s.pages_scanned
    )
    for name, data, doc in (
        ("races", s.races, "Processes that exited or refused access mid-work, by kind."),
        ("errors", s.errors, "Unexpected errors the daemon carried on after, by type."),
    ):
        c = CounterMetricFamily(f"{NS}_{name}", doc, labels=["kind"])
        for kind, n in sorted(data.items()):
            c.add_metric([kind], n)
        yield c


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
        f"{NS}_budget_cpu_used_ratio", "Kernel time used over the CPU budget's window.",
        value=s.cpu_used / s.cpu_limit if s.cpu_limit else 0.0,
    )  # fmt: skip
    yield GaugeMetricFamily(
        f"{NS}_queued_bytes", "Bytes planned and not yet done.", value=s.queue_bytes
    )
    rel = CounterMetricFamily(
        f"{NS}_config_reloads", "Config reloads, by result.", labels=["result"]
    )
    for result in ("ok", "failed"):
        rel.add_metric([result], s.reloads.get(result, 0))
    yield rel
    info = GaugeMetricFamily(f"{NS}_config_info", "The loaded config.", labels=["sha256"])
    info.add_metric([s.config_sha256], 1)
    yield info
    build = GaugeMetricFamily(f"{NS}_build_info", "memdefragd's version.", labels=["version"])
    build.add_metric([__version__], 1)
    yield build
    yield GaugeMetricFamily(
        f"{NS}_scan_interval_seconds", "The configured time between full scan cycles.",
        value=s.scan_interval,
    )  # fmt: skip
    yield GaugeMetricFamily(
        f"{NS}_last_cycle_timestamp_seconds", "Unix time of the last completed scan cycle.",
        value=s.last_cycle,
    )  # fmt: skip


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
    """Pacing, access-aware priority and re-collapse after forks and regressions."""
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
    forks = CounterMetricFamily(
        f"{NS}_forks", "Forks of tracked processes (their huge pages may split by copy-on-write).",
        labels=["target"],
    )  # fmt: skip
    for t, n in sorted(s.forks.items()):
        forks.add_metric([t], n)
    yield forks
    reg = CounterMetricFamily(
        f"{NS}_regressions",
        "Times huge regions of a process were found split again, by cause (fork: after a "
        "fork child exited; drop: coverage fell otherwise).",
        labels=["target", "cause"],
    )
    for (t, cause), n in sorted(s.regressions.items()):
        reg.add_metric([t, cause], n)
    yield reg
    rec = CounterMetricFamily(
        f"{NS}_recollapsed_bytes", "Bytes made huge again after they had been split.",
        labels=["target"],
    )  # fmt: skip
    for t, n in sorted(s.recollapsed.items()):
        rec.add_metric([t], n)
    yield rec
    for name, data, doc in (
        ("fork_restore_seconds", s.fork_restore,
         "From a fork child's exit to its parent's THP coverage being restored."),
        ("pacing_delay_seconds", s.pacing,
         "Rest imposed on a latency-sensitive target after each request."),
    ):  # fmt: skip
        h = HistogramMetricFamily(f"{NS}_{name}", doc, labels=["target"])
        for t, hist in sorted(data.items()):
            h.add_metric([t], hist.cumulative(), hist.total)
        yield h


def _discovery(s: Snapshot) -> Iterator[Metric]:
    """Listing every process and matching it against the targets: bounded, and seen."""
    took = HistogramMetricFamily(
        f"{NS}_discovery_duration_seconds",
        "Time to list every process and match it against the targets (one rescan).",
    )
    took.add_metric([], s.discovery_seconds.cumulative(), s.discovery_seconds.total)
    yield took
    yield GaugeMetricFamily(
        f"{NS}_discovery_listed_processes", "Processes the last complete rescan read.",
        value=s.discovery_listed,
    )  # fmt: skip
    yield GaugeMetricFamily(
        f"{NS}_discovery_tracked_processes", "Processes the targets claim now.",
        value=s.discovery_tracked,
    )  # fmt: skip


COLLECTORS: dict[str, Callable[[Snapshot], Iterator[Metric]]] = {
    "targets": _targets,
    "work": _work,
    "state": _state,
    "system": _system,
    "persistence": _persistence,
    "discovery": _discovery,
}


class SnapshotCollector(Collector):
    """Yields the families of the latest snapshot; one failing part fails only itself."""

    def __init__(self, source: Callable[[], Snapshot | None]):
        self.source = source

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
        for name, fn in COLLECTORS.items():
            t0 = time.perf_counter()
            try:
                families = list(fn(snap)) if snap is not None else []
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
    themselves, and the snapshot's cannot without collecting.) Collection runs on the
    server's loop: it formats the published snapshot, with no I/O but /proc/self for the
    process figures, in a few milliseconds."""

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


def serve(
    address: str,
    port: int,
    source: Callable[[], Snapshot | None],
    limits: httpd.Limits | None = None,
) -> httpd.HttpServer:
    """Serve the metrics on address:port from one thread, every connection bounded in
    time and number (httpd.py); OSError if it cannot bind. The caller stop()s it."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(source))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, resident memory: our cost
    return httpd.start(address, port, metrics_app(registry), limits)
