"""The kernel backend's access samplers without a kernel: clear_refs + smaps Referenced
over a fake /proc (DAMON's sampler is tested with its driver, in test_damon.py)."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from memdefragd.backends.kernel.access import ReferencedSampler
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.model import PMD_SIZE, ProcessInfo, Vma

BASE = 1 << 30


def regions(*slots_: int) -> np.ndarray:
    return BASE + np.asarray(slots_, dtype=np.uint64) * np.uint64(PMD_SIZE)


def test_referenced_sampler_windows(tmp_path):
    pid = 4242
    (tmp_path / str(pid)).mkdir()
    stat = f"{pid} (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 77 0 0"
    (tmp_path / str(pid) / "stat").write_text(stat + " 0" * 30 + "\n")
    (tmp_path / str(pid) / "clear_refs").write_text("")
    proc = ProcessInfo(pid, "x", (), None, 0, "", 77, 0)
    t = [0.0]
    s = ReferencedSampler(str(tmp_path), clock=lambda: t[0], min_window=1.0)
    s.watch({pid: proc})
    assert (tmp_path / str(pid) / "clear_refs").read_text() == "1"  # window opened
    vma = Vma(BASE, BASE + 4 * PMD_SIZE, "rw-p", 0, "00:00", 0, "",
              MappingProxyType({"Rss": 8 << 20, "Referenced": 2 << 20}))  # fmt: skip
    pairs = [(vma, regions(0, 1))]
    t[0] = 0.5
    assert s.hotness(proc, pairs) is None  # window too short, nothing measured yet
    t[0] = 2.0
    (hot,) = s.hotness(proc, pairs)
    assert hot.tolist() == [0.25, 0.25]
    assert s.since[pid] == 2.0  # the next window began
    t[0] = 2.5
    assert s.hotness(proc, pairs)[0].tolist() == [0.25, 0.25]  # short: the last figures
    s.watch({})
    assert pid not in s.since


def test_the_kernel_backend_samples_referenced_bits_under_its_proc_root(tmp_path):
    sampler, how = KernelBackend(proc_root=str(tmp_path)).access_sampler("referenced")
    assert isinstance(sampler, ReferencedSampler) and sampler.proc_root == str(tmp_path)
    assert "clear_refs + smaps Referenced" in how
