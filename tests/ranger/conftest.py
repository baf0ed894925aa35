"""On any other kernel these tests skip: the one skip MEMDEFRAGD_REQUIRE_KERNEL tolerates,
because no such kernel can be had from a package registry. tests/vm/test_ranger_guest.py
boots the kernel image MEMDEFRAGD_TR_KERNEL names and runs this directory inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel.conftest import daemons, spawn  # noqa: F401  (fixtures)

TR_SYSCALL = 335  # the RFC's number on x86_64 (v5.0-rc5 base): configured, never guessed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if Path("/proc/sys/vm/kmem_defragd_always").exists():
        return
    skip = pytest.mark.skip(
        reason="not a Translation Ranger kernel: set MEMDEFRAGD_TR_KERNEL to the image of "
        "one and tests/vm/test_ranger_guest.py runs these in a guest"
    )
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(skip)
