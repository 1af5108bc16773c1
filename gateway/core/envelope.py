"""What the edge gateway reads of an OpenAI request: only what it routes, limits and meters by.

The gateway is not the judge of what a pool can honour (a vLLM pool takes fields our worker does
not know, and the other way round): it checks the fields it reads (model, stream and
stream_options, token limits, the prompt's size, n) and the JSON's shape, and forwards the body
untouched; the pool's own 400 reaches the client. What the request needs of a pool (its endpoint,
tools, structured outputs, ...) is worked out here too (gateway/core/capabilities.py), so routing
sends it only where it can be served.
"""
from __future__ import annotations

from typing import Any

import orjson

from gateway.core import capabilities
from gateway.core.errors import BadRequest
from gateway.core.protocol import MAX_SESSION_KEY_CHARS, GenerationRequest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
RESPONSES, EMBEDDINGS = "/v1/responses", "/v1/embeddings"
_KIND = {CHAT: "chat", COMPLETIONS: "completion", RESPONSES: "responses", EMBEDDINGS: "embeddings"}


def read(path: str, body: Any) -> GenerationRequest:
    """The gateway's view of a request body (already JSON-decoded) sent to `path`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is a required property and must be a string", param="model")
    kind = _KIND[path]
    texts: list[str] = []
    ids: list[int] = []
    messages: list[dict[str, str]] = []
    if kind == "chat":
        _chat_messages(body.get("messages"), messages)
        texts.extend(m["content"] for m in messages)
    elif kind == "completion":
        if "prompt" not in body:
            raise BadRequest("'prompt' is a required property", param="prompt")
        _prompts(body["prompt"], "prompt", texts, ids, allow_null=True)
    elif kind == "responses":
        _response_input(body, messages)
        texts.extend(m["content"] for m in messages)
    else:
        if body.get("input") is None:
            raise BadRequest("'input' is a required property", param="input")
        _prompts(body["input"], "input", texts, ids, allow_null=False)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools")
    if tools:  # their schemas are rendered into the prompt: they count toward its size
        rendered = orjson.dumps(tools).decode()
        texts.append(rendered)
        if messages:
            messages.append({"role": "tools", "content": rendered})
    n = _int(body, "n", 1, 1)
    stream = body.get("stream")
    if stream is None or kind == "embeddings":
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequest("'stream' must be of type bool", param="stream")
    include_usage = _stream_options(body, stream, kind)
    max_tokens, key = _max_tokens(body, kind)
    prompt = "".join(texts) if kind != "chat" and kind != "responses" else None
    return GenerationRequest(
        kind=kind, model=model, prompt=prompt, prompt_token_ids=tuple(ids) or None,
        messages=tuple(messages) if messages else None, max_tokens=max_tokens, temperature=1.0, top_p=1.0,
        top_k=0, seed=None, stop=(), stop_token_ids=(), ignore_eos=False, logprobs=None, stream=stream,
        include_usage=include_usage, n=n, needs=capabilities.needs(path, body), max_tokens_param=key,
        prompt_cache_key=_session_key(body, "prompt_cache_key"), user=_session_key(body, "user"),
    )


def _session_key(body: dict[str, Any], key: str) -> str | None:
    """prompt_cache_key / user: routing's session key (gateway/edge/prefix_routing.py), so read here."""
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise BadRequest(f"'{key}' must be a string", param=key)
    if len(v) > MAX_SESSION_KEY_CHARS:
        raise BadRequest(f"'{key}' is at most {MAX_SESSION_KEY_CHARS} characters", param=key)
    return v


def _int(body: dict[str, Any], key: str, default: int, lo: int) -> int:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise BadRequest(f"'{key}' must be an integer of at least {lo}", param=key)
    return v


def _max_tokens(body: dict[str, Any], kind: str) -> tuple[int | None, str]:
    if kind == "embeddings":
        return None, "max_tokens"
    if kind == "responses":
        key = "max_output_tokens"
    elif kind == "chat" and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"  # max_tokens is the deprecated name; a null one leaves it in force
    else:
        key = "max_tokens"
    v = body.get(key, 16 if kind == "completion" else None)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise BadRequest(f"'{key}' must be a positive integer", param=key)
    return v, key


def _stream_options(body: dict[str, Any], stream: bool, kind: str) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict) or not all(isinstance(so.get(k, False), bool)
                                           for k in ("include_usage", "include_obfuscation")):
        raise BadRequest("'stream_options' must be an object like {'include_usage': true}", param="stream_options")
    if not stream:
        raise BadRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return kind != "responses" and bool(so.get("include_usage"))


def _text_of(content: Any, p: str) -> str:
    """The text of a message's content: a string, null, or an array of parts (text parts' text;
    other parts, e.g. images, are the pool's to judge)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRequest(f"'{p}.content' must be a string or an array of content parts", param=f"{p}.content")
    out = []
    for part in content:
        if not isinstance(part, dict):
            raise BadRequest(f"'{p}.content' parts must be objects", param=f"{p}.content")
        text = part.get("text")
        if isinstance(text, str):
            out.append(text)
    return "".join(out)


def _chat_messages(msgs: Any, out: list[dict[str, str]]) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"'{p}' must be an object with a string 'role'", param=p)
        text = _text_of(m.get("content"), p)
        calls = m.get("tool_calls")
        if isinstance(calls, list):  # an assistant turn's calls are part of the prompt too
            text += "".join(str((c.get("function") or {}).get("arguments", "")) for c in calls if isinstance(c, dict))
        out.append({"role": m["role"], "content": text})


def _response_input(body: dict[str, Any], out: list[dict[str, str]]) -> None:
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string", param="instructions")
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
        return
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty array of input items", param="input")
    for i, item in enumerate(items):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{p}' must be an object", param=p)
        text = _text_of(item.get("content"), p)
        for key in ("arguments", "output"):  # function_call and function_call_output items
            if isinstance(item.get(key), str):
                text += item[key]
        out.append({"role": str(item.get("role") or item.get("type") or "user"), "content": text})


def _prompts(v: Any, param: str, texts: list[str], ids: list[int], allow_null: bool) -> None:
    """A prompt or embeddings input: a string, token ids, or an array of either."""
    if v is None and allow_null:
        return
    if isinstance(v, str):
        texts.append(v)
    elif isinstance(v, list) and v and all(_is_id(t) for t in v):
        ids.extend(v)
    elif isinstance(v, list) and v and all(isinstance(x, str) or (isinstance(x, list) and x and all(_is_id(t) for t in x))
                                           for x in v):
        for x in v:
            if isinstance(x, str):
                texts.append(x)
            else:
                ids.extend(x)
    else:
        raise BadRequest(f"'{param}' must be a string, an array of token ids, or a non-empty array of either",
                         param=param)


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0
