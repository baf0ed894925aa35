"""The YAML configuration: strict loading with errors that point at file:line.

PyYAML silently keeps the last of duplicate keys and knows nothing of our schema, so we
validate the composed node tree ourselves: every message names the file, the line, the
key path and what to do, and all problems are reported at once.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from .targets import Matcher, Target
from .units import parse_size

DEFAULT_PATH = "/etc/memdefragd/memdefragd.yaml"
MODES = ("enforce", "observe")
MATCH_KEYS = ("comm", "cmdline", "exe", "user", "cgroup", "unit", "pid")
TARGET_KEYS = ("name", "match", "exclude", "min_rss", "mode", "priority")
TOP_KEYS = ("targets",)


class ConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    targets: tuple[Target, ...]


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
    return cfg


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
        if keys is not None:
            if "targets" not in keys:
                self.error(root, "targets", "missing; list the processes to watch")
            else:
                targets = self.targets(keys["targets"][1])
        return Config(self.path, tuple(targets))

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
        if len(self.errors) > before or name is None:
            return None
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
