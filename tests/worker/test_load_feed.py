"""GET /load/stream on the worker (gateway/worker/load_feed.py): a subscriber gets the load report at
once, again soon after the figures routing reads change, and again after a heartbeat when nothing
did; the number of streams is bounded; shutting down ends them."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError, config_from_dict
from gateway.worker.http import error_middleware
from gateway.core.types import LoadReport
from gateway.worker.load_feed import LoadFeed

BUSY = LoadReport(waiting=0, running=3, queued_prompt_tokens=0, queue_wait_s=0.0, max_num_seqs=8, mean_request_s=2.0)


class Engine:
    """Stands for AsyncEngine: its report is replaced whole, as the engine thread does."""

    def __init__(self) -> None:
        self.report = BUSY


@pytest.fixture
async def served() -> AsyncIterator[tuple[Engine, LoadFeed, str]]:
    eng = Engine()
    feed = LoadFeed(lambda: eng.report, interval_s=0.01, heartbeat_s=0.3, max_streams=2,
                    on_disconnect=lambda: setattr(feed, "gone", getattr(feed, "gone", 0) + 1))
    app = web.Application(middlewares=[error_middleware(lambda request, status: None)])  # as the worker's
    app.router.add_get("/load/stream", feed.serve)
    app.on_shutdown.append(feed.on_shutdown)
    server = TestServer(app)
    await server.start_server()
    yield eng, feed, str(server.make_url("/load/stream"))
    await server.close()


async def lines(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, LoadReport]]:
    while line := await resp.content.readline():
        yield time.monotonic(), LoadReport.from_header(line.decode().strip())


async def test_a_change_is_pushed_at_once_and_a_quiet_pool_repeats_itself(served) -> None:
    eng, feed, url = served
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain")
        it = lines(resp)
        _, first = await asyncio.wait_for(anext(it), 2)
        assert (first.running, first.max_num_seqs, first.mean_request_s) == (3, 8, 2.0)
        t0 = time.monotonic()
        eng.report = dataclasses.replace(BUSY, running=8, waiting=2)  # the batch filled up
        at, full = await asyncio.wait_for(anext(it), 2)
        assert (full.running, full.waiting) == (8, 2)
        assert at - t0 < 0.15  # the interval (10 ms), not the heartbeat (300 ms)
        # nothing a gateway routes on changes (only the queue-wait estimate): the heartbeat, 0.3 s later
        eng.report = dataclasses.replace(eng.report, queue_wait_s=1.5)
        at2, again = await asyncio.wait_for(anext(it), 2)
        assert 0.2 < at2 - at < 1.0
        assert (again.running, again.waiting, again.queue_wait_s) == (8, 2, 1.5)  # the latest figures


async def test_streams_are_bounded_and_end_with_the_worker(served) -> None:
    eng, feed, url = served
    async with aiohttp.ClientSession() as s:
        a, b = await s.get(url), await s.get(url)
        assert a.status == b.status == 200
        await asyncio.wait_for(a.content.readline(), 2)
        await asyncio.wait_for(b.content.readline(), 2)
        assert feed.num_streams == 2
        async with s.get(url) as c:
            assert c.status == 503  # the gateway falls back to probes
        feed.close()  # what the worker's shutdown does
        for r in (a, b):
            rest = await asyncio.wait_for(r.content.read(), 2)  # the body ends: no hang
            assert rest == b"" or rest.endswith(b"\n")
            r.release()
        await asyncio.sleep(0.05)
        assert feed.num_streams == 0
        async with s.get(url) as d:
            assert d.status == 503  # stopping: no new streams


async def test_a_gateway_that_goes_away_frees_its_stream(served, caplog) -> None:
    eng, feed, url = served
    async with aiohttp.ClientSession() as s:
        r = await s.get(url)
        await asyncio.wait_for(r.content.readline(), 2)
        assert feed.num_streams == 1
        r.close()  # drops the connection
    for _ in range(100):
        eng.report = dataclasses.replace(eng.report, running=eng.report.running % 8 + 1)  # something to write
        await asyncio.sleep(0.02)
        if feed.num_streams == 0:
            break
    assert feed.num_streams == 0
    # Routine: counted once, and nothing logged at ERROR (no traceback) for it.
    assert getattr(feed, "gone", 0) == 1
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_stream_settings_are_checked() -> None:
    base = {"id": "p", "port": 8101}
    assert config_from_dict({"pools": [base]}).pools[0].load_stream_interval_s == 0.01
    for bad in ({"load_stream_interval_s": 0}, {"max_load_streams": 0},
                {"load_stream_interval_s": 1.0, "load_stream_heartbeat_s": 0.5}):
        with pytest.raises(ConfigError, match="load_stream|max_load_streams"):
            config_from_dict({"pools": [{**base, **bad}]})
    with pytest.raises(ConfigError, match="gateway.load_stream.idle_timeout_s"):
        config_from_dict({"gateway": {"load_stream": {"idle_timeout_s": 0}}})
