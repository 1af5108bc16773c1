"""In-process gateways and stub pools wired to a real etcd, for the registry tests and benchmark."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiohttp

from gateway.api.app import GatewayServer
from gateway.config import Config, config_from_dict
from gateway.registry import PoolRecord, Registrant, RegistryView
from gateway.registry.records import POOLS, encode
from gateway.config import SiteConfig
from tests.servers import free_port
from tests.stub_pool import StubPool

SITES = [
    {"id": "fra", "name": "Frankfurt", "country": "DE", "lat": 50.1167, "lon": 8.6833},
    {"id": "par", "name": "Paris", "country": "FR", "lat": 48.8742, "lon": 2.347},
]
MODEL = "m"


def discovery(endpoint: str, prefix: str, **over: Any) -> dict[str, Any]:
    """Short periods, so outages and expiries happen in test time."""
    return {"kind": "etcd", "endpoints": [endpoint], "prefix": prefix, "lease_ttl_s": 2, "timeout_s": 0.5,
            "confirm_s": 0.2, "backoff_max_s": 0.5, "deregister_wait_s": 0.1, **over}


def gateway_config(endpoint: str, prefix: str, site: str = "fra", probe_s: float = 0.2, **disc: Any) -> Config:
    port = free_port()
    return config_from_dict({
        "gateway": {"site": site, "port": port, "routing": "least-load", "access_log": False,
                    # two misses: one slow probe on a busy CI machine must not take a pool out
                    "probe": {"period_s": probe_s, "timeout_s": 0.5, "down_after": 2, "up_after": 1},
                    "upstream": {"connect_timeout_s": 0.3, "breaker_cooldown_s": 0.5}},
        "sites": SITES, "discovery": {**discovery(endpoint, prefix, **disc), "instance_id": f"gw-{port}"}})


class Gateway:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.url = f"http://127.0.0.1:{cfg.gateway.port}"
        self.server: GatewayServer | None = None
        self.view: RegistryView | None = None
        self._serving = False

    async def start(self) -> Gateway:
        self.server = GatewayServer(self.cfg)
        self.view = self.server.follow_registry(self.cfg)
        await self.server.bind("127.0.0.1", self.cfg.gateway.port)
        self._serving = True
        return self

    async def stop(self) -> None:
        if self._serving and self.server is not None:
            self._serving = False
            await self.server.close()

    def pool_ids(self) -> set[str]:
        assert self.server is not None
        return set(self.server.upstreams.pools)


class Pool:
    """A stub pool that registers itself like `meshgate worker` does."""

    def __init__(self, pool_id: str, endpoint: str, prefix: str, site: str = "fra", **disc: Any):
        self.id = pool_id
        self.stub = StubPool(pool_id, num_tokens=5)
        self.prefix = prefix
        self.site = site
        self.dcfg = config_from_dict({"discovery": discovery(endpoint, prefix, **disc)}).discovery
        self.registrant: Registrant | None = None

    async def start(self, register: bool = True) -> Pool:
        url = await self.stub.start()
        site = next(SiteConfig(**s) for s in SITES if s["id"] == self.site)
        record = PoolRecord(id=self.id, url=url, site=site, models=(MODEL,), capacity=8)
        self.registrant = Registrant(self.dcfg, f"{self.prefix}{POOLS}{self.id}", lambda: encode(record),
                                     farewell=lambda: encode(dataclasses.replace(record, draining=True)))
        if register:
            self.registrant.start()
            await asyncio.wait_for(self.registrant.registered.wait(), 10)
        return self

    async def drain(self) -> None:
        """As `meshgate worker` on SIGTERM: leave the registry, then stop serving."""
        assert self.registrant is not None
        await self.registrant.stop()
        await asyncio.sleep(self.dcfg.deregister_wait_s)
        await self.stub.stop()

    async def die(self) -> None:
        """A crash: no deregistration; the lease expires."""
        assert self.registrant is not None
        await self.registrant.stop(deregister=False)
        await self.stub.stop()


async def wait_for(pred: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval_s)
    return bool(pred())


async def ask(session: aiohttp.ClientSession, url: str, stream: bool = False) -> tuple[int, str]:
    """One completion; (status, pool that answered)."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 5, "stream": stream}
    async with session.post(url + "/v1/completions", json=body) as r:
        await r.read()
        return r.status, r.headers.get("x-meshgate-pool", "")


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    async with session.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None
