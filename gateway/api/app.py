"""The edge gateway's HTTP front: OpenAI routes, limits, health, metrics (aiohttp on uvloop).

GatewayServer.prepare is shared with the gRPC front: it authenticates, checks limits, admits the
request against its key's rate limits and attaches the metering hook that Call.finish runs.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import orjson
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.api.auth import (
    PRIORITIES,
    PRIORITY_HEADER,
    Admission,
    Principal,
    limit_table,
)
from gateway.api.decisions import DecisionLog
from gateway.api.forward import Call, Forwarder, StreamBroken, Upstream
from gateway.api.h1 import HttpServer, Request, Response, Router, Stream, json_response
from gateway.api.metering import Metering, estimate_prompt_tokens
from gateway.api.metrics import GatewayMetrics
from gateway.api.operator import OperatorView
from gateway.api.tracing import Tracing
from gateway.config import Config, ConfigError
from gateway.core.errors import (
    BadRequest,
    InternalError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
)
from gateway.core.protocol import GenerationRequest, parse_chat, parse_completion
from gateway.core.shared import SharedTable
from gateway.core.types import RouteRequest
from gateway.pools.load import GATEWAY, InFlight, load_table
from gateway.pools.load_stream import LoadStreams
from gateway.pools.upstream import Upstreams
from gateway.routing.geo_view import GeoView
from gateway.routing.plugins import build_profile

log = logging.getLogger("meshgate.gateway")

DEADLINE_HEADER = "x-meshgate-deadline-ms"
ROUTE_HEADER = "x-meshgate-route"  # the routing decision, explained
POOL_HEADER = "x-meshgate-pool"  # the pool that answered (not the first choice after a failover)
RESIDENCY_HEADER = "x-meshgate-residency"
SLO_HEADER = "x-meshgate-ttft-slo-ms"
PREFIX_CHARS = 256
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class SharedState:
    """What forked gateway processes share (make it before forking): per-key limits, and the
    requests in flight per pool and in the gateway."""

    num_workers: int
    limits: SharedTable
    load: SharedTable

    @classmethod
    def make(cls, cfg: Config, num_workers: int) -> SharedState:
        return cls(num_workers, limit_table(cfg.gateway.auth, num_workers),
                   load_table(num_workers, capacity=max(8192, 4 * len(cfg.pools))))


class GatewayServer:
    def __init__(self, cfg: Config, shared: SharedState | None = None, worker_index: int = 0):
        """shared, worker_index: one of several forked gateway processes (`meshgate serve --workers`)."""
        self.cfg = cfg.gateway
        shared = shared or SharedState.make(cfg, 1)
        self.worker_index = worker_index
        self.upstreams = Upstreams(cfg.pools, self.cfg.upstream, self.cfg.probe, shared.load, worker_index)
        self.requests = InFlight(shared.load, GATEWAY, worker_index)  # client requests, all processes
        self.metrics = GatewayMetrics(self.upstreams, lambda: self.in_flight,
                                      lambda pool_id: self.upstreams.pools[pool_id].requests.count)
        try:
            profile = build_profile(self.cfg.routing, self.cfg.routing_options)
            self.geo = GeoView(cfg)
        except ValueError as e:
            raise ConfigError(f"gateway.routing: {e}") from None
        self.geo.attach(self.upstreams.endpoints)
        self.upstreams.probe_targets = self.geo.probe_targets
        self.upstreams.on_change.append(self.geo.attach)  # pools that join get their geography too
        # Network coordinates learn from every probe sample; estimates for pools not measured are
        # refreshed after each round, before the Forwarder's candidate order (appended below) is.
        self.upstreams.on_rtt.append(self.geo.on_rtt)
        self.upstreams.on_probed.append(lambda: self.geo.refresh(self.upstreams.endpoints))
        self.forwarder = Forwarder(self.upstreams, profile, self.metrics,
                                   self.cfg.upstream.max_attempts, self.cfg.upstream.first_byte_timeout_s)
        # Pushed load from the pools the decisions depend on most: asked for after each round, once
        # the candidate order (refreshed by the Forwarder's callback, above) is current
        self.load_streams = LoadStreams(self.upstreams, self.cfg.load_stream)
        self.upstreams.on_probed.append(
            lambda: self.load_streams.want(self.forwarder.candidates.wanted(self.cfg.probe.k_nearest)))
        self.admission = Admission(self.cfg.auth, self.cfg.limits, self.metrics, shared=shared.limits,
                                   worker_index=worker_index)
        self.metering = Metering(self.cfg.usage_log, self.metrics, worker_index)
        self.tracing = Tracing(self.cfg.tracing)
        self.decisions = DecisionLog()  # recent routing decisions, for the operator's view
        self.operator = OperatorView(self, cfg.sites)
        # GET /v1/meshgate/gateways: just this one; with discovery etcd, gateway/discovery.py puts the registry's list here
        self._site = next((dataclasses.asdict(s) for s in cfg.sites if s.id == self.cfg.site), {"id": self.cfg.site})
        self.gateway_list: Callable[[], list[dict[str, object]]] = lambda: [
            {"id": self.cfg.site, "url": f"http://{self.cfg.host}:{self.cfg.port}", "site": self._site}]
        if not self.cfg.access_log:
            logging.getLogger("meshgate.access").setLevel(logging.WARNING)
        self.created = int(time.time())
        # Request ids: a random per-process prefix and a counter (uuid4 costs a getrandom call).
        prefix = uuid.uuid4().hex[:16]
        self._ids = (f"{prefix}{i:016x}" for i in itertools.count())
        # Lifecycle hooks (discovery adds its own): after start, on shutdown before the drain, after it.
        self.on_start: list[Callable[[], Awaitable[None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = [self.decisions.close]
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        self.http: HttpServer | None = None
        if not self.cfg.auth.enabled and not _is_loopback(self.cfg.host):
            log.warning("gateway.auth is off while listening on %s: anyone who reaches it may use it", self.cfg.host)

    def make_server(self) -> HttpServer:
        """The HTTP front (gateway/api/h1.py); start() it, and call shutdown() then stop() at the end."""
        r = Router()
        r.add("POST", "/v1/chat/completions", self.chat)
        r.add("POST", "/v1/completions", self.completions)
        r.add("GET", "/v1/models", self.models)
        r.add("GET", "/v1/models/", self.model, prefix=True)
        r.add("GET", "/health", self.health)
        r.add("GET", "/ready", self.ready)
        r.add("GET", "/metrics", self.prometheus)
        r.add("GET", "/v1/meshgate/gateways", self.gateways)
        self.operator.add_routes(r)  # /v1/meshgate/mesh, /v1/meshgate/decisions/stream, /dashboard
        self.http = HttpServer(r, self.cfg.limits.max_body_bytes, on_response=self._count)
        return self.http

    async def bind(self, host: str, port: int) -> None:
        """Start, then accept HTTP on host:port (OSError when it is taken); with several gateway
        processes, each binds it with SO_REUSEPORT and the kernel spreads connections over them."""
        await self.start()
        http = self.make_server()
        try:
            await http.start(host, port, reuse_port=self.cfg.workers > 1)
        except OSError:
            await self.stop()
            raise

    async def close(self) -> None:
        """Stop accepting, run the shutdown hooks, drain in-flight requests (up to
        gateway.drain_timeout_s), then stop."""
        if self.http is not None:
            self.http.stop_accepting()
        await self.shutdown()  # leave the registry, end the decision feeds, drain gRPC calls
        if self.http is not None:
            await self.http.shutdown(self.cfg.drain_timeout_s)
        await self.stop()

    async def start(self) -> None:
        """Before serving: the usage log, then the upstreams (and first probes), then any hooks."""
        await self.metering.start()  # first: a usage log it cannot open stops the start before probes run
        await self.upstreams.start()
        for hook in self.on_start:
            await hook()

    async def shutdown(self) -> None:
        """Stopping, before in-flight requests are drained: hooks (leave the registry, end feeds)."""
        for hook in self.on_shutdown:
            await hook()

    async def stop(self) -> None:
        """After the drain."""
        for hook in self.on_stop:
            await hook()
        await self.load_streams.close()
        await self.upstreams.close()
        await self.metering.close()  # last: requests ended by the shutdown are logged too
        self.tracing.shutdown()

    def _count(self, request: Request, status: int) -> None:
        assert self.http is not None
        self.metrics.request(self.http.router.label(request.path), status, request.pool or "").inc()

    # -- plain endpoints --------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if self.upstreams.any_available():
            return json_response({"status": "ready"})
        return json_response({"status": "no healthy pool"}, 503)

    async def gateways(self, request: Request) -> Response:
        self.admission.authenticate(request.headers)  # who runs where is for callers with a key
        return json_response({"object": "list", "data": self.gateway_list()})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    def _card(self, model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": self.created, "owned_by": "meshgate"}

    async def models(self, request: Request) -> Response:
        who = self.admission.authenticate(request.headers)
        return json_response({"object": "list", "data": [
            self._card(m) for m in self.upstreams.models() if who is None or who.may_use(m)]})

    async def model(self, request: Request) -> Response:
        name = request.path.removeprefix("/v1/models/")
        if name not in self.upstreams.models() or not self.admission.may_use(
                self.admission.authenticate(request.headers), name):
            raise NotFound(f"The model '{name}' does not exist", param="model", code="model_not_found")
        return json_response(self._card(name))

    # -- generation -------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response | Stream:
        return await self._generate(request, "/v1/chat/completions", parse_chat)

    async def completions(self, request: Request) -> Response | Stream:
        return await self._generate(request, "/v1/completions", parse_completion)

    async def _generate(self, request: Request, path: str, parse) -> Response | Stream:  # type: ignore[no-untyped-def]
        arrival = time.monotonic()
        # Before parsing: a caller without a key learns nothing, not even whether its body is valid.
        principal = self.admission.authenticate(request.headers)
        try:
            parsed = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            raise BadRequest("We could not parse the JSON body of your request. Send valid JSON.") from None
        call = self.prepare(path, request.body, parse(parsed), request.headers, arrival, principal, request.remote)
        request.request_id = call.request_id
        up = await self.forwarder.open(call)
        try:
            request.pool = up.pool_id
            request.route = up.route
            return await _relay(request, up)
        finally:
            up.close()

    @property
    def in_flight(self) -> int:
        """Client requests in progress, over both fronts and every gateway process."""
        return self.requests.count

    def _ended(self, call: Call, up: Upstream | None, status: int) -> None:
        self.requests.end()
        self.decisions.record(call, up, status)

    def prepare(self, path: str, body: bytes, g: GenerationRequest, headers: Mapping[str, str],
                arrival: float, principal: Principal | None = None, client_ip: str | None = None) -> Call:
        """Check a parsed request against this gateway's limits and its caller's key, admit it, and
        build its Call (both fronts). principal: when the front authenticated already; else the
        Authorization header in `headers` is checked here. The Call must end in Call.finish (which
        Forwarder.open and Upstream.close do)."""
        if principal is None:
            principal = self.admission.authenticate(headers)
        limits = self.cfg.limits
        if g.max_tokens is not None and g.max_tokens > limits.max_tokens:
            raise BadRequest(f"'max_tokens' is at most {limits.max_tokens} here", param="max_tokens")
        prompt_chars = len(g.prompt or "") + sum(len(m["content"]) for m in g.messages or ())
        if prompt_chars > limits.max_prompt_chars:
            raise PayloadTooLarge(f"the prompt is longer than {limits.max_prompt_chars} characters",
                                  param="messages" if g.messages else "prompt")
        # A model the key may not use looks like one that does not exist (as OpenAI answers).
        if g.model not in self.upstreams.models() or not self.admission.may_use(principal, g.model):
            raise NotFound(f"The model '{g.model}' does not exist", param="model", code="model_not_found")
        if self.in_flight >= limits.max_in_flight:
            raise Overloaded("the gateway is at its in-flight limit; retry later", retry_after_s=1)
        deadline = arrival + self._deadline_s(headers)
        client_rid = headers.get("x-request-id", "")
        rid = client_rid if _REQUEST_ID.match(client_rid) else next(self._ids)
        # Last of the checks: admission takes from the key's buckets, which only Call.finish gives back.
        # Without max_tokens a request may run to the model's context; the gateway's cap stands in for it.
        prompt_est = estimate_prompt_tokens(g, prompt_chars)
        ticket = self.admission.admit(principal, headers, self.in_flight,
                                      prompt_est + (g.max_tokens or limits.max_tokens))
        up_headers = {"Content-Type": "application/json", "x-request-id": rid}
        if ticket.priority is not None:
            up_headers[PRIORITY_HEADER] = ticket.priority  # the key's class, whatever the client sent
        up_body, meter = self.metering.track(ticket, g, body, rid, prompt_est)
        route = RouteRequest(model=g.model, prompt_chars=prompt_chars, max_tokens=g.max_tokens,
                             priority=PRIORITIES.get(ticket.priority or "", 0),
                             client_rtt_ms=self.geo.client_rtt_ms(loc := self.geo.client(headers, client_ip)),
                             countries=_countries(headers, principal), ttft_slo_s=_slo_s(headers),
                             prefix_key=_prefix_key(g))
        span = self.tracing.start(f"POST {path}", headers, up_headers)
        call = Call(path=path, body=up_body, stream=g.stream, route=route, headers=up_headers, request_id=rid,
                    arrival=arrival, deadline=deadline, principal=principal, priority=ticket.priority, meter=meter,
                    span=span, client=loc, on_finish=self._ended)
        self.requests.start()  # counted from here until Call.finish (both fronts end every Call there)
        return call

    def _deadline_s(self, headers: Mapping[str, str]) -> float:
        ms = _ms_header(headers, DEADLINE_HEADER)
        return self.cfg.limits.deadline_s if ms is None else min(self.cfg.limits.deadline_s, ms / 1000)


def _ms_header(headers: Mapping[str, str], name: str) -> float | None:
    """A positive number of milliseconds from a header, or None when absent (400 when bad)."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be a number of milliseconds") from None
    if not ms > 0:  # also refuses NaN
        raise BadRequest(f"'{name}' must be positive")
    return ms


def _countries(headers: Mapping[str, str], principal: Principal | None) -> frozenset[str] | None:
    """Residency: the countries the request (x-meshgate-residency: DE,FR) and its key allow."""
    allowed = frozenset(principal.countries) if principal is not None and principal.countries else None
    value = headers.get(RESIDENCY_HEADER)
    if value:
        asked = frozenset(c.strip().upper() for c in value.split(",") if c.strip())
        allowed = asked if allowed is None else allowed & asked
    return allowed


def _slo_s(headers: Mapping[str, str]) -> float | None:
    ms = _ms_header(headers, SLO_HEADER)
    return None if ms is None else ms / 1000


def _prefix_key(g: GenerationRequest) -> str:
    """The start of the prompt (a system prompt, usually) for prefix affinity."""
    if g.messages:
        return g.messages[0]["content"][:PREFIX_CHARS]
    return (g.prompt or "")[:PREFIX_CHARS]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _relay(request: Request, up: Upstream) -> Response | Stream:
    """Hand the pool's answer to the client as it comes: whole, or as an SSE stream."""
    if not up.call.stream or up.status >= 400:
        return Response(up.first, up.status)
    out = request.start_stream(headers={"cache-control": "no-cache"})
    try:
        async for chunk in up.chunks():
            await out.write(chunk)
    except StreamBroken as e:
        err = InternalError(str(e))
        err.type = "upstream_error"
        await out.write(b"data: " + orjson.dumps(err.body()) + b"\n\ndata: [DONE]\n\n")
    await out.end()
    return out
