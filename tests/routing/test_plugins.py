"""Routing plug-ins on hand-made endpoint snapshots: what gets picked, and why."""
from __future__ import annotations

import random

import pytest

from gateway.config import ProfileConfig, RoutingOptions, config_from_dict
from gateway.core.errors import RateLimited
from gateway.core.types import Endpoint, LoadReport, RouteRequest
from gateway.routing.geo_view import GeoView
from gateway.routing.plugins import build_profile


def ep(pool_id: str, rtt_ms: float | None, country: str = "DE", load: LoadReport | None = None,
       in_flight: int = 0) -> Endpoint:
    e = Endpoint(pool_id, f"http://{pool_id}", pool_id, "meshgate", frozenset({"m"}))
    e.rtt_ms, e.country, e.load, e.in_flight = rtt_ms, country, load, in_flight
    return e


def pick(profile: str, req: RouteRequest, eps: list[Endpoint], **opts) -> list[str]:
    p = build_profile(profile, RoutingOptions(**opts), rng=random.Random(0))
    return [e.pool_id for e in p.route(req, eps).ranked]


REQ = RouteRequest(model="m", prompt_chars=400)


def test_latency_prefers_the_pool_that_answers_first_not_the_nearest():
    near_busy = ep("near", 2.0, load=LoadReport(waiting=8, running=32, queue_wait_s=0.5, prefill_tps=2000))
    far_idle = ep("far", 30.0, load=LoadReport(prefill_tps=2000))
    assert pick("latency", REQ, [near_busy, far_idle])[0] == "far"
    assert pick("nearest", REQ, [near_busy, far_idle])[0] == "near"
    idle_near = ep("near", 2.0, load=LoadReport(prefill_tps=2000))
    assert pick("latency", REQ, [idle_near, far_idle])[0] == "near"


def test_in_flight_crediting_spreads_a_burst_between_reports():
    a = ep("a", 5.0, load=LoadReport(prefill_tps=1000))
    b = ep("b", 6.0, load=LoadReport(prefill_tps=1000))
    long = RouteRequest(model="m", prompt_chars=4000)  # ~1000 tokens: 1 s of prefill each
    chosen = []
    for _ in range(4):  # no new report arrives: only the gateway's own in-flight counts change
        first = build_profile("latency").route(long, [a, b]).ranked[0]
        first.in_flight += 1
        first.sent_since_report += 1  # as the forwarder counts a send
        chosen.append(first.pool_id)
    assert chosen.count("a") == 2 and chosen.count("b") == 2


def test_unmeasured_pools_use_the_distance_prior():
    cfg = config_from_dict({
        "gateway": {"site": "fra"},
        "sites": [{"id": "fra", "country": "DE", "lat": 50.1, "lon": 8.7},
                  {"id": "muc", "country": "DE", "lat": 48.1, "lon": 11.6},
                  {"id": "syd", "country": "AU", "lat": -33.9, "lon": 151.2}],
        "pools": [{"id": "muc-1", "site": "muc", "url": "http://x", "models": ["m"]},
                  {"id": "syd-1", "site": "syd", "url": "http://y", "models": ["m"]}]})
    eps = [ep("muc-1", None), ep("syd-1", None)]
    eps[0].site, eps[1].site = "muc", "syd"
    GeoView(cfg).attach(eps)
    assert eps[0].prior_rtt_ms < 20 < 250 < eps[1].prior_rtt_ms
    assert eps[1].country == "AU"
    assert pick("latency", REQ, eps)[0] == "muc-1"


def test_residency_is_a_hard_constraint_for_every_profile():
    eps = [ep("de", 20.0, "DE"), ep("fr", 1.0, "FR")]
    de_only = RouteRequest(model="m", countries=frozenset({"DE"}))
    for profile in ("latency", "nearest", "least-load", "round-robin", "random", "p2c"):
        assert pick(profile, de_only, eps) == ["de"]
    assert pick("latency", RouteRequest(model="m", countries=frozenset({"US"})), eps) == []


def test_slo_prefers_pools_that_meet_it_then_spills_or_sheds():
    fast = ep("fast", 40.0, load=LoadReport(prefill_tps=2000))
    slow_near = ep("slow", 1.0, load=LoadReport(queue_wait_s=2.0, prefill_tps=2000))
    req = RouteRequest(model="m", prompt_chars=40, ttft_slo_s=0.5)
    assert pick("latency", req, [slow_near, fast]) == ["fast"]
    impossible = RouteRequest(model="m", prompt_chars=40, ttft_slo_s=0.001)
    assert pick("latency", impossible, [slow_near, fast])[0] == "fast"  # spill: the best of all
    with pytest.raises(RateLimited) as e:
        pick("latency", impossible, [slow_near, fast], slo_policy="shed")
    assert e.value.status == 429 and e.value.retry_after_s >= 1


def test_prefix_affinity_keeps_a_prompt_on_one_pool_and_breaks_near_ties():
    eps = [ep(f"p{i}", 10.0 + 0.01 * i, load=LoadReport(prefill_tps=2000)) for i in range(5)]
    for prefix in ("system prompt A", "system prompt B", "another"):
        req = RouteRequest(model="m", prompt_chars=100, prefix_key=prefix)
        firsts = {pick("latency", req, eps)[0] for _ in range(3)}
        assert len(firsts) == 1
    winners = {pick("latency", RouteRequest(model="m", prefix_key=f"k{i}"), eps)[0] for i in range(40)}
    assert len(winners) >= 3  # different prefixes spread over the near-equal pools


def test_decisions_explain_the_choice_and_runner_up():
    eps = [ep("a", 5.0, load=LoadReport(prefill_tps=2000)), ep("b", 15.0, load=LoadReport(prefill_tps=2000))]
    line = build_profile("latency").route(REQ, eps).explain()
    assert line.startswith("profile=latency pool=a") and "runner-up=b" in line and line.count("ttft_ms=") == 2


def test_profiles_from_config_and_unknown_names():
    opts = RoutingOptions(profiles={"mine": ProfileConfig(filters=("serves-model",), scorers={"nearest": 1.0})})
    assert pick("mine", REQ, [ep("a", 9.0), ep("b", 3.0)], **{"profiles": opts.profiles}) == ["b", "a"]
    with pytest.raises(ValueError, match="unknown routing profile"):
        build_profile("fastest")
    with pytest.raises(ValueError, match="unknown scorer"):
        build_profile("x", RoutingOptions(profiles={"x": ProfileConfig(scorers={"magic": 1.0})}))


def test_prefix_affinity_is_the_same_in_every_process_and_spreads_prefixes_evenly():
    import subprocess
    import sys

    code = ("from gateway.core.types import Endpoint, RouteRequest; from gateway.routing.latency import PrefixAffinity;"
            "eps = [Endpoint(f'p{i}', 'http://x', None, 'meshgate', frozenset({'m'})) for i in range(8)];"
            "a = PrefixAffinity();"
            "print([a.score(RouteRequest(model='m', prefix_key=f'k{j}'), eps).index(1.0) for j in range(200)])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(runs) == 1  # gateways (separate processes, hash seeds) agree on each prefix's pool
    winners = eval(runs.pop())  # noqa: S307 (our own printed list)
    counts = [winners.count(i) for i in range(8)]
    assert min(counts) >= 10 and max(counts) <= 45  # 200 prefixes over 8 pools: ~25 each
