"""The gateway's Prometheus metrics (conventional names and units)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.pools.upstream import Upstreams

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
_ROUTING = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)


class GatewayMetrics:
    def __init__(self, upstreams: Upstreams, in_flight: "callable[[], int]"):  # type: ignore[valid-type]
        r = self.registry = CollectorRegistry()
        self.requests = Counter("meshgate_requests", "Client requests answered, by route, status and pool.",
                                ["route", "status", "pool"], registry=r)
        self.attempts = Counter("meshgate_upstream_attempts", "Requests sent to pools, by pool and outcome.",
                                ["pool", "outcome"], registry=r)
        self.failovers = Counter("meshgate_failovers", "Requests retried on another pool after a failure.",
                                 ["from_pool"], registry=r)
        self.ttft = Histogram("meshgate_time_to_first_token_seconds", "Arrival to first token, by pool.",
                              ["pool"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("meshgate_inter_token_latency_seconds", "Gap between streamed chunks, by pool.",
                             ["pool"], buckets=_ITL, registry=r)
        self.e2e = Histogram("meshgate_e2e_request_latency_seconds", "Arrival to last byte, by pool.",
                             ["pool"], buckets=_LATENCY, registry=r)
        self.routing = Histogram("meshgate_routing_decision_seconds", "Time to pick a pool.",
                                 buckets=_ROUTING, registry=r)
        # Metering (per API key; key="" when auth is off). Key ids come from config, so the label set is bounded.
        self.usage_prompt = Counter("meshgate_usage_prompt_tokens", "Prompt tokens used, by key, model and pool.",
                                    ["key", "model", "pool"], registry=r)
        self.usage_completion = Counter("meshgate_usage_completion_tokens",
                                        "Completion tokens used, by key, model and pool.",
                                        ["key", "model", "pool"], registry=r)
        self.usage_requests = Counter("meshgate_usage_requests", "Requests metered, by key, model, pool and status "
                                      "(complete, cut_short, error).", ["key", "model", "pool", "status"], registry=r)
        self.rejected = Counter("meshgate_admission_rejected", "Requests refused before routing, by key and reason.",
                                ["key", "reason"], registry=r)
        r.register(_PoolCollector(upstreams, in_flight))
        self._pools: dict[str, PoolSeries] = {}

    def pool(self, pool_id: str) -> PoolSeries:
        """The per-pool series, resolved once (labels() costs a locked lookup per call)."""
        series = self._pools.get(pool_id)
        if series is None:
            series = self._pools[pool_id] = PoolSeries(self, pool_id)
        return series


class PoolSeries:
    def __init__(self, m: GatewayMetrics, pool_id: str):
        self.ttft = m.ttft.labels(pool_id)
        self.itl = m.itl.labels(pool_id)
        self.e2e = m.e2e.labels(pool_id)
        self.failovers = m.failovers.labels(pool_id)
        self._attempts = m.attempts
        self._pool_id = pool_id
        self._outcomes: dict[str, Any] = {}

    def attempt(self, outcome: str) -> None:
        c = self._outcomes.get(outcome)
        if c is None:
            c = self._outcomes[outcome] = self._attempts.labels(self._pool_id, outcome)
        c.inc()


class _PoolCollector:
    def __init__(self, upstreams: Upstreams, in_flight):  # type: ignore[no-untyped-def]
        self.up = upstreams
        self.in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meshgate_in_flight_requests", "Client requests in progress.", value=self.in_flight())
        healthy = GaugeMetricFamily("meshgate_pool_healthy", "1 if probes see the pool up.", labels=["pool"])
        breaker = GaugeMetricFamily("meshgate_pool_breaker_state", "0 closed, 1 half-open, 2 open.", labels=["pool"])
        pool_in_flight = GaugeMetricFamily("meshgate_pool_in_flight_requests", "Requests sent and not finished.",
                                           labels=["pool"])
        rtt = GaugeMetricFamily("meshgate_pool_rtt_seconds", "Probe round trip (EWMA).", labels=["pool"])
        for pool in self.up.pools.values():
            e = pool.endpoint
            healthy.add_metric([e.pool_id], float(e.healthy))
            breaker.add_metric([e.pool_id], float(pool.breaker.state))
            pool_in_flight.add_metric([e.pool_id], e.in_flight)
            if e.rtt_ms is not None:
                rtt.add_metric([e.pool_id], e.rtt_ms / 1000)
        yield from (healthy, breaker, pool_in_flight, rtt)
