"""`memdefragd run` end to end on the real kernel, on children these tests start."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import MiB, require_kernel, write_config

pytestmark = pytest.mark.kernel


def anon_huge(pid: int, addr: int) -> int:
    """AnonHugePages (bytes) of the VMA starting at addr, from the kernel's smaps."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    head = f"{addr:x}-"
    inside = False
    for line in text.splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":
            inside = line.startswith(head)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VMA at 0x{addr:x}")


@pytest.mark.needs_collapse
def test_daemon_collapses_a_target_and_loses_no_byte(spawn, daemons, tmp_path):
    child = spawn(1024 * MiB, pattern=True, comm="mdd-e2e-target")
    cfg = write_config(tmp_path / "m.yaml", "mdd-e2e-target")
    d = daemons(cfg, "--log-level", "debug")
    end = time.monotonic() + 120
    while anon_huge(child.pid, child.addr) < 0.9 * child.size and time.monotonic() < end:
        assert d.proc.poll() is None, d.text()
        time.sleep(0.5)
    huge = anon_huge(child.pid, child.addr)
    assert huge >= 0.9 * child.size, f"only {huge >> 20} MiB huge:\n{d.text()[-3000:]}"
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5.0
    result = child.verify()
    assert result["bad"] == [] and result["checked"] == child.size // 4096
    text = d.text()
    assert "collapse pid" in text and "MiB verified" in text


def test_once_dry_run_plans_but_never_acts(spawn, tmp_path):
    child = spawn(64 * MiB, comm="mdd-dry-target")
    cfg = write_config(tmp_path / "m.yaml", "mdd-dry-target")
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "run", "-c", str(cfg), "--once", "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert anon_huge(child.pid, child.addr) == 0
    m = re.search(
        r"scanned 1 process\(es\): 0 MiB queued in 0 request\(s\), (\d+) MiB left", r.stderr
    )
    assert m and int(m[1]) >= 64, r.stderr  # the 64 MiB mapping, and maybe some heap


@pytest.mark.needs_collapse
def test_once_collapses_within_one_cycle(spawn, tmp_path):
    child = spawn(64 * MiB, comm="mdd-once-target")
    cfg = write_config(tmp_path / "m.yaml", "mdd-once-target")
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "run", "-c", str(cfg), "--once"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert anon_huge(child.pid, child.addr) == 64 * MiB, r.stderr


def test_reload_valid_and_invalid_config(spawn, daemons, tmp_path):
    spawn(8 * MiB, comm="mdd-reload")
    cfg = write_config(tmp_path / "m.yaml", "mdd-reload")
    d = daemons(cfg)
    d.wait_for("started:")
    cfg.write_text(cfg.read_text().replace("name: testee", "name: renamed"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("reloaded")
    cfg.write_text("targets:\n  - name: x\n    match: {comm: '(('}\n")
    d.proc.send_signal(signal.SIGHUP)
    text = d.wait_for("reload failed, keeping the running config")
    assert "targets[0].match.comm: bad regular expression" in text
    assert d.proc.poll() is None  # still running on the old config
    assert d.stop() == 0


def test_notify_ready_status_and_watchdog(spawn, daemons, tmp_path):
    spawn(8 * MiB, comm="mdd-notify")
    cfg = write_config(tmp_path / "m.yaml", "mdd-notify")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)  # a start takes seconds in an emulated guest (tests/vm)
    try:
        env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
        d = daemons(cfg, env=env)
        got: list[str] = []
        end = time.monotonic() + 60
        while time.monotonic() < end and not (
            any("READY=1" in m for m in got) and sum("WATCHDOG=1" in m for m in got) >= 2
        ):
            got.append(sock.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in got), got
        assert any("STATUS=" in m and "tracked" in m for m in got), got
        assert sum("WATCHDOG=1" in m for m in got) >= 2, got
        assert d.stop() == 0
        rest = []
        sock.settimeout(1)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any("STOPPING=1" in m for m in rest), rest
    finally:
        sock.close()


def test_observes_only_with_ranger_on_a_kernel_without_it(tmp_path):
    cfg = write_config(tmp_path / "m.yaml", "nothing", extra="  method: ranger")
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "run", "-c", str(cfg), "--once"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    require_kernel(
        not Path("/proc/sys/vm/kmem_defragd_always").exists(), "kernel has Translation Ranger"
    )
    assert r.returncode == 0, r.stderr
    assert "ERROR method 'ranger' cannot run on this machine (" in r.stderr
    assert "needs a kernel patched with Translation Ranger" in r.stderr
    assert "target(s) testee are observed only" in r.stderr


def test_defrag_method_ranger_refuses_a_kernel_without_it_before_any_call(spawn):
    child = spawn(4 * MiB)
    require_kernel(
        not Path("/proc/sys/vm/kmem_defragd_always").exists(), "kernel has Translation Ranger"
    )
    for extra in ([], ["--ranger-syscall", "335"]):  # 335 is uretprobe here: never called
        r = subprocess.run(
            [sys.executable, "-m", "memdefragd.cli", "defrag", "--pid", str(child.pid),
             "--method", "ranger", "-c", "/nonexistent.yaml", *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.startswith("memdefragd: method 'ranger' needs a kernel patched with")
        assert "use method 'collapse'" in r.stderr


@pytest.mark.needs_collapse
def test_defrag_one_shot_whole_and_range(spawn):
    child = spawn(64 * MiB, pattern=True)
    half = f"{child.addr:x}-{child.addr + 32 * MiB:x}"
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "defrag", "--pid", str(child.pid), "--range", half],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert anon_huge(child.pid, child.addr) == 32 * MiB
    assert "collapsible regions" in r.stdout and "before" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "defrag", "--pid", str(child.pid)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert anon_huge(child.pid, child.addr) == 64 * MiB
    assert child.verify()["bad"] == []


@pytest.mark.needs_collapse  # without MADV_COLLAPSE it refuses first (test_kernel_features)
def test_defrag_of_a_missing_pid_says_so():
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "defrag", "--pid", "999999999"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip() == "memdefragd: pid 999999999: no such process"


@pytest.mark.needs_collapse
def test_sigterm_during_a_request_stops_within_5s(spawn, daemons, tmp_path):
    child = spawn(1024 * MiB, pattern=True, comm="mdd-sigterm")
    cfg = write_config(tmp_path / "m.yaml", "mdd-sigterm")
    cfg.write_text(cfg.read_text().replace("bytes_per_second: 8GiB", "bytes_per_second: 64MiB"))
    d = daemons(cfg)
    d.wait_for("collapse pid")  # working, and with 1 GiB at 64 MiB/s, far from done
    assert anon_huge(child.pid, child.addr) < child.size
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5.0
    assert child.verify()["bad"] == []


@pytest.mark.needs_collapse
def test_target_exiting_mid_run_is_counted_not_fatal(spawn, daemons, tmp_path):
    first = spawn(512 * MiB, comm="mdd-exits")
    cfg = write_config(tmp_path / "m.yaml", "mdd-exits")
    cfg.write_text(cfg.read_text().replace("bytes_per_second: 8GiB", "bytes_per_second: 64MiB"))
    d = daemons(cfg, "--log-level", "debug")
    d.wait_for("collapse pid")
    first.kill()
    second = spawn(16 * MiB, comm="mdd-exits")
    end = time.monotonic() + 30
    while anon_huge(second.pid, second.addr) < 16 * MiB and time.monotonic() < end:
        assert d.proc.poll() is None, d.text()
        time.sleep(0.2)
    assert anon_huge(second.pid, second.addr) == 16 * MiB, d.text()[-2000:]
    assert d.stop() == 0
    assert "Traceback" not in d.text()


@pytest.mark.needs_collapse
def test_without_cap_sys_nice_refusal_is_logged_once(spawn, daemons, tmp_path):
    child = spawn(16 * MiB, comm="mdd-nocap")
    cfg = write_config(tmp_path / "m.yaml", "mdd-nocap")
    require_kernel(shutil.which("setpriv"), "setpriv (util-linux) is not installed")
    drop = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--"]
    d = daemons(cfg, prefix=drop)
    # With DAMON (6.12 in tests/vm) the first request waits for an access window.
    d.wait_for("not allowed to collapse pid", timeout=60)
    n = d.text().count("scanned 1 process")
    d.wait_for("scanned 1 process", count=n + 3)  # three more cycles: three chances to log it again
    assert d.stop(10) == 0
    text = d.text()
    assert text.count("scanned 1 process") >= 3, text
    assert text.count("not allowed to collapse pid") == 1, text
    assert "Traceback" not in text
    assert anon_huge(child.pid, child.addr) == 0


@pytest.mark.needs_collapse
def test_new_target_mid_cycle_does_not_resend_done_regions(spawn, daemons, tmp_path):
    a = spawn(256 * MiB, comm="mdd-twice")
    cfg = write_config(tmp_path / "m.yaml", "mdd-twice")
    cfg.write_text(
        cfg.read_text()
        .replace("bytes_per_second: 8GiB", "bytes_per_second: 64MiB")
        .replace("scan_interval: 1s", "scan_interval: 3s")
    )
    d = daemons(cfg)
    d.wait_for(f"collapse pid {a.pid}")
    # B's exec makes the daemon scan B at once and plan again from A's older scan (B itself
    # is still faulting its memory in then; the next full scan, 3 s on, sees all of it).
    b = spawn(64 * MiB, comm="mdd-twice")
    end = time.monotonic() + 60
    while time.monotonic() < end and (
        anon_huge(a.pid, a.addr) < a.size or anon_huge(b.pid, b.addr) < b.size
    ):
        assert d.proc.poll() is None, d.text()
        time.sleep(0.2)
    assert anon_huge(a.pid, a.addr) == a.size and anon_huge(b.pid, b.addr) == b.size, d.text()
    sent_a = sum(
        int(m[1]) for m in re.finditer(rf"collapse pid {a.pid} .*?: (\d+) MiB attempted", d.text())
    )
    # Its 256 MiB mapping plus at most a few MiB of interpreter heap; never twice over.
    assert 256 <= sent_a < 256 + 32, d.text()


@pytest.mark.needs_collapse
def test_metrics_endpoint_reports_what_the_daemon_did(spawn, daemons, tmp_path):
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    child = spawn(64 * MiB, comm="mdd-metrics")
    cfg = write_config(tmp_path / "m.yaml", "mdd-metrics", listen="127.0.0.1:0")
    d = daemons(cfg)
    port = d.metrics_port()
    end = time.monotonic() + 30
    while anon_huge(child.pid, child.addr) < child.size and time.monotonic() < end:
        time.sleep(0.2)
    d.wait_settled()
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value

    def get(name, **labels):
        return samples[name, tuple(sorted(labels.items()))]

    log = d.text()
    verified = sum(int(m) for m in re.findall(r"collapse pid \d+ .*?(\d+) MiB verified", log))
    requests = len(re.findall(r"collapse pid \d+ ", log))
    assert verified >= 64
    work = {"target": "testee", "method": "collapse"}
    assert get("memdefragd_verified_bytes_total", **work) == verified * MiB
    assert get("memdefragd_done_bytes_total", **work) >= 64 * MiB
    assert sum(v for (n, _), v in samples.items() if n == "memdefragd_requests_total") == requests
    assert get("memdefragd_request_duration_seconds_count", method="collapse") == requests
    assert get("memdefragd_target_processes", target="testee") == 1
    assert get("memdefragd_target_thp_bytes", target="testee") >= 64 * MiB
    assert get("memdefragd_target_collapsible_bytes", target="testee") == 0
    assert 0 < get("memdefragd_target_contiguity_coverage_ratio", target="testee", k="32") <= 1
    assert all(get("memdefragd_paused", reason=r) == 0 for r in ("pressure", "low_memory", "other"))
    zones = [line.split()[3] for line in Path("/proc/buddyinfo").read_text().splitlines()]
    for zone in zones:
        assert (
            "memdefragd_free_blocks",
            (("node", "0"), ("order", "9"), ("zone", zone)),
        ) in samples
    for c in ("targets", "work", "state", "system"):
        assert get("memdefragd_collector_success", collector=c) == 1
    (info,) = [dict(lb) for n, lb in samples if n == "memdefragd_config_info"]
    assert info["sha256"].startswith(re.search(r"sha256 ([0-9a-f]+)", log)[1])
    assert not any("pid" in dict(labels) for _, labels in samples)  # no pid labels, ever


def test_without_capabilities_the_log_names_each_missing_one(spawn, daemons, tmp_path):
    spawn(8 * MiB, comm="mdd-nocaps")
    cfg = write_config(tmp_path / "m.yaml", "mdd-nocaps")
    require_kernel(shutil.which("setpriv"), "setpriv (util-linux) is not installed")
    setpriv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    d = daemons(cfg, prefix=setpriv)
    d.wait_for("scanned 1 process")
    d.wait_for("proc events unavailable")  # its own thread: may come after the first scan
    assert d.stop(10) == 0
    text = d.text()
    for cap in (
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
        "CAP_SYS_NICE",
        "CAP_NET_ADMIN",
    ):
        assert text.count(f"no {cap}: ") == 1, text
    # 6.18 refuses the subscription; Debian's 6.12 (tests/vm) takes it and sends nothing:
    # either way the daemon lists /proc instead, and says why
    assert "proc events unavailable" in text, text
    assert "lacks CAP_NET_ADMIN" in text, text  # asked of the capability, not of a timeout
    assert "namespaces" not in text and "Traceback" not in text, text


@pytest.mark.needs_collapse
def test_scans_walk_smaps_only_when_the_vmas_change_and_keep_quiet_processes(
    spawn, daemons, tmp_path, backend
):
    """Without access sampling (which reads smaps' Referenced), a scan reads maps and
    takes VmFlags from the last smaps listing while the VMAs stay the same: smaps walks
    the target's page tables; where the kernel lacks PAGEMAP_SCAN, smaps is read each time
    (it says which VMAs hold nothing, which the fallback cannot skip cheaply). Once all
    is huge and the child neither faults nor shrinks, full cycles keep its last scan
    instead of reading it again; each change of its rss (a page unmapped) is read."""
    from .test_metrics_names import scrape

    child = spawn(32 * MiB, comm="mdd-cheap-scan", pattern=True)
    cfg = write_config(tmp_path / "m.yaml", "mdd-cheap-scan", listen="127.0.0.1:0",
                       extra="  access: {source: off}")  # fmt: skip
    d = daemons(cfg)
    port = d.metrics_port()
    end = time.monotonic() + 60
    while anon_huge(child.pid, child.addr) < child.size and time.monotonic() < end:
        time.sleep(0.2)
    assert anon_huge(child.pid, child.addr) == child.size, d.text()[-3000:]

    def count(name: str, **labels: str) -> float:
        return scrape(port)[1].get((name, tuple(sorted(labels.items()))), 0)

    def scans(result: str) -> float:
        return count("memdefragd_scans_total", target="testee", result=result)

    end = time.monotonic() + 30
    while scans("kept") < 3 and time.monotonic() < end:  # 1 s cycles
        time.sleep(0.5)
    assert scans("kept") >= 3, d.text()[-3000:]
    # While kept, nothing reads it: the count of reads stands still over 3 cycles.
    read = scans("read")
    time.sleep(3)
    assert scans("read") == read, d.text()[-3000:]
    for _ in range(3):  # each unmapped page: a read (maps: the VMAs are the same)
        before = scans("read")
        child.unmap()
        end = time.monotonic() + 30
        while scans("read") == before and time.monotonic() < end:
            time.sleep(0.2)
        assert scans("read") > before, d.text()[-3000:]
    assert child.verify()["bad"] == []
    text, _ = scrape(port)
    smaps = count("memdefragd_vma_listings_total", source="smaps")
    maps = count("memdefragd_vma_listings_total", source="maps")
    assert count("memdefragd_scan_cpu_seconds_total", target="testee") > 0, text
    if backend.sparse_scan:
        # the first scan, and one more per change of the VMA list (the Python child may
        # map a little as it runs): far fewer than scans
        assert maps >= 3 and smaps < maps, text
    else:
        assert smaps >= 3 and maps == 0, text
