"""The `collapse` method: process_madvise(pidfd, MADV_COLLAPSE), one 2 MiB region per call.

One region per call because process_madvise reports a single errno for a whole vector
("only the most-recently-failed code will be set"): a region at a time tells exactly which
region failed and why, lets the caller stop between regions, and lets pacing meter work
2 MiB at a time.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Callable
from types import MappingProxyType

from ...model import PMD_SIZE, AccessDenied, Outcome, ProcessGone, Request
from . import procfs
from .procs import PidHandle, ProcDir

MADV_COLLAPSE = 25

# process_madvise's number comes from the machine's syscall table: x86_64 has it as 440
# (`common` ABI) and arm64 uses the asm-generic table, where it is 440 too. Other machines
# are refused rather than guessed (alpha, for one, uses 550).
PROCESS_MADVISE_NR = {"x86_64": 440, "aarch64": 440}

# errno -> Outcome.stopped: reasons that end the whole request, not just one region.
_STOPS = {
    errno.ENOMEM: "ENOMEM",  # no free huge page: the whole machine should back off
    errno.EBUSY: "EBUSY",  # the target's memory cgroup cannot take the huge page
    errno.ESRCH: "ESRCH",  # the process is gone (the pidfd went stale)
    errno.EBADF: "ESRCH",
    errno.EPERM: "EPERM",  # no CAP_SYS_NICE or no ptrace-read access: no call will work
    errno.EACCES: "EPERM",
}

CANCELLED = "cancelled"  # Outcome.stopped when should_stop() ended the request
UNMAPPED = "UNMAPPED"  # failure reason: ENOMEM because the region is no longer mapped


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


def process_madvise_nr(machine: str | None = None) -> int:
    """process_madvise's syscall number on this machine (os has no wrapper for it)."""
    machine = machine or os.uname().machine
    try:
        return PROCESS_MADVISE_NR[machine]
    except KeyError:
        raise NotImplementedError(
            f"process_madvise's syscall number is not known for machine {machine!r} "
            f"(known: {', '.join(sorted(PROCESS_MADVISE_NR))}); method 'collapse' cannot run here"
        ) from None


def _madvise_zero_length(advice: int) -> int:
    """madvise(0, 0, advice): 0, or the errno. The kernel checks that it knows the advice
    before it looks at the range, and a zero length then does nothing."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return ctypes.get_errno() if fn(None, 0, advice) != 0 else 0


def madv_collapse_refusal() -> str | None:
    """None where the kernel knows MADV_COLLAPSE (Linux 6.1+); else why method 'collapse'
    cannot run, and what memdefragd can still do there."""
    err = _madvise_zero_length(MADV_COLLAPSE)
    if err == 0:
        return None
    return (
        f"this kernel ({os.uname().release}) does not know MADV_COLLAPSE (Linux 6.1+; "
        f"madvise said {errno.errorcode.get(err, err)}): memdefragd can only measure here"
    )


_libc: ctypes.CDLL | None = None


def _syscall() -> Callable[..., int]:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # a private handle: our argtypes only
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def _process_madvise(nr: int, pidfd: int, start: int, length: int) -> tuple[int, int]:
    """One process_madvise(pidfd, {start, length}, 1, MADV_COLLAPSE, 0): (return, errno).

    Every argument goes as a full register (c_long/c_size_t): syscall(2) is variadic and
    reads whole words."""
    iov = _Iovec(start, length)
    ctypes.set_errno(0)
    ret = _syscall()(
        ctypes.c_long(nr),
        ctypes.c_long(pidfd),
        ctypes.byref(iov),
        ctypes.c_size_t(1),
        ctypes.c_long(MADV_COLLAPSE),
        ctypes.c_long(0),
    )
    return (ret, 0) if ret >= 0 else (-1, ctypes.get_errno())


def regions(request: Request) -> list[int]:
    """Start addresses of the request's 2 MiB regions, after checking every range.

    A range with no whole aligned 2 MiB block makes the kernel return 0 without doing
    anything, which would look like success: such ranges are refused here, never sent."""
    if request.method != "collapse":
        raise ValueError(f"request for method {request.method!r} given to method 'collapse'")
    out: list[int] = []
    seen: list[tuple[int, int]] = []
    for start, end in request.ranges:
        where = f"range [{start:#x}, {end:#x}) of pid {request.pid}"
        if start % PMD_SIZE or end % PMD_SIZE:
            raise ValueError(f"{where} is not 2 MiB-aligned")
        if end <= start:
            raise ValueError(f"{where} is empty")
        if start < request.vma_start or end > request.vma_end:
            raise ValueError(
                f"{where} is outside its VMA [{request.vma_start:#x}, {request.vma_end:#x})"
            )
        if any(start < e and s < end for s, e in seen):
            raise ValueError(f"{where} overlaps another range of the request")
        seen.append((start, end))
        out.extend(range(start, end, PMD_SIZE))
    return out


def _unmapped(handle: PidHandle, start: int, proc_root: str) -> bool:
    """Whether [start, start + 2 MiB) is no longer inside one VMA of the process.

    madvise says ENOMEM both for "no free huge page" and for "range not mapped"; the
    second only means the target changed its mappings, and must not make the whole
    machine back off."""
    try:
        with ProcDir(proc_root, handle.pid) as d:
            d.check_identity(handle.proc, alive=True)
            vmas = procfs.parse_smaps(d.read_text("maps"))
    except AccessDenied:
        return False
    return not any(v.start <= start and start + PMD_SIZE <= v.end for v in vmas)


def collapse(
    handle: PidHandle,
    request: Request,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    proc_root: str = "/proc",
) -> Outcome:
    """Collapse the request's regions into huge pages, region by region, in its order.

    Raises ValueError for a malformed request (before any call) and NotImplementedError on
    a machine whose syscall number is unknown; everything the kernel says is in the
    Outcome. Every region sent is either done or counted once in `failures` under its
    errno name (a short return, which one region should never give, counts as 'SHORT';
    ENOMEM for a region the target has unmapped since it was planned counts as UNMAPPED
    and does not stop the request). EAGAIN is retried once at once, as the kernel
    selftest does. `stopped` is the errno name that ended the request (see _STOPS), or
    CANCELLED when should_stop(), asked between regions, said so.
    """
    if handle.fd < 0:
        raise ValueError(f"PidHandle of pid {handle.pid} is closed")
    if (request.pid, request.start_time) != (handle.pid, handle.proc.start_time):
        raise ValueError(
            f"request for pid {request.pid} (start time {request.start_time}) given a handle "
            f"on pid {handle.pid} (start time {handle.proc.start_time})"
        )
    todo = regions(request)
    nr = process_madvise_nr()
    attempted = done = 0
    spent = 0.0
    failures: dict[str, int] = {}
    ineligible: list[int] = []
    stopped = ""
    for i, start in enumerate(todo):
        if i and should_stop():
            stopped = CANCELLED
            break
        attempted += PMD_SIZE
        for _ in range(2):  # EAGAIN: once more, straight away
            t0 = clock()
            ret, err = _process_madvise(nr, handle.pidfd, start, PMD_SIZE)
            spent += clock() - t0
            if err != errno.EAGAIN:
                break
        if err == 0:
            done += min(ret, PMD_SIZE)
            if ret < PMD_SIZE:
                failures["SHORT"] = failures.get("SHORT", 0) + 1
            continue
        name = errno.errorcode.get(err, str(err))
        if err == errno.ENOMEM:
            try:
                if _unmapped(handle, start, proc_root):
                    failures[UNMAPPED] = failures.get(UNMAPPED, 0) + 1
                    continue
            except ProcessGone:
                err, name = errno.ESRCH, "ESRCH"
        failures[name] = failures.get(name, 0) + 1
        if err == errno.EINVAL:
            ineligible.append(start)
        elif err in _STOPS:
            stopped = _STOPS[err]
            break
    return Outcome(
        request=request,
        bytes_attempted=attempted,
        bytes_done=done,
        failures=MappingProxyType(failures),
        duration=spent,
        stopped=stopped,
        ineligible=tuple(ineligible),
    )
