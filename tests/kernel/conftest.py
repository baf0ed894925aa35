"""Fixtures for the real-kernel tests: children this test started, and a kernel backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memdefragd.backends.kernel.backend import KernelBackend

from .helpers import Child, Daemon, require_kernel, start_child


@pytest.fixture
def spawn():
    """Factory: spawn(size, collapse=(off, len), ...) -> Child; every child is killed and
    reaped at teardown, whatever the test did with it."""
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    require_kernel(
        not (enabled.exists() and "[always]" in enabled.read_text()),
        "THP enabled=always: faults would map 2 MiB pages, these tests need 4 KiB",
    )
    children: list[Child] = []

    def _spawn(size: int, **kwargs) -> Child:
        child = start_child(size, **kwargs)
        children.append(child)
        return child

    yield _spawn
    for child in children:
        child.stop()


@pytest.fixture
def backend():
    b = KernelBackend()
    yield b
    b.close()


@pytest.fixture
def fallback_backend():
    """The path without PAGEMAP_SCAN: whole-VMA pagemap reads plus /proc/kpageflags."""
    require_kernel(os.access("/proc/kpageflags", os.R_OK), "/proc/kpageflags is not readable")
    b = KernelBackend(use_scan=False)
    yield b
    b.close()


@pytest.fixture
def pfns(backend):
    """Skip (or fail under MEMDEFRAGD_REQUIRE_KERNEL) unless page frame numbers are visible."""
    vis = backend.pfn_visibility()
    require_kernel(vis.visible, vis.reason)
    return vis


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*a, **kw) -> Daemon:
        d = Daemon(*a, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
        # pytest shows a test's captured output only when it fails: then the whole log
        # (the assertion messages cut theirs), which is all a guest in tests/vm leaves.
        print(f"----- daemon log {d.log_path} -----\n{d.text()[-20000:]}")
