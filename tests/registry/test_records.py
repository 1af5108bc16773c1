"""The discovery section and the registry's records (no etcd needed)."""
from __future__ import annotations

import pytest

from gateway.config import ConfigError, config_from_dict
from gateway.registry import PoolRecord, pool_record
from gateway.registry.records import decode_gateway, decode_pool, encode
from gateway.edge.discovery import gateway_record


def test_discovery_defaults_to_static():
    d = config_from_dict({}).discovery
    assert d.kind == "static" and d.prefix == "/meshgate/"


def test_discovery_etcd_parses():
    d = config_from_dict({"discovery": {"kind": "etcd", "endpoints": ["etcd-0:2379", "etcd-1:2379"],
                                        "lease_ttl_s": 5, "ca_file": "/ca.pem", "username": "u",
                                        "password": "p"}}).discovery
    assert d.endpoints == ("etcd-0:2379", "etcd-1:2379") and d.lease_ttl_s == 5


@pytest.mark.parametrize("section, message", [
    ({"kind": "consul"}, "discovery.kind"),
    ({"endpont": ["x:1"]}, "discovery.endpont: unknown key"),
    ({"endpoints": ["nohost"]}, "discovery.endpoints[0]"),
    ({"prefix": "meshgate"}, "discovery.prefix"),
    ({"lease_ttl_s": 1}, "discovery.lease_ttl_s"),
    ({"cert_file": "c.pem"}, "cert_file and key_file"),
    ({"username": "u"}, "username and password"),
    ({"timeout_s": 0}, "discovery.timeout_s"),
])
def test_discovery_errors_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"discovery": section})


def test_pool_record_round_trip_and_gateway_view():
    cfg = config_from_dict({"sites": [{"id": "fra", "country": "DE", "lat": 50.1, "lon": 8.7}],
                            "pools": [{"id": "a", "site": "fra", "url": "http://a:8101"}]})
    rec = pool_record(cfg, cfg.pools[0])
    assert rec.capacity == cfg.pools[0].engine.max_num_seqs and rec.site is not None and rec.site.lat == 50.1
    back = decode_pool(encode(rec))
    assert back == rec
    pc = back.pool_config()
    assert (pc.id, pc.base_url, pc.site, pc.served_models) == ("a", "http://a:8101", "fra", ("meshgate-tiny",))


def test_gateway_record_defaults():
    cfg = config_from_dict({"gateway": {"site": "fra", "port": 9000},
                            "discovery": {"kind": "etcd", "advertise_url": "http://gw:9000"}})
    rec = gateway_record(cfg)
    assert rec.url == "http://gw:9000" and rec.id.startswith("fra-") and rec.id.endswith("-9000")
    assert decode_gateway(encode(rec)) == rec


def test_bad_values_are_refused():
    with pytest.raises((ValueError, KeyError)):
        decode_pool(b'{"url": "x"}')
    assert isinstance(decode_pool(b'{"id": "a", "url": "x"}'), PoolRecord)
