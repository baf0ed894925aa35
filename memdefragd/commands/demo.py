"""`memdefragd demo`: the daemon's whole story on one process, in under a minute.

A workload child (demo_workload.py) maps a heap of 4 KiB pages and reads it at random,
timing its own reads. The demo prints that latency, runs the real daemon (daemon/loop.py)
on a config made for that one process while a line on stderr shows the heap's THP
coverage rising, prints the latency again and the speedup, and draws the heap before and
after: which 2 MiB regions are huge and how long its physically contiguous runs are (the
per-VMA scan `report` uses, pipeline/scan.py).

Where this machine cannot collapse another process's memory (no CAP_SYS_NICE, no
MADV_COLLAPSE), it says why in one line and tells the same story on the simulated backend:
the same daemon on a simulated machine aged as `simulate` ages one, with latencies
modelled from the heap's THP coverage and labelled so.

Pure pieces (the picture, the statistics, the model, the config) are separate from the
I/O at the bottom, so they test without a kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from xml.sax.saxutils import escape

import numpy as np

from ..backends import open_backend
from ..backends.protocol import Backend
from ..config import Config, ConfigError, parse_config
from ..config.kinds import Share
from ..config.walk import read_text
from ..model import PAGE_SHIFT, PAGE_SIZE, PMD_PAGES, PMD_SIZE, ProcessInfo
from ..pipeline.scan import VmaReport, scan_process
from ..pipeline.score import Contiguity, RunHistogram, aligned_bounds
from ..units import format_size, parse_size
from .common import Subparsers, positive_arg

if TYPE_CHECKING:  # the daemon is imported when the demo runs, not with the CLI
    from ..daemon.loop import Daemon

DEFAULT_SIZE = 1 << 30
DEFAULT_DUTY = 0.5
DEFAULT_TIMEOUT = 120.0
COMM = "memdefragd-demo"  # the simulated process's name (15 characters, as comm allows)
HUGE, SMALL, SPARSE = "#", ".", "-"
WIDTH = 64  # regions per row of the text picture: 128 MiB
POLL = 0.25  # seconds between readings of the heap's coverage
MIN_AVAILABLE = 1 << 30  # daemon.pressure.min_available's default, kept by the demo
STALL = 20.0  # seconds without progress that mean it is stuck (ENOMEM backoff, say)
DONE = "done"
IDLE = 1.0  # seconds of an empty queue after a scan that mean the daemon has finished

# The latency model of the simulated story: a random read costs READ_NS, plus WALK_NS when
# its translation misses a TLB of TLB_ENTRIES entries (shared by both page sizes). The
# figures are this project's measured demo on its Linux 6.18 VM (1 GiB: 30.5 ns a read on
# 4 KiB pages, 20 ns on 2 MiB pages), not this machine's.
TLB_ENTRIES = 1536
READ_NS = 20.0
WALK_NS = 10.5


# ---------------------------------------------------------------- pure: figures


@dataclass(frozen=True, slots=True)
class HeapMap:
    """The heap as one scan saw it: a character per 2 MiB region, and its physical runs."""

    cells: str  # HUGE, SMALL (4 KiB pages, collapsible) or SPARSE, in address order
    present_pages: int
    contiguity: Contiguity | None  # None: frame numbers not visible
    run_hist: RunHistogram | None

    @property
    def huge_share(self) -> float:
        return self.cells.count(HUGE) / len(self.cells) if self.cells else 0.0


def heap_map(report: VmaReport) -> HeapMap:
    """The heap's regions from a scan made with ``collect`` (which lists huge and
    collapsible regions by their first page)."""
    m = report.metrics
    first, last = aligned_bounds(report.vma.start >> PAGE_SHIFT, report.vma.end >> PAGE_SHIFT)
    regions = np.arange(first, last, PMD_PAGES)
    cells = np.full(regions.size, SPARSE)
    for vpns, mark in ((m.collapsible_vpns, SMALL), (m.thp_vpns, HUGE)):
        if vpns is not None:
            cells[np.isin(regions, vpns)] = mark
    return HeapMap("".join(cells), m.present_pages, m.contiguity, m.run_hist)


def huge_count(m: HeapMap) -> str:
    return f"{m.cells.count(HUGE)} of {len(m.cells)} regions huge"


def speedup(before_ns: float, after_ns: float) -> float:
    """How many times faster a read got (>1: faster after)."""
    return before_ns / after_ns if after_ns > 0 else math.inf


def modelled_ns(huge_share: float, heap_bytes: int) -> float:
    """ns per random read over a heap with this share huge, by the TLB model above. Each
    part (huge, small) holds entries in proportion to the reads it takes, so within a part
    a read misses with probability 1 - entries x page size / heap size."""

    def miss(page: int) -> float:
        return max(0.0, 1.0 - TLB_ENTRIES * page / heap_bytes)

    share = min(max(huge_share, 0.0), 1.0)
    return READ_NS + WALK_NS * ((1.0 - share) * miss(PAGE_SIZE) + share * miss(PMD_SIZE))


def share_in_long_runs(hist: RunHistogram | None, pages: int = PMD_PAGES) -> float | None:
    """Share of present pages in physical runs of at least ``pages`` (2 MiB by default)."""
    if hist is None or not hist[0].size:
        return None
    lengths, counts = hist
    every = lengths * counts
    return float(every[lengths >= pages].sum() / every.sum())


def latency_line(when: str, ns: float, measured: bool) -> str:
    how = "measured by the workload" if measured else "MODELLED, not measured"
    return f"latency {when + ':':<7} {ns:.1f} ns per random read ({how})"


def speedup_line(before_ns: float, after_ns: float, measured: bool) -> str:
    return f"speedup: {speedup(before_ns, after_ns):.2f}x{'' if measured else ' (modelled)'}"


def progress_text(huge: int, size: int, seconds: float, paused: str | None = None) -> str:
    """The live line: the heap's THP coverage and how long the daemon has run."""
    share = huge / size if size else 0.0
    bar = "#" * int(share * 30)
    pct = math.floor(share * 100)  # 100% only when it is all huge
    line = f"[{bar:<30}] {pct:3d}% of the heap huge ({format_size(huge)}), {seconds:.1f} s"
    return line + (f", paused: {paused}" if paused else "")


# ---------------------------------------------------------------- pure: pictures


def text_picture(cells: str, width: int = WIDTH) -> list[str]:
    """Rows of ``width`` regions, each led by its offset into the heap."""
    step = width * PMD_SIZE >> 20
    return [
        f"  {i // width * step:>6} MiB  {cells[i : i + width]}" for i in range(0, len(cells), width)
    ]


def legend(cells: str) -> str:
    marks = [(HUGE, "huge page"), (SMALL, "4 KiB pages"), (SPARSE, "too few pages to collapse")]
    return ", ".join(f"{c} {what}" for c, what in marks if c in cells or c != SPARSE)


def daemon_line(before: HeapMap, after: HeapMap, seconds: float, why: str) -> str:
    stopped = "" if why == DONE else f" (stopped: {why})"
    return (
        f"daemon: {before.cells.count(HUGE)} -> {after.cells.count(HUGE)} of "
        f"{len(after.cells)} 2 MiB regions huge, in {seconds:.1f} s{stopped}"
    )


def heap_pictures(before: HeapMap, after: HeapMap) -> list[str]:
    """Both maps as text, then the table of their physical runs."""
    out = [f"the heap, one character per 2 MiB region ({legend(before.cells + after.cells)}):"]
    for name, m in (("before", before), ("after", after)):
        out += [f" {name}: {huge_count(m)}", *text_picture(m.cells)]
    return out + runs_table(before, after)


def runs_table(before: HeapMap, after: HeapMap) -> list[str]:
    """Before/after figures of the heap's physical runs (pagemap: pages whose virtual and
    physical addresses both step by one)."""
    if before.contiguity is None or after.contiguity is None:
        return ["  physical runs: not visible (frame numbers need CAP_SYS_ADMIN)"]
    b, a = before.contiguity, after.contiguity
    rows = [
        ("runs", str(b.runs), str(a.runs)),
        ("largest run", _pages(b.largest_run), _pages(a.largest_run)),
        ("mean run", _pages(b.mean_run, 1), _pages(a.mean_run, 1)),
        ("pages in runs >= 2 MiB", _share(before.run_hist), _share(after.run_hist)),
        ("runs for 90% of pages", str(b.runs_for.get(0.9, "-")), str(a.runs_for.get(0.9, "-"))),
    ]
    head = f"  {'physical runs':<26}{'before':>14}{'after':>14}"
    return [head, *(f"  {name:<26}{x:>14}{y:>14}" for name, x, y in rows)]


def _pages(n: float, digits: int = 0) -> str:
    return f"{n:.{digits}f} pages" if n < PMD_PAGES else format_size(n * PAGE_SIZE)


def _share(hist: RunHistogram | None) -> str:
    share = share_in_long_runs(hist)
    return "-" if share is None else f"{share:.1%}"


SVG_COLOURS = {HUGE: "#2a9d8f", SMALL: "#e9c46a", SPARSE: "#dddddd"}
CELL = 8  # pixels per region


def svg_picture(
    before: HeapMap, after: HeapMap, title: str, notes: Sequence[str] = (), width: int = WIDTH
) -> str:
    """Both maps as one SVG: a square per 2 MiB region, coloured by what it is, then
    ``notes`` (the figures printed with them) in a fixed-width font."""
    rows = -(-max(len(before.cells), 1) // width)
    panel = rows * CELL + 24
    w, h = max(width * CELL + 20, 440), 2 * panel + 60 + 15 * len(notes)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="16">{escape(title)}</text>',
    ]
    for n, (name, m) in enumerate((("before", before), ("after", after))):
        y0 = 28 + n * panel
        huge = f"{name}: {huge_count(m)}"
        parts.append(f'<text x="10" y="{y0 + 12}">{huge}</text>')
        parts += _cells(m.cells, 10, y0 + 18, width)
    parts.append(_svg_legend(10, 2 * panel + 46))
    parts += [
        f'<text x="10" y="{2 * panel + 70 + 15 * i}" font-family="monospace" '
        f'xml:space="preserve">{escape(line)}</text>'
        for i, line in enumerate(notes)
    ]
    return "\n".join([*parts, "</svg>"]) + "\n"


def _cells(cells: str, x0: int, y0: int, width: int) -> list[str]:
    return [
        f'<rect x="{x0 + i % width * CELL}" y="{y0 + i // width * CELL}" width="{CELL - 1}" '
        f'height="{CELL - 1}" fill="{SVG_COLOURS[c]}"/>'
        for i, c in enumerate(cells)
    ]


def _svg_legend(x: int, y: int) -> str:
    items = ((HUGE, "huge page"), (SMALL, "4 KiB pages"), (SPARSE, "too few pages"))
    out = []
    for i, (c, what) in enumerate(items):
        out.append(f'<rect x="{x + i * 130}" y="{y - 9}" width="9" height="9" '
                   f'fill="{SVG_COLOURS[c]}"/>')  # fmt: skip
        out.append(f'<text x="{x + i * 130 + 13}" y="{y}">{what}</text>')
    return "\n".join(out)


# ---------------------------------------------------------------- pure: the config


def demo_config(size: int, duty: float, *, pid: int | None = None, sim_memory: int = 0) -> str:
    """The daemon's config for the demo: one target (the workload's pid, or on the
    simulated machine its comm), paced at ``duty``, budgets that leave pacing in charge,
    no access window (every region of a heap read at random is as hot as the next), no
    metrics endpoint."""
    daemon = {
        "scan_interval": "10s",
        "budget": {"bytes_per_second": "8GiB", "cpu_share": duty},
        "pacing": {"latency_sensitive": True, "duty_cycle": duty},
        "access": {"source": "off"},
        "metrics": {"listen": "off"},
        "backoff": {"initial": "1s", "max": "8s"},
        "compaction": {"enabled": True, "min_interval": "1s"},
    }
    match: dict[str, object] = {"pid": pid} if pid is not None else {"comm": f"^{COMM}$"}
    if pid is None:
        daemon["backend"] = "simulated"
        daemon["simulated"] = {
            "memory": sim_memory,
            "processes": [{"comm": COMM, "heap": size}],
        }
        # a small simulated machine has less than the default 1 GiB available, by design
        daemon["pressure"] = {"min_available": 0}
    doc = {"daemon": daemon, "targets": [{"name": "demo", "match": match}]}
    return json.dumps(doc, indent=1)  # JSON is YAML


def sim_memory_for(size: int) -> int:
    """A simulated machine four times the heap (aging keeps a quarter free and fills the
    rest with page cache), at least the smallest one the config allows."""
    return max(64 << 20, 4 * size)


def memory_shortfall(size: int, available: int | None) -> str | None:
    """Why a heap of ``size`` would not fit beside the daemon's pause threshold (it pauses
    while MemAvailable is under 1 GiB, its default); None when it fits or is unknown."""
    need = size + MIN_AVAILABLE
    if available is None or available >= need:
        return None
    return (
        f"not enough memory for a {format_size(size)} heap: {format_size(available)} "
        f"available, {format_size(need)} needed (the daemon pauses below "
        f"{format_size(MIN_AVAILABLE)}); try a smaller --size"
    )


def round_size(size: int) -> int:
    """The heap's size: whole 2 MiB regions, at least one."""
    return max(PMD_SIZE, -(-size // PMD_SIZE) * PMD_SIZE)


# ---------------------------------------------------------------- the workload


class Workload:
    """The workload child: started at once, always killed and reaped by ``close``."""

    def __init__(self, size: int):
        root = str(Path(__file__).resolve().parents[2])  # where `memdefragd` is
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "memdefragd.commands.demo_workload", str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        self.size = size
        self.addr = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def ready(self) -> int:
        """Wait until the heap is faulted in; its address."""
        self.addr = int(self._answer()["addr"])
        return self.addr

    def latency(self) -> float:
        """ns per random read, measured by the workload now."""
        assert self.popen.stdin is not None
        self.popen.stdin.write("latency\n")
        self.popen.stdin.flush()
        return float(self._answer()["ns"])

    def _answer(self) -> dict[str, float]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"the workload (pid {self.pid}) exited ({self.popen.wait()})")
        answer: dict[str, float] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


# ---------------------------------------------------------------- the two stages


@dataclass
class Stage:
    """What the story is told on: the machine, the process and its heap, and how the
    heap's latency is known."""

    config: Config
    scanner: Backend  # the demo's own scans
    daemon_backend: Backend  # the daemon's (it closes it when it stops)
    proc: ProcessInfo
    heap: int  # the heap's address
    size: int
    latency: Callable[[HeapMap], float]
    measured: bool


@contextlib.contextmanager
def kernel_stage(size: int, duty: float) -> Iterator[Stage]:
    """The real kernel and a real workload, killed on the way out whatever happens."""
    from ..backends.kernel.backend import KernelBackend

    scanner, daemon_backend = KernelBackend(), KernelBackend()
    short = memory_shortfall(size, scanner.pressure_state().meminfo.get("MemAvailable"))
    if short:
        raise RuntimeError(short)
    work = Workload(size)
    try:
        addr = work.ready()
        config = parse_config(demo_config(size, duty, pid=work.pid), "<demo>")
        yield Stage(
            config, scanner, daemon_backend, scanner.process(work.pid), addr, size,
            lambda heap: work.latency(), measured=True,
        )  # fmt: skip
    finally:
        work.close()
        scanner.close()
        daemon_backend.close()


@contextlib.contextmanager
def simulated_stage(size: int, duty: float) -> Iterator[Stage]:
    """A simulated machine aged with the workload's heap on it; latencies modelled."""
    text = demo_config(size, duty, sim_memory=sim_memory_for(size))
    config = parse_config(text, "<demo>")
    backend = open_backend(config.daemon)  # ages the machine: its heap is scattered
    proc = next(p for p in backend.list_processes() if p.comm == COMM)
    heap = next(v.start for v in backend.list_vmas(proc) if v.size >= size)
    yield Stage(
        config, backend, backend, proc, heap, size,
        lambda m: modelled_ns(m.huge_share, size), measured=False,
    )  # fmt: skip


def why_not_kernel() -> str | None:
    """Why this machine cannot collapse another process's memory; None if it can."""
    from ..backends.kernel.backend import KernelBackend
    from ..backends.kernel.privileges import CAP_SYS_NICE, has_capability

    backend = KernelBackend()
    try:
        refusal = backend.refusal("collapse")
    finally:
        backend.close()
    if refusal is not None:
        return refusal
    if not has_capability(CAP_SYS_NICE):
        return (
            "not root: process_madvise(MADV_COLLAPSE) on another process needs "
            "CAP_SYS_NICE (run it as root)"
        )
    return None


# ---------------------------------------------------------------- the story


def scan_heap(stage: Stage) -> HeapMap:
    state = stage.scanner.memory_state()
    report = scan_process(
        stage.scanner, stage.proc, collect=True, only=lambda v: v.start == stage.heap,
        max_ptes_none=state.max_ptes_none,
    )  # fmt: skip
    return heap_map(report.vmas[0])


def huge_bytes(stage: Stage) -> int:
    """AnonHugePages of the heap's VMA (smaps): cheap enough to read a few times a second."""
    vmas = stage.scanner.list_vmas(stage.proc)
    return next((v.anon_huge for v in vmas if v.start == stage.heap), 0)


def run_daemon(stage: Stage, timeout: float, show: LiveLine) -> tuple[float, str]:
    """The real daemon on the stage's config, in a thread, until `stop_reason` says; its
    running time and that reason. An interrupt stops it (at the next 2 MiB region) before
    it goes on."""
    from ..daemon.loop import Daemon

    daemon = Daemon(stage.config, backend=stage.daemon_backend, events=False)
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            daemon.run()
        except BaseException as e:  # handed to the main thread, which reports it
            failed.append(e)

    thread = threading.Thread(target=serve, name="memdefragd-demo-daemon", daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        why = _watch(stage, daemon, thread, timeout, show)
    finally:
        daemon.request_stop()
        thread.join()
    if failed:
        raise failed[0]
    return time.monotonic() - t0, why


def _watch(
    stage: Stage, daemon: Daemon, thread: threading.Thread, timeout: float, show: LiveLine
) -> str:  # fmt: skip
    """Show the heap's coverage until `stop_reason` gives one."""
    t0 = time.monotonic()
    best, progress_at, idle_since = -1, t0, None
    while thread.is_alive():
        now, huge = time.monotonic(), huge_bytes(stage)
        show(huge, stage.size, now - t0, daemon.paused)
        if huge > best:
            best, progress_at = huge, now
        idle = daemon.cycles >= 1 and not daemon.scheduler.queue_length
        idle_since = (idle_since or now) if idle else None
        why = stop_reason(
            huge, stage.size, 0.0 if idle_since is None else now - idle_since,
            now - progress_at, now - t0, timeout,
        )  # fmt: skip
        if why is not None:
            return why + (f", paused: {daemon.paused}" if daemon.paused else "")
        time.sleep(POLL)
    return "the daemon stopped"


def stop_reason(
    huge: int, size: int, idle: float, stalled: float, elapsed: float, timeout: float
) -> str | None:
    """Why the demo stops the daemon now (None: not yet): the whole heap huge, nothing
    left in its queue for IDLE seconds, no progress for STALL, or the timeout."""
    if huge >= size:
        return DONE
    if idle >= IDLE:
        return "the daemon has nothing left to do"
    if stalled >= STALL:
        return f"no progress for {STALL:g} s"
    if elapsed >= timeout:
        return f"--timeout {timeout:g} s"
    return None


class LiveLine:
    """The progress line on ``stream``: redrawn in place on a terminal; elsewhere (a pipe,
    a log) printed at each new quarter of coverage, so a log shows progress without a
    line per reading."""

    def __init__(self, stream: TextIO):
        self.stream, self.tty, self.quarter = stream, stream.isatty(), -1

    def __call__(self, huge: int, size: int, seconds: float, paused: str | None = None) -> None:
        text = progress_text(huge, size, seconds, paused)
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
            self.stream.flush()
        elif (quarter := 4 * huge // max(size, 1)) > self.quarter:
            self.quarter = quarter
            print(text, file=self.stream, flush=True)

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")


def tell(stage: Stage, args: argparse.Namespace, out: TextIO) -> int:
    """The story, printed as it happens: before, the daemon at work, after."""
    say = _printer(out)
    where = f"pid {stage.proc.pid}" if stage.measured else "a simulated machine's process"
    say(f"memdefragd demo: a {format_size(stage.size)} heap of 4 KiB pages in {where}, "
        "read at random")  # fmt: skip
    before = scan_heap(stage)
    lat0 = stage.latency(before)
    say(latency_line("before", lat0, stage.measured))
    say(f"running the daemon ({stage.daemon_backend.name} backend, paced at a duty cycle "
        f"of {args.duty:.0%}) ...")  # fmt: skip
    line = LiveLine(sys.stderr)
    seconds, why = run_daemon(stage, args.timeout, line)
    after = scan_heap(stage)
    line(after.cells.count(HUGE) * PMD_SIZE, stage.size, seconds)
    line.end()
    say(daemon_line(before, after, seconds, why))
    lat1 = stage.latency(after)
    figures = [latency_line(w, ns, stage.measured) for w, ns in (("before", lat0), ("after", lat1))]
    figures.append(speedup_line(lat0, lat1, stage.measured))
    for text in [*figures[1:], *heap_pictures(before, after)]:
        say(text)
    if args.picture:
        kind = "measured" if stage.measured else "simulated"
        title = f"memdefragd demo ({kind}): {format_size(stage.size)} heap, 2 MiB per square"
        notes = figures + runs_table(before, after)
        Path(args.picture).write_text(svg_picture(before, after, title, notes))
        say(f"picture: {args.picture}")
    return 0


def _printer(out: TextIO) -> Callable[[str], None]:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    return say


# ---------------------------------------------------------------- command line


def set_argparser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo",
        help="show the daemon at work: a workload's latency before and after, and its heap",
        description=(
            "Start a workload that faults in a heap of 4 KiB pages and reads it at random,\n"
            "timing its own reads; print that latency; run the daemon on that one process\n"
            "(its THP coverage shown live on stderr); print the latency again, the speedup,\n"
            "and a picture of the heap before and after: which 2 MiB regions are huge and\n"
            "how long its physically contiguous runs are. The workload is killed when the\n"
            "demo ends, however it ends.\n\n"
            "Needs root and MADV_COLLAPSE (Linux 6.1+). Without either, it says why and\n"
            "runs the same story on the simulated backend, its latencies modelled from THP\n"
            "coverage (labelled MODELLED), not measured."
        ),
        epilog=(
            "The daemon is the real one (`memdefragd run`'s), on a config made for the\n"
            "workload alone. It is paced as usual (one 2 MiB region per call, then a rest),\n"
            f"but at a duty cycle of {DEFAULT_DUTY:.0%} instead of 10%, since this is a demo: "
            "at 10%, 1 GiB\ntook 52 s on a VM where one collapse takes about 10 ms; at 50%, "
            "15 s. Budgets\nare raised so that pacing alone sets the pace; ENOMEM backs off "
            "for 1 s (not 5)\nand asks for compaction; regions are ranked by size alone "
            "(access.source off:\na heap read at random is equally hot throughout). The "
            "daemon is stopped once\nthe heap is all huge, its queue is empty, nothing has "
            f"changed for {STALL:g} s, or at\n--timeout."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size", type=_size_arg, default=DEFAULT_SIZE, metavar="SIZE",
        help="the heap, rounded up to 2 MiB (default 1GiB)",
    )  # fmt: skip
    p.add_argument(
        "--duty", type=_share_arg, default=DEFAULT_DUTY, metavar="SHARE",
        help=f"share of wall time spent collapsing (default {DEFAULT_DUTY:.0%}%)",
    )  # fmt: skip
    p.add_argument("--picture", metavar="FILE", help="also draw the heap before and after (SVG)")
    p.add_argument(
        "--backend", choices=["auto", "kernel", "simulated"], default="auto",
        help="auto (default): this kernel where it can collapse, else simulated",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=positive_arg, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"stop the daemon after this long, done or not (default {DEFAULT_TIMEOUT:g})",
    )  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="show the daemon's log on stderr")
    p.set_defaults(func=main)


def _size_arg(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not PMD_SIZE <= size <= 1 << 40:
        raise argparse.ArgumentTypeError("expected a size from 2MiB to 1TiB")
    return round_size(size)


def _share_arg(text: str) -> float:
    try:
        share: float = read_text(Share(), text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return share


def main(args: argparse.Namespace) -> int:
    folder = Path(args.picture).resolve().parent if args.picture else None
    if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
        # said now, not after the whole story has run
        print(f"memdefragd demo: --picture: cannot write into {folder}", file=sys.stderr)
        return 2
    kind = args.backend
    if kind != "simulated":
        why = why_not_kernel()
        if why is not None and kind == "kernel":
            print(f"memdefragd demo: {why}", file=sys.stderr)
            return 2
        if why is not None:
            print(f"memdefragd demo: {why}; telling the story on the simulated backend instead",
                  file=sys.stderr)  # fmt: skip
            kind = "simulated"
    if args.verbose:
        from ..daemon.logs import setup_logging

        setup_logging("info")
    stage = kernel_stage if kind != "simulated" else simulated_stage
    try:
        with _sigterm_exits(), stage(args.size, args.duty) as s:
            return tell(s, args, sys.stdout)
    except KeyboardInterrupt:
        print("\nmemdefragd demo: interrupted; the workload is stopped", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, ValueError, ConfigError) as e:
        print(f"memdefragd demo: {e}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (so the workload is killed on the way out), not a
    silent death; only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
