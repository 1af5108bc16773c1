"""Where is the client? The first term of expected TTFT (DESIGN.md §3) is rtt(client -> gateway),
and picking a pool near the client needs the client's place.

Sources, in order: the `x-client-site` header (a known site id: an edge proxy or SDK that knows
where it runs), the `x-client-lat` / `x-client-lon` headers (a device with a location), an
IP-prefix table from config (longest prefix wins), else the gateway's own site (the client reached
this gateway, so it is probably near it). A header that does not parse falls through to the next
source rather than failing the request: location is a routing hint, not part of the API contract.
"""
from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .sites import DistancePrior, Site, haversine_km

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

H_SITE, H_LAT, H_LON = "x-client-site", "x-client-lat", "x-client-lon"


@dataclass(frozen=True, slots=True)
class ClientLocation:
    lat: float
    lon: float
    source: str  # header-site | header-latlon | ip-prefix | gateway
    site_id: str | None = None  # set when the location is a known site

    def distance_km(self, site: Site) -> float:
        return haversine_km(self.lat, self.lon, site.lat, site.lon)

    def rtt_ms(self, site: Site, prior: DistancePrior) -> float:
        """Estimated client <-> site round trip from the distance prior (same site: the intercept)."""
        if self.site_id == site.id:
            return prior.intercept_ms
        return prior.rtt_ms(self.distance_km(site))


@dataclass(frozen=True, slots=True)
class PrefixEntry:
    network: IPNetwork
    site_id: str | None
    lat: float
    lon: float


class PrefixTable:
    """CIDR -> site or lat/lon, longest prefix match. One dict per prefix length (as a routing
    table's hash-per-length lookup): a lookup costs at most 33 (IPv4) or 129 (IPv6) dict probes,
    and in practice only as many as there are distinct lengths in the table."""

    def __init__(self, entries: list[PrefixEntry]):
        self._by_len: dict[tuple[int, int], dict[int, PrefixEntry]] = {}
        for e in entries:
            self._by_len.setdefault((e.network.version, e.network.prefixlen), {})[int(e.network.network_address)] = e
        self._lengths = {v: sorted((n for ver, n in self._by_len if ver == v), reverse=True) for v in (4, 6)}
        self._bits = {4: 32, 6: 128}

    @classmethod
    def from_config(cls, table: Mapping[str, object], sites: Mapping[str, Site]) -> PrefixTable:
        """`{"203.0.113.0/24": "fra1", "2001:db8::/32": {"lat": 52.5, "lon": 13.4}, ...}`. Bad
        entries raise ValueError naming the prefix (config errors should stop startup)."""
        entries = []
        for cidr, target in table.items():
            try:
                net = ipaddress.ip_network(cidr, strict=True)  # host bits set: probably a typo
            except ValueError as e:
                raise ValueError(f"ip prefix {cidr!r}: {e}") from None
            entries.append(_entry(net, target, sites))
        return cls(entries)

    def lookup(self, ip: str | IPAddress) -> PrefixEntry | None:
        try:
            addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
        value, bits = int(addr), self._bits[addr.version]
        for n in self._lengths[addr.version]:
            mask = ((1 << n) - 1) << (bits - n) if n else 0
            hit = self._by_len[(addr.version, n)].get(value & mask)
            if hit is not None:
                return hit
        return None

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_len.values())


def _entry(net: IPNetwork, target: object, sites: Mapping[str, Site]) -> PrefixEntry:
    if isinstance(target, str):
        site = sites.get(target)
        if site is None:
            raise ValueError(f"ip prefix {net}: unknown site {target!r}")
        return PrefixEntry(net, site.id, site.lat, site.lon)
    if isinstance(target, Mapping) and set(target) >= {"lat", "lon"}:
        lat, lon = _latlon(target["lat"], target["lon"])
        if lat is None or lon is None:
            raise ValueError(f"ip prefix {net}: lat/lon out of range or not numbers: {dict(target)!r}")
        return PrefixEntry(net, None, lat, lon)
    raise ValueError(f"ip prefix {net}: expected a site id or {{lat, lon}}, got {target!r}")


def _latlon(lat: object, lon: object) -> tuple[float | None, float | None]:
    try:
        la, lo = float(lat), float(lon)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, None
    if not (math.isfinite(la) and math.isfinite(lo) and -90 <= la <= 90 and -180 <= lo <= 180):
        return None, None
    return la, lo


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; aiohttp's CIMultiDict is not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() if value is not None else None


def resolve_client_location(
    headers: Mapping[str, str], client_ip: str | None, sites: Mapping[str, Site], gateway_site: Site,
    prefixes: PrefixTable | None = None,
) -> ClientLocation:
    """The client's location from the first source that gives one (see the module doc)."""
    site_id = _header(headers, H_SITE)
    if site_id and site_id in sites:
        s = sites[site_id]
        return ClientLocation(s.lat, s.lon, "header-site", s.id)
    lat_h, lon_h = _header(headers, H_LAT), _header(headers, H_LON)
    if lat_h is not None and lon_h is not None:
        lat, lon = _latlon(lat_h, lon_h)
        if lat is not None and lon is not None:
            return ClientLocation(lat, lon, "header-latlon")
    if prefixes is not None and client_ip:
        hit = prefixes.lookup(client_ip)
        if hit is not None:
            return ClientLocation(hit.lat, hit.lon, "ip-prefix", hit.site_id)
    return ClientLocation(gateway_site.lat, gateway_site.lon, "gateway", gateway_site.id)
