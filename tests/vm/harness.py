"""Run a selection of the test suite inside a QEMU guest of another kernel.

Kernels are Debian's own (`linux-image-*-amd64-unsigned`), fetched with `apt-get download`
into a cache outside the checkout (apt checks each .deb against its signed index; we check
it again against the SHA256 that `apt-cache show` gives, and record it), extracted with
`dpkg-deb -x`. A small initramfs (busybox-static from Debian, plus the 9p modules the kernel
needs, decompressed) mounts the host's root read-only over 9p, a tmpfs for what the tests
write, and a second, writable 9p export of a host directory where the guest leaves its
results (junit XML, exit status, dmesg). The guest's PID 1 is tests/vm/guest.py, run by
the host's .venv: the guest sees the same checkout at the same path; nothing is installed
into it. Software emulation only (`-accel tcg -cpu max`): KVM does not boot guests here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_CACHE = Path(os.environ.get("MEMDEFRAGD_VM_CACHE", "/var/cache/memdefragd-vm"))


# Which Debian package a short kernel name stands for (the newest one apt offers), and the
# Debian suite it comes from: None is the host's own apt sources (Debian 12); another suite
# is read through a private apt configuration in the cache (see Apt), so that Debian 11's
# 5.10, the last long-term kernel before MADV_COLLAPSE, is at hand without touching the
# host's apt state.
@dataclass(frozen=True)
class Series:
    pattern: re.Pattern[str]
    suite: str | None = None


SERIES = {
    "5.10": Series(re.compile(r"^linux-image-5\.10\.0-([0-9]+)-amd64-unsigned$"), "bullseye"),
    "6.1": Series(re.compile(r"^linux-image-6\.1\.0-([0-9]+)-amd64-unsigned$")),
    "6.12": Series(re.compile(r"^linux-image-6\.12\.([0-9]+)\+deb12-amd64-unsigned$")),
}
# The matrix: what each kernel runs when no selection is given. The real-kernel tests
# everywhere; on 5.10, which has no MADV_COLLAPSE, those marked needs_collapse cannot run
# and are left out (tests/kernel/test_kernel_features.py asserts the observer there), and
# so are the two discovery tests that need proc events: pyroute2 cannot read 5.10's answer
# to the subscription (a message 4 bytes shorter than it unpacks), so memdefragd says so
# and lists /proc instead (tests/backends/kernel/test_events.py).
_NO_EVENTS = [
    "tests/kernel/test_discovery.py::test_exec_is_picked_up_within_a_second_and_dropped_on_exit",
    "tests/kernel/test_discovery.py::test_without_the_host_network_namespace_discovery_lists",
]
MATRIX: dict[str, list[str]] = {
    "5.10": [
        "tests/kernel",
        "-m",
        "not needs_collapse",
        *(arg for t in _NO_EVENTS for arg in ("--deselect", t)),
    ],
    "6.1": ["tests/kernel"],
    "6.12": ["tests/kernel"],
}
BUSYBOX = "busybox-static"
# The modules the initramfs loads (with what modules.dep says they need), in this order.
MODULES = ["virtio_pci", "9pnet_virtio", "9p"]
# QEMU 7.2's emulated AVX2 gives wrong results to numpy's AVX2 sort kernels (checked in
# these guests: np.unique(return_inverse=True) returned unsorted values, so run-length
# histograms came out wrong on 6.1 and 6.12 alike); without AVX2 in CPUID numpy takes
# its SSE4 paths and agrees with the host. MEMDEFRAGD_VM_CPU overrides it.
CPU = os.environ.get("MEMDEFRAGD_VM_CPU", "max,-avx2")
ROOT_TAG = "hostroot"
IO_TAG = "vmio"
IO_DIR = "/run/memdefragd-vm/io"  # where the guest sees the writable share


class VmError(RuntimeError):
    """Something the harness cannot do, said so that a person can act on it."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------ packages


@dataclass
class Package:
    name: str
    version: str
    sha256: str
    filename: str  # the archive path apt gives (pool/...)
    deb: Path | None = None


KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"  # holds Debian 11's keys too


class Apt:
    """apt-cache / apt-get download for one suite: the host's configuration (suite None),
    or a private one under cache/apt/SUITE (its own sources, lists and cache; packages
    still verified against Debian's archive keyring). `apt-get update` runs at most once,
    and only when a lookup fails (host) or the lists are missing (private)."""

    def __init__(self, cache: Path, suite: str | None = None):
        self.suite = suite
        self.updated = False
        self.options: list[str] = []
        if suite is None:
            return
        top = cache / "apt" / suite
        for d in ("state/lists/partial", "cache/archives/partial"):
            (top / d).mkdir(parents=True, exist_ok=True)
        sources = top / "sources.list"
        sources.write_text(
            f"deb [signed-by={KEYRING}] http://deb.debian.org/debian {suite} main\n"
            f"deb [signed-by={KEYRING}] http://deb.debian.org/debian-security {suite}-security main\n"
        )
        self.options = [
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State={top / 'state'}",
            "-o", f"Dir::Cache={top / 'cache'}",
            "-o", "Dir::State::status=/var/lib/dpkg/status",
        ]  # fmt: skip
        if not any((top / "state" / "lists").glob("*Packages*")):
            self.update()

    def run(self, tool: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return _run([tool, *self.options, *args], **kw)

    def update(self) -> bool:
        """`apt-get update` once (as root, or for a private suite); True if it ran and worked."""
        if self.updated or (self.suite is None and os.geteuid() != 0):
            return False
        self.updated = True
        print(f"vm: apt-get update ({self.suite or 'host sources'})", flush=True)
        r = self.run("apt-get", "update", "-q")
        if r.returncode != 0 and self.suite is not None:
            raise VmError(f"apt-get update for {self.suite} failed: {r.stderr.strip()[-500:]}")
        return r.returncode == 0

    def show(self, name: str) -> Package:
        """The candidate version apt would install, with its SHA256 from the signed index."""
        r = self.run("apt-cache", "show", "--no-all-versions", name)
        if r.returncode != 0 or not r.stdout.strip():
            raise VmError(f"apt-cache show {name} failed: {r.stderr.strip() or 'no such package'}")
        fields: dict[str, str] = {}
        for line in r.stdout.splitlines():
            if line == "":
                break
            k, sep, v = line.partition(": ")
            if sep:
                fields[k] = v.strip()
        try:
            return Package(name, fields["Version"], fields["SHA256"], fields["Filename"])
        except KeyError as e:
            raise VmError(f"apt-cache show {name}: no {e.args[0]} field") from None


def resolve(kernel: str, apt: Apt) -> str:
    """A package name for '6.1' / '6.12' / '5.10' (the newest apt offers), or a full name."""
    if kernel.startswith("linux-image-"):
        return kernel
    series = SERIES.get(kernel)
    if series is None:
        raise VmError(f"unknown kernel {kernel!r}: use one of {sorted(SERIES)} or a package name")
    pattern = series.pattern
    for attempt in range(2):
        r = apt.run("apt-cache", "search", "--names-only", pattern.pattern)
        found = sorted(
            (int(m.group(1)), m.group(0))
            for line in r.stdout.splitlines()
            if (m := pattern.match(line.split(" - ")[0].strip()))
        )
        if found:
            return found[-1][1]
        if attempt == 0 and not apt.update():
            break
    raise VmError(f"apt offers no package matching {pattern.pattern} (run apt-get update as root?)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _deb_path(debs: Path, pkg: Package) -> Path:
    """Where `apt-get download` leaves the file: NAME_VERSION_ARCH.deb, ':' written %3a."""
    arch = Path(pkg.filename).name.rsplit("_", 1)[-1]
    return debs / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{arch}"


def download(name: str, cache: Path, apt: Apt) -> Package:
    """`apt-get download` the candidate of `name` into cache/debs (once), checked against the
    SHA256 of apt's index; recorded in cache/debs/manifest.json."""
    pkg = apt.show(name)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    manifest_path = debs / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    deb = _deb_path(debs, pkg)
    if not (deb.exists() and sha256(deb) == pkg.sha256):
        deb.unlink(missing_ok=True)
        print(f"vm: apt-get download {pkg.name}={pkg.version}", flush=True)
        for attempt in range(2):
            r = apt.run("apt-get", "download", "-q", f"{pkg.name}={pkg.version}", cwd=debs)
            if r.returncode == 0:
                break
            if attempt == 0 and apt.update():
                pkg = apt.show(name)
                deb = _deb_path(debs, pkg)
                continue
            raise VmError(f"apt-get download {pkg.name} failed: {r.stderr.strip()[-500:]}")
        if not deb.exists():
            raise VmError(f"apt-get download {pkg.name} left no {deb.name} in {debs}")
        got = sha256(deb)
        if got != pkg.sha256:
            deb.unlink()
            raise VmError(f"{deb.name}: sha256 {got} but apt's index says {pkg.sha256}")
    pkg.deb = deb
    manifest[pkg.name] = {"version": pkg.version, "sha256": pkg.sha256, "file": deb.name}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return pkg


def extract(pkg: Package, cache: Path) -> Path:
    """dpkg-deb -x into cache/root/<name>_<version>, once (a marker says it finished)."""
    assert pkg.deb is not None
    dest = cache / "root" / f"{pkg.name}_{pkg.version}".replace("/", "_")
    done = dest / ".extracted"
    if done.exists() and done.read_text() == pkg.sha256:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    r = _run(["dpkg-deb", "-x", str(pkg.deb), str(dest)])
    if r.returncode != 0:
        raise VmError(f"dpkg-deb -x {pkg.deb.name} failed: {r.stderr.strip()}")
    done.write_text(pkg.sha256)
    return dest


# ------------------------------------------------------------------ initramfs


class Cpio:
    """A newc cpio archive written in memory (device nodes need no privilege here)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.parts += [
            hdr,
            nb,
            b"\0" * ((-(len(hdr) + len(nb))) % 4),
            data,
            b"\0" * ((-len(data)) % 4),
        ]

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


INIT = r"""#!/bin/busybox sh
# memdefragd VM guest, stage 1 (initramfs): mount the host root over 9p, then hand over.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do $B insmod /modules/$m || echo "vm-init: insmod $m failed"; done
$B ip link set lo up
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro __ROOT_TAG__ /newroot \
  || { echo "vm-init: cannot mount the host root"; $B sleep 1; echo o > /proc/sysrq-trigger; }
$B mount -t tmpfs -o mode=755 run /newroot/run
$B mkdir -p /newroot__IO_DIR__
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,rw __IO_TAG__ /newroot__IO_DIR__ \
  || echo "vm-init: cannot mount the results share"
[ "$MDVM_TMP" = 0 ] || $B mount -t tmpfs -o mode=1777 tmp /newroot/tmp
for d in dev proc sys; do $B mount --move /$d /newroot/$d; done
exec $B switch_root /newroot "$MDVM_PYTHON" "$MDVM_GUEST"
echo "vm-init: switch_root failed"; echo o > /proc/sysrq-trigger
"""


def _module_paths(kroot: Path, kver: str) -> list[Path]:
    """The module files to load, dependencies first. The package ships no modules.dep (depmod
    makes it on install), so each module's `depends=` is read from its .modinfo."""
    mdir = kroot / "lib" / "modules" / kver
    files = {_module_name(f): f for f in mdir.rglob("*.ko*")}
    order: list[Path] = []

    def add(name: str) -> None:
        f = files[name]
        if f in order:
            return
        m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", _module_bytes(f))
        for dep in m.group(1).decode().split(",") if m else []:
            if dep:
                add(dep.replace("-", "_"))
        order.append(f)

    for name in MODULES:
        if name in files:
            add(name)
        elif name != "virtio_pci":  # built in on Debian's kernels
            raise VmError(f"{kver}: no module {name} (a -cloud- flavour has no 9p)")
    return order


def _module_name(path: Path) -> str:
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", path.name).replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise VmError(f"{path.name}: zstd modules are not handled")
    return data


@dataclass
class Kernel:
    label: str  # what the user asked for: "6.1"
    package: Package
    root: Path
    kver: str
    vmlinuz: Path
    initrd: Path
    config: dict[str, str] = field(default_factory=dict)


def build_initramfs(
    kroot: Path, kver: str, busybox: Path, out: Path, modules: list[Path] | None = None
) -> None:
    """busybox, the init script and the 9p modules (`modules`; by default those of the
    package extracted at kroot; [] for a kernel with 9p built in)."""
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules", "run"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    names = []
    for path in _module_paths(kroot, kver) if modules is None else modules:
        name = _module_name(path) + ".ko"
        c.file(f"modules/{name}", _module_bytes(path))
        names.append(name)
    c.file("modules.order", ("\n".join(names) + "\n").encode())
    init = (
        INIT.replace("__ROOT_TAG__", ROOT_TAG)
        .replace("__IO_TAG__", IO_TAG)
        .replace("__IO_DIR__", IO_DIR)
    )
    c.file("init", init.encode(), 0o755)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(c.bytes(), 6))
    tmp.replace(out)


def prepare(label: str, cache: Path = DEFAULT_CACHE, host: Apt | None = None) -> Kernel:
    """Download (once), verify and extract a kernel, and build its initramfs in the cache.
    `host` is the host's Apt, shared between calls so that it updates at most once."""
    cache.mkdir(parents=True, exist_ok=True)
    host = host or Apt(cache)
    series = SERIES.get(label)
    apt = Apt(cache, series.suite) if series and series.suite else host
    pkg = download(resolve(label, apt), cache, apt)
    kroot = extract(pkg, cache)
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise VmError(f"{pkg.name}: no boot/vmlinuz-* in the package")
    kver = vmlinuz[-1].name.removeprefix("vmlinuz-")
    config: dict[str, str] = {}
    cfg = kroot / "boot" / f"config-{kver}"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep and k.startswith("CONFIG_"):
                config[k] = v
    bb = download(BUSYBOX, cache, host)
    bbroot = extract(bb, cache)
    busybox = bbroot / "bin" / "busybox"
    if not busybox.exists():
        raise VmError(f"{BUSYBOX}: no bin/busybox in the package")
    initrd = cache / f"initrd-{kver}.gz"
    stamp = cache / f"initrd-{kver}.stamp"
    want = hashlib.sha256((pkg.sha256 + bb.sha256 + INIT + repr(MODULES)).encode()).hexdigest()
    if not (initrd.exists() and stamp.exists() and stamp.read_text() == want):
        build_initramfs(kroot, kver, busybox, initrd)
        stamp.write_text(want)
    return Kernel(label, pkg, kroot, kver, vmlinuz[-1], initrd, config)


def prepare_image(
    image: Path, label: str, cache: Path = DEFAULT_CACHE, host: Apt | None = None
) -> Kernel:
    """A kernel image built elsewhere (Translation Ranger's v5.0, which no registry has),
    with 9p and virtio built in: an initramfs of busybox and the init script only."""
    if not image.is_file():
        raise VmError(f"{image}: no such kernel image")
    cache.mkdir(parents=True, exist_ok=True)
    digest = sha256(image)
    bb = download(BUSYBOX, cache, host or Apt(cache))
    busybox = extract(bb, cache) / "bin" / "busybox"
    initrd = cache / f"initrd-image-{digest[:16]}.gz"
    build_initramfs(image.parent, label, busybox, initrd, modules=[])
    pkg = Package(image.name, "local build", digest, str(image))
    return Kernel(label, pkg, image.parent, label, image, initrd)


# ------------------------------------------------------------------ running a guest


@dataclass
class TestResult:
    nodeid: str
    outcome: str  # passed, failed, error, skipped, xfailed
    message: str = ""
    # What the test recorded with pytest's record_property: evidence worth reading
    # whatever the outcome (the order a daemon worked in, say).
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class GuestRun:
    kernel: Kernel
    status: str  # "ok" (pytest ran and exited), "timeout", "crashed"
    pytest_exit: int | None
    wall: float
    results: list[TestResult]
    console: str
    dmesg: str
    guest_uname: str

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.pytest_exit == 0


def parse_junit(path: Path) -> list[TestResult]:
    results: list[TestResult] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        nodeid = f"{cls.replace('.', '/')}.py::{name}" if cls else name
        outcome, message = "passed", ""
        props = {
            p.get("name", ""): p.get("value", "") for p in case.iter("property") if p.get("name")
        }
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = (
                    ("failed" if child.tag == "failure" else "error"),
                    child.get("message", ""),
                )
            elif child.tag == "skipped":
                xfail = (child.get("type") or "") == "pytest.xfail"
                outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        results.append(TestResult(nodeid, outcome, message, props))
    return results


def qemu_binary() -> str:
    q = shutil.which("qemu-system-x86_64")
    if q is None:
        raise VmError(
            "qemu-system-x86_64 is not installed: `make vm-deps` (as root) installs qemu-system-x86"
        )
    return q


def run_guest(
    kernel: Kernel,
    pytest_args: list[str],
    *,
    timeout: float = 1800.0,
    memory: str = "4G",
    cpu: str = CPU,
    cpus: int = 2,
    env: dict[str, str] | None = None,
    keep: Path | None = None,
) -> GuestRun:
    """Boot `kernel`, run `pytest pytest_args` in the checkout as root, power off, and
    return what happened. QEMU is killed at `timeout` seconds."""
    qemu = qemu_binary()
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        raise VmError(f"{python} is missing: `make setup` first (the guest runs the host's .venv)")
    io = Path(tempfile.mkdtemp(prefix="memdefragd-vm-"))
    io.chmod(0o755)
    request = {
        "repo": str(REPO),
        "pytest": pytest_args,
        "env": {
            "MEMDEFRAGD_REQUIRE_KERNEL": os.environ.get("MEMDEFRAGD_REQUIRE_KERNEL", "1"),
            **(env or {}),
        },
        "io": IO_DIR,
    }
    (io / "request.json").write_text(json.dumps(request))
    under_tmp = str(REPO).startswith("/tmp/") or str(python.resolve()).startswith("/tmp/")
    append = " ".join(
        [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "loglevel=4",
            f"MDVM_PYTHON={python}",
            f"MDVM_GUEST={REPO / 'tests' / 'vm' / 'guest.py'}",
            f"MDVM_TMP={0 if under_tmp else 1}",
        ]
    )
    console = io / "console.log"
    cmd = [
        qemu,
        "-accel", "tcg", "-cpu", cpu, "-m", memory, "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initrd), "-append", append,
        "-serial", f"file:{console}", "-monitor", "none",
        "-fsdev", "local,id=hr,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=hr,mount_tag={ROOT_TAG}",
        "-fsdev", f"local,id=io,path={io},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=io,mount_tag={IO_TAG}",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    status = "ok"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    wall = time.monotonic() - start
    try:
        console_text = console.read_text(errors="replace")
        exit_file = io / "exit"
        pytest_exit = int(exit_file.read_text()) if exit_file.exists() else None
        if status == "ok" and pytest_exit is None:
            status = "crashed"
        if proc.returncode not in (0, None) and status == "ok":
            console_text += (
                f"\n[qemu exited {proc.returncode}: {out.decode(errors='replace')[-2000:]}]"
            )
        junit = io / "junit.xml"
        results = parse_junit(junit) if junit.exists() and junit.stat().st_size else []
        dmesg = (
            (io / "dmesg.txt").read_text(errors="replace") if (io / "dmesg.txt").exists() else ""
        )
        uname = (io / "uname.txt").read_text().strip() if (io / "uname.txt").exists() else ""
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for f in io.iterdir():
                shutil.copy2(f, keep / f.name)
    finally:
        shutil.rmtree(io, ignore_errors=True)
    return GuestRun(kernel, status, pytest_exit, wall, results, console_text, dmesg, uname)
