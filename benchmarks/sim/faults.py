"""Pool failures for the mesh simulator (issue 17): the fault schedule, and an attempt of a request.

Faults (make_faults; seeded, the same schedule for every row of a run), per pool, Poisson at the
rates of Settings (per pool-hour of the simulated clock):
- crash: the pool's process or host dies at t. Every request in it is lost with it; its connections
  reset, so a gateway sees each stream break one one-way delay later (as SIGKILL in
  benchmarks/chaos.py). It refuses connections until it is repaired (repair_s, exponential), then
  serves again empty (no queue, no prefix cache). Gateways mark it down after ProbeConfig.down_after
  failed probes (refused at once: down_after x period_s), and up a probe period after the repair.
- stall: the pool stops producing for stall_s (exponential): in-flight streams get no token, queued
  requests no first token, a request that reaches it waits; then it carries on where it stopped.
  Probes time out, so gateways mark it down after down_after x ProbeConfig.timeout_s, if it is still
  silent then, and up a probe period after it wakes. A fault that falls on a pool already failing
  is dropped.
"""
from __future__ import annotations

import math

import numpy as np

from benchmarks.sim.settings import Settings
from gateway.core.types import Endpoint

CRASH, STALL = 0, 1


def make_faults(num_pools: int, horizon_s: float, s: Settings) -> list[tuple[float, int, int, float]]:
    """(time, CRASH | STALL, pool, duration) in time order: Poisson per pool, exponential durations."""
    rng = np.random.default_rng(s.seed + 13)
    out: list[tuple[float, int, int, float]] = []
    for kind, rate_h, mean_s in ((CRASH, s.crash_per_pool_hour, s.repair_s), (STALL, s.stall_per_pool_hour, s.stall_s)):
        n = int(rng.poisson(max(rate_h, 0.0) * num_pools * horizon_s / 3600.0))
        t = rng.uniform(0.0, horizon_s, n)
        pools = rng.integers(0, num_pools, n)
        dur = rng.exponential(mean_s, n)
        out += [(float(a), kind, int(b), float(c)) for a, b, c in zip(t, pools, dur)]
    out.sort()
    return out


def predicted_full(e: Endpoint) -> bool:
    """gateway/edge/hedge.py's rule: every slot taken and a queue, by its last report."""
    load = e.load
    return load is not None and load.max_num_seqs > 0 and load.running >= load.max_num_seqs and load.waiting > 0


class Att:
    """One attempt of a request on one pool."""

    __slots__ = ("a", "j", "g", "p", "sent", "pred_s", "done", "idx", "first", "end", "live", "end_ev", "first_ev",
                 "cut_ev", "join_from", "hedge")

    def __init__(self, a: int, j: int, g: int, p: int, sent: float, done: int, join_from: float):
        self.a, self.j, self.g, self.p, self.sent, self.done = a, j, g, p, sent, done
        self.pred_s = 0.0  # the decision's predicted TTFT at this pool (the first-byte bound's base)
        self.hedge = False
        self.idx = -1  # in the pool's lists, once admitted
        self.first = self.end = math.inf  # at the pool
        self.live = True
        self.end_ev = self.first_ev = self.cut_ev = -1.0  # when this attempt's pending events are due
        self.join_from = join_from  # a continuation: when the last token before the join reached the gateway
