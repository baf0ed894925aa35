"""Backends: the machine the daemon talks to, the real kernel or a simulated one.

`protocol.py` is the seam: the daemon and the pipeline import nothing else from here but
`open_backend`, which picks a backend from the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .protocol import Backend

if TYPE_CHECKING:
    from ..config import DaemonSettings
    from .kernel.backend import KernelBackend
    from .sim.backend import SimBackend

    # The type checker's proof that both backends satisfy the protocol, optional
    # capabilities included (never run: a mismatch is a mypy error here).
    def _kernel(b: KernelBackend) -> Backend:
        return b

    def _simulated(b: SimBackend) -> Backend:
        return b


def open_backend(settings: DaemonSettings) -> Backend:
    """The backend a config asks for (imported lazily: the simulator pulls in more)."""
    if settings.backend == "simulated":
        from .sim.aging import age
        from .sim.backend import SimBackend

        return SimBackend(age(settings.simulated.scenario()))
    from .kernel.backend import KernelBackend

    return KernelBackend(
        ranger_syscall=settings.ranger_syscall,
        ranger_breakout_chunks=settings.ranger_breakout_chunks,
    )
