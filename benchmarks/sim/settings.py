"""What one simulation run is: the mesh's size, the demand, and what gateways and pools do.

The defaults are the real system's: the probe period (ProbeConfig), the attempts per request
(UpstreamConfig), the pools' refusal bound (EngineConfig) are read from gateway/config.py, so a
change of a default there moves the simulation with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config import EngineConfig, LoadStreamConfig, ProbeConfig, UpstreamConfig

MODEL = "meshgate-tiny"
MODELS = frozenset({MODEL})
# Rows of the main table: the gateway's routing profiles, and two central schedulers (not profiles)
ORACLES = ("oracle", "clairvoyant")
PROFILES = ("latency", "nearest", "least-load", "round-robin", "p2c", "random")
POLICIES = ("latency", "oracle", "clairvoyant", "nearest", "least-load", "round-robin", "p2c", "random")
LOAD_BLIND = frozenset({"nearest", "round-robin", "random"})  # profiles whose choice never reads Endpoint.load


@dataclass(frozen=True, slots=True)
class Settings:
    num_sites: int = 1100
    num_countries: int = 31
    num_requests: int = 150_000  # expected arrivals over the measured day
    mean_slots: float = 12.0  # concurrent sequences per pool, on average (clipped to 4..max_num_seqs)
    warmup_s: float = 10.0  # routed, not measured (queues start empty)
    mean_util: float = 0.55  # the day's mean demand / capacity; a metro's local peak is ~1.7x this
    # One day of demand is compressed into day_s = num_requests x mean service / (mean_util x slots):
    # the request budget, not the clock, sets it (~70 s for the full run).
    metro_capacity_sigma: float = 0.3  # log-normal spread of capacity per metro (provisioning is imperfect)
    pool_capacity_sigma: float = 0.5  # and of the shares of the pools within a metro
    probe_period_s: float = ProbeConfig().period_s
    # each period a gateway probes its probe_nearest nearest pools plus probe_rotating others in turn
    # (gateway/routing/geo_view.py, geo.probing.CandidateSelector); None: every pool, every period
    probe_nearest: int | None = ProbeConfig().k_nearest
    probe_rotating: int = ProbeConfig().num_rotating
    k_near: int = 16
    k_spill: int = 8
    # near+spill: gateway/routing/candidates.py's set | near | anywhere: k_near + k_spill pools drawn
    # uniformly from the mesh (or the request's country) for each decision, whatever their distance
    candidates: str = "near+spill"
    slo_s: float = 1.0  # goodput: share of requests with TTFT <= this
    residency_share: float = 0.2  # requests that must be served in their own country
    min_prompt_tokens: int = 32  # log-uniform, as benchmarks/engine.py
    max_prompt_tokens: int = 512
    min_output_tokens: int = 32  # log-uniform; longer than engine.py's 8..256: chat answers
    max_output_tokens: int = 1024
    fresh_reports: bool = False  # True: every decision sees the pools' state now (not the spill list: see VARIANTS)
    client_max_tokens: int | None = 1024  # what clients send as max_tokens (None: each answer's length)
    report: str = "engine"  # the pools' queue_wait_s: engine = gateway/worker/engine.py's (prefill backlog
    #                         + slot wait from running requests' max_tokens) | mean = prefill backlog +
    #                         requests ahead beyond the free slots x mean request duration / slots
    report_slots: bool = True  # pools report max_num_seqs and mean_request_s (False: as third-party pools)
    # Refuse when full (gateway/worker/server.py): the gateway marks every attempt but its last
    # x-meshgate-may-refuse, and a pool whose queue_wait_s for the request exceeds this answers 429
    # (None: pools queue everything, the gateway's attempts only serve failures)
    refuse_queue_wait_s: float | None = EngineConfig().refuse_queue_wait_s
    max_attempts: int = UpstreamConfig().max_attempts
    header: str = "merge"  # merge: a response's load header keeps the last probe's rates (upstream.py)
    #                        | replace: the rates read 0 until the next probe (the gateway before bb2fa31)
    oracle_wait: str = "mean"  # the fair oracle's slot-release estimate: mean | max_tokens (oracle.py)
    # Pushed load (gateway/pools/load_stream.py <- gateway/worker/load_feed.py): each gateway keeps a
    # stream open to its probe_nearest nearest pools and to those of its spill list (each for
    # stream_linger_s after it left the list); what it holds of such a pool is the pool's state at
    # the last multiple of stream_step_s one one-way delay ago (the worker's feed looks every 10 ms
    # at a report the engine refreshes after a step that changed its batch, ~12 ms a decode step at
    # the calibrated speed), which routing takes as current (Endpoint.load_pushed). False: the
    # gateway before the streams (probes and response headers only).
    load_stream: bool = LoadStreamConfig().enabled
    stream_step_s: float = 0.02
    stream_spill: bool = True  # False: streams to the nearest pools only
    stream_linger_s: float = LoadStreamConfig().linger_s
    seed: int = 0
    # Failures (benchmarks/sim/failures.py): per pool and per hour of the simulated clock (the one
    # requests are served on), Poisson; durations exponential with these means. Stress rates: an edge
    # pool crashing every 10 minutes is pessimistic, chosen so that a --quick run meets enough
    # failures to measure (each row reports how many it met).
    crash_per_pool_hour: float = 6.0  # the process or host dies: its connections reset, its streams are cut
    repair_s: float = 60.0  # until it serves again (empty: no queue, no prefix cache)
    stall_per_pool_hour: float = 12.0  # the pool stops producing (SIGSTOP, a wedged driver, a link that holds)
    stall_s: float = 10.0
    gap_slo_s: float = 2.0  # goodput under failures: no gap between two tokens longer than this
    client_retries: int = 1  # a client whose answer broke asks again from scratch, this many times
    client_retry_s: float = 1.0  # after this long (an SDK's backoff, a person pressing retry)


FULL = Settings()
QUICK = Settings(num_sites=300, num_requests=20_000, warmup_s=5.0)

# Extra rows: one change each to the latency row's system (or to the oracle's estimate), to measure
# what a change outside the benchmark would buy or cost. Not tuned: each is one setting.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "latency/no-refusal": ("latency", {"refuse_queue_wait_s": None}),  # the system before refusal
    "latency/no-slot-figures": ("latency", {"report_slots": False}),  # routing without the headroom model
    "latency/refuse>0.1s": ("latency", {"refuse_queue_wait_s": 0.1}),
    "latency/refuse>2s": ("latency", {"refuse_queue_wait_s": 2.0}),
    "latency/attempts3": ("latency", {"max_attempts": 3}),  # the former default
    "latency/probe1s": ("latency", {"probe_period_s": 1.0}),  # the probe period before 2026-11-28
    "latency/probe-all": ("latency", {"probe_nearest": None}),  # every pool every round (before ee1a0f0)
    "latency/near-only": ("latency", {"candidates": "near"}),  # no spill candidates
    "latency/mean-wait": ("latency", {"report": "mean"}),  # pools estimate slot waits from mean durations
    # every decision reads the pools' state now, but the spill list still comes from probes (no
    # streams): since the streams refresh the spill list too, no longer a bound on the default row
    "latency/fresh": ("latency", {"fresh_reports": True}),
    "latency/no-stream": ("latency", {"load_stream": False}),  # probes and headers only (before the streams)
    "latency/stream-near-only": ("latency", {"stream_spill": False}),  # no streams to the spill list's pools
    "latency/stream-50ms": ("latency", {"stream_step_s": 0.05}),  # pushed state in 50 ms steps (the worker's
    #                                                                former report period)
    "oracle/max-tokens": ("oracle", {"oracle_wait": "max_tokens"}),  # the oracle estimating as engine.py does
    # The baselines "ignore the network": the main rows run them over the gateway's candidate
    # set (nearest pools + spill list), which already knows the network; these rows do not.
    "least-load/anywhere": ("least-load", {"candidates": "anywhere"}),
    "round-robin/anywhere": ("round-robin", {"candidates": "anywhere"}),
}
PLOTTED_VARIANTS = ("latency/no-refusal", "latency/probe1s", "latency/no-stream", "latency/fresh")
