"""The one seam: the daemon and the pipeline reach a machine only through the backend
protocol, so they run unchanged on the kernel or the simulator (mypy proves that both
backends satisfy the protocol, in memdefragd/backends/__init__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from memdefragd.backends.protocol import (
    access_sampler,
    compactor,
    privilege_problems,
    process_events,
)
from memdefragd.pipeline.plan.access import open_sampler
from tests.paths import REPO

PACKAGE = REPO / "memdefragd"
FORBIDDEN = ("memdefragd.backends.kernel", "memdefragd.backends.sim")


def imported(path: Path) -> set[str]:
    """Every module (and from-imported name, as module.name) a source file imports."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("part", ["daemon", "pipeline"])
def test_daemon_and_pipeline_import_no_backend_module(part):
    files = sorted((PACKAGE / part).rglob("*.py"))
    assert files
    leaks = {
        f"{f.relative_to(REPO)}: {name}"
        for f in files
        for name in imported(f)
        if name.startswith(FORBIDDEN)
    }
    assert not leaks


@pytest.mark.parametrize("part", ["pipeline", "backends", "config"])
def test_data_flows_one_way_nothing_below_the_daemon_imports_it(part):
    """The pipeline, the backends and the config serve the daemon and the commands; they
    never import them back (which would make the stages untestable on their own)."""
    leaks = {
        f"{f.relative_to(REPO)}: {name}"
        for f in sorted((PACKAGE / part).rglob("*.py"))
        for name in imported(f)
        if name.startswith(("memdefragd.daemon", "memdefragd.commands", "memdefragd.cli"))
    }
    assert not leaks


def test_the_walk_sees_relative_imports():
    assert "memdefragd.backends.protocol.Backend" in imported(PACKAGE / "pipeline/scan.py")


class StandIn:
    """A backend with none of the optional capabilities (as tests' stand-ins are)."""

    name = "stand-in"


def test_a_backend_without_a_capability_declines_it():
    b = StandIn()
    assert process_events(b) is None and compactor(b, 60.0) is None
    assert privilege_problems(b) == []
    assert access_sampler(b, "auto") == (
        None, "access-aware priority off: the stand-in backend has no access bits",
    )  # fmt: skip
    assert open_sampler("off", b) == (None, "access-aware priority off (daemon.access.source: off)")
