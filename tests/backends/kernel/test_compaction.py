"""Proactive compaction requests: per node, rate-limited, failures reported not raised."""

from __future__ import annotations

from memdefragd.backends.kernel.compaction import Compactor


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def fake_sys(tmp_path, nodes=(0, 1)):
    for n in nodes:
        d = tmp_path / f"devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "compact").write_text("")
    (tmp_path / "devices/system/node/possible").write_text("0-1\n")
    return tmp_path


def test_each_node_at_most_once_per_interval(tmp_path):
    root = fake_sys(tmp_path)
    clock = Clock()
    c = Compactor(60.0, sys_root=str(root), clock=clock)
    assert c.nodes() == [0, 1]
    assert c.maybe_compact() == [0, 1]
    assert (root / "devices/system/node/node1/compact").read_text() == "1\n"
    (root / "devices/system/node/node0/compact").write_text("")
    clock.t += 59.0
    assert c.maybe_compact() == []
    assert (root / "devices/system/node/node0/compact").read_text() == ""
    clock.t += 1.0
    assert c.maybe_compact([0]) == [0]


def test_unwritable_node_is_reported_not_raised(tmp_path):
    root = fake_sys(tmp_path, nodes=(0,))
    target = root / "devices/system/node/node0/compact"
    target.unlink()
    target.mkdir()  # writing to a directory fails with EISDIR
    c = Compactor(60.0, sys_root=str(root), clock=Clock())
    assert c.maybe_compact([0]) == []
    assert 0 in c.failed


def test_the_kernel_backend_compacts_under_its_sys_root(tmp_path):
    from memdefragd.backends.kernel.backend import KernelBackend

    root = fake_sys(tmp_path, nodes=(0,))
    c = KernelBackend(sys_root=str(root)).compactor(60.0)
    assert c.min_interval == 60.0 and c.maybe_compact() == [0]
    assert (root / "devices/system/node/node0/compact").read_text() == "1\n"
