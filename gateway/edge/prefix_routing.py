"""The gateway's glue for prefix- and session-aware routing (DESIGN §3 `cached_prefix`).

- `route_fields(g, headers)`: what a request's RouteRequest carries for it: the prompt's chunk
  hashes (gateway/core/prefix.py: bounded hashing, whatever the prompt's length), the tokens a chunk
  stands for (learned chars-to-tokens ratio; exact for token-id prompts), and its session key
  (prompt_cache_key, else user, else the x-session-id header) with the pool that last served it.
- `routed(call, endpoint)`: a pool took the request: remember its chunks there (and its prompt
  tokens, which age that memory by the pool's cache size), and the session.
- `usage(call, prompt_tokens)`: a pool's usage answer teaches the chars-to-tokens ratio.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.core.errors import BadRequest
from gateway.core.prefix import CHUNK_CHARS, IDS_PER_CHUNK, request_chunks
from gateway.core.protocol import MAX_SESSION_KEY_CHARS, GenerationRequest
from gateway.core.types import Endpoint, RouteRequest
from gateway.core.wire import SESSION_HEADER
from gateway.routing.prefix_index import PrefixIndex


class PrefixRouting:
    def __init__(self, index: PrefixIndex, enabled: bool = True):
        self.index = index
        self.enabled = enabled

    def route_fields(self, g: GenerationRequest, headers: Mapping[str, str]) -> dict[str, Any]:
        """Keyword arguments for the request's RouteRequest (400 for a bad x-session-id)."""
        source = "prompt_cache_key" if g.prompt_cache_key else "user" if g.user else SESSION_HEADER
        key = g.prompt_cache_key or g.user or headers.get(SESSION_HEADER) or ""
        if len(key) > MAX_SESSION_KEY_CHARS or not key.isprintable():
            raise BadRequest(f"'{source}' must be printable and at most {MAX_SESSION_KEY_CHARS} characters",
                             param=None if source == SESSION_HEADER else source)
        if not self.enabled:
            return {"session_key": key}
        chunks = request_chunks(g.prompt, g.prompt_token_ids, g.messages)
        pool, num = self.index.session(key)
        if chunks.unit == "ids":  # tokens are known exactly
            return {"prefix_hashes": chunks.hashes, "tokens_per_chunk": float(IDS_PER_CHUNK), "session_key": key,
                    "session_pool": pool, "session_chunks": num, "prompt_chars": chunks.total, "tokens_per_char": 1.0}
        ratio = self.index.tokens_per_char
        return {"prefix_hashes": chunks.hashes, "tokens_per_chunk": CHUNK_CHARS * ratio, "session_key": key,
                "session_pool": pool, "session_chunks": num, "prompt_chars": chunks.total, "tokens_per_char": ratio}

    def routed(self, route: RouteRequest, endpoint: Endpoint) -> None:
        self.index.record_sent(endpoint, route.prefix_hashes, route.prompt_tokens)
        self.index.record_session(route.session_key, endpoint.pool_id, len(route.prefix_hashes))

    def usage(self, route: RouteRequest, prompt_tokens: int) -> None:
        if route.tokens_per_char != 1.0 or not route.prefix_hashes:  # text prompts only (ids are exact)
            self.index.learn(route.prompt_chars, prompt_tokens)
