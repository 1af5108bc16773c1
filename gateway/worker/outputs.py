"""Output processing, apart from the engine's step: detokenization, stop strings, RequestOutputs.

The engine's step ends with one TokenEvent per request that got a token: a snapshot of what the
output side needs, taken on the engine's thread, so the output side may run anywhere (inline in
Engine.step, or on the event loop for AsyncEngine, off the engine's critical path). A stop string
is found here; the OutputProcessor then reports the request as finished ("stop") and names it in
`stopped`, so the engine ends it — at once when inline, one step later when not (that step's token
is dropped here, as vLLM's output processor drops tokens past a stop).
"""
from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass
from typing import NamedTuple

from gateway.worker.request import RequestStatus
from gateway.worker.tokenizer import Detokenizer, Tokenizer


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]  # new tokens
    text: str  # new text that is safe to show
    logprobs: list[tuple[float, list[tuple[int, float]]]]  # for the new tokens, if asked
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str | None = None


class TokenEvent(NamedTuple):
    """One request's new token, as the engine left the request after the step."""

    request_id: str
    token: int
    status: RequestStatus  # after the step (finished when EOS, a stop token or the length ended it)
    is_stop_token: bool  # the token is the EOS/stop token that finished it (shown as no text)
    logprob: tuple[float, list[tuple[int, float]]] | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort"}


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.detoks: dict[str, Detokenizer] = {}

    def add(self, request_id: str, stop: tuple[str, ...], primed: Sequence[int] = ()) -> None:
        """primed: tokens the request already has (a continuation): decoded first, their text not sent
        again; what the detokenizer holds back of them (a partial character, a possible stop) stays held."""
        detok = self.detoks[request_id] = Detokenizer(self.tokenizer, stop)
        for t in primed:
            detok.add([t])

    def forget(self, request_id: str) -> None:
        self.detoks.pop(request_id, None)

    def process(self, events: list[TokenEvent]) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """RequestOutputs for the events of requests still open here, and (request id, stop string)
        for those a stop string ended (the engine finishes those it still runs)."""
        outputs: list[RequestOutput] = []
        stopped: list[tuple[str, str]] = []
        for ev in events:
            detok = self.detoks.get(ev.request_id)
            if detok is None:  # finished here already (stop string), or aborted
                continue
            text = "" if ev.is_stop_token else detok.add([ev.token])
            finished = ev.status.finished
            reason = _REASONS.get(ev.status)
            if detok.stopped_by is not None:
                stopped.append((ev.request_id, detok.stopped_by))
                finished, reason = True, "stop"  # also when the length ran out on the same token
            elif finished:
                text += detok.flush()
            if finished:
                del self.detoks[ev.request_id]
            outputs.append(RequestOutput(
                request_id=ev.request_id, token_ids=[ev.token], text=text,
                logprobs=[ev.logprob] if ev.logprob is not None else [],
                finished=finished, finish_reason=reason, num_prompt_tokens=ev.num_prompt_tokens,
                num_output_tokens=ev.num_output_tokens, num_cached_tokens=ev.num_cached_tokens,
            ))
        return outputs, stopped
