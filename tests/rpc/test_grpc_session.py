"""The gRPC front takes a session key as the HTTP front does: prompt_cache_key, else user, else the
x-session-id metadata; a bad one is INVALID_ARGUMENT (issue 13)."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from gateway.rpc import meshgate_pb2 as pb
from tests.rpc.harness import MODEL, RpcHarness, chat

SYSTEM = "You are a careful assistant. Answer briefly and cite your sources. " * 40


@pytest.fixture
async def h() -> AsyncIterator[RpcHarness]:
    harness = RpcHarness()
    yield harness
    await harness.stop()


def turn(i: int, **kw: object) -> pb.GenerateRequest:
    msgs = [pb.Message(role="system", content=SYSTEM)]
    for j in range(i):
        msgs += [pb.Message(role="user", content=f"question {j}"), pb.Message(role="assistant", content=f"answer {j}")]
    msgs.append(pb.Message(role="user", content=f"question {i}"))
    return pb.GenerateRequest(model=MODEL, messages=msgs, max_tokens=3, **kw)  # type: ignore[arg-type]


def session_pool(h: RpcHarness, key: str) -> str:
    return str(h.server.prefix_routing.index.session(key)[0])


async def test_each_source_of_the_session_key_reaches_routing(h: RpcHarness) -> None:
    await h.start(["a", "b", "c"], routing="latency")
    r = await h.stub.Generate(turn(0, prompt_cache_key="conv-k", user="someone"))
    assert session_pool(h, "conv-k") == r.pool_id and session_pool(h, "someone") == ""
    r = await h.stub.Generate(turn(0, user="user-u"))
    assert session_pool(h, "user-u") == r.pool_id
    msgs = [m async for m in h.stub.GenerateStream(turn(0), metadata=(("x-session-id", "header-s"),))]
    assert session_pool(h, "header-s") == msgs[0].pool_id
    # the request's own key wins over the metadata
    r = await h.stub.Generate(turn(0, prompt_cache_key="conv-2"), metadata=(("x-session-id", "header-2"),))
    assert session_pool(h, "conv-2") == r.pool_id and session_pool(h, "header-2") == ""


async def test_a_conversation_stays_on_its_pool_turn_by_turn(h: RpcHarness) -> None:
    # probes lenient enough that a busy test machine does not mark a pool down (then moving is right)
    await h.start(["a", "b", "c"], routing="latency", probe={"timeout_s": 2.0, "down_after": 20})
    pools = [(await h.stub.Generate(turn(i, prompt_cache_key="conv-1"))).pool_id for i in range(5)]
    assert len(set(pools)) == 1, pools
    route = dict(await h.stub.Generate(turn(5, prompt_cache_key="conv-1")).initial_metadata())["x-meshgate-route"]
    assert f"pool={pools[0]}" in route and "cached_tokens=" in route


@pytest.mark.parametrize(("req", "metadata", "details"), [
    (turn(0, prompt_cache_key="k" * 513), (), "'prompt_cache_key' is at most 512 characters"),
    (turn(0, user="u" * 513), (), "'user' is at most 512 characters"),
    (turn(0), (("x-session-id", "s" * 513),), "'x-session-id' must be printable and at most 512 characters"),
    (chat(prompt_cache_key="bad\nkey"), (), "must be printable"),
])
async def test_a_bad_session_key_is_invalid_argument_and_reaches_no_pool(
        h: RpcHarness, req: pb.GenerateRequest, metadata: tuple[tuple[str, str], ...], details: str) -> None:
    await h.start(["a"], routing="latency")
    for method in (h.stub.Generate, h.stub.GenerateStream):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if method is h.stub.Generate:
                await h.stub.Generate(req, metadata=metadata)
            else:
                [m async for m in h.stub.GenerateStream(req, metadata=metadata)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and details in (err.value.details() or "")
    assert h.stubs["a"].requests == 0
