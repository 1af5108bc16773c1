"""Non-stream requests that outlive their pool (gateway/edge/whole.py): asked of meshgate pools as a
stream, continued when cut, answered whole; `kind: openai` pools keep the whole answer and its retry."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import orjson
import pytest

from gateway.edge.whole import Assembler
from tests.api.harness import MODEL, Harness
from tests.edge.test_resume import FAST, WHOLE, body, metric


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


@pytest.mark.parametrize("path", ["chat", "completions"])
async def test_a_whole_answer_whose_pools_die_is_continued_and_answered_whole(h, tmp_path: Path, path: str):
    log = tmp_path / "usage.jsonl"
    await h.start(["a", "b", "c"], resilience=FAST, usage_log={"path": str(log), "flush_every_s": 0.05})
    for s in h.stubs.values():
        s.mode = "drop"  # each cuts its stream after 2 tokens of its own
    url = "/v1/chat/completions" if path == "chat" else "/v1/completions"
    status, headers, out = await h.request(body(path, stream=False), url)
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["content-type"].startswith("application/json")
    assert out["object"] == ("chat.completion" if path == "chat" else "text_completion")
    (choice,) = out["choices"]
    text = choice["message"]["content"] if path == "chat" else choice["text"]
    assert text == WHOLE  # nothing lost, nothing twice, over two joins
    assert out["id"] == "x" and out["created"] == 0 and out["model"] == MODEL
    assert out["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}  # once
    assert "meshgate_token_ids" not in json.dumps(out)
    asked = sorted(b["meshgate_resume"]["output_token_ids"] for s in h.stubs.values() for _, b in s.received
                   if "meshgate_resume" in b)
    assert asked == [[0, 1], [0, 1, 2, 3]]  # the continuations had the tokens generated so far
    assert await metric(h, 'meshgate_resumes_total{outcome="continued"') == 2
    for _ in range(50):
        if log.exists() and log.read_text():
            break
        await asyncio.sleep(0.05)
    (rec,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert rec["status"] == "complete" and (rec["prompt_tokens"], rec["completion_tokens"]) == (1, 5)
    assert len(rec["pool"].split(",")) == 3


async def test_a_whole_answer_with_nowhere_to_go_is_a_502_error(h):
    await h.start(["a"], resilience=FAST)
    h.stubs["a"].mode = "drop"
    status, _, out = await h.request(body(stream=False))
    assert status == 502 and out["error"]["type"] == "upstream_error"


async def test_openai_pools_get_the_whole_request_and_off_turns_it_off(h):
    await h.start(["a", "b"], resilience=FAST, pool_cfg={"b": {"kind": "openai"}})
    status, _, out = await h.request(body(stream=False))
    assert status == 200 and out["served_by"] in ("a", "b")
    # one of the model's pools is a third-party pool: no pool is asked for a stream
    assert all("stream" not in b or b["stream"] is False for s in h.stubs.values() for _, b in s.received)
    await h.stop()
    h2 = Harness()
    try:
        await h2.start(["a"], resilience={**FAST, "resume_whole": False})
        status, _, out = await h2.request(body(stream=False))
        assert status == 200 and h2.stubs["a"].received[-1][1]["stream"] is False
    finally:
        await h2.stop()


def _events(*chunks: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_the_assembler_joins_choices_tool_calls_and_logprobs() -> None:
    a = Assembler(chat=True)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "extra": 1}
    a.push(_events(
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "He"}, "logprobs": None,
                              "finish_reason": None}]},
        {**head, "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                    "function": {"name": "f", "arguments": ""}}]},
                              "logprobs": None, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "llo"}, "logprobs": None, "finish_reason": "stop"}]},
        {**head, "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]},
                              "logprobs": None, "finish_reason": None}]},
        {**head, "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                              "logprobs": None, "finish_reason": "tool_calls"}]},
        {**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}))
    out, err = a.body()
    assert err is None and out == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m", "extra": 1,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "refusal": None, "annotations": [], "content": "Hello"},
             "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "refusal": None, "annotations": [], "content": None,
                                     "tool_calls": [{"id": "call_1", "type": "function",
                                                     "function": {"name": "f", "arguments": '{"x":1}'}}]},
             "logprobs": None, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}

    c = Assembler(chat=False)
    lp1 = {"tokens": ["a", "bc"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"a": -1.0}, {"bc": -2.0}],
           "text_offset": [0, 1]}
    lp2 = {"tokens": ["d"], "token_logprobs": [-3.0], "top_logprobs": [{"d": -3.0}], "text_offset": [0]}
    c.push(_events({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                    "choices": [{"index": 0, "text": "abc", "logprobs": lp1, "finish_reason": None}]}))
    c.push(b'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m","choices":[{"index":0,'
           b'"text":"d","logprobs":' + orjson.dumps(lp2) + b',"finish_reason":"length"}]}\n\n')
    out, err = c.body()
    assert err is None and out is not None
    assert out["choices"] == [{"index": 0, "text": "abcd", "finish_reason": "length", "logprobs": {
        "tokens": ["a", "bc", "d"], "token_logprobs": [-1.0, -2.0, -3.0],
        "top_logprobs": [{"a": -1.0}, {"bc": -2.0}, {"d": -3.0}], "text_offset": [0, 1, 3]}}]
    e = Assembler(chat=True)
    e.push(b'data: {"error":{"message":"boom","type":"upstream_error","param":null,"code":null}}\n\ndata: [DONE]\n\n')
    assert e.body() == (None, {"error": {"message": "boom", "type": "upstream_error", "param": None, "code": None}})


async def test_a_whole_answer_waits_for_its_first_byte_as_a_whole_answer_does(h):
    # A stream would be given up at the TTFT bound (0.3 s); a whole answer's client waits for all of
    # it anyway (a pool may compile a grammar first), so only the first-byte timeout bounds it.
    await h.start(["a"], upstream={"first_byte_timeout_s": 5.0},
                  resilience={"first_byte_floor_s": 0.2, "first_byte_cap_s": 0.3, "stall_cap_s": 3.0})
    h.stubs["a"].num_tokens, h.stubs["a"].delay_s = 2, 0.6
    status, _, out = await h.request(body(stream=False))
    assert status == 200 and out["choices"][0]["message"]["content"] == "t0 t1 "
    assert h.stubs["a"].requests == 1 and h.stubs["a"].received[0][1]["stream"] is True
