"""systemd integration (memdefragd.daemon.systemd) and logging setup (memdefragd.daemon.logs).

Notifications go to a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET;
the journal check uses a real temporary file's st_dev:st_ino as JOURNAL_STREAM.
"""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import sys
import time
import uuid

import pytest

from memdefragd import logonce
from memdefragd.daemon import systemd
from memdefragd.daemon.logs import setup_logging
from memdefragd.daemon.systemd import Notifier, Watchdog, watchdog_interval
from memdefragd.logonce import OnceMemory, once

# --- sd_notify ---------------------------------------------------------------------------------


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """(NOTIFY_SOCKET value, receiving socket) for a filesystem and an abstract address."""
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock, value = _receiver(path), path
    else:
        name = f"memdefragd-test-{uuid.uuid4().hex}"
        sock, value = _receiver(b"\0" + name.encode()), "@" + name
    with sock:
        yield value, sock


def _notifier(value: str) -> Notifier:
    return Notifier({"NOTIFY_SOCKET": value})


@pytest.mark.parametrize(
    ("method", "args", "sent"),
    [
        ("ready", (), b"READY=1"),
        ("ready", ("scanning 12 targets",), b"READY=1\nSTATUS=scanning 12 targets"),
        ("status", ("idle; next scan in 30 s",), b"STATUS=idle; next scan in 30 s"),
        ("status", ("two\nREADY=1",), b"STATUS=two READY=1"),  # a newline cannot inject a field
        ("watchdog", (), b"WATCHDOG=1"),
        ("stopping", (), b"STOPPING=1"),
        ("stopping", ("draining",), b"STOPPING=1\nSTATUS=draining"),
    ],
)
def test_sends_exact_bytes(notify_socket, method, args, sent):
    value, sock = notify_socket
    assert getattr(_notifier(value), method)(*args) is True
    assert sock.recv(4096) == sent


def test_reloading_carries_monotonic_usec(notify_socket):
    value, sock = notify_socket
    before = time.monotonic_ns() // 1000
    assert _notifier(value).reloading()
    after = time.monotonic_ns() // 1000
    reloading, monotonic = sock.recv(4096).split(b"\n")
    assert reloading == b"RELOADING=1"
    key, _, usec = monotonic.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert usec.isdigit()
    assert before <= int(usec) <= after


def test_send_generic_fields_in_order(notify_socket):
    value, sock = notify_socket
    assert _notifier(value).send(status="x", errno=2)
    assert sock.recv(4096) == b"STATUS=x\nERRNO=2"
    with pytest.raises(ValueError):
        _notifier(value).send(**{"BAD-NAME": 1})


def test_reads_os_environ_by_default(notify_socket, monkeypatch):
    value, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert Notifier().watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_socket_is_close_on_exec(notify_socket, monkeypatch):
    value, sock = notify_socket
    types = []
    real_socket = socket.socket

    def recording_socket(family, type_, *args):
        types.append(type_)
        return real_socket(family, type_, *args)

    monkeypatch.setattr(systemd.socket, "socket", recording_socket)
    assert _notifier(value).watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert len(types) == 1
    assert types[0] & socket.SOCK_CLOEXEC
    assert types[0] & socket.SOCK_DGRAM


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative.sock"}])
def test_noop_without_usable_notify_socket(environ, monkeypatch):
    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was created")

    monkeypatch.setattr(systemd.socket, "socket", no_socket)
    notifier = Notifier(environ)
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False


def test_unreachable_socket_is_logged_not_raised(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=systemd.__name__)
    notifier = _notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    failures = [r for r in caplog.records if r.name == systemd.__name__]
    assert len(failures) == 2
    assert all(r.levelno == logging.DEBUG for r in failures)
    assert "nobody-listens.sock" in failures[0].getMessage()


# --- watchdog ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "pid", "expected"),
    [
        ({}, 100, None),
        ({"WATCHDOG_USEC": ""}, 100, None),
        ({"WATCHDOG_USEC": "60000000"}, 100, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "100"}, 100, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "101"}, 100, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}, 100, None),
        ({"WATCHDOG_USEC": "500000"}, 100, 0.25),
        ({"WATCHDOG_USEC": "0"}, 100, None),
        ({"WATCHDOG_USEC": "-5"}, 100, None),
        ({"WATCHDOG_USEC": "soon"}, 100, None),
    ],
)
def test_watchdog_interval(environ, pid, expected):
    assert watchdog_interval(environ, pid) == expected


def test_watchdog_interval_defaults_to_our_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


def test_watchdog_due_and_pinged():
    dog = Watchdog(30.0)
    assert dog.due(1000.0)  # never pinged yet
    dog.pinged(1000.0)
    assert not dog.due(1000.0)
    assert not dog.due(1029.9)
    assert dog.due(1030.0)
    dog.pinged(1031.0)
    assert not dog.due(1060.0)
    assert dog.due(1061.0)


def test_watchdog_interval_must_be_positive():
    with pytest.raises(ValueError):
        Watchdog(0)


# --- setup_logging -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_memdefragd_logger():
    """setup_logging changes the process-wide 'memdefragd' logger: put it back."""
    logger = logging.getLogger("memdefragd")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def log_file(tmp_path):
    """A real file as the log stream, and the JOURNAL_STREAM value that matches it."""
    path = tmp_path / "stderr.log"
    with path.open("w+") as stream:
        st = os.fstat(stream.fileno())
        yield stream, f"{st.st_dev}:{st.st_ino}"


def _written(stream) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read()


def _our_handler() -> logging.Handler:
    (handler,) = logging.getLogger("memdefragd").handlers
    return handler


def _capture_journal(monkeypatch, journal) -> list[dict[str, str]]:
    """Entries the real journal.send would hand to sd_journal_sendv, as {FIELD: value}."""
    entries = []

    def sendv(*lines):
        entry = {}
        for line in lines:
            text = line.decode() if isinstance(line, bytes) else line
            name, _, value = text.partition("=")
            entry[name] = value
        entries.append(entry)

    monkeypatch.setattr(journal, "sendv", sendv)
    return entries


def test_journal_handler_when_stream_is_journal_and_systemd_python_present(log_file, monkeypatch):
    journal = pytest.importorskip("systemd.journal")
    stream, journal_stream = log_file
    kind = setup_logging("info", stream=stream, environ={"JOURNAL_STREAM": journal_stream})
    assert kind == "journal"
    handler = _our_handler()
    assert isinstance(handler, journal.JournalHandler)

    entries = _capture_journal(monkeypatch, journal)
    log = logging.getLogger("memdefragd.scan")
    log.warning("smaps read failed")
    log.debug("not at info level")

    (entry,) = entries
    assert entry["MESSAGE"] == "smaps read failed"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "memdefragd"
    assert entry["LOGGER"] == "memdefragd.scan"
    assert entry["CODE_LINE"].isdigit()
    assert _written(stream) == ""  # nothing on the stream itself


def test_prefixed_stderr_when_systemd_python_is_missing(log_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # import now raises ImportError
    stream, journal_stream = log_file
    kind = setup_logging("debug", stream=stream, environ={"JOURNAL_STREAM": journal_stream})
    assert kind == "stderr-prefixed"
    log = logging.getLogger("memdefragd")
    log.warning("collapse refused")
    log.error("e")
    log.info("i")
    log.debug("d")
    assert _written(stream).splitlines() == [
        "<4>collapse refused",
        "<3>e",
        "<6>i",
        "<7>d",
    ]


def test_prefixed_traceback_keeps_priority_on_every_line(log_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "systemd.journal", None)
    stream, journal_stream = log_file
    setup_logging("info", stream=stream, environ={"JOURNAL_STREAM": journal_stream})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("memdefragd").exception("scan failed")
    lines = _written(stream).splitlines()
    assert lines[0] == "<3>scan failed"
    assert lines[-1] == "<3>RuntimeError: boom"
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)


PLAIN = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d memdefragd\[(\d+)\] (\w+) (.*)$")


def test_plain_stderr_without_journal_stream(log_file):
    stream, _ = log_file
    assert setup_logging("INFO", stream=stream, environ={}) == "stderr"
    log = logging.getLogger("memdefragd.pipeline.targets")
    log.warning("target vanished")
    log.info("plain")
    log.debug("dropped")
    first, second = _written(stream).splitlines()
    match = PLAIN.match(first)
    assert match, first
    assert match.groups() == (str(os.getpid()), "WARNING", "target vanished")
    assert PLAIN.match(second).groups()[1:] == ("INFO", "plain")


def test_plain_stderr_when_journal_stream_names_another_file(log_file, tmp_path):
    stream, _ = log_file
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    assert (
        setup_logging("info", stream=stream, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        == "stderr"
    )


def test_stream_without_fd_is_plain():
    stream = io.StringIO()
    assert setup_logging("info", stream=stream, environ={"JOURNAL_STREAM": "1:2"}) == "stderr"
    logging.getLogger("memdefragd").info("hello")
    assert PLAIN.match(stream.getvalue().rstrip("\n")).group(3) == "hello"


def test_setup_logging_replaces_its_handler_and_does_not_propagate(log_file):
    stream, _ = log_file
    logger = logging.getLogger("memdefragd")
    setup_logging("info", stream=stream, environ={})
    setup_logging("warning", stream=stream, environ={})
    assert len(logger.handlers) == 1
    assert logger.level == logging.WARNING
    assert logger.propagate is False
    logger.info("below warning")
    assert _written(stream) == ""


def test_invalid_level_names_the_valid_ones():
    with pytest.raises(ValueError, match="verbose") as info:
        setup_logging("verbose", stream=io.StringIO(), environ={})
    for name in ("debug", "info", "warning", "error", "critical"):
        assert name in str(info.value)


# --- once --------------------------------------------------------------------------------------


def test_once_logs_once_per_key(caplog):
    memory = OnceMemory()
    log = logging.getLogger("memdefragd.test_once")
    caplog.set_level(logging.INFO, logger=log.name)
    results = []
    for _ in range(3):
        results.append(memory.log(log, ("smaps", 42), logging.WARNING, "pid %d vanished", 42))
    results.append(memory.log(log, ("smaps", 43), logging.WARNING, "pid %d vanished", 43))
    assert results == [True, False, False, True]
    assert [r.getMessage() for r in caplog.records] == ["pid 42 vanished", "pid 43 vanished"]
    assert all(r.funcName == "test_once_logs_once_per_key" for r in caplog.records)


def test_once_keys_are_per_logger(caplog):
    memory = OnceMemory()
    caplog.set_level(logging.INFO)
    a, b = logging.getLogger("memdefragd.once_a"), logging.getLogger("memdefragd.once_b")
    assert memory.log(a, "k", logging.INFO, "from a")
    assert memory.log(b, "k", logging.INFO, "from b")
    assert not memory.log(a, "k", logging.INFO, "from a")
    assert [r.getMessage() for r in caplog.records] == ["from a", "from b"]


def test_once_memory_is_bounded():
    memory = OnceMemory(max_keys=2)
    assert memory.first("a") and memory.first("b")
    assert not memory.first("a")  # "a" is now the most recent
    assert memory.first("c")  # forgets "b", the least recent
    assert len(memory) == 2
    assert not memory.first("a")
    assert memory.first("b")  # forgotten, so new again
    for n in range(1000):
        memory.first(n)
    assert len(memory) == 2


def test_once_disabled_level_does_not_use_up_the_key(caplog):
    memory = OnceMemory()
    log = logging.getLogger("memdefragd.once_level")
    caplog.set_level(logging.INFO, logger=log.name)
    assert not memory.log(log, "k", logging.DEBUG, "debug, dropped")
    caplog.set_level(logging.DEBUG, logger=log.name)
    assert memory.log(log, "k", logging.DEBUG, "debug, kept")
    assert [r.getMessage() for r in caplog.records] == ["debug, kept"]


def test_module_once_reports_the_caller(caplog):
    log = logging.getLogger("memdefragd.once_module")
    caplog.set_level(logging.INFO, logger=log.name)
    key = uuid.uuid4().hex  # the module-level memory is shared by the whole process
    assert once(log, key, logging.WARNING, "race on %s", "pid 9", extra={"detail": 9})
    assert not once(log, key, logging.WARNING, "race on %s", "pid 9")
    (record,) = caplog.records
    assert record.getMessage() == "race on pid 9"
    assert record.detail == 9
    assert record.funcName == "test_module_once_reports_the_caller"
    assert logonce.ONCE_MAX_KEYS >= 1
