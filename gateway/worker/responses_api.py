"""POST /v1/responses in our worker: the Response object, whole or as its typed stream events
(response.created, .in_progress, .output_item.added, .content_part.added, .output_text.delta,
.function_call_arguments.delta, their .done events, then response.completed or .incomplete).

One generation (n = 1) shaped by tools.ChoiceShaper, so a tool call is a function_call output item.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.core.protocol import GenerationRequest
from gateway.worker.engine import RequestOutput
from gateway.worker.tools import ChoiceShaper


class ResponseState:
    """One response under construction: its fixed fields, output items, and the event counter."""

    def __init__(self, g: GenerationRequest, request_id: str, model: str):
        self.g = g
        self.id = "resp_" + request_id
        self.msg_id = "msg_" + request_id
        self.fc_id = "fc_" + request_id
        self.model = model
        self.created = int(time.time())
        self.seq = 0
        self.text = ""
        self.args = ""
        self.call: dict[str, Any] | None = None  # the function_call item, once the call began
        self.opened = False  # the message item (text) was announced

    def body(self, status: str, reason: str | None = None, use: dict[str, Any] | None = None) -> dict[str, Any]:
        g = self.g
        output = []
        if self.call is not None:
            output.append({**self.call, "arguments": self.args, "status": "completed" if status != "in_progress"
                           else "in_progress"})
        elif self.opened or status != "in_progress":
            output.append(self.message("completed" if status == "completed" else "incomplete"))
        if status == "in_progress":
            output = []
        instructions = next((m["content"] for m in g.messages or () if m["role"] == "system"), None)
        fmt: dict[str, Any] = {"type": "text"}
        if g.response_format is not None:
            fmt = dict(g.response_format)
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "instructions": instructions, "max_output_tokens": g.max_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": True, "previous_response_id": None, "reasoning": None,
            "store": False, "temperature": g.temperature, "top_p": g.top_p, "text": {"format": fmt},
            "tool_choice": _tool_choice(g), "tools": [_tool(t) for t in g.tools], "truncation": "disabled",
            "usage": use, "metadata": {},
        }

    def message(self, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}]}

    def event(self, kind: str, **data: Any) -> bytes:
        self.seq += 1
        return (b"event: " + kind.encode() + b"\ndata: "
                + orjson.dumps({"type": kind, "sequence_number": self.seq - 1, **data}) + b"\n\n")

    def deltas(self, deltas: list[dict[str, Any]]) -> bytes:
        """Events for the shaper's chat-style deltas."""
        out = []
        for d in deltas:
            if "content" in d and d["content"]:
                if not self.opened:
                    self.opened = True
                    out.append(self.event("response.output_item.added", output_index=0,
                                          item={**self.message("in_progress"), "content": []}))
                    out.append(self.event("response.content_part.added", item_id=self.msg_id, output_index=0,
                                          content_index=0, part={"type": "output_text", "text": "",
                                                                 "annotations": [], "logprobs": []}))
                self.text += d["content"]
                out.append(self.event("response.output_text.delta", item_id=self.msg_id, output_index=0,
                                      content_index=0, delta=d["content"], logprobs=[]))
            for tc in d.get("tool_calls") or ():
                f = tc.get("function") or {}
                if tc.get("id"):
                    self.call = {"type": "function_call", "id": self.fc_id, "call_id": tc["id"],
                                 "name": f.get("name", ""), "arguments": ""}
                    out.append(self.event("response.output_item.added", output_index=0,
                                          item={**self.call, "status": "in_progress"}))
                if f.get("arguments"):
                    self.args += f["arguments"]
                    out.append(self.event("response.function_call_arguments.delta", item_id=self.fc_id,
                                          output_index=0, delta=f["arguments"]))
        return b"".join(out)

    def closing(self, reason: str | None, use: dict[str, Any]) -> bytes:
        out = []
        status = "incomplete" if reason == "length" else "completed"
        if self.call is not None:
            out.append(self.event("response.function_call_arguments.done", item_id=self.fc_id, output_index=0,
                                  name=self.call["name"], arguments=self.args))
            out.append(self.event("response.output_item.done", output_index=0,
                                  item={**self.call, "arguments": self.args, "status": "completed"}))
        else:
            if not self.opened:
                self.opened = True  # announce the (empty) message anyway
                out.append(self.event("response.output_item.added", output_index=0,
                                      item={**self.message("in_progress"), "content": []}))
                out.append(self.event("response.content_part.added", item_id=self.msg_id, output_index=0,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                             "logprobs": []}))
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            out.append(self.event("response.output_text.done", item_id=self.msg_id, output_index=0,
                                  content_index=0, text=self.text, logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=self.msg_id, output_index=0,
                                  content_index=0, part=part))
            out.append(self.event("response.output_item.done", output_index=0,
                                  item=self.message("completed" if status == "completed" else "incomplete")))
        out.append(self.event(f"response.{status}", response=self.body(status, reason, use)))
        return b"".join(out)


def response_usage(last: RequestOutput) -> dict[str, Any]:
    return {"input_tokens": last.num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": last.num_cached_tokens, "cache_write_tokens": 0},
            "output_tokens": last.num_output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": last.num_prompt_tokens + last.num_output_tokens}


async def serve_response(request: web.Request, g: GenerationRequest, outputs: Any, on_token: Callable[[Any], None],
                         deadline: float, shaper: ChoiceShaper, request_id: str, model: str,
                         failure: Callable[[Exception], Exception], errors: tuple[type[Exception], ...]
                         ) -> web.StreamResponse:
    """Run the one generation of a Responses request and answer it (whole, or streamed)."""
    state = ResponseState(g, request_id or uuid.uuid4().hex, model)
    last: RequestOutput | None = None
    if not g.stream:
        try:
            async with contextlib.aclosing(outputs), asyncio.timeout_at(deadline):
                async for _, out in outputs:
                    on_token(out)
                    state.deltas(shaper.feed(out.text))
                    last = out
        except errors as e:
            raise failure(e) from None
        assert last is not None
        more, _, reason = shaper.finish(last.finish_reason)
        state.deltas(more)
        status = "incomplete" if reason == "length" else "completed"
        return web.Response(body=orjson.dumps(state.body(status, reason, response_usage(last))),
                            content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(state.event("response.created", response=state.body("in_progress")))
    await resp.write(state.event("response.in_progress", response=state.body("in_progress")))
    try:
        async with contextlib.aclosing(outputs), asyncio.timeout_at(deadline):
            async for _, out in outputs:
                on_token(out)
                chunk = state.deltas(shaper.feed(out.text))
                if out.finished:
                    more, _, reason = shaper.finish(out.finish_reason)
                    chunk += state.deltas(more) + state.closing(reason, response_usage(out))
                if chunk:
                    await resp.write(chunk)
                last = out
    except errors as e:
        err = failure(e)
        await resp.write(state.event("error", code=getattr(err, "code", None), message=str(err), param=None))
    await resp.write_eof()
    return resp


def _tool(t: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "name": t["name"], "description": t["description"] or None,
            "parameters": t["parameters"], "strict": t["strict"]}


def _tool_choice(g: GenerationRequest) -> Any:
    if g.tool_choice == "function":
        return {"type": "function", "name": g.tool_name}
    return g.tool_choice
