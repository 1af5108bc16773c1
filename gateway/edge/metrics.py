"""The gateway's Prometheus metrics (conventional names and units).

With several gateway processes (meshgate serve's forked workers), a scrape reaches one of them but
must see the counters and histograms of all: prometheus_client's multiprocess mode. Each process
keeps its values in a file of its own in a shared directory, and exposition merges the files
(MultiProcessCollector). The parent calls enable_multiprocess(dir) once before forking; each worker
then makes its GatewayMetrics as usual, and `registry` exposes the merged view. The gauges built at
scrape time (_PoolCollector: pool health, breakers, RTT) stay this process' own view of its probes;
the in-flight gauges read whatever callables they are given (point them at shared counts).
"""
from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.pools.upstream import Upstreams

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
_ROUTING = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)


_multiprocess_dir: Path | None = None  # set by enable_multiprocess


def enable_multiprocess(path: Path) -> None:
    """Put prometheus_client in multiprocess mode, keeping values in files under `path`.

    Call once, in the parent, before forking the workers and before any GatewayMetrics is made
    (metrics made earlier keep per-process values). Empties `path` of a former run's files, whose
    counts must not add to this run's. Sets PROMETHEUS_MULTIPROC_DIR in os.environ (prometheus_client
    names its files from it), so programs exec'd from here on inherit it: start pool workers or
    anything else that uses prometheus_client with an environment without it.
    """
    global _multiprocess_dir
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    # prometheus_client picks its value class once, when first imported (already done: this module
    # imports it); choosing again is how its own tests and gunicorn-style servers switch after import.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _multiprocess_dir = path


def process_dead(pid: int) -> None:
    """The supervisor's bookkeeping when it reaps a worker (prometheus_client's mark_process_dead).

    Counters and histograms of dead processes stay in the merge on purpose (a counter that dropped
    what a dead worker counted would go backwards); only live-gauge files go, and the gateway keeps
    none today. No-op outside multiprocess mode.
    """
    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, str(_multiprocess_dir))  # type: ignore[no-untyped-call]


class GatewayMetrics:
    def __init__(self, upstreams: Upstreams, in_flight: Callable[[], float],
                 pool_in_flight: Callable[[str], float] | None = None):
        """in_flight: client requests in progress; pool_in_flight: requests sent to a pool and not
        finished (default: this process' count on the pool's endpoint)."""
        r = self.registry = CollectorRegistry()  # what /metrics exposes
        # In multiprocess mode the metrics' values live in files and reach `registry` through the
        # MultiProcessCollector; registering the metrics themselves too would expose them twice.
        own = r if _multiprocess_dir is None else None
        if _multiprocess_dir is not None:
            multiprocess.MultiProcessCollector(r, path=str(_multiprocess_dir))  # type: ignore[no-untyped-call]
        self.requests = Counter("meshgate_requests", "Client requests answered, by route, status and pool.",
                                ["route", "status", "pool"], registry=own)
        self.attempts = Counter("meshgate_upstream_attempts", "Requests sent to pools, by pool and outcome.",
                                ["pool", "outcome"], registry=own)
        self.failovers = Counter("meshgate_failovers", "Requests retried on another pool after a failure.",
                                 ["from_pool"], registry=own)
        self.connection_waits = Counter(
            "meshgate_upstream_connection_waits", "Requests that found every connection to a pool busy (its "
            "connection cap reached), by pool and outcome: skipped (routed to its next candidate instead), waited "
            "(the last candidate: got one within upstream.connection_wait_s), timed_out (did not).",
            ["pool", "outcome"], registry=own)
        self.ttft = Histogram("meshgate_time_to_first_token_seconds", "Arrival to first token, by pool.",
                              ["pool"], buckets=_LATENCY, registry=own)
        self.itl = Histogram("meshgate_inter_token_latency_seconds", "Gap between streamed chunks, by pool.",
                             ["pool"], buckets=_ITL, registry=own)
        self.e2e = Histogram("meshgate_e2e_request_latency_seconds", "Arrival to last byte, by pool.",
                             ["pool"], buckets=_LATENCY, registry=own)
        self.routing = Histogram("meshgate_routing_decision_seconds", "Time to pick a pool.",
                                 buckets=_ROUTING, registry=own)
        # Metering (per API key; key="" when auth is off). Key ids come from config, so the label set is bounded.
        self.usage_prompt = Counter("meshgate_usage_prompt_tokens", "Prompt tokens used, by key, model and pool.",
                                    ["key", "model", "pool"], registry=own)
        self.usage_completion = Counter("meshgate_usage_completion_tokens",
                                        "Completion tokens used, by key, model and pool.",
                                        ["key", "model", "pool"], registry=own)
        self.usage_requests = Counter("meshgate_usage_requests", "Requests metered, by key, model, pool and status "
                                      "(complete, cut_short, error).", ["key", "model", "pool", "status"], registry=own)
        self.rejected = Counter("meshgate_admission_rejected", "Requests refused before routing, by key and reason.",
                                ["key", "reason"], registry=own)
        self.bookkeeping_errors = Counter("meshgate_bookkeeping_errors",
                                          "Request bookkeeping steps that raised (the request was still served), "
                                          "by stage: metering, tracing, decision_log.", ["stage"], registry=own)
        # Streams that outlived their pool (edge/resume.py) and first tokens raced on two pools (edge/hedge.py).
        self.resumes = Counter("meshgate_resumes", "Streams continued on another pool, by the pool that was cut, "
                               "why (broken, stalled, down, error) and outcome (continued, failed).",
                               ["pool", "reason", "outcome"], registry=own)
        self.hedges = Counter("meshgate_hedges", "Requests also sent to the runner-up for a late first token, by "
                              "outcome (won: the hedge answered first, lost, failed, skipped_budget).",
                              ["outcome"], registry=own)
        r.register(_PoolCollector(upstreams, in_flight, pool_in_flight))
        self._pools: dict[str, PoolSeries] = {}
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), resolved once per label set (labels() takes a lock per call).
        Label values must come from bounded sets (routes, statuses, pools, keys, models)."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def request(self, route: str, status: int, pool: str) -> Any:
        return self.child(self.requests, route, str(status), pool)

    def pool(self, pool_id: str) -> PoolSeries:
        """The per-pool series, resolved once (labels() costs a locked lookup per call)."""
        series = self._pools.get(pool_id)
        if series is None:
            series = self._pools[pool_id] = PoolSeries(self, pool_id)
        return series


def observe_many(hist: Any, amounts: Sequence[float]) -> None:
    """Many observations of one histogram child at once: one increment per bucket touched, not per
    value. Streams use it for inter-token gaps: observe() per token took two locked increments
    and a bucket scan on the relay's per-token path. Same result as observe() for each value
    (prometheus_client 0.2x keeps a child's bounds, buckets and sum in these fields; the test
    in tests/edge/test_metering.py compares the two)."""
    if not amounts:
        return
    bounds = hist._upper_bounds
    counts = [0] * len(bounds)
    for a in amounts:
        counts[bisect_left(bounds, a)] += 1  # the first bound >= a: observe()'s "amount <= bound"
    buckets = hist._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    hist._sum.inc(sum(amounts))


class PoolSeries:
    def __init__(self, m: GatewayMetrics, pool_id: str):
        self.ttft = m.ttft.labels(pool_id)
        self.itl = m.itl.labels(pool_id)
        self.e2e = m.e2e.labels(pool_id)
        self.failovers = m.failovers.labels(pool_id)
        self._m = m
        self._pool_id = pool_id

    def attempt(self, outcome: str) -> None:
        self._m.child(self._m.attempts, self._pool_id, outcome).inc()

    def connection_wait(self, outcome: str) -> None:
        self._m.child(self._m.connection_waits, self._pool_id, outcome).inc()


class _PoolCollector:
    """Gauges read at scrape time from this process' view of the pools."""

    def __init__(self, upstreams: Upstreams, in_flight: Callable[[], float],
                 pool_in_flight: Callable[[str], float] | None):
        self.up = upstreams
        self.in_flight = in_flight
        self.pool_in_flight = pool_in_flight

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meshgate_in_flight_requests", "Client requests in progress.", value=self.in_flight())
        healthy = GaugeMetricFamily("meshgate_pool_healthy", "1 if probes see the pool up.", labels=["pool"])
        breaker = GaugeMetricFamily("meshgate_pool_breaker_state", "0 closed, 1 half-open, 2 open.", labels=["pool"])
        pool_in_flight = GaugeMetricFamily("meshgate_pool_in_flight_requests", "Requests sent and not finished.",
                                           labels=["pool"])
        rtt = GaugeMetricFamily("meshgate_pool_rtt_seconds", "Probe round trip (EWMA).", labels=["pool"])
        late = GaugeMetricFamily("meshgate_pool_first_byte_excess_seconds", "How much later than predicted the "
                                 "pool's first bytes have come lately (added to its predicted TTFT).", labels=["pool"])
        for pool in self.up.pools.values():
            e = pool.endpoint
            healthy.add_metric([e.pool_id], float(e.healthy))
            breaker.add_metric([e.pool_id], float(pool.breaker.state))
            sent = self.pool_in_flight(e.pool_id) if self.pool_in_flight is not None else e.in_flight
            pool_in_flight.add_metric([e.pool_id], sent)
            if e.rtt_ms is not None:
                rtt.add_metric([e.pool_id], e.rtt_ms / 1000)
            late.add_metric([e.pool_id], e.first_byte_excess_s)
        yield from (healthy, breaker, pool_in_flight, rtt, late)
