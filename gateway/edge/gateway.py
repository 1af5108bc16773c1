"""The edge gateway process, without its fronts: the pipeline both fronts share, wired together.

`Gateway` owns the upstreams (probes, load streams), routing, admission, metering, tracing and the
decision log, and turns a parsed request into a `Call` (`prepare`) that `forwarder.open` routes.
The HTTP front (gateway/api/app.py) and the gRPC front (gateway/rpc/server.py) each take a
Gateway; neither knows the other.
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

from gateway.config import Config, ConfigError
from gateway.core.errors import BadRequest, NotFound, Overloaded, PayloadTooLarge
from gateway.core.protocol import GenerationRequest
from gateway.core.tls import CertExpiryCollector
from gateway.core.types import RouteRequest
from gateway.core.wire import DEADLINE_HEADER, PRIORITIES, PRIORITY_HEADER, RESIDENCY_HEADER, SLO_HEADER
from gateway.edge.admission import Admission, Principal, limit_table
from gateway.edge.capability_check import check_servable
from gateway.edge.decisions import DecisionLog
from gateway.edge.discovery import attach_gateway
from gateway.edge.hedge import FirstByteFeed, Hedger
from gateway.edge.resume import Guard
from gateway.edge.forward import Call, Forwarder
from gateway.edge.metering import Metering, estimate_prompt_tokens
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.prefix_routing import PrefixRouting
from gateway.edge.tracing import Tracing
from gateway.edge.usage_window import UsageWindow
from gateway.pools.load import GATEWAY, InFlight, load_table
from gateway.pools.load_stream import LoadStreams
from gateway.pools.shared import SharedTable
from gateway.pools.upstream import Upstreams
from gateway.registry import RegistryView
from gateway.routing.geo_view import GeoView
from gateway.routing.lateness import Lateness
from gateway.routing.plugins import build_profile
from gateway.routing.prefix_index import PrefixIndex

log = logging.getLogger("meshgate.gateway")

PREFIX_CHARS = 256
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
Hook = Callable[[], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class SharedState:
    """What forked gateway processes share (make it before forking): per-key limits, the requests
    in flight per pool and in the gateway, and recent usage (GET /v1/meshgate/usage)."""

    num_workers: int
    limits: SharedTable
    load: SharedTable
    usage: UsageWindow

    @classmethod
    def make(cls, cfg: Config, num_workers: int) -> SharedState:
        return cls(num_workers, limit_table(cfg.gateway.auth, num_workers),
                   load_table(num_workers, capacity=max(8192, 4 * len(cfg.pools))),
                   UsageWindow(processes=num_workers))


@dataclasses.dataclass
class Lifecycle:
    """Hooks others add (discovery, the gRPC front): after start, on shutdown before the drain,
    after the drain."""

    on_start: list[Hook] = dataclasses.field(default_factory=list)
    on_shutdown: list[Hook] = dataclasses.field(default_factory=list)
    on_stop: list[Hook] = dataclasses.field(default_factory=list)


class Gateway:
    def __init__(self, cfg: Config, shared: SharedState | None = None, worker_index: int = 0):
        """shared, worker_index: one of several forked gateway processes (`meshgate serve --workers`)."""
        self.cfg = cfg.gateway
        shared = shared or SharedState.make(cfg, 1)
        self.worker_index = worker_index
        self.upstreams = Upstreams(cfg.pools, self.cfg.upstream, self.cfg.probe, shared.load, worker_index)
        self.requests = InFlight(shared.load, GATEWAY, worker_index)  # client requests, all processes
        self.metrics = GatewayMetrics(self.upstreams, lambda: self.in_flight,
                                      lambda pool_id: self.upstreams.pools[pool_id].requests.count)
        # TLS certificates this gateway serves (gateway.tls) and presents to pools (gateway.upstream.tls)
        self.metrics.registry.register(CertExpiryCollector(
            {"gateway": self.cfg.tls.cert_file, "upstream_client": self.cfg.upstream.tls.cert_file}))
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
        self.forwarder = Forwarder(self.upstreams, profile, self.metrics, self.cfg.upstream.max_attempts,
                                   self.cfg.upstream.first_byte_timeout_s, self.cfg.routing_options)
        # Stall and pool-down detection before the first byte; continuation after it (edge/resume.py)
        self.guard = self.forwarder.guard = Guard(self.cfg.resilience, profile.predictor)
        # First bytes later than predicted, per pool, into the latency model (routing/lateness.py)
        opts = self.cfg.routing_options
        self.lateness = Lateness(opts.first_byte_alpha, opts.first_byte_half_life_s, opts.first_byte_feedback,
                                 slack_s=opts.first_byte_slack_s)
        feed = FirstByteFeed(self.lateness)
        self.forwarder.on_first_byte = feed.first_byte
        self.upstreams.on_probed.append(lambda: self.lateness.decay(self.upstreams.endpoints))
        self.hedger = Hedger(self.forwarder, self.cfg.resilience, self.metrics, feed)  # late first tokens (edge/hedge.py)
        # Pushed load from the pools the decisions depend on most: asked for after each round, once
        # the candidate order (refreshed by the Forwarder's callback, above) is current
        self.load_streams = LoadStreams(self.upstreams, self.cfg.load_stream)
        self.upstreams.on_probed.append(
            lambda: self.load_streams.want(self.forwarder.candidates.wanted(self.cfg.probe.k_nearest)))
        # What each pool's prefix cache holds, and sessions (gateway/edge/prefix_routing.py)
        self.prefix_routing = PrefixRouting(PrefixIndex(self.cfg.routing_options),
                                            self.cfg.routing_options.prefix_routing)
        self.prefix_routing.index.attach(self.upstreams.endpoints)
        self.upstreams.on_change.append(lambda joined: self.prefix_routing.index.attach(self.upstreams.endpoints))
        self.forwarder.on_routed = self.prefix_routing.routed
        self.admission = Admission(self.cfg.auth, self.cfg.limits, self.metrics, shared=shared.limits,
                                   worker_index=worker_index)
        self.metering = Metering(self.cfg.usage_log, self.metrics, shared.usage, worker_index)
        self.metering.on_usage = self.prefix_routing.usage
        self.tracing = Tracing(self.cfg.tracing)
        self.decisions = DecisionLog()  # recent routing decisions, for the operator's view
        # GET /v1/meshgate/gateways: just this one; with discovery etcd, edge/discovery.py puts the registry's list here
        site = next((dataclasses.asdict(s) for s in cfg.sites if s.id == self.cfg.site), {"id": self.cfg.site})
        self.gateway_list: Callable[[], list[dict[str, object]]] = lambda: [
            {"id": self.cfg.site, "url": f"{'https' if self.cfg.tls.enabled else 'http'}://{self.cfg.host}:{self.cfg.port}",
             "site": site}]
        self.created = int(time.time())
        # Request ids: a random per-process prefix and a counter (uuid4 costs a getrandom call).
        prefix = uuid.uuid4().hex[:16]
        self._ids = (f"{prefix}{i:016x}" for i in itertools.count())
        self.lifecycle = Lifecycle(on_shutdown=[self.decisions.close])
        if not self.cfg.auth.enabled and not _is_loopback(self.cfg.host):
            log.warning("gateway.auth is off while listening on %s: anyone who reaches it may use it", self.cfg.host)

    def follow_registry(self, cfg: Config, register: bool = True) -> RegistryView | None:
        """discovery etcd: pools from the registry, and this gateway registered in it (register:
        False for all but one of several processes of one gateway); static: nothing."""
        found = attach_gateway(cfg, self.geo, self.upstreams, self.lifecycle, self.metrics.registry, register)
        if found is None:
            return None
        self.gateway_list = found.gateway_list
        return found.view

    async def start(self) -> None:
        """Before serving: the usage log, then the upstreams (and first probes), then any hooks."""
        await self.metering.start()  # first: a usage log it cannot open stops the start before probes run
        await self.upstreams.start()
        for hook in self.lifecycle.on_start:
            await hook()

    async def shutdown(self) -> None:
        """Stopping, before in-flight requests are drained: hooks (leave the registry, end feeds)."""
        for hook in self.lifecycle.on_shutdown:
            await hook()

    async def stop(self) -> None:
        """After the drain."""
        for hook in self.lifecycle.on_stop:
            await hook()
        await self.load_streams.close()
        await self.upstreams.close()
        await self.metering.close()  # last: requests ended by the shutdown are logged too
        self.tracing.shutdown()

    @property
    def in_flight(self) -> int:
        """Client requests in progress, over both fronts and every gateway process."""
        return self.requests.count

    def _bookkeeping_failed(self, stage: str) -> None:
        self.metrics.child(self.metrics.bookkeeping_errors, stage).inc()

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
            raise BadRequest(f"'{g.max_tokens_param}' is at most {limits.max_tokens} here", param=g.max_tokens_param)
        prompt_chars = len(g.prompt or "") + sum(len(m["content"]) for m in g.messages or ())
        if prompt_chars > limits.max_prompt_chars:
            raise PayloadTooLarge(f"the prompt is longer than {limits.max_prompt_chars} characters",
                                  param="messages" if g.messages else "prompt")
        # A model the key may not use looks like one that does not exist (as OpenAI answers).
        if g.model not in self.upstreams.models() or not self.admission.may_use(principal, g.model):
            raise NotFound(f"The model '{g.model}' does not exist", param="model", code="model_not_found")
        check_servable(g, self.upstreams.capabilities_of(g.model))
        if self.in_flight >= limits.max_in_flight:
            raise Overloaded("the gateway is at its in-flight limit; retry later", retry_after_s=1)
        prefix_fields = self.prefix_routing.route_fields(g, headers)  # before admission: may refuse (400)
        deadline = arrival + self._deadline_s(headers)
        client_rid = headers.get("x-request-id", "")
        rid = client_rid if _REQUEST_ID.match(client_rid) else next(self._ids)
        # Last of the checks: admission takes from the key's buckets, which only Call.finish gives back.
        # Without max_tokens a request may run to the model's context; the gateway's cap stands in for it.
        prompt_est = estimate_prompt_tokens(g, prompt_chars)
        # Embeddings generate nothing; n choices generate up to n times max_tokens.
        output_est = 0 if g.kind == "embeddings" else g.n * (g.max_tokens or limits.max_tokens)
        ticket = self.admission.admit(principal, headers, self.in_flight, prompt_est + output_est)
        up_headers = {"Content-Type": "application/json", "x-request-id": rid}
        if ticket.priority is not None:
            up_headers[PRIORITY_HEADER] = ticket.priority  # the key's class, whatever the client sent
        up_body, meter = self.metering.track(ticket, g, body, rid, prompt_est)
        route = RouteRequest(model=g.model, max_tokens=g.max_tokens,
                             priority=PRIORITIES.get(ticket.priority or "", 0),
                             client_rtt_ms=self.geo.client_rtt_ms(loc := self.geo.client(headers, client_ip)),
                             countries=_countries(headers, principal), ttft_slo_s=_slo_s(headers),
                             prefix_key=_prefix_key(g), needs=g.needs, **{"prompt_chars": prompt_chars, **prefix_fields})
        span = self.tracing.start(f"POST {path}", headers, up_headers)
        call = Call(path=path, body=up_body, stream=g.stream, route=route, headers=up_headers, request_id=rid,
                    arrival=arrival, deadline=deadline, principal=principal, priority=ticket.priority, meter=meter,
                    span=span, client=loc, release=self.requests.end, on_finish=self.decisions.record,
                    on_error=self._bookkeeping_failed)
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
        content = g.messages[0].get("content")
        return content[:PREFIX_CHARS] if isinstance(content, str) else ""
    return (g.prompt or "")[:PREFIX_CHARS]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
