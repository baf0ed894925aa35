"""End to end under a real systemd: the installed package and the real unit file, in a
container booted with systemd-nspawn (see nspawn.py for the recipe).

One test walks the life of the service: `systemctl start` returns only after READY=1,
the sandbox is what the unit says, the daemon collapses a target process running as
another user in the container (its AnonHugePages rise, its data intact), serves metrics,
`systemctl reload` applies a new config and refuses a bad one, `journalctl -u memdefragd`
has all of it, and `systemctl stop` ends it cleanly.

Needs root, systemd-nspawn and a cached container root (built by the test on first use:
debootstrap from the host's Debian mirror, ~1 min). Where that is impossible it skips,
saying why, or fails under MEMDEFRAGD_REQUIRE_KERNEL=1 (CI).
"""

from __future__ import annotations

import json
import re
import textwrap
import threading
import time
from pathlib import Path

import pytest

from . import nspawn
from .conftest import CACHE, report, require

pytestmark = pytest.mark.kernel

MiB = 1 << 20
TARGET_SIZE = 64 * MiB
TARGET_COMM = "mdd-e2e-target"
UNIT = "memdefragd"
# CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21), CAP_SYS_NICE (23)
# CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_NICE
CAPS = (1 << 2) | (1 << 12) | (1 << 19) | (1 << 21) | (1 << 23)

# The target: one anonymous mapping touched page by page (4 KiB faults: THP is not
# `always`, and there is no MADV_HUGEPAGE), named so the config can match it. SIGUSR1
# makes it check every byte and print the verdict (into the journal).
TARGET = r"""
import ctypes, signal, sys, time
PMD, PAGE, FILL = 2 << 20, 4096, 0x5A
size = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
libc.prctl(15, sys.argv[2].encode(), 0, 0, 0)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
raw = libc.mmap(None, size + PMD, 3, 0x22, -1, 0)
addr = (raw + PMD - 1) & ~(PMD - 1)
for off in range(0, size, PAGE):
    ctypes.memset(addr + off, FILL, PAGE)
def check(*_):
    ok = ctypes.string_at(addr, size) == bytes([FILL]) * size
    print(f"target check: {'intact' if ok else 'CORRUPT'}", flush=True)
signal.signal(signal.SIGUSR1, check)
print(f"target ready at 0x{addr:x}", flush=True)
while True:
    time.sleep(3600)
"""


def config(name: str) -> str:
    return textwrap.dedent(
        f"""\
        # memdefragd end-to-end test
        daemon:
          scan_interval: 1s
          budget: {{bytes_per_second: 8GiB, cpu_share: 1.0}}
          pressure: {{psi_some_avg10: 100, min_available: 0}}
          metrics: {{listen: "127.0.0.1:9847"}}
        targets:
          - name: {name}
            match: {{comm: '^{TARGET_COMM}$', user: nobody}}
        """
    )


def show(c: nspawn.Container, unit: str, *props: str) -> dict[str, str]:
    out = c.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def anon_huge(c: nspawn.Container, pid: int) -> int:
    text = c.run("cat", f"/proc/{pid}/smaps_rollup").stdout
    m = re.search(r"^AnonHugePages:\s+(\d+) kB", text, re.M)
    assert m, text
    return int(m[1]) * 1024


def journal(c: nspawn.Container, *args: str) -> str:
    return c.run("journalctl", "--no-pager", "-q", *args).stdout


def wait_journal(c: nspawn.Container, needle: str, *args: str, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    while True:
        text = journal(c, *args)
        if needle in text:
            return text
        if time.monotonic() > end:
            raise AssertionError(f"{needle!r} not in journalctl {' '.join(args)}:\n{text}")
        time.sleep(0.1)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric family in Prometheus text, as (labels, value)."""
    out = []
    for m in re.finditer(rf"^{name}(?:{{(.*?)}})? (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[1] or ""))
        out.append((labels, float(m[2])))
    return out


def processes(text: str, target: str) -> float:
    return sum(v for k, v in samples(text, "memdefragd_target_processes") if k["target"] == target)


def metrics(c: nspawn.Container) -> str:
    code = (
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:9847/metrics', timeout=5).read().decode())"
    )
    return c.run("python3", "-c", code).stdout


@pytest.fixture(scope="module")
def container(request, tmp_path_factory):
    problem = rootfs = None
    try:
        nspawn.check_host()
        rootfs = nspawn.ensure_rootfs(CACHE)
    except nspawn.Unavailable as e:
        problem = str(e)
    require(rootfs, f"no systemd container for the end-to-end test: {problem}")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    require(
        thp.exists() and "[always]" not in thp.read_text(),
        "THP enabled=always (or no THP): the target would fault in huge pages by itself",
    )
    installed = request.getfixturevalue("installed")  # after the checks: skip fast
    t0 = time.monotonic()
    workdir = tmp_path_factory.mktemp("nspawn")
    # The installed tree, as make install laid it out under /usr/local; the config is
    # written into the container's /etc (on its tmpfs overlay) by the test.
    binds = [(installed.path("/usr/local"), "/usr/local")]
    with nspawn.Container(rootfs, workdir, binds_ro=binds) as c:
        # On a host /sys is writable and the unit's ProtectKernelTunables= and
        # ReadWritePaths= decide; give the container the same for the compaction knobs.
        c.writable_sysfs("/sys/devices/system/node")
        yield c
        t = c.timings
    report(
        f"e2e container: manager up {t['manager up']:.2f} s, booted ({c.state}) "
        f"{t['boot']:.2f} s, poweroff {t.get('poweroff', 0):.2f} s, "
        f"whole module {time.monotonic() - t0:.1f} s"
    )


def test_service_lifecycle_under_systemd(container: nspawn.Container):
    c = container
    timings: dict[str, float] = {}
    t_all = time.monotonic()

    # The unit as installed: found by systemd, verified with its real paths.
    r = c.run("systemd-analyze", "verify", f"/usr/local/lib/systemd/system/{UNIT}.service")
    assert r.stderr == "", r.stderr
    c.run("mkdir", "-p", "/etc/memdefragd")
    c.write("/etc/memdefragd/memdefragd.yaml", config("e2e"))
    assert (
        "OK, 1 target(s): e2e"
        in c.run("memdefragd", "check-config", "/etc/memdefragd/memdefragd.yaml").stdout
    )
    c.run("systemctl", "daemon-reload")

    # A target owned by another user (nobody): reading its pagemap needs
    # CAP_DAC_READ_SEARCH, collapsing it CAP_SYS_PTRACE + CAP_SYS_NICE.
    c.write("/opt/mdd-e2e-target.py", TARGET)
    c.run(
        "systemd-run", "--unit=mdd-e2e-target", "--property=User=nobody", "--collect",
        "/usr/bin/python3", "/opt/mdd-e2e-target.py", str(TARGET_SIZE), TARGET_COMM,
    )  # fmt: skip
    wait_journal(c, "target ready at", "-u", "mdd-e2e-target")
    target = int(show(c, "mdd-e2e-target", "MainPID")["MainPID"])
    before = anon_huge(c, target)
    assert before < TARGET_SIZE // 4, f"the target started with {before >> 20} MiB huge"

    # systemctl start returns once the daemon sent READY=1; watch the state meanwhile.
    seen: list[str] = []
    stop_watch = threading.Event()

    def watch() -> None:
        while not stop_watch.is_set():
            s = show(c, UNIT, "ActiveState")["ActiveState"]
            if not seen or seen[-1] != s:
                seen.append(s)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.monotonic()
    try:
        c.run("systemctl", "start", UNIT, timeout=90)
    finally:
        timings["systemctl start"] = time.monotonic() - t0
        stop_watch.set()
        watcher.join()
    props = show(
        c, UNIT, "ActiveState", "SubState", "Type", "NotifyAccess", "MainPID", "StatusText",
        "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "WatchdogUSec",
        "WatchdogTimestampMonotonic",
    )  # fmt: skip
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert (props["Type"], props["NotifyAccess"]) == ("notify", "main"), props
    main_pid = int(props["MainPID"])
    # Type=notify: active only when READY=1 came, which the daemon sends after importing
    # everything and a first discovery (a Type=simple service is active at fork).
    ready_after = (
        int(props["ActiveEnterTimestampMonotonic"]) - int(props["ExecMainStartTimestampMonotonic"])
    ) / 1e6
    timings["exec to READY=1"] = ready_after
    assert ready_after > 0.05, props
    # While `systemctl start` waited, the unit was seen activating, never active before.
    assert "activating" in seen and "active" not in seen[: seen.index("activating")], seen
    if seen[-1] != props["ActiveState"]:
        seen.append(props["ActiveState"])
    assert "tracked" in props["StatusText"], props  # STATUS= sent along with READY=1
    assert props["WatchdogUSec"] == "1min", props

    # The sandbox the unit describes, as the kernel reports it for the daemon.
    status = c.run("cat", f"/proc/{main_pid}/status").stdout
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
    assert int(fields["CapEff"], 16) == CAPS, fields["CapEff"]
    assert int(fields["CapBnd"], 16) == CAPS, fields["CapBnd"]
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2", fields
    stat = c.run("cat", f"/proc/{main_pid}/stat").stdout
    assert stat[stat.rindex(")") + 2 :].split()[16] == "10"  # Nice=10
    assert c.run("cat", f"/proc/{main_pid}/oom_score_adj").stdout.strip() == "500"
    mounts = {}
    for line in c.run("cat", f"/proc/{main_pid}/mountinfo").stdout.splitlines():
        parts = line.split()
        mounts[parts[4]] = parts[5].split(",")
    assert "ro" in mounts["/"], mounts["/"]  # ProtectSystem=strict
    assert "ro" in mounts["/sys"], mounts["/sys"]  # ProtectKernelTunables=yes
    assert "rw" in mounts["/sys/devices/system/node"], mounts  # ReadWritePaths= (compaction)

    def writable(path: str) -> bool:  # access(W_OK) in the daemon's mount namespace
        r = c.run("nsenter", f"--target={main_pid}", "--mount", "test", "-w", path, check=False)
        return r.returncode == 0

    assert writable("/sys/devices/system/node/node0/compact")
    assert writable("/run/memdefragd")  # RuntimeDirectory=
    for path in ("/sys/kernel/mm/transparent_hugepage/enabled", "/proc/sys/vm/compact_memory",
                 "/usr/local/bin", "/etc/memdefragd/memdefragd.yaml"):  # fmt: skip
        assert not writable(path), f"{path} is writable for the daemon"
    # the unit grants every capability the daemon needs: it names none missing (the proc
    # connector stays out of reach all the same: the container has its own PID namespace)
    log = journal(c, "-u", UNIT)
    assert "CAP_" not in log, log
    environ = c.run("cat", f"/proc/{main_pid}/environ").stdout.split("\0")
    assert "WATCHDOG_USEC=60000000" in environ, environ

    # It collapses the target.
    t0 = time.monotonic()
    end = t0 + 60
    while (huge := anon_huge(c, target)) < 0.9 * TARGET_SIZE and time.monotonic() < end:
        time.sleep(0.2)
    timings["target collapsed"] = time.monotonic() - t0
    assert huge >= 0.9 * TARGET_SIZE, (
        f"only {huge >> 20} of {TARGET_SIZE >> 20} MiB huge after 60 s:\n"
        + "\n".join(x for x in journal(c, "-u", UNIT).splitlines() if "scanned " not in x)
    )
    c.run("systemctl", "kill", "--signal=SIGUSR1", "mdd-e2e-target")
    assert "target check: intact" in wait_journal(c, "target check:", "-u", "mdd-e2e-target")
    wd = show(c, UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    assert int(wd) > 0, "no WATCHDOG=1 reached systemd"
    text = metrics(c)
    assert processes(text, "e2e") == 1, text[:2000]
    verified = sum(v for _, v in samples(text, "memdefragd_verified_bytes_total"))
    assert verified >= 0.9 * TARGET_SIZE, text[:3000]

    # systemctl reload: a new config comes into force, in the same process.
    c.write("/etc/memdefragd/memdefragd.yaml", config("e2e-reloaded"))
    t0 = time.monotonic()
    c.run("systemctl", "reload", UNIT)
    timings["systemctl reload"] = time.monotonic() - t0
    wait_journal(c, "reloaded /etc/memdefragd/memdefragd.yaml", "-u", UNIT)
    end = time.monotonic() + 10
    while processes(text := metrics(c), "e2e-reloaded") != 1 and time.monotonic() < end:
        time.sleep(0.2)
    assert processes(text, "e2e-reloaded") == 1, text[:2000]
    # A bad config: `systemctl reload` fails and says why; the daemon runs on, unchanged.
    c.write("/etc/memdefragd/memdefragd.yaml", "targets:\n  - name: x\n    match: {comm: '(('}\n")
    r = c.run("systemctl", "reload", UNIT, check=False)
    assert r.returncode != 0, r
    wait_journal(c, "bad regular expression", "-u", UNIT)
    props = show(c, UNIT, "ActiveState", "MainPID")
    assert props == {"ActiveState": "active", "MainPID": str(main_pid)}, props

    # systemctl stop: SIGTERM, STOPPING=1, exit 0.
    t0 = time.monotonic()
    c.run("systemctl", "stop", UNIT)
    timings["systemctl stop"] = time.monotonic() - t0
    props = show(c, UNIT, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    assert props["ExecMainStatus"] == "0", props
    assert c.run("systemctl", "is-active", UNIT, check=False).returncode == 3

    # journalctl -u memdefragd has the whole story, from systemd and from the daemon.
    log = journal(c, "-u", UNIT)
    for needle in (
        "Starting memdefragd.service",
        "Started memdefragd.service",
        "started: backend kernel, method collapse, 1 target(s)",
        f"collapse pid {target} ",
        "Reloading memdefragd.service",
        "Reloaded memdefragd.service",
        "reloaded /etc/memdefragd/memdefragd.yaml",
        "targets[0].match.comm: bad regular expression",
        "stopping:",
        "Stopped memdefragd.service",
    ):
        assert needle in log, f"{needle!r} not in journalctl -u {UNIT}:\n{log}"
    assert re.search(rf"collapse pid {target} .* MiB verified", log), log
    # With systemd-python installed the lines go through the journal's native protocol
    # (fields such as CODE_FUNC), otherwise as <N>-prefixed stderr lines.
    records = [json.loads(x) for x in journal(c, "-u", UNIT, "-o", "json").splitlines()]
    native = [r for r in records if r.get("SYSLOG_IDENTIFIER") == "memdefragd" and "CODE_FUNC" in r]
    has_systemd_python = (
        c.run("/usr/local/lib/memdefragd/bin/python3", "-c", "import systemd.journal", check=False)
    ).returncode == 0
    assert bool(native) == has_systemd_python, (has_systemd_python, records[-3:])

    timings["whole test"] = time.monotonic() - t_all
    report(
        "e2e service: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
        + f"; states seen during start: {' -> '.join(seen)}"
    )
