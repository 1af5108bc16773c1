"""The edge gateway's gRPC front (grpcio aio): meshgate.v1.Generation, grpc.health.v1, reflection.

It is a second way into the same gateway, not a second gateway: each call becomes the OpenAI
request it stands for, is validated by gateway.core.protocol and checked by the gateway's
`prepare` (API key, limits, model, request id, deadline, metering), then routed and failed over by
its `forwarder`, exactly as an HTTP request is. Metadata stands for HTTP headers. Only the framing differs: the pool's SSE events are re-framed as
messages and errors end the call with a status code.

It imports the shared pipeline (gateway/edge) and never the HTTP front (DESIGN.md §2); `meshgate
serve` hands it the edge Gateway that the HTTP front also serves.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
import orjson
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.core.errors import APIError, InternalError
from gateway.core import envelope
from gateway.core.protocol import parse_chat, parse_completion
from gateway.core.wire import REQUEST_ID_HEADER, ROUTE_HEADER
from gateway.edge.forward import Call, StreamBroken, Upstream
from gateway.edge.resume import ResumableStream, ask_for_token_ids
from gateway.edge.gateway import Gateway
from gateway.rpc import convert
from gateway.rpc import meshgate_pb2 as pb
from gateway.rpc import meshgate_pb2_grpc as pb_grpc
from gateway.rpc.tls import RpcTls

log = logging.getLogger("meshgate.rpc")

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # meshgate.v1.Generation
T = TypeVar("T")


@dataclass(slots=True)
class _Tally:
    """What one call came to, for the requests metric (HTTP statuses, so both fronts share labels)."""

    call: Call | None = None
    pool: str = ""
    status: int = 200


# -- the service ------------------------------------------------------------------------------
class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def relay(up: Upstream | ResumableStream, call: Call) -> pb.GenerateResponse:
            body = convert.load_json(up.first)
            if up.status >= 400:
                raise convert.pool_error(body, up.status)
            msg = convert.whole_response(body)
            msg.request_id, msg.pool_id = call.request_id, up.pool_id
            return msg

        return await self._handle("Generate", request, context, False, relay)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # A coroutine that writes, not an async generator: when the client cancels, the
        # cancellation lands in this task at once and the finally blocks close the upstream.
        async def relay(up: Upstream | ResumableStream, call: Call) -> None:
            if up.status >= 400:  # a JSON error, not a stream; up.first may be only its start
                raw = b"".join([chunk async for chunk in _pool_chunks(up)])
                raise convert.pool_error(convert.load_json(raw), up.status)
            reader = convert.EventReader()
            async with contextlib.aclosing(_pool_chunks(up)) as chunks:
                async for chunk in chunks:
                    for payload in reader.feed(chunk):
                        event = convert.load_json(payload)
                        if "error" in event:
                            raise convert.pool_error(event, None)
                        msg = convert.stream_response(event)
                        if msg is not None:
                            msg.request_id, msg.pool_id = call.request_id, up.pool_id
                            await context.write(msg)
            if not reader.done:
                raise convert.UpstreamError("the pool ended the stream early; the response is incomplete")

        await self._handle("GenerateStream", request, context, True, relay)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            who = self.gw.admission.authenticate(_headers(context), _peer_ip(context))
        except APIError as e:
            await _abort(context, e, False)
        # as GET /v1/models: a key limited to some models sees only those
        return pb.ListModelsResponse(models=[pb.Model(id=m, created=self.gw.created, owned_by="meshgate")
                                             for m in self.gw.upstreams.models() if who is None or who.may_use(m)])

    async def _handle(self, method: str, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                      stream: bool, relay: Callable[[Upstream | ResumableStream, Call], Awaitable[T]]) -> T:
        tally = _Tally()
        try:
            return await self._forward(request, context, stream, relay, tally)
        except asyncio.CancelledError:
            # the client went away (nginx's 499), or gRPC ended the call at its deadline
            tally.status = 504 if _past(tally.call) else 499
            raise
        except Exception as e:
            if not isinstance(e, APIError):
                log.exception("unhandled error in %s", method)
                e = InternalError("internal error; the request was not completed")
            tally.status = e.status
            await _abort(context, e, _past(tally.call))
        finally:
            self.gw.metrics.requests.labels(f"/{SERVICE}/{method}", str(tally.status), tally.pool).inc()

    async def _forward(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, stream: bool,
                       relay: Callable[[Upstream | ResumableStream, Call], Awaitable[T]], tally: _Tally) -> T:
        """The HTTP front's _generate, with gRPC's metadata and deadline."""
        arrival = time.monotonic()
        headers = _headers(context)
        # Before anything else, as over HTTP: a caller without a key learns nothing of its request.
        principal = self.gw.admission.authenticate(headers, _peer_ip(context))
        path, body = convert.request_body(request, stream)
        # The proto carries only fields OpenAI defines, so this front checks them all (as a pool
        # would); what routing and limits read comes from the gateway's own view, as over HTTP.
        (parse_chat if path == convert.CHAT_PATH else parse_completion)(body)
        call = tally.call = self.gw.prepare(path, orjson.dumps(body), envelope.read(path, body), headers, arrival,
                                            principal)
        remaining = context.time_remaining()
        if remaining is not None:  # the client's deadline bounds the request like x-meshgate-deadline-ms
            call.deadline = min(call.deadline, arrival + remaining)
        resilience = self.gw.cfg.resilience
        if stream and resilience.resume:
            ask_for_token_ids(call)
        opened = await self.gw.hedger.open(call, headers)
        up: Upstream | ResumableStream = opened
        if stream and opened.status < 400 and resilience.resume:  # goes on elsewhere if its pool fails
            up = ResumableStream(self.gw.forwarder, self.gw.guard, resilience, opened)
        try:
            tally.pool = up.pool_id
            await context.send_initial_metadata(((REQUEST_ID_HEADER, call.request_id), (ROUTE_HEADER, up.route)))
            return await relay(up, call)
        finally:
            up.close()  # an unfinished answer: drops the pool connection, so the pool aborts it


def _headers(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Request metadata as the HTTP front's headers: lowercase names (gRPC's already are), text values."""
    return {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _past(call: Call | None) -> bool:
    """Whether the request's deadline has passed: then whatever failed, the client hears so."""
    return call is not None and time.monotonic() >= call.deadline


async def _pool_chunks(up: Upstream | ResumableStream) -> AsyncGenerator[bytes, None]:
    """up.chunks(), with a stream the pool broke (the forwarder's StreamBroken) as an UpstreamError."""
    chunks = up.chunks()
    try:
        async for chunk in chunks:
            yield chunk
    except StreamBroken as e:
        raise convert.UpstreamError(str(e)) from None
    finally:
        if isinstance(chunks, AsyncGenerator):  # close it in this task, not later from the GC
            await chunks.aclose()


async def _abort(context: grpc.aio.ServicerContext, e: APIError, deadline_passed: bool) -> NoReturn:
    code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed else convert.grpc_code(e.status)
    trailers = [("x-meshgate-error-type", e.type), ("x-meshgate-error-param", e.param),
                ("x-meshgate-error-code", e.code)]
    retry_after_s = getattr(e, "retry_after_s", None)
    if retry_after_s is not None:
        trailers.append(("retry-after", str(max(1, round(retry_after_s)))))
    # metadata values must be printable ASCII; the message (details) may be anything
    md = tuple((k, v) for k, v in trailers if v and v.isascii() and v.isprintable())
    await context.abort(code, e.message, md)
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker


# -- the server -------------------------------------------------------------------------------
def _peer_ip(context: grpc.aio.ServicerContext) -> str | None:
    """The client's address from grpc's peer string (ipv4:1.2.3.4:5678, ipv6:[::1]:5678), for the
    per-address bound on failed key checks."""
    peer: str = context.peer()
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return None


class RpcFront:
    """The gRPC server beside the HTTP one: the same edge Gateway (whose HTTP front starts and
    closes it), the generation service, health and reflection."""

    def __init__(self, gateway: Gateway, host: str, port: int):
        self.gw = gateway
        self.host = host
        self.port = port
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._serving: bool | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> str:
        """Bind and serve; returns HOST:PORT (the bound port when 0 was asked). OSError when the
        port cannot be had."""
        tls = self.gw.cfg.tls
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),  # gRPC's default would let a second server share the port silently
            ("grpc.max_receive_message_length", self.gw.cfg.limits.max_body_bytes),
            ("grpc.server_handshake_timeout_ms", int(tls.handshake_timeout_s * 1000)),
        ])
        pb_grpc.add_GenerationServicer_to_server(GenerationService(self.gw), server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        if self.port:
            _check_free(self.host, self.port)
        try:
            port = (server.add_secure_port(self.address, RpcTls(tls).credentials()) if tls.enabled
                    else server.add_insecure_port(self.address))
        except RuntimeError as e:  # grpcio's own message ends with advice on its log verbosity
            raise OSError(str(e).split(";")[0]) from None
        if port == 0:
            raise OSError(f"cannot bind {self.address}")
        self.port = port
        await self._update_health()
        await server.start()
        self._server = server
        self._watch = asyncio.create_task(self._watch_health())
        return self.address

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let calls in progress finish for up to grace_s, then cancel them."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()  # watchers see NOT_SERVING while it drains
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self._server.stop(grace_s)
        self._server = None

    async def _update_health(self) -> None:
        ok = self.gw.upstreams.any_available()
        if ok == self._serving:
            return
        self._serving = ok
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        """Follow the gateway's view of its pools (probes, breakers), as /ready does."""
        while True:
            # breakers open between probes too; the check is cheap
            await asyncio.sleep(min(self.gw.cfg.probe.period_s, 1.0))
            await self._update_health()


def _check_free(host: str, port: int) -> None:
    """Raise OSError("Address already in use") for a taken port, as the HTTP side words it. gRPC
    would fail too, but only after logging a multi-line C-core error of its own."""
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
            try:
                s.bind(addr)
            except OSError as e:
                raise OSError(e.errno, e.strerror) from None
