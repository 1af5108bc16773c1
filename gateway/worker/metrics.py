"""The pool worker's Prometheus metrics (own registry; engine state read at scrape time)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.core.types import LoadReport


@dataclass(frozen=True, slots=True)
class EngineCounters:
    report: LoadReport
    num_preemptions: int = 0
    num_aborted: int = 0
    num_steps: int = 0

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class WorkerMetrics:
    def __init__(self, state: Callable[[], EngineCounters]):
        """state() returns the latest load report and the engine's running counts."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("meshgate_worker_requests", "Requests answered, by route and HTTP status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("meshgate_worker_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("meshgate_worker_generation_tokens", "Tokens generated.", registry=r)
        self.cached_tokens = Counter("meshgate_worker_prefix_cache_hit_tokens",
                                     "Prompt tokens served from the prefix cache.", registry=r)
        self.ttft = Histogram("meshgate_worker_time_to_first_token_seconds",
                              "Time from arrival to the first token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("meshgate_worker_inter_token_latency_seconds",
                             "Time between consecutive tokens of a request.", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("meshgate_worker_e2e_request_latency_seconds",
                             "Time from arrival to the last token.", buckets=_LATENCY_BUCKETS, registry=r)
        # A gateway that drops a stream (its client left, it moved the request, or it gave up on a
        # stall) is normal operation: counted here and logged at DEBUG, never an ERROR traceback.
        self.disconnects = Counter("meshgate_worker_client_disconnects",
                                   "Answers cut short because the client (a gateway) went away, by route.",
                                   ["route"], registry=r)
        r.register(_EngineCollector(state))


class _EngineCollector:
    def __init__(self, state: Callable[[], EngineCounters]):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        c = self.state()
        rep = c.report
        gauges = [
            ("meshgate_worker_waiting_requests", "Requests waiting for admission.", rep.waiting),
            ("meshgate_worker_running_requests", "Requests in the running batch.", rep.running),
            ("meshgate_worker_queued_prompt_tokens", "Prompt tokens still to prefill.", rep.queued_prompt_tokens),
            ("meshgate_worker_kv_blocks_used", "KV-cache blocks in use.", rep.kv_blocks_used),
            ("meshgate_worker_kv_blocks_capacity", "KV-cache blocks in all.", rep.kv_blocks_total),
            ("meshgate_worker_kv_usage_ratio", "Share of KV-cache blocks in use.",
             rep.kv_blocks_used / rep.kv_blocks_total if rep.kv_blocks_total else 0.0),
            ("meshgate_worker_queue_wait_seconds", "Estimated wait before a new request starts.", rep.queue_wait_s),
            ("meshgate_worker_prefill_tokens_per_second", "Prefill throughput when prefilling (EWMA).", rep.prefill_tps),
            ("meshgate_worker_decode_tokens_per_second", "Output tokens per second, recent window.", rep.decode_tps),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("meshgate_worker_preemptions", "Requests preempted for recompute.",
                                  value=c.num_preemptions)
        yield CounterMetricFamily("meshgate_worker_aborted_requests",
                                  "Requests aborted before finishing (client gone, timeout).", value=c.num_aborted)
        yield CounterMetricFamily("meshgate_worker_engine_steps", "Engine steps run.", value=c.num_steps)
