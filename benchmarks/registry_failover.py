"""How fast the gateways' candidate sets follow the pools, with a real etcd on loopback and two
in-process gateways (tests/registry/harness.py) in front of stub pools:

- probe:  a pool dies; probes (period_s, down_after) mark it down before its lease (30 s) could;
- lease:  a pool dies and probes are off (60 s period); its lease (lease_ttl_s) expires in etcd;
- drain:  a pool deregisters (`meshgate worker` on SIGTERM) and the watch removes it;
- join:   a pool registers while traffic flows; the time to the first request it answers.

Each figure is the time until *every* gateway stops routing to (or first routes to) the pool.
`python -m benchmarks.registry_failover [--quick] [--json PATH]`; needs the etcd binary.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from benchmarks.common import arg_parser, machine_info, now_iso, percentile, print_table, setup_logging, write_json
from gateway.config import Config, config_from_dict
from tests.etcd_server import EtcdServer, etcd_binary
from tests.registry.harness import SITES, Gateway, Pool, ask, discovery
from tests.servers import free_port

log = logging.getLogger("meshgate.bench")
_ids = itertools.count()


def _gateway_cfg(endpoint: str, prefix: str, site: str, probe_s: float, down_after: int, ttl_s: int) -> Config:
    port = free_port()
    return config_from_dict({
        "gateway": {"site": site, "port": port, "routing": "least-load", "access_log": False,
                    "probe": {"period_s": probe_s, "timeout_s": min(1.0, probe_s), "down_after": down_after}},
        "sites": SITES,
        "discovery": {**discovery(endpoint, prefix, lease_ttl_s=ttl_s), "instance_id": f"gw-{port}"}})


def _routable(gws: list[Gateway], pool_id: str) -> bool:
    """Whether any gateway would still pick the pool (present, healthy, circuit closed)."""
    for g in gws:
        assert g.server is not None
        p = g.server.upstreams.pools.get(pool_id)
        if p is not None and p.endpoint.healthy and not p.endpoint.breaker_open:
            return True
    return False


async def _until(pred: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            return float("nan")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def _scenario(etcd: EtcdServer, name: str, trials: int, probe_s: float, down_after: int, ttl_s: int,
                    trial: Callable[[list[Gateway], str, int], Awaitable[float]]) -> list[float]:
    prefix = f"/bench-{name}-{next(_ids)}/"
    gws = [await Gateway(_gateway_cfg(etcd.endpoint, prefix, s, probe_s, down_after, ttl_s)).start()
           for s in ("fra", "par")]
    keep = await Pool("anchor", etcd.endpoint, prefix, lease_ttl_s=ttl_s).start()  # traffic has somewhere to go
    try:
        out = []
        for _ in range(trials):
            out.append(await trial(gws, prefix, ttl_s))
            log.info("%s: %.3f s", name, out[-1])
        return out
    finally:
        for g in gws:
            await g.stop()
        await keep.drain()


async def _death(gws: list[Gateway], prefix: str, ttl_s: int, drain: bool) -> float:
    endpoint = gws[0].cfg.discovery.endpoints[0]
    pool = await Pool(f"p{next(_ids)}", endpoint, prefix, lease_ttl_s=ttl_s).start()
    await _until(lambda: all(pool.id in g.pool_ids() for g in gws), 10)
    await asyncio.sleep(0.3)  # a probe or two has seen it up
    t0 = time.monotonic()
    going = asyncio.create_task(pool.drain() if drain else pool.die())  # timed from its first step
    await _until(lambda: not _routable(gws, pool.id), 4 * ttl_s + 60)
    took = time.monotonic() - t0
    await going
    return took


async def _join(gws: list[Gateway], prefix: str, ttl_s: int) -> float:
    """Traffic flows over both gateways; a pool registers; when does it answer its first request?"""
    endpoint = gws[0].cfg.discovery.endpoints[0]
    pool = Pool(f"p{next(_ids)}", endpoint, prefix, lease_ttl_s=ttl_s)
    await pool.start(register=False)
    stop = asyncio.Event()
    first: list[float] = []

    async def client(s: aiohttp.ClientSession, url: str) -> None:
        while not stop.is_set():
            status, served = await ask(s, url)
            if served == pool.id and not first:
                first.append(time.monotonic())
                stop.set()

    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(client(s, g.url)) for g in gws for _ in range(2)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        assert pool.registrant is not None
        pool.registrant.start()
        try:
            await asyncio.wait_for(stop.wait(), 30)
        except asyncio.TimeoutError:
            stop.set()
        await asyncio.gather(*tasks)
    await pool.drain()
    return first[0] - t0 if first else float("nan")


async def run(quick: bool) -> dict[str, Any]:
    trials = 3 if quick else 10
    etcd = EtcdServer()
    etcd.start()
    rows: list[dict[str, Any]] = []

    async def record(name: str, config: str, probe_s: float, down_after: int, ttl_s: int,
                     trial: Callable[[list[Gateway], str, int], Awaitable[float]]) -> None:
        xs = await _scenario(etcd, name, trials, probe_s, down_after, ttl_s, trial)
        rows.append({"scenario": name, "config": config, "trials": len(xs), "median_s": percentile(xs, 50),
                     "p90_s": percentile(xs, 90), "max_s": max(xs), "samples_s": xs})

    try:
        for probe_s, down in ((1.0, 2),) if quick else ((1.0, 2), (0.2, 1)):
            await record("probe", f"probe {probe_s:g} s x{down}, lease 30 s", probe_s, down, 30,
                         lambda g, p, t: _death(g, p, t, drain=False))
        for ttl in (2,) if quick else (2, 5, 10):
            await record("lease", f"probes off, lease {ttl} s", 60.0, 2, ttl,
                         lambda g, p, t: _death(g, p, t, drain=False))
        await record("drain", "deregistration + watch", 60.0, 2, 10, lambda g, p, t: _death(g, p, t, drain=True))
        await record("join", "registration -> first request", 1.0, 2, 10, _join)
    finally:
        etcd.close()
    return {"benchmark": "registry_failover", "when": now_iso(), "quick": quick, "machine": machine_info(),
            "etcd": "3.4 (loopback, one member)", "gateways": 2, "results": rows}


def main() -> None:
    p = arg_parser("registry_failover", __doc__.splitlines()[0])
    args = p.parse_args()
    setup_logging()
    logging.getLogger("meshgate.registry").setLevel(logging.WARNING)
    for name in ("meshgate.pools", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if etcd_binary() is None:
        raise SystemExit("registry_failover: needs the etcd binary (apt-get install etcd-server)")
    result = asyncio.run(run(args.quick))
    print_table("time until every gateway has followed the pool (s)",
                ["scenario", "config", "trials", "median", "p90", "max"],
                [[r["scenario"], r["config"], r["trials"], r["median_s"], r["p90_s"], r["max_s"]]
                 for r in result["results"]])
    print(f"\nwrote {write_json(args.json, result)}")


if __name__ == "__main__":
    main()
