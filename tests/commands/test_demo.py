"""`memdefragd demo`: its pure pieces, the simulated story, and the real one on this kernel
(a 64 MiB heap: seconds), including that the workload never outlives the command."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from memdefragd.cli import build_parser
from memdefragd.cli import main as cli_main
from memdefragd.commands import demo
from memdefragd.config import parse_config
from memdefragd.model import PMD_PAGES, PMD_SIZE, Vma
from memdefragd.pipeline.scan import VmaReport
from memdefragd.pipeline.score import VmaMetrics, contiguity, histogram
from tests.kernel.helpers import require_kernel
from tests.paths import REPO

MiB = 1 << 20
BASE = 0x7F0000000000


def heap(cells: str, runs: list[int] | None = None) -> demo.HeapMap:
    lengths = np.array(runs or [1], dtype=np.int64)
    return demo.HeapMap(cells, int(lengths.sum()), contiguity(lengths), histogram(lengths))


# ---------------------------------------------------------------- pure pieces


def test_heap_map_marks_huge_small_and_sparse_regions_in_address_order():
    first = BASE >> 12
    vma = Vma(BASE, BASE + 4 * PMD_SIZE, "rw-p", 0, "00:00", 0, "")
    metrics = VmaMetrics(
        present_pages=3 * PMD_PAGES, thp_pages=PMD_PAGES, aligned_regions=4, thp_regions=1,
        collapsible_regions=2, aligned_contiguous_regions=0, contiguity=None, run_hist=None,
        collapsible_vpns=np.array([first, first + 3 * PMD_PAGES]),
        thp_vpns=np.array([first + PMD_PAGES]),
    )  # fmt: skip
    m = demo.heap_map(VmaReport(vma, metrics))
    assert m.cells == ".#-."
    assert m.huge_share == 0.25
    assert demo.huge_count(m) == "1 of 4 regions huge"


def test_text_picture_wraps_rows_led_by_their_offset():
    rows = demo.text_picture("#" * 64 + "." * 6)
    assert rows == ["       0 MiB  " + "#" * 64, "     128 MiB  ......"]


def test_legend_names_sparse_regions_only_when_there_are_some():
    assert demo.legend("#.") == "# huge page, . 4 KiB pages"
    assert "- too few pages to collapse" in demo.legend("#-")


def test_speedup_is_before_over_after():
    assert demo.speedup(30.0, 20.0) == 1.5
    assert demo.speedup(30.0, 0.0) == float("inf")
    assert demo.speedup_line(30.0, 20.0, measured=True) == "speedup: 1.50x"
    assert demo.speedup_line(30.0, 20.0, measured=False) == "speedup: 1.50x (modelled)"


def test_latency_lines_say_whether_measured_or_modelled():
    assert demo.latency_line("before", 30.04, True) == (
        "latency before: 30.0 ns per random read (measured by the workload)"
    )
    assert "MODELLED, not measured" in demo.latency_line("after", 20.0, False)


def test_the_model_charges_a_walk_per_miss_and_none_once_the_tlb_covers_the_heap():
    gib = 1 << 30
    small = demo.modelled_ns(0.0, gib)
    assert small == pytest.approx(demo.READ_NS + demo.WALK_NS * (1 - 1536 * 4096 / gib))
    assert demo.modelled_ns(1.0, gib) == demo.READ_NS  # 512 huge pages: all in the TLB
    shares = [demo.modelled_ns(s, gib) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert shares == sorted(shares, reverse=True)
    assert demo.modelled_ns(0.0, 4 << 20) == demo.READ_NS  # a heap the TLB covers anyway


def test_share_in_long_runs_counts_pages_not_runs():
    hist = histogram(np.array([1] * 512 + [512, 1024]))
    assert demo.share_in_long_runs(hist) == pytest.approx(1536 / 2048)
    assert demo.share_in_long_runs(None) is None


def test_runs_table_before_and_after():
    rows = demo.runs_table(heap("..", [1] * 1024), heap("##", [512, 512]))
    text = "\n".join(rows)
    assert re.search(r"runs\s+1024\s+2$", text, re.M)
    assert re.search(r"largest run\s+1 pages\s+2.0 MiB$", text, re.M)
    assert re.search(r"pages in runs >= 2 MiB\s+0.0%\s+100.0%$", text, re.M)
    hidden = demo.HeapMap("..", 1024, None, None)
    assert "not visible" in demo.runs_table(hidden, hidden)[0]


def test_daemon_line_says_why_it_stopped_unless_done():
    before, after = heap("...."), heap("###.")
    assert demo.daemon_line(before, after, 2.04, demo.DONE) == (
        "daemon: 0 -> 3 of 4 2 MiB regions huge, in 2.0 s"
    )
    assert demo.daemon_line(before, after, 2.0, "--timeout 2 s").endswith(
        " (stopped: --timeout 2 s)"
    )


def test_heap_pictures_show_both_maps_then_the_runs():
    lines = demo.heap_pictures(heap("..", [1] * 1024), heap("##", [1024]))
    assert lines[:5] == [
        "the heap, one character per 2 MiB region (# huge page, . 4 KiB pages):",
        " before: 0 of 2 regions huge",
        "       0 MiB  ..",
        " after: 2 of 2 regions huge",
        "       0 MiB  ##",
    ]
    assert lines[5].split() == ["physical", "runs", "before", "after"]


def test_svg_picture_is_xml_with_one_square_per_region_coloured_by_kind():
    before, after = heap("." * 70 + "-"), heap("#" * 70 + "-")
    svg = demo.svg_picture(before, after, "a <title> & more", ["latency before: 1 ns"])
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    fills = [r.get("fill") for r in root.iter(f"{ns}rect")]
    colours = demo.SVG_COLOURS
    assert fills.count(colours["#"]) == 70 + 1  # the after panel, and the legend
    assert fills.count(colours["."]) == 70 + 1
    assert fills.count(colours["-"]) == 2 + 1
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "a <title> & more" in texts and "latency before: 1 ns" in texts
    assert "after: 70 of 71 regions huge" in texts


def test_progress_text_says_100_percent_only_when_all_is_huge():
    assert " 99% of the heap huge" in demo.progress_text(1023 * MiB, 1024 * MiB, 1.0)
    line = demo.progress_text(64 * MiB, 64 * MiB, 2.5, paused="pressure")
    assert "100% of the heap huge (64.0 MiB), 2.5 s, paused: pressure" in line


def test_stop_reasons_in_order():
    assert demo.stop_reason(64, 64, 0, 0, 0, 10) == demo.DONE
    assert demo.stop_reason(0, 64, demo.IDLE, 0, 0, 10) == "the daemon has nothing left to do"
    assert demo.stop_reason(0, 64, 0, demo.STALL, 0, 10).startswith("no progress")
    assert demo.stop_reason(0, 64, 0, 0, 10, 10) == "--timeout 10 s"
    assert demo.stop_reason(0, 64, 0.5, 1, 1, 10) is None


def test_memory_shortfall():
    assert demo.memory_shortfall(1 << 30, 4 << 30) is None
    assert demo.memory_shortfall(1 << 30, None) is None
    assert "try a smaller --size" in demo.memory_shortfall(1 << 30, 1 << 30)


def test_live_line_off_a_terminal_prints_a_line_per_quarter(tmp_path):
    with open(tmp_path / "err", "w+") as stream:
        show = demo.LiveLine(stream)
        for huge in (0, 1, 2, 20, 33, 34, 64, 64):
            show(huge * MiB, 64 * MiB, 0.0)
        show.end()
        stream.seek(0)
        percents = re.findall(r"(\d+)% of the heap", stream.read())
    assert percents == ["0", "31", "51", "100"]


def test_the_configs_are_valid_and_target_only_the_workload():
    kernel = parse_config(demo.demo_config(64 * MiB, 0.5, pid=4242), "<demo>")
    (target,) = kernel.targets
    assert kernel.daemon.backend == "kernel" and kernel.daemon.duty_cycle == 0.5
    assert kernel.daemon.latency_sensitive and kernel.daemon.metrics_listen is None
    assert target.match.pids == frozenset({4242})
    sim = parse_config(demo.demo_config(64 * MiB, 0.25, sim_memory=256 * MiB), "<demo>")
    assert sim.daemon.backend == "simulated" and sim.daemon.simulated.memory == 256 * MiB
    (proc,) = sim.daemon.simulated.processes
    assert (proc.comm, proc.heap) == (demo.COMM, 64 * MiB)


def test_options_round_the_size_up_and_read_the_duty_as_the_config_does():
    args = build_parser().parse_args(["demo", "--size", "3MiB", "--duty", "25%"])
    assert args.size == 4 * MiB and args.duty == 0.25
    assert build_parser().parse_args(["demo"]).size == demo.DEFAULT_SIZE
    for bad in (["--size", "1MiB"], ["--size", "lots"], ["--duty", "0"], ["--duty", "150%"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", *bad])


# ---------------------------------------------------------------- the simulated story


def test_simulated_story_is_labelled_modelled_and_ends_mostly_huge(tmp_path, capsys):
    svg = tmp_path / "heap.svg"
    argv = ["demo", "--backend", "simulated", "--size", "64MiB", "--picture", str(svg)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "(simulated backend" in out
    assert re.search(r"^latency before: [\d.]+ ns per random read \(MODELLED, not measured\)$",
                     out, re.M)  # fmt: skip
    assert re.search(r"^latency after:  [\d.]+ ns per random read \(MODELLED, not measured\)$",
                     out, re.M)  # fmt: skip
    assert re.search(r"^speedup: [\d.]+x \(modelled\)$", out, re.M)
    huge = int(re.search(r"^ after: (\d+) of 32 regions huge$", out, re.M)[1])
    assert huge >= 29
    assert svg.exists() and "simulated" in svg.read_text()


def test_without_collapse_it_says_why_and_falls_back_to_the_simulator(monkeypatch, capsys):
    monkeypatch.setattr(demo, "why_not_kernel", lambda: "not root: reasons")
    assert cli_main(["demo", "--size", "16MiB"]) == 0
    captured = capsys.readouterr()
    first = captured.err.splitlines()[0]
    assert first == (
        "memdefragd demo: not root: reasons; telling the story on the simulated backend instead"
    )
    assert "MODELLED" in captured.out


def test_asking_for_the_kernel_where_it_cannot_collapse_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(demo, "why_not_kernel", lambda: "no MADV_COLLAPSE")
    assert cli_main(["demo", "--backend", "kernel"]) == 2
    assert capsys.readouterr().err == "memdefragd demo: no MADV_COLLAPSE\n"


def test_a_picture_nobody_can_write_is_refused_first(tmp_path, capsys):
    assert cli_main(["demo", "--picture", str(tmp_path / "no" / "such.svg")]) == 2
    assert "--picture: cannot write into" in capsys.readouterr().err


# ---------------------------------------------------------------- the real kernel


def workload_pid(line: str) -> int:
    m = re.search(r" in pid (\d+), read at random$", line)
    assert m, line
    return int(m[1])


def gone(pid: int, timeout: float = 10.0) -> bool:
    """The workload is no more: its pid is free, or taken by something else."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        if b"demo_workload" not in cmdline:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _sigint_default() -> None:
    # A run started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then keeps ignoring it (as nohup'd programs should): give the demo Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "memdefragd.cli", "demo", "--backend", "kernel", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_default,
    )  # fmt: skip


@pytest.fixture
def kernel_collapses():
    why = demo.why_not_kernel()
    require_kernel(why is None, f"the demo cannot collapse here: {why}")


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_real_story_measures_latency_and_leaves_the_heap_huge(kernel_collapses, tmp_path):
    svg = tmp_path / "heap.svg"
    p = start_demo("--size", "64MiB", "--picture", str(svg))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    pid = workload_pid(out.splitlines()[0])
    assert re.search(r"^latency before: [\d.]+ ns per random read \(measured by the workload\)$",
                     out, re.M)  # fmt: skip
    assert re.search(r"^latency after:  [\d.]+ ns per random read \(measured by the workload\)$",
                     out, re.M)  # fmt: skip
    assert re.search(r"^speedup: [\d.]+x$", out, re.M)
    assert "MODELLED" not in out
    before = int(re.search(r"^ before: (\d+) of 32 regions huge$", out, re.M)[1])
    after = int(re.search(r"^ after: (\d+) of 32 regions huge$", out, re.M)[1])
    assert before == 0 and after >= 29  # faulted in as 4 KiB pages, collapsed by the daemon
    rows = out.split("\n after: ")[1].splitlines()[1]
    assert rows.count("#") == after
    assert re.search(r"pages in runs >= 2 MiB\s+[\d.]+%\s+(9\d|100)\.\d%$", out, re.M)
    assert "% of the heap huge" in err  # the progress line
    root = ET.fromstring(svg.read_text())
    fills = [r.get("fill") for r in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert fills.count(demo.SVG_COLOURS["#"]) == after + 1  # + the legend's square
    assert gone(pid, timeout=0)


@pytest.mark.kernel
@pytest.mark.needs_collapse
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_the_daemon_and_kills_the_workload(kernel_collapses, sig):
    p = start_demo("--size", "64MiB", "--duty", "1%")  # paced slowly: still at work
    try:
        pid = workload_pid(p.stdout.readline())
        assert p.stdout.readline().startswith("latency before: ")
        assert p.stdout.readline().startswith("running the daemon")
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 130
    assert "interrupted; the workload is stopped" in err
    assert "Traceback" not in err
    assert gone(pid, timeout=0)


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_the_workload_dies_with_a_killed_demo(kernel_collapses):
    p = start_demo("--size", "64MiB", "--duty", "1%")
    try:
        pid = workload_pid(p.stdout.readline())
        p.kill()  # no cleanup can run: PR_SET_PDEATHSIG must do it
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
    assert gone(pid)


@pytest.mark.kernel
@pytest.mark.needs_collapse
def test_an_error_in_the_story_kills_the_workload(kernel_collapses, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("the daemon broke")

    monkeypatch.setattr(demo, "run_daemon", broken)
    assert cli_main(["demo", "--backend", "kernel", "--size", "16MiB"]) == 1
    captured = capsys.readouterr()
    assert captured.err.endswith("memdefragd demo: the daemon broke\n")
    assert gone(workload_pid(captured.out.splitlines()[0]), timeout=0)
