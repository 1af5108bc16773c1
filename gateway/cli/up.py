"""`meshgate up`: the embedded default mesh on one machine. The config's meshgate pools run as
worker processes, links with `emulate_rtt_ms` get a delaying proxy (gateway/cli/emulate.py), and
the gateway runs in this process."""
from __future__ import annotations

import asyncio
import signal
import sys
from urllib.parse import urlsplit

from gateway.cli.emulate import DelayProxy
from gateway.cli.run import serve
from gateway.config import Config, PoolConfig


async def up(cfg: Config, config_path: str, log_level: str) -> int:
    """Start the config's meshgate pools as worker processes (the first alone, so it makes the
    shared model cache before the others look for it), then the gateway in this process."""
    local = [p for p in cfg.pools if p.kind == "meshgate"]
    workers: list[_WorkerProcess] = []
    proxies: list[DelayProxy] = []
    # Until serve() takes SIGINT/SIGTERM over, either one stops the start-up and the finally below
    # stops the workers already started (SIGTERM's default would exit at once and orphan them).
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _cancel_once, task)
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
        scheme = "https" if gw.tls.enabled else "http"
        print(f"meshgate is up: gateway {scheme}://{gw.host}:{gw.port}/v1{grpc}\n"
              f"  mesh from {gw.site}: {_mesh_line(cfg)}", file=sys.stderr, flush=True)
        return await serve(cfg)
    except asyncio.CancelledError:
        print("meshgate: stopped while starting", file=sys.stderr, flush=True)
        return 0
    finally:
        await asyncio.gather(*(px.stop() for px in proxies))
        await asyncio.gather(*(w.stop() for w in workers))


def _cancel_once(task: asyncio.Task[int]) -> None:
    if not task.cancelling():  # a second signal must not cut the workers' stop short
        task.cancel()


async def _start_links(cfg: Config) -> list[DelayProxy]:
    """A delaying proxy for each pool whose link to the gateway is emulated (emulate_rtt_ms)."""
    proxies = []
    for p in cfg.pools:
        if p.emulate_rtt_ms is None:
            continue
        u = urlsplit(p.base_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        px = DelayProxy((u.hostname or "127.0.0.1", port), (p.host, p.port), p.emulate_rtt_ms,
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
