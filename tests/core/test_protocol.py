"""gateway.core.protocol: what the OpenAI spec allows is accepted, anything else is a 400 that
names the field, and no body, however odd, gets past as an exception other than BadRequest."""
from __future__ import annotations

from typing import Any

import pytest

from gateway.core.errors import BadRequest
from gateway.core.protocol import parse_chat, parse_completion

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": MODEL, "prompt": "hi"}


def refused(parse: Any, body: Any, param: str | None) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        parse(body)
    assert e.value.param == param, e.value.message
    return e.value


def nest(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(("prompt", "text", "ids"), [
    ("x", "x", None), (["x"], "x", None), ([5, 6], None, (5, 6)), ([[5, 6]], None, (5, 6)),
    (None, "", None),  # null: the spec's default prompt, the start of a document
])
def test_prompt_forms_the_spec_allows(prompt, text, ids):
    g = parse_completion({**COMP, "prompt": prompt})
    assert (g.prompt, g.prompt_token_ids) == (text, ids)


@pytest.mark.parametrize("prompt", [
    [[[5, 6]]], [["x"]], nest(3, "x"), [[]], [], [1, "a"], {"a": 1}, 5,
    nest(5000, 1),  # used to recurse once per level: RecursionError, a 500
])
def test_prompt_forms_it_does_not(prompt):
    refused(parse_completion, {**COMP, "prompt": prompt}, "prompt")


def test_prompt_is_required_and_one_only():
    refused(parse_completion, {"model": MODEL}, "prompt")
    assert "only one prompt" in refused(parse_completion, {**COMP, "prompt": ["a", "b"]}, "prompt").message
    assert "only one prompt" in refused(parse_completion, {**COMP, "prompt": [[1], [2]]}, "prompt").message


@pytest.mark.parametrize(("field", "value"), [
    ("n", True), ("best_of", True), ("echo", 0), ("echo", True), ("moderation", {"input": True}),
])
def test_unsupported_fields_only_at_their_default_value_and_type(field, value):
    """True == 1 and 0 == False in Python, not in JSON: `n: true` is not `n: 1`."""
    e = refused(parse_completion if field in ("best_of", "echo") else parse_chat,
                {**(COMP if field in ("best_of", "echo") else CHAT), field: value}, field)
    assert e.code == "unsupported_parameter" or "type" in e.message


@pytest.mark.parametrize(("field", "value"), [
    ("n", 1), ("best_of", 1), ("echo", False), ("frequency_penalty", 0.0), ("presence_penalty", 0), ("n", None),
])
def test_unsupported_fields_at_their_default_are_fine(field, value):
    parse_completion({**COMP, field: value})


@pytest.mark.parametrize(("field", "good", "bad"), [
    ("user", "u", 5), ("metadata", {"k": "v"}, []), ("store", False, "no"), ("parallel_tool_calls", True, {}),
    ("modalities", ["text"], "text"), ("service_tier", "auto", 1), ("prompt_cache_key", "k", ["k"]),
    ("prompt_cache_retention", "24h", 24), ("prompt_cache_options", {}, "x"), ("safety_identifier", "s", 1.5),
])
def test_no_effect_fields_are_accepted_when_well_typed(field, good, bad):
    parse_chat({**CHAT, field: good})
    parse_chat({**CHAT, field: None})
    refused(parse_chat, {**CHAT, field: bad}, field)


def test_moderation_null_is_the_default():
    parse_chat({**CHAT, "moderation": None})


@pytest.mark.parametrize(("field", "bad"), [
    ("n", 0), ("n", 17), ("n", 2.0), ("frequency_penalty", False), ("presence_penalty", 2.5),
    ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}), ("logit_bias", [5]), ("tools", {}),
    ("tools", [{"type": "function", "function": {"name": "a b"}}]), ("tool_choice", "always"),
    ("tool_choice", "required"), ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": {}}}),
])
def test_agent_fields_are_checked(field, bad):
    with pytest.raises(BadRequest) as e:
        parse_chat({**CHAT, field: bad})
    assert (e.value.param or "").startswith(field), e.value.message


def test_agent_fields_parse():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    g = parse_chat({**CHAT, "n": 3, "frequency_penalty": 0.5, "presence_penalty": -1, "logit_bias": {"7": -100},
                    "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert (g.n, g.frequency_penalty, g.presence_penalty, g.logit_bias) == (3, 0.5, -1.0, ((7, -100.0),))
    assert (g.tool_choice, g.tool_name, g.tools[0]["name"]) == ("function", "get_weather", "get_weather")
    assert parse_chat({**CHAT, "tools": tools}).tool_choice == "auto"  # the default with tools
    g = parse_chat({**CHAT, "response_format": {"type": "json_schema",
                                                "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}})
    assert g.response_format == {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}
    refused(parse_chat, {**CHAT, "tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": tools},
            "tool_choice")
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    g = parse_chat({**CHAT, "messages": msgs})
    assert g.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert g.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    refused(parse_chat, {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id")


def test_max_completion_tokens_and_its_deprecated_name():
    assert parse_chat({**CHAT, "max_completion_tokens": 7, "max_tokens": 9}).max_tokens == 7
    assert parse_chat({**CHAT, "max_completion_tokens": None, "max_tokens": 5}).max_tokens == 5
    assert parse_chat(CHAT).max_tokens is None
    refused(parse_chat, {**CHAT, "max_completion_tokens": "7"}, "max_completion_tokens")
    refused(parse_chat, {**CHAT, "max_tokens": 1.5}, "max_tokens")
    assert parse_completion(COMP).max_tokens == 16
    for bad in (1e12, -5, 1.5, "7", True, 0):
        refused(parse_completion, {**COMP, "max_tokens": bad}, "max_tokens")


def test_stream_options_as_load_tools_send_them():
    g = parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    assert g.stream and g.include_usage and g.ignore_eos
    g = parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": False, "include_obfuscation": False}})
    assert not g.include_usage
    for bad in ({"include_usage": "yes"}, {"include_obfuscation": 1}, [], "x"):
        refused(parse_chat, {**CHAT, "stream": True, "stream_options": bad}, "stream_options")
