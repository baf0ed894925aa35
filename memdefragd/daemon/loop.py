"""The daemon's main loop: discover -> scan -> plan -> execute -> verify, cycle after cycle.

Everything that blocks is bounded: waits are short (signals and proc events are seen
within half a second), a request is at most one chunk and checks for SIGTERM between 2 MiB
regions, and every race with an exiting process ends as a counted, logged-once event.

Gentle and persistent (issue 7): latency-sensitive targets are paced (one region, then a
rest the scheduler derives from the call's duration; the loop sleeps until the next
request may go, in steps of at most WAIT_STEP); regions are ranked by how hot they are
(`access.py`), and a process's work waits for its first access measurement; regions that
were huge and were split again (forks, purges: `regress.py`) go first, and a fork child's
exit makes its parent be re-scanned at once.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..backends import open_backend
from ..backends.kernel.compaction import Compactor
from ..backends.kernel.ranger import ranger_refusal  # noqa: F401  (cli imports it from here)
from ..backends.protocol import Backend, privilege_problems
from ..config import Config, load_config
from ..model import (
    PAGE_SIZE,
    PMD_PAGES,
    PMD_SIZE,
    AccessDenied,
    MemoryState,
    Outcome,
    ProcessGone,
    Request,
    Vma,
)
from ..pipeline.discover import Changes, Discovery, ProcEvents, Tracked
from ..pipeline.plan.access import FIRST_WINDOW, AccessSampler, open_sampler
from ..pipeline.plan.regress import Forks, HugeMemory, coverage
from ..pipeline.plan.scheduler import Candidate, Scheduler, SchedulerSettings, pause_kinds
from ..pipeline.scan import ProcessReport, scan_process
from .httpd import HttpServer
from .logs import once as log_once
from .metrics import (
    DISCOVERY_BUCKETS,
    PACING_BUCKETS,
    REQUEST_BUCKETS,
    RESTORE_BUCKETS,
    SCAN_BUCKETS,
    Histogram,
    Snapshot,
    serve,
    target_figures,
)
from .systemd import Notifier, Watchdog, watchdog_interval

log = logging.getLogger("memdefragd")

WAIT_STEP = 0.5  # longest sleep: how late a signal or a process event may be noticed
PRESSURE_EVERY = 1.0  # seconds between readings of PSI and MemAvailable while working
PUBLISH_EVERY = 0.25  # seconds between snapshots for scrapes while requests follow quickly


@dataclass
class Stats:
    """Counters of what the daemon did, for logs, STATUS= and the exporter."""

    cycles: int = 0
    last_cycle: float = 0.0  # wall time of the last completed scan cycle
    scans: int = 0
    scan_seconds: float = 0.0
    pages_scanned: int = 0
    # Work, by (target, method[, result or reason]): an alert can name the target that fails.
    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    bytes_attempted: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_done: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_verified: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    races: Counter[str] = field(default_factory=Counter)  # exited, access_denied...
    reloads: Counter[str] = field(default_factory=Counter)  # ok, failed
    errors: Counter[str] = field(default_factory=Counter)  # unexpected, by exception type
    request_seconds: dict[str, Histogram] = field(default_factory=dict)  # by method
    scan_hist: Histogram = field(default_factory=lambda: Histogram(SCAN_BUCKETS))
    discovery_hist: Histogram = field(default_factory=lambda: Histogram(DISCOVERY_BUCKETS))
    outcomes: list[tuple[Outcome, int]] = field(default_factory=list)  # last few, verified
    # Gentle and persistent, by target: forks seen, regressions (cause: fork or drop),
    # bytes made huge again, fork child exit -> coverage restored, rests between requests.
    forks: Counter[str] = field(default_factory=Counter)
    regressions: Counter[tuple[str, str]] = field(default_factory=Counter)
    recollapsed: Counter[str] = field(default_factory=Counter)
    fork_restore: dict[str, Histogram] = field(default_factory=dict)
    pacing: dict[str, Histogram] = field(default_factory=dict)

    def record(self, outcome: Outcome, verified: int) -> None:
        target, method = outcome.request.target, outcome.request.method
        result = outcome.stopped or ("ok" if not outcome.failures else "partial")
        self.requests[target, method, result] += 1
        self.bytes_attempted[target, method] += outcome.bytes_attempted
        self.bytes_done[target, method] += outcome.bytes_done
        self.bytes_verified[target, method] += verified
        for reason, n in outcome.failures.items():
            self.failures[target, method, reason] += n
        hist = self.request_seconds.setdefault(method, Histogram(REQUEST_BUCKETS))
        hist.observe(outcome.duration)
        self.outcomes = [*self.outcomes[-99:], (outcome, verified)]


def worth_collapsing(vma: Vma) -> bool:
    """The VMAs the daemon works on: private anonymous memory (heaps, arenas, stacks).

    File-backed text could be collapsed too (CONFIG_READ_ONLY_THP_FOR_FS), but it is small
    next to heaps and its pages are shared; leaving it out also keeps idle scans cheap.
    """
    return vma.anonymous and vma.perms[1] == "w" and vma.perms[3] == "p" and (vma.collapse_eligible)


def scheduler_settings(config: Config) -> SchedulerSettings:
    d = config.daemon
    return SchedulerSettings(
        bytes_per_second=d.bytes_per_second,
        cpu_share=d.cpu_share,
        chunk_bytes=d.chunk,
        cooldown=d.cooldown,
        backoff_initial=d.backoff_initial,
        backoff_max=d.backoff_max,
        psi_some_avg10=d.psi_some_avg10,
        min_available_bytes=d.min_available,
        chunk_by_target={n: o.chunk for n, o in config.overrides.items() if o.chunk},
        cooldown_by_target={
            n: o.cooldown for n, o in config.overrides.items() if o.cooldown is not None
        },
        duty_cycle=d.duty_cycle if d.latency_sensitive else None,
        duty_by_target={t.name: duty_of(config, t.name) for t in config.targets},
        max_pause=d.max_pause,
        collapse_untouched=d.access_untouched == "last",
    )


def duty_of(config: Config, target: str) -> float | None:
    """A target's duty cycle, None when it is not latency-sensitive (so not paced).

    A target's own `latency_sensitive` wins; a target that sets only `duty_cycle` asks
    for pacing; otherwise the daemon's `pacing.latency_sensitive` (true by default).
    """
    d, o = config.daemon, config.overrides.get(target)
    sensitive = d.latency_sensitive
    if o is not None and o.latency_sensitive is not None:
        sensitive = o.latency_sensitive
    elif o is not None and o.duty_cycle is not None:
        sensitive = True
    if not sensitive:
        return None
    return o.duty_cycle if o is not None and o.duty_cycle is not None else d.duty_cycle


def config_methods(config: Config) -> set[str]:
    return {config.daemon.method} | {
        o.method for o in config.overrides.values() if o.method is not None
    }


def check_methods(config: Config, backend: Backend) -> None:
    """Refuse at start-up (or reload) a method this backend cannot carry out, saying why."""
    for method in sorted(config_methods(config)):
        reason = backend.refusal(method)
        if reason is not None:
            raise SystemExit(f"memdefragd: method {method!r}: {reason}")


def cannot_serve(config: Config, e: OSError) -> str:
    host, port = config.daemon.metrics_listen or ("", 0)
    return (
        f"cannot serve metrics on {host}:{port}: {e.strerror or e}; change or turn off "
        f"daemon.metrics.listen in {config.path}"
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        backend: Backend | None = None,
        notifier: Notifier | None = None,
        dry_run: bool = False,
        events: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.backend = backend or open_backend(config.daemon)
        check_methods(config, self.backend)
        for problem in privilege_problems(self.backend):  # once per start, each its cost
            log.warning("%s", problem)
        self.config = config
        self.notifier = notifier or Notifier()
        self.dry_run = dry_run
        self.clock = clock
        self.stats = Stats()
        self.scheduler = Scheduler(scheduler_settings(config))
        # Netlink process events come from this machine's kernel: they mean nothing to a
        # simulated machine, whose processes the periodic listing finds.
        self.events = ProcEvents() if events and self.backend.name == "kernel" else None
        self.discovery = Discovery(
            self.backend, config.targets, self.events, opener=self.backend.open,
            should_stop=lambda: self.stopping, on_rescan=self.stats.discovery_hist.observe,
        )  # fmt: skip
        self.compactor = Compactor(config.daemon.compaction_interval)
        self.access: AccessSampler | None = None  # opened by run(), for kernel targets
        self.forks = Forks()
        self.huge = HugeMemory()
        self._hotness: dict[int, dict[int, np.ndarray]] = {}  # pid -> VMA start -> per region
        self._urgent: dict[int, np.ndarray] = {}  # pid -> regions split since they were huge
        self._measure_at: dict[int, float] = {}  # pid -> when its first access window ends
        self._waiting: dict[int, float] = {}  # pid -> since when it waits for access figures
        self._made_huge: dict[int, int] = {}  # pid -> regions verified huge since its scan
        self._published = float("-inf")
        self.reports: dict[int, ProcessReport] = {}  # latest scan per pid
        self.paused: str | None = None
        self._last_pressure = float("-inf")
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._dirty: set[int] = set()  # pids to scan before the next cycle
        # Regions already sent to the kernel since each pid's last scan: a plan made from
        # that scan must not send them again (its figures predate the work).
        self._tried: dict[int, set[int]] = {}
        self._next_scan = 0.0
        self.memory: MemoryState | None = None
        self.published: Snapshot | None = None
        self.metrics_server: HttpServer | None = None  # the metrics endpoint, run() starts it
        self._metrics_listen: tuple[str, int] | None = None  # where metrics_server listens
        self._serving = False  # run() serves metrics (not with --once)
        interval = watchdog_interval()
        self.watchdog = Watchdog(interval) if interval else None

    # ---------------------------------------------------------------- control

    def request_stop(self) -> None:
        """Signal-safe: the loop stops at the next region boundary or wait step."""
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, *, once: bool = False) -> int:
        """Run until SIGTERM (or one cycle with `once`); 2 if the metrics endpoint cannot
        be bound (a config error: the address is in the config), before anything started."""
        self._serving = not once
        if self._serving:
            try:
                self.serve_metrics(self.config)
            except OSError as e:
                log.error("%s", cannot_serve(self.config, e))
                self.backend.close()
                return 2
        if self.events is not None:
            self.events.start()
        if not once and not self.dry_run:  # both would act on targets only to throw it away
            self.access, how = open_sampler(self.config.daemon.access_source, self.backend.name)
            log.info("%s", how)
        try:
            self.discovery.rescan()
            self.notifier.ready(self.status_line())
            log.info(
                "started: backend %s, method %s, %d target(s), config %s (sha256 %s)",
                self.backend.name, self.config.daemon.method, len(self.config.targets),
                self.config.path, self.config.sha256[:12],
            )  # fmt: skip
            self._next_scan = self.clock()
            while not self.stopping:
                try:
                    if self.step(once=once):
                        break
                except Exception as e:  # a bug or an unforeseen kernel answer: keep serving
                    self.stats.errors[type(e).__name__] += 1
                    if once:
                        raise
                    log_once(log, ("error", type(e).__name__), logging.ERROR,
                             "unexpected error, carrying on (logged once per kind)",
                             exc_info=True)  # fmt: skip
                    # not self.wait(): what failed may be discovery itself (EMFILE)
                    self._stop.wait(WAIT_STEP)
                self.ping()
        finally:
            self.notifier.stopping()
            log.info("stopping: %s", self.status_line())
            if self.access is not None:
                self.access.close()  # our kdamond, if we made one
            self.discovery.close()
            if self.events is not None:
                self.events.stop()
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.backend.close()
        return 0

    def step(self, *, once: bool = False) -> bool:
        """One turn of the loop; True when a --once run is complete."""
        if self._reload.is_set():
            self._reload.clear()
            self.reload()
        now = self.clock()
        due = [pid for pid, t in self._measure_at.items() if t <= now]
        for pid in due:
            del self._measure_at[pid]
        self._dirty.update(due)
        if now >= self._next_scan or self._dirty:
            full = now >= self._next_scan
            self.scan_cycle(full=full)
            if full:
                self._next_scan = now + self.config.daemon.scan_interval
            if once:
                self.drain()
                return True
        if self.scheduler.queue_length and self.clock() - self._last_pressure >= PRESSURE_EVERY:
            self.update_pressure(self.backend.pressure_state())
        if not self.work_once():
            now = self.clock()
            wake = [self._next_scan, *self._measure_at.values()]
            ready = self.scheduler.next_ready(now)
            if ready is not None:
                wake.append(ready)
            self.wait(min(WAIT_STEP, max(0.0, min(wake) - now)))
        return False

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout`, waking early for process events (which may add targets)."""
        changes = self.discovery.poll(timeout)
        if changes.forked or changes.fork_exited or changes.execd:
            self.forked(changes)  # first: a fork child may be among the dropped
        for pid in changes.dropped:
            self.forget(pid)
        self._dirty |= set(changes.added) | set(changes.retargeted)

    def forked(self, changes: Changes) -> None:
        """Forks of tracked processes: hold parent and child back while they share memory
        copy-on-write; when the child is gone, re-scan the parent now (its split regions
        come back urgent, see scan_one)."""
        now = self.clock()
        for child, parent in changes.forked.items():
            tracked = self.discovery.tracked.get(parent)
            if tracked is None:
                continue
            cov = self.coverage_now(parent)
            self.forks.fork(parent, child, tracked.target.name, now, cov)
            self.stats.forks[tracked.target.name] += 1
            log.info(
                "pid %d (%s) forked pid %d: holding both back while they share memory "
                "copy-on-write (THP coverage %s before)",
                parent, tracked.target.name, child, "unknown" if cov is None else f"{cov:.0%}",
            )  # fmt: skip
        for child in changes.execd:
            self.forks.execd(child)
        for child, parent in changes.fork_exited.items():
            if self.forks.exited(child, now) is not None and parent in self.discovery.tracked:
                log.info("pid %d's fork child %d exited: re-scanning it", parent, child)
                self._dirty.add(parent)

    def ping(self) -> None:
        now = self.clock()
        if self.watchdog is not None and self.watchdog.due(now):
            self.notifier.watchdog()
            self.watchdog.pinged(now)

    def serve_metrics(self, config: Config) -> None:
        """Serve metrics where `config` says (or nowhere), replacing the endpoint only once
        the new one is bound; OSError, with the old endpoint kept, if it cannot be."""
        want = config.daemon.metrics_listen
        if want == self._metrics_listen:  # None exactly when metrics_server is None
            return
        old = self.metrics_server
        try:
            new = self._bind_metrics(want)
        except OSError as e:
            # Same port, another address (127.0.0.1 -> 0.0.0.0): the old socket is in the
            # way. Let it go, try again, and take it back if that fails too.
            if old is None or e.errno != errno.EADDRINUSE or want is None or want[1] != old.port:
                raise
            old.stop()
            self.metrics_server = None
            try:
                new = self._bind_metrics(want)
            except OSError:
                try:
                    self.metrics_server = self._bind_metrics(self._metrics_listen)
                except OSError as back:
                    self._metrics_listen = None
                    log.error("metrics endpoint off: %s", cannot_serve(self.config, back))
                raise e from None
        else:
            if old is not None:
                old.stop()
        self.metrics_server, self._metrics_listen = new, want
        if new is None and old is not None:
            log.info("metrics endpoint off (daemon.metrics.listen: off)")

    def _bind_metrics(self, listen: tuple[str, int] | None) -> HttpServer | None:
        if listen is None:
            return None
        host, port = listen
        server = serve(host, port, lambda: self.published)
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", shown, server.port)
        return server

    def reload(self) -> None:
        """SIGHUP: a bad new config keeps the old one running, and says why."""
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
            if new.daemon.backend_key() != self.config.daemon.backend_key():
                raise SystemExit(
                    "daemon.backend and daemon.simulated take effect only at start: "
                    "restart memdefragd to change them"
                )
            check_methods(new, self.backend)
            if self._serving:  # last: nothing that follows can fail
                try:
                    self.serve_metrics(new)
                except OSError as e:
                    raise RuntimeError(cannot_serve(new, e)) from None
        except (Exception, SystemExit) as e:  # ConfigError, or a method refused
            self.stats.reloads["failed"] += 1
            log.error("reload failed, keeping the running config: %s", e)
            self.notifier.ready(f"reload failed, old config kept: {str(e).splitlines()[0]}")
            return
        old_source, self.config = self.config.daemon.access_source, new
        self.scheduler = Scheduler(scheduler_settings(new))
        if new.daemon.access_source != old_source and not self.dry_run:
            if self.access is not None:
                self.access.close()
            self.access, how = open_sampler(new.daemon.access_source, self.backend.name)
            self._hotness.clear()
            log.info("%s", how)
        self.discovery.set_targets(new.targets)
        self.compactor = Compactor(new.daemon.compaction_interval)
        self.stats.reloads["ok"] += 1
        log.info("reloaded %s (sha256 %s)", new.path, new.sha256[:12])
        self._dirty |= set(self.discovery.tracked)
        self.notifier.ready(self.status_line())

    # ---------------------------------------------------------------- cycle

    def scan_cycle(self, *, full: bool) -> None:
        """Scan every tracked process (or only new ones), then plan afresh."""
        if full:
            changes = self.discovery.rescan()
            if changes.fork_exited:
                self.forked(changes)
            for pid in changes.dropped:
                self.forget(pid)
            pids = list(self.discovery.tracked)
        else:
            pids = [p for p in self._dirty if p in self.discovery.tracked]
        self._dirty.clear()
        if self.access is not None:
            self.access.watch({pid: t.proc for pid, t in self.discovery.tracked.items()})
            if full:
                self.access.refresh()
        state = self.memory = self.backend.memory_state()
        for pid in pids:
            tracked = self.discovery.tracked.get(pid)
            if tracked is not None:
                self.scan_one(tracked, state.max_ptes_none)
        self.scheduler.plan(self.candidates(), self.clock())
        self.update_pressure(state)
        if full:
            self.stats.cycles += 1
            self.stats.last_cycle = time.time()
        sched = self.scheduler
        log.info(
            "scanned %d process(es): %d MiB queued in %d request(s)%s%s",
            len(pids), sched.queue_bytes >> 20, sched.queue_length,
            f", {sched.planned_observe_bytes >> 20} MiB left alone (observe or dry run)"
            if sched.planned_observe_bytes else "",
            f", paused: {self.paused}" if self.paused else "",
        )  # fmt: skip
        self.notifier.status(self.status_line())
        self.publish()

    def scan_one(self, tracked: Tracked, max_ptes_none: int) -> None:
        t0 = time.perf_counter()
        try:
            rep = scan_process(
                self.backend, tracked.proc, target=tracked.target.name, collect=True,
                only=worth_collapsing, max_ptes_none=max_ptes_none,
            )  # fmt: skip
        except (ProcessGone, AccessDenied) as e:
            kind = "exited" if isinstance(e, ProcessGone) else "access_denied"
            self.stats.races[kind] += 1
            # Counted either way; logged at INFO once per target and kind, since a local
            # user can start matching processes that exit at once, thousands a second.
            if not log_once(log, (kind, tracked.target.name), logging.INFO,
                            "skipping pid %d (%s): %s (more of target %s: counted in "
                            "memdefragd_races_total, logged at debug level)", tracked.proc.pid,
                            tracked.proc.comm, e, tracked.target.name):  # fmt: skip
                log.debug("skipping pid %d (%s): %s", tracked.proc.pid, tracked.proc.comm, e)
            self.forget(tracked.proc.pid)
            return
        took = time.perf_counter() - t0
        self.stats.scans += 1
        self.stats.scan_seconds += took
        self.stats.scan_hist.observe(took)
        self.stats.pages_scanned += rep.totals.present_pages
        self.reports[tracked.proc.pid] = rep
        self._tried.pop(tracked.proc.pid, None)
        self._made_huge[tracked.proc.pid] = 0
        self.regressions(tracked, rep)
        if self.access is not None:
            self.measure(tracked, rep)

    def regressions(self, tracked: Tracked, rep: ProcessReport) -> None:
        """Regions seen huge before and collapsible now go first (`_urgent`)."""
        pid, target = tracked.proc.pid, tracked.target.name
        huge, coll = _regions(rep)
        split = self.huge.scanned(pid, huge, coll)
        before = self._urgent.get(pid, np.zeros(0, np.uint64))
        urgent = coll[split]
        self._urgent[pid] = urgent
        new = int(np.count_nonzero(~np.isin(urgent, before)))
        cov = coverage(rep.totals.thp_regions, rep.totals.aligned_regions)
        if new:
            cause = "fork" if self.forks.forking(pid) else "drop"
            self.stats.regressions[target, cause] += 1
            log.info(
                "pid %d (%s): %d MiB that were huge are split again (%s; THP coverage now "
                "%s): re-queued first",
                pid, target, new * PMD_SIZE >> 20,
                "after a fork" if cause == "fork" else "coverage fell",
                "unknown" if cov is None else f"{cov:.0%}",
            )  # fmt: skip
        elif pid in self.forks.restoring and not urgent.size:
            del self.forks.restoring[pid]  # the fork split nothing: nothing to restore
        self.restored(pid, cov)

    def coverage_now(self, pid: int) -> float | None:
        """THP coverage at the last scan plus the regions verified huge since."""
        rep = self.reports.get(pid)
        if rep is None:
            return None
        t = rep.totals
        return coverage(t.thp_regions + self._made_huge.get(pid, 0), t.aligned_regions)

    def restored(self, pid: int, cov: float | None) -> None:
        done = self.forks.restored(pid, cov, self.clock())
        if done is not None:
            target, seconds = done
            self.stats.fork_restore.setdefault(target, Histogram(RESTORE_BUCKETS)).observe(seconds)
            log.info("pid %d (%s): THP coverage restored %.1f s after its fork child exited",
                     pid, target, seconds)  # fmt: skip

    def measure(self, tracked: Tracked, rep: ProcessReport) -> None:
        """This scan's access figures (hotness per region), if a window has ended."""
        pid = tracked.proc.pid
        pairs = [(v.vma, _collapsible(v.metrics)) for v in rep.vmas]
        try:
            hot = self.access.hotness(tracked.proc, pairs)  # type: ignore[union-attr]
        except (ProcessGone, AccessDenied):
            return
        if hot is None:
            now = self.clock()
            waiting = self._waiting.setdefault(pid, now)
            window = min(FIRST_WINDOW, self.config.daemon.scan_interval)
            if pid in self._hotness:
                return  # keeps its last figures
            if now - waiting > 3 * window + self.config.daemon.scan_interval:
                self._hotness[pid] = {}  # no figures coming (a refusal): rank it unmeasured
                log.info("pid %d (%s): no access figures, working on it without them",
                         pid, tracked.target.name)  # fmt: skip
            elif pid not in self._measure_at:
                self._measure_at[pid] = now + window
            return
        self._waiting.pop(pid, None)
        self._hotness[pid] = {v.start: h for (v, _), h in zip(pairs, hot, strict=True)}

    def candidates(self) -> list[Candidate]:
        out = []
        now = self.clock()
        for pid, rep in self.reports.items():
            tracked = self.discovery.tracked.get(pid)
            if tracked is None or self.forks.held(pid, now):
                continue
            target = tracked.target
            if self.dry_run:
                target = replace(target, mode="observe")
            tried = self._tried.get(pid)
            urgent = self._urgent.get(pid)
            hot = self._hotness.get(pid)
            if self.access is not None and hot is None and not (urgent is not None and urgent.size):
                continue  # first access window not over: do not collapse blind
            for v in rep.vmas:
                if v.metrics.collapsible_vpns is None or not v.metrics.collapsible_vpns.size:
                    continue
                c = Candidate.from_metrics(
                    target, pid, tracked.proc.start_time, v.vma, v.metrics,
                    hotness=None if hot is None else hot.get(v.vma.start),
                    urgent=None if urgent is None or not urgent.size else np.isin(
                        _collapsible(v.metrics), urgent
                    ),
                )  # fmt: skip
                if tried:
                    fresh = ~np.isin(c.regions, np.fromiter(tried, np.uint64, len(tried)))
                    c = replace(
                        c, regions=c.regions[fresh], present=c.present[fresh],
                        hotness=None if c.hotness is None else c.hotness[fresh],
                        urgent=None if c.urgent is None else c.urgent[fresh],
                    )  # fmt: skip
                out.append(c)
        return out

    def update_pressure(self, state: MemoryState | None = None) -> None:
        """Pause or resume on this reading of memory state. Logged once per transition:
        when a pause starts, when its cause changes (PSI to MemAvailable, say) and when it
        ends; not when only its figures move, as they do at every reading."""
        state = state or self.backend.memory_state()
        self.scheduler.pressure(state, self.clock())
        reason = self.scheduler.paused
        if pause_kinds(reason) != pause_kinds(self.paused):
            if reason:
                log.warning("pausing: %s", reason)
            else:
                log.info("resuming: memory pressure is back under the thresholds")
        self.paused = reason
        self._last_pressure = self.clock()

    def drain(self) -> None:
        """--once: carry out everything planned, within the budget, then return."""
        while not self.stopping:
            if not self.work_once():
                idle = self.scheduler.why_idle
                if not idle or idle.startswith(("empty", "paused", "backoff")):
                    return
                time.sleep(0.05)  # budget or cooldown: both refill by themselves

    def work_once(self) -> bool:
        """Carry out the best request the budget allows; False when there is none."""
        req = self.scheduler.next_request(self.clock())
        if req is None:
            return False
        tracked = self.discovery.tracked.get(req.pid)
        if tracked is None or tracked.proc.start_time != req.start_time:
            self.scheduler.forget(req.pid)
            return True
        method = self.method_for(tracked.target.name)
        req = replace(req, method=method)
        outcome = self.backend.execute(tracked.handle, req, should_stop=self._stop.is_set)
        sent = [a for lo, hi in req.ranges for a in range(lo, hi, PMD_SIZE)]
        self._tried.setdefault(req.pid, set()).update(sent[: outcome.bytes_attempted // PMD_SIZE])
        verified, huge = self.verify(tracked, req) if outcome.bytes_done else (0, _NONE)
        self.scheduler.record(outcome, self.clock())
        self.stats.record(outcome, verified)
        rest = self.persisted(tracked, req, huge)
        self.after(outcome, verified, tracked, rest)
        if self.clock() - self._published >= PUBLISH_EVERY or not self.scheduler.queue_length:
            self.publish()
        return True

    def persisted(self, tracked: Tracked, req: Request, huge: np.ndarray) -> float | None:
        """Book what a request made huge (urgent regions mended, coverage restored); the
        rest the scheduler imposed after it, None when the target is not paced."""
        pid, target = req.pid, req.target
        self.huge.made_huge(pid, huge)
        urgent = self._urgent.get(pid)
        if urgent is not None and urgent.size and huge.size:
            mended = np.isin(urgent, huge)
            self.stats.recollapsed[target] += int(np.count_nonzero(mended)) * PMD_SIZE
            self._urgent[pid] = urgent[~mended]
        self._made_huge[pid] = self._made_huge.get(pid, 0) + int(huge.size)
        if pid in self.forks.restoring:
            self.restored(pid, self.coverage_now(pid))
        if self.scheduler.settings.duty_for(target) is None:
            return None
        pace = self.scheduler.pacer.paces.get(target)
        rest = pace.last_delay if pace is not None else 0.0
        self.stats.pacing.setdefault(target, Histogram(PACING_BUCKETS)).observe(rest)
        return rest

    def method_for(self, target: str) -> str:
        o = self.config.overrides.get(target)
        return o.method if o is not None and o.method else self.config.daemon.method

    def verify(self, tracked: Tracked, req: Request) -> tuple[int, np.ndarray]:
        """Bytes of the request's ranges that are now PMD-mapped, by a fresh scan, and the
        2 MiB regions (addresses) that are wholly so."""
        vmas = [Vma(lo, hi, "rw-p", 0, "00:00", 0, "") for lo, hi in req.ranges]
        pages, heads = 0, []
        try:
            for _, w in self.backend.iter_layouts(tracked.proc, vmas):
                vpn = w.vpn[w.thp]
                pages += int(vpn.size)
                h, n = np.unique(vpn // PMD_PAGES, return_counts=True)
                heads.append(h[n == PMD_PAGES] * np.uint64(PMD_SIZE))
        except (ProcessGone, AccessDenied):
            return 0, _NONE
        return pages * PAGE_SIZE, np.concatenate(heads) if heads else _NONE

    def after(
        self, outcome: Outcome, verified: int, tracked: Tracked, rest: float | None = None
    ) -> None:
        req = outcome.request
        log.info(
            "%s pid %d (%s) %s: %d MiB attempted, %d MiB done, %d MiB verified, %.0f ms%s%s",
            req.method, req.pid, tracked.target.name, f"0x{req.ranges[0][0]:x}",
            outcome.bytes_attempted >> 20, outcome.bytes_done >> 20, verified >> 20,
            outcome.duration * 1e3,
            "" if not outcome.failures else f", failures {dict(outcome.failures)}",
            "" if rest is None else f", pace {rest * 1e3:.0f} ms",
        )  # fmt: skip
        if outcome.stopped in ("ESRCH",):
            self.stats.races["exited"] += 1
            self.forget(req.pid)
        elif outcome.stopped == "EPERM":
            log_once(log, ("EPERM", req.pid), logging.WARNING,
                 "not allowed to collapse pid %d: memdefragd needs CAP_SYS_NICE and ptrace "
                 "access to it (run as root)", req.pid)  # fmt: skip
        elif (
            outcome.stopped == "ENOMEM"
            and self.config.daemon.compaction
            and self.backend.name == "kernel"
        ):
            for node in self.compactor.maybe_compact():
                log.info("asked the kernel to compact node %d (no free 2 MiB block)", node)

    def publish(self) -> None:
        """Hand scrapes a consistent copy (one reference assignment: atomic for them)."""
        self.published = self.snapshot()
        self._published = self.clock()

    def snapshot(self) -> Snapshot:
        s, sched = self.stats, self.scheduler.snapshot(self.clock())
        reports = []
        for pid, rep in self.reports.items():
            tracked = self.discovery.tracked.get(pid)
            if tracked is None:
                continue
            reports.append((tracked.target.name, [v.metrics for v in rep.vmas]))
        memory = self.memory
        return Snapshot(
            time=time.time(),
            config_sha256=self.config.sha256,
            targets=target_figures(reports),
            requests=dict(s.requests),
            bytes_attempted=dict(s.bytes_attempted),
            bytes_done=dict(s.bytes_done),
            bytes_verified=dict(s.bytes_verified),
            failures=dict(s.failures),
            races={**s.races, **self.discovery.races()},  # scans' races, discovery's
            errors=dict(s.errors),
            reloads=dict(s.reloads),
            request_seconds={m: h.copy() for m, h in s.request_seconds.items()},
            scan_seconds=s.scan_hist.copy(),
            pages_scanned=s.pages_scanned,
            scans=s.scans,
            last_cycle=s.last_cycle,
            scan_interval=self.config.daemon.scan_interval,
            paused=self.paused,
            pressure_some_avg10=(
                memory.pressure_some.avg10 if memory and memory.pressure_some else None
            ),
            budget_tokens=sched.tokens,
            cpu_used=sched.cpu_used,
            cpu_limit=sched.cpu_limit,
            queue_bytes=sched.queue_bytes,
            memory=memory,
            pending=dict(sched.pending),
            untouched=dict(sched.untouched),
            forks=dict(s.forks),
            regressions=dict(s.regressions),
            recollapsed=dict(s.recollapsed),
            fork_restore={t: h.copy() for t, h in s.fork_restore.items()},
            pacing={t: h.copy() for t, h in s.pacing.items()},
            discovery_seconds=s.discovery_hist.copy(),
            discovery_listed=self.discovery.listed,
            discovery_tracked=len(self.discovery.tracked),
        )

    def forget(self, pid: int) -> None:
        self.reports.pop(pid, None)
        self._tried.pop(pid, None)
        self.scheduler.forget(pid)
        self.huge.forget(pid)
        self.forks.forget(pid)
        for d in (self._hotness, self._urgent, self._measure_at, self._made_huge, self._waiting):
            d.pop(pid, None)

    def status_line(self) -> str:
        s = self.stats
        done = sum(s.bytes_verified.values()) >> 20
        paused = f", paused: {self.paused}" if self.paused else ""
        return (
            f"{len(self.discovery.tracked)} process(es) tracked, {s.cycles} cycle(s), "
            f"{done} MiB made huge{paused}"
        )


_NONE = np.zeros(0, dtype=np.uint64)


def _collapsible(m) -> np.ndarray:
    """A VMA's collapsible regions as byte addresses (as Candidate.from_metrics has them)."""
    if m.collapsible_vpns is None:
        return _NONE
    return m.collapsible_vpns.astype(np.uint64) * np.uint64(PAGE_SIZE)


def _regions(rep: ProcessReport) -> tuple[np.ndarray, np.ndarray]:
    """A scan's huge and collapsible regions over all its VMAs, as byte addresses."""
    huge = [v.metrics.thp_vpns for v in rep.vmas if v.metrics.thp_vpns is not None]
    coll = [_collapsible(v.metrics) for v in rep.vmas]
    page = np.uint64(PAGE_SIZE)
    return (
        np.concatenate(huge).astype(np.uint64) * page if huge else _NONE,
        np.concatenate(coll) if coll else _NONE,
    )


def default_events() -> bool:
    """Netlink process events need the host's network namespace; tests may turn them off."""
    return os.environ.get("MEMDEFRAGD_NO_PROC_EVENTS", "") in ("", "0")
