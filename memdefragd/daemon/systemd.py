"""systemd service-manager integration with no dependency: sd_notify and the watchdog.

The unit runs as ``Type=notify`` (systemd 252 on Debian 12 has no ``notify-reload``):

* ``Notifier`` sends the sd_notify(3) datagrams: ``READY=1`` once the first scan is set up,
  ``STATUS=`` for ``systemctl status``, ``RELOADING=1`` + ``MONOTONIC_USEC=`` on SIGHUP and
  ``READY=1`` again when the reload is done, ``STOPPING=1`` and ``WATCHDOG=1``.
  Without ``$NOTIFY_SOCKET`` (run by hand, in Docker, in tests) every call is a no-op.
* ``watchdog_interval()`` reads ``WATCHDOG_USEC``/``WATCHDOG_PID`` like sd_watchdog_enabled(3)
  (systemd-python does not wrap it) and returns how often to ping: half the timeout.
* ``Watchdog`` is the pure bookkeeping the main scheduler loop uses to ping on time. Ping from
  that loop, not from a timer thread: a thread would keep pinging while the loop is stuck.

Transport errors are logged at debug level and never raised: the daemon must not die because
the service manager went away. A field name that is not ``[A-Z_][A-Z0-9_]*`` is a programming
error and raises ``ValueError``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "Watchdog", "watchdog_interval"]

log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")

# How long a send may block when the manager's queue is full. sd_notify(3) is blocking too;
# a short bound keeps a wedged manager from stalling the main loop (and thereby the watchdog).
SEND_TIMEOUT = 1.0


def _address(value: str | None) -> str | bytes | None:
    """The socket address for a $NOTIFY_SOCKET value, or None when there is none we can use.

    sd_notify(3) accepts an absolute path or '@name' for the abstract namespace. systemd >= 254
    also passes 'vsock:...' addresses to VMs; those do not apply to a host daemon.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    log.debug("NOTIFY_SOCKET=%r is neither an absolute path nor '@abstract'; ignored", value)
    return None


class Notifier:
    """Sends sd_notify(3) messages to ``$NOTIFY_SOCKET``; a no-op when it is unset.

    Every method returns True if the datagram was sent, False otherwise (no socket, or an
    error that was logged at debug level).

    One pure implementation, deliberately, instead of ``systemd.daemon.notify`` when
    systemd-python happens to be importable: the protocol is small, stable and documented
    (sd_notify(3) "Notes" invites reimplementing it, as gunicorn and suricata do), a single
    code path behaves identically with and without the optional package, it can be tested
    against a plain socket, and it lets us choose the timeout and error handling. The C
    binding would add nothing we use (no watchdog helper, and we format MONOTONIC_USEC
    ourselves either way).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_path: str | None = env.get("NOTIFY_SOCKET") or None
        self._address = _address(self.socket_path)

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines, in the order given, as one datagram.

        Names are upper-cased (``send(status="x")`` sends ``STATUS=x``). A newline inside a
        value would start a new field, so newlines are replaced by spaces.
        """
        lines = []
        for name, value in fields.items():
            key = name.upper()
            if not _FIELD_NAME.fullmatch(key):
                raise ValueError(f"invalid sd_notify field name: {name!r}")
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={text}")
        if not lines or self._address is None:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s (message %r)", self.socket_path, exc, payload)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=text, shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, µs), as notify-reload requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.send(RELOADING=1, MONOTONIC_USEC=usec)
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping."""
        return self.send(WATCHDOG=1)


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is armed for this process.

    Follows sd_watchdog_enabled(3): ``WATCHDOG_USEC`` is the timeout; if ``WATCHDOG_PID`` is
    set and is not ``pid`` (default: ours) the watchdog belongs to another process. Pinging
    at half the timeout is the recommended safety margin, so that is what is returned.
    Malformed values are logged at debug level and mean "no watchdog".
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            owner = int(raw_pid)
        except ValueError:
            log.debug("WATCHDOG_PID=%r is not a pid; watchdog ignored", raw_pid)
            return None
        if owner != (os.getpid() if pid is None else pid):
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.debug("WATCHDOG_USEC=%r is not an integer; watchdog ignored", raw_usec)
        return None
    if usec <= 0:
        log.debug("WATCHDOG_USEC=%r is not positive; watchdog ignored", raw_usec)
        return None
    return usec / 2 / 1_000_000


class Watchdog:
    """When to ping: due once ``interval`` seconds have passed since the last ping.

    ``interval`` is what ``watchdog_interval()`` returns (already half the timeout); where
    that is None there is no watchdog to keep. Pure: the caller passes the time, from a
    monotonic clock, so the main loop pings only while it really runs::

        if watchdog.due(now):
            notifier.watchdog()
            watchdog.pinged(now)
    """

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"watchdog interval must be positive, got {interval!r}")
        self.interval = interval
        self.last_ping: float | None = None

    def due(self, now: float) -> bool:
        """True if a ping should be sent now (always, before the first ping)."""
        return self.last_ping is None or now - self.last_ping >= self.interval

    def pinged(self, now: float) -> None:
        """Record that a ping was sent at ``now``."""
        self.last_ping = now
