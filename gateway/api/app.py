"""The edge gateway's HTTP front: OpenAI routes, health, metrics, the operator page, over the
gateway's own HTTP/1.1 server (gateway/api/h1.py; httptools on uvloop).

GatewayServer is an edge Gateway (gateway/edge/gateway.py: the pipeline both fronts share) that
also serves HTTP; the gRPC front takes the same Gateway.
"""
from __future__ import annotations

import logging
import time

import orjson
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.api.h1 import HttpServer, Request, Response, Router, Stream, json_response
from gateway.api.operator import OperatorView
from gateway.config import Config
from gateway.core.errors import BadRequest, InternalError, NotFound
from gateway.core.protocol import GenerationRequest, parse_chat, parse_completion
from gateway.core.tls import ServerTls
from gateway.core import envelope
from gateway.edge.forward import StreamBroken, Upstream
from gateway.edge.gateway import Gateway, SharedState
from gateway.edge.resume import ResumableStream, ask_for_token_ids
from gateway.edge.whole import Assembler, as_stream

__all__ = ["GatewayServer", "SharedState"]

log = logging.getLogger("meshgate.gateway")


class GatewayServer(Gateway):
    def __init__(self, cfg: Config, shared: SharedState | None = None, worker_index: int = 0):
        super().__init__(cfg, shared, worker_index)
        self.operator = OperatorView(self.cfg.site, cfg.sites, self.admission, self.upstreams,
                                     self.forwarder.profile, self.decisions, lambda: self.in_flight,
                                     self.metering.window)
        if not self.cfg.access_log:
            logging.getLogger("meshgate.access").setLevel(logging.WARNING)
        self.http: HttpServer | None = None
        # Client-facing TLS (gateway.tls): made here so bad files fail the start, in every process
        self.tls = ServerTls(self.cfg.tls.files(("http/1.1",))) if self.cfg.tls.enabled else None
        self._meshgate_only: dict[str, bool] = {}  # model -> only meshgate pools serve it (whole answers resumed)
        self.upstreams.on_change.append(lambda joined: self._meshgate_only.clear())

    def make_server(self) -> HttpServer:
        """The HTTP front (gateway/api/h1.py); start() it, and call shutdown() then stop() at the end."""
        r = Router()
        r.add("POST", "/v1/chat/completions", self.chat)
        r.add("POST", "/v1/completions", self.completions)
        r.add("POST", "/v1/responses", self.responses)
        r.add("POST", "/v1/embeddings", self.embeddings)
        r.add("GET", "/v1/models", self.models)
        r.add("GET", "/v1/models/", self.model, prefix=True)
        r.add("GET", "/health", self.health)
        r.add("GET", "/ready", self.ready)
        r.add("GET", "/metrics", self.prometheus)
        r.add("GET", "/v1/meshgate/gateways", self.gateways)
        self.operator.add_routes(r)  # /v1/meshgate/mesh, .../decisions/stream, .../usage, /dashboard
        self.http = HttpServer(r, self.cfg.limits.max_body_bytes, on_response=self._count)
        return self.http

    async def bind(self, host: str, port: int) -> None:
        """Start, then accept HTTP on host:port (OSError when it is taken); with several gateway
        processes, each binds it with SO_REUSEPORT and the kernel spreads connections over them."""
        await self.start()
        http = self.make_server()
        try:
            await http.start(host, port, reuse_port=self.cfg.workers > 1,
                             tls=self.tls.context if self.tls else None,
                             tls_handshake_timeout_s=self.cfg.tls.handshake_timeout_s)
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
        if (denied := self.operator.deny(request)) is not None:  # who runs where: for the operator (admin keys)
            return denied
        return json_response({"object": "list", "data": self.gateway_list()})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    def _card(self, model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": self.created, "owned_by": "meshgate"}

    async def models(self, request: Request) -> Response:
        who = self.admission.authenticate(request.headers, request.remote)
        return json_response({"object": "list", "data": [
            self._card(m) for m in self.upstreams.models() if who is None or who.may_use(m)]})

    async def model(self, request: Request) -> Response:
        name = request.path.removeprefix("/v1/models/")
        if name not in self.upstreams.models() or not self.admission.may_use(
                self.admission.authenticate(request.headers, request.remote), name):
            raise NotFound(f"The model '{name}' does not exist", param="model", code="model_not_found")
        return json_response(self._card(name))

    # -- generation -------------------------------------------------------------------------
    # The gateway reads only what it routes, limits and meters by (core/envelope.py) and forwards
    # the body as it came: the pool judges the rest, and its 400 reaches the client unchanged.
    async def chat(self, request: Request) -> Response | Stream:
        return await self._generate(request, envelope.CHAT)

    async def completions(self, request: Request) -> Response | Stream:
        return await self._generate(request, envelope.COMPLETIONS)

    async def responses(self, request: Request) -> Response | Stream:
        return await self._generate(request, envelope.RESPONSES)

    async def embeddings(self, request: Request) -> Response | Stream:
        return await self._generate(request, envelope.EMBEDDINGS)

    async def _generate(self, request: Request, path: str) -> Response | Stream:
        arrival = time.monotonic()
        # Before parsing: a caller without a key learns nothing, not even whether its body is valid.
        principal = self.admission.authenticate(request.headers, request.remote)
        try:
            parsed = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            raise BadRequest("We could not parse the JSON body of your request. Send valid JSON.") from None
        call = self.prepare(path, request.body, envelope.read(path, parsed), request.headers, arrival, principal,
                            request.remote)
        request.request_id = call.request_id
        resilience = self.cfg.resilience
        # Continuation reads chat and completion chunks (the Responses API's typed events it does not)
        resumable = resilience.resume and path in (envelope.CHAT, envelope.COMPLETIONS)
        # A whole answer from meshgate pools is asked for as a stream, so it can be continued too
        whole = resumable and not call.stream and resilience.resume_whole and self._only_meshgate(call.route.model)
        if whole:
            as_stream(call)
        elif resumable and call.stream:
            ask_for_token_ids(call)
        # A whole answer is not hedged (hedging races first tokens of streams), as before
        up = await (self.forwarder.open(call) if whole else self.hedger.open(call, request.headers))
        request.pool, request.route = up.pool_id, up.route  # the first pool (its headers go out first)
        if resumable and call.stream and up.status < 400:
            stream = ResumableStream(self.forwarder, self.guard, resilience, up)
            try:
                if whole:
                    return await _assemble(stream, path == envelope.CHAT)
                return await _relay_resumable(request, stream)
            finally:
                stream.close()
        try:
            return await _relay(request, up)
        finally:
            up.close()


    def _only_meshgate(self, model: str) -> bool:
        """Whether every pool that serves model is a meshgate pool (cached until the pool set changes)."""
        only = self._meshgate_only.get(model)
        if only is None:
            kinds = {p.endpoint.kind for p in self.upstreams.pools.values() if model in p.endpoint.models}
            only = self._meshgate_only[model] = kinds == {"meshgate"}
        return only


async def _assemble(stream: ResumableStream, chat: bool) -> Response:
    """A whole answer asked of the pool as a stream (edge/whole.py), continued if cut, answered whole."""
    sink = Assembler(chat)
    await stream.relay(sink)
    answer, error = sink.body()
    if error is not None:
        return Response(orjson.dumps(error), 502)
    return Response(orjson.dumps(answer), 200)


async def _relay_resumable(request: Request, stream: ResumableStream) -> Stream:
    """A stream that goes on on another pool when its pool fails or stalls (edge/resume.py)."""
    out = request.start_stream(headers={"cache-control": "no-cache"})
    await stream.relay(out)  # pushed from the pool connection's callback, as _relay's
    await out.end()
    return out


async def _relay(request: Request, up: Upstream) -> Response | Stream:
    """Hand the pool's answer to the client as it comes: whole, or as an SSE stream."""
    if not up.call.stream or up.status >= 400:
        return Response(up.first, up.status)
    out = request.start_stream(headers={"cache-control": "no-cache"})
    try:
        await up.relay(out)  # up.chunks() pushed to out, without a task wake-up per token
    except StreamBroken as e:
        err = InternalError(str(e))
        err.type = "upstream_error"
        await out.write(b"data: " + orjson.dumps(err.body()) + b"\n\ndata: [DONE]\n\n")
    await out.end()
    return out
