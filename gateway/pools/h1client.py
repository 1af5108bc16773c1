"""The upstream HTTP/1.1 client: kept-alive connections per pool, bounded, httptools parsing.

Why not aiohttp's client: on the gateway's hot path it cost ~0.1 ms a request on the reference
machine (request and response objects, header multidicts, a connector lookup), a third of all the
gateway did. This one writes a request in one send, parses the answer with httptools, and hands the
body over as it arrives (`readany`) so SSE is relayed without re-framing.

Per origin at most `max_connections` connections (or the limit set_limit gave it), kept alive and
reused; a request that finds them all busy waits for one, for at most its `max_wait_s` (else under
the caller's timeout). `would_wait` tells a caller beforehand, so routing can treat the pool as full
instead of queueing silently; a Response says how long its request waited (`waited_s`). A connection whose response was not read to the
end is closed, not reused: that is how a cancelled request tells the pool to stop. A request on a
reused connection that the server had closed meanwhile (its keep-alive timer beat ours) is sent again
once on a new connection, as long as no byte of an answer came back.
"""
from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

from gateway.core.tls import ClientTls


class UpstreamError(Exception):
    """The connection failed, closed early, or the answer was not HTTP."""


class ReadTimeout(UpstreamError):
    """No bytes for `idle_timeout_s` while a body was expected."""


class ConnectionWaitTimeout(UpstreamError):
    """Every connection to the origin stayed busy for the request's `max_wait_s`: nothing was sent."""


class HttpClient:
    def __init__(self, max_connections: int, connect_timeout_s: float, idle_timeout_s: float,
                 tls: ClientTls | None = None):
        """tls: for https origins, the CA to trust and the client certificate to present (mutual
        TLS), asked for a context per new connection so replaced files apply without a restart;
        None: the system's trust store, no client certificate."""
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.tls = tls
        self._origins: dict[str, _Origin] = {}

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: dict[str, str] | None = None, max_wait_s: float | None = None) -> Response:
        """Send and wait for the response head. url: an absolute http(s) URL. max_wait_s: the most to
        wait for a free connection (ConnectionWaitTimeout past it); None: as long as the caller lets."""
        base, path = _split(url)
        origin = self._origin(base)
        data = origin.encode(method, path, body, headers)
        waited_s = 0.0
        for attempt in range(2):
            # The resend goes on a new connection: when the server dropped one kept-alive connection
            # (a restart, a killed pool behind a proxy), its other idle ones are as stale.
            conn, w = await origin.acquire(max_wait_s, fresh=attempt > 0)
            waited_s += w
            reused = conn.used
            try:
                resp = await conn.send(data)
                resp.waited_s = waited_s
                return resp
            except UpstreamError:
                if attempt or not (reused and conn.no_answer):
                    raise
        raise AssertionError("unreachable")  # the second attempt returned or raised

    def _origin(self, base: str) -> _Origin:
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = _Origin(base, self)
        return origin

    def set_limit(self, base_url: str, limit: int) -> None:
        """The connection cap of one origin (scheme://host:port), in place of max_connections."""
        origin = self._origin(base_url)
        raised = limit > origin.limit
        origin.limit = max(1, limit)
        if raised:
            while origin.count < origin.limit and origin._wake(None):
                pass  # waiters that fit under the new cap go open connections

    def limit(self, base_url: str) -> int:
        origin = self._origins.get(base_url)
        return origin.limit if origin is not None else self.max_connections

    def would_wait(self, base_url: str) -> bool:
        """Whether a request to this origin now would wait for a connection (none idle and the cap
        reached)."""
        origin = self._origins.get(base_url)
        if origin is None:
            return False
        return origin.count >= origin.limit and not any(not c.closed for c in origin.idle)

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
        self.https = u.scheme == "https"
        self.ssl = ssl.create_default_context() if self.https and client.tls is None else None
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
        self.limit = client.max_connections

    def encode(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        length = f"content-length: {len(body)}\r\n" if body or method == "POST" else ""
        return f"{method} {path} HTTP/1.1\r\n{self.fixed}{length}{extra}\r\n".encode("latin-1") + body

    async def acquire(self, max_wait_s: float | None = None, fresh: bool = False) -> tuple[_Conn, float]:
        """A connection, and the seconds waited for it: an idle kept-alive one, else a new one (waiting
        while the cap's connections are open). fresh: a new one (idle ones count against the cap
        until they close)."""
        while self.idle and not fresh:
            conn = self.idle.pop()  # the most recently used: the least likely to have timed out
            if not conn.closed:
                return conn, 0.0
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while self.count >= self.limit:
            fut: asyncio.Future[_Conn | None] = loop.create_future()
            self.waiters.append(fut)
            timer = None
            if max_wait_s is not None:
                timer = loop.call_at(t0 + max_wait_s, _expire, fut, f"{self.host}:{self.port}", max_wait_s)
            try:
                handed = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and (late := fut.result()) is not None:
                    self.release(late)  # handed over just as we gave up: pass it on
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            if handed is not None:
                return handed, loop.time() - t0
        waited = loop.time() - t0
        self.count += 1
        try:
            async with asyncio.timeout(self.client.connect_timeout_s):
                context, name = self._tls()
                _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=context,
                                                       server_hostname=name)
        except (OSError, TimeoutError) as e:
            self.count -= 1
            self._wake(None)
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {e}") from None
        return conn, waited

    def _tls(self) -> tuple[ssl.SSLContext | None, str | None]:
        """create_connection's TLS arguments: none for http; for https the client's current context
        and the name the pool's certificate must carry (None: the URL's host)."""
        tls = self.client.tls
        if not self.https or tls is None:
            return self.ssl, None
        return tls.context(), tls.server_name

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


def _expire(fut: asyncio.Future[_Conn | None], where: str, max_wait_s: float) -> None:
    if not fut.done():
        fut.set_exception(ConnectionWaitTimeout(f"no free connection to {where} within {max_wait_s:g} s"))


class Response:
    """A response whose head has arrived. Read the body (read / readany), then close()."""

    __slots__ = ("_conn", "headers", "status", "waited_s")

    def __init__(self, conn: _Conn):
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers  # lower-case names
        self.waited_s = 0.0  # for a free connection before the request went out

    def readany(self) -> Coroutine[Any, Any, bytes]:
        """The body bytes that have arrived (waiting for some); b"" at its end. (The connection's
        own coroutine, not one wrapping it: this runs once per streamed token.)"""
        return self._conn.take()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.take():
            parts.append(chunk)
        return b"".join(parts)

    def pipe(self, on_data: Callable[[bytes], None]) -> asyncio.Future[None]:
        """Hand the body to on_data as it arrives, from the connection's own callback (bytes
        already here first, at once): no task wakes up per read, which is what a relay of one
        event per token spends most on otherwise. The future ends with the body, or fails with
        the UpstreamError (ReadTimeout included) that ended it, or with what on_data raised (then
        nothing more is handed over). Use instead of readany, not with it."""
        return self._conn.pipe(on_data)

    def pause_reading(self) -> None:
        """Stop reading the pool (its TCP window fills, so it slows down): the relay's client is behind."""
        if self._conn is not None:
            self._conn.pause()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume()
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
            conn.unpipe()
            conn.origin.release(conn)


# Body bytes held for a reader (readany) that has fallen behind: past this, the pool is not read
# until the reader takes them (its TCP window fills and it slows down) instead of the gateway
# buffering a whole stream for a slow client.
_BUFFER_HIGH = 256 * 1024


class _Conn(asyncio.Protocol):
    def __init__(self, origin: _Origin):
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.used = False
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self._buffered = 0  # bytes in body
        self.complete = False
        self.keep_alive = False
        self.no_answer = True  # no byte of a response yet: a closed keep-alive may be retried
        self.error: UpstreamError | None = None
        self._head: asyncio.Future[Response] | None = None
        self._more: asyncio.Future[None] | None = None
        self._pipe: Callable[[bytes], None] | None = None  # Response.pipe's consumer
        self._piped: asyncio.Future[None] | None = None  # ... and the end of its body
        self._paused = False  # reading paused for a slow consumer: not idle

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
            self._arm_idle()
            try:
                await self._more
            finally:
                self._more = None
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        if self._buffered > _BUFFER_HIGH:
            self.resume()  # paused by on_body for this reader: it has caught up
        self._buffered = 0
        return data

    def pipe(self, on_data: Callable[[bytes], None]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        if self.body:
            data = b"".join(self.body)
            self.body.clear()
            if self._buffered > _BUFFER_HIGH:
                self.resume()
            self._buffered = 0
            on_data(data)
        if self.complete:
            fut.set_result(None)
        elif self.error is not None:
            fut.set_exception(self.error)
        else:
            self._pipe, self._piped = on_data, fut
            self._arm_idle()
        return fut

    def unpipe(self) -> None:
        fut, self._pipe, self._piped = self._piped, None, None
        if fut is not None and not fut.done():
            fut.cancel()

    def _end_pipe(self, e: BaseException | None) -> None:
        fut, self._pipe, self._piped = self._piped, None, None
        if fut is not None and not fut.done():
            if e is None:
                fut.set_result(None)
            else:
                fut.set_exception(e)

    def pause(self) -> None:
        if not self.closed and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()
            self._arm_idle()

    def _arm_idle(self) -> None:
        """The quiet time counts from now (a wait begins)."""
        self._waiting_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(self._waiting_since + self.origin.client.idle_timeout_s, self._idle)

    def _idle(self) -> None:
        """The idle watchdog: one timer per connection, re-armed when it fires, instead of a timer
        made and cancelled for every wait (every streamed token). Fails the read that has waited
        idle_timeout_s; a wait that began later gets the rest of its own."""
        self._idle_timer = None
        if (self._more is None and self._piped is None) or self._paused or self.closed:
            return  # nobody waits (or a slow consumer holds the reads): the next wait arms it again
        idle_s = self.origin.client.idle_timeout_s
        due = self._waiting_since + idle_s
        if self.loop.time() < due:
            self._idle_timer = self.loop.call_at(due, self._idle)
            return
        self._fail(ReadTimeout(f"no data from {self.origin.host}:{self.origin.port} for {idle_s:g} s"))
        self.abort()

    def _fail(self, e: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = e
        if self._head is not None and not self._head.done():
            self._head.set_exception(e)
        self._end_pipe(self.error or e)
        self._wake()

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    # -- protocol events -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
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
        pipe = self._pipe
        if pipe is None:
            self.body.append(body)
            self._buffered += len(body)
            if self._buffered > _BUFFER_HIGH:
                self.pause()
            self._wake()
            return
        self._waiting_since = self.loop.time()  # the idle watchdog's clock
        try:
            pipe(body)
        except Exception as e:  # the consumer's failure (its client went away): it hears it, we stop
            self._end_pipe(e)

    def on_message_complete(self) -> None:
        self.complete = True
        self._end_pipe(None)
        self._wake()
