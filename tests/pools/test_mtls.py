"""Mutual TLS between the gateway's upstream client and pool workers: the worker's own front
(gateway/cli/run.py) serving TLS and requiring client certificates, the gateway's HttpClient
presenting one and verifying the worker against the mesh CA. Each way to get it wrong is refused."""
from __future__ import annotations

import pytest

from gateway.cli.run import _AiohttpFront
from gateway.config import TlsServerConfig
from gateway.core.tls import ClientFiles, ClientTls
from gateway.pools.h1client import HttpClient, UpstreamError
from tests.servers import free_port
from tests.stub_pool import StubPool
from tests.tlsutil import TestPKI

GATEWAY_NAME = "meshgate-gateway"


@pytest.fixture
def pki(tmp_path):
    return TestPKI(tmp_path)


@pytest.fixture
async def worker(pki):
    """A pool worker's front over the stub pool's app: TLS, client certificates required, and only
    certificates naming the mesh's gateways allowed."""
    cert, key = pki.issue("pool")
    tls = TlsServerConfig(cert_file=cert, key_file=key, client_ca_file=pki.ca_file, require_client_cert=True,
                          allowed_client_names=(GATEWAY_NAME,))
    front = _AiohttpFront(StubPool("p").app(), 1.0, tls)
    port = free_port()
    await front.bind("127.0.0.1", port)
    yield f"https://127.0.0.1:{port}"
    await front.close()


async def _get(url: str, files: ClientFiles, server_name: str | None = None) -> int:
    client = HttpClient(2, 2.0, 2.0, ClientTls(files, server_name))
    try:
        resp = await client.request("GET", url + "/load")
        await resp.read()
        resp.close()
        return resp.status
    finally:
        await client.close()


def _client(pki: TestPKI, stem: str, names: tuple[str, ...] = (GATEWAY_NAME,), **kw: float) -> ClientFiles:
    cert, key = pki.issue(stem, names, server=False, client=True, **kw)
    return ClientFiles(ca_file=pki.ca_file, cert_file=cert, key_file=key)


async def test_a_gateway_certificate_from_the_mesh_ca_is_served(worker, pki):
    assert await _get(worker, _client(pki, "gw")) == 200


async def test_missing_client_certificate_is_refused(worker, pki):
    with pytest.raises(UpstreamError):
        await _get(worker, ClientFiles(ca_file=pki.ca_file))


async def test_expired_client_certificate_is_refused(worker, pki):
    with pytest.raises(UpstreamError):
        await _get(worker, _client(pki, "old", start_days=-40, days=30))  # expired ten days ago


async def test_client_certificate_from_another_ca_is_refused(worker, pki, tmp_path):
    other = TestPKI(tmp_path / "other", "other CA")
    files = _client(other, "gw-other")
    with pytest.raises(UpstreamError):
        await _get(worker, ClientFiles(ca_file=pki.ca_file, cert_file=files.cert_file, key_file=files.key_file))


async def test_client_certificate_with_a_name_not_allowed_is_refused(worker, pki):
    assert await _get(worker, _client(pki, "intruder", ("someone-else",))) == 403


async def test_the_gateway_refuses_a_pool_whose_certificate_names_another_host(pki):
    cert, key = pki.issue("wrong-host", ("pool.elsewhere.example",))
    front = _AiohttpFront(StubPool("p").app(), 1.0, TlsServerConfig(cert_file=cert, key_file=key))
    port = free_port()
    await front.bind("127.0.0.1", port)
    try:
        with pytest.raises(UpstreamError, match="certificate verify failed"):
            await _get(f"https://127.0.0.1:{port}", ClientFiles(ca_file=pki.ca_file))
        # told which name to expect (gateway.upstream.tls.server_name), it connects
        assert await _get(f"https://127.0.0.1:{port}", ClientFiles(ca_file=pki.ca_file),
                          server_name="pool.elsewhere.example") == 200
        # and a pool with a certificate from a CA the gateway does not trust is refused
        with pytest.raises(UpstreamError, match="certificate verify failed"):
            await _get(f"https://127.0.0.1:{port}", ClientFiles(ca_file=TestPKI(pki.folder / "o", "o").ca_file),
                       server_name="pool.elsewhere.example")
    finally:
        await front.close()


async def test_client_certificate_replaced_applies_to_new_connections(worker, pki):
    files = _client(pki, "gw")
    tls = ClientTls(files)
    client = HttpClient(2, 2.0, 2.0, tls)
    try:
        resp = await client.request("GET", worker + "/load")
        await resp.read()
        resp.close()
        # the gateway's certificate is replaced by one with a name the pool does not allow: the kept-alive
        # connection goes on, a new one presents the new certificate
        pki.replace(files.cert_file, files.key_file, ("renamed",), client=True)
        first = tls.context()
        resp = await client.request("GET", worker + "/load")
        assert resp.status == 200
        await resp.read()
        resp.close()
        await client.close()
        client = HttpClient(2, 2.0, 2.0, tls)
        resp = await client.request("GET", worker + "/load")
        assert resp.status == 403 and tls.context() is first
        await resp.read()
        resp.close()
    finally:
        await client.close()


async def test_a_silent_client_is_dropped_at_the_handshake_timeout(pki):
    import asyncio

    cert, key = pki.issue("pool")
    front = _AiohttpFront(StubPool("p").app(), 1.0, TlsServerConfig(cert_file=cert, key_file=key,
                                                                     handshake_timeout_s=0.3))
    port = free_port()
    await front.bind("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # TCP, and never a ClientHello
        assert await _get(f"https://127.0.0.1:{port}", ClientFiles(ca_file=pki.ca_file)) == 200  # others served
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        writer.close()
    finally:
        await front.close()
