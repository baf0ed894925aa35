"""Every setting of memdefragd.yaml, declared once: its key, kind (parser and bounds),
default and help.

The daemon's settings are the fields of `DaemonSettings` (and of the simulated machine's
`SimulatedSettings`); a target's, the fields of `pipeline.targets.Target` and `Matcher`,
named here with their keys and kinds (the pipeline owns those classes and their defaults).
A target's `overrides:` are the daemon settings marked `per_target`, read by the same
declaration. Reading (config/walk.py), the scheduler's settings (config/plan.py), the
simulator's command-line options (commands/common.py) and docs/configuration.md
(tools/configuration_doc.py) all follow from what is written here; the example
etc/memdefragd.yaml is checked against it (tests/config/test_schema.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from ..model import (
    PMD_SIZE,
    AccessSource,
    BackendKind,
    Method,
    Mode,
    UnmovableLayout,
    Untouched,
)
from ..pipeline.targets import Matcher, Target
from .kinds import (
    AbsolutePath,
    Choice,
    Chunk,
    Duration,
    Flag,
    Integer,
    Listen,
    Nullable,
    Number,
    OneOrMany,
    Pattern,
    Pids,
    Records,
    Section,
    Share,
    Size,
    Text,
    Users,
)
from .walk import (
    Invalid,
    Plan,
    Setting,
    Walk,
    check,
    declared,
    read_settings,
    section,
    setting,
    settings_of,
)

if TYPE_CHECKING:
    from ..backends.sim.aging import Scenario

DEFAULT_METRICS_PORT = 9847
SIM_MEMORY_MAX = 1 << 40  # the simulator keeps ~30 bytes per 4 KiB frame: 8 GiB at 1 TiB


# ------------------------------------------------------------------------------ simulated


@section
class SimProcessSettings:
    """A long-running process of the simulated machine (aging.ProcSpec)."""

    comm: str = setting(
        Text(), "process name (targets match it by comm, as on Linux)", required="process name"
    )
    heap: int = setting(Size(minimum=PMD_SIZE), "its heap, rounded up to 2MiB", required="size")
    thp: bool = setting(Flag(), "whether the heap may use huge pages", default=True)
    count: int = setting(
        Integer(1, 10_000), "how many such processes (comm-0, comm-1, ... when more than one)",
        default=1,
    )  # fmt: skip


@section
class SimulatedSettings:
    """`daemon.simulated`: the machine the simulated backend ages at start, and the
    processes left running on it (aged along with it, so their memory is scattered).
    backends/sim/aging.Scenario is these settings plus the aging's own."""

    memory: int = setting(
        Size(64 << 20, SIM_MEMORY_MAX), "physical memory of the simulated machine",
        default=1 << 30,
    )  # fmt: skip
    nodes: int = setting(Integer(1, 64), "NUMA nodes, with at least 4MiB of memory each", default=1)
    fragmentation: float = setting(
        Number(0, 1), "unusable free space index at order 9 to age it to", default=0.7
    )
    unmovable: float = setting(
        Number(0, 0.5), "share of frames the kernel holds, which never move (slab, page "
        "tables, pins)", default=0.02,
    )  # fmt: skip
    unmovable_layout: UnmovableLayout = setting(
        Choice(UnmovableLayout), "scattered: a few kernel pages in many pageblocks, as "
        "fallback allocations leave them; clustered: whole unmovable pageblocks",
        default=UnmovableLayout.SCATTERED,
    )  # fmt: skip
    free: float = setting(Number(0.01, 0.95), "share of memory free once aged", default=0.25)
    seed: int = setting(Integer(0, (1 << 32) - 1), "aging seed: same seed, same machine", default=0)
    processes: tuple[SimProcessSettings, ...] = setting(
        Records(
            Section(SimProcessSettings, whole=True),
            "a non-empty list of {comm, heap, thp, count}", non_empty=True,
        ),
        "what runs on it (targets match them by comm, as on Linux)",
        default=(
            SimProcessSettings("simdb", 256 << 20),
            SimProcessSettings("simcache", 64 << 20, count=2),
        ),
    )  # fmt: skip

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.memory < self.nodes * (4 << 20):  # a 4 MiB buddy block per node at least
            yield "memory", "must be at least 4MiB per node (nodes)"

    def scenario(self) -> Scenario:
        """This machine, to be aged (imported lazily: the simulator is numpy-heavy)."""
        from ..backends.sim.aging import Scenario

        return Scenario(**machine(self))


def machine(settings: SimulatedSettings) -> dict[str, Any]:
    """The declared settings of a simulated machine, by name."""
    return {s.name: getattr(settings, s.name) for s in settings_of(SimulatedSettings)}


def check_machine(settings: SimulatedSettings) -> Iterator[tuple[str, str]]:
    """What is wrong with a machine made in code (an aging Scenario), as (setting, problem):
    each value against its declaration, as the file's would be, then the section's own
    problems."""
    for s in settings_of(SimulatedSettings):
        value = getattr(settings, s.name)
        if value == ():
            continue  # no processes: a Scenario's default workload
        problem = check(s, value)
        if problem:
            yield s.name, problem
    yield from settings.problems()


# ------------------------------------------------------------------------------ daemon


def _paced(d: DaemonSettings) -> float | None:
    """The scheduler's duty cycle: None (not paced) unless latency-sensitive."""
    return d.duty_cycle if d.latency_sensitive else None


@section
class DaemonSettings:
    """The `daemon:` section. Defaults favour running unnoticed next to busy services."""

    backend: BackendKind = setting(
        Choice(BackendKind), "kernel: this machine's Linux; simulated: a machine in memory "
        "(`simulated` below), for trying policies without root. Fixed at start: a reload "
        "cannot change it", default=BackendKind.KERNEL,
    )  # fmt: skip
    method: Method = setting(
        Choice(Method), "how memory is made contiguous: collapse is process_madvise("
        "MADV_COLLAPSE), Linux >= 6.1 (on the simulator: a khugepaged-style copy into a free "
        "2MiB block); ranger is Translation Ranger's syscall, only on a kernel patched with "
        "it, or its algorithm on the simulator; ranger-improved (cost-chosen anchors) and "
        "compaction run on the simulator only. A method the backend cannot carry out is "
        "refused at start, saying why", default=Method.COLLAPSE, per_target=True,
    )  # fmt: skip
    scan_interval: float = setting(Duration(0.1), "how often every target is scanned", default=30.0)
    bytes_per_second: int = setting(
        Size(PMD_SIZE), "memory collapsed per second, at most", default=256 << 20,
        key="budget.bytes_per_second", plan=Plan("bytes_per_second"),
    )  # fmt: skip
    cpu_share: float = setting(
        Number(0.001, 1), "share of one core spent collapsing (the kernel's time) and "
        "watching (the daemon's: discovery, scans; at most half of it, or cycles come "
        "less often than scan_interval), at most",
        default=0.1, key="budget.cpu_share", plan=Plan("cpu_share"),
    )  # fmt: skip
    chunk: int = setting(
        Chunk(), "largest single request; signals, budgets and pauses take effect between "
        "requests (a paced target's requests are one 2MiB region)", default=64 << 20,
        per_target=True, plan=Plan("chunk_bytes", by_target="chunk_by_target"),
    )  # fmt: skip
    cooldown: float = setting(
        Duration(), "rest for a target after each request", default=0.0, per_target=True,
        plan=Plan("cooldown", by_target="cooldown_by_target"),
    )  # fmt: skip
    backoff_initial: float = setting(
        Duration(0.001), "rest after EAGAIN or EBUSY (that target) or ENOMEM (the whole "
        "machine), doubling on each failure ...", default=5.0, key="backoff.initial",
        plan=Plan("backoff_initial"),
    )  # fmt: skip
    backoff_max: float = setting(
        Duration(0.001), "... up to this (at least initial); a success resets it",
        default=600.0, key="backoff.max", plan=Plan("backoff_max"),
    )  # fmt: skip
    psi_some_avg10: float = setting(
        Number(0, 100), "pause all work while memory pressure (/proc/pressure/memory "
        '"some avg10", a percentage) is above this', default=10.0,
        key="pressure.psi_some_avg10", plan=Plan("psi_some_avg10"),
    )  # fmt: skip
    min_available: int = setting(
        Size(), "pause all work while MemAvailable is below this", default=1 << 30,
        key="pressure.min_available", plan=Plan("min_available_bytes"),
    )  # fmt: skip
    # Pacing. Every target is latency-sensitive unless it says otherwise: the daemon cannot
    # know which services care about their tail latency, and a sweep of back-to-back
    # collapses costs them dearly (an in-memory database: p99 x10; benchmarks/latency.py: p99.9
    # x18), while pacing costs only time, and after the first conversion the daemon only
    # mends what forks and purges split. Batch jobs opt out per target. 10%: measured here,
    # the reader's p99 stayed within noise of untouched at 5% and at 10%, and 10% converts
    # 2 GiB in under two minutes even where one collapse takes 10 ms (this VM); where it
    # takes the usual ~1 ms, 2 GiB takes seconds.
    latency_sensitive: bool = setting(
        Flag(), "one 2MiB region per request, then a rest, so that collapsing takes at most "
        "duty_cycle of wall time. On by default: memdefragd cannot tell which services care "
        "about tail latency, and pacing costs only conversion time. Batch jobs: false",
        default=True, key="pacing.latency_sensitive", per_target=True,
    )  # fmt: skip
    duty_cycle: float = setting(
        Share(), "the rest after each call is its duration x (1 - d) / d; a target that "
        "sets duty_cycle alone is paced", default=0.10, key="pacing.duty_cycle",
        per_target=True, plan=Plan("duty_cycle", by_target="duty_by_target", value=_paced),
    )  # fmt: skip
    max_pause: float = setting(
        Duration(), "longest rest after one call", default=1.0, key="pacing.max_pause",
        plan=Plan("max_pause"),
    )  # fmt: skip
    access_source: AccessSource = setting(
        Choice(AccessSource, false=AccessSource.OFF), "how hot regions are (HawkEye's "
        "access coverage), to rank them: auto is DAMON (a kdamond of our own, only where "
        "no one else's runs and the kernel has vaddr), else referenced: clear_refs and "
        "smaps Referenced per VMA, which clears the target's accessed bits (reclaim sees "
        "its pages idle for a while); off (quoted or not) ranks by size alone",
        default=AccessSource.AUTO, key="access.source",
    )  # fmt: skip
    # clear_refs walks every page table of the target and flushes its TLB, and smaps'
    # Referenced walks them again, at every window: a cost that grows with the target (a
    # 2.4 GiB database's p99 rose twentyfold for seconds at the start). Above this RSS a
    # target is ranked without access figures where the sampler is `referenced` (DAMON's
    # cost is bounded by its regions, not the target's size, so it has no such limit).
    access_referenced_max_rss: int = setting(
        Size(), "largest RSS of a target measured through clear_refs + Referenced (each "
        "window walks all its page tables and flushes its TLB); larger ones are ranked by "
        "size alone, and the log says which", default=4 << 30,
        key="access.referenced_max_rss",
    )  # fmt: skip
    # Regions nobody touched in the last access window: "last" queues them after all the
    # rest (an idle process is still converted, once the busy ones are done); "skip" never
    # collapses them (saves the work and the memory a collapse zero-fills; an idle cache
    # then stays on 4 KiB pages until it is used).
    access_untouched: Untouched = setting(
        Choice(Untouched), "regions nobody touched in the last access window: last queues "
        "them after all the rest, skip never collapses them", default=Untouched.LAST,
        key="access.untouched",
        plan=Plan("collapse_untouched", value=lambda d: d.access_untouched == Untouched.LAST),
    )  # fmt: skip
    compaction: bool = setting(
        Flag(), "when collapses fail for want of free 2MiB blocks, ask the kernel to "
        "compact that node", default=False, key="compaction.enabled",
    )  # fmt: skip
    compaction_interval: float = setting(
        Duration(1), "at most this often per node", default=60.0,
        key="compaction.min_interval",
    )  # fmt: skip
    ranger_syscall: int | None = setting(
        Nullable(Integer(0, 65535)), "scan_process_memory's number on a kernel patched with "
        "Translation Ranger (never guessed)", default=None, key="ranger.syscall",
    )  # fmt: skip
    ranger_breakout_chunks: int | None = setting(
        Nullable(Integer(0, 1 << 20)), "2 MiB chunks per call of Translation Ranger's pass "
        "(its num_breakout_chunks sysctl, set for each pass and put back after): short calls "
        "that a stop or pacing can come between; unset leaves the sysctl as it is",
        default=None, key="ranger.breakout_chunks",
    )  # fmt: skip
    metrics_listen: tuple[str, int] | None = setting(
        Listen(), "the Prometheus endpoint (/metrics); a host name must resolve here",
        default=("127.0.0.1", DEFAULT_METRICS_PORT), key="metrics.listen",
    )  # fmt: skip
    simulated: SimulatedSettings = setting(
        Section(SimulatedSettings), "the machine of backend: simulated, aged once at start",
        default=SimulatedSettings(),
    )  # fmt: skip

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.backoff_max < self.backoff_initial:
            yield "backoff", "max must not be below initial"

    def backend_key(self) -> tuple[str, SimulatedSettings | None]:
        """What fixes the backend for the daemon's lifetime (a reload cannot change it)."""
        return self.backend, self.simulated if self.backend == BackendKind.SIMULATED else None

    def overridden(self, given: Mapping[str, Any]) -> DaemonSettings:
        """These settings with a target's `overrides:` applied. A target that sets only
        duty_cycle asks to be paced, whatever the daemon-wide latency_sensitive."""
        if "duty_cycle" in given and "latency_sensitive" not in given:
            given = {**given, "latency_sensitive": True}
        return dataclasses.replace(self, **given)


# A target's overrides: the daemon settings marked per_target, each under its own name.
OVERRIDES = tuple(
    dataclasses.replace(s, key=s.name) for s in settings_of(DaemonSettings) if s.per_target
)


# ------------------------------------------------------------------------------ targets

MATCH = declared(
    Matcher,
    Setting(Pattern(), "regex searched in the process name (15 characters, as in "
            "`ps -o comm`)", name="comm"),
    Setting(Pattern(), "regex searched in the arguments joined by spaces, of which a "
            "pattern sees only the first 4096 bytes (as `pgrep -f`): on a longer command "
            "line `$` matches at that cut, not at the real end", name="cmdline"),
    Setting(AbsolutePath("an absolute path or glob"), "the executable, or a glob such as "
            "/usr/lib/jvm/*/bin/java", name="exe"),
    Setting(Users(), "user name or uid, or a list of them", key="user", name="uids"),
    Setting(AbsolutePath("a cgroup v2 path"), "that cgroup and everything below it",
            name="cgroup"),
    Setting(Text("a systemd unit"), "a systemd unit such as redis.service, anywhere in "
            "the cgroup path", name="unit"),
    Setting(Pids(), "a pid or a list of pids", key="pid", name="pids"),
)  # fmt: skip

TARGET = (
    *declared(
        Target,
        Setting(Text(), "what metrics and logs call the target (unique)", name="name",
                required="every target needs a name (used in metrics)"),
        Setting(Section(Matcher, MATCH), "which processes: every key given must hold; "
                "without match, every process (narrow it with min_rss)", name="match"),
        Setting(OneOrMany(Section(Matcher, MATCH)), "processes left out: those matching "
                "any of these (keys as in match)", name="exclude"),
        Setting(Size(), "ignore processes with less resident memory", name="min_rss"),
        Setting(Choice(Mode), "enforce: measure and defragment; observe: measure and "
                "export only", name="mode"),
        Setting(Integer(-1000, 1000), "higher is served first when work must be rationed",
                name="priority"),
    ),
    Setting(Section(dict, OVERRIDES), "this target's own values of daemon settings "
            "(setting duty_cycle alone means paced)", name="overrides", default={}),
)  # fmt: skip


class Targets:
    """The `targets:` list: each target read on its own (one refused is left out, the
    others are still read); names are unique. Yields (target, its overrides or None)."""

    item = Section(dict, TARGET)

    def read(
        self, walk: Walk, node: yaml.Node, key: str
    ) -> tuple[tuple[Target, dict[str, Any] | None], ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise walk.fail(node, key, "expected a list of targets")
        out: list[tuple[Target, dict[str, Any] | None]] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(node.value):
            try:
                values = self.item.read(walk, item, f"{key}[{i}]")
            except Invalid:
                continue
            name = values["name"]
            if name in seen:
                walk.error(item, f"{key}[{i}].name", "duplicate target name (first on "
                           f"line {seen[name]})")  # fmt: skip
                continue
            seen[name] = item.start_mark.line + 1
            overrides = values.pop("overrides", None)
            out.append((Target(**values), overrides))
        return tuple(out)

    def show(self, value: object) -> str:
        return "[]"

    def describe(self) -> str:
        return "a list of targets (see its section)"


# ------------------------------------------------------------------------------ the file

ROOT = (
    Setting(Section(DaemonSettings), "daemon-wide settings; every key is optional",
            key="daemon", name="daemon", default=DaemonSettings()),
    Setting(Targets(), "the processes to watch; a process belongs to the first target (in "
            "this order) that matches it", key="targets", name="targets",
            required="list the processes to watch"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    targets: tuple[Target, ...]
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    # By target name, for targets with `overrides:`: the daemon settings with them applied.
    overrides: dict[str, DaemonSettings] = field(default_factory=dict)
    sha256: str = ""  # of the file's bytes, to tell which config is loaded

    def settings_for(self, target: str) -> DaemonSettings:
        """The settings a target works under: its overrides over the daemon's."""
        return self.overrides.get(target, self.daemon)


def read_config(walk: Walk, root: yaml.Node | None) -> Config:
    """The config a composed file describes; its problems are left in `walk`."""
    if root is None:
        walk.error(None, "", "the file is empty; it needs at least a 'targets:' list")
        return Config(walk.path, ())
    try:
        values = read_settings(walk, root, "", ROOT)
    except Invalid:
        return Config(walk.path, ())
    daemon = values.get("daemon", DaemonSettings())
    targets = values.get("targets", ())
    return Config(
        walk.path,
        tuple(t for t, _ in targets),
        daemon,
        {t.name: daemon.overridden(o) for t, o in targets if o is not None},
    )
