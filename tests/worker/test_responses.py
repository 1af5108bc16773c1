"""gateway.worker.responses: bodies in the shape OpenAI's spec gives (no nulls where it types a
string or an object; null where it says nullable)."""
from __future__ import annotations

from typing import Any

from gateway.worker.responses import ResponseBuilder, usage


class _Tok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def builder(kind: str) -> ResponseBuilder:
    return ResponseBuilder(kind, "rid", "m", _Tok())  # type: ignore[arg-type]


USE = usage(3, 2, 0)
LPS: Any = [(-0.5, [(0, -0.5), (1, -1.0)]), (-0.25, [(1, -0.25)])]


def test_no_null_system_fingerprint():
    """The spec types system_fingerprint as a string, never null: leave it out."""
    for kind in ("chat", "completion"):
        b = builder(kind)
        for body in (b.full("ab", "length", [0, 1], None, USE), b.chunk("a", None, [0], None, True),
                     b.usage_chunk(USE)):
            assert "system_fingerprint" not in body


def test_chat_message_refusal_is_present_and_null():
    msg = builder("chat").full("ab", "stop", [0, 1], None, USE)["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "ab", "refusal": None, "annotations": []}


def test_stream_usage_null_only_where_the_spec_allows_it():
    """Chat chunks carry `usage: null` until the usage chunk (the chunk schema says so); the
    completion schema's usage is not nullable, so its chunks carry none until then."""
    chat, comp = builder("chat"), builder("completion")
    assert chat.chunk("a", None, [0], None, include_usage=True)["usage"] is None
    assert "usage" not in chat.chunk("a", None, [0], None, include_usage=False)
    assert "usage" not in comp.chunk("a", None, [0], None, include_usage=True)
    for b in (chat, comp):
        last = b.usage_chunk(USE)
        assert last["choices"] == [] and last["usage"] == USE


def test_logprobs_shapes():
    chat = builder("chat").full("ab", "length", [0, 1], LPS, USE)["choices"][0]["logprobs"]
    assert chat["refusal"] is None and [t["token"] for t in chat["content"]] == ["a", "b"]
    assert chat["content"][0]["top_logprobs"][1] == {"token": "b", "logprob": -1.0, "bytes": [98]}
    comp = builder("completion").full("ab", "length", [0, 1], LPS, USE)["choices"][0]["logprobs"]
    assert comp == {"tokens": ["a", "b"], "token_logprobs": [-0.5, -0.25],
                    "top_logprobs": [{"a": -0.5, "b": -1.0}, {"b": -0.25}], "text_offset": [0, 1]}
