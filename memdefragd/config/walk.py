"""How a setting is declared, and the walk that reads a YAML tree by the declarations.

A `Setting` says once where a value sits in the file, which `Kind` of value it is (the
parser, with its bounds), its default and what it is for. Sections are frozen dataclasses
whose fields are declared with `setting()`, or tuples of `Setting`s naming the fields of a
class declared elsewhere (targets). `read_settings` walks a mapping node by such a
declaration: keys it does not know and keys given twice are refused, and every problem is
recorded with file:line:key, never quoting the file (a `Walk` keeps them, the first
MAX_ERRORS in full). The same declarations drive the per-target overrides, the scheduler's
settings (config/plan.py), the simulated machine's command-line options and
docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, TypeVar, dataclass_transform, overload

import yaml

MAX_ERRORS = 20  # reported in full; the rest are counted, so a hostile file can't flood
# Scalars and mappings the walk may visit. An alias-free file within the size limit has at
# most ~500,000; YAML aliases can repeat a subtree without limit ("billion laughs").
MAX_VALUES = 1_000_000

T = TypeVar("T")


class TooManyValues(Exception):
    pass


class Invalid(Exception):
    """A value was refused, its error already recorded: the setting (and the section that
    holds it) keeps no value."""


class Kind(Protocol):
    """A kind of value: how a node is read (and bounded), shown and described."""

    def read(self, walk: Walk, node: yaml.Node, key: str) -> Any:
        """The value, or raise walk.fail(...) (Invalid) saying what is wrong."""

    def show(self, value: Any) -> str:
        """`value` as it is written in YAML (reading it back gives `value`)."""

    def describe(self) -> str:
        """What a value looks like, with its bounds, for the docs."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a setting that must be given


@dataclasses.dataclass(frozen=True)
class Plan:
    """The field of the plan stage's SchedulerSettings a setting feeds, and (for settings
    a target may override) the field holding its value per target. `value` derives the
    scheduler's value from all the settings where it is not the setting's own."""

    field: str
    by_target: str = ""
    value: Any = None  # Callable[[DaemonSettings], object] | None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting, declared once."""

    kind: Kind
    help: str
    key: str = ""  # its path in the section's YAML ("budget.cpu_share"); default: name
    name: str = ""  # the field it fills
    default: Any = REQUIRED
    required: str = ""  # when it has no default: why it must be given
    per_target: bool = False  # a target's `overrides:` may replace it
    plan: Plan | None = None

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name)

    def named(self, name: str, default: Any) -> Setting:
        """This setting filling field `name`, whose default (or MISSING) is `default`."""
        if default is dataclasses.MISSING:
            default = REQUIRED
        return dataclasses.replace(self, name=name, key=self.key or name, default=default)


@overload
def setting(
    kind: Kind, help: str, *, default: T, key: str = ..., per_target: bool = ...,
    plan: Plan | None = ...,
) -> T: ...  # fmt: skip
@overload
def setting(kind: Kind, help: str, *, required: str, key: str = ...) -> Any: ...
def setting(kind: Kind, help: str, **kw: Any) -> Any:
    """A section's field, declared as a Setting (the field's default is the setting's)."""
    default = kw.pop("default", dataclasses.MISSING)
    return dataclasses.field(default=default, metadata={"setting": Setting(kind, help, **kw)})


@dataclass_transform(frozen_default=True, field_specifiers=(setting,))
def section(cls: type[T]) -> type[T]:
    """A frozen dataclass whose fields are declared with setting(). Not slotted, so that
    a subclass may restate defaults and add fields (backends/sim/aging.Scenario)."""
    return dataclasses.dataclass(frozen=True)(cls)


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The settings a section class declares, in field order, each naming its field."""
    out = []
    for f in dataclasses.fields(cls):
        s = f.metadata.get("setting")
        if s is not None:
            assert s.required or f.default is not dataclasses.MISSING, f.name
            out.append(s.named(f.name, f.default))
    return tuple(out)


def declared(cls: type, *settings: Setting) -> tuple[Setting, ...]:
    """Settings naming the fields of `cls` (a class that is not ours to annotate), each
    with the field's default: the class declares the default, the Setting the rest."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return tuple(s.named(s.name, defaults[s.name]) for s in settings)


def sections(
    settings: tuple[Setting, ...], path: str = ""
) -> Iterator[tuple[str, tuple[Setting, ...]]]:
    """Every section of a declaration with its YAML path ("daemon", "targets[].match"),
    depth first: the kinds that hold settings (`settings`), and lists of them (`item`)."""
    yield path, settings
    for s in settings:
        kind, full = s.kind, join(path, s.key)
        while getattr(kind, "item", None) is not None:
            kind, full = kind.item, full + "[]"  # type: ignore[attr-defined]
        nested = getattr(kind, "settings", None)
        if nested is not None:
            yield from sections(nested, full)


def every_setting(settings: tuple[Setting, ...]) -> Iterator[tuple[str, Setting]]:
    """Every setting of a declaration, with its full YAML path ("targets[].match.comm")."""
    for path, section in sections(settings):
        for s in section:
            yield join(path, s.key), s


# ------------------------------------------------------------------------------ the walk

UNREADABLE = object()  # a scalar its YAML type cannot hold: `!!int x`, 5,000 digits, `!tag`
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,31}")


class Walk:
    """One reading of one file: the problems found so far, and the guards against a file
    that would make the reading itself costly."""

    def __init__(self, path: str):
        self.path = path
        self.errors: list[str] = []  # the first MAX_ERRORS
        self.problems = 0  # all errors found, kept or not
        self.last = ""  # the last problem, without file, line or key
        self.values = 0  # nodes visited: at most MAX_VALUES
        # One per load: it caches every node it builds (aliases hit the cache), and a
        # module-wide one would keep every config ever loaded alive.
        self.constructor = yaml.constructor.SafeConstructor()
        self.uids: dict[str, int | None] = {}  # user names looked up, once per name

    def error(self, node: yaml.Node | None, key: str, msg: str) -> None:
        self.problems += 1
        self.last = msg
        if len(self.errors) >= MAX_ERRORS:
            return
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.errors.append(
            f"{self.path}{line}: {key}: {msg}" if key else f"{self.path}{line}: {msg}"
        )

    def fail(self, node: yaml.Node | None, key: str, msg: str) -> Invalid:
        """Record an error, and return the exception for the caller to raise."""
        self.error(node, key, msg)
        return Invalid()

    def visit(self) -> None:
        self.values += 1
        if self.values > MAX_VALUES:
            raise TooManyValues

    def mapping(
        self, node: yaml.Node | None, key: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Keys of a mapping node, rejecting duplicates and unknown keys."""
        self.visit()
        if not isinstance(node, yaml.MappingNode):
            got = f", got {describe(self.scalar(node))}" if node is not None else ""
            self.error(node, key, f"expected a mapping with keys {', '.join(allowed)}{got}")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        expected = f"expected one of: {', '.join(allowed)}"
        for k, v in node.value:
            name = self.scalar(k)
            if not isinstance(name, str):
                self.error(k, key, f"keys must be strings, got {describe(name)}{at(k)}")
            elif name in out:
                first = out[name][0].start_mark.line + 1
                self.error(k, join(key, name), f"duplicate key (first given on line {first})")
            elif name not in allowed:
                if _shown_key(name, allowed):
                    self.error(k, join(key, name), f"unknown key; {expected}")
                else:  # see _shown_key
                    self.error(k, key, f"unknown key{at(k)}; {expected}")
            else:
                out[name] = (k, v)
        return out

    def scalar(self, node: yaml.Node | None) -> object:
        """The value of a scalar node (UNREADABLE if its type cannot hold it); any other
        node as it is, for the caller's type check to describe."""
        self.visit()
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.constructor.construct_object(node)
            except Exception:  # ConstructorError, ValueError (5,000 digits, 2024-13-45), ...
                return UNREADABLE
        return node


def read_settings(
    walk: Walk, node: yaml.Node, key: str, settings: tuple[Setting, ...], *, whole: bool = False
) -> dict[str, Any]:
    """The values a mapping node gives, by field name (absent keys are left out: the
    section's defaults apply). A dotted key ("budget.cpu_share") is a key of a nested
    mapping. A required setting that is missing is an error of its own ("name: missing;
    ..."), or with `whole`, one error naming all that are required ("needs comm (process
    name) and heap (size)"), and the record is not read further.
    Raises Invalid, once every key has been read, if anything in it was refused."""
    before = walk.problems
    tree = _tree(settings)
    given = walk.mapping(node, key, tuple(tree))
    if given is None:
        raise Invalid
    missing = [s for s in settings if s.required and s.key not in given]
    if missing and whole:
        needs = " and ".join(f"{s.key} ({s.required})" for s in settings if s.required)
        raise walk.fail(node, key, f"needs {needs}")
    for s in missing:
        walk.error(node, join(key, s.key), f"missing; {s.required}")
    values: dict[str, Any] = {}
    _read_level(walk, given, key, tree, values)
    if walk.problems > before:
        raise Invalid
    return values


_Tree = dict[str, "Setting | _Tree"]


def _tree(settings: tuple[Setting, ...]) -> _Tree:
    tree: _Tree = {}
    for s in settings:
        *groups, leaf = s.key.split(".")
        level = tree
        for g in groups:
            sub = level.setdefault(g, {})
            assert isinstance(sub, dict), s.key
            level = sub
        level[leaf] = s
    return tree


def _read_level(
    walk: Walk,
    given: Mapping[str, tuple[yaml.Node, yaml.Node]],
    key: str,
    tree: _Tree,
    values: dict[str, Any],
) -> None:
    for name, (_, node) in given.items():
        k, declared = join(key, name), tree[name]
        if isinstance(declared, dict):
            sub = walk.mapping(node, k, tuple(declared))
            if sub is not None:
                _read_level(walk, sub, k, declared, values)
            continue
        with contextlib.suppress(Invalid):
            values[declared.name] = declared.kind.read(walk, node, k)


def read_text(kind: Kind, text: str) -> Any:
    """A value given outside a file (a command-line option), read as the file reads it:
    the same syntax, bounds and messages. Raises ValueError saying what is wrong."""
    walk = Walk("")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        raise ValueError("expected a plain value") from None
    if node is None:  # an empty text: null, as an empty value in a file
        node = yaml.ScalarNode("tag:yaml.org,2002:null", "")
    try:
        return kind.read(walk, node, "")
    except Invalid:
        raise ValueError(walk.last) from None


def check(setting: Setting, value: Any) -> str | None:
    """What is wrong with `value` for `setting` (None: nothing). It is written as a file
    would hold it and read back by its kind, so a value made in code meets the same bounds
    as one from a file, with the same message."""
    try:
        read_text(setting.kind, setting.kind.show(value))
    except ValueError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------ messages


def join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def at(node: yaml.Node) -> str:
    return f" at column {node.start_mark.column + 1}"


def describe(value: object) -> str:
    """The kind of a value, for "got ..." in an error: never the value itself."""
    if value is UNREADABLE:
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
