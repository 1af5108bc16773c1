"""Two central schedulers to measure the routing profiles against. Neither is a gateway profile:
each decides for every request of the mesh, over every pool (residency permitting), the moment the
request reaches its metro's gateway, and sends it over the true RTT.

`oracle` (the issue's "knows true RTT and queues"): knows every pool's true state *now*, with no
staleness or probe noise: the true RTT, how many requests each pool holds (running, waiting, and
its own requests still in transit to it, since it sent them), the prefill backlog of the ones that
have a slot, and when a request ends (it sees the slot free when it frees). It does not know the
future: not how long the running requests will still decode. It takes the argmin of its expected
TTFT = RTT + wait for a slot + prefill backlog + prefill, where the wait for a slot, at a pool
with none free, is estimated as a pool could honestly estimate it. Two estimates a pool has:
- `mean` (the default): ahead x mean request duration / slots, where `ahead` counts the requests
  queued before this one (its own in transit included) and the mean duration is the pool's own
  (mean prompt / its prefill rate + mean answer / its decode rate): a pool knows it from the
  requests it has served. With `slots` busy sequences, one frees every mean duration / slots on
  average, whatever their lengths.
- `max_tokens`: gateway/worker/engine.py's rule, the ahead-th smallest (max_tokens - tokens so far)
  of the running requests times the decode step: exact knowledge of the limits, but clients send
  max_tokens 1024 for answers of 286 tokens on average, so it overestimates ~3.6x.
The `oracle/max-tokens` variant row runs the second, so that the goal is measured against the
better of the two (benchmarks/RESULTS.md gives both; they differ little, since a central scheduler
that sees every pool almost always finds a free slot within reach and needs no estimate at all).

`clairvoyant`: the same greedy argmin but knowing when each slot frees, i.e. the output lengths
of the requests already running (future information no pool or gateway has), and reserving the
slot as it decides. Not a bound on what routing could reach: it is greedy per request like the
oracle, and knowing output lengths does not make greedy choices better at the tail (its p99, 0.059
s, is above the fair oracle's 0.053 s in benchmarks/RESULTS.md). A reference row, not a goal.
"""
from __future__ import annotations

from bisect import bisect_right

import numpy as np
from numpy.typing import NDArray

from benchmarks.sim.mesh import F64, Mesh, mean_loguniform
from benchmarks.sim.pool import PoolSim
from benchmarks.sim.settings import Settings


class FairOracle:
    """The `oracle` row: true current state, estimated future (see the module docstring)."""

    def __init__(self, mesh: Mesh, pools: list[PoolSim], s: Settings, masks: dict[str, NDArray[np.bool_]]):
        self.mesh, self.pools, self.masks = mesh, pools, masks
        n = len(pools)
        self.slots = mesh.slots.astype(np.float64)
        self.ptps = mesh.prefill_tps.copy()
        mean_prompt = mean_loguniform(s.min_prompt_tokens, s.max_prompt_tokens)
        mean_output = mean_loguniform(s.min_output_tokens, s.max_output_tokens)
        # a pool's mean request duration at its own speeds, per slot: one slot frees this often
        self.free_every_s = (mean_prompt / mesh.prefill_tps + mean_output / mesh.decode_tps) / self.slots
        self.held = np.zeros(n)  # requests sent and not finished: in transit, waiting or running
        self.transit_tokens = np.zeros(n)  # prompt tokens in transit
        self.prefill_free = np.zeros(n)  # when the prefill of the requests holding a slot ends
        self.max_tokens_wait = s.oracle_wait == "max_tokens"
        self.rtt_s = mesh.rtt_ms / 1000.0

    def pick(self, g: int, t: float, prompt: int, cc: str | None) -> int:
        r = self.rtt_s[g]
        a = t + r / 2  # when the request would reach each pool
        prefill = prompt / self.ptps
        free = self.held < self.slots
        # a slot is free (its own requests in transit counted): no request waits at the pool, so the
        # prefill backlog is the admitted ones' (exact: prompts and arrival times) plus those in transit
        backlog = np.maximum(t, self.prefill_free) + self.transit_tokens / self.ptps
        first = np.maximum(a, backlog) + prefill
        if not self.max_tokens_wait:
            slot_at = t + (self.held - self.slots + 1) * self.free_every_s
            first = np.where(free, first, np.maximum(a, slot_at) + prefill)
        ttft = r / 2 + first - t
        if cc is not None:
            ttft = np.where(self.masks[cc], ttft, np.inf)
        if self.max_tokens_wait:
            ttft = self._max_tokens_waits(ttft, free, t, a, prefill, r)
        return int(np.argmin(ttft))

    def _max_tokens_waits(self, ttft: F64, free: NDArray[np.bool_], t: float, a: F64, prefill: F64, r: F64) -> F64:
        """engine.py's slot wait, for the full pools that could still beat the best free one."""
        best = float(np.min(np.where(free, ttft, np.inf)))
        full = np.flatnonzero(~free & np.isfinite(ttft) & (r + prefill < best))
        out = np.where(free, ttft, np.inf)
        for p in full.tolist():
            pool = self.pools[p]
            in_transit = int(self.held[p]) - _held_at(pool, t)
            slot_at = t + pool.slot_wait_s(t, max(0, in_transit))
            out[p] = r[p] / 2 + max(a[p], slot_at) + prefill[p] - t
        return out

    def sent(self, p: int, prompt: int) -> None:
        self.held[p] += 1
        self.transit_tokens[p] += prompt

    def arrived(self, p: int, prompt: int) -> None:
        self.transit_tokens[p] -= prompt
        self.prefill_free[p] = self.pools[p].prefill_free

    def finished(self, p: int) -> None:
        self.held[p] -= 1


def _held_at(pool: PoolSim, tau: float) -> int:
    """Requests that have reached the pool by tau and not finished."""
    return bisect_right(pool.arr, tau) - bisect_right(pool.ends, tau)


class Clairvoyant:
    """The `clairvoyant` row: knows when each slot frees (the running requests' output lengths)."""

    def __init__(self, mesh: Mesh, masks: dict[str, NDArray[np.bool_]]):
        n = len(mesh.sites)
        self.mesh, self.masks = mesh, masks
        self.slot_free = np.zeros(n)  # every pool's earliest free slot
        self.prefill_free = np.zeros(n)  # and the end of its prefill queue
        self.ptps = mesh.prefill_tps.copy()
        self.rtt_s = mesh.rtt_ms / 1000.0

    def pick(self, g: int, t: float, prompt: int, cc: str | None) -> int:
        r = self.rtt_s[g]
        a = t + r / 2
        first = np.maximum(np.maximum(a, self.slot_free), self.prefill_free) + prompt / self.ptps
        ttft = r + first - a
        if cc is not None:
            ttft = np.where(self.masks[cc], ttft, np.inf)
        return int(np.argmin(ttft))

    def reserved(self, p: int, pool: PoolSim) -> None:
        """The request was admitted at p as it was decided (a reservation)."""
        self.slot_free[p], self.prefill_free[p] = pool.heap[0], pool.prefill_free
