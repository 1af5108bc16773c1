"""One policy over the whole simulated day: the event loop.

A request reaches its metro's gateway; a profile ranks the gateway's candidate set and the request
goes to the first pool, as gateway/edge/forward.py sends it: every attempt but the last (of
max_attempts, down the ranking) carries x-meshgate-may-refuse, and a pool whose predicted wait for
it exceeds refuse_queue_wait_s answers 429 at once (gateway/worker/server.py); the gateway reads the
refusal's load header and tries the next pool. The last attempt always queues; if the ranking
runs out first, the first pool that refused is asked again and must queue. Every profile runs
through this same forwarder. The two oracles decide centrally instead (benchmarks/sim/oracle.py).
"""
from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.sim.demand import Arrivals
from benchmarks.sim.gateway import GatewaySim, MeshView, make_profile
from benchmarks.sim.mesh import Mesh, mean_loguniform
from benchmarks.sim.oracle import Clairvoyant, FairOracle
from benchmarks.sim.pool import PoolSim
from benchmarks.sim.settings import LOAD_BLIND, MODEL, Settings
from gateway.core.types import Endpoint, RouteRequest
from gateway.routing.framework import Decision

# event kinds: a request reaches a pool; its answer's headers reach the gateway; the gateway sees
# the answer end; a refusal reaches the gateway; the oracle sees a request end at its pool
ARRIVE, HEADER, FINISH, REFUSED, ENDED = range(5)


class _Attempts:
    """A request's way down its ranking, as forward.py's Forwarder._open walks it."""

    __slots__ = ("left", "made", "first_refused", "final")

    def __init__(self, left: list[Endpoint]):
        self.left = left  # the ranking after the first pool
        self.made = 1
        self.first_refused: Endpoint | None = None
        self.final = False  # asked again after the candidates ran out: may not refuse


class Simulation:
    """One policy over the whole day. `run()` returns per-request outcomes for the measured window."""

    def __init__(self, mesh: Mesh, arr: Arrivals, s: Settings, policy: str):
        self.mesh, self.arr, self.s, self.policy = mesh, arr, s, policy
        self.pools = self.make_pools()
        self.now = 0.0  # the simulated clock, as routing reads it
        self.view = MeshView(mesh, self.pools, s, track_load=policy not in LOAD_BLIND)
        self.country = self.view.country
        masks = {cc: np.array([c == cc for c in self.country]) for cc in set(self.country)}
        self.oracle = FairOracle(mesh, self.pools, s, masks) if policy == "oracle" else None
        self.clairvoyant = Clairvoyant(mesh, masks) if policy == "clairvoyant" else None
        central = self.oracle is not None or self.clairvoyant is not None
        self.profile = None if central else make_profile(policy, s, mesh.prior, lambda: self.now)
        self.mean_wait = s.report == "mean"
        self.reqs = {cc: frozenset({cc}) for cc in set(self.country)}
        self.t_gw, self.metro, self.prompt = arr.t.tolist(), arr.metro.tolist(), arr.prompt.tolist()
        self.output, self.resident, self.client_ms = arr.output.tolist(), arr.resident.tolist(), arr.client_ms.tolist()
        self.metro_cc = [m.country for m in mesh.metros]
        cap = s.client_max_tokens
        self.max_tokens = [max(cap, o) for o in self.output] if cap is not None else self.output

    def make_pools(self) -> list[PoolSim]:
        """A pool per site; its mean request duration at its own speeds is what its worker's EWMA
        (mean_request_s) of the requests it has served settles at."""
        mesh, s = self.mesh, self.s
        mean_prompt = mean_loguniform(s.min_prompt_tokens, s.max_prompt_tokens)
        mean_output = mean_loguniform(s.min_output_tokens, s.max_output_tokens)
        return [PoolSim(int(mesh.slots[p]), float(mesh.prefill_tps[p]), float(mesh.decode_tps[p]),
                        mean_prompt / float(mesh.prefill_tps[p]) + mean_output / float(mesh.decode_tps[p]),
                        s.report_slots) for p in range(len(mesh.sites))]

    def run(self, progress: common.Progress | None = None) -> dict[str, Any]:
        s, arr = self.s, self.arr
        n = len(arr.t)
        self.ttft = np.full(n, np.nan)
        self.served = np.full(n, -1, dtype=np.intp)
        self.refused = np.zeros(n, dtype=np.intp)
        self.rest: dict[int, _Attempts] = {}  # the attempts of requests that may be refused
        self.events: list[tuple[float, int, int, int, int]] = self.initial_events()  # (time, kind, gateway, pool, request)
        events = self.events
        spill = s.candidates != "near" and s.k_spill > 0 and self.profile is not None
        next_tick = 0.0
        t_list = arr.t.tolist()
        i = 0
        while i < n or events:
            t_next = t_list[i] if i < n else math.inf
            if spill and next_tick <= min(t_next, events[0][0] if events else math.inf):
                self.view.refresh_spill(next_tick)
                next_tick += self.view.period
            elif events and events[0][0] <= t_next:
                now, kind, g, p, j = heapq.heappop(events)
                self.on_event(now, kind, g, p, j)
            else:
                self.route(i, t_next)
                i += 1
                if progress is not None and i % 2000 == 0:
                    progress.update(2000)
        return self.outcomes()

    def initial_events(self) -> list[tuple[float, int, int, int, int]]:
        """Events known before the day starts (a heap)."""
        return []

    def on_event(self, now: float, kind: int, g: int, p: int, j: int) -> None:
        if kind == ARRIVE:
            self.on_arrive(now, g, p, j)
        elif kind == HEADER:
            self.view.on_header(self.view.gws[g], p, now)
        elif kind == FINISH:
            e = self.view.gws[g].eps[p]
            assert e is not None
            e.in_flight -= 1
        elif kind == REFUSED:
            self.on_refused(now, g, p, j)
        else:
            assert self.oracle is not None
            self.oracle.finished(p)

    def route(self, i: int, now: float) -> None:
        """Request i reaches its metro's gateway: pick a pool and send it there."""
        self.now = now
        g = self.metro[i]  # metro m's clients use gateway m
        cc = self.metro_cc[g] if self.resident[i] else None
        rtt_s = self.view.gws[g].rtt_s
        if self.clairvoyant is not None:  # admitted as it decides: it sees its own requests in transit
            p = self.served[i] = self.clairvoyant.pick(g, now, self.prompt[i], cc)
            self.admit(now + rtt_s[p] / 2, g, p, i, False)
            self.clairvoyant.reserved(p, self.pools[p])
            return
        if self.oracle is not None:
            p = self.served[i] = self.oracle.pick(g, now, self.prompt[i], cc)
            self.oracle.sent(p, self.prompt[i])
            heapq.heappush(self.events, (now + rtt_s[p] / 2, ARRIVE, g, p, i))
            return
        ranked = self.decide(i, now).ranked
        if not ranked:
            self.unrouted(i, now)
            return
        if self.s.refuse_queue_wait_s is not None and self.s.max_attempts > 1:
            self.rest[i] = _Attempts(ranked[1:])
        p = self.served[i] = self.view.send(ranked[0])
        heapq.heappush(self.events, (now + rtt_s[p] / 2, ARRIVE, g, p, i))

    def unrouted(self, i: int, now: float) -> None:
        """No pool may take request i (the gateway would answer 503)."""
        raise RuntimeError(f"request {i}: no candidate pool at {now:.3f} s")

    def decide(self, i: int, now: float, avoid: frozenset[int] = frozenset(), extra_tokens: int = 0) -> Decision:
        """The gateway's routing decision for request i at `now` (the profile's): pools in `avoid`
        left out, `extra_tokens` more prompt (a continuation's tokens so far)."""
        assert self.profile is not None
        g = self.metro[i]
        cc = self.metro_cc[g] if self.resident[i] else None
        gw = self.view.gws[g]
        eps = [self.view.endpoint(gw, q, now) for q in self.view.candidates(gw, cc) if q not in avoid]
        req = RouteRequest(MODEL, prompt_chars=4 * (self.prompt[i] + extra_tokens), max_tokens=self.max_tokens[i],
                           client_rtt_ms=self.client_ms[i], countries=self.reqs[cc] if cc else None)
        return self.profile.route(req, eps)

    def on_arrive(self, now: float, g: int, p: int, j: int) -> None:
        if self.oracle is not None:
            self.admit(now, g, p, j, False)
            self.oracle.arrived(p, self.prompt[j])
            return
        att = self.rest.get(j)
        # every attempt but the last carries x-meshgate-may-refuse
        may_refuse = att is not None and not att.final and att.made < self.s.max_attempts
        if may_refuse:
            bound = self.s.refuse_queue_wait_s
            assert bound is not None
            if self.pools[p].report(now, self.mean_wait).queue_wait_s > bound:
                rtt_s = self.view.gws[g].rtt_s[p]
                heapq.heappush(self.events, (now + rtt_s / 2, REFUSED, g, p, j))  # a 429 with the load header
                return
        self.rest.pop(j, None)
        self.admit(now, g, p, j, may_refuse)

    def admit(self, now: float, g: int, p: int, j: int, may_refuse: bool, prefill: int | None = None) -> None:
        """prefill: the prompt tokens the pool computes (default: the whole prompt)."""
        first, end = self.serve(p, now, self.prompt[j] if prefill is None else prefill, j)
        self.admitted(now, g, p, j, may_refuse, first, end)

    def serve(self, p: int, now: float, prefill: int, j: int) -> tuple[float, float]:
        """Pool p takes request j at `now`, prefilling `prefill` tokens: its first-token and end times."""
        return self.pools[p].admit(now, prefill, self.output[j], self.max_tokens[j])

    def admitted(self, now: float, g: int, p: int, j: int, may_refuse: bool, first: float, end: float) -> None:
        """Request j is in pool p's queue: its TTFT, and the events of its answer."""
        r = self.view.gws[g].rtt_s[p]
        self.ttft[j] = self.client_ms[j] / 1000.0 + first + r / 2 - self.t_gw[j]
        if self.oracle is not None:
            heapq.heappush(self.events, (end, ENDED, g, p, j))
        elif self.profile is not None:
            # a stream's headers go out at once, or with the first token when the pool could have
            # refused (the worker waits for the engine's answer before any byte goes out)
            heapq.heappush(self.events, ((first if may_refuse else now) + r / 2, HEADER, g, p, j))
            heapq.heappush(self.events, (end + r / 2, FINISH, g, p, j))

    def on_refused(self, now: float, g: int, p: int, j: int) -> None:
        """The gateway fails over to the next pool of the request's ranking (forward.py's _open)."""
        gw: GatewaySim = self.view.gws[g]
        e = gw.eps[p]
        assert e is not None
        e.in_flight -= 1
        self.view.on_header(gw, p, now)
        self.refused[j] += 1
        att = self.rest[j]
        att.first_refused = att.first_refused or e
        if att.left:
            nxt = att.left.pop(0)
        else:  # the candidates ran out: the first pool that refused is asked again, and must queue
            nxt, att.final = att.first_refused, True
        att.made += 1
        q = self.served[j] = self.view.send(nxt)
        heapq.heappush(self.events, (now + gw.rtt_s[q] / 2, ARRIVE, g, q, j))

    def outcomes(self) -> dict[str, Any]:
        m = self.arr.measured
        served = self.served[m]
        pool_cc = np.array(self.country)[served]
        client_cc = np.array(self.metro_cc)[self.arr.metro[m]]
        rtt = self.mesh.rtt_ms[self.arr.metro[m], served]
        return {"ttft_s": self.ttft[m], "cross_border": pool_cc != client_cc, "rtt_ms": rtt,
                "refused": self.refused[m] > 0}
