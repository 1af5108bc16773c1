"""Routing on pushed load (gateway/pools/load_stream.py): while a pool's stream is up, its last
report is its current state (the pool would have pushed a change), so it does not age into doubt
as a probe's report does; and which pools the gateway asks to stream from."""
from __future__ import annotations

import random

from gateway.config import RoutingOptions
from gateway.core.types import Endpoint, LoadReport, RouteRequest
from gateway.routing.candidates import CandidateSet
from gateway.routing.plugins import build_profile

REQ = RouteRequest(model="m", prompt_chars=400)
NOW = 100.0


def ep(pool_id: str, rtt_ms: float, load: LoadReport, age_s: float, pushed: bool = False) -> Endpoint:
    e = Endpoint(pool_id, f"http://{pool_id}", pool_id, "meshgate", frozenset({"m"}))
    e.rtt_ms, e.load, e.load_at, e.load_pushed = rtt_ms, load, NOW - age_s, pushed
    return e


def first(eps: list[Endpoint]) -> str:
    profile = build_profile("latency", RoutingOptions(), rng=random.Random(0), clock=lambda: NOW)
    return profile.route(REQ, eps).ranked[0].pool_id


def busy(running: int, max_num_seqs: int = 8) -> LoadReport:
    return LoadReport(running=running, prefill_tps=20_000, max_num_seqs=max_num_seqs, mean_request_s=2.0)


def test_a_pushed_report_does_not_age_into_doubt() -> None:
    # near: one slot of eight free when it last said so, 2 s ago; far: idle, 60 ms away
    far = ep("far", 60.0, busy(0), age_s=0.0)
    probed = ep("near", 2.0, busy(7), age_s=2.0)
    # from a probe 2 s ago the free slot has likely been taken since (7 running, 2 s each): go far
    assert first([probed, far]) == "far"
    # from a live stream the pool would have said so: the slot is still there
    pushed = ep("near", 2.0, busy(7), age_s=2.0, pushed=True)
    assert first([pushed, far]) == "near"
    # and a pool that pushed "full" stays full, however long ago it said it
    full = ep("near", 2.0, busy(8), age_s=30.0, pushed=True)
    assert first([full, far]) == "far"


def test_a_burst_between_pushes_still_spreads() -> None:
    """In-flight crediting runs on pushed reports too: sends since the last line use up the room."""
    a = ep("a", 2.0, busy(6), age_s=0.0, pushed=True)  # two free slots
    b = ep("b", 3.0, busy(6), age_s=0.0, pushed=True)
    chosen = []
    for _ in range(4):
        e = next(x for x in (a, b) if x.pool_id == first([a, b]))
        e.sent_since_report += 1
        e.in_flight += 1
        chosen.append(e.pool_id)
    assert sorted(chosen) == ["a", "a", "b", "b"]


def test_the_gateway_streams_from_its_nearest_pools_and_its_spill_list() -> None:
    eps = []
    for i in range(12):
        e = Endpoint(f"p{i:02d}", "", None, "meshgate", frozenset({"m"}))
        e.rtt_ms = 1.0 + 10 * i  # p00 nearest
        # the far ones idle, the near ones full: the spill list ranks the idle far ones first
        e.load, e.load_at = (busy(0) if i >= 8 else busy(8)), NOW
        eps.append(e)
    cs = CandidateSet(eps, k_near=2, k_spill=1, clock=lambda: NOW)
    wanted = cs.wanted(3)
    assert wanted[:3] == ["p00", "p01", "p02"]  # the nearest first
    assert len(wanted) == len(set(wanted))
    assert {"p08", "p09"} <= set(wanted)  # and the spill list's
    assert len(wanted) == 3 + 2 * (2 + 1) - len({"p00", "p01", "p02"} & {e.pool_id for e in cs._spill})
