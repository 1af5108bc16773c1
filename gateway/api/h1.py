"""The gateway's HTTP/1.1 server: an asyncio Protocol with httptools parsing, one task per request.

Why not aiohttp's server (which the pool worker keeps): measured on the 2-core reference machine,
an aiohttp server answering a fixed body tops out near 4,500 req/s on a core, ~0.22 ms a request
before the gateway has done any work, while the gateway's goal (7,500 req/s on two cores shared
with the load generator and the pool) leaves about that much for everything. This server does what
the gateway's routes need and no more: keep-alive (HTTP/1.1 and 1.0 rules), pipelined requests
answered in order, bodies bounded while they arrive (413), `Expect: 100-continue`, whole answers
in one write, chunked streams with write flow control, a handler cancelled when its client goes
away (that is what cancels the upstream request), idle and slow-request timeouts, and a drain that
stops accepting, lets running requests finish up to a deadline, then cancels the rest.

Handlers get a `Request` and return a `Response`, or start a `Stream` on the request and return it
once ended. Header names are lower case.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import httptools
import orjson

from gateway.core.errors import (
    APIError,
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)

log = logging.getLogger("meshgate.http")

# Requests read ahead of the one being answered, per connection. Past it the connection stops
# reading the socket until the queue is half empty (TCP then holds the client back); what one read
# had already brought (at most the transport's read size) is kept and answered in order.
MAX_PIPELINED = 16
MAX_HEAD_BYTES = 64 * 1024  # request line and headers (llhttp sets no bound of its own)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class Request:
    __slots__ = (
        "body",
        "conn",
        "headers",
        "keep_alive",
        "method",
        "path",
        "pool",
        "query",
        "remote",
        "request_id",
        "route",
        "stream",
    )

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
                 remote: str | None, keep_alive: bool, conn: _Conn | None = None):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case names; repeated headers joined with ", "
        self.body = body
        self.remote = remote
        self.keep_alive = keep_alive
        self.conn = conn
        # What the gateway learns as the request goes, for response headers, logs and metrics.
        self.request_id: str | None = None
        self.route: str | None = None
        self.pool: str | None = None
        self.stream: Stream | None = None

    def start_stream(self, content_type: str = "text/event-stream", headers: dict[str, str] | None = None) -> Stream:
        """Begin a chunked 200 answer; the head goes out with the first write."""
        assert self.conn is not None and self.stream is None
        self.stream = Stream(self.conn, self._head(200, content_type, None, headers))
        return self.stream

    def _head(self, status: int, content_type: str, length: int | None, headers: dict[str, str] | None) -> bytes:
        extra = dict(headers or ())
        for name, value in (("x-request-id", self.request_id), ("x-meshgate-route", self.route),
                            ("x-meshgate-pool", self.pool)):
            if value is not None:
                extra[name] = value
        return head(status, content_type, length, extra, self.keep_alive)


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers)


def error_response(e: APIError) -> Response:
    retry = getattr(e, "retry_after_s", None)
    headers = {"retry-after": str(max(1, round(retry)))} if retry is not None else None
    return json_response(e.body(), e.status, headers)


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def head(status: int, content_type: str, length: int | None, headers: dict[str, str] | None,
         keep_alive: bool) -> bytes:
    """Status line and headers; length None: chunked."""
    parts = [b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-type: %s\r\n" % (
        status, _REASONS.get(status, b"Unknown"), _date(), content_type.encode())]
    parts.append(b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    if headers:
        parts.append("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1", "replace"))
    parts.append(b"\r\n")
    return b"".join(parts)


class Stream:
    """A chunked answer in progress. write() waits while the client reads slowly; it raises
    ConnectionResetError once the client is gone."""

    __slots__ = ("_head", "conn", "ended")

    def __init__(self, conn: _Conn, head_bytes: bytes):
        self.conn = conn
        self._head = head_bytes
        self.ended = False

    async def write(self, data: bytes) -> None:
        if self.push(data):
            await self.conn.drained()

    def push(self, data: bytes) -> bool:
        """write() without the wait, for a relay's per-token loop (no coroutine per chunk): True when
        the client is behind, and the caller must `await stream.drained()` before pushing more."""
        if data:
            self._send(b"%x\r\n%s\r\n" % (len(data), data))
        return self.conn.paused

    async def drained(self) -> None:
        await self.conn.drained()

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._send(b"0\r\n\r\n")

    def _send(self, data: bytes) -> None:
        if self.conn.lost:
            raise ConnectionResetError("the client went away")
        if self._head:
            data, self._head = self._head + data, b""
        self.conn.transport.write(data)


Handler = Callable[[Request], Awaitable["Response | Stream"]]


class Router:
    """Exact paths, plus prefixes for routes with a parameter (/v1/models/{model})."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._prefix: list[tuple[str, dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler, prefix: bool = False) -> None:
        if prefix:
            self._prefix.append((path, {method: handler}))
        else:
            self._exact.setdefault(path, {})[method] = handler

    def label(self, path: str) -> str:
        """The route a path falls under, for metric labels (bounded: client paths are not)."""
        if path in self._exact:
            return path
        return next((p + "{param}" for p, _ in self._prefix if path.startswith(p) and len(path) > len(p)), "other")

    def resolve(self, method: str, path: str) -> Handler:
        methods = self._exact.get(path)
        if methods is None:
            methods = next((m for p, m in self._prefix if path.startswith(p) and len(path) > len(p)), None)
        if methods is None:
            raise NotFound(f"Not Found: {method} {path}")
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            raise MethodNotAllowed(f"Method Not Allowed: {method} {path}")
        return handler


class HttpServer:
    def __init__(self, router: Router, max_body_bytes: int, keepalive_timeout_s: float = 75.0,
                 on_response: Callable[[Request, int], None] | None = None):
        self.router = router
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.on_response = on_response  # every answer's status (metrics)
        self.conns: set[_Conn] = set()
        self.closing = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False, tls: ssl.SSLContext | None = None,
                    tls_handshake_timeout_s: float | None = None) -> None:
        """tls: serve HTTPS with this context (gateway/core/tls.py); a client whose handshake has not
        ended after tls_handshake_timeout_s is dropped (the loop's own timer, before _Conn exists)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), host, port, backlog=2048,
                                                reuse_port=reuse_port or None, ssl=tls,
                                                ssl_handshake_timeout=tls_handshake_timeout_s if tls else None)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def dispatch(self, req: Request) -> Response | Stream:
        """The handler's answer; every failure becomes OpenAI's error JSON, never a traceback."""
        try:
            resp: Response | Stream = await self.router.resolve(req.method, req.path)(req)
        except APIError as e:
            resp = error_response(e)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", req.method, req.path)
            if req.stream is not None:
                raise ConnectionResetError from None  # a stream has begun: all that is left is to cut it
            resp = error_response(InternalError("internal error; the request was not completed"))
        if self.on_response is not None:
            self.on_response(req, resp.status if isinstance(resp, Response) else 200)
        return resp

    def stop_accepting(self) -> None:
        """No new connections; connections answer their current request and close."""
        self.closing = True
        if self._server is not None:
            self._server.close()

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; let running requests finish for up to timeout_s, then cancel them."""
        self.stop_accepting()
        for c in list(self.conns):
            if c.task is None:
                c.transport.close()
        tasks = [c.task for c in self.conns if c.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for c in list(self.conns):
            c.transport.close()


class _Conn(asyncio.Protocol):
    """One client connection: parses requests and answers them one at a time, in order."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: deque[Request] = deque()
        self.paused = False  # writing: the client reads slowly
        self.reading_paused = False  # reading: too many pipelined requests wait
        self.lost = False
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._head_size = 0
        self._keep_alive = True

    # -- connection events ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.server.conns.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.conns.discard(self)
        if self.task is not None:
            self.task.cancel()  # the client is gone: stop its request (and the upstream one with it)
        if self._timer is not None:
            self._timer.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.task is None:
            self._arm_timer()  # a request arriving slowly gets keepalive_timeout_s per gap, not forever
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(BadRequest("protocol upgrades are not supported"))
        except httptools.HttpParserError:
            if not self._refused:
                self._refuse(BadRequest("malformed HTTP request"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drained(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client went away")
        if self._drain is None:
            self._drain = self.loop.create_future()
        await self._drain

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.server.keepalive_timeout_s, self._timeout)

    def _timeout(self) -> None:
        if self.task is None:
            self.transport.close()

    def _refuse(self, e: APIError) -> None:
        """Answer a request we will not read (bad framing, too large) and close the connection."""
        self._refused = True
        resp = error_response(e)
        self.transport.write(head(resp.status, resp.content_type, len(resp.body), resp.headers, False) + resp.body)
        self.transport.close()

    # -- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def _count_head(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD_BYTES and not self._refused:
            e = BadRequest(f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes")
            e.status = 431
            self._refuse(e)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        if self._refused:
            return
        key = name.decode("latin-1").lower()
        v = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {v}" if key in self._headers else v

    def on_headers_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()  # llhttp only answers this before the message ends
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._too_large()
        elif self._headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._size += len(body)
        if self._size > self.server.max_body_bytes:
            self._too_large()
        else:
            self._body.append(body)

    def _too_large(self) -> None:
        self._refuse(PayloadTooLarge(f"the request body is larger than {self.server.max_body_bytes} bytes"))

    def on_message_complete(self) -> None:
        if self._refused:
            return
        path, _, query = self._url.decode("latin-1").partition("?")
        req = Request(self.parser.get_method().decode(), path, query, self._headers, b"".join(self._body),
                      self.remote, self._keep_alive, self)
        if self.task is None:
            self._start(req)
            return
        self.pending.append(req)
        if len(self.pending) >= MAX_PIPELINED and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    # -- answering --------------------------------------------------------------------------
    def _start(self, req: Request) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.task = self.loop.create_task(self._answer(req))

    async def _answer(self, req: Request) -> None:
        try:
            resp = await self.server.dispatch(req)
            if isinstance(resp, Response):
                body = b"" if req.method == "HEAD" else resp.body
                self.transport.write(req._head(resp.status, resp.content_type, len(resp.body), resp.headers) + body)
            else:
                await resp.end()
        except (asyncio.CancelledError, ConnectionError):
            self.transport.close()
            return
        finally:
            self.task = None
        if not req.keep_alive or self.server.closing:
            self.transport.close()
        elif self.pending:
            self._start(self.pending.popleft())
            if self.reading_paused and len(self.pending) <= MAX_PIPELINED // 2:
                self.reading_paused = False
                self.transport.resume_reading()
        else:
            self._arm_timer()
