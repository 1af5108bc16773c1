"""The gateways' side of the simulation: each gateway's view of the pools, kept as its background
tasks would keep it, and the candidate set each routing decision considers.

Every routing decision is `build_profile(name).route(RouteRequest, endpoints)` on real `Endpoint`
objects whose fields are kept as gateway/pools/upstream.py and gateway/edge/forward.py keep them:
`load` from periodic probes (every probe period, the pool's state when the probe reached it,
delivered one RTT after sending) and from the load header of each answer (the rates of the last
probe kept, as Pool.load_from_header does), `rtt_ms` an EWMA (alpha 0.3) of noisy probe samples,
`in_flight` credited on send and released when the gateway sees the answer end (or a refusal), and
`sent_since_report` counted on send and reset by every report (in-flight crediting). Pools with a
load stream (gateway/pools/load_stream.py: the probe_nearest nearest and the spill list's, each
kept stream_linger_s after it left the list) give their state as pushed: the pool's at the last
multiple of stream_step_s one one-way delay back, `load_pushed` set (routing takes it as current).
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from benchmarks.sim.mesh import F64, Mesh
from benchmarks.sim.pool import PoolSim
from benchmarks.sim.settings import MODELS, Settings
from gateway.config import LoadStreamConfig, ProbeConfig, RoutingOptions
from gateway.core.types import Endpoint, LoadReport
from gateway.routing.framework import Profile
from gateway.routing.latency import BASE_SPREAD_SLOTS
from gateway.routing.plugins import build_profile
from geo.sites import DistancePrior

# Probe noise as geo.eval simulates it: log-normal jitter, and a few probes that hit a queue.
PROBE_SIGMA, PROBE_OUTLIER_P, PROBE_OUTLIER = 0.1, 0.05, (1.5, 5.0)
RTT_ALPHA = 0.3  # gateway/pools/upstream.py
EWMA_N = [1 - (1 - RTT_ALPHA) ** n for n in range(6)]  # the weight n samples of one value get


def make_profile(policy: str, s: Settings, prior: DistancePrior, clock: Callable[[], float]) -> Profile:
    """The gateway's profile, its clock the simulation's (the age of load reports matters to it)."""
    opts = RoutingOptions(rtt_inflation=prior.inflation, rtt_intercept_ms=prior.intercept_ms)
    return build_profile(policy, opts, rng=random.Random(s.seed + 5), clock=clock)


def probe_rotation(est_ms: F64, s: Settings, rng: np.random.Generator) -> tuple[NDArray[np.intp], int]:
    """Which round of a rotation pass probes each (gateway, pool): -1 for a gateway's
    probe_nearest nearest pools (every round), else a random slot among the pass's rounds (a
    shuffled order taken probe_rotating at a time, as CandidateSelector does; one fixed order here)."""
    g, n = est_ms.shape
    k = s.probe_nearest
    if k is None or n <= k + s.probe_rotating:  # a small mesh: everyone, every round
        return np.full((g, n), -1, dtype=np.intp), 1
    pass_rounds = max(1, math.ceil((n - k) / max(s.probe_rotating, 1)))
    slot = rng.integers(0, pass_rounds, size=(g, n))
    nearest = np.argsort(est_ms, axis=1, kind="stable")[:, :k]
    np.put_along_axis(slot, nearest, -1, axis=1)
    return slot.astype(np.intp), pass_rounds


def round_duration_s(rtt_ms: F64, rot_slot: NDArray[np.intp], s: Settings, rng: np.random.Generator,
                     draws: int = 16) -> F64:
    """Each gateway's typical probe round: its slowest probe (capped at ProbeConfig.timeout_s), the
    longest RTT among its nearest pools and a rotating sample (every pool when all are probed)."""
    out = np.empty(rtt_ms.shape[0])
    for g in range(rtt_ms.shape[0]):
        near, far = rtt_ms[g][rot_slot[g] < 0], rtt_ms[g][rot_slot[g] >= 0]
        longest = near.max()
        if len(far) and s.probe_rotating > 0:
            sample = rng.choice(far, size=(draws, min(s.probe_rotating, len(far))))
            longest = float(np.mean(np.maximum(sample.max(axis=1), longest)))
        out[g] = min(longest / 1000.0, ProbeConfig().timeout_s)
    return out


def expected_wait_s(qw: F64, backlog: F64, running: F64, held: F64, slots: F64, mean_s: F64, age: F64,
                    rtt_s: F64 | float = 0.0) -> F64:
    """gateway/routing/latency.py's TtftModel.queue_s for a request of no prompt, over arrays (each
    pool's report, its age and the RTT to it): prefill backlog + P(full when the request gets there,
    age + RTT from the report) x a slot's wait per request ahead; pools without slot figures (slots
    0): their queue_wait_s counted down by the age."""
    with np.errstate(divide="ignore", invalid="ignore"):
        headroom = slots - held
        turnover = np.maximum(np.minimum(running, slots), 1) / mean_s
        spread = np.sqrt(turnover * (age + rtt_s) + BASE_SPREAD_SLOTS**2)
        p_full = 0.5 * _erfc((headroom - 0.5) / (spread * math.sqrt(2.0)))
        with_slots = backlog + p_full * np.maximum(1, 1 - headroom) * mean_s / slots
    return np.where((slots > 0) & (mean_s > 0), with_slots, np.maximum(0.0, qw - age))


def _erfc(x: F64) -> F64:
    """math.erfc over an array (Abramowitz & Stegun 7.1.26: absolute error < 1.5e-7)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    y = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))) * np.exp(-z * z)
    return np.where(x >= 0, y, 2.0 - y)


class GatewaySim:
    """One gateway's mesh view: an Endpoint per pool (made when first needed), the candidate order,
    and which probe rounds reach each pool (rot_slot -1: every round; else the round, modulo a pass
    of the rotation, in which the rotating sample takes it)."""

    __slots__ = ("eps", "last_round", "phase", "period", "rtt_s", "prior_ms", "near", "near_cc", "spill", "rot_slot",
                 "spill_seen", "streamed")

    def __init__(self, n: int, phase: float, period: float, rtt_ms: F64, est_ms: F64, prior_ms: F64,
                 rot_slot: NDArray[np.intp]):
        self.eps: list[Endpoint | None] = [None] * n
        self.last_round = [-(10**9)] * n
        self.phase, self.period = phase, period
        self.rtt_s = (rtt_ms / 1000.0).tolist()
        self.prior_ms = prior_ms.tolist()
        # by measured RTT: a static 3 % EWMA error stands in for the periodic re-sort (RTTs do not drift here)
        self.near: list[int] = np.argsort(est_ms, kind="stable").tolist()
        self.near_cc: dict[str, list[int]] = {}
        self.spill: list[int] = []
        self.spill_seen: dict[int, float] = {}  # pool -> when it was last on the spill list (load streams)
        self.streamed: set[int] = set()  # pools beyond the nearest with a load stream
        self.rot_slot: list[int] = rot_slot.tolist()


class MeshView:
    """Every gateway's view of the pools, refreshed lazily: when a decision reads an endpoint, the
    probe rounds whose answers are back by then are applied first."""

    def __init__(self, mesh: Mesh, pools: list[PoolSim], s: Settings, track_load: bool):
        self.mesh, self.pools, self.s = mesh, pools, s
        n = len(mesh.sites)
        self.country = [x.country for x in mesh.sites]
        self.all_pools, self.by_country = list(range(n)), {}  # (candidates "anywhere")
        self.anywhere = random.Random(s.seed + 9)
        self.pool_ids = [f"p{p:04d}" for p in range(n)]
        self.index = {pid: p for p, pid in enumerate(self.pool_ids)}
        est = mesh.rtt_ms * np.random.default_rng(s.seed + 3).lognormal(0, 0.03, mesh.rtt_ms.shape)  # EWMA error
        self.est_ms = est
        phases = np.random.default_rng(s.seed + 4).uniform(0, s.probe_period_s, len(mesh.gateways))
        self.rot_slot, self.pass_rounds = probe_rotation(est, s, np.random.default_rng(s.seed + 7))
        # Upstreams._probe_loop starts a round every period, or when the last one ends if that took
        # longer (a round waits for its slowest probe: the farthest pool of the rotating sample)
        self.round_s = round_duration_s(mesh.rtt_ms, self.rot_slot, s, np.random.default_rng(s.seed + 8))
        self.gws = [GatewaySim(n, float(phases[g]), max(s.probe_period_s, float(self.round_s[g])), mesh.rtt_ms[g],
                               est[g], mesh.prior_ms[g], self.rot_slot[g]) for g in range(len(mesh.gateways))]
        # every pool's report at each spill refresh (queue_wait_s, prefill backlog s, running, running +
        # waiting), for the gateways that hold it from a rotation turn
        self.hist, self.hist_tau, self.num_ticks = np.zeros((4, 64, n)), np.zeros(64), 0
        self.slots = np.array([p.slots if p.report_slots else 0 for p in pools], dtype=np.float64)
        self.mean_s = np.array([p.mean_service_s if p.report_slots else 0.0 for p in pools])
        # the spill list is refreshed after each round: at the median gateway's pace for all of them
        self.period, self.fresh = max(s.probe_period_s, float(np.median(self.round_s))), s.fresh_reports
        self.track_load = track_load  # load-blind profiles: skipping their reports saves time, changes no choice
        self.mean_wait = s.report == "mean"
        nrng = np.random.default_rng(s.seed + 6)
        noise = nrng.lognormal(0.0, PROBE_SIGMA, 1 << 16)  # probe samples / true RTT, used in turn
        noise *= np.where(nrng.random(noise.size) < PROBE_OUTLIER_P, nrng.uniform(*PROBE_OUTLIER, noise.size), 1.0)
        self.noise, self.noise_i = noise.tolist(), 0
        self.stream = s.load_stream and track_load and not self.fresh
        self.stream_step, self.linger = s.stream_step_s, (s.stream_linger_s if s.stream_spill else -1.0)
        self.stream_cap = LoadStreamConfig().max_streams
        self.max_streams = 0  # the most pools one gateway streamed from at once

    def endpoint(self, gw: GatewaySim, p: int, now: float) -> Endpoint:
        """Pool p as gateway gw sees it at `now`."""
        e = gw.eps[p]
        if e is None:
            e = gw.eps[p] = Endpoint(self.pool_ids[p], "", self.mesh.sites[p].id, "meshgate", MODELS)
            e.country = self.country[p]
            e.prior_rtt_ms = gw.prior_ms[p]
        r = gw.rtt_s[p]
        if self.stream:
            if gw.rot_slot[p] < 0 or p in gw.streamed:
                tau = math.floor((now - r / 2) / self.stream_step) * self.stream_step  # the state last pushed
                if tau + r / 2 > e.load_at:
                    e.load, e.load_at, e.sent_since_report = self.pools[p].report(tau, self.mean_wait), tau + r / 2, 0
                e.load_pushed = True
            else:
                e.load_pushed = False
        if self.fresh:  # what the pool would say if asked now (and the answer took no time)
            e.load, e.load_at, e.sent_since_report = self.pools[p].report(now, self.mean_wait), now, 0
        k = int((now - gw.phase - r) // gw.period)  # the last probe round whose answer is back
        slot, last = gw.rot_slot[p], gw.last_round[p]
        if slot >= 0:  # a pool beyond the nearest: probed once a pass, by the rotating sample
            k -= (k - slot) % self.pass_rounds
            samples = (k - last) // self.pass_rounds
        else:
            samples = k - last
        if k > last and k >= 0:
            # n probes since the last look: one sample stands in for them, weighted as their EWMA would be
            x = r * 1000.0 * self.noise[self.noise_i % len(self.noise)]
            self.noise_i += 1
            e.rtt_ms = x if e.rtt_ms is None else e.rtt_ms + EWMA_N[min(samples, 5)] * (x - e.rtt_ms)
            back = gw.phase + k * gw.period + r
            if back > e.load_at and self.track_load and not self.fresh:
                e.load = self.pools[p].report(back - r / 2, self.mean_wait)
                e.load_at, e.sent_since_report = back, 0
            gw.last_round[p] = k
        return e

    def send(self, e: Endpoint) -> int:
        """An attempt leaves for e's pool: forward.py's _attempt credits it at once."""
        e.in_flight += 1
        e.sent_since_report += 1
        return self.index[e.pool_id]

    def on_header(self, gw: GatewaySim, p: int, now: float) -> None:
        """A response's load header reaches the gateway at `now`: Pool.load_from_header."""
        e = gw.eps[p]
        assert e is not None
        if not self.track_load or self.fresh:
            return
        rep = self.pools[p].report(now - gw.rtt_s[p] / 2 - 1e-9, self.mean_wait)
        # LoadReport.from_header(rep.to_header()) without the string round trip: the header carries
        # waiting, running, queued tokens, KV blocks, queue wait (4 decimals), slots and mean request
        # duration; the rates are the last probe's (merge) or 0 (replace)
        old = e.load if self.s.header == "merge" else None
        e.load = LoadReport(rep.waiting, rep.running, rep.queued_prompt_tokens, rep.kv_blocks_used, rep.kv_blocks_total,
                            old.prefill_tps if old else 0.0, old.decode_tps if old else 0.0, round(rep.queue_wait_s, 4),
                            max_num_seqs=rep.max_num_seqs, mean_request_s=round(rep.mean_request_s, 3))
        e.load_at, e.sent_since_report = now, 0

    def candidates(self, gw: GatewaySim, cc: str | None) -> list[int]:
        """gateway/routing/candidates.py's rule: k_near by measured RTT, then k_spill from the spill
        list (lowest RTT + reported wait)."""
        s = self.s
        if s.candidates == "anywhere":  # blind to the network: any pools of the mesh (or the country)
            pool = self.all_pools if cc is None else self.by_country.setdefault(
                cc, [p for p, c in enumerate(self.country) if c == cc])
            return self.anywhere.sample(pool, min(len(pool), s.k_near + s.k_spill))
        if cc is None:
            near = gw.near[: s.k_near]
        else:
            lst = gw.near_cc.get(cc)
            if lst is None:
                lst = gw.near_cc[cc] = [p for p in gw.near if self.country[p] == cc]
            near = lst[: s.k_near]
        if s.candidates == "near" or not s.k_spill:
            return near
        out, taken, country = list(near), set(near), self.country
        for p in gw.spill:
            if p not in taken and (cc is None or country[p] == cc):
                out.append(p)
                if len(out) >= s.k_near + s.k_spill:
                    break
        return out

    def refresh_spill(self, now: float) -> None:
        """After each probe round: every gateway re-ranks the mesh by RTT + the wait the latency
        model expects from the report it holds (CandidateSet.refresh). The nearest pools' reports
        are between one RTT and a period plus an RTT old (taken as half a period); a pool reached
        only by the rotating sample is judged by its last turn's report, aged since (none yet: no
        wait, as for a pool with no report). Left out here: load headers, and the gateway's own
        sends since a report (they lower the headroom in CandidateSet)."""
        tau = now - self.period / 2
        m_now = self.num_ticks
        if m_now >= len(self.hist_tau):
            self.hist = np.concatenate([self.hist, np.zeros_like(self.hist)], axis=1)
            self.hist_tau = np.concatenate([self.hist_tau, np.zeros_like(self.hist_tau)])
        reps = [p.report(tau, self.mean_wait) for p in self.pools]
        self.hist[:, m_now] = [[r.queue_wait_s for r in reps], [r.queued_prompt_tokens / r.prefill_tps for r in reps],
                               [r.running for r in reps], [r.running + r.waiting for r in reps]]
        self.hist_tau[m_now] = tau
        self.num_ticks += 1
        slot = self.rot_slot
        turn = np.where(slot >= 0, m_now - (m_now - slot) % self.pass_rounds, m_now)  # (G, N) the last tick probed
        known = turn >= 0
        cols = np.arange(len(reps))[None, :]
        qw, backlog, running, held = (self.hist[i][np.maximum(turn, 0), cols] for i in range(4))
        age = now - self.hist_tau[np.maximum(turn, 0)]
        if self.stream:
            # pools with a load stream: their state a step or two ago, taken as current (age 0)
            tau_s = math.floor(now / self.stream_step) * self.stream_step - self.stream_step
            pushed = [p.report(tau_s, self.mean_wait) for p in self.pools]
            cur = np.array([[r.queue_wait_s for r in pushed], [r.queued_prompt_tokens / r.prefill_tps for r in pushed],
                            [r.running for r in pushed], [r.running + r.waiting for r in pushed]])
            sub = slot < 0
            for g, gw in enumerate(self.gws):
                if gw.streamed:
                    sub[g, list(gw.streamed)] = True
            self.max_streams = max(self.max_streams, int(sub.sum(axis=1).max()))
            qw, backlog, running, held = (np.where(sub, cur[i][None, :], x) for i, x in enumerate((qw, backlog, running, held)))
            age = np.where(sub, 0.0, age)
            known = known | sub
        wait = expected_wait_s(qw, backlog, running, held, self.slots, self.mean_s, age, self.est_ms / 1000.0)
        m = min(len(reps), 2 * (self.s.k_near + self.s.k_spill))
        est = self.est_ms + 1000.0 * np.where(known, wait, 0.0)
        top = np.argpartition(est, m - 1, axis=1)[:, :m]
        order = np.take_along_axis(top, np.argsort(np.take_along_axis(est, top, axis=1), axis=1), axis=1)
        for gw, row in zip(self.gws, order.tolist()):
            gw.spill = row
            if self.stream and self.linger >= 0:
                self._want(gw, row, now)

    def _want(self, gw: GatewaySim, row: list[int], now: float) -> None:
        """LoadStreams.want(CandidateSet.wanted(probe_nearest)): the nearest pools, then the spill
        list, then those that left it less than stream_linger_s ago (the latest first), up to
        LoadStreamConfig.max_streams in all."""
        seen = gw.spill_seen
        for p in row:
            seen[p] = now
        for p in [p for p, t in seen.items() if now - t > self.linger]:
            del seen[p]
        room = self.stream_cap - (self.s.probe_nearest or 0)
        far = [p for p in row if gw.rot_slot[p] >= 0]
        taken = set(far)
        far += sorted((p for p in seen if p not in taken and gw.rot_slot[p] >= 0), key=lambda p: -seen[p])
        gw.streamed = set(far[:max(0, room)])
