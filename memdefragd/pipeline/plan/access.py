"""Access-aware priority: how hot each collapsible region is, so the first work done is
the work that buys the most (HawkEye, ASPLOS 2019: *access coverage*, the accessed base
pages of each 2 MiB region, here as a fraction 0..1 and called hotness).

Samples come from the backend's optional `access_sampler()` capability, chosen by
`daemon.access.source`; the kernel backend's (its access.py) uses DAMON's kdamond per
region, or clear_refs + smaps' Referenced per VMA where DAMON is unusable. This module
holds what is pure: hotness from either kind of sample.

Until a process has been watched for one window its hotness is unknown (None); the daemon
holds such a process's work back rather than collapsing blind (`Process.candidates`), for
as long as `Windows` says figures may still come.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...backends.protocol import AccessSampler, Backend, access_sampler
from ...model import PMD_SIZE, Vma
from ..scan import ProcessReport, collapsible_regions

FIRST_WINDOW = 5.0  # seconds after discovery a process is measured for the first time


@dataclass(frozen=True, slots=True)
class Windows:
    """When a process's access figures are due, and how long to wait for them.

    A process is first measured one window after it is first asked about: FIRST_WINDOW,
    or the scan interval where that is shorter. If no figures have come after three such
    windows and a scan interval, or after the sampler's own `settle` time and a scan
    interval where that is longer (DAMON's regions take seconds to find a working set),
    none are coming (the sampler refused the process, say): it is worked on without them.
    """

    scan_interval: float
    settle: float = 0.0  # the sampler's: how long a new process may go without figures

    @property
    def first(self) -> float:
        return min(FIRST_WINDOW, self.scan_interval)

    @property
    def patience(self) -> float:
        return max(3 * self.first, self.settle) + self.scan_interval

    def given_up(self, waiting_since: float, now: float) -> bool:
        """No figures are coming for a process waiting for them since `waiting_since`."""
        return now - waiting_since > self.patience


def sampled_regions(report: ProcessReport) -> list[tuple[Vma, np.ndarray]]:
    """What a sampler is asked about after a scan: each VMA with its collapsible regions."""
    return [(v.vma, collapsible_regions(v.metrics)) for v in report.vmas]


def by_vma(
    pairs: Sequence[tuple[Vma, np.ndarray]], hotness: Sequence[np.ndarray]
) -> dict[int, np.ndarray]:
    """A sampler's answer (hotness per region, one array per pair) keyed by VMA start."""
    return {v.start: h for (v, _), h in zip(pairs, hotness, strict=True)}


# ------------------------------------------------------------------------------ pure


def hotness_from_ranges(
    regions: np.ndarray, starts: np.ndarray, ends: np.ndarray, freq: np.ndarray
) -> np.ndarray:
    """Per 2 MiB region (byte addresses), the mean access frequency of the monitored
    ranges [starts, ends) over it, weighted by overlap; parts no range covers count 0.

    Vectorised through the running integral of the piecewise-constant frequency.
    """
    regions = np.asarray(regions, dtype=np.float64)
    if regions.size == 0 or len(starts) == 0:
        return np.zeros(regions.size)
    order = np.argsort(starts)
    s, e = np.asarray(starts, np.float64)[order], np.asarray(ends, np.float64)[order]
    f = np.asarray(freq, np.float64)[order]
    x = np.ravel(np.column_stack((s, e)))  # breakpoints s0 e0 s1 e1 ...
    area = np.cumsum(np.ravel(np.column_stack((np.zeros_like(f), (e - s) * f))))
    total = np.interp(regions + PMD_SIZE, x, area) - np.interp(regions, x, area)
    hotness: np.ndarray = np.clip(total / PMD_SIZE, 0.0, 1.0)
    return hotness


def hotness_from_referenced(referenced: int, rss: int) -> float | None:
    """Share of a VMA's resident bytes referenced since clear_refs; None without any."""
    if rss <= 0:
        return None
    return min(1.0, max(0.0, referenced / rss))


def open_sampler(source: str, backend: Backend) -> tuple[AccessSampler | None, str]:
    """The sampler `daemon.access.source` asks for on this backend, and a sentence for
    the log saying which and why (DAMON's refusal reason, for one). "off" is decided
    here, before the machine is asked anything."""
    if source == "off":
        return None, "access-aware priority off (daemon.access.source: off)"
    return access_sampler(backend, source)
