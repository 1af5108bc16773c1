"""First bytes that come later than the latency model predicted, learned per pool (issue 17).

The latency model predicts a pool's TTFT from what it can see: probe RTTs and load reports. A pool
whose answers are late for a reason those do not show (a slow path to its GPUs, a proxy holding
streams, a wedged tokenizer) keeps being predicted fast and keeps its traffic. So the gateway
compares each streamed attempt's time to first byte with what its routing decision predicted and
keeps, per pool, an EWMA of the excess; the model adds it (Endpoint.first_byte_excess_s, never
below 0: a pool is not made faster than the model sees it) to the pool's predicted TTFT, and
routing moves off a pool that answers late.

Relative to the other pools: what is added is a pool's excess over the least late pool measured
within the last half-life (the baseline), not over the model. The model's own error (its prefill
speed a little optimistic on a busy machine, say) makes every pool "late" by the same amount; were
it charged, the pool that takes the traffic would be charged for it alone and traffic would swing
between pools of an idle mesh. So a pool only looks late when another pool answers sooner than it,
measured: hedges, which race the runner-up, give that comparison when one pool takes everything.
And only past `slack_s` over that baseline: first-byte jitter of tens of ms on a busy pool must
not outweigh the few ms of network that separate near pools.

A pool that lost its traffic is no longer measured, so the estimate decays toward the model's own
prediction (half-life `first_byte_half_life_s`): a pool that was late once is tried again, and
then either keeps its traffic (it is fast again) or is measured late and avoided again.

Not fed while the pool reports a queue (requests waiting for a slot): the model predicts
that wait from the reports, and a burst that outruns them is the queue model's error, not a pool
late for a reason it cannot see; charged, it kept a pool that had drained avoided for a half-life.

Censored samples: an attempt abandoned before its first byte (the hedge won the race) says only
that the first byte would have come later than the wait so far. Such a lower bound moves the
estimate only upward, and only when it is above it.

Pure (no I/O, an injected clock); memory is one entry per pool, forgotten when the pool leaves.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from gateway.core.types import Endpoint


class Lateness:
    """alpha: the weight of one sample in the EWMA; half_life_s: how fast an estimate that is no
    longer fed goes back to 0 (also applied between samples, so it is a time-decayed EWMA)."""

    def __init__(self, alpha: float, half_life_s: float, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic, slack_s: float = 0.0):
        assert 0 < alpha <= 1 and half_life_s > 0 and slack_s >= 0
        self.alpha = alpha
        self.slack_s = slack_s
        self.half_life_s = half_life_s
        self.enabled = enabled
        self.clock = clock
        # pool id -> [excess_s (signed: a pool a little faster than predicted keeps its own mean),
        # when it was aged to, when it was last fed]
        self._state: dict[str, list[float]] = {}
        self._baseline = 0.0  # the least excess among pools fed within a half-life (0: none)
        self._baseline_pool: str | None = None

    def observe(self, e: Endpoint, observed_s: float, predicted_s: float, censored: bool = False) -> None:
        """One attempt on e: first byte after observed_s (censored: none yet after observed_s)
        where its decision predicted predicted_s, not counting this estimate itself."""
        if not self.enabled or _queued(e):
            return
        now = self.clock()
        sample = observed_s - predicted_s
        st = self._state.get(e.pool_id)
        if st is None:
            if censored and sample <= 0:
                return
            st = self._state[e.pool_id] = [0.0, now, now]
        excess = self._decayed(st, now)
        if censored and sample <= excess:
            return  # a lower bound under the estimate says nothing
        st[0] = excess + self.alpha * (sample - excess)
        st[1] = st[2] = now
        if self._baseline_pool in (None, e.pool_id) or st[0] < self._baseline:
            self._rebase(now)
        e.first_byte_excess_s = self._charged(st[0])

    def decay(self, endpoints: Iterable[Endpoint]) -> None:
        """Age every estimate to now (after each probe round); forget pools that left."""
        if not self._state:
            return
        now = self.clock()
        endpoints = list(endpoints)  # walked twice
        seen = set()
        for e in endpoints:
            st = self._state.get(e.pool_id)
            if st is None:
                continue
            seen.add(e.pool_id)
            st[0] = self._decayed(st, now)
            st[1] = now
            if abs(st[0]) < 1e-4 and now - st[2] > self.half_life_s:  # back to the model, and no longer a comparison
                del self._state[e.pool_id]
                st[0] = 0.0
        for pool_id in [p for p in self._state if p not in seen]:
            del self._state[pool_id]
        self._rebase(now)
        for e in endpoints:
            if e.pool_id in seen:
                st = self._state.get(e.pool_id)
                e.first_byte_excess_s = self._charged(st[0]) if st is not None else 0.0

    def _charged(self, excess: float) -> float:
        """What the latency model adds: the excess past the baseline and the slack."""
        return max(excess - self._baseline - self.slack_s, 0.0)

    def _rebase(self, now: float) -> None:
        """The baseline: the least (aged) excess of the pools fed within the last half-life."""
        best, owner = 0.0, None
        for pool_id, st in self._state.items():
            if now - st[2] <= self.half_life_s:
                v = self._decayed(st, now)
                if owner is None or v < best:
                    best, owner = v, pool_id
        self._baseline, self._baseline_pool = best, owner

    def excess_s(self, pool_id: str) -> float:
        """The signed estimate now (0 when none) against the model, before the baseline, for tests
        and operators."""
        st = self._state.get(pool_id)
        return self._decayed(st, self.clock()) if st is not None else 0.0

    def _decayed(self, st: list[float], now: float) -> float:
        dt = now - st[1]
        return st[0] * 0.5 ** (dt / self.half_life_s) if dt > 0 else st[0]


def _queued(e: Endpoint) -> bool:
    """The pool's latest report shows requests waiting for a slot (the report that came with this
    answer counts the request itself as running, so a full pool with none waiting is not queued)."""
    return e.load is not None and e.load.waiting > 0
