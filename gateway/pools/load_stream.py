"""Pushed load reports: a GET /load/stream kept open to each pool whose load matters most.

Probes bring a pool's load every probe period (0.25 s); in a mesh where ~200 gateways route on
such reports, they all see the same pool free and fill it together (benchmarks/sim: the latency
profile's p99 TTFT 1.8x the oracle's). With a stream, a pool's change reaches the gateway one
one-way delay later (gateway/worker/load_feed.py), and while the stream is up routing takes the
last line as the pool's current state (Endpoint.load_pushed: the pool would have said otherwise).

Which pools: after each probe round the gateway asks for its `probe.k_nearest` nearest pools and
the candidate spill list (CandidateSet.wanted), nearest first; a pool no longer asked for keeps its
stream for `linger_s`, and at most `max_streams` are open. Only our own workers have the stream.

Bounds: the stream's response head within `connect_timeout_s`; then a line at least every
heartbeat, else after `idle_timeout_s` the stream is dropped (HttpClient's read timeout); a line
over 4 KB is an error. A stream that ends or fails is opened again after a backoff (doubling from
`retry_min_s` to `retry_max_s`, with jitter; back to the minimum after a stream that worked); a
pool that answers 404 (an older worker) is retried at the maximum, one that answers 503 (loading,
too many subscribers, stopping) after its Retry-After (within the same bounds).
Meanwhile, and always, probes go on: they measure RTT and health, and carry the load whenever no
stream is up (the fallback).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable

from gateway.config import LoadStreamConfig
from gateway.pools.h1client import HttpClient, UpstreamError
from gateway.pools.upstream import Pool, Upstreams

log = logging.getLogger("meshgate.pools")

PATH = "/load/stream"
MAX_LINE = 4096


class StreamRefused(Exception):
    """The pool answered the subscription with an error status."""

    def __init__(self, status: int, retry_after_s: float | None = None):
        super().__init__(f"status {status}")
        self.status = status
        self.retry_after_s = retry_after_s


class LoadStreams:
    def __init__(self, upstreams: Upstreams, cfg: LoadStreamConfig, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self.up = upstreams
        self.cfg = cfg
        self.clock = clock
        self.rng = rng or random.Random()
        self.client: HttpClient | None = None
        self.streams: dict[str, tuple[asyncio.Task[None], Pool]] = {}  # pool id -> its task, for this Pool
        self._wanted_at: dict[str, float] = {}  # pool id -> when it was last asked for
        self._closed = False
        self.num_lines = 0  # lines applied, for tests and the operator

    def live(self) -> list[str]:
        """The pools whose stream is up now."""
        return [pid for pid, (_, pool) in self.streams.items() if pool.endpoint.load_pushed]

    def want(self, pool_ids: Iterable[str]) -> None:
        """The pools to stream from, most wanted first (called after each probe round). Opens the
        new ones' streams and closes those not wanted for linger_s (or over max_streams)."""
        if not self.cfg.enabled or self._closed:
            return
        now = self.clock()
        ids = list(pool_ids)
        for pid in ids:
            self._wanted_at[pid] = now
        self._wanted_at = {pid: t for pid, t in self._wanted_at.items()
                           if now - t <= self.cfg.linger_s and pid in self.up.pools}
        asked = set(ids)
        lingering = sorted((pid for pid in self._wanted_at if pid not in asked), key=lambda pid: -self._wanted_at[pid])
        keep: dict[str, Pool] = {}
        for pid in itertools.chain(ids, lingering):
            pool = self.up.pools.get(pid)
            if pool is None or pool.cfg.kind != "meshgate" or pid in keep:
                continue
            keep[pid] = pool
            if len(keep) >= self.cfg.max_streams:
                break
        for pid, (task, pool) in list(self.streams.items()):
            if keep.get(pid) is not pool:  # not wanted, or the pool was replaced (its config changed)
                task.cancel()
                pool.endpoint.load_pushed = False
                del self.streams[pid]
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called outside the gateway's loop (a test driving the callbacks)
            return
        if self.client is None and keep:
            self.client = HttpClient(2, self.cfg.connect_timeout_s, self.cfg.idle_timeout_s, self.up.tls)
        for pid, pool in keep.items():
            if pid not in self.streams:
                self.streams[pid] = (asyncio.create_task(self._run(pool), name=f"load-stream {pid}"), pool)

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t, _ in self.streams.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, pool in self.streams.values():
            pool.endpoint.load_pushed = False
        self.streams.clear()
        if self.client is not None:
            await self.client.close()

    async def _run(self, pool: Pool) -> None:
        """Keep one pool's stream open while it is wanted (until cancelled)."""
        delay = self.cfg.retry_min_s
        pid = pool.endpoint.pool_id
        while True:
            worked = False
            try:
                worked = await self._stream(pool)
                reason = "ended"
            except StreamRefused as e:
                reason = str(e)
                if e.status in (404, 405):  # no stream there (an older worker): probes it is
                    delay = self.cfg.retry_max_s
                elif e.retry_after_s is not None:  # loading (5 s), no room for us (30 s), stopping
                    delay = min(self.cfg.retry_max_s, max(delay, e.retry_after_s))
            except (UpstreamError, TimeoutError, ConnectionError, ValueError, UnicodeDecodeError) as e:
                reason = str(e) or type(e).__name__
                if pool.endpoint.load_pushed and not isinstance(e, (ValueError, UnicodeDecodeError)):
                    pool.went_down(f"load stream lost: {reason}")  # killed, stalled, or cut off from us
            except asyncio.CancelledError:
                pool.endpoint.load_pushed = False
                raise
            except Exception:  # noqa: BLE001 - a bug must not end the stream for good
                log.exception("load stream from %s failed", pid)
                reason = "error"
            pool.endpoint.load_pushed = False
            if worked:
                delay = self.cfg.retry_min_s
            log.debug("load stream from %s: %s; again in ~%.1f s", pid, reason, delay)
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(self.cfg.retry_max_s, 2 * delay)

    async def _stream(self, pool: Pool) -> bool:
        """One stream, until it ends (returns whether any line came) or fails (raises)."""
        if self.client is None:
            self.client = HttpClient(2, self.cfg.connect_timeout_s, self.cfg.idle_timeout_s, self.up.tls)
        e = pool.endpoint
        async with asyncio.timeout(self.cfg.connect_timeout_s):
            resp = await self.client.request("GET", e.url + PATH)
        worked = False
        try:
            if resp.status != 200:
                try:
                    retry_after: float | None = float(resp.headers.get("retry-after", ""))
                except ValueError:
                    retry_after = None
                raise StreamRefused(resp.status, retry_after)
            buf = b""
            while chunk := await resp.readany():  # each wait bounded by idle_timeout_s
                buf += chunk
                if b"\n" not in buf:
                    if len(buf) > MAX_LINE:
                        raise ValueError(f"a line of over {MAX_LINE} bytes")
                    continue
                lines = buf.split(b"\n")
                buf = lines.pop()
                line = lines[-1]  # the newest: those before it are already out of date
                if not pool.load_from_compact(line.decode()):
                    raise ValueError(f"not a load report: {line[:80]!r}")
                e.load_pushed = True
                worked = True
                self.num_lines += 1
            return worked
        finally:
            resp.close()
