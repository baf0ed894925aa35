"""Which processes a target names: pure predicates over ProcessInfo."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .model import ProcessInfo


@dataclass(frozen=True, slots=True)
class Matcher:
    """Every criterion given must hold; an empty matcher matches every process.

    Regexes are searched anywhere in the text (anchor them with ^ and $); `cmdline` is
    matched against the arguments joined by spaces; `exe` is a path or a glob; `cgroup`
    matches that cgroup and everything below it; `unit` matches a systemd unit anywhere in
    the cgroup path (``redis.service`` matches ``/system.slice/redis.service``).
    """

    comm: re.Pattern[str] | None = None
    cmdline: re.Pattern[str] | None = None
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
        if self.cmdline is not None and not self.cmdline.search(" ".join(p.cmdline)):
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
    mode: str = "enforce"  # or "observe": measure and export, never move memory
    priority: int = 0

    def matches(self, p: ProcessInfo) -> bool:
        return (
            p.rss >= self.min_rss
            and self.match.matches(p)
            and not any(x.matches(p) for x in self.exclude)
        )


def select(
    procs: Iterable[ProcessInfo], targets: Sequence[Target]
) -> list[tuple[ProcessInfo, Target]]:
    """Each process with the first target (in config order) that claims it."""
    out = []
    for p in procs:
        for t in targets:
            if t.matches(p):
                out.append((p, t))
                break
    return out
