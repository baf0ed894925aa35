"""Processes as /proc shows them, read race-safely through a /proc/PID directory fd.

Once /proc/PID is open, every file read through that fd belongs to that process or fails
with ESRCH: a recycled PID can never slip in. Identity is pid plus start time.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from contextlib import contextmanager

from ...model import PAGE_SIZE, AccessDenied, ProcessGone, ProcessInfo
from ...pipeline.targets import MAX_CMDLINE
from . import procfs


class ProcDir:
    """An open /proc/PID directory."""

    def __init__(self, proc_root: str, pid: int):
        self.pid = pid
        try:
            self.fd = os.open(f"{proc_root}/{pid}", os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError) as e:
            # ESRCH (ProcessLookupError): the process is exiting at this very moment
            raise ProcessGone(f"pid {pid}: no such process") from e
        except PermissionError as e:  # hidepid=noaccess, for one
            raise AccessDenied(f"pid {pid}: {e.strerror}") from e

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ProcDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, name: str, flags: int = os.O_RDONLY) -> int:
        with translate_errors(self.pid, name):
            return os.open(name, flags | os.O_CLOEXEC, dir_fd=self.fd)

    def read_text(self, name: str, limit: int | None = None) -> str:
        """The file's text (bytes that are not UTF-8 kept as surrogate escapes); with
        `limit`, only its first `limit` bytes are read."""
        fd = self.open(name)
        try:
            with translate_errors(self.pid, name):
                chunks: list[bytes] = []
                size, most = 0, (1 << 62) if limit is None else limit
                while size < most and (chunk := os.read(fd, min(most - size, 1 << 20))):
                    chunks.append(chunk)
                    size += len(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "surrogateescape")

    def readlink(self, name: str) -> str | None:
        try:
            with translate_errors(self.pid, name):
                return os.readlink(name, dir_fd=self.fd)
        except AccessDenied:
            return None  # another user's process without CAP_SYS_PTRACE
        except OSError:
            return None
        # ProcessGone (ENOENT: exited, or a zombie, whose exe link is gone) propagates.

    def info(self) -> ProcessInfo:
        stat = procfs.parse_stat(self.read_text("stat"))
        if int(stat["flags"]) & procfs.PF_KTHREAD:
            raise ProcessGone(f"pid {self.pid}: kernel thread, no user memory")
        # Its owner controls it, up to megabytes: read what a `cmdline` pattern sees and no
        # more (byte for byte, with the NULs between arguments as the spaces it sees).
        raw = self.read_text("cmdline", limit=MAX_CMDLINE)
        cmdline = tuple(raw.rstrip("\0").split("\0")) if raw else ()
        return ProcessInfo(
            pid=self.pid,
            comm=str(stat["comm"]),
            cmdline=cmdline,
            exe=self.readlink("exe"),
            uid=procfs.parse_status_uid(self.read_text("status")),
            cgroup=_cgroup(self),
            start_time=int(stat["start_time"]),
            rss=int(stat["rss_pages"]) * PAGE_SIZE,
            activity=(int(stat["minflt"]), int(stat["majflt"]), int(stat["vsize"])),
        )

    def check_identity(self, proc: ProcessInfo, *, alive: bool = False) -> str:
        """Raise ProcessGone if this is not the process `proc` describes (or, with `alive`,
        if it is exiting or a zombie); return its state."""
        stat = procfs.parse_stat(self.read_text("stat"))
        if int(stat["start_time"]) != proc.start_time:
            raise ProcessGone(f"pid {self.pid}: reused by another process")
        state = str(stat["state"])
        if alive and (state in ("Z", "X") or int(stat["flags"]) & procfs.PF_EXITING):
            raise ProcessGone(f"pid {self.pid}: exiting")
        return state


def _cgroup(d: ProcDir) -> str:
    try:
        return procfs.parse_cgroup(d.read_text("cgroup"))
    except AccessDenied:
        return ""


@contextmanager
def translate_errors(pid: int, what: str) -> Iterator[None]:
    """Map the errors a vanishing or protected process causes onto our two exceptions."""
    try:
        yield
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(f"pid {pid}: {what}: process exited") from e
    except PermissionError as e:
        raise AccessDenied(f"pid {pid}: {what}: {e.strerror}") from e
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessGone(f"pid {pid}: {what}: process exited") from e
        raise


# Whether this kernel has pidfd_open (Linux 5.3+); None until first asked.
_HAS_PIDFD: bool | None = None
NO_PIDFD_REASON = (
    "this kernel has no pidfd_open (Linux < 5.3): processes are pinned by their /proc "
    "directory fd and start time instead, which is as safe against pid reuse for reading "
    "and for Translation Ranger's syscall (it takes a pid), but gives no pidfd for "
    "process_madvise (which such a kernel lacks too)"
)


def pidfd_refusal() -> str | None:
    """None where the kernel has pidfd_open; else what replaces it."""
    if _HAS_PIDFD is None:
        try:
            os.close(os.pidfd_open(os.getpid()))
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _no_pidfd()
        else:
            _set_pidfd(True)
    return None if _HAS_PIDFD else NO_PIDFD_REASON


def _no_pidfd() -> None:
    _set_pidfd(False)


def _set_pidfd(value: bool) -> None:
    global _HAS_PIDFD
    _HAS_PIDFD = value


class PidHandle:
    """One process, pinned, proven to be the process `proc` describes.

    Where the kernel has pidfd_open (5.3+), the pin is a pidfd; on older kernels (5.0, the
    Translation Ranger kernel) it is the /proc/PID directory fd, through which reads of a
    process that exited fail with ESRCH even once its pid is reused. Either is opened
    first and the start time checked after: if the pid had been reused in between, the
    check fails; once it passes, the pin can never refer to another process.
    """

    def __init__(self, proc: ProcessInfo, proc_root: str = "/proc"):
        self.proc = proc
        self.proc_root = proc_root
        self._dir: ProcDir | None = None
        self.fd = self._pidfd(proc.pid) if _HAS_PIDFD is not False else -1
        if self.fd < 0:  # no pidfd_open here: the directory is the pin
            self._dir = ProcDir(proc_root, proc.pid)
            self.fd = self._dir.fd
        try:
            self.check_alive()
        except BaseException:
            os.close(self.fd)
            raise

    @staticmethod
    def _pidfd(pid: int) -> int:
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError as e:
            raise ProcessGone(f"pid {pid}: no such process") from e
        except OSError as e:
            if e.errno == errno.ENOSYS:
                _no_pidfd()
                return -1
            if e.errno != errno.EINVAL:
                raise
            # The pid leads no thread group now: the pid already names a thread of another
            # process, or (kernels before 6.15) its process is being reaped at this moment.
            raise ProcessGone(f"pid {pid}: no such process") from e

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def is_pidfd(self) -> bool:
        return self._dir is None

    @property
    def pidfd(self) -> int:
        """The pidfd, for process_madvise; NotImplementedError on a kernel without."""
        if not self.is_pidfd:
            raise NotImplementedError(NO_PIDFD_REASON)
        return self.fd

    def check_alive(self) -> None:
        """Raise ProcessGone unless the process is still the one `proc` describes and not
        exiting (a closed handle counts as gone)."""
        if self.fd < 0:
            raise ProcessGone(f"pid {self.pid}: handle closed")
        if self.is_pidfd:
            if self.exited:  # a pidfd is readable once its process has exited
                raise ProcessGone(f"pid {self.pid}: exited")
            with ProcDir(self.proc_root, self.pid) as d:
                d.check_identity(self.proc, alive=True)
            return
        assert self._dir is not None
        self._dir.check_identity(self.proc, alive=True)  # through the pin, not a lookup

    @property
    def exited(self) -> bool:
        """The process has exited (zombie or reaped): discovery asks before tracking it. A
        pidfd polls readable then; a /proc directory fd always polls readable, so without
        a pidfd the answer comes from reading through the pin."""
        if self.is_pidfd:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            return bool(poller.poll(0))
        try:
            self.check_alive()
        except ProcessGone:
            return True
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PidHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_pids(proc_root: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(proc_root) if n.isdigit())
