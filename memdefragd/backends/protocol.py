"""The backend protocol: what the daemon and the pipeline may ask of a machine.

The daemon core and `report` speak only this protocol, so they run unchanged on the real
kernel (backends/kernel/) or the simulator (backends/sim/); backends/__init__.py has mypy
prove that both satisfy it.

Besides reading and changing memory, a machine may offer optional capabilities: process
events (`process_events`), access sampling (`access_sampler`) and node compaction
(`compactor`). Each backend provides or declines each one (None, with the reason in its
docstring or in the sentence it returns). The module functions of the same names ask a
backend that lacks the method altogether (a test's stand-in) as if it had declined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ..model import Layout, MemoryState, Outcome, PfnVisibility, ProcessInfo, Request, Vma

# A process event: ("exec"|"fork"|"comm"|"uid"|"exit", tgid), ("forked", (parent, child))
# for a fork that made a process, ("lost", reason) when events may have been missed, or
# ("subscribed", None) when they begin to flow (what came before was never announced).
Event = tuple[str, Any]


class Handle(Protocol):
    """A pinned reference to one process (a pidfd on the kernel): requests go through it,
    so that a pid reused by another process is never acted on."""

    proc: ProcessInfo

    @property
    def pid(self) -> int: ...

    def close(self) -> None: ...


class EventSource(Protocol):
    """Process events as discovery consumes them."""

    @property
    def available(self) -> bool:
        """Events are flowing (subscribed now); False means: list periodically instead."""

    def wait(self, timeout: float) -> list[Event]:
        """Block up to `timeout` for at least one event, then return all queued ones."""


class ProcessEvents(EventSource, Protocol):
    """An event source a backend hands out: the daemon starts it once and stops it at exit."""

    def start(self) -> bool:
        """Begin subscribing, without waiting: True if events flow already. Where they
        cannot flow here, the source says so once in the log."""

    def stop(self) -> bool:
        """Stop delivering; True once everything behind the source has ended."""


class AccessSampler(Protocol):
    """How hot each collapsible region is (pipeline/plan/access.py turns samples into
    hotness; a backend's sampler takes them)."""

    name: str
    # Seconds a newly watched process may go without figures before none are coming.
    settle: float
    # Each window walks every page table of the process (and may flush its TLB), and its
    # figures come from the scan's smaps fields: a cost that grows with the process, so
    # the daemon measures only processes up to access.referenced_max_rss with it.
    walks_target: bool

    def watch(self, procs: Mapping[int, ProcessInfo]) -> None:
        """The processes to measure from now on."""

    def refresh(self) -> None:
        """Once per scan cycle, before the scans: take fresh figures where that is due."""

    def hotness(
        self, proc: ProcessInfo, vmas: Sequence[tuple[Vma, np.ndarray]]
    ) -> list[np.ndarray] | None:
        """Per (VMA as just scanned, its region addresses): the regions' hotness; None
        while the process has not been measured for a window yet."""

    def close(self) -> None:
        """Undo what the sampler set up (a kdamond, say)."""


class Compaction(Protocol):
    """Compaction of whole NUMA nodes, asked for when collapses find no free 2 MiB block."""

    def maybe_compact(self, nodes: Iterable[int] | None = None) -> list[int]:
        """Compact the nodes (all by default) not compacted within the interval the
        compactor was made with; return those compacted."""


class Backend(Protocol):
    name: str
    # The methods this kind of backend implements at all; a method outside it in a config
    # is a mistake in the config. `refusal` says whether this machine can carry one out.
    methods: frozenset[str]

    def list_processes(self) -> list[ProcessInfo]:
        """Every user process now running; kernel threads and vanished ones are left out."""

    def process(self, pid: int) -> ProcessInfo:
        """One process; raises ProcessGone or AccessDenied."""

    def list_vmas(self, proc: ProcessInfo, *, detail: bool = True) -> list[Vma]:
        """The process's VMAs; with detail, their smaps fields (Rss, AnonHugePages,
        VmFlags...), which may cost a walk of the target's page tables.
        Raises ProcessGone or AccessDenied."""

    def read_layout(self, proc: ProcessInfo, vma: Vma) -> Layout:
        """Present pages of one VMA, all at once; raises ProcessGone or AccessDenied."""

    def iter_layouts(self, proc: ProcessInfo, vmas: Sequence[Vma]) -> Iterator[tuple[int, Layout]]:
        """(index into vmas, window) in virtual order: each VMA's layout in windows whose
        bounds are PMD-aligned, so that memory stays bounded however large the VMA.
        Raises ProcessGone or AccessDenied."""

    def iter_ranges(self, proc: ProcessInfo, ranges: Sequence[tuple[int, int]]) -> Iterator[Layout]:
        """Windows with present pages of arbitrary [start, end) byte ranges, PMD-aligned
        as iter_layouts cuts them, in order: what a request touched, re-read to verify it
        (pipeline/verify.py), VMA or not. Raises ProcessGone or AccessDenied."""

    def memory_state(self) -> MemoryState:
        """Free blocks, THP knobs and counters, pressure."""

    def pressure_state(self) -> MemoryState:
        """Only pressure and meminfo, cheaply: what the daemon's pause guard reads often."""

    def pfn_visibility(self) -> PfnVisibility:
        """Whether layouts carry real frame numbers, and why not if they don't."""

    def open(self, proc: ProcessInfo) -> Handle:
        """Pin the process for requests; raises ProcessGone, AccessDenied or OSError."""

    def refusal(self, method: str) -> str | None:
        """Why this backend cannot carry out `method` here, in words for the user; None if
        it can. For a method in `methods`, a refusal is the machine's (a kernel too old)."""

    def privilege_problems(self) -> list[str]:
        """One sentence per privilege the daemon lacks on this backend, saying what its
        absence costs; [] when nothing is missing. Optional: `privilege_problems(backend)`
        answers [] for a backend without it."""

    def limitations(self) -> list[str]:
        """One sentence per feature this machine lacks (PAGEMAP_SCAN before Linux 6.7, say),
        saying what the backend does instead; [] when nothing is missing. Optional:
        `limitations(backend)` answers [] for a backend without it."""

    def execute(
        self, handle: Handle, request: Request, *, should_stop: Callable[[], bool]
    ) -> Outcome:
        """Carry out one request with `request.method`; every region sent is either done or
        counted in the outcome's failures. should_stop is asked between regions."""

    def close(self) -> None:
        """Release what the backend holds open."""

    # -- optional capabilities: the module functions below answer for a backend without

    def process_events(self) -> ProcessEvents | None:
        """A source of this machine's process events (not started), or None when there is
        none: then discovery lists processes periodically."""

    def access_sampler(self, source: str) -> tuple[AccessSampler | None, str]:
        """The sampler `daemon.access.source` asks for ("auto", "damon" or "referenced";
        pipeline/plan/access.py handles "off"), or None, with a sentence for the log
        saying which and why."""

    def compactor(self, min_interval: float) -> Compaction | None:
        """Node compaction at most once per node per `min_interval` seconds, or None
        where the machine has none."""


def sparse_scan(backend: Backend) -> bool:
    """Whether a scan may list VMAs from maps rather than smaps: the backend finds the
    pages of a VMA with nothing resident at no cost (the kernel's PAGEMAP_SCAN), so it
    need not know each VMA's Rss first. Optional attribute; False without it."""
    return bool(getattr(backend, "sparse_scan", False))


def privilege_problems(backend: Backend) -> list[str]:
    """The backend's privilege problems, [] if it has no such method (a stand-in)."""
    method = getattr(backend, "privilege_problems", None)
    return list(method()) if callable(method) else []


def limitations(backend: Backend) -> list[str]:
    """The backend's limitations, [] if it has no such method (a stand-in)."""
    method = getattr(backend, "limitations", None)
    return list(method()) if callable(method) else []


def process_events(backend: Backend) -> ProcessEvents | None:
    """The backend's process events, None if it has no such capability (a stand-in)."""
    method = getattr(backend, "process_events", None)
    events: ProcessEvents | None = method() if callable(method) else None
    return events


def access_sampler(backend: Backend, source: str) -> tuple[AccessSampler | None, str]:
    """The backend's access sampler for `source`, declined for a backend without any."""
    method = getattr(backend, "access_sampler", None)
    if callable(method):
        got: tuple[AccessSampler | None, str] = method(source)
        return got
    return None, f"access-aware priority off: the {backend.name} backend has no access bits"


def compactor(backend: Backend, min_interval: float) -> Compaction | None:
    """The backend's node compaction, None if it has no such capability (a stand-in)."""
    method = getattr(backend, "compactor", None)
    made: Compaction | None = method(min_interval) if callable(method) else None
    return made
