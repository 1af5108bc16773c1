"""Keep one key in etcd under a lease while this process lives: a pool's or a gateway's entry."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.config import DiscoveryConfig
from gateway.registry.etcd import Backoff, EtcdSession, RegistryUnavailable, cancel_and_wait

log = logging.getLogger("meshgate.registry")


class Registrant:
    """Puts `key` with a lease of cfg.lease_ttl_s, refreshes the lease every third of it and
    rewrites the value every cfg.republish_s (value() is called again: fresh coordinates). Survives
    etcd outages: it reconnects with backoff and, when the lease died meanwhile, takes a new one.
    stop(deregister=True) deletes the key first (watches see it at once), then revokes the lease."""

    def __init__(self, cfg: DiscoveryConfig, key: str, value: Callable[[], bytes],
                 farewell: Callable[[], bytes] | None = None):
        """farewell: a value put just before the key is deleted on deregistration (a pool's
        `draining: true`), so watchers can tell a drain from a lapsed lease."""
        self.cfg = cfg
        self.key = key
        self.value = value
        self.farewell = farewell
        self.registered = asyncio.Event()  # the key is in etcd (as far as we know)
        self._session = EtcdSession(cfg)
        self._lease: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Returns at once: registration goes on in the background, so a worker serves (and
        static gateways reach it) even while etcd is away."""
        self._task = asyncio.create_task(self._run(), name=f"registrant {self.key}")

    async def _run(self) -> None:
        backoff = Backoff(self.cfg.backoff_max_s)
        down_since: float | None = None
        while True:
            try:
                await self._session.reconnect()
                await self._register()
                if down_since is not None:
                    log.info("registry: %s registered again after %.1f s", self.key, time.monotonic() - down_since)
                down_since = None
                backoff.reset()
                await self._keep()
            except Exception as e:  # noqa: BLE001 - RegistryUnavailable, or a bug: retry either way
                if not isinstance(e, RegistryUnavailable):
                    log.exception("registry: unexpected failure keeping %s", self.key)
                self.registered.clear()
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("registry: cannot keep %s registered (%s); retrying", self.key, e)
                await self._session.close()
                await backoff.sleep()

    async def _register(self) -> None:
        # After an outage the old lease may live on (etcd extends leases across its restarts):
        # keep it, so the key is never briefly absent; else take a new one.
        if self._lease is None or await self._session.keepalive(self._lease) <= 0:
            self._lease = await self._session.grant(self.cfg.lease_ttl_s)
        await self._session.put(self.key, self.value(), self._lease)
        self.registered.set()

    async def _keep(self) -> None:
        assert self._lease is not None
        period_s = self.cfg.lease_ttl_s / 3
        next_put = time.monotonic() + self.cfg.republish_s
        while True:
            await asyncio.sleep(period_s)
            if await self._session.keepalive(self._lease) <= 0:
                log.warning("registry: lease of %s expired; registering again", self.key)
                self._lease = None
                raise RegistryUnavailable("lease lost")
            if time.monotonic() >= next_put:
                await self._session.put(self.key, self.value(), self._lease)
                next_put = time.monotonic() + self.cfg.republish_s

    async def stop(self, deregister: bool = True) -> None:
        """deregister=False leaves the key to expire with its lease (what a crash does; tests use it)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if deregister and self._lease is not None:
            try:
                if self._session._client is None:
                    await self._session.reconnect()
                if self.farewell is not None:
                    await self._session.put(self.key, self.farewell(), self._lease)
                await self._session.delete(self.key)  # first: watchers drop us before the lease goes
                await self._session.revoke(self._lease)
                log.info("registry: %s deregistered", self.key)
            except RegistryUnavailable as e:
                log.warning("registry: could not deregister %s (%s); it expires in %d s", self.key, e,
                            self.cfg.lease_ttl_s)
        self.registered.clear()
        await self._session.close()
