"""Which capabilities the daemon lacks, read from CapEff, each named with its cost."""

from __future__ import annotations

from pathlib import Path

import pytest

from memdefragd.backends.kernel.privileges import privilege_problems
from memdefragd.backends.protocol import privilege_problems as backend_problems


def proc_root(tmp_path: Path, cap_eff: str) -> str:
    (tmp_path / "self").mkdir()
    (tmp_path / "self/status").write_text(f"Name:\tx\nCapPrm:\tffff\nCapEff:\t{cap_eff}\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("cap_eff", "missing"),
    [
        ("000001ffffffffff", []),
        (
            "0000000000000000",
            [
                "CAP_SYS_ADMIN",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH",
                "CAP_SYS_NICE",
                "CAP_NET_ADMIN",
            ],
        ),
        (
            "0000000000201000",
            ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYS_NICE"],
        ),  # SYS_ADMIN, NET_ADMIN
        ("0000000000a81004", []),  # what the shipped unit grants, plus CAP_NET_ADMIN
        ("0000000000a81002", []),  # CAP_DAC_OVERRIDE opens the files just as well
    ],
)
def test_each_missing_capability_is_named_with_its_cost(tmp_path, cap_eff, missing):
    problems = privilege_problems(proc_root(tmp_path, cap_eff))
    assert [p.split(":")[0] for p in problems] == [f"no {cap}" for cap in missing]
    assert all(len(p.split(": ", 1)[1]) > 40 for p in problems)  # says what it costs


def test_unreadable_status_is_said_not_guessed(tmp_path):
    (problem,) = privilege_problems(str(tmp_path))
    assert "cannot read CapEff" in problem


def test_a_backend_without_the_method_has_no_problems():
    assert backend_problems(object()) == []  # type: ignore[arg-type]
