"""The HTTP front's session key reaches routing: prompt_cache_key, else user, else x-session-id
(the gateway's own reading of the body, gateway/core/envelope.py); a bad one is the gateway's 400,
before any pool sees it (issue 13)."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.harness import MODEL, Harness


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    await harness.stop()


def body(**kw: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 200}], "max_tokens": 3, **kw}


def session_pool(h: Harness, key: str) -> str:
    assert h.server is not None
    return str(h.server.prefix_routing.index.session(key)[0])


async def test_the_body_and_header_keys_reach_routing(h: Harness) -> None:
    await h.start(["a", "b"], routing="latency")
    status, _ = await h.post(body(prompt_cache_key="conv-1", user="someone"))
    assert status == 200 and session_pool(h, "conv-1") in ("a", "b") and session_pool(h, "someone") == ""
    status, _ = await h.post(body(user="user-1"), headers={"x-session-id": "hdr-1"})
    assert status == 200 and session_pool(h, "user-1") in ("a", "b") and session_pool(h, "hdr-1") == ""
    status, _ = await h.post(body(), headers={"x-session-id": "hdr-2"})
    assert status == 200 and session_pool(h, "hdr-2") in ("a", "b")
    status, _ = await h.post({"model": MODEL, "prompt": "once upon " * 100, "max_tokens": 3, "user": "comp-1"},
                             path="/v1/completions")
    assert status == 200 and session_pool(h, "comp-1") in ("a", "b")


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt_cache_key": 42}, "prompt_cache_key"), ({"user": ["u"]}, "user"),
    ({"prompt_cache_key": "k" * 513}, "prompt_cache_key"), ({"user": "bad\u0000key"}, "user"),
])
async def test_a_bad_key_is_the_gateways_400(h: Harness, fields: dict[str, object], param: str) -> None:
    await h.start(["a"], routing="latency")
    status, err = await h.post(body(**fields))
    assert status == 400 and isinstance(err, dict)
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    assert h.stubs["a"].requests == 0
    status, _ = await h.post(body(prompt_cache_key="fine"))
    assert status == 200  # and it keeps serving
