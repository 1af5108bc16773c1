"""Whom a gateway probes: everyone in a small mesh; the nearest plus a rotating sample in a large one."""
from __future__ import annotations

import asyncio

from gateway.config import config_from_dict
from gateway.pools.upstream import Upstreams
from gateway.routing.geo_view import GeoView


def _cfg(num_pools: int, k: int = 4, rotating: int = 2):  # type: ignore[no-untyped-def]
    sites = [{"id": "here", "country": "DE", "lat": 50.0, "lon": 8.0}] + [
        {"id": f"s{i}", "country": "DE", "lat": 50.0, "lon": 8.0 + 0.5 * i} for i in range(num_pools)]
    pools = [{"id": f"p{i}", "url": f"http://127.0.0.1:{20000 + i}", "models": ["m"], "site": f"s{i}"}
             for i in range(num_pools)]
    return config_from_dict({"gateway": {"site": "here", "probe": {"k_nearest": k, "num_rotating": rotating}},
                             "sites": sites, "pools": pools})


def test_small_mesh_probes_every_pool() -> None:
    cfg = _cfg(5)
    up = Upstreams(cfg.pools, cfg.gateway.upstream, cfg.gateway.probe)
    geo = GeoView(cfg)
    geo.attach(up.endpoints)
    assert sorted(geo.probe_targets(up.endpoints)) == [f"p{i}" for i in range(5)]


def test_large_mesh_probes_the_nearest_and_every_pool_in_turn() -> None:
    cfg = _cfg(40)
    up = Upstreams(cfg.pools, cfg.gateway.upstream, cfg.gateway.probe)
    geo = GeoView(cfg)
    geo.attach(up.endpoints)
    up.pools["p30"].endpoint.rtt_ms = 0.1  # measured: nearer than its distance says
    seen: set[str] = set()
    for _ in range(20):  # 36 others / 2 a round: a full pass in 18 rounds
        targets = geo.probe_targets(up.endpoints)
        assert len(targets) == 6
        assert targets[:4] == ["p30", "p0", "p1", "p2"]  # nearest first, measured before prior
        seen.update(targets)
    assert seen == {f"p{i}" for i in range(40)}


def test_upstreams_probe_only_the_chosen_targets(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(40)
    up = Upstreams(cfg.pools, cfg.gateway.upstream, cfg.gateway.probe)
    geo = GeoView(cfg)
    geo.attach(up.endpoints)
    up.probe_targets = geo.probe_targets
    probed: list[str] = []

    async def probe(pool) -> None:  # type: ignore[no-untyped-def]
        probed.append(pool.endpoint.pool_id)

    monkeypatch.setattr(up, "probe", probe)
    asyncio.run(up.probe_all())
    assert len(probed) == 6 and probed[:4] == ["p0", "p1", "p2", "p3"]
