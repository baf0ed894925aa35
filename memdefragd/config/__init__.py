"""The YAML configuration: strict loading with errors that point at file:line.

PyYAML silently keeps the last of duplicate keys and knows nothing of our schema, so we
validate the composed node tree ourselves: every message names the file, the line, the
key path and what to do, and all problems are reported at once (the first MAX_ERRORS).

memdefragd runs as root, so the file is treated as hostile until proven otherwise:
`load_config` opens it the way OpenSSH opens its own files (trusted directories from / down,
no symbolic link, owner and mode checked on the open descriptor, a size limit before
parsing), and no message ever quotes what the file says, only where and what kind of value
(`memdefragd check-config /etc/shadow` must not print a password hash).
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import errno
import hashlib
import ipaddress
import os
import pwd
import re
import socket
import stat
import threading
from dataclasses import dataclass, field, replace

import yaml

from ..pipeline.targets import Matcher, Regex, RegexError, Target
from ..units import format_size, parse_duration, parse_size

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
# 1 MiB: the example with 500 targets takes about 100 KB. Checked on the open file before a
# byte is read (a 50 MB file took minutes and 2 GiB to parse), and again while reading.
MAX_CONFIG_BYTES = 1 << 20
MAX_ERRORS = 20  # reported in full; the rest are counted, so a hostile file can't flood
# Scalars and mappings the validator may visit. An alias-free file within the size limit
# has at most ~500,000; YAML aliases can repeat a subtree without limit ("billion laughs").
MAX_VALUES = 1_000_000
PRIORITY_RANGE = (-1000, 1000)
SYSCALL_RANGE = (0, 65535)  # no architecture numbers its system calls beyond this
SEED_RANGE = (0, (1 << 32) - 1)
NODES_RANGE = (1, 64)
COUNT_RANGE = (1, 10_000)
PID_RANGE = (1, 1 << 22)  # PID_MAX_LIMIT
UID_RANGE = (0, (1 << 32) - 2)  # (uid_t) -1 means "no user"
SIM_MEMORY_MAX = 1 << 40  # the simulator keeps ~30 bytes per 4 KiB frame: 8 GiB at 1 TiB
RESOLVE_TIMEOUT = 1.0  # seconds for a metrics.listen host name to resolve (reload waits)
# A SafeLoader with libyaml underneath parses several times faster; same nodes, same marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
        from ..backends.sim.aging import ProcSpec, Scenario

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
    """Read and validate the config at `path`.

    With check_owner (always, except for files of this repository in tests) the file must be
    one that only root (or we) could have written, checked so that nothing can be swapped
    between the check and the read: see _read_trusted. Without it, any regular file is
    read (still within the size limit)."""
    path = os.fspath(path)
    data = _read_trusted(path) if check_owner else _read_plain(path)
    return parse_config(data, path)


def parse_config(text: str | bytes, path: str = "<config>") -> Config:
    """Validate a config's text (bytes: as read from the file, decoded here). Errors say
    line and column and what kind of value was found, never the text itself."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(path, len(text))])
    if isinstance(text, bytes):
        text = _decode(text, path)
    _check_characters(text, path)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as e:
        raise ConfigError([_syntax_error(e, path)]) from None
    except yaml.YAMLError as e:  # a ReaderError _check_characters did not foresee
        raise ConfigError(
            [f"{path}: YAML cannot read this file ({type(e).__name__}); save it as plain "
             "UTF-8 text"]
        ) from None  # fmt: skip
    except RecursionError:  # the pure-Python composer, without libyaml
        raise ConfigError([f"{path}: nested too deeply for a config"]) from None
    v = _Validator(path)
    try:
        cfg = v.config(root)
    except _TooManyValues:
        raise ConfigError(
            [f"{path}: expands to more than {MAX_VALUES:,} values (YAML aliases repeating "
             "whole lists?); write the config out without aliases"]
        ) from None  # fmt: skip
    if v.errors:
        more = v.problems - len(v.errors)
        if more:
            v.errors.append(f"{path}: ... and {more} more error(s) not shown; fix these first")
        raise ConfigError(v.errors)
    return replace(cfg, sha256=hashlib.sha256(text.encode()).hexdigest())


_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO
_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a symlink: ENOTDIR


def _read_trusted(path: str) -> bytes:
    """The file's bytes, read so that no one but root (or our euid) could have chosen them.

    As OpenSSH's safe_path, but on descriptors, so nothing can be swapped between a check
    and the use: the directories of the file's real path are opened one by one from /, each
    relative to the last and without following a link, and each is checked on its
    descriptor (owned by root or us; writable by no one else, unless it is sticky like /tmp,
    where others cannot rename or remove what they do not own). The file is then opened in
    the last one without following a symbolic link (whoever can change a link chooses what
    we read), and its type, owner, mode and size are checked on the open descriptor, which
    is the only one read, at most MAX_CONFIG_BYTES + 1 bytes of it. Symbolic links among the
    directories are resolved first (realpath) and the result walked as above: a link in an
    untrusted directory is caught there, one that changes under us fails the walk."""
    parent, name = os.path.split(os.path.abspath(path))
    if not name:
        raise ConfigError([f"{path}: is a directory; give the config file's path"])
    dirfd = _open_trusted_dirs(os.path.realpath(parent), path)
    try:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            _check_type(st, path)  # before opening: opening a device can do things
            fd = os.open(name, _O_READ, dir_fd=dirfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(
                    [f"{path}: refusing a symbolic link: whoever can change the link chooses "
                     "what memdefragd (root) reads; give the real file's path instead (see: "
                     f"readlink -f {path})"]
                ) from None  # fmt: skip
            raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        _check_type(st, path)
        _check_owner_and_mode(st, path)
        return _read_fd(fd, st, path)
    finally:
        os.close(fd)


def _open_trusted_dirs(real_dir: str, path: str) -> int:
    """A descriptor of `real_dir` (absolute, no links) reached from / by descriptors, every
    directory on the way checked by _check_dir."""
    where = "/"
    fd = os.open(where, _O_DIR)
    try:
        _check_dir(os.fstat(fd), where, path)
        for part in real_dir.split("/"):
            if not part:
                continue
            where = os.path.join(where, part)
            try:
                nfd = os.open(part, _O_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ENOTDIR:  # realpath said directory; now it is not
                    msg = f"{where} changed while it was checked (now a link or a file)"
                    raise ConfigError([f"{path}: cannot read: {msg}; try again"]) from None
                raise ConfigError([f"{path}: cannot read: {e.strerror} ({where})"]) from None
            os.close(fd)
            fd = nfd
            _check_dir(os.fstat(fd), where, path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _trusted_uid(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _others_can_write(st: os.stat_result) -> bool:
    """Writable by users other than the owner: others, or a group other than root's."""
    return bool(st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0))


def _check_dir(st: os.stat_result, where: str, path: str) -> None:
    if not _trusted_uid(st.st_uid):
        raise ConfigError(
            [f"{path}: refusing a config under {where}, a directory owned by "
             f"{_owner(st.st_uid)}, neither root nor us: its owner could swap the file; "
             f"fix with: chown root {where} (or keep the config in a directory only root "
             "can write, such as /etc/memdefragd)"]
        )  # fmt: skip
    if _others_can_write(st) and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            [f"{path}: refusing a config under {where}, a directory other users can write "
             f"to (mode {stat.filemode(st.st_mode)}): they could replace the file; fix "
             f"with: chmod go-w {where}"]
        )  # fmt: skip


def _check_type(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError([f"{path}: is {kind}; give the path of the YAML config file"])


def _check_owner_and_mode(st: os.stat_result, path: str) -> None:
    if _others_can_write(st):
        raise ConfigError(
            [
                f"{path}: refusing a config file writable by other users (mode "
                f"{stat.filemode(st.st_mode)}): memdefragd runs as root and acts on what it "
                f"says; fix with: chmod go-w {path}"
            ]
        )
    if not _trusted_uid(st.st_uid):
        raise ConfigError(
            [
                f"{path}: refusing a config file owned by {_owner(st.st_uid)}, neither root "
                f"nor us; fix with: chown root {path}"
            ]
        )


def _read_plain(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        st = os.fstat(fd)
        _check_type(st, path)
        return _read_fd(fd, st, path)
    finally:
        os.close(fd)


def _too_big(path: str, size: int) -> str:
    return (
        f"{path}: refusing a config of {format_size(size)}: the limit is "
        f"{format_size(MAX_CONFIG_BYTES)} (500 targets take about 100 KB); is this the "
        "right file?"
    )


def _read_fd(fd: int, st: os.stat_result, path: str) -> bytes:
    """At most MAX_CONFIG_BYTES + 1 bytes: the size is checked before reading and again
    after, for a file that grows in between."""
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(path, st.st_size)])
    chunks: list[bytes] = []
    got = 0
    try:
        while got <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    if got > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(path, got)])
    return b"".join(chunks)


def _line_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of byte `offset`, all before it valid UTF-8."""
    start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, len(data[start:offset].decode()) + 1


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_column(data, e.start)
        raise ConfigError(
            [f"{path}:{line}:{col}: not valid UTF-8 (byte {e.start + 1} of the file); the "
             "config must be UTF-8 text: re-save it as UTF-8, or is this the right file?"]
        ) from None  # fmt: skip


# What YAML accepts in a stream (PyYAML's Reader.NON_PRINTABLE): found here first, so that
# the error has a line and column whichever parser (libyaml or Python) is in use.
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _check_characters(text: str, path: str) -> None:
    m = _NON_PRINTABLE.search(text)
    if m:
        i = m.start()
        line, col = text.count("\n", 0, i) + 1, i - text.rfind("\n", 0, i)
        raise ConfigError(
            [f"{path}:{line}:{col}: a control character, which YAML does not allow; the "
             "config must be plain text: remove it, or is this the right file?"]
        )  # fmt: skip


# PyYAML's messages quote what it found ("found character '%' that cannot start any
# token", "found undefined alias 'x'"): file text. Every quoted part is dropped but YAML's
# own punctuation and token names ("expected ',' or ']'", "but found '<block end>'").
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'" r'|"(?:[^"\\\n]|\\.)*"')
_YAML_WORDS = re.compile(r"""'(?:[-,:?!\[\]{}|>]|<[a-z ]+>)'""")


def _redact(message: str | None) -> str:
    if not message:
        return ""
    kept = _QUOTED.sub(lambda m: m[0] if _YAML_WORDS.fullmatch(m[0]) else "", message)
    return re.sub(r" ([;,)])", r"\1", " ".join(kept.split())).rstrip(" ,:")


def _syntax_error(e: yaml.MarkedYAMLError, path: str) -> str:
    mark = e.problem_mark or e.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
    msg = f"{where}: YAML syntax: {_redact(e.problem) or 'not valid YAML'}"
    context = _redact(e.context)
    if context and e.context_mark and e.context_mark is not mark:
        msg += f" ({context} at line {e.context_mark.line + 1})"
    return msg


class _TooManyValues(Exception):
    pass


_UNREADABLE = object()  # a scalar its YAML type cannot hold: `!!int x`, 5,000 digits, `!tag`
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,31}")


def _shown_key(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether an unknown key may be repeated in its error.

    A key is file text like any other, and the file may not be a config at all (`check-config
    /etc/shadow`, or a secret behind a symlink). A key is repeated only when it is a short
    lower-case identifier that is a prefix of, or close to (difflib ratio >= 0.75), a key we
    expect: the typos worth showing (`nmae`, `target`, `bytes`) tell nothing about a file
    that is not a config. Any other unknown key is pointed at by line and column."""
    if not _IDENTIFIER.fullmatch(name):
        return False
    return any(a.startswith(name) for a in allowed) or bool(
        difflib.get_close_matches(name, allowed, n=1, cutoff=0.75)
    )


class _Validator:
    def __init__(self, path: str):
        self.path = path
        self.errors: list[str] = []  # the first MAX_ERRORS
        self.problems = 0  # all errors found, kept or not
        self.values = 0  # nodes visited: at most MAX_VALUES
        self.overrides: dict[str, Overrides] = {}
        # One per load: it caches every node it builds (aliases hit the cache), and a
        # module-wide one would keep every config ever loaded alive.
        self.constructor = yaml.constructor.SafeConstructor()
        self.uids: dict[str, int | None] = {}

    def error(self, node: yaml.Node | None, key: str, msg: str) -> None:
        self.problems += 1
        if len(self.errors) >= MAX_ERRORS:
            return
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.errors.append(
            f"{self.path}{line}: {key}: {msg}" if key else f"{self.path}{line}: {msg}"
        )

    def visit(self) -> None:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooManyValues

    def mapping(
        self, node: yaml.Node | None, key: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Keys of a mapping node, rejecting duplicates and unknown keys."""
        self.visit()
        if not isinstance(node, yaml.MappingNode):
            got = f", got {_describe(self.scalar(node))}" if node is not None else ""
            self.error(node, key, f"expected a mapping with keys {', '.join(allowed)}{got}")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        expected = f"expected one of: {', '.join(allowed)}"
        for k, v in node.value:
            name = self.scalar(k)
            if not isinstance(name, str):
                self.error(k, key, f"keys must be strings, got {_describe(name)}{_at(k)}")
            elif name in out:
                first = out[name][0].start_mark.line + 1
                self.error(k, _join(key, name), f"duplicate key (first given on line {first})")
            elif name not in allowed:
                if _shown_key(name, allowed):
                    self.error(k, _join(key, name), f"unknown key; {expected}")
                else:  # see _shown_key
                    self.error(k, key, f"unknown key{_at(k)}; {expected}")
            else:
                out[name] = (k, v)
        return out

    def scalar(self, node: yaml.Node | None) -> object:
        """The value of a scalar node (_UNREADABLE if its type cannot hold it); any other
        node as it is, for the caller's type check to describe."""
        self.visit()
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.constructor.construct_object(node)
            except Exception:  # ConstructorError, ValueError (5,000 digits, 2024-13-45), ...
                return _UNREADABLE
        return node

    def string(self, node: yaml.Node, key: str) -> str | None:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            self.error(node, key, f"expected a non-empty string, got {_describe(value)}")
            return None
        return value

    def integer(
        self, node: yaml.Node, key: str, bounds: tuple[int, int] | None = None
    ) -> int | None:
        value = self.scalar(node)
        want = f"an integer from {bounds[0]} to {bounds[1]}" if bounds else "an integer"
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(node, key, f"expected {want}, got {_describe(value)}")
            return None
        if bounds and not bounds[0] <= value <= bounds[1]:
            self.error(node, key, f"expected {want}, got one outside that range")
            return None
        return value

    def regex(self, node: yaml.Node, key: str) -> Regex | None:
        """An RE2 pattern (linear-time matching); one RE2 cannot express is refused here,
        at its line, saying what it uses (never quoting the pattern) and what to do."""
        value = self.string(node, key)
        if value is None:
            return None
        try:
            return Regex(value)
        except RegexError as e:
            self.error(node, key, str(e))
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
                    n = sub["source"][1]  # unquoted off is YAML 1.1's false: the same
                    kw["access_source"] = (
                        "off" if self.scalar(n) is False
                        else self.choice(n, f"{k}.source", ACCESS_SOURCES)
                    )  # fmt: skip
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
                    kw["ranger_syscall"] = self.integer(
                        sub["syscall"][1], f"{k}.syscall", SYSCALL_RANGE
                    )
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
                kw[name] = self.size(v, k, minimum=64 << 20, maximum=SIM_MEMORY_MAX)
            elif name in ("nodes", "seed"):
                kw[name] = self.integer(v, k, NODES_RANGE if name == "nodes" else SEED_RANGE)
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
        sim = replace(SimulatedSettings(), **{k: x for k, x in kw.items() if x is not None})
        if sim.memory < sim.nodes * (4 << 20):  # a 4 MiB buddy block per node at least
            self.error(node, f"{key}.memory", "must be at least 4MiB per node (nodes)")
        return sim

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
            count = (
                self.integer(keys["count"][1], f"{k}.count", COUNT_RANGE) if "count" in keys else 1
            )
            if comm and heap and thp is not None and count:
                out.append(SimProcessSettings(comm, heap, thp, count))
        return tuple(out)

    def listen(self, node: yaml.Node, key: str) -> tuple[str, int] | str | None:
        """HOST:PORT, or off (or false) for no endpoint. HOST is an IP address (IPv6 in
        brackets) or a name that resolves here: checked now, so that a typo fails
        check-config (exit 2) rather than the daemon's start."""
        value = self.scalar(node)
        if value is False or value is None or value == "off":
            return "off"
        hint = (
            "expected HOST:PORT such as 127.0.0.1:9847 or [::1]:9847 (port 0: any free "
            "port), or off"
        )
        if not isinstance(value, str):
            self.error(node, key, f"{hint}, got {_describe(value)}")
            return None
        host, colon, port = value.rpartition(":")
        if not colon or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            self.error(node, key, f"the port must be a number from 0 to 65535; {hint}")
            return None
        host, problem = _check_host(host, int(port))
        if problem:
            self.error(node, key, f"{problem}; {hint}")
            return None
        return host, int(port)

    def choice(self, node: yaml.Node, key: str, allowed: tuple[str, ...]) -> str | None:
        value = self.scalar(node)
        if not isinstance(value, str) or value not in allowed:
            self.error(node, key, f"expected one of {', '.join(allowed)}, got {_describe(value)}")
            return None
        return value

    def duration(self, node: yaml.Node, key: str, minimum: float = 0) -> float | None:
        value = self.scalar(node)
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]
        except ValueError as e:
            self.error(node, key, _explain(e, value))
            return None
        if seconds < minimum:
            self.error(node, key, f"must be at least {minimum:g}s")
            return None
        return seconds

    def size(
        self, node: yaml.Node, key: str, minimum: int = 0, maximum: int | None = None
    ) -> int | None:
        value = self.scalar(node)
        try:
            n = parse_size(value)  # type: ignore[arg-type]
        except ValueError as e:
            self.error(node, key, _explain(e, value))
            return None
        if n < minimum:
            self.error(node, key, f"must be at least {minimum} bytes")
            return None
        if maximum is not None and n > maximum:
            self.error(node, key, f"must be at most {format_size(maximum)}")
            return None
        return n

    def chunk(self, node: yaml.Node, key: str) -> int | None:
        n = self.size(node, key, minimum=PMD)
        if n is not None and (n % PMD or n > 64 << 20):
            self.error(node, key, "must be a multiple of 2MiB and at most 64MiB")
            return None
        return n

    def number(self, node: yaml.Node, key: str, lo: float, hi: float) -> float | None:
        value = self.scalar(node)
        want = f"expected a number from {lo:g} to {hi:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(node, key, f"{want}, got {_describe(value)}")
            return None
        if not lo <= value <= hi:  # NaN too
            self.error(node, key, f"{want}, got one outside that range")
            return None
        return float(value)

    def fraction(self, node: yaml.Node, key: str) -> float | None:
        """A share in (0, 1]: 0.05 or '5%'."""
        value = self.scalar(node)
        if isinstance(value, str) and value.strip().endswith("%"):
            with contextlib.suppress(ValueError):
                value = float(value.strip()[:-1]) / 100
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            got = (
                "one outside that range"
                if isinstance(value, int | float) and not isinstance(value, bool)
                else _describe(self.scalar(node))
            )
            self.error(node, key, f"expected a share such as 5% or 0.05 (above 0, at most "
                       f"100%), got {got}")  # fmt: skip
            return None
        return float(value)

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        value = self.scalar(node)
        if not isinstance(value, bool):
            self.error(node, key, f"expected true or false, got {_describe(value)}")
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
                self.error(item, f"targets[{i}].name", "duplicate target name (first on "
                           f"line {seen[t.name]})")  # fmt: skip
                continue
            seen[t.name] = item.start_mark.line + 1
            out.append(t)
        return out

    def target(self, node: yaml.Node, key: str) -> Target | None:
        keys = self.mapping(node, key, TARGET_KEYS)
        if keys is None:
            return None
        before = self.problems
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
            min_rss = self.size(keys["min_rss"][1], f"{key}.min_rss") or 0
        mode = "enforce"
        if "mode" in keys:
            mode = self.choice(keys["mode"][1], f"{key}.mode", MODES) or mode
        priority = 0
        if "priority" in keys:
            priority = self.integer(keys["priority"][1], f"{key}.priority", PRIORITY_RANGE) or 0
        overrides = None
        if "overrides" in keys:
            overrides = self.overrides_of(keys["overrides"][1], f"{key}.overrides")
        if self.problems > before or name is None:
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
                    self.error(v, k, "expected an absolute path starting with '/'")
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
            if isinstance(value, int) and not isinstance(value, bool):
                if UID_RANGE[0] <= value <= UID_RANGE[1]:
                    uids.add(value)
                else:
                    self.error(item, key, f"expected a uid from 0 to {UID_RANGE[1]}, got one "
                               f"outside that range{_at(item)}")  # fmt: skip
            elif isinstance(value, str) and value:
                uid = self.uid_of(value)
                if uid is None:
                    self.error(item, key, f"no such user on this machine{_at(item)}; check "
                               "the name, or give the uid")  # fmt: skip
                else:
                    uids.add(uid)
            else:
                self.error(item, key, f"expected a user name or uid, got {_describe(value)}"
                           f"{_at(item)}")  # fmt: skip
        return frozenset(uids)

    def uid_of(self, name: str) -> int | None:
        if name not in self.uids:  # once per name: a long list must not re-read the database
            try:
                self.uids[name] = pwd.getpwnam(name).pw_uid
            except (KeyError, ValueError):
                self.uids[name] = None
        return self.uids[name]

    def pids(self, node: yaml.Node, key: str) -> frozenset[int] | None:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        pids = set()
        lo, hi = PID_RANGE
        for item in items:
            value = self.scalar(item)
            if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
                pids.add(value)
            else:
                got = (
                    "one outside that range"
                    if isinstance(value, int) and not isinstance(value, bool)
                    else _describe(value)
                )
                self.error(item, key, f"expected a pid from {lo} to {hi}, got {got}{_at(item)}")
        return frozenset(pids)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _at(node: yaml.Node) -> str:
    return f" at column {node.start_mark.column + 1}"


def _describe(value: object) -> str:
    """The kind of a value, for "got ..." in an error: never the value itself."""
    if value is _UNREADABLE:
        return "a value its YAML type cannot hold (a bad tag, date or number?)"
    if isinstance(value, yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true or false (YAML reads unquoted yes, no, on and off as those)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, datetime.date):
        return "a date"
    return f"a value of type {type(value).__name__}"


def _explain(e: ValueError, value: object) -> str:
    """A units.parse_* message, with the kind of value when it was not understood at all."""
    return f"{e}, got {_describe(value)}" if str(e).startswith("expected") else str(e)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_host(host: str, port: int) -> tuple[str, str | None]:
    """(host as to bind, None), or (_, what is wrong with it). Never repeats the host."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return host, "the address in brackets is not an IPv6 address"
        return host[1:-1], None
    if ":" in host:
        return host, "an IPv6 address goes in brackets, such as [::1]:9847"
    if not host:
        return host, "the host is missing (0.0.0.0: every IPv4 interface)"
    labels = host.removesuffix(".").split(".")
    if all(label.isascii() and label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return host, "the host is not an IPv4 address (four numbers from 0 to 255)"
        return host, None
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return host, "the host is neither an IP address nor a host name"
    if labels[-1].isdigit():  # a name's last label is never all digits (RFC 3696)
        return host, "the host is not an IPv4 address (four numbers from 0 to 255)"
    problem = _resolve(host, port)
    return host, problem and f"the host name does not resolve here ({problem})"


def _resolve(host: str, port: int) -> str | None:
    """None if `host` resolves, else why not. In a thread given RESOLVE_TIMEOUT: a reload
    must not hang on a slow DNS server (the thread ends when the resolver gives up)."""
    outcome: list[str | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except (OSError, UnicodeError) as e:
            outcome.append(getattr(e, "strerror", None) or type(e).__name__)

    t = threading.Thread(target=lookup, name="memdefragd-resolve", daemon=True)
    t.start()
    t.join(RESOLVE_TIMEOUT)
    return outcome[0] if outcome else f"no answer within {RESOLVE_TIMEOUT:g} s"
