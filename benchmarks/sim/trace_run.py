"""A trace replay (benchmarks/sim/trace.py) through the same event loop as the synthetic runs.

Rows, side by side over the same arrivals:
- `latency` (the gateway's default profile): expected TTFT with prefill charged only for the part a
  pool is estimated to hold, and the session's last pool as a prior. Each gateway keeps a real
  gateway/routing/prefix_index.py PrefixIndex (what it sent where, sessions), on the simulated
  clock; a pool's advertised chunks (its MAX_ADVERTISED most recently used cached blocks) are
  visible to a gateway only while it holds a load stream to that pool (they ride on its lines).
- `latency-no-cache`: today's latency profile (whole-prompt prefill; the prefix-hash tie-break on
  the prompt's first block, which every request of the conversation trace shares).
- `prefix`: network-blind, as the in-cluster routers: longest cached prefix, then least load, over
  every pool of the client's country (same index and advertisements as `latency`).
- `nearest`, `least-load`: today's baselines over the gateway's candidate set.
- `oracle-cache`: the fair oracle (benchmarks/sim/oracle.py) that also knows every pool's cache
  now: its expected TTFT charges each pool's prefill for the prompt less what that pool holds.
Variants of the network-blind row (TRACE_VARIANTS), so that its goals are judged against its
strongest form: every pool's load and cache now (`/fresh`), load weighed as much as the cached
share (`/balanced`), and both.
Recorded per row: TTFT mean and percentiles, the cache hit rate (prompt tokens served from cache /
prompt tokens), cross-border share, requests refused at least once.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import heapq
import multiprocessing
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from benchmarks import common
from benchmarks.sim.mesh import Mesh
from benchmarks.sim.oracle import FairOracle
from benchmarks.sim.pool import PoolSim
from benchmarks.sim.report import summarize
from benchmarks.sim.run import ARRIVE, Simulation, _Attempts
from benchmarks.sim.settings import MODEL, Settings
from benchmarks.sim.trace import BLOCK_TOKENS, CachedPool, TraceArrivals
from gateway.config import ProfileConfig, RoutingOptions
from gateway.core.prefix import MAX_CHUNKS, longest_match
from gateway.core.types import Endpoint, RouteRequest
from gateway.routing.framework import Decision
from gateway.routing.plugins import build_profile
from gateway.routing.prefix_index import PoolPrefix, PrefixIndex

TRACE_POLICIES = ("latency", "latency-no-cache", "prefix", "nearest", "least-load", "oracle-cache")
CACHE_AWARE = frozenset({"latency", "prefix", "prefix-balanced"})
# The network-blind rule in its strongest form: every decision sees every pool's load and cache now
# (as an in-cluster router fed by its pods' KV events would); shown beside `prefix`, and the goals
# are judged against the better of the two.
# `prefix/balanced` weighs load as much as the cached share (as llm-d's scorer weights and SGLang's
# balance thresholds temper the longest-prefix rule): one pool holding the trace's global first block
# otherwise draws every request.
TRACE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "prefix/fresh": ("prefix", {"fresh_reports": True}),
    "prefix/balanced": ("prefix-balanced", {}),
    "prefix/balanced-fresh": ("prefix-balanced", {"fresh_reports": True}),
}
BALANCED = ProfileConfig(filters=("serves-model", "available", "residency"),
                         scorers={"prefix-cache": 1.0, "least-load": 1.0})


class SimHolder(PoolPrefix):
    """PoolPrefix (what this gateway sent there) plus the pool's advertised blocks, visible while
    the gateway's load stream to the pool is up."""

    __slots__ = ("pool", "pool_sees_all")

    def __init__(self, index: PrefixIndex, endpoint: Endpoint, pool: CachedPool, sees_all: bool = False):
        super().__init__(index, endpoint)
        self.pool = pool
        self.pool_sees_all = sees_all  # fresh reports: the whole advertisement, always current

    def __contains__(self, h: object) -> bool:
        if (self.endpoint.load_pushed or self.pool_sees_all) and isinstance(h, int) and self.pool.advertises(h):
            return True
        return PoolPrefix.__contains__(self, h)

    def matched(self, hashes: Sequence[int], oldest: float | None = None) -> int:
        return longest_match(hashes, self) if hashes else 0


class CacheOracle(FairOracle):
    """The fair oracle, knowing every pool's prefix cache now (holders: block -> pools)."""

    def __init__(self, mesh: Mesh, pools: list[PoolSim], s: Settings, masks: dict[str, NDArray[np.bool_]],
                 holders: dict[int, set[int]], mean_prompt: float, mean_output: float):
        super().__init__(mesh, pools, s, masks)
        self.holders = holders
        self.free_every_s = (mean_prompt / mesh.prefill_tps + mean_output / mesh.decode_tps) / self.slots

    def cached_tokens(self, blocks: tuple[int, ...], prompt: int) -> NDArray[np.float64]:
        out = np.zeros(len(self.pools))
        cur: set[int] | None = None
        for depth, b in enumerate(blocks):
            hs = self.holders.get(b)
            cur = set(hs) if cur is None and hs else (cur & hs if cur is not None and hs else set())
            if not cur:
                break
            out[list(cur)] = depth + 1
        return np.minimum(out * BLOCK_TOKENS, prompt - 1)


class TraceSimulation(Simulation):
    def __init__(self, mesh: Mesh, arr: TraceArrivals, s: Settings, policy: str, cache_blocks: int):
        self.cache_blocks = cache_blocks
        self.holders: dict[int, set[int]] | None = {} if policy == "oracle-cache" else None
        self.tarr = arr
        base = {"oracle-cache": "oracle", "prefix-balanced": "prefix"}.get(policy, policy)
        super().__init__(mesh, arr, s, base)
        self.policy = policy
        if policy == "prefix-balanced":
            opts = RoutingOptions(profiles={policy: BALANCED})
            self.profile = build_profile(policy, opts, rng=random.Random(s.seed + 5), clock=lambda: self.now)
        n = len(arr.t)
        if policy == "oracle-cache":
            assert self.oracle is not None and self.holders is not None
            masks = self.oracle.masks
            self.oracle = CacheOracle(mesh, self.pools, s, masks, self.holders, float(np.mean(arr.prompt)),
                                      float(np.mean(arr.output)))
        self.blocks = arr.hash_ids
        self.chunks = [h[:MAX_CHUNKS] for h in arr.hash_ids]
        self.keys = [f"conv-{c}" for c in arr.conv.tolist()]
        self.cached = np.zeros(n)
        self.prefill_s = np.zeros(n)  # the prefill time of the uncached part, at the pool that served it
        self.eff: dict[int, int] = {}  # oracle: the uncached prompt it sent
        self.indexes: dict[int, PrefixIndex] = {}
        self.by_country: dict[str, list[int]] = {}
        for p, cc in enumerate(self.country):
            self.by_country.setdefault(cc, []).append(p)

    def make_pools(self) -> list[PoolSim]:
        mesh, s, arr = self.mesh, self.s, self.tarr
        mean_prompt, mean_output = float(np.mean(arr.prompt)), float(np.mean(arr.output))
        return [CachedPool(int(mesh.slots[p]), float(mesh.prefill_tps[p]), float(mesh.decode_tps[p]),
                           mean_prompt / float(mesh.prefill_tps[p]) + mean_output / float(mesh.decode_tps[p]),
                           s.report_slots, self.cache_blocks, p, self.holders) for p in range(len(mesh.sites))]

    def index(self, g: int) -> PrefixIndex:
        ix = self.indexes.get(g)
        if ix is None:
            ix = self.indexes[g] = PrefixIndex(RoutingOptions(), clock=lambda: self.now)
        return ix

    def route(self, i: int, now: float) -> None:
        self.now = now
        g = self.metro[i]
        rtt_s = self.view.gws[g].rtt_s
        if self.oracle is not None:
            assert isinstance(self.oracle, CacheOracle)
            eff = np.maximum(1.0, self.prompt[i] - self.oracle.cached_tokens(self.blocks[i], self.prompt[i]))
            p = self.served[i] = self.oracle.pick(g, now, eff, None)  # type: ignore[arg-type]
            self.eff[i] = int(eff[p])
            self.oracle.sent(p, self.eff[i])
            self.events_push(now + rtt_s[p] / 2, g, p, i)
            return
        ranked = self.decide(i, now).ranked
        if not ranked:
            self.unrouted(i, now)
            return
        if self.s.refuse_queue_wait_s is not None and self.s.max_attempts > 1:
            self.rest[i] = _Attempts(ranked[1:])
        p = self.served[i] = self.view.send(ranked[0])
        self.events_push(now + rtt_s[p] / 2, g, p, i)

    def unrouted(self, i: int, now: float) -> None:
        """No pool may take request i (the gateway would answer 503)."""
        raise RuntimeError(f"request {i}: no candidate pool at {now:.3f} s")

    def decide(self, i: int, now: float, avoid: frozenset[int] = frozenset(), extra_tokens: int = 0) -> Decision:
        assert self.profile is not None
        g = self.metro[i]
        gw = self.view.gws[g]
        blind = self.policy in ("prefix", "prefix-balanced")  # over the client's country, whatever the RTT
        cands = self.by_country[self.metro_cc[g]] if blind else self.view.candidates(gw, None)
        if avoid:
            cands = [q for q in cands if q not in avoid]
        eps = [self.view.endpoint(gw, q, now) for q in cands]
        blocks = self.blocks[i]
        chars = 4 * (self.prompt[i] + extra_tokens)
        if self.policy in CACHE_AWARE:
            ix = self.index(g)
            for e, q in zip(eps, cands):
                if e.prefix is None:
                    e.prefix = SimHolder(ix, e, self.pools[q], self.s.fresh_reports)  # type: ignore[arg-type]
            pool_id, num = ix.session(self.keys[i])
            req = RouteRequest(MODEL, prompt_chars=chars, max_tokens=self.max_tokens[i],
                               client_rtt_ms=self.client_ms[i], prefix_key=str(blocks[:1]),
                               prefix_hashes=self.chunks[i], tokens_per_chunk=float(BLOCK_TOKENS),
                               session_key=self.keys[i], session_pool=pool_id, session_chunks=num)
        else:
            req = RouteRequest(MODEL, prompt_chars=chars, max_tokens=self.max_tokens[i],
                               client_rtt_ms=self.client_ms[i], prefix_key=str(blocks[:1]))
        return self.profile.route(req, eps)

    def events_push(self, t: float, g: int, p: int, j: int) -> None:
        heapq.heappush(self.events, (t, ARRIVE, g, p, j))

    def on_arrive(self, now: float, g: int, p: int, j: int) -> None:
        if self.oracle is not None:
            self.admit(now, g, p, j, False)
            self.oracle.arrived(p, self.eff.pop(j))
            return
        super().on_arrive(now, g, p, j)

    def admit(self, now: float, g: int, p: int, j: int, may_refuse: bool, prefill: int | None = None) -> None:
        """The pool finds what its cache holds of the prompt, prefills the rest, caches it all
        (prefill: worked out here, whatever is passed)."""
        pool = self.pools[p]
        assert isinstance(pool, CachedPool)
        prompt = self.prompt[j]
        cached = min(pool.lookup(self.blocks[j]) * BLOCK_TOKENS, prompt - 1)
        self.cached[j] = cached
        self.prefill_s[j] = (prompt - cached) / pool.ptps
        pool.insert(self.blocks[j])
        super().admit(now, g, p, j, may_refuse, prefill=prompt - cached)
        if self.policy in CACHE_AWARE:  # the gateway learns of it as forward.py's on_routed does
            ix, e = self.index(g), self.view.gws[g].eps[p]
            assert e is not None
            ix.record_sent(e, self.chunks[j])
            ix.record_session(self.keys[j], e.pool_id, len(self.chunks[j]))

    def outcomes(self) -> dict[str, Any]:
        out = super().outcomes()
        m = self.arr.measured
        out["cached_tokens"] = self.cached[m]
        out["prompt_tokens"] = self.arr.prompt[m]
        out["prefill_s"] = self.prefill_s[m]
        return out


# -- running and reporting ---------------------------------------------------------------------
_SHARED: dict[str, Any] = {}


Job = tuple[str, str, dict[str, Any]]  # (row, policy, Settings overrides)


def _job(job: Job) -> tuple[str, dict[str, float], NDArray[np.float32], float]:
    name, policy, overrides = job
    mesh, arr, blocks = _SHARED["mesh"], _SHARED["arr"], _SHARED["cache_blocks"]
    s = dataclasses.replace(_SHARED["settings"], **overrides)
    t0 = time.perf_counter()
    out = TraceSimulation(mesh, arr, s, policy, blocks).run()
    summary = summarize(out, s.slo_s)
    summary["cache_hit_rate"] = float(np.sum(out["cached_tokens"]) / max(1, np.sum(out["prompt_tokens"])))
    summary["prefill_mean_s"] = float(np.mean(out["prefill_s"]))  # of the TTFT mean: the part a cache can cut
    return name, summary, out["ttft_s"].astype(np.float32), time.perf_counter() - t0


def trace_jobs(policies: tuple[str, ...] = TRACE_POLICIES, variants: bool = True) -> list[Job]:
    return [(p, p, {}) for p in policies] + ([(n, p, o) for n, (p, o) in TRACE_VARIANTS.items()] if variants else [])


def simulate_trace(mesh: Mesh, arr: TraceArrivals, s: Settings, cache_blocks: int, workers: int = 1,
                   jobs: list[Job] | None = None) -> dict[str, tuple[dict[str, float], NDArray[np.float32], float]]:
    _SHARED.update(mesh=mesh, arr=arr, settings=s, cache_blocks=cache_blocks)
    jobs = jobs if jobs is not None else trace_jobs()
    if workers <= 1:
        results = [_job(j) for j in jobs]
    else:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as ex:
            results = list(ex.map(_job, jobs))
    return {name: (summary, ttft, el) for name, summary, ttft, el in results}


def trace_goals(pol: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    lat = pol.get("latency")
    if lat is None:
        return out
    if "oracle-cache" in pol:
        o = pol["oracle-cache"]
        v = common.ratio(lat["ttft_mean_s"], o["ttft_mean_s"])
        out["latency_mean_over_oracle_cache"] = common.goal(v, "<= 1.10", v <= 1.10)
        v = common.ratio(lat["ttft_p99_s"], o["ttft_p99_s"])
        out["latency_p99_over_oracle_cache"] = common.goal(v, "<= 1.15", v <= 1.15)
    if "latency-no-cache" in pol:
        v = common.ratio(pol["latency-no-cache"]["ttft_mean_s"], lat["ttft_mean_s"])
        out["latency_no_cache_mean_over_latency"] = common.goal(v, ">= 1.3", v >= 1.3)
        if "oracle-cache" in pol:  # what the best routing could reach on this goal (shown, not a goal)
            v = common.ratio(pol["latency-no-cache"]["ttft_mean_s"], pol["oracle-cache"]["ttft_mean_s"])
            out["latency_no_cache_mean_over_oracle_cache (bound, not a goal)"] = common.goal(v, "(info)", True)
    blind = [pol[n] for n in ("prefix", *TRACE_VARIANTS) if n in pol]
    for q in ("p50", "p99") if blind else ():  # against the better network-blind row
        a, b = lat[f"ttft_{q}_s"], min(r[f"ttft_{q}_s"] for r in blind)
        out[f"latency_{q}_over_best_prefix"] = common.goal(common.ratio(a, b), "< 1", a < b)
    return out


TRACE_COLUMNS = ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "cache_hit_rate", "prefill_mean_s",
                 "cross_border", "rtt_p50_ms", "refused")


def trace_result(mesh: Mesh, arr: TraceArrivals, s: Settings, cache_blocks: int, path: str,
                 results: dict[str, tuple[dict[str, float], NDArray[np.float32], float]]) -> dict[str, Any]:
    pol = {n: r[0] for n, r in results.items() if n in TRACE_POLICIES}
    var = {n: r[0] for n, r in results.items() if n not in TRACE_POLICIES}
    return {"benchmark": "mesh_sim", "trace": path, "settings": dataclasses.asdict(s),
            "calibration": dataclasses.asdict(mesh.calib), "mesh": mesh.info,
            "trace_mapping": {"num_requests": len(arr.t), "num_conversations": int(arr.conv.max()) + 1,
                              "compression": arr.compression, "span_s": float(arr.t.max()),
                              "cache_blocks_per_pool": cache_blocks, "block_tokens": BLOCK_TOKENS,
                              "mean_util": s.mean_util, "mean_prompt_tokens": float(np.mean(arr.prompt))},
            "num_requests_measured": int(arr.measured.sum()), "policies": pol, "variants": var,
            "variant_settings": {n: {"row": TRACE_VARIANTS[n][0], **TRACE_VARIANTS[n][1]} for n in var},
            "goals": trace_goals({**pol, **var}),
            "run_s": {n: round(r[2], 2) for n, r in results.items()}}


def print_trace(res: dict[str, Any]) -> None:
    head = ["policy", "mean s", "p50 s", "p90 s", "p99 s", "cache hit", "prefill mean s", "cross-border",
            "rtt p50 ms", "refused"]
    rows = [[n, *(v[c] for c in TRACE_COLUMNS)] for n, v in {**res["policies"], **res["variants"]}.items()]
    tm = res["trace_mapping"]
    common.print_table(f"trace replay: TTFT over the mesh ({res['mesh']['num_sites']} sites, "
                       f"{res['num_requests_measured']} requests measured, {tm['num_conversations']} conversations, "
                       f"time x1/{tm['compression']:.0f})", head, rows)
    common.print_goals(res["goals"])
