"""A fast OpenAI-compatible stub upstream for router benchmarks: answers at once, costs almost nothing.

    python -m benchmarks.stub_upstream [--host H] [--port P] [--tokens N] [--itl-ms MS] [--model M]

POST /v1/chat/completions and /v1/completions: a whole JSON answer with `usage`, or (`"stream": true`)
an SSE stream of N content chunks (fewer when the request's max_tokens is lower), the usage chunk
when `stream_options.include_usage` asks for it, then `data: [DONE]` — shaped as meshgate's own
worker shapes them (gateway/worker/responses.py), with its x-meshgate-load header on every answer.
A stream goes out in one write by default (--write-per-event: one per event; --itl-ms: paced).
GET /load (meshgate's load report), /health, /ready, /v1/models, /metrics (Prometheus text, with
the vLLM gauges third-party routers read), the SGLang-style info routes some routers probe, and
/stub/stats (requests served so far, as JSON).

Why not aiohttp: an aiohttp stub tops out near 4,500 req/s on a 2-core machine and would be the
bottleneck of the routers it measures; this is a raw asyncio Protocol on uvloop with httptools
parsing (about 40,000 req/s on the same machine). Answers are built once per (path, model, stream,
usage, tokens) and cached, so a request costs a parse, a dict lookup and a write.

Logs `listening http=HOST:PORT` on stdout when ready (DESIGN.md §8), so `--port 0` works: a caller
reads the port from that line.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections import deque
from typing import Any

import httptools
import orjson

LOAD_REPORT = {
    "waiting": 0, "running": 0, "queued_prompt_tokens": 0, "kv_blocks_used": 0, "kv_blocks_total": 1,
    "prefill_tps": 0, "decode_tps": 0, "queue_wait_s": 0, "hot_prefix_hashes": [], "handling_s": 0, "ready": True,
}
LOAD_HEADER = b"x-meshgate-load: w=0;r=0;q=0;kv=0/1;qw=0.0000\r\n"
GENERATE_PATHS = {b"/v1/chat/completions": "chat", b"/v1/completions": "completion"}
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
_MAX_CACHED = 256  # distinct answers kept (model names come from clients)


class Stats:
    __slots__ = ("generate", "other", "started", "stream")

    def __init__(self) -> None:
        self.generate = 0  # POSTs to a generation route answered
        self.stream = 0  # of which streamed
        self.other = 0  # every other request (probes, health checks, metrics)
        self.started = time.time()


class Answers:
    """Built responses, cached: bytes for a whole answer, a list of writes for a stream."""

    def __init__(self, tokens: int, models: tuple[str, ...]):
        self.tokens = tokens
        self.models = models
        self.created = int(time.time())
        self._cache: dict[tuple[Any, ...], Any] = {}
        self.fixed = {
            b"/health": _json(200, {"status": "ok"}),
            b"/ready": _json(200, {"status": "ready"}),
            b"/load": _json(200, LOAD_REPORT),
            b"/v1/models": _json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": self.created, "owned_by": "stub", "root": m,
                 "max_model_len": 32768} for m in models]}),
            # SGLang-style routers ask for these when a worker registers.
            b"/get_model_info": _json(200, {"model_path": models[0], "tokenizer_path": None, "is_generation": True}),
            b"/model_info": _json(200, {"model_path": models[0], "tokenizer_path": None, "is_generation": True}),
            b"/get_server_info": _json(200, {"model_path": models[0], "max_total_num_tokens": 1 << 20,
                                             "internal_states": [{"load": 0}]}),
            b"/server_info": _json(200, {"model_path": models[0], "max_total_num_tokens": 1 << 20,
                                         "internal_states": [{"load": 0}]}),
            b"/get_load": _json(200, [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]),
            b"/version": _json(200, {"version": "stub"}),
        }

    def generate(self, kind: str, req: dict[str, Any]) -> Any:
        model = req.get("model")
        model = model if isinstance(model, str) else self.models[0]
        stream = req.get("stream") is True
        opts = req.get("stream_options")
        usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
        n = self.tokens
        mt = req.get("max_tokens", req.get("max_completion_tokens"))
        if isinstance(mt, int) and 0 < mt < n:
            n = mt
        key = (kind, model, stream, usage, n)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._stream(kind, model, usage, n) if stream else self._whole(kind, model, n)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def _head(self, kind: str, model: str, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"
        return {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + "stub", "object": obj,
                "created": self.created, "model": model}

    @staticmethod
    def _usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}

    def _whole(self, kind: str, model: str, n: int) -> bytes:
        body = self._head(kind, model, chunk=False)
        text = " hi" * n
        if kind == "chat":
            body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": "length"}]
        else:
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}]
        body["usage"] = self._usage(n)
        return _json(200, body)

    def _stream(self, kind: str, model: str, usage: bool, n: int) -> list[bytes]:
        """The stream as the writes to make: headers + first event, one event each, then the end."""
        events = []
        for i in range(n):
            body = self._head(kind, model, chunk=True)
            last = i == n - 1
            if kind == "chat":
                delta = {"role": "assistant", "content": " hi"} if i == 0 else {"content": " hi"}
                body["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                                    "finish_reason": "length" if last else None}]
                if usage:
                    body["usage"] = None
            else:
                body["choices"] = [{"index": 0, "text": " hi", "logprobs": None,
                                    "finish_reason": "length" if last else None}]
            events.append(b"data: " + orjson.dumps(body) + b"\n\n")
        if usage:
            body = self._head(kind, model, chunk=True)
            body["choices"] = []
            body["usage"] = self._usage(n)
            events.append(b"data: " + orjson.dumps(body) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n" + LOAD_HEADER + b"\r\n")
        writes = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
        writes[0] = head + writes[0]
        writes[-1] += b"0\r\n\r\n"
        return writes

    def metrics(self, stats: Stats) -> bytes:
        text = (
            "# TYPE stub_requests_total counter\n"
            f'stub_requests_total{{route="generate"}} {stats.generate}\n'
            f'stub_requests_total{{route="other"}} {stats.other}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{self.models[0]}"}} 0\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{self.models[0]}"}} 0\n'
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f'vllm:gpu_cache_usage_perc{{model_name="{self.models[0]}"}} 0\n'
        ).encode()
        return _response(200, b"text/plain; version=0.0.4", text)


def _response(status: int, ctype: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, _REASONS.get(status, b"Error"), ctype, len(body), LOAD_HEADER, body))


def _json(status: int, obj: Any) -> bytes:
    return _response(status, b"application/json", orjson.dumps(obj))


def _error(status: int, message: str) -> bytes:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                    "code": None}})


_CLOSE = b"\r\nConnection: close"


class StubProtocol(asyncio.Protocol):
    """One client connection: httptools parses, answers go out in request order (HTTP/1.1)."""

    def __init__(self, answers: Answers, stats: Stats, itl_s: float, one_write: bool = False):
        self.one_write = one_write
        self.answers = answers
        self.stats = stats
        self.itl_s = itl_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.pending: deque[tuple[bytes, bytes, bytes, bool]] = deque()  # waits behind a paced stream
        self.streaming = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(_error(400, "upgrades are not supported"), keep_alive=False)
        except httptools.HttpParserError:
            self._send(_error(400, "malformed HTTP request"), keep_alive=False)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        req = (self.parser.get_method(), path, b"".join(self.body), self.parser.should_keep_alive())
        if self.streaming:
            self.pending.append(req)
        else:
            self._handle(*req)

    # -- answers ----------------------------------------------------------------------------
    def _handle(self, method: bytes, path: bytes, body: bytes, keep_alive: bool) -> None:
        kind = GENERATE_PATHS.get(path)
        if kind is not None:
            if method != b"POST":
                self.stats.other += 1
                self._send(_error(405, "use POST"), keep_alive)
                return
            try:
                req = orjson.loads(body)
            except orjson.JSONDecodeError:
                req = None
            if not isinstance(req, dict):
                self.stats.other += 1
                self._send(_error(400, "the body must be a JSON object"), keep_alive)
                return
            answer = self.answers.generate(kind, req)
            self.stats.generate += 1
            if isinstance(answer, bytes):
                self._send(answer, keep_alive)
            else:
                self.stats.stream += 1
                self._stream(answer, keep_alive)
            return
        self.stats.other += 1
        if path == b"/metrics":
            self._send(self.answers.metrics(self.stats), keep_alive)
        elif path == b"/stub/stats":
            self._send(_json(200, {"generate": self.stats.generate, "stream": self.stats.stream,
                                   "other": self.stats.other, "started": self.stats.started}), keep_alive)
        else:
            fixed = self.answers.fixed.get(path)
            self._send(fixed if fixed is not None else _error(404, f"no route {path.decode(errors='replace')}"),
                       keep_alive)

    def _send(self, data: bytes, keep_alive: bool) -> None:
        t = self.transport
        if t is None:
            return
        if not keep_alive:
            data = data.replace(b"\r\n", _CLOSE + b"\r\n", 1)  # after the status line
        t.write(data)
        if not keep_alive:
            t.close()

    def _stream(self, writes: list[bytes], keep_alive: bool) -> None:
        t = self.transport
        if t is None:
            return
        if not keep_alive:
            writes = [writes[0].replace(b"\r\n", _CLOSE + b"\r\n", 1), *writes[1:]]
        if self.itl_s <= 0:
            if self.one_write:
                t.write(b"".join(writes))
            else:
                for w in writes:  # one write per event: the router sees tokens as separate segments
                    t.write(w)
            if not keep_alive:
                t.close()
            return
        self.streaming = True
        asyncio.ensure_future(self._paced(writes, keep_alive))

    async def _paced(self, writes: list[bytes], keep_alive: bool) -> None:
        for i, w in enumerate(writes):
            if self.transport is None:
                return
            if 0 < i < len(writes) - 1:
                await asyncio.sleep(self.itl_s)
            self.transport.write(w)
        self.streaming = False
        if not keep_alive and self.transport is not None:
            self.transport.close()
            return
        while self.pending and not self.streaming:
            self._handle(*self.pending.popleft())


async def serve(host: str, port: int, tokens: int, itl_ms: float, models: tuple[str, ...],
                one_write: bool = False, tls: Any = None) -> None:
    """tls: an ssl.SSLContext to serve HTTPS with (benchmarks/gateway_tls.py: a pool with mutual TLS)."""
    answers = Answers(tokens, models)
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(answers, stats, itl_ms / 1000, one_write), host, port,
                                      backlog=4096, reuse_address=True, ssl=tls)
    sock = server.sockets[0].getsockname()
    print(f"listening http={sock[0]}:{sock[1]} grpc=off", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stub_upstream", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (read it from the listening line)")
    p.add_argument("--tokens", type=int, default=16, help="content chunks per streamed answer (default 16)")
    p.add_argument("--itl-ms", type=float, default=0.0,
                   help="gap between streamed chunks; 0 (default): all at once, one write per chunk")
    p.add_argument("--write-per-event", action="store_true",
                   help="with --itl-ms 0: one write (one segment) per SSE event; default: the whole stream in "
                        "one write, since a write per event costs a syscall each and caps the stub near 5,000 "
                        "streams/s on 2 cores")
    p.add_argument("--model", action="append", help="model id(s) /v1/models lists (default: m); any is answered")
    p.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CLIENT_CA"),
                   help="serve HTTPS, requiring a client certificate from CLIENT_CA (mutual TLS, as a pool worker)")
    args = p.parse_args(argv)
    if args.tokens < 1:
        p.error("--tokens must be at least 1")
    models = tuple(args.model or ["m"])
    tls = None
    if args.tls:
        from gateway.core.tls import ServerFiles, server_context

        tls = server_context(ServerFiles(args.tls[0], args.tls[1], args.tls[2], require_client_cert=True))
    coro = serve(args.host, args.port, args.tokens, args.itl_ms, models, not args.write_per_event, tls)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
