"""geo.client: where the client is, by precedence, and the IP-prefix table."""
from __future__ import annotations

import pytest

from geo.client import PrefixTable, resolve_client_location
from geo.sites import DistancePrior, Site

SITES = {
    s.id: s
    for s in (
        Site("fra1", "Frankfurt", "DE", 50.11, 8.68),
        Site("ams1", "Amsterdam", "NL", 52.37, 4.90),
        Site("nyc1", "New York", "US", 40.71, -74.01),
    )
}
GATEWAY = SITES["fra1"]
TABLE = PrefixTable.from_config(
    {
        "10.0.0.0/8": "ams1",
        "10.1.0.0/16": "nyc1",
        "10.1.2.0/24": {"lat": -33.87, "lon": 151.21},
        "2001:db8::/32": "ams1",
        "2001:db8:aa::/48": "nyc1",
    },
    SITES,
)


def resolve(headers=None, ip=None, table=TABLE):
    return resolve_client_location(headers or {}, ip, SITES, GATEWAY, table)


def test_precedence_site_then_latlon_then_prefix_then_gateway():
    everything = {"x-client-site": "nyc1", "x-client-lat": "1.5", "x-client-lon": "2.5"}
    loc = resolve(everything, "10.0.0.1")
    assert (loc.source, loc.site_id) == ("header-site", "nyc1")
    loc = resolve({"x-client-lat": "1.5", "x-client-lon": "2.5"}, "10.0.0.1")
    assert (loc.source, loc.lat, loc.lon, loc.site_id) == ("header-latlon", 1.5, 2.5, None)
    loc = resolve({}, "10.0.0.1")
    assert (loc.source, loc.site_id) == ("ip-prefix", "ams1")
    loc = resolve({}, "192.0.2.1")
    assert (loc.source, loc.site_id) == ("gateway", "fra1")
    assert resolve({}, None, table=None).source == "gateway"


def test_bad_headers_fall_through():
    assert resolve({"x-client-site": "nowhere"}, "10.0.0.1").source == "ip-prefix"
    assert resolve({"x-client-lat": "91", "x-client-lon": "0"}).source == "gateway"
    assert resolve({"x-client-lat": "abc", "x-client-lon": "0"}).source == "gateway"
    assert resolve({"x-client-lat": "nan", "x-client-lon": "0"}).source == "gateway"
    assert resolve({"x-client-lat": "10"}).source == "gateway"  # half a location is none
    assert resolve({}, "not-an-ip").source == "gateway"


def test_header_names_are_case_insensitive():
    loc = resolve({"X-Client-Site": " ams1 "})
    assert loc.site_id == "ams1"


def test_longest_prefix_wins():
    assert TABLE.lookup("10.200.0.1").site_id == "ams1"  # /8
    assert TABLE.lookup("10.1.9.9").site_id == "nyc1"  # /16 beats /8
    hit = TABLE.lookup("10.1.2.3")  # /24 beats both, and is a bare lat/lon
    assert hit.site_id is None and (hit.lat, hit.lon) == (-33.87, 151.21)
    assert TABLE.lookup("11.0.0.1") is None
    assert TABLE.lookup("2001:db8:1::1").site_id == "ams1"
    assert TABLE.lookup("2001:db8:aa::1").site_id == "nyc1"
    assert TABLE.lookup("::ffff:10.1.9.9").site_id == "nyc1"  # IPv4 seen through a dual-stack socket
    assert len(TABLE) == 5


def test_default_route_and_host_routes():
    t = PrefixTable.from_config({"0.0.0.0/0": "fra1", "192.0.2.7/32": "nyc1"}, SITES)
    assert t.lookup("8.8.8.8").site_id == "fra1"
    assert t.lookup("192.0.2.7").site_id == "nyc1"
    assert t.lookup("2001:db8::1") is None  # no IPv6 routes at all


@pytest.mark.parametrize(
    "table, match",
    [
        ({"10.0.0.1/8": "fra1"}, "host bits"),
        ({"10.0.0.0/33": "fra1"}, "10.0.0.0/33"),
        ({"10.0.0.0/8": "mars1"}, "unknown site"),
        ({"10.0.0.0/8": {"lat": 100, "lon": 0}}, "out of range"),
        ({"10.0.0.0/8": 42}, "expected a site id"),
    ],
)
def test_bad_config_entries_name_the_prefix(table, match):
    with pytest.raises(ValueError, match=match):
        PrefixTable.from_config(table, SITES)


def test_client_rtt_uses_the_prior():
    prior = DistancePrior(inflation=2.0, intercept_ms=3.0)
    here = resolve({"x-client-site": "fra1"})
    assert here.rtt_ms(GATEWAY, prior) == 3.0  # same site: last mile only
    ams = resolve({"x-client-site": "ams1"})
    km = ams.distance_km(GATEWAY)
    assert 350 < km < 370
    assert ams.rtt_ms(GATEWAY, prior) == pytest.approx(3.0 + 2.0 * km / 100)
