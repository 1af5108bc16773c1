"""First-byte lateness (gateway/routing/lateness.py): a pool whose first bytes come later than the
latency model predicts is predicted late, loses to a slightly farther pool, and is tried again."""
from __future__ import annotations

import random

import pytest

from gateway.config import ConfigError, RoutingOptions, config_from_dict
from gateway.core.types import Endpoint, LoadReport, RouteRequest
from gateway.routing.framework import Decision, Profile
from gateway.routing.lateness import Lateness
from gateway.routing.plugins import build_profile

REQ = RouteRequest(model="m", prompt_chars=400)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ep(pool_id: str, rtt_ms: float) -> Endpoint:
    e = Endpoint(pool_id, f"http://{pool_id}", pool_id, "meshgate", frozenset({"m"}))
    e.rtt_ms, e.load = rtt_ms, LoadReport(prefill_tps=2000)
    return e


def route(profile: Profile, eps: list[Endpoint]) -> Decision:
    return profile.route(REQ, eps)


def answer(lateness: Lateness, profile: Profile, e: Endpoint, late_s: float) -> None:
    """One streamed attempt on e whose first byte came late_s after what its decision predicted."""
    d = route(profile, [e])
    base_s = (d.predicted_ms[e.pool_id] - d.late_ms.get(e.pool_id, 0.0)) / 1000
    lateness.observe(e, base_s + late_s, base_s)


Setup = tuple["Clock", Lateness, Profile, Endpoint, Endpoint]


@pytest.fixture
def setup() -> Setup:
    clock = Clock()
    lateness = Lateness(alpha=0.3, half_life_s=5.0, clock=clock)
    profile = build_profile("latency", RoutingOptions(), rng=random.Random(0), clock=clock)
    return clock, lateness, profile, ep("near", 2.0), ep("far", 9.0)


def test_a_pool_measured_late_is_predicted_late_and_loses_to_a_slightly_farther_one(setup: Setup) -> None:
    clock, lateness, profile, near, far = setup
    before = route(profile, [near, far])
    assert before.ranked[0] is near and not before.late_ms
    answer(lateness, profile, far, 0.0)  # far answers on time: the comparison
    answer(lateness, profile, near, 0.5)  # one first byte 500 ms late
    after = route(profile, [near, far])
    assert after.ranked[0] is far  # 7 ms farther, but near is now predicted later than that
    assert after.predicted_ms["near"] - before.predicted_ms["near"] == pytest.approx(150.0, abs=1.0)  # alpha x 500 ms
    assert after.late_ms == {"near": pytest.approx(150.0, abs=1.0)}
    assert "runner-up=near" in after.explain() and "late_ms=150.0" in after.explain()
    for _ in range(10):  # it keeps answering 500 ms late: the estimate goes there
        answer(lateness, profile, near, 0.5)
    assert near.first_byte_excess_s == pytest.approx(0.5, abs=0.02)


def test_answers_on_time_bring_it_back(setup: Setup) -> None:
    clock, lateness, profile, near, far = setup
    answer(lateness, profile, near, 0.5)
    for _ in range(20):
        answer(lateness, profile, near, 0.0)
    assert near.first_byte_excess_s < 0.001 and route(profile, [near, far]).ranked[0] is near


def test_a_late_pool_no_longer_measured_is_tried_again(setup: Setup) -> None:
    clock, lateness, profile, near, far = setup
    answer(lateness, profile, far, 0.0)
    for _ in range(10):
        answer(lateness, profile, near, 0.5)
    clock.now += 5.0  # one half-life, routing elsewhere: nothing measured
    lateness.decay([near, far])
    assert near.first_byte_excess_s == pytest.approx(0.25, rel=0.05)
    assert route(profile, [near, far]).ranked[0] is far
    clock.now += 60.0
    lateness.decay([near, far])
    assert near.first_byte_excess_s == 0.0 and route(profile, [near, far]).ranked[0] is near
    assert lateness.excess_s("near") == 0.0


def test_late_only_against_other_pools_measured(setup: Setup) -> None:
    """Every pool as late as the other (the model's own error) is no pool's lateness."""
    clock, lateness, profile, near, far = setup
    for _ in range(5):
        answer(lateness, profile, near, 0.3)  # only near measured: nothing to compare it with
    assert near.first_byte_excess_s == 0.0 and route(profile, [near, far]).ranked[0] is near
    for _ in range(15):
        answer(lateness, profile, far, 0.3)  # far as late: still no pool late against the others
        answer(lateness, profile, near, 0.3)
    # what is left is far's estimate catching up (an EWMA): near still first
    assert near.first_byte_excess_s < 0.05 and route(profile, [near, far]).ranked[0] is near
    for _ in range(5):
        answer(lateness, profile, far, 0.0)  # far on time now: near is 300 ms late against it
        answer(lateness, profile, near, 0.3)
    assert near.first_byte_excess_s > 0.2 and route(profile, [near, far]).ranked[0] is far


def test_faster_than_predicted_never_makes_a_pool_look_faster(setup: Setup) -> None:
    clock, lateness, profile, near, far = setup
    for _ in range(5):
        answer(lateness, profile, far, -0.1)
    assert far.first_byte_excess_s == 0.0 and lateness.excess_s("far") < 0
    assert route(profile, [near, far]).ranked[0] is near


def test_a_lower_bound_only_raises_the_estimate(setup: Setup) -> None:
    clock, lateness, profile, near, far = setup
    lateness.observe(far, 0.1, 0.1)  # far on time: the comparison
    lateness.observe(near, 0.05, 0.1, censored=True)  # not answered after 50 ms, predicted 100: nothing known
    assert lateness.excess_s("near") == 0.0
    lateness.observe(near, 0.3, 0.1, censored=True)  # still nothing after 300 ms: at least 200 ms late
    assert near.first_byte_excess_s == pytest.approx(0.3 * 0.2)
    lateness.observe(near, 0.15, 0.1, censored=True)  # 50 ms: below the estimate, no news
    assert near.first_byte_excess_s == pytest.approx(0.3 * 0.2)


def test_disabled_learns_nothing_and_pools_that_leave_are_forgotten(setup: Setup) -> None:
    clock, lateness, profile, near, far = setup
    off = Lateness(alpha=0.3, half_life_s=5.0, enabled=False, clock=clock)
    off.observe(near, 1.0, 0.01)
    assert near.first_byte_excess_s == 0.0 and off.excess_s("near") == 0.0
    lateness.observe(near, 1.0, 0.01)
    lateness.observe(far, 1.0, 0.01)
    lateness.decay([far])  # near left the mesh
    assert lateness.excess_s("near") == 0.0 and lateness.excess_s("far") > 0


def test_config_is_validated() -> None:
    cfg = config_from_dict({"gateway": {"routing_options": {"first_byte_half_life_s": 2.0}}})
    assert cfg.gateway.routing_options.first_byte_half_life_s == 2.0
    for key, value in (("first_byte_alpha", 0.0), ("first_byte_alpha", 1.5), ("first_byte_half_life_s", 0.0)):
        with pytest.raises(ConfigError, match=f"gateway.routing_options.{key}"):
            config_from_dict({"gateway": {"routing_options": {key: value}}})


def test_jitter_within_the_slack_moves_nothing(setup: Setup) -> None:
    clock, _, profile, near, far = setup
    lateness = Lateness(alpha=1.0, half_life_s=5.0, clock=clock, slack_s=0.05)
    answer(lateness, profile, far, 0.0)
    answer(lateness, profile, near, 0.03)  # 30 ms over far: jitter, not a late pool
    assert near.first_byte_excess_s == 0.0 and route(profile, [near, far]).ranked[0] is near
    answer(lateness, profile, near, 0.5)
    assert near.first_byte_excess_s == pytest.approx(0.45) and route(profile, [near, far]).ranked[0] is far


def test_not_fed_while_the_pool_reports_a_queue(setup: Setup) -> None:
    """A burst that outran the load reports is the queue model's error: the drained pool is not
    avoided afterwards for it."""
    clock, lateness, profile, near, far = setup
    answer(lateness, profile, far, 0.0)
    near.load = LoadReport(prefill_tps=2000, waiting=3, running=2, max_num_seqs=2)
    lateness.observe(near, 0.6, 0.1)
    assert lateness.excess_s("near") == 0.0 and near.first_byte_excess_s == 0.0
