"""Forwarding one client request to pools: routing, failover before the first token, SSE relay.

The pool's bytes are relayed as they come (no re-encoding). Until the first body bytes arrive a
failure or timeout is retried on the next pool in the routing decision's order (bounded attempts,
within the request deadline); once bytes reached the client, a failure ends the stream with an
OpenAI error event and `[DONE]`, never a hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from gateway.api.metrics import GatewayMetrics
from gateway.core.errors import APIError, InternalError, Overloaded
from gateway.core.types import RouteRequest
from gateway.pools.upstream import Pool, Upstreams
from gateway.routing.framework import Profile

log = logging.getLogger("meshgate.gateway")

_RELAYED_HEADERS = ("Content-Type",)


# What the gateway learns of a request as it goes, for headers, logs and metrics.
REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", str)
POOL = web.RequestKey("pool", str)


class BadGateway(APIError):
    status = 502
    type = "upstream_error"


@dataclass(slots=True)
class Call:
    """One client request on its way through the gateway."""

    path: str
    body: bytes
    stream: bool
    route: RouteRequest
    headers: dict[str, str]
    request_id: str
    arrival: float
    deadline: float  # monotonic


class _Retry(Exception):
    """This attempt failed before anything reached the client: try the next pool."""


class Forwarder:
    def __init__(self, upstreams: Upstreams, profile: Profile, metrics: GatewayMetrics, max_attempts: int,
                 first_byte_timeout_s: float):
        self.up = upstreams
        self.profile = profile
        self.m = metrics
        self.max_attempts = max_attempts
        self.first_byte_timeout_s = first_byte_timeout_s

    async def forward(self, request: web.Request, call: Call) -> web.StreamResponse:
        t0 = time.perf_counter()
        for pool in self.up.pools.values():
            pool.refresh_breaker()
        decision = self.profile.route(call.route, self.up.endpoints)
        self.m.routing.observe(time.perf_counter() - t0)
        if not decision.ranked:
            raise Overloaded(f"no healthy pool serves the model '{call.route.model}' right now", retry_after_s=2)
        request[ROUTE] = decision.explain()
        attempts = 0
        for ep in decision.ranked:
            if attempts >= self.max_attempts:
                break
            pool = self.up.pools[ep.pool_id]
            if not pool.breaker.allow():
                continue
            if attempts:
                self.m.failovers.labels(request.get(POOL, "")).inc()
            attempts += 1
            request[POOL] = ep.pool_id
            try:
                return await self._attempt(request, call, pool)
            except _Retry as e:
                log.warning("request %s: pool %s failed before the first token (%s); %s", call.request_id,
                            ep.pool_id, e, "retrying" if attempts < self.max_attempts else "giving up")
        raise BadGateway(f"no pool could serve the request ({attempts} tried)")

    async def _open(self, call: Call, pool: Pool) -> tuple[aiohttp.ClientResponse, bytes]:
        """Send the request; return the response and its first body bytes (the first token when
        streaming, the whole body otherwise). Raises _Retry, with the failure recorded, if the pool
        fails before that."""
        assert self.up.session is not None
        ep = pool.endpoint
        remaining = call.deadline - time.monotonic()
        if remaining <= 0:
            raise Overloaded("the request deadline passed before a pool could answer")
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                async with asyncio.timeout(min(remaining, self.first_byte_timeout_s)):
                    resp = await self.up.session.post(ep.url + call.path, data=call.body, headers=call.headers)
                    pool.load_from_header(resp.headers)
                    if resp.status >= 500 or resp.status == 429:
                        raise _Retry(f"status {resp.status}")
                    first = await resp.content.readany() if call.stream else await resp.read()
                    if call.stream and not first:
                        raise _Retry("closed before the first token")
                    return resp, first
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                raise _Retry(type(e).__name__) from None
        except _Retry:
            pool.record_failure()
            self.m.attempts.labels(ep.pool_id, "error").inc()
            if resp is not None:
                resp.close()
            raise

    async def _attempt(self, request: web.Request, call: Call, pool: Pool) -> web.StreamResponse:
        ep = pool.endpoint
        ep.in_flight += 1
        try:
            resp, first = await self._open(call, pool)
            try:
                self.m.ttft.labels(ep.pool_id).observe(time.monotonic() - call.arrival)
                if resp.status >= 400:  # the pool refused the request itself: relay, no retry
                    pool.record_success()
                    self.m.attempts.labels(ep.pool_id, "client_error").inc()
                    return web.Response(body=first, status=resp.status, content_type="application/json")
                if not call.stream:
                    pool.record_success()
                    self.m.attempts.labels(ep.pool_id, "ok").inc()
                    self.m.e2e.labels(ep.pool_id).observe(time.monotonic() - call.arrival)
                    return web.Response(body=first, status=200, content_type="application/json")
                return await self._relay(request, call, pool, resp, first)
            finally:
                # Normally a no-op (fully read). When the client went away mid-stream, closing the
                # connection tells the pool to abort the request and free its KV blocks.
                resp.close()
        finally:
            ep.in_flight -= 1

    async def _relay(self, request: web.Request, call: Call, pool: Pool, resp: aiohttp.ClientResponse,
                     first: bytes) -> web.StreamResponse:
        ep = pool.endpoint
        out = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        await out.write(first)
        last = time.monotonic()
        outcome = "ok"
        try:
            async with asyncio.timeout_at(_loop_time(call.deadline)):
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    now = time.monotonic()
                    self.m.itl.labels(ep.pool_id).observe(now - last)
                    last = now
                    await out.write(chunk)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            if isinstance(e, ConnectionResetError) and request.transport is None:
                raise  # the client went away: nothing to tell it
            outcome = "broken_stream"
            pool.record_failure()
            msg = ("the request deadline passed mid-stream" if isinstance(e, TimeoutError)
                   else "the pool failed mid-stream; the response is incomplete")
            err = InternalError(msg).body()
            err["error"]["type"] = "upstream_error"
            await out.write(b"data: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n")
        else:
            pool.record_success()
        self.m.attempts.labels(ep.pool_id, outcome).inc()
        self.m.e2e.labels(ep.pool_id).observe(time.monotonic() - call.arrival)
        await out.write_eof()
        return out


def _loop_time(deadline_monotonic: float) -> float:
    """asyncio.timeout_at wants the loop's clock; convert from time.monotonic()."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline_monotonic - time.monotonic())
