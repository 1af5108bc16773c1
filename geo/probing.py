"""Probe bookkeeping, pure logic (no I/O, no clock): what a gateway learns from `GET /load` probes,
and whom it probes.

- `PeerStats`: per-peer RTT statistics (EWMA for the typical case, a windowed p90 for the bad
  case routing must budget for), jitter (RFC 3550's smoothed |delta|), loss over a recent window,
  and up/down with hysteresis: down after `down_after` consecutive misses, up again after
  `up_after` consecutive answers (the names of gateway.config's ProbeConfig).
- `CandidateSelector`: in a mesh of a thousand sites a gateway cannot probe everyone every period.
  It probes the K nearest by estimated RTT (the ones routing will most likely pick) plus a few
  others taken in turn from a shuffled list, so probe traffic is O(K) per period and every site is
  still measured once per cycle (which keeps coordinates and far estimates honest).
"""
from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProbeStatsConfig:
    ewma_alpha: float = 0.3  # weight of the newest sample (the gateway's RTT_ALPHA)
    window: int = 20  # samples behind the high percentile, and probes behind the loss rate
    percentile: float = 90.0
    down_after: int = 2  # consecutive misses that mark a peer down
    up_after: int = 1  # consecutive answers that mark it up again

    def __post_init__(self) -> None:
        assert 0 < self.ewma_alpha <= 1 and self.window >= 1 and 0 <= self.percentile <= 100
        assert self.down_after >= 1 and self.up_after >= 1


class PeerStats:
    """What probes say about one peer. RTTs are network time only: pass the peer's reported
    handling time as `server_ms` and it is subtracted, so a busy pool does not look far away."""

    __slots__ = (
        "_last_ms", "_outcomes", "_window", "cfg", "consecutive_hits", "consecutive_misses", "ewma_ms",
        "jitter_ms", "num_samples", "up",
    )

    def __init__(self, config: ProbeStatsConfig | None = None, up: bool = True):
        self.cfg = config or ProbeStatsConfig()
        self.ewma_ms: float | None = None
        self.jitter_ms = 0.0
        self.up = up  # until probes say otherwise (as the gateway's endpoints start)
        self.num_samples = 0
        self.consecutive_misses = 0
        self.consecutive_hits = 0
        self._window: deque[float] = deque(maxlen=self.cfg.window)
        self._outcomes: deque[bool] = deque(maxlen=self.cfg.window)
        self._last_ms: float | None = None

    def record(self, rtt_ms: float, server_ms: float = 0.0) -> bool:
        """An answered probe. Returns True when this flipped the peer to up."""
        net = max(rtt_ms - server_ms, 0.0)  # a clock step can make the difference negative
        a = self.cfg.ewma_alpha
        self.ewma_ms = net if self.ewma_ms is None else (1 - a) * self.ewma_ms + a * net
        if self._last_ms is not None:
            # RFC 3550 §6.4.1 interarrival jitter, applied to consecutive RTTs: J += (|D| - J) / 16
            self.jitter_ms += (abs(net - self._last_ms) - self.jitter_ms) / 16.0
        self._last_ms = net
        self._window.append(net)
        self._outcomes.append(True)
        self.num_samples += 1
        self.consecutive_hits += 1
        self.consecutive_misses = 0
        if not self.up and self.consecutive_hits >= self.cfg.up_after:
            self.up = True
            return True
        return False

    def record_miss(self) -> bool:
        """A probe that timed out or failed. Returns True when this flipped the peer to down."""
        self._outcomes.append(False)
        self.consecutive_misses += 1
        self.consecutive_hits = 0
        if self.up and self.consecutive_misses >= self.cfg.down_after:
            self.up = False
            return True
        return False

    @property
    def p90_ms(self) -> float | None:
        """The windowed high percentile (p90 by default) of recent RTTs; None before any sample."""
        if not self._window:
            return None
        xs = sorted(self._window)
        k = (len(xs) - 1) * self.cfg.percentile / 100.0  # linear interpolation, as numpy's default
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    @property
    def loss(self) -> float:
        """Fraction of the last `window` probes that went unanswered (0 before any probe)."""
        if not self._outcomes:
            return 0.0
        return 1.0 - sum(self._outcomes) / len(self._outcomes)

    @property
    def min_ms(self) -> float | None:
        return min(self._window) if self._window else None


class CandidateSelector:
    """Chooses whom to probe each period: the `k_nearest` peers by estimated RTT plus `num_rotating`
    others taken in turn from a shuffled order of all peers. A full pass over the order takes
    about len(peers) / num_rotating periods; then it is reshuffled, so no peer waits more than
    two passes, and peers that join are appended to the current pass rather than waiting."""

    def __init__(self, k_nearest: int, num_rotating: int, seed: int | None = None):
        assert k_nearest >= 0 and num_rotating >= 0
        self.k_nearest = k_nearest
        self.num_rotating = num_rotating
        self._rng = random.Random(seed)
        self._order: list[str] = []
        self._members: set[str] = set()
        self._cursor = 0
        self.passes = 0  # completed passes over the order (for tests and metrics)

    def select(self, estimates_ms: Mapping[str, float | None], exclude: Iterable[str] = ()) -> list[str]:
        """Peers to probe this period, nearest first. `estimates_ms` maps every known peer to its
        estimated RTT (None or NaN: unknown, ranked last); `exclude` is typically the caller itself."""
        skip = set(exclude)
        peers = [p for p in estimates_ms if p not in skip]
        if len(peers) <= self.k_nearest + self.num_rotating:  # a small mesh: probe everyone
            return sorted(peers, key=lambda p: (_rank(estimates_ms[p]), p))
        nearest = heapq.nsmallest(self.k_nearest, peers, key=lambda p: (_rank(estimates_ms[p]), p))
        self._sync(peers)
        taken = set(nearest)
        rotating: list[str] = []
        for _ in range(len(self._order)):  # at most one full lap, so this always ends
            if len(rotating) == self.num_rotating:
                break
            if self._cursor >= len(self._order):
                self._new_pass()
            p = self._order[self._cursor]
            self._cursor += 1
            if p not in taken:
                rotating.append(p)
                taken.add(p)
        return nearest + rotating

    def _sync(self, peers: list[str]) -> None:
        current = set(peers)
        if current != self._members:
            # keep the position in the pass: drop the departed, append the newcomers
            gone = self._members - current
            before = sum(1 for p in self._order[: self._cursor] if p in gone)
            self._order = [p for p in self._order if p not in gone]
            self._cursor -= before
            new = sorted(current - self._members)
            self._rng.shuffle(new)
            self._order.extend(new)
            self._members = current

    def _new_pass(self) -> None:
        self._rng.shuffle(self._order)
        self._cursor = 0
        self.passes += 1


def _rank(estimate: float | None) -> float:
    return math.inf if estimate is None or math.isnan(estimate) else estimate
