"""Shared pieces of the real-kernel tests: a child process with a known mapping (the program
is tools/child.py, shared with the benchmarks), the skip-or-fail rule, and brute-force
readers of /proc/PID/pagemap and /proc/kpageflags that share no code with memdefragd (so the
tests compare two independent computations).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tools.child import answer, readline, spawn

PAGE = 4096
PMD = 2 << 20
PMD_PAGES = PMD // PAGE
MiB = 1 << 20

MADV_DONTNEED = 4
MADV_DONTFORK = 10
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_COLLAPSE = 25

KPF_COMPOUND_HEAD = 1 << 15
KPF_THP = 1 << 22

REQUIRE_ENV = "MEMDEFRAGD_REQUIRE_KERNEL"


def require_kernel(condition: object, reason: str) -> None:
    """Skip when the kernel refuses what a test needs; fail instead under CI's variable."""
    if condition:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set and the kernel refused: {reason}", pytrace=False)
    pytest.skip(f"kernel refused: {reason}")


@dataclass
class Child:
    """A child started by the test (tools/child.py's mapping program), with the one VMA it
    mapped: [addr, addr + size)."""

    popen: subprocess.Popen
    size: int
    addr: int = 0
    collapse_errno: int = 0
    config: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def collapse_error(self) -> str:
        e = self.collapse_errno
        return f"{errno.errorcode.get(e, e)} ({os.strerror(e)})" if e else ""

    def verify(self, timeout: float = 120.0) -> dict:
        """Ask a child started with pattern=True to check its data: {"checked", "bad"}."""
        if not self.config.get("pattern"):
            raise ValueError("verify() needs a child started with pattern=True")
        return answer(self.popen, timeout, "verify")

    def unmap(self, timeout: float = 120.0) -> None:
        """Ask the child to MADV_DONTNEED its first page (its rss changes, no fault)."""
        assert answer(self.popen, timeout, "unmap") == {"ok": True}

    def remap(self, timeout: float = 120.0) -> float:
        """Ask the child to mmap and munmap a page (each takes its mmap_sem for writing):
        the seconds it took; TimeoutError if it did not answer in time (the lock is held:
        the child is then stuck, kill() it)."""
        ans = answer(self.popen, timeout, "remap")
        assert ans.get("ok") is True, ans
        return float(ans["seconds"])

    def fork(self, timeout: float = 120.0) -> int:
        """Ask a pattern=True, forkable=True child to fork a writer child and reap it: the
        pid of that (now gone) child."""
        if not (self.config.get("pattern") and self.config.get("forkable")):
            raise ValueError("fork() needs a child started with pattern=True, forkable=True")
        return int(answer(self.popen, timeout, "fork")["child"])

    def kill(self, reap: bool = True) -> None:
        """SIGKILL; with reap=False leave a zombie (waits until it is one, without reaping)."""
        if self.popen.returncode is not None:
            return
        os.kill(self.pid, signal.SIGKILL)
        if reap:
            self.popen.wait()
        else:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)

    def stop(self) -> None:
        """Teardown: close stdin, kill, reap. Safe to call twice."""
        if self.popen.stdin and not self.popen.stdin.closed:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait()
        if self.popen.stdout:
            self.popen.stdout.close()


def start_child(
    size: int,
    *,
    collapse: tuple[int, int] | None = None,
    touch: list[tuple[int, int]] | None = None,
    punch: list[tuple[int, int, int]] | None = None,
    advise: list[int] | None = None,
    split: list[int] | None = None,
    comm: str | None = None,
    pattern: bool = False,
    forkable: bool = False,
    guard: list[int] | None = None,
    hot: list[tuple[int, int, int]] | None = None,
    padding: int = 0,
    shuffle: int | None = None,
    timeout: float = 120.0,
) -> Child:
    """Start the child and wait for its JSON line (tools/child.py says what each argument
    does; `padding` lengthens its command line by that many bytes, which it ignores). The
    caller must stop() it."""
    if size % PMD:
        raise ValueError("size must be a multiple of 2 MiB")
    cfg: dict = {"size": size}
    if collapse is not None:
        cfg["collapse"] = list(collapse)
    if touch is not None:
        cfg["touch"] = [list(t) for t in touch]
    if punch:
        cfg["punch"] = [list(p) for p in punch]
    if advise:
        cfg["advise"] = list(advise)
    if split:
        cfg["split"] = list(split)
    if comm:
        cfg["comm"] = comm
    if pattern:
        cfg["pattern"] = True
    if forkable:
        cfg["forkable"] = True
    if guard:
        cfg["guard"] = list(guard)
    if hot:
        cfg["hot"] = [list(h) for h in hot]
    if padding:
        cfg["padding"] = "." * padding
    if shuffle is not None:
        cfg["shuffle"] = shuffle
    popen = spawn(cfg)
    child = Child(popen, size, config=cfg)
    try:
        report = answer(popen, timeout)
        child.addr = int(report["addr"])
        child.collapse_errno = int(report["collapse_errno"])
    except BaseException:
        child.stop()
        raise
    return child


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()[0]


def stat_start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return int(text[text.rindex(")") + 2 :].split()[19])


# ---- brute force, independent of memdefragd -------------------------------------------


def read_pagemap(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """(vpn, pfn) of every present page in [start, end), by a plain loop over entries."""
    first, n = start // PAGE, (end - start) // PAGE
    data = b""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        f.seek(first * 8)
        while len(data) < n * 8:
            chunk = f.read(n * 8 - len(data))
            if not chunk:
                raise EOFError("short pagemap read")
            data += chunk
    out = []
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
        if entry >> 63 & 1:
            out.append((first + i, entry & ((1 << 55) - 1)))
    return out


def kpageflags(pfn: int) -> int:
    with open("/proc/kpageflags", "rb", buffering=0) as f:
        f.seek(pfn * 8)
        return struct.unpack("<Q", f.read(8))[0]


def brute_runs(entries: list[tuple[int, int]]) -> list[int]:
    runs: list[int] = []
    prev = None
    for vpn, pfn in entries:
        if prev is not None and vpn == prev[0] + 1 and pfn == prev[1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = (vpn, pfn)
    return runs


def brute_contiguity(runs: list[int], ks=(32, 128), ps=(0.9, 0.99)) -> dict:
    total = sum(runs)
    desc = sorted(runs, reverse=True)
    runs_for = {}
    for p in ps:
        acc = 0
        for i, r in enumerate(desc, 1):
            acc += r
            if acc >= p * total:
                runs_for[p] = i
                break
    return {
        "runs": len(runs),
        "largest_run": desc[0],
        "mean_run": total / len(runs),
        "coverage": {k: sum(desc[:k]) / total for k in ks},
        "runs_for": runs_for,
    }


def brute_regions(entries: list[tuple[int, int]], start: int, end: int) -> list[dict]:
    """Per aligned 2 MiB region fully inside [start, end), in order: present pages, whether
    its head frame is a THP head (kpageflags), and whether it is aligned-contiguous (all 512
    present, each pfn one more than the last, head pfn 512-aligned) without being a THP."""
    by_vpn = dict(entries)
    first = -(-(start // PAGE) // PMD_PAGES) * PMD_PAGES
    last = (end // PAGE) // PMD_PAGES * PMD_PAGES
    out = []
    for head in range(first, last, PMD_PAGES):
        pfns = [by_vpn.get(v) for v in range(head, head + PMD_PAGES)]
        present = sum(p is not None for p in pfns)
        contiguous = (
            present == PMD_PAGES
            and pfns[0] % PMD_PAGES == 0
            and all(p == pfns[0] + i for i, p in enumerate(pfns))
        )
        flags = kpageflags(pfns[0]) if contiguous else 0
        thp = bool(flags & KPF_THP and flags & KPF_COMPOUND_HEAD)
        out.append({"present": present, "thp": thp, "aligned_contiguous": contiguous and not thp})
    return out


def stable_read(pid: int, start: int, end: int, fn, attempts: int = 6):
    """Run fn() between two identical brute-force pagemap reads (compaction or NUMA
    balancing may migrate a page meanwhile; then try again). Returns (entries, fn())."""
    for _ in range(attempts):
        before = read_pagemap(pid, start, end)
        result = fn()
        after = read_pagemap(pid, start, end)
        if before == after:
            return before, result
        time.sleep(0.2)
    pytest.fail(f"the layout of pid {pid} kept changing over {attempts} attempts")


def write_config(
    path: Path, comm: str, extra: str = "", listen: str = "off", pacing: str = "duty_cycle: 50%"
) -> Path:
    """Budgets and the pressure guard out of the way; paced (the default) but at 50%, ten
    times the default duty cycle, so that tests wait seconds, not minutes."""
    path.write_text(
        textwrap.dedent(
            f"""
            daemon:
              scan_interval: 1s
              budget: {{bytes_per_second: 8GiB, cpu_share: 1.0}}
              pressure: {{psi_some_avg10: 100, min_available: 0}}
              pacing: {{{pacing}}}
              metrics: {{listen: "{listen}"}}
            {extra}
            targets:
              - name: testee
                match: {{comm: '^{comm}$'}}
            """
        )
    )
    os.chmod(path, 0o644)
    return path


class Daemon:
    """`memdefragd run` as a subprocess, its log lines collected; `prefix` runs it under
    another command (setpriv, to drop capabilities)."""

    def __init__(
        self, config: Path, *args: str, env: dict | None = None, prefix: Sequence[str] = ()
    ):
        self.log_path = config.with_suffix(".log")
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "memdefragd.cli", "run", "-c", str(config), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, needle: str, timeout: float = 60.0, count: int = 1) -> str:
        """The log once `needle` is in it `count` times; AssertionError if the daemon exits
        first or `timeout` passes (60 s by default: in an emulated guest of tests/vm a
        cold start, importing pyroute2 alone, took 13 s and once passed 30 s in all)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.text()
            if text.count(needle) >= count:
                return text
            assert self.proc.poll() is None, f"daemon exited early:\n{text}"
            time.sleep(0.1)
        raise AssertionError(
            f"{needle!r} not {count} time(s) in the daemon's log within {timeout} s:\n{self.text()}"
        )

    def metrics_port(self) -> int:
        """The port the daemon serves metrics on, from its log (listen: 127.0.0.1:0)."""
        text = self.wait_for("metrics on")
        return int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", text)[1])

    def wait_settled(self, timeout: float = 30.0) -> str:
        """Until a scan after the last request found nothing to do (so figures settle). The
        first scan queues nothing either: the daemon waits for an access window first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.text()
            if "scanned 1 process(es): 0 MiB queued" in text.rpartition("collapse pid")[2]:
                return text
            time.sleep(0.1)
        raise AssertionError(f"no idle scan after the work within {timeout} s:\n{self.text()}")

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def start_hostile(
    comm: str, seconds: float, *, segments: int = 4, segment: int = 16 * MiB, seed: int = 0
) -> subprocess.Popen:
    """Start tools/child.py's hostile program and wait until its segments are written
    ("ready"); read its JSON line from stdout once it ends. The caller kills it if the test
    fails first."""
    cfg = {"program": "hostile", "comm": comm, "seconds": seconds, "segments": segments}
    cfg["segment"] = segment
    if seed:
        cfg["seed"] = seed
    popen = spawn(cfg, stdin=subprocess.DEVNULL)
    line = readline(popen, 60.0)
    if line != "ready\n":
        popen.kill()
        popen.wait()
        raise RuntimeError(f"hostile child {popen.pid} did not start: {line!r}")
    return popen


def has_pagemap_scan() -> bool:
    """Whether this kernel has the PAGEMAP_SCAN ioctl (Linux 6.7+), as memdefragd finds out."""
    from memdefragd.backends.kernel.pagemap import scan_refusal

    return scan_refusal() is None


# A known bug, shown by Debian's 6.1 in tests/vm: without PAGEMAP_SCAN and without
# CAP_SYS_ADMIN (no page frame numbers, no /proc/kpageflags), memdefragd cannot tell which
# regions are PMD-mapped and reports 0 THP bytes instead of withholding the figure.
NO_SCAN_NO_CAP_THP_BUG = pytest.mark.xfail(
    condition=not has_pagemap_scan(),
    strict=True,
    reason="known bug on kernels without PAGEMAP_SCAN (< 6.7): with no CAP_SYS_ADMIN, THPs "
    "cannot be found and are reported as 0 instead of withheld",
)
