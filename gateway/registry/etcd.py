"""A thin session over aetcd: TLS and auth, one endpoint at a time (the next one after a failure),
and a timeout on every call, so that a partitioned etcd (which answers nothing) cannot hang a
gateway's or a worker's background task."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import DiscoveryConfig

log = logging.getLogger("meshgate.registry")
T = TypeVar("T")


class RegistryUnavailable(Exception):
    """etcd did not answer in time, refused us, or the connection broke."""


def _is_etcd_error(e: BaseException) -> bool:
    import aetcd
    import grpc

    return isinstance(e, (aetcd.ClientError, grpc.RpcError, OSError, asyncio.TimeoutError))


def _client_class() -> type:
    """aetcd.Client that can speak TLS (aetcd opens insecure channels only) and bounds its login."""
    import aetcd
    import grpc
    from aetcd import rpc, watcher

    class Client(aetcd.Client):  # type: ignore[misc]
        def __init__(self, credentials: grpc.ChannelCredentials | None, **kw: Any):
            super().__init__(**kw)
            self._credentials = credentials

        async def connect(self) -> None:
            if self._connected.is_set():
                return
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            self.channel = (rpc.insecure_channel(target, options=options) if self._credentials is None
                            else rpc.secure_channel(target, self._credentials, options=options))
            if self._username is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()

    return Client


class EtcdSession:
    """One connection to one etcd member. Every method raises RegistryUnavailable on any failure;
    the caller closes the session and opens another (reconnect() moves to the next endpoint)."""

    def __init__(self, cfg: DiscoveryConfig):
        self.cfg = cfg
        self._next = 0
        self._client: Any = None
        self.endpoint = ""

    def _credentials(self) -> Any:
        if self.cfg.ca_file is None and self.cfg.cert_file is None:
            return None
        import grpc

        def read(p: str | None) -> bytes | None:
            return Path(p).expanduser().read_bytes() if p else None

        return grpc.ssl_channel_credentials(read(self.cfg.ca_file), read(self.cfg.key_file), read(self.cfg.cert_file))

    async def reconnect(self) -> None:
        await self.close()
        self.endpoint = self.cfg.endpoints[self._next % len(self.cfg.endpoints)]
        self._next += 1
        host, _, port = self.endpoint.rpartition(":")
        try:
            self._client = _client_class()(
                self._credentials(), host=host, port=int(port), username=self.cfg.username,
                password=self.cfg.password, timeout=self.cfg.timeout_s,
                # fail fast while etcd is down instead of waiting for the channel to come back
                options={"grpc.enable_retries": 0, "grpc.initial_reconnect_backoff_ms": 100,
                         "grpc.max_reconnect_backoff_ms": 1000})
        except OSError as e:  # a TLS file that cannot be read
            raise RegistryUnavailable(f"etcd {self.endpoint}: {e}") from e
        await self._call(self._client.connect())

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), self.cfg.timeout_s)
            except Exception as e:  # noqa: BLE001 - closing a broken channel may fail in many ways
                log.debug("closing etcd session: %r", e)

    async def _call(self, aw: Awaitable[T]) -> T:
        if self._client is None:
            raise RegistryUnavailable("not connected")
        try:
            return await asyncio.wait_for(aw, self.cfg.timeout_s)
        except Exception as e:
            if _is_etcd_error(e):
                raise RegistryUnavailable(f"etcd {self.endpoint}: {e!r}") from e
            raise

    async def list_prefix(self, prefix: str) -> tuple[int, list[tuple[str, bytes]]]:
        """(store revision, [(key, value)]) of every key under prefix, read linearizably."""
        r = await self._call(self._client.get_prefix(prefix.encode()))
        return r.header.revision, [(kv.key.decode(), kv.value) for kv in r]

    async def confirm(self, prefix: str) -> int:
        """A cheap linearizable read (a count): proves a quorum answers us. Returns the revision."""
        from aetcd import rpc
        from aetcd.utils import prefix_range_end

        c = self._client
        req = rpc.RangeRequest(key=prefix.encode(), range_end=prefix_range_end(prefix.encode()), count_only=True)
        resp = await self._call(c.kvstub.Range(req, timeout=self.cfg.timeout_s, metadata=c.metadata))
        return int(resp.header.revision)

    async def grant(self, ttl_s: int) -> int:
        return int((await self._call(self._client.lease(ttl_s))).id)

    async def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; its remaining TTL, <= 0 when etcd no longer has it."""
        reply = await self._call(self._client.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke(self, lease_id: int) -> None:
        await self._call(self._client.revoke_lease(lease_id))

    async def put(self, key: str, value: bytes, lease_id: int) -> None:
        await self._call(self._client.put(key.encode(), value, lease=lease_id))

    async def delete(self, key: str) -> None:
        await self._call(self._client.delete(key.encode()))

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[tuple[str, str, bytes]]:
        """(PUT | DELETE, key, value) for every change under prefix from start_revision on.
        Ends by raising RegistryUnavailable when the stream breaks (never ends quietly)."""
        w = await self._call(self._client.watch_prefix(prefix.encode(), start_revision=start_revision))
        try:
            async for ev in w:
                yield ev.kind, ev.kv.key.decode(), ev.kv.value
        except Exception as e:
            if _is_etcd_error(e):
                raise RegistryUnavailable(f"etcd {self.endpoint}: watch broke: {e!r}") from e
            raise
        finally:
            try:
                await asyncio.wait_for(w.cancel(), self.cfg.timeout_s)
            except Exception:  # noqa: BLE001 - the stream is gone already
                pass
        raise RegistryUnavailable(f"etcd {self.endpoint}: watch ended")


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait until it is done. Cancels again while it lives: on Python 3.11 a
    cancellation that lands as an inner wait_for completes can be swallowed (CPython gh-86296),
    and one swallowed cancel must not leave a stop() waiting forever."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())


class Backoff:
    """Reconnect delays: doubling from 0.1 s to a cap, with jitter so that many gateways that lost
    etcd together do not all come back in the same instant."""

    def __init__(self, max_s: float):
        self.max_s = max_s
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self) -> None:
        import random

        delay = min(self.max_s, 0.1 * 2 ** self.attempt)
        self.attempt += 1
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
