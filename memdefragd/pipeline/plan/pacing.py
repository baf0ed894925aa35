"""Pacing for latency-sensitive targets: collapse a little, rest, collapse again.

Each MADV_COLLAPSE of a 2 MiB region holds that range (and, for the final copy, the
target's mmap lock) for about a millisecond, sometimes tens; a target that touches the
range meanwhile waits. Back-to-back calls make those waits the target's tail latency
(measured: p99 0.6 ms -> 5.8 ms for an in-memory database swept in one go; see also
benchmarks/latency.py). A latency-
sensitive target therefore gets one 2 MiB region per request and a *duty cycle* d: after
a call that took t seconds inside the kernel, it rests t * (1 - d) / d, so the daemon
spends at most the fraction d of wall time collapsing in it. The pause follows each
measured call, so the pace adapts by itself to what collapses cost on this machine now
(slow when the kernel compacts for every huge page, quick otherwise).

Pure: the caller passes `now`; the loop sleeps in steps no longer than its WAIT_STEP, so a
rest never delays a signal.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Pace", "Pacer", "pace_delay"]

EWMA_WEIGHT = 0.2  # of the newest call in the smoothed duration (metrics and logs only)


def pace_delay(duration: float, duty: float, max_pause: float) -> float:
    """Seconds to rest after a call of `duration` seconds, for duty cycle `duty` in (0, 1].

    duration * (1 - duty) / duty, so work / (work + rest) == duty; bounded by max_pause so
    that one pathological call (a compaction stall of a second) cannot park a target for
    half a minute. Calls longer than max_pause * duty / (1 - duty) (111 ms at 10% and 1 s)
    therefore run above the duty cycle: the bound trades the cycle for progress there.
    """
    if not 0 < duty <= 1:
        raise ValueError(f"duty cycle must be in (0, 1], got {duty}")
    if duration <= 0 or duty == 1:
        return 0.0
    return min(max_pause, duration * (1.0 - duty) / duty)


@dataclass(slots=True)
class Pace:
    """One target's pace: when it may go next, and what pacing has cost it so far."""

    until: float = float("-inf")
    calls: int = 0
    paused: float = 0.0  # seconds of rest imposed in total
    busy: float = 0.0  # seconds inside the kernel in total
    smoothed: float = 0.0  # exponentially weighted call duration, seconds
    last_delay: float = 0.0


class Pacer:
    """Per-target rests after each request, from its measured duration."""

    def __init__(self, max_pause: float):
        if max_pause < 0:
            raise ValueError(f"max_pause must not be negative, got {max_pause}")
        self.max_pause = max_pause
        self.paces: dict[str, Pace] = {}

    def record(self, target: str, duration: float, duty: float, now: float) -> float:
        """A request of `target` ended at `now` after `duration` s in the kernel; returns
        the rest imposed (0 when nothing ran: a request cancelled before its first call)."""
        p = self.paces.setdefault(target, Pace())
        delay = pace_delay(duration, duty, self.max_pause)
        p.calls += 1
        p.busy += max(duration, 0.0)
        p.paused += delay
        p.last_delay = delay
        p.smoothed = duration if p.calls == 1 else (
            (1 - EWMA_WEIGHT) * p.smoothed + EWMA_WEIGHT * duration
        )  # fmt: skip
        p.until = max(p.until, now + delay)
        return delay

    def until(self, target: str) -> float:
        p = self.paces.get(target)
        return p.until if p is not None else float("-inf")

    def resting(self, target: str, now: float) -> bool:
        return self.until(target) > now
