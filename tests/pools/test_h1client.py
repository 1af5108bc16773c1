"""The upstream client (gateway/pools/h1client.py) against a raw asyncio server that counts connections."""
from __future__ import annotations

import asyncio

import pytest

from gateway.pools.h1client import HttpClient, ReadTimeout, UpstreamError
from tests.servers import free_port


class Server:
    """Answers each request after `delay_s`; `close_after` answers per connection, then closes it
    (a keep-alive timer that beat the client's); `stall`: send the head and half a body, then wait."""

    def __init__(self, delay_s: float = 0.0, close_after: int = 0, stall: bool = False, drop_reused: bool = False,
                 trickle_s: float = 0.0):
        self.trickle_s = trickle_s  # > 0: the body goes out a byte at a time, this far apart
        self.drop = False  # close each connection when a request arrives, answering nothing
        self.delay_s = delay_s
        self.close_after = close_after
        self.stall = stall
        self.drop_reused = drop_reused  # a second request on a connection is dropped unanswered (stale keep-alive)
        self.connections = 0
        self.open = 0
        self.peak_open = 0
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                if self.drop or (self.drop_reused and answered):  # gone without a word (a dropped keep-alive)
                    return
                await asyncio.sleep(self.delay_s)
                if self.stall:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
                    await reader.read()  # until the client gives up
                    return
                out = b"echo:" + body
                if self.trickle_s:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(out))
                    for i in range(len(out)):
                        await asyncio.sleep(self.trickle_s)
                        writer.write(out[i:i + 1])
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nx-meshgate-load: w=1\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
                answered += 1
                if self.close_after and answered >= self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            self.closed.set()
            writer.close()

    async def __aenter__(self) -> str:
        self.port = free_port()
        self.srv = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        return f"http://127.0.0.1:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        self.srv.close()


async def _post(c: HttpClient, url: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    r = await c.request("POST", url + "/x", body, {"content-type": "text/plain"})
    try:
        return r.status, await r.read(), r.headers
    finally:
        r.close()


async def test_connections_are_kept_alive_and_reused() -> None:
    s = Server()
    async with s as url:
        c = HttpClient(8, 1.0, 5.0)
        for i in range(5):
            status, body, headers = await _post(c, url, b"%d" % i)
            assert (status, body, headers["x-meshgate-load"]) == (200, b"echo:%d" % i, "w=1")
        await c.close()
    assert s.connections == 1


async def test_connections_per_origin_are_bounded_and_waiters_served() -> None:
    s = Server(delay_s=0.05)
    async with s as url:
        c = HttpClient(2, 1.0, 5.0)
        got = await asyncio.gather(*(_post(c, url, b"%d" % i) for i in range(6)))
        await c.close()
    assert [b for _, b, _ in got] == [b"echo:%d" % i for i in range(6)]
    assert s.peak_open <= 2 and s.connections == 2


async def test_a_server_closed_keepalive_is_retried_on_a_new_connection() -> None:
    s = Server(close_after=1)
    async with s as url:
        c = HttpClient(8, 1.0, 5.0)
        assert (await _post(c, url, b"a"))[1] == b"echo:a"
        await asyncio.wait_for(s.closed.wait(), 5)
        await asyncio.sleep(0.05)  # the client has seen the close... or is about to: either way it must work
        assert (await _post(c, url, b"b"))[1] == b"echo:b"
        await c.close()
    assert s.connections == 2


async def test_the_resend_takes_a_new_connection_when_every_idle_one_is_stale() -> None:
    """A killed pool behind a proxy, a restarted server: all kept-alive connections go stale at once.
    The one resend must not land on another stale one (it did, and the request failed)."""
    s = Server(delay_s=0.05, drop_reused=True)
    async with s as url:
        c = HttpClient(8, 1.0, 5.0)
        first = await asyncio.gather(_post(c, url, b"a"), _post(c, url, b"b"))  # two connections, both idle now
        assert [b for _, b, _ in first] == [b"echo:a", b"echo:b"] and s.connections == 2
        assert (await _post(c, url, b"c"))[1] == b"echo:c"
        await c.close()
    assert s.connections == 3


async def test_an_unread_answer_closes_the_connection_so_the_pool_sees_it() -> None:
    s = Server(stall=True)
    async with s as url:
        c = HttpClient(8, 1.0, 5.0)
        r = await c.request("POST", url + "/x", b"q")
        assert r.status == 200 and await r.readany() == b"half"
        r.close()  # what a cancelled request does
        await asyncio.wait_for(s.closed.wait(), 5)
        await c.close()


async def test_a_stalled_body_times_out() -> None:
    s = Server(stall=True)
    async with s as url:
        c = HttpClient(8, 1.0, 0.2)
        r = await c.request("POST", url + "/x", b"q")
        with pytest.raises(ReadTimeout):
            await r.read()
        r.close()
        await c.close()


async def test_a_body_that_keeps_trickling_never_times_out() -> None:
    """The idle timeout is per gap: a body slower in total than the timeout, but never silent for
    that long, is read whole (the client keeps one watchdog timer per connection, re-armed)."""
    s = Server(trickle_s=0.2)
    async with s as url:
        c = HttpClient(8, 1.0, 1.0)
        r = await c.request("POST", url + "/x", b"abcd")  # 9 bytes, 1.8 s in all
        assert await r.read() == b"echo:abcd"
        r.close()
        await c.close()


async def test_two_dead_kept_alive_connections_are_an_upstream_error() -> None:
    """A request is sent again once when a kept-alive connection turns out dead; when the second
    one is dead too, that is the pool's failure (UpstreamError), never an internal error."""
    s = Server(delay_s=0.05)
    async with s as url:
        c = HttpClient(8, 1.0, 1.0)
        for r in await asyncio.gather(*(c.request("POST", url + "/x", b"q") for _ in range(3))):
            await r.read()
            r.close()  # three kept-alive connections, idle
        s.drop = True
        with pytest.raises(UpstreamError):
            await c.request("POST", url + "/x", b"q")
        await c.close()


async def test_connect_failure_is_an_upstream_error() -> None:
    c = HttpClient(8, 1.0, 1.0)
    with pytest.raises(UpstreamError, match="cannot connect"):
        await c.request("GET", f"http://127.0.0.1:{free_port()}/load")
    await c.close()


def test_basic_credentials_in_the_url_become_an_authorization_header() -> None:
    from gateway.pools.h1client import _Origin

    o = _Origin("http://user:p%40ss@example.com:8080", HttpClient(1, 1, 1))
    wire = o.encode("POST", "/v1/x", b"{}", {"x-a": "1"})
    assert wire.startswith(b"POST /v1/x HTTP/1.1\r\nhost: example.com:8080\r\nauthorization: Basic dXNlcjpwQHNz\r\n")
    assert wire.endswith(b"content-length: 2\r\nx-a: 1\r\n\r\n{}")


async def test_a_piped_body_arrives_whole_and_a_stalled_one_times_out() -> None:
    s = Server(trickle_s=0.05)
    async with s as url:
        c = HttpClient(8, 1.0, 1.0)
        r = await c.request("POST", url + "/x", b"abcd")
        got: list[bytes] = []
        await asyncio.wait_for(r.pipe(got.append), 5)
        assert b"".join(got) == b"echo:abcd"
        r.close()
        await c.close()
    s = Server(stall=True)
    async with s as url:
        c = HttpClient(8, 1.0, 0.2)
        r = await c.request("POST", url + "/x", b"q")
        got = []
        with pytest.raises(ReadTimeout):
            await asyncio.wait_for(r.pipe(got.append), 5)
        assert got == [b"half"]
        r.close()
        await c.close()
