"""Our kdamond through DAMON's sysfs interface, on a fake sysfs tree that reacts to writes
as the kernel's does (mm/damon/sysfs.c): nr_* files create their directories, and
nr_kdamonds rebuilds every kdamond and is refused while one runs."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from memdefragd.backends.kernel.access import DamonSampler
from memdefragd.backends.kernel.damon import SETTLE, WARMUP, Damon, DamonUnavailable, _boot_id
from memdefragd.model import PMD_SIZE, ProcessInfo, Vma

BASE = 1 << 30


class FakeDamon(Damon):
    """Damon over a directory tree standing in for /sys/kernel/mm/damon/admin."""

    def __init__(self, root: Path, regions=None, avail="paddr vaddr fvaddr", **kw):
        super().__init__(str(root), str(root.parent / "run" / "damon.json"), **kw)
        self.regions = regions or {}  # pid -> [(start, end, nr_accesses)]
        self.avail = avail
        self.writes: list[tuple[str, str]] = []

    def _write(self, rel: str, value: object) -> None:
        v = str(value)
        self.writes.append((rel, v))
        path = self.root / rel
        if not path.exists():  # sysfs makes no file on a write: a misspelt name fails
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if rel == "kdamonds/nr_kdamonds":
            states = [p.read_text().strip() for p in self.root.glob("kdamonds/*/state")]
            if "on" in states:
                raise OSError(errno.EBUSY, "busy")
            for d in self.root.glob("kdamonds/[0-9]*"):
                _rmtree(d)
            for i in range(int(v)):
                _files(self.root / f"kdamonds/{i}", state="off", pid="-1")
                _files(self.root / f"kdamonds/{i}/contexts", nr_contexts="0")
        elif rel.endswith("contexts/nr_contexts"):
            c = path.parent / "0"
            _files(c, avail_operations=self.avail, operations="paddr")
            _files(c / "monitoring_attrs/intervals", sample_us="", aggr_us="", update_us="")
            _files(c / "monitoring_attrs/nr_regions", min="10", max="1000")
            _files(c / "targets", nr_targets="0")
            _files(c / "schemes", nr_schemes="0")
        elif rel.endswith("targets/nr_targets"):
            for i in range(int(v)):
                _files(path.parent / str(i), pid_target="")
        elif rel.endswith("schemes/nr_schemes"):
            for i in range(int(v)):
                _files(path.parent / str(i), action="")
                _files(path.parent / f"{i}/core_filters", nr_filters="0")
                for rng in ("sz", "nr_accesses", "age"):  # the kernel's defaults: 0..0
                    _files(path.parent / f"{i}/access_pattern/{rng}", min="0", max="0")
                (path.parent / f"{i}/tried_regions").mkdir(exist_ok=True)
        elif rel.endswith("filters/nr_filters"):
            for i in range(int(v)):
                _files(path.parent / str(i), type="", damon_target_idx="", matching="", allow="")
        elif rel.endswith("/state") and v == "update_schemes_tried_regions":
            self._tried()
            return
        elif rel.endswith("/state") and v == "on":
            (path.parent / "pid").write_text("4321\n")
        path.write_text(v + "\n")

    def _tried(self) -> None:
        ctx = self.root / "kdamonds/0/contexts/0"
        for t in sorted(ctx.glob("targets/[0-9]*")):
            pid = int((t / "pid_target").read_text())
            scheme = ctx / f"schemes/{t.name}"

            def within(rng: str, x: int, scheme: Path = scheme) -> bool:
                lo, hi = (
                    int((scheme / f"access_pattern/{rng}/{m}").read_text()) for m in ("min", "max")
                )
                return lo <= x <= hi

            age = 3
            tried = [
                (s, e, n)
                for s, e, n in self.regions.get(pid, [])
                if within("sz", e - s) and within("nr_accesses", n) and within("age", age)
            ]  # a scheme tries only the regions its access pattern matches
            for i, (s, e, n) in enumerate(tried):
                _files(
                    scheme / f"tried_regions/{i}",
                    start=str(s),
                    end=str(e),
                    nr_accesses=str(n),
                    age=str(age),
                )


def _files(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text + "\n")


def _rmtree(d: Path) -> None:
    for p in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
        p.rmdir() if p.is_dir() else p.unlink()
    d.rmdir()


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "admin"
    _files(r / "kdamonds", nr_kdamonds="0")
    return r


def test_a_kdamond_someone_else_made_is_left_alone(root):
    _files(root / "kdamonds", nr_kdamonds="1")
    _files(root / "kdamonds/0", state="on", pid="78")
    _files(root / "kdamonds/0/contexts/0", operations="paddr", avail_operations="paddr")
    d = FakeDamon(root)
    with pytest.raises(DamonUnavailable, match=r"1 kdamond\(s\) configured by someone else "
                       r"\(0: on, paddr\).*no vaddr operations"):  # fmt: skip
        d.open()
    assert d.writes == []  # not one byte written
    d.close()  # nothing of ours to remove
    assert d.writes == []


def test_a_kernel_without_vaddr_is_refused_and_cleaned_up(root):
    d = FakeDamon(root, avail="paddr")
    with pytest.raises(DamonUnavailable, match="no vaddr operations"):
        d.open()
    assert (root / "kdamonds/nr_kdamonds").read_text() == "0\n"
    assert not d.state_file.exists()


def test_our_kdamond_monitors_each_process_and_goes_away_on_close(root):
    t = [0.0]
    d = FakeDamon(
        root,
        regions={
            10: [(BASE, BASE + PMD_SIZE, 20), (BASE + PMD_SIZE, BASE + 2 * PMD_SIZE, 5)],
            11: [(BASE, BASE + 4 * PMD_SIZE, 0)],
        },
        clock=lambda: t[0],
    )
    d.open()
    assert json.loads(d.state_file.read_text()) == {"pid": os.getpid(), "boot_id": _boot_id()}
    ctx = root / "kdamonds/0/contexts/0"
    assert (ctx / "operations").read_text() == "vaddr\n"
    # finer regions from the start than DAMON's default 10
    assert (ctx / "monitoring_attrs/nr_regions/min").read_text() == "200\n"
    d.watch([11, 10])
    assert [(ctx / f"targets/{i}/pid_target").read_text() for i in (0, 1)] == ["10\n", "11\n"]
    f = ctx / "schemes/1/core_filters/0"
    assert [(f / n).read_text().strip() for n in ("type", "damon_target_idx", "matching", "allow")] == [
        "target", "1", "N", "N",
    ]  # fmt: skip
    assert (ctx / "schemes/0/action").read_text() == "stat\n"
    assert (root / "kdamonds/0/state").read_text() == "on\n"
    d.refresh()
    assert d.ranges(10) is None  # not monitored for WARMUP yet
    t[0] = WARMUP
    starts, _, freq = d.ranges(10)
    assert starts.tolist() == [BASE, BASE + PMD_SIZE]
    assert freq.tolist() == [1.0, 0.25]  # nr_accesses over aggr_us / sample_us = 20
    sampler = DamonSampler(d)
    proc = ProcessInfo(10, "x", (), None, 0, "", 1, 0)
    vma = Vma(BASE, BASE + 4 * PMD_SIZE, "rw-p", 0, "00:00", 0, "")
    regions = BASE + np.arange(3, dtype=np.uint64) * np.uint64(PMD_SIZE)
    # DAMON's regions are coarse at first: no figures before SETTLE, even with accesses
    assert sampler.hotness(proc, [(vma, regions)]) is None
    n = len(d.writes)
    d.watch([10, 11])  # same set: nothing rewritten
    assert len(d.writes) == n
    t[0] = SETTLE
    d.refresh()
    (hot,) = sampler.hotness(proc, [(vma, regions)])
    assert hot.tolist() == [1.0, 0.25, 0.0]
    # pid 11: no access seen in any region: an idle process, its regions not even read back
    idle = ProcessInfo(11, "y", (), None, 0, "", 1, 0)
    assert d.ranges(11)[0].tolist() == []
    (cold,) = sampler.hotness(idle, [(vma, regions)])
    assert cold.tolist() == [0.0, 0.0, 0.0]
    sampler.close()
    assert (root / "kdamonds/nr_kdamonds").read_text() == "0\n"
    assert not d.state_file.exists()


def test_a_kdamond_left_by_a_killed_memdefragd_is_reclaimed(root):
    first = FakeDamon(root)
    first.open()
    first.state_file.write_text(json.dumps({"pid": 2**22 + 12345, "boot_id": _boot_id()}))
    second = FakeDamon(root)
    second.open()  # the dead daemon's kdamond removed, ours made
    assert (root / "kdamonds/nr_kdamonds").read_text() == "1\n"
    assert json.loads(second.state_file.read_text())["pid"] == os.getpid()
    second.close()
