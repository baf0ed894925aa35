"""Verify on the real kernel: `iter_ranges` reads a request's ranges, not VMAs, on every
read path, and finds huge exactly the half the child collapsed."""

from __future__ import annotations

import numpy as np
import pytest

from memdefragd.model import Request
from memdefragd.pipeline.verify import verify

from .helpers import PMD, MiB
from .test_scan_kernel import any_backend, require_collapsed  # noqa: F401  (a fixture)

pytestmark = pytest.mark.kernel


@pytest.mark.needs_collapse
def test_a_request_is_verified_by_its_ranges(spawn, any_backend):  # noqa: F811
    child = spawn(64 * MiB, collapse=(0, 32 * MiB))
    require_collapsed(child)
    proc = any_backend.process(child.pid)
    mid = child.addr + 32 * MiB

    def ask(*ranges: tuple[int, int]) -> Request:
        return Request("t", child.pid, proc.start_time, child.addr, child.end, ranges)

    whole = verify(any_backend, proc, ask((child.addr, child.end)))
    assert whole.bytes == 32 * MiB
    np.testing.assert_array_equal(whole.huge, np.arange(child.addr, mid, PMD, dtype=np.uint64))
    # Two ranges, one each side of the collapsed half's end: only the first is huge.
    split = verify(any_backend, proc, ask((mid - 2 * PMD, mid), (mid, mid + 4 * PMD)))
    assert split.bytes == 2 * PMD
    np.testing.assert_array_equal(split.huge, [mid - 2 * PMD, mid - PMD])
    # A layout of the 4 KiB half: present, none of it huge.
    windows = list(any_backend.iter_ranges(proc, [(mid, child.end)]))
    assert sum(w.present_pages for w in windows) == 32 * MiB // 4096
    assert not any(w.thp.any() for w in windows)
