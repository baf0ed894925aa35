"""Parsers for /proc and sysfs text.

Pure functions from text to value types, so they test on recorded files. They tolerate
kernels that lack a field (older smaps has no THPeligible, no Pss_Dirty...).
"""

from __future__ import annotations

import re
import sys
from types import MappingProxyType

from ...model import Pressure, Vma, ZoneFree

_VMA_HEADER = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+(?P<perms>\S{4})\s+(?P<offset>[0-9a-f]+)\s+"
    r"(?P<dev>[0-9a-f]+:[0-9a-f]+)\s+(?P<inode>\d+)(?:[ \t]+(?P<path>.*))?$"
)
_HEX = frozenset("0123456789abcdef")


class ParseError(ValueError):
    """Text from the kernel that we do not understand; names the line."""


def parse_smaps(text: str) -> list[Vma]:
    """Parse /proc/PID/smaps (or maps: then each VMA has no fields)."""
    vmas: list[Vma] = []
    header: re.Match[str] | None = None
    fields: dict[str, int] = {}
    vmflags: frozenset[str] | None = None

    def flush() -> None:
        if header is None:
            return
        vmas.append(
            Vma(
                start=int(header["start"], 16),
                end=int(header["end"], 16),
                perms=header["perms"],
                offset=int(header["offset"], 16),
                dev=header["dev"],
                inode=int(header["inode"]),
                path=header["path"] or "",  # padding is eaten by the regex; keep the rest
                fields=MappingProxyType(dict(fields)),
                vmflags=vmflags,
            )
        )

    for lineno, line in enumerate(text.splitlines(), 1):
        if not line or line.isspace():
            continue
        # Field names start with a capital letter, headers with a hex digit: only headers
        # need the regex (smaps has some twenty field lines per VMA).
        if line[0] in _HEX:
            m = _VMA_HEADER.match(line)
            if m is None:
                raise ParseError(f"smaps line {lineno}: unexpected text {line[:80]!r}")
            flush()
            header, fields, vmflags = m, {}, None
            continue
        key, colon, value = line.partition(":")
        # (str methods, not a regex: this runs for every line of every scan's smaps)
        if not colon or header is None or not (key.isidentifier() and key.isascii()):
            raise ParseError(f"smaps line {lineno}: unexpected text {line[:80]!r}")
        parts = value.split()
        if key == "VmFlags":
            vmflags = frozenset(parts)
            continue
        if not parts:
            continue
        try:
            number = int(parts[0])
        except ValueError:
            continue  # a field we do not use and cannot read as a number
        if len(parts) > 1 and parts[1] == "kB":
            number *= 1024
        fields[sys.intern(key)] = number  # one string per name, not one per VMA kept
    flush()
    return vmas


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_stat(text: str) -> dict[str, int | str]:
    """The fields of /proc/PID/stat that we use. comm may hold spaces and parentheses, and
    (stat prints it unescaped) control characters: those become "?", so that a process
    cannot forge lines in our logs by naming itself. Errors never quote the text."""
    lparen, rparen = text.find("("), text.rfind(")")
    if lparen < 0 or rparen < lparen:
        raise ParseError("stat: no (comm) field")
    rest = text[rparen + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    if len(rest) < 22:
        raise ParseError(f"stat: {len(rest) + 2} fields, expected at least 24")
    return {
        "pid": int(text[:lparen]),
        "comm": _CONTROL.sub("?", text[lparen + 1 : rparen]),
        "state": rest[0],
        "ppid": int(rest[1]),
        "flags": int(rest[6]),
        "minflt": int(rest[7]),
        "majflt": int(rest[9]),
        "start_time": int(rest[19]),
        "vsize": int(rest[20]),
        "rss_pages": int(rest[21]),
    }


PF_EXITING = 0x00000004
PF_KTHREAD = 0x00200000


def parse_status_uid(text: str) -> int:
    """Real UID from /proc/PID/status."""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ParseError("status: no Uid line")


def parse_cgroup(text: str) -> str:
    """The unified (v2) cgroup path, else the systemd v1 hierarchy's, else ''."""
    fallback = ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            return path
        if controllers == "name=systemd" or (not fallback and "memory" in controllers.split(",")):
            fallback = path
    return fallback


def parse_buddyinfo(text: str) -> list[ZoneFree]:
    zones = []
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^Node\s+(\d+),\s+zone\s+(\S+)\s+(.*)$", line)
        if not m:
            if line.strip():
                raise ParseError(f"buddyinfo line {lineno}: unexpected text {line[:80]!r}")
            continue
        try:
            free = tuple(int(x) for x in m[3].split())
        except ValueError as e:
            raise ParseError(f"buddyinfo line {lineno}: bad count in {line[:80]!r}") from e
        zones.append(ZoneFree(int(m[1]), m[2], free))
    return zones


def parse_zoneinfo(text: str) -> list[tuple[int, str, int, int, int, int]]:
    """Populated zones of /proc/zoneinfo: (node, zone, start_pfn, spanned, present,
    managed), in the file's order. Empty zones (spanned 0) print no start_pfn: left out."""
    out = []
    node, zone = -1, ""
    vals: dict[str, int] = {}

    def flush() -> None:
        if zone and vals.get("spanned", 0) > 0 and "start_pfn" in vals:
            out.append((node, zone, vals["start_pfn"], vals["spanned"], vals.get("present", 0),
                        vals.get("managed", 0)))  # fmt: skip

    for line in text.splitlines():
        m = re.match(r"^Node\s+(\d+),\s+zone\s+(\S+)", line)
        if m:
            flush()
            node, zone, vals = int(m[1]), m[2], {}
            continue
        parts = line.replace(":", " ").split()
        if len(parts) == 2 and parts[0] in ("spanned", "present", "managed", "start_pfn"):
            try:
                vals[parts[0]] = int(parts[1])
            except ValueError as e:
                raise ParseError(f"zoneinfo: bad {parts[0]} in zone {zone}") from e
    flush()
    return out


def parse_pagetypeinfo(text: str) -> dict[tuple[int, str, str], tuple[int, ...]]:
    """Free blocks per order per migrate type: {(node, zone, type): counts}.

    Since Linux 5.5 a count above 100000 prints as '>100000'; we read it as 100000, a
    lower bound.
    """
    out: dict[tuple[int, str, str], tuple[int, ...]] = {}
    pat = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+),\s+type\s+(\S+)\s+((?:>?\d+\s*)+)$")
    for line in text.splitlines():
        m = pat.match(line.strip())
        if m:
            out[(int(m[1]), m[2], m[3])] = tuple(int(x.lstrip(">")) for x in m[4].split())
    return out


def parse_vmstat(text: str, prefixes: tuple[str, ...] = ("thp_", "compact_")) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(prefixes):
            out[parts[0]] = int(parts[1])
    return out


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes (kB fields scaled; HugePages_* counts kept as they are)."""
    out = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def parse_pressure(text: str) -> dict[str, Pressure]:
    """/proc/pressure/memory: {'some': Pressure, 'full': Pressure}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        try:
            out[parts[0]] = Pressure(
                float(kv["avg10"]), float(kv["avg60"]), float(kv["avg300"]), int(kv["total"])
            )
        except (KeyError, ValueError) as e:
            raise ParseError(f"pressure: cannot read {line!r}") from e
    return out


def parse_knob(text: str) -> str:
    """A sysfs knob: 'always [madvise] never' gives 'madvise'; a plain value is itself."""
    text = text.strip()
    m = re.search(r"\[([^\]]+)\]", text)
    return m[1] if m else text
