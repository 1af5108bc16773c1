"""A continuation on the worker (issue 17): a request that another pool began and lost.

The gateway sends `meshgate_resume: {"request": <the original body>, "output_token_ids": [...]}` (the
tokens the client already has) or, when the cut pool gave no ids (a third-party pool),
`{"request": ..., "text": "..."}`; the rest of the body is the same request rewritten for third-party
pools, which this worker ignores. The engine takes those tokens as its own earlier output: the
prompt and they are prefilled together (as a preempted request is recomputed), `max_tokens` counts
them, the detokenizer is primed with them (a stop string may span the join; text held back at the
cut comes out once it is safe), and a seeded sampler is advanced past their draws, so the rest is
what the uninterrupted request would have produced (exactly, at temperature 0 or with a seed).
"""
from __future__ import annotations

from typing import Any

from gateway.core.errors import BadRequest
from gateway.core.wire import RESUME_FIELD
from gateway.worker.tokenizer import Tokenizer

PARAM = RESUME_FIELD


def unwrap(body: Any) -> tuple[Any, dict[str, Any] | None]:
    """The request to parse, and the continuation's field (None for an ordinary request)."""
    if not isinstance(body, dict) or body.get(RESUME_FIELD) is None:
        return body, None
    r = body[RESUME_FIELD]
    if not isinstance(r, dict):
        raise BadRequest(f"'{PARAM}' must be an object", param=PARAM)
    original = r.get("request")
    if original is None:
        original = {k: v for k, v in body.items() if k != RESUME_FIELD}
    elif not isinstance(original, dict):
        raise BadRequest(f"'{PARAM}.request' must be the original request body", param=PARAM)
    return original, r


def resumed_ids(resume: dict[str, Any] | None, tokenizer: Tokenizer, vocab_size: int) -> list[int] | None:
    """The output tokens a continuation starts from; None for an ordinary request."""
    if resume is None:
        return None
    ids, text = resume.get("output_token_ids"), resume.get("text")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                                for t in ids):
            raise BadRequest(f"'{PARAM}.output_token_ids' must be token ids of this model", param=PARAM)
        return list(ids)
    if isinstance(text, str):
        return tokenizer.encode(text, add_special_tokens=False) if text else []
    raise BadRequest(f"'{PARAM}' needs output_token_ids or text", param=PARAM)
