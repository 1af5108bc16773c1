"""The upstream HTTP/1.1 client: kept-alive connections per pool, bounded, httptools parsing.

Why not aiohttp's client: on the gateway's hot path it cost ~0.1 ms a request on the reference
machine (request and response objects, header multidicts, a connector lookup), a third of all the
gateway did. This one writes a request in one send, parses the answer with httptools, and hands the
body over as it arrives (`readany`) so SSE is relayed without re-framing.

Per origin at most `max_connections` connections, kept alive and reused; a request that finds them
all busy waits for one (under the caller's timeout). A connection whose response was not read to the
end is closed, not reused: that is how a cancelled request tells the pool to stop. A request on a
reused connection that the server had closed meanwhile (its keep-alive timer beat ours) is sent again
once on a new connection, as long as no byte of an answer came back.
"""
from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from urllib.parse import unquote, urlsplit

import httptools


class UpstreamError(Exception):
    """The connection failed, closed early, or the answer was not HTTP."""


class ReadTimeout(UpstreamError):
    """No bytes for `idle_timeout_s` while a body was expected."""


class HttpClient:
    def __init__(self, max_connections: int, connect_timeout_s: float, idle_timeout_s: float):
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._origins: dict[str, _Origin] = {}

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> Response:
        """Send and wait for the response head. url: an absolute http(s) URL."""
        base, path = _split(url)
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = _Origin(base, self)
        data = origin.encode(method, path, body, headers)
        for _ in range(2):
            conn = await origin.acquire()
            reused = conn.used
            try:
                return await conn.send(data)
            except UpstreamError:
                if not (reused and conn.no_answer):
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()


def _split(url: str) -> tuple[str, str]:
    scheme_end = url.index("://") + 3
    slash = url.find("/", scheme_end)
    return (url, "/") if slash < 0 else (url[:slash], url[slash:])


class _Origin:
    """One scheme://host:port: its idle connections and those waiting for one."""

    def __init__(self, base: str, client: HttpClient):
        u = urlsplit(base)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UpstreamError(f"unsupported upstream URL {base!r}")
        self.client = client
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        if u.port:
            host_header += f":{u.port}"
        fixed = f"host: {host_header}\r\n"
        if u.username is not None:  # credentials in the pool's URL: HTTP Basic, as browsers and aiohttp do
            cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
            fixed += f"authorization: Basic {base64.b64encode(cred).decode()}\r\n"
        self.fixed = fixed
        self.idle: deque[_Conn] = deque()
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self.count = 0  # connections open or opening

    def encode(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        length = f"content-length: {len(body)}\r\n" if body or method == "POST" else ""
        return f"{method} {path} HTTP/1.1\r\n{self.fixed}{length}{extra}\r\n".encode("latin-1") + body

    async def acquire(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the least likely to have timed out
            if not conn.closed:
                return conn
        while self.count >= self.client.max_connections:
            fut: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                handed = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and (late := fut.result()) is not None:
                    self.release(late)  # handed over just as we gave up: pass it on
                raise
            if handed is not None:
                return handed
        self.count += 1
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.client.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl)
        except (OSError, TimeoutError) as e:
            self.count -= 1
            self._wake(None)
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {e}") from None
        return conn

    def release(self, conn: _Conn) -> None:
        """A connection whose exchange ended: reuse it if it may be, else drop it."""
        if conn.reusable():
            conn.reset()
            if not self._wake(conn):
                self.idle.append(conn)
        else:
            conn.abort()

    def gone(self, conn: _Conn) -> None:
        """A connection closed (by either side)."""
        self.count -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._wake(None)  # a waiter may open a new one

    def _wake(self, conn: _Conn | None) -> bool:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def close(self) -> None:
        for conn in list(self.idle):
            conn.abort()
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(UpstreamError("the client is closed"))


class Response:
    """A response whose head has arrived. Read the body (read / readany), then close()."""

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Conn):
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers  # lower-case names

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at its end."""
        return await self._conn.take()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.take():
            parts.append(chunk)
        return b"".join(parts)

    def abort(self, reason: str) -> None:
        """Give up on this answer now (a stalled or lost pool): a read waiting or to come raises
        UpstreamError(reason), and the connection closes (the pool sees the request cancelled)."""
        conn = self._conn
        if conn is not None:
            conn._fail(UpstreamError(reason))
            conn.abort()

    def close(self) -> None:
        """Give the connection back (whole answer read) or close it (not: the pool sees the request
        cancelled). Idempotent."""
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            conn.origin.release(conn)


class _Conn(asyncio.Protocol):
    def __init__(self, origin: _Origin):
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.used = False
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.no_answer = True  # no byte of a response yet: a closed keep-alive may be retried
        self.error: UpstreamError | None = None
        self._head: asyncio.Future[Response] | None = None
        self._more: asyncio.Future[None] | None = None

    def reusable(self) -> bool:
        return self.complete and not self.closed and self.error is None and self.keep_alive

    def abort(self) -> None:
        if not self.closed:
            self.transport.close()

    async def send(self, data: bytes) -> Response:
        self.used = True
        self._head = self.loop.create_future()
        try:
            self.transport.write(data)
            return await self._head
        except BaseException:
            self.origin.release(self)  # cancelled or failed before the head: never reused
            raise

    async def take(self) -> bytes:
        while not self.body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self._more = self.loop.create_future()
            timer = self.loop.call_later(self.origin.client.idle_timeout_s, self._idle)
            try:
                await self._more
            finally:
                timer.cancel()
                self._more = None
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        return data

    def _idle(self) -> None:
        self._fail(ReadTimeout(f"no data from {self.origin.host}:{self.origin.port} "
                               f"for {self.origin.client.idle_timeout_s:g} s"))
        self.abort()

    def _fail(self, e: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = e
        if self._head is not None and not self._head.done():
            self._head.set_exception(e)
        self._wake()

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    # -- protocol events -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.origin.gone(self)
        self._fail(UpstreamError(f"{self.origin.host}:{self.origin.port} closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.no_answer = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"bad HTTP from {self.origin.host}:{self.origin.port}: {e}"))
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # llhttp only answers this before the message ends
        if self._head is not None and not self._head.done():
            self._head.set_result(Response(self))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()
