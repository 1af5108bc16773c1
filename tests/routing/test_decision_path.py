"""The decision path's shortcuts answer exactly as the long way (issue 13, decision budget):
PrefixIndex.match_all against each pool's matched(), the latency model's reuse of a decision's
predictions, and the max-score picker without ties."""
from __future__ import annotations

import random

from gateway.config import RoutingOptions
from gateway.core.types import Endpoint, LoadReport, RouteRequest
from gateway.routing.framework import MaxScorePicker
from gateway.routing.latency import TtftModel
from gateway.routing.plugins import build_profile
from gateway.routing.prefix_index import PrefixIndex


def ep(pool_id: str, rtt_ms: float, hot: tuple[int, ...] = ()) -> Endpoint:
    e = Endpoint(pool_id, f"http://{pool_id}", pool_id, "meshgate", frozenset({"m"}))
    e.rtt_ms = rtt_ms
    e.load = LoadReport(prefill_tps=2000.0, max_num_seqs=16, mean_request_s=2.0, running=3, hot_prefix_hashes=hot)
    return e


def test_match_all_agrees_with_each_pools_own_answer() -> None:
    now = [0.0]
    index = PrefixIndex(RoutingOptions(prefix_memory_s=60.0), clock=lambda: now[0])
    rng = random.Random(7)
    chains = [tuple(rng.getrandbits(63) for _ in range(40)) for _ in range(4)]
    # pools advertising some chain prefixes, sent others, sent and aged out, or nothing
    eps = [ep(f"p{i}", 1.0 + i, hot=chains[i % 4][:rng.randint(0, 40)]) for i in range(30)]
    eps.append(Endpoint("bare", "http://bare", None, "openai", frozenset({"m"})))  # no report, no entry
    index.attach(eps[:-3])  # the last three have no prefix entry
    for e in eps[:10]:
        index.record_sent(e, chains[rng.randrange(4)][:rng.randint(1, 40)])
    now[0] = 70.0  # what went to the first ten is forgotten
    for e in eps[10:20]:
        index.record_sent(e, chains[rng.randrange(4)][:rng.randint(1, 40)])
    for chain in chains:
        for n in (0, 1, 5, 40):
            hashes = chain[:n]
            want = [e.prefix.matched(hashes) if e.prefix is not None else 0 for e in eps]
            assert index.match_all(hashes, eps) == want
            assert any(want) or n == 0
    assert any(k and k < 40 for k in index.match_all(chains[0], eps))  # partial matches are exercised


def test_a_decisions_explanation_reuses_its_predictions_and_a_later_one_does_not() -> None:
    now = [100.0]
    model = TtftModel(2000.0, clock=lambda: now[0])
    index = PrefixIndex(clock=lambda: now[0])
    a, b = ep("a", 2.0), ep("b", 9.0)
    index.attach([a, b])
    hashes = tuple(range(1, 33))
    index.record_sent(b, hashes)
    req = RouteRequest("m", prompt_chars=40_000, prefix_hashes=hashes, tokens_per_chunk=64.0)
    pred = model.predict_all_s(req, [a, b])
    assert [model.predict_s(req, e) for e in (a, b)] == pred
    assert model.cached_tokens(req, b) == 32 * 64 and model.cached_tokens(req, a) == 0
    # the pool filled up and time passed: the same request is predicted afresh
    now[0] += 1.0
    assert b.load is not None
    b.load = LoadReport(prefill_tps=2000.0, max_num_seqs=16, mean_request_s=2.0, running=16, waiting=8,
                        queued_prompt_tokens=50_000)
    assert model.predict_s(req, b) > pred[1] + 20.0
    fresh = TtftModel(2000.0, clock=lambda: now[0])
    assert model.predict_s(req, b) == fresh.predict_s(req, b)


def test_decisions_explain_the_same_figures_as_a_fresh_prediction() -> None:
    index = PrefixIndex()
    eps = [ep(f"p{i}", 1.0 + 3 * i) for i in range(6)]
    index.attach(eps)
    hashes = tuple(range(100, 140))
    index.record_sent(eps[4], hashes)
    req = RouteRequest("m", prompt_chars=60_000, prefix_hashes=hashes, tokens_per_chunk=64.0)
    profile = build_profile("latency", rng=random.Random(0))
    d = profile.route(req, eps)
    fresh = TtftModel(RoutingOptions().default_prefill_tps)
    for e in d.ranked[:2]:
        assert abs(d.predicted_ms[e.pool_id] - 1000 * fresh.predict_s(req, e)) < 1.0  # the clock moved a little
        assert d.cached_tokens[e.pool_id] == fresh.cached_tokens(req, e)
    assert d.ranked[0].pool_id == "p4"


def test_max_score_picker_orders_by_score_and_breaks_ties_at_random() -> None:
    eps = [ep(f"p{i}", 1.0) for i in range(5)]
    picker = MaxScorePicker(random.Random(1))
    assert [e.pool_id for e in picker.pick(RouteRequest("m"), eps, [0.2, 0.9, 0.5, 0.1, 0.7])] == \
        ["p1", "p4", "p2", "p0", "p3"]
    firsts = {picker.pick(RouteRequest("m"), eps, [1.0, 1.0, 0.5, 1.0, 0.2])[0].pool_id for _ in range(60)}
    assert firsts == {"p0", "p1", "p3"}


def test_a_pushed_reports_wait_is_reused_only_while_its_inputs_stand() -> None:
    """_pool_queue_s keeps the wait of a report without age; each of its inputs changing must show."""
    model = TtftModel(2000.0, clock=lambda: 50.0)
    e = ep("p", 4.0)
    e.load_pushed, e.load_at = True, 10.0  # pushed: no age however old
    req = RouteRequest("m", prompt_chars=8000)

    def fresh() -> float:
        return TtftModel(2000.0, clock=lambda: 50.0).queue_s(req, e)

    first = model.queue_s(req, e)
    assert first == fresh() and model.queue_s(req, e) == first
    e.sent_since_report = 14  # the slots fill up from here
    assert model.queue_s(req, e) == fresh() and fresh() > first
    e.load = LoadReport(prefill_tps=2000.0, max_num_seqs=16, mean_request_s=2.0, running=16, waiting=3,
                        queued_prompt_tokens=9000)
    assert model.queue_s(req, e) == fresh() > 4.0
    e.rtt_ms = 80.0
    assert model.queue_s(req, e) == fresh()
    e.load_pushed = False  # a probed report ages again
    assert model.queue_s(req, e) == fresh()
