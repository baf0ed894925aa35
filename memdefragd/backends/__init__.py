"""Backends: the machine the daemon talks to (real kernel or simulator).

The daemon core and `report` speak only this protocol, so they run unchanged on either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from ..model import Layout, MemoryState, PfnVisibility, ProcessInfo, Vma


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
