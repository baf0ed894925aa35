"""Sizes as people write them ("256MiB", "1G", "4096") and as we print them."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([a-zA-Z]{0,3})\s*$")
# No memory, file or budget this program deals in comes near 1 EiB; a larger figure is a
# typo (or 30 digits pasted by mistake), refused rather than carried into arithmetic.
MAX_SIZE = 1 << 60
MAX_DURATION = 365 * 86400.0  # one year: any longer wait or interval is a mistake


def parse_size(value: str | int | float) -> int:
    """Bytes from an integer or a string with a binary unit (K, M, G, T; KiB == KB == K),
    from 0 to MAX_SIZE (1 EiB).

    Messages never repeat the value: it may come from a file that is not ours to show (the
    caller says where it was and what type it had)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 256MiB")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("expected a size such as 256MiB, not infinity or NaN")
        n = int(value)
    else:
        m = _SIZE.match(value) if isinstance(value, str) else None
        if not m or m[2].lower() not in _UNITS:
            raise ValueError("expected a size such as 4096, 512K, 256MiB or 1G")
        # Exact arithmetic: float would round 2**53 + 1 and overflow on 30 digits.
        whole, _, frac = m[1].partition(".")
        scale = _UNITS[m[2].lower()]
        n = int(whole) * scale + (int(frac) * scale // 10 ** len(frac) if frac else 0)
    if n < 0:
        raise ValueError("a size must not be negative")
    if n > MAX_SIZE:
        raise ValueError("too large: sizes are at most 1 EiB (1048576T)")
    return n


def format_size(n: int | float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


_DURATION = re.compile(r"^\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds from a number or a string such as 100ms, 30s, 5m, 1h; at most a year.
    Messages never repeat the value (see parse_size)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s")
    if isinstance(value, int):  # float() of a 400-digit integer would raise
        seconds = float(value) if abs(value) <= 1 << 60 else (math.inf if value > 0 else -math.inf)
    elif isinstance(value, float):
        seconds = value
    else:
        m = _DURATION.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError("expected a duration such as 500ms, 30s, 5m or 1h")
        seconds = float(m[1]) * _SECONDS[m[2]]
    if math.isnan(seconds):
        raise ValueError("expected a duration such as 30s, not NaN")
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    if seconds > MAX_DURATION:
        raise ValueError("too long: durations are at most 365d (one year)")
    return seconds
