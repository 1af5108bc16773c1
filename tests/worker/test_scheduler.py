"""Scheduler with a real BlockManager and no model: steps are simulated with made-up tokens."""
from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.worker.kv_cache import BlockManager
from gateway.worker.request import Request, RequestStatus, SamplingParams
from gateway.worker.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

_ids = itertools.count()


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 16,
    max_num_seqs: int = 8,
    max_model_len: int = 1024,
    prefix_caching: bool = True,
) -> Scheduler:
    kv = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len), kv)


def new_request(
    prompt_len: int, max_tokens: int = 4, priority: int = 0, tokens: list[int] | None = None, **params
) -> Request:
    k = next(_ids)
    # Distinct tokens per request unless given, so there are no accidental prefix hits.
    tokens = tokens if tokens is not None else [10_000 * (k + 1) + i for i in range(prompt_len)]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)
    return Request(f"r{k}", tokens, sp, priority=priority)


def made_up_token(r: Request) -> int:
    # Depends only on the position, so a request's outputs do not depend on the schedule.
    return (r.num_tokens * 7) % 3


def step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    assert out.total_tokens <= s.config.max_num_batched_tokens
    sampled = {
        r.request_id: made_up_token(r)
        for r, n in zip(out.requests, out.num_tokens)
        if r.num_computed_tokens + n == r.num_tokens
    }
    s.update(out, sampled)
    s.kv.check_invariants()
    return out


def scheduled(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(out.requests, out.num_tokens)]


def test_chunked_prefill_splits_a_long_prompt_over_steps() -> None:
    s = make_scheduler(budget=8)
    r = new_request(20, max_tokens=3)
    s.add(r)
    assert scheduled(step(s)) == [(r.request_id, 8)]
    assert r.output_token_ids == [] and r.num_computed_tokens == 8
    assert scheduled(step(s)) == [(r.request_id, 8)]
    assert r.output_token_ids == []
    assert scheduled(step(s)) == [(r.request_id, 4)]  # the rest of the prompt, then a token
    assert len(r.output_token_ids) == 1
    assert scheduled(step(s)) == [(r.request_id, 1)]
    assert scheduled(step(s)) == [(r.request_id, 1)]
    assert r.status == RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 3
    assert not s.has_work() and s.kv.num_free_blocks == s.kv.num_blocks


def test_budget_and_max_num_seqs_are_respected() -> None:
    s = make_scheduler(budget=16, max_num_seqs=3)
    reqs = [new_request(n, max_tokens=5) for n in (3, 40, 9, 17, 1, 25, 6, 12)]
    for r in reqs:
        s.add(r)
    for _ in range(200):
        if not s.has_work():
            break
        out = step(s)
        assert len(out.requests) <= 3 and len(s.running) <= 3
    assert all(len(r.output_token_ids) == 5 for r in reqs)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_running_requests_go_before_waiting_ones() -> None:
    s = make_scheduler(budget=8)
    a = new_request(3, max_tokens=6)
    s.add(a)
    step(s)
    b = new_request(30, max_tokens=2)
    s.add(b)
    # a decodes on every step while b's prompt is prefilled with what is left of the budget.
    for _ in range(4):
        assert scheduled(step(s)) == [(a.request_id, 1), (b.request_id, 7)]
    assert len(a.output_token_ids) == 5 and b.num_computed_tokens == 28


def test_waiting_request_is_admitted_only_when_its_first_chunk_fits() -> None:
    s = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a = new_request(16, max_tokens=3)  # 4 blocks + 1 for its outputs
    b = new_request(12, max_tokens=2)  # needs 3 blocks at once
    s.add(a)
    s.add(b)
    out = step(s)
    assert scheduled(out) == [(a.request_id, 16)]
    assert s.waiting == [b] and b.block_ids == [] and b.status == RequestStatus.WAITING
    step(s)
    assert s.waiting == [b]
    step(s)  # a finishes and frees its blocks: b fits from the next step on
    assert a.finished and s.kv.num_free_blocks == 6
    assert scheduled(step(s)) == [(b.request_id, 12)]


def test_max_num_seqs_holds_back_admission() -> None:
    s = make_scheduler(max_num_seqs=1)
    a, b = new_request(4, max_tokens=2), new_request(4, max_tokens=2)
    s.add(a)
    s.add(b)
    assert scheduled(step(s)) == [(a.request_id, 4)]
    assert scheduled(step(s)) == [(a.request_id, 1)]
    assert scheduled(step(s)) == [(b.request_id, 4)]


def _fill_cache(s: Scheduler, first: Request, second: Request) -> None:
    """Admit two 7-token prompts into a 4-block cache and decode until it is full."""
    s.add(first)
    s.add(second)
    step(s)  # both prefilled: 8 tokens each, 2 blocks each
    step(s)  # both decode into their second block: 9 tokens each, cache full
    assert s.kv.num_free_blocks == 0


def test_preemption_recomputes_the_latest_arrival_and_requeues_it_ahead() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = new_request(7, max_tokens=6), new_request(7, max_tokens=6)
    _fill_cache(s, a, b)
    late = new_request(2, max_tokens=2)
    s.add(late)
    out = step(s)  # a needs a third block: b (latest arrival) is preempted
    assert out.preempted == [b]
    assert scheduled(out) == [(a.request_id, 1)]  # no admission right after a preemption
    assert b.status == RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert len(b.output_token_ids) == 2  # kept; recomputed from the prompt later
    assert s.waiting == [b, late]
    assert len(a.block_ids) == 3 and s.kv.num_free_blocks == 1
    for _ in range(50):
        if not s.has_work():
            break
        step(s)
    for r in (a, b, late):
        expected = [(n * 7) % 3 for n in range(r.num_prompt_tokens, r.num_tokens)]
        assert r.output_token_ids == expected and r.status == RequestStatus.FINISHED_LENGTH
    assert s.kv.num_free_blocks == 4


def test_preemption_picks_the_lowest_priority_first() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    low = new_request(7, max_tokens=6, priority=1)  # arrives first, but on-demand
    high = new_request(7, max_tokens=6, priority=0)
    _fill_cache(s, low, high)
    assert s.running == [high, low]
    urgent = new_request(2, max_tokens=1, priority=0)  # would fit once `low` is gone
    s.add(urgent)
    out = step(s)
    assert out.preempted == [low]
    # Nothing is admitted in the step of a preemption (it would only thrash the cache).
    assert scheduled(out) == [(high.request_id, 1)]
    assert s.waiting == [urgent, low]
    assert scheduled(step(s)) == [(high.request_id, 1), (urgent.request_id, 2)]


def test_higher_priority_class_is_admitted_first() -> None:
    s = make_scheduler(max_num_seqs=1)
    first_low = new_request(4, max_tokens=1, priority=1)
    second_low = new_request(4, max_tokens=1, priority=1)
    high = new_request(4, max_tokens=1, priority=0)
    for r in (first_low, second_low, high):
        s.add(r)
    order = [step(s).requests[0] for _ in range(3)]
    assert order == [high, first_low, second_low]


def test_finish_and_abort_free_blocks_at_once() -> None:
    s = make_scheduler(budget=64)
    a, b = new_request(10, max_tokens=8), new_request(10, max_tokens=8)
    s.add(a)
    s.add(b)
    step(s)
    assert len(a.block_ids) == 3
    free = s.kv.num_free_blocks
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == free + 3 and a.block_ids == []
    assert a not in s.running and a.request_id not in s.requests
    assert a.finish_reason == "abort"
    w = new_request(5)
    s.add(w)
    s.finish(w, RequestStatus.FINISHED_ABORTED)  # never admitted
    assert w not in s.waiting and not w.block_ids
    out = step(s)
    assert scheduled(out) == [(b.request_id, 1)]


def test_eos_stop_tokens_and_max_model_len_end_requests() -> None:
    s = make_scheduler(budget=64, max_model_len=12)
    eos = Request("eos", [1, 2, 3], SamplingParams(max_tokens=10), eos_token_id=0)
    ignore = Request("ignore", [1, 2, 4], SamplingParams(max_tokens=2, ignore_eos=True), eos_token_id=0)
    stop = Request("stop", [1, 2, 5], SamplingParams(max_tokens=10, stop_token_ids=(9,)))
    capped = Request("capped", [1] * 10, SamplingParams(max_tokens=10))
    for r in (eos, ignore, stop, capped):
        s.add(r)
    out = s.schedule()
    s.update(out, {"eos": 0, "ignore": 0, "stop": 9, "capped": 3})
    assert eos.status == RequestStatus.FINISHED_STOPPED and eos.stop_reason == 0
    assert stop.status == RequestStatus.FINISHED_STOPPED and stop.stop_reason == 9
    assert ignore.status == RequestStatus.RUNNING
    assert capped.status == RequestStatus.RUNNING
    out = s.schedule()
    s.update(out, {"ignore": 0, "capped": 3})
    assert ignore.status == RequestStatus.FINISHED_LENGTH and ignore.output_token_ids == [0, 0]
    assert capped.status == RequestStatus.FINISHED_LENGTH and capped.num_tokens == 12
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_decode_never_waits_behind_a_higher_priority_prefill() -> None:
    s = make_scheduler(budget=16)
    on_demand = new_request(3, max_tokens=10, priority=1)
    s.add(on_demand)
    step(s)  # decoding from now on
    contracted = new_request(100, max_tokens=2, priority=0)
    s.add(contracted)
    for _ in range(4):
        out = step(s)
        assert on_demand in out.requests, "a running decode was left out of the step"


# -- random workloads ----------------------------------------------------------------------------

workload = st.lists(
    st.tuples(
        st.lists(st.integers(0, 1), min_size=1, max_size=20),  # prompt (tiny alphabet: prefix hits)
        st.integers(1, 8),  # max_tokens
        st.integers(0, 1),  # priority
        st.integers(0, 8),  # arrival step
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=workload,
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 6),
    extra_blocks=st.integers(0, 8),
    prefix_caching=st.booleans(),
)
def test_random_workloads_finish_exactly_within_budget_without_leaks(
    reqs, block_size, budget, max_num_seqs, extra_blocks, prefix_caching
) -> None:
    longest = max(len(p) + m for p, m, _, _ in reqs)
    num_blocks = -(-longest // block_size) + extra_blocks  # each request fits alone
    s = make_scheduler(num_blocks, block_size, budget, max_num_seqs, prefix_caching=prefix_caching)
    requests = [(t, new_request(0, m, prio, tokens=list(p))) for p, m, prio, t in reqs]
    # What each KV slot holds, as the model would have written it.
    shadow: dict[int, int] = {}
    steps = 0
    while steps < 2000 and (s.has_work() or any(t >= steps for t, _ in requests)):
        for t, r in requests:
            if t == steps:
                s.add(r)
        was_running = set(map(id, s.running))
        out = s.schedule()
        assert out.total_tokens <= budget
        assert len(s.running) <= max_num_seqs
        flags = [id(r) in was_running for r in out.requests]
        assert flags == sorted(flags, reverse=True), "a waiting request went before a running one"
        sampled = {}
        for r, n in zip(out.requests, out.num_tokens):
            tokens = r.all_token_ids
            for p in range(r.num_computed_tokens):  # reads see this request's own tokens
                assert shadow[r.block_ids[p // block_size] * block_size + p % block_size] == tokens[p]
            for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
                b = r.block_ids[p // block_size]
                assert s.kv.ref_counts[b] == 1, "writing into a shared block"
                shadow[b * block_size + p % block_size] = tokens[p]
            if r.num_computed_tokens + n == r.num_tokens:
                sampled[r.request_id] = made_up_token(r)
        s.update(out, sampled)
        s.kv.check_invariants()
        steps += 1
    assert not s.has_work(), "the workload did not finish (livelock?)"
    for _, r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == [(n * 7) % 3 for n in range(r.num_prompt_tokens, r.num_tokens)]
        assert len(r.output_token_ids) == r.params.max_tokens
    assert s.kv.num_free_blocks == s.kv.num_blocks and not s.requests
