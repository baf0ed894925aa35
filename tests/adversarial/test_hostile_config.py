"""Config files and config paths built to hurt a root daemon.

- A path through a directory `nobody` owns, its symlink flipped by `nobody` between root's
  config and nobody's (3 in 20,000 loads took nobody's before): every load is refused.
- A file swapped by rename, or a symlink flipped, in a directory only root writes: a load
  returns root's config or refuses, judged on the descriptor it read (before: checked by
  path and read again by path, 700 to 2,900 loads in 1.5 s returned nobody's config).
- A 50 MB config: refused by its size before a byte is read (before: over 120 s at
  2.1 GiB in check-config, over a minute of a stalled daemon after SIGHUP).
- `check-config` on a secret (a root-owned 0600 file, /etc/shadow): exit 2, and no piece of
  the secret in what it prints (before: the first line, quoted).
- Non-UTF-8: exit 2 with file:line:column (before: a UnicodeDecodeError traceback, exit 1).
- The daemon reloading such files on SIGHUP: a failure naming the file, and SIGTERM still
  honoured within 2 s.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memdefragd.cli import main
from memdefragd.config import ConfigError, load_config
from memdefragd.units import format_size
from tests.kernel.helpers import require_kernel, write_config
from tests.paths import REPO

NOBODY = pwd.getpwnam("nobody")
TRUSTED = "targets:\n  - name: trusted\n"
EVIL = "targets:\n  - name: evil\n"
RACE_SECONDS = 1.5  # per race; thousands of loads each


def _flipper(path: Path, sources: tuple[str, str], *, as_nobody: bool, link: bool) -> int:
    """A child process that replaces `path` as fast as it can, atomically (rename), with a
    symlink to each of `sources` in turn (link) or a hard link to each (not link)."""
    pid = os.fork()
    if pid == 0:  # only system calls here, then _exit: nothing of pytest runs in the child
        try:
            if as_nobody:
                os.setgroups([])
                os.setgid(NOBODY.pw_gid)
                os.setuid(NOBODY.pw_uid)
            tmp = f"{path}.flip"
            i = 0
            while True:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                (os.symlink if link else os.link)(sources[i & 1], tmp)
                os.rename(tmp, path)
                i += 1
        finally:
            os._exit(0)
    return pid


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _race(path: Path, watch: Callable[[], str]) -> tuple[Counter[str], set[str]]:
    """Load `path` for RACE_SECONDS: outcomes by target name or refusal reason, and what
    `watch()` saw the path to be meanwhile (so that the flipper is known to have flipped)."""
    outcomes: Counter[str] = Counter()
    seen: set[str] = set()
    end = time.monotonic() + RACE_SECONDS
    while time.monotonic() < end:
        for _ in range(50):
            try:
                outcomes[load_config(path).targets[0].name] += 1
            except ConfigError as e:
                msg = str(e)
                reason = next(
                    (r for r in ("symbolic link", "directory owned by nobody", "owned by nobody",
                                 "No such file") if r in msg),
                    msg,
                )  # fmt: skip
                outcomes[reason] += 1
        seen.add(watch())
    return outcomes, seen


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory `nobody` owns and writes, where `nobody` can reach it: under /tmp."""
    require_kernel(os.geteuid() == 0, "chown and setuid need root")
    d = Path(tempfile.mkdtemp(prefix="mdd-nobody-", dir="/tmp"))
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_symlink_nobody_flips_never_yields_nobodys_config(tmp_path, nobody_dir):
    good = tmp_path / "good.yaml"  # root's, where nobody cannot even look
    good.write_text(TRUSTED)
    evil = nobody_dir / "evil.yaml"
    evil.write_text(EVIL)
    os.chown(evil, NOBODY.pw_uid, NOBODY.pw_gid)
    path = nobody_dir / "memdefragd.yaml"
    path.symlink_to(good)
    # At rest, pointing at root's own file, it is refused all the same: nobody may flip it.
    with pytest.raises(
        ConfigError, match=r"under /tmp/mdd-nobody-\w+, a directory owned by nobody"
    ):
        load_config(path)
    pid = _flipper(path, (str(good), str(evil)), as_nobody=True, link=True)
    try:
        outcomes, seen = _race(path, lambda: _readlink(path))
    finally:
        _stop(pid)
    assert seen >= {str(good), str(evil)}, seen  # it did flip under the loads
    assert set(outcomes) <= {"directory owned by nobody", "symbolic link"}, outcomes
    assert sum(outcomes.values()) >= 1000, outcomes


@pytest.mark.parametrize("link", [False, True], ids=["renamed-file", "flipped-symlink"])
def test_a_path_swapped_in_roots_directory_is_judged_on_what_was_opened(tmp_path, link):
    """Root's directory, so only root can swap: the swap itself is the test's. Whatever is
    at the path when it is opened is what is checked and read, never one file checked and
    another read."""
    require_kernel(os.geteuid() == 0, "chown needs root")
    d = tmp_path / "etc"
    d.mkdir()
    good, evil = d / "good", d / "evil"
    good.write_text(TRUSTED)
    evil.write_text(EVIL)
    os.chown(evil, NOBODY.pw_uid, NOBODY.pw_gid)
    path = d / "memdefragd.yaml"
    pid = _flipper(path, (str(good), str(evil)), as_nobody=False, link=link)
    try:
        outcomes, seen = _race(path, lambda: str(os.lstat(path).st_uid) if path.exists() else "")
    finally:
        _stop(pid)
    assert "evil" not in outcomes, outcomes
    if link:
        assert set(outcomes) <= {"symbolic link", "No such file"}, outcomes
    else:
        assert seen >= {"0", str(NOBODY.pw_uid)}, seen
        assert set(outcomes) <= {"trusted", "owned by nobody", "No such file"}, outcomes
        assert outcomes["trusted"] and outcomes["owned by nobody"], outcomes
    assert sum(outcomes.values()) >= 1000, outcomes


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _huge_config(path: Path, size: int = 50_000_000) -> Path:
    """A real config (targets with match, min_rss, priority), `size` bytes of it."""
    block = "".join(
        f"  - name: t{i}\n    match: {{comm: '^w{i}$', user: [root, 0]}}\n    min_rss: 64M\n"
        for i in range(1000)
    )
    with open(path, "w") as f:
        f.write("targets:\n")
        n = 0
        while f.tell() < size:
            f.write(block.replace("name: t", f"name: b{n}t"))
            n += 1
    os.chmod(path, 0o644)
    return path


CHECK_WITH_PEAK = """\
import resource, sys
from memdefragd.cli import main
code = main(["check-config", sys.argv[1]])
print("peak-rss-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def test_a_huge_config_is_refused_by_its_size_before_parsing(tmp_path):
    huge = _huge_config(tmp_path / "huge.yaml")
    r = subprocess.run(
        [sys.executable, "-c", CHECK_WITH_PEAK, str(huge)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    refusal = (
        f"{huge}: refusing a config of {format_size(huge.stat().st_size)}: the limit is 1.0 MiB"
    )
    assert refusal in r.stderr, r.stderr
    peak_kib = int(r.stderr.rpartition("peak-rss-kib ")[2])
    baseline = subprocess.run(
        [sys.executable, "-c", CHECK_WITH_PEAK, str(REPO / "etc" / "memdefragd.yaml")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert baseline.returncode == 0, baseline.stderr
    base_kib = int(baseline.stderr.rpartition("peak-rss-kib ")[2])
    assert peak_kib < base_kib + 8 * 1024, (peak_kib, base_kib)  # not the file's 48 MiB
    # In this process: nothing of the file is held, since nothing of it is read.
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            load_config(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, peak
    assert info.value.errors[0].startswith(refusal)


SECRET = "Qz8vXw3Jk7Lp9Rt2"  # fixed: a random one could share 4 letters with a message


@pytest.mark.parametrize(
    "content",
    [
        f"root:$y$j9T${SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n".encode(),
        f"{SECRET}\n".encode(),
        f"api_key: {SECRET}\n".encode(),
        f"{SECRET}: 1\n".encode(),
        f"- {SECRET}\n".encode(),
        f"[{SECRET}\n".encode(),
        f"'{SECRET}\n".encode(),
        f"*{SECRET}\n".encode(),
        f"targets:\n  - name: a\n    mode: {SECRET}\n".encode(),
        f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n-----END OPENSSH PRIVATE KEY-----\n".encode(),
        SECRET.encode() + b"\xff\n",
        SECRET.encode() + b"\x00\n",
    ],
    ids=lambda c: c[:12].decode(errors="replace"),
)  # fmt: skip
def test_check_config_never_prints_what_a_secret_file_says(tmp_path, capsys, content):
    f = tmp_path / "secret"
    f.write_bytes(content)
    os.chmod(f, 0o600)
    assert main(["check-config", str(f)]) == 2
    out = "".join(capsys.readouterr())
    assert out.startswith(f"{f}:"), out
    for i in range(len(SECRET) - 3):
        assert SECRET[i : i + 4] not in out, out


def test_check_config_on_etc_shadow_exits_2_and_prints_none_of_it():
    shadow = Path("/etc/shadow")
    if not os.access(shadow, os.R_OK):
        pytest.skip("/etc/shadow is not readable here")
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "check-config", str(shadow)],
        capture_output=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    out = r.stdout + r.stderr
    assert out.startswith(b"/etc/shadow:") and b"Traceback" not in out, out
    for line in shadow.read_bytes().splitlines():
        fields = line.split(b":")
        assert line not in out
        # Password fields (hashes, or * and !), and the date fields after them.
        for field in fields[1:3]:
            if len(field) >= 4:
                assert field not in out, field


def test_non_utf8_config_exits_2_with_line_and_column(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_bytes(b"targets:\n  - name: caf\xe9\n")  # Latin-1
    os.chmod(f, 0o644)
    r = subprocess.run(
        [sys.executable, "-m", "memdefragd.cli", "check-config", str(f)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{f}:2:14: not valid UTF-8 (byte 23 of the file)"), r.stderr


def _failures(text: str) -> list[str]:
    return [line for line in text.splitlines() if "reload failed" in line]


@pytest.mark.kernel
def test_reloading_a_huge_or_non_utf8_config_fails_fast_and_sigterm_still_works(daemons, tmp_path):
    cfg = write_config(tmp_path / "m.yaml", "mdd-no-such-comm")
    d = daemons(cfg)
    d.wait_for("started:")
    status = Path(f"/proc/{d.proc.pid}/status")

    _huge_config(tmp_path / "huge.tmp")
    os.replace(tmp_path / "huge.tmp", cfg)
    d.proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + 10
    while len(_failures(d.text())) < 1:
        assert time.monotonic() < end, d.text()
        time.sleep(0.05)
    (huge,) = _failures(d.text())
    size = format_size(cfg.stat().st_size)
    assert f"{cfg}: refusing a config of {size}: the limit is 1.0 MiB" in huge, huge

    cfg.write_bytes(b"targets:\n  - name: caf\xe9\n")
    d.proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + 10
    while len(_failures(d.text())) < 2:
        assert time.monotonic() < end, d.text()
        time.sleep(0.05)
    bad = _failures(d.text())[1]
    assert f"{cfg}:2:14: not valid UTF-8" in bad, bad
    assert "Traceback" not in d.text()
    hwm_kib = int(
        next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")).split()[1]
    )
    assert hwm_kib < 300 * 1024, hwm_kib  # the file is 48 MiB; parsing it took 1.7 GB

    assert d.proc.poll() is None  # still running, on the config it started with
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=2) == 0
