"""Forwarding one request to pools: routing, failover before the first token, streaming.

Transport-neutral: `Forwarder.open(call)` picks a pool and returns an `Upstream` whose first body
bytes have arrived (the first token when streaming, the whole body otherwise); until then a
failure or timeout is retried on the next pool of the routing decision (bounded attempts, within
the request deadline). The HTTP front relays the pool's bytes as they come; the gRPC front
re-frames them. A failure after the first token raises StreamBroken so the front can end the
stream with an error, never a hang.

Every request that prepare() admitted ends in exactly one `Call.finish` (from Upstream.close, or
from open() when no pool answered): that is where per-key limits are settled and usage metered.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.edge.admission import Principal
from gateway.edge.metrics import GatewayMetrics, observe_many
from gateway.edge.tracing import end_request
from gateway.config import RoutingOptions
from gateway.core.errors import APIError, Overloaded
from gateway.core.types import Endpoint, RouteRequest
from gateway.core.wire import MAY_REFUSE_HEADER
from gateway.pools.h1client import ConnectionWaitTimeout, Response, UpstreamError
from gateway.pools.upstream import Pool, Upstreams
from gateway.routing.candidates import CandidateSet
from gateway.routing.framework import Profile

log = logging.getLogger("meshgate.gateway")

_GAPS_BATCH = 256  # inter-token gaps a stream keeps before they go to the histogram


class BadGateway(APIError):
    status = 502
    type = "upstream_error"


class StreamBroken(Exception):
    """The pool failed, or the deadline passed, after the first token reached the client."""


class _ClientGone(Exception):
    """relay(): the sink failed (its client went away); not the pool's fault."""


class Sink(Protocol):
    """Where relay() puts the client's bytes (gateway.api.h1.Stream; edge/resume.py's tracking
    sink and queue; edge/whole.py's Assembler)."""

    def push(self, data: bytes) -> bool: ...  # True: the client is behind; await drained() first

    async def drained(self) -> None: ...  # raises ConnectionError once the client is gone


class Meter(Protocol):
    """Watches a request's stream and hears, once, how it ended (gateway.edge.metering.RequestMeter)."""

    def feed(self, chunk: bytes) -> bytes: ...  # pool bytes in, bytes for the client out

    def tail(self) -> bytes: ...  # at the stream's end: what feed() still held

    def rejoin(self) -> None: ...  # a cut stream goes on from another pool (edge/resume.py)

    def finish(self, call: Call, up: Upstream | None) -> None: ...


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
    principal: Principal | None = None  # the API key's holder; None when auth is off
    priority: str | None = None  # the class the pool is told (x-meshgate-priority)
    meter: Meter | None = field(default=None, repr=False)

    span: Any = field(default=None, repr=False)  # the request's trace span, when tracing is on
    client: Any = field(default=None, repr=False)  # geo.client.ClientLocation, when known
    decision: Any = field(default=None, repr=False)  # the routing Decision, once routed
    release: Callable[[], None] | None = field(default=None, repr=False)  # gives back the in-flight count
    on_finish: Callable[[Call, Upstream | None, int], None] | None = field(default=None, repr=False)
    on_error: Callable[[str], None] | None = field(default=None, repr=False)  # bookkeeping failed (a metric)
    finished: bool = False
    avoid: frozenset[str] = frozenset()  # pools not to try (a continuation avoids those that were cut)
    resumed_from: tuple[str, ...] = ()  # pools that served earlier parts of this stream, in order
    whole: bool = False  # a non-stream request asked of its pool as a stream (edge/whole.py)

    def finish(self, up: Upstream | None, status: int | None = None) -> None:
        """The request is over: meter it (which settles its key's limits), end its span, log it, and
        give back its in-flight count. Runs once; a front that prepared a Call but never opened it
        must call finish(None, status). Each step runs on its own: one that raises is logged and
        counted, and the count is given back whatever they do, so a failing meter or tracer can
        never leave the gateway at its in-flight limit."""
        if self.finished:
            return
        self.finished = True
        meter, self.meter = self.meter, None
        status = status if status is not None else (up.status if up is not None else 500)
        try:
            if meter is not None:
                self._guard("metering", meter.finish, self, up)
            self._guard("tracing", end_request, self, up, status)
            if self.on_finish is not None:
                self._guard("decision_log", self.on_finish, self, up, status)
        finally:
            if self.release is not None:
                self.release()

    def _guard(self, stage: str, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception:  # bookkeeping must never turn a served request into a failure
            log.exception("request %s: %s failed", self.request_id, stage)
            if self.on_error is not None:
                self.on_error(stage)


class _Retry(Exception):
    """This attempt failed before anything reached the client: try the next pool. busy: the pool
    refused because it is full (429/503), which is not a fault for its circuit breaker."""

    def __init__(self, reason: str, busy: bool = False):
        super().__init__(reason)
        self.busy = busy


class Upstream:
    """An answering pool: status, first bytes, then the rest of the stream. close() it."""

    def __init__(self, fwd: Forwarder, call: Call, pool: Pool, resp: Response, first: bytes,
                 route: str, failovers: int):
        self.fwd = fwd
        self.call = call
        self.pool = pool
        self.resp = resp
        self.status = resp.status
        self.first = first
        self.route = route  # the routing decision, explained
        self.failovers = failovers
        self.ttft_s = time.monotonic() - call.arrival  # first body bytes: the first token when streaming
        self.outcome = "ok" if resp.status < 400 else "client_error"
        self._closed = False
        self._gaps: list[float] = []  # inter-token gaps not yet in the ITL histogram
        self._num_flushed = 0  # gaps already in the histogram
        self.last_read = time.monotonic()  # relay(): when the pool's last bytes came (the stall watch reads it)
        self._resume: asyncio.Future[None] | None = None  # relay(): waits for a slow client, then reads on

    @property
    def pool_id(self) -> str:
        return self.pool.endpoint.pool_id

    @property
    def num_reads(self) -> int:
        """relay(): reads from the pool so far, the first bytes not counted."""
        return self._num_flushed + len(self._gaps)

    @property
    def behind(self) -> bool:
        """relay(): the pool is not read while the client catches up."""
        return self._resume is not None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, first bytes included. Raises StreamBroken mid-stream."""
        meter = self.call.meter if self.call.stream and self.status < 400 else None
        first = meter.feed(self.first) if meter is not None else self.first
        if first:
            yield first
        if not self.call.stream:
            return
        # Per token only what must be: read, meter, hand on. The gaps are kept in a list and go to
        # the ITL histogram in bulk (close(), or every _GAPS_BATCH tokens of a long stream).
        gaps = self._gaps
        readany = self.resp.readany
        monotonic = time.monotonic
        last = monotonic()
        try:
            async with asyncio.timeout_at(_loop_time(self.call.deadline)):
                while chunk := await readany():
                    now = monotonic()
                    gaps.append(now - last)
                    last = now
                    if len(gaps) >= _GAPS_BATCH:
                        self._flush_gaps()
                    if meter is not None and not (chunk := meter.feed(chunk)):
                        continue  # no whole event yet, or only one the client did not ask for
                    yield chunk
            if meter is not None and (rest := meter.tail()):
                yield rest
        except (UpstreamError, TimeoutError, ConnectionError) as e:
            raise self._broken(e) from None

    async def relay(self, sink: Sink) -> None:
        """What pushing each of chunks() to sink does (same bytes, metering, gaps, deadline and
        StreamBroken), but the pool's reads go to the sink from the connection's callback: no task
        wakes up, no coroutine resumes, per token. Flow control: while the sink's client is behind,
        the pool's connection is not read. The sink's own failure (its client went away) is raised
        as the ConnectionResetError it is, not as a broken stream."""
        meter = self.call.meter if self.call.stream and self.status < 400 else None
        first = meter.feed(self.first) if meter is not None else self.first
        if first and sink.push(first):
            await sink.drained()
        if not self.call.stream:
            return
        gaps, resp, monotonic = self._gaps, self.resp, time.monotonic
        self.last_read = monotonic()

        def on_data(chunk: bytes) -> None:
            now = monotonic()
            gaps.append(now - self.last_read)
            self.last_read = now
            if len(gaps) >= _GAPS_BATCH:
                self._flush_gaps()
            if meter is not None and not (chunk := meter.feed(chunk)):
                return
            try:
                behind = sink.push(chunk)
            except ConnectionError as e:
                raise _ClientGone() from e
            if behind and self._resume is None:
                resp.pause_reading()
                self._resume = asyncio.ensure_future(self._resume_when_drained(sink))

        try:
            async with asyncio.timeout_at(_loop_time(self.call.deadline)):
                await resp.pipe(on_data)
                if self._resume is not None:
                    await self._resume
            if meter is not None and (rest := meter.tail()) and sink.push(rest):
                await sink.drained()
        except _ClientGone:
            raise ConnectionResetError("the client went away") from None
        except (UpstreamError, TimeoutError, ConnectionError) as e:
            raise self._broken(e) from None

    def _broken(self, e: Exception) -> StreamBroken:
        """The pool failed (or the deadline passed) after the first token: booked against the pool."""
        self.outcome = "broken_stream"
        self.pool.record_failure()
        return StreamBroken("the request deadline passed mid-stream" if isinstance(e, TimeoutError)
                            else "the pool failed mid-stream; the response is incomplete")

    async def _resume_when_drained(self, sink: Sink) -> None:
        try:
            await sink.drained()
        except ConnectionError:
            return  # the client is gone: its request is being cancelled
        finally:
            self._resume = None
        self.last_read = time.monotonic()  # the time the client took is not the pool's
        self.resp.resume_reading()

    def _flush_gaps(self) -> None:
        observe_many(self.fwd.m.pool(self.pool_id).itl, self._gaps)
        self._num_flushed += len(self._gaps)
        self._gaps.clear()

    def close(self, finish: bool = True) -> None:
        """Book the attempt. Closing an unfinished response drops the connection, which tells the
        pool to abort the request and free its KV blocks (client gone). finish=False: the request
        goes on elsewhere (a continuation or a hedge took over), so it is not finished here."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        self.resp.close()
        self.pool.done()
        if self.outcome != "broken_stream":
            self.pool.record_success()
        self._flush_gaps()
        m = self.fwd.m
        series = m.pool(self.pool_id)
        series.attempt(self.outcome)
        series.e2e.observe(time.monotonic() - self.call.arrival)
        if finish:
            self.call.finish(self)


class Forwarder:
    def __init__(self, upstreams: Upstreams, profile: Profile, metrics: GatewayMetrics, max_attempts: int,
                 first_byte_timeout_s: float, options: RoutingOptions | None = None):
        self.up = upstreams
        # Decisions consider the nearest usable pools and a spill list, not the whole mesh; the
        # order is refreshed after each round of probes and when the pool set changes.
        options = options or RoutingOptions()
        self.candidates = CandidateSet(upstreams.endpoints, options.candidates_near, options.candidates_spill,
                                       options=options)
        upstreams.on_probed.append(self.candidates.refresh)
        upstreams.on_change.append(lambda joined: self.candidates.reset(self.up.endpoints))
        self.profile = profile
        self.m = metrics
        self.max_attempts = max_attempts
        self.first_byte_timeout_s = first_byte_timeout_s
        # told which pool took each request (prefix memory and sessions: gateway/edge/prefix_routing.py)
        self.on_routed: Callable[[RouteRequest, Endpoint], None] | None = None
        self.connection_wait_s = upstreams.up.connection_wait_s  # the most a request waits for a connection
        self.guard: AttemptGuard | None = None  # stall and pool-down policy (edge/resume.py Guard)
        # told each streamed attempt's time to its first byte (first-byte lateness: edge/hedge.py FirstByteFeed)
        self.on_first_byte: Callable[[Call, Endpoint, float], None] | None = None

    async def open(self, call: Call) -> Upstream:
        try:
            return await self._open(call)
        except BaseException as e:
            # No pool answered, so no Upstream.close will come. 499: the client went away.
            call.finish(None, getattr(e, "status", 499 if isinstance(e, asyncio.CancelledError) else 500))
            raise

    async def _open(self, call: Call) -> Upstream:
        t0 = time.perf_counter()
        candidates = self.candidates.select(call.route)
        if self.up.shared:  # other gateway processes send to these pools too
            for ep in candidates:
                self.up.pools[ep.pool_id].sync()
        decision = call.decision = self.profile.route(call.route, candidates)
        self.m.routing.observe(time.perf_counter() - t0)
        if not decision.ranked:
            where = f" in {','.join(sorted(call.route.countries))}" if call.route.countries is not None else ""
            raise Overloaded(f"no healthy pool serves the model '{call.route.model}'{where} right now",
                             retry_after_s=2)
        # A full pool may refuse (429) while attempts are left, so the request goes where it starts
        # sooner; the last attempt always queues. If the candidates run out first, the first pool
        # that refused is asked again, told it may not refuse.
        pools = (self.up.pools[ep.pool_id] for ep in decision.ranked if ep.pool_id not in call.avoid)
        attempts, refused, waits_out = 0, None, False
        skipped: list[Pool] = []  # at their connection cap: passed over for the next candidate
        while attempts < self.max_attempts:
            pool, final = next(pools, None), False
            if pool is None:
                if refused is None:
                    break
                pool, refused, final = refused, None, True
            elif not pool.breaker.allow():
                continue
            elif self.up.would_wait(pool):
                # Every connection to it is busy: a queue routing would not see. Full, like a
                # refusal (no attempt spent); it is waited for only if no candidate is left.
                refused = refused or pool
                skipped.append(pool)
                continue
            attempts += 1
            try:
                resp, first = await self._attempt(call, pool, may_refuse=not final and attempts < self.max_attempts)
            except _Retry as e:
                waits_out = isinstance(e.__cause__, ConnectionWaitTimeout) or waits_out
                refused = refused or (pool if e.busy and not final else None)  # the final ask is not repeated
                self.m.pool(pool.endpoint.pool_id).failovers.inc()
                # A full pool turning a request away is routine under load; a failure is not.
                (log.debug if e.busy else log.warning)("request %s: pool %s %s before the first token (%s)",
                                                       call.request_id, pool.endpoint.pool_id,
                                                       "refused" if e.busy else "failed", e)
                continue
            for full in skipped:
                if full is not pool:  # served elsewhere: counted as skipped (else as waited, above)
                    self.m.pool(full.endpoint.pool_id).connection_wait("skipped")
            up = Upstream(self, call, pool, resp, first, decision.explain(), attempts - 1)
            if self.on_routed is not None and resp.status < 400:
                self.on_routed(call.route, pool.endpoint)
            self.m.pool(pool.endpoint.pool_id).ttft.observe(up.ttft_s)
            return up
        if waits_out:
            raise Overloaded("every connection to the pools that serve this model is busy", retry_after_s=1)
        raise BadGateway(f"no pool could serve the request ({attempts} tried)")

    async def _attempt(self, call: Call, pool: Pool, may_refuse: bool) -> tuple[Response, bytes]:
        assert self.up.client is not None
        ep = pool.endpoint
        remaining = call.deadline - time.monotonic()
        if remaining <= 0:
            raise Overloaded("the request deadline passed before a pool could answer")
        pool.sent()
        sent_at = time.monotonic()
        resp: Response | None = None
        wait_s = min(remaining, self.first_byte_timeout_s)
        watch: DownWatch | None = None
        try:
            try:
                if self.guard is not None:  # a bound from the predicted TTFT; leave time for other pools
                    wait_s = self.guard.first_byte_s(call, pool, wait_s, last=not may_refuse)
                async with asyncio.timeout(wait_s) as timer:
                    if self.guard is not None:  # the pool marked down meanwhile: give up at once
                        watch = self.guard.watch(pool, timer)
                    headers = {**call.headers, MAY_REFUSE_HEADER: "1"} if may_refuse else call.headers
                    try:
                        resp = await self.up.client.request("POST", ep.url + call.path, call.body, headers,
                                                            max_wait_s=self.connection_wait_s)
                    except ConnectionWaitTimeout as e:
                        self.m.pool(ep.pool_id).connection_wait("timed_out")
                        pool.connection_waited(self.connection_wait_s)
                        raise _Retry(str(e), busy=True) from e
                    if resp.waited_s > 0:
                        self.m.pool(ep.pool_id).connection_wait("waited")
                    pool.connection_waited(resp.waited_s)
                    pool.load_from_header(resp.headers)
                    if resp.status >= 500 or resp.status == 429:
                        raise _Retry(f"status {resp.status}", busy=resp.status in (429, 503))
                    if call.stream and resp.status < 400:
                        first = await resp.readany()
                        if not first:
                            raise _Retry("closed before the first token")
                        if self.on_first_byte is not None:
                            self.on_first_byte(call, ep, time.monotonic() - sent_at)
                        return resp, first
                    # A whole answer (or an error body) may take the rest of the deadline to arrive;
                    # nothing has reached the client yet, so a failure here is still retried.
                    timer.reschedule(_loop_time(call.deadline))
                    return resp, await resp.read()
            except (UpstreamError, TimeoutError, ConnectionError) as e:
                if isinstance(e, TimeoutError):
                    raise _Retry(watch.reason if watch is not None and watch.reason else
                                 f"no first byte within {wait_s:.3g} s") from None
                raise _Retry(str(e) or type(e).__name__) from None
        except BaseException as e:
            pool.done()
            if resp is not None:
                resp.close()
            if isinstance(e, _Retry):
                if not e.busy:
                    pool.record_failure()
                self.m.pool(ep.pool_id).attempt("busy" if e.busy else "error")
            raise
        finally:
            if watch is not None:
                watch.stop()


class DownWatch(Protocol):
    reason: str | None  # why it fired (the pool was marked down); None while it has not

    def stop(self) -> None: ...


class AttemptGuard(Protocol):
    """How long an attempt may wait for its first byte, and the pool-down watch (edge/resume.Guard)."""

    def first_byte_s(self, call: Call, pool: Pool, wait_s: float, last: bool) -> float: ...

    def watch(self, pool: Pool, timer: asyncio.Timeout) -> DownWatch: ...


def _loop_time(deadline_monotonic: float) -> float:
    """asyncio.timeout_at wants the loop's clock; convert from time.monotonic()."""
    return asyncio.get_running_loop().time() + (deadline_monotonic - time.monotonic())
