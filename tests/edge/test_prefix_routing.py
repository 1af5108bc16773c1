"""The gateway's glue for prefix- and session-aware routing (gateway/edge/prefix_routing.py)."""
from __future__ import annotations

import pytest

from gateway.core.errors import BadRequest
from gateway.core.prefix import CHUNK_CHARS, IDS_PER_CHUNK
from gateway.core.protocol import parse_chat, parse_completion
from gateway.core.types import Endpoint, RouteRequest
from gateway.edge.prefix_routing import PrefixRouting
from gateway.routing.prefix_index import PrefixIndex

LONG = "a fairly long system prompt with many words in it. " * 60


def test_session_key_prompt_cache_key_then_user_then_header() -> None:
    pr = PrefixRouting(PrefixIndex())
    msgs = [{"role": "user", "content": "hi"}]
    both = parse_chat({"model": "m", "messages": msgs, "prompt_cache_key": "k1", "user": "u1"})
    assert pr.route_fields(both, {"x-session-id": "h1"})["session_key"] == "k1"
    user = parse_chat({"model": "m", "messages": msgs, "user": "u1"})
    assert pr.route_fields(user, {"x-session-id": "h1"})["session_key"] == "u1"
    none = parse_chat({"model": "m", "messages": msgs})
    assert pr.route_fields(none, {"x-session-id": "h1"})["session_key"] == "h1"
    with pytest.raises(BadRequest):
        pr.route_fields(none, {"x-session-id": "x" * 513})
    with pytest.raises(BadRequest):
        pr.route_fields(none, {"x-session-id": "bad\nkey"})


def test_a_routed_request_is_remembered_and_its_session_follows() -> None:
    index = PrefixIndex()
    pr = PrefixRouting(index)
    e = Endpoint("p1", "", None, "meshgate", frozenset({"m"}))
    index.attach([e])
    g = parse_chat({"model": "m", "messages": [{"role": "system", "content": LONG}], "prompt_cache_key": "c"})
    fields = pr.route_fields(g, {})
    route = RouteRequest(model="m", **fields)
    pr.routed(route, e)
    assert e.prefix is not None and e.prefix.matched(route.prefix_hashes) == len(route.prefix_hashes)
    assert pr.route_fields(g, {})["session_pool"] == "p1"


def test_chars_to_tokens_comes_from_usage_and_ids_are_exact() -> None:
    pr = PrefixRouting(PrefixIndex())
    g = parse_completion({"model": "m", "prompt": LONG})
    route = RouteRequest(model="m", **pr.route_fields(g, {}))
    pr.usage(route, prompt_tokens=len(LONG) // 2)  # this model: 2 characters a token
    fields = pr.route_fields(g, {})
    assert fields["tokens_per_char"] == pytest.approx(0.5, rel=0.01)
    assert fields["tokens_per_chunk"] == pytest.approx(CHUNK_CHARS * 0.5, rel=0.01)
    ids = parse_completion({"model": "m", "prompt": list(range(3 * IDS_PER_CHUNK))})
    f = pr.route_fields(ids, {})
    assert f["tokens_per_chunk"] == IDS_PER_CHUNK and f["prompt_chars"] == 3 * IDS_PER_CHUNK and len(f["prefix_hashes"]) == 3


def test_off_keeps_only_the_session_key() -> None:
    pr = PrefixRouting(PrefixIndex(), enabled=False)
    g = parse_chat({"model": "m", "messages": [{"role": "user", "content": LONG}], "prompt_cache_key": "k"})
    assert pr.route_fields(g, {}) == {"session_key": "k"}
