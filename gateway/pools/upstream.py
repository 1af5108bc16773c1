"""Upstream pools: one kept-alive HTTP client, per-pool state, probes and circuit breakers."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

import orjson

from gateway.config import PoolConfig, ProbeConfig, TlsClientConfig, UpstreamConfig
from gateway.pools.shared import SharedTable
from gateway.core import capabilities
from gateway.core.types import Endpoint, LoadReport
from gateway.core.wire import LOAD_HEADER
from gateway.pools.breaker import BreakerState, CircuitBreaker
from gateway.core.tls import ClientTls
from gateway.pools.h1client import HttpClient, UpstreamError
from gateway.pools.load import InFlight, load_table, num_workers

log = logging.getLogger("meshgate.pools")

RTT_ALPHA = 0.3
RTT_WINDOW = 20  # probe RTTs behind the windowed p90
CONN_WAIT_ALPHA = 0.3  # EWMA weight of one request's connection wait


class Pool:
    """One upstream pool: its routing view (endpoint), breaker and probe state."""

    def __init__(self, cfg: PoolConfig, up: UpstreamConfig, load: SharedTable, worker_index: int = 0):
        self.cfg = cfg
        self.endpoint = Endpoint(cfg.id, cfg.base_url, cfg.site, cfg.kind, frozenset(cfg.served_models),
                                 frozenset(cfg.capabilities) if cfg.capabilities is not None
                                 else capabilities.default_for(cfg.kind))
        self.requests = InFlight(load, f"pool:{cfg.id}", worker_index)  # across every gateway process
        self._sent_at_report = self.requests.sent
        self.sync()
        self.breaker = CircuitBreaker(up.breaker_failures, up.breaker_cooldown_s)
        self.probe_misses = 0
        self.probe_hits = 0
        self.has_metrics = True  # third-party pools: until /metrics proves useless
        self.rtt_window: deque[float] = deque(maxlen=RTT_WINDOW)  # recent probe RTTs, ms
        self._last_header = ""  # the last load header parsed, and the report made of it
        self._header_report: LoadReport | None = None
        self.max_connections = up.max_connections
        self.connections_per_slot = up.connections_per_slot
        self._slots = 0  # the batch slots the pool advertised last (0: none)
        self.on_cap: Callable[[Pool], None] | None = None  # told when connection_cap() changes
        # Told at once when the pool is marked down (probes missed, breaker opened, load stream lost):
        # requests waiting on it move instead of waiting out a timeout (edge/resume.py).
        self.down_watchers: set[Callable[[str], None]] = set()

    def connection_cap(self) -> int:
        """How many connections (requests at once) this gateway keeps to the pool: max_connections,
        or connections_per_slot x the slots it advertises when that is more."""
        return max(self.max_connections, math.ceil(self.connections_per_slot * self._slots))

    def connection_waited(self, waited_s: float) -> None:
        """A request got a connection after waiting waited_s (0: at once): the latency model's view."""
        e = self.endpoint
        e.connection_wait_s = (1 - CONN_WAIT_ALPHA) * e.connection_wait_s + CONN_WAIT_ALPHA * waited_s
        if e.connection_wait_s < 1e-4:
            e.connection_wait_s = 0.0

    def went_down(self, reason: str) -> None:
        for watcher in list(self.down_watchers):
            watcher(reason)

    def rtt_p90_ms(self) -> float | None:
        """The 90th percentile of the recent probe RTTs (nearest rank); None before any."""
        if not self.rtt_window:
            return None
        ordered = sorted(self.rtt_window)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    def refresh_breaker(self) -> None:
        self.endpoint.breaker_open = self.breaker.state == BreakerState.OPEN

    def record_success(self) -> None:
        self.breaker.success()
        self.endpoint.breaker_open = False

    def record_failure(self) -> None:
        was_open = self.endpoint.breaker_open
        self.breaker.failure()
        self.refresh_breaker()
        if self.endpoint.breaker_open and not was_open:
            self.went_down("circuit breaker open")

    def sent(self) -> None:
        """A request went to the pool: credited at once, so a burst spreads over pools."""
        self.requests.start()
        self.sync()

    def done(self) -> None:
        self.requests.end()
        self.endpoint.in_flight = self.requests.count

    def sync(self) -> None:
        """The endpoint's in-flight figures from the shared counts (other processes send too)."""
        self.endpoint.in_flight = self.requests.count
        self.endpoint.sent_since_report = int(self.requests.sent - self._sent_at_report)

    def update_load(self, report: LoadReport) -> None:
        if report.max_num_seqs != self._slots:
            self._slots = max(0, report.max_num_seqs)
            if self.on_cap is not None:
                self.on_cap(self)
        self.endpoint.load = report
        self.endpoint.load_at = time.monotonic()
        self._sent_at_report = self.requests.sent  # the pool's figures now include what was sent
        self.endpoint.sent_since_report = 0

    def load_from_header(self, headers: dict[str, str]) -> None:
        """The compact report on a response: queue and KV figures; the rates (prefill/decode speed,
        hot prefixes) only come with probes, so they are kept from the last full report."""
        value = headers.get(LOAD_HEADER)
        if value:
            self.load_from_compact(value)

    def load_from_compact(self, value: str) -> bool:
        """A report in the header's compact form (a response's header, a line of GET /load/stream).
        False if it does not parse."""
        if value == self._last_header and self._header_report is not None and self.endpoint.load is self._header_report:
            self.update_load(self._header_report)  # the same figures again (no probe since): fresh, not new
            return True
        try:
            fresh = LoadReport.from_header(value, self.endpoint.load)
        except (ValueError, KeyError):
            return False
        self._last_header, self._header_report = value, fresh
        self.update_load(fresh)
        return True


class Upstreams:
    def __init__(self, pools: tuple[PoolConfig, ...], up: UpstreamConfig, probe: ProbeConfig,
                 load: SharedTable | None = None, worker_index: int = 0):
        """load: a load_table() shared by forked gateway processes (worker_index: this one's); by
        default, one of this process' own."""
        self.up = up
        self.probe_cfg = probe
        self.load = load if load is not None else load_table()
        self.worker_index = worker_index
        # Several processes: endpoints' in-flight figures are refreshed before each decision.
        self.shared = num_workers(self.load) > 1
        self.client: HttpClient | None = None
        self.pools = {p.id: self._pool(p) for p in pools}
        self.endpoints = [p.endpoint for p in self.pools.values()]
        # https pools: gateway.upstream.tls (CA, client certificate); shared with the load streams' client
        t = up.tls
        self.tls = ClientTls(t.files(), t.server_name) if t != TlsClientConfig() else None
        self._models = sorted({m for p in self.pools.values() for m in p.endpoint.models})
        self._capabilities: dict[str, frozenset[str]] = {}  # model -> what its pools serve, together
        self._probe_task: asyncio.Task[None] | None = None
        # Whom to probe each round (pool ids); the gateway sets it from its geography. Default: all.
        self.probe_targets: Callable[[list[Endpoint]], list[str]] = lambda eps: [e.pool_id for e in eps]
        self.on_change: list[Callable[[list[Endpoint]], None]] = []  # told of pools that joined
        self.on_probed: list[Callable[[], None]] = []  # after each round of probes
        self.on_rtt: list[Callable[[Endpoint, float], None]] = []  # each probe RTT sample (ms), as measured

    def set_pools(self, pools: tuple[PoolConfig, ...] | list[PoolConfig]) -> None:
        """Replace the pool set (a registry watch saw pools join or leave). Pools that stay keep
        their state (load, RTT, breaker); requests in flight to a removed pool finish normally."""
        old = self.pools
        self.pools = {p.id: old[p.id] if p.id in old and old[p.id].cfg == p else self._pool(p) for p in pools}
        self.endpoints = [p.endpoint for p in self.pools.values()]
        self._models = sorted({m for p in self.pools.values() for m in p.endpoint.models})
        self._capabilities.clear()
        joined = [p.endpoint for pid, p in self.pools.items() if old.get(pid) is not p]
        for callback in self.on_change:
            callback(joined)
        if self.client is not None and joined:
            for pid, p in self.pools.items():
                if old.get(pid) is not p:
                    asyncio.ensure_future(self.probe(p))

    def _pool(self, cfg: PoolConfig) -> Pool:
        pool = Pool(cfg, self.up, self.load, self.worker_index)
        pool.on_cap = self._apply_cap
        self._apply_cap(pool)
        return pool

    def _apply_cap(self, pool: Pool) -> None:
        if self.client is not None:
            self.client.set_limit(pool.endpoint.url, pool.connection_cap())

    def would_wait(self, pool: Pool) -> bool:
        """Whether a request to the pool now would wait for a connection (its cap reached)."""
        return self.client is not None and self.client.would_wait(pool.endpoint.url)

    async def start(self) -> None:
        self.client = HttpClient(self.up.max_connections, self.up.connect_timeout_s, self.up.idle_timeout_s,
                                 self.tls)
        for pool in self.pools.values():
            self._apply_cap(pool)
        await self.probe_all()
        self._probe_task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    def models(self) -> list[str]:
        """Every model some pool serves (sorted)."""
        return self._models

    def capabilities_of(self, model: str) -> frozenset[str]:
        """What the pools serving `model` can serve between them (core/capabilities.py; cached until
        the pool set or a pool's advertised set changes)."""
        caps = self._capabilities.get(model)
        if caps is None:
            sets = [p.endpoint.capabilities for p in self.pools.values() if model in p.endpoint.models]
            known = [c for c in sets if c is not None]
            caps = self._capabilities[model] = capabilities.ALL if len(known) < len(sets) else \
                frozenset().union(*known)
        return caps

    def any_available(self) -> bool:
        for p in self.pools.values():
            p.refresh_breaker()
        return any(e.healthy and not e.breaker_open for e in self.endpoints)

    # -- probes -----------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        """A round every period_s (or, when one takes longer, as soon as it ends): a round waits for
        its slowest probe, and the report ages of the nearest pools must not pay for that."""
        loop = asyncio.get_running_loop()
        start = loop.time()  # of the round start() made
        while True:
            await asyncio.sleep(max(0.0, self.probe_cfg.period_s - (loop.time() - start)))
            start = loop.time()
            try:
                await self.probe_all()
            except Exception:  # a bug in one probe must not end probing (pools would never go down or up)
                log.exception("probe round failed")

    async def probe_all(self) -> None:
        """One round: every pool in a small mesh; the nearest and a rotating sample in a large one."""
        await asyncio.gather(*(self.probe(self.pools[pid]) for pid in self.probe_targets(self.endpoints)))
        for callback in self.on_probed:
            callback()

    async def probe(self, pool: Pool) -> None:
        """One probe: our workers' GET /load (load report + handling time); a third-party OpenAI
        server's GET /metrics (queue gauges of vLLM, SGLang, TGI), or /health where it has none."""
        assert self.client is not None
        native = pool.cfg.kind == "meshgate"
        path = "/load" if native else ("/metrics" if pool.has_metrics else "/health")
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.probe_cfg.timeout_s):
                r = await self.client.request("GET", pool.endpoint.url + path)
                try:
                    body = await r.read()
                finally:
                    r.close()
            rtt_ms = (time.perf_counter() - t0) * 1000
            caps = pool.endpoint.capabilities
            ok, handling_s = self._probe_answer(pool, path, r.status, body)
            if pool.endpoint.capabilities != caps:
                self._capabilities.clear()
            rtt_ms -= 1000 * handling_s
        except (UpstreamError, TimeoutError, ValueError, TypeError):
            ok = False
        e = pool.endpoint
        if ok:
            for callback in self.on_rtt:
                callback(e, rtt_ms)
            e.rtt_ms = rtt_ms if e.rtt_ms is None else (1 - RTT_ALPHA) * e.rtt_ms + RTT_ALPHA * rtt_ms
            pool.rtt_window.append(rtt_ms)
            pool.probe_hits += 1
            pool.probe_misses = 0
            if not e.healthy and pool.probe_hits >= self.probe_cfg.up_after:
                e.healthy = True
                log.info("pool %s is up", e.pool_id)
        else:
            pool.probe_misses += 1
            pool.probe_hits = 0
            if e.healthy and pool.probe_misses >= self.probe_cfg.down_after:
                e.healthy = False
                e.load, e.load_pushed = None, False  # the report of a process that may be gone: unknown now
                log.warning("pool %s is down (%d probes missed)", e.pool_id, pool.probe_misses)
                pool.went_down("probes missed")
        pool.refresh_breaker()

    @staticmethod
    def _probe_answer(pool: Pool, path: str, status: int, body: bytes) -> tuple[bool, float]:
        """Whether the probe found the pool up, and the handling time it reported (seconds)."""
        ok = status == 200
        if path == "/load" and ok:
            d = orjson.loads(body)
            if not d.pop("ready", True):  # up, but still loading its model
                return False, 0.0
            handling_s = float(d.get("handling_s", 0.0))
            caps = d.get("capabilities")
            if isinstance(caps, list):  # what the worker says it serves (core/capabilities.py)
                pool.endpoint.capabilities = frozenset(c for c in caps if isinstance(c, str))
            d["hot_prefix_hashes"] = tuple(d.get("hot_prefix_hashes", ()))
            pool.update_load(LoadReport(**{k: v for k, v in d.items() if k in LoadReport.__slots__}))
            return True, handling_s
        if path == "/metrics":
            report = parse_openai_metrics(body.decode(errors="replace")) if ok else None
            if report is not None:
                pool.update_load(report)
            elif status in (404, 405) or ok:  # no metrics, or none we know: /health from now on
                pool.has_metrics = False
                ok = ok or status in (404, 405)
        return ok, 0.0


# Queue gauges of OpenAI-compatible servers: name -> LoadReport field (summed over label sets).
THIRD_PARTY_GAUGES = {
    "vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running",
    "sglang:num_queue_reqs": "waiting", "sglang:num_running_reqs": "running",
    "tgi_queue_size": "waiting", "tgi_batch_current_size": "running",
}


def parse_openai_metrics(text: str) -> LoadReport | None:
    """Waiting and running requests from a third-party server's Prometheus text; None if it
    exports none of the gauges we know."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        field = THIRD_PARTY_GAUGES.get(name)
        if field is not None:
            try:
                found[field] = found.get(field, 0.0) + float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    if not found:
        return None
    return LoadReport(waiting=int(found.get("waiting", 0)), running=int(found.get("running", 0)))
