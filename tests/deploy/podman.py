"""Podman in place of a Docker engine, to build the Dockerfile's image and run it on this
project's machines (which have no Docker engine and cannot reach Docker Hub).

The recipe (worked out on Debian 12, podman 4.3.1, runc 1.1.5, kernel 6.18, hybrid cgroups,
systemd installed but not PID 1, root without CAP_SYS_RESOURCE):

* podman reads its settings from files written into the test's directory and named by
  CONTAINERS_CONF and CONTAINERS_STORAGE_CONF: nothing under /etc/containers changes.
* ``cgroup_manager = "cgroupfs"``: the systemd manager needs systemd as PID 1. ``runtime =
  "runc"`` (the Makefile installs it): crun 1.8 refuses hybrid cgroups ("cgroups in hybrid
  mode not supported, drop all controllers from cgroupv2").
* ``default_ulimits = []``: otherwise podman 4.3 raises RLIMIT_NOFILE and RLIMIT_NPROC in
  the container, and without CAP_SYS_RESOURCE runc fails with "error setting rlimits for
  ready process: error setting rlimit type 7: operation not permitted" (``--ulimit host``
  fails the same way). With an empty list the container keeps the caller's limits.
* Storage: the overlay driver in a cache directory outside the checkout (CACHE below), so
  the base image is made once; ``--layers=false`` builds leave no intermediate images.
* The base image, for ``--build-arg PYTHON_IMAGE``: a ``debootstrap --variant=minbase`` of
  the host's Debian release (nspawn.host_release) with python3, python3-venv and
  python-is-python3 (the official image's ``python``), ``podman import``-ed. Debian 12's
  Python is 3.11, as the Dockerfile's pinned tag.
* Build: ``--network host`` (pip needs PyPI; podman's own bridge network would have
  netavark add iptables rules and turn on IP forwarding on the host); the host's CA bundle
  and a pip.conf naming it are mounted for the RUN steps, as the host may reach PyPI through
  a TLS-intercepting proxy that only the host trusts; ``--format docker``, since HEALTHCHECK
  exists only in Docker's image format (the OCI format drops it).
* Run: ``--network slirp4netns:port_handler=slirp4netns`` gives the container a network
  namespace of its own with ``-p`` forwarded by a user-space process: Docker's default, as
  the README's command expects, without touching the host's firewall.
* Healthchecks: podman schedules them with systemd timers ("unable to get systemd connection
  to add healthchecks", logged and harmless here); ``podman healthcheck run`` runs one now.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

from . import nspawn

CACHE = Path(os.environ.get("MEMDEFRAGD_CONTAINER_CACHE", "/var/cache/memdefragd-container"))
RUNROOT = "/run/memdefragd-container"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3")
BASE_REPO = "localhost/memdefragd-test-base"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The network of `podman run`: see the module's docstring.
RUN_NETWORK = "slirp4netns:port_handler=slirp4netns"


class Unavailable(Exception):
    """podman cannot run here (with the reason): the caller skips, or fails under CI."""


def check_host() -> None:
    """Raise Unavailable unless this host has what the recipe needs."""
    if os.geteuid() != 0:
        raise Unavailable("the container test runs podman as root")
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("debootstrap", "debootstrap"),
                          ("slirp4netns", "slirp4netns")):  # fmt: skip
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (apt-get install {package})")


class Podman:
    """podman with this recipe's configuration, written into ``workdir``."""

    def __init__(self, workdir: Path, cache: Path = CACHE):
        self.cache = cache
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{cache / "storage"}"\n'
            f'runroot = "{RUNROOT}"\n'
        )
        (workdir / "containers.conf").write_text(
            "[containers]\ndefault_ulimits = []\n\n"
            '[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
        )
        (workdir / "pip.conf").write_text(f"[global]\ncert = {CA_BUNDLE}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERS_", "BUILDAH_"))}
        self.env = {
            **env,
            "CONTAINERS_CONF": str(workdir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf"),
        }

    def __call__(
        self, *args: str, timeout: float = 120.0, check: bool = True, stdin=None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["podman", *args], env=self.env, stdin=stdin, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {r.returncode}\n"
                f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
            )
        return r

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def ensure_base(self, log=print) -> str:
        """The base image, debootstrapped and imported first if need be (~1 min, needs the
        host's Debian mirror); kept in the cache's storage for later runs."""
        codename, mirror = nspawn.host_release()  # raises nspawn.Unavailable off Debian
        image = f"{BASE_REPO}:{codename}"
        if self.exists(image):
            return image
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / "base.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.exists(image):  # made by another run meanwhile
                return image
            t0 = time.monotonic()
            log(f"building the base image {image} ({codename} from {mirror}); once, ~1 min")
            root = self.cache / f"rootfs-{codename}.partial"
            shutil.rmtree(root, ignore_errors=True)
            debs = self.cache / "debs"
            debs.mkdir(exist_ok=True)
            cmd = [
                "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                f"--cache-dir={debs}", codename, str(root), mirror,
            ]  # fmt: skip
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if r.returncode != 0:
                    tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
                    raise Unavailable(f"debootstrap {codename} from {mirror} failed:\n{tail}")
                for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                    for f in (root / leftover).glob("*"):
                        if f.is_file():
                            f.unlink()
                tar = subprocess.Popen(
                    ["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE
                )
                try:
                    self("import", "--change", "ENV=LANG=C.UTF-8", "--change",
                         'CMD=["python3"]', "-", image, stdin=tar.stdout, timeout=600)  # fmt: skip
                finally:
                    assert tar.stdout is not None
                    tar.stdout.close()
                    tar.wait()
            finally:
                shutil.rmtree(root, ignore_errors=True)
            log(f"base image {image} made in {time.monotonic() - t0:.1f} s")
        return image

    def build(self, context: Path, tag: str, base: str) -> subprocess.CompletedProcess[str]:
        """`podman build` of context's Dockerfile on `base` (see the module's docstring)."""
        mounts = []
        if CA_BUNDLE.exists():
            mounts = ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
                      "--volume", f"{self.workdir / 'pip.conf'}:/etc/pip.conf:ro"]  # fmt: skip
        return self(
            "build", "--pull=never", "--layers=false", "--format=docker", "--network=host",
            *mounts, "--build-arg", f"PYTHON_IMAGE={base}", "--tag", tag, str(context),
            timeout=900, check=False,
        )  # fmt: skip
