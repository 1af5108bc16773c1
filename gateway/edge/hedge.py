"""First-token hedging (issue 17): a streaming request with no first byte by its predicted TTFT x
hedge_factor also goes to the runner-up; the first to produce a token wins and the other is
cancelled (its connection dropped, so the pool aborts the request and frees its KV within a step:
the pool's aborted-requests counter shows it).

Bounded so that hedging never amplifies an overload: at most hedge_budget of this gateway's
requests that may be hedged (streams not opted out) over the last hedge_window_s are hedged, and never to a pool that is down, circuit-open or
predicted full (its last report has every sequence slot taken and a queue). A request opts out with
`x-meshgate-hedge: off`, a key with `hedge: false`. Metered once: both attempts run on stand-in
Calls, and only the winner's Upstream is handed the client's Call (the loser's bookkeeping is
dropped with it).

FirstByteFeed: the Forwarder's first-byte hook. Each streamed attempt's time to first byte against
its decision's prediction goes to the latency model's per-pool lateness (gateway/routing/lateness.py),
so that a pool answering late is predicted late and routing moves off it; hedging then only has to
cover the requests sent before that was learned. A race tells it too: when a hedge is sent, and
when the hedge wins, the primary's pool has not answered for that long (a lower bound).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping

from gateway.config import ResilienceConfig
from gateway.core.types import Endpoint
from gateway.core.wire import HEDGE_HEADER
from gateway.edge.forward import Call, Forwarder, Upstream
from gateway.edge.metrics import GatewayMetrics
from gateway.routing.lateness import Lateness

log = logging.getLogger("meshgate.gateway")


class HedgeBudget:
    """Requests and hedges over a sliding window, in one-second buckets (bounded memory)."""

    def __init__(self, ratio: float, window_s: float):
        self.ratio = ratio
        self.window_s = window_s
        self._buckets: deque[list[float]] = deque()  # [second, requests, hedges]

    def _bucket(self, now: float) -> list[float]:
        sec = float(int(now))
        while self._buckets and self._buckets[0][0] <= sec - self.window_s:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append([sec, 0, 0])
        return self._buckets[-1]

    def request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def take(self, now: float) -> bool:
        """A hedge, if the window has room for one more."""
        b = self._bucket(now)
        requests = sum(x[1] for x in self._buckets)
        hedges = sum(x[2] for x in self._buckets)
        if hedges + 1 > self.ratio * requests:
            return False
        b[2] += 1
        return True


def _predicted_full(e: Endpoint) -> bool:
    load = e.load
    return load is not None and load.max_num_seqs > 0 and load.running >= load.max_num_seqs and load.waiting > 0


class FirstByteFeed:
    """Attempts' first bytes, against what their routing decision predicted, into Lateness."""

    def __init__(self, lateness: Lateness):
        self.lateness = lateness

    def first_byte(self, call: Call, e: Endpoint, elapsed_s: float) -> None:
        """Forwarder.on_first_byte: e's first byte came elapsed_s after the attempt was sent."""
        if call.stream:  # a whole answer's first byte comes after all of it
            self.observe(call, e, elapsed_s, censored=False)

    def observe(self, call: Call, e: Endpoint, elapsed_s: float, censored: bool) -> None:
        d = call.decision
        predicted_ms = d.predicted_ms.get(e.pool_id) if d is not None else None
        if d is None or predicted_ms is None:
            return  # failover beyond the decision's first two: nothing predicted to compare with
        # The model's own prediction, as seen from here: less the lateness it already added, less
        # the client's leg (not part of what the gateway times)
        base_ms = predicted_ms - d.late_ms.get(e.pool_id, 0.0) - call.route.client_rtt_ms
        self.lateness.observe(e, elapsed_s, base_ms / 1000, censored)


class Hedger:
    def __init__(self, fwd: Forwarder, cfg: ResilienceConfig, metrics: GatewayMetrics,
                 feed: FirstByteFeed | None = None):
        self.fwd, self.cfg, self.m = fwd, cfg, metrics
        self.budget = HedgeBudget(cfg.hedge_budget, cfg.hedge_window_s)
        self.feed = feed  # told how long a raced primary went without a first byte

    def wanted(self, call: Call, headers: Mapping[str, str]) -> bool:
        return (self.cfg.hedge and call.stream and headers.get(HEDGE_HEADER, "").lower() != "off"
                and (call.principal is None or call.principal.hedge))

    async def open(self, call: Call, headers: Mapping[str, str]) -> Upstream:
        """Forwarder.open, hedged when the first byte is late. headers: the client's."""
        if not self.wanted(call, headers):
            return await self.fwd.open(call)
        self.budget.request(time.monotonic())  # the budget is a share of the requests that may be hedged
        primary_call = _stand_in(call, call.avoid)
        primary = asyncio.create_task(self.fwd.open(primary_call))
        try:
            return await self._race(call, primary_call, primary, time.monotonic())
        except BaseException as e:
            call.decision = call.decision or primary_call.decision
            call.finish(None, getattr(e, "status", 499 if isinstance(e, asyncio.CancelledError) else 500))
            raise
        finally:
            if not primary.done():
                primary.cancel()

    async def _race(self, call: Call, primary_call: Call, primary: asyncio.Task[Upstream], sent_at: float) -> Upstream:
        done, _ = await asyncio.wait({primary}, timeout=self.cfg.hedge_min_s)
        if not done:
            decision = primary_call.decision
            first = decision.ranked[0].pool_id if decision is not None and decision.ranked else None
            # The prediction without the pool's measured lateness: a pool known to be late (sent to
            # when nothing predicted better was left, or by a profile that ignores predictions) is
            # raced as early as any other, not given its lateness x hedge_factor more
            predicted_s = ((decision.predicted_ms.get(first, 0.0) - decision.late_ms.get(first, 0.0)) / 1000
                           if decision is not None and first else 0.0)
            rest = self.cfg.hedge_factor * predicted_s - self.cfg.hedge_min_s
            if rest > 0:
                done, _ = await asyncio.wait({primary}, timeout=rest)
        call.decision = primary_call.decision
        if done:
            return self._won(call, primary.result())
        self._late(primary_call, sent_at)  # late against its prediction already, whether hedged or not
        target = self._runner_up(primary_call)
        if target is None:
            return self._won(call, await primary)
        if not self.budget.take(time.monotonic()):
            self.m.child(self.m.hedges, "skipped_budget").inc()
            return self._won(call, await primary)
        others = frozenset(p for p in self.fwd.up.pools if p != target.pool_id)
        hedge_call = _stand_in(call, others)
        hedge = asyncio.create_task(self.fwd.open(hedge_call))
        log.info("request %s: no first token by %.0f ms; hedged to %s", call.request_id,
                 (time.monotonic() - call.arrival) * 1000, target.pool_id)
        up = await self._first(call, primary, hedge)
        if primary.cancelled():
            self._late(primary_call, sent_at)  # the hedge answered first: the primary's pool is later still
        return up

    def _late(self, primary_call: Call, sent_at: float) -> None:
        """The primary has no first byte after time.monotonic() - sent_at: a lower bound on its
        pool's (taken as the decision's first: a refusal that moved it on is rare and also late)."""
        d = primary_call.decision
        if self.feed is not None and d is not None and d.ranked:
            self.feed.observe(primary_call, d.ranked[0], time.monotonic() - sent_at, censored=True)

    def _runner_up(self, primary_call: Call) -> Endpoint | None:
        d = primary_call.decision
        if d is None:
            return None
        e: Endpoint
        for e in d.ranked[1:]:
            if e.healthy and not e.breaker_open and not _predicted_full(e) and e.pool_id not in primary_call.avoid:
                return e
        return None

    async def _first(self, call: Call, primary: asyncio.Task[Upstream], hedge: asyncio.Task[Upstream]) -> Upstream:
        """The first of the two to produce a token; the other is cancelled."""
        pending = {primary, hedge}
        winner: Upstream | None = None
        error: BaseException | None = None
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is None and winner is None:
                        winner = t.result()
                    elif t.exception() is None:
                        t.result().close(finish=False)  # both answered at once: the later one goes
                    else:
                        error = error or t.exception()
        finally:
            for t in pending:
                t.cancel()  # drops its connection: the pool aborts the request
            if pending:
                await asyncio.wait(pending)
                for t in pending:
                    if not t.cancelled() and t.exception() is None:
                        t.result().close(finish=False)  # it answered as it was being cancelled
        if winner is None:
            assert error is not None
            self.m.child(self.m.hedges, "failed").inc()
            raise error
        hedge_won = hedge.done() and not hedge.cancelled() and hedge.exception() is None and hedge.result() is winner
        self.m.child(self.m.hedges, "won" if hedge_won else "lost").inc()
        return self._won(call, winner)

    @staticmethod
    def _won(call: Call, up: Upstream) -> Upstream:
        up.call = call  # from here on the client's request: its meter, its single finish
        return up


def _stand_in(call: Call, avoid: frozenset[str]) -> Call:
    """A Call for one of the racing attempts: the client's request, without its bookkeeping."""
    c = Call(path=call.path, body=call.body, stream=call.stream, route=call.route, headers=call.headers,
             request_id=call.request_id, arrival=call.arrival, deadline=call.deadline, principal=call.principal,
             priority=call.priority, meter=None, client=call.client, avoid=avoid)
    c.finished = True
    return c

