"""Logging for the daemon: to the journal under systemd, to stderr otherwise.

``setup_logging(level)`` configures the ``memdefragd`` logger (and so every
``memdefragd.*`` module logger) with exactly one handler, chosen like this:

``"journal"``
    systemd-python is importable AND ``$JOURNAL_STREAM`` equals ``"<st_dev>:<st_ino>"`` of the
    stream's file descriptor, i.e. stderr really is connected to journald (systemd.exec(5)).
    A ``systemd.journal.JournalHandler`` with ``SYSLOG_IDENTIFIER=memdefragd``. The check
    matters: without journald that handler drops every message silently.
``"stderr-prefixed"``
    stderr goes to journald but systemd-python is missing: one line per record,
    ``<N>message``, where ``<N>`` is the sd-daemon(3) syslog priority (``<3>``
    error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug, ``<2>`` critical) that journald
    turns into PRIORITY=. Journald adds the time and identifier itself. Continuation lines
    (tracebacks) carry the same prefix, so they keep the record's priority.
``"stderr"``
    anything else (a terminal, Docker, a pipe):
    ``2026-11-25 18:00:00 memdefragd[PID] WARNING message``.

The logger does not propagate to the root logger, so a root handler installed by a library
or ``basicConfig`` cannot print each line twice.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import IO

__all__ = ["LOGGER_NAME", "setup_logging"]

LOGGER_NAME = "memdefragd"
SYSLOG_IDENTIFIER = "memdefragd"

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Marks the handler setup_logging installed, so a second call replaces it instead of adding.
_OURS = "_memdefragd_handler"


def _syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level, with JournalHandler.map_priority's mapping."""
    if levelno <= logging.DEBUG:
        return 7
    if levelno <= logging.INFO:
        return 6
    if levelno <= logging.WARNING:
        return 4
    if levelno <= logging.ERROR:
        return 3
    if levelno <= logging.CRITICAL:
        return 2
    return 1


class _PrefixedFormatter(logging.Formatter):
    """``<N>`` sd-daemon priority prefix on every line of the formatted record."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def _plain_formatter() -> logging.Formatter:
    return logging.Formatter(
        f"%(asctime)s {SYSLOG_IDENTIFIER}[%(process)d] %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )


def _journal_handler() -> logging.Handler | None:
    """systemd-python's JournalHandler, or None without it."""
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        # Missing, or the unrelated PyPI "systemd" package, which has no systemd.journal
        # JournalHandler: depend on "systemd-python" by that name.
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    return handler


def _stream_is_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """True when $JOURNAL_STREAM names the device and inode of ``stream``'s fd."""
    expected = environ.get("JOURNAL_STREAM", "").strip()
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        # No fd at all (io.StringIO raises io.UnsupportedOperation, an OSError), or closed.
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _parse_level(level: str) -> int:
    try:
        return LEVELS[str(level).strip().lower()]
    except KeyError:
        raise ValueError(
            f"invalid log level {level!r}; valid levels: {', '.join(LEVELS)}"
        ) from None


def setup_logging(
    level: str,
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Configure the ``memdefragd`` logger; returns "journal", "stderr-prefixed" or "stderr".

    ``stream`` defaults to ``sys.stderr`` and ``environ`` to ``os.environ``, both looked up at
    call time. Calling it again replaces the handler it installed before. An invalid level
    name raises ValueError naming the valid ones.
    """
    levelno = _parse_level(level)
    stream = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ

    handler: logging.Handler | None = None
    kind = "stderr"
    if _stream_is_journal(stream, env):
        handler = _journal_handler()
        kind = "journal" if handler is not None else "stderr-prefixed"
    if handler is None:
        handler = logging.StreamHandler(stream)
        if kind == "stderr-prefixed":
            handler.setFormatter(_PrefixedFormatter())
        else:
            handler.setFormatter(_plain_formatter())
    setattr(handler, _OURS, kind)

    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        if getattr(old, _OURS, None):
            logger.removeHandler(old)
            old.close()
    logger.addHandler(handler)
    logger.setLevel(levelno)
    logger.propagate = False
    return kind
