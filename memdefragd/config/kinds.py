"""The kinds of value a setting can hold: how each is read from a YAML node (with its
bounds), written back, and described in the docs.

Every message says what was expected and what kind of value was found ("got a string"),
never the value: the file may not be ours to show (config/load.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import pwd
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from ..model import PMD_SIZE
from ..pipeline.targets import Regex, RegexError
from ..units import format_size, parse_duration, parse_size
from .walk import Invalid, Setting, Walk, at, describe, read_settings, settings_of

MAX_CHUNK = 64 << 20  # the scheduler's limit too (pipeline/plan/scheduler.py checks it)
RESOLVE_TIMEOUT = 1.0  # seconds for a metrics.listen host name to resolve (reload waits)
UID_MAX = (1 << 32) - 2  # (uid_t) -1 means "no user"
PID_MAX = 1 << 22  # PID_MAX_LIMIT


_PLAIN = re.compile(r"[A-Za-z0-9_./-]+")  # may be written unquoted (if YAML reads it back)


def _explain(e: ValueError, value: object) -> str:
    """A units.parse_* message, with the kind of value when it was not understood at all."""
    return f"{e}, got {describe(value)}" if str(e).startswith("expected") else str(e)


def _show_size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


# ------------------------------------------------------------------------------ scalars


@dataclass(frozen=True)
class Text:
    """A non-empty string."""

    what: str = "a string"

    def read(self, walk: Walk, node: yaml.Node, key: str) -> str:
        value = walk.scalar(node)
        if not isinstance(value, str) or not value:
            raise walk.fail(node, key, f"expected a non-empty string, got {describe(value)}")
        return value

    def show(self, value: str) -> str:
        if _PLAIN.fullmatch(value):
            with contextlib.suppress(yaml.YAMLError):
                if yaml.safe_load(value) == value:  # not a number, true, null...
                    return value
        return json.dumps(value)  # a double-quoted YAML string

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class AbsolutePath(Text):
    what: str = "an absolute path"

    def read(self, walk: Walk, node: yaml.Node, key: str) -> str:
        value = super().read(walk, node, key)
        if not value.startswith("/"):
            raise walk.fail(node, key, "expected an absolute path starting with '/'")
        return value


@dataclass(frozen=True)
class Pattern:
    """An RE2 pattern (linear-time matching); one RE2 cannot express is refused at its
    line, saying what it uses (never quoting the pattern) and what to do."""

    def read(self, walk: Walk, node: yaml.Node, key: str) -> Regex:
        try:
            return Regex(Text().read(walk, node, key))
        except RegexError as e:
            raise walk.fail(node, key, str(e)) from None

    def show(self, value: Regex) -> str:
        return str(getattr(value, "pattern", value))

    def describe(self) -> str:
        return "a regular expression (RE2)"


@dataclass(frozen=True)
class Integer:
    lo: int
    hi: int

    def read(self, walk: Walk, node: yaml.Node, key: str) -> int:
        value = walk.scalar(node)
        want = f"an integer from {self.lo} to {self.hi}"
        if not isinstance(value, int) or isinstance(value, bool):
            raise walk.fail(node, key, f"expected {want}, got {describe(value)}")
        if not self.lo <= value <= self.hi:
            raise walk.fail(node, key, f"expected {want}, got one outside that range")
        return value

    def show(self, value: int) -> str:
        return str(value)

    def describe(self) -> str:
        return f"an integer from {self.lo} to {self.hi}"


@dataclass(frozen=True)
class Number:
    lo: float
    hi: float

    def read(self, walk: Walk, node: yaml.Node, key: str) -> float:
        value = walk.scalar(node)
        want = f"expected a number from {self.lo:g} to {self.hi:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise walk.fail(node, key, f"{want}, got {describe(value)}")
        if not self.lo <= value <= self.hi:  # NaN too
            raise walk.fail(node, key, f"{want}, got one outside that range")
        return float(value)

    def show(self, value: float) -> str:
        return f"{value:g}"

    def describe(self) -> str:
        return f"a number from {self.lo:g} to {self.hi:g}"


@dataclass(frozen=True)
class Share:
    """A share in (0, 1]: 0.05 or '5%'."""

    def read(self, walk: Walk, node: yaml.Node, key: str) -> float:
        value = walk.scalar(node)
        if isinstance(value, str) and value.strip().endswith("%"):
            with contextlib.suppress(ValueError):
                value = float(value.strip()[:-1]) / 100
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            got = (
                "one outside that range"
                if isinstance(value, int | float) and not isinstance(value, bool)
                else describe(walk.scalar(node))
            )
            raise walk.fail(node, key, f"expected a share such as 5% or 0.05 (above 0, at "
                            f"most 100%), got {got}")  # fmt: skip
        return float(value)

    def show(self, value: float) -> str:
        return f"{value * 100:g}%"

    def describe(self) -> str:
        return "a share above 0, at most 100% (5% or 0.05)"


@dataclass(frozen=True)
class Flag:
    def read(self, walk: Walk, node: yaml.Node, key: str) -> bool:
        value = walk.scalar(node)
        if not isinstance(value, bool):
            raise walk.fail(node, key, f"expected true or false, got {describe(value)}")
        return value

    def show(self, value: bool) -> str:
        return "true" if value else "false"

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Choice:
    """One of an enum's values (model.py). `false`: the member an unquoted off, no or false
    means (YAML 1.1 reads those as false)."""

    enum: type[StrEnum]
    false: StrEnum | None = None

    def read(self, walk: Walk, node: yaml.Node, key: str) -> StrEnum:
        value = walk.scalar(node)
        if value is False and self.false is not None:
            return self.false
        names = [m.value for m in self.enum]
        if not isinstance(value, str) or value not in names:
            raise walk.fail(node, key, f"expected one of {', '.join(names)}, got {describe(value)}")
        return self.enum(value)

    def show(self, value: StrEnum) -> str:
        return str(value)

    def describe(self) -> str:
        return "one of " + ", ".join(m.value for m in self.enum)


@dataclass(frozen=True)
class Duration:
    minimum: float = 0

    def read(self, walk: Walk, node: yaml.Node, key: str) -> float:
        value = walk.scalar(node)
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]
        except ValueError as e:
            raise walk.fail(node, key, _explain(e, value)) from None
        if seconds < self.minimum:
            raise walk.fail(node, key, f"must be at least {self.minimum:g}s")
        return seconds

    def show(self, value: float) -> str:
        if not value:
            return "0s"
        for unit, scale in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            if value % scale == 0:
                return f"{value / scale:g}{unit}"
        return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"

    def describe(self) -> str:
        least = f", at least {self.show(self.minimum)}" if self.minimum else ""
        return f"a duration (500ms, 30s, 5m, 1h){least}"


@dataclass(frozen=True)
class Size:
    minimum: int = 0
    maximum: int | None = None

    def read(self, walk: Walk, node: yaml.Node, key: str) -> int:
        value = walk.scalar(node)
        try:
            n = parse_size(value)  # type: ignore[arg-type]
        except ValueError as e:
            raise walk.fail(node, key, _explain(e, value)) from None
        if n < self.minimum:
            raise walk.fail(node, key, f"must be at least {self.minimum} bytes")
        if self.maximum is not None and n > self.maximum:
            raise walk.fail(node, key, f"must be at most {format_size(self.maximum)}")
        return n

    def show(self, value: int) -> str:
        return _show_size(value)

    def describe(self) -> str:
        lo, hi = _show_size(self.minimum), self.maximum and _show_size(self.maximum)
        if hi:
            return f"a size (4096, 512K, 256MiB, 1G) from {lo} to {hi}"
        return "a size (4096, 512K, 256MiB, 1G)" + (f", at least {lo}" if self.minimum else "")


@dataclass(frozen=True)
class Chunk(Size):
    """A request's size: whole 2 MiB regions, at most 64 MiB."""

    minimum: int = PMD_SIZE
    maximum: int | None = MAX_CHUNK

    def read(self, walk: Walk, node: yaml.Node, key: str) -> int:
        n = Size(self.minimum).read(walk, node, key)
        if n % PMD_SIZE or n > MAX_CHUNK:
            raise walk.fail(node, key, "must be a multiple of 2MiB and at most 64MiB")
        return n

    def describe(self) -> str:
        return "a size: a multiple of 2MiB, at most 64MiB"


@dataclass(frozen=True)
class Nullable:
    """`kind`, or null (None)."""

    kind: Any

    def read(self, walk: Walk, node: yaml.Node, key: str) -> Any:
        return None if walk.scalar(node) is None else self.kind.read(walk, node, key)

    def show(self, value: Any) -> str:
        return "null" if value is None else str(self.kind.show(value))

    def describe(self) -> str:
        return f"{self.kind.describe()}, or null"


# ------------------------------------------------------------------------------ listen


@dataclass(frozen=True)
class Listen:
    """HOST:PORT, or off (or false) for no endpoint (None). HOST is an IP address (IPv6 in
    brackets) or a name that resolves here: checked now, so that a typo fails check-config
    (exit 2) rather than the daemon's start."""

    def read(self, walk: Walk, node: yaml.Node, key: str) -> tuple[str, int] | None:
        value = walk.scalar(node)
        if value is False or value is None or value == "off":
            return None
        hint = (
            "expected HOST:PORT such as 127.0.0.1:9847 or [::1]:9847 (port 0: any free "
            "port), or off"
        )
        if not isinstance(value, str):
            raise walk.fail(node, key, f"{hint}, got {describe(value)}")
        host, colon, port = value.rpartition(":")
        if not colon or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            raise walk.fail(node, key, f"the port must be a number from 0 to 65535; {hint}")
        host, problem = _check_host(host, int(port))
        if problem:
            raise walk.fail(node, key, f"{problem}; {hint}")
        return host, int(port)

    def show(self, value: tuple[str, int] | None) -> str:
        if value is None:
            return "off"
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def describe(self) -> str:
        return "HOST:PORT ([::1]:9847 for IPv6; port 0: any free port), or off"


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


# ------------------------------------------------------------------------------ lists


def _items(node: yaml.Node) -> list[yaml.Node]:
    return node.value if isinstance(node, yaml.SequenceNode) else [node]


@dataclass(frozen=True)
class Users:
    """User names or uids, one or a list; a name must exist on this machine."""

    def read(self, walk: Walk, node: yaml.Node, key: str) -> frozenset[int]:
        before, uids = walk.problems, set()
        for item in _items(node):
            value = walk.scalar(item)
            if isinstance(value, int) and not isinstance(value, bool):
                if 0 <= value <= UID_MAX:
                    uids.add(value)
                else:
                    walk.error(item, key, f"expected a uid from 0 to {UID_MAX}, got one "
                               f"outside that range{at(item)}")  # fmt: skip
            elif isinstance(value, str) and value:
                uid = _uid_of(walk, value)
                if uid is None:
                    walk.error(item, key, f"no such user on this machine{at(item)}; check "
                               "the name, or give the uid")  # fmt: skip
                else:
                    uids.add(uid)
            else:
                walk.error(item, key, f"expected a user name or uid, got {describe(value)}"
                           f"{at(item)}")  # fmt: skip
        if walk.problems > before:
            raise Invalid
        return frozenset(uids)

    def show(self, value: frozenset[int]) -> str:
        return "[" + ", ".join(map(str, sorted(value))) + "]"

    def describe(self) -> str:
        return "a user name or uid, or a list of them"


def _uid_of(walk: Walk, name: str) -> int | None:
    if name not in walk.uids:  # once per name: a long list must not re-read the database
        try:
            walk.uids[name] = pwd.getpwnam(name).pw_uid
        except (KeyError, ValueError):
            walk.uids[name] = None
    return walk.uids[name]


@dataclass(frozen=True)
class Pids:
    def read(self, walk: Walk, node: yaml.Node, key: str) -> frozenset[int]:
        before, pids = walk.problems, set()
        for item in _items(node):
            value = walk.scalar(item)
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= PID_MAX:
                pids.add(value)
            else:
                got = (
                    "one outside that range"
                    if isinstance(value, int) and not isinstance(value, bool)
                    else describe(value)
                )
                walk.error(item, key, f"expected a pid from 1 to {PID_MAX}, got {got}{at(item)}")
        if walk.problems > before:
            raise Invalid
        return frozenset(pids)

    def show(self, value: frozenset[int]) -> str:
        return "[" + ", ".join(map(str, sorted(value))) + "]"

    def describe(self) -> str:
        return f"a pid (1 to {PID_MAX}), or a list of them"


# ------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class Section:
    """A mapping read into `cls` by its declared settings (settings_of(cls) unless given).
    A section class may say what is wrong with a combination of values in `problems()`,
    (key, message) pairs reported at the section's line."""

    cls: Callable[..., Any]
    declared: tuple[Setting, ...] | None = None
    whole: bool = False  # required keys missing: one error for the record (read_settings)

    @property
    def settings(self) -> tuple[Setting, ...]:
        return self.declared if self.declared is not None else settings_of(self.cls)

    def read(self, walk: Walk, node: yaml.Node, key: str) -> Any:
        value = self.cls(**read_settings(walk, node, key, self.settings, whole=self.whole))
        problems = getattr(value, "problems", None)
        if problems is not None:
            before = walk.problems
            for where, msg in problems():
                walk.error(node, f"{key}.{where}" if where else key, msg)
            if walk.problems > before:
                raise Invalid
        return value

    def show(self, value: Any) -> str:
        """A flow mapping of every setting (dotted keys as nested mappings)."""
        tree: dict[str, Any] = {}
        for s in self.settings:
            if isinstance(value, Mapping) and s.name not in value:
                continue  # a record of given values only (a target's overrides)
            *groups, leaf = s.key.split(".")
            level = tree
            for g in groups:
                level = level.setdefault(g, {})
            got = value[s.name] if isinstance(value, Mapping) else getattr(value, s.name)
            level[leaf] = s.kind.show(got)
        return _flow(tree)

    def describe(self) -> str:
        return "a mapping (see its section)"


def _flow(tree: dict[str, Any]) -> str:
    return "{" + ", ".join(
        f"{k}: {_flow(v) if isinstance(v, dict) else v}" for k, v in tree.items()
    ) + "}"  # fmt: skip


@dataclass(frozen=True)
class Records:
    """A list of `item` (a Section), each read on its own: one that is refused is left
    out, and the others are still read. `what` describes the list in its error."""

    item: Section
    what: str
    non_empty: bool = False

    def read(self, walk: Walk, node: yaml.Node, key: str) -> tuple[Any, ...]:
        if not isinstance(node, yaml.SequenceNode) or (self.non_empty and not node.value):
            raise walk.fail(node, key, f"expected {self.what}")
        before, out = walk.problems, []
        for i, item in enumerate(node.value):
            with contextlib.suppress(Invalid):
                out.append(self.item.read(walk, item, f"{key}[{i}]"))
        if walk.problems > before:
            raise Invalid
        return tuple(out)

    def show(self, value: tuple[Any, ...]) -> str:
        return "[" + ", ".join(self.item.show(v) for v in value) + "]"

    def describe(self) -> str:
        return "a list of mappings (see its section)"


@dataclass(frozen=True)
class OneOrMany:
    """One `item`, or a list of them (keys name the list's items: `exclude[1].comm`)."""

    item: Section

    def read(self, walk: Walk, node: yaml.Node, key: str) -> tuple[Any, ...]:
        if not isinstance(node, yaml.SequenceNode):
            return (self.item.read(walk, node, key),)
        return Records(self.item, "").read(walk, node, key)

    def show(self, value: tuple[Any, ...]) -> str:
        return "[" + ", ".join(self.item.show(v) for v in value) + "]"

    def describe(self) -> str:
        return "a mapping, or a list of them (see its section)"
