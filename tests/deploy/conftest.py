"""Shared pieces of the deployment tests: the repository root, the skip-or-fail rule, one
`make install` per session into a staging root, and a summary of the figures they measure
(security exposure, end-to-end timings) printed at the end of the run."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import REPO

CACHE = REPO / ".cache" / "deploy"
REQUIRE_ENV = "MEMDEFRAGD_REQUIRE_KERNEL"
INSTALL_PYTHON = "/usr/bin/python3"

# Figures the tests report, printed by pytest_terminal_summary below.
FIGURES: list[str] = []


def require(condition: object, reason: str) -> None:
    """Skip when the machine cannot do what a test needs; fail instead under CI's variable
    (MEMDEFRAGD_REQUIRE_KERNEL=1, which .ci/run sets)."""
    if condition:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set and {reason}", pytrace=False)
    pytest.skip(reason)


def report(line: str) -> None:
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("deployment figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@dataclass(frozen=True)
class Installed:
    """A `make install DESTDIR=root PREFIX=prefix` tree."""

    root: Path
    prefix: str
    log: str

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @property
    def venv_python(self) -> Path:
        return self.path(f"{self.prefix}/lib/memdefragd/bin/python3")


def make_install(root: Path, *args: str, target: str = "install") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target, f"DESTDIR={root}", *args],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    """`make install DESTDIR=<tmp>` with the default PREFIX (/usr/local), once per session:
    the listing tests read it and the end-to-end test boots a container on it."""
    require(shutil.which("make"), "make is not installed")
    require(
        Path(INSTALL_PYTHON).exists()
        and subprocess.run([INSTALL_PYTHON, "-c", "import ensurepip, venv"]).returncode == 0,
        f"{INSTALL_PYTHON} with venv and ensurepip (Debian: python3-venv) is needed by "
        "`make install`",
    )
    root = tmp_path_factory.mktemp("destdir")
    r = make_install(root)
    assert r.returncode == 0, f"make install failed:\n{r.stdout}\n{r.stderr}"
    return Installed(root, "/usr/local", r.stdout + r.stderr)
