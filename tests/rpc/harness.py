"""The gRPC front over the HTTP Harness of tests/api/harness.py: same stub pools, same
GatewayServer, plus an RpcFront on a free port and a grpc.aio channel to it."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.rpc import meshgate_pb2 as pb
from gateway.rpc import meshgate_pb2_grpc as pb_grpc
from gateway.rpc.server import RpcFront
from tests.api.harness import MODEL, Harness
from tests.stub_pool import StubPool

__all__ = ["MODEL", "RpcHarness", "chat", "completion"]


class RpcHarness:
    def __init__(self) -> None:
        self.http = Harness()
        self.front: RpcFront | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.GenerationStub
        self.health: health_pb2_grpc.HealthStub

    async def start(self, names: list[str], **kw: object) -> None:
        await self.http.start(names, **kw)
        assert self.http.server is not None
        self.front = RpcFront(self.http.server, "127.0.0.1", 0)
        self.channel = grpc.aio.insecure_channel(await self.front.start())
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def stubs(self) -> dict[str, StubPool]:
        return self.http.stubs

    @property
    def server(self):  # type: ignore[no-untyped-def]
        return self.http.server

    async def health_status(self, service: str = "") -> int:
        return (await self.health.Check(health_pb2.HealthCheckRequest(service=service))).status

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.front is not None:
            await self.front.stop(0)
        await self.http.stop()


def chat(**kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"model": MODEL, "messages": [pb.Message(role="user", content="hi")], "max_tokens": 5,
                                 **kw})


def completion(**kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"model": MODEL, "prompt": "once", "max_tokens": 5, **kw})
