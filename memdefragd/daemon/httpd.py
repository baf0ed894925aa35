"""A small HTTP/1.1 server that stays bounded whoever connects: one thread, one asyncio
event loop, every connection with deadlines, and a cap on how many are open.

prometheus_client's `start_http_server` runs a thread per connection and never times one
out: 3,000 idle connections cost a root daemon 2,900 threads and 99 MB, and the threads of
clients that had left stayed. Here a connection is a few hundred bytes of state on one loop:

- it must deliver a whole request head (at most `max_head` bytes) within `request_timeout`
  of opening, or of its first byte after a keep-alive response; a slow or silent client is
  cut at the deadline whatever it trickles;
- a keep-alive connection may sit idle between requests for `idle_timeout`;
- a response must be handed to the kernel within `send_timeout`, or the connection is cut;
- at most `max_connections` are open (file descriptors stay bounded too: the daemon needs
  its own for pidfds). A new connection over the cap evicts the oldest one that has not
  sent a full request (idle ones first, so a real scrape, which sends its request at once,
  is served while thousands of idle sockets come and go), else the oldest being answered.

Only GET and HEAD without a body are served (a metrics endpoint needs nothing else); any
other method gets 405, a malformed head 400, an oversized one 431, and those close.

The application is called on the loop: it must not block (the metrics one formats an
immutable snapshot, which takes milliseconds and touches no file a client controls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger("memdefragd")

REQUEST_TIMEOUT = 10.0  # seconds from opening (or a keep-alive's first byte) to a full head
IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may wait for its next request
SEND_TIMEOUT = 10.0  # seconds to hand a response to the kernel
MAX_HEAD = 8192  # bytes of request line and headers
MAX_CONNECTIONS = 256
STOP_TIMEOUT = 1.0  # seconds stop() waits for the loop's thread

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(r"\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, as sent
    version: str  # HTTP/1.0 or HTTP/1.1
    headers: Mapping[str, str]  # lower-case names; a repeated header's values joined by ", "

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


App = Callable[[Request], Response]


def parse_head(head: bytes) -> Request | None:
    """The request line and headers (without the blank line), or None if malformed."""
    lines = _LINE.split(head.decode("latin-1"))
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        return None
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            return None
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Request(method, target, version, headers)


def render(response: Response, *, head_only: bool, keep_alive: bool) -> bytes:
    status = HTTPStatus(response.status)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines += [f"{k}: {v}" for k, v in response.headers]
    lines.append(f"Content-Length: {len(response.body)}")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


def _plain(status: int, text: str, *extra: tuple[str, str]) -> Response:
    return Response(status, (("Content-Type", "text/plain; charset=utf-8"), *extra), text.encode())


@dataclass
class Limits:
    request_timeout: float = REQUEST_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_head: int = MAX_HEAD
    max_connections: int = MAX_CONNECTIONS


@dataclass
class Counts:
    """What the server did, for tests and logs."""

    accepted: int = 0
    evicted: int = 0
    timed_out: int = 0
    responses: int = 0


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.searched = 0  # the head's end is not before this offset of buf
        self.answering = False  # a response is on its way
        self.keep = False
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=0)  # pause_writing while anything is unsent
        self.server._opened(self)
        self._arm(self.server.limits.request_timeout)

    def data_received(self, data: bytes) -> None:
        if not self.buf and not self.answering:  # a keep-alive's next request starts
            self._arm(self.server.limits.request_timeout)
        self.buf += data
        if not self.answering:
            self._next_request()
        elif len(self.buf) > self.server.limits.max_head:  # pipelining more than a head
            self.drop()

    def eof_received(self) -> bool:
        return False  # the transport closes (after sending what is left)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.answering:
            self._sent()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.server._forget(self)

    # -- ours

    def drop(self) -> None:
        self._disarm()
        self.server._forget(self)
        if self.transport is not None:
            self.transport.abort()

    def _timeout(self) -> None:
        self.server.counts.timed_out += 1
        self.drop()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = self.server.loop.call_later(seconds, self._timeout)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _next_request(self) -> None:
        limit = self.server.limits.max_head
        end = _END_OF_HEAD.search(self.buf, self.searched, limit + 4)
        if end is None:
            if len(self.buf) > limit:
                self._answer(None, _plain(431, "request head too large\n"))
            self.searched = max(0, len(self.buf) - 3)  # a trickling client costs no rescans
            return
        head = bytes(self.buf[: end.start()])
        del self.buf[: end.end()]
        self.searched = 0
        request = parse_head(head)
        if request is None:
            self._answer(None, _plain(400, "bad request\n"))
        elif request.method not in ("GET", "HEAD"):
            self._answer(None, _plain(405, "use GET or HEAD\n", ("Allow", "GET, HEAD")))
        elif request.headers.get("content-length", "0") != "0" or (
            "transfer-encoding" in request.headers
        ):
            self._answer(None, _plain(400, "a GET has no body\n"))
        else:
            try:
                response = self.server.app(request)
            except Exception:
                log.exception("metrics endpoint: answering %s failed", request.method)
                response = _plain(500, "internal error\n")
            self._answer(request, response)

    def _answer(self, request: Request | None, response: Response) -> None:
        """Send a response; no request (a malformed one) means close after it."""
        assert self.transport is not None
        self.keep = request is not None and request.keep_alive and response.status < 400
        self.answering = True
        self.server._answering(self)
        self._arm(self.server.limits.send_timeout)
        head_only = request is not None and request.method == "HEAD"
        self.transport.write(render(response, head_only=head_only, keep_alive=self.keep))
        self.server.counts.responses += 1
        if not self.keep:
            self.transport.close()  # after the buffer drains; the send deadline still holds
        elif not self.paused:
            self._sent()

    def _sent(self) -> None:
        if not self.keep:
            return
        self.answering = False
        self.server._waiting(self)
        self._arm(self.server.limits.idle_timeout)
        if self.buf:  # a pipelined request
            self._arm(self.server.limits.request_timeout)
            self._next_request()


@dataclass
class HttpServer:
    """Serves `app` on a bound, listening socket from one thread; `stop()` ends it."""

    sock: socket.socket
    app: App
    limits: Limits = field(default_factory=Limits)
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        # Oldest first: dicts keep insertion order, so the head of each is the one to evict.
        self._idle: dict[_Connection, None] = {}  # no full request yet
        self._busy: dict[_Connection, None] = {}  # being answered
        self.address: tuple[str, int] = self.sock.getsockname()[:2]  # the port if 0 was asked
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self.sock.setblocking(False)
        self._server = self.loop.run_until_complete(
            self.loop.create_server(lambda: _Connection(self), sock=self.sock, backlog=128)
        )
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def connections(self) -> int:
        return len(self._idle) + len(self._busy)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Close the listening socket and every connection, end the thread; idempotent."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(self._shutdown)
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def _shutdown(self) -> None:
        self._server.close()
        for conn in [*self._idle, *self._busy]:
            conn.drop()
        # The aborted transports close their sockets in callbacks already queued: stop after.
        self.loop.call_soon(self.loop.stop)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        # Such as accept() failing with EMFILE (asyncio then pauses accepting for a second).
        from ..logonce import once as log_once

        message = str(context.get("message", "error"))
        exc = context.get("exception")
        log_once(log, ("httpd", message), logging.WARNING, "metrics endpoint: %s%s (logged once)",
                 message, f": {exc}" if exc else "")  # fmt: skip

    # -- bookkeeping, on the loop

    def _opened(self, conn: _Connection) -> None:
        self.counts.accepted += 1
        while self.connections >= self.limits.max_connections:
            victim = next(iter(self._idle), None) or next(iter(self._busy))
            self.counts.evicted += 1
            victim.drop()
        self._idle[conn] = None

    def _answering(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)
        self._busy[conn] = None

    def _waiting(self, conn: _Connection) -> None:
        self._busy.pop(conn, None)
        self._idle[conn] = None

    def _forget(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)
        self._busy.pop(conn, None)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (the first address getaddrinfo gives); OSError
    (socket.gaierror included) if it cannot be had."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def start(host: str, port: int, app: App, limits: Limits | None = None) -> HttpServer:
    """Bind host:port (raising OSError here, in the caller's thread) and serve `app`."""
    sock = bind(host, port)
    try:
        return HttpServer(sock, app, limits or Limits())
    except BaseException:
        sock.close()
        raise
