"""Client-facing TLS on the gateway's HTTP front: real handshakes with certificates made in the test."""
from __future__ import annotations

import asyncio
import ssl
import subprocess

import httpx
import openai
import pytest

from gateway.api.app import GatewayServer
from gateway.api.h1 import HttpServer, Request, Router, Stream
from gateway.config import ConfigError, config_from_dict
from gateway.core.tls import ServerFiles, ServerTls
from tests.api.harness import MODEL
from tests.servers import free_port
from tests.stub_pool import StubPool
from tests.tlsutil import TestPKI, peer_serial


@pytest.fixture
def pki(tmp_path):
    return TestPKI(tmp_path)


@pytest.fixture
async def tls_gateway(pki):
    cert, key = pki.issue("gateway")
    stub = StubPool("p1")
    url = await stub.start()
    port = free_port()
    cfg = config_from_dict({
        "gateway": {"port": port, "tls": {"cert_file": cert, "key_file": key, "handshake_timeout_s": 0.5},
                    "probe": {"period_s": 0.1}},
        "pools": [{"id": "p1", "url": url, "models": [MODEL]}]})
    server = GatewayServer(cfg)
    await server.bind("127.0.0.1", port)
    yield server, port, (cert, key)
    await server.close()
    await stub.stop()


async def test_openai_sdk_over_https_with_the_test_ca(tls_gateway, pki):
    _, port, _ = tls_gateway
    async with httpx.AsyncClient(verify=pki.client_context()) as http:
        client = openai.AsyncOpenAI(base_url=f"https://localhost:{port}/v1", api_key="none", http_client=http)
        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content.startswith("t0")
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 t3 t4 "


async def test_untrusted_and_old_clients_are_refused_and_alpn_is_http11(tls_gateway, pki, tmp_path):
    _, port, _ = tls_gateway
    # a client that does not trust the CA fails its handshake
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context(), server_hostname="localhost")
    # TLS 1.1 is refused by the gateway (the client allows it: security level 0): no certificate comes back
    old = await asyncio.to_thread(subprocess.run, [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        input=b"", capture_output=True, timeout=20)
    assert old.returncode != 0 and "no peer certificate available" in old.stdout.decode(), old.stdout.decode()
    ctx = pki.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    obj = w.get_extra_info("ssl_object")
    assert obj.selected_alpn_protocol() == "http/1.1" and obj.version() in ("TLSv1.2", "TLSv1.3")
    w.close()
    # openssl s_client with TLS 1.2: a modern (ECDHE, AEAD) suite is chosen
    out = await asyncio.to_thread(subprocess.run, [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-CAfile", pki.ca_file,
        "-servername", "localhost"], input=b"", capture_output=True, timeout=20)
    text = out.stdout.decode()
    assert "Verify return code: 0 (ok)" in text, text
    cipher = next(line for line in text.splitlines() if "Cipher is" in line)
    assert "ECDHE" in cipher and ("GCM" in cipher or "CHACHA20" in cipher), cipher


async def test_a_silent_tls_client_is_dropped_while_others_are_served(tls_gateway, pki):
    _, port, _ = tls_gateway
    silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)  # TCP only: never says ClientHello
    async with httpx.AsyncClient(verify=pki.client_context()) as http:
        for _ in range(3):
            assert (await http.get(f"https://localhost:{port}/health")).status_code == 200
    # handshake_timeout_s is 0.5: the gateway closes the silent connection (EOF, or a reset)
    try:
        assert await asyncio.wait_for(silent_r.read(), timeout=10) == b""
    except ConnectionResetError:
        pass
    silent_w.close()


async def test_replaced_certificate_files_serve_new_connections_while_a_stream_runs(pki):
    """No restart: the open stream keeps its connection and completes; the next connection gets the
    new certificate."""
    cert, key = pki.issue("front")
    release = asyncio.Event()

    async def slow_stream(req: Request) -> Stream:
        out = req.start_stream()
        await out.write(b"data: first\n\n")
        await release.wait()
        await out.write(b"data: last\n\n")
        await out.end()
        return out

    r = Router()
    r.add("GET", "/stream", slow_stream)
    tls = ServerTls(ServerFiles(cert, key))
    server = HttpServer(r, max_body_bytes=1000)
    await server.start("127.0.0.1", 0, tls=tls.context, tls_handshake_timeout_s=5)
    port = server.port
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_context(),
                                                       server_hostname="localhost")
        old_serial = peer_serial(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"first\n\n\r\n"), 10)
        assert b"200 OK" in head
        new = pki.replace(cert, key)
        _, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_context(), server_hostname="localhost")
        assert peer_serial(w2.get_extra_info("ssl_object").getpeercert(binary_form=True)) == new.cert.serial_number
        assert new.cert.serial_number != old_serial
        w2.close()
        release.set()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        assert b"data: last" in rest
        assert tls.reloads == 1
        writer.close()
    finally:
        await server.shutdown(1)


def test_files_that_do_not_load_keep_the_previous_certificate(pki, caplog):
    cert, key = pki.issue("front")
    tls = ServerTls(ServerFiles(cert, key))
    before = tls.current()
    with open(cert, "w") as fh:
        fh.write("not a certificate")
    assert tls.current() is before  # a half-written file: the last good context stays
    assert "keeping the previous certificate" in caplog.text
    pki.replace(cert, key)
    assert tls.current() is not before


def test_tls_config_is_checked_at_load(pki, tmp_path):
    cert, key = pki.issue("gw")
    with pytest.raises(ConfigError, match=r"gateway\.tls: cert_file and key_file go together"):
        config_from_dict({"gateway": {"tls": {"cert_file": cert}}})
    # files are checked by the process that uses them (gateways and workers share a config)
    with pytest.raises(ConfigError, match=r"gateway\.tls\.key_file: no such file"):
        config_from_dict({"gateway": {"tls": {"cert_file": cert, "key_file": "missing.pem"}}}).check_gateway_tls()
    with pytest.raises(ConfigError, match=r"gateway\.upstream\.tls: cannot load"):
        config_from_dict({"gateway": {"upstream": {"tls": {"ca_file": key}}}}).check_gateway_tls()  # a key, not a CA
    _, other_key = pki.issue("other")
    mismatched = config_from_dict({"pools": [{"id": "a", "tls": {"cert_file": cert, "key_file": other_key}}]})
    with pytest.raises(ConfigError, match=r"pools\[0\]\.tls: cannot load"):
        mismatched.check_pool_tls(mismatched.pools[0])
    with pytest.raises(ConfigError, match=r"gateway\.tls\.min_version: expected 1\.2 or 1\.3"):
        config_from_dict({"gateway": {"tls": {"cert_file": cert, "key_file": key, "min_version": "1.0"}}})
    with pytest.raises(ConfigError, match=r"pools\[0\]\.tls: require_client_cert and allowed_client_names need"):
        config_from_dict({"pools": [{"id": "a", "tls": {"cert_file": cert, "key_file": key,
                                                         "require_client_cert": True}}]})
    with pytest.raises(ConfigError, match=r"gateway\.tls\.allowed_client_names: checked by pool workers only"):
        config_from_dict({"gateway": {"tls": {"cert_file": cert, "key_file": key, "client_ca_file": pki.ca_file,
                                              "require_client_cert": True, "allowed_client_names": ["x"]}}})
    with pytest.raises(ConfigError, match=r"gateway\.upstream\.tls\.bogus: unknown key"):
        config_from_dict({"gateway": {"upstream": {"tls": {"bogus": 1}}}})
    # relative paths start at the config file's folder; a TLS pool's URL is https
    (tmp_path / "c.yaml").write_text("")
    cfg = config_from_dict({"pools": [{"id": "a", "port": 9, "tls": {"cert_file": "gw.pem", "key_file": "gw-key.pem"}}]},
                           tmp_path)
    assert cfg.pools[0].tls.cert_file == cert and cfg.pools[0].base_url == "https://127.0.0.1:9"


async def test_every_process_of_serve_workers_serves_tls(pki, tmp_path):
    import yaml

    from tests.servers import Proc

    cert, key = pki.issue("gateway")
    stub = StubPool("a", num_tokens=2)
    pool_url = await stub.start()
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"port": port, "access_log": False, "tls": {"cert_file": cert, "key_file": key},
                    "probe": {"period_s": 0.5, "timeout_s": 5.0}},
        "pools": [{"id": "a", "url": pool_url, "models": [MODEL]}]}))
    proc = await asyncio.to_thread(Proc, ["serve", "--config", str(cfg), "--workers", "2"])
    try:
        async with asyncio.timeout(60):
            while sum("listening http=" in ln for ln in list(proc.lines)) < 2:
                await asyncio.sleep(0.05)

        async def one() -> httpx.Response:  # a connection each: the kernel spreads them over the processes
            async with httpx.AsyncClient(verify=pki.client_context(), timeout=10) as c:
                return await c.post(f"https://localhost:{port}/v1/chat/completions",
                                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})

        answers = await asyncio.gather(*(one() for _ in range(24)))
        assert all(r.status_code == 200 for r in answers)
        assert len({r.headers["x-request-id"][:16] for r in answers}) == 2  # both processes answered, over TLS
        async with httpx.AsyncClient(timeout=5) as c:  # cleartext on the TLS port gets no HTTP answer
            with pytest.raises(httpx.HTTPError):
                await c.get(f"http://127.0.0.1:{port}/health")
    finally:
        rc = await asyncio.to_thread(proc.stop)
        await stub.stop()
    assert rc == 0, proc.log()


@pytest.mark.parametrize("head", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # both framings
    b"Content-Length: 5\r\nContent-Length: 6\r\n",  # two lengths
    b"Transfer-Encoding: chunked, identity\r\n",  # chunked not last
    b"Transfer-Encoding: xchunked\r\n",  # obfuscated
], ids=["cl-te", "dup-cl", "te-not-last", "te-obfuscated"])
async def test_request_smuggling_shapes_are_refused_over_tls(tls_gateway, pki, head):
    """TLS changes the transport, not the parser: the shapes a front proxy and the gateway could read
    differently are answered 400 and the connection closed."""
    _, port, _ = tls_gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_context(),
                                                   server_hostname="localhost")
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n0\r\n\r\nGET /health HTTP/1.1\r\n"
                 b"Host: x\r\n\r\n")
    out = await asyncio.wait_for(reader.read(), 10)  # the gateway closes after its answer
    assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1") == 1, out[:200]
    writer.close()


async def test_the_front_can_require_client_certificates(pki):
    cert, key = pki.issue("gateway")
    stub = StubPool("p1")
    url = await stub.start()
    port = free_port()
    server = GatewayServer(config_from_dict({
        "gateway": {"port": port, "tls": {"cert_file": cert, "key_file": key, "client_ca_file": pki.ca_file,
                                          "require_client_cert": True}},
        "pools": [{"id": "p1", "url": url, "models": [MODEL]}]}))
    await server.bind("127.0.0.1", port)
    try:
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake is refused
            async with httpx.AsyncClient(verify=pki.client_context()) as http:
                await http.get(f"https://localhost:{port}/health")
        client = pki.issue("client", ("some-client",), server=False, client=True)
        async with httpx.AsyncClient(verify=pki.client_context(client)) as http:
            assert (await http.get(f"https://localhost:{port}/health")).status_code == 200
    finally:
        await server.close()
        await stub.stop()
