"""Running one server process until SIGINT/SIGTERM: a gateway (`meshgate serve`) or a pool worker
(`meshgate worker`), with the listening line DESIGN.md §8 promises and a drain at the end."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from gateway.config import Config, PoolConfig, TlsServerConfig
from gateway.core.tls import CertExpiryCollector, ServerTls

if TYPE_CHECKING:
    from gateway.edge.gateway import SharedState
    from gateway.rpc.server import RpcFront

log = logging.getLogger("meshgate")


def run(coro: Awaitable[int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


class _Front(Protocol):
    """A server's listening side: bind it (OSError when the port is taken), close it (draining)."""

    async def bind(self, host: str, port: int) -> None: ...

    async def close(self) -> None: ...


class _AiohttpFront:
    """The pool worker's aiohttp app; with pools[].tls, served over TLS (mutual TLS when it requires
    client certificates), the certificate re-read when its files change (gateway/core/tls.py)."""

    def __init__(self, app: web.Application, drain_timeout_s: float, tls: TlsServerConfig | None = None):
        self.tls = ServerTls(tls.files()) if tls is not None and tls.enabled else None
        self.handshake_timeout_s = tls.handshake_timeout_s if tls is not None else None
        if tls is not None and tls.allowed_client_names:
            from gateway.worker.tls_names import client_name_middleware

            app.middlewares.append(client_name_middleware(frozenset(tls.allowed_client_names)))
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=drain_timeout_s)
        self._listener: asyncio.Server | None = None

    async def bind(self, host: str, port: int) -> None:
        await self.runner.setup()
        if self.tls is None:
            await web.TCPSite(self.runner, host, port).start()
            return
        # TLS: the listening socket made here rather than by a TCPSite, which cannot bound the handshake
        server = self.runner.server
        assert server is not None
        self._listener = await asyncio.get_running_loop().create_server(
            server, host, port, ssl=self.tls.context, ssl_handshake_timeout=self.handshake_timeout_s,
            backlog=128, reuse_address=True)

    async def close(self) -> None:
        if self._listener is not None:  # stop accepting first, as runner.cleanup does with its sites
            self._listener.close()
        await self.runner.cleanup()


async def run_server(front: _Front, host: str, port: int, what: str,
                      ready: Awaitable[None] | None = None, grpc: RpcFront | None = None,
                      on_ready: Callable[[], None] | None = None,
                      before_drain: Callable[[], Awaitable[None]] | None = None) -> int:
    """Bind, wait until ready, log the listening line, serve until SIGINT/SIGTERM, then drain.
    The gRPC front, when given, binds after HTTP (its calls need the upstreams HTTP's startup opens).
    on_ready / before_drain: a worker registers in etcd once ready, and leaves it before draining."""
    try:
        await front.bind(host, port)
    except OSError as e:
        print(f"meshgate: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        return 1
    grpc_addr = "off"
    if grpc is not None:
        try:
            grpc_addr = await grpc.start()
        except OSError as e:
            print(f"meshgate: cannot listen on {grpc.address} (gRPC): {e.strerror or e}", file=sys.stderr)
            await front.close()
            return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rc = 0
    if ready is not None:
        loading = asyncio.ensure_future(ready)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            loading.cancel()
        elif loading.exception() is not None:
            print(f"meshgate: cannot start: {loading.exception()}", file=sys.stderr)
            rc = 1
    if rc == 0 and not stop.is_set():
        # Logged whatever --log-level says (DESIGN §8: scripts and `meshgate up` wait for this line)
        log.log(max(logging.INFO, log.getEffectiveLevel()), "listening http=%s:%d grpc=%s %s", host, port,
                grpc_addr, what)
        if on_ready is not None:
            on_ready()
        await stop.wait()
        if before_drain is not None:
            await before_drain()
        log.info("stopping: draining in-flight requests")
    await front.close()
    return rc


async def worker(cfg: Config, pool: PoolConfig, host: str, port: int) -> int:
    from gateway.edge.discovery import pool_registrant
    from gateway.worker.server import WorkerServer  # torch lives behind this import

    server = WorkerServer(pool)
    reg = pool_registrant(cfg, pool)  # None with static discovery

    async def leave() -> None:  # gateways stop sending before the drain starts
        assert reg is not None
        await reg.stop()
        await asyncio.sleep(cfg.discovery.deregister_wait_s)

    server.metrics.registry.register(CertExpiryCollector({"pool": pool.tls.cert_file}))
    return await run_server(_AiohttpFront(server.make_app(), pool.drain_timeout_s, pool.tls), host, port,
                             f"pool={pool.id} model={pool.model.name}", ready=server.start_engine(),
                             on_ready=reg.start if reg else None,
                             before_drain=leave if reg else None)


async def serve(cfg: Config, shared: SharedState | None = None, index: int = 0) -> int:
    """One gateway process; with gateway.workers > 1, worker `index` of them (gateway/edge/supervisor.py)."""
    from gateway.api.app import GatewayServer
    from gateway.rpc.server import RpcFront

    gw = cfg.gateway
    server = GatewayServer(cfg, shared, index)
    server.follow_registry(cfg, register=index == 0)  # discovery etcd: pools from the registry; static: nothing
    rpc: RpcFront | None = None
    if gw.grpc_port is not None and index == 0:
        rpc = RpcFront(server, gw.host, gw.grpc_port)
        # On shutdown, after HTTP stops listening and before the upstreams close: gRPC calls drain too.
        front = rpc
        server.lifecycle.on_shutdown.append(lambda: front.stop(gw.drain_timeout_s))
    return await run_server(server, gw.host, gw.port,
                             f"site={gw.site} pools={len(cfg.pools)} discovery={cfg.discovery.kind}", grpc=rpc)
