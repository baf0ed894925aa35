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

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..backends import open_backend
from ..backends.protocol import (
    AccessSampler,
    Backend,
    compactor,
    limitations,
    privilege_problems,
    process_events,
    sparse_scan,
)
from ..config import Config, check_methods, load_config, scheduler_settings
from ..logonce import once as log_once
from ..model import (
    PMD_SIZE,
    AccessDenied,
    MemoryState,
    Outcome,
    ProcessGone,
    ProcessInfo,
    Request,
    Vma,
)
from ..pipeline.discover import Changes, Discovery, Tracked
from ..pipeline.plan.access import Windows, by_vma, open_sampler, sampled_regions
from ..pipeline.plan.anchors import AnchorWindows, ProcKey
from ..pipeline.plan.regress import Forks, HugeMemory, split_again
from ..pipeline.plan.scheduler import Candidate, Reaction, Scheduler, pause_kinds, reaction
from ..pipeline.scan import (
    ProcessReport,
    huge_and_collapsible,
    scan_process,
    vma_key,
    with_known_flags,
    worth_collapsing,
)
from ..pipeline.verify import Verified, verify
from .metrics import Endpoint, Metrics, Snapshot, cannot_serve, total
from .state import Process
from .systemd import Notifier, Watchdog, watchdog_interval

log = logging.getLogger("memdefragd")

WAIT_STEP = 0.5  # longest sleep: how late a signal or a process event may be noticed
PRESSURE_EVERY = 1.0  # seconds between readings of PSI and MemAvailable while working
PUBLISH_EVERY = 0.25  # seconds between snapshots for scrapes while requests follow quickly
# A full cycle (discovery, scans, access figures, plan) that takes longer than half the
# scan interval stretches the interval, so that the work it plans gets the other half: a
# 1 GiB target in an emulated guest took 1.1 s to scan at `scan_interval: 1s`, and the
# daemon did one request per cycle.
WATCH_SHARE = 0.5


def next_full_scan(
    started: float, took: float, interval: float, cpu: float = 0.0, cpu_share: float = 1.0
) -> float:
    """When the next full cycle is due, for one that began at `started`, took `took`
    seconds and `cpu` seconds of CPU: at most WATCH_SHARE of the wall time and of the
    CPU budget (`budget.cpu_share`) go to watching, the rest to collapsing."""
    return started + max(interval, took / WATCH_SHARE, cpu / (WATCH_SHARE * cpu_share))


class Daemon:
    """The pipeline's control flow: when to discover, scan, plan, carry out, verify and
    publish. What it remembers of each process is in `procs` (state.py); the stages are
    in pipeline/, what it counts in `metrics` (metrics.py)."""

    def __init__(
        self,
        config: Config,
        *,
        backend: Backend | None = None,
        notifier: Notifier | None = None,
        dry_run: bool = False,
        events: bool = True,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
    ):
        self.backend = backend or open_backend(config.daemon)
        config, refused = check_methods(config, self.backend)
        for problem in privilege_problems(self.backend):  # once per start, each its cost
            log.warning("%s", problem)
        for missing in limitations(self.backend):  # the kernel's, with what replaces it
            log.info("%s", missing)
        self.config = config
        self.notifier = notifier or Notifier()
        self.dry_run = dry_run
        self.clock = clock
        self.cpu_clock = cpu_clock  # this thread's CPU time: what watching costs
        self.metrics = Metrics(lambda: self.published)
        self.metrics.configured(config.sha256, config.daemon.scan_interval, refused)
        self.metrics.targets({t.name: self.method_for(t.name) for t in config.targets})
        self.cycles = 0  # completed full scan cycles
        self.outcomes: deque[tuple[Outcome, int]] = deque(maxlen=100)  # the last, verified
        self.scheduler = Scheduler(scheduler_settings(config))
        # Process events where the machine has them (the kernel's proc connector); without
        # (the simulator), the periodic listing finds processes.
        self.events = process_events(self.backend) if events else None
        self.discovery = Discovery(
            self.backend, config.targets, self.events, opener=self.backend.open,
            should_stop=lambda: self.stopping, on_rescan=self.metrics.discovery_seconds.observe,
        )  # fmt: skip
        self.compactor = compactor(self.backend, config.daemon.compaction_interval)
        self.access: AccessSampler | None = None  # opened by run(), where the backend can
        self.forks = Forks()
        self.huge = HugeMemory()
        # Translation Ranger's anchor windows: who holds whose (pipeline/plan/anchors.py)
        self.anchors = AnchorWindows()
        self._held_targets: set[str] = set()  # targets memdefragd_ranger_held_processes shows
        self.procs: dict[int, Process] = {}  # what we know of each tracked process
        self._published = float("-inf")
        self.paused: str | None = None
        self._last_pressure = float("-inf")
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._dirty: set[int] = set()  # pids to scan before the next cycle
        self._next_scan = 0.0
        self._said_slow = False  # a cycle overran half the scan interval (WATCH_SHARE)
        self.memory: MemoryState | None = None
        self.published: Snapshot | None = None
        self.endpoint = Endpoint(self.metrics.registry)  # where scrapes find `metrics`
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
            listen, path = self.config.daemon.metrics_listen, self.config.path
            try:
                self.endpoint.move(listen, path)
            except OSError as e:
                log.error("%s", cannot_serve(listen, path, e))
                self.backend.close()
                return 2
        if self.events is not None and not once:  # one cycle needs no prompt discovery
            self.events.start()
        if not once and not self.dry_run:  # both would act on targets only to throw it away
            self.access, how = open_sampler(self.config.daemon.access_source, self.backend)
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
                    self.metrics.errors.labels(type(e).__name__).inc()
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
            self.endpoint.stop()
            self.backend.close()
        return 0

    def step(self, *, once: bool = False) -> bool:
        """One turn of the loop; True when a --once run is complete."""
        if self._reload.is_set():
            self._reload.clear()
            self.reload()
        now = self.clock()
        self._dirty |= {pid for pid, p in self.procs.items() if p.due(now)}  # access figures
        if now >= self._next_scan or self._dirty:
            full = now >= self._next_scan
            cpu0 = self.cpu_clock()
            self.scan_cycle(full=full)
            cpu = self.cpu_clock() - cpu0
            self.metrics.watch_cpu.inc(cpu)
            self.scheduler.charge(cpu, self.clock())
            if full:
                self.next_cycle(now, self.clock() - now, cpu)
            if once:
                self.drain()
                return True
        if self.scheduler.queue_length and self.clock() - self._last_pressure >= PRESSURE_EVERY:
            self.update_pressure(self.backend.pressure_state())
        if not self.work_once():
            now = self.clock()
            wake = [self._next_scan]
            wake += [p.measure_at for p in self.procs.values() if p.measure_at is not None]
            ready = self.scheduler.next_ready(now)
            if ready is not None:
                wake.append(ready)
            self.wait(min(WAIT_STEP, max(0.0, min(wake) - now)))
        return False

    def next_cycle(self, started: float, took: float, cpu: float) -> None:
        """Schedule the next full cycle after one that took `took` seconds and `cpu` of
        CPU; when that is later than the scan interval, say why (once)."""
        interval, share = self.config.daemon.scan_interval, self.config.daemon.cpu_share
        self._next_scan = next_full_scan(started, took, interval, cpu, share)
        self.metrics.cycle_interval.set(self._next_scan - started)
        if self._next_scan - started <= interval or self._said_slow:
            return
        # The first cycle reads every process (smaps, pidfds, the first access windows);
        # later ones keep the scans of quiet processes: only a later overrun is a warning.
        first = self.cycles <= 1
        self._said_slow = not first
        why = (
            f"took {took:.2f} s, more than half of scan_interval ({interval:g} s)"
            if took / WATCH_SHARE >= cpu / (WATCH_SHARE * share)
            else f"used {cpu:.2f} s of CPU, more than half of budget.cpu_share ({share:g}) "
            f"of scan_interval ({interval:g} s)"
        )
        log.log(
            logging.INFO if first else logging.WARNING,
            "a full cycle (discovery and scans) %s: %s %.2f s so that collapsing gets the "
            "other half (%s)", why, "the next one comes in" if first else "cycles now come every",
            self._next_scan - started,
            "the first reads every process" if first
            else "said once; a longer scan_interval or fewer targets avoid it",
        )  # fmt: skip

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
        tracked, procs = self.discovery.tracked, self.procs
        forked, rescan = self.forks.seen(
            changes, self.clock(),
            target_of=lambda pid: None if (t := tracked.get(pid)) is None else t.target.name,
            coverage_of=lambda pid: None if (p := procs.get(pid)) is None else p.coverage,
        )  # fmt: skip
        for parent, child, target, cov in forked:
            self.metrics.forks.labels(target).inc()
            log.info(
                "pid %d (%s) forked pid %d: holding both back while they share memory "
                "copy-on-write (THP coverage %s before)",
                parent, target, child, "unknown" if cov is None else f"{cov:.0%}",
            )  # fmt: skip
        for parent, child in rescan:
            log.info("pid %d's fork child %d exited: re-scanning it", parent, child)
            self._dirty.add(parent)

    def ping(self) -> None:
        now = self.clock()
        if self.watchdog is not None and self.watchdog.due(now):
            self.notifier.watchdog()
            self.watchdog.pinged(now)

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
            new, refused = check_methods(new, self.backend)
            if self._serving:  # last: nothing that follows can fail
                listen = new.daemon.metrics_listen
                try:
                    self.endpoint.move(listen, self.config.path)
                except OSError as e:
                    raise RuntimeError(cannot_serve(listen, new.path, e)) from None
        except (Exception, SystemExit) as e:  # ConfigError, or a method refused
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed, keeping the running config: %s", e)
            self.notifier.ready(f"reload failed, old config kept: {str(e).splitlines()[0]}")
            return
        old_source, self.config = self.config.daemon.access_source, new
        self.scheduler = Scheduler(scheduler_settings(new))
        if new.daemon.access_source != old_source and not self.dry_run:
            if self.access is not None:
                self.access.close()
            self.access, how = open_sampler(new.daemon.access_source, self.backend)
            for p in self.procs.values():
                p.hotness = None  # measured by another source: wait for its figures
            log.info("%s", how)
        self.discovery.set_targets(new.targets)
        self.compactor = compactor(self.backend, new.daemon.compaction_interval)
        self.metrics.reloads.labels("ok").inc()
        self.metrics.configured(new.sha256, new.daemon.scan_interval, refused)
        self.metrics.targets({t.name: self.method_for(t.name) for t in new.targets})
        self.count_held()
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
            every = self.discovery.tracked.items()
            self.access.watch({pid: t.proc for pid, t in every if self.sampled(t.proc)})
            if full:
                self.access.refresh()
        state = self.memory = self.backend.memory_state()
        looked = []  # scanned, or kept: the plan below is made from their scans
        for pid in pids:
            tracked = self.discovery.tracked.get(pid)
            if tracked is None:
                continue
            p = self.procs.get(pid)
            if full and p is not None and p.keeps(tracked.proc):
                self.metrics.scans.labels(tracked.target.name, "kept").inc()
                looked.append(pid)
            elif self.scan_one(tracked, state.max_ptes_none):
                looked.append(pid)
        self.scheduler.plan(self.candidates(), self.clock())
        self.settle(looked)
        self.update_pressure(state)
        if full:
            self.cycles += 1
            self.metrics.last_cycle.set_to_current_time()
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

    def settle(self, pids: list[int]) -> None:
        """Mark the processes just scanned (or kept) for which the plan has nothing to do
        (none of their work queued, none waiting for access figures or held back by a
        fork): their next full cycles may keep their scan while they stay unchanged
        (`Process.keeps`). A kept one the plan found work for again (its backoff over,
        say) is read at the next cycle."""
        queued, now = self.scheduler.queued_pids(), self.clock()
        for pid in pids:
            p = self.procs.get(pid)
            if p is None or p.report is None:
                continue
            waiting = p.hotness is None and p.report.totals.collapsible_regions > 0
            p.settled = not (
                pid in queued or (waiting and self.access is not None) or self.forks.held(pid, now)
            )

    def scan_one(self, tracked: Tracked, max_ptes_none: int) -> bool:
        """Scan one process (and measure its access, if due); False when it could not be
        read (gone or refused: counted, and forgotten)."""
        t0, cpu0 = time.perf_counter(), self.cpu_clock()
        try:
            vmas, detail = self.vmas_to_scan(tracked.proc)
            rep = scan_process(
                self.backend, tracked.proc, target=tracked.target.name, collect=True,
                only=worth_collapsing, max_ptes_none=max_ptes_none,
                work="ranger" if self.method_for(tracked.target.name) == "ranger" else "collapse",
                detail=detail, vmas=vmas,
            )  # fmt: skip
        except (ProcessGone, AccessDenied) as e:
            kind = "exited" if isinstance(e, ProcessGone) else "access_denied"
            self.metrics.races.labels(kind).inc()
            # Counted either way; logged at INFO once per target and kind, since a local
            # user can start matching processes that exit at once, thousands a second.
            if not log_once(log, (kind, tracked.target.name), logging.INFO,
                            "skipping pid %d (%s): %s (more of target %s: counted in "
                            "memdefragd_races_total, logged at debug level)", tracked.proc.pid,
                            tracked.proc.comm, e, tracked.target.name):  # fmt: skip
                log.debug("skipping pid %d (%s): %s", tracked.proc.pid, tracked.proc.comm, e)
            if isinstance(e, ProcessGone):
                self.gone(tracked.proc.pid)
            else:
                self.forget(tracked.proc.pid)
            return False
        self.metrics.scan_seconds.observe(time.perf_counter() - t0)
        self.metrics.scanned_pages.inc(rep.totals.present_pages)
        self.procs.setdefault(tracked.proc.pid, Process()).scanned(rep)
        key = (tracked.proc.pid, tracked.proc.start_time)
        why = f"the VMAs pid {key[0]}'s window was anchored for are gone"
        self.freed(self.anchors.rescanned(key, {v.start for v in vmas}), why)
        self.regressions(tracked, rep)
        if self.access is not None:
            self.measure(tracked, rep)
        target = tracked.target.name
        self.metrics.scans.labels(target, "read").inc()
        self.metrics.scan_cpu.labels(target).inc(self.cpu_clock() - cpu0)
        return True

    def regressions(self, tracked: Tracked, rep: ProcessReport) -> None:
        """Regions seen huge before and collapsible now go first (`Process.urgent`)."""
        pid, target, proc = tracked.proc.pid, tracked.target.name, self.procs[tracked.proc.pid]
        split = split_again(self.huge, self.forks, pid, *huge_and_collapsible(rep), proc.urgent)
        proc.urgent, cov = split.urgent, rep.totals.thp_coverage
        if split.new:
            self.metrics.regressions.labels(target, split.cause).inc()
            log.info(
                "pid %d (%s): %d MiB that were huge are split again (%s; THP coverage now "
                "%s): re-queued first",
                pid, target, split.new * PMD_SIZE >> 20,
                "after a fork" if split.cause == "fork" else "coverage fell",
                "unknown" if cov is None else f"{cov:.0%}",
            )  # fmt: skip
        self.restored(pid, cov)

    def restored(self, pid: int, cov: float | None) -> None:
        done = self.forks.restored(pid, cov, self.clock())
        if done is not None:
            target, seconds = done
            self.metrics.fork_restore.labels(target).observe(seconds)
            log.info("pid %d (%s): THP coverage restored %.1f s after its fork child exited",
                     pid, target, seconds)  # fmt: skip

    def sampled(self, proc: ProcessInfo) -> bool:
        """Whether the access sampler measures this process: one whose windows walk the
        whole target (clear_refs) only up to access.referenced_max_rss."""
        limit = self.config.daemon.access_referenced_max_rss
        return self.access is not None and not (self.access.walks_target and proc.rss > limit)

    def measure(self, tracked: Tracked, rep: ProcessReport) -> None:
        """This scan's access figures (hotness per region), if a window has ended."""
        sampler = self.access
        assert sampler is not None  # measured only where a sampler runs
        if not self.sampled(tracked.proc):
            self.procs[tracked.proc.pid].hotness = {}  # ranked by size alone
            log_once(log, ("unsampled", tracked.proc.pid), logging.INFO,
                     "pid %d (%s): RSS %d MiB is above access.referenced_max_rss (%d MiB): "
                     "ranked without access figures (%s would walk all its page tables and "
                     "flush its TLB at every window)", tracked.proc.pid, tracked.target.name,
                     tracked.proc.rss >> 20,
                     self.config.daemon.access_referenced_max_rss >> 20, sampler.name)  # fmt: skip
            return
        pairs = sampled_regions(rep)
        try:
            hot = sampler.hotness(tracked.proc, pairs)
        except (ProcessGone, AccessDenied):
            return
        figures = None if hot is None else by_vma(pairs, hot)
        if figures and log.isEnabledFor(logging.DEBUG):  # not for nothing, per scan
            every = np.concatenate(list(figures.values()))
            log.debug("pid %d: access figures for %d region(s), hotness %s",
                      tracked.proc.pid, every.size, _quantiles(every))  # fmt: skip
        windows = Windows(self.config.daemon.scan_interval, sampler.settle)
        if self.procs[tracked.proc.pid].measured(figures, self.clock(), windows):
            log.info("pid %d (%s): no access figures, working on it without them",
                     tracked.proc.pid, tracked.target.name)  # fmt: skip

    def candidates(self) -> list[Candidate]:
        """What the last scans offer the plan, but for processes held back by a fork and
        those whose first access window is not over (no collapsing blind)."""
        out: list[Candidate] = []
        now = self.clock()
        for pid, p in self.procs.items():
            tracked = self.discovery.tracked.get(pid)
            if tracked is None or self.forks.held(pid, now) or p.resting(now):
                continue
            if self.held_back(tracked):
                continue
            target = replace(tracked.target, mode="observe") if self.dry_run else tracked.target
            out += p.candidates(target, tracked.proc, measuring=self.access is not None)
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
        proc = self.procs.setdefault(req.pid, Process())
        proc.sent(req, outcome.bytes_attempted)
        done = (
            verify(self.backend, tracked.proc, req, outcome.touched or None)
            if outcome.bytes_done
            else Verified()
        )
        if outcome.touched:  # the backend's own ranges: count each region once
            done = proc.first_verified(done)
        if method == "ranger":
            d = self.config.daemon
            idle = proc.after_pass(done.bytes, self.clock(), d.backoff_initial, d.backoff_max)
            if idle:
                log.info(
                    "ranger pid %d (%s): the pass made nothing contiguous that was not "
                    "before; no pass for it for %.0f s (doubling while that repeats)",
                    req.pid, req.target, idle,
                )  # fmt: skip
        if outcome.frames:
            self.anchored(proc, tracked, outcome)
        self.scheduler.record(outcome, self.clock())
        self.metrics.record(outcome, done.bytes)
        self.outcomes.append((outcome, done.bytes))
        rest = self.persisted(proc, req, done.huge)
        self.after(outcome, done.bytes, tracked, rest)
        if self.clock() - self._published >= PUBLISH_EVERY or not self.scheduler.queue_length:
            self.publish()
        return True

    def persisted(self, proc: Process, req: Request, huge: np.ndarray) -> float | None:
        """Book what a request made huge (urgent regions mended, coverage restored); the
        rest the scheduler imposed after it, None when the target is not paced."""
        pid, target = req.pid, req.target
        self.huge.made_huge(pid, huge)
        mended = proc.made(huge)
        if mended is not None:
            self.metrics.recollapsed.labels(target).inc(mended * PMD_SIZE)
        if pid in self.forks.restoring:
            self.restored(pid, proc.coverage)
        rest = self.scheduler.rest(target)
        if rest is not None:
            self.metrics.pacing.labels(target).observe(rest)
        return rest

    def anchored(self, proc: Process, tracked: Tracked, outcome: Outcome) -> None:
        """Book where a Translation Ranger pass anchored (`outcome.frames`): the tracked
        processes whose window it filled get no more ranger passes while it holds it
        (pipeline/plan/anchors.py), their queued work dropped; said once per hold."""
        req, procs = outcome.request, self.discovery.tracked

        def alive(key: ProcKey) -> bool:
            t = procs.get(key[0])
            return t is not None and t.proc.start_time == key[1]

        key = (req.pid, req.start_time)
        for taken in self.anchors.passed(key, outcome.frames, proc.worked_in(outcome), alive):
            held = procs[taken.held[0]]
            if not self.held_back(held):
                continue  # its target's method is not ranger (any more): nothing to hold
            name, lo, hi = held.target.name, *taken.window
            self.scheduler.unqueue(held.proc.pid)
            self.metrics.ranger_conflicts.labels(name).inc()
            args = (held.proc.pid, name, lo, hi, req.pid, tracked.target.name)
            if not log_once(log, ("anchor window", taken.holder, taken.held), logging.WARNING,
                            "pid %d (target %s): its Translation Ranger anchor window, frames "
                            "[%#x, %#x), is the one pid %d (target %s) just filled: the RFC's "
                            "kernel anchors every process at the start of its zone, so passes "
                            "of the two would undo each other. No more ranger passes for pid "
                            "%d while pid %d holds it (counted in "
                            "memdefragd_ranger_window_conflicts_total); method collapse for "
                            "target %s avoids this", *args, held.proc.pid, req.pid,
                            name):  # fmt: skip
                log.debug("pid %d (%s): anchor window [%#x, %#x) filled by pid %d (%s) again",
                          *args)  # fmt: skip
        self.count_held()

    def freed(self, keys: list[ProcKey], why: str) -> None:
        """Processes no longer held back by another's anchor window: say so."""
        for pid, start_time in keys:
            t = self.discovery.tracked.get(pid)
            if t is not None and t.proc.start_time == start_time:
                log.info("pid %d (target %s): ranger passes resume: no tracked process "
                         "holds its Translation Ranger anchor window any more (%s)",
                         pid, t.target.name, why)  # fmt: skip
        self.count_held()  # a held process forgotten counts no more either

    def held_back(self, tracked: Tracked) -> bool:
        """Whether a process gets no ranger pass now: another's pass holds its window."""
        key = (tracked.proc.pid, tracked.proc.start_time)
        return self.method_for(tracked.target.name).startswith("ranger") and self.anchors.held(key)

    def count_held(self) -> None:
        """memdefragd_ranger_held_processes, per target (0 where none is held)."""
        counts = dict.fromkeys(self._held_targets, 0)
        counts.update(
            (t.name, 0) for t in self.config.targets if self.method_for(t.name).startswith("ranger")
        )
        for pid, start_time in self.anchors.held_keys():
            t = self.discovery.tracked.get(pid)
            if t is not None and t.proc.start_time == start_time and self.held_back(t):
                counts[t.target.name] = counts.get(t.target.name, 0) + 1
        for name, n in counts.items():
            self.metrics.ranger_held.labels(name).set(n)
        self._held_targets = set(counts)

    def method_for(self, target: str) -> str:
        o = self.config.overrides.get(target)
        return o.method if o is not None and o.method else self.config.daemon.method

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
        react = reaction(outcome.stopped, compaction=self.config.daemon.compaction)
        if react is Reaction.FORGET:
            self.metrics.races.labels("exited").inc()
            self.gone(req.pid)
        elif react is Reaction.DENIED:
            log_once(log, ("EPERM", req.pid), logging.WARNING,
                 "not allowed to collapse pid %d: memdefragd needs CAP_SYS_NICE and ptrace "
                 "access to it (run as root)", req.pid)  # fmt: skip
        elif react is Reaction.COMPACT and self.compactor is not None:
            for node in self.compactor.maybe_compact():
                log.info("asked the kernel to compact node %d (no free 2 MiB block)", node)

    def publish(self) -> None:
        """Hand scrapes a consistent copy of the gauges (one reference assignment: atomic
        for them), and bring discovery's own counts into the metrics."""
        self.metrics.count_races(self.discovery.races())
        self.metrics.listed.set(self.discovery.listed)
        self.metrics.tracked.set(len(self.discovery.tracked))
        scans = []
        for pid, p in self.procs.items():
            tracked = self.discovery.tracked.get(pid)
            if tracked is not None and p.report is not None:
                scans.append((tracked.target.name, [v.metrics for v in p.report.vmas]))
        plan = self.scheduler.snapshot(self.clock())
        self.published = Snapshot.of(scans, plan, self.memory, self.paused)
        self._published = self.clock()

    def vmas_to_scan(self, proc: ProcessInfo) -> tuple[list[Vma], bool]:
        """The process's VMAs for a scan, and whether they came from smaps. smaps walks
        every page table of the target under its mmap lock, at every scan of a big heap;
        maps does not. So where the backend skips what is not resident (PAGEMAP_SCAN) and
        the access sampler needs no smaps field, smaps is read only when maps shows VMAs
        it has not listed yet (their VmFlags decide whether they can be collapsed)."""
        listings = self.metrics.vma_listings
        need = self.access is not None and self.access.walks_target and self.sampled(proc)
        if need or not sparse_scan(self.backend):
            listings.labels("smaps").inc()
            return self.backend.list_vmas(proc, detail=True), True
        known = self.procs.setdefault(proc.pid, Process()).known_vmas
        listings.labels("maps").inc()
        cheap = with_known_flags(self.backend.list_vmas(proc, detail=False), known)
        if cheap is not None:
            return cheap, False
        listings.labels("smaps").inc()
        vmas = self.backend.list_vmas(proc, detail=True)
        known.clear()
        known.update((vma_key(v), v) for v in vmas)
        return vmas, True

    def gone(self, pid: int) -> None:
        """A process found gone before its exit event came: a fork child's exit is taken
        in now (its parent re-scanned), as the event would have done."""
        parent = self.forks.exited(pid, self.clock())
        if parent is not None and parent in self.discovery.tracked:
            log.info("pid %d's fork child %d exited: re-scanning it", parent, pid)
            self._dirty.add(parent)
        self.forget(pid)

    def forget(self, pid: int) -> None:
        """A process gone (or no longer ours): its record, and the plan's bookkeeping."""
        self.procs.pop(pid, None)
        self.scheduler.forget(pid)
        self.huge.forget(pid)
        self.forks.forget(pid)
        self.freed(self.anchors.forget(pid), f"pid {pid}, which held it, is no longer tracked")

    def status_line(self) -> str:
        done = int(total(self.metrics.verified)) >> 20
        paused = f", paused: {self.paused}" if self.paused else ""
        return (
            f"{len(self.discovery.tracked)} process(es) tracked, {self.cycles} cycle(s), "
            f"{done} MiB made huge{paused}"
        )


def default_events() -> bool:
    """Netlink process events need the host's network namespace; tests may turn them off."""
    return os.environ.get("MEMDEFRAGD_NO_PROC_EVENTS", "") in ("", "0")


def _quantiles(x: np.ndarray) -> str:
    """min / median / max, for a debug line."""
    if not x.size:
        return "-"
    lo, mid, hi = np.quantile(x, [0.0, 0.5, 1.0])
    return f"min {lo:.2f} median {mid:.2f} max {hi:.2f}"
