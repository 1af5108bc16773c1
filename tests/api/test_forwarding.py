"""Gateway forwarding against stub pools that fail, stall or drop mid-stream on command."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.api.harness import MODEL, Harness, chat


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


async def test_relays_whole_and_streamed_answers(h):
    await h.start(["a"])
    status, body = await h.post(chat())
    assert status == 200 and body["served_by"] == "a" and body["usage"]["completion_tokens"] == 5
    status, events = await h.post(chat(stream=True))
    assert status == 200
    assert events[-1] == "data: [DONE]" and len(events) == 6


async def test_failover_before_first_token_and_breaker_opens(h):
    await h.start(["a", "b"])
    h.stubs["a"].mode = "error"
    results = [await h.post(chat()) for _ in range(6)]
    assert all(s == 200 and b["served_by"] == "b" for s, b in results)
    pool_a = h.server.upstreams.pools["a"]
    assert pool_a.endpoint.breaker_open or not pool_a.endpoint.healthy
    tried_a = h.stubs["a"].requests
    await asyncio.gather(*(h.post(chat()) for _ in range(5)))
    assert h.stubs["a"].requests == tried_a  # open circuit: no more traffic to a
    # a recovers: after the cool-down (half-open trial) and a probe, traffic returns to it.
    h.stubs["a"].mode = "ok"
    await asyncio.sleep(0.8)
    served = [ (await h.post(chat()))[1]["served_by"] for _ in range(6)]
    assert "a" in served


async def test_a_full_pool_refuses_while_attempts_are_left_and_the_request_goes_elsewhere(h):
    await h.start(["a", "b"])  # round-robin: a is the first choice of every other request
    h.stubs["a"].mode = "full"
    for _ in range(4):
        status, body = await h.post(chat())
        assert status == 200 and body["served_by"] == "b"
    assert h.stubs["a"].requests == 2
    assert all(hd.get("x-meshgate-may-refuse") == "1" for hd, _ in h.stubs["a"].received)
    assert not h.server.upstreams.pools["a"].endpoint.breaker_open  # full is not broken


async def test_a_full_pool_with_nowhere_else_to_go_is_asked_again_and_queues(h):
    await h.start(["a"])
    h.stubs["a"].mode = "full"
    status, body = await h.post(chat())
    assert status == 200 and body["served_by"] == "a"
    assert [hd.get("x-meshgate-may-refuse") for hd, _ in h.stubs["a"].received] == ["1", None]


async def test_stalled_pool_times_out_and_fails_over(h):
    await h.start(["a", "b"], upstream={"first_byte_timeout_s": 0.3})
    h.stubs["a"].mode = "stall"
    statuses = await asyncio.gather(*(h.post(chat(stream=True)) for _ in range(4)))
    assert all(s == 200 and ev[-1] == "data: [DONE]" for s, ev in statuses)
    assert h.stubs["b"].requests == 4


async def test_mid_stream_failure_ends_with_an_error_event(h):
    await h.start(["a"])
    h.stubs["a"].mode = "drop"
    status, events = await asyncio.wait_for(h.post(chat(stream=True)), 5)
    assert status == 200
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][len("data: "):])
    assert err["error"]["type"] == "upstream_error"
    assert "127.0.0.1" not in err["error"]["message"]


async def test_client_disconnect_cancels_the_upstream_request(h):
    await h.start(["a"])
    stub = h.stubs["a"]
    stub.num_tokens, stub.delay_s = 1000, 0.01
    async with h.session.post(h.url + "/v1/chat/completions", json=chat(stream=True)) as r:
        await r.content.readline()
    # the client hung up: the gateway closes the upstream connection and the pool's handler ends
    for _ in range(100):
        if stub.cancelled:
            break
        await asyncio.sleep(0.02)
    assert stub.cancelled == 1
    assert h.server.upstreams.pools["a"].endpoint.in_flight == 0


async def test_no_healthy_pool_gives_503_with_retry_after(h):
    await h.start(["a"])
    h.stubs["a"].mode = "error"  # probes report not ready
    await asyncio.sleep(0.4)
    async with h.session.get(h.url + "/ready") as r:
        assert r.status == 503
    async with h.session.post(h.url + "/v1/chat/completions", json=chat()) as r:
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["type"] == "service_unavailable"


@pytest.mark.parametrize(("body", "status"), [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ({"model": MODEL, "messages": "x"}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, 400),
])
async def test_bad_requests_never_reach_a_pool(h, body, status):
    await h.start(["a"])
    s, b = await h.post(body)
    assert s == status and set(b["error"]) == {"message", "type", "param", "code"}
    assert h.stubs["a"].requests == 0


async def test_deadline_header_bounds_the_wait(h):
    await h.start(["a"], upstream={"first_byte_timeout_s": 5.0})
    h.stubs["a"].mode = "stall"
    t0 = asyncio.get_running_loop().time()
    s, b = await h.post(chat(), headers={"x-meshgate-deadline-ms": "300"})
    assert asyncio.get_running_loop().time() - t0 < 2.0
    assert s in (502, 503) and "error" in b
