"""The latency model's slot wait: how likely a pool is to be full when the request gets there, from
its reported headroom (slots - running - waiting), what this gateway sent since, and the age of the
report; and the aged queue wait of pools that do not report their slots."""
from __future__ import annotations

import random

import pytest

from gateway.config import RoutingOptions
from gateway.core.types import Endpoint, LoadReport, RouteRequest
from gateway.routing.candidates import CandidateSet
from gateway.routing.latency import TtftModel, full_probability
from gateway.routing.plugins import build_profile

REQ = RouteRequest(model="m", prompt_chars=400)
NOW = 100.0  # the tests' clock


def ep(pool_id: str, rtt_ms: float, load: LoadReport | None, age_s: float = 0.0, sent: int = 0) -> Endpoint:
    e = Endpoint(pool_id, f"http://{pool_id}", pool_id, "meshgate", frozenset({"m"}))
    e.rtt_ms, e.load, e.load_at, e.sent_since_report = rtt_ms, load, NOW - age_s, sent
    return e


def slots(running: int, waiting: int = 0, max_num_seqs: int = 12, mean_request_s: float = 3.0) -> LoadReport:
    return LoadReport(waiting=waiting, running=running, prefill_tps=20_000, max_num_seqs=max_num_seqs,
                      mean_request_s=mean_request_s)


def first(eps: list[Endpoint], now: float = NOW) -> str:
    profile = build_profile("latency", RoutingOptions(), rng=random.Random(0), clock=lambda: now)
    return profile.route(REQ, eps).ranked[0].pool_id


def test_full_probability_grows_as_headroom_shrinks_and_as_the_report_ages() -> None:
    load = slots(running=10)
    by_headroom = [full_probability(load, h, 0.5) for h in (6, 4, 2, 1, 0, -2)]
    assert by_headroom == sorted(by_headroom) and by_headroom[0] < 0.01 and by_headroom[-1] > 0.95
    by_age = [full_probability(load, 3, age) for age in (0.0, 0.5, 2.0, 10.0)]
    assert by_age == sorted(by_age) and by_age[0] < 0.001 and 0.1 < by_age[-1] < 0.5  # old: it could be anything
    assert full_probability(load, -3, 0.0) > 0.99


def test_an_old_report_of_little_headroom_loses_to_ample_headroom_a_little_farther() -> None:
    near = ep("near", 5.0, slots(running=10))  # 2 of 12 slots free
    far = ep("far", 15.0, slots(running=6))  # 6 free, 10 ms farther
    assert first([near, far]) == "near"  # a fresh report: 2 free slots are still there
    near.load_at = far.load_at = NOW - 1.0
    assert first([near, far]) == "far"  # a second later other gateways may well have taken them


def test_requests_sent_since_the_report_use_up_the_headroom() -> None:
    a = ep("a", 5.0, slots(running=10))  # 2 free slots, and fresh
    b = ep("b", 60.0, slots(running=2))
    profile = build_profile("latency", RoutingOptions(), rng=random.Random(0), clock=lambda: NOW)
    chosen = []
    for _ in range(6):  # no new report arrives: only this gateway's own sends change
        e = profile.route(REQ, [a, b]).ranked[0]
        e.in_flight += 1
        e.sent_since_report += 1
        chosen.append(e.pool_id)
    assert chosen[:2] == ["a", "a"] and chosen.count("a") == 2  # then a's slots are presumed gone


def test_a_full_pool_waits_a_slot_turnover_per_request_ahead() -> None:
    model = TtftModel(2000.0, clock=lambda: NOW)
    full = ep("full", 5.0, slots(running=12, waiting=3, mean_request_s=6.0))  # 4 ahead of a new request
    assert model.queue_s(REQ, full) == pytest.approx(4 * 6.0 / 12, rel=1e-3)
    idle = ep("idle", 5.0, slots(running=0))
    assert model.queue_s(REQ, idle) < 1e-6


def test_pools_without_slot_figures_count_their_own_wait_down_by_the_report_age() -> None:
    model = TtftModel(2000.0, clock=lambda: NOW)
    third_party = ep("tp", 5.0, LoadReport(waiting=4, running=8, queue_wait_s=2.0, prefill_tps=2000), age_s=0.5)
    assert model.queue_s(REQ, third_party) == pytest.approx(1.5)
    third_party.load_at = NOW - 3.0
    assert model.queue_s(REQ, third_party) == 0.0
    third_party.load_at = 0.0  # a snapshot with no time: taken as fresh
    assert model.queue_s(REQ, third_party) == pytest.approx(2.0)


def test_the_load_header_carries_slots_and_mean_duration() -> None:
    rep = LoadReport(waiting=1, running=7, queued_prompt_tokens=30, kv_blocks_used=9, kv_blocks_total=64,
                     queue_wait_s=0.25, max_num_seqs=12, mean_request_s=3.25)
    back = LoadReport.from_header(rep.to_header())
    assert (back.max_num_seqs, back.mean_request_s, back.waiting, back.running) == (12, 3.25, 1, 7)
    old = LoadReport.from_header("w=1;r=7;q=30;kv=9/64;qw=0.2500")  # a worker from before the fields
    assert (old.max_num_seqs, old.mean_request_s) == (0, 0.0)


def test_spill_list_prefers_room_that_is_still_likely_there() -> None:
    """Beyond the nearest, the spill candidate is the pool expected to start the request first: not
    the nearer one that had one slot free a second ago, but the one with room to spare."""
    near = [ep(f"n{i}", 1.0 + i, slots(running=12)) for i in range(2)]  # the nearest: full
    tight = ep("tight", 10.0, slots(running=11), age_s=1.0)
    roomy = ep("roomy", 14.0, slots(running=4), age_s=1.0)
    cs = CandidateSet([*near, tight, roomy], k_near=2, k_spill=1, clock=lambda: NOW)
    assert [e.pool_id for e in cs.select(REQ)] == ["n0", "n1", "roomy"]
    tight.load = slots(running=4)  # now with as much room: the nearer one wins again
    cs.refresh()
    assert [e.pool_id for e in cs.select(REQ)][2] == "tight"
