"""The gRPC front against stub pools in-process: relaying, errors as status codes, failover,
cancellation, deadlines, health and reflection."""
from __future__ import annotations

import asyncio
import json

import grpc
import orjson
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.edge.admission import hash_key
from gateway.rpc import meshgate_pb2 as pb
from tests.rpc.harness import MODEL, RpcHarness, chat, completion
from tests.stub_pool import StubPool

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def h():
    harness = RpcHarness()
    yield harness
    await harness.stop()


async def _eventually(pred, timeout_s: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.02)):
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


async def test_unary_chat_and_completion(h):
    await h.start(["a"])
    call = h.stub.Generate(chat(), metadata=(("x-request-id", "req-1"),))
    r = await call
    assert r.text == "t0 t1 t2 t3 t4 " and r.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1, 5, 6)
    assert r.pool_id == "a" and r.request_id == "req-1" and r.model == MODEL
    md = dict(await call.initial_metadata())
    assert md["x-request-id"] == "req-1" and "pool=a" in md["x-meshgate-route"]
    r = await h.stub.Generate(completion())
    assert r.text == "t0 t1 t2 t3 t4 " and len(r.request_id) == 32  # the gateway's own id
    assert h.server.in_flight == 0


async def test_streamed_chat_and_completion(h):
    await h.start(["a"])
    for req in (chat(), completion()):
        msgs = [m async for m in h.stub.GenerateStream(req)]
        assert [m.text for m in msgs] == [f"t{i} " for i in range(5)]
        assert all(m.pool_id == "a" and m.request_id == msgs[0].request_id for m in msgs)
    assert h.stubs["a"].requests == 2
    assert h.server.in_flight == 0 and h.server.upstreams.pools["a"].endpoint.in_flight == 0


async def test_list_models(h):
    await h.start(["a", "b"])
    r = await h.stub.ListModels(pb.ListModelsRequest())
    assert [m.id for m in r.models] == [MODEL] and r.models[0].owned_by == "meshgate"


@pytest.mark.parametrize(("req", "code", "details"), [
    (pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "The model 'nope' does not exist"),
    (chat(temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT, "'temperature' must be a number between 0 and 2"),
    (chat(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "'top_p' must be in (0, 1]"),
    (chat(max_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT, "'max_tokens' is at most 8192 here"),
    (chat(prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "give either 'messages'"),
    (pb.GenerateRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "give either 'messages'"),
    (pb.GenerateRequest(model=MODEL, messages=[pb.Message(role="robot", content="x")]),
     grpc.StatusCode.INVALID_ARGUMENT, "'messages[0].role' must be one of"),
    (completion(top_logprobs=2), grpc.StatusCode.INVALID_ARGUMENT, "'top_logprobs' requires 'logprobs'"),
    (chat(top_logprobs=2), grpc.StatusCode.INVALID_ARGUMENT, "'top_logprobs' requires 'logprobs'"),
])
async def test_bad_requests_never_reach_a_pool(h, req, code, details):
    await h.start(["a"])
    for method in (h.stub.Generate, h.stub.GenerateStream):
        call = method(req)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if method is h.stub.Generate:
                await call
            else:
                [m async for m in call]
        assert err.value.code() == code and details in err.value.details()
        trailers = dict(err.value.trailing_metadata())
        assert trailers["x-meshgate-error-type"] in ("invalid_request_error", "not_found_error")
    assert h.stubs["a"].requests == 0


async def test_limits_come_from_the_gateway_config(h):
    await h.start(["a"], limits={"max_prompt_chars": 10})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Generate(completion(prompt="x" * 11))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # 413


async def test_failover_to_a_second_pool_when_the_first_errors(h):
    await h.start(["a", "b"])
    h.stubs["a"].mode = "error"
    whole = [await h.stub.Generate(chat()) for _ in range(3)]
    streams = [[m async for m in h.stub.GenerateStream(chat())] for _ in range(3)]
    assert {r.pool_id for r in whole} == {"b"}
    assert {m.pool_id for s in streams for m in s} == {"b"} and all(len(s) == 5 for s in streams)
    assert h.stubs["a"].requests >= 1  # round-robin sent some there first


async def test_no_healthy_pool_is_unavailable_and_health_says_so(h):
    await h.start(["a"])
    assert await h.health_status() == SERVING
    assert await h.health_status("meshgate.v1.Generation") == SERVING
    h.stubs["a"].mode = "error"  # probes report not ready
    await asyncio.sleep(0.5)
    assert await h.health_status() == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Generate(chat())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
    h.stubs["a"].mode = "ok"
    await asyncio.sleep(0.4)
    assert await h.health_status() == SERVING


async def test_mid_stream_failure_ends_the_call_with_unavailable(h):
    await h.start(["a"])
    h.stubs["a"].mode = "drop"
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for m in h.stub.GenerateStream(chat(), timeout=5):
            got.append(m.text)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "mid-stream" in err.value.details() and "127.0.0.1" not in err.value.details()
    assert 1 <= len(got) <= 2


async def test_a_stream_whose_pool_dies_goes_on_on_another_pool(h):
    await h.start(["a", "b"])
    for s in h.stubs.values():
        s.mode = "drop"  # each cuts after 2 tokens of its own: 2 from the first, the rest from the other
    h.stubs["a"].cut_after = h.stubs["b"].cut_after = 3
    msgs = [m async for m in h.stub.GenerateStream(chat(), timeout=10)]
    assert "".join(m.text for m in msgs) == "t0 t1 t2 t3 t4 "
    assert len({m.request_id for m in msgs}) == 1 and len({m.pool_id for m in msgs}) == 2


async def test_client_cancel_cancels_the_upstream_request(h):
    await h.start(["a"])
    stub = h.stubs["a"]
    stub.num_tokens, stub.delay_s = 1000, 0.01
    call = h.stub.GenerateStream(chat())
    first = await call.read()
    assert first.text == "t0 "
    call.cancel()
    # the gateway's handler is cancelled, closes the upstream, and the pool's handler ends
    assert await _eventually(lambda: stub.cancelled == 1)
    assert await _eventually(lambda: h.server.upstreams.pools["a"].endpoint.in_flight == 0)
    assert h.server.in_flight == 0


async def test_call_deadline_bounds_the_upstream_wait(h):
    await h.start(["a"], upstream={"first_byte_timeout_s": 5.0})
    h.stubs["a"].mode = "stall"
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Generate(chat(), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert asyncio.get_running_loop().time() - t0 < 2.0
    assert await _eventually(lambda: h.stubs["a"].cancelled == 1)  # the stalled pool request was dropped
    assert await _eventually(lambda: h.server.in_flight == 0)


async def test_deadline_metadata_bounds_the_request_like_the_http_header(h):
    await h.start(["a"], upstream={"first_byte_timeout_s": 5.0})
    h.stubs["a"].mode = "stall"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Generate(chat(), metadata=(("x-meshgate-deadline-ms", "300"),), timeout=5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_requests_are_counted_with_the_http_front(h):
    await h.start(["a"])
    await h.stub.Generate(chat())
    with pytest.raises(grpc.aio.AioRpcError):
        await h.stub.Generate(pb.GenerateRequest(model="nope", prompt="x"))
    counter = h.server.metrics.requests

    def counted(status: str, pool: str) -> float:
        return counter.labels("/meshgate.v1.Generation/Generate", status, pool)._value.get()

    # The server counts a call as its handler returns, which may be just after the client has the answer.
    async with asyncio.timeout(5):
        while counted("200", "a") < 1 or counted("404", "") < 1:
            await asyncio.sleep(0.01)
    assert counted("200", "a") == 1 and counted("404", "") == 1


async def test_reflection_lists_and_describes_the_services(h):
    await h.start(["a"])
    refl = reflection_pb2_grpc.ServerReflectionStub(h.channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = {s.name for s in (await call.read()).list_services_response.service}
    assert {"meshgate.v1.Generation", "grpc.health.v1.Health"} <= listed
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="meshgate.v1.Generation"))
    files = (await call.read()).file_descriptor_response.file_descriptor_proto
    assert files and b"GenerateStream" in files[0]  # what grpcurl needs to build requests
    await call.done_writing()


async def test_an_error_event_from_the_pool_ends_the_stream_with_its_code(h, monkeypatch):
    async def generate(self, request: web.Request) -> web.StreamResponse:  # one token, then the engine fails
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "x", "choices": [{"index": 0, "delta": {"content": "t0 "}, "finish_reason": None}]}
        err = {"error": {"message": "the engine stopped", "type": "internal_error", "param": None, "code": None}}
        for event in (chunk, err):
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    monkeypatch.setattr(StubPool, "generate", generate)
    await h.start(["a"])
    call = h.stub.GenerateStream(chat())
    assert (await call.read()).text == "t0 "
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INTERNAL and err.value.details() == "the engine stopped"
    assert dict(err.value.trailing_metadata())["x-meshgate-error-type"] == "internal_error"


async def test_stream_usage_comes_last_when_asked(h):
    await h.start(["a"])
    msgs = [m async for m in h.stub.GenerateStream(chat(include_usage=True))]
    assert msgs[-1].HasField("usage") and msgs[-1].usage.completion_tokens == 5 and msgs[-1].text == ""
    assert not any(m.HasField("usage") for m in msgs[:-1])


# -- API keys and metering: the gateway's prepare does them for both fronts ------------------------
GOLD, NARROW = "sk-gold-0123456789", "sk-narrow-0123456789"
AUTH = {"enabled": True, "keys": [{"id": "gold", "sha256": hash_key(GOLD), "priority": "contracted"},
                                  {"id": "narrow", "sha256": hash_key(NARROW), "models": ["other-model"]}]}


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def test_calls_need_a_key_before_anything_is_validated(h):
    await h.start(["a"], auth=AUTH)
    for req in (chat(), pb.GenerateRequest(model="nope", temperature=9.0)):
        for metadata in ((), bearer("sk-wrong")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await h.stub.Generate(req, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert dict(err.value.trailing_metadata())["x-meshgate-error-type"] == "authentication_error"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.ListModels(pb.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert h.stubs["a"].requests == 0
    r = await h.stub.Generate(chat(), metadata=bearer(GOLD))
    assert r.usage.completion_tokens == 5


async def test_a_key_sees_only_its_models(h):
    await h.start(["a"], auth=AUTH)
    assert [m.id for m in (await h.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(GOLD))).models] == [MODEL]
    assert not (await h.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(NARROW))).models
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Generate(chat(), metadata=bearer(NARROW))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_streams_are_metered_per_key(h):
    await h.start(["a"], auth=AUTH)
    msgs = [m async for m in h.stub.GenerateStream(chat(), metadata=bearer(GOLD))]
    # the gateway asked the pool for usage to meter the stream; the client, who did not, gets none
    assert len(msgs) == 5 and not any(m.HasField("usage") for m in msgs)
    m = h.server.metrics
    assert await _eventually(lambda: m.usage_completion.labels("gold", MODEL, "a")._value.get() == 5)
    assert m.usage_requests.labels("gold", MODEL, "a", "complete")._value.get() == 1


async def test_tools_and_response_format_as_json_strings(h):
    """Tools, tool_choice, response_format, penalties and logit_bias reach the pool as the OpenAI
    fields they stand for; a tool call in the answer comes back as tool_calls."""
    await h.start(["a"])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = pb.GenerateRequest(model=MODEL, messages=[pb.Message(role="user", content="x")],
                             tools_json=json.dumps(tools), tool_choice_json='"required"',
                             frequency_penalty=0.5, logit_bias_json='{"5": -100}')
    await h.stub.Generate(req)
    body = h.stubs["a"].received[-1][1]
    assert body["tools"] == tools and body["tool_choice"] == "required"
    assert body["frequency_penalty"] == 0.5 and body["logit_bias"] == {"5": -100}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    await h.stub.Generate(pb.GenerateRequest(model=MODEL, messages=[pb.Message(role="user", content="x")],
                                             response_format_json=json.dumps(fmt)))
    assert h.stubs["a"].received[-1][1]["response_format"] == fmt
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await h.stub.Generate(pb.GenerateRequest(model=MODEL, messages=[pb.Message(role="user", content="x")],
                                                 tools_json="[oops"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools_json" in err.value.details()


def test_tool_calls_convert():
    from gateway.rpc import convert

    whole = convert.whole_response({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}]})
    assert whole.finish_reason == "tool_calls"
    assert [(t.id, t.name, t.arguments) for t in whole.tool_calls] == [("call_1", "f", '{"a":1}')]
    piece = convert.stream_response({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": None,
        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}}]})
    assert piece is not None and piece.tool_calls[0].arguments == '{"a"' and not piece.tool_calls[0].id
