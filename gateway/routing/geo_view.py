"""Geography for routing: where pools and clients are, and the RTTs that follow from it.

RTT to a pool this gateway has not measured (DESIGN.md §3-4) is estimated from network coordinates
when they can be trusted, else from distance. The gateways are the Vivaldi nodes: each keeps its
own node (`GeoView.node`), publishes its coordinate with its registry entry, and updates it from
every probe sample to a pool whose site's gateway published one. A pool stands at its site's
gateway's coordinate: workers do not probe, so they have no coordinate of their own, and a pool
sits next to its site's gateway (DESIGN.md §1), a difference the heights absorb. With static
discovery nobody publishes, no sample updates the node, and the estimate is the distance prior.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.config import Config, SiteConfig
from gateway.core.types import Endpoint
from geo.client import ClientLocation, PrefixTable, resolve_client_location
from geo.probing import CandidateSelector
from geo.sites import DistancePrior, Site, centroid_latlon
from geo.vivaldi import Coord, VivaldiConfig, VivaldiNode, estimate_rtt, seed_coord

log = logging.getLogger("meshgate.geo")

# A coordinate estimate is used only while both ends' relative error (the EWMA each node keeps of
# how far its predictions were from its samples) is below this. A fresh node says 1.0, a converged
# one ~0.05-0.15; the distance prior's median relative error is ~0.17 (246-city matrix), so past
# 0.3 the prior is the better bet.
TRUST_ERROR = 0.3


def _site(s: SiteConfig) -> Site:
    return Site(s.id, s.name or s.id, s.country.upper(), s.lat, s.lon)


def _valid_sites(sites: Iterable[SiteConfig]) -> dict[str, Site]:
    """The sites that describe a place. One named without country (a worker's config may only name
    its site) would fail Site's checks: it is skipped rather than allowed to stop the caller (a
    registry watch)."""
    out: dict[str, Site] = {}
    for s in sites:
        try:
            out[s.id] = _site(s)
        except ValueError as e:
            log.debug("site %s not placed: %s", s.id, e)
    return out


class GeoView:
    def __init__(self, cfg: Config, vivaldi: VivaldiConfig | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """clock: the time Vivaldi's neighbour decay runs on (tests pass their own)."""
        opts = cfg.gateway.routing_options
        self.sites = {s.id: _site(s) for s in cfg.sites}
        self.prior = DistancePrior(opts.rtt_inflation, opts.rtt_intercept_ms)
        self.here = self.sites.get(cfg.gateway.site)
        self.prefixes = PrefixTable.from_config(opts.client_prefixes, self.sites) if opts.client_prefixes else None
        self._probe_set = CandidateSelector(cfg.gateway.probe.k_nearest, cfg.gateway.probe.num_rotating)
        self._clock = clock
        self.node = VivaldiNode(vivaldi, seed=self._seed(vivaldi or VivaldiConfig()))
        # site id -> the coordinate its gateway publishes (the best, if several gateways run there)
        self.site_coords: dict[str, Coord] = {}
        # Once any were known, refresh() runs every round: when they go (their gateways left), the
        # estimates must fall back to the prior rather than keep the last coordinate's.
        self._coords_seen = False

    def _seed(self, vcfg: VivaldiConfig) -> Coord | None:
        """Start at our geographic place (the prior's picture, projected): nearer our final place
        than the origin, so the node needs fewer samples. The projection centre must be the same on
        every gateway of the mesh: the centroid of the configured sites is, when the mesh shares its
        site table. Where it does not, seeds start in different frames; they carry error 1.0, so
        the first samples move them into one."""
        if self.here is None:
            return None
        centre = centroid_latlon([s.lat for s in self.sites.values()], [s.lon for s in self.sites.values()])
        return seed_coord(self.here.lat, self.here.lon, self.prior, centre, vcfg.dim)

    def probe_targets(self, endpoints: Iterable[Endpoint]) -> list[str]:
        """The pools to probe this period: all in a small mesh; in a large one the nearest by
        measured (else estimated) RTT plus a rotating sample, so every pool is measured now and then."""
        return self._probe_set.select({e.pool_id: e.rtt_ms if e.rtt_ms is not None else e.prior_rtt_ms
                                       for e in endpoints})

    def attach(self, endpoints: Iterable[Endpoint]) -> None:
        """Give each endpoint its country and the RTT expected from here before any probe."""
        for e in endpoints:
            site = self.sites.get(e.site or "")
            if site is not None:
                e.country = site.country
            est = self.estimate_ms(e.site)
            if est is not None:
                e.prior_rtt_ms = est

    def add_sites(self, sites: Iterable[SiteConfig]) -> None:
        """Sites learnt after start (a registry); attach() then places pools there."""
        self.sites.update(_valid_sites(sites))

    # -- network coordinates ----------------------------------------------------------------
    def coord(self) -> Coord:
        """This gateway's published (update-filtered) coordinate: what its registry entry carries."""
        return self.node.app_coord

    def set_remote_coords(self, entries: Iterable[tuple[str, str | None, Any]]) -> None:
        """The coordinates other gateways publish: (gateway id, site id, coords as the registry holds
        them). Leave this gateway's own entry out: a node is not its own neighbour. Values are
        validated (anyone who can write to etcd writes them); bad ones are skipped. Where several
        gateways run at one site, the most confident stands for the site."""
        coords: dict[str, Coord] = {}
        for gid, site, raw in entries:
            if site is None or raw is None:
                continue
            try:
                c = Coord.from_dict(raw)
                if len(c.vec) != self.node.cfg.dim:
                    raise ValueError(f"dimension {len(c.vec)}, ours {self.node.cfg.dim}")
                if not c.error >= 0:
                    raise ValueError(f"negative error {c.error}")
            except ValueError as e:
                log.debug("registry: ignoring the coordinate of gateway %s: %s", gid, e)
                continue
            best = coords.get(site)
            if best is None or c.error < best.error:
                coords[site] = c
        self.site_coords = coords
        self._coords_seen = self._coords_seen or bool(coords)

    def on_rtt(self, e: Endpoint, rtt_ms: float) -> None:
        """A probe's RTT sample (Upstreams.on_rtt): a Vivaldi update against the coordinate of the
        pool's site. Sites are the neighbours, so the latency filter runs over all pools there.
        Only our workers' samples: they report the time they spent answering, which the sample
        leaves out; a third-party pool's /metrics may take milliseconds to render, a bias the
        latency filter cannot remove."""
        c = self.site_coords.get(e.site) if e.site is not None and e.kind == "meshgate" else None
        if c is None:
            return
        try:
            self.node.update(e.site, c, None, rtt_ms, self._clock())  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - this runs inside the probe loop, which must outlive any bug here
            log.exception("vivaldi update from %s failed", e.pool_id)

    def estimate_ms(self, site_id: str | None) -> float | None:
        """RTT from here to a pool at site_id without measuring it: between our coordinate and the
        site's when both are trusted, else the distance prior; None when neither is known."""
        if site_id is None:
            return None
        c = self.site_coords.get(site_id)
        if c is not None and self.node.error < TRUST_ERROR and c.error < TRUST_ERROR:
            est = estimate_rtt(self.node.app_coord, c)
            if math.isfinite(est):
                return est
        site = self.sites.get(site_id)
        if site is None or self.here is None:
            return None
        return self.prior.rtt_between(self.here, site)

    def refresh(self, endpoints: Iterable[Endpoint]) -> None:
        """After each round of probes (Upstreams.on_probed), before the candidate order is rebuilt:
        every endpoint's prior_rtt_ms (the estimate routing uses while rtt_ms is None) from the
        coordinates as they now stand. Once per site: many pools share one."""
        if not self._coords_seen:
            return  # static discovery: nothing moves, attach() already set the distance prior
        by_site: dict[str | None, float | None] = {}
        for e in endpoints:
            if e.site not in by_site:
                by_site[e.site] = self.estimate_ms(e.site)
            est = by_site[e.site]
            if est is not None:
                e.prior_rtt_ms = est

    # -- clients ----------------------------------------------------------------------------
    def client(self, headers: Mapping[str, str], client_ip: str | None) -> ClientLocation | None:
        if self.here is None:
            return None
        return resolve_client_location(headers, client_ip, self.sites, self.here, self.prefixes)

    def client_rtt_ms(self, loc: ClientLocation | None) -> float:
        if loc is None or self.here is None:
            return 0.0
        return loc.rtt_ms(self.here, self.prior)
