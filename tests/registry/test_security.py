"""discovery's TLS (mutual) and auth options against a real etcd that demands them."""
from __future__ import annotations

import asyncio
import shutil

import pytest

from gateway.config import config_from_dict
from gateway.registry import RegistryView
from tests.etcd_server import EtcdServer, etcd_binary, make_certs
from tests.registry.harness import Pool, discovery, wait_for

pytestmark = pytest.mark.etcd


@pytest.fixture
def tls_etcd(tmp_path):
    if etcd_binary() is None or shutil.which("openssl") is None:
        pytest.skip("needs etcd and openssl")
    certs = make_certs(tmp_path / "certs")
    server = EtcdServer(tls=certs)
    server.start()
    yield server, certs
    server.close()


async def test_mutual_tls(tls_etcd):
    etcd, certs = tls_etcd
    tls = {"ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "client.pem"),
           "key_file": str(certs / "client.key")}
    pool = await Pool("a", etcd.endpoint, "/tls/", **tls).start()
    view = RegistryView(config_from_dict({"discovery": discovery(etcd.endpoint, "/tls/", **tls)}).discovery)
    await view.start(wait_s=5)
    try:
        assert set(view.pools) == {"a"}
    finally:
        await view.stop()
        await pool.drain()
    # Without TLS the same etcd gives nothing, and the view says it is stale rather than empty-and-current.
    plain = RegistryView(config_from_dict({"discovery": discovery(etcd.endpoint, "/tls/")}).discovery)
    await plain.start(wait_s=1)
    try:
        assert not plain.synced.is_set() and plain.confirmed_at is None
    finally:
        await plain.stop()


async def _enable_auth(endpoint: str, password: str) -> None:
    """etcd 3.4: a root user with the root role, then auth on (what `etcdctl auth enable` does)."""
    from aetcd import rpc

    async with rpc.insecure_channel(endpoint) as ch:
        auth = rpc.AuthStub(ch)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)


async def test_username_and_password(own_etcd):
    await _enable_auth(own_etcd.endpoint, "s3cret")
    creds = {"username": "root", "password": "s3cret"}
    pool = await Pool("a", own_etcd.endpoint, "/auth/", **creds).start()
    view = RegistryView(config_from_dict({"discovery": discovery(own_etcd.endpoint, "/auth/", **creds)}).discovery)
    await view.start(wait_s=5)
    try:
        assert set(view.pools) == {"a"}
        await pool.die()  # a lease granted with a token expires like any other
        assert await wait_for(lambda: not view.pools, 8)
    finally:
        await view.stop()
    wrong = RegistryView(config_from_dict({"discovery": discovery(
        own_etcd.endpoint, "/auth/", username="root", password="nope")}).discovery)
    await wrong.start(wait_s=1)
    try:
        assert not wrong.synced.is_set()
    finally:
        await wrong.stop()
    await asyncio.sleep(0)
