"""The gRPC front over TLS (grpcurl's way: a TLS channel trusting the test CA, reflection, health,
a call), and its certificate replaced without a restart."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.rpc import meshgate_pb2_grpc as pb_grpc
from gateway.rpc.server import RpcFront
from tests.api.harness import Harness
from tests.rpc.harness import chat
from tests.tlsutil import TestPKI


@pytest.fixture
async def tls_front(tmp_path):
    pki = TestPKI(tmp_path)
    cert, key = pki.issue("gateway")
    http = Harness()
    await http.start(["a"], tls={"cert_file": cert, "key_file": key})
    assert http.server is not None
    front = RpcFront(http.server, "127.0.0.1", 0)
    address = await front.start()
    yield pki, address, (cert, key)
    await front.stop(0)
    await http.stop()


def _channel(pki: TestPKI, address: str) -> grpc.aio.Channel:
    with open(pki.ca_file, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    # the certificate names localhost; the channel connects to 127.0.0.1
    return grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")])


async def test_grpc_over_tls_reflection_health_and_a_call(tls_front):
    pki, address, _ = tls_front
    async with _channel(pki, address) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [r async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "meshgate.v1.Generation" in names and "grpc.health.v1.Health" in names
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        r = await pb_grpc.GenerationStub(channel).Generate(chat(), timeout=10)
        assert r.text == "t0 t1 t2 t3 t4 "


async def test_grpc_cleartext_and_untrusted_clients_fail(tls_front):
    pki, address, _ = tls_front
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.GenerationStub(channel).Generate(chat(), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    other = TestPKI(pki.folder / "other", "other CA")
    async with _channel(other, address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.GenerationStub(channel).Generate(chat(), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpc_certificate_replaced_without_restart(tls_front):
    pki, address, (cert, key) = tls_front
    async with _channel(pki, address) as channel:
        assert (await pb_grpc.GenerationStub(channel).Generate(chat(), timeout=10)).text
    # a certificate from a new CA: a client trusting only the old CA now fails, one trusting the new CA works
    new_ca = TestPKI(pki.folder / "new", "new CA")
    new_ca.replace(cert, key)
    async with _channel(new_ca, address) as channel:
        assert (await pb_grpc.GenerationStub(channel).Generate(chat(), timeout=10)).text
    async with _channel(pki, address) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.GenerationStub(channel).Generate(chat(), timeout=3)


async def test_a_silent_client_is_dropped_by_the_grpc_front(tmp_path):
    import asyncio

    pki = TestPKI(tmp_path)
    cert, key = pki.issue("gateway")
    http = Harness()
    await http.start(["a"], tls={"cert_file": cert, "key_file": key, "handshake_timeout_s": 0.5})
    assert http.server is not None
    front = RpcFront(http.server, "127.0.0.1", 0)
    address = await front.start()
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))  # TCP, and never a ClientHello
        async with _channel(pki, address) as channel:  # others are served meanwhile
            assert (await pb_grpc.GenerationStub(channel).Generate(chat(), timeout=10)).text
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        writer.close()
    finally:
        await front.stop(0)
        await http.stop()
