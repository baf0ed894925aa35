"""Aging: deterministic for a seed, on target, and leaving scattered heaps behind."""

from __future__ import annotations

import numpy as np
import pytest

from memdefragd.backends.sim.aging import ProcSpec, Scenario, age, default_workload
from memdefragd.backends.sim.buddy import MT_UNMOVABLE, PAGEBLOCK_PAGES
from memdefragd.backends.sim.machine import UNMOVABLE
from memdefragd.pipeline.score import run_lengths

MiB = 1 << 20
SMALL = Scenario(
    memory=128 * MiB,
    processes=(ProcSpec("db", 32 * MiB), ProcSpec("web", 4 * MiB, count=2, thp=False)),
)


def tolerance(m, sc: Scenario) -> float:
    """The target is met to half a pageblock of each zone's free memory: a frame is in
    an order-9 block iff its whole pageblock is free."""
    return max(PAGEBLOCK_PAGES / 2 / (sc.free * z.pages) for z in m.zones) + 1e-9


def test_same_seed_same_machine_other_seed_other_machine():
    a, b, c = age(SMALL), age(SMALL), age(Scenario(**{**SMALL.__dict__, "seed": 1}))
    for name in ("kind", "owner", "vpn", "token", "compound", "pageblock_mt"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert [(p.pid, p.comm) for p in a.processes.values()] == [
        (p.pid, p.comm) for p in b.processes.values()
    ]
    for pa, pb in zip(a.processes.values(), b.processes.values(), strict=True):
        assert all(np.array_equal(x.pfn, y.pfn) for x, y in zip(pa.vmas, pb.vmas, strict=True))
    assert not np.array_equal(a.kind, c.kind)


@pytest.mark.parametrize(
    "sc",
    [
        SMALL,
        Scenario(memory=256 * MiB, fragmentation=0.5, unmovable=0.01, free=0.4, seed=3,
                 processes=(ProcSpec("db", 48 * MiB), ProcSpec("other", 16 * MiB))),
        Scenario(memory=256 * MiB, unmovable_layout="clustered", fragmentation=0.3,
                 processes=SMALL.processes),
        Scenario(memory=256 * MiB, nodes=2, fragmentation=0.9, unmovable=0.05, seed=7,
                 processes=SMALL.processes),
        Scenario(memory=128 * MiB, fragmentation=1.0, processes=SMALL.processes),
        Scenario(memory=128 * MiB, fragmentation=0.0, processes=SMALL.processes),
    ],
    ids=["benchmark-shape", "daemon-test", "clustered", "two-nodes", "all-small", "no-small"],
)  # fmt: skip
def test_reaches_its_targets(sc):
    m = age(sc)
    m.check()
    tol = tolerance(m, sc)
    assert abs(m.unusable_index() - sc.fragmentation) <= tol
    for z in m.zones:
        assert abs(m.unusable_index(zone=z) - sc.fragmentation) <= tol, z
        assert abs(m.buddy.nr_free(z) / z.pages - sc.free) < 1e-3, z
    assert np.count_nonzero(m.kind == UNMOVABLE) == round(sc.unmovable * m.nframes)
    assert m.meta["unusable_index_9"] == m.unusable_index()


def test_survivors_are_whole_and_scattered():
    m = age(SMALL)
    names = sorted(p.comm for p in m.processes.values())
    assert names == ["db", "web-0", "web-1"]  # the short-lived jobs are gone
    for p in m.processes.values():
        (v,) = p.vmas
        assert v.present == v.pages  # heaps are fully faulted
        runs = run_lengths(np.arange(v.pages), v.pfn)
        assert runs.mean() < 64, p.comm  # scattered: short runs, not one block


def test_scattered_unmovable_pollutes_many_pageblocks_clustered_few():
    def polluted(m):
        per_pb = np.bincount(np.flatnonzero(m.kind == UNMOVABLE) // PAGEBLOCK_PAGES)
        return np.count_nonzero(per_pb)

    scattered = age(SMALL)
    clustered = age(Scenario(**{**SMALL.__dict__, "unmovable_layout": "clustered"}))
    total = round(0.02 * scattered.nframes)
    assert polluted(scattered) >= 0.4 * scattered.nframes // PAGEBLOCK_PAGES
    assert polluted(clustered) == -(-total // PAGEBLOCK_PAGES)
    assert np.count_nonzero(clustered.pageblock_mt == MT_UNMOVABLE) == polluted(clustered)


def test_progress_reports_stages_up_to_done():
    seen = []
    age(SMALL, progress=lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and seen[0] == (0.0, "boot") and seen[-1] == (1.0, "done")


def test_default_workload_scales_with_memory():
    assert Scenario().workload() == default_workload(16 << 30)
    assert sum(p.heap * p.count for p in default_workload(1 << 30)) == pytest.approx(
        0.4 * (1 << 30)
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"unmovable_layout": "sprinkled"}, "scattered or clustered"),
        ({"fragmentation": 1.5}, "fragmentation"),
        ({"free": 0.6}, "page cache"),
        ({"rounds": 0}, "rounds"),
    ],
)
def test_bad_scenarios_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        age(Scenario(**{**SMALL.__dict__, **kw}))
