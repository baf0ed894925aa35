"""Translation Ranger on its own kernel (v5.0 + RFC 01/31 and 04/31), in a guest of
tests/vm: presence proven from its files, the syscall number checked in a child, its pass
driven by `memdefragd defrag --method ranger` in short calls, the result measured by our
own pagemap reads, the data intact; and on this 5.0 kernel, what memdefragd lacks (no
pidfd_open, process_madvise, MADV_COLLAPSE or PAGEMAP_SCAN) said, not crashed on."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.backends.kernel.procs import pidfd_refusal
from memdefragd.backends.kernel.ranger import ranger_support, syscall_check, vmstat_counters
from memdefragd.model import Request
from memdefragd.pipeline.verify import verify

from ..kernel.helpers import MiB, write_config
from .conftest import TR_SYSCALL

pytestmark = pytest.mark.kernel
BREAKOUT = Path("/proc/sys/vm/num_breakout_chunks")


def test_presence_from_the_kernels_files_and_the_number_checked_in_a_child():
    assert ranger_support(TR_SYSCALL) == (True, "")
    assert "memdefrag_defrag" in vmstat_counters()
    assert syscall_check(TR_SYSCALL) is None
    wrong = syscall_check(TR_SYSCALL - 1)  # rseq on this kernel: refuses action 2's args
    assert wrong is not None and wrong.startswith(
        f"daemon.ranger.syscall {TR_SYSCALL - 1} is not scan_process_memory on this kernel"
    )


def row(text: str, name: str) -> tuple[str, str]:
    m = re.search(rf"^  {re.escape(name)}\s+(\S+(?: pages)?)\s+(\S+(?: pages)?)$", text, re.M)
    assert m, text
    return m[1], m[2]


def test_defrag_method_ranger_mends_a_shuffled_heap_in_short_calls(spawn, record_property):
    child = spawn(64 * MiB, pattern=True, shuffle=7)
    old_breakout = BREAKOUT.read_text()
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "defrag", "--pid", str(child.pid),
         "--method", "ranger", "--ranger-syscall", str(TR_SYSCALL), "--breakout-chunks", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    record_property("defrag --method ranger", r.stdout)
    runs_before, runs_after = (int(x) for x in row(r.stdout, "contiguity runs"))
    largest_after = int(row(r.stdout, "largest run")[1].split()[0])
    # the shuffled fault order scattered the frames; the report covers every VMA of the
    # child (its interpreter's too), the pass mends the 64 MiB heap
    assert runs_before >= 8192, r.stdout
    assert runs_after * 5 <= runs_before and largest_after >= 4096, r.stdout
    chunks = int(re.search(r"(\d+) 2 MiB chunk\(s\) worked on", r.stdout)[1])
    assert chunks >= 32, r.stdout  # the heap's 32 at least (other VMAs under 10 MiB skipped)
    calls = int(re.search(r"Translation Ranger: (\d+) call\(s\)", r.stdout)[1])
    assert calls > 1, r.stdout  # 4 chunks per call: the pass came in short calls
    assert BREAKOUT.read_text() == old_breakout  # the knob is put back
    assert child.verify()["bad"] == []


def test_the_daemon_drives_ranger_and_says_what_this_kernel_lacks(
    spawn, daemons, tmp_path, record_property
):
    child = spawn(64 * MiB, pattern=True, shuffle=11, comm="mdd-tr-daemon")
    cfg = write_config(tmp_path / "m.yaml", "mdd-tr-daemon")
    cfg.write_text(cfg.read_text().replace("daemon:\n", (
        f"daemon:\n  method: ranger\n  ranger: {{syscall: {TR_SYSCALL}, breakout_chunks: 4}}\n"
    ), 1))  # fmt: skip
    d = daemons(cfg, "--log-level", "debug")
    d.wait_for("scanned 1 process(es)", timeout=120)
    end = time.monotonic() + 600
    contiguous = 0
    while time.monotonic() < end and contiguous < 0.9 * child.size:
        assert d.proc.poll() is None, d.text()
        time.sleep(1)
        contiguous = contiguous_bytes(child)
    text = d.text()
    assert VERIFIED.search(text), text[-3000:]  # the daemon's requests did it
    record_property("daemon log (ranger lines)", "\n".join(
        line for line in text.splitlines() if " ranger pid " in line or "lacks" in line
        or "no pidfd_open" in line or "PAGEMAP_SCAN" in line
    )[-6000:])  # fmt: skip
    assert contiguous >= 0.9 * child.size, text[-4000:]
    assert d.stop() == 0
    assert pidfd_refusal() is not None and pidfd_refusal() in text
    assert "no PAGEMAP_SCAN ioctl" in text and "Traceback" not in text
    assert "cannot run on this machine" not in text
    assert child.verify()["bad"] == []


def contiguous_bytes(child) -> int:
    """Our own read of the child's heap: bytes in 2 MiB regions whose pages are all at one
    VA-PA offset (what a Translation Ranger chunk becomes). The daemon's verified_bytes
    cannot be summed for this: each new pass re-walks chunks already mended."""
    backend = KernelBackend()
    try:
        proc = backend.process(child.pid)
        req = Request("t", child.pid, proc.start_time, child.addr, child.end,
                      ((child.addr, child.end),), method="ranger")  # fmt: skip
        return verify(backend, proc, req).bytes
    finally:
        backend.close()


VERIFIED = re.compile(
    r" ranger pid \d+ \(testee\) 0x[0-9a-f]+: \d+ MiB attempted, \d+ MiB done, (\d+) MiB verified"
)
