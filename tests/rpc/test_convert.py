"""gRPC messages <-> OpenAI bodies, SSE framing, and errors as status codes (pure functions)."""
from __future__ import annotations

import math

import grpc
import orjson
import pytest

from gateway.core.errors import BadRequest
from gateway.core.protocol import parse_chat, parse_completion
from gateway.rpc import convert
from gateway.rpc import meshgate_pb2 as pb


def test_chat_request_body_sets_only_what_was_given():
    req = pb.GenerateRequest(model="m", messages=[pb.Message(role="system", content="s"),
                                                   pb.Message(role="user", content="u")],
                             temperature=0.0, seed=-3, stop=["\n"], logprobs=True, top_logprobs=2)
    path, body = convert.request_body(req, stream=False)
    assert path == "/v1/chat/completions"
    assert body == {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                    "temperature": 0.0, "seed": -3, "stop": ["\n"], "logprobs": True, "top_logprobs": 2}
    g = parse_chat(body)
    assert g.temperature == 0.0 and g.logprobs == 2 and g.max_tokens is None and not g.stream


def test_completion_request_body_streams_and_maps_logprobs():
    req = pb.GenerateRequest(model="m", prompt="", max_tokens=3, top_k=-1, ignore_eos=True, stop_token_ids=[7],
                             logprobs=True, include_usage=True)
    path, body = convert.request_body(req, stream=True)
    assert path == "/v1/completions"
    g = parse_completion(body)
    assert g.prompt == "" and g.max_tokens == 3 and g.top_k == 0 and g.ignore_eos and g.stop_token_ids == (7,)
    assert g.logprobs == 0 and g.stream and g.include_usage
    # include_usage means nothing for a whole answer (it always has usage): not an error there
    assert "stream_options" not in convert.request_body(req, stream=False)[1]


def test_a_request_is_chat_or_completion():
    with pytest.raises(BadRequest):
        convert.request_body(pb.GenerateRequest(model="m"), stream=False)
    with pytest.raises(BadRequest):
        convert.request_body(pb.GenerateRequest(model="m", prompt="p", messages=[pb.Message(role="user")]), False)


def test_whole_chat_answer_with_logprobs():
    body = {"id": "chatcmpl-1", "model": "m", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "ab"}, "finish_reason": "stop",
        "logprobs": {"content": [{"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5},
                                                                                  {"token": "b", "logprob": -1.5}]},
                                 {"token": "b", "logprob": None, "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                  "prompt_tokens_details": {"cached_tokens": 2}}}
    r = convert.whole_response(body)
    assert (r.id, r.text, r.finish_reason) == ("chatcmpl-1", "ab", "stop")
    assert (r.usage.total_tokens, r.usage.cached_tokens) == (5, 2)
    assert [t.token for t in r.logprobs] == ["a", "b"] and r.logprobs[0].top_logprobs[1].logprob == -1.5
    assert math.isnan(r.logprobs[1].logprob)  # JSON null (OpenAI's -inf) is not a number we can send


def test_stream_chunks_of_both_kinds():
    chat = {"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    assert convert.stream_response(chat).text == "hi"
    role_only = {"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    assert convert.stream_response(role_only) is None
    last = {"id": "x", "choices": [{"index": 0, "text": "", "finish_reason": "length",
                                    "logprobs": {"tokens": ["z"], "token_logprobs": [-0.25],
                                                 "top_logprobs": [{"z": -0.25, "y": -2.0}], "text_offset": [0]}}]}
    m = convert.stream_response(last)
    assert m.finish_reason == "length" and m.logprobs[0].token == "z"
    assert {a.token: a.logprob for a in m.logprobs[0].top_logprobs} == {"z": -0.25, "y": -2.0}
    use = convert.stream_response({"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                                      "total_tokens": 3}})
    assert use.HasField("usage") and use.usage.completion_tokens == 2 and use.text == ""


def test_event_reader_reassembles_events_cut_anywhere():
    events = [{"n": i} for i in range(3)]
    raw = b": keep-alive\r\n\r\n" + b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
    raw += b"data: [DONE]\r\n\r\n"
    for cut in range(1, len(raw)):
        reader = convert.EventReader()
        got = reader.feed(raw[:cut]) + reader.feed(raw[cut:])
        assert [orjson.loads(p) for p in got] == events and reader.done


@pytest.mark.parametrize(("body", "status", "code", "message"), [
    ({"error": {"message": "too long", "type": "invalid_request_error", "param": "messages",
                "code": "context_length_exceeded"}}, 400, grpc.StatusCode.INVALID_ARGUMENT, "too long"),
    ({"object": "error", "message": "vllm says no", "type": "BadRequestError", "code": 400}, None,
     grpc.StatusCode.INVALID_ARGUMENT, "vllm says no"),
    ({"error": {"message": "slow", "type": "service_unavailable"}}, None, grpc.StatusCode.UNAVAILABLE, "slow"),
    ({"error": {"message": "engine died", "type": "internal_error"}}, None, grpc.StatusCode.INTERNAL, "engine died"),
    ({"error": "plain"}, None, grpc.StatusCode.UNAVAILABLE, "plain"),
])
def test_pool_errors_keep_their_meaning(body, status, code, message):
    e = convert.pool_error(body, status)
    assert convert.grpc_code(e.status) == code and e.message == message


@pytest.mark.parametrize(("status", "code"), [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED),
    (404, grpc.StatusCode.NOT_FOUND), (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (429, grpc.StatusCode.RESOURCE_EXHAUSTED), (502, grpc.StatusCode.UNAVAILABLE),
    (503, grpc.StatusCode.UNAVAILABLE), (504, grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_status_codes(status, code):
    assert convert.grpc_code(status) == code
