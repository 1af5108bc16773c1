"""A gateway's view of the registry: list the prefix, then watch it; on any trouble keep the last
view (traffic never stops for etcd), say how stale it is, and resync (re-list, re-watch) with
backoff when etcd answers again."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.config import DiscoveryConfig
from gateway.registry.etcd import Backoff, EtcdSession, RegistryUnavailable, cancel_and_wait
from gateway.registry.records import GATEWAYS, POOLS, GatewayRecord, PoolRecord, decode_gateway, decode_pool

R = TypeVar("R", PoolRecord, GatewayRecord)
log = logging.getLogger("meshgate.registry")


class RegistryView:
    """pools and gateways as etcd last said. on_change(pools) runs after every change, on the
    event loop (it calls Upstreams.set_pools and GeoView.add_sites: cheap, synchronous)."""

    def __init__(self, cfg: DiscoveryConfig):
        self.cfg = cfg
        self.pools: dict[str, PoolRecord] = {}
        self.gateways: dict[str, GatewayRecord] = {}
        # Pools whose key vanished without a drain (lease lapsed: dead, or cut off from etcd), with
        # when; the gateway keeps routing to those that still answer (gateway/edge/discovery.py).
        self.lapsed: dict[str, tuple[PoolRecord, float]] = {}
        self.on_change: list[Callable[[dict[str, PoolRecord]], None]] = []
        self.synced = asyncio.Event()  # set after the first full list
        self.confirmed_at: float | None = None  # monotonic time the view was last known current
        self.started_at = time.monotonic()
        self.resyncs = 0
        self._session = EtcdSession(cfg)
        self._task: asyncio.Task[None] | None = None

    def stale_s(self) -> float:
        """Seconds since the view was last confirmed current (since start, before the first list)."""
        return time.monotonic() - (self.confirmed_at if self.confirmed_at is not None else self.started_at)

    async def start(self, wait_s: float) -> None:
        """Start syncing; wait up to wait_s for the first list, so a gateway starting next to a
        healthy etcd routes from its first request, and one starting without etcd starts anyway."""
        self._task = asyncio.create_task(self._run(), name="registry view")
        try:
            await asyncio.wait_for(self.synced.wait(), wait_s)
        except asyncio.TimeoutError:
            log.warning("registry: no view from etcd after %.1f s; starting with the configured pools", wait_s)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._session.close()

    async def _run(self) -> None:
        backoff = Backoff(self.cfg.backoff_max_s)
        lost_at: float | None = None
        while True:
            try:
                await self._session.reconnect()
                revision = await self._relist()
                if lost_at is not None:
                    log.info("registry: etcd %s is back after %.1f s; view resynced (%d pools)",
                             self._session.endpoint, time.monotonic() - lost_at, len(self.pools))
                    self.resyncs += 1
                lost_at = None
                backoff.reset()
                await self._follow(revision)
            except Exception as e:  # noqa: BLE001 - RegistryUnavailable, or a bug: either way, keep the view and retry
                if not isinstance(e, RegistryUnavailable):
                    log.exception("registry: unexpected failure; resyncing")
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("registry: lost etcd (%s); routing on the last view (%d pools) and probing",
                                e, len(self.pools))
                await self._session.close()
                await backoff.sleep()

    async def _relist(self) -> int:
        revision, items = await self._session.list_prefix(self.cfg.prefix)
        pools: dict[str, PoolRecord] = {}
        gateways: dict[str, GatewayRecord] = {}
        for key, value in items:
            self._apply(pools, gateways, "PUT", key, value)
        for pid in self.pools.keys() - pools.keys():  # vanished while we were not watching
            self._lapse(self.pools[pid])
        self.pools, self.gateways = pools, gateways
        self.confirmed_at = time.monotonic()
        self.synced.set()
        self._changed()
        return revision

    async def _follow(self, revision: int) -> None:
        """Apply watch events, and confirm the view every confirm_s: a partitioned etcd leaves a
        watch silent rather than broken, so silence alone proves nothing."""
        watching = asyncio.create_task(self._watch(revision))
        try:
            while not watching.done():
                await asyncio.wait([watching], timeout=self.cfg.confirm_s)
                if watching.done():
                    break
                await self._session.confirm(self.cfg.prefix)
                self.confirmed_at = time.monotonic()
            watching.result()  # re-raises the watch's failure
        finally:
            await cancel_and_wait(watching)

    async def _watch(self, revision: int) -> None:
        async for kind, key, value in self._session.watch(self.cfg.prefix, revision + 1):
            if self._apply(self.pools, self.gateways, kind, key, value):
                self._changed()
            self.confirmed_at = time.monotonic()

    def _apply(self, pools: dict[str, PoolRecord], gateways: dict[str, GatewayRecord], kind: str, key: str,
               value: bytes) -> bool:
        """One change into the given maps; False when it changes nothing we route on."""
        rel = key[len(self.cfg.prefix):]
        if rel.startswith(POOLS):
            return self._apply_to(pools, rel[len(POOLS):], kind, key, value, decode_pool)
        if rel.startswith(GATEWAYS):
            return self._apply_to(gateways, rel[len(GATEWAYS):], kind, key, value, decode_gateway)
        return False

    def _apply_to(self, table: dict[str, R], entry_id: str, kind: str, key: str, value: bytes,
                  decode: Callable[[bytes], R]) -> bool:
        if kind == "DELETE":
            gone = table.pop(entry_id, None)
            if isinstance(gone, PoolRecord) and table is self.pools:
                self._lapse(gone)
            return gone is not None
        try:
            record = decode(value)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("registry: ignoring %s: bad value (%r)", key, e)
            return False
        if table.get(entry_id) == record:
            return False  # a republish with nothing new
        if isinstance(record, PoolRecord) and record.draining:
            return table.pop(entry_id, None) is not None
        table[entry_id] = record
        self.lapsed.pop(entry_id, None)
        return True

    def _lapse(self, record: PoolRecord) -> None:
        if not record.draining:
            self.lapsed[record.id] = (record, time.monotonic())

    def _changed(self) -> None:
        for callback in self.on_change:
            callback(self.pools)

    def collector(self) -> _StaleCollector:
        return _StaleCollector(self)


class _StaleCollector:
    """meshgate_registry_stale_seconds, computed at scrape time (it grows by itself while etcd is away)."""

    def __init__(self, view: RegistryView):
        self.view = view

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meshgate_registry_stale_seconds",
                                "Seconds since the gateway's registry view was last confirmed current.",
                                value=self.view.stale_s())
        yield GaugeMetricFamily("meshgate_registry_pools", "Pools in the registry view.", value=len(self.view.pools))
