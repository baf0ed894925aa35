"""Discovery: which running processes the configured targets name, kept up to date.

Two sources feed one tracked set (pid -> `Tracked`):

* **Listing** (`Discovery.rescan`): every process the backend lists, matched against the
  targets. Complete but costly, so it runs at start, on config reload, periodically, and
  whenever process events may have been lost.
* **Process events** (an `EventSource`, the backend's optional `process_events()`
  capability: the kernel backend reads the proc connector, in its events.py) say when a
  process forks, execs, changes its name or uid, or exits; `Discovery.poll` looks up just
  those pids, so a new target is seen within a second. A lost event means a full rescan.
  Without a source (the simulator has none), or while it is not subscribed, discovery
  lists every `fallback_interval` seconds instead.

Forks of tracked processes are reported too (`Changes.forked`, from the parent's pid
that FORK events carry, as the extra event ``("forked", (parent, child))``), and so are
the exits and execs of those children (`Changes.fork_exited`, `Changes.execd`): the
daemon re-collapses what copy-on-write split in the parent once its child is gone.

Identity is pid plus start time: a pid whose start time changed is another process (the
old one is dropped as "pid reused", the new one considered afresh). A process that
vanishes between an event and its lookup is a normal race: counted, never raised.

The pure part (`reduce_events`, `plan`) takes no I/O and is unit-tested.
"""

from __future__ import annotations

import enum
import logging
import select as _select
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypeVar

from ..backends.protocol import Backend, Event, EventSource, Handle
from ..logonce import once as log_once
from ..model import AccessDenied, ProcessGone, ProcessInfo
from .targets import Target, select

log = logging.getLogger(__name__)

# Why a tracked process was dropped (the values of Changes.dropped).
EXITED = "exited"
NO_MATCH = "no longer matches"
REUSED = "pid reused"

LOOKUP_KINDS = frozenset({"exec", "fork", "comm", "uid"})
# What Discovery counts as races and failures (exported as memdefragd_races_total kinds):
# a process gone between its event (or listing) and its lookup; one we may not read; a
# pidfd we could not open; a lookup that failed otherwise.
RACES = ("vanished", "denied", "open_failed", "lookup_failed")

_V = TypeVar("_V")

# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Tracked:
    """A process a target claims: what we last read of it, the target, and a pidfd on it
    (proven to be this very process, so requests can never hit a reused pid)."""

    proc: ProcessInfo
    target: Target
    handle: Handle

    @property
    def pid(self) -> int:
        return self.proc.pid


def _frozen(d: Mapping[int, _V] | None = None) -> Mapping[int, _V]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True, slots=True)
class Changes:
    """What one rescan or poll changed in the tracked set. Iterating a field gives pids.

    `added`: pid -> target name; `dropped`: pid -> reason (EXITED, NO_MATCH, REUSED);
    `retargeted`: pid -> target name, for a tracked process now claimed by another (or a
    changed) target. A pid can be both dropped and added: its old process was dropped
    (pid reused) and the new one added. `forked`: child -> parent, for forks of tracked
    processes; `fork_exited`: child -> parent, when such a child exits (or is found gone);
    `execd`: such children that exec'd (they share nothing with the parent any more).
    """

    added: Mapping[int, str] = field(default_factory=_frozen)
    dropped: Mapping[int, str] = field(default_factory=_frozen)
    retargeted: Mapping[int, str] = field(default_factory=_frozen)
    forked: Mapping[int, int] = field(default_factory=_frozen)
    fork_exited: Mapping[int, int] = field(default_factory=_frozen)
    execd: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(
            self.added or self.dropped or self.retargeted or self.forked or self.fork_exited
            or self.execd
        )  # fmt: skip


# ---------------------------------------------------------------- pure part


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do to the tracked set: drop first (pid, reason), then refresh `keep` (the
    same process, still matched; its info or target may have changed), then add."""

    drop: tuple[tuple[int, str], ...] = ()
    keep: tuple[tuple[ProcessInfo, Target], ...] = ()
    add: tuple[tuple[ProcessInfo, Target], ...] = ()


def plan(
    current: Mapping[int, ProcessInfo],
    seen: Iterable[ProcessInfo],
    targets: Sequence[Target],
    scope: Collection[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Plan:
    """Compare the tracked processes (`current`: pid -> info as tracked) with processes
    just read (`seen`), matched against `targets`.

    `scope` is the set of pids that were looked at: a tracked pid in scope but not seen has
    exited. None means `seen` is a full listing (every pid is in scope). Matching stops
    early once `should_stop()` is true: then the plan is partial, for the caller to drop.
    """
    by_pid = {p.pid: p for p in seen}
    matched = {p.pid: (p, t) for p, t in select(by_pid.values(), targets, should_stop)}
    pids = set(current) | set(by_pid) if scope is None else set(scope)
    drop, keep, add = [], [], []
    for pid in sorted(pids):
        old, new, hit = current.get(pid), by_pid.get(pid), matched.get(pid)
        if old is not None:
            if new is None:
                drop.append((pid, EXITED))
                continue
            if new.start_time != old.start_time:
                drop.append((pid, REUSED))
            elif hit is None:
                drop.append((pid, NO_MATCH))
                continue
            else:
                keep.append(hit)
                continue
        if hit is not None:
            add.append(hit)
    return Plan(tuple(drop), tuple(keep), tuple(add))


def reduce_events(events: Iterable[Event]) -> tuple[list[str], set[int], set[int]]:
    """(reasons for a full rescan, pids to look up, pids that exited), each pid by its
    last event: fork+exec+exit of one short-lived pid is one exit; exit then fork (a reused
    pid) is one lookup, which tells the old process from the new by start time. Events
    lost, or a first subscription (what started before it was never announced), make the
    rescan."""
    lost: list[str] = []
    last: dict[int, str] = {}
    for kind, arg in events:
        if kind == "lost":
            lost.append(str(arg))
        elif kind == "subscribed":
            lost.append("subscribed")
        elif kind == "exit":
            last[arg] = "exit"
        elif kind in LOOKUP_KINDS:
            last[arg] = "lookup"
    lookups = {pid for pid, k in last.items() if k == "lookup"}
    return lost, lookups, set(last) - lookups


# ---------------------------------------------------------------- discovery


class Discovery:
    """The tracked set: processes the targets claim, each pinned by a handle (the
    backend's `open`, unless `opener` says otherwise), kept up to date from a listing
    (`rescan`) and from process events (`poll`).

    With events available, `poll` lists everything every `rescan_interval` seconds (a
    process can start matching without any event: its RSS grows past min_rss, it moves to
    another cgroup); without them (None, or not subscribed), every `fallback_interval`.
    Every `rescan()` restarts that clock, so a caller rescanning on its own schedule does
    not pay twice.

    A rescan's time grows with the number of processes and nothing else (each read of one
    is bounded; matching is linear in at most MAX_CMDLINE bytes per pattern). Once the
    backend's listing is in, `should_stop` (the daemon's SIGTERM) cuts a rescan short
    between processes, changing nothing; `on_rescan` is told each rescan's duration (s).
    """

    def __init__(
        self,
        backend: Backend,
        targets: Sequence[Target],
        events: EventSource | None,
        *,
        opener: Callable[[ProcessInfo], Handle] | None = None,
        rescan_interval: float = 60.0,
        fallback_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] = lambda: False,
        on_rescan: Callable[[float], None] | None = None,
    ):
        self.backend = backend
        self.targets: tuple[Target, ...] = tuple(targets)
        self.events = events
        self.opener = backend.open if opener is None else opener  # pins a process
        self.rescan_interval = rescan_interval
        self.fallback_interval = fallback_interval
        self.clock = clock
        self.sleep = sleep
        self.should_stop = should_stop
        self.on_rescan = on_rescan
        self.listed = 0  # processes the last complete listing read
        self.tracked: dict[int, Tracked] = {}
        self.fork_children: dict[int, int] = {}  # child -> tracked parent, until exec/exit
        self.counters: dict[str, int] = dict.fromkeys(
            ("rescans", "events", "lost", "lookups", *RACES), 0
        )
        self._last_rescan: float | None = None

    # -- the three ways in

    def rescan(self) -> Changes:
        """List every process and reconcile the tracked set with it; when `should_stop()`
        turns true meanwhile, stop at the next process and change nothing."""
        self.counters["rescans"] += 1
        self._last_rescan = self.clock()
        t0 = time.perf_counter()
        try:
            return self._rescan()
        finally:
            if self.on_rescan is not None:
                self.on_rescan(time.perf_counter() - t0)

    def _rescan(self) -> Changes:
        listing = self.backend.list_processes()
        if self.should_stop():
            return Changes()
        seen = {p.pid: p for p in listing}
        # A tracked pid missing from the listing has most likely exited; but a listing
        # skips what it may not read, so ask again before dropping it.
        scope = set(seen) | set(self.tracked)
        for pid in set(self.tracked) - set(seen):
            if self.should_stop():
                return Changes()
            info = self._lookup(pid, race=False)
            if info is _DENIED:
                scope.discard(pid)  # keep it as it is: we cannot tell
            elif info is not None:
                seen[pid] = info
        todo = plan(self._current(), seen.values(), self.targets, scope, self.should_stop)
        if self.should_stop():  # the plan may be partial: drop it
            return Changes()
        self.listed = len(listing)
        changes = self._apply(todo)
        gone = {c: p for c, p in self.fork_children.items() if c not in seen}
        if not gone:
            return changes
        for child in gone:
            del self.fork_children[child]
        return replace(changes, fork_exited=_frozen(gone))

    def poll(self, timeout: float) -> Changes:
        """Wait up to `timeout` seconds for changes: process events (or, without them, a
        periodic listing). Returns as soon as something changed, else at the timeout."""
        deadline = self.clock() + timeout
        while True:
            changes = self.rescan() if self._rescan_due() else Changes()
            if not changes:
                now = self.clock()
                wait = max(0.0, min(deadline - now, self._next_rescan() - now))
                if self.events is not None and self.events.available:
                    changes = self.handle(self.events.wait(wait))
                else:
                    if self.events is not None:  # not subscribed now: what came before
                        changes = self.handle(self.events.wait(0))
                    if not changes and wait > 0:
                        self.sleep(wait)
            if changes or self.clock() >= deadline:
                return changes

    def set_targets(self, targets: Sequence[Target]) -> Changes:
        """New targets (config reload): every process, tracked or not, is judged again."""
        self.targets = tuple(targets)
        return self.rescan()

    def races(self) -> dict[str, int]:
        """The races and failures counted so far (RACES), as kinds for an exported counter:
        `discovery_vanished`, `discovery_denied`, ..."""
        return {f"discovery_{k}": self.counters[k] for k in RACES}

    def close(self) -> None:
        """Close every pidfd; the tracked set is empty afterwards."""
        for t in self.tracked.values():
            t.handle.close()
        self.tracked.clear()

    def __enter__(self) -> Discovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events

    def handle(self, events: Sequence[Event]) -> Changes:
        """Apply a batch of events: look up the pids they name, drop those that exited;
        a lost event makes it a full rescan (which covers the whole batch)."""
        if not events:
            return Changes()
        self.counters["events"] += len(events)
        forked, fork_exited, execd = self._forks(events)
        lost, lookups, exits = reduce_events(events)
        if lost:
            self.counters["lost"] += any(kind == "lost" for kind, _ in events)
            log.debug("full rescan after proc events: %s", "; ".join(lost))
            changes = self.rescan()
            return replace(
                changes,
                forked=_frozen(forked),
                fork_exited=_frozen({**fork_exited, **changes.fork_exited}),
                execd=frozenset(execd),
            )
        drop = tuple((pid, EXITED) for pid in sorted(exits) if pid in self.tracked)
        seen, scope = [], set()
        for pid in sorted(lookups):
            info = self._lookup(pid)
            if info is _DENIED:
                continue
            scope.add(pid)
            if info is not None:
                seen.append(info)
        p = plan(self._current(), seen, self.targets, scope)
        changes = self._apply(Plan(drop + p.drop, p.keep, p.add))
        if forked or fork_exited or execd:
            changes = replace(
                changes,
                forked=_frozen(forked),
                fork_exited=_frozen(fork_exited),
                execd=frozenset(execd),
            )
        return changes

    def _forks(self, events: Sequence[Event]) -> tuple[dict[int, int], dict[int, int], set[int]]:
        """Forks of tracked processes in this batch, and exits and execs of their children,
        in event order (a child may fork, exec and exit within one batch)."""
        forked: dict[int, int] = {}
        exited: dict[int, int] = {}
        execd: set[int] = set()
        for kind, arg in events:
            if kind == "forked":
                parent, child = arg
                if parent in self.tracked:
                    self.fork_children[child] = forked[child] = parent
            elif kind == "exec" and arg in self.fork_children:
                del self.fork_children[arg]
                execd.add(arg)
            elif kind == "exit" and arg in self.fork_children:
                exited[arg] = self.fork_children.pop(arg)
        return forked, exited, execd

    # -- internals

    def _current(self) -> dict[int, ProcessInfo]:
        return {pid: t.proc for pid, t in self.tracked.items()}

    def _lookup(self, pid: int, race: bool = True) -> ProcessInfo | _Denied | None:
        """The process now at `pid`; None if it is gone (a race, counted, when an event
        named it a moment ago), _DENIED if we may not read it, or if reading it failed
        otherwise (counted and logged once per kind: one pid never costs the others)."""
        self.counters["lookups"] += 1
        try:
            return self.backend.process(pid)
        except (ProcessGone, ProcessLookupError):  # ESRCH from a backend that let it through
            self.counters["vanished"] += race
            return None
        except AccessDenied:
            self.counters["denied"] += 1
            return _DENIED
        except Exception as e:
            self.counters["lookup_failed"] += 1
            _failed(f"cannot read pid {pid}", e)
            return _DENIED  # keep what we knew of it: the next rescan asks again

    def _apply(self, p: Plan) -> Changes:
        dropped: dict[int, str] = {}
        retargeted: dict[int, str] = {}
        added: dict[int, str] = {}
        for pid, reason in p.drop:
            t = self.tracked.pop(pid, None)
            if t is not None:
                t.handle.close()
                dropped[pid] = reason
                log.debug("dropped pid %d (%s, target %s): %s", pid, t.proc.comm,
                          t.target.name, reason)  # fmt: skip
        for info, target in p.keep:
            old = self.tracked[info.pid]
            if old.target != target:
                retargeted[info.pid] = target.name
            self.tracked[info.pid] = replace(old, proc=info, target=target)
        for info, target in p.add:
            try:
                handle = self.opener(info)
            except ProcessGone:
                self.counters["vanished"] += 1
                continue
            except AccessDenied:
                self.counters["denied"] += 1
                continue
            except OSError as e:  # EMFILE and the like: try again at the next rescan
                self.counters["open_failed"] += 1
                log.warning("cannot open a pidfd on pid %d (%s): %s", info.pid, info.comm, e)
                continue
            except Exception as e:
                self.counters["open_failed"] += 1
                _failed(f"cannot open pid {info.pid}", e)
                continue
            if _exited(handle):  # a zombie (listed until reaped): nothing left to track
                handle.close()
                self.counters["vanished"] += 1
                continue
            self.tracked[info.pid] = Tracked(info, target, handle)
            added[info.pid] = target.name
            log.debug("tracking pid %d (%s) for target %s", info.pid, info.comm, target.name)
        return Changes(_frozen(added), _frozen(dropped), _frozen(retargeted))

    def _next_rescan(self) -> float:
        if self._last_rescan is None:
            return float("-inf")
        healthy = self.events is not None and self.events.available
        return self._last_rescan + (self.rescan_interval if healthy else self.fallback_interval)

    def _rescan_due(self) -> bool:
        return self.clock() >= self._next_rescan()


class _Denied(enum.Enum):
    """A lookup's answer when we may not read the process (so cannot tell)."""

    DENIED = "denied"


_DENIED = _Denied.DENIED


def _failed(what: str, e: Exception) -> None:
    """An unforeseen error about one process: logged once per kind, by its type only (its
    text may quote what the process controls), with the traceback at debug level."""
    log_once(log, ("discovery", type(e).__name__), logging.WARNING,
             "%s: unexpected %s; carrying on with the other processes (logged once per "
             "kind)", what, type(e).__name__)  # fmt: skip
    log.debug("%s", what, exc_info=e)


def _exited(handle: object) -> bool:
    """Whether the process behind a pidfd has exited (the pidfd polls readable once the
    whole thread group is gone, zombie or reaped); handles without one may say `exited`."""
    exited = getattr(handle, "exited", None)
    if isinstance(exited, bool):
        return exited
    fd = getattr(handle, "fd", None)
    if not isinstance(fd, int) or fd < 0:
        return False
    p = _select.poll()
    p.register(fd, _select.POLLIN)
    return bool(p.poll(0))
