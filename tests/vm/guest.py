"""PID 1 of a memdefragd test guest (stage 2, after the initramfs's switch_root).

Runs on the host's root (read-only 9p) with the host's .venv: reads the request the
harness left in the writable share, prepares the kernel the way the tests expect (THP
`enabled` = madvise: Debian's kernels default to always, and the tests need 4 KiB faults),
runs pytest as root, reaps every orphan meanwhile (it is init), writes the exit status,
uname and the kernel log into the share, and powers the guest off. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback

IO = os.environ.get("MDVM_IO", "/run/memdefragd-vm/io")


def _write(name: str, text: str) -> None:
    with open(os.path.join(IO, name), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        print(f"vm-guest: {' '.join(cmd)}: {r.stderr.strip()}", flush=True)


def _set(path: str, value: str) -> str:
    try:
        with open(path, "w") as f:
            f.write(value)
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"cannot set {value}: {e}"


def prepare() -> dict[str, str]:
    os.makedirs("/dev/shm", exist_ok=True)
    _sh("mount", "-t", "tmpfs", "-o", "mode=1777", "shm", "/dev/shm")
    _sh("mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup")
    thp = "/sys/kernel/mm/transparent_hugepage"
    facts = {
        "thp_enabled": _set(f"{thp}/enabled", "madvise"),
        "thp_defrag": _set(f"{thp}/defrag", "madvise"),
    }
    os.makedirs("/run/lock", exist_ok=True)
    return facts


def scratch() -> str:
    """Where the tests write: /tmp, a tmpfs, unless the checkout itself is under the
    host's /tmp (a clean clone in CI); then /tmp is the host's, read-only, and a tmpfs
    under /run stands in (the harness passes MDVM_TMP=0)."""
    if os.environ.get("MDVM_TMP") != "0":
        return "/tmp"
    path = "/run/memdefragd-vm/tmp"
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o1777)
    return path


def run(request: dict) -> int:
    tmp = scratch()
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": tmp,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MEMDEFRAGD_VM_GUEST": "1",
        **request.get("env", {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={IO}/junit.xml",
        *request["pytest"],
    ]
    with open(os.path.join(IO, "pytest.log"), "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=request["repo"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        # as init, reap every orphan until pytest itself is done
        while True:
            pid, status = os.wait()
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode


def main() -> None:
    started = time.monotonic()
    try:
        with open(os.path.join(IO, "request.json")) as f:
            request = json.load(f)
        facts = prepare()
        facts["uname"] = os.uname().release
        _write("uname.txt", facts["uname"] + "\n")
        _write("facts.json", json.dumps(facts))
        code = run(request)
        _write("exit", f"{code}\n")
    except BaseException:
        print("vm-guest: " + traceback.format_exc(), flush=True)
        with contextlib.suppress(OSError):
            _write("guest-error.txt", traceback.format_exc())
    try:
        r = subprocess.run(["dmesg"], capture_output=True, text=True, check=False)
        _write("dmesg.txt", r.stdout)
        _write("guest-seconds", f"{time.monotonic() - started:.1f}\n")
    except OSError:
        pass
    os.sync()
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("o")
    time.sleep(60)


if __name__ == "__main__":
    main()
