"""The etcd registry against a real etcd: register, expire, drain, watch; gateways following it."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from gateway.config import config_from_dict
from gateway.registry import RegistryView
from tests.registry.harness import Gateway, Pool, ask, discovery, gateway_config, metric, wait_for

pytestmark = pytest.mark.etcd


async def test_register_watch_drain_and_expire(etcd, prefix):
    view = RegistryView(config_from_dict({"discovery": discovery(etcd.endpoint, prefix)}).discovery)
    a = await Pool("a", etcd.endpoint, prefix).start()
    await view.start(wait_s=5)
    try:
        assert set(view.pools) == {"a"}  # the first list
        assert view.pools["a"].site is not None and view.pools["a"].site.country == "DE"
        b = await Pool("b", etcd.endpoint, prefix, site="par").start()
        assert await wait_for(lambda: set(view.pools) == {"a", "b"}, 5)  # the watch
        t0 = time.monotonic()
        await a.drain()
        assert await wait_for(lambda: "a" not in view.pools, 2)
        assert time.monotonic() - t0 < 1.5  # deleted, not left to expire
        t0 = time.monotonic()
        await b.die()
        assert await wait_for(lambda: not view.pools, 10)
        waited = time.monotonic() - t0
        assert 1.0 < waited < 6, waited  # the lease (2 s) ran out
        assert view.stale_s() < 1.0
    finally:
        await view.stop()


async def test_gateway_routes_to_pools_as_they_register_and_leave(etcd, prefix):
    gw = await Gateway(gateway_config(etcd.endpoint, prefix)).start()
    pools = [await Pool(f"p{i}", etcd.endpoint, prefix).start() for i in range(2)]
    try:
        async with aiohttp.ClientSession() as s:
            assert await wait_for(lambda: gw.pool_ids() == {"p0", "p1"}, 5)
            seen: set[str] = set()
            for _ in range(50):  # least-load with a random tie-break: both get some
                seen.add((await ask(s, gw.url))[1])
                if seen == {"p0", "p1"}:
                    break
            assert seen == {"p0", "p1"}
            await pools[0].drain()
            assert await wait_for(lambda: gw.pool_ids() == {"p1"}, 3)
            assert {await ask(s, gw.url) for _ in range(5)} == {(200, "p1")}
            async with s.get(gw.url + "/v1/meshgate/gateways") as r:
                listed = (await r.json())["data"]
            assert [g["id"] for g in listed] == [gw.cfg.discovery.instance_id]
            assert listed[0]["site"]["country"] == "DE"
            stale = await metric(s, gw.url, "meshgate_registry_stale_seconds")
            assert stale is not None and stale < 1.0
    finally:
        await gw.stop()
        for p in pools[1:]:
            await p.drain()


async def test_static_gateway_lists_only_itself(tmp_path):
    cfg = config_from_dict({"gateway": {"site": "fra", "port": 0}, "sites": [{"id": "fra", "country": "DE"}]})
    from gateway.api.app import GatewayServer

    listed = GatewayServer(cfg).gateway_list()
    assert [g["site"]["id"] for g in listed] == ["fra"]  # type: ignore[index]


async def test_gateway_restart_picks_up_the_view(etcd, prefix):
    pools = [await Pool(f"p{i}", etcd.endpoint, prefix).start() for i in range(3)]
    cfg = gateway_config(etcd.endpoint, prefix)
    try:
        gw = await Gateway(cfg).start()
        assert gw.pool_ids() == {"p0", "p1", "p2"}  # listed during startup, before the first request
        await gw.stop()
        await pools[2].drain()
        gw = await Gateway(cfg).start()
        assert gw.pool_ids() == {"p0", "p1"}
        async with aiohttp.ClientSession() as s:
            assert (await ask(s, gw.url))[0] == 200
        await gw.stop()
    finally:
        for p in pools[:2]:
            await p.drain()


async def test_two_gateways_share_pools(etcd, prefix):
    gws = [await Gateway(gateway_config(etcd.endpoint, prefix, site=site)).start() for site in ("fra", "par")]
    pools = [await Pool(f"p{i}", etcd.endpoint, prefix, site=s).start() for i, s in enumerate(("fra", "par"))]
    try:
        assert await wait_for(lambda: all(g.pool_ids() == {"p0", "p1"} for g in gws), 5)
        async with aiohttp.ClientSession() as s:
            for g in gws:
                assert (await ask(s, g.url))[0] == 200
            assert await wait_for(lambda: all(len(g.view.gateways) == 2 for g in gws if g.view), 5)
            async with s.get(gws[0].url + "/v1/meshgate/gateways") as r:
                sites = sorted(g["site"]["id"] for g in (await r.json())["data"])
            assert sites == ["fra", "par"]
        await gws[1].stop()  # deregisters: the other gateway's list shrinks
        assert await wait_for(lambda: gws[0].view is not None and len(gws[0].view.gateways) == 1, 3)
    finally:
        await gws[0].stop()
        for p in pools:
            await p.drain()


async def test_a_lapsed_lease_of_a_live_pool_does_not_stop_its_traffic(etcd, prefix):
    """A pool cut off from etcd (its lease lapses) but reachable keeps serving; once it stops
    answering it goes. A drain, by contrast, removes the pool at once."""
    gw = await Gateway(gateway_config(etcd.endpoint, prefix)).start()
    cut_off = await Pool("cut", etcd.endpoint, prefix).start()
    try:
        assert await wait_for(lambda: gw.pool_ids() == {"cut"}, 5)
        assert cut_off.registrant is not None
        await cut_off.registrant.stop(deregister=False)  # stops refreshing; the stub still serves
        assert gw.view is not None
        assert await wait_for(lambda: "cut" in gw.view.lapsed, 8)
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                assert await ask(s, gw.url) == (200, "cut")
                await asyncio.sleep(0.1)
            assert gw.pool_ids() == {"cut"}
            await cut_off.stub.stop()
            assert await wait_for(lambda: gw.pool_ids() == set(), 5)
    finally:
        await gw.stop()
