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


def _conn_waits(h: Harness, pool: str, outcome: str) -> float:
    v = h.server.metrics.registry.get_sample_value("meshgate_upstream_connection_waits_total",
                                                   {"pool": pool, "outcome": outcome})
    return v or 0.0


# One connection per pool, and no probes during the test (a probe needs a connection too).
ONE_CONNECTION = {"upstream": {"max_connections": 1, "connections_per_slot": 0, "connection_wait_s": 0.3},
                  "probe": {"period_s": 30}}


async def test_a_pool_at_its_connection_cap_is_passed_over_not_queued_behind(h):
    await h.start(["a", "b"], **ONE_CONNECTION)  # round-robin: a, b, a ... first
    h.stubs["a"].delay_s = 0.3  # a's stream holds its only connection for ~1.5 s
    first = asyncio.create_task(h.request(chat(stream=True)))
    while h.stubs["a"].requests == 0:
        await asyncio.sleep(0.01)
    assert (await h.post(chat(stream=True)))[0] == 200  # b's turn first
    status, headers, events = await h.request(chat(stream=True))  # a's turn: a is full
    assert status == 200 and headers["x-meshgate-pool"] == "b" and events[-1] == "data: [DONE]"
    assert h.stubs["a"].requests == 1 and _conn_waits(h, "a", "skipped") == 1
    assert not first.done()  # still streaming from a when the third request was served
    status, headers, _ = await first
    assert status == 200 and headers["x-meshgate-pool"] == "a"


async def test_with_no_other_candidate_the_wait_for_a_connection_is_bounded_and_counted(h):
    await h.start(["a"], **ONE_CONNECTION)
    h.stubs["a"].delay_s = 0.3
    first = asyncio.create_task(h.request(chat(stream=True)))
    while h.stubs["a"].requests == 0:
        await asyncio.sleep(0.01)
    status, headers, body = await h.request(chat(stream=True))
    assert status == 503 and "retry-after" in {k.lower() for k in headers}
    assert body["error"]["message"].startswith("every connection")
    assert _conn_waits(h, "a", "timed_out") == 1 and h.stubs["a"].requests == 1
    assert h.server.upstreams.pools["a"].endpoint.connection_wait_s > 0  # the latency model sees the queue
    assert not h.server.upstreams.pools["a"].endpoint.breaker_open  # busy, not broken
    assert (await first)[0] == 200
    status, _, _ = await h.request(chat(stream=True))  # the connection is free again: no wait
    assert status == 200 and _conn_waits(h, "a", "waited") == 0


def test_a_pool_advertising_slots_gets_connections_for_them():
    from gateway.config import PoolConfig, ProbeConfig, UpstreamConfig
    from gateway.core.types import LoadReport
    from gateway.pools.upstream import Upstreams

    up = Upstreams((PoolConfig(id="a", url="http://127.0.0.1:1", models=("m",), kind="openai"),),
                   UpstreamConfig(max_connections=100, connections_per_slot=4), ProbeConfig())
    pool = up.pools["a"]
    assert pool.connection_cap() == 100  # nothing advertised: the configured cap
    pool.update_load(LoadReport(max_num_seqs=64))
    assert pool.connection_cap() == 256
    pool.update_load(LoadReport(max_num_seqs=8))
    assert pool.connection_cap() == 100  # never below the configured cap


@pytest.mark.parametrize("field,value", [("max_connections", 0), ("connections_per_slot", -1),
                                         ("connection_wait_s", 0)])
def test_connection_cap_settings_are_checked_at_load(field, value):
    from gateway.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=f"gateway.upstream.{field}"):
        config_from_dict({"gateway": {"upstream": {field: value}},
                          "pools": [{"id": "a", "url": "http://127.0.0.1:1", "models": ["m"], "kind": "openai"}]})


async def test_a_client_that_reads_slowly_pauses_the_pool_and_still_gets_every_token(h, monkeypatch):
    """Flow control through the relay: while the client's socket is full, the gateway stops reading
    the pool (instead of buffering the stream), and resumes when the client reads again."""
    import socket

    from gateway.pools import h1client

    pauses = []
    real_pause = h1client._Conn.pause
    monkeypatch.setattr(h1client._Conn, "pause", lambda self: (pauses.append(1), real_pause(self))[1])
    # The stub shares this event loop and writes as fast as it can: probes this tight would time out
    # and mark it down (cutting the stream), which is not what this test is about.
    await h.start(["a"], probe={"period_s": 1.0, "timeout_s": 5.0})
    h.stubs["a"].num_tokens = 50000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(h.url.rsplit(":", 1)[1])))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps(chat(stream=True)).encode()  # the stub sends num_tokens whatever it is asked
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    head = await reader.read(1024)
    assert head.startswith(b"HTTP/1.1 200"), head
    for _ in range(100):  # the client reads nothing more until the gateway has paused the pool
        if pauses:
            break
        await asyncio.sleep(0.05)
    assert pauses, [(c.paused, c.transport.get_write_buffer_size()) for c in h.server.http.conns]
    raw = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    assert raw.count(b'"delta"') >= 49990 and b"data: [DONE]" in raw
