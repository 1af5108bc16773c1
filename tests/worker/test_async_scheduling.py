"""Asynchronous scheduling (engine.py, pipeline.py): step n+1 is launched before step n's ids are
read, n's ids feed n+1 on the device, and EOS/stop tokens end requests a step late. What a client
gets must equal the synchronous engine's, token for token, whatever the workload."""
from __future__ import annotations

import asyncio

import pytest

from gateway.config import ConfigError, load_config
from gateway.worker.async_engine import AsyncEngine
from gateway.worker.engine import Engine, RequestOutput
from gateway.worker.request import Request, SamplingParams
from tests.worker.test_engine import random_prompts, run, text_of, tokens_of
from tests.worker.test_sampler import ReferenceSampler

# 16 blocks of 4 tokens for ~190 tokens in flight: preemptions; a 16-token budget: chunked
# prefill; a shared 12-token prefix: prefix-cache hits.
TIGHT = dict(num_blocks=16, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=64)


def workload(params: list[SamplingParams]) -> list[Request]:
    prefix = random_prompts([12], seed=41)[0]
    prompts = [prefix + t for t in random_prompts([5, 9, 1, 14], seed=42)] + random_prompts([23, 3, 31, 7], seed=43)
    return [Request(f"r{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))]


def mixed_params(stop_token: int | None = None) -> list[SamplingParams]:
    """Greedy and seeded rows (top-k, top-p); stop_token ends some of them early."""
    out = []
    for i in range(8):
        kind = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8 + 0.1 * i, seed=100 + i,
                                                              top_k=(0, 20, 0, 5)[i // 2], top_p=(1.0, 0.9)[i % 4 // 2])
        stops = (stop_token,) if stop_token is not None and i % 3 != 2 else ()
        out.append(SamplingParams(max_tokens=8 + i, ignore_eos=True, stop_token_ids=stops, **kind))  # type: ignore[arg-type]
    return out


def summary(outs: dict[str, list[RequestOutput]]) -> dict[str, tuple[object, ...]]:
    """Everything a client sees of each request."""
    return {rid: (tokens_of(o), text_of(o), o[-1].finish_reason, [x.num_output_tokens for x in o],
                  [x.logprobs for x in o], o[-1].num_cached_tokens) for rid, o in outs.items()}


def run_both(make_engine, params: list[SamplingParams], **cfg: object
             ) -> tuple[dict[str, list[RequestOutput]], dict[str, list[RequestOutput]], list[Request], Engine]:
    sync = make_engine(async_scheduling="off", **cfg)
    eng = make_engine(async_scheduling="on", **cfg)
    assert not sync.async_scheduling and eng.async_scheduling
    reqs = workload(params)
    a = run(eng, reqs)
    return run(sync, workload(params)), a, reqs, eng


def test_async_equals_sync_greedy_and_seeded_across_chunks_prefix_hits_and_preemption(make_engine) -> None:
    want, got, reqs, eng = run_both(make_engine, mixed_params(), **TIGHT)
    assert sum(r.num_preemptions for r in reqs) > 0, "the test meant to force preemptions"
    assert any(r.num_cached_tokens > 0 for r in reqs), "the test meant to hit the prefix cache"
    assert summary(got) == summary(want)
    for r in reqs:  # the Request objects hold the delivered tokens only (no placeholder left)
        assert r.output_token_ids == tokens_of(got[r.request_id])


def test_a_stop_token_known_a_step_late_drops_the_extra_token(make_engine) -> None:
    # A token the greedy rows produce part-way: as a stop token it ends them mid-stream, after
    # their next step was already launched.
    plain, _, _, _ = run_both(make_engine, mixed_params(), **TIGHT)
    stop = tokens_of(plain["r0"])[3]
    want, got, reqs, eng = run_both(make_engine, mixed_params(stop), **TIGHT)
    stopped = [rid for rid, o in want.items() if o[-1].finish_reason == "stop"]
    assert stopped, "the test meant to end requests by a stop token"
    assert any(len(tokens_of(want[rid])) < 8 for rid in stopped)
    assert summary(got) == summary(want)


def test_async_equals_the_reference_sampler_across_preemption(make_engine) -> None:
    """The on-device sampler, pipelined, draws what the plain per-row reference draws unpipelined."""
    params = mixed_params()
    ref = make_engine(async_scheduling="off", **TIGHT)
    ref.sampler = ReferenceSampler()
    want = run(ref, workload(params))
    got = run(make_engine(async_scheduling="on", **TIGHT), workload(params))
    assert {k: tokens_of(v) for k, v in got.items()} == {k: tokens_of(v) for k, v in want.items()}


def test_steps_are_pipelined_ids_feed_the_next_step_on_the_device(make_engine) -> None:
    eng = make_engine(async_scheduling="on")
    req = Request("r", random_prompts([6], seed=44)[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    eng.add_request(req)
    assert eng.step_tokens() == []  # the prefill's token is read only after the next step launched
    assert eng.batch_state.pending_src[req.batch_row] == 0  # its next input is on the device
    fed = 0
    events = []
    while eng.has_work():
        pending = (eng.batch_state.pending_src >= 0).any()
        events += eng.step_tokens()
        fed += bool(pending)
    assert [e.num_output_tokens for e in events] == [1, 2, 3, 4, 5, 6]
    assert fed >= 5  # every decode took its input from the previous step's device ids
    sync = make_engine(async_scheduling="off")
    assert [e.token for e in events] == tokens_of(run(sync, [Request("r", list(req.prompt_token_ids), req.params)])["r"])


def test_penalties_and_logprobs_wait_for_values_and_stay_equal(make_engine) -> None:
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, frequency_penalty=1.5 if i % 2 else 0.0,
                             presence_penalty=0.5 if i % 3 == 0 else 0.0, logprobs=2 if i % 4 == 1 else None)
              for i in range(8)]
    want, got, _, _ = run_both(make_engine, params, **TIGHT)
    assert summary(got) == summary(want)
    assert any(o[0].logprobs for o in got.values())


def test_abort_and_max_tokens_1_while_a_step_is_in_flight(make_engine) -> None:
    eng = make_engine(async_scheduling="on")
    prompts = random_prompts([9, 9, 5], seed=45)
    keep = Request("keep", prompts[0], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    doomed = Request("doomed", prompts[1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    one = Request("one", prompts[2], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    for r in (keep, doomed, one):
        eng.add_request(r)
    events = eng.step_tokens() + eng.step_tokens() + eng.step_tokens()
    assert eng.abort_request("doomed")  # its token of the step in flight is dropped
    while eng.has_work():
        events += eng.step_tokens()
    assert all(e.request_id != "doomed" or e.num_output_tokens <= 2 for e in events)
    assert [e.num_output_tokens for e in events if e.request_id == "one"] == [1]
    assert doomed.output_token_ids == [e.token for e in events if e.request_id == "doomed"]
    sync = make_engine(async_scheduling="off")
    alone = run(sync, [Request("keep", list(prompts[0]), keep.params), Request("one", list(prompts[2]), one.params)])
    assert [e.token for e in events if e.request_id == "keep"] == tokens_of(alone["keep"])
    assert [e.token for e in events if e.request_id == "one"] == tokens_of(alone["one"])
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_async_engine_thread_serves_pipelined_steps(make_engine) -> None:
    params = mixed_params()
    want = run(make_engine(async_scheduling="off"), workload(params))
    eng = make_engine(async_scheduling="on")

    async def serve() -> dict[str, list[RequestOutput]]:
        ae = AsyncEngine(eng)
        ae.start(asyncio.get_running_loop())
        try:
            reqs = workload(params)

            async def one(r: Request) -> list[RequestOutput]:
                return [o async for o in ae.generate(r)]

            outs = await asyncio.wait_for(asyncio.gather(*(one(r) for r in reqs)), 60)
            return {r.request_id: o for r, o in zip(reqs, outs)}
        finally:
            ae.stop()

    assert summary(asyncio.run(serve())) == summary(want)


def test_a_bad_async_scheduling_value_names_the_key(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pools:\n  - id: p\n    model: {name: meshgate-tiny}\n    engine: {async_scheduling: maybe}\n")
    with pytest.raises(ConfigError, match=r"pools\[0\]\.engine\.async_scheduling: expected one of auto, on, off"):
        load_config(str(cfg))


def test_auto_is_off_on_cpu(make_engine) -> None:
    assert not make_engine().async_scheduling
    assert make_engine(async_scheduling="on").async_scheduling
