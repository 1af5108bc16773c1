"""A stub OpenAI-compatible pool for gateway tests: answers instantly, or fails on command.

mode: "ok" | "error" (HTTP 500) | "stall" (never answers) | "drop" (streams some tokens then cuts
the connection) | "hang" (streams some tokens, then nothing, connection open) | "slow" (each token
after delay_s) | "full" (refuses with 429 when the gateway says it may: x-meshgate-may-refuse: 1, as
a full pool worker does; else answers). cut_after: the tokens "drop" and "hang" send first (of
those the request asks of this pool: a continuation's count from where it starts).
Like a meshgate worker, it sends each chunk's token ids (token i has id i) when asked
(x-meshgate-token-ids: 1) and continues a request from meshgate_resume's output_token_ids (or text).
Like OpenAI, a stream with `stream_options.include_usage` carries `"usage": null` in every chunk
and ends with a usage-only chunk. Received headers and bodies are kept for assertions.
"""
from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from gateway.core.types import LoadReport
from gateway.core.wire import LOAD_HEADER, MAY_REFUSE_HEADER


class StubPool:
    def __init__(self, name: str, num_tokens: int = 5):
        self.name = name
        self.mode = "ok"
        self.num_tokens = num_tokens
        self.delay_s = 0.0
        self.cut_after = 2
        self.requests = 0
        self.cancelled = 0
        self.received: list[tuple[dict[str, str], dict]] = []  # (headers, body) of each generation request
        self.raw: list[bytes] = []  # the bytes of each generation request's body, as they came
        self.capabilities: list[str] | None = None  # advertised in /load when set (as our worker does)
        self.refuse_field: str | None = None  # a body holding this field is answered 400, as a strict server would
        self.load = LoadReport()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/responses", self.respond)
        app.router.add_post("/v1/embeddings", self.embed)
        app.router.add_get("/load", self.load_report)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, port: int = 0) -> str:
        self.runner = web.AppRunner(self.app(), handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def load_report(self, request: web.Request) -> web.Response:
        if self.mode == "stall":
            await asyncio.sleep(3600)
        body = {**self.load.to_dict(), "ready": self.mode != "error", "handling_s": 0.0}
        if self.capabilities is not None:
            body["capabilities"] = self.capabilities
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _take(self, request: web.Request) -> tuple[dict, web.Response | None]:
        """Count and keep a generation request; an answer when a mode or refuse_field decides it."""
        self.requests += 1
        raw = await request.read()
        self.raw.append(raw)
        body = orjson.loads(raw)
        self.received.append((dict(request.headers), body))
        if self.refuse_field is not None and self.refuse_field in body:
            return body, web.Response(body=orjson.dumps({"error": {
                "message": f"Unrecognized request argument supplied: {self.refuse_field}",
                "type": "invalid_request_error", "param": self.refuse_field, "code": None}}),
                status=400, content_type="application/json")
        if self.mode == "error":
            return body, web.json_response({"error": {"message": "boom", "type": "x", "param": None, "code": None}},
                                           status=500)
        return body, None

    async def embed(self, request: web.Request) -> web.Response:
        body, answer = await self._take(request)
        if answer is not None:
            return answer
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.5]} for i in range(len(inputs))]
        return web.Response(body=orjson.dumps({"object": "list", "data": data, "model": body["model"],
                                               "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
                                               "served_by": self.name}),
                            content_type="application/json", headers={LOAD_HEADER: self.load.to_header()})

    async def respond(self, request: web.Request) -> web.StreamResponse:
        """A Responses API answer: `num_tokens` deltas of text, as typed events when streaming."""
        body, answer = await self._take(request)
        if answer is not None:
            return answer
        text = "".join(f"t{i} " for i in range(self.num_tokens))
        use = {"input_tokens": 2, "output_tokens": self.num_tokens, "total_tokens": 2 + self.num_tokens}
        done = {"id": "resp_x", "object": "response", "status": "completed", "model": body["model"], "usage": use,
                "output": [{"type": "message", "id": "msg_x", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "served_by": self.name}
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(done), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(kind: str, data: dict) -> None:
            await resp.write(f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **data}) + b"\n\n")

        await event("response.created", {"response": {**done, "status": "in_progress", "usage": None}})
        for i in range(self.num_tokens):
            await event("response.output_text.delta", {"item_id": "msg_x", "output_index": 0, "content_index": 0,
                                                       "delta": f"t{i} "})
            if self.mode == "drop" and i == 1:
                assert request.transport is not None
                request.transport.abort()
                return resp
        await event("response.completed", {"response": done})
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body, answer = await self._take(request)
        if answer is not None:
            return answer
        if self.mode == "full" and request.headers.get(MAY_REFUSE_HEADER) == "1":
            return web.json_response({"error": {"message": "full", "type": "service_unavailable", "param": None,
                                                "code": None}}, status=429, headers={"Retry-After": "1"})
        if self.mode == "stall":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        headers = {LOAD_HEADER: self.load.to_header()}
        chat = request.path.endswith("chat/completions")
        if not body.get("stream"):
            text = "".join(f"t{i} " for i in range(self.num_tokens))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                       "logprobs": None, "finish_reason": "length"} if chat
                      else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
            return web.Response(body=orjson.dumps({
                "id": "x", "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": self.num_tokens, "total_tokens": 1 + self.num_tokens},
                "served_by": self.name}), content_type="application/json", headers=headers)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resume = body.get("meshgate_resume") or {}
        start = (len(resume["output_token_ids"]) if "output_token_ids" in resume
                 else resume.get("text", "").count(" ") if resume else 0)
        with_ids = request.headers.get("x-meshgate-token-ids") == "1"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        try:
            for i in range(start, self.num_tokens):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                delta = {"content": f"t{i} "} if chat else None
                choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None} if chat
                          else {"index": 0, "text": f"t{i} ", "logprobs": None, "finish_reason": None})
                chunk = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": 0, "model": body["model"], "choices": [choice], "served_by": self.name}
                if include_usage:
                    chunk["usage"] = None
                if with_ids:
                    chunk["meshgate_token_ids"] = [i]
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if self.mode == "drop" and i - start == self.cut_after - 1:
                    assert request.transport is not None
                    request.transport.abort()  # the pool dies mid-stream
                    return resp
                if self.mode == "hang" and i - start == self.cut_after - 1:
                    await asyncio.sleep(3600)  # the pool stalls mid-stream (cancelled when dropped)
            if include_usage:
                use = {"prompt_tokens": 1, "completion_tokens": self.num_tokens, "total_tokens": 1 + self.num_tokens}
                await resp.write(b"data: " + orjson.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                                           "model": body["model"], "choices": [], "usage": use})
                                 + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return resp


def main() -> None:
    """Run a stub pool as its own process: python -m tests.stub_pool --port P [--tokens N] [--delay-s D]."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokens", type=int, default=5)
    p.add_argument("--delay-s", type=float, default=0.0)
    args = p.parse_args()

    async def run() -> None:
        stub = StubPool("stub", args.tokens)
        stub.delay_s = args.delay_s
        await stub.start(args.port)
        print(f"listening http=127.0.0.1:{stub.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
