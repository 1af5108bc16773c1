"""Network coordinates in the gateway (GeoView): probe samples against the coordinates other sites'
gateways publish move this gateway's Vivaldi node, and pools it never probed get an estimate from
it that beats the distance prior; bad published coordinates are ignored; without any (static
discovery) nothing changes."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gateway.api.app import GatewayServer
from gateway.config import SiteConfig, config_from_dict
from gateway.core.types import Endpoint
from gateway.edge.discovery import _Follower
from gateway.registry import GatewayRecord
from gateway.routing.geo_view import TRUST_ERROR, GeoView
from geo.sites import DistancePrior, azimuthal_equidistant_km, centroid_latlon
from geo.vivaldi import Coord, VivaldiSystem, estimate_matrix, seed_from_prior

N = 40


class Mesh:
    """N sites in Europe. The true RTTs are a plane plus heights, but not the prior's: paths 1.5x
    the great circle with a few ms of detour each, and access links of 0.5-12 ms per site (the
    prior, one inflation and one intercept for all, cannot know a site's own last mile)."""

    def __init__(self, seed: int):
        rng = self.rng = np.random.default_rng(seed)
        self.lat, self.lon = rng.uniform(36, 60, N), rng.uniform(-10, 30, N)
        centre = centroid_latlon(list(self.lat), list(self.lon))
        xy = azimuthal_equidistant_km(self.lat, self.lon, *centre) / 100.0 * 1.5 + rng.normal(0, 3, (N, 2))
        self.truth = estimate_matrix(xy, rng.uniform(0.5, 12, N))
        sites = [{"id": f"s{i}", "country": "DE", "lat": float(self.lat[i]), "lon": float(self.lon[i])}
                 for i in range(N)]
        pools = [{"id": f"p{i}", "site": f"s{i}", "url": f"http://127.0.0.1:{20000 + i}", "models": ["m"]}
                 for i in range(N)]
        self.cfg = config_from_dict({"gateway": {"site": "s0"}, "sites": sites, "pools": pools})
        opts = self.cfg.gateway.routing_options
        self.prior = DistancePrior(opts.rtt_inflation, opts.rtt_intercept_ms)
        self.centre = centre

    def other_gateways(self) -> VivaldiSystem:
        """The coordinates the other sites' gateways publish: a Vivaldi system run over the true
        RTTs (8 neighbours each, noisy samples), seeded from geography as gateways seed."""
        rng = self.rng
        nb = np.stack([rng.choice(np.delete(np.arange(N), i), 8, replace=False) for i in range(N)])
        pos, height = seed_from_prior(self.lat, self.lon, self.prior, self.centre)
        system = VivaldiSystem(nb, pos=pos, height=height, rng=np.random.default_rng(1))
        rows = np.arange(N)
        for r in range(300):
            slot = rng.integers(0, 8, N)
            system.observe(slot, self.truth[rows, nb[rows, slot]] * rng.lognormal(0, 0.05, N), float(r))
        return system

    def sample(self, i: int) -> float:
        return float(self.truth[0, i] * self.rng.lognormal(0, 0.05))


def endpoints(n: int = N) -> list[Endpoint]:
    return [Endpoint(f"p{i}", "", f"s{i}", "meshgate", frozenset({"m"})) for i in range(n)]


def rel_err(est: np.ndarray, truth: np.ndarray) -> float:
    return float(np.median(np.abs(est - truth) / truth))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coordinates_beat_the_prior_for_sites_never_probed(seed: int) -> None:
    mesh = Mesh(seed)
    others = mesh.other_gateways()
    t = [0.0]
    geo = GeoView(mesh.cfg, clock=lambda: t[0])
    eps = endpoints()
    geo.attach(eps)
    prior = np.array([e.prior_rtt_ms for e in eps])
    geo.set_remote_coords([(f"gw{i}", f"s{i}", others.coord(i).to_dict()) for i in range(1, N)])
    geo.refresh(eps)
    assert np.array([e.prior_rtt_ms for e in eps]) == pytest.approx(prior)  # nothing measured: not trusted
    order = list(np.argsort(prior[1:]) + 1)
    probed, never = order[:8], order[8:]  # the k nearest by the prior; the rest are never probed
    for r in range(20):  # 20 rounds of probes, 160 samples
        t[0] = float(r)
        for i in probed:
            geo.on_rtt(eps[i], mesh.sample(i))
        geo.refresh(eps)
    assert geo.node.error < TRUST_ERROR
    est = np.array([eps[i].prior_rtt_ms for i in never])
    truth = mesh.truth[0, never]
    viv, dist = rel_err(est, truth), rel_err(prior[never], truth)
    assert viv < 0.5 * dist, (viv, dist)
    # what the registry would carry is the coordinate these estimates come from
    c = Coord.from_dict(geo.coord().to_dict())
    assert c.error == pytest.approx(geo.node.error, abs=1e-4)


def test_estimates_fall_back_to_the_prior_when_the_coordinates_go() -> None:
    mesh = Mesh(0)
    others = mesh.other_gateways()
    geo = GeoView(mesh.cfg, clock=lambda: 0.0)
    eps = endpoints()
    geo.attach(eps)
    prior = [e.prior_rtt_ms for e in eps]
    geo.set_remote_coords([(f"gw{i}", f"s{i}", others.coord(i).to_dict()) for i in range(1, N)])
    for _ in range(20):
        for i in range(1, 9):
            geo.on_rtt(eps[i], mesh.sample(i))
    geo.refresh(eps)
    assert [e.prior_rtt_ms for e in eps] != pytest.approx(prior)
    geo.set_remote_coords([])  # every other gateway left the registry
    geo.refresh(eps)
    assert [e.prior_rtt_ms for e in eps] == pytest.approx(prior)


def test_without_published_coordinates_nothing_changes() -> None:
    """Static discovery: probes feed on_rtt, but with no remote coordinate there is no update,
    and the estimate stays the distance prior."""
    mesh = Mesh(0)
    geo = GeoView(mesh.cfg)
    seed = geo.coord()
    eps = endpoints()
    geo.attach(eps)
    prior = [e.prior_rtt_ms for e in eps]
    for i in range(1, N):
        geo.on_rtt(eps[i], mesh.sample(i))
    geo.refresh(eps)
    assert geo.coord() == seed and geo.node.error == 1.0
    assert [e.prior_rtt_ms for e in eps] == prior


GOOD = {"v": [1.0, 2.0], "h": 3.0, "e": 0.2}
BAD: list[Any] = [
    "not a dict", [1, 2], {"v": [1.0, 2.0]}, {"v": [1.0, "x"], "h": 1}, {"v": [1.0, 2.0], "h": -1},
    {"v": [1.0, float("nan")], "h": 1}, {"v": [1.0, 2.0, 3.0], "h": 1},  # another dimension
    {"v": [1.0, 2.0], "h": 1, "e": -0.5}, {"v": {"a": 1}, "h": 1}, {"v": None, "h": 1}, 7,
]


def test_bad_published_coordinates_are_ignored() -> None:
    geo = GeoView(Mesh(0).cfg)
    entries: list[tuple[str, str | None, Any]] = [(f"bad{i}", f"s{i + 1}", raw) for i, raw in enumerate(BAD)]
    entries += [("good", "s30", GOOD), ("nosite", None, GOOD), ("none", "s31", None),
                ("sure", "s32", {**GOOD, "e": 0.1}), ("unsure", "s32", {**GOOD, "v": [9.0, 9.0], "e": 0.9})]
    geo.set_remote_coords(entries)
    assert set(geo.site_coords) == {"s30", "s32"}
    assert geo.site_coords["s32"].vec == (1.0, 2.0)  # of two gateways at a site, the more confident


def test_gateway_wiring_samples_estimates_and_candidate_order() -> None:
    """Through GatewayServer's own callbacks: probe samples reach the node, and after a round the
    candidate order (refreshed on the same signal) already uses the new estimates."""
    mesh = Mesh(1)
    others = mesh.other_gateways()
    server = GatewayServer(mesh.cfg)
    up = server.upstreams
    eps = {e.pool_id: e for e in up.endpoints}
    server.geo.set_remote_coords([(f"gw{i}", f"s{i}", others.coord(i).to_dict()) for i in range(1, N)])
    prior = {pid: e.prior_rtt_ms for pid, e in eps.items()}
    for _ in range(20):
        for i in range(1, 9):
            for sample in up.on_rtt:
                sample(eps[f"p{i}"], mesh.sample(i))
    for probed in up.on_probed:
        probed()
    assert server.geo.node.error < TRUST_ERROR
    by_prior = sorted(eps, key=lambda pid: prior[pid] or 0.0)
    by_estimate = sorted(eps, key=lambda pid: eps[pid].prior_rtt_ms or 0.0)
    assert by_estimate != by_prior  # the coordinates reorder the mesh (else this test shows nothing)
    assert [e.pool_id for e in server.forwarder.candidates._near] == by_estimate


def test_registry_follower_hands_validated_coordinates_to_geography() -> None:
    """gateway/edge/discovery.py's watch callback: every gateway's coordinate but our own, bad ones
    skipped without stopping the watch."""
    mesh = Mesh(0)
    server = GatewayServer(mesh.cfg)
    site = SiteConfig(id="s5", country="FR", lat=48.9, lon=2.3)
    gateways = {
        "me": GatewayRecord("me", "http://me", SiteConfig(id="s0"), GOOD),
        "g5": GatewayRecord("g5", "http://g5", site, GOOD),
        "g6": GatewayRecord("g6", "http://g6", SiteConfig(id="s6"), {"v": "garbage"}),
        "g7": GatewayRecord("g7", "http://g7", SiteConfig(id="s7", country="DE"), None),
    }
    view = SimpleNamespace(pools={}, gateways=gateways, lapsed={})
    follow = _Follower(server.geo, server.upstreams, view, mesh.cfg, "me")  # type: ignore[arg-type]
    follow()
    assert set(server.geo.site_coords) == {"s5"}
    # a site a worker only names (no country) is not placed, and does not stop the watch either
    server.geo.add_sites([SiteConfig(id="bare")])
    assert "bare" not in server.geo.sites
