"""Request bodies of POST /v1/responses (the stateless subset) and POST /v1/embeddings, parsed
for our worker.

Responses: input as text or items (messages with text content, function_call and
function_call_output items), instructions, max_output_tokens, temperature, top_p, tools (flat
function tools), tool_choice, text.format, stream. Not built: stored responses, so `store: true`,
`previous_response_id`, `conversation` and `background: true` are refused with a 400 that says so.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from gateway.core.agent_protocol import agent_fields, response_format
from gateway.core.errors import BadRequest
from gateway.core.protocol import GenerationRequest, _common

# Accepted and without effect on the output (or at the only value we serve).
_NO_EFFECT = {"metadata", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
              "prompt_cache_options", "parallel_tool_calls", "service_tier", "truncation", "include", "reasoning",
              "max_tool_calls", "context_management"}
_FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
           "text", "stream", "stream_options", "store", "previous_response_id", "conversation", "background",
           "top_logprobs", "prompt", "moderation"} | _NO_EFFECT
MAX_EMBEDDING_INPUTS = 2048


def parse_responses(body: Any) -> GenerationRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key in body:
        if key not in _FIELDS:
            raise BadRequest(f"Unrecognized request argument supplied: {key}", param=key)
    for key in ("previous_response_id", "conversation", "prompt", "moderation"):
        if body.get(key) is not None:
            raise BadRequest(f"'{key}' is not supported: this server keeps no responses or prompts "
                             "(send the whole conversation as input)", param=key, code="unsupported_parameter")
    if body.get("store") is True or body.get("background") is True:
        key = "store" if body.get("store") is True else "background"
        raise BadRequest(f"'{key}: true' is not supported: this server keeps no responses; set it to false",
                         param=key, code="unsupported_parameter")
    if body.get("top_logprobs"):
        raise BadRequest("'top_logprobs' is not supported on /v1/responses here", param="top_logprobs",
                         code="unsupported_parameter")
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise BadRequest("'text' must be an object", param="text")
    fmt = response_format((text or {}).get("format"), "text.format", flat=True)
    messages = _input_messages(body)
    agent = agent_fields(body.get("tools"), body.get("tool_choice"), fmt, flat=True)
    chat_like = {k: body[k] for k in ("model", "temperature", "top_p", "stream", "stream_options") if k in body}
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("'model' is a required property and must be a string", param="model")
    g = _common(chat_like, "responses", None, None, tuple(messages), body.get("max_output_tokens"), None,
                "max_output_tokens")
    return dataclasses.replace(g, **agent)


def _text(content: Any, p: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{p}.content' must be a string or an array of content parts", param=f"{p}.content")
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            raise BadRequest(f"'{p}.content[{j}]' must be a text part (input_text or output_text)",
                             param=f"{p}.content")
        out.append(part["text"])
    return "".join(out)


def _input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation as chat messages: instructions first, as a system message."""
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string", param="instructions")
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty array of input items", param="input")
    for i, item in enumerate(items):
        p = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ("user", "system", "developer", "assistant"):
            out.append({"role": item["role"], "content": _text(item.get("content"), p)})
        elif kind == "function_call" and all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output" and isinstance(item.get("call_id"), str) \
                and isinstance(item.get("output"), str):
            out.append({"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]})
        else:
            raise BadRequest(f"'{p}' must be a message (role user, system, developer or assistant, text content), "
                             "a function_call or a function_call_output item", param=p)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    texts: tuple[str, ...] | None  # the input as text, or
    token_ids: tuple[tuple[int, ...], ...] | None  # as token ids
    encoding_format: str  # float | base64
    dimensions: int | None


def parse_embeddings(body: Any) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key in body:
        if key not in ("model", "input", "encoding_format", "dimensions", "user"):
            raise BadRequest(f"Unrecognized request argument supplied: {key}", param=key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is a required property and must be a string", param="model")
    v = body.get("input")
    texts: tuple[str, ...] | None = None
    ids: tuple[tuple[int, ...], ...] | None = None
    if isinstance(v, str):
        texts = (v,)
    elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        texts = tuple(v)
    elif isinstance(v, list) and v and all(_is_id(t) for t in v):
        ids = (tuple(v),)
    elif isinstance(v, list) and v and all(isinstance(x, list) and x and all(_is_id(t) for t in x) for x in v):
        ids = tuple(tuple(x) for x in v)
    else:
        raise BadRequest("'input' must be a string, an array of strings, token ids, or an array of token id arrays",
                         param="input")
    if texts is not None and any(not t for t in texts):
        raise BadRequest("'input' strings must not be empty", param="input")
    if len(texts or ids or ()) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"'input' holds at most {MAX_EMBEDDING_INPUTS} inputs", param="input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not _is_id(dims) or dims < 1):
        raise BadRequest("'dimensions' must be a positive integer", param="dimensions")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest("'user' must be of type str", param="user")
    return EmbeddingRequest(model, texts, ids, fmt, dims)


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0
