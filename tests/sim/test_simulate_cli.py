"""`memdefragd simulate` and `memdefragd report --simulated`, end to end, on small machines."""

from __future__ import annotations

import json

import pytest

from memdefragd.cli import main
from memdefragd.commands.report import _HEADER
from memdefragd.commands.simulate import METHODS, SCHEMA

from .test_render_png import decode_png

SMALL = ["--memory", "128M", "--seed", "1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_simulate_json_reports_before_after_and_work(capsys):
    code, out, _ = run(capsys, "simulate", *SMALL, "--method", "ranger-improved", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == SCHEMA and doc["method"] == "ranger-improved"
    assert doc["scenario"]["memory_bytes"] == 128 << 20 and doc["scenario"]["seed"] == 1
    b, a, w = doc["before"], doc["after"], doc["work"]
    for fig in (b, a):
        assert set(fig["coverage_ratio"]) == {"32", "128"}
        assert set(fig["runs_for"]) == {"0.9", "0.99"}
        assert 0 <= fig["unusable_index_9"] <= 1 and fig["processes"]
    assert a["present_bytes"] == b["present_bytes"]  # nothing lost, nothing faulted
    assert a["runs"] < b["runs"] and a["coverage_ratio"]["128"] > b["coverage_ratio"]["128"]
    assert a["largest_run_pages"] > b["largest_run_pages"]
    assert w["pages_migrated"] + w["pages_exchanged"] > 0
    assert w["bytes_copied"] == 4096 * (w["pages_migrated"] + 2 * w["pages_exchanged"])
    assert w["pages_moved"] == w["bytes_copied"] // 4096


def test_simulate_none_changes_nothing_and_ranger_names_its_failures(capsys):
    code, out, _ = run(capsys, "simulate", *SMALL, "--method", "none", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["work"]["pages_migrated"] == 0
    assert {k: v for k, v in doc["before"].items()} == doc["after"]
    code, out, _ = run(capsys, "simulate", *SMALL, "--method", "ranger")
    assert code == 0
    for line in ("runs", "coverage@32", "coverage@128", "runs_for(0.99)", "largest run",
                 "THP coverage", "unusable index (order 9)", "pages migrated", "copied"):  # fmt: skip
        assert line in out, line
    assert "failures: dst_non_moveable_failed" in out  # 2% unmovable: the RFC stops on them


def test_simulate_png(capsys, tmp_path):
    path = tmp_path / "mem.png"
    code, out, _ = run(capsys, "simulate", *SMALL, "--method", "collapse", "--png", str(path))
    assert code == 0 and f"picture: {path}" in out
    assert decode_png(path.read_bytes()).shape[2] == 3


@pytest.mark.parametrize("argv", [["--fragmentation", "2"], ["--memory", "lots"]])
def test_simulate_refuses_bad_options(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["simulate", *argv])
    assert e.value.code == 2


def test_simulate_says_why_a_machine_cannot_be_built(capsys):
    code, _, err = run(capsys, "simulate", "--memory", "1M")
    assert code == 2 and "memory" in err


def test_simulate_knows_every_method():
    assert METHODS == ("none", "compaction", "collapse", "ranger", "ranger-improved")


def test_report_on_a_simulated_machine_prints_the_kernel_table(capsys):
    code, out, _ = run(capsys, "report", "--simulated", *SMALL, "--system")
    assert code == 0
    assert "kernel simulated (128.0 MiB, fragmentation 0.7" in out
    assert _HEADER in out and "PFNs unavailable" not in out
    assert "PID 1000  db" in out and "System memory" in out and "unusable" in out
    code, out, _ = run(capsys, "report", "--simulated", *SMALL, "--json", "--name", "^db$")
    doc = json.loads(out)
    assert [p["comm"] for p in doc["processes"]] == ["db"]
    assert doc["pfn_visible"] and doc["processes"][0]["totals"]["contiguity"]["runs"] > 0


def test_report_machine_options_need_simulated(capsys):
    code, _, err = run(capsys, "report", "--memory", "1G")
    assert code == 2 and "--simulated" in err
