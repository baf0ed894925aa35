"""The metrics endpoint: what prometheus_client would serve, from one thread, with every
connection bounded in time, size and number."""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memdefragd.daemon import httpd
from memdefragd.daemon import metrics as exporter
from memdefragd.daemon.metrics import Metrics
from tests.daemon.test_metrics import exported

FAST = httpd.Limits(request_timeout=0.3, idle_timeout=0.3, send_timeout=0.3, max_connections=8)
CHANGING = ("process_", "memdefragd_collector_duration_seconds")  # values differ per scrape


@pytest.fixture
def server() -> Iterator[httpd.HttpServer]:
    srv = exporter.serve("127.0.0.1", 0, exported().registry, FAST)
    yield srv
    srv.stop()


def request(port: int, data: bytes, timeout: float = 5.0) -> tuple[str, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes: (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        reply = read_all(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


def read_all(s: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def families(text: str) -> dict[str, set]:
    out: dict[str, set] = {}
    for fam in text_string_to_metric_families(text):
        keep = not fam.name.startswith(CHANGING)
        out[fam.name] = {
            (s.name, tuple(sorted(s.labels.items())), s.value if keep else None)
            for s in fam.samples
        }
    return out


def expected() -> dict[str, set]:
    """What prometheus_client makes of the same metrics, built separately."""
    return families(generate_latest(exported().registry).decode())


def closed(s: socket.socket, within: float) -> bool:
    """True if the server closes `s` (EOF or reset) within `within` seconds."""
    s.settimeout(within)
    try:
        read_all(s)
    except TimeoutError:
        return False
    return True


def test_metrics_are_prometheus_clients_families(server):
    status, headers, body = request(server.port, get("/metrics"))
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    assert families(body.decode()) == expected()
    # OpenMetrics when asked, as prometheus_client negotiates it.
    om = "Accept: application/openmetrics-text; version=1.0.0; charset=utf-8"
    status, headers, body = request(server.port, get("/metrics", om))
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


def test_gzip_when_accepted(server):
    status, headers, body = request(server.port, get("/metrics", "Accept-Encoding: gzip, br"))
    assert status.endswith("200 OK") and headers["content-encoding"] == "gzip"
    assert families(gzip.decompress(body).decode()) == expected()


def test_head_index_404_and_405(server):
    status, headers, body = request(server.port, get("/metrics", method="HEAD"))
    assert status.endswith("200 OK") and int(headers["content-length"]) > 1000 and body == b""
    status, headers, body = request(server.port, get("/"))
    assert status.endswith("200 OK") and b'href="/metrics"' in body
    assert request(server.port, get("/nope"))[0] == "HTTP/1.1 404 Not Found"
    status, headers, _ = request(server.port, get("/metrics", method="POST"))
    assert status == "HTTP/1.1 405 Method Not Allowed" and headers["allow"] == "GET, HEAD"
    assert request(server.port, b"nonsense\r\n\r\n")[0] == "HTTP/1.1 400 Bad Request"


def test_keep_alive_then_idle_timeout(server):
    # Pipelined: both answered in order; the 404 closes the connection.
    status, headers, rest = request(server.port, b"GET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
    assert status.endswith("200 OK") and headers["connection"] == "keep-alive"
    assert b"HTTP/1.1 404 Not Found" in rest and b"Connection: close" in rest
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert b"Connection: keep-alive" in s.recv(1 << 20)
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert b"200 OK" in s.recv(1 << 20)
        t0 = time.monotonic()
        assert closed(s, 5) and time.monotonic() - t0 < 2  # idle_timeout 0.3 s


def test_silent_and_trickling_clients_are_cut_at_the_deadline(server):
    with socket.create_connection(("127.0.0.1", server.port)) as silent:
        assert closed(silent, 5)
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):  # the server cuts it mid-trickle
            for c in b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 100:
                slow.sendall(bytes([c]))
                time.sleep(0.02)
        assert closed(slow, 5) and time.monotonic() - t0 < 2  # 0.3 s, however it trickles
    assert server.counts.timed_out == 2
    assert server.connections == 0


def test_request_head_size_limit(server):
    status, _, _ = request(server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 9000)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"


def test_slow_reader_is_cut_at_the_send_deadline():
    big = httpd.Response(200, (), b"x" * (64 << 20))  # far more than the socket buffers hold
    srv = httpd.start("127.0.0.1", 0, lambda _: big, FAST)
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            time.sleep(1.0)  # never reads: the response cannot be sent in 0.3 s
            assert srv.counts.timed_out == 1 and srv.connections == 0
    finally:
        srv.stop()


def test_connection_cap_evicts_idle_ones_and_a_scrape_still_succeeds(server):
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    try:
        status, _, body = request(server.port, get("/metrics"))
        assert status.endswith("200 OK") and b"memdefragd_scanned_pages_total" in body
        assert server.connections <= FAST.max_connections
        assert server.counts.evicted >= 50 + 1 - FAST.max_connections
        assert closed(idle[0], 1)  # the oldest were let go
        assert threading.active_count() == threads  # no thread per connection
    finally:
        for s in idle:
            s.close()


def test_stop_closes_everything_quickly():
    srv = exporter.serve("127.0.0.1", 0, Metrics().registry)
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(5)]
    time.sleep(0.1)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 1 and not srv._thread.is_alive()
    assert all(closed(s, 1) for s in idle)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1)
    for s in idle:
        s.close()
    srv.stop()  # idempotent


def test_bind_failure_raises_in_the_caller():
    with pytest.raises(OSError):
        exporter.serve("192.0.2.1", 0, Metrics().registry)  # TEST-NET-1: on no interface here
