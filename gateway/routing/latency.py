"""Latency-aware plug-ins: the expected time to first token of a request at each pool.

    expected_ttft = rtt(client -> gateway) + rtt(gateway -> pool) + queue_wait(pool) + prefill(pool)

rtt(gateway -> pool) is the probes' EWMA when measured, else the distance prior. queue_wait is
the pool's own estimate from its last load report plus what this gateway sent since (in-flight
crediting), so a burst spreads instead of piling on the pool that looked best a moment ago.
"""
from __future__ import annotations

import hashlib

from gateway.core.errors import RateLimited
from gateway.core.types import Endpoint, RouteRequest

UNKNOWN_RTT_MS = 100.0  # a pool with no measurement and no coordinates: assume far


class TtftModel:
    def __init__(self, default_prefill_tps: float):
        self.default_prefill_tps = default_prefill_tps

    def rtt_s(self, e: Endpoint) -> float:
        ms = e.rtt_ms if e.rtt_ms is not None else e.prior_rtt_ms
        return (ms if ms is not None else UNKNOWN_RTT_MS) / 1000.0

    def prefill_tps(self, e: Endpoint) -> float:
        tps = e.load.prefill_tps if e.load is not None else 0.0
        return tps if tps > 0 else self.default_prefill_tps

    def queue_s(self, req: RouteRequest, e: Endpoint) -> float:
        """The pool's own estimate from its last report, plus the prefill of what this gateway sent
        since (the report cannot know it yet); with no report, what is in flight from here."""
        tps = self.prefill_tps(e)
        if e.load is None:
            return e.in_flight * req.prompt_tokens / tps
        return e.load.queue_wait_s + e.sent_since_report * req.prompt_tokens / tps

    def predict_s(self, req: RouteRequest, e: Endpoint) -> float:
        return (req.client_rtt_ms / 1000.0 + self.rtt_s(e) + self.queue_s(req, e)
                + req.prompt_tokens / self.prefill_tps(e))


class LatencyScorer:
    """1 for the pool predicted to answer first, the others by how much later they would."""

    name = "latency"

    def __init__(self, model: TtftModel):
        self.model = model

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        pred = [self.model.predict_s(req, e) for e in endpoints]
        best = min(pred)
        return [best / p if p > 0 else 1.0 for p in pred]


class NearestScorer:
    """Network distance only: the lowest gateway -> pool RTT wins (the `nearest` baseline)."""

    name = "nearest"

    def __init__(self, model: TtftModel):
        self.model = model

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        rtt = [self.model.rtt_s(e) for e in endpoints]
        best = min(rtt)
        return [best / r if r > 0 else 1.0 for r in rtt]


class PrefixAffinity:
    """Rendezvous hashing of the prompt's start over pools: requests sharing a prefix (a system
    prompt) prefer the same pool, whose prefix cache is then warm. Weighted low, it breaks near-ties
    so a warm pool a few ms further away can win."""

    name = "prefix-affinity"

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        if not req.prefix_key or len(endpoints) < 2:
            return [0.0] * len(endpoints)
        key = req.prefix_key.encode()
        weights = [hashlib.blake2b(key + e.pool_id.encode(), digest_size=8).digest() for e in endpoints]
        top = max(weights)
        return [1.0 if w == top else 0.0 for w in weights]


class Residency:
    """Hard constraint: only pools in the countries the key and the request allow."""

    name = "residency"

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if req.countries is None:
            return endpoints
        return [e for e in endpoints if e.country in req.countries]


class SloFilter:
    """Keep the pools predicted to meet the request's TTFT SLO. If none can: spill (keep all and
    let the scorers pick the best) or shed with 429 and a Retry-After."""

    name = "slo"

    def __init__(self, model: TtftModel, policy: str):
        self.model = model
        self.policy = policy

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if req.ttft_slo_s is None or not endpoints:
            return endpoints
        pred = [self.model.predict_s(req, e) for e in endpoints]
        meet = [e for e, p in zip(endpoints, pred) if p <= req.ttft_slo_s]
        if meet or self.policy == "spill":
            return meet or endpoints
        raise RateLimited(
            f"no pool is predicted to meet the {req.ttft_slo_s * 1000:.0f} ms TTFT SLO "
            f"(best: {min(pred) * 1000:.0f} ms)", retry_after_s=max(1.0, min(pred)))
