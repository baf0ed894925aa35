"""Translation Ranger's own kernel in a guest: tests/ranger run inside it.

No registry has that kernel (v5.0 with the RFC's patches; building it is up to you, and
nothing of it belongs in this repository), so this test takes the image from
MEMDEFRAGD_TR_KERNEL and, without it, skips: the one skip MEMDEFRAGD_REQUIRE_KERNEL
tolerates. The image must have 9p, virtio-pci and THP built in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness import prepare_image, run_guest

IMAGE = os.environ.get("MEMDEFRAGD_TR_KERNEL")


@pytest.mark.skipif(
    not IMAGE,
    reason="MEMDEFRAGD_TR_KERNEL is not set: no Translation Ranger kernel image to boot "
    "(README, 'Translation Ranger's own kernel')",
)
def test_tests_ranger_pass_on_translation_rangers_kernel():
    assert IMAGE is not None
    kernel = prepare_image(Path(IMAGE), "ranger-5.0")
    run = run_guest(kernel, ["tests/ranger"], timeout=1800)
    for t in run.results:
        print(f"{t.outcome.upper():8} {t.nodeid} {t.message[:300]}")
        for name, value in t.properties.items():
            print(f"    {name}:\n{value}")
    assert run.ok, f"{run.status}, pytest exit {run.pytest_exit}\n{run.console[-3000:]}"
    assert run.counts() == {"passed": 8}, run.counts()  # nothing skipped there
