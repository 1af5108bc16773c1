"""Pushed load on the gateway's side (gateway/pools/load_stream.py) against the worker's real feed
(gateway/worker/load_feed.py) in-process: a pool's change reaches the gateway's view without a
probe; a stream that goes silent is dropped within the idle timeout and opened again; a pool
without the stream is left to probes; which pools get a stream, and for how long."""
from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import LoadStreamConfig, PoolConfig, ProbeConfig, UpstreamConfig
from gateway.core.errors import Overloaded
from gateway.worker.http import error_middleware
from gateway.core.types import LoadReport
from gateway.pools.load_stream import LoadStreams
from gateway.pools.upstream import Upstreams
from gateway.worker.load_feed import LoadFeed
from tests.servers import free_port

FREE = LoadReport(waiting=0, running=2, max_num_seqs=8, mean_request_s=2.0, prefill_tps=5000.0)
FAST = LoadStreamConfig(connect_timeout_s=1.0, idle_timeout_s=0.5, retry_min_s=0.05, retry_max_s=0.2)


async def until(pred, timeout_s: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return bool(pred())


class Worker:
    """The worker's feed on a real port, its report set by the test."""

    def __init__(self, heartbeat_s: float = 0.2):
        self.report = FREE
        self.feed = LoadFeed(lambda: self.report, interval_s=0.01, heartbeat_s=heartbeat_s)
        app = web.Application(middlewares=[error_middleware()])
        app.router.add_get("/load/stream", self.feed.serve)
        self.server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = Worker()
    await w.server.start_server()
    yield w
    w.feed.close()
    await w.server.close()


def upstreams(*urls: str, kind: str = "meshgate") -> Upstreams:
    pools = tuple(PoolConfig(id=f"p{i}", url=u, kind=kind, models=("m",)) for i, u in enumerate(urls))
    return Upstreams(pools, UpstreamConfig(), ProbeConfig())


async def serve_stream(handler) -> tuple[TestServer, Upstreams, LoadStreams]:  # type: ignore[no-untyped-def]
    """A pool whose /load/stream is `handler` (behind the worker's error middleware), the gateway's
    view of it as pool p0, and load streams that retry slowly (retry_max_s 5 s)."""
    app = web.Application(middlewares=[error_middleware()])
    app.router.add_get("/load/stream", handler)
    server = TestServer(app)
    await server.start_server()
    up = upstreams(str(server.make_url("")).rstrip("/"))
    return server, up, LoadStreams(up, dataclasses.replace(FAST, retry_max_s=5.0), rng=random.Random(0))


async def test_a_pushed_load_change_reaches_the_gateways_view(worker: Worker) -> None:
    up = upstreams(worker.url)
    streams = LoadStreams(up, FAST)
    e = up.pools["p0"].endpoint
    try:
        streams.want(["p0"])
        assert await until(lambda: e.load_pushed and e.load is not None)
        assert (e.load.running, e.load.max_num_seqs, e.load.mean_request_s) == (2, 8, 2.0)
        # the gateway sent two requests since: credited until the pool's next report
        up.pools["p0"].sent()
        up.pools["p0"].sent()
        assert e.sent_since_report == 2
        worker.report = dataclasses.replace(FREE, running=8, waiting=3)  # full now: no probe runs here
        assert await until(lambda: e.load.running == 8, timeout_s=0.15)  # well within a probe period
        assert e.load.waiting == 3 and e.load_pushed and e.sent_since_report == 0
        assert streams.live() == ["p0"]
    finally:
        await streams.close()
    assert not e.load_pushed  # closed: its report ages again, as a probe's


async def test_the_rates_of_the_last_probe_are_kept(worker: Worker) -> None:
    up = upstreams(worker.url)
    pool = up.pools["p0"]
    pool.update_load(dataclasses.replace(FREE, prefill_tps=1234.0, decode_tps=99.0, hot_prefix_hashes=(7,)))
    streams = LoadStreams(up, FAST)
    try:
        worker.report = dataclasses.replace(FREE, running=5, hot_prefix_hashes=(9, 2**62 + 1))
        streams.want(["p0"])
        assert await until(lambda: pool.endpoint.load.running == 5)
        load = pool.endpoint.load
        assert (load.prefill_tps, load.decode_tps) == (1234.0, 99.0)
        # the advertised prefix chunks come with the stream (the pool's current ones), not the probe's
        assert load.hot_prefix_hashes == (9, 2**62 + 1)
    finally:
        await streams.close()


async def test_a_silent_stream_is_dropped_and_opened_again() -> None:
    """A pool whose stream sends one line and then nothing (a path that died without a reset)."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        line = FREE.to_header().encode() + b"\n"
        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
        await writer.drain()
        try:
            await reader.read()  # silent until the gateway gives up
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    up = upstreams(f"http://127.0.0.1:{port}")
    e = up.pools["p0"].endpoint
    streams = LoadStreams(up, FAST)  # idle timeout 0.5 s
    try:
        streams.want(["p0"])
        assert await until(lambda: e.load_pushed)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await until(lambda: not e.load_pushed, timeout_s=2.0)
        assert loop.time() - t0 < 1.0  # the idle timeout, not forever
        assert await until(lambda: connections >= 2 and e.load_pushed, timeout_s=2.0)  # and again
    finally:
        await streams.close()
        server.close()


async def test_pools_without_the_stream_are_left_to_probes() -> None:
    hits = 0

    async def old_worker(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(status=404)

    server, up, streams = await serve_stream(old_worker)
    try:
        streams.want(["p0"])
        assert await until(lambda: hits == 1)
        await asyncio.sleep(0.5)
        assert hits == 1  # asked again only after retry_max_s, not in a loop
        assert not up.pools["p0"].endpoint.load_pushed
    finally:
        await streams.close()
        await server.close()


async def test_a_loading_pool_is_asked_again_after_its_retry_after() -> None:
    hits: list[float] = []
    loop = asyncio.get_running_loop()

    async def loading(request: web.Request) -> web.Response:
        hits.append(loop.time())
        raise Overloaded("the model is still loading", retry_after_s=1)  # as WorkerServer.load_stream

    server, up, streams = await serve_stream(loading)
    try:
        streams.want(["p0"])
        assert await until(lambda: len(hits) >= 2, timeout_s=3.0)
        assert 0.4 < hits[1] - hits[0] < 2.0  # ~1 s (with jitter): neither at once nor retry_max_s
    finally:
        await streams.close()
        await server.close()


async def test_which_pools_get_a_stream() -> None:
    up = upstreams(*(f"http://127.0.0.1:{free_port()}" for _ in range(4)))
    up.pools["p3"].cfg = dataclasses.replace(up.pools["p3"].cfg, kind="openai")  # third-party: no stream
    now = [0.0]
    streams = LoadStreams(up, LoadStreamConfig(max_streams=2, linger_s=10.0, retry_min_s=5.0, retry_max_s=5.0),
                          clock=lambda: now[0])
    try:
        streams.want(["p0", "p1", "p2"])
        assert list(streams.streams) == ["p0", "p1"]  # the bound: the most wanted first
        now[0] = 5.0
        streams.want(["p2", "p3"])
        assert set(streams.streams) == {"p2", "p0"}  # p0 lingers (p1 too, past the bound); p3 has none
        now[0] = 12.0  # p0 and p1 last wanted 12 s ago: past the linger
        streams.want(["p2"])
        assert list(streams.streams) == ["p2"]
    finally:
        await streams.close()
    streams.want(["p0"])  # closed: nothing starts
    assert not streams.streams
