"""A gateway in this process in front of stub pools (tests/stub_pool.py), on free loopback ports."""
from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway.api.app import GatewayServer
from gateway.config import config_from_dict
from tests.servers import free_port
from tests.stub_pool import StubPool

MODEL = "stub-model"


class Harness:
    def __init__(self) -> None:
        self.stubs: dict[str, StubPool] = {}
        self.serving = False
        self.server: GatewayServer | None = None
        self.url = ""
        self.session: aiohttp.ClientSession | None = None

    async def start(self, names: list[str], routing: str = "round-robin", sites: dict[str, dict] | None = None,
                    pool_cfg: dict[str, dict] | None = None, **gateway: object) -> None:
        """sites: pool name -> its site ({id, name, country, lat, lon}), for geography-aware tests;
        pool_cfg: pool name -> more keys of its pools[] entry."""
        pools = []
        for n in names:
            stub = StubPool(n)
            url = await stub.start()
            self.stubs[n] = stub
            pools.append({"id": n, "url": url, "models": [MODEL], **(pool_cfg or {}).get(n, {})})
            if sites and n in sites:
                pools[-1]["site"] = sites[n]["id"]
        port = free_port()
        gw = {"port": port, "routing": routing,
              "probe": {"period_s": 0.1, "timeout_s": 0.2, "down_after": 2, "up_after": 1},
              "upstream": {"first_byte_timeout_s": 0.5, "breaker_failures": 3, "breaker_cooldown_s": 0.5}}
        for k, v in gateway.items():
            gw[k] = {**gw[k], **v} if isinstance(v, dict) and k in gw else v  # type: ignore[dict-item]
        site_list = list({s["id"]: s for s in (sites or {}).values()}.values())
        self.server = GatewayServer(config_from_dict({"gateway": gw, "pools": pools, "sites": site_list}))
        await self.server.bind("127.0.0.1", port)
        self.serving = True
        self.url = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self.session:
            await self.session.close()
            self.session = None
        if self.serving and self.server is not None:
            self.serving = False
            await self.server.close()
        for s in self.stubs.values():
            await s.stop()

    async def request(self, body: dict, path: str = "/v1/chat/completions",
                      **kw: Any) -> tuple[int, dict[str, str], dict | list]:
        """Status, headers and body: JSON, or the list of SSE events for a stream."""
        assert self.session is not None
        async with self.session.post(self.url + path, json=body, **kw) as r:
            raw = await r.read()
            if r.headers.get("Content-Type", "").startswith("text/event-stream"):
                return r.status, dict(r.headers), [e for e in raw.decode().split("\n\n") if e]
            return r.status, dict(r.headers), json.loads(raw)

    async def post(self, body: dict, path: str = "/v1/chat/completions", **kw: Any) -> tuple[int, dict | list]:
        status, _, out = await self.request(body, path, **kw)
        return status, out


def chat(stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": stream}
