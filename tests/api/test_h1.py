"""The gateway's HTTP/1.1 server (gateway/api/h1.py), spoken to over raw sockets and with httpx."""
from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from gateway.api.h1 import HttpServer, Request, Response, Router, Stream, json_response
from gateway.core.errors import RateLimited


class App:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.answered: list[tuple[str, int]] = []
        r = Router()
        r.add("POST", "/echo", self.echo)
        r.add("GET", "/items/", self.item, prefix=True)
        r.add("GET", "/limited", self.limited)
        r.add("GET", "/boom", self.boom)
        r.add("GET", "/slow", self.slow)
        r.add("GET", "/stream", self.stream)
        self.server = HttpServer(r, max_body_bytes=1000, keepalive_timeout_s=0.5,
                                 on_response=lambda req, status: self.answered.append((req.path, status)))

    async def echo(self, req: Request) -> Response:
        return json_response({"body": req.body.decode(), "type": req.headers.get("content-type")})

    async def item(self, req: Request) -> Response:
        return json_response({"item": req.path.removeprefix("/items/"), "query": req.query})

    async def limited(self, req: Request) -> Response:
        raise RateLimited("slow down", retry_after_s=3)

    async def boom(self, req: Request) -> Response:
        raise RuntimeError("secret internal detail")

    async def slow(self, req: Request) -> Response:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(b"late")

    async def stream(self, req: Request) -> Stream:
        out = req.start_stream()
        for i in range(3):
            await out.write(b"data: %d\n\n" % i)
        await out.end()
        return out


@pytest.fixture
async def app():
    a = App()
    await a.server.start("127.0.0.1", 0)
    yield a
    await a.server.shutdown(1.0)


async def _raw(port: int, data: bytes, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    async with asyncio.timeout(5):
        out = await reader.read() if until_close else await reader.read(65536)
    writer.close()
    return out


async def test_routes_errors_and_status_hook(app: App) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.server.port}") as c:
        r = await c.post("/echo", content=b"hello", headers={"Content-Type": "text/plain"})
        assert r.status_code == 200 and r.json() == {"body": "hello", "type": "text/plain"}
        r = await c.get("/items/abc?x=1")
        assert r.json() == {"item": "abc", "query": "x=1"}
        r = await c.get("/limited")
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = await c.get("/boom")
        assert r.status_code == 500 and "secret" not in r.text and r.json()["error"]["type"] == "internal_error"
        assert (await c.get("/nope")).status_code == 404
        r = await c.get("/echo")
        assert r.status_code == 405 and r.json()["error"]["message"].startswith("Method Not Allowed")
        r = await c.head("/items/x")
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    assert app.answered == [("/echo", 200), ("/items/abc", 200), ("/limited", 429), ("/boom", 500),
                            ("/nope", 404), ("/echo", 405), ("/items/x", 200)]


async def test_keep_alive_and_pipelining_answer_in_order_on_one_connection(app: App) -> None:
    reqs = b"".join(b"GET /items/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    writer.write(reqs)
    got = b""
    async with asyncio.timeout(5):
        while got.count(b"HTTP/1.1 200") < 5 or not got.endswith(b"}"):
            got += await reader.read(65536)
    bodies = [orjson.loads(part.split(b"\r\n\r\n", 1)[1]) for part in got.split(b"HTTP/1.1 ")[1:]]
    assert [b["item"] for b in bodies] == ["0", "1", "2", "3", "4"]
    assert b"connection: close" not in got
    writer.close()


async def test_connection_close_and_http10_close_after_answer(app: App) -> None:
    out = await _raw(app.server.port, b"GET /items/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out
    out = await _raw(app.server.port, b"GET /items/a HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out


async def test_too_large_body_is_413_before_it_is_read(app: App) -> None:
    out = await _raw(app.server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413") and b'"invalid_request_error"' in out
    # chunked: no length up front, refused once the bytes pass the limit
    chunk = b"x" * 800
    body = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
    out = await _raw(app.server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 413")


async def test_oversized_headers_are_431(app: App) -> None:
    out = await _raw(app.server.port, b"GET /items/a HTTP/1.1\r\nHost: x\r\n" + b"x-pad: " + b"a" * 70000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")


async def test_malformed_request_is_400_and_server_keeps_serving(app: App) -> None:
    out = await _raw(app.server.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"malformed HTTP request" in out
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"http://127.0.0.1:{app.server.port}/items/ok")).status_code == 200


async def test_expect_100_continue(app: App) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hi")
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_chunked_stream(app: App) -> None:
    async with httpx.AsyncClient() as c, c.stream("GET", f"http://127.0.0.1:{app.server.port}/stream") as r:
        assert r.headers["transfer-encoding"] == "chunked" and r.headers["content-type"] == "text/event-stream"
        assert b"".join([part async for part in r.aiter_bytes()]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_client_gone_cancels_its_handler(app: App) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        await app.started.wait()
        writer.close()
        await app.cancelled.wait()


async def test_idle_connection_is_closed_after_keepalive_timeout(app: App) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # the server closed it (timeout 0.5 s)
    writer.close()


async def test_shutdown_waits_for_running_requests_then_cancels(app: App) -> None:
    port = app.server.port
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(app.started.wait(), 5)
    await app.server.shutdown(0.2)
    assert app.cancelled.is_set()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def test_100_pipelined_requests_are_all_answered_in_order(app: App) -> None:
    """More requests than the read-ahead window: held (the socket is not read meanwhile), then
    answered in order on the same connection; none is dropped."""
    n = 100
    reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
    for i in range(n):  # several writes, so that some arrive while the connection has stopped reading
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%d" % (len(b"%d" % i), i))
        if i % 10 == 9:
            await writer.drain()
    got = b""
    async with asyncio.timeout(10):
        while got.count(b"HTTP/1.1 200") < n or not got.endswith(b"}"):
            chunk = await reader.read(65536)
            assert chunk, f"connection closed after {got.count(b'HTTP/1.1 200')} answers"
            got += chunk
    bodies = [orjson.loads(part.split(b"\r\n\r\n", 1)[1]) for part in got.split(b"HTTP/1.1 ")[1:]]
    assert [b["body"] for b in bodies] == [str(i) for i in range(n)]
    writer.write(b"GET /items/last HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection still serves
    async with asyncio.timeout(5):
        tail = await reader.read(65536)
    assert b"200" in tail and b'"last"' in tail
    writer.close()
