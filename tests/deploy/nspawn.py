"""A real systemd, booted as PID 1 in a systemd-nspawn container, for end-to-end tests of
the unit on a host whose own PID 1 may not be systemd (this project's CI machine).

The recipe (worked out on Debian 12, systemd 252, kernel 6.18):

* The root file system is a ``debootstrap --variant=minbase`` of the host's own Debian
  release, from the mirror its apt sources name, with systemd, dbus, procps (``/bin/kill``
  for ExecReload) and python3 (the interpreter ``make install``'s virtualenv links to). It
  is built once into a cache directory (``.cache/deploy/`` of the checkout) and reused; a
  marker file guards against a half-built tree, a lock against two builders. Runs boot it
  with ``--volatile=overlay`` (a tmpfs upper layer), so it is never modified.
* ``systemd-nspawn`` needs ``--register=no`` and ``--keep-unit``: without them it asks the
  host's systemd and machined over D-Bus, and dies where there are none.
* nspawn starts in a private mount namespace with a fresh tmpfs on ``/run/systemd`` (no
  host file under /run is touched, every mount vanishes with it) and in a cgroup of its
  own (``/memdefragd-e2e-PID`` in the ``name=systemd`` and unified hierarchies, or under
  the cgroup2 root), so the ``payload``/``supervisor`` cgroups it leaves can be removed.
* ``--private-network`` gives the container a network namespace with only ``lo``.
* ``systemd.firstboot=off``: no first-boot wizard waiting for a key.
* Commands run inside with ``nsenter --all`` on the container's PID 1 (no machined, so no
  ``machinectl shell``), in a clean environment. Wait for ``/run/systemd/private`` before
  talking to the manager: ``/run/systemd/system`` appears earlier than it answers.

Everything is undone on exit: the container is powered off (or killed), its cgroups removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3")
# Units a minimal container has no use for: they only slow the boot or wait for a console.
MASKED = (
    "console-getty.service", "getty@tty1.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
    "dpkg-db-backup.timer", "systemd-sysctl.service",
)  # fmt: skip
MARKER = ".memdefragd-rootfs-ready"
ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TERM=dumb", "SYSTEMD_PAGER=cat", "SYSTEMD_COLORS=0", "LANG=C.UTF-8",
)  # fmt: skip


class Unavailable(Exception):
    """nspawn cannot run here (with the reason): the caller skips, or fails under CI."""


def host_release() -> tuple[str, str]:
    """(codename, mirror) of the host's Debian, from /etc/os-release and its apt sources."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    codename = fields.get("VERSION_CODENAME", "")
    if fields.get("ID") != "debian" or not codename:
        raise Unavailable(f"the host is not Debian with a codename ({fields.get('PRETTY_NAME')})")
    mirror = os.environ.get("MEMDEFRAGD_E2E_MIRROR", "")
    if not mirror:
        mirror = _apt_mirror(codename) or "http://deb.debian.org/debian"
    return codename, mirror


def _apt_mirror(codename: str) -> str | None:
    """The URI the host's apt sources give for `codename` (one-line or deb822 format)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                keys = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith((" ", "#")):
                        k, _, v = line.partition(":")
                        keys[k.strip().lower()] = v.split()
                if "deb" in keys.get("types", []) and codename in keys.get("suites", []):
                    uris = keys.get("uris", [])
                    if uris:
                        return uris[0]
        elif path.suffix == ".list":
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == codename:
                    return words[1]
    return None


def ensure_rootfs(cache: Path, log=print) -> Path:
    """The cached root file system, built first if need be (about 45 s, needs the mirror)."""
    codename, mirror = host_release()
    rootfs = cache / f"rootfs-{codename}"
    if (rootfs / MARKER).exists():
        return rootfs
    if shutil.which("debootstrap") is None:
        raise Unavailable("debootstrap is not installed (apt-get install debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (rootfs / MARKER).exists():  # built by another run meanwhile
            return rootfs
        partial = cache / f"rootfs-{codename}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        log(f"building the container root {rootfs} ({codename} from {mirror}); once, ~45 s")
        t0 = time.monotonic()
        cmd = [
            "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            f"--cache-dir={debs.resolve()}", codename, str(partial), mirror,
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            raise Unavailable(f"debootstrap {codename} from {mirror} failed:\n{tail}")
        (partial / "etc/hostname").write_text("memdefragd-e2e\n")
        subprocess.run(
            ["systemctl", f"--root={partial}", "mask", *MASKED], capture_output=True, check=False
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (partial / leftover).glob("*"):
                if f.is_file():
                    f.unlink()
        (partial / MARKER).write_text(f"{codename} {mirror}\n")
        shutil.rmtree(rootfs, ignore_errors=True)
        partial.rename(rootfs)
        log(f"container root built in {time.monotonic() - t0:.1f} s")
    return rootfs


def check_host() -> None:
    """Raise Unavailable unless this host can run the container."""
    if os.geteuid() != 0:
        raise Unavailable("systemd-nspawn needs root")
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
                          ("unshare", "util-linux")):  # fmt: skip
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (apt-get install {package})")
    if not Path("/sys/fs/cgroup").is_dir():
        raise Unavailable("no /sys/fs/cgroup")


def _cgroup_dirs(name: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # pure cgroup2
        return [root / name]
    return [root / h / name for h in ("systemd", "unified") if (root / h).is_dir()]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(d.name))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """A booted container: ``run()`` commands in it; ``close()`` (or ``with``) shuts it down."""

    def __init__(
        self,
        rootfs: Path,
        workdir: Path,
        *,
        binds_ro: Sequence[tuple[Path, str]] = (),
        boot_timeout: float = 90.0,
    ):
        self.rootfs = rootfs
        self.workdir = workdir
        self.binds_ro = list(binds_ro)
        self.boot_timeout = boot_timeout
        self.name = f"memdefragd-e2e-{os.getpid()}"
        self.cgroup = f"memdefragd-e2e-{os.getpid()}"
        self.console = workdir / "console.log"
        self.nspawn: subprocess.Popen | None = None
        self.leader = 0
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self) -> None:
        t0 = time.monotonic()
        args = [
            "systemd-nspawn", "-D", str(self.rootfs), "--volatile=overlay", "--register=no",
            "--keep-unit", "--private-network", "--boot", "-M", self.name,
            "--console=read-only", "--setenv=SYSTEMD_COLORS=0",
        ]  # fmt: skip
        args += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro]
        args += ["--", "systemd.firstboot=off"]
        # Own cgroup, private mount namespace with a tmpfs on /run/systemd, then exec nspawn
        # (so the unshare'd shell's pid is nspawn's).
        script = (
            'set -e; cg=$1; shift; for d in $(echo "$CGROUP_DIRS"); do mkdir -p "$d"; '
            'echo $$ >"$d/cgroup.procs"; done; mkdir -p /run/systemd; '
            'mount -t tmpfs -o mode=0755 memdefragd-e2e /run/systemd; exec "$@"'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_SOCKET")}
        env["CGROUP_DIRS"] = " ".join(str(d) for d in _cgroup_dirs(self.cgroup))
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                 script, "sh", self.cgroup, *args],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + self.boot_timeout
        while True:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited early:\n{self.console_tail()}")
            if not self.leader:
                for child in _children(self.nspawn.pid):
                    if _comm(child) == "systemd":
                        self.leader = child
            if self.leader and self._has_private_socket():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the container's manager did not come up in {self.boot_timeout} s:\n"
                    f"{self.console_tail()}"
                )
            time.sleep(0.05)
        self.timings["manager up"] = time.monotonic() - t0
        while True:
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=self.boot_timeout
            ).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container did not finish booting (state {state!r})")
            time.sleep(0.2)
        self.state = state
        self.timings["boot"] = time.monotonic() - t0

    def _has_private_socket(self) -> bool:
        r = subprocess.run(
            ["nsenter", "--target", str(self.leader), "--mount", "--",
             "/usr/bin/test", "-S", "/run/systemd/private"],
            capture_output=True, check=False,
        )  # fmt: skip
        return r.returncode == 0

    def close(self) -> None:
        """Power off (30 s at most), then kill what is left; remove the cgroups."""
        p = self.nspawn
        if p is not None and p.poll() is None:
            t0 = time.monotonic()
            if self.leader:
                with contextlib.suppress(Exception):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            else:
                p.send_signal(signal.SIGTERM)  # nspawn: an orderly halt of the container
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)  # the second SIGTERM: terminate at once
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    if self.leader:  # SIGKILL to PID 1 of a PID namespace ends all of it
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.leader, signal.SIGKILL)
                    p.kill()
                    p.wait()
            self.timings["poweroff"] = time.monotonic() - t0
        for d in _cgroup_dirs(self.cgroup):
            if d.is_dir():
                for sub in sorted(d.rglob("*"), key=lambda x: len(x.parts), reverse=True):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                with contextlib.suppress(OSError):
                    d.rmdir()

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ commands

    def run(
        self,
        *argv: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in all of the container's namespaces, with a clean environment."""
        cmd = ["nsenter", "--target", str(self.leader), "--all", "--", "/usr/bin/env", "-i",
               *ENV, *argv]  # fmt: skip
        r = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"in the container: {' '.join(argv)} exited {r.returncode}\n"
                f"stdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def writable_sysfs(self, path: str) -> None:
        """Make `path` (under /sys) writable in the container, as it is on a host.

        nspawn's /sys comes from a sysfs mount made in the container's own network
        namespace, read-only in its superblock, so no bind mount of it can be made writable
        (ReadWritePaths= included). A sysfs mounted from the host's network namespace is
        the host's (writable) one: mount it inside the container's mount namespace only,
        bind `path` from it over the container's, and drop the rest.
        """
        script = (
            'set -e; d=$(mktemp -d /run/host-sysfs.XXXXXX); mount -t sysfs sysfs "$d"; '
            'mount --bind "$d${0#/sys}" "$0"; umount "$d"; rmdir "$d"'
        )
        r = subprocess.run(
            ["nsenter", "--target", str(self.leader), "--mount", "--", "/bin/sh", "-c",
             script, path],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"could not expose {path} writable in the container: {r.stderr}")

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("/bin/sh", "-c", f'cat >"$0" && chmod {mode} "$0"', path, input=text)
