"""One record per tracked process: what a scan resets, what a request books."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from memdefragd.daemon.state import Process
from memdefragd.model import PMD_SIZE, ProcessInfo, Request
from memdefragd.pipeline.scan import ProcessReport
from memdefragd.pipeline.score import rollup


def report(pid: int = 7) -> ProcessReport:
    proc = ProcessInfo(pid, "app", (), "/app", 0, "/", 1, 0)
    return ProcessReport(proc, "t", (), replace(rollup([]), aligned_regions=4, thp_regions=1), 0)


def test_a_request_books_what_it_sent_and_made_huge_until_the_next_scan():
    p = Process()
    assert p.coverage is None  # no scan yet
    p.scanned(report())
    req = Request("t", 7, 1, 0, 8 * PMD_SIZE, ((0, 4 * PMD_SIZE), (6 * PMD_SIZE, 8 * PMD_SIZE)))
    p.sent(req, attempted=5 * PMD_SIZE)  # stopped after five regions
    assert p.tried == {0, PMD_SIZE, 2 * PMD_SIZE, 3 * PMD_SIZE, 6 * PMD_SIZE}
    assert p.made(np.zeros(0, np.uint64)) is None  # nothing urgent to mend
    p.urgent = np.array([0, 6 * PMD_SIZE], dtype=np.uint64)
    assert p.made(np.array([6 * PMD_SIZE, 7 * PMD_SIZE], dtype=np.uint64)) == 1
    np.testing.assert_array_equal(p.urgent, [0])
    assert p.made_huge == 2 and p.coverage == 3 / 4  # the scan's one, and two since
    p.scanned(report())
    assert (p.tried, p.made_huge) == (set(), 0)
    np.testing.assert_array_equal(p.urgent, [0])  # until the scan's regressions say otherwise
