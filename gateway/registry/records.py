"""What goes into etcd: one JSON value per pool and per gateway. Load never does (it changes
every few milliseconds; probes and response headers carry it)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config import POOL_KINDS, Config, PoolConfig, PoolKind, SiteConfig
from gateway.core import capabilities

POOLS = "pools/"
GATEWAYS = "gateways/"


@dataclass(frozen=True, slots=True)
class PoolRecord:
    id: str
    url: str  # how gateways reach it
    site: SiteConfig | None = None  # with its coordinates, so gateways place a pool they never configured
    models: tuple[str, ...] = ()
    capacity: int = 0  # sequences it runs at once (engine.max_num_seqs); 0: unknown (third-party)
    kind: PoolKind = "meshgate"
    # Network coordinates (geo.vivaldi.Coord.to_dict). Workers leave it empty: they do not probe, so
    # they have no coordinate; a pool stands at its site's gateway's (GatewayRecord.coords).
    coords: dict[str, Any] | None = None
    # Written just before a draining pool deletes its key: gateways then drop it at once, while a
    # key that vanishes without it (a lease that lapsed) may be a live pool cut off from etcd.
    draining: bool = False
    # What it serves (gateway/core/capabilities.py); empty: not said (its kind's default)
    capabilities: tuple[str, ...] = ()

    def pool_config(self) -> PoolConfig:
        """The gateway's view of the pool: only what routing and forwarding use."""
        return PoolConfig(id=self.id, site=self.site.id if self.site else None, kind=self.kind, url=self.url,
                          models=self.models, capabilities=self.capabilities or None)


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    id: str
    url: str
    site: SiteConfig | None = None
    # The gateway's Vivaldi coordinate (geo.vivaldi.Coord.to_dict, update-filtered), rewritten at
    # every republish; it stands for every pool at the gateway's site. Readers must validate it.
    coords: dict[str, Any] | None = None


def encode(record: PoolRecord | GatewayRecord) -> bytes:
    return orjson.dumps(dataclasses.asdict(record))


def decode_pool(raw: bytes) -> PoolRecord:
    """Raises ValueError (or TypeError, KeyError) on a value another version or a person wrote badly."""
    d = orjson.loads(raw)
    site = SiteConfig(**d["site"]) if d.get("site") else None
    kind = next((k for k in POOL_KINDS if k == (d.get("kind") or "meshgate")), None)
    if kind is None:
        raise ValueError(f"unknown pool kind {d.get('kind')!r}")
    return PoolRecord(id=str(d["id"]), url=str(d["url"]), site=site, models=tuple(d.get("models") or ()),
                      capacity=int(d.get("capacity") or 0), kind=kind,
                      coords=d.get("coords"), draining=bool(d.get("draining", False)),
                      capabilities=tuple(str(c) for c in d.get("capabilities") or ()))


def decode_gateway(raw: bytes) -> GatewayRecord:
    d = orjson.loads(raw)
    site = SiteConfig(**d["site"]) if d.get("site") else None
    return GatewayRecord(id=str(d["id"]), url=str(d["url"]), site=site, coords=d.get("coords"))


def site_of(cfg: Config, site_id: str | None) -> SiteConfig | None:
    """The config's entry for a site; a bare id when the config names it without describing it."""
    if site_id is None:
        return None
    for s in cfg.sites:
        if s.id == site_id:
            return s
    return SiteConfig(id=site_id)


def pool_record(cfg: Config, pool: PoolConfig) -> PoolRecord:
    capacity = pool.engine.max_num_seqs if pool.kind == "meshgate" else 0
    caps = pool.capabilities if pool.capabilities is not None else capabilities.default_for(pool.kind)
    return PoolRecord(id=pool.id, url=pool.base_url, site=site_of(cfg, pool.site), models=pool.served_models,
                      capacity=capacity, kind=pool.kind, capabilities=tuple(sorted(caps)))
