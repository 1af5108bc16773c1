"""Geography for routing: where pools and clients are, and the RTTs that follow from it."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.config import Config, SiteConfig
from gateway.core.types import Endpoint
from geo.client import ClientLocation, PrefixTable, resolve_client_location
from geo.probing import CandidateSelector
from geo.sites import DistancePrior, Site


def _site(s: SiteConfig) -> Site:
    return Site(s.id, s.name or s.id, s.country.upper(), s.lat, s.lon)


class GeoView:
    def __init__(self, cfg: Config):
        opts = cfg.gateway.routing_options
        self.sites = {s.id: _site(s) for s in cfg.sites}
        self.prior = DistancePrior(opts.rtt_inflation, opts.rtt_intercept_ms)
        self.here = self.sites.get(cfg.gateway.site)
        self.prefixes = PrefixTable.from_config(opts.client_prefixes, self.sites) if opts.client_prefixes else None
        self._probe_set = CandidateSelector(cfg.gateway.probe.k_nearest, cfg.gateway.probe.num_rotating)

    def probe_targets(self, endpoints: Iterable[Endpoint]) -> list[str]:
        """The pools to probe this period: all in a small mesh; in a large one the nearest by
        measured (else prior) RTT plus a rotating sample, so every pool is measured now and then."""
        return self._probe_set.select({e.pool_id: e.rtt_ms if e.rtt_ms is not None else e.prior_rtt_ms
                                       for e in endpoints})

    def attach(self, endpoints: Iterable[Endpoint]) -> None:
        """Give each endpoint its country and the RTT the distance prior expects from here."""
        for e in endpoints:
            site = self.sites.get(e.site or "")
            if site is None:
                continue
            e.country = site.country
            if self.here is not None:
                e.prior_rtt_ms = self.prior.rtt_between(self.here, site)

    def add_sites(self, sites: Iterable[SiteConfig]) -> None:
        """Sites learnt after start (a registry); attach() then places pools there."""
        for s in sites:
            self.sites[s.id] = _site(s)

    def client(self, headers: Mapping[str, str], client_ip: str | None) -> ClientLocation | None:
        if self.here is None:
            return None
        return resolve_client_location(headers, client_ip, self.sites, self.here, self.prefixes)

    def client_rtt_ms(self, loc: ClientLocation | None) -> float:
        if loc is None or self.here is None:
            return 0.0
        return loc.rtt_ms(self.here, self.prior)
