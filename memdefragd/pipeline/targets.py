"""Which processes a target names: pure predicates over ProcessInfo.

What a process's owner controls (its name, its command line, its executable's path) is
hostile input to a root daemon, so matching is linear in time and bounded in size: regexes
are compiled by RE2 (`Regex`), which has no backtracking, and a `cmdline` pattern sees only
the first MAX_CMDLINE bytes of the command line. The process name is at most 15 bytes (the
kernel's TASK_COMM_LEN) and an executable's path at most PATH_MAX; `exe` globs go through
fnmatch, whose translation (atomic groups since Python 3.11) cannot backtrack either.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import re2

from ..model import Mode, ProcessInfo

# How much of a command line `cmdline` patterns see: its first 4096 bytes (the arguments
# joined by spaces), as `pgrep -f` (procps' CMDSTRSIZE). The kernel backend reads no more
# of /proc/PID/cmdline than this; a process can make its command line megabytes long.
MAX_CMDLINE = 4096


class Pattern(Protocol):
    """What Matcher needs of a compiled pattern (`Regex`; `re.Pattern` also fits)."""

    def search(self, text: str, /) -> Any: ...


class RegexError(ValueError):
    """A pattern RE2 will not compile. The message says what is wrong and what to do, and
    never quotes the pattern (nor any part of it)."""


_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print the pattern on stderr, and to the journal

# Python `re` constructs RE2 refuses, by how its "invalid perl operator" message goes on.
_PERL_OPERATORS = (
    ("(?=", "a lookahead, (?=...)"),
    ("(?!", "a negative lookahead, (?!...)"),
    ("(?<=", "a lookbehind, (?<=...)"),
    ("(?<!", "a negative lookbehind, (?<!...)"),
    ("(?>", "an atomic group, (?>...)"),
    ("(?P", "a named backreference, (?P=name)"),  # (?P<name>...) is fine
    ("(?(", "a conditional group, (?(...)...)"),
    ("(?#", "a comment group, (?#...)"),
)
_REWRITE = "rewrite the pattern without it"
_EXCLUDE = "rewrite the pattern without it and leave those processes out with an exclude:"


class Regex:
    """A regular expression compiled by RE2: searching takes time linear in the text,
    whatever the pattern. RE2's syntax is Python's without backreferences, lookarounds,
    atomic groups, possessive quantifiers or ``\\Z`` (it has ``\\z``); `$` matches only at
    the end of the text. Text that is not UTF-8 (bytes kept as surrogate escapes) is seen
    with '?' in place of each such byte. Equal when the pattern text is equal.
    """

    __slots__ = ("_re", "pattern")

    def __init__(self, pattern: str):
        self.pattern = pattern
        try:
            self._re = re2.compile(pattern.encode("utf-8"), _OPTIONS)
        except UnicodeEncodeError:
            raise RegexError("bad regular expression: it is not valid UTF-8") from None
        except re2.error as e:
            raise RegexError(_explain(e)) from None

    def search(self, text: str, /) -> Any:
        """A match object if the pattern occurs anywhere in `text`, else None."""
        return self._re.search(text.encode("utf-8", "replace"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Regex) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


def _explain(e: Exception) -> str:
    """RE2's complaint, told without the piece of the pattern that RE2 quotes."""
    raw = e.args[0] if e.args else b""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    code, _, arg = text.partition(": ")  # e.g. "invalid perl operator", "(?="
    what, todo = None, _REWRITE
    if code == "invalid escape sequence":
        if arg[1:2].isdigit():
            what = "a backreference (\\1 ... \\9)"
        elif arg == "\\Z":
            what, todo = "\\Z", "write \\z for the end of the text"
        else:
            what = "an escape sequence"
    elif code == "invalid perl operator":
        what = next(
            (w for prefix, w in _PERL_OPERATORS if arg.startswith(prefix)),
            "a (?...) group or flag (RE2's flags are i, m, s and U)",
        )
        if arg.startswith(("(?!", "(?<!")):
            todo = _EXCLUDE
    elif code == "bad repetition operator":
        what = "a possessive quantifier (*+, ++ or ?+)"
    elif code == "invalid repetition size":
        what, todo = "a repetition count over 1000", "use a smaller count, or + or *"
    if what is not None:
        return (
            f"unsupported regular expression: it uses {what}, which RE2 (the linear-time "
            f"engine memdefragd matches with) does not have; {todo}"
        )
    if code.startswith("pattern too large"):
        return "bad regular expression: too large for RE2 (over 8 MiB compiled); simplify it"
    return f"bad regular expression: {code}"


def cmdline_text(cmdline: Sequence[str]) -> str:
    """What a `cmdline` pattern sees: the arguments joined by spaces, cut at MAX_CMDLINE."""
    return " ".join(cmdline)[:MAX_CMDLINE]


@dataclass(frozen=True, slots=True)
class Matcher:
    """Every criterion given must hold; an empty matcher matches every process.

    Regexes (`Regex`: RE2, linear time) are searched anywhere in the text (anchor them with
    ^ and $); `cmdline` is matched against the arguments joined by spaces, of which a
    pattern sees only the first MAX_CMDLINE (4096) bytes: on a longer command line, what
    comes after is never seen and `$` anchors at the cut, not at the real end. `exe` is a
    path or a glob; `cgroup` matches that cgroup and everything below it; `unit` matches a
    systemd unit anywhere in the cgroup path (``redis.service`` matches
    ``/system.slice/redis.service``).
    """

    comm: Pattern | None = None
    cmdline: Pattern | None = None
    exe: str | None = None
    uids: frozenset[int] | None = None
    cgroup: str | None = None
    unit: str | None = None
    pids: frozenset[int] | None = None

    def matches(self, p: ProcessInfo) -> bool:
        if self.pids is not None and p.pid not in self.pids:
            return False
        if self.comm is not None and not self.comm.search(p.comm):
            return False
        if self.cmdline is not None and not self.cmdline.search(cmdline_text(p.cmdline)):
            return False
        if self.exe is not None:
            exe = (p.exe or "").removesuffix(" (deleted)")
            if not exe or not fnmatch.fnmatchcase(exe, self.exe):
                return False
        if self.uids is not None and p.uid not in self.uids:
            return False
        if self.cgroup is not None and not in_cgroup(p.cgroup, self.cgroup):
            return False
        return self.unit is None or self.unit in p.cgroup.split("/")


def in_cgroup(path: str, ancestor: str) -> bool:
    ancestor = "/" + ancestor.strip("/")
    return ancestor == "/" or path == ancestor or path.startswith(ancestor + "/")


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    match: Matcher = Matcher()
    exclude: tuple[Matcher, ...] = ()
    min_rss: int = 0
    mode: str = Mode.ENFORCE  # or OBSERVE: measure and export, never move memory
    priority: int = 0

    def matches(self, p: ProcessInfo) -> bool:
        return (
            p.rss >= self.min_rss
            and self.match.matches(p)
            and not any(x.matches(p) for x in self.exclude)
        )


def select(
    procs: Iterable[ProcessInfo],
    targets: Sequence[Target],
    should_stop: Callable[[], bool] | None = None,
) -> list[tuple[ProcessInfo, Target]]:
    """Each process with the first target (in config order) that claims it. With
    `should_stop`, stops between processes once it returns true: the list is then partial
    (callers check should_stop() again afterwards)."""
    out = []
    for p in procs:
        if should_stop is not None and should_stop():
            break
        for t in targets:
            if t.matches(p):
                out.append((p, t))
                break
    return out
