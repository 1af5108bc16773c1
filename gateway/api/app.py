"""The edge gateway's HTTP front: OpenAI routes, limits, health, metrics (aiohttp on uvloop)."""
from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping

import orjson

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.api.forward import Call, Forwarder, StreamBroken, Upstream
from gateway.api.metrics import GatewayMetrics
from gateway.config import Config
from gateway.core.errors import BadRequest, InternalError, NotFound, Overloaded, PayloadTooLarge
from gateway.core.http import error_middleware, json_response, read_json
from gateway.core.protocol import GenerationRequest, parse_chat, parse_completion
from gateway.core.types import RouteRequest
from gateway.pools.upstream import Upstreams
from gateway.routing.plugins import build_profile

log = logging.getLogger("meshgate.gateway")

DEADLINE_HEADER = "x-meshgate-deadline-ms"
PRIORITY_HEADER = "x-meshgate-priority"
ROUTE_HEADER = "x-meshgate-route"
# What the gateway learns of a request as it goes, for headers, logs and metrics.
REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", str)
POOL = web.RequestKey("pool", str)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class GatewayServer:
    def __init__(self, cfg: Config):
        self.cfg = cfg.gateway
        self.upstreams = Upstreams(cfg.pools, self.cfg.upstream, self.cfg.probe)
        self.in_flight = 0
        self.metrics = GatewayMetrics(self.upstreams, lambda: self.in_flight)
        self.forwarder = Forwarder(self.upstreams, build_profile(self.cfg.routing), self.metrics,
                                   self.cfg.upstream.max_attempts, self.cfg.upstream.first_byte_timeout_s)
        self.created = int(time.time())

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.limits.max_body_bytes,
                              middlewares=[error_middleware(self._count)])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.prometheus)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        app.on_response_prepare.append(self._add_headers)
        return app

    async def _start(self, app: web.Application) -> None:
        await self.upstreams.start()

    async def _stop(self, app: web.Application) -> None:
        await self.upstreams.close()

    def _count(self, request: web.Request, status: int) -> None:
        self.metrics.requests.labels(request.path, str(status), request.get(POOL, "")).inc()

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if REQUEST_ID in request:
            response.headers["x-request-id"] = request[REQUEST_ID]
        if ROUTE in request:
            response.headers[ROUTE_HEADER] = request[ROUTE]

    # -- plain endpoints --------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if self.upstreams.any_available():
            return json_response({"status": "ready"})
        return json_response({"status": "no healthy pool"}, 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _card(self, model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": self.created, "owned_by": "meshgate"}

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._card(m) for m in self.upstreams.models()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.upstreams.models():
            raise NotFound(f"The model '{name}' does not exist", param="model", code="model_not_found")
        return json_response(self._card(name))

    # -- generation -------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/chat/completions", parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/completions", parse_completion)

    async def _generate(self, request: web.Request, path: str, parse) -> web.StreamResponse:  # type: ignore[no-untyped-def]
        arrival = time.monotonic()
        body = await request.read()
        call = self.prepare(path, body, parse(await read_json(request)), request.headers, arrival)
        request[REQUEST_ID] = call.request_id
        self.in_flight += 1
        try:
            up = await self.forwarder.open(call)
            try:
                request[POOL] = up.pool_id
                request[ROUTE] = up.route
                return await _relay(request, up)
            finally:
                up.close()
        finally:
            self.in_flight -= 1

    def prepare(self, path: str, body: bytes, g: GenerationRequest, headers: Mapping[str, str],
                arrival: float) -> Call:
        """Check a parsed request against this gateway's limits and build its Call (both fronts)."""
        limits = self.cfg.limits
        if g.max_tokens is not None and g.max_tokens > limits.max_tokens:
            raise BadRequest(f"'max_tokens' is at most {limits.max_tokens} here", param="max_tokens")
        prompt_chars = len(g.prompt or "") + sum(len(m["content"]) for m in g.messages or ())
        if prompt_chars > limits.max_prompt_chars:
            raise PayloadTooLarge(f"the prompt is longer than {limits.max_prompt_chars} characters",
                                  param="messages" if g.messages else "prompt")
        if g.model not in self.upstreams.models():
            raise NotFound(f"The model '{g.model}' does not exist", param="model", code="model_not_found")
        if self.in_flight >= limits.max_in_flight:
            raise Overloaded("the gateway is at its in-flight limit; retry later", retry_after_s=1)
        client_rid = headers.get("x-request-id", "")
        rid = client_rid if _REQUEST_ID.match(client_rid) else uuid.uuid4().hex
        up_headers = {"Content-Type": "application/json", "x-request-id": rid}
        if PRIORITY_HEADER in headers:
            up_headers[PRIORITY_HEADER] = headers[PRIORITY_HEADER]
        return Call(path=path, body=body, stream=g.stream,
                    route=RouteRequest(model=g.model, prompt_chars=prompt_chars, max_tokens=g.max_tokens),
                    headers=up_headers, request_id=rid, arrival=arrival,
                    deadline=arrival + self._deadline_s(headers))

    def _deadline_s(self, headers: Mapping[str, str]) -> float:
        deadline = self.cfg.limits.deadline_s
        value = headers.get(DEADLINE_HEADER)
        if value is not None:
            try:
                ms = float(value)
            except ValueError:
                raise BadRequest(f"'{DEADLINE_HEADER}' must be a number of milliseconds") from None
            if not ms > 0:
                raise BadRequest(f"'{DEADLINE_HEADER}' must be positive")
            deadline = min(deadline, ms / 1000)
        return deadline


async def _relay(request: web.Request, up: Upstream) -> web.StreamResponse:
    """Hand the pool's answer to the client as it comes: whole, or as an SSE stream."""
    if not up.call.stream or up.status >= 400:
        return web.Response(body=up.first, status=up.status, content_type="application/json")
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    try:
        async for chunk in up.chunks():
            await out.write(chunk)
    except StreamBroken as e:
        err = InternalError(str(e))
        err.type = "upstream_error"
        await out.write(b"data: " + orjson.dumps(err.body()) + b"\n\ndata: [DONE]\n\n")
    await out.write_eof()
    return out
