"""Pool failures in the mesh simulator (issue 17), and the gateway's three answers to them.

Faults: benchmarks/sim/faults.py (crashes and stalls, seeded, the same schedule for every row).

Rows (the `latency` profile, every one over the same arrivals and faults):
- `none`: the gateway before issue 17. Before the first byte it fails over (forward.py: a refused
  connection or a break moves the attempt to the next pool, up to max_attempts), after it the stream
  is cut: the client gets an error event, and asks again from scratch (client_retries times, after
  client_retry_s; its answer's TTFT counts from its first try). A stalled stream waits for the pool,
  up to UpstreamConfig.idle_timeout_s (60 s) between chunks and first_byte_timeout_s for the first.
- `continue`: gateway/edge/resume.py. A broken stream goes on at the next pool (a fresh decision,
  the cut pools avoided), which prefills the prompt plus the tokens generated so far (with the
  trace's prefix caches: the cached part of the prompt is not recomputed; the generated tokens are
  never cached elsewhere); at most ResilienceConfig.max_resumes times, then the client gets the
  error as in `none`. A stream with no token for the stall bound (stall_factor x the pool's
  per-stream token interval, 1 / its decode rate, within [stall_floor_s, stall_cap_s]: the pool's load
  stream is silent too) or whose pool is marked down is cut and continued; an attempt waiting for its
  first byte gives up at first_byte_factor x its predicted TTFT (within [first_byte_floor_s,
  first_byte_cap_s]) or when its pool is marked down, and fails over. The cut pool drops the request
  when it wakes (the gateway closed its connection).
- `continue+hedge`: and gateway/edge/hedge.py: a request with no first byte by hedge_factor x its
  predicted TTFT (at least hedge_min_s) also goes to the runner-up of its decision, if that pool is
  healthy and not predicted full and the gateway's HedgeBudget (the real class, on the simulated
  clock) has room; the first token wins, the other attempt is dropped (its pool frees the slot when
  the cancel reaches it).

Simplifications: a pool aborting a request frees its slot, but a request already queued behind it
on that slot keeps its start (PoolSim.abort); a stall shifts every later step of the pool by its
length; the tokens a cut stream got are counted at the pool's decode rate up to the fault.
Goodput: a request answered in full, no error ever reached its client, first token within slo_s of
its first try, and no gap between two tokens longer than gap_slo_s (the SLO, in the JSON).
"""
from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

from benchmarks.sim.faults import CRASH, Att, predicted_full
from benchmarks.sim.run import Simulation
from gateway.config import ProbeConfig, ResilienceConfig, UpstreamConfig
from gateway.edge.hedge import HedgeBudget
from gateway.routing.framework import Decision

MODES = ("none", "continue", "continue+hedge")
# event kinds beyond run.py's (0..4); the last field of these is an attempt id, or a request / fault
A_ARRIVE, A_END, A_FIRST, A_CUT, A_DEAD, HEDGE, RETRY = range(10, 17)
F_CRASH, F_STALL, F_DETECT, F_UP, F_REPAIR, F_WAKE = range(20, 26)


class FailureSim(Simulation):
    """The `latency` profile over a mesh whose pools fail, answering as `mode` says (module docstring).
    Keeps the base forwarder (refusals included) for each try's first attempt."""

    def __init__(self, *args: Any, mode: str = "none", faults: list[tuple[float, int, int, float]] | None = None,
                 **kw: Any):
        super().__init__(*args, **kw)
        assert mode in MODES, mode
        self.mode = mode
        self.resume, self.hedge = mode != "none", mode == "continue+hedge"
        self.rc, self.uc, probe = ResilienceConfig(), UpstreamConfig(), ProbeConfig()
        self.crash_detect_s = probe.down_after * self.s.probe_period_s
        self.stall_detect_s = probe.down_after * probe.timeout_s
        self.up_s = self.s.probe_period_s * probe.up_after
        self.faults = faults or []
        n = len(self.arr.t)
        nan = math.nan
        self.atts: list[Att] = []
        self.on_pool: list[list[int]] = [[] for _ in self.pools]  # attempts admitted, pruned as they end
        self.req_atts: dict[int, list[int]] = {}  # request -> its live attempts
        self.pending: Att | None = None  # the attempt being admitted
        self.t_first_try = list(self.t_gw)
        self.first_gw = [nan] * n  # when the kept answer's first token reached the gateway
        self.done_gw = [nan] * n  # when its last did
        self.max_gap = [0.0] * n
        self.tries, self.resumes, self.failovers, self.num_resumes = [0] * n, [0] * n, [0] * n, [0] * n
        self.pred: dict[int, dict[str, float]] = {}  # a try's decision's predicted TTFTs, until admitted
        self.cut_seen, self.lost, self.met = [False] * n, [False] * n, [False] * n
        self.hedged, self.hedge_won = [False] * n, [False] * n
        self.avoid: dict[int, frozenset[int]] = {}
        self.decisions: dict[int, Decision] = {}
        self.racing: set[int] = set()
        self.in_chain: set[int] = set()  # the base forwarder still walks this request's ranking
        self.drop_chain: set[int] = set()  # ... but a hedge won meanwhile: its attempt is dropped
        self.dead: dict[int, float] = {}  # crashed pool -> repaired at
        self.wake: dict[int, float] = {}  # stalled pool -> wakes at
        self.stall_at: dict[int, float] = {}
        self.down: set[int] = set()  # marked down by the gateways
        self.budgets = [HedgeBudget(self.rc.hedge_budget, self.rc.hedge_window_s) for _ in self.view.gws]
        self.num_hedges = self.num_hedge_skipped = 0
        self.fault_counts = {"crashes": 0, "stalls": 0, "dropped_overlapping": 0, "attempts_given_up": 0}

    def initial_events(self) -> list[tuple[float, int, int, int, int]]:
        return [(t, F_CRASH if kind == CRASH else F_STALL, 0, p, k) for k, (t, kind, p, _) in enumerate(self.faults)]

    # -- the base forwarder's hooks --------------------------------------------------------------
    def decide(self, i: int, now: float, avoid: frozenset[int] = frozenset(), extra_tokens: int = 0) -> Decision:
        d = super().decide(i, now, avoid, extra_tokens)
        self.last_decision = d
        return d

    def route(self, i: int, now: float) -> None:
        """A try of request i reaches its gateway (the first, or a client's retry)."""
        super().route(i, now)
        d = self.last_decision
        if not d.ranked:
            return
        self.in_chain.add(i)
        self.pred[i] = d.predicted_ms
        if not self.hedge:
            return
        self.budgets[self.metro[i]].request(now)
        self.decisions[i] = d
        pred_ms = d.predicted_ms.get(d.ranked[0].pool_id, 0.0) if d.ranked else 0.0
        t_h = now + max(self.rc.hedge_min_s, self.rc.hedge_factor * pred_ms / 1000.0)
        heapq.heappush(self.events, (t_h, HEDGE, self.tries[i], 0, i))

    def unrouted(self, i: int, now: float) -> None:
        self._client_error(i, now)  # every pool it may use is down: a 503

    def on_arrive(self, now: float, g: int, p: int, j: int) -> None:
        if j in self.drop_chain or p in self.dead:
            self.rest.pop(j, None)
            self.in_chain.discard(j)
            if j in self.drop_chain:
                self.drop_chain.discard(j)
                self._release(g, p)
                return
            # a refused connection: the gateway sees it a one-way delay later and fails over
            att = self._new_att(j, g, p, now - self.view.gws[g].rtt_s[p] / 2, 0)
            heapq.heappush(self.events, (now + self.view.gws[g].rtt_s[p] / 2, A_DEAD, g, p, att))
            return
        if self.wake.get(p, 0.0) > now:  # a stopped process cannot refuse: the request waits in its socket
            self.rest.pop(j, None)
        super().on_arrive(now, g, p, j)

    def on_refused(self, now: float, g: int, p: int, j: int) -> None:
        if j in self.drop_chain:
            self.drop_chain.discard(j)
            self.in_chain.discard(j)
            self.rest.pop(j, None)
            self._release(g, p)
            return
        super().on_refused(now, g, p, j)

    def serve(self, p: int, now: float, prefill: int, j: int) -> tuple[float, float]:
        done = self.pending.done if self.pending is not None else 0
        left = max(1, self.output[j] - done)
        return self.pools[p].admit(now, prefill + done, left, max(left, self.max_tokens[j] - done))

    def admitted(self, now: float, g: int, p: int, j: int, may_refuse: bool, first: float, end: float) -> None:
        att = self.pending
        if att is None:  # the base forwarder's attempt
            self.in_chain.discard(j)
            att = self.atts[self._new_att(j, g, p, now - self.view.gws[g].rtt_s[p] / 2, 0)]
            att.pred_s = self.pred.pop(j, {}).get(self.view.pool_ids[p], 0.0) / 1000.0
        a = att.a
        att.idx, att.first, att.end = len(self.pools[p].arr) - 1, first, end
        self.on_pool[p].append(a)
        r = self.view.gws[g].rtt_s[p]
        heapq.heappush(self.events, ((first if may_refuse else now) + r / 2, 1, g, p, j))  # HEADER: the load header
        self._push_end(a)
        if j in self.racing:
            self._push_first(a)
        if p in self.wake and self.wake[p] > now:
            self.met[j] = True
            self._stalled(a, now)

    # -- events ----------------------------------------------------------------------------------
    def on_event(self, now: float, kind: int, g: int, p: int, j: int) -> None:
        if kind < A_ARRIVE:
            super().on_event(now, kind, g, p, j)
        elif kind == A_ARRIVE:
            self._arrive(now, j)
        elif kind == A_END:
            self._end(now, j)
        elif kind == A_FIRST:
            self._first(now, j)
        elif kind == A_CUT:
            att = self.atts[j]
            if att.live and att.cut_ev == now:
                self._cut(j, now)
        elif kind == A_DEAD:
            self._cut(j, now)
        elif kind == HEDGE:
            self._hedge(now, j, g)
        elif kind == RETRY:
            self.t_gw[j] = now
            self.now = now
            self.route(j, now)
        elif kind == F_CRASH:
            self._crash(now, p, self.faults[j][3])
        elif kind == F_STALL:
            self._stall(now, p, self.faults[j][3])
        elif kind == F_DETECT:
            self._mark(now, p, down=True)
        elif kind == F_UP:
            self._mark(now, p, down=False)
        elif kind == F_REPAIR:
            self.dead.pop(p, None)
        elif kind == F_WAKE:
            self.wake.pop(p, None)
            self.stall_at.pop(p, None)

    def _new_att(self, j: int, g: int, p: int, sent: float, done: int, join_from: float = math.nan) -> int:
        a = len(self.atts)
        self.atts.append(Att(a, j, g, p, sent, done, join_from))
        self.req_atts.setdefault(j, []).append(a)
        return a

    def _push_end(self, a: int) -> None:
        att = self.atts[a]
        att.end_ev = att.end + self.view.gws[att.g].rtt_s[att.p] / 2
        heapq.heappush(self.events, (att.end_ev, A_END, att.g, att.p, a))

    def _push_first(self, a: int) -> None:
        att = self.atts[a]
        if att.idx >= 0:
            att.first_ev = att.first + self.view.gws[att.g].rtt_s[att.p] / 2
            heapq.heappush(self.events, (att.first_ev, A_FIRST, att.g, att.p, a))

    def _release(self, g: int, p: int) -> None:
        e = self.view.gws[g].eps[p]
        assert e is not None
        e.in_flight -= 1

    def _drop(self, a: int) -> None:
        att = self.atts[a]
        att.live = False
        self._release(att.g, att.p)
        lst = self.req_atts.get(att.j)
        if lst is not None and a in lst:
            lst.remove(a)

    def _arrive(self, now: float, a: int) -> None:
        att = self.atts[a]
        if not att.live:
            return
        if att.p in self.dead:
            heapq.heappush(self.events, (now + self.view.gws[att.g].rtt_s[att.p] / 2, A_DEAD, att.g, att.p, a))
            return
        self.pending = att
        self.admit(now, att.g, att.p, att.j, False)
        self.pending = None

    def _end(self, now: float, a: int) -> None:
        att = self.atts[a]
        if not att.live or att.end_ev != now:
            return
        j, r = att.j, self.view.gws[att.g].rtt_s[att.p]
        self._drop(a)
        if math.isnan(self.first_gw[j]):
            self.first_gw[j] = att.first + r / 2
        if not math.isnan(att.join_from):
            self.max_gap[j] = max(self.max_gap[j], att.first + r / 2 - att.join_from)
        self.done_gw[j] = now
        for b in list(self.req_atts.get(j, ())):
            self._cancel(b, now)
        self.racing.discard(j)

    def _first(self, now: float, a: int) -> None:
        """A racing attempt's first token reached the gateway: it wins, the others are dropped."""
        att = self.atts[a]
        j = att.j
        if not att.live or att.first_ev != now or j not in self.racing:
            return
        self.racing.discard(j)
        self.hedge_won[j] = att.hedge
        for b in list(self.req_atts.get(j, ())):
            if b != a:
                self._cancel(b, now)
        if j in self.in_chain:
            self.drop_chain.add(j)

    def _cancel(self, a: int, now: float) -> None:
        """The gateway drops attempt a's connection; its pool frees the request when it hears (or wakes)."""
        att = self.atts[a]
        if not att.live:
            return
        self._drop(a)
        if att.idx >= 0:
            at = now + self.view.gws[att.g].rtt_s[att.p] / 2
            at = max(at, self.wake.get(att.p, at))
            if att.p not in self.dead:
                self.pools[att.p].abort(att.idx, at)

    def _tokens_by(self, att: Att, t: float) -> int:
        """Tokens the attempt had produced at pool time t (counting its earlier ones)."""
        if att.idx < 0 or att.first > t:
            return att.done
        left: int = max(1, self.output[att.j] - att.done)
        rate = left / max(att.end - att.first, 1e-9)
        return int(att.done + min(left - 1, 1 + int((t - att.first) * rate)))

    def _cut(self, a: int, now: float) -> None:
        """The gateway sees attempt a broken, stalled or given up at `now`."""
        att = self.atts[a]
        if not att.live:
            return
        j, p, r = att.j, att.p, self.view.gws[att.g].rtt_s[att.p]
        self.met[j] = True
        self.fault_counts["attempts_given_up"] += 1
        t_pool = min(now - r / 2, self.stall_at.get(p, math.inf)) if p in self.wake else now - r / 2
        had_first = att.idx >= 0 and att.first <= t_pool
        done = self._tokens_by(att, t_pool)
        self._cancel(a, now)
        racing = bool(self.req_atts.get(j))
        if racing and att.hedge:  # the hedge's call may use its one pool only: the race goes on without it
            return
        if not racing:
            self.racing.discard(j)
        if had_first and math.isnan(self.first_gw[j]):
            self.first_gw[j] = att.first + r / 2
        avoid = self.avoid.get(j, frozenset()) | {p}
        self.avoid[j] = avoid
        if not had_first:  # this attempt sent nothing (a first try, or a continuation): fail over
            self.failovers[j] += 1
            if self.failovers[j] < self.uc.max_attempts:  # (racing a hedge: the primary's call fails over)
                self._send(j, now, avoid, att.done, att.join_from)  # a continuation's join stays open
            elif not racing:
                self._client_error(j, now)
            return
        if self.resume and self.resumes[j] < self.rc.max_resumes:
            self.resumes[j] += 1
            self.num_resumes[j] += 1
            self._send(j, now, avoid, done, min(now, (self.stall_at[p] if p in self.wake else t_pool) + r / 2))
        else:
            self._client_error(j, now)

    def _send(self, j: int, now: float, avoid: frozenset[int], done: int, join_from: float) -> None:
        self.now = now
        d = self.decide(j, now, avoid, done)
        if not d.ranked:
            self._client_error(j, now)
            return
        e = d.ranked[0]
        q = self.view.send(e)
        g = self.metro[j]
        a = self._new_att(j, g, q, now, done, join_from)
        self.atts[a].pred_s = d.predicted_ms.get(e.pool_id, 0.0) / 1000.0
        heapq.heappush(self.events, (now + self.view.gws[g].rtt_s[q] / 2, A_ARRIVE, g, q, a))

    def _client_error(self, j: int, now: float) -> None:
        """An error reaches the client: it asks again from scratch, or gives up."""
        self.cut_seen[j] = True
        for b in list(self.req_atts.get(j, ())):
            self._cancel(b, now)
        self.racing.discard(j)
        if self.tries[j] >= self.s.client_retries:
            self.lost[j] = True
            return
        self.tries[j] += 1
        self.resumes[j] = self.failovers[j] = 0
        self.avoid.pop(j, None)
        self.first_gw[j], self.max_gap[j], self.hedged[j] = math.nan, 0.0, False
        heapq.heappush(self.events, (now + self.client_ms[j] / 1000.0 + self.s.client_retry_s, RETRY, 0, 0, j))

    def _hedge(self, now: float, j: int, try_no: int) -> None:
        d = self.decisions.pop(j, None)
        if d is None or try_no != self.tries[j] or self.hedged[j] or not math.isnan(self.done_gw[j]):
            return
        live = self.req_atts.get(j, [])
        if not math.isnan(self.first_gw[j]):
            return
        for a in live:
            att = self.atts[a]
            if att.idx >= 0 and att.first + self.view.gws[att.g].rtt_s[att.p] / 2 <= now:
                return  # the first byte is in
        target = next((e for e in d.ranked[1:] if e.healthy and not e.breaker_open and not predicted_full(e)), None)
        if target is None:
            return
        g = self.metro[j]
        if not self.budgets[g].take(now):
            self.num_hedge_skipped += 1
            return
        self.num_hedges += 1
        self.hedged[j] = True
        self.racing.add(j)
        for a in live:
            self._push_first(a)
        q = self.view.send(target)
        a = self._new_att(j, g, q, now, 0)
        self.atts[a].pred_s = d.predicted_ms.get(target.pool_id, 0.0) / 1000.0
        self.atts[a].hedge = True
        heapq.heappush(self.events, (now + self.view.gws[g].rtt_s[q] / 2, A_ARRIVE, g, q, a))

    # -- faults ----------------------------------------------------------------------------------
    def _live_on(self, p: int, t: float) -> list[int]:
        """Attempts admitted at pool p that the pool still holds at t."""
        keep = [a for a in self.on_pool[p] if self.pools[p].end_i[self.atts[a].idx] > t]
        self.on_pool[p] = keep
        return keep

    def _crash(self, now: float, p: int, repair_s: float) -> None:
        if p in self.dead or p in self.wake:
            self.fault_counts["dropped_overlapping"] += 1
            return
        self.fault_counts["crashes"] += 1
        self.dead[p] = now + repair_s
        held = self._live_on(p, now)
        self.pools[p].crash(now, now + repair_s, [self.atts[a].idx for a in held])
        reset = getattr(self.pools[p], "reset_cache", None)
        if reset is not None:
            reset()
        for a in held:
            att = self.atts[a]
            if att.live:  # the connection resets: the gateway hears it a one-way delay later
                att.cut_ev = now + self.view.gws[att.g].rtt_s[p] / 2
                heapq.heappush(self.events, (att.cut_ev, A_CUT, att.g, p, a))
        heapq.heappush(self.events, (now + self.crash_detect_s, F_DETECT, 0, p, 0))
        heapq.heappush(self.events, (now + repair_s, F_REPAIR, 0, p, 0))
        heapq.heappush(self.events, (now + max(repair_s, self.crash_detect_s) + self.up_s, F_UP, 0, p, 0))

    def _stall(self, now: float, p: int, dur_s: float) -> None:
        if p in self.dead or p in self.wake:
            self.fault_counts["dropped_overlapping"] += 1
            return
        self.fault_counts["stalls"] += 1
        self.wake[p], self.stall_at[p] = now + dur_s, now
        held = self._live_on(p, now)
        self.pools[p].stall(now, dur_s, [self.atts[a].idx for a in held])
        for a in held:
            att = self.atts[a]
            if att.first > now:
                att.first += dur_s
            att.end += dur_s
            if att.live:
                self.met[att.j] = True
                self._push_end(a)
                if att.j in self.racing:
                    self._push_first(a)
                self._stalled(a, now)
        if dur_s > self.stall_detect_s:  # still silent when its probes run out
            heapq.heappush(self.events, (now + self.stall_detect_s, F_DETECT, 0, p, 0))
            heapq.heappush(self.events, (now + dur_s + self.up_s, F_UP, 0, p, 0))
        heapq.heappush(self.events, (now + dur_s, F_WAKE, 0, p, 0))

    def _stalled(self, a: int, now: float) -> None:
        """Attempt a is on a stalled pool at `now`: when, by the mode's rules, the gateway gives it up."""
        att = self.atts[a]
        p, j = att.p, att.j
        r = self.view.gws[att.g].rtt_s[p]
        t_s, wake = self.stall_at[p], self.wake[p]
        detect = t_s + self.stall_detect_s if wake - t_s > self.stall_detect_s else math.inf
        if att.first <= t_s:  # streaming: the last token reached the gateway at t_s + r/2
            last = t_s + r / 2
            bound = self.uc.idle_timeout_s
            if self.resume:
                itl = 1.0 / self.pools[p].dtps  # the pool's per-stream token interval
                bound = min(max(self.rc.stall_factor * itl, self.rc.stall_floor_s), self.rc.stall_cap_s)
            give_up = last + bound
            if self.resume:
                give_up = min(give_up, max(detect, now))
            if give_up >= wake + r / 2:  # the tokens come back first: the client sees a gap
                self.max_gap[j] = max(self.max_gap[j], wake - t_s)
                return
        else:  # waiting for its first byte
            bound = self.uc.first_byte_timeout_s
            if self.resume:
                bound = min(max(self.rc.first_byte_factor * att.pred_s, self.rc.first_byte_floor_s),
                            self.rc.first_byte_cap_s)
            give_up = att.sent + bound
            if self.resume:
                give_up = min(give_up, max(detect, now))
            if give_up >= att.first + r / 2:
                return
        att.cut_ev = max(give_up, now)
        heapq.heappush(self.events, (att.cut_ev, A_CUT, att.g, p, a))

    def _mark(self, now: float, p: int, down: bool) -> None:
        """Every gateway's probes mark pool p down (or up again): its Endpoint.healthy, which the
        profiles' `available` filter and the hedge's runner-up read."""
        if down:
            self.down.add(p)
        else:
            self.down.discard(p)
        for gw in self.view.gws:
            self.view.endpoint(gw, p, now).healthy = not down

    # -- outcomes --------------------------------------------------------------------------------
    def outcomes(self) -> dict[str, Any]:
        m = self.arr.measured
        c = self.arr.client_ms / 1000.0
        t0 = np.array(self.t_first_try)
        ttft = np.array(self.first_gw) - t0 + c
        e2e = np.array(self.done_gw) - t0 + c
        return {"ttft_s": ttft[m], "e2e_s": e2e[m], "max_gap_s": np.array(self.max_gap)[m],
                "cut": np.array(self.cut_seen)[m], "lost": np.array(self.lost)[m],
                "resumed": np.array(self.num_resumes)[m] > 0, "hedged": np.array(self.hedged)[m],
                "hedge_won": np.array(self.hedge_won)[m], "met_failure": np.array(self.met)[m],
                "failovers": np.array(self.failovers)[m], "arrival_s": t0[m]}
