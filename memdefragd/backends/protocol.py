"""The backend protocol: what the daemon and the pipeline may ask of a machine.

The daemon core and `report` speak only this protocol, so they run unchanged on the real
kernel (backends/kernel/) or the simulator (backends/sim/).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ..model import Layout, MemoryState, Outcome, PfnVisibility, ProcessInfo, Request, Vma


class Handle(Protocol):
    """A pinned reference to one process (a pidfd on the kernel): requests go through it,
    so that a pid reused by another process is never acted on."""

    proc: ProcessInfo

    @property
    def pid(self) -> int: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

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

    def memory_state(self) -> MemoryState:
        """Free blocks, THP knobs and counters, pressure."""

    def pressure_state(self) -> MemoryState:
        """Only pressure and meminfo, cheaply: what the daemon's pause guard reads often."""

    def pfn_visibility(self) -> PfnVisibility:
        """Whether layouts carry real frame numbers, and why not if they don't."""

    def open(self, proc: ProcessInfo) -> Handle:
        """Pin the process for requests; raises ProcessGone, AccessDenied or OSError."""

    def refusal(self, method: str) -> str | None:
        """Why this backend cannot carry out `method`, in words for the user; None if it can."""

    def privilege_problems(self) -> list[str]:
        """One sentence per privilege the daemon lacks on this backend, saying what its
        absence costs; [] when nothing is missing. Optional: `privilege_problems(backend)`
        answers [] for a backend without it."""

    def execute(
        self, handle: Handle, request: Request, *, should_stop: Callable[[], bool]
    ) -> Outcome:
        """Carry out one request with `request.method`; every region sent is either done or
        counted in the outcome's failures. should_stop is asked between regions."""

    def close(self) -> None:
        """Release what the backend holds open."""


def privilege_problems(backend: Backend) -> list[str]:
    """The backend's privilege problems, [] if it has no such method (a stand-in)."""
    method = getattr(backend, "privilege_problems", None)
    return list(method()) if callable(method) else []
