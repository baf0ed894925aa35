"""The report over a stand-in backend: skips, blanks where PFNs are hidden, JSON schema."""

from __future__ import annotations

import json
import re
from types import MappingProxyType

import numpy as np

from memdefragd.commands.report import render_text, to_json
from memdefragd.model import (
    AccessDenied,
    Layout,
    MemoryState,
    PfnVisibility,
    ProcessGone,
    ProcessInfo,
    Vma,
    ZoneFree,
)
from memdefragd.pipeline.scan import build_report
from tests.paths import REPO

MiB = 1 << 20
BASE = 0x7F0000000000


class StandInBackend:
    """Three processes: one with an 8 MiB VMA (half THP), one that exits, one refused."""

    name = "stand-in"

    def __init__(self, pfn_visible: bool = True):
        self.visible = pfn_visible

    def proc(self, pid: int, comm: str) -> ProcessInfo:
        return ProcessInfo(pid, comm, (comm,), f"/usr/bin/{comm}", 0, "/", 1, 8 * MiB)

    def list_processes(self) -> list[ProcessInfo]:
        return [self.proc(10, "ok"), self.proc(11, "gone"), self.proc(12, "secret")]

    def process(self, pid: int) -> ProcessInfo:
        return next(p for p in self.list_processes() if p.pid == pid)

    def list_vmas(self, proc: ProcessInfo, *, detail: bool = True) -> list[Vma]:
        if proc.comm == "gone":
            raise ProcessGone("pid 11: smaps: process exited")
        if proc.comm == "secret":
            raise AccessDenied("pid 12: smaps: Permission denied")
        fields = MappingProxyType({"Rss": 8 * MiB, "AnonHugePages": 4 * MiB})
        return [
            Vma(BASE, BASE + 8 * MiB, "rw-p", 0, "00:00", 0, "", fields, frozenset({"rd"})),
            Vma(BASE + 9 * MiB, BASE + 10 * MiB, "r--p", 0, "00:00", 0, "[anon:x]"),
        ]

    def read_layout(self, proc: ProcessInfo, vma: Vma) -> Layout:
        n = vma.size >> 12
        vpn = np.arange(vma.start >> 12, (vma.start >> 12) + n, dtype=np.uint64)
        pfn = np.arange(0x100000, 0x100000 + n, dtype=np.uint64)  # one contiguous run
        thp = np.zeros(n, dtype=bool)
        thp[: n // 2] = True
        shown = pfn if self.visible else np.zeros(n, dtype=np.uint64)
        return Layout(vma.start >> 12, vma.end >> 12, vpn, shown, thp, self.visible)

    def iter_layouts(self, proc: ProcessInfo, vmas: list[Vma]):
        for i, v in enumerate(vmas):
            yield i, self.read_layout(proc, v)

    def memory_state(self) -> MemoryState:
        return MemoryState(
            zones=(ZoneFree(0, "Normal", (4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0)),),
            pagetype_free=None,
            vmstat=MappingProxyType({"thp_collapse_alloc": 3}),
            thp=MappingProxyType({"enabled": "madvise"}),
            khugepaged=MappingProxyType({"max_ptes_none": "511"}),
            pressure_some=None,
            pressure_full=None,
        )

    def pfn_visibility(self) -> PfnVisibility:
        if self.visible:
            return PfnVisibility(True)
        return PfnVisibility(False, "no CAP_SYS_ADMIN: the kernel zeroes page frame numbers")


def report_for(visible: bool = True, system: bool = False):
    b = StandInBackend(visible)
    return build_report(b, [(p, "t") for p in b.list_processes()], system=system)


def test_vanished_and_refused_processes_are_skipped_with_reasons():
    rep = report_for()
    assert [p.proc.pid for p in rep.processes] == [10]
    assert [(s.pid, s.reason) for s in rep.skipped] == [(11, "exited"), (12, "access_denied")]
    text = render_text(rep)
    assert "Skipped 2 process(es):" in text
    assert "exited: pid 11: smaps: process exited" in text
    assert "access_denied: pid 12: smaps: Permission denied" in text


def test_figures_in_json():
    doc = to_json(report_for())
    (p,) = doc["processes"]
    assert p["empty_vmas"] == 1  # the Rss-0 VMA was not read
    (v,) = p["vmas"]
    assert v["start"] == f"0x{BASE:x}" and v["size_bytes"] == 8 * MiB
    assert v["thp_bytes"] == 4 * MiB == v["smaps_pmd_mapped_bytes"]
    assert v["thp_coverage_ratio"] == 0.5
    assert v["collapsible_regions"] == 2
    assert v["aligned_contiguous_regions"] == 2
    assert v["contiguity"] == {
        "runs": 1,
        "largest_run_pages": 2048,
        "mean_run_pages": 2048.0,
        "coverage_ratio": {"32": 1.0, "128": 1.0},
        "runs_for": {"0.9": 1, "0.99": 1},
    }
    assert p["totals"]["present_bytes"] == 8 * MiB
    assert doc["pfn_visible"] is True and doc["pfn_unavailable_reason"] is None


def test_hidden_pfns_blank_the_contiguity_figures():
    rep = report_for(visible=False)
    doc = to_json(rep)
    v = doc["processes"][0]["vmas"][0]
    assert v["contiguity"] is None and v["aligned_contiguous_regions"] is None
    assert v["thp_bytes"] == 4 * MiB  # what does not need PFNs is still there
    assert doc["pfn_visible"] is False and "CAP_SYS_ADMIN" in doc["pfn_unavailable_reason"]
    text = render_text(rep)
    assert "PFNs unavailable: no CAP_SYS_ADMIN" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("7f0000000000"))
    # SIZE RSS THP THP% COLLAPS, then nothing until the path: no figure computed from zeros.
    assert re.search(r"8\.0 MiB\s+8\.0 MiB\s+4\.0 MiB\s+50%\s+2\s+\[anon\]$", row), row


def test_system_section():
    rep = report_for(system=True)
    doc = to_json(rep)
    (z,) = doc["system"]["zones"]
    assert z["free_pages"] == 4 + 512
    assert z["unusable_index"][9] == round(4 / 516, 6) and z["unusable_index"][10] == 1.0
    text = render_text(rep)
    assert "node0 Normal" in text and "thp_collapse_alloc=3" in text


DATA_KEYED = ("coverage_ratio", "runs_for", "system.thp", "system.khugepaged", "system.vmstat")


def _keys(obj, prefix=""):
    """Every key path in a JSON document; list items and map keys that are data collapse."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = "*" if prefix.endswith(DATA_KEYED) else k
            path = f"{prefix}.{name}" if prefix else name
            out.add(path)
            out |= _keys(v, path)
    elif isinstance(obj, list):
        for v in obj:
            out |= _keys(v, prefix + "[]")
    return out


def test_documented_schema_matches_output():
    """docs/report-json.md's example must have exactly the keys the report emits."""
    doc = (REPO / "docs" / "report-json.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", doc, re.S)[1])
    emitted = to_json(report_for(system=True))
    emitted["skipped"] = emitted["skipped"][:1]
    psi = {"avg10": 0.0, "avg60": 0.0, "avg300": 0.0, "total_us": 0}
    emitted["system"]["pressure"] = {"some": psi, "full": psi}
    emitted["system"]["pagetype_free"] = [{"node": 0, "zone": "N", "type": "M", "free_blocks": []}]
    assert _keys(example) == _keys(emitted)
    assert example["schema"] == emitted["schema"]
