"""`memdefragd report` end to end on the real kernel, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from .helpers import NO_SCAN_NO_CAP_THP_BUG, MiB, require_kernel

pytestmark = pytest.mark.kernel


def run(
    *args: str, prefix: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "memdefragd.cli", "report", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def our_vma(doc: dict, child) -> dict:
    (proc,) = doc["processes"]
    return next(v for v in proc["vmas"] if int(v["start"], 16) == child.addr)


@pytest.fixture
def half_collapsed(spawn):
    child = spawn(64 * MiB, collapse=(0, 32 * MiB))
    require_kernel(child.collapse_errno == 0, f"MADV_COLLAPSE failed: {child.collapse_error}")
    return child


@pytest.mark.needs_collapse
def test_json_report_of_a_half_collapsed_mapping(half_collapsed, pfns):
    child = half_collapsed
    r = run("--pid", str(child.pid), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "memdefragd.report/1" and doc["pfn_visible"] is True
    v = our_vma(doc, child)
    assert v["size_bytes"] == 64 * MiB and v["present_bytes"] == 64 * MiB
    assert v["thp_bytes"] == v["smaps_pmd_mapped_bytes"] == 32 * MiB
    assert v["thp_coverage_ratio"] == 0.5
    assert v["collapsible_regions"] == 16
    c = v["contiguity"]
    # 16 THPs are 16 runs of at least 512 pages each; 4 KiB faults add more runs.
    assert c["largest_run_pages"] >= 512 and c["runs"] >= 17
    assert c["coverage_ratio"]["32"] >= 0.5


@pytest.mark.needs_collapse
def test_text_report_names_the_process_and_its_figures(half_collapsed, pfns):
    child = half_collapsed
    r = run("--pid", str(child.pid))
    assert r.returncode == 0, r.stderr
    row = next(
        line for line in r.stdout.splitlines() if line.strip().startswith(f"{child.addr:012x}")
    )
    cols = row.split()
    assert cols[1:5] == ["rw-p", "64.0", "MiB", "64.0"]  # perms, size, rss
    assert "32.0 MiB   50%      16" in row
    assert f"PID {child.pid}  python" in r.stdout


@NO_SCAN_NO_CAP_THP_BUG
@pytest.mark.needs_collapse
def test_without_cap_sys_admin_contiguity_is_withheld_not_faked(half_collapsed):
    child = half_collapsed
    setpriv = shutil.which("setpriv")
    require_kernel(setpriv, "setpriv (util-linux) is not installed")
    drop = (setpriv, "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--")
    r = run("--pid", str(child.pid), "--json", prefix=drop)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["pfn_visible"] is False and "CAP_SYS_ADMIN" in doc["pfn_unavailable_reason"]
    v = our_vma(doc, child)
    assert v["contiguity"] is None and v["aligned_contiguous_regions"] is None
    assert v["thp_bytes"] == 32 * MiB and v["collapsible_regions"] == 16
    text = run("--pid", str(child.pid), prefix=drop).stdout
    assert "PFNs unavailable: no CAP_SYS_ADMIN" in text


def test_vanished_pid_is_skipped_with_exit_status_1(spawn):
    child = spawn(2 * MiB)
    pid = child.pid
    child.kill()
    r = run("--pid", str(pid), "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["processes"] == []
    assert doc["skipped"] == [
        {"pid": pid, "comm": "?", "reason": "exited", "detail": f"pid {pid}: no such process"}
    ]


def test_name_and_min_rss_filters_and_watch(spawn):
    tag = os.urandom(2).hex()  # only this test's children match, whatever else runs
    small = spawn(2 * MiB, comm=f"mdd-small-{tag}")
    big = spawn(64 * MiB, comm=f"mdd-big-{tag}")
    args = ("--name", f"^mdd-.*-{tag}$", "--min-rss", "32M", "--json", "--watch", "0.2")
    p = subprocess.Popen(
        [sys.executable, "-m", "memdefragd.cli", "report", *args],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        docs = [json.loads(p.stdout.readline()) for _ in range(2)]  # one document per line
    finally:
        p.terminate()
        p.wait(10)
    for doc in docs:
        assert [x["pid"] for x in doc["processes"]] == [big.pid]
    assert small.pid not in {x["pid"] for x in docs[0]["processes"]}
    assert docs[1]["time"] > docs[0]["time"]


def test_config_targets_label_processes(spawn, tmp_path):
    child = spawn(4 * MiB, comm="mdd-target")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("targets:\n  - name: mine\n    match: {comm: '^mdd-target$'}\n")
    r = run("--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(x["pid"], x["target"]) for x in doc["processes"]] == [(child.pid, "mine")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  - name: x\n    match: {comm: '(('}\n")
    r = run("--config", str(bad))
    assert (
        r.returncode == 2 and f"{bad}:3: targets[0].match.comm: bad regular expression" in r.stderr
    )


def test_system_section_matches_procfs():
    r = run("--pid", "999999999", "--system", "--json")
    doc = json.loads(r.stdout)
    zones = doc["system"]["zones"]
    with open("/proc/buddyinfo") as f:
        names = [line.split()[3] for line in f]
    assert [z["zone"] for z in zones] == names
    assert all(0.0 <= x <= 1.0 for z in zones for x in z["unusable_index"])
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        assert f"[{doc['system']['thp']['enabled']}]" in f.read()


@pytest.mark.parametrize("watch", [(), ("--watch", "0.1")])
def test_report_into_a_pipe_whose_reader_left_exits_quietly(watch):
    """`memdefragd report | head`: head exits, the next write meets a closed pipe."""
    r, w = os.pipe()
    os.close(r)  # a reader that has gone already: the first write fails, every time
    try:
        p = subprocess.run(
            [sys.executable, "-m", "memdefragd.cli", "report", "--pid", str(os.getpid()), *watch],
            stdout=w, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (1, "")
