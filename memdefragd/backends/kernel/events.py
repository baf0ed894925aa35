"""Process events from the kernel's proc connector (netlink, pyroute2 `ProcEventSocket`):
the kernel backend's `process_events()` capability, which lets discovery see a new
process within a second instead of at the next listing.

`ProcEvents` runs one daemon thread that owns the netlink socket: pyroute2's sync API
runs a private asyncio loop per thread, so the socket is created, read (blocking `get()`)
and closed in that thread only. Any error from the socket means events were lost (an
overflowed receive buffer leaves the pyroute2 socket failing for good): the reader emits
``("lost", reason)``, closes the socket, waits with backoff, subscribes again and emits
``("lost", "resubscribed")``; discovery answers a lost event with a full rescan (and the
first subscription's ``("subscribed", None)`` too: the daemon does not wait for it). Where
the proc connector is unavailable (a network namespace other than the host's refuses the
subscription; a nested PID or user namespace gets none or foreign pids), the reader logs
it once and discovery falls back to listing.

Messages become the protocol's `Event`s (`translate`, `fork_of`: pure, unit-tested); forks
of any process are reported with the parent's pid (``("forked", (parent, child))``) so
discovery can tell forks of tracked processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..protocol import Event
from .privileges import CAP_NET_ADMIN, effective_capabilities, has_capability

log = logging.getLogger(__name__)

# Proc connector event codes (include/uapi/linux/cn_proc.h), as pyroute2's `what`.
PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_UID = 0x4
PROC_EVENT_COMM = 0x200
PROC_EVENT_EXIT = 0x80000000
KTHREADD_PID = 2  # parent of every kernel thread: its forks are never user processes
_PROCESS_KINDS = {PROC_EVENT_EXIT: "exit", PROC_EVENT_COMM: "comm", PROC_EVENT_UID: "uid"}


_MAX_QUEUE = 200_000  # events buffered for the consumer before we call them lost
_NETLINK_CONNECTOR, _CN_IDX_PROC = 11, 1  # linux/netlink.h, linux/connector.h
NAMESPACE_HINT = (
    "run memdefragd in the host's network, PID and user namespaces for prompt discovery"
)
CAPABILITY_HINT = "give memdefragd CAP_NET_ADMIN for prompt discovery"
OLD_KERNEL_HINT = "prompt discovery needs Linux 6.1 or later here"
_PR_SET_NAME, _PR_GET_NAME = 15, 16
_SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not in Python's socket module
# Seconds to subscribe (pyroute2's import included) before the log says no answer came.
SUBSCRIBE_TIMEOUT = 30.0


def fork_of(msg: Mapping[str, Any]) -> Event | None:
    """("forked", (parent tgid, child tgid)) for a FORK message that made a process."""
    if msg.get("what") != PROC_EVENT_FORK or msg["child_pid"] != msg["child_tgid"]:
        return None
    if msg["parent_tgid"] == KTHREADD_PID:
        return None
    return ("forked", (msg["parent_tgid"], msg["child_tgid"]))


def translate(msg: Mapping[str, Any]) -> Event | None:
    """One proc connector message as a compact event about a process (not a thread), or
    None for what discovery does not need."""
    what = msg.get("what")
    if what == PROC_EVENT_FORK:
        if msg["child_pid"] == msg["child_tgid"] and msg["parent_tgid"] != KTHREADD_PID:
            return ("fork", msg["child_tgid"])
        return None
    if what == PROC_EVENT_EXEC:
        return ("exec", msg["process_tgid"])  # exec makes the caller the group leader
    kind = _PROCESS_KINDS.get(what) if isinstance(what, int) else None
    if kind is not None and msg["process_pid"] == msg["process_tgid"]:
        return (kind, msg["process_tgid"])  # the group leader: /proc/PID shows its comm
    return None


class ProcEvents:
    """Process events from the kernel's proc connector, read by a daemon thread.

    `start()` subscribes (in the thread) and reports whether that worked; where it cannot
    (not in the host's network/PID/user namespaces), it logs once and the instance stays
    unavailable: `wait()` just sleeps, and `Discovery` lists periodically instead.
    """

    def __init__(
        self,
        *,
        rcvbuf: int | None = None,
        backoff: tuple[float, float] = (0.05, 5.0),
        socket_factory: Callable[[], Any] | None = None,
    ):
        """`rcvbuf` sets the socket's receive buffer in bytes (SO_RCVBUFFORCE as root,
        else SO_RCVBUF; the kernel doubles it); None keeps pyroute2's (1 MiB, so 2)."""
        self.rcvbuf = rcvbuf
        self.backoff = backoff
        self._factory = socket_factory
        self._queue: queue.Queue[Event] = queue.Queue(_MAX_QUEUE)
        self._overflow = threading.Event()
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why events are unavailable, if they are
        self.hint = NAMESPACE_HINT  # and what to do about it
        self.counters: dict[str, int] = {"events": 0, "lost": 0, "resubscribed": 0}

    @property
    def available(self) -> bool:
        return self._subscribed.is_set() and not self._stopping.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 0.0) -> bool:
        """Start the reader, which subscribes in its own thread; True once it has
        subscribed (within `timeout` seconds). The daemon does not wait (timeout 0):
        importing pyroute2 alone took 13 s in an emulated guest (tests/vm), and discovery
        lists /proc until events flow, then rescans once to cover the gap. Where the
        kernel refuses proc events here, the reader says so once in the log and discovery
        keeps listing."""
        if self._thread is None:
            if timeout > 0 and self._factory is None:
                import pyroute2  # noqa: F401  # before the clock starts: `timeout` is the kernel's

            self._thread = threading.Thread(target=self._run, name="procevents", daemon=True)
            self._thread.start()
        if timeout > 0:
            self._started.wait(timeout)
        return self._started.is_set() and self.error is None  # subscribed, at least once

    def _unavailable(self, error: str, hint: str | None = None) -> None:
        self.error = error
        self.hint = hint or self.hint
        log.warning(
            "proc events unavailable (%s): new processes will be found by listing /proc "
            "periodically; %s",
            self.error, self.hint,
        )  # fmt: skip
        self._started.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the reader thread; True once it has ended. The thread blocks in the
        socket's get(): we wake it with an event of our own (renaming this thread to its
        own name makes the kernel send a COMM event), repeated until the thread ends."""
        self._stopping.set()
        thread = self._thread
        if thread is None:
            return True
        if not self._started.is_set():
            # Still importing pyroute2 or subscribing, with nothing to wake it: it ends by
            # itself once there (a daemon thread: process exit does not wait for it).
            thread.join(min(timeout, 0.5))
            return not thread.is_alive()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            _poke()
            thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
        if thread.is_alive():
            log.warning("proc events reader did not stop within %g s", timeout)
            return False
        return True

    def wait(self, timeout: float) -> list[Event]:
        """Events queued so far, waiting up to `timeout` seconds for the first one."""
        out: list[Event] = []
        try:
            out.append(
                self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            )
        except queue.Empty:
            pass
        else:
            with contextlib.suppress(queue.Empty):
                while True:
                    out.append(self._queue.get_nowait())
        if self._overflow.is_set():
            self._overflow.clear()
            out.append(("lost", "event queue full"))
        return out

    def __enter__(self) -> ProcEvents:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the reader thread

    def _put(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._overflow.set()

    def _open(self) -> Any:
        """A subscribed socket, created in (and so owned by) the calling thread."""
        if self._factory is not None:
            return self._factory()
        return open_socket(self.rcvbuf)

    def _run(self) -> None:
        delay, first = self.backoff[0], True
        late = threading.Timer(SUBSCRIBE_TIMEOUT, self._late)
        late.daemon = True
        late.start()
        while not self._stopping.is_set():
            try:
                ps = self._open()
            except Exception as e:
                if first:
                    late.cancel()
                    if self._stopping.is_set():
                        return  # stopped meanwhile (the process may be exiting): say nothing
                    error = str(e) if isinstance(e, EventsUnavailable) else repr(e)
                    self._unavailable(error, getattr(e, "hint", None))
                    return
                log.debug("proc events: subscribing again failed: %r", e)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            opened = time.monotonic()
            self._subscribed.set()
            if first:
                first = False
                late.cancel()
                self._started.set()
                log.info("proc events: subscribed")
                self._put(("subscribed", None))  # what started before: one full rescan
            else:
                self.counters["resubscribed"] += 1
                self._put(("lost", "resubscribed"))  # events between failure and now
            try:
                self._read(ps)
            except Exception as e:
                if not self._stopping.is_set():
                    self.counters["lost"] += 1
                    self._put(("lost", f"{type(e).__name__}: {e}"))
                    log.info("proc events lost (%s: %s); subscribing again", type(e).__name__, e)
            finally:
                self._subscribed.clear()
                _close_quietly(ps)
            if time.monotonic() - opened > self.backoff[1]:
                delay = self.backoff[0]  # it ran well for a while: start the backoff over
            self._stopping.wait(delay)
            delay = min(delay * 2, self.backoff[1])

    def _late(self) -> None:
        """Still no answer from the proc connector: say so once (it may yet come)."""
        if not self._started.is_set() and not self._stopping.is_set():
            log.warning(
                "proc events: no answer from the proc connector within %g s; listing /proc "
                "periodically until one comes",
                SUBSCRIBE_TIMEOUT,
            )

    def _read(self, ps: Any) -> None:
        while not self._stopping.is_set():
            msgs = ps.get()
            if self._stopping.is_set():
                return
            for msg in msgs:
                if msg.get("header", {}).get("error") is not None:
                    raise OSError(f"netlink error message: {msg['header']['error']}")
                forked = fork_of(msg)
                if forked is not None:
                    self._put(forked)
                event = translate(msg)
                if event is not None:
                    self.counters["events"] += 1
                    self._put(event)


class EventsUnavailable(Exception):
    """Proc events cannot work here (and trying might block); `hint` says what to do."""

    def __init__(self, problem: str, hint: str = NAMESPACE_HINT):
        super().__init__(problem)
        self.hint = hint


def open_socket(rcvbuf: int | None = None) -> Any:
    """A pyroute2 ProcEventSocket, bound and subscribed. Call it in the thread that will
    read and close it. Raises EventsUnavailable, or whatever pyroute2 raises
    (ConnectionRefusedError outside the host's network namespace)."""
    problem = namespace_problem()
    if problem is not None:
        raise EventsUnavailable(problem)
    _check_permission()
    from pyroute2 import ProcEventSocket

    ps = ProcEventSocket()
    try:
        if rcvbuf:
            try:
                ps.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                ps.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        ps.bind()
        try:
            ps.control(listen=True)
        except struct.error as e:  # Linux 5.10 answers with a shorter message
            raise EventsUnavailable(
                f"pyroute2 cannot read this kernel's answer to the subscription ({e})",
                hint=OLD_KERNEL_HINT,
            ) from e
    except BaseException:
        _close_quietly(ps)
        raise
    return ps


def _check_permission() -> None:
    """Raise EventsUnavailable, naming CAP_NET_ADMIN, if the kernel refuses (EPERM) to let
    us join the proc connector's group. pyroute2 takes that refusal for a taken port id,
    tries others and ends in a KeyError that names no cause; so ask the kernel ourselves.
    Anything else is left for pyroute2 to meet (and report)."""
    if effective_capabilities() is not None and not has_capability(CAP_NET_ADMIN):
        # The kernel refuses the LISTEN of a process without it; 6.18 also refuses the
        # bind below, but 6.12 takes the bind and then simply sends nothing (seen in
        # tests/vm): ask the capability itself rather than wait for events that never come.
        raise EventsUnavailable(
            "memdefragd lacks CAP_NET_ADMIN, without which the kernel sends it no proc events",
            hint=CAPABILITY_HINT,
        )
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
    except OSError:
        return
    try:
        s.bind((0, _CN_IDX_PROC))
    except PermissionError as e:
        raise EventsUnavailable(
            "the kernel refused to subscribe to proc events (EPERM): memdefragd lacks "
            "CAP_NET_ADMIN",
            hint=CAPABILITY_HINT,
        ) from e
    except OSError:
        pass
    finally:
        s.close()


def _close_quietly(ps: Any) -> None:
    """Close a socket that may have failed. pyroute2's close runs its private event loop,
    whose callbacks can fail on a half-open socket: keep their tracebacks out of the log.
    A failed close leaves the loop and socket fds to the cyclic garbage collector."""
    with contextlib.suppress(Exception):
        ps.asyncore.event_loop.set_exception_handler(_loop_exception)
    try:
        ps.close()
    except Exception as e:
        log.debug("closing the proc event socket: %r", e)
        gc.collect()


def _loop_exception(loop: object, context: dict[str, Any]) -> None:
    log.debug("pyroute2 event loop: %s", context.get("exception") or context.get("message"))


_libc: Any = None


def _poke() -> None:
    """Make the kernel send a proc COMM event: rename the calling thread to its own name
    (prctl PR_SET_NAME reports to the proc connector even when the name is unchanged)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            ulong = ctypes.c_ulong
            _libc.prctl.argtypes = (ctypes.c_int, ctypes.c_char_p, ulong, ulong, ulong)
        name = ctypes.create_string_buffer(16)
        if _libc.prctl(_PR_GET_NAME, name, 0, 0, 0) == 0:
            _libc.prctl(_PR_SET_NAME, name, 0, 0, 0)
    except (OSError, AttributeError) as e:
        log.debug("cannot rename a thread to wake the proc events reader: %r", e)


def namespace_problem(proc_root: str = "/proc") -> str | None:
    """Why proc events cannot work from this process's namespaces, or None if they may.

    The kernel ignores subscriptions from outside the initial user and PID namespaces, and
    events carry host pids, so a nested PID namespace would look up the wrong processes.
    (Outside the host's network namespace the subscription is refused: found on start.)
    """
    try:
        with open(f"{proc_root}/self/status") as f:
            nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
        if len(nspid) > 1:
            return "in a nested PID namespace: proc events carry host pids"
        try:
            with open(f"{proc_root}/self/uid_map") as f:
                if f.read().split() != ["0", "0", "4294967295"]:
                    return "in a user namespace: the kernel ignores its proc event subscriptions"
        except FileNotFoundError:
            pass  # a kernel without user namespaces (CONFIG_USER_NS off): the initial one
    except OSError as e:
        return f"cannot read {proc_root}/self: {e.strerror}"
    return None
