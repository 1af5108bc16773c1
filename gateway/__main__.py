"""meshgate command line (DESIGN.md §8): up | serve | worker | hash-key | build-engine."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from gateway.config import Config, ConfigError, PoolConfig, load_config

if TYPE_CHECKING:
    from gateway.api.app import SharedState
    from gateway.rpc.server import RpcFront

log = logging.getLogger("meshgate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshgate", description="latency-aware inference router and pool worker")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="the embedded default: the config's local pool workers and a gateway")
    serve = sub.add_parser("serve", help="run one edge gateway")
    worker = sub.add_parser("worker", help="run one pool worker (OpenAI HTTP API over a batching engine)")
    for p in (up, serve, worker):
        p.add_argument("--config", default="configs/local.yaml", help="YAML config (default: configs/local.yaml)")
        p.add_argument("--port", type=int, help="HTTP port (default: from the config)")
        p.add_argument("--log-level", default="INFO")
    for p in (serve, worker):
        p.add_argument("--host", help="listen address (default: from the config)")
    for p in (up, serve):
        p.add_argument("--grpc-port", type=int, help="gRPC port (default: from the config; none: gRPC off)")
    serve.add_argument("--workers", type=int, help="gateway processes sharing the port, e.g. one per core "
                                                   "(default: gateway.workers in the config, 1)")
    worker.add_argument("--pool", help="pool id in the config (default: the first pool)")
    sub.add_parser("hash-key", help="print the sha256 of an API key read from stdin (for gateway.auth keys)")
    build = sub.add_parser("build-engine", help="export a model's dense segments to ONNX and build TensorRT engines")
    build.add_argument("--model", required=True, help="a Hugging Face Llama folder")
    build.add_argument("--out", help="engine root (default: ~/.cache/meshgate/engines, where tensorrt workers look)")
    build.add_argument("--dtype", choices=sorted(_BUILD_DTYPES), default="fp16")
    build.add_argument("--max-tokens", type=int, help="token budget of a step: the pool's engine.max_num_batched_tokens")
    build.add_argument("--max-seqs", type=int, help="sequences in a step: the pool's engine.max_num_seqs")
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        return _hash_key()
    if args.command == "build-engine":
        return _build_engine(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config)
        if args.command == "worker":
            pool = cfg.pool(args.pool)
            return _run(_worker(cfg, pool, args.host or pool.host, args.port or pool.port))
        gw = cfg.gateway
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(gw, host=getattr(args, "host", None) or gw.host,
                                                                   port=args.port or gw.port,
                                                                   grpc_port=_given(args.grpc_port, gw.grpc_port)))
        if args.command == "serve":
            if args.workers is not None:
                if not 1 <= args.workers <= 256:
                    raise ConfigError(f"--workers: expected 1..256, got {args.workers}")
                cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, workers=args.workers))
            if cfg.gateway.workers > 1:
                from gateway.supervisor import serve_workers

                return serve_workers(cfg, lambda c, shared, i: _run(_serve(c, shared, i)))  # type: ignore[arg-type]
            return _run(_serve(cfg))
        # The embedded default runs one gateway process beside its pool workers.
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, workers=1))
        return _run(_up(cfg, args.config, args.log_level))
    except ConfigError as e:
        print(f"meshgate: config error: {e}", file=sys.stderr)
        return 2


def _given(value: int | None, default: int | None) -> int | None:
    return default if value is None else value


def _hash_key() -> int:
    """Keys are configured by digest only; this turns a key into the digest to put in config."""
    from gateway.api.auth import hash_key

    # From a terminal, read without echo; from a pipe, the whole input (one trailing newline is not part of it).
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.read()
    key = key.strip()
    if not key:
        print("meshgate: hash-key: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


_BUILD_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _build_engine(args: argparse.Namespace) -> int:
    """ONNX export on any machine, engines where there is a GPU and TensorRT; the profile is the
    one a worker with these limits asks for, so it finds them (gateway/worker/trt_build.py)."""
    from gateway.config import EngineConfig
    from gateway.worker.trt_build import build_engine_command  # torch lives behind this import

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    d = EngineConfig()
    try:
        return build_engine_command(args.model, args.out, _BUILD_DTYPES[args.dtype],
                                    args.max_tokens or d.max_num_batched_tokens, args.max_seqs or d.max_num_seqs)
    except (OSError, ValueError) as e:  # no such folder, not a Llama checkpoint, ...
        print(f"meshgate: build-engine: {e}", file=sys.stderr)
        return 2


def _run(coro: Awaitable[int]) -> int:
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
    """The pool worker's aiohttp app."""

    def __init__(self, app: web.Application, drain_timeout_s: float):
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=drain_timeout_s)

    async def bind(self, host: str, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    async def close(self) -> None:
        await self.runner.cleanup()


async def _run_server(front: _Front, host: str, port: int, what: str,
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
        log.info("listening http=%s:%d grpc=%s %s", host, port, grpc_addr, what)
        if on_ready is not None:
            on_ready()
        await stop.wait()
        if before_drain is not None:
            await before_drain()
        log.info("stopping: draining in-flight requests")
    await front.close()
    return rc


async def _worker(cfg: Config, pool: PoolConfig, host: str, port: int) -> int:
    from gateway.discovery import pool_registrant
    from gateway.worker.server import WorkerServer  # torch lives behind this import

    server = WorkerServer(pool)
    reg = pool_registrant(cfg, pool)  # None with static discovery

    async def leave() -> None:  # gateways stop sending before the drain starts
        assert reg is not None
        await reg.stop()
        await asyncio.sleep(cfg.discovery.deregister_wait_s)

    return await _run_server(_AiohttpFront(server.make_app(), pool.drain_timeout_s), host, port,
                             f"pool={pool.id} model={pool.model.name}", ready=server.start_engine(),
                             on_ready=reg.start if reg else None,
                             before_drain=leave if reg else None)


async def _serve(cfg: Config, shared: SharedState | None = None, index: int = 0) -> int:
    """One gateway process; with gateway.workers > 1, worker `index` of them (gateway/supervisor.py)."""
    from gateway.api.app import GatewayServer
    from gateway.discovery import attach_gateway
    from gateway.rpc.server import RpcFront

    gw = cfg.gateway
    server = GatewayServer(cfg, shared, index)
    attach_gateway(server, cfg, register=index == 0)  # discovery etcd: pools from the registry; static: nothing
    rpc: RpcFront | None = None
    if gw.grpc_port is not None and index == 0:
        rpc = RpcFront(server, gw.host, gw.grpc_port)
        # On shutdown, after HTTP stops listening and before the upstreams close: gRPC calls drain too.
        server.on_shutdown.append(lambda: rpc.stop(gw.drain_timeout_s))  # type: ignore[union-attr]
    return await _run_server(server, gw.host, gw.port,
                             f"site={gw.site} pools={len(cfg.pools)} discovery={cfg.discovery.kind}", grpc=rpc)


async def _up(cfg: Config, config_path: str, log_level: str) -> int:
    """Start the config's meshgate pools as worker processes (the first alone, so it makes the
    shared model cache before the others look for it), then the gateway in this process."""
    local = [p for p in cfg.pools if p.kind == "meshgate"]
    workers: list[_WorkerProcess] = []
    proxies = []
    try:
        for group in (local[:1], local[1:]):
            started = [await _WorkerProcess.start(p, config_path, log_level) for p in group]
            workers += started
            for w in started:
                if not await w.ready():
                    print(f"meshgate: pool {w.pool.id} did not start: {w.last_line}", file=sys.stderr)
                    return 1
        proxies = await _start_links(cfg)
        gw = cfg.gateway
        grpc = "" if gw.grpc_port is None else f" grpc {gw.host}:{gw.grpc_port}"
        print(f"meshgate is up: gateway http://{gw.host}:{gw.port}/v1{grpc}\n"
              f"  mesh from {gw.site}: {_mesh_line(cfg)}", file=sys.stderr, flush=True)
        return await _serve(cfg)
    finally:
        await asyncio.gather(*(px.stop() for px in proxies))
        await asyncio.gather(*(w.stop() for w in workers))


async def _start_links(cfg: Config) -> list:  # type: ignore[type-arg]
    """A delaying proxy for each pool whose link to the gateway is emulated (emulate_rtt_ms)."""
    from urllib.parse import urlsplit

    from gateway.emulate import DelayProxy

    proxies = []
    for p in cfg.pools:
        if p.emulate_rtt_ms is None:
            continue
        u = urlsplit(p.base_url)
        px = DelayProxy((u.hostname or "127.0.0.1", u.port or 80), (p.host, p.port), p.emulate_rtt_ms,
                        jitter_ms=0.05 * p.emulate_rtt_ms)
        await px.start()
        proxies.append(px)
    return proxies


def _mesh_line(cfg: Config) -> str:
    sites = {s.id: s for s in cfg.sites}
    parts = []
    for p in cfg.pools:
        s = sites.get(p.site or "")
        where = f"{s.name or s.id}, {s.country}" if s else (p.site or "?")
        rtt = f" {p.emulate_rtt_ms:g} ms" if p.emulate_rtt_ms is not None else ""
        parts.append(f"{p.id} ({where}){rtt}")
    return " | ".join(parts)


class _WorkerProcess:
    def __init__(self, pool: PoolConfig, proc: asyncio.subprocess.Process):
        self.pool = pool
        self.proc = proc
        self.last_line = ""
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, pool: PoolConfig, config_path: str, log_level: str) -> _WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "worker", "--config", config_path, "--pool", pool.id,
            "--log-level", log_level, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        return cls(pool, proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.last_line = line or self.last_line
            print(f"[{self.pool.id}] {line}", file=sys.stderr, flush=True)
            if "listening http=" in line:
                self._ready.set()

    async def ready(self) -> bool:
        waiter = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait([waiter, self._reader], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        return self._ready.is_set()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), self.pool.drain_timeout_s + 5)
            except TimeoutError:
                self.proc.kill()
        await asyncio.gather(self._reader, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main())
