"""The YAML configuration: strict loading with errors that point at file:line.

PyYAML silently keeps the last of duplicate keys and knows nothing of our schema, so we
validate the composed node tree ourselves: every message names the file, the line, the
key path and what to do, and all problems are reported at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .targets import Matcher, Target
from .units import parse_duration, parse_size

DEFAULT_PATH = "/etc/memdefragd/memdefragd.yaml"
MODES = ("enforce", "observe")
BACKENDS = ("kernel", "simulated")
METHODS = ("collapse", "ranger", "ranger-improved", "compaction")  # backend.refusal(): which run
MATCH_KEYS = ("comm", "cmdline", "exe", "user", "cgroup", "unit", "pid")
TARGET_KEYS = ("name", "match", "exclude", "min_rss", "mode", "priority", "overrides")
OVERRIDE_KEYS = ("method", "chunk", "cooldown", "latency_sensitive", "duty_cycle")
DAEMON_KEYS = (
    "backend", "method", "scan_interval", "budget", "chunk", "cooldown", "backoff",
    "pressure", "pacing", "access", "compaction", "ranger", "metrics", "simulated",
)  # fmt: skip
PACING_KEYS = ("latency_sensitive", "duty_cycle", "max_pause")
ACCESS_KEYS = ("source", "untouched")
ACCESS_SOURCES = ("auto", "damon", "referenced", "off")
UNTOUCHED = ("skip", "last")
SIMULATED_KEYS = (
    "memory", "nodes", "fragmentation", "unmovable", "unmovable_layout", "free", "seed",
    "processes",
)  # fmt: skip
SIM_PROCESS_KEYS = ("comm", "heap", "thp", "count")
TOP_KEYS = ("daemon", "targets")
PMD = 2 << 20
DEFAULT_METRICS_PORT = 9847


class ConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Overrides:
    """Per-target settings that replace the daemon-wide ones (None: not overridden)."""

    method: str | None = None
    chunk: int | None = None
    cooldown: float | None = None
    latency_sensitive: bool | None = None
    duty_cycle: float | None = None


@dataclass(frozen=True, slots=True)
class SimProcessSettings:
    comm: str
    heap: int
    thp: bool = True
    count: int = 1


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    """`daemon.simulated`: the machine the simulated backend ages at start, and the
    processes left running on it (aged along with it, so their memory is scattered)."""

    memory: int = 1 << 30
    nodes: int = 1
    fragmentation: float = 0.7  # target unusable free space index at order 9
    unmovable: float = 0.02  # share of frames the kernel holds (slab, page tables, pins)
    unmovable_layout: str = "scattered"
    free: float = 0.25  # share of memory free once aged
    seed: int = 0
    processes: tuple[SimProcessSettings, ...] = (
        SimProcessSettings("simdb", 256 << 20),
        SimProcessSettings("simcache", 64 << 20, count=2),
    )

    def scenario(self):  # -> backends.sim.aging.Scenario (imported lazily: numpy-heavy)
        from .backends.sim.aging import ProcSpec, Scenario

        return Scenario(
            memory=self.memory, nodes=self.nodes, fragmentation=self.fragmentation,
            unmovable=self.unmovable, unmovable_layout=self.unmovable_layout, free=self.free,
            seed=self.seed,
            processes=tuple(
                ProcSpec(p.comm, p.heap, thp=p.thp, count=p.count) for p in self.processes
            ),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The `daemon:` section. Defaults favour running unnoticed next to busy services."""

    backend: str = "kernel"
    method: str = "collapse"
    scan_interval: float = 30.0  # seconds between scans of every target
    bytes_per_second: int = 256 << 20  # at most this much memory collapsed per second
    cpu_share: float = 0.1  # of one core, spent inside the kernel collapsing
    chunk: int = 64 << 20  # one request at most; the loop checks signals between chunks
    cooldown: float = 0.0  # seconds a target rests after each request
    backoff_initial: float = 5.0  # after EAGAIN/ENOMEM/EBUSY, doubling ...
    backoff_max: float = 600.0  # ... up to this
    psi_some_avg10: float = 10.0  # pause while memory pressure (PSI some avg10, %) exceeds it
    min_available: int = 1 << 30  # pause while MemAvailable is below it
    # Pacing. Every target is latency-sensitive unless it says otherwise: the daemon cannot
    # know which services care about their tail latency, and a sweep of back-to-back
    # collapses costs them dearly (issue 7: p99 x10; benchmarks/latency.py here: p99.9
    # x18), while pacing costs only time, and after the first conversion the daemon only
    # mends what forks and purges split. Batch jobs opt out per target. 10%: measured here,
    # the reader's p99 stayed within noise of untouched at 5% and at 10%, and 10% converts
    # 2 GiB in under two minutes even where one collapse takes 10 ms (this VM); where it
    # takes the usual ~1 ms, 2 GiB takes seconds.
    latency_sensitive: bool = True  # one 2 MiB region per request, then a rest ...
    duty_cycle: float = 0.10  # ... so that collapsing takes at most this share of wall time
    max_pause: float = 1.0  # longest rest after one call
    access_source: str = "auto"  # auto: DAMON where usable, else clear_refs + Referenced
    # Regions nobody touched in the last access window: "last" queues them after all the
    # rest (an idle process is still converted, once the busy ones are done); "skip" never
    # collapses them (saves the work and the memory a collapse zero-fills; an idle cache
    # then stays on 4 KiB pages until it is used).
    access_untouched: str = "last"
    compaction: bool = False  # ask the kernel to compact when collapses lack free 2 MiB blocks
    compaction_interval: float = 60.0  # at most once per this many seconds per node
    ranger_syscall: int | None = None  # scan_process_memory's number on a patched kernel
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", DEFAULT_METRICS_PORT)
    simulated: SimulatedSettings = SimulatedSettings()

    def backend_key(self) -> tuple[str, SimulatedSettings | None]:
        """What fixes the backend for the daemon's lifetime (a reload cannot change it)."""
        return self.backend, self.simulated if self.backend == "simulated" else None


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    targets: tuple[Target, ...]
    daemon: DaemonSettings = DaemonSettings()
    overrides: dict[str, Overrides] = field(default_factory=dict)  # by target name
    sha256: str = ""  # of the file's bytes, to tell which config is loaded


def load_config(path: str | os.PathLike[str], *, check_owner: bool = True) -> Config:
    path = str(path)
    try:
        if check_owner:
            _check_file_safety(path)
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    return parse_config(text, path)


def parse_config(text: str, path: str = "<config>") -> Config:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        msg = f"{where}: YAML syntax: {e.problem or e}"
        if e.context and e.context_mark and e.context_mark is not mark:
            msg += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError([msg]) from e
    v = _Validator(path)
    cfg = v.config(root)
    if v.errors:
        raise ConfigError(v.errors)
    return replace(cfg, sha256=hashlib.sha256(text.encode()).hexdigest())


def _check_file_safety(path: str) -> None:
    st = os.stat(path)
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0):
        raise ConfigError(
            [
                f"{path}: refusing a config file writable by other users (mode "
                f"{stat.filemode(st.st_mode)}): memdefragd runs as root and acts on what it "
                f"says; fix with: chmod go-w {path}"
            ]
        )
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            [
                f"{path}: refusing a config file owned by uid {st.st_uid}, neither root nor "
                f"us; fix with: chown root {path}"
            ]
        )


_constructor = yaml.constructor.SafeConstructor()


class _Validator:
    def __init__(self, path: str):
        self.path = path
        self.errors: list[str] = []
        self.overrides: dict[str, Overrides] = {}

    def error(self, node: yaml.Node | None, key: str, msg: str) -> None:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.errors.append(
            f"{self.path}{line}: {key}: {msg}" if key else f"{self.path}{line}: {msg}"
        )

    def mapping(
        self, node: yaml.Node | None, key: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Keys of a mapping node, rejecting duplicates and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, key, f"expected a mapping with keys {', '.join(allowed)}")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            name = self.scalar(k)
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                self.error(k, full, "keys must be strings")
            elif name in out:
                first = out[name][0].start_mark.line + 1
                self.error(k, full, f"duplicate key (first given on line {first})")
            elif name not in allowed:
                self.error(k, full, f"unknown key; expected one of: {', '.join(allowed)}")
            else:
                out[name] = (k, v)
        return out

    @staticmethod
    def scalar(node: yaml.Node) -> object:
        if isinstance(node, yaml.ScalarNode):
            return _constructor.construct_object(node)
        return node  # non-scalars are reported by the caller's type check

    def string(self, node: yaml.Node, key: str) -> str | None:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            self.error(node, key, f"expected a non-empty string, got {_show(value)}")
            return None
        return value

    def integer(self, node: yaml.Node, key: str) -> int | None:
        value = self.scalar(node)
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(node, key, f"expected an integer, got {_show(value)}")
            return None
        return value

    def regex(self, node: yaml.Node, key: str) -> re.Pattern[str] | None:
        value = self.string(node, key)
        if value is None:
            return None
        try:
            return re.compile(value)
        except re.error as e:
            self.error(node, key, f"bad regular expression {value!r}: {e}")
            return None

    def config(self, root: yaml.Node | None) -> Config:
        if root is None:
            self.error(None, "", "the file is empty; it needs at least a 'targets:' list")
            return Config(self.path, ())
        keys = self.mapping(root, "", TOP_KEYS)
        targets: list[Target] = []
        daemon = DaemonSettings()
        if keys is not None:
            if "daemon" in keys:
                daemon = self.daemon(keys["daemon"][1])
            if "targets" not in keys:
                self.error(root, "targets", "missing; list the processes to watch")
            else:
                targets = self.targets(keys["targets"][1])
        return Config(self.path, tuple(targets), daemon, dict(self.overrides))

    def daemon(self, node: yaml.Node) -> DaemonSettings:
        keys = self.mapping(node, "daemon", DAEMON_KEYS)
        if keys is None:
            return DaemonSettings()
        kw: dict[str, object] = {}
        for name, (_, v) in keys.items():
            k = f"daemon.{name}"
            if name == "backend":
                kw[name] = self.choice(v, k, BACKENDS)
            elif name == "method":
                kw[name] = self.choice(v, k, METHODS)
            elif name in ("scan_interval", "cooldown"):
                kw[name] = self.duration(v, k, minimum=0.1 if name == "scan_interval" else 0)
            elif name == "chunk":
                kw[name] = self.chunk(v, k)
            elif name == "budget":
                sub = self.mapping(v, k, ("bytes_per_second", "cpu_share")) or {}
                if "bytes_per_second" in sub:
                    n = sub["bytes_per_second"][1]
                    kw["bytes_per_second"] = self.size(n, f"{k}.bytes_per_second", minimum=PMD)
                if "cpu_share" in sub:
                    kw["cpu_share"] = self.number(sub["cpu_share"][1], f"{k}.cpu_share", 0.001, 1)
            elif name == "backoff":
                sub = self.mapping(v, k, ("initial", "max")) or {}
                if "initial" in sub:
                    kw["backoff_initial"] = self.duration(sub["initial"][1], f"{k}.initial", 0.001)
                if "max" in sub:
                    kw["backoff_max"] = self.duration(sub["max"][1], f"{k}.max", 0.001)
            elif name == "pressure":
                sub = self.mapping(v, k, ("psi_some_avg10", "min_available")) or {}
                if "psi_some_avg10" in sub:
                    kw["psi_some_avg10"] = self.number(
                        sub["psi_some_avg10"][1], f"{k}.psi_some_avg10", 0, 100
                    )
                if "min_available" in sub:
                    kw["min_available"] = self.size(sub["min_available"][1], f"{k}.min_available")
            elif name == "pacing":
                sub = self.mapping(v, k, PACING_KEYS) or {}
                if "latency_sensitive" in sub:
                    n = sub["latency_sensitive"][1]
                    kw["latency_sensitive"] = self.boolean(n, f"{k}.latency_sensitive")
                if "duty_cycle" in sub:
                    kw["duty_cycle"] = self.fraction(sub["duty_cycle"][1], f"{k}.duty_cycle")
                if "max_pause" in sub:
                    kw["max_pause"] = self.duration(sub["max_pause"][1], f"{k}.max_pause")
            elif name == "access":
                sub = self.mapping(v, k, ACCESS_KEYS) or {}
                if "source" in sub:
                    kw["access_source"] = self.choice(
                        sub["source"][1], f"{k}.source", ACCESS_SOURCES
                    )
                if "untouched" in sub:
                    kw["access_untouched"] = self.choice(
                        sub["untouched"][1], f"{k}.untouched", UNTOUCHED
                    )
            elif name == "compaction":
                sub = self.mapping(v, k, ("enabled", "min_interval")) or {}
                if "enabled" in sub:
                    kw["compaction"] = self.boolean(sub["enabled"][1], f"{k}.enabled")
                if "min_interval" in sub:
                    kw["compaction_interval"] = self.duration(
                        sub["min_interval"][1], f"{k}.min_interval", 1
                    )
            elif name == "ranger":
                sub = self.mapping(v, k, ("syscall",)) or {}
                if "syscall" in sub and self.scalar(sub["syscall"][1]) is not None:
                    kw["ranger_syscall"] = self.integer(sub["syscall"][1], f"{k}.syscall")
        if "simulated" in keys:
            kw["simulated"] = self.simulated(keys["simulated"][1], "daemon.simulated")
        if "metrics" in keys:
            sub = self.mapping(keys["metrics"][1], "daemon.metrics", ("listen",)) or {}
            if "listen" in sub:
                kw["metrics_listen"] = self.listen(sub["listen"][1], "daemon.metrics.listen")
        off = kw.get("metrics_listen") == "off"
        settings = replace(
            DaemonSettings(),
            **{
                k: x for k, x in kw.items() if x is not None and not (k == "metrics_listen" and off)
            },
        )
        if off:
            settings = replace(settings, metrics_listen=None)
        if settings.backoff_max < settings.backoff_initial:
            self.error(node, "daemon.backoff", "max must not be below initial")
        return settings

    def simulated(self, node: yaml.Node, key: str) -> SimulatedSettings | None:
        keys = self.mapping(node, key, SIMULATED_KEYS)
        if keys is None:
            return None
        kw: dict[str, object] = {}
        for name, (_, v) in keys.items():
            k = f"{key}.{name}"
            if name == "memory":
                kw[name] = self.size(v, k, minimum=64 << 20)
            elif name in ("nodes", "seed"):
                n = self.integer(v, k)
                if n is not None and n < (1 if name == "nodes" else 0):
                    self.error(v, k, f"must be at least {1 if name == 'nodes' else 0}, got {n}")
                    n = None
                kw[name] = n
            elif name == "fragmentation":
                kw[name] = self.number(v, k, 0, 1)
            elif name == "unmovable":
                kw[name] = self.number(v, k, 0, 0.5)
            elif name == "free":
                kw[name] = self.number(v, k, 0.01, 0.95)
            elif name == "unmovable_layout":
                kw[name] = self.choice(v, k, ("scattered", "clustered"))
            elif name == "processes":
                kw[name] = self.sim_processes(v, k)
        return replace(SimulatedSettings(), **{k: x for k, x in kw.items() if x is not None})

    def sim_processes(self, node: yaml.Node, key: str) -> tuple[SimProcessSettings, ...] | None:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.error(node, key, "expected a non-empty list of {comm, heap, thp, count}")
            return None
        out = []
        for i, item in enumerate(node.value):
            k = f"{key}[{i}]"
            keys = self.mapping(item, k, SIM_PROCESS_KEYS)
            if keys is None:
                continue
            if "comm" not in keys or "heap" not in keys:
                self.error(item, k, "needs comm (process name) and heap (size)")
                continue
            comm = self.string(keys["comm"][1], f"{k}.comm")
            heap = self.size(keys["heap"][1], f"{k}.heap", minimum=PMD)
            thp = self.boolean(keys["thp"][1], f"{k}.thp") if "thp" in keys else True
            count = self.integer(keys["count"][1], f"{k}.count") if "count" in keys else 1
            if count is not None and count < 1:
                self.error(keys["count"][1], f"{k}.count", f"must be at least 1, got {count}")
                count = None
            if comm and heap and thp is not None and count:
                out.append(SimProcessSettings(comm, heap, thp, count))
        return tuple(out)

    def listen(self, node: yaml.Node, key: str) -> tuple[str, int] | str | None:
        """HOST:PORT, or off (or false) for no endpoint."""
        value = self.scalar(node)
        if value is False or value in ("off", None):
            return "off"
        host, _, port = str(value).rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            self.error(
                node, key, f"expected HOST:PORT such as 127.0.0.1:9847 (port 0: any free "
                f"port), or off, got {value!r}",
            )  # fmt: skip
            return None
        return host.strip("[]"), int(port)

    def choice(self, node: yaml.Node, key: str, allowed: tuple[str, ...]) -> str | None:
        value = self.scalar(node)
        if value not in allowed:
            self.error(node, key, f"expected one of {', '.join(allowed)}, got {_show(value)}")
            return None
        return str(value)

    def duration(self, node: yaml.Node, key: str, minimum: float = 0) -> float | None:
        try:
            seconds = parse_duration(self.scalar(node))  # type: ignore[arg-type]
        except ValueError as e:
            self.error(node, key, str(e))
            return None
        if seconds < minimum:
            self.error(node, key, f"must be at least {minimum:g}s, got {seconds:g}s")
            return None
        return seconds

    def size(self, node: yaml.Node, key: str, minimum: int = 0) -> int | None:
        try:
            n = parse_size(self.scalar(node))  # type: ignore[arg-type]
        except ValueError as e:
            self.error(node, key, str(e))
            return None
        if n < minimum:
            self.error(node, key, f"must be at least {minimum} bytes, got {n}")
            return None
        return n

    def chunk(self, node: yaml.Node, key: str) -> int | None:
        n = self.size(node, key, minimum=PMD)
        if n is not None and (n % PMD or n > 64 << 20):
            self.error(node, key, f"must be a multiple of 2MiB and at most 64MiB, got {n} bytes")
            return None
        return n

    def number(self, node: yaml.Node, key: str, lo: float, hi: float) -> float | None:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            self.error(node, key, f"expected a number from {lo:g} to {hi:g}, got {_show(value)}")
            return None
        return float(value)

    def fraction(self, node: yaml.Node, key: str) -> float | None:
        """A share in (0, 1]: 0.05 or '5%'."""
        value = self.scalar(node)
        if isinstance(value, str) and value.strip().endswith("%"):
            with contextlib.suppress(ValueError):
                value = float(value.strip()[:-1]) / 100
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            self.error(node, key, f"expected a share such as 5% or 0.05 (above 0, at most "
                       f"100%), got {_show(self.scalar(node))}")  # fmt: skip
            return None
        return float(value)

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        value = self.scalar(node)
        if not isinstance(value, bool):
            self.error(node, key, f"expected true or false, got {_show(value)}")
            return None
        return value

    def overrides_of(self, node: yaml.Node, key: str) -> Overrides | None:
        keys = self.mapping(node, key, OVERRIDE_KEYS)
        if keys is None:
            return None
        kw: dict[str, object] = {}
        if "method" in keys:
            kw["method"] = self.choice(keys["method"][1], f"{key}.method", METHODS)
        if "chunk" in keys:
            kw["chunk"] = self.chunk(keys["chunk"][1], f"{key}.chunk")
        if "cooldown" in keys:
            kw["cooldown"] = self.duration(keys["cooldown"][1], f"{key}.cooldown")
        if "latency_sensitive" in keys:
            n = keys["latency_sensitive"][1]
            kw["latency_sensitive"] = self.boolean(n, f"{key}.latency_sensitive")
        if "duty_cycle" in keys:
            kw["duty_cycle"] = self.fraction(keys["duty_cycle"][1], f"{key}.duty_cycle")
        return Overrides(**kw)  # type: ignore[arg-type]

    def targets(self, node: yaml.Node) -> list[Target]:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, "targets", "expected a list of targets")
            return []
        out: list[Target] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(node.value):
            t = self.target(item, f"targets[{i}]")
            if t is None:
                continue
            if t.name in seen:
                self.error(item, f"targets[{i}].name", f"duplicate target name {t.name!r} "
                           f"(first on line {seen[t.name]})")  # fmt: skip
                continue
            seen[t.name] = item.start_mark.line + 1
            out.append(t)
        return out

    def target(self, node: yaml.Node, key: str) -> Target | None:
        keys = self.mapping(node, key, TARGET_KEYS)
        if keys is None:
            return None
        before = len(self.errors)
        name = None
        if "name" not in keys:
            self.error(node, f"{key}.name", "missing; every target needs a name (used in metrics)")
        else:
            name = self.string(keys["name"][1], f"{key}.name")
        match = Matcher()
        if "match" in keys:
            match = self.matcher(keys["match"][1], f"{key}.match") or match
        exclude: list[Matcher] = []
        if "exclude" in keys:
            ex = keys["exclude"][1]
            items = ex.value if isinstance(ex, yaml.SequenceNode) else [ex]
            for j, item in enumerate(items):
                sub = (
                    f"{key}.exclude[{j}]" if isinstance(ex, yaml.SequenceNode) else f"{key}.exclude"
                )
                m = self.matcher(item, sub)
                if m is not None:
                    exclude.append(m)
        min_rss = 0
        if "min_rss" in keys:
            n = keys["min_rss"][1]
            try:
                min_rss = parse_size(self.scalar(n))  # type: ignore[arg-type]
            except ValueError as e:
                self.error(n, f"{key}.min_rss", str(e))
        mode = "enforce"
        if "mode" in keys:
            n = keys["mode"][1]
            mode = self.string(n, f"{key}.mode") or mode
            if mode not in MODES:
                self.error(n, f"{key}.mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
        priority = 0
        if "priority" in keys:
            priority = self.integer(keys["priority"][1], f"{key}.priority") or 0
        overrides = None
        if "overrides" in keys:
            overrides = self.overrides_of(keys["overrides"][1], f"{key}.overrides")
        if len(self.errors) > before or name is None:
            return None
        if overrides is not None:
            self.overrides[name] = overrides
        return Target(name, match, tuple(exclude), min_rss, mode, priority)

    def matcher(self, node: yaml.Node, key: str) -> Matcher | None:
        keys = self.mapping(node, key, MATCH_KEYS)
        if keys is None:
            return None
        kw: dict[str, object] = {}
        for name, (_, v) in keys.items():
            k = f"{key}.{name}"
            if name in ("comm", "cmdline"):
                kw[name] = self.regex(v, k)
            elif name in ("exe", "cgroup", "unit"):
                s = self.string(v, k)
                if s is not None and name in ("exe", "cgroup") and not s.startswith("/"):
                    self.error(v, k, f"expected an absolute path starting with '/', got {s!r}")
                kw[name] = s
            elif name == "user":
                kw["uids"] = self.users(v, k)
            elif name == "pid":
                kw["pids"] = self.pids(v, k)
        return Matcher(**kw)  # type: ignore[arg-type]

    def users(self, node: yaml.Node, key: str) -> frozenset[int] | None:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        uids = set()
        for item in items:
            value = self.scalar(item)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                uids.add(value)
            elif isinstance(value, str) and value:
                try:
                    uids.add(pwd.getpwnam(value).pw_uid)
                except KeyError:
                    self.error(item, key, f"no such user {value!r} on this machine")
            else:
                self.error(item, key, f"expected a user name or uid, got {_show(value)}")
        return frozenset(uids)

    def pids(self, node: yaml.Node, key: str) -> frozenset[int] | None:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        pids = set()
        for item in items:
            value = self.scalar(item)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                pids.add(value)
            else:
                self.error(item, key, f"expected a positive pid, got {_show(value)}")
        return frozenset(pids)


def _show(value: object) -> str:
    if isinstance(value, yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"
