"""GET /load/stream: the pool's load report, pushed to the gateways that route here as it changes.

A probe (GET /load every probe period) gives a gateway a report up to a period old; 197 gateways
routing on such reports fill the same free pool at once (benchmarks/sim: the latency profile's p99
TTFT 1.8x the oracle's). A gateway that keeps this stream open instead learns of a change one
one-way delay after it.

The body is text, one line per report, in the compact form of the x-meshgate-load header
(`LoadReport.to_header()`): waiting, running, queued prompt tokens, KV blocks, queue wait, slots,
mean request duration, and the advertised prefix chunk hashes (h=, bounded: worker/prefix_summary.py).
The rates still come with probes. A line goes out:
- at once when the stream opens;
- when the figures a gateway routes on (waiting, running, queued prompt tokens, prefixes) changed: one task
  per worker looks at the engine's report every `interval_s` while any stream is open, and wakes
  the streams when they did;
- after `heartbeat_s` without one (the same report again), so a gateway can tell a quiet pool from
  a dead stream.
Bounds: at most `max_streams` at once (more are answered 503: the gateway keeps probing); a write
that the gateway does not take within 4 heartbeats (it stopped reading) ends the stream; the
streams end when the worker shuts down.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from gateway.core.errors import Overloaded
from gateway.core.types import LoadReport

log = logging.getLogger("meshgate.worker")

CONTENT_TYPE = "text/plain; charset=utf-8"


def _key(r: LoadReport) -> tuple[object, ...]:
    """What a change must touch to be pushed before the heartbeat (queue_wait_s moves with every
    decoded token; the gateway's headroom model reads the counts; its prefix index the hashes)."""
    return r.waiting, r.running, r.queued_prompt_tokens, r.max_num_seqs, r.hot_prefix_hashes


class LoadFeed:
    def __init__(self, report: Callable[[], LoadReport], interval_s: float = 0.01, heartbeat_s: float = 0.5,
                 max_streams: int = 1024, on_disconnect: Callable[[], None] | None = None):
        """report: the engine's latest report (read, never computed here); on_disconnect: told when
        a gateway went away or stopped reading (a metric)."""
        self.report = report
        self.on_disconnect = on_disconnect
        self.interval_s, self.heartbeat_s, self.max_streams = interval_s, heartbeat_s, max_streams
        self.num_streams = 0
        self.num_pushed = 0  # lines written, heartbeats included (for tests and metrics)
        self._report: LoadReport | None = None
        self._line = b""
        self._key: tuple[object, ...] | None = None
        self._version = 0
        self._changed = asyncio.Event()  # set, and replaced, on each change
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False

    async def serve(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            raise Overloaded("the pool is stopping", retry_after_s=1)
        if self.num_streams >= self.max_streams:
            raise Overloaded(f"this pool already feeds {self.max_streams} load streams; probe GET /load",
                             retry_after_s=30)
        self.num_streams += 1
        try:
            self._look()
            if self._watcher is None:
                self._watcher = asyncio.create_task(self._watch())
            resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache"})
            try:
                await resp.prepare(request)
                await self._feed(resp)
                await resp.write_eof()
            except (ConnectionError, TimeoutError):  # aiohttp's "closing transport" is a ConnectionError
                # The gateway went away or stopped reading: routine (it restarts, or dropped the pool).
                self._gone(request)
            except asyncio.CancelledError:  # aiohttp cancels the handler of a connection that closed
                self._gone(request)
                raise
            return resp
        finally:
            self.num_streams -= 1

    def _gone(self, request: web.Request) -> None:
        log.debug("load stream to %s ended: the gateway went away", request.remote)
        if self.on_disconnect is not None:
            self.on_disconnect()

    async def _feed(self, resp: web.StreamResponse) -> None:
        loop = asyncio.get_running_loop()
        sent_version, sent_at = -1, 0.0
        while not self._closing:
            changed = self._changed
            now = loop.time()
            if self._version != sent_version or now - sent_at >= self.heartbeat_s:
                version, line = self._version, self._line
                async with asyncio.timeout(4 * self.heartbeat_s):
                    await resp.write(line)
                sent_version, sent_at = version, loop.time()
                self.num_pushed += 1
                continue
            try:
                async with asyncio.timeout(sent_at + self.heartbeat_s - now):
                    await changed.wait()
            except TimeoutError:
                pass

    def _look(self) -> None:
        """Take the engine's report (a heartbeat sends the latest); wake the streams if the figures
        they push on changed."""
        r = self.report()
        if r is self._report:
            return
        self._report = r
        self._line = r.to_stream_line().encode() + b"\n"
        key = _key(r)
        if key != self._key:
            self._key = key
            self._version += 1
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def _watch(self) -> None:
        try:
            while self.num_streams > 0 and not self._closing:
                await asyncio.sleep(self.interval_s)
                self._look()
        except Exception:  # noqa: BLE001 - a bug here must not leave the streams without a watcher
            log.exception("load feed watcher failed")
        finally:
            self._watcher = None

    def close(self) -> None:
        """Shutting down: end every stream (each writes its end and returns)."""
        self._closing = True
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def on_shutdown(self, app: web.Application) -> None:
        self.close()
