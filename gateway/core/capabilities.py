"""What a pool can serve: its endpoints and the request features it honours.

A meshgate worker advertises its set (in /v1/models, its /load report and its registry entry); a
`kind: openai` pool's is declared in config (`pools[].capabilities`). The gateway works out what
each request needs (`needs`) and routes it only to pools whose set holds all of it.
"""
from __future__ import annotations

from typing import Any

# endpoint path -> capability name
ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat", "/v1/completions": "completions",
    "/v1/responses": "responses", "/v1/embeddings": "embeddings",
}
# request features beyond plain text generation
FEATURES: frozenset[str] = frozenset({
    "tools", "json_object", "json_schema", "n", "penalties", "logit_bias", "logprobs",
})
ALL: frozenset[str] = frozenset(ENDPOINTS.values()) | FEATURES
# A third-party server is the judge of the features it honours (its 400 reaches the client), so
# by default it gets them all; the endpoints beyond chat and completions must be declared.
OPENAI_DEFAULT: frozenset[str] = frozenset({"chat", "completions"}) | FEATURES
# What our own worker serves (gateway/worker): everything above.
MESHGATE_WORKER: frozenset[str] = ALL

# The parameter each feature is asked for by, for the gateway's 400.
FEATURE_PARAM = {"tools": "tools", "json_object": "response_format", "json_schema": "response_format",
                 "n": "n", "penalties": "frequency_penalty", "logit_bias": "logit_bias", "logprobs": "logprobs"}


def default_for(kind: str) -> frozenset[str]:
    return MESHGATE_WORKER if kind == "meshgate" else OPENAI_DEFAULT


def needs(path: str, body: dict[str, Any]) -> frozenset[str]:
    """The capabilities a request (a JSON object sent to `path`) needs of the pool that serves it.
    Only a feature actually asked for counts (a field at its default asks for nothing)."""
    out = {ENDPOINTS.get(path, path)}
    if body.get("tools") and body.get("tool_choice") != "none":
        out.add("tools")
    fmt = body.get("response_format")
    if path == "/v1/responses":
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        out.add(kind)
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        out.add("n")
    if body.get("frequency_penalty") or body.get("presence_penalty"):
        out.add("penalties")
    if body.get("logit_bias"):
        out.add("logit_bias")
    if body.get("logprobs") or body.get("top_logprobs"):
        out.add("logprobs")
    return frozenset(out)
