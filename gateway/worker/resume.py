"""A continuation on the worker (issue 17): a request that another pool began and lost.

The gateway sends the original body plus `meshgate_resume: {"output_token_ids": [...]}` (the tokens
the client already has) or, when the cut pool gave no ids (a third-party pool), `{"text": "..."}`.
The engine takes those tokens as its own earlier output: the prompt and they are prefilled together
(as a preempted request is recomputed), `max_tokens` counts them, the detokenizer is primed with them
(a stop string may span the join; text held back at the cut comes out once it is safe), and a
seeded sampler is advanced past their draws, so the rest is what the uninterrupted request would
have produced (exactly, at temperature 0 or with a seed).
"""
from __future__ import annotations

from typing import Any

from gateway.core.errors import BadRequest
from gateway.core.wire import RESUME_FIELD
from gateway.worker.tokenizer import Tokenizer

PARAM = RESUME_FIELD


def resumed_ids(body: Any, tokenizer: Tokenizer, vocab_size: int) -> list[int] | None:
    """The output tokens a continuation starts from; None for an ordinary request."""
    if not isinstance(body, dict) or body.get(RESUME_FIELD) is None:
        return None
    r = body[RESUME_FIELD]
    if not isinstance(r, dict):
        raise BadRequest(f"'{PARAM}' must be an object", param=PARAM)
    ids, text = r.get("output_token_ids"), r.get("text")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                                for t in ids):
            raise BadRequest(f"'{PARAM}.output_token_ids' must be token ids of this model", param=PARAM)
        return list(ids)
    if isinstance(text, str):
        return tokenizer.encode(text, add_special_tokens=False) if text else []
    raise BadRequest(f"'{PARAM}' needs output_token_ids or text", param=PARAM)
