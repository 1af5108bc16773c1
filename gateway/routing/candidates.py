"""The candidate set: the few endpoints one routing decision considers, out of a large mesh.

With 1,100 pools, scoring all of them costs ~1.8 ms a decision; the candidate step keeps it under
100 us (benchmarks/routing_scale.py) without losing what matters: the nearest usable pools, and a
spill list of farther ones ranked by RTT plus queue wait for when the near ones are busy.
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence

from gateway.config import RoutingOptions
from gateway.core.types import Endpoint, RouteRequest
from gateway.routing.latency import UNKNOWN_RTT_MS, TtftModel

_PROBE_REQUEST = RouteRequest(model="", prompt_chars=0)  # the wait a pool predicts for any request


class CandidateSet:
    """The endpoints one routing decision considers (the simulator uses the same rule).

    `refresh()` runs once per probe period, off the request path: it sorts the endpoints by
    estimated RTT (measured EWMA, else the prior) and keeps, per country, the same order (for
    residency), and ranks a spill list by RTT + the wait the latency model expects there (the
    reported prefill backlog, plus a slot's wait weighted by how likely the pool is to be full by
    now, from its reported headroom and the report's age), so that when the nearby pools are busy a
    farther one with room is still a candidate, and one that had a slot or two free a while ago,
    likely taken since, is not preferred for it. `select(req)` walks the near
    order and takes the first `k_near` usable endpoints (healthy, circuit closed, serving the model,
    allowed by residency), then adds up to `k_spill` from the spill list. A health change needs no
    refresh: the walk skips it. Cost: O(k) per decision, unless most near pools are down."""

    def __init__(self, endpoints: Sequence[Endpoint], k_near: int = 16, k_spill: int = 8,
                 clock: Callable[[], float] = time.monotonic, options: RoutingOptions | None = None):
        """clock: the time base of the endpoints' load_at; options: the gateway's routing options
        (the latency model's defaults)."""
        self.endpoints: list[Endpoint] = list(endpoints)
        self.k_near, self.k_spill = k_near, k_spill
        self.model = TtftModel((options or RoutingOptions()).default_prefill_tps, clock)
        self._near: list[Endpoint] = []
        self._near_cc: dict[str, list[Endpoint]] = {}
        self._spill: list[Endpoint] = []
        self.refresh()

    @staticmethod
    def rtt_ms(e: Endpoint) -> float:
        ms = e.rtt_ms if e.rtt_ms is not None else e.prior_rtt_ms
        return ms if ms is not None else UNKNOWN_RTT_MS

    def reset(self, endpoints: Sequence[Endpoint]) -> None:
        """The pool set changed (a registry): start from the new endpoints."""
        self.endpoints = list(endpoints)
        self.refresh()

    def refresh(self) -> None:
        self._near = sorted(self.endpoints, key=self.rtt_ms)
        by_cc: dict[str, list[Endpoint]] = {}
        for e in self._near:
            by_cc.setdefault(e.country or "", []).append(e)
        self._near_cc = by_cc
        m = 2 * (self.k_near + self.k_spill)
        self._spill = heapq.nsmallest(m, self.endpoints, key=self.spill_key_ms)

    def wanted(self, k_nearest: int) -> list[str]:
        """The pools whose load the next decisions most depend on, nearest first: the k_nearest
        nearest and the spill list (gateway/pools/load_stream.py keeps their reports pushed)."""
        out = [e.pool_id for e in self._near[:k_nearest]]
        seen = set(out)
        out += [e.pool_id for e in self._spill if e.pool_id not in seen]
        return out

    def spill_key_ms(self, e: Endpoint) -> float:
        """RTT + the expected wait before a request's first step (none known: no wait)."""
        wait_s = self.model.queue_s(_PROBE_REQUEST, e) if e.load is not None else 0.0
        return self.rtt_ms(e) + 1000.0 * wait_s

    def select(self, req: RouteRequest) -> list[Endpoint]:
        countries, model = req.countries, req.model
        if countries is not None and len(countries) == 1:
            (cc,) = countries
            near = self._near_cc.get(cc, [])
        else:
            near = self._near
        out: list[Endpoint] = []
        for e in near:
            if e.healthy and not e.breaker_open and model in e.models and (countries is None or e.country in countries):
                out.append(e)
                if len(out) == self.k_near:
                    break
        want = len(out) + self.k_spill
        for e in self._spill:
            if len(out) >= want:
                break
            if (e.healthy and not e.breaker_open and model in e.models and e not in out
                    and (countries is None or e.country in countries)):
                out.append(e)
        return out
