"""meshgate command line: `meshgate worker ...` (DESIGN.md §8)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from gateway.config import ConfigError, load_config

log = logging.getLogger("meshgate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshgate", description="latency-aware inference router and pool worker")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run one pool worker (OpenAI HTTP API over a batching engine)")
    w.add_argument("--config", default="configs/local.yaml", help="YAML config (default: configs/local.yaml)")
    w.add_argument("--pool", help="pool id in the config (default: the first pool)")
    w.add_argument("--host", help="listen address (default: the pool's host)")
    w.add_argument("--port", type=int, help="listen port (default: the pool's port)")
    w.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config)
        if args.command == "worker":
            pool = cfg.pool(args.pool)
            return _run(_worker(pool, args.host or pool.host, args.port or pool.port))
    except ConfigError as e:
        print(f"meshgate: config error: {e}", file=sys.stderr)
        return 2
    return 2


def _run(coro) -> int:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _worker(pool, host: str, port: int) -> int:  # type: ignore[no-untyped-def]
    from aiohttp import web

    from gateway.worker.server import WorkerServer

    server = WorkerServer(pool)
    runner = web.AppRunner(server.make_app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=pool.drain_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        print(f"meshgate: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        await runner.cleanup()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(server.start_engine())
    done, _ = await asyncio.wait([loading, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if loading in done and loading.exception() is None:
        log.info("listening http=%s:%d grpc=off pool=%s model=%s", host, port, pool.id, pool.model.name)
        await stop.wait()
        log.info("stopping: draining in-flight requests (up to %g s)", pool.drain_timeout_s)
        rc = 0
    elif loading in done:
        print(f"meshgate: cannot load the model: {loading.exception()}", file=sys.stderr)
        rc = 1
    else:
        loading.cancel()
        rc = 0
    await runner.cleanup()
    return rc


if __name__ == "__main__":
    sys.exit(main())
