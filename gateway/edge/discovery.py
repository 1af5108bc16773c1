"""Glue between the etcd registry (gateway/registry) and the two servers: a gateway follows the
registry's pool set and registers itself; a worker registers its pool. Only with discovery: etcd;
static discovery changes nothing. A gateway's side gets only what it touches: its geography, its
upstreams, its lifecycle hooks and its metrics registry (Gateway.follow_registry hands them over)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.config import Config, PoolConfig
from gateway.registry import GatewayRecord, PoolRecord, Registrant, RegistryView, pool_record, site_of
from gateway.registry.records import GATEWAYS, POOLS, encode

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.edge.gateway import Lifecycle
    from gateway.pools.upstream import Upstreams
    from gateway.routing.geo_view import GeoView

log = logging.getLogger("meshgate.registry")


def gateway_record(cfg: Config) -> GatewayRecord:
    gw, d = cfg.gateway, cfg.discovery
    host = socket.gethostname() if gw.host in ("0.0.0.0", "::", "") else gw.host
    gid = d.instance_id or f"{gw.site}-{socket.gethostname()}-{gw.port}"
    scheme = "https" if gw.tls.enabled else "http"
    return GatewayRecord(id=gid, url=d.advertise_url or f"{scheme}://{host}:{gw.port}", site=site_of(cfg, gw.site))


@dataclasses.dataclass(frozen=True)
class Discovery:
    """A gateway following the registry: the watched view, and the gateway list it serves."""

    view: RegistryView
    gateway_list: Callable[[], list[dict[str, object]]]


def attach_gateway(cfg: Config, geo: GeoView, upstreams: Upstreams, lifecycle: Lifecycle,
                   metrics: CollectorRegistry, register: bool = True) -> Discovery | None:
    """With discovery etcd: the gateway's pools follow the registry (the YAML's pools, if any, are
    only the view until etcd first answers); it registers itself; /metrics gains
    meshgate_registry_stale_seconds; the registry's gateways are listed (Discovery.gateway_list).
    register: False for all but one of several processes of one gateway (they are one gateway)."""
    d = cfg.discovery
    if d.kind != "etcd":
        return None
    view = RegistryView(d)
    me = gateway_record(cfg)

    def current() -> GatewayRecord:
        # Our network coordinate as it stands: re-read at every (re)publish, so the entry follows
        # the node as probes move it.
        return dataclasses.replace(me, coords=geo.coord().to_dict())

    view.on_change.append(_Follower(geo, upstreams, view, cfg, me.id))
    metrics.register(view.collector())
    registrant = Registrant(d, f"{d.prefix}{GATEWAYS}{me.id}", lambda: encode(current()))

    async def start() -> None:
        await view.start(wait_s=2 * d.timeout_s)
        if register:
            registrant.start()

    async def deregister() -> None:
        if register:
            await registrant.stop()

    async def stop() -> None:
        await view.stop()

    lifecycle.on_start.append(start)  # after the gateway's own start: probes of registry pools need its client
    lifecycle.on_shutdown.append(deregister)
    lifecycle.on_stop.append(stop)
    return Discovery(view, lambda: [dataclasses.asdict(g) for g in sorted(view.gateways.values(), key=lambda g: g.id)]
                     or [dataclasses.asdict(current())])


class _Follower:
    """Sets the gateway's pools to the registry's, plus lapsed ones (key gone without a drain)
    that still answer: etcd may have expired a live pool's lease because the pool, not the pool's
    process, lost etcd (a partition), and a lost registry must not stop traffic. A lapsed pool is
    probed at once; it stays while it answers after the lapse, for up to `grace_s`, unless it
    registers again (then it is simply back)."""

    def __init__(self, geo: GeoView, upstreams: Upstreams, view: RegistryView, cfg: Config, me: str):
        self.geo = geo
        self.upstreams = upstreams
        self.view = view
        self.me = me  # our own gateway entry: its coordinate is ours, not a neighbour's
        probe = cfg.gateway.probe
        self.check_s = probe.timeout_s + 0.1  # time for the probe fired at the lapse to answer
        self.grace_s = 2 * cfg.discovery.lease_ttl_s + cfg.discovery.backoff_max_s
        self._probed: set[str] = set()
        self._routable: dict[str, PoolRecord] | None = None  # the pool set last given to Upstreams
        self._recheck: asyncio.TimerHandle | None = None

    def __call__(self, pools: dict[str, PoolRecord] | None = None) -> None:
        geo = self.geo
        # Gateways' coordinates: a pool stands at its site's gateway's (gateway/routing/geo_view.py).
        geo.set_remote_coords((g.id, g.site.id if g.site else None, g.coords)
                              for g in self.view.gateways.values() if g.id != self.me)
        # A gateway describes its site from its own config: it places the site even where a
        # worker's entry only names it.
        geo.add_sites([g.site for g in self.view.gateways.values() if g.site is not None])
        routable = dict(self.view.pools)
        for pid, rec in self._lapsed_alive().items():
            routable.setdefault(pid, rec)
        if routable == self._routable:
            # Only a gateway entry changed (every republish carries a fresh coordinate): the pool
            # set is the same, and set_pools would only re-sort the candidate order for nothing.
            return
        self._routable = routable
        geo.add_sites([r.site for r in routable.values() if r.site is not None])
        self.upstreams.set_pools([r.pool_config() for r in routable.values()])

    def _lapsed_alive(self) -> dict[str, PoolRecord]:
        now = time.monotonic()
        alive: dict[str, PoolRecord] = {}
        for pid, (rec, since) in list(self.view.lapsed.items()):
            pool = self.upstreams.pools.get(pid)
            answered = pool is not None and pool.endpoint.load_at > since
            if pid in self.view.pools or pool is None or now - since > self.grace_s or (
                    not answered and now - since > self.check_s):
                del self.view.lapsed[pid]
                self._probed.discard(pid)
                if pid not in self.view.pools:
                    log.info("registry: pool %s left (lease lapsed%s)", pid, ", answering" if answered else "")
                continue
            alive[pid] = rec
            if pid not in self._probed and self.upstreams.client is not None:
                self._probed.add(pid)
                asyncio.ensure_future(self.upstreams.probe(pool))
        if alive and self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(self.check_s, self._again)
        return alive

    def _again(self) -> None:
        self._recheck = None
        self()


def pool_registrant(cfg: Config, pool: PoolConfig) -> Registrant | None:
    """The worker's entry, registered once its engine is ready; None with static discovery."""
    d = cfg.discovery
    if d.kind != "etcd":
        return None
    record = pool_record(cfg, pool)
    return Registrant(d, f"{d.prefix}{POOLS}{pool.id}", lambda: encode(record),
                      farewell=lambda: encode(dataclasses.replace(record, draining=True)))
