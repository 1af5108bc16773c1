"""OpenAI request bodies: parsing and validation into typed requests.

Both fronts (gateway and pool worker) use this, so a bad request gets the same 400 wherever it
lands. Fields OpenAI defines but we cannot honour are refused when set to a non-default value,
never silently ignored; fields with no effect on the output (user, metadata, ...) are accepted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gateway.core.agent_protocol import agent_fields, message_extras, response_format
from gateway.core.errors import BadRequest

MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_LOGPROBS = 20
MAX_SESSION_KEY_CHARS = 512  # prompt_cache_key, user

# Accepted and ignored: they describe the caller, storage or caching, not the generation. Still
# type-checked (null is always fine), so a malformed request is refused as OpenAI would.
_NO_EFFECT: dict[str, type] = {
    "user": str, "metadata": dict, "store": bool, "service_tier": str, "safety_identifier": str,
    "prompt_cache_key": str, "prompt_cache_retention": str, "prompt_cache_options": dict,
    "parallel_tool_calls": bool, "modalities": list, "verbosity": str, "reasoning_effort": str,
}
# Refused unless at their default (the value in the dict).
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "best_of": 1, "echo": False, "suffix": None, "functions": None,
    "function_call": "none", "audio": None, "prediction": None, "web_search_options": None,
    "moderation": None,
}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
             "stream_options", "ignore_eos", "stop_token_ids", "n", "frequency_penalty", "presence_penalty",
             "logit_bias"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "logprobs"}
CHAT_FIELDS = _SAMPLING | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                           "tools", "tool_choice"}
MAX_N = 16
MAX_LOGIT_BIAS = 300
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated completion or chat request."""

    kind: str  # "completion" | "chat"
    model: str
    prompt: str | None  # completion: text prompt
    prompt_token_ids: tuple[int, ...] | None  # completion: pre-tokenized prompt
    messages: tuple[dict[str, Any], ...] | None  # chat: role, content as text (+ tool_calls, tool_call_id)
    max_tokens: int | None  # None: up to the model's context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs
    stream: bool
    include_usage: bool
    # Session keys for prefix-aware routing (gateway/routing/prefix_index.py); no effect on the output
    prompt_cache_key: str | None = None
    user: str | None = None
    n: int = 1  # choices asked for
    needs: frozenset[str] = frozenset()  # what the request needs of a pool (gateway/core/capabilities.py)
    max_tokens_param: str = "max_tokens"  # the field max_tokens came from, for errors
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    tools: tuple[dict[str, Any], ...] = ()  # each {"name", "description"?, "parameters"?, "strict"?}
    tool_choice: str = "none"  # none | auto | required | function (the one named tool_name)
    tool_name: str | None = None
    response_format: dict[str, Any] | None = None  # json_object / json_schema; None: text


def parse_completion(body: Any) -> GenerationRequest:
    body = _check_object(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise BadRequest("'prompt' is a required property", param="prompt")
    prompt = body["prompt"]
    if prompt is None:
        prompt = ""  # the spec's default, <|endoftext|>: generate from the start of a document
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        prompt = prompt[0]  # a batch of one: ["text"] or [[ids]], one level only
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif _is_token_ids(prompt):
        if any(t < 0 for t in prompt):
            raise BadRequest("'prompt' token ids must be non-negative", param="prompt")
        ids = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        raise BadRequest("only one prompt per request is supported", param="prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids", param="prompt")
    lp = body.get("logprobs")
    if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
        raise BadRequest(f"'logprobs' must be an integer between 0 and {MAX_LOGPROBS}", param="logprobs")
    return _common(body, "completion", text, ids, None, body.get("max_tokens", 16), lp, "max_tokens")


def parse_chat(body: Any) -> GenerationRequest:
    body = _check_object(body, CHAT_FIELDS)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    messages = tuple(_message(m, i) for i, m in enumerate(msgs))
    agent = agent_fields(body.get("tools"), body.get("tool_choice"), response_format(body.get("response_format")))
    lp = None
    if _opt(body, "logprobs", bool, False):
        lp = body.get("top_logprobs") or 0
        if not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS:
            raise BadRequest(f"'top_logprobs' must be an integer between 0 and {MAX_LOGPROBS}", param="top_logprobs")
    elif body.get("top_logprobs") is not None:
        raise BadRequest("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    # max_tokens is the deprecated name; a null max_completion_tokens leaves it in force.
    mt_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return dataclasses.replace(_common(body, "chat", None, None, messages, body.get(mt_key), lp, mt_key), **agent)


def _check_object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key, value in body.items():
        if key in allowed:
            continue
        if key in _NO_EFFECT:
            if value is not None and not isinstance(value, _NO_EFFECT[key]):
                raise BadRequest(f"'{key}' must be of type {_NO_EFFECT[key].__name__}", param=key)
            continue
        if key in _UNSUPPORTED_DEFAULTS:
            if value is None or _is_default(value, _UNSUPPORTED_DEFAULTS[key]) or (key == "tools" and value == []):
                continue
            raise BadRequest(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
        raise BadRequest(f"Unrecognized request argument supplied: {key}", param=key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is a required property and must be a string", param="model")
    return body


def _message(m: Any, i: int) -> dict[str, Any]:
    p = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"'{p}' must be an object", param=p)
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(f"'{p}.role' must be one of {sorted(ROLES)}", param=f"{p}.role")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    extras = message_extras(m, role, p)
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"'{p}.content' parts must be text parts", param=f"{p}.content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise BadRequest(f"'{p}.content' must be a string or an array of text parts", param=f"{p}.content")
    return {"role": role, "content": content, **extras}


def _common(body: dict[str, Any], kind: str, prompt: str | None, ids: tuple[int, ...] | None,
            messages: tuple[dict[str, str], ...] | None, max_tokens: Any, logprobs: int | None,
            max_tokens_key: str) -> GenerationRequest:
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise BadRequest(f"'{max_tokens_key}' must be a positive integer", param=max_tokens_key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise BadRequest("'top_p' must be in (0, 1]", param="top_p")
    top_k = _opt(body, "top_k", int, 0)
    if top_k < -1:
        raise BadRequest("'top_k' must be -1, 0 (off) or positive", param="top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise BadRequest("'seed' must be an integer", param="seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_LEN for s in stops):
        raise BadRequest(f"'stop' takes up to {MAX_STOP} non-empty strings of up to {MAX_STOP_LEN} characters", param="stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
        raise BadRequest("'stop_token_ids' must be an array of token ids", param="stop_token_ids")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not all(
            isinstance(so.get(k, False), bool) for k in ("include_usage", "include_obfuscation"))):
        raise BadRequest("'stream_options' must be an object like {'include_usage': true}", param="stream_options")
    for key in ("prompt_cache_key", "user"):
        v = body.get(key)
        if isinstance(v, str) and len(v) > MAX_SESSION_KEY_CHARS:
            raise BadRequest(f"'{key}' is at most {MAX_SESSION_KEY_CHARS} characters", param=key)
    n = _opt(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise BadRequest(f"'n' must be an integer between 1 and {MAX_N}", param="n")
    penalties = [_number(body, k, 0.0, -2.0, 2.0) for k in ("frequency_penalty", "presence_penalty")]
    stream = _opt(body, "stream", bool, False)
    if so is not None and not stream:
        raise BadRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return GenerationRequest(
        kind=kind, model=body["model"], prompt=prompt, prompt_token_ids=ids, messages=messages,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
        seed=seed % (2**64) if seed is not None else None, stop=stops, stop_token_ids=tuple(stop_ids),
        ignore_eos=_opt(body, "ignore_eos", bool, False), logprobs=logprobs, stream=stream,
        prompt_cache_key=body.get("prompt_cache_key"), user=body.get("user"),
        include_usage=bool(so and so.get("include_usage")), n=n, max_tokens_param=max_tokens_key,
        frequency_penalty=penalties[0], presence_penalty=penalties[1], logit_bias=_logit_bias(body.get("logit_bias")),
    )


def _logit_bias(v: Any) -> tuple[tuple[int, float], ...]:
    if v is None:
        return ()
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' must be an object of up to {MAX_LOGIT_BIAS} token ids", param="logit_bias")
    out = []
    for k, b in v.items():
        if not (isinstance(k, str) and k.isdigit() and len(k) < 10):
            raise BadRequest("'logit_bias' keys must be token ids", param="logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise BadRequest("'logit_bias' values must be numbers between -100 and 100", param="logit_bias")
        out.append((int(k), float(b)))
    return tuple(out)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_token_ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_int(t) for t in v)


def _is_default(value: Any, default: Any) -> bool:
    """value == default without Python's True == 1 and 0 == False: `n: true` is not `n: 1`."""
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def _opt(body: dict[str, Any], key: str, tp: type, default: Any) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if tp is int and not _is_int(v) or tp is not int and not isinstance(v, tp):
        raise BadRequest(f"'{key}' must be of type {tp.__name__}", param=key)
    return v


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be a number between {lo:g} and {hi:g}", param=key)
    return float(v)
