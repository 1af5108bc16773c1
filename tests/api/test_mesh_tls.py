"""The whole embedded mesh with TLS on every hop, from the documented config (configs/local-tls.yaml)
and the documented command (`meshgate certs`): the official openai SDK over HTTPS trusting the dev
CA, gRPC over TLS, the gateway reaching its four workers over mutual TLS (through the emulated
links), and the workers refusing a client without the mesh's certificate."""
from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.servers import Proc, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tlsmesh")
    out = subprocess.run([sys.executable, "-m", "gateway", "certs", "--out", str(tmp / "certs")], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load((ROOT / "configs" / "local-tls.yaml").read_text())
    gw = cfg["gateway"]
    gw["port"], gw["grpc_port"] = free_port(), free_port()
    gw["probe"]["period_s"] = 0.2
    for p in cfg["pools"]:  # free ports; the untrained tiny model, small (fast to make, light on a shared CPU)
        p["port"] = free_port()
        p["url"] = f"https://127.0.0.1:{free_port()}"
        p["model"] = {**p["model"], "cache_dir": str(tmp / "cache"), "tiny": {"seed": 0, "train_steps": 0}}
        p["engine"] = {**p["engine"], "num_blocks": 128, "max_model_len": 512, "max_num_seqs": 4}
    (tmp / "configs").mkdir()
    path = tmp / "configs" / "local-tls.yaml"  # its ../certs is where `meshgate certs` wrote
    path.write_text(yaml.safe_dump(cfg))
    proc = Proc(["up", "--config", str(path)], ready_marker="meshgate is up", timeout_s=180)
    ca = str(tmp / "certs" / "ca.pem")
    url = f"https://localhost:{gw['port']}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/ready", verify=ssl.create_default_context(cafile=ca)).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(ready, timeout_s=30):
        proc.stop()
        raise RuntimeError("the TLS mesh did not become ready:\n" + proc.log())
    yield url, cfg, tmp, proc
    assert proc.stop() == 0, proc.log()


def _ca(tmp: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp / "certs" / "ca.pem"))


def test_openai_sdk_over_https_through_mutual_tls_pools(tls_mesh):
    url, _, tmp, proc = tls_mesh
    assert "meshgate is up: gateway https://" in proc.log()
    with httpx.Client(verify=_ca(tmp)) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", http_client=http)
        reply = client.completions.create(model="meshgate-tiny", prompt="The keeper", max_tokens=4)
        assert reply.usage.completion_tokens == 4
        stream = client.chat.completions.create(model="meshgate-tiny", max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        assert len([c for c in stream if c.choices and c.choices[0].delta.content]) >= 1
        # every pool is reached over mutual TLS: probes see them all healthy, load streams are up
        mesh = http.get(url + "/v1/meshgate/mesh").json()
        assert {p["id"]: p["healthy"] for p in mesh["pools"]} == {"fra-1": True, "muc-1": True, "par-1": True,
                                                                  "ams-1": True}
        assert all(p["url"].startswith("https://") for p in mesh["pools"])
        assert wait_until(lambda: all(p["load_pushed"] for p in http.get(url + "/v1/meshgate/mesh").json()["pools"]),
                          timeout_s=10)
        metrics = http.get(url + "/metrics").text
    for cert in ("gateway", "upstream_client"):
        line = next(ln for ln in metrics.splitlines() if ln.startswith(f'meshgate_tls_cert_expiry_seconds{{cert="{cert}"}}'))
        assert 80 * 86400 < float(line.rsplit(" ", 1)[1]) <= 90 * 86400  # `meshgate certs`: 90 days


def test_workers_serve_only_the_mesh_gateways(tls_mesh):
    _, cfg, tmp, _ = tls_mesh
    worker = f"https://127.0.0.1:{cfg['pools'][0]['port']}"
    certs = tmp / "certs"
    # without a client certificate the handshake is refused
    with pytest.raises(httpx.HTTPError):
        httpx.get(worker + "/load", verify=_ca(tmp), timeout=5)
    # with the gateway's: served, and the worker's own certificate expiry is on its /metrics
    ctx = _ca(tmp)
    ctx.load_cert_chain(str(certs / "mesh-client.pem"), str(certs / "mesh-client-key.pem"))
    r = httpx.get(worker + "/metrics", verify=ctx, timeout=5)
    assert r.status_code == 200 and 'meshgate_tls_cert_expiry_seconds{cert="pool"}' in r.text
    # a certificate from the same CA with a name other than the gateways' gets 403
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from gateway.cli.certs import Issued, make_cert

    ca = Issued(x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes()),
                serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None))  # type: ignore[arg-type]
    make_cert(ca, ("not-a-gateway",), server=False, client=True).write(tmp, "other")
    ctx = _ca(tmp)
    ctx.load_cert_chain(str(tmp / "other.pem"), str(tmp / "other-key.pem"))
    assert httpx.get(worker + "/load", verify=ctx, timeout=5).status_code == 403


def test_grpc_over_tls(tls_mesh):
    _, cfg, tmp, _ = tls_mesh

    async def check() -> int:
        creds = grpc.ssl_channel_credentials((tmp / "certs" / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{cfg['gateway']['grpc_port']}", creds) as ch:
            return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)).status

    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING
