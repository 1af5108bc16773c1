"""OpenAI response bodies and stream chunks, built from engine outputs."""
from __future__ import annotations

import time
from typing import Any

from gateway.worker.tokenizer import Tokenizer

LogProbs = list[tuple[float, list[tuple[int, float]]]]


def usage(num_prompt: int, num_output: int, num_cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_output,
        "total_tokens": num_prompt + num_output,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


class ResponseBuilder:
    """Bodies for one request: ids and timestamps stay fixed across its chunks."""

    def __init__(self, kind: str, request_id: str, model: str, tokenizer: Tokenizer):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.tok = tokenizer

    def _head(self, obj: str) -> dict[str, Any]:
        # No system_fingerprint: the spec types it as a string (never null), and there is no backend
        # fingerprint to give; leaving it out is what the spec allows.
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- whole responses --------------------------------------------------------------------
    def full(self, text: str, finish_reason: str | None, token_ids: list[int], logprobs: LogProbs | None,
             use: dict[str, Any]) -> dict[str, Any]:
        return self.full_choices([self.choice(0, {"content": text}, finish_reason, token_ids, logprobs)], use)

    def choice(self, index: int, message: dict[str, Any], finish_reason: str | None, token_ids: list[int],
               logprobs: LogProbs | None) -> dict[str, Any]:
        """One whole choice; message: {"content": ...} and, for a tool call, "tool_calls"."""
        if self.kind == "chat":
            return {"index": index,
                    "message": {"role": "assistant", "refusal": None, "annotations": [], **message},
                    "logprobs": self._chat_logprobs(token_ids, logprobs), "finish_reason": finish_reason}
        return {"index": index, "text": message["content"],
                "logprobs": self._completion_logprobs(token_ids, logprobs), "finish_reason": finish_reason}

    def full_choices(self, choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = choices
        body["usage"] = use
        return body

    # -- stream chunks ----------------------------------------------------------------------
    def chunk(self, text: str, finish_reason: str | None, token_ids: list[int], logprobs: LogProbs | None,
              include_usage: bool, first: bool = False, index: int = 0,
              delta: dict[str, Any] | None = None) -> dict[str, Any]:
        """delta: the chat delta to send instead of {"content": text} (a tool call's)."""
        if self.kind == "chat":
            delta = dict(delta) if delta is not None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": index, "delta": delta,
                                      "logprobs": self._chat_logprobs(token_ids, logprobs),
                                      "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text, "logprobs": self._completion_logprobs(token_ids, logprobs),
                      "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        if include_usage and self.kind == "chat":
            # The chat chunk schema has `usage: null` until the usage chunk; the completion schema's
            # usage is not nullable, so completion chunks carry none until then.
            body["usage"] = None
        return body

    def usage_chunk(self, use: dict[str, Any]) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = use
        return body

    # -- logprobs ---------------------------------------------------------------------------
    def _token(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False)

    def _chat_logprobs(self, token_ids: list[int], logprobs: LogProbs | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        content = []
        for tid, (lp, alts) in zip(token_ids, logprobs):
            t = self._token(tid)
            content.append({
                "token": t, "logprob": _finite(lp), "bytes": list(t.encode()),
                "top_logprobs": [
                    {"token": (a := self._token(i)), "logprob": _finite(v), "bytes": list(a.encode())} for i, v in alts
                ],
            })
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, token_ids: list[int], logprobs: LogProbs | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        tokens = [self._token(t) for t in token_ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(lp) for lp, _ in logprobs],
            "top_logprobs": [{self._token(i): _finite(v) for i, v in alts} for _, alts in logprobs],
            "text_offset": offsets,
        }


def _finite(lp: float) -> float:
    """A token a grammar or logit_bias ruled out has log-probability -inf, which JSON cannot carry:
    -9999.0 stands for it, as OpenAI writes such values."""
    return lp if lp > -9999.0 else -9999.0
