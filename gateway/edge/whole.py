"""Non-stream requests that outlive their pool (issue 17): asked of meshgate pools as a stream.

A whole answer is lost with its pool: nothing reached the client, so today's forwarder retries it
from the start on the next pool, and the tokens the first pool generated are wasted. When every
pool serving the model is a meshgate pool (kind: meshgate; `kind: openai` pools keep the whole
retry) and continuation is on (resilience.resume and resume_whole), the gateway asks the pool for
the answer as a stream with token ids instead (as_stream), relays it through the same resumable
machinery as a client's stream (edge/resume.py: continuation on a cut, stall and pool-down
detection, metering once), into an Assembler, and answers the client with the non-stream JSON the
worker would have sent: same id and created, usage once, content, tool calls and logprobs per
choice (gateway/worker/responses.py builds both forms; see Assembler for what differs).
"""
from __future__ import annotations

from typing import Any

import orjson

from gateway.edge.forward import Call
from gateway.edge.resume import ask_for_token_ids

_STREAM_FIELDS = b',"stream":true,"stream_options":{"include_usage":true}}'


def as_stream(call: Call) -> None:
    """Ask the pool for call's answer as a stream with usage and token ids. The client's bytes go
    on as they came with the two fields appended (a body naming either is encoded anew)."""
    body = call.body.rstrip()
    if b'"stream' not in body and body.endswith(b"}"):  # no "stream" nor "stream_options" field to replace
        call.body = body[:-1] + _STREAM_FIELDS
    else:
        obj = orjson.loads(body)
        obj["stream"] = True
        obj["stream_options"] = {**(obj.get("stream_options") or {}), "include_usage": True}
        call.body = orjson.dumps(obj)
    call.stream = True
    call.whole = True  # its first-byte wait stays a whole answer's (a grammar may compile first)
    ask_for_token_ids(call)


class Assembler:
    """The Sink a whole answer's stream is relayed into; body() is the non-stream answer.

    Kept as bytes while it comes and parsed once at the end (one orjson call over all events).
    Per choice (by index): content deltas joined (a chat answer whose deltas carried tool calls has
    content null, as the worker's whole answer), tool calls merged by their index (id, type and
    name from the first delta, arguments joined), logprobs joined (a completion's text_offset
    counted anew over the whole text), the last finish_reason. Top-level fields other than
    object, choices and usage come from the first chunk (id, created, model, and any a pool adds);
    usage from the usage chunk. A pool's error event (or the relay's failure event) is kept as the
    answer's error instead."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.parts: list[bytes] = []

    def push(self, data: bytes) -> bool:
        self.parts.append(data)
        return False  # never behind: a whole answer is held in full, as resp.read() would

    async def drained(self) -> None:
        return None

    def body(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the answer, None) or (None, the error body) when the stream ended in an error event."""
        events = [ev[5:].strip() for ev in b"".join(self.parts).split(b"\n\n") if ev.startswith(b"data:")]
        events = [e for e in events if e and e != b"[DONE]"]
        objs = orjson.loads(b"[" + b",".join(events) + b"]") if events else []
        head: dict[str, Any] | None = None
        usage: Any = None
        choices: dict[int, _Choice] = {}
        for obj in objs:
            if not isinstance(obj, dict):
                continue
            if "error" in obj:
                return None, obj
            if head is None:
                head = {k: v for k, v in obj.items() if k not in ("object", "choices", "usage")}
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj.get("choices") or ():
                if isinstance(c, dict):
                    choices.setdefault(c.get("index", 0), _Choice(self.chat)).add(c)
        if head is None:
            return None, {"error": {"message": "the pool's answer was empty", "type": "upstream_error",
                                    "param": None, "code": None}}
        answer = {**head, "object": "chat.completion" if self.chat else "text_completion",
                  "choices": [choices[i].whole(i) for i in sorted(choices)]}
        if usage is not None:
            answer["usage"] = usage
        return answer, None


class _Choice:
    def __init__(self, chat: bool):
        self.chat = chat
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.chat_lps: list[Any] | None = None
        self.lps: dict[str, list[Any]] | None = None  # completions: tokens, token_logprobs, top_logprobs
        self.finish_reason: Any = None

    def add(self, c: dict[str, Any]) -> None:
        if c.get("finish_reason") is not None:
            self.finish_reason = c["finish_reason"]
        lp = c.get("logprobs")
        if not self.chat:
            if isinstance(c.get("text"), str):
                self.text.append(c["text"])
            if isinstance(lp, dict):
                acc = self.lps = self.lps or {"tokens": [], "token_logprobs": [], "top_logprobs": []}
                for k, v in acc.items():
                    v.extend(lp.get(k) or ())
            return
        delta = c.get("delta") or {}
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            have = self.calls.get(call.get("index", 0))
            if have is None:
                fn = call.get("function") or {}
                self.calls[call.get("index", 0)] = {
                    "id": call.get("id"), "type": call.get("type", "function"),
                    "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""}}
            else:
                have["function"]["arguments"] += (call.get("function") or {}).get("arguments") or ""
        if isinstance(lp, dict):
            self.chat_lps = (self.chat_lps or []) + list(lp.get("content") or ())

    def whole(self, index: int) -> dict[str, Any]:
        text = "".join(self.text)
        if not self.chat:
            lps: dict[str, Any] | None = None
            if self.lps is not None:
                offsets, pos = [], 0
                for t in self.lps["tokens"]:
                    offsets.append(pos)
                    pos += len(t)
                lps = {**self.lps, "text_offset": offsets}
            return {"index": index, "text": text, "logprobs": lps, "finish_reason": self.finish_reason}
        message: dict[str, Any] = {"role": "assistant", "refusal": None, "annotations": []}
        if self.calls:
            message["content"] = None
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        else:
            message["content"] = text
        chat_lps = {"content": self.chat_lps, "refusal": None} if self.chat_lps is not None else None
        return {"index": index, "message": message, "logprobs": chat_lps, "finish_reason": self.finish_reason}
